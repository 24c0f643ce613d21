//! A VM's durable record, its spec, and the state machine of its lifecycle.
//!
//! ```text
//!   create ──> Created ──start──> Starting ──booted──> Running
//!                 ^                  │ start_failed       │ stop
//!                 │                  v                    v
//!              (start)            Error <──died──── Stopping ──stopped──> Stopped
//!   Stopped and Error go back to Starting on start; Error goes to Stopping on stop.
//!   Running <──resume── Paused <──pause── Running; Paused goes to Stopping on stop.
//! ```

use std::path::{Path, PathBuf};

use super::{ImageId, VmId};

/// vCPUs when the caller gives none.
pub const DEFAULT_VCPUS: u32 = 1;
/// The most vCPUs a VM may have.
pub const MAX_VCPUS: u32 = 32;
/// Guest memory in MiB when the caller gives none.
pub const DEFAULT_MEMORY_MIB: u32 = 256;
/// The least guest memory that boots the default image's kernel.
pub const MIN_MEMORY_MIB: u32 = 64;
/// The most guest memory a VM may have (64 GiB).
pub const MAX_MEMORY_MIB: u32 = 65536;

/// Where a VM is in its lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VmState {
    /// Recorded, never booted.
    Created,
    /// The VMM is launching or the guest is not ready yet.
    Starting,
    /// The guest agent answered.
    Running,
    /// Shutting down.
    Stopping,
    /// Not running.
    Stopped,
    /// An operation failed or the VMM died on its own.
    Error,
    /// The VMM runs with its vCPUs stopped: memory and devices kept, the guest frozen.
    Paused,
}

impl VmState {
    /// The name stored in SQLite and printed in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Starting => "starting",
            Self::Running => "running",
            Self::Stopping => "stopping",
            Self::Stopped => "stopped",
            Self::Error => "error",
            Self::Paused => "paused",
        }
    }

    /// Parses a stored state name.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "created" => Self::Created,
            "starting" => Self::Starting,
            "running" => Self::Running,
            "stopping" => Self::Stopping,
            "stopped" => Self::Stopped,
            "error" => Self::Error,
            "paused" => Self::Paused,
            _ => return None,
        })
    }

    /// True when a VMM process may exist for a VM in this state.
    pub fn may_have_vmm(self) -> bool {
        matches!(self, Self::Starting | Self::Running | Self::Stopping | Self::Paused)
    }

    /// True when the VMM of a VM in this state is expected alive and adopted as it is.
    pub fn is_up(self) -> bool {
        matches!(self, Self::Running | Self::Paused)
    }
}

/// Something that moves a VM from one state to another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// A start operation begins.
    Start,
    /// The guest agent answered.
    Booted,
    /// A start operation failed and was unwound.
    StartFailed,
    /// A stop operation begins.
    Stop,
    /// The VMM is gone and the host resources are released.
    Stopped,
    /// The VMM died without being asked to.
    Died,
    /// The guest's vCPUs were stopped.
    Pause,
    /// A paused guest's vCPUs run again.
    Resume,
}

/// Why a VM's last operation failed or why it stopped on its own, as a code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VmFault {
    /// The VMM exited without being asked.
    VmmExited,
    /// An operation was cut short by the daemon's exit.
    Interrupted,
    /// A start failed.
    StartFailed,
    /// A failed create could not release everything it made.
    CreateLeftovers,
}

impl VmFault {
    /// The stored form.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::VmmExited => "vmm_exited",
            Self::Interrupted => "interrupted",
            Self::StartFailed => "start_failed",
            Self::CreateLeftovers => "create_leftovers",
        }
    }

    /// Parses the stored form.
    pub fn parse(stored: &str) -> Option<Self> {
        [Self::VmmExited, Self::Interrupted, Self::StartFailed, Self::CreateLeftovers]
            .into_iter()
            .find(|fault| fault.as_str() == stored)
    }
}

/// A transition that the VM's current state does not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a vm that is {} cannot {}", from.as_str(), verb(*transition))]
pub struct TransitionError {
    /// The state the VM was in.
    pub from: VmState,
    /// What was attempted.
    pub transition: Transition,
}

