//! The Kubernetes remotecommand protocol over SPDY/3.1 (what kubelet's
//! proxy and crictl speak): the client opens one stream per role, named by
//! its `streamType` header (error, stdin, stdout, stderr, resize); we reply
//! to each, start the command once the expected ones are there, and end
//! with the exit status on the error stream.

use super::session::{Input, Output, Session};
use super::spdy::{Decoder, Encoder, Frame};
use super::status;
use crate::container::ExecIoRequest;
use bytes::{Bytes, BytesMut};
use std::future::Future;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

/// How long the client gets to open its streams (kubelet's default).
const STREAM_CREATION_TIMEOUT: Duration = Duration::from_secs(30);

/// Ours, in the order we prefer them; with their protocol version.
pub const PROTOCOLS: [(&str, u8); 4] = [
    ("v4.channel.k8s.io", 4),
    ("v3.channel.k8s.io", 3),
    ("v2.channel.k8s.io", 2),
    ("channel.k8s.io", 1),
];

/// The first protocol the client offers (in its order) that we speak; a
/// client offering none gets the original unversioned protocol.
pub fn choose<'a>(offered: impl IntoIterator<Item = &'a str>) -> Option<(&'static str, u8)> {
    let offered: Vec<&str> = offered
        .into_iter()
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    if offered.is_empty() {
        return Some(PROTOCOLS[3]);
    }
    offered
        .into_iter()
        .find_map(|o| PROTOCOLS.iter().find(|p| p.0 == o).copied())
}

#[derive(Default, Debug, Clone, Copy)]
struct Streams {
    error: Option<u32>,
    stdin: Option<u32>,
    stdout: Option<u32>,
    stderr: Option<u32>,
    resize: Option<u32>,
}

impl Streams {
    fn complete(&self, io: ExecIoRequest, version: u8) -> bool {
        self.error.is_some()
            && (!io.stdin || self.stdin.is_some())
            && (!io.stdout || self.stdout.is_some())
            && (!io.stderr || io.tty || self.stderr.is_some())
            && (!io.tty || version < 3 || self.resize.is_some())
    }
}

/// Serves one exec over the upgraded connection `io`; `start` runs the
/// command once the client's streams are open.
pub async fn serve_exec<S, F>(
    io: S,
    version: u8,
    req: ExecIoRequest,
    cmd: Vec<String>,
    idle: Duration,
    start: F,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Future<Output = Result<Session, String>>,
{
    let (mut rd, wr) = tokio::io::split(io);
    let (tx, rx) = mpsc::channel::<Frame>(32);
    let writer = tokio::spawn(write_frames(wr, rx));
    let mut dec = Decoder::default();
    let mut buf = BytesMut::with_capacity(16 * 1024);
    let mut streams = Streams::default();
    let mut resize_buf = Vec::new();

    // Phase 1: the client opens its streams.
    let opened = tokio::time::timeout(STREAM_CREATION_TIMEOUT, async {
        while !streams.complete(req, version) {
            let frame = next_frame(&mut rd, &mut dec, &mut buf).await?;
            handle_control(&frame, &tx, &mut streams).await;
        }
        Some(())
    })
    .await;
    if !matches!(opened, Ok(Some(()))) {
        tracing::info!("exec over SPDY: the client did not open its streams");
        drop(tx);
        let _ = writer.await;
        return;
    }

    let mut session = match start.await {
        Ok(s) => s,
        Err(e) => {
            if let Some(id) = streams.error {
                let msg = status::of_exit(version, &Err(e), &cmd).unwrap_or_default();
                let _ = tx.send(data(id, msg.into_bytes(), false)).await;
            }
            finish(&tx, &streams).await;
            drop(tx);
            let _ = writer.await;
            return;
        }
    };

    // Phase 2: stream both ways until the command exits.
    let idle_timer = tokio::time::sleep(idle);
    tokio::pin!(idle_timer);
    loop {
        tokio::select! {
            out = session.outputs.recv() => {
                idle_timer.as_mut().reset(tokio::time::Instant::now() + idle);
                match out {
                    Some(Output::Stdout(b)) => {
                        if let Some(id) = streams.stdout {
                            if tx.send(data(id, b.to_vec(), false)).await.is_err() {
                                return;
                            }
                        }
                    }
                    Some(Output::Stderr(b)) => {
                        if let Some(id) = streams.stderr.or(streams.stdout) {
                            if tx.send(data(id, b.to_vec(), false)).await.is_err() {
                                return;
                            }
                        }
                    }
                    Some(Output::Exit(exit)) => {
                        if let (Ok(e), Some(id)) = (&exit, streams.stderr.or(streams.stdout)) {
                            if let Some(m) = &e.message {
                                let _ = tx.send(data(id, m.clone().into_bytes(), false)).await;
                            }
                        }
                        if let (Some(msg), Some(id)) = (status::of_exit(version, &exit, &cmd), streams.error) {
                            let _ = tx.send(data(id, msg.into_bytes(), false)).await;
                        }
                        finish(&tx, &streams).await;
                        drop(tx);
                        let _ = writer.await;
                        // Let the client read it all and close first.
                        let drain = async {
                            let mut scratch = [0u8; 4096];
                            while matches!(rd.read(&mut scratch).await, Ok(n) if n > 0) {}
                        };
                        let _ = tokio::time::timeout(Duration::from_secs(5), drain).await;
                        return;
                    }
                    None => return,
                }
            }
            frame = next_frame(&mut rd, &mut dec, &mut buf) => {
                idle_timer.as_mut().reset(tokio::time::Instant::now() + idle);
                // None: the client is gone; dropping the session kills the command.
                let Some(frame) = frame else { return };
                match &frame {
                    Frame::Data { stream, fin, data } => {
                        if Some(*stream) == streams.stdin {
                            if !data.is_empty() {
                                session.input(Input::Stdin(Bytes::from(data.clone())));
                            }
                            if *fin {
                                session.input(Input::StdinEof);
                            }
                        } else if Some(*stream) == streams.resize {
                            resize_buf.extend_from_slice(data);
                            for (width, height) in take_resizes(&mut resize_buf) {
                                session.input(Input::Resize { width, height });
                            }
                        }
                    }
                    Frame::RstStream { stream, .. } if Some(*stream) == streams.stdin => {
                        session.input(Input::StdinEof)
                    }
                    Frame::GoAway { .. } => return,
                    _ => handle_control(&frame, &tx, &mut streams).await,
                }
            }
            _ = &mut idle_timer => {
                tracing::info!("exec: closing an idle SPDY stream after {idle:?}");
                return;
            }
        }
    }
}

fn data(stream: u32, data: Vec<u8>, fin: bool) -> Frame {
    Frame::Data { stream, fin, data }
}

/// Half-closes every stream we write to.
async fn finish(tx: &mpsc::Sender<Frame>, s: &Streams) {
    for id in [s.error, s.stdout, s.stderr].into_iter().flatten() {
        let _ = tx.send(data(id, Vec::new(), true)).await;
    }
}

/// Replies to new streams and pings; records the streams by type.
async fn handle_control(frame: &Frame, tx: &mpsc::Sender<Frame>, s: &mut Streams) {
    match frame {
        Frame::SynStream {
            stream, headers, ..
        } => {
            let kind = headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case("streamtype"))
                .map(|(_, v)| v.as_str())
                .unwrap_or("");
            let slot = match kind {
                "error" => &mut s.error,
                "stdin" => &mut s.stdin,
                "stdout" => &mut s.stdout,
                "stderr" => &mut s.stderr,
                "resize" => &mut s.resize,
                _ => {
                    let _ = tx
                        .send(Frame::RstStream {
                            stream: *stream,
                            status: 1, // PROTOCOL_ERROR
                        })
                        .await;
                    return;
                }
            };
            *slot = Some(*stream);
            let _ = tx
                .send(Frame::SynReply {
                    stream: *stream,
                    fin: false,
                    headers: Vec::new(),
                })
                .await;
        }
        Frame::Ping(id) => {
            let _ = tx.send(Frame::Ping(*id)).await;
        }
        _ => {}
    }
}

