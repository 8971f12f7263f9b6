//! Container RPCs: CRI <-> container domain types.

use super::Daemon;
use crate::container::{
    ContainerError, ContainerFilter, ContainerRecord, ContainerSpec, ContainerState, MountSpec,
    PodInfo, Propagation,
};
use crate::pod::{NsMode, PodRecord, PodState};
use cri_proto::v1 as cri;
use std::collections::HashMap;
use tonic::Status;

pub fn status_of(e: ContainerError) -> Status {
    let msg = e.to_string();
    match e {
        ContainerError::NotFound(_) => Status::not_found(msg),
        ContainerError::Ambiguous(_) | ContainerError::Invalid(_) => Status::invalid_argument(msg),
        ContainerError::AlreadyExists { .. } => Status::already_exists(msg),
        ContainerError::FailedPrecondition { .. } => Status::failed_precondition(msg),
        ContainerError::CannotRun { .. } => Status::invalid_argument(msg),
        ContainerError::Internal { .. } | ContainerError::State { .. } => Status::internal(msg),
    }
}

pub fn spec_from(c: cri::ContainerConfig) -> Result<ContainerSpec, Status> {
    let md = c
        .metadata
        .ok_or_else(|| Status::invalid_argument("CreateContainer: config.metadata is required"))?;
    let image = c.image.map(|i| i.image).unwrap_or_default();
    if image.is_empty() {
        return Err(Status::invalid_argument(
            "CreateContainer: config.image.image is required",
        ));
    }
    let linux = c.linux.unwrap_or_default();
    let sc = linux.security_context.unwrap_or_default();
    let r = linux.resources.unwrap_or_default();
    let oom_score_adj = r.oom_score_adj;
    let resources = resources_from(r);
    let mut mounts = Vec::new();
    for m in c.mounts {
        if m.image.is_some() {
            return Err(Status::invalid_argument(format!(
                "CreateContainer: image volume at {} is not supported yet",
                m.container_path
            )));
        }
        mounts.push(MountSpec {
            container_path: m.container_path,
            host_path: m.host_path,
            readonly: m.readonly,
            propagation: match cri::MountPropagation::try_from(m.propagation) {
                Ok(cri::MountPropagation::PropagationHostToContainer) => {
                    Propagation::HostToContainer
                }
                Ok(cri::MountPropagation::PropagationBidirectional) => Propagation::Bidirectional,
                _ => Propagation::Private,
            },
        });
    }
    Ok(ContainerSpec {
        name: md.name,
        attempt: md.attempt,
        image,
        command: c.command,
        args: c.args,
        working_dir: c.working_dir,
        envs: c
            .envs
            .into_iter()
            .map(|kv| (kv.key, String::from_utf8_lossy(&kv.value).into_owned()))
            .collect(),
        mounts,
        labels: c.labels.into_iter().collect(),
        annotations: c.annotations.into_iter().collect(),
        log_path: c.log_path,
        tty: c.tty,
        stdin: c.stdin,
        stdin_once: c.stdin_once,
        run_as_user: sc.run_as_user.map(|v| v.value),
        run_as_group: sc.run_as_group.map(|v| v.value),
        run_as_username: sc.run_as_username,
        host_pid: sc
            .namespace_options
            .is_some_and(|n| n.pid == cri::NamespaceMode::Node as i32),
        resources,
        oom_score_adj,
        stop_signal: match cri::Signal::try_from(c.stop_signal) {
            Ok(cri::Signal::RuntimeDefault) | Err(_) => String::new(),
            Ok(s) => s.as_str_name().to_string(),
        },
    })
}

/// CRI LinuxContainerResources -> the cgroup limits they ask for.
pub fn resources_from(r: cri::LinuxContainerResources) -> crate::cgroup::Resources {
    crate::cgroup::Resources {
        cpu_period: r.cpu_period,
        cpu_quota: r.cpu_quota,
        cpu_shares: r.cpu_shares,
        memory_limit: r.memory_limit_in_bytes,
        memory_swap_limit: r.memory_swap_limit_in_bytes,
        cpuset_cpus: r.cpuset_cpus,
        cpuset_mems: r.cpuset_mems,
        hugepage_limits: r
            .hugepage_limits
            .into_iter()
            .map(|h| (h.page_size, h.limit))
            .collect(),
        unified: r.unified.into_iter().collect(),
    }
}

