//! `banger.v1.ImageService`.

use std::sync::Arc;

use banger_proto::v1::{self as pb, image_service_server::ImageService};
use tonic::{Request, Response, Status};

use super::{convert, idempotency::Idempotency, idempotency_key, run_to_completion, status::to_status, with_op_id};
use crate::ops::Ops;

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
