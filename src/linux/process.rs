//! Starting berth's own helper processes inside new namespaces, and watching
//! processes through pidfds (immune to pid reuse).

use super::{sys, LinuxError};
use rustix::process::{Pid, PidfdFlags, Signal};
use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Namespaces for a process started with [`spawn_in_namespaces`].
#[derive(Debug, Default, Clone)]
pub struct Namespaces<'a> {
    /// A pinned network namespace to join; `None` keeps the caller's.
    pub join_net: Option<&'a Path>,
    pub new_ipc: bool,
    pub new_uts: bool,
    /// The process becomes PID 1 of a new PID namespace.
    pub new_pid: bool,
    /// Set in the new UTS namespace.
    pub hostname: Option<&'a str>,
    /// A cgroup v2 directory the process enters before it execs.
    pub cgroup: Option<&'a Path>,
    /// Create the process in a new user namespace, which then owns the
    /// other namespaces created with it.
    pub user: Option<NewUserNs<'a>>,
}

/// A user namespace made with the process: its mappings are written from
/// here (the parent, privileged over it) before the child goes on, and it is
/// pinned so that it outlives the process.
#[derive(Debug, Clone)]
pub struct NewUserNs<'a> {
    /// (container id, host id, length) ranges.
    pub uids: &'a [(u32, u32, u32)],
    pub gids: &'a [(u32, u32, u32)],
    pub pin: &'a Path,
    /// Also create the network namespace (owned by the user namespace) and
    /// pin it here with `lo` up. Excludes `join_net`.
    pub net_pin: Option<&'a Path>,
}

/// A started process: its pid and the kernel start time that identifies it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessId {
    pub pid: i32,
    pub start_time: u64,
}

