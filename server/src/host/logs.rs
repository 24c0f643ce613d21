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

/// Streams `path` from `tail_bytes` before its end (0: the start); with `follow`, keeps
/// streaming appends until the client goes, `stopped` completes, or the file is removed.
pub async fn stream(
    path: PathBuf,
    tail_bytes: u64,
    follow: bool,
    stopped: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<ReceiverStream<Result<Vec<u8>, HostError>>, HostError> {
    let mut file = match tokio::fs::File::open(&path).await {
        Ok(file) => Some(file),
        // A VM that never booted has no log yet: empty, and followed until it appears.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(HostError::File { action: "open", path, source: e }),
    };
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
                        file = tokio::fs::File::open(&path).await.ok();
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
