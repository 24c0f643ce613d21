//! The stages that boot a recorded VM, shared by `vm.create` and `vm.start`; their undo
//! releases what they made through the one teardown (`teardown.rs`).

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use super::{
    Error, Ops,
    teardown::{Runtime, cgroup_name, nat_tag},
};
use crate::{
    config::NetworkConfig,
    domain::{
        GuestIdentity, GuestNetwork, Image, ProcessHandle, RootDiskStrategy, Snapshot, SnapshotPaths, Vm, VmHandles,
        VmPaths, mac_address, tap_name,
    },
    host::{
        HostError,
        network::GuestRules,
        vmm::{GuestMemory, GuestNic, LaunchSpec, MemorySave},
    },
};

/// How long a guest may take from VMM launch until its agent answers.
const AGENT_READY_TIMEOUT: Duration = Duration::from_secs(90);

/// A stage of booting a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootStage {
    /// Create the copy-on-write root disk (kept across stop/start).
    RootDisk,
    /// Start the guest-agent channel's host side (vsock backend).
    AgentChannel,
    /// Create the VM's tap on the bridge (when VMs get a network).
    Tap,
    /// Install the VM's guest rules: anti-spoofing, host access, egress policy.
    Firewall,
    /// Masquerade the VM's traffic leaving the bridge (when NAT is on).
    Nat,
    /// Launch the VMM process, detached.
    VmmLaunch,
    /// Put the VMM in a cgroup bounding its CPU and memory.
    LimitResources,
    /// Configure the VMM if it needs it, start the guest, and check that it runs.
    VmmBoot,
    /// Load a snapshot's device state into the VMM and let the guest run on from it.
    VmmRestore,
    /// Wait until the guest agent answers.
    WaitAgent,
    /// Tell a restored guest who it is now: hostname, MAC and address, machine-id, clock,
    /// fresh entropy. Its agent serves already (it did when the snapshot was taken), so
    /// this call, asked until the agent answers, is also the wait for it.
    GuestIdentity,
    /// A pool member only: run once what a claim's caller runs first (the agent's identity
    /// call, and one process writing output), so that the guest code on those paths is
    /// translated before a claim needs it (under emulation a path run for the first time
    /// costs tens of milliseconds). Best effort.
    WarmUp,
}

/// The boot stages in order, given how VMs are networked and whether the boot waits for
/// the guest agent; a restore waits for it by setting the guest's identity (a restore that
/// does not wait, of a snapshot taken without an agent, leaves the guest as it was).
pub fn boot_stages(network: Option<&NetworkConfig>, wait_agent: bool, restore: bool, warm_up: bool) -> Vec<BootStage> {
    let mut stages = vec![BootStage::RootDisk, BootStage::AgentChannel];
    if let Some(network) = network {
        stages.extend([BootStage::Tap, BootStage::Firewall]);
        if network.nat {
            stages.push(BootStage::Nat);
        }
    }
    stages.extend([BootStage::VmmLaunch, BootStage::LimitResources]);
    if restore {
        stages.push(BootStage::VmmRestore);
        if wait_agent {
            stages.push(BootStage::GuestIdentity);
        }
    } else {
        stages.push(BootStage::VmmBoot);
        if wait_agent {
            stages.push(BootStage::WaitAgent);
        }
    }
    if warm_up && wait_agent {
        stages.push(BootStage::WarmUp);
    }
    stages
}

impl BootStage {
    /// The stage's logged name.
    pub fn name(self) -> &'static str {
        match self {
            Self::RootDisk => "root_disk",
            Self::AgentChannel => "agent_channel",
            Self::Tap => "tap",
            Self::Firewall => "firewall",
            Self::Nat => "nat",
            Self::VmmLaunch => "vmm_launch",
            Self::LimitResources => "limit_resources",
            Self::VmmBoot => "vmm_boot",
            Self::VmmRestore => "vmm_restore",
            Self::WaitAgent => "wait_agent",
            Self::GuestIdentity => "guest_identity",
            Self::WarmUp => "warm_up",
        }
    }

    /// The log worth reading when this stage fails, as a file name inside the VM dir.
    pub fn evidence_file(self) -> Option<&'static str> {
        match self {
            Self::RootDisk | Self::Tap | Self::Firewall | Self::Nat => None,
            Self::AgentChannel => Some("vsock-backend.log"),
            Self::VmmLaunch | Self::LimitResources | Self::VmmBoot | Self::VmmRestore => Some("vmm.log"),
            Self::WaitAgent | Self::GuestIdentity | Self::WarmUp => Some("console.log"),
        }
    }
}

