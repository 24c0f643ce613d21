//! The Firecracker driver end to end with the real binary (v1.12.1, installed by `make setup`)
//! and tiny guest kernels these tests assemble: they print a marker on the serial console and
//! reset the machine (or halt). Stock kernels cannot boot under this host's KVM, so the guests
//! carry no agent: VMs are created without waiting for one. Run plain and under the jailer.

use std::{path::Path, process::Command, time::Duration};

use banger_tests::{
    Daemon, TestNetns, default_image_dir, guest_slot, skip, text,
    toy::{MARKER, Then, toy_kernel},
};
use nix::sys::signal::Signal;

fn has_kvm() -> bool {
    if Path::new("/dev/kvm").exists() {
        return true;
    }
    skip("Firecracker needs /dev/kvm, which this host does not have");
    false
}

fn show(daemon: &Daemon, vm: &str, field: &str) -> Option<String> {
    let out = daemon.banger(&["vm", "show", vm]);
    let prefix = format!("{field}:");
    text(&out.stdout).lines().find_map(|line| line.strip_prefix(&prefix).map(|v| v.trim().to_owned()))
}

fn wait_until(what: &str, done: impl FnMut() -> bool) {
    banger_tests::wait_until(what, Duration::from_secs(20), done);
}

#[test]
fn firecracker_boots_a_guest_whose_console_output_and_exit_are_seen_and_delete_leaves_nothing() {
    if !has_kvm() {
        return;
    }
    let _slot = guest_slot();
    let work = tempfile::tempdir().expect("tempdir");
    let kernel = toy_kernel(work.path(), Then::Reset);
    let config = work.path().join("config.toml");
    // Unjailed, asked for: the jailer is on by default under Firecracker.
    std::fs::write(&config, "vmm = \"firecracker\"\njailer = false\n").expect("config");
    let daemon = Daemon::start(&["--config", &config.display().to_string()]);

    let rootfs = default_image_dir().join("rootfs.ext4");
    daemon.import_image("toy", &kernel, &rootfs, None);
    // A bzImage cannot boot under Firecracker: refused before anything is made.
    daemon.import_image("bz", &default_image_dir().join("vmlinuz"), &rootfs, None);
    let out = daemon.banger(&["vm", "create", "--name", "bz", "--image", "bz", "--no-wait"]);
    let stderr = text(&out.stderr);
    assert!(stderr.contains("FAILED_PRECONDITION") && stderr.contains("reason: KERNEL_NOT_BOOTABLE"), "{stderr}");
    assert!(daemon.banger(&["image", "delete", "bz"]).status.success());

    let out = daemon.banger(&["vm", "create", "--name", "fc", "--image", "toy", "--no-wait"]);
    assert!(out.status.success(), "{}\n{}", text(&out.stderr), daemon.log());
    assert_eq!(show(&daemon, "fc", "vmm").as_deref(), Some("firecracker"));
    let root_disk = show(&daemon, "fc", "root disk").expect("root disk");
    assert!(root_disk.ends_with("(copy)") || root_disk.ends_with("(reflink)"), "raw disks only: {root_disk}");

    let console = show(&daemon, "fc", "console log").expect("console log");
    wait_until("the guest's console output", || std::fs::read_to_string(&console).is_ok_and(|c| c.contains(MARKER)));
    assert_logs_apart(&daemon, "fc");
    // The guest reset itself: Firecracker exited, and the daemon records it.
    wait_until("the exit to be recorded", || show(&daemon, "fc", "state").as_deref() == Some("stopped"));
    assert_eq!(show(&daemon, "fc", "error reason").as_deref(), Some("vmm_exited"));

    // Started again (without waiting for an agent it does not have), it boots and exits again.
    std::fs::write(&console, "").expect("truncate console");
    let out = daemon.banger(&["vm", "start", "fc", "--no-wait"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    wait_until("the second boot's console output", || {
        std::fs::read_to_string(&console).is_ok_and(|c| c.contains(MARKER))
    });
    wait_until("the second exit to be recorded", || show(&daemon, "fc", "state").as_deref() == Some("stopped"));

    let vm_dir = show(&daemon, "fc", "vm dir").expect("vm dir");
    let out = daemon.banger(&["vm", "delete", "fc"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(!Path::new(&vm_dir).exists(), "vm dir left");
    assert!(daemon.guest_processes().is_empty(), "{:?}", daemon.guest_processes());
    let id = Path::new(&vm_dir).file_name().expect("id").to_string_lossy().into_owned();
    assert!(!Path::new(&format!("/sys/fs/cgroup/memory/banger/{id}")).exists(), "cgroup left");
}

fn console_bytes(path: &str) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

#[test]
fn a_paused_firecracker_guest_stands_still_and_resumes() {
    if !has_kvm() {
        return;
    }
    let _slot = guest_slot();
    let work = tempfile::tempdir().expect("tempdir");
    let kernel = toy_kernel(work.path(), Then::Count);
    let config = work.path().join("config.toml");
    std::fs::write(&config, "vmm = \"firecracker\"\njailer = false\n").expect("config");
    let daemon = Daemon::start(&["--config", &config.display().to_string()]);
    daemon.import_image("counter", &kernel, &default_image_dir().join("rootfs.ext4"), None);
    let out = daemon.banger(&["vm", "create", "--name", "tick", "--image", "counter", "--no-wait"]);
    assert!(out.status.success(), "{}\n{}", text(&out.stderr), daemon.log());
    let console = show(&daemon, "tick", "console log").expect("console log");
    wait_until("the guest to count", || console_bytes(&console) > MARKER.len() as u64 + 10);

    let out = daemon.banger(&["vm", "pause", "tick"]);
    assert!(out.status.success() && text(&out.stdout).contains("paused"), "{}", text(&out.stderr));
    assert_eq!(show(&daemon, "tick", "state").as_deref(), Some("paused"));
    let frozen = console_bytes(&console);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(console_bytes(&console), frozen, "a paused guest printed");

    let out = daemon.banger(&["vm", "resume", "tick"]);
    assert!(out.status.success() && text(&out.stdout).contains("running"), "{}", text(&out.stderr));
    wait_until("the guest to count again", || console_bytes(&console) > frozen + 5);
    // Unjailed, a VMM cannot be snapshotted: clones could not have their own disk.
    let out = daemon.banger(&["vm", "snapshot", "tick", "never", "--without-agent"]);
    let stderr = text(&out.stderr);
    assert!(!out.status.success() && stderr.contains("SNAPSHOT_UNSUPPORTED") && stderr.contains("jailer"), "{stderr}");
    let vm_dir = show(&daemon, "tick", "vm dir").expect("vm dir");
    assert!(daemon.banger(&["vm", "delete", "tick"]).status.success());
    assert!(!Path::new(&vm_dir).exists(), "vm dir left");
    assert!(daemon.guest_processes().is_empty(), "{:?}", daemon.guest_processes());
}

/// The four ids of a `/proc/<pid>/status` line (`Uid:` or `Gid:`): real, effective,
/// saved and file-system.
fn ids(pid: &str, key: &str) -> Vec<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let line = status.lines().find(|l| l.starts_with(key)).expect("ids line");
    line.split_whitespace().skip(1).map(|u| u.parse().expect("id")).collect()
}

/// A VM's vsock context id, from `vm show`.
fn cid(daemon: &Daemon, vm: &str) -> u32 {
    show(daemon, vm, "vsock")
        .and_then(|v| v.rsplit_once("(cid ").map(|(_, c)| c.trim_end_matches(')').parse().expect("cid")))
        .expect("cid")
}

/// The guest's console holds the guest's output only; Firecracker's own log is in vmm.log.
fn assert_logs_apart(daemon: &Daemon, vm: &str) {
    let read = |field: &str| std::fs::read_to_string(show(daemon, vm, field).expect(field)).unwrap_or_default();
    let (console, vmm_log) = (read("console log"), read("vmm log"));
    assert!(console.contains(MARKER) && !console.contains("Firecracker"), "console log: {console}");
    assert!(vmm_log.contains("Running Firecracker v1."), "vmm log: {vmm_log}");
}

fn cgroup_dirs(id: &str) -> [String; 2] {
    [format!("/sys/fs/cgroup/cpu/banger/{id}"), format!("/sys/fs/cgroup/memory/banger/{id}")]
}

#[test]
fn jailed_firecracker_runs_chrooted_as_its_own_uid_in_its_cgroup_and_leaves_no_jail_or_cgroup() {
    if !has_kvm() {
        return;
    }
    let _slot = guest_slot();
    // A bridge, so the jailed VMM must open a tap as its own uid.
    let netns = TestNetns::new();
    let work = tempfile::tempdir().expect("tempdir");
    let (halting, resetting) = (toy_kernel(work.path(), Then::Halt), toy_kernel(work.path(), Then::Reset));
    let config = work.path().join("config.toml");
    std::fs::write(
        &config,
        "vmm = \"firecracker\"\njailer = true\njailer_uid_base = 910000\n\
         bridge = \"bgfc0\"\nbridge_cidr = \"172.31.98.0/24\"\n",
    )
    .expect("config");
    let mut daemon = Daemon::start_in_netns(&netns.0, &["--config", &config.display().to_string()]);
    let rootfs = default_image_dir().join("rootfs.ext4");
    daemon.import_image("halt", &halting, &rootfs, None);
    daemon.import_image("reset", &resetting, &rootfs, None);

    // A guest that keeps running: its VMM is inspected while it runs.
    let out = daemon.banger(&["vm", "create", "--name", "jailed", "--image", "halt", "--memory", "128", "--no-wait"]);
    assert!(out.status.success(), "{}\n{}", text(&out.stderr), daemon.log());
    let console = show(&daemon, "jailed", "console log").expect("console log");
    wait_until("the jailed guest's console output", || {
        std::fs::read_to_string(&console).is_ok_and(|c| c.contains(MARKER))
    });
    assert_logs_apart(&daemon, "jailed");
    let vm_dir = show(&daemon, "jailed", "vm dir").expect("vm dir");
    let id = show(&daemon, "jailed", "id").expect("id");
    let pid = show(&daemon, "jailed", "vmm pid").expect("vmm pid");
    let cid = cid(&daemon, "jailed");
    let tap = show(&daemon, "jailed", "tap").expect("tap");
    assert_eq!(show(&daemon, "jailed", "state").as_deref(), Some("running"));

    // Its own unprivileged identity, the same one that owns its tap.
    let uid = 910_000 + cid;
    assert_eq!(ids(&pid, "Uid:"), [uid; 4], "the VMM runs as uid_base + cid");
    let link = Command::new("ip").args(["-n", &netns.0, "-d", "link", "show", "dev", &tap]).output().expect("ip");
    let link = text(&link.stdout);
    assert!(link.contains(&format!("user {uid}")), "tap not owned by the jailed uid: {link}");
    // Chrooted: its root holds the jail (the binary, its VM dir mirrored), not the host's files.
    let root = format!("/proc/{pid}/root");
    assert!(Path::new(&root).join("firecracker").is_file(), "no firecracker at the root of the jail");
    assert!(Path::new(&root).join("banger/rootfs").exists(), "root disk not in the jail");
    assert!(!Path::new(&root).join("usr/bin").exists(), "the host's /usr is visible: not chrooted");
    assert!(Path::new(&vm_dir).join("jail/firecracker").join(&id).join("root").is_dir());
    // In the VM's cgroup, with its limits, from the jailer.
    let membership = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("cgroup");
    let group = format!("/banger/{id}");
    assert!(membership.lines().any(|l| l.contains(":memory:") && l.ends_with(&group)), "{membership}");
    assert!(membership.lines().any(|l| l.contains(":cpu:") && l.ends_with(&group)), "{membership}");
    let [cpu, memory] = cgroup_dirs(&id);
    let read =
        |path: String| std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}")).trim().to_owned();
    assert_eq!(read(format!("{memory}/memory.limit_in_bytes")), ((128 + 512) * 1024 * 1024u64).to_string());
    assert_eq!(read(format!("{cpu}/cpu.cfs_quota_us")), "200000");
    // No privilege left: the jailer's uid switch, Firecracker's own seccomp filters.
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let lines: Vec<&str> = status
        .lines()
        .filter(|l| ["Uid:", "CapEff:", "NoNewPrivs:", "Seccomp:"].iter().any(|k| l.starts_with(k)))
        .collect();
    println!("/proc/{pid}/status (jailed firecracker):\n  {}", lines.join("\n  "));
    let value = |key: &str| lines.iter().find_map(|l| l.strip_prefix(key)).map(str::trim).unwrap_or_default();
    assert_eq!(value("CapEff:"), "0000000000000000", "{lines:?}");
    assert_eq!(value("NoNewPrivs:"), "1", "{lines:?}");
    assert_eq!(value("Seccomp:"), "2", "{lines:?}");

    // A daemon killed and restarted finds the jailed VMM through /proc, as an unjailed one.
    daemon.signal(Signal::SIGKILL);
    daemon.restart();
    assert_eq!(show(&daemon, "jailed", "state").as_deref(), Some("running"), "{}", daemon.log());
    assert_eq!(show(&daemon, "jailed", "vmm pid").as_deref(), Some(pid.as_str()));

    let out = daemon.banger(&["vm", "delete", "jailed"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(!Path::new(&vm_dir).exists(), "vm dir (and its jail) left");
    assert!(cgroup_dirs(&id).iter().all(|d| !Path::new(d).exists()), "cgroup left");
    assert!(!netns.has_link(&tap), "tap left");
    assert!(daemon.guest_processes().is_empty(), "{:?}", daemon.guest_processes());

    // A guest that exits: once its VMM is gone, so are its jail and cgroup; a start rebuilds them.
    let out = daemon.banger(&["vm", "create", "--name", "exits", "--image", "reset", "--no-wait"]);
    assert!(out.status.success(), "{}\n{}", text(&out.stderr), daemon.log());
    let (vm_dir, id) = (show(&daemon, "exits", "vm dir").expect("vm dir"), show(&daemon, "exits", "id").expect("id"));
    let console = show(&daemon, "exits", "console log").expect("console log");
    for boot in ["first", "second"] {
        wait_until(&format!("the {boot} boot's console output"), || {
            std::fs::read_to_string(&console).is_ok_and(|c| c.contains(MARKER))
        });
        wait_until("the exit to be recorded", || show(&daemon, "exits", "state").as_deref() == Some("stopped"));
        assert!(!Path::new(&vm_dir).join("jail").exists(), "the jail outlived its VMM ({boot} boot)");
        assert!(cgroup_dirs(&id).iter().all(|d| !Path::new(d).exists()), "cgroup outlived its VMM ({boot} boot)");
        assert!(Path::new(&vm_dir).join("root.raw").exists(), "the root disk goes only with the VM");
        std::fs::write(&console, "").expect("truncate console");
        if boot == "first" {
            let out = daemon.banger(&["vm", "start", "exits", "--no-wait"]);
            assert!(out.status.success(), "{}", text(&out.stderr));
        }
    }
    let out = daemon.banger(&["vm", "delete", "exits"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(!Path::new(&vm_dir).exists(), "vm dir left");
    assert!(daemon.guest_processes().is_empty(), "{:?}", daemon.guest_processes());
}

fn dots(console: &str) -> usize {
    std::fs::read_to_string(console).unwrap_or_default().lines().filter(|line| *line == ".").count()
}

#[test]
fn jailed_firecracker_snapshots_a_guest_and_starts_clones_from_its_memory_in_jails_of_their_own() {
    use std::os::unix::fs::MetadataExt;
    if !has_kvm() {
        return;
    }
    let _slot = guest_slot();
    let netns = TestNetns::new();
    let work = tempfile::tempdir().expect("tempdir");
    let kernel = toy_kernel(work.path(), Then::Count);
    let config = work.path().join("config.toml");
    std::fs::write(
        &config,
        "vmm = \"firecracker\"\njailer = true\njailer_uid_base = 930000\n\
         bridge = \"bgfc1\"\nbridge_cidr = \"172.31.97.0/24\"\n",
    )
    .expect("config");
    let mut daemon = Daemon::start_in_netns(&netns.0, &["--config", &config.display().to_string()]);
    daemon.import_image("counter", &kernel, &default_image_dir().join("rootfs.ext4"), None);
    let out = daemon.banger(&["vm", "create", "--name", "src", "--image", "counter", "--memory", "128", "--no-wait"]);
    assert!(out.status.success(), "{}\n{}", text(&out.stderr), daemon.log());
    let src_console = show(&daemon, "src", "console log").expect("console log");
    wait_until("the guest to count", || dots(&src_console) >= 5);

    // The toy guest carries no agent: the snapshot is taken without one, and the guest
    // runs on from it in a new VMM.
    let src_pid = show(&daemon, "src", "vmm pid").expect("vmm pid");
    let out = daemon.banger(&["vm", "snapshot", "src", "base", "--without-agent"]);
    assert!(out.status.success(), "{}\n{}", text(&out.stderr), daemon.log());
    println!("vm snapshot src base --without-agent:\n{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("agent:") && stdout.contains("none"), "{stdout}");
    assert_eq!(show(&daemon, "src", "state").as_deref(), Some("running"));
    assert_ne!(show(&daemon, "src", "vmm pid").expect("pid"), src_pid, "the source runs on in a new vmm");
    let counted = dots(&src_console);
    wait_until("the source to count on", || dots(&src_console) > counted + 3);
    let output = std::fs::read_to_string(&src_console).expect("console");
    assert_eq!(output.matches(MARKER).count(), 1, "the source booted again instead of running on: {output}");

    // Sealed: root's and the snapshot's group's, read-only, unchanged by the clones.
    let dirs: Vec<_> = std::fs::read_dir(daemon.state_dir().join("snapshots")).expect("snapshots").collect();
    assert_eq!(dirs.len(), 1);
    let snapshot_dir = dirs.into_iter().next().expect("one").expect("entry").path();
    let files: Vec<_> = ["memory", "state", "root.raw"].iter().map(|f| snapshot_dir.join(f)).collect();
    let group = std::fs::metadata(&files[0]).expect("memory").gid();
    assert!(group > 930_000 + (1 << 24), "the snapshot's own group: {group}");
    for file in &files {
        let meta = std::fs::metadata(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        assert_eq!((meta.uid(), meta.gid(), meta.mode() & 0o777), (0, group, 0o440), "{}", file.display());
    }
    assert_eq!(std::fs::metadata(&files[0]).expect("memory").len(), 128 << 20, "all of guest memory");
    let sums: Vec<String> = files.iter().map(|f| banger_tests::sha256(f)).collect();

    // A restore that waits for an agent is refused: the snapshot was taken without one.
    let out = daemon.banger(&["vm", "create", "--name", "waits", "--snapshot", "base"]);
    let stderr = text(&out.stderr);
    assert!(!out.status.success() && stderr.contains("INVALID_ARGUMENT") && stderr.contains("no_wait"), "{stderr}");

    let clones = ["c1", "c2"];
    let creates: Vec<_> = clones
        .iter()
        .map(|name| daemon.banger_piped(&["vm", "create", "--name", name, "--snapshot", "base", "--no-wait"]))
        .collect();
    for create in creates {
        let out = create.wait_with_output().expect("create");
        assert!(out.status.success(), "{}\n{}", text(&out.stderr), daemon.log());
        println!("vm create --snapshot base --no-wait:\n{}", text(&out.stderr));
    }
    let mut taps = Vec::new();
    for name in clones {
        assert_eq!(show(&daemon, name, "state").as_deref(), Some("running"), "{name}");
        let console = show(&daemon, name, "console log").expect("console log");
        wait_until("a clone to count", || dots(&console) >= 5);
        let output = std::fs::read_to_string(&console).expect("console");
        assert!(!output.contains(MARKER), "{name} booted instead of running on: {output}");
        // Jailed as its own uid, with the snapshot's group as its gid (the only one that
        // reads the snapshot's files), its own disk at the place the snapshot names.
        let pid = show(&daemon, name, "vmm pid").expect("vmm pid");
        let cid = cid(&daemon, name);
        assert_eq!(ids(&pid, "Uid:"), [930_000 + cid; 4], "{name}");
        assert_eq!(ids(&pid, "Gid:"), [group; 4], "{name}");
        let root = format!("/proc/{pid}/root");
        assert!(Path::new(&root).join("banger/rootfs").is_file(), "{name}: no disk in the jail");
        assert!(!Path::new(&root).join("usr/bin").exists(), "{name}: not chrooted");
        // Its own tap, opened by its VMM (the snapshot named the source's).
        let tap = show(&daemon, name, "tap").expect("tap");
        let link = Command::new("ip").args(["-n", &netns.0, "link", "show", "dev", &tap]).output().expect("ip");
        assert!(text(&link.stdout).contains("LOWER_UP"), "{name}'s tap is not attached: {}", text(&link.stdout));
        taps.push(tap);
    }
    let out = daemon.banger(&["snapshot", "delete", "base"]);
    let stderr = text(&out.stderr);
    assert!(!out.status.success() && stderr.contains("SNAPSHOT_IN_USE"), "{stderr}");

    // A daemon killed and restarted finds every clone again.
    let pids: Vec<_> = clones.iter().map(|name| show(&daemon, name, "vmm pid")).collect();
    daemon.signal(Signal::SIGKILL);
    daemon.restart();
    for (name, pid) in clones.iter().zip(&pids) {
        assert_eq!(show(&daemon, name, "state").as_deref(), Some("running"), "{name}: {}", daemon.log());
        assert_eq!(&show(&daemon, name, "vmm pid"), pid, "{name}");
    }
    let after: Vec<String> = files.iter().map(|f| banger_tests::sha256(f)).collect();
    assert_eq!(after, sums, "a clone wrote into the snapshot's files");

    let vm_dirs: Vec<_> = ["src", "c1", "c2"].iter().map(|vm| show(&daemon, vm, "vm dir").expect("vm dir")).collect();
    for vm in ["c1", "c2", "src"] {
        let out = daemon.banger(&["vm", "delete", vm]);
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    let out = daemon.banger(&["snapshot", "delete", "base"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(!snapshot_dir.exists(), "snapshot files left");
    assert!(vm_dirs.iter().all(|dir| !Path::new(dir).exists()), "vm dirs (and jails) left");
    assert!(taps.iter().all(|tap| !netns.has_link(tap)), "taps left");
    assert!(daemon.guest_processes().is_empty(), "{:?}", daemon.guest_processes());
}
