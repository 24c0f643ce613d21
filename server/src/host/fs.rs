//! Files and directories the daemon keeps (a VM's directory, an image's, the logs of failed
//! creates) and the source files a caller names, through tokio's file system API: `ops` never
//! blocks the runtime on a file, and never touches one but through here.

use std::path::{Path, PathBuf};

use super::{HostError, file_error};

/// Creates `dir` and its parents.
pub async fn create_dir(dir: &Path) -> Result<(), HostError> {
    tokio::fs::create_dir_all(dir).await.map_err(file_error("create", dir))
}

/// Removes `dir` and everything in it; one already gone is fine.
pub async fn remove_dir(dir: &Path) -> Result<(), HostError> {
    match tokio::fs::remove_dir_all(dir).await {
        Err(source) if source.kind() != std::io::ErrorKind::NotFound => Err(file_error("remove", dir)(source)),
        _ => Ok(()),
    }
}

/// Removes a file; one already gone is fine.
pub async fn remove_file(path: &Path) -> Result<(), HostError> {
    match tokio::fs::remove_file(path).await {
        Err(source) if source.kind() != std::io::ErrorKind::NotFound => Err(file_error("remove", path)(source)),
        _ => Ok(()),
    }
}

/// Removes a file if it can (a socket left by a process that is gone).
pub async fn remove_file_quietly(path: &Path) {
    let _ = tokio::fs::remove_file(path).await;
}

/// True when something exists at `path` (false also when it cannot be looked at).
pub async fn exists(path: &Path) -> bool {
    tokio::fs::try_exists(path).await.unwrap_or(false)
}

/// True when `path` is a regular file (following links).
pub async fn is_file(path: &Path) -> bool {
    tokio::fs::metadata(path).await.is_ok_and(|meta| meta.is_file())
}

/// A small text file's content.
pub async fn read_to_string(path: &Path) -> Result<String, HostError> {
    tokio::fs::read_to_string(path).await.map_err(file_error("read", path))
}

/// The size of a file.
pub async fn file_len(path: &Path) -> Result<u64, HostError> {
    tokio::fs::metadata(path).await.map(|meta| meta.len()).map_err(file_error("stat", path))
}

/// What a source file a caller named looks like.
#[derive(Debug)]
pub enum Source {
    /// A regular file, and its first bytes (at most the number asked for).
    File {
        /// Its first bytes.
        head: Vec<u8>,
        /// Its size.
        len: u64,
    },
    /// Something else: a directory, a device, a FIFO, a socket.
    NotAFile,
}

/// Opens `path` and reads up to `bytes` of it: what a caller named is checked by reading it,
/// so that a file the daemon cannot read is refused before any work starts.
pub async fn inspect_source(path: &Path, bytes: u64) -> std::io::Result<Source> {
    use tokio::io::AsyncReadExt;
    let meta = tokio::fs::metadata(path).await?;
    if !meta.is_file() {
        return Ok(Source::NotAFile);
    }
    let mut head = Vec::with_capacity(bytes as usize);
    tokio::fs::File::open(path).await?.take(bytes).read_to_end(&mut head).await?;
    Ok(Source::File { head, len: meta.len() })
}

/// The entries of `dir` whose names parse as `T` (e.g. VM or image ids), with their paths;
/// none when `dir` does not exist.
pub async fn entries_named<T: std::str::FromStr>(dir: &Path) -> Vec<(T, PathBuf)> {
    let mut found = Vec::new();
    let Ok(mut entries) = tokio::fs::read_dir(dir).await else { return found };
    while let Ok(Some(entry)) = entries.next_entry().await {
        if let Some(name) = entry.file_name().to_str().and_then(|name| name.parse::<T>().ok()) {
            found.push((name, entry.path()));
        }
    }
    found
}

/// Copies the logs that exist among `logs` into `into`, then prunes `into`'s siblings (the
/// logs of earlier failures) to the latest `keep`. Best effort: a failed create must not
/// fail again because its logs could not be kept.
pub async fn keep_logs(logs: &[&Path], into: &Path, keep: usize) {
    let mut any = false;
    for log in logs {
        any |= exists(log).await;
    }
    if any && tokio::fs::create_dir_all(into).await.is_ok() {
        for log in logs {
            if let Some(file) = log.file_name() {
                let _ = tokio::fs::copy(log, into.join(file)).await;
            }
        }
    }
    let Some(all) = into.parent() else { return };
    let Ok(mut entries) = tokio::fs::read_dir(all).await else { return };
    let mut kept = Vec::new();
    while let Ok(Some(entry)) = entries.next_entry().await {
        if let Ok(modified) = entry.metadata().await.and_then(|meta| meta.modified()) {
            kept.push((modified, entry.path()));
        }
    }
    kept.sort();
    let excess = kept.len().saturating_sub(keep);
    for (_, old) in kept.into_iter().take(excess) {
        let _ = tokio::fs::remove_dir_all(old).await;
    }
}