fn verb(transition: Transition) -> &'static str {
    match transition {
        Transition::Start => "be started",
        Transition::Booted => "finish booting",
        Transition::StartFailed => "fail to start",
        Transition::Stop => "be stopped",
        Transition::Stopped => "finish stopping",
        Transition::Died => "die",
        Transition::Pause => "be paused",
        Transition::Resume => "be resumed",
    }
}

impl VmState {
    /// The one function that decides which state a transition leads to.
    pub fn apply(self, transition: Transition) -> Result<VmState, TransitionError> {
        use Transition as T;
        use VmState as S;
        let next = match (self, transition) {
            (S::Created | S::Stopped | S::Error, T::Start) => S::Starting,
            (S::Starting, T::Booted) => S::Running,
            (S::Starting, T::StartFailed) => S::Error,
            // Stopping an errored VM is how a user clears whatever the failure left running.
            (S::Running | S::Paused | S::Error, T::Stop) => S::Stopping,
            (S::Running, T::Pause) => S::Paused,
            (S::Paused, T::Resume) => S::Running,
            (S::Stopping, T::Stopped) => S::Stopped,
            // A VMM that dies while being stopped did what was asked.
            (S::Stopping, T::Died) => S::Stopped,
            (S::Starting | S::Running | S::Paused, T::Died) => S::Error,
            (from, transition) => return Err(TransitionError { from, transition }),
        };
        Ok(next)
    }
}

/// How a VM's copy-on-write root disk is made from its image's root file system.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RootDiskStrategy {
    /// A qcow2 overlay whose backing file is the image (QEMU only).
    Qcow2,
    /// A reflink clone of the image: instant, shares extents (XFS, btrfs).
    Reflink,
    /// A sparse copy of the image: works everywhere, costs a copy.
    Copy,
    /// A device-mapper `snapshot` of a read-only loop device over the image, its exceptions
    /// in a sparse per-VM file on a second loop device: raw, instant, any file system;
    /// needs device-mapper.
    DmSnapshot,
}

impl<'de> serde::Deserialize<'de> for RootDiskStrategy {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        Self::parse(&name).ok_or_else(|| {
            serde::de::Error::invalid_value(serde::de::Unexpected::Str(&name), &"qcow2, reflink, copy or dm-snapshot")
        })
    }
}

impl RootDiskStrategy {
    /// The name stored in SQLite and accepted in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Qcow2 => "qcow2",
            Self::Reflink => "reflink",
            Self::Copy => "copy",
            Self::DmSnapshot => "dm-snapshot",
        }
    }

    /// Parses a stored or configured name.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "qcow2" => Self::Qcow2,
            "reflink" => Self::Reflink,
            "copy" => Self::Copy,
            "dm-snapshot" => Self::DmSnapshot,
            _ => return None,
        })
    }

    /// The disk's format as the VMM sees it.
    pub fn format(self) -> &'static str {
        match self {
            Self::Qcow2 => "qcow2",
            Self::Reflink | Self::Copy | Self::DmSnapshot => "raw",
        }
    }

    /// The disk's file name in the VM directory: for a dm-snapshot, the file of its
    /// exceptions (the guest's writes), which outlives the devices made over it.
    pub fn file_name(self) -> &'static str {
        match self {
            Self::Qcow2 => "root.qcow2",
            Self::Reflink | Self::Copy => "root.raw",
            Self::DmSnapshot => "root.cow",
        }
    }

    /// The device-mapper name of a VM's snapshot: derived from its id alone, so a snapshot
    /// whose handle was lost is still found.
    pub fn dm_name(vm_id: super::VmId) -> String {
        format!("banger-{vm_id}")
    }
}

/// What the VM's owner asked for: its shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmSpec {
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// Root disk size in bytes; 0: the image's.
    pub disk_bytes: u64,
}

/// The shape a create gets for what it does not say (`[vm_defaults]` in the config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmDefaults {
    /// vCPUs.
    pub vcpus: u32,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// The least root disk size in bytes: an image's own root file system is used when it is
    /// bigger (0: always the image's).
    pub disk_bytes: u64,
}

