//! The raw side of the A/B: what a script does to run `true` in the same guest without banger.
//! It launches the very command lines bangerd used for a VM (read from `/proc` while that VM
//! runs), over the same image, with the same agent: a root disk made by `qemu-img` (or `cp`
//! for a raw disk), `vhost-device-vsock`, QEMU (not paused: no cgroup to join first), then
//! `true` through the guest agent's own gRPC API once the agent announces itself on the
//! console, authenticated as bangerd authenticates it (a key of its own in an archive before
//! the image's initramfs). Nothing of the daemon runs on this path.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use banger_server::{
    domain::{ExecCommand, ExecEvent, ExitStatus},
    host::{
        agent::AgentClient,
        agent_channel::AGENT_ANNOUNCEMENT,
        agent_key::{self, AgentKey},
        exec,
    },
};
use tokio_stream::StreamExt;

use crate::Error;

/// The command lines of one VM bangerd booted, to replay with other paths.
#[derive(Debug, Clone)]
pub struct Template {
    vm_dir: String,
    qemu: Vec<OsString>,
    backend: Vec<OsString>,
    disk_format: String,
    base: PathBuf,
    initrd: Option<PathBuf>,
}

fn cmdline(pid: u32) -> Result<Vec<OsString>, Error> {
    use std::os::unix::ffi::OsStrExt;
    let raw = std::fs::read(format!("/proc/{pid}/cmdline"))?;
    Ok(raw.split(|b| *b == 0).filter(|a| !a.is_empty()).map(|a| std::ffi::OsStr::from_bytes(a).to_owned()).collect())
}

impl Template {
    /// Reads the command lines of the running VM whose directory is `vm_dir` and whose VMM is
    /// `vmm_pid`; `base` is its image's root file system, `initrd` its initramfs.
    pub fn capture(vm_dir: &Path, vmm_pid: u32, base: PathBuf, initrd: Option<PathBuf>) -> Result<Self, Error> {
        let handles: serde_json::Value = serde_json::from_slice(&std::fs::read(vm_dir.join("handles.json"))?)?;
        let backend_pid = handles["vsock_backend"]["pid"].as_u64().ok_or("the vm has no vsock backend")? as u32;
        let qemu = cmdline(vmm_pid)?;
        let backend = cmdline(backend_pid)?;
        let drive = qemu
            .iter()
            .filter_map(|a| a.to_str())
            .find(|a| a.starts_with("id=root,"))
            .ok_or("no root drive on the qemu command line")?;
        let disk_format = drive.split(',').find_map(|kv| kv.strip_prefix("format=")).unwrap_or("raw").to_owned();
        Ok(Self { vm_dir: vm_dir.display().to_string(), qemu, backend, disk_format, base, initrd })
    }

    fn rewrite(&self, args: &[OsString], dir: &Path) -> Vec<OsString> {
        let dir = dir.display().to_string();
        args.iter()
            .filter(|a| *a != "-S")
            .map(|a| a.to_str().map(|s| OsString::from(s.replace(&self.vm_dir, &dir))).unwrap_or_else(|| a.clone()))
            .collect()
    }
}

/// The processes of one raw run, killed when it is dropped.
struct Running(Vec<Child>);

impl Drop for Running {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn spawn(args: &[OsString], log: &Path) -> Result<Child, Error> {
    let (program, args) = args.split_first().ok_or("empty command line")?;
    let log = std::fs::File::create(log)?;
    Ok(Command::new(program).args(args).stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log).spawn()?)
}

fn run_tool(program: &str, args: &[&std::ffi::OsStr]) -> Result<(), Error> {
    let output = Command::new(program).args(args).output()?;
    if !output.status.success() {
        return Err(format!("{program}: {}", String::from_utf8_lossy(&output.stderr)).into());
    }
    Ok(())
}

/// One raw run in a fresh `dir`: from nothing to `true` having exited 0 in the guest.
/// Returns its wall time; the processes and `dir` are removed afterwards, outside it.
pub async fn run_true(template: &Template, dir: &Path) -> Result<Duration, Error> {
    let started = Instant::now();
    std::fs::create_dir_all(dir)?;
    let qemu_args = template.rewrite(&template.qemu, dir);
    let disk = qemu_args
        .iter()
        .filter_map(|a| a.to_str())
        .find(|a| a.starts_with("id=root,"))
        .and_then(|drive| drive.split(',').find_map(|kv| kv.strip_prefix("file=")))
        .map(PathBuf::from)
        .ok_or("no root drive file on the qemu command line")?;
    if template.disk_format == "qcow2" {
        let base = template.base.as_os_str();
        let args = ["create", "-q", "-f", "qcow2", "-b"].map(std::ffi::OsStr::new);
        run_tool("qemu-img", &[&args[..], &[base, "-F".as_ref(), "raw".as_ref(), disk.as_os_str()]].concat())?;
    } else {
        let args = ["--reflink=auto", "--sparse=always"].map(std::ffi::OsStr::new);
        run_tool("cp", &[&args[..], &[template.base.as_os_str(), disk.as_os_str()]].concat())?;
    }
    // The agent's key, as bangerd gives it: in an archive before the image's initramfs.
    let boot_initrd = qemu_args.iter().skip_while(|a| *a != "-initrd").nth(1).map(PathBuf::from);
    let key = match (&template.initrd, boot_initrd) {
        (Some(image_initrd), Some(boot_initrd)) => {
            let key = AgentKey::generate()?;
            agent_key::write_boot_initrd(&key, image_initrd, &boot_initrd, None)?;
            Some(key)
        }
        _ => None,
    };
    let backend_args = template.rewrite(&template.backend, dir);
    let mut running = Running(vec![spawn(&backend_args, &dir.join("vsock-backend.log"))?]);
    let vhost_user_socket = backend_args
        .iter()
        .filter_map(|a| a.to_str())
        .find_map(|a| a.split(',').find_map(|kv| kv.strip_prefix("socket=")))
        .map(PathBuf::from)
        .ok_or("no socket= on the backend's command line")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !vhost_user_socket.exists() {
        if Instant::now() > deadline {
            return Err("vhost-device-vsock did not make its socket".into());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    running.0.push(spawn(&qemu_args, &dir.join("vmm.log"))?);
    let console = dir.join("console.log");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(&console).is_ok_and(|log| log.contains(AGENT_ANNOUNCEMENT)) {
        if Instant::now() > deadline {
            return Err(format!("the raw guest's agent did not announce itself; see {}", console.display()).into());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let agent = AgentClient::new(
        backend_args
            .iter()
            .filter_map(|a| a.to_str())
            .find_map(|a| a.split(',').find_map(|kv| kv.strip_prefix("uds-path=")))
            .map(PathBuf::from)
            .ok_or("no uds-path= on the backend's command line")?,
        key,
    );
    agent.wait_ready(tokio::time::Instant::now() + Duration::from_secs(30), || true).await?;
    let command = ExecCommand {
        argv: vec!["true".into()],
        env: Vec::new(),
        working_dir: String::new(),
        stdin: false,
        timeout_seconds: 0,
        user: String::new(),
        terminal: None,
    };
    let mut events = Box::pin(exec::exec(agent, command, tokio_stream::empty()).await?);
    let mut status = None;
    while let Some(event) = events.next().await {
        if let ExecEvent::Exit { status: exit, .. } = event? {
            status = Some(exit);
        }
    }
    let elapsed = started.elapsed();
    if status != Some(ExitStatus::Code(0)) {
        return Err(format!("`true` in the raw guest ended with {status:?}").into());
    }
    drop(running);
    let _ = std::fs::remove_dir_all(dir);
    Ok(elapsed)
}
