//! The HTTP side of the metrics endpoint: GET /metrics on a TCP listener.

use super::Snapshot;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// Scrapes served at once; more wait in the accept queue.
const MAX_CONNECTIONS: usize = 16;
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("metrics endpoint: listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

type SnapshotFn = Arc<dyn Fn() -> Snapshot + Send + Sync>;

/// Listens on `addr` and serves scrapes until the daemon exits; `snapshot`
/// gives the daemon's state gauges (it runs on a blocking thread).
pub async fn start(
    addr: SocketAddr,
    snapshot: impl Fn() -> Snapshot + Send + Sync + 'static,
) -> Result<SocketAddr, MetricsError> {
    let listen = |source| MetricsError::Listen { addr, source };
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(listen)?;
    let bound = listener.local_addr().map_err(listen)?;
    tracing::info!(addr = %bound, "metrics endpoint listening");
    let snapshot: SnapshotFn = Arc::new(snapshot);
    let limit = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            let Ok(permit) = limit.clone().acquire_owned().await else {
                return;
            };
            let (tcp, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("metrics endpoint: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let snapshot = snapshot.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| handle(req, snapshot.clone()));
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .serve_connection(TokioIo::new(tcp), svc);
                if let Err(e) = conn.await {
                    tracing::debug!(%peer, "metrics connection: {e}");
                }
                drop(permit);
            });
        }
    });
    Ok(bound)
}

async fn handle<B>(
    req: Request<B>,
    snapshot: SnapshotFn,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let reply = |status: StatusCode, ctype: &str, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        if let Ok(v) = ctype.parse() {
            r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
        }
        Ok(r)
    };
    if req.uri().path() != "/metrics" {
        return reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "only /metrics is served here\n".into(),
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "use GET\n".into(),
        );
    }
    // The snapshot walks /proc for the daemon's children: off the async threads.
    let text = tokio::task::spawn_blocking(move || super::render(&snapshot()))
        .await
        .unwrap_or_default();
    reply(StatusCode::OK, CONTENT_TYPE, text)
}
