//! Admission control: a create or a start is refused, before anything is made, when it
//! would take the host past what it is configured to give (VMs, vCPUs, guest memory) or
//! when the state dir's file system is nearly full. A VM being created or started holds a
//! reservation until its operation ends, so concurrent requests cannot both take the last
//! room.

use std::collections::HashMap;

use super::{Error, Ops};
use crate::domain::{VmId, VmSpec, VmState};

/// What the host gives VMs; `None` is no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Capacity {
    /// VMs recorded, running or not.
    pub max_vms: Option<u64>,
    /// vCPUs of the VMs that run or are starting.
    pub max_vcpus: Option<u64>,
    /// Guest memory of the VMs that run or are starting, in MiB.
    pub max_memory_mib: Option<u64>,
    /// Free space the state dir's file system keeps; below it, creates are refused.
    pub min_free_mib: u64,
}

/// One resource a request would exhaust, with what is used and what is left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exhausted {
    /// `vms`, `vcpus`, `memory_mib` or `free_disk_mib`.
    pub resource: &'static str,
    /// What the request asks for.
    pub asked: u64,
    /// What is in use (for free disk: what is free).
    pub used: u64,
    /// The limit.
    pub limit: u64,
}

impl std::fmt::Display for Exhausted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.resource == "free_disk_mib" {
            return write!(
                f,
                "the state dir's file system has {} MiB free, below the {} MiB it keeps (min_free_disk_mib)",
                self.used, self.limit
            );
        }
        write!(
            f,
            "{} {}: {} of {} in use, {} left",
            self.asked,
            self.resource,
            self.used,
            self.limit,
            self.limit.saturating_sub(self.used)
        )
    }
}

/// Requests under way and what they take.
#[derive(Debug, Default)]
pub(super) struct Reservations {
    held: HashMap<VmId, (VmSpec, bool)>,
}

/// Releases its reservation when dropped (the operation ended, done or not).
pub(super) struct Admitted<'a> {
    ops: &'a Ops,
    vm: VmId,
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        self.ops.reservations.lock().unwrap_or_else(std::sync::PoisonError::into_inner).held.remove(&self.vm);
    }
}

/// True when a VM's vCPUs and memory are taken: it runs or is on its way.
fn takes_room(desired: VmState, observed: VmState) -> bool {
    desired == VmState::Running || !matches!(observed, VmState::Stopped | VmState::Error | VmState::Created)
}

impl Ops {
    /// Admits VM `vm` of `spec`: `new` for a create (it counts as one more VM), `boots`
    /// when it will run. Refused with [`Error::CapacityExhausted`] when it does not fit.
    pub(super) async fn admit(&self, vm: VmId, spec: VmSpec, new: bool, boots: bool) -> Result<Admitted<'_>, Error> {
        let capacity = self.config.capacity;
        if new && capacity.min_free_mib > 0 {
            let free = crate::host::fs::free_bytes(&self.config.state_dir).await? / (1024 * 1024);
            if free < capacity.min_free_mib {
                let limit = capacity.min_free_mib;
                return Err(Error::CapacityExhausted(Exhausted {
                    resource: "free_disk_mib",
                    asked: 0,
                    used: free,
                    limit,
                }));
            }
        }
        let recorded = self.store.vm_list().await?;
        let mut reservations = self.reservations.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let (mut vms, mut vcpus, mut memory) = (0u64, 0u64, 0u64);
        for other in recorded.iter().filter(|other| other.id != vm && !reservations.held.contains_key(&other.id)) {
            vms += 1;
            if takes_room(other.desired_state, other.observed_state) {
                vcpus += u64::from(other.spec.vcpus);
                memory += u64::from(other.spec.memory_mib);
            }
        }
        for (id, (held, running)) in &reservations.held {
            if *id != vm {
                vms += 1;
                if *running {
                    vcpus += u64::from(held.vcpus);
                    memory += u64::from(held.memory_mib);
                }
            }
        }
        let mut checks = Vec::new();
        if new {
            checks.push(("vms", 1, vms, capacity.max_vms));
        }
        if boots {
            checks.push(("vcpus", u64::from(spec.vcpus), vcpus, capacity.max_vcpus));
            checks.push(("memory_mib", u64::from(spec.memory_mib), memory, capacity.max_memory_mib));
        }
        for (resource, asked, used, limit) in checks {
            if let Some(limit) = limit
                && used + asked > limit
            {
                return Err(Error::CapacityExhausted(Exhausted { resource, asked, used, limit }));
            }
        }
        reservations.held.insert(vm, (spec, boots));
        Ok(Admitted { ops: self, vm })
    }
}
