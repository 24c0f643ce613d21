//! A typed client of bangerd's gRPC API, over its unix socket or TCP.
//!
//! ```no_run
//! # async fn demo() -> Result<(), banger_client::ClientError> {
//! let mut client = banger_client::Client::connect(&banger_client::Target::default()).await?;
//! let vms = client.vms.list_vms(banger_client::pb::ListVmsRequest::default()).await?;
//! # Ok(()) }
//! ```

pub mod pki;

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
    /// A `https://HOST:PORT` endpoint (TLS; `http://` is taken to mean the same when
    /// [`Credentials::tls_ca`] is given, as bangerd serves TCP only over TLS).
    Endpoint(String),
}

/// How a client proves who it is, and knows the daemon is who it claims.
#[derive(Clone, Default)]
pub struct Credentials {
    /// PEM CA certificate(s) the daemon's TCP certificate must be signed by.
    pub tls_ca: Option<Vec<u8>>,
    /// PEM client certificate and its private key (mutual TLS).
    pub tls_identity: Option<(Vec<u8>, Vec<u8>)>,
    /// The name the daemon's certificate must carry; by default the endpoint's host.
    pub tls_server_name: Option<String>,
    /// A bearer token, sent as `authorization: Bearer <token>` with every call.
    pub token: Option<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("tls_ca", &self.tls_ca.is_some())
            .field("tls_identity", &self.tls_identity.is_some())
            .field("tls_server_name", &self.tls_server_name)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
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
    /// The credentials cannot be used.
    #[error("invalid credentials: {0}")]
    InvalidCredentials(String),
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
/// daemon's spans join the caller's trace (nothing when there is no trace), and the bearer
/// token, when there is one.
#[derive(Debug, Clone, Default)]
pub struct TraceContextInjector {
    authorization: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
}

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
        if let Some(authorization) = &self.authorization {
            request.metadata_mut().insert("authorization", authorization.clone());
        }
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
    /// `banger.v1.PoolService`.
    pub pools: pb::pool_service_client::PoolServiceClient<Channel>,
    /// `banger.v1.SnapshotService`.
    pub snapshots: pb::snapshot_service_client::SnapshotServiceClient<Channel>,
    /// `grpc.health.v1.Health`.
    pub health: tonic_health::pb::health_client::HealthClient<Channel>,
}

impl Client {
    /// Connects to the daemon at `target`, as whoever this process is (on the unix socket).
    pub async fn connect(target: &Target) -> Result<Self, ClientError> {
        Self::connect_with(target, &Credentials::default()).await
    }

    /// Connects to the daemon at `target` with `credentials`: TLS (with a client
    /// certificate when given) on TCP, and a bearer token on every call when given.
    pub async fn connect_with(target: &Target, credentials: &Credentials) -> Result<Self, ClientError> {
        let uri = match target {
            Target::Unix(path) => format!("unix://{}", path.display()),
            Target::Endpoint(endpoint) if credentials.tls_ca.is_some() => match endpoint.strip_prefix("http://") {
                Some(rest) => format!("https://{rest}"),
                None => endpoint.clone(),
            },
            Target::Endpoint(endpoint) => endpoint.clone(),
        };
        let mut endpoint = Endpoint::from_shared(uri.clone())
            .map_err(|source| ClientError::InvalidEndpoint { endpoint: uri.clone(), source })?;
        if uri.starts_with("https://") {
            let Some(ca) = &credentials.tls_ca else {
                return Err(ClientError::InvalidCredentials(format!(
                    "{uri} is TLS: give the CA that signed the daemon's certificate (--tls-ca)"
                )));
            };
            let mut tls =
                tonic::transport::ClientTlsConfig::new().ca_certificate(tonic::transport::Certificate::from_pem(ca));
            if let Some((cert, key)) = &credentials.tls_identity {
                tls = tls.identity(tonic::transport::Identity::from_pem(cert, key));
            }
            if let Some(name) = &credentials.tls_server_name {
                tls = tls.domain_name(name.clone());
            }
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|source| ClientError::InvalidEndpoint { endpoint: uri.clone(), source })?;
        } else if credentials.tls_identity.is_some() {
            return Err(ClientError::InvalidCredentials(
                "a client certificate is for TCP endpoints (https://HOST:PORT with --tls-ca)".into(),
            ));
        } else if credentials.token.is_some() && !uri.starts_with("unix:") {
            // Anyone on the path would read it (bangerd serves TCP only over TLS anyway).
            return Err(ClientError::InvalidCredentials(format!(
                "{uri} is cleartext: a bearer token is sent only over TLS (https://HOST:PORT with --tls-ca)"
            )));
        }
        let authorization = match &credentials.token {
            Some(token) => Some(
                format!("Bearer {}", token.trim())
                    .parse()
                    .map_err(|_| ClientError::InvalidCredentials("the token must be printable ASCII".into()))?,
            ),
            None => None,
        };
        let channel =
            endpoint.connect().await.map_err(|source| ClientError::Connect { target: target.clone(), source })?;
        Ok(Self::with_interceptor(channel, TraceContextInjector { authorization }))
    }

    /// A client over an existing channel.
    pub fn from_channel(channel: tonic::transport::Channel) -> Self {
        Self::with_interceptor(channel, TraceContextInjector::default())
    }

    fn with_interceptor(channel: tonic::transport::Channel, interceptor: TraceContextInjector) -> Self {
        let traced = InterceptedService::new(channel, interceptor);
        Self {
            health: tonic_health::pb::health_client::HealthClient::new(traced.clone()),
            host: pb::host_service_client::HostServiceClient::new(traced.clone()),
            pools: pb::pool_service_client::PoolServiceClient::new(traced.clone()),
            snapshots: pb::snapshot_service_client::SnapshotServiceClient::new(traced.clone()),
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

    /// Runs a process in a VM, sending `input` after the start as it comes: standard input,
    /// its end, and (with `start.terminal`) resizes.
    pub async fn exec_with(
        &mut self,
        start: pb::ExecVmStart,
        input: impl Stream<Item = pb::exec_vm_request::Payload> + Send + 'static,
    ) -> Result<Streaming<pb::ExecVmResponse>, Status> {
        use pb::exec_vm_request::Payload;
        use tokio_stream::StreamExt;
        let first = pb::ExecVmRequest { payload: Some(Payload::Start(start)) };
        let rest = input.map(|payload| pb::ExecVmRequest { payload: Some(payload) });
        Ok(self.vms.exec_vm(tokio_stream::once(first).chain(rest)).await?.into_inner())
    }
}

impl ClientError {
    /// True when the daemon's socket is there but this user may not connect to it (as
    /// opposed to nobody serving it).
    pub fn permission_denied(&self) -> bool {
        let mut source = std::error::Error::source(self);
        while let Some(cause) = source {
            if let Some(io) = cause.downcast_ref::<std::io::Error>()
                && io.kind() == std::io::ErrorKind::PermissionDenied
            {
                return true;
            }
            source = cause.source();
        }
        false
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_bearer_token_is_never_sent_in_cleartext() {
        let token = Credentials { token: Some("secret".into()), ..Credentials::default() };
        for endpoint in ["http://127.0.0.1:1", "http://[::1]:1"] {
            match Client::connect_with(&Target::Endpoint(endpoint.into()), &token).await {
                Err(ClientError::InvalidCredentials(why)) => assert!(why.contains("only over TLS"), "{why}"),
                Err(other) => panic!("{endpoint}: refused otherwise: {other}"),
                Ok(_) => panic!("{endpoint}: a token over cleartext TCP was accepted"),
            }
        }
    }
}
