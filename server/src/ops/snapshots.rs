//! Snapshots: `vm.snapshot` saves a running VM (agent quiesced, file systems synced, vCPUs
//! stopped, device state saved beside its memory file, its disk frozen), then the VM resumes
//! from the snapshot or stops. A create with `snapshot` restores one (`boot.rs`'s restore
//! stages). A snapshot's files are its group's alone (see `domain::SNAPSHOT_GROUP_OFFSET`).
//!
//! Crash safety: the record is written first, not ready; the VM's record names the snapshot
//! as soon as its disk overlays the frozen one, then the snapshot is marked ready. Reconcile
//! finishes a snapshot some VM already depends on, and rolls back any other unfinished one
//! (the VM's disk moved back, the files removed), resuming a source left stopped.

use super::{
    Error, FieldViolation, Ops,
    boot::{Boot, BootStage, boot_stages},
    runner::{self, Operation, Subject},
};
use crate::{
    domain::{Labels, OpId, Snapshot, SnapshotAfter, SnapshotId, Vm, VmState},
    host::vmm::MemorySave,
    store::VmUpdate,
};

/// A snapshot to take.
#[derive(Debug, Clone)]
pub struct TakeSnapshot {
    /// The VM's id or name.
    pub vm: String,
    /// The snapshot's name (checked by the API).
    pub name: String,
    /// Its labels (checked by the API).
    pub labels: Labels,
    /// What the VM does afterwards.
    pub after: SnapshotAfter,
    /// The guest has no agent: nothing in it is synced or closed first, and VMs started
    /// from the snapshot are not told their identity.
    pub without_agent: bool,
}

/// A snapshot as the API shows it.
#[derive(Debug, Clone)]
pub struct SnapshotInfo {
    /// Its record.
    pub snapshot: Snapshot,
    /// How many VMs depend on it.
    pub dependents: u32,
    /// The bytes its files take on the host.
    pub stored_bytes: u64,
}

#[derive(Debug, Clone, Copy)]
enum Stage {
    InsertSnapshot,
    SyncGuest,
    QuiesceAgent,
    PauseVcpus,
    SaveState,
    FreezeFiles,
    StopSource,
    Boot(BootStage),
    MarkDone,
}

/// The state file the VMM writes into the VM's own directory (the VM's identity may write
/// there), before it moves into the snapshot's.
const SAVING: &str = "snapshot.state";
/// The memory file a VMM that writes memory at a save ([`MemorySave::Written`]) writes there.
const SAVING_MEMORY: &str = "snapshot.memory";

struct SnapshotVmOp<'a> {
    ops: &'a Ops,
    op_id: OpId,
    vm: Vm,
    request: TakeSnapshot,
    snapshot: Option<Snapshot>,
    /// The snapshot is complete: nothing before this undoes any more.
    committed: bool,
    boot: Option<Boot>,
}

impl SnapshotVmOp<'_> {
    fn snapshot(&self) -> Result<&Snapshot, Error> {
        self.snapshot.as_ref().ok_or(Error::StageOrder { needs: "the snapshot record" })
    }

    /// Moves the saved state, a copy of the memory and the disk into the snapshot, seals
    /// them, gives the VM a new disk over the frozen one, and marks the snapshot complete.
    async fn freeze(&mut self, snapshot: &Snapshot) -> Result<(), Error> {
        let (ops, paths, files) = (self.ops, self.vm.paths(), snapshot.paths());
        crate::host::fs::rename(&paths.dir.join(SAVING), &files.state).await?;
        match ops.host.vmm.memory_save() {
            MemorySave::InPlace => {
                crate::host::fs::copy_memory_to_snapshot(&ops.memory_file(&self.vm), &files.memory).await?
            }
            MemorySave::Written => crate::host::fs::rename(&paths.dir.join(SAVING_MEMORY), &files.memory).await?,
        }
        // The VMM is spent (its block devices inactive): the disk is frozen as it is.
        crate::host::fs::rename(&paths.root_disk, &files.disk).await?;
        let group = ops.host.vmm.snapshot_group(snapshot.group);
        crate::host::fs::seal_snapshot(&files.dir, &[&files.memory, &files.state, &files.disk], group).await?;
        ops.host.disks.create(self.vm.root_disk, &files.disk, &paths.root_disk, self.vm.spec.disk_bytes).await?;
        // `stopping` until it runs (or stops) anew: a daemon that dies from here on leaves
        // it stopped at reconcile, its spent VMM gone.
        let update =
            VmUpdate { snapshot_id: Some(snapshot.id), observed_state: Some(VmState::Stopping), ..Default::default() };
        self.vm = ops.store.vm_update(&self.vm, update).await?;
        // From here the snapshot is the VM's disk's base: it stays whatever happens next.
        self.committed = true;
        self.snapshot = Some(ops.store.snapshot_mark_ready(snapshot.id).await?);
        Ok(())
    }
}

