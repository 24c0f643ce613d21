//! Warm pools: N VMs of one shape booted ahead of time. A create of that shape claims a
//! ready member (`vm.create` with `pool_claim` and `guest_identity` instead of the boot
//! stages): the record takes the caller's name, labels and time to live, the guest its
//! hostname. The refiller boots replacements in the background, through the same admission
//! as any create. Members are ordinary VM records labelled `banger.pool`, so reconcile adopts
//! them after a restart like any VM.

use super::{
    CreateVm, Error, Ops,
    runner::{self, Operation, Subject},
};
use crate::{
    domain::{Egress, Image, Labels, OpId, Pool, PoolId, Vm, VmSpec, VmState},
    store::VmClaim,
};

/// A pool to make.
#[derive(Debug, Clone)]
pub struct NewPool {
    /// Its name (checked by the API).
    pub name: String,
    /// Image id or name; the default image when absent.
    pub image: Option<String>,
    /// Its members' shape.
    pub spec: VmSpec,
    /// Its members' egress policy.
    pub egress: Egress,
    /// How many members to keep booted.
    pub size: u32,
    /// The snapshot (id or name) its members are restored from instead of booted.
    pub snapshot: Option<String>,
}

/// A pool member as `GetPool` shows it.
#[derive(Debug, Clone)]
pub struct PoolMember {
    /// Its record.
    pub vm: Vm,
    /// What its VMM holds in memory, when it runs.
    pub memory_bytes: Option<u64>,
}

#[derive(Debug, Clone, Copy)]
enum Stage {
    PoolClaim,
    GuestIdentity,
}

/// A create served by a pool member.
struct ClaimOp<'a> {
    ops: &'a Ops,
    op_id: OpId,
    pool: Pool,
    /// The member as it was before the claim.
    member: Vm,
    /// The member once claimed.
    vm: Vm,
    name: String,
    request: CreateVm,
}

#[tonic::async_trait]
impl Operation for ClaimOp<'_> {
    type Stage = Stage;
    const NAME: &'static str = "vm.create";

    fn stages(&self) -> Vec<Stage> {
        vec![Stage::PoolClaim, Stage::GuestIdentity]
    }

    fn stage_name(stage: Stage) -> &'static str {
        match stage {
            Stage::PoolClaim => "pool_claim",
            Stage::GuestIdentity => "guest_identity",
        }
    }

    async fn apply(&mut self, stage: Stage) -> Result<(), Error> {
        let ops = self.ops;
        match stage {
            Stage::PoolClaim if self.vm.name == self.name => {}
            Stage::PoolClaim => {
                let op_id = self.op_id.to_string();
                let claim = VmClaim {
                    name: &self.name,
                    labels: &self.request.labels,
                    expire_at_ms: self.request.ttl_ms.map(|ttl| ops.clock().now_ms() + ttl),
                    last_operation: &op_id,
                };
                self.vm = ops.store.vm_claim(&self.vm, claim).await?;
                // The caller's work now: ordinary CPU weight (best effort, it only ranks).
                let group = super::teardown::cgroup_name(&self.vm);
                if let Err(error) = ops.host.limits.set_background(&group, false).await {
                    tracing::warn!(vm_id = %self.vm.id, error = %error, "cannot raise a claimed member's cpu weight");
                }
            }
            Stage::GuestIdentity => {
                ops.host.agents.set_identity(&self.vm, &crate::domain::GuestIdentity::hostname(&self.name)).await?
            }
        }
        Ok(())
    }

    async fn undo(&mut self, stage: Stage) -> Result<(), Error> {
        let ops = self.ops;
        match stage {
            Stage::PoolClaim => {
                let current = ops.store.vm_get(&self.vm.id.to_string()).await?;
                if current.name == self.member.name {
                    return Ok(());
                }
                let op_id = self.op_id.to_string();
                let labels = self.pool.member_labels();
                let back =
                    VmClaim { name: &self.member.name, labels: &labels, expire_at_ms: None, last_operation: &op_id };
                self.vm = ops.store.vm_claim(&current, back).await?;
            }
            Stage::GuestIdentity => {
                let identity = crate::domain::GuestIdentity::hostname(&self.member.name);
                ops.host.agents.set_identity(&self.vm, &identity).await?
            }
        }
        Ok(())
    }

    fn subject(&self) -> Subject {
        Subject::of(&self.vm)
    }
}

