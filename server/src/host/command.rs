//! The only place that spawns host tools: short-lived commands and detached daemons.

use std::{
    ffi::OsString,
    fs::OpenOptions,
    path::{Path, PathBuf},
    process::Stdio,
};

use super::{HostError, confine::VmIdentity, process};
use crate::domain::ProcessHandle;

/// A host tool that ran and failed; keeps everything needed to reproduce it.
#[derive(Debug, thiserror::Error)]
#[error("{program} {args:?} exited with {status}: {stderr}")]
pub struct CommandFailed {
    /// The program.
    pub program: String,
    /// Its arguments.
    pub args: Vec<String>,
    /// How it ended.
    pub status: std::process::ExitStatus,
    /// Its standard error, trimmed.
    pub stderr: String,
}

fn display_args(args: &[OsString]) -> Vec<String> {
    args.iter().map(|a| a.to_string_lossy().into_owned()).collect()
}

fn spawn_error(program: &Path, err: std::io::Error) -> HostError {
    if err.kind() == std::io::ErrorKind::NotFound {
        HostError::ToolMissing { program: program.display().to_string() }
    } else {
        HostError::Spawn { program: program.to_owned(), source: err }
    }
}

/// A finished tool's standard output, or the failure its exit status says.
fn checked(program: &Path, args: &[OsString], output: std::process::Output) -> Result<Vec<u8>, HostError> {
    if !output.status.success() {
        return Err(failed(program, args, output.status, &output.stderr));
    }
    Ok(output.stdout)
}

fn failed(program: &Path, args: &[OsString], status: std::process::ExitStatus, stderr: &[u8]) -> HostError {
    HostError::Command(CommandFailed {
        program: program.display().to_string(),
        args: display_args(args),
        status,
        stderr: String::from_utf8_lossy(stderr).trim().to_owned(),
    })
}

/// Runs a tool to completion and returns its standard output; a non-zero exit is an error.
/// Tools run in the C locale: what they print is the same on every host.
pub async fn run(program: &Path, args: &[OsString]) -> Result<Vec<u8>, HostError> {
    let output = tokio::process::Command::new(program)
        .args(args)
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| spawn_error(program, e))?;
    checked(program, args, output)
}

/// Runs a tool to completion from a blocking thread, with extra environment; returns its
/// standard output. A non-zero exit is an error.
pub fn run_blocking(program: &Path, args: &[OsString], envs: &[(&str, &str)]) -> Result<Vec<u8>, HostError> {
    let output = std::process::Command::new(program)
        .args(args)
        .env("LC_ALL", "C")
        .envs(envs.iter().copied())
        .stdin(Stdio::null())
        .output()
        .map_err(|e| spawn_error(program, e))?;
    checked(program, args, output)
}

/// Runs a tool from a blocking thread and feeds its standard input with `feed`; returns how
/// the tool ended and what `feed` returned, for the caller to tell which failure came first
/// (a tool that exits early breaks the pipe; a feed that fails leaves the tool a short input).
pub fn run_feeding_blocking<E>(
    program: &Path,
    args: &[OsString],
    envs: &[(&str, &str)],
    feed: impl FnOnce(&mut dyn std::io::Write) -> Result<(), E>,
) -> (Result<(), HostError>, Result<(), E>) {
    match feed_tool(program, args, envs, feed) {
        Ok(outcome) => outcome,
        Err(e) => (Err(e), Ok(())),
    }
}

/// How a fed tool ended, and what its feed returned.
type FeedOutcome<E> = (Result<(), HostError>, Result<(), E>);

