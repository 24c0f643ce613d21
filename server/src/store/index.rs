//! Every committed VM record, in memory and in id order, so that no read of a record (by id,
//! by name, a page, the expired ones) waits for SQLite, whose connections each live on their
//! own thread: a read there crossed threads twice, and a page decoded a hundred rows.
//!
//! SQLite stays the durable truth. The index is loaded from it when the store opens, and
//! follows every write in commit order: a write takes the index's writer lock before its
//! transaction and applies what it committed before letting go ([`Writing`]). So the index
//! never shows a record that was not committed, nor an older one after a newer one. Nothing
//! but this daemon writes the `vms` table (one daemon per state dir).

use std::{
    collections::{BTreeMap, HashMap},
    ops::Bound,
    sync::{Arc, PoisonError, RwLock, RwLockReadGuard},
};

use super::VmFilter;
use crate::domain::{Vm, VmId};

#[derive(Debug, Default)]
struct Records {
    by_id: BTreeMap<VmId, Arc<Vm>>,
    by_name: HashMap<String, VmId>,
}

/// The index; clones share it.
#[derive(Debug, Clone, Default)]
pub struct VmIndex {
    records: Arc<RwLock<Records>>,
    writer: Arc<tokio::sync::Mutex<()>>,
}

/// The right to change the index, held from before a transaction until what it committed is
/// applied.
#[derive(Debug)]
pub struct Writing<'a> {
    index: &'a VmIndex,
    _turn: tokio::sync::MutexGuard<'a, ()>,
}

impl Writing<'_> {
    /// Records `vm` as committed (a new one, or a newer version).
    pub fn put(&self, vm: Vm) {
        let mut records = self.index.records.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(old) = records.by_id.get(&vm.id).cloned() {
            records.by_name.remove(&old.name);
        }
        records.by_name.insert(vm.name.clone(), vm.id);
        records.by_id.insert(vm.id, Arc::new(vm));
    }

    /// Forgets a deleted VM.
    pub fn remove(&self, id: VmId) {
        let mut records = self.index.records.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(old) = records.by_id.remove(&id) {
            records.by_name.remove(&old.name);
        }
    }
}

impl VmIndex {
    /// An index of `vms`, as read from the database.
    pub fn load(vms: impl IntoIterator<Item = Vm>) -> Self {
        let mut records = Records::default();
        for vm in vms {
            records.by_name.insert(vm.name.clone(), vm.id);
            records.by_id.insert(vm.id, Arc::new(vm));
        }
        Self { records: Arc::new(RwLock::new(records)), writer: Arc::default() }
    }