/// Puts a frozen disk back under its VM (removing the new overlay over it, if made).
async fn roll_back_disk(vm: &Vm, snapshot: &Snapshot) -> Result<(), Error> {
    let (paths, files) = (vm.paths(), snapshot.paths());
    if crate::host::fs::exists(&files.disk).await {
        crate::host::fs::remove_file_quietly(&paths.root_disk).await;
        crate::host::fs::rename(&files.disk, &paths.root_disk).await?;
    }
    Ok(())
}

#[tonic::async_trait]
impl Operation for SnapshotVmOp<'_> {
    type Stage = Stage;
    const NAME: &'static str = "vm.snapshot";

    fn stages(&self) -> Vec<Stage> {
        let mut stages = vec![Stage::InsertSnapshot];
        let with_agent = !self.request.without_agent;
        if with_agent {
            stages.extend([Stage::SyncGuest, Stage::QuiesceAgent]);
        }
        stages.extend([Stage::PauseVcpus, Stage::SaveState, Stage::FreezeFiles, Stage::StopSource]);
        if self.request.after == SnapshotAfter::Resume {
            let network = self.ops.config.network.as_ref().filter(|_| self.vm.ip.is_some());
            // The disk exists already (it overlays the snapshot's): `root_disk` only hands it over.
            stages.extend(boot_stages(network, with_agent, true, false).into_iter().map(Stage::Boot));
        }
        stages.push(Stage::MarkDone);
        stages
    }

    fn stage_name(stage: Stage) -> &'static str {
        match stage {
            Stage::InsertSnapshot => "insert_snapshot",
            Stage::SyncGuest => "sync_guest",
            Stage::QuiesceAgent => "quiesce_agent",
            Stage::PauseVcpus => "pause_vcpus",
            Stage::SaveState => "save_state",
            Stage::FreezeFiles => "freeze_files",
            Stage::StopSource => "stop_source",
            Stage::Boot(boot) => boot.name(),
            Stage::MarkDone => "mark_done",
        }
    }

    async fn apply(&mut self, stage: Stage) -> Result<(), Error> {
        let ops = self.ops;
        let paths = self.vm.paths();
        match stage {
            Stage::InsertSnapshot => {
                let id = SnapshotId::generate();
                let dir = ops.snapshots_dir().join(id.to_string());
                let new = Snapshot {
                    id,
                    name: self.request.name.clone(),
                    source_vm_id: self.vm.id,
                    source_vm_name: self.vm.name.clone(),
                    image_id: self.vm.image_id,
                    spec: self.vm.spec,
                    egress: self.vm.egress.clone(),
                    root_disk: self.vm.root_disk,
                    networked: self.vm.ip.is_some(),
                    labels: self.request.labels.clone(),
                    dir: dir.clone(),
                    group: 0,
                    ready: false,
                    created_at_ms: ops.clock().now_ms(),
                    last_operation: self.op_id.to_string(),
                    base: self.vm.snapshot_id,
                    without_agent: self.request.without_agent,
                };
                let snapshot = ops.store.snapshot_insert(&new).await?;
                self.snapshot = Some(snapshot);
                crate::host::fs::create_dir(&dir, 0o700).await?;
            }
            Stage::SyncGuest => ops.host.agents.sync_guest(&self.vm).await?,
            Stage::QuiesceAgent => ops.host.agents.quiesce(&self.vm).await?,
            Stage::PauseVcpus => ops.host.vmm.pause(&paths).await?,
            Stage::SaveState => {
                ops.host.vmm.save(&paths, &paths.dir.join(SAVING), &paths.dir.join(SAVING_MEMORY)).await?;
                // The key the saved agent holds: its clones' first identity call carries it.
                if !self.request.without_agent {
                    ops.host.agents.save_key(&self.vm, &self.snapshot()?.paths().agent_key).await?;
                }
            }
            Stage::FreezeFiles => {
                let snapshot = self.snapshot()?.clone();
                // Undone here, not in `undo`: a failure part way leaves the disk to move back.
                let frozen = self.freeze(&snapshot).await;
                if frozen.is_err() && !self.committed {
                    roll_back_disk(&self.vm, &snapshot).await?;
                }
                frozen?;
            }
            Stage::StopSource => {
                ops.release_runtime(&self.vm).await?;
                if self.request.after == SnapshotAfter::Resume {
                    let image = ops.store.image_get(&self.vm.image_id.to_string()).await?;
                    self.boot = Some(Boot::resuming(self.vm.clone(), image, self.snapshot()?.clone()));
                }
            }
            Stage::Boot(boot_stage) => {
                let boot = self.boot.as_mut().ok_or(Error::StageOrder { needs: "the restore" })?;
                boot.apply(ops, boot_stage).await?;
            }
            Stage::MarkDone => {
                let state = match self.request.after {
                    SnapshotAfter::Resume => VmState::Running,
                    SnapshotAfter::Stop => VmState::Stopped,
                };
                let update = VmUpdate {
                    observed_state: Some(state),
                    desired_state: Some(state),
                    last_operation: Some(self.op_id.to_string()),
                    ..Default::default()
                };
                self.vm = ops.store.vm_update(&self.vm, update).await?;
            }
        }
        Ok(())
    }

    async fn undo(&mut self, stage: Stage) -> Result<(), Error> {
        let ops = self.ops;
        let paths = self.vm.paths();
        match stage {
            Stage::Boot(boot_stage) => {
                if let Some(boot) = self.boot.as_mut() {
                    boot.undo(ops, boot_stage).await?;
                }
            }
            // Once the snapshot is complete it stays, and the source does not come back.
            _ if self.committed => {}
            Stage::InsertSnapshot => {
                if let Some(snapshot) = self.snapshot.take() {
                    crate::host::fs::remove_dir(&snapshot.dir).await?;
                    ops.store.snapshot_delete(snapshot.id).await?;
                }
            }
            Stage::SaveState => {
                for file in [SAVING, SAVING_MEMORY] {
                    crate::host::fs::remove_file_quietly(&paths.dir.join(file)).await;
                }
            }
            // A QEMU whose state was saved runs on after `cont`: its disks come back.
            Stage::PauseVcpus => ops.host.vmm.resume(&paths).await?,
            Stage::SyncGuest | Stage::QuiesceAgent | Stage::StopSource | Stage::MarkDone => {}
            Stage::FreezeFiles => {}
        }
        Ok(())
    }

    fn subject(&self) -> Subject {
        Subject::of(&self.vm)
    }

    fn evidence(&self, stage: Stage) -> Option<std::path::PathBuf> {
        match stage {
            Stage::PauseVcpus | Stage::SaveState => Some(self.vm.paths().vmm_log),
            Stage::Boot(boot) => boot.evidence_file().map(|file| self.vm.vm_dir.join(file)),
            _ => None,
        }
    }
}

