//! ReadFile and WriteFile: regular files in and out of the guest, streamed in chunks with
//! backpressure (a bounded channel towards tonic on the way out, one chunk at a time on the
//! way in), so a large file never sits in memory. A write goes to a temporary file beside the
//! target and is renamed over it once complete: the file appears whole or not at all. An
//! archive write (a tar stream) is extracted, as it arrives, into a directory beside the
//! target, which it replaces once complete: the same all-or-nothing for a whole tree.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;

use banger_proto::agent::v1::read_file_response::Payload as ReadPayload;
use banger_proto::agent::v1::write_file_request::Payload as WritePayload;
use banger_proto::agent::v1::{FileInfo, ReadFileResponse, WriteFileRequest, WriteFileResponse};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

/// The response stream of one ReadFile call.
pub type ReadStream = Pin<Box<dyn Stream<Item = Result<ReadFileResponse, Status>> + Send>>;

/// Content bytes per message.
const CHUNK: usize = 256 * 1024;
/// Messages buffered towards tonic before reading waits.
const BUFFER: usize = 4;

fn absolute(path: &str) -> Result<PathBuf, Status> {
    let path = PathBuf::from(path);
    if !path.is_absolute() {
        return Err(Status::invalid_argument(format!("{} is not an absolute path", path.display())));
    }
    Ok(path)
}

fn io_status(what: &str, path: &Path, err: std::io::Error) -> Status {
    let message = format!("{what} {}: {err}", path.display());
    match err.kind() {
        std::io::ErrorKind::NotFound => Status::not_found(message),
        std::io::ErrorKind::PermissionDenied => Status::permission_denied(message),
        std::io::ErrorKind::AlreadyExists | std::io::ErrorKind::IsADirectory => Status::failed_precondition(message),
        _ => Status::internal(message),
    }
}

/// Opens a regular file and streams its info, then its content; with `archive`, a directory
/// comes as a tar stream of it.
pub async fn read(path: &str, archive: bool) -> Result<ReadStream, Status> {
    let path = absolute(path)?;
    if archive && tokio::fs::symlink_metadata(&path).await.is_ok_and(|m| m.is_dir()) {
        return read_archive(path).await;
    }
    let mut file = tokio::fs::File::open(&path).await.map_err(|e| io_status("open", &path, e))?;
    let meta = file.metadata().await.map_err(|e| io_status("stat", &path, e))?;
    if !meta.is_file() {
        return Err(Status::failed_precondition(format!("{} is not a regular file", path.display())));
    }
    let (tx, rx) = tokio::sync::mpsc::channel(BUFFER);
    let info = FileInfo { mode: meta.permissions().mode() & 0o7777, size: meta.len(), archive: false };
    tokio::spawn(async move {
        if tx.send(Ok(ReadFileResponse { payload: Some(ReadPayload::Info(info)) })).await.is_err() {
            return;
        }
        let mut buf = vec![0u8; CHUNK];
        loop {
            match file.read(&mut buf).await {
                Ok(0) => return,
                Ok(n) => {
                    let data = ReadFileResponse { payload: Some(ReadPayload::Data(buf[..n].to_vec())) };
                    if tx.send(Ok(data)).await.is_err() {
                        return; // the host went away
                    }
                }
                Err(err) => {
                    let _ = tx.send(Err(io_status("read", &path, err))).await;
                    return;
                }
            }
        }
    });
    Ok(Box::pin(ReceiverStream::new(rx)))
}

/// A directory as a tar stream: its info first (`archive`), then the archive a blocking thread
/// writes, one chunk at a time (backpressure as for a file).
async fn read_archive(path: PathBuf) -> Result<ReadStream, Status> {
    let meta = tokio::fs::metadata(&path).await.map_err(|e| io_status("stat", &path, e))?;
    let (tx, rx) = tokio::sync::mpsc::channel(BUFFER);
    let info = FileInfo { mode: meta.permissions().mode() & 0o7777, size: 0, archive: true };
    let _ = tx.send(Ok(ReadFileResponse { payload: Some(ReadPayload::Info(info)) })).await;
    tokio::task::spawn_blocking(move || {
        let mut writer = ChunkSender { tx: tx.clone(), buffer: Vec::with_capacity(CHUNK) };
        if let Err(err) = archive_dir(&path, &mut writer) {
            let _ = tx.blocking_send(Err(io_status("archive", &path, err)));
        }
    });
    Ok(Box::pin(ReceiverStream::new(rx)))
}

