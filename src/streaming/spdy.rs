//! SPDY/3.1 framing (draft-mbelshe-httpbis-spdy-00, version 3) with its
//! zlib header compression, as far as Kubernetes' streaming protocols use
//! it: SYN_STREAM/SYN_REPLY/RST_STREAM/SETTINGS/PING/GOAWAY/HEADERS/
//! WINDOW_UPDATE and data frames. No maintained Rust crate implements
//! SPDY (it was superseded by HTTP/2), hence this module. It depends on
//! nothing of berth, so the integration tests build their client on it.
//!
//! Flow control is not enforced: the Go implementation Kubernetes clients
//! use (moby/spdystream) neither sends nor honours WINDOW_UPDATE.

use bytes::{Buf, BytesMut};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

pub const VERSION: u16 = 3;
pub const FLAG_FIN: u8 = 0x01;

const SYN_STREAM: u16 = 1;
const SYN_REPLY: u16 = 2;
const RST_STREAM: u16 = 3;
const SETTINGS: u16 = 4;
const PING: u16 = 6;
const GOAWAY: u16 = 7;
const HEADERS: u16 = 8;
const WINDOW_UPDATE: u16 = 9;

/// Largest frame payload accepted (the format allows 16 MiB).
pub const MAX_FRAME: usize = 1 << 20;
/// Largest decompressed header block accepted.
const MAX_HEADER_BLOCK: usize = 256 << 10;

pub type Headers = Vec<(String, String)>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Data {
        stream: u32,
        fin: bool,
        data: Vec<u8>,
    },
    SynStream {
        stream: u32,
        associated: u32,
        priority: u8,
        flags: u8,
        headers: Headers,
    },
    SynReply {
        stream: u32,
        fin: bool,
        headers: Headers,
    },
    RstStream {
        stream: u32,
        status: u32,
    },
    /// (flags, id, value) entries.
    Settings(Vec<(u8, u32, u32)>),
    Ping(u32),
    GoAway {
        last_stream: u32,
        status: u32,
    },
    Headers {
        stream: u32,
        fin: bool,
        headers: Headers,
    },
    WindowUpdate {
        stream: u32,
        delta: u32,
    },
    /// A control frame type we do not know; ignored, as the spec says.
    Unknown(u16),
}

#[derive(Debug, thiserror::Error)]
pub enum SpdyError {
    #[error("SPDY: unsupported version {0}")]
    Version(u16),
    #[error("SPDY: frame of {0} bytes is too large")]
    TooLarge(usize),
    #[error("SPDY: malformed {0} frame")]
    Malformed(&'static str),
    #[error("SPDY: header block: {0}")]
    Headers(String),
}

/// The SPDY/3 header dictionary (section 2.6.10.1): length-prefixed words,
/// then a run of text.
fn dictionary() -> Vec<u8> {
    const WORDS: [&str; 65] = [
        "options",
        "head",
        "post",
        "put",
        "delete",
        "trace",
        "accept",
        "accept-charset",
        "accept-encoding",
        "accept-language",
        "accept-ranges",
        "age",
        "allow",
        "authorization",
        "cache-control",
        "connection",
        "content-base",
        "content-encoding",
        "content-language",
        "content-length",
        "content-location",
        "content-md5",
        "content-range",
        "content-type",
        "date",
        "etag",
        "expect",
        "expires",
        "from",
        "host",
        "if-match",
        "if-modified-since",
        "if-none-match",
        "if-range",
        "if-unmodified-since",
        "last-modified",
        "location",
        "max-forwards",
        "pragma",
        "proxy-authenticate",
        "proxy-authorization",
        "range",
        "referer",
        "retry-after",
        "server",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "user-agent",
        "vary",
        "via",
        "warning",
        "www-authenticate",
        "method",
        "get",
        "status",
        "200 OK",
        "version",
        "HTTP/1.1",
        "url",
        "public",
        "set-cookie",
        "keep-alive",
        "origin",
    ];
    const TAIL: &str = concat!(
        "100101201202205206300302303304305306307402405406407408409410411412413414415416417",
        "502504505203 Non-Authoritative Information204 No Content301 Moved Permanently",
        "400 Bad Request401 Unauthorized403 Forbidden404 Not Found500 Internal Server Error",
        "501 Not Implemented503 Service UnavailableJan Feb Mar Apr May Jun Jul Aug Sept Oct ",
        "Nov Dec 00:00:00 Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMTchunked,text/html,image/png,",
        "image/jpg,image/gif,application/xml,application/xhtml+xml,text/plain,text/javascript,",
        "publicprivatemax-age=gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0.",
    );
    let mut d = Vec::with_capacity(1423);
    for w in WORDS {
        d.extend_from_slice(&(w.len() as u32).to_be_bytes());
        d.extend_from_slice(w.as_bytes());
    }
    d.extend_from_slice(TAIL.as_bytes());
    d
}

/// Reads frames; one per connection direction (the header decompression
/// context spans the whole connection).
pub struct Decoder {
    z: Decompress,
    dict: Vec<u8>,
}

/// Writes frames; one per connection direction.
pub struct Encoder {
    z: Compress,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder {
            z: Decompress::new(true),
            dict: dictionary(),
        }
    }
}

