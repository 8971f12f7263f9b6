//! CRI ExecSync: runs a command inside a running container (its namespaces,
//! its root, its cgroup), captures stdout and stderr, enforces a timeout.
//! [`spawn`] is the same launch with the caller's stdio (pipes or a pty, for
//! the streaming Exec), returning the running command.
//!
//! Process tree: berth ─clone→ *helper* (stays in berth's PID namespace; joins
//! the container's cgroup and namespaces, mount last, then chroots to the
//! container process's root) ─clone→ *command* (created in the container's
//! PID namespace; drops to the user, chdirs, execs). The helper waits for the
//! command and exits with its status (128+signal if killed). It kills the
//! command when berth closes the control pipe: on timeout, on error, or when
//! berth dies.
//!
//! berth is multi-threaded, so both children make only raw, async-signal-safe
//! syscalls: everything (C strings, pointer arrays, PATH candidates, fds,
//! stacks) is prepared before the first clone. Failures before exec come back
//! as fixed-size records on the report pipe, and berth turns them into errors
//! or messages.

use super::{sys, LinuxError};
use libc::{c_char, c_int, c_uint, c_void};
use nix::sys::signal::{pthread_sigmask, SigSet, SigmaskHow};
use nix::sys::wait::{waitpid, WaitStatus};
use rustix::event::{PollFd, PollFlags};
use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

/// What to run, where and as whom.
#[derive(Debug, Clone)]
pub struct ExecSpec<'a> {
    /// Host pid of a process of the container (its init).
    pub target_pid: i32,
    /// `argv[0]` without a '/' is looked up in the `PATH=` of `env` (or the
    /// default PATH), inside the container.
    pub argv: &'a [String],
    /// `K=V` entries, the command's whole environment.
    pub env: &'a [String],
    /// Working directory inside the container; "" means "/".
    pub cwd: &'a str,
    /// User, groups, capabilities, no_new_privs, seccomp: the container
    /// process's, prepared by the caller.
    pub identity: &'a super::identity::Identity,
    /// `None` waits for as long as the command runs.
    pub timeout: Option<Duration>,
    /// Bytes kept per stream; the rest is read and dropped.
    pub max_output: usize,
}

/// The result of a command that was started (or failed to exec).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecOutput {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// The exit status, 128+signal when killed by a signal, 127 when the
    /// executable was not found, 126 when it could not be executed.
    pub exit_code: i32,
    /// The timeout expired and the command was killed.
    pub timed_out: bool,
}

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const STACK_SIZE: usize = 64 * 1024;
/// How long the helper gets to kill and reap the command before berth kills
/// the helper itself.
const HELPER_GRACE: Duration = Duration::from_secs(2);
/// How long output is still read after the command exited (background
/// processes may keep the pipes open for ever).
const DRAIN: Duration = Duration::from_millis(100);

/// Namespaces joined, in this order: mount after the others, since it
/// moves the root; user last, as the container's init did (the mount
/// namespace belongs to the host's user namespace: joining the pod's first
/// would leave no right to join it).
const NAMESPACES: [(&str, c_int); 7] = [
    ("ipc", libc::CLONE_NEWIPC),
    ("uts", libc::CLONE_NEWUTS),
    ("net", libc::CLONE_NEWNET),
    ("cgroup", libc::CLONE_NEWCGROUP),
    ("pid", libc::CLONE_NEWPID),
    ("mnt", libc::CLONE_NEWNS),
    ("user", libc::CLONE_NEWUSER),
];

// Report records: three native-endian i32 (kind, a, b), 12 bytes, so each
// write is atomic (< PIPE_BUF) even with helper and command both writing.
const REC_LEN: usize = 12;
/// a = the command's pid in berth's PID namespace.
const REC_PID: i32 = 1;
/// a = stage, b = errno; the step failed and the process exited.
const REC_FAIL: i32 = 2;
/// a = stage, b = errno; the step failed but the exec goes on.
const REC_WARN: i32 = 3;

// Stages, indexes into STAGES.
const ST_DUMPABLE: i32 = 0;
const ST_CGROUP: i32 = 1;
const ST_SETNS: i32 = 2; // + index into NAMESPACES
const ST_ROOT: i32 = 9;
const ST_CLONE: i32 = 10;
const ST_PIDFD: i32 = 11;
const ST_PDEATHSIG: i32 = 15;
const ST_CHDIR: i32 = 16;
const ST_DUP2: i32 = 17;
const ST_EXEC: i32 = 18;
const ST_CTTY: i32 = 19;
/// + identity::Step: the step of becoming the container's identity.
const ST_IDENTITY: i32 = 100;
const STAGES: [&str; 20] = [
    "exec: prctl(PR_SET_DUMPABLE) in",
    "exec: join the cgroup of",
    "exec: join ipc namespace of",
    "exec: join uts namespace of",
    "exec: join net namespace of",
    "exec: join cgroup namespace of",
    "exec: join pid namespace of",
    "exec: join mnt namespace of",
    "exec: join user namespace of",
    "exec: enter the root of",
    "exec: start command in",
    "exec: pidfd_open for command in",
    "exec: setgroups in",
    "exec: setgid in",
    "exec: setuid in",
    "exec: prctl(PR_SET_PDEATHSIG) in",
    "exec: chdir in",
    "exec: set up stdio in",
    "exec in",
    "exec: make the pty the controlling terminal in",
];

/// Where a spawned command's stdio goes; `None` is /dev/null.
#[derive(Debug, Default)]
pub struct ExecStdio {
    pub stdin: Option<OwnedFd>,
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
    /// stdin is a pty slave: the command gets a session with it as its
    /// controlling terminal.
    pub tty: bool,
}

/// A command started by [`spawn`]. Dropping it kills and reaps the helper
/// (and so the command).
pub struct ExecProcess {
    helper: Helper,
    rep: Stream,
    argv0: String,
    target: String,
    cwd: String,
}

/// Closing (dropping) it tells the helper to SIGKILL the command.
pub struct KillSwitch(#[allow(dead_code)] OwnedFd);

/// How a spawned command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecExit {
    /// As [`ExecOutput::exit_code`].
    pub exit_code: i32,
    /// What runc would print on stderr when the exec itself failed.
    pub message: Option<String>,
}

