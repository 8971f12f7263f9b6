//! Kubernetes port forwarding over SPDY/3.1 (`portforward.k8s.io`): the
//! client opens an error stream and a data stream per connection, tagged
//! with `port` and `requestID`; each data stream is spliced to a new TCP
//! connection to that port on the pod's loopback.

use super::spdy::Decoder;
use super::spdy::Frame;
use super::spdy_exec::{next_frame, write_frames};
use bytes::BytesMut;
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

pub const PROTOCOL: &str = "portforward.k8s.io";

#[derive(Default)]
struct Pair {
    error: Option<u32>,
    data: Option<u32>,
    port: u16,
}

fn header<'a>(h: &'a [(String, String)], name: &str) -> &'a str {
    h.iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map_or("", |(_, v)| v.as_str())
}

pub async fn serve<S>(io: S, netns: Option<PathBuf>, idle: Duration)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut rd, wr) = tokio::io::split(io);
    let (tx, rx) = mpsc::channel::<Frame>(64);
    let writer = tokio::spawn(write_frames(wr, rx));
    let mut dec = Decoder::default();
    let mut buf = BytesMut::with_capacity(16 * 1024);
    let mut pairs: HashMap<String, Pair> = HashMap::new();
    let mut inbound: HashMap<u32, mpsc::UnboundedSender<Option<Vec<u8>>>> = HashMap::new();
    let mut tasks = JoinSet::new();
    let idle_timer = tokio::time::sleep(idle);
    tokio::pin!(idle_timer);
    loop {
        let frame = tokio::select! {
            f = next_frame(&mut rd, &mut dec, &mut buf) => f,
            _ = &mut idle_timer => {
                tracing::info!("port-forward: closing an idle connection after {idle:?}");
                break;
            }
        };
        idle_timer
            .as_mut()
            .reset(tokio::time::Instant::now() + idle);
        // None: the client is gone.
        let Some(frame) = frame else { break };
        match frame {
            Frame::SynStream {
                stream, headers, ..
            } => {
                let kind = header(&headers, "streamtype").to_string();
                let port = header(&headers, "port")
                    .parse::<u16>()
                    .ok()
                    .filter(|p| *p > 0);
                let req = header(&headers, "requestid").to_string();
                let Some(port) = port.filter(|_| kind == "error" || kind == "data") else {
                    let _ = tx.send(Frame::RstStream { stream, status: 1 }).await;
                    continue;
                };
                let _ = tx
                    .send(Frame::SynReply {
                        stream,
                        fin: false,
                        headers: Vec::new(),
                    })
                    .await;
                let pair = pairs.entry(req.clone()).or_default();
                pair.port = port;
                if kind == "error" {
                    pair.error = Some(stream);
                } else {
                    pair.data = Some(stream);
                }
                if let (Some(error), Some(data)) = (pair.error, pair.data) {
                    let pair = pairs.remove(&req).unwrap_or_default();
                    let (in_tx, in_rx) = mpsc::unbounded_channel();
                    inbound.insert(data, in_tx);
                    tasks.spawn(forward(
                        pair.port,
                        netns.clone(),
                        data,
                        error,
                        tx.clone(),
                        in_rx,
                    ));
                }
            }
            Frame::Data { stream, fin, data } => {
                if let Some(t) = inbound.get(&stream) {
                    if !data.is_empty() {
                        let _ = t.send(Some(data));
                    }
                    if fin {
                        let _ = t.send(None);
                        inbound.remove(&stream);
                    }
                }
            }
            Frame::RstStream { stream, .. } => {
                inbound.remove(&stream);
            }
            Frame::Ping(id) => {
                let _ = tx.send(Frame::Ping(id)).await;
            }
            Frame::GoAway { .. } => break,
            _ => {}
        }
    }
    // Every forwarded connection of this client ends with it.
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    drop(tx);
    let _ = writer.await;
}

async fn forward(
    port: u16,
    netns: Option<PathBuf>,
    data_id: u32,
    error_id: u32,
    tx: mpsc::Sender<Frame>,
    mut inbound: mpsc::UnboundedReceiver<Option<Vec<u8>>>,
) {
    let fin = |stream| Frame::Data {
        stream,
        fin: true,
        data: Vec::new(),
    };
    let connected = tokio::task::spawn_blocking(move || {
        crate::linux::netns::tcp_connect_in(netns.as_deref(), port)
    })
    .await;
    let tcp = match connected {
        Ok(Ok(s)) => s
            .set_nonblocking(true)
            .and_then(|_| tokio::net::TcpStream::from_std(s)),
        Ok(Err(e)) => Err(std::io::Error::other(e.to_string())),
        Err(e) => Err(std::io::Error::other(e.to_string())),
    };
    let tcp = match tcp {
        Ok(t) => t,
        Err(e) => {
            let msg = format!("error forwarding port {port} to pod: {e}");
            let _ = tx
                .send(Frame::Data {
                    stream: error_id,
                    fin: false,
                    data: msg.into_bytes(),
                })
                .await;
            let _ = tx.send(fin(error_id)).await;
            let _ = tx.send(fin(data_id)).await;
            return;
        }
    };
    let (mut r, mut w) = tcp.into_split();
    let (mut from_pod_done, mut to_pod_done) = (false, false);
    let mut chunk = vec![0u8; 32 * 1024];
    while !(from_pod_done && to_pod_done) {
        tokio::select! {
            n = r.read(&mut chunk), if !from_pod_done => {
                match n {
                    Ok(n) if n > 0 => {
                        let f = Frame::Data { stream: data_id, fin: false, data: chunk[..n].to_vec() };
                        if tx.send(f).await.is_err() {
                            return;
                        }
                    }
                    _ => {
                        from_pod_done = true;
                        let _ = tx.send(fin(data_id)).await;
                    }
                }
            }
            m = inbound.recv(), if !to_pod_done => {
                match m {
                    Some(Some(d)) => {
                        if w.write_all(&d).await.is_err() {
                            to_pod_done = true;
                        }
                    }
                    _ => {
                        to_pod_done = true;
                        let _ = w.shutdown().await;
                    }
                }
            }
        }
    }
    let _ = tx.send(fin(error_id)).await;
}
