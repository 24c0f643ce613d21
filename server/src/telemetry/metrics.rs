//! The daemon's metrics, exported over OTLP when telemetry is on (no-ops otherwise):
//! operation and stage durations, RPCs by method and status code, VMs by state.

use std::sync::{Arc, Mutex, OnceLock};

use opentelemetry::{
    KeyValue,
    metrics::{Counter, Histogram},
};

/// The instruments; see [`metrics`].
#[derive(Debug)]
pub struct Metrics {
    /// `banger.operation.duration` (ms), by `operation` and `outcome`.
    pub operation_duration: Histogram<f64>,
    /// `banger.stage.duration` (ms), by `operation` and `stage`.
    pub stage_duration: Histogram<f64>,
    /// `banger.rpc.requests`, by `rpc.method` and `rpc.grpc.status_code`.
    pub rpc_requests: Counter<u64>,
}

/// The instruments, created on first use from the global meter provider (so after
/// `Telemetry::init` has installed one).
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(|| {
        let meter = opentelemetry::global::meter("bangerd");
        Metrics {
            operation_duration: meter
                .f64_histogram("banger.operation.duration")
                .with_unit("ms")
                .with_description("Duration of operations (vm.create, vm.start, ...)")
                .build(),
            stage_duration: meter
                .f64_histogram("banger.stage.duration")
                .with_unit("ms")
                .with_description("Duration of each stage of an operation")
                .build(),
            rpc_requests: meter
                .u64_counter("banger.rpc.requests")
                .with_description("gRPC requests served, by method and status code")
                .build(),
        }
    })
}

/// VM counts by state, refreshed by the daemon and read by the `banger.vms` gauge.
pub type VmCounts = Arc<Mutex<Vec<(&'static str, u64)>>>;

/// Registers the `banger.vms` gauge (VMs by `state`), reading `counts` at each collection.
pub fn observe_vms(counts: VmCounts) {
    let meter = opentelemetry::global::meter("bangerd");
    let _gauge = meter
        .u64_observable_gauge("banger.vms")
        .with_description("VMs recorded on this host, by observed state")
        .with_callback(move |observer| {
            let counts = counts.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            for (state, count) in counts.iter() {
                observer.observe(*count, &[KeyValue::new("state", *state)]);
            }
        })
        .build();
}
