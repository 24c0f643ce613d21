//! Snapshots end to end with real QEMU guests on the virtio-serial agent channel: four
//! clones restored at once from one snapshot, inside a network namespace the test creates,
//! each with its own hostname, MAC, address (they ping each other by name), machine-id,
//! random numbers and disk, all running on a counter the source started before the
//! snapshot; the snapshot's files never change; a pool filled from it serves creates from it;
//! deletion waits for its dependents; and a
//! daemon killed at any stage of a snapshot or a restore leaves nothing behind. Needs
//! `make setup`.

use std::{collections::BTreeSet, path::PathBuf, time::Duration};

use banger_tests::{Daemon, TestNetns, guest_slot, sha256, text, wait_until};
use nix::sys::signal::Signal;

const SERIAL: &str = "agent_channel = \"virtio-serial\"\n";

fn field(daemon: &Daemon, args: &[&str], name: &str) -> String {
    let out = daemon.banger(args);
    let prefix = format!("{name}:");
    text(&out.stdout).lines().find_map(|line| line.strip_prefix(&prefix).map(|v| v.trim().to_owned())).unwrap_or_else(
        || panic!("no {name} in {args:?}: {}{}\n{}", text(&out.stdout), text(&out.stderr), daemon.log()),
    )
}

fn vm_field(daemon: &Daemon, vm: &str, name: &str) -> String {
    field(daemon, &["vm", "show", vm], name)
}

/// The guest's counter (a loop bumping `/tmp/ticks`, a tmpfs, every 0.1 s, by rename: a
/// reader never finds it empty).
fn ticks(daemon: &Daemon, vm: &str) -> u64 {
    let out = daemon.banger(&["vm", "exec", vm, "--", "cat", "/tmp/ticks"]);
    let said = text(&out.stdout);
    said.trim().parse().unwrap_or_else(|_| panic!("{vm} ticks: {said:?} {}", text(&out.stderr)))
}

