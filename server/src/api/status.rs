//! The one mapping from errors to gRPC statuses, and the only place in the daemon that picks
//! a gRPC code (`tests/invariants.rs` checks). Never `UNKNOWN`.
//!
//! Every status carries `google.rpc.ErrorInfo` (domain `banger.v1`) whose `reason` names the
//! error's variant (`VM_NOT_FOUND`, `WRONG_STATE`, ...) and whose `metadata` holds its facts
//! (the VM, the state, the path; for a failed operation its id, stage and log), so clients
//! branch on those rather than on the message. Invalid input carries `BadRequest` field
//! violations; a missing or taken name carries `ResourceInfo`.

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::{
    domain::{Resource, VmState},
    host::{HostError, agent::AgentError, oci::OciError},
    ops::{Error, FieldViolation},
};

/// The `ErrorInfo.domain` of banger's errors.
pub const ERROR_DOMAIN: &str = "banger.v1";

/// What an API call can fail with beyond its use case's [`Error`].
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The use case failed.
    #[error(transparent)]
    Ops(#[from] Error),
    /// A watch asked for revisions this host has not reached.
    #[error("revision {from} is ahead of this host's latest ({latest}): list again and watch from its revision")]
    RevisionAhead {
        /// The revision asked for.
        from: u64,
        /// The latest.
        latest: u64,
    },
    /// A watch asked for revisions this host no longer keeps.
    #[error(
        "revision {from} is too old to replay (events up to {oldest} are forgotten): list again and watch from its \
         revision"
    )]
    RevisionForgotten {
        /// The revision asked for.
        from: u64,
        /// The oldest revision a watch may resume from.
        oldest: u64,
    },
    /// `WaitVm` reached its deadline first.
    #[error("vm {vm} is {}, not {}, after {seconds:.1} s", state.as_str(), wanted.as_str())]
    WaitTimedOut {
        /// The VM's name.
        vm: String,
        /// Where it is.
        state: VmState,
        /// Where it was awaited.
        wanted: VmState,
        /// How long was waited.
        seconds: f64,
    },
    /// A request id came back with another request.
    #[error("request_id {request_id:?} was already used for {first}; a new request needs a new request_id")]
    RequestIdReused {
        /// The id.
        request_id: String,
        /// What it was first used for (`CreateVm`, or `CreateVm with a different request`).
        first: String,
    },
    /// A request id is being forgotten at this very moment.
    #[error("request_id {request_id:?} was being forgotten; retry")]
    RequestIdExpiring {
        /// The id.
        request_id: String,
    },
    /// The first call with this request id was cut short by a daemon restart.
    #[error(
        "request_id {request_id:?} ({method}) was interrupted by a daemon restart before it finished; its VM or \
         image is in whatever state recovery left it: read it, then retry with a new request_id"
    )]
    RequestInterrupted {
        /// The id.
        request_id: String,
        /// The method.
        method: String,
    },
    /// Something inside the daemon that cannot fail did (a task ended without an answer, a
    /// recorded response does not decode).
    #[error("{what}: {detail}")]
    Internal {
        /// What failed.
        what: &'static str,
        /// How.
        detail: String,
    },
}

/// A status for one invalid request field.
pub fn invalid_field(field: &str, description: &str) -> Status {
    to_status(&Error::InvalidArgument(vec![FieldViolation::new(field, description)]))
}

/// Maps a use case's error to the status a client sees.
pub fn to_status(error: &Error) -> Status {
    if let Error::InvalidArgument(violations) = error.root() {
        let violations: Vec<tonic_types::FieldViolation> = violations
            .iter()
            .map(|v| tonic_types::FieldViolation::new(v.field.clone(), v.description.clone()))
            .collect();
        return Status::with_error_details(
            Code::InvalidArgument,
            error.chain(),
            ErrorDetails::with_bad_request(violations),
        );
    }
    let root = describe(error.root());
    let mut metadata = root.metadata;
    if let Error::Stage { op_id, operation, stage, log, undo_failed, .. } = error {
        metadata.insert("op_id".into(), op_id.to_string());
        metadata.insert("operation".into(), (*operation).into());
        metadata.insert("stage".into(), (*stage).into());
        if let Some(log) = log {
            metadata.insert("log_path".into(), log.display().to_string());
        }
        if !undo_failed.is_empty() {
            metadata.insert("undo_failed".into(), undo_failed.join(","));
        }
    }
    let mut details = ErrorDetails::with_error_info(root.reason, ERROR_DOMAIN, metadata);
    if let Some((kind, name)) = root.resource {
        details.set_resource_info(format!("banger.v1.{}", resource_type(kind)), name, "", "");
    }
    Status::with_error_details(root.code, error.chain(), details)
}

