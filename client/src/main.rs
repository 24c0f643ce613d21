//! `banger`: the command-line client of bangerd.

mod autostart;
mod commands;
mod json;
mod output;
mod pull;
mod telemetry;
mod terminal;
mod workspace;

use std::{path::PathBuf, process::ExitCode};

use banger_client::{DEFAULT_SOCKET, Target};
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand, parser::ValueSource};

/// Manage the microVMs and images of a bangerd host.
///
/// Talks to bangerd over its unix socket (default /run/banger/bangerd.sock), as this user, or,
/// with --endpoint, over TCP with TLS (a client certificate or a token names the caller).
/// When the socket comes from the default or BANGER_SOCKET and nothing answers, banger
/// starts bangerd itself (next to the banger binary, else from PATH) and waits until it is
/// healthy; --no-autostart or BANGER_NO_AUTOSTART=1 turn that off, an explicit --socket or
/// --endpoint never autostarts, and a socket this user may not connect to is
/// PERMISSION_DENIED. Errors print the gRPC code, the message
/// and the operation id.
#[derive(Debug, Parser)]
#[command(name = "banger", version, propagate_version = true)]
struct Cli {
    /// The daemon's unix socket.
    #[arg(long, global = true, env = "BANGER_SOCKET", value_name = "PATH", conflicts_with = "endpoint")]
    socket: Option<PathBuf>,
    /// The daemon's TCP endpoint, e.g. https://bangerd.example:7070 (always TLS: give
    /// --tls-ca, and --tls-cert/--tls-key or --token).
    #[arg(long, global = true, env = "BANGER_ENDPOINT", value_name = "URL")]
    endpoint: Option<String>,
    /// PEM CA certificate the daemon's TCP certificate must be signed by.
    #[arg(long, global = true, env = "BANGER_TLS_CA", value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// PEM client certificate, signed by the CA bangerd trusts (mutual TLS).
    #[arg(long, global = true, env = "BANGER_TLS_CERT", value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The client certificate's PEM private key.
    #[arg(long, global = true, env = "BANGER_TLS_KEY", value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// The name the daemon's certificate must carry [default: the endpoint's host].
    #[arg(long, global = true, env = "BANGER_TLS_SERVER_NAME", value_name = "NAME")]
    tls_server_name: Option<String>,
    /// A bearer token (from bangerd's [[auth.tokens]]), sent with every call; on the unix
    /// socket it names the caller instead of the user.
    #[arg(long, global = true, env = "BANGER_TOKEN", value_name = "TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Export this command's trace over OTLP/gRPC (e.g. http://127.0.0.1:4317); the daemon's
    /// spans for it join the same trace.
    #[arg(long, global = true, env = "OTEL_EXPORTER_OTLP_ENDPOINT", value_name = "URL")]
    otlp_endpoint: Option<String>,
    /// Never start bangerd when it does not answer.
    #[arg(long, global = true, env = "BANGER_NO_AUTOSTART", value_parser = clap::builder::BoolishValueParser::new())]
    no_autostart: bool,
    /// How read commands print: text for people, json for scripts (protobuf's JSON names,
    /// one document per line; `vm watch` prints one event per line).
    #[arg(long, short = 'o', global = true, value_enum, default_value = "text", env = "BANGER_OUTPUT")]
    output: OutputFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create, run and manage VMs.
    #[command(subcommand)]
    Vm(VmCommand),
    /// Import and manage images.
    #[command(subcommand)]
    Image(ImageCommand),
    /// Keep VMs booted ahead of time: a `vm create` or `vm run` of a pool's shape (image,
    /// vCPUs, memory, disk size, egress) claims a ready member in milliseconds instead of
    /// booting, and the pool boots a replacement in the background.
    #[command(subcommand)]
    Pool(PoolCommand),
    /// List, show and delete snapshots (`banger vm snapshot` takes one; `vm create|run
    /// --snapshot NAME` starts VMs from it in milliseconds, each with its own identity).
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Check what this host supports and show which drivers bangerd uses.
    ///
    /// Exits 1 when a check fails (VMs cannot run until it is fixed).
    Doctor,
    /// Make a CA and certificates for bangerd's TCP listener (mutual TLS). Needs no daemon.
    #[command(subcommand)]
    Tls(TlsCommand),
    /// Make bearer tokens for bangerd's config. Needs no daemon.
    #[command(subcommand)]
    Token(TokenCommand),
}

