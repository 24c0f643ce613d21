//! Resource limits for VMM processes through cgroups: v1 (per-controller hierarchies, as on
//! this class of host) or v2 (one unified hierarchy), detected at startup.
//!
//! Each VM gets `banger/<vm id>` under the cpu and memory controllers (and pids, and blkio
//! where mounted): a CPU quota of one core per vCPU plus one for the VMM's own threads and
//! its vsock backend, a memory limit of the guest's memory plus the VMM's overhead, a tasks
//! limit. The group is a handle: reconcile removes it once the VMM is gone.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use super::{HostError, file_error};
use crate::domain::{ProcessHandle, VmSpec};

/// The CFS period the CPU quota is expressed in.
const CPU_PERIOD_US: u64 = 100_000;

/// The most tasks (processes and threads) one VM's group may hold: QEMU's vCPU, I/O and
/// helper threads and the vsock backend's fit many times over; a fork bomb in an escaped
/// VMM does not.
pub const PIDS_MAX: u64 = 1024;

/// The I/O weight of a VM's group, where the host's I/O scheduler has weights: the same for
/// every VM (the default of the range 1–10000 for v2, 10–1000 for v1), so that no VM takes
/// the disk from the others or from the daemon.
const IO_WEIGHT: u64 = 100;

/// The group every VM's group sits in: a VM's group is `banger/<vm id>`.
pub const PARENT_GROUP: &str = "banger";

/// The group of the VM with this id.
pub fn group_of(vm_id: impl std::fmt::Display) -> String {
    format!("{PARENT_GROUP}/{vm_id}")
}

/// What the host offers to bound a VMM's resources.
#[tonic::async_trait]
pub trait ResourceLimits: Send + Sync + std::fmt::Debug {
    /// Puts `processes` (a VMM, its vsock backend) into a group named `group` limited for
    /// `spec`; returns the group's name (its handle), or `None` where the host offers no
    /// usable cgroups.
    async fn confine(
        &self,
        group: &str,
        spec: VmSpec,
        processes: &[ProcessHandle],
    ) -> Result<Option<String>, HostError>;

    /// Removes a group; one already gone is fine. Waits briefly for its last process to go.
    async fn remove(&self, group: &str) -> Result<(), HostError>;

    /// Makes a group's processes background work (an unclaimed pool member: they run on the
    /// CPU time others leave) or ordinary work again. Nothing where the host has no cgroups.
    async fn set_background(&self, _group: &str, _background: bool) -> Result<(), HostError> {
        Ok(())
    }
}

/// Which cgroup hierarchy the host has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    /// Per-controller hierarchies (`/sys/fs/cgroup/<controller>/`).
    V1,
    /// The unified hierarchy with the cpu and memory controllers.
    V2,
    /// Neither is usable.
    None,
}

/// Limits through the host's cgroup file system.
#[derive(Debug, Clone)]
pub struct Cgroups {
    root: PathBuf,
    version: CgroupVersion,
    /// Memory allowed on top of the guest's for the VMM itself (device emulation, TCG code
    /// cache, page tables).
    overhead_mib: u64,
}

/// Creates `dir` and its parents. Retried because [`ResourceLimits::remove`] of another VM
/// may remove an emptied parent in between.
fn create_group_dir(dir: &Path) -> Result<(), HostError> {
    let mut attempt = 0;
    loop {
        match super::fs::make_dir(dir, 0o755) {
            Err(HostError::File { source, .. }) if source.kind() == std::io::ErrorKind::NotFound && attempt < 3 => {
                attempt += 1
            }
            other => return other,
        }
    }
}

impl Cgroups {
    /// Where cgroup file systems are mounted on Linux.
    pub const DEFAULT_ROOT: &'static str = "/sys/fs/cgroup";

    /// Detects the hierarchy under `root` (normally `/sys/fs/cgroup`).
    pub fn detect(root: PathBuf, overhead_mib: u64) -> Self {
        let controllers = std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
        let version = if controllers.split_whitespace().any(|c| c == "memory")
            && controllers.split_whitespace().any(|c| c == "cpu")
        {
            CgroupVersion::V2
        } else if root.join("memory/memory.limit_in_bytes").exists() && root.join("cpu/cpu.cfs_quota_us").exists() {
            CgroupVersion::V1
        } else {
            CgroupVersion::None
        };
        Self { root, version, overhead_mib }
    }

