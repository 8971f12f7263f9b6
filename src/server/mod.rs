//! The gRPC layer: CRI messages in, domain calls, CRI messages and status
//! codes out. No syscalls here beyond the listening socket itself.

mod chunks;
mod container;
mod events;
mod image;
mod pod;
mod runtime;
mod stats;

use crate::config::Config;
use crate::container::ContainerManager;
use crate::image::ImageManager;
use crate::pod::PodManager;
use cri_proto::v1::image_service_server::ImageServiceServer;
use cri_proto::v1::runtime_service_server::RuntimeServiceServer;
use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::{Response, Status};

/// How long in-flight RPCs may run after SIGTERM/SIGINT before berth exits anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("another berth is already serving {what} {path} (lock {lock} is held)")]
    Locked {
        what: &'static str,
        path: String,
        lock: String,
    },
    #[error(transparent)]
    Image(#[from] crate::image::ImageError),
    #[error(transparent)]
    Pod(#[from] crate::pod::PodError),
    #[error(transparent)]
    Container(#[from] crate::container::ContainerError),
    #[error(transparent)]
    Streaming(#[from] crate::streaming::StreamingError),
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
    #[error(transparent)]
    Handler(#[from] crate::handlers::HandlerError),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> ServeError + 'a {
    move |source| ServeError::Io {
        what,
        path: path.display().to_string(),
        source,
    }
}

/// State shared by the RPC handlers.
pub struct Daemon {
    pub config: Config,
    pub images: ImageManager,
    pub pods: Arc<PodManager>,
    pub containers: Arc<ContainerManager>,
    pub events: events::Events,
    pub container_stats: crate::container::stats::ContainerStats,
    pub pod_stats: crate::pod::stats::PodStats,
    pub streaming: Arc<crate::streaming::Streaming>,
    /// The RuntimeClass handlers pods can pick.
    pub handlers: crate::handlers::Handlers,
    pub features: Arc<crate::features::RuntimeFeatures>,
}

impl Daemon {
    /// Pods and containers by state and their live processes, for a scrape.
    fn metrics_snapshot(&self) -> crate::metrics::Snapshot {
        use crate::container::ContainerState as C;
        use crate::linux::process::is_alive;
        use crate::pod::PodState as P;
        let pods = self.pods.list(&Default::default());
        let ctrs = self.containers.list(&Default::default());
        let count_pods = |s: P| pods.iter().filter(|p| p.state == s).count() as i64;
        let count_ctrs = |s: C| ctrs.iter().filter(|c| c.state == s).count() as i64;
        crate::metrics::Snapshot {
            pods: vec![
                ("creating", count_pods(P::Creating)),
                ("ready", count_pods(P::Ready)),
                ("notready", count_pods(P::NotReady)),
            ],
            containers: vec![
                ("creating", count_ctrs(C::Creating)),
                ("created", count_ctrs(C::Created)),
                ("running", count_ctrs(C::Running)),
                ("exited", count_ctrs(C::Exited)),
            ],
            monitors: ctrs
                .iter()
                .filter_map(|c| c.monitor)
                .filter(|m| is_alive((*m).into()))
                .count() as i64,
            infra: pods
                .iter()
                .filter_map(|p| p.infra)
                .filter(|i| is_alive((*i).into()))
                .count() as i64,
        }
    }
}

/// Holds an exclusive flock for the life of the daemon.
struct LockFile {
    _file: std::fs::File,
}

fn take_lock(what: &'static str, target: &Path, lock: PathBuf) -> Result<LockFile, ServeError> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock)
        .map_err(io("open lock file", &lock))?;
    match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(LockFile { _file: file }),
        Err(rustix::io::Errno::WOULDBLOCK) => Err(ServeError::Locked {
            what,
            path: target.display().to_string(),
            lock: lock.display().to_string(),
        }),
        Err(e) => Err(ServeError::Io {
            what: "lock",
            path: lock.display().to_string(),
            source: e.into(),
        }),
    }
}

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn serve(config: Config) -> Result<(), ServeError> {
    for d in [&config.root, &config.state_dir] {
        std::fs::create_dir_all(d).map_err(io("create directory", d))?;
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o711))
            .map_err(io("chmod", d))?;
    }
    let sock_dir = config.socket.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(sock_dir).map_err(io("create directory", sock_dir))?;
    let _root_lock = take_lock("root", &config.root, config.root.join("berth.lock"))?;
    let mut sock_lock_path = config.socket.clone().into_os_string();
    sock_lock_path.push(".lock");
    let _sock_lock = take_lock("socket", &config.socket, PathBuf::from(sock_lock_path))?;

    let handlers = crate::handlers::Handlers::load(&config.runtime, &config.state_dir)?;
    let images = ImageManager::open(&config)?;
    let cgroups = Arc::new(crate::cgroup::Cgroups::new(
        config.cgroup.mode,
        config.cgroup.allow_missing_controllers,
    ));
    tracing::info!(enabled = cgroups.enabled(), "cgroup v2");
    if !cgroups.enabled()
        && config.security.device_policy == crate::cgroup::devices::Enforcement::Required
    {
        tracing::warn!("no usable cgroup v2, so no container device policy: non-privileged containers will be refused (set device_policy = \"best-effort\" in [security] to run them without one)");
    }
    let network = Arc::new(crate::network::Network::new(&config.network, &config.root));
    // The sealed copy berth runs from (its path on disk may be gone or
    // replaced; /proc/self/exe names a memfd).
    let exe = &crate::linux::selfexe::current().exec;
    let features = Arc::new(crate::features::RuntimeFeatures::probe(
        exe,
        images.image_fs_dir(),
    ));
    let pods = PodManager::open(
        &config.root,
        &config.state_dir,
        cgroups.clone(),
        network,
        features.user_namespaces.clone(),
    )?;
    let containers = ContainerManager::open(
        &config.root,
        &config.state_dir,
        images.image_fs_dir(),
        cgroups,
        (config.container.nofile_soft, config.container.nofile_hard),
        config.security.device_policy,
    )?;
    let container_stats = crate::container::stats::ContainerStats::new(
        images.container_fs_dir(),
        Duration::from_secs(config.stats.writable_layer_interval_secs),
    );
    let streaming =
        crate::streaming::Streaming::start(&config.streaming, containers.clone()).await?;
    let daemon = Arc::new(Daemon {
        config,
        images,
        pods,
        containers,
        events: events::Events::default(),
        container_stats,
        pod_stats: crate::pod::stats::PodStats::new(),
        streaming,
        handlers,
        features,
    });
    events::forward_exits(daemon.clone());
    if let Some(addr) = daemon.config.metrics.address {
        let d = daemon.clone();
        crate::metrics::start(addr, move || d.metrics_snapshot()).await?;
    }
    let socket = daemon.config.socket.clone();

    // We hold the socket lock, so an existing socket file is a stale leftover.
    match std::fs::remove_file(&socket) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(io("remove stale socket", &socket)(e))
        }
        _ => {}
    }
    let listener = tokio::net::UnixListener::bind(&socket).map_err(io("bind socket", &socket))?;
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o660))
        .map_err(io("chmod socket", &socket))?;
    tracing::info!(socket = %socket.display(), root = %daemon.config.root.display(), version = env!("CARGO_PKG_VERSION"), "berth serving CRI");

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        let _ = stop_tx.send(true);
    });
    let mut grace_rx = stop_rx.clone();
    let mut shutdown_rx = stop_rx;
    let server = tonic::transport::Server::builder()
        .add_service(RuntimeServiceServer::new(runtime::RuntimeApi(
            daemon.clone(),
        )))
        .add_service(ImageServiceServer::new(image::ImageApi(daemon.clone())))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::UnixListenerStream::new(listener),
            async move {
                let _ = shutdown_rx.wait_for(|v| *v).await;
                tracing::info!("shutting down: no new connections, finishing in-flight RPCs");
            },
        );
    let grace = async move {
        let _ = grace_rx.wait_for(|v| *v).await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    let result = tokio::select! {
        r = server => r.map_err(ServeError::from),
        _ = grace => {
            tracing::warn!("in-flight RPCs did not finish within {SHUTDOWN_GRACE:?}; exiting");
            Ok(())
        }
    };
    let _ = std::fs::remove_file(&socket);
    tracing::info!("berth stopped");
    result
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}

/// Runs one RPC handler, logging its duration at debug and failures at warn.
pub(crate) async fn rpc<T, F>(name: &'static str, object: &str, f: F) -> Result<Response<T>, Status>
where
    F: Future<Output = Result<T, Status>>,
{
    let start = Instant::now();
    let res = f.await;
    let took = start.elapsed();
    crate::metrics::rpc_done(name, res.as_ref().err().map(|s| s.code()), took);
    match &res {
        Ok(_) => tracing::debug!(rpc = name, object, ?took, "ok"),
        Err(s) if s.code() == tonic::Code::Internal || s.code() == tonic::Code::Unknown => {
            tracing::error!(rpc = name, object, ?took, code = ?s.code(), error = s.message(), "failed")
        }
        Err(s) => {
            tracing::warn!(rpc = name, object, ?took, code = ?s.code(), error = s.message(), "failed")
        }
    }
    res.map(Response::new)
}
