//! Pure domain types: ids, names, VM specs and states, host handles. No I/O here.

pub mod access;
mod exec;
mod handles;
mod ids;
mod image;
mod labels;
mod names;
mod network;
mod pool;
mod snapshot;
mod vm;

pub use exec::{ExecCommand, ExecEvent, ExecInput, ExitStatus, FileMeta, Terminal, TerminalSize};
pub use handles::{ProcessHandle, VmHandles};
pub use ids::{ImageId, OpId, ParseIdError, PoolId, Resource, SnapshotId, VmId};
pub use image::{Image, ImageConfig, ImageProgress, NewImage, OciLayer, OciOrigin};
pub use labels::{LabelError, Labels, MAX_LABELS, labels_error, matches as labels_match};
pub use names::{NameError, image_name_error, vm_name_error};
pub use network::{
    Cidr, CidrError, Egress, IpPool, NOT_INTERNET, PoolError, auto_pool_candidates, choose_pool, mac_address, tap_name,
};
pub use pool::{MAX_POOL_NAME_LEN, MAX_POOL_SIZE, POOL_LABEL, Pool, RESERVED_LABEL_PREFIX};
pub use snapshot::{GuestIdentity, GuestNetwork, SNAPSHOT_GROUP_OFFSET, Snapshot, SnapshotAfter, SnapshotPaths};
pub use vm::{
    DEFAULT_MEMORY_MIB, DEFAULT_VCPUS, MAX_MEMORY_MIB, MAX_VCPUS, MIN_MEMORY_MIB, RootDiskStrategy, Transition,
    TransitionError, Vm, VmDefaults, VmFault, VmPaths, VmSpec, VmState,
};
