//! PID-1 duty: fork the server into a child, reap every orphan, and re-fork the server when it dies.
//!
//! As init, the agent inherits every orphaned process in the guest (`sh -c 'sleep 1 &'`, children of
//! a killed shell). Tokio only reaps the children it spawned, and a `waitpid(-1)` inside the server
//! would steal their statuses from it, so the reaping happens in a separate process: PID 1 stays a
//! plain single-threaded loop around `waitpid(-1)`, and the gRPC server runs in its child.

use std::time::Duration;

use nix::errno::Errno;
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid, fork, getpid};

/// Pause before re-forking a server that died, so a server that cannot start does not spin.
const RESTART_DELAY: Duration = Duration::from_millis(200);

/// Returns at once unless this process is PID 1. As PID 1 it never returns in the parent:
/// it forks, returns in the child (which then runs the server), and reaps forever in the parent.
///
/// Must be called before any thread is started: `fork` copies only the calling thread.
pub fn supervise_if_pid1() {
    if getpid() != Pid::from_raw(1) {
        log!("--init given but not PID 1; serving without a supervisor");
        return;
    }
    loop {
        // SAFETY: the process is still single-threaded (no runtime, no other threads yet), so
        // the child may do anything a fresh process may, including allocating.
        match unsafe { fork() } {
            Ok(ForkResult::Child) => return,
            Ok(ForkResult::Parent { child }) => reap_until_exit_of(child),
            Err(err) => log!("fork of the server failed: {err}"),
        }
        std::thread::sleep(RESTART_DELAY);
    }
}

/// Reaps any child (orphans included) until `server` itself has ended.
fn reap_until_exit_of(server: Pid) {
    loop {
        match waitpid(Pid::from_raw(-1), None) {
            Ok(status) if status.pid() == Some(server) => {
                log!("server {server} ended ({}); restarting it", describe(status));
                return;
            }
            Ok(_) | Err(Errno::EINTR) => {}
            Err(err) => {
                // ECHILD would mean the server is gone without a status; start a new one.
                log!("waitpid failed: {err}; restarting the server");
                return;
            }
        }
    }
}

fn describe(status: WaitStatus) -> String {
    match status {
        WaitStatus::Exited(_, code) => format!("exit code {code}"),
        WaitStatus::Signaled(_, signal, _) => format!("killed by {signal}"),
        other => format!("{other:?}"),
    }
}
