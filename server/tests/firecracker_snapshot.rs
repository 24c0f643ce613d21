//! Firecracker's snapshot API with the real binary (`make setup` installs it) and a toy guest
//! (stock kernels do not boot under this host class's KVM; a guest assembled here does): a
//! guest counting on its console is paused, saved with `PUT /snapshot/create`, its
//! Firecracker killed, and loaded into a new one with `PUT /snapshot/load`, whose console
//! goes on counting without the guest's boot marker: memory restored, not booted. The
//! memory file is mapped private, so it stays as it was saved.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use banger_server::host::vmm::{
    firecracker::FirecrackerVmm,
    firecracker_api::{
        ApiRequest, BootSource, FirecrackerApi, InstanceActionInfo, MachineConfig, RunState, VmRunState,
    },
};
use banger_tests::{
    sha256, skip,
    toy::{MARKER, Then, toy_kernel},
};

/// A Firecracker process, killed by its PID and reaped when dropped.
struct Firecracker {
    child: Child,
    socket: PathBuf,
    console: PathBuf,
}

impl Firecracker {
    fn start(binary: &Path, dir: &Path, name: &str) -> Self {
        let (socket, console) = (dir.join(format!("{name}.sock")), dir.join(format!("{name}.console")));
        let output = std::fs::File::create(&console).expect("console");
        let child = Command::new(binary)
            .arg("--api-sock")
            .arg(&socket)
            .stdin(Stdio::null())
            .stdout(output.try_clone().expect("console"))
            .stderr(output)
            .spawn()
            .expect("firecracker");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "no api socket");
            std::thread::sleep(Duration::from_millis(5));
        }
        Self { child, socket, console }
    }

    fn api(&self) -> FirecrackerApi {
        FirecrackerApi::new(&self.socket)
    }

    /// The guest's console so far (Firecracker's own log lines are left out).
    fn guest_output(&self) -> String {
        let text = std::fs::read_to_string(&self.console).unwrap_or_default();
        text.lines().filter(|line| !line.contains("[anonymous-instance")).collect::<Vec<_>>().join("\n")
    }

    fn dots(&self) -> usize {
        self.guest_output().lines().filter(|line| *line == ".").count()
    }

    fn wait_for_dots(&self, count: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.dots() < count {
            assert!(Instant::now() < deadline, "the guest did not count: {}", self.guest_output());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Firecracker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn a_firecracker_guest_saved_then_loaded_into_a_new_process_runs_on_from_its_memory() {
    if !Path::new("/dev/kvm").exists() {
        skip("Firecracker needs /dev/kvm, which this host does not have");
        return;
    }
    let Some(binary) = banger_server::host::command::resolve_program(Path::new("firecracker")) else {
        skip("firecracker is not installed (make setup installs it)");
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let kernel = toy_kernel(dir.path(), Then::Count);

    let source = Firecracker::start(&binary, dir.path(), "source");
    let boot = [
        ApiRequest::PutMachineConfig(MachineConfig { vcpu_count: 1, mem_size_mib: 128, smt: None }),
        ApiRequest::PutBootSource(BootSource {
            kernel_image_path: kernel.display().to_string(),
            boot_args: "console=ttyS0".into(),
            initrd_path: None,
        }),
        ApiRequest::PutAction(InstanceActionInfo {
            action_type: banger_server::host::vmm::firecracker_api::ActionType::InstanceStart,
        }),
    ];
    for request in &boot {
        source.api().send(request).await.expect("boot");
    }
    source.wait_for_dots(5);
    assert!(source.guest_output().contains(MARKER), "booted: {}", source.guest_output());

    let pause = ApiRequest::PatchVm(VmRunState { state: RunState::Paused });
    source.api().send(&pause).await.expect("pause");
    let (state, memory) = (dir.path().join("state"), dir.path().join("memory"));
    FirecrackerVmm::create_snapshot(&source.socket, &state, &memory).await.expect("snapshot");
    let saved = sha256(&memory);
    drop(source);

    let restored = Firecracker::start(&binary, dir.path(), "restored");
    FirecrackerVmm::load_snapshot(&restored.socket, &state, &memory, &[]).await.expect("load");
    restored.wait_for_dots(5);
    let output = restored.guest_output();
    assert!(!output.contains(MARKER), "the restored guest booted again: {output}");
    assert_eq!(sha256(&memory), saved, "the memory file is mapped private: never written");
}
