//! Firecracker: launched with `--api-sock` (the VM's api socket), configured through its HTTP
//! API, started with `InstanceStart`. Its standard output is the guest's serial console; it
//! serves the guest's vsock itself as a hybrid unix socket.
//!
//! Optionally under its jailer: each VMM then runs chrooted in `<vm dir>/jail/...`, as its
//! own uid and gid (`uid_base + vsock cid`), in the VM's cgroup from its first instruction.
//! The jail mirrors the VM's dir, kernel and initrd at their host paths inside the chroot;
//! the files a snapshot records (the root disk, the vsock socket) are at fixed paths under
//! `/banger` in every jail, so that a clone's jail has its own where its source's snapshot
//! names them. The root disk is hard-linked in, the kernel linked or copied, and the VM's
//! api and vsock socket paths on the host are symlinks to the sockets Firecracker makes
//! inside. The jailer execs Firecracker in place (same PID) with `--api-sock <the VM's api
//! socket path>` on its command line, so liveness and rediscovery work through `/proc`
//! exactly as without it.
//!
//! Snapshots need the jail. A save (`PUT /snapshot/create`) writes the device state and all
//! of guest memory into the jail's `/banger`, and the driver moves both out to the VM's dir.
//! A restore links the snapshot's two files into the new jail and loads them (`PUT
//! /snapshot/load`, memory mapped private, the clone's own tap); that jail runs with the
//! snapshot's group as its gid, the only group that may read them.

use std::{
    ffi::OsString,
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    time::Duration,
};

use super::{
    GuestMemory, LaunchSpec, MemorySave, Vmm,
    firecracker_api::{
        ActionType, ApiRequest, BootSource, Drive, FirecrackerApi, FirecrackerApiError, InstanceActionInfo,
        MachineConfig, MemoryBackend, MemoryBackendType, NetworkInterface, NetworkOverride, RunState,
        SnapshotCreateParams, SnapshotLoadParams, SnapshotType, VmRunState, Vsock,
    },
};
use crate::{
    domain::{ProcessHandle, VmPaths},
    host::{
        HostError,
        cgroup::Cgroups,
        command::{self, resolve_program},
        confine::VmIdentity,
        file_error, last_log_line,
        process::{ProcFs, Processes},
    },
};

/// Running every Firecracker under its jailer.
#[derive(Debug, Clone)]
pub struct Jailer {
    /// `jailer`.
    pub binary: PathBuf,
    /// The VM with vsock context id N runs as uid and gid `uid_base + N`.
    pub uid_base: u32,
    /// The cgroups the jailer puts each VMM in (the groups `limit_resources` names).
    pub cgroups: Cgroups,
}

/// Launches and controls Firecracker microVMs.
#[derive(Debug, Clone)]
pub struct FirecrackerVmm {
    binary: PathBuf,
    processes: ProcFs,
    jailer: Option<Jailer>,
}

/// Inside every jail: the directory of the files a snapshot records or a restore loads.
const JAIL_FILES: &str = "/banger";
/// The root disk, inside the jail.
const JAIL_DISK: &str = "/banger/rootfs";
/// The hybrid vsock socket, inside the jail.
const JAIL_VSOCK: &str = "/banger/vsock.sock";
/// The device state and memory a save writes, inside the jail.
const JAIL_SAVED: [&str; 2] = ["/banger/saved.state", "/banger/saved.memory"];
/// The snapshot's device state and memory a restore loads, inside the jail.
const JAIL_RESTORED: [&str; 2] = ["/banger/restore.state", "/banger/restore.memory"];

/// Where a host path appears inside a chroot.
fn inside(chroot: &Path, host_path: &Path) -> PathBuf {
    chroot.join(host_path.strip_prefix("/").unwrap_or(host_path))
}

/// The jail's base directory: everything the jailer makes for a VM is under it.
fn jail_base(paths: &VmPaths) -> PathBuf {
    paths.dir.join("jail")
}

fn remove_tree(dir: &Path) -> Result<(), HostError> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(file_error("remove", dir)(e)),
        _ => Ok(()),
    }
}

impl FirecrackerVmm {
    /// Uses the given `firecracker` binary, unjailed.
    pub fn new(binary: PathBuf, processes: ProcFs) -> Self {
        Self { binary, processes, jailer: None }
    }