/// The state of one boot in progress.
#[derive(Debug)]
pub struct Boot {
    /// The VM being booted.
    pub vm: Vm,
    /// Its image.
    pub image: Image,
    created_disk: bool,
    handles: VmHandles,
    /// The VMM joining its cgroup, started by `limit_resources` and awaited by `vmm_boot`.
    confining: Option<tokio::task::JoinHandle<Result<Option<String>, HostError>>>,
    /// Where this boot's output starts in the console log (earlier boots' comes before).
    console_from: u64,
    /// The snapshot the VM is restored from instead of booted.
    restore: Option<Snapshot>,
    /// That snapshot's files.
    restore_files: Option<SnapshotPaths>,
    /// A restore onto a copy of the snapshot's memory, mapped shared (the VM can be
    /// snapshotted again), instead of the snapshot's own file mapped private.
    own_memory: bool,
    /// The image as the VMM boots it: its initramfs this boot's, with the agent's key.
    launch_image: Option<Image>,
}

impl Boot {
    /// A boot of `vm` from `image`, with nothing done yet.
    pub fn new(vm: Vm, image: Image) -> Self {
        Self {
            vm,
            image,
            created_disk: false,
            handles: VmHandles::default(),
            confining: None,
            console_from: 0,
            restore: None,
            restore_files: None,
            own_memory: false,
            launch_image: None,
        }
    }

    /// A restore of `vm` from `snapshot` (taken of a VM booted from `image`).
    pub fn restoring(vm: Vm, image: Image, snapshot: Snapshot) -> Self {
        Self { restore_files: Some(snapshot.paths()), restore: Some(snapshot), ..Self::new(vm, image) }
    }

    /// A restore of `vm` from the snapshot just taken of it: it runs on with a copy of the
    /// snapshot's memory of its own, as it ran before (and can be snapshotted again).
    pub fn resuming(vm: Vm, image: Image, snapshot: Snapshot) -> Self {
        Self { own_memory: true, ..Self::restoring(vm, image, snapshot) }
    }

