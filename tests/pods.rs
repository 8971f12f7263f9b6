//! Pod sandboxes: RunPodSandbox, StopPodSandbox, RemovePodSandbox,
//! PodSandboxStatus and ListPodSandbox against a real daemon — the pod's
//! namespaces and infra process (checked through /proc), the netns pin (in
//! the test mount namespace, where berth's mounts live), idempotency, id
//! prefixes, duplicate detection and survival across a daemon restart.

mod common;

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use cri::runtime_service_client::RuntimeServiceClient;
use cri::{NamespaceMode, PodSandboxState};
use cri_proto::v1 as cri;
use nix::sched::CloneFlags;
use tonic::transport::Channel;
use tonic::{Code, Status};

type Rt = RuntimeServiceClient<Channel>;

/// Every RPC gets this long; a hang fails the test with a clear message.
const RPC_TIMEOUT: Duration = Duration::from_secs(10);

/// A 64-hex id no pod has.
const UNKNOWN_ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

// ---------------------------------------------------------------------------
// requests
// ---------------------------------------------------------------------------

fn metadata(name: &str, attempt: u32) -> cri::PodSandboxMetadata {
    cri::PodSandboxMetadata {
        name: name.into(),
        uid: format!("uid-{name}"),
        namespace: "default".into(),
        attempt,
    }
}

fn ns_options(
    network: NamespaceMode,
    pid: NamespaceMode,
    ipc: NamespaceMode,
) -> cri::NamespaceOption {
    cri::NamespaceOption {
        network: network as i32,
        pid: pid as i32,
        ipc: ipc as i32,
        ..Default::default()
    }
}

/// What kubelet sends for an ordinary pod: own network and IPC, no shared
/// PID namespace (CONTAINER), labels and annotations, a log directory.
fn pod_config(berth: &Berth, name: &str) -> cri::PodSandboxConfig {
    let md = metadata(name, 0);
    let log_dir = berth
        .dir
        .join("pod-logs")
        .join(format!("{}_{}_{}", md.namespace, md.name, md.uid));
    cri::PodSandboxConfig {
        metadata: Some(md),
        hostname: String::new(),
        log_directory: log_dir.to_string_lossy().into_owned(),
        dns_config: Some(cri::DnsConfig {
            servers: vec!["10.96.0.10".into()],
            searches: vec![
                "default.svc.cluster.local".into(),
                "svc.cluster.local".into(),
            ],
            options: vec!["ndots:5".into()],
        }),
        labels: HashMap::from([
            ("app".to_string(), name.to_string()),
            (
                "io.kubernetes.pod.namespace".to_string(),
                "default".to_string(),
            ),
        ]),
        annotations: HashMap::from([("berth.test/pod".to_string(), name.to_string())]),
        linux: Some(cri::LinuxPodSandboxConfig {
            security_context: Some(cri::LinuxSandboxSecurityContext {
                namespace_options: Some(ns_options(
                    NamespaceMode::Pod,
                    NamespaceMode::Container,
                    NamespaceMode::Pod,
                )),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn with_namespaces(
    mut cfg: cri::PodSandboxConfig,
    opts: cri::NamespaceOption,
) -> cri::PodSandboxConfig {
    cfg.linux
        .as_mut()
        .unwrap()
        .security_context
        .as_mut()
        .unwrap()
        .namespace_options = Some(opts);
    cfg
}

async fn rpc<T>(
    what: &str,
    fut: impl std::future::Future<Output = Result<tonic::Response<T>, Status>>,
) -> Result<T, Status> {
    match tokio::time::timeout(RPC_TIMEOUT, fut).await {
        Ok(r) => r.map(tonic::Response::into_inner),
        Err(_) => panic!("{what} did not answer within {RPC_TIMEOUT:?}"),
    }
}

async fn try_run(rt: &mut Rt, config: Option<cri::PodSandboxConfig>) -> Result<String, Status> {
    rpc(
        "RunPodSandbox",
        rt.run_pod_sandbox(cri::RunPodSandboxRequest {
            config,
            runtime_handler: String::new(),
        }),
    )
    .await
    .map(|r| r.pod_sandbox_id)
}

/// RunPodSandbox that must succeed; checks the id is 64 lowercase hex chars.
async fn run(rt: &mut Rt, cfg: &cri::PodSandboxConfig) -> String {
    let name = cfg
        .metadata
        .as_ref()
        .map(|m| m.name.clone())
        .unwrap_or_default();
    let id = try_run(rt, Some(cfg.clone()))
        .await
        .unwrap_or_else(|e| panic!("RunPodSandbox {name}: {e:?}"));
    assert!(
        id.len() == 64
            && id
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
        "pod id is not 64 lowercase hex chars: {id:?}"
    );
    id
}

async fn status(
    rt: &mut Rt,
    id: &str,
    verbose: bool,
) -> Result<cri::PodSandboxStatusResponse, Status> {
    rpc(
        "PodSandboxStatus",
        rt.pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: id.into(),
            verbose,
        }),
    )
    .await
}

/// The `status` field of a PodSandboxStatus that must succeed.
async fn status_of(rt: &mut Rt, id: &str) -> cri::PodSandboxStatus {
    status(rt, id, false)
        .await
        .unwrap_or_else(|e| panic!("PodSandboxStatus {id}: {e:?}"))
        .status
        .expect("PodSandboxStatusResponse.status is set")
}

async fn list(rt: &mut Rt, filter: Option<cri::PodSandboxFilter>) -> Vec<cri::PodSandbox> {
    rpc(
        "ListPodSandbox",
        rt.list_pod_sandbox(cri::ListPodSandboxRequest { filter }),
    )
    .await
    .unwrap_or_else(|e| panic!("ListPodSandbox: {e:?}"))
    .items
}

async fn list_ids(rt: &mut Rt, filter: cri::PodSandboxFilter) -> Vec<String> {
    let mut ids: Vec<String> = list(rt, Some(filter))
        .await
        .into_iter()
        .map(|p| p.id)
        .collect();
    ids.sort();
    ids
}

async fn stop(rt: &mut Rt, id: &str) -> Result<(), Status> {
    rpc(
        "StopPodSandbox",
        rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: id.into(),
        }),
    )
    .await
    .map(|_| ())
}

async fn remove(rt: &mut Rt, id: &str) -> Result<(), Status> {
    rpc(
        "RemovePodSandbox",
        rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: id.into(),
        }),
    )
    .await
    .map(|_| ())
}

