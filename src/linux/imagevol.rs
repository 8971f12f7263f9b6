//! Image volumes on the host side: an image's unpacked layers mounted
//! read-only (overlayfs with lower layers only, or a bind of a single layer),
//! optionally narrowed to a sub path resolved inside the image, so that the
//! container init sees nothing but an ordinary bind mount source.
//!
//! All through safe nix/rustix calls: no `unsafe` here.

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use rustix::fs::{Mode, OFlags, ResolveFlags};
use rustix::mount::{FsMountFlags, FsOpenFlags, MountAttrFlags, MoveMountFlags};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ImageVolError {
    #[error("image_sub_path {sub:?} does not exist in the image")]
    MissingSubPath { sub: String },
    #[error("image_sub_path {sub:?} escapes the image (through \"..\" or a symlink)")]
    EscapingSubPath { sub: String },
    #[error("{op} {path}: {source}")]
    Sys {
        op: &'static str,
        path: String,
        source: std::io::Error,
    },
}

fn sys<'a, E: Into<std::io::Error>>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(E) -> ImageVolError + 'a {
    move |e| ImageVolError::Sys {
        op,
        path: path.display().to_string(),
        source: e.into(),
    }
}

/// Whether `sub` may be looked up at all: relative, no `..` component.
/// (Symlinks that leave the image are caught when it is resolved.)
pub fn sub_path_is_plain(sub: &str) -> bool {
    let p = Path::new(sub);
    !p.is_absolute()
        && p.components().all(|c| {
            matches!(
                c,
                std::path::Component::Normal(_) | std::path::Component::CurDir
            )
        })
}

/// Mounts the image whose layer directories are `layers` (top-most first)
/// read-only at `target` (which must not exist), or only its `sub` path
/// when that is not empty. On error nothing stays mounted or created.
pub fn mount_image(layers: &[PathBuf], sub: &str, target: &Path) -> Result<(), ImageVolError> {
    let sub = sub.trim_end_matches('/');
    if sub.is_empty() {
        std::fs::create_dir(target).map_err(sys("create directory", target))?;
        return mount_layers(layers, target).inspect_err(|_| {
            let _ = std::fs::remove_dir(target);
        });
    }
    // The whole image goes to a staging point next to the target, the sub
    // path is bound from there, then the staging mount is detached.
    let mut staging = target.as_os_str().to_owned();
    staging.push(".image");
    let staging = PathBuf::from(staging);
    std::fs::create_dir(&staging).map_err(sys("create directory", &staging))?;
    let res = mount_layers(layers, &staging).and_then(|()| {
        let r = bind_sub_path(&staging, sub, target);
        let _ = umount2(&staging, MntFlags::MNT_DETACH);
        r
    });
    let _ = std::fs::remove_dir(&staging);
    res
}

const RO: MsFlags = MsFlags::MS_RDONLY
    .union(MsFlags::MS_NODEV)
    .union(MsFlags::MS_NOSUID);

fn mount_layers(layers: &[PathBuf], at: &Path) -> Result<(), ImageVolError> {
    match layers {
        [] => Err(ImageVolError::Sys {
            op: "mount image",
            path: at.display().to_string(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "no layers"),
        }),
        // overlayfs wants two lower layers when it has no upper one.
        [only] => bind_readonly(only, at),
        _ => mount_overlay(layers, at),
    }
}