    /// Runs every VMM under `jailer`.
    pub fn jailed(mut self, jailer: Jailer) -> Self {
        self.jailer = Some(jailer);
        self
    }

    /// Firecracker's own arguments: its api socket (which names the process in `/proc`) and
    /// its log, from the first line, in vmm.log (its standard output is the guest's console).
    fn firecracker_args(paths: &VmPaths) -> Vec<OsString> {
        vec![
            "--api-sock".into(),
            paths.api_socket.clone().into_os_string(),
            "--log-path".into(),
            paths.vmm_log.clone().into_os_string(),
            "--level".into(),
            "Info".into(),
            "--show-level".into(),
        ]
    }

    fn jail_uid(jailer: &Jailer, vsock_cid: u32) -> Result<u32, HostError> {
        jailer.uid_base.checked_add(vsock_cid).ok_or_else(|| HostError::Io {
            what: format!("jail uid {} + {vsock_cid}", jailer.uid_base),
            source: std::io::Error::other("overflows a uid"),
        })
    }

    /// The firecracker binary the jailer execs.
    fn exec_file(&self) -> Result<PathBuf, HostError> {
        resolve_program(&self.binary)
            .ok_or_else(|| HostError::ToolMissing { program: self.binary.display().to_string() })
    }

    /// The chroot of the VM whose dir is `paths.dir` (named by its id, as the jailer names it).
    fn chroot(&self, paths: &VmPaths) -> Result<PathBuf, HostError> {
        let firecracker = self.exec_file()?;
        let exec_name = firecracker.file_name().map(|n| n.to_owned()).unwrap_or_else(|| "firecracker".into());
        let id = paths.dir.file_name().unwrap_or_default();
        Ok(jail_base(paths).join(exec_name).join(id).join("root"))
    }

