//! Passing file descriptors over a unix socket (SCM_RIGHTS), for the
//! monitor zygote: the daemon hands it a monitor's stdout pipe and log file.

use super::{sys, LinuxError};
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// Most descriptors one message carries.
const MAX_FDS: usize = 4;

/// Sends `data` and `fds` as one message.
pub fn send(sock: BorrowedFd<'_>, data: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), LinuxError> {
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let cmsg = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage] = if raw.is_empty() { &[] } else { &cmsg };
    sendmsg::<()>(
        sock.as_raw_fd(),
        &[IoSlice::new(data)],
        cmsgs,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .map_err(sys("send on", "monitor socket"))?;
    Ok(())
}

/// Receives one message into `buf`: its length (0 at end of stream) and the
/// descriptors it carried, owned (close-on-exec) from here on.
pub fn recv(sock: BorrowedFd<'_>, buf: &mut [u8]) -> Result<(usize, Vec<OwnedFd>), LinuxError> {
    let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(sys("receive on", "monitor socket"))?;
    let mut fds = Vec::new();
    for c in msg.cmsgs().map_err(sys("receive on", "monitor socket"))? {
        if let ControlMessageOwned::ScmRights(raw) = c {
            for fd in raw {
                // SAFETY: the kernel just installed these descriptors in our
                // table for this message; nothing else refers to them, so
                // taking ownership here is the only owner.
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    Ok((msg.bytes, fds))
}
