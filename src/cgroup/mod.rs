//! cgroup v2: one cgroup per container under the pod's cgroup parent (or
//! berth's own), limits from the CRI resources, OOM and kill through the
//! cgroup's own files. Plain file writes: no unsafe, no syscalls beyond I/O.
//!
//! Hybrid hosts (cgroup2 only at /sys/fs/cgroup/unified) are left alone in
//! `auto` mode: their v2 side belongs to systemd and has no controllers.

pub mod devices;
pub mod stats;

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cgroup {path}: controller {controller} is not available (needed for {what}); set cgroup.allow_missing_controllers = true to run without it")]
    MissingController {
        path: String,
        controller: String,
        what: String,
    },
    #[error("cgroup {path}: {what}: {source}")]
    Io {
        path: String,
        what: String,
        source: std::io::Error,
    },
    #[error("cgroup resource {key:?}: {reason}")]
    Invalid { key: String, reason: String },
    #[error("cgroup {path}: {reason}")]
    Rejected { path: String, reason: String },
    #[error("cgroup {path}: device policy: {reason}")]
    Devices { path: String, reason: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Use cgroups when cgroup2 is mounted at /sys/fs/cgroup (a pure v2 host).
    #[default]
    Auto,
    On,
    Off,
}

/// Container resources as the CRI expresses them (LinuxContainerResources).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    pub cpu_period: i64,
    pub cpu_quota: i64,
    pub cpu_shares: i64,
    pub memory_limit: i64,
    pub memory_swap_limit: i64,
    pub cpuset_cpus: String,
    pub cpuset_mems: String,
    /// page size (e.g. "2MB") -> bytes
    pub hugepage_limits: BTreeMap<String, u64>,
    pub unified: BTreeMap<String, String>,
}

/// kubelet's conversion of CPU shares (2..262144) to cgroup v2 cpu.weight (1..10000).
pub fn shares_to_weight(shares: i64) -> u64 {
    if shares <= 0 {
        return 100;
    }
    let s = shares.clamp(2, 262_144) as u64;
    1 + ((s - 2) * 9999) / 262_142
}

impl Resources {
    /// (file, value, controller) triples to write.
    pub fn files(&self) -> Result<Vec<(String, String, &'static str)>, CgroupError> {
        let mut out = Vec::new();
        if self.cpu_shares > 0 {
            out.push((
                "cpu.weight".into(),
                shares_to_weight(self.cpu_shares).to_string(),
                "cpu",
            ));
        }
        if self.cpu_quota != 0 || self.cpu_period != 0 {
            let period = if self.cpu_period > 0 {
                self.cpu_period
            } else {
                100_000
            };
            let quota = if self.cpu_quota > 0 {
                self.cpu_quota.to_string()
            } else {
                "max".into()
            };
            out.push(("cpu.max".into(), format!("{quota} {period}"), "cpu"));
        }
        if self.memory_limit > 0 {
            out.push(("memory.max".into(), self.memory_limit.to_string(), "memory"));
        }
        // CRI gives memory+swap; cgroup v2 wants swap alone. -1 is unlimited.
        if self.memory_swap_limit == -1 {
            out.push(("memory.swap.max".into(), "max".into(), "memory"));
        } else if self.memory_swap_limit > 0 && self.memory_limit > 0 {
            let swap = (self.memory_swap_limit - self.memory_limit).max(0);
            out.push(("memory.swap.max".into(), swap.to_string(), "memory"));
        }
        if !self.cpuset_cpus.is_empty() {
            out.push(("cpuset.cpus".into(), self.cpuset_cpus.clone(), "cpuset"));
        }
        if !self.cpuset_mems.is_empty() {
            out.push(("cpuset.mems".into(), self.cpuset_mems.clone(), "cpuset"));
        }
        for (size, limit) in &self.hugepage_limits {
            out.push((format!("hugetlb.{size}.max"), limit.to_string(), "hugetlb"));
        }
        for (k, v) in &self.unified {
            let valid = !k.is_empty()
                && !k.contains('/')
                && k.contains('.')
                && !k.starts_with("cgroup.")
                && k.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_');
            if !valid {
                return Err(CgroupError::Invalid {
                    key: k.clone(),
                    reason: "not a cgroup v2 interface file name".into(),
                });
            }
            let controller = match k.split('.').next().unwrap_or("") {
                "cpu" => "cpu",
                "memory" => "memory",
                "pids" => "pids",
                "io" => "io",
                "cpuset" => "cpuset",
                "hugetlb" => "hugetlb",
                _ => "",
            };
            out.push((k.clone(), v.clone(), controller));
        }
        Ok(out)
    }
}

