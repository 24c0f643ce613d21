//! An exporter wrapper that reports export failures in the daemon's log, at most once a
//! minute, so that an unreachable collector is visible without flooding the log.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use opentelemetry_sdk::{
    error::OTelSdkResult,
    trace::{SpanData, SpanExporter},
};

/// The log target of export failure reports (kept out of the exported spans).
pub const EXPORT_LOG_TARGET: &str = "banger_server::telemetry::export";

/// How often an export failure is reported at most.
const REPORT_EVERY: Duration = Duration::from_secs(60);

/// Forwards to `E` and logs its failures, rate-limited.
#[derive(Debug)]
pub struct ReportingSpanExporter<E> {
    inner: E,
    last_report_secs: AtomicU64,
    suppressed: AtomicU64,
}

impl<E> ReportingSpanExporter<E> {
    /// Wraps `inner`.
    pub fn new(inner: E) -> Self {
        Self { inner, last_report_secs: AtomicU64::new(0), suppressed: AtomicU64::new(0) }
    }

    fn report(&self, error: &dyn std::fmt::Display) {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default();
        let last = self.last_report_secs.load(Ordering::Relaxed);
        if now.saturating_sub(last) < REPORT_EVERY.as_secs()
            || self.last_report_secs.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_err()
        {
            let suppressed = self.suppressed.fetch_add(1, Ordering::Relaxed) + 1;
            tracing::debug!(
                target: EXPORT_LOG_TARGET,
                error = %error,
                failures_since_last_report = suppressed,
                "span export failed again (not reported until a minute has passed)"
            );
            return;
        }
        let suppressed = self.suppressed.swap(0, Ordering::Relaxed);
        tracing::warn!(
            target: EXPORT_LOG_TARGET,
            error = %error,
            failures_since_last_report = suppressed,
            "span export failed; spans are dropped until the collector answers (reported at most once a minute)"
        );
    }
}

impl<E: SpanExporter> SpanExporter for ReportingSpanExporter<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let result = self.inner.export(batch).await;
        if let Err(error) = &result {
            self.report(error);
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.inner.set_resource(resource);
    }
}
