//! Pod sandboxes: namespaces, the infra process, per-pod files, and their
//! crash-safe records under `<root>/pods/<id>/state.json`.
//!
//! Every kernel object is announced in the record before it is made (state
//! `Creating`), so a restart after kill -9 can remove what a half-made pod
//! left and mark pods whose infra process died as not ready.

mod files;
pub mod pause;
pub mod stats;
pub mod userns;

use crate::linux::process::{self, Namespaces, ProcessId};
use crate::linux::{netns, LinuxError};
use crate::store::{lock, read_json, resolve_id, write_json, IdMatch, StoreError};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

const INFRA_STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Size of a pod's /dev/shm, as containerd and CRI-O default it.
const SHM_SIZE: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum PodError {
    #[error("pod sandbox {0:?} not found")]
    NotFound(String),
    #[error("pod sandbox id prefix {0:?} is ambiguous")]
    Ambiguous(String),
    #[error("invalid pod sandbox config: {0}")]
    Invalid(String),
    #[error("pod sandbox {name} (namespace {namespace}, uid {uid}, attempt {attempt}) already exists as {id}")]
    AlreadyExists {
        name: String,
        namespace: String,
        uid: String,
        attempt: u32,
        id: String,
    },
    #[error("pod sandbox {id}: {source}")]
    Kernel { id: String, source: LinuxError },
    #[error("pod sandbox {id}: {source}")]
    State { id: String, source: StoreError },
    #[error("pod sandbox {id}: {source}")]
    Network {
        id: String,
        source: crate::network::NetworkError,
    },
    /// Valid, but not possible now or here (FailedPrecondition).
    #[error("{0}")]
    Precondition(String),
    #[error("pod sandbox {id}: {what}: {source}")]
    Io {
        id: String,
        what: String,
        source: std::io::Error,
    },
}

/// How a pod uses one kind of namespace (CRI NamespaceMode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum NsMode {
    #[default]
    Pod,
    Container,
    Node,
    Target,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsConfig {
    pub servers: Vec<String>,
    pub searches: Vec<String>,
    pub options: Vec<String>,
}

