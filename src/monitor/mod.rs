//! `berth monitor`: one per container (ARCHITECTURE "Processes"). It creates
//! the container init, owns its stdio pipes and writes the CRI log, records
//! the exit status atomically, and then exits. It runs detached (its own
//! session), so the daemon can die and restart without touching it.
//!
//! Single-threaded on purpose: the init is cloned from it and runs ordinary
//! Rust code before exec, and a small monitor stays small.

pub mod attach;
pub mod crilog;
mod delegated;
pub mod zygote;

use crate::linux::init::{self, InitPlan};
use crilog::{CriLog, Stream};
use nix::sched::CloneFlags;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

/// What the daemon tells a monitor (monitor.json in the container dir).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MonitorConfig {
    pub id: String,
    /// The OCI spec.
    pub spec: PathBuf,
    pub layers_dir: PathBuf,
    /// Layer directory names, top-most first.
    pub lowers: Vec<String>,
    pub upper: PathBuf,
    pub work: PathBuf,
    pub fifo: PathBuf,
    pub log_path: Option<PathBuf>,
    pub exit_file: PathBuf,
    /// The container's cgroup; the init enters it before anything else.
    pub cgroup: Option<PathBuf>,
    /// Keep the container's stdin open (a pipe held by the monitor, for
    /// attach) instead of /dev/null. With a terminal, the pty is its stdin.
    #[serde(default)]
    pub stdin: bool,
    /// Close that stdin after the first attach session ends.
    #[serde(default)]
    pub stdin_once: bool,
    /// Unix socket serving attach sessions (see [`attach`]).
    #[serde(default)]
    pub attach_socket: Option<PathBuf>,
    /// Run the container with this external OCI runtime instead of berth's
    /// own init (the spec is the bundle's config.json).
    #[serde(default)]
    pub runtime: Option<crate::handlers::OciRuntime>,
}

/// The monitor's one-line answer on stdout once the init is ready.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Created {
    pub pid: i32,
    pub start_time: u64,
    /// Set when the command cannot start (e.g. not found in the image).
    pub start_error: Option<String>,
    pub error: Option<String>,
}

/// Recorded when the container's init exits.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExitRecord {
    pub exit_code: i32,
    pub signal: Option<i32>,
    /// Unix nanoseconds.
    pub finished_at: i64,
    /// The kernel OOM-killed a process of the container.
    #[serde(default)]
    pub oom_killed: bool,
}

pub fn run(config: &Path) -> ! {
    let code = match monitor(config) {
        Ok(()) => 0,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "berth monitor: {e}");
            1
        }
    };
    std::process::exit(code)
}

fn reply(c: &Created) {
    let mut out = std::io::stdout();
    let _ = writeln!(out, "{}", serde_json::to_string(c).unwrap_or_default());
    let _ = out.flush();
}

fn fail(msg: String) -> Result<(), String> {
    reply(&Created {
        pid: 0,
        start_time: 0,
        start_error: None,
        error: Some(msg.clone()),
    });
    Err(msg)
}

