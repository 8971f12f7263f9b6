//! Driving an external OCI runtime through its command line (the runc CLI
//! that crun, youki and runsc share): create, start, state, kill, delete,
//! exec. berth writes the bundle (config.json) itself.

use serde::{Deserialize, Serialize};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{CgroupManager, OciConfig};

/// A delegating handler as resolved at startup. Stored in container
/// records, so a container keeps the runtime it was created with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OciRuntime {
    pub handler: String,
    pub binary: PathBuf,
    /// The runtime's state directory (`--root`).
    pub root: PathBuf,
    /// Global arguments after `--root`: cgroup manager flags, extra args.
    pub global_args: Vec<String>,
    /// The runtime places the container in a cgroup (berth's path for it).
    pub cgroups: bool,
}

/// What `<runtime> exec` produced.
#[derive(Debug, Default)]
pub struct ExecResult {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub exit_code: i32,
    pub timed_out: bool,
}

impl OciRuntime {
    /// Checks that `cfg.binary` runs and answers `--version`, and picks the
    /// flags its flavour needs for the configured cgroup manager.
    pub fn probe(handler: &str, cfg: &OciConfig, root: PathBuf) -> Result<OciRuntime, String> {
        let out = Command::new(&cfg.binary)
            .arg("--version")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {} --version: {e}", cfg.binary.display()))?;
        let version = String::from_utf8_lossy(&out.stdout);
        let first = version.lines().next().unwrap_or("").trim().to_string();
        if !out.status.success() || first.is_empty() {
            return Err(format!(
                "{} --version failed ({}): {}",
                cfg.binary.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        // crun spells the cgroup manager as a global option; runc (and
        // runtimes copying its CLI) only knows cgroupfs or --systemd-cgroup.
        let crun = first.starts_with("crun");
        let mut global_args = Vec::new();
        match (cfg.cgroup_manager, crun) {
            (CgroupManager::Cgroupfs, true) => global_args.push("--cgroup-manager=cgroupfs".into()),
            (CgroupManager::Cgroupfs, false) => {}
            (CgroupManager::Disabled, true) => global_args.push("--cgroup-manager=disabled".into()),
            (CgroupManager::Disabled, false) => {
                return Err(format!(
                    "cgroup_manager = \"disabled\" needs a runtime that can run without cgroups \
                     (crun); {} ({first}) cannot",
                    cfg.binary.display()
                ))
            }
        }
        global_args.extend(cfg.args.iter().cloned());
        tracing::info!(handler, binary = %cfg.binary.display(), version = %first, "OCI runtime handler");
        Ok(OciRuntime {
            handler: handler.to_string(),
            binary: cfg.binary.clone(),
            root,
            global_args,
            cgroups: cfg.cgroup_manager != CgroupManager::Disabled,
        })
    }

    /// `<binary> --root <root> <global args>`.
    pub fn command(&self) -> Command {
        let mut c = Command::new(&self.binary);
        c.arg("--root").arg(&self.root).args(&self.global_args);
        c
    }

    /// The `create` command, for the monitor to run with the container's
    /// stdio. The runtime logs (JSON) to `log`, not to the container's stderr.
    pub fn create_command(&self, id: &str, bundle: &Path, pid_file: &Path, log: &Path) -> Command {
        let mut c = Command::new(&self.binary);
        c.arg("--root")
            .arg(&self.root)
            .arg(format!("--log={}", log.display()))
            .arg("--log-format=json")
            .args(&self.global_args)
            .arg("create")
            .arg("--bundle")
            .arg(bundle)
            .arg("--pid-file")
            .arg(pid_file)
            .arg(id);
        c
    }

    fn run(&self, what: &str, args: &[&str]) -> Result<String, String> {
        let out = self
            .command()
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("run {} {what}: {e}", self.binary.display()))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "{} {what} failed ({}): {}",
                self.binary.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    pub fn start(&self, id: &str) -> Result<(), String> {
        self.run("start", &["start", id]).map(drop)
    }

    /// The runtime's status word (created, running, stopped...), `None`
    /// when it does not know the container.
    pub fn status(&self, id: &str) -> Option<String> {
        let out = self.run("state", &["state", id]).ok()?;
        let v: serde_json::Value = serde_json::from_str(&out).ok()?;
        v["status"].as_str().map(String::from)
    }

    /// Forgets the container, killing what is left of it. Idempotent.
    pub fn delete(&self, id: &str) -> Result<(), String> {
        if self.status(id).is_none() && !self.root.join(id).exists() {
            return Ok(());
        }
        self.run("delete", &["delete", "--force", id]).map(drop)
    }

    /// Runs the process described by `process_json` in the container,
    /// collecting at most `max_output` bytes of each stream; past `timeout`
    /// the process is killed.
    pub fn exec(
        &self,
        id: &str,
        process_json: &Path,
        pid_file: &Path,
        timeout: Option<Duration>,
        max_output: usize,
    ) -> Result<ExecResult, String> {
        let mut child = self
            .command()
            .arg("exec")
            .arg("--process")
            .arg(process_json)
            .arg("--pid-file")
            .arg(pid_file)
            .arg(id)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("run {} exec: {e}", self.binary.display()))?;
        let reader = |r: Option<Box<dyn Read + Send>>| {
            std::thread::spawn(move || {
                let mut kept = Vec::new();
                if let Some(mut r) = r {
                    let mut buf = [0u8; 16 * 1024];
                    while let Ok(n) = r.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        let room = max_output.saturating_sub(kept.len());
                        kept.extend_from_slice(&buf[..n.min(room)]);
                    }
                }
                kept
            })
        };
        let out = reader(child.stdout.take().map(|s| Box::new(s) as _));
        let err = reader(child.stderr.take().map(|s| Box::new(s) as _));
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut timed_out = false;
        let status = loop {
            match child.try_wait() {
                Ok(Some(s)) => break s,
                Ok(None) => {}
                Err(e) => return Err(format!("wait for {} exec: {e}", self.binary.display())),
            }
            if !timed_out && deadline.is_some_and(|d| Instant::now() >= d) {
                timed_out = true;
                // The runtime forwards signals it can catch; SIGKILL goes to
                // the process itself.
                if let Some(pid) = std::fs::read_to_string(pid_file)
                    .ok()
                    .and_then(|s| s.trim().parse::<i32>().ok())
                {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let stdout = out.join().unwrap_or_default();
        let stderr = err.join().unwrap_or_default();
        use std::os::unix::process::ExitStatusExt;
        let exit_code = status
            .code()
            .unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
        Ok(ExecResult {
            stdout,
            stderr,
            exit_code,
            timed_out,
        })
    }
}

/// The error messages of a runtime's JSON log (`--log-format=json`).
pub fn log_errors(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let msgs: Vec<String> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| matches!(v["level"].as_str(), Some("error" | "fatal")))
        .filter_map(|v| v["msg"].as_str().map(String::from))
        .collect();
    if msgs.is_empty() {
        text.trim().to_string()
    } else {
        msgs.join("; ")
    }
}
