//! Telemetry: JSON logs always; OpenTelemetry spans and metrics over OTLP/gRPC when an
//! endpoint is configured. The runner's stage events feed both (one source). The exporter
//! is installed only by `main.rs` (through [`Telemetry::init`]); tests may install it too.

mod export;
mod logs;
pub mod metrics;
pub mod propagation;

use std::time::Duration;

use opentelemetry::{KeyValue, trace::TracerProvider as _};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::{
    Resource,
    metrics::{PeriodicReader, SdkMeterProvider},
    propagation::TraceContextPropagator,
    trace::SdkTracerProvider,
};
use tracing_subscriber::{EnvFilter, Layer, Registry, layer::SubscriberExt, util::SubscriberInitExt};

pub use logs::{LogLevel, json_layer};

/// How long one OTLP export may take before it is abandoned (it runs off the request path).
const EXPORT_TIMEOUT: Duration = Duration::from_secs(3);
/// How often metrics are pushed.
const METRICS_INTERVAL: Duration = Duration::from_secs(10);

/// Telemetry could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The OTLP exporter could not be built (a malformed endpoint, usually).
    #[error("cannot set up the OTLP exporter for {endpoint}: {message}")]
    Exporter {
        /// The endpoint.
        endpoint: String,
        /// Why.
        message: String,
    },
}

/// The installed telemetry; [`Telemetry::shutdown`] flushes what is buffered.
#[derive(Debug, Default)]
pub struct Telemetry {
    tracer_provider: Option<SdkTracerProvider>,
    meter_provider: Option<SdkMeterProvider>,
}

fn resource() -> Resource {
    let host = nix::unistd::gethostname().map(|h| h.to_string_lossy().into_owned()).unwrap_or_default();
    Resource::builder()
        .with_service_name("bangerd")
        .with_attributes([
            KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
            KeyValue::new("host.name", host),
        ])
        .build()
}

impl Telemetry {
    /// Installs the global subscriber: JSON logs at `level`, and spans and metrics exported
    /// to `otlp_endpoint` when given. Must run inside a Tokio runtime (the exporter's
    /// channel needs one); exports then run on their own threads, never on a request's path.
    pub fn init(level: LogLevel, otlp_endpoint: Option<&str>) -> Result<Self, TelemetryError> {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        let Some(endpoint) = otlp_endpoint else {
            let _ = tracing_subscriber::registry().with(json_layer(level)).try_init();
            return Ok(Self::default());
        };
        let failed =
            |e: &dyn std::fmt::Display| TelemetryError::Exporter { endpoint: endpoint.into(), message: e.to_string() };
        let spans = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .with_timeout(EXPORT_TIMEOUT)
            .build()
            .map_err(|e| failed(&e))?;
        let tracer_provider = SdkTracerProvider::builder()
            .with_batch_exporter(export::ReportingSpanExporter::new(spans))
            .with_resource(resource())
            .build();
        let metrics = opentelemetry_otlp::MetricExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .with_timeout(EXPORT_TIMEOUT)
            .build()
            .map_err(|e| failed(&e))?;
        let meter_provider = SdkMeterProvider::builder()
            .with_reader(PeriodicReader::builder(metrics).with_interval(METRICS_INTERVAL).build())
            .with_resource(resource())
            .build();
        opentelemetry::global::set_meter_provider(meter_provider.clone());
        // The exporter's own traffic (tonic, h2) and its error reports are never exported.
        let otel_filter = EnvFilter::new(format!(
            "info,h2=off,hyper=off,tonic=off,tower=off,opentelemetry=off,{}=off",
            export::EXPORT_LOG_TARGET
        ));
        let otel_layer: Box<dyn Layer<Registry> + Send + Sync> = tracing_opentelemetry::layer()
            .with_tracer(tracer_provider.tracer("bangerd"))
            .with_filter(otel_filter)
            .boxed();
        let _ = tracing_subscriber::registry().with(vec![json_layer(level), otel_layer]).try_init();
        Ok(Self { tracer_provider: Some(tracer_provider), meter_provider: Some(meter_provider) })
    }

    /// Flushes and stops the exporters (bounded by their timeouts).
    pub fn shutdown(self) {
        if let Some(provider) = self.tracer_provider {
            let _ = provider.shutdown();
        }
        if let Some(provider) = self.meter_provider {
            let _ = provider.shutdown();
        }
    }
}
