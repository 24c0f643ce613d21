//! Reconciling records with the host: at startup and periodically (adopt live VMMs, clean
//! up after dead ones, roll back interrupted boots, remove orphans), and lazily whenever a
//! VM is read or acted on.
//!
//! | recorded state      | VMM found (by `/proc`, else `handles.json`) | outcome                                  |
//! |---------------------|---------------------------------------------|------------------------------------------|
//! | running             | alive                                       | adopted: handles cached and rewritten    |
//! | running             | dead                                        | runtime released; stopped, with a reason |
//! | starting            | any                                         | runtime released; error (interrupted)    |
//! | stopping            | any                                         | runtime released; stopped                |
//! | created/stopped/error | -                                         | nothing to do                            |
//! | (no record)         | VM dir or process under the state dir        | orphan: processes killed, dir removed    |

use std::collections::HashSet;

use super::{Error, Ops};
use crate::{
    domain::{Transition, Vm, VmFault, VmHandles, VmId, VmState},
    host::{fs, process::ProcessTable, scratch},
    store::{LastError, StoreError, VmUpdate},
};

/// A running or paused VM whose record says no pause or resume is half done.
fn settled(vm: &Vm) -> bool {
    let (desired, observed) = (vm.desired_state, vm.observed_state);
    observed.is_up() && !(desired.is_up() && desired != observed)
}

impl Ops {
    /// Full reconcile: every VM that may have a VMM, then orphans. Idempotent: a second run
    /// changes nothing.
    pub async fn recover(&self) -> Result<(), Error> {
        let table = self.host.processes.table();
        let vms = self.store.vm_list().await?;
        let mut first_error = None;
        for vm in &vms {
            let lock = self.vm_lock(vm.id);
            let _guard = lock.lock().await;
            let result = match self.store.vm_get(&vm.id.to_string()).await {
                Ok(vm) => self.reconcile(vm, &table).await.map(drop),
                Err(StoreError::NotFound { .. }) => Ok(()),
                Err(e) => Err(e.into()),
            };
            // One VM that cannot be reconciled must not stop the others.
            if let Err(error) = result {
                tracing::warn!(vm_id = %vm.id, vm_name = %vm.name, error = error.chain(), "reconcile failed; retried later");
                first_error = first_error.or(Some(error));
            }
        }
        self.remove_orphans(vms.iter().map(|vm| vm.id).collect(), &table).await?;
        match first_error {
            Some(error) => Err(error),
            None => {
                // Every VM's scratch file was read into the cache (each one that held
                // anything is there), and only this daemon writes them, through the cache.
                self.handles_complete.store(true, std::sync::atomic::Ordering::Release);
                Ok(())
            }
        }
    }

    /// What the host shows about a VM: processes found in `/proc` by the sockets only this
    /// VM uses (the QMP socket for the VMM, the hybrid vsock socket for its backend) come first; the scratch file fills in what `/proc` cannot show, including the
    /// handles of processes that died (so their kernel-level leftovers can be torn down).
    pub fn rediscover_handles(&self, vm: &Vm, table: &ProcessTable) -> VmHandles {
        let paths = vm.paths();
        let scratch = scratch::read_handles(&paths.handles);
        VmHandles {
            vmm: table.find(&paths.api_socket).or(scratch.vmm),
            vsock_backend: table.find(&paths.vsock).or(scratch.vsock_backend),
            ..scratch
        }
    }

    /// Reconciles one VM if no operation holds it and its VMM is not known alive; returns
    /// the current record. Cheap when the cached VMM is alive.
    pub(super) async fn refresh(&self, vm: Vm) -> Result<Vm, Error> {
        if !vm.observed_state.may_have_vmm() || (settled(&vm) && self.vm_alive(&vm)) {
            return Ok(vm);
        }
        let lock = self.vm_lock(vm.id);
        let Ok(_guard) = lock.try_lock() else { return Ok(vm) };
        let vm = self.store.vm_get(&vm.id.to_string()).await?;
        self.reconcile(vm, &self.host.processes.table()).await
    }

