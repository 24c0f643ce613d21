//! `vm.stop`: graceful (agent shutdown, then ACPI power-down), then kill, then release
//! the VM's runtime. Stopping a stopped VM changes nothing.

use std::time::Duration;

use super::{
    Error, Ops,
    runner::{self, Operation, Subject},
};
use crate::{
    domain::{OpId, Transition, Vm, VmState},
    store::{LastError, VmUpdate},
};

/// How long the guest gets to power off after the agent's shutdown.
const AGENT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// How long the guest gets after an ACPI power-down request.
const POWER_DOWN_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy)]
enum Stage {
    MarkStopping,
    ShutdownGuest,
    PowerDown,
    KillVmm,
    ReleaseRuntime,
    MarkStopped,
}

struct StopVmOp<'a> {
    ops: &'a Ops,
    op_id: OpId,
    vm: Vm,
    force: bool,
    /// The guest's vCPUs were stopped: they run again before the guest is asked to power off.
    was_paused: bool,
}

impl StopVmOp<'_> {
    async fn wait_vmm_gone(&self, timeout: Duration) -> bool {
        let Some(vmm) = self.ops.handles(&self.vm).vmm else { return true };
        self.ops.host.processes.wait_gone(&vmm, &self.vm.paths().api_socket, timeout).await
    }
}

#[tonic::async_trait]
impl Operation for StopVmOp<'_> {
    type Stage = Stage;
    const NAME: &'static str = "vm.stop";

    fn stages(&self) -> Vec<Stage> {
        if self.force {
            vec![Stage::MarkStopping, Stage::KillVmm, Stage::ReleaseRuntime, Stage::MarkStopped]
        } else {
            vec![
                Stage::MarkStopping,
                Stage::ShutdownGuest,
                Stage::PowerDown,
                Stage::KillVmm,
                Stage::ReleaseRuntime,
                Stage::MarkStopped,
            ]
        }
    }

    fn stage_name(stage: Stage) -> &'static str {
        match stage {
            Stage::MarkStopping => "mark_stopping",
            Stage::ShutdownGuest => "shutdown_guest",
            Stage::PowerDown => "power_down",
            Stage::KillVmm => "kill_vmm",
            Stage::ReleaseRuntime => "cleanup_runtime",
            Stage::MarkStopped => "mark_stopped",
        }
    }

    async fn apply(&mut self, stage: Stage) -> Result<(), Error> {
        let ops = self.ops;
        match stage {
            Stage::MarkStopping if self.vm.observed_state == VmState::Stopping => {}
            Stage::MarkStopping => {
                let next = self.vm.observed_state.apply(Transition::Stop).map_err(|_| Error::WrongState {
                    vm: self.vm.name.clone(),
                    state: self.vm.observed_state,
                    action: "be stopped",
                })?;
                let update = VmUpdate {
                    desired_state: Some(VmState::Stopped),
                    observed_state: Some(next),
                    last_operation: Some(self.op_id.to_string()),
                    ..Default::default()
                };
                self.vm = ops.store.vm_update(&self.vm, update).await?;
            }
            Stage::ShutdownGuest => {
                if self.was_paused && ops.vm_alive(&self.vm) {
                    // A frozen guest cannot power off; if it cannot be thawed, kill follows.
                    if let Err(error) = ops.host.vmm.resume(&self.vm.paths()).await {
                        tracing::warn!(vm_id = %self.vm.id, error = %error, "resuming a paused vm to stop it failed");
                    }
                }
                if ops.vm_alive(&self.vm) {
                    // A guest whose agent does not answer falls through to power-down.
                    let asked =
                        tokio::time::timeout(Duration::from_secs(5), ops.host.agents.shutdown_guest(&self.vm)).await;
                    if matches!(asked, Ok(Ok(()))) {
                        self.wait_vmm_gone(AGENT_SHUTDOWN_GRACE).await;
                    }
                }
            }
            Stage::PowerDown => {
                // Bounded too (a wedged VMM may never answer): SIGKILL follows either way.
                let paths = self.vm.paths();
                let asked = tokio::time::timeout(POWER_DOWN_GRACE, ops.host.vmm.power_down(&paths));
                if ops.vm_alive(&self.vm) && matches!(asked.await, Ok(Ok(()))) {
                    self.wait_vmm_gone(POWER_DOWN_GRACE).await;
                }
            }
            Stage::KillVmm => {
                if let Some(vmm) = ops.handles(&self.vm).vmm {
                    ops.host.processes.terminate(&vmm, &self.vm.paths().api_socket, Duration::from_secs(2)).await;
                }
            }
            Stage::ReleaseRuntime => ops.release_runtime(&self.vm).await?,
            Stage::MarkStopped => {
                let update = VmUpdate {
                    observed_state: Some(VmState::Stopped),
                    last_error: Some(LastError::none()),
                    ..Default::default()
                };
                self.vm = ops.store.vm_update(&self.vm, update).await?;
            }
        }
        Ok(())
    }

    fn subject(&self) -> Subject {
        Subject::of(&self.vm)
    }
}

impl Ops {
    /// Stops a VM; a stopped one is returned unchanged.
    pub async fn stop_vm(&self, key: &str, force: bool) -> Result<Vm, Error> {
        let vm = self.store.vm_get(key).await?;
        let lock = self.vm_lock(vm.id);
        let _guard = lock.lock().await;
        let vm = self.refresh_locked(self.store.vm_get(&vm.id.to_string()).await?).await?;
        if matches!(vm.observed_state, VmState::Created | VmState::Stopped) {
            return Ok(vm);
        }
        let op_id = OpId::generate();
        let was_paused = vm.observed_state == VmState::Paused;
        let mut op = StopVmOp { ops: self, op_id, vm, force, was_paused };
        match runner::run_with(op_id, &mut op, &self.run_options()).await {
            Ok(()) => Ok(op.vm),
            Err(error) => {
                // Stop has nothing to undo: finish the job (kill, release, mark stopped) so
                // the record and the host agree, and still report the failure.
                self.settle_after_failure(op.vm.id, "stop").await;
                Err(error)
            }
        }
    }
}
