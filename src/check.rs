//! `berth check`: what this host offers berth, one line per item.

use std::path::{Path, PathBuf};

pub struct Item {
    pub name: &'static str,
    pub ok: bool,
    /// Needed to run pods; a failed optional item is a warning.
    pub required: bool,
    pub detail: String,
    pub hint: &'static str,
}

/// Finds the cgroup2 mount point from /proc/self/mountinfo (hybrid hosts mount
/// it at /sys/fs/cgroup/unified).
pub fn cgroup2_mount() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        if post.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        pre.split_whitespace().nth(4).map(PathBuf::from)
    })
}

fn kernel_version() -> (String, (u32, u32)) {
    let release = rustix::system::uname()
        .release()
        .to_string_lossy()
        .into_owned();
    let mut nums = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|s| s.parse::<u32>().ok());
    let v = (nums.next().unwrap_or(0), nums.next().unwrap_or(0));
    (release, v)
}

fn read(p: &str) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

fn in_path(bin: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(bin))
            .find(|p| p.is_file())
    })
}

pub fn run_checks() -> Vec<Item> {
    let mut items = Vec::new();
    let (release, (major, minor)) = kernel_version();
    items.push(Item {
        name: "kernel",
        ok: (major, minor) >= (5, 10),
        required: true,
        detail: release,
        hint: "berth needs Linux 5.10 or newer (6.3+ for idmapped tmpfs/user-namespaced pods)",
    });
    match cgroup2_mount() {
        Some(m) => {
            let ctrls = read(&m.join("cgroup.controllers").to_string_lossy());
            let ctrls = ctrls.trim().to_string();
            let wanted = ["cpu", "memory", "pids"];
            let missing: Vec<&str> = wanted
                .iter()
                .copied()
                .filter(|c| !ctrls.split_whitespace().any(|x| x == *c))
                .collect();
            items.push(Item {
                name: "cgroup v2",
                ok: true,
                required: true,
                detail: format!("mounted at {}", m.display()),
                hint: "",
            });
            items.push(Item {
                name: "cgroup v2 controllers",
                ok: missing.is_empty(),
                required: true,
                detail: if ctrls.is_empty() {
                    "none available".to_string()
                } else {
                    format!("available: {ctrls}")
                },
                hint: "limits need cpu, memory and pids on the cgroup2 root (boot with systemd.unified_cgroup_hierarchy=1 or cgroup_no_v1=all); development hosts may set cgroup.allow_missing_controllers",
            });
        }
        None => items.push(Item {
            name: "cgroup v2",
            ok: false,
            required: true,
            detail: "no cgroup2 mount in /proc/self/mountinfo".into(),
            hint: "mount cgroup2 (mount -t cgroup2 none /sys/fs/cgroup)",
        }),
    }
    items.push(device_policy_item(cgroup2_mount().as_deref()));
    let fs = read("/proc/filesystems");
    let overlay = fs.lines().any(|l| l.trim_end().ends_with("overlay"));
    items.push(Item {
        name: "overlayfs",
        ok: overlay || Path::new("/sys/module/overlay").exists(),
        required: true,
        detail: if overlay {
            "available".into()
        } else {
            "not in /proc/filesystems".into()
        },
        hint: "modprobe overlay",
    });
    let max_userns = read("/proc/sys/user/max_user_namespaces")
        .trim()
        .parse::<u64>()
        .unwrap_or(0);
    items.push(Item {
        name: "user namespaces",
        ok: max_userns > 0,
        required: false,
        detail: format!("max_user_namespaces={max_userns}"),
        hint: "sysctl user.max_user_namespaces=15000 (needed for pods with hostUsers: false)",
    });
    if let Ok(exe) = std::env::current_exe() {
        let s = crate::linux::idmap::probe_with(&exe, &std::env::temp_dir());
        for (name, r) in [
            ("idmapped mounts: tmpfs", &s.tmpfs),
            ("idmapped mounts: overlayfs layers", &s.overlay_layers),
        ] {
            items.push(Item {
                name,
                ok: r.is_ok(),
                required: false,
                detail: match r {
                    Ok(()) => "supported".into(),
                    Err(e) => e.clone(),
                },
                hint: "pods with hostUsers: false need Linux 6.3+ (idmapped tmpfs, overlayfs over idmapped layers)",
            });
        }
    }
    let module =
        Path::new("/sys/module/nf_tables").exists() || read("/proc/modules").contains("nf_tables");
    // A kernel with nf_tables built in shows no module: a read-only listing
    // through nft proves it works.
    let listed = !module
        && in_path("nft").is_some_and(|nft| {
            std::process::Command::new(nft)
                .args(["list", "tables"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        });
    let nft = module || listed;
    items.push(Item {
        name: "nftables",
        ok: nft,
        required: false,
        detail: if module {
            "nf_tables loaded".into()
        } else if listed {
            "nf_tables available (nft list tables works)".into()
        } else {
            "nf_tables module not loaded".into()
        },
        hint: "modprobe nf_tables (needed for host ports and egress NAT)",
    });
    let status = read("/proc/self/status");
    let seccomp = status.lines().any(|l| l.starts_with("Seccomp:"));
    items.push(Item {
        name: "seccomp",
        ok: seccomp,
        required: true,
        detail: if seccomp {
            "supported".into()
        } else {
            "no Seccomp field in /proc/self/status".into()
        },
        hint: "a kernel built with CONFIG_SECCOMP_FILTER",
    });
    // The built-in network writes its NAT and host-port rules through nft's
    // JSON interface.
    let nft_bin = in_path("nft");
    items.push(Item {
        name: "binary nft",
        ok: nft_bin.is_some(),
        required: false,
        detail: nft_bin
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "nft not in PATH".into()),
        hint: "apt-get install nftables (the built-in network needs it for egress NAT and host ports)",
    });
    let fwd = read("/proc/sys/net/ipv4/ip_forward");
    items.push(Item {
        name: "IPv4 forwarding",
        ok: fwd.trim() == "1",
        required: false,
        detail: format!("net.ipv4.ip_forward={}", fwd.trim()),
        hint: "berth turns it on when network.ip_forward is true (the default); with CNI the plugins do",
    });
    let cni: Vec<String> = ["/opt/cni/bin", "/usr/lib/cni"]
        .iter()
        .filter(|d| Path::new(d).join("bridge").is_file())
        .map(|d| d.to_string())
        .collect();
    items.push(Item {
        name: "CNI plugins",
        ok: !cni.is_empty(),
        required: false,
        detail: if cni.is_empty() {
            "no bridge plugin in /opt/cni/bin or /usr/lib/cni".into()
        } else {
            format!("found in {}", cni.join(", "))
        },
        hint: "only for network.mode = \"cni\": apt-get install containernetworking-plugins",
    });
    items
}

/// Whether containers get a device program: cgroup2 where berth's default
/// cgroup mode uses it, and a kernel that loads device programs for us.
fn device_policy_item(cgroup2: Option<&Path>) -> Item {
    let (ok, detail) = match cgroup2 {
        Some(m) if m == Path::new("/sys/fs/cgroup") => match crate::cgroup::devices::loadable() {
            Ok(()) => (true, "BPF cgroup device programs load; attached per container".into()),
            Err(e) => (false, format!("cannot load a device program: {e}")),
        },
        Some(m) => (
            false,
            format!(
                "cgroup2 only at {} (hybrid host): with cgroup.mode = \"auto\" containers get no cgroup and so no device program",
                m.display()
            ),
        ),
        None => (false, "no cgroup2 mount".into()),
    };
    Item {
        name: "device policy",
        ok,
        required: true,
        detail,
        hint: "non-privileged containers are refused (FailedPrecondition) unless [security] device_policy = \"best-effort\", which runs them with device nodes guarded by file permissions only",
    }
}

/// Prints the report; returns whether every required item is OK.
pub fn print_report(items: &[Item]) -> bool {
    let mut all = true;
    for i in items {
        let tag = match (i.ok, i.required) {
            (true, _) => "OK  ",
            (false, true) => "FAIL",
            (false, false) => "WARN",
        };
        if !i.ok && i.required {
            all = false;
        }
        if i.ok {
            println!("{tag} {:<24} {}", i.name, i.detail);
        } else {
            println!("{tag} {:<24} {} (hint: {})", i.name, i.detail, i.hint);
        }
    }
    all
}

#[cfg(test)]
mod tests {
    #[test]
    fn device_policy_needs_cgroup2_at_the_usual_place() {
        let hybrid =
            super::device_policy_item(Some(std::path::Path::new("/sys/fs/cgroup/unified")));
        assert!(
            !hybrid.ok && hybrid.detail.contains("hybrid"),
            "{}",
            hybrid.detail
        );
        assert!(hybrid.hint.contains("device_policy"));
        // Root on a 6.x kernel: the program itself loads.
        let pure = super::device_policy_item(Some(std::path::Path::new("/sys/fs/cgroup")));
        assert!(pure.ok, "{}", pure.detail);
    }

    #[test]
    fn checks_run_and_name_the_kernel() {
        let items = super::run_checks();
        assert!(items
            .iter()
            .any(|i| i.name == "kernel" && !i.detail.is_empty()));
    }
}
