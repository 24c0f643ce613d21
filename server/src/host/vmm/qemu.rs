//! QEMU `-M microvm`: virtio-mmio devices, QMP on the api socket, serial console to a file.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    time::Duration,
};

use serde_json::json;

use super::{GuestMemory, LaunchSpec, Vmm, qmp::Qmp};
use crate::{
    domain::{ProcessHandle, VmPaths},
    host::{
        HostError, command,
        confine::VmIdentity,
        last_log_line,
        process::{ProcFs, Processes},
        vsock::VsockMode,
    },
};

/// Which accelerator QEMU uses (`accel = "tcg"` or `"kvm"` in the config, or what `"auto"`
/// found: see `host::accel`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Software emulation: works everywhere, slower.
    Tcg,
    /// Hardware virtualization through /dev/kvm.
    Kvm,
}

/// Launches and controls QEMU microvm guests.
#[derive(Debug, Clone)]
pub struct QemuVmm {
    binary: PathBuf,
    accel: Accel,
    vsock: VsockMode,
    processes: ProcFs,
    /// The host TSC frequency, passed as `tsc_early_khz` so a loaded host never hangs calibration.
    tsc_khz: Option<u64>,
    /// The VM with vsock context id N runs as uid and gid `uid_base + N`.
    uid_base: u32,
}

/// QEMU's own seccomp filter, on top of the one every confined process gets: obsolete
/// system calls, changing ids, spawning processes and changing scheduling or resource
/// limits are refused.
pub const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// Reads the host CPU's frequency in kHz from `/proc/cpuinfo`.
fn host_tsc_khz() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz: f64 = info.lines().find(|l| l.starts_with("cpu MHz"))?.split(':').nth(1)?.trim().parse().ok()?;
    Some((mhz * 1000.0) as u64)
}

impl QemuVmm {
    /// Uses `binary` (qemu-system-x86_64) with the given accelerator and vsock device; each
    /// VM's QEMU runs as uid and gid `uid_base` + its vsock cid.
    pub fn new(binary: PathBuf, accel: Accel, vsock: VsockMode, processes: ProcFs, uid_base: u32) -> Self {
        Self { binary, accel, vsock, processes, tsc_khz: host_tsc_khz(), uid_base }
    }

    fn identity(&self, vsock_cid: u32) -> Result<VmIdentity, HostError> {
        VmIdentity::of(self.uid_base, vsock_cid).ok_or_else(|| HostError::Io {
            what: format!("the uid of vsock cid {vsock_cid} from {}", self.uid_base),
            source: std::io::Error::other("overflows a uid"),
        })
    }

    /// Sends `command` (`stop` or `cont`), then checks that QEMU says the vCPUs run (or not).
    async fn run_state(&self, paths: &VmPaths, command: &str, running: bool) -> Result<(), HostError> {
        let mut qmp = Qmp::connect(&paths.api_socket).await?;
        qmp.execute(command).await?;
        let status = qmp.execute("query-status").await?;
        if status.get("running").and_then(serde_json::Value::as_bool) != Some(running) {
            return Err(HostError::VmmRefused { command: command.into(), message: status.to_string() });
        }
        Ok(())
    }