impl Ops {
    /// Takes a snapshot of a running VM; returns it and the VM as it is afterwards.
    pub async fn snapshot_vm(&self, request: TakeSnapshot) -> Result<(Snapshot, Vm), Error> {
        let vm = self.store.vm_get(&request.vm).await?;
        let lock = self.vm_lock(vm.id);
        let _guard = lock.lock().await;
        let vm = self.refresh_locked(self.store.vm_get(&vm.id.to_string()).await?).await?;
        if vm.observed_state != VmState::Running {
            return Err(Error::WrongState { vm: vm.name, state: vm.observed_state, action: "be snapshotted" });
        }
        let unsupported = |why: String| Err(Error::SnapshotUnsupported { vm: vm.name.clone(), why });
        if let Some(why) = self.host.vmm.snapshots_unsupported() {
            return unsupported(why);
        }
        if vm.root_disk == crate::domain::RootDiskStrategy::DmSnapshot {
            return unsupported("its root disk is a device-mapper snapshot (root_disk = \"dm-snapshot\")".into());
        }
        if self.host.vmm.memory_save() == MemorySave::InPlace && !crate::host::fs::exists(&self.memory_file(&vm)).await
        {
            return unsupported(
                "its memory is not in a file of its own (it was restored from a snapshot, or booted before \
                 snapshots were configured): stop and start it first"
                    .into(),
            );
        }
        let op_id = OpId::generate();
        let mut op = SnapshotVmOp { ops: self, op_id, vm, request, snapshot: None, committed: false, boot: None };
        let ran = runner::run_with(op_id, &mut op, &self.run_options()).await;
        if let Err(error) = ran {
            if op.committed {
                // The snapshot is complete; the VM could not resume from it.
                self.mark_failed_resume(&op.vm, &error).await;
            }
            return Err(error);
        }
        let snapshot = op.snapshot()?.clone();
        tracing::info!(snapshot = %snapshot.name, vm_name = %op.vm.name, "snapshot taken");
        Ok((snapshot, op.vm))
    }