#[derive(Debug, Subcommand)]
enum PoolCommand {
    /// Make a pool; its members boot in the background (`pool show` follows them).
    Create {
        /// The pool's name (a-z, 0-9, -; at most 54 characters).
        name: String,
        /// How many members to keep booted (1 to 64).
        #[arg(long)]
        size: u32,
        /// Image id or name of the members [default: the host's default image].
        #[arg(long)]
        image: Option<String>,
        /// The members' vCPUs [default: 1].
        #[arg(long)]
        vcpus: Option<u32>,
        /// The members' memory in MiB [default: 256].
        #[arg(long, value_name = "MIB")]
        memory: Option<u32>,
        /// The members' root disk size (e.g. 10G) [default: the image's size].
        #[arg(long, value_name = "SIZE", value_parser = parse_size)]
        disk_size: Option<u64>,
        /// The members' egress policy, as `vm create --egress` [default: internet].
        #[arg(long, value_name = "POLICY", value_parser = parse_egress)]
        egress: Option<banger_client::pb::EgressPolicy>,
        /// Restore the members from this snapshot instead of booting them (each with its own
        /// identity); `vm create|run --snapshot` of the same snapshot claims one. The image
        /// and shape are the snapshot's.
        #[arg(long, value_name = "SNAPSHOT", conflicts_with_all = ["image", "vcpus", "memory", "disk_size"])]
        snapshot: Option<String>,
    },
    /// List pools: their shape, size and ready members.
    #[command(alias = "ls")]
    List,
    /// Show a pool and its unclaimed members with their state and memory use.
    Show {
        /// Pool id or name.
        pool: String,
    },
    /// Delete a pool and its unclaimed members (VMs claimed from it stay).
    Delete {
        /// Pool id or name.
        pool: String,
    },
}

#[derive(Debug, Subcommand)]
enum SnapshotCommand {
    /// List snapshots: their source VM, shape, dependents and size on the host.
    #[command(alias = "ls")]
    List {
        /// Only snapshots with this label (repeatable).
        #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
        labels: Vec<(String, String)>,
    },
    /// Show one snapshot.
    Show {
        /// Snapshot id or name.
        snapshot: String,
    },
    /// Delete a snapshot and its files; refused while a VM depends on it (one started from
    /// it, or the VM it was taken from, whose disk overlays it): delete those first.
    Delete {
        /// Snapshot id or name.
        snapshot: String,
    },
}

#[derive(Debug, Subcommand)]
enum TlsCommand {
    /// Make a CA, bangerd's certificate and client certificates in DIR (keys mode 0600):
    /// ca.pem, ca-key.pem, server.pem, server-key.pem, client-NAME.pem, client-NAME-key.pem.
    /// Prints the [tls] section of bangerd's config and the grants to add.
    Init {
        /// Where the files go (created; existing files are not overwritten).
        dir: PathBuf,
        /// A name clients dial bangerd by: DNS name or IP address (repeatable) [default:
        /// this host's name, localhost, 127.0.0.1].
        #[arg(long = "server-name", value_name = "NAME")]
        server_names: Vec<String>,
        /// Make a client certificate with this name (repeatable).
        #[arg(long = "client", value_name = "NAME")]
        clients: Vec<String>,
        /// How long the certificates are valid (e.g. 90d, 1y).
        #[arg(long, value_name = "DURATION", default_value = "365d", value_parser = parse_duration)]
        valid: std::time::Duration,
    },
    /// Revoke client certificates made in DIR: writes DIR/crl.pem, which bangerd checks
    /// when [tls] crl names it (SIGHUP makes it read a new one).
    Revoke {
        /// The directory `banger tls init` wrote.
        dir: PathBuf,
        /// The clients' names.
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Make one more client certificate with the CA in DIR.
    Client {
        /// The directory `banger tls init` wrote.
        dir: PathBuf,
        /// The client's name (its common name and DNS name), which bangerd's grants name.
        name: String,
        /// How long the certificate is valid.
        #[arg(long, value_name = "DURATION", default_value = "365d", value_parser = parse_duration)]
        valid: std::time::Duration,
    },
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Make a random token: prints it once (give it to the caller) and the [[auth.tokens]]
    /// entry for bangerd's config, which holds only its SHA-256.
    New {
        /// The token's name, which logs and spans show.
        name: String,
        /// viewer, operator or admin.
        #[arg(long, value_parser = ["viewer", "operator", "admin"])]
        role: String,
        /// Confine it to VMs with these labels, e.g. team=payments.
        #[arg(long, value_name = "KEY=VALUE[,KEY=VALUE]")]
        tenant: Option<String>,
        /// Refuse it after this long (e.g. 30d).
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        expires_in: Option<std::time::Duration>,
    },
}

/// How read commands print.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum OutputFormat {
    /// Tables and lines for people.
    Text,
    /// JSON for scripts.
    Json,
}

