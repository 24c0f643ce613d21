//! A typed client of bangerd's gRPC API, over its unix socket or TCP.
//!
//! ```no_run
//! # async fn demo() -> Result<(), banger_client::ClientError> {
//! let mut client = banger_client::Client::connect(&banger_client::Target::default()).await?;
//! let vms = client.vms.list_vms(banger_client::pb::ListVmsRequest::default()).await?;
//! # Ok(()) }
//! ```

use std::path::PathBuf;

use tokio_stream::Stream;
use tonic::{
    Status, Streaming,
    service::{Interceptor, interceptor::InterceptedService},
    transport::Endpoint,
};
use tonic_types::StatusExt;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The generated API types (`banger.v1`).
pub use banger_proto::v1 as pb;

/// The daemon's default unix socket.
pub const DEFAULT_SOCKET: &str = "/run/banger/bangerd.sock";

/// The response metadata key holding the id of the operation a call ran.
pub const OP_ID_METADATA: &str = "x-banger-op-id";

/// Where the daemon listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A unix socket path.
    Unix(PathBuf),
    /// An `http://HOST:PORT` endpoint.
    Endpoint(String),
}

impl Default for Target {
    fn default() -> Self {
        Self::Unix(PathBuf::from(DEFAULT_SOCKET))
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
            Self::Endpoint(endpoint) => f.write_str(endpoint),
        }
    }
}

/// The daemon could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The endpoint is not a valid URI.
    #[error("invalid endpoint {endpoint:?}")]
    InvalidEndpoint {
        /// What was given.
        endpoint: String,
        /// Why it is invalid.
        #[source]
        source: tonic::transport::Error,
    },
    /// Connecting failed.
    #[error("cannot connect to bangerd at {target}")]
    Connect {
        /// Where.
        target: Target,
        /// Why.
        #[source]
        source: tonic::transport::Error,
    },
    /// A call failed.
    #[error(transparent)]
    Status(#[from] Status),
}

/// Puts the current span's trace context into each request as W3C `traceparent`, so the
/// daemon's spans join the caller's trace. Sends nothing when there is no trace.
#[derive(Debug, Clone, Copy, Default)]
pub struct TraceContextInjector;

struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl opentelemetry::propagation::Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) =
            (tonic::metadata::MetadataKey::from_bytes(key.as_bytes()), tonic::metadata::MetadataValue::try_from(value))
        {
            self.0.insert(key, value);
        }
    }
}

impl Interceptor for TraceContextInjector {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        let context = tracing::Span::current().context();
        opentelemetry::global::get_text_map_propagator(|propagator| {
            propagator.inject_context(&context, &mut MetadataInjector(request.metadata_mut()));
        });
        Ok(request)
    }
}

/// The channel the service clients use: traced requests over one HTTP/2 connection.
pub type Channel = InterceptedService<tonic::transport::Channel, TraceContextInjector>;

/// A connection to one daemon: one HTTP/2 channel shared by both services.
#[derive(Debug, Clone)]
pub struct Client {
    /// `banger.v1.VmService`.
    pub vms: pb::vm_service_client::VmServiceClient<Channel>,
    /// `banger.v1.ImageService`.
    pub images: pb::image_service_client::ImageServiceClient<Channel>,
    /// `banger.v1.HostService`.
    pub host: pb::host_service_client::HostServiceClient<Channel>,
    /// `grpc.health.v1.Health`.
    pub health: tonic_health::pb::health_client::HealthClient<Channel>,
}

impl Client {
    /// Connects to the daemon at `target`.
    pub async fn connect(target: &Target) -> Result<Self, ClientError> {
        let uri = match target {
            Target::Unix(path) => format!("unix://{}", path.display()),
            Target::Endpoint(endpoint) => endpoint.clone(),
        };
        let endpoint = Endpoint::from_shared(uri.clone())
            .map_err(|source| ClientError::InvalidEndpoint { endpoint: uri, source })?;
        let channel =
            endpoint.connect().await.map_err(|source| ClientError::Connect { target: target.clone(), source })?;
        Ok(Self::from_channel(channel))
    }

    /// A client over an existing channel.
    pub fn from_channel(channel: tonic::transport::Channel) -> Self {
        let traced = InterceptedService::new(channel, TraceContextInjector);
        Self {
            health: tonic_health::pb::health_client::HealthClient::new(traced.clone()),
            host: pb::host_service_client::HostServiceClient::new(traced.clone()),
            vms: pb::vm_service_client::VmServiceClient::new(traced.clone()),
            images: pb::image_service_client::ImageServiceClient::new(traced),
        }
    }

    /// True when the daemon's health service reports SERVING.
    pub async fn serving(&self) -> bool {
        let request = tonic_health::pb::HealthCheckRequest { service: String::new() };
        self.health.clone().check(request).await.is_ok_and(|response| {
            response.into_inner().status() == tonic_health::pb::health_check_response::ServingStatus::Serving
        })
    }

    /// Runs a process in a VM. `stdin` (when `start.stdin` is set) is sent as it comes,
    /// followed by end-of-input. The stream yields output and ends with the exit status.
    pub async fn exec(
        &mut self,
        start: pb::ExecVmStart,
        stdin: impl Stream<Item = Vec<u8>> + Send + 'static,
    ) -> Result<Streaming<pb::ExecVmResponse>, Status> {
        use pb::exec_vm_request::Payload;
        use tokio_stream::StreamExt;
        let first = pb::ExecVmRequest { payload: Some(Payload::Start(start)) };
        let data = stdin.map(|data| pb::ExecVmRequest { payload: Some(Payload::Stdin(data)) });
        let eof = tokio_stream::once(pb::ExecVmRequest { payload: Some(Payload::StdinEof(true)) });
        let requests = tokio_stream::once(first).chain(data).chain(eof);
        Ok(self.vms.exec_vm(requests).await?.into_inner())
    }
}

/// The operation id of a failed call, from its `google.rpc.ErrorInfo` detail.
pub fn error_op_id(status: &Status) -> Option<String> {
    status.get_details_error_info()?.metadata.get("op_id").cloned()
}

/// Why a call failed, as a code to branch on: the `reason` of the status's
/// `google.rpc.ErrorInfo` (`VM_NOT_FOUND`, `WRONG_STATE`, ...), and its facts (`metadata`).
pub fn error_reason(status: &Status) -> Option<(String, std::collections::HashMap<String, String>)> {
    let info = status.get_details_error_info()?;
    Some((info.reason, info.metadata))
}

/// The resource a `NOT_FOUND` or `ALREADY_EXISTS` status names, as `(type, name)`
/// (`banger.v1.Vm`, `web`).
pub fn error_resource(status: &Status) -> Option<(String, String)> {
    let info = status.get_details_resource_info()?;
    Some((info.resource_type, info.resource_name))
}

/// The field violations of an `INVALID_ARGUMENT` status, as `(field, description)`.
pub fn field_violations(status: &Status) -> Vec<(String, String)> {
    status
        .get_details_bad_request()
        .map(|bad| bad.field_violations.into_iter().map(|v| (v.field, v.description)).collect())
        .unwrap_or_default()
}

/// The operation id a successful call returned in its metadata.
pub fn response_op_id<T>(response: &tonic::Response<T>) -> Option<String> {
    response.metadata().get(OP_ID_METADATA)?.to_str().ok().map(str::to_owned)
}
