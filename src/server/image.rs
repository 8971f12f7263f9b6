//! ImageService.

use super::{rpc, Daemon};
use crate::image::pull::{Credentials, PullError};
use crate::image::store::ImageRecord;
use crate::image::ImageError;
use cri_proto::v1 as cri;
use cri_proto::v1::image_service_server::ImageService;
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use tonic::{Request, Response, Status};

pub struct ImageApi(pub Arc<Daemon>);

fn status_of(e: ImageError) -> Status {
    let msg = e.to_string();
    match e {
        ImageError::Empty(_) => Status::invalid_argument(msg),
        ImageError::Pull(p) => match p {
            PullError::Unsupported { .. } | PullError::BadAuth { .. } => {
                Status::invalid_argument(msg)
            }
            PullError::NotFound { .. } => Status::not_found(msg),
            PullError::Unauthorized { .. } => Status::unauthenticated(msg),
            PullError::Blocked { .. } => Status::permission_denied(msg),
            PullError::Unavailable { .. } => Status::unavailable(msg),
            PullError::Integrity { .. } => Status::data_loss(msg),
            PullError::BadLayer { .. } => Status::failed_precondition(msg),
            PullError::Registry { .. } => Status::unknown(msg),
            PullError::Store { .. } | PullError::Internal { .. } => Status::internal(msg),
        },
        ImageError::Store(_) | ImageError::Registries(_) | ImageError::Config { .. } => {
            Status::internal(msg)
        }
    }
}

fn spec_image(spec: Option<&cri::ImageSpec>, rpc: &str) -> Result<String, Status> {
    match spec.map(|s| s.image.trim()) {
        Some(i) if !i.is_empty() => Ok(i.to_string()),
        _ => Err(Status::invalid_argument(format!(
            "{rpc}: image spec with a non-empty image reference is required"
        ))),
    }
}

pub fn to_cri(img: &ImageRecord) -> cri::Image {
    // The USER may be "uid", "uid:gid", "name" or "name:group".
    let user = img.user.split(':').next().unwrap_or("");
    let (uid, username) = match user.parse::<i64>() {
        Ok(n) => (Some(cri::Int64Value { value: n }), String::new()),
        Err(_) => (None, user.to_string()),
    };
    cri::Image {
        id: img.id.clone(),
        repo_tags: img.repo_tags.clone(),
        repo_digests: img.repo_digests.clone(),
        size: img.size,
        uid,
        username,
        spec: Some(cri::ImageSpec {
            image: img.id.clone(),
            ..Default::default()
        }),
        pinned: false,
    }
}

impl ImageApi {
    fn filtered(&self, filter: Option<&cri::ImageFilter>) -> Vec<cri::Image> {
        let images = &self.0.images;
        match filter
            .and_then(|f| f.image.as_ref())
            .map(|s| s.image.as_str())
        {
            Some(q) if !q.is_empty() => images.find(q).iter().map(to_cri).collect(),
            _ => images.list().iter().map(to_cri).collect(),
        }
    }
}

#[tonic::async_trait]
impl ImageService for ImageApi {
    async fn list_images(
        &self,
        req: Request<cri::ListImagesRequest>,
    ) -> Result<Response<cri::ListImagesResponse>, Status> {
        let req = req.into_inner();
        rpc("ListImages", "", async {
            Ok(cri::ListImagesResponse {
                images: self.filtered(req.filter.as_ref()),
            })
        })
        .await
    }

    type StreamImagesStream =
        Pin<Box<dyn tokio_stream::Stream<Item = Result<cri::StreamImagesResponse, Status>> + Send>>;

    async fn stream_images(
        &self,
        req: Request<cri::StreamImagesRequest>,
    ) -> Result<Response<Self::StreamImagesStream>, Status> {
        let req = req.into_inner();
        rpc("StreamImages", "", async {
            let images = self.filtered(req.filter.as_ref());
            let chunks = super::chunks::by_size(images)
                .into_iter()
                .map(|images| Ok(cri::StreamImagesResponse { images }));
            Ok(Box::pin(tokio_stream::iter(chunks)) as Self::StreamImagesStream)
        })
        .await
    }

