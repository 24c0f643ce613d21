//! Crash safety end to end: real bangerd processes killed with SIGKILL at chosen moments,
//! real QEMU guests adopted or cleaned up by the next daemon. Needs `make setup`.

use std::{path::Path, time::Duration};

use banger_tests::{Daemon, guest_slot, text};
use nix::{sys::signal::Signal, unistd::Pid};

fn field(out: &std::process::Output, name: &str) -> Option<String> {
    let prefix = format!("{name}:");
    text(&out.stdout).lines().find_map(|line| line.strip_prefix(&prefix).map(|v| v.trim().to_owned()))
}

fn show(daemon: &Daemon, vm: &str, name: &str) -> String {
    let out = daemon.banger(&["vm", "show", vm]);
    field(&out, name).unwrap_or_else(|| panic!("vm show {vm}: {}\n{}", text(&out.stderr), daemon.log()))
}

fn assert_gone(daemon: &Daemon, vm_dir: &str) {
    let left: Vec<_> = daemon.guest_processes().into_iter().filter(|(_, cmd)| cmd.contains(vm_dir)).collect();
    assert!(left.is_empty(), "processes left for {vm_dir}: {left:?}");
    for socket in ["qmp.sock", "vsock.sock", "vhost-user.sock", "handles.json"] {
        assert!(!Path::new(vm_dir).join(socket).exists(), "{socket} left in {vm_dir}");
    }
    let id = Path::new(vm_dir).file_name().expect("vm id").to_string_lossy().into_owned();
    for controller in ["cpu", "memory"] {
        let group = format!("/sys/fs/cgroup/{controller}/banger/{id}");
        assert!(!Path::new(&group).exists(), "{group} left");
    }
}

