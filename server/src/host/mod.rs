//! Everything that touches the OS: VMMs, disks, the guest-agent channel, processes, scratch files.
//!
//! Nothing outside this module spawns a process or reads `/proc` or `/dev`.

pub mod accel;
pub mod agent;
pub mod agent_channel;
pub mod agent_key;
pub mod block;
pub mod cgroup;
pub mod command;
pub mod confine;
pub mod doctor;
pub mod exec;
#[cfg(any(test, feature = "testing"))]
pub mod fake;
pub mod files;
pub mod fs;
pub mod import;
pub mod lock;
pub mod logs;
pub mod network;
pub mod oci;
pub mod process;
pub mod qcow2;
pub mod scratch;
pub mod storage;
pub mod vmm;
pub mod vsock;

use std::path::PathBuf;

pub use command::CommandFailed;

/// A host capability failed.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// A program the daemon needs is not installed.
    #[error("{program} is not installed or not in PATH")]
    ToolMissing {
        /// The program's name or path.
        program: String,
    },
    /// A host tool ran and failed.
    #[error(transparent)]
    Command(#[from] CommandFailed),
    /// A file operation failed.
    #[error("cannot {action} {}", path.display())]
    File {
        /// What was being done (`create`, `remove`, `open`).
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A directory in a place others share is not one the daemon can trust.
    #[error("refusing {}: {why}", path.display())]
    Untrusted {
        /// The directory.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// A program could not be started (for a reason other than being absent).
    #[error("cannot start {}", program.display())]
    Spawn {
        /// The program.
        program: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Talking to a process over its socket failed (QMP, Firecracker's API).
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The input a call was streaming to the guest ended abnormally (the client went away
    /// or sent something else): nothing was kept.
    #[error("the input stream was aborted: {why}")]
    InputAborted {
        /// What happened to it.
        why: String,
    },
    /// A failure the fake host injected (tests only make these).
    #[error("injected failure of {call}")]
    Injected {
        /// The capability call (`vmm.launch`).
        call: &'static str,
    },
    /// The fake host refused a call that the real host would refuse too (tests only).
    #[error("the fake host refuses: {rule}")]
    FakeRule {
        /// The rule broken.
        rule: String,
    },
    /// A process the VM needs exited.
    #[error("{process} exited{}", detail.as_ref().map(|d| format!(": {d}")).unwrap_or_default())]
    ProcessExited {
        /// Which process.
        process: &'static str,
        /// The last line of its log, if any.
        detail: Option<String>,
        /// The log to inspect.
        log: PathBuf,
    },
    /// Something did not happen in time.
    #[error("{what} did not happen within {seconds} s")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long was waited.
        seconds: u64,
    },
    /// The VMM answered its control protocol with an error.
    #[error("vmm refused {command}: {message}")]
    VmmRefused {
        /// The command.
        command: String,
        /// Its error.
        message: String,
    },
    /// The guest agent failed.
    #[error(transparent)]
    Agent(#[from] agent::AgentError),
    /// Calls to the guest agent (an exec, a copy) still hold connections open.
    #[error("{open} connection(s) to the guest agent stay in use (an exec or a copy runs); wait for them to end")]
    AgentBusy {
        /// How many connections were still open.
        open: usize,
    },
}

impl HostError {
    /// The log file worth reading to understand this error, if any.
    pub fn log_path(&self) -> Option<&std::path::Path> {
        match self {
            Self::ProcessExited { log, .. } => Some(log),
            _ => None,
        }
    }
}

/// Maps an I/O error on `path` to [`HostError::File`].
pub fn file_error(action: &'static str, path: &std::path::Path) -> impl FnOnce(std::io::Error) -> HostError {
    let path = path.to_owned();
    move |source| HostError::File { action, path, source }
}

/// Last non-empty line of a log file in a VM's directory (of its last 64 KiB), for error
/// messages.
pub fn last_log_line(path: &std::path::Path) -> Option<String> {
    const TAIL: u64 = 64 << 10;
    let len = std::fs::symlink_metadata(path).ok()?.len();
    let tail = fs::read_vm_file(path, len.saturating_sub(TAIL), TAIL)?;
    let text = String::from_utf8_lossy(&tail);
    text.lines().rev().find(|l| !l.trim().is_empty()).map(|l| l.trim().to_owned())
}