/// Verbose status info["info"], parsed.
async fn verbose_info(rt: &mut Rt, id: &str) -> serde_json::Value {
    let resp = status(rt, id, true)
        .await
        .unwrap_or_else(|e| panic!("PodSandboxStatus {id} verbose: {e:?}"));
    let raw = resp
        .info
        .get("info")
        .unwrap_or_else(|| panic!("verbose status has no info[\"info\"]: {:?}", resp.info));
    let v: serde_json::Value = serde_json::from_str(raw)
        .unwrap_or_else(|e| panic!("info[\"info\"] is not JSON ({e}): {raw}"));
    assert!(v.is_object(), "info[\"info\"] is not a JSON object: {raw}");
    v
}

/// The infra process of a ready pod (from verbose status), checked to be
/// running.
async fn infra(rt: &mut Rt, id: &str) -> Proc {
    let info = verbose_info(rt, id).await;
    let pid = info["pid"]
        .as_i64()
        .unwrap_or_else(|| panic!("info.pid is not a number: {info}"));
    assert!(pid > 1, "info.pid {pid}");
    let p = Proc::of(pid as i32)
        .unwrap_or_else(|| panic!("infra process {pid} of {id} does not exist"));
    assert!(
        p.running(),
        "infra process {pid} of ready pod {id} is not running"
    );
    p
}

fn state_of(s: &cri::PodSandboxStatus) -> PodSandboxState {
    PodSandboxState::try_from(s.state).unwrap_or_else(|_| panic!("bad state {}", s.state))
}

fn filter_state(state: PodSandboxState) -> cri::PodSandboxFilter {
    cri::PodSandboxFilter {
        state: Some(cri::PodSandboxStateValue {
            state: state as i32,
        }),
        ..Default::default()
    }
}

fn filter_id(id: &str) -> cri::PodSandboxFilter {
    cri::PodSandboxFilter {
        id: id.into(),
        ..Default::default()
    }
}

fn filter_labels(pairs: &[(&str, &str)]) -> cri::PodSandboxFilter {
    cri::PodSandboxFilter {
        label_selector: pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    }
}

/// The shortest prefix of `id` (at least `min` chars) that no other id shares.
fn unique_prefix<'a>(id: &'a str, others: &[&str], min: usize) -> &'a str {
    (min..=id.len())
        .map(|n| &id[..n])
        .find(|p| others.iter().all(|o| *o == id || !o.starts_with(p)))
        .unwrap()
}

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64
}

fn assert_code(r: Result<impl std::fmt::Debug, Status>, code: Code, what: &str) -> Status {
    match r {
        Ok(v) => panic!("{what}: expected {code:?}, got Ok({v:?})"),
        Err(e) => {
            assert_eq!(e.code(), code, "{what}: {e:?}");
            e
        }
    }
}

// ---------------------------------------------------------------------------
// processes and namespaces, through /proc
// ---------------------------------------------------------------------------

/// A process identified by pid and start time (so pid reuse is noticed).
#[derive(Clone, Copy, Debug, PartialEq)]
struct Proc {
    pid: i32,
    start: u64,
}

/// (state, ppid, starttime) from /proc/PID/stat.
fn proc_stat(pid: i32) -> Option<(char, i32, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); starttime is field 22.
    Some((
        f.first()?.chars().next()?,
        f.get(1)?.parse().ok()?,
        f.get(19)?.parse().ok()?,
    ))
}

impl Proc {
    fn of(pid: i32) -> Option<Proc> {
        proc_stat(pid).map(|(_, _, start)| Proc { pid, start })
    }

    /// Still this process, and not a zombie.
    fn running(&self) -> bool {
        proc_stat(self.pid).is_some_and(|(st, _, start)| start == self.start && st != 'Z')
    }

    /// Gone for good: no such process, another process with the same pid,
    /// or a zombie that `parent` (berth) is not responsible for reaping (an
    /// orphan waits for the host's init, which berth cannot help).
    fn reaped(&self, parent: Option<i32>) -> bool {
        match proc_stat(self.pid) {
            None => true,
            Some((_, _, start)) if start != self.start => true,
            Some(('Z', ppid, _)) => Some(ppid) != parent,
            Some(_) => false,
        }
    }
}

/// After StopPodSandbox/RemovePodSandbox returned: the infra process is not
/// running any more, and berth (if it is the parent) reaps it promptly.
fn assert_stopped(p: &Proc, berth: &Berth, what: &str) {
    assert!(
        !p.running(),
        "{what}: infra process {} still running after the RPC returned",
        p.pid
    );
    let deadline = Instant::now() + Duration::from_secs(3);
    while !p.reaped(berth.pid()) {
        if Instant::now() > deadline {
            panic!(
                "{what}: infra process {} is a zombie berth (pid {:?}) did not reap",
                p.pid,
                berth.pid()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn ns_link(pid: i32, kind: &str) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}"))
        .unwrap_or_else(|e| panic!("readlink /proc/{pid}/ns/{kind}: {e}"))
        .to_string_lossy()
        .into_owned()
}

/// "net:[4026532123]" -> 4026532123
fn ns_inode(link: &str) -> u64 {
    link.rsplit('[')
        .next()
        .and_then(|s| s.strip_suffix(']'))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("unexpected namespace link {link:?}"))
}

/// The NSpid line of /proc/PID/status: the pid in each nested pid namespace.
fn nspid(pid: i32) -> Vec<i32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .expect("NSpid line")
        .split_whitespace()
        .map(|s| s.parse().unwrap())
        .collect()
}

