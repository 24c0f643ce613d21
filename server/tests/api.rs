//! API tests: the real tonic server in-process on a unix socket, driven by the real client
//! library, over a real SQLite file. No guest boots here (see `tests/` for that): these
//! cover validation, error codes and details, lookups by id and name, durability, and,
//! over the stateful fake host, the whole path of a VM (create, exec, copy, delete). Time
//! is a manual clock where it matters (time to live, retention): advanced, never slept.

use std::{path::Path, time::Duration};

use banger_client::{Client, Target, error_op_id, error_reason, error_resource, field_violations, pb};
use banger_server::{
    Listeners, Wiring,
    clock::Clock,
    config::{Config, FileConfig, Overrides},
    host::fake::FakeHost,
};
use tokio::sync::oneshot;
use tonic::Code;

/// A daemon served in-process over `dir`, until dropped.
struct TestDaemon {
    client: Client,
    stop: Option<oneshot::Sender<()>>,
    served: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

fn config(dir: &Path, mut file: FileConfig) -> Config {
    // Guest memory files of the fake's VMs stay in the test's directory.
    file.memory_dir.get_or_insert_with(|| dir.join("memory"));
    let overrides = Overrides {
        state_dir: Some(dir.join("state")),
        socket: Some(dir.join("bangerd.sock")),
        default_image_dir: Some(dir.join("no-default-image")),
        ..Default::default()
    };
    Config::from_parts(file, overrides).expect("valid config")
}

impl TestDaemon {
    /// Over the real host (nothing here boots: creates fail before a VMM, or never start one).
    async fn start(config: Config) -> Self {
        Self::start_with(config, Wiring::default()).await
    }

    /// Over the fake host, with `clock`.
    async fn start_fake(config: Config, host: &FakeHost, clock: &Clock) -> Self {
        Self::start_with(config, Wiring { host: Some(host.services()), clock: clock.clone() }).await
    }

    async fn start_with(config: Config, wiring: Wiring) -> Self {
        let ops = banger_server::open_ops_with(&config, wiring).await.expect("open ops");
        let unix = banger_server::bind_unix(&config.socket, None).await.expect("bind");
        let (stop, stopped) = oneshot::channel::<()>();
        let access = banger_server::api::auth::AccessControl::new(config.access.clone(), None, Vec::new());
        let served = tokio::spawn(banger_server::serve(ops, Listeners { unix, tcp: None, access }, async {
            let _ = stopped.await;
        }));
        let client = Client::connect(&Target::Unix(config.socket.clone())).await.expect("connect");
        Self { client, stop: Some(stop), served: Some(served) }
    }

    async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(served) = self.served.take() {
            served.await.expect("join").expect("served cleanly");
        }
    }
}

/// Writes a file that passes the daemon's kernel check (a bzImage header) and one that
/// passes its ext4 check (the superblock magic), without being bootable.
fn fake_image_sources(dir: &Path) -> (String, String) {
    let kernel = dir.join("vmlinuz");
    let mut bytes = vec![0u8; 4096];
    bytes[0x202..0x206].copy_from_slice(b"HdrS");
    std::fs::write(&kernel, &bytes).expect("kernel");
    let rootfs = dir.join("rootfs.ext4");
    let mut bytes = vec![0u8; 1 << 20];
    bytes[1080] = 0x53;
    bytes[1081] = 0xEF;
    std::fs::write(&rootfs, &bytes).expect("rootfs");
    (kernel.display().to_string(), rootfs.display().to_string())
}

async fn import(client: &mut Client, dir: &Path, name: &str) -> pb::Image {
    let (kernel_path, rootfs_path) = fake_image_sources(dir);
    let request = pb::ImportImageRequest { name: name.into(), kernel_path, rootfs_path, ..Default::default() };
    client.images.import_image(request).await.expect("import").into_inner().image.expect("image")
}

/// The `ErrorInfo` reason of a status.
fn reason(status: &tonic::Status) -> String {
    error_reason(status).map(|(reason, _)| reason).unwrap_or_default()
}

fn violated_fields(status: &tonic::Status) -> Vec<String> {
    field_violations(status).into_iter().map(|(field, _)| field).collect()
}

#[tokio::test]
async fn invalid_vm_requests_get_invalid_argument_with_field_violations() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut daemon = TestDaemon::start(config(dir.path(), FileConfig::default())).await;
    let cases: Vec<(pb::CreateVmRequest, &[&str])> = vec![
        (pb::CreateVmRequest { name: "has/slash".into(), ..Default::default() }, &["name"]),
        (pb::CreateVmRequest { name: "has space".into(), ..Default::default() }, &["name"]),
        (pb::CreateVmRequest { name: "x".repeat(64), ..Default::default() }, &["name"]),
        (pb::CreateVmRequest { vcpus: Some(0), ..Default::default() }, &["vcpus"]),
        (pb::CreateVmRequest { memory_mib: Some(1), ..Default::default() }, &["memory_mib"]),
        (
            pb::CreateVmRequest { name: "".into(), vcpus: Some(0), memory_mib: Some(1), ..Default::default() },
            &["vcpus", "memory_mib"],
        ),
    ];
    for (request, fields) in cases {
        let status = daemon.client.vms.create_vm(request.clone()).await.expect_err("invalid");
        assert_eq!(status.code(), Code::InvalidArgument, "{request:?}: {status:?}");
        assert_eq!(violated_fields(&status), fields, "{request:?}");
    }
    let status = daemon.client.vms.get_vm(pb::GetVmRequest { vm: String::new() }).await.expect_err("empty key");
    assert_eq!((status.code(), violated_fields(&status)), (Code::InvalidArgument, vec!["vm".to_owned()]));
    // Nothing was recorded and the daemon still serves.
    let vms = daemon.client.vms.list_vms(pb::ListVmsRequest::default()).await.expect("list").into_inner().vms;
    assert!(vms.is_empty());
    assert!(
        !dir.path().join("state/vms").exists()
            || std::fs::read_dir(dir.path().join("state/vms")).expect("dir").next().is_none()
    );
    daemon.shutdown().await;
}

#[tokio::test]
async fn unknown_images_and_vms_are_not_found() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut daemon = TestDaemon::start(config(dir.path(), FileConfig::default())).await;
    let request = pb::CreateVmRequest { image: "no-such-image".into(), ..Default::default() };
    let status = daemon.client.vms.create_vm(request).await.expect_err("unknown image");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert_eq!(error_resource(&status), Some(("banger.v1.Image".into(), "no-such-image".into())));
    assert_eq!(reason(&status), "IMAGE_NOT_FOUND");
    assert!(error_op_id(&status).is_some(), "a failed operation names its op id");
    for status in [
        daemon.client.vms.get_vm(pb::GetVmRequest { vm: "ghost".into() }).await.expect_err("get"),
        daemon
            .client
            .vms
            .start_vm(pb::StartVmRequest { vm: "ghost".into(), ..Default::default() })
            .await
            .expect_err("start"),
        daemon
            .client
            .vms
            .delete_vm(pb::DeleteVmRequest { vm: "ghost".into(), ..Default::default() })
            .await
            .expect_err("delete"),
        daemon.client.images.get_image(pb::GetImageRequest { image: "ghost".into() }).await.expect_err("image"),
    ] {
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
    }
    // No default image is built in this test's default image dir.
    let status = daemon.client.vms.create_vm(pb::CreateVmRequest::default()).await.expect_err("no default image");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    daemon.shutdown().await;
}

#[tokio::test]
async fn image_import_validates_its_sources_and_names() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut daemon = TestDaemon::start(config(dir.path(), FileConfig::default())).await;
    let (kernel_path, rootfs_path) = fake_image_sources(dir.path());
    let cases: Vec<(pb::ImportImageRequest, &[&str])> = vec![
        (
            pb::ImportImageRequest {
                name: "img".into(),
                kernel_path: "/no/such/kernel".into(),
                rootfs_path: rootfs_path.clone(),
                ..Default::default()
            },
            &["kernel_path"],
        ),
        (
            pb::ImportImageRequest {
                name: "img".into(),
                kernel_path: "relative/kernel".into(),
                rootfs_path: "/etc/hostname".into(),
                ..Default::default()
            },
            &["kernel_path", "rootfs_path"],
        ),
        (
            pb::ImportImageRequest {
                name: "Bad Name".into(),
                kernel_path: kernel_path.clone(),
                rootfs_path: rootfs_path.clone(),
                initrd_path: "/no/such/initrd".into(),
                ..Default::default()
            },
            &["name", "initrd_path"],
        ),
        (
            // A regular file that cannot be read (as root too): the caller's error, not INTERNAL.
            pb::ImportImageRequest {
                name: "img".into(),
                kernel_path: kernel_path.clone(),
                rootfs_path: rootfs_path.clone(),
                initrd_path: "/proc/self/mem".into(),
                ..Default::default()
            },
            &["initrd_path"],
        ),
    ];
    for (request, fields) in cases {
        let status = daemon.client.images.import_image(request.clone()).await.expect_err("invalid");
        assert_eq!(status.code(), Code::InvalidArgument, "{request:?}: {status:?}");
        assert_eq!(violated_fields(&status), fields, "{request:?}");
    }
    let image = import(&mut daemon.client, dir.path(), "img").await;
    assert!(
        image.rootfs_path.starts_with(&dir.path().join("state").display().to_string()),
        "copied into the state dir"
    );
    let again = pb::ImportImageRequest { name: "img".into(), kernel_path, rootfs_path, ..Default::default() };
    let status = daemon.client.images.import_image(again).await.expect_err("duplicate");
    assert_eq!(status.code(), Code::AlreadyExists);
    let by_id = daemon.client.images.get_image(pb::GetImageRequest { image: image.id.clone() }).await.expect("by id");
    assert_eq!(by_id.into_inner().image.expect("image").name, "img");
    daemon.shutdown().await;
}

