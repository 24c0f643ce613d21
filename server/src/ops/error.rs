//! The error every use case returns; `api::status` maps it to a gRPC status, once.

use std::path::PathBuf;

use crate::{domain::OpId, host::HostError, store::StoreError};

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

/// Why a use case failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed; nothing was done.
    #[error("invalid request: {}", .0.iter().map(|v| format!("{}: {}", v.field, v.description)).collect::<Vec<_>>().join("; "))]
    InvalidArgument(Vec<FieldViolation>),
    /// A VM or image does not exist.
    #[error("{kind} {key:?} not found")]
    NotFound {
        /// `vm` or `image`.
        kind: &'static str,
        /// What was looked up.
        key: String,
    },
    /// The name is taken.
    #[error("{kind} named {name:?} already exists")]
    AlreadyExists {
        /// `vm` or `image`.
        kind: &'static str,
        /// The name.
        name: String,
    },
    /// The resource is not in a state that allows this.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A host resource (such as the VM network's addresses) is used up.
    #[error("{0}")]
    ResourceExhausted(String),
    /// The daemon cannot serve this now (it is stopping); retrying later may work.
    #[error("{0}")]
    Unavailable(String),
    /// A stage of an operation failed; the stages before it were undone (those in
    /// `undo_failed` only in part: what is left is recorded for reconcile).
    #[error(
        "{operation} failed at stage {stage}{}{}",
        if undo_failed.is_empty() { String::new() } else { format!("; undoing {} failed (what is left is released by the next reconcile)", undo_failed.join(", ")) },
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
    /// The database failed.
    #[error(transparent)]
    Store(StoreError),
}

impl From<StoreError> for Error {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::NotFound { kind, key } => Self::NotFound { kind, key },
            StoreError::NameTaken { kind, name } => Self::AlreadyExists { kind, name },
            StoreError::InUse { .. } | StoreError::Conflict { .. } => Self::FailedPrecondition(err.to_string()),
            StoreError::PoolExhausted { .. } => Self::ResourceExhausted(err.to_string()),
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
        let mut message = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(cause) = source {
            let text = cause.to_string();
            if !message.contains(&text) {
                message.push_str(": ");
                message.push_str(&text);
            }
            source = cause.source();
        }
        message
    }
}