fn bind_readonly(source: &Path, at: &Path) -> Result<(), ImageVolError> {
    mount(
        Some(source),
        at,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(sys("bind mount", at))?;
    mount(
        None::<&str>,
        at,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | RO,
        None::<&str>,
    )
    .map_err(|e| {
        let _ = umount2(at, MntFlags::MNT_DETACH);
        sys("remount read-only", at)(e)
    })
}

/// overlayfs through fsopen/fsconfig: one "lowerdir+" per layer (Linux 6.8)
/// has no limit on the number of layers, unlike the one-page option string
/// of mount(2).
fn mount_overlay(layers: &[PathBuf], at: &Path) -> Result<(), ImageVolError> {
    let fs = rustix::mount::fsopen("overlay", FsOpenFlags::FSOPEN_CLOEXEC)
        .map_err(sys("fsopen overlay for", at))?;
    for l in layers {
        rustix::mount::fsconfig_set_string(&fs, "lowerdir+", l.as_path())
            .map_err(sys("overlay lowerdir+", l))?;
    }
    rustix::mount::fsconfig_create(&fs).map_err(sys("create overlay for", at))?;
    let mnt = rustix::mount::fsmount(
        &fs,
        FsMountFlags::FSMOUNT_CLOEXEC,
        MountAttrFlags::MOUNT_ATTR_RDONLY
            | MountAttrFlags::MOUNT_ATTR_NODEV
            | MountAttrFlags::MOUNT_ATTR_NOSUID,
    )
    .map_err(sys("fsmount overlay for", at))?;
    rustix::mount::move_mount(
        &mnt,
        "",
        rustix::fs::CWD,
        at,
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
    )
    .map_err(sys("move_mount overlay to", at))
}

/// Binds `sub`, resolved beneath `root` (no `..` above it, no symlink
/// leaving it, no magic links), read-only at `target`. RESOLVE_BENEATH
/// rather than RESOLVE_IN_ROOT: like kubelet's subPath checks, a path that
/// would leave the volume is an error, not silently clamped to its root.
fn bind_sub_path(root: &Path, sub: &str, target: &Path) -> Result<(), ImageVolError> {
    let dir = rustix::fs::open(
        root,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(sys("open", root))?;
    let fd = rustix::fs::openat2(
        &dir,
        sub,
        OFlags::PATH | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS,
    )
    .map_err(|e| match e {
        rustix::io::Errno::NOENT | rustix::io::Errno::NOTDIR => ImageVolError::MissingSubPath {
            sub: sub.to_string(),
        },
        rustix::io::Errno::XDEV | rustix::io::Errno::LOOP => ImageVolError::EscapingSubPath {
            sub: sub.to_string(),
        },
        e => sys("resolve image_sub_path in", root)(e),
    })?;
    let is_dir = rustix::fs::fstat(&fd)
        .map_err(sys("stat image_sub_path in", root))?
        .st_mode
        & libc::S_IFMT
        == libc::S_IFDIR;
    if is_dir {
        std::fs::create_dir(target).map_err(sys("create directory", target))?;
    } else {
        std::fs::File::create_new(target).map_err(sys("create file", target))?;
    }
    // The fd's /proc magic link names exactly the inode resolved above; the
    // path is never looked up again.
    let src = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
    bind_readonly(&src, target).inspect_err(|_| {
        let _ = std::fs::remove_dir(target).or_else(|_| std::fs::remove_file(target));
    })
}

/// Mount points at or below `dir` in this mount namespace, deepest (and,
/// on one point, latest) first: the order to unmount them in.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|mp| PathBuf::from(super::mountattr::unescape(mp)))
        .filter(|mp| mp.starts_with(dir))
        .collect();
    found.reverse();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found
}

/// Detaches every mount at or below `dir`. Errors name the first mount
/// that could not go; the caller must then keep the directory.
pub fn unmount_all_under(dir: &Path) -> Result<(), ImageVolError> {
    for mp in mounts_under(dir) {
        match umount2(&mp, MntFlags::MNT_DETACH) {
            Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
            Err(e) => return Err(sys("unmount", &mp)(e)),
        }
    }
    Ok(())
}

/// Whether `path` is the root of a mount (so a usage walk does not count
/// another filesystem's content, bind mounts of the same one included).
pub fn is_mount_root(path: &Path) -> bool {
    use rustix::fs::{AtFlags, StatxAttributes, StatxFlags};
    rustix::fs::statx(
        rustix::fs::CWD,
        path,
        AtFlags::SYMLINK_NOFOLLOW,
        StatxFlags::BASIC_STATS,
    )
    .is_ok_and(|st| {
        st.stx_attributes_mask.contains(StatxAttributes::MOUNT_ROOT)
            && st.stx_attributes.contains(StatxAttributes::MOUNT_ROOT)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_sub_paths() {
        assert!(sub_path_is_plain("data/sub"));
        assert!(sub_path_is_plain("./data"));
        assert!(!sub_path_is_plain("/data"));
        assert!(!sub_path_is_plain("data/../.."));
        assert!(!sub_path_is_plain(".."));
    }

    #[test]
    fn proc_is_a_mount_root_and_its_files_are_not() {
        assert!(is_mount_root(Path::new("/proc")));
        assert!(!is_mount_root(Path::new("/proc/self/status")));
    }
}