#[test]
fn a_killed_daemon_is_autostarted_by_the_cli_and_adopts_the_running_vm() {
    let _slot = guest_slot();
    let mut daemon = Daemon::start(&[]);
    assert!(daemon.banger(&["vm", "create", "--name", "survivor"]).status.success(), "{}", daemon.log());
    let pid = show(&daemon, "survivor", "vmm pid");
    let vm_dir = show(&daemon, "survivor", "vm dir");

    daemon.signal(Signal::SIGKILL);
    assert!(Path::new(&format!("/proc/{pid}")).exists(), "the vmm died with the daemon");

    // No daemon answers: the CLI starts one, which reports the VM running under the same VMM.
    let out = daemon.banger_autostart(&["vm", "show", "survivor"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("started bangerd"), "{}", text(&out.stderr));
    assert_eq!(field(&out, "state").as_deref(), Some("running"));
    assert_eq!(field(&out, "vmm pid").as_deref(), Some(pid.as_str()));
    let out = daemon.banger_autostart(&["vm", "exec", "survivor", "--", "cat", "/etc/hostname"]);
    assert_eq!(text(&out.stdout), "survivor\n", "{}", text(&out.stderr));

    let out = daemon.banger_autostart(&["vm", "delete", "survivor"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(!Path::new(&vm_dir).exists(), "vm dir left");
    assert_gone(&daemon, &vm_dir);
}

#[test]
fn a_vmm_killed_while_the_daemon_was_down_is_cleaned_up_and_can_start_again() {
    let _slot = guest_slot();
    let mut daemon = Daemon::start(&[]);
    assert!(daemon.banger(&["vm", "create", "--name", "victim"]).status.success(), "{}", daemon.log());
    let pid: i32 = show(&daemon, "victim", "vmm pid").parse().expect("pid");
    let vm_dir = show(&daemon, "victim", "vm dir");

    daemon.signal(Signal::SIGKILL);
    nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL).expect("kill vmm");
    banger_tests::wait_gone(pid as u32);
    daemon.restart();

    assert_eq!(show(&daemon, "victim", "state"), "stopped");
    assert_eq!(show(&daemon, "victim", "error reason"), "vmm_exited");
    assert_gone(&daemon, &vm_dir);

    let out = daemon.banger(&["vm", "start", "victim"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = daemon.banger(&["vm", "exec", "victim", "--", "cat", "/etc/hostname"]);
    assert_eq!(text(&out.stdout), "victim\n", "{}", text(&out.stderr));
    assert!(daemon.banger(&["vm", "delete", "victim"]).status.success());
    assert_gone(&daemon, &vm_dir);
}

#[test]
fn a_running_vm_is_adopted_through_proc_when_its_scratch_file_is_deleted_or_corrupt() {
    let _slot = guest_slot();
    let mut daemon = Daemon::start(&[]);
    assert!(daemon.banger(&["vm", "create", "--name", "scratchless"]).status.success(), "{}", daemon.log());
    let pid = show(&daemon, "scratchless", "vmm pid");
    let handles = Path::new(&show(&daemon, "scratchless", "vm dir")).join("handles.json");

    for damage in ["delete", "corrupt"] {
        daemon.signal(Signal::SIGKILL);
        match damage {
            "delete" => std::fs::remove_file(&handles).expect("delete handles.json"),
            _ => std::fs::write(&handles, b"{\"vmm\": {\"pid\": ").expect("corrupt handles.json"),
        }
        daemon.restart();
        assert_eq!(show(&daemon, "scratchless", "state"), "running", "after {damage}");
        assert_eq!(show(&daemon, "scratchless", "vmm pid"), pid, "after {damage}");
        let body = std::fs::read_to_string(&handles).expect("handles.json rewritten");
        assert!(body.contains(&pid), "after {damage}: {body}");
    }
    let out = daemon.banger(&["vm", "exec", "scratchless", "--", "cat", "/etc/hostname"]);
    assert_eq!(text(&out.stdout), "scratchless\n", "{}", text(&out.stderr));
    assert!(daemon.banger(&["vm", "delete", "scratchless"]).status.success());
    assert!(daemon.guest_processes().is_empty(), "{:?}", daemon.guest_processes());
}

#[test]
fn a_daemon_killed_during_create_leaves_a_running_vm_or_a_clean_error() {
    let _slot = guest_slot();
    let stages =
        ["prepare_vm_dir", "root_disk", "agent_channel", "vmm_launch", "vmm_boot", "wait_agent", "mark_running"];
    let mut daemon = Daemon::start(&[]);
    for (i, stage) in stages.iter().enumerate() {
        let name = format!("crash-{i}");
        let pause = format!("vm.create:{stage}");
        daemon.signal(Signal::SIGTERM);
        daemon.set_env(&[("BANGER_DEBUG_PAUSE_AT", &pause)]);
        daemon.restart();
        let mut cli = daemon.banger_spawn(&["vm", "create", "--name", &name]);
        daemon.wait_for_log("\"operation paused\"", Duration::from_secs(60));
        daemon.signal(Signal::SIGKILL);
        let _ = cli.kill();
        let _ = cli.wait();

        daemon.set_env(&[]);
        daemon.restart();
        let out = daemon.banger(&["vm", "show", &name]);
        let state = field(&out, "state").unwrap_or_else(|| panic!("{stage}: {}", text(&out.stderr)));
        let vm_dir = field(&out, "vm dir").expect("vm dir");
        match state.as_str() {
            "running" => {
                let out = daemon.banger(&["vm", "exec", &name, "--", "cat", "/etc/hostname"]);
                assert_eq!(text(&out.stdout), format!("{name}\n"), "{stage}: {}", text(&out.stderr));
            }
            "error" => {
                let reason = field(&out, "error reason").unwrap_or_default();
                assert_eq!(reason, "interrupted", "{stage}");
                assert_gone(&daemon, &vm_dir);
            }
            other => panic!("after a crash before {stage} the vm is {other}"),
        }
        assert!(daemon.banger(&["vm", "delete", &name]).status.success(), "{stage}");
        assert!(!Path::new(&vm_dir).exists(), "{stage}: vm dir left");
        assert_gone(&daemon, &vm_dir);
        // Clear the log so the next iteration waits for its own pause.
        std::fs::write(daemon.log_path(), b"").expect("truncate log");
    }
    assert!(daemon.guest_processes().is_empty(), "{:?}", daemon.guest_processes());
}

/// One daemon per state dir: a second `bangerd` on it exits at once, naming the first one's
/// PID, while the first one's VM boots untouched; a regular file where the socket should be
/// is refused, not deleted.
#[test]
fn a_second_daemon_on_one_state_dir_exits_naming_the_first_and_touches_nothing() {
    let _slot = guest_slot();
    let daemon = Daemon::start(&[]);
    let mut create = daemon.banger_spawn(&["vm", "create", "--name", "first"]);
    let state_dir = daemon.state_dir().display().to_string();
    let other_socket = daemon.dir.path().join("other.sock").display().to_string();
    let second = std::process::Command::new(banger_tests::bin_dir().join("bangerd"))
        .args(["--state-dir", &state_dir, "--socket", &other_socket])
        .output()
        .expect("second bangerd");
    let stderr = text(&second.stderr);
    assert!(!second.status.success(), "a second daemon ran on the state dir: {stderr}");
    assert!(stderr.contains(&format!("another bangerd (pid {}) uses the state dir", daemon.pid())), "{stderr}");
    let status = create.wait().expect("create");
    assert!(status.success(), "the first daemon's create failed:\n{}", daemon.log());
    let out = daemon.banger(&["vm", "show", "first"]);
    assert_eq!(field(&out, "state").as_deref(), Some("running"), "{}", text(&out.stdout));
    assert!(!daemon.log().contains("interrupted"), "the first daemon's VM was touched:\n{}", daemon.log());

    let not_a_socket = daemon.dir.path().join("precious.txt");
    std::fs::write(&not_a_socket, b"not a socket").expect("file");
    let elsewhere = tempfile::tempdir().expect("tempdir");
    let refused = std::process::Command::new(banger_tests::bin_dir().join("bangerd"))
        .arg("--state-dir")
        .arg(elsewhere.path())
        .arg("--socket")
        .arg(&not_a_socket)
        .output()
        .expect("bangerd");
    let stderr = text(&refused.stderr);
    assert!(!refused.status.success() && stderr.contains("is not a socket"), "{stderr}");
    assert_eq!(std::fs::read(&not_a_socket).expect("still there"), b"not a socket");
    daemon.banger(&["vm", "delete", "first"]);
}
