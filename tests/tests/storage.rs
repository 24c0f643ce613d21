//! Root disks end to end: for each strategy this host supports (qcow2 overlays, sparse
//! copies, reflink clones on an XFS file system the test makes, and device-mapper snapshots
//! where the kernel offers device-mapper), a write in one guest never shows in another guest
//! or in the base image. Needs `make setup`.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use banger_tests::{Daemon, bin_dir, guest_slot, sha256, skip, text};

/// An XFS file system on a loop device over a sparse file, mounted for one test and torn
/// down (unmounted, detached) when dropped.
struct XfsMount {
    mountpoint: tempfile::TempDir,
    device: String,
    _backing: tempfile::TempDir,
}

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(out.status.success(), "{program} {args:?}: {}", text(&out.stderr));
    text(&out.stdout)
}

impl XfsMount {
    fn new() -> Self {
        let backing = tempfile::tempdir().expect("tempdir");
        let file = backing.path().join("xfs.img");
        std::fs::File::create(&file).expect("file").set_len(2 << 30).expect("sparse 2 GiB");
        run("mkfs.xfs", &["-q", &file.display().to_string()]);
        let device = run("losetup", &["-f", "--show", &file.display().to_string()]).trim().to_owned();
        let mountpoint = tempfile::tempdir().expect("mountpoint");
        let mounted = Command::new("mount").arg(&device).arg(mountpoint.path()).status().expect("mount");
        if !mounted.success() {
            let _ = Command::new("losetup").args(["-d", &device]).status();
            panic!("mount {device}");
        }
        Self { mountpoint, device, _backing: backing }
    }
}

impl Drop for XfsMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.mountpoint.path()).status();
        let _ = Command::new("losetup").args(["-d", &self.device]).status();
    }
}

fn field(daemon: &Daemon, args: &[&str], name: &str) -> String {
    let out = daemon.banger(args);
    assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
    let prefix = format!("{name}:");
    text(&out.stdout)
        .lines()
        .find_map(|line| line.strip_prefix(&prefix).map(|v| v.trim().to_owned()))
        .unwrap_or_else(|| panic!("no {name} in {args:?}"))
}

/// Boots two guests from the default image with `strategy` and checks their isolation.
fn check_isolation(parent: Option<&Path>, strategy: &str) {
    let config_dir = tempfile::tempdir().expect("config dir");
    let config: PathBuf = config_dir.path().join("config.toml");
    std::fs::write(&config, format!("root_disk = \"{strategy}\"\n")).expect("config");
    let daemon = Daemon::start_in(parent, &["--config", &config.display().to_string()], &[]);
    for vm in ["iso-a", "iso-b"] {
        let out = daemon.banger(&["vm", "create", "--name", vm]);
        assert!(out.status.success(), "{strategy}: {}\n{}", text(&out.stderr), daemon.log());
    }
    let root_disk = field(&daemon, &["vm", "show", "iso-a"], "root disk");
    assert!(root_disk.ends_with(&format!("({strategy})")), "{strategy}: {root_disk}");
    let base = field(&daemon, &["image", "show", "default"], "rootfs");
    let base = base.split(" (").next().expect("path").to_owned();
    let before = sha256(Path::new(&base));

    let out = daemon.banger(&["vm", "exec", "iso-a", "--", "sh", "-c", "echo only-in-a > /marker && sync"]);
    assert!(out.status.success(), "{strategy}: {}", text(&out.stderr));
    let out = daemon.banger(&["vm", "exec", "iso-a", "--", "cat", "/marker"]);
    assert_eq!(text(&out.stdout), "only-in-a\n", "{strategy}");
    let out = daemon.banger(&["vm", "exec", "iso-b", "--", "cat", "/marker"]);
    assert_eq!(out.status.code(), Some(1), "{strategy}: the write showed in another guest: {}", text(&out.stdout));

    // Stopped and started again, a VM keeps its own writes.
    assert!(daemon.banger(&["vm", "stop", "iso-a"]).status.success());
    assert!(daemon.banger(&["vm", "start", "iso-a"]).status.success());
    let out = daemon.banger(&["vm", "exec", "iso-a", "--", "cat", "/marker"]);
    assert_eq!(text(&out.stdout), "only-in-a\n", "{strategy}: lost across stop/start");

    for vm in ["iso-a", "iso-b"] {
        assert!(daemon.banger(&["vm", "delete", vm]).status.success());
    }
    assert_eq!(sha256(Path::new(&base)), before, "{strategy}: the base image changed");
}

#[test]
fn writes_stay_in_their_guest_with_qcow2_overlays() {
    let _slot = guest_slot();
    check_isolation(None, "qcow2");
}

#[test]
fn writes_stay_in_their_guest_with_sparse_copies() {
    let _slot = guest_slot();
    check_isolation(None, "copy");
}

#[test]
fn writes_stay_in_their_guest_with_reflink_clones_on_xfs() {
    let _slot = guest_slot();
    let xfs = XfsMount::new();
    check_isolation(Some(xfs.mountpoint.path()), "reflink");
}

#[test]
fn writes_stay_in_their_guest_with_dm_snapshots_where_device_mapper_exists() {
    if !Path::new("/dev/mapper/control").exists() {
        skip(
            "this host has no device-mapper (/dev/mapper/control is missing); \
             checking that a daemon configured for dm-snapshot refuses to start instead",
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("config.toml");
        std::fs::write(&config, "root_disk = \"dm-snapshot\"\n").expect("config");
        let out = Command::new(bin_dir().join("bangerd"))
            .arg("--config")
            .arg(&config)
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .arg("--socket")
            .arg(dir.path().join("bangerd.sock"))
            .output()
            .expect("bangerd");
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "bangerd started without device-mapper: {stderr}");
        assert!(stderr.contains("needs device-mapper") && stderr.contains("/dev/mapper/control"), "{stderr}");
        return;
    }
    let _slot = guest_slot();
    check_isolation(None, "dm-snapshot");
    let out = Command::new("dmsetup").args(["ls"]).output().expect("dmsetup");
    assert!(!text(&out.stdout).contains("banger-"), "snapshots left: {}", text(&out.stdout));
}
