//! `image.import` and the other image use cases, including importing the default image on
//! first use.

use std::path::{Path, PathBuf};

use super::{
    Error, FieldViolation, Ops,
    runner::{self, Operation, Subject},
};
use crate::{
    domain::{Image, ImageId, NewImage, OpId, Resource},
    host::{
        fs,
        import::{SourceFile, copy_source, open_source},
    },
};

/// File names of an image's artifacts, in the state dir and in an image directory.
pub const KERNEL_FILE: &str = "vmlinuz";
/// The initramfs file name.
pub const INITRD_FILE: &str = "initrd.img";
/// The root file system file name.
pub const ROOTFS_FILE: &str = "rootfs.ext4";

#[derive(Debug, Clone, Copy)]
enum Stage {
    CopyFiles,
    InsertRecord,
}

/// The opened source files of an import.
struct Sources {
    kernel: SourceFile,
    initrd: Option<SourceFile>,
    rootfs: SourceFile,
}

struct ImportImageOp<'a> {
    ops: &'a Ops,
    sources: Sources,
    image: Image,
}

#[tonic::async_trait]
impl Operation for ImportImageOp<'_> {
    type Stage = Stage;
    const NAME: &'static str = "image.import";

    fn stages(&self) -> Vec<Stage> {
        vec![Stage::CopyFiles, Stage::InsertRecord]
    }

    fn stage_name(stage: Stage) -> &'static str {
        match stage {
            Stage::CopyFiles => "copy_files",
            Stage::InsertRecord => "insert_record",
        }
    }

    async fn apply(&mut self, stage: Stage) -> Result<(), Error> {
        match stage {
            Stage::CopyFiles => {
                let dir = self.image.rootfs_path.parent().unwrap_or(Path::new("/")).to_owned();
                fs::create_dir(&dir, 0o711).await?;
                // From the descriptors opened and checked before: what was checked is copied.
                copy_source(&self.sources.kernel, &self.image.kernel_path).await?;
                if let (Some(from), Some(to)) = (&self.sources.initrd, &self.image.initrd_path) {
                    copy_source(from, to).await?;
                }
                copy_source(&self.sources.rootfs, &self.image.rootfs_path).await?;
            }
            Stage::InsertRecord if self.ops.store.image_get(&self.image.id.to_string()).await.is_ok() => {}
            Stage::InsertRecord => self.ops.store.image_insert(&self.image).await?,
        }
        Ok(())
    }

    async fn undo(&mut self, stage: Stage) -> Result<(), Error> {
        match (stage, self.image.rootfs_path.parent()) {
            // A directory left behind names no record: reconcile removes it as an orphan.
            (Stage::CopyFiles, Some(dir)) => Ok(fs::remove_dir(dir).await?),
            // The record is the last stage: nothing after it can fail.
            _ => Ok(()),
        }
    }

    fn subject(&self) -> Subject {
        Subject { image_id: Some(self.image.id.to_string()), ..Default::default() }
    }
}

/// True when the file starts like a kernel the VMM can boot: a bzImage (`HdrS` at 0x202) or an ELF.
fn looks_like_kernel(head: &[u8]) -> bool {
    head.starts_with(b"\x7fELF") || head.get(0x202..0x206) == Some(b"HdrS")
}

/// True when the file holds an ext2/3/4 superblock (magic 0xEF53 at byte 1080).
fn looks_like_ext4(head: &[u8]) -> bool {
    head.get(1080..1082) == Some(&[0x53, 0xEF])
}

/// How much of a source file its checks read.
const HEAD_BYTES: u64 = 2048;

/// What a source file's first bytes must look like.
#[derive(Debug, Clone, Copy)]
struct FileCheck {
    looks_right: fn(&[u8]) -> bool,
    what: &'static str,
}

const KERNEL_CHECK: FileCheck = FileCheck { looks_right: looks_like_kernel, what: "a bzImage or ELF kernel" };
const EXT4_CHECK: FileCheck = FileCheck { looks_right: looks_like_ext4, what: "an ext4 file system image" };

