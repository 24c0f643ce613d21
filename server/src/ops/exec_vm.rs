//! Running a process in a running VM. Not an operation: it changes no state of the VM.

use std::pin::Pin;

use tokio_stream::{Stream, StreamExt};

use super::{Error, Ops};
use crate::domain::{ExecCommand, ExecEvent, ExecInput, VmState};

/// The output of a guest process, ending with its exit.
pub type ExecOutput = Pin<Box<dyn Stream<Item = Result<ExecEvent, Error>> + Send>>;

impl Ops {
    /// Starts `command` in the VM named by `key`; `input` feeds its standard input.
    pub async fn exec_vm(
        &self,
        key: &str,
        command: ExecCommand,
        input: impl Stream<Item = ExecInput> + Send + 'static,
    ) -> Result<ExecOutput, Error> {
        let vm = self.refresh(self.store.vm_get(key).await?).await?;
        if vm.observed_state != VmState::Running || !self.vm_alive(&vm) {
            return Err(Error::FailedPrecondition(format!(
                "vm {} is {}, not running; start it first",
                vm.name,
                vm.observed_state.as_str()
            )));
        }
        let output = self.host.agents.exec(&vm, command, Box::pin(input)).await?;
        Ok(Box::pin(output.map(|item| item.map_err(Error::from))))
    }
}
