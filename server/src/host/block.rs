//! Block devices a VM's storage may use: loop devices and device-mapper snapshots. Both
//! outlive the VMM, so they are handles that reconcile tears down.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    time::Duration,
};

use super::{HostError, command};

/// What the host offers for block devices.
#[tonic::async_trait]
pub trait BlockDevices: Send + Sync + std::fmt::Debug {
    /// Attaches `file` to a free loop device (read-only when asked); returns the device.
    async fn attach_loop(&self, file: &Path, read_only: bool) -> Result<String, HostError>;

    /// Creates the device-mapper device `name`: a persistent `snapshot` of `base` (never
    /// written) keeping its exceptions on `cow`, `sectors` long. Returns its device node.
    async fn create_snapshot(&self, name: &str, base: &str, cow: &str, sectors: u64) -> Result<String, HostError>;

    /// Removes a device-mapper device, retrying while it is busy; one already gone is fine.
    async fn remove_dm(&self, name: &str) -> Result<(), HostError>;

    /// Detaches a loop device; one already detached is fine.
    async fn detach_loop(&self, device: &str) -> Result<(), HostError>;
}

/// True when this host's kernel offers device-mapper to the daemon.
pub fn device_mapper_works() -> bool {
    Path::new("/dev/mapper/control").exists()
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

/// How often, and how far apart, a device-mapper device that is still there after a
/// failed removal (busy: udev, a dying VMM) is retried.
const DM_BUSY_RETRIES: u32 = 20;
const DM_BUSY_PAUSE: Duration = Duration::from_millis(100);

/// True when the device-mapper device `name` exists (its node under `/dev/mapper`).
fn dm_exists(name: &str) -> bool {
    Path::new("/dev/mapper").join(name).exists()
}

/// True when the loop device `/dev/loopN` has a file attached (the kernel's own record).
fn loop_attached(device: &str) -> bool {
    let name = device.rsplit('/').next().unwrap_or(device);
    Path::new("/sys/block").join(name).join("loop/backing_file").exists()
}

#[tonic::async_trait]
impl BlockDevices for LinuxBlockDevices {
    async fn attach_loop(&self, file: &Path, read_only: bool) -> Result<String, HostError> {
        let mut args: Vec<OsString> = vec!["--find".into(), "--show".into()];
        if read_only {
            args.push("--read-only".into());
        }
        args.push(file.into());
        let out = command::run(&self.losetup, &args).await?;
        Ok(String::from_utf8_lossy(&out).trim().to_owned())
    }

    async fn create_snapshot(&self, name: &str, base: &str, cow: &str, sectors: u64) -> Result<String, HostError> {
        // Persistent exceptions in chunks of 8 sectors (4 KiB).
        let table = format!("0 {sectors} snapshot {base} {cow} P 8");
        let args: Vec<OsString> = vec!["create".into(), name.into(), "--table".into(), table.into()];
        command::run(&self.dmsetup, &args).await?;
        Ok(format!("/dev/mapper/{name}"))
    }

    async fn remove_dm(&self, name: &str) -> Result<(), HostError> {
        let args: Vec<OsString> = vec!["remove".into(), name.into()];
        let mut attempt = 0;
        loop {
            if !dm_exists(name) {
                return Ok(());
            }
            match command::run(&self.dmsetup, &args).await {
                Ok(_) => return Ok(()),
                Err(HostError::Command(_)) if !dm_exists(name) => return Ok(()),
                // Still there: a device still open (udev, a dying VMM) is busy for a moment.
                Err(HostError::Command(_)) if attempt < DM_BUSY_RETRIES => {
                    attempt += 1;
                    tokio::time::sleep(DM_BUSY_PAUSE).await;
                }
                Err(other) => return Err(other),
            }
        }
    }

    async fn detach_loop(&self, device: &str) -> Result<(), HostError> {
        let args: Vec<OsString> = vec!["-d".into(), device.into()];
        if !loop_attached(device) {
            return Ok(());
        }
        match command::run(&self.losetup, &args).await {
            Err(HostError::Command(_)) if !loop_attached(device) => Ok(()),
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
    async fn attaches_a_real_loop_device_read_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("disk.img");
        std::fs::write(&file, vec![0u8; 1 << 20]).expect("backing file");
        let block = LinuxBlockDevices::default();
        let device = TestLoop(block.attach_loop(&file, true).await.expect("attach"));
        assert!(attached(&device.0), "{} not attached", device.0);
        let name = device.0.trim_start_matches("/dev/");
        let ro = std::fs::read_to_string(format!("/sys/block/{name}/ro")).expect("ro flag");
        assert_eq!(ro.trim(), "1", "attached read-only");
        block.detach_loop(&device.0).await.expect("detach");
        assert!(!attached(&device.0));
    }

    #[tokio::test]
    async fn a_real_snapshot_keeps_writes_off_its_base_where_device_mapper_exists() {
        if !std::path::Path::new("/dev/mapper/control").exists() {
            banger_tests::skip("this host has no device-mapper (/dev/mapper/control is missing)");
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let (base_file, cow_file) = (dir.path().join("base.img"), dir.path().join("root.cow"));
        std::fs::write(&base_file, vec![7u8; 4 << 20]).expect("base");
        std::fs::File::create(&cow_file)
            .and_then(|f| f.set_len(super::super::storage::exception_store_bytes(4 << 20)))
            .expect("cow");
        let block = LinuxBlockDevices::default();
        let base = TestLoop(block.attach_loop(&base_file, true).await.expect("base loop"));
        let cow = TestLoop(block.attach_loop(&cow_file, false).await.expect("cow loop"));
        let name = format!("banger-test-{}", std::process::id());
        let device = block.create_snapshot(&name, &base.0, &cow.0, (4 << 20) / 512).await;
        let written = device.as_ref().map_err(|e| e.to_string()).and_then(|device| {
            std::fs::write(device, vec![9u8; 4096]).map_err(|e| e.to_string())?;
            let read = std::fs::read(device).map_err(|e| e.to_string())?;
            Ok(read[..4096] == [9u8; 4096] && read[4096..8192] == [7u8; 4096])
        });
        // Teardown in order (snapshot, then its loops) before asserting, so a failure leaks nothing.
        let removed = block.remove_dm(&name).await;
        for device in [&cow, &base] {
            block.detach_loop(&device.0).await.expect("detach");
        }
        removed.expect("remove the snapshot");
        assert_eq!(written, Ok(true), "the snapshot reads back its writes and the base elsewhere");
        assert_eq!(std::fs::read(&base_file).expect("base"), vec![7u8; 4 << 20], "the base is never written");
    }

    #[tokio::test]
    async fn removing_a_missing_dm_device_is_fine_where_device_mapper_exists() {
        if !std::path::Path::new("/dev/mapper/control").exists() {
            banger_tests::skip("this host has no device-mapper (/dev/mapper/control is missing)");
            return;
        }
        LinuxBlockDevices::default().remove_dm("banger-test-no-such-device").await.expect("missing is fine");
    }
}