pub struct Cgroups {
    /// The cgroup2 mount point when cgroups are in use.
    mount: Option<PathBuf>,
    available: Vec<String>,
    allow_missing: bool,
}

impl Cgroups {
    pub fn new(mode: Mode, allow_missing: bool) -> Cgroups {
        let found = crate::check::cgroup2_mount();
        let mount = match (mode, found) {
            (Mode::Off, _) | (_, None) => None,
            (Mode::On, Some(m)) => Some(m),
            (Mode::Auto, Some(m)) if m == Path::new("/sys/fs/cgroup") => Some(m),
            (Mode::Auto, Some(m)) => {
                tracing::warn!(mount = %m.display(), "cgroup2 is only mounted beside cgroup v1 (hybrid host): containers run without cgroups (set cgroup.mode = \"on\" to use it anyway)");
                None
            }
        };
        let available = mount
            .as_ref()
            .and_then(|m| std::fs::read_to_string(m.join("cgroup.controllers")).ok())
            .map(|s| s.split_whitespace().map(String::from).collect())
            .unwrap_or_default();
        Cgroups {
            mount,
            available,
            allow_missing,
        }
    }

    pub fn enabled(&self) -> bool {
        self.mount.is_some()
    }

    /// Without cgroups no limit can be applied: asking for one is an error
    /// naming its controller, unless missing controllers are tolerated.
    pub fn check_applicable(&self, what: &str, res: &Resources) -> Result<(), CgroupError> {
        if self.enabled() {
            return Ok(());
        }
        let Some((file, _, controller)) = res.files()?.into_iter().next() else {
            return Ok(());
        };
        if self.allow_missing {
            tracing::warn!(
                object = what,
                file,
                "no usable cgroup v2 on this host: limit not applied"
            );
            return Ok(());
        }
        Err(CgroupError::MissingController {
            path: format!("(none: no usable cgroup v2 on this host) for {what}"),
            controller: if controller.is_empty() {
                "?".into()
            } else {
                controller.to_string()
            },
            what: file,
        })
    }

    /// `<mount>/<parent>/<name>`; `parent` is kubelet's cgroup_parent or "berth".
    pub fn path_for(&self, parent: &str, name: &str) -> Option<PathBuf> {
        let m = self.mount.as_ref()?;
        let parent = parent.trim_matches('/');
        let parent = if parent.is_empty() { "berth" } else { parent };
        // A parent with `..` could point anywhere in the hierarchy.
        if parent.split('/').any(|c| c == ".." || c == ".") {
            return None;
        }
        Some(m.join(parent).join(name))
    }

    /// `path` as a cgroup path from the hierarchy's root (an OCI spec's
    /// linux.cgroupsPath for an external runtime's cgroupfs driver).
    pub fn relative(&self, path: &Path) -> Option<String> {
        let rel = path.strip_prefix(self.mount.as_ref()?).ok()?;
        Some(format!("/{}", rel.display()))
    }

