//! `vm.delete`: stop whatever runs, release the runtime, remove the VM's directory, then
//! its record. Every stage tolerates what is already gone, so a retry finishes the job.

use std::time::Duration;

use super::{
    Error, Ops,
    runner::{self, Operation, Subject},
};
use crate::domain::{OpId, Vm, VmId};

#[derive(Debug, Clone, Copy)]
enum Stage {
    Stop,
    ReleaseRuntime,
    RemoveVmDir,
    DeleteRecord,
}

struct DeleteVmOp<'a> {
    ops: &'a Ops,
    vm: Vm,
}

#[tonic::async_trait]
impl Operation for DeleteVmOp<'_> {
    type Stage = Stage;
    const NAME: &'static str = "vm.delete";

    fn stages(&self) -> Vec<Stage> {
        vec![Stage::Stop, Stage::ReleaseRuntime, Stage::RemoveVmDir, Stage::DeleteRecord]
    }

    fn stage_name(stage: Stage) -> &'static str {
        match stage {
            Stage::Stop => "stop",
            Stage::ReleaseRuntime => "cleanup_runtime",
            Stage::RemoveVmDir => "remove_vm_dir",
            Stage::DeleteRecord => "delete_record",
        }
    }

    async fn apply(&mut self, stage: Stage) -> Result<(), Error> {
        let ops = self.ops;
        match stage {
            // The disks are about to go: no need for a graceful shutdown.
            Stage::Stop => {
                if let Some(vmm) = ops.handles(&self.vm).vmm {
                    ops.host.processes.terminate(&vmm, &self.vm.paths().api_socket, Duration::from_secs(1)).await;
                }
            }
            Stage::ReleaseRuntime => ops.release_runtime(&self.vm).await?,
            Stage::RemoveVmDir => {
                crate::host::fs::remove_dir(&self.vm.vm_dir).await?;
                // Its uid goes to a later VM: nothing it left in places all users share
                // (its processes are gone by now) may be that VM's to read.
                if let Some(identity) = ops.host.vmm.runs_as(self.vm.vsock_cid) {
                    crate::host::fs::remove_files_of(identity.uid, crate::host::fs::SHARED_WRITABLE).await;
                }
            }
            Stage::DeleteRecord => match ops.store.vm_delete(self.vm.id).await {
                Ok(()) | Err(crate::store::StoreError::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            },
        }
        Ok(())
    }

    fn subject(&self) -> Subject {
        Subject::of(&self.vm)
    }
}

impl Ops {
    /// Deletes a VM and everything it holds on the host; returns its id and the operation's.
    pub async fn delete_vm(&self, key: &str) -> Result<(VmId, OpId), Error> {
        let vm = self.store.vm_get(key).await?;
        let lock = self.vm_lock(vm.id);
        let _guard = lock.lock().await;
        let vm = self.store.vm_get(&vm.id.to_string()).await?;
        let op_id = OpId::generate();
        let mut op = DeleteVmOp { ops: self, vm };
        if let Err(error) = runner::run_with(op_id, &mut op, &self.run_options()).await {
            // Whatever the failed delete did, leave the record consistent with the host; a
            // retry finishes the deletion.
            self.settle_after_failure(op.vm.id, "delete").await;
            return Err(error);
        }
        self.forget_vm(op.vm.id);
        Ok((op.vm.id, op_id))
    }
}
