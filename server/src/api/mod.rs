//! The gRPC surface: tonic services, proto <-> domain conversion and validation, the one
//! error-to-status mapping, health and reflection.

pub mod auth;
pub mod authority;
mod convert;
mod host_service;
pub mod idempotency;
mod image_service;
mod pool_service;
mod snapshot_service;
pub mod status;
mod vm_service;
mod watch;

use std::sync::Arc;

use banger_proto::v1::{
    host_service_server::HostServiceServer, image_service_server::ImageServiceServer,
    pool_service_server::PoolServiceServer, snapshot_service_server::SnapshotServiceServer,
    vm_service_server::VmServiceServer,
};
use tonic::{Response, metadata::MetadataValue, service::Routes};

pub use host_service::HostApi;
pub use image_service::ImageApi;
pub use pool_service::PoolApi;
pub use snapshot_service::SnapshotApi;
pub use vm_service::VmApi;

use crate::ops::Ops;
use idempotency::Idempotency;

/// A request's idempotency key: its `request_id`, and its encoded body without it.
fn idempotency_key<T: prost::Message + Clone>(request: &T, id: impl Fn(&mut T) -> &mut String) -> (String, Vec<u8>) {
    let mut body = request.clone();
    let request_id = std::mem::take(id(&mut body));
    (request_id, body.encode_to_vec())
}

/// The response metadata key holding the id of the operation a call ran.
pub const OP_ID_METADATA: &str = "x-banger-op-id";

/// Runs a use case in its own task, so that a client that cancels or times out cannot
/// drop an operation between two stages: the operation always finishes (or unwinds), and
/// only its result is lost.
async fn run_to_completion<T: Send + 'static>(
    use_case: impl std::future::Future<Output = Result<T, crate::ops::Error>> + Send + 'static,
) -> Result<T, tonic::Status> {
    // The operation's spans stay children of this request's span.
    match tokio::spawn(tracing::Instrument::instrument(use_case, tracing::Span::current())).await {
        Ok(result) => result.map_err(|e| status::to_status(&e)),
        Err(join) => {
            Err(status::api_status(&status::ApiError::Internal { what: "operation task", detail: join.to_string() }))
        }
    }
}

/// The time a call may take, from its `grpc-timeout` header (set from the client's deadline).
fn call_timeout(metadata: &tonic::metadata::MetadataMap) -> Option<std::time::Duration> {
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    let amount: u64 = digits.parse().ok()?;
    use std::time::Duration;
    Some(match unit {
        "H" => Duration::from_secs(amount.saturating_mul(3600)),
        "M" => Duration::from_secs(amount.saturating_mul(60)),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// How long to work on a call before answering DEADLINE_EXCEEDED ourselves: a little less
/// than its timeout, so the answer reaches the client before its own timer fires.
fn answer_within(timeout: std::time::Duration) -> std::time::Duration {
    timeout
        .saturating_sub((timeout / 10).clamp(std::time::Duration::from_millis(20), std::time::Duration::from_secs(1)))
}

fn with_op_id<T>(message: T, op_id: &str) -> Response<T> {
    let mut response = Response::new(message);
    if let Ok(value) = MetadataValue::try_from(op_id) {
        response.metadata_mut().insert(OP_ID_METADATA, value);
    }
    response
}

/// Every service the daemon serves: VMs, images, health, reflection (v1 and v1alpha, which
/// also describes the `google.rpc` error details).
pub async fn routes(ops: Arc<Ops>) -> Result<Routes, tonic_reflection::server::Error> {
    let idempotency = Idempotency::new(ops.request_log());
    let (pruner, events, clock) = (idempotency.clone(), ops.event_log(), ops.clock().clone());
    // Hourly, and whenever a test moves the clock.
    let mut moves = clock.moves();
    tokio::spawn(async move {
        loop {
            // Events first: whoever finds a request id forgotten finds its events gone too.
            let before = clock.now_ms() - idempotency::RETENTION.as_millis() as i64;
            if let Err(error) = events.prune(before).await {
                tracing::warn!(error = %error, "cannot forget old events");
            }
            if let Err(error) = pruner.prune(&clock).await {
                tracing::warn!(error = %error, "cannot forget old request ids");
            }
            tokio::select! {
                () = tokio::time::sleep(std::time::Duration::from_secs(3600)) => {}
                () = moves.moved() => {}
            }
        }
    });
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<VmServiceServer<VmApi>>().await;
    health_reporter.set_serving::<ImageServiceServer<ImageApi>>().await;
    health_reporter.set_serving::<HostServiceServer<HostApi>>().await;
    health_reporter.set_serving::<PoolServiceServer<PoolApi>>().await;
    health_reporter.set_serving::<SnapshotServiceServer<SnapshotApi>>().await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(banger_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            // The `google.rpc` error details errors carry (BadRequest, ErrorInfo, ResourceInfo),
            // so that grpcurl and reflection-driven clients decode them.
            .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
    };
    let mut routes = Routes::builder();
    routes
        .add_service(health)
        .add_service(reflection().build_v1()?)
        .add_service(reflection().build_v1alpha()?)
        .add_service(VmServiceServer::new(VmApi::new(ops.clone(), idempotency.clone())))
        .add_service(ImageServiceServer::new(ImageApi::new(ops.clone(), idempotency.clone())))
        .add_service(SnapshotServiceServer::new(SnapshotApi::new(ops.clone(), idempotency)))
        .add_service(PoolServiceServer::new(PoolApi::new(ops.clone())))
        .add_service(HostServiceServer::new(HostApi::new(ops)));
    Ok(routes.routes())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn the_call_timeout_comes_from_grpc_timeout_and_is_answered_a_little_earlier() {
        let timeout = |value: &str| {
            let mut metadata = tonic::metadata::MetadataMap::new();
            metadata.insert("grpc-timeout", value.parse().expect("ascii"));
            call_timeout(&metadata)
        };
        assert_eq!(timeout("300m"), Some(Duration::from_millis(300)));
        assert_eq!(timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(timeout("2M"), Some(Duration::from_secs(120)));
        assert_eq!(timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(timeout("7x"), None);
        assert_eq!(timeout("m"), None);
        assert_eq!(call_timeout(&tonic::metadata::MetadataMap::new()), None);
        assert_eq!(answer_within(Duration::from_millis(300)), Duration::from_millis(270));
        assert_eq!(answer_within(Duration::from_secs(60)), Duration::from_secs(59));
        assert_eq!(answer_within(Duration::from_millis(10)), Duration::ZERO);
    }
}
