//! `lifecycle`: pod and container lifecycle latency, memory per running pod,
//! and ListContainers with many containers, against any CRI runtime.
//!
//! Three sections, each printing one JSON line on stdout when it completes
//! (and a table on stderr):
//!
//! - `{"op":"lifecycle"}`: `--warmup` + `--pods` sequential pod lifecycles
//!   (RunPodSandbox, PodSandboxStatus, CreateContainer, StartContainer,
//!   ContainerStatus, ExecSync `/bin/true`, StopContainer with timeout 0,
//!   RemoveContainer, StopPodSandbox, RemovePodSandbox), each RPC timed on
//!   the client (wall time of the call). Warm-up lifecycles are not counted.
//!   `lifecycle` is the sum of the eight lifecycle RPCs of one pod (run ..
//!   remove, without the status and exec calls in between).
//! - `{"op":"hold"}` per `--hold-pods` count: that many pods with one running
//!   `sleep` container each, then the Pss of the daemon (`--daemon-pid`) and
//!   of the monitor / shim processes (`--monitor-pattern`) and pod infra
//!   processes (`--infra-pattern`), then everything torn down.
//! - `{"op":"list"}`: `--list-containers` created (not started) containers in
//!   pods of `--list-per-pod`, and `--list-calls` timed ListContainers calls
//!   (unfiltered, as kubelet's relist does) after one warm-up call.
//!
//! Everything the client creates carries the label `berth-bench=<tag>`; on
//! an error the pods created so far are stopped and removed.

use std::collections::BTreeSet;
use std::future::Future;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use cri_proto::v1 as cri;
use cri_proto::v1::runtime_service_client::RuntimeServiceClient;
use serde_json::{json, Map, Value};
use tonic::transport::Channel;

use crate::procmem;
use crate::stats::{ms, Summary};

#[derive(clap::Args)]
pub struct Args {
    /// Image of the containers (already pulled), e.g. 127.0.0.1:5000/busybox:latest.
    #[arg(long)]
    image: String,
    /// Measured pod lifecycles, run one after the other (0: skip the section).
    #[arg(long, default_value_t = 30)]
    pods: usize,
    /// Lifecycles before the measured ones that are not counted.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// ExecSync `/bin/true` calls in total, spread round robin over the
    /// measured pods from the first (each warm-up pod does one more).
    #[arg(long, default_value_t = 50)]
    exec_iterations: usize,
    /// Comma-separated numbers of pods to hold at once for the memory
    /// measurement, e.g. 10,100.
    #[arg(long, value_delimiter = ',')]
    hold_pods: Vec<usize>,
    /// Containers to create (not start) for timing ListContainers (0: skip).
    #[arg(long, default_value_t = 0)]
    list_containers: usize,
    /// Containers per pod for --list-containers.
    #[arg(long, default_value_t = 100)]
    list_per_pod: usize,
    /// Timed ListContainers calls (after one warm-up call).
    #[arg(long, default_value_t = 20)]
    list_calls: usize,
    /// PID of the CRI daemon, whose Pss --hold-pods reports.
    #[arg(long)]
    daemon_pid: Option<i32>,
    /// Substring of /proc/PID/cmdline (arguments joined by spaces) of the
    /// per-container monitor or shim processes, e.g. "berth monitor" or
    /// "containerd-shim-runc-v2". Repeatable: a process must contain all.
    #[arg(long, allow_hyphen_values = true)]
    monitor_pattern: Vec<String>,
    /// Same for the pod infra (pause) processes.
    #[arg(long, allow_hyphen_values = true)]
    infra_pattern: Vec<String>,
    /// Parent of the pods' log directories (default: a new directory under
    /// $TMPDIR, removed at the end).
    #[arg(long)]
    log_dir: Option<PathBuf>,
    /// Seconds to wait for any one RPC.
    #[arg(long, default_value_t = 120)]
    rpc_timeout: u64,
    /// Seconds to let processes settle before measuring memory.
    #[arg(long, default_value_t = 2.0)]
    settle: f64,
    /// Concurrent workers for setting up and tearing down --list-containers.
    #[arg(long, default_value_t = 4)]
    parallel: usize,
    /// Runtime handler passed to RunPodSandbox.
    #[arg(long, default_value = "")]
    runtime_handler: String,
    /// Name of the runtime under test, for the tables and the JSON.
    #[arg(long, default_value = "")]
    name: String,
}

