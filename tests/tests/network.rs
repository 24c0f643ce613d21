//! VM networking end to end, inside a network namespace the test creates: two guests on
//! the bridge get distinct addresses, reach each other (also by their `<vm>.vm` names), a
//! server on the bridge address only when their egress policy names it, never the host's
//! other addresses, and nothing with a spoofed address or MAC;
//! NAT rules live exactly as long as their VM; a crash of the daemon and a VMM leaves
//! nothing of the dead VM behind once the daemon restarts. Needs `make setup`.

use std::{
    process::{Child, Command, Stdio},
    time::Duration,
};

use banger_tests::{Daemon, TestNetns, guest_slot, text};
use nix::{sys::signal::Signal, unistd::Pid};

/// A process killed (by PID) and reaped when dropped.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn show(daemon: &Daemon, vm: &str, field: &str) -> String {
    let out = daemon.banger(&["vm", "show", vm]);
    let prefix = format!("{field}:");
    text(&out.stdout)
        .lines()
        .find_map(|line| line.strip_prefix(&prefix).map(|v| v.trim().to_owned()))
        .unwrap_or_else(|| panic!("no {field} for {vm}: {}\n{}", text(&out.stderr), daemon.log()))
}

#[test]
fn guests_on_the_bridge_reach_each_other_and_the_host_and_crashes_leave_no_tap_or_rule() {
    let _slot = guest_slot();
    let netns = TestNetns::new();
    let config_dir = tempfile::tempdir().expect("config dir");
    let config = config_dir.path().join("config.toml");
    std::fs::write(&config, "bridge = \"bgbr0\"\nbridge_cidr = \"172.31.99.0/24\"\nnat = true\n").expect("config");
    let mut daemon = Daemon::start_in_netns(&netns.0, &["--config", &config.display().to_string()]);

    // Addresses of the host standing in for a private network and the cloud metadata
    // service (on its loopback: this kernel has no dummy interfaces; local all the same).
    for address in ["10.250.0.1/24", "169.254.169.254/32"] {
        let added = Command::new("ip").args(["-n", &netns.0, "addr", "add", address, "dev", "lo"]).status();
        assert!(added.expect("ip").success(), "{address}");
    }
    // net-a may reach the host's server on the bridge address and the private network;
    // net-b has the default policy: the public internet only.
    let egress = [("net-a", Some("172.31.99.1,10.250.0.0/24")), ("net-b", None)];
    for (vm, allow) in egress {
        let mut args = vec!["vm", "create", "--name", vm];
        args.extend(allow.map(|allow| ["--egress", allow]).into_iter().flatten());
        let out = daemon.banger(&args);
        assert!(out.status.success(), "{vm}: {}\n{}", text(&out.stderr), daemon.log());
    }
    assert_eq!(show(&daemon, "net-a", "egress"), "172.31.99.1/32,10.250.0.0/24");
    assert_eq!(show(&daemon, "net-b", "egress"), "internet");
    let (ip_a, ip_b) = (show(&daemon, "net-a", "ip"), show(&daemon, "net-b", "ip"));
    assert_ne!(ip_a, ip_b);
    assert!(ip_a.starts_with("172.31.99.") && ip_b.starts_with("172.31.99."), "{ip_a} {ip_b}");

    // A server on the bridge address, inside the namespace.
    let site = tempfile::tempdir().expect("site");
    std::fs::write(site.path().join("hello.txt"), "hello from the bridge\n").expect("page");
    let _server = Reaped(
        Command::new("ip")
            .args(["netns", "exec", &netns.0, "python3", "-m", "http.server", "8080", "--bind", "172.31.99.1"])
            .current_dir(site.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("http server"),
    );
    banger_tests::wait_until("the http server to listen", Duration::from_secs(10), || {
        let probe = "import socket; socket.create_connection(('172.31.99.1', 8080), 1)";
        Command::new("ip").args(["netns", "exec", &netns.0, "python3", "-c", probe]).status().is_ok_and(|s| s.success())
    });

    for (from, to) in [("net-a", &ip_b), ("net-b", &ip_a)] {
        let out = daemon.banger(&["vm", "exec", from, "--", "ping", "-c", "1", "-W", "5", to]);
        assert_eq!(out.status.code(), Some(0), "{from} -> {to}: {}{}", text(&out.stdout), text(&out.stderr));
    }
    let out =
        daemon.banger(&["vm", "exec", "net-a", "--", "wget", "-q", "-O", "-", "http://172.31.99.1:8080/hello.txt"]);
    assert_eq!(text(&out.stdout), "hello from the bridge\n", "{}", text(&out.stderr));
    let reaches = |vm: &str, target: &str| {
        let out = daemon.banger(&["vm", "exec", vm, "--", "ping", "-c", "1", "-W", "2", target]);
        out.status.code() == Some(0)
    };
    // The egress policies: only what net-a's list names answers it; net-b reaches nothing of
    // the host but its DNS, not the private network, not the metadata address.
    assert!(reaches("net-a", "10.250.0.1"), "net-a's allow list names 10.250.0.0/24");
    assert!(!reaches("net-a", "169.254.169.254"), "net-a reached the metadata address");
    for target in ["10.250.0.1", "169.254.169.254", "172.31.99.1"] {
        assert!(!reaches("net-b", target), "net-b reached the host at {target}");
    }
    let out = daemon.banger(&[
        "vm",
        "exec",
        "net-b",
        "--",
        "timeout",
        "3",
        "wget",
        "-q",
        "-O",
        "-",
        "http://172.31.99.1:8080/hello.txt",
    ]);
    // busybox's own wget -T crashes (SIGSEGV): timeout(1) bounds it, and it must have been
    // cut short or refused, not have crashed.
    assert!(!text(&out.stdout).contains("hello"), "net-b reached the host's server");
    assert!(matches!(out.status.code(), Some(1 | 124 | 143)), "net-b's wget: {:?} {}", out.status, text(&out.stderr));
    // A guest sends only from its own address and MAC: spoofed, nothing gets through.
    let spoof = |script: &str| daemon.banger(&["vm", "exec", "net-b", "--", "sh", "-c", script]).status.code();
    assert_eq!(spoof(&format!("ping -c 1 -W 2 {ip_a}")), Some(0), "net-b reaches net-a as itself");
    let other_ip = format!(
        "ip addr add 172.31.99.200/24 dev eth0 && ping -c 1 -W 2 -I 172.31.99.200 {ip_a}; r=$?; ip addr del 172.31.99.200/24 dev eth0; exit $r"
    );
    assert_ne!(spoof(&other_ip), Some(0), "a spoofed source address got through");
    let other_mac = format!(
        "m=$(cat /sys/class/net/eth0/address); ip link set eth0 address 02:00:00:00:00:99 && ping -c 1 -W 2 {ip_a}; r=$?; ip link set eth0 address $m; exit $r"
    );
    assert_ne!(spoof(&other_mac), Some(0), "a spoofed MAC got through");
    assert_eq!(spoof(&format!("ping -c 1 -W 5 {ip_a}")), Some(0), "net-b is itself again");

    // Names: <vm>.vm from the guests (their resolver is bangerd on the bridge, with
    // `search vm`) and from the host; a name nobody has does not exist.
    // busybox's nslookup sends each query once: a UDP answer lost on the way (seen once in
    // a dozen runs under load, the A reply never arriving) fails it, where a resolver would
    // ask again. So does this test, up to three times; every attempt's answer is shown.
    let mut attempts = Vec::new();
    let resolved = (0..3).any(|_| {
        let out = daemon.banger(&["vm", "exec", "net-a", "--", "nslookup", "net-b.vm"]);
        attempts.push(format!("{}{}", text(&out.stdout), text(&out.stderr)));
        text(&out.stdout).contains(&ip_b)
    });
    assert!(resolved, "net-b.vm from net-a: {attempts:#?}");
    let out = daemon.banger(&["vm", "exec", "net-b", "--", "ping", "-c", "1", "-W", "5", "net-a"]);
    assert_eq!(out.status.code(), Some(0), "ping net-a (search vm): {}{}", text(&out.stdout), text(&out.stderr));
    let out = daemon.banger(&["vm", "exec", "net-a", "--", "nslookup", "nobody.vm"]);
    assert_ne!(out.status.code(), Some(0), "nobody.vm resolved: {}", text(&out.stdout));
    let host_lookup = |name: &str| {
        let out = Command::new("ip")
            .args(["netns", "exec", &netns.0, "busybox", "nslookup", name, "172.31.99.1"])
            .output()
            .expect("nslookup");
        (out.status.success(), text(&out.stdout))
    };
    let (found, answer) = host_lookup("net-a.vm");
    assert!(found && answer.contains(&ip_a), "net-a.vm from the host: {answer}");

    // NAT rules exist while their VM does.
    let (id_a, id_b) = (show(&daemon, "net-a", "id"), show(&daemon, "net-b", "id"));
    let (tap_a, tap_b) = (show(&daemon, "net-a", "tap"), show(&daemon, "net-b", "tap"));
    let rules = netns.ruleset();
    assert!(rules.contains(&format!("banger-vm-{id_a}")) && rules.contains(&format!("banger-vm-{id_b}")), "{rules}");
    assert!(rules.contains("banger-forward-guard"), "forwarding turned on for the bridge only: {rules}");
    assert!(netns.has_link(&tap_a) && netns.has_link(&tap_b));

    // The daemon and net-a's VMM die; the next daemon removes net-a's tap and rule.
    let vmm_a: i32 = show(&daemon, "net-a", "vmm pid").parse().expect("pid");
    daemon.signal(Signal::SIGKILL);
    nix::sys::signal::kill(Pid::from_raw(vmm_a), Signal::SIGKILL).expect("kill vmm");
    banger_tests::wait_gone(vmm_a as u32);
    daemon.restart();
    assert_eq!(show(&daemon, "net-a", "state"), "stopped");
    assert!(!netns.has_link(&tap_a), "{tap_a} left behind");
    let rules = netns.ruleset();
    assert!(!rules.contains(&format!("banger-vm-{id_a}")), "rule of the dead vm left: {rules}");
    assert!(rules.contains(&format!("banger-vm-{id_b}")), "the live vm lost its rule: {rules}");
    assert_eq!(show(&daemon, "net-b", "state"), "running");

    for vm in ["net-a", "net-b"] {
        assert!(daemon.banger(&["vm", "delete", vm]).status.success());
    }
    let (found, answer) = host_lookup("net-b.vm");
    assert!(!found && !answer.contains(&ip_b), "a deleted vm's name still resolves: {answer}");
    assert!(!netns.has_link(&tap_b));
    let rules = netns.ruleset();
    assert!(!rules.contains("banger-vm-"), "{rules}");
    // The namespace did not forward before banger's NAT: it does not after the last NAT rule.
    let forward = Command::new("ip")
        .args(["netns", "exec", &netns.0, "sysctl", "-n", "net.ipv4.ip_forward"])
        .output()
        .expect("sysctl");
    assert_eq!(text(&forward.stdout).trim(), "0", "forwarding left on");
    assert!(!rules.contains("banger-forward-guard"), "{rules}");
    drop(daemon);
}

/// Sends 20,000 questions about names outside `.vm` from the bridge address as fast as it
/// can, then asks `<argv[2]>.vm` from another address on the bridge (again each second
/// without an answer, up to 10 times) and prints the answer's size, its answer count, how
/// long the answered attempt took in ms, and which attempt it was.
const DNS_FLOOD: &str = r#"
import socket, struct, sys, time
server, name, flooder, asker = (sys.argv[1], 53), sys.argv[2], sys.argv[3], sys.argv[4]
def query(qid, qname):
    out = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    for label in qname.split("."):
        out += bytes([len(label)]) + label.encode()
    return out + b"\0" + struct.pack(">HH", 1, 1)
flood = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
flood.bind((flooder, 0))
for n in range(20000):
    flood.sendto(query(n & 0xffff, "q%d.example" % n), server)
ask = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
ask.bind((asker, 0))
ask.settimeout(1)
# As a resolver does: asked again after a second without an answer (a flood can fill the
# server's receive buffer, in the kernel, before the server drains it).
for attempt in range(1, 11):
    started = time.monotonic()
    ask.sendto(query(4242, name + ".vm"), server)
    try:
        reply = ask.recv(4096)
    except TimeoutError:
        continue
    print(len(reply), struct.unpack(">H", reply[6:8])[0], round((time.monotonic() - started) * 1000, 1), attempt)
    break
"#;

/// Open file descriptors of process `pid`.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|dir| dir.count()).unwrap_or(0)
}

