//! RuntimeService: runtime info now; pods and containers land with their issues.

use super::events::Kind;
use super::{container, pod, rpc, stats, Daemon};
use cri_proto::v1 as cri;
use cri_proto::v1::runtime_service_server::RuntimeService;
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use tonic::{Request, Response, Status};

pub struct RuntimeApi(pub Arc<Daemon>);

pub const RUNTIME_NAME: &str = "berth";
pub const CRI_VERSION: &str = "v1";

type Stream<T> = Pin<Box<dyn tokio_stream::Stream<Item = Result<T, Status>> + Send>>;

fn unimplemented(rpc: &str) -> Status {
    Status::unimplemented(format!(
        "{rpc} is not implemented by berth {} yet",
        env!("CARGO_PKG_VERSION")
    ))
}

macro_rules! not_yet {
    ($($fn:ident($req:ty) -> $resp:ty = $name:literal;)*) => {
        $(
            // Spelled out as async_trait would expand it: the attribute does
            // not see into macro output.
            fn $fn<'life0, 'async_trait>(
                &'life0 self,
                _req: Request<$req>,
            ) -> Pin<Box<dyn std::future::Future<Output = Result<Response<$resp>, Status>> + Send + 'async_trait>>
            where
                'life0: 'async_trait,
                Self: 'async_trait,
            {
                Box::pin(async move { rpc($name, "", async { Err(unimplemented($name)) }).await })
            }
        )*
    };
}

#[tonic::async_trait]
impl RuntimeService for RuntimeApi {
    async fn version(
        &self,
        _req: Request<cri::VersionRequest>,
    ) -> Result<Response<cri::VersionResponse>, Status> {
        rpc("Version", "", async {
            Ok(cri::VersionResponse {
                version: "0.1.0".into(),
                runtime_name: RUNTIME_NAME.into(),
                runtime_version: env!("CARGO_PKG_VERSION").into(),
                runtime_api_version: CRI_VERSION.into(),
            })
        })
        .await
    }

    async fn status(
        &self,
        req: Request<cri::StatusRequest>,
    ) -> Result<Response<cri::StatusResponse>, Status> {
        let verbose = req.get_ref().verbose;
        rpc("Status", "", async {
            let conditions = vec![
                cri::RuntimeCondition {
                    r#type: "RuntimeReady".into(),
                    status: true,
                    reason: String::new(),
                    message: String::new(),
                },
                {
                    let r = self.0.pods.network().readiness();
                    cri::RuntimeCondition {
                        r#type: "NetworkReady".into(),
                        status: r.ready,
                        reason: r.reason,
                        message: r.message,
                    }
                },
            ];
            let mut info = HashMap::new();
            if verbose {
                let cfg = serde_json::to_string(&self.0.config)
                    .map_err(|e| Status::internal(format!("encode config: {e}")))?;
                info.insert("config".to_string(), cfg);
                let rc: Option<serde_json::Value> =
                    crate::store::read_json(&self.0.config.root.join("runtime-config.json"))
                        .ok()
                        .flatten();
                if let Some(rc) = rc {
                    info.insert("runtimeConfig".to_string(), rc.to_string());
                }
            }
            Ok(cri::StatusResponse {
                status: Some(cri::RuntimeStatus { conditions }),
                info,
                runtime_handlers: self
                    .0
                    .handlers
                    .all()
                    .iter()
                    .map(|h| cri::RuntimeHandler {
                        name: h.name.clone(),
                        features: Some(cri::RuntimeHandlerFeatures {
                            // runc 1.1 and crun 1.8 (Debian 12) lack "rro".
                            recursive_read_only_mounts: h.builtin().is_some()
                                && crate::container::recursive_readonly_supported(),
                            user_namespaces: h.builtin().is_some_and(|b| b.user_namespaces)
                                && self.0.features.user_namespaces.is_ok(),
                        }),
                    })
                    .collect(),
                features: Some(cri::RuntimeFeatures {
                    supplemental_groups_policy: true,
                    user_namespaces_host_network: self.0.features.user_namespaces_host_network,
                }),
            })
        })
        .await
    }

