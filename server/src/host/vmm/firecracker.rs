//! Firecracker: launched with `--api-sock` (the VM's api socket), configured through its HTTP
//! API, started with `InstanceStart`. Its standard output is the guest's serial console; it
//! serves the guest's vsock itself as a hybrid unix socket.

use std::{ffi::OsString, path::PathBuf, time::Duration};

use super::{
    LaunchSpec, Vmm,
    firecracker_api::{
        ActionType, ApiRequest, BootSource, Drive, FirecrackerApi, FirecrackerApiError, InstanceActionInfo,
        MachineConfig, NetworkInterface, Vsock,
    },
};
use crate::{
    domain::{ProcessHandle, VmPaths},
    host::{
        HostError, command, last_log_line,
        process::{ProcFs, Processes},
    },
};

/// Launches and controls Firecracker microVMs.
#[derive(Debug, Clone)]
pub struct FirecrackerVmm {
    binary: PathBuf,
    processes: ProcFs,
}

impl FirecrackerVmm {
    /// Uses the given `firecracker` binary.
    pub fn new(binary: PathBuf, processes: ProcFs) -> Self {
        Self { binary, processes }
    }

    fn exited(&self, paths: &VmPaths) -> HostError {
        HostError::ProcessExited {
            process: "firecracker",
            detail: last_log_line(&paths.vmm_log),
            log: paths.vmm_log.clone(),
        }
    }

    /// Every request that configures and starts one VM, in order (sent by `boot`).
    pub fn configuration(launch: &LaunchSpec<'_>) -> Vec<ApiRequest> {
        let paths = launch.paths;
        let mut boot_args = String::from("console=ttyS0 reboot=k panic=1 pci=off root=/dev/vda rw");
        boot_args.push_str(&format!(" banger.hostname={}", launch.name));
        if let Some(nic) = launch.nic {
            boot_args.push_str(&format!(" banger.ip={} banger.gw={}", nic.address, nic.gateway));
        }
        if !launch.image.kernel_args.is_empty() {
            boot_args.push(' ');
            boot_args.push_str(&launch.image.kernel_args);
        }
        let mut requests = vec![
            ApiRequest::PutMachineConfig(MachineConfig {
                vcpu_count: launch.spec.vcpus,
                mem_size_mib: launch.spec.memory_mib,
                smt: None,
            }),
            ApiRequest::PutBootSource(BootSource {
                kernel_image_path: launch.image.kernel_path.display().to_string(),
                boot_args,
                initrd_path: launch.image.initrd_path.as_ref().map(|p| p.display().to_string()),
            }),
            ApiRequest::PutDrive(Drive {
                drive_id: "rootfs".into(),
                path_on_host: paths.root_disk.display().to_string(),
                is_root_device: true,
                is_read_only: false,
            }),
            ApiRequest::PutVsock(Vsock { guest_cid: launch.vsock_cid, uds_path: paths.vsock.display().to_string() }),
        ];
        if let Some(nic) = launch.nic {
            requests.push(ApiRequest::PutNetworkInterface(NetworkInterface {
                iface_id: "eth0".into(),
                host_dev_name: nic.tap.clone(),
                guest_mac: Some(nic.mac.clone()),
            }));
        }
        requests.push(ApiRequest::PutAction(InstanceActionInfo { action_type: ActionType::InstanceStart }));
        requests
    }
}

fn api_error(error: FirecrackerApiError) -> HostError {
    match error {
        FirecrackerApiError::Fault { method, path, fault_message, .. } => {
            HostError::VmmRefused { command: format!("{method} {path}"), message: fault_message }
        }
        other => HostError::Io { what: "firecracker api".into(), source: std::io::Error::other(other.to_string()) },
    }
}

#[tonic::async_trait]
impl Vmm for FirecrackerVmm {
    fn name(&self) -> &'static str {
        "firecracker"
    }

    async fn launch(&self, launch: &LaunchSpec<'_>) -> Result<ProcessHandle, HostError> {
        let paths = launch.paths;
        for stale in [&paths.api_socket, &paths.vsock] {
            let _ = std::fs::remove_file(stale);
        }
        let args: Vec<OsString> =
            vec!["--api-sock".into(), paths.api_socket.clone().into_os_string(), "--id".into(), launch.name.into()];
        tracing::debug!(binary = %self.binary.display(), args = ?args, "firecracker command line");
        let vmm = command::spawn_detached_split(&self.binary, &args, &paths.console_log, &paths.vmm_log)?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !paths.api_socket.exists() {
            if !self.processes.alive(&vmm, &paths.api_socket) {
                return Err(self.exited(paths));
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(HostError::Timeout { what: "firecracker api socket".into(), seconds: 10 });
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(vmm)
    }

    async fn boot(&self, launch: &LaunchSpec<'_>, vmm: &ProcessHandle) -> Result<(), HostError> {
        let paths = launch.paths;
        if !self.processes.alive(vmm, &paths.api_socket) {
            return Err(self.exited(paths));
        }
        // Configured, then started: once InstanceStart answers the guest runs (and may
        // already have finished, which reconcile then records).
        let api = FirecrackerApi::new(&paths.api_socket);
        for request in Self::configuration(launch) {
            api.send(&request).await.map_err(api_error)?;
        }
        Ok(())
    }

    async fn power_down(&self, paths: &VmPaths) -> Result<(), HostError> {
        let request = ApiRequest::PutAction(InstanceActionInfo { action_type: ActionType::SendCtrlAltDel });
        FirecrackerApi::new(&paths.api_socket).send(&request).await.map(drop).map_err(api_error)
    }
}
