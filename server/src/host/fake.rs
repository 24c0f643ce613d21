//! A stateful fake host for `ops` tests and, with the `testing` feature, the in-process API
//! tests: processes, disks and guest agents modelled in memory, enforcing the rules the real
//! host has (or that banger must never break), and able to fail any capability call on
//! demand. Tests assert on the resulting state.
//!
//! Its guests run a few commands, as a shell would: `echo ARGS`, `cat` (standard input to
//! standard output), `true`, `false`, `exit N`, `hostname` (the VM's name); anything else
//! exits 127 saying so on standard error. Their files live in memory, per VM.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::time::Instant;

use super::{
    HostError,
    agent_channel::{AgentChannels, ExecInputStream, ExecStarting},
    block::BlockDevices,
    cgroup::ResourceLimits,
    network::Network,
    process::{ProcessTable, Processes},
    storage::RootDisks,
    vmm::{LaunchSpec, Vmm},
};
use crate::{
    domain::{ProcessHandle, Vm, VmId, VmPaths, VmSpec},
    ops::HostServices,
};

#[derive(Debug, Default)]
struct State {
    next_pid: u32,
    /// pid -> (start time, command line)
    processes: BTreeMap<u32, (u64, String)>,
    disks: BTreeSet<PathBuf>,
    taps: BTreeSet<String>,
    loops: BTreeSet<String>,
    /// loop devices attached so far (names are never reused, so a stale handle is caught)
    next_loop: usize,
    /// device-mapper name -> the loop devices it sits on
    dms: BTreeMap<String, Vec<String>>,
    cgroups: BTreeSet<String>,
    nat: BTreeSet<String>,
    firewall: BTreeSet<String>,
    /// capability call -> failures still to inject
    failures: HashMap<&'static str, usize>,
    /// (vm, path) -> (mode, content): the guests' files
    guest_files: BTreeMap<(VmId, String), (u32, Vec<u8>)>,
    /// api sockets of VMMs whose vCPUs are stopped
    paused: BTreeSet<PathBuf>,
    /// api sockets of VMMs whose state was saved (they run no guest any more)
    spent: BTreeSet<PathBuf>,
    /// the identity each guest was last told
    identities: BTreeMap<VmId, crate::domain::GuestIdentity>,
    /// saves write guest memory, as Firecracker's do, instead of leaving it in its file
    memory_written: bool,
}

/// The fake host; clones share state.
#[derive(Debug, Clone, Default)]
pub struct FakeHost {
    state: Arc<Mutex<State>>,
}

fn injected(call: &'static str) -> HostError {
    HostError::Injected { call }
}

impl FakeHost {
    /// The capabilities, all backed by this fake.
    pub fn services(&self) -> HostServices {
        HostServices {
            vmm: Arc::new(self.clone()),
            disks: Arc::new(self.clone()),
            agents: Arc::new(self.clone()),
            processes: Arc::new(self.clone()),
            network: Arc::new(self.clone()),
            block: Arc::new(self.clone()),
            limits: Arc::new(self.clone()),
        }
    }

    /// The identity the guest of `vm` was last told, if any.
    pub fn identity_of(&self, vm: VmId) -> Option<crate::domain::GuestIdentity> {
        self.state().identities.get(&vm).cloned()
    }

    /// Stops the vCPUs of the VMM serving `paths`, as a crash in the middle of an operation
    /// would leave them.
    pub fn pause_for_tests(&self, paths: &VmPaths) {
        self.state().paused.insert(paths.api_socket.clone());
    }

    /// Makes the fake's VMM save as Firecracker does: guests run on memory of their own
    /// (or a snapshot's, mapped private), and a save writes it to a file.
    pub fn write_memory_on_save(&self) {
        self.state().memory_written = true;
    }

    /// Whether the VMM serving `paths` has its vCPUs stopped.
    pub fn is_paused(&self, paths: &VmPaths) -> bool {
        self.state().paused.contains(&paths.api_socket)
    }

    fn set_paused(&self, paths: &VmPaths, paused: bool) -> Result<(), HostError> {
        // Rule: only a live VMM answers.
        if self.live_mentioning(&paths.api_socket).is_empty() {
            return Err(HostError::FakeRule { rule: format!("no vmm serves {}", paths.api_socket.display()) });
        }
        let mut state = self.state();
        match paused {
            true => state.paused.insert(paths.api_socket.clone()),
            false => state.paused.remove(&paths.api_socket),
        };
        Ok(())
    }

