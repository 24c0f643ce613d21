//! Generic properties of every operation, over the stateful fake host and a real SQLite
//! file: each stage applied twice changes nothing the second time, a failure at each stage
//! in turn (or inside any host capability) unwinds to a clean host and a consistent record,
//! with every undo run twice (the second changing nothing), and an undo that fails leaves
//! evidence that reconcile acts on.

use std::path::Path;

use super::{CreateVm, Error, HostServices, Ops, OpsConfig, runner::RunOptions};
use crate::{
    domain::{Image, ImageId, RootDiskStrategy, Vm, VmSpec, VmState},
    host::fake::FakeHost,
    store::{Store, StoreError},
};

struct Fixture {
    ops: Ops,
    host: FakeHost,
    _dir: tempfile::TempDir,
}

async fn fixture() -> Fixture {
    fixture_with(RootDiskStrategy::Qcow2).await
}

async fn fixture_with(root_disk: RootDiskStrategy) -> Fixture {
    fixture_configured(|config| config.root_disk = root_disk).await
}

/// VMs get a tap on a bridge, and NAT.
async fn networked_fixture() -> Fixture {
    fixture_configured(|config| {
        config.network = Some(crate::config::NetworkConfig {
            bridge: "banger0".into(),
            pool: "172.30.0.0/24".parse().expect("pool"),
            nat: true,
            dns: false,
            dns_upstream: None,
            auto: false,
            note: String::new(),
        })
    })
    .await
}

async fn fixture_configured(configure: impl FnOnce(&mut OpsConfig)) -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(&dir.path().join("banger.db")).await.expect("store");
    let host = FakeHost::default();
    let mut config = OpsConfig::for_tests(dir.path());
    configure(&mut config);
    let sources = dir.path().join("image");
    std::fs::create_dir_all(&sources).expect("image dir");
    for file in ["vmlinuz", "rootfs.ext4"] {
        std::fs::write(sources.join(file), b"x").expect("image file");
    }
    let image = Image {
        id: ImageId::generate(),
        name: "img".into(),
        kernel_path: sources.join("vmlinuz"),
        initrd_path: None,
        rootfs_path: sources.join("rootfs.ext4"),
        kernel_args: String::new(),
        rootfs_size_bytes: 1,
        created_at_ms: 0,
        labels: Default::default(),
        origin: None,
    };
    store.image_insert(&image).await.expect("image");
    let services: HostServices = host.services();
    Fixture { ops: Ops::new(store, config, services), host, _dir: dir }
}

fn create(name: &str) -> CreateVm {
    CreateVm {
        name: Some(name.into()),
        image: Some("img".into()),
        spec: VmSpec { vcpus: 1, memory_mib: 256, disk_bytes: 0 },
        start: true,
        wait_agent: true,
        labels: Default::default(),
        ttl_ms: None,
        egress: Default::default(),
        snapshot: None,
    }
}

impl Fixture {
    fn processes_of(&self, vm: &Vm) -> usize {
        self.host.processes_under(&vm.vm_dir).len()
    }

    /// The record and the host agree: a running VM has its VMM and backend, any other has
    /// no process at all.
    fn assert_consistent(&self, vm: &Vm, context: &str) {
        let expected = if vm.observed_state == VmState::Running { 2 } else { 0 };
        assert_eq!(
            self.processes_of(vm),
            expected,
            "{context}: {:?} with {:?}",
            vm.observed_state,
            self.host.processes()
        );
        assert!(
            matches!(vm.observed_state, VmState::Running | VmState::Stopped | VmState::Error | VmState::Created),
            "{context}: left in transitional state {:?}",
            vm.observed_state
        );
    }

    fn vm_dirs(&self) -> usize {
        std::fs::read_dir(self.ops.vms_dir()).map(|d| d.count()).unwrap_or(0)
    }

    async fn record(&self, name: &str) -> Option<Vm> {
        match self.ops.store.vm_get(name).await {
            Ok(vm) => Some(vm),
            Err(StoreError::NotFound { .. }) => None,
            Err(e) => panic!("store: {e}"),
        }
    }

    fn run(&self, options: RunOptions) {
        self.ops.set_run_options(options);
    }
}

fn assert_stage_error(result: Result<impl std::fmt::Debug, Error>, index: usize) -> &'static str {
    match result {
        Err(Error::Stage { stage, .. }) => stage,
        other => panic!("failure injected at stage {index}: expected a stage error, got {other:?}"),
    }
}

/// Runs `setup` normally, then `attempt` with a failure injected at stage i = 0, 1, ...
/// until an attempt succeeds (i is past the last stage); returns how many stages failed.
/// Every undo runs twice.
macro_rules! for_each_failing_stage {
    ($fixture:expr, |$index:ident| $attempt:expr, |$stage:ident| $check:block) => {
        for_each_failing_stage!($fixture, |$index| {} => $attempt, |$stage| $check)
    };
    ($fixture:expr, |$index:ident| $setup:block => $attempt:expr, |$stage:ident| $check:block) => {{
        let mut $index = 0;
        loop {
            $setup
            $fixture.run(RunOptions { fail_at: Some($index), repeat_undos: true, ..Default::default() });
            let result = $attempt;
            $fixture.run(RunOptions::default());
            if result.is_ok() {
                break;
            }
            let $stage = assert_stage_error(result, $index);
            $check
            $index += 1;
        }
        $index
    }};
}

#[tokio::test]
async fn create_stages_are_idempotent() {
    let f = fixture().await;
    f.run(RunOptions { repeat_stages: true, ..Default::default() });
    let vm = f.ops.create_vm(create("twice")).await.expect("create with every stage twice");
    assert_eq!(vm.observed_state, VmState::Running);
    assert_eq!(f.processes_of(&vm), 2, "one vmm and one vsock backend: {:?}", f.host.processes());
    assert_eq!(f.host.disks(), [vm.paths().root_disk]);
}

#[tokio::test]
async fn a_create_failing_at_any_stage_leaves_nothing() {
    let f = fixture().await;
    let stages = for_each_failing_stage!(f, |i| f.ops.create_vm(create(&format!("vm-{i}"))).await, |stage| {
        assert!(f.record(&format!("vm-{i}")).await.is_none(), "{stage}: record left");
        assert!(f.host.processes().is_empty(), "{stage}: {:?}", f.host.processes());
        assert!(f.host.disks().is_empty(), "{stage}: {:?}", f.host.disks());
        assert!(f.host.cgroups().is_empty(), "{stage}: {:?}", f.host.cgroups());
        assert_eq!(f.vm_dirs(), 0, "{stage}: vm dir left");
    });
    assert_eq!(stages, 10, "resolve_image .. mark_running");
}

#[tokio::test]
async fn a_create_failing_inside_any_host_capability_leaves_nothing() {
    let f = fixture().await;
    for call in
        ["disks.create", "agents.start_backend", "vmm.launch", "limits.confine", "vmm.boot", "agents.wait_ready"]
    {
        f.host.fail_next(call);
        let result = f.ops.create_vm(create("doomed")).await;
        assert!(matches!(result, Err(Error::Stage { .. })), "{call}: {result:?}");
        assert!(f.record("doomed").await.is_none(), "{call}: record left");
        assert!(f.host.processes().is_empty(), "{call}: {:?}", f.host.processes());
        assert!(f.host.disks().is_empty(), "{call}: {:?}", f.host.disks());
        assert!(f.host.cgroups().is_empty(), "{call}: {:?}", f.host.cgroups());
        assert_eq!(f.vm_dirs(), 0, "{call}");
    }
    f.ops.create_vm(create("doomed")).await.expect("then it works");
}

