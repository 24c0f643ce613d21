//! `banger.v1.HostService`.

use std::sync::Arc;

use banger_proto::v1::{self as pb, host_service_server::HostService};
use tonic::{Request, Response, Status};

use super::status::to_status;
use crate::{host::doctor::CheckStatus, ops::Ops};

/// Serves the host report over the daemon's core.
#[derive(Debug, Clone)]
pub struct HostApi {
    ops: Arc<Ops>,
}

impl HostApi {
    /// The service over `ops`.
    pub fn new(ops: Arc<Ops>) -> Self {
        Self { ops }
    }
}

#[tonic::async_trait]
impl HostService for HostApi {
    async fn get_host(&self, _request: Request<pb::GetHostRequest>) -> Result<Response<pb::GetHostResponse>, Status> {
        let (checks, choices) = self.ops.host_report().await.map_err(|e| to_status(&e))?;
        let checks = checks
            .into_iter()
            .map(|check| pb::HostCheck {
                name: check.name.to_owned(),
                status: match check.status {
                    CheckStatus::Pass => pb::HostCheckStatus::Pass,
                    CheckStatus::Warn => pb::HostCheckStatus::Warn,
                    CheckStatus::Fail => pb::HostCheckStatus::Fail,
                }
                .into(),
                detail: check.detail,
            })
            .collect();
        let choices = pb::HostChoices {
            vmm: choices.vmm,
            accel: choices.accel,
            accel_reason: choices.accel_reason,
            agent_channel: choices.agent_channel,
            root_disk: choices.root_disk,
            cgroup: choices.cgroup,
        };
        let defaults = self.ops.vm_defaults();
        let vm_defaults = pb::VmDefaults {
            vcpus: defaults.vcpus,
            memory_mib: defaults.memory_mib,
            disk_size_bytes: defaults.disk_bytes,
        };
        Ok(Response::new(pb::GetHostResponse { checks, choices: Some(choices), vm_defaults: Some(vm_defaults) }))
    }
}