    async fn image_status(
        &self,
        req: Request<cri::ImageStatusRequest>,
    ) -> Result<Response<cri::ImageStatusResponse>, Status> {
        let req = req.into_inner();
        let image = spec_image(req.image.as_ref(), "ImageStatus")?;
        rpc("ImageStatus", &image, async {
            let Some(img) = self.0.images.find(&image) else {
                return Ok(cri::ImageStatusResponse::default());
            };
            let mut info = HashMap::new();
            if req.verbose {
                let config = self.0.images.config_json(&img).map_err(status_of)?;
                let v = serde_json::json!({
                    "id": img.id,
                    "manifests": img.manifests,
                    "chainIds": img.layers.iter().map(|l| &l.chain_id).collect::<Vec<_>>(),
                    "imageSpec": config,
                });
                info.insert("info".to_string(), v.to_string());
            }
            Ok(cri::ImageStatusResponse {
                image: Some(to_cri(&img)),
                info,
            })
        })
        .await
    }

    async fn pull_image(
        &self,
        req: Request<cri::PullImageRequest>,
    ) -> Result<Response<cri::PullImageResponse>, Status> {
        let req = req.into_inner();
        let image = spec_image(req.image.as_ref(), "PullImage")?;
        let creds = req
            .auth
            .map(|a| Credentials {
                username: a.username,
                password: a.password,
                auth: a.auth,
                identity_token: a.identity_token,
                registry_token: a.registry_token,
            })
            .unwrap_or_default();
        rpc("PullImage", &image, async {
            let started = std::time::Instant::now();
            let pulled = self.0.images.pull(&image, creds).await;
            crate::metrics::pull_done(pulled.as_ref().ok().map(|i| i.size), started.elapsed());
            let img = pulled.map_err(status_of)?;
            tracing::info!(image = %image, id = %img.id, "image pulled");
            Ok(cri::PullImageResponse { image_ref: img.id })
        })
        .await
    }

    async fn remove_image(
        &self,
        req: Request<cri::RemoveImageRequest>,
    ) -> Result<Response<cri::RemoveImageResponse>, Status> {
        let req = req.into_inner();
        let image = spec_image(req.image.as_ref(), "RemoveImage")?;
        rpc("RemoveImage", &image, async {
            if let Some(img) = self.0.images.find(&image) {
                if let Some(c) = self.0.containers.image_in_use(&img.id) {
                    return Err(Status::failed_precondition(format!(
                        "image {image} ({}) is used by container {c}",
                        img.id
                    )));
                }
            }
            if let Some(img) = self.0.images.remove(&image).map_err(status_of)? {
                tracing::info!(image = %image, id = %img.id, "image removed");
            }
            Ok(cri::RemoveImageResponse {})
        })
        .await
    }

    async fn image_fs_info(
        &self,
        _req: Request<cri::ImageFsInfoRequest>,
    ) -> Result<Response<cri::ImageFsInfoResponse>, Status> {
        rpc("ImageFsInfo", "", async {
            let d = self.0.clone();
            let (img, ctr) = tokio::task::spawn_blocking(move || d.images.usage())
                .await
                .map_err(|e| Status::internal(format!("measure filesystem usage: {e}")))?;
            let now = chrono::Utc::now().timestamp_nanos_opt().unwrap_or(0);
            let fs = |dir: &std::path::Path, u: crate::image::Usage| cri::FilesystemUsage {
                timestamp: now,
                fs_id: Some(cri::FilesystemIdentifier {
                    mountpoint: dir.display().to_string(),
                }),
                used_bytes: Some(cri::UInt64Value { value: u.bytes }),
                inodes_used: Some(cri::UInt64Value { value: u.inodes }),
            };
            Ok(cri::ImageFsInfoResponse {
                image_filesystems: vec![fs(self.0.images.image_fs_dir(), img)],
                container_filesystems: vec![fs(self.0.images.container_fs_dir(), ctr)],
            })
        })
        .await
    }
}
