//! Exec: starts one guest process per stream, feeds its stdin, streams its output, reports how it ended.
//!
//! Each process gets its own process group, so that killing it (client gone, timeout) also kills
//! whatever it started. A process that cannot be found behaves like it would under a shell: the
//! stream carries a message on stderr and exit code 127 (126 when it is not executable), so
//! `banger vm run -- nosuchcmd` looks like ssh; such a stream has no `started_pid`. Only malformed
//! requests (and failures to fork at all) become gRPC errors.
//!
//! With a terminal, the process runs on a new pseudo-terminal as the leader of its own session
//! (the terminal is its controlling terminal and its stdin, stdout and stderr): its output comes
//! as stdout, input is typed into it (so Ctrl-C interrupts its foreground job), resizes reach it
//! as SIGWINCH, and an empty argv runs the user's login shell.
//!
//! Once the process exits, output that its background children still write is streamed for
//! [`EXIT_DRAIN_GRACE`], then the exit is reported even if they hold the pipes open (ssh would
//! hang instead). Those children keep running; only a timeout or a vanished client kills the group.

use std::io;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::pin::Pin;
use std::process::Stdio;
use std::time::Duration;

use banger_proto::agent::v1::exec_request::Payload as RequestPayload;
use banger_proto::agent::v1::exec_response::Payload as ResponsePayload;
use banger_proto::agent::v1::exit_status::Status as ExitKind;
use banger_proto::agent::v1::{ExecRequest, ExecResponse, ExecStart, ExitStatus, Terminal};
use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::{Gid, Pid, Uid, setgid, setgroups, setuid};

use crate::{pty, user};
use std::os::fd::OwnedFd;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

/// The response stream of one Exec call.
pub type ExecStream = Pin<Box<dyn Stream<Item = Result<ExecResponse, Status>> + Send>>;

/// PATH for every process, unless the request's env overrides it.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// HOME for every process, unless the request's env overrides it.
const DEFAULT_HOME: &str = "/root";
/// Largest output chunk per message; a pipe rarely holds more at once anyway.
const OUTPUT_CHUNK: usize = 32 * 1024;
/// Responses buffered towards tonic; beyond this the process's output waits (backpressure).
const RESPONSE_BUFFER: usize = 16;
/// After the process exits, how long to keep streaming output that its leftovers (background
/// children holding the pipes) still write, before reporting the exit anyway.
const EXIT_DRAIN_GRACE: Duration = Duration::from_millis(500);
/// Exit code a shell reports for a command it cannot find.
const EXIT_NOT_FOUND: i32 = 127;
/// Exit code a shell reports for a command it cannot execute.
const EXIT_NOT_EXECUTABLE: i32 = 126;

/// Validates the first message, starts the process, and returns the stream of its responses.
pub async fn start(mut requests: Streaming<ExecRequest>) -> Result<ExecStream, Status> {
    let start = match requests.message().await? {
        Some(ExecRequest { payload: Some(RequestPayload::Start(start)) }) => start,
        Some(_) => {
            return Err(Status::invalid_argument("the first exec message must be ExecStart"));
        }
        None => {
            return Err(Status::invalid_argument("the exec stream ended before its ExecStart"));
        }
    };
    let mut plan = ExecPlan::try_from(start)?;
    plan.check_working_dir().await?;
    plan.check_user()?;

    plan.choose_login_shell();

    let (tx, rx) = mpsc::channel(RESPONSE_BUFFER);
    let terminal = match &plan.terminal {
        Some(terminal) => Some(
            pty::open(terminal.rows, terminal.columns)
                .map_err(|err| Status::internal(format!("cannot open a terminal: {err}")))?,
        ),
        None => None,
    };
    let spawned = match terminal {
        Some(pty) => plan.spawn_on_terminal(pty),
        None => plan.command().spawn().map(|mut child| {
            let io = ProcessIo {
                stdout: child.stdout.take().map(boxed_reader),
                stderr: child.stderr.take().map(boxed_reader),
                input: Input::Pipe(child.stdin.take().map(|stdin| Box::new(stdin) as BoxedWriter)),
            };
            (child, io)
        }),
    };
    match spawned {
        Ok((child, io)) => {
            tokio::spawn(supervise(child, io, requests, tx, plan.timeout));
        }
        Err(err) => {
            let code = spawn_failure_exit_code(&err).ok_or_else(|| match err.kind() {
                io::ErrorKind::InvalidInput => {
                    Status::invalid_argument(format!("cannot start {}: {err}", plan.program))
                }
                _ => Status::internal(format!("cannot start {}: {err}", plan.program)),
            })?;
            // The channel is fresh and larger than two messages, so try_send cannot fail here.
            let message = format!("banger-agent: {}: {}\n", plan.program, describe_spawn(&err));
            let _ = tx.try_send(Ok(payload(ResponsePayload::Stderr(message.into_bytes()))));
            let _ = tx.try_send(Ok(payload(ResponsePayload::Exit(ExitStatus {
                status: Some(ExitKind::Code(code)),
                timed_out: false,
            }))));
        }
    }
    Ok(Box::pin(ReceiverStream::new(rx)))
}