/// The shape of a new VM.
#[derive(Debug, Args)]
struct VmShape {
    /// Name of the VM (a hostname label: a-z, 0-9, -); generated when omitted.
    #[arg(long)]
    name: Option<String>,
    /// Image id, name, or registry reference (`debian:bookworm`: pulled first when no image
    /// was pulled from it) [default: the host's default image].
    #[arg(long)]
    image: Option<String>,
    /// Number of virtual CPUs [default: bangerd's vm_defaults; built in: 1].
    #[arg(long)]
    vcpus: Option<u32>,
    /// Guest memory in MiB [default: bangerd's vm_defaults; built in: 256].
    #[arg(long, value_name = "MIB")]
    memory: Option<u32>,
    /// Root disk size (e.g. 10G, 512M; at least the image's): the guest's root file system
    /// grows to fill it at boot, and the host stores only what the guest writes [default:
    /// bangerd's vm_defaults; built in: the image's size].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    disk_size: Option<u64>,
    /// Label the VM (repeatable), e.g. --label ci.job=4711.
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Delete the VM this long after its creation, also across daemon restarts (e.g. 30s,
    /// 10m, 2h, 1d); `banger vm touch` extends it.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    ttl: Option<std::time::Duration>,
    /// Where the VM's traffic may go beyond its bridge: `internet` (public addresses only),
    /// `none`, or networks it may reach, comma-separated (`10.1.0.0/16,192.0.2.7`; the host's
    /// own addresses too) [default: internet]. Guests always reach each other and bangerd's
    /// DNS, and send only from their own address.
    #[arg(long, value_name = "POLICY", value_parser = parse_egress)]
    egress: Option<banger_client::pb::EgressPolicy>,
    /// Start from this snapshot (id or name) instead of booting: memory, devices and disk
    /// as they were saved, the guest told its new name, address, machine-id, clock and fresh
    /// entropy before the command returns. The image and shape are the snapshot's. A
    /// snapshot taken --without-agent is started with --no-wait, and its guest is told
    /// nothing.
    #[arg(long, value_name = "SNAPSHOT")]
    snapshot: Option<String>,
}

/// Parses `--egress`.
fn parse_egress(text: &str) -> Result<banger_client::pb::EgressPolicy, String> {
    use banger_client::pb::{EgressMode, EgressPolicy};
    Ok(match text {
        "internet" => EgressPolicy { mode: EgressMode::Internet.into(), allow: Vec::new() },
        "none" => EgressPolicy { mode: EgressMode::None.into(), allow: Vec::new() },
        list => EgressPolicy {
            mode: EgressMode::Allow.into(),
            allow: list.split(',').map(str::trim).filter(|c| !c.is_empty()).map(str::to_owned).collect(),
        },
    })
}

/// Parses a VM state name into the API's value.
fn parse_state(text: &str) -> Result<i32, String> {
    let name = format!("VM_STATE_{}", text.to_ascii_uppercase());
    banger_client::pb::VmState::from_str_name(&name)
        .filter(|s| *s != banger_client::pb::VmState::Unspecified)
        .map(|s| s as i32)
        .ok_or_else(|| format!("{text:?} is not one of created, starting, running, stopping, stopped, error, paused"))
}

/// Parses an octal file mode.
fn parse_mode(text: &str) -> Result<u32, String> {
    u32::from_str_radix(text.trim_start_matches("0o"), 8)
        .ok()
        .filter(|mode| *mode <= 0o7777)
        .ok_or_else(|| format!("{text:?} is not an octal file mode such as 0644"))
}

/// Parses `KEY=VALUE`.
/// A size in bytes: a number with an optional K, M, G or T suffix (powers of 1024).
fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (digits, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => text.split_at(at),
        None => (text, ""),
    };
    let shift = match unit.trim_end_matches(['B', 'b', 'i']).to_ascii_uppercase().as_str() {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return Err(format!("{text:?}: a size is a number with K, M, G or T (10G, 512M)")),
    };
    let number: u64 = digits.parse().map_err(|_| format!("{text:?} is not a size (10G, 512M)"))?;
    number.checked_mul(1 << shift).ok_or_else(|| format!("{text:?} is too big"))
}

fn parse_label(text: &str) -> Result<(String, String), String> {
    let (key, value) = text.split_once('=').ok_or_else(|| format!("{text:?} is not KEY=VALUE"))?;
    Ok((key.to_owned(), value.to_owned()))
}

/// Parses a duration such as `90s`, `10m`, `1h30m` or `2d`.
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let invalid = || format!("{text:?} is not a duration such as 30s, 10m, 1h30m or 2d");
    let (mut total, mut digits) = (0u64, String::new());
    for c in text.chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            _ => return Err(invalid()),
        };
        let n: u64 = digits.parse().map_err(|_| invalid())?;
        total = n.checked_mul(unit).and_then(|s| total.checked_add(s)).ok_or_else(invalid)?;
        digits.clear();
    }
    if !digits.is_empty() || text.is_empty() {
        return Err(invalid());
    }
    Ok(std::time::Duration::from_secs(total))
}

/// How to run a guest process.
#[derive(Debug, Args)]
struct ProcessArgs {
    /// Forward this terminal's standard input to the process.
    #[arg(short, long)]
    interactive: bool,
    /// Run the process on a new terminal in the guest (for a shell, vi, top): with -i, this
    /// terminal is put in raw mode and its keys are typed into it (Ctrl-C interrupts the
    /// guest's foreground job, not banger), its size follows this one, and all output comes
    /// on standard output.
    #[arg(short, long)]
    tty: bool,
    /// Extra environment variable for the process (repeatable).
    #[arg(short, long, value_name = "NAME=VALUE")]
    env: Vec<String>,
    /// Working directory in the guest (default: the image's WorkingDir, else /).
    #[arg(short = 'w', long, value_name = "DIR")]
    workdir: Option<String>,
    /// Run as this guest user: USER, USER:GROUP, UID or UID:GID (default: the image's
    /// User, else root).
    #[arg(short = 'u', long, value_name = "USER")]
    user: Option<String>,
    /// Kill the process after this many seconds (exit code 124).
    #[arg(long, value_name = "SECONDS")]
    timeout: Option<u32>,
    /// The program and its arguments (`vm run` without them runs the image's Entrypoint and
    /// Cmd, or, on a terminal, a login shell; with -t and no command, the login shell runs).
    #[arg(last = true, value_name = "CMD")]
    argv: Vec<String>,
}