fn argv(pid: i32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap_or_default()
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

/// `<berth binary> pause ...` (only argv[1] is relied upon).
fn is_pause(pid: i32) -> bool {
    argv(pid).get(1).is_some_and(|a| a == "pause")
}

/// Live `berth pause` processes belonging to this test's namespace.
fn pause_processes(ns: &Netns) -> Vec<(i32, Vec<String>)> {
    ns.members()
        .into_iter()
        .filter(|&p| is_pause(p))
        .map(|p| (p, argv(p)))
        .collect()
}

/// Runs `f` on a helper thread that has joined namespace `kind` of `pid`.
fn in_ns<T: Send + 'static>(
    pid: i32,
    kind: &'static str,
    flag: CloneFlags,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    std::thread::spawn(move || {
        let fd = File::open(format!("/proc/{pid}/ns/{kind}"))
            .unwrap_or_else(|e| panic!("open /proc/{pid}/ns/{kind}: {e}"));
        nix::sched::setns(&fd, flag).unwrap_or_else(|e| panic!("setns {kind} of {pid}: {e}"));
        f()
    })
    .join()
    .expect("namespace helper thread panicked")
}

/// The UTS hostname seen by process `pid`.
fn hostname_of(pid: i32) -> String {
    in_ns(pid, "uts", CloneFlags::CLONE_NEWUTS, || {
        nix::unistd::gethostname()
            .expect("gethostname")
            .to_string_lossy()
            .into_owned()
    })
}

/// Network interfaces of `pid`'s network namespace (/proc/PID/net/dev).
fn interfaces(pid: i32) -> Vec<String> {
    let dev = std::fs::read_to_string(format!("/proc/{pid}/net/dev")).unwrap();
    let mut v: Vec<String> = dev
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next())
        .map(|s| s.trim().to_string())
        .collect();
    v.sort();
    v
}

/// A TCP round trip over 127.0.0.1 inside `pid`'s network namespace (works
/// only if `lo` is up).
fn loopback_works(pid: i32) -> Result<(), String> {
    in_ns(pid, "net", CloneFlags::CLONE_NEWNET, || {
        let l = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind 127.0.0.1: {e}"))?;
        let addr = l.local_addr().map_err(|e| e.to_string())?;
        let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let (mut s, _) = l.accept().map_err(|e| format!("accept: {e}"))?;
        c.write_all(b"x").map_err(|e| e.to_string())?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b).map_err(|e| e.to_string())?;
        Ok(())
    })
}

// ---------------------------------------------------------------------------
// netns pins, as seen from the test mount namespace
// ---------------------------------------------------------------------------

fn pin_path(berth: &Berth, id: &str) -> PathBuf {
    berth.state_dir.join("netns").join(id)
}

fn same_path(a: &Path, b: &Path) -> bool {
    let canon = |p: &Path| p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
    a == b || canon(a) == canon(b)
}

/// Mount points in the test mount namespace (where berth's mounts live).
fn ns_mounts(ns: &Netns) -> Vec<PathBuf> {
    std::fs::read_to_string(format!("/proc/{}/mountinfo", ns.pid()))
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| {
            PathBuf::from(
                m.replace("\\040", " ")
                    .replace("\\011", "\t")
                    .replace("\\012", "\n")
                    .replace("\\134", "\\"),
            )
        })
        .collect()
}

fn pin_mounted(ns: &Netns, pin: &Path) -> bool {
    ns_mounts(ns).iter().any(|m| same_path(m, pin))
}

/// `path` resolved in the test mount namespace (through the holder's root).
fn in_ns_view(ns: &Netns, path: &Path) -> PathBuf {
    let abs = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    PathBuf::from(format!("/proc/{}/root", ns.pid())).join(abs.strip_prefix("/").unwrap())
}

fn pin_exists(ns: &Netns, pin: &Path) -> bool {
    std::fs::symlink_metadata(in_ns_view(ns, pin)).is_ok()
}

/// Mount points under berth's `<state_dir>/netns` in the test mount namespace.
fn pins_mounted(ns: &Netns, berth: &Berth) -> Vec<PathBuf> {
    let dir = berth.state_dir.join("netns");
    let canon = dir.canonicalize().unwrap_or_else(|_| dir.clone());
    ns_mounts(ns)
        .into_iter()
        .filter(|m| (m.starts_with(&dir) || m.starts_with(&canon)) && m != &dir && m != &canon)
        .collect()
}

/// Asserts that the pod's netns is pinned at `<state_dir>/netns/<id>` (a
/// mount in the test mount namespace) and that the pin is `infra`'s netns.
fn assert_pinned(ns: &Netns, berth: &Berth, id: &str, infra: &Proc) {
    let pin = pin_path(berth, id);
    assert!(
        pin_mounted(ns, &pin),
        "{} is not a mount point in the test mount namespace",
        pin.display()
    );
    let md = std::fs::metadata(in_ns_view(ns, &pin))
        .unwrap_or_else(|e| panic!("stat pin {}: {e}", pin.display()));
    assert_eq!(
        md.ino(),
        ns_inode(&ns_link(infra.pid, "net")),
        "the pin {} is not the infra process's network namespace",
        pin.display()
    );
}

fn assert_unpinned(ns: &Netns, berth: &Berth, id: &str) {
    let pin = pin_path(berth, id);
    assert!(!pin_mounted(ns, &pin), "{} is still mounted", pin.display());
    assert!(!pin_exists(ns, &pin), "{} still exists", pin.display());
}

/// Drops the daemon and checks nothing of it is left: no mounts under its
/// directory (in either mount namespace), no process mentioning it.
fn finish(ns: Netns, berth: Berth, rt: Rt) {
    drop(rt);
    let dir = berth.dir.clone();
    drop(berth);
    ns.assert_no_leaks(&dir);
    let pause = pause_processes(&ns);
    assert!(pause.is_empty(), "berth pause processes left: {pause:?}");
}

// ---------------------------------------------------------------------------
// tests
// ---------------------------------------------------------------------------

