//! A hostile guest, end to end: real QEMU guests whose VMM and vsock backend run confined
//! as the VM's own uid; what a guest sends the host (console output, files copied out) is
//! bounded and masked; a stopped VMM never holds its VM; requests beyond the host's
//! capacity are refused before anything is made. Needs `make setup`.

use std::{
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use banger_tests::{Daemon, guest_slot, text};
use nix::{sys::signal::Signal, unistd::Pid};

fn show(daemon: &Daemon, vm: &str, name: &str) -> String {
    let out = daemon.banger(&["vm", "show", vm]);
    let prefix = format!("{name}:");
    text(&out.stdout)
        .lines()
        .find_map(|line| line.strip_prefix(&prefix).map(|v| v.trim().to_owned()))
        .unwrap_or_else(|| panic!("vm show {vm}: no {name}: {}\n{}", text(&out.stderr), daemon.log()))
}

/// The pids of a VM's VMM and vsock backend, from its scratch file.
fn runtime_pids(vm_dir: &Path) -> (u32, u32) {
    let handles: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(vm_dir.join("handles.json")).expect("handles.json"))
            .expect("json");
    let pid = |name: &str| handles[name]["pid"].as_u64().unwrap_or_else(|| panic!("no {name} in {handles}")) as u32;
    (pid("vmm"), pid("vsock_backend"))
}

/// The confinement lines of `/proc/<pid>/status`.
fn confinement(pid: u32) -> Vec<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let keys = ["Name:", "Uid:", "Gid:", "Groups:", "CapEff:", "NoNewPrivs:", "Seccomp:"];
    status.lines().filter(|line| keys.iter().any(|key| line.starts_with(key))).map(str::to_owned).collect()
}

fn field<'a>(lines: &'a [String], key: &str) -> Vec<&'a str> {
    lines.iter().find_map(|line| line.strip_prefix(key)).unwrap_or_default().split_whitespace().collect()
}

/// The images' group (`vm_uid_base`): every VM's QEMU has it, to read its image.
const IMAGE_GROUP: &str = "900000";

/// Checks that `pid` runs as its own uid with no privilege left and exactly `groups` as
/// supplementary groups, and returns that uid.
fn assert_confined(pid: u32, groups: &[&str]) -> u32 {
    let lines = confinement(pid);
    println!("/proc/{pid}/status:\n  {}", lines.join("\n  "));
    let uids = field(&lines, "Uid:");
    assert_eq!(uids.len(), 4, "{lines:?}");
    assert!(uids.iter().all(|uid| *uid == uids[0] && *uid != "0"), "every uid the VM's, none root: {lines:?}");
    assert!(field(&lines, "Gid:").iter().all(|gid| *gid == uids[0]), "{lines:?}");
    assert_eq!(field(&lines, "Groups:"), groups, "supplementary groups: {lines:?}");
    assert_eq!(field(&lines, "CapEff:"), ["0000000000000000"], "{lines:?}");
    assert_eq!(field(&lines, "NoNewPrivs:"), ["1"], "{lines:?}");
    assert_eq!(field(&lines, "Seccomp:"), ["2"], "{lines:?}");
    uids[0].parse().expect("uid")
}