/// How to run a shell.
#[derive(Debug, Args)]
struct ShellArgs {
    /// Extra environment variable for the shell (repeatable).
    #[arg(short, long, value_name = "NAME=VALUE")]
    env: Vec<String>,
    /// Working directory in the guest (default: the user's home).
    #[arg(short = 'w', long, value_name = "DIR")]
    workdir: Option<String>,
    /// Log in as this guest user: USER, USER:GROUP, UID or UID:GID (default: root).
    #[arg(short = 'u', long, value_name = "USER")]
    user: Option<String>,
    /// Run this instead of the user's login shell.
    #[arg(last = true, value_name = "CMD")]
    argv: Vec<String>,
}

impl From<ShellArgs> for ProcessArgs {
    fn from(shell: ShellArgs) -> Self {
        Self {
            interactive: true,
            tty: true,
            env: shell.env,
            workdir: shell.workdir,
            user: shell.user,
            timeout: None,
            argv: shell.argv,
        }
    }
}

#[derive(Debug, Subcommand)]
enum VmCommand {
    /// Create a VM and boot it (waits until its guest agent answers).
    Create {
        #[command(flatten)]
        shape: VmShape,
        /// Only record the VM; boot it later with `banger vm start`.
        #[arg(long)]
        no_start: bool,
        /// Return once the VMM runs, without waiting for the guest agent (images without it).
        #[arg(long, conflicts_with = "no_start")]
        no_wait: bool,
        /// Makes retries safe: a retry with the same id returns the first call's result
        /// instead of running again (e.g. a UUID per CI job step; remembered for 24 hours).
        #[arg(long, value_name = "ID")]
        request_id: Option<String>,
    },
    /// Boot a stopped VM (waits until its guest agent answers).
    Start {
        /// VM id or name.
        vm: String,
        /// Return once the VMM runs, without waiting for the guest agent (images without it).
        #[arg(long)]
        no_wait: bool,
        /// Makes retries safe: a retry with the same id returns the first call's result
        /// instead of running again (e.g. a UUID per CI job step; remembered for 24 hours).
        #[arg(long, value_name = "ID")]
        request_id: Option<String>,
    },
    /// Shut a VM down (guest power-off, then ACPI, then kill).
    Stop {
        /// VM id or name.
        vm: String,
        /// Kill the VMM at once.
        #[arg(long)]
        force: bool,
        /// Makes retries safe: a retry with the same id returns the first call's result
        /// instead of running again (e.g. a UUID per CI job step; remembered for 24 hours).
        #[arg(long, value_name = "ID")]
        request_id: Option<String>,
    },
    /// Freeze a running VM: its vCPUs stop in place, memory and devices are kept, the guest's
    /// clock stands still. Exec and copies are refused until it is resumed; stop and delete
    /// work.
    Pause {
        /// VM id or name.
        vm: String,
        /// Makes retries safe (see `vm stop --help`).
        #[arg(long, value_name = "ID")]
        request_id: Option<String>,
    },
    /// Take a snapshot of a running VM: its memory, devices and disk at this instant (the
    /// guest's file systems synced first; refused while an exec or copy runs). The VM then
    /// runs on from the snapshot (or stops, with --stop). Under QEMU it needs bangerd's
    /// `agent_channel = "virtio-serial"`; under Firecracker, its jailer.
    Snapshot {
        /// VM id or name.
        vm: String,
        /// The snapshot's name (a-z, 0-9, -).
        name: String,
        /// Stop the VM instead of resuming it.
        #[arg(long)]
        stop: bool,
        /// The guest has no agent (created with --no-wait from an image without one):
        /// nothing is synced in it, and VMs started from the snapshot (with --no-wait) keep
        /// its hostname, machine-id, random state and guest addresses.
        #[arg(long)]
        without_agent: bool,
        /// Label the snapshot (repeatable).
        #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// Makes retries safe (see `vm stop --help`).
        #[arg(long, value_name = "ID")]
        request_id: Option<String>,
    },
    /// Let a paused VM run again from where it stopped.
    Resume {
        /// VM id or name.
        vm: String,
        /// Makes retries safe (see `vm stop --help`).
        #[arg(long, value_name = "ID")]
        request_id: Option<String>,
    },
    /// Delete VMs, stopping them first; their disks are discarded.
    Delete {
        /// VM ids or names.
        #[arg(required = true)]
        vms: Vec<String>,
        /// Succeed for VMs that do not exist.
        #[arg(long)]
        missing_ok: bool,
        /// Makes retries safe: a retry with the same id returns the first call's result
        /// instead of running again (one VM per call when given).
        #[arg(long, value_name = "ID")]
        request_id: Option<String>,
    },
    /// List VMs, oldest first: every one, or those matching the filters.
    #[command(alias = "ls")]
    List {
        /// Only VMs carrying this label (repeatable: all must match).
        #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// Only VMs in this state (repeatable: any may match): created, starting, running,
        /// stopping, stopped, error, paused.
        #[arg(long = "state", value_name = "STATE", value_parser = parse_state)]
        states: Vec<i32>,
    },
    /// Wait until a VM is in a state (running by default), then show it.
    ///
    /// Exits 1, printing DEADLINE_EXCEEDED, when --timeout passes first.
    Wait {
        /// VM id or name.
        vm: String,
        /// The state to wait for: created, starting, running, stopping, stopped, error,
        /// paused.
        #[arg(long, value_name = "STATE", value_parser = parse_state, default_value = "running")]
        state: i32,
        /// Give up after this long (e.g. 90s, 5m).
        #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "5m")]
        timeout: std::time::Duration,
    },
    /// Follow VM events as they happen: state changes, completed operation stages with
    /// their timings, deletions. Runs until interrupted.
    ///
    /// Each line starts with the event's revision; --from REVISION replays what followed it
    /// (e.g. after a reconnect), for up to 24 hours.
    Watch {
        /// Only this VM (id or name).
        vm: Option<String>,
        /// Only VMs carrying this label (repeatable: all must match).
        #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// Replay the events after this revision first.
        #[arg(long = "from", value_name = "REVISION", default_value_t = 0)]
        from_revision: u64,
    },
    /// Give a VM a new time to live, counted from now (or none with --no-ttl).
    Touch {
        /// VM id or name.
        vm: String,
        /// The new time to live (e.g. 30s, 10m, 2h, 1d).
        #[arg(long, value_name = "DURATION", value_parser = parse_duration, required_unless_present = "no_ttl")]
        ttl: Option<std::time::Duration>,
        /// Remove the VM's expiry: it lives until deleted.
        #[arg(long, conflicts_with = "ttl")]
        no_ttl: bool,
    },
    /// Print a VM's console log (the guest's serial output), or its VMM's log with --vmm.
    Logs {
        /// VM id or name.
        vm: String,
        /// Keep printing what is appended, until interrupted or the VM is deleted.
        #[arg(short, long)]
        follow: bool,
        /// The VMM's own log instead of the guest's console.
        #[arg(long)]
        vmm: bool,
        /// Start this many bytes before the end [default: the whole log].
        #[arg(long, value_name = "BYTES")]
        tail: Option<u64>,
    },
    /// Copy a file into or out of a running VM: `vm cp LOCAL VM:PATH` or `vm cp VM:PATH LOCAL`.
    ///
    /// Streamed both ways (any size); the copy appears complete or not at all. Into a VM the
    /// file keeps its local mode unless --mode is given. Out of a VM it gets the guest's
    /// permission bits without setuid, setgid and sticky (unless --preserve-special); it is
    /// written to a new file with an unpredictable name beside the destination and renamed
    /// into place only when its size is the one the guest announced. A directory travels as
    /// one tar stream, modes kept and links stored as links, nothing left of a failed copy:
    /// into a VM it replaces a directory there once all of it arrived; out of a VM it is
    /// extracted beside a destination that must not exist (only files, directories and links,
    /// nothing outside it, no setuid bits unless --preserve-special).
    Cp {
        /// Source: a local path (a file or a directory), or VM:ABSOLUTE-PATH (the same).
        source: String,
        /// Destination: a local path, or VM:ABSOLUTE-PATH.
        destination: String,
        /// Mode of the file written into the VM, in octal (e.g. 0755).
        #[arg(long, value_name = "OCTAL", value_parser = parse_mode)]
        mode: Option<u32>,
        /// Out of a VM: keep the guest's setuid, setgid and sticky bits (a guest is untrusted:
        /// they are dropped by default).
        #[arg(long)]
        preserve_special: bool,
    },
    /// Show one VM in detail.
    Show {
        /// VM id or name.
        vm: String,
    },
    /// Run a command in a running VM; exits with the command's exit code.
    ///
    /// A command killed by a signal exits 128+signal, a timed-out one 124; banger's own
    /// errors exit 125.
    Exec {
        /// VM id or name.
        vm: String,
        #[command(flatten)]
        process: ProcessArgs,
    },
    /// Open a shell in a running VM, on a terminal (alias: ssh).
    ///
    /// The user's login shell from the guest's /etc/passwd (root's unless -u; /bin/sh when it
    /// names none), or the command after --, runs on a new terminal in the guest. This terminal
    /// is in raw mode until it ends: Ctrl-C and Ctrl-Z reach the guest's foreground job, its
    /// size follows this window's. Exits with the shell's exit code; banger's own errors exit
    /// 125.
    #[command(visible_alias = "ssh")]
    Shell {
        /// VM id or name.
        vm: String,
        #[command(flatten)]
        shell: ShellArgs,
    },
    /// Create a VM, run a command in it, print its output, exit with its exit code.
    ///
    /// Without a command: the image's Entrypoint and Cmd, or, on a terminal, a login shell
    /// (`banger vm run --rm` is a throw-away shell). The VM is kept unless --rm is given.
    /// banger's own errors exit 125.
    Run {
        /// A git repository to bring in first (what git would ship: tracked files as they are
        /// in the working tree, untracked ones with --include-untracked, no ignored ones), to
        /// /root/repo unless -w says where; the command runs there.
        #[arg(value_name = "REPO")]
        workspace: Option<PathBuf>,
        /// With REPO: also its untracked files (never ignored ones).
        #[arg(long, requires = "workspace")]
        include_untracked: bool,
        #[command(flatten)]
        shape: VmShape,
        /// Delete the VM afterwards, whatever the command's outcome.
        #[arg(long)]
        rm: bool,
        #[command(flatten)]
        process: ProcessArgs,
    },
    /// A git repository in a VM: pushed in, its changes exported back as a patch.
    #[command(subcommand)]
    Workspace(WorkspaceCommand),
}

