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

/// Everything the host holds for one VM while it runs. Kernel-level handles (tap, loop
/// devices, device-mapper snapshot) outlive the processes that used them, so reconcile tears
/// them down from here even when every process is gone.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmHandles {
    /// The VMM process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vmm: Option<ProcessHandle>,
    /// The user-space vsock backend (`vhost-device-vsock`), where the kernel has no vhost-vsock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_backend: Option<ProcessHandle>,
    /// The VM's tap interface.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap: Option<String>,
    /// The read-only loop device over the image's root file system (dm-snapshot storage).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_loop: Option<String>,
    /// The loop device over the VM's copy-on-write file (dm-snapshot storage).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cow_loop: Option<String>,
    /// The device-mapper snapshot's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dm_name: Option<String>,
    /// The device-mapper snapshot's device node (`/dev/mapper/<name>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dm_device: Option<String>,
    /// The tag of the VM's NAT rules.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nat: Option<String>,
    /// The tag of the VM's guest rules (anti-spoofing, host access, egress).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firewall: Option<String>,
    /// The cgroup bounding the VMM (`banger/<vm id>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
}

impl VmHandles {
    /// True when no handle is held.
    pub fn is_empty(&self) -> bool {
        self == &Self::default()
    }
}
