//! banger-agent: the guest agent; parses flags, optionally supervises as PID 1, then serves `banger.agent.v1`.

/// Writes one line to stderr (the guest console when the agent is init), tagged with the agent's PID.
macro_rules! log {
    ($($arg:tt)*) => {
        eprintln!("banger-agent[{}]: {}", std::process::id(), format_args!($($arg)*))
    };
}

mod auth;
mod exec;
mod files;
mod grow_root;
mod guest_root;
mod identity;
mod pty;
mod serial;
mod service;
mod supervisor;
mod switch_root;
mod user;

use std::ffi::OsString;
use std::io;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use banger_proto::{agent::v1::agent_service_server::AgentServiceServer, error_chain};
use tokio_stream::{Stream, StreamExt};
use tokio_vsock::{VMADDR_CID_ANY, VsockAddr, VsockListener};
use tonic::transport::Server;

use crate::service::{Agent, ShutdownAction};

/// The AF_VSOCK port the agent listens on; the host's `CONNECT` line names it.
const AGENT_VSOCK_PORT: u32 = 1024;

/// How long to wait after a failed accept: tonic retries accept errors at once, so a persistent
/// error such as EMFILE would otherwise spin the guest's only CPU.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

const USAGE: &str = "usage: banger-agent [--init [--switch-root DIR]] [--vsock-port PORT | --listen-unix PATH]";

/// Where the gRPC server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Listen {
    /// AF_VSOCK on any CID: the production transport.
    Vsock { port: u32 },
    /// A unix socket on the host, for tests; Shutdown then exits the process instead of powering off.
    Unix { path: PathBuf },
}

/// The parsed command line.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Args {
    /// Act as init: supervise the server from PID 1 and reap orphans.
    init: bool,
    /// As init, first make this directory (the guest's root disk, mounted by the initramfs)
    /// the root file system.
    switch_root: Option<PathBuf>,
    listen: Listen,
}

