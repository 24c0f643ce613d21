//! Running a process in a guest: what to run, its input, its output events.

/// The process to run.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ExecCommand {
    /// Program and arguments; never empty.
    pub argv: Vec<String>,
    /// Extra environment, `NAME=value`.
    pub env: Vec<String>,
    /// Working directory; the agent's default when empty.
    pub working_dir: String,
    /// Whether standard input will be sent.
    pub stdin: bool,
    /// Seconds before the process is killed; 0 is no limit.
    pub timeout_seconds: u32,
    /// Who runs it (`USER[:GROUP]`, `UID[:GID]`); root when empty.
    pub user: String,
    /// The pseudo-terminal to run it on, if any (then `argv` may be empty: a login shell).
    pub terminal: Option<Terminal>,
}

/// A pseudo-terminal for a guest process.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Terminal {
    /// TERM; the agent's default when empty.
    pub term: String,
    /// Its size; 0 takes the agent's default (24x80).
    pub size: TerminalSize,
}

/// A terminal's size in character cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TerminalSize {
    /// Rows.
    pub rows: u16,
    /// Columns.
    pub columns: u16,
}

/// One piece of standard input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecInput {
    /// Bytes to write.
    Data(Vec<u8>),
    /// End of input.
    Eof,
    /// The terminal's new size.
    Resize(TerminalSize),
}

/// How a guest process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// It exited with a code.
    Code(i32),
    /// A signal killed it.
    Signal(i32),
}

/// One event of a running guest process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    /// Standard output bytes.
    Stdout(Vec<u8>),
    /// Standard error bytes.
    Stderr(Vec<u8>),
    /// The process ended (always last).
    Exit {
        /// How.
        status: ExitStatus,
        /// Whether its timeout killed it.
        timed_out: bool,
    },
}

/// A regular file's mode and size, as copied in or out of a guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileMeta {
    /// Permission bits.
    pub mode: u32,
    /// Size in bytes (0 for an archive).
    pub size: u64,
    /// The content is a tar stream of a directory.
    pub archive: bool,
}
