//! The pod's /dev/shm: one tmpfs per pod, shared by its containers (they
//! share the IPC namespace, so POSIX shared memory must be shared too).

use super::{sys, LinuxError};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use std::path::Path;

/// Mounts a fresh tmpfs at `dir` (created if missing), its root owned by
/// `owner` (uid, gid) when given.
pub fn mount_shm(dir: &Path, size_bytes: u64, owner: Option<(u32, u32)>) -> Result<(), LinuxError> {
    std::fs::create_dir_all(dir).map_err(sys("create shm dir", dir.display()))?;
    let mut data = format!("mode=1777,size={size_bytes}");
    if let Some((uid, gid)) = owner {
        data.push_str(&format!(",uid={uid},gid={gid}"));
    }
    mount(
        Some("shm"),
        dir,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some(data.as_str()),
    )
    .map_err(sys("mount pod shm at", dir.display()))
}

/// Unmounts and removes the pod's shm dir; absent is fine.
pub fn remove_shm(dir: &Path) -> Result<(), LinuxError> {
    match umount2(dir, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
        Err(e) => return Err(sys("unmount pod shm", dir.display())(e)),
    }
    match std::fs::remove_dir(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(sys("remove pod shm dir", dir.display())(e))
        }
        _ => Ok(()),
    }
}
