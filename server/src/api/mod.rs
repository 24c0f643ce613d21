//! The gRPC surface: tonic services, proto <-> domain conversion and validation, the one
//! error-to-status mapping, health and reflection.

mod convert;
mod host_service;
mod image_service;
pub mod status;
mod vm_service;

use std::sync::Arc;

use banger_proto::v1::{
    host_service_server::HostServiceServer, image_service_server::ImageServiceServer,
    vm_service_server::VmServiceServer,
};
use tonic::{Response, metadata::MetadataValue, service::Routes};

pub use host_service::HostApi;
pub use image_service::ImageApi;
pub use vm_service::VmApi;

use crate::ops::Ops;

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
        Err(join) => Err(tonic::Status::internal(format!("operation task failed: {join}"))),
    }
}

fn with_op_id<T>(message: T, op_id: &str) -> Response<T> {
    let mut response = Response::new(message);
    if let Ok(value) = MetadataValue::try_from(op_id) {
        response.metadata_mut().insert(OP_ID_METADATA, value);
    }
    response
}

/// Every service the daemon serves: VMs, images, health, reflection (v1 and v1alpha).
pub async fn routes(ops: Arc<Ops>) -> Result<Routes, tonic_reflection::server::Error> {
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<VmServiceServer<VmApi>>().await;
    health_reporter.set_serving::<ImageServiceServer<ImageApi>>().await;
    health_reporter.set_serving::<HostServiceServer<HostApi>>().await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(banger_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let mut routes = Routes::builder();
    routes
        .add_service(health)
        .add_service(reflection().build_v1()?)
        .add_service(reflection().build_v1alpha()?)
        .add_service(VmServiceServer::new(VmApi::new(ops.clone())))
        .add_service(ImageServiceServer::new(ImageApi::new(ops.clone())))
        .add_service(HostServiceServer::new(HostApi::new(ops)));
    Ok(routes.routes())
}
