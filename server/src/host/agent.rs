//! The guest agent's host side: a gRPC client that reaches `banger-agent` through a VM's hybrid-vsock unix socket.
//!
//! Transport: the VM's vsock backend (vhost-device-vsock, or Firecracker) exposes the guest's
//! vsock as a unix socket. A connection becomes a stream to guest port P after the client writes
//! `CONNECT P\n` and the backend answers `OK ...\n`; HTTP/2 then runs over the same socket.
//!
//! Handshake discipline (why the connector looks the way it does): vhost-device-vsock 0.3.0
//! panics, and vsock stays dead for that VM, when a client closes its socket after sending
//! `CONNECT` but before the answer. So a socket with a pending `CONNECT` is never dropped: the
//! exchange runs in its own task that owns the socket. The connector gives up waiting after
//! [`HANDSHAKE_OK_TIMEOUT`], but the task keeps the socket open until the backend answers or
//! closes, at most [`PARKED_HANDSHAKE_LIMIT`]. The same task also makes the connector safe to drop
//! (tonic drops it when `connect_timeout` fires). The reply is read one byte at a time because the
//! guest's first HTTP/2 frames may arrive in the same segment as `OK`.
//!
//! Every call carries the VM's agent key (`authorization: Bearer <hex>`, `host/agent_key.rs`),
//! which the agent checks before anything else, on every transport.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};
use std::time::Duration;

use banger_proto::agent::v1::agent_service_client::AgentServiceClient;
use banger_proto::agent::v1::{
    ExecRequest, ExecResponse, GuestNetwork, InfoRequest, InfoResponse, ReadFileRequest, ReadFileResponse,
    ReadyRequest, ReadyResponse, SetIdentityRequest, ShutdownRequest, SyncRequest, WriteFileRequest,
};
use banger_proto::error_chain;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::time::Instant;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint, Uri};

use super::agent_key::AgentKey;

/// The guest port `banger-agent` listens on (AF_VSOCK, any CID).
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// How long the connector waits for the backend's `OK`; shorter than [`CONNECT_TIMEOUT`], so the
/// connector reports a stalled guest itself instead of being cut off by tonic.
pub const HANDSHAKE_OK_TIMEOUT: Duration = Duration::from_secs(2);
/// tonic's limit on establishing a connection (unix connect + handshake).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a socket whose `CONNECT` got no answer is kept open in the background.
pub const PARKED_HANDSHAKE_LIMIT: Duration = Duration::from_secs(60);
/// Deadline for unary calls (Info, Shutdown) and for the start of an Exec.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline of each Ready attempt inside [`AgentClient::wait_ready`].
pub const READY_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause between Ready attempts; failures while booting come back within milliseconds.
pub const READY_POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Longest reply line accepted from the backend (`OK 4294967295` is 13 bytes).
const MAX_REPLY_LINE: usize = 64;

/// A guest-agent call failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The agent did not answer Ready before the deadline.
    #[error("guest agent did not become ready within {waited:?}")]
    NotReady {
        /// How long was waited.
        waited: Duration,
        /// The last attempt's failure, if any attempt was made.
        #[source]
        last_error: Option<Box<AgentError>>,
    },
    /// The VMM (or its vsock backend) stopped while the agent was awaited.
    #[error("vmm exited before the guest agent answered")]
    VmmExited,
    /// A call got no answer within its deadline: the guest is stalled or overloaded.
    #[error("guest agent call {call} got no answer within {after:?}")]
    Timeout {
        /// The RPC.
        call: &'static str,
        /// The deadline that passed.
        after: Duration,
    },
    /// The agent answered, but not as its protocol says it must.
    #[error("guest agent call {call} broke the protocol: {what}")]
    Protocol {
        /// The RPC.
        call: &'static str,
        /// What was wrong.
        what: &'static str,
    },
    /// The agent answered with an error status, or the channel to it failed.
    #[error("guest agent call {call} failed")]
    Rpc {
        /// The RPC.
        call: &'static str,
        /// The gRPC status (connection failures come as `Unavailable`, their cause as its source).
        #[source]
        status: tonic::Status,
    },
}

impl AgentError {
    /// The gRPC status the agent (or the channel) returned, if this error carries one.
    pub fn status(&self) -> Option<&tonic::Status> {
        match self {
            Self::Rpc { status, .. } => Some(status),
            _ => None,
        }
    }

    /// The vsock handshake failure behind this error, if the call failed while connecting.
    /// A [`HandshakeError::NoReply`] here means a stalled guest or a dead vsock backend.
    pub fn handshake_error(&self) -> Option<&HandshakeError> {
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(self);
        while let Some(err) = source {
            if let Some(handshake) = err.downcast_ref::<HandshakeError>() {
                return Some(handshake);
            }
            source = err.source();
        }
        None
    }
}

