//! The `banger.agent.v1.AgentService` implementation: Ready, Info and Shutdown here, Exec in
//! `exec`, ReadFile and WriteFile in `files`.

use std::time::Duration;

use banger_proto::agent::v1::agent_service_server::AgentService;
use banger_proto::agent::v1::{
    ExecRequest, InfoRequest, InfoResponse, ReadFileRequest, ReadyRequest, ReadyResponse, SetIdentityRequest,
    SetIdentityResponse, ShutdownRequest, ShutdownResponse, SyncRequest, SyncResponse, WriteFileRequest,
    WriteFileResponse,
};
use tonic::{Request, Response, Status, Streaming};

use crate::exec::{self, ExecStream};
use crate::files::{self, ReadStream};

/// How long Shutdown waits before powering off, so that tonic can flush its reply to the host.
const SHUTDOWN_REPLY_GRACE: Duration = Duration::from_millis(100);

/// What Shutdown does once it has replied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownAction {
    /// `sync()` then `reboot(RB_POWER_OFF)`: the guest powers off (QEMU exits under `-no-reboot`).
    PowerOff,
    /// `sync()` then exit the agent process: used when serving on a host unix socket for tests,
    /// where powering off would take the host down.
    ExitProcess,
}

/// The agent's gRPC service.
#[derive(Debug)]
pub struct Agent {
    shutdown_action: ShutdownAction,
}

impl Agent {
    /// Creates the service; `shutdown_action` decides what the Shutdown call does.
    pub fn new(shutdown_action: ShutdownAction) -> Self {
        Self { shutdown_action }
    }
}

#[tonic::async_trait]
impl AgentService for Agent {
    async fn ready(&self, _: Request<ReadyRequest>) -> Result<Response<ReadyResponse>, Status> {
        root_usable()?;
        Ok(Response::new(ReadyResponse { uptime_seconds: uptime_seconds()? }))
    }

    async fn info(&self, _: Request<InfoRequest>) -> Result<Response<InfoResponse>, Status> {
        let hostname = nix::unistd::gethostname()
            .map_err(|err| Status::internal(format!("gethostname: {err}")))?
            .to_string_lossy()
            .into_owned();
        let kernel_release = tokio::fs::read_to_string("/proc/sys/kernel/osrelease")
            .await
            .map_err(|err| Status::internal(format!("reading the kernel release: {err}")))?
            .trim()
            .to_owned();
        Ok(Response::new(InfoResponse {
            hostname,
            kernel_release,
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            uptime_seconds: uptime_seconds()?,
        }))
    }

    type ExecStream = ExecStream;

    async fn exec(&self, request: Request<Streaming<ExecRequest>>) -> Result<Response<Self::ExecStream>, Status> {
        exec::start(request.into_inner()).await.map(Response::new)
    }

    type ReadFileStream = ReadStream;

    async fn read_file(&self, request: Request<ReadFileRequest>) -> Result<Response<Self::ReadFileStream>, Status> {
        let request = request.into_inner();
        files::read(&request.path, request.archive).await.map(Response::new)
    }

    async fn write_file(
        &self,
        request: Request<Streaming<WriteFileRequest>>,
    ) -> Result<Response<WriteFileResponse>, Status> {
        files::write(request.into_inner()).await.map(Response::new)
    }

    async fn set_identity(
        &self,
        request: Request<SetIdentityRequest>,
    ) -> Result<Response<SetIdentityResponse>, Status> {
        // A few ioctls and two small file writes: done in place. On a guest just restored
        // from a snapshot, handing them to a blocking thread would first start one (the
        // pool's idle threads are gone), a cost paid on the path to the VM being ready.
        let presented = request.extensions().get::<crate::auth::Presented>().copied();
        let presented = presented.ok_or_else(|| Status::unauthenticated("the host's key is missing or wrong"))?;
        apply_identity(&request.into_inner(), presented.0)?;
        Ok(Response::new(SetIdentityResponse {}))
    }

    async fn sync(&self, _: Request<SyncRequest>) -> Result<Response<SyncResponse>, Status> {
        tokio::task::spawn_blocking(nix::unistd::sync).await.map_err(|err| Status::internal(format!("sync: {err}")))?;
        log!("file systems synced");
        Ok(Response::new(SyncResponse {}))
    }

    async fn shutdown(&self, _: Request<ShutdownRequest>) -> Result<Response<ShutdownResponse>, Status> {
        let action = self.shutdown_action;
        log!("shutdown requested ({action:?})");
        tokio::spawn(async move {
            tokio::time::sleep(SHUTDOWN_REPLY_GRACE).await;
            // sync() and reboot() block; keep them off the runtime's worker threads.
            let _ = tokio::task::spawn_blocking(move || power_off(action)).await;
        });
        Ok(Response::new(ShutdownResponse {}))
    }
}

/// Applies an identity told with the key `presented`, then takes the new key it carries (an
/// identity that cannot be applied changes no key).
pub fn apply_identity(request: &SetIdentityRequest, presented: crate::auth::Key) -> Result<(), Status> {
    // The host's way to ready is Ready or an identity: either says why the guest is unusable.
    root_usable()?;
    let new_key = crate::auth::new_key(&request.agent_key)?;
    crate::identity::apply(request)?;
    if let Some(new_key) = new_key {
        crate::auth::rotate(new_key, presented);
    }
    Ok(())
}

/// FAILED_PRECONDITION, saying why, when the guest's root could not be set up as init.
fn root_usable() -> Result<(), Status> {
    match crate::guest_root::problem() {
        Some(problem) => {
            Err(Status::failed_precondition(format!("the guest's root file system is not usable: {problem}")))
        }
        None => Ok(()),
    }
}

/// Flushes file systems, then powers off or exits; returns only if power-off failed.
fn power_off(action: ShutdownAction) {
    nix::unistd::sync();
    match action {
        ShutdownAction::PowerOff => {
            let Err(err) = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
            log!("power-off failed: {err}");
        }
        ShutdownAction::ExitProcess => std::process::exit(0),
    }
}

/// Seconds since boot, as the first field of `/proc/uptime` counts them (`CLOCK_BOOTTIME`),
/// read without a file or a blocking thread: Ready is the first call a booted or restored
/// guest answers.
fn uptime_seconds() -> Result<f64, Status> {
    let mut now = nix::libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec it is given.
    if unsafe { nix::libc::clock_gettime(nix::libc::CLOCK_BOOTTIME, &mut now) } != 0 {
        return Err(Status::internal(format!("clock_gettime: {}", std::io::Error::last_os_error())));
    }
    Ok(now.tv_sec as f64 + now.tv_nsec as f64 / 1e9)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uptime_agrees_with_proc_uptime() {
        let text = std::fs::read_to_string("/proc/uptime").expect("/proc/uptime");
        let from_file: f64 = text.split_whitespace().next().and_then(|f| f.parse().ok()).expect("uptime");
        let from_clock = uptime_seconds().expect("clock");
        // /proc/uptime has two decimals and was read first.
        assert!(from_clock >= from_file - 0.01 && from_clock - from_file < 5.0, "{from_clock} vs {from_file}");
    }
}
