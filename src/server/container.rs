//! Container RPCs: CRI <-> container domain types.

use super::Daemon;
use crate::container::security::{DeviceSpec, PidMode, Profile, SecuritySpec};
use crate::container::{
    ContainerError, ContainerFilter, ContainerRecord, ContainerSpec, ContainerState, ImageMount,
    MountSpec, PodInfo, Propagation,
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
    let had_security_context = linux.security_context.is_some();
    let sc = linux.security_context.unwrap_or_default();
    let r = linux.resources.unwrap_or_default();
    let oom_score_adj = r.oom_score_adj;
    let resources = resources_from(r);
    let mut mounts = Vec::new();
    for m in c.mounts {
        if let Some(img) = m.image {
            if img.image.trim().is_empty() {
                return Err(Status::invalid_argument(format!(
                    "CreateContainer: image volume at {}: image.image is empty",
                    m.container_path
                )));
            }
            // Always read-only: the image's layers are shared.
            mounts.push(MountSpec {
                container_path: m.container_path,
                readonly: true,
                image: Some(ImageMount {
                    image: img.image.trim().to_string(),
                    sub_path: m.image_sub_path,
                    ..Default::default()
                }),
                ..Default::default()
            });
            continue;
        }
        if m.recursive_read_only && !m.readonly {
            return Err(Status::invalid_argument(format!(
                "CreateContainer: mount {}: recursive_read_only needs readonly",
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
            recursive_readonly: m.recursive_read_only,
            image: None,
        });
    }
    let (run_as_user, run_as_group) = (
        sc.run_as_user.map(|v| v.value),
        sc.run_as_group.map(|v| v.value),
    );
    let run_as_username = sc.run_as_username.clone();
    let security = security_from(sc, had_security_context, c.devices)?;
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
        run_as_user,
        run_as_group,
        run_as_username,
        security,
        resources,
        oom_score_adj,
        stop_signal: match cri::Signal::try_from(c.stop_signal) {
            Ok(cri::Signal::RuntimeDefault) | Err(_) => String::new(),
            Ok(s) => s.as_str_name().to_string(),
        },
    })
}

/// A SecurityProfile, or else the legacy path string ("runtime/default",
/// "docker/default", "unconfined", "localhost/<x>"); neither is Unconfined
/// (kubelet always sends one).
fn profile_from(
    what: &str,
    p: Option<cri::SecurityProfile>,
    legacy: &str,
) -> Result<Profile, Status> {
    if let Some(p) = p {
        return match cri::security_profile::ProfileType::try_from(p.profile_type) {
            Ok(cri::security_profile::ProfileType::RuntimeDefault) => Ok(Profile::RuntimeDefault),
            Ok(cri::security_profile::ProfileType::Unconfined) => Ok(Profile::Unconfined),
            Ok(cri::security_profile::ProfileType::Localhost) if !p.localhost_ref.is_empty() => {
                Ok(Profile::Localhost(p.localhost_ref))
            }
            Ok(cri::security_profile::ProfileType::Localhost) => Err(Status::invalid_argument(
                format!("CreateContainer: {what} profile Localhost needs localhost_ref"),
            )),
            Err(_) => Err(Status::invalid_argument(format!(
                "CreateContainer: unknown {what} profile type {}",
                p.profile_type
            ))),
        };
    }
    match legacy {
        "" | "unconfined" => Ok(Profile::Unconfined),
        "runtime/default" | "docker/default" => Ok(Profile::RuntimeDefault),
        l => match l.strip_prefix("localhost/") {
            Some(x) if !x.is_empty() => Ok(Profile::Localhost(x.to_string())),
            _ => Err(Status::invalid_argument(format!(
                "CreateContainer: unknown {what} profile {l:?}"
            ))),
        },
    }
}

