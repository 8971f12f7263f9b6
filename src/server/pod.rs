//! Pod sandbox RPCs: CRI <-> pod domain types.

use super::Daemon;
use crate::pod::userns::{IdRange, UserNsSpec};
use crate::pod::{DnsConfig, NsMode, PodError, PodFilter, PodRecord, PodSpec, PodState};
use cri_proto::v1 as cri;
use std::collections::HashMap;
use std::sync::Arc;
use tonic::Status;

pub fn status_of(e: PodError) -> Status {
    let msg = e.to_string();
    match e {
        PodError::NotFound(_) => Status::not_found(msg),
        PodError::Ambiguous(_) | PodError::Invalid(_) => Status::invalid_argument(msg),
        PodError::AlreadyExists { .. } => Status::already_exists(msg),
        PodError::Precondition(_) => Status::failed_precondition(msg),
        PodError::Network { source, .. } => {
            use crate::network::NetworkError as N;
            match source {
                N::InvalidPort(_) => Status::invalid_argument(msg),
                N::PortConflict { .. } => Status::failed_precondition(msg),
                N::Exhausted(_) => Status::resource_exhausted(msg),
                N::NotReady(_) | N::CniConfig(_) => Status::failed_precondition(msg),
                _ => Status::internal(msg),
            }
        }
        PodError::Kernel { .. } | PodError::State { .. } | PodError::Io { .. } => {
            Status::internal(msg)
        }
    }
}

/// CRI port mappings with a host port; those without one need no network
/// setup (kubelet lists every declared container port).
fn port_mappings(pms: Vec<cri::PortMapping>) -> Result<Vec<crate::network::PortMapping>, Status> {
    use crate::network::{PortMapping, Protocol};
    let mut out = Vec::new();
    for pm in pms {
        if pm.host_port == 0 {
            continue;
        }
        let bad = |what: String| {
            Status::invalid_argument(format!("RunPodSandbox: port_mappings: {what}"))
        };
        let host_port = u16::try_from(pm.host_port)
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| bad(format!("host_port {} is outside 1-65535", pm.host_port)))?;
        let container_port = u16::try_from(pm.container_port)
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| {
                bad(format!(
                    "container_port {} is outside 1-65535",
                    pm.container_port
                ))
            })?;
        let protocol = match cri::Protocol::try_from(pm.protocol) {
            Ok(cri::Protocol::Tcp) => Protocol::Tcp,
            Ok(cri::Protocol::Udp) => Protocol::Udp,
            Ok(cri::Protocol::Sctp) => Protocol::Sctp,
            Err(_) => return Err(bad(format!("unknown protocol {}", pm.protocol))),
        };
        let host_ip = match pm.host_ip.as_str() {
            "" => None,
            ip => {
                let ip: std::net::IpAddr = ip
                    .parse()
                    .map_err(|_| bad(format!("host_ip {ip:?} is not an IP address")))?;
                (!ip.is_unspecified()).then_some(ip)
            }
        };
        out.push(PortMapping {
            protocol,
            container_port,
            host_port,
            host_ip,
        });
    }
    Ok(out)
}

/// CRI userns options: mode NODE (or none) is the host's user namespace,
/// POD a namespace of the pod's own with kubelet's mappings.
fn userns_spec(u: Option<&cri::UserNamespace>) -> Result<Option<UserNsSpec>, String> {
    let Some(u) = u else {
        return Ok(None);
    };
    let ranges = |m: &[cri::IdMapping]| {
        m.iter()
            .map(|r| IdRange {
                container_id: r.container_id,
                host_id: r.host_id,
                length: r.length,
            })
            .collect()
    };
    match cri::NamespaceMode::try_from(u.mode) {
        Ok(cri::NamespaceMode::Node) => Ok(None),
        Ok(cri::NamespaceMode::Pod) => Ok(Some(UserNsSpec {
            uids: ranges(&u.uids),
            gids: ranges(&u.gids),
        })),
        Ok(m) => Err(format!(
            "user namespace mode {} is not valid (only POD or NODE)",
            m.as_str_name()
        )),
        Err(_) => Err(format!("unknown user namespace mode {}", u.mode)),
    }
}

