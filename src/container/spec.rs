//! CRI container config + image config -> the OCI runtime spec that the
//! monitor's init executes (config.json in the container's directory: the
//! contract between `container/` and `linux/`).

use super::ContainerSpec;
use oci_spec::runtime::Spec;
use serde_json::{json, Value};
use std::path::Path;

/// What the image's config says about running it.
#[derive(Debug, Default, Clone)]
pub struct ImageDefaults {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub working_dir: String,
    pub user: String,
    pub stop_signal: String,
}

impl ImageDefaults {
    pub fn from_config(config: &Value) -> ImageDefaults {
        let c = &config["config"];
        let strings = |v: &Value| -> Vec<String> {
            v.as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default()
        };
        let string = |v: &Value| v.as_str().unwrap_or("").to_string();
        ImageDefaults {
            entrypoint: strings(&c["Entrypoint"]),
            cmd: strings(&c["Cmd"]),
            env: strings(&c["Env"]),
            working_dir: string(&c["WorkingDir"]),
            user: string(&c["User"]),
            stop_signal: string(&c["StopSignal"]),
        }
    }
}

/// Where the pod's namespaces and files are.
pub struct PodContext<'a> {
    /// Pinned netns, or `None` for the host's.
    pub netns: Option<&'a Path>,
    /// The infra process, whose IPC/UTS namespaces containers join.
    pub infra_pid: i32,
    pub pid_ns: PidNs,
    pub host_ipc: bool,
    pub host_uts: bool,
    pub hostname: &'a str,
    /// Directory holding the pod's hostname, hosts and resolv.conf.
    pub files_dir: &'a Path,
    /// The container has its own cgroup: give it a cgroup namespace and a
    /// read-only cgroup2 mount showing that cgroup as the root.
    pub cgroup: bool,
    /// The pod's shared /dev/shm (host's /dev/shm for host-IPC pods).
    pub shm: Option<&'a Path>,
    /// The pod's own user namespace (pin, mappings): the container joins it.
    pub userns: Option<(&'a Path, &'a crate::pod::userns::UserNsSpec)>,
}

/// The PID namespace the container gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PidNs {
    Host,
    New,
    Join(std::path::PathBuf),
}

/// OCI LinuxIdMapping entries.
fn oci_mappings(map: &[crate::pod::userns::IdRange]) -> Value {
    map.iter()
        .map(|r| json!({"containerID": r.container_id, "hostID": r.host_id, "size": r.length}))
        .collect()
}

/// The process args as kubelet expects them merged: CRI command replaces the
/// image Entrypoint (and then the image Cmd is dropped); CRI args replace Cmd.
pub fn process_args(c: &ContainerSpec, img: &ImageDefaults) -> Vec<String> {
    let (entry, cmd) = if !c.command.is_empty() {
        (c.command.clone(), c.args.clone())
    } else if !c.args.is_empty() {
        (img.entrypoint.clone(), c.args.clone())
    } else {
        (img.entrypoint.clone(), img.cmd.clone())
    };
    entry.into_iter().chain(cmd).collect()
}

/// Image env first, CRI envs override by name.
pub fn process_env(c: &ContainerSpec, img: &ImageDefaults) -> Vec<String> {
    let mut env: Vec<(String, String)> = img
        .env
        .iter()
        .map(|e| match e.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (e.clone(), String::new()),
        })
        .collect();
    if !env.iter().any(|(k, _)| k == "PATH") {
        env.insert(
            0,
            (
                "PATH".into(),
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
            ),
        );
    }
    env.push(("HOSTNAME".into(), String::new()));
    for (k, v) in &c.envs {
        match env.iter_mut().find(|(ek, _)| ek == k) {
            Some(e) => e.1 = v.clone(),
            None => env.push((k.clone(), v.clone())),
        }
    }
    env.into_iter()
        .filter(|(k, v)| !(k == "HOSTNAME" && v.is_empty()))
        .map(|(k, v)| format!("{k}={v}"))
        .collect()
}

