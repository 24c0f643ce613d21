//! Firecracker's HTTP API on its unix socket: the typed requests a driver sends, and a client
//! (hyper's HTTP/1.1, one connection per request).
//!
//! Only what both the published 1.17 description and the v1.12 binary accept is modelled;
//! `tests/firecracker_contract.rs` checks every request against the description.

use std::{
    io,
    path::{Path, PathBuf},
    time::Duration,
};

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use serde::Serialize;
use serde_json::Value;
use tokio::net::UnixStream;

/// How long one request may take, connect to last body byte, unless the caller says otherwise.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The most a response's status line and headers may take; Firecracker's are a few dozen
/// bytes (hyper's read buffer, which cannot go below 8 KiB).
const MAX_RESPONSE_HEAD_BYTES: usize = 16 * 1024;

/// The largest response body read; `GET /vm/config` for a busy VM is a few KiB.
const MAX_RESPONSE_BODY_BYTES: usize = 1024 * 1024;

/// Firecracker's own limit on drive and interface ids (`MAX_ID_LENGTH` in its `utils`).
const MAX_ID_LENGTH: usize = 64;

/// The guest's vCPUs and memory (`PUT /machine-config`). Pre-boot only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MachineConfig {
    /// Number of vCPUs: 1 to 32, and 1 or even when `smt` is on.
    pub vcpu_count: u32,
    /// Guest memory in MiB.
    pub mem_size_mib: u32,
    /// Simultaneous multithreading; x86 only. Firecracker's default is off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub smt: Option<bool>,
}

/// The kernel the guest boots (`PUT /boot-source`). Pre-boot only.
///
/// Paths are strings because JSON carries only UTF-8; the driver decides what a non-UTF-8 path means.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BootSource {
    /// Host path of the uncompressed kernel image.
    pub kernel_image_path: String,
    /// The kernel command line.
    pub boot_args: String,
    /// Host path of an initrd, if the guest boots one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<String>,
}

/// A virtio-block drive (`PUT /drives/{drive_id}`). Pre-boot only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Drive {
    /// The drive's id; also the last segment of the request path, so the two cannot disagree.
    pub drive_id: String,
    /// Host path of the backing file or block device.
    pub path_on_host: String,
    /// Whether the kernel mounts this drive as `/`.
    pub is_root_device: bool,
    /// Whether the guest sees the drive read-only.
    pub is_read_only: bool,
}

/// A virtio-net interface backed by a host tap (`PUT /network-interfaces/{iface_id}`). Pre-boot only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NetworkInterface {
    /// The interface's id; also the last segment of the request path.
    pub iface_id: String,
    /// The host tap device's name.
    pub host_dev_name: String,
    /// The guest's MAC address (`06:00:ac:1e:00:02`); Firecracker picks one when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
}

/// The virtio-vsock device (`PUT /vsock`). Pre-boot only.
///
/// `vsock_id` is left out: it is optional and deprecated in both 1.12 and 1.17.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Vsock {
    /// The guest's context id; 3 or more (0 to 2 are reserved).
    pub guest_cid: u32,
    /// Host path of the unix socket Firecracker creates for host-initiated connections.
    pub uds_path: String,
}

/// Firecracker's own log level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum LogLevel {
    /// Errors only.
    Error,
    /// Warnings and errors.
    Warning,
    /// Firecracker's default.
    Info,
    /// Debug and above.
    Debug,
    /// Everything.
    Trace,
    /// Nothing.
    Off,
}

/// Where Firecracker writes its own log (`PUT /logger`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Logger {
    /// Host path of the log file or named pipe; it must exist before the request.
    pub log_path: String,
    /// The level; Firecracker's default is `Info`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub level: Option<LogLevel>,
    /// Whether each line carries its level.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub show_level: Option<bool>,
    /// Whether each line carries its source file and line.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub show_log_origin: Option<bool>,
}

/// Where Firecracker flushes its JSON metrics (`PUT /metrics`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Metrics {
    /// Host path of the metrics file or named pipe; it must exist before the request.
    pub metrics_path: String,
}

/// A synchronous action on the instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum ActionType {
    /// Boots the configured guest. Pre-boot only, once.
    InstanceStart,
    /// Presses Ctrl+Alt+Del on the guest's i8042 keyboard: an x86 guest's polite shutdown.
    SendCtrlAltDel,
    /// Writes the metrics now rather than at the next periodic flush.
    FlushMetrics,
}

/// The body of `PUT /actions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct InstanceActionInfo {
    /// What to do.
    pub action_type: ActionType,
}