/// Runs `spec.argv` inside the container of `spec.target_pid` and returns its
/// output. Blocking. A command that is not found or not executable is an
/// `Ok` with exit code 127 or 126 and a message on stderr; failures to enter
/// the container or to become the user are errors.
pub fn exec_sync(spec: &ExecSpec<'_>) -> Result<ExecOutput, LinuxError> {
    let start = Instant::now();
    let target = format!("container process {}", spec.target_pid);
    let (out_r, out_w) = pipe(&target)?;
    let (err_r, err_w) = pipe(&target)?;
    for fd in [&out_r, &err_r] {
        rustix::io::ioctl_fionbio(fd, true).map_err(sys("exec: set up pipes for", &target))?;
    }
    let stdio = ExecStdio {
        stdin: None,
        stdout: Some(out_w),
        stderr: Some(err_w),
        tty: false,
    };
    let (mut child, ctl_w) = spawn(spec, stdio)?;

    // Read output until the helper (hence the command) exits.
    let mut out = Stream::new(out_r, spec.max_output);
    let mut err = Stream::new(err_r, spec.max_output);
    let mut scratch = vec![0u8; 64 * 1024];
    let deadline = spec.timeout.and_then(|t| start.checked_add(t));
    let mut ctl = Some(ctl_w);
    let mut timed_out = false;
    let mut force_kill_at: Option<Instant> = None;
    loop {
        let now = Instant::now();
        if !timed_out && deadline.is_some_and(|d| now >= d) {
            // Closing the control pipe tells the helper to SIGKILL the command.
            timed_out = true;
            ctl = None;
            force_kill_at = Some(now + HELPER_GRACE);
        }
        if force_kill_at.is_some_and(|k| now >= k) {
            child.helper.kill();
            force_kill_at = None;
        }
        let wake = if timed_out { force_kill_at } else { deadline };
        let exited = {
            let mut fds = vec![PollFd::new(&child.helper.pidfd, PollFlags::IN)];
            for s in [&out, &err, &child.rep] {
                if let Some(fd) = &s.fd {
                    fds.push(PollFd::new(fd, PollFlags::IN));
                }
            }
            let ts = wake.map(|w| timespec(w.saturating_duration_since(now)));
            match rustix::event::poll(&mut fds, ts.as_ref()) {
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(sys("exec: poll output of", &target)(e)),
            }
            !fds[0].revents().is_empty()
        };
        for s in [&mut out, &mut err, &mut child.rep] {
            s.pull(&mut scratch, 16)
                .map_err(sys("exec: read output of", &target))?;
        }
        if exited {
            break;
        }
    }
    drop(ctl);
    // What the command wrote before it exited is in the pipes now; take it
    // without waiting for EOF, which a background process may hold off.
    let drain_end = Instant::now() + DRAIN;
    for s in [&mut out, &mut err, &mut child.rep] {
        while s
            .pull(&mut scratch, 16)
            .map_err(sys("exec: read output of", &target))?
            && Instant::now() < drain_end
        {}
    }
    let exit = child.finish(timed_out)?;
    let mut stderr = err.buf;
    if let Some(msg) = exit.message {
        let room = spec.max_output.saturating_sub(stderr.len());
        stderr.extend_from_slice(&msg.as_bytes()[..msg.len().min(room)]);
    }
    Ok(ExecOutput {
        stdout: out.buf,
        stderr,
        exit_code: exit.exit_code,
        timed_out,
    })
}

/// Starts `spec.argv` inside the container of `spec.target_pid` with `stdio`
/// (`spec.timeout` and `spec.max_output` do not apply). The command runs
/// until it exits or the [`KillSwitch`] is dropped.
pub fn spawn(
    spec: &ExecSpec<'_>,
    stdio: ExecStdio,
) -> Result<(ExecProcess, KillSwitch), LinuxError> {
    let target = format!("container process {}", spec.target_pid);
    let invalid = |what: &str| {
        sys("exec in", &target)(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            what.to_string(),
        ))
    };
    let argv0 = match spec.argv.first() {
        Some(a) if !a.is_empty() => a.as_str(),
        _ => return Err(invalid("empty command")),
    };
    if spec.target_pid <= 0 {
        return Err(invalid("invalid target pid"));
    }

    // Everything the children use, prepared now.
    let argv_c = cstrings(spec.argv.iter(), &target)?;
    let env_c = cstrings(spec.env.iter(), &target)?;
    let cands_c = cstrings(candidates(argv0, spec.env).iter(), &target)?;
    let cwd = if spec.cwd.is_empty() { "/" } else { spec.cwd };
    let cwd_c = CString::new(cwd).map_err(sys("exec in", &target))?;
    let argv_p = pointers(&argv_c);
    let env_p = pointers(&env_c);
    let cands_p = pointers(&cands_c);

    let ns = open_namespaces(spec.target_pid, &target)?;
    let root = rustix::fs::open(
        format!("/proc/{}/root", spec.target_pid),
        rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map_err(sys("exec: open the root of", &target))
    .and_then(|fd| high(fd, &target))?;
    let cgroup = match cgroup_procs(spec.target_pid) {
        Some(fd) => Some(high(fd, &target)?),
        None => None,
    };
    let devnull: OwnedFd = std::fs::File::open("/dev/null")
        .map_err(sys("open", "/dev/null"))?
        .into();
    let devnull = high(devnull, &target)?;
    let stdio_fd = |fd: Option<OwnedFd>| fd.map(|f| high(f, &target)).transpose();
    let (in_fd, out_w, err_w) = (
        stdio_fd(stdio.stdin)?,
        stdio_fd(stdio.stdout)?,
        stdio_fd(stdio.stderr)?,
    );
    let (rep_r, rep_w) = pipe(&target)?;
    let (ctl_r, ctl_w) = pipe(&target)?;
    rustix::io::ioctl_fionbio(&rep_r, true).map_err(sys("exec: set up pipes for", &target))?;

    let raw = |fd: &Option<OwnedFd>| fd.as_ref().map(|f| f.as_raw_fd()).unwrap_or(-1);
    let or_null = |fd: &Option<OwnedFd>| fd.as_ref().map_or(devnull.as_raw_fd(), |f| f.as_raw_fd());
    let mut stack = vec![0u8; STACK_SIZE];
    let mut grand_stack = vec![0u8; STACK_SIZE];
    let args = ChildArgs {
        ns_fds: [
            raw(&ns[0]),
            raw(&ns[1]),
            raw(&ns[2]),
            raw(&ns[3]),
            raw(&ns[4]),
            raw(&ns[5]),
            raw(&ns[6]),
        ],
        cgroup_fd: raw(&cgroup),
        root_fd: root.as_raw_fd(),
        in_fd: or_null(&in_fd),
        out_fd: or_null(&out_w),
        err_fd: or_null(&err_w),
        tty: stdio.tty,
        report_fd: rep_w.as_raw_fd(),
        ctl_fd: ctl_r.as_raw_fd(),
        // One past the end: the top of a downward-growing stack.
        grand_stack_top: grand_stack.as_mut_ptr_range().end.cast(),
        identity: spec.identity,
        cwd: cwd_c.as_ptr(),
        argv: argv_p.as_ptr(),
        envp: env_p.as_ptr(),
        cands: cands_p.as_ptr(),
        ncands: cands_c.len(),
    };
    let pid = clone_helper(&args, &mut stack).map_err(sys("exec: start helper for", &target))?;
    // The helper has its own copies now; the write ends must go so that the
    // pipes reach EOF when the command and the helper are done with them.
    drop((in_fd, out_w, err_w, rep_w, ctl_r, devnull, root, cgroup, ns));
    let helper = Helper::new(pid).map_err(sys("exec: pidfd_open for helper of", &target))?;
    Ok((
        ExecProcess {
            helper,
            rep: Stream::new(rep_r, 64 * REC_LEN),
            argv0: argv0.to_string(),
            target,
            cwd: cwd.to_string(),
        },
        KillSwitch(ctl_w),
    ))
}