fn cri_userns(u: Option<&UserNsSpec>) -> cri::UserNamespace {
    let ranges = |m: &[IdRange]| {
        m.iter()
            .map(|r| cri::IdMapping {
                host_id: r.host_id,
                container_id: r.container_id,
                length: r.length,
            })
            .collect()
    };
    match u {
        None => cri::UserNamespace {
            mode: cri::NamespaceMode::Node as i32,
            ..Default::default()
        },
        Some(u) => cri::UserNamespace {
            mode: cri::NamespaceMode::Pod as i32,
            uids: ranges(&u.uids),
            gids: ranges(&u.gids),
        },
    }
}

fn ns_mode(v: i32) -> Result<NsMode, Status> {
    match cri::NamespaceMode::try_from(v) {
        Ok(cri::NamespaceMode::Pod) => Ok(NsMode::Pod),
        Ok(cri::NamespaceMode::Container) => Ok(NsMode::Container),
        Ok(cri::NamespaceMode::Node) => Ok(NsMode::Node),
        Ok(cri::NamespaceMode::Target) => Ok(NsMode::Target),
        Err(_) => Err(Status::invalid_argument(format!(
            "unknown namespace mode {v}"
        ))),
    }
}

fn cri_ns_mode(m: NsMode) -> i32 {
    (match m {
        NsMode::Pod => cri::NamespaceMode::Pod,
        NsMode::Container => cri::NamespaceMode::Container,
        NsMode::Node => cri::NamespaceMode::Node,
        NsMode::Target => cri::NamespaceMode::Target,
    }) as i32
}

fn cri_state(s: PodState) -> i32 {
    (match s {
        PodState::Ready => cri::PodSandboxState::SandboxReady,
        PodState::Creating | PodState::NotReady => cri::PodSandboxState::SandboxNotready,
    }) as i32
}

pub fn spec_from(
    req: cri::RunPodSandboxRequest,
    handlers: &crate::handlers::Handlers,
) -> Result<PodSpec, Status> {
    let c = req
        .config
        .ok_or_else(|| Status::invalid_argument("RunPodSandbox: config is required"))?;
    let md = c
        .metadata
        .ok_or_else(|| Status::invalid_argument("RunPodSandbox: config.metadata is required"))?;
    let port_mappings = port_mappings(c.port_mappings)?;
    let linux = c.linux.unwrap_or_default();
    let sc = linux.security_context.unwrap_or_default();
    let privileged = sc.privileged;
    let opts = sc.namespace_options.unwrap_or_default();
    let userns = userns_spec(opts.userns_options.as_ref()).map_err(|e| {
        Status::invalid_argument(format!("RunPodSandbox {}/{}: {e}", md.namespace, md.name))
    })?;
    // Refused rather than ignored: a pod asking for another runtime must not
    // run on berth's.
    if handlers.get(&req.runtime_handler).is_none() {
        return Err(Status::invalid_argument(format!(
            "RunPodSandbox {}/{}: unknown runtime handler {:?} (known: {})",
            md.namespace,
            md.name,
            req.runtime_handler,
            handlers.names()
        )));
    }
    let handler_userns = handlers
        .get(&req.runtime_handler)
        .and_then(|h| h.builtin())
        .is_some_and(|b| b.user_namespaces);
    if userns.is_some() && !handler_userns {
        return Err(Status::invalid_argument(format!(
            "RunPodSandbox {}/{}: runtime handler {:?} does not run pods in user namespaces \
             (hostUsers: false)",
            md.namespace, md.name, req.runtime_handler
        )));
    }
    Ok(PodSpec {
        name: md.name,
        uid: md.uid,
        namespace: md.namespace,
        attempt: md.attempt,
        hostname: c.hostname,
        log_directory: c.log_directory,
        dns: c.dns_config.map(|d| DnsConfig {
            servers: d.servers,
            searches: d.searches,
            options: d.options,
        }),
        labels: c.labels.into_iter().collect(),
        annotations: c.annotations.into_iter().collect(),
        network: ns_mode(opts.network)?,
        pid: ns_mode(opts.pid)?,
        ipc: ns_mode(opts.ipc)?,
        runtime_handler: req.runtime_handler,
        cgroup_parent: linux.cgroup_parent,
        privileged,
        sysctls: linux.sysctls.into_iter().collect(),
        resources: linux
            .resources
            .map(super::container::resources_from)
            .unwrap_or_default(),
        port_mappings,
        userns,
    })
}

