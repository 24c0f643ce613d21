//! Using a VM without changing its state (not operations): running a process in it, copying
//! files in and out, reading its logs.

use std::pin::Pin;

use tokio_stream::{Stream, StreamExt};

use super::{Error, Ops};
use crate::{
    domain::{ExecCommand, ExecEvent, ExecInput, FileMeta, VmState},
    host::files::FileInput,
};

/// The output of a guest process, ending with its exit.
pub type ExecOutput = Pin<Box<dyn Stream<Item = Result<ExecEvent, Error>> + Send>>;

/// A log's content as it is read, and followed.
pub type LogOutput = Pin<Box<dyn Stream<Item = Result<Vec<u8>, Error>> + Send>>;

/// Which log of a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmLog {
    /// The guest's serial console.
    Console,
    /// The VMM's own log.
    Vmm,
}

/// The content of a file copied out of a guest.
pub type FileOutput = Pin<Box<dyn Stream<Item = Result<Vec<u8>, Error>> + Send>>;

/// A container image's `Env`, `WorkingDir` and `User` under what the request says.
pub(super) fn with_image_defaults(
    mut command: ExecCommand,
    config: Option<&crate::domain::ImageConfig>,
) -> ExecCommand {
    let Some(config) = config else {
        return command;
    };
    command.env = config.merged_env(&command.env);
    if command.working_dir.is_empty() {
        command.working_dir = config.working_dir.clone();
    }
    if command.user.is_empty() {
        command.user = config.user.clone();
    }
    command
}

impl Ops {
    /// The VM named by `key`, which must be running (its agent answers calls).
    async fn running_vm(&self, key: &str) -> Result<crate::domain::Vm, Error> {
        let vm = self.refresh(self.store.vm_get(key).await?).await?;
        if vm.observed_state != VmState::Running || !self.vm_alive(&vm) {
            let action = match vm.observed_state {
                VmState::Paused => "be used while paused (resume it first)",
                _ => "be used before it runs",
            };
            return Err(Error::WrongState { vm: vm.name, state: vm.observed_state, action });
        }
        Ok(vm)
    }

    /// A VM's log: its last `tail_bytes` (0: all of it), then, with `follow`, what is
    /// appended until the caller goes, the daemon stops serving or the VM is deleted.
    pub async fn stream_vm_log(
        &self,
        key: &str,
        which: VmLog,
        tail_bytes: u64,
        follow: bool,
    ) -> Result<LogOutput, Error> {
        let paths = self.get_vm(key).await?.paths();
        let path = match which {
            VmLog::Console => paths.console_log,
            VmLog::Vmm => paths.vmm_log,
        };
        let log = crate::host::logs::stream(path, tail_bytes, follow, self.stopped_serving()).await?;
        Ok(Box::pin(log.map(|chunk| chunk.map_err(Error::from))))
    }

    /// Opens a regular file in the VM named by `key` (with `archive`, a directory there comes
    /// as a tar stream): its mode and size, then its content.
    pub async fn copy_from_vm(&self, key: &str, path: String, archive: bool) -> Result<(FileMeta, FileOutput), Error> {
        let vm = self.running_vm(key).await?;
        let (meta, data) = self.host.agents.read_file(&vm, path, archive).await?;
        Ok((meta, Box::pin(data.map(|item| item.map_err(Error::from)))))
    }

    /// Writes a file into the VM named by `key` from `input` (with `archive`, a tar stream
    /// that becomes the directory `path`); returns the bytes sent.
    pub async fn copy_to_vm(
        &self,
        key: &str,
        path: String,
        mode: u32,
        archive: bool,
        input: FileInput,
    ) -> Result<u64, Error> {
        let vm = self.running_vm(key).await?;
        Ok(self.host.agents.write_file(&vm, path, mode, archive, input).await?)
    }

    /// Starts `command` in the VM named by `key`; `input` feeds its standard input.
    pub async fn exec_vm(
        &self,
        key: &str,
        command: ExecCommand,
        input: impl Stream<Item = ExecInput> + Send + 'static,
    ) -> Result<ExecOutput, Error> {
        let vm = self.running_vm(key).await?;
        let command = match self.store.image_get(&vm.image_id.to_string()).await {
            Ok(image) => with_image_defaults(command, image.config()),
            Err(_) => command, // its image is gone: the VM runs on its own disk
        };
        let output = self.host.agents.exec(&vm, command, Box::pin(input)).await?;
        Ok(Box::pin(output.map(|item| item.map_err(Error::from))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::ImageConfig;

    #[test]
    fn a_request_overrides_the_image_config_by_name() {
        let config = ImageConfig {
            env: vec!["PATH=/usr/bin".into(), "LANG=C.UTF-8".into()],
            working_dir: "/srv".into(),
            user: "ci".into(),
            ..Default::default()
        };
        let command = ExecCommand {
            argv: vec!["id".into()],
            env: vec!["LANG=fr_FR.UTF-8".into(), "EXTRA=1".into()],
            working_dir: String::new(),
            stdin: false,
            timeout_seconds: 0,
            user: String::new(),
            terminal: None,
        };
        let merged = with_image_defaults(command.clone(), Some(&config));
        assert_eq!(merged.env, vec!["PATH=/usr/bin", "LANG=fr_FR.UTF-8", "EXTRA=1"]);
        assert_eq!((merged.working_dir.as_str(), merged.user.as_str()), ("/srv", "ci"));
        let own = ExecCommand { working_dir: "/tmp".into(), user: "root".into(), ..command.clone() };
        let merged = with_image_defaults(own, Some(&config));
        assert_eq!((merged.working_dir.as_str(), merged.user.as_str()), ("/tmp", "root"));
        assert_eq!(with_image_defaults(command.clone(), None), command);
    }
}