impl Ops {
    /// Records a pool; the refiller boots its members.
    pub async fn create_pool(&self, new: NewPool) -> Result<Pool, Error> {
        let (image, spec, snapshot) = match &new.snapshot {
            // Checked as a create from it is: its image and shape are the members'.
            Some(key) => {
                if self.store.snapshot_get(key).await.is_ok_and(|s| s.without_agent) {
                    return Err(Error::InvalidArgument(vec![super::FieldViolation::new(
                        "snapshot",
                        "it was taken without an agent: a claim tells its member a new identity through the agent",
                    )]));
                }
                let mut as_create = CreateVm {
                    name: None,
                    image: new.image.clone(),
                    spec: new.spec,
                    start: true,
                    wait_agent: true,
                    labels: Labels::new(),
                    ttl_ms: None,
                    egress: new.egress.clone(),
                    snapshot: Some(key.clone()),
                };
                let snapshot = self.snapshot_for_create(&mut as_create).await?;
                let image = self.store.image_get(&snapshot.image_id.to_string()).await?;
                (image, as_create.spec, Some(snapshot.id))
            }
            None => {
                let image = match &new.image {
                    Some(key) => self.find_image(key).await?,
                    None => self.ensure_default_image().await?,
                };
                let spec = self.with_defaults(new.spec, &image);
                super::create_vm::check_disk_size(spec.disk_bytes, &image, self.config.root_disk)?;
                (image, spec, None)
            }
        };
        let pool = Pool {
            id: PoolId::generate(),
            name: new.name,
            image_id: image.id,
            spec,
            egress: new.egress,
            size: new.size,
            created_at_ms: self.clock().now_ms(),
            snapshot,
        };
        self.store.pool_insert(&pool).await?;
        tracing::info!(pool = %pool.name, size = pool.size, image = %image.name, "pool created");
        self.pools_changed.notify_one();
        Ok(pool)
    }

    /// A pool and its unclaimed members.
    pub async fn get_pool(&self, key: &str) -> Result<(Pool, Vec<PoolMember>), Error> {
        let pool = self.store.pool_get(key).await?;
        let members = self.pool_members(&pool).await?;
        Ok((pool, members))
    }

    /// Every pool with its unclaimed members, oldest first.
    pub async fn list_pools(&self) -> Result<Vec<(Pool, Vec<PoolMember>)>, Error> {
        let mut pools = Vec::new();
        for pool in self.store.pool_list().await? {
            let members = self.pool_members(&pool).await?;
            pools.push((pool, members));
        }
        Ok(pools)
    }

    /// Removes a pool and deletes its unclaimed members (claimed VMs are their callers').
    pub async fn delete_pool(&self, key: &str) -> Result<Pool, Error> {
        let pool = self.store.pool_get(key).await?;
        self.store.pool_delete(&pool).await?;
        for member in self.members_of(&pool.name).await? {
            self.delete_member(&member).await;
        }
        tracing::info!(pool = %pool.name, "pool deleted");
        Ok(pool)
    }

    async fn pool_members(&self, pool: &Pool) -> Result<Vec<PoolMember>, Error> {
        let members = self.members_of(&pool.name).await?;
        Ok(members
            .into_iter()
            .map(|vm| {
                let memory_bytes = self
                    .handles(&vm)
                    .vmm
                    .filter(|_| vm.observed_state.is_up())
                    .and_then(|vmm| self.host.processes.resident_bytes(&vmm));
                PoolMember { vm, memory_bytes }
            })
            .collect())
    }

    /// The VM records labelled as members of the pool named `pool`.
    async fn members_of(&self, pool: &str) -> Result<Vec<Vm>, Error> {
        let selector = Labels::from([(crate::domain::POOL_LABEL.to_owned(), pool.to_owned())]);
        let filter = crate::store::VmFilter { labels: selector, states: Vec::new() };
        Ok(self.store.vm_page(&filter, None, u32::MAX).await?)
    }

    async fn delete_member(&self, member: &Vm) {
        match self.delete_vm(&member.id.to_string()).await {
            Ok(_) | Err(Error::NotFound { .. }) => {}
            Err(error) => tracing::warn!(vm_id = %member.id, error = %error, "cannot delete a pool member; retrying"),
        }
    }

