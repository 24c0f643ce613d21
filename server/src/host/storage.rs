//! Root disks: a per-VM qcow2 overlay over the image's read-only rootfs (copy-on-write).

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
};

use super::{HostError, command};

/// Creates and removes copy-on-write root disks with `qemu-img`.
#[derive(Debug, Clone)]
pub struct Qcow2Overlays {
    qemu_img: PathBuf,
}

impl Qcow2Overlays {
    /// Uses the given `qemu-img` binary.
    pub fn new(qemu_img: PathBuf) -> Self {
        Self { qemu_img }
    }

    /// Creates `disk` as an overlay of the raw image `base`. The base is never written.
    pub async fn create(&self, base: &Path, disk: &Path) -> Result<(), HostError> {
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