/// A kubelet-default pod (network POD, pid CONTAINER, ipc POD): its own
/// netns with `lo` up and eth0, pinned under the state dir; an infra `berth
/// pause` process in that netns and in new IPC and UTS namespaces with the
/// requested hostname, in berth's pid namespace.
#[tokio::test]
async fn pod_gets_own_network_ipc_and_uts_namespaces() {
    let ns = Netns::new();
    let berth = Berth::start(&ns, BerthOpts::default());
    let mut rt = berth.runtime_client().await;
    let bpid = berth.pid().unwrap();
    assert_eq!(ns_link(bpid, "net"), ns_link(ns.pid(), "net"));

    let mut cfg = pod_config(&berth, "web");
    cfg.hostname = "web-host-1".into();
    let id = run(&mut rt, &cfg).await;
    let p = infra(&mut rt, &id).await;

    let a = argv(p.pid);
    assert_eq!(
        a.get(1).map(String::as_str),
        Some("pause"),
        "infra argv: {a:?}"
    );

    // Network: a new namespace with lo up and the built-in network's eth0.
    assert_ne!(
        ns_link(p.pid, "net"),
        ns_link(bpid, "net"),
        "infra shares berth's netns"
    );
    assert_eq!(
        interfaces(p.pid),
        vec!["eth0".to_string(), "lo".to_string()],
        "interfaces in the pod netns"
    );
    loopback_works(p.pid).unwrap_or_else(|e| panic!("lo is not up in the pod netns: {e}"));
    assert_pinned(&ns, &berth, &id, &p);
    let info = verbose_info(&mut rt, &id).await;
    let netns_path = info["netnsPath"]
        .as_str()
        .unwrap_or_else(|| panic!("info.netnsPath is not a string: {info}"));
    assert!(
        same_path(Path::new(netns_path), &pin_path(&berth, &id)),
        "netnsPath {netns_path:?} is not {}",
        pin_path(&berth, &id).display()
    );

    // IPC and UTS: new; the hostname is config.hostname.
    assert_ne!(
        ns_link(p.pid, "ipc"),
        ns_link(bpid, "ipc"),
        "infra shares berth's ipc ns"
    );
    assert_ne!(
        ns_link(p.pid, "uts"),
        ns_link(bpid, "uts"),
        "infra shares berth's uts ns"
    );
    assert_eq!(hostname_of(p.pid), "web-host-1");

    // PID namespace: CONTAINER means berth's.
    assert_eq!(
        ns_link(p.pid, "pid"),
        ns_link(bpid, "pid"),
        "pid CONTAINER: berth's pid ns"
    );
    assert_eq!(nspid(p.pid).len(), nspid(bpid).len());

    stop(&mut rt, &id).await.unwrap();
    assert_stopped(&p, &berth, "stop");
    remove(&mut rt, &id).await.unwrap();
    assert_unpinned(&ns, &berth, &id);
    finish(ns, berth, rt);
}

/// pid POD: the infra process is PID 1 of a new pid namespace. ipc NODE:
/// berth's IPC namespace. No hostname: the UTS hostname is the pod name.
#[tokio::test]
async fn shared_pid_namespace_host_ipc_and_default_hostname() {
    let ns = Netns::new();
    let berth = Berth::start(&ns, BerthOpts::default());
    let mut rt = berth.runtime_client().await;
    let bpid = berth.pid().unwrap();

    let opts = ns_options(NamespaceMode::Pod, NamespaceMode::Pod, NamespaceMode::Node);
    let cfg = with_namespaces(pod_config(&berth, "shared-pid"), opts.clone());
    let id = run(&mut rt, &cfg).await;
    let p = infra(&mut rt, &id).await;

    let ids = nspid(p.pid);
    assert_eq!(
        ids.len(),
        nspid(bpid).len() + 1,
        "NSpid of the infra process: {ids:?}"
    );
    assert_eq!(
        ids.last(),
        Some(&1),
        "infra is PID 1 of its pid ns: NSpid {ids:?}"
    );
    assert_ne!(ns_link(p.pid, "pid"), ns_link(bpid, "pid"));

    assert_eq!(
        ns_link(p.pid, "ipc"),
        ns_link(bpid, "ipc"),
        "ipc NODE: berth's ipc ns"
    );
    assert_ne!(ns_link(p.pid, "uts"), ns_link(bpid, "uts"));
    assert_eq!(
        hostname_of(p.pid),
        "shared-pid",
        "hostname defaults to metadata.name"
    );
    assert_ne!(ns_link(p.pid, "net"), ns_link(bpid, "net"));
    assert_pinned(&ns, &berth, &id, &p);

    let st = status_of(&mut rt, &id).await;
    let got = st
        .linux
        .and_then(|l| l.namespaces)
        .and_then(|n| n.options)
        .expect("status.linux.namespaces.options");
    assert_eq!(
        (got.network, got.pid, got.ipc),
        (opts.network, opts.pid, opts.ipc)
    );

    remove(&mut rt, &id).await.unwrap();
    assert_stopped(&p, &berth, "remove");
    assert_unpinned(&ns, &berth, &id);
    finish(ns, berth, rt);
}

/// hostNetwork (network NODE, plus hostPID and hostIPC): no netns is
/// created, the infra process shares berth's net, UTS (hostname unchanged),
/// pid and ipc namespaces, and netnsPath is "".
#[tokio::test]
async fn host_network_pod_shares_berth_namespaces() {
    let ns = Netns::new();
    let berth = Berth::start(&ns, BerthOpts::default());
    let mut rt = berth.runtime_client().await;
    let bpid = berth.pid().unwrap();
    let host_name = nix::unistd::gethostname()
        .unwrap()
        .to_string_lossy()
        .into_owned();

    let opts = ns_options(
        NamespaceMode::Node,
        NamespaceMode::Node,
        NamespaceMode::Node,
    );
    let mut cfg = with_namespaces(pod_config(&berth, "hostnet"), opts.clone());
    cfg.hostname = "ignored-for-host-network".into();
    let id = run(&mut rt, &cfg).await;
    let p = infra(&mut rt, &id).await;

    for kind in ["net", "uts", "pid", "ipc"] {
        assert_eq!(
            ns_link(p.pid, kind),
            ns_link(bpid, kind),
            "{kind} namespace of a hostNetwork pod"
        );
    }
    assert_eq!(hostname_of(p.pid), host_name);
    let info = verbose_info(&mut rt, &id).await;
    assert_eq!(
        info["netnsPath"], "",
        "hostNetwork pods have no netns path: {info}"
    );
    assert!(!pin_mounted(&ns, &pin_path(&berth, &id)));
    assert!(
        pins_mounted(&ns, &berth).is_empty(),
        "{:?}",
        pins_mounted(&ns, &berth)
    );
    assert!(!pin_exists(&ns, &pin_path(&berth, &id)));

    let st = status_of(&mut rt, &id).await;
    assert_eq!(state_of(&st), PodSandboxState::SandboxReady);
    let got = st
        .linux
        .and_then(|l| l.namespaces)
        .and_then(|n| n.options)
        .unwrap();
    assert_eq!(
        (got.network, got.pid, got.ipc),
        (opts.network, opts.pid, opts.ipc)
    );

    stop(&mut rt, &id).await.unwrap();
    assert_stopped(&p, &berth, "stop");
    remove(&mut rt, &id).await.unwrap();
    assert_code(
        status(&mut rt, &id, false).await,
        Code::NotFound,
        "status after remove",
    );
    finish(ns, berth, rt);
}

