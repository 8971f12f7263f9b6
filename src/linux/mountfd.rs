//! Mounts built detached and attached onto a target fd (the new mount API:
//! open_tree / fsopen + fsmount, mount_setattr, move_mount).
//!
//! A mount is prepared completely (filesystem options, read-only, nosuid,
//! propagation, and, for callers that need it, an id mapping) while it is
//! attached nowhere, then moved onto an O_PATH fd that
//! [`super::resolve::open_in_root`] resolved inside the rootfs. No path is
//! looked up between resolving the target and mounting on it, and no mount
//! is ever visible with the wrong flags.

use super::mountattr::set_on_fd;
use rustix::mount::{FsMountFlags, FsOpenFlags, MountAttrFlags, MoveMountFlags, OpenTreeFlags};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

/// A detached copy of the mount tree at `source` (a host path: only the
/// source of a bind, never a container path), with the mounts below it when
/// `recursive` (rbind).
pub fn clone_tree(source: &Path, recursive: bool) -> std::io::Result<OwnedFd> {
    let mut flags = OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC;
    if recursive {
        flags |= OpenTreeFlags::AT_RECURSIVE;
    }
    Ok(rustix::mount::open_tree(rustix::fs::CWD, source, flags)?)
}

/// A detached copy of the mount tree at `fd` (with everything below it).
pub fn clone_tree_at(fd: BorrowedFd<'_>) -> std::io::Result<OwnedFd> {
    let flags = OpenTreeFlags::OPEN_TREE_CLONE
        | OpenTreeFlags::OPEN_TREE_CLOEXEC
        | OpenTreeFlags::AT_EMPTY_PATH
        | OpenTreeFlags::AT_RECURSIVE;
    Ok(rustix::mount::open_tree(fd, "", flags)?)
}

/// A new, detached mount of a `fstype` filesystem. `options` are the
/// filesystem's own ("mode=755", "newinstance"), given one by one to
/// fsconfig; `attrs` are the mount's flags (read-only, nosuid...).
pub fn new_fs(
    fstype: &str,
    source: &str,
    options: &[String],
    attrs: MountAttrFlags,
) -> std::io::Result<OwnedFd> {
    let fs = rustix::mount::fsopen(fstype, FsOpenFlags::FSOPEN_CLOEXEC)?;
    if !source.is_empty() {
        rustix::mount::fsconfig_set_string(&fs, "source", source)?;
    }
    for o in options {
        match o.split_once('=') {
            Some((k, v)) => rustix::mount::fsconfig_set_string(&fs, k, v),
            None => rustix::mount::fsconfig_set_flag(&fs, o.as_str()),
        }
        .map_err(|e| std::io::Error::other(format!("option {o:?}: {e}")))?;
    }
    rustix::mount::fsconfig_create(&fs)?;
    Ok(rustix::mount::fsmount(
        &fs,
        FsMountFlags::FSMOUNT_CLOEXEC,
        attrs,
    )?)
}

/// Sets `attrs` on the detached mount `tree` (and the mounts below it
/// when `recursive`).
pub fn set_attrs(tree: &OwnedFd, attrs: MountAttrFlags, recursive: bool) -> std::io::Result<()> {
    // The atime mode is a field, not a bit: clear the field when setting it.
    let clear = if attrs.intersects(MountAttrFlags::MOUNT_ATTR__ATIME) {
        MountAttrFlags::MOUNT_ATTR__ATIME.bits() as u64
    } else {
        0
    };
    set_on_fd(tree.as_fd(), attrs.bits() as u64, clear, 0, recursive)
}

/// Sets the propagation (`MS_SHARED`, `MS_SLAVE` or `MS_PRIVATE`) of `tree`.
pub fn set_propagation(tree: &OwnedFd, propagation: u64, recursive: bool) -> std::io::Result<()> {
    set_on_fd(tree.as_fd(), 0, 0, propagation, recursive)
}

/// Attaches the detached mount `tree` on top of whatever `target` (an
/// O_PATH fd) refers to.
pub fn attach(tree: &OwnedFd, target: &OwnedFd) -> std::io::Result<()> {
    Ok(rustix::mount::move_mount(
        tree,
        "",
        target,
        "",
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH | MoveMountFlags::MOVE_MOUNT_T_EMPTY_PATH,
    )?)
}