/// Writes `dir` as a tar stream: regular files, directories and symbolic links (never
/// followed), in name order; sockets, FIFOs and devices are left out.
fn archive_dir(dir: &Path, writer: &mut ChunkSender) -> std::io::Result<()> {
    use std::io::Write;
    let mut builder = tar::Builder::new(&mut *writer);
    builder.follow_symlinks(false);
    builder.mode(tar::HeaderMode::Complete);
    let mut pending = vec![PathBuf::new()];
    while let Some(relative) = pending.pop() {
        let mut names: Vec<_> = std::fs::read_dir(dir.join(&relative))?.filter_map(Result::ok).collect();
        names.sort_by_key(std::fs::DirEntry::file_name);
        for entry in names.into_iter().rev() {
            let name = relative.join(entry.file_name());
            let kind = entry.file_type()?;
            if kind.is_dir() {
                builder.append_path_with_name(dir.join(&name), &name)?;
                pending.push(name);
            } else if kind.is_file() || kind.is_symlink() {
                builder.append_path_with_name(dir.join(&name), &name)?;
            }
        }
    }
    builder.finish()?;
    drop(builder);
    writer.flush()
}

/// A `Write` that sends full chunks as `Data` messages (blocking: for a blocking thread).
struct ChunkSender {
    tx: tokio::sync::mpsc::Sender<Result<ReadFileResponse, Status>>,
    buffer: Vec<u8>,
}

impl std::io::Write for ChunkSender {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buffer.extend_from_slice(data);
        if self.buffer.len() >= CHUNK {
            self.flush()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let data = std::mem::replace(&mut self.buffer, Vec::with_capacity(CHUNK));
        let message = ReadFileResponse { payload: Some(ReadPayload::Data(data)) };
        self.tx.blocking_send(Ok(message)).map_err(|_| std::io::Error::other("the host went away"))
    }
}

/// Removes the temporary file unless the write completed.
struct Aside(Option<PathBuf>);

impl Drop for Aside {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Writes the streamed content aside, then renames it over the target.
pub async fn write(mut requests: Streaming<WriteFileRequest>) -> Result<WriteFileResponse, Status> {
    let start = match requests.message().await? {
        Some(WriteFileRequest { payload: Some(WritePayload::Start(start)) }) => start,
        _ => return Err(Status::invalid_argument("the first WriteFile message must name the file")),
    };
    let path = absolute(&start.path)?;
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(Status::invalid_argument(format!("{} names no file", path.display())));
    };
    if start.archive {
        return write_archive(&path, dir, &name.to_string_lossy(), requests).await;
    }
    if tokio::fs::metadata(&path).await.is_ok_and(|m| m.is_dir()) {
        return Err(Status::failed_precondition(format!("{} is a directory", path.display())));
    }
    let temp = dir.join(format!(".{}.banger-{}", name.to_string_lossy(), std::process::id()));
    let mut aside = Aside(Some(temp.clone()));
    let mut file = tokio::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temp)
        .await
        .map_err(|e| io_status("create", &temp, e))?;
    let mut size = 0u64;
    loop {
        match requests.message().await?.and_then(|m| m.payload) {
            Some(WritePayload::Data(data)) => {
                file.write_all(&data).await.map_err(|e| io_status("write", &temp, e))?;
                size += data.len() as u64;
            }
            Some(WritePayload::End(sent)) if sent == size => break,
            Some(WritePayload::End(sent)) => {
                return Err(Status::data_loss(format!("{sent} bytes were sent, {size} arrived")));
            }
            Some(WritePayload::Start(_)) => {
                return Err(Status::invalid_argument("only content may follow the first WriteFile message"));
            }
            None => return Err(Status::aborted("the stream ended before its end message: nothing was written")),
        }
    }
    file.sync_all().await.map_err(|e| io_status("sync", &temp, e))?;
    let mode = if start.mode == 0 { 0o644 } else { start.mode & 0o7777 };
    tokio::fs::set_permissions(&temp, std::fs::Permissions::from_mode(mode))
        .await
        .map_err(|e| io_status("chmod", &temp, e))?;
    tokio::fs::rename(&temp, &path).await.map_err(|e| io_status("rename to", &path, e))?;
    aside.0 = None;
    Ok(WriteFileResponse { size })
}

