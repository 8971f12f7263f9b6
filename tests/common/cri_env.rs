//! What most CRI-level tests start from: a registry with test images pushed,
//! a berth that pulls from it, CRI clients, and config builders.

use super::*;
use cri_proto::v1 as cri;
use tonic::Status;

pub const INSECURE_LOCAL_REGISTRY: &str =
    "[[registry]]\nlocation = \"127.0.0.1:5000\"\ninsecure = true\n";

/// The reference of test image `name` pushed by [`CriEnv::start`].
pub fn image_ref(name: &str) -> String {
    format!("127.0.0.1:5000/{name}:latest")
}

/// Fields drop in order: clients, berth, registry, then the namespace.
pub struct CriEnv {
    pub rt: RuntimeServiceClient<Channel>,
    pub im: ImageServiceClient<Channel>,
    pub berth: Berth,
    pub reg: Registry,
    pub ns: Netns,
}

impl CriEnv {
    /// Pushes the test images `push`, starts berth with `config_toml`, and
    /// pulls the images `pull` (names of test images).
    pub async fn start(push: &[&str], pull: &[&str], config_toml: &str) -> CriEnv {
        let ns = Netns::new();
        let reg = Registry::start(&ns, RegistryOpts::default());
        for name in push {
            reg.push(name, &format!("{name}:latest"));
        }
        let berth = Berth::start(
            &ns,
            BerthOpts {
                registries_conf: Some(INSECURE_LOCAL_REGISTRY.into()),
                config_toml: config_toml.into(),
                ..Default::default()
            },
        );
        let mut env = CriEnv {
            rt: berth.runtime_client().await,
            im: berth.image_client().await,
            berth,
            reg,
            ns,
        };
        for name in pull {
            env.pull(name).await.unwrap();
        }
        env
    }

    /// Pulls test image `name`; its image id.
    pub async fn pull(&mut self, name: &str) -> Result<String, Status> {
        self.im
            .pull_image(cri::PullImageRequest {
                image: Some(cri::ImageSpec {
                    image: image_ref(name),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner().image_ref)
    }

    pub async fn remove_image(&mut self, name: &str) -> Result<(), Status> {
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

    pub async fn run_pod(&mut self, name: &str) -> String {
        self.rt
            .run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(pod_config(name)),
                runtime_handler: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .pod_sandbox_id
    }

    /// CreateContainer in pod `pod` (made by [`CriEnv::run_pod`] as `pod_name`).
    pub async fn create(
        &mut self,
        pod: &str,
        pod_name: &str,
        config: cri::ContainerConfig,
    ) -> Result<String, Status> {
        self.rt
            .create_container(cri::CreateContainerRequest {
                pod_sandbox_id: pod.into(),
                config: Some(config),
                sandbox_config: Some(pod_config(pod_name)),
            })
            .await
            .map(|r| r.into_inner().container_id)
    }

    /// ExecSync; (exit code, stdout, stderr).
    pub async fn exec(&mut self, id: &str, cmd: &[&str]) -> (i32, String, String) {
        let r = self
            .rt
            .exec_sync(cri::ExecSyncRequest {
                container_id: id.into(),
                cmd: cmd.iter().map(|s| s.to_string()).collect(),
                timeout: 30,
            })
            .await
            .unwrap()
            .into_inner();
        (
            r.exit_code,
            String::from_utf8_lossy(&r.stdout).into_owned(),
            String::from_utf8_lossy(&r.stderr).into_owned(),
        )
    }

    /// Removes the pods (and so their containers), stops everything and
    /// asserts nothing leaked.
    pub async fn finish(mut self) {
        let pods = self
            .rt
            .list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
            .await
            .unwrap()
            .into_inner()
            .items;
        for p in pods {
            self.rt
                .remove_pod_sandbox(cri::RemovePodSandboxRequest {
                    pod_sandbox_id: p.id,
                })
                .await
                .unwrap();
        }
        let CriEnv {
            rt,
            im,
            berth,
            reg,
            ns,
        } = self;
        let dir = berth.dir.clone();
        drop((rt, im));
        drop(berth);
        drop(reg);
        ns.assert_no_leaks(&dir);
    }
}

pub fn pod_config(name: &str) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.into(),
            uid: format!("uid-{name}"),
            namespace: "default".into(),
            attempt: 0,
        }),
        ..Default::default()
    }
}

/// A container of test image `image` running `sh -c script`.
pub fn sh_config(name: &str, image: &str, script: &str) -> cri::ContainerConfig {
    cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(cri::ImageSpec {
            image: image_ref(image),
            ..Default::default()
        }),
        command: vec!["sh".into(), "-c".into(), script.into()],
        ..Default::default()
    }
}

/// A CRI mount of test image `image` (its `sub_path` only, if not empty).
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

/// Mount points in the test namespace below `dir`.
pub fn ns_mounts_under(ns: &Netns, dir: &Path) -> Vec<PathBuf> {
    leaked_mounts(&format!("/proc/{}/mountinfo", ns.pid()), dir)
}