impl Default for Encoder {
    fn default() -> Self {
        let mut z = Compress::new(Compression::default(), true);
        z.set_dictionary(&dictionary())
            .expect("a fresh deflate stream accepts a dictionary");
        Encoder { z }
    }
}

fn u32_at(b: &[u8], i: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(i..i + 4)?.try_into().ok()?))
}

impl Decoder {
    /// Takes one frame off the front of `buf`; `None` until it is complete.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, SpdyError> {
        if buf.len() < 8 {
            return Ok(None);
        }
        let len = (u32_at(buf, 4).unwrap_or(0) & 0x00ff_ffff) as usize;
        if len > MAX_FRAME {
            return Err(SpdyError::TooLarge(len));
        }
        if buf.len() < 8 + len {
            return Ok(None);
        }
        let head = buf.split_to(8);
        let body = buf.split_to(len);
        let flags = head[4];
        let word0 = u32_at(&head, 0).unwrap_or(0);
        if word0 & 0x8000_0000 == 0 {
            return Ok(Some(Frame::Data {
                stream: word0 & 0x7fff_ffff,
                fin: flags & FLAG_FIN != 0,
                data: body.to_vec(),
            }));
        }
        let version = ((word0 >> 16) & 0x7fff) as u16;
        if version != VERSION {
            return Err(SpdyError::Version(version));
        }
        let kind = (word0 & 0xffff) as u16;
        let b = &body[..];
        let stream_at = |i: usize, what| {
            u32_at(b, i)
                .map(|v| v & 0x7fff_ffff)
                .ok_or(SpdyError::Malformed(what))
        };
        let fin = flags & FLAG_FIN != 0;
        Ok(Some(match kind {
            SYN_STREAM => {
                if b.len() < 10 {
                    return Err(SpdyError::Malformed("SYN_STREAM"));
                }
                Frame::SynStream {
                    stream: stream_at(0, "SYN_STREAM")?,
                    associated: stream_at(4, "SYN_STREAM")?,
                    priority: b[8] >> 5,
                    flags,
                    headers: self.headers(&b[10..])?,
                }
            }
            SYN_REPLY => Frame::SynReply {
                stream: stream_at(0, "SYN_REPLY")?,
                fin,
                headers: self.headers(b.get(4..).unwrap_or_default())?,
            },
            HEADERS => Frame::Headers {
                stream: stream_at(0, "HEADERS")?,
                fin,
                headers: self.headers(b.get(4..).unwrap_or_default())?,
            },
            RST_STREAM => Frame::RstStream {
                stream: stream_at(0, "RST_STREAM")?,
                status: u32_at(b, 4).ok_or(SpdyError::Malformed("RST_STREAM"))?,
            },
            SETTINGS => {
                let n = u32_at(b, 0).ok_or(SpdyError::Malformed("SETTINGS"))? as usize;
                if b.len() < 4 + n.saturating_mul(8) {
                    return Err(SpdyError::Malformed("SETTINGS"));
                }
                Frame::Settings(
                    (0..n)
                        .map(|i| {
                            let at = 4 + i * 8;
                            let id = u32_at(b, at).unwrap_or(0);
                            (
                                (id >> 24) as u8,
                                id & 0x00ff_ffff,
                                u32_at(b, at + 4).unwrap_or(0),
                            )
                        })
                        .collect(),
                )
            }
            PING => Frame::Ping(u32_at(b, 0).ok_or(SpdyError::Malformed("PING"))?),
            GOAWAY => Frame::GoAway {
                last_stream: stream_at(0, "GOAWAY")?,
                status: u32_at(b, 4).unwrap_or(0),
            },
            WINDOW_UPDATE => Frame::WindowUpdate {
                stream: stream_at(0, "WINDOW_UPDATE")?,
                delta: u32_at(b, 4).ok_or(SpdyError::Malformed("WINDOW_UPDATE"))? & 0x7fff_ffff,
            },
            other => Frame::Unknown(other),
        }))
    }

    fn headers(&mut self, compressed: &[u8]) -> Result<Headers, SpdyError> {
        let bad = |m: &str| SpdyError::Headers(m.to_string());
        let mut out = Vec::with_capacity(4 * compressed.len() + 64);
        let mut input = compressed;
        while !input.is_empty() {
            if out.len() == out.capacity() {
                if out.len() >= MAX_HEADER_BLOCK {
                    return Err(bad("too large"));
                }
                out.reserve(out.len());
            }
            let before = self.z.total_in();
            let res = self
                .z
                .decompress_vec(input, &mut out, FlushDecompress::Sync);
            let used = (self.z.total_in() - before) as usize;
            input = &input[used..];
            match res {
                Ok(Status::StreamEnd) => break,
                Ok(_) => {}
                Err(e) if e.needs_dictionary().is_some() => {
                    self.z
                        .set_dictionary(&self.dict)
                        .map_err(|e| SpdyError::Headers(e.to_string()))?;
                }
                Err(e) => return Err(SpdyError::Headers(e.to_string())),
            }
        }
        // Whatever zlib still holds for this block.
        loop {
            if out.len() == out.capacity() {
                if out.len() >= MAX_HEADER_BLOCK {
                    return Err(bad("too large"));
                }
                out.reserve(out.len().max(64));
            }
            let before = out.len();
            self.z
                .decompress_vec(&[], &mut out, FlushDecompress::Sync)
                .map_err(|e| SpdyError::Headers(e.to_string()))?;
            if out.len() == before {
                break;
            }
        }
        parse_block(&out).ok_or_else(|| bad("malformed name/value block"))
    }
}