/// Whether the guest's vCPUs run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum RunState {
    /// vCPUs stopped, memory and devices kept.
    Paused,
    /// vCPUs running again.
    Resumed,
}

/// The body of `PATCH /vm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct VmRunState {
    /// The state to move to.
    pub state: RunState,
}

/// What `PUT /snapshot/create` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum SnapshotType {
    /// All of guest memory.
    Full,
}

/// The body of `PUT /snapshot/create`: a paused guest's state and memory, to two files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SnapshotCreateParams {
    /// Where the VM's device and vCPU state goes.
    pub snapshot_path: String,
    /// Where the guest's memory goes.
    pub mem_file_path: String,
    /// What is written; Firecracker writes a full snapshot when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot_type: Option<SnapshotType>,
}

/// Where a restored guest's memory comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum MemoryBackendType {
    /// A memory file, mapped private: copy-on-write, the file never written.
    File,
}

/// The memory of a snapshot load.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MemoryBackend {
    /// How it is provided.
    pub backend_type: MemoryBackendType,
    /// The memory file.
    pub backend_path: String,
}

/// A tap that replaces the one an interface had when the snapshot was taken.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NetworkOverride {
    /// The interface.
    pub iface_id: String,
    /// Its new host tap.
    pub host_dev_name: String,
}

/// The body of `PUT /snapshot/load`, sent to a Firecracker that was given nothing else.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SnapshotLoadParams {
    /// The state file `PUT /snapshot/create` wrote.
    pub snapshot_path: String,
    /// The guest's memory.
    pub mem_backend: MemoryBackend,
    /// Whether the guest runs at once.
    pub resume_vm: bool,
    /// Taps that replace the snapshot's (each clone has its own); left out when empty.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub network_overrides: Vec<NetworkOverride>,
}

/// Every request the driver sends, one variant per API operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiRequest {
    /// `PUT /machine-config`.
    PutMachineConfig(MachineConfig),
    /// `PUT /boot-source`.
    PutBootSource(BootSource),
    /// `PUT /drives/{drive_id}`.
    PutDrive(Drive),
    /// `PUT /network-interfaces/{iface_id}`.
    PutNetworkInterface(NetworkInterface),
    /// `PUT /vsock`.
    PutVsock(Vsock),
    /// `PUT /logger`.
    PutLogger(Logger),
    /// `PUT /metrics`.
    PutMetrics(Metrics),
    /// `PUT /actions`.
    PutAction(InstanceActionInfo),
    /// `PATCH /vm`: pauses or resumes a booted guest.
    PatchVm(VmRunState),
    /// `PUT /snapshot/create`: saves a paused guest.
    CreateSnapshot(SnapshotCreateParams),
    /// `PUT /snapshot/load`: restores one into a fresh Firecracker.
    LoadSnapshot(SnapshotLoadParams),
    /// `GET /vm/config`: the whole configuration as Firecracker holds it.
    GetVmConfig,
    /// `GET /`: the instance's id, state and version.
    GetInstanceInfo,
}

