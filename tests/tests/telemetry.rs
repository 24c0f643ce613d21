//! Telemetry end to end: a real bangerd exports spans and metrics over OTLP/gRPC to a real
//! receiver built from the OpenTelemetry protobuf definitions, and continues the caller's
//! trace from `traceparent`. Needs `make setup`.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use banger_tests::{Daemon, guest_slot, text};
use nix::sys::signal::Signal;
use opentelemetry_proto::tonic::{
    collector::{
        metrics::v1::{
            ExportMetricsServiceRequest, ExportMetricsServiceResponse,
            metrics_service_server::{MetricsService, MetricsServiceServer},
        },
        trace::v1::{
            ExportTraceServiceRequest, ExportTraceServiceResponse,
            trace_service_server::{TraceService, TraceServiceServer},
        },
    },
    common::v1::any_value::Value,
    trace::v1::{Span, status::StatusCode},
};

/// What the receiver got.
#[derive(Debug, Clone, Default)]
struct Received {
    spans: Arc<Mutex<Vec<Span>>>,
    metrics: Arc<Mutex<Vec<String>>>,
}

#[tonic::async_trait]
impl TraceService for Received {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().expect("spans");
        for resource in request.into_inner().resource_spans {
            let service = resource.resource.iter().flat_map(|r| &r.attributes).find_map(|a| {
                match (a.key.as_str(), a.value.as_ref().and_then(|v| v.value.clone())) {
                    ("service.name", Some(Value::StringValue(s))) => Some(s),
                    _ => None,
                }
            });
            assert!(matches!(service.as_deref(), Some("bangerd" | "banger")), "unexpected service {service:?}");
            spans.extend(resource.scope_spans.into_iter().flat_map(|s| s.spans));
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

#[tonic::async_trait]
impl MetricsService for Received {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        let mut names = self.metrics.lock().expect("metrics");
        for resource in request.into_inner().resource_metrics {
            names.extend(resource.scope_metrics.into_iter().flat_map(|s| s.metrics).map(|m| m.name));
        }
        Ok(tonic::Response::new(ExportMetricsServiceResponse { partial_success: None }))
    }
}

/// Serves the receiver on 127.0.0.1 from its own runtime; returns its endpoint.
fn start_receiver(received: Received) -> (String, tokio::runtime::Runtime) {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).expect("bind");
    let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
    runtime.spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(received.clone()))
            .add_service(MetricsServiceServer::new(received))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (endpoint, runtime)
}

fn attribute(span: &Span, key: &str) -> Option<Value> {
    span.attributes.iter().find(|a| a.key == key).and_then(|a| a.value.as_ref()?.value.clone())
}

fn int_attribute(span: &Span, key: &str) -> i64 {
    match attribute(span, key) {
        Some(Value::IntValue(v)) => v,
        other => panic!("span {} has {key} = {other:?}", span.name),
    }
}

fn string_attribute(span: &Span, key: &str) -> Option<String> {
    match attribute(span, key) {
        Some(Value::StringValue(v)) => Some(v),
        _ => None,
    }
}

/// The `operation stage` log lines of one operation: stage -> (since_start_ms, since_last_stage_ms).
fn logged_stages(log: &str, op_id: &str) -> HashMap<String, (i64, i64)> {
    log.lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|line| line["message"] == "operation stage" && line["op_id"] == op_id)
        .map(|line| {
            let stage = line["stage"].as_str().expect("stage").to_owned();
            (
                stage,
                (line["since_start_ms"].as_i64().expect("start"), line["since_last_stage_ms"].as_i64().expect("last")),
            )
        })
        .collect()
}