#[tokio::test]
async fn start_stages_are_idempotent_and_failures_leave_a_stopped_or_errored_vm() {
    let f = fixture().await;
    let vm = f.ops.create_vm(create("web")).await.expect("create");
    f.ops.stop_vm("web", false).await.expect("stop");
    let stages = for_each_failing_stage!(f, |i| f.ops.start_vm("web", true).await, |stage| {
        let record = f.record("web").await.expect("record kept");
        assert!(matches!(record.observed_state, VmState::Stopped | VmState::Error), "{stage}: {record:?}");
        f.assert_consistent(&record, stage);
        assert!(vm.paths().root_disk.exists(), "{stage}: the disk of a stopped vm is kept");
    });
    assert_eq!(stages, 9, "resolve_image .. mark_running");
    f.ops.stop_vm("web", false).await.expect("stop");
    f.run(RunOptions { repeat_stages: true, ..Default::default() });
    let started = f.ops.start_vm("web", true).await.expect("start with every stage twice");
    assert_eq!(started.observed_state, VmState::Running);
    assert_eq!(f.processes_of(&vm), 2, "{:?}", f.host.processes());
}

#[tokio::test]
async fn stop_stages_are_idempotent_and_a_failed_stop_still_leaves_a_clean_host() {
    let f = fixture().await;
    let stages = for_each_failing_stage!(
        f,
        |i| { f.ops.create_vm(create(&format!("stop-{i}"))).await.expect("create"); } => f.ops.stop_vm(&format!("stop-{i}"), false).await,
        |stage| {
            let record = f.record(&format!("stop-{i}")).await.expect("record");
            f.assert_consistent(&record, stage);
            f.ops.stop_vm(&format!("stop-{i}"), false).await.expect("a retry stops it");
        }
    );
    assert_eq!(stages, 6, "mark_stopping .. mark_stopped");
    let vm = f.ops.create_vm(create("twice")).await.expect("create");
    f.run(RunOptions { repeat_stages: true, ..Default::default() });
    let stopped = f.ops.stop_vm("twice", false).await.expect("stop with every stage twice");
    assert_eq!(stopped.observed_state, VmState::Stopped);
    assert_eq!(f.processes_of(&vm), 0);
}

#[tokio::test]
async fn pause_and_resume_stages_are_idempotent_and_a_failure_leaves_the_vm_as_it_was() {
    let f = fixture().await;
    let vm = f.ops.create_vm(create("frozen")).await.expect("create");
    let stages = for_each_failing_stage!(f, |i| f.ops.pause_vm("frozen").await, |stage| {
        let record = f.record("frozen").await.expect("record");
        assert_eq!((record.observed_state, record.desired_state), (VmState::Running, VmState::Running), "{stage}");
        assert!(!f.host.is_paused(&vm.paths()), "{stage}: vcpus left stopped");
    });
    assert_eq!(stages, 4, "mark_pausing, quiesce_agent, pause_vcpus, mark_paused");
    assert!(f.host.is_paused(&vm.paths()));
    let paused = f.ops.pause_vm("frozen").await.expect("pausing a paused vm");
    assert_eq!((paused.observed_state, paused.desired_state), (VmState::Paused, VmState::Paused));
    let refused = f.ops.copy_from_vm("frozen", "/etc/hostname".into(), false).await.err().expect("copy while paused");
    assert!(matches!(refused, Error::WrongState { state: VmState::Paused, .. }), "{refused:?}");
    assert!(matches!(f.ops.start_vm("frozen", true).await, Err(Error::WrongState { .. })));

    let stages = for_each_failing_stage!(f, |i| f.ops.resume_vm("frozen").await, |stage| {
        let record = f.record("frozen").await.expect("record");
        assert_eq!((record.observed_state, record.desired_state), (VmState::Paused, VmState::Paused), "{stage}");
        assert!(f.host.is_paused(&vm.paths()), "{stage}: vcpus left running");
    });
    assert_eq!(stages, 3, "mark_resuming, resume_vcpus, mark_running");
    assert!(!f.host.is_paused(&vm.paths()));

    f.run(RunOptions { repeat_stages: true, ..Default::default() });
    assert_eq!(f.ops.pause_vm("frozen").await.expect("pause twice").observed_state, VmState::Paused);
    assert_eq!(f.ops.resume_vm("frozen").await.expect("resume twice").observed_state, VmState::Running);
    f.run(RunOptions::default());

    // A paused VM stops (its vCPUs run again first, so the guest can power off).
    f.ops.pause_vm("frozen").await.expect("pause");
    let stopped = f.ops.stop_vm("frozen", false).await.expect("stop a paused vm");
    assert_eq!(stopped.observed_state, VmState::Stopped);
    assert_eq!(f.processes_of(&vm), 0);
    assert!(matches!(f.ops.pause_vm("frozen").await, Err(Error::WrongState { state: VmState::Stopped, .. })));
    assert!(matches!(f.ops.resume_vm("frozen").await, Err(Error::WrongState { state: VmState::Stopped, .. })));
}

#[tokio::test]
async fn reconcile_finishes_a_pause_or_resume_the_daemon_died_in() {
    let f = fixture().await;
    let vm = f.ops.create_vm(create("half")).await.expect("create");
    // Died after recording the intent, before the VMM was asked.
    let update = crate::store::VmUpdate { desired_state: Some(VmState::Paused), ..Default::default() };
    f.ops.store.vm_update(&vm, update).await.expect("intent");
    f.ops.recover().await.expect("recover");
    let record = f.record("half").await.expect("record");
    assert_eq!((record.observed_state, record.desired_state), (VmState::Paused, VmState::Paused));
    assert!(f.host.is_paused(&vm.paths()));
    // Died after the VMM resumed, before the record said so.
    let update = crate::store::VmUpdate { desired_state: Some(VmState::Running), ..Default::default() };
    f.ops.store.vm_update(&record, update).await.expect("intent");
    f.ops.host.vmm.resume(&vm.paths()).await.expect("resume");
    f.ops.recover().await.expect("recover");
    let record = f.record("half").await.expect("record");
    assert_eq!((record.observed_state, record.desired_state), (VmState::Running, VmState::Running));
    assert!(!f.host.is_paused(&vm.paths()));
    // A paused VM is adopted as it is; its VMM's death is seen like a running one's.
    f.ops.pause_vm("half").await.expect("pause");
    f.ops.recover().await.expect("recover");
    assert_eq!(f.record("half").await.expect("record").observed_state, VmState::Paused);
    let vmm = f.ops.handles(&vm).vmm.expect("vmm");
    crate::host::process::Processes::terminate(&f.host, &vmm, &vm.paths().api_socket, std::time::Duration::ZERO).await;
    f.ops.recover().await.expect("recover");
    let record = f.record("half").await.expect("record");
    assert_eq!(record.observed_state, VmState::Stopped);
    f.assert_consistent(&record, "paused vmm died");
}