    /// Makes the VM's jail: the chroot with the VM's dir, kernel and initrd at their host
    /// paths and its disk (and a restore's snapshot files) under `/banger`, owned where the
    /// VMM writes by `uid`; and the host-side socket symlinks. Returns the jailer's command
    /// line.
    fn prepare_jail(&self, jailer: &Jailer, launch: &LaunchSpec<'_>) -> Result<Vec<OsString>, HostError> {
        let paths = launch.paths;
        let firecracker = self.exec_file()?;
        let uid = Self::jail_uid(jailer, launch.vsock_cid)?;
        // A restore reads the snapshot's files, which only the snapshot's group may: that
        // is the jail's gid then (the jailer gives one group, and no supplementary ones).
        let gid = match (launch.restore_from, launch.extra_groups.first()) {
            (Some(_), Some(group)) => *group,
            _ => uid,
        };
        let base = jail_base(paths);
        // A jail left by an earlier boot of this VM is rebuilt from scratch.
        remove_tree(&base)?;
        let chroot = self.chroot(paths)?;
        let vm_dir = inside(&chroot, &paths.dir);
        let files = inside(&chroot, Path::new(JAIL_FILES));
        let chown =
            |path: &Path| std::os::unix::fs::chown(path, Some(uid), Some(uid)).map_err(file_error("chown", path));
        // The VMM makes its sockets in both and writes the root disk and saves in the
        // second: they belong to its uid.
        for dir in [&vm_dir, &files] {
            crate::host::fs::make_dir(dir, 0o711)?;
            chown(dir)?;
        }
        // Its own log goes to the VM's vmm.log (not stdout, which is the guest's console).
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&paths.vmm_log)
            .map_err(file_error("create", &paths.vmm_log))?;
        std::fs::hard_link(&paths.vmm_log, inside(&chroot, &paths.vmm_log))
            .map_err(file_error("link into the jail", &paths.vmm_log))?;
        chown(&paths.vmm_log)?;
        if launch.disk != paths.root_disk {
            return Err(HostError::VmmRefused {
                command: "jailer".into(),
                message: format!("{} is a device; jailed VMs boot from disk files", launch.disk.display()),
            });
        }
        let disk = inside(&chroot, Path::new(JAIL_DISK));
        std::fs::hard_link(&paths.root_disk, &disk).map_err(file_error("link into the jail", &paths.root_disk))?;
        chown(&paths.root_disk)?;
        if let (Some(state), GuestMemory::Private(memory)) = (launch.restore_from, launch.memory) {
            // The snapshot's own files, sealed to its group: linked, never copied or written.
            for (file, at) in [state, memory].into_iter().zip(JAIL_RESTORED) {
                std::fs::hard_link(file, inside(&chroot, Path::new(at)))
                    .map_err(file_error("link into the jail", file))?;
            }
        }
        for file in std::iter::once(&launch.image.kernel_path).chain(launch.image.initrd_path.as_ref()) {
            let target = inside(&chroot, file);
            if let Some(parent) = target.parent() {
                crate::host::fs::make_dir(parent, 0o711)?;
            }
            // Shared read-only files are linked when the VMM may read them, else copied for it.
            let readable = std::fs::metadata(file).is_ok_and(|m| m.mode() & 0o004 != 0);
            if !readable || std::fs::hard_link(file, &target).is_err() {
                std::fs::copy(file, &target).map_err(file_error("copy into the jail", file))?;
                std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o400))
                    .map_err(file_error("chmod", &target))?;
                chown(&target)?;
            }
        }
        // The daemon's umask is 077: the VMM, chrooted as its own uid, passes through the
        // directories made for it (never lists them).
        let mut made: Vec<PathBuf> = vec![vm_dir.clone(), files.clone()];
        made.extend(
            std::iter::once(&launch.image.kernel_path)
                .chain(launch.image.initrd_path.as_ref())
                .filter_map(|file| inside(&chroot, file).parent().map(Path::to_owned)),
        );
        for dir in made.iter().flat_map(|dir| dir.ancestors()).filter(|dir| dir.starts_with(&base)) {
            let mode = std::fs::metadata(dir).map_err(file_error("stat", dir))?.mode() & 0o7777;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode | 0o111))
                .map_err(file_error("chmod", dir))?;
        }
        for (socket, target) in [
            (&paths.api_socket, inside(&chroot, &paths.api_socket)),
            (&paths.vsock, inside(&chroot, Path::new(JAIL_VSOCK))),
        ] {
            let _ = std::fs::remove_file(socket);
            std::os::unix::fs::symlink(target, socket).map_err(file_error("link", socket))?;
        }
        let mut args: Vec<OsString> = vec![
            "--id".into(),
            launch.id.to_string().into(),
            "--exec-file".into(),
            firecracker.into(),
            "--uid".into(),
            uid.to_string().into(),
            "--gid".into(),
            gid.to_string().into(),
            "--chroot-base-dir".into(),
            base.into(),
        ];
        args.extend(jailer.cgroups.jailer_args(launch.spec).into_iter().map(OsString::from));
        args.push("--".into());
        args.extend(Self::firecracker_args(paths));
        Ok(args)
    }

    fn exited(&self, paths: &VmPaths) -> HostError {
        HostError::ProcessExited {
            process: "firecracker",
            detail: last_log_line(&paths.vmm_log),
            log: paths.vmm_log.clone(),
        }
    }

    /// Every request that configures and starts one VM, in order (sent by `boot`); a jailed
    /// VM's disk and vsock socket are at the jail's fixed paths.
    pub fn configuration(launch: &LaunchSpec<'_>, jailed: bool) -> Vec<ApiRequest> {
        let paths = launch.paths;
        let boot_args = format!("console=ttyS0 reboot=k panic=1 pci=off root=/dev/vda rw {}", launch.guest_args());
        let mut requests = vec![
            ApiRequest::PutMachineConfig(MachineConfig {
                vcpu_count: launch.spec.vcpus,
                mem_size_mib: launch.spec.memory_mib,
                smt: None,
            }),
            ApiRequest::PutBootSource(BootSource {
                kernel_image_path: launch.image.kernel_path.display().to_string(),
                boot_args,
                initrd_path: launch.image.initrd_path.as_ref().map(|p| p.display().to_string()),
            }),
            ApiRequest::PutDrive(Drive {
                drive_id: "rootfs".into(),
                path_on_host: match jailed {
                    true => JAIL_DISK.into(),
                    false => launch.disk.display().to_string(),
                },
                is_root_device: true,
                is_read_only: false,
            }),
            ApiRequest::PutVsock(Vsock {
                guest_cid: launch.vsock_cid,
                uds_path: match jailed {
                    true => JAIL_VSOCK.into(),
                    false => paths.vsock.display().to_string(),
                },
            }),
        ];
        if let Some(nic) = launch.nic {
            requests.push(ApiRequest::PutNetworkInterface(NetworkInterface {
                iface_id: "eth0".into(),
                host_dev_name: nic.tap.clone(),
                guest_mac: Some(nic.mac.clone()),
            }));
        }
        requests.push(ApiRequest::PutAction(InstanceActionInfo { action_type: ActionType::InstanceStart }));
        requests
    }
}

