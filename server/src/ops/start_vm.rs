//! `vm.start`: boot a recorded VM. On failure the host is unwound and the VM is left in
//! `error` with the reason.

use std::path::PathBuf;

use super::{
    Error, Ops,
    boot::{Boot, BootStage, boot_stages},
    runner::{self, Operation, Subject},
};
use crate::{
    domain::{OpId, Transition, Vm, VmFault, VmState},
    store::{LastError, VmUpdate},
};

#[derive(Debug, Clone, Copy)]
enum Stage {
    ResolveImage,
    MarkStarting,
    Boot(BootStage),
    MarkRunning,
}

struct StartVmOp<'a> {
    ops: &'a Ops,
    wait_agent: bool,
    op_id: OpId,
    vm: Vm,
    boot: Option<Boot>,
}

#[tonic::async_trait]
impl Operation for StartVmOp<'_> {
    type Stage = Stage;
    const NAME: &'static str = "vm.start";

    fn stages(&self) -> Vec<Stage> {
        let mut stages = vec![Stage::ResolveImage, Stage::MarkStarting];
        // A VM recorded without an address (made while VMs had no network) boots as it was made.
        let network = self.ops.config.network.as_ref().filter(|_| self.vm.ip.is_some());
        stages.extend(boot_stages(network, self.wait_agent, false, false).into_iter().map(Stage::Boot));
        stages.push(Stage::MarkRunning);
        stages
    }

    fn stage_name(stage: Stage) -> &'static str {
        match stage {
            Stage::ResolveImage => "resolve_image",
            Stage::MarkStarting => "mark_starting",
            Stage::Boot(boot) => boot.name(),
            Stage::MarkRunning => "mark_running",
        }
    }

    async fn apply(&mut self, stage: Stage) -> Result<(), Error> {
        let ops = self.ops;
        match stage {
            Stage::ResolveImage => {
                let image = ops.store.image_get(&self.vm.image_id.to_string()).await?;
                super::images::check_image_files(&image).await?;
                super::images::check_kernel_for(ops.host.vmm.name(), &image).await?;
                self.boot = Some(Boot::new(self.vm.clone(), image));
            }
            Stage::MarkStarting if self.vm.observed_state == VmState::Starting => {}
            Stage::MarkStarting => {
                let next = self.vm.observed_state.apply(Transition::Start).map_err(|_| Error::WrongState {
                    vm: self.vm.name.clone(),
                    state: self.vm.observed_state,
                    action: "be started",
                })?;
                let update = VmUpdate {
                    desired_state: Some(VmState::Running),
                    observed_state: Some(next),
                    last_error: Some(LastError::none()),
                    last_operation: Some(self.op_id.to_string()),
                    ..Default::default()
                };
                self.vm = ops.store.vm_update(&self.vm, update).await?;
                if let Some(boot) = self.boot.as_mut() {
                    boot.vm = self.vm.clone();
                }
                crate::host::fs::create_dir(&self.vm.vm_dir, 0o700).await?;
            }
            Stage::Boot(boot_stage) => {
                let boot = self.boot.as_mut().ok_or(Error::StageOrder { needs: "the image" })?;
                boot.apply(ops, boot_stage).await?;
            }
            Stage::MarkRunning if self.vm.observed_state == VmState::Running => {}
            Stage::MarkRunning => {
                let next = self.vm.observed_state.apply(Transition::Booted).map_err(|_| Error::WrongState {
                    vm: self.vm.name.clone(),
                    state: self.vm.observed_state,
                    action: "finish booting",
                })?;
                let update = VmUpdate { observed_state: Some(next), ..Default::default() };
                self.vm = ops.store.vm_update(&self.vm, update).await?;
            }
        }
        Ok(())
    }

    async fn undo(&mut self, stage: Stage) -> Result<(), Error> {
        match (stage, self.boot.as_mut()) {
            (Stage::Boot(boot_stage), Some(boot)) => boot.undo(self.ops, boot_stage).await,
            // A failed start leaves the VM in `error` with the reason (see `start_vm`).
            _ => Ok(()),
        }
    }

    fn subject(&self) -> Subject {
        Subject::of(&self.vm)
    }

    fn evidence(&self, stage: Stage) -> Option<PathBuf> {
        match (stage, &self.boot) {
            (Stage::Boot(boot_stage), Some(boot)) => boot.evidence(boot_stage),
            _ => None,
        }
    }
}

impl Ops {
    /// Boots a stopped VM (waiting for its guest agent when `wait_agent`); a running one is
    /// returned unchanged.
    pub async fn start_vm(&self, key: &str, wait_agent: bool) -> Result<Vm, Error> {
        let vm = self.store.vm_get(key).await?;
        let lock = self.vm_lock(vm.id);
        let _guard = lock.lock().await;
        let vm = self.refresh_locked(self.store.vm_get(&vm.id.to_string()).await?).await?;
        if vm.observed_state == VmState::Running {
            return Ok(vm);
        }
        if vm.observed_state == VmState::Paused {
            return Err(Error::WrongState { vm: vm.name, state: vm.observed_state, action: "be started (resume it)" });
        }
        let _admitted = self.admit(vm.id, vm.spec, false, true).await?;
        let op_id = OpId::generate();
        let mut op = StartVmOp { ops: self, wait_agent, op_id, vm, boot: None };
        match runner::run_with(op_id, &mut op, &self.run_options()).await {
            Ok(()) => Ok(op.vm),
            Err(error) => {
                let reason = error.chain();
                let current = self.store.vm_get(&op.vm.id.to_string()).await?;
                if current.observed_state == VmState::Starting {
                    let update = VmUpdate {
                        observed_state: Some(VmState::Error),
                        last_error: Some(LastError::new(VmFault::StartFailed, reason)),
                        ..Default::default()
                    };
                    self.store.vm_update(&current, update).await?;
                }
                Err(error)
            }
        }
    }
}