/// A validated ExecStart.
#[derive(Debug)]
struct ExecPlan {
    program: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    working_dir: Option<String>,
    /// `ExecStart.user`, resolved by `check_user`; root when empty.
    user: Option<String>,
    identity: Option<user::Identity>,
    stdin: bool,
    timeout: Option<Duration>,
    /// The terminal to run on, if any.
    terminal: Option<TerminalPlan>,
    /// argv[0] as the program sees it, when not `program` (a login shell's `-sh`).
    arg0: Option<String>,
}

/// A validated `ExecStart.terminal`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct TerminalPlan {
    term: String,
    rows: u16,
    columns: u16,
}

impl From<Terminal> for TerminalPlan {
    fn from(terminal: Terminal) -> Self {
        let size = terminal.size.unwrap_or_default();
        Self {
            term: Some(terminal.term).filter(|term| !term.is_empty()).unwrap_or_else(|| pty::DEFAULT_TERM.to_owned()),
            rows: pty::dimension(size.rows, pty::DEFAULT_ROWS),
            columns: pty::dimension(size.columns, pty::DEFAULT_COLUMNS),
        }
    }
}

/// The shell a login without a passwd entry gets.
const FALLBACK_SHELL: &str = "/bin/sh";

/// The process's output and input ends, pipes or a terminal's master.
struct ProcessIo {
    stdout: Option<BoxedReader>,
    stderr: Option<BoxedReader>,
    input: Input,
}

type BoxedReader = Box<dyn AsyncRead + Unpin + Send>;
type BoxedWriter = Box<dyn AsyncWrite + Unpin + Send>;

fn boxed_reader(reader: impl AsyncRead + Unpin + Send + 'static) -> BoxedReader {
    Box::new(reader)
}

/// Where standard input goes.
enum Input {
    /// A pipe (None: the process reads /dev/null, or the pipe was closed).
    Pipe(Option<BoxedWriter>),
    /// A terminal: input is typed into its master, which also takes resizes.
    Terminal { writer: BoxedWriter, master: OwnedFd },
}

impl TryFrom<ExecStart> for ExecPlan {
    type Error = Status;

    fn try_from(start: ExecStart) -> Result<Self, Status> {
        let terminal = start.terminal.map(TerminalPlan::from);
        let mut argv = start.argv.into_iter();
        // An empty argv on a terminal is a login shell, chosen once the user is known.
        let program = match argv.next() {
            Some(program) if !program.is_empty() => program,
            None if terminal.is_some() => String::new(),
            _ => return Err(Status::invalid_argument("argv must name a program")),
        };
        let env = start
            .env
            .into_iter()
            .map(|entry| match entry.split_once('=') {
                Some((name, value)) if !name.is_empty() => Ok((name.to_owned(), value.to_owned())),
                _ => Err(Status::invalid_argument(format!("env entry {entry:?} is not NAME=value"))),
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            program,
            args: argv.collect(),
            env,
            working_dir: Some(start.working_dir).filter(|dir| !dir.is_empty()),
            user: Some(start.user).filter(|user| !user.is_empty()),
            identity: None,
            stdin: start.stdin,
            timeout: (start.timeout_seconds > 0).then(|| Duration::from_secs(start.timeout_seconds.into())),
            terminal,
            arg0: None,
        })
    }
}