impl ApiRequest {
    /// The HTTP method.
    pub fn method(&self) -> &'static str {
        match self {
            Self::PutMachineConfig(_)
            | Self::PutBootSource(_)
            | Self::PutDrive(_)
            | Self::PutNetworkInterface(_)
            | Self::PutVsock(_)
            | Self::PutLogger(_)
            | Self::PutMetrics(_)
            | Self::PutAction(_)
            | Self::CreateSnapshot(_)
            | Self::LoadSnapshot(_) => "PUT",
            Self::PatchVm(_) => "PATCH",
            Self::GetVmConfig | Self::GetInstanceInfo => "GET",
        }
    }

    /// The request path; ids in it come from the body.
    pub fn path(&self) -> String {
        match self {
            Self::PutMachineConfig(_) => "/machine-config".into(),
            Self::PutBootSource(_) => "/boot-source".into(),
            Self::PutDrive(drive) => format!("/drives/{}", drive.drive_id),
            Self::PutNetworkInterface(nic) => format!("/network-interfaces/{}", nic.iface_id),
            Self::PutVsock(_) => "/vsock".into(),
            Self::PutLogger(_) => "/logger".into(),
            Self::PutMetrics(_) => "/metrics".into(),
            Self::PutAction(_) => "/actions".into(),
            Self::PatchVm(_) => "/vm".into(),
            Self::CreateSnapshot(_) => "/snapshot/create".into(),
            Self::LoadSnapshot(_) => "/snapshot/load".into(),
            Self::GetVmConfig => "/vm/config".into(),
            Self::GetInstanceInfo => "/".into(),
        }
    }

    /// The operation's `operationId` in Firecracker's API description, for messages and the contract test.
    pub fn operation_id(&self) -> &'static str {
        match self {
            Self::PutMachineConfig(_) => "putMachineConfiguration",
            Self::PutBootSource(_) => "putGuestBootSource",
            Self::PutDrive(_) => "putGuestDriveByID",
            Self::PutNetworkInterface(_) => "putGuestNetworkInterfaceByID",
            Self::PutVsock(_) => "putGuestVsock",
            Self::PutLogger(_) => "putLogger",
            Self::PutMetrics(_) => "putMetrics",
            Self::PutAction(_) => "createSyncAction",
            Self::PatchVm(_) => "patchVm",
            Self::CreateSnapshot(_) => "createSnapshot",
            Self::LoadSnapshot(_) => "loadSnapshot",
            Self::GetVmConfig => "getExportVmConfig",
            Self::GetInstanceInfo => "describeInstance",
        }
    }

    /// The JSON body, if the operation takes one.
    pub fn body(&self) -> Option<Value> {
        match self {
            Self::PutMachineConfig(body) => Some(to_json(body)),
            Self::PutBootSource(body) => Some(to_json(body)),
            Self::PutDrive(body) => Some(to_json(body)),
            Self::PutNetworkInterface(body) => Some(to_json(body)),
            Self::PutVsock(body) => Some(to_json(body)),
            Self::PutLogger(body) => Some(to_json(body)),
            Self::PutMetrics(body) => Some(to_json(body)),
            Self::PutAction(body) => Some(to_json(body)),
            Self::PatchVm(body) => Some(to_json(body)),
            Self::CreateSnapshot(body) => Some(to_json(body)),
            Self::LoadSnapshot(body) => Some(to_json(body)),
            Self::GetVmConfig | Self::GetInstanceInfo => None,
        }
    }

    /// Representative requests: every variant at least once, each body with all its optional fields
    /// set and again with none, and every action type. The contract test checks each against the
    /// API description, so a field added here is checked before any Firecracker sees it.
    pub fn all_examples() -> Vec<ApiRequest> {
        let logger = Logger {
            log_path: "/run/banger/vms/example/firecracker.log".into(),
            level: Some(LogLevel::Info),
            show_level: Some(true),
            show_log_origin: Some(false),
        };
        vec![
            Self::PutMachineConfig(MachineConfig { vcpu_count: 2, mem_size_mib: 512, smt: Some(false) }),
            Self::PutMachineConfig(MachineConfig { vcpu_count: 1, mem_size_mib: 128, smt: None }),
            Self::PutBootSource(BootSource {
                kernel_image_path: "/var/lib/banger/images/example/vmlinux".into(),
                boot_args: "console=ttyS0 reboot=k panic=1 pci=off root=/dev/vda rw".into(),
                initrd_path: Some("/var/lib/banger/images/example/initrd.img".into()),
            }),
            Self::PutBootSource(BootSource {
                kernel_image_path: "/var/lib/banger/images/example/vmlinux".into(),
                boot_args: "console=ttyS0".into(),
                initrd_path: None,
            }),
            Self::PutDrive(Drive {
                drive_id: "rootfs".into(),
                path_on_host: "/var/lib/banger/vms/example/root.raw".into(),
                is_root_device: true,
                is_read_only: false,
            }),
            Self::PutNetworkInterface(NetworkInterface {
                iface_id: "eth0".into(),
                host_dev_name: "bg-example0".into(),
                guest_mac: Some("06:00:ac:1e:00:02".into()),
            }),
            Self::PutNetworkInterface(NetworkInterface {
                iface_id: "eth0".into(),
                host_dev_name: "bg-example0".into(),
                guest_mac: None,
            }),
            Self::PutVsock(Vsock { guest_cid: 3, uds_path: "/run/banger/vms/example/vsock.sock".into() }),
            Self::PutLogger(logger.clone()),
            Self::PutLogger(Logger { level: None, show_level: None, show_log_origin: None, ..logger }),
            Self::PutMetrics(Metrics { metrics_path: "/run/banger/vms/example/metrics.json".into() }),
            Self::PutAction(InstanceActionInfo { action_type: ActionType::InstanceStart }),
            Self::PutAction(InstanceActionInfo { action_type: ActionType::SendCtrlAltDel }),
            Self::PutAction(InstanceActionInfo { action_type: ActionType::FlushMetrics }),
            Self::PatchVm(VmRunState { state: RunState::Paused }),
            Self::PatchVm(VmRunState { state: RunState::Resumed }),
            Self::CreateSnapshot(SnapshotCreateParams {
                snapshot_path: "/var/lib/banger/snapshots/example/state".into(),
                mem_file_path: "/var/lib/banger/snapshots/example/memory".into(),
                snapshot_type: Some(SnapshotType::Full),
            }),
            Self::CreateSnapshot(SnapshotCreateParams {
                snapshot_path: "/var/lib/banger/snapshots/example/state".into(),
                mem_file_path: "/var/lib/banger/snapshots/example/memory".into(),
                snapshot_type: None,
            }),
            Self::LoadSnapshot(SnapshotLoadParams {
                snapshot_path: "/var/lib/banger/snapshots/example/state".into(),
                mem_backend: MemoryBackend {
                    backend_type: MemoryBackendType::File,
                    backend_path: "/var/lib/banger/snapshots/example/memory".into(),
                },
                resume_vm: true,
                network_overrides: vec![NetworkOverride { iface_id: "eth0".into(), host_dev_name: "bg-clone0".into() }],
            }),
            Self::LoadSnapshot(SnapshotLoadParams {
                snapshot_path: "/var/lib/banger/snapshots/example/state".into(),
                mem_backend: MemoryBackend {
                    backend_type: MemoryBackendType::File,
                    backend_path: "/var/lib/banger/snapshots/example/memory".into(),
                },
                resume_vm: false,
                network_overrides: Vec::new(),
            }),
            Self::GetVmConfig,
            Self::GetInstanceInfo,
        ]
    }

    /// The first id in the path that Firecracker would refuse, if any. Checked before sending
    /// because the id is written into the request line verbatim.
    fn invalid_path_id(&self) -> Option<&str> {
        let id = match self {
            Self::PutDrive(drive) => &drive.drive_id,
            Self::PutNetworkInterface(nic) => &nic.iface_id,
            _ => return None,
        };
        // Firecracker's rule (`checked_id`): 1 to 64 ASCII alphanumerics or underscores.
        let valid = !id.is_empty()
            && id.len() <= MAX_ID_LENGTH
            && id.bytes().all(|byte| byte.is_ascii_alphanumeric() || byte == b'_');
        (!valid).then_some(id.as_str())
    }
}