/// Opens and checks one source file of an import (see [`crate::host::import`]); a violation
/// when it is unusable. Every source is opened, checked or not: a file the daemon cannot
/// read is the caller's to fix, not an internal failure of the copy that would follow.
async fn open_checked(
    field: &str,
    path: &Path,
    roots: Option<&[PathBuf]>,
    check: Option<FileCheck>,
) -> Result<SourceFile, FieldViolation> {
    let source = open_source(path, roots, HEAD_BYTES).await.map_err(|why| FieldViolation::new(field, why))?;
    match check {
        Some(check) if !(check.looks_right)(&source.head) => {
            Err(FieldViolation::new(field, format!("{} is not {}", path.display(), check.what)))
        }
        _ => Ok(source),
    }
}

/// Checks that the VMM can boot the image's kernel: Firecracker loads only uncompressed ELF
/// kernels (a `vmlinux`), not bzImages.
pub async fn check_kernel_for(vmm: &'static str, image: &Image) -> Result<(), Error> {
    if vmm != "firecracker" {
        return Ok(());
    }
    match fs::inspect_source(&image.kernel_path, 4).await {
        Ok(fs::Source::File { head, .. }) if head.starts_with(b"\x7fELF") => Ok(()),
        _ => Err(Error::KernelNotBootable { image: image.name.clone(), vmm }),
    }
}

/// Checks that an image's files are still in place, before a VM boots from them.
pub async fn check_image_files(image: &Image) -> Result<(), Error> {
    let files = [Some(&image.kernel_path), image.initrd_path.as_ref(), Some(&image.rootfs_path)];
    for path in files.into_iter().flatten() {
        if !fs::is_file(path).await {
            return Err(Error::ImageBroken { image: image.name.clone(), missing: path.clone() });
        }
    }
    Ok(())
}

impl Ops {
    /// Imports an image from files on the host a caller names (beneath the configured import
    /// roots): validates the sources, copies them into the state dir, records it.
    pub async fn import_image(&self, new: NewImage) -> Result<(Image, OpId), Error> {
        let roots = self.config.import_roots.clone();
        self.import_image_from(new, roots.as_deref()).await
    }

    async fn import_image_from(&self, new: NewImage, roots: Option<&[PathBuf]>) -> Result<(Image, OpId), Error> {
        let kernel = open_checked("kernel_path", &new.kernel_path, roots, Some(KERNEL_CHECK)).await;
        let initrd = match new.initrd_path.as_deref() {
            Some(path) => Some(open_checked("initrd_path", path, roots, None).await),
            None => None,
        };
        let rootfs = open_checked("rootfs_path", &new.rootfs_path, roots, Some(EXT4_CHECK)).await;
        let mut violations: Vec<FieldViolation> =
            [kernel.as_ref().err(), initrd.as_ref().and_then(|i| i.as_ref().err()), rootfs.as_ref().err()]
                .into_iter()
                .flatten()
                .cloned()
                .collect();
        if let Err(e) = crate::domain::image_name_error(&new.name) {
            violations.insert(0, FieldViolation::new("name", e.to_string()));
        }
        if let Err(e) = crate::domain::labels_error(&new.labels) {
            violations.push(FieldViolation::new("labels", e.to_string()));
        }
        let (Ok(kernel), Ok(initrd), Ok(rootfs)) = (kernel, initrd.transpose(), rootfs) else {
            return Err(Error::InvalidArgument(violations));
        };
        if !violations.is_empty() {
            return Err(Error::InvalidArgument(violations));
        }
        if self.store.image_get(&new.name).await.is_ok() {
            return Err(Error::AlreadyExists { kind: Resource::Image, name: new.name });
        }
        let id = ImageId::generate();
        let dir = self.images_dir().join(id.to_string());
        let rootfs_size_bytes = rootfs.len;
        let image = Image {
            id,
            name: new.name.clone(),
            kernel_path: dir.join(KERNEL_FILE),
            initrd_path: new.initrd_path.as_ref().map(|_| dir.join(INITRD_FILE)),
            rootfs_path: dir.join(ROOTFS_FILE),
            kernel_args: new.kernel_args.clone(),
            rootfs_size_bytes,
            created_at_ms: self.clock().now_ms(),
            labels: new.labels.clone(),
            origin: None,
        };
        let op_id = OpId::generate();
        super::lock(&self.importing).insert(id);
        let mut op = ImportImageOp { ops: self, sources: Sources { kernel, initrd, rootfs }, image };
        let imported = runner::run_with(op_id, &mut op, &self.run_options()).await;
        super::lock(&self.importing).remove(&id);
        imported?;
        Ok((op.image, op_id))
    }