#[tokio::test]
async fn vms_are_addressable_by_id_and_name_and_survive_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config(dir.path(), FileConfig::default());
    let mut daemon = TestDaemon::start(config.clone()).await;
    let image = import(&mut daemon.client, dir.path(), "img").await;
    let request =
        pb::CreateVmRequest { name: "web-1".into(), image: "img".into(), no_start: true, ..Default::default() };
    let response = daemon.client.vms.create_vm(request.clone()).await.expect("create");
    assert!(banger_client::response_op_id(&response).is_some(), "x-banger-op-id is set");
    let vm = response.into_inner().vm.expect("vm");
    assert_eq!(
        (vm.state(), vm.image_id.as_str(), vm.vcpus, vm.memory_mib),
        (pb::VmState::Created, image.id.as_str(), 1, 256)
    );
    let status = daemon.client.vms.create_vm(request).await.expect_err("duplicate name");
    assert_eq!(status.code(), Code::AlreadyExists);
    for key in [vm.id.clone(), "web-1".to_owned()] {
        let got = daemon.client.vms.get_vm(pb::GetVmRequest { vm: key }).await.expect("get").into_inner().vm;
        assert_eq!(got.expect("vm").id, vm.id);
    }
    let status =
        daemon.client.images.delete_image(pb::DeleteImageRequest { image: "img".into() }).await.expect_err("in use");
    assert_eq!(status.code(), Code::FailedPrecondition);
    let exec = pb::ExecVmStart { vm: "web-1".into(), argv: vec!["true".into()], ..Default::default() };
    let status = daemon.client.exec(exec, tokio_stream::empty()).await.expect_err("not running");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    let empty_argv = pb::ExecVmStart { vm: "web-1".into(), ..Default::default() };
    let status = daemon.client.exec(empty_argv, tokio_stream::empty()).await.expect_err("empty argv");
    assert_eq!((status.code(), violated_fields(&status)), (Code::InvalidArgument, vec!["start.argv".to_owned()]));
    daemon.shutdown().await;

    // A new daemon over the same state dir sees the same records.
    let mut daemon = TestDaemon::start(config).await;
    let vms = daemon.client.vms.list_vms(pb::ListVmsRequest::default()).await.expect("list").into_inner().vms;
    assert_eq!(vms.iter().map(|v| (v.id.as_str(), v.name.as_str())).collect::<Vec<_>>(), [(vm.id.as_str(), "web-1")]);
    let images =
        daemon.client.images.list_images(pb::ListImagesRequest::default()).await.expect("list").into_inner().images;
    assert_eq!(images.len(), 1);
    daemon
        .client
        .vms
        .delete_vm(pb::DeleteVmRequest { vm: "web-1".into(), ..Default::default() })
        .await
        .expect("delete vm");
    assert!(!Path::new(&vm.runtime.expect("runtime").vm_dir).exists(), "vm dir removed");
    daemon.client.images.delete_image(pb::DeleteImageRequest { image: "img".into() }).await.expect("delete image");
    daemon.shutdown().await;
}

#[tokio::test]
async fn a_missing_host_tool_is_unavailable_and_a_failed_create_leaves_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file =
        FileConfig { vsock_backend_binary: Some("/nonexistent/vhost-device-vsock".into()), ..Default::default() };
    let config = config(dir.path(), file);
    let mut daemon = TestDaemon::start(config.clone()).await;
    import(&mut daemon.client, dir.path(), "img").await;
    let request = pb::CreateVmRequest { name: "doomed".into(), image: "img".into(), ..Default::default() };
    let status = daemon.client.vms.create_vm(request).await.expect_err("no vsock backend");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let (reason, facts) = error_reason(&status).expect("error info");
    assert_eq!(reason, "HOST_TOOL_MISSING");
    assert_eq!(facts.get("program").map(String::as_str), Some("/nonexistent/vhost-device-vsock"));
    assert_eq!(facts.get("stage").map(String::as_str), Some("agent_channel"));
    assert!(error_op_id(&status).is_some());
    let vms = daemon.client.vms.list_vms(pb::ListVmsRequest::default()).await.expect("list").into_inner().vms;
    assert!(vms.is_empty(), "the failed create left a record: {vms:?}");
    let leftovers: Vec<_> = std::fs::read_dir(config.state_dir.join("vms")).expect("vms dir").collect();
    assert!(leftovers.is_empty(), "the failed create left {leftovers:?}");
    daemon.shutdown().await;
}

#[tokio::test]
async fn health_and_reflection_are_served() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config(dir.path(), FileConfig::default());
    let daemon = TestDaemon::start(config.clone()).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("unix://{}", config.socket.display()))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    for service in ["", "banger.v1.VmService", "banger.v1.ImageService"] {
        let request = tonic_health::pb::HealthCheckRequest { service: service.into() };
        let response = health.check(request).await.expect("health").into_inner();
        assert_eq!(response.status(), tonic_health::pb::health_check_response::ServingStatus::Serving, "{service:?}");
    }
    daemon.shutdown().await;
}

#[tokio::test]
async fn a_request_id_makes_a_mutation_run_once_and_its_retries_get_the_first_answer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config(dir.path(), FileConfig::default());
    let mut daemon = TestDaemon::start(config.clone()).await;
    import(&mut daemon.client, dir.path(), "img").await;
    let create = |name: &str| pb::CreateVmRequest {
        name: name.into(),
        image: "img".into(),
        no_start: true,
        request_id: "job-42-create".into(),
        ..Default::default()
    };

    // Twenty concurrent calls with one request id: one VM, twenty identical answers.
    let calls = (0..20).map(|_| {
        let mut client = daemon.client.clone();
        let request = create("ci-1");
        tokio::spawn(async move {
            let response = client.vms.create_vm(request).await.expect("create");
            let op = banger_client::response_op_id(&response);
            (response.into_inner().vm.expect("vm"), op)
        })
    });
    let answers: Vec<_> = futures_join_all(calls).await;
    assert!(answers.iter().all(|answer| *answer == answers[0]), "the answers differ");
    assert!(answers[0].1.is_some(), "the operation id comes back with every answer");
    let vms = daemon.client.vms.list_vms(pb::ListVmsRequest::default()).await.expect("list").into_inner().vms;
    assert_eq!(vms.len(), 1, "{vms:?}");

    // The same id with another body names the conflict; another method too.
    let status = daemon.client.vms.create_vm(create("ci-2")).await.expect_err("other body");
    assert_eq!(status.code(), Code::AlreadyExists);
    let (reason, facts) = error_reason(&status).expect("error info");
    assert_eq!(reason, "REQUEST_ID_REUSED");
    assert_eq!(facts.get("request_id").map(String::as_str), Some("job-42-create"));
    let delete = pb::DeleteVmRequest { vm: "ci-1".into(), request_id: "job-42-create".into(), ..Default::default() };
    let status = daemon.client.vms.delete_vm(delete).await.expect_err("other method");
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");

    // A request id that cannot be one is refused as a field.
    let mut spaced = create("ci-3");
    spaced.request_id = "has space".into();
    let status = daemon.client.vms.create_vm(spaced).await.expect_err("bad id");
    assert_eq!((status.code(), violated_fields(&status)), (Code::InvalidArgument, vec!["request_id".to_owned()]));

    // A failed request is not remembered: its retry runs again (and succeeds once it can).
    let mut missing_image = create("ci-4");
    (missing_image.image, missing_image.request_id) = ("later".into(), "job-43".into());
    let status = daemon.client.vms.create_vm(missing_image.clone()).await.expect_err("no image yet");
    assert_eq!(status.code(), Code::NotFound);
    import(&mut daemon.client, dir.path(), "later").await;
    daemon.client.vms.create_vm(missing_image).await.expect("the retry runs");
    daemon.shutdown().await;

    // After a restart the answer comes from the database.
    let mut daemon = TestDaemon::start(config).await;
    let response = daemon.client.vms.create_vm(create("ci-1")).await.expect("retry after restart");
    let op = banger_client::response_op_id(&response);
    assert_eq!((response.into_inner().vm.expect("vm"), op), answers[0]);
    let vms = daemon.client.vms.list_vms(pb::ListVmsRequest::default()).await.expect("list").into_inner().vms;
    assert_eq!(vms.len(), 2, "ci-1 and ci-4 only");
    daemon.shutdown().await;
}

async fn futures_join_all<T>(handles: impl Iterator<Item = tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::new();
    for handle in handles.collect::<Vec<_>>() {
        out.push(handle.await.expect("task"));
    }
    out
}