    /// NAT rule tags that exist.
    pub fn nat_rules(&self) -> Vec<String> {
        self.state().nat.iter().cloned().collect()
    }

    /// The tags of the guest rules installed.
    pub fn guest_rules(&self) -> Vec<String> {
        self.state().firewall.iter().cloned().collect()
    }

    /// cgroups that exist.
    pub fn cgroups(&self) -> Vec<String> {
        self.state().cgroups.iter().cloned().collect()
    }

    /// Creates kernel-level state as a VM's storage and network would: a tap, two loop
    /// devices and a snapshot over them. Returns the handles naming them.
    pub fn plumb(&self, vm_name: &str) -> crate::domain::VmHandles {
        let mut state = self.state();
        let (tap, base, cow, dm) = (
            format!("tap-{vm_name}"),
            format!("/dev/loop-{vm_name}-base"),
            format!("/dev/loop-{vm_name}-cow"),
            format!("banger-{vm_name}"),
        );
        state.taps.insert(tap.clone());
        state.loops.insert(base.clone());
        state.loops.insert(cow.clone());
        state.dms.insert(dm.clone(), vec![base.clone(), cow.clone()]);
        crate::domain::VmHandles {
            tap: Some(tap),
            base_loop: Some(base),
            cow_loop: Some(cow),
            dm_device: Some(format!("/dev/mapper/{dm}")),
            dm_name: Some(dm),
            ..Default::default()
        }
    }

    /// Taps, loop devices and device-mapper devices that exist.
    pub fn kernel_state(&self) -> (Vec<String>, Vec<String>, Vec<String>) {
        let state = self.state();
        (
            state.taps.iter().cloned().collect(),
            state.loops.iter().cloned().collect(),
            state.dms.keys().cloned().collect(),
        )
    }

    /// Spawns a fake process with this command line.
    pub fn spawn_process(&self, cmdline: &str) -> ProcessHandle {
        self.spawn(cmdline.to_owned())
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Makes the next call of `call` (e.g. `vmm.launch`) fail.
    pub fn fail_next(&self, call: &'static str) {
        *self.state().failures.entry(call).or_default() += 1;
    }

    fn check(&self, call: &'static str) -> Result<(), HostError> {
        let mut state = self.state();
        match state.failures.get_mut(call) {
            Some(n) if *n > 0 => {
                *n -= 1;
                Err(injected(call))
            }
            _ => Ok(()),
        }
    }

    fn spawn(&self, cmdline: String) -> ProcessHandle {
        let mut state = self.state();
        state.next_pid += 1;
        let pid = 1000 + state.next_pid;
        let start_time = u64::from(pid) * 10;
        state.processes.insert(pid, (start_time, cmdline));
        ProcessHandle { pid, start_time }
    }

    fn live_mentioning(&self, marker: &Path) -> Vec<ProcessHandle> {
        let marker = marker.to_string_lossy();
        self.state()
            .processes
            .iter()
            .filter(|(_, (_, cmdline))| cmdline.contains(marker.as_ref()))
            .map(|(pid, (start_time, _))| ProcessHandle { pid: *pid, start_time: *start_time })
            .collect()
    }

    /// Command lines of every live process.
    pub fn processes(&self) -> Vec<String> {
        self.state().processes.values().map(|(_, cmdline)| cmdline.clone()).collect()
    }

    /// Live processes whose command line mentions `dir`.
    pub fn processes_under(&self, dir: &Path) -> Vec<String> {
        let dir = dir.to_string_lossy();
        self.processes().into_iter().filter(|c| c.contains(dir.as_ref())).collect()
    }

    /// Disks created and not removed from disk since.
    pub fn disks(&self) -> Vec<PathBuf> {
        self.state().disks.iter().filter(|d| d.exists()).cloned().collect()
    }

    fn kill(&self, pid: u32) {
        self.state().processes.remove(&pid);
    }
}

#[tonic::async_trait]
impl Vmm for FakeHost {
    fn name(&self) -> &'static str {
        "fake"
    }

