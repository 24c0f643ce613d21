//! `banger.v1.SnapshotService`: snapshots (see `ops::snapshots`). A confined caller sees
//! only its tenant's snapshots (those carrying its labels, as its VMs do) and snapshots only
//! the VMs it sees.

use std::sync::Arc;

use banger_proto::v1::{self as pb, snapshot_service_server::SnapshotService};
use tonic::{Request, Response, Status};

use super::{
    convert,
    idempotency::Idempotency,
    run_to_completion,
    status::to_status,
    vm_service::{tenant_idempotency_key, tenant_of, visible_vm},
    with_op_id,
};
use crate::{
    domain::{Resource, SnapshotAfter, access::Tenant, vm_name_error},
    ops::{Error, FieldViolation, Ops, SnapshotInfo, TakeSnapshot},
};

/// Serves snapshots over the daemon's core.
#[derive(Debug, Clone)]
pub struct SnapshotApi {
    ops: Arc<Ops>,
    idempotency: Idempotency,
}

impl SnapshotApi {
    /// The service over `ops`, recording idempotent requests in `idempotency`.
    pub fn new(ops: Arc<Ops>, idempotency: Idempotency) -> Self {
        Self { ops, idempotency }
    }

    /// The snapshot `key` names, when the caller may see it; else not found, as if absent.
    async fn visible(&self, key: String, tenant: Option<&Tenant>) -> Result<SnapshotInfo, Error> {
        let info = self.ops.get_snapshot(&key).await?;
        match tenant {
            Some(tenant) if !tenant.admits(&info.snapshot.labels) => {
                Err(Error::NotFound { kind: Resource::Snapshot, key })
            }
            _ if !info.snapshot.ready => Err(Error::NotFound { kind: Resource::Snapshot, key }),
            _ => Ok(info),
        }
    }
}

/// A snapshot as the API shows it.
fn to_pb(info: &SnapshotInfo) -> pb::Snapshot {
    let snapshot = &info.snapshot;
    pb::Snapshot {
        id: snapshot.id.to_string(),
        name: snapshot.name.clone(),
        source_vm_id: snapshot.source_vm_id.to_string(),
        source_vm_name: snapshot.source_vm_name.clone(),
        image_id: snapshot.image_id.to_string(),
        vcpus: snapshot.spec.vcpus,
        memory_mib: snapshot.spec.memory_mib,
        disk_size_bytes: snapshot.spec.disk_bytes,
        egress: Some(convert::egress(&snapshot.egress)),
        labels: snapshot.labels.clone(),
        create_time: Some(convert::timestamp(snapshot.created_at_ms)),
        stored_bytes: info.stored_bytes,
        dependents: info.dependents,
        last_operation: snapshot.last_operation.clone(),
        without_agent: snapshot.without_agent,
    }
}

/// Validates a snapshot request.
fn take_snapshot(request: pb::SnapshotVmRequest) -> Result<TakeSnapshot, Error> {
    let mut violations = Vec::new();
    if request.vm.trim().is_empty() {
        violations.push(FieldViolation::new("vm", "must name a vm by id or name"));
    }
    if let Err(e) = vm_name_error(&request.name) {
        violations.push(FieldViolation::new("name", e.to_string()));
    }
    if let Err(e) = crate::domain::labels_error(&request.labels) {
        violations.push(FieldViolation::new("labels", e.to_string()));
    }
    let after = match pb::SnapshotAfter::try_from(request.after) {
        Ok(pb::SnapshotAfter::Unspecified | pb::SnapshotAfter::Resume) => SnapshotAfter::Resume,
        Ok(pb::SnapshotAfter::Stop) => SnapshotAfter::Stop,
        Err(_) => {
            violations.push(FieldViolation::new("after", format!("{} is not a SnapshotAfter", request.after)));
            SnapshotAfter::Resume
        }
    };
    if !violations.is_empty() {
        return Err(Error::InvalidArgument(violations));
    }
    Ok(TakeSnapshot {
        vm: request.vm,
        name: request.name,
        labels: request.labels,
        after,
        without_agent: request.without_agent,
    })
}

#[tonic::async_trait]
impl SnapshotService for SnapshotApi {
    async fn snapshot_vm(
        &self,
        request: Request<pb::SnapshotVmRequest>,
    ) -> Result<Response<pb::SnapshotVmResponse>, Status> {
        let tenant = tenant_of(&request);
        let mut request = request.into_inner();
        if let Some(tenant) = &tenant {
            request.labels.extend(tenant.labels().clone());
        }
        let (request_id, body) = tenant_idempotency_key(&request, tenant.as_ref(), |r| &mut r.request_id);
        let mut take = take_snapshot(request).map_err(|e| to_status(&e))?;
        let ops = self.ops.clone();
        let once = async move {
            // A confined caller reaches only its own VMs, by id.
            let vm = visible_vm(&ops, take.vm.clone(), tenant.as_ref()).await.map_err(|e| to_status(&e))?;
            take.vm = vm.id.to_string();
            let use_ops = ops.clone();
            let (snapshot, vm) = run_to_completion(async move { use_ops.snapshot_vm(take).await }).await?;
            let info = ops.get_snapshot(&snapshot.id.to_string()).await.map_err(|e| to_status(&e))?;
            let vm_pb = convert::vm(&vm, &ops.handles(&vm), ops.vmm_name());
            let response = pb::SnapshotVmResponse { snapshot: Some(to_pb(&info)), vm: Some(vm_pb) };
            Ok(with_op_id(response, &snapshot.last_operation))
        };
        self.idempotency.run("SnapshotVm", &request_id, body, once).await
    }

    async fn get_snapshot(
        &self,
        request: Request<pb::GetSnapshotRequest>,
    ) -> Result<Response<pb::GetSnapshotResponse>, Status> {
        let tenant = tenant_of(&request);
        let key = convert::key("snapshot", &request.into_inner().snapshot).map_err(|e| to_status(&e))?;
        let info = self.visible(key, tenant.as_ref()).await.map_err(|e| to_status(&e))?;
        Ok(Response::new(pb::GetSnapshotResponse { snapshot: Some(to_pb(&info)) }))
    }

    async fn list_snapshots(
        &self,
        request: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<pb::ListSnapshotsResponse>, Status> {
        let tenant = tenant_of(&request);
        let labels = convert::label_selector(request.into_inner().labels).map_err(|e| to_status(&e))?;
        let labels = match tenant.map(|tenant| tenant.confine(labels.clone())) {
            None => labels,
            Some(Some(confined)) => confined,
            Some(None) => return Ok(Response::new(pb::ListSnapshotsResponse { snapshots: Vec::new() })),
        };
        let infos = self.ops.list_snapshots(&labels).await.map_err(|e| to_status(&e))?;
        Ok(Response::new(pb::ListSnapshotsResponse { snapshots: infos.iter().map(to_pb).collect() }))
    }

    async fn delete_snapshot(
        &self,
        request: Request<pb::DeleteSnapshotRequest>,
    ) -> Result<Response<pb::DeleteSnapshotResponse>, Status> {
        let tenant = tenant_of(&request);
        let key = convert::key("snapshot", &request.into_inner().snapshot).map_err(|e| to_status(&e))?;
        let info = self.visible(key, tenant.as_ref()).await.map_err(|e| to_status(&e))?;
        let (ops, id) = (self.ops.clone(), info.snapshot.id.to_string());
        run_to_completion(async move { ops.delete_snapshot(&id).await }).await?;
        Ok(Response::new(pb::DeleteSnapshotResponse {}))
    }
}
