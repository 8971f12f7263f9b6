//! A berth with test images pulled and a CRI runtime client, for the tests
//! that attack berth from inside containers (tests/breakout.rs).

use super::{Berth, BerthOpts, Netns, Registry, RegistryOpts};
use cri_proto::v1 as cri;
use cri_proto::v1::runtime_service_client::RuntimeServiceClient;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

pub const REGISTRY: &str = "127.0.0.1:5000";

/// The image `name` as pushed by [`Cri::start`].
pub fn image_ref(name: &str) -> String {
    format!("{REGISTRY}/{name}:latest")
}

pub struct Cri {
    pub berth: Berth,
    pub rt: RuntimeServiceClient<Channel>,
    pub ns: Netns,
    registry: Registry,
}

/// A container named `name` running `sh -c script` in image `img`, logging
/// to `<name>.log` in its pod's log directory.
pub fn sh_container(name: &str, img: &str, script: &str) -> cri::ContainerConfig {
    cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(cri::ImageSpec {
            image: image_ref(img),
            ..Default::default()
        }),
        command: vec!["sh".into(), "-c".into(), script.into()],
        log_path: format!("{name}.log"),
        ..Default::default()
    }
}

/// A CRI bind mount of `host` at `container`, read-write.
pub fn volume(host: &Path, container: &str) -> cri::Mount {
    cri::Mount {
        container_path: container.into(),
        host_path: host.display().to_string(),
        ..Default::default()
    }
}

impl Cri {
    /// berth in a fresh test namespace, with `images` (from test-images/)
    /// pushed to a local registry and pulled.
    pub async fn start(images: &[&str]) -> Cri {
        let ns = Netns::new();
        let registry = Registry::start(&ns, RegistryOpts::default());
        for i in images {
            registry.push(i, &format!("{i}:latest"));
        }
        let berth = Berth::start(
            &ns,
            BerthOpts {
                registries_conf: Some(format!(
                    "[[registry]]\nlocation = \"{REGISTRY}\"\ninsecure = true\n"
                )),
                ..Default::default()
            },
        );
        let mut images_client = berth.image_client().await;
        for i in images {
            let spec = cri::ImageSpec {
                image: image_ref(i),
                ..Default::default()
            };
            images_client
                .pull_image(cri::PullImageRequest {
                    image: Some(spec),
                    ..Default::default()
                })
                .await
                .unwrap_or_else(|e| panic!("pull {i}: {e}"));
        }
        let rt = berth.runtime_client().await;
        Cri {
            berth,
            rt,
            ns,
            registry,
        }
    }

    /// Where the pod `pod` (by name) logs.
    pub fn log_dir(&self, pod: &str) -> PathBuf {
        self.berth.dir.join("logs").join(pod)
    }

    /// Runs a pod named `name`; `f` adjusts its config.
    pub async fn pod(&mut self, name: &str, f: impl FnOnce(&mut cri::PodSandboxConfig)) -> String {
        let mut config = cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: name.into(),
                uid: format!("{name}-uid"),
                namespace: "breakout".into(),
                attempt: 0,
            }),
            hostname: name.into(),
            log_directory: self.log_dir(name).display().to_string(),
            linux: Some(cri::LinuxPodSandboxConfig::default()),
            ..Default::default()
        };
        f(&mut config);
        self.rt
            .run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(config),
                runtime_handler: String::new(),
            })
            .await
            .unwrap_or_else(|e| panic!("run pod {name}: {e}"))
            .into_inner()
            .pod_sandbox_id
    }

    pub async fn create(
        &mut self,
        pod: &str,
        config: cri::ContainerConfig,
    ) -> Result<String, tonic::Status> {
        let r = self
            .rt
            .create_container(cri::CreateContainerRequest {
                pod_sandbox_id: pod.into(),
                config: Some(config),
                sandbox_config: None,
            })
            .await?;
        Ok(r.into_inner().container_id)
    }

    /// Creates and starts; panics on failure.
    pub async fn run(&mut self, pod: &str, config: cri::ContainerConfig) -> String {
        let id = self.create(pod, config).await.expect("create container");
        self.rt
            .start_container(cri::StartContainerRequest {
                container_id: id.clone(),
            })
            .await
            .expect("start container");
        id
    }

    pub async fn remove(&mut self, id: &str) {
        self.rt
            .remove_container(cri::RemoveContainerRequest {
                container_id: id.into(),
            })
            .await
            .expect("remove container");
    }

    /// ExecSync `sh -c script`: (stdout, exit code); stderr is appended to
    /// stdout.
    pub async fn sh(&mut self, id: &str, script: &str) -> (String, i32) {
        self.exec(id, &["sh", "-c", script]).await
    }

    /// ExecSync `cmd`: (stdout, exit code); stderr is appended to stdout.
    pub async fn exec(&mut self, id: &str, cmd: &[&str]) -> (String, i32) {
        let r = self
            .rt
            .exec_sync(cri::ExecSyncRequest {
                container_id: id.into(),
                cmd: cmd.iter().map(|a| a.to_string()).collect(),
                timeout: 30,
            })
            .await
            .unwrap_or_else(|e| panic!("exec {cmd:?}: {e}"))
            .into_inner();
        let text = [r.stdout, r.stderr].concat();
        (String::from_utf8_lossy(&text).into_owned(), r.exit_code)
    }

    /// The messages a container logged, once a line equals `last`.
    pub async fn log_through(&self, pod: &str, container: &str, last: &str) -> Vec<String> {
        let path = self.log_dir(pod).join(format!("{container}.log"));
        let give_up = Instant::now() + Duration::from_secs(60);
        loop {
            let lines: Vec<String> = std::fs::read_to_string(&path)
                .unwrap_or_default()
                .lines()
                .map(|l| l.splitn(4, ' ').nth(3).unwrap_or("").to_string())
                .collect();
            if lines.iter().any(|l| l == last) {
                return lines;
            }
            assert!(
                Instant::now() < give_up,
                "{container} never logged {last:?}; log so far: {lines:#?}\nberth log: {}",
                self.berth.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Removes every pod, stops berth and the registry, and checks nothing
    /// is left behind.
    pub async fn finish(self) {
        let Cri {
            berth,
            rt,
            ns,
            registry,
        } = self;
        super::teardown(rt, berth, registry, ns).await;
    }
}