async fn warm_pool(f: &Fixture, size: u32) -> crate::domain::Pool {
    let new = super::NewPool {
        name: "warm".into(),
        image: Some("img".into()),
        spec: VmSpec { vcpus: 1, memory_mib: 256, disk_bytes: 0 },
        egress: Default::default(),
        size,
        snapshot: None,
    };
    let pool = f.ops.create_pool(new).await.expect("pool");
    for _ in 0..size {
        f.ops.refill_pools().await.expect("refill");
    }
    pool
}

async fn member_ids(f: &Fixture) -> Vec<crate::domain::VmId> {
    let (_, members) = f.ops.get_pool("warm").await.expect("pool");
    members.iter().filter(|m| m.vm.observed_state == VmState::Running).map(|m| m.vm.id).collect()
}

#[tokio::test]
async fn a_create_of_a_pools_shape_claims_a_member_that_takes_its_name_and_the_pool_refills() {
    let f = fixture().await;
    // A member whose warm-up fails is still a member: the warm-up is best effort.
    f.host.fail_next("agents.set_identity");
    let pool = warm_pool(&f, 2).await;
    let members = member_ids(&f).await;
    assert_eq!(members.len(), 2, "{:?}", f.host.processes());
    let warmed: Vec<_> = members.iter().filter_map(|id| f.host.identity_of(*id)).collect();
    assert_eq!(warmed.len(), 1, "the other member was warmed up: its own name set again");
    let mut names = Vec::new();
    for id in &members {
        names.push(f.ops.store.vm_get(&id.to_string()).await.expect("member").name);
    }
    assert!(names.contains(&warmed[0].hostname), "{warmed:?} {names:?}");

    let mut request = create("claimed");
    request.labels = [("team".to_owned(), "a".to_owned())].into();
    request.ttl_ms = Some(60_000);
    let vm = f.ops.create_vm(request).await.expect("claim");
    assert!(members.contains(&vm.id), "served by a member");
    assert_eq!((vm.name.as_str(), vm.observed_state), ("claimed", VmState::Running));
    assert_eq!(vm.labels.get("team").map(String::as_str), Some("a"));
    assert!(!pool.has_member(&vm.labels) && vm.expire_at_ms.is_some());
    assert_eq!(f.processes_of(&vm), 2, "the member's vmm and backend, not a new boot");
    assert_eq!(member_ids(&f).await.len(), 1);

    // Another shape boots; a claim that fails falls back to a boot and drops the member.
    let mut other = create("bigger");
    other.spec.memory_mib = 512;
    let bigger = f.ops.create_vm(other).await.expect("boot");
    assert!(!members.contains(&bigger.id));
    f.host.fail_next("agents.set_identity");
    let fallback = f.ops.create_vm(create("fallback")).await.expect("a failed claim boots instead");
    assert!(!members.contains(&fallback.id), "booted, not claimed");
    assert!(member_ids(&f).await.is_empty(), "the member whose claim failed is gone");
    // A name in use is refused as a create would refuse it, and the member stays.
    f.ops.refill_pools().await.expect("refill");
    let refused = f.ops.create_vm(create("claimed")).await.expect_err("name taken");
    assert!(matches!(refused.root(), Error::AlreadyExists { .. }), "{refused:?}");
    assert_eq!(member_ids(&f).await.len(), 1, "the member is still the pool's");

    f.ops.refill_pools().await.expect("refill");
    assert_eq!(member_ids(&f).await.len(), 2, "refilled");
    // Deleting the pool deletes its unclaimed members only.
    f.ops.delete_pool("warm").await.expect("delete pool");
    assert!(f.ops.get_pool("warm").await.is_err());
    for name in ["claimed", "bigger", "fallback"] {
        assert!(f.record(name).await.is_some(), "{name} stays");
    }
    let left: Vec<_> =
        f.ops.store.vm_list().await.expect("list").into_iter().filter(|vm| pool.has_member(&vm.labels)).collect();
    assert!(left.is_empty(), "{left:?}");
}

#[tokio::test]
async fn delete_stages_are_idempotent_and_a_failed_delete_can_be_retried() {
    let f = fixture().await;
    let mut stages = 0;
    loop {
        let name = format!("del-{stages}");
        let vm = f.ops.create_vm(create(&name)).await.expect("create");
        f.run(RunOptions { fail_at: Some(stages), repeat_undos: true, ..Default::default() });
        let result = f.ops.delete_vm(&name).await;
        f.run(RunOptions::default());
        if result.is_ok() {
            assert!(f.record(&name).await.is_none());
            break;
        }
        let stage = assert_stage_error(result, stages);
        match f.record(&name).await {
            Some(record) => f.assert_consistent(&record, stage),
            None => assert_eq!(f.processes_of(&vm), 0, "{stage}: {:?}", f.host.processes()),
        }
        f.ops.delete_vm(&name).await.expect("a retry finishes the delete");
        assert!(f.record(&name).await.is_none(), "{stage}");
        assert!(!Path::new(&vm.vm_dir).exists(), "{stage}");
        stages += 1;
    }
    assert_eq!(stages, 4, "stop .. delete_record");
    let vm = f.ops.create_vm(create("twice")).await.expect("create");
    f.run(RunOptions { repeat_stages: true, ..Default::default() });
    f.ops.delete_vm("twice").await.expect("delete with every stage twice");
    assert!(f.record("twice").await.is_none());
    assert_eq!(f.processes_of(&vm), 0);
    assert!(!vm.vm_dir.exists());
}

#[tokio::test]
async fn reconcile_tears_down_kernel_handles_in_order_and_retries_what_failed() {
    let f = fixture().await;
    let vm = f.ops.create_vm(create("plumbed")).await.expect("create");
    let mut handles = f.ops.handles(&vm);
    let kernel = f.host.plumb("plumbed");
    handles.tap = kernel.tap;
    handles.base_loop = kernel.base_loop;
    handles.cow_loop = kernel.cow_loop;
    handles.dm_name = kernel.dm_name;
    handles.dm_device = kernel.dm_device;
    f.ops.set_handles(&vm, handles.clone()).expect("handles");
    // The VMM dies on its own; the snapshot's removal fails once.
    let vmm = handles.vmm.expect("vmm");
    crate::host::process::Processes::terminate(&f.host, &vmm, &vm.paths().api_socket, std::time::Duration::ZERO).await;
    f.host.fail_next("block.remove_dm");
    assert!(f.ops.recover().await.is_err(), "the failed removal is reported");
    let left = crate::host::scratch::read_handles(&vm.paths().handles);
    assert_eq!((left.dm_name.is_some(), left.cow_loop.is_some(), left.tap.is_some()), (true, true, false), "{left:?}");
    assert_eq!(f.host.kernel_state().1.len(), 2, "loops under the snapshot are kept");
    f.ops.recover().await.expect("the next reconcile finishes");
    assert_eq!(f.host.kernel_state(), (vec![], vec![], vec![]));
    assert!(!vm.paths().handles.exists());
    let record = f.record("plumbed").await.expect("record");
    assert_eq!(record.observed_state, VmState::Stopped);
    assert_eq!(record.last_error_reason, Some(crate::domain::VmFault::VmmExited), "{}", record.last_error);
}

