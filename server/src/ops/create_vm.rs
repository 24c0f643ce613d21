//! `vm.create`: record a VM and, unless asked not to, boot it. All or nothing: a failure
//! unwinds to no record and no host resources, keeping the logs for inspection.

use std::path::PathBuf;

use super::{
    Error, Ops,
    boot::{Boot, BootStage, boot_stages},
    runner::{self, Operation, Subject},
};
use crate::{
    domain::{Image, OpId, Snapshot, Vm, VmFault, VmId, VmSpec, VmState},
    store::{LastError, NewVmRecord, VmUpdate},
};

/// A validated create request.
#[derive(Debug, Clone)]
pub struct CreateVm {
    /// The name; generated when absent.
    pub name: Option<String>,
    /// Image id or name; the default image when absent.
    pub image: Option<String>,
    /// The shape.
    pub spec: VmSpec,
    /// Whether to boot it now.
    pub start: bool,
    /// Whether a boot waits until the guest agent answers.
    pub wait_agent: bool,
    /// Its labels (validated).
    pub labels: crate::domain::Labels,
    /// Its time to live in milliseconds, from its creation.
    pub ttl_ms: Option<i64>,
    /// Where its traffic may go beyond its bridge.
    pub egress: crate::domain::Egress,
    /// The snapshot (id or name) to restore instead of booting; its shape and image are
    /// the VM's (a `spec` field left 0 takes the snapshot's, another value must match it).
    pub snapshot: Option<String>,
}

#[derive(Debug, Clone, Copy)]
enum Stage {
    ResolveImage,
    InsertRecord,
    PrepareVmDir,
    Boot(BootStage),
    MarkRunning,
}

struct CreateVmOp<'a> {
    ops: &'a Ops,
    op_id: OpId,
    id: VmId,
    name: String,
    request: CreateVm,
    image: Option<Image>,
    /// The snapshot restored, when the create restores one.
    snapshot: Option<Snapshot>,
    boot: Option<Boot>,
    /// The VM's runtime could not be released while unwinding: its directory (with the
    /// scratch file naming what is left) and its record are kept, the record in `error`.
    leftovers: bool,
}

impl CreateVmOp<'_> {
    fn vm(&self) -> Result<&Vm, Error> {
        self.boot.as_ref().map(|b| &b.vm).ok_or(Error::StageOrder { needs: "the vm record" })
    }

    /// Where the logs of a failed create are kept after its VM dir is removed.
    fn failed_dir(&self) -> PathBuf {
        self.ops.config.state_dir.join("failed").join(format!("{}-{}", self.name, self.op_id))
    }
}