/// The limits as recorded (the latest UpdateContainerResources included).
pub fn resources_to_cri(
    r: &crate::cgroup::Resources,
    oom_score_adj: i64,
) -> cri::ContainerResources {
    cri::ContainerResources {
        linux: Some(cri::LinuxContainerResources {
            cpu_period: r.cpu_period,
            cpu_quota: r.cpu_quota,
            cpu_shares: r.cpu_shares,
            memory_limit_in_bytes: r.memory_limit,
            oom_score_adj,
            cpuset_cpus: r.cpuset_cpus.clone(),
            cpuset_mems: r.cpuset_mems.clone(),
            hugepage_limits: r
                .hugepage_limits
                .iter()
                .map(|(page_size, limit)| cri::HugepageLimit {
                    page_size: page_size.clone(),
                    limit: *limit,
                })
                .collect(),
            unified: r.unified.clone().into_iter().collect(),
            memory_swap_limit_in_bytes: r.memory_swap_limit,
        }),
        windows: None,
    }
}

pub fn pod_info(p: &PodRecord, pods_dir: &std::path::Path) -> PodInfo {
    PodInfo {
        id: p.id.clone(),
        ready: p.state == PodState::Ready,
        netns: p.netns.clone(),
        infra_pid: p.infra.map(|i| i.pid).unwrap_or(0),
        share_pid: p.spec.pid == NsMode::Pod,
        host_ipc: p.spec.ipc == NsMode::Node,
        host_uts: p.spec.network == NsMode::Node,
        hostname: p.hostname().to_string(),
        files_dir: pods_dir.join(&p.id),
        log_directory: p.spec.log_directory.clone(),
        cgroup_parent: p.spec.cgroup_parent.clone(),
        shm: match (&p.shm, p.spec.ipc) {
            (Some(s), _) => Some(s.clone()),
            (None, NsMode::Node) => Some(std::path::PathBuf::from("/dev/shm")),
            (None, _) => None,
        },
    }
}

fn cri_state(s: ContainerState) -> i32 {
    (match s {
        ContainerState::Created => cri::ContainerState::ContainerCreated,
        ContainerState::Running => cri::ContainerState::ContainerRunning,
        ContainerState::Exited => cri::ContainerState::ContainerExited,
        ContainerState::Creating => cri::ContainerState::ContainerUnknown,
    }) as i32
}

pub fn state_from(v: i32) -> ContainerState {
    match cri::ContainerState::try_from(v) {
        Ok(cri::ContainerState::ContainerCreated) => ContainerState::Created,
        Ok(cri::ContainerState::ContainerRunning) => ContainerState::Running,
        Ok(cri::ContainerState::ContainerExited) => ContainerState::Exited,
        _ => ContainerState::Creating,
    }
}

