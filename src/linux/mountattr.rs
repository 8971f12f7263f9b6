//! Mount attributes: recursive read-only bind mounts (mount_setattr(2),
//! Linux >= 5.12) and finding the mount that holds a path.
//!
//! mount_setattr is called by hand: neither rustix nor nix wraps it.

use std::ffi::CString;
use std::path::{Path, PathBuf};

// From <linux/mount.h>; the libc crate has the syscall number only.
const AT_RECURSIVE: libc::c_uint = 0x8000;

#[repr(C)]
pub(super) struct MountAttr {
    pub attr_set: u64,
    pub attr_clr: u64,
    pub propagation: u64,
    pub userns_fd: u64,
}

fn mount_setattr(path: &CString, flags: libc::c_uint, attr: &MountAttr) -> std::io::Result<()> {
    mount_setattr_at(libc::AT_FDCWD, path, flags, attr)
}

/// mount_setattr(2) on `path` relative to `dirfd` (AT_EMPTY_PATH in `flags`
/// with an empty path: the mount `dirfd` itself, e.g. a detached tree).
pub(super) fn mount_setattr_at(
    dirfd: std::os::fd::RawFd,
    path: &CString,
    flags: libc::c_uint,
    attr: &MountAttr,
) -> std::io::Result<()> {
    // SAFETY: a NUL-terminated path and a live mount_attr of the size given;
    // the kernel only reads them. `dirfd` is AT_FDCWD or an fd the caller
    // borrows for the duration of the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            dirfd,
            path.as_ptr(),
            flags,
            attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Whether the kernel has mount_setattr (recursive read-only mounts).
pub fn recursive_readonly_supported() -> bool {
    let empty = CString::default();
    let attr = MountAttr {
        attr_set: 0,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    // An empty path without AT_EMPTY_PATH is ENOENT where the call exists.
    !matches!(
        mount_setattr(&empty, 0, &attr).map_err(|e| e.raw_os_error()),
        Err(Some(libc::ENOSYS))
    )
}

/// Sets (`set`) and clears (`clear`) MOUNT_ATTR_* flags and, when
/// `propagation` is not 0, the propagation type (MS_SHARED, MS_SLAVE,
/// MS_PRIVATE) of the mount `fd` refers to (attached or detached, as
/// open_tree or fsmount return it), and of all mounts below it when
/// `recursive`.
pub fn set_on_fd(
    fd: std::os::fd::BorrowedFd<'_>,
    set: u64,
    clear: u64,
    propagation: u64,
    recursive: bool,
) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let attr = MountAttr {
        attr_set: set,
        attr_clr: clear,
        propagation,
        userns_fd: 0,
    };
    let mut flags = libc::AT_EMPTY_PATH as libc::c_uint;
    if recursive {
        flags |= AT_RECURSIVE;
    }
    mount_setattr_at(fd.as_raw_fd(), &CString::default(), flags, &attr)
}

/// The mount point (in this process's mount namespace) holding `path`.
pub fn mount_point_of(path: &Path) -> std::io::Result<PathBuf> {
    Ok(mount_of(path)?.0)
}

/// How the mount holding `path` propagates: (shared, slave).
pub fn propagation_of(path: &Path) -> std::io::Result<(bool, bool)> {
    let (_, line) = mount_of(path)?;
    // Optional fields ("shared:N", "master:N") sit between field 6 and "-".
    let fields: Vec<&str> = line.split(' ').skip(6).take_while(|f| *f != "-").collect();
    Ok((
        fields.iter().any(|f| f.starts_with("shared:")),
        fields.iter().any(|f| f.starts_with("master:")),
    ))
}

/// The mount point holding `path` and its mountinfo line (the last mounted
/// on the longest matching mount point: the one on top).
fn mount_of(path: &Path) -> std::io::Result<(PathBuf, String)> {
    let path = std::fs::canonicalize(path)?;
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    let mut best = (PathBuf::from("/"), String::new());
    for line in info.lines() {
        let Some(mp) = line.split(' ').nth(4) else {
            continue;
        };
        let mp = PathBuf::from(unescape(mp));
        if path.starts_with(&mp) && mp.components().count() >= best.0.components().count() {
            best = (mp, line.to_string());
        }
    }
    Ok(best)
}

/// mountinfo escapes space, tab, newline and backslash as \ooo.
pub(crate) fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            let digits = std::str::from_utf8(&b[i + 1..i + 4]).unwrap_or("");
            if let Ok(v) = u8::from_str_radix(digits, 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape("/a\\040b"), "/a b");
        assert_eq!(unescape("/plain"), "/plain");
    }

    #[test]
    fn root_holds_everything() {
        assert!(mount_point_of(Path::new("/proc/self"))
            .unwrap()
            .starts_with("/"));
        assert!(recursive_readonly_supported() || !Path::new("/proc").exists());
    }
}
