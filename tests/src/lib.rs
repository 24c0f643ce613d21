//! Harness for the end-to-end tests: a real `bangerd` process in a temporary state dir,
//! the real `banger` CLI against it, and cleanup of every process either left behind.

pub mod oci;
pub mod tls;
pub mod toy;

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant},
};

use nix::{sys::signal::Signal, unistd::Pid};

/// At most one end-to-end test boots guests at a time: TCG guests need a core each, and
/// this machine class has two.
static GUESTS: Mutex<()> = Mutex::new(());

/// Holds the right to boot guests until dropped.
pub fn guest_slot() -> MutexGuard<'static, ()> {
    GUESTS.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Says that the running test cannot check what it is for on this host, and why: on its
/// standard error and, when `BANGER_TEST_SKIPS` names a file (`make test` sets it), as a
/// line `<test>: <reason>` appended there, which `make test` counts and lists at the end.
/// The caller returns right after (or checks what it can instead, saying so in `reason`).
pub fn skip(reason: &str) {
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("unnamed test");
    eprintln!("SKIPPED: {reason}");
    if let Some(log) = std::env::var_os("BANGER_TEST_SKIPS") {
        use std::io::Write;
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .and_then(|mut file| writeln!(file, "{test}: {reason}"));
        if let Err(error) = written {
            eprintln!("cannot record the skip in {}: {error}", Path::new(&log).display());
        }
    }
}

/// The directory holding the workspace's built binaries (`target/debug`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/debug/deps/e2e-HASH -> target/debug
    let dir = exe.parent().and_then(Path::parent).expect("target dir").to_owned();
    assert!(
        dir.join("bangerd").is_file() && dir.join("banger").is_file(),
        "bangerd and banger are not built in {}: run `cargo build --workspace --bins` (make test does)",
        dir.display()
    );
    dir
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("repo root").to_owned()
}

/// The image test daemons boot by default: the busybox image `make setup` installs beside
/// the default one (small and quick to boot), or `BANGER_TEST_IMAGE_DIR`.
pub fn default_image_dir() -> PathBuf {
    installed_image_dir("BANGER_TEST_IMAGE_DIR", "busybox")
}

/// The default image `make setup` installs (Debian), or `BANGER_DEFAULT_IMAGE_DIR`.
pub fn debian_image_dir() -> PathBuf {
    installed_image_dir("BANGER_DEFAULT_IMAGE_DIR", "default")
}

fn installed_image_dir(variable: &str, name: &str) -> PathBuf {
    let dir = std::env::var_os(variable)
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new("/usr/local/share/banger/images").join(name));
    assert!(
        dir.join("rootfs.ext4").is_file(),
        "no {name} image in {}: run `make setup` (make test does) or set {variable}",
        dir.display()
    );
    dir
}

/// Waits until `done` says yes, checking every few milliseconds; panics naming `what` after
/// `timeout`. The way tests wait: on the condition, never for a fixed time.
pub fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "{what} did not happen within {timeout:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// True when the process `pid` is gone (or a zombie, which runs nothing any more).
pub fn process_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat.rfind(')').is_some_and(|i| stat[i + 1..].trim_start().starts_with('Z')),
    }
}

/// Waits until the process `pid` is gone (e.g. after a SIGKILL, before checking what a new
/// daemon makes of it).
pub fn wait_gone(pid: u32) {
    wait_until(&format!("process {pid} to go"), Duration::from_secs(10), || process_gone(pid));
}

/// A CLI run in the background whose standard output is read as it comes: a test waits for
/// what it expects to appear instead of sleeping.
pub struct Follower {
    child: Child,
    output: std::sync::Arc<Mutex<Vec<u8>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Follower {
    fn start(mut child: Child) -> Self {
        use std::io::Read;
        let output = std::sync::Arc::new(Mutex::new(Vec::new()));
        let mut stdout = child.stdout.take().expect("piped stdout");
        let sink = output.clone();
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap_or_else(std::sync::PoisonError::into_inner).extend_from_slice(&buf[..n]);
            }
        });
        Self { child, output, reader: Some(reader) }
    }

    /// What it printed so far.
    pub fn output(&self) -> String {
        String::from_utf8_lossy(&self.output.lock().unwrap_or_else(std::sync::PoisonError::into_inner)).into_owned()
    }

    /// Waits until its output holds `needle` (up to `timeout`); returns the output.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> String {
        wait_until(&format!("{needle:?} in the output"), timeout, || self.output().contains(needle));
        self.output()
    }

    /// Waits until it printed at least `bytes` bytes (up to `timeout`).
    pub fn wait_for_bytes(&self, bytes: usize, timeout: Duration) {
        wait_until(&format!("{bytes} bytes of output"), timeout, || self.output().len() >= bytes);
    }

    /// True once it exited.
    pub fn finished(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// Its process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Waits for it to exit; returns how, its whole output and its standard error.
    pub fn finish(mut self) -> (std::process::ExitStatus, String, String) {
        use std::io::Read;
        let status = self.child.wait().expect("wait");
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        let mut stderr = String::new();
        if let Some(mut err) = self.child.stderr.take() {
            let _ = err.read_to_string(&mut stderr);
        }
        (status, self.output(), stderr)
    }
}