    /// Runs one stage.
    pub async fn apply(&mut self, ops: &Ops, stage: BootStage) -> Result<(), Error> {
        let paths = self.vm.paths();
        match stage {
            BootStage::RootDisk => {
                // A stopped VM keeps its disk: never recreate (that would wipe it).
                if !crate::host::fs::exists(&paths.root_disk).await {
                    // A restored VM's disk overlays the snapshot's frozen disk.
                    let base = match &self.restore {
                        Some(snapshot) => snapshot.paths().disk,
                        None => self.image.rootfs_path.clone(),
                    };
                    ops.host.disks.create(self.vm.root_disk, &base, &paths.root_disk, self.vm.spec.disk_bytes).await?;
                    self.created_disk = true;
                }
                if self.vm.root_disk == RootDiskStrategy::DmSnapshot {
                    self.make_snapshot(ops).await?;
                }
                // The VM's processes run as its own identity: its dir lets them add files
                // (sockets, the console log) and only root's stay root's; its disk is theirs.
                if let Some(identity) = ops.host.vmm.runs_as(self.vm.vsock_cid) {
                    crate::host::fs::hand_over(&paths, identity).await?;
                    let image = &self.image;
                    let mut files = vec![image.kernel_path.as_path(), image.rootfs_path.as_path()];
                    files.extend(image.initrd_path.as_deref());
                    crate::host::fs::open_to_vms(&files, ops.host.vmm.image_group()).await?;
                }
            }
            BootStage::AgentChannel => {
                let running =
                    self.handles.vsock_backend.is_some_and(|backend| ops.host.processes.alive(&backend, &paths.vsock));
                let identity = ops.host.vmm.runs_as(self.vm.vsock_cid);
                // The agent's key: a new one for a boot, in its initramfs (written while the
                // backend starts: both are on the way to every boot); a restored guest's is its
                // snapshot's until its identity gives it its own.
                let key = async {
                    match &self.restore_files {
                        Some(files) => ops.host.agents.restore_key(&self.vm, &files.agent_key).await.map(|()| None),
                        None => {
                            let initrd = self.image.initrd_path.as_deref();
                            ops.host.agents.new_boot_key(&self.vm, initrd, identity).await
                        }
                    }
                };
                let backend = async {
                    match running {
                        true => Ok(None),
                        false => ops.host.agents.start_backend(self.vm.vsock_cid, &paths, identity).await,
                    }
                };
                let (boot_initrd, backend) = tokio::join!(key, backend);
                // A backend that started is a handle before any error is returned.
                if let Some(backend) = backend? {
                    self.handles.vsock_backend = Some(backend);
                    ops.set_handles(&self.vm, self.handles.clone())?;
                }
                if let Some(initrd) = boot_initrd? {
                    self.launch_image = Some(Image { initrd_path: Some(initrd), ..self.image.clone() });
                }
            }
            BootStage::Tap => {
                let (network, _) = network_of(ops, &self.vm)?;
                ops.host.network.ensure_bridge(&network.bridge, network.pool.gateway(), network.pool.prefix()).await?;
                let tap = tap_name(self.vm.vsock_cid);
                let owner = ops.host.vmm.runs_as(self.vm.vsock_cid).map(|identity| identity.uid);
                ops.host.network.create_tap(&tap, &network.bridge, owner).await?;
                self.handles.tap = Some(tap);
                ops.set_handles(&self.vm, self.handles.clone())?;
            }
            BootStage::Firewall => {
                let (network, ip) = network_of(ops, &self.vm)?;
                let tag = nat_tag(&self.vm);
                let rules = GuestRules {
                    tap: tap_name(self.vm.vsock_cid),
                    mac: mac_address(self.vm.vsock_cid),
                    ip,
                    bridge: network.bridge.clone(),
                    gateway: network.pool.gateway(),
                    egress: self.vm.egress.clone(),
                };
                ops.host.network.add_guest_rules(&tag, &rules).await?;
                self.handles.firewall = Some(tag);
                ops.set_handles(&self.vm, self.handles.clone())?;
            }
            BootStage::Nat => {
                let (network, ip) = network_of(ops, &self.vm)?;
                let tag = nat_tag(&self.vm);
                ops.host.network.add_nat(&tag, ip, &network.bridge).await?;
                self.handles.nat = Some(tag);
                ops.set_handles(&self.vm, self.handles.clone())?;
            }
            BootStage::VmmLaunch
                if self.handles.vmm.is_some_and(|vmm| ops.host.processes.alive(&vmm, &paths.api_socket)) => {}
            BootStage::VmmLaunch => {
                self.console_from = crate::host::fs::file_len(&paths.console_log).await.unwrap_or(0);
                let nic = guest_nic(ops, &self.vm);
                let disk = self.disk(&paths);
                let memory_file = ops.memory_file(&self.vm);
                let in_place = ops.host.vmm.memory_save() == MemorySave::InPlace;
                let memory = match &self.restore_files {
                    // A VMM that writes memory at a save can save a guest running on a
                    // snapshot's memory mapped private: that is how its VMs run on.
                    Some(files) if self.own_memory && in_place => {
                        let owner = ops.host.vmm.runs_as(self.vm.vsock_cid);
                        crate::host::fs::copy_memory_file(&files.memory, &memory_file, owner).await?;
                        GuestMemory::Shared(&memory_file)
                    }
                    Some(files) => GuestMemory::Private(&files.memory),
                    // A VM that may be snapshotted keeps its memory in a file of its own.
                    None if in_place && ops.host.vmm.snapshots_unsupported().is_none() => {
                        let owner = ops.host.vmm.runs_as(self.vm.vsock_cid);
                        let bytes = u64::from(self.vm.spec.memory_mib) << 20;
                        crate::host::fs::create_memory_file(&memory_file, bytes, owner).await?;
                        GuestMemory::Shared(&memory_file)
                    }
                    None => GuestMemory::Anonymous,
                };
                let mut launch = self.launch_spec(&paths, &disk, nic.as_ref());
                launch.memory = memory;
                // A disk over a snapshot's (restored, or snapshotted itself) reads the
                // files of that snapshot and of those under it: the VMM gets their groups.
                let groups = match self.restore.as_ref().map(|s| s.id).or(self.vm.snapshot_id) {
                    Some(id) => ops.snapshot_groups(id).await?,
                    None => Vec::new(),
                };
                launch.extra_groups = &groups;
                tracing::debug!(vm_id = %self.vm.id, vmm = ops.host.vmm.name(), "launching the vmm");
                let vmm = ops.host.vmm.launch(&launch).await?;
                tracing::debug!(vm_id = %self.vm.id, pid = vmm.pid, "vmm launched");
                self.handles.vmm = Some(vmm);
                ops.set_handles(&self.vm, self.handles.clone())?;
            }
            // Moving a process into a cgroup waits for the kernel (on cgroup v1, an RCU grace
            // period: 4–12 ms on this class of host). The VMM is paused and setting itself up
            // meanwhile, so the move runs beside that, and `vmm_boot` waits for it before the
            // guest starts: confined from its first instruction, at no cost on the way.
            BootStage::LimitResources if self.confining.is_some() => {}
            BootStage::LimitResources => {
                let vmm = self.vmm_handle()?;
                let (limits, group, spec) = (ops.host.limits.clone(), cgroup_name(&self.vm), self.vm.spec);
                // The vsock backend too: it serves the guest, so it is bounded with it.
                let processes: Vec<_> = std::iter::once(vmm).chain(self.handles.vsock_backend).collect();
                // An unclaimed pool member boots (and idles) as background work: a claimed
                // VM's first commands never wait for its replacement's boot.
                let background = self.vm.labels.contains_key(crate::domain::POOL_LABEL);
                self.confining = Some(tokio::spawn(async move {
                    let confined = limits.confine(&group, spec, &processes).await?;
                    if background && confined.is_some() {
                        limits.set_background(&group, true).await?;
                    }
                    Ok(confined)
                }));
            }
            BootStage::VmmBoot | BootStage::VmmRestore => {
                if let Some(confining) = self.confining.take() {
                    let joined = confining.await.map_err(|e| HostError::Io {
                        what: "confine the vmm".into(),
                        source: std::io::Error::other(e),
                    })?;
                    self.handles.cgroup = joined?;
                    ops.set_handles(&self.vm, self.handles.clone())?;
                }
                let vmm = self.vmm_handle()?;
                let nic = guest_nic(ops, &self.vm);
                let disk = self.disk(&paths);
                ops.host.vmm.boot(&self.launch_spec(&paths, &disk, nic.as_ref()), &vmm).await?;
            }
            BootStage::WaitAgent | BootStage::GuestIdentity => {
                let vmm = self.vmm_handle()?;
                let host = &ops.host;
                let still_booting =
                    || host.processes.alive(&vmm, &paths.api_socket) && !host.agents.backend_failed(&paths);
                let deadline = tokio::time::Instant::now() + AGENT_READY_TIMEOUT;
                match stage {
                    BootStage::GuestIdentity => {
                        let identity = new_identity(ops, &self.vm);
                        host.agents.wait_set_identity(&self.vm, &identity, deadline, &still_booting).await?;
                    }
                    _ => host.agents.wait_ready(&self.vm, self.console_from, deadline, &still_booting).await?,
                }
            }
            BootStage::WarmUp => {
                if let Err(error) = tokio::time::timeout(WARM_UP_LIMIT, warm_up(ops, &self.vm, &self.image)).await {
                    tracing::warn!(vm_id = %self.vm.id, error = %error, "pool member warm-up took too long");
                }
            }
        }
        Ok(())
    }

