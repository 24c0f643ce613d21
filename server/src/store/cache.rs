//! Committed VM records kept in memory for reads by id or name (`GetVm`, and every
//! operation that looks its VM up): the database stays the only source of truth, this only
//! spares a read the trip to SQLite's connection thread.
//!
//! Correctness rests on two rules. Every write to the `vms` table invalidates the record it
//! touched once its transaction is over ([`VmCache::invalidate_on_drop`]), whatever the way
//! out. And a record read from the database is only cached if no invalidation happened since
//! the read began (a generation count), so a read that raced a write never caches what the
//! write replaced.

use std::{
    collections::HashMap,
    sync::{Arc, PoisonError, RwLock},
};

use crate::domain::{Vm, VmId};

#[derive(Debug, Default)]
struct Entries {
    by_id: HashMap<VmId, Arc<Vm>>,
    by_name: HashMap<String, VmId>,
    /// Bumped by every invalidation.
    generation: u64,
}

/// The cache; cheap to clone (shared).
#[derive(Debug, Clone, Default)]
pub struct VmCache(Arc<RwLock<Entries>>);

/// Where a read may start: the generation it saw.
#[derive(Debug, Clone, Copy)]
pub struct ReadTicket(u64);

/// Invalidates one record when dropped.
#[derive(Debug)]
pub struct Invalidation {
    cache: VmCache,
    id: VmId,
}

impl Drop for Invalidation {
    fn drop(&mut self) {
        self.cache.invalidate(self.id);
    }
}

impl VmCache {
    fn entries(&self) -> std::sync::RwLockWriteGuard<'_, Entries> {
        self.0.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Readers share the lock, and copy the record only once they let go of it.
    fn reading(&self) -> std::sync::RwLockReadGuard<'_, Entries> {
        self.0.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// The record keyed by `key`, an id or a name, if cached; else a ticket to cache what
    /// the database returns. A key that could be an id is only ever looked up as one (a
    /// name is only found by name when it cannot be some other VM's id).
    pub fn get(&self, key: &str) -> Result<Vm, ReadTicket> {
        let found = {
            let entries = self.reading();
            let found = match key.parse::<VmId>() {
                // As the database compares it: the id's own spelling only.
                Ok(id) if id.to_string() == key => entries.by_id.get(&id),
                Ok(_) => None,
                Err(_) => entries.by_name.get(key).and_then(|id| entries.by_id.get(id)),
            };
            found.cloned().ok_or(ReadTicket(entries.generation))
        };
        found.map(|vm| Vm::clone(&vm))
    }

    /// Caches `vm`, read from the database after `ticket` was taken, unless a write may
    /// have changed it since.
    pub fn put(&self, ticket: ReadTicket, vm: &Vm) {
        let mut entries = self.entries();
        if entries.generation == ticket.0 {
            entries.by_name.insert(vm.name.clone(), vm.id);
            entries.by_id.insert(vm.id, Arc::new(vm.clone()));
        }
    }

    /// Forgets the record with this id.
    pub fn invalidate(&self, id: VmId) {
        let mut entries = self.entries();
        entries.generation += 1;
        if let Some(vm) = entries.by_id.remove(&id) {
            entries.by_name.remove(&vm.name);
        }
    }

    /// Forgets the record with this id when the returned value drops: hold it across a
    /// write, declared before its transaction, so it runs after the commit on every path.
    pub fn invalidate_on_drop(&self, id: VmId) -> Invalidation {
        Invalidation { cache: self.clone(), id }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{ImageId, RootDiskStrategy, VmSpec, VmState};

    fn vm(name: &str) -> Vm {
        Vm {
            id: VmId::generate(),
            name: name.into(),
            image_id: ImageId::generate(),
            spec: VmSpec { vcpus: 1, memory_mib: 128 },
            desired_state: VmState::Created,
            observed_state: VmState::Created,
            vsock_cid: 3,
            root_disk: RootDiskStrategy::Qcow2,
            ip: None,
            vm_dir: "/vm".into(),
            last_error: String::new(),
            last_error_reason: None,
            last_operation: String::new(),
            created_at_ms: 0,
            updated_at_ms: 0,
            generation: 0,
            labels: Default::default(),
            expire_at_ms: None,
        }
    }

    #[test]
    fn a_read_that_raced_a_write_is_not_cached() {
        let cache = VmCache::default();
        let web = vm("web");
        let ticket = cache.get("web").expect_err("empty");
        cache.invalidate(web.id); // a write commits while the read is under way
        cache.put(ticket, &web);
        assert!(cache.get("web").is_err(), "what the read saw may be older than the write");
        let ticket = cache.get("web").expect_err("still empty");
        cache.put(ticket, &web);
        assert_eq!(cache.get("web").expect("by name"), web);
        assert_eq!(cache.get(&web.id.to_string()).expect("by id"), web);
        assert!(cache.get(&web.id.to_string().to_lowercase()).is_err(), "ids are matched as spelled");
        drop(cache.invalidate_on_drop(web.id));
        assert!(cache.get("web").is_err() && cache.get(&web.id.to_string()).is_err());
    }
}
