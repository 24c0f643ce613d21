//! End to end: real bangerd processes boot real QEMU guests from the default image, and the
//! real CLI runs commands in them. Needs `make setup` (QEMU, vhost-device-vsock, the image).

use std::{path::Path, process::Command, time::Duration};

use banger_tests::{Daemon, guest_slot, sha256, skip, text, wait_until};
use nix::sys::signal::Signal;

fn try_vm_field(daemon: &Daemon, vm: &str, field: &str) -> Option<String> {
    let out = daemon.banger(&["vm", "show", vm]);
    let prefix = format!("{field}:");
    text(&out.stdout).lines().find_map(|line| line.strip_prefix(&prefix).map(|v| v.trim().to_owned()))
}

fn vm_field(daemon: &Daemon, vm: &str, field: &str) -> String {
    try_vm_field(daemon, vm, field).unwrap_or_else(|| panic!("no {field} for {vm}: {}", daemon.log()))
}

#[test]
fn vm_run_prints_guest_output_and_exit_codes_and_delete_leaves_nothing() {
    let _slot = guest_slot();
    let daemon = Daemon::start(&[]);

    let out = daemon.banger(&["vm", "run", "--name", "handles-test", "--", "cat", "/etc/hostname"]);
    assert!(out.status.success(), "stderr: {}\nlog: {}", text(&out.stderr), daemon.log());
    assert_eq!(text(&out.stdout), "handles-test\n");

    let out = daemon.banger(&["vm", "run", "--rm", "--", "sh", "-c", "echo out; echo err >&2; exit 7"]);
    assert_eq!(out.status.code(), Some(7), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "out\n");
    assert_eq!(text(&out.stderr), "err\n");

    // Standard input reaches the guest process; timeouts and missing programs behave like a shell.
    let out =
        daemon.banger_with_stdin(&["vm", "exec", "-i", "handles-test", "--", "tr", "a-z", "A-Z"], Some(b"piped\n"));
    assert_eq!((out.status.code(), text(&out.stdout)), (Some(0), "PIPED\n".to_owned()), "{}", text(&out.stderr));
    let out = daemon.banger(&["vm", "exec", "--timeout", "1", "handles-test", "--", "sleep", "30"]);
    assert_eq!(out.status.code(), Some(124), "{}", text(&out.stderr));
    let out = daemon.banger(&["vm", "exec", "handles-test", "--", "no-such-program"]);
    assert_eq!(out.status.code(), Some(127), "{}", text(&out.stderr));

    // The --rm VM is gone; only handles-test remains, running under a live VMM.
    let list = text(&daemon.banger(&["vm", "list"]).stdout);
    assert_eq!(list.lines().count(), 2, "{list}");
    assert_eq!(vm_field(&daemon, "handles-test", "state"), "running");
    let vm_dir = vm_field(&daemon, "handles-test", "vm dir");
    let pid: u32 = vm_field(&daemon, "handles-test", "vmm pid").parse().expect("pid");
    assert!(Path::new(&format!("/proc/{pid}")).exists());
    assert!(Path::new(&vm_dir).join("handles.json").is_file());

    // The VMM sits in its own cgroup: one CPU per vCPU, the guest's memory plus overhead.
    let id = vm_field(&daemon, "handles-test", "id");
    let cgroup_v1 = Path::new("/sys/fs/cgroup/memory/memory.limit_in_bytes").exists();
    if cgroup_v1 {
        let read = |path: String| std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let procs = read(format!("/sys/fs/cgroup/memory/banger/{id}/cgroup.procs"));
        assert!(procs.lines().any(|p| p == pid.to_string()), "vmm {pid} not in its memory cgroup: {procs}");
        let limit: u64 =
            read(format!("/sys/fs/cgroup/memory/banger/{id}/memory.limit_in_bytes")).trim().parse().expect("limit");
        assert_eq!(limit, (256 + 512) * 1024 * 1024);
        // One core for its vCPU, one for the VMM's own threads and the vsock backend.
        assert_eq!(read(format!("/sys/fs/cgroup/cpu/banger/{id}/cpu.cfs_quota_us")).trim(), "200000");
    } else {
        skip("cgroup v1 checks: this host has no v1 memory controller");
    }

    let out = daemon.banger(&["vm", "stop", "handles-test"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(vm_field(&daemon, "handles-test", "state"), "stopped");
    assert!(daemon.guest_processes().is_empty(), "after stop: {:?}", daemon.guest_processes());
    for leftover in ["qmp.sock", "vsock.sock", "vhost-user.sock", "handles.json"] {
        assert!(!Path::new(&vm_dir).join(leftover).exists(), "{leftover} left after stop");
    }
    assert!(Path::new(&vm_dir).join("root.qcow2").is_file(), "a stopped vm keeps its disk");
    assert!(!Path::new(&format!("/sys/fs/cgroup/memory/banger/{id}")).exists(), "cgroup left after stop");

    let out = daemon.banger(&["vm", "start", "handles-test"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = daemon.banger(&["vm", "exec", "handles-test", "--", "cat", "/etc/hostname"]);
    assert_eq!(text(&out.stdout), "handles-test\n");

    let out = daemon.banger(&["vm", "delete", "handles-test"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(!Path::new(&vm_dir).exists(), "vm dir left after delete");
    for controller in ["cpu", "memory"] {
        let group = format!("/sys/fs/cgroup/{controller}/banger/{id}");
        assert!(!Path::new(&group).exists(), "{group} left after delete");
    }
    assert!(daemon.guest_processes().is_empty(), "after delete: {:?}", daemon.guest_processes());
    let list = text(&daemon.banger(&["vm", "list"]).stdout);
    assert_eq!(list.lines().count(), 1, "{list}");
}

#[test]
fn bad_input_is_refused_with_field_violations_and_leaves_nothing() {
    let _slot = guest_slot();
    let daemon = Daemon::start(&[]);
    let cases: [(&[&str], &str); 6] = [
        (&["vm", "create", "--name", "a/b"], "name"),
        (&["vm", "create", "--name", "a b"], "name"),
        (&["vm", "create", "--vcpus", "0"], "vcpus"),
        (&["vm", "create", "--memory", "1"], "memory_mib"),
        (&["vm", "create", "--image", "no-such-image"], "NOT_FOUND"),
        (&["image", "import", "broken", "--kernel", "/no/such/vmlinuz", "--rootfs", "/no/such/rootfs"], "kernel_path"),
    ];
    for (args, expected) in cases {
        let out = daemon.banger(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let stderr = text(&out.stderr);
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
    // A kernel that passes the import check but cannot boot: the create fails at a boot
    // stage, unwinds completely, and points at the VMM's log, which it kept.
    let broken = daemon.dir.path().join("broken-vmlinuz");
    let mut header = vec![0u8; 8192];
    header[0x202..0x206].copy_from_slice(b"HdrS");
    // Boot protocol 1.0, too old for an initramfs: QEMU refuses it and exits at once.
    header[0x206..0x208].copy_from_slice(&0x0100u16.to_le_bytes());
    std::fs::write(&broken, header).expect("broken kernel");
    let rootfs = banger_tests::default_image_dir().join("rootfs.ext4");
    let initrd = banger_tests::default_image_dir().join("initrd.img");
    daemon.import_image("unbootable", &broken, &rootfs, Some(&initrd));
    let out = daemon.banger(&["vm", "create", "--name", "doomed", "--image", "unbootable"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    // The CLI prints the error's reason and facts (ErrorInfo), not only its words.
    let facts = stderr.lines().find_map(|line| line.trim().strip_prefix("reason: ")).expect("a reason line");
    let fact = |key: &str| facts.split([' ', '(', ')']).find_map(|f| f.strip_prefix(&format!("{key}=")));
    assert_eq!(fact("operation"), Some("vm.create"), "{stderr}");
    assert!(fact("stage").is_some_and(|stage| stage.starts_with("vmm_")), "{stderr}");
    assert!(stderr.contains("op: "), "{stderr}");
    let log = fact("log_path").expect("the log to inspect");
    assert!(Path::new(log).is_file(), "the named log {log} was not kept: {stderr}");
    assert!(daemon.banger(&["image", "delete", "unbootable"]).status.success());

    let out = daemon.banger(&["vm", "create", "--name", &"x".repeat(64)]);
    assert!(text(&out.stderr).contains("INVALID_ARGUMENT"), "{}", text(&out.stderr));
    let list = text(&daemon.banger(&["vm", "list"]).stdout);
    assert_eq!(list.lines().count(), 1, "{list}");
    assert!(daemon.guest_processes().is_empty());
    let vms = daemon.state_dir().join("vms");
    assert!(!vms.exists() || std::fs::read_dir(&vms).expect("vms").next().is_none());
}

#[test]
fn a_restarted_daemon_keeps_records_and_adopts_running_vms_and_serves_reflection() {
    let _slot = guest_slot();
    let pki = banger_tests::tls::Pki::new();
    let config = pki.config("[[auth.grants]]\ncert = \"e2e\"\nrole = \"admin\"\n");
    let client = pki.client("e2e");
    let listen = format!("127.0.0.1:{}", banger_tests::tls::free_port());
    let mut daemon = Daemon::start(&["--config", &config.display().to_string(), "--listen", &listen]);

    assert!(daemon.banger(&["vm", "create", "--name", "keeper"]).status.success(), "{}", daemon.log());
    assert!(daemon.banger(&["vm", "create", "--name", "idle", "--no-start"]).status.success());
    let pid = vm_field(&daemon, "keeper", "vmm pid");

    // A stopped daemon leaves its VMs running; the next one adopts them.
    daemon.signal(Signal::SIGTERM);
    assert!(Path::new(&format!("/proc/{pid}")).exists(), "the vmm died with the daemon");
    daemon.restart();
    assert_eq!(vm_field(&daemon, "keeper", "state"), "running");
    assert_eq!(vm_field(&daemon, "keeper", "vmm pid"), pid);
    assert_eq!(vm_field(&daemon, "idle", "state"), "created");
    let out = daemon.banger(&["vm", "exec", "keeper", "--", "cat", "/etc/hostname"]);
    assert_eq!(text(&out.stdout), "keeper\n", "{}", text(&out.stderr));

    // Reflection and health, with no proto files, over TCP with mutual TLS.
    let grpcurl = banger_tests::tls::grpcurl();
    let tls = pki.grpcurl_flags(Some(&client));
    let grpcurl_tls = || {
        let mut command = std::process::Command::new(&grpcurl);
        command.args(&tls);
        command
    };
    let run = |args: &[&str]| {
        let out = grpcurl_tls().args(args).output().expect("grpcurl");
        assert!(out.status.success(), "grpcurl {args:?}: {}", text(&out.stderr));
        text(&out.stdout)
    };
    let services = run(&[&listen, "list"]);
    for service in ["banger.v1.VmService", "banger.v1.ImageService", "banger.v1.HostService", "grpc.health.v1.Health"] {
        assert!(services.lines().any(|l| l == service), "{service} missing from {services}");
    }
    assert!(!services.contains("banger.agent"), "the guest agent's protocol is not served: {services}");
    let vms = run(&[&listen, "banger.v1.VmService/ListVms"]);
    assert!(vms.contains("\"keeper\"") && vms.contains("\"idle\""), "{vms}");
    let health = run(&[&listen, "grpc.health.v1.Health/Check"]);
    assert!(health.contains("SERVING"), "{health}");
    // No -authority: grpcurl sends the socket's path, which bangerd accepts on its unix socket.
    let over_unix = std::process::Command::new(&grpcurl)
        .args(["-plaintext", "-unix", &daemon.socket.display().to_string(), "list"])
        .output()
        .expect("grpcurl");
    assert!(text(&over_unix.stdout).contains("banger.v1.VmService"), "{}", text(&over_unix.stderr));
    // Error details decode through reflection: no "is not recognized".
    let refused = grpcurl_tls()
        .args(["-d", r#"{"name":"has space"}"#, &listen, "banger.v1.VmService/CreateVm"])
        .output()
        .expect("grpcurl");
    let said = text(&refused.stderr);
    assert!(!refused.status.success() && said.contains("Code: InvalidArgument"), "{said}");
    assert!(said.contains(r#""@type":"type.googleapis.com/google.rpc.BadRequest""#), "{said}");
    assert!(said.contains(r#""fieldViolations":[{"field":"name""#) && !said.contains("not recognized"), "{said}");

    // A client that gives up mid-create does not cut the operation short: it completes.
    let out = grpcurl_tls()
        .args(["-max-time", "0.3", "-d", r#"{"name":"impatient"}"#, &listen, "banger.v1.VmService/CreateVm"])
        .output()
        .expect("grpcurl");
    // grpcurl reports the expired deadline as DeadlineExceeded or Canceled, depending on when it hit.
    assert!(!out.status.success(), "the create should have outlived the client's deadline: {}", text(&out.stdout));
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while try_vm_field(&daemon, "impatient", "state").as_deref() != Some("running") {
        assert!(std::time::Instant::now() < deadline, "impatient never ran: {}", daemon.log());
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = daemon.banger(&["vm", "exec", "impatient", "--", "cat", "/etc/hostname"]);
    assert_eq!(text(&out.stdout), "impatient\n", "{}", text(&out.stderr));

    for vm in ["keeper", "idle", "impatient"] {
        assert!(daemon.banger(&["vm", "delete", vm]).status.success());
    }
    wait_until("every guest process to go", Duration::from_secs(10), || daemon.guest_processes().is_empty());
}

#[test]
fn doctor_reports_this_host_as_it_is() {
    let daemon = Daemon::start(&[]);
    let out = daemon.banger(&["doctor"]);
    let report = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "a host that runs the e2e tests has no failing check:\n{report}");
    let status = |name: &str| -> String {
        report
            .lines()
            .find_map(|line| {
                let mut words = line.split_whitespace();
                let status = words.next()?;
                (words.next()? == name).then(|| status.to_owned())
            })
            .unwrap_or_else(|| panic!("no {name} line in:\n{report}"))
    };
    let expect = |condition: bool| if condition { "PASS" } else { "WARN" };
    assert_eq!(status("qemu"), "PASS");
    let installed = |program: &str| {
        Command::new("sh").args(["-c", &format!("command -v {program}")]).output().is_ok_and(|o| o.status.success())
    };
    assert_eq!(status("firecracker"), expect(installed("firecracker")));
    assert_eq!(status("jailer"), expect(installed("jailer")));
    assert_eq!(status("vsock"), "PASS");
    assert_eq!(status("device-mapper"), expect(Path::new("/dev/mapper/control").exists()));
    assert_eq!(status("tap"), expect(Path::new("/dev/net/tun").exists()));
    let cgroups = Path::new("/sys/fs/cgroup/memory/memory.limit_in_bytes").exists()
        || std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers").is_ok_and(|c| c.contains("memory"));
    assert_eq!(status("cgroup"), expect(cgroups));
    let hardware = std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|c| c.contains(" vmx") || c.contains(" svm"));
    // accel = "auto" (the default): KVM only where a guest kernel booted under it, and why.
    let kvm_device = Path::new("/dev/kvm").exists();
    let uses_kvm = report.contains("vmm qemu (accel kvm)");
    assert!(uses_kvm || report.contains("vmm qemu (accel tcg)"), "{report}");
    assert_eq!(status("kvm"), if uses_kvm { "PASS" } else { "WARN" }, "kvm: /dev/kvm {kvm_device}, vmx/svm {hardware}");
    let reason =
        report.lines().find(|line| line.starts_with("accel ")).unwrap_or_else(|| panic!("no reason: {report}"));
    assert!(reason.contains(": auto: "), "{reason}");
    if kvm_device && !hardware {
        // This kind of host (PVM): /dev/kvm is there, but stock kernels do not boot under it.
        assert!(!uses_kvm && reason.contains("KVM cannot boot guests here"), "{reason}");
    }
    println!("doctor's accelerator: {reason}");
    let backend = if Path::new("/dev/vhost-vsock").exists() { "kernel vhost-vsock" } else { "vhost-device-vsock" };
    assert!(report.contains(&format!("agent channel {backend}")), "{report}");
    let json = daemon.banger(&["doctor", "--output", "json"]);
    let json: serde_json::Value = serde_json::from_slice(&json.stdout).expect("doctor json");
    let qemu = json["checks"].as_array().expect("checks").iter().find(|c| c["name"] == "qemu").cloned();
    assert_eq!(qemu.expect("qemu check")["status"], "HOST_CHECK_STATUS_PASS");
    assert_eq!(json["choices"]["vmm"], "qemu");
}

#[test]
fn twenty_concurrent_creates_with_one_request_id_boot_one_vm_and_answer_alike() {
    let _slot = guest_slot();
    let daemon = Daemon::start(&[]);
    let args = ["vm", "create", "--name", "ci-job", "--request-id", "3f1c2a9e-job-create"];
    let children: Vec<_> = (0..20).map(|_| daemon.banger_piped(&args)).collect();
    let answers: Vec<_> = children.into_iter().map(|child| child.wait_with_output().expect("banger")).collect();
    for out in &answers {
        assert!(out.status.success(), "{}\n{}", text(&out.stderr), daemon.log());
    }
    let first = text(&answers[0].stdout);
    assert!(first.starts_with("ci-job ") && first.contains(" running op="), "{first}");
    assert!(answers.iter().all(|out| text(&out.stdout) == first), "the answers differ");
    let list = text(&daemon.banger(&["vm", "list"]).stdout);
    assert_eq!(list.lines().filter(|l| l.starts_with("ci-job")).count(), 1, "{list}");
    assert_eq!(daemon.guest_processes().iter().filter(|(_, cmd)| cmd.contains("qemu")).count(), 1);
    // The VM works, and deleting it with a request id twice deletes it once.
    let out = daemon.banger(&["vm", "exec", "ci-job", "--", "cat", "/etc/hostname"]);
    assert_eq!(text(&out.stdout), "ci-job\n", "{}", text(&out.stderr));
    for _ in 0..2 {
        let out = daemon.banger(&["vm", "delete", "ci-job", "--request-id", "3f1c2a9e-job-delete"]);
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    assert!(daemon.guest_processes().is_empty(), "{:?}", daemon.guest_processes());
}

#[test]
fn a_labelled_vm_with_a_ttl_is_listed_waited_for_and_reaped_with_all_it_held_across_a_daemon_kill() {
    let _slot = guest_slot();
    let mut daemon = Daemon::start(&[]);
    let out = daemon.banger(&["vm", "create", "--name", "ttl-vm", "--ttl", "15s", "--label", "ci.job=77"]);
    assert!(out.status.success(), "{}\n{}", text(&out.stderr), daemon.log());
    let listed = |label: &str| text(&daemon.banger(&["vm", "list", "--label", label]).stdout);
    assert!(listed("ci.job=77").contains("ttl-vm"));
    assert!(!listed("ci.job=78").contains("ttl-vm"));
    assert!(text(&daemon.banger(&["vm", "list", "--state", "running"]).stdout).contains("ttl-vm"));
    assert!(!text(&daemon.banger(&["vm", "list", "--state", "stopped"]).stdout).contains("ttl-vm"));
    assert_eq!(vm_field(&daemon, "ttl-vm", "labels"), "ci.job=77");
    // The same in JSON, with protobuf's JSON names, for scripts.
    let listed = daemon.banger(&["vm", "list", "--label", "ci.job=77", "--output", "json"]);
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).expect("json list");
    assert_eq!(listed[0]["name"], "ttl-vm", "{listed}");
    assert_eq!(listed[0]["state"], "VM_STATE_RUNNING", "{listed}");
    assert_eq!(listed[0]["labels"]["ci.job"], "77", "{listed}");
    assert!(listed[0]["expireTime"].is_string(), "{listed}");
    let shown = daemon.banger(&["-o", "json", "vm", "show", "ttl-vm"]);
    let shown: serde_json::Value = serde_json::from_slice(&shown.stdout).expect("json show");
    assert_eq!(shown["runtime"]["vmPid"], serde_json::Value::Null, "no such field");
    assert!(shown["runtime"]["vmmPid"].as_u64().is_some_and(|pid| pid > 0), "{shown}");
    assert_ne!(vm_field(&daemon, "ttl-vm", "expires"), "-");
    let out = daemon.banger(&["vm", "wait", "ttl-vm", "--state", "running", "--timeout", "30s"]);
    assert!(out.status.success() && text(&out.stdout).contains("running"), "{}", text(&out.stderr));
    let out = daemon.banger(&["vm", "wait", "ttl-vm", "--state", "stopped", "--timeout", "1s"]);
    assert!(text(&out.stderr).contains("DEADLINE_EXCEEDED"), "{}", text(&out.stderr));

    // The daemon dies; the next one still knows the expiry and reaps the VM and its VMM.
    daemon.signal(Signal::SIGKILL);
    daemon.restart();
    assert_eq!(vm_field(&daemon, "ttl-vm", "state"), "running", "reaped early");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while try_vm_field(&daemon, "ttl-vm", "state").is_some() {
        assert!(std::time::Instant::now() < deadline, "not reaped: {}", daemon.log());
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(daemon.log().contains("time to live over"), "the reaper says why");
    assert!(daemon.guest_processes().is_empty(), "{:?}", daemon.guest_processes());
    let out = daemon.banger(&["vm", "delete", "ttl-vm", "--missing-ok"]);
    assert!(out.status.success() && text(&out.stdout).contains("does not exist"), "{}", text(&out.stderr));
}

#[test]
fn a_watcher_sees_a_real_vm_boot_stage_by_stage_and_its_deletion() {
    let _slot = guest_slot();
    let daemon = Daemon::start(&[]);
    // From the first revision of this new daemon: whenever the watch begins, nothing is missed.
    let watcher = daemon.banger_follow(&["vm", "watch", "watched", "--from", "1"]);
    let out = daemon.banger(&["vm", "create", "--name", "watched"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let other = daemon.banger(&["vm", "create", "--name", "unwatched", "--no-start"]);
    assert!(other.status.success(), "{}", text(&other.stderr));
    assert!(daemon.banger(&["vm", "delete", "watched", "unwatched"]).status.success());
    watcher.wait_for(" deleted", Duration::from_secs(30));
    let pid = nix::unistd::Pid::from_raw(watcher.id() as i32);
    nix::sys::signal::kill(pid, Signal::SIGTERM).expect("stop the watcher");
    let (_, seen, _) = watcher.finish();
    let lines: Vec<&str> = seen.lines().collect();
    let position = |needle: &str| {
        lines.iter().position(|l| l.contains(needle)).unwrap_or_else(|| panic!("no {needle:?} in:\n{seen}"))
    };
    assert!(lines.iter().all(|l| l.contains(" watched ")), "another VM's events:\n{seen}");
    let (starting, boot, running, deleted) = (
        position("state starting"),
        position("stage vm.create.vmm_boot"),
        position("state starting -> running"),
        position("deleted"),
    );
    assert!(starting < boot && boot < running && running < deleted, "out of order:\n{seen}");
    for stage in ["root_disk", "vmm_launch", "limit_resources", "wait_agent"] {
        position(&format!("stage vm.create.{stage} "));
    }
    // Revisions are consecutive numbers in order (this watcher skips other VMs' events).
    let revisions: Vec<u64> =
        lines.iter().map(|l| l.split_whitespace().next().expect("rev")[1..].parse().expect("number")).collect();
    assert!(revisions.windows(2).all(|w| w[0] < w[1]), "{revisions:?}");
}

/// The daemon's resident memory in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS");
    line.split_whitespace().nth(1).expect("kB").parse().expect("number")
}

#[test]
fn guest_output_streams_through_in_bounded_daemon_memory_and_interrupting_kills_the_process() {
    use std::io::Read;
    let _slot = guest_slot();
    let daemon = Daemon::start(&[]);
    let out = daemon.banger(&["vm", "create", "--name", "flood"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let before = rss_kib(daemon.pid());

    // Output through agent -> daemon -> CLI, read here as it comes; the daemon's memory is
    // sampled meanwhile. 256 MiB by default (about a minute under TCG, four times the bound
    // below); BANGER_E2E_FLOOD_BYTES=1073741824 streams the full GiB (several minutes here).
    let bytes: u64 = std::env::var("BANGER_E2E_FLOOD_BYTES").ok().and_then(|b| b.parse().ok()).unwrap_or(256 << 20);
    let mut exec = std::process::Command::new(banger_tests::bin_dir().join("banger"))
        .args(["--socket", &daemon.socket.display().to_string()])
        .args(["vm", "exec", "flood", "--", "sh", "-c", &format!("yes | head -c {bytes}")])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("exec");
    let mut stdout = exec.stdout.take().expect("stdout");
    let (mut total, mut buf, mut peak) = (0u64, vec![0u8; 1 << 20], before);
    let mut last_sample = std::time::Instant::now();
    loop {
        let n = stdout.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        assert!(buf[..n].iter().all(|b| *b == b'y' || *b == b'\n'), "corrupted output");
        total += n as u64;
        if last_sample.elapsed() > Duration::from_millis(100) {
            peak = peak.max(rss_kib(daemon.pid()));
            last_sample = std::time::Instant::now();
        }
    }
    assert!(exec.wait().expect("exec").success());
    assert_eq!(total, bytes, "every byte arrived");
    let growth_mib = peak.saturating_sub(before) / 1024;
    eprintln!("daemon RSS: {} MiB before, {} MiB peak while streaming {} MiB", before / 1024, peak / 1024, bytes >> 20);
    assert!(growth_mib < 64, "the daemon buffered the stream: RSS grew by {growth_mib} MiB");

    // Ctrl-C on the CLI kills the guest process (and its process group).
    let sleeper =
        daemon.banger_spawn(&["vm", "exec", "flood", "--", "sh", "-c", "echo $$ > /tmp/sleeper; exec sleep 300"]);
    let alive = |daemon: &Daemon| {
        let out = daemon.banger(&["vm", "exec", "flood", "--", "sh", "-c", "kill -0 $(cat /tmp/sleeper)"]);
        out.status.success()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !alive(&daemon) {
        assert!(std::time::Instant::now() < deadline, "the sleeper never started");
        std::thread::sleep(Duration::from_millis(200));
    }
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(sleeper.id() as i32), Signal::SIGINT).expect("interrupt");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while alive(&daemon) {
        assert!(std::time::Instant::now() < deadline, "the guest process outlived the interrupted CLI");
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut sleeper = sleeper;
    let _ = sleeper.wait();
    assert!(daemon.banger(&["vm", "delete", "flood"]).status.success());
}

#[test]
fn files_copied_into_and_back_out_of_a_guest_are_byte_identical_with_their_mode_even_at_200_mib() {
    let _slot = guest_slot();
    let daemon = Daemon::start(&[]);
    let work = tempfile::tempdir().expect("tempdir");
    let out = daemon.banger(&["vm", "create", "--name", "files", "--memory", "512"]);
    assert!(out.status.success(), "{}", text(&out.stderr));

    // A small executable script: its mode travels with it and it runs in the guest.
    let script = work.path().join("hello.sh");
    std::fs::write(&script, "#!/bin/sh\necho hello from a copied script\n").expect("script");
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o750)).expect("chmod");
    let out = daemon.banger(&["vm", "cp", &script.display().to_string(), "files:/root/hello.sh"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = daemon.banger(&["vm", "exec", "files", "--", "/root/hello.sh"]);
    assert_eq!(text(&out.stdout), "hello from a copied script\n", "{}", text(&out.stderr));
    let out = daemon.banger(&["vm", "exec", "files", "--", "stat", "-c", "%a", "/root/hello.sh"]);
    assert_eq!(text(&out.stdout).trim(), "750");

    // 200 MiB of random bytes in and back out (into the guest's disk: /tmp is RAM).
    let big = work.path().join("big.bin");
    let made = Command::new("head").args(["-c", "209715200", "/dev/urandom"]).output().expect("head");
    std::fs::write(&big, &made.stdout).expect("big file");
    let out = daemon.banger(&["vm", "cp", &big.display().to_string(), "files:/root/big.bin"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("209715200 bytes"), "{}", text(&out.stdout));
    let back = work.path().join("back.bin");
    let out = daemon.banger(&["vm", "cp", "files:/root/big.bin", &back.display().to_string()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(sha256(&back), sha256(&big), "the round trip changed the file");
    let out = daemon.banger(&["vm", "exec", "files", "--", "sha256sum", "/root/big.bin"]);
    assert!(text(&out.stdout).starts_with(&sha256(&big)), "the guest's copy differs");

    // Errors name the problem with the right code, and leave nothing behind.
    let out = daemon.banger(&["vm", "cp", "files:/no/such/file", &work.path().join("x").display().to_string()]);
    assert!(text(&out.stderr).contains("NOT_FOUND"), "{}", text(&out.stderr));
    assert!(!work.path().join("x").exists());
    let out = daemon.banger(&["vm", "cp", &script.display().to_string(), "files:/no/such/dir/x"]);
    assert!(text(&out.stderr).contains("NOT_FOUND"), "{}", text(&out.stderr));
    let out = daemon.banger(&["vm", "cp", &script.display().to_string(), "files:relative"]);
    assert!(!out.status.success(), "a relative guest path is refused");
    let out = daemon.banger(&["vm", "exec", "files", "--", "sh", "-c", "ls -a /root | grep -c banger || true"]);
    assert_eq!(text(&out.stdout).trim(), "0", "a temporary file was left in the guest");
    assert!(daemon.banger(&["vm", "delete", "files"]).status.success());
}

#[test]
fn a_vms_console_log_is_printed_tailed_and_followed_until_the_vm_is_deleted() {
    let _slot = guest_slot();
    let daemon = Daemon::start(&[]);
    let out = daemon.banger(&["vm", "create", "--name", "logged"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let whole = text(&daemon.banger(&["vm", "logs", "logged"]).stdout);
    assert!(whole.contains("serving banger.agent.v1"), "the agent's announcement is on the console:\n{whole}");
    let tail = daemon.banger(&["vm", "logs", "logged", "--tail", "64"]).stdout;
    assert!(tail.len() <= 64 && whole.as_bytes().ends_with(&tail), "--tail 64 gave {} bytes", tail.len());
    assert!(daemon.banger(&["vm", "logs", "logged", "--vmm"]).status.success());

    let follower = daemon.banger_follow(&["vm", "logs", "logged", "--follow", "--tail", "1"]);
    // The last byte of the log comes first: from then on the log is followed.
    follower.wait_for_bytes(1, Duration::from_secs(10));
    let out = daemon.banger(&["vm", "exec", "logged", "--", "sh", "-c", "echo FOLLOW-MARK > /dev/console"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    follower.wait_for("FOLLOW-MARK", Duration::from_secs(10));
    // Deleting the VM ends the follow by itself.
    assert!(daemon.banger(&["vm", "delete", "logged"]).status.success());
    let (status, _, stderr) = follower.finish();
    assert!(status.success(), "{stderr}");
}

/// The guest's counter (a loop bumping `/tmp/ticks` every 0.1 s, by rename: a reader never
/// finds it empty).
fn ticks(daemon: &Daemon, vm: &str) -> u64 {
    let out = daemon.banger(&["vm", "exec", vm, "--", "cat", "/tmp/ticks"]);
    let said = text(&out.stdout);
    said.trim().parse().unwrap_or_else(|_| panic!("ticks: {said:?} {}", text(&out.stderr)))
}

#[test]
fn a_paused_vm_stands_still_across_a_daemon_kill_and_resumes_where_it_stopped() {
    let _slot = guest_slot();
    let mut daemon = Daemon::start(&[]);
    assert!(daemon.banger(&["vm", "create", "--name", "frozen"]).status.success(), "{}", daemon.log());
    let counter = "i=0; while :; do i=$((i+1)); echo $i > /tmp/ticks.new; mv /tmp/ticks.new /tmp/ticks; sleep 0.1; done >/dev/null 2>&1 &";
    let out = daemon.banger(&["vm", "exec", "frozen", "--", "sh", "-c", counter]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    wait_until("the counter to run", Duration::from_secs(20), || ticks(&daemon, "frozen") >= 5);
    let pid = vm_field(&daemon, "frozen", "vmm pid");

    // Not while a call is in flight: it would be cut off.
    let mut sleeper = daemon.banger_spawn(&["vm", "exec", "frozen", "--", "sleep", "3"]);
    std::thread::sleep(Duration::from_secs(1));
    let out = daemon.banger(&["vm", "pause", "frozen"]);
    let said = text(&out.stderr);
    assert!(!out.status.success() && said.contains("FAILED_PRECONDITION") && said.contains("AGENT_BUSY"), "{said}");
    assert_eq!(vm_field(&daemon, "frozen", "state"), "running");
    assert!(sleeper.wait().expect("exec").success(), "the exec ran on");

    let before = ticks(&daemon, "frozen");
    let out = daemon.banger(&["vm", "pause", "frozen"]);
    assert!(out.status.success() && text(&out.stdout).contains("paused"), "{}", text(&out.stderr));
    let paused_at = std::time::Instant::now();
    assert_eq!(vm_field(&daemon, "frozen", "state"), "paused");
    let out = daemon.banger(&["vm", "list", "--state", "paused"]);
    assert!(text(&out.stdout).contains("frozen"), "{}", text(&out.stdout));
    let out = daemon.banger(&["vm", "exec", "frozen", "--", "true"]);
    let said = text(&out.stderr);
    assert!(!out.status.success() && said.contains("FAILED_PRECONDITION") && said.contains("paused"), "{said}");

    // A daemon killed while the VM is paused adopts it paused: same VMM, still frozen.
    daemon.signal(Signal::SIGKILL);
    daemon.restart();
    assert_eq!(vm_field(&daemon, "frozen", "state"), "paused");
    assert_eq!(vm_field(&daemon, "frozen", "vmm pid"), pid);
    std::thread::sleep(Duration::from_secs(4).saturating_sub(paused_at.elapsed()));

    let out = daemon.banger(&["vm", "resume", "frozen"]);
    assert!(out.status.success() && text(&out.stdout).contains("running"), "{}", text(&out.stderr));
    let frozen_for = paused_at.elapsed();
    let after = ticks(&daemon, "frozen");
    // Running, the loop would have counted ~10 per second of the pause; frozen, it counted
    // only during the exec calls around it.
    assert!(
        after >= before && after - before < 15,
        "paused {frozen_for:?}: ticks {before} -> {after} (a running guest counts ~{})",
        frozen_for.as_secs() * 10
    );
    wait_until("the counter to go on", Duration::from_secs(20), || ticks(&daemon, "frozen") >= after + 5);

    // A paused VM stops and is deleted like a running one.
    assert!(daemon.banger(&["vm", "pause", "frozen"]).status.success());
    let out = daemon.banger(&["vm", "stop", "frozen"]);
    assert!(out.status.success() && text(&out.stdout).contains("stopped"), "{}", text(&out.stderr));
    assert!(daemon.banger(&["vm", "delete", "frozen"]).status.success());
    wait_until("every guest process to go", Duration::from_secs(10), || daemon.guest_processes().is_empty());
}

/// The names of a pool's members that are running, from `pool show`.
fn ready_members(daemon: &Daemon, pool: &str) -> Vec<String> {
    let out = daemon.banger(&["pool", "show", pool]);
    let shown = text(&out.stdout);
    let members = shown.split_once("members:\n").map(|(_, rest)| rest).unwrap_or_default();
    members
        .lines()
        .filter(|line| line.split_whitespace().nth(2) == Some("running"))
        .filter_map(|line| line.split_whitespace().next().map(str::to_owned))
        .collect()
}

fn wait_ready_members(daemon: &Daemon, pool: &str, count: usize) -> Vec<String> {
    let mut members = Vec::new();
    wait_until("the pool to fill", Duration::from_secs(120), || {
        members = ready_members(daemon, pool);
        members.len() == count
    });
    members
}

#[test]
fn a_warm_pool_serves_creates_by_claims_that_take_the_new_name_refills_and_survives_a_daemon_kill() {
    let _slot = guest_slot();
    let mut daemon = Daemon::start(&[]);
    let out = daemon.banger(&["pool", "create", "warm", "--size", "2"]);
    assert!(out.status.success(), "{}\n{}", text(&out.stderr), daemon.log());
    let members = wait_ready_members(&daemon, "warm", 2);
    let out = daemon.banger(&["pool", "show", "warm"]);
    assert!(text(&out.stdout).contains(" MiB"), "members' memory shown: {}", text(&out.stdout));
    let member_pids: Vec<String> = members.iter().map(|m| vm_field(&daemon, m, "vmm pid")).collect();
    // Each member was warmed up (told its own name, one exec) before it counted as ready.
    let log = daemon.log();
    for member in &members {
        let warmed = log
            .lines()
            .any(|line| line.contains("\"stage\":\"warm_up\"") && line.contains(&format!("\"vm_name\":\"{member}\"")));
        assert!(warmed, "no warm_up stage for {member}:\n{log}");
    }
    assert!(!log.contains("pool member warm-up"), "a warm-up failed:\n{log}");

    for name in ["first", "second"] {
        let out = daemon.banger(&["vm", "create", "--name", name]);
        let stages = text(&out.stderr);
        assert!(out.status.success(), "{stages}");
        assert!(stages.contains("pool_claim") && !stages.contains("vmm_boot"), "claimed, not booted: {stages}");
        assert!(member_pids.contains(&vm_field(&daemon, name, "vmm pid")), "a member's vmm serves {name}");
        let out = daemon.banger(&["vm", "exec", name, "--", "sh", "-c", "hostname; cat /etc/hostname"]);
        assert_eq!(text(&out.stdout), format!("{name}\n{name}\n"), "{}", text(&out.stderr));
    }
    // Another shape boots as always.
    let out = daemon.banger(&["vm", "create", "--name", "cold", "--memory", "320"]);
    assert!(out.status.success() && text(&out.stderr).contains("vmm_boot"), "{}", text(&out.stderr));

    let refilled = wait_ready_members(&daemon, "warm", 2);
    assert!(refilled.iter().all(|m| !members.contains(m)), "new members: {refilled:?} after {members:?}");
    let refilled_pids: Vec<String> = refilled.iter().map(|m| vm_field(&daemon, m, "vmm pid")).collect();

    // Members survive a daemon kill: adopted, same processes, still claimable.
    daemon.signal(Signal::SIGKILL);
    daemon.restart();
    assert_eq!(ready_members(&daemon, "warm"), refilled);
    let pids: Vec<String> = refilled.iter().map(|m| vm_field(&daemon, m, "vmm pid")).collect();
    assert_eq!(pids, refilled_pids);
    let out = daemon.banger(&["vm", "create", "--name", "third"]);
    assert!(out.status.success() && text(&out.stderr).contains("pool_claim"), "{}", text(&out.stderr));

    // Deleting the pool deletes its unclaimed members; claimed VMs stay.
    let out = daemon.banger(&["pool", "delete", "warm"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = daemon.banger(&["vm", "list"]);
    let listed = text(&out.stdout);
    assert!(!listed.contains("warm-"), "unclaimed members left: {listed}");
    for vm in ["first", "second", "third", "cold"] {
        assert!(listed.contains(vm), "{vm} missing: {listed}");
        assert!(daemon.banger(&["vm", "delete", vm]).status.success());
    }
    wait_until("every guest process to go", Duration::from_secs(20), || daemon.guest_processes().is_empty());
}

#[test]
fn over_the_virtio_serial_channel_a_guest_execs_copies_pauses_restarts_and_survives_a_daemon_kill() {
    let _slot = guest_slot();
    let work = tempfile::tempdir().expect("tempdir");
    let config = work.path().join("config.toml");
    std::fs::write(&config, "agent_channel = \"virtio-serial\"\n").expect("config");
    let mut daemon = Daemon::start(&["--config", &config.display().to_string()]);
    let out = daemon.banger(&["vm", "create", "--name", "serial"]);
    assert!(out.status.success(), "{}\n{}", text(&out.stderr), daemon.log());
    // One process: QEMU serves the port itself, no vsock backend runs.
    let processes = daemon.guest_processes();
    assert_eq!(processes.len(), 1, "{processes:?}");
    assert!(processes[0].1.contains("virtserialport") && !processes[0].1.contains("vhost-user"), "{processes:?}");
    let out = daemon.banger(&["vm", "exec", "serial", "--", "cat", "/etc/hostname"]);
    assert_eq!(text(&out.stdout), "serial\n", "{}", text(&out.stderr));

    // Streams both ways through the one port: 4 MiB in, its digest out, and concurrent calls.
    let payload: Vec<u8> = (0..4u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let sent = work.path().join("payload");
    std::fs::write(&sent, &payload).expect("payload");
    let out = daemon.banger_with_stdin(&["vm", "exec", "-i", "serial", "--", "sha256sum"], Some(&payload));
    assert_eq!(text(&out.stdout).split_whitespace().next(), Some(sha256(&sent).as_str()), "{}", text(&out.stderr));
    let sleepers: Vec<_> = (0..3)
        .map(|_| daemon.banger_piped(&["vm", "exec", "serial", "--", "sh", "-c", "sleep 1; echo done"]))
        .collect();
    for sleeper in sleepers {
        let out = sleeper.wait_with_output().expect("exec");
        assert_eq!(text(&out.stdout), "done\n", "{}", text(&out.stderr));
    }

    // Paused, its daemon killed: resumed by the next daemon, the channel answers.
    assert!(daemon.banger(&["vm", "pause", "serial"]).status.success());
    daemon.signal(Signal::SIGKILL);
    daemon.restart();
    assert!(daemon.banger(&["vm", "resume", "serial"]).status.success());
    let out = daemon.banger(&["vm", "exec", "serial", "--", "echo", "thawed"]);
    assert_eq!(text(&out.stdout), "thawed\n", "{}", text(&out.stderr));

    // Stopped and started again: QEMU serves the socket anew.
    assert!(daemon.banger(&["vm", "stop", "serial"]).status.success());
    assert!(daemon.banger(&["vm", "start", "serial"]).status.success(), "{}", daemon.log());
    let out = daemon.banger(&["vm", "exec", "serial", "--", "echo", "again"]);
    assert_eq!(text(&out.stdout), "again\n", "{}", text(&out.stderr));
    assert!(daemon.banger(&["vm", "delete", "serial"]).status.success());
    wait_until("every guest process to go", Duration::from_secs(10), || daemon.guest_processes().is_empty());
}

#[test]
fn vm_defaults_in_the_config_shape_what_a_create_makes_and_are_shown() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("config.toml");
    std::fs::write(&config, "[vm_defaults]\nvcpus = 2\nmemory_mib = 320\ndisk_size = \"3G\"\n").expect("config");
    let daemon = Daemon::start(&["--config", &config.display().to_string()]);
    let out = daemon.banger(&["vm", "create", "--no-start", "--name", "shaped"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(vm_field(&daemon, "shaped", "vcpus"), "2");
    assert_eq!(vm_field(&daemon, "shaped", "memory"), "320 MiB");
    assert_eq!(vm_field(&daemon, "shaped", "disk size"), "3072 MiB");
    // What a request says wins; a default disk smaller than an image's is the image's.
    let out = daemon.banger(&["vm", "create", "--no-start", "--name", "given", "--vcpus", "1", "--memory", "128"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        (vm_field(&daemon, "given", "vcpus"), vm_field(&daemon, "given", "memory")),
        ("1".into(), "128 MiB".into())
    );

    let help = text(&daemon.banger(&["vm", "create", "--help"]).stdout);
    assert!(help.contains("[default: 2, bangerd's vm_defaults]"), "{help}");
    assert!(help.contains("[default: 320, bangerd's vm_defaults]"), "{help}");
    assert!(help.contains("[default: 3072M, or the image's size when bigger, bangerd's vm_defaults]"), "{help}");
    let doctor = text(&daemon.banger(&["doctor"]).stdout);
    assert!(
        doctor.contains("new VMs get (vm_defaults): 2 vCPUs, 320 MiB of memory, a disk of at least 3072 MiB"),
        "{doctor}"
    );

    // A config with an impossible default does not start.
    std::fs::write(&config, "[vm_defaults]\nvcpus = 0\n").expect("config");
    let out = Command::new(banger_tests::bin_dir().join("bangerd"))
        .args(["--config", &config.display().to_string(), "--state-dir", &dir.path().join("s").display().to_string()])
        .args(["--socket", &dir.path().join("s.sock").display().to_string()])
        .output()
        .expect("bangerd");
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("vm_defaults.vcpus"), "{}", text(&out.stderr));
}

#[test]
fn the_default_image_is_debian_with_what_a_job_expects_and_busybox_stays_by_name() {
    let _slot = guest_slot();
    let debian = banger_tests::debian_image_dir().display().to_string();
    let daemon = Daemon::start(&["--default-image-dir", &debian]);
    let script = "cat /etc/debian_version; git --version; curl --version | head -n1; \
                  for tool in vi less ps ip ping update-ca-certificates apt-get; do command -v $tool >/dev/null || echo missing $tool; done; \
                  echo shell=$(getent passwd root | cut -d: -f7)";
    let out = daemon.banger(&["vm", "run", "--rm", "--", "sh", "-c", script]);
    assert_eq!(out.status.code(), Some(0), "{}\n{}", text(&out.stderr), daemon.log());
    let stdout = text(&out.stdout);
    assert!(stdout.starts_with("12."), "not Debian 12: {stdout}");
    assert!(stdout.contains("\ngit version 2.") && stdout.contains("\ncurl 7."), "{stdout}");
    assert!(!stdout.contains("missing"), "{stdout}");
    assert!(stdout.contains("shell=/bin/bash"), "{stdout}");
    // The agent is init: no systemd on the way to ready.
    let out = daemon.banger(&["vm", "run", "--rm", "--", "cat", "/proc/1/comm"]);
    assert_eq!(text(&out.stdout), "banger-agent\n", "{}", text(&out.stderr));

    // The busybox image, installed beside it, by name.
    let out = daemon.banger(&["vm", "run", "--rm", "--image", "busybox", "--", "sh", "-c", "busybox | head -n1"]);
    assert!(text(&out.stdout).starts_with("BusyBox v1."), "{}{}", text(&out.stdout), text(&out.stderr));
    let images = text(&daemon.banger(&["image", "list"]).stdout);
    assert!(images.contains("default") && images.contains("busybox"), "{images}");
}
