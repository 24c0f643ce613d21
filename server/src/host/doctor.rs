//! What this host supports, checked on demand for `banger doctor`: every probe is cheap
//! (a file, a `--version`, one reflink copy), so the report is always current.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
};

use super::{
    cgroup::CgroupVersion,
    command::{self, resolve_program},
    vmm::Accel,
    vsock::VsockMode,
};

/// The outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckStatus {
    /// Available and working.
    Pass,
    /// Missing or limited; banger works around it.
    Warn,
    /// Missing and needed.
    Fail,
}

/// One capability of the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// Its short name.
    pub name: &'static str,
    /// The outcome.
    pub status: CheckStatus,
    /// What was found and what follows.
    pub detail: String,
}

/// The drivers the daemon uses here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choices {
    /// VMM driver.
    pub vmm: String,
    /// Accelerator.
    pub accel: String,
    /// Why that accelerator.
    pub accel_reason: String,
    /// Guest-agent channel.
    pub agent_channel: String,
    /// Root disk strategy.
    pub root_disk: String,
    /// cgroup hierarchy.
    pub cgroup: String,
}

/// What the checks look at.
#[derive(Debug, Clone)]
pub struct DoctorInputs {
    /// The daemon's state directory (reflinks are checked there).
    pub state_dir: PathBuf,
    /// `qemu-system-x86_64`.
    pub qemu: PathBuf,
    /// `vhost-device-vsock`.
    pub vsock_backend: PathBuf,
    /// The VMM driver in use (`qemu` or `firecracker`).
    pub vmm: &'static str,
    /// `firecracker`.
    pub firecracker: PathBuf,
    /// `jailer`, when Firecracker runs under it.
    pub jailer: Option<PathBuf>,
    /// The accelerator in use.
    pub accel: Accel,
    /// Why that one (`accel = "auto"`'s probe, or the config).
    pub accel_reason: String,
    /// VMs' network, described; `None`: they have none.
    pub network: Option<String>,
    /// The vsock mode in use.
    pub vsock: VsockMode,
    /// The cgroup hierarchy in use.
    pub cgroup: CgroupVersion,
    /// The root disk strategy for new VMs.
    pub root_disk: crate::domain::RootDiskStrategy,
}

fn check(name: &'static str, status: CheckStatus, detail: impl Into<String>) -> Check {
    Check { name, status, detail: detail.into() }
}

/// The first line of `program --version`, if it runs.
async fn version(program: &Path) -> Option<String> {
    let path = resolve_program(program)?;
    let out = command::run(&path, &[OsString::from("--version")]).await.ok()?;
    let text = String::from_utf8_lossy(&out).lines().next().unwrap_or_default().trim().to_owned();
    Some(format!("{text} ({})", path.display()))
}

fn cpu_has_virtualization() -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .map(|info| {
            info.lines()
                .filter(|l| l.starts_with("flags"))
                .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
        })
        .unwrap_or(false)
}