/// PodSandboxStatus and ListPodSandbox report what was asked for; verbose
/// status adds info["info"]; unknown ids are NotFound; prefixes work.
#[tokio::test]
async fn status_and_list_report_the_pod() {
    let ns = Netns::new();
    let berth = Berth::start(&ns, BerthOpts::default());
    let mut rt = berth.runtime_client().await;

    assert!(list(&mut rt, None).await.is_empty(), "no pods at start");
    let cfg = pod_config(&berth, "report");
    let before = now_ns();
    let id = run(&mut rt, &cfg).await;
    let after = now_ns();

    let resp = status(&mut rt, &id, false).await.unwrap();
    assert!(
        resp.info.is_empty(),
        "info only when verbose: {:?}",
        resp.info
    );
    let st = resp.status.expect("status");
    assert_eq!(st.id, id);
    assert_eq!(st.metadata.as_ref(), cfg.metadata.as_ref());
    assert_eq!(state_of(&st), PodSandboxState::SandboxReady);
    assert!(
        st.created_at > 0
            && st.created_at >= before - 1_000_000_000
            && st.created_at <= after + 1_000_000_000,
        "created_at {} (ns) is not between {before} and {after}",
        st.created_at
    );
    assert_eq!(st.labels, cfg.labels);
    assert_eq!(st.annotations, cfg.annotations);
    let opts = st
        .linux
        .as_ref()
        .and_then(|l| l.namespaces.as_ref())
        .and_then(|n| n.options.as_ref())
        .expect("status.linux.namespaces.options");
    assert_eq!(
        (opts.network, opts.pid, opts.ipc),
        (
            NamespaceMode::Pod as i32,
            NamespaceMode::Container as i32,
            NamespaceMode::Pod as i32
        )
    );
    // The built-in network's default subnet.
    let net = st.network.as_ref().expect("status.network");
    assert!(net.ip.starts_with("10.88."), "pod ip: {net:?}");
    assert!(net.additional_ips.is_empty(), "no IPv6 subnet: {net:?}");

    let info = verbose_info(&mut rt, &id).await;
    let pid = info["pid"].as_i64().expect("info.pid is a number");
    let p = infra(&mut rt, &id).await;
    assert_eq!(pid, p.pid as i64);
    assert!(info["netnsPath"].is_string(), "info.netnsPath: {info}");
    // Verbose status carries the same status.
    let vst = status(&mut rt, &id, true).await.unwrap().status.unwrap();
    assert_eq!(vst, st);

    // A 1-char and a 12-char prefix are unambiguous with one pod.
    for n in [1, 12] {
        let by_prefix = status_of(&mut rt, &id[..n]).await;
        assert_eq!(by_prefix.id, id, "status by {n}-char prefix");
    }

    // Unknown ids are NotFound, naming the id.
    let e = assert_code(
        status(&mut rt, UNKNOWN_ID, false).await,
        Code::NotFound,
        "unknown id",
    );
    assert!(e.message().contains(UNKNOWN_ID), "{}", e.message());
    let other = if id.starts_with('f') { "e" } else { "f" };
    let e = assert_code(
        status(&mut rt, other, true).await,
        Code::NotFound,
        "unknown prefix",
    );
    assert!(e.message().contains(other), "{}", e.message());

    // List has the same facts.
    let items = list(&mut rt, None).await;
    assert_eq!(items.len(), 1, "{items:?}");
    let it = &items[0];
    assert_eq!(it.id, id);
    assert_eq!(it.metadata.as_ref(), cfg.metadata.as_ref());
    assert_eq!(it.state, PodSandboxState::SandboxReady as i32);
    assert_eq!(it.created_at, st.created_at);
    assert_eq!(it.labels, cfg.labels);
    assert_eq!(it.annotations, cfg.annotations);

    remove(&mut rt, &id).await.unwrap();
    assert_stopped(&p, &berth, "remove");
    finish(ns, berth, rt);
}