    /// The command line for one VM; its api socket path identifies the process in `/proc`.
    pub fn args(&self, launch: &LaunchSpec<'_>) -> Vec<OsString> {
        let paths = launch.paths;
        let memory = launch.spec.memory_mib;
        let mut append = String::from("console=ttyS0 quiet panic=-1 root=/dev/vda rw");
        if let Some(khz) = self.tsc_khz {
            // `tsc=reliable`: no clocksource watchdog. Under emulation its reference (timer
            // ticks) lags whenever the host is busy, so it would declare the TSC unstable and
            // move the guest to a jiffies clock: a 250 Hz tick forever (~10% of a host core per
            // idle VM here) and 4 ms timekeeping.
            append.push_str(&format!(" tsc_early_khz={khz} tsc=reliable"));
        }
        append.push(' ');
        append.push_str(&launch.guest_args());
        let mut args: Vec<OsString> = Vec::new();
        let mut push = |items: &[&str]| args.extend(items.iter().map(OsString::from));
        // Devices the daemon opens for the unprivileged QEMU: its fds 3, 4, … in this order.
        let mut next_fd = 3..;
        push(&["-name", &format!("banger-{}", launch.name)]);
        match self.accel {
            Accel::Tcg => push(&["-M", "microvm,memory-backend=mem", "-accel", "tcg"]),
            // /dev/kvm need not be open to the VMs' uids: the daemon's fd, as an fd set.
            Accel::Kvm => push(&[
                "-M",
                "microvm,memory-backend=mem",
                "-add-fd",
                &format!("fd={},set=1", next_fd.next().unwrap_or_default()),
                "-accel",
                "kvm,device=/dev/fdset/1",
            ]),
        }
        // `arat`: the local APIC timer runs in every idle state (it does, emulated). Without
        // it the guest's only timer may stop when idle, microvm has no broadcast timer to
        // stand in, so the guest never leaves its periodic tick (250 wake-ups a second).
        push(&["-cpu", "qemu64,+arat"]);
        push(&["-m", &format!("{memory}M"), "-smp", &launch.spec.vcpus.to_string()]);
        let backend = match launch.memory {
            // vhost-user needs guest memory it can map: a shared memfd backend.
            GuestMemory::Anonymous => format!("memory-backend-memfd,id=mem,size={memory}M,share=on"),
            GuestMemory::Shared(file) => {
                format!("memory-backend-file,id=mem,size={memory}M,mem-path={},share=on", file.display())
            }
            // Opened read-only, mapped private and writable: the file is never written.
            GuestMemory::Private(file) => format!(
                "memory-backend-file,id=mem,size={memory}M,mem-path={},share=off,readonly=on,rom=off",
                file.display()
            ),
        };
        push(&["-object", &backend]);
        push(&["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"]);
        // Paused until `boot` says `cont`: the guest runs no instruction before the VMM is
        // in its cgroup, and QEMU sets itself up meanwhile.
        push(&["-S"]);
        // Appended to (across boots too), so that the daemon can cut its oldest part.
        push(&["-chardev", &format!("file,id=console,path={},append=on", paths.console_log.display())]);
        push(&["-serial", "chardev:console"]);
        push(&["-kernel", &launch.image.kernel_path.to_string_lossy()]);
        if let Some(initrd) = &launch.image.initrd_path {
            push(&["-initrd", &initrd.to_string_lossy()]);
        }
        push(&["-append", &append]);
        push(&[
            "-drive",
            &format!("id=root,file={},format={},if=none", launch.disk.display(), launch.disk_format),
            "-device",
            "virtio-blk-device,drive=root",
        ]);
        match self.vsock {
            // /dev/vhost-vsock need not be open to the VMs' uids (nor to anyone else).
            VsockMode::Kernel => push(&[
                "-device",
                &format!(
                    "vhost-vsock-device,guest-cid={},vhostfd={}",
                    launch.vsock_cid,
                    next_fd.next().unwrap_or_default()
                ),
            ]),
            VsockMode::UserSpace | VsockMode::VmmHybrid => push(&[
                "-chardev",
                &format!("socket,id=vsock,path={}", paths.vhost_user_socket.display()),
                "-device",
                "vhost-user-vsock-device,chardev=vsock",
            ]),
            VsockMode::VirtioSerial => push(&[
                "-device",
                "virtio-serial-device,max_ports=2",
                "-chardev",
                &format!("socket,id=agent,path={},server=on,wait=off", paths.agent_serial.display()),
                "-device",
                "virtserialport,chardev=agent,name=banger.agent",
            ]),
        }
        if let Some(nic) = launch.nic {
            // The tap is opened by the daemon: an unprivileged QEMU may not open /dev/net/tun.
            push(&[
                "-netdev",
                &format!("tap,id=net0,fd={}", next_fd.next().unwrap_or_default()),
                "-device",
                &format!("virtio-net-device,netdev=net0,mac={}", nic.mac),
            ]);
        }
        push(&["-qmp", &format!("unix:{},server=on,wait=off", paths.api_socket.display())]);
        push(&["-sandbox", SANDBOX]);
        if launch.restore_from.is_some() {
            // The state is loaded over QMP once QEMU is up (`boot`).
            push(&["-incoming", "defer"]);
        }
        args
    }