fn feed_tool<E>(
    program: &Path,
    args: &[OsString],
    envs: &[(&str, &str)],
    feed: impl FnOnce(&mut dyn std::io::Write) -> Result<(), E>,
) -> Result<FeedOutcome<E>, HostError> {
    use std::io::{Read, Seek};
    // Standard error goes to an unnamed file, not a pipe: a chatty tool must never block
    // on a pipe nobody reads while this thread is busy writing its input.
    let mut stderr =
        tempfile::tempfile().map_err(|e| HostError::Io { what: "cannot make a temporary file".into(), source: e })?;
    let stderr_for_child =
        stderr.try_clone().map_err(|e| HostError::Io { what: "cannot duplicate a file".into(), source: e })?;
    let mut child = std::process::Command::new(program)
        .args(args)
        .env("LC_ALL", "C")
        .envs(envs.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(stderr_for_child)
        .spawn()
        .map_err(|e| spawn_error(program, e))?;
    let fed = match child.stdin.take() {
        Some(mut stdin) => feed(&mut stdin),
        None => Ok(()),
    }; // the pipe closes here: the tool sees the end of its input
    let status =
        child.wait().map_err(|e| HostError::Io { what: format!("waiting for {}", program.display()), source: e })?;
    if !status.success() {
        let mut text = String::new();
        let _ = stderr.seek(std::io::SeekFrom::Start(0)).and_then(|_| stderr.read_to_string(&mut text));
        return Ok((Err(failed(program, args, status, text.as_bytes())), fed));
    }
    Ok((Ok(()), fed))
}

/// Starts a long-lived process in its own session, detached from the daemon: it keeps
/// running when the daemon dies. Its output goes to `log`. While the daemon lives, tokio
/// reaps it when it exits (its child handle is dropped unwaited: tokio's orphan queue).
pub fn spawn_detached(program: &Path, args: &[OsString], log: &Path) -> Result<ProcessHandle, HostError> {
    spawn_detached_split(program, args, log, log)
}

/// Like [`spawn_detached`], with standard output and standard error in separate files (a
/// VMM that writes the guest's serial console to its standard output).
pub fn spawn_detached_split(
    program: &Path,
    args: &[OsString],
    stdout_log: &Path,
    stderr_log: &Path,
) -> Result<ProcessHandle, HostError> {
    spawn(program, args, stdout_log, stderr_log, None, Vec::new())
}

/// Like [`spawn_detached`], as the VM's unprivileged `identity` under the seccomp filter
/// of [`confine`](super::confine): the process never runs a program's instruction as root.
/// Its logs are opened here, by the daemon: it can write them, not reopen them. `fds` are
/// its file descriptors 3, 4, … in order (devices only root may open, opened for it).
pub fn spawn_confined(
    program: &Path,
    args: &[OsString],
    log: &Path,
    identity: VmIdentity,
    extra_groups: &[u32],
    fds: Vec<std::os::fd::OwnedFd>,
) -> Result<ProcessHandle, HostError> {
    spawn(program, args, log, log, Some((identity, extra_groups.to_vec())), fds)
}

fn spawn(
    program: &Path,
    args: &[OsString],
    stdout_log: &Path,
    stderr_log: &Path,
    identity: Option<(VmIdentity, Vec<u32>)>,
    fds: Vec<std::os::fd::OwnedFd>,
) -> Result<ProcessHandle, HostError> {
    use std::os::fd::{AsRawFd, FromRawFd};
    // Each moved above the numbers it goes to first, so that no dup2 in the child closes one
    // still to be moved (a descriptor the daemon holds may well be 3 or 4).
    let mut high = Vec::with_capacity(fds.len());
    for fd in &fds {
        // SAFETY: fcntl on a descriptor this call owns; the result is checked.
        let moved = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 100) };
        if moved < 0 {
            return Err(spawn_error(program, std::io::Error::last_os_error()));
        }
        // SAFETY: `moved` is a new descriptor nothing else owns.
        high.push(unsafe { std::os::fd::OwnedFd::from_raw_fd(moved) });
    }
    drop(fds);
    let inherited: Vec<i32> = high.iter().map(AsRawFd::as_raw_fd).collect();
    let open_log =
        |log: &Path| OpenOptions::new().create(true).append(true).open(log).map_err(super::file_error("open", log));
    let mut command = tokio::process::Command::new(program);
    command.args(args).stdin(Stdio::null()).stdout(open_log(stdout_log)?).stderr(open_log(stderr_log)?);
    // Dropping the handle must not kill it: the VMM outlives this call, and the daemon.
    command.kill_on_drop(false);
    let filter = match identity {
        Some(_) => Some(super::confine::filter().map_err(|e| HostError::Spawn {
            program: program.to_owned(),
            source: std::io::Error::other(format!("the seccomp filter: {e}")),
        })?),
        None => None,
    };
    // SAFETY: setsid(), setgroups(), setres[ug]id(), prctl() and seccomp() are
    // async-signal-safe system calls; the filter was compiled before the fork.
    unsafe {
        command.pre_exec(move || {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            // dup2 leaves the new descriptor open across exec; the ones above stay
            // close-on-exec.
            for (target, fd) in (3..).zip(&inherited) {
                if libc::dup2(*fd, target) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if let (Some((identity, extra_groups)), Some(filter)) = (&identity, &filter) {
                super::confine::enter(*identity, extra_groups, filter)?;
            }
            Ok(())
        });
    }
    let child = command.spawn().map_err(|e| spawn_error(program, e))?;
    drop(high); // the child has its own
    let pid = child.id().ok_or_else(|| HostError::Spawn {
        program: program.to_owned(),
        source: std::io::Error::other("exited before its pid was read"),
    })?;
    let start_time = process::read_stat(Path::new("/proc"), pid).map(|s| s.start_time).unwrap_or(0);
    // Not awaited: dropped, tokio reaps it when it exits, so it never lingers as a zombie.
    drop(child);
    Ok(ProcessHandle { pid, start_time })
}

/// Finds `name` in `PATH` unless it is already a path.
pub fn resolve_program(name: &Path) -> Option<PathBuf> {
    if name.components().count() > 1 {
        return name.is_file().then(|| name.to_owned());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(name)).find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn descriptors_handed_to_a_process_are_its_3_and_4_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (three, four, log) = (dir.path().join("three"), dir.path().join("four"), dir.path().join("log"));
        let open = |path: &Path| std::os::fd::OwnedFd::from(std::fs::File::create(path).expect("create"));
        let script = "echo three >&3 && echo four >&4";
        let args: Vec<OsString> = vec!["-c".into(), script.into()];
        let handle =
            spawn(Path::new("/bin/sh"), &args, &log, &log, None, vec![open(&three), open(&four)]).expect("spawn");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::fs::read_to_string(&four).unwrap_or_default().is_empty()
            || Path::new(&format!("/proc/{}", handle.pid)).exists()
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the shell did not finish: {:?}",
                std::fs::read_to_string(&log)
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(std::fs::read_to_string(&three).expect("three"), "three\n");
        assert_eq!(std::fs::read_to_string(&four).expect("four"), "four\n");
    }
}
