//! Ptys for exec'd commands: allocated in the container's own devpts, so the
//! command sees /dev/pts/N of its container, like its init's console.

use super::{sys, LinuxError};
use rustix::fs::{Mode, OFlags, ResolveFlags};
use rustix::pty::OpenptFlags;
use std::os::fd::OwnedFd;

/// devpts' f_type (DEVPTS_SUPER_MAGIC).
const DEVPTS_MAGIC: i64 = 0x1cd1;

/// A pty of the container of `pid`: (master, slave). The slave belongs to
/// `uid`:`gid` so the command can reopen its terminal.
pub fn open_in(pid: i32, uid: u32, gid: u32) -> Result<(OwnedFd, OwnedFd), LinuxError> {
    let object = format!("container process {pid}");
    let root = rustix::fs::open(
        format!("/proc/{pid}/root"),
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(sys("pty: open the root of", &object))?;
    // Resolved inside the container's root: its symlinks cannot lead to the
    // host's devpts or anything else of the host.
    let master = rustix::fs::openat2(
        &root,
        "dev/pts/ptmx",
        OFlags::RDWR | OFlags::NOCTTY | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
    )
    .map_err(sys("pty: open /dev/pts/ptmx of", &object))?;
    let fs = rustix::fs::fstatfs(&master).map_err(sys("pty: statfs /dev/pts/ptmx of", &object))?;
    if fs.f_type as i64 != DEVPTS_MAGIC {
        return Err(sys("pty: open /dev/pts/ptmx of", &object)(
            std::io::Error::other("not on a devpts file system"),
        ));
    }
    rustix::pty::unlockpt(&master).map_err(sys("pty: unlockpt in", &object))?;
    let slave = rustix::pty::ioctl_tiocgptpeer(
        &master,
        OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC,
    )
    .map_err(sys("pty: open the slave in", &object))?;
    rustix::fs::fchown(
        &slave,
        Some(rustix::fs::Uid::from_raw(uid)),
        Some(rustix::fs::Gid::from_raw(gid)),
    )
    .map_err(sys("pty: chown the slave in", &object))?;
    Ok((master, slave))
}

/// Sets the window size of the pty whose master is `master`.
pub fn resize(master: &OwnedFd, cols: u16, rows: u16) -> Result<(), LinuxError> {
    rustix::termios::tcsetwinsize(
        master,
        rustix::termios::Winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        },
    )
    .map_err(sys("pty: set the window size of", "an exec pty"))
}
