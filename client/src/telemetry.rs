//! The CLI's tracing: with an OTLP endpoint, each command is a root span (`banger vm
//! create`, ...) exported to it, and every request carries that trace to the daemon.

use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::{Resource, propagation::TraceContextPropagator, trace::SdkTracerProvider};
use tracing_subscriber::{EnvFilter, Layer, layer::SubscriberExt, util::SubscriberInitExt};

/// The CLI's tracer, flushed by [`CliTelemetry::shutdown`].
#[derive(Debug, Default)]
pub struct CliTelemetry {
    provider: Option<SdkTracerProvider>,
}

impl CliTelemetry {
    /// Sets up W3C trace propagation, and span export when `endpoint` is given. Must run
    /// inside the Tokio runtime. A malformed endpoint is reported and tracing stays off.
    pub fn init(endpoint: Option<&str>) -> Self {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        let Some(endpoint) = endpoint.filter(|e| !e.is_empty()) else { return Self::default() };
        let exporter = match opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .with_timeout(Duration::from_secs(2))
            .build()
        {
            Ok(exporter) => exporter,
            Err(err) => {
                eprintln!("banger: not exporting traces to {endpoint}: {err}");
                return Self::default();
            }
        };
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(Resource::builder().with_service_name("banger").build())
            .build();
        let layer = tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("banger"))
            .with_filter(EnvFilter::new("info,h2=off,hyper=off,tonic=off,tower=off,opentelemetry=off"));
        let _ = tracing_subscriber::registry().with(layer).try_init();
        Self { provider: Some(provider) }
    }

    /// Flushes the command's spans (bounded by the exporter's timeout).
    pub fn shutdown(self) {
        if let Some(provider) = self.provider {
            let _ = provider.shutdown();
        }
    }
}
