//! A minimal registry token server (the Docker/OCI "Bearer" challenge flow),
//! listening inside a test's network namespace. It checks HTTP Basic
//! credentials and issues ES256 JWTs with an x5c header that docker-registry
//! verifies against `rootcertbundle`.

use super::Netns;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub const ISSUER: &str = "berth-test-issuer";
pub const SERVICE: &str = "berth-test-registry";
/// The OAuth2 refresh token (a CRI identity_token) the server accepts.
pub const REFRESH_TOKEN: &str = "berth-test-refresh-token";

pub struct TokenServer {
    pub realm: String,
    /// PEM of the certificate whose key signs the tokens.
    pub cert_pem: PathBuf,
    /// Tokens issued so far.
    pub issued: Arc<AtomicUsize>,
    signer: Arc<Signer>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct Signer {
    key: rcgen::KeyPair,
    cert_der: Vec<u8>,
}

impl Signer {
    fn token(&self, subject: &str, repo: &str, actions: &[&str]) -> String {
        use rcgen::SigningKey;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let header = serde_json::json!({
            "typ": "JWT", "alg": "ES256", "x5c": [STANDARD.encode(&self.cert_der)],
        });
        let claims = serde_json::json!({
            "iss": ISSUER, "sub": subject, "aud": SERVICE,
            "exp": now + 300, "nbf": now - 10, "iat": now,
            "jti": format!("{:x}", now ^ (std::process::id() as u64)),
            "access": [{"type": "repository", "name": repo, "actions": actions}],
        });
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let der = self.key.sign(signing_input.as_bytes()).expect("sign token");
        format!(
            "{signing_input}.{}",
            URL_SAFE_NO_PAD.encode(der_to_raw(&der))
        )
    }
}

/// ECDSA signatures come DER-encoded; JWS wants r || s, 32 bytes each.
fn der_to_raw(der: &[u8]) -> Vec<u8> {
    fn int(b: &[u8]) -> (&[u8], &[u8]) {
        assert_eq!(b[0], 0x02, "DER INTEGER expected");
        let len = b[1] as usize;
        (&b[2..2 + len], &b[2 + len..])
    }
    assert_eq!(der[0], 0x30, "DER SEQUENCE expected");
    let (r, rest) = int(&der[2..]);
    let (s, _) = int(rest);
    let mut out = Vec::with_capacity(64);
    for v in [r, s] {
        let v = &v[v.len().saturating_sub(32)..];
        out.extend(std::iter::repeat_n(0u8, 32 - v.len()));
        out.extend_from_slice(v);
    }
    out
}

impl TokenServer {
    /// Serves on 127.0.0.1:`port` inside `ns`; accepts only `user:pass`.
    pub fn start(ns: &Netns, dir: &Path, port: u16, user: &str, pass: &str) -> TokenServer {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "berth test token signer");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let cert_pem = dir.join("token-signer.pem");
        std::fs::write(&cert_pem, cert.pem()).unwrap();
        let signer = Arc::new(Signer {
            key,
            cert_der: cert.der().to_vec(),
        });
        let expected = format!("Basic {}", STANDARD.encode(format!("{user}:{pass}")));
        let stop = Arc::new(AtomicBool::new(false));
        let issued = Arc::new(AtomicUsize::new(0));
        let netns = format!("/proc/{}/ns/net", ns.pid());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = {
            let (stop, issued, signer) = (stop.clone(), issued.clone(), signer.clone());
            std::thread::spawn(move || {
                let f = std::fs::File::open(netns).unwrap();
                nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
                let l = TcpListener::bind(("127.0.0.1", port)).unwrap();
                l.set_nonblocking(true).unwrap();
                ready_tx.send(()).unwrap();
                while !stop.load(Ordering::Relaxed) {
                    match l.accept() {
                        Ok((s, _)) => {
                            s.set_nonblocking(false).unwrap();
                            serve_one(s, &expected, &signer, &issued);
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            })
        };
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("token server listening");
        TokenServer {
            realm: format!("http://127.0.0.1:{port}/token"),
            cert_pem,
            issued,
            signer,
            stop,
            thread: Some(thread),
        }
    }

    /// A token for `repo` minted directly, as a CRI registry_token would carry.
    pub fn mint(&self, repo: &str) -> String {
        self.signer.token("minted", repo, &["pull"])
    }
}

fn serve_one(s: std::net::TcpStream, expected: &str, signer: &Signer, issued: &AtomicUsize) {
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    if r.read_line(&mut line).is_err() {
        return;
    }
    let mut words = line.split_whitespace();
    let method = words.next().unwrap_or("").to_string();
    let target = words.next().unwrap_or("").to_string();
    let mut auth = String::new();
    let mut length = 0usize;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("authorization") {
                auth = v.trim().to_string();
            } else if k.eq_ignore_ascii_case("content-length") {
                length = v.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut body = vec![0u8; length.min(1 << 16)];
    let _ = std::io::Read::read_exact(&mut r, &mut body);
    let body = String::from_utf8_lossy(&body).into_owned();
    // GET carries the parameters in the query, the OAuth2 POST in a form body.
    let params = if method == "POST" {
        body
    } else {
        target
            .split_once('?')
            .map(|x| x.1)
            .unwrap_or("")
            .to_string()
    };
    let param = |name: &str| {
        params
            .split('&')
            .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
            .map(|v| {
                v.replace("%3A", ":")
                    .replace("%2C", ",")
                    .replace("%2F", "/")
                    .replace('+', " ")
            })
            .unwrap_or_default()
    };
    let scope = param("scope");
    let authorized = if method == "POST" {
        param("grant_type") == "refresh_token" && param("refresh_token") == REFRESH_TOKEN
    } else {
        auth == expected
    };
    let mut w = s;
    if !authorized {
        let _ = w.write_all(
            b"HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
        );
        return;
    }
    // scope = repository:<name>:<actions>
    let mut parts = scope.splitn(3, ':');
    let (_, repo, actions) = (
        parts.next(),
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
    );
    let actions: Vec<&str> = actions.split(',').filter(|a| !a.is_empty()).collect();
    let token = signer.token("alice", repo, &actions);
    issued.fetch_add(1, Ordering::Relaxed);
    let body =
        serde_json::json!({"token": token, "access_token": token, "expires_in": 300}).to_string();
    let _ = write!(
        w,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
