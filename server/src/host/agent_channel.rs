//! The guest-agent channel as one capability: its host-side backend (if the host needs one)
//! and the calls the daemon makes to the agent.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    pin::Pin,
    sync::Mutex,
    time::Duration,
};

use tokio::time::Instant;
use tokio_stream::Stream;

use super::{
    HostError,
    agent::AgentClient,
    agent_key::{self, AgentKey},
    confine::VmIdentity,
    exec,
    files::{self, FileData, FileInput},
    vsock::{VsockBackends, VsockMode},
};
use crate::domain::{ExecCommand, ExecEvent, ExecInput, GuestIdentity, ProcessHandle, Vm, VmId, VmPaths};

/// What the guest agent prints on the serial console once it serves.
pub const AGENT_ANNOUNCEMENT: &str = "serving banger.agent.v1";
/// How long to wait for that line before polling the agent anyway.
const ANNOUNCE_GRACE: Duration = Duration::from_secs(30);

/// Standard input for a guest process.
pub type ExecInputStream = Pin<Box<dyn Stream<Item = ExecInput> + Send>>;
/// The output of a guest process, ending with its exit.
pub type ExecEventStream = Pin<Box<dyn Stream<Item = Result<ExecEvent, HostError>> + Send>>;
/// A guest process being started.
pub type ExecStarting = Pin<Box<dyn std::future::Future<Output = Result<ExecEventStream, HostError>> + Send>>;

/// How the daemon reaches the agent inside each guest.
#[tonic::async_trait]
pub trait AgentChannels: Send + Sync + std::fmt::Debug {
    /// Starts the channel's host-side backend for a VM, if this host needs one, as the VM's
    /// `identity` where it has one.
    async fn start_backend(
        &self,
        cid: u32,
        paths: &VmPaths,
        identity: Option<VmIdentity>,
    ) -> Result<Option<ProcessHandle>, HostError>;

    /// Stops a backend and removes its sockets; tolerates one already gone.
    async fn stop_backend(&self, backend: &ProcessHandle, paths: &VmPaths);

    /// The backend is alive but can no longer carry connections.
    fn backend_failed(&self, paths: &VmPaths) -> bool;

    /// Waits until the VM's agent answers, or `deadline`, or `still_booting` says no. This
    /// boot's console output starts at byte `console_from` of the console log (earlier boots
    /// wrote what comes before).
    async fn wait_ready(
        &self,
        vm: &Vm,
        console_from: u64,
        deadline: Instant,
        still_booting: &(dyn Fn() -> bool + Send + Sync),
    ) -> Result<(), HostError>;

    /// Gives the agent of the boot about to start a key of its own: written down for the
    /// daemon, and put in an archive before `initrd` (the image's initramfs) in a file the VMM
    /// boots, whose path is returned (readable by `owner`, the VM's identity). An image without
    /// an initramfs gets no key (its agent, if it has one, refuses every call).
    async fn new_boot_key(
        &self,
        vm: &Vm,
        initrd: Option<&Path>,
        owner: Option<VmIdentity>,
    ) -> Result<Option<PathBuf>, HostError>;

    /// A VM restored from a snapshot: its agent holds the key kept in `key_file` (the
    /// snapshot's) until its identity gives it one of its own.
    async fn restore_key(&self, vm: &Vm, key_file: &Path) -> Result<(), HostError>;

    /// Keeps the key the VM's agent holds in `key_file` (a snapshot's, root's alone).
    async fn save_key(&self, vm: &Vm, key_file: &Path) -> Result<(), HostError>;

    /// Asks the guest to flush and power off.
    async fn shutdown_guest(&self, vm: &Vm) -> Result<(), HostError>;

    /// Gives a running guest a new identity, and its agent a new key.
    async fn set_identity(&self, vm: &Vm, identity: &GuestIdentity) -> Result<(), HostError>;