    /// Undoes one completed stage: releases what it made, through the one teardown
    /// ([`Ops::tear_down`]). What cannot be released stays a handle, in the scratch file, for
    /// reconcile to retry; the error says what failed. Running it twice changes nothing more.
    pub async fn undo(&mut self, ops: &Ops, stage: BootStage) -> Result<(), Error> {
        let paths = self.vm.paths();
        let parts: &[Runtime] = match stage {
            // The snapshot goes before its loops, and they before the file under them.
            BootStage::RootDisk => &[Runtime::Snapshot, Runtime::Loops],
            // The VM's group holds the vsock backend too: it goes once both processes went.
            BootStage::AgentChannel => &[Runtime::VsockBackend, Runtime::Cgroup],
            BootStage::Tap => &[Runtime::Tap],
            BootStage::Firewall => &[Runtime::Firewall],
            BootStage::Nat => &[Runtime::Nat],
            // A jailed VMM is in its group before `limit_resources` runs; the group goes
            // with the vsock backend, in `agent_channel`'s undo.
            BootStage::VmmLaunch => &[Runtime::Vmm, Runtime::Jail, Runtime::Sockets],
            BootStage::LimitResources => {
                if let Some(confining) = self.confining.take()
                    && let Ok(Ok(group)) = confining.await
                {
                    self.handles.cgroup = group;
                }
                // The group goes in `agent_channel`'s undo: it holds the vsock backend too.
                &[Runtime::Vmm]
            }
            BootStage::VmmBoot
            | BootStage::VmmRestore
            | BootStage::WaitAgent
            | BootStage::GuestIdentity
            | BootStage::WarmUp => &[],
        };
        let released = ops.tear_down(&self.vm, &mut self.handles, parts).await;
        ops.set_handles(&self.vm, self.handles.clone())?;
        released?;
        if stage == BootStage::RootDisk && self.created_disk && self.handles.cow_loop.is_none() {
            crate::host::fs::remove_file(&paths.root_disk).await?;
            self.created_disk = false;
        }
        Ok(())
    }

