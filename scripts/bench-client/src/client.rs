//! Connecting to a CRI server over its unix socket.

use std::path::PathBuf;

use anyhow::{bail, Context};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// The socket path of `endpoint` (`unix:///path` or `/path`).
pub fn socket_path(endpoint: &str) -> anyhow::Result<PathBuf> {
    let path = endpoint.strip_prefix("unix://").unwrap_or(endpoint);
    if !path.starts_with('/') {
        bail!("endpoint {endpoint:?}: expected unix:///absolute/path.sock");
    }
    Ok(PathBuf::from(path))
}

/// A tonic channel to the CRI server at `endpoint`.
pub async fn connect(endpoint: &str) -> anyhow::Result<Channel> {
    let path = socket_path(endpoint)?;
    // The URI is required by tonic but unused: the connector dials the socket.
    Endpoint::from_static("http://[::]:50051")
        .connect_with_connector(tower::service_fn({
            let path = path.clone();
            move |_: Uri| {
                let path = path.clone();
                async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
            }
        }))
        .await
        .with_context(|| format!("connect to {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::socket_path;

    #[test]
    fn parses_endpoints() {
        assert_eq!(
            socket_path("unix:///run/berth/berth.sock").unwrap(),
            std::path::Path::new("/run/berth/berth.sock")
        );
        assert_eq!(
            socket_path("/tmp/x.sock").unwrap(),
            std::path::Path::new("/tmp/x.sock")
        );
        assert!(socket_path("unix://relative.sock").is_err());
        assert!(socket_path("tcp://127.0.0.1:1").is_err());
    }
}
