//! Root disks: a per-VM copy-on-write disk over the image's read-only root file system, made
//! as a qcow2 overlay, a reflink clone or a sparse copy; or, for a device-mapper snapshot,
//! the sparse file that holds the snapshot's exceptions (the devices over it are made at
//! boot, see `block.rs`).

use std::{ffi::OsString, path::Path};

use super::{HostError, command, file_error, qcow2};
use crate::domain::RootDiskStrategy;

/// Copy-on-write root disks over an image's read-only root file system.
#[tonic::async_trait]
pub trait RootDisks: Send + Sync + std::fmt::Debug {
    /// Creates `disk` from the raw image `base` with `strategy`; `base` is never written. With
    /// `size` above the base's, the disk is that big (the rest reads as zeros and takes no
    /// room until written).
    async fn create(&self, strategy: RootDiskStrategy, base: &Path, disk: &Path, size: u64) -> Result<(), HostError>;
}

/// Makes root disks as files: qcow2 overlays (written directly, see `qcow2.rs`),
/// `cp --reflink=always` clones, or `cp --sparse=always` copies.
#[derive(Debug, Clone, Default)]
pub struct FileDisks;

#[tonic::async_trait]
impl RootDisks for FileDisks {
    async fn create(&self, strategy: RootDiskStrategy, base: &Path, disk: &Path, size: u64) -> Result<(), HostError> {
        let (program, args): (&Path, Vec<OsString>) = match strategy {
            RootDiskStrategy::DmSnapshot => return create_exception_store(base, disk),
            RootDiskStrategy::Qcow2 => {
                return qcow2::create_overlay(base, disk, size).map_err(file_error("create the qcow2 overlay", disk));
            }
            RootDiskStrategy::Reflink => (Path::new("cp"), vec!["--reflink=always".into(), base.into(), disk.into()]),
            RootDiskStrategy::Copy => (Path::new("cp"), vec!["--sparse=always".into(), base.into(), disk.into()]),
        };
        let mut made = command::run(program, &args).await.map(drop);
        if made.is_ok() && size > 0 {
            made = grow(disk, size).await;
        }
        if made.is_err() {
            // A half-written copy is not a disk.
            let _ = std::fs::remove_file(disk);
        }
        made
    }
}

/// Extends a raw disk to `size` bytes (a hole: no room taken), never shrinks it.
async fn grow(disk: &Path, size: u64) -> Result<(), HostError> {
    let file = tokio::fs::OpenOptions::new().write(true).open(disk).await.map_err(file_error("open", disk))?;
    let len = file.metadata().await.map_err(file_error("stat", disk))?.len();
    if size > len {
        file.set_len(size).await.map_err(file_error("extend", disk))?;
    }
    Ok(())
}

/// The size of a snapshot's exception store over a base of `base_bytes`: every chunk of the
/// base written once, plus the store's metadata (one 16-byte entry per 4 KiB chunk), so it
/// never fills and invalidates the snapshot. Sparse: only written chunks take space.
pub fn exception_store_bytes(base_bytes: u64) -> u64 {
    let bytes = base_bytes + base_bytes / 64 + (8 << 20);
    bytes.div_ceil(4096) * 4096
}

fn create_exception_store(base: &Path, disk: &Path) -> Result<(), HostError> {
    let base_bytes = std::fs::metadata(base).map_err(file_error("stat", base))?.len();
    let file = std::fs::File::create_new(disk).map_err(file_error("create", disk))?;
    file.set_len(exception_store_bytes(base_bytes)).map_err(|e| {
        let _ = std::fs::remove_file(disk);
        file_error("size", disk)(e)
    })
}

/// Copies a file, sharing extents where the file system can (reflink) and keeping holes
/// (sparse): an image's mostly empty root file system stays mostly unallocated.
pub async fn copy_file(from: &Path, to: &Path) -> Result<(), HostError> {
    let args: Vec<OsString> = vec!["--reflink=auto".into(), "--sparse=always".into(), from.into(), to.into()];
    command::run(Path::new("cp"), &args).await.map(drop)
}

/// Makes `to` the same file as `from` (a hard link: images are never written, so two images
/// of one manifest share their root file system), or a copy where a link cannot be made.
/// Replaces what is at `to`.
pub async fn share_file(from: &Path, to: &Path) -> Result<(), HostError> {
    let _ = tokio::fs::remove_file(to).await;
    if tokio::fs::hard_link(from, to).await.is_ok() {
        return Ok(());
    }
    copy_file(from, to).await
}

/// The strategy for new VMs: reflink clones where the state dir's file system makes them
/// (instant, raw), else qcow2 overlays.
pub async fn choose_strategy(state_dir: &Path) -> RootDiskStrategy {
    if reflink_supported(state_dir).await.unwrap_or(false) {
        RootDiskStrategy::Reflink
    } else {
        RootDiskStrategy::Qcow2
    }
}

/// True when `dir`'s file system makes reflink copies.
pub async fn reflink_supported(dir: &Path) -> Result<bool, String> {
    if std::fs::symlink_metadata(dir).is_err() {
        super::fs::make_dir(dir, 0o711).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let probe = tempfile::Builder::new().prefix(".reflink-probe").tempdir_in(dir).map_err(|e| e.to_string())?;
    let (from, to) = (probe.path().join("a"), probe.path().join("b"));
    std::fs::write(&from, b"banger").map_err(|e| e.to_string())?;
    let args: Vec<OsString> = vec!["--reflink=always".into(), from.into(), to.into()];
    Ok(command::run(Path::new("cp"), &args).await.is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn copies_keep_a_sparse_file_sparse() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let (from, to) = (dir.path().join("sparse.img"), dir.path().join("copy.img"));
        let file = std::fs::File::create(&from).expect("file");
        file.set_len(64 << 20).expect("64 MiB hole");
        std::os::unix::fs::FileExt::write_at(&file, b"data in the middle", 32 << 20).expect("write");
        copy_file(&from, &to).await.expect("copy");
        assert_eq!(std::fs::read(&to).expect("copy"), std::fs::read(&from).expect("original"));
        let allocated = std::fs::metadata(&to).expect("meta").blocks() * 512;
        assert!(allocated < 1 << 20, "the copy allocated {allocated} bytes for 18 bytes of data");
    }

    #[tokio::test]
    async fn every_strategy_makes_a_disk_whose_writes_never_reach_the_base() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path().join("base.raw");
        std::fs::write(&base, vec![7u8; 1 << 20]).expect("base");
        let disks = FileDisks;
        let reflink = reflink_supported(dir.path()).await.expect("probe");
        for strategy in [RootDiskStrategy::Qcow2, RootDiskStrategy::Copy, RootDiskStrategy::Reflink] {
            let disk = dir.path().join(format!("{}-{}", strategy.as_str(), strategy.file_name()));
            let made = disks.create(strategy, &base, &disk, 4 << 20).await;
            if strategy == RootDiskStrategy::Reflink && !reflink {
                assert!(made.is_err() && !disk.exists(), "reflink where unsupported must fail cleanly");
                continue;
            }
            made.expect("create");
            if strategy != RootDiskStrategy::Qcow2 {
                let len = std::fs::metadata(&disk).expect("disk").len();
                assert_eq!(len, 4 << 20, "{strategy:?}: the disk has the size asked for");
                std::fs::write(&disk, b"written").expect("write the copy");
            }
        }
        assert_eq!(std::fs::read(&base).expect("base"), vec![7u8; 1 << 20], "the base is never written");
    }
}