fn start_counter(daemon: &Daemon, vm: &str) {
    let counter = "i=0; while :; do i=$((i+1)); echo $i > /tmp/ticks.new; mv /tmp/ticks.new /tmp/ticks; sleep 0.1; done >/dev/null 2>&1 &";
    let out = daemon.banger(&["vm", "exec", vm, "--", "sh", "-c", counter]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    wait_until("the counter to run", Duration::from_secs(20), || ticks(daemon, vm) >= 5);
}

/// The snapshot's files, by id, as `snapshot show` names it.
fn snapshot_files(daemon: &Daemon, snapshot: &str) -> Vec<PathBuf> {
    let id = field(daemon, &["snapshot", "show", snapshot], "id");
    let dir = daemon.state_dir().join("snapshots").join(id);
    ["memory", "state", "root.qcow2"].iter().map(|file| dir.join(file)).collect()
}

/// Runs the CLI with `args` until the daemon pauses before the stage it was told to, then
/// kills the daemon with SIGKILL (and the CLI).
fn kill_at_pause(daemon: &mut Daemon, args: &[&str]) {
    let mut cli = daemon.banger_piped(args);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !daemon.log().contains("\"operation paused\"") {
        if let Ok(Some(_)) = cli.try_wait() {
            let out = cli.wait_with_output().expect("cli");
            panic!("{args:?} ended before the pause: {}{}\n{}", text(&out.stdout), text(&out.stderr), daemon.log());
        }
        assert!(std::time::Instant::now() < deadline, "{args:?}: no pause within 60 s: {}", daemon.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    daemon.signal(Signal::SIGKILL);
    let _ = cli.kill();
    let _ = cli.wait();
}

fn assert_gone(daemon: &Daemon) {
    wait_until("every guest process to go", Duration::from_secs(20), || daemon.guest_processes().is_empty());
    let vms = daemon.state_dir().join("vms");
    for entry in std::fs::read_dir(&vms).into_iter().flatten().flatten() {
        let memory = PathBuf::from(banger_tests::MEMORY_DIR).join(entry.file_name());
        assert!(!memory.exists(), "memory file left: {}", memory.display());
    }
}

#[test]
fn four_clones_of_a_snapshot_each_have_their_own_identity_and_run_on_from_its_memory() {
    let _slot = guest_slot();
    let netns = TestNetns::new();
    let work = tempfile::tempdir().expect("tempdir");
    let config = work.path().join("config.toml");
    let network = "bridge = \"bgsnap0\"\nbridge_cidr = \"172.31.98.0/24\"\nnat = false\n";
    std::fs::write(&config, format!("{SERIAL}{network}")).expect("config");
    let daemon = Daemon::start_in_netns(&netns.0, &["--config", &config.display().to_string()]);

    let out = daemon.banger(&["vm", "create", "--name", "src"]);
    assert!(out.status.success(), "{}\n{}", text(&out.stderr), daemon.log());
    start_counter(&daemon, "src");
    let out = daemon.banger(&["vm", "exec", "src", "--", "sh", "-c", "echo before > /root/before"]);
    assert!(out.status.success(), "{}", text(&out.stderr));

    // Taken while running; the source goes on from it under its own name.
    let before = ticks(&daemon, "src");
    let out = daemon.banger(&["vm", "snapshot", "src", "base"]);
    assert!(out.status.success(), "{}\n{}", text(&out.stderr), daemon.log());
    let said = text(&out.stderr);
    for stage in ["sync_guest", "quiesce_agent", "pause_vcpus", "save_state", "freeze_files", "vmm_restore"] {
        assert!(said.contains(stage), "{stage} missing: {said}");
    }
    assert_eq!(vm_field(&daemon, "src", "state"), "running");
    let out = daemon.banger(&["vm", "exec", "src", "--", "hostname"]);
    assert_eq!(text(&out.stdout), "src\n", "{}", text(&out.stderr));
    assert!(ticks(&daemon, "src") >= before, "the source's counter ran on");
    let files = snapshot_files(&daemon, "base");
    let digests: Vec<String> = files.iter().map(|file| sha256(file)).collect();

    // Time passes: a clone's clock must be the host's, not the snapshot's.
    std::thread::sleep(Duration::from_secs(3));
    // Four clones at once.
    let names = ["c1", "c2", "c3", "c4"];
    let creates: Vec<_> =
        names.iter().map(|name| daemon.banger_piped(&["vm", "create", "--name", name, "--snapshot", "base"])).collect();
    for (name, create) in names.iter().zip(creates) {
        let out = create.wait_with_output().expect("create");
        let stages = text(&out.stderr);
        assert!(out.status.success(), "{name}: {stages}\n{}", daemon.log());
        assert!(stages.contains("vmm_restore") && stages.contains("guest_identity"), "{name}: {stages}");
        assert!(!stages.contains("vmm_boot"), "{name} was booted: {stages}");
    }
    let script = "hostname; cat /etc/hostname; cat /sys/class/net/eth0/address; \
                  ip -4 -o addr show dev eth0 | awk '{print $4}'; cat /etc/machine-id; \
                  head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; cat /tmp/ticks; cat /root/before; \
                  date +%s";
    let mut seen: Vec<BTreeSet<String>> = vec![BTreeSet::new(); 5];
    let unix_now = || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs();
    for name in names {
        let asked = unix_now();
        let out = daemon.banger(&["vm", "exec", name, "--", "sh", "-c", script]);
        let answered = unix_now();
        let said = text(&out.stdout);
        let lines: Vec<&str> = said.lines().collect();
        assert_eq!(lines.len(), 9, "{name}: {said}{}", text(&out.stderr));
        let guest_now: u64 = lines[8].parse().expect("date +%s");
        assert!(
            asked.saturating_sub(1) <= guest_now && guest_now <= answered + 1,
            "{name}: the guest's clock says {guest_now}, the host's {asked}..{answered}"
        );
        assert_eq!((lines[0], lines[1]), (name, name), "{name}: hostname");
        let ip = vm_field(&daemon, name, "ip");
        assert_eq!(lines[3], format!("{ip}/24"), "{name}: address");
        assert!(lines[4].len() == 32 && lines[4].bytes().all(|b| b.is_ascii_hexdigit()), "{name}: {}", lines[4]);
        // The counter runs on from the snapshot's memory: a boot would have no /tmp/ticks.
        let counted: u64 = lines[6].parse().expect("ticks");
        assert!(counted >= before, "{name}: counter {counted} < {before} at the snapshot");
        assert_eq!(lines[7], "before", "{name}: the disk as it was");
        for (i, value) in [lines[2], lines[3], lines[4], lines[5]].into_iter().enumerate() {
            assert!(seen[i].insert(value.to_owned()), "{name} shares {value} with another clone");
        }
        assert_eq!(vm_field(&daemon, name, "snapshot"), field(&daemon, &["snapshot", "show", "base"], "id"));
    }
    wait_until("the clones' counters to advance", Duration::from_secs(20), || {
        names.iter().all(|name| ticks(&daemon, name) > before + 5)
    });
    // They reach each other by name, over their own addresses.
    for (from, to) in [("c1", "c2"), ("c2", "c3"), ("c3", "c4"), ("c4", "c1")] {
        let out = daemon.banger(&["vm", "exec", from, "--", "ping", "-c", "1", "-W", "5", to]);
        assert_eq!(out.status.code(), Some(0), "{from} → {to}: {}{}", text(&out.stdout), text(&out.stderr));
    }
    // Each has its own disk.
    let out = daemon.banger(&["vm", "exec", "c1", "--", "sh", "-c", "echo mine > /root/only-c1 && sync"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    for name in ["c2", "c3", "c4", "src"] {
        let out = daemon.banger(&["vm", "exec", name, "--", "test", "-e", "/root/only-c1"]);
        assert_eq!(out.status.code(), Some(1), "{name} sees c1's file");
    }
    let after: Vec<String> = files.iter().map(|file| sha256(file)).collect();
    assert_eq!(digests, after, "the snapshot's memory, state and disk never change");

    // The source runs on its own copy of the memory: it is snapshotted again, the second
    // snapshot's disk overlaying the first's.
    let out = daemon.banger(&["vm", "snapshot", "src", "second", "--stop"]);
    assert!(out.status.success(), "{}\n{}", text(&out.stderr), daemon.log());
    assert_eq!(vm_field(&daemon, "src", "state"), "stopped");

    // Deleted only once nothing depends on it.
    let out = daemon.banger(&["snapshot", "delete", "base"]);
    let said = text(&out.stderr);
    assert!(!out.status.success() && said.contains("FAILED_PRECONDITION"), "{said}");
    assert_eq!(field(&daemon, &["snapshot", "show", "base"], "dependents"), "5");
    for name in names.iter().chain(&["src"]) {
        assert!(daemon.banger(&["vm", "delete", name]).status.success());
    }
    let out = daemon.banger(&["snapshot", "delete", "second"]);
    assert!(out.status.success(), "{}", text(&out.stderr));

    // A pool filled from the snapshot: its member is restored, and a create from the
    // snapshot claims it.
    let out = daemon.banger(&["pool", "create", "restored", "--size", "1", "--snapshot", "base"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    wait_until("the pool's member", Duration::from_secs(60), || {
        text(&daemon.banger(&["pool", "show", "restored"]).stdout).contains(" running ")
    });
    let out = daemon.banger(&["vm", "create", "--name", "pooled", "--snapshot", "base"]);
    let stages = text(&out.stderr);
    assert!(out.status.success() && stages.contains("pool_claim") && !stages.contains("vmm_restore"), "{stages}");
    let out = daemon.banger(&["vm", "exec", "pooled", "--", "hostname"]);
    assert_eq!(text(&out.stdout), "pooled\n", "{}", text(&out.stderr));
    let out = daemon.banger(&["snapshot", "delete", "base"]);
    assert!(!out.status.success(), "deleted under a pool: {}", text(&out.stdout));
    assert!(daemon.banger(&["pool", "delete", "restored"]).status.success());
    assert!(daemon.banger(&["vm", "delete", "pooled"]).status.success());
    let out = daemon.banger(&["snapshot", "delete", "base"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(files.iter().all(|file| !file.exists()), "snapshot files left");
    assert_gone(&daemon);
}

#[test]
fn a_daemon_killed_during_a_snapshot_or_a_restore_leaves_the_vm_whole_and_nothing_leaked() {
    let _slot = guest_slot();
    let work = tempfile::tempdir().expect("tempdir");
    let config = work.path().join("config.toml");
    std::fs::write(&config, SERIAL).expect("config");
    let mut daemon = Daemon::start(&["--config", &config.display().to_string()]);
    let out = daemon.banger(&["vm", "create", "--name", "src"]);
    assert!(out.status.success(), "{}\n{}", text(&out.stderr), daemon.log());

    let stages = ["sync_guest", "pause_vcpus", "save_state", "freeze_files", "stop_source", "vmm_restore", "mark_done"];
    let snapshots = daemon.state_dir().join("snapshots");
    for stage in stages {
        let name = format!("at-{}", stage.replace('_', "-"));
        daemon.signal(Signal::SIGTERM);
        daemon.set_env(&[("BANGER_DEBUG_PAUSE_AT", &format!("vm.snapshot:{stage}"))]);
        daemon.restart();
        kill_at_pause(&mut daemon, &["vm", "snapshot", "src", &name]);
        daemon.set_env(&[]);
        daemon.restart();

        let taken = daemon.banger(&["snapshot", "show", &name]).status.success();
        let state = vm_field(&daemon, "src", "state");
        match (taken, state.as_str()) {
            // Cut short before it was complete: rolled back, the source runs on as it was.
            (false, "running") => {}
            // Complete: the source was stopped at reconcile; it boots from its disk.
            (true, "stopped") => {
                let out = daemon.banger(&["vm", "start", "src"]);
                assert!(out.status.success(), "{stage}: {}\n{}", text(&out.stderr), daemon.log());
            }
            other => panic!("killed before {stage}: snapshot taken and vm state {other:?}"),
        }
        let out = daemon.banger(&["vm", "exec", "src", "--", "hostname"]);
        assert_eq!(text(&out.stdout), "src\n", "{stage}: {}", text(&out.stderr));
        // Only complete snapshots have files.
        let listed = text(&daemon.banger(&["snapshot", "list"]).stdout);
        let dirs = std::fs::read_dir(&snapshots).map(|d| d.count()).unwrap_or(0);
        assert_eq!(dirs, listed.lines().count().saturating_sub(1), "{stage}: {listed}");
        std::fs::write(daemon.log_path(), b"").expect("truncate log");
    }
    assert!(text(&daemon.banger(&["snapshot", "list"]).stdout).contains("at-stop-source"));

    // A restore killed part way: the clone is an error (or running) and deletes cleanly.
    for stage in ["vmm_launch", "vmm_restore", "guest_identity"] {
        let name = format!("r-{}", stage.replace('_', "-"));
        daemon.signal(Signal::SIGTERM);
        daemon.set_env(&[("BANGER_DEBUG_PAUSE_AT", &format!("vm.create:{stage}"))]);
        daemon.restart();
        kill_at_pause(&mut daemon, &["vm", "create", "--name", &name, "--snapshot", "at-stop-source"]);
        daemon.set_env(&[]);
        daemon.restart();
        let state = vm_field(&daemon, &name, "state");
        assert!(state == "error" || state == "running", "{stage}: {state}");
        assert!(daemon.banger(&["vm", "delete", &name]).status.success(), "{stage}");
        std::fs::write(daemon.log_path(), b"").expect("truncate log");
    }
    // Idle clones and the source survive a kill: adopted, same VMM.
    let out = daemon.banger(&["vm", "create", "--name", "idle", "--snapshot", "at-stop-source"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let pid = vm_field(&daemon, "idle", "vmm pid");
    daemon.signal(Signal::SIGKILL);
    daemon.restart();
    assert_eq!(vm_field(&daemon, "idle", "vmm pid"), pid);
    let out = daemon.banger(&["vm", "exec", "idle", "--", "hostname"]);
    assert_eq!(text(&out.stdout), "idle\n", "{}", text(&out.stderr));
    for vm in ["idle", "src"] {
        assert!(daemon.banger(&["vm", "delete", vm]).status.success());
    }
    // Newest first: each one taken of the source overlays the one before.
    let listed = text(&daemon.banger(&["snapshot", "list"]).stdout);
    for line in listed.lines().skip(1).collect::<Vec<_>>().into_iter().rev() {
        let name = line.split_whitespace().next().expect("name");
        let out = daemon.banger(&["snapshot", "delete", name]);
        assert!(out.status.success(), "{name}: {}", text(&out.stderr));
    }
    assert_eq!(std::fs::read_dir(&snapshots).map(|d| d.count()).unwrap_or(0), 0, "snapshot files left");
    assert_gone(&daemon);
}