fn labels(pairs: &[(&str, &str)]) -> std::collections::BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

#[tokio::test]
async fn vms_are_listed_by_label_and_state_in_pages_stable_under_concurrent_creates() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut daemon = TestDaemon::start(config(dir.path(), FileConfig::default())).await;
    import(&mut daemon.client, dir.path(), "img").await;
    let create = |name: String, team: &str| pb::CreateVmRequest {
        name,
        image: "img".into(),
        no_start: true,
        labels: labels(&[("team", team), ("ci.example.com/job", "7")]),
        ..Default::default()
    };
    for i in 0..7 {
        let team = if i % 2 == 0 { "ci" } else { "web" };
        daemon.client.vms.create_vm(create(format!("vm-{i}"), team)).await.expect("create");
    }
    // Paging through team=ci two at a time while more VMs are created between pages: every
    // VM that existed at the start is listed once, in creation order, and nothing twice.
    let mut request = pb::ListVmsRequest { labels: labels(&[("team", "ci")]), page_size: 2, ..Default::default() };
    let mut seen = Vec::new();
    for page in 0.. {
        let response = daemon.client.vms.list_vms(request.clone()).await.expect("list").into_inner();
        assert!(response.vms.len() <= 2);
        seen.extend(response.vms.iter().map(|vm| vm.name.clone()));
        daemon.client.vms.create_vm(create(format!("late-{page}"), "ci")).await.expect("create meanwhile");
        if response.next_page_token.is_empty() {
            break;
        }
        request.page_token = response.next_page_token;
    }
    let originals: Vec<_> = seen.iter().filter(|n| n.starts_with("vm-")).cloned().collect();
    assert_eq!(originals, ["vm-0", "vm-2", "vm-4", "vm-6"]);
    let mut unique = seen.clone();
    unique.dedup();
    assert_eq!(unique, seen, "a VM listed twice");
    let listed = daemon.client.vms.list_vms(pb::ListVmsRequest::default()).await.expect("list").into_inner();
    assert!(listed.vms.iter().all(|vm| vm.labels.contains_key("ci.example.com/job")), "labels come back");
    // Filters combine; states are selectable; bad filters and tokens are field violations.
    let web_created = pb::ListVmsRequest {
        labels: labels(&[("team", "web"), ("ci.example.com/job", "7")]),
        states: vec![pb::VmState::Created as i32],
        ..Default::default()
    };
    let vms = daemon.client.vms.list_vms(web_created).await.expect("list").into_inner().vms;
    assert_eq!(vms.iter().map(|vm| vm.name.as_str()).collect::<Vec<_>>(), ["vm-1", "vm-3", "vm-5"]);
    let running = pb::ListVmsRequest { states: vec![pb::VmState::Running as i32], ..Default::default() };
    assert!(daemon.client.vms.list_vms(running).await.expect("list").into_inner().vms.is_empty());
    for (bad, field) in [
        (pb::ListVmsRequest { page_token: "not-a-token".into(), ..Default::default() }, "page_token"),
        (pb::ListVmsRequest { page_size: 5000, ..Default::default() }, "page_size"),
        (pb::ListVmsRequest { labels: labels(&[("Bad Key", "x")]), ..Default::default() }, "labels"),
        (pb::ListVmsRequest { states: vec![42], ..Default::default() }, "states"),
    ] {
        let status = daemon.client.vms.list_vms(bad).await.expect_err(field);
        assert_eq!((status.code(), violated_fields(&status)), (Code::InvalidArgument, vec![field.to_owned()]));
    }
    let status = daemon.client.vms.create_vm(create("bad-label".into(), "has space")).await.expect_err("label");
    assert_eq!((status.code(), violated_fields(&status)), (Code::InvalidArgument, vec!["labels".to_owned()]));
    daemon.shutdown().await;
}

#[tokio::test]
async fn images_carry_labels_and_are_listed_by_them_in_pages() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut daemon = TestDaemon::start(config(dir.path(), FileConfig::default())).await;
    let (kernel_path, rootfs_path) = fake_image_sources(dir.path());
    for (name, os) in [("a", "debian"), ("b", "alpine"), ("c", "debian")] {
        let request = pb::ImportImageRequest {
            name: name.into(),
            kernel_path: kernel_path.clone(),
            rootfs_path: rootfs_path.clone(),
            labels: labels(&[("os", os)]),
            ..Default::default()
        };
        daemon.client.images.import_image(request).await.expect("import");
    }
    let request = pb::ListImagesRequest { labels: labels(&[("os", "debian")]), page_size: 1, ..Default::default() };
    let first = daemon.client.images.list_images(request.clone()).await.expect("list").into_inner();
    assert_eq!(first.images.iter().map(|i| i.name.as_str()).collect::<Vec<_>>(), ["a"]);
    let second = pb::ListImagesRequest { page_token: first.next_page_token, ..request };
    let second = daemon.client.images.list_images(second).await.expect("list").into_inner();
    assert_eq!(second.images.iter().map(|i| i.name.as_str()).collect::<Vec<_>>(), ["c"]);
    assert!(second.next_page_token.is_empty(), "the last page says so");
    assert_eq!(second.images[0].labels, labels(&[("os", "debian")]));
    daemon.shutdown().await;
}

/// Reads events from a watch until one says `name` was deleted; returns what came before.
async fn until_deleted(stream: &mut tonic::Streaming<pb::WatchVmsResponse>, name: &str) -> Vec<String> {
    let mut seen = Vec::new();
    loop {
        let event = next_events(stream, 1).await.remove(0);
        let described = describe(&event);
        if described == format!("{name} deleted") {
            return seen;
        }
        seen.push(described);
    }
}

#[tokio::test]
async fn vms_with_a_ttl_are_reaped_also_across_a_restart_and_touch_extends_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config(dir.path(), FileConfig::default());
    let clock = Clock::manual_from_now();
    let wiring = || Wiring { host: None, clock: clock.clone() };
    let mut daemon = TestDaemon::start_with(config.clone(), wiring()).await;
    import(&mut daemon.client, dir.path(), "img").await;
    let create = |name: &str, seconds: i64| pb::CreateVmRequest {
        name: name.into(),
        image: "img".into(),
        no_start: true,
        ttl: Some(prost_types::Duration { seconds, nanos: 0 }),
        ..Default::default()
    };
    let short = daemon.client.vms.create_vm(create("short", 2)).await.expect("create").into_inner().vm.expect("vm");
    let expire = short.expire_time.expect("expire_time");
    let created = short.create_time.expect("create_time");
    assert_eq!(expire.seconds - created.seconds, 2, "expire_time = create_time + ttl");
    daemon.client.vms.create_vm(create("touched", 2)).await.expect("create");
    daemon.client.vms.create_vm(create("across-restart", 3)).await.expect("create");
    for (ttl, nanos) in [(0, 0), (0, 500_000_000), (400 * 24 * 3600, 0)] {
        let mut bad = create("bad-ttl", ttl);
        bad.ttl = Some(prost_types::Duration { seconds: ttl, nanos });
        let status = daemon.client.vms.create_vm(bad).await.expect_err("ttl out of range");
        assert_eq!((status.code(), violated_fields(&status)), (Code::InvalidArgument, vec!["ttl".to_owned()]));
    }
    let touch = pb::TouchVmRequest { vm: "touched".into(), ttl: Some(prost_types::Duration { seconds: 60, nanos: 0 }) };
    let touched = daemon.client.vms.touch_vm(touch).await.expect("touch").into_inner().vm.expect("vm");
    assert!(touched.expire_time.expect("expiry").seconds >= expire.seconds + 50, "pushed out");

    // Past "short"'s time: the reaper, woken by the clock, deletes it and nothing else.
    let revision = daemon.client.vms.list_vms(pb::ListVmsRequest::default()).await.expect("list").into_inner().revision;
    let watch = pb::WatchVmsRequest { from_revision: revision, ..Default::default() };
    let mut events = daemon.client.vms.watch_vms(watch.clone()).await.expect("watch").into_inner();
    clock.advance(Duration::from_millis(2500));
    let before = until_deleted(&mut events, "short").await;
    assert!(before.iter().all(|event| event.starts_with("short")), "only short went: {before:?}");
    daemon.shutdown().await;

    // Down for longer than "across-restart" had to live: the next daemon reaps it at once.
    clock.advance(Duration::from_secs(1));
    let mut daemon = TestDaemon::start_with(config, wiring()).await;
    let mut events = daemon.client.vms.watch_vms(watch).await.expect("watch").into_inner();
    until_deleted(&mut events, "across-restart").await;
    let vms = daemon.client.vms.list_vms(pb::ListVmsRequest::default()).await.expect("list").into_inner().vms;
    assert_eq!(vms.iter().map(|vm| vm.name.as_str()).collect::<Vec<_>>(), ["touched"], "the touched one is kept");
    let clear = pb::TouchVmRequest { vm: "touched".into(), ttl: None };
    let cleared = daemon.client.vms.touch_vm(clear).await.expect("touch").into_inner().vm.expect("vm");
    assert!(cleared.expire_time.is_none(), "no ttl: lives until deleted");
    clock.advance(Duration::from_secs(3600));
    let vms = daemon.client.vms.list_vms(pb::ListVmsRequest::default()).await.expect("list").into_inner().vms;
    assert_eq!(vms.len(), 1, "without a ttl it stays");
    daemon.shutdown().await;
}