    /// Makes the VM's dm-snapshot: a read-only loop over the image, a loop over the VM's
    /// exception store, the snapshot over both. Each device is a handle as soon as it exists;
    /// one already made by an earlier attempt is kept.
    async fn make_snapshot(&mut self, ops: &Ops) -> Result<(), Error> {
        let paths = self.vm.paths();
        if self.handles.base_loop.is_none() {
            self.handles.base_loop = Some(ops.host.block.attach_loop(&self.image.rootfs_path, true).await?);
            ops.set_handles(&self.vm, self.handles.clone())?;
        }
        if self.handles.cow_loop.is_none() {
            self.handles.cow_loop = Some(ops.host.block.attach_loop(&paths.root_disk, false).await?);
            ops.set_handles(&self.vm, self.handles.clone())?;
        }
        if let (None, Some(base), Some(cow)) = (&self.handles.dm_name, &self.handles.base_loop, &self.handles.cow_loop)
        {
            let name = RootDiskStrategy::dm_name(self.vm.id);
            let sectors = crate::host::fs::file_len(&self.image.rootfs_path).await? / 512;
            let device = ops.host.block.create_snapshot(&name, base, cow, sectors).await?;
            (self.handles.dm_name, self.handles.dm_device) = (Some(name), Some(device));
            ops.set_handles(&self.vm, self.handles.clone())?;
        }
        Ok(())
    }

    /// What the guest boots from: the snapshot's device, or the disk file.
    fn disk(&self, paths: &VmPaths) -> PathBuf {
        match &self.handles.dm_device {
            Some(device) => PathBuf::from(device),
            None => paths.root_disk.clone(),
        }
    }

    fn launch_spec<'a>(&'a self, paths: &'a VmPaths, disk: &'a Path, nic: Option<&'a GuestNic>) -> LaunchSpec<'a> {
        LaunchSpec {
            id: self.vm.id,
            name: &self.vm.name,
            paths,
            spec: self.vm.spec,
            image: self.launch_image.as_ref().unwrap_or(&self.image),
            vsock_cid: self.vm.vsock_cid,
            disk,
            disk_format: self.vm.root_disk.format(),
            nic,
            memory: GuestMemory::Anonymous,
            restore_from: self.restore_files.as_ref().map(|files| files.state.as_path()),
            extra_groups: &[],
        }
    }