/// A caller that is not accepted at all: `UNAUTHENTICATED`, reason `UNAUTHENTICATED`
/// (`TOKEN_EXPIRED` for an expired token).
pub fn unauthenticated(error: &crate::domain::access::Unauthenticated) -> Status {
    use crate::domain::access::Unauthenticated;
    let (reason, metadata) = match error {
        Unauthenticated::Expired { name } => ("TOKEN_EXPIRED", HashMap::from([("token".to_owned(), name.clone())])),
        Unauthenticated::Revoked => ("CERTIFICATE_REVOKED", HashMap::new()),
        _ => ("UNAUTHENTICATED", HashMap::new()),
    };
    Status::with_error_details(
        Code::Unauthenticated,
        error.to_string(),
        ErrorDetails::with_error_info(reason, ERROR_DOMAIN, metadata),
    )
}

/// A caller whose role does not allow the call: `PERMISSION_DENIED`, reason
/// `PERMISSION_DENIED`, with the caller, its role, the method and the role it needs.
pub fn permission_denied(denied: &crate::domain::access::Denied) -> Status {
    let metadata = HashMap::from([
        ("caller".to_owned(), denied.identity.clone()),
        ("role".to_owned(), denied.role.map_or("none", |r| r.as_str()).to_owned()),
        ("method".to_owned(), denied.method.clone()),
        ("needed".to_owned(), denied.needed.as_str().to_owned()),
    ]);
    Status::with_error_details(
        Code::PermissionDenied,
        denied.to_string(),
        ErrorDetails::with_error_info("PERMISSION_DENIED", ERROR_DOMAIN, metadata),
    )
}

/// Maps an API call's error to the status a client sees.
pub fn api_status(error: &ApiError) -> Status {
    let (code, reason, metadata): (Code, &str, Vec<(&str, String)>) = match error {
        ApiError::Ops(error) => return to_status(error),
        ApiError::RevisionAhead { from, latest } => (
            Code::OutOfRange,
            "REVISION_AHEAD",
            vec![("from_revision", from.to_string()), ("latest_revision", latest.to_string())],
        ),
        ApiError::RevisionForgotten { from, oldest } => (
            Code::OutOfRange,
            "REVISION_FORGOTTEN",
            vec![("from_revision", from.to_string()), ("oldest_revision", oldest.to_string())],
        ),
        ApiError::WaitTimedOut { vm, state, wanted, .. } => (
            Code::DeadlineExceeded,
            "WAIT_TIMED_OUT",
            vec![("vm", vm.clone()), ("state", state.as_str().into()), ("wanted", wanted.as_str().into())],
        ),
        ApiError::RequestIdReused { request_id, .. } => {
            (Code::AlreadyExists, "REQUEST_ID_REUSED", vec![("request_id", request_id.clone())])
        }
        ApiError::RequestIdExpiring { request_id } => {
            (Code::Unavailable, "REQUEST_ID_EXPIRING", vec![("request_id", request_id.clone())])
        }
        ApiError::RequestInterrupted { request_id, method } => {
            (Code::Aborted, "REQUEST_INTERRUPTED", vec![("request_id", request_id.clone()), ("method", method.clone())])
        }
        ApiError::Internal { what, .. } => (Code::Internal, "INTERNAL", vec![("what", (*what).into())]),
    };
    let metadata: HashMap<String, String> = metadata.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
    Status::with_error_details(code, error.to_string(), ErrorDetails::with_error_info(reason, ERROR_DOMAIN, metadata))
}

fn resource_type(kind: Resource) -> &'static str {
    match kind {
        Resource::Vm => "Vm",
        Resource::Image => "Image",
        Resource::Pool => "Pool",
        Resource::Snapshot => "Snapshot",
    }
}

/// How one (innermost) error reaches a client.
struct Described {
    code: Code,
    reason: &'static str,
    metadata: HashMap<String, String>,
    resource: Option<(Resource, String)>,
}