/// ListPodSandbox filters: id (exact or prefix), state, label selector (all
/// pairs), and their combination.
#[tokio::test]
async fn list_filters_by_id_state_and_labels() {
    let ns = Netns::new();
    let berth = Berth::start(&ns, BerthOpts::default());
    let mut rt = berth.runtime_client().await;

    let mut ids = Vec::new();
    for (name, tier) in [("fa", "front"), ("fb", "front"), ("bk", "back")] {
        let mut cfg = pod_config(&berth, name);
        cfg.labels.insert("tier".into(), tier.into());
        ids.push(run(&mut rt, &cfg).await);
    }
    let (fa, fb, bk) = (ids[0].clone(), ids[1].clone(), ids[2].clone());
    let all: Vec<&str> = ids.iter().map(String::as_str).collect();
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };

    stop(&mut rt, &fb).await.unwrap();

    assert_eq!(list(&mut rt, None).await.len(), 3);
    assert_eq!(
        list_ids(&mut rt, cri::PodSandboxFilter::default())
            .await
            .len(),
        3
    );
    // id: exact, unambiguous prefix, unknown.
    assert_eq!(list_ids(&mut rt, filter_id(&fa)).await, vec![fa.clone()]);
    let prefix = unique_prefix(&bk, &all, 1);
    assert_eq!(
        list_ids(&mut rt, filter_id(prefix)).await,
        vec![bk.clone()],
        "prefix {prefix}"
    );
    assert!(list_ids(&mut rt, filter_id(UNKNOWN_ID)).await.is_empty());
    // state
    assert_eq!(
        list_ids(&mut rt, filter_state(PodSandboxState::SandboxReady)).await,
        sorted(vec![fa.clone(), bk.clone()])
    );
    assert_eq!(
        list_ids(&mut rt, filter_state(PodSandboxState::SandboxNotready)).await,
        vec![fb.clone()]
    );
    // labels: every pair must match
    assert_eq!(
        list_ids(&mut rt, filter_labels(&[("tier", "front")])).await,
        sorted(vec![fa.clone(), fb.clone()])
    );
    assert_eq!(
        list_ids(&mut rt, filter_labels(&[("tier", "front"), ("app", "fb")])).await,
        vec![fb.clone()]
    );
    assert!(
        list_ids(&mut rt, filter_labels(&[("tier", "front"), ("app", "bk")]))
            .await
            .is_empty()
    );
    assert!(list_ids(&mut rt, filter_labels(&[("tier", "middle")]))
        .await
        .is_empty());
    assert!(list_ids(&mut rt, filter_labels(&[("nosuch", "front")]))
        .await
        .is_empty());
    // combined
    let mut f = filter_labels(&[("tier", "front")]);
    f.state = Some(cri::PodSandboxStateValue {
        state: PodSandboxState::SandboxReady as i32,
    });
    assert_eq!(list_ids(&mut rt, f.clone()).await, vec![fa.clone()]);
    f.id = fb.clone();
    assert!(list_ids(&mut rt, f).await.is_empty(), "id fb is not READY");
    let items = list(&mut rt, Some(filter_id(&fb))).await;
    assert_eq!(items[0].state, PodSandboxState::SandboxNotready as i32);
    assert_eq!(
        items[0].labels.get("tier").map(String::as_str),
        Some("front")
    );

    for id in &ids {
        remove(&mut rt, id).await.unwrap();
    }
    assert!(list(&mut rt, None).await.is_empty());
    finish(ns, berth, rt);
}

/// StopPodSandbox kills and reaps the infra process, leaves the pod
/// NOTREADY with its netns pin, and is idempotent (also for unknown ids);
/// RemovePodSandbox then drops the pin and the pod, idempotently. Ids may
/// be given as prefixes.
#[tokio::test]
async fn stop_then_remove_idempotent() {
    let ns = Netns::new();
    let berth = Berth::start(&ns, BerthOpts::default());
    let mut rt = berth.runtime_client().await;

    let id = run(&mut rt, &pod_config(&berth, "lifecycle")).await;
    let p = infra(&mut rt, &id).await;
    assert_pinned(&ns, &berth, &id, &p);
    let netns = ns_inode(&ns_link(p.pid, "net"));

    stop(&mut rt, &id[..10]).await.expect("stop by prefix");
    assert_stopped(&p, &berth, "stop");
    let st = status_of(&mut rt, &id).await;
    assert_eq!(state_of(&st), PodSandboxState::SandboxNotready);
    let items = list(&mut rt, None).await;
    assert_eq!(items.len(), 1);
    assert_eq!(items[0].state, PodSandboxState::SandboxNotready as i32);
    // The pin stays until removal, still the same netns.
    let pin = pin_path(&berth, &id);
    assert!(pin_mounted(&ns, &pin), "pin removed by stop");
    assert_eq!(
        std::fs::metadata(in_ns_view(&ns, &pin)).unwrap().ino(),
        netns
    );

    stop(&mut rt, &id).await.expect("second stop");
    assert_eq!(
        state_of(&status_of(&mut rt, &id).await),
        PodSandboxState::SandboxNotready
    );
    stop(&mut rt, UNKNOWN_ID)
        .await
        .expect("stop of an unknown id");
    assert!(pin_mounted(&ns, &pin));

    remove(&mut rt, &id[..10]).await.expect("remove by prefix");
    assert_unpinned(&ns, &berth, &id);
    let e = assert_code(
        status(&mut rt, &id, false).await,
        Code::NotFound,
        "status after remove",
    );
    assert!(e.message().contains(&id), "{}", e.message());
    assert!(list(&mut rt, None).await.is_empty());
    assert!(list_ids(&mut rt, filter_id(&id)).await.is_empty());

    remove(&mut rt, &id).await.expect("second remove");
    remove(&mut rt, UNKNOWN_ID)
        .await
        .expect("remove of an unknown id");
    stop(&mut rt, &id).await.expect("stop of a removed pod");
    assert!(
        pause_processes(&ns).is_empty(),
        "{:?}",
        pause_processes(&ns)
    );
    finish(ns, berth, rt);
}

/// RemovePodSandbox on a READY pod stops it first.
#[tokio::test]
async fn remove_stops_a_ready_pod() {
    let ns = Netns::new();
    let berth = Berth::start(&ns, BerthOpts::default());
    let mut rt = berth.runtime_client().await;

    let id = run(&mut rt, &pod_config(&berth, "ready")).await;
    let p = infra(&mut rt, &id).await;
    remove(&mut rt, &id).await.expect("remove a ready pod");
    assert_stopped(&p, &berth, "remove");
    assert_unpinned(&ns, &berth, &id);
    assert_code(
        status(&mut rt, &id, true).await,
        Code::NotFound,
        "status after remove",
    );
    assert!(list(&mut rt, None).await.is_empty());
    finish(ns, berth, rt);
}

/// Same (name, uid, namespace, attempt) while the pod exists, ready or not:
/// AlreadyExists. Another attempt is a different pod; after removal the
/// metadata is free again.
#[tokio::test]
async fn same_metadata_is_already_exists_until_removed() {
    let ns = Netns::new();
    let berth = Berth::start(&ns, BerthOpts::default());
    let mut rt = berth.runtime_client().await;

    let cfg = pod_config(&berth, "dup");
    let first = run(&mut rt, &cfg).await;
    assert_code(
        try_run(&mut rt, Some(cfg.clone())).await,
        Code::AlreadyExists,
        "duplicate of a ready pod",
    );

    let mut next = cfg.clone();
    next.metadata.as_mut().unwrap().attempt = 1;
    let second = run(&mut rt, &next).await;
    assert_ne!(first, second);

    stop(&mut rt, &first).await.unwrap();
    assert_code(
        try_run(&mut rt, Some(cfg.clone())).await,
        Code::AlreadyExists,
        "duplicate of a stopped pod",
    );
    assert_eq!(
        list(&mut rt, None).await.len(),
        2,
        "failed runs add no pods"
    );

    remove(&mut rt, &first).await.unwrap();
    let third = run(&mut rt, &cfg).await;
    assert_ne!(third, first, "a new pod gets a new id");
    assert_eq!(
        state_of(&status_of(&mut rt, &third).await),
        PodSandboxState::SandboxReady
    );
    assert_code(
        status(&mut rt, &first, false).await,
        Code::NotFound,
        "old pod",
    );

    for id in [&second, &third] {
        remove(&mut rt, id).await.unwrap();
    }
    assert!(list(&mut rt, None).await.is_empty());
    finish(ns, berth, rt);
}

