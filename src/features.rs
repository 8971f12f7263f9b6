//! What this runtime can do on this kernel, probed once at startup and read
//! by RuntimeService.Status (per runtime handler) and by the pod manager,
//! which refuses what the kernel cannot do.

use std::path::Path;

#[derive(Debug, Clone)]
pub struct RuntimeFeatures {
    /// Pods with their own user namespace (hostUsers: false): `Err` says why not.
    pub user_namespaces: Result<(), String>,
    /// A pod may have its own user namespace and the host's network. berth
    /// refuses it: a network namespace owned by the host's user namespace
    /// cannot be joined by the pod's root, and giving it the host's network
    /// would defeat the isolation kubelet asked for.
    pub user_namespaces_host_network: bool,
}

impl RuntimeFeatures {
    /// Probes with berth's own binary `exe`; `layers_dir` holds the
    /// unpacked image layers (their filesystem must take idmapped mounts).
    pub fn probe(exe: &Path, layers_dir: &Path) -> RuntimeFeatures {
        let support = crate::linux::idmap::probe_with(exe, layers_dir);
        let user_namespaces = if std::fs::read_to_string("/proc/sys/user/max_user_namespaces")
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0)
            == 0
        {
            Err("user.max_user_namespaces is 0".into())
        } else {
            support.all()
        };
        if let Err(e) = &user_namespaces {
            tracing::warn!(reason = %e, "pods with their own user namespace (hostUsers: false) are not available");
        }
        RuntimeFeatures {
            user_namespaces,
            user_namespaces_host_network: false,
        }
    }
}
