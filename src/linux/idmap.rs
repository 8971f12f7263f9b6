//! Idmapped mounts (mount_setattr MOUNT_ATTR_IDMAP, Linux 5.12 and later;
//! tmpfs from 6.3): a detached copy of a mount tree whose files, seen through it,
//! have their owners shifted by a user namespace's mappings. This is how a
//! pod with its own user namespace sees image layers owned by root as owned
//! by its own root, with no chown of the layers.
//!
//! Also the probe of what the kernel can idmap, run in a throwaway process
//! (`berth probe-idmap`) so that its scratch mounts live in a private mount
//! namespace and vanish with it.

use super::mountattr::{mount_setattr_at, MountAttr};
use super::{sys, LinuxError};
use rustix::mount::{MoveMountFlags, OpenTreeFlags};
use serde::{Deserialize, Serialize};
use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;

// From <linux/mount.h>; neither libc nor rustix name it.
const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;

/// A detached clone of the mount tree at `source` (only the mount at
/// `source` unless `recursive`), idmapped with `userns`'s mappings. Attach
/// it with [`attach`]; dropped unattached, it is gone.
pub fn idmapped_tree(
    source: &Path,
    userns: BorrowedFd<'_>,
    recursive: bool,
) -> std::io::Result<OwnedFd> {
    let mut flags = OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC;
    if recursive {
        flags |= OpenTreeFlags::AT_RECURSIVE;
    }
    let tree = rustix::mount::open_tree(rustix::fs::CWD, source, flags)?;
    set_idmap(tree.as_fd(), userns, recursive)?;
    Ok(tree)
}

fn set_idmap(tree: BorrowedFd<'_>, userns: BorrowedFd<'_>, recursive: bool) -> std::io::Result<()> {
    let mut flags = libc::AT_EMPTY_PATH as libc::c_uint;
    if recursive {
        flags |= libc::AT_RECURSIVE as libc::c_uint;
    }
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_IDMAP,
        attr_clr: 0,
        propagation: 0,
        userns_fd: userns.as_raw_fd() as u64,
    };
    mount_setattr_at(tree.as_raw_fd(), &CString::default(), flags, &attr)
}

/// Mounts a detached tree on `target`.
pub fn attach(tree: BorrowedFd<'_>, target: &Path) -> std::io::Result<()> {
    rustix::mount::move_mount(
        tree,
        "",
        rustix::fs::CWD,
        target,
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
    )?;
    Ok(())
}

/// Bind-mounts `source` on `target` through an idmapped clone.
pub fn bind_idmapped(
    source: &Path,
    target: &Path,
    userns: BorrowedFd<'_>,
    recursive: bool,
) -> std::io::Result<()> {
    let tree = idmapped_tree(source, userns, recursive)?;
    attach(tree.as_fd(), target)
}

/// What the kernel can idmap here; each `Err` says why not.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Support {
    /// A tmpfs mount.
    pub tmpfs: Result<(), String>,
    /// An overlay whose lower layer is an idmapped mount (how berth builds
    /// a user-namespaced pod's rootfs).
    pub overlay_layers: Result<(), String>,
    /// The filesystem holding berth's layers.
    pub layers_fs: Result<(), String>,
}

impl Support {
    /// Everything a user-namespaced pod needs.
    pub fn all(&self) -> Result<(), String> {
        self.layers_fs
            .clone()
            .map_err(|e| format!("idmapped mounts of the layers' filesystem: {e}"))?;
        self.overlay_layers
            .clone()
            .map_err(|e| format!("overlayfs over idmapped layers: {e}"))?;
        self.tmpfs
            .clone()
            .map_err(|e| format!("idmapped tmpfs: {e}"))
    }
}

/// Runs `exe probe-idmap --dir <layers_dir>` and reads its answer.
pub fn probe_with(exe: &Path, layers_dir: &Path) -> Support {
    let failed = |e: String| Support {
        tmpfs: Err(e.clone()),
        overlay_layers: Err(e.clone()),
        layers_fs: Err(e),
    };
    match std::process::Command::new(exe)
        .arg("probe-idmap")
        .arg("--dir")
        .arg(layers_dir)
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output()
    {
        Ok(out) => serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| failed(format!("probe answered badly: {e}"))),
        Err(e) => failed(format!("run {} probe-idmap: {e}", exe.display())),
    }
}