#[tokio::test]
async fn orphan_processes_under_the_state_dir_are_killed() {
    let f = fixture().await;
    let vm = f.ops.create_vm(create("kept")).await.expect("create");
    let stray = f.ops.vms_dir().join(crate::domain::VmId::generate().to_string());
    f.host.spawn_process(&format!("qemu-system-x86_64 -qmp unix:{}/qmp.sock,server=on", stray.display()));
    f.ops.recover().await.expect("recover");
    assert!(f.host.processes_under(&stray).is_empty(), "{:?}", f.host.processes());
    assert_eq!(f.processes_of(&vm), 2, "a recorded vm keeps its processes");
}

#[tokio::test]
async fn dm_snapshot_devices_are_handles_made_at_boot_and_released_whenever_the_vmm_goes() {
    let f = fixture_with(RootDiskStrategy::DmSnapshot).await;
    let no_devices = (vec![], vec![], vec![]);
    let devices = |f: &Fixture| {
        let (_, loops, dms) = f.host.kernel_state();
        (loops.len(), dms.len())
    };

    f.run(RunOptions { repeat_stages: true, ..Default::default() });
    let vm = f.ops.create_vm(create("snap")).await.expect("create with every stage twice");
    f.run(RunOptions::default());
    assert_eq!(devices(&f), (2, 1), "one base loop, one cow loop, one snapshot: {:?}", f.host.kernel_state());
    let handles = f.ops.handles(&vm);
    assert_eq!(handles.dm_name, Some(RootDiskStrategy::dm_name(vm.id)));
    assert!(handles.base_loop.is_some() && handles.cow_loop.is_some(), "{handles:?}");
    assert_eq!(f.host.disks(), [vm.paths().root_disk], "the exception store is the VM's disk");
    assert!(vm.paths().root_disk.ends_with("root.cow"));

    // Stopped, the devices go and the exception store stays; started, they come back.
    f.ops.stop_vm("snap", false).await.expect("stop");
    assert_eq!(f.host.kernel_state(), no_devices);
    assert!(vm.paths().root_disk.exists(), "the guest's writes are kept");
    let stages = for_each_failing_stage!(f, |i| f.ops.start_vm("snap", true).await, |stage| {
        assert_eq!(f.host.kernel_state(), no_devices, "{stage}: start {i} failed and left devices");
        assert!(vm.paths().root_disk.exists(), "{stage}: the disk of a stopped vm is kept");
    });
    assert_eq!(stages, 9);
    assert_eq!(devices(&f), (2, 1));

    // A VMM that dies on its own: reconcile releases its devices, snapshot first.
    let vmm = f.ops.handles(&vm).vmm.expect("vmm");
    crate::host::process::Processes::terminate(&f.host, &vmm, &vm.paths().api_socket, std::time::Duration::ZERO).await;
    f.ops.recover().await.expect("recover");
    assert_eq!(f.host.kernel_state(), no_devices);

    f.ops.delete_vm("snap").await.expect("delete");
    assert!(f.host.disks().is_empty() && !vm.vm_dir.exists());

    // A create failing at any stage, or inside any device call, leaves no device.
    for_each_failing_stage!(f, |i| f.ops.create_vm(create(&format!("snap-{i}"))).await, |stage| {
        assert_eq!(f.host.kernel_state(), no_devices, "{stage}");
        assert!(f.host.disks().is_empty(), "{stage}: {:?}", f.host.disks());
    });
    f.ops.delete_vm(&format!("snap-{}", 10)).await.expect("delete the one that succeeded");
    for call in ["block.attach_loop", "block.create_snapshot", "vmm.launch", "vmm.boot"] {
        f.host.fail_next(call);
        let result = f.ops.create_vm(create("doomed")).await;
        assert!(matches!(result, Err(Error::Stage { .. })), "{call}: {result:?}");
        assert_eq!(f.host.kernel_state(), no_devices, "{call}");
        assert!(f.host.disks().is_empty(), "{call}: {:?}", f.host.disks());
    }
}

#[tokio::test]
async fn networked_creates_failing_at_any_stage_leave_no_tap_no_guest_rule_and_no_nat_rule() {
    let f = networked_fixture().await;
    let stages = for_each_failing_stage!(f, |i| f.ops.create_vm(create(&format!("net-{i}"))).await, |stage| {
        assert_eq!(f.host.kernel_state().0, Vec::<String>::new(), "{stage}: taps left");
        assert!(f.host.nat_rules().is_empty(), "{stage}: {:?}", f.host.nat_rules());
        assert!(f.host.guest_rules().is_empty(), "{stage}: {:?}", f.host.guest_rules());
        assert!(f.host.processes().is_empty(), "{stage}: {:?}", f.host.processes());
        assert_eq!(f.vm_dirs(), 0, "{stage}: vm dir left");
    });
    assert_eq!(stages, 13, "resolve_image .. mark_running, with tap, firewall and nat");
}

/// An undo that fails is reported, recorded and left for reconcile: the VM stays, in
/// `error`, its scratch file names what could not be released, and the next reconcile
/// releases it.
#[tokio::test]
async fn a_failed_undo_is_reported_recorded_and_finished_by_reconcile() {
    let f = networked_fixture().await;
    // vmm_boot fails; undoing the tap fails, and so does the retry with everything else.
    f.host.fail_next("vmm.boot");
    f.host.fail_next("network.delete_tap");
    f.host.fail_next("network.delete_tap");
    let result = f.ops.create_vm(create("stuck")).await;
    match &result {
        Err(Error::Stage { stage: "vmm_boot", undo_failed, .. }) => {
            assert_eq!(undo_failed, &["tap", "prepare_vm_dir"], "{result:?}")
        }
        other => panic!("expected a stage error with failed undos, got {other:?}"),
    }
    let record = f.record("stuck").await.expect("the record is kept");
    assert_eq!(record.observed_state, VmState::Error);
    assert_eq!(record.last_error_reason, Some(crate::domain::VmFault::CreateLeftovers));
    let (taps, _, _) = f.host.kernel_state();
    assert_eq!(taps.len(), 1, "the tap is still there");
    let left = crate::host::scratch::read_handles(&record.paths().handles);
    assert_eq!(left.tap.as_deref(), Some(taps[0].as_str()), "the scratch file names it: {left:?}");
    assert!(f.host.processes().is_empty() && f.host.nat_rules().is_empty(), "everything else went");

    f.ops.recover().await.expect("reconcile releases what is left");
    assert_eq!(f.host.kernel_state().0, Vec::<String>::new());
    assert!(f.ops.handles(&record).is_empty() && !record.paths().handles.exists());
    f.ops.delete_vm("stuck").await.expect("and the VM can be deleted");
    assert_eq!(f.vm_dirs(), 0);
}

fn image_sources(f: &Fixture) -> crate::domain::NewImage {
    let sources = f._dir.path().join("import");
    std::fs::create_dir_all(&sources).expect("dir");
    let mut kernel = vec![0u8; 4096];
    kernel[0x202..0x206].copy_from_slice(b"HdrS");
    std::fs::write(sources.join("vmlinuz"), kernel).expect("kernel");
    let mut rootfs = vec![0u8; 1 << 16];
    rootfs[1080..1082].copy_from_slice(&[0x53, 0xEF]);
    std::fs::write(sources.join("rootfs.ext4"), rootfs).expect("rootfs");
    std::fs::write(sources.join("initrd.img"), b"initrd").expect("initrd");
    crate::domain::NewImage {
        name: "imported".into(),
        kernel_path: sources.join("vmlinuz"),
        initrd_path: Some(sources.join("initrd.img")),
        rootfs_path: sources.join("rootfs.ext4"),
        kernel_args: String::new(),
        labels: Default::default(),
    }
}