/// Builds the OCI spec from the request, the image, the pod and the
/// resolved user and security settings.
pub fn build(
    c: &ContainerSpec,
    img: &ImageDefaults,
    pod: &PodContext<'_>,
    rootfs: &Path,
    user: &super::user::User,
    oom_score_adj: i64,
    sec: &super::security::Resolved,
) -> Result<Spec, String> {
    let args = process_args(c, img);
    if args.is_empty() {
        return Err("no command: neither the container config nor the image gives one".into());
    }
    let mut env = process_env(c, img);
    if !env.iter().any(|e| e.starts_with("HOSTNAME=")) {
        env.push(format!("HOSTNAME={}", pod.hostname));
    }
    let cwd = if !c.working_dir.is_empty() {
        c.working_dir.clone()
    } else if !img.working_dir.is_empty() {
        img.working_dir.clone()
    } else {
        "/".to_string()
    };
    // Privileged containers get sysfs and cgroupfs read-write.
    let ro = if sec.privileged { "rw" } else { "ro" };
    // In a user namespace, tmpfs and devpts are owned by the pod's root and
    // tty group, as if mounted from inside it (the init mounts them from
    // the host's namespace, before it joins the pod's).
    let (tmpfs_owner, tty_gid) = match pod.userns {
        Some((_, u)) => (
            format!(
                ",uid={},gid={}",
                u.host_uid(0).unwrap_or(0),
                u.host_gid(0).unwrap_or(0)
            ),
            u.host_gid(5),
        ),
        None => (String::new(), Some(5)),
    };
    let devpts_gid = tty_gid.map(|g| format!("gid={g}"));
    let mut devpts_opts = vec![
        "nosuid".to_string(),
        "noexec".into(),
        "newinstance".into(),
        "ptmxmode=0666".into(),
        "mode=0620".into(),
    ];
    devpts_opts.extend(devpts_gid);
    let mut mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", format!("mode=755,size=65536k{tmpfs_owner}")]}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": devpts_opts}),
        match pod.shm {
            Some(p) => {
                json!({"destination": "/dev/shm", "type": "bind", "source": p, "options": ["rbind", "rprivate", "nosuid", "noexec", "nodev"]})
            }
            None => {
                json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", format!("mode=1777,size=65536k{tmpfs_owner}")]})
            }
        },
        json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", ro]}),
    ];
    if pod.cgroup {
        mounts.push(json!({"destination": "/sys/fs/cgroup", "type": "cgroup2", "source": "cgroup", "options": ["nosuid", "noexec", "nodev", "relatime", ro]}));
    }
    let cri_dests: Vec<&str> = c.mounts.iter().map(|m| m.container_path.as_str()).collect();
    for (file, dest) in [
        ("hostname", "/etc/hostname"),
        ("hosts", "/etc/hosts"),
        ("resolv.conf", "/etc/resolv.conf"),
    ] {
        // kubelet sends its own /etc/hosts as a CRI mount; that one wins.
        if !cri_dests.contains(&dest) {
            let mut options = vec!["rbind", "rprivate"];
            // berth's own files, owned by the host's root: idmapped with the
            // pod's mappings (crun's "idmap" option), the pod's root owns
            // them as it would without a user namespace.
            if pod.userns.is_some() {
                options.push("idmap");
            }
            mounts.push(json!({
                "destination": dest, "type": "bind",
                "source": pod.files_dir.join(file), "options": options,
            }));
        }
    }
    for m in &c.mounts {
        let mut options = vec!["rbind".to_string()];
        options.push(
            match m.propagation {
                super::Propagation::Private => "rprivate",
                super::Propagation::HostToContainer => "rslave",
                super::Propagation::Bidirectional => "rshared",
            }
            .to_string(),
        );
        if m.image.is_some() {
            // As on the host side: no set-uid or device files from an image.
            options.extend(["nosuid".to_string(), "nodev".to_string()]);
        }
        if m.readonly {
            options.push("ro".into());
            if m.recursive_readonly {
                options.push("rro".into());
            }
        }
        mounts.push(json!({
            "destination": m.container_path, "type": "bind",
            "source": m.host_path, "options": options,
        }));
    }
    let mut namespaces = vec![json!({"type": "mount"})];
    if let Some((pin, _)) = pod.userns {
        namespaces.push(json!({"type": "user", "path": pin}));
    }
    if pod.cgroup {
        namespaces.push(json!({"type": "cgroup"}));
    }
    if let Some(p) = pod.netns {
        namespaces.push(json!({"type": "network", "path": p}));
    }
    let infra_ns = |kind: &str| format!("/proc/{}/ns/{kind}", pod.infra_pid);
    if !pod.host_ipc {
        namespaces.push(json!({"type": "ipc", "path": infra_ns("ipc")}));
    }
    if !pod.host_uts {
        namespaces.push(json!({"type": "uts", "path": infra_ns("uts")}));
    }
    match &pod.pid_ns {
        PidNs::Host => {}
        PidNs::New => namespaces.push(json!({"type": "pid"})),
        PidNs::Join(p) => namespaces.push(json!({"type": "pid", "path": p})),
    }
    let propagation = if c
        .mounts
        .iter()
        .any(|m| m.propagation == super::Propagation::Bidirectional)
    {
        "rshared"
    } else {
        "rslave"
    };
    let caps = &sec.caps;
    let mut linux = json!({
        "namespaces": namespaces,
        "maskedPaths": sec.masked,
        "readonlyPaths": sec.readonly,
        "rootfsPropagation": propagation,
        "devices": sec.devices,
        "resources": {"devices": sec.device_rules},
    });
    if let Some(s) = &sec.seccomp {
        linux["seccomp"] = s.clone();
    }
    if let Some((_, u)) = pod.userns {
        linux["uidMappings"] = oci_mappings(&u.uids);
        linux["gidMappings"] = oci_mappings(&u.gids);
    }
    let mut process = json!({
        "terminal": c.tty,
        "user": {"uid": user.uid, "gid": user.gid, "additionalGids": user.groups},
        "args": args,
        "env": env,
        "cwd": cwd,
        "oomScoreAdj": oom_score_adj,
        "capabilities": {
            "bounding": caps, "effective": caps, "permitted": caps,
            "inheritable": sec.ambient, "ambient": sec.ambient,
        },
        "noNewPrivileges": sec.no_new_privs,
        "rlimits": sec.rlimits,
    });
    if let Some(a) = &sec.apparmor {
        process["apparmorProfile"] = json!(a);
    }
    let spec = json!({
        "ociVersion": "1.2.0",
        "process": process,
        "root": {"path": rootfs, "readonly": sec.readonly_rootfs},
        "hostname": pod.hostname,
        "mounts": mounts,
        "linux": linux,
        "annotations": c.annotations,
    });
    serde_json::from_value(spec).map_err(|e| format!("OCI spec: {e}"))
}