/// Concurrent RunPodSandbox calls with the same metadata: exactly one pod.
#[tokio::test]
async fn concurrent_duplicate_runs_create_one_pod() {
    let ns = Netns::new();
    let berth = Berth::start(&ns, BerthOpts::default());
    let mut rt = berth.runtime_client().await;

    let cfg = pod_config(&berth, "race");
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let mut c = rt.clone();
            let cfg = cfg.clone();
            tokio::spawn(async move { try_run(&mut c, Some(cfg)).await })
        })
        .collect();
    let mut ok = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            Ok(id) => ok.push(id),
            Err(e) => assert_eq!(e.code(), Code::AlreadyExists, "{e:?}"),
        }
    }
    assert_eq!(ok.len(), 1, "exactly one run succeeds: {ok:?}");
    let items = list(&mut rt, None).await;
    assert_eq!(items.len(), 1, "{items:?}");
    assert_eq!(items[0].id, ok[0]);
    let p = infra(&mut rt, &ok[0]).await;
    assert_eq!(pause_processes(&ns).len(), 1, "{:?}", pause_processes(&ns));
    assert_eq!(
        pins_mounted(&ns, &berth).len(),
        1,
        "{:?}",
        pins_mounted(&ns, &berth)
    );

    remove(&mut rt, &ok[0]).await.unwrap();
    assert_stopped(&p, &berth, "remove");
    finish(ns, berth, rt);
}

/// Missing config, missing metadata, empty name/uid/namespace:
/// InvalidArgument, and nothing is created.
#[tokio::test]
async fn invalid_run_requests() {
    let ns = Netns::new();
    let berth = Berth::start(&ns, BerthOpts::default());
    let mut rt = berth.runtime_client().await;

    assert_code(
        try_run(&mut rt, None).await,
        Code::InvalidArgument,
        "no config",
    );
    let mut cfg = pod_config(&berth, "bad");
    cfg.metadata = None;
    assert_code(
        try_run(&mut rt, Some(cfg)).await,
        Code::InvalidArgument,
        "no metadata",
    );
    type Edit = fn(&mut cri::PodSandboxMetadata);
    let edits: [(&str, Edit); 3] = [
        ("empty name", |m| m.name.clear()),
        ("empty uid", |m| m.uid.clear()),
        ("empty namespace", |m| m.namespace.clear()),
    ];
    for (what, edit) in edits {
        let mut cfg = pod_config(&berth, "bad");
        edit(cfg.metadata.as_mut().unwrap());
        assert_code(
            try_run(&mut rt, Some(cfg)).await,
            Code::InvalidArgument,
            what,
        );
    }

    // A user namespace without mappings, or another runtime handler, is
    // refused, naming it, not silently run as the host's root on the
    // default runtime (tests/userns.rs covers valid user namespaces).
    let mut cfg = pod_config(&berth, "userns");
    let sc = cfg
        .linux
        .get_or_insert_with(Default::default)
        .security_context
        .get_or_insert_with(Default::default);
    sc.namespace_options
        .get_or_insert_with(Default::default)
        .userns_options = Some(cri::UserNamespace {
        mode: cri::NamespaceMode::Pod as i32,
        ..Default::default()
    });
    let e = try_run(&mut rt, Some(cfg)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("no uid mappings"), "{e:?}");
    let e = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(pod_config(&berth, "kata")),
            runtime_handler: "kata".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("\"kata\""), "{e:?}");

    assert!(list(&mut rt, None).await.is_empty());
    assert!(
        pins_mounted(&ns, &berth).is_empty(),
        "{:?}",
        pins_mounted(&ns, &berth)
    );
    assert!(
        pause_processes(&ns).is_empty(),
        "{:?}",
        pause_processes(&ns)
    );
    // The daemon is fine: a valid pod runs.
    let id = run(&mut rt, &pod_config(&berth, "good")).await;
    remove(&mut rt, &id).await.unwrap();
    finish(ns, berth, rt);
}