fn image_dirs(f: &Fixture) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(f.ops.images_dir()).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default()
}

#[tokio::test]
async fn image_import_stages_are_idempotent_and_a_failed_import_leaves_nothing() {
    let f = fixture().await;
    let stages = for_each_failing_stage!(f, |i| f.ops.import_image(image_sources(&f)).await, |stage| {
        assert!(f.ops.store.image_get("imported").await.is_err(), "{stage}: record left");
        assert!(image_dirs(&f).is_empty(), "{stage}: {:?}", image_dirs(&f));
    });
    assert_eq!(stages, 2, "copy_files, insert_record");
    f.ops.delete_image("imported").await.expect("delete");
    f.run(RunOptions { repeat_stages: true, ..Default::default() });
    let (image, _) = f.ops.import_image(image_sources(&f)).await.expect("import with every stage twice");
    assert_eq!(image_dirs(&f), [image.rootfs_path.parent().expect("dir").to_owned()]);
    assert_eq!(std::fs::read(image.initrd_path.expect("initrd")).expect("copied"), b"initrd");
}

#[tokio::test]
async fn reconcile_removes_image_directories_no_record_names() {
    let f = fixture().await;
    let (image, _) = f.ops.import_image(image_sources(&f)).await.expect("import");
    let stray = f.ops.images_dir().join(ImageId::generate().to_string());
    std::fs::create_dir_all(&stray).expect("stray dir");
    std::fs::write(stray.join("rootfs.ext4"), b"left by an import whose undo failed").expect("file");
    f.ops.recover().await.expect("recover");
    assert_eq!(image_dirs(&f), [image.rootfs_path.parent().expect("dir").to_owned()]);
}

/// Operations on one VM are serialized by its lock: of two deletes at once, one runs and
/// the other, let in after it, finds no VM.
#[tokio::test]
async fn operations_on_one_vm_run_one_at_a_time() {
    let f = fixture().await;
    f.ops.create_vm(create("shared")).await.expect("create");
    let (a, b) = tokio::join!(f.ops.delete_vm("shared"), f.ops.delete_vm("shared"));
    let (done, refused) = if a.is_ok() { (a, b) } else { (b, a) };
    assert!(done.is_ok(), "{done:?}");
    assert!(matches!(refused, Err(Error::NotFound { .. })), "the second delete ran too: {refused:?}");
    assert!(f.host.processes().is_empty());
}

/// Reconcile is idempotent: run twice over VMs in every situation it handles (running,
/// dead, stopped, an orphan directory), the second run changes no record, no scratch file
/// and nothing on the host.
#[tokio::test]
async fn reconcile_twice_changes_nothing_the_second_time() {
    let f = fixture().await;
    f.ops.create_vm(create("alive")).await.expect("create");
    let dead = f.ops.create_vm(create("dead")).await.expect("create");
    let stopped = f.ops.create_vm(create("stopped")).await.expect("create");
    f.ops.stop_vm("stopped", false).await.expect("stop");
    let vmm = f.ops.handles(&dead).vmm.expect("vmm");
    crate::host::process::Processes::terminate(&f.host, &vmm, &dead.paths().api_socket, std::time::Duration::ZERO)
        .await;
    std::fs::create_dir_all(f.ops.vms_dir().join(crate::domain::VmId::generate().to_string())).expect("orphan");
    f.ops.recover().await.expect("first reconcile");
    let after_first = snapshot(&f).await;
    assert_eq!(f.record("dead").await.expect("dead").observed_state, VmState::Stopped);
    assert_eq!(f.vm_dirs(), 3, "the orphan dir went");
    f.ops.recover().await.expect("second reconcile");
    assert_eq!(snapshot(&f).await, after_first, "the second reconcile changed something");
    assert_eq!(f.processes_of(&stopped), 0);
}

/// What reconcile could change: the records, their scratch files, the fake host's state.
async fn snapshot(f: &Fixture) -> String {
    let mut records = Vec::new();
    for name in ["alive", "dead", "stopped"] {
        let vm = f.record(name).await.expect("record");
        let scratch = crate::host::scratch::read_handles(&vm.paths().handles);
        records.push(format!("{vm:?} {scratch:?}"));
    }
    format!("{records:?} {:?} {:?} {:?} {}", f.host.processes(), f.host.disks(), f.host.cgroups(), f.vm_dirs())
}

/// A fixture whose default image can boot container images (a kernel, an initramfs and
/// the manifest line that says it starts the agent).
async fn oci_fixture() -> Fixture {
    let f = fixture_configured(|config| config.min_rootfs_bytes = 16 * 1024 * 1024).await;
    let default = f._dir.path().join("none");
    std::fs::create_dir_all(&default).expect("default image dir");
    std::fs::write(default.join("vmlinuz"), b"kernel").expect("kernel");
    std::fs::write(default.join("initrd.img"), b"initrd").expect("initrd");
    std::fs::write(default.join("manifest.txt"), b"initramfs_agent=1\n").expect("manifest");
    f
}

/// An OCI layout of the rule fixture under the fixture's dir, tagged `t`.
fn oci_layout(f: &Fixture, name: &str, layers: &[Vec<u8>]) -> std::path::PathBuf {
    let dir = f._dir.path().join(name);
    std::fs::create_dir_all(&dir).expect("layout dir");
    banger_tests::oci::write_layout(&dir, "t", &Default::default(), layers);
    dir
}

fn pull_from(name: &str, dir: &Path) -> super::NewOciImage {
    super::NewOciImage {
        name: name.into(),
        source: super::ImageSource::Layout { dir: dir.to_owned(), tag: Some("t".into()) },
        labels: Default::default(),
    }
}

fn blobs(f: &Fixture) -> usize {
    std::fs::read_dir(f.ops.blobs().root().join("sha256")).map(|d| d.count()).unwrap_or(0)
}

fn no_progress() -> super::ProgressFn {
    std::sync::Arc::new(|_| {})
}