    async fn mark_failed_resume(&self, vm: &Vm, error: &Error) {
        // Whatever runs of it is spent (a saved VMM) or half restored: it all goes.
        if let Err(error) = self.release_runtime(vm).await {
            tracing::warn!(vm_id = %vm.id, error = %error, "cannot release a snapshot's source; reconcile retries");
        }
        let Ok(current) = self.store.vm_get(&vm.id.to_string()).await else { return };
        let update = VmUpdate {
            observed_state: Some(VmState::Error),
            desired_state: Some(VmState::Stopped),
            last_error: Some(crate::store::LastError::new(
                crate::domain::VmFault::StartFailed,
                format!("its snapshot was saved, then the vm could not go on: {}", error.chain()),
            )),
            ..Default::default()
        };
        if let Err(error) = self.store.vm_update(&current, update).await {
            tracing::warn!(vm_id = %vm.id, error = %error, "cannot record a failed resume");
        }
    }

    /// Checks a create from a snapshot against the snapshot, and gives it the snapshot's
    /// shape and image; returns the snapshot.
    pub(super) async fn snapshot_for_create(&self, request: &mut super::CreateVm) -> Result<Snapshot, Error> {
        let key = request.snapshot.clone().unwrap_or_default();
        let snapshot = self.store.snapshot_get(&key).await?;
        if !snapshot.ready {
            return Err(Error::NotFound { kind: crate::domain::Resource::Snapshot, key });
        }
        if let Some(why) = self.host.vmm.snapshots_unsupported() {
            return Err(Error::SnapshotUnsupported { vm: request.name.clone().unwrap_or_default(), why });
        }
        let mut violations = Vec::new();
        let mut differs = |field: &str, given: u64, theirs: u64| {
            if given != 0 && given != theirs {
                violations.push(FieldViolation::new(
                    field,
                    format!("the snapshot's is {theirs}, got {given}: leave it unset to take the snapshot's"),
                ));
            }
        };
        differs("vcpus", request.spec.vcpus.into(), snapshot.spec.vcpus.into());
        differs("memory_mib", request.spec.memory_mib.into(), snapshot.spec.memory_mib.into());
        differs("disk_size_bytes", request.spec.disk_bytes, snapshot.spec.disk_bytes);
        if let Some(image) = &request.image {
            let image = self.find_image(image).await?;
            if image.id != snapshot.image_id {
                violations.push(FieldViolation::new("image", "the snapshot's image is another: leave it unset"));
            }
        }
        if !request.start {
            violations.push(FieldViolation::new("no_start", "a restore starts the VM"));
        }
        match snapshot.without_agent {
            true if request.wait_agent => violations.push(FieldViolation::new(
                "no_wait",
                "the snapshot was taken without an agent: a VM started from it has none to wait for (set no_wait)",
            )),
            false if !request.wait_agent => violations
                .push(FieldViolation::new("no_wait", "a restore waits for its agent, to tell it its identity")),
            _ => {}
        }
        if snapshot.networked != self.config.network.is_some() {
            violations.push(FieldViolation::new(
                "snapshot",
                "the snapshot's VM had a network interface and VMs here have none, or the other way round",
            ));
        }
        if !violations.is_empty() {
            return Err(Error::InvalidArgument(violations));
        }
        request.spec = snapshot.spec;
        Ok(snapshot)
    }

