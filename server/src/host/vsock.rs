//! The guest-agent channel's host side for QEMU: rust-vmm's user-space vsock backend.
//!
//! QEMU's `vhost-user-vsock-device` talks to `vhost-device-vsock`, which exposes the
//! guest's vsock as a hybrid unix socket (`CONNECT <port>\n` -> `OK ...`), the same
//! protocol Firecracker implements natively.

use std::{ffi::OsString, path::PathBuf, time::Duration};

use super::{
    HostError, command,
    confine::VmIdentity,
    process::{ProcFs, Processes},
};
use crate::domain::{ProcessHandle, VmPaths};

/// How the guest-agent channel reaches guests on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VsockMode {
    /// The kernel's vhost-vsock (`/dev/vhost-vsock`): QEMU's `vhost-vsock-device`, AF_VSOCK on the host.
    Kernel,
    /// rust-vmm's `vhost-device-vsock` per VM: QEMU's `vhost-user-vsock-device`, a hybrid unix socket on the host.
    UserSpace,
    /// The VMM serves the hybrid unix socket itself (Firecracker).
    VmmHybrid,
    /// Not vsock: a virtio-serial port (QEMU's `virtserialport` named `banger.agent`) on a
    /// unix socket QEMU serves, with the same `CONNECT`/`OK` handshake. No backend process,
    /// nothing on the host maps guest memory, and it survives the VMM's save and restore.
    VirtioSerial,
}

/// The kernel's vhost-vsock device.
pub const VHOST_VSOCK_DEVICE: &str = "/dev/vhost-vsock";

impl VsockMode {
    /// The kernel's vhost-vsock where `/dev/vhost-vsock` opens, else the user-space backend.
    pub fn detect() -> Self {
        let kernel = std::fs::OpenOptions::new().read(true).write(true).open(VHOST_VSOCK_DEVICE).is_ok();
        if kernel { Self::Kernel } else { Self::UserSpace }
    }
}

/// Starts and checks `vhost-device-vsock` processes, one per VM.
#[derive(Debug, Clone)]
pub struct VsockBackends {
    binary: PathBuf,
    processes: ProcFs,
}

impl VsockBackends {
    /// Uses the given `vhost-device-vsock` binary.
    pub fn new(binary: PathBuf, processes: ProcFs) -> Self {
        Self { binary, processes }
    }

    /// The binary, for `doctor`-style checks.
    pub fn binary(&self) -> &std::path::Path {
        &self.binary
    }

    /// Starts the backend for guest `cid`, as `identity` when given, and waits until its
    /// vhost-user socket exists.
    pub async fn start(
        &self,
        cid: u32,
        paths: &VmPaths,
        identity: Option<VmIdentity>,
    ) -> Result<ProcessHandle, HostError> {
        for stale in [&paths.vhost_user_socket, &paths.vsock] {
            let _ = std::fs::remove_file(stale);
        }
        let vm =
            format!("guest-cid={cid},socket={},uds-path={}", paths.vhost_user_socket.display(), paths.vsock.display());
        let args: Vec<OsString> = vec!["--vm".into(), vm.into()];
        let handle = match identity {
            Some(identity) => {
                command::spawn_confined(&self.binary, &args, &paths.vsock_backend_log, identity, &[], Vec::new())?
            }
            None => command::spawn_detached(&self.binary, &args, &paths.vsock_backend_log)?,
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !paths.vhost_user_socket.exists() {
            if !self.processes.alive(&handle, &paths.vsock) {
                return Err(HostError::ProcessExited {
                    process: "vhost-device-vsock",
                    detail: super::last_log_line(&paths.vsock_backend_log),
                    log: paths.vsock_backend_log.clone(),
                });
            }
            if tokio::time::Instant::now() >= deadline {
                self.stop(&handle, paths).await;
                return Err(HostError::Timeout { what: "vhost-device-vsock socket".into(), seconds: 10 });
            }
            // It binds within a few milliseconds: a coarser poll would be most of this stage.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Ok(handle)
    }

    /// True when the backend's worker thread died (a known failure of vhost-device-vsock 0.3):
    /// the process lives on but the VM's vsock is dead.
    pub fn panicked(paths: &VmPaths) -> bool {
        // The log is capped (`max_log_mib`); at most its last MiB is read.
        const TAIL: u64 = 1 << 20;
        let log = &paths.vsock_backend_log;
        let len = std::fs::symlink_metadata(log).map(|meta| meta.len()).unwrap_or(0);
        super::fs::read_vm_file(log, len.saturating_sub(TAIL), TAIL)
            .is_some_and(|tail| tail.windows(b"panicked".len()).any(|w| w == b"panicked"))
    }

    /// Stops the backend (SIGTERM, then SIGKILL) and removes its sockets.
    pub async fn stop(&self, handle: &ProcessHandle, paths: &VmPaths) {
        self.processes.terminate(handle, &paths.vsock, Duration::from_secs(2)).await;
        for socket in [&paths.vhost_user_socket, &paths.vsock] {
            let _ = std::fs::remove_file(socket);
        }
    }
}
