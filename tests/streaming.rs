//! Streaming Exec through the real daemon: the Exec RPC returns a URL on
//! berth's streaming server, which a WebSocket client written here speaks
//! the Kubernetes remotecommand protocols to.

mod common;

use common::*;
use cri_proto::v1 as cri;
use futures::{SinkExt, StreamExt};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tonic::Code;

const IMAGE: &str = "127.0.0.1:5000/busybox:latest";

async fn start_with(config_toml: &str) -> Env {
    Env::start_with(
        &["busybox"],
        BerthOpts {
            config_toml: config_toml.into(),
            ..Default::default()
        },
    )
    .await
}

impl Env {
    /// A pod named `name` with one container "c" running `script`; its id.
    async fn container(&mut self, name: &str, script: &str, start: bool) -> String {
        let pod = self.pod(name).await;
        let id = self.create(&pod, sh("c", IMAGE, script)).await.unwrap();
        if start {
            self.start_container(&id).await;
        }
        id
    }

    /// The pod of container `id`.
    async fn pod_of(&mut self, id: &str) -> String {
        let list = self
            .rt
            .list_containers(cri::ListContainersRequest {
                filter: Some(cri::ContainerFilter {
                    id: id.into(),
                    ..Default::default()
                }),
            })
            .await
            .unwrap()
            .into_inner()
            .containers;
        list[0].pod_sandbox_id.clone()
    }

    async fn exec_url(&mut self, req: cri::ExecRequest) -> Result<String, tonic::Status> {
        self.rt.exec(req).await.map(|r| r.into_inner().url)
    }

    /// The daemon's open file descriptors.
    fn berth_fds(&self) -> usize {
        self.berth_fd_targets().len()
    }

    /// What each of the daemon's fds is (for failure messages).
    fn berth_fd_targets(&self) -> Vec<String> {
        let pid = self.berth.pid().expect("berth runs");
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .filter_map(|e| {
                let e = e.ok()?;
                let target = std::fs::read_link(e.path()).ok()?;
                Some(format!("{:?} -> {}", e.file_name(), target.display()))
            })
            .collect()
    }

