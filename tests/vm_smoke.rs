//! VM-only: proves the test VM is what the cgroup tests need. The VM
//! (scripts/vm-run, driven by scripts/vm-test) boots a Debian kernel with a
//! pure cgroup v2 hierarchy at /sys/fs/cgroup and every controller enabled
//! in the root's cgroup.subtree_control.
//!
//! Every `vm_*` test binary follows the same rules:
//! - each test is `#[ignore]`d, so a plain `cargo test` on a host skips it;
//!   nextest's default profile also filters `vm_*` binaries out
//!   (.config/nextest.toml) and scripts/vm-test runs them with
//!   `--run-ignored all` under the `vm` profile;
//! - each test starts with `require_vm()`, so running one on a host by hand
//!   fails loudly instead of touching the host's cgroups.

use std::fs;
use std::io::ErrorKind;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

const CGROUP_ROOT: &str = "/sys/fs/cgroup";

fn require_vm() {
    if std::env::var("BERTH_VM").as_deref() != Ok("1") {
        panic!(
            "this test only runs inside the test VM: it needs a pure cgroup v2 \
             hierarchy and creates cgroups under /sys/fs/cgroup. BERTH_VM=1 is \
             not set; run it with scripts/vm-test (after cargo build --release \
             --all-targets)"
        );
    }
}

fn read(path: impl AsRef<Path>) -> String {
    let path = path.as_ref();
    fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn write(path: impl AsRef<Path>, value: &str) {
    let path = path.as_ref();
    fs::write(path, value).unwrap_or_else(|e| panic!("write {value:?} to {}: {e}", path.display()));
}

/// The value of `key` in a flat-keyed cgroup file such as memory.events.
fn keyed(content: &str, key: &str) -> Option<u64> {
    content.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok())?
    })
}

/// A child cgroup of the root, killed and removed on drop (even when the
/// test fails half-way).
struct Cgroup(PathBuf);

impl Cgroup {
    fn create(name: &str) -> Cgroup {
        let path = Path::new(CGROUP_ROOT).join(name);
        if path.exists() {
            Cgroup(path.clone()).remove();
        }
        fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        Cgroup(path)
    }

    fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    fn remove(&self) {
        let _ = fs::write(self.file("cgroup.kill"), "1");
        // rmdir fails with EBUSY until the killed tasks are gone
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match fs::remove_dir(&self.0) {
                Ok(()) => return,
                Err(e) if e.kind() == ErrorKind::NotFound => return,
                Err(e) if Instant::now() > deadline => {
                    panic!("rmdir {}: {e}", self.0.display())
                }
                Err(_) => sleep(Duration::from_millis(50)),
            }
        }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let _ = fs::write(self.file("cgroup.kill"), "1");
            let _ = fs::remove_dir(&self.0);
        } else {
            self.remove();
        }
    }
}

#[test]
#[ignore = "VM-only: run with scripts/vm-test"]
fn cgroup2_root_has_the_controllers() {
    require_vm();
    let mountinfo = read("/proc/self/mountinfo");
    let fstype = mountinfo.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        (pre.split_whitespace().nth(4)? == CGROUP_ROOT).then(|| post.split_whitespace().next())?
    });
    assert_eq!(
        fstype,
        Some("cgroup2"),
        "{CGROUP_ROOT} is not a cgroup2 mount:\n{mountinfo}"
    );
    assert!(
        !mountinfo.lines().any(|l| l.contains(" - cgroup ")),
        "cgroup v1 hierarchies are mounted:\n{mountinfo}"
    );

    let available = read(Path::new(CGROUP_ROOT).join("cgroup.controllers"));
    let enabled = read(Path::new(CGROUP_ROOT).join("cgroup.subtree_control"));
    for c in ["cpu", "memory", "pids", "cpuset", "io"] {
        assert!(
            available.split_whitespace().any(|x| x == c),
            "controller {c} not in cgroup.controllers: {available}"
        );
        assert!(
            enabled.split_whitespace().any(|x| x == c),
            "controller {c} not in the root's cgroup.subtree_control: {enabled}"
        );
    }
}

#[test]
#[ignore = "VM-only: run with scripts/vm-test"]
fn memory_max_gets_a_hog_oom_killed() {
    require_vm();
    let cg = Cgroup::create("berth-vm-smoke");
    write(cg.file("memory.max"), "64M");
    assert_eq!(read(cg.file("memory.max")).trim(), "67108864");
    if cg.file("memory.swap.max").exists() {
        write(cg.file("memory.swap.max"), "0");
    }
    assert_eq!(keyed(&read(cg.file("memory.events")), "oom_kill"), Some(0));

    // The shell moves itself into the cgroup, then becomes a tail that keeps
    // the last 200 MB of an endless pipe in memory. (Not `tail -c N
    // /dev/zero`: GNU tail seeks on /dev/zero and allocates nothing.) The
    // feeding cat stays in the test's own cgroup.
    let mut zeros = Command::new("cat")
        .arg("/dev/zero")
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn cat /dev/zero");
    let mut hog = Command::new("sh")
        .args([
            "-c",
            r#"echo $$ > "$1/cgroup.procs" && exec tail -c 200000000"#,
            "sh",
        ])
        .arg(&cg.0)
        .stdin(zeros.stdout.take().unwrap())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn sh");
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = hog.try_wait().expect("wait for the hog") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = hog.kill();
            let _ = hog.wait();
            let _ = zeros.kill();
            panic!(
                "the hog was not OOM-killed within 120 s; memory.current={} memory.events:\n{}",
                read(cg.file("memory.current")).trim(),
                read(cg.file("memory.events"))
            );
        }
        sleep(Duration::from_millis(50));
    };
    // cat dies of SIGPIPE once the tail is gone
    let _ = zeros.kill();
    let _ = zeros.wait();
    let events = read(cg.file("memory.events"));
    assert_eq!(
        status.signal(),
        Some(9),
        "the hog should die of SIGKILL (OOM), got {status:?}; memory.events:\n{events}"
    );
    let kills = keyed(&events, "oom_kill").expect("oom_kill in memory.events");
    assert!(kills >= 1, "memory.events shows no oom_kill:\n{events}");
    if cg.file("memory.peak").exists() {
        let peak: u64 = read(cg.file("memory.peak")).trim().parse().unwrap();
        assert!(peak <= 64 << 20, "memory.peak {peak} is above memory.max");
    }
    drop(cg);
    assert!(!Path::new(CGROUP_ROOT).join("berth-vm-smoke").exists());
}

#[test]
#[ignore = "VM-only: run with scripts/vm-test"]
fn berth_check_is_all_ok() {
    require_vm();
    let out = Command::new(env!("CARGO_BIN_EXE_berth"))
        .arg("check")
        .output()
        .expect("run berth check");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "berth check failed ({}):\n{stdout}{stderr}",
        out.status
    );
    let lines: Vec<&str> = stdout.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(
        !lines.is_empty(),
        "berth check printed nothing; stderr:\n{stderr}"
    );
    for l in lines {
        assert!(
            l.starts_with("OK ") || l.starts_with("WARN "),
            "berth check line is neither OK nor WARN: {l}\n{stdout}"
        );
    }
}