    fn read(&self) -> RwLockReadGuard<'_, Records> {
        self.records.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits for the turn to write (see [`Writing`]).
    pub async fn writing(&self) -> Writing<'_> {
        Writing { index: self, _turn: self.writer.lock().await }
    }

    /// The VM with this id, spelled as the database spells it, else the one of this name.
    pub fn get(&self, key: &str) -> Option<Vm> {
        let found = {
            let records = self.read();
            let by_id =
                key.parse::<VmId>().ok().filter(|id| id.to_string() == key).and_then(|id| records.by_id.get(&id));
            by_id.or_else(|| records.by_name.get(key).and_then(|id| records.by_id.get(id))).cloned()
        };
        // Copied once the lock is let go of.
        found.map(|vm| Vm::clone(&vm))
    }

    /// Up to `limit` VMs matching `filter` with ids after `after`, in id order.
    pub fn page(&self, filter: &VmFilter, after: Option<&str>, limit: usize) -> Vec<Vm> {
        let matching = |vm: &&Arc<Vm>| {
            (filter.states.is_empty() || filter.states.contains(&vm.observed_state))
                && crate::domain::labels_match(&vm.labels, &filter.labels)
        };
        let found: Vec<Arc<Vm>> = {
            let records = self.read();
            match after.map(|after| (after, after.parse::<VmId>())) {
                None => records.by_id.values().filter(matching).take(limit).cloned().collect(),
                Some((_, Ok(id))) => records
                    .by_id
                    .range((Bound::Excluded(id), Bound::Unbounded))
                    .map(|(_, vm)| vm)
                    .filter(matching)
                    .take(limit)
                    .cloned()
                    .collect(),
                // Not an id: compared as text, as SQLite would.
                Some((after, Err(_))) => records
                    .by_id
                    .values()
                    .filter(|vm| vm.id.to_string().as_str() > after)
                    .filter(matching)
                    .take(limit)
                    .cloned()
                    .collect(),
            }
        };
        found.iter().map(|vm| Vm::clone(vm)).collect()
    }

    /// Every VM, in id order (oldest first).
    pub fn all(&self) -> Vec<Vm> {
        let found: Vec<Arc<Vm>> = self.read().by_id.values().cloned().collect();
        found.iter().map(|vm| Vm::clone(vm)).collect()
    }

    /// The VMs whose expiry is at or before `now_ms`, soonest first.
    pub fn expired(&self, now_ms: i64) -> Vec<Vm> {
        let mut found: Vec<Arc<Vm>> =
            self.read().by_id.values().filter(|vm| vm.expire_at_ms.is_some_and(|at| at <= now_ms)).cloned().collect();
        found.sort_by_key(|vm| vm.expire_at_ms);
        found.iter().map(|vm| Vm::clone(vm)).collect()
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
            spec: VmSpec { vcpus: 1, memory_mib: 128, disk_bytes: 0 },
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
            egress: Default::default(),
            snapshot_id: None,
        }
    }

    #[tokio::test]
    async fn records_are_found_by_id_as_spelled_or_by_name_and_follow_writes() {
        let web = vm("web");
        let index = VmIndex::load([web.clone()]);
        assert_eq!(index.get("web"), Some(web.clone()));
        assert_eq!(index.get(&web.id.to_string()), Some(web.clone()));
        assert_eq!(index.get(&web.id.to_string().to_lowercase()), None, "ids are matched as spelled");
        let renamed = Vm { name: "api".into(), generation: 1, ..web.clone() };
        index.writing().await.put(renamed.clone());
        assert_eq!((index.get("web"), index.get("api")), (None, Some(renamed)));
        index.writing().await.remove(web.id);
        assert_eq!((index.get("api"), index.all()), (None, vec![]));
    }

    #[tokio::test]
    async fn pages_follow_id_order_after_a_key_with_filters() {
        let vms: Vec<Vm> = (0..5)
            .map(|i| {
                let mut vm = vm(&format!("vm-{i}"));
                vm.observed_state = if i % 2 == 0 { VmState::Running } else { VmState::Stopped };
                vm.labels = [("team".to_owned(), if i < 3 { "a" } else { "b" }.to_owned())].into();
                vm.expire_at_ms = Some(100 - i);
                vm
            })
            .collect();
        let index = VmIndex::load(vms.clone());
        let names = |page: Vec<Vm>| page.into_iter().map(|vm| vm.name).collect::<Vec<_>>();
        assert_eq!(names(index.page(&VmFilter::default(), None, 2)), ["vm-0", "vm-1"]);
        let after = vms[1].id.to_string();
        assert_eq!(names(index.page(&VmFilter::default(), Some(&after), 10)), ["vm-2", "vm-3", "vm-4"]);
        let running = VmFilter { states: vec![VmState::Running], ..Default::default() };
        assert_eq!(names(index.page(&running, None, 10)), ["vm-0", "vm-2", "vm-4"]);
        let team_b = VmFilter { labels: [("team".to_owned(), "b".to_owned())].into(), ..Default::default() };
        assert_eq!(names(index.page(&team_b, None, 10)), ["vm-3", "vm-4"]);
        assert_eq!(names(index.expired(97)), ["vm-4", "vm-3"], "soonest first");
    }
}