/// The hybrid-vsock `CONNECT` handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The unix socket could not be connected (backend not started, or dead).
    #[error("cannot connect to the vsock socket")]
    Connect(#[source] io::Error),
    /// Writing `CONNECT` failed (QEMU not attached yet, or the guest's vsock driver not loaded).
    #[error("cannot send CONNECT")]
    Send(#[source] io::Error),
    /// Reading the reply failed.
    #[error("cannot read the reply to CONNECT")]
    Read(#[source] io::Error),
    /// The backend closed the socket without `OK`: nothing listens on the guest port yet.
    #[error("vsock backend closed the connection before OK")]
    Closed,
    /// The backend answered something other than `OK ...`.
    #[error("vsock backend refused CONNECT: {reply:?}")]
    Refused {
        /// The reply line, without its newline.
        reply: String,
    },
    /// No reply within the timeout; the socket stays open in the background.
    #[error("no reply to CONNECT within {waited:?}")]
    NoReply {
        /// How long was waited.
        waited: Duration,
    },
    /// The handshake task died (it panicked or the runtime is shutting down).
    #[error("vsock handshake task failed")]
    Task(#[source] tokio::task::JoinError),
}

impl HandshakeError {
    /// True for the failures a booting guest produces: retry shortly. A [`Self::NoReply`] is not
    /// among them: it means a stalled guest or a dead backend.
    pub fn is_not_up_yet(&self) -> bool {
        use io::ErrorKind::{BrokenPipe, ConnectionRefused, ConnectionReset, NotFound};
        match self {
            Self::Connect(err) => matches!(err.kind(), NotFound | ConnectionRefused),
            Self::Send(err) | Self::Read(err) => {
                matches!(err.kind(), BrokenPipe | ConnectionReset)
            }
            Self::Closed => true,
            Self::Refused { .. } | Self::NoReply { .. } | Self::Task(_) => false,
        }
    }
}

/// Connects to the hybrid-vsock socket `uds` and opens a stream to guest `port`.
///
/// Waits at most `ok_timeout` for the backend's `OK`; on timeout the socket is handed to a
/// background task (see the module docs) and [`HandshakeError::NoReply`] is returned. The
/// returned stream starts right after the `OK` line.
pub async fn connect_hybrid_vsock(uds: &Path, port: u32, ok_timeout: Duration) -> Result<UnixStream, HandshakeError> {
    connect_with_handshake(uds, port, ok_timeout, false).await
}

/// Connects to a virtio-serial port's socket `uds` as [`connect_hybrid_vsock`] connects to
/// hybrid vsock, with one difference: bytes the guest wrote before the `OK <port>` line are
/// skipped. A port keeps what the guest wrote after the previous host left (the end of its
/// last HTTP/2 session) until the next host reads; they precede the reply.
pub async fn connect_serial_port(uds: &Path, port: u32, ok_timeout: Duration) -> Result<UnixStream, HandshakeError> {
    connect_with_handshake(uds, port, ok_timeout, true).await
}

async fn connect_with_handshake(
    uds: &Path,
    port: u32,
    ok_timeout: Duration,
    skip_stale: bool,
) -> Result<UnixStream, HandshakeError> {
    // Before CONNECT is written, dropping the socket is harmless.
    let stream = UnixStream::connect(uds).await.map_err(HandshakeError::Connect)?;
    let mut exchange = tokio::spawn(async move {
        let mut stream = stream;
        let handshake = async {
            match skip_stale {
                true => serial_handshake(&mut stream, port).await,
                false => handshake(&mut stream, port).await,
            }
        };
        let outcome = tokio::time::timeout(PARKED_HANDSHAKE_LIMIT, handshake).await;
        if outcome.is_err() {
            tracing::warn!(
                port,
                "closing a vsock socket whose CONNECT got no answer within {PARKED_HANDSHAKE_LIMIT:?}"
            );
        }
        (stream, outcome)
    });
    match tokio::time::timeout(ok_timeout, &mut exchange).await {
        Ok(Ok((stream, Ok(Ok(()))))) => Ok(stream),
        Ok(Ok((_, Ok(Err(err))))) => Err(err),
        // Only reachable if ok_timeout exceeds PARKED_HANDSHAKE_LIMIT.
        Ok(Ok((_, Err(_elapsed)))) => Err(HandshakeError::NoReply { waited: PARKED_HANDSHAKE_LIMIT }),
        Ok(Err(join_error)) => Err(HandshakeError::Task(join_error)),
        Err(_elapsed) => {
            // Dropping the JoinHandle detaches the task, which still owns the socket.
            tracing::debug!(port, "no OK within {ok_timeout:?}; parked the vsock socket");
            Err(HandshakeError::NoReply { waited: ok_timeout })
        }
    }
}

/// Writes `CONNECT port` and checks the reply line.
async fn handshake(stream: &mut UnixStream, port: u32) -> Result<(), HandshakeError> {
    stream.write_all(format!("CONNECT {port}\n").as_bytes()).await.map_err(HandshakeError::Send)?;
    let line = read_reply_line(stream).await?;
    check_connect_reply(&line)
}

/// The most stale bytes skipped before a serial port's `OK` line.
const MAX_STALE_BYTES: usize = 64 << 10;

/// Writes `CONNECT port`, then reads until `OK port` ends a line, skipping what precedes it.
async fn serial_handshake(stream: &mut UnixStream, port: u32) -> Result<(), HandshakeError> {
    serial_exchange(stream, &format!("CONNECT {port}\n"), &format!("OK {port}\n")).await
}

/// Checks that the agent's serial port at `uds` is idle: no connection open, the last one
/// ended on the guest's side too (`PING`, answered `PONG` by an agent waiting for a host;
/// what the guest wrote after the last host left is read and dropped). The guest reacts to
/// the hang-up of this check within milliseconds.
pub async fn settle_serial_port(uds: &Path, timeout: Duration) -> Result<(), HandshakeError> {
    let exchange = async {
        let mut stream = UnixStream::connect(uds).await.map_err(HandshakeError::Connect)?;
        serial_exchange(&mut stream, "PING\n", "PONG\n").await
    };
    tokio::time::timeout(timeout, exchange).await.unwrap_or(Err(HandshakeError::NoReply { waited: timeout }))
}

/// Writes `request`, then reads until `reply` ends a line, skipping what precedes it.
async fn serial_exchange(stream: &mut UnixStream, request: &str, reply: &str) -> Result<(), HandshakeError> {
    stream.write_all(request.as_bytes()).await.map_err(HandshakeError::Send)?;
    let ok = reply;
    let mut seen = Vec::with_capacity(64);
    loop {
        let byte = match stream.read_u8().await {
            Ok(byte) => byte,
            Err(err) if err.kind() == io::ErrorKind::UnexpectedEof => return Err(HandshakeError::Closed),
            Err(err) => return Err(HandshakeError::Read(err)),
        };
        seen.push(byte);
        if byte == b'\n' && seen.ends_with(ok.as_bytes()) {
            if seen.len() > ok.len() {
                tracing::debug!(stale = seen.len() - ok.len(), "skipped what the guest wrote before its OK");
            }
            return Ok(());
        }
        if seen.len() >= MAX_STALE_BYTES {
            let tail = &seen[seen.len() - MAX_REPLY_LINE.min(seen.len())..];
            return Err(HandshakeError::Refused { reply: String::from_utf8_lossy(tail).into_owned() });
        }
    }
}

/// Reads up to and excluding `\n`, one byte per read so that nothing after the line is consumed.
async fn read_reply_line<R: AsyncRead + Unpin>(reader: &mut R) -> Result<Vec<u8>, HandshakeError> {
    let mut line = Vec::with_capacity(16);
    loop {
        let byte = match reader.read_u8().await {
            Ok(byte) => byte,
            Err(err) if err.kind() == io::ErrorKind::UnexpectedEof => {
                return Err(HandshakeError::Closed);
            }
            Err(err) => return Err(HandshakeError::Read(err)),
        };
        if byte == b'\n' {
            return Ok(line);
        }
        if line.len() >= MAX_REPLY_LINE {
            return Err(HandshakeError::Refused { reply: String::from_utf8_lossy(&line).into_owned() });
        }
        line.push(byte);
    }
}

/// Accepts `OK <anything>`: vhost-device-vsock echoes the guest port, Firecracker a host port.
fn check_connect_reply(line: &[u8]) -> Result<(), HandshakeError> {
    if line.starts_with(b"OK ") {
        Ok(())
    } else {
        Err(HandshakeError::Refused { reply: String::from_utf8_lossy(line).into_owned() })
    }
}

/// Puts the VM's agent key on every call; shared by a client's clones, so a key the agent
/// was told to take applies to the next call on the same connection.
#[derive(Clone, Default)]
struct KeyHeader(Arc<std::sync::RwLock<Option<tonic::metadata::AsciiMetadataValue>>>);

impl KeyHeader {
    fn new(key: Option<&AgentKey>) -> Self {
        let header = Self::default();
        header.set(key);
        header
    }

    fn set(&self, key: Option<&AgentKey>) {
        let value = key.and_then(|key| format!("Bearer {}", key.hex()).parse().ok());
        *self.0.write().unwrap_or_else(std::sync::PoisonError::into_inner) = value;
    }
}

impl tonic::service::Interceptor for KeyHeader {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = self.0.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone() {
            request.metadata_mut().insert("authorization", value);
        }
        Ok(request)
    }
}

/// The gRPC client of one VM's agent: one lazy channel, reconnecting on demand; cheap to clone.
#[derive(Clone)]
pub struct AgentClient {
    client: AgentServiceClient<InterceptedService<Channel, KeyHeader>>,
    key: KeyHeader,
    /// The key the calls carry (the header holds it encoded).
    current: Arc<std::sync::Mutex<Option<AgentKey>>>,
    vsock_uds_path: PathBuf,
    /// The socket is a virtio-serial port's, whose line protocol also carries identities.
    serial: bool,
    /// Connections of this client's channel still open.
    open: Arc<AtomicUsize>,
}

/// The connections of a closed [`AgentClient`]'s channel that are still open.
#[derive(Debug)]
pub struct OpenConnections(Arc<AtomicUsize>);

impl OpenConnections {
    /// How many are open now.
    pub fn count(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

/// A connection to the agent, counted in its client's `open` while it exists.
struct Counted<S> {
    inner: S,
    open: Arc<AtomicUsize>,
}

impl<S> Counted<S> {
    fn new(inner: S, open: &Arc<AtomicUsize>) -> Self {
        open.fetch_add(1, Ordering::SeqCst);
        Self { inner, open: open.clone() }
    }
}

impl<S> Drop for Counted<S> {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::SeqCst);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

forward_async_write!(Counted);

/// Opens a kernel AF_VSOCK stream to `port` of guest `cid` (hosts with `/dev/vhost-vsock`).
async fn connect_kernel_vsock(cid: u32, port: u32) -> io::Result<tokio_vsock::VsockStream> {
    tokio_vsock::VsockStream::connect(tokio_vsock::VsockAddr::new(cid, port)).await
}

impl std::fmt::Debug for AgentClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentClient").field("vsock_uds_path", &self.vsock_uds_path).finish_non_exhaustive()
    }
}

impl AgentClient {
    /// Creates the client for the VM whose hybrid-vsock socket is `vsock_uds_path`, whose
    /// agent takes `key`.
    ///
    /// Never blocks and never connects: the first call does. Must be called inside a Tokio
    /// runtime (the channel spawns its worker task).
    pub fn new(vsock_uds_path: PathBuf, key: Option<AgentKey>) -> Self {
        Self::over_socket(vsock_uds_path, false, key)
    }

    /// Creates the client for the VM whose agent's virtio-serial port QEMU serves on `port_path`.
    pub fn new_serial(port_path: PathBuf, key: Option<AgentKey>) -> Self {
        Self::over_socket(port_path, true, key)
    }

    fn with_channel(channel: Channel, vsock_uds_path: PathBuf, serial: bool, key: Option<AgentKey>) -> Self {
        let header = KeyHeader::new(key.as_ref());
        Self {
            client: AgentServiceClient::with_interceptor(channel, header.clone()),
            key: header,
            current: Arc::new(std::sync::Mutex::new(key)),
            vsock_uds_path,
            serial,
            open: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// The key this client's calls carry.
    pub fn key(&self) -> Option<AgentKey> {
        self.current.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Makes `key` the one this client's calls (and its clones') carry from now on.
    pub fn set_key(&self, key: AgentKey) {
        self.key.set(Some(&key));
        *self.current.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(key);
    }

    fn over_socket(vsock_uds_path: PathBuf, serial: bool, key: Option<AgentKey>) -> Self {
        let connector_path = vsock_uds_path.clone();
        let open = Arc::new(AtomicUsize::new(0));
        let counter = open.clone();
        let connector = tower::service_fn(move |_: Uri| {
            let (path, counter) = (connector_path.clone(), counter.clone());
            async move {
                let stream = connect_with_handshake(&path, AGENT_VSOCK_PORT, HANDSHAKE_OK_TIMEOUT, serial).await?;
                Ok::<_, HandshakeError>(TokioIo::new(Counted::new(stream, &counter)))
            }
        });
        // The authority is never resolved: the connector ignores the URI.
        let channel = Endpoint::from_static("http://agent.vsock")
            .connect_timeout(CONNECT_TIMEOUT)
            .connect_with_connector_lazy(connector);
        Self { open, ..Self::with_channel(channel, vsock_uds_path, serial, key) }
    }

    /// Creates the client for guest `cid` over the kernel's vsock (`/dev/vhost-vsock` hosts):
    /// no hybrid handshake, so none of the user-space backend's hazards apply.
    pub fn new_kernel_vsock(cid: u32, key: Option<AgentKey>) -> Self {
        let open = Arc::new(AtomicUsize::new(0));
        let counter = open.clone();
        let connector = tower::service_fn(move |_: Uri| {
            let counter = counter.clone();
            async move {
                let stream = connect_kernel_vsock(cid, AGENT_VSOCK_PORT).await?;
                Ok::<_, io::Error>(TokioIo::new(Counted::new(stream, &counter)))
            }
        });
        let channel = Endpoint::from_static("http://agent.vsock")
            .connect_timeout(CONNECT_TIMEOUT)
            .connect_with_connector_lazy(connector);
        Self { open, ..Self::with_channel(channel, PathBuf::new(), false, key) }
    }

    /// Drops this handle of the client; what is returned counts the connections its channel
    /// still holds open (0 once every clone and every call made through one are gone and the
    /// channel has hung up).
    pub fn close(self) -> OpenConnections {
        OpenConnections(self.open)
    }

    /// The hybrid-vsock socket this client connects to (empty for a kernel-vsock client).
    pub fn vsock_uds_path(&self) -> &Path {
        &self.vsock_uds_path
    }

    /// One Ready call with deadline `timeout`.
    pub async fn ready(&self, timeout: Duration) -> Result<ReadyResponse, AgentError> {
        let mut client = self.client.clone();
        unary("Ready", timeout, client.ready(with_timeout(ReadyRequest {}, timeout))).await
    }

    /// Polls until Ready answers or `deadline`; calls `still_booting()` every iteration and gives up with AgentError::VmmExited when it returns false.
    ///
    /// Connection failures and timeouts are retried every [`READY_POLL_INTERVAL`]; any other
    /// error status means the agent is up but broken, and is returned at once.
    pub async fn wait_ready(
        &self,
        deadline: Instant,
        still_booting: impl Fn() -> bool,
    ) -> Result<ReadyResponse, AgentError> {
        self.until_answered(deadline, still_booting, |timeout| self.ready(timeout)).await
    }

    /// Gives the guest a new identity, asking again (as [`Self::wait_ready`] polls) while its
    /// agent does not answer yet: for a guest just restored from a snapshot, whose agent
    /// serves already, this one call is both the wait for it and the identity.
    ///
    /// `new_key` (when given) is the key the agent takes from then on; the caller writes it
    /// down, then makes it this client's ([`Self::set_key`]) and uses it
    /// ([`Self::confirm_key`]), which retires the old one.
    pub async fn wait_set_identity(
        &self,
        identity: &crate::domain::GuestIdentity,
        new_key: Option<&AgentKey>,
        deadline: Instant,
        still_booting: impl Fn() -> bool,
    ) -> Result<(), AgentError> {
        if self.serial {
            let request = identity_request(identity, new_key);
            let key = self.key();
            let told = self
                .until_answered(deadline, &still_booting, |timeout| {
                    serial_identity(&self.vsock_uds_path, key.as_ref(), &request, timeout)
                })
                .await?;
            if told {
                return Ok(());
            }
            tracing::debug!("the guest's agent does not take identities on its port: telling it over gRPC");
        }
        self.until_answered(deadline, still_booting, |timeout| self.set_identity_within(identity, new_key, timeout))
            .await
    }

    /// Uses the client's key once, so that the agent retires the one it replaced: a `PING`
    /// carrying it on a virtio-serial port this client holds no connection to (no HTTP/2
    /// connection: a restore's way to ready stays short; the port takes one connection at a
    /// time), a Ready call otherwise.
    pub async fn confirm_key(&self) -> Result<(), AgentError> {
        if self.serial
            && self.open.load(Ordering::SeqCst) == 0
            && let Some(key) = self.key()
        {
            let exchange = async {
                let mut stream = UnixStream::connect(&self.vsock_uds_path).await.map_err(HandshakeError::Connect)?;
                serial_exchange(&mut stream, &format!("PING {}\n", key.hex()), "PONG\n").await
            };
            return match tokio::time::timeout(CALL_TIMEOUT, exchange).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(err)) => {
                    let mut status = tonic::Status::unavailable("cannot reach the agent's port");
                    status.set_source(Arc::new(err));
                    Err(AgentError::Rpc { call: "Ping", status })
                }
                Err(_) => Err(AgentError::Timeout { call: "Ping", after: CALL_TIMEOUT }),
            };
        }
        self.ready(CALL_TIMEOUT).await.map(drop)
    }

    /// Makes `call` (given its deadline) until it answers, it fails in a way a guest still
    /// coming up does not, `deadline` passes or `still_booting()` says the VMM is gone.
    async fn until_answered<T, F>(
        &self,
        deadline: Instant,
        still_booting: impl Fn() -> bool,
        call: impl Fn(Duration) -> F,
    ) -> Result<T, AgentError>
    where
        F: std::future::Future<Output = Result<T, AgentError>>,
    {
        let started = Instant::now();
        let mut last_error: Option<AgentError> = None;
        loop {
            // Checked first, because a dead VMM looks exactly like a guest still booting.
            if !still_booting() {
                return Err(AgentError::VmmExited);
            }
            let now = Instant::now();
            let left = deadline.saturating_duration_since(now);
            if left.is_zero() {
                return Err(AgentError::NotReady { waited: now - started, last_error: last_error.map(Box::new) });
            }
            match call(left.min(READY_ATTEMPT_TIMEOUT)).await {
                Ok(answer) => return Ok(answer),
                Err(err) if is_retryable(&err) => {
                    if err.handshake_error().is_some_and(|h| !h.is_not_up_yet()) {
                        // Not a booting guest's usual answer: the guest may be stalled or the
                        // backend dead; still_booting() decides whether that is fatal.
                        tracing::debug!(error = %error_chain(&err), "guest agent not answering");
                    } else {
                        tracing::trace!(error = %error_chain(&err), "guest agent not ready yet");
                    }
                    last_error = Some(err);
                }
                Err(err) => return Err(err),
            }
            tokio::time::sleep_until((Instant::now() + READY_POLL_INTERVAL).min(deadline)).await;
        }
    }

    /// Describes the guest (hostname, kernel, agent version, uptime).
    pub async fn info(&self) -> Result<InfoResponse, AgentError> {
        let mut client = self.client.clone();
        unary("Info", CALL_TIMEOUT, client.info(with_timeout(InfoRequest {}, CALL_TIMEOUT))).await
    }

    /// Starts a process; `requests` must yield the ExecRequest{start} first, then stdin messages.
    ///
    /// Only the start of the call has a deadline ([`CALL_TIMEOUT`]); the returned stream may run
    /// as long as the process does. Dropping the stream (or ending `requests` with an error)
    /// makes the agent kill the process group.
    pub async fn exec(
        self,
        requests: impl tokio_stream::Stream<Item = ExecRequest> + Send + 'static,
    ) -> Result<tonic::Streaming<ExecResponse>, AgentError> {
        // Takes the client by value: a borrowed one makes the returned future's Send bound
        // depend on a lifetime that trait objects cannot name.
        let mut client = self.client;
        match tokio::time::timeout(CALL_TIMEOUT, client.exec(requests)).await {
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(status)) => Err(AgentError::Rpc { call: "Exec", status }),
            Err(_elapsed) => Err(AgentError::Timeout { call: "Exec", after: CALL_TIMEOUT }),
        }
    }

    /// Opens a guest file for reading; the stream starts with its info, then its content.
    pub async fn read_file(
        self,
        path: String,
        archive: bool,
    ) -> Result<tonic::Streaming<ReadFileResponse>, AgentError> {
        let mut client = self.client;
        match tokio::time::timeout(CALL_TIMEOUT, client.read_file(ReadFileRequest { path, archive })).await {
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(status)) => Err(AgentError::Rpc { call: "ReadFile", status }),
            Err(_elapsed) => Err(AgentError::Timeout { call: "ReadFile", after: CALL_TIMEOUT }),
        }
    }

    /// Writes a guest file from `requests` (start first, then content); returns its size.
    /// No deadline: a large file takes as long as it takes, and the caller going away ends it.
    pub async fn write_file(
        self,
        requests: impl tokio_stream::Stream<Item = WriteFileRequest> + Send + 'static,
    ) -> Result<u64, AgentError> {
        let mut client = self.client;
        match client.write_file(requests).await {
            Ok(response) => Ok(response.into_inner().size),
            Err(status) => Err(AgentError::Rpc { call: "WriteFile", status }),
        }
    }

    /// Gives the guest a new identity, and `new_key` as its key (see [`Self::wait_set_identity`]).
    pub async fn set_identity(
        &self,
        identity: &crate::domain::GuestIdentity,
        new_key: Option<&AgentKey>,
    ) -> Result<(), AgentError> {
        self.set_identity_within(identity, new_key, CALL_TIMEOUT).await
    }

    async fn set_identity_within(
        &self,
        identity: &crate::domain::GuestIdentity,
        new_key: Option<&AgentKey>,
        timeout: Duration,
    ) -> Result<(), AgentError> {
        let mut client = self.client.clone();
        let request = identity_request(identity, new_key);
        unary("SetIdentity", timeout, client.set_identity(with_timeout(request, timeout))).await.map(drop)
    }

    /// Flushes the guest's file systems.
    pub async fn sync(&self) -> Result<(), AgentError> {
        let mut client = self.client.clone();
        unary("Sync", CALL_TIMEOUT, client.sync(with_timeout(SyncRequest {}, CALL_TIMEOUT))).await.map(drop)
    }

    /// Asks the guest to sync and power off. The agent answers before it powers off, so success
    /// means "power-off is under way"; the VMM exits shortly after.
    pub async fn shutdown(&self) -> Result<(), AgentError> {
        let mut client = self.client.clone();
        unary("Shutdown", CALL_TIMEOUT, client.shutdown(with_timeout(ShutdownRequest {}, CALL_TIMEOUT))).await.map(drop)
    }
}

