//! The per-VM scratch file `handles.json`: transient handles that survive a daemon crash.

use std::{io::Write, path::Path};

use super::{HostError, file_error};
use crate::domain::VmHandles;

/// Writes the handles atomically (temp file, rename), mode 0600.
///
/// Not fsynced, on purpose: the file must survive the daemon's crash, which the page cache
/// does, not the host's, after which none of the processes or kernel objects it names exist
/// (a file the host crash truncated reads as corrupt, i.e. empty, and `/proc` is asked).
/// An fsync per handle was several milliseconds on the critical path of every boot.
///
/// The VM's processes may add files to its directory: the temp file is made anew, never
/// through a link or over a file someone else put there.
pub fn write_handles(path: &Path, handles: &VmHandles) -> Result<(), HostError> {
    let body = serde_json::to_vec_pretty(handles).map_err(|e| file_error("encode", path)(std::io::Error::other(e)))?;
    super::fs::replace_file(path, 0o600, |file, temp| file.write_all(&body).map_err(file_error("write", temp)))
}

/// Reads the handles; a missing file is no handles, a corrupt one is logged and treated as
/// none, and so is one the daemon's user does not own or a link (put there by a VM's
/// process: the handles name what the daemon kills and removes).
pub fn read_handles(path: &Path) -> VmHandles {
    use std::io::Read;
    /// Far more than any VM's handles take.
    const MAX_HANDLES_FILE: u64 = 1 << 20;
    let file = match super::fs::open_vm_file(path, false, super::fs::VmFileOwner::Daemon) {
        Ok(Some(file)) => file,
        Ok(None) => return VmHandles::default(),
        Err(error) => {
            tracing::warn!(path = %path.display(), error = %error, "handles file not the daemon's: ignored");
            return VmHandles::default();
        }
    };
    let mut body = Vec::new();
    if file.take(MAX_HANDLES_FILE).read_to_end(&mut body).is_err() {
        return VmHandles::default();
    }
    serde_json::from_slice(&body).unwrap_or_else(|err| {
        tracing::warn!(path = %path.display(), error = %err, "corrupt handles file ignored");
        VmHandles::default()
    })
}

/// Removes the scratch file; a missing one is fine.
pub fn remove_handles(path: &Path) {
    let _ = std::fs::remove_file(path);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::ProcessHandle;

    #[test]
    fn a_fifo_in_place_of_the_handles_reads_as_none_at_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("handles.json");
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o666)).expect("mkfifo");
        assert_eq!(read_handles(&path), VmHandles::default());
    }

    #[test]
    fn handles_round_trip_and_corrupt_files_read_as_empty() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("handles.json");
        assert_eq!(read_handles(&path), VmHandles::default());
        let handles = VmHandles { vmm: Some(ProcessHandle { pid: 7, start_time: 9 }), ..Default::default() };
        write_handles(&path, &handles).expect("write");
        assert_eq!(read_handles(&path), handles);
        std::fs::write(&path, b"{not json").expect("corrupt");
        assert_eq!(read_handles(&path), VmHandles::default());
        remove_handles(&path);
        assert!(!path.exists());
    }

    #[test]
    fn handles_someone_else_put_in_place_are_not_read_or_followed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("handles.json");
        let handles = VmHandles { vmm: Some(ProcessHandle { pid: 7, start_time: 9 }), ..Default::default() };
        // A link where a temp file could go (its name is never guessable): untouched.
        let target = dir.path().join("target");
        std::fs::write(&target, b"precious").expect("target");
        std::os::unix::fs::symlink(&target, path.with_extension("json.tmp")).expect("link");
        write_handles(&path, &handles).expect("write");
        assert_eq!(std::fs::read(&target).expect("target"), b"precious");
        assert_eq!(read_handles(&path), handles);
        // A link in place of the file itself is not followed.
        std::fs::remove_file(&path).expect("remove");
        let elsewhere = dir.path().join("elsewhere.json");
        write_handles(&elsewhere, &handles).expect("write");
        std::os::unix::fs::symlink(&elsewhere, &path).expect("link");
        assert_eq!(read_handles(&path), VmHandles::default());
        // Nor is a file another user owns (tests run as root: give it away).
        std::fs::remove_file(&path).expect("remove");
        write_handles(&path, &handles).expect("write");
        if nix::unistd::geteuid().is_root() {
            std::os::unix::fs::chown(&path, Some(900_001), None).expect("chown");
            assert_eq!(read_handles(&path), VmHandles::default());
        }
    }
}