impl ExecProcess {
    /// Readable once the command (and its helper) exited.
    pub fn pidfd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.helper.pidfd.as_fd()
    }

    /// Waits for the command (blocking) and says how it ended.
    pub fn wait(mut self) -> Result<ExecExit, LinuxError> {
        self.finish(false)
    }

    fn finish(&mut self, timed_out: bool) -> Result<ExecExit, LinuxError> {
        let target = self.target.clone();
        let status = self
            .helper
            .wait()
            .map_err(sys("exec: wait for helper of", &target))?;
        let mut scratch = [0u8; 64 * REC_LEN];
        while self
            .rep
            .pull(&mut scratch, 16)
            .map_err(sys("exec: read output of", &target))?
        {}
        let exit_code = match status {
            WaitStatus::Exited(_, c) => c,
            WaitStatus::Signaled(_, s, _) => 128 + s as i32,
            other => {
                return Err(sys("exec: wait for helper of", &target)(
                    std::io::Error::other(format!("unexpected status {other:?}")),
                ))
            }
        };
        let mut started = false;
        let mut failure = None;
        for rec in self.rep.buf.chunks_exact(REC_LEN) {
            let field = |i: usize| i32::from_ne_bytes([rec[i], rec[i + 1], rec[i + 2], rec[i + 3]]);
            let (kind, a, b) = (field(0), field(4), field(8));
            match kind {
                REC_PID => started = true,
                REC_FAIL => failure = failure.or(Some((a, b))),
                REC_WARN => tracing::warn!(
                    target = %target,
                    "{}: {}",
                    stage_name(a),
                    std::io::Error::from_raw_os_error(b)
                ),
                _ => {}
            }
        }
        let message = match failure {
            Some((ST_EXEC, errno)) => Some(exec_message(&self.argv0, errno)),
            Some((stage, errno)) => {
                let object = if stage == ST_CHDIR {
                    format!("{target} to {:?}", self.cwd)
                } else {
                    target
                };
                return Err(sys(stage_name(stage), object)(
                    std::io::Error::from_raw_os_error(errno),
                ));
            }
            None if !started && !timed_out => {
                return Err(sys("exec: start command in", &target)(
                    std::io::Error::other(format!(
                        "the helper ended ({status:?}) before starting it"
                    )),
                ));
            }
            None => None,
        };
        Ok(ExecExit { exit_code, message })
    }
}

/// Where `argv0` may be, in order: itself if it holds a '/', else each
/// directory of PATH (an empty entry is the working directory).
fn candidates(argv0: &str, env: &[String]) -> Vec<String> {
    if argv0.contains('/') {
        return vec![argv0.to_string()];
    }
    let path = env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or(DEFAULT_PATH);
    path.split(':')
        .map(|dir| match dir.trim_end_matches('/') {
            "" if dir.is_empty() => argv0.to_string(),
            d => format!("{d}/{argv0}"),
        })
        .collect()
}

/// The message runc prints when exec fails.
fn exec_message(argv0: &str, errno: i32) -> String {
    if errno == libc::ENOENT && !argv0.contains('/') {
        return format!("exec: {argv0:?}: executable file not found in $PATH\n");
    }
    let desc = nix::errno::Errno::from_raw(errno).desc();
    let mut chars = desc.chars();
    let desc = match chars.next() {
        Some(c) => c.to_lowercase().chain(chars).collect::<String>(),
        None => String::new(),
    };
    format!("exec: {argv0:?}: {desc}\n")
}

fn stage_name(stage: i32) -> &'static str {
    if let Some(step) = super::identity::Step::from_index(stage - ST_IDENTITY) {
        return match step {
            super::identity::Step::OomScoreAdj => "exec: set oom_score_adj in",
            super::identity::Step::Rlimit => "exec: set rlimit in",
            super::identity::Step::AppArmor => "exec: set AppArmor profile in",
            super::identity::Step::KeepCaps => "exec: prctl(PR_SET_KEEPCAPS) in",
            super::identity::Step::Bounding => "exec: drop bounding capabilities in",
            super::identity::Step::SetGroups => "exec: setgroups in",
            super::identity::Step::SetGid => "exec: setgid in",
            super::identity::Step::SetUid => "exec: setuid in",
            super::identity::Step::CapSet => "exec: capset in",
            super::identity::Step::Ambient => "exec: raise ambient capabilities in",
            super::identity::Step::NoNewPrivs => "exec: prctl(PR_SET_NO_NEW_PRIVS) in",
            super::identity::Step::Seccomp => "exec: install seccomp filter in",
        };
    }
    usize::try_from(stage)
        .ok()
        .and_then(|i| STAGES.get(i))
        .copied()
        .unwrap_or("exec: helper for")
}

