//! The streaming server: the URLs that Exec, Attach and PortForward return
//! point here. HTTP/1.1 (hyper), over TLS when a certificate is configured,
//! whose requests must upgrade to WebSocket or SPDY/3.1; each URL carries a
//! single-use token that expires if unused.

mod portforward;
mod session;
pub mod spdy;
mod spdy_exec;
mod status;
mod tokens;
mod websocket;
mod wsbridge;

use crate::config::StreamingConfig;
use crate::container::{ContainerManager, ExecIoRequest};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{
    HeaderValue, CONNECTION, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, SEC_WEBSOCKET_PROTOCOL,
    UPGRADE,
};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokens::Tokens;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

/// How long a client may take to send its request headers (and, with
/// TLS, to complete its handshake).
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);

/// The WebSocket subprotocol of kubectl's port forwarding since 1.30: the
/// SPDY/3.1 session of `portforward.k8s.io` carried in binary messages.
const SPDY_TUNNEL_PORTFORWARD: &str = "SPDY/3.1+portforward.k8s.io";

#[derive(Debug, thiserror::Error)]
pub enum StreamingError {
    #[error("streaming server: listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(
        "streaming server: too many pending requests ({})",
        tokens::MAX_PENDING
    )]
    TooManyPending,
    #[error("streaming server: TLS with {}: {reason}", path.display())]
    Tls { path: PathBuf, reason: String },
}

/// A request waiting for its client to connect.
#[derive(Debug, Clone)]
pub enum Pending {
    Exec {
        container_id: String,
        cmd: Vec<String>,
        io: ExecIoRequest,
    },
    Attach {
        container_id: String,
        io: ExecIoRequest,
    },
    PortForward {
        pod_id: String,
        /// The pod's netns pin; `None` for host-network pods.
        netns: Option<std::path::PathBuf>,
    },
}

/// What a session runs.
#[derive(Debug, Clone)]
enum Target {
    Exec(Vec<String>),
    Attach,
}

impl Target {
    /// The command named in exit statuses.
    fn cmd(&self) -> Vec<String> {
        match self {
            Target::Exec(c) => c.clone(),
            Target::Attach => Vec::new(),
        }
    }
}

pub struct Streaming {
    tokens: Tokens<Pending>,
    addr: SocketAddr,
    containers: Arc<ContainerManager>,
    idle: Duration,
    /// Set when serving https.
    tls: Option<TlsAcceptor>,
}

impl Streaming {
    /// Binds the listener and serves in the background.
    pub async fn start(
        cfg: &StreamingConfig,
        containers: Arc<ContainerManager>,
    ) -> Result<Arc<Streaming>, StreamingError> {
        let tls = match (&cfg.tls_cert, &cfg.tls_key) {
            (Some(cert), Some(key)) => Some(tls_acceptor(cert, key)?),
            _ => None,
        };
        let want = SocketAddr::new(cfg.address, cfg.port);
        let listen = |source| StreamingError::Listen { addr: want, source };
        let listener = tokio::net::TcpListener::bind(want).await.map_err(listen)?;
        let addr = listener.local_addr().map_err(listen)?;
        let s = Arc::new(Streaming {
            tokens: Tokens::new(Duration::from_secs(cfg.token_ttl_secs)),
            addr,
            containers,
            idle: Duration::from_secs(cfg.idle_timeout_secs),
            tls,
        });
        tracing::info!(%addr, tls = s.tls.is_some(), "streaming server listening");
        let limit = Arc::new(Semaphore::new(cfg.max_connections));
        tokio::spawn(s.clone().accept(listener, limit));
        Ok(s)
    }

    /// The URL a client uses to run `pending`.
    pub fn url(&self, pending: Pending) -> Result<String, StreamingError> {
        let kind = match &pending {
            Pending::Exec { .. } => "exec",
            Pending::Attach { .. } => "attach",
            Pending::PortForward { .. } => "portforward",
        };
        let token = self
            .tokens
            .insert(pending)
            .ok_or(StreamingError::TooManyPending)?;
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        Ok(format!("{scheme}://{}/{kind}/{token}", self.addr))
    }

