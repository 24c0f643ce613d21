//! The guest agent serves only the daemon: every call on every channel carries the VM's key,
//! given to the guest out of band (an archive before the image's initramfs, never the kernel
//! command line), a new one for every boot and for every clone of a snapshot. Real bangerd
//! processes and QEMU guests; the calls a stranger would make are made with the daemon's own
//! agent client, with no key, a wrong key and a stale one. Needs `make setup`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use banger_server::host::agent::{AgentClient, AgentError};
use banger_server::host::agent_key::{self, AgentKey};
use banger_tests::{Daemon, guest_slot, text};

const SERIAL: &str = "agent_channel = \"virtio-serial\"\n";

fn vm_field(daemon: &Daemon, vm: &str, name: &str) -> String {
    let out = daemon.banger(&["vm", "show", vm]);
    let prefix = format!("{name}:");
    text(&out.stdout)
        .lines()
        .find_map(|line| line.strip_prefix(&prefix).map(|v| v.trim().to_owned()))
        .unwrap_or_else(|| panic!("no {name} for {vm}: {}{}\n{}", text(&out.stdout), text(&out.stderr), daemon.log()))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime")
}

/// The VM's agent client over the channel the daemon uses, with `key`.
fn client(vm_dir: &Path, serial: bool, key: Option<AgentKey>) -> AgentClient {
    match serial {
        true => AgentClient::new_serial(vm_dir.join("agent.sock"), key),
        false => AgentClient::new(vm_dir.join("vsock.sock"), key),
    }
}

/// What an Info call with `key` gets: the hostname, or the status code it was refused with.
fn info(vm_dir: &Path, serial: bool, key: Option<AgentKey>) -> Result<String, tonic::Code> {
    until_the_port_is_free(|| {
        runtime().block_on(async {
            match client(vm_dir, serial, key.clone()).info().await {
                Ok(info) => Ok(info.hostname),
                Err(AgentError::Rpc { status, .. }) => Err(status.code()),
                Err(other) => panic!("Info failed otherwise than by a status: {other}"),
            }
        })
    })
}

/// What an Exec of `true` with `key` gets: its start, or the status code it was refused with.
fn exec(vm_dir: &Path, serial: bool, key: Option<AgentKey>) -> Result<(), tonic::Code> {
    until_the_port_is_free(|| runtime().block_on(async { exec_with(client(vm_dir, serial, key.clone())).await }))
}