    async fn launch(&self, launch: &LaunchSpec<'_>) -> Result<ProcessHandle, HostError> {
        self.check("vmm.launch")?;
        let paths = launch.paths;
        // Rule: one VMM per VM, ever. Two would share a disk.
        if !self.live_mentioning(&paths.api_socket).is_empty() {
            return Err(HostError::FakeRule { rule: format!("a vmm already serves {}", paths.api_socket.display()) });
        }
        self.state().paused.remove(&paths.api_socket);
        self.state().spent.remove(&paths.api_socket);
        // Rule: a restore maps the snapshot's memory and reads its state; a VM that may be
        // snapshotted has its own memory file.
        match launch.memory {
            super::vmm::GuestMemory::Private(file) | super::vmm::GuestMemory::Shared(file) if !file.is_file() => {
                return Err(HostError::FakeRule { rule: format!("no memory file {}", file.display()) });
            }
            _ => {}
        }
        // Rule: a VMM that writes memory at a save is never given a memory file to share.
        if self.state().memory_written && matches!(launch.memory, super::vmm::GuestMemory::Shared(_)) {
            return Err(HostError::FakeRule { rule: "this vmm keeps guest memory of its own".into() });
        }
        if let Some(state) = launch.restore_from
            && !state.is_file()
        {
            return Err(HostError::FakeRule { rule: format!("no state file {}", state.display()) });
        }
        Ok(self.spawn(format!(
            "qemu-system-x86_64 -qmp unix:{},server=on -chardev socket,path={} -drive file={}",
            paths.api_socket.display(),
            paths.vhost_user_socket.display(),
            paths.root_disk.display()
        )))
    }

    async fn boot(&self, launch: &LaunchSpec<'_>, vmm: &ProcessHandle) -> Result<(), HostError> {
        self.check("vmm.boot")?;
        let paths = launch.paths;
        if !Processes::alive(self, vmm, &paths.api_socket) {
            return Err(HostError::ProcessExited { process: "qemu", detail: None, log: paths.vmm_log.clone() });
        }
        Ok(())
    }

    async fn power_down(&self, paths: &VmPaths) -> Result<(), HostError> {
        self.check("vmm.power_down")?;
        for vmm in self.live_mentioning(&paths.api_socket) {
            self.kill(vmm.pid);
        }
        Ok(())
    }

    async fn pause(&self, paths: &VmPaths) -> Result<(), HostError> {
        self.check("vmm.pause")?;
        self.set_paused(paths, true)
    }

    async fn resume(&self, paths: &VmPaths) -> Result<(), HostError> {
        self.check("vmm.resume")?;
        self.state().spent.remove(&paths.api_socket);
        self.set_paused(paths, false)
    }

    fn snapshots_unsupported(&self) -> Option<String> {
        None
    }

    fn memory_save(&self) -> super::vmm::MemorySave {
        let memory_written = self.state().memory_written;
        match memory_written {
            true => super::vmm::MemorySave::Written,
            false => super::vmm::MemorySave::InPlace,
        }
    }

