//! Block devices a VM's storage may use: loop devices and device-mapper snapshots. Both
//! outlive the VMM, so they are handles that reconcile tears down.

use std::{ffi::OsString, path::PathBuf, time::Duration};

use super::{HostError, command};

/// What the host offers for block devices.
#[tonic::async_trait]
pub trait BlockDevices: Send + Sync + std::fmt::Debug {
    /// Removes a device-mapper device, retrying while it is busy; one already gone is fine.
    async fn remove_dm(&self, name: &str) -> Result<(), HostError>;

    /// Detaches a loop device; one already detached is fine.
    async fn detach_loop(&self, device: &str) -> Result<(), HostError>;
}

/// Linux block devices through `dmsetup` and `losetup`.
#[derive(Debug, Clone)]
pub struct LinuxBlockDevices {
    dmsetup: PathBuf,
    losetup: PathBuf,
}

impl Default for LinuxBlockDevices {
    fn default() -> Self {
        Self { dmsetup: "dmsetup".into(), losetup: "losetup".into() }
    }
}

/// How often, and how far apart, a busy device-mapper device is retried.
const DM_BUSY_RETRIES: u32 = 20;
const DM_BUSY_PAUSE: Duration = Duration::from_millis(100);

fn gone(stderr: &str) -> bool {
    ["No such device", "not found", "does not exist", "No such file or directory"]
        .iter()
        .any(|needle| stderr.contains(needle))
}

#[tonic::async_trait]
impl BlockDevices for LinuxBlockDevices {
    async fn remove_dm(&self, name: &str) -> Result<(), HostError> {
        let args: Vec<OsString> = vec!["remove".into(), name.into()];
        let mut attempt = 0;
        loop {
            match command::run(&self.dmsetup, &args).await {
                Ok(_) => return Ok(()),
                Err(HostError::Command(failed)) if gone(&failed.stderr) => return Ok(()),
                // A device still open (udev, a dying VMM) is busy for a moment: retry.
                Err(HostError::Command(failed)) if failed.stderr.contains("busy") && attempt < DM_BUSY_RETRIES => {
                    attempt += 1;
                    tokio::time::sleep(DM_BUSY_PAUSE).await;
                }
                Err(other) => return Err(other),
            }
        }
    }

    async fn detach_loop(&self, device: &str) -> Result<(), HostError> {
        let args: Vec<OsString> = vec!["-d".into(), device.into()];
        match command::run(&self.losetup, &args).await {
            Err(HostError::Command(failed)) if gone(&failed.stderr) => Ok(()),
            other => other.map(drop),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A loop device over a small file, detached when dropped if the test did not.
    struct TestLoop(String);

    impl Drop for TestLoop {
        fn drop(&mut self) {
            let _ = std::process::Command::new("losetup").args(["-d", &self.0]).status();
        }
    }

    fn attached(device: &str) -> bool {
        let out = std::process::Command::new("losetup").arg("-a").output().expect("losetup -a");
        String::from_utf8_lossy(&out.stdout).lines().any(|l| l.starts_with(&format!("{device}:")))
    }

    #[tokio::test]
    async fn detaches_a_real_loop_device_and_tolerates_a_detached_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("disk.img");
        std::fs::write(&file, vec![0u8; 1 << 20]).expect("backing file");
        let out = std::process::Command::new("losetup").args(["-f", "--show"]).arg(&file).output().expect("losetup");
        assert!(out.status.success(), "losetup: {}", String::from_utf8_lossy(&out.stderr));
        let device = TestLoop(String::from_utf8_lossy(&out.stdout).trim().to_owned());
        assert!(attached(&device.0));
        let block = LinuxBlockDevices::default();
        block.detach_loop(&device.0).await.expect("detach");
        assert!(!attached(&device.0));
        block.detach_loop(&device.0).await.expect("detaching twice is fine");
    }

    #[tokio::test]
    async fn removing_a_missing_dm_device_is_fine_where_device_mapper_exists() {
        if !std::path::Path::new("/dev/mapper/control").exists() {
            eprintln!("SKIPPED: this host has no device-mapper (/dev/mapper/control is missing)");
            return;
        }
        LinuxBlockDevices::default().remove_dm("banger-test-no-such-device").await.expect("missing is fine");
    }
}
