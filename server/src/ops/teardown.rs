//! The one teardown of what a VM holds on the host while it runs. Boot's undo releases the
//! parts a stage made; `release_runtime` (stop, delete, reconcile) releases all of them. Both
//! go through [`Ops::tear_down`], so the order and the rules live in one place.

use std::time::Duration;

use super::{Error, Ops};
use crate::{
    domain::{ProcessHandle, RootDiskStrategy, Vm, VmHandles, tap_name},
    host::HostError,
};

/// A part of a VM's runtime. [`Runtime::ALL`] lists them in teardown order: processes
/// before the cgroup that holds them, a snapshot before the loop devices under it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Runtime {
    /// The VMM process (also one found by its api socket that no handle names).
    Vmm,
    /// The user-space vsock backend.
    VsockBackend,
    /// What the VMM driver keeps beside the process (the Firecracker jail).
    Jail,
    /// The cgroup bounding the VMM.
    Cgroup,
    /// The VM's NAT rules.
    Nat,
    /// The VM's guest rules (anti-spoofing, host access, egress).
    Firewall,
    /// The VM's tap.
    Tap,
    /// The device-mapper snapshot of a dm-snapshot root disk.
    Snapshot,
    /// The loop devices under the snapshot (only once it is gone).
    Loops,
    /// The sockets the VMM and the backend served, and the guest's memory file.
    Sockets,
}

impl Runtime {
    /// Everything, in teardown order.
    pub(super) const ALL: &[Runtime] = &[
        Self::Vmm,
        Self::VsockBackend,
        Self::Jail,
        Self::Cgroup,
        Self::Nat,
        Self::Firewall,
        Self::Tap,
        Self::Snapshot,
        Self::Loops,
        Self::Sockets,
    ];
}

/// The tag of a VM's NAT rules: derived from its id alone.
pub(super) fn nat_tag(vm: &Vm) -> String {
    format!("banger-vm-{}", vm.id)
}

/// The cgroup of a VM's VMM: derived from its id alone (the jailer makes the same one).
pub(super) fn cgroup_name(vm: &Vm) -> String {
    crate::host::cgroup::group_of(vm.id)
}