/// Request ids and events are kept for 24 hours of the daemon's clock, then forgotten.
#[tokio::test]
async fn request_ids_and_events_are_forgotten_after_a_day() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Clock::manual_from_now();
    let mut daemon =
        TestDaemon::start_with(config(dir.path(), FileConfig::default()), Wiring { host: None, clock: clock.clone() })
            .await;
    import(&mut daemon.client, dir.path(), "img").await;
    let create = |name: &str| pb::CreateVmRequest {
        name: name.into(),
        image: "img".into(),
        no_start: true,
        request_id: "job-1".into(),
        ..Default::default()
    };
    daemon.client.vms.create_vm(create("first")).await.expect("create");
    let status = daemon.client.vms.create_vm(create("second")).await.expect_err("the id is taken");
    assert_eq!(reason(&status), "REQUEST_ID_REUSED");
    let first_revision = 1;
    daemon
        .client
        .vms
        .watch_vms(pb::WatchVmsRequest { from_revision: first_revision, ..Default::default() })
        .await
        .expect("the first events are still kept");

    clock.advance(Duration::from_secs(25 * 3600));
    // The pruner wakes with the clock; once it ran, the id is free and the events gone.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let second = loop {
        match daemon.client.vms.create_vm(create("second")).await {
            Ok(created) => break created,
            // Still remembered, or being forgotten right now (which says: retry).
            Err(status)
                if ["REQUEST_ID_REUSED", "REQUEST_ID_EXPIRING"].contains(&reason(&status).as_str())
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::task::yield_now().await;
            }
            Err(status) => panic!("the request id was not forgotten: {status:?}"),
        }
    };
    assert_eq!(second.into_inner().vm.expect("vm").name, "second");
    let status = daemon
        .client
        .vms
        .watch_vms(pb::WatchVmsRequest { from_revision: first_revision, ..Default::default() })
        .await
        .expect_err("forgotten");
    assert_eq!(reason(&status), "REVISION_FORGOTTEN");
    daemon.shutdown().await;
}

#[tokio::test]
async fn wait_returns_once_the_state_is_reached_and_honours_the_deadline_and_delete_may_allow_missing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut daemon = TestDaemon::start(config(dir.path(), FileConfig::default())).await;
    import(&mut daemon.client, dir.path(), "img").await;
    let request =
        pb::CreateVmRequest { name: "idle".into(), image: "img".into(), no_start: true, ..Default::default() };
    daemon.client.vms.create_vm(request).await.expect("create");
    let wait = |state: pb::VmState| pb::WaitVmRequest { vm: "idle".into(), state: state as i32 };
    let vm = daemon.client.vms.wait_vm(wait(pb::VmState::Created)).await.expect("wait").into_inner().vm;
    assert_eq!(vm.expect("vm").state(), pb::VmState::Created);
    let mut request = tonic::Request::new(wait(pb::VmState::Running));
    request.set_timeout(std::time::Duration::from_millis(300));
    let status = daemon.client.vms.wait_vm(request).await.expect_err("never runs");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    // A VM deleted while waited for (or just before the wait began: the answer is the same)
    // is not found.
    let mut waiter = daemon.client.clone();
    let waiting = tokio::spawn(async move { waiter.vms.wait_vm(wait(pb::VmState::Running)).await });
    let delete = pb::DeleteVmRequest { vm: "idle".into(), ..Default::default() };
    daemon.client.vms.delete_vm(delete.clone()).await.expect("delete");
    let status = waiting.await.expect("task").expect_err("deleted");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    let status = daemon.client.vms.wait_vm(pb::WaitVmRequest { vm: "idle".into(), state: 0 }).await.expect_err("state");
    assert_eq!(status.code(), Code::InvalidArgument);
    // Deleting what is gone: NOT_FOUND, unless allowed.
    let status = daemon.client.vms.delete_vm(delete.clone()).await.expect_err("gone");
    assert_eq!(status.code(), Code::NotFound);
    let allowed = pb::DeleteVmRequest { allow_missing: true, ..delete };
    assert_eq!(daemon.client.vms.delete_vm(allowed).await.expect("allowed").into_inner().id, "");
    daemon.shutdown().await;
}

/// Reads `count` events from a watch stream (each within 5 s).
async fn next_events(stream: &mut tonic::Streaming<pb::WatchVmsResponse>, count: usize) -> Vec<pb::VmEvent> {
    let mut events = Vec::new();
    while events.len() < count {
        let message = tokio::time::timeout(std::time::Duration::from_secs(5), stream.message())
            .await
            .expect("an event within 5 s")
            .expect("stream ok")
            .expect("stream open");
        events.push(message.event.expect("event"));
    }
    events
}

fn describe(event: &pb::VmEvent) -> String {
    use pb::vm_event::Kind;
    match event.kind.as_ref().expect("kind") {
        Kind::StateChange(change) => format!("{} {:?}", event.vm_name, change.state()),
        Kind::StageCompleted(stage) => format!("{} {}.{}", event.vm_name, stage.operation, stage.stage),
        Kind::Deleted(_) => format!("{} deleted", event.vm_name),
    }
}

/// The list-then-watch contract on a daemon that has recorded no event yet: a VM created
/// between the list and the watch is seen by a watch from the list's revision.
#[tokio::test]
async fn a_watch_from_a_fresh_daemons_list_sees_a_vm_created_before_the_watch_began() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut daemon = TestDaemon::start(config(dir.path(), FileConfig::default())).await;
    import(&mut daemon.client, dir.path(), "img").await;
    let listed = daemon.client.vms.list_vms(pb::ListVmsRequest::default()).await.expect("list").into_inner();
    assert!(listed.vms.is_empty());
    assert_ne!(listed.revision, 0, "0 means 'from now on' to WatchVms, so a list never returns it");
    let create =
        pb::CreateVmRequest { name: "raced".into(), image: "img".into(), no_start: true, ..Default::default() };
    daemon.client.vms.create_vm(create).await.expect("create");
    let watch = pb::WatchVmsRequest { from_revision: listed.revision, ..Default::default() };
    let mut watched = daemon.client.vms.watch_vms(watch).await.expect("watch").into_inner();
    let seen: Vec<String> = next_events(&mut watched, 4).await.iter().map(describe).collect();
    assert_eq!(
        seen,
        [
            "raced vm.create.resolve_image",
            "raced Created",
            "raced vm.create.insert_record",
            "raced vm.create.prepare_vm_dir"
        ]
    );
    // And 0 still means "from now on": nothing of the past is replayed.
    let now = pb::WatchVmsRequest { from_revision: 0, ..Default::default() };
    let mut from_now = daemon.client.vms.watch_vms(now).await.expect("watch").into_inner();
    assert!(tokio::time::timeout(std::time::Duration::from_millis(300), from_now.message()).await.is_err());
    daemon.shutdown().await;
}

