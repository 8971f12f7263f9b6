//! Containers: CRI config + image -> OCI spec, one monitor process each,
//! crash-safe records under `<root>/containers/<id>/`, exit tracking through
//! the monitor's pidfd, stop/remove/exec.

pub mod seccomp_profile;
pub mod security;
pub mod spec;
pub mod stats;
pub mod user;

use crate::image::store::{hex_of, ImageRecord};
use crate::linux::process::{self, ProcessId};
use crate::monitor::{Created, ExitRecord, MonitorConfig};
use crate::store::{lock, read_json, resolve_id, write_json, IdMatch, StoreError};
use serde::{Deserialize, Serialize};
use spec::{ImageDefaults, PodContext};
use std::collections::BTreeMap;
use std::io::BufRead;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error("container {0:?} not found")]
    NotFound(String),
    #[error("container id prefix {0:?} is ambiguous")]
    Ambiguous(String),
    #[error("invalid container config: {0}")]
    Invalid(String),
    #[error("container {name} (attempt {attempt}) already exists in pod {pod} as {id}")]
    AlreadyExists {
        name: String,
        attempt: u32,
        pod: String,
        id: String,
    },
    #[error("container {id}: {reason}")]
    FailedPrecondition { id: String, reason: String },
    #[error("container {id}: cannot run: {reason}")]
    CannotRun { id: String, reason: String },
    #[error("container {id}: {what}: {detail}")]
    Internal {
        id: String,
        what: &'static str,
        detail: String,
    },
    #[error("container {id}: {source}")]
    State { id: String, source: StoreError },
}

