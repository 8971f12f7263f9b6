//! A running streaming exec, independent of the wire protocol: output
//! chunks and finally the exit come out of one channel, input goes into
//! another. Dropping the [`Session`] kills the command (and only it).

use crate::container::ExecStarted;
use crate::linux::exec::ExecExit;
use bytes::Bytes;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::{mpsc, oneshot};

/// How long output is still forwarded after the command exited: background
/// processes it started may hold its stdout open for ever.
const DRAIN: Duration = Duration::from_secs(1);

pub enum Input {
    Stdin(Bytes),
    /// The client closed stdin.
    StdinEof,
    Resize {
        width: u16,
        height: u16,
    },
}

pub enum Output {
    Stdout(Bytes),
    Stderr(Bytes),
    /// The last message.
    Exit(Result<ExecExit, String>),
}

pub struct Session {
    pub outputs: mpsc::Receiver<Output>,
    inputs: mpsc::UnboundedSender<Input>,
    _kill: oneshot::Sender<()>,
}

impl Session {
    /// Must be called inside the tokio runtime.
    pub fn start(started: ExecStarted) -> std::io::Result<Session> {
        let ExecStarted {
            process,
            stdin,
            stdout,
            stderr,
            pty,
        } = started;
        let (process, kill_switch) =
            process.ok_or_else(|| std::io::Error::other("exec: no process"))?;
        let (out_tx, out_rx) = mpsc::channel(16);
        let (in_tx, in_rx) = mpsc::unbounded_channel();
        let (kill_tx, kill_rx) = oneshot::channel::<()>();

        let mut readers = Vec::new();
        let mut stdin_fd = None;
        let mut pty_fd = None;
        if let Some(master) = pty {
            let master = Arc::new(async_fd(master)?);
            readers.push(tokio::spawn(forward(
                master.clone(),
                out_tx.clone(),
                Output::Stdout,
            )));
            pty_fd = Some(master);
        }
        if let Some(fd) = stdout {
            readers.push(tokio::spawn(forward(
                Arc::new(async_fd(fd)?),
                out_tx.clone(),
                Output::Stdout,
            )));
        }
        if let Some(fd) = stderr {
            readers.push(tokio::spawn(forward(
                Arc::new(async_fd(fd)?),
                out_tx.clone(),
                Output::Stderr,
            )));
        }
        if let Some(fd) = stdin {
            stdin_fd = Some(Arc::new(async_fd(fd)?));
        }
        tokio::spawn(feed(in_rx, stdin_fd, pty_fd));

        tokio::spawn(async move {
            let exited = async {
                let pidfd = process.pidfd().try_clone_to_owned()?;
                let pidfd = crate::linux::asyncfd::register(pidfd, Interest::READABLE)?;
                let _ready = pidfd.readable().await?;
                Ok::<_, std::io::Error>(())
            };
            tokio::select! {
                r = exited => {
                    if let Err(e) = r {
                        tracing::warn!("exec: wait for the command: {e}");
                    }
                }
                _ = kill_rx => {
                    // The client went away: only its own command dies.
                    drop(kill_switch);
                    let _ = tokio::task::spawn_blocking(move || process.wait()).await;
                    for r in readers {
                        r.abort();
                    }
                    return;
                }
            }
            drop(kill_switch);
            // The helper has exited: this does not block.
            let exit = process.wait().map_err(|e| e.to_string());
            let drain = async {
                for r in &mut readers {
                    let _ = r.await;
                }
            };
            if tokio::time::timeout(DRAIN, drain).await.is_err() {
                for r in &readers {
                    r.abort();
                }
            }
            let _ = out_tx.send(Output::Exit(exit)).await;
        });
        Ok(Session {
            outputs: out_rx,
            inputs: in_tx,
            _kill: kill_tx,
        })
    }

    /// A session attached to a container's own stdio through its monitor's
    /// socket. It ends when the monitor closes the socket (the container's
    /// output ended); dropping it only detaches.
    pub fn attach(sock: tokio::net::UnixStream) -> Session {
        use crate::monitor::attach as wire;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (out_tx, out_rx) = mpsc::channel(16);
        let (in_tx, mut in_rx) = mpsc::unbounded_channel::<Input>();
        let (kill_tx, kill_rx) = oneshot::channel::<()>();
        let (mut rd, mut wr) = sock.into_split();
        tokio::spawn(async move {
            let read = async {
                let mut buf = Vec::new();
                let mut chunk = vec![0u8; 32 * 1024];
                loop {
                    let n = rd.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return true;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let Some(frames) = wire::take_frames(&mut buf) else {
                        return true;
                    };
                    for (kind, data) in frames {
                        let out = match kind {
                            wire::STDERR => Output::Stderr(Bytes::from(data)),
                            _ => Output::Stdout(Bytes::from(data)),
                        };
                        if out_tx.send(out).await.is_err() {
                            return false;
                        }
                    }
                }
            };
            tokio::select! {
                ended = read => {
                    if ended {
                        let exit = ExecExit { exit_code: 0, message: None };
                        let _ = out_tx.send(Output::Exit(Ok(exit))).await;
                    }
                }
                _ = kill_rx => {}
            }
        });
        tokio::spawn(async move {
            while let Some(input) = in_rx.recv().await {
                let f = match input {
                    Input::Stdin(d) => wire::frame(wire::STDIN, &d),
                    Input::StdinEof => wire::frame(wire::STDIN_CLOSE, &[]),
                    Input::Resize { width, height } => {
                        let [a, b] = width.to_be_bytes();
                        let [c, d] = height.to_be_bytes();
                        wire::frame(wire::RESIZE, &[a, b, c, d])
                    }
                };
                if wr.write_all(&f).await.is_err() {
                    return;
                }
            }
        });
        Session {
            outputs: out_rx,
            inputs: in_tx,
            _kill: kill_tx,
        }
    }

