//! The monitor zygote (`berth monitor --zygote`): a small single-threaded
//! berth process the daemon starts once and asks for each new monitor.
//!
//! Why: a freshly exec'd berth spends ~550 KiB of private memory on the
//! relocated read-only data of its (PIE) binary before it does anything.
//! Monitors forked from one zygote share those pages copy-on-write, so each
//! monitor only pays for what it writes itself. The zygote forks with
//! CLONE_PARENT, so every monitor is the daemon's child, as if the daemon had
//! started it, and nothing about the monitor depends on the zygote later: it
//! may exit (it does when the daemon goes away) and monitors run on.
//!
//! Protocol (SOCK_SEQPACKET on the zygote's stdin): the daemon sends the
//! monitor.json path with two descriptors, the monitor's stdout and stderr;
//! the zygote answers "P<pid>" or "E<error>".

use crate::linux::{fdpass, process};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("start the monitor zygote {exe}: {source}")]
    Spawn { exe: String, source: std::io::Error },
    #[error("talk to the monitor zygote: {0}")]
    Io(String),
    #[error("the monitor zygote could not fork: {0}")]
    Fork(String),
}

/// The zygote loop. Exits when the daemon closes its end.
pub fn serve() -> ! {
    let argv0 = std::env::args().next().unwrap_or_else(|| "berth".into());
    let _ = process::set_title(&[&argv0, "monitor", "--zygote"]);
    let sock = std::io::stdin().as_fd().try_clone_to_owned();
    let Ok(sock) = sock else {
        std::process::exit(1)
    };
    let mut buf = vec![0u8; 8192];
    loop {
        let (n, fds) = match fdpass::recv(sock.as_fd(), &mut buf) {
            Ok((0, _)) => std::process::exit(0),
            Ok(m) => m,
            Err(e) => {
                eprintln!("berth monitor zygote: {e}");
                std::process::exit(1)
            }
        };
        let path = PathBuf::from(String::from_utf8_lossy(&buf[..n]).into_owned());
        let answer = match <[OwnedFd; 2]>::try_from(fds) {
            Err(_) => "Ewrong number of descriptors".to_string(),
            Ok([out, err]) => match process::fork_sibling() {
                Ok(process::Forked::Child) => {
                    // Shown by ps as a monitor started directly would be.
                    let config = path.to_string_lossy();
                    let _ = process::set_title(&[&argv0, "monitor", "--config", &config]);
                    become_monitor(sock, out, err, &path)
                }
                Ok(process::Forked::Parent(pid)) => format!("P{pid}"),
                Err(e) => format!("E{e}"),
            },
        };
        if fdpass::send(sock.as_fd(), answer.as_bytes(), &[]).is_err() {
            std::process::exit(0);
        }
    }
}

fn become_monitor(sock: OwnedFd, out: OwnedFd, err: OwnedFd, config: &Path) -> ! {
    drop(sock);
    // The zygote's socket is stdin: replace it, so the monitor holds no
    // line to the daemon (and the daemon sees EOF when the zygote goes).
    let null = std::fs::File::open("/dev/null");
    let ok = null
        .as_ref()
        .map_err(|_| ())
        .and_then(|n| nix::unistd::dup2_stdin(n.as_fd()).map_err(|_| ()))
        .and_then(|_| nix::unistd::dup2_stdout(out.as_fd()).map_err(|_| ()))
        .and_then(|_| nix::unistd::dup2_stderr(err.as_fd()).map_err(|_| ()));
    if ok.is_err() {
        std::process::exit(1)
    }
    drop((out, err, null));
    super::run(config)
}

/// Bytes of argument area reserved for a monitor's title (its monitor.json
/// path under berth's root).
const TITLE_ROOM: usize = 512;

struct Zygote {
    child: std::process::Child,
    sock: OwnedFd,
}

/// The daemon's handle: starts the zygote on first use and again whenever
/// it is gone.
pub struct Launcher {
    exe: PathBuf,
    /// argv[0] of the zygote (berth's path on the host; `exe` may be a
    /// /proc/self/fd link to the sealed copy).
    name: PathBuf,
    zygote: Mutex<Option<Zygote>>,
}

impl Launcher {
    pub fn new(exe: PathBuf, name: PathBuf) -> Launcher {
        Launcher {
            exe,
            name,
            zygote: Mutex::new(None),
        }
    }

    /// Starts a monitor for `config` with the given stdout and stderr and
    /// returns its pid (a child of this process). Blocking.
    pub fn launch(
        &self,
        config: &Path,
        stdout: std::os::fd::BorrowedFd<'_>,
        stderr: std::os::fd::BorrowedFd<'_>,
    ) -> Result<i32, LaunchError> {
        let mut slot = crate::store::lock(&self.zygote);
        // A zygote that died (or a broken line to it) is replaced once.
        for attempt in 0..2 {
            if slot.is_none() {
                *slot = Some(self.spawn()?);
            }
            let Some(z) = slot.as_mut() else {
                continue;
            };
            match ask(z, config, stdout, stderr) {
                Ok(pid) => return Ok(pid),
                Err(e @ LaunchError::Fork(_)) => return Err(e),
                Err(e) => {
                    if let Some(mut old) = slot.take() {
                        let _ = old.child.kill();
                        let _ = old.child.wait();
                    }
                    if attempt == 1 {
                        return Err(e);
                    }
                }
            }
        }
        Err(LaunchError::Io("no zygote".into()))
    }

    fn spawn(&self) -> Result<Zygote, LaunchError> {
        use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
        let err = |source: std::io::Error| LaunchError::Spawn {
            exe: self.exe.display().to_string(),
            source,
        };
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| err(e.into()))?;
        use std::os::unix::process::CommandExt;
        let child = std::process::Command::new(&self.exe)
            .arg0(&self.name)
            .args(["monitor", "--zygote"])
            .arg(format!("--title-room={}", ".".repeat(TITLE_ROOM)))
            .stdin(std::process::Stdio::from(theirs))
            .stdout(std::process::Stdio::null())
            .spawn()
            .map_err(err)?;
        Ok(Zygote { child, sock: ours })
    }
}

fn ask(
    z: &mut Zygote,
    config: &Path,
    stdout: std::os::fd::BorrowedFd<'_>,
    stderr: std::os::fd::BorrowedFd<'_>,
) -> Result<i32, LaunchError> {
    use std::os::unix::ffi::OsStrExt;
    let io = |e: crate::linux::LinuxError| LaunchError::Io(e.to_string());
    fdpass::send(
        z.sock.as_fd(),
        config.as_os_str().as_bytes(),
        &[stdout, stderr],
    )
    .map_err(io)?;
    let mut buf = [0u8; 1024];
    let (n, _) = fdpass::recv(z.sock.as_fd(), &mut buf).map_err(io)?;
    let answer = String::from_utf8_lossy(&buf[..n]);
    match (answer.get(..1), answer.get(1..)) {
        (Some("P"), Some(pid)) => pid
            .parse()
            .map_err(|_| LaunchError::Io(format!("bad answer {answer:?}"))),
        (Some("E"), Some(e)) => Err(LaunchError::Fork(e.to_string())),
        _ => Err(LaunchError::Io("the zygote went away".into())),
    }
}