/// `identity` as the agent's `SetIdentity` takes it (over gRPC or on a port's line).
fn identity_request(identity: &crate::domain::GuestIdentity, new_key: Option<&AgentKey>) -> SetIdentityRequest {
    SetIdentityRequest {
        hostname: identity.hostname.clone(),
        network: identity.network.as_ref().map(|network| GuestNetwork {
            mac: network.mac.clone(),
            address: network.address.clone(),
            gateway: network.gateway.clone(),
        }),
        machine_id: identity.machine_id.clone().unwrap_or_default(),
        realtime_ns: identity.realtime_ns.unwrap_or_default(),
        entropy: identity.entropy.clone(),
        agent_key: new_key.map(|key| key.bytes().to_vec()).unwrap_or_default(),
    }
}

/// The most a guest may write in answer to an identity line before its `PONG`.
const MAX_IDENTITY_ANSWER: usize = 64 << 10;
/// The longest error message kept from a guest's `IDENTITY ERROR` line.
const MAX_IDENTITY_ERROR: usize = 512;

/// Tells the guest `request` on its virtio-serial port's line protocol, without HTTP/2:
/// writes `IDENTITY <key> <hex>` (`-` for no key) and `PING`, and reads up to the `PONG`. True when the agent
/// answered `IDENTITY OK`; false when it answered the `PING` only (an agent that predates
/// identity lines ignores them). A restored guest reaches ready this way with a small part of
/// the new code a first HTTP/2 call runs in it (see the agent's `serial` module).
async fn serial_identity(
    uds: &Path,
    key: Option<&AgentKey>,
    request: &SetIdentityRequest,
    timeout: Duration,
) -> Result<bool, AgentError> {
    use prost::Message;
    const CALL: &str = "SetIdentity";
    let unreachable = |err: HandshakeError| {
        let mut status = tonic::Status::unavailable("cannot reach the agent's port");
        status.set_source(Arc::new(err));
        AgentError::Rpc { call: CALL, status }
    };
    let exchange = async {
        let mut stream = UnixStream::connect(uds).await.map_err(|err| unreachable(HandshakeError::Connect(err)))?;
        let key = key.map(AgentKey::hex).unwrap_or_else(|| "-".into());
        let lines = format!("IDENTITY {key} {}\nPING\n", hex::encode(request.encode_to_vec()));
        stream.write_all(lines.as_bytes()).await.map_err(|err| unreachable(HandshakeError::Send(err)))?;
        let mut answer: Option<Result<(), tonic::Status>> = None;
        let mut line = Vec::with_capacity(64);
        let mut read = 0usize;
        loop {
            let byte = match stream.read_u8().await {
                Ok(byte) => byte,
                Err(err) if err.kind() == io::ErrorKind::UnexpectedEof => {
                    return Err(unreachable(HandshakeError::Closed));
                }
                Err(err) => return Err(unreachable(HandshakeError::Read(err))),
            };
            read += 1;
            if read > MAX_IDENTITY_ANSWER {
                return Err(AgentError::Protocol { call: CALL, what: "no PONG after an identity line" });
            }
            if byte != b'\n' {
                // What precedes the answers (the end of an earlier connection) is skipped
                // line by line; only the answers' lines matter, and they are short.
                if line.len() < MAX_IDENTITY_ERROR + 32 {
                    line.push(byte);
                }
                continue;
            }
            let text = String::from_utf8_lossy(&line).into_owned();
            line.clear();
            if text == "PONG" {
                return match answer {
                    None => Ok(false),
                    Some(Ok(())) => Ok(true),
                    Some(Err(status)) => Err(AgentError::Rpc { call: CALL, status }),
                };
            }
            if text == "IDENTITY OK" {
                answer = Some(Ok(()));
            } else if let Some(error) = text.strip_prefix("IDENTITY ERROR ") {
                let (code, message) = error.split_once(' ').unwrap_or((error, ""));
                let code = code.parse::<i32>().map(tonic::Code::from).unwrap_or(tonic::Code::Unknown);
                let message: String = message.chars().take(MAX_IDENTITY_ERROR).collect();
                answer = Some(Err(tonic::Status::new(code, message)));
            }
        }
    };
    tokio::time::timeout(timeout, exchange).await.unwrap_or(Err(AgentError::Timeout { call: CALL, after: timeout }))
}

