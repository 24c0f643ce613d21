//! The one mapping from use-case errors to gRPC statuses. Never `UNKNOWN`.

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::{host::HostError, ops::Error};

/// The `ErrorInfo.domain` of banger's errors.
pub const ERROR_DOMAIN: &str = "banger.v1";

/// Maps an error to the status a client sees: the right code, the full message, and
/// details (`BadRequest` for invalid input, `ErrorInfo` with the op id and log otherwise).
pub fn to_status(error: &Error) -> Status {
    let message = error.chain();
    if let Error::InvalidArgument(violations) = error.root() {
        let violations: Vec<tonic_types::FieldViolation> = violations
            .iter()
            .map(|v| tonic_types::FieldViolation::new(v.field.clone(), v.description.clone()))
            .collect();
        return Status::with_error_details(Code::InvalidArgument, message, ErrorDetails::with_bad_request(violations));
    }
    let code = match error.root() {
        Error::InvalidArgument(_) => Code::InvalidArgument,
        Error::NotFound { .. } => Code::NotFound,
        Error::AlreadyExists { .. } => Code::AlreadyExists,
        Error::FailedPrecondition(_) => Code::FailedPrecondition,
        Error::ResourceExhausted(_) => Code::ResourceExhausted,
        Error::Unavailable(_) => Code::Unavailable,
        Error::Host(HostError::ToolMissing { .. }) => Code::Unavailable,
        Error::Host(HostError::Timeout { .. }) => Code::DeadlineExceeded,
        // What the guest agent says about the caller's request (a missing file, a directory
        // given as a file) reaches the caller as such.
        Error::Host(HostError::Agent(agent))
            if agent.status().is_some_and(|s| {
                matches!(
                    s.code(),
                    Code::NotFound | Code::PermissionDenied | Code::FailedPrecondition | Code::InvalidArgument
                )
            }) =>
        {
            agent.status().map(|s| s.code()).unwrap_or(Code::Internal)
        }
        Error::Stage { .. } | Error::Host(_) | Error::Store(_) => Code::Internal,
    };
    match error {
        Error::Stage { op_id, operation, stage, log, .. } => {
            let mut metadata = HashMap::from([
                ("op_id".to_owned(), op_id.to_string()),
                ("operation".to_owned(), (*operation).to_owned()),
                ("stage".to_owned(), (*stage).to_owned()),
            ]);
            if let Some(log) = log {
                metadata.insert("log_path".to_owned(), log.display().to_string());
            }
            let reason = match code {
                Code::Unavailable => "HOST_TOOL_MISSING",
                Code::FailedPrecondition => "FAILED_PRECONDITION",
                Code::NotFound => "NOT_FOUND",
                Code::DeadlineExceeded => "TIMEOUT",
                _ => "OPERATION_FAILED",
            };
            Status::with_error_details(code, message, ErrorDetails::with_error_info(reason, ERROR_DOMAIN, metadata))
        }
        _ => Status::new(code, message),
    }
}

/// A status for one invalid request field.
pub fn invalid_field(field: &str, description: &str) -> Status {
    to_status(&Error::InvalidArgument(vec![crate::ops::FieldViolation::new(field, description)]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{domain::OpId, ops::FieldViolation};

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
            undo_failed: vec![],
            source: Box::new(source),
        };
        let missing = to_status(&stage(Error::Host(HostError::ToolMissing { program: "qemu".into() })));
        assert_eq!(missing.code(), Code::Unavailable);
        let internal = to_status(&stage(Error::Host(HostError::Timeout { what: "x".into(), seconds: 1 })));
        assert_eq!(internal.code(), Code::DeadlineExceeded);
        let info = internal.get_error_details().error_info().cloned().expect("error info");
        assert_eq!(info.metadata.get("op_id"), Some(&op_id.to_string()));
        assert_eq!(info.metadata.get("log_path").map(String::as_str), Some("/x/vmm.log"));
        assert!(internal.message().contains("inspect /x/vmm.log"), "{}", internal.message());
    }
}