#[tokio::test]
async fn a_watcher_that_disconnects_and_resumes_from_its_last_revision_sees_every_event_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config(dir.path(), FileConfig::default());
    let ops = banger_server::open_ops(&config).await.expect("ops");
    let events = ops.event_log();
    drop(ops);
    let mut daemon = TestDaemon::start(config).await;
    import(&mut daemon.client, dir.path(), "img").await;
    let create = |name: &str, team: &str| pb::CreateVmRequest {
        name: name.into(),
        image: "img".into(),
        no_start: true,
        labels: labels(&[("team", team)]),
        ..Default::default()
    };
    let delete = |name: &str| pb::DeleteVmRequest { vm: name.into(), ..Default::default() };
    let listed = daemon.client.vms.list_vms(pb::ListVmsRequest::default()).await.expect("list").into_inner();
    let watch = |from: u64| pb::WatchVmsRequest { from_revision: from, ..Default::default() };
    let mut everything = daemon.client.vms.watch_vms(watch(listed.revision)).await.expect("watch").into_inner();
    let mut first = daemon.client.vms.watch_vms(watch(listed.revision)).await.expect("watch").into_inner();
    let mut only_c = daemon
        .client
        .vms
        .watch_vms(pb::WatchVmsRequest { from_revision: listed.revision, vm: "vm-c".into(), ..Default::default() })
        .await
        .expect("watch")
        .into_inner();
    let mut team_web = daemon
        .client
        .vms
        .watch_vms(pb::WatchVmsRequest { labels: labels(&[("team", "web")]), ..Default::default() })
        .await
        .expect("watch")
        .into_inner();

    daemon.client.vms.create_vm(create("vm-a", "ci")).await.expect("create");
    daemon.client.vms.create_vm(create("vm-b", "web")).await.expect("create");
    let seen_before = next_events(&mut first, 1).await;
    drop(first); // the watcher goes away after one event...
    daemon.client.vms.create_vm(create("vm-c", "ci")).await.expect("create");
    daemon.client.vms.delete_vm(delete("vm-a")).await.expect("delete");
    daemon.client.vms.delete_vm(delete("vm-b")).await.expect("delete");
    // ...and comes back from the last revision it saw.
    let resume = seen_before.last().expect("one").revision;
    let mut resumed = daemon.client.vms.watch_vms(watch(resume)).await.expect("resume").into_inner();

    let mut all = Vec::new();
    while all.last().is_none_or(|e: &pb::VmEvent| describe(e) != "vm-b vm.delete.delete_record") {
        all.extend(next_events(&mut everything, 1).await);
    }
    let states: Vec<_> = all.iter().map(describe).filter(|d| !d.contains("vm.")).collect();
    assert_eq!(states, ["vm-a Created", "vm-b Created", "vm-c Created", "vm-a deleted", "vm-b deleted"]);
    // Stage events come with their timings, between the state changes they lead to.
    let stages: Vec<_> = all.iter().map(describe).filter(|d| d.starts_with("vm-c vm.create")).collect();
    assert_eq!(
        stages,
        ["vm-c vm.create.resolve_image", "vm-c vm.create.insert_record", "vm-c vm.create.prepare_vm_dir"]
    );
    let revisions: Vec<_> = all.iter().map(|e| e.revision).collect();
    assert!(revisions.windows(2).all(|w| w[1] == w[0] + 1), "revisions grow by one: {revisions:?}");
    assert_eq!(revisions[0], listed.revision + 1, "the first event after the list");
    let mut stitched = seen_before;
    stitched.extend(next_events(&mut resumed, all.len() - 1).await);
    assert_eq!(stitched, all, "every event exactly once across the reconnect");
    // Nothing more arrives on the resumed stream.
    assert!(tokio::time::timeout(std::time::Duration::from_millis(300), resumed.message()).await.is_err());

    let c: Vec<_> = next_events(&mut only_c, 4).await.iter().map(describe).collect();
    assert_eq!(c.iter().filter(|d| d.starts_with("vm-c")).count(), 4, "{c:?}");
    let web = all.iter().filter(|e| e.vm_name == "vm-b").count();
    let web: Vec<_> = next_events(&mut team_web, web).await.iter().map(describe).collect();
    assert!(web.iter().all(|d| d.starts_with("vm-b")), "{web:?}");

    // Revisions that cannot be resumed from say so.
    let latest = all.last().expect("events").revision;
    let status = daemon.client.vms.watch_vms(watch(latest + 100)).await.expect_err("ahead");
    assert_eq!(status.code(), Code::OutOfRange);
    events.prune(i64::MAX).await.expect("forget every event");
    let status = daemon.client.vms.watch_vms(watch(1)).await.expect_err("too old");
    assert_eq!(status.code(), Code::OutOfRange);
    assert_eq!(reason(&status), "REVISION_FORGOTTEN");
    daemon.client.vms.watch_vms(watch(latest)).await.expect("the latest is still resumable");
    daemon.shutdown().await;
}

/// Runs `argv` in `vm` with `stdin`; returns standard output, standard error and the exit code.
async fn exec(client: &mut Client, vm: &str, argv: &[&str], stdin: &[u8]) -> (Vec<u8>, Vec<u8>, Option<i32>) {
    use pb::{exec_exit::Status as Exit, exec_vm_response::Payload};
    let start = pb::ExecVmStart {
        vm: vm.into(),
        argv: argv.iter().map(|a| a.to_string()).collect(),
        stdin: !stdin.is_empty(),
        ..Default::default()
    };
    let mut output = client.exec(start, tokio_stream::iter(vec![stdin.to_vec()])).await.expect("exec");
    let (mut out, mut err, mut code) = (Vec::new(), Vec::new(), None);
    while let Some(message) = output.message().await.expect("output") {
        match message.payload {
            Some(Payload::Stdout(data)) => out.extend(data),
            Some(Payload::Stderr(data)) => err.extend(data),
            Some(Payload::Exit(exit)) => {
                code = exit.status.and_then(|s| if let Exit::Code(c) = s { Some(c) } else { None })
            }
            None => {}
        }
    }
    (out, err, code)
}

/// A VM's whole path through the API, over the stateful fake host: created and booted,
/// used (exec with input, output and exit codes; files in and out), stopped, deleted, with
/// nothing left on the host.
#[tokio::test]
async fn over_the_fake_host_a_vm_is_created_used_and_deleted_through_the_api() {
    let dir = tempfile::tempdir().expect("tempdir");
    let host = FakeHost::default();
    let mut daemon = TestDaemon::start_fake(config(dir.path(), FileConfig::default()), &host, &Clock::system()).await;
    import(&mut daemon.client, dir.path(), "img").await;
    let request = pb::CreateVmRequest { name: "web".into(), image: "img".into(), ..Default::default() };
    let created = daemon.client.vms.create_vm(request).await.expect("create");
    assert!(banger_client::response_op_id(&created).is_some(), "the op id comes back");
    let vm = created.into_inner().vm.expect("vm");
    assert_eq!(vm.state(), pb::VmState::Running);
    assert_eq!(host.processes().len(), 2, "a vmm and a vsock backend: {:?}", host.processes());

    let (out, err, code) = exec(&mut daemon.client, "web", &["echo", "hello", "there"], b"").await;
    assert_eq!((out.as_slice(), err.as_slice(), code), (&b"hello there\n"[..], &b""[..], Some(0)));
    let (out, _, code) = exec(&mut daemon.client, "web", &["cat"], b"fed through stdin").await;
    assert_eq!((out.as_slice(), code), (&b"fed through stdin"[..], Some(0)));
    let (_, err, code) = exec(&mut daemon.client, "web", &["no-such-program"], b"").await;
    assert_eq!(code, Some(127));
    assert!(!err.is_empty());

    use pb::{copy_from_vm_response::Payload as From, copy_to_vm_request::Payload as To};
    let start = pb::CopyToVmStart { vm: "web".into(), path: "/root/report".into(), mode: 0o640, archive: false };
    let sent = tokio_stream::iter(vec![
        pb::CopyToVmRequest { payload: Some(To::Start(start)) },
        pb::CopyToVmRequest { payload: Some(To::Data(b"line one\n".to_vec())) },
        pb::CopyToVmRequest { payload: Some(To::Data(b"line two\n".to_vec())) },
    ]);
    let copied = daemon.client.vms.copy_to_vm(sent).await.expect("copy in").into_inner();
    assert_eq!(copied.size, 18);
    let request = pb::CopyFromVmRequest { vm: "web".into(), path: "/root/report".into(), archive: false };
    let mut back = daemon.client.vms.copy_from_vm(request).await.expect("copy out").into_inner();
    let (mut info, mut content) = (None, Vec::new());
    while let Some(message) = back.message().await.expect("chunk") {
        match message.payload {
            Some(From::Info(i)) => info = Some((i.mode, i.size)),
            Some(From::Data(data)) => content.extend(data),
            None => {}
        }
    }
    assert_eq!((info, content.as_slice()), (Some((0o640, 18)), &b"line one\nline two\n"[..]));
    let missing = pb::CopyFromVmRequest { vm: "web".into(), path: "/nope".into(), archive: false };
    let status = match daemon.client.vms.copy_from_vm(missing).await {
        Err(status) => status,
        Ok(stream) => stream.into_inner().message().await.expect_err("missing file"),
    };
    assert_eq!(status.code(), Code::NotFound, "the guest's answer reaches the caller: {status:?}");

    // Paused: the state and its stages are watched, exec is refused, resume brings it back.
    let revision = daemon.client.vms.list_vms(pb::ListVmsRequest::default()).await.expect("list").into_inner().revision;
    let watch = pb::WatchVmsRequest { from_revision: revision, ..Default::default() };
    let mut watched = daemon.client.vms.watch_vms(watch).await.expect("watch").into_inner();
    let pause = pb::PauseVmRequest { vm: "web".into(), request_id: "pause-1".into() };
    let paused = daemon.client.vms.pause_vm(pause.clone()).await.expect("pause");
    assert!(banger_client::response_op_id(&paused).is_some(), "the op id comes back");
    assert_eq!(paused.into_inner().vm.expect("vm").state(), pb::VmState::Paused);
    let again = daemon.client.vms.pause_vm(pause).await.expect("a retry").into_inner();
    assert_eq!(again.vm.expect("vm").state(), pb::VmState::Paused);
    let status = daemon.client.exec(
        pb::ExecVmStart { vm: "web".into(), argv: vec!["true".into()], ..Default::default() },
        tokio_stream::empty(),
    );
    let status = status.await.expect_err("a paused vm runs nothing");
    assert_eq!((status.code(), reason(&status)), (Code::FailedPrecondition, "WRONG_STATE".into()));
    assert!(status.message().contains("paused"), "{status:?}");
    let resumed = daemon.client.vms.resume_vm(pb::ResumeVmRequest { vm: "web".into(), ..Default::default() }).await;
    assert_eq!(resumed.expect("resume").into_inner().vm.expect("vm").state(), pb::VmState::Running);
    let seen: Vec<String> = next_events(&mut watched, 9).await.iter().map(describe).collect();
    assert_eq!(
        seen,
        [
            "web vm.pause.mark_pausing",
            "web vm.pause.quiesce_agent",
            "web vm.pause.pause_vcpus",
            "web Paused",
            "web vm.pause.mark_paused",
            "web vm.resume.mark_resuming",
            "web vm.resume.resume_vcpus",
            "web Running",
            "web vm.resume.mark_running",
        ]
    );
    let (out, _, code) = exec(&mut daemon.client, "web", &["echo", "thawed"], b"").await;
    assert_eq!((out.as_slice(), code), (&b"thawed\n"[..], Some(0)));

    let stopped = daemon.client.vms.stop_vm(pb::StopVmRequest { vm: "web".into(), ..Default::default() }).await;
    assert_eq!(stopped.expect("stop").into_inner().vm.expect("vm").state(), pb::VmState::Stopped);
    assert!(host.processes().is_empty(), "{:?}", host.processes());
    let status = daemon.client.exec(
        pb::ExecVmStart { vm: "web".into(), argv: vec!["true".into()], ..Default::default() },
        tokio_stream::empty(),
    );
    let status = status.await.expect_err("a stopped vm runs nothing");
    assert_eq!((status.code(), reason(&status)), (Code::FailedPrecondition, "WRONG_STATE".into()));
    daemon.client.vms.delete_vm(pb::DeleteVmRequest { vm: "web".into(), ..Default::default() }).await.expect("delete");
    assert!(host.disks().is_empty() && host.cgroups().is_empty(), "nothing left: {:?}", host.disks());
    daemon.shutdown().await;
}