impl FirecrackerVmm {
    /// Saves a paused guest through the Firecracker serving `api_socket`: its device and vCPU
    /// state to `state`, all of its memory to `memory` (`PUT /snapshot/create`, full).
    pub async fn create_snapshot(api_socket: &Path, state: &Path, memory: &Path) -> Result<(), HostError> {
        let request = ApiRequest::CreateSnapshot(SnapshotCreateParams {
            snapshot_path: state.to_string_lossy().into_owned(),
            mem_file_path: memory.to_string_lossy().into_owned(),
            snapshot_type: Some(SnapshotType::Full),
        });
        FirecrackerApi::new(api_socket).send(&request).await.map(drop).map_err(api_error)
    }

    /// Restores a snapshot into the Firecracker serving `api_socket`, which must have been
    /// given nothing else, and lets the guest run: `memory` is mapped private (copy-on-write,
    /// never written), `taps` (interface id, tap) replace the snapshot's taps.
    pub async fn load_snapshot(
        api_socket: &Path,
        state: &Path,
        memory: &Path,
        taps: &[(String, String)],
    ) -> Result<(), HostError> {
        let request = ApiRequest::LoadSnapshot(SnapshotLoadParams {
            snapshot_path: state.to_string_lossy().into_owned(),
            mem_backend: MemoryBackend {
                backend_type: MemoryBackendType::File,
                backend_path: memory.to_string_lossy().into_owned(),
            },
            resume_vm: true,
            network_overrides: taps
                .iter()
                .map(|(iface_id, host_dev_name)| NetworkOverride {
                    iface_id: iface_id.clone(),
                    host_dev_name: host_dev_name.clone(),
                })
                .collect(),
        });
        FirecrackerApi::new(api_socket).send(&request).await.map(drop).map_err(api_error)
    }
}

fn api_error(error: FirecrackerApiError) -> HostError {
    match error {
        FirecrackerApiError::Fault { method, path, fault_message, .. } => {
            HostError::VmmRefused { command: format!("{method} {path}"), message: fault_message }
        }
        other => HostError::Io { what: "firecracker api".into(), source: std::io::Error::other(other.to_string()) },
    }
}

