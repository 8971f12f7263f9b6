//! A container's overlay rootfs mounted in berth's own mount namespace, for
//! external OCI runtimes, which take the bundle's root as a ready directory
//! (berth's own init mounts it inside the container's namespace instead).

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use std::path::Path;

/// Mounts the overlay of `lowers` (directory names under `layers_dir`,
/// top-most first) with `upper`/`work` at `target`. Changes the working
/// directory to `layers_dir`, so that the relative lower names keep the
/// option string short: only for single-threaded callers (the monitor).
pub fn mount_overlay(
    layers_dir: &Path,
    lowers: &[String],
    upper: &Path,
    work: &Path,
    target: &Path,
) -> Result<(), String> {
    nix::unistd::chdir(layers_dir).map_err(|e| format!("chdir {}: {e}", layers_dir.display()))?;
    let data = format!(
        "lowerdir={},upperdir={},workdir={}",
        lowers.join(":"),
        upper.display(),
        work.display()
    );
    mount(
        Some("overlay"),
        target,
        Some("overlay"),
        MsFlags::empty(),
        Some(data.as_str()),
    )
    .map_err(|e| format!("mount overlay rootfs at {}: {e}", target.display()))
}

/// Detaches whatever is mounted at `target`; nothing mounted is fine.
pub fn unmount(target: &Path) -> Result<(), String> {
    loop {
        match umount2(target, MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW) {
            Ok(()) => continue,
            Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOENT) => return Ok(()),
            Err(e) => return Err(format!("unmount {}: {e}", target.display())),
        }
    }
}
