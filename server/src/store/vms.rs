//! VM records: identity, spec, desired and observed state, deterministic runtime facts.

use std::path::{Path, PathBuf};

use sqlx::Row;

use super::{Store, StoreError, is_unique_violation};
use crate::domain::{IpPool, Labels, Resource, RootDiskStrategy, Vm, VmFault, VmId, VmSpec, VmState};

const COLUMNS: &str = "id, name, image_id, vcpus, memory_mib, disk_size_bytes, desired_state, observed_state, \
    vsock_cid, root_disk, ip, vm_dir, last_error, last_error_reason, last_operation, created_at_ms, updated_at_ms, \
    generation, \
    labels, expire_at_ms, egress, snapshot_id";

/// Why a VM's last operation failed: a code and words.
#[derive(Debug, Clone, Default)]
pub struct LastError {
    /// The code; `None` with an empty message.
    pub reason: Option<VmFault>,
    /// The words.
    pub message: String,
}

impl LastError {
    /// No error.
    pub fn none() -> Self {
        Self::default()
    }

    /// An error of `reason`, said in `message`.
    pub fn new(reason: VmFault, message: impl Into<String>) -> Self {
        Self { reason: Some(reason), message: message.into() }
    }
}

/// The mutable part of a VM record, applied with compare-and-set by [`Store::vm_update`].
#[derive(Debug, Clone, Default)]
pub struct VmUpdate {
    /// New desired state.
    pub desired_state: Option<VmState>,
    /// New observed state.
    pub observed_state: Option<VmState>,
    /// New last error ([`LastError::none`] clears it).
    pub last_error: Option<LastError>,
    /// New last operation id.
    pub last_operation: Option<String>,
    /// The snapshot the VM's disk now overlays (never cleared: the disk keeps overlaying it).
    pub snapshot_id: Option<crate::domain::SnapshotId>,
}

fn vm_from_row(row: &sqlx::sqlite::SqliteRow) -> Result<Vm, StoreError> {
    let id: String = row.try_get("id")?;
    let corrupt = |what: &str| StoreError::Corrupt { kind: "vm", id: id.clone(), what: what.into() };
    let state = |column: &str| -> Result<VmState, StoreError> {
        let value: String = row.try_get(column)?;
        VmState::parse(&value).ok_or_else(|| corrupt(column))
    };
    Ok(Vm {
        id: id.parse().map_err(|_| corrupt("id"))?,
        name: row.try_get("name")?,
        image_id: row.try_get::<String, _>("image_id")?.parse().map_err(|_| corrupt("image_id"))?,
        spec: super::spec_from_row(row)?,
        desired_state: state("desired_state")?,
        observed_state: state("observed_state")?,
        vsock_cid: row.try_get::<i64, _>("vsock_cid")? as u32,
        ip: match row.try_get::<Option<String>, _>("ip")? {
            Some(ip) => Some(ip.parse().map_err(|_| corrupt("ip"))?),
            None => None,
        },
        root_disk: RootDiskStrategy::parse(&row.try_get::<String, _>("root_disk")?)
            .ok_or_else(|| corrupt("root_disk"))?,
        vm_dir: PathBuf::from(row.try_get::<String, _>("vm_dir")?),
        last_error: row.try_get("last_error")?,
        last_error_reason: match row.try_get::<String, _>("last_error_reason")?.as_str() {
            "" => None,
            stored => Some(VmFault::parse(stored).ok_or_else(|| corrupt("last_error_reason"))?),
        },
        last_operation: row.try_get("last_operation")?,
        created_at_ms: row.try_get("created_at_ms")?,
        updated_at_ms: row.try_get("updated_at_ms")?,
        generation: row.try_get("generation")?,
        labels: serde_json::from_str(&row.try_get::<String, _>("labels")?).map_err(|_| corrupt("labels"))?,
        expire_at_ms: row.try_get("expire_at_ms")?,
        egress: serde_json::from_str(&row.try_get::<String, _>("egress")?).map_err(|_| corrupt("egress"))?,
        snapshot_id: match row.try_get::<Option<String>, _>("snapshot_id")? {
            Some(id) => Some(id.parse().map_err(|_| corrupt("snapshot_id"))?),
            None => None,
        },
    })
}