/// A request carrying `grpc-timeout`, so the agent also abandons it after `timeout`.
fn with_timeout<T>(message: T, timeout: Duration) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(timeout);
    request
}

/// Awaits a call's response with a client-side deadline.
async fn unary<T>(
    call: &'static str,
    timeout: Duration,
    response: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, AgentError> {
    match tokio::time::timeout(timeout, response).await {
        Ok(Ok(response)) => Ok(response.into_inner()),
        Ok(Err(status)) => Err(AgentError::Rpc { call, status }),
        Err(_elapsed) => Err(AgentError::Timeout { call, after: timeout }),
    }
}

/// Failures that mean "not up yet" while a guest boots: no connection, a connection that broke,
/// or no answer in time.
fn is_retryable(err: &AgentError) -> bool {
    use tonic::Code;
    match err {
        AgentError::Timeout { .. } => true,
        AgentError::Rpc { status, .. } => {
            matches!(status.code(), Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded)
        }
        AgentError::NotReady { .. } | AgentError::VmmExited | AgentError::Protocol { .. } => false,
    }
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;

    use banger_proto::agent::v1::agent_service_server::{AgentService, AgentServiceServer};
    use banger_proto::agent::v1::{ShutdownResponse, exec_request, exec_response};
    use tokio::io::{AsyncBufReadExt, BufReader};
    use tokio::net::UnixListener;
    use tokio_stream::{Stream, StreamExt};

    use super::*;

    /// Reads the client's `CONNECT` line the way the backend does.
    async fn read_connect_line(stream: &mut UnixStream) -> String {
        let mut line = Vec::new();
        loop {
            let byte = stream.read_u8().await.expect("client sends a CONNECT line");
            if byte == b'\n' {
                return String::from_utf8(line).expect("utf-8");
            }
            line.push(byte);
        }
    }

    fn socket_in(dir: &tempfile::TempDir) -> PathBuf {
        dir.path().join("vm.vsock")
    }

    #[test]
    fn accepts_only_ok_replies() {
        assert!(check_connect_reply(b"OK 1024").is_ok());
        assert!(check_connect_reply(b"OK 1073741824").is_ok());
        for bad in [&b"OK"[..], b"", b"ERR 1024", b"ok 1024"] {
            assert!(matches!(check_connect_reply(bad), Err(HandshakeError::Refused { .. })));
        }
    }

    #[tokio::test]
    async fn ok_reply_leaves_following_bytes_for_the_caller() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = socket_in(&dir);
        let listener = UnixListener::bind(&path).expect("bind");
        let backend = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.expect("accept");
            let line = read_connect_line(&mut stream).await;
            // OK and the first payload bytes in one write, as a real guest may produce.
            stream.write_all(b"OK 1024\nHELLO").await.expect("write");
            (line, stream)
        });
        let mut stream = connect_hybrid_vsock(&path, 1024, Duration::from_secs(1)).await.expect("handshake succeeds");
        let mut payload = [0u8; 5];
        stream.read_exact(&mut payload).await.expect("payload");
        assert_eq!(&payload, b"HELLO");
        let (line, _backend_stream) = backend.await.expect("backend");
        assert_eq!(line, "CONNECT 1024");
    }

    #[tokio::test]
    async fn booting_guest_failures_are_not_up_yet() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = socket_in(&dir);

        let missing = connect_hybrid_vsock(&path, 1024, Duration::from_secs(1)).await;
        assert!(matches!(&missing, Err(HandshakeError::Connect(err)) if err.kind() == io::ErrorKind::NotFound));
        assert!(missing.expect_err("no socket").is_not_up_yet());

        // Driver up, nothing listening on the port: the backend closes right after CONNECT.
        let listener = UnixListener::bind(&path).expect("bind");
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.expect("accept");
            read_connect_line(&mut stream).await;
        });
        let closed = connect_hybrid_vsock(&path, 1024, Duration::from_secs(1)).await;
        assert!(matches!(&closed, Err(HandshakeError::Closed)));
        assert!(closed.expect_err("closed").is_not_up_yet());
    }

    #[tokio::test]
    async fn refusal_is_reported_with_its_reply() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = socket_in(&dir);
        let listener = UnixListener::bind(&path).expect("bind");
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.expect("accept");
            read_connect_line(&mut stream).await;
            stream.write_all(b"NOPE\n").await.expect("write");
        });
        let refused = connect_hybrid_vsock(&path, 1024, Duration::from_secs(1)).await;
        assert!(matches!(&refused, Err(HandshakeError::Refused { reply }) if reply == "NOPE"));
    }

    #[tokio::test]
    async fn a_serial_port_skips_what_the_guest_wrote_before_its_ok_and_hybrid_vsock_does_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = socket_in(&dir);
        let listener = UnixListener::bind(&path).expect("bind");
        // The tail of the previous host's HTTP/2 session (a GOAWAY frame, with a newline in
        // it), then the reply, then the new session's first bytes.
        let stale: &[u8] = b"\0\0\x08\x07\0\0\0\0\0\0\0\0\x0a\0\0\0\0";
        tokio::spawn(async move {
            for _ in 0..2 {
                let (mut stream, _) = listener.accept().await.expect("accept");
                read_connect_line(&mut stream).await;
                stream.write_all(&[stale, b"OK 1024\nPRI"].concat()).await.expect("write");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        let mut stream = connect_serial_port(&path, 1024, Duration::from_secs(1)).await.expect("past the stale bytes");
        let mut first = [0u8; 3];
        stream.read_exact(&mut first).await.expect("read");
        assert_eq!(&first, b"PRI", "nothing after the OK line is consumed");
        let strict = connect_hybrid_vsock(&path, 1024, Duration::from_secs(1)).await;
        assert!(matches!(strict, Err(HandshakeError::Refused { .. })), "{strict:?}");
    }

    /// A port that reads the identity and PING lines and answers `answers` (as bytes), each
    /// on its own connection, which it closes at once or (with `true`) keeps open.
    fn port_answering(
        listener: UnixListener,
        answers: Vec<(&'static [u8], bool)>,
    ) -> tokio::task::JoinHandle<Vec<String>> {
        tokio::spawn(async move {
            let mut identities = Vec::new();
            let mut kept = Vec::new();
            for (answer, keep) in answers {
                let (stream, _) = listener.accept().await.expect("accept");
                let mut lines = BufReader::new(stream);
                let mut identity = String::new();
                lines.read_line(&mut identity).await.expect("identity line");
                let mut ping = String::new();
                lines.read_line(&mut ping).await.expect("ping line");
                assert_eq!(ping, "PING\n");
                identities.push(identity);
                lines.get_mut().write_all(answer).await.expect("write");
                if keep {
                    kept.push(lines);
                }
            }
            if !kept.is_empty() {
                // Past the client's patience.
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            identities
        })
    }

    #[tokio::test]
    async fn an_identity_goes_over_a_serial_port_in_one_line_and_an_older_agent_is_told_apart() {
        use prost::Message;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = socket_in(&dir);
        let listener = UnixListener::bind(&path).expect("bind");
        let port = port_answering(
            listener,
            vec![
                // A new agent, after the tail of an earlier connection.
                (b"\0\0\x08\x07\0\0\nIDENTITY OK\nPONG\n", false),
                // An agent that does not know identity lines.
                (b"PONG\n", false),
                (b"IDENTITY ERROR 3 not a hostname: \"X\"\nPONG\n", false),
                (b"IDENTITY OK\n", false),
                (b"IDENTITY OK\n", true),
            ],
        );
        let identity = crate::domain::GuestIdentity {
            machine_id: Some("0123456789abcdef0123456789abcdef".into()),
            entropy: vec![9; 64],
            ..crate::domain::GuestIdentity::hostname("clone-1")
        };
        let (key, new_key) = (AgentKey::generate().expect("key"), AgentKey::generate().expect("new key"));
        let request = identity_request(&identity, Some(&new_key));
        assert_eq!(request.agent_key, new_key.bytes().to_vec(), "the new key goes with the identity");
        let key = Some(&key);
        let wait = Duration::from_secs(2);
        assert!(serial_identity(&path, key, &request, wait).await.expect("told"));
        assert!(!serial_identity(&path, key, &request, wait).await.expect("answered"), "an older agent");
        let refused = serial_identity(&path, key, &request, wait).await.expect_err("refused");
        let status = refused.status().expect("a status");
        assert_eq!((status.code(), status.message()), (tonic::Code::InvalidArgument, "not a hostname: \"X\""));
        assert!(!is_retryable(&refused));
        // No PONG: the port closes, then it stalls.
        let closed = serial_identity(&path, key, &request, wait).await.expect_err("closed");
        assert!(closed.handshake_error().is_some_and(HandshakeError::is_not_up_yet) && is_retryable(&closed));
        let stalled = serial_identity(&path, key, &request, Duration::from_millis(300)).await;
        assert!(matches!(stalled, Err(AgentError::Timeout { .. })), "{stalled:?}");
        let sent = port.await.expect("port");
        let words = sent[0].strip_prefix("IDENTITY ").and_then(|line| line.strip_suffix('\n')).expect("identity line");
        let (presented, hex) = words.split_once(' ').expect("the key, then the request");
        assert_eq!(Some(presented), key.map(AgentKey::hex).as_deref(), "the current key first");
        let bytes = hex::decode(hex).expect("hex");
        assert_eq!(SetIdentityRequest::decode(bytes.as_slice()).expect("decode"), request);
        let gone = serial_identity(&path, key, &request, wait).await.expect_err("no port");
        assert!(gone.handshake_error().is_some_and(HandshakeError::is_not_up_yet));
    }

    /// The backend must never see a close while its CONNECT is pending, neither when the
    /// connector times out nor when its future is dropped.
    #[tokio::test]
    async fn pending_connect_is_never_closed_before_the_reply() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = socket_in(&dir);
        let listener = UnixListener::bind(&path).expect("bind");
        let backend = tokio::spawn(async move {
            let mut verdicts = Vec::new();
            for _ in 0..2 {
                let (mut stream, _) = listener.accept().await.expect("accept");
                read_connect_line(&mut stream).await;
                // Stall well past the client's patience, watching for a premature close.
                let mut byte = [0u8; 1];
                let early = tokio::time::timeout(Duration::from_millis(400), stream.read(&mut byte)).await;
                let closed_early = early.is_ok();
                stream.write_all(b"OK 1024\n").await.expect("socket still open");
                // After OK the parked socket is released: EOF follows.
                let after = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut byte))
                    .await
                    .expect("parked socket is closed after OK")
                    .expect("read");
                verdicts.push((closed_early, after));
            }
            verdicts
        });

        let timed_out = connect_hybrid_vsock(&path, 1024, Duration::from_millis(100)).await;
        assert!(matches!(timed_out, Err(HandshakeError::NoReply { .. })));
        let dropped =
            tokio::time::timeout(Duration::from_millis(100), connect_hybrid_vsock(&path, 1024, Duration::from_secs(5)))
                .await;
        assert!(dropped.is_err(), "the connector future was dropped mid-handshake");

        let verdicts = backend.await.expect("backend");
        assert_eq!(verdicts, vec![(false, 0), (false, 0)]);
    }

    /// A stand-in agent: answers Ready with a fixed uptime and echoes Exec stdin to stdout.
    struct FakeAgent;

    type FakeExecStream = Pin<Box<dyn Stream<Item = Result<ExecResponse, tonic::Status>> + Send>>;

    #[tonic::async_trait]
    impl AgentService for FakeAgent {
        async fn ready(
            &self,
            _: tonic::Request<ReadyRequest>,
        ) -> Result<tonic::Response<ReadyResponse>, tonic::Status> {
            Ok(tonic::Response::new(ReadyResponse { uptime_seconds: 1.5 }))
        }

        /// Says in `hostname` what the call's `authorization` was.
        async fn info(
            &self,
            request: tonic::Request<InfoRequest>,
        ) -> Result<tonic::Response<InfoResponse>, tonic::Status> {
            let presented = request.metadata().get("authorization").and_then(|v| v.to_str().ok()).unwrap_or("none");
            Ok(tonic::Response::new(InfoResponse { hostname: presented.to_owned(), ..InfoResponse::default() }))
        }

        type ExecStream = FakeExecStream;

        async fn exec(
            &self,
            request: tonic::Request<tonic::Streaming<ExecRequest>>,
        ) -> Result<tonic::Response<FakeExecStream>, tonic::Status> {
            let output = request.into_inner().filter_map(|request| match request {
                Ok(ExecRequest { payload: Some(exec_request::Payload::Stdin(bytes)) }) => {
                    Some(Ok(ExecResponse { payload: Some(exec_response::Payload::Stdout(bytes)) }))
                }
                _ => None,
            });
            Ok(tonic::Response::new(Box::pin(output)))
        }

        async fn shutdown(
            &self,
            _: tonic::Request<ShutdownRequest>,
        ) -> Result<tonic::Response<ShutdownResponse>, tonic::Status> {
            Ok(tonic::Response::new(ShutdownResponse {}))
        }

        async fn set_identity(
            &self,
            _: tonic::Request<banger_proto::agent::v1::SetIdentityRequest>,
        ) -> Result<tonic::Response<banger_proto::agent::v1::SetIdentityResponse>, tonic::Status> {
            Err(tonic::Status::unimplemented("fake"))
        }

        async fn sync(
            &self,
            _: tonic::Request<banger_proto::agent::v1::SyncRequest>,
        ) -> Result<tonic::Response<banger_proto::agent::v1::SyncResponse>, tonic::Status> {
            Ok(tonic::Response::new(banger_proto::agent::v1::SyncResponse {}))
        }

        type ReadFileStream = Pin<Box<dyn Stream<Item = Result<ReadFileResponse, tonic::Status>> + Send>>;

        async fn read_file(
            &self,
            request: tonic::Request<ReadFileRequest>,
        ) -> Result<tonic::Response<Self::ReadFileStream>, tonic::Status> {
            use banger_proto::agent::v1::{FileInfo, read_file_response::Payload};
            let path = request.into_inner().path;
            let content = fake_files().get(&path).cloned().ok_or_else(|| tonic::Status::not_found(path))?;
            let info = ReadFileResponse {
                payload: Some(Payload::Info(FileInfo { mode: 0o640, size: content.len() as u64, archive: false })),
            };
            let chunks: Vec<_> =
                content.chunks(3).map(|c| Ok(ReadFileResponse { payload: Some(Payload::Data(c.to_vec())) })).collect();
            Ok(tonic::Response::new(Box::pin(tokio_stream::iter(std::iter::once(Ok(info)).chain(chunks)))))
        }

        /// Keeps the file only when the stream ends cleanly, like the real agent's rename.
        async fn write_file(
            &self,
            request: tonic::Request<tonic::Streaming<WriteFileRequest>>,
        ) -> Result<tonic::Response<banger_proto::agent::v1::WriteFileResponse>, tonic::Status> {
            use banger_proto::agent::v1::write_file_request::Payload;
            // Counted however the call ends, dropped mid-stream included.
            struct Ended;
            impl Drop for Ended {
                fn drop(&mut self) {
                    WRITES_ENDED.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
            }
            let _ended = Ended;
            let mut stream = request.into_inner();
            let Some(WriteFileRequest { payload: Some(Payload::Start(start)) }) = stream.message().await? else {
                return Err(tonic::Status::invalid_argument("start first"));
            };
            let mut content = Vec::new();
            loop {
                match stream.message().await?.and_then(|m| m.payload) {
                    Some(Payload::Data(data)) => {
                        content.extend(data);
                        received().insert(start.path.clone());
                    }
                    Some(Payload::End(size)) if size == content.len() as u64 => break,
                    _ => return Err(tonic::Status::aborted("no end message: nothing kept")),
                }
            }
            let size = content.len() as u64;
            fake_files().insert(start.path, content);
            Ok(tonic::Response::new(banger_proto::agent::v1::WriteFileResponse { size }))
        }
    }

    /// The paths the fake agent has received data for.
    fn received() -> std::sync::MutexGuard<'static, std::collections::BTreeSet<String>> {
        static RECEIVED: std::sync::Mutex<std::collections::BTreeSet<String>> =
            std::sync::Mutex::new(std::collections::BTreeSet::new());
        RECEIVED.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// How many WriteFile calls the fake agent has finished handling.
    static WRITES_ENDED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

    fn fake_files() -> std::sync::MutexGuard<'static, std::collections::BTreeMap<String, Vec<u8>>> {
        static FILES: std::sync::Mutex<std::collections::BTreeMap<String, Vec<u8>>> =
            std::sync::Mutex::new(std::collections::BTreeMap::new());
        FILES.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    #[tokio::test]
    async fn files_stream_both_ways_and_a_failed_input_leaves_no_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = socket_in(&dir);
        spawn_fake_backend(&path);
        let client = AgentClient::new(path, None);
        client.wait_ready(Instant::now() + Duration::from_secs(5), || true).await.expect("ready");
        let chunks: Vec<Result<Vec<u8>, String>> = vec![Ok(b"hello ".to_vec()), Ok(b"world".to_vec())];
        let size =
            crate::host::files::write(client.clone(), "/ok".into(), 0o640, false, Box::pin(tokio_stream::iter(chunks)))
                .await
                .expect("write");
        assert_eq!(size, 11);
        let (meta, data) = crate::host::files::read(client.clone(), "/ok".into(), false).await.expect("read");
        assert_eq!((meta.mode, meta.size), (0o640, 11));
        let content: Vec<u8> = data.map(|c| c.expect("chunk")).collect::<Vec<_>>().await.concat();
        assert_eq!(content, b"hello world");
        // The input fails midway, once the agent has part of the file: the agent sees the
        // call end without the end message, and keeps nothing.
        let (input, feed) = tokio::sync::mpsc::channel::<Result<Vec<u8>, String>>(1);
        let ended = WRITES_ENDED.load(std::sync::atomic::Ordering::SeqCst);
        let writing = tokio::spawn(crate::host::files::write(
            client.clone(),
            "/aborted".into(),
            0o600,
            false,
            Box::pin(tokio_stream::wrappers::ReceiverStream::new(feed)),
        ));
        input.send(Ok(b"partial".to_vec())).await.expect("send");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !received().contains("/aborted") {
            assert!(tokio::time::Instant::now() < deadline, "the agent never got the first chunk");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        input.send(Err("client went away".into())).await.expect("send");
        let result = writing.await.expect("task");
        assert!(matches!(result, Err(crate::host::HostError::InputAborted { .. })), "{result:?}");
        while WRITES_ENDED.load(std::sync::atomic::Ordering::SeqCst) == ended {
            assert!(tokio::time::Instant::now() < deadline, "the agent never finished the aborted write");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(!fake_files().contains_key("/aborted"), "an aborted copy was kept");
        let missing = crate::host::files::read(client, "/missing".into(), false).await.map(|_| ());
        match missing {
            Err(crate::host::HostError::Agent(agent)) => {
                assert_eq!(agent.status().map(|s| s.code()), Some(tonic::Code::NotFound), "{agent:?}");
            }
            other => panic!("expected the agent's NOT_FOUND, got {other:?}"),
        }
    }

    /// Serves FakeAgent behind a fake hybrid-vsock backend on `path`.
    fn spawn_fake_backend(path: &Path) {
        let listener = UnixListener::bind(path).expect("bind");
        let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener).then(|accepted| async move {
            let mut stream = accepted?;
            let mut reader = BufReader::new(&mut stream);
            let mut line = String::new();
            reader.read_line(&mut line).await?;
            assert_eq!(line, "CONNECT 1024\n");
            stream.write_all(b"OK 1024\n").await?;
            Ok::<_, io::Error>(stream)
        });
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(AgentServiceServer::new(FakeAgent))
                .serve_with_incoming(incoming),
        );
    }

    #[tokio::test]
    async fn every_call_carries_the_key_and_a_new_key_applies_to_the_next_call_of_every_clone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = socket_in(&dir);
        spawn_fake_backend(&path);
        let presented = |client: AgentClient| async move { client.info().await.expect("info").hostname };
        assert_eq!(presented(AgentClient::new(path.clone(), None)).await, "none");
        let (key, next) = (AgentKey::generate().expect("key"), AgentKey::generate().expect("next"));
        let client = AgentClient::new(path.clone(), Some(key.clone()));
        let clone = client.clone();
        assert_eq!(presented(client.clone()).await, format!("Bearer {}", key.hex()));
        client.set_key(next.clone());
        assert_eq!(client.key(), Some(next.clone()));
        assert_eq!(presented(clone).await, format!("Bearer {}", next.hex()), "a clone, on the same connection");
    }

    #[tokio::test]
    async fn wait_ready_retries_until_the_backend_appears() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = socket_in(&dir);
        let client = AgentClient::new(path.clone(), None);
        let late_path = path.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            spawn_fake_backend(&late_path);
        });
        let ready = client
            .wait_ready(Instant::now() + Duration::from_secs(5), || true)
            .await
            .expect("ready once the backend is up");
        assert_eq!(ready.uptime_seconds, 1.5);

        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let mut output =
            client.clone().exec(tokio_stream::wrappers::ReceiverStream::new(rx)).await.expect("exec starts");
        let stdin = ExecRequest { payload: Some(exec_request::Payload::Stdin(b"ping".to_vec())) };
        tx.send(stdin).await.expect("send stdin");
        let echoed = output.message().await.expect("stream").expect("a message");
        assert_eq!(echoed.payload, Some(exec_response::Payload::Stdout(b"ping".to_vec())));
        client.shutdown().await.expect("shutdown");
    }

    #[tokio::test]
    async fn wait_ready_stops_when_the_vmm_is_gone_or_time_is_up() {
        let dir = tempfile::tempdir().expect("tempdir");
        let client = AgentClient::new(socket_in(&dir), None);
        let gone = client.wait_ready(Instant::now() + Duration::from_secs(5), || false).await;
        assert!(matches!(gone, Err(AgentError::VmmExited)));

        let late = client.wait_ready(Instant::now() + Duration::from_millis(200), || true).await;
        match late {
            Err(AgentError::NotReady { waited, last_error }) => {
                assert!(waited >= Duration::from_millis(200));
                let last = last_error.expect("at least one attempt");
                assert_eq!(last.status().map(tonic::Status::code), Some(tonic::Code::Unavailable));
                let handshake = last.handshake_error().expect("cause is kept as a source");
                assert!(matches!(handshake, HandshakeError::Connect(err) if err.kind() == io::ErrorKind::NotFound));
            }
            other => panic!("expected NotReady, got {other:?}"),
        }
    }
}