fn internal<'a>(id: &'a str, what: &'static str) -> impl FnOnce(String) -> ContainerError + 'a {
    move |detail| ContainerError::Internal {
        id: id.to_string(),
        what,
        detail,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Propagation {
    #[default]
    Private,
    HostToContainer,
    Bidirectional,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountSpec {
    pub container_path: String,
    pub host_path: String,
    pub readonly: bool,
    pub propagation: Propagation,
    /// With `readonly`: sub-mounts read-only too (mount_setattr).
    #[serde(default)]
    pub recursive_readonly: bool,
    /// An image volume: `host_path` is then where berth mounts the image
    /// (under the container's directory), set when the container is created.
    #[serde(default)]
    pub image: Option<ImageMount>,
}

/// The image (already pulled) whose filesystem a mount shows, read-only.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageMount {
    /// As the request named it.
    pub image: String,
    /// Filled in from the image store before the container is created.
    pub image_id: String,
    /// Only this path of the image (relative; empty: all of it).
    pub sub_path: String,
}

/// What a container was asked to be (from the CRI ContainerConfig).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerSpec {
    pub name: String,
    pub attempt: u32,
    /// The image as the request named it.
    pub image: String,
    pub command: Vec<String>,
    pub args: Vec<String>,
    pub working_dir: String,
    pub envs: Vec<(String, String)>,
    pub mounts: Vec<MountSpec>,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// Relative to the pod's log directory.
    pub log_path: String,
    pub tty: bool,
    pub stdin: bool,
    pub stdin_once: bool,
    pub run_as_user: Option<i64>,
    pub run_as_group: Option<i64>,
    pub run_as_username: String,
    #[serde(default)]
    pub security: security::SecuritySpec,
    pub resources: crate::cgroup::Resources,
    /// From the CRI config ("SIGTERM"...); empty: the image's, else SIGTERM.
    #[serde(default)]
    pub stop_signal: String,
    #[serde(default)]
    pub oom_score_adj: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ContainerState {
    Creating,
    Created,
    Running,
    Exited,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proc {
    pub pid: i32,
    pub start_time: u64,
}

impl From<Proc> for ProcessId {
    fn from(p: Proc) -> ProcessId {
        ProcessId {
            pid: p.pid,
            start_time: p.start_time,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerRecord {
    pub id: String,
    pub pod_id: String,
    pub spec: ContainerSpec,
    pub image_id: String,
    pub image_ref: String,
    pub state: ContainerState,
    pub created_at: i64,
    pub started_at: i64,
    pub finished_at: i64,
    pub exit_code: i32,
    pub reason: String,
    pub message: String,
    pub monitor: Option<Proc>,
    pub init: Option<Proc>,
    pub log_path: Option<PathBuf>,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub env: Vec<String>,
    pub cwd: String,
    pub stop_signal: String,
    pub start_error: Option<String>,
    /// The container's cgroup, when cgroups are in use.
    #[serde(default)]
    pub cgroup: Option<PathBuf>,
    /// The external OCI runtime of its pod's handler (`None`: berth's own).
    #[serde(default)]
    pub runtime: Option<crate::handlers::OciRuntime>,
}

/// ListContainers' filter.
#[derive(Debug, Default, Clone)]
pub struct ContainerFilter {
    pub id: Option<String>,
    pub pod_id: Option<String>,
    pub state: Option<ContainerState>,
    pub labels: BTreeMap<String, String>,
}

/// The pod a container is created in, as the container manager needs it.
pub struct PodInfo {
    pub id: String,
    pub ready: bool,
    pub netns: Option<PathBuf>,
    pub infra_pid: i32,
    pub share_pid: bool,
    pub host_pid: bool,
    pub host_ipc: bool,
    /// LinuxSandboxSecurityContext.privileged: only then may its containers be.
    pub privileged: bool,
    pub host_uts: bool,
    pub hostname: String,
    pub files_dir: PathBuf,
    pub log_directory: String,
    pub cgroup_parent: String,
    pub shm: Option<PathBuf>,
    /// The pod's runtime handler delegates to this external OCI runtime.
    pub runtime: Option<crate::handlers::OciRuntime>,
    /// The built-in handler's base capability set (`None`: containerd's).
    pub default_caps: Option<Vec<String>>,
    /// The pod's user namespace pin and mappings, when it has its own.
    pub userns: Option<(PathBuf, crate::pod::userns::UserNsSpec)>,
}

pub struct ContainerManager {
    cgroups: Arc<crate::cgroup::Cgroups>,
    dir: PathBuf,
    layers_dir: PathBuf,
    /// `<state_dir>/monitors`: the monitors' attach sockets.
    sockets_dir: PathBuf,
    exe: PathBuf,
    monitors: crate::monitor::zygote::Launcher,
    records: Mutex<BTreeMap<String, ContainerRecord>>,
    resource_updates: Mutex<()>,
    /// Ids of containers whose exit was just recorded (for events).
    exits: tokio::sync::broadcast::Sender<String>,
    /// RLIMIT_NOFILE (soft, hard) for container processes.
    nofile: (u64, u64),
    /// Whether a container may run without its cgroup device program.
    device_policy: crate::cgroup::devices::Enforcement,
}

/// Under a container's directory: its image volumes' mount points.
const VOLUMES_DIR: &str = "volumes";

/// An image mount's own checks: its image is among those passed in (the
/// server found it in the store) and its sub path can only name something
/// inside the image.
fn check_image_mount(
    m: &MountSpec,
    im: &ImageMount,
    volume_images: &[ImageRecord],
) -> Result<(), ContainerError> {
    let Some(image) = volume_images.iter().find(|i| i.id == im.image_id) else {
        return Err(ContainerError::Invalid(format!(
            "image volume at {}: image {} is not present (pull it first)",
            m.container_path, im.image
        )));
    };
    if image.layers.is_empty() {
        return Err(ContainerError::Invalid(format!(
            "image volume at {}: image {} has no layers",
            m.container_path, im.image
        )));
    }
    if !crate::linux::imagevol::sub_path_is_plain(&im.sub_path) {
        return Err(ContainerError::Invalid(format!(
            "image volume {} at {}: image_sub_path {:?} must be relative and must not contain \"..\"",
            im.image, m.container_path, im.sub_path
        )));
    }
    Ok(())
}

/// How long a monitor may take to set the container up and answer.
const MONITOR_ANSWER_TIMEOUT_MS: u16 = 60_000;

fn now_ns() -> i64 {
    chrono::Utc::now().timestamp_nanos_opt().unwrap_or(0)
}

impl ContainerManager {
    /// Loads records and reconciles them; must run inside the tokio runtime
    /// (it starts exit watchers for running containers).
    pub fn open(
        root: &Path,
        state_dir: &Path,
        layers_dir: &Path,
        cgroups: Arc<crate::cgroup::Cgroups>,
        nofile: (u64, u64),
        device_policy: crate::cgroup::devices::Enforcement,
    ) -> Result<Arc<ContainerManager>, ContainerError> {
        let dir = root.join("containers");
        std::fs::create_dir_all(&dir)
            .map_err(|e| internal("", "create containers dir")(e.to_string()))?;
        let sockets_dir = state_dir.join("monitors");
        std::fs::create_dir_all(&sockets_dir)
            .map_err(|e| internal("", "create monitors dir")(e.to_string()))?;
        let me = crate::linux::selfexe::current();
        let exe = me.name.clone();
        let m = Arc::new(ContainerManager {
            cgroups,
            dir,
            layers_dir: layers_dir.to_path_buf(),
            sockets_dir,
            monitors: crate::monitor::zygote::Launcher::new(me.exec.clone(), exe.clone()),
            exe,
            records: Mutex::new(BTreeMap::new()),
            resource_updates: Mutex::new(()),
            exits: tokio::sync::broadcast::channel(1024).0,
            nofile,
            device_policy,
        });
        m.reconcile();
        Ok(m)
    }

    /// The PID namespace for a container of `pod` (see [`security::PidMode`]).
    fn pid_namespace(&self, pod: &PodInfo, spec: &ContainerSpec) -> Result<spec::PidNs, String> {
        use security::PidMode;
        let infra = || spec::PidNs::Join(PathBuf::from(format!("/proc/{}/ns/pid", pod.infra_pid)));
        Ok(match &spec.security.pid {
            PidMode::Node => spec::PidNs::Host,
            PidMode::Container => spec::PidNs::New,
            PidMode::Pod if pod.share_pid => infra(),
            PidMode::Pod if pod.host_pid => spec::PidNs::Host,
            PidMode::Pod => spec::PidNs::New,
            PidMode::Target(t) => {
                let target = self
                    .get(t)
                    .map_err(|e| format!("pid namespace target: {e}"))?;
                if target.pod_id != pod.id {
                    return Err(format!(
                        "pid namespace target {} is in another pod sandbox",
                        target.id
                    ));
                }
                match (target.state, target.init) {
                    (ContainerState::Running | ContainerState::Created, Some(i))
                        if process::is_alive(i.into()) =>
                    {
                        spec::PidNs::Join(PathBuf::from(format!("/proc/{}/ns/pid", i.pid)))
                    }
                    _ => return Err(format!("pid namespace target {} is not running", target.id)),
                }
            }
        })
    }

    fn cdir(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    fn persist(&self, rec: &ContainerRecord) -> Result<(), ContainerError> {
        write_json(&self.cdir(&rec.id).join("state.json"), rec).map_err(|source| {
            ContainerError::State {
                id: rec.id.clone(),
                source,
            }
        })
    }

    fn reconcile(self: &Arc<Self>) {
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for e in rd.flatten() {
            let id = e.file_name().to_string_lossy().into_owned();
            let rec: ContainerRecord = match read_json(&e.path().join("state.json")) {
                Ok(Some(r)) => r,
                // Not even the intent was written: nothing else can exist.
                Ok(None) => {
                    if self.unmount_volumes(&id).is_ok() {
                        let _ = std::fs::remove_dir_all(e.path());
                    }
                    continue;
                }
                Err(err) => {
                    tracing::error!(container = %id, error = %err, "unreadable container record kept as is");
                    continue;
                }
            };
            match rec.state {
                ContainerState::Creating => {
                    tracing::warn!(container = %id, "removing a container whose creation was interrupted");
                    self.destroy(&rec);
                }
                ContainerState::Created | ContainerState::Running => {
                    let mon = rec.monitor;
                    let mut rec = rec;
                    if rec.state == ContainerState::Created && self.init_has_exec_d(&rec) {
                        // StartContainer let the init go but berth died before
                        // recording it: the container runs.
                        rec.state = ContainerState::Running;
                        rec.started_at = now_ns();
                        let _ = self.persist(&rec);
                    }
                    lock(&self.records).insert(id.clone(), rec);
                    match mon {
                        Some(m) if process::is_alive(m.into()) => self.watch(id, m),
                        _ => self.monitor_exited(&id),
                    }
                }
                ContainerState::Exited => {
                    lock(&self.records).insert(id, rec);
                }
            }
        }
        crate::monitor::attach::sweep(&self.sockets_dir, |id| {
            lock(&self.records)
                .get(id)
                .is_some_and(|r| r.state != ContainerState::Exited)
        });
        // Mounts no record owns (an image volume whose container is gone).
        let known = |mp: &Path| {
            mp.strip_prefix(&self.dir)
                .ok()
                .and_then(|rel| rel.components().next())
                .is_some_and(|c| {
                    lock(&self.records).contains_key(&*c.as_os_str().to_string_lossy())
                })
        };
        for mp in crate::linux::imagevol::mounts_under(&self.dir) {
            if !known(&mp) {
                tracing::warn!(mount = %mp.display(), "unmounting a mount no container owns");
                let _ = nix::mount::umount2(&mp, nix::mount::MntFlags::MNT_DETACH);
            }
        }
    }

    /// Whether the init has left the exec fifo and run the workload: until
    /// then it is berth's own binary.
    fn init_has_exec_d(&self, rec: &ContainerRecord) -> bool {
        if let Some(rt) = &rec.runtime {
            return rt.status(&rec.id).as_deref() == Some("running");
        }
        let Some(init) = rec.init else {
            return false;
        };
        if !process::is_alive(init.into()) {
            return false;
        }
        // Before exec the init carries berth's command name; the workload's
        // own afterwards (a workload named "berth" would read as not started).
        let berth = self
            .exe
            .file_name()
            .map(|n| n.to_string_lossy().chars().take(15).collect::<String>())
            .unwrap_or_default();
        std::fs::read_to_string(format!("/proc/{}/comm", init.pid))
            .is_ok_and(|comm| comm.trim_end() != berth)
    }

    /// `<containers>/<id>/volumes/<index of the mount>`.
    fn volume_dir(&self, id: &str, index: usize) -> PathBuf {
        self.cdir(id).join(VOLUMES_DIR).join(index.to_string())
    }

    fn mount_image_volumes(
        &self,
        rec: &ContainerRecord,
        volume_images: &[ImageRecord],
    ) -> Result<(), ContainerError> {
        use crate::linux::imagevol::{mount_image, ImageVolError};
        for m in &rec.spec.mounts {
            let Some(im) = &m.image else { continue };
            let Some(image) = volume_images.iter().find(|i| i.id == im.image_id) else {
                return Err(internal(&rec.id, "mount image volume")(format!(
                    "image {} of the volume at {} was not passed in",
                    im.image_id, m.container_path
                )));
            };
            let layers: Vec<PathBuf> = image
                .layers
                .iter()
                .rev()
                .map(|l| self.layers_dir.join(hex_of(&l.chain_id)))
                .collect();
            mount_image(&layers, &im.sub_path, Path::new(&m.host_path)).map_err(|e| match e {
                ImageVolError::MissingSubPath { .. } | ImageVolError::EscapingSubPath { .. } => {
                    ContainerError::Invalid(format!(
                        "container {}: image volume {} at {}: {e}",
                        rec.spec.name, im.image, m.container_path
                    ))
                }
                e => internal(&rec.id, "mount image volume")(format!(
                    "{} at {}: {e}",
                    im.image, m.container_path
                )),
            })?;
        }
        Ok(())
    }

    /// Detaches the container's image volumes (every mount under its
    /// directory); until that worked the directory must stay.
    fn unmount_volumes(&self, id: &str) -> Result<(), ContainerError> {
        crate::linux::imagevol::unmount_all_under(&self.cdir(id))
            .map_err(|e| internal(id, "unmount image volumes")(e.to_string()))
    }

    /// Kills what a record names and deletes its directory.
    fn destroy(&self, rec: &ContainerRecord) {
        if let Some(cg) = &rec.cgroup {
            self.cgroups.kill(cg);
        }
        for p in [rec.init, rec.monitor].into_iter().flatten() {
            let _ = process::kill_and_wait(p.into(), Duration::from_secs(10));
        }
        if let Err(e) = self.forget_delegated(rec) {
            tracing::error!(container = %rec.id, error = %e, "cannot clean up after the OCI runtime");
        }
        if let Some(cg) = &rec.cgroup {
            if let Err(e) = self.cgroups.remove(cg) {
                tracing::error!(container = %rec.id, error = %e, "cannot remove cgroup");
            }
        }
        let _ = std::fs::remove_file(self.attach_socket(&rec.id));
        if let Err(e) = self.unmount_volumes(&rec.id) {
            tracing::error!(container = %rec.id, error = %e, "container directory kept");
            return;
        }
        if let Err(e) = std::fs::remove_dir_all(self.cdir(&rec.id)) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::error!(container = %rec.id, error = %e, "cannot remove container directory");
            }
        }
    }

    /// For a delegated container: the runtime's state goes, and the rootfs
    /// mount its monitor may have left. Idempotent.
    fn forget_delegated(&self, rec: &ContainerRecord) -> Result<(), String> {
        let Some(rt) = &rec.runtime else {
            return Ok(());
        };
        let deleted = rt.delete(&rec.id);
        crate::linux::hostrootfs::unmount(&self.cdir(&rec.id).join("rootfs"))?;
        deleted
    }

    /// Waits (in a task) for the monitor to exit, then records the exit.
    fn watch(self: &Arc<Self>, id: String, monitor: Proc) {
        let this = self.clone();
        tokio::spawn(async move {
            process::exited(monitor.into()).await;
            process::reap(monitor.pid);
            this.monitor_exited(&id);
        });
    }

    fn monitor_exited(&self, id: &str) {
        // A monitor that was killed leaves its attach socket behind.
        let _ = std::fs::remove_file(self.attach_socket(id));
        let exit: Option<ExitRecord> = read_json(&self.cdir(id).join("exit.json")).ok().flatten();
        // Persisted under the lock: whoever sees Exited (RemoveContainer)
        // may delete the directory at once, so the write must be done by then.
        let mut recs = lock(&self.records);
        let Some(rec) = recs.get_mut(id) else {
            return;
        };
        if rec.state == ContainerState::Exited {
            return;
        }
        match exit {
            Some(x) => {
                rec.exit_code = x.exit_code;
                rec.finished_at = x.finished_at;
                rec.reason = if x.oom_killed {
                    "OOMKilled"
                } else if x.exit_code == 0 {
                    "Completed"
                } else {
                    "Error"
                }
                .into();
            }
            None => {
                rec.exit_code = 255;
                rec.finished_at = now_ns();
                rec.reason = "Error".into();
                rec.message =
                    "the container's monitor exited without recording an exit status".into();
            }
        }
        if rec.state == ContainerState::Created
            && rec.started_at == 0
            && rec.reason != "Completed"
            && rec.message.is_empty()
        {
            rec.message = "the container exited before it was started".into();
        }
        rec.state = ContainerState::Exited;
        if let Err(e) = self.persist(rec) {
            tracing::error!(container = %id, error = %e, "cannot record container exit");
        }
        let rec = rec.clone();
        drop(recs);
        let _ = self.exits.send(id.to_string());
        tracing::info!(container = %id, exit_code = rec.exit_code, "container exited");
    }

    fn resolve(&self, id: &str) -> Result<String, ContainerError> {
        match resolve_id(&lock(&self.records), id) {
            IdMatch::Found(k) => Ok(k),
            IdMatch::Ambiguous => Err(ContainerError::Ambiguous(id.to_string())),
            IdMatch::NotFound => Err(ContainerError::NotFound(id.to_string())),
        }
    }

    pub fn get(&self, id: &str) -> Result<ContainerRecord, ContainerError> {
        let id = self.resolve(id)?;
        lock(&self.records)
            .get(&id)
            .cloned()
            .ok_or(ContainerError::NotFound(id))
    }

    pub fn list(&self, f: &ContainerFilter) -> Vec<ContainerRecord> {
        let id = match f.id.as_deref() {
            Some(i) if !i.is_empty() => match self.resolve(i) {
                Ok(id) => Some(id),
                Err(_) => return Vec::new(),
            },
            _ => None,
        };
        lock(&self.records)
            .values()
            .filter(|c| id.as_ref().is_none_or(|i| &c.id == i))
            .filter(|c| {
                f.pod_id
                    .as_ref()
                    .is_none_or(|p| c.pod_id.starts_with(p.as_str()))
            })
            .filter(|c| f.state.is_none_or(|s| c.state == s))
            .filter(|c| {
                f.labels
                    .iter()
                    .all(|(k, v)| c.spec.labels.get(k) == Some(v))
            })
            .cloned()
            .collect()
    }

    /// A container whose rootfs or one of whose image volumes is the image.
    pub fn image_in_use(&self, image_id: &str) -> Option<String> {
        lock(&self.records)
            .values()
            .find(|c| {
                c.image_id == image_id
                    || c.spec
                        .mounts
                        .iter()
                        .any(|m| m.image.as_ref().is_some_and(|i| i.image_id == image_id))
            })
            .map(|c| c.id.clone())
    }

    pub fn in_pod(&self, pod_id: &str) -> Vec<String> {
        lock(&self.records)
            .values()
            .filter(|c| c.pod_id == pod_id)
            .map(|c| c.id.clone())
            .collect()
    }

    /// Creates a container (its init waits for StartContainer). Blocking.
    /// `volume_images` holds the images of the spec's image mounts.
    pub fn create(
        self: &Arc<Self>,
        pod: &PodInfo,
        mut spec: ContainerSpec,
        image: &ImageRecord,
        image_config: &serde_json::Value,
        volume_images: &[ImageRecord],
    ) -> Result<String, ContainerError> {
        if spec.name.is_empty() {
            return Err(ContainerError::Invalid("metadata.name is empty".into()));
        }
        if !pod.ready {
            return Err(ContainerError::FailedPrecondition {
                id: spec.name.clone(),
                reason: format!("pod sandbox {} is not ready", pod.id),
            });
        }
        let log_path = log_path(pod, &spec)?;
        if let (Some(rt), true) = (&pod.runtime, spec.tty) {
            return Err(ContainerError::Invalid(format!(
                "container {}: a terminal (tty) is not supported with the delegating runtime handler {:?}",
                spec.name, rt.handler
            )));
        }
        for m in &spec.mounts {
            if !Path::new(&m.container_path).is_absolute() {
                return Err(ContainerError::Invalid(format!(
                    "mount target {:?} is not an absolute path",
                    m.container_path
                )));
            }
            if let (true, Some(rt)) = (m.recursive_readonly, &pod.runtime) {
                return Err(ContainerError::Invalid(format!(
                    "mount {}: recursive read-only mounts are not supported by the runtime \
                     handler {:?} (Status does not advertise them for it)",
                    m.container_path, rt.handler
                )));
            }
            if let Some(im) = &m.image {
                check_image_mount(m, im, volume_images)?;
                continue;
            }
            if m.recursive_readonly && !recursive_readonly_supported() {
                return Err(ContainerError::Invalid(format!(
                    "mount {}: recursive read-only mounts need mount_setattr (Linux 5.12), \
                     which this kernel lacks",
                    m.container_path
                )));
            }
            if m.propagation != Propagation::Private {
                // As containerd: propagation needs a source mount that has it.
                let (shared, slave) =
                    crate::linux::mountattr::propagation_of(Path::new(&m.host_path))
                        .unwrap_or((false, false));
                let ok = match m.propagation {
                    Propagation::Bidirectional => shared,
                    _ => shared || slave,
                };
                if !ok {
                    return Err(ContainerError::Invalid(format!(
                        "mount {}: {} propagation needs {} to be on a {} mount",
                        m.container_path,
                        if m.propagation == Propagation::Bidirectional {
                            "bidirectional"
                        } else {
                            "host-to-container"
                        },
                        m.host_path,
                        if m.propagation == Propagation::Bidirectional {
                            "shared"
                        } else {
                            "shared or slave"
                        }
                    )));
                }
            }
            if std::fs::metadata(&m.host_path).is_err() {
                return Err(ContainerError::Invalid(format!(
                    "mount source {:?} (for {}) does not exist",
                    m.host_path, m.container_path
                )));
            }
        }
        if image.layers.is_empty() {
            return Err(ContainerError::Invalid(format!(
                "image {} has no layers",
                image.id
            )));
        }
        self.cgroups
            .check_applicable(&format!("container {}", spec.name), &spec.resources)
            .map_err(|e| ContainerError::Invalid(e.to_string()))?;
        let img = ImageDefaults::from_config(image_config);
        let id = hex::encode(rand::random::<[u8; 32]>());
        // Recorded with the intent: where each image volume gets mounted.
        for (i, m) in spec.mounts.iter_mut().enumerate() {
            if m.image.is_some() {
                m.host_path = self.volume_dir(&id, i).display().to_string();
            }
        }
        {
            let recs = lock(&self.records);
            if let Some(other) = recs.values().find(|c| {
                c.pod_id == pod.id && c.spec.name == spec.name && c.spec.attempt == spec.attempt
            }) {
                return Err(ContainerError::AlreadyExists {
                    name: spec.name,
                    attempt: spec.attempt,
                    pod: pod.id.clone(),
                    id: other.id.clone(),
                });
            }
        }
        let lowers: Vec<String> = image
            .layers
            .iter()
            .rev()
            .map(|l| hex_of(&l.chain_id).to_string())
            .collect();
        let invalid =
            |reason: String| ContainerError::Invalid(format!("container {}: {reason}", spec.name));
        let passwd = read_image_file(&self.layers_dir, &lowers, "etc/passwd").unwrap_or_default();
        let group = read_image_file(&self.layers_dir, &lowers, "etc/group").unwrap_or_default();
        let user = user::resolve(&spec, &img.user, &passwd, &group).map_err(invalid)?;
        if spec.security.privileged && !pod.privileged {
            return Err(invalid(format!(
                "privileged containers need a privileged pod sandbox ({} is not)",
                pod.id
            )));
        }
        let security =
            security::resolve(&spec, self.nofile, pod.default_caps.as_deref()).map_err(invalid)?;
        let pid_ns = self.pid_namespace(pod, &spec).map_err(invalid)?;
        let cgroup = self
            .cgroups
            .path_for(&pod.cgroup_parent, &id)
            // A runtime without cgroups would leave berth's cgroup empty.
            .filter(|_| pod.runtime.as_ref().is_none_or(|r| r.cgroups));
        if cgroup.is_none() && !security.privileged {
            let why = if self.cgroups.enabled() {
                format!("the cgroup parent {:?} is not usable", pod.cgroup_parent)
            } else {
                "no usable cgroup v2 on this host".to_string()
            };
            self.without_device_policy(&spec.name, why)?;
        }
        let dir = self.cdir(&id);
        let mut rec = ContainerRecord {
            id: id.clone(),
            pod_id: pod.id.clone(),
            image_id: image.id.clone(),
            image_ref: image
                .repo_digests
                .first()
                .cloned()
                .unwrap_or_else(|| image.id.clone()),
            state: ContainerState::Creating,
            created_at: now_ns(),
            started_at: 0,
            finished_at: 0,
            exit_code: 0,
            reason: String::new(),
            message: String::new(),
            monitor: None,
            init: None,
            log_path,
            uid: user.uid,
            gid: user.gid,
            groups: user.groups.clone(),
            env: spec::process_env(&spec, &img),
            cwd: String::new(),
            stop_signal: if spec.stop_signal.is_empty() {
                img.stop_signal.clone()
            } else {
                spec.stop_signal.clone()
            },
            start_error: None,
            cgroup,
            runtime: pod.runtime.clone(),
            spec,
        };
        let made = self.make(
            &mut rec,
            pod,
            &img,
            &lowers,
            &user,
            &security,
            pid_ns,
            volume_images,
        );
        if let Err(e) = made {
            self.destroy(&rec);
            return Err(e);
        }
        lock(&self.records).insert(id.clone(), rec.clone());
        if let Some(m) = rec.monitor {
            self.watch(id.clone(), m);
        }
        let _ = dir;
        tracing::info!(container = %id, pod = %pod.id, name = %rec.spec.name, "container created");
        Ok(id)
    }

    #[allow(clippy::too_many_arguments)]
    fn make(
        &self,
        rec: &mut ContainerRecord,
        pod: &PodInfo,
        img: &ImageDefaults,
        lowers: &[String],
        user: &user::User,
        security: &security::Resolved,
        pid_ns: spec::PidNs,
        volume_images: &[ImageRecord],
    ) -> Result<(), ContainerError> {
        let id = rec.id.clone();
        let dir = self.cdir(&id);
        let io = |what: &'static str| internal(&id, what);
        std::fs::create_dir(&dir).map_err(|e| io("create directory")(e.to_string()))?;
        self.persist(rec)?;
        crate::failpoint::hit("ctr-after-record");
        if let Some(cg) = &rec.cgroup {
            self.cgroups
                .create(cg, &rec.spec.resources)
                .map_err(|e| match e {
                    crate::cgroup::CgroupError::MissingController { .. }
                    | crate::cgroup::CgroupError::Invalid { .. } => {
                        ContainerError::Invalid(format!("container {}: {e}", rec.spec.name))
                    }
                    e => io("create cgroup")(e.to_string()),
                })?;
        }
        for d in ["upper", "work", "rootfs", VOLUMES_DIR] {
            std::fs::create_dir(dir.join(d)).map_err(|e| io("create directory")(e.to_string()))?;
        }
        self.mount_image_volumes(rec, volume_images)?;
        let fifo = dir.join("exec.fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600))
            .map_err(|e| io("create exec fifo")(e.to_string()))?;
        // The init opens it after dropping to the container user; only that
        // process can reach it (through its own fd), the path is in berth's root.
        std::fs::set_permissions(&fifo, std::os::unix::fs::PermissionsExt::from_mode(0o622))
            .map_err(|e| io("chmod exec fifo")(e.to_string()))?;
        if let Some(l) = &rec.log_path {
            if let Some(parent) = l.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(|e| io("create log directory")(e.to_string()))?;
            }
        }
        let ctx = PodContext {
            netns: pod
                .netns
                .as_deref()
                .filter(|_| !rec.spec.security.host_network),
            infra_pid: pod.infra_pid,
            pid_ns,
            host_ipc: pod.host_ipc || rec.spec.security.host_ipc,
            host_uts: pod.host_uts,
            hostname: &pod.hostname,
            files_dir: &pod.files_dir,
            cgroup: rec.cgroup.is_some(),
            shm: pod.shm.as_deref(),
            userns: pod.userns.as_ref().map(|(pin, u)| (pin.as_path(), u)),
        };
        let oom = effective_oom_score_adj(&rec.id, rec.spec.oom_score_adj);
        let oci = spec::build(
            &rec.spec,
            img,
            &ctx,
            &dir.join("rootfs"),
            user,
            oom,
            security,
        )
        .map_err(|reason| {
            ContainerError::Invalid(format!("container {}: {reason}", rec.spec.name))
        })?;
        let oci = match &rec.runtime {
            Some(_) => spec::for_delegated(
                oci,
                rec.cgroup.as_deref().and_then(|c| self.cgroups.relative(c)),
            )
            .map_err(|e| io("adapt the OCI spec")(e))?,
            None => oci,
        };
        rec.cwd = oci
            .process()
            .as_ref()
            .map(|p| p.cwd().display().to_string())
            .unwrap_or_else(|| "/".into());
        oci.save(dir.join("config.json"))
            .map_err(|e| io("write config.json")(e.to_string()))?;
        // Attached before the init exists, so not one of its instructions
        // runs without the policy.
        if let Some(cg) = &rec.cgroup {
            self.apply_device_policy(&rec.spec.name, cg, &oci, security.privileged)?;
        }
        let mcfg = MonitorConfig {
            id: id.clone(),
            spec: dir.join("config.json"),
            layers_dir: self.layers_dir.clone(),
            lowers: lowers.to_vec(),
            upper: dir.join("upper"),
            work: dir.join("work"),
            fifo,
            log_path: rec.log_path.clone(),
            exit_file: dir.join("exit.json"),
            cgroup: rec.cgroup.clone(),
            stdin: rec.spec.stdin,
            stdin_once: rec.spec.stdin_once,
            attach_socket: Some(self.attach_socket(&id)),
            runtime: rec.runtime.clone(),
        };
        write_json(&dir.join("monitor.json"), &mcfg)
            .map_err(|e| io("write monitor.json")(e.to_string()))?;
        let log = std::fs::File::create(dir.join("monitor.log"))
            .map_err(|e| io("create monitor.log")(e.to_string()))?;
        let (answer_r, answer_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| io("start monitor")(e.to_string()))?;
        let mon_pid = self
            .monitors
            .launch(&dir.join("monitor.json"), answer_w.as_fd(), log.as_fd())
            .map_err(|e| io("start monitor")(e.to_string()))?;
        drop((answer_w, log));
        rec.monitor = Some(Proc {
            pid: mon_pid,
            start_time: process::start_time(mon_pid).unwrap_or(0),
        });
        // Recorded before waiting for it: a restart must be able to kill a
        // monitor (and with it, through its parent-death signal, the init).
        self.persist(rec)?;
        crate::failpoint::hit("ctr-after-monitor");
        let mut line = String::new();
        {
            use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
            // A setup that hangs (a stuck mount source, say) must not hang
            // CreateContainer: the monitor is killed by the cleanup instead.
            let mut fds = [PollFd::new(answer_r.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::from(MONITOR_ANSWER_TIMEOUT_MS)) {
                Ok(n) if n > 0 => {
                    let _ =
                        std::io::BufReader::new(std::fs::File::from(answer_r)).read_line(&mut line);
                }
                _ => {
                    return Err(io("start monitor")(format!(
                        "the container was not set up within {} s",
                        MONITOR_ANSWER_TIMEOUT_MS / 1000
                    )))
                }
            }
        }
        // The monitor (our child) lives on; its exit is reaped by the watcher.
        let created: Created = serde_json::from_str(line.trim()).map_err(|_| {
            let log = std::fs::read_to_string(dir.join("monitor.log")).unwrap_or_default();
            io("start monitor")(format!("no answer from the monitor: {}", log.trim()))
        })?;
        if let Some(e) = created.error {
            return Err(ContainerError::Internal {
                id: id.clone(),
                what: "set up the container",
                detail: e,
            });
        }
        rec.init = Some(Proc {
            pid: created.pid,
            start_time: created.start_time,
        });
        rec.start_error = created.start_error;
        crate::failpoint::hit("ctr-before-created");
        rec.state = ContainerState::Created;
        self.persist(rec)
    }

    /// A non-privileged container is about to run without a device policy:
    /// refused unless the config says that is acceptable.
    fn without_device_policy(&self, name: &str, why: String) -> Result<(), ContainerError> {
        match self.device_policy {
            crate::cgroup::devices::Enforcement::Required => {
                Err(ContainerError::FailedPrecondition {
                    id: name.to_string(),
                    reason: format!(
                        "its device access policy (a cgroup v2 device program) cannot be \
                         enforced: {why}; a non-privileged container could open any device \
                         node it creates. Set device_policy = \"best-effort\" in the \
                         [security] section of berth's config to run it without one"
                    ),
                })
            }
            crate::cgroup::devices::Enforcement::BestEffort => {
                tracing::warn!(container = name, reason = %why, "running without a device access policy (security.device_policy = \"best-effort\")");
                Ok(())
            }
        }
    }

    /// Attaches (or atomically replaces) the device program made from the
    /// spec's linux.resources.devices on the container's cgroup.
    fn apply_device_policy(
        &self,
        name: &str,
        cg: &Path,
        oci: &oci_spec::runtime::Spec,
        privileged: bool,
    ) -> Result<(), ContainerError> {
        let Some(rules) = oci
            .linux()
            .as_ref()
            .and_then(|l| l.resources().as_ref())
            .and_then(|r| r.devices().as_ref())
        else {
            // Written by a berth that had no device policy: nothing to keep.
            return Ok(());
        };
        match self.cgroups.set_device_policy(cg, rules) {
            Ok(()) => Ok(()),
            Err(e) if privileged => {
                tracing::warn!(container = name, error = %e, "privileged container: no device program (it may use every device anyway)");
                Ok(())
            }
            Err(e) => self.without_device_policy(name, e.to_string()),
        }
    }

    /// Lets the created container's process exec. Blocking.
    pub fn start(&self, id: &str) -> Result<(), ContainerError> {
        let rec = self.get(id)?;
        let id = rec.id.clone();
        if rec.state != ContainerState::Created {
            return Err(ContainerError::FailedPrecondition {
                id,
                reason: format!("cannot start a container in state {:?}", rec.state),
            });
        }
        if let Some(reason) = rec.start_error.clone() {
            if let Some(i) = rec.init {
                let _ = process::kill_and_wait(i.into(), Duration::from_secs(5));
            }
            self.update(&id, |r| {
                r.state = ContainerState::Exited;
                r.exit_code = 128;
                r.finished_at = now_ns();
                r.reason = "ContainerCannotRun".into();
                r.message = reason.clone();
            })?;
            return Err(ContainerError::CannotRun { id, reason });
        }
        let fifo = self.cdir(&id).join("exec.fifo");
        match &rec.runtime {
            Some(rt) => rt.start(&id),
            None => open_fifo_and_wait(&fifo, Duration::from_secs(10)),
        }
        .map_err(|e| ContainerError::CannotRun {
            id: id.clone(),
            reason: format!("the container process did not start: {e}"),
        })?;
        crate::failpoint::hit("ctr-start-after-fifo");
        let _ = std::fs::remove_file(&fifo);
        self.update(&id, |r| {
            if r.state == ContainerState::Created {
                r.state = ContainerState::Running;
            }
            r.started_at = now_ns();
        })?;
        tracing::info!(container = %id, "container started");
        Ok(())
    }

    /// Container ids as their exits get recorded.
    pub fn exits(&self) -> tokio::sync::broadcast::Receiver<String> {
        self.exits.subscribe()
    }

    /// UpdateContainerResources: new limits for a created or running
    /// container, applied to its cgroup all or nothing, then recorded (so
    /// they show in ContainerStatus and survive restarts).
    pub fn update_resources(
        &self,
        id: &str,
        res: crate::cgroup::Resources,
        oom_score_adj: Option<i64>,
    ) -> Result<(), ContainerError> {
        // One update at a time: an all-or-nothing rollback must not undo
        // another update's writes.
        let _one = lock(&self.resource_updates);
        let rec = self.get(id)?;
        if !matches!(rec.state, ContainerState::Created | ContainerState::Running) {
            return Err(ContainerError::FailedPrecondition {
                id: rec.id,
                reason: format!(
                    "cannot update the resources of a container in state {:?}",
                    rec.state
                ),
            });
        }
        let cg_err = |e: crate::cgroup::CgroupError| match e {
            crate::cgroup::CgroupError::Invalid { .. }
            | crate::cgroup::CgroupError::MissingController { .. } => {
                ContainerError::Invalid(format!("container {}: {e}", rec.id))
            }
            crate::cgroup::CgroupError::Rejected { .. } => ContainerError::FailedPrecondition {
                id: rec.id.clone(),
                reason: e.to_string(),
            },
            crate::cgroup::CgroupError::Io { .. } | crate::cgroup::CgroupError::Devices { .. } => {
                ContainerError::Internal {
                    id: rec.id.clone(),
                    what: "update resources",
                    detail: e.to_string(),
                }
            }
        };
        self.cgroups
            .check_applicable(&format!("container {}", rec.id), &res)
            .map_err(cg_err)?;
        if let Some(cg) = &rec.cgroup {
            // The policy is put back first (replaced atomically, so never
            // absent) and the limits written after: an update can never
            // leave the container with new limits and no device program.
            let oci = oci_spec::runtime::Spec::load(self.cdir(&rec.id).join("config.json"))
                .map_err(|e| internal(&rec.id, "load the container's spec")(e.to_string()))?;
            self.apply_device_policy(&rec.id, cg, &oci, rec.spec.security.privileged)?;
            self.cgroups.update(cg, &res).map_err(cg_err)?;
        }
        let oom = oom_score_adj.map(|v| effective_oom_score_adj(&rec.id, v));
        if let (Some(v), Some(init)) = (oom, rec.init) {
            if process::is_alive(init.into()) {
                std::fs::write(format!("/proc/{}/oom_score_adj", init.pid), v.to_string())
                    .map_err(|e| internal(&rec.id, "set oom_score_adj")(e.to_string()))?;
            }
        }
        self.update(&rec.id, |r| {
            r.spec.resources = res;
            if let Some(v) = oom_score_adj {
                r.spec.oom_score_adj = v;
            }
        })?;
        tracing::info!(container = %rec.id, "container resources updated");
        Ok(())
    }

    fn update(&self, id: &str, f: impl FnOnce(&mut ContainerRecord)) -> Result<(), ContainerError> {
        let rec = {
            let mut recs = lock(&self.records);
            let r = recs
                .get_mut(id)
                .ok_or_else(|| ContainerError::NotFound(id.to_string()))?;
            f(r);
            r.clone()
        };
        self.persist(&rec)
    }

    /// Signals the container (stop signal, then SIGKILL after `timeout`) and
    /// waits for its exit. Absent or exited containers are fine.
    pub async fn stop(&self, id: &str, timeout: Duration) -> Result<(), ContainerError> {
        let rec = match self.get(id) {
            Ok(r) => r,
            Err(ContainerError::NotFound(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        if rec.state == ContainerState::Exited || rec.state == ContainerState::Creating {
            return Ok(());
        }
        let Some(init) = rec.init else {
            return Ok(());
        };
        if !timeout.is_zero() && rec.state == ContainerState::Running {
            let sig = parse_signal(&rec.stop_signal).unwrap_or(rustix::process::Signal::TERM);
            process::signal(init.into(), sig);
            if self.wait_exited(&rec.id, timeout).await {
                return Ok(());
            }
        }
        process::signal(init.into(), rustix::process::Signal::KILL);
        if let Some(cg) = &rec.cgroup {
            // Everything the container forked goes too, not just its init.
            self.cgroups.kill(cg);
        }
        if !self.wait_exited(&rec.id, Duration::from_secs(10)).await {
            return Err(ContainerError::Internal {
                id: rec.id,
                what: "stop",
                detail: "the container did not exit after SIGKILL".into(),
            });
        }
        tracing::info!(container = %rec.id, "container stopped");
        Ok(())
    }

    async fn wait_exited(&self, id: &str, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match lock(&self.records).get(id) {
                Some(r) if r.state != ContainerState::Exited => {}
                _ => return true,
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Kills (if needed) and removes the container. Idempotent.
    pub async fn remove(&self, id: &str) -> Result<(), ContainerError> {
        let rec = match self.get(id) {
            Ok(r) => r,
            Err(ContainerError::NotFound(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        self.stop(&rec.id, Duration::ZERO).await?;
        let rec = self.get(&rec.id)?;
        let _ = std::fs::remove_file(self.attach_socket(&rec.id));
        let delegated = rec.clone();
        let this_dir = self.cdir(&rec.id);
        tokio::task::spawn_blocking(move || {
            if let Some(rt) = &delegated.runtime {
                rt.delete(&delegated.id)?;
                crate::linux::hostrootfs::unmount(&this_dir.join("rootfs"))?;
            }
            Ok(())
        })
        .await
        .map_err(|e| internal(&rec.id, "remove from the OCI runtime")(e.to_string()))?
        .map_err(internal(&rec.id, "remove from the OCI runtime"))?;
        if let Some(cg) = &rec.cgroup {
            self.cgroups
                .remove(cg)
                .map_err(|e| internal(&rec.id, "remove cgroup")(e.to_string()))?;
        }
        self.unmount_volumes(&rec.id)?;
        let dir = self.cdir(&rec.id);
        tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir))
            .await
            .map_err(|e| internal(&rec.id, "remove directory")(e.to_string()))?
            .or_else(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    Ok(())
                } else {
                    Err(internal(&rec.id, "remove directory")(e.to_string()))
                }
            })?;
        lock(&self.records).remove(&rec.id);
        tracing::info!(container = %rec.id, "container removed");
        Ok(())
    }

    /// Makes the monitor reopen the log path (kubelet rotated the file).
    /// Only running containers have a log being written.
    pub async fn reopen_log(&self, id: &str) -> Result<(), ContainerError> {
        let rec = self.get(id)?;
        if rec.state != ContainerState::Running {
            return Err(ContainerError::FailedPrecondition {
                id: rec.id,
                reason: "only a running container's log can be reopened".into(),
            });
        }
        let (Some(monitor), Some(path)) = (rec.monitor, rec.log_path.clone()) else {
            return Err(ContainerError::FailedPrecondition {
                id: rec.id,
                reason: "the container has no log path".into(),
            });
        };
        process::signal(monitor.into(), rustix::process::Signal::USR1);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !path.exists() {
            if tokio::time::Instant::now() >= deadline {
                return Err(ContainerError::Internal {
                    id: rec.id,
                    what: "reopen log",
                    detail: format!("{} was not recreated", path.display()),
                });
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(())
    }

    /// Runs a command in the running container, as the container's user,
    /// env and cwd, killing it when `timeout` expires. Blocking.
    pub fn exec_sync(
        &self,
        id: &str,
        cmd: &[String],
        timeout: Option<Duration>,
    ) -> Result<crate::linux::exec::ExecOutput, ContainerError> {
        if cmd.is_empty() {
            return Err(ContainerError::Invalid("ExecSync: cmd is empty".into()));
        }
        let (rec, init) = self.running(id)?;
        if let Some(rt) = &rec.runtime {
            return self.exec_delegated(&rec, rt, cmd, timeout);
        }
        let identity = self.identity_of(&rec)?;
        let spec = exec_spec(&rec, init.pid, cmd, timeout, &identity);
        crate::linux::exec::exec_sync(&spec).map_err(|e| ContainerError::Internal {
            id: rec.id.clone(),
            what: "exec",
            detail: e.to_string(),
        })
    }

    /// ExecSync through the container's OCI runtime: its process with `cmd`.
    fn exec_delegated(
        &self,
        rec: &ContainerRecord,
        rt: &crate::handlers::OciRuntime,
        cmd: &[String],
        timeout: Option<Duration>,
    ) -> Result<crate::linux::exec::ExecOutput, ContainerError> {
        let fail = internal(&rec.id, "exec");
        let dir = self.cdir(&rec.id);
        let spec = oci_spec::runtime::Spec::load(dir.join("config.json"))
            .map_err(|e| internal(&rec.id, "exec")(e.to_string()))?;
        let mut process = spec
            .process()
            .clone()
            .ok_or_else(|| internal(&rec.id, "exec")("the spec has no process".into()))?;
        process.set_args(Some(cmd.to_vec()));
        process.set_terminal(Some(false));
        let tag = hex::encode(rand::random::<[u8; 8]>());
        let process_file = dir.join(format!("exec-{tag}.json"));
        let pid_file = dir.join(format!("exec-{tag}.pid"));
        let out = write_json(&process_file, &process)
            .map_err(|e| e.to_string())
            .and_then(|()| rt.exec(&rec.id, &process_file, &pid_file, timeout, 16 << 20));
        let _ = std::fs::remove_file(&process_file);
        let _ = std::fs::remove_file(&pid_file);
        let out = out.map_err(fail)?;
        Ok(crate::linux::exec::ExecOutput {
            stdout: out.stdout,
            stderr: out.stderr,
            exit_code: out.exit_code,
            timed_out: out.timed_out,
        })
    }

    /// The container process's identity (user, capabilities, seccomp...),
    /// from its OCI spec, for commands run in it.
    fn identity_of(
        &self,
        rec: &ContainerRecord,
    ) -> Result<crate::linux::identity::Identity, ContainerError> {
        let broken = internal(&rec.id, "load the container's identity");
        let spec = oci_spec::runtime::Spec::load(self.cdir(&rec.id).join("config.json"))
            .map_err(|e| broken(e.to_string()))?;
        let process = spec.process().as_ref().ok_or_else(|| {
            internal(&rec.id, "load the container's identity")("the spec has no process".into())
        })?;
        crate::linux::identity::Identity::from_process(
            process,
            spec.linux().as_ref().and_then(|l| l.seccomp().as_ref()),
        )
        .map_err(internal(&rec.id, "load the container's identity"))
    }

    /// The record and init of a running container; FailedPrecondition
    /// otherwise.
    pub fn running(&self, id: &str) -> Result<(ContainerRecord, Proc), ContainerError> {
        let rec = self.get(id)?;
        match (rec.state, rec.init) {
            (ContainerState::Running, Some(i)) if process::is_alive(i.into()) => Ok((rec, i)),
            _ => Err(ContainerError::FailedPrecondition {
                id: rec.id,
                reason: "the container is not running".into(),
            }),
        }
    }

    /// Starts `cmd` in the running container like [`Self::exec_sync`] does,
    /// with pipes or a pty for the caller to stream.
    pub fn exec_start(
        &self,
        id: &str,
        cmd: &[String],
        io: ExecIoRequest,
    ) -> Result<ExecStarted, ContainerError> {
        if cmd.is_empty() {
            return Err(ContainerError::Invalid("Exec: cmd is empty".into()));
        }
        let (rec, init) = self.running(id)?;
        let fail = |what: &'static str| {
            let id = rec.id.clone();
            move |e: String| ContainerError::Internal {
                id,
                what,
                detail: e,
            }
        };
        let pipe = || {
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
                .map_err(|e| format!("create pipe: {e}"))
                .map_err(fail("exec"))
        };
        let mut stdio = crate::linux::exec::ExecStdio::default();
        let mut started = ExecStarted::default();
        if io.tty {
            let (master, slave) = crate::linux::pty::open_in(init.pid, rec.uid, rec.gid)
                .map_err(|e| e.to_string())
                .map_err(fail("exec"))?;
            let dup = |f: &std::os::fd::OwnedFd| {
                f.try_clone()
                    .map_err(|e| format!("dup pty: {e}"))
                    .map_err(fail("exec"))
            };
            if io.stdin {
                stdio.stdin = Some(dup(&slave)?);
            }
            stdio.stderr = Some(dup(&slave)?);
            stdio.stdout = Some(slave);
            stdio.tty = true;
            started.pty = Some(master);
        } else {
            if io.stdin {
                let (r, w) = pipe()?;
                stdio.stdin = Some(r);
                started.stdin = Some(w);
            }
            if io.stdout {
                let (r, w) = pipe()?;
                stdio.stdout = Some(w);
                started.stdout = Some(r);
            }
            if io.stderr {
                let (r, w) = pipe()?;
                stdio.stderr = Some(w);
                started.stderr = Some(r);
            }
        }
        let identity = self.identity_of(&rec)?;
        let spec = exec_spec(&rec, init.pid, cmd, None, &identity);
        let (process, kill) = crate::linux::exec::spawn(&spec, stdio)
            .map_err(|e| e.to_string())
            .map_err(fail("exec"))?;
        started.process = Some((process, kill));
        Ok(started)
    }

    /// Where the monitor of container `id` serves attach.
    pub fn attach_socket(&self, id: &str) -> PathBuf {
        self.sockets_dir.join(format!("{id}.sock"))
    }

    pub fn dir_of(&self, id: &str) -> PathBuf {
        self.cdir(id)
    }
}

/// Whether recursive read-only mounts work here (Status advertises it).
pub fn recursive_readonly_supported() -> bool {
    static SUPPORTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SUPPORTED.get_or_init(crate::linux::mountattr::recursive_readonly_supported)
}

/// Which stdio a streaming exec wants.
#[derive(Debug, Clone, Copy, Default)]
pub struct ExecIoRequest {
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
    pub tty: bool,
}

/// A started streaming exec: the command and berth's ends of its stdio
/// (with a tty only `pty`, the master, which carries both directions).
#[derive(Default)]
pub struct ExecStarted {
    pub process: Option<(
        crate::linux::exec::ExecProcess,
        crate::linux::exec::KillSwitch,
    )>,
    pub stdin: Option<std::os::fd::OwnedFd>,
    pub stdout: Option<std::os::fd::OwnedFd>,
    pub stderr: Option<std::os::fd::OwnedFd>,
    pub pty: Option<std::os::fd::OwnedFd>,
}

/// How every exec runs: the container's identity, env and cwd.
fn exec_spec<'a>(
    rec: &'a ContainerRecord,
    target_pid: i32,
    cmd: &'a [String],
    timeout: Option<Duration>,
    identity: &'a crate::linux::identity::Identity,
) -> crate::linux::exec::ExecSpec<'a> {
    crate::linux::exec::ExecSpec {
        target_pid,
        argv: cmd,
        env: &rec.env,
        cwd: &rec.cwd,
        identity,
        timeout,
        max_output: 16 << 20,
    }
}

fn log_path(pod: &PodInfo, spec: &ContainerSpec) -> Result<Option<PathBuf>, ContainerError> {
    if pod.log_directory.is_empty() || spec.log_path.is_empty() {
        return Ok(None);
    }
    let rel = Path::new(&spec.log_path);
    if rel.is_absolute()
        || rel
            .components()
            .any(|c| !matches!(c, std::path::Component::Normal(_)))
    {
        return Err(ContainerError::Invalid(format!(
            "log_path {:?} must be a relative path inside the pod's log directory",
            spec.log_path
        )));
    }
    Ok(Some(Path::new(&pod.log_directory).join(rel)))
}

/// A file of the image as the container sees it: the top-most layer that has
/// it (whiteouts end the search). Symlinks are not followed.
fn read_image_file(layers_dir: &Path, lowers: &[String], rel: &str) -> Option<String> {
    use std::os::unix::fs::FileTypeExt;
    for l in lowers {
        let p = layers_dir.join(l).join(rel);
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_file() => return std::fs::read_to_string(p).ok(),
            Ok(m) if m.file_type().is_char_device() => return None,
            Ok(_) => return None,
            Err(_) => continue,
        }
    }
    None
}

/// Opens the exec fifo for reading, which lets the init's blocked open for
/// writing complete, and waits for its byte.
fn open_fifo_and_wait(fifo: &Path, timeout: Duration) -> Result<(), String> {
    use nix::fcntl::{open, OFlag};
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    let fd = open(
        fifo,
        OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| format!("open {}: {e}", fifo.display()))?;
    let deadline = std::time::Instant::now() + timeout;
    let mut buf = [0u8; 1];
    loop {
        match nix::unistd::read(&fd, &mut buf) {
            Ok(1) => return Ok(()),
            Ok(_) | Err(nix::errno::Errno::EAGAIN) => {}
            Err(e) => return Err(e.to_string()),
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err("timed out waiting for the container init".into());
        }
        let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
        let ms = left.as_millis().min(100) as u16;
        let _ = poll(&mut fds, PollTimeout::from(ms));
    }
}

/// The oom_score_adj the container gets. Lowering it below berth's own needs
/// CAP_SYS_RESOURCE; without it the value is raised to berth's own (as
/// kubelet's guaranteed pods ask for -997 on nodes that cannot grant it).
fn effective_oom_score_adj(id: &str, wanted: i64) -> i64 {
    let own: i64 = std::fs::read_to_string("/proc/self/oom_score_adj")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    if wanted >= own || has_cap_sys_resource() {
        return wanted.clamp(-1000, 1000);
    }
    tracing::warn!(
        container = id,
        wanted,
        own,
        "oom_score_adj below berth's own needs CAP_SYS_RESOURCE: using berth's"
    );
    own
}

fn has_cap_sys_resource() -> bool {
    const CAP_SYS_RESOURCE: u32 = 24;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << CAP_SYS_RESOURCE) != 0)
}

/// A signal name ("SIGTERM", "TERM") or number, as images and CRI give it.
fn parse_signal(s: &str) -> Option<rustix::process::Signal> {
    let s = s.trim();
    if s.is_empty() {
        return None;
    }
    let num = match s.parse::<i32>() {
        Ok(n) => n,
        Err(_) => {
            let upper = s.to_ascii_uppercase();
            let name = if upper.starts_with("SIG") {
                upper
            } else {
                format!("SIG{upper}")
            };
            name.parse::<nix::sys::signal::Signal>().ok()? as i32
        }
    };
    rustix::process::Signal::from_named_raw(num)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_by_name_and_number() {
        use rustix::process::Signal;
        assert_eq!(parse_signal("SIGTERM"), Some(Signal::TERM));
        assert_eq!(parse_signal("quit"), Some(Signal::QUIT));
        assert_eq!(parse_signal("9"), Some(Signal::KILL));
        assert_eq!(parse_signal("SIGRTMIN+3"), None);
        assert_eq!(parse_signal(""), None);
    }
}