fn parse_block(mut b: &[u8]) -> Option<Headers> {
    let n = b.get_u32_checked()?;
    let mut h = Vec::new();
    for _ in 0..n {
        let name = b.get_string()?;
        let value = b.get_string()?;
        // Several values of one name are joined by NULs.
        for v in value.split('\0') {
            h.push((name.clone(), v.to_string()));
        }
    }
    Some(h)
}

trait BlockRead {
    fn get_u32_checked(&mut self) -> Option<u32>;
    fn get_string(&mut self) -> Option<String>;
}

impl BlockRead for &[u8] {
    fn get_u32_checked(&mut self) -> Option<u32> {
        (self.remaining() >= 4).then(|| self.get_u32())
    }
    fn get_string(&mut self) -> Option<String> {
        let len = self.get_u32_checked()? as usize;
        if self.remaining() < len {
            return None;
        }
        let s = String::from_utf8(self[..len].to_vec()).ok()?;
        self.advance(len);
        Some(s)
    }
}

impl Encoder {
    /// Appends `frame`'s bytes to `out`.
    pub fn encode(&mut self, frame: &Frame, out: &mut Vec<u8>) -> Result<(), SpdyError> {
        let control = |out: &mut Vec<u8>, kind: u16, flags: u8, body: &[u8]| {
            out.extend_from_slice(
                &(0x8000_0000u32 | (u32::from(VERSION) << 16) | u32::from(kind)).to_be_bytes(),
            );
            out.extend_from_slice(&((u32::from(flags) << 24) | body.len() as u32).to_be_bytes());
            out.extend_from_slice(body);
        };
        let fin_flag = |fin: bool| if fin { FLAG_FIN } else { 0 };
        match frame {
            Frame::Data { stream, fin, data } => {
                if data.len() > 0x00ff_ffff {
                    return Err(SpdyError::TooLarge(data.len()));
                }
                out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
                out.extend_from_slice(
                    &((u32::from(fin_flag(*fin)) << 24) | data.len() as u32).to_be_bytes(),
                );
                out.extend_from_slice(data);
            }
            Frame::SynStream {
                stream,
                associated,
                priority,
                flags,
                headers,
            } => {
                let mut body = Vec::new();
                body.extend_from_slice(&stream.to_be_bytes());
                body.extend_from_slice(&associated.to_be_bytes());
                body.push(priority << 5);
                body.push(0);
                self.block(headers, &mut body)?;
                control(out, SYN_STREAM, *flags, &body);
            }
            Frame::SynReply {
                stream,
                fin,
                headers,
            }
            | Frame::Headers {
                stream,
                fin,
                headers,
            } => {
                let mut body = stream.to_be_bytes().to_vec();
                self.block(headers, &mut body)?;
                let kind = if matches!(frame, Frame::SynReply { .. }) {
                    SYN_REPLY
                } else {
                    HEADERS
                };
                control(out, kind, fin_flag(*fin), &body);
            }
            Frame::RstStream { stream, status } => {
                let body = [stream.to_be_bytes(), status.to_be_bytes()].concat();
                control(out, RST_STREAM, 0, &body);
            }
            Frame::Settings(entries) => {
                let mut body = (entries.len() as u32).to_be_bytes().to_vec();
                for (flags, id, value) in entries {
                    body.extend_from_slice(
                        &((u32::from(*flags) << 24) | (id & 0x00ff_ffff)).to_be_bytes(),
                    );
                    body.extend_from_slice(&value.to_be_bytes());
                }
                control(out, SETTINGS, 0, &body);
            }
            Frame::Ping(id) => control(out, PING, 0, &id.to_be_bytes()),
            Frame::GoAway {
                last_stream,
                status,
            } => {
                let body = [last_stream.to_be_bytes(), status.to_be_bytes()].concat();
                control(out, GOAWAY, 0, &body);
            }
            Frame::WindowUpdate { stream, delta } => {
                let body = [stream.to_be_bytes(), delta.to_be_bytes()].concat();
                control(out, WINDOW_UPDATE, 0, &body);
            }
            Frame::Unknown(_) => {}
        }
        Ok(())
    }