fn described(code: Code, reason: &'static str, metadata: &[(&str, String)]) -> Described {
    let metadata = metadata.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect();
    Described { code, reason, metadata, resource: None }
}

fn describe(error: &Error) -> Described {
    match error {
        Error::InvalidArgument(_) => described(Code::InvalidArgument, "INVALID_ARGUMENT", &[]),
        Error::NotFound { kind, key } => Described {
            resource: Some((*kind, key.clone())),
            ..described(
                Code::NotFound,
                match kind {
                    Resource::Vm => "VM_NOT_FOUND",
                    Resource::Image => "IMAGE_NOT_FOUND",
                    Resource::Pool => "POOL_NOT_FOUND",
                    Resource::Snapshot => "SNAPSHOT_NOT_FOUND",
                },
                &[(kind.as_str(), key.clone())],
            )
        },
        Error::AlreadyExists { kind, name } => Described {
            resource: Some((*kind, name.clone())),
            ..described(
                Code::AlreadyExists,
                match kind {
                    Resource::Vm => "VM_NAME_TAKEN",
                    Resource::Image => "IMAGE_NAME_TAKEN",
                    Resource::Pool => "POOL_NAME_TAKEN",
                    Resource::Snapshot => "SNAPSHOT_NAME_TAKEN",
                },
                &[(kind.as_str(), name.clone())],
            )
        },
        Error::WrongState { vm, state, action } => described(
            Code::FailedPrecondition,
            "WRONG_STATE",
            &[("vm", vm.clone()), ("state", state.as_str().into()), ("action", (*action).into())],
        ),
        Error::ImageInUse { image, vms } => {
            described(Code::FailedPrecondition, "IMAGE_IN_USE", &[("image", image.clone()), ("vms", vms.to_string())])
        }
        Error::SnapshotInUse { snapshot, vms } => described(
            Code::FailedPrecondition,
            "SNAPSHOT_IN_USE",
            &[("snapshot", snapshot.clone()), ("vms", vms.to_string())],
        ),
        Error::SnapshotUnsupported { vm, why } => {
            described(Code::FailedPrecondition, "SNAPSHOT_UNSUPPORTED", &[("vm", vm.clone()), ("why", why.clone())])
        }
        Error::ImageBroken { image, missing } => described(
            Code::FailedPrecondition,
            "IMAGE_BROKEN",
            &[("image", image.clone()), ("missing", missing.display().to_string())],
        ),
        Error::KernelNotBootable { image, vmm } => described(
            Code::FailedPrecondition,
            "KERNEL_NOT_BOOTABLE",
            &[("image", image.clone()), ("vmm", (*vmm).into())],
        ),
        Error::NoDefaultImage { name, dir } => described(
            Code::FailedPrecondition,
            "NO_DEFAULT_IMAGE",
            &[("image", name.clone()), ("dir", dir.display().to_string())],
        ),
        Error::NoNetworkAddress { vm } => {
            described(Code::FailedPrecondition, "NO_NETWORK_ADDRESS", &[("vm", vm.clone())])
        }
        Error::Conflict { kind, id } => {
            described(Code::Aborted, "CONCURRENT_CHANGE", &[("kind", kind.as_str().into()), ("id", id.clone())])
        }
        Error::AddressesExhausted { pool } => {
            described(Code::ResourceExhausted, "ADDRESSES_EXHAUSTED", &[("pool", pool.clone())])
        }
        Error::CapacityExhausted(exhausted) => described(
            Code::ResourceExhausted,
            "CAPACITY_EXHAUSTED",
            &[
                ("resource", exhausted.resource.into()),
                ("asked", exhausted.asked.to_string()),
                ("used", exhausted.used.to_string()),
                ("limit", exhausted.limit.to_string()),
            ],
        ),
        Error::Stopping => described(Code::Unavailable, "DAEMON_STOPPING", &[]),
        Error::NotConfigured { what } => {
            described(Code::FailedPrecondition, "NOT_CONFIGURED", &[("what", (*what).into())])
        }
        Error::StageOrder { needs } => described(Code::Internal, "STAGE_ORDER", &[("needs", (*needs).into())]),
        Error::Stage { source, .. } => describe(source),
        Error::Store(_) => described(Code::Internal, "DATABASE", &[]),
        Error::Host(host) => describe_host(host),
        Error::Image(image) => describe_image(image),
        Error::NoBootKernel { dir, .. } => {
            described(Code::FailedPrecondition, "NO_BOOT_KERNEL", &[("dir", dir.display().to_string())])
        }
    }
}