#[tonic::async_trait]
impl Operation for CreateVmOp<'_> {
    type Stage = Stage;
    const NAME: &'static str = "vm.create";

    fn stages(&self) -> Vec<Stage> {
        let mut stages = vec![Stage::ResolveImage, Stage::InsertRecord, Stage::PrepareVmDir];
        if self.request.start {
            let (network, restore) = (self.ops.config.network.as_ref(), self.snapshot.is_some());
            let member = self.request.labels.contains_key(crate::domain::POOL_LABEL);
            stages.extend(boot_stages(network, self.request.wait_agent, restore, member).into_iter().map(Stage::Boot));
            stages.push(Stage::MarkRunning);
        }
        stages
    }

    fn stage_name(stage: Stage) -> &'static str {
        match stage {
            Stage::ResolveImage => "resolve_image",
            Stage::InsertRecord => "insert_record",
            Stage::PrepareVmDir => "prepare_vm_dir",
            Stage::Boot(boot) => boot.name(),
            Stage::MarkRunning => "mark_running",
        }
    }

    async fn apply(&mut self, stage: Stage) -> Result<(), Error> {
        let ops = self.ops;
        match stage {
            Stage::ResolveImage => {
                let image = match (&self.snapshot, &self.request.image) {
                    (Some(snapshot), _) => ops.store.image_get(&snapshot.image_id.to_string()).await?,
                    (None, Some(key)) => ops.find_image(key).await?,
                    (None, None) => ops.ensure_default_image().await?,
                };
                super::images::check_image_files(&image).await?;
                super::images::check_kernel_for(ops.host.vmm.name(), &image).await?;
                if self.snapshot.is_none() {
                    self.request.spec = ops.with_defaults(self.request.spec, &image);
                }
                check_disk_size(self.request.spec.disk_bytes, &image, ops.config.root_disk)?;
                self.image = Some(image);
            }
            Stage::InsertRecord if self.boot.is_some() => {}
            Stage::InsertRecord => {
                let image = self.image.clone().ok_or(Error::StageOrder { needs: "the image" })?;
                let (desired, observed) = match self.request.start {
                    true => (VmState::Running, VmState::Starting),
                    false => (VmState::Stopped, VmState::Created),
                };
                let vm_dir = ops.vms_dir().join(self.id.to_string());
                let op_id = self.op_id.to_string();
                let vm = ops
                    .store
                    .vm_insert(NewVmRecord {
                        id: self.id,
                        name: &self.name,
                        image_id: image.id,
                        spec: self.request.spec,
                        desired_state: desired,
                        observed_state: observed,
                        root_disk: ops.config.root_disk,
                        ip_pool: ops.config.network.as_ref().map(|n| n.pool),
                        vm_dir: &vm_dir,
                        last_operation: &op_id,
                        labels: &self.request.labels,
                        expire_at_ms: self.request.ttl_ms.map(|ttl| ops.clock().now_ms() + ttl),
                        egress: &self.request.egress,
                        snapshot_id: self.snapshot.as_ref().map(|s| s.id),
                    })
                    .await?;
                self.boot = Some(match self.snapshot.clone() {
                    Some(snapshot) => Boot::restoring(vm, image, snapshot),
                    None => Boot::new(vm, image),
                });
            }
            Stage::PrepareVmDir => {
                crate::host::fs::create_dir(&self.vm()?.vm_dir, 0o700).await?;
            }
            Stage::Boot(boot_stage) => {
                let boot = self.boot.as_mut().ok_or(Error::StageOrder { needs: "the vm record" })?;
                boot.apply(ops, boot_stage).await?;
            }
            Stage::MarkRunning => {
                let boot = self.boot.as_mut().ok_or(Error::StageOrder { needs: "the vm record" })?;
                let update = VmUpdate { observed_state: Some(VmState::Running), ..Default::default() };
                boot.vm = ops.store.vm_update(&boot.vm, update).await?;
            }
        }
        Ok(())
    }

    async fn undo(&mut self, stage: Stage) -> Result<(), Error> {
        let ops = self.ops;
        let failed_dir = self.failed_dir();
        let Some(boot) = self.boot.as_mut() else { return Ok(()) };
        match stage {
            Stage::Boot(boot_stage) => boot.undo(ops, boot_stage).await,
            // Whatever a boot stage's undo could not release is retried here, with names
            // derived from the VM's identity too; only once nothing is left does the
            // directory (and its scratch file, the evidence) go.
            Stage::PrepareVmDir => {
                if !crate::host::fs::exists(&boot.vm.vm_dir).await {
                    return Ok(());
                }
                keep_logs(&boot.vm, &failed_dir).await;
                if let Err(error) = ops.release_runtime(&boot.vm).await {
                    self.leftovers = true;
                    return Err(error);
                }
                self.leftovers = false;
                Ok(crate::host::fs::remove_dir(&boot.vm.vm_dir).await?)
            }
            // With leftovers the record stays, in `error`, so that the VM can be seen and
            // deleted; reconcile releases what is left meanwhile.
            Stage::InsertRecord if self.leftovers => {
                let current = match ops.store.vm_get(&boot.vm.id.to_string()).await {
                    Ok(current) => current,
                    Err(crate::store::StoreError::NotFound { .. }) => return Ok(()),
                    Err(error) => return Err(error.into()),
                };
                if current.observed_state != VmState::Error {
                    let update = VmUpdate {
                        observed_state: Some(VmState::Error),
                        desired_state: Some(VmState::Stopped),
                        last_error: Some(LastError::new(
                            VmFault::CreateLeftovers,
                            "create failed and not everything it made could be released; reconcile retries, \
                             delete the VM to finish",
                        )),
                        ..Default::default()
                    };
                    boot.vm = ops.store.vm_update(&current, update).await?;
                }
                Ok(())
            }
            Stage::InsertRecord => {
                match ops.store.vm_delete(boot.vm.id).await {
                    Ok(()) | Err(crate::store::StoreError::NotFound { .. }) => {}
                    Err(error) => return Err(error.into()),
                }
                ops.forget_vm(boot.vm.id);
                Ok(())
            }
            Stage::ResolveImage | Stage::MarkRunning => Ok(()),
        }
    }

    fn subject(&self) -> Subject {
        Subject {
            vm_id: Some(self.id.to_string()),
            vm_name: Some(self.name.clone()),
            image_id: self.image.as_ref().map(|i| i.id.to_string()),
            labels: self.request.labels.clone(),
        }
    }

    fn evidence(&self, stage: Stage) -> Option<PathBuf> {
        match stage {
            Stage::Boot(boot) => boot.evidence_file().map(|file| self.failed_dir().join(file)),
            _ => None,
        }
    }
}

