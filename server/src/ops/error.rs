//! The error every use case returns: one variant per way a use case can fail, each holding
//! the facts (which VM, which image, which path, which state) as fields. `api::status` maps
//! it to a gRPC status, once; nothing matches on its text.

use std::path::PathBuf;

use crate::{
    domain::{OpId, Resource, VmState},
    host::HostError,
    store::StoreError,
};

/// One invalid field of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    /// The field's name in the request (`name`, `vcpus`, `start.argv`).
    pub field: String,
    /// What is wrong with it.
    pub description: String,
}

impl FieldViolation {
    /// A violation of `field`.
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self { field: field.into(), description: description.into() }
    }
}

/// Why a use case failed. Messages are lower case, and never repeat their cause: the
/// cause is the `source`, and [`Error::chain`] joins them.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed; nothing was done.
    #[error("invalid request: {}", .0.iter().map(|v| format!("{}: {}", v.field, v.description)).collect::<Vec<_>>().join("; "))]
    InvalidArgument(Vec<FieldViolation>),
    /// A VM or image does not exist.
    #[error("{kind} {key:?} not found")]
    NotFound {
        /// A VM or an image.
        kind: Resource,
        /// What was looked up (id or name).
        key: String,
    },
    /// The name is taken.
    #[error("{kind} named {name:?} already exists")]
    AlreadyExists {
        /// A VM or an image.
        kind: Resource,
        /// The name.
        name: String,
    },
    /// The VM is not in a state that allows what was asked.
    #[error("vm {vm} is {}: it cannot {action}", state.as_str())]
    WrongState {
        /// The VM's name.
        vm: String,
        /// The state it is in.
        state: VmState,
        /// What was asked (`be started`, `run commands`).
        action: &'static str,
    },
    /// An image still has VMs.
    #[error("image {image} is used by {vms} vm(s), snapshot(s) or pool(s): delete them first")]
    ImageInUse {
        /// The image's name.
        image: String,
        /// How many VMs use it.
        vms: i64,
    },
    /// An image's files are no longer where its record says.
    /// A snapshot is still used by VMs.
    #[error("snapshot {snapshot} is used by {vms} vm(s), snapshot(s) of them or pool(s): delete those first")]
    SnapshotInUse {
        /// The snapshot's id.
        snapshot: String,
        /// How many VMs depend on it.
        vms: i64,
    },
    /// This daemon cannot take snapshots (or restore them), or not of this VM.
    #[error("cannot snapshot vm {vm}: {why}")]
    SnapshotUnsupported {
        /// The VM's name.
        vm: String,
        /// Why not.
        why: String,
    },
    #[error("image {image} is broken: {} is missing; delete and import it again", missing.display())]
    ImageBroken {
        /// The image's name.
        image: String,
        /// The file that is gone.
        missing: PathBuf,
    },
    /// The VMM cannot boot the image's kernel (Firecracker boots uncompressed ELF kernels only).
    #[error("{vmm} boots only uncompressed ELF kernels (vmlinux); the kernel of image {image} is not one")]
    KernelNotBootable {
        /// The image's name.
        image: String,
        /// The VMM.
        vmm: &'static str,
    },
    /// A create named no image and the default one is neither imported nor installed.
    #[error(
        "no image given and the default image {name:?} is neither imported nor installed in {} (run `make setup`, \
         or pass an image)",
        dir.display()
    )]
    NoDefaultImage {
        /// The default image's name.
        name: String,
        /// Where it would be imported from.
        dir: PathBuf,
    },
    /// A VM network is configured but the VM has no address in it (recorded before the
    /// network was configured).
    #[error("vm {vm} has no address in the vm network; recreate it")]
    NoNetworkAddress {
        /// The VM's name.
        vm: String,
    },
    /// The record changed while this call was working on it; reading it again and
    /// retrying may work.
    #[error("{kind} {id} changed concurrently")]
    Conflict {
        /// A VM or an image.
        kind: Resource,
        /// Its id.
        id: String,
    },
    /// Every address of the VM network is taken.
    #[error("no free address left in {pool}")]
    AddressesExhausted {
        /// The pool.
        pool: String,
    },
    /// The request does not fit in what the host gives VMs; nothing was made.
    #[error("not admitted: {0}")]
    CapacityExhausted(super::Exhausted),
    /// The daemon is stopping; the call may be retried against the next one.
    #[error("bangerd is stopping")]
    Stopping,
    /// The daemon was started without what this call needs.
    #[error("{what} is not configured on this daemon")]
    NotConfigured {
        /// What is missing.
        what: &'static str,
    },
    /// A stage ran before the stage that prepares what it needs: a bug in the operation.
    #[error("stage order: {needs} is not there yet")]
    StageOrder {
        /// What an earlier stage should have made.
        needs: &'static str,
    },
    /// A stage of an operation failed; the stages before it were undone (those in
    /// `undo_failed` only in part: what is left is recorded for reconcile).
    #[error(
        "{operation} failed at stage {stage}{}{}",
        if undo_failed.is_empty() {
            String::new()
        } else {
            format!("; undoing {} failed (reconcile releases what is left)", undo_failed.join(", "))
        },
        log.as_ref().map(|l| format!("; inspect {}", l.display())).unwrap_or_default()
    )]
    Stage {
        /// The operation's id.
        op_id: OpId,
        /// The operation (`vm.start`).
        operation: &'static str,
        /// The stage that failed.
        stage: &'static str,
        /// The log worth reading.
        log: Option<PathBuf>,
        /// The stages whose undo failed, latest first.
        undo_failed: Vec<&'static str>,
        /// What went wrong.
        #[source]
        source: Box<Error>,
    },
    /// A host capability failed.
    #[error(transparent)]
    Host(#[from] HostError),
    /// A container image could not be read or converted.
    #[error(transparent)]
    Image(#[from] crate::host::oci::OciError),
    /// Container images boot the default image's kernel and initramfs, which are missing or
    /// too old to start the agent over an image that lacks it.
    #[error("container images boot the kernel and initramfs of the default image in {}, which {why}; run `make install-image`", dir.display())]
    NoBootKernel {
        /// The default image's directory.
        dir: PathBuf,
        /// What is wrong with it.
        why: &'static str,
    },
    /// The database failed.
    #[error(transparent)]
    Store(StoreError),
}

impl From<StoreError> for Error {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::NotFound { kind, key } => Self::NotFound { kind, key },
            StoreError::NameTaken { kind, name } => Self::AlreadyExists { kind, name },
            StoreError::InUse { image, count } => Self::ImageInUse { image, vms: count },
            StoreError::SnapshotInUse { snapshot, count } => Self::SnapshotInUse { snapshot, vms: count },
            StoreError::Conflict { kind, id, .. } => Self::Conflict { kind, id },
            StoreError::PoolExhausted { pool } => Self::AddressesExhausted { pool },
            other => Self::Store(other),
        }
    }
}

impl Error {
    /// The innermost error, past stage wrappers.
    pub fn root(&self) -> &Error {
        match self {
            Self::Stage { source, .. } => source.root(),
            other => other,
        }
    }

    /// The full chain of messages, outermost first, joined with `: `.
    pub fn chain(&self) -> String {
        banger_proto::error_chain(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chain_names_each_cause_once() {
        let io = HostError::File {
            action: "create",
            path: "/state/vms/x".into(),
            source: std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        };
        let error = Error::Stage {
            op_id: OpId::generate(),
            operation: "vm.create",
            stage: "prepare_vm_dir",
            log: None,
            undo_failed: vec![],
            source: Box::new(Error::Host(io)),
        };
        let chain = error.chain();
        assert_eq!(chain.matches("prepare_vm_dir").count(), 1, "{chain}");
        assert_eq!(chain.matches("/state/vms/x").count(), 1, "{chain}");
        assert_eq!(chain.matches("ermission denied").count(), 1, "{chain}");
    }
}
