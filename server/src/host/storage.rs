//! Root disks: a per-VM copy-on-write disk over the image's read-only root file system, made
//! as a qcow2 overlay, a reflink clone or a sparse copy.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
};

use super::{HostError, command};
use crate::domain::RootDiskStrategy;

/// Copy-on-write root disks over an image's read-only root file system.
#[tonic::async_trait]
pub trait RootDisks: Send + Sync + std::fmt::Debug {
    /// Creates `disk` from the raw image `base` with `strategy`; `base` is never written.
    async fn create(&self, strategy: RootDiskStrategy, base: &Path, disk: &Path) -> Result<(), HostError>;
}

/// Makes root disks as files: `qemu-img` overlays, `cp --reflink=always` clones, or
/// `cp --sparse=always` copies.
#[derive(Debug, Clone)]
pub struct FileDisks {
    qemu_img: PathBuf,
}

impl FileDisks {
    /// Uses the given `qemu-img` binary for overlays.
    pub fn new(qemu_img: PathBuf) -> Self {
        Self { qemu_img }
    }
}

#[tonic::async_trait]
impl RootDisks for FileDisks {
    async fn create(&self, strategy: RootDiskStrategy, base: &Path, disk: &Path) -> Result<(), HostError> {
        let (program, args): (&Path, Vec<OsString>) = match strategy {
            RootDiskStrategy::Qcow2 => (
                &self.qemu_img,
                vec![
                    "create".into(),
                    "-q".into(),
                    "-f".into(),
                    "qcow2".into(),
                    "-b".into(),
                    base.into(),
                    "-F".into(),
                    "raw".into(),
                    disk.into(),
                ],
            ),
            RootDiskStrategy::Reflink => (Path::new("cp"), vec!["--reflink=always".into(), base.into(), disk.into()]),
            RootDiskStrategy::Copy => (Path::new("cp"), vec!["--sparse=always".into(), base.into(), disk.into()]),
        };
        let made = command::run(program, &args).await.map(drop);
        if made.is_err() {
            // A half-written copy is not a disk.
            let _ = std::fs::remove_file(disk);
        }
        made
    }
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
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
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
    async fn every_strategy_makes_a_disk_whose_writes_never_reach_the_base() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path().join("base.raw");
        std::fs::write(&base, vec![7u8; 1 << 20]).expect("base");
        let disks = FileDisks::new("qemu-img".into());
        let reflink = reflink_supported(dir.path()).await.expect("probe");
        for strategy in [RootDiskStrategy::Qcow2, RootDiskStrategy::Copy, RootDiskStrategy::Reflink] {
            let disk = dir.path().join(format!("{}-{}", strategy.as_str(), strategy.file_name()));
            let made = disks.create(strategy, &base, &disk).await;
            if strategy == RootDiskStrategy::Reflink && !reflink {
                assert!(made.is_err() && !disk.exists(), "reflink where unsupported must fail cleanly");
                continue;
            }
            made.expect("create");
            if strategy != RootDiskStrategy::Qcow2 {
                std::fs::write(&disk, b"written").expect("write the copy");
            }
        }
        assert_eq!(std::fs::read(&base).expect("base"), vec![7u8; 1 << 20], "the base is never written");
    }
}