    /// Creates the cgroup (and its parents, enabling controllers on the way)
    /// and writes the limits. On error nothing new is left behind.
    pub fn create(&self, path: &Path, res: &Resources) -> Result<(), CgroupError> {
        let Some(mount) = &self.mount else {
            return Ok(());
        };
        let files = res.files()?;
        for (file, _, controller) in &files {
            if !controller.is_empty() && !self.available.iter().any(|c| c == controller) {
                if self.allow_missing {
                    tracing::warn!(
                        controller,
                        file,
                        "cgroup controller missing: limit not applied"
                    );
                    continue;
                }
                return Err(CgroupError::MissingController {
                    path: path.display().to_string(),
                    controller: controller.to_string(),
                    what: file.clone(),
                });
            }
        }
        let io = |what: &str, p: &Path| {
            let (what, p) = (what.to_string(), p.display().to_string());
            move |source| CgroupError::Io {
                path: p,
                what,
                source,
            }
        };
        // Enable every available controller down to the parent.
        let rel = path.strip_prefix(mount).unwrap_or(path);
        let mut dir = mount.clone();
        let enable: String = self
            .available
            .iter()
            .map(|c| format!("+{c}"))
            .collect::<Vec<_>>()
            .join(" ");
        let comps: Vec<_> = rel.components().collect();
        for (i, c) in comps.iter().enumerate() {
            if !enable.is_empty() {
                let _ = std::fs::write(dir.join("cgroup.subtree_control"), &enable);
            }
            dir.push(c);
            if i + 1 < comps.len() {
                match std::fs::create_dir(&dir) {
                    Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                        return Err(io("create", &dir)(e))
                    }
                    _ => {}
                }
            }
        }
        std::fs::create_dir(path).map_err(io("create", path))?;
        for (file, value, controller) in files {
            if !controller.is_empty() && !self.available.iter().any(|c| c == controller) {
                continue;
            }
            if let Err(e) = std::fs::write(path.join(&file), &value) {
                let _ = std::fs::remove_dir(path);
                return Err(io(&format!("write {file} = {value}"), path)(e));
            }
        }
        Ok(())
    }

    /// Changes the limits of an existing cgroup, all or nothing: on any
    /// failure the files already written get their old values back. A
    /// memory limit below what the cgroup uses now is refused rather than
    /// letting the kernel OOM-kill the workload.
    pub fn update(&self, path: &Path, res: &Resources) -> Result<(), CgroupError> {
        if self.mount.is_none() {
            return Ok(());
        }
        let files = res.files()?;
        let mut todo = Vec::new();
        for (file, value, controller) in files {
            if !controller.is_empty() && !self.available.iter().any(|c| c == controller) {
                if self.allow_missing {
                    tracing::warn!(
                        controller,
                        file,
                        "cgroup controller missing: limit not applied"
                    );
                    continue;
                }
                return Err(CgroupError::MissingController {
                    path: path.display().to_string(),
                    controller: controller.to_string(),
                    what: file,
                });
            }
            todo.push((file, value));
        }
        let read = |file: &str| {
            std::fs::read_to_string(path.join(file))
                .map(|s| s.trim().to_string())
                .map_err(|source| CgroupError::Io {
                    path: path.display().to_string(),
                    what: format!("read {file}"),
                    source,
                })
        };
        if let Some((_, limit)) = todo.iter().find(|(f, _)| f == "memory.max") {
            if let (Ok(limit), Ok(current)) = (limit.parse::<u64>(), read("memory.current")) {
                let current: u64 = current.parse().unwrap_or(0);
                if limit < current {
                    return Err(CgroupError::Rejected {
                        path: path.display().to_string(),
                        reason: format!(
                            "memory limit {limit} is below the current usage {current}"
                        ),
                    });
                }
            }
        }
        let mut old = Vec::new();
        for (file, _) in &todo {
            old.push(read(file)?);
        }
        for (i, (file, value)) in todo.iter().enumerate() {
            if let Err(source) = std::fs::write(path.join(file), value) {
                // Back to how it was, newest first (files read back in the
                // format they accept; multi-line ones like io.max may not).
                for j in (0..i).rev() {
                    let (f, _) = &todo[j];
                    if let Err(e) = std::fs::write(path.join(f), &old[j]) {
                        tracing::error!(cgroup = %path.display(), file = %f, error = %e, "cannot restore a cgroup limit");
                    }
                }
                return Err(CgroupError::Io {
                    path: path.display().to_string(),
                    what: format!("write {file} = {value}"),
                    source,
                });
            }
        }
        Ok(())
    }

    /// Attaches the device program built from the OCI device `rules` to the
    /// cgroup, replacing berth's previous one atomically (the cgroup is
    /// never without a policy). The attachment, not an fd, keeps the
    /// program: it lives and dies with the cgroup, which the container's
    /// record already names, so no further intent needs recording.
    pub fn set_device_policy(
        &self,
        path: &Path,
        rules: &[oci_spec::runtime::LinuxDeviceCgroup],
    ) -> Result<(), CgroupError> {
        let failed = |reason: String| CgroupError::Devices {
            path: path.display().to_string(),
            reason,
        };
        if self.mount.is_none() {
            return Err(failed("no usable cgroup v2 on this host".into()));
        }
        let insns = devices::program(rules).map_err(failed)?;
        crate::linux::bpf::DeviceProgram::load(devices::PROGRAM_NAME, &insns)
            .and_then(|p| p.attach(path))
            .map_err(|e| failed(e.to_string()))
    }

    /// Kills every process in the cgroup (cgroup.kill, Linux 5.14+).
    pub fn kill(&self, path: &Path) {
        if self.mount.is_some() {
            let _ = std::fs::write(path.join("cgroup.kill"), "1");
        }
    }

    /// Whether the kernel OOM-killed a process of the cgroup.
    pub fn oom_killed(path: &Path) -> bool {
        std::fs::read_to_string(path.join("memory.events"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("oom_kill "))
                    .and_then(|v| v.trim().parse::<u64>().ok())
            })
            .is_some_and(|n| n > 0)
    }

    /// Whether no process is left in the cgroup (or it is gone).
    fn is_empty(path: &Path) -> bool {
        std::fs::read_to_string(path.join("cgroup.procs"))
            .map(|s| s.trim().is_empty())
            .unwrap_or(true)
    }

    /// Removes the cgroup once its processes are gone (kills stragglers).
    pub fn remove(&self, path: &Path) -> Result<(), CgroupError> {
        if self.mount.is_none() || !path.exists() {
            return Ok(());
        }
        for _ in 0..100 {
            // Programs go with the cgroup anyway, but only once the kernel
            // releases it; detached now, none outlives RemoveContainer.
            if Self::is_empty(path) {
                if let Err(e) = crate::linux::bpf::detach_all(path) {
                    tracing::warn!(cgroup = %path.display(), error = %e, "cannot detach the device program");
                }
            }
            match std::fs::remove_dir(path) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                Err(_) => {
                    self.kill(path);
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
            }
        }
        std::fs::remove_dir(path).map_err(|source| CgroupError::Io {
            path: path.display().to_string(),
            what: "remove".into(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubelet_weight_conversion() {
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(shares_to_weight(1024), 39);
        assert_eq!(shares_to_weight(262_144), 10_000);
    }

    #[test]
    fn files_from_resources() {
        let r = Resources {
            cpu_quota: 50_000,
            cpu_period: 100_000,
            memory_limit: 64 << 20,
            memory_swap_limit: 96 << 20,
            unified: BTreeMap::from([("memory.high".to_string(), "50000000".to_string())]),
            ..Default::default()
        };
        let f = r.files().unwrap();
        let get = |n: &str| f.iter().find(|x| x.0 == n).map(|x| x.1.clone());
        assert_eq!(get("cpu.max").as_deref(), Some("50000 100000"));
        assert_eq!(get("memory.max").as_deref(), Some("67108864"));
        assert_eq!(get("memory.swap.max").as_deref(), Some("33554432"));
        assert_eq!(get("memory.high").as_deref(), Some("50000000"));
        let bad = Resources {
            unified: BTreeMap::from([("../../x".to_string(), "1".to_string())]),
            ..Default::default()
        };
        assert!(bad.files().is_err());
    }
}
