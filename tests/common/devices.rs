//! Helpers for the device-policy tests (tests/devices.rs on the host,
//! tests/vm_devices.rs in the VM): berth with busybox pulled, pods and
//! containers that may be privileged or be given devices, shell commands
//! run through ExecSync, and what the kernel says about BPF programs.

use super::*;
use cri_proto::v1 as cri;

pub const BUSYBOX: &str = "127.0.0.1:5000/busybox:latest";

/// A registry with busybox, berth (with `opts`) and busybox pulled.
pub struct DevEnv {
    pub rt: RuntimeServiceClient<Channel>,
    pub berth: Berth,
    pub reg: Registry,
    pub ns: Netns,
}

pub async fn start(opts: BerthOpts) -> DevEnv {
    let ns = Netns::new();
    let reg = Registry::start(&ns, RegistryOpts::default());
    reg.push("busybox", "busybox:latest");
    let berth = Berth::start(
        &ns,
        BerthOpts {
            registries_conf: Some(
                "[[registry]]\nlocation = \"127.0.0.1:5000\"\ninsecure = true\n".into(),
            ),
            ..opts
        },
    );
    berth
        .image_client()
        .await
        .pull_image(cri::PullImageRequest {
            image: Some(cri::ImageSpec {
                image: BUSYBOX.into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("pull busybox");
    let rt = berth.runtime_client().await;
    DevEnv { rt, berth, reg, ns }
}

pub fn pod_config(name: &str, cgroup_parent: &str, privileged: bool) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.into(),
            uid: format!("{name}-uid"),
            namespace: "default".into(),
            attempt: 0,
        }),
        linux: Some(cri::LinuxPodSandboxConfig {
            cgroup_parent: cgroup_parent.into(),
            security_context: Some(cri::LinuxSandboxSecurityContext {
                privileged,
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// `sh -c script` as root in busybox, with the default capabilities
/// (CAP_MKNOD among them) unless `privileged`.
pub fn container_config(
    name: &str,
    script: &str,
    privileged: bool,
    devices: Vec<cri::Device>,
) -> cri::ContainerConfig {
    cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(cri::ImageSpec {
            image: BUSYBOX.into(),
            ..Default::default()
        }),
        command: vec!["sh".into(), "-c".into(), script.into()],
        devices,
        linux: Some(cri::LinuxContainerConfig {
            security_context: Some(cri::LinuxContainerSecurityContext {
                privileged,
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

impl DevEnv {
    pub async fn run_pod(&mut self, config: &cri::PodSandboxConfig) -> String {
        self.rt
            .run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: String::new(),
            })
            .await
            .expect("RunPodSandbox")
            .into_inner()
            .pod_sandbox_id
    }

    pub async fn create(
        &mut self,
        pod: &str,
        pod_config: &cri::PodSandboxConfig,
        config: cri::ContainerConfig,
    ) -> Result<String, tonic::Status> {
        self.rt
            .create_container(cri::CreateContainerRequest {
                pod_sandbox_id: pod.into(),
                config: Some(config),
                sandbox_config: Some(pod_config.clone()),
            })
            .await
            .map(|r| r.into_inner().container_id)
    }

    /// Creates and starts; panics on failure.
    pub async fn run(
        &mut self,
        pod: &str,
        pod_config: &cri::PodSandboxConfig,
        config: cri::ContainerConfig,
    ) -> String {
        let id = self
            .create(pod, pod_config, config)
            .await
            .expect("CreateContainer");
        self.rt
            .start_container(cri::StartContainerRequest {
                container_id: id.clone(),
            })
            .await
            .expect("StartContainer");
        id
    }

    /// ExecSync `sh -c script`: (exit code, stdout + stderr).
    pub async fn sh(&mut self, id: &str, script: &str) -> (i32, String) {
        let r = self
            .rt
            .exec_sync(cri::ExecSyncRequest {
                container_id: id.into(),
                cmd: vec!["sh".into(), "-c".into(), script.into()],
                timeout: 60,
            })
            .await
            .expect("ExecSync")
            .into_inner();
        let mut out = String::from_utf8_lossy(&r.stdout).into_owned();
        out.push_str(&String::from_utf8_lossy(&r.stderr));
        (r.exit_code, out)
    }

    /// Removes every pod (and so every container), then checks that
    /// nothing is left behind.
    pub async fn finish(self) {
        let DevEnv { rt, berth, reg, ns } = self;
        super::teardown(rt, berth, reg, ns).await;
    }
}

/// A shell function `o CMD` printing `CMD => ok` or `CMD => <the error>`
/// (the strerror text busybox ends its message with), for scripts that
/// try opens and list the outcome of each.
pub const OUTCOMES: &str = r#"o() { if err=$(sh -c "$1" 2>&1); then echo "$1 => ok"; else echo "$1 => ${err##*: }"; fi; }"#;

/// The fds of process `pid` that are BPF objects (programs, links, maps).
pub fn bpf_fds(pid: i32) -> Vec<String> {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| fs::read_link(e.path()).ok())
                .map(|l| l.to_string_lossy().into_owned())
                .filter(|l| l.starts_with("anon_inode:bpf"))
                .collect()
        })
        .unwrap_or_default()
}

fn bpftool_json(args: &[&str]) -> serde_json::Value {
    let tool = require_tool("bpftool", "bpftool");
    let out = Command::new(tool)
        .arg("-j")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run bpftool");
    assert!(
        out.status.success(),
        "bpftool {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

/// (id, name) of the device programs attached to the cgroup directory.
pub fn cgroup_device_programs(cgroup: &Path) -> Vec<(u64, String)> {
    let v = bpftool_json(&["cgroup", "show", &cgroup.to_string_lossy()]);
    v.as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["attach_type"] == "cgroup_device" || p["attach_type"] == "device")
        .map(|p| {
            (
                p["id"].as_u64().unwrap_or(0),
                p["name"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

/// Ids of every loaded BPF program named `name`, attached or not.
pub fn loaded_programs(name: &str) -> Vec<u64> {
    let v = bpftool_json(&["prog", "show"]);
    v.as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["name"] == name)
        .filter_map(|p| p["id"].as_u64())
        .collect()
}

/// Whether cgroup2 is mounted at /sys/fs/cgroup (where berth's default
/// cgroup mode uses it: limits and device programs apply).
pub fn pure_cgroup2_host() -> bool {
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.contains(" /sys/fs/cgroup ") && l.contains(" - cgroup2 "))
}
