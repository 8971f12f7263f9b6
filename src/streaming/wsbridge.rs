//! A byte stream carried in WebSocket binary messages, as Kubernetes'
//! "SPDY over WebSocket" tunnelling does: every write is one message, the
//! reader sees the concatenation of the messages' payloads. The other end
//! of the stream is a local pipe (`tokio::io::duplex`), so whatever speaks a
//! byte stream (the SPDY session) runs unchanged over it.
//!
//! Kept free of berth's other modules: the tests' client uses it too.

use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// Pumps both ways between `ws` and `local` until either side ends; then
/// the other is closed too (the WebSocket with a close frame, `local` by
/// being dropped, which its peer reads as EOF).
pub async fn bridge<S>(ws: WebSocketStream<S>, local: DuplexStream)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut sink, mut stream) = ws.split();
    let (mut rd, mut wr) = tokio::io::split(local);
    // Each direction is its own future, so a full pipe one way never stalls
    // the other.
    let inbound = async {
        while let Some(Ok(msg)) = stream.next().await {
            match msg {
                Message::Binary(b) => {
                    if wr.write_all(&b).await.is_err() {
                        return;
                    }
                }
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
                // Close, or text, which the tunnel does not carry.
                _ => return,
            }
        }
    };
    let outbound = async {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            match rd.read(&mut buf).await {
                Ok(n) if n > 0 => {
                    if sink.send(Message::binary(buf[..n].to_vec())).await.is_err() {
                        return false;
                    }
                }
                _ => return true,
            }
        }
    };
    let local_ended = tokio::select! {
        _ = inbound => false,
        ended = outbound => ended,
    };
    if local_ended {
        let _ = sink.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_tungstenite::tungstenite::protocol::Role;

    #[tokio::test]
    async fn bytes_cross_in_binary_messages_and_a_local_eof_closes() {
        let (a, b) = tokio::io::duplex(1024);
        let server = WebSocketStream::from_raw_socket(a, Role::Server, None).await;
        let mut client = WebSocketStream::from_raw_socket(b, Role::Client, None).await;
        let (mut local, theirs) = tokio::io::duplex(1024);
        let bridged = tokio::spawn(bridge(server, theirs));
        // Message boundaries mean nothing: the reader sees one stream.
        client.send(Message::binary(b"ab".to_vec())).await.unwrap();
        client.send(Message::binary(b"cd".to_vec())).await.unwrap();
        let mut got = [0u8; 4];
        local.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"abcd");
        local.write_all(b"back").await.unwrap();
        assert_eq!(
            client.next().await.unwrap().unwrap(),
            Message::binary(b"back".to_vec())
        );
        drop(local);
        assert!(matches!(client.next().await, Some(Ok(Message::Close(_)))));
        bridged.await.unwrap();
    }
}
