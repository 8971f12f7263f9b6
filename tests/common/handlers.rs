//! RuntimeClass handlers, shared by tests/handlers.rs (crun, on the host)
//! and tests/vm_handlers.rs (runc, in the VM): a daemon with a delegating
//! handler, and the container lifecycle such a handler must serve exactly
//! as berth's own runtime does.

use super::*;
use cri_proto::v1 as cri;
use cri_proto::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::Channel;

/// Generous bound for a state change the daemon reports on its own; the
/// test fails (it does not measure) when it is exceeded.
const SETTLE: Duration = Duration::from_secs(60);

/// Fields are dropped in order: the daemon, then the registry, then the
/// namespace holding them.
pub struct HandlerEnv {
    pub rt: RuntimeServiceClient<Channel>,
    pub berth: Berth,
    pub reg: Registry,
    pub ns: Netns,
}

impl HandlerEnv {
    /// A daemon with `config_toml` and busybox pulled.
    pub async fn start(config_toml: &str) -> HandlerEnv {
        HandlerEnv::start_in(Netns::new(), config_toml).await
    }

    /// The same in a namespace the caller prepared.
    pub async fn start_in(ns: Netns, config_toml: &str) -> HandlerEnv {
        let Env {
            rt, berth, reg, ns, ..
        } = Env::start_in(ns, &["busybox"], &["busybox"], Env::config(config_toml)).await;
        HandlerEnv { rt, berth, reg, ns }
    }

