//! A daemon with images pulled from the test registry, and the CRI calls
//! most integration tests make: one place, so the test files say only
//! what they test.
//!
//! ```ignore
//! let mut env = Env::start(&["busybox"]).await;
//! let pod = env.pod("web").await;
//! let id = env.run(&pod, sh("c", BUSYBOX, "echo hi")).await;
//! env.wait_exit(&id).await;
//! assert_eq!(env.output("web", "c"), "hi");
//! env.finish().await;
//! ```
//!
//! Test files add their own `impl Env` blocks for what only they need.

use super::{Berth, BerthOpts, Netns, Registry, RegistryOpts};
use cri_proto::v1 as cri;
use cri_proto::v1::image_service_client::ImageServiceClient;
use cri_proto::v1::runtime_service_client::RuntimeServiceClient;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tonic::transport::Channel;

/// The test registry (inside every test's own network namespace).
pub const REGISTRY: &str = "127.0.0.1:5000";
/// busybox from test-images/, as pushed by [`Env::start`].
pub const BUSYBOX: &str = "127.0.0.1:5000/busybox:latest";
/// How long a wait for a container state may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(30);

/// The reference [`Env::start`] pushes test image `name` under.
pub fn image_ref(name: &str) -> String {
    format!("{REGISTRY}/{name}:latest")
}

/// registries.conf letting berth pull over plain http from [`REGISTRY`].
pub fn insecure_registry_conf() -> String {
    format!("[[registry]]\nlocation = \"{REGISTRY}\"\ninsecure = true\n")
}

/// A container running `sh -c script` in `image`, logging to
/// `<name>/0.log` under its pod's log directory.
pub fn sh(name: &str, image: &str, script: &str) -> cri::ContainerConfig {
    cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(cri::ImageSpec {
            image: image.into(),
            ..Default::default()
        }),
        command: vec!["sh".into(), "-c".into(), script.into()],
        log_path: format!("{name}/0.log"),
        ..Default::default()
    }
}

/// A read-only CRI mount of test image `image` (only its `sub_path`, if
/// not empty).
pub fn image_mount(container_path: &str, image: &str, sub_path: &str) -> cri::Mount {
    cri::Mount {
        container_path: container_path.into(),
        image: Some(cri::ImageSpec {
            image: image_ref(image),
            ..Default::default()
        }),
        image_sub_path: sub_path.into(),
        readonly: true,
        ..Default::default()
    }
}

/// Mount points in the test's mount namespace below `dir`.
pub fn ns_mounts_under(ns: &Netns, dir: &std::path::Path) -> Vec<PathBuf> {
    super::leaked_mounts(&format!("/proc/{}/mountinfo", ns.pid()), dir)
}

/// Pod metadata the tests use: `name`, uid `uid-<name>`, namespace default.
pub fn pod_metadata(name: &str) -> cri::PodSandboxMetadata {
    cri::PodSandboxMetadata {
        name: name.into(),
        uid: format!("uid-{name}"),
        namespace: "default".into(),
        attempt: 0,
    }
}

/// Namespace options with the given network, pid and ipc modes.
pub fn ns_opts(
    network: cri::NamespaceMode,
    pid: cri::NamespaceMode,
    ipc: cri::NamespaceMode,
) -> cri::NamespaceOption {
    cri::NamespaceOption {
        network: network as i32,
        pid: pid as i32,
        ipc: ipc as i32,
        ..Default::default()
    }
}

