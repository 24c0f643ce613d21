//! Transient host handles of a running VM: what is true now, never stored in SQLite.
//!
//! They live in the daemon's memory and in `<vm_dir>/handles.json`, written before
//! the memory copy is updated, so that a restarted daemon can find and adopt (or
//! clean up) what a previous one started.

use serde::{Deserialize, Serialize};

/// A process the daemon started for a VM, identified against PID reuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessHandle {
    /// Its process id.
    pub pid: u32,
    /// Its start time in clock ticks since boot (`/proc/<pid>/stat` field 22).
    pub start_time: u64,
}

/// Everything the host holds for one VM while it runs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmHandles {
    /// The VMM process.
    pub vmm: Option<ProcessHandle>,
    /// The user-space vsock backend (`vhost-device-vsock`), where the kernel has no vhost-vsock.
    pub vsock_backend: Option<ProcessHandle>,
}

impl VmHandles {
    /// True when no handle is held.
    pub fn is_empty(&self) -> bool {
        self.vmm.is_none() && self.vsock_backend.is_none()
    }
}