    pub fn input(&self, input: Input) {
        // Fails only once the command is gone, when input no longer matters.
        let _ = self.inputs.send(input);
    }
}

fn async_fd(fd: OwnedFd) -> std::io::Result<AsyncFd<OwnedFd>> {
    crate::linux::asyncfd::register(fd, Interest::READABLE | Interest::WRITABLE)
}

pub async fn read(fd: &AsyncFd<OwnedFd>, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        let mut guard = fd.readable().await?;
        match guard.try_io(|f| rustix::io::read(f.get_ref(), &mut *buf).map_err(Into::into)) {
            // A pty master reads EIO once no slave is open: its EOF.
            Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => return Ok(0),
            Ok(r) => return r,
            Err(_would_block) => continue,
        }
    }
}

pub async fn write_all(fd: &AsyncFd<OwnedFd>, mut buf: &[u8]) -> std::io::Result<()> {
    while !buf.is_empty() {
        let mut guard = fd.writable().await?;
        match guard.try_io(|f| rustix::io::write(f.get_ref(), buf).map_err(Into::into)) {
            Ok(Ok(n)) => buf = &buf[n..],
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => continue,
        }
    }
    Ok(())
}

async fn forward(fd: Arc<AsyncFd<OwnedFd>>, tx: mpsc::Sender<Output>, wrap: fn(Bytes) -> Output) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match read(&fd, &mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if tx
                    .send(wrap(Bytes::copy_from_slice(&buf[..n])))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
    }
}

async fn feed(
    mut rx: mpsc::UnboundedReceiver<Input>,
    mut stdin: Option<Arc<AsyncFd<OwnedFd>>>,
    pty: Option<Arc<AsyncFd<OwnedFd>>>,
) {
    // Whether the terminal's current line is empty: its EOF character only
    // ends input at the start of a line (elsewhere it submits the line).
    let mut line_start = true;
    while let Some(input) = rx.recv().await {
        match input {
            Input::Stdin(data) => {
                if let Some(fd) = &stdin {
                    if write_all(fd, &data).await.is_err() {
                        // The reader is gone; further input is dropped.
                        stdin = None;
                    }
                } else if let Some(m) = &pty {
                    if write_all(m, &data).await.is_ok() {
                        line_start = matches!(data.last(), Some(b'\n' | b'\r'));
                    }
                }
            }
            Input::StdinEof => {
                drop(stdin.take());
                if let Some(m) = &pty {
                    // A terminal has no end of input to close: like a user's
                    // ^D, its EOF character is what the reader takes for it.
                    let eof = terminal_eof_char(m.get_ref());
                    let eofs: &[u8] = if line_start { &[eof] } else { &[eof, eof] };
                    if let Err(e) = write_all(m, eofs).await {
                        tracing::debug!("exec: send EOF to the terminal: {e}");
                    }
                }
                drain_resizes(&mut rx, pty.as_deref()).await;
                return;
            }
            Input::Resize { width, height } => resize(pty.as_deref(), width, height),
        }
    }
}

/// After the end of input only resizes matter.
async fn drain_resizes(rx: &mut mpsc::UnboundedReceiver<Input>, pty: Option<&AsyncFd<OwnedFd>>) {
    while let Some(input) = rx.recv().await {
        if let Input::Resize { width, height } = input {
            resize(pty, width, height);
        }
    }
}

fn resize(pty: Option<&AsyncFd<OwnedFd>>, width: u16, height: u16) {
    if let Some(m) = pty {
        if let Err(e) = crate::linux::pty::resize(m.get_ref(), width, height) {
            tracing::debug!("{e}");
        }
    }
}

/// The terminal's VEOF character (^D unless the program changed it).
fn terminal_eof_char(master: &OwnedFd) -> u8 {
    rustix::termios::tcgetattr(master)
        .map(|t| t.special_codes[rustix::termios::SpecialCodeIndex::VEOF])
        .ok()
        .filter(|c| *c != 0)
        .unwrap_or(0x04)
}