/// The spec for an external OCI runtime: the pod's namespaces are already
/// joined by path (netns pin, /proc/<infra>/ns/...); what differs is that
/// such a runtime refuses a hostname without a UTS namespace of the
/// container's (host-network pods), and puts the container in its cgroup
/// itself (`cgroups_path`, from the hierarchy's root), and older runtimes
/// only take the spec versions they know.
pub fn for_delegated(spec: Spec, cgroups_path: Option<String>) -> Result<Spec, String> {
    let mut v = serde_json::to_value(&spec).map_err(|e| format!("OCI spec: {e}"))?;
    let has_uts = v["linux"]["namespaces"]
        .as_array()
        .is_some_and(|ns| ns.iter().any(|n| n["type"] == "uts"));
    if !has_uts {
        if let Some(o) = v.as_object_mut() {
            o.remove("hostname");
        }
    }
    if let Some(p) = cgroups_path {
        v["linux"]["cgroupsPath"] = json!(p);
    }
    // Runtimes refuse a spec version newer than theirs (crun 1.8 knows
    // 1.0.x); nothing berth writes for them needs more (rro is refused).
    v["ociVersion"] = json!("1.0.2");
    serde_json::from_value(v).map_err(|e| format!("OCI spec: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn img() -> ImageDefaults {
        ImageDefaults {
            entrypoint: vec!["/entry".into()],
            cmd: vec!["default".into()],
            env: vec!["PATH=/bin".into(), "A=1".into()],
            ..Default::default()
        }
    }

    #[test]
    fn args_merge_like_kubelet() {
        let mut c = ContainerSpec::default();
        assert_eq!(process_args(&c, &img()), ["/entry", "default"]);
        c.args = vec!["x".into()];
        assert_eq!(process_args(&c, &img()), ["/entry", "x"]);
        c.command = vec!["/bin/sh".into()];
        assert_eq!(process_args(&c, &img()), ["/bin/sh", "x"]);
        c.args.clear();
        assert_eq!(process_args(&c, &img()), ["/bin/sh"]);
    }

    #[test]
    fn env_overrides_by_name() {
        let c = ContainerSpec {
            envs: vec![("A".into(), "2".into()), ("B".into(), "3".into())],
            ..Default::default()
        };
        assert_eq!(process_env(&c, &img()), ["PATH=/bin", "A=2", "B=3"]);
    }

    #[test]
    fn delegated_spec_drops_a_hostname_it_cannot_set() {
        let base = json!({
            "ociVersion": "1.2.0", "root": {"path": "/r"}, "hostname": "h",
            "linux": {"namespaces": [{"type": "mount"}]},
        });
        let spec: Spec = serde_json::from_value(base.clone()).unwrap();
        let out = for_delegated(spec, Some("/berth/c1".into())).unwrap();
        assert_eq!(out.hostname(), &None);
        assert_eq!(out.version(), "1.0.2");
        let linux = out.linux().as_ref().unwrap();
        assert_eq!(
            linux.cgroups_path().as_deref(),
            Some(Path::new("/berth/c1"))
        );
        let mut with_uts = base;
        with_uts["linux"]["namespaces"] = json!([{"type": "uts", "path": "/proc/1/ns/uts"}]);
        let spec: Spec = serde_json::from_value(with_uts).unwrap();
        let out = for_delegated(spec, None).unwrap();
        assert_eq!(out.hostname().as_deref(), Some("h"));
        assert_eq!(out.linux().as_ref().unwrap().cgroups_path(), &None);
    }
}