/// Every process whose command line mentions `needle`, found through /proc.
pub fn processes_mentioning(needle: &str) -> Vec<(u32, String)> {
    let mut found = Vec::new();
    let me = std::process::id();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        if pid == me {
            continue;
        }
        let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else { continue };
        let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
        let zombie = std::fs::read_to_string(entry.path().join("stat"))
            .ok()
            .and_then(|s| s.rfind(')').map(|i| s[i + 1..].trim_start().starts_with('Z')))
            .unwrap_or(false);
        if cmdline.contains(needle) && !zombie {
            found.push((pid, cmdline));
        }
    }
    found
}

/// A real bangerd in its own temporary state dir. Dropping it stops the daemon and kills,
/// by PID, any process that still mentions its directory.
pub struct Daemon {
    /// The temporary directory holding state and socket.
    pub dir: tempfile::TempDir,
    /// The API socket.
    pub socket: PathBuf,
    /// Extra flags the daemon was started with.
    args: Vec<String>,
    /// Extra environment of the daemon (changed with [`Daemon::set_env`]).
    env: Vec<(String, String)>,
    /// The network namespace the daemon runs in, if any.
    netns: Option<String>,
    child: Option<Child>,
}

impl Daemon {
    /// Starts bangerd with `extra` flags and waits until it answers.
    pub fn start(extra: &[&str]) -> Self {
        Self::launch(None, None, extra, &[])
    }

    /// Starts bangerd with extra environment variables.
    pub fn start_with_env(extra: &[&str], env: &[(&str, &str)]) -> Self {
        Self::launch(None, None, extra, env)
    }

    /// Starts bangerd with its temporary directory (state, socket, logs) under `parent`
    /// (e.g. a file system the test mounted), extra flags and environment.
    pub fn start_in(parent: Option<&Path>, extra: &[&str], env: &[(&str, &str)]) -> Self {
        Self::launch(parent, None, extra, env)
    }

    /// Starts bangerd inside the network namespace `netns` (which the test created): its
    /// bridge, taps, NAT rules and guests all live there.
    pub fn start_in_netns(netns: &str, extra: &[&str]) -> Self {
        Self::launch(None, Some(netns), extra, &[])
    }

