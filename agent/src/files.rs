//! ReadFile and WriteFile: regular files in and out of the guest, streamed in chunks with
//! backpressure (a bounded channel towards tonic on the way out, one chunk at a time on the
//! way in), so a large file never sits in memory. A write goes to a temporary file beside the
//! target and is renamed over it once complete: the file appears whole or not at all.

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

/// Opens a regular file and streams its info, then its content.
pub async fn read(path: &str) -> Result<ReadStream, Status> {
    let path = absolute(path)?;
    let mut file = tokio::fs::File::open(&path).await.map_err(|e| io_status("open", &path, e))?;
    let meta = file.metadata().await.map_err(|e| io_status("stat", &path, e))?;
    if !meta.is_file() {
        return Err(Status::failed_precondition(format!("{} is not a regular file", path.display())));
    }
    let (tx, rx) = tokio::sync::mpsc::channel(BUFFER);
    let info = FileInfo { mode: meta.permissions().mode() & 0o7777, size: meta.len() };
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
