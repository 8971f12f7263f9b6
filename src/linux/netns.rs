//! Network namespaces pinned by a bind mount, so that a pod's network exists
//! independently of any process (ARCHITECTURE "Processes").

use super::{sys, LinuxError};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// Creates a network namespace with `lo` up and pins it at `pin` (a new
/// file). On error nothing is left behind.
pub fn create_pinned(pin: &Path) -> Result<(), LinuxError> {
    let pin: PathBuf = pin.to_path_buf();
    // unshare(CLONE_NEWNET) changes only the calling thread, so a short-lived
    // thread makes the namespace without touching the daemon's own.
    std::thread::spawn(move || {
        std::fs::File::options()
            .write(true)
            .create_new(true)
            .open(&pin)
            .map_err(sys("create netns pin", pin.display()))?;
        let made = (|| {
            unshare(CloneFlags::CLONE_NEWNET).map_err(sys("unshare netns for", pin.display()))?;
            mount(
                Some("/proc/thread-self/ns/net"),
                &pin,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(sys("bind-mount netns at", pin.display()))?;
            loopback_up().map_err(sys("bring lo up in", pin.display()))
        })();
        if made.is_err() {
            let _ = remove_pin(&pin);
        }
        made
    })
    .join()
    .unwrap_or_else(|_| {
        Err(LinuxError::Sys {
            op: "create netns",
            object: "thread".into(),
            source: std::io::Error::other("netns thread panicked"),
        })
    })
}

/// A TCP connection to `port` on the loopback of the network namespace
/// pinned at `pin` (the daemon's own with `None`): IPv4 first, then IPv6.
/// The socket stays in that namespace whichever thread uses it later.
pub fn tcp_connect_in(pin: Option<&Path>, port: u16) -> Result<std::net::TcpStream, LinuxError> {
    let pin = pin.map(Path::to_path_buf);
    let object = format!(
        "port {port} in {}",
        pin.as_deref()
            .map_or("the host network".into(), |p| p.display().to_string())
    );
    // setns(CLONE_NEWNET) changes only the calling thread: a short-lived
    // thread leaves the daemon's own namespace alone.
    std::thread::spawn(move || {
        if let Some(pin) = &pin {
            let f = std::fs::File::open(pin).map_err(sys("open netns", pin.display()))?;
            nix::sched::setns(&f, CloneFlags::CLONE_NEWNET)
                .map_err(sys("join netns", pin.display()))?;
        }
        let v4 = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let v6 = std::net::SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port));
        std::net::TcpStream::connect(v4)
            .or_else(|e| std::net::TcpStream::connect(v6).map_err(|_| e))
            .map_err(sys("connect to", &object))
    })
    .join()
    .unwrap_or_else(|_| {
        Err(LinuxError::Sys {
            op: "connect",
            object: "thread".into(),
            source: std::io::Error::other("connect thread panicked"),
        })
    })
}

/// Unmounts and deletes a pin; absent pins are fine.
pub fn remove_pin(pin: &Path) -> Result<(), LinuxError> {
    match umount2(pin, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
        Err(e) => return Err(sys("unmount netns pin", pin.display())(e)),
    }
    match std::fs::remove_file(pin) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(sys("remove netns pin", pin.display())(e))
        }
        _ => Ok(()),
    }
}

/// Whether `pin` currently holds a network namespace.
pub fn is_pinned(pin: &Path) -> bool {
    nix::sys::statfs::statfs(pin).is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::NSFS_MAGIC)
}

/// `ip link set lo up` in the calling thread's network namespace.
pub(super) fn loopback_up() -> std::io::Result<()> {
    use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
    let sock = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let mut req: libc::ifreq = unsafe_zeroed_ifreq();
    for (d, s) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *d = *s as libc::c_char;
    }
    // SAFETY: `req` is a valid, initialised ifreq naming "lo"; SIOCGIFFLAGS
    // only writes ifr_flags inside it, and the socket fd is open.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: ifr_flags is the union member SIOCGIFFLAGS just filled in.
    unsafe {
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
    }
    // SAFETY: as above; SIOCSIFFLAGS reads the ifreq and changes lo's flags.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn unsafe_zeroed_ifreq() -> libc::ifreq {
    // SAFETY: ifreq is a plain C struct of integers, arrays and a union of
    // such; all-zero bytes are a valid value for it.
    unsafe { std::mem::zeroed() }
}

/// Runs `f` on a new thread that has joined the network namespace pinned at
/// `pin`, so sockets `f` opens (netlink, /proc/sys/net) belong to it. The
/// thread ends with `f`: a thread that switched namespaces is never reused.
pub fn run_in<T: Send + 'static>(
    pin: &Path,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, LinuxError> {
    let pin = pin.to_path_buf();
    std::thread::spawn(move || {
        let ns = std::fs::File::open(&pin).map_err(sys("open netns", pin.display()))?;
        nix::sched::setns(&ns, CloneFlags::CLONE_NEWNET)
            .map_err(sys("join netns", pin.display()))?;
        Ok(f())
    })
    .join()
    .unwrap_or_else(|_| {
        Err(LinuxError::Sys {
            op: "run in netns",
            object: "thread".into(),
            source: std::io::Error::other("netns thread panicked"),
        })
    })
}