    /// Loads a snapshot's device state into a QEMU started with `-incoming defer`; its
    /// memory is the snapshot's file already (`x-ignore-shared`: the stream carries none).
    async fn load_state(
        &self,
        qmp: &mut Qmp,
        state: &Path,
        vmm: &ProcessHandle,
        paths: &VmPaths,
    ) -> Result<(), HostError> {
        qmp.execute_with("migrate-set-capabilities", ignore_shared()).await?;
        qmp.execute_with("migrate-incoming", json!({ "uri": file_uri(state) })).await?;
        let alive = || self.processes.alive(vmm, &paths.api_socket);
        match wait_migration(qmp, MIGRATION_TIMEOUT, &alive).await {
            // A failed load makes QEMU exit: its log says why.
            Err(_) if !alive() => Err(self.exited(paths)),
            done => done,
        }
    }

    fn exited(&self, paths: &VmPaths) -> HostError {
        HostError::ProcessExited { process: "qemu", detail: last_log_line(&paths.vmm_log), log: paths.vmm_log.clone() }
    }
}

/// How long saving or loading a guest's device state may take (memory is not copied: a
/// few hundred kilobytes).
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(60);

/// The migration capability that leaves guest memory in its shared file, out of the stream.
fn ignore_shared() -> serde_json::Value {
    json!({ "capabilities": [{ "capability": "x-ignore-shared", "state": true }] })
}

fn file_uri(path: &Path) -> String {
    format!("file:{}", path.display())
}

/// Polls `query-migrate` until the migration completed, failed, or `timeout` passed.
async fn wait_migration(qmp: &mut Qmp, timeout: Duration, alive: &(dyn Fn() -> bool + Sync)) -> Result<(), HostError> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if !alive() {
            return Err(HostError::VmmRefused { command: "migrate".into(), message: "qemu exited".into() });
        }
        let status = qmp.execute("query-migrate").await?;
        match status.get("status").and_then(serde_json::Value::as_str) {
            Some("completed") => return Ok(()),
            Some("failed" | "cancelled") => {
                let why = status.get("error-desc").and_then(serde_json::Value::as_str).unwrap_or("no reason given");
                return Err(HostError::VmmRefused { command: "migrate".into(), message: why.to_owned() });
            }
            _ => {}
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(HostError::Timeout { what: "qemu migration".into(), seconds: timeout.as_secs() });
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Opens the kernel's vhost-vsock device for a VMM (`vhostfd=`): the daemon opens it, so the
/// device node need not be open to the VMs' uids.
fn open_vhost_vsock() -> Result<std::os::fd::OwnedFd, HostError> {
    open_device(Path::new(crate::host::vsock::VHOST_VSOCK_DEVICE))
}

/// KVM's device.
pub const KVM_DEVICE: &str = "/dev/kvm";

/// How long a kernel gets to boot under KVM in [`probe_kvm`]; under KVM it needs well under
/// a second to get to its root file system.
pub const KVM_PROBE_TIMEOUT: Duration = Duration::from_secs(8);

/// What the probed kernel prints once it ran its whole boot: it finds no root (and panics;
/// an earlier panic, of a broken virtual CPU, prints something else).
const PROBE_BOOTED: &str = "VFS: Unable to mount root fs";

/// Why a KVM probe did not see a guest kernel boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeFailure {
    /// What happened.
    pub reason: String,
    /// Whether it says something about this host's KVM (the kernel did not boot, QEMU
    /// refused it), as opposed to the probe not getting to try (a device or spawn error).
    pub conclusive: bool,
}