    fn vmm_handle(&self) -> Result<ProcessHandle, Error> {
        self.handles.vmm.ok_or(Error::StageOrder { needs: "the vmm" })
    }

    /// The log to point at when `stage` fails.
    pub fn evidence(&self, stage: BootStage) -> Option<PathBuf> {
        stage.evidence_file().map(|file| self.vm.vm_dir.join(file))
    }
}

/// The VM's network interface, when VMs get a network.
fn guest_nic(ops: &Ops, vm: &Vm) -> Option<GuestNic> {
    let (network, ip) = network_of(ops, vm).ok()?;
    Some(GuestNic {
        tap: tap_name(vm.vsock_cid),
        mac: mac_address(vm.vsock_cid),
        address: format!("{ip}/{}", network.pool.prefix()),
        gateway: network.pool.gateway().to_string(),
        nameserver: network.dns.then(|| network.pool.gateway().to_string()),
    })
}

/// The longest a pool member's warm-up may take.
const WARM_UP_LIMIT: Duration = Duration::from_secs(10);

/// A pool member's warm-up: its own hostname set again, then `echo` run as an exec of the
/// member's image runs; a failure is logged, not fatal (an image may have no `echo`).
async fn warm_up(ops: &Ops, vm: &Vm, image: &Image) {
    use tokio_stream::StreamExt;
    if let Err(error) = ops.host.agents.set_identity(vm, &GuestIdentity::hostname(&vm.name)).await {
        tracing::warn!(vm_id = %vm.id, error = %error, "pool member warm-up: set identity");
    }
    let command = crate::domain::ExecCommand {
        argv: vec!["echo".into(), "banger pool member ready".into()],
        ..Default::default()
    };
    let command = super::exec_vm::with_image_defaults(command, image.config());
    let ran = async {
        let mut events = ops.host.agents.exec(vm, command, Box::pin(tokio_stream::empty())).await?;
        while let Some(event) = events.next().await {
            if let crate::domain::ExecEvent::Exit { status, .. } = event? {
                return Ok::<_, HostError>(Some(status));
            }
        }
        Ok(None)
    };
    match ran.await {
        Ok(Some(crate::domain::ExitStatus::Code(0))) => {}
        Ok(status) => tracing::warn!(vm_id = %vm.id, ?status, "pool member warm-up: echo did not succeed"),
        Err(error) => tracing::warn!(vm_id = %vm.id, error = %error, "pool member warm-up: exec"),
    }
}

/// Who a restored guest is now: its record's name and address, a new machine-id, the
/// host's clock, and fresh entropy (its kernel's random state is every clone's).
fn new_identity(ops: &Ops, vm: &Vm) -> GuestIdentity {
    let mut machine_id = [0u8; 16];
    let mut entropy = vec![0u8; 64];
    // getrandom fails only on a broken kernel; zeros then still get mixed with the clock.
    let _ = getrandom::fill(&mut machine_id);
    let _ = getrandom::fill(&mut entropy);
    GuestIdentity {
        hostname: vm.name.clone(),
        network: guest_nic(ops, vm).map(|nic| GuestNetwork {
            mac: nic.mac,
            address: nic.address,
            gateway: nic.gateway,
        }),
        machine_id: Some(hex::encode(machine_id)),
        realtime_ns: Some(ops.clock().now_ms().saturating_mul(1_000_000)),
        entropy,
    }
}

/// The network config and the VM's address, or why the VM has no network.
fn network_of<'a>(ops: &'a Ops, vm: &Vm) -> Result<(&'a NetworkConfig, std::net::Ipv4Addr), Error> {
    match (&ops.config.network, vm.ip) {
        (Some(network), Some(ip)) => Ok((network, ip)),
        _ => Err(Error::NoNetworkAddress { vm: vm.name.clone() }),
    }
}