/// How many failed creates keep their logs; older ones are pruned.
const KEPT_FAILURES: usize = 20;

/// Copies a failed VM's logs out of its directory before the directory is removed, and
/// prunes the logs of all but the latest [`KEPT_FAILURES`] failed creates.
async fn keep_logs(vm: &Vm, failed_dir: &std::path::Path) {
    let paths = vm.paths();
    let logs = [paths.console_log.as_path(), &paths.vmm_log, &paths.vsock_backend_log];
    crate::host::fs::keep_logs(&logs, failed_dir, KEPT_FAILURES).await;
}

/// A generated name: `vm-` and the random tail of a fresh ULID, lower case.
pub(super) fn generated_name(id: VmId) -> String {
    let id = id.to_string().to_lowercase();
    format!("vm-{}", &id[id.len() - 8..])
}

/// A root disk asked bigger than its image must be at least the image, and made by a
/// strategy that can grow (a dm-snapshot is its base's size).
pub(super) fn check_disk_size(
    disk_bytes: u64,
    image: &crate::domain::Image,
    strategy: crate::domain::RootDiskStrategy,
) -> Result<(), Error> {
    let violation = |why: String| Err(Error::InvalidArgument(vec![super::FieldViolation::new("disk_size_bytes", why)]));
    if disk_bytes == 0 || disk_bytes == image.rootfs_size_bytes {
        return Ok(());
    }
    if disk_bytes < image.rootfs_size_bytes {
        return violation(format!(
            "must be at least the image's root file system, {} bytes, got {disk_bytes}",
            image.rootfs_size_bytes
        ));
    }
    if strategy == crate::domain::RootDiskStrategy::DmSnapshot {
        return violation("dm-snapshot root disks (root_disk = \"dm-snapshot\") are their image's size".into());
    }
    Ok(())
}

impl Ops {
    /// `spec` with what it leaves unset (0) from `[vm_defaults]`: vCPUs, memory, and a disk
    /// grown to the default size where disks grow and the image's is smaller.
    pub(super) fn with_defaults(
        &self,
        spec: crate::domain::VmSpec,
        image: &crate::domain::Image,
    ) -> crate::domain::VmSpec {
        let defaults = self.config.vm_defaults;
        let can_grow = self.config.root_disk != crate::domain::RootDiskStrategy::DmSnapshot;
        let spec = defaults.fill(spec);
        crate::domain::VmSpec {
            disk_bytes: defaults.disk_bytes(spec.disk_bytes, image.rootfs_size_bytes, can_grow),
            ..spec
        }
    }

    /// Creates a VM (and boots it unless `request.start` is false); a ready member of a
    /// pool of its shape serves it when there is one.
    pub async fn create_vm(&self, mut request: CreateVm) -> Result<Vm, Error> {
        let snapshot = match request.snapshot.is_some() {
            true => Some(self.snapshot_for_create(&mut request).await?),
            false => {
                // The disk's default depends on the image: filled in once it is resolved.
                request.spec = self.config.vm_defaults.fill(request.spec);
                None
            }
        };
        if let Some(claimed) = self.claim(&request, snapshot.as_ref()).await {
            return claimed;
        }
        self.create_vm_from(request, snapshot).await
    }

    /// Creates a VM by booting it (unless `request.start` is false).
    pub(super) async fn create_vm_cold(&self, request: CreateVm) -> Result<Vm, Error> {
        self.create_vm_from(request, None).await
    }

    /// Creates a VM by booting it, or by restoring `snapshot`.
    pub(super) async fn create_vm_from(&self, request: CreateVm, snapshot: Option<Snapshot>) -> Result<Vm, Error> {
        let op_id = OpId::generate();
        let id = VmId::generate();
        let name = request.name.clone().unwrap_or_else(|| generated_name(id));
        let _admitted = self.admit(id, request.spec, true, request.start).await?;
        let lock = self.vm_lock(id);
        let _guard = lock.lock().await;
        let mut op =
            CreateVmOp { ops: self, op_id, id, name, request, image: None, snapshot, boot: None, leftovers: false };
        runner::run_with(op_id, &mut op, &self.run_options()).await?;
        let vm = op.vm()?.clone();
        Ok(vm)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_names_are_valid_vm_names() {
        let name = generated_name(VmId::generate());
        assert_eq!(crate::domain::vm_name_error(&name), Ok(()));
    }
}