    async fn runtime_config(
        &self,
        _req: Request<cri::RuntimeConfigRequest>,
    ) -> Result<Response<cri::RuntimeConfigResponse>, Status> {
        rpc("RuntimeConfig", "", async {
            Ok(cri::RuntimeConfigResponse {
                linux: Some(cri::LinuxRuntimeConfiguration {
                    cgroup_driver: cri::CgroupDriver::Cgroupfs as i32,
                }),
            })
        })
        .await
    }

    async fn update_runtime_config(
        &self,
        req: Request<cri::UpdateRuntimeConfigRequest>,
    ) -> Result<Response<cri::UpdateRuntimeConfigResponse>, Status> {
        // kubelet sends the node's pod CIDR here: kept (on disk, so it
        // survives restarts) for the network, shown in Status's verbose info.
        let cidr = req
            .into_inner()
            .runtime_config
            .and_then(|c| c.network_config)
            .map(|n| n.pod_cidr)
            .unwrap_or_default();
        rpc("UpdateRuntimeConfig", &cidr, async {
            for part in cidr.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                if part.parse::<ipnet::IpNet>().is_err() {
                    return Err(Status::invalid_argument(format!(
                        "UpdateRuntimeConfig: pod CIDR {part:?} is not an address/prefix"
                    )));
                }
            }
            let file = self.0.config.root.join("runtime-config.json");
            crate::store::write_json(&file, &serde_json::json!({ "podCIDR": cidr }))
                .map_err(|e| Status::internal(format!("record the pod CIDR: {e}")))?;
            tracing::info!(pod_cidr = %cidr, "runtime config updated");
            Ok(cri::UpdateRuntimeConfigResponse {})
        })
        .await
    }

    async fn run_pod_sandbox(
        &self,
        req: Request<cri::RunPodSandboxRequest>,
    ) -> Result<Response<cri::RunPodSandboxResponse>, Status> {
        let req = req.into_inner();
        let name = req
            .config
            .as_ref()
            .and_then(|c| c.metadata.as_ref())
            .map(|m| format!("{}/{}", m.namespace, m.name))
            .unwrap_or_default();
        rpc("RunPodSandbox", &name, async {
            let spec = pod::spec_from(req, &self.0.handlers)?;
            let id = pod::blocking(&self.0, move |d| d.pods.run(spec)).await?;
            self.0.emit(&id, &id, Kind::ContainerCreatedEvent);
            self.0.emit(&id, &id, Kind::ContainerStartedEvent);
            Ok(cri::RunPodSandboxResponse { pod_sandbox_id: id })
        })
        .await
    }

    async fn stop_pod_sandbox(
        &self,
        req: Request<cri::StopPodSandboxRequest>,
    ) -> Result<Response<cri::StopPodSandboxResponse>, Status> {
        let id = req.into_inner().pod_sandbox_id;
        rpc("StopPodSandbox", &id.clone(), async {
            let ready = match self.0.pods.get(&id) {
                Ok(p) => {
                    self.0.stop_pod_containers(&p.id).await?;
                    (p.state == crate::pod::PodState::Ready).then_some(p.id)
                }
                Err(_) => None,
            };
            pod::blocking(&self.0, move |d| d.pods.stop(&id)).await?;
            if let Some(id) = ready {
                self.0.emit(&id, &id, Kind::ContainerStoppedEvent);
            }
            Ok(cri::StopPodSandboxResponse {})
        })
        .await
    }

    async fn remove_pod_sandbox(
        &self,
        req: Request<cri::RemovePodSandboxRequest>,
    ) -> Result<Response<cri::RemovePodSandboxResponse>, Status> {
        let id = req.into_inner().pod_sandbox_id;
        rpc("RemovePodSandbox", &id.clone(), async {
            let mut gone = None;
            if let Ok(p) = self.0.pods.get(&id) {
                self.0.remove_pod_containers(&p.id).await?;
                gone = Some(self.0.event(&p.id, &p.id, Kind::ContainerDeletedEvent));
            }
            pod::blocking(&self.0, move |d| d.pods.remove(&id)).await?;
            if let Some(ev) = gone {
                self.0.publish(ev);
            }
            Ok(cri::RemovePodSandboxResponse {})
        })
        .await
    }

    async fn pod_sandbox_status(
        &self,
        req: Request<cri::PodSandboxStatusRequest>,
    ) -> Result<Response<cri::PodSandboxStatusResponse>, Status> {
        let req = req.into_inner();
        rpc("PodSandboxStatus", &req.pod_sandbox_id, async {
            let p = self
                .0
                .pods
                .get(&req.pod_sandbox_id)
                .map_err(pod::status_of)?;
            let info = if req.verbose {
                pod::verbose_info(&p, &self.0.pods.exe().display().to_string())
            } else {
                HashMap::new()
            };
            Ok(cri::PodSandboxStatusResponse {
                status: Some(pod::to_status(&p)),
                info,
                containers_statuses: vec![],
                timestamp: chrono::Utc::now().timestamp_nanos_opt().unwrap_or(0),
            })
        })
        .await
    }

    async fn list_pod_sandbox(
        &self,
        req: Request<cri::ListPodSandboxRequest>,
    ) -> Result<Response<cri::ListPodSandboxResponse>, Status> {
        let filter = pod::filter_from(req.into_inner().filter);
        rpc("ListPodSandbox", "", async {
            Ok(cri::ListPodSandboxResponse {
                items: self
                    .0
                    .pods
                    .list(&filter)
                    .iter()
                    .map(pod::to_sandbox)
                    .collect(),
            })
        })
        .await
    }

    async fn create_container(
        &self,
        req: Request<cri::CreateContainerRequest>,
    ) -> Result<Response<cri::CreateContainerResponse>, Status> {
        let req = req.into_inner();
        let name = req
            .config
            .as_ref()
            .and_then(|c| c.metadata.as_ref())
            .map(|m| m.name.clone())
            .unwrap_or_default();
        rpc("CreateContainer", &name, async {
            let config = req
                .config
                .ok_or_else(|| Status::invalid_argument("CreateContainer: config is required"))?;
            let mut spec = container::spec_from(config)?;
            let pod = self
                .0
                .pods
                .get(&req.pod_sandbox_id)
                .map_err(pod::status_of)?;
            let image = self.0.images.find(&spec.image).ok_or_else(|| {
                Status::not_found(format!(
                    "CreateContainer {name}: image {:?} is not present (pull it first)",
                    spec.image
                ))
            })?;
            let config = self
                .0
                .images
                .config_json(&image)
                .map_err(|e| Status::internal(e.to_string()))?;
            let handler = self
                .0
                .handlers
                .get(&pod.spec.runtime_handler)
                .ok_or_else(|| {
                    Status::failed_precondition(format!(
                    "CreateContainer {name}: pod sandbox {} uses runtime handler {:?}, which is \
                     no longer configured (known: {})",
                    pod.id,
                    pod.spec.runtime_handler,
                    self.0.handlers.names()
                ))
                })?;
            let mut volume_images = Vec::new();
            for m in &mut spec.mounts {
                let Some(im) = m.image.as_mut() else { continue };
                let img = self.0.images.find(&im.image).ok_or_else(|| {
                    Status::not_found(format!(
                        "CreateContainer {name}: image {:?} for the volume at {} is not present \
                         (pull it first)",
                        im.image, m.container_path
                    ))
                })?;
                im.image_id = img.id.clone();
                volume_images.push(img);
            }
            let info = container::pod_info(&pod, self.0.pods.pods_dir(), handler);
            let pod_id = pod.id.clone();
            let d = self.0.clone();
            let id = tokio::task::spawn_blocking(move || {
                d.containers
                    .create(&info, spec, &image, &config, &volume_images)
            })
            .await
            .map_err(|e| Status::internal(format!("create task: {e}")))?
            .map_err(container::status_of)?;
            self.0.emit(&id, &pod_id, Kind::ContainerCreatedEvent);
            Ok(cri::CreateContainerResponse { container_id: id })
        })
        .await
    }

    async fn start_container(
        &self,
        req: Request<cri::StartContainerRequest>,
    ) -> Result<Response<cri::StartContainerResponse>, Status> {
        let id = req.into_inner().container_id;
        rpc("StartContainer", &id.clone(), async {
            let d = self.0.clone();
            let cid = id.clone();
            let started = tokio::task::spawn_blocking(move || d.containers.start(&cid))
                .await
                .map_err(|e| Status::internal(format!("start task: {e}")))?;
            let pod_id = self.0.containers.get(&id).map(|c| c.pod_id).ok();
            if let Some(pod_id) = pod_id {
                // A start that fails leaves an exited container behind.
                let kind = match started {
                    Ok(()) => Some(Kind::ContainerStartedEvent),
                    Err(crate::container::ContainerError::CannotRun { .. }) => {
                        Some(Kind::ContainerStoppedEvent)
                    }
                    Err(_) => None,
                };
                if let Some(kind) = kind {
                    self.0.emit(&id, &pod_id, kind);
                }
            }
            started.map_err(container::status_of)?;
            Ok(cri::StartContainerResponse {})
        })
        .await
    }

    async fn stop_container(
        &self,
        req: Request<cri::StopContainerRequest>,
    ) -> Result<Response<cri::StopContainerResponse>, Status> {
        let req = req.into_inner();
        rpc("StopContainer", &req.container_id, async {
            let timeout = std::time::Duration::from_secs(req.timeout.max(0) as u64);
            self.0
                .containers
                .stop(&req.container_id, timeout)
                .await
                .map_err(container::status_of)?;
            Ok(cri::StopContainerResponse {})
        })
        .await
    }

    async fn remove_container(
        &self,
        req: Request<cri::RemoveContainerRequest>,
    ) -> Result<Response<cri::RemoveContainerResponse>, Status> {
        let id = req.into_inner().container_id;
        rpc("RemoveContainer", &id, async {
            self.0.remove_container(&id).await?;
            Ok(cri::RemoveContainerResponse {})
        })
        .await
    }

    async fn list_containers(
        &self,
        req: Request<cri::ListContainersRequest>,
    ) -> Result<Response<cri::ListContainersResponse>, Status> {
        let filter = container::filter_from(req.into_inner().filter);
        rpc("ListContainers", "", async {
            Ok(cri::ListContainersResponse {
                containers: self
                    .0
                    .containers
                    .list(&filter)
                    .iter()
                    .map(container::to_container)
                    .collect(),
            })
        })
        .await
    }

    async fn container_status(
        &self,
        req: Request<cri::ContainerStatusRequest>,
    ) -> Result<Response<cri::ContainerStatusResponse>, Status> {
        let req = req.into_inner();
        rpc("ContainerStatus", &req.container_id, async {
            let c = self
                .0
                .containers
                .get(&req.container_id)
                .map_err(container::status_of)?;
            let info = if req.verbose {
                let spec =
                    std::fs::read_to_string(self.0.containers.dir_of(&c.id).join("config.json"))
                        .ok();
                container::verbose_info(&c, spec)
            } else {
                HashMap::new()
            };
            Ok(cri::ContainerStatusResponse {
                status: Some(container::to_status(&c)),
                info,
            })
        })
        .await
    }

    async fn reopen_container_log(
        &self,
        req: Request<cri::ReopenContainerLogRequest>,
    ) -> Result<Response<cri::ReopenContainerLogResponse>, Status> {
        let id = req.into_inner().container_id;
        rpc("ReopenContainerLog", &id, async {
            self.0
                .containers
                .reopen_log(&id)
                .await
                .map_err(container::status_of)?;
            Ok(cri::ReopenContainerLogResponse {})
        })
        .await
    }

    async fn exec_sync(
        &self,
        req: Request<cri::ExecSyncRequest>,
    ) -> Result<Response<cri::ExecSyncResponse>, Status> {
        let req = req.into_inner();
        rpc("ExecSync", &req.container_id.clone(), async {
            let timeout =
                (req.timeout > 0).then(|| std::time::Duration::from_secs(req.timeout as u64));
            let d = self.0.clone();
            let out = tokio::task::spawn_blocking(move || {
                d.containers.exec_sync(&req.container_id, &req.cmd, timeout)
            })
            .await
            .map_err(|e| Status::internal(format!("exec task: {e}")))?
            .map_err(container::status_of)?;
            Ok(cri::ExecSyncResponse {
                stdout: out.stdout,
                stderr: out.stderr,
                exit_code: out.exit_code,
            })
        })
        .await
    }

    async fn exec(
        &self,
        req: Request<cri::ExecRequest>,
    ) -> Result<Response<cri::ExecResponse>, Status> {
        let req = req.into_inner();
        rpc("Exec", &req.container_id.clone(), async {
            let bad = |why: &str| {
                Status::invalid_argument(format!("Exec in container {:?}: {why}", req.container_id))
            };
            if req.cmd.is_empty() {
                return Err(bad("cmd is empty"));
            }
            if !req.stdout && !req.stderr {
                return Err(bad("one of stdout and stderr is required"));
            }
            // As kubelet: a tty merges stderr into stdout.
            if req.tty && req.stderr {
                return Err(bad("tty and stderr cannot both be true"));
            }
            let (rec, _) = self
                .0
                .containers
                .running(&req.container_id)
                .map_err(container::status_of)?;
            let url = self
                .0
                .streaming
                .url(crate::streaming::Pending::Exec {
                    container_id: rec.id,
                    cmd: req.cmd,
                    io: crate::container::ExecIoRequest {
                        stdin: req.stdin,
                        stdout: req.stdout,
                        stderr: req.stderr,
                        tty: req.tty,
                    },
                })
                .map_err(|e| Status::resource_exhausted(e.to_string()))?;
            Ok(cri::ExecResponse { url })
        })
        .await
    }

    async fn attach(
        &self,
        req: Request<cri::AttachRequest>,
    ) -> Result<Response<cri::AttachResponse>, Status> {
        let req = req.into_inner();
        rpc("Attach", &req.container_id.clone(), async {
            let bad = |why: &str| {
                Status::invalid_argument(format!(
                    "Attach to container {:?}: {why}",
                    req.container_id
                ))
            };
            if !req.stdout && !req.stderr {
                return Err(bad("one of stdout and stderr is required"));
            }
            if req.tty && req.stderr {
                return Err(bad("tty and stderr cannot both be true"));
            }
            let (rec, _) = self
                .0
                .containers
                .running(&req.container_id)
                .map_err(container::status_of)?;
            // Attach goes through the monitor: refused now, not after the
            // client connected, when the monitor is gone (killed; its exit
            // may not be recorded yet).
            let sock = self.0.containers.attach_socket(&rec.id);
            if let Err(e) = tokio::net::UnixStream::connect(&sock).await {
                return Err(Status::failed_precondition(format!(
                    "Attach to container {}: its monitor is gone ({}: {e})",
                    rec.id,
                    sock.display()
                )));
            }
            let url = self
                .0
                .streaming
                .url(crate::streaming::Pending::Attach {
                    container_id: rec.id,
                    io: crate::container::ExecIoRequest {
                        stdin: req.stdin,
                        stdout: req.stdout,
                        stderr: req.stderr,
                        tty: req.tty,
                    },
                })
                .map_err(|e| Status::resource_exhausted(e.to_string()))?;
            Ok(cri::AttachResponse { url })
        })
        .await
    }

    async fn port_forward(
        &self,
        req: Request<cri::PortForwardRequest>,
    ) -> Result<Response<cri::PortForwardResponse>, Status> {
        let req = req.into_inner();
        rpc("PortForward", &req.pod_sandbox_id.clone(), async {
            if let Some(p) = req.port.iter().find(|p| !(1..=65535).contains(*p)) {
                return Err(Status::invalid_argument(format!(
                    "PortForward to pod {:?}: invalid port {p}",
                    req.pod_sandbox_id
                )));
            }
            let rec = self
                .0
                .pods
                .get(&req.pod_sandbox_id)
                .map_err(pod::status_of)?;
            if rec.state != crate::pod::PodState::Ready {
                return Err(Status::failed_precondition(format!(
                    "PortForward to pod {}: the pod sandbox is not ready",
                    rec.id
                )));
            }
            let url = self
                .0
                .streaming
                .url(crate::streaming::Pending::PortForward {
                    pod_id: rec.id,
                    netns: rec.netns,
                })
                .map_err(|e| Status::resource_exhausted(e.to_string()))?;
            Ok(cri::PortForwardResponse { url })
        })
        .await
    }

    async fn update_container_resources(
        &self,
        req: Request<cri::UpdateContainerResourcesRequest>,
    ) -> Result<Response<cri::UpdateContainerResourcesResponse>, Status> {
        let req = req.into_inner();
        rpc("UpdateContainerResources", &req.container_id, async {
            let linux = req.linux.ok_or_else(|| {
                Status::invalid_argument(format!(
                    "UpdateContainerResources {}: linux resources are required",
                    req.container_id
                ))
            })?;
            let oom = Some(linux.oom_score_adj);
            let res = container::resources_from(linux);
            let containers = self.0.containers.clone();
            let id = req.container_id.clone();
            tokio::task::spawn_blocking(move || containers.update_resources(&id, res, oom))
                .await
                .map_err(|e| Status::internal(format!("update task: {e}")))?
                .map_err(container::status_of)?;
            Ok(cri::UpdateContainerResourcesResponse {})
        })
        .await
    }

    async fn update_pod_sandbox_resources(
        &self,
        req: Request<cri::UpdatePodSandboxResourcesRequest>,
    ) -> Result<Response<cri::UpdatePodSandboxResourcesResponse>, Status> {
        let req = req.into_inner();
        rpc("UpdatePodSandboxResources", &req.pod_sandbox_id, async {
            let res = container::resources_from(req.resources.unwrap_or_default());
            let pods = self.0.pods.clone();
            let id = req.pod_sandbox_id.clone();
            tokio::task::spawn_blocking(move || pods.update_resources(&id, res))
                .await
                .map_err(|e| Status::internal(format!("update task: {e}")))?
                .map_err(pod::status_of)?;
            Ok(cri::UpdatePodSandboxResourcesResponse {})
        })
        .await
    }

    async fn container_stats(
        &self,
        req: Request<cri::ContainerStatsRequest>,
    ) -> Result<Response<cri::ContainerStatsResponse>, Status> {
        let req = req.into_inner();
        rpc("ContainerStats", &req.container_id.clone(), async {
            stats::container_stats(&self.0, req).await
        })
        .await
    }

    async fn list_container_stats(
        &self,
        req: Request<cri::ListContainerStatsRequest>,
    ) -> Result<Response<cri::ListContainerStatsResponse>, Status> {
        rpc("ListContainerStats", "", async {
            stats::list_container_stats(&self.0, req.into_inner()).await
        })
        .await
    }

    async fn pod_sandbox_stats(
        &self,
        req: Request<cri::PodSandboxStatsRequest>,
    ) -> Result<Response<cri::PodSandboxStatsResponse>, Status> {
        let req = req.into_inner();
        rpc("PodSandboxStats", &req.pod_sandbox_id.clone(), async {
            stats::pod_sandbox_stats(&self.0, req).await
        })
        .await
    }

    async fn list_pod_sandbox_stats(
        &self,
        req: Request<cri::ListPodSandboxStatsRequest>,
    ) -> Result<Response<cri::ListPodSandboxStatsResponse>, Status> {
        rpc("ListPodSandboxStats", "", async {
            stats::list_pod_sandbox_stats(&self.0, req.into_inner()).await
        })
        .await
    }

    async fn list_metric_descriptors(
        &self,
        _req: Request<cri::ListMetricDescriptorsRequest>,
    ) -> Result<Response<cri::ListMetricDescriptorsResponse>, Status> {
        rpc("ListMetricDescriptors", "", async {
            Ok(stats::list_metric_descriptors())
        })
        .await
    }

    async fn list_pod_sandbox_metrics(
        &self,
        _req: Request<cri::ListPodSandboxMetricsRequest>,
    ) -> Result<Response<cri::ListPodSandboxMetricsResponse>, Status> {
        rpc("ListPodSandboxMetrics", "", async {
            stats::list_pod_sandbox_metrics(&self.0).await
        })
        .await
    }

    not_yet! {
        checkpoint_container(cri::CheckpointContainerRequest) -> cri::CheckpointContainerResponse = "CheckpointContainer";
    }

    type StreamPodSandboxesStream = Stream<cri::StreamPodSandboxesResponse>;
    type StreamContainersStream = Stream<cri::StreamContainersResponse>;
    type StreamContainerStatsStream = Stream<cri::StreamContainerStatsResponse>;
    type StreamPodSandboxStatsStream = Stream<cri::StreamPodSandboxStatsResponse>;
    type GetContainerEventsStream = Stream<cri::ContainerEventResponse>;
    type StreamPodSandboxMetricsStream = Stream<cri::StreamPodSandboxMetricsResponse>;

    async fn get_container_events(
        &self,
        _req: Request<cri::GetEventsRequest>,
    ) -> Result<Response<Self::GetContainerEventsStream>, Status> {
        use tokio_stream::StreamExt;
        let rx = self.0.events.subscribe();
        tracing::debug!("container events subscriber joined");
        let stream = tokio_stream::wrappers::BroadcastStream::new(rx).map_while(|ev| match ev {
            Ok(ev) => Some(Ok(ev)),
            Err(tokio_stream::wrappers::errors::BroadcastStreamRecvError::Lagged(n)) => {
                tracing::warn!(
                    missed = n,
                    "container events subscriber fell behind: dropped"
                );
                None
            }
        });
        Ok(Response::new(
            Box::pin(stream) as Self::GetContainerEventsStream
        ))
    }

    async fn stream_pod_sandboxes(
        &self,
        req: Request<cri::StreamPodSandboxesRequest>,
    ) -> Result<Response<Self::StreamPodSandboxesStream>, Status> {
        let filter = pod::filter_from(req.into_inner().filter);
        rpc("StreamPodSandboxes", "", async {
            let items: Vec<cri::PodSandbox> = self
                .0
                .pods
                .list(&filter)
                .iter()
                .map(pod::to_sandbox)
                .collect();
            let chunks = super::chunks::by_size(items)
                .into_iter()
                .map(|pod_sandboxes| Ok(cri::StreamPodSandboxesResponse { pod_sandboxes }));
            Ok(Box::pin(tokio_stream::iter(chunks)) as Self::StreamPodSandboxesStream)
        })
        .await
    }

    async fn stream_containers(
        &self,
        req: Request<cri::StreamContainersRequest>,
    ) -> Result<Response<Self::StreamContainersStream>, Status> {
        let filter = container::filter_from(req.into_inner().filter);
        rpc("StreamContainers", "", async {
            let items: Vec<cri::Container> = self
                .0
                .containers
                .list(&filter)
                .iter()
                .map(container::to_container)
                .collect();
            let chunks = super::chunks::by_size(items)
                .into_iter()
                .map(|containers| Ok(cri::StreamContainersResponse { containers }));
            Ok(Box::pin(tokio_stream::iter(chunks)) as Self::StreamContainersStream)
        })
        .await
    }

    async fn stream_container_stats(
        &self,
        req: Request<cri::StreamContainerStatsRequest>,
    ) -> Result<Response<Self::StreamContainerStatsStream>, Status> {
        let filter = req.into_inner().filter;
        rpc("StreamContainerStats", "", async {
            let list =
                stats::list_container_stats(&self.0, cri::ListContainerStatsRequest { filter })
                    .await?;
            let chunks = super::chunks::by_size(list.stats)
                .into_iter()
                .map(|container_stats| Ok(cri::StreamContainerStatsResponse { container_stats }));
            Ok(Box::pin(tokio_stream::iter(chunks)) as Self::StreamContainerStatsStream)
        })
        .await
    }

    async fn stream_pod_sandbox_stats(
        &self,
        req: Request<cri::StreamPodSandboxStatsRequest>,
    ) -> Result<Response<Self::StreamPodSandboxStatsStream>, Status> {
        let filter = req.into_inner().filter;
        rpc("StreamPodSandboxStats", "", async {
            let list =
                stats::list_pod_sandbox_stats(&self.0, cri::ListPodSandboxStatsRequest { filter })
                    .await?;
            let chunks = super::chunks::by_size(list.stats)
                .into_iter()
                .map(|pod_sandbox_stats| {
                    Ok(cri::StreamPodSandboxStatsResponse { pod_sandbox_stats })
                });
            Ok(Box::pin(tokio_stream::iter(chunks)) as Self::StreamPodSandboxStatsStream)
        })
        .await
    }

    async fn stream_pod_sandbox_metrics(
        &self,
        _req: Request<cri::StreamPodSandboxMetricsRequest>,
    ) -> Result<Response<Self::StreamPodSandboxMetricsStream>, Status> {
        rpc("StreamPodSandboxMetrics", "", async {
            let list = stats::list_pod_sandbox_metrics(&self.0).await?;
            let chunks =
                super::chunks::by_size(list.pod_metrics)
                    .into_iter()
                    .map(|pod_sandbox_metrics| {
                        Ok(cri::StreamPodSandboxMetricsResponse {
                            pod_sandbox_metrics,
                        })
                    });
            Ok(Box::pin(tokio_stream::iter(chunks)) as Self::StreamPodSandboxMetricsStream)
        })
        .await
    }
}