/// Runs every check, in a stable order.
pub async fn diagnose(inputs: &DoctorInputs) -> (Vec<Check>, Choices) {
    use CheckStatus::{Fail, Pass, Warn};
    let mut checks = Vec::new();

    let kvm = Path::new("/dev/kvm").exists();
    let reason = &inputs.accel_reason;
    checks.push(match (kvm, cpu_has_virtualization(), inputs.accel) {
        (true, _, Accel::Kvm) => check("kvm", Pass, format!("guests use KVM: {reason}")),
        (true, true, Accel::Tcg) => {
            check("kvm", Warn, format!("/dev/kvm with hardware virtualization, but guests use TCG: {reason}"))
        }
        (true, false, Accel::Tcg) => check(
            "kvm",
            Warn,
            format!(
                "/dev/kvm exists but the CPU shows no vmx/svm (PVM or nested virtualization); guests use TCG: {reason}"
            ),
        ),
        (false, _, _) => {
            check("kvm", Warn, format!("no /dev/kvm: guests use TCG (software emulation, slower): {reason}"))
        }
    });
    let firecracker = inputs.vmm == "firecracker";
    checks.push(match version(&inputs.qemu).await {
        Some(v) => check("qemu", Pass, v),
        None if firecracker => {
            check("qemu", Warn, format!("{} not found: only Firecracker can boot VMs", inputs.qemu.display()))
        }
        None => check("qemu", Fail, format!("{} not found: no VM can boot", inputs.qemu.display())),
    });
    checks.push(match (version(&inputs.firecracker).await, firecracker) {
        (Some(v), true) => check("firecracker", Pass, format!("{v}; the VMM driver in use")),
        (Some(v), false) => check("firecracker", Pass, format!("{v}; used with vmm = \"firecracker\"")),
        (None, true) => {
            check("firecracker", Fail, format!("{} not found: no VM can boot", inputs.firecracker.display()))
        }
        (None, false) => check(
            "firecracker",
            Warn,
            format!("{} not found: the Firecracker driver is unavailable", inputs.firecracker.display()),
        ),
    });
    let jailer = inputs.jailer.clone().unwrap_or_else(|| "jailer".into());
    checks.push(match (version(&jailer).await, inputs.jailer.is_some()) {
        (Some(v), true) => check("jailer", Pass, format!("{v}; every Firecracker runs under it")),
        (Some(v), false) => check("jailer", Pass, format!("{v}; used with jailer = true")),
        (None, true) => check("jailer", Fail, format!("{} not found: no VM can boot", jailer.display())),
        (None, false) => check("jailer", Warn, format!("{} not found: Firecracker cannot be jailed", jailer.display())),
    });
    checks.push(match inputs.vsock {
        VsockMode::Kernel => check("vsock", Pass, "/dev/vhost-vsock: the kernel carries the guest-agent channel"),
        VsockMode::VmmHybrid => check("vsock", Pass, "the VMM serves the guest-agent channel (hybrid vsock)"),
        VsockMode::VirtioSerial => {
            check("vsock", Pass, "agent_channel = \"virtio-serial\": QEMU serves the guest-agent channel")
        }
        VsockMode::UserSpace => match version(&inputs.vsock_backend).await {
            Some(v) => check("vsock", Pass, format!("no /dev/vhost-vsock; user-space backend {v}")),
            None => check(
                "vsock",
                Fail,
                format!(
                    "no /dev/vhost-vsock and {} not found: guest agents are unreachable",
                    inputs.vsock_backend.display()
                ),
            ),
        },
    });
    checks.push(if Path::new("/dev/mapper/control").exists() && inputs.jailer.is_some() {
        check(
            "device-mapper",
            Pass,
            "/dev/mapper/control; not used for root disks: jailed Firecracker VMs boot from disk files \
             (jailer = false would allow dm-snapshot, with Firecracker as root)",
        )
    } else if Path::new("/dev/mapper/control").exists() {
        check("device-mapper", Pass, "/dev/mapper/control")
    } else {
        check("device-mapper", Warn, "no /dev/mapper/control: dm-snapshot root disks are unavailable")
    });
    checks.push(match super::storage::reflink_supported(&inputs.state_dir).await {
        Ok(true) => check("reflink", Pass, format!("{} supports reflink copies", inputs.state_dir.display())),
        Ok(false) => check(
            "reflink",
            Warn,
            format!(
                "{} does not support reflink copies (needs XFS or btrfs); root disks use qcow2 overlays",
                inputs.state_dir.display()
            ),
        ),
        Err(e) => check("reflink", Warn, format!("cannot probe the state dir: {e}")),
    });
    checks.push(match version(Path::new("nft")).await {
        Some(v) => check("nftables", Pass, v),
        None => check("nftables", Warn, "nft not installed: per-VM NAT is unavailable"),
    });
    checks.push(if Path::new("/dev/net/tun").exists() {
        check("tap", Pass, "/dev/net/tun")
    } else {
        check("tap", Warn, "no /dev/net/tun: VMs cannot get tap interfaces")
    });
    checks.push(match &inputs.network {
        Some(network) => check("network", Pass, network.clone()),
        None => check("network", Warn, "network = \"none\": VMs have no network"),
    });
    checks.push(match inputs.cgroup {
        CgroupVersion::V1 => check("cgroup", Pass, "v1 cpu and memory controllers: each VMM is limited"),
        CgroupVersion::V2 => check("cgroup", Pass, "v2 with cpu and memory: each VMM is limited"),
        CgroupVersion::None => check("cgroup", Warn, "no usable cpu and memory controllers: VMMs run unlimited"),
    });

    let choices = Choices {
        vmm: match inputs.jailer {
            Some(_) => format!("{} under jailer", inputs.vmm),
            None => inputs.vmm.into(),
        },
        accel: match inputs.accel {
            Accel::Tcg => "tcg".into(),
            Accel::Kvm => "kvm".into(),
        },
        accel_reason: inputs.accel_reason.clone(),
        agent_channel: match inputs.vsock {
            VsockMode::Kernel => "kernel vhost-vsock".into(),
            VsockMode::UserSpace => "vhost-device-vsock".into(),
            VsockMode::VmmHybrid => "firecracker hybrid vsock".into(),
            VsockMode::VirtioSerial => "virtio-serial".into(),
        },
        root_disk: match inputs.root_disk {
            crate::domain::RootDiskStrategy::Qcow2 => "qcow2 overlay".into(),
            crate::domain::RootDiskStrategy::Reflink => "reflink clone".into(),
            crate::domain::RootDiskStrategy::Copy => "sparse copy".into(),
            crate::domain::RootDiskStrategy::DmSnapshot => "device-mapper snapshot".into(),
        },
        cgroup: match inputs.cgroup {
            CgroupVersion::V1 => "v1".into(),
            CgroupVersion::V2 => "v2".into(),
            CgroupVersion::None => "none".into(),
        },
    };
    (checks, choices)
}