/// Boots `kernel` under KVM the way guests are booted (microvm, the same CPU model, as the
/// unprivileged `identity` with the daemon's /dev/kvm fd), without a disk or an initramfs:
/// Ok with the time it took to boot to the point of mounting its root (where it panics), Err
/// saying why it did not. `log` gets QEMU's output and the guest's console.
pub async fn probe_kvm(
    binary: &Path,
    kernel: &Path,
    identity: VmIdentity,
    log: &Path,
) -> Result<Duration, ProbeFailure> {
    let inconclusive = |reason: String| ProbeFailure { reason, conclusive: false };
    let kvm = open_device(Path::new(KVM_DEVICE)).map_err(|e| inconclusive(banger_proto::error_chain(&e)))?;
    // An earlier probe's output must not be read as this one's.
    let _ = std::fs::remove_file(log);
    // As guests are booted: calibration against timers a loaded host delays can hang.
    let mut append = String::from("console=ttyS0 panic=-1 root=/dev/null");
    if let Some(khz) = host_tsc_khz() {
        append.push_str(&format!(" tsc_early_khz={khz} tsc=reliable"));
    }
    let args: Vec<OsString> = [
        "-M",
        "microvm",
        "-add-fd",
        "fd=3,set=1",
        "-accel",
        "kvm,device=/dev/fdset/1",
        "-cpu",
        "qemu64,+arat",
        "-m",
        "128",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-serial",
        "stdio",
        "-kernel",
        &kernel.to_string_lossy(),
        "-append",
        &append,
    ]
    .iter()
    .map(OsString::from)
    .collect();
    let started = tokio::time::Instant::now();
    let qemu = command::spawn_confined(binary, &args, log, identity, &[], vec![kvm])
        .map_err(|e| inconclusive(banger_proto::error_chain(&e)))?;
    let proc_root = Path::new("/proc");
    let running = || {
        crate::host::process::read_stat(proc_root, qemu.pid)
            .is_some_and(|stat| stat.start_time == qemu.start_time && stat.state != 'Z')
    };
    while running() && started.elapsed() < KVM_PROBE_TIMEOUT {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = started.elapsed();
    let timed_out = running();
    if timed_out {
        // Still the probe's process (same start time): killed by its PID.
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(qemu.pid as i32), nix::sys::signal::Signal::SIGKILL);
    }
    let output = std::fs::read(log).unwrap_or_default();
    let output = String::from_utf8_lossy(&output);
    if output.contains(PROBE_BOOTED) {
        return Ok(took);
    }
    let lines: Vec<String> = output
        .lines()
        .map(|line| line.replace(|c: char| c.is_control(), "").trim().to_owned())
        .filter(|line| !line.is_empty())
        .collect();
    let qemu_said = |line: &&String| line.starts_with("qemu-system");
    let console = lines.iter().rfind(|line| !qemu_said(line));
    let console =
        console.map_or_else(|| "the guest printed nothing".to_owned(), |line| format!("its last line: {line:?}"));
    let reason = match (timed_out, lines.iter().rfind(qemu_said)) {
        (true, _) => {
            format!("a guest kernel did not boot under KVM within {} s ({console})", KVM_PROBE_TIMEOUT.as_secs())
        }
        (false, Some(qemu)) => format!("QEMU under KVM failed before the guest kernel booted: {qemu:?}"),
        (false, None) => format!("QEMU under KVM exited before the guest kernel booted ({console})"),
    };
    Err(ProbeFailure { reason, conclusive: true })
}

/// Opens a device node read-write for a VMM: the daemon opens it, so the node need not be
/// open to the VMs' uids.
fn open_device(path: &Path) -> Result<std::os::fd::OwnedFd, HostError> {
    use std::os::unix::fs::OpenOptionsExt;
    let device = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(crate::host::file_error("open", path))?;
    Ok(device.into())
}

/// Lines QEMU prints when it keeps running but the guest will never get its vsock device.
const FATAL_VMM_LOG_LINES: [&str; 2] = ["vhost_set_mem_table failed", "Error starting vhost"];