    /// One pass of the refiller: members that died or failed go, orphans of deleted pools
    /// go, and each pool boots what it lacks (one member at a time per pool, through the
    /// usual admission: a full host refuses, and the next pass tries again).
    pub async fn refill_pools(&self) -> Result<(), Error> {
        let pools = self.store.pool_list().await?;
        let all = self.store.vm_list().await?;
        for vm in &all {
            let Some(pool) = vm.labels.get(crate::domain::POOL_LABEL) else { continue };
            let orphan = !pools.iter().any(|p| &p.name == pool);
            let failed = matches!(vm.observed_state, VmState::Stopped | VmState::Error | VmState::Created);
            if orphan || failed {
                tracing::info!(vm_id = %vm.id, pool, state = vm.observed_state.as_str(), orphan, "removing a pool member");
                self.delete_member(vm).await;
            }
        }
        for pool in pools {
            let live = self
                .members_of(&pool.name)
                .await?
                .iter()
                .filter(|vm| matches!(vm.observed_state, VmState::Starting | VmState::Running))
                .count();
            if live as u32 >= pool.size {
                continue;
            }
            let id = crate::domain::VmId::generate();
            let member = CreateVm {
                name: Some(pool.member_name(id)),
                image: Some(pool.image_id.to_string()),
                spec: pool.spec,
                start: true,
                wait_agent: true,
                labels: pool.member_labels(),
                ttl_ms: None,
                egress: pool.egress.clone(),
                snapshot: pool.snapshot.map(|id| id.to_string()),
            };
            let made = match pool.snapshot {
                // Restored, each with its own identity: a claim then only renames it.
                Some(id) => match self.store.snapshot_get(&id.to_string()).await {
                    Ok(snapshot) => self.create_vm_from(member, Some(snapshot)).await,
                    Err(error) => Err(error.into()),
                },
                None => self.create_vm_cold(member).await,
            };
            match made {
                Ok(vm) => {
                    tracing::info!(pool = %pool.name, vm_name = %vm.name, "pool member ready");
                    // Check the next pool, then come back at once for this one's next member.
                    self.pools_changed.notify_one();
                }
                // The next periodic pass tries again.
                Err(error) => tracing::warn!(pool = %pool.name, error = %error, "cannot boot a pool member; retrying"),
            }
        }
        Ok(())
    }

    /// Serves `request` from a pool when one of its shape has a ready member; `None` when
    /// none does (or the request does not start and wait for its agent).
    pub(super) async fn claim(
        &self,
        request: &CreateVm,
        snapshot: Option<&crate::domain::Snapshot>,
    ) -> Option<Result<Vm, Error>> {
        if !request.start || !request.wait_agent {
            return None;
        }
        let pools = self.store.pool_list().await.ok()?;
        if pools.is_empty() {
            return None;
        }
        let image: Image = match (snapshot, &request.image) {
            (Some(snapshot), _) => self.store.image_get(&snapshot.image_id.to_string()).await.ok()?,
            (None, Some(key)) => self.find_image(key).await.ok()?,
            (None, None) => self.store.image_get(&self.config.default_image).await.ok()?,
        };
        let spec = match snapshot {
            Some(_) => request.spec,
            None => self.with_defaults(request.spec, &image),
        };
        let snapshot = snapshot.map(|s| s.id);
        let pool = pools.into_iter().find(|pool| pool.serves(image.id, spec, &request.egress, snapshot))?;
        for candidate in self.members_of(&pool.name).await.ok()? {
            if candidate.observed_state != VmState::Running || !self.vm_alive(&candidate) {
                continue;
            }
            let lock = self.vm_lock(candidate.id);
            let Ok(_guard) = lock.try_lock() else { continue };
            // Taken (or changed) while this call looked: the next one.
            let Ok(member) = self.store.vm_get(&candidate.id.to_string()).await else { continue };
            if !pool.has_member(&member.labels) || member.observed_state != VmState::Running {
                continue;
            }
            let op_id = OpId::generate();
            let name = request.name.clone().unwrap_or_else(|| super::create_vm::generated_name(member.id));
            let mut op = ClaimOp {
                ops: self,
                op_id,
                pool: pool.clone(),
                vm: member.clone(),
                member,
                name,
                request: request.clone(),
            };
            let claimed = runner::run_with(op_id, &mut op, &self.run_options()).await;
            self.pools_changed.notify_one();
            return match claimed {
                Ok(()) => Some(Ok(op.vm)),
                // The caller's mistake: booting would fail the same way.
                Err(error) if matches!(error.root(), Error::AlreadyExists { .. }) => Some(Err(error)),
                Err(error) => {
                    // A member that could not be claimed is not trusted again.
                    tracing::warn!(vm_id = %op.member.id, error = %error, "claiming a pool member failed; booting instead");
                    drop(_guard);
                    self.delete_member(&op.member).await;
                    None
                }
            };
        }
        None
    }
}
