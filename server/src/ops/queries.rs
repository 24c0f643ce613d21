//! Reads of VMs, each reconciled with the host first so a VM whose VMM died reads as stopped.

use super::{Error, Ops};
use crate::{
    domain::{Vm, VmState},
    store::VmFilter,
};

impl Ops {
    /// One VM by id or name.
    pub async fn get_vm(&self, key: &str) -> Result<Vm, Error> {
        let vm = self.store.vm_get(key).await?;
        self.refresh(vm).await
    }

    /// The address of the VM named exactly `name`: `None` when there is no such VM,
    /// `Some(None)` when it has none. Cheap (the record cache): for DNS.
    pub async fn vm_address(&self, name: &str) -> Result<Option<Option<std::net::Ipv4Addr>>, Error> {
        match self.store.vm_get(name).await {
            Ok(vm) if vm.name == name => Ok(Some(vm.ip)),
            Ok(_) | Err(crate::store::StoreError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// How many VMs are in each observed state (for the `banger.vms` gauge).
    pub async fn count_vms_by_state(&self) -> Result<Vec<(&'static str, u64)>, Error> {
        let mut by_state: Vec<(&'static str, u64)> = Vec::new();
        for vm in self.store.vm_list().await? {
            let state = vm.observed_state.as_str();
            match by_state.iter_mut().find(|(s, _)| *s == state) {
                Some((_, count)) => *count += 1,
                None => by_state.push((state, 1)),
            }
        }
        Ok(by_state)
    }

    /// An image by id or name.
    pub async fn get_image(&self, key: &str) -> Result<crate::domain::Image, Error> {
        self.find_image(key).await
    }

    /// An image by id, by name, or by the registry reference it was pulled from
    /// (`debian:bookworm` finds `docker.io/library/debian:bookworm`).
    pub async fn find_image(&self, key: &str) -> Result<crate::domain::Image, Error> {
        let not_found = match self.store.image_get(key).await {
            Ok(image) => return Ok(image),
            Err(crate::store::StoreError::NotFound { kind, key }) => Error::NotFound { kind, key },
            Err(other) => return Err(other.into()),
        };
        // An image pulled from this reference; else one installed beside the default image
        // (`busybox`), imported on first use.
        if let Some(reference) = crate::host::oci::registry::normalize(key) {
            let images = self.store.image_list().await?;
            if let Some(image) =
                images.into_iter().find(|image| image.origin.as_ref().is_some_and(|origin| origin.source == reference))
            {
                return Ok(image);
            }
        }
        self.installed_image(key).await?.ok_or(not_found)
    }

    /// A page of images carrying every label of `labels`, after the id `after`; and the
    /// id to continue after, when there are more.
    pub async fn list_images_page(
        &self,
        labels: &crate::domain::Labels,
        after: Option<&str>,
        page_size: u32,
    ) -> Result<(Vec<crate::domain::Image>, Option<String>), Error> {
        let mut images = self.store.image_page(labels, after, page_size + 1).await?;
        let more = images.len() > page_size as usize;
        images.truncate(page_size as usize);
        let last = images.last().filter(|_| more).map(|image| image.id.to_string());
        Ok((images, last))
    }

    /// The latest event revision (see `ListVmsResponse.revision`), as last announced after
    /// a commit: never ahead of what a watch can replay, at most a commit behind (a watch
    /// from it then replays one event the list already shows; none is ever missed).
    pub fn latest_revision(&self) -> u64 {
        self.store.announced_revision()
    }

    /// Every VM, oldest first.
    pub async fn list_vms(&self) -> Result<Vec<Vm>, Error> {
        let mut vms = Vec::new();
        for vm in self.store.vm_list().await? {
            vms.push(self.refresh(vm).await?);
        }
        Ok(vms)
    }

    /// One page of the VMs matching `filter`, after the VM id `after`, oldest first; and
    /// the id to continue after when more may follow. Each VM is reconciled first, so one
    /// whose reconciled state no longer matches the filter is left out (a page may be short).
    pub async fn list_vms_page(
        &self,
        filter: &VmFilter,
        after: Option<&str>,
        page_size: u32,
    ) -> Result<(Vec<Vm>, Option<String>), Error> {
        let records = self.store.vm_page(filter, after, page_size + 1).await?;
        let more = records.len() > page_size as usize;
        let mut vms = Vec::with_capacity(records.len().min(page_size as usize));
        let mut last = None;
        for vm in records.into_iter().take(page_size as usize) {
            last = Some(vm.id.to_string());
            let vm = self.refresh(vm).await?;
            // Reconciled just now: its state may have moved on.
            if filter.states.is_empty() || filter.states.contains(&vm.observed_state) {
                vms.push(vm);
            }
        }
        Ok((vms, last.filter(|_| more)))
    }

    /// Waits until the VM is in `state`, checking every `every`; returns it then. The caller's
    /// deadline bounds the wait (the future is dropped); a VM deleted meanwhile is not found.
    pub async fn wait_vm(&self, key: &str, state: VmState, every: std::time::Duration) -> Result<Vm, Error> {
        let id = self.store.vm_get(key).await?.id.to_string();
        loop {
            let vm = self.get_vm(&id).await?;
            if vm.observed_state == state {
                return Ok(vm);
            }
            tokio::time::sleep(every).await;
        }
    }

    /// Sets a VM's time to live anew from now, or removes its expiry.
    pub async fn touch_vm(&self, key: &str, ttl_ms: Option<i64>) -> Result<Vm, Error> {
        let vm = self.store.vm_get(key).await?;
        let vm = self.store.vm_set_expiry(vm.id, ttl_ms.map(|ttl| self.clock().now_ms() + ttl)).await?;
        self.refresh(vm).await
    }
}