impl ExecPlan {
    /// Rejects a missing working directory up front: spawn would report it as NotFound,
    /// which would be mistaken for a missing program.
    async fn check_working_dir(&self) -> Result<(), Status> {
        let Some(dir) = &self.working_dir else {
            return Ok(());
        };
        match tokio::fs::metadata(dir).await {
            Ok(meta) if meta.is_dir() => Ok(()),
            Ok(_) => Err(Status::invalid_argument(format!("working directory {dir} is not a directory"))),
            Err(err) => Err(Status::invalid_argument(format!("working directory {dir}: {err}"))),
        }
    }

    /// Resolves `user` in the guest's /etc/passwd and /etc/group; an unknown name is the
    /// caller's error.
    fn check_user(&mut self) -> Result<(), Status> {
        if let Some(spec) = &self.user {
            self.identity = Some(user::resolve(spec).map_err(|err| Status::invalid_argument(err.to_string()))?);
        }
        Ok(())
    }

    /// For a terminal without argv: the user's login shell from /etc/passwd (root's when no
    /// user is named), started as a login shell (`-sh`) in the user's home.
    fn choose_login_shell(&mut self) {
        if !self.program.is_empty() {
            return;
        }
        let identity = match &self.identity {
            Some(identity) => Some(identity.clone()),
            None => user::resolve("0").ok(),
        };
        let shell = identity
            .as_ref()
            .and_then(|identity| identity.shell.clone())
            .filter(|shell| Path::new(shell).is_file())
            .unwrap_or_else(|| FALLBACK_SHELL.to_owned());
        let name = Path::new(&shell).file_name().map(|name| name.to_string_lossy().into_owned());
        self.arg0 = Some(format!("-{}", name.unwrap_or_else(|| "sh".to_owned())));
        self.program = shell;
        if self.working_dir.is_none() {
            let home = identity.as_ref().and_then(|identity| identity.home.clone()).unwrap_or(DEFAULT_HOME.to_owned());
            self.working_dir = Some(home).filter(|home| Path::new(home).is_dir());
        }
        let name = identity.and_then(|identity| identity.name).unwrap_or_else(|| "root".to_owned());
        for (variable, value) in [("SHELL", self.program.clone()), ("USER", name.clone()), ("LOGNAME", name)] {
            if !self.env.iter().any(|(set, _)| set == variable) {
                self.env.insert(0, (variable.to_owned(), value));
            }
        }
    }

    /// Starts the process on `pty`: its peer becomes stdin, stdout, stderr and the controlling
    /// terminal of a new session; the master is read for output and written for input.
    fn spawn_on_terminal(&self, pty: pty::Pty) -> io::Result<(Child, ProcessIo)> {
        let pty::Pty { master, peer } = pty;
        if let Some(identity) = &self.identity {
            // Like login(1): the user owns the terminal they are given.
            nix::unistd::fchown(&peer, Some(Uid::from_raw(identity.uid)), None).map_err(io::Error::from)?;
        }
        let mut command = self.base_command();
        command
            .env("TERM", self.terminal.as_ref().map_or(pty::DEFAULT_TERM, |t| t.term.as_str()))
            // The request's env still wins, TERM included.
            .envs(self.env.iter().map(|(name, value)| (name, value)))
            .stdin(Stdio::from(peer.try_clone()?))
            .stdout(Stdio::from(peer.try_clone()?))
            .stderr(Stdio::from(peer));
        // SAFETY: setsid and ioctl are async-signal-safe and allocate nothing.
        unsafe { command.pre_exec(pty::become_session_leader) };
        self.drop_privileges(&mut command);
        let child = command.spawn()?;
        drop(command); // closes the agent's copies of the peer: the master sees EIO once the process's are gone
        let reader = pipe::Receiver::from_owned_fd_unchecked(master.try_clone()?)?;
        let writer = pipe::Sender::from_owned_fd_unchecked(master.try_clone()?)?;
        let io = ProcessIo {
            stdout: Some(boxed_reader(reader)),
            stderr: None,
            input: Input::Terminal { writer: Box::new(writer), master },
        };
        Ok((child, io))
    }

