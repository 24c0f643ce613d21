//! Running a process in a running VM. Not an operation: it changes no state of the VM.

use std::pin::Pin;

use tokio_stream::{Stream, StreamExt};

use super::{Error, Ops};
use crate::{
    domain::{ExecCommand, ExecEvent, ExecInput, FileMeta, VmState},
    host::files::FileInput,
};

/// The output of a guest process, ending with its exit.
pub type ExecOutput = Pin<Box<dyn Stream<Item = Result<ExecEvent, Error>> + Send>>;

/// The content of a file copied out of a guest.
pub type FileOutput = Pin<Box<dyn Stream<Item = Result<Vec<u8>, Error>> + Send>>;

impl Ops {
    /// The VM named by `key`, which must be running (its agent answers calls).
    async fn running_vm(&self, key: &str) -> Result<crate::domain::Vm, Error> {
        let vm = self.refresh(self.store.vm_get(key).await?).await?;
        if vm.observed_state != VmState::Running || !self.vm_alive(&vm) {
            return Err(Error::FailedPrecondition(format!(
                "vm {} is {}, not running; start it first",
                vm.name,
                vm.observed_state.as_str()
            )));
        }
        Ok(vm)
    }

    /// Opens a regular file in the VM named by `key`: its mode and size, then its content.
    pub async fn copy_from_vm(&self, key: &str, path: String) -> Result<(FileMeta, FileOutput), Error> {
        let vm = self.running_vm(key).await?;
        let (meta, data) = self.host.agents.read_file(&vm, path).await?;
        Ok((meta, Box::pin(data.map(|item| item.map_err(Error::from)))))
    }

    /// Writes a file into the VM named by `key` from `input`; returns its size.
    pub async fn copy_to_vm(&self, key: &str, path: String, mode: u32, input: FileInput) -> Result<u64, Error> {
        let vm = self.running_vm(key).await?;
        Ok(self.host.agents.write_file(&vm, path, mode, input).await?)
    }

    /// Starts `command` in the VM named by `key`; `input` feeds its standard input.
    pub async fn exec_vm(
        &self,
        key: &str,
        command: ExecCommand,
        input: impl Stream<Item = ExecInput> + Send + 'static,
    ) -> Result<ExecOutput, Error> {
        let vm = self.running_vm(key).await?;
        let output = self.host.agents.exec(&vm, command, Box::pin(input)).await?;
        Ok(Box::pin(output.map(|item| item.map_err(Error::from))))
    }
}
