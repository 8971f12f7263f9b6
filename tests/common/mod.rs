//! Integration-test harness for berth.
//!
//! Integration tests run as root (under cargo-nextest, one process per test).
//! Every test gets its own network + mount namespace ([`Netns`]) in which the
//! registry ([`Registry`], Debian's `docker-registry`) and the daemon
//! ([`Berth`]) run, so nothing touches the host network and registries can
//! all listen on 127.0.0.1:5000.
//!
//! Typical use:
//!
//! ```ignore
//! mod common;
//! use common::*;
//!
//! #[tokio::test]
//! async fn pulls() {
//!     let ns = Netns::new();
//!     let reg = Registry::start(&ns, RegistryOpts::default());
//!     reg.push("busybox", "library/busybox:latest");
//!     let berth = Berth::start(&ns, BerthOpts::default());
//!     let mut images = berth.image_client().await;
//!     // ...
//! }
//! ```
//!
//! Declare the `Netns` first so that it is dropped last: dropping it kills
//! every process that was started through it.
//!
//! Processes started through [`Netns::command`] get `PR_SET_PDEATHSIG`
//! (SIGKILL), so they die with the thread that spawned them if the test
//! process is killed hard. Spawn them (i.e. call `Netns::new`,
//! `Registry::start`, `Berth::start`, `Berth::restart`, `Netns::command(..)
//! .spawn()`) from the test's own thread (an async test body is fine), not
//! from a `spawn_blocking` thread that may exit early.

#![allow(dead_code)]

pub mod breakout;
pub mod devices;
pub mod fixture;
pub mod handlers;
pub mod token_server;
pub mod userns;

#[allow(unused_imports)]
pub use fixture::*;

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cri_proto::v1::image_service_client::ImageServiceClient;
use cri_proto::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::{Channel, Endpoint};

/// Environment variable set on every process started through a [`Netns`];
/// its value identifies the namespace. Used to find stray processes.
pub const NS_MARKER_ENV: &str = "BERTH_TEST_NS";

/// Set to 1 to keep the temporary directories of `Berth`/`Registry`.
pub const KEEP_ENV: &str = "BERTH_TEST_KEEP";

// ---------------------------------------------------------------------------
// test images
// ---------------------------------------------------------------------------

fn workspace_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn target_dir() -> PathBuf {
    // CARGO_TARGET_TMPDIR is <target>/tmp for integration tests; using it
    // respects a custom CARGO_TARGET_DIR.
    match option_env!("CARGO_TARGET_TMPDIR") {
        Some(t) => match Path::new(t).parent() {
            Some(p) => p.to_path_buf(),
            None => workspace_dir().join("target"),
        },
        None => workspace_dir().join("target"),
    }
}

fn find_in_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

fn require_tool(program: &str, package: &str) -> PathBuf {
    find_in_path(program).unwrap_or_else(|| {
        panic!(
            "`{program}` not found in PATH: install the Debian package `{package}` \
             (run scripts/install-test-deps as root)"
        )
    })
}

/// Builds the test images (test-images/build.py) once into
/// `<target>/test-images` and returns that directory. Each image is an OCI
/// layout at `images_dir().join(name)`. Safe to call from concurrent test
/// processes (the build runs under `flock`).
pub fn images_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let python = require_tool("python3", "python3");
        require_tool("flock", "util-linux");
        require_tool("zstd", "zstd");
        assert!(
            Path::new("/bin/busybox").exists(),
            "/bin/busybox not found: install the Debian package `busybox-static` \
             (run scripts/install-test-deps as root)"
        );
        let target = target_dir();
        let out = target.join("test-images");
        fs::create_dir_all(&target).expect("create target dir");
        let lock = target.join("test-images.lock");
        let script = workspace_dir().join("test-images/build.py");
        let output = Command::new("flock")
            .arg(&lock)
            .arg(&python)
            .arg(&script)
            .arg(&out)
            .stdin(Stdio::null())
            .output()
            .expect("run flock python3 test-images/build.py");
        if !output.status.success() {
            panic!(
                "building test images failed ({}):\n{}\n{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        out
    })
    .clone()
}

/// The OCI layout directory of test image `name`.
pub fn image_layout(name: &str) -> PathBuf {
    let p = images_dir().join(name);
    assert!(
        p.join("index.json").exists(),
        "no test image `{name}` in {}",
        p.display()
    );
    p
}

