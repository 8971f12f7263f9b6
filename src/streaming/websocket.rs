//! The Kubernetes remotecommand protocol over WebSocket (RFC 6455, framing
//! by tungstenite): every message starts with a channel number (0 stdin,
//! 1 stdout, 2 stderr, 3 error, 4 resize; v5 adds 255 = close a channel),
//! as a byte in the binary protocols or as an ASCII digit followed by base64
//! in the `base64.` ones.

use super::session::{Input, Output, Session};
use super::status;
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

const STDIN: u8 = 0;
const STDOUT: u8 = 1;
const STDERR: u8 = 2;
const ERROR: u8 = 3;
const RESIZE: u8 = 4;
const CLOSE: u8 = 255;

/// A negotiated subprotocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Protocol {
    pub name: &'static str,
    /// 1 for the unversioned `channel.k8s.io`.
    pub version: u8,
    pub base64: bool,
}

/// Ours, in the order we prefer them.
pub const PROTOCOLS: [Protocol; 6] = [
    Protocol {
        name: "v5.channel.k8s.io",
        version: 5,
        base64: false,
    },
    Protocol {
        name: "v5.base64.channel.k8s.io",
        version: 5,
        base64: true,
    },
    Protocol {
        name: "v4.channel.k8s.io",
        version: 4,
        base64: false,
    },
    Protocol {
        name: "v4.base64.channel.k8s.io",
        version: 4,
        base64: true,
    },
    Protocol {
        name: "channel.k8s.io",
        version: 1,
        base64: false,
    },
    Protocol {
        name: "base64.channel.k8s.io",
        version: 1,
        base64: true,
    },
];

/// The first protocol the client offers (in its order, as the Kubernetes
/// servers pick) that we speak.
pub fn choose<'a>(offered: impl IntoIterator<Item = &'a str>) -> Option<Protocol> {
    offered
        .into_iter()
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .find_map(|o| PROTOCOLS.iter().find(|p| p.name == o).copied())
}

fn frame(proto: Protocol, channel: u8, data: &[u8]) -> Message {
    if proto.base64 {
        use base64::Engine;
        let mut text = String::with_capacity(1 + data.len() * 4 / 3 + 4);
        // Byte arithmetic wraps as in Go: channel 255 is '/'.
        text.push(char::from(b'0'.wrapping_add(channel)));
        base64::engine::general_purpose::STANDARD.encode_string(data, &mut text);
        Message::text(text)
    } else {
        let mut v = Vec::with_capacity(data.len() + 1);
        v.push(channel);
        v.extend_from_slice(data);
        Message::binary(v)
    }
}

/// Splits a client message into (channel, payload); `None` for one that is
/// not valid in `proto`.
fn parse(proto: Protocol, msg: Message) -> Option<(u8, Vec<u8>)> {
    match (msg, proto.base64) {
        (Message::Binary(b), false) => {
            let (&ch, rest) = b.split_first()?;
            Some((ch, rest.to_vec()))
        }
        (Message::Text(t), true) => {
            use base64::Engine;
            let t = t.as_str();
            let ch = t.as_bytes().first()?.wrapping_sub(b'0');
            let data = base64::engine::general_purpose::STANDARD
                .decode(&t[1..])
                .ok()?;
            Some((ch, data))
        }
        _ => None,
    }
}

/// Runs `session` over the upgraded connection `io` until the command exits
/// (its status goes on the error channel) or the client goes away (the
/// command is then killed by dropping the session).
pub async fn serve_exec<S>(
    io: S,
    proto: Protocol,
    mut session: Session,
    cmd: &[String],
    idle: Duration,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut ws = WebSocketStream::from_raw_socket(io, Role::Server, None).await;
    let idle_timer = tokio::time::sleep(idle);
    tokio::pin!(idle_timer);
    loop {
        tokio::select! {
            out = session.outputs.recv() => {
                idle_timer.as_mut().reset(tokio::time::Instant::now() + idle);
                let msg = match out {
                    Some(Output::Stdout(b)) => frame(proto, STDOUT, &b),
                    Some(Output::Stderr(b)) => frame(proto, STDERR, &b),
                    Some(Output::Exit(exit)) => {
                        let mut msgs = Vec::new();
                        if let Ok(e) = &exit {
                            if let Some(m) = &e.message {
                                msgs.push(frame(proto, STDERR, m.as_bytes()));
                            }
                        }
                        if let Some(s) = status::of_exit(proto.version, &exit, cmd) {
                            msgs.push(frame(proto, ERROR, s.as_bytes()));
                        }
                        for m in msgs {
                            if ws.send(m).await.is_err() {
                                return;
                            }
                        }
                        let _ = ws.close(Some(CloseFrame {
                            code: tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode::Normal,
                            reason: "".into(),
                        })).await;
                        // Wait for the client's close (bounded by the idle timer).
                        let drain = async { while let Some(Ok(_)) = ws.next().await {} };
                        let _ = tokio::time::timeout(Duration::from_secs(5), drain).await;
                        return;
                    }
                    None => return,
                };
                if ws.send(msg).await.is_err() {
                    return;
                }
            }
            msg = ws.next() => {
                idle_timer.as_mut().reset(tokio::time::Instant::now() + idle);
                let msg = match msg {
                    Some(Ok(m)) => m,
                    // Gone: dropping the session kills the command.
                    _ => return,
                };
                if msg.is_close() {
                    return;
                }
                if matches!(msg, Message::Ping(_) | Message::Pong(_)) {
                    continue;
                }
                match parse(proto, msg) {
                    Some((STDIN, data)) if !data.is_empty() => session.input(Input::Stdin(Bytes::from(data))),
                    Some((RESIZE, data)) => {
                        if let Some((width, height)) = status::parse_resize(&data) {
                            session.input(Input::Resize { width, height });
                        }
                    }
                    Some((CLOSE, data)) if proto.version >= 5 && data.first() == Some(&STDIN) => {
                        session.input(Input::StdinEof)
                    }
                    _ => {}
                }
            }
            _ = &mut idle_timer => {
                tracing::info!("exec: closing an idle WebSocket stream after {idle:?}");
                return;
            }
        }
    }
}