    /// The gids of snapshot `id` and of every snapshot under it (its disk overlays theirs):
    /// a VMM whose disk overlays `id`'s opens all their disks.
    pub(super) async fn snapshot_groups(&self, id: SnapshotId) -> Result<Vec<u32>, Error> {
        let mut groups = Vec::new();
        let mut next = Some(id);
        // Each snapshot's base was taken before it: the chain ends; the bound is a guard.
        while let Some(id) = next.take()
            && groups.len() < 64
        {
            let snapshot = self.store.snapshot_get(&id.to_string()).await?;
            groups.extend(self.host.vmm.snapshot_group(snapshot.group));
            next = snapshot.base;
        }
        Ok(groups)
    }

    /// A snapshot by id or name.
    pub async fn get_snapshot(&self, key: &str) -> Result<SnapshotInfo, Error> {
        let snapshot = self.store.snapshot_get(key).await?;
        self.snapshot_info(snapshot).await
    }

    /// The complete snapshots carrying every label of `selector`, oldest first.
    pub async fn list_snapshots(&self, selector: &Labels) -> Result<Vec<SnapshotInfo>, Error> {
        let mut infos = Vec::new();
        for snapshot in self.store.snapshot_list(selector).await?.into_iter().filter(|s| s.ready) {
            infos.push(self.snapshot_info(snapshot).await?);
        }
        Ok(infos)
    }

    async fn snapshot_info(&self, snapshot: Snapshot) -> Result<SnapshotInfo, Error> {
        let dependents = self.store.snapshot_dependents(snapshot.id).await?;
        let files = snapshot.paths();
        let mut stored_bytes = 0;
        for file in [&files.memory, &files.state, &files.disk] {
            stored_bytes += crate::host::fs::allocated_bytes(file).await;
        }
        Ok(SnapshotInfo { snapshot, dependents, stored_bytes })
    }

    /// Deletes a snapshot and its files; refused while a VM depends on it.
    pub async fn delete_snapshot(&self, key: &str) -> Result<Snapshot, Error> {
        let snapshot = self.store.snapshot_get(key).await?;
        self.store.snapshot_delete(snapshot.id).await?;
        crate::host::fs::remove_dir(&snapshot.dir).await?;
        tracing::info!(snapshot = %snapshot.name, "snapshot deleted");
        Ok(snapshot)
    }

    /// At startup, before VMs are reconciled: finishes each snapshot a crash left
    /// incomplete that a VM depends on already, and rolls back every other one.
    pub async fn recover_snapshots(&self) -> Result<(), Error> {
        for snapshot in self.store.snapshot_list(&Labels::new()).await?.into_iter().filter(|s| !s.ready) {
            if self.store.snapshot_dependents(snapshot.id).await? > 0 {
                tracing::info!(snapshot = %snapshot.name, "finishing a snapshot cut short");
                self.store.snapshot_mark_ready(snapshot.id).await?;
                continue;
            }
            tracing::info!(snapshot = %snapshot.name, "rolling back a snapshot cut short");
            if let Ok(vm) = self.store.vm_get(&snapshot.source_vm_id.to_string()).await {
                let paths = vm.paths();
                roll_back_disk(&vm, &snapshot).await?;
                for file in [SAVING, SAVING_MEMORY] {
                    crate::host::fs::remove_file_quietly(&paths.dir.join(file)).await;
                }
                // A source left paused (or spent by a save) runs on.
                if self.vm_alive(&vm)
                    && vm.observed_state == VmState::Running
                    && let Err(error) = self.host.vmm.resume(&paths).await
                {
                    tracing::warn!(vm_id = %vm.id, error = %error, "cannot resume a snapshot's source");
                }
            }
            crate::host::fs::remove_dir(&snapshot.dir).await?;
            self.store.snapshot_delete(snapshot.id).await?;
        }
        Ok(())
    }
}
