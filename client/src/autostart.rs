//! Starting bangerd when the CLI finds nobody serving the default socket.

use std::{
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use banger_client::{Client, ClientError, Target};

/// How long a freshly started daemon may take to become healthy.
const HEALTHY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long to wait for another daemon on the socket once the one started here exited.
const LOST_RACE_WAIT: Duration = Duration::from_secs(10);

/// The bangerd binary: next to this banger binary, else from PATH.
fn bangerd_binary() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.join("bangerd")))
        .filter(|candidate| candidate.is_file())
        .unwrap_or_else(|| PathBuf::from("bangerd"))
}

/// Starts `bangerd --socket SOCKET` in its own process group (so a Ctrl-C at this terminal
/// does not reach it), with its output in `bangerd.log` beside the socket, and waits until
/// its health service says SERVING. Returns a connected client.
pub async fn start_daemon(socket: &Path) -> Result<Client, String> {
    let dir = socket.parent().unwrap_or(Path::new("/"));
    if !dir.exists() {
        // 0755 set explicitly (the create mode would be masked by the umask): the socket's
        // group reaches the socket through it.
        std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .map_err(|e| format!("cannot chmod {}: {e}", dir.display()))?;
    }
    let log_path = dir.join("bangerd.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| format!("cannot open {}: {e}", log_path.display()))?;
    let stderr = log.try_clone().map_err(|e| format!("cannot open {}: {e}", log_path.display()))?;
    let binary = bangerd_binary();
    let mut child = Command::new(&binary)
        .arg("--socket")
        .arg(socket)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(stderr)
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
    eprintln!("banger: started bangerd (pid {}, log {})", child.id(), log_path.display());
    let deadline = Instant::now() + HEALTHY_TIMEOUT;
    let target = Target::Unix(socket.to_owned());
    // A daemon that exits at once may have lost the race for the state dir to another
    // CLI's autostart: that one may still come up on the socket, so wait a little for it.
    let mut exited: Option<(std::process::ExitStatus, Instant)> = None;
    loop {
        if exited.is_none()
            && let Ok(Some(status)) = child.try_wait()
        {
            exited = Some((status, Instant::now()));
        }
        if let Some((status, at)) = exited
            && at.elapsed() >= LOST_RACE_WAIT
        {
            return Err(format!("bangerd exited with {status}; see {}", log_path.display()));
        }
        if let Ok(client) = Client::connect(&target).await
            && client.serving().await
        {
            // The daemon outlives this command; its exit is reaped by init once we exit.
            return Ok(client);
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "bangerd did not become healthy within {} s; see {}",
                HEALTHY_TIMEOUT.as_secs(),
                log_path.display()
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// True when connecting failed because nothing serves the socket (as opposed to, say, a
/// malformed endpoint, or a socket this user may not connect to: starting another daemon
/// would not help, and would fight the one serving).
pub fn nobody_serving(err: &ClientError) -> bool {
    matches!(err, ClientError::Connect { .. }) && !err.permission_denied()
}