fn cstrings<'s>(
    items: impl Iterator<Item = &'s String>,
    target: &str,
) -> Result<Vec<CString>, LinuxError> {
    items
        .map(|s| CString::new(s.as_str()).map_err(sys("exec in", target)))
        .collect()
}

/// A NULL-terminated array of pointers into `strings`.
fn pointers(strings: &[CString]) -> Vec<*const c_char> {
    strings
        .iter()
        .map(|c| c.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect()
}

/// Opens the target's namespaces that differ from the calling thread's (the
/// helper is cloned from this thread, so it starts in these).
fn open_namespaces(pid: i32, target: &str) -> Result<[Option<OwnedFd>; 7], LinuxError> {
    let mut out: [Option<OwnedFd>; 7] = Default::default();
    for (slot, (name, _)) in out.iter_mut().zip(NAMESPACES) {
        let path = format!("/proc/{pid}/ns/{name}");
        let fd: OwnedFd = match std::fs::File::open(&path) {
            Ok(f) => f.into(),
            // Kernels without cgroup namespaces have no such file.
            Err(e) if name == "cgroup" && e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(sys("exec: open namespace of", target)(e)),
        };
        let theirs = rustix::fs::fstat(&fd).map_err(sys("exec: stat", &path))?;
        let own_path = format!("/proc/thread-self/ns/{name}");
        let own = rustix::fs::stat(own_path.as_str()).map_err(sys("exec: stat", &own_path))?;
        if (theirs.st_dev, theirs.st_ino) != (own.st_dev, own.st_ino) {
            *slot = Some(high(fd, target)?);
        }
    }
    Ok(out)
}

/// The cgroup v2 `cgroup.procs` of the target, open for writing, when it is
/// not berth's own. Best effort: without it the command runs in berth's
/// cgroup (with a warning).
fn cgroup_procs(pid: i32) -> Option<OwnedFd> {
    fn v2_path(file: &str) -> Option<String> {
        let text = std::fs::read_to_string(file).ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix("0::"))
            .map(str::to_string)
    }
    let theirs = v2_path(&format!("/proc/{pid}/cgroup"))?;
    if Some(&theirs) == v2_path("/proc/thread-self/cgroup").as_ref()
        || theirs.ends_with(" (deleted)")
    {
        return None;
    }
    let path = crate::check::cgroup2_mount()?
        .join(theirs.trim_start_matches('/'))
        .join("cgroup.procs");
    match std::fs::File::options().write(true).open(&path) {
        Ok(f) => Some(f.into()),
        Err(e) => {
            tracing::warn!(target_pid = pid, "exec: open {}: {e}", path.display());
            None
        }
    }
}

/// A close-on-exec pipe (read end, write end), both fds >= 3.
fn pipe(target: &str) -> Result<(OwnedFd, OwnedFd), LinuxError> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(sys("exec: create pipe for", target))?;
    Ok((high(r, target)?, high(w, target)?))
}

/// Moves `fd` to a number >= 3, so that dup2 onto 0-2 in the command cannot
/// clobber it (when berth itself runs without stdio).
fn high(fd: OwnedFd, target: &str) -> Result<OwnedFd, LinuxError> {
    if fd.as_raw_fd() >= 3 {
        return Ok(fd);
    }
    rustix::io::fcntl_dupfd_cloexec(&fd, 3).map_err(sys("exec: dup fd for", target))
}

fn timespec(d: Duration) -> rustix::time::Timespec {
    rustix::time::Timespec {
        tv_sec: d.as_secs() as i64,
        tv_nsec: d.subsec_nanos() as i64,
    }
}

/// One output pipe being collected.
struct Stream {
    fd: Option<OwnedFd>,
    buf: Vec<u8>,
    cap: usize,
}

impl Stream {
    fn new(fd: OwnedFd, cap: usize) -> Self {
        Stream {
            fd: Some(fd),
            buf: Vec::new(),
            cap,
        }
    }