/// A command line the agent does not understand.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
enum UsageError {
    #[error("unknown argument {0:?}")]
    UnknownArgument(OsString),
    #[error("{0} needs a value")]
    MissingValue(&'static str),
    #[error("invalid vsock port {0:?}")]
    InvalidPort(OsString),
    #[error("--switch-root needs --init")]
    SwitchRootWithoutInit,
}

/// Why the server could not start or stopped.
#[derive(Debug, thiserror::Error)]
enum ServeError {
    #[error("could not build the tokio runtime")]
    Runtime(#[source] io::Error),
    #[error("could not listen on vsock port {port}")]
    BindVsock {
        port: u32,
        #[source]
        source: io::Error,
    },
    #[error("could not listen on unix socket {}", path.display())]
    BindUnix {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("grpc server stopped")]
    Serve(#[source] tonic::transport::Error),
}

impl Args {
    fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Self, UsageError> {
        let mut init = false;
        let mut switch_root = None;
        let mut listen = Listen::Vsock { port: AGENT_VSOCK_PORT };
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            match arg.to_str() {
                Some("--init") => init = true,
                Some("--switch-root") => {
                    switch_root = Some(args.next().ok_or(UsageError::MissingValue("--switch-root"))?.into());
                }
                Some("--listen-unix") => {
                    let path = args.next().ok_or(UsageError::MissingValue("--listen-unix"))?;
                    listen = Listen::Unix { path: path.into() };
                }
                Some("--vsock-port") => {
                    let port = args.next().ok_or(UsageError::MissingValue("--vsock-port"))?;
                    let parsed = port.to_str().and_then(|p| p.parse().ok());
                    let port = parsed.ok_or(UsageError::InvalidPort(port))?;
                    listen = Listen::Vsock { port };
                }
                _ => return Err(UsageError::UnknownArgument(arg)),
            }
        }
        if switch_root.is_some() && !init {
            return Err(UsageError::SwitchRootWithoutInit);
        }
        Ok(Self { init, switch_root, listen })
    }
}

fn main() -> ExitCode {
    // First, while the process has one thread: the environment is not thread-safe.
    auth::init_from_env();
    let args = match Args::parse(std::env::args_os().skip(1)) {
        Ok(args) => args,
        Err(err) => {
            log!("{err}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    if args.switch_root.is_some() && std::process::id() != 1 {
        log!("--switch-root is for the guest's PID 1 only");
        return ExitCode::from(2);
    }
    if let Some(new_root) = &args.switch_root
        && let Err(err) = switch_root::switch_root(new_root)
    {
        // As PID 1, exiting panics the guest kernel: the VMM exits and the host sees why.
        log!("cannot switch to the root file system at {}: {err}", new_root.display());
        return ExitCode::FAILURE;
    }
    // Only as the guest's PID 1: never a host's root file system (tests start `--init` too).
    if args.init && std::process::id() == 1 {
        if let Err(problem) = guest_root::prepare() {
            log!("the guest's root file system is not usable: {problem}");
        }
        match grow_root::grow_root() {
            Ok(Some(bytes)) => log!("grew the root file system to its disk: {} MiB", bytes >> 20),
            Ok(None) => {}
            Err(err) => log!("cannot grow the root file system to its disk: {err}"),
        }
    }
    if args.init {
        // Must run before the runtime exists: fork() only copies the calling thread.
        supervisor::supervise_if_pid1();
    }
    match run(args.listen) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            log!("{}", error_chain(&err));
            ExitCode::FAILURE
        }
    }
}

/// Builds the runtime by hand (not `#[tokio::main]`) so that the supervisor's fork happens first.
fn run(listen: Listen) -> Result<(), ServeError> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(ServeError::Runtime)?;
    runtime.block_on(serve(listen))
}

async fn serve(listen: Listen) -> Result<(), ServeError> {
    match listen {
        Listen::Vsock { port } => {
            // A VM has vsock, a virtio-serial port named for the agent (VMs that can be
            // snapshotted), or both: each is served.
            let vsock = VsockListener::bind(VsockAddr::new(VMADDR_CID_ANY, port));
            let serial_port = serial::find_port();
            let serve_vsock = async {
                match vsock {
                    Ok(listener) => {
                        log!("serving banger.agent.v1 on vsock port {port}");
                        Server::builder()
                            .add_service(AgentServiceServer::with_interceptor(
                                Agent::new(ShutdownAction::PowerOff),
                                auth::intercept,
                            ))
                            .serve_with_incoming(pause_after_accept_errors(listener.incoming()))
                            .await
                            .map_err(ServeError::Serve)
                    }
                    Err(source) if serial_port.is_some() => {
                        log!("no vsock ({source}): serving the virtio-serial port only");
                        std::future::pending().await
                    }
                    Err(source) => Err(ServeError::BindVsock { port, source }),
                }
            };
            let serve_serial = async {
                let Some(path) = serial_port.clone() else { return std::future::pending().await };
                log!("serving banger.agent.v1 on virtio-serial port {}", path.display());
                Server::builder()
                    .add_service(AgentServiceServer::with_interceptor(
                        Agent::new(ShutdownAction::PowerOff),
                        auth::intercept,
                    ))
                    .serve_with_incoming(serial::incoming(path))
                    .await
                    .map_err(ServeError::Serve)
            };
            tokio::select! {
                served = serve_vsock => served,
                served = serve_serial => served,
            }
        }
        Listen::Unix { path } => {
            remove_stale_socket(&path);
            let listener = tokio::net::UnixListener::bind(&path)
                .map_err(|source| ServeError::BindUnix { path: path.clone(), source })?;
            log!("serving banger.agent.v1 on unix socket {}", path.display());
            let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
            Server::builder()
                .add_service(AgentServiceServer::with_interceptor(
                    Agent::new(ShutdownAction::ExitProcess),
                    auth::intercept,
                ))
                .serve_with_incoming(pause_after_accept_errors(incoming))
                .await
                .map_err(ServeError::Serve)
        }
    }
}

/// Passes accepted connections through, but sleeps after an accept error before passing it on.
fn pause_after_accept_errors<S, T>(incoming: S) -> impl Stream<Item = io::Result<T>>
where
    S: Stream<Item = io::Result<T>>,
{
    incoming.then(|accepted| async move {
        if let Err(err) = &accepted {
            log!("accept failed: {err}");
            tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
        }
        accepted
    })
}

/// Removes a socket file left by an earlier run, so that a restarted test agent can bind again.
fn remove_stale_socket(path: &std::path::Path) {
    use std::os::unix::fs::FileTypeExt;
    if std::fs::symlink_metadata(path).is_ok_and(|meta| meta.file_type().is_socket()) {
        let _ = std::fs::remove_file(path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Args, UsageError> {
        Args::parse(args.iter().map(OsString::from))
    }

    #[test]
    fn defaults_to_vsock_1024_without_init() {
        let args = parse(&[]).expect("empty command line parses");
        assert!(!args.init);
        assert_eq!(args.listen, Listen::Vsock { port: 1024 });
    }

    #[test]
    fn parses_init_and_unix_listener() {
        let args = parse(&["--init", "--listen-unix", "/tmp/a.sock"]).expect("parses");
        assert!(args.init);
        assert_eq!(args.listen, Listen::Unix { path: "/tmp/a.sock".into() });
    }

    #[test]
    fn rejects_bad_arguments() {
        assert_eq!(parse(&["--listen-unix"]), Err(UsageError::MissingValue("--listen-unix")));
        assert_eq!(parse(&["--vsock-port", "x"]), Err(UsageError::InvalidPort("x".into())));
        assert_eq!(parse(&["--bogus"]), Err(UsageError::UnknownArgument("--bogus".into())));
        assert_eq!(parse(&["--switch-root", "/mnt"]), Err(UsageError::SwitchRootWithoutInit));
    }

    #[test]
    fn parses_switch_root_as_init() {
        let args = parse(&["--init", "--switch-root", "/mnt"]).expect("parses");
        assert_eq!(args.switch_root.as_deref(), Some(std::path::Path::new("/mnt")));
    }
}