    async fn accept(self: Arc<Self>, listener: tokio::net::TcpListener, limit: Arc<Semaphore>) {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("streaming server: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            // Bounded: beyond the limit connections are closed at once, so
            // a flood of half-open upgrades cannot exhaust the daemon.
            let Ok(permit) = limit.clone().try_acquire_owned() else {
                tracing::warn!(%peer, "streaming server: connection limit reached; refusing");
                continue;
            };
            let me = self.clone();
            tokio::spawn(async move {
                match me.tls.clone() {
                    None => me.serve_connection(tcp, peer).await,
                    // A client speaking plain HTTP fails the handshake: its
                    // connection is closed without an HTTP answer.
                    Some(tls) => {
                        match tokio::time::timeout(HEADER_TIMEOUT, tls.accept(tcp)).await {
                            Ok(Ok(stream)) => me.serve_connection(stream, peer).await,
                            Ok(Err(e)) => tracing::debug!(%peer, "streaming server: TLS: {e}"),
                            Err(_) => {
                                tracing::debug!(%peer, "streaming server: TLS handshake timed out")
                            }
                        }
                    }
                }
                drop(permit);
            });
        }
    }

    async fn serve_connection<IO>(self: Arc<Self>, io: IO, peer: SocketAddr)
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let svc = hyper::service::service_fn(move |req| self.clone().handle(req));
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_TIMEOUT)
            .serve_connection(TokioIo::new(io), svc)
            .with_upgrades();
        if let Err(e) = conn.await {
            tracing::debug!(%peer, "streaming connection: {e}");
        }
    }

    async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
    ) -> Result<Response<Full<Bytes>>, Infallible> {
        let path = req.uri().path().to_string();
        let mut parts = path.trim_start_matches('/').splitn(2, '/');
        let (kind, token) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let pending = match self.tokens.take(token) {
            Some(p) => p,
            None => {
                return Ok(reply(
                    StatusCode::NOT_FOUND,
                    "unknown, used or expired token\n",
                ))
            }
        };
        match (kind, pending) {
            (
                "exec",
                Pending::Exec {
                    container_id,
                    cmd,
                    io,
                },
            ) => Ok(self.exec(req, container_id, Target::Exec(cmd), io).await),
            ("attach", Pending::Attach { container_id, io }) => {
                Ok(self.exec(req, container_id, Target::Attach, io).await)
            }
            ("portforward", Pending::PortForward { pod_id, netns }) => {
                Ok(self.port_forward(req, pod_id, netns))
            }
            _ => Ok(reply(
                StatusCode::NOT_FOUND,
                "unknown, used or expired token\n",
            )),
        }
    }

    async fn exec(
        self: Arc<Self>,
        req: Request<Incoming>,
        id: String,
        target: Target,
        io: ExecIoRequest,
    ) -> Response<Full<Bytes>> {
        let upgrade = header(&req, UPGRADE)
            .unwrap_or_default()
            .to_ascii_lowercase();
        if upgrade.starts_with("spdy/3.1") {
            return self.exec_spdy(req, id, target, io).await;
        }
        if upgrade != "websocket" {
            return reply(
                StatusCode::BAD_REQUEST,
                "exec: a WebSocket or SPDY/3.1 upgrade is required\n",
            );
        }
        let offered: Vec<String> = req
            .headers()
            .get_all(SEC_WEBSOCKET_PROTOCOL)
            .iter()
            .filter_map(|v| v.to_str().ok().map(str::to_string))
            .collect();
        let Some(proto) = websocket::choose(offered.iter().map(String::as_str)) else {
            return reply(
                StatusCode::BAD_REQUEST,
                "exec: no supported WebSocket subprotocol offered\n",
            );
        };
        let Some(key) = header(&req, SEC_WEBSOCKET_KEY) else {
            return reply(
                StatusCode::BAD_REQUEST,
                "exec: Sec-WebSocket-Key is missing\n",
            );
        };
        let session = match self.start_session(&id, &target, io).await {
            Ok(s) => s,
            Err((code, msg)) => return reply(code, &msg),
        };
        let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
        let idle = self.idle;
        let on_upgrade = hyper::upgrade::on(req);
        tokio::spawn(async move {
            match on_upgrade.await {
                Ok(up) => {
                    websocket::serve_exec(TokioIo::new(up), proto, session, &target.cmd(), idle)
                        .await
                }
                Err(e) => tracing::warn!(container = %id, "exec: upgrade failed: {e}"),
            }
        });
        websocket_accepted(&accept, Some(proto.name))
    }

    fn port_forward(
        self: Arc<Self>,
        req: Request<Incoming>,
        pod_id: String,
        netns: Option<std::path::PathBuf>,
    ) -> Response<Full<Bytes>> {
        let upgrade = header(&req, UPGRADE)
            .unwrap_or_default()
            .to_ascii_lowercase();
        if upgrade == "websocket" {
            if offered_list(&req, SEC_WEBSOCKET_PROTOCOL)
                .iter()
                .any(|p| p == SPDY_TUNNEL_PORTFORWARD)
            {
                return self.port_forward_tunnel(req, pod_id, netns);
            }
            return self.port_forward_ws(req, pod_id, netns);
        }
        if !upgrade.starts_with("spdy/3.1") {
            return reply(
                StatusCode::BAD_REQUEST,
                "port-forward: a SPDY/3.1 or WebSocket upgrade is required\n",
            );
        }
        let offered = offered_list(&req, STREAM_PROTOCOL_VERSION);
        if !offered.is_empty() && !offered.iter().any(|o| o == portforward::PROTOCOL) {
            return reply(
                StatusCode::FORBIDDEN,
                &format!("port-forward: none of the offered protocols {offered:?} is supported\n"),
            );
        }
        let idle = self.idle;
        let on_upgrade = hyper::upgrade::on(req);
        tokio::spawn(async move {
            match on_upgrade.await {
                Ok(up) => portforward::serve(TokioIo::new(up), netns, idle).await,
                Err(e) => tracing::warn!(pod = %pod_id, "port-forward: upgrade failed: {e}"),
            }
        });
        let mut resp = Response::new(Full::new(Bytes::new()));
        *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let h = resp.headers_mut();
        h.insert(UPGRADE, HeaderValue::from_static("SPDY/3.1"));
        h.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(
            STREAM_PROTOCOL_VERSION,
            HeaderValue::from_static(portforward::PROTOCOL),
        );
        resp
    }

    fn port_forward_ws(
        self: Arc<Self>,
        req: Request<Incoming>,
        pod_id: String,
        netns: Option<std::path::PathBuf>,
    ) -> Response<Full<Bytes>> {
        let ports: Result<Vec<u16>, _> = req
            .uri()
            .query()
            .unwrap_or("")
            .split('&')
            .filter_map(|kv| kv.strip_prefix("port="))
            .map(|p| p.parse::<u16>().map_err(|_| p.to_string()))
            .collect();
        let ports = match ports {
            Ok(p) if !p.is_empty() && p.len() <= 64 && !p.contains(&0) => p,
            Ok(_) => {
                return reply(
                    StatusCode::BAD_REQUEST,
                    "port-forward: 1 to 64 port=N query parameters are required\n",
                )
            }
            Err(p) => {
                return reply(
                    StatusCode::BAD_REQUEST,
                    &format!("port-forward: invalid port {p:?}\n"),
                )
            }
        };
        let offered = offered_list(&req, SEC_WEBSOCKET_PROTOCOL);
        // The binary protocol is also what a client offering none gets.
        let chosen = if offered.is_empty() {
            Some(None)
        } else {
            offered.iter().find_map(|o| match o.as_str() {
                "v4.channel.k8s.io" => Some(Some(("v4.channel.k8s.io", false))),
                "v4.base64.channel.k8s.io" => Some(Some(("v4.base64.channel.k8s.io", true))),
                _ => None,
            })
        };
        let Some(chosen) = chosen else {
            return reply(
                StatusCode::BAD_REQUEST,
                "port-forward: no supported WebSocket subprotocol offered\n",
            );
        };
        let Some(key) = header(&req, SEC_WEBSOCKET_KEY) else {
            return reply(
                StatusCode::BAD_REQUEST,
                "port-forward: Sec-WebSocket-Key is missing\n",
            );
        };
        let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
        let idle = self.idle;
        let base64 = chosen.is_some_and(|c| c.1);
        let on_upgrade = hyper::upgrade::on(req);
        tokio::spawn(async move {
            match on_upgrade.await {
                Ok(up) => {
                    websocket::serve_portforward(TokioIo::new(up), base64, ports, netns, idle).await
                }
                Err(e) => tracing::warn!(pod = %pod_id, "port-forward: upgrade failed: {e}"),
            }
        });
        websocket_accepted(&accept, chosen.map(|c| c.0))
    }

    /// kubectl's SPDY over WebSocket: the WebSocket carries the same SPDY
    /// session as a direct SPDY/3.1 upgrade would.
    fn port_forward_tunnel(
        self: Arc<Self>,
        req: Request<Incoming>,
        pod_id: String,
        netns: Option<PathBuf>,
    ) -> Response<Full<Bytes>> {
        let Some(key) = header(&req, SEC_WEBSOCKET_KEY) else {
            return reply(
                StatusCode::BAD_REQUEST,
                "port-forward: Sec-WebSocket-Key is missing\n",
            );
        };
        let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
        let idle = self.idle;
        let on_upgrade = hyper::upgrade::on(req);
        tokio::spawn(async move {
            let up = match on_upgrade.await {
                Ok(up) => up,
                Err(e) => {
                    tracing::warn!(pod = %pod_id, "port-forward: upgrade failed: {e}");
                    return;
                }
            };
            let ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
                TokioIo::new(up),
                tokio_tungstenite::tungstenite::protocol::Role::Server,
                None,
            )
            .await;
            let (local, session) = tokio::io::duplex(64 * 1024);
            let spdy = tokio::spawn(portforward::serve(session, netns, idle));
            wsbridge::bridge(ws, local).await;
            // Its end of the pipe is closed: the session ends with its streams.
            let _ = spdy.await;
        });
        websocket_accepted(&accept, Some(SPDY_TUNNEL_PORTFORWARD))
    }

    async fn exec_spdy(
        self: Arc<Self>,
        req: Request<Incoming>,
        id: String,
        target: Target,
        io: ExecIoRequest,
    ) -> Response<Full<Bytes>> {
        let offered: Vec<String> = req
            .headers()
            .get_all(STREAM_PROTOCOL_VERSION)
            .iter()
            .filter_map(|v| v.to_str().ok().map(str::to_string))
            .collect();
        let Some((proto, version)) = spdy_exec::choose(offered.iter().map(String::as_str)) else {
            return reply(
                StatusCode::FORBIDDEN,
                &format!("exec: none of the offered stream protocols {offered:?} is supported\n"),
            );
        };
        // Refused before the upgrade when it cannot work; the command
        // itself starts once the client's streams are open.
        if let Err(e) = self.containers.running(&id) {
            return reply(http_status(&e), &format!("{e}\n"));
        }
        let idle = self.idle;
        let on_upgrade = hyper::upgrade::on(req);
        let me = self.clone();
        tokio::spawn(async move {
            let up = match on_upgrade.await {
                Ok(up) => up,
                Err(e) => {
                    tracing::warn!(container = %id, "exec: upgrade failed: {e}");
                    return;
                }
            };
            let start = {
                let (id, target) = (id.clone(), target.clone());
                async move {
                    me.start_session(&id, &target, io)
                        .await
                        .map_err(|(_, m)| m.trim_end().to_string())
                }
            };
            spdy_exec::serve_exec(TokioIo::new(up), version, io, target.cmd(), idle, start).await;
        });
        let mut resp = Response::new(Full::new(Bytes::new()));
        *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let h = resp.headers_mut();
        h.insert(UPGRADE, HeaderValue::from_static("SPDY/3.1"));
        h.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(STREAM_PROTOCOL_VERSION, HeaderValue::from_static(proto));
        resp
    }

    async fn start_session(
        &self,
        id: &str,
        target: &Target,
        io: ExecIoRequest,
    ) -> Result<session::Session, (StatusCode, String)> {
        let cmd = match target {
            Target::Exec(cmd) => cmd,
            Target::Attach => {
                self.containers
                    .running(id)
                    .map_err(|e| (http_status(&e), format!("{e}\n")))?;
                let path = self.containers.attach_socket(id);
                let sock = tokio::net::UnixStream::connect(&path).await.map_err(|e| {
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!(
                            "attach to container {id}: its monitor is gone ({}: {e})\n",
                            path.display()
                        ),
                    )
                })?;
                return Ok(session::Session::attach(sock));
            }
        };
        let containers = self.containers.clone();
        let (id2, cmd2) = (id.to_string(), cmd.to_vec());
        let started = tokio::task::spawn_blocking(move || containers.exec_start(&id2, &cmd2, io))
            .await
            .map_err(|e| {
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("exec task: {e}\n"),
                )
            })?;
        let started = started.map_err(|e| (http_status(&e), format!("{e}\n")))?;
        session::Session::start(started).map_err(|e| {
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("exec in container {id}: {e}\n"),
            )
        })
    }
}