fn monitor(config_path: &Path) -> Result<(), String> {
    let _ = nix::unistd::setsid();
    let cfg: MonitorConfig = match std::fs::read(config_path)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
    {
        Ok(c) => c,
        Err(e) => return fail(format!("read {}: {e}", config_path.display())),
    };
    let spec = match oci_spec::runtime::Spec::load(&cfg.spec) {
        Ok(s) => s,
        Err(e) => return fail(format!("load spec {}: {e}", cfg.spec.display())),
    };
    if let Some(rt) = cfg.runtime.clone() {
        return delegated::run(&cfg, &rt, &spec);
    }
    // Join the pod's namespaces here, so the init is cloned inside them (a
    // PID namespace can only be entered by a new child).
    let mut new_pid = false;
    if let Some(linux) = spec.linux() {
        for ns in linux.namespaces().as_deref().unwrap_or(&[]) {
            use oci_spec::runtime::LinuxNamespaceType as T;
            let flag = match ns.typ() {
                T::Network => CloneFlags::CLONE_NEWNET,
                T::Ipc => CloneFlags::CLONE_NEWIPC,
                T::Uts => CloneFlags::CLONE_NEWUTS,
                T::Pid => CloneFlags::CLONE_NEWPID,
                _ => continue,
            };
            match ns.path() {
                Some(p) => {
                    if let Err(e) = init::join_namespace(p, flag) {
                        return fail(e.to_string());
                    }
                }
                None if flag == CloneFlags::CLONE_NEWPID => new_pid = true,
                None => {}
            }
        }
    }
    let pipe =
        || nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"));
    let (out_r, out_w) = match pipe() {
        Ok(p) => p,
        Err(e) => return fail(e),
    };
    let (err_r, err_w) = match pipe() {
        Ok(p) => p,
        Err(e) => return fail(e),
    };
    let (sync_r, sync_w) = match pipe() {
        Ok(p) => p,
        Err(e) => return fail(e),
    };
    let terminal = spec
        .process()
        .as_ref()
        .and_then(|p| p.terminal())
        .unwrap_or(false);
    // The write end of the container's stdin stays with the monitor for the
    // container's lifetime: a reader blocks instead of seeing EOF.
    let (stdin_r, stdin_w) = if cfg.stdin && !terminal {
        match pipe() {
            Ok((r, w)) => (Some(r), Some(w)),
            Err(e) => return fail(e),
        }
    } else {
        (None, None)
    };
    let console = if terminal {
        use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
        match socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        ) {
            Ok(pair) => Some(pair),
            Err(e) => return fail(format!("console socket: {e}")),
        }
    } else {
        None
    };
    let plan = InitPlan {
        spec: &spec,
        layers_dir: &cfg.layers_dir,
        lowers: &cfg.lowers,
        upper: &cfg.upper,
        work: &cfg.work,
        fifo: &cfg.fifo,
        sync: sync_w.as_raw_fd(),
        stdout: out_w.as_raw_fd(),
        stderr: err_w.as_raw_fd(),
        stdin: stdin_r.as_ref().map(|f| f.as_raw_fd()),
        console: console.as_ref().map(|(_, theirs)| theirs.as_raw_fd()),
        cgroup: cfg.cgroup.as_deref(),
    };
    let pid = match init::spawn(&plan, new_pid) {
        Ok(p) => p,
        Err(e) => return fail(e.to_string()),
    };
    drop((out_w, err_w, sync_w, stdin_r));
    let console = console.map(|(ours, _theirs)| ours);
    let mut msg = Vec::new();
    let _ = std::io::Read::read_to_end(&mut std::fs::File::from(sync_r), &mut msg);
    let msg = String::from_utf8_lossy(&msg).into_owned();
    let start_error = match msg.chars().next() {
        Some('R') => None,
        Some('W') => Some(msg[1..].to_string()),
        Some('E') => {
            reap(pid);
            return fail(msg[1..].to_string());
        }
        _ => {
            reap(pid);
            return fail("container init exited during setup".into());
        }
    };
    // In terminal mode the init has sent its pty master before "ready";
    // the terminal's output is the container's stdout.
    let (out_r, err_r) = match console {
        Some(sock) => {
            let mut b = [0u8; 8];
            match crate::linux::fdpass::recv(sock.as_fd(), &mut b) {
                Ok((_, mut fds)) if fds.len() == 1 => (fds.remove(0), None),
                _ => {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                    reap(pid);
                    return fail("the container init sent no terminal".into());
                }
            }
        }
        None => (out_r, Some(err_r)),
    };
    supervise(&cfg, pid, out_r, err_r, stdin_w, terminal, start_error)
}

/// Once the container process exists: answers the daemon, copies its
/// output to the CRI log, serves attach, and records its exit.
fn supervise(
    cfg: &MonitorConfig,
    pid: i32,
    out_r: OwnedFd,
    err_r: Option<OwnedFd>,
    stdin_w: Option<OwnedFd>,
    terminal: bool,
    start_error: Option<String>,
) -> Result<(), String> {
    // Listening before the daemon hears back, so an Attach right after
    // StartContainer finds the socket.
    let mut attach = attach::Attach::new(
        cfg.attach_socket.as_deref(),
        stdin_w,
        terminal,
        cfg.stdin_once,
    );
    let start_time = crate::linux::process::start_time(pid).unwrap_or(0);
    reply(&Created {
        pid,
        start_time,
        start_error,
        error: None,
    });
    // The daemon has its answer; nothing more goes to its pipe.
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        let _ = nix::unistd::dup2_stdout(null.as_fd());
    }
    let log = cfg.log_path.as_deref().and_then(|p| match CriLog::open(p) {
        Ok(l) => Some(l),
        Err(e) => {
            eprintln!("berth monitor: open log {}: {e}", p.display());
            None
        }
    });
    let exited = rustix::process::Pid::from_raw(pid)
        .and_then(|p| rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty()).ok());
    // SIGUSR1 asks for the log file to be reopened (ReopenContainerLog).
    let mut mask = nix::sys::signal::SigSet::empty();
    mask.add(nix::sys::signal::Signal::SIGUSR1);
    let _ = mask.thread_block();
    let reopen = nix::sys::signalfd::SignalFd::with_flags(
        &mask,
        nix::sys::signalfd::SfdFlags::SFD_CLOEXEC | nix::sys::signalfd::SfdFlags::SFD_NONBLOCK,
    )
    .ok();
    copy_output(out_r, err_r, exited, reopen, log, &mut attach);
    drop(attach);
    let (exit_code, signal) = wait_exit(pid);
    // Read before anyone removes the cgroup: an OOM kill of any process in
    // the container counts, as kubelet expects.
    let oom_killed = cfg
        .cgroup
        .as_deref()
        .is_some_and(crate::cgroup::Cgroups::oom_killed);
    let rec = ExitRecord {
        exit_code,
        signal,
        finished_at: chrono::Utc::now().timestamp_nanos_opt().unwrap_or(0),
        oom_killed,
    };
    crate::store::write_json(&cfg.exit_file, &rec).map_err(|e| e.to_string())
}

