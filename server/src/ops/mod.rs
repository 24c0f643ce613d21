//! Use cases, one module each. Every mutating one is an [`runner::Operation`]: named
//! stages with undo, run by the one runner, serialized per VM.

mod admission;
mod boot;
mod create_vm;
mod delete_vm;
mod error;
mod exec_vm;
mod images;
mod pause_vm;
mod pools;
mod pull_image;
mod queries;
mod reaper;
mod recover;
pub mod runner;
mod snapshots;
#[cfg(test)]
mod stage_tests;
mod start_vm;
mod stop_vm;
mod teardown;

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, Mutex},
};

/// Where a container image comes from (defined with the code that reads it).
pub use crate::host::oci::{ProgressFn, Source as ImageSource};
pub use admission::{Capacity, Exhausted};
pub use create_vm::CreateVm;
pub use error::{Error, FieldViolation};
pub use exec_vm::{ExecOutput, LogOutput, VmLog};
pub use pools::{NewPool, PoolMember};
pub use pull_image::{AGENT_INIT_ARGS, NewOciImage};
pub use snapshots::{SnapshotInfo, TakeSnapshot};

use crate::{
    domain::{Vm, VmHandles, VmId},
    host::{
        agent_channel::AgentChannels, block::BlockDevices, cgroup::ResourceLimits, network::Network,
        process::Processes, scratch, storage::RootDisks, vmm::Vmm,
    },
    store::Store,
};

/// Where the daemon keeps its files and which image is the default.
#[derive(Debug, Clone)]
pub struct OpsConfig {
    /// Root of the daemon's state: database, images, VM directories.
    pub state_dir: PathBuf,
    /// Name of the image used when a create names none.
    pub default_image: String,
    /// Directory holding `vmlinuz`, `initrd.img` and `rootfs.ext4` of the default image,
    /// imported under `default_image` on first use.
    pub default_image_dir: PathBuf,
    /// How new VMs' root disks are made.
    pub root_disk: crate::domain::RootDiskStrategy,
    /// VM networking, when configured.
    pub network: Option<crate::config::NetworkConfig>,
    /// What `banger doctor` checks (`None` in tests that never ask).
    pub doctor: Option<crate::host::doctor::DoctorInputs>,
    /// The smallest root file system made for a container image (it is sparse: room costs
    /// nothing until the guest writes).
    pub min_rootfs_bytes: u64,
    /// How to reach registries.
    pub registry: crate::host::oci::registry::RegistryConfig,
    /// What the host gives VMs.
    pub capacity: Capacity,
    /// Each VM log (console, VMM, vsock backend) is kept under this size.
    pub max_log_bytes: u64,
    /// Imports read host files only beneath these directories; `None`: anywhere.
    pub import_roots: Option<Vec<PathBuf>>,
    /// Where the memory of VMs that may be snapshotted lives while they run (a tmpfs).
    pub memory_dir: PathBuf,
    /// The shape of a create that leaves it unset.
    pub vm_defaults: crate::domain::VmDefaults,
}

#[cfg(test)]
impl OpsConfig {
    /// A config for tests: state under `dir`, no default image, qcow2 disks, no network.
    pub(crate) fn for_tests(dir: &std::path::Path) -> Self {
        Self {
            state_dir: dir.join("state"),
            default_image: "default".into(),
            default_image_dir: dir.join("none"),
            memory_dir: dir.join("memory"),
            root_disk: crate::domain::RootDiskStrategy::Qcow2,
            network: None,
            doctor: None,
            min_rootfs_bytes: 64 * 1024 * 1024,
            registry: Default::default(),
            capacity: Capacity::default(),
            max_log_bytes: 16 << 20,
            import_roots: None,
            vm_defaults: crate::domain::VmDefaults::default(),
        }
    }
}

/// The host capabilities the use cases drive, each behind a trait so that `ops` tests run
/// against a stateful fake host.
#[derive(Debug, Clone)]
pub struct HostServices {
    /// The VMM.
    pub vmm: Arc<dyn Vmm>,
    /// Copy-on-write root disks.
    pub disks: Arc<dyn RootDisks>,
    /// The guest-agent channel.
    pub agents: Arc<dyn AgentChannels>,
    /// Process liveness and termination.
    pub processes: Arc<dyn Processes>,
    /// Taps and other network plumbing.
    pub network: Arc<dyn Network>,
    /// Loop devices and device-mapper snapshots.
    pub block: Arc<dyn BlockDevices>,
    /// cgroups bounding VMM processes.
    pub limits: Arc<dyn ResourceLimits>,
}