const STREAM_PROTOCOL_VERSION: &str = "x-stream-protocol-version";

fn http_status(e: &crate::container::ContainerError) -> StatusCode {
    match e {
        crate::container::ContainerError::NotFound(_) => StatusCode::NOT_FOUND,
        crate::container::ContainerError::FailedPrecondition { .. } => StatusCode::CONFLICT,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn header<B>(req: &Request<B>, name: hyper::header::HeaderName) -> Option<String> {
    req.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// The comma-separated values of every `name` header, in order.
fn offered_list<B, K: hyper::header::AsHeaderName>(req: &Request<B>, name: K) -> Vec<String> {
    req.headers()
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .collect()
}

/// The 101 answer to a WebSocket upgrade.
fn websocket_accepted(accept: &str, protocol: Option<&'static str>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Some(p) = protocol {
        h.insert(SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(p));
    }
    if let Ok(v) = HeaderValue::from_str(accept) {
        h.insert(SEC_WEBSOCKET_ACCEPT, v);
    }
    resp
}

/// The rustls server configuration of a PEM certificate chain and key.
fn tls_acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, StreamingError> {
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let bad = |path: &Path| {
        let path = path.to_path_buf();
        move |e: String| StreamingError::Tls { path, reason: e }
    };
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| e.to_string())
        .map_err(bad(cert))?;
    if certs.is_empty() {
        return Err(bad(cert)("no certificate in the file".into()));
    }
    let private = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| e.to_string())
        .map_err(bad(key))?;
    // The provider named, not the process default: aws-lc-rs is the one
    // rustls is built with here (reqwest's choice).
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())
        .map_err(bad(cert))?
        .with_no_client_auth()
        .with_single_cert(certs, private)
        .map_err(|e| e.to_string())
        .map_err(bad(cert))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(cfg)))
}

fn reply(code: StatusCode, msg: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(msg.to_string())));
    *r.status_mut() = code;
    r
}