/// Reads blob `digest` ("sha256:...") of test image `name`.
pub fn layout_blob(name: &str, digest: &str) -> Vec<u8> {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    let p = image_layout(name).join("blobs/sha256").join(hex);
    fs::read(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

/// The single descriptor of the test image's `index.json` (a manifest, or an
/// image index for `multiarch`).
pub fn layout_top_descriptor(name: &str) -> serde_json::Value {
    let p = image_layout(name).join("index.json");
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(&p).expect("read index.json")).expect("parse index.json");
    index["manifests"][0].clone()
}

/// Parsed JSON blob `digest` of test image `name` (manifest, index, config).
pub fn layout_json(name: &str, digest: &str) -> serde_json::Value {
    serde_json::from_slice(&layout_blob(name, digest)).expect("parse blob as JSON")
}

// ---------------------------------------------------------------------------
// /proc helpers
// ---------------------------------------------------------------------------

struct ProcInfo {
    ppid: i32,
    state: char,
}

fn proc_info(pid: i32) -> Option<ProcInfo> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut it = rest.split_whitespace();
    let state = it.next()?.chars().next()?;
    let ppid = it.next()?.parse().ok()?;
    Some(ProcInfo { ppid, state })
}

fn all_pids() -> Vec<i32> {
    let mut pids = Vec::new();
    if let Ok(rd) = fs::read_dir("/proc") {
        for e in rd.flatten() {
            if let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) {
                pids.push(pid);
            }
        }
    }
    pids
}

fn ns_id(pid: i32, ns: &str) -> Option<String> {
    fs::read_link(format!("/proc/{pid}/ns/{ns}"))
        .ok()
        .map(|p| p.to_string_lossy().into_owned())
}

fn read_bytes(path: &str) -> Vec<u8> {
    let mut v = Vec::new();
    if let Ok(mut f) = File::open(path) {
        let _ = f.read_to_end(&mut v);
    }
    v
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

fn cmdline(pid: i32) -> Vec<u8> {
    read_bytes(&format!("/proc/{pid}/cmdline"))
}

fn cmdline_string(pid: i32) -> String {
    String::from_utf8_lossy(&cmdline(pid))
        .replace('\0', " ")
        .trim()
        .to_string()
}

/// The test process and its ancestors: never to be killed.
fn protected_pids() -> HashSet<i32> {
    let mut set = HashSet::new();
    let mut pid = std::process::id() as i32;
    while pid > 0 && set.insert(pid) {
        match proc_info(pid) {
            Some(i) => pid = i.ppid,
            None => break,
        }
    }
    set
}

fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Mount points listed in a mountinfo file.
fn mount_points(mountinfo: &str) -> Vec<PathBuf> {
    fs::read_to_string(mountinfo)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(unescape_mountinfo(m)))
        .collect()
}

fn canonical(dir: &Path) -> PathBuf {
    dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf())
}

fn leaked_mounts(mountinfo: &str, dir: &Path) -> Vec<PathBuf> {
    let dirs = [dir.to_path_buf(), canonical(dir)];
    mount_points(mountinfo)
        .into_iter()
        .filter(|m| dirs.iter().any(|d| m.starts_with(d)))
        .collect()
}

/// Live (non-zombie) processes, other than this one, whose command line
/// mentions `dir`.
fn processes_mentioning(dir: &Path) -> Vec<(i32, String)> {
    let me = std::process::id() as i32;
    let needles: Vec<Vec<u8>> = {
        let mut v = vec![dir.as_os_str().as_encoded_bytes().to_vec()];
        let c = canonical(dir).into_os_string().into_encoded_bytes();
        if c != v[0] {
            v.push(c);
        }
        v
    };
    all_pids()
        .into_iter()
        .filter(|&p| p != me)
        .filter(|&p| proc_info(p).is_some_and(|i| i.state != 'Z'))
        .filter(|&p| {
            let c = cmdline(p);
            needles.iter().any(|n| contains(&c, n))
        })
        .map(|p| (p, cmdline_string(p)))
        .collect()
}

/// Asserts that no mount point in this process's mount namespace
/// (/proc/self/mountinfo) lies under `dir`, and that no live process's
/// command line mentions `dir`. Mounts berth makes inside a test's private
/// mount namespace are not visible here: use [`Netns::assert_no_leaks`] to
/// check those too.
pub fn assert_no_leaks(dir: &Path) {
    let mounts = leaked_mounts("/proc/self/mountinfo", dir);
    assert!(
        mounts.is_empty(),
        "mounts left under {}: {mounts:#?}",
        dir.display()
    );
    let procs = processes_mentioning(dir);
    assert!(
        procs.is_empty(),
        "processes left mentioning {}: {procs:#?}",
        dir.display()
    );
}