    /// Gives a guest just restored from a snapshot its new identity and its agent a key of
    /// its own (its source's is retired): asks until its agent answers (it serves already, so there is nothing else to wait for), `deadline`, or
    /// `still_booting()` false, as [`Self::wait_ready`] does.
    async fn wait_set_identity(
        &self,
        vm: &Vm,
        identity: &GuestIdentity,
        deadline: Instant,
        still_booting: &(dyn Fn() -> bool + Send + Sync),
    ) -> Result<(), HostError>;

    /// Flushes the guest's file systems.
    async fn sync_guest(&self, vm: &Vm) -> Result<(), HostError>;

    /// Runs a process in the guest. The future owns what it needs, so it outlives `self`.
    fn exec(&self, vm: &Vm, command: ExecCommand, input: ExecInputStream) -> ExecStarting;

    /// Opens a guest file: its mode and size, and its content as a stream.
    fn read_file(&self, vm: &Vm, path: String, archive: bool) -> FileReading;

    /// Writes a guest file (complete or not at all) from `input`, or with `archive` the
    /// directory a tar stream holds; returns the bytes sent.
    fn write_file(&self, vm: &Vm, path: String, mode: u32, archive: bool, input: FileInput) -> FileWriting;

    /// Drops what is kept for a VM (its connection), e.g. once it stopped.
    fn forget(&self, vm: VmId);

    /// Before the VM's vCPUs stop: closes the daemon's connections to its agent and waits
    /// until they are closed. A connection closed while the guest is stopped (a daemon killed
    /// during a pause) would otherwise kill the user-space vsock backend for that VM: it
    /// cannot hand the hang-up to a stopped guest. Fails with [`HostError::AgentBusy`] when
    /// a call (an exec, a copy) keeps one open.
    async fn quiesce(&self, vm: &Vm) -> Result<(), HostError>;
}

/// Runs `work` (small file writes) on a blocking thread.
async fn blocking<T: Send + 'static>(
    what: &'static str,
    work: impl FnOnce() -> Result<T, HostError> + Send + 'static,
) -> Result<T, HostError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| HostError::Io { what: what.into(), source: std::io::Error::other(e) })?
}

/// How long [`AgentChannels::quiesce`] waits for calls in flight to end.
const QUIESCE_WAIT: Duration = Duration::from_secs(1);
/// How long the user-space backend gets to pass a hang-up on to the guest: it does so at its
/// next wakeup, within milliseconds.
const HANGUP_SETTLE: Duration = Duration::from_millis(50);

/// How long [`AgentChannels::quiesce`] waits for the guest to end its side of the last
/// connection over a virtio-serial port (an agent too old to answer is not waited for longer).
const SERIAL_SETTLE_WAIT: Duration = Duration::from_secs(1);
/// How long the guest gets to take the hang-up of that check.
const SERIAL_HANGUP_SETTLE: Duration = Duration::from_millis(20);

/// A guest file being opened.
pub type FileReading =
    Pin<Box<dyn std::future::Future<Output = Result<(crate::domain::FileMeta, FileData), HostError>> + Send>>;
/// A guest file being written.
pub type FileWriting = Pin<Box<dyn std::future::Future<Output = Result<u64, HostError>> + Send>>;

/// The real channel: kernel vhost-vsock or a `vhost-device-vsock` per VM, and one gRPC
/// channel per VM to its agent.
#[derive(Debug)]
pub struct VsockAgentChannels {
    mode: VsockMode,
    backends: VsockBackends,
    clients: Mutex<HashMap<VmId, AgentClient>>,
}

impl VsockAgentChannels {
    /// Channels in `mode`, starting user-space backends with `backends`.
    pub fn new(mode: VsockMode, backends: VsockBackends) -> Self {
        Self { mode, backends, clients: Mutex::default() }
    }

