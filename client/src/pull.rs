//! `banger image import` of container images: the request, and the progress the daemon
//! streams, shown like `docker pull` (one line redrawn on a terminal, a line per stage
//! otherwise).

use std::io::{IsTerminal, Read, Write};
use std::path::Path;

use banger_client::Client;
use banger_proto::v1 as pb;
use tokio_stream::StreamExt;
use tonic::Status;

/// Splits `DIR[:TAG]`: the part after the last `:` is a tag when it has no `/`.
pub fn split_layout_tag(layout: &str) -> (String, Option<String>) {
    match layout.rsplit_once(':') {
        Some((dir, tag)) if !dir.is_empty() && !tag.is_empty() && !tag.contains('/') => {
            (dir.to_owned(), Some(tag.to_owned()))
        }
        _ => (layout.to_owned(), None),
    }
}

/// Shows a pull's progress on standard error.
struct Progress {
    terminal: bool,
    stage: String,
    drawn: bool,
}

fn megabytes(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

impl Progress {
    fn new() -> Self {
        Progress { terminal: std::io::stderr().is_terminal(), stage: String::new(), drawn: false }
    }

    fn show(&mut self, progress: &pb::ImageProgress) {
        let mut stderr = std::io::stderr();
        let new_stage = progress.stage != self.stage;
        if new_stage {
            if self.drawn {
                let _ = writeln!(stderr);
                self.drawn = false;
            }
            self.stage = progress.stage.clone();
            if !self.terminal {
                let _ = writeln!(stderr, "{}", self.stage);
            }
        }
        if !self.terminal {
            return;
        }
        let blob = progress.digest.get(7..19).map(|short| format!(" {short}")).unwrap_or_default();
        let bytes = match (progress.done_bytes, progress.total_bytes) {
            (0, _) => String::new(),
            (done, 0) => format!(" {}", megabytes(done)),
            (done, total) => {
                let percent = (done.min(total) * 100).checked_div(total).unwrap_or(100);
                let filled = (percent / 5) as usize;
                format!(" [{}{}] {}/{}", "=".repeat(filled), " ".repeat(20 - filled), megabytes(done), megabytes(total))
            }
        };
        let _ = write!(stderr, "\r\x1b[2K{}{blob}{bytes}", self.stage);
        let _ = stderr.flush();
        self.drawn = true;
    }

    fn finish(&mut self) {
        if self.drawn {
            eprintln!();
            self.drawn = false;
        }
    }
}

/// Pulls from a source on the daemon's host; returns the image.
pub async fn pull(client: &mut Client, request: pb::PullImageRequest) -> Result<pb::Image, Status> {
    use pb::pull_image_response::Payload;
    let mut stream = client.images.pull_image(request).await?.into_inner();
    let mut progress = Progress::new();
    while let Some(message) = stream.next().await {
        match message {
            Ok(pb::PullImageResponse { payload: Some(Payload::Progress(p)) }) => progress.show(&p),
            Ok(pb::PullImageResponse { payload: Some(Payload::Image(image)) }) => {
                progress.finish();
                return Ok(image);
            }
            Ok(_) => {}
            Err(status) => {
                progress.finish();
                return Err(status);
            }
        }
    }
    progress.finish();
    Err(Status::unavailable("the pull's stream ended before its image"))
}

/// True when `image` reads as a registry reference rather than an image id or name (names
/// have no `:`, `/` or `@`).
fn looks_like_reference(image: &str) -> bool {
    image.contains([':', '/', '@'])
}

/// Pulls `image` first when it is a registry reference no image was pulled from, like
/// `docker run`: the pull's progress goes to standard error.
pub async fn ensure_image(client: &mut Client, image: &str) -> Result<(), Status> {
    if !looks_like_reference(image) {
        return Ok(());
    }
    match client.images.get_image(pb::GetImageRequest { image: image.to_owned() }).await {
        Ok(_) => return Ok(()),
        Err(status) if status.code() == tonic::Code::NotFound => {}
        Err(status) => return Err(status),
    }
    eprintln!("pulling {image}");
    let request = pb::PullImageRequest {
        source: Some(pb::pull_image_request::Source::Reference(image.to_owned())),
        ..Default::default()
    };
    pull(client, request).await.map(drop)
}

/// Bytes per upload message: well under gRPC's default 4 MiB message limit.
const UPLOAD_CHUNK: usize = 1024 * 1024;

/// Streams a local archive to the daemon; returns the image.
pub async fn upload(
    client: &mut Client,
    name: String,
    path: &Path,
    tag: Option<String>,
    labels: std::collections::BTreeMap<String, String>,
) -> Result<pb::Image, Status> {
    use pb::upload_image_request::Payload as Out;
    use pb::upload_image_response::Payload;
    let mut file = std::fs::File::open(path)
        .map_err(|e| Status::invalid_argument(format!("cannot read {}: {e}", path.display())))?;
    let label = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let start = pb::UploadImageRequest {
        payload: Some(Out::Start(pb::UploadImageStart { name, tag: tag.unwrap_or_default(), labels, label })),
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::UploadImageRequest>(4);
    let reader = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        if tx.blocking_send(start).is_err() {
            return Ok(());
        }
        let mut buffer = vec![0u8; UPLOAD_CHUNK];
        loop {
            let n = file.read(&mut buffer)?;
            if n == 0 {
                return Ok(());
            }
            let chunk = pb::UploadImageRequest { payload: Some(Out::Chunk(buffer[..n].to_vec())) };
            if tx.blocking_send(chunk).is_err() {
                return Ok(()); // the daemon stopped reading: its answer says why
            }
        }
    });
    let mut stream = client.images.upload_image(tokio_stream::wrappers::ReceiverStream::new(rx)).await?.into_inner();
    let mut progress = Progress::new();
    let mut result = Err(Status::unavailable("the upload's stream ended before its image"));
    while let Some(message) = stream.next().await {
        match message {
            Ok(pb::UploadImageResponse { payload: Some(Payload::Progress(p)) }) => progress.show(&p),
            Ok(pb::UploadImageResponse { payload: Some(Payload::Image(image)) }) => {
                result = Ok(image);
                break;
            }
            Ok(_) => {}
            Err(status) => {
                result = Err(status);
                break;
            }
        }
    }
    progress.finish();
    if let Ok(Err(e)) = reader.await
        && result.is_err()
    {
        return Err(Status::invalid_argument(format!("cannot read {}: {e}", path.display())));
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_layout_tag_is_what_follows_the_last_colon_without_a_slash() {
        assert_eq!(split_layout_tag("/srv/layout:1.0"), ("/srv/layout".into(), Some("1.0".into())));
        assert_eq!(split_layout_tag("/srv/layout"), ("/srv/layout".into(), None));
        assert_eq!(split_layout_tag("/a:b/layout"), ("/a:b/layout".into(), None));
    }
}