/// Removes a staging directory unless the write completed.
struct AsideDir(Option<PathBuf>);

impl Drop for AsideDir {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = std::fs::remove_dir_all(path);
        }
    }
}

/// Distinguishes the staging directories of concurrent writes.
static STAGING: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Extracts a tar stream into a new directory beside `path` as it arrives (a blocking thread
/// reads the chunks), then puts it in place of `path` (a directory there is replaced).
async fn write_archive(
    path: &Path,
    dir: &Path,
    name: &str,
    mut requests: Streaming<WriteFileRequest>,
) -> Result<WriteFileResponse, Status> {
    if tokio::fs::symlink_metadata(path).await.is_ok_and(|m| !m.is_dir()) {
        return Err(Status::failed_precondition(format!("{} exists and is not a directory", path.display())));
    }
    let n = STAGING.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let staging = dir.join(format!(".{name}.banger-{}-{n}", std::process::id()));
    tokio::fs::create_dir(&staging).await.map_err(|e| io_status("create", &staging, e))?;
    let mut aside = AsideDir(Some(staging.clone()));
    let (tx, rx) = tokio::sync::mpsc::channel::<Vec<u8>>(BUFFER);
    let into = staging.clone();
    let extracting = tokio::task::spawn_blocking(move || extract(ChunkReader { rx, chunk: Vec::new(), at: 0 }, &into));
    let mut size = 0u64;
    // Whatever ends the stream, the extractor is waited for before the staging directory can
    // go (it might still be writing into it).
    let received: Result<(), Status> = async {
        while let Some(payload) = requests.message().await?.and_then(|m| m.payload) {
            match payload {
                WritePayload::Data(data) => {
                    size += data.len() as u64;
                    // The extractor stopped (a bad entry): its error is the answer.
                    if tx.send(data).await.is_err() {
                        return Ok(());
                    }
                }
                WritePayload::End(sent) if sent == size => return Ok(()),
                WritePayload::End(sent) => {
                    return Err(Status::data_loss(format!("{sent} bytes were sent, {size} arrived")));
                }
                WritePayload::Start(_) => {
                    return Err(Status::invalid_argument("only content may follow the first WriteFile message"));
                }
            }
        }
        Err(Status::aborted("the stream ended before its end message: nothing was written"))
    }
    .await;
    drop(tx);
    let extracted = extracting.await.map_err(|e| Status::internal(format!("extracting: {e}")))?;
    if let Err(why) = extracted {
        return Err(Status::invalid_argument(format!("the archive for {}: {why}", path.display())));
    }
    received?;
    let old = dir.join(format!(".{name}.banger-old-{}-{n}", std::process::id()));
    let replacing = tokio::fs::symlink_metadata(path).await.is_ok();
    if replacing {
        tokio::fs::rename(path, &old).await.map_err(|e| io_status("move aside", path, e))?;
    }
    if let Err(err) = tokio::fs::rename(&staging, path).await {
        if replacing {
            let _ = tokio::fs::rename(&old, path).await;
        }
        return Err(io_status("rename to", path, err));
    }
    aside.0 = None;
    if replacing {
        let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(old)).await;
    }
    Ok(WriteFileResponse { size })
}

/// The chunks of a stream, as a blocking reader.
struct ChunkReader {
    rx: tokio::sync::mpsc::Receiver<Vec<u8>>,
    chunk: Vec<u8>,
    at: usize,
}