    /// The VM's client, made with the key in its dir when there is none yet (after a
    /// restart of the daemon, or a new boot).
    fn client(&self, vm: &Vm) -> Result<AgentClient, HostError> {
        let mut clients = self.clients.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(client) = clients.get(&vm.id) {
            return Ok(client.clone());
        }
        let paths = vm.paths();
        let key = agent_key::read(&paths.agent_key)?;
        let client = match self.mode {
            VsockMode::Kernel => AgentClient::new_kernel_vsock(vm.vsock_cid, key),
            VsockMode::UserSpace | VsockMode::VmmHybrid => AgentClient::new(paths.vsock, key),
            VsockMode::VirtioSerial => AgentClient::new_serial(paths.agent_serial, key),
        };
        clients.insert(vm.id, client.clone());
        Ok(client)
    }

    /// After the agent took `key` in an identity call: written down first (the agent takes
    /// the old key too until the new one is used), then used once, which retires the old one.
    async fn took_key(&self, vm: &Vm, client: &AgentClient, key: AgentKey) -> Result<(), HostError> {
        let path = vm.paths().agent_key;
        let written = key.clone();
        blocking("write an agent key", move || agent_key::write(&path, &written)).await?;
        client.set_key(key);
        client.confirm_key().await.map_err(HostError::from)
    }
}

#[tonic::async_trait]
impl AgentChannels for VsockAgentChannels {
    async fn start_backend(
        &self,
        cid: u32,
        paths: &VmPaths,
        identity: Option<VmIdentity>,
    ) -> Result<Option<ProcessHandle>, HostError> {
        match self.mode {
            // QEMU opens /dev/vhost-vsock itself, Firecracker serves the socket: no host process.
            VsockMode::Kernel | VsockMode::VmmHybrid | VsockMode::VirtioSerial => Ok(None),
            VsockMode::UserSpace => self.backends.start(cid, paths, identity).await.map(Some),
        }
    }

    async fn stop_backend(&self, backend: &ProcessHandle, paths: &VmPaths) {
        self.backends.stop(backend, paths).await;
    }

    fn backend_failed(&self, paths: &VmPaths) -> bool {
        self.mode == VsockMode::UserSpace && VsockBackends::panicked(paths)
    }

    async fn wait_ready(
        &self,
        vm: &Vm,
        console_from: u64,
        deadline: Instant,
        still_booting: &(dyn Fn() -> bool + Send + Sync),
    ) -> Result<(), HostError> {
        if matches!(self.mode, VsockMode::UserSpace | VsockMode::VirtioSerial) {
            // vhost-device-vsock 0.3 has races around connections made while the guest's
            // vsock driver comes up; each CONNECT during boot is a chance to hit one. A
            // virtio-serial port takes one connection at a time, so a CONNECT made before the
            // agent serves holds it (and tries made meanwhile find QEMU's backlog full). The
            // agent announces itself on the serial console, so wait for that line of this
            // boot first and connect once it is there. Images whose agent does not announce
            // itself are polled after the grace period.
            let announced = Instant::now() + ANNOUNCE_GRACE;
            let console = vm.paths().console_log;
            // This boot's part of the console (at most 4 MiB of it: a boot prints far less).
            let this_boot = || {
                super::fs::read_vm_file(&console, console_from, 4 << 20).is_some_and(|log| {
                    log.windows(AGENT_ANNOUNCEMENT.len()).any(|w| w == AGENT_ANNOUNCEMENT.as_bytes())
                })
            };
            while Instant::now() < announced.min(deadline) && still_booting() {
                if this_boot() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        }
        self.client(vm)?.wait_ready(deadline, still_booting).await.map(drop).map_err(HostError::from)
    }

    async fn new_boot_key(
        &self,
        vm: &Vm,
        initrd: Option<&Path>,
        owner: Option<VmIdentity>,
    ) -> Result<Option<PathBuf>, HostError> {
        let paths = vm.paths();
        // A client of an earlier boot carries that boot's key.
        self.forget(vm.id);
        let initrd = initrd.map(Path::to_owned);
        blocking("make the agent's key", move || match initrd {
            Some(initrd) => {
                let key = AgentKey::generate()?;
                agent_key::write_boot_initrd(&key, &initrd, &paths.boot_initrd, owner)?;
                agent_key::write(&paths.agent_key, &key)?;
                Ok(Some(paths.boot_initrd))
            }
            None => {
                for stale in [&paths.agent_key, &paths.boot_initrd] {
                    match std::fs::remove_file(stale) {
                        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                            return Err(super::file_error("remove", stale)(e));
                        }
                        _ => {}
                    }
                }
                Ok(None)
            }
        })
        .await
    }