#[tonic::async_trait]
impl Vmm for QemuVmm {
    fn name(&self) -> &'static str {
        "qemu"
    }

    async fn launch(&self, launch: &LaunchSpec<'_>) -> Result<ProcessHandle, HostError> {
        let _ = std::fs::remove_file(&launch.paths.api_socket);
        let identity = self.identity(launch.vsock_cid)?;
        if launch.disk != launch.paths.root_disk {
            // A device made over the disk file (dm-snapshot): opened by QEMU, as the VM.
            std::os::unix::fs::chown(launch.disk, Some(identity.uid), Some(identity.gid))
                .map_err(crate::host::file_error("chown", launch.disk))?;
        }
        // In the order `args` numbers them.
        let mut fds = Vec::new();
        if self.accel == Accel::Kvm {
            fds.push(open_device(Path::new(KVM_DEVICE))?);
        }
        if self.vsock == VsockMode::Kernel {
            fds.push(open_vhost_vsock()?);
        }
        if let Some(nic) = launch.nic {
            fds.push(crate::host::network::open_tap(&nic.tap)?);
        }
        let args = self.args(launch);
        tracing::debug!(binary = %self.binary.display(), args = ?args, uid = identity.uid, "qemu command line");
        // The images' group: it reads the image's kernel, initramfs and root file system.
        let mut groups = launch.extra_groups.to_vec();
        groups.extend(self.image_group());
        command::spawn_confined(&self.binary, &args, &launch.paths.vmm_log, identity, &groups, fds)
    }

    async fn boot(&self, launch: &LaunchSpec<'_>, vmm: &ProcessHandle) -> Result<(), HostError> {
        let paths = launch.paths;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        let mut qmp = loop {
            if !self.processes.alive(vmm, &paths.api_socket) {
                return Err(self.exited(paths));
            }
            if paths.api_socket.exists()
                && let Ok(qmp) = Qmp::connect(&paths.api_socket).await
            {
                break qmp;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(HostError::Timeout { what: "qmp socket".into(), seconds: 15 });
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        if let Some(state) = launch.restore_from {
            self.load_state(&mut qmp, state, vmm, paths).await?;
        }
        qmp.execute("cont").await?;
        let status = qmp.execute("query-status").await?;
        if status.get("running").and_then(serde_json::Value::as_bool) != Some(true) {
            return Err(HostError::VmmRefused { command: "query-status".into(), message: status.to_string() });
        }
        let log = std::fs::read_to_string(&paths.vmm_log).unwrap_or_default();
        if FATAL_VMM_LOG_LINES.iter().any(|line| log.contains(line)) {
            return Err(HostError::ProcessExited {
                process: "qemu vsock device",
                detail: last_log_line(&paths.vmm_log),
                log: paths.vmm_log.clone(),
            });
        }
        Ok(())
    }

    async fn power_down(&self, paths: &VmPaths) -> Result<(), HostError> {
        Qmp::connect(&paths.api_socket).await?.execute("system_powerdown").await.map(drop)
    }

    async fn pause(&self, paths: &VmPaths) -> Result<(), HostError> {
        self.run_state(paths, "stop", false).await
    }

    async fn resume(&self, paths: &VmPaths) -> Result<(), HostError> {
        self.run_state(paths, "cont", true).await
    }

    fn runs_as(&self, vsock_cid: u32) -> Option<VmIdentity> {
        self.identity(vsock_cid).ok()
    }

    /// `uid_base` itself: VMs' uids are `uid_base` + a vsock cid, and cids start at 3.
    fn image_group(&self) -> Option<u32> {
        Some(self.uid_base)
    }

    fn snapshot_group(&self, group: u32) -> Option<u32> {
        self.uid_base.checked_add(crate::domain::SNAPSHOT_GROUP_OFFSET)?.checked_add(group)
    }

    fn snapshots_unsupported(&self) -> Option<String> {
        match self.vsock {
            VsockMode::VirtioSerial => None,
            _ => Some(
                "the guest agent's vsock device cannot be saved (vhost-user-vsock is unmigratable): \
                 snapshots need agent_channel = \"virtio-serial\" in bangerd's config"
                    .into(),
            ),
        }
    }

    async fn save(&self, paths: &VmPaths, state_file: &Path, _memory_file: &Path) -> Result<(), HostError> {
        let mut qmp = Qmp::connect(&paths.api_socket).await?;
        let status = qmp.execute("query-status").await?;
        if status.get("running").and_then(serde_json::Value::as_bool) != Some(false) {
            return Err(HostError::VmmRefused { command: "save".into(), message: "the guest is not paused".into() });
        }
        qmp.execute_with("migrate-set-capabilities", ignore_shared()).await?;
        qmp.execute_with("migrate", json!({ "uri": file_uri(state_file) })).await?;
        wait_migration(&mut qmp, MIGRATION_TIMEOUT, &|| paths.api_socket.exists()).await
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::domain::{Image, ImageId, VmSpec};

    fn vmm_for_test() -> QemuVmm {
        QemuVmm::new("qemu".into(), Accel::Tcg, VsockMode::UserSpace, ProcFs::default(), 900_000)
    }

    fn args(vsock: VsockMode) -> Vec<String> {
        let vmm = QemuVmm::new("qemu".into(), Accel::Tcg, vsock, ProcFs::default(), 900_000);
        let image = Image {
            id: ImageId::generate(),
            name: "img".into(),
            kernel_path: "/img/vmlinuz".into(),
            initrd_path: Some("/img/initrd.img".into()),
            rootfs_path: "/img/rootfs.ext4".into(),
            kernel_args: "extra=1".into(),
            rootfs_size_bytes: 0,
            created_at_ms: 0,
            labels: Default::default(),
            origin: None,
        };
        let paths = VmPaths::new(Path::new("/state/vms/x"));
        let nic = crate::host::vmm::GuestNic {
            tap: "bgtap7".into(),
            mac: "02:00:00:00:00:07".into(),
            address: "172.30.0.7/24".into(),
            gateway: "172.30.0.1".into(),
            nameserver: None,
        };
        let launch = LaunchSpec {
            id: crate::domain::VmId::generate(),
            name: "web",
            paths: &paths,
            spec: VmSpec { vcpus: 2, memory_mib: 384, disk_bytes: 0 },
            image: &image,
            vsock_cid: 7,
            disk: &paths.root_disk,
            disk_format: "qcow2",
            nic: Some(&nic),
            memory: GuestMemory::Anonymous,
            restore_from: None,
            extra_groups: &[],
        };
        vmm.args(&launch).into_iter().map(|a| a.into_string().expect("utf-8")).collect()
    }

    fn after<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2).filter(|w| w[0] == flag).map(|w| w[1].as_str()).collect()
    }

    #[test]
    fn the_command_line_names_the_api_socket_and_matches_memory_sizes() {
        let args = args(VsockMode::UserSpace);
        assert_eq!(after(&args, "-qmp"), ["unix:/state/vms/x/qmp.sock,server=on,wait=off"]);
        assert_eq!(after(&args, "-m"), ["384M"]);
        assert_eq!(after(&args, "-smp"), ["2"]);
        // vhost-user maps guest memory: the memfd backend must be exactly as large.
        assert_eq!(after(&args, "-object"), ["memory-backend-memfd,id=mem,size=384M,share=on"]);
        let append = after(&args, "-append")[0];
        assert!(append.contains("banger.hostname=web") && append.ends_with("extra=1"), "{append}");
        assert_eq!(after(&args, "-serial"), ["chardev:console"]);
        assert!(after(&args, "-chardev").contains(&"file,id=console,path=/state/vms/x/console.log,append=on"));
        assert_eq!(after(&args, "-initrd"), ["/img/initrd.img"]);
        assert_eq!(after(&args, "-sandbox"), [SANDBOX]);
        assert_eq!(vmm_for_test().runs_as(7), Some(VmIdentity { uid: 900_007, gid: 900_007 }));
    }

    #[test]
    fn the_vsock_device_follows_the_host_mode() {
        let user = args(VsockMode::UserSpace);
        assert!(after(&user, "-device").contains(&"vhost-user-vsock-device,chardev=vsock"));
        assert!(after(&user, "-chardev").contains(&"socket,id=vsock,path=/state/vms/x/vhost-user.sock"));
        let kernel = args(VsockMode::Kernel);
        // The daemon opens the device: QEMU's first inherited fd, the tap its second.
        assert!(after(&kernel, "-device").contains(&"vhost-vsock-device,guest-cid=7,vhostfd=3"));
        assert!(after(&kernel, "-netdev").contains(&"tap,id=net0,fd=4"), "{:?}", after(&kernel, "-netdev"));
        assert!(after(&user, "-netdev").contains(&"tap,id=net0,fd=3"));
        assert!(!after(&kernel, "-chardev").iter().any(|c| c.contains("vhost-user")));
        // The virtio-serial channel: a port QEMU serves, and no vsock device at all.
        let serial = args(VsockMode::VirtioSerial);
        let devices = after(&serial, "-device");
        assert!(devices.contains(&"virtio-serial-device,max_ports=2"), "{devices:?}");
        assert!(devices.contains(&"virtserialport,chardev=agent,name=banger.agent"), "{devices:?}");
        assert!(!devices.iter().any(|d| d.contains("vsock")), "{devices:?}");
        assert!(
            after(&serial, "-chardev").contains(&"socket,id=agent,path=/state/vms/x/agent.sock,server=on,wait=off")
        );
    }
}