fn map(m: &std::collections::BTreeMap<String, String>) -> HashMap<String, String> {
    m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

fn metadata(c: &ContainerRecord) -> cri::ContainerMetadata {
    cri::ContainerMetadata {
        name: c.spec.name.clone(),
        attempt: c.spec.attempt,
    }
}

fn image_spec(c: &ContainerRecord) -> cri::ImageSpec {
    cri::ImageSpec {
        image: c.spec.image.clone(),
        ..Default::default()
    }
}

pub fn to_container(c: &ContainerRecord) -> cri::Container {
    cri::Container {
        id: c.id.clone(),
        pod_sandbox_id: c.pod_id.clone(),
        metadata: Some(metadata(c)),
        image: Some(image_spec(c)),
        image_ref: c.image_ref.clone(),
        state: cri_state(c.state),
        created_at: c.created_at,
        labels: map(&c.spec.labels),
        annotations: map(&c.spec.annotations),
        image_id: c.image_id.clone(),
    }
}

pub fn to_status(c: &ContainerRecord) -> cri::ContainerStatus {
    cri::ContainerStatus {
        id: c.id.clone(),
        metadata: Some(metadata(c)),
        state: cri_state(c.state),
        created_at: c.created_at,
        started_at: c.started_at,
        finished_at: c.finished_at,
        exit_code: c.exit_code,
        image: Some(image_spec(c)),
        image_ref: c.image_ref.clone(),
        reason: c.reason.clone(),
        message: c.message.clone(),
        labels: map(&c.spec.labels),
        annotations: map(&c.spec.annotations),
        mounts: c
            .spec
            .mounts
            .iter()
            .map(|m| cri::Mount {
                container_path: m.container_path.clone(),
                host_path: m.host_path.clone(),
                readonly: m.readonly,
                propagation: (match m.propagation {
                    Propagation::Private => cri::MountPropagation::PropagationPrivate,
                    Propagation::HostToContainer => {
                        cri::MountPropagation::PropagationHostToContainer
                    }
                    Propagation::Bidirectional => cri::MountPropagation::PropagationBidirectional,
                }) as i32,
                ..Default::default()
            })
            .collect(),
        log_path: c
            .log_path
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        resources: Some(resources_to_cri(&c.spec.resources, c.spec.oom_score_adj)),
        image_id: c.image_id.clone(),
        user: Some(cri::ContainerUser {
            linux: Some(cri::LinuxContainerUser {
                uid: c.uid as i64,
                gid: c.gid as i64,
                supplemental_groups: c.groups.iter().map(|g| *g as i64).collect(),
            }),
        }),
        stop_signal: cri::Signal::from_str_name(&c.stop_signal.to_ascii_uppercase())
            .map(|s| s as i32)
            .unwrap_or(0),
    }
}

pub fn verbose_info(c: &ContainerRecord, spec_json: Option<String>) -> HashMap<String, String> {
    let spec: serde_json::Value = spec_json
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or(serde_json::Value::Null);
    let info = serde_json::json!({
        "pid": c.init.map(|p| p.pid).unwrap_or(0),
        "sandboxID": c.pod_id,
        "runtimeSpec": spec,
    });
    HashMap::from([("info".to_string(), info.to_string())])
}

pub fn filter_from(f: Option<cri::ContainerFilter>) -> ContainerFilter {
    let Some(f) = f else {
        return ContainerFilter::default();
    };
    ContainerFilter {
        id: (!f.id.is_empty()).then_some(f.id),
        pod_id: (!f.pod_sandbox_id.is_empty()).then_some(f.pod_sandbox_id),
        state: f.state.map(|s| state_from(s.state)),
        labels: f.label_selector.into_iter().collect(),
    }
}

impl Daemon {
    /// Stops every container of a pod (kill), as StopPodSandbox must.
    pub async fn stop_pod_containers(&self, pod_id: &str) -> Result<(), Status> {
        for id in self.containers.in_pod(pod_id) {
            self.containers
                .stop(&id, std::time::Duration::ZERO)
                .await
                .map_err(status_of)?;
        }
        Ok(())
    }

    pub async fn remove_pod_containers(&self, pod_id: &str) -> Result<(), Status> {
        for id in self.containers.in_pod(pod_id) {
            self.remove_container(&id).await?;
        }
        Ok(())
    }

    /// RemoveContainer, with its CONTAINER_DELETED event when it existed.
    pub async fn remove_container(&self, id: &str) -> Result<(), Status> {
        let gone = self.containers.get(id).ok().map(|c| {
            let mut ev = self.event(&c.id, &c.pod_id, super::events::Kind::ContainerDeletedEvent);
            ev.containers_statuses.retain(|s| s.id != c.id);
            ev
        });
        self.containers.remove(id).await.map_err(status_of)?;
        if let Some(ev) = gone {
            self.publish(ev);
        }
        Ok(())
    }
}
