//! `banger.v1.ImageService`.

use std::sync::Arc;

use banger_proto::v1::{self as pb, image_service_server::ImageService};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use super::{
    OP_ID_METADATA, convert, idempotency::Idempotency, idempotency_key, run_to_completion, status::invalid_field,
    status::to_status, with_op_id,
};
use crate::{
    domain::{
        ImageProgress, OpId,
        access::{Caller, Needs, Role},
    },
    ops::{ImageSource, NewOciImage, Ops, ProgressFn},
};

/// Serves the image API over the daemon's core.
#[derive(Debug, Clone)]
pub struct ImageApi {
    ops: Arc<Ops>,
    idempotency: Idempotency,
}

impl ImageApi {
    /// The service over `ops`, recording idempotent requests in `idempotency`.
    pub fn new(ops: Arc<Ops>, idempotency: Idempotency) -> Self {
        Self { ops, idempotency }
    }
}

#[tonic::async_trait]
impl ImageService for ImageApi {
    async fn import_image(
        &self,
        request: Request<pb::ImportImageRequest>,
    ) -> Result<Response<pb::ImportImageResponse>, Status> {
        let request = request.into_inner();
        let (request_id, body) = idempotency_key(&request, |r| &mut r.request_id);
        let new = convert::new_image(request);
        let ops = self.ops.clone();
        self.idempotency
            .run("ImportImage", &request_id, body, async move {
                let (image, op_id) = run_to_completion(async move { ops.import_image(new).await }).await?;
                Ok(with_op_id(pb::ImportImageResponse { image: Some(convert::image(&image)) }, &op_id.to_string()))
            })
            .await
    }

    async fn get_image(&self, request: Request<pb::GetImageRequest>) -> Result<Response<pb::GetImageResponse>, Status> {
        let key = convert::key("image", &request.into_inner().image).map_err(|e| to_status(&e))?;
        let image = self.ops.get_image(&key).await.map_err(|e| to_status(&e))?;
        Ok(Response::new(pb::GetImageResponse { image: Some(convert::image(&image)) }))
    }

    async fn list_images(
        &self,
        request: Request<pb::ListImagesRequest>,
    ) -> Result<Response<pb::ListImagesResponse>, Status> {
        let request = request.into_inner();
        let page_size = convert::page_size(request.page_size).map_err(|e| to_status(&e))?;
        let after = convert::page_after(&request.page_token).map_err(|e| to_status(&e))?;
        let labels = convert::label_selector(request.labels).map_err(|e| to_status(&e))?;
        let (images, last) =
            self.ops.list_images_page(&labels, after.as_deref(), page_size).await.map_err(|e| to_status(&e))?;
        let next_page_token = last.map(|id| convert::page_token(&id)).unwrap_or_default();
        Ok(Response::new(pb::ListImagesResponse {
            images: images.iter().map(convert::image).collect(),
            next_page_token,
        }))
    }

    type PullImageStream = ImageStream<pb::PullImageResponse>;

    async fn pull_image(
        &self,
        request: Request<pb::PullImageRequest>,
    ) -> Result<Response<Self::PullImageStream>, Status> {
        use pb::pull_image_request::Source;
        // A registry is the operator's; a path on the daemon's host is the admin's.
        if matches!(request.get_ref().source, Some(Source::OciLayout(_) | Source::Archive(_))) {
            let caller = request.extensions().get::<Caller>().cloned().unwrap_or_else(Caller::nobody);
            caller
                .may("/banger.v1.ImageService/PullImage (from a host path)", Needs::Role(Role::Admin))
                .map_err(|denied| super::status::permission_denied(&denied))?;
        }
        let request = request.into_inner();
        let (request_id, body) = idempotency_key(&request, |r| &mut r.request_id);
        let new = convert::new_oci_image(request).map_err(|e| to_status(&e))?;
        let (ops, idempotency, op_id) = (self.ops.clone(), self.idempotency.clone(), OpId::generate());
        let run = move |progress: ProgressFn| -> std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send>> {
            Box::pin(async move {
                idempotency
                    .run("PullImage", &request_id, body, async move {
                        let image =
                            run_to_completion(async move { ops.pull_image(new, op_id, progress).await }).await?;
                        Ok(with_op_id(convert::image(&image), &op_id.to_string()))
                    })
                    .await
            })
        };
        use pb::pull_image_response::Payload;
        stream_pull(
            op_id,
            run,
            |p| pb::PullImageResponse { payload: Some(Payload::Progress(p)) },
            |i| pb::PullImageResponse { payload: Some(Payload::Image(i)) },
        )
        .await
    }

    type UploadImageStream = ImageStream<pb::UploadImageResponse>;