    /// What every process gets: program, args, a clean environment with PATH and HOME, the
    /// working directory, and being killed with the agent's handle.
    fn base_command(&self) -> Command {
        let mut command = Command::new(&self.program);
        if let Some(arg0) = &self.arg0 {
            command.arg0(arg0);
        }
        let home = self.identity.as_ref().and_then(|identity| identity.home.as_deref()).unwrap_or(DEFAULT_HOME);
        command.args(&self.args).env_clear().env("PATH", DEFAULT_PATH).env("HOME", home).kill_on_drop(true);
        if let Some(dir) = &self.working_dir {
            command.current_dir(Path::new(dir));
        }
        command
    }

    fn command(&self) -> Command {
        let mut command = self.base_command();
        command
            // Set after the defaults so the request can override them; a PATH given here is also
            // the one the program is looked up in.
            .envs(self.env.iter().map(|(name, value)| (name, value)))
            .stdin(if self.stdin { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        self.drop_privileges(&mut command);
        command
    }

    /// Runs the process as the resolved user, if one was named.
    fn drop_privileges(&self, command: &mut Command) {
        if let Some(identity) = self.identity.clone() {
            let groups: Vec<Gid> = identity.groups.iter().copied().map(Gid::from_raw).collect();
            // Not Command::uid/gid: std drops the supplementary groups there, and pre_exec runs
            // after it, when setgroups is no longer allowed. Groups first, then gid, then uid.
            // SAFETY: setgroups, setgid and setuid are async-signal-safe and allocate nothing.
            unsafe {
                command.pre_exec(move || {
                    setgroups(&groups).map_err(io::Error::from)?;
                    setgid(Gid::from_raw(identity.gid)).map_err(io::Error::from)?;
                    setuid(Uid::from_raw(identity.uid)).map_err(io::Error::from)
                });
            }
        }
    }
}

/// The shell's exit code for a process that could not be started, or None for a real failure.
fn spawn_failure_exit_code(err: &io::Error) -> Option<i32> {
    match err.kind() {
        io::ErrorKind::NotFound => Some(EXIT_NOT_FOUND),
        io::ErrorKind::PermissionDenied => Some(EXIT_NOT_EXECUTABLE),
        _ if err.raw_os_error() == Some(Errno::ENOEXEC as i32) => Some(EXIT_NOT_EXECUTABLE),
        _ => None,
    }
}

fn describe_spawn(err: &io::Error) -> &'static str {
    match err.kind() {
        io::ErrorKind::NotFound => "not found",
        io::ErrorKind::PermissionDenied => "permission denied",
        _ => "cannot execute",
    }
}

fn payload(payload: ResponsePayload) -> ExecResponse {
    ExecResponse { payload: Some(payload) }
}

/// The client hung up: the response stream's receiver is gone.
struct ClientGone;

/// The running process's bookkeeping shared by the output loop.
struct Run {
    tx: mpsc::Sender<Result<ExecResponse, Status>>,
    process_group: Pid,
    deadline: Option<Instant>,
    timed_out: bool,
}

impl Run {
    /// Sends one response; if the client is slow and the deadline passes meanwhile, the process
    /// group is killed first so that a stalled reader cannot extend the timeout.
    async fn send(&mut self, response: ResponsePayload) -> Result<(), ClientGone> {
        let tx = self.tx.clone();
        let send = tx.send(Ok(payload(response)));
        tokio::pin!(send);
        if let Some(deadline) = self.pending_deadline() {
            tokio::select! {
                sent = &mut send => return sent.map_err(|_| ClientGone),
                () = sleep_until(deadline) => self.time_out(),
            }
        }
        send.await.map_err(|_| ClientGone)
    }

    /// The deadline, while it still has to be enforced.
    fn pending_deadline(&self) -> Option<Instant> {
        self.deadline.filter(|_| !self.timed_out)
    }

    fn time_out(&mut self) {
        self.timed_out = true;
        self.kill_group();
    }