/// A ready pod survives kill -9 of the daemon with the same infra process;
/// a pod whose infra process died while berth was down is NOTREADY after
/// the restart. Everything can then be stopped and removed without leaks.
#[tokio::test]
async fn pods_survive_daemon_restart() {
    let ns = Netns::new();
    let mut berth = Berth::start(&ns, BerthOpts::default());
    let mut rt = berth.runtime_client().await;

    let keep_cfg = pod_config(&berth, "keep");
    let keep = run(&mut rt, &keep_cfg).await;
    let die = run(&mut rt, &pod_config(&berth, "die")).await;
    let keep_p = infra(&mut rt, &keep).await;
    let die_p = infra(&mut rt, &die).await;
    let created = status_of(&mut rt, &keep).await.created_at;
    drop(rt);

    berth.kill9();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(die_p.pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill the infra process of `die`");
    let deadline = Instant::now() + Duration::from_secs(3);
    while die_p.running() {
        assert!(
            Instant::now() < deadline,
            "infra process {} survived SIGKILL",
            die_p.pid
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(keep_p.running(), "the infra process died with the daemon");
    berth.restart();
    let mut rt = berth.runtime_client().await;

    let st = status_of(&mut rt, &keep).await;
    assert_eq!(
        state_of(&st),
        PodSandboxState::SandboxReady,
        "keep after restart"
    );
    assert_eq!(st.created_at, created, "created_at survives the restart");
    assert_eq!(st.metadata.as_ref(), keep_cfg.metadata.as_ref());
    assert_eq!(st.labels, keep_cfg.labels);
    assert_eq!(
        infra(&mut rt, &keep).await,
        keep_p,
        "same infra process after restart"
    );
    assert_pinned(&ns, &berth, &keep, &keep_p);

    assert_eq!(
        state_of(&status_of(&mut rt, &die).await),
        PodSandboxState::SandboxNotready,
        "pod whose infra process died while berth was down"
    );
    assert!(
        pin_mounted(&ns, &pin_path(&berth, &die)),
        "pin of a not-ready pod stays until removal"
    );
    assert_eq!(
        list_ids(&mut rt, filter_state(PodSandboxState::SandboxReady)).await,
        vec![keep.clone()]
    );
    assert_eq!(
        list_ids(&mut rt, filter_state(PodSandboxState::SandboxNotready)).await,
        vec![die.clone()]
    );
    // Duplicate detection survives too.
    assert_code(
        try_run(&mut rt, Some(keep_cfg.clone())).await,
        Code::AlreadyExists,
        "duplicate after restart",
    );

    for id in [&keep, &die] {
        stop(&mut rt, id).await.unwrap();
    }
    assert_stopped(&keep_p, &berth, "stop after restart");
    for id in [&keep, &die] {
        remove(&mut rt, id).await.unwrap();
        assert_unpinned(&ns, &berth, id);
    }
    assert!(list(&mut rt, None).await.is_empty());
    finish(ns, berth, rt);
}

/// Five pods created concurrently, then all removed (without stopping
/// first): no pins, no infra processes, nothing under berth's directory.
#[tokio::test]
async fn five_pods_created_and_removed_leave_nothing() {
    let ns = Netns::new();
    let berth = Berth::start(&ns, BerthOpts::default());
    let mut rt = berth.runtime_client().await;

    let tasks: Vec<_> = (0..5)
        .map(|i| {
            let mut c = rt.clone();
            let cfg = pod_config(&berth, &format!("many-{i}"));
            tokio::spawn(async move { run(&mut c, &cfg).await })
        })
        .collect();
    let mut ids = Vec::new();
    for t in tasks {
        ids.push(t.await.unwrap());
    }
    let mut procs = Vec::new();
    for id in &ids {
        let p = infra(&mut rt, id).await;
        assert_pinned(&ns, &berth, id, &p);
        procs.push(p);
    }
    let distinct = |mut v: Vec<String>| {
        v.sort();
        v.dedup();
        v.len()
    };
    assert_eq!(distinct(ids.clone()), 5, "ids {ids:?}");
    assert_eq!(
        distinct(procs.iter().map(|p| p.pid.to_string()).collect()),
        5
    );
    assert_eq!(
        distinct(procs.iter().map(|p| ns_link(p.pid, "net")).collect()),
        5,
        "one netns per pod"
    );
    assert_eq!(
        distinct(procs.iter().map(|p| ns_link(p.pid, "uts")).collect()),
        5,
        "one uts ns per pod"
    );
    assert_eq!(pause_processes(&ns).len(), 5, "{:?}", pause_processes(&ns));
    assert_eq!(pins_mounted(&ns, &berth).len(), 5);
    assert_eq!(list(&mut rt, None).await.len(), 5);

    let tasks: Vec<_> = ids
        .iter()
        .cloned()
        .map(|id| {
            let mut c = rt.clone();
            tokio::spawn(async move { remove(&mut c, &id).await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().expect("remove");
    }
    for p in &procs {
        assert_stopped(p, &berth, "remove");
    }
    for id in &ids {
        assert_unpinned(&ns, &berth, id);
    }
    assert!(
        pins_mounted(&ns, &berth).is_empty(),
        "{:?}",
        pins_mounted(&ns, &berth)
    );
    assert!(
        pause_processes(&ns).is_empty(),
        "{:?}",
        pause_processes(&ns)
    );
    assert!(list(&mut rt, None).await.is_empty());
    finish(ns, berth, rt);
}

/// Another berth daemon (its own root and state dir, as in a parallel test
/// or a second instance on the host) starting up must not touch this
/// daemon's pods: their infra processes are not its orphans.
#[tokio::test]
async fn another_daemon_leaves_our_pods_alone() {
    let ns = Netns::new();
    let berth = Berth::start(&ns, BerthOpts::default());
    let mut rt = berth.runtime_client().await;
    let id = run(&mut rt, &pod_config(&berth, "mine")).await;
    let p = infra(&mut rt, &id).await;

    let other_ns = Netns::new();
    let mut other = Berth::start(&other_ns, BerthOpts::default());
    other.restart();
    assert!(
        p.running(),
        "starting another berth (root {}) killed infra process {} of {id}:\n{}",
        other.root.display(),
        p.pid,
        other.log()
    );
    assert_eq!(
        state_of(&status_of(&mut rt, &id).await),
        PodSandboxState::SandboxReady
    );
    let other_dir = other.dir.clone();
    drop(other);
    other_ns.assert_no_leaks(&other_dir);

    remove(&mut rt, &id).await.unwrap();
    assert_stopped(&p, &berth, "remove");
    finish(ns, berth, rt);
}

/// An infra process that dies while berth runs makes its pod NOTREADY
/// (kubelet then recreates the sandbox); StopPodSandbox reaps it.
#[tokio::test]
async fn infra_death_makes_the_pod_not_ready() {
    let ns = Netns::new();
    let berth = Berth::start(&ns, BerthOpts::default());
    let mut rt = berth.runtime_client().await;
    let id = run(&mut rt, &pod_config(&berth, "crash")).await;
    let p = infra(&mut rt, &id).await;

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(p.pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let st = status_of(&mut rt, &id).await;
        if state_of(&st) == PodSandboxState::SandboxNotready {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "pod still READY 3 s after its infra process {} was killed",
            p.pid
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        list_ids(&mut rt, filter_state(PodSandboxState::SandboxNotready)).await,
        vec![id.clone()]
    );
    stop(&mut rt, &id).await.unwrap();
    assert_stopped(&p, &berth, "stop");
    remove(&mut rt, &id).await.unwrap();
    assert_unpinned(&ns, &berth, &id);
    finish(ns, berth, rt);
}