#[test]
fn a_dns_flood_at_a_silent_upstream_leaves_the_daemons_descriptors_bounded_and_vm_names_answered() {
    let netns = TestNetns::new();
    // An upstream that reads and never answers, inside the namespace.
    let silent = "import socket, time; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); \
                  s.bind(('127.0.0.1', 5399)); time.sleep(600)";
    let _upstream = Reaped(
        Command::new("ip").args(["netns", "exec", &netns.0, "python3", "-c", silent]).spawn().expect("silent upstream"),
    );
    let config_dir = tempfile::tempdir().expect("config dir");
    let config = config_dir.path().join("config.toml");
    std::fs::write(
        &config,
        "bridge = \"bgbr1\"\nbridge_cidr = \"172.31.97.0/24\"\ndns_upstream = \"127.0.0.1:5399\"\n",
    )
    .expect("config");
    // The bridge with its address and a second one on its network, as a guest would have.
    for args in [
        &["link", "add", "name", "bgbr1", "type", "bridge"][..],
        &["addr", "add", "172.31.97.1/24", "dev", "bgbr1"],
        &["addr", "add", "172.31.97.250/24", "dev", "bgbr1"],
        &["link", "set", "bgbr1", "up"],
    ] {
        let status = Command::new("ip").args(["-n", &netns.0]).args(args).status().expect("ip");
        assert!(status.success(), "ip {args:?}");
    }
    let daemon = Daemon::start_in_netns(&netns.0, &["--config", &config.display().to_string()]);
    let out = daemon.banger(&["vm", "create", "--name", "named", "--no-start"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let ip = show(&daemon, "named", "ip");
    banger_tests::wait_until("dns to answer", Duration::from_secs(10), || {
        let out = Command::new("ip")
            .args(["netns", "exec", &netns.0, "busybox", "nslookup", "named.vm", "172.31.97.1"])
            .output()
            .expect("nslookup");
        text(&out.stdout).contains(&ip)
    });
    let before = open_fds(daemon.pid());
    let mut flood = Command::new("ip")
        .args(["netns", "exec", &netns.0, "python3", "-c", DNS_FLOOD, "172.31.97.1", "named", "172.31.97.1"])
        .arg("172.31.97.250")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("flood");
    let mut most = before;
    while flood.try_wait().expect("wait").is_none() {
        most = most.max(open_fds(daemon.pid()));
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = flood.wait_with_output().expect("flood output");
    let printed = text(&out.stdout);
    println!(
        "daemon descriptors: {before} before, at most {most} during the flood; named.vm answer (bytes, answers, ms, attempt): {printed}"
    );
    assert!(out.status.success(), "{printed}{}", text(&out.stderr));
    let fields: Vec<f64> = printed.split_whitespace().map(|f| f.parse().expect("number")).collect();
    assert_eq!(fields.len(), 4, "named.vm was never answered in 10 attempts: {printed}");
    assert_eq!(fields[1], 1.0, "named.vm has one address: {printed}");
    assert!(fields[2] < 1000.0, "named.vm took {} ms", fields[2]);
    assert!(most <= before + 8, "the daemon's descriptors grew from {before} to {most}");
    assert!(daemon.banger(&["vm", "delete", "named"]).status.success());
}

#[test]
fn with_no_network_config_vms_get_an_address_nat_to_a_server_outside_and_each_others_names() {
    let _slot = guest_slot();
    let site = tempfile::tempdir().expect("site");
    std::fs::write(site.path().join("hello.txt"), "hello from outside\n").expect("page");
    let requests = site.path().join("requests.log");
    let (host, _outside, _server) = beyond_the_host(site.path(), &requests);

    // No config at all: network = "auto".
    let daemon = Daemon::start_in_netns(&host.0, &[]);
    let doctor = text(&daemon.banger(&["doctor"]).stdout);
    let network = doctor.lines().find(|line| line.contains("network")).unwrap_or_default().to_owned();
    assert!(network.starts_with("PASS"), "{doctor}");
    assert!(network.contains("bridge banger0, VMs in 172.30.0.0/24 (auto:"), "{network}");
    assert!(network.contains("with NAT and <vm>.vm names at 172.30.0.1"), "{network}");
    for vm in ["auto-a", "auto-b"] {
        let out = daemon.banger(&["vm", "create", "--name", vm]);
        assert!(out.status.success(), "{vm}: {}\n{}", text(&out.stderr), daemon.log());
    }
    let (ip_a, ip_b) = (show(&daemon, "auto-a", "ip"), show(&daemon, "auto-b", "ip"));
    assert!(ip_a.starts_with("172.30.0.") && ip_b.starts_with("172.30.0.") && ip_a != ip_b, "{ip_a} {ip_b}");
    let list = text(&daemon.banger(&["vm", "list"]).stdout);
    assert!(list.lines().next().is_some_and(|header| header.ends_with("IP")), "{list}");
    assert!(list.contains(&ip_a) && list.contains(&ip_b), "{list}");

    // Out through NAT: the server sees the host's address, not the guest's.
    let url = "http://203.0.113.2:8080/hello.txt";
    let out = daemon.banger(&["vm", "exec", "auto-a", "--", "timeout", "20", "wget", "-q", "-O", "-", url]);
    assert_eq!(text(&out.stdout), "hello from outside\n", "{}\n{}", text(&out.stderr), daemon.log());
    let seen = std::fs::read_to_string(&requests).expect("requests");
    assert!(seen.contains("203.0.113.1") && !seen.contains(&ip_a), "the server saw: {seen}");

    // One guest finds the other by name (busybox's nslookup asks once: retried).
    let script = "for i in 1 2 3 4 5; do nslookup auto-b.vm && exit 0; sleep 1; done; exit 1";
    let out = daemon.banger(&["vm", "exec", "auto-a", "--", "sh", "-c", script]);
    assert!(text(&out.stdout).contains(&ip_b), "{}{}", text(&out.stdout), text(&out.stderr));
    let remembered = std::fs::read_to_string(daemon.state_dir().join("network")).expect("the chosen range");
    assert_eq!(remembered.trim(), "172.30.0.0/24");
}

/// The daemon's host and a network beyond it: two namespaces joined by a veth pair
/// (203.0.113.1 on the host's side), an HTTP server of `site` at 203.0.113.2:8080 beyond,
/// logging its requests to `requests`.
fn beyond_the_host(site: &std::path::Path, requests: &std::path::Path) -> (TestNetns, TestNetns, Reaped) {
    let (host, outside) = (TestNetns::new(), TestNetns::new());
    let ip = |args: &[&str]| {
        let out = Command::new("ip").args(args).output().expect("ip");
        assert!(out.status.success(), "ip {args:?}: {}", text(&out.stderr));
    };
    ip(&["-n", &host.0, "link", "add", "bgveth-h", "type", "veth", "peer", "name", "bgveth-s", "netns", &outside.0]);
    ip(&["-n", &host.0, "addr", "add", "203.0.113.1/24", "dev", "bgveth-h"]);
    ip(&["-n", &host.0, "link", "set", "bgveth-h", "up"]);
    ip(&["-n", &outside.0, "addr", "add", "203.0.113.2/24", "dev", "bgveth-s"]);
    ip(&["-n", &outside.0, "link", "set", "bgveth-s", "up"]);
    let server = Reaped(
        Command::new("ip")
            .args(["netns", "exec", &outside.0, "python3", "-m", "http.server", "8080", "--bind", "203.0.113.2"])
            .current_dir(site)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(requests).expect("log"))
            .spawn()
            .expect("http server"),
    );
    banger_tests::wait_until("the http server to listen", Duration::from_secs(10), || {
        let probe = "import socket; socket.create_connection(('203.0.113.2', 8080), 1)";
        Command::new("ip").args(["netns", "exec", &host.0, "python3", "-c", probe]).status().is_ok_and(|s| s.success())
    });
    (host, outside, server)
}

#[test]
fn apt_get_in_the_default_debian_image_installs_a_package_from_a_mirror_it_reaches() {
    use sha2::Digest as _;
    let _slot = guest_slot();
    // A flat apt repository with one package, made here.
    let site = tempfile::tempdir().expect("site");
    let package = site.path().join("build");
    std::fs::create_dir_all(package.join("DEBIAN")).expect("DEBIAN");
    std::fs::create_dir_all(package.join("usr/bin")).expect("usr/bin");
    let control = "Package: banger-hello\nVersion: 1.0\nArchitecture: all\nMaintainer: banger <banger@localhost>\n\
                   Description: a package of the test's own\n";
    std::fs::write(package.join("DEBIAN/control"), control).expect("control");
    std::fs::write(package.join("usr/bin/banger-hello"), "#!/bin/sh\necho hello from a package\n").expect("script");
    std::fs::set_permissions(package.join("usr/bin/banger-hello"), std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    let deb = site.path().join("banger-hello_1.0_all.deb");
    let built = Command::new("dpkg-deb").args(["--root-owner-group", "--build"]).arg(&package).arg(&deb).output();
    assert!(built.as_ref().is_ok_and(|o| o.status.success()), "dpkg-deb: {built:?}");
    let bytes = std::fs::read(&deb).expect("deb");
    let packages = format!(
        "{control}Filename: ./banger-hello_1.0_all.deb\nSize: {}\nSHA256: {}\n",
        bytes.len(),
        hex::encode(sha2::Sha256::digest(&bytes))
    );
    std::fs::write(site.path().join("Packages"), &packages).expect("Packages");
    let release = format!(
        "Origin: banger-test\nLabel: banger-test\nSuite: test\nSHA256:\n {} {} Packages\n",
        hex::encode(sha2::Sha256::digest(packages.as_bytes())),
        packages.len()
    );
    std::fs::write(site.path().join("Release"), release).expect("Release");
    let requests = site.path().join("requests.log");
    let (host, _outside, _server) = beyond_the_host(site.path(), &requests);

    let debian = banger_tests::debian_image_dir().display().to_string();
    let daemon = Daemon::start_in_netns(&host.0, &["--default-image-dir", &debian]);
    let script = "rm -f /etc/apt/sources.list /etc/apt/sources.list.d/*; \
                  echo 'deb [trusted=yes] http://203.0.113.2:8080/ ./' > /etc/apt/sources.list.d/test.list && \
                  apt-get update -q && apt-get install -y -q banger-hello && banger-hello";
    let out = daemon.banger(&["vm", "run", "--rm", "--memory", "512", "--", "sh", "-c", script]);
    assert_eq!(out.status.code(), Some(0), "{}{}\n{}", text(&out.stdout), text(&out.stderr), daemon.log());
    assert!(text(&out.stdout).ends_with("hello from a package\n"), "{}", text(&out.stdout));
    let seen = std::fs::read_to_string(&requests).expect("requests");
    assert!(seen.contains("banger-hello_1.0_all.deb HTTP/1.1\" 200") && seen.contains("203.0.113.1"), "{seen}");
}