    pub fn pod_config(&self, name: &str, cgroup_parent: &str) -> cri::PodSandboxConfig {
        cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: name.into(),
                uid: format!("uid-{name}"),
                namespace: "default".into(),
                attempt: 0,
            }),
            hostname: format!("{name}-host"),
            log_directory: self
                .berth
                .dir
                .join("pod-logs")
                .join(name)
                .display()
                .to_string(),
            linux: Some(cri::LinuxPodSandboxConfig {
                cgroup_parent: cgroup_parent.into(),
                security_context: Some(cri::LinuxSandboxSecurityContext {
                    namespace_options: Some(cri::NamespaceOption {
                        pid: cri::NamespaceMode::Container as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    pub async fn run_pod(
        &mut self,
        config: &cri::PodSandboxConfig,
        handler: &str,
    ) -> Result<String, tonic::Status> {
        self.rt
            .run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: handler.into(),
            })
            .await
            .map(|r| r.into_inner().pod_sandbox_id)
    }

    /// Creates and starts a busybox `sh -c script` container.
    pub async fn run_sh(
        &mut self,
        pod: &str,
        pod_config: &cri::PodSandboxConfig,
        name: &str,
        script: &str,
    ) -> String {
        let id = self
            .rt
            .create_container(cri::CreateContainerRequest {
                pod_sandbox_id: pod.into(),
                config: Some(cri::ContainerConfig {
                    metadata: Some(cri::ContainerMetadata {
                        name: name.into(),
                        attempt: 0,
                    }),
                    image: Some(cri::ImageSpec {
                        image: BUSYBOX.into(),
                        ..Default::default()
                    }),
                    command: vec!["/bin/sh".into(), "-c".into(), script.into()],
                    log_path: format!("{name}.log"),
                    ..Default::default()
                }),
                sandbox_config: Some(pod_config.clone()),
            })
            .await
            .unwrap_or_else(|e| panic!("create {name}: {e}\n{}", self.berth.log()))
            .into_inner()
            .container_id;
        self.rt
            .start_container(cri::StartContainerRequest {
                container_id: id.clone(),
            })
            .await
            .unwrap_or_else(|e| panic!("start {name}: {e}\n{}", self.berth.log()));
        id
    }

    pub async fn status(&mut self, id: &str) -> Result<cri::ContainerStatus, tonic::Status> {
        self.rt
            .container_status(cri::ContainerStatusRequest {
                container_id: id.into(),
                verbose: false,
            })
            .await
            .map(|r| r.into_inner().status.expect("status"))
    }

    pub async fn wait_exited(&mut self, id: &str) -> cri::ContainerStatus {
        let deadline = Instant::now() + SETTLE;
        loop {
            let st = self.status(id).await.expect("container status");
            if st.state == cri::ContainerState::ContainerExited as i32 {
                return st;
            }
            assert!(Instant::now() < deadline, "{id} did not exit: {st:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The CRI log of container `name` of pod `pod_name` once it holds `needle`.
    pub async fn log_with(&self, pod_name: &str, name: &str, needle: &str) -> String {
        let path = self
            .berth
            .dir
            .join("pod-logs")
            .join(pod_name)
            .join(format!("{name}.log"));
        let deadline = Instant::now() + SETTLE;
        loop {
            let log = fs::read_to_string(&path).unwrap_or_default();
            if log.contains(needle) {
                return log;
            }
            assert!(
                Instant::now() < deadline,
                "{} never held {needle:?}: {log:?}",
                path.display()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn exec(&mut self, id: &str, cmd: &[&str]) -> cri::ExecSyncResponse {
        self.rt
            .exec_sync(cri::ExecSyncRequest {
                container_id: id.into(),
                cmd: cmd.iter().map(|s| s.to_string()).collect(),
                timeout: 30,
            })
            .await
            .unwrap_or_else(|e| panic!("exec {cmd:?} in {id}: {e}"))
            .into_inner()
    }
}

/// The same CRI behaviour as berth's own runtime, through handler `handler`
/// whose runtime keeps its state in `runtime_root`: a pod reports its
/// handler; a container's output reaches its CRI log; ExecSync runs in the
/// container (pod hostname, exit code, output); a stop records the exit code
/// its TERM trap chose; a container that ends on its own is Completed;
/// removal also removes the runtime's state.
pub async fn delegated_lifecycle(
    env: &mut HandlerEnv,
    handler: &str,
    runtime_root: &Path,
    cgroup_parent: &str,
) {
    let cfg = env.pod_config("deleg", cgroup_parent);
    let pod = env
        .run_pod(&cfg, handler)
        .await
        .unwrap_or_else(|e| panic!("run pod with {handler}: {e}"));
    let ps = env
        .rt
        .pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: pod.clone(),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap();
    assert_eq!(ps.runtime_handler, handler);

    let id = env
        .run_sh(
            &pod,
            &cfg,
            "web",
            "trap 'echo got-term; exit 7' TERM; echo hello-out; echo hello-err >&2; \
             while true; do sleep 0.1; done",
        )
        .await;
    let st = env.status(&id).await.unwrap();
    assert_eq!(st.state, cri::ContainerState::ContainerRunning as i32);
    let log = env.log_with("deleg", "web", "hello-err").await;
    assert!(log.contains(" stdout F hello-out"), "{log}");
    assert!(log.contains(" stderr F hello-err"), "{log}");
    // The runtime, not berth's init, holds the container.
    assert!(
        runtime_root.join(&id).exists(),
        "no {handler} state for {id}"
    );

    let r = env
        .exec(
            &id,
            &[
                "sh",
                "-c",
                "echo exec-out; hostname; echo exec-err >&2; exit 3",
            ],
        )
        .await;
    assert_eq!(r.exit_code, 3);
    assert_eq!(String::from_utf8_lossy(&r.stdout), "exec-out\ndeleg-host\n");
    assert_eq!(String::from_utf8_lossy(&r.stderr), "exec-err\n");
    let r = env.exec(&id, &["cat", "/proc/1/cmdline"]).await;
    assert_eq!(r.exit_code, 0);
    assert!(String::from_utf8_lossy(&r.stdout).starts_with("/bin/sh\0-c\0"));

    env.rt
        .stop_container(cri::StopContainerRequest {
            container_id: id.clone(),
            timeout: 30,
        })
        .await
        .unwrap();
    let st = env.wait_exited(&id).await;
    assert_eq!((st.exit_code, st.reason.as_str()), (7, "Error"));
    env.log_with("deleg", "web", "got-term").await;
    // Exec into a stopped container fails cleanly.
    let e = env
        .rt
        .exec_sync(cri::ExecSyncRequest {
            container_id: id.clone(),
            cmd: vec!["true".into()],
            timeout: 5,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");

    let done = env.run_sh(&pod, &cfg, "job", "echo finished").await;
    let st = env.wait_exited(&done).await;
    assert_eq!((st.exit_code, st.reason.as_str()), (0, "Completed"));
    env.log_with("deleg", "job", "finished").await;

    for c in [&id, &done] {
        for _ in 0..2 {
            env.rt
                .remove_container(cri::RemoveContainerRequest {
                    container_id: c.to_string(),
                })
                .await
                .unwrap();
        }
        let e = env.status(c).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::NotFound);
        assert!(
            !runtime_root.join(c).exists(),
            "{handler} state left for {c}"
        );
    }
    env.rt
        .stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await
        .unwrap();
    env.rt
        .remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: pod,
        })
        .await
        .unwrap();
}