/// Every VM record in the database (to load the index when the store opens).
pub(super) async fn load_all(pool: &sqlx::SqlitePool) -> Result<Vec<Vm>, StoreError> {
    let sql = format!("SELECT {COLUMNS} FROM vms ORDER BY id");
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql)).fetch_all(pool).await?;
    rows.iter().map(vm_from_row).collect()
}

/// A VM's row as the transaction `tx` sees it (what it will commit).
async fn read_in(tx: &mut sqlx::SqliteConnection, id: VmId) -> Result<Vm, StoreError> {
    let sql = format!("SELECT {COLUMNS} FROM vms WHERE id = ?");
    let row = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(id.to_string()).fetch_one(tx).await?;
    vm_from_row(&row)
}

/// Which VMs a page lists.
#[derive(Debug, Clone, Default)]
pub struct VmFilter {
    /// Only VMs carrying every one of these labels.
    pub labels: Labels,
    /// Only VMs whose recorded state is one of these; empty: any.
    pub states: Vec<VmState>,
}

/// The JSON path of a label key (keys never hold a double quote: see `labels_error`).
pub(super) fn label_path(key: &str) -> String {
    format!("$.\"{}\"", key.replace('"', ""))
}

/// What a claim of a pool member changes.
#[derive(Debug, Clone, Copy)]
pub struct VmClaim<'a> {
    /// The caller's name for it.
    pub name: &'a str,
    /// The caller's labels (the pool's label goes).
    pub labels: &'a Labels,
    /// When the reaper deletes it, if ever.
    pub expire_at_ms: Option<i64>,
    /// The claiming operation's id.
    pub last_operation: &'a str,
}

/// What a new VM record needs; the store assigns the vsock CID and timestamps.
#[derive(Debug, Clone)]
pub struct NewVmRecord<'a> {
    /// The new id.
    pub id: VmId,
    /// The unique name.
    pub name: &'a str,
    /// The image.
    pub image_id: crate::domain::ImageId,
    /// The shape.
    pub spec: VmSpec,
    /// Desired state at creation.
    pub desired_state: VmState,
    /// Observed state at creation (`created`, or `starting` when it boots at once).
    pub observed_state: VmState,
    /// How its root disk is made.
    pub root_disk: RootDiskStrategy,
    /// The pool to allocate its address from, when VMs get a network.
    pub ip_pool: Option<IpPool>,
    /// The VM's directory.
    pub vm_dir: &'a Path,
    /// The creating operation.
    pub last_operation: &'a str,
    /// Its labels.
    pub labels: &'a Labels,
    /// When the reaper deletes it, if ever.
    pub expire_at_ms: Option<i64>,
    /// Where its traffic may go beyond its bridge.
    pub egress: &'a crate::domain::Egress,
    /// The snapshot it is restored from.
    pub snapshot_id: Option<crate::domain::SnapshotId>,
}