/// berth's built-in network objects in `pid`'s network namespace: pod veths
/// (`bveth*`), the default bridge and berth's nftables table.
pub fn berth_network_objects(pid: i32) -> Vec<String> {
    let run = |args: &[&str]| {
        Command::new("nsenter")
            .args(["--target", &pid.to_string(), "--net", "--"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    let mut found = Vec::new();
    for l in run(&["ip", "-o", "link", "show"]).lines() {
        let name = l.split(':').nth(1).unwrap_or("").trim();
        let name = name.split('@').next().unwrap_or("");
        if name.starts_with("bveth") || name == "berth0" {
            found.push(format!("link {name}"));
        }
    }
    if find_in_path("nft").is_some() {
        for l in run(&["nft", "list", "tables"]).lines() {
            if l.trim() == "table inet berth" {
                found.push(l.trim().to_string());
            }
        }
    }
    found
}

fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(st)) => return Some(st),
            Ok(None) => {}
            Err(_) => return None,
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn signal(pid: i32, sig: i32) {
    if let Ok(sig) = nix::sys::signal::Signal::try_from(sig) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
    }
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn keep_dirs() -> bool {
    std::env::var(KEEP_ENV).is_ok_and(|v| !v.is_empty() && v != "0")
}

fn make_tempdir(prefix: &str) -> tempfile::TempDir {
    let mut dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("create temporary directory");
    if keep_dirs() {
        dir.disable_cleanup(true);
    }
    dir
}

// ---------------------------------------------------------------------------
// Netns
// ---------------------------------------------------------------------------

struct NsInner {
    pid: i32,
    marker: String,
    net_ns: String,
    mnt_ns: String,
    /// Directories whose mention in a command line marks a process as ours.
    dirs: Mutex<Vec<PathBuf>>,
    containers_cache_private: AtomicBool,
}

/// A private network + mount namespace, held open by
/// `unshare --net --mount --propagation private -- sleep infinity`.
/// `lo` is up inside. Dropping it kills (children first, holder last) and
/// reaps every process started through it, plus anything else found in its
/// namespaces or descending from such processes.
pub struct Netns {
    inner: Arc<NsInner>,
    holder: Mutex<Option<Child>>,
}

impl Netns {
    pub fn new() -> Netns {
        require_tool("unshare", "util-linux");
        require_tool("nsenter", "util-linux");
        require_tool("ip", "iproute2");
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let marker = format!(
            "{}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst),
            nanos
        );
        let mut cmd = Command::new("setpriv");
        cmd.args([
            "--pdeathsig",
            "KILL",
            "unshare",
            "--net",
            "--mount",
            "--propagation",
            "private",
            "--",
            "sleep",
            "infinity",
        ])
        .env(NS_MARKER_ENV, &marker)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
        let mut holder = cmd.spawn().expect("spawn unshare");
        let pid = holder.id() as i32;

        // unshare(2)s, then execs sleep: once the process is `sleep` the
        // namespaces are fully set up.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(st)) = holder.try_wait() {
                let mut err = String::new();
                if let Some(mut e) = holder.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                panic!("unshare exited early ({st}): {err}");
            }
            let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if comm.trim() == "sleep" {
                break;
            }
            if Instant::now() > deadline {
                let _ = holder.kill();
                let _ = holder.wait();
                panic!("unshare did not set up the namespaces within 10 s");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let net_ns = ns_id(pid, "net").expect("read holder net ns");
        let mnt_ns = ns_id(pid, "mnt").expect("read holder mnt ns");
        assert_ne!(
            Some(&net_ns),
            ns_id(std::process::id() as i32, "net").as_ref()
        );
        assert_ne!(
            Some(&mnt_ns),
            ns_id(std::process::id() as i32, "mnt").as_ref()
        );

        let ns = Netns {
            inner: Arc::new(NsInner {
                pid,
                marker,
                net_ns,
                mnt_ns,
                dirs: Mutex::new(Vec::new()),
                containers_cache_private: AtomicBool::new(false),
            }),
            holder: Mutex::new(Some(holder)),
        };
        let out = Command::new("nsenter")
            .arg("--target")
            .arg(pid.to_string())
            .args(["--net", "--", "ip", "link", "set", "lo", "up"])
            .stdin(Stdio::null())
            .output()
            .expect("run nsenter ip link set lo up");
        assert!(
            out.status.success(),
            "ip link set lo up failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        ns
    }

    /// PID of the namespace holder process.
    pub fn pid(&self) -> i32 {
        self.inner.pid
    }

    /// A command running `program` inside the namespaces
    /// (`nsenter --target PID --net --mount -- program`). stdin is /dev/null
    /// by default. The spawned process is killed when the `Netns` is dropped.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        handle_command(&self.inner, program)
    }

    /// Runs `args[0] args[1..]` inside the namespaces; panics (with its
    /// stderr) unless it succeeds. Returns stdout.
    pub fn run_ok(&self, args: &[&str]) -> String {
        let out = self.output(args);
        if !out.status.success() {
            panic!(
                "{:?} failed ({}):\nstdout: {}\nstderr: {}",
                args,
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `args[0] args[1..]` inside the namespaces and returns its output.
    pub fn output(&self, args: &[&str]) -> Output {
        self.command(args[0])
            .args(&args[1..])
            .output()
            .unwrap_or_else(|e| panic!("spawn {args:?}: {e}"))
    }

    /// TCP-connects to `addr` from inside the network namespace (a helper
    /// thread joins the namespace with setns(2)); the returned socket
    /// belongs to the namespace, so the test process can talk to servers
    /// listening on the namespace's loopback.
    pub fn tcp_connect(&self, addr: &str) -> std::io::Result<TcpStream> {
        tcp_connect_in(self.inner.pid, addr)
    }

    /// Marks `dir`: at drop, processes whose command line mentions it are
    /// treated as belonging to this namespace (and killed).
    pub fn track_dir(&self, dir: &Path) {
        self.inner.dirs.lock().unwrap().push(dir.to_path_buf());
    }

    /// Like [`assert_no_leaks`], but checks the namespace's own mount table
    /// (where berth's mounts live) as well as the host's.
    pub fn assert_no_leaks(&self, dir: &Path) {
        let mi = format!("/proc/{}/mountinfo", self.inner.pid);
        let mounts = leaked_mounts(&mi, dir);
        assert!(
            mounts.is_empty(),
            "mounts left under {} in the test mount namespace: {mounts:#?}",
            dir.display()
        );
        assert_no_leaks(dir);
        let net = berth_network_objects(self.inner.pid);
        assert!(
            net.is_empty(),
            "berth network objects left in the test network namespace: {net:#?}"
        );
        let host = berth_network_objects(std::process::id() as i32);
        assert!(
            host.is_empty(),
            "berth network objects in the host's network namespace: {host:#?}"
        );
    }

    /// Processes currently considered part of this namespace (excluding the
    /// holder): in its net or mount namespace, carrying its marker env var,
    /// mentioning a tracked dir, or descending from any of those.
    pub fn members(&self) -> Vec<i32> {
        let mut v: Vec<i32> = members(&self.inner).into_iter().collect();
        v.sort();
        v
    }

    /// Makes /var/lib/containers/cache (skopeo's blob-info cache) a private
    /// tmpfs inside the mount namespace, so skopeo runs of different tests
    /// don't share cached blob locations.
    fn private_containers_cache(&self) {
        if self
            .inner
            .containers_cache_private
            .swap(true, Ordering::SeqCst)
        {
            return;
        }
        self.run_ok(&[
            "sh",
            "-c",
            "mkdir -p /var/lib/containers/cache && mount -t tmpfs -o mode=0700 berth-test /var/lib/containers/cache",
        ]);
    }

    fn handle(&self) -> NsHandle {
        NsHandle {
            inner: self.inner.clone(),
        }
    }
}

impl Default for Netns {
    fn default() -> Self {
        Netns::new()
    }
}

fn handle_command(inner: &NsInner, program: impl AsRef<OsStr>) -> Command {
    // setpriv sets PR_SET_PDEATHSIG before exec'ing nsenter, so everything a
    // test starts dies with the thread that started it.
    let mut cmd = Command::new("setpriv");
    cmd.args(["--pdeathsig", "KILL", "nsenter", "--target"])
        .arg(inner.pid.to_string())
        .args(["--net", "--mount", "--"])
        .arg(program)
        .env(NS_MARKER_ENV, &inner.marker)
        .stdin(Stdio::null());
    cmd
}

fn tcp_connect_in(pid: i32, addr: &str) -> std::io::Result<TcpStream> {
    let addr: SocketAddr = addr
        .parse()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    std::thread::spawn(move || {
        let ns = File::open(format!("/proc/{pid}/ns/net"))?;
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)?;
        TcpStream::connect_timeout(&addr, Duration::from_secs(2))
    })
    .join()
    .expect("tcp_connect thread panicked")
}

fn members(inner: &NsInner) -> HashSet<i32> {
    let protected = protected_pids();
    let dirs: Vec<Vec<u8>> = inner
        .dirs
        .lock()
        .unwrap()
        .iter()
        .map(|d| d.as_os_str().as_encoded_bytes().to_vec())
        .collect();
    let marker = format!("{NS_MARKER_ENV}={}", inner.marker).into_bytes();
    let mut children: HashMap<i32, Vec<i32>> = HashMap::new();
    let mut seeds = Vec::new();
    for pid in all_pids() {
        let Some(info) = proc_info(pid) else { continue };
        children.entry(info.ppid).or_default().push(pid);
        if pid == inner.pid || protected.contains(&pid) || info.state == 'Z' {
            continue;
        }
        let ours = ns_id(pid, "net").as_deref() == Some(inner.net_ns.as_str())
            || ns_id(pid, "mnt").as_deref() == Some(inner.mnt_ns.as_str())
            || contains(&read_bytes(&format!("/proc/{pid}/environ")), &marker)
            || {
                let c = cmdline(pid);
                dirs.iter().any(|d| contains(&c, d))
            };
        if ours {
            seeds.push(pid);
        }
    }
    let mut set = HashSet::new();
    while let Some(pid) = seeds.pop() {
        if protected.contains(&pid) || pid == inner.pid || !set.insert(pid) {
            continue;
        }
        if let Some(ch) = children.get(&pid) {
            seeds.extend(ch.iter().copied());
        }
    }
    set.retain(|&p| proc_info(p).is_some_and(|i| i.state != 'Z'));
    set
}

/// waitpid(pid, WNOHANG) if pid is our child. True once there is nothing
/// left to reap: gone, reaped, or not our child.
fn reap_if_child(pid: i32) -> bool {
    let me = std::process::id() as i32;
    match proc_info(pid) {
        None => true,
        Some(i) if i.ppid == me => {
            use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
            !matches!(
                waitpid(nix::unistd::Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)),
                Ok(WaitStatus::StillAlive)
            )
        }
        Some(_) => true,
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Children first: SIGKILL everything that belongs to the namespace
        // until nothing is left (catches processes forked meanwhile).
        let mut killed: HashSet<i32> = HashSet::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let set = members(&self.inner);
            if set.is_empty() || Instant::now() > deadline {
                if !set.is_empty() {
                    eprintln!("Netns drop: processes survived SIGKILL: {set:?}");
                }
                break;
            }
            for &p in &set {
                signal(p, libc::SIGKILL);
            }
            killed.extend(set);
            std::thread::sleep(Duration::from_millis(10));
            killed.retain(|&p| !reap_if_child(p));
        }
        // Reap our own killed children (they may still be zombies).
        let deadline = Instant::now() + Duration::from_secs(5);
        while !killed.is_empty() && Instant::now() < deadline {
            killed.retain(|&p| !reap_if_child(p));
            if !killed.is_empty() {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        // Holder last.
        if let Some(mut holder) = self.holder.lock().unwrap().take() {
            let _ = holder.kill();
            let _ = holder.wait();
        }
    }
}

/// Cheap handle used by Registry/Berth to run commands in a namespace.
#[derive(Clone)]
struct NsHandle {
    inner: Arc<NsInner>,
}

impl NsHandle {
    fn command(&self, program: impl AsRef<OsStr>) -> Command {
        handle_command(&self.inner, program)
    }

    fn track_dir(&self, dir: &Path) {
        self.inner.dirs.lock().unwrap().push(dir.to_path_buf());
    }
}

// ---------------------------------------------------------------------------
// Registry
// ---------------------------------------------------------------------------

#[derive(Clone, Debug)]
pub struct RegistryOpts {
    pub port: u16,
    pub tls: bool,
    /// (user, password): the registry requires HTTP basic auth (htpasswd).
    pub basic_auth: Option<(String, String)>,
    /// Bearer-token auth: (realm URL, PEM of the token signing cert).
    pub token_auth: Option<(String, PathBuf)>,
}

impl Default for RegistryOpts {
    fn default() -> Self {
        RegistryOpts {
            port: 5000,
            tls: false,
            basic_auth: None,
            token_auth: None,
        }
    }
}

/// Debian's `docker-registry` (distribution 2.8) serving on
/// 127.0.0.1:`port` inside a [`Netns`], storage in a temporary directory.
pub struct Registry {
    /// "127.0.0.1:PORT"
    pub addr: String,
    /// Filesystem storage root (`rootdirectory` of the registry).
    pub storage: PathBuf,
    /// CA certificate (PEM) that signed the registry's certificate (tls only).
    pub ca_pem: Option<PathBuf>,
    /// Server certificate and key (tls only).
    pub cert_pem: Option<PathBuf>,
    pub key_pem: Option<PathBuf>,
    pub opts: RegistryOpts,
    /// Registry stdout+stderr (including the access log).
    pub log_path: PathBuf,
    pub dir: PathBuf,
    ns: NsHandle,
    child: Option<Child>,
    _tmp: tempfile::TempDir,
}

/// Self-signed CA + server certificate for 127.0.0.1 and localhost.
/// Returns (ca_pem, cert_pem, key_pem).
pub fn make_tls_cert() -> (String, String, String) {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
        IsCa, KeyPair, KeyUsagePurpose,
    };
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "berth test CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_key = KeyPair::generate().expect("ca key");
    let ca = CertifiedIssuer::self_signed(ca_params, ca_key).expect("self-sign CA");

    let mut params = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
        .expect("server params");
    params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate().expect("server key");
    let cert = params.signed_by(&key, &ca).expect("sign server cert");
    (ca.pem(), cert.pem(), key.serialize_pem())
}

impl Registry {
    pub fn start(ns: &Netns, opts: RegistryOpts) -> Registry {
        let bin = Path::new("/usr/bin/docker-registry");
        assert!(
            bin.exists(),
            "/usr/bin/docker-registry not found: install the Debian package `docker-registry` \
             (run scripts/install-test-deps as root)"
        );
        require_tool("skopeo", "skopeo");
        ns.private_containers_cache();

        let tmp = make_tempdir("berth-test-registry-");
        let dir = tmp.path().to_path_buf();
        ns.track_dir(&dir);
        let storage = dir.join("storage");
        fs::create_dir_all(&storage).unwrap();
        let addr = format!("127.0.0.1:{}", opts.port);

        let mut tls_yaml = String::new();
        let (mut ca_path, mut cert_path, mut key_path) = (None, None, None);
        if opts.tls {
            let (ca, cert, key) = make_tls_cert();
            let (c, s, k) = (
                dir.join("ca.pem"),
                dir.join("cert.pem"),
                dir.join("key.pem"),
            );
            fs::write(&c, ca).unwrap();
            fs::write(&s, cert).unwrap();
            fs::write(&k, key).unwrap();
            tls_yaml = format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                s.display(),
                k.display()
            );
            ca_path = Some(c);
            cert_path = Some(s);
            key_path = Some(k);
        }
        let mut auth_yaml = String::new();
        if let Some((user, pass)) = &opts.basic_auth {
            require_tool("htpasswd", "apache2-utils");
            let out = Command::new("htpasswd")
                .args(["-Bbn", user, pass])
                .stdin(Stdio::null())
                .output()
                .expect("run htpasswd");
            assert!(
                out.status.success(),
                "htpasswd failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let htpasswd = dir.join("htpasswd");
            fs::write(&htpasswd, &out.stdout).unwrap();
            auth_yaml = format!(
                "auth:\n  htpasswd:\n    realm: berth-test\n    path: {}\n",
                htpasswd.display()
            );
        }
        if let Some((realm, cert)) = &opts.token_auth {
            auth_yaml = format!(
                "auth:\n  token:\n    realm: {realm}\n    service: {}\n    issuer: {}\n    rootcertbundle: {}\n",
                token_server::SERVICE,
                token_server::ISSUER,
                cert.display()
            );
        }
        let config = format!(
            "version: 0.1\n\
             log:\n  level: info\n  formatter: text\n\
             storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\n  \
             maintenance:\n    uploadpurging:\n      enabled: false\n\
             http:\n  addr: {addr}\n  secret: berth-test-secret\n{tls_yaml}\
             {auth_yaml}",
            storage = storage.display(),
        );
        let config_path = dir.join("config.yml");
        fs::write(&config_path, config).unwrap();

        let log_path = dir.join("registry.log");
        let log = File::create(&log_path).unwrap();
        let child = ns
            .command(bin)
            .arg("serve")
            .arg(&config_path)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn docker-registry");

        let mut reg = Registry {
            addr,
            storage,
            ca_pem: ca_path,
            cert_pem: cert_path,
            key_pem: key_path,
            opts,
            log_path,
            dir,
            ns: ns.handle(),
            child: Some(child),
            _tmp: tmp,
        };
        reg.wait_ready(ns);
        reg
    }

    fn wait_ready(&mut self, ns: &Netns) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("docker-registry exited ({st}):\n{}", self.log());
            }
            if ns.tcp_connect(&self.addr).is_ok() {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "docker-registry not listening on {} after 20 s:\n{}",
                    self.addr,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The registry's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// "https" or "http".
    pub fn scheme(&self) -> &'static str {
        if self.opts.tls {
            "https"
        } else {
            "http"
        }
    }

    fn creds_arg(&self, flag: &str) -> Vec<String> {
        match &self.opts.basic_auth {
            Some((u, p)) => vec![flag.to_string(), format!("{u}:{p}")],
            None => vec![],
        }
    }

    fn skopeo(&self, args: &[String]) -> Output {
        self.ns
            .command("skopeo")
            .arg("--insecure-policy")
            .args(args)
            .output()
            .expect("spawn skopeo")
    }

    fn skopeo_ok(&self, args: &[String]) -> String {
        let out = self.skopeo(args);
        if !out.status.success() {
            panic!(
                "skopeo {} failed ({}):\n{}\n{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn copy(&self, image: &str, dest: &str, extra: &[&str]) {
        let layout = image_layout(image);
        let mut args: Vec<String> = vec![
            "copy".into(),
            "--all".into(),
            "--dest-tls-verify=false".into(),
            "--retry-times".into(),
            "0".into(),
            "--quiet".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        args.extend(self.creds_arg("--dest-creds"));
        args.push(format!("oci:{}:latest", layout.display()));
        args.push(format!("docker://{}/{}", self.addr, dest));
        self.skopeo_ok(&args);
    }

    /// Pushes test image `image` (OCI layout in [`images_dir`]) to
    /// `<addr>/<dest>` (dest = "repo:tag" or "repo/name:tag"), byte for
    /// byte: manifests and blobs keep the digests of the layout.
    pub fn push(&self, image: &str, dest: &str) {
        self.copy(image, dest, &["--preserve-digests"]);
    }

    /// Pushes `image` converted to Docker schema 2 (manifest + config are
    /// rewritten; layers keep their bytes). Only for single-platform gzip
    /// images (not `multiarch`, `zstd`, `uncompressed`).
    pub fn push_v2s2(&self, image: &str, dest: &str) {
        self.copy(image, dest, &["--format", "v2s2"]);
    }

    /// Raw manifest (or index) at `<addr>/<reference>`, via
    /// `skopeo inspect --raw`. Panics if it's not there.
    pub fn inspect_raw(&self, reference: &str) -> String {
        self.try_inspect_raw(reference)
            .unwrap_or_else(|| panic!("skopeo inspect {}/{reference} failed", self.addr))
    }

    /// `inspect_raw` that returns None instead of panicking.
    pub fn try_inspect_raw(&self, reference: &str) -> Option<String> {
        let mut args: Vec<String> = vec![
            "inspect".into(),
            "--raw".into(),
            "--tls-verify=false".into(),
            "--retry-times".into(),
            "0".into(),
        ];
        args.extend(self.creds_arg("--creds"));
        args.push(format!("docker://{}/{}", self.addr, reference));
        let out = self.skopeo(&args);
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// On-disk path of blob `digest` ("sha256:<hex>" or "<hex>") in the
    /// registry storage, e.g. to corrupt it.
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        assert!(hex.len() == 64, "bad digest {digest}");
        self.storage
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    /// PID of the docker-registry process.
    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    /// Kills the registry (SIGKILL) and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- last lines of registry log ({}) ----\n{}\n----",
                self.log_path.display(),
                tail(&self.log(), 20)
            );
        }
        self.kill();
    }
}

// ---------------------------------------------------------------------------
// Berth
// ---------------------------------------------------------------------------

#[derive(Clone, Debug, Default)]
pub struct BerthOpts {
    /// Contents of config.toml (passed with --config).
    pub config_toml: String,
    /// Contents of registries.conf (passed with --registries-config if set).
    pub registries_conf: Option<String>,
    /// Extra command-line arguments appended after the standard ones.
    pub extra_args: Vec<String>,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
    /// Run with berth's own defaults where the harness otherwise relaxes
    /// them for the development host (see [`harness_config`]).
    pub strict_defaults: bool,
}

/// The config.toml berth gets: `opts.config_toml`, plus, outside the test
/// VM (no usable cgroup v2, so no device program), `[security]
/// device_policy = "best-effort"` unless the test sets device_policy itself
/// or asks for `strict_defaults`. The VM suite keeps the default (required).
pub fn harness_config(opts: &BerthOpts) -> String {
    let toml = &opts.config_toml;
    let in_vm = std::env::var("BERTH_VM").as_deref() == Ok("1");
    if opts.strict_defaults || in_vm || toml.contains("device_policy") {
        return toml.clone();
    }
    let key = "device_policy = \"best-effort\"\n";
    match toml.lines().position(|l| l.trim() == "[security]") {
        Some(i) => {
            let mut lines: Vec<&str> = toml.lines().collect();
            lines.insert(i + 1, key.trim_end());
            lines.join("\n") + "\n"
        }
        None => format!("{toml}\n[security]\n{key}"),
    }
}

/// The berth daemon, running inside a [`Netns`]:
/// `berth serve --config DIR/config.toml --root DIR/root --state-dir DIR/run
/// --socket DIR/run/berth.sock [--registries-config DIR/registries.conf]
/// --log-level debug`, stdout+stderr appended to DIR/berth.log.
pub struct Berth {
    /// The temporary directory holding everything below.
    pub dir: PathBuf,
    pub root: PathBuf,
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    pub config_path: PathBuf,
    pub registries_conf_path: Option<PathBuf>,
    pub log_path: PathBuf,
    pub opts: BerthOpts,
    program: PathBuf,
    ns: NsHandle,
    child: Option<Child>,
    _tmp: tempfile::TempDir,
}

/// A bound, not a measurement: under TCG emulation on a loaded host (the VM
/// suite) startup's few process spawns (the idmap probe, OCI runtimes'
/// --version) can take tens of seconds.
pub const BERTH_START_TIMEOUT: Duration = Duration::from_secs(90);

impl Berth {
    pub fn start(ns: &Netns, opts: BerthOpts) -> Berth {
        Berth::start_program(ns, opts, Path::new(env!("CARGO_BIN_EXE_berth")))
    }

    /// Like [`Berth::start`] but runs `program` instead of the berth binary
    /// (same arguments); for testing the harness itself.
    pub fn start_program(ns: &Netns, opts: BerthOpts, program: &Path) -> Berth {
        let tmp = make_tempdir("berth-test-");
        let dir = tmp.path().to_path_buf();
        ns.track_dir(&dir);
        let config_path = dir.join("config.toml");
        let registries_conf_path = opts.registries_conf.as_ref().map(|c| {
            let p = dir.join("registries.conf");
            fs::write(&p, c).unwrap();
            p
        });
        let mut berth = Berth {
            root: dir.join("root"),
            state_dir: dir.join("run"),
            socket: dir.join("run/berth.sock"),
            log_path: dir.join("berth.log"),
            config_path,
            registries_conf_path,
            dir,
            opts,
            program: program.to_path_buf(),
            ns: ns.handle(),
            child: None,
            _tmp: tmp,
        };
        berth.spawn();
        berth
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "berth is already running");
        // Written at every start: tests change opts.config_toml and restart.
        fs::write(&self.config_path, harness_config(&self.opts)).unwrap();
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .unwrap();
        let _ = writeln!(log, "==== berth-test: starting berth ====");
        let mut cmd = self.ns.command(&self.program);
        cmd.arg("serve")
            .arg("--config")
            .arg(&self.config_path)
            .arg("--root")
            .arg(&self.root)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--socket")
            .arg(&self.socket);
        if let Some(p) = &self.registries_conf_path {
            cmd.arg("--registries-config").arg(p);
        }
        cmd.args(["--log-level", "debug"])
            .args(&self.opts.extra_args)
            .envs(self.opts.env.iter().map(|(k, v)| (k, v)))
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        self.child = Some(cmd.spawn().expect("spawn berth"));
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + BERTH_START_TIMEOUT;
        loop {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                panic!(
                    "berth exited during startup ({st}):\n{}",
                    tail(&self.log(), 50)
                );
            }
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "berth socket {} not accepting connections after {:?}:\n{}",
                    self.socket.display(),
                    BERTH_START_TIMEOUT,
                    tail(&self.log(), 50)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A tonic channel over the unix socket.
    pub async fn channel(&self) -> Channel {
        let path = self.socket.clone();
        Endpoint::try_from("http://[::]:50051")
            .expect("endpoint")
            .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                let p = path.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                        tokio::net::UnixStream::connect(p).await?,
                    ))
                }
            }))
            .await
            .unwrap_or_else(|e| panic!("connect to {}: {e}", self.socket.display()))
    }

    pub async fn image_client(&self) -> ImageServiceClient<Channel> {
        ImageServiceClient::new(self.channel().await)
    }

    pub async fn runtime_client(&self) -> RuntimeServiceClient<Channel> {
        RuntimeServiceClient::new(self.channel().await)
    }

    /// PID of the berth process, if running.
    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    /// SIGKILL + wait.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM + wait (graceful shutdown); panics if berth isn't running or
    /// doesn't exit within 30 s.
    pub fn stop(&mut self) -> ExitStatus {
        self.stop_timeout(Duration::from_secs(30))
    }

    pub fn stop_timeout(&mut self, timeout: Duration) -> ExitStatus {
        let mut c = self.child.take().expect("berth is not running");
        signal(c.id() as i32, libc::SIGTERM);
        match wait_timeout(&mut c, timeout) {
            Some(st) => st,
            None => {
                let _ = c.kill();
                let _ = c.wait();
                panic!(
                    "berth did not exit within {timeout:?} of SIGTERM:\n{}",
                    tail(&self.log(), 50)
                );
            }
        }
    }

    /// Starts berth again with the same options and directories (kills it
    /// first if it is still running).
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// Whether the berth process is still running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// berth's log (all runs).
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }
}

impl Drop for Berth {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!(
                "---- last 50 lines of berth log ({}) ----\n{}\n----",
                self.log_path.display(),
                tail(&self.log(), 50)
            );
        }
    }
}