fn to_json<T: Serialize>(body: &T) -> Value {
    // Cannot fail: every body is a struct of strings, integers, booleans and unit enums, all of
    // which JSON represents; a failure here is a bug in this file, not a runtime condition.
    serde_json::to_value(body).expect("firecracker request bodies are plain structs")
}

/// A Firecracker API request failed.
#[derive(Debug, thiserror::Error)]
pub enum FirecrackerApiError {
    /// Firecracker answered with a non-2xx status.
    #[error("firecracker refused {method} {path} with status {status}: {fault_message}")]
    Fault {
        /// The request's method.
        method: &'static str,
        /// The request's path.
        path: String,
        /// The HTTP status.
        status: u16,
        /// Firecracker's `fault_message`, or the raw body when it sent none.
        fault_message: String,
    },
    /// The socket could not be reached, written or read.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// No complete answer arrived in time.
    #[error("firecracker did not answer {method} {path} within {timeout:?}")]
    Timeout {
        /// The request's method.
        method: &'static str,
        /// The request's path.
        path: String,
        /// How long was waited.
        timeout: Duration,
    },
    /// The answer was not the HTTP/1.1 Firecracker speaks.
    #[error("firecracker's answer to {method} {path} is malformed: {reason}")]
    MalformedResponse {
        /// The request's method.
        method: &'static str,
        /// The request's path.
        path: String,
        /// What was wrong with it.
        reason: String,
    },
    /// A successful answer's body was not JSON.
    #[error("firecracker's answer to {method} {path} is not JSON")]
    InvalidJson {
        /// The request's method.
        method: &'static str,
        /// The request's path.
        path: String,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// A drive or interface id Firecracker would refuse; nothing was sent.
    #[error("{id:?} is not a valid firecracker id (1 to 64 ASCII letters, digits or underscores)")]
    InvalidId {
        /// The id.
        id: String,
    },
}

/// A client for one Firecracker process's API socket. Each request opens its own connection,
/// so the client holds no state and concurrent requests need no locking.
#[derive(Debug, Clone)]
pub struct FirecrackerApi {
    socket: PathBuf,
    timeout: Duration,
}

impl FirecrackerApi {
    /// A client for the API socket at `socket` (Firecracker's `--api-sock`).
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self { socket: socket.into(), timeout: DEFAULT_REQUEST_TIMEOUT }
    }