impl Store {
    /// Records a new VM, allocating the lowest unused-above-max vsock CID
    /// (3 and up) in the same statement so concurrent creates never share one.
    pub async fn vm_insert(&self, new: NewVmRecord<'_>) -> Result<Vm, StoreError> {
        // Writes are this daemon's, one at a time: the lowest free address read here is
        // still free when the insert claims it (the unique index would refuse it otherwise).
        let writing = self.vms.writing().await;
        for _ in 0..8 {
            let ip = match new.ip_pool {
                None => None,
                Some(pool) => {
                    let used: Vec<String> =
                        sqlx::query_scalar("SELECT ip FROM vms WHERE ip IS NOT NULL").fetch_all(&self.pool).await?;
                    let used = used.iter().filter_map(|ip| ip.parse().ok()).collect();
                    Some(pool.first_free(&used).ok_or(StoreError::PoolExhausted { pool: pool.to_string() })?)
                }
            };
            let now = self.clock.now_ms();
            let mut tx = self.write_transaction().await?;
            let result = sqlx::query(
                "INSERT INTO vms (id, name, image_id, vcpus, memory_mib, desired_state, observed_state, \
                 vsock_cid, vm_dir, last_operation, created_at_ms, updated_at_ms, root_disk, ip, labels, expire_at_ms, \
                 disk_size_bytes, egress, snapshot_id) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?10, \
                 (SELECT COALESCE(MAX(vsock_cid), 2) + 1 FROM vms), ?7, ?8, ?9, ?9, ?11, ?12, ?13, ?14, ?15, ?16, ?17)",
            )
            .bind(new.id.to_string())
            .bind(new.name)
            .bind(new.image_id.to_string())
            .bind(i64::from(new.spec.vcpus))
            .bind(i64::from(new.spec.memory_mib))
            .bind(new.desired_state.as_str())
            .bind(new.vm_dir.to_string_lossy().into_owned())
            .bind(new.last_operation)
            .bind(now)
            .bind(new.observed_state.as_str())
            .bind(new.root_disk.as_str())
            .bind(ip.map(|ip| ip.to_string()))
            .bind(serde_json::to_string(new.labels).unwrap_or_else(|_| "{}".into()))
            .bind(new.expire_at_ms)
            .bind(new.spec.disk_bytes as i64)
            .bind(serde_json::to_string(new.egress).unwrap_or_else(|_| r#"{"mode":"internet"}"#.into()))
            .bind(new.snapshot_id.map(|id| id.to_string()))
            .execute(&mut *tx)
            .await;
            match result {
                Ok(_) => {
                    let sql = format!("SELECT {COLUMNS} FROM vms WHERE id = ?");
                    let row =
                        sqlx::query(sqlx::AssertSqlSafe(sql)).bind(new.id.to_string()).fetch_one(&mut *tx).await?;
                    let vm = vm_from_row(&row)?;
                    let revision = super::events::record_state(&mut tx, &vm, vm.observed_state, None, now).await?;
                    tx.commit().await?;
                    writing.put(vm.clone());
                    self.announce(revision);
                    return Ok(vm);
                }
                // Which constraint: the name is asked, not read from SQLite's message. A name
                // that is free means a concurrent create took the address: the next one is tried.
                Err(e) if is_unique_violation(&e) => {
                    tx.rollback().await?;
                    let taken: Option<i64> = sqlx::query_scalar("SELECT 1 FROM vms WHERE name = ?")
                        .bind(new.name)
                        .fetch_optional(&self.pool)
                        .await?;
                    if taken.is_some() || new.ip_pool.is_none() {
                        return Err(StoreError::NameTaken { kind: Resource::Vm, name: new.name.to_owned() });
                    }
                    continue;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(StoreError::PoolExhausted { pool: new.ip_pool.map(|p| p.to_string()).unwrap_or_default() })
    }

    /// Finds a VM by id or, failing that, by name.
    pub async fn vm_get(&self, id_or_name: &str) -> Result<Vm, StoreError> {
        self.vms.get(id_or_name).ok_or_else(|| StoreError::NotFound { kind: Resource::Vm, key: id_or_name.to_owned() })
    }

    /// Every VM, oldest first.
    pub async fn vm_list(&self) -> Result<Vec<Vm>, StoreError> {
        Ok(self.vms.all())
    }

    /// Up to `limit` VMs matching `filter` with ids after `after` (keyset pagination: a VM
    /// created meanwhile has a greater id, so pages never repeat or skip one), oldest first.
    pub async fn vm_page(&self, filter: &VmFilter, after: Option<&str>, limit: u32) -> Result<Vec<Vm>, StoreError> {
        Ok(self.vms.page(filter, after, limit as usize))
    }

    /// VMs whose expiry is at or before `now_ms`, soonest first.
    pub async fn vm_expired(&self, now_ms: i64) -> Result<Vec<Vm>, StoreError> {
        Ok(self.vms.expired(now_ms))
    }

    /// Sets or clears a VM's expiry; returns the new record.
    pub async fn vm_set_expiry(&self, id: VmId, expire_at_ms: Option<i64>) -> Result<Vm, StoreError> {
        let writing = self.vms.writing().await;
        let mut tx = self.write_transaction().await?;
        let done = sqlx::query(
            "UPDATE vms SET expire_at_ms = ?2, updated_at_ms = ?3, generation = generation + 1 WHERE id = ?1",
        )
        .bind(id.to_string())
        .bind(expire_at_ms)
        .bind(self.clock.now_ms())
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound { kind: Resource::Vm, key: id.to_string() });
        }
        let vm = read_in(&mut tx, id).await?;
        tx.commit().await?;
        writing.put(vm.clone());
        Ok(vm)
    }

    /// Applies `update` to `vm` if its generation is still `vm.generation`; returns the new record.
    pub async fn vm_update(&self, vm: &Vm, update: VmUpdate) -> Result<Vm, StoreError> {
        let new_state = update.observed_state.filter(|state| *state != vm.observed_state);
        let writing = self.vms.writing().await;
        let mut tx = self.write_transaction().await?;
        let done = sqlx::query(
            "UPDATE vms SET \
               desired_state = COALESCE(?3, desired_state), \
               observed_state = COALESCE(?4, observed_state), \
               last_error = COALESCE(?5, last_error), \
               last_error_reason = COALESCE(?8, last_error_reason), \
               last_operation = COALESCE(?6, last_operation), \
               snapshot_id = COALESCE(?9, snapshot_id), \
               updated_at_ms = ?7, generation = generation + 1 \
             WHERE id = ?1 AND generation = ?2",
        )
        .bind(vm.id.to_string())
        .bind(vm.generation)
        .bind(update.desired_state.map(VmState::as_str))
        .bind(update.observed_state.map(VmState::as_str))
        .bind(update.last_error.as_ref().map(|e| e.message.clone()))
        .bind(update.last_operation)
        .bind(self.clock.now_ms())
        .bind(update.last_error.as_ref().map(|e| e.reason.map(VmFault::as_str).unwrap_or_default()))
        .bind(update.snapshot_id.map(|id| id.to_string()))
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            tx.rollback().await?;
            // Either gone or changed: tell which.
            self.vm_get(&vm.id.to_string()).await?;
            return Err(StoreError::Conflict { kind: Resource::Vm, id: vm.id.to_string(), expected: vm.generation });
        }
        let revision = match new_state {
            Some(state) => Some(
                super::events::record_state(&mut tx, vm, state, Some(vm.observed_state), self.clock.now_ms()).await?,
            ),
            None => None,
        };
        let updated = read_in(&mut tx, vm.id).await?;
        tx.commit().await?;
        writing.put(updated.clone());
        if let Some(revision) = revision {
            self.announce(revision);
        }
        Ok(updated)
    }

    /// Gives `vm` (a pool member, at generation `vm.generation`) to a caller: its new name,
    /// labels and expiry. A member taken by someone else meanwhile is a conflict; a name in
    /// use is `NameTaken`.
    pub async fn vm_claim(&self, vm: &Vm, claim: VmClaim<'_>) -> Result<Vm, StoreError> {
        let writing = self.vms.writing().await;
        let mut tx = self.write_transaction().await?;
        let done = sqlx::query(
            "UPDATE vms SET name = ?3, labels = ?4, expire_at_ms = ?5, last_operation = ?6, updated_at_ms = ?7, \
               generation = generation + 1 \
             WHERE id = ?1 AND generation = ?2",
        )
        .bind(vm.id.to_string())
        .bind(vm.generation)
        .bind(claim.name)
        .bind(serde_json::to_string(claim.labels).unwrap_or_else(|_| "{}".into()))
        .bind(claim.expire_at_ms)
        .bind(claim.last_operation)
        .bind(self.clock.now_ms())
        .execute(&mut *tx)
        .await;
        let done = match done {
            Ok(done) => done,
            Err(e) if is_unique_violation(&e) => {
                return Err(StoreError::NameTaken { kind: Resource::Vm, name: claim.name.to_owned() });
            }
            Err(e) => return Err(e.into()),
        };
        if done.rows_affected() == 0 {
            tx.rollback().await?;
            self.vm_get(&vm.id.to_string()).await?;
            return Err(StoreError::Conflict { kind: Resource::Vm, id: vm.id.to_string(), expected: vm.generation });
        }
        let updated = read_in(&mut tx, vm.id).await?;
        tx.commit().await?;
        writing.put(updated.clone());
        Ok(updated)
    }

    /// Removes a VM record.
    pub async fn vm_delete(&self, id: VmId) -> Result<(), StoreError> {
        let writing = self.vms.writing().await;
        let mut tx = self.write_transaction().await?;
        let sql = format!("SELECT {COLUMNS} FROM vms WHERE id = ?");
        let Some(row) = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(id.to_string()).fetch_optional(&mut *tx).await?
        else {
            return Err(StoreError::NotFound { kind: Resource::Vm, key: id.to_string() });
        };
        let vm = vm_from_row(&row)?;
        sqlx::query("DELETE FROM vms WHERE id = ?").bind(id.to_string()).execute(&mut *tx).await?;
        let revision = super::events::record_deleted(&mut tx, &vm, self.clock.now_ms()).await?;
        tx.commit().await?;
        writing.remove(id);
        self.announce(revision);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        domain::{Image, ImageId},
        store::{EventKind, test_store},
    };

    async fn with_image(store: &Store) -> ImageId {
        let image = Image {
            id: ImageId::generate(),
            name: "img".into(),
            kernel_path: "/k".into(),
            initrd_path: None,
            rootfs_path: "/r".into(),
            kernel_args: String::new(),
            rootfs_size_bytes: 1,
            created_at_ms: 0,
            labels: Default::default(),
            origin: None,
        };
        store.image_insert(&image).await.expect("insert image");
        image.id
    }

    static EMPTY: Labels = Labels::new();

    fn record<'a>(name: &'a str, image_id: ImageId, dir: &'a Path) -> NewVmRecord<'a> {
        NewVmRecord {
            id: VmId::generate(),
            name,
            image_id,
            spec: VmSpec { vcpus: 1, memory_mib: 256, disk_bytes: 0 },
            desired_state: VmState::Running,
            observed_state: VmState::Created,
            root_disk: RootDiskStrategy::Qcow2,
            ip_pool: None,
            vm_dir: dir,
            last_operation: "op",
            labels: &EMPTY,
            expire_at_ms: None,
            egress: &crate::domain::Egress::Internet,
            snapshot_id: None,
        }
    }

    /// Reads by id or name come from memory once read; every write is seen by the next read.
    #[tokio::test]
    async fn the_index_follows_every_write() {
        let (store, _dir) = test_store().await;
        let image = with_image(&store).await;
        let vm = store.vm_insert(record("c", image, Path::new("/c"))).await.expect("insert");
        let (by_name, by_id) = (store.vm_get("c").await.expect("name"), store.vm_get(&vm.id.to_string()).await);
        assert_eq!(by_id.expect("id"), by_name);
        let update = VmUpdate { observed_state: Some(VmState::Running), ..Default::default() };
        let updated = store.vm_update(&by_name, update).await.expect("update");
        assert_eq!(updated.observed_state, VmState::Running, "the write's own result is fresh");
        assert_eq!(store.vm_get("c").await.expect("name").generation, updated.generation);
        let expiring = store.vm_set_expiry(vm.id, Some(42)).await.expect("expiry");
        assert_eq!(expiring.expire_at_ms, Some(42));
        assert_eq!(store.vm_get(&vm.id.to_string()).await.expect("id").expire_at_ms, Some(42));
        store.vm_delete(vm.id).await.expect("delete");
        assert!(matches!(store.vm_get("c").await, Err(StoreError::NotFound { .. })));
        assert!(matches!(store.vm_get(&vm.id.to_string()).await, Err(StoreError::NotFound { .. })));
        // The name is free again, for a VM with another id.
        let again = store.vm_insert(record("c", image, Path::new("/c"))).await.expect("again");
        assert_eq!(store.vm_get("c").await.expect("name").id, again.id);
    }

    /// Concurrent writes leave the index as the database is, and a store opened again finds
    /// the same records.
    #[tokio::test]
    async fn the_index_agrees_with_the_database_after_concurrent_writes_and_a_reopen() {
        let (store, dir) = test_store().await;
        let image = with_image(&store).await;
        let mut tasks = Vec::new();
        for i in 0..12 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let vm = store.vm_insert(record(&format!("w-{i}"), image, Path::new("/w"))).await.expect("insert");
                let running = VmUpdate { observed_state: Some(VmState::Running), ..Default::default() };
                let vm = store.vm_update(&vm, running).await.expect("update");
                // A stale update loses; a second writer's turn comes after the first's commit.
                let stale = store.vm_update(&vm, VmUpdate::default()).await.map(|vm| vm.generation);
                let _ = store.vm_update(&vm, VmUpdate::default()).await;
                if i % 3 == 0 {
                    store.vm_delete(vm.id).await.expect("delete");
                }
                stale
            }));
        }
        for task in tasks {
            let _ = task.await.expect("task");
        }
        let from_database = load_all(&store.pool).await.expect("rows");
        assert_eq!(store.vm_list().await.expect("index"), from_database);
        assert_eq!(from_database.len(), 8);
        store.close().await;
        let reopened = Store::open(&dir.path().join("banger.db")).await.expect("reopen");
        assert_eq!(reopened.vm_list().await.expect("index"), from_database);
    }

    #[tokio::test]
    async fn insert_allocates_distinct_cids_and_refuses_duplicate_names() {
        let (store, _dir) = test_store().await;
        let image = with_image(&store).await;
        let a = store.vm_insert(record("a", image, Path::new("/a"))).await.expect("a");
        let b = store.vm_insert(record("b", image, Path::new("/b"))).await.expect("b");
        assert_eq!((a.vsock_cid, b.vsock_cid), (3, 4));
        assert_eq!(a.observed_state, VmState::Created);
        let dup = store.vm_insert(record("a", image, Path::new("/c"))).await;
        assert!(matches!(dup, Err(StoreError::NameTaken { .. })), "{dup:?}");
        assert_eq!(store.vm_get("a").await.expect("by name").id, a.id);
        assert_eq!(store.vm_get(&b.id.to_string()).await.expect("by id").name, "b");
    }

    #[tokio::test]
    async fn addresses_are_allocated_durably_and_never_twice() {
        let (store, _dir) = test_store().await;
        let image = with_image(&store).await;
        let pool: IpPool = "10.9.0.0/29".parse().expect("pool");
        let mut names = Vec::new();
        for i in 0..5 {
            let name = format!("n{i}");
            let mut new = record(&name, image, Path::new("/d"));
            new.ip_pool = Some(pool);
            let vm = store.vm_insert(new).await.expect("insert");
            names.push((name.clone(), vm.ip.expect("ip").to_string()));
        }
        let ips: Vec<&str> = names.iter().map(|(_, ip)| ip.as_str()).collect();
        assert_eq!(ips, ["10.9.0.2", "10.9.0.3", "10.9.0.4", "10.9.0.5", "10.9.0.6"]);
        let mut full = record("full", image, Path::new("/d"));
        full.ip_pool = Some(pool);
        assert!(matches!(store.vm_insert(full).await, Err(StoreError::PoolExhausted { .. })));
        // Released with the record, then handed out again.
        let freed = store.vm_get("n1").await.expect("n1");
        store.vm_delete(freed.id).await.expect("delete");
        let mut again = record("again", image, Path::new("/d"));
        again.ip_pool = Some(pool);
        assert_eq!(
            store.vm_insert(again).await.expect("insert").ip.map(|ip| ip.to_string()).as_deref(),
            Some("10.9.0.3")
        );
    }

    #[tokio::test]
    async fn updates_compare_and_set_the_generation() {
        let (store, _dir) = test_store().await;
        let image = with_image(&store).await;
        let vm = store.vm_insert(record("a", image, Path::new("/a"))).await.expect("insert");
        let update = VmUpdate { observed_state: Some(VmState::Starting), ..Default::default() };
        let newer = store.vm_update(&vm, update.clone()).await.expect("first update");
        assert_eq!(newer.generation, vm.generation + 1);
        assert_eq!(newer.observed_state, VmState::Starting);
        let stale = store.vm_update(&vm, update).await;
        assert!(matches!(stale, Err(StoreError::Conflict { .. })), "{stale:?}");
    }

    #[tokio::test]
    async fn state_changes_and_deletions_are_events_with_consecutive_revisions_in_their_transaction() {
        let (store, _dir) = test_store().await;
        let image = with_image(&store).await;
        let mut revisions = store.subscribe_revisions();
        let vm = store.vm_insert(record("ev", image, Path::new("/tmp/ev"))).await.expect("insert");
        // Revisions start at 1 (a fresh host's lists say 1), so the first event is 2.
        assert_eq!(*revisions.borrow_and_update(), 2, "announced after commit");
        let running = VmUpdate { observed_state: Some(VmState::Running), ..Default::default() };
        let vm = store.vm_update(&vm, running).await.expect("update");
        // An update that changes no state records nothing; a stale one fails and records nothing.
        let error = LastError::new(VmFault::StartFailed, "x");
        let same = store.vm_update(&vm, VmUpdate { last_error: Some(error), ..Default::default() }).await;
        let vm = same.expect("update");
        let stale = VmUpdate { observed_state: Some(VmState::Stopped), ..Default::default() };
        let mut old = vm.clone();
        old.generation -= 1;
        assert!(store.vm_update(&old, stale).await.is_err());
        store.vm_delete(vm.id).await.expect("delete");
        let events = store.events_after(0, 100).await.expect("events");
        let kinds: Vec<_> = events.iter().map(|e| (e.revision, e.kind.clone())).collect();
        assert_eq!(
            kinds,
            [
                (2, EventKind::State { state: VmState::Created, previous: None }),
                (3, EventKind::State { state: VmState::Running, previous: Some(VmState::Created) }),
                (4, EventKind::Deleted),
            ]
        );
        assert_eq!(store.latest_revision().await.expect("latest"), 4);
        assert_eq!(store.oldest_resumable_revision().await.expect("oldest"), 1);
        store.event_prune(i64::MAX).await.expect("prune");
        assert_eq!(store.oldest_resumable_revision().await.expect("oldest"), 4, "nothing before 4 can be replayed");
        assert_eq!(store.latest_revision().await.expect("latest"), 4, "revisions are never reused");
    }

    #[tokio::test]
    async fn an_image_in_use_cannot_be_deleted() {
        let (store, _dir) = test_store().await;
        let image = with_image(&store).await;
        let vm = store.vm_insert(record("a", image, Path::new("/a"))).await.expect("insert");
        assert!(matches!(store.image_delete(image).await, Err(StoreError::InUse { count: 1, .. })));
        store.vm_delete(vm.id).await.expect("delete vm");
        store.image_delete(image).await.expect("delete image");
        assert!(matches!(store.image_get("img").await, Err(StoreError::NotFound { .. })));
    }
}