/// The tokens of the access tests: their names are their texts.
const ACCESS_CONFIG: &str = r#"
[[auth.tokens]]
name = "viewer"
sha256 = "$viewer"
role = "viewer"
[[auth.tokens]]
name = "operator"
sha256 = "$operator"
role = "operator"
[[auth.tokens]]
name = "admin"
sha256 = "$admin"
role = "admin"
[[auth.tokens]]
name = "team-a"
sha256 = "$team-a"
role = "operator"
tenant = "team=a"
[[auth.tokens]]
name = "team-b"
sha256 = "$team-b"
role = "operator"
tenant = "team=b"
[[auth.tokens]]
name = "short-lived"
sha256 = "$short-lived"
role = "admin"
expires = "$expires"
"#;

fn access_config(dir: &Path, expires: &str) -> Config {
    let mut text = ACCESS_CONFIG.replace("$expires", expires);
    for name in ["viewer", "operator", "admin", "team-a", "team-b", "short-lived"] {
        let digest = banger_server::domain::access::token_sha256(name);
        text = text.replace(&format!("${name}\""), &format!("{}\"", hex_digest(&digest)));
    }
    config(dir, toml::from_str(&text).expect("access config parses"))
}

fn hex_digest(digest: &[u8; 32]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

async fn as_token(config: &Config, token: &str) -> Client {
    let credentials = banger_client::Credentials { token: Some(token.into()), ..Default::default() };
    Client::connect_with(&Target::Unix(config.socket.clone()), &credentials).await.expect("connect")
}

fn create(name: &str, labels: &[(&str, &str)]) -> pb::CreateVmRequest {
    pb::CreateVmRequest {
        name: name.into(),
        image: "img".into(),
        labels: labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
        ..Default::default()
    }
}

fn names(list: pb::ListVmsResponse) -> Vec<String> {
    let mut names: Vec<String> = list.vms.into_iter().map(|vm| vm.name).collect();
    names.sort();
    names
}

/// Roles over the unix socket, with tokens (root, without one, is admin): a viewer reads
/// but changes nothing, an operator runs VMs but reads no host file, an admin does; expired
/// and unknown tokens are refused before anything runs.
#[tokio::test]
async fn each_role_may_do_what_it_is_granted_and_nothing_more() {
    let dir = tempfile::tempdir().expect("tempdir");
    let host = FakeHost::default();
    let clock = Clock::manual_from_now();
    let expires = humantime_rfc3339(clock.now_ms() + 3_600_000);
    let config = access_config(dir.path(), &expires);
    let mut daemon = TestDaemon::start_fake(config.clone(), &host, &clock).await;
    import(&mut daemon.client, dir.path(), "img").await;
    let (kernel_path, rootfs_path) = fake_image_sources(dir.path());
    let host_import = |name: &str| pb::ImportImageRequest {
        name: name.into(),
        kernel_path: kernel_path.clone(),
        rootfs_path: rootfs_path.clone(),
        ..Default::default()
    };

    let mut viewer = as_token(&config, "viewer").await;
    assert!(viewer.vms.list_vms(pb::ListVmsRequest::default()).await.is_ok());
    assert!(viewer.vms.watch_vms(pb::WatchVmsRequest::default()).await.is_ok());
    assert!(viewer.host.get_host(pb::GetHostRequest::default()).await.is_ok());
    let denied = viewer.vms.create_vm(create("v", &[])).await.expect_err("a viewer creates nothing");
    assert_eq!((denied.code(), reason(&denied)), (Code::PermissionDenied, "PERMISSION_DENIED".into()));
    let (_, facts) = error_reason(&denied).expect("error info");
    assert_eq!(
        (facts["caller"].as_str(), facts["role"].as_str(), facts["needed"].as_str()),
        ("token:viewer", "viewer", "operator")
    );

    let mut operator = as_token(&config, "operator").await;
    operator.vms.create_vm(create("web", &[])).await.expect("an operator creates");
    let denied = viewer
        .exec(
            pb::ExecVmStart { vm: "web".into(), argv: vec!["true".into()], ..Default::default() },
            tokio_stream::empty(),
        )
        .await
        .expect_err("a viewer execs nothing");
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    let (out, _, code) = exec(&mut operator, "web", &["echo", "ran"], b"").await;
    assert_eq!((out.as_slice(), code), (&b"ran\n"[..], Some(0)));
    let denied = operator.images.import_image(host_import("from-host")).await.expect_err("host files are admin's");
    assert_eq!(denied.code(), Code::PermissionDenied);
    let denied = operator.images.delete_image(pb::DeleteImageRequest { image: "img".into() }).await;
    assert_eq!(denied.expect_err("admin's").code(), Code::PermissionDenied);
    let archive = pb::pull_image_request::Source::Archive("/etc/passwd".into());
    let pull = pb::PullImageRequest { name: "from-host".into(), source: Some(archive), ..Default::default() };
    let denied = operator.images.pull_image(pull).await.expect_err("a host path is admin's, pulled or imported");
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    let mut admin = as_token(&config, "admin").await;
    admin.images.import_image(host_import("from-host")).await.expect("an admin imports from the host");

    let mut short = as_token(&config, "short-lived").await;
    assert!(short.vms.list_vms(pb::ListVmsRequest::default()).await.is_ok());
    clock.advance(Duration::from_secs(3_601));
    let expired = short.vms.list_vms(pb::ListVmsRequest::default()).await.expect_err("expired");
    assert_eq!((expired.code(), reason(&expired)), (Code::Unauthenticated, "TOKEN_EXPIRED".into()));
    let mut unknown = as_token(&config, "guessed").await;
    let refused = unknown.vms.create_vm(create("sneaky", &[])).await.expect_err("unknown");
    assert_eq!((refused.code(), reason(&refused)), (Code::Unauthenticated, "UNAUTHENTICATED".into()));
    let listed = daemon.client.vms.list_vms(pb::ListVmsRequest::default()).await.expect("list");
    assert_eq!(names(listed.into_inner()), ["web"], "refused calls made nothing");
    daemon.shutdown().await;
}

/// RFC 3339 for a time in ms since the epoch.
fn humantime_rfc3339(ms: i64) -> String {
    let at = std::time::UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).expect("after 1970"));
    format!("{}", humantime::format_rfc3339_seconds(at))
}

