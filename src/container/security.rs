//! The security context policy: what a CRI LinuxContainerSecurityContext
//! means for the OCI spec (capabilities, seccomp, AppArmor, masked and
//! read-only paths, devices, rlimits), with containerd's defaults.

use super::ContainerSpec;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::path::Path;

/// A seccomp or AppArmor profile choice.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Profile {
    #[default]
    Unconfined,
    RuntimeDefault,
    /// A seccomp profile file (absolute path) or an AppArmor profile name.
    Localhost(String),
}

/// The PID namespace a container asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum PidMode {
    /// The pod's (the infra process's when the pod shares one).
    #[default]
    Pod,
    Container,
    Node,
    /// Another container's (ephemeral containers), by id.
    Target(String),
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceSpec {
    pub container_path: String,
    pub host_path: String,
    pub permissions: String,
}

/// LinuxContainerSecurityContext, and the devices, as berth keeps them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SecuritySpec {
    pub privileged: bool,
    pub add_capabilities: Vec<String>,
    pub drop_capabilities: Vec<String>,
    pub add_ambient_capabilities: Vec<String>,
    pub no_new_privs: bool,
    pub readonly_rootfs: bool,
    /// `None`: the request had no security context: the default lists.
    pub masked_paths: Option<Vec<String>>,
    pub readonly_paths: Option<Vec<String>>,
    pub seccomp: Profile,
    pub apparmor: Profile,
    pub supplemental_groups: Vec<i64>,
    /// SupplementalGroupsPolicy Strict: the image's /etc/group is ignored.
    pub strict_groups: bool,
    pub pid: PidMode,
    pub host_ipc: bool,
    pub host_network: bool,
    pub devices: Vec<DeviceSpec>,
}

/// containerd's default capability set.
pub const DEFAULT_CAPS: [&str; 14] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

