//! Warm pools: N VMs of one shape booted ahead of time, for creates of that shape to claim.

use super::{Egress, ImageId, Labels, PoolId, VmId, VmSpec};

/// The label that marks an unclaimed pool member; its value is the pool's name. Callers
/// cannot set labels under `banger.`, so only the daemon makes members.
pub const POOL_LABEL: &str = "banger.pool";
/// The prefix of the label keys only the daemon sets.
pub const RESERVED_LABEL_PREFIX: &str = "banger.";
/// The most members one pool keeps.
pub const MAX_POOL_SIZE: u32 = 64;
/// The longest pool name: a member is named `<pool>-<8 characters>`, a VM name of 63 at most.
pub const MAX_POOL_NAME_LEN: usize = 54;

/// A warm pool: what its members look like and how many to keep ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    /// Its id.
    pub id: PoolId,
    /// Its unique name.
    pub name: String,
    /// The image its members boot.
    pub image_id: ImageId,
    /// Its members' shape.
    pub spec: VmSpec,
    /// Its members' egress policy.
    pub egress: Egress,
    /// How many members it keeps booted.
    pub size: u32,
    /// Milliseconds since the Unix epoch at creation.
    pub created_at_ms: i64,
    /// The snapshot its members are restored from; `None`: they boot.
    pub snapshot: Option<super::SnapshotId>,
}

impl Pool {
    /// The labels a new member carries.
    pub fn member_labels(&self) -> Labels {
        Labels::from([(POOL_LABEL.to_owned(), self.name.clone())])
    }

    /// A new member's name: the pool's and the random tail of the member's id.
    pub fn member_name(&self, id: VmId) -> String {
        let id = id.to_string().to_lowercase();
        format!("{}-{}", self.name, &id[id.len() - 8..])
    }

    /// Whether a create of this image, shape and policy, from this snapshot or booted, may
    /// be served by this pool.
    pub fn serves(
        &self,
        image_id: ImageId,
        spec: VmSpec,
        egress: &Egress,
        snapshot: Option<super::SnapshotId>,
    ) -> bool {
        self.image_id == image_id && self.spec == spec && &self.egress == egress && self.snapshot == snapshot
    }

    /// Whether `labels` are those of an unclaimed member of this pool.
    pub fn has_member(&self, labels: &Labels) -> bool {
        labels.get(POOL_LABEL) == Some(&self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_names_are_vm_names_even_for_the_longest_pool_name() {
        let pool = Pool {
            id: PoolId::generate(),
            name: "p".repeat(MAX_POOL_NAME_LEN),
            image_id: ImageId::generate(),
            spec: VmSpec { vcpus: 1, memory_mib: 256, disk_bytes: 0 },
            egress: Egress::default(),
            size: 2,
            created_at_ms: 0,
            snapshot: None,
        };
        let name = pool.member_name(VmId::generate());
        assert_eq!(crate::domain::vm_name_error(&name), Ok(()));
        assert!(pool.has_member(&pool.member_labels()));
        assert!(!pool.has_member(&Labels::new()));
    }
}