    async fn restore_key(&self, vm: &Vm, key_file: &Path) -> Result<(), HostError> {
        self.forget(vm.id);
        let (from, to) = (key_file.to_owned(), vm.paths().agent_key);
        blocking("copy an agent key", move || agent_key::copy(&from, &to).map(drop)).await
    }

    async fn save_key(&self, vm: &Vm, key_file: &Path) -> Result<(), HostError> {
        let (from, to) = (vm.paths().agent_key, key_file.to_owned());
        blocking("copy an agent key", move || agent_key::copy(&from, &to).map(drop)).await
    }

    async fn shutdown_guest(&self, vm: &Vm) -> Result<(), HostError> {
        self.client(vm)?.shutdown().await.map_err(HostError::from)
    }

    async fn set_identity(&self, vm: &Vm, identity: &GuestIdentity) -> Result<(), HostError> {
        let client = self.client(vm)?;
        let key = AgentKey::generate()?;
        client.set_identity(identity, Some(&key)).await?;
        self.took_key(vm, &client, key).await
    }

    async fn wait_set_identity(
        &self,
        vm: &Vm,
        identity: &GuestIdentity,
        deadline: Instant,
        still_booting: &(dyn Fn() -> bool + Send + Sync),
    ) -> Result<(), HostError> {
        let client = self.client(vm)?;
        let key = AgentKey::generate()?;
        client.wait_set_identity(identity, Some(&key), deadline, still_booting).await?;
        self.took_key(vm, &client, key).await
    }

    async fn sync_guest(&self, vm: &Vm) -> Result<(), HostError> {
        self.client(vm)?.sync().await.map_err(HostError::from)
    }

    fn exec(&self, vm: &Vm, command: ExecCommand, input: ExecInputStream) -> ExecStarting {
        let client = self.client(vm);
        Box::pin(async move {
            let events = exec::exec(client?, command, input).await?;
            Ok::<ExecEventStream, HostError>(Box::pin(events))
        })
    }

    fn read_file(&self, vm: &Vm, path: String, archive: bool) -> FileReading {
        let client = self.client(vm);
        Box::pin(async move { files::read(client?, path, archive).await })
    }

    fn write_file(&self, vm: &Vm, path: String, mode: u32, archive: bool, input: FileInput) -> FileWriting {
        let client = self.client(vm);
        Box::pin(async move { files::write(client?, path, mode, archive, input).await })
    }

    fn forget(&self, vm: VmId) {
        self.clients.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&vm);
    }

    async fn quiesce(&self, vm: &Vm) -> Result<(), HostError> {
        let taken = self.clients.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&vm.id);
        let Some(client) = taken else { return Ok(()) };
        let open = client.close();
        let deadline = Instant::now() + QUIESCE_WAIT;
        while open.count() > 0 {
            if Instant::now() >= deadline {
                return Err(HostError::AgentBusy { open: open.count() });
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        match self.mode {
            VsockMode::UserSpace => tokio::time::sleep(HANGUP_SETTLE).await,
            VsockMode::VirtioSerial => {
                // The guest ends its side of the connection only when it next runs: after a
                // restore, in every clone, unless it did so now.
                let port = vm.paths().agent_serial;
                match super::agent::settle_serial_port(&port, SERIAL_SETTLE_WAIT).await {
                    Ok(()) => tokio::time::sleep(SERIAL_HANGUP_SETTLE).await,
                    Err(error) => tracing::debug!(vm_id = %vm.id, error = %error, "the agent's port did not settle"),
                }
            }
            VsockMode::Kernel | VsockMode::VmmHybrid => {}
        }
        Ok(())
    }
}