    /// The hierarchy in use.
    pub fn version(&self) -> CgroupVersion {
        self.version
    }

    /// The directories of one group, one per controller (v1: cpu, memory, and pids and blkio
    /// where mounted) or one (v2).
    pub fn group_dirs(&self, group: &str) -> Vec<PathBuf> {
        match self.version {
            CgroupVersion::V1 => ["cpu", "memory", "pids", "blkio"]
                .iter()
                .enumerate()
                .filter(|(i, controller)| *i < 2 || self.root.join(controller).join("cgroup.procs").exists())
                .map(|(_, controller)| self.root.join(controller).join(group))
                .collect(),
            CgroupVersion::V2 => vec![self.root.join(group)],
            CgroupVersion::None => vec![],
        }
    }

    fn write(path: &Path, value: &str) -> Result<(), HostError> {
        std::fs::write(path, value).map_err(file_error("write", path))
    }

    fn is_controller_root(&self, dir: &Path) -> bool {
        self.version == CgroupVersion::V1 && dir.parent() == Some(self.root.as_path())
    }

    /// The memory limit for a VM of `spec`, in bytes.
    pub fn memory_limit_bytes(&self, spec: VmSpec) -> u64 {
        (u64::from(spec.memory_mib) + self.overhead_mib) * 1024 * 1024
    }

    /// The CPU quota for a VM of `spec`, in µs per [`CPU_PERIOD_US`]: a core per vCPU, and
    /// one for the device model's threads and the vsock backend, which work beside the
    /// vCPUs (with one core per vCPU only, the bench saw ~50 ms of each boot held back).
    pub fn cpu_quota_us(spec: VmSpec) -> u64 {
        (u64::from(spec.vcpus) + 1) * CPU_PERIOD_US
    }

    /// The arguments that make Firecracker's jailer create the group [`group_of`] names,
    /// with the limits [`ResourceLimits::confine`] sets, and join it before it execs the
    /// VMM (its `--id` must be the VM's id). None where the host has no usable cgroups.
    pub fn jailer_args(&self, spec: VmSpec) -> Vec<String> {
        let memory = self.memory_limit_bytes(spec);
        let quota = Self::cpu_quota_us(spec);
        let limits = match self.version {
            CgroupVersion::None => return Vec::new(),
            CgroupVersion::V1 => vec![
                ("1", format!("cpu.cfs_period_us={CPU_PERIOD_US}")),
                ("1", format!("cpu.cfs_quota_us={quota}")),
                ("1", format!("memory.limit_in_bytes={memory}")),
            ],
            CgroupVersion::V2 => {
                vec![("2", format!("cpu.max={quota} {CPU_PERIOD_US}")), ("2", format!("memory.max={memory}"))]
            }
        };
        let version = limits[0].0;
        let mut args = vec!["--cgroup-version".into(), version.into(), "--parent-cgroup".into(), PARENT_GROUP.into()];
        for (_, limit) in limits {
            args.extend(["--cgroup".into(), limit]);
        }
        args
    }

    /// The limits of a group for `spec`: (controller dir, file, value) for v1, (file, value)
    /// for v2 with "" as the controller; pids and I/O weight only where the host has them
    /// (checked by the caller: a file that does not exist is skipped).
    fn limits(&self, spec: VmSpec) -> Vec<(&'static str, &'static str, String)> {
        let memory = self.memory_limit_bytes(spec).to_string();
        let quota = Self::cpu_quota_us(spec);
        match self.version {
            CgroupVersion::None => Vec::new(),
            CgroupVersion::V1 => vec![
                ("cpu", "cpu.cfs_period_us", CPU_PERIOD_US.to_string()),
                ("cpu", "cpu.cfs_quota_us", quota.to_string()),
                ("memory", "memory.limit_in_bytes", memory),
                ("pids", "pids.max", PIDS_MAX.to_string()),
                ("blkio", "blkio.bfq.weight", IO_WEIGHT.to_string()),
                ("blkio", "blkio.weight", IO_WEIGHT.to_string()),
            ],
            CgroupVersion::V2 => vec![
                ("", "cpu.max", format!("{quota} {CPU_PERIOD_US}")),
                ("", "memory.max", memory),
                ("", "pids.max", PIDS_MAX.to_string()),
                ("", "io.weight", format!("default {IO_WEIGHT}")),
            ],
        }
    }

