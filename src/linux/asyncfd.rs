//! Registration of owned fds (pipes, ptys, pidfds) with tokio's reactor.

use std::os::fd::OwnedFd;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// Makes `fd` non-blocking and registers it with the current runtime.
pub fn register(fd: OwnedFd, interest: Interest) -> std::io::Result<AsyncFd<OwnedFd>> {
    rustix::io::ioctl_fionbio(&fd, true)?;
    // SAFETY: the AsyncFd owns the OwnedFd, which stays open (and its
    // as_raw_fd unchanged) until the AsyncFd drops it; nothing else can
    // close or replace that number meanwhile.
    unsafe { AsyncFd::register_with_interest(fd, interest) }.map_err(|e| e.into_parts().1)
}