    /// The same client with another per-request timeout.
    pub fn with_timeout(self, timeout: Duration) -> Self {
        Self { timeout, ..self }
    }

    /// The API socket's path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Sends one request and waits for its answer: `Ok(None)` for a 2xx without a body,
    /// `Ok(Some(json))` for one with a body.
    pub async fn send(&self, request: &ApiRequest) -> Result<Option<Value>, FirecrackerApiError> {
        if let Some(id) = request.invalid_path_id() {
            return Err(FirecrackerApiError::InvalidId { id: id.to_owned() });
        }
        let method = request.method();
        let path = request.path();
        let exchange = Exchange { socket: &self.socket, method, path: &path };
        let (status, body) = tokio::time::timeout(self.timeout, exchange.run(request.body()))
            .await
            .map_err(|_| FirecrackerApiError::Timeout { method, path: path.clone(), timeout: self.timeout })??;
        tracing::debug!(method, %path, status, "firecracker api");
        if (200..300).contains(&status) {
            if body.is_empty() {
                return Ok(None);
            }
            return serde_json::from_slice(&body).map(Some).map_err(|source| FirecrackerApiError::InvalidJson {
                method,
                path,
                source,
            });
        }
        Err(FirecrackerApiError::Fault { method, path, status, fault_message: fault_message(&body) })
    }
}

/// Firecracker's `{"fault_message": "..."}`, or the body as text when it is something else,
/// so an unexpected answer is still shown rather than lost.
fn fault_message(body: &[u8]) -> String {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|json| json.get("fault_message").and_then(Value::as_str).map(str::to_owned))
        .unwrap_or_else(|| String::from_utf8_lossy(body).trim().to_owned())
}

/// One request on one connection, through hyper's HTTP/1.1 client.
struct Exchange<'a> {
    socket: &'a Path,
    method: &'static str,
    path: &'a str,
}

impl Exchange<'_> {
    /// Sends the request and reads the answer's status and body. A body-less request carries
    /// no `Content-Type` (and hyper sends no `Content-Length` for an empty `GET`).
    async fn run(&self, body: Option<Value>) -> Result<(u16, Bytes), FirecrackerApiError> {
        let stream = UnixStream::connect(self.socket).await.map_err(|source| FirecrackerApiError::Io {
            what: format!("connect to firecracker api socket {}", self.socket.display()),
            source,
        })?;
        let (mut sender, connection) = hyper::client::conn::http1::Builder::new()
            .max_buf_size(MAX_RESPONSE_HEAD_BYTES)
            .handshake::<_, Full<Bytes>>(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|error| self.failed("connect to", error))?;
        // Drives the connection until the answer is read; gone with this exchange.
        let connection = AbortOnDrop(tokio::spawn(connection));
        let mut request = hyper::Request::builder()
            .method(self.method)
            .uri(self.path)
            .header(hyper::header::HOST, "localhost")
            .header(hyper::header::ACCEPT, "application/json");
        let body = match body {
            Some(json) => {
                request = request.header(hyper::header::CONTENT_TYPE, "application/json");
                Full::new(Bytes::from(json.to_string()))
            }
            None => Full::new(Bytes::new()),
        };
        let request = request.body(body).map_err(|e| self.malformed(format!("request: {e}")))?;
        let response = sender.send_request(request).await.map_err(|error| self.failed("send", error))?;
        let status = response.status().as_u16();
        let body = Limited::new(response.into_body(), MAX_RESPONSE_BODY_BYTES)
            .collect()
            .await
            .map_err(|error| match error.downcast::<hyper::Error>() {
                Ok(error) => self.failed("read the body of the answer to", *error),
                Err(error) => self.malformed(format!("body: {error} (at most {MAX_RESPONSE_BODY_BYTES} bytes)")),
            })?
            .to_bytes();
        drop(connection);
        Ok((status, body))
    }

    /// What a failure of hyper's means here: an answer that is not HTTP is malformed; a
    /// connection that ended, or failed, is an I/O error.
    fn failed(&self, doing: &str, error: hyper::Error) -> FirecrackerApiError {
        if error.is_parse() || error.is_parse_status() || error.is_parse_too_large() {
            return self.malformed(error.to_string());
        }
        let source = if error.is_incomplete_message() || error.is_closed() {
            io::Error::new(io::ErrorKind::UnexpectedEof, error)
        } else {
            io::Error::other(error)
        };
        FirecrackerApiError::Io { what: format!("{doing} firecracker {} {}", self.method, self.path), source }
    }

    fn malformed(&self, reason: String) -> FirecrackerApiError {
        FirecrackerApiError::MalformedResponse { method: self.method, path: self.path.to_owned(), reason }
    }
}