fn describe_image(error: &OciError) -> Described {
    match error {
        OciError::Layer { layer, digest, entry, .. } => described(
            Code::InvalidArgument,
            "IMAGE_LAYER_REFUSED",
            &[("layer", layer.to_string()), ("digest", digest.clone()), ("entry", entry.clone())],
        ),
        OciError::CorruptLayer { layer, digest, .. } => described(
            Code::DataLoss,
            "IMAGE_LAYER_CORRUPT",
            &[("layer", layer.to_string()), ("digest", digest.clone())],
        ),
        OciError::DigestMismatch { expected, actual } => described(
            Code::DataLoss,
            "BLOB_DIGEST_MISMATCH",
            &[("expected", expected.clone()), ("actual", actual.clone())],
        ),
        OciError::BadSource { what, .. } => {
            described(Code::InvalidArgument, "IMAGE_SOURCE_INVALID", &[("what", what.clone())])
        }
        OciError::NotFound { what, available } => described(
            Code::NotFound,
            "IMAGE_SOURCE_NOT_FOUND",
            &[("what", what.clone()), ("available", available.join(","))],
        ),
        OciError::NoPlatform { wanted, available } => described(
            Code::FailedPrecondition,
            "IMAGE_PLATFORM_MISSING",
            &[("wanted", wanted.clone()), ("available", available.join(","))],
        ),
        OciError::Unreachable { registry, .. } => {
            described(Code::Unavailable, "REGISTRY_UNREACHABLE", &[("reference", registry.clone())])
        }
        OciError::Denied { registry, .. } => {
            described(Code::PermissionDenied, "REGISTRY_DENIED", &[("reference", registry.clone())])
        }
        OciError::Unsupported { what } => {
            described(Code::FailedPrecondition, "IMAGE_UNSUPPORTED", &[("what", what.clone())])
        }
        OciError::Write { .. } => described(Code::Internal, "IMAGE_WRITE", &[]),
        OciError::Host(host) => describe_host(host),
    }
}

fn describe_host(error: &HostError) -> Described {
    match error {
        HostError::ToolMissing { program } => {
            described(Code::Unavailable, "HOST_TOOL_MISSING", &[("program", program.clone())])
        }
        HostError::Timeout { what, seconds } => {
            described(Code::DeadlineExceeded, "TIMEOUT", &[("what", what.clone()), ("seconds", seconds.to_string())])
        }
        HostError::Command(failed) => described(
            Code::Internal,
            "HOST_COMMAND_FAILED",
            &[("program", failed.program.clone()), ("exit_status", failed.status.to_string())],
        ),
        HostError::File { action, path, .. } => described(
            Code::Internal,
            "HOST_FILE",
            &[("action", (*action).into()), ("path", path.display().to_string())],
        ),
        HostError::Untrusted { path, .. } => {
            described(Code::FailedPrecondition, "UNTRUSTED_PATH", &[("path", path.display().to_string())])
        }
        HostError::Spawn { program, .. } => {
            described(Code::Internal, "HOST_SPAWN", &[("program", program.display().to_string())])
        }
        HostError::Io { what, .. } => described(Code::Internal, "HOST_IO", &[("what", what.clone())]),
        HostError::ProcessExited { process, log, .. } => described(
            Code::Internal,
            "PROCESS_EXITED",
            &[("process", (*process).into()), ("log_path", log.display().to_string())],
        ),
        HostError::VmmRefused { command, .. } => {
            described(Code::Internal, "VMM_REFUSED", &[("command", command.clone())])
        }
        HostError::InputAborted { .. } => described(Code::Cancelled, "INPUT_ABORTED", &[]),
        HostError::Injected { call } => described(Code::Internal, "INJECTED", &[("call", (*call).into())]),
        HostError::FakeRule { .. } => described(Code::Internal, "FAKE_HOST_RULE", &[]),
        HostError::Agent(agent) => describe_agent(agent),
        HostError::AgentBusy { open } => {
            described(Code::FailedPrecondition, "AGENT_BUSY", &[("open_connections", open.to_string())])
        }
    }
}