fn security_from(
    sc: cri::LinuxContainerSecurityContext,
    present: bool,
    devices: Vec<cri::Device>,
) -> Result<SecuritySpec, Status> {
    let caps = sc.capabilities.unwrap_or_default();
    let ns = sc.namespace_options.unwrap_or_default();
    let pid = match cri::NamespaceMode::try_from(ns.pid) {
        Ok(cri::NamespaceMode::Pod) => PidMode::Pod,
        Ok(cri::NamespaceMode::Container) => PidMode::Container,
        Ok(cri::NamespaceMode::Node) => PidMode::Node,
        Ok(cri::NamespaceMode::Target) if !ns.target_id.is_empty() => PidMode::Target(ns.target_id),
        Ok(cri::NamespaceMode::Target) => {
            return Err(Status::invalid_argument(
                "CreateContainer: pid namespace mode TARGET needs target_id",
            ))
        }
        Err(_) => {
            return Err(Status::invalid_argument(format!(
                "CreateContainer: unknown pid namespace mode {}",
                ns.pid
            )))
        }
    };
    for (what, v) in [("network", ns.network), ("ipc", ns.ipc)] {
        if matches!(
            cri::NamespaceMode::try_from(v),
            Ok(cri::NamespaceMode::Target) | Err(_)
        ) {
            return Err(Status::invalid_argument(format!(
                "CreateContainer: {what} namespace mode {v} is not valid for a container"
            )));
        }
    }
    // Older callers still send the deprecated path strings.
    #[allow(deprecated)]
    let (legacy_seccomp, legacy_apparmor) = (sc.seccomp_profile_path, sc.apparmor_profile);
    let seccomp = profile_from("seccomp", sc.seccomp, &legacy_seccomp)?;
    let apparmor = profile_from("AppArmor", sc.apparmor, &legacy_apparmor)?;
    Ok(SecuritySpec {
        privileged: sc.privileged,
        add_capabilities: caps.add_capabilities,
        drop_capabilities: caps.drop_capabilities,
        add_ambient_capabilities: caps.add_ambient_capabilities,
        no_new_privs: sc.no_new_privs,
        readonly_rootfs: sc.readonly_rootfs,
        masked_paths: present.then_some(sc.masked_paths),
        readonly_paths: present.then_some(sc.readonly_paths),
        seccomp,
        apparmor,
        supplemental_groups: sc.supplemental_groups,
        strict_groups: sc.supplemental_groups_policy
            == cri::SupplementalGroupsPolicy::Strict as i32,
        pid,
        host_ipc: ns.ipc == cri::NamespaceMode::Node as i32,
        host_network: ns.network == cri::NamespaceMode::Node as i32,
        devices: devices
            .into_iter()
            .map(|d| DeviceSpec {
                container_path: d.container_path,
                host_path: d.host_path,
                permissions: d.permissions,
            })
            .collect(),
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

pub fn pod_info(
    p: &PodRecord,
    pods_dir: &std::path::Path,
    handler: &crate::handlers::Handler,
) -> PodInfo {
    PodInfo {
        runtime: handler.oci().cloned(),
        default_caps: handler
            .builtin()
            .and_then(|b| b.default_capabilities.clone()),
        id: p.id.clone(),
        ready: p.state == PodState::Ready,
        netns: p.netns.clone(),
        infra_pid: p.infra.map(|i| i.pid).unwrap_or(0),
        share_pid: p.spec.pid == NsMode::Pod,
        host_pid: p.spec.pid == NsMode::Node,
        privileged: p.spec.privileged,
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
        userns: p.userns.clone().zip(p.spec.userns.clone()),
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
                // An image volume's mount point is berth's business.
                host_path: if m.image.is_some() {
                    String::new()
                } else {
                    m.host_path.clone()
                },
                image: m.image.as_ref().map(|i| cri::ImageSpec {
                    image: i.image.clone(),
                    ..Default::default()
                }),
                image_sub_path: m
                    .image
                    .as_ref()
                    .map(|i| i.sub_path.clone())
                    .unwrap_or_default(),
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