#[test]
fn each_vms_vmm_and_vsock_backend_run_as_its_own_uid_confined_and_its_files_are_private() {
    let _slot = guest_slot();
    let daemon = Daemon::start(&[]);
    let mut uids = Vec::new();
    for vm in ["conf-a", "conf-b"] {
        let out = daemon.banger(&["vm", "create", "--name", vm]);
        assert!(out.status.success(), "{}\n{}", text(&out.stderr), daemon.log());
        let vm_dir = PathBuf::from(show(&daemon, vm, "vm dir"));
        let (vmm, backend) = runtime_pids(&vm_dir);
        let uid = assert_confined(vmm, &[IMAGE_GROUP]);
        assert_eq!(assert_confined(backend, &[]), uid, "the vsock backend runs as the VM's uid too");
        // Both in the VM's cgroup, which bounds its tasks.
        let id = vm_dir.file_name().expect("id").to_string_lossy().into_owned();
        for pid in [vmm, backend] {
            let groups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("cgroup");
            assert!(groups.contains(&format!("banger/{id}")), "{pid} is not in the VM's group: {groups}");
        }
        for pids_max in
            [format!("/sys/fs/cgroup/pids/banger/{id}/pids.max"), format!("/sys/fs/cgroup/banger/{id}/pids.max")]
        {
            if let Ok(max) = std::fs::read_to_string(&pids_max) {
                assert_eq!(max.trim(), "1024", "{pids_max}");
            }
        }
        // The VM's own files are its uid's; none is open to others.
        for own in ["root.qcow2", "console.log", "qmp.sock", "vsock.sock"] {
            let meta = std::fs::metadata(vm_dir.join(own)).expect(own);
            assert_eq!((meta.uid(), meta.gid()), (uid, uid), "{own}");
        }
        let dir = std::fs::metadata(&vm_dir).expect("vm dir");
        assert_eq!((dir.uid(), dir.gid(), dir.mode() & 0o7777), (0, uid, 0o1770), "the VM dir: root's, its group's");
        for entry in std::fs::read_dir(&vm_dir).expect("vm dir").flatten() {
            let meta = entry.metadata().expect("meta");
            assert_eq!(meta.mode() & 0o077, 0, "{} is open to others", entry.path().display());
        }
        // The guest still works: a command runs in it.
        let out = daemon.banger(&["vm", "exec", vm, "--", "echo", "alive"]);
        assert_eq!(text(&out.stdout), "alive\n", "{}", text(&out.stderr));
        uids.push(uid);
    }
    assert_ne!(uids[0], uids[1], "two VMs, two uids");
    for dir in [daemon.state_dir(), daemon.state_dir().join("vms")] {
        assert_eq!(std::fs::metadata(&dir).expect("dir").mode() & 0o7777, 0o711, "{}", dir.display());
    }
    assert_eq!(std::fs::metadata(daemon.state_dir().join("banger.db")).expect("db").mode() & 0o077, 0);
    // The image the VMs booted from: readable by the images' group (`vm_uid_base`, which
    // each VM's QEMU has besides its own), by no one else. Its id is on their command lines.
    let images = std::fs::read_dir(daemon.state_dir().join("images")).expect("images").flatten();
    let image_dir = images.map(|entry| entry.path()).find(|p| p.join("vmlinuz").exists()).expect("the default image");
    let image_group: u32 = IMAGE_GROUP.parse().expect("gid");
    let dir = std::fs::metadata(&image_dir).expect("image dir");
    assert_eq!((dir.uid(), dir.gid(), dir.mode() & 0o7777), (0, image_group, 0o710), "{}", image_dir.display());
    for file in ["vmlinuz", "initrd.img", "rootfs.ext4"] {
        let meta = std::fs::metadata(image_dir.join(file)).expect(file);
        assert_eq!((meta.uid(), meta.gid(), meta.mode() & 0o7777), (0, image_group, 0o640), "{file}");
    }
    for vm in ["conf-a", "conf-b"] {
        assert!(daemon.banger(&["vm", "delete", vm]).status.success());
    }
}