/// The probe itself: only for a fresh, single-threaded process (it forks,
/// and moves itself to a private mount namespace).
pub fn probe(layers_dir: &Path) -> Result<Support, LinuxError> {
    use nix::mount::{mount, MsFlags};
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
        .map_err(sys("unshare mount namespace", "probe"))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_PRIVATE | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(sys("make mounts private", "probe"))?;
    let userns = scratch_userns()?;
    let ns = userns.as_fd();
    let tmpfs = detached_tmpfs()
        .and_then(|t| set_idmap(t.as_fd(), ns, false))
        .map_err(|e| e.to_string());
    let layers_fs = idmapped_tree(layers_dir, ns, false)
        .map(drop)
        .map_err(|e| format!("{}: {e}", layers_dir.display()));
    let overlay_layers = overlay_probe(ns);
    Ok(Support {
        tmpfs,
        overlay_layers,
        layers_fs,
    })
}

fn detached_tmpfs() -> std::io::Result<OwnedFd> {
    use rustix::mount::{
        fsconfig_create, fsmount, fsopen, FsMountFlags, FsOpenFlags, MountAttrFlags,
    };
    let fs = fsopen("tmpfs", FsOpenFlags::FSOPEN_CLOEXEC)?;
    fsconfig_create(&fs)?;
    Ok(fsmount(
        &fs,
        FsMountFlags::FSMOUNT_CLOEXEC,
        MountAttrFlags::empty(),
    )?)
}

/// An overlay with an idmapped lower layer, all on a scratch tmpfs.
fn overlay_probe(ns: BorrowedFd<'_>) -> Result<(), String> {
    use nix::mount::{mount, MsFlags};
    let scratch = tempdir().map_err(|e| format!("scratch dir: {e}"))?;
    let r = (|| {
        mount(
            Some("tmpfs"),
            &scratch,
            Some("tmpfs"),
            MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|e| format!("tmpfs: {e}"))?;
        for d in ["lower", "idmapped", "upper", "work", "merged"] {
            std::fs::create_dir(scratch.join(d)).map_err(|e| e.to_string())?;
        }
        bind_idmapped(&scratch.join("lower"), &scratch.join("idmapped"), ns, false)
            .map_err(|e| format!("idmap the lower layer: {e}"))?;
        let data = format!(
            "lowerdir={0}/idmapped,upperdir={0}/upper,workdir={0}/work",
            scratch.display()
        );
        mount(
            Some("overlay"),
            &scratch.join("merged"),
            Some("overlay"),
            MsFlags::empty(),
            Some(data.as_str()),
        )
        .map_err(|e| format!("mount overlay: {e}"))
    })();
    // Private mount namespace: detaching the tmpfs takes every probe mount.
    let _ = nix::mount::umount2(&scratch, nix::mount::MntFlags::MNT_DETACH);
    let _ = std::fs::remove_dir(&scratch);
    r
}

fn tempdir() -> std::io::Result<std::path::PathBuf> {
    let p = std::env::temp_dir().join(format!(
        "berth-idmap-probe-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir(&p)?;
    Ok(p)
}

/// A user namespace of its own for the probe, mapping ids nobody uses
/// (the namespace is only a mapping: no process stays in it).
fn scratch_userns() -> Result<OwnedFd, LinuxError> {
    use nix::unistd::{fork, ForkResult};
    let (ready_r, ready_w) = nix::unistd::pipe().map_err(sys("pipe", "probe"))?;
    let (go_r, go_w) = nix::unistd::pipe().map_err(sys("pipe", "probe"))?;
    // SAFETY: the probe process is single-threaded (a fresh `berth
    // probe-idmap`), so the child may run ordinary code; it only unshares,
    // writes, reads and exits.
    match unsafe { fork() }.map_err(sys("fork", "probe"))? {
        ForkResult::Child => {
            drop((ready_r, go_w));
            let ok = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWUSER).is_ok();
            let _ = nix::unistd::write(&ready_w, if ok { b"y" } else { b"n" });
            let _ = nix::unistd::read(&go_r, &mut [0u8; 1]);
            // SAFETY: _exit in a forked child: no destructors, no atexit.
            unsafe { libc::_exit(0) }
        }
        ForkResult::Parent { child } => {
            drop((ready_w, go_r));
            let mut b = [0u8; 1];
            let r = (|| {
                nix::unistd::read(&ready_r, &mut b).map_err(sys("wait for", "probe child"))?;
                if b[0] != b'y' {
                    return Err(sys("unshare user namespace", "probe")(
                        std::io::Error::other("refused"),
                    ));
                }
                let ranges = [(0, 3_000_000_000, 65536)];
                for file in ["uid_map", "gid_map"] {
                    let path = format!("/proc/{child}/{file}");
                    std::fs::write(&path, super::userns::map_text(&ranges))
                        .map_err(sys("write", &path))?;
                }
                let f = std::fs::File::open(format!("/proc/{child}/ns/user"))
                    .map_err(sys("open user namespace of", "probe child"))?;
                Ok(OwnedFd::from(f))
            })();
            drop(go_w);
            let _ = nix::sys::wait::waitpid(child, None);
            r
        }
    }
}