impl Default for VmDefaults {
    fn default() -> Self {
        Self { vcpus: DEFAULT_VCPUS, memory_mib: DEFAULT_MEMORY_MIB, disk_bytes: 0 }
    }
}

impl VmDefaults {
    /// `spec` with its unset (0) vCPUs and memory filled in.
    pub fn fill(&self, mut spec: VmSpec) -> VmSpec {
        if spec.vcpus == 0 {
            spec.vcpus = self.vcpus;
        }
        if spec.memory_mib == 0 {
            spec.memory_mib = self.memory_mib;
        }
        spec
    }

    /// The root disk for a request of `requested` bytes (0: unset) from an image whose root
    /// file system is `image_bytes`: the default grows a disk, never shrinks an image's, and
    /// only where disks can grow.
    pub fn disk_bytes(&self, requested: u64, image_bytes: u64, can_grow: bool) -> u64 {
        match requested {
            0 if can_grow && self.disk_bytes > image_bytes => self.disk_bytes,
            requested => requested,
        }
    }
}

/// A VM's durable record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vm {
    /// Its id.
    pub id: VmId,
    /// Its unique name; the guest's hostname.
    pub name: String,
    /// The image it boots from.
    pub image_id: ImageId,
    /// Its shape.
    pub spec: VmSpec,
    /// What the owner last asked for (running or stopped).
    pub desired_state: VmState,
    /// What banger last observed.
    pub observed_state: VmState,
    /// The guest's vsock context id, unique on the host.
    pub vsock_cid: u32,
    /// How its root disk is made.
    pub root_disk: RootDiskStrategy,
    /// Its IPv4 address on the host bridge, when the host gives VMs a network.
    pub ip: Option<std::net::Ipv4Addr>,
    /// The directory holding the VM's disks, sockets and logs.
    pub vm_dir: PathBuf,
    /// Why the last operation failed, or why the VM is in error.
    pub last_error: String,
    /// The same, as a code; `None` when there is no error.
    pub last_error_reason: Option<VmFault>,
    /// Id of the last operation run on the VM.
    pub last_operation: String,
    /// Milliseconds since the Unix epoch at creation.
    pub created_at_ms: i64,
    /// Milliseconds since the Unix epoch at the last change.
    pub updated_at_ms: i64,
    /// Bumped on every update; updates compare and set it.
    pub generation: i64,
    /// Its labels.
    pub labels: super::Labels,
    /// Milliseconds since the Unix epoch when the reaper deletes it, if it has a time to live.
    pub expire_at_ms: Option<i64>,
    /// Where its traffic may go beyond its bridge.
    pub egress: super::Egress,
    /// The snapshot its disk overlays: the one it was restored from, or one taken of it.
    pub snapshot_id: Option<super::SnapshotId>,
}

impl Vm {
    /// The deterministic paths of this VM's files.
    pub fn paths(&self) -> VmPaths {
        let mut paths = VmPaths::new(&self.vm_dir);
        paths.root_disk = self.vm_dir.join(self.root_disk.file_name());
        paths
    }
}

/// Where a VM's files live inside its directory. Derived from the directory alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmPaths {
    /// The directory itself.
    pub dir: PathBuf,
    /// The copy-on-write root disk (a qcow2 overlay unless [`Vm::paths`] says otherwise).
    pub root_disk: PathBuf,
    /// The VMM's control socket (QMP); its presence in a process's command line identifies the VMM.
    pub api_socket: PathBuf,
    /// The hybrid vsock socket the host connects to (`CONNECT <port>`). Only the user-space
    /// vsock backend names it on its command line, which identifies that process in `/proc`.
    pub vsock: PathBuf,
    /// The unix socket QEMU serves the agent's virtio-serial port on (`agent_channel =
    /// "virtio-serial"`).
    pub agent_serial: PathBuf,
    /// The vhost-user socket between QEMU and the user-space vsock backend (both name it, so
    /// it identifies neither).
    pub vhost_user_socket: PathBuf,
    /// The guest's serial console.
    pub console_log: PathBuf,
    /// The VMM's standard output and error.
    pub vmm_log: PathBuf,
    /// The user-space vsock backend's standard output and error.
    pub vsock_backend_log: PathBuf,
    /// The scratch file of transient handles.
    pub handles: PathBuf,
    /// The key the VM's agent checks on every call (root's, 0600).
    pub agent_key: PathBuf,
    /// The initramfs this boot starts with: the image's, after an archive with the agent's key.
    pub boot_initrd: PathBuf,
}