fn describe_agent(error: &AgentError) -> Described {
    match error {
        // What the guest agent says about the caller's request (a missing file, a directory
        // given as a file) reaches the caller as such.
        AgentError::Rpc { call, status }
            if matches!(
                status.code(),
                Code::NotFound | Code::PermissionDenied | Code::FailedPrecondition | Code::InvalidArgument
            ) =>
        {
            described(status.code(), "GUEST_REFUSED", &[("call", (*call).into())])
        }
        AgentError::Rpc { call, .. } => described(Code::Internal, "GUEST_AGENT_FAILED", &[("call", (*call).into())]),
        AgentError::Timeout { call, .. } => {
            described(Code::DeadlineExceeded, "GUEST_AGENT_TIMEOUT", &[("call", (*call).into())])
        }
        AgentError::NotReady { .. } => described(Code::Internal, "GUEST_AGENT_NOT_READY", &[]),
        AgentError::Protocol { call, .. } => {
            described(Code::Internal, "GUEST_AGENT_PROTOCOL", &[("call", (*call).into())])
        }
        AgentError::VmmExited => described(Code::Internal, "VMM_EXITED", &[]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::OpId;

    fn info(status: &Status) -> tonic_types::ErrorInfo {
        status.get_error_details().error_info().cloned().expect("error info")
    }

    #[test]
    fn invalid_arguments_carry_field_violations() {
        let status = to_status(&Error::InvalidArgument(vec![FieldViolation::new("name", "must not be empty")]));
        assert_eq!(status.code(), Code::InvalidArgument);
        let details = status.get_error_details();
        let bad = details.bad_request().expect("bad request");
        assert_eq!(bad.field_violations[0].field, "name");
    }

    #[test]
    fn stage_failures_carry_the_op_id_and_map_by_their_root_cause() {
        let op_id = OpId::generate();
        let stage = |source: Error| Error::Stage {
            op_id,
            operation: "vm.start",
            stage: "vmm_launch",
            log: Some("/x/vmm.log".into()),
            undo_failed: vec!["tap"],
            source: Box::new(source),
        };
        let missing = to_status(&stage(Error::Host(HostError::ToolMissing { program: "qemu".into() })));
        assert_eq!(missing.code(), Code::Unavailable);
        assert_eq!(info(&missing).reason, "HOST_TOOL_MISSING");
        assert_eq!(info(&missing).metadata.get("program").map(String::as_str), Some("qemu"));
        let timeout = to_status(&stage(Error::Host(HostError::Timeout { what: "x".into(), seconds: 1 })));
        assert_eq!(timeout.code(), Code::DeadlineExceeded);
        let info = info(&timeout);
        assert_eq!(info.domain, ERROR_DOMAIN);
        assert_eq!(info.metadata.get("op_id"), Some(&op_id.to_string()));
        assert_eq!(info.metadata.get("stage").map(String::as_str), Some("vmm_launch"));
        assert_eq!(info.metadata.get("log_path").map(String::as_str), Some("/x/vmm.log"));
        assert_eq!(info.metadata.get("undo_failed").map(String::as_str), Some("tap"));
    }

    #[test]
    fn a_missing_resource_names_itself_in_resource_info() {
        let status = to_status(&Error::NotFound { kind: Resource::Image, key: "nope".into() });
        assert_eq!(status.code(), Code::NotFound);
        assert_eq!(info(&status).reason, "IMAGE_NOT_FOUND");
        let resource = status.get_error_details().resource_info().cloned().expect("resource info");
        assert_eq!((resource.resource_type.as_str(), resource.resource_name.as_str()), ("banger.v1.Image", "nope"));
    }

    #[test]
    fn api_errors_have_their_own_codes_and_reasons() {
        let ahead = api_status(&ApiError::RevisionAhead { from: 9, latest: 3 });
        assert_eq!((ahead.code(), info(&ahead).reason.as_str()), (Code::OutOfRange, "REVISION_AHEAD"));
        let stopping = api_status(&ApiError::Ops(Error::Stopping));
        assert_eq!((stopping.code(), info(&stopping).reason.as_str()), (Code::Unavailable, "DAEMON_STOPPING"));
    }
}
