//! `vm.pause` and `vm.resume`: the guest's vCPUs stopped in place (memory and devices kept)
//! and let run again. The intent is written first (`desired_state`), so a daemon that dies
//! between the VMM's answer and the record's change finishes the job at reconcile.

use super::{
    Error, Ops,
    runner::{self, Operation, Subject},
};
use crate::{
    domain::{OpId, Transition, Vm, VmState},
    store::VmUpdate,
};

/// Which way the VM goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    Pause,
    Resume,
}

impl Direction {
    /// The state the VM ends in.
    fn target(self) -> VmState {
        match self {
            Self::Pause => VmState::Paused,
            Self::Resume => VmState::Running,
        }
    }

    fn transition(self) -> Transition {
        match self {
            Self::Pause => Transition::Pause,
            Self::Resume => Transition::Resume,
        }
    }

    fn action(self) -> &'static str {
        match self {
            Self::Pause => "be paused",
            Self::Resume => "be resumed",
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Stage {
    /// `desired_state` records where the VM is going.
    MarkIntent,
    /// Pausing only: the daemon's agent connections are closed while the guest runs.
    QuiesceAgent,
    /// The VMM stops or restarts the vCPUs.
    Vcpus,
    /// `observed_state` says it happened.
    MarkDone,
}

/// One operation type per direction (`RESUME`), so each has its own name.
struct PauseVmOp<'a, const RESUME: bool> {
    ops: &'a Ops,
    op_id: OpId,
    vm: Vm,
}

impl<const RESUME: bool> PauseVmOp<'_, RESUME> {
    const DIRECTION: Direction = if RESUME { Direction::Resume } else { Direction::Pause };

    async fn set_vcpus(&self, direction: Direction) -> Result<(), Error> {
        let paths = self.vm.paths();
        match direction {
            Direction::Pause => self.ops.host.vmm.pause(&paths).await?,
            Direction::Resume => self.ops.host.vmm.resume(&paths).await?,
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl<const RESUME: bool> Operation for PauseVmOp<'_, RESUME> {
    type Stage = Stage;
    const NAME: &'static str = if RESUME { "vm.resume" } else { "vm.pause" };

    fn stages(&self) -> Vec<Stage> {
        match RESUME {
            false => vec![Stage::MarkIntent, Stage::QuiesceAgent, Stage::Vcpus, Stage::MarkDone],
            true => vec![Stage::MarkIntent, Stage::Vcpus, Stage::MarkDone],
        }
    }

    fn stage_name(stage: Stage) -> &'static str {
        match (stage, RESUME) {
            (Stage::MarkIntent, false) => "mark_pausing",
            (Stage::MarkIntent, true) => "mark_resuming",
            (Stage::QuiesceAgent, _) => "quiesce_agent",
            (Stage::Vcpus, false) => "pause_vcpus",
            (Stage::Vcpus, true) => "resume_vcpus",
            (Stage::MarkDone, false) => "mark_paused",
            (Stage::MarkDone, true) => "mark_running",
        }
    }

    async fn apply(&mut self, stage: Stage) -> Result<(), Error> {
        let target = Self::DIRECTION.target();
        match stage {
            Stage::MarkIntent => {
                let update = VmUpdate {
                    desired_state: Some(target),
                    last_operation: Some(self.op_id.to_string()),
                    ..Default::default()
                };
                self.vm = self.ops.store.vm_update(&self.vm, update).await?;
            }
            Stage::QuiesceAgent => self.ops.host.agents.quiesce(&self.vm).await?,
            Stage::Vcpus => self.set_vcpus(Self::DIRECTION).await?,
            Stage::MarkDone if self.vm.observed_state == target => {}
            Stage::MarkDone => {
                let update = VmUpdate { observed_state: Some(target), ..Default::default() };
                self.vm = self.ops.store.vm_update(&self.vm, update).await?;
            }
        }
        Ok(())
    }

    async fn undo(&mut self, stage: Stage) -> Result<(), Error> {
        let back = if RESUME { Direction::Pause } else { Direction::Resume };
        match stage {
            Stage::MarkIntent => {
                let update = VmUpdate { desired_state: Some(back.target()), ..Default::default() };
                self.vm = self.ops.store.vm_update(&self.vm, update).await?;
            }
            Stage::Vcpus => self.set_vcpus(back).await?,
            Stage::QuiesceAgent | Stage::MarkDone => {}
        }
        Ok(())
    }

    fn subject(&self) -> Subject {
        Subject::of(&self.vm)
    }
}

impl Ops {
    /// Stops a running VM's vCPUs; a paused one is returned unchanged.
    pub async fn pause_vm(&self, key: &str) -> Result<Vm, Error> {
        self.pause_or_resume(key, Direction::Pause).await
    }

    /// Lets a paused VM's vCPUs run again; a running one is returned unchanged.
    pub async fn resume_vm(&self, key: &str) -> Result<Vm, Error> {
        self.pause_or_resume(key, Direction::Resume).await
    }

    async fn pause_or_resume(&self, key: &str, direction: Direction) -> Result<Vm, Error> {
        let vm = self.store.vm_get(key).await?;
        let lock = self.vm_lock(vm.id);
        let _guard = lock.lock().await;
        let vm = self.refresh_locked(self.store.vm_get(&vm.id.to_string()).await?).await?;
        if vm.observed_state == direction.target() && vm.desired_state == direction.target() {
            return Ok(vm);
        }
        let wrong_state =
            || Error::WrongState { vm: vm.name.clone(), state: vm.observed_state, action: direction.action() };
        // A VM already there (a half-finished earlier call) only needs its intent and VMM
        // made to agree; otherwise the move must be one the state machine allows.
        if vm.observed_state != direction.target() {
            vm.observed_state.apply(direction.transition()).map_err(|_| wrong_state())?;
        }
        if !self.vm_alive(&vm) {
            return Err(wrong_state());
        }
        let op_id = OpId::generate();
        let options = self.run_options();
        match direction {
            Direction::Pause => {
                let mut op = PauseVmOp::<false> { ops: self, op_id, vm };
                runner::run_with(op_id, &mut op, &options).await?;
                Ok(op.vm)
            }
            Direction::Resume => {
                let mut op = PauseVmOp::<true> { ops: self, op_id, vm };
                runner::run_with(op_id, &mut op, &options).await?;
                Ok(op.vm)
            }
        }
    }
}
