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
    /// Where a container image came from; `None` for an image of boot files.
    pub origin: Option<OciOrigin>,
}

impl Image {
    /// The image's runtime defaults (a container image's config), if it has any.
    pub fn config(&self) -> Option<&ImageConfig> {
        self.origin.as_ref().map(|origin| &origin.config)
    }
}

/// Where a container image came from and what it runs with.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct OciOrigin {
    /// The source as given: `oci:PATH[:TAG]`, `docker-archive:PATH`, a registry reference.
    pub source: String,
    /// The manifest's digest (for a docker archive, of the manifest banger wrote for it).
    pub manifest_digest: String,
    /// The config's digest.
    pub config_digest: String,
    /// `os/architecture`.
    pub platform: String,
    /// The layers, bottom first.
    pub layers: Vec<OciLayer>,
    /// What a VM of the image runs with.
    pub config: ImageConfig,
}

/// One layer of a container image.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct OciLayer {
    /// Its digest.
    pub digest: String,
    /// Its size in bytes (compressed, as stored).
    pub size_bytes: u64,
    /// Its media type.
    pub media_type: String,
}

/// The parts of a container image's config a VM runs with.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct ImageConfig {
    /// `NAME=value` defaults for every exec.
    pub env: Vec<String>,
    /// The default working directory.
    pub working_dir: String,
    /// The default user.
    pub user: String,
    /// The entrypoint.
    pub entrypoint: Vec<String>,
    /// The default command (the entrypoint's arguments).
    pub cmd: Vec<String>,
}

impl ImageConfig {
    /// `env` with the image's variables first, each overridden by a request's of the same
    /// name.
    pub fn merged_env(&self, request: &[String]) -> Vec<String> {
        let name = |entry: &String| entry.split_once('=').map(|(n, _)| n.to_owned()).unwrap_or_else(|| entry.clone());
        let overridden: std::collections::HashSet<String> = request.iter().map(name).collect();
        self.env.iter().filter(|entry| !overridden.contains(&name(entry))).chain(request).cloned().collect()
    }
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

/// Progress of a container image's import, as it streams to the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageProgress {
    /// A stage began (`fetch`, `flatten`, `build_rootfs`, `copy_kernel`, `insert_record`).
    Stage(&'static str),
    /// Bytes of a blob read so far; `digest` is empty while an archive member's is unknown.
    Blob {
        /// The blob, when known.
        digest: String,
        /// Bytes read.
        done: u64,
        /// Its size, when known.
        total: Option<u64>,
    },
}