impl Ops {
    /// Releases `parts` of `vm`'s runtime, in [`Runtime::ALL`]'s order whatever the order
    /// of `parts`. Each part is named by `handles`, else derived from the VM's identity (a
    /// scratch file lost in a crash still leaves nothing behind). Safe to run twice: what is
    /// already gone is fine. What cannot be released stays in `handles`, for the caller to
    /// record; every part is tried, and the first failure is returned.
    pub(super) async fn tear_down(&self, vm: &Vm, handles: &mut VmHandles, parts: &[Runtime]) -> Result<(), Error> {
        let paths = vm.paths();
        let network = self.config.network.as_ref();
        let mut first_error: Option<HostError> = None;
        let mut failed = |error: HostError, what: &str| {
            tracing::warn!(vm_id = %vm.id, vm_name = %vm.name, part = what, error = %error, "cannot release");
            first_error.get_or_insert(error);
        };
        for part in Runtime::ALL.iter().filter(|part| parts.contains(part)) {
            match part {
                Runtime::Vmm => {
                    if let Some(vmm) = handles.vmm.take() {
                        self.kill_vmm(&vmm, vm).await;
                    }
                    // A VMM launched by a daemon that died before recording it is found by its socket.
                    if let Some(orphan) = self.host.processes.find_by_marker(&paths.api_socket) {
                        self.kill_vmm(&orphan, vm).await;
                    }
                }
                Runtime::VsockBackend => {
                    let backend =
                        handles.vsock_backend.take().or_else(|| self.host.processes.find_by_marker(&paths.vsock));
                    if let Some(backend) = backend {
                        self.host.agents.stop_backend(&backend, &paths).await;
                    }
                }
                Runtime::Jail => {
                    if let Err(error) = self.host.vmm.release(&paths) {
                        failed(error, "jail");
                    }
                }
                Runtime::Cgroup => {
                    let group = handles.cgroup.clone().unwrap_or_else(|| cgroup_name(vm));
                    match self.host.limits.remove(&group).await {
                        Ok(()) => handles.cgroup = None,
                        Err(error) => {
                            handles.cgroup = Some(group);
                            failed(error, "cgroup");
                        }
                    }
                }
                Runtime::Nat => {
                    let derived = network.filter(|n| n.nat).map(|_| nat_tag(vm));
                    if let Some(tag) = handles.nat.clone().or(derived) {
                        match self.host.network.remove_nat(&tag).await {
                            Ok(()) => handles.nat = None,
                            Err(error) => {
                                handles.nat = Some(tag);
                                failed(error, "nat");
                            }
                        }
                    }
                }
                Runtime::Firewall => {
                    let derived = network.map(|_| nat_tag(vm));
                    if let Some(tag) = handles.firewall.clone().or(derived) {
                        match self.host.network.remove_guest_rules(&tag).await {
                            Ok(()) => handles.firewall = None,
                            Err(error) => {
                                handles.firewall = Some(tag);
                                failed(error, "firewall");
                            }
                        }
                    }
                }
                Runtime::Tap => {
                    let derived = network.map(|_| tap_name(vm.vsock_cid));
                    if let Some(tap) = handles.tap.clone().or(derived) {
                        match self.host.network.delete_tap(&tap).await {
                            Ok(()) => handles.tap = None,
                            Err(error) => {
                                handles.tap = Some(tap);
                                failed(error, "tap");
                            }
                        }
                    }
                }
                Runtime::Snapshot => {
                    let derived =
                        (vm.root_disk == RootDiskStrategy::DmSnapshot).then(|| RootDiskStrategy::dm_name(vm.id));
                    if let Some(dm) = handles.dm_name.clone().or(derived) {
                        match self.host.block.remove_dm(&dm).await {
                            Ok(()) => (handles.dm_name, handles.dm_device) = (None, None),
                            Err(error) => {
                                handles.dm_name = Some(dm);
                                failed(error, "snapshot");
                            }
                        }
                    }
                }
                // A loop under a live snapshot is busy: the loops wait for the next try.
                Runtime::Loops if handles.dm_name.is_some() => {}
                Runtime::Loops => {
                    for slot in [&mut handles.cow_loop, &mut handles.base_loop] {
                        if let Some(device) = slot.clone() {
                            match self.host.block.detach_loop(&device).await {
                                Ok(()) => *slot = None,
                                Err(error) => failed(error, "loop device"),
                            }
                        }
                    }
                }
                Runtime::Sockets => {
                    for socket in [&paths.api_socket, &paths.vsock, &paths.vhost_user_socket] {
                        crate::host::fs::remove_file_quietly(socket).await;
                    }
                    // The guest's memory, once no VMM maps it.
                    crate::host::fs::remove_file_quietly(&self.memory_file(vm)).await;
                }
            }
        }
        first_error.map_or(Ok(()), |error| Err(error.into()))
    }

    async fn kill_vmm(&self, vmm: &ProcessHandle, vm: &Vm) {
        let paths = vm.paths();
        self.host.processes.terminate(vmm, &paths.api_socket, Duration::ZERO).await;
        crate::host::fs::remove_file_quietly(&paths.api_socket).await;
    }

    /// Releases everything a VM holds on the host (see [`Runtime`]), then records what is
    /// left: nothing, or what could not be released, in the scratch file for the next
    /// reconcile to retry; the error says what failed.
    pub(super) async fn release_runtime(&self, vm: &Vm) -> Result<(), Error> {
        let mut handles = self.handles(vm);
        let released = self.tear_down(vm, &mut handles, Runtime::ALL).await;
        self.host.agents.forget(vm.id);
        self.set_handles(vm, handles)?;
        released
    }
}