    /// [`ResourceLimits::confine`], blocking.
    fn confine_now(&self, group: &str, spec: VmSpec, pids: &[u32]) -> Result<Option<String>, HostError> {
        if self.version == CgroupVersion::None {
            return Ok(None);
        }
        if self.version == CgroupVersion::V2
            && let Some(parent) = self.root.join(group).parent()
        {
            // Children of a v2 group only get the controllers its parent delegates.
            create_group_dir(parent)?;
            for controller in ["+cpu", "+memory", "+pids", "+io"] {
                let _ = std::fs::write(parent.join("cgroup.subtree_control"), controller);
            }
        }
        let dirs = self.group_dirs(group);
        for dir in &dirs {
            create_group_dir(dir)?;
        }
        for (controller, file, value) in self.limits(spec) {
            let path = self.root.join(controller).join(group).join(file);
            // cpu and memory are required (detect checked them); pids and I/O weight are
            // set where the host has them.
            let required = matches!(file, "cpu.cfs_period_us" | "cpu.cfs_quota_us" | "memory.limit_in_bytes")
                || matches!(file, "cpu.max" | "memory.max");
            if required || path.exists() {
                Self::write(&path, &value)?;
            }
        }
        for dir in &dirs {
            for pid in pids {
                Self::write(&dir.join("cgroup.procs"), &pid.to_string())?;
            }
        }
        Ok(Some(group.to_owned()))
    }
}

/// CPU weights (v1 `cpu.shares`, v2 `cpu.weight`) of background and ordinary groups.
const CPU_WEIGHTS: [(&str, &str, &str); 2] = [("cpu/", "cpu.shares", "2"), ("", "cpu.weight", "1")];
const CPU_WEIGHTS_DEFAULT: [&str; 2] = ["1024", "100"];

#[tonic::async_trait]
impl ResourceLimits for Cgroups {
    async fn set_background(&self, group: &str, background: bool) -> Result<(), HostError> {
        let index = match self.version {
            CgroupVersion::None => return Ok(()),
            CgroupVersion::V1 => 0,
            CgroupVersion::V2 => 1,
        };
        let (controller, file, low) = CPU_WEIGHTS[index];
        let value = if background { low } else { CPU_WEIGHTS_DEFAULT[index] };
        let path = self.root.join(format!("{controller}{group}")).join(file);
        tokio::task::spawn_blocking(move || Self::write(&path, value))
            .await
            .map_err(|e| HostError::Io { what: "set a cgroup's cpu weight".into(), source: std::io::Error::other(e) })?
    }

    async fn confine(
        &self,
        group: &str,
        spec: VmSpec,
        processes: &[ProcessHandle],
    ) -> Result<Option<String>, HostError> {
        // Blocking: the move into the group waits for the kernel for milliseconds.
        let (cgroups, owned) = (self.clone(), group.to_owned());
        let pids: Vec<u32> = processes.iter().map(|process| process.pid).collect();
        tokio::task::spawn_blocking(move || cgroups.confine_now(&owned, spec, &pids))
            .await
            .map_err(|e| HostError::Io { what: format!("confine {group}"), source: std::io::Error::other(e) })?
    }