#[derive(Debug, Subcommand)]
enum WorkspaceCommand {
    /// Bring a git repository into a running VM as one stream: tracked files as they are in
    /// the working tree, untracked ones with --include-untracked, never ignored ones; links
    /// stay links, modes are kept. A directory at the destination is replaced once the whole
    /// tree arrived. It comes with a `.git` whose one commit (`banger-base`, made on this
    /// host) is exactly what was pushed: `export` diffs against it.
    Push {
        /// VM id or name.
        vm: String,
        /// The repository (any directory in it).
        path: PathBuf,
        /// Where it goes in the guest.
        #[arg(short = 'w', long, value_name = "DIR", default_value = workspace::DEFAULT_WORKDIR)]
        workdir: String,
        /// Also the untracked files (never ignored ones).
        #[arg(long)]
        include_untracked: bool,
    },
    /// Print the guest's changes to a pushed workspace as a binary git patch (new, changed,
    /// deleted files; modes), which `git apply` reproduces in the repository on the host.
    Export {
        /// VM id or name.
        vm: String,
        /// Where the workspace is in the guest.
        #[arg(short = 'w', long, value_name = "DIR", default_value = workspace::DEFAULT_WORKDIR)]
        workdir: String,
        /// Changes since this commit of the guest's repository [default: what was pushed].
        #[arg(long, value_name = "COMMIT")]
        base: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
// Parsed once per process: the size of its largest variant does not matter.
#[allow(clippy::large_enum_variant)]
enum ImageCommand {
    /// Pull a container image from a registry and make it bootable (OCI distribution or
    /// Docker registry v2; docker.io is the default registry; an image index is resolved to
    /// linux/amd64). Layers already stored are not downloaded again. Progress is shown as it
    /// goes.
    Pull {
        /// The reference: `debian:bookworm`, `127.0.0.1:5000/ci/builder@sha256:…`.
        reference: String,
        /// Name of the new image [default: from the reference, `debian-bookworm`].
        #[arg(long)]
        name: Option<String>,
        /// Label the image (repeatable).
        #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// Makes retries safe: a retry with the same id returns the first call's result.
        #[arg(long, value_name = "ID")]
        request_id: Option<String>,
    },
    /// Import an image: a container image (an OCI layout, a `docker save` archive, or an
    /// archive uploaded from this machine), or a kernel, optional initramfs and ext4 root
    /// file system.
    ///
    /// A container image's layers are stored by digest, merged and written into an ext4
    /// root file system without mounting anything; its VMs boot the default image's kernel,
    /// and ExecVm takes its Env, WorkingDir and User as defaults. Progress is shown as it
    /// goes.
    #[command(group(clap::ArgGroup::new("source").required(true).args(["oci", "archive", "upload", "kernel"])))]
    Import {
        /// Name of the new image.
        name: String,
        /// An OCI image layout directory on the daemon's host, optionally with the tag to
        /// take (`./layout:1.0`).
        #[arg(long, value_name = "DIR[:TAG]")]
        oci: Option<String>,
        /// An archive on the daemon's host: `docker save`/`podman save` output, or an OCI
        /// layout packed as a tar.
        #[arg(long, visible_alias = "docker-archive", value_name = "PATH")]
        archive: Option<PathBuf>,
        /// An archive on this machine, streamed to the daemon (for a daemon on another host).
        #[arg(long, value_name = "PATH")]
        upload: Option<PathBuf>,
        /// Which image of an archive holding several (a repository tag).
        #[arg(long, value_name = "TAG")]
        tag: Option<String>,
        /// Kernel (bzImage or ELF vmlinux), absolute path.
        #[arg(long, value_name = "PATH", requires = "rootfs")]
        kernel: Option<PathBuf>,
        /// Root file system (ext4 image), absolute path.
        #[arg(long, value_name = "PATH", requires = "kernel")]
        rootfs: Option<PathBuf>,
        /// Initramfs, absolute path.
        #[arg(long, value_name = "PATH")]
        initrd: Option<PathBuf>,
        /// Extra kernel command-line arguments for every VM of this image.
        #[arg(long, value_name = "ARGS", default_value = "")]
        kernel_args: String,
        /// Label the image (repeatable).
        #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// Makes retries safe: a retry with the same id returns the first call's result
        /// instead of running again (remembered for 24 hours).
        #[arg(long, value_name = "ID")]
        request_id: Option<String>,
    },
    /// List every image.
    #[command(alias = "ls")]
    List,
    /// Show one image.
    Show {
        /// Image id, name, or the registry reference it was pulled from.
        image: String,
    },
    /// Delete an image no VM uses.
    Delete {
        /// Image id, name, or the registry reference it was pulled from.
        image: String,
    },
}

fn main() -> ExitCode {
    let matches = with_daemon_defaults(Cli::command()).get_matches();
    let socket_given = matches.value_source("socket") == Some(ValueSource::CommandLine);
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(err) => err.exit(),
    };
    match cli.command {
        Command::Tls(command) => return tls_command(command),
        Command::Token(command) => return token_command(command),
        _ => {}
    }
    let credentials = match credentials(&cli) {
        Ok(credentials) => credentials,
        Err(message) => {
            eprintln!("banger: INVALID_ARGUMENT: {message}");
            return ExitCode::from(2);
        }
    };
    let target = match (cli.endpoint, cli.socket) {
        (Some(endpoint), _) => Target::Endpoint(endpoint),
        (None, Some(socket)) => Target::Unix(socket),
        (None, None) => Target::Unix(PathBuf::from(DEFAULT_SOCKET)),
    };
    let autostart = !cli.no_autostart && !socket_given && matches!(target, Target::Unix(_));
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("banger: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let command_name = command_name(&matches);
    runtime.block_on(async move {
        let telemetry = telemetry::CliTelemetry::init(cli.otlp_endpoint.as_deref());
        let span = tracing::info_span!("command", otel.name = %command_name, otel.kind = "client");
        output::set_json(cli.output == OutputFormat::Json);
        let code =
            tracing::Instrument::instrument(commands::run(target, credentials, autostart, cli.command), span).await;
        telemetry.shutdown();
        code
    })
}

/// `banger tls ...`.
fn tls_command(command: TlsCommand) -> ExitCode {
    use banger_client::pki::{self, Ca, Usage};
    let result = (|| -> Result<(), String> {
        let write = |path: PathBuf, contents: &str, private: bool| -> Result<(), String> {
            if path.exists() {
                return Err(format!("{} exists: not overwritten", path.display()));
            }
            pki::write_file(&path, contents, private).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            println!("wrote {}", path.display());
            Ok(())
        };
        let issue_client =
            |ca: &Ca, dir: &std::path::Path, name: &str, until: std::time::SystemTime| -> Result<(), String> {
                let client = ca.issue(Usage::Client, &[name.to_owned()], until).map_err(|e| e.to_string())?;
                let (cert, key, serial) = pki::client_files(dir, name);
                write(cert, &client.cert_pem, false)?;
                write(key, &client.key_pem, true)?;
                write(serial, &hex::encode(&client.serial), false)
            };
        match command {
            TlsCommand::Revoke { dir, names } => {
                let read = |path: PathBuf| {
                    std::fs::read_to_string(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))
                };
                let ca =
                    Ca::load(&read(dir.join("ca.pem"))?, &read(dir.join("ca-key.pem"))?).map_err(|e| e.to_string())?;
                let list = dir.join("revoked.txt");
                let mut revoked: Vec<String> =
                    std::fs::read_to_string(&list).unwrap_or_default().lines().map(str::to_owned).collect();
                for name in &names {
                    let serial = read(pki::client_files(&dir, name).2)?.trim().to_owned();
                    if !revoked.contains(&serial) {
                        revoked.push(serial);
                    }
                }
                let serials = revoked
                    .iter()
                    .map(|s| hex::decode(s).map_err(|e| format!("{}: {e}", list.display())))
                    .collect::<Result<Vec<_>, _>>()?;
                let crl = ca.crl(&serials, serials.len() as u64, pki::DEFAULT_VALIDITY).map_err(|e| e.to_string())?;
                pki::write_file(&list, &(revoked.join("\n") + "\n"), false).map_err(|e| e.to_string())?;
                let crl_path = std::path::absolute(dir.join("crl.pem")).unwrap_or_else(|_| dir.join("crl.pem"));
                pki::write_file(&crl_path, &crl, false).map_err(|e| e.to_string())?;
                println!(
                    "wrote {} ({} revoked); bangerd's config: [tls] crl = \"{}\"",
                    crl_path.display(),
                    serials.len(),
                    crl_path.display()
                );
            }
            TlsCommand::Init { dir, mut server_names, clients, valid } => {
                if !dir.exists() {
                    // Private keys go in it: 0700, set explicitly.
                    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
                    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
                        .map_err(|e| format!("cannot chmod {}: {e}", dir.display()))?;
                }
                if server_names.is_empty() {
                    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
                    server_names.extend([host.trim().to_owned(), "localhost".into(), "127.0.0.1".into()]);
                    server_names.retain(|n| !n.is_empty());
                }
                let until = std::time::SystemTime::now() + valid;
                let ca = Ca::new(pki::CA_NAME).map_err(|e| e.to_string())?;
                let server = ca.issue(Usage::Server, &server_names, until).map_err(|e| e.to_string())?;
                write(dir.join("ca.pem"), &ca.cert_pem, false)?;
                write(dir.join("ca-key.pem"), &ca.key_pem(), true)?;
                write(dir.join("server.pem"), &server.cert_pem, false)?;
                write(dir.join("server-key.pem"), &server.key_pem, true)?;
                for name in &clients {
                    issue_client(&ca, &dir, name, until)?;
                }
                let dir = std::path::absolute(&dir).unwrap_or(dir);
                println!("\n# bangerd's config (then start it with --listen HOST:PORT):");
                println!(
                    "[tls]\nca = \"{0}/ca.pem\"\ncert = \"{0}/server.pem\"\nkey = \"{0}/server-key.pem\"",
                    dir.display()
                );
                for name in &clients {
                    println!("\n[[auth.grants]]\ncert = \"{name}\"\nrole = \"operator\"  # viewer, operator or admin");
                }
                println!("\n# keep ca-key.pem offline once every certificate is made (banger tls client needs it)");
            }
            TlsCommand::Client { dir, name, valid } => {
                let read = |file: &str| {
                    let path = dir.join(file);
                    std::fs::read_to_string(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))
                };
                let ca = Ca::load(&read("ca.pem")?, &read("ca-key.pem")?).map_err(|e| e.to_string())?;
                let until = std::time::SystemTime::now() + valid;
                issue_client(&ca, &dir, &name, until)?;
                println!("\n[[auth.grants]]\ncert = \"{name}\"\nrole = \"operator\"  # viewer, operator or admin");
            }
        }
        Ok(())
    })();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("banger: {message}");
            ExitCode::FAILURE
        }
    }
}

