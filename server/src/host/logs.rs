//! A VM's console or VMM log for `StreamVmLogs`: its end or all of it, then (following) what
//! is appended. Read in chunks through a bounded channel: a large log never sits in memory.

use std::{io::SeekFrom, path::PathBuf, time::Duration};

use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio_stream::wrappers::ReceiverStream;

use super::HostError;

/// Bytes per message.
const CHUNK: usize = 64 * 1024;
/// How often a followed log is checked for growth.
const FOLLOW_POLL: Duration = Duration::from_millis(200);

/// Keeps the log at `path` at most `max_bytes` long: when it is longer, its oldest part is
/// cut so that about half of `max_bytes` is left, the newest. Its writers append
/// (`O_APPEND`), so they go on writing at its new end. Cut in place where the file system
/// can collapse a range of a file (ext4, XFS); elsewhere the log is emptied. Returns the
/// bytes dropped. Never follows a link; a missing log is fine.
pub fn cap(path: &std::path::Path, max_bytes: u64) -> Result<u64, HostError> {
    use std::os::unix::fs::MetadataExt;
    // A VM's processes write its console log: opened as such a file may be; one that is not
    // a file of the daemon's or the VM's (a FIFO, a link) is skipped, never waited on.
    let file = match super::fs::open_vm_file(path, true, super::fs::VmFileOwner::DaemonOrVm) {
        Ok(Some(file)) => file,
        Ok(None) => return Ok(0),
        Err(error) => {
            tracing::warn!(log = %path.display(), error = %error, "log not capped");
            return Ok(0);
        }
    };
    let meta = file.metadata().map_err(super::file_error("stat", path))?;
    if !meta.is_file() || meta.len() <= max_bytes {
        return Ok(0);
    }
    let block = meta.blksize().max(512);
    let cut = (meta.len() - max_bytes / 2) / block * block;
    let flags = nix::fcntl::FallocateFlags::FALLOC_FL_COLLAPSE_RANGE;
    let collapsed = cut > 0 && nix::fcntl::fallocate(&file, flags, 0, cut as libc::off_t).is_ok();
    if collapsed {
        return Ok(cut);
    }
    file.set_len(0).map_err(super::file_error("truncate", path))?;
    Ok(meta.len())
}

/// [`cap`] of every log in `paths`, on a blocking thread; returns the bytes dropped.
pub async fn cap_all(paths: Vec<std::path::PathBuf>, max_bytes: u64) -> Result<u64, HostError> {
    tokio::task::spawn_blocking(move || {
        let mut dropped = 0;
        for path in paths {
            let cut = cap(&path, max_bytes)?;
            if cut > 0 {
                tracing::info!(log = %path.display(), bytes = cut, "log over its cap: oldest part dropped");
            }
            dropped += cut;
        }
        Ok(dropped)
    })
    .await
    .map_err(|e| HostError::Io { what: "cap logs".into(), source: std::io::Error::other(e) })?
}

/// Streams `path` from `tail_bytes` before its end (0: the start); with `follow`, keeps
/// streaming appends until the client goes, `stopped` completes, or the file is removed.
pub async fn stream(
    path: PathBuf,
    tail_bytes: u64,
    follow: bool,
    stopped: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<ReceiverStream<Result<Vec<u8>, HostError>>, HostError> {
    // The VM's processes own its directory's console log: opened as such a file may be.
    // A VM that never booted has no log yet: empty, and followed until it appears.
    let mut file = open_log(&path)?;
    let mut position = 0;
    if let Some(file) = file.as_mut() {
        let len = file.metadata().await.map(|m| m.len()).unwrap_or(0);
        position = if tail_bytes == 0 { 0 } else { len.saturating_sub(tail_bytes) };
        file.seek(SeekFrom::Start(position)).await.map_err(super::file_error("seek", &path))?;
    }
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        tokio::pin!(stopped);
        let mut buf = vec![0u8; CHUNK];
        loop {
            if let Some(open) = file.as_mut() {
                match open.read(&mut buf).await {
                    Ok(0) => {}
                    Ok(n) => {
                        position += n as u64;
                        if tx.send(Ok(buf[..n].to_vec())).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(HostError::File { action: "read", path: path.clone(), source: e })).await;
                        return;
                    }
                }
            }
            if !follow {
                return;
            }
            tokio::select! {
                () = tokio::time::sleep(FOLLOW_POLL) => {}
                () = tx.closed() => return,
                () = &mut stopped => return,
            }
            match tokio::fs::metadata(&path).await {
                // Removed with its VM: the stream ends.
                Err(_) if file.is_some() => return,
                Err(_) => {}
                Ok(meta) => {
                    if file.is_none() {
                        file = open_log(&path).ok().flatten();
                        position = 0;
                    } else if meta.len() < position {
                        // Truncated: start over from its new beginning.
                        if let Some(open) = file.as_mut() {
                            let _ = open.seek(SeekFrom::Start(0)).await;
                        }
                        position = 0;
                    }
                }
            }
        }
    });
    Ok(ReceiverStream::new(rx))
}

/// Opens a log of a VM's for reading ([`super::fs::open_vm_file`]).
fn open_log(path: &std::path::Path) -> Result<Option<tokio::fs::File>, HostError> {
    let opened = super::fs::open_vm_file(path, false, super::fs::VmFileOwner::DaemonOrVm)?;
    Ok(opened.map(tokio::fs::File::from_std))
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn a_fifo_or_a_link_in_place_of_a_log_is_skipped_never_waited_on_or_followed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fifo = dir.path().join("console.log");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o666)).expect("mkfifo");
        assert_eq!(cap(&fifo, 1).expect("skipped"), 0);
        let target = dir.path().join("precious");
        std::fs::write(&target, vec![b'x'; 4096]).expect("write");
        let link = dir.path().join("vmm.log");
        std::os::unix::fs::symlink(&target, &link).expect("symlink");
        assert_eq!(cap(&link, 1).expect("skipped"), 0);
        assert_eq!(std::fs::metadata(&target).expect("stat").len(), 4096, "the link's target is untouched");
    }

    #[test]
    fn a_log_over_its_cap_keeps_its_newest_part_and_its_writer_appends_after_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("console.log");
        let mut writer = std::fs::OpenOptions::new().create(true).append(true).open(&path).expect("open");
        let line = |n: u32| format!("line {n:07}\n");
        for n in 0..300_000 {
            writer.write_all(line(n).as_bytes()).expect("write");
        }
        let before = std::fs::metadata(&path).expect("meta").len();
        assert_eq!(cap(&path, 8 << 20).expect("under the cap"), 0);
        let dropped = cap(&path, 1 << 20).expect("cap");
        let after = std::fs::metadata(&path).expect("meta").len();
        assert_eq!(before - dropped, after);
        assert!(after <= 1 << 20, "{after} bytes left");
        writer.write_all(b"appended\n").expect("write");
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(text.ends_with(&format!("{}appended\n", line(299_999))), "the newest part is kept");
        // A link is never followed: skipped, its target left as it is.
        let link = dir.path().join("link.log");
        std::os::unix::fs::symlink(&path, &link).expect("link");
        assert_eq!(cap(&link, 1).expect("skipped"), 0);
        assert_eq!(std::fs::metadata(&path).expect("meta").len(), after + 9);
    }
}
