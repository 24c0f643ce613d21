//! One daemon per state dir: an exclusive `flock` on `<state>/bangerd.lock`, taken before
//! anything else and held for the daemon's life. The file says the holder's PID. The lock
//! goes with the process (a SIGKILLed daemon holds nothing), and its descriptor is
//! close-on-exec: no VMM the daemon starts inherits it.

use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

/// The held lock; released when dropped (or when the process ends).
#[derive(Debug)]
pub struct StateDirLock {
    _lock: Flock<std::fs::File>,
    path: PathBuf,
}

/// Why the lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another daemon holds it.
    #[error(
        "another bangerd{} uses the state dir {}: one daemon per state dir (stop it, or give this one another --state-dir)",
        holder.map(|pid| format!(" (pid {pid})")).unwrap_or_default(),
        dir.display()
    )]
    Held {
        /// The state dir.
        dir: PathBuf,
        /// The PID the lock file names, when it names one.
        holder: Option<u32>,
    },
    /// The lock file could not be made or locked.
    #[error("cannot lock {}: {source}", path.display())]
    Io {
        /// The lock file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

impl StateDirLock {
    /// Takes the lock on `state_dir` (made if missing) or says who holds it.
    pub fn acquire(state_dir: &Path) -> Result<Self, LockError> {
        let path = state_dir.join("bangerd.lock");
        let io = |source| LockError::Io { path: path.clone(), source };
        super::fs::make_dir(state_dir, 0o711).map_err(|e| io(std::io::Error::other(e)))?;
        let file =
            std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(io)?;
        let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                return Err(LockError::Held { dir: state_dir.to_owned(), holder: text.trim().parse().ok() });
            }
            Err((_, errno)) => return Err(io(std::io::Error::from(errno))),
        };
        lock.set_len(0).map_err(io)?;
        lock.rewind().map_err(io)?;
        writeln!(lock, "{}", std::process::id()).map_err(io)?;
        Ok(StateDirLock { _lock: lock, path })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_naming_the_first_and_the_lock_goes_with_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = StateDirLock::acquire(dir.path()).expect("first");
        assert_eq!(std::fs::read_to_string(first.path()).expect("lock file").trim(), std::process::id().to_string());
        match StateDirLock::acquire(dir.path()) {
            Err(LockError::Held { holder, .. }) => assert_eq!(holder, Some(std::process::id())),
            other => panic!("a second lock was taken: {other:?}"),
        }
        drop(first);
        StateDirLock::acquire(dir.path()).expect("free again once dropped");
    }
}