fn metadata(p: &PodRecord) -> cri::PodSandboxMetadata {
    cri::PodSandboxMetadata {
        name: p.spec.name.clone(),
        uid: p.spec.uid.clone(),
        namespace: p.spec.namespace.clone(),
        attempt: p.spec.attempt,
    }
}

fn map(m: &std::collections::BTreeMap<String, String>) -> HashMap<String, String> {
    m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

pub fn to_sandbox(p: &PodRecord) -> cri::PodSandbox {
    cri::PodSandbox {
        id: p.id.clone(),
        metadata: Some(metadata(p)),
        state: cri_state(p.state),
        created_at: p.created_at,
        labels: map(&p.spec.labels),
        annotations: map(&p.spec.annotations),
        runtime_handler: p.spec.runtime_handler.clone(),
    }
}

pub fn to_status(p: &PodRecord) -> cri::PodSandboxStatus {
    cri::PodSandboxStatus {
        id: p.id.clone(),
        metadata: Some(metadata(p)),
        state: cri_state(p.state),
        created_at: p.created_at,
        // Host-network pods have no address of their own: kubelet uses the node's.
        network: Some(cri::PodSandboxNetworkStatus {
            ip: p.ips.first().map(|i| i.to_string()).unwrap_or_default(),
            additional_ips: p
                .ips
                .iter()
                .skip(1)
                .map(|i| cri::PodIp { ip: i.to_string() })
                .collect(),
        }),
        linux: Some(cri::LinuxPodSandboxStatus {
            namespaces: Some(cri::Namespace {
                options: Some(cri::NamespaceOption {
                    network: cri_ns_mode(p.spec.network),
                    pid: cri_ns_mode(p.spec.pid),
                    ipc: cri_ns_mode(p.spec.ipc),
                    target_id: String::new(),
                    userns_options: Some(cri_userns(p.spec.userns.as_ref())),
                }),
            }),
        }),
        labels: map(&p.spec.labels),
        annotations: map(&p.spec.annotations),
        runtime_handler: p.spec.runtime_handler.clone(),
    }
}

/// PodSandboxStatus's verbose info: what kubelet and crictl inspectp show.
pub fn verbose_info(p: &PodRecord, exe: &str) -> HashMap<String, String> {
    let netns = p
        .netns
        .as_ref()
        .map(|n| n.display().to_string())
        .unwrap_or_default();
    let mut namespaces = vec![serde_json::json!({"type": "network", "path": netns})];
    if p.spec.ipc != NsMode::Node {
        namespaces.push(serde_json::json!({"type": "ipc"}));
    }
    if p.spec.network != NsMode::Node {
        namespaces.push(serde_json::json!({"type": "uts"}));
    }
    if p.spec.pid == NsMode::Pod {
        namespaces.push(serde_json::json!({"type": "pid"}));
    }
    let info = serde_json::json!({
        "pid": p.infra.map(|i| i.pid).unwrap_or(0),
        "netnsPath": netns,
        "cgroupPath": p.cgroup.as_ref().map(|c| c.display().to_string()).unwrap_or_default(),
        "runtimeHandler": p.spec.runtime_handler,
        "runtimeSpec": {
            "ociVersion": "1.2.0",
            "process": {"args": [exe, "pause", "--pod", p.id]},
            "hostname": p.hostname(),
            "linux": {"namespaces": namespaces, "cgroupsPath": p.spec.cgroup_parent},
        },
    });
    HashMap::from([("info".to_string(), info.to_string())])
}

pub fn filter_from(f: Option<cri::PodSandboxFilter>) -> PodFilter {
    let Some(f) = f else {
        return PodFilter::default();
    };
    PodFilter {
        id: (!f.id.is_empty()).then_some(f.id),
        state: f.state.map(|s| {
            if s.state == cri::PodSandboxState::SandboxReady as i32 {
                PodState::Ready
            } else {
                PodState::NotReady
            }
        }),
        labels: f.label_selector.into_iter().collect(),
    }
}

/// Runs a blocking pod operation off the async threads.
pub async fn blocking<T: Send + 'static>(
    d: &Arc<Daemon>,
    f: impl FnOnce(&Daemon) -> Result<T, PodError> + Send + 'static,
) -> Result<T, Status> {
    let d = d.clone();
    tokio::task::spawn_blocking(move || f(&d))
        .await
        .map_err(|e| Status::internal(format!("pod operation task: {e}")))?
        .map_err(status_of)
}