/// Starts `exe` with arguments `argv0 args...` (stdio on /dev/null, in its
/// own session) inside the requested namespaces. The process is created directly in them with
/// clone(2), so with `new_pid` it is PID 1 there from its first instruction.
pub fn spawn_in_namespaces(
    exe: &Path,
    argv0: &Path,
    args: &[&str],
    ns: &Namespaces<'_>,
) -> Result<ProcessId, LinuxError> {
    let what = exe.display().to_string();
    // Everything the child needs is prepared here: between clone and exec
    // the child may only make raw syscalls (no allocation, no locks).
    let exe_c = CString::new(exe.as_os_str().as_bytes()).map_err(sys("exec", &what))?;
    let mut argv_c = vec![CString::new(argv0.as_os_str().as_bytes()).map_err(sys("exec", &what))?];
    for a in args {
        argv_c.push(CString::new(*a).map_err(sys("exec", &what))?);
    }
    let mut argv: Vec<*const libc::c_char> = argv_c.iter().map(|c| c.as_ptr()).collect();
    argv.push(std::ptr::null());
    let envp: [*const libc::c_char; 1] = [std::ptr::null()];
    let devnull = std::fs::File::options()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(sys("open", "/dev/null"))?;
    let netns = match ns.join_net {
        Some(p) => Some(std::fs::File::open(p).map_err(sys("open netns", p.display()))?),
        None => None,
    };
    let hostname = ns.hostname.map(|h| h.as_bytes().to_vec());
    let procs = match ns.cgroup {
        Some(cg) => Some(
            CString::new(cg.join("cgroup.procs").as_os_str().as_bytes())
                .map_err(sys("cgroup path", cg.display()))?,
        ),
        None => None,
    };
    let mut flags = 0;
    if ns.new_ipc {
        flags |= libc::CLONE_NEWIPC;
    }
    if ns.new_uts {
        flags |= libc::CLONE_NEWUTS;
    }
    if ns.new_pid {
        flags |= libc::CLONE_NEWPID;
    }
    if let Some(u) = &ns.user {
        // With CLONE_NEWUSER the kernel makes the user namespace first, so
        // every other namespace of this clone belongs to it.
        flags |= libc::CLONE_NEWUSER;
        if u.net_pin.is_some() {
            flags |= libc::CLONE_NEWNET;
        }
    }
    let null_fd = devnull.as_raw_fd();
    let net_fd = netns.as_ref().map(|f| f.as_raw_fd()).unwrap_or(-1);
    let host_ptr = hostname
        .as_ref()
        .map(|h| h.as_ptr())
        .unwrap_or(std::ptr::null());
    let host_len = hostname.as_ref().map(|h| h.len()).unwrap_or(0);

    // Closed by the exec (CLOEXEC) or the child's exit: reading EOF from it
    // means the child's setup (namespaces, cgroup, hostname) is over.
    let (done_r, done_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(sys("pipe for", &what))?;
    // The child waits for a byte here while its user namespace is set up.
    let (go_r, go_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(sys("pipe for", &what))?;
    let mut stack = vec![0u8; 64 * 1024];
    let child = ChildArgs {
        go_fd: if ns.user.is_some() {
            go_r.as_raw_fd()
        } else {
            -1
        },
        exe: exe_c.as_ptr(),
        argv: argv.as_ptr(),
        envp: envp.as_ptr(),
        null_fd,
        net_fd,
        host_ptr,
        host_len,
        procs: procs
            .as_ref()
            .map(|c| c.as_ptr())
            .unwrap_or(std::ptr::null()),
    };
    // SAFETY: the stack is a live, writable buffer and we pass its top (it
    // grows down on x86_64/aarch64). Without CLONE_VM the child runs on a
    // copy of our memory, so `child` and the pointers it holds (CStrings,
    // argv, hostname, all alive until clone returns) stay valid in it.
    // `child_main` only makes async-signal-safe syscalls and then execs or
    // _exits.
    let pid = unsafe {
        libc::clone(
            child_main,
            stack.as_mut_ptr().add(stack.len()).cast(),
            flags | libc::SIGCHLD,
            (&child as *const ChildArgs).cast_mut().cast(),
        )
    };
    if pid < 0 {
        return Err(sys("clone", &what)(std::io::Error::last_os_error()));
    }
    drop(done_w);
    drop(go_r);
    if let Some(u) = &ns.user {
        if let Err(e) = super::userns::set_up(pid, u) {
            // SAFETY: kill(2) of our own, not yet reaped child: the pid is ours.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
            return Err(e);
        }
        nix::unistd::write(&go_w, b"g").map_err(sys("release", &what))?;
    }
    drop(go_w);
    let mut buf = [0u8; 1];
    while let Err(nix::errno::Errno::EINTR) = nix::unistd::read(&done_r, &mut buf) {}
    // A child that failed its setup has exited with a code naming the step.
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    if let Ok(WaitStatus::Exited(_, code)) =
        waitpid(nix::unistd::Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG))
    {
        let step = match code {
            120 => "setsid",
            121 => "join the network namespace",
            122 => "set the hostname",
            123 => "set up stdio",
            124 => "enter the cgroup",
            125 => "wait for its user namespace",
            _ => "exec",
        };
        return Err(sys("start", &what)(std::io::Error::other(format!(
            "the new process failed to {step} (exit {code})"
        ))));
    }
    let start_time = start_time(pid).map_err(sys("read start time of", pid))?;
    Ok(ProcessId { pid, start_time })
}

struct ChildArgs {
    go_fd: libc::c_int,
    exe: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    null_fd: libc::c_int,
    net_fd: libc::c_int,
    host_ptr: *const u8,
    host_len: usize,
    procs: *const libc::c_char,
}

extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` points at the ChildArgs of the parent's stack frame,
    // copied into this child's address space (no CLONE_VM); every pointer in
    // it refers to memory copied the same way. Only raw syscalls follow.
    unsafe {
        let a = &*(arg as *const ChildArgs);
        if a.go_fd >= 0 {
            let mut b = 0u8;
            loop {
                let n = libc::read(a.go_fd, (&mut b as *mut u8).cast(), 1);
                if n == 1 {
                    break;
                }
                if n == 0 || *libc::__errno_location() != libc::EINTR {
                    libc::_exit(125);
                }
            }
        }
        if !a.procs.is_null() {
            let fd = libc::open(a.procs, libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                libc::_exit(124);
            }
            libc::close(fd);
        }
        if libc::setsid() < 0 {
            libc::_exit(120);
        }
        if a.net_fd >= 0 && libc::setns(a.net_fd, libc::CLONE_NEWNET) < 0 {
            libc::_exit(121);
        }
        if !a.host_ptr.is_null() && libc::sethostname(a.host_ptr.cast(), a.host_len) < 0 {
            libc::_exit(122);
        }
        for fd in 0..3 {
            if libc::dup2(a.null_fd, fd) < 0 {
                libc::_exit(123);
            }
        }
        // Only stdio survives the exec, whatever berth inherited.
        libc::syscall(
            libc::SYS_close_range,
            3 as libc::c_uint,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC as libc::c_uint,
        );
        libc::execve(a.exe, a.argv, a.envp);
        libc::_exit(127)
    }
}

/// The kernel start time (clock ticks since boot) of `pid`, field 22 of
/// /proc/<pid>/stat; together with the pid it names one process for good.
pub fn start_time(pid: i32) -> std::io::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name may hold spaces and parentheses: skip past the last ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|x| x.1)
        .ok_or_else(|| std::io::Error::other("malformed /proc/<pid>/stat"))?;
    rest.split_whitespace()
        .nth(19)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| std::io::Error::other("no start time in /proc/<pid>/stat"))
}

/// Whether the process still runs (not exited, not a zombie) and is the
/// same one that was started.
pub fn is_alive(p: ProcessId) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{}/stat", p.pid)) else {
        return false;
    };
    let state = stat
        .rsplit_once(')')
        .and_then(|x| x.1.split_whitespace().next())
        .unwrap_or("");
    state != "Z" && state != "X" && start_time(p.pid).ok() == Some(p.start_time)
}

/// Sends `sig` to `p` if it is still that process.
pub fn signal(p: ProcessId, sig: Signal) {
    if let Some(fd) = pidfd(p) {
        let _ = rustix::process::pidfd_send_signal(&fd, sig);
    }
}

fn pidfd(p: ProcessId) -> Option<OwnedFd> {
    let pid = Pid::from_raw(p.pid)?;
    let fd = rustix::process::pidfd_open(pid, PidfdFlags::empty()).ok()?;
    // The pidfd pins the process: if the start time still matches now, the
    // fd refers to the process we started, not a later one with its pid.
    is_alive(p).then_some(fd)
}

/// Sends SIGKILL to `p` (if it is still that process) and waits up to
/// `timeout` for it to be gone, reaping it when it is our child.
pub fn kill_and_wait(p: ProcessId, timeout: std::time::Duration) -> Result<(), LinuxError> {
    let Some(fd) = pidfd(p) else {
        reap(p.pid);
        return Ok(());
    };
    match rustix::process::pidfd_send_signal(&fd, Signal::KILL) {
        Ok(()) | Err(rustix::io::Errno::SRCH) => {}
        Err(e) => return Err(sys("kill", p.pid)(e)),
    }
    let deadline = std::time::Instant::now() + timeout;
    loop {
        // A pidfd becomes readable when the process exits.
        let mut fds = [rustix::event::PollFd::new(
            &fd,
            rustix::event::PollFlags::IN,
        )];
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let ts = rustix::time::Timespec {
            tv_sec: left.as_secs() as i64,
            tv_nsec: left.subsec_nanos() as i64,
        };
        match rustix::event::poll(&mut fds, Some(&ts)) {
            Ok(n) if n > 0 => break,
            Ok(_) => {
                return Err(sys("wait for exit of", p.pid)(std::io::Error::from(
                    std::io::ErrorKind::TimedOut,
                )))
            }
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(sys("wait for exit of", p.pid)(e)),
        }
    }
    reap(p.pid);
    Ok(())
}

/// Collects the exit status of `pid` if it is an exited child of ours.
pub fn reap(pid: i32) {
    use nix::sys::wait::{waitpid, WaitPidFlag};
    let _ = waitpid(nix::unistd::Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG));
}

/// Resolves when `p` has exited (at once if it already has). Does not reap.
pub async fn exited(p: ProcessId) {
    let Some(fd) = pidfd(p) else {
        return;
    };
    // SAFETY: the AsyncFd owns the pidfd (an OwnedFd moved into it), so the
    // fd stays open and is not reused for as long as it is registered.
    match unsafe { tokio::io::unix::AsyncFd::register(fd) } {
        Ok(afd) => {
            let _ = afd.readable().await;
        }
        Err(_) => {
            // Without a reactor registration, fall back to polling.
            while is_alive(p) {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

/// What [`fork_sibling`] returns in each process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forked {
    /// In the caller: the child's pid.
    Parent(i32),
    Child,
}

/// Forks the caller into a *sibling*: the child's parent is the caller's
/// parent (CLONE_PARENT), so it is that process that reaps it. The monitor
/// zygote uses this to hand each monitor to the daemon while the monitor
/// shares the zygote's already relocated pages.
///
/// Only for single-threaded callers.
pub fn fork_sibling() -> Result<Forked, LinuxError> {
    // SAFETY: clone(2) without CLONE_VM and with a null stack behaves like
    // fork(2): the child runs on a copy of the caller's address space and
    // stack and returns here with 0. The caller is single-threaded (the
    // zygote), so no other thread can hold a lock (malloc's, stdio's) that
    // would stay locked forever in the child. glibc's cached thread id is not
    // refreshed by a raw clone; glibc (>= 2.34) asks the kernel for the tid
    // where it matters (raise), and the child does not create threads.
    let r = unsafe {
        libc::syscall(
            libc::SYS_clone,
            (libc::CLONE_PARENT | libc::SIGCHLD) as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    match r {
        -1 => Err(sys("clone", "monitor")(std::io::Error::last_os_error())),
        0 => Ok(Forked::Child),
        pid => Ok(Forked::Parent(pid as i32)),
    }
}

/// Rewrites this process's command line as `ps` and /proc/PID/cmdline show
/// it, within the room its original arguments took (longer titles are cut).
/// prctl(PR_SET_MM_ARG_*) would allow any length but needs
/// CAP_SYS_RESOURCE; writing the argument area in place needs nothing.
pub fn set_title(args: &[&str]) -> std::io::Result<()> {
    use std::io::{Seek, SeekFrom, Write};
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    let rest = stat
        .rsplit_once(')')
        .map(|x| x.1)
        .ok_or_else(|| std::io::Error::other("malformed /proc/self/stat"))?;
    // Fields 48 and 49 (arg_start, arg_end); `rest` starts at field 3.
    let mut fields = rest.split_whitespace().skip(45);
    let mut next = || -> std::io::Result<u64> {
        fields
            .next()
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| std::io::Error::other("no argument area in /proc/self/stat"))
    };
    let (start, end) = (next()?, next()?);
    let room = end.saturating_sub(start) as usize;
    if room == 0 {
        return Ok(());
    }
    let mut title = args.join("\0").into_bytes();
    title.truncate(room - 1);
    title.resize(room, 0);
    let mut mem = std::fs::File::options()
        .write(true)
        .open("/proc/self/mem")?;
    mem.seek(SeekFrom::Start(start))?;
    mem.write_all(&title)
}