/// Aborts the task when dropped (a connection nobody reads from any more).
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use serde_json::json;
    use tokio::{
        io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
        net::UnixListener,
        task::JoinHandle,
    };

    use super::*;

    /// A fake Firecracker API socket in a temp dir that answers one request with `response`
    /// and hands back the exact bytes it received.
    struct FakeApi {
        _dir: tempfile::TempDir,
        socket: PathBuf,
        received: JoinHandle<Vec<u8>>,
    }

    impl FakeApi {
        fn answering(response: impl Into<Vec<u8>>) -> Self {
            let response = response.into();
            let dir = tempfile::tempdir().expect("temp dir");
            let socket = dir.path().join("api.sock");
            let listener = UnixListener::bind(&socket).expect("bind fake api socket");
            let received = tokio::spawn(async move {
                let (stream, _) = listener.accept().await.expect("accept");
                let mut stream = BufReader::new(stream);
                let request = read_request(&mut stream).await;
                // Answer in two writes so the client must cope with a split response.
                let (first, rest) = response.split_at(response.len() / 2);

                stream.get_mut().write_all(first).await.expect("write response");
                stream.get_mut().flush().await.expect("flush");
                tokio::task::yield_now().await;
                // A client that saw enough (a garbled answer) may have hung up already.
                let _ = stream.get_mut().write_all(rest).await;
                request
            });
            Self { _dir: dir, socket, received }
        }

        fn client(&self) -> FirecrackerApi {
            FirecrackerApi::new(&self.socket)
        }

        async fn received(self) -> Vec<u8> {
            self.received.await.expect("fake api task")
        }
    }

    /// Reads a request head and as much body as its Content-Length announces.
    async fn read_request(stream: &mut BufReader<UnixStream>) -> Vec<u8> {
        let mut request = Vec::new();
        let mut content_length = 0;
        loop {
            let mut line = Vec::new();
            stream.read_until(b'\n', &mut line).await.expect("read request head");
            let text = String::from_utf8(line.clone()).expect("utf-8 head");
            if let Some((name, value)) = text.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                content_length = value.trim().parse().expect("content-length");
            }
            request.extend_from_slice(&line);
            if line == b"\r\n" || line.is_empty() {
                break;
            }
        }
        let mut body = vec![0; content_length];
        stream.read_exact(&mut body).await.expect("read request body");
        request.extend_from_slice(&body);
        request
    }

    /// An answer like Firecracker's: no reason phrase, and a Content-Length whenever there is a body.
    fn answer(status: u16, body: &str) -> Vec<u8> {
        let length = if body.is_empty() {
            String::new()
        } else {
            format!("Content-Type: application/json\r\nContent-Length: {}\r\n", body.len())
        };
        format!("HTTP/1.1 {status} \r\nServer: Firecracker API\r\nConnection: keep-alive\r\n{length}\r\n{body}")
            .into_bytes()
    }

    /// A request as Firecracker's parser reads it: the request line, the headers by
    /// lower-case name, and the body.
    fn parse_request(request: &[u8]) -> (String, BTreeMap<String, String>, Vec<u8>) {
        let text = String::from_utf8(request.to_vec()).expect("utf-8 request");
        let (head, body) = text.split_once("\r\n\r\n").expect("head ends with an empty line");
        let mut lines = head.split("\r\n");
        let request_line = lines.next().expect("request line").to_owned();
        let headers = lines
            .map(|line| line.split_once(':').expect("header"))
            .map(|(name, value)| (name.to_ascii_lowercase(), value.trim().to_owned()))
            .collect();
        (request_line, headers, body.as_bytes().to_vec())
    }

    fn root_drive() -> ApiRequest {
        ApiRequest::PutDrive(Drive {
            drive_id: "rootfs".into(),
            path_on_host: "/vms/a/root.raw".into(),
            is_root_device: true,
            is_read_only: false,
        })
    }

    #[tokio::test]
    async fn put_sends_its_json_body_with_its_length_and_204_is_none() {
        let fake = FakeApi::answering(answer(204, ""));
        let answer = fake.client().send(&root_drive()).await.expect("204 is success");
        assert_eq!(answer, None);

        let (line, headers, body) = parse_request(&fake.received().await);
        assert_eq!(line, "PUT /drives/rootfs HTTP/1.1");
        let header = |name: &str| headers.get(name).map(String::as_str);
        assert_eq!(header("host"), Some("localhost"));
        assert_eq!(header("accept"), Some("application/json"));
        assert_eq!(header("content-type"), Some("application/json"));
        assert_eq!(header("content-length"), Some(body.len().to_string().as_str()));
        assert!(header("transfer-encoding").is_none(), "firecracker reads lengths, not chunks");
        let expected_body = json!({
            "drive_id": "rootfs",
            "path_on_host": "/vms/a/root.raw",
            "is_root_device": true,
            "is_read_only": false,
        });
        assert_eq!(serde_json::from_slice::<Value>(&body).expect("json body"), expected_body);
    }

    #[tokio::test]
    async fn get_sends_no_body_and_returns_the_json_answer() {
        // Lower-case header names and a reason phrase: HTTP allows both, so the client must too.
        let body = r#"{"app_name":"Firecracker","id":"a","state":"Running","vmm_version":"1.12.1"}"#;
        let fake = FakeApi::answering(format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        ));
        let answer = fake.client().send(&ApiRequest::GetInstanceInfo).await.expect("200 is success");
        assert_eq!(
            answer,
            Some(json!({"app_name": "Firecracker", "id": "a", "state": "Running", "vmm_version": "1.12.1"}))
        );

        let (line, headers, body) = parse_request(&fake.received().await);
        assert_eq!(line, "GET / HTTP/1.1");
        assert!(body.is_empty() && !headers.contains_key("content-type"), "{headers:?}");
        assert!(headers.get("content-length").is_none_or(|length| length == "0"), "{headers:?}");
    }

    #[tokio::test]
    async fn a_400_becomes_a_fault_with_firecrackers_message() {
        let fake = FakeApi::answering(answer(400, r#"{"fault_message":"Invalid block device path"}"#));
        let error = fake.client().send(&root_drive()).await.expect_err("400 is a failure");
        match error {
            FirecrackerApiError::Fault { method, path, status, fault_message } => {
                assert_eq!((method, path.as_str(), status), ("PUT", "/drives/rootfs", 400));
                assert_eq!(fault_message, "Invalid block device path");
            }
            other => panic!("expected a fault, got {other:?}"),
        }
        fake.received().await;
    }

    #[tokio::test]
    async fn a_fault_without_json_keeps_the_raw_body() {
        let fake = FakeApi::answering(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 5\r\n\r\noops\n");
        let error = fake.client().send(&ApiRequest::GetVmConfig).await.expect_err("500 is a failure");
        assert!(
            matches!(&error, FirecrackerApiError::Fault { status: 500, fault_message, .. } if fault_message == "oops"),
            "{error:?}"
        );
        fake.received().await;
    }

    #[tokio::test]
    async fn a_garbled_status_line_is_malformed() {
        let fake = FakeApi::answering(b"SSH-2.0-OpenSSH\r\n\r\n");
        let error = fake.client().send(&ApiRequest::GetVmConfig).await.expect_err("not http");
        assert!(matches!(error, FirecrackerApiError::MalformedResponse { .. }), "{error:?}");
        fake.received().await;
    }

    #[tokio::test]
    async fn a_2xx_body_that_is_not_json_is_reported() {
        let fake = FakeApi::answering(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nnot");
        let error = fake.client().send(&ApiRequest::GetVmConfig).await.expect_err("not json");
        assert!(matches!(error, FirecrackerApiError::InvalidJson { .. }), "{error:?}");
        fake.received().await;
    }

    #[tokio::test]
    async fn a_missing_socket_is_an_io_error_naming_it() {
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("absent.sock");
        let error = FirecrackerApi::new(&socket).send(&ApiRequest::GetInstanceInfo).await.expect_err("no socket");
        match error {
            FirecrackerApiError::Io { what, source } => {
                assert!(what.contains(&socket.display().to_string()), "{what}");
                assert_eq!(source.kind(), io::ErrorKind::NotFound);
            }
            other => panic!("expected an io error, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_connection_closed_before_the_answer_is_an_io_error() {
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("api.sock");
        let listener = UnixListener::bind(&socket).expect("bind");
        let server = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.expect("accept");
            read_request(&mut BufReader::new(stream)).await
        });
        let error = FirecrackerApi::new(&socket).send(&ApiRequest::GetVmConfig).await.expect_err("closed");
        assert!(
            matches!(&error, FirecrackerApiError::Io { source, .. } if source.kind() == io::ErrorKind::UnexpectedEof),
            "{error:?}"
        );
        server.await.expect("server task");
    }

    #[tokio::test]
    async fn a_silent_api_times_out() {
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("api.sock");
        let listener = UnixListener::bind(&socket).expect("bind");
        // Accepts and reads, then never answers; kept alive until the client gives up.
        let server = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.expect("accept");
            let mut stream = BufReader::new(stream);
            read_request(&mut stream).await;
            std::future::pending::<()>().await;
        });
        let api = FirecrackerApi::new(&socket).with_timeout(Duration::from_millis(200));
        let error = api.send(&root_drive()).await.expect_err("no answer");
        match error {
            FirecrackerApiError::Timeout { method, path, timeout } => {
                assert_eq!((method, path.as_str(), timeout), ("PUT", "/drives/rootfs", Duration::from_millis(200)));
            }
            other => panic!("expected a timeout, got {other:?}"),
        }
        server.abort();
    }

    #[tokio::test]
    async fn an_id_firecracker_would_refuse_is_never_sent() {
        let dir = tempfile::tempdir().expect("temp dir");
        let api = FirecrackerApi::new(dir.path().join("never-connected.sock"));
        for id in ["", "root fs", "a/b", "x\r\nHost: evil", &"a".repeat(65)] {
            let request = ApiRequest::PutNetworkInterface(NetworkInterface {
                iface_id: id.into(),
                host_dev_name: "tap0".into(),
                guest_mac: None,
            });
            let error = api.send(&request).await.expect_err("invalid id");
            assert!(matches!(&error, FirecrackerApiError::InvalidId { id: refused } if refused == id), "{error:?}");
        }
    }

    #[test]
    fn unset_optional_fields_are_left_out() {
        let request = ApiRequest::PutMachineConfig(MachineConfig { vcpu_count: 2, mem_size_mib: 256, smt: None });
        assert_eq!(request.body(), Some(json!({"vcpu_count": 2, "mem_size_mib": 256})));
        let request = ApiRequest::PutLogger(Logger {
            log_path: "/l".into(),
            level: Some(LogLevel::Warning),
            show_level: None,
            show_log_origin: None,
        });
        assert_eq!(request.body(), Some(json!({"log_path": "/l", "level": "Warning"})));
    }

    #[test]
    fn action_types_serialize_to_firecrackers_names() {
        for (action_type, name) in [
            (ActionType::InstanceStart, "InstanceStart"),
            (ActionType::SendCtrlAltDel, "SendCtrlAltDel"),
            (ActionType::FlushMetrics, "FlushMetrics"),
        ] {
            let request = ApiRequest::PutAction(InstanceActionInfo { action_type });
            assert_eq!(request.body(), Some(json!({ "action_type": name })));
            assert_eq!((request.method(), request.path().as_str()), ("PUT", "/actions"));
        }
    }

    #[test]
    fn paths_carry_the_body_ids() {
        let nic = ApiRequest::PutNetworkInterface(NetworkInterface {
            iface_id: "eth0".into(),
            host_dev_name: "tap0".into(),
            guest_mac: None,
        });
        assert_eq!(nic.path(), "/network-interfaces/eth0");
        assert_eq!(root_drive().path(), "/drives/rootfs");
        assert_eq!(ApiRequest::GetVmConfig.path(), "/vm/config");
        assert_eq!(ApiRequest::GetInstanceInfo.path(), "/");
        assert_eq!(ApiRequest::GetVmConfig.body(), None);
    }

    #[test]
    fn examples_cover_every_variant() {
        let covered: BTreeSet<u8> = ApiRequest::all_examples()
            .iter()
            .map(|request| {
                // No wildcard arm: a new variant does not compile here until it is counted, and
                // then fails below until `all_examples` has one for the contract test.
                match request {
                    ApiRequest::PutMachineConfig(_) => 0,
                    ApiRequest::PutBootSource(_) => 1,
                    ApiRequest::PutDrive(_) => 2,
                    ApiRequest::PutNetworkInterface(_) => 3,
                    ApiRequest::PutVsock(_) => 4,
                    ApiRequest::PutLogger(_) => 5,
                    ApiRequest::PutMetrics(_) => 6,
                    ApiRequest::PutAction(_) => 7,
                    ApiRequest::GetVmConfig => 8,
                    ApiRequest::GetInstanceInfo => 9,
                    ApiRequest::PatchVm(_) => 10,
                    ApiRequest::CreateSnapshot(_) => 11,
                    ApiRequest::LoadSnapshot(_) => 12,
                }
            })
            .collect();
        assert_eq!(covered, (0..13).collect());
        assert!(ApiRequest::all_examples().iter().all(|request| request.invalid_path_id().is_none()));
    }
}
