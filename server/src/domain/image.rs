//! An image: the kernel, optional initramfs and ext4 root file system a VM boots from.

use std::path::PathBuf;

use super::ImageId;

/// An imported image, as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// Its id.
    pub id: ImageId,
    /// Its unique name.
    pub name: String,
    /// The kernel, inside the state directory.
    pub kernel_path: PathBuf,
    /// The initramfs, inside the state directory, if the image has one.
    pub initrd_path: Option<PathBuf>,
    /// The root file system, inside the state directory; never written.
    pub rootfs_path: PathBuf,
    /// Extra kernel arguments for every VM of this image.
    pub kernel_args: String,
    /// Size of the root file system in bytes.
    pub rootfs_size_bytes: u64,
    /// Milliseconds since the Unix epoch when it was imported.
    pub created_at_ms: i64,
    /// Its labels.
    pub labels: super::Labels,
}

/// What a caller asks to import: source paths on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewImage {
    /// The new image's name.
    pub name: String,
    /// Where the kernel is now.
    pub kernel_path: PathBuf,
    /// Where the initramfs is now, if any.
    pub initrd_path: Option<PathBuf>,
    /// Where the root file system is now.
    pub rootfs_path: PathBuf,
    /// Extra kernel arguments.
    pub kernel_args: String,
    /// Its labels.
    pub labels: super::Labels,
}