/// The daemon's core: the store, the host, and the in-memory cache of transient handles.
#[derive(Debug)]
pub struct Ops {
    store: Store,
    config: OpsConfig,
    host: HostServices,
    handles: std::sync::RwLock<HashMap<VmId, VmHandles>>,
    /// Set once a reconcile has read every VM's scratch file into `handles`: from then on a
    /// VM absent from it holds nothing, and no read goes to the disk to be told so.
    handles_complete: std::sync::atomic::AtomicBool,
    vm_locks: Mutex<HashMap<VmId, Arc<tokio::sync::Mutex<()>>>>,
    run_options: Mutex<runner::RunOptions>,
    default_image_lock: tokio::sync::Mutex<()>,
    /// What creates and starts under way take, until they end.
    reservations: Mutex<admission::Reservations>,
    /// Held by a container image's pull or import, and by blob collection.
    pull_lock: tokio::sync::Mutex<()>,
    /// Images whose import is under way: their directories are not orphans.
    importing: Mutex<std::collections::HashSet<crate::domain::ImageId>>,
    /// Set when the daemon stops serving: long-lived calls (watches, waits) end.
    stopping: tokio::sync::watch::Sender<bool>,
    /// Wakes the pool refiller: a pool was made, a member claimed or booted.
    pools_changed: tokio::sync::Notify,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of these plain maps leaves them consistent: recover.
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Reads the handle cache: every list page and liveness check does, side by side.
fn read<T>(lock: &std::sync::RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn write<T>(lock: &std::sync::RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Ops {
    /// The core over an opened store.
    pub fn new(store: Store, config: OpsConfig, host: HostServices) -> Self {
        Self {
            store,
            config,
            host,
            handles: std::sync::RwLock::default(),
            handles_complete: std::sync::atomic::AtomicBool::new(false),
            vm_locks: Mutex::default(),
            run_options: Mutex::default(),
            default_image_lock: tokio::sync::Mutex::new(()),
            reservations: Mutex::default(),
            pull_lock: tokio::sync::Mutex::new(()),
            importing: Mutex::default(),
            stopping: tokio::sync::watch::Sender::new(false),
            pools_changed: tokio::sync::Notify::new(),
        }
    }

    /// Waits until a pool changed (or `timeout` passed): when the refiller looks again.
    pub async fn pools_changed(&self, timeout: std::time::Duration) {
        let _ = tokio::time::timeout(timeout, self.pools_changed.notified()).await;
    }

    /// Tells long-lived calls (watches, waits) that the daemon stops serving.
    pub fn stop_serving(&self) {
        self.stopping.send_replace(true);
    }

    /// Completes once the daemon stops serving.
    pub fn stopped_serving(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut stopping = self.stopping.subscribe();
        async move {
            let _ = stopping.wait_for(|stop| *stop).await;
        }
    }

    /// Runs later operations with `options` (for tests).
    #[cfg(test)]
    pub(crate) fn set_run_options(&self, options: runner::RunOptions) {
        *lock(&self.run_options) = options;
    }

    /// How operations run now.
    fn run_options(&self) -> runner::RunOptions {
        let options = lock(&self.run_options).clone();
        runner::RunOptions { observer: Some(Arc::new(self.store.clone())), ..options }
    }

    /// The VMM's short name.
    pub fn vmm_name(&self) -> &'static str {
        self.host.vmm.name()
    }

    /// What this host supports and which drivers the daemon uses.
    pub async fn host_report(&self) -> Result<(Vec<crate::host::doctor::Check>, crate::host::doctor::Choices), Error> {
        let inputs = self.config.doctor.as_ref().ok_or(Error::NotConfigured { what: "host checks" })?;
        Ok(crate::host::doctor::diagnose(inputs).await)
    }

    /// The shape a create gets for what it leaves unset.
    pub fn vm_defaults(&self) -> crate::domain::VmDefaults {
        self.config.vm_defaults
    }

    /// The log of idempotent requests (for `api`'s idempotency).
    pub fn request_log(&self) -> crate::store::RequestLog {
        self.store.request_log()
    }

    /// The log of VM events (for `api`'s watches).
    pub fn event_log(&self) -> crate::store::EventLog {
        self.store.event_log()
    }

    /// What "now" is: the system's clock, or a test's.
    pub fn clock(&self) -> &crate::clock::Clock {
        self.store.clock()
    }

    /// Closes the database (once the daemon stops serving).
    pub async fn close(&self) {
        self.store.close().await;
    }

    fn vms_dir(&self) -> PathBuf {
        self.config.state_dir.join("vms")
    }

    fn images_dir(&self) -> PathBuf {
        self.config.state_dir.join("images")
    }

    fn snapshots_dir(&self) -> PathBuf {
        self.config.state_dir.join("snapshots")
    }

    /// The file a VM's guest memory lives in while it runs, when it may be snapshotted:
    /// derived from its id alone, so that teardown finds it without a handle.
    fn memory_file(&self, vm: &Vm) -> PathBuf {
        self.config.memory_dir.join(vm.id.to_string())
    }

    /// The lock that serializes operations on one VM.
    fn vm_lock(&self, id: VmId) -> Arc<tokio::sync::Mutex<()>> {
        lock(&self.vm_locks).entry(id).or_default().clone()
    }

    fn forget_vm(&self, id: VmId) {
        lock(&self.vm_locks).remove(&id);
        write(&self.handles).remove(&id);
        self.host.agents.forget(id);
    }

    /// The VM's transient handles: the cache, else (until every scratch file has been read
    /// once) its scratch file.
    pub fn handles(&self, vm: &Vm) -> VmHandles {
        if let Some(handles) = read(&self.handles).get(&vm.id) {
            return handles.clone();
        }
        if self.handles_complete.load(std::sync::atomic::Ordering::Acquire) {
            return VmHandles::default();
        }
        scratch::read_handles(&vm.paths().handles)
    }

    /// Records handles: scratch file first, so that a crash never loses a process. The cache
    /// lock is held across both writes so that memory and file never disagree.
    fn set_handles(&self, vm: &Vm, handles: VmHandles) -> Result<(), Error> {
        let path = vm.paths().handles;
        let mut cache = write(&self.handles);
        if handles.is_empty() {
            scratch::remove_handles(&path);
            cache.remove(&vm.id);
        } else {
            scratch::write_handles(&path, &handles)?;
            cache.insert(vm.id, handles);
        }
        Ok(())
    }

    /// The one liveness check: the VMM process named by the handles still runs this VM.
    pub fn vm_alive(&self, vm: &Vm) -> bool {
        self.handles(vm).vmm.is_some_and(|vmm| self.host.processes.alive(&vmm, &vm.paths().api_socket))
    }
}
