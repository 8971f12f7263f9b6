//! `pull`: time PullImage.

use std::time::Instant;

use anyhow::Context;
use cri_proto::v1::image_service_client::ImageServiceClient;
use cri_proto::v1::{ImageSpec, ImageStatusRequest, PullImageRequest, RemoveImageRequest};
use tonic::transport::Channel;

#[derive(clap::Args)]
pub struct Args {
    /// Image reference to pull, e.g. 127.0.0.1:5000/big:latest.
    image: String,
    /// RemoveImage first (not timed), so the pull starts from nothing.
    #[arg(long)]
    remove_first: bool,
}

fn spec(image: &str) -> Option<ImageSpec> {
    Some(ImageSpec {
        image: image.to_string(),
        ..Default::default()
    })
}

/// Runs the pull and returns the JSON result line
/// `{"op":"pull","image","seconds","image_id","size"}`.
pub async fn run(channel: Channel, args: Args) -> anyhow::Result<serde_json::Value> {
    let mut images = ImageServiceClient::new(channel);
    let image = args.image.as_str();

    if args.remove_first {
        images
            .remove_image(RemoveImageRequest { image: spec(image) })
            .await
            .with_context(|| format!("RemoveImage {image}"))?;
    }

    let start = Instant::now();
    let pulled = images
        .pull_image(PullImageRequest {
            image: spec(image),
            ..Default::default()
        })
        .await
        .with_context(|| format!("PullImage {image}"))?
        .into_inner();
    let seconds = start.elapsed().as_secs_f64();

    let status = images
        .image_status(ImageStatusRequest {
            image: spec(image),
            verbose: false,
        })
        .await
        .with_context(|| format!("ImageStatus {image}"))?
        .into_inner();
    let size = status
        .image
        .with_context(|| format!("ImageStatus {image}: image not found after pulling it"))?
        .size;

    Ok(serde_json::json!({
        "op": "pull",
        "image": image,
        "seconds": seconds,
        "image_id": pulled.image_ref,
        "size": size,
    }))
}
