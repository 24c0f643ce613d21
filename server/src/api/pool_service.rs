//! `banger.v1.PoolService`: warm pools (see `ops::pools`).

use std::sync::Arc;

use banger_proto::v1::{self as pb, pool_service_server::PoolService};
use tonic::{Request, Response, Status};

use super::{convert, status::to_status};
use crate::{
    domain::{MAX_POOL_NAME_LEN, MAX_POOL_SIZE, Pool, vm_name_error},
    ops::{CreateVm, Error, FieldViolation, NewPool, Ops, PoolMember},
};

/// Serves warm pools over the daemon's core.
#[derive(Debug, Clone)]
pub struct PoolApi {
    ops: Arc<Ops>,
}

impl PoolApi {
    /// The service over `ops`.
    pub fn new(ops: Arc<Ops>) -> Self {
        Self { ops }
    }
}

/// A pool as the API shows it.
fn to_pb(pool: &Pool, members: &[PoolMember]) -> pb::Pool {
    let ready = members.iter().filter(|m| m.vm.observed_state == crate::domain::VmState::Running).count();
    pb::Pool {
        id: pool.id.to_string(),
        name: pool.name.clone(),
        image_id: pool.image_id.to_string(),
        vcpus: pool.spec.vcpus,
        memory_mib: pool.spec.memory_mib,
        disk_size_bytes: pool.spec.disk_bytes,
        egress: Some(convert::egress(&pool.egress)),
        size: pool.size,
        create_time: Some(convert::timestamp(pool.created_at_ms)),
        members: members
            .iter()
            .map(|member| pb::PoolMember {
                vm_id: member.vm.id.to_string(),
                vm_name: member.vm.name.clone(),
                state: convert::vm_state(member.vm.observed_state).into(),
                memory_bytes: member.memory_bytes.unwrap_or_default(),
            })
            .collect(),
        ready: ready as u32,
        snapshot_id: pool.snapshot.map(|id| id.to_string()).unwrap_or_default(),
    }
}

/// Validates a pool request: its own fields, and its members' shape as a create's.
fn new_pool(request: pb::CreatePoolRequest) -> Result<NewPool, Error> {
    let mut violations = Vec::new();
    if let Err(e) = vm_name_error(&request.name) {
        violations.push(FieldViolation::new("name", e.to_string()));
    } else if request.name.len() > MAX_POOL_NAME_LEN {
        violations.push(FieldViolation::new(
            "name",
            format!("must be at most {MAX_POOL_NAME_LEN} characters (members add 9), got {}", request.name.len()),
        ));
    }
    if !(1..=MAX_POOL_SIZE).contains(&request.size) {
        violations
            .push(FieldViolation::new("size", format!("must be between 1 and {MAX_POOL_SIZE}, got {}", request.size)));
    }
    let shape = pb::CreateVmRequest {
        image: request.image,
        vcpus: request.vcpus,
        memory_mib: request.memory_mib,
        disk_size_bytes: request.disk_size_bytes,
        egress: request.egress,
        snapshot: request.snapshot,
        ..Default::default()
    };
    let shape = match CreateVm::try_from(shape) {
        Ok(shape) => Some(shape),
        Err(Error::InvalidArgument(mut bad)) => {
            violations.append(&mut bad);
            None
        }
        Err(other) => return Err(other),
    };
    match shape {
        Some(shape) if violations.is_empty() => Ok(NewPool {
            name: request.name,
            image: shape.image,
            spec: shape.spec,
            egress: shape.egress,
            size: request.size,
            snapshot: shape.snapshot,
        }),
        _ => Err(Error::InvalidArgument(violations)),
    }
}

#[tonic::async_trait]
impl PoolService for PoolApi {
    async fn create_pool(
        &self,
        request: Request<pb::CreatePoolRequest>,
    ) -> Result<Response<pb::CreatePoolResponse>, Status> {
        let new = new_pool(request.into_inner()).map_err(|e| to_status(&e))?;
        let pool = self.ops.create_pool(new).await.map_err(|e| to_status(&e))?;
        Ok(Response::new(pb::CreatePoolResponse { pool: Some(to_pb(&pool, &[])) }))
    }

    async fn get_pool(&self, request: Request<pb::GetPoolRequest>) -> Result<Response<pb::GetPoolResponse>, Status> {
        let key = convert::key("pool", &request.into_inner().pool).map_err(|e| to_status(&e))?;
        let (pool, members) = self.ops.get_pool(&key).await.map_err(|e| to_status(&e))?;
        Ok(Response::new(pb::GetPoolResponse { pool: Some(to_pb(&pool, &members)) }))
    }

    async fn list_pools(
        &self,
        _request: Request<pb::ListPoolsRequest>,
    ) -> Result<Response<pb::ListPoolsResponse>, Status> {
        let pools = self.ops.list_pools().await.map_err(|e| to_status(&e))?;
        let pools = pools.iter().map(|(pool, members)| to_pb(pool, members)).collect();
        Ok(Response::new(pb::ListPoolsResponse { pools }))
    }

    async fn delete_pool(
        &self,
        request: Request<pb::DeletePoolRequest>,
    ) -> Result<Response<pb::DeletePoolResponse>, Status> {
        let key = convert::key("pool", &request.into_inner().pool).map_err(|e| to_status(&e))?;
        let ops = self.ops.clone();
        // A caller that goes away does not leave members half deleted.
        let pool = super::run_to_completion(async move { ops.delete_pool(&key).await }).await?;
        Ok(Response::new(pb::DeletePoolResponse { id: pool.id.to_string() }))
    }
}
