//! Snapshots: a running VM's memory, device state and disk saved at one instant, and the
//! identity a VM started from one is given.

use std::path::{Path, PathBuf};

use super::{Egress, ImageId, Labels, RootDiskStrategy, SnapshotId, VmId, VmSpec};

/// A snapshot's files are group-readable by its own group, `uid_base` + this + its group
/// number: VMs started from it run with that supplementary group, no one else has it.
pub const SNAPSHOT_GROUP_OFFSET: u32 = 1 << 24;

/// A VM saved at one instant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Its id.
    pub id: SnapshotId,
    /// Its unique name.
    pub name: String,
    /// The VM it was taken from.
    pub source_vm_id: VmId,
    /// That VM's name at the time.
    pub source_vm_name: String,
    /// The image under its disk.
    pub image_id: ImageId,
    /// The shape of every VM started from it.
    pub spec: VmSpec,
    /// Their egress policy.
    pub egress: Egress,
    /// How the source's disk was made (its clones' disks are made the same way).
    pub root_disk: RootDiskStrategy,
    /// Whether the source had a network interface (its clones must have one too).
    pub networked: bool,
    /// Its labels.
    pub labels: Labels,
    /// The directory holding its files.
    pub dir: PathBuf,
    /// Its group number (see [`SNAPSHOT_GROUP_OFFSET`]), unique among live snapshots.
    pub group: u32,
    /// True once its files are complete; a snapshot left incomplete by a crash is removed.
    pub ready: bool,
    /// Milliseconds since the Unix epoch when it was taken.
    pub created_at_ms: i64,
    /// The operation that took it.
    pub last_operation: String,
    /// The snapshot its disk overlays (the source's disk overlaid it), if any.
    pub base: Option<SnapshotId>,
    /// Taken of a guest without an agent: nothing in it was synced, and VMs started from
    /// it are not told their identity (they keep their source's).
    pub without_agent: bool,
}

impl Snapshot {
    /// Its files.
    pub fn paths(&self) -> SnapshotPaths {
        SnapshotPaths::new(&self.dir, self.root_disk)
    }
}

/// What a VM does once its snapshot is saved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotAfter {
    /// Runs on from the snapshot, keeping its identity, with fresh entropy.
    Resume,
    /// Stops.
    Stop,
}

/// Where a snapshot's files live inside its directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotPaths {
    /// The directory.
    pub dir: PathBuf,
    /// Guest memory, as the guest left it (clones map it copy-on-write).
    pub memory: PathBuf,
    /// The VMM's device state (QEMU's migration stream without the memory).
    pub state: PathBuf,
    /// The root disk at that instant (clones' disks overlay it).
    pub disk: PathBuf,
    /// The key the guest's agent held (root's alone: a clone's VMM may read the rest).
    pub agent_key: PathBuf,
}

impl SnapshotPaths {
    /// The paths inside `dir`, the disk named as `strategy` names disks.
    pub fn new(dir: &Path, strategy: RootDiskStrategy) -> Self {
        Self {
            dir: dir.to_owned(),
            memory: dir.join("memory"),
            state: dir.join("state"),
            disk: dir.join(strategy.file_name()),
            agent_key: dir.join("agent.key"),
        }
    }
}

/// The identity a guest is told when it is handed out under a new name.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GuestIdentity {
    /// Its hostname.
    pub hostname: String,
    /// Its interface's MAC and address, when it has a network and they change.
    pub network: Option<GuestNetwork>,
    /// Its new machine-id (32 hex digits).
    pub machine_id: Option<String>,
    /// The host's wall clock, nanoseconds since the Unix epoch.
    pub realtime_ns: Option<i64>,
    /// Fresh entropy for its kernel's generator.
    pub entropy: Vec<u8>,
}

impl GuestIdentity {
    /// Only a new hostname (a pool member claimed: booted on its own, unique already).
    pub fn hostname(hostname: &str) -> Self {
        Self { hostname: hostname.to_owned(), ..Self::default() }
    }
}

/// A guest interface's identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestNetwork {
    /// Its MAC address.
    pub mac: String,
    /// Its address with prefix length.
    pub address: String,
    /// Its default gateway.
    pub gateway: String,
}
