//! Reconciling records with the host: at startup (adopt live VMMs, clean up after dead
//! ones, roll back interrupted boots) and lazily whenever a VM is read.

use super::{Error, Ops};
use crate::{
    domain::{Transition, Vm, VmState},
    store::VmUpdate,
};

impl Ops {
    /// Startup reconcile: every VM that may have a VMM is adopted if it runs, else its
    /// runtime is released and its state corrected. Idempotent.
    pub async fn recover(&self) -> Result<(), Error> {
        for vm in self.store.vm_list().await? {
            let lock = self.vm_lock(vm.id);
            let _guard = lock.lock().await;
            self.reconcile(vm).await?;
        }
        Ok(())
    }

    /// Reconciles one VM if no operation holds it; returns the current record.
    pub(super) async fn refresh(&self, vm: Vm) -> Result<Vm, Error> {
        let lock = self.vm_lock(vm.id);
        let Ok(_guard) = lock.try_lock() else { return Ok(vm) };
        let vm = self.store.vm_get(&vm.id.to_string()).await?;
        self.reconcile(vm).await
    }

    /// Like [`Ops::refresh`], for a caller that already holds the VM's lock.
    pub(super) async fn refresh_locked(&self, vm: Vm) -> Result<Vm, Error> {
        self.reconcile(vm).await
    }

    async fn reconcile(&self, vm: Vm) -> Result<Vm, Error> {
        let state = vm.observed_state;
        if !state.may_have_vmm() {
            return Ok(vm);
        }
        let alive = self.vm_alive(&vm);
        let (next, reason) = match (state, alive) {
            (VmState::Running, true) => {
                // Adopt: seed the cache from the scratch file.
                let handles = self.handles(&vm);
                self.set_handles(&vm, handles)?;
                return Ok(vm);
            }
            (VmState::Running, false) => {
                (VmState::Stopped, format!("vmm exited on its own; inspect {}", vm.paths().console_log.display()))
            }
            // A boot or stop that no operation drives any more was interrupted by a daemon crash.
            (VmState::Starting, _) => (
                state.apply(Transition::Died).unwrap_or(VmState::Error),
                "start interrupted by a daemon restart".to_owned(),
            ),
            (_, _) => (VmState::Stopped, String::new()),
        };
        self.release_runtime(&vm).await?;
        tracing::info!(vm_id = %vm.id, vm_name = %vm.name, from = state.as_str(), to = next.as_str(), reason, "vm reconciled");
        let update = VmUpdate { observed_state: Some(next), last_error: Some(reason), ..Default::default() };
        Ok(self.store.vm_update(&vm, update).await?)
    }
}
