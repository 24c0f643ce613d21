//! `banger`: the command-line client of bangerd.

mod autostart;
mod commands;
mod output;
mod telemetry;

use std::{path::PathBuf, process::ExitCode};

use banger_client::{DEFAULT_SOCKET, Target};
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand, parser::ValueSource};

/// Manage the microVMs and images of a bangerd host.
///
/// Talks to bangerd over its unix socket (default /run/banger/bangerd.sock) or, with
/// --endpoint, over TCP. When the socket comes from the default or BANGER_SOCKET and nothing
/// answers, banger starts bangerd itself (next to the banger binary, else from PATH) and
/// waits until it is healthy; --no-autostart or BANGER_NO_AUTOSTART=1 turn that off, and an
/// explicit --socket or --endpoint never autostarts. Errors print the gRPC code, the message
/// and the operation id.
#[derive(Debug, Parser)]
#[command(name = "banger", version, propagate_version = true)]
struct Cli {
    /// The daemon's unix socket.
    #[arg(long, global = true, env = "BANGER_SOCKET", value_name = "PATH", conflicts_with = "endpoint")]
    socket: Option<PathBuf>,
    /// The daemon's TCP endpoint, e.g. http://127.0.0.1:7070.
    #[arg(long, global = true, env = "BANGER_ENDPOINT", value_name = "URL")]
    endpoint: Option<String>,
    /// Export this command's trace over OTLP/gRPC (e.g. http://127.0.0.1:4317); the daemon's
    /// spans for it join the same trace.
    #[arg(long, global = true, env = "OTEL_EXPORTER_OTLP_ENDPOINT", value_name = "URL")]
    otlp_endpoint: Option<String>,
    /// Never start bangerd when it does not answer.
    #[arg(long, global = true, env = "BANGER_NO_AUTOSTART", value_parser = clap::builder::BoolishValueParser::new())]
    no_autostart: bool,
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
    /// Check what this host supports and show which drivers bangerd uses.
    ///
    /// Exits 1 when a check fails (VMs cannot run until it is fixed).
    Doctor,
}

/// The shape of a new VM.
#[derive(Debug, Args)]
struct VmShape {
    /// Name of the VM (a hostname label: a-z, 0-9, -); generated when omitted.
    #[arg(long)]
    name: Option<String>,
    /// Image id or name [default: the host's default image].
    #[arg(long)]
    image: Option<String>,
    /// Number of virtual CPUs [default: 1].
    #[arg(long)]
    vcpus: Option<u32>,
    /// Guest memory in MiB [default: 256].
    #[arg(long, value_name = "MIB")]
    memory: Option<u32>,
}

/// How to run a guest process.
#[derive(Debug, Args)]
struct ProcessArgs {
    /// Forward this terminal's standard input to the process.
    #[arg(short, long)]
    interactive: bool,
    /// Extra environment variable for the process (repeatable).
    #[arg(short, long, value_name = "NAME=VALUE")]
    env: Vec<String>,
    /// Working directory in the guest.
    #[arg(short = 'w', long, value_name = "DIR")]
    workdir: Option<String>,
    /// Kill the process after this many seconds (exit code 124).
    #[arg(long, value_name = "SECONDS")]
    timeout: Option<u32>,
    /// The program and its arguments.
    #[arg(required = true, last = true, value_name = "CMD")]
    argv: Vec<String>,
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
    /// Delete VMs, stopping them first; their disks are discarded.
    Delete {
        /// VM ids or names.
        #[arg(required = true)]
        vms: Vec<String>,
        /// Makes retries safe: a retry with the same id returns the first call's result
        /// instead of running again (one VM per call when given).
        #[arg(long, value_name = "ID")]
        request_id: Option<String>,
    },
    /// List every VM.
    #[command(alias = "ls")]
    List,
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
    /// Create a VM, run a command in it, print its output, exit with its exit code.
    ///
    /// The VM is kept unless --rm is given. banger's own errors exit 125.
    Run {
        #[command(flatten)]
        shape: VmShape,
        /// Delete the VM afterwards, whatever the command's outcome.
        #[arg(long)]
        rm: bool,
        #[command(flatten)]
        process: ProcessArgs,
    },
}

#[derive(Debug, Subcommand)]
enum ImageCommand {
    /// Import a kernel, optional initramfs and ext4 root file system from paths on the daemon's host.
    Import {
        /// Name of the new image.
        name: String,
        /// Kernel (bzImage or ELF vmlinux), absolute path.
        #[arg(long, value_name = "PATH")]
        kernel: PathBuf,
        /// Root file system (ext4 image), absolute path.
        #[arg(long, value_name = "PATH")]
        rootfs: PathBuf,
        /// Initramfs, absolute path.
        #[arg(long, value_name = "PATH")]
        initrd: Option<PathBuf>,
        /// Extra kernel command-line arguments for every VM of this image.
        #[arg(long, value_name = "ARGS", default_value = "")]
        kernel_args: String,
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
        /// Image id or name.
        image: String,
    },
    /// Delete an image no VM uses.
    Delete {
        /// Image id or name.
        image: String,
    },
}

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let socket_given = matches.value_source("socket") == Some(ValueSource::CommandLine);
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(err) => err.exit(),
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
        let code = tracing::Instrument::instrument(commands::run(target, autostart, cli.command), span).await;
        telemetry.shutdown();
        code
    })
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