/// The CRI log's text without its `time stream tag` prefixes.
pub fn strip_cri_log(log: &str) -> String {
    log.lines()
        .map(|l| l.splitn(4, ' ').nth(3).unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Fields drop in order: clients, daemon, registry, and the namespace last
/// (dropping it kills what was started in it).
pub struct Env {
    pub rt: RuntimeServiceClient<Channel>,
    pub im: ImageServiceClient<Channel>,
    pub berth: Berth,
    pub reg: Registry,
    pub ns: Netns,
    /// Parent of the pods' log directories ([`Env::pod_config`]).
    pub logs: PathBuf,
}

impl Env {
    /// A registry holding the test images `images` (as `<name>:latest`) and
    /// a daemon with the defaults that has pulled them all.
    pub async fn start(images: &[&str]) -> Env {
        Self::start_with(images, BerthOpts::default()).await
    }

    /// As [`Env::start`] with daemon options; the registry is made
    /// insecure unless `opts` says otherwise.
    pub async fn start_with(images: &[&str], opts: BerthOpts) -> Env {
        Self::start_images(images, images, opts).await
    }

    /// A registry holding the test images `push`, a daemon started with
    /// `opts` that has pulled the test images `pull`.
    pub async fn start_images(push: &[&str], pull: &[&str], opts: BerthOpts) -> Env {
        Self::start_in(Netns::new(), push, pull, opts).await
    }

    /// As [`Env::start_images`] in a namespace the caller prepared.
    pub async fn start_in(ns: Netns, push: &[&str], pull: &[&str], mut opts: BerthOpts) -> Env {
        let reg = Registry::start(&ns, RegistryOpts::default());
        for i in push {
            reg.push(i, &format!("{i}:latest"));
        }
        opts.registries_conf
            .get_or_insert_with(insecure_registry_conf);
        let berth = Berth::start(&ns, opts);
        let im = berth.image_client().await;
        let rt = berth.runtime_client().await;
        let logs = berth.dir.join("pod-logs");
        let mut env = Env {
            rt,
            im,
            berth,
            reg,
            ns,
            logs,
        };
        for i in pull {
            env.pull(&image_ref(i)).await;
        }
        env
    }

    /// Daemon options with `config_toml` as berth's config.
    pub fn config(config_toml: &str) -> BerthOpts {
        BerthOpts {
            config_toml: config_toml.into(),
            ..Default::default()
        }
    }

    /// RemoveImage of test image `name`.
    pub async fn remove_image(&mut self, name: &str) -> Result<(), tonic::Status> {
        self.im
            .remove_image(cri::RemoveImageRequest {
                image: Some(cri::ImageSpec {
                    image: image_ref(name),
                    ..Default::default()
                }),
            })
            .await
            .map(|_| ())
    }

    pub async fn pull(&mut self, image: &str) -> String {
        self.im
            .pull_image(cri::PullImageRequest {
                image: Some(cri::ImageSpec {
                    image: image.into(),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("pull {image}: {e:?}"))
            .into_inner()
            .image_ref
    }

    /// A pod with its own network and ipc namespaces, a pid namespace per
    /// container, hostname `<name>-host`, a cluster DNS config and logs under
    /// [`Env::logs`].
    pub fn pod_config(&self, name: &str) -> cri::PodSandboxConfig {
        use cri::NamespaceMode::{Container, Pod};
        cri::PodSandboxConfig {
            metadata: Some(pod_metadata(name)),
            hostname: format!("{name}-host"),
            log_directory: self.logs.join(name).display().to_string(),
            dns_config: Some(cri::DnsConfig {
                servers: vec!["10.96.0.10".into()],
                searches: vec!["default.svc.cluster.local".into()],
                options: vec!["ndots:5".into()],
            }),
            linux: Some(cri::LinuxPodSandboxConfig {
                security_context: Some(cri::LinuxSandboxSecurityContext {
                    namespace_options: Some(ns_opts(Pod, Container, Pod)),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    pub async fn try_run_pod(
        &mut self,
        config: cri::PodSandboxConfig,
    ) -> Result<String, tonic::Status> {
        self.rt
            .run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(config),
                runtime_handler: String::new(),
            })
            .await
            .map(|r| r.into_inner().pod_sandbox_id)
    }

    pub async fn run_pod(&mut self, config: cri::PodSandboxConfig) -> String {
        let name = config.metadata.as_ref().map(|m| m.name.clone());
        self.try_run_pod(config)
            .await
            .unwrap_or_else(|e| panic!("run pod {name:?}: {e:?}"))
    }

    /// A pod made from [`Env::pod_config`].
    pub async fn pod(&mut self, name: &str) -> String {
        let config = self.pod_config(name);
        self.run_pod(config).await
    }

    pub async fn create(
        &mut self,
        pod: &str,
        cfg: cri::ContainerConfig,
    ) -> Result<String, tonic::Status> {
        self.rt
            .create_container(cri::CreateContainerRequest {
                pod_sandbox_id: pod.into(),
                config: Some(cfg),
                sandbox_config: None,
            })
            .await
            .map(|r| r.into_inner().container_id)
    }

    pub async fn start_container(&mut self, id: &str) {
        self.rt
            .start_container(cri::StartContainerRequest {
                container_id: id.into(),
            })
            .await
            .unwrap_or_else(|e| panic!("start {id}: {e:?}"));
    }

    /// Creates and starts a container.
    pub async fn run(&mut self, pod: &str, cfg: cri::ContainerConfig) -> String {
        let name = cfg.metadata.as_ref().unwrap().name.clone();
        let id = self
            .create(pod, cfg)
            .await
            .unwrap_or_else(|e| panic!("create {name}: {e:?}"));
        self.start_container(&id).await;
        id
    }

    pub async fn status(&mut self, id: &str) -> cri::ContainerStatus {
        self.rt
            .container_status(cri::ContainerStatusRequest {
                container_id: id.into(),
                verbose: false,
            })
            .await
            .unwrap_or_else(|e| panic!("status of {id}: {e:?}"))
            .into_inner()
            .status
            .unwrap()
    }

    pub async fn wait_exit(&mut self, id: &str) -> cri::ContainerStatus {
        let deadline = Instant::now() + WAIT;
        loop {
            let s = self.status(id).await;
            if s.state == cri::ContainerState::ContainerExited as i32 {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "container {id} did not exit: {s:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `sh -c script` through ExecSync: (stdout then stderr, exit code).
    pub async fn exec(&mut self, id: &str, script: &str) -> (String, i32) {
        let r = self
            .rt
            .exec_sync(cri::ExecSyncRequest {
                container_id: id.into(),
                cmd: vec!["sh".into(), "-c".into(), script.into()],
                timeout: 20,
            })
            .await
            .unwrap_or_else(|e| panic!("exec {script:?} in {id}: {e:?}"))
            .into_inner();
        let mut out = String::from_utf8_lossy(&r.stdout).into_owned();
        out.push_str(&String::from_utf8_lossy(&r.stderr));
        (out, r.exit_code)
    }

    /// ExecSync of `cmd`: (exit code, stdout, stderr).
    pub async fn exec_cmd(&mut self, id: &str, cmd: &[&str]) -> (i32, String, String) {
        let r = self
            .rt
            .exec_sync(cri::ExecSyncRequest {
                container_id: id.into(),
                cmd: cmd.iter().map(|s| s.to_string()).collect(),
                timeout: 20,
            })
            .await
            .unwrap_or_else(|e| panic!("exec {cmd:?} in {id}: {e:?}"))
            .into_inner();
        (
            r.exit_code,
            String::from_utf8_lossy(&r.stdout).into_owned(),
            String::from_utf8_lossy(&r.stderr).into_owned(),
        )
    }

    /// The raw CRI log of container `name` of pod `pod` (by pod name).
    pub fn log(&self, pod: &str, name: &str) -> String {
        std::fs::read_to_string(self.logs.join(pod).join(name).join("0.log")).unwrap_or_default()
    }

    /// The container's output, CRI log prefixes stripped.
    pub fn output(&self, pod: &str, name: &str) -> String {
        strip_cri_log(&self.log(pod, name))
    }

    /// The container's output once it holds `marker`.
    pub async fn output_with(&mut self, id: &str, pod: &str, name: &str, marker: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let text = self.output(pod, name);
            if text.contains(marker) {
                return text;
            }
            if Instant::now() > deadline {
                let s = self.status(id).await;
                panic!("container {name} wrote no {marker:?}: {text:?}, status {s:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// [`teardown`] of this environment.
    pub async fn finish(self) {
        let Env {
            rt,
            im,
            berth,
            reg,
            ns,
            ..
        } = self;
        drop(im);
        teardown(rt, berth, reg, ns).await;
    }
}

/// Removes every pod (and so every container) and checks that no container
/// record is left; then stops the daemon and the registry, and checks that
/// no mount, process, namespace or cgroup of the test is left.
pub async fn teardown(
    mut rt: RuntimeServiceClient<Channel>,
    berth: Berth,
    reg: Registry,
    ns: Netns,
) {
    let pods = rt
        .list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
        .await
        .unwrap()
        .into_inner()
        .items;
    for p in pods {
        rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: p.id.clone(),
        })
        .await
        .unwrap_or_else(|e| panic!("remove pod {}: {e:?}", p.id));
    }
    let left = rt
        .list_containers(cri::ListContainersRequest { filter: None })
        .await
        .unwrap()
        .into_inner()
        .containers;
    assert!(
        left.is_empty(),
        "containers left after removing their pods: {left:?}"
    );
    let dir = berth.dir.clone();
    drop(rt);
    drop(berth);
    drop(reg);
    ns.assert_no_leaks(&dir);
}
