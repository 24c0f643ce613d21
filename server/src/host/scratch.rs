//! The per-VM scratch file `handles.json`: transient handles that survive a daemon crash.

use std::{io::Write, os::unix::fs::OpenOptionsExt, path::Path};

use super::{HostError, file_error};
use crate::domain::VmHandles;

/// Writes the handles atomically (temp file, rename), mode 0600.
///
/// Not fsynced, on purpose: the file must survive the daemon's crash, which the page cache
/// does, not the host's, after which none of the processes or kernel objects it names exist
/// (a file the host crash truncated reads as corrupt, i.e. empty, and `/proc` is asked).
/// An fsync per handle was several milliseconds on the critical path of every boot.
pub fn write_handles(path: &Path, handles: &VmHandles) -> Result<(), HostError> {
    let tmp = path.with_extension("json.tmp");
    let body = serde_json::to_vec_pretty(handles).map_err(|e| file_error("encode", path)(std::io::Error::other(e)))?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(file_error("create", &tmp))?;
    file.write_all(&body).map_err(file_error("write", &tmp))?;
    std::fs::rename(&tmp, path).map_err(file_error("rename", &tmp))?;
    Ok(())
}

/// Reads the handles; a missing file is no handles, a corrupt one is logged and treated as none.
pub fn read_handles(path: &Path) -> VmHandles {
    match std::fs::read(path) {
        Ok(body) => serde_json::from_slice(&body).unwrap_or_else(|err| {
            tracing::warn!(path = %path.display(), error = %err, "corrupt handles file ignored");
            VmHandles::default()
        }),
        Err(_) => VmHandles::default(),
    }
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
}