/// The RPCs of one pod lifecycle, in order; `true` where the RPC counts in
/// the lifecycle total.
const RPCS: [(&str, bool); 10] = [
    ("RunPodSandbox", true),
    ("PodSandboxStatus", false),
    ("CreateContainer", true),
    ("StartContainer", true),
    ("ContainerStatus", false),
    ("ExecSync", false),
    ("StopContainer", true),
    ("RemoveContainer", true),
    ("StopPodSandbox", true),
    ("RemovePodSandbox", true),
];

const LABEL: &str = "berth-bench";

/// A pod this client created.
#[derive(Clone)]
struct Pod {
    id: String,
    config: cri::PodSandboxConfig,
}

/// Shared by every task: the client, the run's tag and the pods still alive.
#[derive(Clone)]
struct Ctx {
    rt: RuntimeServiceClient<Channel>,
    timeout: Duration,
    tag: String,
    image: String,
    log_dir: PathBuf,
    runtime_handler: String,
    live: Arc<Mutex<BTreeSet<String>>>,
}

fn ns_options() -> cri::NamespaceOption {
    cri::NamespaceOption {
        network: cri::NamespaceMode::Pod as i32,
        pid: cri::NamespaceMode::Container as i32,
        ipc: cri::NamespaceMode::Pod as i32,
        ..Default::default()
    }
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

impl Ctx {
    /// Awaits one RPC with the timeout; returns the answer and the seconds
    /// it took.
    async fn timed<T>(
        &self,
        what: &str,
        fut: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> anyhow::Result<(T, f64)> {
        let start = Instant::now();
        let r = tokio::time::timeout(self.timeout, fut)
            .await
            .map_err(|_| anyhow!("{what}: no answer within {:?}", self.timeout))?
            .map_err(|s| anyhow!("{what}: {:?}: {}", s.code(), s.message()))?;
        Ok((r.into_inner(), start.elapsed().as_secs_f64()))
    }

    fn labels(&self) -> std::collections::HashMap<String, String> {
        [(LABEL.to_string(), self.tag.clone())].into()
    }

    fn pod_config(&self, name: &str) -> anyhow::Result<cri::PodSandboxConfig> {
        let md = cri::PodSandboxMetadata {
            name: name.to_string(),
            uid: format!("{}-{name}", self.tag),
            namespace: "berth-bench".into(),
            attempt: 0,
        };
        // As kubelet does: /var/log/pods/<namespace>_<name>_<uid>, created
        // by the client.
        let log_dir = self
            .log_dir
            .join(format!("{}_{}_{}", md.namespace, md.name, md.uid));
        std::fs::create_dir_all(&log_dir)
            .with_context(|| format!("create {}", log_dir.display()))?;
        Ok(cri::PodSandboxConfig {
            metadata: Some(md),
            hostname: name.to_string(),
            log_directory: log_dir.to_string_lossy().into_owned(),
            labels: self.labels(),
            linux: Some(cri::LinuxPodSandboxConfig {
                security_context: Some(cri::LinuxSandboxSecurityContext {
                    namespace_options: Some(ns_options()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    fn container_config(
        &self,
        pod: &Pod,
        name: &str,
        command: Vec<String>,
    ) -> anyhow::Result<cri::ContainerConfig> {
        let dir = PathBuf::from(&pod.config.log_directory).join(name);
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        Ok(cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: name.to_string(),
                attempt: 0,
            }),
            image: Some(cri::ImageSpec {
                image: self.image.clone(),
                ..Default::default()
            }),
            command,
            labels: self.labels(),
            log_path: format!("{name}/0.log"),
            linux: Some(cri::LinuxContainerConfig {
                security_context: Some(cri::LinuxContainerSecurityContext {
                    namespace_options: Some(ns_options()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    async fn run_pod(&self, name: &str) -> anyhow::Result<(Pod, f64)> {
        let config = self.pod_config(name)?;
        let mut rt = self.rt.clone();
        let (r, secs) = self
            .timed(
                "RunPodSandbox",
                rt.run_pod_sandbox(cri::RunPodSandboxRequest {
                    config: Some(config.clone()),
                    runtime_handler: self.runtime_handler.clone(),
                }),
            )
            .await
            .with_context(|| format!("pod {name}"))?;
        self.live.lock().unwrap().insert(r.pod_sandbox_id.clone());
        Ok((
            Pod {
                id: r.pod_sandbox_id,
                config,
            },
            secs,
        ))
    }

    /// PodSandboxStatus; checks the pod is ready and returns its IP.
    async fn pod_status(&self, pod: &Pod) -> anyhow::Result<(String, f64)> {
        let mut rt = self.rt.clone();
        let (r, secs) = self
            .timed(
                "PodSandboxStatus",
                rt.pod_sandbox_status(cri::PodSandboxStatusRequest {
                    pod_sandbox_id: pod.id.clone(),
                    verbose: false,
                }),
            )
            .await?;
        let status = r.status.context("PodSandboxStatus: no status")?;
        if status.state != cri::PodSandboxState::SandboxReady as i32 {
            bail!("pod {} is not ready: state {}", pod.id, status.state);
        }
        let ip = status.network.map(|n| n.ip).unwrap_or_default();
        Ok((ip, secs))
    }

    async fn create_container(
        &self,
        pod: &Pod,
        name: &str,
        command: &[&str],
    ) -> anyhow::Result<(String, f64)> {
        let config = self.container_config(pod, name, strings(command))?;
        let mut rt = self.rt.clone();
        let (r, secs) = self
            .timed(
                "CreateContainer",
                rt.create_container(cri::CreateContainerRequest {
                    pod_sandbox_id: pod.id.clone(),
                    config: Some(config),
                    sandbox_config: Some(pod.config.clone()),
                }),
            )
            .await
            .with_context(|| format!("container {name} in pod {}", pod.id))?;
        Ok((r.container_id, secs))
    }

    async fn start_container(&self, id: &str) -> anyhow::Result<f64> {
        let mut rt = self.rt.clone();
        let req = cri::StartContainerRequest {
            container_id: id.to_string(),
        };
        Ok(self
            .timed("StartContainer", rt.start_container(req))
            .await?
            .1)
    }

    /// ContainerStatus; checks the container is running.
    async fn container_running(&self, id: &str) -> anyhow::Result<f64> {
        let mut rt = self.rt.clone();
        let req = cri::ContainerStatusRequest {
            container_id: id.to_string(),
            verbose: false,
        };
        let (r, secs) = self
            .timed("ContainerStatus", rt.container_status(req))
            .await?;
        let s = r.status.context("ContainerStatus: no status")?;
        if s.state != cri::ContainerState::ContainerRunning as i32 {
            bail!(
                "container {id} is not running: state {} reason {:?} message {:?}",
                s.state,
                s.reason,
                s.message
            );
        }
        Ok(secs)
    }

    /// ExecSync `/bin/true`; checks it exits 0.
    async fn exec_true(&self, id: &str) -> anyhow::Result<f64> {
        let mut rt = self.rt.clone();
        let req = cri::ExecSyncRequest {
            container_id: id.to_string(),
            cmd: strings(&["/bin/true"]),
            timeout: 30,
        };
        let (r, secs) = self.timed("ExecSync", rt.exec_sync(req)).await?;
        if r.exit_code != 0 {
            bail!(
                "ExecSync /bin/true in {id}: exit code {}, stderr {:?}",
                r.exit_code,
                String::from_utf8_lossy(&r.stderr)
            );
        }
        Ok(secs)
    }

    async fn stop_container(&self, id: &str) -> anyhow::Result<f64> {
        let mut rt = self.rt.clone();
        let req = cri::StopContainerRequest {
            container_id: id.to_string(),
            timeout: 0,
        };
        Ok(self.timed("StopContainer", rt.stop_container(req)).await?.1)
    }

    async fn remove_container(&self, id: &str) -> anyhow::Result<f64> {
        let mut rt = self.rt.clone();
        let req = cri::RemoveContainerRequest {
            container_id: id.to_string(),
        };
        Ok(self
            .timed("RemoveContainer", rt.remove_container(req))
            .await?
            .1)
    }

    /// StopPodSandbox then RemovePodSandbox: their times.
    async fn remove_pod(&self, id: &str) -> anyhow::Result<(f64, f64)> {
        let mut rt = self.rt.clone();
        let (_, stop) = self
            .timed(
                "StopPodSandbox",
                rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
                    pod_sandbox_id: id.to_string(),
                }),
            )
            .await?;
        let (_, remove) = self
            .timed(
                "RemovePodSandbox",
                rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
                    pod_sandbox_id: id.to_string(),
                }),
            )
            .await?;
        self.live.lock().unwrap().remove(id);
        Ok((stop, remove))
    }

    /// Containers with this run's label (optionally only in `state`).
    async fn own_containers(&self, state: Option<cri::ContainerState>) -> anyhow::Result<usize> {
        let mut rt = self.rt.clone();
        let req = cri::ListContainersRequest {
            filter: Some(cri::ContainerFilter {
                state: state.map(|s| cri::ContainerStateValue { state: s as i32 }),
                label_selector: self.labels(),
                ..Default::default()
            }),
        };
        let (r, _) = self
            .timed("ListContainers", rt.list_containers(req))
            .await?;
        Ok(r.containers.len())
    }

    /// One full pod lifecycle; returns the time of each RPC (in RPCS order,
    /// ExecSync once per call) and the pod's IP.
    async fn lifecycle_once(
        &self,
        name: &str,
        execs: usize,
    ) -> anyhow::Result<(Vec<(&'static str, f64)>, String)> {
        let mut t = Vec::new();
        let (pod, secs) = self.run_pod(name).await?;
        t.push(("RunPodSandbox", secs));
        let (ip, secs) = self.pod_status(&pod).await?;
        t.push(("PodSandboxStatus", secs));
        let (cid, secs) = self
            .create_container(&pod, "sleep", &["sleep", "3600"])
            .await?;
        t.push(("CreateContainer", secs));
        t.push(("StartContainer", self.start_container(&cid).await?));
        t.push(("ContainerStatus", self.container_running(&cid).await?));
        for _ in 0..execs {
            t.push(("ExecSync", self.exec_true(&cid).await?));
        }
        t.push(("StopContainer", self.stop_container(&cid).await?));
        t.push(("RemoveContainer", self.remove_container(&cid).await?));
        let (stop, remove) = self.remove_pod(&pod.id).await?;
        t.push(("StopPodSandbox", stop));
        t.push(("RemovePodSandbox", remove));
        Ok((t, ip))
    }

    /// Stops and removes every pod still alive (after an error).
    async fn remove_leftovers(&self) {
        let ids: Vec<String> = self.live.lock().unwrap().iter().cloned().collect();
        if ids.is_empty() {
            return;
        }
        eprintln!("berth-bench: removing {} leftover pod(s)", ids.len());
        for id in ids {
            if let Err(e) = self.remove_pod(&id).await {
                eprintln!("berth-bench: cannot remove pod {id}: {e:#}");
            }
        }
    }
}

/// Prints one result line on stdout at once.
fn emit(v: &Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

fn who(args: &Args) -> String {
    if args.name.is_empty() {
        "runtime".into()
    } else {
        args.name.clone()
    }
}

/// Runs the sections asked for; each prints its JSON line when done.
pub async fn run(channel: Channel, args: Args) -> anyhow::Result<()> {
    if args.pods == 0 && args.hold_pods.is_empty() && args.list_containers == 0 {
        bail!("nothing to do: --pods 0 and neither --hold-pods nor --list-containers");
    }
    if args.hold_pods.contains(&0) {
        bail!("--hold-pods: counts must be positive");
    }
    if args.list_containers > 0 && (args.list_per_pod == 0 || args.list_calls == 0) {
        bail!("--list-per-pod and --list-calls must be positive");
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let tag = format!("{:x}{:05x}", std::process::id(), now.as_micros() & 0xfffff);
    let (log_dir, own_log_dir) = match &args.log_dir {
        Some(d) => (d.join(&tag), false),
        None => (
            std::env::temp_dir().join(format!("berth-bench-{tag}")),
            true,
        ),
    };
    std::fs::create_dir_all(&log_dir).with_context(|| format!("create {}", log_dir.display()))?;
    let ctx = Ctx {
        rt: RuntimeServiceClient::new(channel),
        timeout: Duration::from_secs(args.rpc_timeout.max(1)),
        tag,
        image: args.image.clone(),
        log_dir: log_dir.clone(),
        runtime_handler: args.runtime_handler.clone(),
        live: Arc::default(),
    };

    let result = sections(&ctx, &args).await;
    if result.is_err() {
        ctx.remove_leftovers().await;
    }
    if own_log_dir || result.is_ok() {
        let _ = std::fs::remove_dir_all(&log_dir);
    }
    result
}

async fn sections(ctx: &Ctx, args: &Args) -> anyhow::Result<()> {
    if args.pods > 0 {
        emit(&lifecycle(ctx, args).await?);
    }
    for &n in &args.hold_pods {
        emit(&hold(ctx, args, n).await?);
    }
    if args.list_containers > 0 {
        emit(&list(ctx, args).await?);
    }
    Ok(())
}

fn daemon_mem(args: &Args) -> anyhow::Result<Option<procmem::Mem>> {
    args.daemon_pid
        .map(|pid| procmem::mem_of(pid).context("--daemon-pid"))
        .transpose()
}

async fn lifecycle(ctx: &Ctx, args: &Args) -> anyhow::Result<Value> {
    let who = who(args);
    let daemon_start = daemon_mem(args)?;
    for w in 0..args.warmup {
        ctx.lifecycle_once(&format!("bench-{}-warmup-{w}", ctx.tag), 1)
            .await
            .context("warm-up lifecycle")?;
    }
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); RPCS.len()];
    let mut totals = Vec::new();
    let mut ip = String::new();
    let start = Instant::now();
    for i in 0..args.pods {
        let execs =
            args.exec_iterations / args.pods + usize::from(i < args.exec_iterations % args.pods);
        let (times, pod_ip) = ctx
            .lifecycle_once(&format!("bench-{}-life-{i}", ctx.tag), execs)
            .await
            .with_context(|| format!("lifecycle {}/{}", i + 1, args.pods))?;
        if i == 0 {
            ip = pod_ip;
        }
        let mut total = 0.0;
        for (rpc, secs) in times {
            let k = RPCS.iter().position(|(r, _)| *r == rpc).expect("known RPC");
            samples[k].push(secs);
            if RPCS[k].1 {
                total += secs;
            }
        }
        totals.push(total);
    }
    let wall = start.elapsed().as_secs_f64();
    let daemon_end = daemon_mem(args)?;

    let mut rpcs = Map::new();
    eprintln!();
    eprintln!(
        "{who}: {} pod lifecycles (+{} warm-up), {} ExecSync, client-side wall time per RPC",
        args.pods, args.warmup, args.exec_iterations
    );
    eprintln!(
        "{:<20} {:>5} {:>10} {:>10} {:>10}",
        "rpc", "n", "p50 ms", "p99 ms", "max ms"
    );
    for (k, (rpc, _)) in RPCS.iter().enumerate() {
        if let Some(s) = Summary::of(&samples[k]) {
            eprintln!(
                "{rpc:<20} {:>5} {:>10.2} {:>10.2} {:>10.2}",
                s.n,
                ms(s.p50),
                ms(s.p99),
                ms(s.max)
            );
            rpcs.insert(rpc.to_string(), s.to_json());
        }
    }
    let total = Summary::of(&totals).context("no lifecycles")?;
    eprintln!(
        "{:<20} {:>5} {:>10.2} {:>10.2} {:>10.2}",
        "lifecycle (run..rm)",
        total.n,
        ms(total.p50),
        ms(total.p99),
        ms(total.max)
    );
    eprintln!(
        "pod IP: {}",
        if ip.is_empty() { "(none)" } else { ip.as_str() }
    );
    Ok(json!({
        "op": "lifecycle",
        "runtime": args.name,
        "image": args.image,
        "pods": args.pods,
        "warmup": args.warmup,
        "exec_iterations": args.exec_iterations,
        "rpcs": rpcs,
        "lifecycle": total.to_json(),
        "wall_seconds": (wall * 1e3).round() / 1e3,
        "pod_ip": ip,
        "daemon_pss_kib_start": daemon_start.map(|m| m.pss_kib),
        "daemon_pss_kib_end": daemon_end.map(|m| m.pss_kib),
    }))
}

fn group(patterns: &[String], exclude: &[i32]) -> Option<procmem::Group> {
    if patterns.is_empty() {
        return None;
    }
    // BENCH_SMAPS_DIR: keep the full smaps of one process of each group, to
    // see which mappings its memory comes from.
    if let Some(dir) = std::env::var_os("BENCH_SMAPS_DIR") {
        if let Some(pid) = procmem::find(patterns, exclude).first() {
            let name: String = patterns
                .join("_")
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                .collect();
            let _ = std::fs::copy(
                format!("/proc/{pid}/smaps"),
                std::path::Path::new(&dir).join(format!("{name}.smaps")),
            );
        }
    }
    Some(procmem::group(patterns, exclude))
}

fn per(total: u64, n: usize) -> f64 {
    (total as f64 / n.max(1) as f64 * 10.0).round() / 10.0
}

async fn hold(ctx: &Ctx, args: &Args, n: usize) -> anyhow::Result<Value> {
    let who = who(args);
    let exclude: Vec<i32> = args.daemon_pid.into_iter().collect();
    let daemon_before = daemon_mem(args)?;
    let mon_before = group(&args.monitor_pattern, &exclude);
    let infra_before = group(&args.infra_pattern, &exclude);

    let start = Instant::now();
    let mut held = Vec::with_capacity(n);
    for j in 0..n {
        let (pod, _) = ctx
            .run_pod(&format!("bench-{}-hold{n}-{j}", ctx.tag))
            .await?;
        let (cid, _) = ctx
            .create_container(&pod, "sleep", &["sleep", "3600"])
            .await?;
        ctx.start_container(&cid).await?;
        held.push((pod, cid));
    }
    let setup = start.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs_f64(args.settle)).await;
    let running = ctx
        .own_containers(Some(cri::ContainerState::ContainerRunning))
        .await?;
    if running != n {
        bail!("holding {n} pods: {running} of their containers are running");
    }
    let daemon = daemon_mem(args)?;
    let mon = group(&args.monitor_pattern, &exclude);
    let infra = group(&args.infra_pattern, &exclude);

    let start = Instant::now();
    for (pod, cid) in &held {
        ctx.stop_container(cid).await?;
        ctx.remove_container(cid).await?;
        ctx.remove_pod(&pod.id).await?;
    }
    let teardown = start.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs_f64(args.settle)).await;
    let daemon_after = daemon_mem(args)?;
    let mon_after = group(&args.monitor_pattern, &exclude);
    let infra_after = group(&args.infra_pattern, &exclude);

    let mut v = json!({
        "op": "hold",
        "runtime": args.name,
        "pods": n,
        "containers": n,
        "setup_seconds": (setup * 1e3).round() / 1e3,
        "teardown_seconds": (teardown * 1e3).round() / 1e3,
    });
    let o = v.as_object_mut().unwrap();
    eprintln!();
    eprintln!(
        "{who}: holding {n} pods x 1 running container (set up {setup:.2} s, torn down {teardown:.2} s)"
    );
    // Everything the runtime runs for the pods (daemon + monitors + infra):
    // Pss with the pods held minus Pss before, per pod. Pss alone moves
    // shared pages between processes (a daemon whose binary the monitors
    // also map "shrinks"), so the daemon's own growth is its anonymous memory.
    let mut total_before = 0u64;
    let mut total = 0u64;
    if let (Some(b), Some(d), Some(a)) = (daemon_before, daemon, daemon_after) {
        total_before += b.pss_kib;
        total += d.pss_kib;
        for (key, val) in [
            ("daemon_pss_kib_before", b.pss_kib),
            ("daemon_pss_kib", d.pss_kib),
            ("daemon_pss_kib_after", a.pss_kib),
            ("daemon_rss_kib", d.rss_kib),
            ("daemon_anon_kib_before", b.anon_kib),
            ("daemon_anon_kib", d.anon_kib),
            ("daemon_anon_kib_after", a.anon_kib),
        ] {
            o.insert(key.into(), val.into());
        }
        let growth = d.anon_kib as f64 - b.anon_kib as f64;
        o.insert(
            "daemon_anon_kib_per_pod".into(),
            ((growth / n as f64 * 10.0).round() / 10.0).into(),
        );
        eprintln!(
            "  daemon: Pss {} KiB (before {} KiB, after teardown {} KiB); anon {} KiB (before {} KiB, after {} KiB): {:+.1} KiB per pod",
            d.pss_kib,
            b.pss_kib,
            a.pss_kib,
            d.anon_kib,
            b.anon_kib,
            a.anon_kib,
            growth / n as f64
        );
    }
    for (key, label, g, before, after) in [
        ("monitor", "monitors", mon, mon_before, mon_after),
        ("infra", "infra", infra, infra_before, infra_after),
    ] {
        let (Some(g), Some(before), Some(after)) = (g, before, after) else {
            continue;
        };
        total_before += before.pss_kib;
        total += g.pss_kib;
        let count = g.count.saturating_sub(before.count);
        let pss = g.pss_kib.saturating_sub(before.pss_kib);
        o.insert(format!("{key}_count"), count.into());
        o.insert(format!("{key}_pss_kib"), pss.into());
        o.insert(
            format!("{key}_rss_kib"),
            g.rss_kib.saturating_sub(before.rss_kib).into(),
        );
        o.insert(
            format!("{key}_anon_kib"),
            g.anon_kib.saturating_sub(before.anon_kib).into(),
        );
        o.insert(format!("{key}_pss_kib_per_pod"), per(pss, n).into());
        o.insert(format!("{key}_pss_kib_per_process"), per(pss, count).into());
        o.insert(format!("{key}_count_before"), before.count.into());
        o.insert(format!("{key}_count_after_teardown"), after.count.into());
        eprintln!(
            "  {label}: {count} processes, Pss {pss} KiB = {:.1} KiB per pod, anon {} KiB ({} left after teardown)",
            per(pss, n),
            g.anon_kib.saturating_sub(before.anon_kib),
            after.count
        );
    }
    let growth = total as f64 - total_before as f64;
    o.insert("total_pss_kib".into(), total.into());
    o.insert("total_pss_kib_before".into(), total_before.into());
    o.insert(
        "total_pss_kib_per_pod".into(),
        ((growth / n as f64 * 10.0).round() / 10.0).into(),
    );
    eprintln!(
        "  total Pss (daemon + monitors + infra): {total} KiB, before {total_before} KiB: {:+.1} KiB per pod",
        growth / n as f64
    );
    Ok(v)
}

async fn list(ctx: &Ctx, args: &Args) -> anyhow::Result<Value> {
    let who = who(args);
    let n = args.list_containers;
    let npods = n.div_ceil(args.list_per_pod);
    let mut pods = Vec::with_capacity(npods);
    for j in 0..npods {
        let (pod, _) = ctx.run_pod(&format!("bench-{}-list-{j}", ctx.tag)).await?;
        let count = args.list_per_pod.min(n - j * args.list_per_pod);
        pods.push((pod, count));
    }

    // Containers: `parallel` workers, each creating whole pods' containers.
    let workers = args.parallel.clamp(1, npods);
    let start = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for w in 0..workers {
        let ctx = ctx.clone();
        let mine: Vec<(Pod, usize)> = pods.iter().skip(w).step_by(workers).cloned().collect();
        set.spawn(async move {
            let mut made = Vec::new();
            let mut times = Vec::new();
            for (pod, count) in mine {
                for c in 0..count {
                    let (id, secs) = ctx
                        .create_container(&pod, &format!("c{c}"), &["sleep", "3600"])
                        .await?;
                    made.push(id);
                    times.push(secs);
                }
            }
            anyhow::Ok((made, times))
        });
    }
    let mut ids = Vec::with_capacity(n);
    let mut create_times = Vec::with_capacity(n);
    let mut first_err = None;
    while let Some(r) = set.join_next().await {
        match r.map_err(anyhow::Error::from).and_then(|r| r) {
            Ok((made, times)) => {
                ids.extend(made);
                create_times.extend(times);
            }
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    if let Some(e) = first_err {
        return Err(e.context(format!("creating {n} containers")));
    }
    let setup = start.elapsed().as_secs_f64();
    let own = ctx
        .own_containers(Some(cri::ContainerState::ContainerCreated))
        .await?;
    if own != n {
        bail!("created {n} containers but {own} are listed as created");
    }

    let mut times = Vec::with_capacity(args.list_calls);
    let mut listed = 0;
    for k in 0..=args.list_calls {
        let mut rt = ctx.rt.clone();
        let (r, secs) = ctx
            .timed(
                "ListContainers",
                rt.list_containers(cri::ListContainersRequest {
                    filter: Some(cri::ContainerFilter::default()),
                }),
            )
            .await?;
        if r.containers.len() < n {
            bail!(
                "ListContainers returned {} containers, expected at least {n}",
                r.containers.len()
            );
        }
        listed = r.containers.len();
        if k > 0 {
            times.push(secs);
        }
    }
    let s = Summary::of(&times).context("no ListContainers calls")?;

    // Tear down: the containers (in parallel), then the pods.
    let start = Instant::now();
    let chunk = ids.len().div_ceil(workers).max(1);
    let mut set = tokio::task::JoinSet::new();
    for part in ids.chunks(chunk) {
        let ctx = ctx.clone();
        let part = part.to_vec();
        set.spawn(async move {
            for id in part {
                ctx.remove_container(&id).await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    for (pod, _) in &pods {
        ctx.remove_pod(&pod.id).await?;
    }
    let teardown = start.elapsed().as_secs_f64();

    let create = Summary::of(&create_times).context("no containers")?;
    eprintln!();
    eprintln!(
        "{who}: ListContainers with {listed} containers ({n} created, not started, in {npods} pods; \
         created in {setup:.1} s by {workers} workers, CreateContainer p50 {:.2} ms; torn down in {teardown:.1} s)",
        ms(create.p50)
    );
    eprintln!(
        "  {} calls: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        s.n,
        ms(s.p50),
        ms(s.p99),
        ms(s.max)
    );
    Ok(json!({
        "op": "list",
        "runtime": args.name,
        "containers": n,
        "listed": listed,
        "pods": npods,
        "list": s.to_json(),
        "setup_seconds": (setup * 1e3).round() / 1e3,
        "setup_workers": workers,
        "create_container_under_load": create.to_json(),
        "teardown_seconds": (teardown * 1e3).round() / 1e3,
    }))
}
