//! Root disks: a per-VM qcow2 overlay over the image's read-only rootfs (copy-on-write).

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
};

use super::{HostError, command};

/// Copy-on-write root disks over an image's read-only root file system.
#[tonic::async_trait]
pub trait RootDisks: Send + Sync + std::fmt::Debug {
    /// Creates `disk` as a copy-on-write view of the raw image `base`; `base` is never written.
    async fn create_overlay(&self, base: &Path, disk: &Path) -> Result<(), HostError>;
}

/// Creates copy-on-write root disks with `qemu-img`.
#[derive(Debug, Clone)]
pub struct Qcow2Overlays {
    qemu_img: PathBuf,
}

impl Qcow2Overlays {
    /// Uses the given `qemu-img` binary.
    pub fn new(qemu_img: PathBuf) -> Self {
        Self { qemu_img }
    }
}

#[tonic::async_trait]
impl RootDisks for Qcow2Overlays {
    async fn create_overlay(&self, base: &Path, disk: &Path) -> Result<(), HostError> {
        let args: Vec<OsString> = vec![
            "create".into(),
            "-q".into(),
            "-f".into(),
            "qcow2".into(),
            "-b".into(),
            base.into(),
            "-F".into(),
            "raw".into(),
            disk.into(),
        ];
        command::run(&self.qemu_img, &args).await.map(drop)
    }
}