/// Copies both pipes into the CRI log until both reach EOF, or until the
/// init has exited and what it wrote is drained (a leftover process of a
/// shared-PID pod may keep a pipe open forever).
fn copy_output(
    out: OwnedFd,
    err: Option<OwnedFd>,
    exited: Option<OwnedFd>,
    reopen: Option<nix::sys::signalfd::SignalFd>,
    mut log: Option<CriLog>,
    attach: &mut attach::Attach,
) {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    const DRAIN_AFTER_EXIT_MS: u16 = 200;
    let mut open = [Some(out), err];
    let mut buf = vec![0u8; 32 * 1024];
    let mut init_gone = false;
    loop {
        let streams: Vec<(usize, &OwnedFd)> = open
            .iter()
            .enumerate()
            .filter_map(|(i, f)| f.as_ref().map(|f| (i, f)))
            .collect();
        if streams.is_empty() {
            return;
        }
        let mut fds: Vec<PollFd> = streams
            .iter()
            .map(|(_, f)| PollFd::new(f.as_fd(), PollFlags::POLLIN))
            .collect();
        let base = fds.len();
        if let Some(r) = reopen.as_ref() {
            fds.push(PollFd::new(r.as_fd(), PollFlags::POLLIN));
        }
        let exit_idx = fds.len();
        if let (false, Some(p)) = (init_gone, exited.as_ref()) {
            fds.push(PollFd::new(p.as_fd(), PollFlags::POLLIN));
        }
        let attach_idx = fds.len();
        attach.poll_fds(&mut fds);
        let timeout = if init_gone {
            PollTimeout::from(DRAIN_AFTER_EXIT_MS)
        } else {
            PollTimeout::NONE
        };
        match poll(&mut fds, timeout) {
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return,
            Ok(0) if init_gone => break,
            Ok(_) => {}
        }
        let fired = |i: usize| {
            fds.get(i)
                .and_then(|p| p.revents())
                .is_some_and(|r| !r.is_empty())
        };
        if !init_gone && fds.len() > exit_idx && fired(exit_idx) {
            init_gone = true;
        }
        if reopen.is_some() && fired(base) {
            if let Some(r) = reopen.as_ref() {
                while let Ok(Some(_)) = r.read_signal() {}
            }
            if let Some(l) = log.as_mut() {
                if let Err(e) = l.reopen() {
                    eprintln!("berth monitor: reopen log: {e}");
                }
            }
        }
        let attach_ready: Vec<bool> = fds[attach_idx..]
            .iter()
            .map(|p| p.revents().is_some_and(|r| !r.is_empty()))
            .collect();
        let ready: Vec<usize> = fds
            .iter()
            .zip(&streams)
            .filter(|(p, _)| p.revents().is_some_and(|r| !r.is_empty()))
            .map(|(_, (i, _))| *i)
            .collect();
        drop(fds);
        attach.handle(&attach_ready, open[0].as_ref());
        for i in ready {
            let stream = if i == 0 {
                Stream::Stdout
            } else {
                Stream::Stderr
            };
            let n = match open[i].as_ref().map(|f| nix::unistd::read(f, &mut buf)) {
                Some(Ok(n)) => n,
                Some(Err(nix::errno::Errno::EINTR)) => continue,
                _ => 0,
            };
            if n == 0 {
                open[i] = None;
                if let Some(l) = log.as_mut() {
                    let _ = l.finish(stream);
                }
            } else {
                let kind = if i == 0 {
                    attach::STDOUT
                } else {
                    attach::STDERR
                };
                attach.broadcast(kind, &buf[..n]);
                if let Some(l) = log.as_mut() {
                    let _ = l.write(stream, &buf[..n]);
                }
            }
        }
    }
    if let Some(l) = log.as_mut() {
        let _ = l.finish(Stream::Stdout);
        let _ = l.finish(Stream::Stderr);
    }
}

fn wait_exit(pid: i32) -> (i32, Option<i32>) {
    use nix::sys::wait::{waitpid, WaitStatus};
    loop {
        match waitpid(nix::unistd::Pid::from_raw(pid), None) {
            Ok(WaitStatus::Exited(_, code)) => return (code, None),
            Ok(WaitStatus::Signaled(_, sig, _)) => return (128 + sig as i32, Some(sig as i32)),
            Err(nix::errno::Errno::EINTR) => continue,
            Ok(_) => continue,
            Err(_) => return (255, None),
        }
    }
}

fn reap(pid: i32) {
    let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
}