#[tonic::async_trait]
impl Vmm for FirecrackerVmm {
    fn name(&self) -> &'static str {
        "firecracker"
    }

    async fn launch(&self, launch: &LaunchSpec<'_>) -> Result<ProcessHandle, HostError> {
        let paths = launch.paths;
        for stale in [&paths.api_socket, &paths.vsock] {
            let _ = std::fs::remove_file(stale);
        }
        let (program, args) = match &self.jailer {
            Some(jailer) => (jailer.binary.clone(), self.prepare_jail(jailer, launch)?),
            None => {
                // The log file must exist before Firecracker opens it.
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&paths.vmm_log)
                    .map_err(file_error("create", &paths.vmm_log))?;
                let mut args = Self::firecracker_args(paths);
                args.extend(["--id".into(), launch.id.to_string().into()]);
                (self.binary.clone(), args)
            }
        };
        tracing::debug!(binary = %program.display(), args = ?args, "firecracker command line");
        let vmm = command::spawn_detached_split(&program, &args, &paths.console_log, &paths.vmm_log)?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !paths.api_socket.exists() {
            // The jailer execs Firecracker in place; while the exec replaces the process image
            // its command line reads empty for a moment, which alone must not count as an exit.
            if !self.processes.alive(&vmm, &paths.api_socket) {
                tokio::time::sleep(Duration::from_millis(50)).await;
                if !paths.api_socket.exists() && !self.processes.alive(&vmm, &paths.api_socket) {
                    return Err(self.exited(paths));
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(HostError::Timeout { what: "firecracker api socket".into(), seconds: 10 });
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(vmm)
    }

    async fn boot(&self, launch: &LaunchSpec<'_>, vmm: &ProcessHandle) -> Result<(), HostError> {
        let paths = launch.paths;
        if !self.processes.alive(vmm, &paths.api_socket) {
            return Err(self.exited(paths));
        }
        if launch.restore_from.is_some() {
            // Loaded from the files `launch` linked into the jail; the guest runs on with
            // the VM's own tap in place of its source's.
            let [state, memory] = JAIL_RESTORED.map(Path::new);
            let taps: Vec<_> = launch.nic.iter().map(|nic| ("eth0".to_owned(), nic.tap.clone())).collect();
            return Self::load_snapshot(&paths.api_socket, state, memory, &taps).await;
        }
        // Configured, then started: once InstanceStart answers the guest runs (and may
        // already have finished, which reconcile then records).
        let api = FirecrackerApi::new(&paths.api_socket);
        for request in Self::configuration(launch, self.jailer.is_some()) {
            api.send(&request).await.map_err(api_error)?;
        }
        Ok(())
    }

    async fn power_down(&self, paths: &VmPaths) -> Result<(), HostError> {
        let request = ApiRequest::PutAction(InstanceActionInfo { action_type: ActionType::SendCtrlAltDel });
        FirecrackerApi::new(&paths.api_socket).send(&request).await.map(drop).map_err(api_error)
    }

    async fn pause(&self, paths: &VmPaths) -> Result<(), HostError> {
        let request = ApiRequest::PatchVm(VmRunState { state: RunState::Paused });
        FirecrackerApi::new(&paths.api_socket).send(&request).await.map(drop).map_err(api_error)
    }

    async fn resume(&self, paths: &VmPaths) -> Result<(), HostError> {
        let request = ApiRequest::PatchVm(VmRunState { state: RunState::Resumed });
        FirecrackerApi::new(&paths.api_socket).send(&request).await.map(drop).map_err(api_error)
    }

    fn snapshots_unsupported(&self) -> Option<String> {
        match self.jailer {
            Some(_) => None,
            None => Some(
                "Firecracker runs without its jailer (jailer = false): a snapshot records the paths of the \
                 VM's disk and vsock socket, which only jails give every VM started from it at the same place"
                    .into(),
            ),
        }
    }

    fn memory_save(&self) -> MemorySave {
        MemorySave::Written
    }

    fn snapshot_group(&self, group: u32) -> Option<u32> {
        self.jailer.as_ref()?.uid_base.checked_add(crate::domain::SNAPSHOT_GROUP_OFFSET)?.checked_add(group)
    }

    async fn save(&self, paths: &VmPaths, state_file: &Path, memory_file: &Path) -> Result<(), HostError> {
        let chroot = match self.jailer {
            Some(_) => self.chroot(paths)?,
            None => {
                return Err(HostError::VmmRefused { command: "save".into(), message: "the vmm is not jailed".into() });
            }
        };
        let [state, memory] = JAIL_SAVED.map(Path::new);
        for stale in [state, memory] {
            let _ = std::fs::remove_file(inside(&chroot, stale));
        }
        Self::create_snapshot(&paths.api_socket, state, memory).await?;
        // The guest stays paused and can run on; its files leave the jail for the VM's dir.
        for (saved, to) in [(state, state_file), (memory, memory_file)] {
            let saved = inside(&chroot, saved);
            std::fs::rename(&saved, to).map_err(file_error("move out of the jail", &saved))?;
        }
        Ok(())
    }

    fn runs_as(&self, vsock_cid: u32) -> Option<VmIdentity> {
        let jailer = self.jailer.as_ref()?;
        VmIdentity::of(jailer.uid_base, vsock_cid)
    }

    fn release(&self, paths: &VmPaths) -> Result<(), HostError> {
        // Made by the jailer, or left by a jailed boot before the config changed.
        remove_tree(&jail_base(paths))
    }
}