    /// Compresses a name/value block (lower-case names, as SPDY/3 requires)
    /// onto `out`, ending with a sync flush so the peer can decode it now.
    fn block(&mut self, headers: &Headers, out: &mut Vec<u8>) -> Result<(), SpdyError> {
        let mut names: Vec<(String, Vec<&str>)> = Vec::new();
        for (n, v) in headers {
            let n = n.to_ascii_lowercase();
            match names.iter_mut().find(|(m, _)| *m == n) {
                Some((_, vs)) => vs.push(v),
                None => names.push((n, vec![v])),
            }
        }
        let mut raw = (names.len() as u32).to_be_bytes().to_vec();
        for (n, vs) in &names {
            let v = vs.join("\0");
            raw.extend_from_slice(&(n.len() as u32).to_be_bytes());
            raw.extend_from_slice(n.as_bytes());
            raw.extend_from_slice(&(v.len() as u32).to_be_bytes());
            raw.extend_from_slice(v.as_bytes());
        }
        let mut input = &raw[..];
        loop {
            out.reserve(input.len() + 64);
            let before = self.z.total_in();
            self.z
                .compress_vec(input, out, FlushCompress::Sync)
                .map_err(|e| SpdyError::Headers(e.to_string()))?;
            input = &input[(self.z.total_in() - before) as usize..];
            // Room left over means the flush is complete.
            if input.is_empty() && out.len() < out.capacity() {
                break;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dictionary_is_the_spec_one() {
        let d = dictionary();
        assert_eq!(d.len(), 1423);
        assert_eq!(&d[..11], b"\0\0\0\x07options");
        assert!(d.ends_with(b",*,enq=0."));
        // zlib's adler32 of it, as a peer's inflate checks it.
        let mut z = Compress::new(Compression::default(), true);
        z.set_dictionary(&d).unwrap();
        let mut out = Vec::with_capacity(64);
        z.compress_vec(b"", &mut out, FlushCompress::Sync).unwrap();
        // CMF/FLG with FDICT, then the dictionary id.
        assert_eq!(out[1] & 0x20, 0x20);
        assert_eq!(&out[2..6], &0xe3c6_a7c2u32.to_be_bytes());
    }

    /// A SYN_STREAM as moby/spdystream sends it for a Kubernetes exec:
    /// streamtype: error, compressed with the SPDY/3 dictionary.
    #[test]
    fn decodes_a_syn_stream_fixture() {
        let mut enc = Encoder::default();
        let mut wire = Vec::new();
        let headers = vec![("streamType".to_string(), "error".to_string())];
        enc.encode(
            &Frame::SynStream {
                stream: 1,
                associated: 0,
                priority: 0,
                flags: 0,
                headers: headers.clone(),
            },
            &mut wire,
        )
        .unwrap();
        // Fixed 18-byte prefix: control bit, version 3, type 1, no flags.
        assert_eq!(&wire[..4], &[0x80, 0x03, 0x00, 0x01]);
        assert_eq!(wire[4], 0);
        assert_eq!(&wire[8..16], &[0, 0, 0, 1, 0, 0, 0, 0]);
        // zlib header with the dictionary's id.
        assert_eq!(&wire[20..24], &0xe3c6_a7c2u32.to_be_bytes());
        let mut dec = Decoder::default();
        let mut buf = BytesMut::from(&wire[..]);
        let f = dec.decode(&mut buf).unwrap().unwrap();
        assert_eq!(
            f,
            Frame::SynStream {
                stream: 1,
                associated: 0,
                priority: 0,
                flags: 0,
                headers: vec![("streamtype".into(), "error".into())],
            }
        );
        assert!(buf.is_empty());
    }

    /// Two SYN_STREAMs as a peer using C zlib (level 9) sends them: the
    /// second block refers back into the first through the shared context.
    #[test]
    fn decodes_frames_compressed_by_c_zlib() {
        #[rustfmt::skip]
        const WIRE: [u8; 81] = [
            0x80, 0x03, 0x00, 0x01, 0x00, 0x00, 0x00, 0x28, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00,
            0x00, 0x00, 0x00, 0x00, 0x78, 0xf9, 0xe3, 0xc6, 0xa7, 0xc2, 0x02, 0xa6, 0x23, 0x46,
            0x70, 0x3a, 0x2b, 0x29, 0x4a, 0x4d, 0xcc, 0x85, 0x16, 0x25, 0xac, 0xa9, 0xa0, 0x80,
            0x06, 0x00, 0x00, 0x00, 0xff, 0xff, 0x80, 0x03, 0x00, 0x01, 0x00, 0x00, 0x00, 0x19,
            0x00, 0x00, 0x00, 0x03, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xc2, 0x2a, 0x05, 0x4c,
            0xcc, 0x29, 0xf9, 0xa5, 0x25, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff,
        ];
        let mut dec = Decoder::default();
        // Delivered a byte at a time: frames only come out when complete.
        let mut buf = BytesMut::new();
        let mut frames = Vec::new();
        for b in WIRE {
            buf.extend_from_slice(&[b]);
            if let Some(f) = dec.decode(&mut buf).unwrap() {
                frames.push(f);
            }
        }
        let syn = |stream: u32, kind: &str| Frame::SynStream {
            stream,
            associated: 0,
            priority: 0,
            flags: 0,
            headers: vec![("streamtype".into(), kind.into())],
        };
        assert_eq!(frames, vec![syn(1, "error"), syn(3, "stdout")]);
    }

    #[test]
    fn the_compression_context_spans_frames() {
        let mut enc = Encoder::default();
        let mut dec = Decoder::default();
        let mut wire = Vec::new();
        for i in 1..=5u32 {
            enc.encode(
                &Frame::SynReply {
                    stream: i,
                    fin: i == 5,
                    headers: vec![("a".into(), format!("v{i}")), ("a".into(), "w".into())],
                },
                &mut wire,
            )
            .unwrap();
        }
        let mut buf = BytesMut::from(&wire[..]);
        for i in 1..=5u32 {
            assert_eq!(
                dec.decode(&mut buf).unwrap().unwrap(),
                Frame::SynReply {
                    stream: i,
                    fin: i == 5,
                    headers: vec![("a".into(), format!("v{i}")), ("a".into(), "w".into())],
                }
            );
        }
    }

    #[test]
    fn data_and_simple_control_frames_byte_exact() {
        let mut enc = Encoder::default();
        let mut wire = Vec::new();
        enc.encode(
            &Frame::Data {
                stream: 3,
                fin: true,
                data: b"hi".to_vec(),
            },
            &mut wire,
        )
        .unwrap();
        assert_eq!(wire, [0, 0, 0, 3, 1, 0, 0, 2, b'h', b'i']);
        wire.clear();
        enc.encode(&Frame::Ping(7), &mut wire).unwrap();
        assert_eq!(wire, [0x80, 3, 0, 6, 0, 0, 0, 4, 0, 0, 0, 7]);
        wire.clear();
        enc.encode(
            &Frame::RstStream {
                stream: 5,
                status: 5,
            },
            &mut wire,
        )
        .unwrap();
        assert_eq!(wire, [0x80, 3, 0, 3, 0, 0, 0, 8, 0, 0, 0, 5, 0, 0, 0, 5]);
        let mut dec = Decoder::default();
        let mut buf = BytesMut::from(&[0x80u8, 3, 0, 6, 0, 0, 0, 4, 0, 0][..]);
        assert_eq!(dec.decode(&mut buf).unwrap(), None, "incomplete");
        buf.extend_from_slice(&[0, 9]);
        assert_eq!(dec.decode(&mut buf).unwrap(), Some(Frame::Ping(9)));
        let mut buf = BytesMut::from(&[0x80u8, 2, 0, 6, 0, 0, 0, 4, 0, 0, 0, 1][..]);
        assert!(matches!(dec.decode(&mut buf), Err(SpdyError::Version(2))));
        let mut buf = BytesMut::from(&[0u8, 0, 0, 1, 0, 0xff, 0xff, 0xff][..]);
        assert!(matches!(dec.decode(&mut buf), Err(SpdyError::TooLarge(_))));
    }
}