    fn kill_group(&self) {
        // ESRCH just means the whole group is already gone.
        let _ = killpg(self.process_group, Signal::SIGKILL);
    }
}

/// Streams the process's output until it ends, then reports its exit status.
async fn supervise(
    mut child: Child,
    io: ProcessIo,
    requests: Streaming<ExecRequest>,
    tx: mpsc::Sender<Result<ExecResponse, Status>>,
    timeout: Option<Duration>,
) {
    let Some(pid) = child.id() else {
        // Unreachable: the child was just spawned and not yet waited for.
        return;
    };
    let mut run = Run {
        tx,
        process_group: Pid::from_raw(pid as i32),
        deadline: timeout.map(|timeout| Instant::now() + timeout),
        timed_out: false,
    };
    if run.send(ResponsePayload::StartedPid(pid)).await.is_err() {
        run.kill_group();
        let _ = child.wait().await;
        return;
    }
    // Always drain the request stream, even without stdin, so the client's half is consumed.
    let ProcessIo { stdout, stderr, input } = io;
    let stdin_pump = tokio::spawn(pump_stdin(requests, input));
    let ended = stream_until_exit(&mut child, stdout, stderr, &mut run).await;
    stdin_pump.abort();
    match ended {
        Ok(status) => {
            let status = ExitStatus {
                status: Some(match (status.code(), status.signal()) {
                    (Some(code), _) => ExitKind::Code(code),
                    (None, Some(signal)) => ExitKind::Signal(signal),
                    (None, None) => ExitKind::Code(-1),
                }),
                timed_out: run.timed_out,
            };
            let _ = run.send(ResponsePayload::Exit(status)).await;
        }
        Err(ClientGone) => {
            run.kill_group();
            let _ = child.wait().await;
        }
    }
}

/// Forwards stdout and stderr chunks (each stream in order) until the process has exited and its
/// pipes are closed, or the drain grace after its exit is over.
async fn stream_until_exit(
    child: &mut Child,
    mut stdout: Option<BoxedReader>,
    mut stderr: Option<BoxedReader>,
    run: &mut Run,
) -> Result<std::process::ExitStatus, ClientGone> {
    let mut stdout_buf = vec![0u8; OUTPUT_CHUNK];
    let mut stderr_buf = vec![0u8; OUTPUT_CHUNK];
    let mut exited: Option<std::process::ExitStatus> = None;
    let mut drain_until: Option<Instant> = None;
    // Stands in for "never" in select! branches whose timer is not armed.
    let far_future = Instant::now() + Duration::from_secs(86400 * 365);
    loop {
        if let Some(status) = exited
            && stdout.is_none()
            && stderr.is_none()
        {
            return Ok(status);
        }
        let tx = run.tx.clone();
        let deadline = run.pending_deadline().filter(|_| exited.is_none());
        tokio::select! {
            () = tx.closed() => return Err(ClientGone),
            read = read_chunk(&mut stdout, &mut stdout_buf) => match read {
                Some(chunk) => run.send(ResponsePayload::Stdout(chunk)).await?,
                None => stdout = None,
            },
            read = read_chunk(&mut stderr, &mut stderr_buf) => match read {
                Some(chunk) => run.send(ResponsePayload::Stderr(chunk)).await?,
                None => stderr = None,
            },
            status = child.wait(), if exited.is_none() => match status {
                Ok(status) => {
                    exited = Some(status);
                    drain_until = Some(Instant::now() + EXIT_DRAIN_GRACE);
                }
                // wait() fails only if something else reaped the child; report exit code 255.
                Err(err) => {
                    log!("waiting for pid {}: {err}", run.process_group);
                    return Ok(std::process::ExitStatus::from_raw(255 << 8));
                }
            },
            () = sleep_until(deadline.unwrap_or(far_future)), if deadline.is_some() => run.time_out(),
            () = sleep_until(drain_until.unwrap_or(far_future)), if drain_until.is_some() => {
                if let Some(status) = exited {
                    return Ok(status);
                }
            }
        }
    }
}

/// Reads one chunk from a pipe; None at end of file (or error). Pends forever once the pipe is
/// closed (None), so a closed pipe's select! branch never fires again.
async fn read_chunk<R: AsyncRead + Unpin>(pipe: &mut Option<R>, buf: &mut [u8]) -> Option<Vec<u8>> {
    let Some(reader) = pipe.as_mut() else {
        return std::future::pending().await;
    };
    match reader.read(buf).await {
        Ok(0) | Err(_) => None,
        Ok(n) => buf.get(..n).map(<[u8]>::to_vec),
    }
}

/// Writes stdin messages to the process until `stdin_eof` or the client's half ends; later
/// messages are read and dropped so the client never blocks on flow control. On a terminal,
/// resizes are applied and `stdin_eof` types the end-of-file character.
async fn pump_stdin(mut requests: Streaming<ExecRequest>, input: Input) {
    let (mut stdin, master) = match input {
        Input::Pipe(stdin) => (stdin, None),
        Input::Terminal { writer, master } => (Some(writer), Some(master)),
    };
    while let Ok(Some(request)) = requests.message().await {
        match request.payload {
            Some(RequestPayload::Stdin(bytes)) => {
                if let Some(pipe) = stdin.as_mut()
                    && pipe.write_all(&bytes).await.is_err()
                {
                    // The process closed its stdin; drop the rest, as a pipe would.
                    stdin = None;
                }
            }
            Some(RequestPayload::StdinEof(true)) => match &master {
                Some(master) => {
                    let eof = [pty::eof_char(master)];
                    if let Some(writer) = stdin.as_mut() {
                        let _ = writer.write_all(&eof).await;
                    }
                }
                // Dropping the pipe closes it: the process reads end of file.
                None => stdin = None,
            },
            Some(RequestPayload::Resize(size)) => {
                if let Some(master) = &master {
                    let rows = pty::dimension(size.rows, pty::DEFAULT_ROWS);
                    let columns = pty::dimension(size.columns, pty::DEFAULT_COLUMNS);
                    if let Err(err) = pty::set_size(master, rows, columns) {
                        log!("cannot resize a terminal to {rows}x{columns}: {err}");
                    }
                }
            }
            Some(RequestPayload::StdinEof(false)) | None => {}
            Some(RequestPayload::Start(_)) => log!("ignoring a second ExecStart on one stream"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start(argv: &[&str]) -> ExecStart {
        ExecStart { argv: argv.iter().map(|arg| (*arg).to_owned()).collect(), ..ExecStart::default() }
    }

    #[test]
    fn empty_argv_is_invalid() {
        let err = ExecPlan::try_from(start(&[])).expect_err("empty argv");
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        let err = ExecPlan::try_from(start(&[""])).expect_err("empty program");
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
    }

    #[test]
    fn env_must_be_name_value() {
        let mut bad = start(&["true"]);
        bad.env = vec!["NOEQUALS".into()];
        let err = ExecPlan::try_from(bad).expect_err("env without =");
        assert_eq!(err.code(), tonic::Code::InvalidArgument);

        let mut good = start(&["true"]);
        good.env = vec!["A=b=c".into(), "EMPTY=".into()];
        good.timeout_seconds = 3;
        let plan = ExecPlan::try_from(good).expect("valid start");
        assert_eq!(plan.env, vec![("A".into(), "b=c".into()), ("EMPTY".into(), String::new())]);
        assert_eq!(plan.timeout, Some(Duration::from_secs(3)));
    }

    #[test]
    fn spawn_failures_map_to_shell_codes() {
        let not_found = io::Error::from(io::ErrorKind::NotFound);
        assert_eq!(spawn_failure_exit_code(&not_found), Some(127));
        let denied = io::Error::from(io::ErrorKind::PermissionDenied);
        assert_eq!(spawn_failure_exit_code(&denied), Some(126));
        let enoexec = io::Error::from_raw_os_error(Errno::ENOEXEC as i32);
        assert_eq!(spawn_failure_exit_code(&enoexec), Some(126));
        let nomem = io::Error::from(io::ErrorKind::OutOfMemory);
        assert_eq!(spawn_failure_exit_code(&nomem), None);
    }
}