/// `banger token new`.
fn token_command(command: TokenCommand) -> ExitCode {
    let TokenCommand::New { name, role, tenant, expires_in } = command;
    let (token, digest) = match banger_client::pki::new_token() {
        Ok(made) => made,
        Err(e) => {
            eprintln!("banger: cannot make a token: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("token (shown once; give it to the caller, e.g. as BANGER_TOKEN): {token}");
    println!("\n# bangerd's config:\n[[auth.tokens]]\nname = \"{name}\"\nsha256 = \"{digest}\"\nrole = \"{role}\"");
    if let Some(tenant) = tenant {
        println!("tenant = \"{tenant}\"");
    }
    if let Some(after) = expires_in {
        let at = humantime::format_rfc3339_seconds(std::time::SystemTime::now() + after);
        println!("expires = \"{at}\"");
    }
    ExitCode::SUCCESS
}

/// The credentials the flags name, their files read.
fn credentials(cli: &Cli) -> Result<banger_client::Credentials, String> {
    let read = |path: &PathBuf| std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()));
    Ok(banger_client::Credentials {
        tls_ca: cli.tls_ca.as_ref().map(read).transpose()?,
        tls_identity: match (&cli.tls_cert, &cli.tls_key) {
            (Some(cert), Some(key)) => Some((read(cert)?, read(key)?)),
            _ => None,
        },
        tls_server_name: cli.tls_server_name.clone(),
        token: cli.token.clone(),
    })
}

/// For `vm create --help` and `vm run --help`: the shape defaults of the daemon this command
/// would reach over its unix socket, in the help of the flags they fill in (when it answers
/// within a second; never autostarted for help).
fn with_daemon_defaults(command: clap::Command) -> clap::Command {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let asks = |word: &str| args.iter().any(|arg| arg == word);
    if !(asks("vm") && (asks("create") || asks("run")) && (asks("--help") || asks("-h"))) {
        return command;
    }
    let socket = args
        .iter()
        .position(|arg| arg == "--socket")
        .and_then(|at| args.get(at + 1).map(PathBuf::from))
        .or_else(|| args.iter().find_map(|arg| arg.strip_prefix("--socket=").map(PathBuf::from)))
        .or_else(|| std::env::var_os("BANGER_SOCKET").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET));
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
        return command;
    };
    let defaults = runtime.block_on(async {
        let ask = async {
            let mut client =
                banger_client::Client::connect_with(&Target::Unix(socket), &banger_client::Credentials::default())
                    .await
                    .ok()?;
            let report = client.host.get_host(banger_client::pb::GetHostRequest {}).await.ok()?;
            report.into_inner().vm_defaults
        };
        tokio::time::timeout(std::time::Duration::from_secs(1), ask).await.ok().flatten()
    });
    let Some(defaults) = defaults else { return command };
    let disk = match defaults.disk_size_bytes {
        0 => "the image's size".to_owned(),
        bytes => format!("{}M, or the image's size when bigger", bytes >> 20),
    };
    let help = [
        ("vcpus", "Number of virtual CPUs".to_owned(), defaults.vcpus.to_string()),
        ("memory", "Guest memory in MiB".to_owned(), defaults.memory_mib.to_string()),
        (
            "disk_size",
            "Root disk size (e.g. 10G, 512M; at least the image's): the guest's root file system grows to fill it \
             at boot, and the host stores only what the guest writes"
                .to_owned(),
            disk,
        ),
    ];
    let shape = |mut sub: clap::Command| {
        for (arg, text, default) in &help {
            let line = format!("{text} [default: {default}, bangerd's vm_defaults]");
            sub = sub.mut_arg(*arg, |a| a.help(line.clone()).long_help(line));
        }
        sub
    };
    command.mut_subcommand("vm", |vm| vm.mut_subcommand("create", shape).mut_subcommand("run", shape))
}

/// `banger vm create`, from the parsed subcommands.
fn command_name(matches: &clap::ArgMatches) -> String {
    let mut name = String::from("banger");
    let mut current = matches;
    while let Some((sub, sub_matches)) = current.subcommand() {
        name.push(' ');
        name.push_str(sub);
        current = sub_matches;
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_take_binary_suffixes() {
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("ten").is_err() && parse_size("1X").is_err());
    }
}