    /// Like [`Ops::refresh`], for a caller that already holds the VM's lock.
    pub(super) async fn refresh_locked(&self, vm: Vm) -> Result<Vm, Error> {
        if !vm.observed_state.may_have_vmm() || (settled(&vm) && self.vm_alive(&vm)) {
            return Ok(vm);
        }
        self.reconcile(vm, &self.host.processes.table()).await
    }

    /// After an operation without undo (stop, delete) failed, under the VM's lock: make the
    /// record and the host agree again. Failures are logged; the periodic resync retries.
    pub(super) async fn settle_after_failure(&self, id: VmId, operation: &str) {
        let settled = match self.store.vm_get(&id.to_string()).await {
            Ok(current) => self.reconcile(current, &self.host.processes.table()).await.map(drop),
            Err(StoreError::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        };
        if let Err(cleanup) = settled {
            tracing::warn!(vm_id = %id, operation, error = cleanup.chain(), "cleanup after a failed operation failed");
        }
    }

    /// A live VM whose pause or resume was cut short (intent recorded, record not changed):
    /// the VMM is told again (both requests are idempotent) and the record follows.
    async fn finish_pause_or_resume(&self, vm: Vm) -> Result<Vm, Error> {
        if settled(&vm) {
            return Ok(vm);
        }
        let paths = vm.paths();
        match vm.desired_state {
            VmState::Paused => self.host.vmm.pause(&paths).await?,
            _ => self.host.vmm.resume(&paths).await?,
        }
        tracing::info!(
            vm_id = %vm.id,
            vm_name = %vm.name,
            from = vm.observed_state.as_str(),
            to = vm.desired_state.as_str(),
            "interrupted pause or resume finished"
        );
        let update = VmUpdate { observed_state: Some(vm.desired_state), ..Default::default() };
        Ok(self.store.vm_update(&vm, update).await?)
    }

    pub(super) async fn reconcile(&self, vm: Vm, table: &ProcessTable) -> Result<Vm, Error> {
        let state = vm.observed_state;
        if !state.may_have_vmm() {
            // No VMM, but a failed undo may have left handles (in the scratch file) that
            // it could not release: try again.
            if !self.handles(&vm).is_empty() {
                tracing::info!(vm_id = %vm.id, vm_name = %vm.name, "releasing what a failed operation left");
                self.release_runtime(&vm).await?;
            }
            return Ok(vm);
        }
        let handles = self.rediscover_handles(&vm, table);
        let paths = vm.paths();
        let alive = handles.vmm.is_some_and(|vmm| self.host.processes.alive(&vmm, &paths.api_socket));
        let (next, fault, reason) = match (state, alive) {
            (VmState::Running | VmState::Paused, true) => {
                // Adopt: the scratch file and the cache now say what /proc says.
                self.set_handles(&vm, handles)?;
                return self.finish_pause_or_resume(vm).await;
            }
            (VmState::Running | VmState::Paused, false) => (
                VmState::Stopped,
                Some(VmFault::VmmExited),
                format!("vmm exited without a stop request; inspect {}", paths.console_log.display()),
            ),
            // No operation drives this boot any more: bangerd died during it.
            (VmState::Starting, _) => (
                state.apply(Transition::Died).unwrap_or(VmState::Error),
                Some(VmFault::Interrupted),
                "start interrupted: bangerd exited during the operation".to_owned(),
            ),
            (_, _) => (VmState::Stopped, None, String::new()),
        };
        // Tear down what the rediscovered handles name, whatever runs or not.
        self.set_handles(&vm, handles)?;
        self.release_runtime(&vm).await?;
        tracing::info!(
            vm_id = %vm.id,
            vm_name = %vm.name,
            from = state.as_str(),
            to = next.as_str(),
            reason,
            "vm reconciled"
        );
        let last_error = LastError { reason: fault, message: reason };
        let update = VmUpdate { observed_state: Some(next), last_error: Some(last_error), ..Default::default() };
        Ok(self.store.vm_update(&vm, update).await?)
    }

    /// Removes what belongs to no record: VM directories and processes that name a path
    /// under the VMs directory. A VM an operation holds (e.g. being created) is skipped.
    async fn remove_orphans(&self, known: HashSet<VmId>, table: &ProcessTable) -> Result<(), Error> {
        let vms_dir = self.vms_dir();
        let mut candidates: HashSet<VmId> =
            fs::entries_named::<VmId>(&vms_dir).await.into_iter().map(|(id, _)| id).collect();
        let prefix = format!("{}/", vms_dir.display());
        for (_, cmdline) in table.mentioning(&prefix) {
            for part in cmdline.split(&prefix).skip(1) {
                if let Some(id) = part.get(..26).and_then(|id| id.parse::<VmId>().ok()) {
                    candidates.insert(id);
                }
            }
        }
        for id in candidates.into_iter().filter(|id| !known.contains(id)) {
            let lock = self.vm_lock(id);
            let Ok(_guard) = lock.try_lock() else { continue };
            if self.store.vm_get(&id.to_string()).await.is_ok() {
                continue;
            }
            let dir = vms_dir.join(id.to_string());
            let marker = format!("{}/", dir.display());
            for (process, cmdline) in table.mentioning(&marker) {
                tracing::warn!(vm_id = %id, pid = process.pid, cmdline, "killing orphan process");
                self.host.processes.terminate(process, &dir, std::time::Duration::from_secs(1)).await;
            }
            if fs::exists(&dir).await {
                tracing::warn!(vm_id = %id, dir = %dir.display(), "removing orphan vm dir");
                if let Err(error) = fs::remove_dir(&dir).await {
                    tracing::warn!(vm_id = %id, error = %error, "cannot remove orphan vm dir");
                }
            }
            self.forget_vm(id);
        }
        self.remove_orphan_images().await
    }

    /// Removes image directories that belong to no record and to no import under way (an
    /// import whose undo could not remove its copy leaves one).
    async fn remove_orphan_images(&self) -> Result<(), Error> {
        for (id, dir) in fs::entries_named::<crate::domain::ImageId>(&self.images_dir()).await {
            // Checked in this order: an import is registered before its directory exists and
            // unregistered only after its record is.
            if super::lock(&self.importing).contains(&id) {
                continue;
            }
            match self.store.image_get(&id.to_string()).await {
                Ok(_) => continue,
                Err(StoreError::NotFound { .. }) => {}
                Err(error) => return Err(error.into()),
            }
            tracing::warn!(image_id = %id, dir = %dir.display(), "removing orphan image dir");
            if let Err(error) = fs::remove_dir(&dir).await {
                tracing::warn!(image_id = %id, error = %error, "cannot remove orphan image dir");
            }
        }
        // Blobs no image uses (a pull that failed or was killed), and its partial writes;
        // only while no pull runs (the next reconcile gets them otherwise).
        if let Ok(_turn) = self.pull_lock.try_lock() {
            self.collect_blobs(true).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::{path::Path, sync::Arc};

    use super::*;
    use crate::{
        domain::{Image, ImageId, ProcessHandle, VmSpec},
        host::{
            agent_channel::VsockAgentChannels,
            process::ProcFs,
            storage::FileDisks,
            vmm::{Accel, QemuVmm},
            vsock::{VsockBackends, VsockMode},
        },
        ops::{HostServices, OpsConfig},
        store::{NewVmRecord, Store},
    };

    /// Ops over a real SQLite file and a fake `/proc` tree the test writes.
    async fn ops_with_fake_proc() -> (Arc<Ops>, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("proc")).expect("proc");
        let store = Store::open(&dir.path().join("banger.db")).await.expect("store");
        let processes = ProcFs::with_root(dir.path().join("proc"));
        let backends = VsockBackends::new("/nonexistent/vhost-device-vsock".into(), processes.clone());
        let host = HostServices {
            vmm: Arc::new(QemuVmm::new(
                "/nonexistent/qemu".into(),
                Accel::Tcg,
                VsockMode::UserSpace,
                processes.clone(),
                crate::config::DEFAULT_VM_UID_BASE,
            )),
            disks: Arc::new(FileDisks),
            agents: Arc::new(VsockAgentChannels::new(VsockMode::UserSpace, backends)),
            processes: Arc::new(processes),
            network: Arc::new(crate::host::fake::FakeHost::default()),
            block: Arc::new(crate::host::fake::FakeHost::default()),
            limits: Arc::new(crate::host::fake::FakeHost::default()),
        };
        let config = OpsConfig::for_tests(dir.path());
        (Arc::new(Ops::new(store, config, host)), dir)
    }

    /// Writes `/proc/<pid>/{stat,cmdline}` into the fake tree.
    fn fake_process(root: &Path, pid: u32, start_time: u64, cmdline: &[&str]) {
        let dir = root.join("proc").join(pid.to_string());
        std::fs::create_dir_all(&dir).expect("pid dir");
        let mut stat = format!("{pid} (fake proc) S 1 {pid} {pid} 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 ");
        stat.push_str(&format!("{start_time} 1000 100"));
        std::fs::write(dir.join("stat"), stat).expect("stat");
        std::fs::write(dir.join("cmdline"), cmdline.join("\0") + "\0").expect("cmdline");
    }

    async fn running_vm(ops: &Ops, name: &str) -> Vm {
        let image = Image {
            id: ImageId::generate(),
            name: format!("img-{name}"),
            kernel_path: "/k".into(),
            initrd_path: None,
            rootfs_path: "/r".into(),
            kernel_args: String::new(),
            rootfs_size_bytes: 0,
            created_at_ms: 0,
            labels: Default::default(),
            origin: None,
        };
        ops.store.image_insert(&image).await.expect("image");
        let id = VmId::generate();
        let dir = ops.vms_dir().join(id.to_string());
        std::fs::create_dir_all(&dir).expect("vm dir");
        ops.store
            .vm_insert(NewVmRecord {
                id,
                name,
                image_id: image.id,
                spec: VmSpec { vcpus: 1, memory_mib: 256, disk_bytes: 0 },
                desired_state: VmState::Running,
                observed_state: VmState::Running,
                root_disk: crate::domain::RootDiskStrategy::Qcow2,
                ip_pool: None,
                vm_dir: &dir,
                last_operation: "op",
                labels: &Default::default(),
                expire_at_ms: None,
                egress: &Default::default(),
                snapshot_id: None,
            })
            .await
            .expect("vm")
    }

    fn qmp_arg(vm: &Vm) -> String {
        format!("unix:{},server=on,wait=off", vm.paths().api_socket.display())
    }

    #[tokio::test]
    async fn rediscovery_prefers_proc_over_the_scratch_file() {
        let (ops, dir) = ops_with_fake_proc().await;
        let vm = running_vm(&ops, "web").await;
        let stale = ProcessHandle { pid: 100, start_time: 5 };
        scratch::write_handles(&vm.paths().handles, &VmHandles { vmm: Some(stale), ..Default::default() })
            .expect("scratch");
        fake_process(dir.path(), 200, 7, &["qemu-system-x86_64", "-qmp", &qmp_arg(&vm)]);
        let handles = ops.rediscover_handles(&vm, &ops.host.processes.table());
        assert_eq!(handles.vmm, Some(ProcessHandle { pid: 200, start_time: 7 }));
    }

    #[tokio::test]
    async fn rediscovery_returns_the_scratch_contents_of_a_dead_process() {
        let (ops, _dir) = ops_with_fake_proc().await;
        let vm = running_vm(&ops, "web").await;
        let dead = VmHandles {
            vmm: Some(ProcessHandle { pid: 100, start_time: 5 }),
            vsock_backend: Some(ProcessHandle { pid: 101, start_time: 5 }),
            tap: Some("tap-web".into()),
            ..Default::default()
        };
        scratch::write_handles(&vm.paths().handles, &dead).expect("scratch");
        assert_eq!(ops.rediscover_handles(&vm, &ops.host.processes.table()), dead);
    }

    #[tokio::test]
    async fn a_vm_whose_scratch_file_is_gone_is_adopted_through_proc() {
        let (ops, dir) = ops_with_fake_proc().await;
        let vm = running_vm(&ops, "web").await;
        fake_process(dir.path(), 300, 11, &["qemu-system-x86_64", "-qmp", &qmp_arg(&vm)]);
        ops.recover().await.expect("recover");
        let after = ops.store.vm_get("web").await.expect("vm");
        assert_eq!(after.observed_state, VmState::Running);
        assert_eq!(ops.handles(&after).vmm, Some(ProcessHandle { pid: 300, start_time: 11 }));
        assert_eq!(scratch::read_handles(&vm.paths().handles).vmm.map(|h| h.pid), Some(300), "scratch rewritten");
        // Idempotent: a second pass changes nothing.
        ops.recover().await.expect("recover again");
        assert_eq!(ops.store.vm_get("web").await.expect("vm").generation, after.generation);
    }

    #[tokio::test]
    async fn a_recycled_pid_is_never_adopted() {
        let (ops, dir) = ops_with_fake_proc().await;
        let vm = running_vm(&ops, "web").await;
        let recorded = ProcessHandle { pid: 400, start_time: 5 };
        scratch::write_handles(&vm.paths().handles, &VmHandles { vmm: Some(recorded), ..Default::default() })
            .expect("scratch");
        // Same PID, another program; then same PID and program but another start time.
        fake_process(dir.path(), 400, 5, &["sleep", "1000"]);
        assert!(!ops.vm_alive(&vm));
        fake_process(dir.path(), 400, 6, &["qemu-system-x86_64", "-qmp", &qmp_arg(&vm)]);
        assert!(!ops.host.processes.alive(&recorded, &vm.paths().api_socket));
        std::fs::remove_dir_all(dir.path().join("proc/400")).expect("rm");
        fake_process(dir.path(), 400, 5, &["sleep", "1000"]);
        ops.recover().await.expect("recover");
        let after = ops.store.vm_get("web").await.expect("vm");
        assert_eq!(after.observed_state, VmState::Stopped);
        assert_eq!(after.last_error_reason, Some(VmFault::VmmExited), "{}", after.last_error);
        assert!(!vm.paths().handles.exists(), "scratch cleared");
    }

    #[tokio::test]
    async fn orphan_vm_dirs_are_removed_and_recorded_ones_kept() {
        let (ops, _dir) = ops_with_fake_proc().await;
        let vm = running_vm(&ops, "web").await;
        let orphan = ops.vms_dir().join(VmId::generate().to_string());
        std::fs::create_dir_all(&orphan).expect("orphan");
        ops.recover().await.expect("recover");
        assert!(!orphan.exists());
        assert!(vm.vm_dir.exists());
    }

    #[tokio::test]
    async fn the_handle_cache_is_consistent_under_concurrent_access() {
        let (ops, _dir) = ops_with_fake_proc().await;
        let vm = running_vm(&ops, "web").await;
        let mut tasks = Vec::new();
        for pid in 1..=32u32 {
            let (ops, vm) = (ops.clone(), vm.clone());
            tasks.push(tokio::spawn(async move {
                let handles = VmHandles { vmm: Some(ProcessHandle { pid, start_time: 1 }), ..Default::default() };
                ops.set_handles(&vm, handles.clone()).expect("set");
                ops.handles(&vm)
            }));
        }
        for task in tasks {
            assert!(task.await.expect("join").vmm.is_some());
        }
        // Whatever write won, memory and the scratch file agree.
        assert_eq!(ops.handles(&vm), scratch::read_handles(&vm.paths().handles));
    }
}