    async fn remove(&self, group: &str) -> Result<(), HostError> {
        for dir in self.group_dirs(group) {
            let mut attempts = 0;
            loop {
                match std::fs::remove_dir(&dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    // A process that was just killed leaves the group a moment later.
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) && attempts < 50 => {
                        attempts += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Err(e) => return Err(file_error("remove", &dir)(e)),
                }
            }
            // The shared parent (`banger/`) goes with its last group; busy means others remain.
            if let Some(parent) = dir.parent().filter(|p| *p != self.root && !self.is_controller_root(p)) {
                let _ = std::fs::remove_dir(parent);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_jailer_makes_the_same_group_with_the_same_limits() {
        let spec = VmSpec { vcpus: 2, memory_mib: 256, disk_bytes: 0 };
        let with = |version| Cgroups { root: "/sys/fs/cgroup".into(), version, overhead_mib: 512 }.jailer_args(spec);
        let memory = (256 + 512) * 1024 * 1024u64;
        assert_eq!(
            with(CgroupVersion::V1),
            [
                "--cgroup-version",
                "1",
                "--parent-cgroup",
                "banger",
                "--cgroup",
                "cpu.cfs_period_us=100000",
                "--cgroup",
                "cpu.cfs_quota_us=300000",
                "--cgroup",
                &format!("memory.limit_in_bytes={memory}"),
            ]
        );
        assert_eq!(
            with(CgroupVersion::V2),
            [
                "--cgroup-version",
                "2",
                "--parent-cgroup",
                "banger",
                "--cgroup",
                "cpu.max=300000 100000",
                "--cgroup",
                &format!("memory.max={memory}"),
            ]
        );
        assert!(with(CgroupVersion::None).is_empty());
        // The jailer names the group <parent>/<its --id>: the VM's group.
        assert_eq!(group_of("01ABC"), format!("{PARENT_GROUP}/01ABC"));
    }

    #[tokio::test]
    async fn confines_a_real_process_with_the_expected_limits_and_removes_its_group() {
        let cgroups = Cgroups::detect("/sys/fs/cgroup".into(), 512);
        if cgroups.version() == CgroupVersion::None {
            banger_tests::skip("no usable cgroup cpu and memory controllers on this host");
            return;
        }
        let mut child = std::process::Command::new("sleep").arg("30").spawn().expect("sleep");
        let process = ProcessHandle { pid: child.id(), start_time: 0 };
        let group = format!("banger-test/{}", std::process::id());
        let spec = VmSpec { vcpus: 2, memory_mib: 256, disk_bytes: 0 };
        let named = cgroups.confine(&group, spec, &[process]).await;
        // A pool member's group: background CPU weight, then ordinary once claimed.
        let weight = || {
            let path = match cgroups.version() {
                CgroupVersion::V1 => format!("/sys/fs/cgroup/cpu/{group}/cpu.shares"),
                _ => format!("/sys/fs/cgroup/{group}/cpu.weight"),
            };
            std::fs::read_to_string(path).map(|s| s.trim().to_owned()).unwrap_or_default()
        };
        let lowered = cgroups.set_background(&group, true).await.map(|()| weight());
        let raised = cgroups.set_background(&group, false).await.map(|()| weight());
        // Checked before cleanup, asserted after, so a failure still removes the process and group.
        let check = || -> Result<(), String> {
            let read = |path: String| {
                std::fs::read_to_string(&path).map(|s| s.trim().to_owned()).map_err(|e| format!("{path}: {e}"))
            };
            if named.as_ref().map_err(|e| e.to_string())?.as_deref() != Some(group.as_str()) {
                return Err(format!("confine returned {named:?}"));
            }
            let weights =
                (lowered.as_deref().map_err(|e| e.to_string())?, raised.as_deref().map_err(|e| e.to_string())?);
            if weights != ("2", "1024") && weights != ("1", "100") {
                return Err(format!("cpu weights background/ordinary: {weights:?}"));
            }
            let membership = read(format!("/proc/{}/cgroup", process.pid))?;
            if !membership.contains(&group) {
                return Err(format!("not in the group: {membership}"));
            }
            if cgroups.version() == CgroupVersion::V1 {
                let limit = read(format!("/sys/fs/cgroup/memory/{group}/memory.limit_in_bytes"))?;
                let quota = read(format!("/sys/fs/cgroup/cpu/{group}/cpu.cfs_quota_us"))?;
                if limit != ((256 + 512) * 1024 * 1024u64).to_string() || quota != "300000" {
                    return Err(format!("limits: memory {limit}, cpu quota {quota}"));
                }
                if std::path::Path::new("/sys/fs/cgroup/pids/cgroup.procs").exists() {
                    let pids = read(format!("/sys/fs/cgroup/pids/{group}/pids.max"))?;
                    if pids != PIDS_MAX.to_string() {
                        return Err(format!("pids.max {pids}"));
                    }
                }
            }
            Ok(())
        };
        let checked = check();
        let _ = child.kill();
        let _ = child.wait();
        cgroups.remove(&group).await.expect("remove");
        for dir in cgroups.group_dirs("banger-test") {
            let _ = std::fs::remove_dir(dir);
        }
        checked.expect("limits");
        assert!(cgroups.group_dirs(&group).iter().all(|d| !d.exists()));
    }
}