impl VmPaths {
    /// The paths inside `dir`.
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
            root_disk: dir.join("root.qcow2"),
            api_socket: dir.join("qmp.sock"),
            vsock: dir.join("vsock.sock"),
            agent_serial: dir.join("agent.sock"),
            vhost_user_socket: dir.join("vhost-user.sock"),
            console_log: dir.join("console.log"),
            vmm_log: dir.join("vmm.log"),
            vsock_backend_log: dir.join("vsock-backend.log"),
            handles: dir.join("handles.json"),
            agent_key: dir.join("agent.key"),
            boot_initrd: dir.join("initrd.img"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_fill_only_what_is_unset_and_never_shrink_an_images_disk() {
        let defaults = VmDefaults { vcpus: 2, memory_mib: 512, disk_bytes: 10 << 30 };
        let filled = defaults.fill(VmSpec { vcpus: 0, memory_mib: 128, disk_bytes: 0 });
        assert_eq!((filled.vcpus, filled.memory_mib), (2, 128));
        assert_eq!(defaults.disk_bytes(0, 1 << 30, true), 10 << 30);
        assert_eq!(defaults.disk_bytes(0, 20 << 30, true), 0, "the image's own, bigger disk");
        assert_eq!(defaults.disk_bytes(0, 1 << 30, false), 0, "disks that cannot grow");
        assert_eq!(defaults.disk_bytes(5 << 30, 1 << 30, true), 5 << 30, "a requested size wins");
        assert_eq!(VmDefaults::default().disk_bytes(0, 1 << 30, true), 0);
    }

    const ALL: [VmState; 7] = [
        VmState::Created,
        VmState::Starting,
        VmState::Running,
        VmState::Stopping,
        VmState::Stopped,
        VmState::Error,
        VmState::Paused,
    ];

    #[test]
    fn states_round_trip_through_their_names() {
        for state in ALL {
            assert_eq!(VmState::parse(state.as_str()), Some(state));
        }
        assert_eq!(VmState::parse("bogus"), None);
    }

    #[test]
    fn a_full_lifecycle_is_allowed() {
        let mut state = VmState::Created;
        for t in [
            Transition::Start,
            Transition::Booted,
            Transition::Stop,
            Transition::Stopped,
            Transition::Start,
            Transition::StartFailed,
            Transition::Start,
        ] {
            state = state.apply(t).expect("allowed");
        }
        assert_eq!(state, VmState::Starting);
    }

    #[test]
    fn a_running_vm_cannot_be_started_and_a_stopped_one_cannot_be_stopped() {
        assert!(VmState::Running.apply(Transition::Start).is_err());
        assert!(VmState::Stopped.apply(Transition::Stop).is_err());
        assert!(VmState::Created.apply(Transition::Booted).is_err());
    }

    #[test]
    fn only_vmm_states_may_have_a_vmm() {
        let with: Vec<_> = ALL.into_iter().filter(|s| s.may_have_vmm()).collect();
        assert_eq!(with, [VmState::Starting, VmState::Running, VmState::Stopping, VmState::Paused]);
    }

    #[test]
    fn only_a_running_vm_pauses_and_only_a_paused_one_resumes_or_stops_from_there() {
        assert_eq!(VmState::Running.apply(Transition::Pause), Ok(VmState::Paused));
        assert_eq!(VmState::Paused.apply(Transition::Resume), Ok(VmState::Running));
        assert_eq!(VmState::Paused.apply(Transition::Stop), Ok(VmState::Stopping));
        for state in ALL.into_iter().filter(|s| *s != VmState::Running) {
            assert!(state.apply(Transition::Pause).is_err(), "{state:?} paused");
        }
        for state in ALL.into_iter().filter(|s| *s != VmState::Paused) {
            assert!(state.apply(Transition::Resume).is_err(), "{state:?} resumed");
        }
        assert!(VmState::Paused.apply(Transition::Start).is_err());
    }
}