#[test]
fn what_a_guest_sends_the_host_is_bounded_and_a_stopped_vmm_never_holds_its_vm() {
    let _slot = guest_slot();
    let config = tempfile::tempdir().expect("config dir");
    let config_file = config.path().join("config.toml");
    std::fs::write(&config_file, "max_log_mib = 2\n").expect("config");
    let daemon = Daemon::start(&["--config", &config_file.display().to_string()]);
    let out = daemon.banger(&["vm", "create", "--name", "noisy"]);
    assert!(out.status.success(), "{}\n{}", text(&out.stderr), daemon.log());
    let vm_dir = PathBuf::from(show(&daemon, "noisy", "vm dir"));

    // 8 MiB on the serial console, four times the cap (the emulated UART carries about
    // 0.5 MB/s under TCG): the log stays under its cap, the daemon serves throughout.
    let mut writer =
        daemon.banger_follow(&["vm", "exec", "noisy", "--", "sh", "-c", "head -c 8388608 /dev/zero > /dev/ttyS0"]);
    let console = vm_dir.join("console.log");
    let mut largest = 0;
    let started = Instant::now();
    while !writer.finished() && started.elapsed() < Duration::from_secs(120) {
        largest = largest.max(std::fs::metadata(&console).map(|m| m.len()).unwrap_or(0));
        assert!(daemon.banger(&["vm", "list"]).status.success(), "the daemon serves while the guest writes");
        std::thread::sleep(Duration::from_millis(500));
    }
    let (status, _, stderr) = writer.finish();
    assert!(status.success(), "{stderr}");
    std::thread::sleep(Duration::from_millis(1500)); // one cap period
    let size = std::fs::metadata(&console).expect("console.log").len();
    println!("console.log: at most {largest} bytes seen while 8 MiB were written, {size} after");
    assert!(size <= 2 << 20, "the console log is {size} bytes, over its 2 MiB cap");
    // What is kept is the newest part, and the log is still read and followed.
    let out = daemon.banger(&["vm", "exec", "noisy", "--", "sh", "-c", "echo LAST-LINE > /dev/ttyS0"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    std::thread::sleep(Duration::from_millis(500));
    let tail = daemon.banger(&["vm", "logs", "noisy", "--tail", "4096"]);
    assert!(text(&tail.stdout).contains("LAST-LINE"), "{}", text(&tail.stderr));

    // A file the guest made setuid root comes out without its setuid bit...
    let out = daemon.banger(&[
        "vm",
        "exec",
        "noisy",
        "--",
        "sh",
        "-c",
        "cp /bin/busybox /root/suid && chmod 4755 /root/suid",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let work = tempfile::tempdir().expect("work");
    let copy = work.path().join("suid");
    let out = daemon.banger(&["vm", "cp", "noisy:/root/suid", &copy.display().to_string()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(std::fs::metadata(&copy).expect("copy").mode() & 0o7777, 0o755, "setuid dropped");
    // ... unless asked for.
    let kept = work.path().join("suid-kept");
    let out = daemon.banger(&["vm", "cp", "--preserve-special", "noisy:/root/suid", &kept.display().to_string()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(std::fs::metadata(&kept).expect("copy").mode() & 0o7777, 0o4755);
    // A file whose content is not its announced size (a /proc file says 0 bytes) leaves nothing.
    let mismatch = work.path().join("status");
    let out = daemon.banger(&["vm", "cp", "noisy:/proc/self/status", &mismatch.display().to_string()]);
    assert!(!out.status.success() && text(&out.stderr).contains("DATA_LOSS"), "{}", text(&out.stderr));
    let left: Vec<_> = std::fs::read_dir(work.path()).expect("work").flatten().map(|e| e.file_name()).collect();
    assert_eq!(left.len(), 2, "only the two copies, no partial file: {left:?}");

    // A VMM stopped with SIGSTOP answers nothing: stop still finishes, by SIGKILL.
    let (vmm, _) = runtime_pids(&vm_dir);
    nix::sys::signal::kill(Pid::from_raw(vmm as i32), Signal::SIGSTOP).expect("SIGSTOP");
    let started = Instant::now();
    let out = daemon.banger(&["vm", "stop", "noisy"]);
    println!("vm stop of a stopped VMM: {:?}", started.elapsed());
    assert!(out.status.success(), "{}\n{}", text(&out.stderr), daemon.log());
    assert!(started.elapsed() < Duration::from_secs(40), "stop took {:?}", started.elapsed());
    assert!(!Path::new(&format!("/proc/{vmm}")).exists(), "the stopped VMM was killed");
    // And one stopped under a running VM is deleted the same way.
    let out = daemon.banger(&["vm", "start", "noisy"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let (vmm, _) = runtime_pids(&vm_dir);
    nix::sys::signal::kill(Pid::from_raw(vmm as i32), Signal::SIGSTOP).expect("SIGSTOP");
    let started = Instant::now();
    let out = daemon.banger(&["vm", "delete", "noisy"]);
    assert!(out.status.success(), "{}\n{}", text(&out.stderr), daemon.log());
    assert!(started.elapsed() < Duration::from_secs(40), "delete took {:?}", started.elapsed());
    assert!(!Path::new(&format!("/proc/{vmm}")).exists(), "the stopped VMM was killed");
}

fn host_memory_mib() -> u64 {
    let info = std::fs::read_to_string("/proc/meminfo").expect("meminfo");
    let kib = info.lines().find_map(|l| l.strip_prefix("MemTotal:")).expect("MemTotal");
    kib.trim().trim_end_matches("kB").trim().parse::<u64>().expect("kB") / 1024
}

#[test]
fn a_request_beyond_the_hosts_capacity_is_refused_before_anything_is_made() {
    let config = tempfile::tempdir().expect("config dir");
    let config_file = config.path().join("config.toml");
    // 1% of the host's memory for guests, two VMs, four vCPUs.
    std::fs::write(&config_file, "max_memory_percent = 1\nmax_vms = 2\nmax_vcpus = 4\n").expect("config");
    let daemon = Daemon::start(&["--config", &config_file.display().to_string()]);
    let allowed = host_memory_mib() / 100;
    let memory = (allowed + 64).clamp(128, 65536).to_string();
    let out = daemon.banger(&["vm", "create", "--name", "big", "--memory", &memory]);
    let stderr = text(&out.stderr);
    assert!(!out.status.success() && stderr.contains("RESOURCE_EXHAUSTED"), "{stderr}");
    assert!(stderr.contains("memory_mib") && stderr.contains(&format!("of {allowed} in use")), "{stderr}");
    let out = daemon.banger(&["vm", "create", "--name", "wide", "--vcpus", "5", "--no-start"]);
    assert!(out.status.success(), "a VM that does not run takes no vCPUs: {}", text(&out.stderr));
    let out = daemon.banger(&["vm", "start", "wide"]);
    assert!(text(&out.stderr).contains("RESOURCE_EXHAUSTED"), "{}", text(&out.stderr));
    let out = daemon.banger(&["vm", "create", "--name", "second", "--no-start"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = daemon.banger(&["vm", "create", "--name", "third", "--no-start"]);
    assert!(
        text(&out.stderr).contains("RESOURCE_EXHAUSTED") && text(&out.stderr).contains("vms"),
        "{}",
        text(&out.stderr)
    );
    // Nothing was made for what was refused.
    let listed = text(&daemon.banger(&["vm", "list"]).stdout);
    assert!(!listed.contains("big") && !listed.contains("third"), "{listed}");
    let dirs = std::fs::read_dir(daemon.state_dir().join("vms")).expect("vms").count();
    assert_eq!(dirs, 2, "one directory per admitted VM");
    for vm in ["wide", "second"] {
        assert!(daemon.banger(&["vm", "delete", vm]).status.success());
    }
}