    async fn save(&self, paths: &VmPaths, state_file: &Path, memory_file: &Path) -> Result<(), HostError> {
        self.check("vmm.save")?;
        // Rule: only a paused guest is saved.
        if !self.is_paused(paths) {
            return Err(HostError::FakeRule { rule: format!("{} is not paused", paths.api_socket.display()) });
        }
        let write = |file: &Path, content: &[u8]| {
            std::fs::write(file, content).map_err(|source| HostError::File {
                action: "write",
                path: file.to_owned(),
                source,
            })
        };
        write(state_file, b"device state")?;
        // A VMM that writes memory runs on after its save (Firecracker's does).
        let memory_written = self.state().memory_written;
        match memory_written {
            true => write(memory_file, b"guest memory")?,
            false => drop(self.state().spent.insert(paths.api_socket.clone())),
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl RootDisks for FakeHost {
    async fn create(
        &self,
        _strategy: crate::domain::RootDiskStrategy,
        base: &Path,
        disk: &Path,
        _size: u64,
    ) -> Result<(), HostError> {
        self.check("disks.create")?;
        // Rule: never overwrite a disk; that would wipe a stopped VM's data.
        if disk.exists() {
            return Err(HostError::FakeRule { rule: format!("{} exists", disk.display()) });
        }
        if !base.is_file() {
            return Err(HostError::FakeRule { rule: format!("no base {}", base.display()) });
        }
        std::fs::write(disk, b"overlay").map_err(|source| HostError::File {
            action: "write",
            path: disk.to_owned(),
            source,
        })?;
        self.state().disks.insert(disk.to_owned());
        Ok(())
    }
}

#[tonic::async_trait]
impl AgentChannels for FakeHost {
    async fn start_backend(
        &self,
        cid: u32,
        paths: &VmPaths,
        _identity: Option<crate::host::confine::VmIdentity>,
    ) -> Result<Option<ProcessHandle>, HostError> {
        self.check("agents.start_backend")?;
        // Rule: one backend per hybrid socket; a second could not bind it.
        if !self.live_mentioning(&paths.vsock).is_empty() {
            return Err(HostError::FakeRule { rule: format!("{} is bound", paths.vsock.display()) });
        }
        Ok(Some(self.spawn(format!(
            "vhost-device-vsock --vm guest-cid={cid},socket={},uds-path={}",
            paths.vhost_user_socket.display(),
            paths.vsock.display()
        ))))
    }

    async fn stop_backend(&self, backend: &ProcessHandle, paths: &VmPaths) {
        if Processes::alive(self, backend, &paths.vsock) {
            self.kill(backend.pid);
        }
    }

    fn backend_failed(&self, _paths: &VmPaths) -> bool {
        false
    }

    async fn wait_ready(
        &self,
        _vm: &Vm,
        _console_from: u64,
        _deadline: Instant,
        still_booting: &(dyn Fn() -> bool + Send + Sync),
    ) -> Result<(), HostError> {
        self.check("agents.wait_ready")?;
        if !still_booting() {
            return Err(HostError::Agent(super::agent::AgentError::VmmExited));
        }
        Ok(())
    }

    async fn new_boot_key(
        &self,
        _vm: &Vm,
        _initrd: Option<&std::path::Path>,
        _owner: Option<crate::host::confine::VmIdentity>,
    ) -> Result<Option<std::path::PathBuf>, HostError> {
        // The fake guest checks no key; the VMM boots the image's initramfs.
        self.check("agents.new_boot_key")?;
        Ok(None)
    }

    async fn restore_key(&self, _vm: &Vm, _key_file: &std::path::Path) -> Result<(), HostError> {
        self.check("agents.restore_key")
    }

    async fn save_key(&self, _vm: &Vm, _key_file: &std::path::Path) -> Result<(), HostError> {
        self.check("agents.save_key")
    }

    async fn shutdown_guest(&self, vm: &Vm) -> Result<(), HostError> {
        self.check("agents.shutdown_guest")?;
        // The guest powers off: its VMM exits.
        for vmm in self.live_mentioning(&vm.paths().api_socket) {
            self.kill(vmm.pid);
        }
        Ok(())
    }

    fn exec(&self, vm: &Vm, command: crate::domain::ExecCommand, input: ExecInputStream) -> ExecStarting {
        use crate::domain::{ExecEvent, ExecInput, ExitStatus};
        use tokio_stream::StreamExt;
        let checked = self.check("agents.exec");
        let name = vm.name.clone();
        Box::pin(async move {
            checked?;
            let argv = command.argv;
            let (stdout, stderr, code): (Vec<u8>, Vec<u8>, i32) = match argv.first().map(String::as_str) {
                Some("echo") => (format!("{}\n", argv[1..].join(" ")).into_bytes(), vec![], 0),
                Some("cat") => {
                    let mut read = Vec::new();
                    let mut input = input;
                    while let Some(piece) = input.next().await {
                        match piece {
                            ExecInput::Data(data) => read.extend(data),
                            ExecInput::Eof => break,
                            ExecInput::Resize(_) => {}
                        }
                    }
                    (read, vec![], 0)
                }
                Some("true") => (vec![], vec![], 0),
                Some("false") => (vec![], vec![], 1),
                Some("hostname") => (format!("{name}\n").into_bytes(), vec![], 0),
                Some("exit") => (vec![], vec![], argv.get(1).and_then(|n| n.parse().ok()).unwrap_or(0)),
                Some(other) => (vec![], format!("fake guest: {other}: not found\n").into_bytes(), 127),
                None => (vec![], vec![], 0),
            };
            let mut events = Vec::new();
            if !stdout.is_empty() {
                events.push(Ok(ExecEvent::Stdout(stdout)));
            }
            if !stderr.is_empty() {
                events.push(Ok(ExecEvent::Stderr(stderr)));
            }
            events.push(Ok(ExecEvent::Exit { status: ExitStatus::Code(code), timed_out: false }));
            Ok(Box::pin(tokio_stream::iter(events)) as super::agent_channel::ExecEventStream)
        })
    }

    fn read_file(&self, vm: &Vm, path: String, _archive: bool) -> crate::host::agent_channel::FileReading {
        let found =
            self.check("agents.read_file").map(|()| self.state().guest_files.get(&(vm.id, path.clone())).cloned());
        Box::pin(async move {
            let Some((mode, content)) = found? else {
                let status = tonic::Status::not_found(format!("{path}: no such file"));
                return Err(HostError::Agent(super::agent::AgentError::Rpc { call: "ReadFile", status }));
            };
            let meta = crate::domain::FileMeta { mode, size: content.len() as u64, archive: false };
            let data: super::files::FileData = Box::pin(tokio_stream::iter(vec![Ok(content)]));
            Ok((meta, data))
        })
    }

    fn write_file(
        &self,
        vm: &Vm,
        path: String,
        mode: u32,
        _archive: bool,
        input: crate::host::files::FileInput,
    ) -> crate::host::agent_channel::FileWriting {
        use tokio_stream::StreamExt;
        let (host, id, checked) = (self.clone(), vm.id, self.check("agents.write_file"));
        Box::pin(async move {
            checked?;
            let mut content = Vec::new();
            let mut input = input;
            while let Some(piece) = input.next().await {
                // Rule: an aborted copy leaves nothing.
                content.extend(piece.map_err(|why| HostError::InputAborted { why })?);
            }
            let size = content.len() as u64;
            host.state().guest_files.insert((id, path), (mode, content));
            Ok(size)
        })
    }

    fn forget(&self, _vm: VmId) {}

    async fn set_identity(&self, vm: &Vm, identity: &crate::domain::GuestIdentity) -> Result<(), HostError> {
        self.check("agents.set_identity")?;
        // As the agent does: the hostname always, the rest only where given.
        let mut state = self.state();
        let now = state.identities.entry(vm.id).or_insert_with(|| identity.clone());
        now.hostname.clone_from(&identity.hostname);
        if identity.network.is_some() {
            now.network.clone_from(&identity.network);
        }
        if identity.machine_id.is_some() {
            now.machine_id.clone_from(&identity.machine_id);
        }
        if identity.realtime_ns.is_some() {
            now.realtime_ns = identity.realtime_ns;
        }
        if !identity.entropy.is_empty() {
            now.entropy.clone_from(&identity.entropy);
        }
        Ok(())
    }

    async fn wait_set_identity(
        &self,
        vm: &Vm,
        identity: &crate::domain::GuestIdentity,
        _deadline: Instant,
        still_booting: &(dyn Fn() -> bool + Send + Sync),
    ) -> Result<(), HostError> {
        if !still_booting() {
            return Err(HostError::Agent(super::agent::AgentError::VmmExited));
        }
        self.set_identity(vm, identity).await
    }

    async fn sync_guest(&self, _vm: &Vm) -> Result<(), HostError> {
        self.check("agents.sync_guest")
    }

    async fn quiesce(&self, _vm: &Vm) -> Result<(), HostError> {
        self.check("agents.quiesce")
    }
}

#[tonic::async_trait]
impl Network for FakeHost {
    async fn ensure_bridge(&self, _bridge: &str, _gateway: std::net::Ipv4Addr, _prefix: u8) -> Result<(), HostError> {
        self.check("network.ensure_bridge")
    }

    async fn create_tap(&self, name: &str, _bridge: &str, _owner: Option<u32>) -> Result<(), HostError> {
        self.check("network.create_tap")?;
        // Rule: interface names are at most 15 bytes.
        if name.len() > 15 {
            return Err(HostError::FakeRule { rule: format!("{name} is too long") });
        }
        self.state().taps.insert(name.to_owned());
        Ok(())
    }

    async fn add_nat(&self, tag: &str, _ip: std::net::Ipv4Addr, _bridge: &str) -> Result<(), HostError> {
        self.check("network.add_nat")?;
        self.state().nat.insert(tag.to_owned());
        Ok(())
    }

    async fn remove_nat(&self, tag: &str) -> Result<(), HostError> {
        self.check("network.remove_nat")?;
        self.state().nat.remove(tag);
        Ok(())
    }

    async fn add_guest_rules(&self, tag: &str, guest: &crate::host::network::GuestRules) -> Result<(), HostError> {
        self.check("network.add_guest_rules")?;
        // Rule: the rules name a tap that exists.
        if !self.state().taps.contains(&guest.tap) {
            return Err(HostError::FakeRule { rule: format!("no tap {}", guest.tap) });
        }
        self.state().firewall.insert(tag.to_owned());
        Ok(())
    }

    async fn remove_guest_rules(&self, tag: &str) -> Result<(), HostError> {
        self.check("network.remove_guest_rules")?;
        self.state().firewall.remove(tag);
        Ok(())
    }

    async fn delete_tap(&self, name: &str) -> Result<(), HostError> {
        self.check("network.delete_tap")?;
        self.state().taps.remove(name);
        Ok(())
    }
}

#[tonic::async_trait]
impl BlockDevices for FakeHost {
    async fn attach_loop(&self, file: &std::path::Path, _read_only: bool) -> Result<String, HostError> {
        self.check("block.attach_loop")?;
        let mut state = self.state();
        let device = format!("/dev/loop{}", state.next_loop);
        state.next_loop += 1;
        // Rule: only an existing file is attached.
        if !state.disks.contains(file) && !file.exists() {
            return Err(HostError::FakeRule { rule: format!("losetup {}", file.display()) });
        }
        state.loops.insert(device.clone());
        Ok(device)
    }

    async fn create_snapshot(&self, name: &str, base: &str, cow: &str, _sectors: u64) -> Result<String, HostError> {
        self.check("block.create_snapshot")?;
        let mut state = self.state();
        // Rules: a name is taken once, and a snapshot sits on attached loop devices.
        if state.dms.contains_key(name) || !state.loops.contains(base) || !state.loops.contains(cow) {
            return Err(HostError::FakeRule { rule: format!("dmsetup create {name} over {base} and {cow}") });
        }
        state.dms.insert(name.to_owned(), vec![base.to_owned(), cow.to_owned()]);
        Ok(format!("/dev/mapper/{name}"))
    }

    async fn remove_dm(&self, name: &str) -> Result<(), HostError> {
        self.check("block.remove_dm")?;
        self.state().dms.remove(name);
        Ok(())
    }

    async fn detach_loop(&self, device: &str) -> Result<(), HostError> {
        self.check("block.detach_loop")?;
        let mut state = self.state();
        // Rule: a loop device under a live snapshot is busy.
        if state.dms.values().any(|loops| loops.iter().any(|l| l == device)) {
            return Err(HostError::FakeRule { rule: format!("{device} is held by a device-mapper device") });
        }
        state.loops.remove(device);
        Ok(())
    }
}

#[tonic::async_trait]
impl ResourceLimits for FakeHost {
    async fn confine(
        &self,
        group: &str,
        _spec: VmSpec,
        processes: &[ProcessHandle],
    ) -> Result<Option<String>, HostError> {
        self.check("limits.confine")?;
        if processes.iter().any(|process| !self.state().processes.contains_key(&process.pid)) {
            return Err(HostError::FakeRule { rule: "no such process".into() });
        }
        self.state().cgroups.insert(group.to_owned());
        Ok(Some(group.to_owned()))
    }

    async fn remove(&self, group: &str) -> Result<(), HostError> {
        self.check("limits.remove")?;
        let mut state = self.state();
        // Rule: a cgroup with a live process in it cannot be removed (EBUSY).
        let vm_dir_marker = group.rsplit('/').next().unwrap_or(group).to_owned();
        if state.processes.values().any(|(_, cmdline)| cmdline.contains(&vm_dir_marker) && cmdline.starts_with("qemu"))
        {
            return Err(HostError::FakeRule { rule: format!("cgroup {group} still has a process") });
        }
        state.cgroups.remove(group);
        Ok(())
    }
}

#[tonic::async_trait]
impl Processes for FakeHost {
    fn alive(&self, handle: &ProcessHandle, marker: &Path) -> bool {
        let marker = marker.to_string_lossy();
        self.state()
            .processes
            .get(&handle.pid)
            .is_some_and(|(start_time, cmdline)| *start_time == handle.start_time && cmdline.contains(marker.as_ref()))
    }

    fn table(&self) -> ProcessTable {
        ProcessTable::from_entries(
            self.state()
                .processes
                .iter()
                .map(|(pid, (start_time, cmdline))| {
                    (ProcessHandle { pid: *pid, start_time: *start_time }, cmdline.clone())
                })
                .collect(),
        )
    }

    async fn wait_gone(&self, handle: &ProcessHandle, marker: &Path, _timeout: Duration) -> bool {
        !self.alive(handle, marker)
    }

    async fn terminate(&self, handle: &ProcessHandle, marker: &Path, _grace: Duration) {
        if self.alive(handle, marker) {
            self.kill(handle.pid);
        }
    }
}
