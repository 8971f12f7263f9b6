//! Attach sessions served by the monitor on a unix socket, so they work
//! whatever happened to the daemon. Part of the monitor's single poll loop.
//!
//! Wire format, both ways: `[kind u8][len u32 BE][payload]`.
//! monitor -> client: kind 1 stdout, 2 stderr (a tty's output is stdout).
//! client -> monitor: [`STDIN`] data, [`STDIN_CLOSE`] (this session's stdin
//! ended), [`RESIZE`] (cols u16 BE, rows u16 BE).
//! The monitor closes every session when the container's output ends.

use nix::poll::{PollFd, PollFlags};
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

pub const STDOUT: u8 = 1;
pub const STDERR: u8 = 2;
pub const STDIN: u8 = 0;
pub const STDIN_CLOSE: u8 = 3;
pub const RESIZE: u8 = 4;

/// Sessions at once; more are turned away.
const MAX_CLIENTS: usize = 64;
/// A client that sends a frame larger than this is dropped.
const MAX_FRAME: usize = 1 << 20;

/// Encodes one frame.
pub fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(5 + payload.len());
    v.push(kind);
    v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    v.extend_from_slice(payload);
    v
}

/// Takes the complete frames off the front of `buf`; `None` for a frame
/// too large to be one of ours.
pub fn take_frames(buf: &mut Vec<u8>) -> Option<Vec<(u8, Vec<u8>)>> {
    let mut out = Vec::new();
    let mut at = 0;
    while buf.len() - at >= 5 {
        let len = u32::from_be_bytes([buf[at + 1], buf[at + 2], buf[at + 3], buf[at + 4]]) as usize;
        if len > MAX_FRAME {
            return None;
        }
        if buf.len() - at - 5 < len {
            break;
        }
        out.push((buf[at], buf[at + 5..at + 5 + len].to_vec()));
        at += 5 + len;
    }
    buf.drain(..at);
    Some(out)
}

struct Client {
    sock: UnixStream,
    inbuf: Vec<u8>,
    /// Sent stdin: its end is "the first attach session ends" for stdin_once.
    used_stdin: bool,
}

pub struct Attach {
    listener: Option<UnixListener>,
    clients: Vec<Client>,
    /// The write end of the container's stdin pipe (not with a tty).
    stdin: Option<OwnedFd>,
    tty: bool,
    stdin_once: bool,
}

impl Attach {
    pub fn new(
        socket: Option<&Path>,
        stdin: Option<OwnedFd>,
        tty: bool,
        stdin_once: bool,
    ) -> Attach {
        let listener = socket.and_then(|p| {
            let _ = std::fs::remove_file(p);
            match UnixListener::bind(p) {
                Ok(l) => {
                    let _ = l.set_nonblocking(true);
                    Some(l)
                }
                Err(e) => {
                    eprintln!("berth monitor: attach socket {}: {e}", p.display());
                    None
                }
            }
        });
        if let Some(fd) = &stdin {
            // A container not reading its stdin must not block the monitor.
            let _ = rustix::io::ioctl_fionbio(fd, true);
        }
        Attach {
            listener,
            clients: Vec::new(),
            stdin,
            tty,
            stdin_once,
        }
    }