    /// Reads what is there now (at most `rounds` reads); closes the pipe at
    /// EOF. Returns whether data came and more may follow at once.
    fn pull(&mut self, scratch: &mut [u8], rounds: usize) -> std::io::Result<bool> {
        let Some(fd) = &self.fd else {
            return Ok(false);
        };
        for _ in 0..rounds {
            match rustix::io::read(fd, &mut *scratch) {
                Ok(0) => {
                    self.fd = None;
                    return Ok(false);
                }
                Ok(n) => {
                    let keep = n.min(self.cap.saturating_sub(self.buf.len()));
                    self.buf.extend_from_slice(&scratch[..keep]);
                }
                Err(rustix::io::Errno::AGAIN) => return Ok(false),
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(true)
    }
}

/// The helper child: killed and reaped on drop unless already reaped.
struct Helper {
    pid: i32,
    pidfd: OwnedFd,
    reaped: bool,
}

impl Helper {
    fn new(pid: i32) -> std::io::Result<Self> {
        let opened = rustix::process::Pid::from_raw(pid)
            .ok_or(rustix::io::Errno::SRCH)
            .and_then(|p| rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty()));
        match opened {
            Ok(pidfd) => Ok(Helper {
                pid,
                pidfd,
                reaped: false,
            }),
            Err(e) => {
                let p = nix::unistd::Pid::from_raw(pid);
                // Our unreaped child: the pid cannot have been reused.
                let _ = nix::sys::signal::kill(p, nix::sys::signal::Signal::SIGKILL);
                let _ = waitpid(p, None);
                Err(e.into())
            }
        }
    }

    fn kill(&self) {
        let _ = rustix::process::pidfd_send_signal(&self.pidfd, rustix::process::Signal::KILL);
    }

    fn wait(&mut self) -> std::io::Result<WaitStatus> {
        loop {
            match waitpid(nix::unistd::Pid::from_raw(self.pid), None) {
                Ok(s) => {
                    self.reaped = true;
                    return Ok(s);
                }
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => {
                    self.reaped = true;
                    return Err(e.into());
                }
            }
        }
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        if !self.reaped {
            // The helper's command has PR_SET_PDEATHSIG=SIGKILL.
            self.kill();
            let _ = self.wait();
        }
    }
}

// ---- the children: raw syscalls only from here on ----

/// What the helper and the command need, all in memory the children get
/// copies of (no CLONE_VM).
struct ChildArgs {
    /// Per NAMESPACES entry, -1 to stay.
    ns_fds: [c_int; 7],
    cgroup_fd: c_int,
    root_fd: c_int,
    in_fd: c_int,
    out_fd: c_int,
    err_fd: c_int,
    tty: bool,
    report_fd: c_int,
    ctl_fd: c_int,
    grand_stack_top: *mut c_void,
    identity: *const super::identity::Identity,
    cwd: *const c_char,
    argv: *const *const c_char,
    envp: *const *const c_char,
    cands: *const *const c_char,
    ncands: usize,
}

/// What the command gets: the shared args plus its parent's pid.
struct GrandArgs {
    a: *const ChildArgs,
    helper_pid: libc::pid_t,
}

/// Clones the helper with all signals blocked in this thread, so no signal
/// handler of berth can run in the child before it resets them.
fn clone_helper(args: &ChildArgs, stack: &mut [u8]) -> std::io::Result<i32> {
    let mut old = SigSet::empty();
    pthread_sigmask(
        SigmaskHow::SIG_SETMASK,
        Some(&SigSet::all()),
        Some(&mut old),
    )?;
    // SAFETY: the stack is a live, writable buffer and we pass its top (it
    // grows down on x86_64/aarch64). Without CLONE_VM the child runs on a
    // copy of our memory, so `args` and everything it points to (CStrings,
    // pointer arrays, groups, the second stack; all alive until clone
    // returns) are valid there. `helper_main` only makes async-signal-safe
    // syscalls and ends in _exit.
    let pid = unsafe {
        libc::clone(
            helper_main,
            stack.as_mut_ptr_range().end.cast(),
            libc::SIGCHLD,
            (args as *const ChildArgs).cast_mut().cast(),
        )
    };
    let err = std::io::Error::last_os_error();
    let _ = pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&old), None);
    if pid < 0 {
        Err(err)
    } else {
        Ok(pid)
    }
}

fn errno() -> c_int {
    // Reads the thread's errno; no allocation for an OS error.
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn report(fd: c_int, kind: i32, a: i32, b: i32) {
    let rec: [i32; 3] = [kind, a, b];
    // SAFETY: `rec` is a live buffer of REC_LEN bytes; write(2) does not
    // touch memory beyond it.
    unsafe { libc::write(fd, rec.as_ptr().cast(), REC_LEN) };
}

fn exit_now(code: c_int) -> ! {
    // SAFETY: _exit ends the process at once, running no destructors, atexit
    // handlers or stdio flushing (none of which a cloned child may run).
    unsafe { libc::_exit(code) }
}

/// Reports `stage` failed with the current errno, and exits.
fn fail(report_fd: c_int, stage: i32) -> ! {
    let e = errno();
    report(report_fd, REC_FAIL, stage, e);
    exit_now(1)
}

fn set_sigmask(all: bool) {
    // SAFETY: a zeroed sigset_t is valid storage that sigfillset/sigemptyset
    // initialise; sigprocmask only reads it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        if all {
            libc::sigfillset(&mut set);
        } else {
            libc::sigemptyset(&mut set);
        }
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
    }
}

/// Closes (or with CLOSE_RANGE_CLOEXEC marks) every fd >= 3 but `keep`.
/// Best effort: without close_range (Linux < 5.9) nothing happens, and berth's
/// fds are all close-on-exec anyway.
pub(crate) fn close_fds_except(keep: &mut [c_int], flags: c_uint) {
    let range = |lo: c_uint, hi: c_uint| {
        // SAFETY: close_range only affects this process's fd table. With
        // CLOSE_RANGE_CLOEXEC nothing is closed before the exec; otherwise
        // the OwnedFds in the copied memory that own these numbers are never
        // used or dropped in this child, which ends in _exit.
        unsafe { libc::syscall(libc::SYS_close_range, lo, hi, flags) };
    };
    keep.sort_unstable(); // in place, no allocation
    let mut lo: c_uint = 3;
    for &k in keep.iter() {
        let Ok(k) = c_uint::try_from(k) else {
            continue;
        };
        if k < lo {
            continue;
        }
        if k > lo {
            range(lo, k - 1);
        }
        lo = k + 1;
    }
    range(lo, c_uint::MAX);
}

/// Waits for child `pid`; its exit status, or 128+signal.
fn wait_code(pid: libc::pid_t) -> c_int {
    let mut status: c_int = 0;
    loop {
        // SAFETY: `status` is a live c_int for waitpid to fill.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            break;
        }
        if r < 0 && errno() != libc::EINTR {
            return 255;
        }
    }
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else if libc::WIFSIGNALED(status) {
        128 + libc::WTERMSIG(status)
    } else {
        255
    }
}