/// Two tenants on one host: each sees, watches and touches only its own VMs (another's is
/// not found, as if it did not exist), and its creates carry its labels whatever they ask.
#[tokio::test]
async fn tenants_see_and_touch_only_their_own_vms() {
    let dir = tempfile::tempdir().expect("tempdir");
    let host = FakeHost::default();
    let config = access_config(dir.path(), "2100-01-01T00:00:00Z");
    let mut daemon = TestDaemon::start_fake(config.clone(), &host, &Clock::system()).await;
    import(&mut daemon.client, dir.path(), "img").await;
    let (mut a, mut b) = (as_token(&config, "team-a").await, as_token(&config, "team-b").await);
    let revision = a.vms.list_vms(pb::ListVmsRequest::default()).await.expect("list").into_inner().revision;
    let watch = pb::WatchVmsRequest { from_revision: revision, ..Default::default() };
    let mut a_watch = a.vms.watch_vms(watch.clone()).await.expect("watch").into_inner();

    let made = a.vms.create_vm(create("a1", &[("team", "b"), ("job", "7")])).await.expect("create").into_inner();
    let labels = made.vm.expect("vm").labels;
    assert_eq!((labels["team"].as_str(), labels["job"].as_str()), ("a", "7"), "the tenant's label wins");
    b.vms.create_vm(create("b1", &[])).await.expect("create");
    daemon.client.vms.create_vm(create("untenanted", &[])).await.expect("create");

    let list = |labels: &[(&str, &str)]| pb::ListVmsRequest {
        labels: labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
        ..Default::default()
    };
    assert_eq!(names(a.vms.list_vms(list(&[])).await.expect("list").into_inner()), ["a1"]);
    assert_eq!(names(b.vms.list_vms(list(&[])).await.expect("list").into_inner()), ["b1"]);
    assert!(names(a.vms.list_vms(list(&[("team", "b")])).await.expect("list").into_inner()).is_empty());
    assert_eq!(
        names(daemon.client.vms.list_vms(list(&[])).await.expect("list").into_inner()),
        ["a1", "b1", "untenanted"]
    );

    for other in ["b1", "untenanted"] {
        let missing = a.vms.get_vm(pb::GetVmRequest { vm: other.into() }).await.expect_err("another's");
        assert_eq!((missing.code(), reason(&missing)), (Code::NotFound, "VM_NOT_FOUND".into()), "{other}");
        let start = pb::ExecVmStart { vm: other.into(), argv: vec!["true".into()], ..Default::default() };
        let missing = a.exec(start, tokio_stream::empty()).await.expect_err("another's");
        assert_eq!(missing.code(), Code::NotFound, "{other}: {missing:?}");
        let delete = pb::DeleteVmRequest { vm: other.into(), ..Default::default() };
        assert_eq!(a.vms.delete_vm(delete).await.expect_err("another's").code(), Code::NotFound);
        let stop = pb::StopVmRequest { vm: other.into(), ..Default::default() };
        assert_eq!(a.vms.stop_vm(stop).await.expect_err("another's").code(), Code::NotFound);
    }
    // Snapshots too: another tenant's is not found, not restored, not deleted.
    let take = pb::SnapshotVmRequest { vm: "b1".into(), name: "b-snap".into(), ..Default::default() };
    let status = a.snapshots.snapshot_vm(take.clone()).await.expect_err("another's vm");
    assert_eq!((status.code(), reason(&status)), (Code::NotFound, "VM_NOT_FOUND".into()));
    let taken = b.snapshots.snapshot_vm(take).await.expect("its own").into_inner().snapshot.expect("snapshot");
    assert_eq!(taken.labels["team"], "b", "a tenant's snapshots carry its labels");
    let get = pb::GetSnapshotRequest { snapshot: "b-snap".into() };
    let status = a.snapshots.get_snapshot(get).await.expect_err("another's");
    assert_eq!((status.code(), reason(&status)), (Code::NotFound, "SNAPSHOT_NOT_FOUND".into()));
    let listed = a.snapshots.list_snapshots(pb::ListSnapshotsRequest::default()).await.expect("list");
    assert!(listed.into_inner().snapshots.is_empty());
    let mut restore = create("a-clone", &[]);
    restore.image = String::new();
    restore.snapshot = "b-snap".into();
    let status = a.vms.create_vm(restore).await.expect_err("another's snapshot");
    assert_eq!((status.code(), reason(&status)), (Code::NotFound, "SNAPSHOT_NOT_FOUND".into()));
    let delete = pb::DeleteSnapshotRequest { snapshot: "b-snap".into() };
    assert_eq!(a.snapshots.delete_snapshot(delete).await.expect_err("another's").code(), Code::NotFound);

    let by_id = a.vms.get_vm(pb::GetVmRequest { vm: "a1".into() }).await.expect("its own").into_inner();
    assert_eq!(by_id.vm.expect("vm").name, "a1");

    // Its watch saw only its VM's events, up to its delete.
    a.vms.delete_vm(pb::DeleteVmRequest { vm: "a1".into(), ..Default::default() }).await.expect("delete");
    let seen = until_deleted(&mut a_watch, "a1").await;
    assert!(!seen.is_empty() && seen.iter().all(|event| event.starts_with("a1 ")), "{seen:?}");
    assert_eq!(host.processes().len(), 4, "b1 and untenanted still run: {:?}", host.processes());
    daemon.shutdown().await;
}

/// Host paths an import must never read: kernel files, devices, FIFOs, links to secrets.
/// Each is INVALID_ARGUMENT naming its field, and nothing is copied.
#[tokio::test]
async fn imports_refuse_pseudo_files_devices_fifos_and_links_and_copy_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut daemon = TestDaemon::start(config(dir.path(), FileConfig::default())).await;
    let (kernel_path, rootfs_path) = fake_image_sources(dir.path());
    let shadow = dir.path().join("shadow-link");
    std::os::unix::fs::symlink("/etc/shadow", &shadow).expect("symlink");
    let fifo = dir.path().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
    let request = |kernel: &str, initrd: &str, rootfs: &str| pb::ImportImageRequest {
        name: "hostile".into(),
        kernel_path: kernel.into(),
        initrd_path: initrd.into(),
        rootfs_path: rootfs.into(),
        ..Default::default()
    };
    // This process's own (the daemon runs in it here): readable, and still refused.
    let own_environ = format!("/proc/{}/environ", std::process::id());
    let cases = [
        // Refused as pseudo-file where the daemon may open it, else as unreadable: never copied.
        (request(&kernel_path, "/proc/1/environ", &rootfs_path), "initrd_path", "/proc/1/environ"),
        (request(&kernel_path, &own_environ, &rootfs_path), "initrd_path", "is on proc, which holds no image"),
        (request(&kernel_path, "", "/dev/zero"), "rootfs_path", "not a regular file"),
        (request(&shadow.display().to_string(), "", &rootfs_path), "kernel_path", "symbolic link"),
        (request(&kernel_path, &fifo.display().to_string(), &rootfs_path), "initrd_path", "not a regular file"),
    ];
    for (request, field, why) in cases {
        let status = daemon.client.images.import_image(request.clone()).await.expect_err("refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{request:?}: {status:?}");
        let violations = field_violations(&status);
        assert!(violations.iter().any(|(f, d)| f == field && d.contains(why)), "{request:?}: {violations:?}");
    }
    let images = dir.path().join("state/images");
    let copied: Vec<_> =
        std::fs::read_dir(&images).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default();
    assert!(copied.is_empty(), "nothing copied: {copied:?}");
    daemon.shutdown().await;
}

/// `auth.import_roots`: host files are read only beneath them, never through a link out.
#[tokio::test]
async fn with_import_roots_only_files_beneath_them_are_imported() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("imports");
    std::fs::create_dir(&root).expect("mkdir");
    let file: FileConfig = toml::from_str(&format!("[auth]\nimport_roots = [\"{}\"]", root.display())).expect("parses");
    let mut daemon = TestDaemon::start(config(dir.path(), file)).await;
    let (kernel_path, rootfs_path) = fake_image_sources(dir.path());
    let outside = pb::ImportImageRequest {
        name: "out".into(),
        kernel_path: kernel_path.clone(),
        rootfs_path: rootfs_path.clone(),
        ..Default::default()
    };
    let status = daemon.client.images.import_image(outside).await.expect_err("outside the roots");
    assert!(field_violations(&status).iter().all(|(_, d)| d.contains("not under an import root")), "{status:?}");
    std::fs::copy(&kernel_path, root.join("vmlinuz")).expect("copy");
    std::fs::copy(&rootfs_path, root.join("rootfs.ext4")).expect("copy");
    let inside = pb::ImportImageRequest {
        name: "in".into(),
        kernel_path: root.join("vmlinuz").display().to_string(),
        rootfs_path: root.join("rootfs.ext4").display().to_string(),
        ..Default::default()
    };
    daemon.client.images.import_image(inside).await.expect("beneath a root");
    daemon.shutdown().await;
}