    /// Appends the listener and the clients, in that order.
    pub fn poll_fds<'a>(&'a self, fds: &mut Vec<PollFd<'a>>) {
        if let Some(l) = &self.listener {
            fds.push(PollFd::new(l.as_fd(), PollFlags::POLLIN));
        }
        for c in &self.clients {
            fds.push(PollFd::new(c.sock.as_fd(), PollFlags::POLLIN));
        }
    }

    /// Acts on the poll results of [`Self::poll_fds`]' entries; `pty` is the
    /// terminal master in tty mode.
    pub fn handle(&mut self, ready: &[bool], pty: Option<&OwnedFd>) {
        let mut i = 0;
        let accept = self.listener.is_some() && ready.first() == Some(&true);
        if self.listener.is_some() {
            i = 1;
        }
        let mut gone = Vec::new();
        for (n, c) in self.clients.iter_mut().enumerate() {
            if !ready.get(i + n).copied().unwrap_or(false) {
                continue;
            }
            let mut buf = [0u8; 16 * 1024];
            match c.sock.read(&mut buf) {
                Ok(0) | Err(_) => {
                    gone.push(n);
                    continue;
                }
                Ok(k) => c.inbuf.extend_from_slice(&buf[..k]),
            }
            let Some(frames) = take_frames(&mut c.inbuf) else {
                gone.push(n);
                continue;
            };
            for (kind, data) in frames {
                match kind {
                    STDIN => {
                        c.used_stdin = true;
                        let target = if self.tty { pty } else { self.stdin.as_ref() };
                        if let Some(fd) = target {
                            // Best effort: what a full pipe cannot take is dropped.
                            let _ = rustix::io::write(fd, &data);
                        }
                    }
                    STDIN_CLOSE => {
                        c.used_stdin = true;
                        if self.stdin_once {
                            self.stdin = None;
                        }
                    }
                    RESIZE if data.len() == 4 => {
                        if let Some(m) = pty {
                            let _ = rustix::termios::tcsetwinsize(
                                m,
                                rustix::termios::Winsize {
                                    ws_col: u16::from_be_bytes([data[0], data[1]]),
                                    ws_row: u16::from_be_bytes([data[2], data[3]]),
                                    ws_xpixel: 0,
                                    ws_ypixel: 0,
                                },
                            );
                        }
                    }
                    _ => {}
                }
            }
        }
        for n in gone.into_iter().rev() {
            self.drop_client(n);
        }
        if accept {
            if let Some(l) = &self.listener {
                while let Ok((sock, _)) = l.accept() {
                    if self.clients.len() >= MAX_CLIENTS {
                        continue;
                    }
                    let _ = sock.set_nonblocking(true);
                    self.clients.push(Client {
                        sock,
                        inbuf: Vec::new(),
                        used_stdin: false,
                    });
                }
            }
        }
    }

    fn drop_client(&mut self, n: usize) {
        let c = self.clients.remove(n);
        if c.used_stdin && self.stdin_once {
            self.stdin = None;
        }
    }

    /// Sends output to every session; one that cannot keep up is dropped
    /// (the monitor never blocks on a client).
    pub fn broadcast(&mut self, kind: u8, data: &[u8]) {
        if self.clients.is_empty() {
            return;
        }
        let f = frame(kind, data);
        let mut gone = Vec::new();
        for (n, c) in self.clients.iter_mut().enumerate() {
            if c.sock.write_all(&f).is_err() {
                gone.push(n);
            }
        }
        for n in gone.into_iter().rev() {
            self.drop_client(n);
        }
    }
}

impl Drop for Attach {
    fn drop(&mut self) {
        if let Some(l) = &self.listener {
            if let Ok(addr) = l.local_addr() {
                if let Some(p) = addr.as_pathname() {
                    let _ = std::fs::remove_file(p);
                }
            }
        }
    }
}

/// Removes the attach sockets in `dir` (`<id>.sock`) whose container is
/// not `live`, and those nobody accepts on any more: a monitor that was
/// killed leaves its socket behind.
pub fn sweep(dir: &Path, live: impl Fn(&str) -> bool) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let path = e.path();
        let Some(id) = e
            .file_name()
            .to_str()
            .and_then(|n| n.strip_suffix(".sock"))
            .map(str::to_string)
        else {
            continue;
        };
        // Connecting to a socket whose listener is gone fails at once.
        let stale = !live(&id)
            || matches!(UnixStream::connect(&path), Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused);
        if stale {
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!("remove stale attach socket {}: {e}", path.display());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_in_pieces() {
        let mut wire = frame(STDIN, b"abc");
        wire.extend(frame(RESIZE, &[0, 80, 0, 24]));
        let mut buf = wire[..6].to_vec();
        assert_eq!(take_frames(&mut buf).unwrap(), vec![]);
        buf.extend_from_slice(&wire[6..]);
        assert_eq!(
            take_frames(&mut buf).unwrap(),
            vec![(STDIN, b"abc".to_vec()), (RESIZE, vec![0, 80, 0, 24])]
        );
        assert!(buf.is_empty());
        let mut bad = vec![0, 0xff, 0xff, 0xff, 0xff];
        assert!(take_frames(&mut bad).is_none());
    }

    #[test]
    fn sweep_removes_stale_and_unowned_sockets() {
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("live.sock");
        let _listening = UnixListener::bind(&live).unwrap();
        let owned_by_none = dir.path().join("gone.sock");
        drop(UnixListener::bind(&owned_by_none).unwrap());
        let dead = dir.path().join("dead.sock");
        drop(UnixListener::bind(&dead).unwrap());
        let unowned_live = dir.path().join("other.sock");
        let _other = UnixListener::bind(&unowned_live).unwrap();
        std::fs::write(dir.path().join("notes.txt"), "").unwrap();
        sweep(dir.path(), |id| id == "live" || id == "dead");
        assert!(live.exists());
        assert!(!owned_by_none.exists());
        assert!(!dead.exists());
        assert!(!unowned_live.exists());
        assert!(dir.path().join("notes.txt").exists());
    }
}