extern "C" fn helper_main(arg: *mut c_void) -> c_int {
    // SAFETY: `arg` points at the ChildArgs in berth's stack frame, copied
    // into this child's address space (no CLONE_VM), as is everything its
    // pointers refer to. Only raw, async-signal-safe syscalls follow: no
    // allocation, no locks, and no glibc wrappers that assume the parent's
    // threads (the set*id calls are raw syscalls for that reason).
    unsafe {
        let a = &*(arg as *const ChildArgs);
        let rep = a.report_fd;
        // Not ptrace-able or inspectable through /proc by the container.
        if libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) < 0 {
            fail(rep, ST_DUMPABLE);
        }
        // berth's handlers must not run here, nor ignored signals stay
        // ignored in the command. Signals stay blocked in the helper (it is
        // only ever SIGKILLed); the command unblocks them before exec.
        for sig in 1..65 {
            if sig == libc::SIGKILL || sig == libc::SIGSTOP {
                continue;
            }
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = libc::SIG_DFL;
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
        let mut keep = [
            a.ns_fds[0],
            a.ns_fds[1],
            a.ns_fds[2],
            a.ns_fds[3],
            a.ns_fds[4],
            a.ns_fds[5],
            a.ns_fds[6],
            a.cgroup_fd,
            a.root_fd,
            a.in_fd,
            a.out_fd,
            a.err_fd,
            a.report_fd,
            a.ctl_fd,
        ];
        close_fds_except(&mut keep, 0);

        // Into the container's cgroup before its cgroup namespace: writing
        // "0" moves the writer; the command is then born there.
        if a.cgroup_fd >= 0 && libc::write(a.cgroup_fd, b"0".as_ptr().cast(), 1) < 0 {
            report(rep, REC_WARN, ST_CGROUP, errno());
        }
        for (i, (_, flag)) in NAMESPACES.iter().enumerate() {
            let fd = a.ns_fds[i];
            if fd >= 0 && libc::setns(fd, *flag) < 0 {
                fail(rep, ST_SETNS + i as i32);
            }
        }
        // setns(mnt) put us at the namespace's root; the container process
        // may have a different root within it (pivot_root makes them equal).
        if libc::fchdir(a.root_fd) < 0 || libc::chroot(c".".as_ptr()) < 0 {
            fail(rep, ST_ROOT);
        }

        let g = GrandArgs {
            a,
            helper_pid: libc::syscall(libc::SYS_getpid) as libc::pid_t,
        };
        // The pid is as seen from our own PID namespace (berth's): setns(pid)
        // only placed our children in the container's.
        let gpid = libc::clone(
            command_main,
            a.grand_stack_top,
            libc::SIGCHLD,
            (&g as *const GrandArgs).cast_mut().cast(),
        );
        if gpid < 0 {
            fail(rep, ST_CLONE);
        }
        let mut keep = [a.report_fd, a.ctl_fd];
        close_fds_except(&mut keep, 0);
        let pidfd = libc::syscall(libc::SYS_pidfd_open, gpid, 0 as c_uint) as c_int;
        if pidfd < 0 {
            let e = errno();
            libc::kill(gpid, libc::SIGKILL);
            report(rep, REC_FAIL, ST_PIDFD, e);
            wait_code(gpid);
            exit_now(1);
        }
        report(rep, REC_PID, gpid, 0);
        libc::close(rep);

        // Until the command exits, or berth closes the control pipe.
        let mut fds = [
            libc::pollfd {
                fd: pidfd,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: a.ctl_fd,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        loop {
            let n = libc::poll(fds.as_mut_ptr(), 2, -1);
            if n < 0 && errno() == libc::EINTR {
                continue;
            }
            if n < 0 || fds[0].revents != 0 {
                break;
            }
            if fds[1].revents != 0 {
                // gpid is our unreaped child: it cannot name another process.
                libc::kill(gpid, libc::SIGKILL);
                break;
            }
        }
        exit_now(wait_code(gpid))
    }
}

extern "C" fn command_main(arg: *mut c_void) -> c_int {
    // SAFETY: as in `helper_main`: `arg` and all pointers reachable from it
    // are in memory copied from the helper (itself copied from berth), and
    // only raw async-signal-safe syscalls follow. The pointer arrays are
    // NULL-terminated and `cands` has `ncands` entries before the NULL.
    unsafe {
        let g = &*(arg as *const GrandArgs);
        let a = &*g.a;
        let rep = a.report_fd;
        let identity = &*a.identity;
        if let Err((step, e)) = identity.enter() {
            report(rep, REC_FAIL, ST_IDENTITY + step as i32, e);
            exit_now(1);
        }
        // Die with the helper (set after the credential change, which clears
        // it). If it is already gone we were reparented: our parent is then
        // visible (non-zero) and not the helper.
        if libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        ) < 0
        {
            fail(rep, ST_PDEATHSIG);
        }
        let ppid = libc::syscall(libc::SYS_getppid) as libc::pid_t;
        if ppid != 0 && ppid != g.helper_pid {
            exit_now(1);
        }
        if libc::chdir(a.cwd) < 0 {
            fail(rep, ST_CHDIR);
        }
        // The sources are >= 3 (see `high`), so no dup2 clobbers another.
        if libc::dup2(a.in_fd, 0) < 0 || libc::dup2(a.out_fd, 1) < 0 || libc::dup2(a.err_fd, 2) < 0
        {
            fail(rep, ST_DUP2);
        }
        if a.tty && (libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0) {
            fail(rep, ST_CTTY);
        }
        // Nothing of berth's but stdio may reach the command.
        let mut keep: [c_int; 0] = [];
        close_fds_except(&mut keep, libc::CLOSE_RANGE_CLOEXEC);
        set_sigmask(false);
        // Last: only the exec runs under the seccomp filter.
        if let Err((step, e)) = identity.seal() {
            report(rep, REC_FAIL, ST_IDENTITY + step as i32, e);
            exit_now(1);
        }

        let mut not_found = libc::ENOENT;
        let mut denied = false;
        let mut fatal = 0;
        for i in 0..a.ncands {
            libc::execve(*a.cands.add(i), a.argv, a.envp);
            match errno() {
                e @ (libc::ENOENT | libc::ENOTDIR) => not_found = e,
                libc::EACCES => denied = true,
                e => {
                    fatal = e;
                    break;
                }
            }
        }
        let e = if fatal != 0 {
            fatal
        } else if denied {
            libc::EACCES
        } else {
            not_found
        };
        // A berth gone away must not turn into SIGPIPE here.
        set_sigmask(true);
        report(rep, REC_FAIL, ST_EXEC, e);
        exit_now(if e == libc::ENOENT || e == libc::ENOTDIR {
            127
        } else {
            126
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linux::identity::Identity;
    use std::path::Path;
    use std::process::{Child, Command, Stdio};

    fn is_root() -> bool {
        rustix::process::geteuid().is_root()
    }

    /// A process in its own mount, UTS, IPC, PID, net and cgroup namespaces,
    /// hostname "inner-ns": pid 1 (`sleep`) of its PID namespace.
    struct Target {
        unshare: Child,
        pid: i32,
    }

    impl Target {
        fn start() -> Target {
            let unshare = Command::new("unshare")
                .args([
                    "--mount",
                    "--uts",
                    "--ipc",
                    "--pid",
                    "--net",
                    "--cgroup",
                    "--fork",
                    "--mount-proc",
                    "sh",
                    "-c",
                    "hostname inner-ns && exec sleep 60",
                ])
                .stdin(Stdio::null())
                // util-linux unshare complains when its child is SIGKILLed.
                .stderr(Stdio::null())
                .spawn()
                .expect("run unshare");
            // Owned by the guard at once: a panic below still cleans up.
            let mut t = Target { unshare, pid: 0 };
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Some(pid) = children(t.unshare.id() as i32).into_iter().next() {
                    let comm =
                        std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                    if comm.trim() == "sleep" {
                        t.pid = pid;
                        return t;
                    }
                }
                assert!(Instant::now() < deadline, "unshare target did not start");
                std::thread::sleep(Duration::from_millis(10));
            }
        }

        fn run(&self, argv: &[&str]) -> ExecOutput {
            self.run_with(argv, |_| {}).expect("exec_sync")
        }

        fn run_with<'e>(
            &self,
            argv: &[&str],
            tweak: impl FnOnce(&mut ExecSpec<'e>),
        ) -> Result<ExecOutput, LinuxError> {
            // Leaked (tests only) so that `tweak` may substitute borrowed parts.
            let argv: &'static [String] = argv
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
                .leak();
            let env: &'static [String] =
                vec!["PATH=/usr/sbin:/usr/bin:/sbin:/bin".to_string()].leak();
            let mut spec = ExecSpec {
                target_pid: self.pid,
                argv,
                env,
                cwd: "",
                identity: Box::leak(Box::new(Identity::user(0, 0, vec![]))),
                timeout: Some(Duration::from_secs(20)),
                max_output: 1 << 20,
            };
            tweak(&mut spec);
            exec_sync(&spec)
        }
    }

    impl Drop for Target {
        fn drop(&mut self) {
            // Killing PID 1 of the namespace kills everything in it.
            if self.pid > 0 {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(self.pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            // unshare then reaps it and exits.
            let deadline = Instant::now() + Duration::from_secs(5);
            while matches!(self.unshare.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            let _ = self.unshare.kill();
            let _ = self.unshare.wait();
        }
    }

    fn children(pid: i32) -> Vec<i32> {
        let mut out = Vec::new();
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return out;
        };
        for t in tasks.flatten() {
            let text = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
            out.extend(
                text.split_whitespace()
                    .filter_map(|p| p.parse::<i32>().ok()),
            );
        }
        out
    }

    fn text(b: &[u8]) -> &str {
        std::str::from_utf8(b).unwrap()
    }

    /// Whether a process with exactly this command line exists.
    fn process_with_cmdline(cmdline: &[&str]) -> bool {
        let want: Vec<u8> = cmdline
            .iter()
            .flat_map(|a| [a.as_bytes(), b"\0"].concat())
            .collect();
        std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
            e.file_name().to_string_lossy().parse::<u32>().is_ok()
                && std::fs::read(e.path().join("cmdline")).ok().as_deref() == Some(&want[..])
        })
    }

    #[test]
    fn path_candidates() {
        let env = vec!["A=b".to_string(), "PATH=/x/:/y::/z".to_string()];
        assert_eq!(
            candidates("ls", &env),
            ["/x/ls", "/y/ls", "ls", "/z/ls"].map(String::from)
        );
        assert_eq!(candidates("./ls", &env), ["./ls"].map(String::from));
        assert_eq!(candidates("sh", &[]).len(), 6);
        assert_eq!(
            candidates("sh", &["PATH=/".into()]),
            ["/sh"].map(String::from)
        );
        assert_eq!(
            exec_message("foo", libc::ENOENT),
            "exec: \"foo\": executable file not found in $PATH\n"
        );
        assert_eq!(
            exec_message("/etc/passwd", libc::EACCES),
            "exec: \"/etc/passwd\": permission denied\n"
        );
    }

    #[test]
    fn runs_in_the_container_namespaces() {
        if !is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let t = Target::start();
        let r = t.run(&["hostname"]);
        assert_eq!(
            (text(&r.stdout), r.exit_code, r.timed_out),
            ("inner-ns\n", 0, false)
        );

        // Exactly the target's namespaces.
        let names = ["ipc", "uts", "net", "cgroup", "pid", "mnt"];
        let want: String = names
            .iter()
            .map(|n| {
                let l = std::fs::read_link(format!("/proc/{}/ns/{n}", t.pid)).unwrap();
                format!("{}\n", l.display())
            })
            .collect();
        let script = format!(
            "for n in {}; do readlink /proc/self/ns/$n; done",
            names.join(" ")
        );
        let r = t.run(&["sh", "-c", &script]);
        assert_eq!(text(&r.stdout), want, "stderr: {}", text(&r.stderr));
        assert_eq!(r.exit_code, 0);

        // A small pid: it lives in the container's PID namespace.
        let r = t.run(&["sh", "-c", "echo $$"]);
        let pid: i32 = text(&r.stdout).trim().parse().unwrap();
        assert!(pid > 1 && pid < 100, "pid {pid}");

        // The container's root and /proc (mounted by unshare --mount-proc).
        let r = t.run(&["sh", "-c", "cat /proc/1/comm"]);
        assert_eq!(text(&r.stdout), "sleep\n");

        if ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"]
            .iter()
            .any(|p| Path::new(p).exists())
        {
            let r = t.run(&["ip", "-o", "link"]);
            let out = text(&r.stdout);
            assert_eq!(out.lines().count(), 1, "{out}");
            assert!(out.contains(": lo:"), "{out}");
        }
    }

    #[test]
    fn exit_codes_output_env_user() {
        if !is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let t = Target::start();
        assert_eq!(t.run(&["sh", "-c", "exit 3"]).exit_code, 3);
        assert_eq!(t.run(&["sh", "-c", "kill -TERM $$"]).exit_code, 128 + 15);

        let r = t.run(&["sh", "-c", "echo out; echo err >&2; echo out2"]);
        assert_eq!((text(&r.stdout), text(&r.stderr)), ("out\nout2\n", "err\n"));

        // stdin is /dev/null.
        let r = t.run(&["sh", "-c", "cat; echo done"]);
        assert_eq!(text(&r.stdout), "done\n");

        // Output beyond the cap is drained, not kept; the writer still ends.
        let r = t
            .run_with(
                &[
                    "sh",
                    "-c",
                    "head -c 300000 /dev/zero; head -c 5000 /dev/zero >&2",
                ],
                |s| s.max_output = 1000,
            )
            .unwrap();
        assert_eq!(
            (r.stdout.len(), r.stderr.len(), r.exit_code),
            (1000, 1000, 0)
        );

        let env = vec!["FOO=bar baz".to_string()];
        let r = t
            .run_with(&["sh", "-c", "echo \"$FOO\"; pwd"], |s| {
                s.env = &env; // no PATH: the default one finds sh
                s.cwd = "/tmp";
            })
            .unwrap();
        assert_eq!(text(&r.stdout), "bar baz\n/tmp\n");

        let r = t
            .run_with(&["sh", "-c", "id -u; id -g; id -G"], |s| {
                s.identity = Box::leak(Box::new(Identity::user(65534, 65534, vec![65534, 100])));
            })
            .unwrap();
        assert_eq!(
            text(&r.stdout),
            "65534\n65534\n65534 100\n",
            "{}",
            text(&r.stderr)
        );
        let r = t.run(&["id", "-G"]);
        assert_eq!(text(&r.stdout), "0\n");
    }

    #[test]
    fn exec_failures() {
        if !is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let t = Target::start();
        let r = t.run(&["no-such-command-xyz", "arg"]);
        assert_eq!(r.exit_code, 127);
        assert_eq!(
            text(&r.stderr),
            "exec: \"no-such-command-xyz\": executable file not found in $PATH\n"
        );
        let r = t.run(&["/no/such/file"]);
        assert_eq!(r.exit_code, 127);
        assert_eq!(
            text(&r.stderr),
            "exec: \"/no/such/file\": no such file or directory\n"
        );
        let r = t.run(&["/etc/passwd"]);
        assert_eq!(r.exit_code, 126);
        assert_eq!(
            text(&r.stderr),
            "exec: \"/etc/passwd\": permission denied\n"
        );

        let e = t
            .run_with(&["true"], |s| s.cwd = "/no/such/dir")
            .unwrap_err();
        assert!(e.to_string().contains("chdir"), "{e}");
        let empty: [String; 0] = [];
        let e = t.run_with(&["x"], |s| s.argv = &empty).unwrap_err();
        assert!(e.to_string().contains("empty command"), "{e}");
        let e = exec_sync(&ExecSpec {
            target_pid: i32::MAX,
            argv: &["true".to_string()],
            env: &[],
            cwd: "",
            identity: &Identity::user(0, 0, vec![]),
            timeout: None,
            max_output: 10,
        })
        .unwrap_err();
        assert!(e.to_string().contains("open namespace"), "{e}");
    }

    #[test]
    fn timeout_kills_the_command() {
        if !is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let t = Target::start();
        let begun = Instant::now();
        let r = t
            .run_with(&["sh", "-c", "echo before; exec sleep 10.4321"], |s| {
                s.timeout = Some(Duration::from_millis(300))
            })
            .unwrap();
        let took = begun.elapsed();
        assert!(r.timed_out);
        assert_eq!(r.exit_code, 128 + 9);
        assert_eq!(text(&r.stdout), "before\n");
        assert!(
            took >= Duration::from_millis(300) && took < Duration::from_secs(2),
            "{took:?}"
        );
        assert!(!process_with_cmdline(&["sleep", "10.4321"]));

        // A background process holding stdout open does not hold up the
        // result once the command itself is done.
        let begun = Instant::now();
        let r = t
            .run_with(&["sh", "-c", "sleep 5.4321 & echo started"], |s| {
                s.timeout = None
            })
            .unwrap();
        assert_eq!(
            (text(&r.stdout), r.exit_code, r.timed_out),
            ("started\n", 0, false)
        );
        assert!(begun.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn joins_the_cgroup() {
        let Some(mount) = crate::check::cgroup2_mount() else {
            eprintln!("skipped: no cgroup2 mount");
            return;
        };
        let name = format!("berth-exec-test-{}", std::process::id());
        let dir = mount.join(&name);
        if !is_root() || std::fs::create_dir(&dir).is_err() {
            eprintln!("skipped: cannot create a cgroup");
            return;
        }
        let t = Target::start();
        let moved = std::fs::write(dir.join("cgroup.procs"), t.pid.to_string());
        let r = moved
            .as_ref()
            .ok()
            .map(|_| t.run(&["cat", "/proc/self/cgroup"]));
        drop(t);
        for _ in 0..100 {
            if std::fs::remove_dir(&dir).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let Some(r) = r else {
            eprintln!("skipped: cannot move into a cgroup: {moved:?}");
            return;
        };
        // The target's cgroup namespace is rooted where unshare was (/).
        let line = text(&r.stdout).lines().find(|l| l.starts_with("0::"));
        assert_eq!(
            line,
            Some(format!("0::/{name}").as_str()),
            "{}",
            text(&r.stdout)
        );
    }

    #[test]
    fn concurrent_execs() {
        if !is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let t = Target::start();
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|i| {
                    let t = &t;
                    s.spawn(move || {
                        let script = format!("sleep 0.{i}; echo {i}");
                        let r = t.run(&["sh", "-c", &script]);
                        assert_eq!(text(&r.stdout), format!("{i}\n"));
                        assert_eq!(r.exit_code, 0);
                    })
                })
                .collect();
            for h in handles {
                h.join().unwrap();
            }
        });
    }
}
