//! Namespaced sysctls, written from a short-lived thread that joins the
//! pod's network and IPC namespaces: /proc/sys/net/* and the IPC sysctls
//! answer for the namespaces of the thread that opens them.

use super::{sys, LinuxError};
use std::path::{Path, PathBuf};

/// Which namespace a sysctl belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Net,
    Ipc,
}

/// The namespace a sysctl lives in, or `None` for node-wide ones.
pub fn kind(name: &str) -> Option<Kind> {
    if name.starts_with("net.") {
        return Some(Kind::Net);
    }
    let ipc = [
        "kernel.shmmax",
        "kernel.shmall",
        "kernel.shmmni",
        "kernel.shm_rmid_forced",
    ]
    .contains(&name)
        || name.starts_with("kernel.msg")
        || name == "kernel.sem"
        || name.starts_with("fs.mqueue.");
    ipc.then_some(Kind::Ipc)
}

/// /proc/sys path of a dotted name (a '/' in a part stands for a '.', as
/// kubelet writes interface names like "eth0.100").
pub fn path_of(name: &str) -> PathBuf {
    let mut p = PathBuf::from("/proc/sys");
    for part in name.split('.') {
        p.push(part.replace('/', "."));
    }
    p
}

/// Writes `values` with the thread in the namespaces given (each a
/// /proc/<pid>/ns/* file or a pin).
pub fn apply(
    netns: Option<&Path>,
    ipcns: Option<&Path>,
    values: &[(String, String)],
) -> Result<(), LinuxError> {
    let netns = netns.map(Path::to_path_buf);
    let ipcns = ipcns.map(Path::to_path_buf);
    let values = values.to_vec();
    // A thread of its own: it leaves with the namespaces, no other thread of
    // the daemon ever runs in them.
    std::thread::spawn(move || -> Result<(), LinuxError> {
        // Its own filesystem context, so joining affects nothing shared.
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_FS)
            .map_err(sys("unshare fs for sysctls in", "pod"))?;
        for (path, flag) in [
            (&netns, nix::sched::CloneFlags::CLONE_NEWNET),
            (&ipcns, nix::sched::CloneFlags::CLONE_NEWIPC),
        ] {
            if let Some(p) = path {
                super::init::join_namespace(p, flag)?;
            }
        }
        for (name, value) in &values {
            let p = path_of(name);
            std::fs::write(&p, value).map_err(sys("set sysctl", format!("{name}={value}")))?;
        }
        Ok(())
    })
    .join()
    .map_err(|_| {
        sys("set sysctls in", "pod")(std::io::Error::other("the sysctl thread panicked"))
    })?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_and_paths() {
        assert_eq!(kind("net.ipv4.ip_forward"), Some(Kind::Net));
        assert_eq!(kind("kernel.shmmax"), Some(Kind::Ipc));
        assert_eq!(kind("kernel.msgmax"), Some(Kind::Ipc));
        assert_eq!(kind("fs.mqueue.msg_max"), Some(Kind::Ipc));
        assert_eq!(kind("kernel.sem"), Some(Kind::Ipc));
        assert_eq!(kind("vm.swappiness"), None);
        assert_eq!(kind("kernel.hostname"), None);
        assert_eq!(
            path_of("net.ipv4.conf.eth0/100.rp_filter"),
            Path::new("/proc/sys/net/ipv4/conf/eth0.100/rp_filter")
        );
    }
}