    /// The default image, imported from the default image directory on first use.
    pub(super) async fn ensure_default_image(&self) -> Result<Image, Error> {
        let (name, dir) = (&self.config.default_image, &self.config.default_image_dir);
        self.ensure_installed_image(name, dir)
            .await?
            .ok_or_else(|| Error::NoDefaultImage { name: name.clone(), dir: dir.clone() })
    }

    /// An image installed beside the default one (`make setup` puts `busybox` there), named
    /// by its directory: imported on first use. None when `name` is no such directory.
    pub(super) async fn installed_image(&self, name: &str) -> Result<Option<Image>, Error> {
        let Some(root) = self.config.default_image_dir.parent() else { return Ok(None) };
        if crate::domain::image_name_error(name).is_err() || name.starts_with('.') {
            return Ok(None);
        }
        let dir = match name == self.config.default_image {
            true => self.config.default_image_dir.clone(),
            false => root.join(name),
        };
        self.ensure_installed_image(name, &dir).await
    }

    /// The image `name`, imported from the kernel, initramfs and root file system in `dir`
    /// when there is no such image yet; None when `dir` holds no image.
    async fn ensure_installed_image(&self, name: &str, dir: &std::path::Path) -> Result<Option<Image>, Error> {
        let _guard = self.default_image_lock.lock().await;
        match self.store.image_get(name).await {
            Ok(image) => return Ok(Some(image)),
            Err(crate::store::StoreError::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        let file = |name: &str| -> PathBuf { dir.join(name) };
        if !fs::is_file(&file(KERNEL_FILE)).await || !fs::is_file(&file(ROOTFS_FILE)).await {
            return Ok(None);
        }
        let initrd = file(INITRD_FILE);
        let new = NewImage {
            name: name.to_owned(),
            kernel_path: file(KERNEL_FILE),
            initrd_path: fs::is_file(&initrd).await.then_some(initrd),
            rootfs_path: file(ROOTFS_FILE),
            kernel_args: String::new(),
            labels: Default::default(),
        };
        // The host's own installed image: not beneath the callers' import roots.
        let (image, _) = self.import_image_from(new, None).await?;
        Ok(Some(image))
    }

    /// Deletes an image no VM uses (named as GetImage names it: id, name or the reference it
    /// was pulled from), and its files.
    pub async fn delete_image(&self, key: &str) -> Result<ImageId, Error> {
        let image = self.find_image(key).await?;
        self.store.image_delete(image.id).await?;
        if let Some(dir) = image.rootfs_path.parent()
            && dir.starts_with(self.images_dir())
            && let Err(error) = fs::remove_dir(dir).await
        {
            // The record is gone: the directory is an orphan that reconcile removes.
            tracing::warn!(image_id = %image.id, error = %error, "cannot remove the image's files");
        }
        // Its layers, unless another image shares them. While a pull runs, the next
        // reconcile does it.
        if image.origin.is_some()
            && let Ok(_turn) = self.pull_lock.try_lock()
            && let Err(error) = self.collect_blobs(false).await
        {
            tracing::warn!(image_id = %image.id, error = %error, "cannot remove the image's blobs");
        }
        Ok(image.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_kernels_and_ext4() {
        let mut bz = vec![0u8; 0x210];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert!(looks_like_kernel(&bz));
        assert!(looks_like_kernel(b"\x7fELF\x02\x01"));
        assert!(!looks_like_kernel(b"#!/bin/sh"));
        let mut ext = vec![0u8; 2048];
        ext[1080] = 0x53;
        ext[1081] = 0xEF;
        assert!(looks_like_ext4(&ext));
        assert!(!looks_like_ext4(&[0u8; 2048]));
    }
}