/// What a pod was asked to be (from the CRI PodSandboxConfig).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodSpec {
    pub name: String,
    pub uid: String,
    pub namespace: String,
    pub attempt: u32,
    pub hostname: String,
    pub log_directory: String,
    pub dns: Option<DnsConfig>,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub network: NsMode,
    pub pid: NsMode,
    pub ipc: NsMode,
    pub runtime_handler: String,
    pub cgroup_parent: String,
    /// Sandbox-level resources (LinuxPodSandboxConfig.resources), applied to
    /// the infra process's own cgroup.
    #[serde(default)]
    pub resources: crate::cgroup::Resources,
    /// LinuxSandboxSecurityContext.privileged: its containers may be privileged.
    #[serde(default)]
    pub privileged: bool,
    /// Namespaced sysctls set in the pod's network and IPC namespaces.
    #[serde(default)]
    pub sysctls: BTreeMap<String, String>,
    /// Host ports to forward (mappings with host_port 0 are left out).
    #[serde(default)]
    pub port_mappings: Vec<crate::network::PortMapping>,
    /// The pod's own user namespace (CRI userns mode POD); `None`: the host's.
    #[serde(default)]
    pub userns: Option<userns::UserNsSpec>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PodState {
    /// Being set up; objects named in the record may exist partly.
    Creating,
    Ready,
    NotReady,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Infra {
    pub pid: i32,
    pub start_time: u64,
}

impl From<Infra> for ProcessId {
    fn from(i: Infra) -> ProcessId {
        ProcessId {
            pid: i.pid,
            start_time: i.start_time,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRecord {
    pub id: String,
    pub spec: PodSpec,
    pub state: PodState,
    /// Unix nanoseconds.
    pub created_at: i64,
    /// The netns pin; `None` for host-network pods.
    pub netns: Option<PathBuf>,
    /// The pod's /dev/shm tmpfs; `None` for host-IPC pods (they use the host's).
    #[serde(default)]
    pub shm: Option<PathBuf>,
    /// The infra process's cgroup, `<cgroup parent>/<pod id>`, when cgroups are in use.
    #[serde(default)]
    pub cgroup: Option<PathBuf>,
    pub infra: Option<Infra>,
    /// The pod's addresses on its network, primary first.
    #[serde(default)]
    pub ips: Vec<std::net::IpAddr>,
    /// The pin of the pod's user namespace (`pods/<id>/userns`), when it has one.
    #[serde(default)]
    pub userns: Option<PathBuf>,
}

impl PodRecord {
    pub fn hostname(&self) -> &str {
        if self.spec.hostname.is_empty() {
            &self.spec.name
        } else {
            &self.spec.hostname
        }
    }
}

/// ListPodSandbox's filter.
#[derive(Debug, Default, Clone)]
pub struct PodFilter {
    pub id: Option<String>,
    pub state: Option<PodState>,
    pub labels: BTreeMap<String, String>,
}

pub struct PodManager {
    cgroups: std::sync::Arc<crate::cgroup::Cgroups>,
    network: std::sync::Arc<crate::network::Network>,
    pods_dir: PathBuf,
    netns_dir: PathBuf,
    exe: PathBuf,
    /// Whether pods may have their own user namespace (the startup probe).
    userns_support: Result<(), String>,
    pods: Mutex<BTreeMap<String, PodRecord>>,
    /// Serialises Run/Stop/Remove: each touches several kernel objects.
    ops: Mutex<()>,
}

impl PodManager {
    /// Loads the pod records and reconciles them with the kernel.
    pub fn open(
        root: &Path,
        state_dir: &Path,
        cgroups: std::sync::Arc<crate::cgroup::Cgroups>,
        network: std::sync::Arc<crate::network::Network>,
        userns_support: Result<(), String>,
    ) -> Result<std::sync::Arc<PodManager>, PodError> {
        let io = |what: &str, source| PodError::Io {
            id: String::new(),
            what: what.to_string(),
            source,
        };
        let pods_dir = root.join("pods");
        let netns_dir = state_dir.join("netns");
        for d in [&pods_dir, &netns_dir] {
            std::fs::create_dir_all(d).map_err(|e| io(&format!("create {}", d.display()), e))?;
        }
        // The host path: infra processes carry it as argv[0].
        let exe = crate::linux::selfexe::current().name.clone();
        let m = PodManager {
            cgroups,
            network,
            pods_dir,
            netns_dir,
            exe,
            userns_support,
            pods: Mutex::new(BTreeMap::new()),
            ops: Mutex::new(()),
        };
        let m = std::sync::Arc::new(m);
        m.reconcile()?;
        let ready: Vec<(String, Infra)> = lock(&m.pods)
            .values()
            .filter(|p| p.state == PodState::Ready)
            .filter_map(|p| p.infra.map(|i| (p.id.clone(), i)))
            .collect();
        for (id, infra) in ready {
            m.watch(id, infra);
        }
        Ok(m)
    }

    /// Marks the pod not ready when its infra process dies (kubelet then
    /// recreates the sandbox, as with containerd's pause process).
    fn watch(self: &std::sync::Arc<Self>, id: String, infra: Infra) {
        let this = self.clone();
        tokio::spawn(async move {
            process::exited(infra.into()).await;
            process::reap(infra.pid);
            // Persisted under the lock: a RemovePodSandbox that sees the new
            // state may delete the pod directory at once.
            let mut pods = lock(&this.pods);
            if let Some(p) = pods.get_mut(&id) {
                if p.state == PodState::Ready && p.infra == Some(infra) {
                    p.state = PodState::NotReady;
                    tracing::warn!(pod = %id, pid = infra.pid, "pod infra process exited: sandbox not ready");
                    if let Err(e) = this.persist(p) {
                        tracing::error!(pod = %id, error = %e, "cannot record pod state");
                    }
                }
            }
        });
    }

    fn record_path(&self, id: &str) -> PathBuf {
        self.pods_dir.join(id).join("state.json")
    }

    fn persist(&self, rec: &PodRecord) -> Result<(), PodError> {
        write_json(&self.record_path(&rec.id), rec).map_err(|source| PodError::State {
            id: rec.id.clone(),
            source,
        })
    }

    fn reconcile(&self) -> Result<(), PodError> {
        let mut pods = BTreeMap::new();
        let entries = std::fs::read_dir(&self.pods_dir).map_err(|source| PodError::Io {
            id: String::new(),
            what: format!("read {}", self.pods_dir.display()),
            source,
        })?;
        for e in entries.flatten() {
            let id = e.file_name().to_string_lossy().into_owned();
            let rec: PodRecord = match read_json(&self.record_path(&id)) {
                Ok(Some(r)) => r,
                Ok(None) => {
                    // A directory without a record: a pod whose first write never happened.
                    let _ = netns::remove_pin(&e.path().join("userns"));
                    let _ = std::fs::remove_dir_all(e.path());
                    continue;
                }
                Err(err) => {
                    tracing::error!(pod = %id, error = %err, "unreadable pod record kept as is");
                    continue;
                }
            };
            match rec.state {
                PodState::Creating => {
                    tracing::warn!(pod = %id, "removing a pod sandbox whose creation was interrupted");
                    self.destroy(&rec)?;
                }
                PodState::Ready => {
                    let alive = rec.infra.is_some_and(|i| process::is_alive(i.into()));
                    let net_ok = rec.netns.as_deref().is_none_or(netns::is_pinned)
                        && rec.userns.as_deref().is_none_or(netns::is_pinned);
                    let mut rec = rec;
                    if !alive || !net_ok {
                        tracing::warn!(pod = %id, infra_alive = alive, netns = net_ok, "pod sandbox is no longer ready");
                        if let Some(i) = rec.infra {
                            let _ = process::kill_and_wait(i.into(), INFRA_STOP_TIMEOUT);
                        }
                        rec.state = PodState::NotReady;
                        self.persist(&rec)?;
                    }
                    pods.insert(id, rec);
                }
                PodState::NotReady => {
                    pods.insert(id, rec);
                }
            }
        }
        // Pins that no record owns are leftovers of a crash: remove them.
        if let Ok(rd) = std::fs::read_dir(&self.netns_dir) {
            for e in rd.flatten() {
                let id = e.file_name().to_string_lossy().into_owned();
                if !pods.contains_key(&id) {
                    tracing::warn!(pin = %e.path().display(), "removing a network namespace no pod owns");
                    let _ = netns::remove_pin(&e.path());
                }
            }
        }
        let live = pods
            .values()
            .filter_map(|p| p.netns.clone().map(|n| (p.id.clone(), n)))
            .collect();
        self.network.reconcile(&live);
        kill_orphan_infras(&self.exe, &self.pods_dir, &pods);
        *lock(&self.pods) = pods;
        Ok(())
    }

    /// Removes every object of a pod and its record. Idempotent.
    fn destroy(&self, rec: &PodRecord) -> Result<(), PodError> {
        let kernel = |source| PodError::Kernel {
            id: rec.id.clone(),
            source,
        };
        if let Some(i) = rec.infra {
            process::kill_and_wait(i.into(), INFRA_STOP_TIMEOUT).map_err(kernel)?;
        }
        if let Some(pin) = &rec.netns {
            self.network
                .teardown(&rec.id, pin)
                .map_err(|source| PodError::Network {
                    id: rec.id.clone(),
                    source,
                })?;
            netns::remove_pin(pin).map_err(kernel)?;
        }
        if let Some(shm) = &rec.shm {
            crate::linux::shm::remove_shm(shm).map_err(kernel)?;
        }
        if let Some(pin) = &rec.userns {
            netns::remove_pin(pin).map_err(kernel)?;
        }
        if let Some(cg) = &rec.cgroup {
            self.cgroups.remove(cg).map_err(|e| PodError::Io {
                id: rec.id.clone(),
                what: "remove cgroup".into(),
                source: std::io::Error::other(e.to_string()),
            })?;
        }
        let dir = self.pods_dir.join(&rec.id);
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(PodError::Io {
                id: rec.id.clone(),
                what: format!("remove {}", dir.display()),
                source: e,
            }),
            _ => Ok(()),
        }
    }

    /// Creates and starts a pod sandbox; returns its id. Blocking; call it
    /// inside the tokio runtime (it starts a watcher for the infra process).
    pub fn run(self: &std::sync::Arc<Self>, spec: PodSpec) -> Result<String, PodError> {
        for (field, v) in [
            ("metadata.name", &spec.name),
            ("metadata.uid", &spec.uid),
            ("metadata.namespace", &spec.namespace),
        ] {
            if v.is_empty() {
                return Err(PodError::Invalid(format!("{field} is empty")));
            }
        }
        if spec.network == NsMode::Target || spec.network == NsMode::Container {
            return Err(PodError::Invalid(format!(
                "network namespace mode {:?} is not valid for a pod",
                spec.network
            )));
        }
        self.cgroups
            .check_applicable(&format!("pod {}", spec.name), &spec.resources)
            .map_err(|e| PodError::Invalid(e.to_string()))?;
        check_sysctls(&spec)?;
        if let Some(u) = &spec.userns {
            self.check_userns(&spec, u)?;
        }
        let _op = lock(&self.ops);
        if let Some(u) = &spec.userns {
            self.check_userns_overlap(&spec, u)?;
        }
        if let Some(other) = lock(&self.pods).values().find(|p| {
            p.spec.name == spec.name
                && p.spec.namespace == spec.namespace
                && p.spec.uid == spec.uid
                && p.spec.attempt == spec.attempt
        }) {
            return Err(PodError::AlreadyExists {
                name: spec.name,
                namespace: spec.namespace,
                uid: spec.uid,
                attempt: spec.attempt,
                id: other.id.clone(),
            });
        }
        let id = hex::encode(rand::random::<[u8; 32]>());
        let dir = self.pods_dir.join(&id);
        let mut rec = PodRecord {
            id: id.clone(),
            netns: (spec.network != NsMode::Node).then(|| self.netns_dir.join(&id)),
            shm: (spec.ipc != NsMode::Node).then(|| dir.join("shm")),
            userns: spec.userns.is_some().then(|| dir.join("userns")),
            cgroup: self.cgroups.path_for(&spec.cgroup_parent, &id),
            spec,
            state: PodState::Creating,
            created_at: chrono::Utc::now().timestamp_nanos_opt().unwrap_or(0),
            infra: None,
            ips: Vec::new(),
        };
        let made = (|| {
            std::fs::create_dir(&dir).map_err(|source| PodError::Io {
                id: id.clone(),
                what: format!("create {}", dir.display()),
                source,
            })?;
            self.persist(&rec)?;
            crate::failpoint::hit("pod-after-record");
            self.write_files(&rec)?;
            let kernel = |source| PodError::Kernel {
                id: id.clone(),
                source,
            };
            // A user-namespaced pod's netns must belong to its user
            // namespace: it is made with the infra process, below.
            if rec.userns.is_none() {
                if let Some(pin) = &rec.netns {
                    netns::create_pinned(pin).map_err(kernel)?;
                    crate::failpoint::hit("pod-after-netns");
                    self.set_up_network(&mut rec)?;
                }
            }
            if let Some(shm) = &rec.shm {
                // Owned by the pod's root, as if mounted inside its namespace.
                let owner = rec
                    .spec
                    .userns
                    .as_ref()
                    .and_then(|u| u.host_uid(0).zip(u.host_gid(0)));
                crate::linux::shm::mount_shm(shm, SHM_SIZE, owner).map_err(kernel)?;
            }
            if let Some(cg) = &rec.cgroup {
                self.cgroups
                    .create(cg, &rec.spec.resources)
                    .map_err(|e| match e {
                        crate::cgroup::CgroupError::MissingController { .. }
                        | crate::cgroup::CgroupError::Invalid { .. } => {
                            PodError::Invalid(e.to_string())
                        }
                        e => PodError::Io {
                            id: id.clone(),
                            what: "create cgroup".into(),
                            source: std::io::Error::other(e.to_string()),
                        },
                    })?;
            }
            let host_uts = rec.spec.network == NsMode::Node;
            let (uids, gids) = rec
                .spec
                .userns
                .as_ref()
                .map(|u| (ranges(&u.uids), ranges(&u.gids)))
                .unwrap_or_default();
            let user = rec.userns.as_deref().map(|pin| process::NewUserNs {
                uids: &uids,
                gids: &gids,
                pin,
                net_pin: rec.netns.as_deref(),
            });
            let ns = Namespaces {
                join_net: rec.netns.as_deref().filter(|_| user.is_none()),
                new_ipc: rec.spec.ipc != NsMode::Node,
                new_uts: !host_uts,
                new_pid: rec.spec.pid == NsMode::Pod,
                hostname: (!host_uts).then(|| rec.hostname()),
                cgroup: rec.cgroup.as_deref(),
                user,
            };
            let pods_dir = self.pods_dir.display().to_string();
            let args = ["pause", "--pod", &id, "--pods-dir", &pods_dir];
            let p = process::spawn_in_namespaces(
                &crate::linux::selfexe::current().exec,
                &self.exe,
                &args,
                &ns,
            )
            .map_err(kernel)?;
            crate::failpoint::hit("pod-after-infra");
            rec.infra = Some(Infra {
                pid: p.pid,
                start_time: p.start_time,
            });
            if rec.userns.is_some() && rec.netns.is_some() {
                // Recorded first: a failure must kill the infra process.
                self.persist(&rec)?;
                self.set_up_network(&mut rec)?;
            }
            if !rec.spec.sysctls.is_empty() {
                // Recorded first: a failure must kill the infra process.
                self.persist(&rec)?;
                let ipc = PathBuf::from(format!("/proc/{}/ns/ipc", p.pid));
                let values: Vec<(String, String)> = rec.spec.sysctls.clone().into_iter().collect();
                crate::linux::sysctl::apply(rec.netns.as_deref(), Some(&ipc), &values)
                    .map_err(kernel)?;
            }
            rec.state = PodState::Ready;
            self.persist(&rec)
        })();
        if let Err(e) = made {
            if let Err(cleanup) = self.destroy(&rec) {
                tracing::error!(pod = %id, error = %cleanup, "cleanup after a failed RunPodSandbox");
            }
            return Err(e);
        }
        tracing::info!(pod = %id, name = %rec.spec.name, namespace = %rec.spec.namespace, infra = ?rec.infra.map(|i| i.pid), "pod sandbox ready");
        let infra = rec.infra;
        lock(&self.pods).insert(id.clone(), rec);
        if let Some(i) = infra {
            self.watch(id.clone(), i);
        }
        Ok(id)
    }

    /// Connects the pod's pinned netns and records its addresses.
    fn set_up_network(&self, rec: &mut PodRecord) -> Result<(), PodError> {
        let Some(pin) = rec.netns.clone() else {
            return Ok(());
        };
        rec.ips = self
            .network
            .setup(&network_of(rec, &pin))
            .map_err(|source| PodError::Network {
                id: rec.id.clone(),
                source,
            })?;
        if !rec.ips.is_empty() {
            self.write_files(rec)?;
        }
        Ok(())
    }

    /// A pod's own user namespace: possible here, well-formed, and with
    /// every other namespace its own (kubelet's hostUsers: false rules).
    fn check_userns(&self, spec: &PodSpec, u: &userns::UserNsSpec) -> Result<(), PodError> {
        let pod = format!("pod {}/{}", spec.namespace, spec.name);
        if let Err(e) = &self.userns_support {
            return Err(PodError::Precondition(format!(
                "{pod}: this node cannot run pods with their own user namespace: {e}"
            )));
        }
        u.validate()
            .map_err(|e| PodError::Invalid(format!("{pod}: {e}")))?;
        for (what, mode) in [
            ("network", spec.network),
            ("IPC", spec.ipc),
            ("PID", spec.pid),
        ] {
            if mode == NsMode::Node {
                return Err(PodError::Invalid(format!(
                    "{pod}: a pod with its own user namespace cannot use the host's {what} namespace"
                )));
            }
        }
        Ok(())
    }

    /// No two running pods may share host ids; sandboxes of the same pod
    /// (kubelet's next attempt) reuse its range. Called under `ops`.
    fn check_userns_overlap(&self, spec: &PodSpec, u: &userns::UserNsSpec) -> Result<(), PodError> {
        let pods = lock(&self.pods);
        for p in pods.values() {
            let Some(theirs) = &p.spec.userns else {
                continue;
            };
            if p.state == PodState::NotReady || p.spec.uid == spec.uid {
                continue;
            }
            if let Some(why) = u.host_overlap(theirs) {
                return Err(PodError::Precondition(format!(
                    "pod {}/{}: its user namespace mappings overlap those of running pod sandbox {} ({}/{}): {why}",
                    spec.namespace, spec.name, p.id, p.spec.namespace, p.spec.name
                )));
            }
        }
        Ok(())
    }

    fn write_files(&self, rec: &PodRecord) -> Result<(), PodError> {
        let dir = self.pods_dir.join(&rec.id);
        let host_resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        for (name, content) in [
            ("hostname", files::hostname(rec.hostname())),
            (
                "hosts",
                files::hosts(
                    rec.hostname(),
                    &rec.ips.iter().map(|i| i.to_string()).collect::<Vec<_>>(),
                ),
            ),
            (
                "resolv.conf",
                files::resolv_conf(rec.spec.dns.as_ref(), &host_resolv),
            ),
        ] {
            let p = dir.join(name);
            std::fs::write(&p, content).map_err(|source| PodError::Io {
                id: rec.id.clone(),
                what: format!("write {}", p.display()),
                source,
            })?;
        }
        Ok(())
    }

    /// The full id for an id or unambiguous id prefix.
    fn resolve(&self, id: &str) -> Result<String, PodError> {
        match resolve_id(&lock(&self.pods), id) {
            IdMatch::Found(k) => Ok(k),
            IdMatch::Ambiguous => Err(PodError::Ambiguous(id.to_string())),
            IdMatch::NotFound => Err(PodError::NotFound(id.to_string())),
        }
    }

    pub fn get(&self, id: &str) -> Result<PodRecord, PodError> {
        let id = self.resolve(id)?;
        lock(&self.pods)
            .get(&id)
            .cloned()
            .ok_or(PodError::NotFound(id))
    }

    /// UpdatePodSandboxResources, best effort: the pod-level cgroup belongs
    /// to kubelet (cgroup_parent); berth owns only the sandbox's own cgroup,
    /// which gets the limits when it can take them. Failures are logged.
    pub fn update_resources(
        &self,
        id: &str,
        res: crate::cgroup::Resources,
    ) -> Result<(), PodError> {
        let rec = self.get(id)?;
        if let Some(cg) = &rec.cgroup {
            if let Err(e) = self.cgroups.update(cg, &res) {
                tracing::warn!(pod = %rec.id, error = %e, "pod sandbox resources not applied");
            }
        }
        let mut pods = lock(&self.pods);
        if let Some(p) = pods.get_mut(&rec.id) {
            p.spec.resources = res;
            self.persist(p)?;
        }
        Ok(())
    }

    pub fn list(&self, f: &PodFilter) -> Vec<PodRecord> {
        let id = match f.id.as_deref() {
            Some(i) if !i.is_empty() => match self.resolve(i) {
                Ok(id) => Some(id),
                Err(_) => return Vec::new(),
            },
            _ => None,
        };
        lock(&self.pods)
            .values()
            .filter(|p| id.as_ref().is_none_or(|i| &p.id == i))
            .filter(|p| f.state.is_none_or(|s| p.state == s))
            .filter(|p| {
                f.labels
                    .iter()
                    .all(|(k, v)| p.spec.labels.get(k) == Some(v))
            })
            .cloned()
            .collect()
    }

    /// Stops the pod's processes; the netns stays until removal. Absent pods
    /// are fine (kubelet retries stops).
    pub fn stop(&self, id: &str) -> Result<(), PodError> {
        let _op = lock(&self.ops);
        let id = match self.resolve(id) {
            Ok(id) => id,
            Err(PodError::NotFound(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        let Some(mut rec) = lock(&self.pods).get(&id).cloned() else {
            return Ok(());
        };
        if let Some(i) = rec.infra {
            process::kill_and_wait(i.into(), INFRA_STOP_TIMEOUT).map_err(|source| {
                PodError::Kernel {
                    id: id.clone(),
                    source,
                }
            })?;
        }
        crate::failpoint::hit("pod-stop-after-kill");
        if let Some(pin) = &rec.netns {
            self.network
                .teardown(&id, pin)
                .map_err(|source| PodError::Network {
                    id: id.clone(),
                    source,
                })?;
        }
        // Released addresses may go to the next pod: stop reporting them.
        if rec.state != PodState::NotReady || !rec.ips.is_empty() {
            rec.ips.clear();
            rec.state = PodState::NotReady;
            self.persist(&rec)?;
            tracing::info!(pod = %id, "pod sandbox stopped");
        }
        lock(&self.pods).insert(id, rec);
        Ok(())
    }

    /// Stops (if needed) and removes the pod with all its objects.
    pub fn remove(&self, id: &str) -> Result<(), PodError> {
        let _op = lock(&self.ops);
        let id = match self.resolve(id) {
            Ok(id) => id,
            Err(PodError::NotFound(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        let rec = {
            let mut pods = lock(&self.pods);
            let Some(p) = pods.get_mut(&id) else {
                return Ok(());
            };
            // The infra watcher must not write the record while it is removed.
            p.state = PodState::NotReady;
            p.clone()
        };
        self.destroy(&rec)?;
        lock(&self.pods).remove(&id);
        tracing::info!(pod = %id, "pod sandbox removed");
        Ok(())
    }

    pub fn pods_dir(&self) -> &Path {
        &self.pods_dir
    }

    pub fn network(&self) -> &crate::network::Network {
        &self.network
    }

    /// berth's own binary, as infra processes run it.
    pub fn exe(&self) -> &Path {
        &self.exe
    }
}

/// Sysctls must be namespaced, and in a namespace the pod owns.
fn check_sysctls(spec: &PodSpec) -> Result<(), PodError> {
    use crate::linux::sysctl::{kind, Kind};
    for name in spec.sysctls.keys() {
        match kind(name) {
            None => {
                return Err(PodError::Invalid(format!(
                    "sysctl {name:?} is not namespaced: it would change the whole node"
                )))
            }
            Some(Kind::Net) if spec.network == NsMode::Node => {
                return Err(PodError::Invalid(format!(
                    "sysctl {name:?} would change the node's network: the pod uses the host network"
                )))
            }
            Some(Kind::Ipc) if spec.ipc == NsMode::Node => {
                return Err(PodError::Invalid(format!(
                "sysctl {name:?} would change the node's IPC namespace: the pod uses the host IPC"
            )))
            }
            Some(_) => {}
        }
    }
    Ok(())
}

fn ranges(map: &[userns::IdRange]) -> Vec<(u32, u32, u32)> {
    map.iter()
        .map(|r| (r.container_id, r.host_id, r.length))
        .collect()
}

fn network_of(rec: &PodRecord, pin: &Path) -> crate::network::PodNetwork {
    crate::network::PodNetwork {
        id: rec.id.clone(),
        netns: pin.to_path_buf(),
        name: rec.spec.name.clone(),
        namespace: rec.spec.namespace.clone(),
        uid: rec.spec.uid.clone(),
        ports: rec.spec.port_mappings.clone(),
        dns: rec.spec.dns.as_ref().map(|d| crate::network::Dns {
            servers: d.servers.clone(),
            searches: d.searches.clone(),
            options: d.options.clone(),
        }),
    }
}

/// Infra processes of pods that have no record (a crash between spawning the
/// process and recording it): found by their `pause --pod <id>` command line.
fn kill_orphan_infras(exe: &Path, pods_dir: &Path, pods: &BTreeMap<String, PodRecord>) {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return;
    };
    let exe = exe.as_os_str().as_encoded_bytes();
    for e in rd.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        // Only this daemon's own infra processes: another berth (another
        // root) on the same host owns its own.
        let ours = args.len() >= 6
            && args[0] == exe
            && args[1] == b"pause"
            && args[2] == b"--pod"
            && args[4] == b"--pods-dir"
            && args[5] == pods_dir.as_os_str().as_encoded_bytes();
        if !ours {
            continue;
        }
        let id = String::from_utf8_lossy(args[3]).into_owned();
        let known = pods
            .get(&id)
            .and_then(|p| p.infra)
            .is_some_and(|i| i.pid == pid);
        if !known {
            if let Ok(start_time) = process::start_time(pid) {
                tracing::warn!(pod = %id, pid, "killing an infra process no pod record owns");
                let _ = process::kill_and_wait(ProcessId { pid, start_time }, INFRA_STOP_TIMEOUT);
            }
        }
    }
}