impl std::io::Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.at >= self.chunk.len() {
            match self.rx.blocking_recv() {
                Some(chunk) => (self.chunk, self.at) = (chunk, 0),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.chunk.len() - self.at);
        buf[..n].copy_from_slice(&self.chunk[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// Unpacks `reader`'s tar stream into `into`: regular files, directories and symbolic links,
/// with their modes and times; anything else, or an entry that would land outside `into`, is
/// an error.
fn extract(reader: impl std::io::Read, into: &Path) -> Result<u64, String> {
    use tar::EntryType;
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(true);
    archive.set_unpack_xattrs(false);
    archive.set_overwrite(true);
    let mut entries = 0u64;
    for entry in archive.entries().map_err(|e| e.to_string())? {
        let mut entry = entry.map_err(|e| e.to_string())?;
        let name = entry.path().map(|p| p.display().to_string()).unwrap_or_else(|_| "an entry".into());
        match entry.header().entry_type() {
            EntryType::Regular | EntryType::Continuous | EntryType::Directory | EntryType::Symlink => {}
            EntryType::XGlobalHeader => continue,
            other => {
                return Err(format!("{name}: {other:?} entries are not copied (files, directories and links only)"));
            }
        }
        match entry.unpack_in(into) {
            Ok(true) => entries += 1,
            Ok(false) => return Err(format!("{name} would land outside the directory")),
            Err(err) => return Err(format!("{name}: {err}")),
        }
    }
    // What follows the end-of-archive blocks (a writer's padding to its record size) is read
    // to the end, so that the sender is never refused a chunk of a good archive.
    std::io::copy(&mut archive.into_inner(), &mut std::io::sink()).map_err(|e| e.to_string())?;
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn archive(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        build(&mut builder);
        builder.into_inner().expect("tar")
    }

    fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(kind);
        header.set_mode(mode);
        header.set_size(size);
        header
    }

    #[test]
    fn an_archive_keeps_modes_and_links_and_nothing_lands_outside() {
        let into = tempfile::tempdir().expect("tempdir");
        let good = archive(|b| {
            b.append_data(&mut header(tar::EntryType::Directory, 0o750, 0), "d", &[][..]).expect("dir");
            b.append_data(&mut header(tar::EntryType::Regular, 0o755, 2), "d/run", &b"hi"[..]).expect("file");
            let mut link = header(tar::EntryType::Symlink, 0o777, 0);
            b.append_link(&mut link, "l", "d/run").expect("link");
        });
        assert_eq!(extract(&good[..], into.path()), Ok(3));
        let run = into.path().join("d/run");
        assert_eq!(std::fs::read(&run).expect("run"), b"hi");
        assert_eq!(std::fs::metadata(&run).expect("meta").permissions().mode() & 0o7777, 0o755);
        assert_eq!(std::fs::read_link(into.path().join("l")).expect("link"), Path::new("d/run"));

        // A link out, then a file written through it: refused, nothing written outside.
        let outside = tempfile::tempdir().expect("outside");
        let escape = archive(|b| {
            let mut link = header(tar::EntryType::Symlink, 0o777, 0);
            b.append_link(&mut link, "out", outside.path()).expect("link");
            b.append_data(&mut header(tar::EntryType::Regular, 0o644, 1), "out/x", &b"x"[..]).expect("file");
        });
        let fresh = tempfile::tempdir().expect("tempdir");
        assert!(extract(&escape[..], fresh.path()).is_err());
        assert!(!outside.path().join("x").exists());

        // Hard links and devices are not copied.
        let hard = archive(|b| {
            b.append_data(&mut header(tar::EntryType::Regular, 0o644, 1), "a", &b"a"[..]).expect("file");
            let mut link = header(tar::EntryType::Link, 0o644, 0);
            b.append_link(&mut link, "b", "a").expect("hard link");
        });
        let err = extract(&hard[..], tempfile::tempdir().expect("tempdir").path()).expect_err("hard link");
        assert!(err.contains("b: Link"), "{err}");
    }
}