#[tokio::test]
async fn twenty_concurrent_creates_never_share_a_pool_member_and_the_pool_refills() {
    let dir = tempfile::tempdir().expect("tempdir");
    let host = FakeHost::default();
    let mut daemon = TestDaemon::start_fake(config(dir.path(), FileConfig::default()), &host, &Clock::system()).await;
    import(&mut daemon.client, dir.path(), "img").await;
    let request = pb::CreatePoolRequest { name: "warm".into(), size: 2, image: "img".into(), ..Default::default() };
    let created = daemon.client.pools.create_pool(request.clone()).await.expect("create pool").into_inner();
    assert_eq!(created.pool.expect("pool").size, 2);
    let status = daemon.client.pools.create_pool(request).await.expect_err("the same name again");
    assert_eq!((status.code(), reason(&status)), (Code::AlreadyExists, "POOL_NAME_TAKEN".into()));
    let bad = pb::CreatePoolRequest { name: "Bad Name".into(), size: 0, memory_mib: Some(1), ..Default::default() };
    let status = daemon.client.pools.create_pool(bad).await.expect_err("invalid");
    assert_eq!(violated_fields(&status), ["name", "size", "memory_mib"]);
    let labelled = pb::CreateVmRequest {
        name: "sneaky".into(),
        labels: [("banger.pool".to_owned(), "warm".to_owned())].into(),
        ..Default::default()
    };
    let status = daemon.client.vms.create_vm(labelled).await.expect_err("reserved label");
    assert_eq!(violated_fields(&status), ["labels"]);

    let ready = |pool: pb::Pool| pool.members.iter().filter(|m| m.state() == pb::VmState::Running).count();
    let mut client = daemon.client.clone();
    let mut members = Vec::new();
    for _ in 0..100 {
        let pool = client.pools.get_pool(pb::GetPoolRequest { pool: "warm".into() }).await.expect("get").into_inner();
        let pool = pool.pool.expect("pool");
        if ready(pool.clone()) == 2 {
            members = pool.members.iter().map(|m| m.vm_id.clone()).collect();
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(members.len(), 2, "the pool filled");

    let creates = (0..20).map(|i| {
        let mut client = daemon.client.clone();
        tokio::spawn(async move {
            let request = pb::CreateVmRequest {
                name: format!("job-{i}"),
                image: "img".into(),
                request_id: format!("job-{i}"),
                ..Default::default()
            };
            client.vms.create_vm(request).await.expect("create").into_inner().vm.expect("vm")
        })
    });
    let vms = futures_join_all(creates).await;
    let ids: std::collections::BTreeSet<_> = vms.iter().map(|vm| vm.id.clone()).collect();
    assert_eq!(ids.len(), 20, "no two creates got the same vm");
    let claimed: Vec<_> = vms.iter().filter(|vm| members.contains(&vm.id)).collect();
    assert_eq!(claimed.len(), 2, "both ready members were claimed, each once");
    for vm in &claimed {
        assert_eq!(vm.labels.get("banger.pool"), None, "{vm:?}");
        let (out, _, _) = exec(&mut client, &vm.name, &["hostname"], b"").await;
        assert_eq!(String::from_utf8_lossy(&out).trim(), vm.name);
    }
    // A retry of a claimed create gets the same answer.
    let retry = pb::CreateVmRequest {
        name: claimed[0].name.clone(),
        image: "img".into(),
        request_id: claimed[0].name.clone(),
        ..Default::default()
    };
    let again = client.vms.create_vm(retry).await.expect("retry").into_inner().vm.expect("vm");
    assert_eq!(again.id, claimed[0].id);

    let mut refilled = false;
    for _ in 0..100 {
        let pool = client.pools.get_pool(pb::GetPoolRequest { pool: "warm".into() }).await.expect("get").into_inner();
        let pool = pool.pool.expect("pool");
        if ready(pool.clone()) == 2 && pool.members.iter().all(|m| !members.contains(&m.vm_id)) {
            refilled = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(refilled, "the pool refilled with new members");
    let listed = client.pools.list_pools(pb::ListPoolsRequest {}).await.expect("list").into_inner().pools;
    assert_eq!(listed.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["warm"]);
    client.pools.delete_pool(pb::DeletePoolRequest { pool: "warm".into() }).await.expect("delete pool");
    let status = client.pools.get_pool(pb::GetPoolRequest { pool: "warm".into() }).await.expect_err("gone");
    assert_eq!((status.code(), reason(&status)), (Code::NotFound, "POOL_NOT_FOUND".into()));
    let left = client.vms.list_vms(pb::ListVmsRequest::default()).await.expect("list").into_inner().vms;
    assert_eq!(
        left.len(),
        20,
        "only the claimed and booted vms stay: {:?}",
        left.iter().map(|v| &v.name).collect::<Vec<_>>()
    );
    daemon.shutdown().await;
}

#[tokio::test]
async fn snapshots_are_taken_listed_restored_and_deleted_with_the_right_codes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let host = FakeHost::default();
    let mut daemon = TestDaemon::start_fake(config(dir.path(), FileConfig::default()), &host, &Clock::system()).await;
    import(&mut daemon.client, dir.path(), "img").await;
    let create = pb::CreateVmRequest { name: "src".into(), image: "img".into(), ..Default::default() };
    daemon.client.vms.create_vm(create).await.expect("create");
    let mut snapshots = daemon.client.snapshots.clone();

    let bad = pb::SnapshotVmRequest { vm: " ".into(), name: "Bad Name".into(), after: 9, ..Default::default() };
    let status = snapshots.snapshot_vm(bad).await.expect_err("invalid");
    assert_eq!(violated_fields(&status), ["vm", "name", "after"]);
    let missing = pb::SnapshotVmRequest { vm: "nobody".into(), name: "s".into(), ..Default::default() };
    let status = snapshots.snapshot_vm(missing).await.expect_err("no such vm");
    assert_eq!((status.code(), reason(&status)), (Code::NotFound, "VM_NOT_FOUND".into()));

    let take = pb::SnapshotVmRequest {
        vm: "src".into(),
        name: "base".into(),
        request_id: "take-1".into(),
        labels: [("team".to_owned(), "a".to_owned())].into(),
        ..Default::default()
    };
    let taken = snapshots.snapshot_vm(take.clone()).await.expect("snapshot").into_inner();
    let snapshot = taken.snapshot.expect("snapshot");
    assert_eq!((snapshot.name.as_str(), snapshot.source_vm_name.as_str(), snapshot.dependents), ("base", "src", 1));
    let vm = taken.vm.expect("vm");
    assert_eq!((vm.state(), vm.snapshot_id.as_str()), (pb::VmState::Running, snapshot.id.as_str()));
    let again = snapshots.snapshot_vm(take).await.expect("retried").into_inner().snapshot.expect("snapshot");
    assert_eq!(again.id, snapshot.id, "a retry with the request id is the first call's answer");
    let taken_again = pb::SnapshotVmRequest { vm: "src".into(), name: "base".into(), ..Default::default() };
    let status = snapshots.snapshot_vm(taken_again).await.expect_err("name taken");
    assert_eq!((status.code(), reason(&status)), (Code::AlreadyExists, "SNAPSHOT_NAME_TAKEN".into()));

    let listed = snapshots.list_snapshots(pb::ListSnapshotsRequest::default()).await.expect("list").into_inner();
    assert_eq!(listed.snapshots.len(), 1);
    let other_team = pb::ListSnapshotsRequest { labels: [("team".to_owned(), "b".to_owned())].into() };
    assert!(snapshots.list_snapshots(other_team).await.expect("list").into_inner().snapshots.is_empty());
    let status = snapshots.get_snapshot(pb::GetSnapshotRequest { snapshot: "nope".into() }).await.expect_err("none");
    assert_eq!((status.code(), reason(&status)), (Code::NotFound, "SNAPSHOT_NOT_FOUND".into()));

    // Restores: the snapshot's shape; another is refused, naming the field.
    let clone = pb::CreateVmRequest { name: "clone".into(), snapshot: "base".into(), ..Default::default() };
    let vm = daemon.client.vms.create_vm(clone).await.expect("restore").into_inner().vm.expect("vm");
    assert_eq!((vm.vcpus, vm.memory_mib, vm.snapshot_id.as_str()), (1, 256, snapshot.id.as_str()));
    let bigger =
        pb::CreateVmRequest { name: "big".into(), snapshot: "base".into(), vcpus: Some(2), ..Default::default() };
    let status = daemon.client.vms.create_vm(bigger).await.expect_err("vcpus differ");
    assert_eq!(violated_fields(&status), ["vcpus"]);
    let unstarted =
        pb::CreateVmRequest { name: "cold".into(), snapshot: "base".into(), no_start: true, ..Default::default() };
    let status = daemon.client.vms.create_vm(unstarted).await.expect_err("a restore starts");
    assert_eq!(violated_fields(&status), ["no_start"]);
    // Taken with the agent: a restore waits for it, to tell the guest its identity.
    let untold =
        pb::CreateVmRequest { name: "untold".into(), snapshot: "base".into(), no_wait: true, ..Default::default() };
    let status = daemon.client.vms.create_vm(untold).await.expect_err("a restore tells its guest");
    assert_eq!(violated_fields(&status), ["no_wait"]);
    let status = daemon.client.vms.create_vm(pb::CreateVmRequest {
        name: "ghost".into(),
        snapshot: "nope".into(),
        ..Default::default()
    });
    let status = status.await.expect_err("no such snapshot");
    assert_eq!((status.code(), reason(&status)), (Code::NotFound, "SNAPSHOT_NOT_FOUND".into()));

    // A clone maps the snapshot's memory: not snapshotted until it boots on its own.
    let status = snapshots
        .snapshot_vm(pb::SnapshotVmRequest { vm: "clone".into(), name: "deeper".into(), ..Default::default() })
        .await
        .expect_err("restored");
    assert_eq!((status.code(), reason(&status)), (Code::FailedPrecondition, "SNAPSHOT_UNSUPPORTED".into()));

    let delete = pb::DeleteSnapshotRequest { snapshot: "base".into() };
    let status = snapshots.delete_snapshot(delete.clone()).await.expect_err("in use");
    assert_eq!((status.code(), reason(&status)), (Code::FailedPrecondition, "SNAPSHOT_IN_USE".into()));
    for vm in ["clone", "src"] {
        let request = pb::DeleteVmRequest { vm: vm.into(), ..Default::default() };
        daemon.client.vms.delete_vm(request).await.expect("delete vm");
    }
    snapshots.delete_snapshot(delete).await.expect("deleted once nothing depends on it");
    assert!(
        snapshots
            .list_snapshots(pb::ListSnapshotsRequest::default())
            .await
            .expect("list")
            .into_inner()
            .snapshots
            .is_empty()
    );
}