pub const DEFAULT_MASKED: [&str; 11] = [
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

pub const DEFAULT_READONLY: [&str; 5] = [
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// What the security context resolves to, ready for the OCI spec.
#[derive(Debug, Clone, Default)]
pub struct Resolved {
    /// Bounding = effective = permitted (OCI names).
    pub caps: Vec<String>,
    /// Also inheritable.
    pub ambient: Vec<String>,
    pub no_new_privs: bool,
    /// OCI linux.seccomp.
    pub seccomp: Option<Value>,
    pub apparmor: Option<String>,
    pub masked: Vec<String>,
    pub readonly: Vec<String>,
    /// OCI linux.devices entries.
    pub devices: Vec<Value>,
    /// OCI linux.resources.devices: the cgroup device policy.
    pub device_rules: Vec<Value>,
    pub privileged: bool,
    pub readonly_rootfs: bool,
    pub rlimits: Vec<Value>,
}

fn cap_name(name: &str) -> Result<(u32, String), String> {
    let n = crate::linux::identity::cap_number(name)
        .ok_or_else(|| format!("unknown capability {name:?}"))?;
    let upper = name.to_ascii_uppercase();
    let full = if upper.starts_with("CAP_") {
        upper
    } else {
        format!("CAP_{upper}")
    };
    Ok((n, full))
}

/// The capability set as containerd computes it: the defaults (all when
/// privileged), then "ALL" adds or drops everything, then the single names.
/// `base` replaces containerd's default set (a runtime handler's own).
fn capabilities(
    s: &SecuritySpec,
    base: Option<&[String]>,
) -> Result<BTreeSet<(u32, String)>, String> {
    let all = || -> Result<BTreeSet<(u32, String)>, String> {
        let last = crate::linux::identity::last_cap();
        Ok(caps::all()
            .into_iter()
            .filter(|c| u32::from(c.index()) <= last)
            .map(|c| (u32::from(c.index()), c.to_string()))
            .collect())
    };
    if s.privileged {
        return all();
    }
    let is_all = |n: &String| n.eq_ignore_ascii_case("ALL");
    let mut set: BTreeSet<(u32, String)> = match base {
        Some(b) => b.iter().map(|n| cap_name(n)).collect::<Result<_, _>>()?,
        None => DEFAULT_CAPS
            .iter()
            .map(|n| cap_name(n))
            .collect::<Result<_, _>>()?,
    };
    if s.add_capabilities.iter().any(is_all) {
        set = all()?;
    }
    if s.drop_capabilities.iter().any(is_all) {
        set.clear();
    }
    for n in s.add_capabilities.iter().filter(|n| !is_all(n)) {
        set.insert(cap_name(n)?);
    }
    for n in s.drop_capabilities.iter().filter(|n| !is_all(n)) {
        let c = cap_name(n)?;
        set.remove(&c);
    }
    Ok(set)
}

/// Whether AppArmor is enabled on this host.
pub fn apparmor_enabled() -> bool {
    std::fs::read_to_string("/sys/module/apparmor/parameters/enabled")
        .is_ok_and(|s| s.trim() == "Y")
}

/// RLIMIT_NOFILE for containers: the configured one, capped at berth's own
/// hard limit (raising a hard limit needs CAP_SYS_RESOURCE).
fn nofile(wanted: (u64, u64)) -> (u64, u64) {
    let own = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map(|(_, h)| h)
        .unwrap_or(wanted.1);
    let hard = wanted.1.min(own);
    (wanted.0.min(hard), hard)
}

pub fn resolve(
    c: &ContainerSpec,
    nofile_limit: (u64, u64),
    base_caps: Option<&[String]>,
) -> Result<Resolved, String> {
    let s = &c.security;
    let mut caps = capabilities(s, base_caps)?;
    let mut ambient = Vec::new();
    for n in &s.add_ambient_capabilities {
        // An ambient capability must be permitted (and in the bounding set).
        let c = cap_name(n)?;
        ambient.push(c.1.clone());
        caps.insert(c);
    }
    let cap_numbers: BTreeSet<u32> = caps.iter().map(|(n, _)| *n).collect();
    let seccomp = if s.privileged {
        None
    } else {
        match &s.seccomp {
            Profile::Unconfined => None,
            Profile::RuntimeDefault => Some(super::seccomp_profile::runtime_default(&cap_numbers)),
            Profile::Localhost(path) => Some(super::seccomp_profile::localhost(
                Path::new(path),
                &cap_numbers,
            )?),
        }
    };
    let seccomp = match seccomp {
        None => None,
        Some(v) => {
            // Compiled now so that a bad profile fails CreateContainer; the
            // spec keeps the names this architecture has (the init then
            // compiles it in one go).
            let parsed: oci_spec::runtime::LinuxSeccomp =
                serde_json::from_value(v).map_err(|e| format!("seccomp profile: {e}"))?;
            let parsed = crate::linux::seccomp::known_only(&parsed);
            crate::linux::seccomp::compile(&parsed)?;
            Some(serde_json::to_value(&parsed).map_err(|e| format!("seccomp profile: {e}"))?)
        }
    };
    let apparmor = match (&s.apparmor, apparmor_enabled()) {
        (Profile::Localhost(name), true) if !s.privileged => Some(name.clone()),
        (Profile::Localhost(name), false) => {
            return Err(format!(
                "AppArmor profile {name:?} requested, but AppArmor is not enabled on this host"
            ))
        }
        _ => None,
    };
    let (masked, readonly) = if s.privileged {
        (Vec::new(), Vec::new())
    } else {
        (
            s.masked_paths
                .clone()
                .unwrap_or_else(|| DEFAULT_MASKED.map(String::from).to_vec()),
            s.readonly_paths
                .clone()
                .unwrap_or_else(|| DEFAULT_READONLY.map(String::from).to_vec()),
        )
    };
    let mut devices = Vec::new();
    let mut device_rules = if s.privileged {
        vec![json!({"allow": true, "access": "rwm"})]
    } else {
        standard_device_rules()
    };
    if s.privileged {
        devices.extend(host_devices(Path::new("/dev"), Path::new("/dev"))?);
    }
    for d in &s.devices {
        if d.permissions.chars().any(|ch| !"rwm".contains(ch)) {
            return Err(format!(
                "device {}: permissions {:?} are not a combination of r, w and m",
                d.host_path, d.permissions
            ));
        }
        let dest = if d.container_path.is_empty() {
            &d.host_path
        } else {
            &d.container_path
        };
        if !Path::new(dest).is_absolute() {
            return Err(format!("device container path {dest:?} is not absolute"));
        }
        let found = host_devices(Path::new(&d.host_path), Path::new(dest))?;
        if found.is_empty() {
            return Err(format!("device {}: no device node there", d.host_path));
        }
        if !s.privileged {
            // As runc: "" grants nothing (kubelet sends "mrw").
            device_rules.extend(found.iter().map(|n| {
                json!({"allow": true, "type": n["type"], "major": n["major"],
                       "minor": n["minor"], "access": d.permissions})
            }));
        }
        devices.extend(found);
    }
    let (soft, hard) = nofile(nofile_limit);
    Ok(Resolved {
        caps: caps.into_iter().map(|(_, n)| n).collect(),
        ambient,
        no_new_privs: s.no_new_privs,
        seccomp,
        apparmor,
        masked,
        readonly,
        devices,
        device_rules,
        privileged: s.privileged,
        readonly_rootfs: s.readonly_rootfs,
        rlimits: vec![json!({"type": "RLIMIT_NOFILE", "soft": soft, "hard": hard})],
    })
}

/// Deny everything, then what every container needs, as runc and
/// containerd allow: mknod of any node (opening it is what the policy
/// decides), /dev/null, zero, full, random, urandom, tty, console, ptmx
/// and the pty slaves (/dev/pts/*, major 136).
fn standard_device_rules() -> Vec<Value> {
    let mut rules = vec![
        json!({"allow": false, "access": "rwm"}),
        json!({"allow": true, "type": "c", "access": "m"}),
        json!({"allow": true, "type": "b", "access": "m"}),
    ];
    for (major, minor) in [
        (1, 3),
        (1, 5),
        (1, 7),
        (1, 8),
        (1, 9),
        (5, 0),
        (5, 1),
        (5, 2),
    ] {
        rules.push(
            json!({"allow": true, "type": "c", "major": major, "minor": minor, "access": "rwm"}),
        );
    }
    rules.push(json!({"allow": true, "type": "c", "major": 136, "access": "rwm"}));
    rules
}

/// The device nodes at `host` (a node, or a directory searched
/// recursively), as OCI devices at the same place under `dest`.
fn host_devices(host: &Path, dest: &Path) -> Result<Vec<Value>, String> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let meta = std::fs::metadata(host).map_err(|e| format!("device {}: {e}", host.display()))?;
    let ft = meta.file_type();
    if ft.is_dir() {
        let mut out = Vec::new();
        let rd = std::fs::read_dir(host).map_err(|e| format!("device {}: {e}", host.display()))?;
        for e in rd.flatten() {
            let name = e.file_name();
            // Mounted separately in every container.
            if host == Path::new("/dev")
                && [
                    "pts",
                    "shm",
                    "mqueue",
                    "hugepages",
                    "console",
                    "ptmx",
                    "core",
                    "fd",
                ]
                .iter()
                .any(|n| name == *n)
            {
                continue;
            }
            let Ok(ft) = e.file_type() else { continue };
            // Only device nodes (and directories of them): no symlinks,
            // sockets or regular files.
            if !(ft.is_dir() || ft.is_char_device() || ft.is_block_device()) {
                continue;
            }
            out.extend(host_devices(&e.path(), &dest.join(&name))?);
        }
        return Ok(out);
    }
    let typ = if ft.is_char_device() {
        "c"
    } else if ft.is_block_device() {
        "b"
    } else {
        return Err(format!("{} is not a device node", host.display()));
    };
    let rdev = meta.rdev();
    Ok(vec![json!({
        "path": dest,
        "type": typ,
        "major": nix::sys::stat::major(rdev),
        "minor": nix::sys::stat::minor(rdev),
        "fileMode": meta.mode() & 0o777,
        "uid": meta.uid(),
        "gid": meta.gid(),
    })])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(s: &SecuritySpec) -> Vec<String> {
        capabilities(s, None)
            .unwrap()
            .into_iter()
            .map(|(_, n)| n)
            .collect()
    }

    #[test]
    fn default_add_drop_all() {
        let mut s = SecuritySpec::default();
        assert_eq!(names(&s).len(), 14);
        s.add_capabilities = vec!["sys_admin".into()];
        s.drop_capabilities = vec!["CAP_CHOWN".into()];
        let n = names(&s);
        assert!(n.contains(&"CAP_SYS_ADMIN".to_string()) && !n.contains(&"CAP_CHOWN".to_string()));
        s.drop_capabilities = vec!["ALL".into()];
        assert_eq!(names(&s), ["CAP_SYS_ADMIN"]);
        s.add_capabilities = vec!["ALL".into()];
        s.drop_capabilities = vec!["KILL".into()];
        assert!(names(&s).len() > 30 && !names(&s).contains(&"CAP_KILL".to_string()));
        s.add_capabilities = vec!["CAP_NOPE".into()];
        assert!(capabilities(&s, None).unwrap_err().contains("CAP_NOPE"));
    }

    #[test]
    fn handler_base_set_replaces_the_default() {
        let mut s = SecuritySpec::default();
        let base = ["CAP_KILL".to_string(), "net_bind_service".to_string()];
        let n: Vec<String> = capabilities(&s, Some(&base))
            .unwrap()
            .into_iter()
            .map(|(_, n)| n)
            .collect();
        assert_eq!(n, ["CAP_KILL", "CAP_NET_BIND_SERVICE"]);
        s.add_capabilities = vec!["CHOWN".into()];
        assert_eq!(capabilities(&s, Some(&base)).unwrap().len(), 3);
    }

    #[test]
    fn device_rules_default_deny_and_requested_permissions() {
        let mut c = ContainerSpec::default();
        c.security.devices = vec![DeviceSpec {
            container_path: "/dev/x".into(),
            host_path: "/dev/null".into(),
            permissions: "r".into(),
        }];
        let r = resolve(&c, (1024, 1024), None).unwrap();
        assert_eq!(r.device_rules[0], json!({"allow": false, "access": "rwm"}));
        assert_eq!(
            r.device_rules.last().unwrap(),
            &json!({"allow": true, "type": "c", "major": 1, "minor": 3, "access": "r"})
        );
        // The rules are valid OCI and compile.
        let rules: Vec<oci_spec::runtime::LinuxDeviceCgroup> =
            serde_json::from_value(json!(r.device_rules)).unwrap();
        crate::cgroup::devices::program(&rules).unwrap();
        c.security.privileged = true;
        let r = resolve(&c, (1024, 1024), None).unwrap();
        assert_eq!(r.device_rules, [json!({"allow": true, "access": "rwm"})]);
    }

    #[test]
    fn devices_must_exist() {
        let d = host_devices(Path::new("/dev/null"), Path::new("/dev/x")).unwrap();
        assert_eq!(d[0]["major"], 1);
        assert_eq!(d[0]["minor"], 3);
        assert!(host_devices(Path::new("/dev/nope-nope"), Path::new("/dev/x")).is_err());
        assert!(host_devices(Path::new("/etc/hostname"), Path::new("/dev/x")).is_err());
    }
}