    /// Waits until the daemon holds no more fds than `baseline`: every
    /// session's sockets, pipes and pidfds are closed once it ended.
    async fn fds_settle(&self, baseline: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.berth_fds() > baseline {
            assert!(
                Instant::now() < deadline,
                "berth holds {} fds, {baseline} before the sessions: {:#?}",
                self.berth_fds(),
                self.berth_fd_targets()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn exec_req(id: &str, cmd: &[&str]) -> cri::ExecRequest {
    cri::ExecRequest {
        container_id: id.into(),
        cmd: cmd.iter().map(|s| s.to_string()).collect(),
        tty: false,
        stdin: false,
        stdout: true,
        stderr: true,
    }
}

/// host:port and path of a streaming URL.
fn split_url(url: &str) -> (String, String) {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .expect("http(s) URL");
    let slash = rest.find('/').unwrap();
    (rest[..slash].to_string(), rest[slash..].to_string())
}

/// A TCP connection made inside the test's network namespace (where berth's
/// streaming server listens on 127.0.0.1).
fn connect(ns: &Netns, hostport: &str) -> tokio::net::TcpStream {
    let s = ns.tcp_connect(hostport).unwrap();
    s.set_nonblocking(true).unwrap();
    tokio::net::TcpStream::from_std(s).unwrap()
}

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

async fn ws_connect(ns: &Netns, url: &str, protocol: &str) -> Result<Ws, String> {
    let (hostport, path) = split_url(url);
    let mut req = format!("ws://{hostport}{path}")
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", protocol.parse().unwrap());
    match tokio_tungstenite::client_async(req, connect(ns, &hostport)).await {
        Ok((ws, resp)) => {
            assert_eq!(
                resp.headers()
                    .get("Sec-WebSocket-Protocol")
                    .unwrap()
                    .to_str()
                    .unwrap(),
                protocol
            );
            Ok(ws)
        }
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            Err(format!("HTTP {}", resp.status().as_u16()))
        }
        Err(e) => Err(e.to_string()),
    }
}

fn is_base64(protocol: &str) -> bool {
    protocol.contains("base64")
}

fn encode(protocol: &str, channel: u8, data: &[u8]) -> Message {
    use base64::Engine;
    if is_base64(protocol) {
        let mut t = String::from(char::from(b'0'.wrapping_add(channel)));
        t.push_str(&base64::engine::general_purpose::STANDARD.encode(data));
        Message::text(t)
    } else {
        let mut v = vec![channel];
        v.extend_from_slice(data);
        Message::binary(v)
    }
}

fn decode(protocol: &str, msg: Message) -> Option<(u8, Vec<u8>)> {
    use base64::Engine;
    match msg {
        Message::Binary(b) if !is_base64(protocol) => {
            let (&c, rest) = b.split_first()?;
            Some((c, rest.to_vec()))
        }
        Message::Text(t) if is_base64(protocol) => {
            let t = t.as_str();
            let c = t.as_bytes()[0].wrapping_sub(b'0');
            Some((
                c,
                base64::engine::general_purpose::STANDARD
                    .decode(&t[1..])
                    .unwrap(),
            ))
        }
        Message::Close(_) => None,
        other => panic!("unexpected message for {protocol}: {other:?}"),
    }
}

#[derive(Default, Debug)]
struct Outcome {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    error: Vec<u8>,
}

impl Outcome {
    fn status(&self) -> serde_json::Value {
        serde_json::from_slice(&self.error)
            .unwrap_or_else(|e| panic!("error channel {:?}: {e}", self.error))
    }
    fn out(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

/// Reads until the server closes; `on_stdout` may answer with messages.
async fn collect<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut tokio_tungstenite::WebSocketStream<S>,
    protocol: &str,
    mut on_stdout: impl FnMut(&[u8]) -> Vec<Message>,
) -> Outcome {
    let mut o = Outcome::default();
    while let Some(msg) = ws.next().await {
        let Some((ch, data)) = decode(protocol, msg.unwrap()) else {
            break;
        };
        match ch {
            1 => {
                o.stdout.extend_from_slice(&data);
                for m in on_stdout(&o.stdout) {
                    ws.send(m).await.unwrap();
                }
            }
            2 => o.stderr.extend_from_slice(&data),
            3 => o.error.extend_from_slice(&data),
            c => panic!("unexpected channel {c}"),
        }
    }
    o
}

const PROTOCOLS: [&str; 4] = [
    "v5.channel.k8s.io",
    "v5.base64.channel.k8s.io",
    "v4.channel.k8s.io",
    "v4.base64.channel.k8s.io",
];

#[tokio::test]
async fn exec_over_websocket_without_tty() {
    let mut env = start_with("").await;
    let id = env.container("ws", "exec sleep 1000", true).await;
    for protocol in PROTOCOLS {
        let url = env
            .exec_url(exec_req(
                &id,
                &["sh", "-c", "echo out; echo err >&2; hostname; exit 3"],
            ))
            .await
            .unwrap();
        let mut ws = ws_connect(&env.ns, &url, protocol).await.unwrap();
        let o = collect(&mut ws, protocol, |_| vec![]).await;
        assert_eq!(o.out(), "out\nws-host\n", "{protocol}");
        assert_eq!(o.stderr, b"err\n", "{protocol}");
        let st = o.status();
        assert_eq!(st["status"], "Failure", "{protocol}: {st}");
        assert_eq!(st["reason"], "NonZeroExitCode", "{protocol}: {st}");
        assert_eq!(st["details"]["causes"][0]["reason"], "ExitCode");
        assert_eq!(st["details"]["causes"][0]["message"], "3");

        let url = env.exec_url(exec_req(&id, &["true"])).await.unwrap();
        let mut ws = ws_connect(&env.ns, &url, protocol).await.unwrap();
        let o = collect(&mut ws, protocol, |_| vec![]).await;
        assert_eq!(o.status()["status"], "Success", "{protocol}");
        assert!(o.stdout.is_empty() && o.stderr.is_empty());
    }
    // The unversioned protocols: a text on the error channel on failure
    // only.
    for protocol in ["channel.k8s.io", "base64.channel.k8s.io"] {
        let url = env
            .exec_url(exec_req(
                &id,
                &["sh", "-c", "echo out; echo err >&2; exit 3"],
            ))
            .await
            .unwrap();
        let mut ws = ws_connect(&env.ns, &url, protocol).await.unwrap();
        let o = collect(&mut ws, protocol, |_| vec![]).await;
        assert_eq!(
            (o.out().as_str(), o.stderr.as_slice()),
            ("out\n", &b"err\n"[..])
        );
        let text = String::from_utf8_lossy(&o.error);
        assert!(text.contains("exit code 3"), "{protocol}: {text}");
        let url = env.exec_url(exec_req(&id, &["true"])).await.unwrap();
        let mut ws = ws_connect(&env.ns, &url, protocol).await.unwrap();
        let o = collect(&mut ws, protocol, |_| vec![]).await;
        assert!(o.error.is_empty(), "{protocol}: {o:?}");
    }
    // A command that is not there: 127 and runc's message.
    let url = env.exec_url(exec_req(&id, &["no-such-cmd"])).await.unwrap();
    let mut ws = ws_connect(&env.ns, &url, PROTOCOLS[0]).await.unwrap();
    let o = collect(&mut ws, PROTOCOLS[0], |_| vec![]).await;
    assert_eq!(o.status()["details"]["causes"][0]["message"], "127");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("executable file not found"),
        "{o:?}"
    );
    env.finish().await;
}

#[tokio::test]
async fn exec_stdin_is_streamed_and_closed() {
    let mut env = start_with("").await;
    let id = env.container("stdin", "exec sleep 1000", true).await;
    for protocol in ["v5.channel.k8s.io", "v5.base64.channel.k8s.io"] {
        let mut req = exec_req(&id, &["cat"]);
        req.stdin = true;
        let url = env.exec_url(req).await.unwrap();
        let mut ws = ws_connect(&env.ns, &url, protocol).await.unwrap();
        ws.send(encode(protocol, 0, b"hello ")).await.unwrap();
        ws.send(encode(protocol, 0, b"world\n")).await.unwrap();
        // v5: closing stdin is channel 255 naming channel 0; cat then ends.
        let mut closed = false;
        let o = collect(&mut ws, protocol, |out| {
            if !closed && out.ends_with(b"world\n") {
                closed = true;
                vec![encode(protocol, 255, &[0])]
            } else {
                vec![]
            }
        })
        .await;
        assert_eq!(o.out(), "hello world\n", "{protocol}");
        assert_eq!(o.status()["status"], "Success");
    }
    env.finish().await;
}

#[tokio::test]
async fn exec_with_tty_and_resize() {
    let mut env = start_with("").await;
    let id = env.container("tty", "exec sleep 1000", true).await;
    let protocol = "v4.channel.k8s.io";
    let mut req = exec_req(&id, &["sh", "-c", "tty; read line; stty size; exit 4"]);
    req.tty = true;
    req.stdin = true;
    req.stderr = false;
    let url = env.exec_url(req).await.unwrap();
    let mut ws = ws_connect(&env.ns, &url, protocol).await.unwrap();
    let mut sent = false;
    let o = collect(&mut ws, protocol, |out| {
        if !sent && String::from_utf8_lossy(out).contains("/dev/pts/") {
            sent = true;
            vec![
                encode(protocol, 4, br#"{"Width":123,"Height":45}"#),
                encode(protocol, 0, b"go\r"),
            ]
        } else {
            vec![]
        }
    })
    .await;
    let out = o.out();
    // The terminal's line discipline: CRLF line ends, input echoed.
    assert!(out.contains("/dev/pts/0\r\n"), "{out:?}");
    assert!(out.contains("go\r\n"), "{out:?}");
    assert!(out.contains("45 123\r\n"), "{out:?}");
    assert_eq!(o.status()["details"]["causes"][0]["message"], "4");
    env.finish().await;
}

#[tokio::test]
async fn exec_requests_are_validated() {
    let mut env = start_with("").await;
    let created = env.container("v1", "exec sleep 1000", false).await;
    let e = env
        .exec_url(exec_req(&created, &["true"]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let e = env.exec_url(exec_req("nope", &["true"])).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let running = env.container("v2", "exec sleep 1000", true).await;
    let mut req = exec_req(&running, &["true"]);
    req.tty = true;
    let e = env.exec_url(req).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let mut req = exec_req(&running, &["true"]);
    req.stdout = false;
    req.stderr = false;
    let e = env.exec_url(req).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = env.exec_url(exec_req(&running, &[])).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    env.finish().await;
}

#[tokio::test]
async fn tokens_are_single_use_and_expire() {
    let mut env = start_with("[streaming]\ntoken_ttl_secs = 1\n").await;
    let id = env.container("tok", "exec sleep 1000", true).await;
    let protocol = PROTOCOLS[0];
    let url = env.exec_url(exec_req(&id, &["true"])).await.unwrap();
    let mut ws = ws_connect(&env.ns, &url, protocol).await.unwrap();
    let o = collect(&mut ws, protocol, |_| vec![]).await;
    assert_eq!(o.status()["status"], "Success");
    // Used.
    assert_eq!(
        ws_connect(&env.ns, &url, protocol).await.unwrap_err(),
        "HTTP 404"
    );
    // Unknown.
    let (hostport, _) = split_url(&url);
    let bogus = format!("http://{hostport}/exec/0123456789abcdef");
    assert_eq!(
        ws_connect(&env.ns, &bogus, protocol).await.unwrap_err(),
        "HTTP 404"
    );
    // Expired: never used within its second.
    let url = env.exec_url(exec_req(&id, &["true"])).await.unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        ws_connect(&env.ns, &url, protocol).await.unwrap_err(),
        "HTTP 404"
    );
    env.finish().await;
}

/// Live processes whose command line is exactly `argv`.
fn processes(argv: &[&str]) -> Vec<i32> {
    let want: Vec<u8> = argv
        .iter()
        .flat_map(|a| [a.as_bytes(), b"\0"].concat())
        .collect();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|p| std::fs::read(format!("/proc/{p}/cmdline")).is_ok_and(|c| c == want))
        .collect()
}

#[tokio::test]
async fn client_disconnect_kills_only_its_exec() {
    let mut env = start_with("").await;
    let id = env.container("disc", "exec sleep 1001", true).await;
    // One complete exec first, so what the daemon keeps for good exists.
    let url = env.exec_url(exec_req(&id, &["true"])).await.unwrap();
    let mut ws = ws_connect(&env.ns, &url, PROTOCOLS[2]).await.unwrap();
    collect(&mut ws, PROTOCOLS[2], |_| vec![]).await;
    drop(ws);
    let baseline = env.berth_fds();

    let deadline = Instant::now() + Duration::from_secs(20);
    for (argv, spdy) in [(["sleep", "7345"], false), (["sleep", "7346"], true)] {
        let url = env.exec_url(exec_req(&id, &argv)).await.unwrap();
        let client: Box<dyn std::any::Any> = if spdy {
            let (mut c, _) = SpdyClient::connect(&env.ns, &url, &["v4.channel.k8s.io"])
                .await
                .unwrap();
            c.open(ERROR_ID, "error").await;
            c.open(STDOUT_ID, "stdout").await;
            c.open(STDERR_ID, "stderr").await;
            Box::new(c)
        } else {
            Box::new(ws_connect(&env.ns, &url, PROTOCOLS[2]).await.unwrap())
        };
        while processes(&argv).is_empty() {
            assert!(Instant::now() < deadline, "the exec'd sleep never started");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        drop(client);
        while !processes(&argv).is_empty() {
            assert!(
                Instant::now() < deadline,
                "the exec'd {argv:?} outlived its client"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // Every fd of those sessions (sockets, pipes, pidfds) is closed.
    env.fds_settle(baseline).await;
    // The container itself is untouched.
    assert_eq!(processes(&["sleep", "1001"]).len(), 1);
    let st = env
        .rt
        .container_status(cri::ContainerStatusRequest {
            container_id: id.clone(),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap();
    assert_eq!(st.state, cri::ContainerState::ContainerRunning as i32);
    env.finish().await;
}

// ---- SPDY/3.1: a minimal client on berth's own framing module ----

#[allow(dead_code)]
#[path = "../src/streaming/spdy.rs"]
mod spdy;

use bytes::BytesMut;
use spdy::Frame;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const ERROR_ID: u32 = 1;
const STDIN_ID: u32 = 3;
const STDOUT_ID: u32 = 5;
const STDERR_ID: u32 = 7;
const RESIZE_ID: u32 = 9;

/// What a SPDY session runs over: TCP, or a WebSocket tunnel.
trait Conn: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Conn for T {}

struct SpdyClient {
    tcp: Box<dyn Conn>,
    enc: spdy::Encoder,
    dec: spdy::Decoder,
    buf: BytesMut,
}

impl SpdyClient {
    /// Upgrades; the negotiated protocol, or "HTTP <code>".
    async fn connect(
        ns: &Netns,
        url: &str,
        versions: &[&str],
    ) -> Result<(SpdyClient, String), String> {
        let (hostport, path) = split_url(url);
        let mut tcp = connect(ns, &hostport);
        let mut req = format!(
            "POST {path} HTTP/1.1\r\nHost: {hostport}\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n"
        );
        for v in versions {
            req.push_str(&format!("X-Stream-Protocol-Version: {v}\r\n"));
        }
        req.push_str("Content-Length: 0\r\n\r\n");
        tcp.write_all(req.as_bytes()).await.unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut b = [0u8; 1];
            if tcp.read(&mut b).await.unwrap() == 0 {
                break;
            }
            head.push(b[0]);
        }
        let head = String::from_utf8(head).unwrap();
        let code = head.split(' ').nth(1).unwrap_or("").to_string();
        if code != "101" {
            return Err(format!("HTTP {code}"));
        }
        let proto = head
            .lines()
            .find_map(|l| {
                let (n, v) = l.split_once(':')?;
                n.eq_ignore_ascii_case("x-stream-protocol-version")
                    .then(|| v.trim().to_string())
            })
            .unwrap_or_default();
        Ok((SpdyClient::over(Box::new(tcp)), proto))
    }

    fn over(tcp: Box<dyn Conn>) -> SpdyClient {
        SpdyClient {
            tcp,
            enc: spdy::Encoder::default(),
            dec: spdy::Decoder::default(),
            buf: BytesMut::new(),
        }
    }

    async fn send(&mut self, f: Frame) {
        let mut out = Vec::new();
        self.enc.encode(&f, &mut out).unwrap();
        self.tcp.write_all(&out).await.unwrap();
    }

    async fn open(&mut self, id: u32, kind: &str) {
        self.send(Frame::SynStream {
            stream: id,
            associated: 0,
            priority: 0,
            flags: 0,
            headers: vec![("streamType".into(), kind.into())],
        })
        .await;
    }

    async fn next(&mut self) -> Option<Frame> {
        loop {
            if let Some(f) = self.dec.decode(&mut self.buf).unwrap() {
                return Some(f);
            }
            if self.tcp.read_buf(&mut self.buf).await.ok()? == 0 {
                return None;
            }
        }
    }

    /// Reads until the server closes the connection.
    async fn collect(&mut self, mut on_stdout: impl FnMut(&[u8]) -> Vec<Frame>) -> Outcome {
        let mut o = Outcome::default();
        let mut replies = 0;
        while let Some(f) = self.next().await {
            match f {
                Frame::Data { stream, data, .. } => match stream {
                    ERROR_ID => o.error.extend_from_slice(&data),
                    STDERR_ID => o.stderr.extend_from_slice(&data),
                    STDOUT_ID => {
                        o.stdout.extend_from_slice(&data);
                        for f in on_stdout(&o.stdout) {
                            self.send(f).await;
                        }
                    }
                    s => panic!("data on stream {s}"),
                },
                Frame::SynReply { .. } => replies += 1,
                other => panic!("unexpected frame {other:?}"),
            }
        }
        assert!(replies >= 2, "every stream gets a SYN_REPLY");
        o
    }
}

fn stdin_frame(data: &[u8], fin: bool) -> Frame {
    Frame::Data {
        stream: STDIN_ID,
        fin,
        data: data.to_vec(),
    }
}

#[tokio::test]
async fn exec_over_spdy_all_versions() {
    let mut env = start_with("").await;
    let id = env.container("spdy", "exec sleep 1000", true).await;
    for version in [
        "v4.channel.k8s.io",
        "v3.channel.k8s.io",
        "v2.channel.k8s.io",
        "channel.k8s.io",
    ] {
        let url = env
            .exec_url(exec_req(
                &id,
                &["sh", "-c", "echo out; echo err >&2; exit 3"],
            ))
            .await
            .unwrap();
        let (mut c, proto) = SpdyClient::connect(&env.ns, &url, &[version, "v1.bogus"])
            .await
            .unwrap();
        assert_eq!(proto, version);
        c.open(ERROR_ID, "error").await;
        c.open(STDOUT_ID, "stdout").await;
        c.open(STDERR_ID, "stderr").await;
        let o = c.collect(|_| vec![]).await;
        assert_eq!(o.out(), "out\n", "{version}");
        assert_eq!(o.stderr, b"err\n", "{version}");
        if version == "v4.channel.k8s.io" {
            let st = o.status();
            assert_eq!(st["reason"], "NonZeroExitCode", "{st}");
            assert_eq!(st["details"]["causes"][0]["message"], "3");
        } else {
            let text = String::from_utf8_lossy(&o.error);
            assert!(text.contains("exit code 3"), "{version}: {text}");
        }
    }
    let url = env.exec_url(exec_req(&id, &["true"])).await.unwrap();
    let (mut c, _) = SpdyClient::connect(&env.ns, &url, &["v4.channel.k8s.io"])
        .await
        .unwrap();
    c.open(ERROR_ID, "error").await;
    c.open(STDOUT_ID, "stdout").await;
    c.open(STDERR_ID, "stderr").await;
    assert_eq!(c.collect(|_| vec![]).await.status()["status"], "Success");
    // An unknown protocol version is refused; the token is then used up.
    let url = env.exec_url(exec_req(&id, &["true"])).await.unwrap();
    assert_eq!(
        SpdyClient::connect(&env.ns, &url, &["v9.channel.k8s.io"])
            .await
            .err()
            .unwrap(),
        "HTTP 403"
    );
    assert_eq!(
        SpdyClient::connect(&env.ns, &url, &["v4.channel.k8s.io"])
            .await
            .err()
            .unwrap(),
        "HTTP 404"
    );
    env.finish().await;
}

#[tokio::test]
async fn exec_over_spdy_with_stdin_tty_and_resize() {
    let mut env = start_with("").await;
    let id = env.container("spdytty", "exec sleep 1000", true).await;
    // stdin without a tty: closing the stream (FIN) is EOF for cat.
    let mut req = exec_req(&id, &["cat"]);
    req.stdin = true;
    let url = env.exec_url(req).await.unwrap();
    let (mut c, _) = SpdyClient::connect(&env.ns, &url, &["v4.channel.k8s.io"])
        .await
        .unwrap();
    c.open(ERROR_ID, "error").await;
    c.open(STDIN_ID, "stdin").await;
    c.open(STDOUT_ID, "stdout").await;
    c.open(STDERR_ID, "stderr").await;
    c.send(stdin_frame(b"via spdy\n", true)).await;
    let o = c.collect(|_| vec![]).await;
    assert_eq!(o.out(), "via spdy\n");
    assert_eq!(o.status()["status"], "Success");

    let mut req = exec_req(&id, &["sh", "-c", "tty; read line; stty size"]);
    req.tty = true;
    req.stdin = true;
    req.stderr = false;
    let url = env.exec_url(req).await.unwrap();
    let (mut c, _) = SpdyClient::connect(&env.ns, &url, &["v4.channel.k8s.io"])
        .await
        .unwrap();
    c.open(ERROR_ID, "error").await;
    c.open(STDIN_ID, "stdin").await;
    c.open(STDOUT_ID, "stdout").await;
    c.open(RESIZE_ID, "resize").await;
    let mut sent = false;
    let o = c
        .collect(|out| {
            if !sent && String::from_utf8_lossy(out).contains("/dev/pts/") {
                sent = true;
                vec![
                    Frame::Data {
                        stream: RESIZE_ID,
                        fin: false,
                        data: br#"{"Width":77,"Height":33}"#.to_vec(),
                    },
                    stdin_frame(b"x\r", false),
                ]
            } else {
                vec![]
            }
        })
        .await;
    let out = o.out();
    assert!(out.contains("/dev/pts/0\r\n"), "{out:?}");
    assert!(out.contains("33 77\r\n"), "{out:?}");
    assert_eq!(o.status()["status"], "Success");
    env.finish().await;
}

// ---- Attach ----

impl Env {
    /// A pod named `name` with one started container "c" made from `cfg`.
    async fn container_with(&mut self, name: &str, mut cfg: cri::ContainerConfig) -> String {
        let pod = self.pod(name).await;
        let base = sh("c", IMAGE, "");
        cfg.metadata = base.metadata;
        cfg.image = base.image;
        cfg.log_path = base.log_path;
        self.run(&pod, cfg).await
    }

    async fn attach_url(
        &mut self,
        id: &str,
        stdin: bool,
        tty: bool,
    ) -> Result<String, tonic::Status> {
        self.rt
            .attach(cri::AttachRequest {
                container_id: id.into(),
                stdin,
                tty,
                stdout: true,
                stderr: !tty,
            })
            .await
            .map(|r| r.into_inner().url)
    }
}

/// Reads stdout until it contains `want` (the server keeps streaming).
async fn ws_read_until(ws: &mut Ws, protocol: &str, want: &str) -> String {
    let mut out = Vec::new();
    while !String::from_utf8_lossy(&out).contains(want) {
        let msg = ws.next().await.expect("stream ended").unwrap();
        if let Some((1, data)) = decode(protocol, msg) {
            out.extend_from_slice(&data);
        }
    }
    String::from_utf8(out).unwrap()
}

#[tokio::test]
async fn attach_streams_output_and_survives_a_daemon_restart() {
    let mut env = start_with("").await;
    let id = env
        .container_with(
            "att",
            cri::ContainerConfig {
                command: vec![
                    "sh".into(),
                    "-c".into(),
                    "i=0; while true; do echo line$i; i=$((i+1)); sleep 0.1; done".into(),
                ],
                ..Default::default()
            },
        )
        .await;
    let protocol = PROTOCOLS[0];
    let url = env.attach_url(&id, false, false).await.unwrap();
    let mut ws = ws_connect(&env.ns, &url, protocol).await.unwrap();
    let first = ws_read_until(&mut ws, protocol, "\n").await;
    assert!(first.starts_with("line"), "{first:?}");
    drop(ws);

    env.berth.restart();
    env.rt = env.berth.runtime_client().await;
    let url = env.attach_url(&id, false, false).await.unwrap();
    let mut ws = ws_connect(&env.ns, &url, protocol).await.unwrap();
    // Live output: lines printed after the restart arrive.
    let out = ws_read_until(&mut ws, protocol, "line").await;
    assert!(out.contains("line"), "{out:?}");
    drop(ws);
    // Detaching leaves the container running.
    assert_eq!(
        env.status(&id).await.state,
        cri::ContainerState::ContainerRunning as i32
    );
    // Unknown container; not running.
    let e = env.attach_url("nope", false, false).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    env.finish().await;
}

#[tokio::test]
async fn attach_stdin_once_over_spdy() {
    let mut env = start_with("").await;
    let id = env
        .container_with(
            "attin",
            cri::ContainerConfig {
                command: vec![
                    "sh".into(),
                    "-c".into(),
                    "read x; echo got:$x; cat; echo done".into(),
                ],
                stdin: true,
                stdin_once: true,
                ..Default::default()
            },
        )
        .await;
    let url = env.attach_url(&id, true, false).await.unwrap();
    let (mut c, _) = SpdyClient::connect(&env.ns, &url, &["v4.channel.k8s.io"])
        .await
        .unwrap();
    c.open(ERROR_ID, "error").await;
    c.open(STDIN_ID, "stdin").await;
    c.open(STDOUT_ID, "stdout").await;
    c.open(STDERR_ID, "stderr").await;
    c.send(stdin_frame(b"hello\n", false)).await;
    let mut out = Vec::new();
    while !String::from_utf8_lossy(&out).contains("got:hello\n") {
        if let Frame::Data {
            stream: STDOUT_ID,
            data,
            ..
        } = c.next().await.expect("stream ended")
        {
            out.extend_from_slice(&data)
        }
    }
    c.send(stdin_frame(b"more\n", false)).await;
    while !String::from_utf8_lossy(&out).contains("more\n") {
        if let Frame::Data {
            stream: STDOUT_ID,
            data,
            ..
        } = c.next().await.expect("stream ended")
        {
            out.extend_from_slice(&data)
        }
    }
    // The first attach session ends: stdin_once closes the container's
    // stdin, cat sees EOF and the container exits 0.
    drop(c);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let st = env.status(&id).await;
        if st.state == cri::ContainerState::ContainerExited as i32 {
            assert_eq!(st.exit_code, 0);
            break;
        }
        assert!(Instant::now() < deadline, "stdin_once did not close stdin");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    env.finish().await;
}

#[tokio::test]
async fn attach_to_a_tty_container_with_resize() {
    let mut env = start_with("").await;
    let id = env
        .container_with(
            "atty",
            cri::ContainerConfig {
                command: vec![
                    "sh".into(),
                    "-c".into(),
                    "while read l; do stty size; done".into(),
                ],
                stdin: true,
                tty: true,
                ..Default::default()
            },
        )
        .await;
    let protocol = "v5.channel.k8s.io";
    let baseline = env.berth_fds();
    let url = env.attach_url(&id, true, true).await.unwrap();
    let mut ws = ws_connect(&env.ns, &url, protocol).await.unwrap();
    ws.send(encode(protocol, 4, br#"{"Width":91,"Height":31}"#))
        .await
        .unwrap();
    ws.send(encode(protocol, 0, b"x\r")).await.unwrap();
    let out = ws_read_until(&mut ws, protocol, "31 91\r\n").await;
    assert!(out.contains("x\r\n"), "the terminal echoes input: {out:?}");
    drop(ws);
    env.fds_settle(baseline).await;
    assert_eq!(
        env.status(&id).await.state,
        cri::ContainerState::ContainerRunning as i32
    );
    env.finish().await;
}

// ---- PortForward ----

#[allow(dead_code)]
#[path = "../src/streaming/wsbridge.rs"]
mod wsbridge;

impl Env {
    async fn port_forward_url(&mut self, pod: &str, ports: &[i32]) -> String {
        self.rt
            .port_forward(cri::PortForwardRequest {
                pod_sandbox_id: pod.into(),
                port: ports.to_vec(),
            })
            .await
            .unwrap()
            .into_inner()
            .url
    }

    async fn port_forward(&mut self, pod: &str) -> (SpdyClient, String) {
        let url = self.port_forward_url(pod, &[8080]).await;
        SpdyClient::connect(&self.ns, &url, &["portforward.k8s.io"])
            .await
            .unwrap()
    }
}

impl SpdyClient {
    async fn open_pair(&mut self, request: u32, port: u16) -> (u32, u32) {
        let (error, data) = (1 + 4 * request, 3 + 4 * request);
        for (id, kind) in [(error, "error"), (data, "data")] {
            self.send(Frame::SynStream {
                stream: id,
                associated: 0,
                priority: 0,
                flags: 0,
                headers: vec![
                    ("streamType".into(), kind.into()),
                    ("port".into(), port.to_string()),
                    ("requestID".into(), request.to_string()),
                ],
            })
            .await;
        }
        (error, data)
    }

    /// Reads until every stream in `data_ids` is finished; what came on
    /// each stream.
    async fn read_until_fin(
        &mut self,
        data_ids: &[u32],
    ) -> std::collections::HashMap<u32, Vec<u8>> {
        let mut got: std::collections::HashMap<u32, Vec<u8>> = Default::default();
        let mut open: Vec<u32> = data_ids.to_vec();
        while !open.is_empty() {
            match self.next().await.expect("connection ended") {
                Frame::Data { stream, fin, data } => {
                    got.entry(stream).or_default().extend_from_slice(&data);
                    if fin {
                        open.retain(|s| *s != stream);
                    }
                }
                Frame::SynReply { .. } => {}
                other => panic!("unexpected frame {other:?}"),
            }
        }
        got
    }

    /// Three connections to `port` (an echo server) at once, one of them
    /// 4 MiB: each gets back exactly what it sent.
    async fn parallel_transfers(&mut self, port: u16) {
        let sizes = [4 << 20, 100_000, 3];
        let mut ids = Vec::new();
        for k in 0..sizes.len() {
            ids.push(self.open_pair(k as u32, port).await);
        }
        let mut fins = Vec::new();
        for (k, &len) in sizes.iter().enumerate() {
            let (error, data) = ids[k];
            for chunk in pattern(k as u32, len).chunks(64 * 1024) {
                self.send(Frame::Data {
                    stream: data,
                    fin: false,
                    data: chunk.to_vec(),
                })
                .await;
            }
            self.send(Frame::Data {
                stream: data,
                fin: true,
                data: Vec::new(),
            })
            .await;
            fins.push(error);
            fins.push(data);
        }
        let got = self.read_until_fin(&fins).await;
        for (k, &len) in sizes.iter().enumerate() {
            let (error, data) = ids[k];
            assert_eq!(sha(&got[&data]), sha(&pattern(k as u32, len)), "stream {k}");
            assert!(
                got.get(&error).is_none_or(|e| e.is_empty()),
                "stream {k}: {:?}",
                got.get(&error)
            );
        }
    }
}

fn pattern(seed: u32, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2654435761).wrapping_add(seed) as u8 ^ (i >> 11) as u8)
        .collect()
}

fn sha(b: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(b))
}

#[tokio::test]
async fn port_forward_over_spdy_parallel_streams_and_a_large_transfer() {
    let mut env = start_with("").await;
    let id = env
        .container_with(
            "pf",
            cri::ContainerConfig {
                command: vec![
                    "nc".into(),
                    "-ll".into(),
                    "-p".into(),
                    "8080".into(),
                    "-e".into(),
                    "cat".into(),
                ],
                ..Default::default()
            },
        )
        .await;
    let pod = env.pod_of(&id).await;
    let baseline = env.berth_fds();
    // Until the echo server listens, the error stream says so.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (mut c, proto) = env.port_forward(&pod).await;
        assert_eq!(proto, "portforward.k8s.io");
        let (error, data) = c.open_pair(0, 8080).await;
        c.send(Frame::Data {
            stream: data,
            fin: true,
            data: b"ping".to_vec(),
        })
        .await;
        let got = c.read_until_fin(&[data, error]).await;
        if got.get(&data).map(Vec::as_slice) == Some(b"ping") {
            break;
        }
        let err = String::from_utf8_lossy(got.get(&error).map(Vec::as_slice).unwrap_or_default())
            .into_owned();
        assert!(err.contains("8080"), "{err:?}");
        assert!(
            Instant::now() < deadline,
            "the echo server never listened: {err}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Three connections over one SPDY session, one of them 4 MiB.
    let (mut c, _) = env.port_forward(&pod).await;
    c.parallel_transfers(8080).await;
    drop(c);
    env.fds_settle(baseline).await;

    // A port nobody listens on: the error stream says so.
    let (mut c, _) = env.port_forward(&pod).await;
    let (error, data) = c.open_pair(0, 8081).await;
    let got = c.read_until_fin(&[error, data]).await;
    let err = String::from_utf8_lossy(&got[&error]).into_owned();
    assert!(err.contains("8081"), "{err:?}");
    drop(c);

    // The WebSocket protocol: channel 2i data, 2i+1 errors of the i-th
    // port of the query; each channel starts with its port (LE u16).
    for protocol in ["v4.channel.k8s.io", "v4.base64.channel.k8s.io"] {
        let url = env.port_forward_url(&pod, &[8080, 8081]).await;
        let mut ws = ws_connect(&env.ns, &format!("{url}?port=8080&port=8081"), protocol)
            .await
            .unwrap();
        let mut firsts = Vec::new();
        let mut error_8081 = Vec::new();
        while firsts.len() < 4 || error_8081.is_empty() {
            let (ch, data) = decode(protocol, ws.next().await.unwrap().unwrap()).unwrap();
            if firsts.iter().any(|(c, _)| *c == ch) {
                assert_eq!(ch, 3, "only 8081's error channel says more");
                error_8081.extend_from_slice(&data);
            } else {
                firsts.push((ch, data));
            }
        }
        firsts.sort();
        assert_eq!(
            firsts,
            vec![
                (0, 8080u16.to_le_bytes().to_vec()),
                (1, 8080u16.to_le_bytes().to_vec()),
                (2, 8081u16.to_le_bytes().to_vec()),
                (3, 8081u16.to_le_bytes().to_vec()),
            ],
            "{protocol}"
        );
        assert!(String::from_utf8_lossy(&error_8081).contains("8081"));
        ws.send(encode(protocol, 0, b"over websocket\n"))
            .await
            .unwrap();
        let mut echoed = Vec::new();
        while echoed != b"over websocket\n" {
            let (ch, data) = decode(protocol, ws.next().await.unwrap().unwrap()).unwrap();
            assert_eq!(ch, 0);
            echoed.extend_from_slice(&data);
        }
        drop(ws);
    }
    env.fds_settle(baseline).await;

    // kubectl >= 1.30: the SPDY session tunnelled in WebSocket binary
    // messages, parallel streams and all.
    let url = env.port_forward_url(&pod, &[8080]).await;
    let ws = ws_connect(&env.ns, &url, "SPDY/3.1+portforward.k8s.io")
        .await
        .unwrap();
    let (local, tunnel) = tokio::io::duplex(64 * 1024);
    let pump = tokio::spawn(wsbridge::bridge(ws, tunnel));
    let mut c = SpdyClient::over(Box::new(local));
    c.parallel_transfers(8080).await;
    drop(c);
    pump.await.unwrap();
    env.fds_settle(baseline).await;

    // Unknown pod.
    let e = env
        .rt
        .port_forward(cri::PortForwardRequest {
            pod_sandbox_id: "nope".into(),
            port: vec![80],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    env.finish().await;
}

// ---- End of input on a terminal ----

#[tokio::test]
async fn closing_stdin_of_a_tty_exec_is_end_of_input() {
    let mut env = start_with("").await;
    let id = env.container("ttyeof", "exec sleep 1000", true).await;
    let mut tty_cat = exec_req(&id, &["cat"]);
    tty_cat.tty = true;
    tty_cat.stdin = true;
    tty_cat.stderr = false;

    // WebSocket v5: a line, then the close signal for stdin; cat ends.
    let protocol = "v5.channel.k8s.io";
    let url = env.exec_url(tty_cat.clone()).await.unwrap();
    let mut ws = ws_connect(&env.ns, &url, protocol).await.unwrap();
    ws.send(encode(protocol, 0, b"hello\r")).await.unwrap();
    ws.send(encode(protocol, 255, &[0])).await.unwrap();
    let o = collect(&mut ws, protocol, |_| vec![]).await;
    // The terminal's echo and cat's copy.
    assert_eq!(o.out().matches("hello\r\n").count(), 2, "{:?}", o.out());
    assert_eq!(o.status()["status"], "Success");

    // SPDY: the stdin stream's FIN in the middle of a line; the line still
    // reaches cat, then the end of input.
    let url = env.exec_url(tty_cat).await.unwrap();
    let (mut c, _) = SpdyClient::connect(&env.ns, &url, &["v4.channel.k8s.io"])
        .await
        .unwrap();
    c.open(ERROR_ID, "error").await;
    c.open(STDIN_ID, "stdin").await;
    c.open(STDOUT_ID, "stdout").await;
    c.open(RESIZE_ID, "resize").await;
    c.send(stdin_frame(b"partial", true)).await;
    let o = c.collect(|_| vec![]).await;
    assert_eq!(o.out().matches("partial").count(), 2, "{:?}", o.out());
    assert_eq!(o.status()["status"], "Success");
    env.finish().await;
}

// ---- Attach without a monitor ----

#[tokio::test]
async fn attach_when_the_monitor_is_gone() {
    let mut env = start_with("").await;
    let id = env
        .container_with(
            "nomon",
            cri::ContainerConfig {
                command: vec!["sleep".into(), "1002".into()],
                ..Default::default()
            },
        )
        .await;
    let sockets = env.berth.state_dir.join("monitors");
    let sock = sockets.join(format!("{id}.sock"));
    assert!(sock.exists(), "{}", sock.display());
    let rec: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            env.berth
                .root
                .join("containers")
                .join(&id)
                .join("state.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let monitor = rec["monitor"]["pid"].as_i64().expect("monitor pid") as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(monitor),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // Dead (a zombie has closed its fds) or reaped already.
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::fs::read_to_string(format!("/proc/{monitor}/stat"))
        .is_ok_and(|st| !matches!(st.rsplit_once(") ").map(|(_, r)| &r[..1]), Some("Z" | "X")))
    {
        assert!(Instant::now() < deadline, "the monitor survived SIGKILL");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Refused, naming the container, whether or not its exit has been
    // noticed yet.
    let e = env.attach_url(&id, false, false).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains(&id), "{e:?}");
    // Its socket is swept once the exit is recorded.
    let deadline = Instant::now() + Duration::from_secs(20);
    while sock.exists() {
        assert!(Instant::now() < deadline, "{} left behind", sock.display());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A socket no container owns (as a crash leaves) goes at startup.
    let stray = sockets.join("0123456789abcdef.sock");
    drop(std::os::unix::net::UnixListener::bind(&stray).unwrap());
    assert!(stray.exists());
    env.berth.restart();
    env.rt = env.berth.runtime_client().await;
    assert!(!stray.exists(), "{} survived a restart", stray.display());
    env.finish().await;
}

// ---- TLS ----

/// A TLS connection to the streaming server, trusting only `ca_pem`.
async fn tls_connect(
    ns: &Netns,
    hostport: &str,
    ca_pem: &str,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let host = hostport.rsplit_once(':').unwrap().0.to_string();
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
        .connect(ServerName::try_from(host).unwrap(), connect(ns, hostport))
        .await
        .unwrap()
}

/// Runs the exec of `url` over TLS and WebSocket.
async fn exec_over_tls(ns: &Netns, url: &str, ca_pem: &str, protocol: &str) -> Outcome {
    let (hostport, path) = split_url(url);
    let tls = tls_connect(ns, &hostport, ca_pem).await;
    let mut req = format!("ws://{hostport}{path}")
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", protocol.parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::client_async(req, tls).await.unwrap();
    collect(&mut ws, protocol, |_| vec![]).await
}

#[tokio::test]
async fn exec_over_tls_and_plain_http_is_refused() {
    let (ca, cert, key) = make_tls_cert();
    let certs = tempfile::tempdir().unwrap();
    let (cert_path, key_path) = (certs.path().join("cert.pem"), certs.path().join("key.pem"));
    std::fs::write(&cert_path, cert).unwrap();
    std::fs::write(&key_path, key).unwrap();
    let mut env = start_with(&format!(
        "[streaming]\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
        cert_path.display(),
        key_path.display()
    ))
    .await;
    let id = env.container("tls", "exec sleep 1000", true).await;
    let protocol = PROTOCOLS[0];
    let url = env
        .exec_url(exec_req(&id, &["sh", "-c", "echo secret; exit 2"]))
        .await
        .unwrap();
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");
    let o = exec_over_tls(&env.ns, &url, &ca, protocol).await;
    assert_eq!(o.out(), "secret\n");
    assert_eq!(o.status()["details"]["causes"][0]["message"], "2");

    // Plain HTTP on that port gets no HTTP answer (the TLS handshake fails)
    // and does not use the token up: it still works over TLS afterwards.
    let url = env.exec_url(exec_req(&id, &["true"])).await.unwrap();
    let (hostport, path) = split_url(&url);
    let mut tcp = connect(&env.ns, &hostport);
    tcp.write_all(format!("GET {path} HTTP/1.1\r\nHost: {hostport}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tcp.read_to_end(&mut answer).await;
    assert!(
        !answer.starts_with(b"HTTP/"),
        "{:?}",
        String::from_utf8_lossy(&answer)
    );
    assert!(ws_connect(&env.ns, &url, protocol).await.is_err());
    assert_eq!(
        exec_over_tls(&env.ns, &url, &ca, protocol).await.status()["status"],
        "Success"
    );
    env.finish().await;
}