    async fn upload_image(
        &self,
        request: Request<Streaming<pb::UploadImageRequest>>,
    ) -> Result<Response<Self::UploadImageStream>, Status> {
        use pb::upload_image_request::Payload as In;
        let mut inbound = request.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| invalid_field("start", "the stream ended before its first message"))?;
        let Some(In::Start(start)) = first.payload else {
            return Err(invalid_field("start", "the first message must be start"));
        };
        // A few chunks in flight at most: a client faster than the conversion waits.
        let (chunks_tx, chunks) = mpsc::channel::<Result<Vec<u8>, String>>(8);
        tokio::spawn(async move {
            loop {
                let next = match inbound.message().await {
                    Ok(Some(pb::UploadImageRequest { payload: Some(In::Chunk(chunk)) })) => Ok(chunk),
                    Ok(Some(_)) => Err("a second start message".to_owned()),
                    Ok(None) => break,
                    Err(status) => Err(format!("the upload stream failed: {}", status.message())),
                };
                let failed = next.is_err();
                if chunks_tx.send(next).await.is_err() || failed {
                    break;
                }
            }
        });
        let label = if start.label.is_empty() { "upload".to_owned() } else { start.label };
        let source = ImageSource::Stream {
            reader: Box::new(UploadReader { chunks, current: std::io::Cursor::new(Vec::new()) }),
            tag: (!start.tag.is_empty()).then_some(start.tag),
            label: format!("upload:{label}"),
        };
        let new = NewOciImage { name: start.name, source, labels: start.labels };
        let (ops, op_id) = (self.ops.clone(), OpId::generate());
        let run = move |progress: ProgressFn| -> std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send>> {
            Box::pin(async move {
                let image = run_to_completion(async move { ops.pull_image(new, op_id, progress).await }).await?;
                Ok(with_op_id(convert::image(&image), &op_id.to_string()))
            })
        };
        use pb::upload_image_response::Payload;
        stream_pull(
            op_id,
            run,
            |p| pb::UploadImageResponse { payload: Some(Payload::Progress(p)) },
            |i| pb::UploadImageResponse { payload: Some(Payload::Image(i)) },
        )
        .await
    }

    async fn delete_image(
        &self,
        request: Request<pb::DeleteImageRequest>,
    ) -> Result<Response<pb::DeleteImageResponse>, Status> {
        let key = convert::key("image", &request.into_inner().image).map_err(|e| to_status(&e))?;
        let ops = self.ops.clone();
        let id = run_to_completion(async move { ops.delete_image(&key).await }).await?;
        Ok(Response::new(pb::DeleteImageResponse { id: id.to_string() }))
    }
}

/// What a pull's worker task hands the response stream.
enum PullEvent {
    Progress(pb::ImageProgress),
    Done(Box<Result<Response<pb::Image>, Status>>),
}

/// The progress callback of a pull: stage changes and blob bytes, dropped rather than
/// queued when the client reads slower than the pull goes (the next report supersedes
/// them), and at most one blob report per [`PROGRESS_STEP`] bytes.
fn progress_to(tx: mpsc::Sender<PullEvent>) -> ProgressFn {
    // The stage under way, and the blob and byte count last reported.
    let state = std::sync::Mutex::new((String::from("fetch"), String::new(), 0u64));
    Arc::new(move |progress: ImageProgress| {
        let mut state = state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match &progress {
            ImageProgress::Stage(name) => {
                *state = ((*name).to_owned(), String::new(), 0);
            }
            ImageProgress::Blob { digest, done, total } => {
                // A blob's first report, then one per step, and its last one, once each.
                let same_blob = *digest == state.1 && state.2 > 0;
                let finished = total.is_some_and(|t| *done >= t);
                let stepped = done.saturating_sub(state.2) >= PROGRESS_STEP;
                if same_blob && (*done == state.2 || (!finished && !stepped)) {
                    return;
                }
                state.1 = digest.clone();
                state.2 = *done;
            }
        }
        let _ = tx.try_send(PullEvent::Progress(convert::image_progress(&state.0, &progress)));
    })
}

/// Bytes between two blob progress reports.
const PROGRESS_STEP: u64 = 1 << 20;

/// Runs a pull in its own task and answers with its progress then its image: the header
/// names the operation (the first run's, for a retry answered from the idempotency log).
async fn stream_pull<R: Send + 'static>(
    op_id: OpId,
    run: impl FnOnce(
        ProgressFn,
    )
        -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Response<pb::Image>, Status>> + Send>>
    + Send
    + 'static,
    progress_message: fn(pb::ImageProgress) -> R,
    image_message: fn(pb::Image) -> R,
) -> Result<Response<ImageStream<R>>, Status> {
    let (tx, mut rx) = mpsc::channel::<PullEvent>(64);
    let progress = progress_to(tx.clone());
    tokio::spawn(tracing::Instrument::instrument(
        async move {
            let outcome = run(progress).await;
            let _ = tx.send(PullEvent::Done(Box::new(outcome))).await;
        },
        tracing::Span::current(),
    ));
    let (header, first) = match rx.recv().await {
        Some(PullEvent::Progress(progress)) => (op_id.to_string(), progress_message(progress)),
        Some(PullEvent::Done(done)) => match *done {
            Ok(response) => {
                let header =
                    response.metadata().get(OP_ID_METADATA).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
                (header, image_message(response.into_inner()))
            }
            Err(status) => return Err(status),
        },
        None => {
            return Err(super::status::api_status(&super::status::ApiError::Internal {
                what: "pull task",
                detail: "it ended without an answer".into(),
            }));
        }
    };
    let rest = tokio_stream::wrappers::ReceiverStream::new(rx).map(move |event| match event {
        PullEvent::Progress(progress) => Ok(progress_message(progress)),
        PullEvent::Done(done) => (*done).map(|response| image_message(response.into_inner())),
    });
    let stream: ImageStream<R> = Box::pin(tokio_stream::once(Ok(first)).chain(rest));
    Ok(with_op_id(stream, &header))
}

/// A pull's or an upload's response stream.
pub type ImageStream<R> = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<R, Status>> + Send>>;

/// An uploaded archive as a blocking reader, fed by the request stream.
struct UploadReader {
    chunks: mpsc::Receiver<Result<Vec<u8>, String>>,
    current: std::io::Cursor<Vec<u8>>,
}

impl std::io::Read for UploadReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            let n = std::io::Read::read(&mut self.current, buf)?;
            if n > 0 || buf.is_empty() {
                return Ok(n);
            }
            match self.chunks.blocking_recv() {
                Some(Ok(chunk)) => self.current = std::io::Cursor::new(chunk),
                Some(Err(why)) => return Err(std::io::Error::new(std::io::ErrorKind::ConnectionAborted, why)),
                None => return Ok(0),
            }
        }
    }
}
