//! Resolving a path inside a container's rootfs the way the container would
//! see it, by file descriptor, so that no symlink, `..` chain or swap made
//! between a check and a mount can redirect anything to the host.
//!
//! openat2(RESOLVE_IN_ROOT) treats the rootfs fd as `/` for every step of the
//! walk (absolute symlinks and `..` stop there), and RESOLVE_NO_MAGICLINKS
//! refuses /proc/<pid>/fd-style jumps out of it. RESOLVE_NO_XDEV is *not*
//! set: mount targets routinely sit below other mounts of the container
//! (/dev/pts in the /dev tmpfs, a volume inside a volume), and crossing a
//! mount cannot leave the root, which IN_ROOT already guarantees.
//!
//! Missing components are created relative to the fd of their resolved
//! parent, never by path. The result is an O_PATH fd to mount onto.

use rustix::fs::{Mode, OFlags, ResolveFlags};
use rustix::io::Errno;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

/// What to create when the path does not exist yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Create {
    /// Nothing: a missing path is an error (ENOENT).
    Nothing,
    /// An empty regular file (a bind target for a file), parents as dirs.
    File,
    /// A directory, parents included.
    Dir,
}

/// How many dangling symlinks one resolution may follow (as the kernel's
/// MAXSYMLINKS).
const MAX_LINKS: usize = 40;

const RESOLVE: ResolveFlags = ResolveFlags::IN_ROOT.union(ResolveFlags::NO_MAGICLINKS);

/// An O_PATH fd for `path` resolved inside `root` (an fd of the rootfs
/// directory), creating it as `create` says when it is missing. A dangling
/// symlink on the way is followed inside the root, and what it names is
/// created there.
pub fn open_in_root(root: BorrowedFd<'_>, path: &Path, create: Create) -> std::io::Result<OwnedFd> {
    let mut links = 0;
    open_rel(root, &relative(path), create, &mut links)
}

/// `path` as a relative path from the root; `..` stays (IN_ROOT clamps it).
fn relative(path: &Path) -> PathBuf {
    path.components()
        .filter(|c| !matches!(c, Component::RootDir | Component::CurDir))
        .collect()
}

fn open_path(root: BorrowedFd<'_>, rel: &Path) -> rustix::io::Result<OwnedFd> {
    let rel = if rel.as_os_str().is_empty() {
        Path::new(".")
    } else {
        rel
    };
    rustix::fs::openat2(
        root,
        rel,
        OFlags::PATH | OFlags::CLOEXEC,
        Mode::empty(),
        RESOLVE,
    )
}

fn open_rel(
    root: BorrowedFd<'_>,
    rel: &Path,
    create: Create,
    links: &mut usize,
) -> std::io::Result<OwnedFd> {
    match open_path(root, rel) {
        Err(Errno::NOENT) if create != Create::Nothing => {}
        // EAGAIN: a rename elsewhere in the filesystem during the walk;
        // the kernel asks to retry rather than risk a wrong answer.
        Err(Errno::AGAIN) => return open_rel(root, rel, create, links),
        other => return other.map_err(Into::into),
    }
    let (Some(parent), Some(name)) = (rel.parent(), rel.file_name()) else {
        // `..` at the end, or the root itself: nothing to create.
        return Err(Errno::NOENT.into());
    };
    let dir = open_rel(root, parent, Create::Dir, links)?;
    let made = match create {
        Create::Dir => rustix::fs::mkdirat(&dir, name, Mode::from_raw_mode(0o755)),
        _ => rustix::fs::openat(
            &dir,
            name,
            OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o644),
        )
        .map(drop),
    };
    match made {
        Ok(()) | Err(Errno::EXIST) => {}
        Err(e) => return Err(e.into()),
    }
    match open_path(root, rel) {
        Err(Errno::NOENT) => {}
        other => return other.map_err(Into::into),
    }
    // Still missing although `name` exists in its parent: a dangling
    // symlink. Create what it names, resolved inside the root as well.
    *links += 1;
    if *links > MAX_LINKS {
        return Err(Errno::LOOP.into());
    }
    let target = rustix::fs::readlinkat(&dir, name, Vec::new())?;
    let target = PathBuf::from(
        <std::ffi::OsString as std::os::unix::ffi::OsStringExt>::from_vec(target.into_bytes()),
    );
    let next = if target.is_absolute() {
        relative(&target)
    } else {
        parent.join(target)
    };
    open_rel(root, &next, create, links)
}

/// Whether an O_PATH fd names a directory.
pub fn is_dir(fd: impl AsFd) -> std::io::Result<bool> {
    let st = rustix::fs::fstat(fd)?;
    Ok(rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Directory)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn root_fd(dir: &Path) -> OwnedFd {
        rustix::fs::open(dir, OFlags::PATH | OFlags::DIRECTORY, Mode::empty()).unwrap()
    }

    /// A file outside the root the symlinks point at by absolute path.
    fn outside() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("secret"), "host\n").unwrap();
        d
    }

    #[test]
    fn symlinks_and_dotdot_stay_inside() {
        let host = outside();
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        std::fs::create_dir(r.join("etc")).unwrap();
        symlink(host.path(), r.join("etc/up")).unwrap();
        symlink("../../../../..", r.join("etc/dots")).unwrap();
        symlink(host.path().join("secret"), r.join("etc/hosts")).unwrap();
        let fd = root_fd(r);

        // Absolute link to a host dir: created inside the root instead.
        let got = open_in_root(fd.as_fd(), Path::new("/etc/up/vol"), Create::Dir).unwrap();
        assert!(is_dir(&got).unwrap());
        assert!(r
            .join(host.path().strip_prefix("/").unwrap())
            .join("vol")
            .is_dir());
        assert!(!host.path().join("vol").exists());

        // `..` chains end at the root.
        let got = open_in_root(fd.as_fd(), Path::new("etc/dots/../x"), Create::Dir).unwrap();
        assert_eq!(
            rustix::fs::fstat(&got).unwrap().st_ino,
            std::fs::metadata(r.join("x"))
                .map(|m| {
                    use std::os::unix::fs::MetadataExt;
                    m.ino()
                })
                .unwrap()
        );

        // A dangling absolute file link: its target made inside the root.
        open_in_root(fd.as_fd(), Path::new("/etc/hosts"), Create::File).unwrap();
        let inside = r
            .join(host.path().strip_prefix("/").unwrap())
            .join("secret");
        assert!(inside.is_file());
        assert_eq!(
            std::fs::read_to_string(host.path().join("secret")).unwrap(),
            "host\n"
        );

        // Missing without create is an error, not a creation.
        let e = open_in_root(fd.as_fd(), Path::new("/nope/x"), Create::Nothing).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
        assert!(!r.join("nope").exists());
    }

    #[test]
    fn magic_links_and_loops_are_refused() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        symlink("/proc/self/root", r.join("magic")).unwrap();
        symlink("a", r.join("b")).unwrap();
        symlink("b", r.join("a")).unwrap();
        let fd = root_fd(r);
        // /proc does not exist inside this root: no way to the host's.
        assert!(open_in_root(fd.as_fd(), Path::new("magic/etc"), Create::Nothing).is_err());
        let e = open_in_root(fd.as_fd(), Path::new("a/x"), Create::Dir).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ELOOP));
    }
}