/// The WebSocket port-forward protocol: per requested port `i`, channel
/// `2i` carries data and `2i+1` errors; the first message on each is the
/// port, 2 bytes little-endian. One TCP connection per port.
pub async fn serve_portforward<S>(
    io: S,
    base64: bool,
    ports: Vec<u16>,
    netns: Option<std::path::PathBuf>,
    idle: Duration,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let proto = Protocol {
        name: "",
        version: 4,
        base64,
    };
    let mut ws = WebSocketStream::from_raw_socket(io, Role::Server, None).await;
    let (from_pods_tx, mut from_pods) = tokio::sync::mpsc::channel::<(usize, Option<Vec<u8>>)>(16);
    let mut writers = Vec::new();
    let mut readers = tokio::task::JoinSet::new();
    for (i, &port) in ports.iter().enumerate() {
        let ch = (2 * i) as u8;
        let netns = netns.clone();
        let connected = tokio::task::spawn_blocking(move || {
            crate::linux::netns::tcp_connect_in(netns.as_deref(), port)
        })
        .await;
        let tcp = match connected {
            Ok(Ok(s)) => s
                .set_nonblocking(true)
                .and_then(|_| tokio::net::TcpStream::from_std(s))
                .map_err(|e| e.to_string()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        for c in [ch, ch + 1] {
            if ws.send(frame(proto, c, &port.to_le_bytes())).await.is_err() {
                return;
            }
        }
        match tcp {
            Ok(t) => {
                let (mut r, w) = t.into_split();
                writers.push(Some(w));
                let tx = from_pods_tx.clone();
                readers.spawn(async move {
                    let mut buf = vec![0u8; 32 * 1024];
                    loop {
                        match r.read(&mut buf).await {
                            Ok(n) if n > 0 => {
                                if tx.send((i, Some(buf[..n].to_vec()))).await.is_err() {
                                    return;
                                }
                            }
                            _ => {
                                let _ = tx.send((i, None)).await;
                                return;
                            }
                        }
                    }
                });
            }
            Err(e) => {
                writers.push(None);
                let msg = format!("error forwarding port {port} to pod: {e}");
                if ws.send(frame(proto, ch + 1, msg.as_bytes())).await.is_err() {
                    return;
                }
            }
        }
    }
    drop(from_pods_tx);
    let mut pods_open = true;
    let idle_timer = tokio::time::sleep(idle);
    tokio::pin!(idle_timer);
    loop {
        tokio::select! {
            got = from_pods.recv(), if pods_open => {
                idle_timer.as_mut().reset(tokio::time::Instant::now() + idle);
                pods_open = got.is_some();
                // A port whose connection closed sends nothing more; the
                // others go on.
                if let Some((i, Some(data))) = got {
                    if ws.send(frame(proto, (2 * i) as u8, &data)).await.is_err() {
                        break;
                    }
                }
            }
            msg = ws.next() => {
                idle_timer.as_mut().reset(tokio::time::Instant::now() + idle);
                let Some(Ok(msg)) = msg else { break };
                if msg.is_close() {
                    break;
                }
                if let Some((ch, data)) = parse(proto, msg) {
                    let i = usize::from(ch / 2);
                    if ch % 2 == 0 && !data.is_empty() {
                        if let Some(Some(w)) = writers.get_mut(i) {
                            if w.write_all(&data).await.is_err() {
                                writers[i] = None;
                            }
                        }
                    }
                }
            }
            _ = &mut idle_timer => {
                tracing::info!("port-forward: closing an idle WebSocket after {idle:?}");
                break;
            }
        }
    }
    readers.abort_all();
    let _ = ws.close(None).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation_follows_the_client_order() {
        assert_eq!(
            choose(["v4.channel.k8s.io, v5.channel.k8s.io"])
                .unwrap()
                .name,
            "v4.channel.k8s.io"
        );
        assert_eq!(
            choose(["foo", "v5.base64.channel.k8s.io"]).unwrap().version,
            5
        );
        assert!(choose(["v9.channel.k8s.io"]).is_none());
    }

    #[test]
    fn framing() {
        let p = PROTOCOLS[0];
        assert_eq!(frame(p, 1, b"hi"), Message::binary(vec![1, b'h', b'i']));
        let b64 = PROTOCOLS[1];
        assert_eq!(frame(b64, 2, b"hi"), Message::text("2aGk="));
        assert_eq!(
            parse(b64, Message::text("0aGk=")),
            Some((0, b"hi".to_vec()))
        );
        assert_eq!(
            parse(p, Message::binary(vec![255, 0])),
            Some((255, vec![0]))
        );
        assert_eq!(parse(p, Message::text("0aGk=")), None);
        // v5's close signal in base64: '0' + 255 wraps to '/'.
        assert_eq!(parse(b64, Message::text("/AA==")), Some((255, vec![0])));
    }
}
