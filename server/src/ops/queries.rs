//! Reads of VMs, each reconciled with the host first so a VM whose VMM died reads as stopped.

use super::{Error, Ops};
use crate::domain::Vm;

impl Ops {
    /// One VM by id or name.
    pub async fn get_vm(&self, key: &str) -> Result<Vm, Error> {
        let vm = self.store.vm_get(key).await?;
        self.refresh(vm).await
    }

    /// Every VM, oldest first.
    pub async fn list_vms(&self) -> Result<Vec<Vm>, Error> {
        let mut vms = Vec::new();
        for vm in self.store.vm_list().await? {
            vms.push(self.refresh(vm).await?);
        }
        Ok(vms)
    }
}