/// Makes `call` again while it finds no agent (UNAVAILABLE): a virtio-serial port takes the
/// next connection once the guest has seen the last one end, a few milliseconds after it did.
fn until_the_port_is_free<T>(call: impl Fn() -> Result<T, tonic::Code>) -> Result<T, tonic::Code> {
    let mut tries = 0;
    loop {
        match call() {
            Err(tonic::Code::Unavailable) if tries < 20 => tries += 1,
            answered => return answered,
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A virtio-serial port takes one connection at a time, and the daemon keeps its own open
/// after a call: a pause closes it (the daemon quiesces the agent), and the port is free
/// until the daemon's next call.
fn free_the_port(daemon: &Daemon, vm: &str) {
    assert!(daemon.banger(&["vm", "pause", vm]).status.success(), "{}", daemon.log());
    assert!(daemon.banger(&["vm", "resume", vm]).status.success(), "{}", daemon.log());
}

async fn exec_with(client: AgentClient) -> Result<(), tonic::Code> {
    use banger_proto::agent::v1::{ExecRequest, ExecStart, exec_request};
    let start = ExecRequest {
        payload: Some(exec_request::Payload::Start(ExecStart { argv: vec!["true".into()], ..Default::default() })),
    };
    match client.exec(tokio_stream::iter([start])).await {
        Ok(_) => Ok(()),
        Err(AgentError::Rpc { status, .. }) => Err(status.code()),
        Err(other) => panic!("Exec failed otherwise than by a status: {other}"),
    }
}

fn key_in(path: &Path) -> AgentKey {
    agent_key::read(path).expect("a key file of root's").unwrap_or_else(|| panic!("no key at {}", path.display()))
}

/// Refusals of calls with no key and a random one, and the same calls answered with the VM's
/// key (so the refusals are the key's doing); `banger vm exec` works.
fn only_the_vms_key_is_served(daemon: &Daemon, vm: &str, serial: bool) -> AgentKey {
    let vm_dir = PathBuf::from(vm_field(daemon, vm, "vm dir"));
    if serial {
        free_the_port(daemon, vm);
    }
    let key = key_in(&vm_dir.join("agent.key"));
    let stranger = AgentKey::generate().expect("a key");
    assert_eq!(info(&vm_dir, serial, None), Err(tonic::Code::Unauthenticated), "{vm}: Info without a key");
    assert_eq!(info(&vm_dir, serial, Some(stranger.clone())), Err(tonic::Code::Unauthenticated), "{vm}: wrong key");
    assert_eq!(exec(&vm_dir, serial, None), Err(tonic::Code::Unauthenticated), "{vm}: Exec without a key");
    assert_eq!(exec(&vm_dir, serial, Some(stranger)), Err(tonic::Code::Unauthenticated), "{vm}: Exec, wrong key");
    assert_eq!(info(&vm_dir, serial, Some(key.clone())), Ok(vm.to_owned()), "{vm}: Info with the VM's key");
    eprintln!("{vm} ({}): Info and Exec without a key and with a wrong one: UNAUTHENTICATED", channel(serial));
    let out = daemon.banger(&["vm", "exec", vm, "--", "echo", "served"]);
    assert_eq!(text(&out.stdout), "served\n", "{}", text(&out.stderr));
    key
}

fn channel(serial: bool) -> &'static str {
    if serial { "virtio-serial" } else { "vhost-user-vsock" }
}

/// The key reaches the guest out of band: not on any command line, in an initramfs only the
/// VM's own uid may read.
fn the_key_is_out_of_band(daemon: &Daemon, vm: &str, key: &AgentKey) {
    use std::os::unix::fs::MetadataExt;
    let vm_dir = PathBuf::from(vm_field(daemon, vm, "vm dir"));
    for (pid, command_line) in banger_tests::processes_mentioning(&vm_dir.display().to_string()) {
        assert!(!command_line.contains(&key.hex()), "pid {pid}'s command line holds the key: {command_line}");
    }
    let initrd = std::fs::metadata(vm_dir.join("initrd.img")).expect("the boot's initramfs");
    let key_file = std::fs::metadata(vm_dir.join("agent.key")).expect("the daemon's key");
    assert_eq!((initrd.mode() & 0o777, key_file.mode() & 0o777, key_file.uid()), (0o400, 0o600, 0));
    assert_ne!(initrd.uid(), 0, "the VMM's own uid reads its initramfs");
}

#[test]
fn over_vhost_user_vsock_the_agent_serves_only_the_vms_key_and_a_new_boot_retires_the_old() {
    let _slot = guest_slot();
    let daemon = Daemon::start(&[]);
    let out = daemon.banger(&["vm", "create", "--name", "keyed"]);
    assert!(out.status.success(), "{}\n{}", text(&out.stderr), daemon.log());
    let vm_dir = PathBuf::from(vm_field(&daemon, "keyed", "vm dir"));
    let first = only_the_vms_key_is_served(&daemon, "keyed", false);
    the_key_is_out_of_band(&daemon, "keyed", &first);

    // A new boot, a new key: the last one is refused.
    assert!(daemon.banger(&["vm", "stop", "keyed"]).status.success());
    assert!(daemon.banger(&["vm", "start", "keyed"]).status.success(), "{}", daemon.log());
    let second = only_the_vms_key_is_served(&daemon, "keyed", false);
    assert_ne!(first, second, "every boot has its own key");
    assert_eq!(info(&vm_dir, false, Some(first)), Err(tonic::Code::Unauthenticated), "the last boot's key");
    assert!(daemon.banger(&["vm", "delete", "keyed"]).status.success());
}

#[test]
fn over_virtio_serial_a_clone_is_served_only_its_own_key_never_its_sources() {
    let _slot = guest_slot();
    let work = tempfile::tempdir().expect("tempdir");
    let config = work.path().join("config.toml");
    std::fs::write(&config, SERIAL).expect("config");
    let daemon = Daemon::start(&["--config", &config.display().to_string()]);
    let out = daemon.banger(&["vm", "create", "--name", "source"]);
    assert!(out.status.success(), "{}\n{}", text(&out.stderr), daemon.log());
    let source_key = only_the_vms_key_is_served(&daemon, "source", true);
    the_key_is_out_of_band(&daemon, "source", &source_key);

    let out = daemon.banger(&["vm", "snapshot", "source", "base"]);
    assert!(out.status.success(), "{}\n{}", text(&out.stderr), daemon.log());
    let snapshots = daemon.state_dir().join("snapshots");
    let snapshot_dir = std::fs::read_dir(&snapshots).expect("snapshots").flatten().next().expect("one").path();
    let saved = key_in(&snapshot_dir.join("agent.key"));
    assert_eq!(saved, source_key, "the snapshot keeps the key its memory's agent holds");
    {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(snapshot_dir.join("agent.key")).expect("stat");
        assert_eq!((meta.uid(), meta.gid(), meta.mode() & 0o777), (0, 0, 0o600), "not the snapshot group's");
    }

    let out = daemon.banger(&["vm", "create", "--name", "clone", "--snapshot", "base"]);
    assert!(out.status.success(), "{}\n{}", text(&out.stderr), daemon.log());
    let clone_dir = PathBuf::from(vm_field(&daemon, "clone", "vm dir"));
    let clone_key = only_the_vms_key_is_served(&daemon, "clone", true);
    assert_ne!(clone_key, source_key, "a clone gets a key of its own");
    free_the_port(&daemon, "clone");
    assert_eq!(
        info(&clone_dir, true, Some(source_key.clone())),
        Err(tonic::Code::Unauthenticated),
        "the clone refuses its source's key"
    );
    assert_eq!(exec(&clone_dir, true, Some(source_key.clone())), Err(tonic::Code::Unauthenticated));
    // The identity line on the port too.
    let refused = runtime().block_on(async {
        let identity = banger_server::domain::GuestIdentity::hostname("taken");
        let stale = AgentClient::new_serial(clone_dir.join("agent.sock"), Some(source_key.clone()));
        stale.wait_set_identity(&identity, None, tokio::time::Instant::now() + Duration::from_secs(10), || true).await
    });
    match refused {
        Err(AgentError::Rpc { status, .. }) => assert_eq!(status.code(), tonic::Code::Unauthenticated),
        other => panic!("an identity line with the source's key was not refused: {other:?}"),
    }
    let out = daemon.banger(&["vm", "exec", "clone", "--", "hostname"]);
    assert_eq!(text(&out.stdout), "clone\n", "its name is its own: {}", text(&out.stderr));
    eprintln!("clone (virtio-serial): its source's key on Info, Exec and an identity line: UNAUTHENTICATED");

    // The source runs on after its snapshot with a new key too: clones' VMMs read the memory
    // that holds the old one.
    let source_dir = PathBuf::from(vm_field(&daemon, "source", "vm dir"));
    let resumed = only_the_vms_key_is_served(&daemon, "source", true);
    assert_ne!(resumed, source_key, "the source took a new key when it ran on");
    free_the_port(&daemon, "source");
    assert_eq!(info(&source_dir, true, Some(source_key)), Err(tonic::Code::Unauthenticated));
    for vm in ["clone", "source"] {
        assert!(daemon.banger(&["vm", "delete", vm]).status.success());
    }
    assert!(daemon.banger(&["snapshot", "delete", "base"]).status.success(), "{}", daemon.log());
}

/// Kernel vsock is open to every local user: one who is not root calls the agent of a VM
/// by its CID and is refused. Runs where the host has `/dev/vhost-vsock`.
#[test]
fn over_kernel_vsock_a_local_user_who_is_not_root_is_refused_and_the_daemon_is_served() {
    if let Ok(cid) = std::env::var(STRANGER_CID) {
        // The re-executed test, as uid 65534: its refusals are its exit code.
        return stranger(cid.parse().expect("a cid"));
    }
    if !Path::new("/dev/vhost-vsock").exists() {
        banger_tests::skip(
            "this host has no kernel vhost-vsock (/dev/vhost-vsock is missing): bangerd uses the user-space \
             backend here, whose socket only root and the VM's uid can open (tested above)",
        );
        return;
    }
    let _slot = guest_slot();
    let daemon = Daemon::start(&[]);
    let out = daemon.banger(&["vm", "create", "--name", "kernel"]);
    assert!(out.status.success(), "{}\n{}", text(&out.stderr), daemon.log());
    let vsock = vm_field(&daemon, "kernel", "vsock");
    let cid = vsock.rsplit("cid ").next().and_then(|c| c.trim_end_matches(')').parse::<u32>().ok()).expect("cid");
    use std::os::unix::process::CommandExt;
    let status = std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", "over_kernel_vsock_a_local_user_who_is_not_root_is_refused_and_the_daemon_is_served"])
        .env(STRANGER_CID, cid.to_string())
        .uid(65534)
        .gid(65534)
        .status()
        .expect("the test as uid 65534");
    assert!(status.success(), "uid 65534 was served by the agent of cid {cid}");
    let out = daemon.banger(&["vm", "exec", "kernel", "--", "echo", "served"]);
    assert_eq!(text(&out.stdout), "served\n", "{}", text(&out.stderr));
    assert!(daemon.banger(&["vm", "delete", "kernel"]).status.success());
}

const STRANGER_CID: &str = "BANGER_TEST_STRANGER_CID";

fn stranger(cid: u32) {
    runtime().block_on(async {
        let client = AgentClient::new_kernel_vsock(cid, None);
        match client.info().await {
            Err(AgentError::Rpc { status, .. }) if status.code() == tonic::Code::Unauthenticated => {}
            other => panic!("Info as a stranger: {other:?}"),
        }
        let guess = AgentClient::new_kernel_vsock(cid, Some(AgentKey::generate().expect("key")));
        match guess.info().await {
            Err(AgentError::Rpc { status, .. }) if status.code() == tonic::Code::Unauthenticated => {}
            other => panic!("Info with a guessed key: {other:?}"),
        }
        assert_eq!(exec_with(client).await, Err(tonic::Code::Unauthenticated), "Exec as a stranger");
    });
}