    fn launch(parent: Option<&Path>, netns: Option<&str>, extra: &[&str], env: &[(&str, &str)]) -> Self {
        let builder = tempfile::Builder::new().prefix("banger-e2e").to_owned();
        let dir = match parent {
            Some(parent) => builder.tempdir_in(parent),
            None => builder.tempdir(),
        }
        .expect("tempdir");
        // Like /var/lib: the VMs' uids pass through to the state dir inside.
        std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o711)).expect("chmod");
        let socket = dir.path().join("bangerd.sock");
        let mut daemon = Self {
            dir,
            socket,
            args: extra.iter().map(|s| s.to_string()).collect(),
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            netns: netns.map(str::to_owned),
            child: None,
        };
        daemon.restart();
        daemon
    }

    /// Replaces the environment the next [`Daemon::restart`] uses.
    pub fn set_env(&mut self, env: &[(&str, &str)]) {
        self.env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    }

    /// The state directory.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// The daemon's log file.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("bangerd.log")
    }

    /// The daemon's PID.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("daemon running").id()
    }

    /// Starts the daemon again over the same state dir (after a stop or kill).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "daemon already running");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path()).expect("log");
        // `nsenter` execs bangerd in place (the child's PID is the daemon's) and, unlike
        // `ip netns exec`, keeps the host's /sys: the daemon still sees its cgroups.
        let mut command = match &self.netns {
            Some(netns) => {
                let mut command = Command::new("nsenter");
                command.arg(format!("--net=/run/netns/{netns}")).arg(bin_dir().join("bangerd"));
                command
            }
            None => Command::new(bin_dir().join("bangerd")),
        };
        let child = command
            .arg("--state-dir")
            .arg(self.state_dir())
            .arg("--socket")
            .arg(&self.socket)
            .args(match self.args.iter().any(|arg| arg == "--default-image-dir") {
                true => Vec::new(),
                false => vec!["--default-image-dir".into(), default_image_dir()],
            })
            .args(&self.args)
            // On the host, no bridge of banger's (network = "auto" is the default): a test
            // that wants a network makes a netns for it, where the default is left alone.
            .envs(self.netns.is_none().then_some(("BANGER_NETWORK", "none")))
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn bangerd");
        self.child = Some(child);
        self.wait_serving();
    }

    /// Waits until the daemon answers (up to 20 s).
    pub fn wait_serving(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.banger(&["vm", "list"]).status.success() {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("bangerd exited with {status}: {}", self.log());
            }
            assert!(Instant::now() < deadline, "bangerd did not answer within 20 s: {}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Sends `signal` to the daemon and reaps it.
    pub fn signal(&mut self, signal: Signal) {
        if let Some(mut child) = self.child.take() {
            let _ = nix::sys::signal::kill(Pid::from_raw(child.id() as i32), signal);
            let _ = child.wait();
        }
    }

    /// Runs the CLI the way a user on this host would: no `--socket` flag, the socket from
    /// `BANGER_SOCKET`, so that it starts the daemon itself when none answers. The daemon it
    /// starts inherits the state and image directories through the environment.
    pub fn banger_autostart(&self, args: &[&str]) -> Output {
        Command::new(bin_dir().join("banger"))
            .args(args)
            .env("BANGER_SOCKET", &self.socket)
            .env("BANGER_STATE_DIR", self.state_dir())
            .env("BANGER_DEFAULT_IMAGE_DIR", default_image_dir())
            .env("BANGER_NETWORK", "none")
            .env_remove("BANGER_NO_AUTOSTART")
            .env_remove("BANGER_ENDPOINT")
            .stdin(Stdio::null())
            .output()
            .expect("banger")
    }

    /// Starts the CLI in the background (for commands a test interrupts).
    pub fn banger_spawn(&self, args: &[&str]) -> Child {
        Command::new(bin_dir().join("banger"))
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn banger")
    }

    /// Starts the CLI in the background with its output captured (`wait_with_output`).
    pub fn banger_piped(&self, args: &[&str]) -> Child {
        Command::new(bin_dir().join("banger"))
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn banger")
    }

    /// Starts the CLI in the background, its standard output read as it comes.
    pub fn banger_follow(&self, args: &[&str]) -> Follower {
        Follower::start(self.banger_piped(args))
    }

    /// Waits until the daemon's log holds `needle` (up to `timeout`).
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.log().contains(needle) {
            assert!(Instant::now() < deadline, "no {needle:?} in the log within {timeout:?}: {}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Forgets the daemon process without signalling it (after something else killed it).
    pub fn forget_child(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
    }

    /// Imports an image through the CLI and asserts it worked.
    pub fn import_image(&self, name: &str, kernel: &Path, rootfs: &Path, initrd: Option<&Path>) {
        let (kernel, rootfs) = (kernel.display().to_string(), rootfs.display().to_string());
        let mut args = vec!["image", "import", name, "--kernel", &kernel, "--rootfs", &rootfs];
        let initrd = initrd.map(|p| p.display().to_string());
        if let Some(initrd) = &initrd {
            args.extend(["--initrd", initrd.as_str()]);
        }
        let out = self.banger(&args);
        assert!(out.status.success(), "image import {name}: {}", text(&out.stderr));
    }

    /// Runs the CLI against this daemon.
    pub fn banger(&self, args: &[&str]) -> Output {
        self.banger_with_stdin(args, None)
    }

    /// Runs the CLI against this daemon, feeding `stdin`.
    pub fn banger_with_stdin(&self, args: &[&str], stdin: Option<&[u8]>) -> Output {
        use std::io::Write;
        let mut child = Command::new(bin_dir().join("banger"))
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .env_remove("BANGER_ENDPOINT")
            .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn banger");
        if let Some(input) = stdin {
            let mut pipe = child.stdin.take().expect("stdin");
            pipe.write_all(input).expect("write stdin");
        }
        child.wait_with_output().expect("banger output")
    }

    /// Processes (other than the daemon) whose command line mentions this daemon's directory.
    pub fn guest_processes(&self) -> Vec<(u32, String)> {
        let daemon = self.child.as_ref().map(Child::id);
        processes_mentioning(&self.dir.path().display().to_string())
            .into_iter()
            .filter(|(pid, _)| Some(*pid) != daemon)
            .collect()
    }
}

/// Every `*.log` file under `dir`, recursively.
fn log_files(dir: &Path, found: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            log_files(&path, found);
        } else if path.extension().is_some_and(|e| e == "log") {
            found.push(path);
        }
    }
}

/// Where bangerd keeps guest memory files by default.
pub const MEMORY_DIR: &str = "/dev/shm/banger";

impl Drop for Daemon {
    fn drop(&mut self) {
        // A failing test shows the evidence before its directory goes: the tail of every
        // VM log (console, VMM, vsock backend), kept or failed.
        if std::thread::panicking() {
            let mut logs = Vec::new();
            log_files(&self.state_dir(), &mut logs);
            for log in logs {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(15).collect();
                eprintln!("--- {} (last {} lines)", log.display(), tail.len());
                for line in tail.iter().rev() {
                    eprintln!("{line}");
                }
            }
        }
        self.signal(Signal::SIGTERM);
        let leftovers = processes_mentioning(&self.dir.path().display().to_string());
        for (pid, _) in &leftovers {
            let _ = nix::sys::signal::kill(Pid::from_raw(*pid as i32), Signal::SIGKILL);
        }
        // A failed test may leave VMs' cgroups behind: remove them once their processes are gone.
        let deadline = Instant::now() + Duration::from_secs(5);
        while leftovers.iter().any(|(pid, _)| !process_gone(*pid)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        for entry in std::fs::read_dir(self.state_dir().join("vms")).into_iter().flatten().flatten() {
            // The guest memory files of VMs that may be snapshotted (bangerd's `memory_dir`).
            let _ = std::fs::remove_file(Path::new(MEMORY_DIR).join(entry.file_name()));
            for controller in ["cpu", "memory", "pids", "blkio"] {
                let group = Path::new("/sys/fs/cgroup").join(controller).join("banger").join(entry.file_name());
                // A killed process leaves its group a moment after it is gone.
                for _ in 0..50 {
                    if std::fs::remove_dir(&group).is_ok() || !group.exists() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }
}

/// The sha256 of a file, in hex.
pub fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().expect("sha256sum");
    assert!(out.status.success(), "sha256sum {}: {}", path.display(), text(&out.stderr));
    text(&out.stdout).split_whitespace().next().expect("hash").to_owned()
}

/// The CLI's output as text, for assertions.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A network namespace for one test, deleted (with everything in it) when dropped.
pub struct TestNetns(pub String);

impl TestNetns {
    /// A new namespace with its loopback up.
    pub fn new() -> Self {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("banger-e2e-net-{}-{n}", std::process::id());
        assert!(std::process::Command::new("ip").args(["netns", "add", &name]).status().expect("ip").success());
        assert!(
            std::process::Command::new("ip")
                .args(["-n", &name, "link", "set", "lo", "up"])
                .status()
                .expect("ip")
                .success()
        );
        Self(name)
    }

    /// Whether an interface of this name exists in the namespace.
    pub fn has_link(&self, name: &str) -> bool {
        std::process::Command::new("ip")
            .args(["-n", &self.0, "link", "show", "dev", name])
            .output()
            .expect("ip")
            .status
            .success()
    }

    /// Its nftables ruleset.
    pub fn ruleset(&self) -> String {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &self.0, "nft", "list", "ruleset"])
            .output()
            .expect("nft");
        text(&out.stdout)
    }
}

impl Default for TestNetns {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// A real registry (Debian's `docker-registry`, the CNCF distribution registry) on a free
/// loopback port, with its storage in a temporary directory; stopped by PID when dropped.
pub struct Registry {
    /// `127.0.0.1:PORT`.
    pub address: String,
    dir: tempfile::TempDir,
    child: Child,
}

impl Registry {
    /// Starts one and waits until it answers.
    pub fn start() -> Self {
        let dir = tempfile::Builder::new().prefix("banger-registry").tempdir().expect("tempdir");
        let port = std::net::TcpListener::bind("127.0.0.1:0").expect("port").local_addr().expect("addr").port();
        let address = format!("127.0.0.1:{port}");
        let config = dir.path().join("config.yml");
        let storage = dir.path().join("storage");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {address}\n",
                storage.display()
            ),
        )
        .expect("registry config");
        let log = std::fs::File::create(dir.path().join("registry.log")).expect("registry log");
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("docker-registry (make setup installs it)");
        let registry = Self { address, dir, child };
        wait_until("the registry to listen", Duration::from_secs(20), || {
            std::net::TcpStream::connect(&registry.address).is_ok()
        });
        registry
    }

    /// Pushes `source` (a skopeo transport: `oci:DIR:TAG`, `docker-archive:FILE`) as
    /// `REPOSITORY:TAG` here; every platform of an index.
    pub fn push(&self, source: &str, target: &str) {
        let out = Command::new("skopeo")
            .args(["copy", "--quiet", "--all", "--dest-tls-verify=false", source])
            .arg(format!("docker://{}/{target}", self.address))
            .output()
            .expect("skopeo (make setup installs it)");
        assert!(out.status.success(), "skopeo copy {source} {target}: {}", text(&out.stderr));
    }

    /// The registry's log (one access line per request).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// How many blobs (not manifests) were fetched from it with GET so far.
    pub fn blob_downloads(&self) -> usize {
        self.log().lines().filter(|line| line.contains("\"GET /v2/") && line.contains("/blobs/sha256:")).count()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