#[tokio::test]
async fn image_pull_stages_are_idempotent_and_a_failed_pull_leaves_no_image_and_no_blob() {
    let f = oci_fixture().await;
    let layout = oci_layout(&f, "layout", &banger_tests::oci::rule_layers_with(3));
    let stages = for_each_failing_stage!(
        f,
        |i| f.ops.pull_image(pull_from("pulled", &layout), crate::domain::OpId::generate(), no_progress()).await,
        |stage| {
            assert!(f.ops.store.image_get("pulled").await.is_err(), "{stage}: record left");
            assert!(image_dirs(&f).is_empty(), "{stage}: {:?}", image_dirs(&f));
            assert_eq!(blobs(&f), 0, "{stage}: blobs left");
        }
    );
    assert_eq!(stages, 5, "fetch, flatten, build_rootfs, copy_kernel, insert_record");
    let image = f.ops.store.image_get("pulled").await.expect("pulled");
    let origin = image.origin.clone().expect("origin");
    assert_eq!((origin.layers.len(), origin.platform.as_str()), (2, "linux/amd64"));
    assert_eq!(blobs(&f), 4, "two layers, the config and the manifest");
    assert_eq!(image.kernel_args, super::AGENT_INIT_ARGS);

    // A second image sharing every layer stores no blob twice; deleting one keeps them.
    f.run(RunOptions { repeat_stages: true, ..Default::default() });
    let again = f.ops.pull_image(pull_from("again", &layout), crate::domain::OpId::generate(), no_progress()).await;
    f.run(RunOptions::default());
    let again = again.expect("pull with every stage twice");
    assert_eq!(blobs(&f), 4);
    use std::os::unix::fs::MetadataExt;
    let inode = |path: &Path| std::fs::metadata(path).expect("rootfs").ino();
    assert_eq!(inode(&image.rootfs_path), inode(&again.rootfs_path), "a converted manifest is shared, not made again");
    let first_bytes = std::fs::read(&image.rootfs_path).expect("first");
    f.ops.delete_image("pulled").await.expect("delete");
    assert_eq!(blobs(&f), 4, "the other image still uses them");
    assert_eq!(std::fs::read(&again.rootfs_path).expect("still there"), first_bytes);
    f.ops.delete_image("again").await.expect("delete");
    assert_eq!(blobs(&f), 0, "the last image took its blobs along");
    // Converted again from nothing: the same bytes.
    let third = f.ops.pull_image(pull_from("third", &layout), crate::domain::OpId::generate(), no_progress()).await;
    assert!(std::fs::read(&third.expect("third").rootfs_path).expect("third") == first_bytes, "reproducible");
}

