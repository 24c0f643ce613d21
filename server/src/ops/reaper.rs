//! The reaper: deletes VMs whose time to live is over. Expiry is durable (`expire_at_ms` in
//! the record), so a VM whose time ran out while the daemon was down goes at its next start.

use super::{Error, Ops};

impl Ops {
    /// Keeps the logs of every VM with a runtime (console, VMM, vsock backend) under the
    /// configured size: a guest writing without end to its console never fills the host's
    /// disk. Returns the bytes dropped.
    pub async fn cap_logs(&self) -> Result<u64, Error> {
        let max = self.config.max_log_bytes;
        let live: Vec<_> =
            self.handles.read().unwrap_or_else(std::sync::PoisonError::into_inner).keys().copied().collect();
        let mut logs = Vec::new();
        for id in live {
            if let Ok(vm) = self.store.vm_get(&id.to_string()).await {
                let paths = vm.paths();
                logs.extend([paths.console_log, paths.vmm_log, paths.vsock_backend_log]);
            }
        }
        Ok(crate::host::logs::cap_all(logs, max).await?)
    }

    /// Deletes every VM whose expiry is past; returns how many went. One that fails to go
    /// is logged and tried again on the next call.
    pub async fn reap_expired(&self) -> Result<usize, Error> {
        let mut reaped = 0;
        for vm in self.store.vm_expired(self.clock().now_ms()).await? {
            // Touched or deleted since it was read: not this call's to reap.
            match self.store.vm_get(&vm.id.to_string()).await {
                Ok(current) if current.expire_at_ms.is_some_and(|at| at <= self.clock().now_ms()) => {}
                _ => continue,
            }
            tracing::info!(vm_id = %vm.id, vm_name = %vm.name, expire_at_ms = vm.expire_at_ms, "time to live over: deleting");
            match self.delete_vm(&vm.id.to_string()).await {
                Ok(_) => reaped += 1,
                Err(Error::NotFound { .. }) => {}
                Err(error) => tracing::warn!(vm_id = %vm.id, error = %error, "cannot delete an expired vm; retrying"),
            }
        }
        Ok(reaped)
    }
}