/// The next frame, `None` at EOF or on a protocol error.
pub(super) async fn next_frame<R: AsyncRead + Unpin>(
    rd: &mut R,
    dec: &mut Decoder,
    buf: &mut BytesMut,
) -> Option<Frame> {
    loop {
        match dec.decode(buf) {
            Ok(Some(f)) => return Some(f),
            Ok(None) => {}
            Err(e) => {
                tracing::info!("exec over SPDY: {e}");
                return None;
            }
        }
        buf.reserve(16 * 1024);
        match rd.read_buf(buf).await {
            Ok(0) | Err(_) => return None,
            Ok(_) => {}
        }
    }
}

pub(super) async fn write_frames<W: AsyncWrite + Unpin>(mut wr: W, mut rx: mpsc::Receiver<Frame>) {
    let mut enc = Encoder::default();
    let mut out = Vec::new();
    while let Some(f) = rx.recv().await {
        out.clear();
        if let Err(e) = enc.encode(&f, &mut out) {
            tracing::warn!("exec over SPDY: {e}");
            return;
        }
        if wr.write_all(&out).await.is_err() {
            return;
        }
        if rx.is_empty() && wr.flush().await.is_err() {
            return;
        }
    }
    let _ = wr.flush().await;
    let _ = wr.shutdown().await;
}

/// The complete TerminalSize objects at the front of `buf` (the client
/// writes them back to back as a JSON stream).
fn take_resizes(buf: &mut Vec<u8>) -> Vec<(u16, u16)> {
    let mut sizes = Vec::new();
    let mut it = serde_json::Deserializer::from_slice(buf).into_iter::<serde_json::Value>();
    let mut consumed = 0;
    while let Some(v) = it.next() {
        match v {
            Ok(v) => {
                consumed = it.byte_offset();
                if let Some(s) = status::parse_resize(v.to_string().as_bytes()) {
                    sizes.push(s);
                }
            }
            Err(e) if e.is_eof() => break,
            Err(_) => {
                // Garbage: drop it all rather than grow for ever.
                consumed = buf.len();
                break;
            }
        }
    }
    buf.drain(..consumed);
    sizes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation() {
        assert_eq!(
            choose(["v4.channel.k8s.io", "v3.channel.k8s.io"])
                .unwrap()
                .1,
            4
        );
        assert_eq!(choose(["v2.channel.k8s.io"]).unwrap().1, 2);
        assert_eq!(choose([]).unwrap().1, 1);
        assert!(choose(["v9.channel.k8s.io"]).is_none());
    }

    #[test]
    fn resize_stream_is_a_json_stream() {
        let mut b = br#"{"Width":80,"Height":24}{"Width":100,"#.to_vec();
        assert_eq!(take_resizes(&mut b), vec![(80, 24)]);
        b.extend_from_slice(br#""Height":50}"#);
        assert_eq!(take_resizes(&mut b), vec![(100, 50)]);
        assert!(b.is_empty());
    }
}