#[tokio::test]
async fn hostile_sources_are_refused_with_their_own_error_and_leave_nothing() {
    use banger_tests::oci::{Entry as E, layer};
    use tar::EntryType;
    let f = oci_fixture().await;
    type Case = (&'static str, Vec<Vec<u8>>, fn(&Error) -> bool);
    let cases: Vec<Case> = vec![
        ("dotdot", vec![layer(&[E::Raw(b"../../etc/x".to_vec(), EntryType::Regular)])], |e| {
            matches!(e.root(), Error::Image(crate::host::oci::OciError::Layer { .. }))
        }),
        ("absolute", vec![layer(&[E::Raw(b"/etc/x".to_vec(), EntryType::Regular)])], |e| {
            matches!(e.root(), Error::Image(crate::host::oci::OciError::Layer { .. }))
        }),
        (
            "through-symlink",
            vec![layer(&[E::Sym("escape", "/")]), layer(&[E::File("escape/etc/x", b"x", 0o644)])],
            |e| matches!(e.root(), Error::Image(crate::host::oci::OciError::Layer { .. })),
        ),
        ("truncated", vec![layer(&[E::Many("many", 2000)])[..3000].to_vec()], |e| {
            matches!(e.root(), Error::Image(crate::host::oci::OciError::CorruptLayer { .. }))
        }),
    ];
    for (name, layers, expected) in cases {
        let layout = oci_layout(&f, name, &layers);
        let err = f
            .ops
            .pull_image(pull_from(name, &layout), crate::domain::OpId::generate(), no_progress())
            .await
            .expect_err(name);
        assert!(expected(&err), "{name}: {err:?}");
        assert!(f.ops.store.image_get(name).await.is_err(), "{name}: an image was recorded");
        assert!(image_dirs(&f).is_empty(), "{name}: {:?}", image_dirs(&f));
        assert_eq!(blobs(&f), 0, "{name}: blobs left");
    }

    // A blob whose content does not match its digest.
    let layout = oci_layout(&f, "tampered", &[layer(&[E::File("a", b"a", 0o644)])]);
    let layer_blob = std::fs::read_dir(layout.join("blobs/sha256"))
        .expect("blobs")
        .flatten()
        .map(|e| e.path())
        .find(|p| std::fs::read(p).is_ok_and(|b| b.starts_with(&[0x1f, 0x8b])))
        .expect("the layer blob");
    std::fs::write(&layer_blob, layer(&[E::File("a", b"tampered", 0o644)])).expect("tamper");
    let err = f
        .ops
        .pull_image(pull_from("tampered", &layout), crate::domain::OpId::generate(), no_progress())
        .await
        .expect_err("tampered");
    assert!(matches!(err.root(), Error::Image(crate::host::oci::OciError::DigestMismatch { .. })), "{err:?}");

    // An image for another platform only, and a tag the layout does not have.
    let arm = f._dir.path().join("arm");
    banger_tests::oci::write_multi_platform_layout(&arm, "t", &["linux/arm64", "linux/arm/v7"], &[layer(&[])]);
    let err = f
        .ops
        .pull_image(pull_from("arm", &arm), crate::domain::OpId::generate(), no_progress())
        .await
        .expect_err("arm64 only");
    match err.root() {
        Error::Image(crate::host::oci::OciError::NoPlatform { available, .. }) => {
            assert_eq!(available, &["linux/arm64".to_owned(), "linux/arm/v7".to_owned()])
        }
        other => panic!("{other:?}"),
    }
    let mut unknown = pull_from("unknown", &arm);
    unknown.source = super::ImageSource::Layout { dir: arm.clone(), tag: Some("nope".into()) };
    let err = f.ops.pull_image(unknown, crate::domain::OpId::generate(), no_progress()).await.expect_err("tag");
    assert!(matches!(err.root(), Error::Image(crate::host::oci::OciError::NotFound { .. })), "{err:?}");
    assert_eq!(blobs(&f), 0, "blobs left");
    assert_eq!(f.ops.store.image_list().await.expect("list").len(), 1, "only the fixture's own image");
}

fn take(vm: &str, name: &str, after: crate::domain::SnapshotAfter) -> super::TakeSnapshot {
    super::TakeSnapshot { vm: vm.into(), name: name.into(), labels: Default::default(), after, without_agent: false }
}

#[tokio::test]
async fn a_snapshot_failing_before_it_is_complete_leaves_the_vm_running_on_its_own_disk() {
    use crate::domain::SnapshotAfter;
    let f = fixture().await;
    let src = f.ops.create_vm(create("src")).await.expect("create");
    std::fs::write(src.paths().root_disk, b"the source's data").expect("disk content");
    let stages = for_each_failing_stage!(
        f,
        |i| f.ops.snapshot_vm(take("src", &format!("s-{i}"), SnapshotAfter::Resume)).await,
        |stage| {
            let vm = f.record("src").await.expect("the source stays");
            match f.ops.store.snapshot_get(&format!("s-{i}")).await {
                // Complete: the VM's disk overlays it; the VM did not resume (the failure came after).
                Ok(snapshot) => {
                    assert!(snapshot.ready, "{stage}: a snapshot record left incomplete");
                    assert_eq!(vm.snapshot_id, Some(snapshot.id), "{stage}");
                    assert_eq!(vm.observed_state, VmState::Error, "{stage}: a failed resume is an error");
                    assert_eq!(std::fs::read(snapshot.paths().disk).expect("frozen disk"), b"the source's data");
                    f.ops.start_vm("src", true).await.expect("a start boots it again from its disk");
                    let _ = std::fs::remove_file(vm.paths().root_disk);
                    std::fs::copy(snapshot.paths().disk, vm.paths().root_disk).expect("restore the test's disk");
                }
                Err(StoreError::NotFound { .. }) => {
                    assert_eq!(vm.observed_state, VmState::Running, "{stage}");
                    assert!(!f.host.is_paused(&vm.paths()), "{stage}: the source was left paused");
                    assert_eq!(std::fs::read(vm.paths().root_disk).expect("disk"), b"the source's data", "{stage}");
                    let left = std::fs::read_dir(f.ops.snapshots_dir()).map(|d| d.count()).unwrap_or(0);
                    assert_eq!(left, 0, "{stage}: snapshot files left");
                }
                Err(e) => panic!("store: {e}"),
            }
        }
    );
    assert!(stages >= 8, "{stages} stages");
    let snapshot = f.ops.get_snapshot(&format!("s-{stages}")).await.expect("taken").snapshot;
    let src = f.record("src").await.expect("source");
    assert_eq!((src.observed_state, src.snapshot_id), (VmState::Running, Some(snapshot.id)));
    assert_eq!(f.processes_of(&src), 2, "resumed from the snapshot: {:?}", f.host.processes());
    // The source resumed under its own name, with fresh entropy.
    let identity = f.host.identity_of(src.id).expect("told its identity");
    assert_eq!(identity.hostname, "src");
    assert!(identity.entropy.iter().any(|b| *b != 0) && identity.realtime_ns.is_some());
}

#[tokio::test]
async fn clones_of_a_snapshot_get_their_own_identity_and_the_snapshot_stays_while_they_live() {
    use crate::domain::SnapshotAfter;
    let f = networked_fixture().await;
    f.ops.create_vm(create("src")).await.expect("create");
    let (snapshot, src) = f.ops.snapshot_vm(take("src", "base", SnapshotAfter::Stop)).await.expect("snapshot");
    assert_eq!((src.observed_state, src.snapshot_id), (VmState::Stopped, Some(snapshot.id)));
    assert_eq!(f.processes_of(&src), 0);
    let again = f.ops.snapshot_vm(take("src", "other", SnapshotAfter::Stop)).await.expect_err("stopped");
    assert!(matches!(again, Error::WrongState { .. }), "{again:?}");

    let mut clones = Vec::new();
    for name in ["c1", "c2"] {
        let mut request = create(name);
        request.image = None;
        request.spec = VmSpec { vcpus: 0, memory_mib: 0, disk_bytes: 0 };
        request.snapshot = Some("base".into());
        let vm = f.ops.create_vm(request).await.expect("restore");
        assert_eq!((vm.observed_state, vm.snapshot_id, vm.spec), (VmState::Running, Some(snapshot.id), snapshot.spec));
        clones.push((vm.clone(), f.host.identity_of(vm.id).expect("identity set")));
    }
    let [(a, ia), (b, ib)] = [clones[0].clone(), clones[1].clone()];
    assert_eq!((ia.hostname.as_str(), ib.hostname.as_str()), ("c1", "c2"));
    let (na, nb) = (ia.network.clone().expect("network"), ib.network.clone().expect("network"));
    assert_ne!(na.mac, nb.mac);
    assert_ne!(na.address, nb.address);
    assert_eq!(na.address, format!("{}/24", a.ip.expect("ip")));
    assert_ne!(ia.machine_id, ib.machine_id);
    assert_ne!(ia.entropy, ib.entropy);
    assert_ne!(a.vsock_cid, b.vsock_cid);

    // A shape other than the snapshot's is refused; so is a create that does not start.
    let mut bigger = create("c3");
    bigger.image = None;
    bigger.spec = VmSpec { vcpus: 0, memory_mib: 512, disk_bytes: 0 };
    bigger.snapshot = Some("base".into());
    let refused = f.ops.create_vm(bigger).await.expect_err("memory differs");
    assert!(matches!(refused, Error::InvalidArgument(_)), "{refused:?}");

    // A clone maps the snapshot's memory: it is snapshotted once it booted on its own.
    let refused = f.ops.snapshot_vm(take("c1", "second", SnapshotAfter::Resume)).await.expect_err("restored");
    assert!(matches!(refused, Error::SnapshotUnsupported { .. }), "{refused:?}");
    // The source booted again from its disk (over the snapshot's): a second snapshot of it
    // overlays the first, whose files its VMMs read too, and holds it.
    f.ops.start_vm("src", true).await.expect("start");
    let (second, _) = f.ops.snapshot_vm(take("src", "second", SnapshotAfter::Resume)).await.expect("second");
    assert_eq!(second.base, Some(snapshot.id));
    assert_eq!(f.ops.snapshot_groups(second.id).await.expect("chain").len(), 0, "the fake runs as the daemon");

    // Refused while VMs (or snapshots of them) depend on it; gone with its files once none does.
    let in_use = f.ops.delete_snapshot("base").await.expect_err("in use");
    assert!(matches!(in_use, Error::SnapshotInUse { vms: 3, .. }), "{in_use:?}");
    for name in ["c1", "c2", "src"] {
        f.ops.delete_vm(name).await.expect("delete");
    }
    let in_use = f.ops.delete_snapshot("base").await.expect_err("the second overlays it");
    assert!(matches!(in_use, Error::SnapshotInUse { vms: 1, .. }), "{in_use:?}");
    f.ops.delete_snapshot("second").await.expect("delete the second");
    f.ops.delete_snapshot("base").await.expect("delete the snapshot");
    assert!(!snapshot.dir.exists());
    assert!(f.host.processes().is_empty() && f.host.kernel_state().0.is_empty(), "{:?}", f.host.processes());
}

fn restore(name: &str, snapshot: &str, wait_agent: bool) -> CreateVm {
    CreateVm {
        image: None,
        spec: VmSpec { vcpus: 0, memory_mib: 0, disk_bytes: 0 },
        snapshot: Some(snapshot.into()),
        wait_agent,
        ..create(name)
    }
}

#[tokio::test]
async fn a_vmm_that_writes_memory_at_a_save_snapshots_clones_and_a_guest_without_an_agent_is_restored_untold() {
    use crate::domain::SnapshotAfter;
    let f = networked_fixture().await;
    // As Firecracker: guests run on memory of the VMM's own (the fake refuses a memory
    // file to share), and a save writes it.
    f.host.write_memory_on_save();
    f.ops.create_vm(create("src")).await.expect("create");
    let (snapshot, src) = f.ops.snapshot_vm(take("src", "base", SnapshotAfter::Resume)).await.expect("snapshot");
    assert_eq!(std::fs::read(snapshot.paths().memory).expect("memory"), b"guest memory");
    assert!(!src.paths().dir.join("snapshot.memory").exists(), "the saved memory moved into the snapshot");
    assert_eq!((src.observed_state, src.snapshot_id), (VmState::Running, Some(snapshot.id)));
    assert_eq!(f.host.identity_of(src.id).expect("told").hostname, "src");

    // A clone runs on the snapshot's memory mapped private; this VMM saves it again.
    let clone = f.ops.create_vm(restore("c1", "base", true)).await.expect("restore");
    assert_eq!(f.host.identity_of(clone.id).expect("told").hostname, "c1");
    let (second, _) = f.ops.snapshot_vm(take("c1", "second", SnapshotAfter::Stop)).await.expect("a clone's snapshot");
    assert!(!second.without_agent);

    // Without an agent: nothing in the guest is synced or closed (both would fail here).
    f.host.fail_next("agents.sync_guest");
    f.host.fail_next("agents.quiesce");
    let bare = super::TakeSnapshot { without_agent: true, ..take("src", "bare", SnapshotAfter::Resume) };
    let (bare, src) = f.ops.snapshot_vm(bare).await.expect("snapshot without an agent");
    assert!(bare.without_agent && f.ops.get_snapshot("bare").await.expect("get").snapshot.without_agent);
    assert_eq!(src.observed_state, VmState::Running);
    // Its VMs are created without waiting for an agent, and are told nothing.
    let refused = f.ops.create_vm(restore("c2", "bare", true)).await.expect_err("waits for an agent");
    assert!(matches!(&refused, Error::InvalidArgument(v) if v[0].field == "no_wait"), "{refused:?}");
    let untold = f.ops.create_vm(restore("c3", "bare", false)).await.expect("restore without an agent");
    assert_eq!((untold.observed_state, untold.snapshot_id), (VmState::Running, Some(bare.id)));
    assert!(f.host.identity_of(untold.id).is_none(), "a guest without an agent was told an identity");
    // A snapshot taken with the agent is never restored without telling the clone.
    let refused = f.ops.create_vm(restore("c4", "base", false)).await.expect_err("untold");
    assert!(matches!(&refused, Error::InvalidArgument(v) if v[0].field == "no_wait"), "{refused:?}");
    // A pool's claims tell members their identity: not from this snapshot.
    let pool = super::NewPool {
        name: "bare".into(),
        image: None,
        spec: VmSpec { vcpus: 0, memory_mib: 0, disk_bytes: 0 },
        egress: Default::default(),
        size: 1,
        snapshot: Some("bare".into()),
    };
    let refused = f.ops.create_pool(pool).await.expect_err("pool without an agent");
    assert!(matches!(&refused, Error::InvalidArgument(v) if v[0].field == "snapshot"), "{refused:?}");

    for vm in ["c3", "c1", "src"] {
        f.ops.delete_vm(vm).await.expect("delete");
    }
    for snapshot in ["bare", "second", "base"] {
        f.ops.delete_snapshot(snapshot).await.expect("delete the snapshot");
    }
    assert!(f.host.processes().is_empty() && f.host.kernel_state().0.is_empty(), "{:?}", f.host.processes());
}

#[tokio::test]
async fn a_snapshot_cut_short_by_a_crash_is_rolled_back_or_finished_at_startup() {
    use crate::domain::{Snapshot, SnapshotId};
    let f = fixture().await;
    let src = f.ops.create_vm(create("src")).await.expect("create");
    std::fs::write(src.paths().root_disk, b"data").expect("disk");
    let unfinished = |name: &str| {
        let id = SnapshotId::generate();
        Snapshot {
            id,
            name: name.into(),
            source_vm_id: src.id,
            source_vm_name: "src".into(),
            image_id: src.image_id,
            spec: src.spec,
            egress: Default::default(),
            root_disk: src.root_disk,
            networked: false,
            labels: Default::default(),
            dir: f.ops.snapshots_dir().join(id.to_string()),
            group: 0,
            ready: false,
            created_at_ms: 0,
            last_operation: "op".into(),
            base: None,
            without_agent: false,
        }
    };
    // Killed after the disk was frozen and a new overlay made, before the VM named it.
    let cut = f.ops.store.snapshot_insert(&unfinished("cut")).await.expect("record");
    std::fs::create_dir_all(&cut.dir).expect("dir");
    std::fs::rename(src.paths().root_disk, cut.paths().disk).expect("freeze");
    std::fs::write(src.paths().root_disk, b"new overlay").expect("overlay");
    f.host.pause_for_tests(&src.paths());
    f.ops.recover_snapshots().await.expect("recover");
    assert!(f.ops.store.snapshot_get("cut").await.is_err(), "rolled back");
    assert!(!cut.dir.exists());
    assert_eq!(std::fs::read(src.paths().root_disk).expect("disk"), b"data", "the disk is back");
    assert!(!f.host.is_paused(&src.paths()), "the source runs on");

    // Killed after the VM named it: finished.
    let named = f.ops.store.snapshot_insert(&unfinished("named")).await.expect("record");
    let update = crate::store::VmUpdate { snapshot_id: Some(named.id), ..Default::default() };
    f.ops.store.vm_update(&src, update).await.expect("depends");
    f.ops.recover_snapshots().await.expect("recover");
    assert!(f.ops.store.snapshot_get("named").await.expect("kept").ready);
}

#[tokio::test]
async fn a_pool_filled_from_a_snapshot_restores_its_members_and_serves_creates_from_it() {
    use crate::domain::SnapshotAfter;
    let f = networked_fixture().await;
    f.ops.create_vm(create("src")).await.expect("create");
    let (snapshot, _) = f.ops.snapshot_vm(take("src", "base", SnapshotAfter::Stop)).await.expect("snapshot");
    let new = super::NewPool {
        name: "restored".into(),
        image: None,
        spec: VmSpec { vcpus: 0, memory_mib: 0, disk_bytes: 0 },
        egress: Default::default(),
        size: 2,
        snapshot: Some("base".into()),
    };
    let pool = f.ops.create_pool(new).await.expect("pool");
    assert_eq!((pool.snapshot, pool.spec), (Some(snapshot.id), snapshot.spec));
    f.ops.refill_pools().await.expect("refill");
    f.ops.refill_pools().await.expect("refill");
    let (_, members) = f.ops.get_pool("restored").await.expect("pool");
    assert_eq!(members.len(), 2);
    let mut addresses = std::collections::BTreeSet::new();
    for member in &members {
        assert_eq!(member.vm.snapshot_id, Some(snapshot.id), "restored, not booted");
        let identity = f.host.identity_of(member.vm.id).expect("told its identity at its restore");
        assert!(addresses.insert(identity.network.expect("network").address), "members share an address");
    }
    // A create from the snapshot claims a member (renamed); one without boots.
    let mut request = create("job");
    request.image = None;
    request.spec = VmSpec { vcpus: 0, memory_mib: 0, disk_bytes: 0 };
    request.snapshot = Some("base".into());
    let job = f.ops.create_vm(request).await.expect("claim");
    assert!(members.iter().any(|m| m.vm.id == job.id), "served by a member");
    assert_eq!(f.host.identity_of(job.id).expect("renamed").hostname, "job");
    let booted = f.ops.create_vm(create("booted")).await.expect("boot");
    assert!(!members.iter().any(|m| m.vm.id == booted.id));
    // The pool holds the snapshot too.
    let in_use = f.ops.delete_snapshot("base").await.expect_err("pool");
    assert!(matches!(in_use, Error::SnapshotInUse { .. }), "{in_use:?}");
    f.ops.delete_pool("restored").await.expect("delete pool");
    for vm in ["job", "booted", "src"] {
        f.ops.delete_vm(vm).await.expect("delete");
    }
    f.ops.delete_snapshot("base").await.expect("nothing depends on it");
}