fn wait_for<T>(what: &str, timeout: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(found) = probe() {
            return found;
        }
        assert!(std::time::Instant::now() < deadline, "{what} did not arrive within {timeout:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn operations_are_exported_as_spans_with_stage_children_and_the_callers_trace_is_continued() {
    let _slot = guest_slot();
    let received = Received::default();
    let (endpoint, _receiver) = start_receiver(received.clone());
    let pki = banger_tests::tls::Pki::new();
    let config = pki.config("[[auth.grants]]\ncert = \"tracer\"\nrole = \"viewer\"\n");
    let listen = format!("127.0.0.1:{}", banger_tests::tls::free_port());
    let flags = ["--config", &config.display().to_string(), "--listen", &listen];
    let mut daemon = Daemon::start_with_env(&flags, &[("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)]);

    let out = daemon.banger(&["vm", "create", "--name", "traced"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let op_id = text(&out.stdout).split("op=").nth(1).expect("op id").trim().to_owned();
    let failed = daemon.banger(&["vm", "create", "--name", "ghost", "--image", "no-such-image"]);
    assert!(!failed.status.success());
    let stderr = text(&failed.stderr);
    let failed_op = stderr.lines().find_map(|l| l.trim().strip_prefix("op: ")).expect("failed op id").to_owned();

    // A caller's trace continues into the daemon.
    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    let parent_id = "b7ad6b7169203331";
    let out = std::process::Command::new(banger_tests::tls::grpcurl())
        .args(pki.grpcurl_flags(Some(&pki.client("tracer"))))
        .args(["-H", &format!("traceparent: 00-{trace_id}-{parent_id}-01")])
        .args(["-d", r#"{"vm":"traced"}"#, &listen, "banger.v1.VmService/GetVm"])
        .output()
        .expect("grpcurl");
    assert!(out.status.success(), "{}", text(&out.stderr));

    // The CLI starts the trace and the daemon joins it.
    let out = daemon.banger(&["--otlp-endpoint", &endpoint, "vm", "show", "traced"]);
    assert!(out.status.success(), "{}", text(&out.stderr));

    assert!(daemon.banger(&["vm", "delete", "traced"]).status.success());
    daemon.signal(Signal::SIGTERM); // flushes the exporters
    let log = daemon.log();

    let spans = received.spans.lock().expect("spans").clone();
    let create = spans
        .iter()
        .find(|s| s.name == "vm.create" && string_attribute(s, "op_id").as_deref() == Some(op_id.as_str()))
        .unwrap_or_else(|| {
            panic!("no vm.create span for {op_id} among {:?}", spans.iter().map(|s| &s.name).collect::<Vec<_>>())
        });
    assert_eq!(string_attribute(create, "vm_name").as_deref(), Some("traced"));
    assert!(string_attribute(create, "vm_id").is_some() && string_attribute(create, "image_id").is_some());
    let mut stages: Vec<&Span> = spans.iter().filter(|s| s.parent_span_id == create.span_id).collect();
    stages.sort_by_key(|s| s.start_time_unix_nano);
    let names: Vec<&str> = stages.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "vm.create.resolve_image",
            "vm.create.insert_record",
            "vm.create.prepare_vm_dir",
            "vm.create.root_disk",
            "vm.create.agent_channel",
            "vm.create.vmm_launch",
            "vm.create.limit_resources",
            "vm.create.vmm_boot",
            "vm.create.wait_agent",
            "vm.create.mark_running",
        ]
    );
    let logged = logged_stages(&log, &op_id);
    for stage in &stages {
        let name = stage.name.trim_start_matches("vm.create.");
        let from_span = (int_attribute(stage, "since_start_ms"), int_attribute(stage, "since_last_stage_ms"));
        assert_eq!(Some(&from_span), logged.get(name), "{name}: span and log line disagree");
        assert!(stage.start_time_unix_nano >= create.start_time_unix_nano, "{name} starts before its operation");
    }

    let failure = spans
        .iter()
        .find(|s| s.name == "vm.create" && string_attribute(s, "op_id").as_deref() == Some(failed_op.as_str()))
        .expect("failed vm.create span");
    let status = failure.status.clone().expect("status");
    assert_eq!(status.code, StatusCode::Error as i32);
    assert!(status.message.contains("no-such-image"), "{}", status.message);
    let failed_stage = spans.iter().find(|s| s.parent_span_id == failure.span_id).expect("failed stage span");
    assert_eq!(failed_stage.name, "vm.create.resolve_image");
    assert_eq!(failed_stage.status.clone().expect("status").code, StatusCode::Error as i32);

    // grpcurl sends the header on its reflection calls too: each is a child of the caller's span.
    let continued = spans
        .iter()
        .find(|s| s.trace_id == hex(trace_id) && s.name == "banger.v1.VmService/GetVm")
        .unwrap_or_else(|| panic!("no GetVm span in the caller's trace {trace_id}"));
    assert_eq!(continued.parent_span_id, hex(parent_id));
    // Every call is attributed: who called, with which role, on its span and in its log line.
    assert_eq!(string_attribute(continued, "caller").as_deref(), Some("cert:tracer"));
    assert_eq!(string_attribute(continued, "role").as_deref(), Some("viewer"));
    let create_call = spans
        .iter()
        .find(|s| s.name == "banger.v1.VmService/CreateVm" && s.span_id == create.parent_span_id)
        .expect("the CreateVm call's span, parent of its operation");
    assert_eq!(string_attribute(create_call, "caller").as_deref(), Some("uid:0"));
    assert_eq!(string_attribute(create_call, "role").as_deref(), Some("admin"));
    let call_line = log
        .lines()
        .find(|l| l.contains("\"message\":\"call\"") && l.contains(&format!("\"op_id\":\"{op_id}\"")))
        .unwrap_or_else(|| panic!("no call line for {op_id} in {log}"));
    assert!(call_line.contains("\"caller\":\"uid:0\"") && call_line.contains("\"role\":\"admin\""), "{call_line}");

    let cli = spans.iter().find(|s| s.name == "banger vm show").expect("the CLI's root span");
    let server = spans
        .iter()
        .find(|s| s.name == "banger.v1.VmService/GetVm" && s.parent_span_id == cli.span_id)
        .expect("the daemon's GetVm span under the CLI's span");
    assert_eq!(server.trace_id, cli.trace_id);

    let metrics = wait_for("metrics", Duration::from_secs(15), || {
        let names = received.metrics.lock().expect("metrics").clone();
        names.iter().any(|n| n == "banger.operation.duration").then_some(names)
    });
    for name in ["banger.stage.duration", "banger.rpc.requests"] {
        assert!(metrics.iter().any(|n| n == name), "{name} missing from {metrics:?}");
    }
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex")).collect()
}

#[test]
fn an_unreachable_collector_never_fails_a_call_and_is_reported_at_most_once_a_minute() {
    // Nothing listens on this port once the listener is dropped.
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("port").local_addr().expect("addr").port();
    let endpoint = format!("http://127.0.0.1:{port}");
    // Batches every 200 ms; failures past the first are logged at debug level only.
    let env = [("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()), ("OTEL_BSP_SCHEDULE_DELAY", "200")];
    let daemon = Daemon::start_with_env(&["--log-level", "debug"], &env);
    let failed_again = "span export failed again";
    for i in 0..3 {
        let out = daemon.banger(&["vm", "create", "--no-start", "--name", &format!("quiet-{i}")]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert!(daemon.banger(&["vm", "list"]).status.success());
        // Each round's spans make another failed export.
        let before = daemon.log().matches(failed_again).count();
        banger_tests::wait_until("another failed export", Duration::from_secs(30), || {
            daemon.log().matches(failed_again).count() > before
                || (i == 0 && daemon.log().contains("span export failed;"))
        });
    }
    let reports = daemon.log().matches("span export failed;").count();
    assert_eq!(reports, 1, "{}", daemon.log());
    assert!(daemon.log().matches(failed_again).count() >= 2, "{}", daemon.log());
    for i in 0..3 {
        assert!(daemon.banger(&["vm", "delete", &format!("quiet-{i}")]).status.success());
    }
}

#[test]
fn an_unknown_log_level_stops_bangerd_naming_the_allowed_ones() {
    for (flag, env) in [(Some("verbose"), None), (None, Some("chatty"))] {
        let mut command = std::process::Command::new(banger_tests::bin_dir().join("bangerd"));
        command.args(["--socket", "/nonexistent/never-bound.sock"]).env_remove("BANGER_LOG_LEVEL");
        if let Some(level) = flag {
            command.args(["--log-level", level]);
        }
        if let Some(level) = env {
            command.env("BANGER_LOG_LEVEL", level);
        }
        let out = command.output().expect("bangerd");
        assert!(!out.status.success());
        let stderr = text(&out.stderr);
        assert!(stderr.contains("debug, info, warn, error"), "{stderr}");
    }
}
