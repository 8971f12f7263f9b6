//! The monitor's side of a delegating runtime handler: the external OCI
//! runtime creates the container from the bundle, with the monitor's pipes
//! as its stdio, and the monitor then supervises it like its own init.

use super::{fail, supervise, MonitorConfig};
use crate::handlers::{oci, OciRuntime};
use crate::linux::hostrootfs;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::process::Stdio;

pub(super) fn run(
    cfg: &MonitorConfig,
    rt: &OciRuntime,
    spec: &oci_spec::runtime::Spec,
) -> Result<(), String> {
    // The container process is the runtime's descendant, not ours: as a
    // subreaper the monitor inherits it when `create` returns, and can wait
    // for it and read its exit status.
    if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
        return fail(format!("become a child subreaper: {e}"));
    }
    let Some(root) = spec.root().as_ref().map(|r| r.path().clone()) else {
        return fail("the spec has no root".into());
    };
    let Some(bundle) = cfg.spec.parent() else {
        return fail(format!("{} has no bundle directory", cfg.spec.display()));
    };
    if let Err(e) =
        hostrootfs::mount_overlay(&cfg.layers_dir, &cfg.lowers, &cfg.upper, &cfg.work, &root)
    {
        return fail(e);
    }
    let result = create_and_supervise(cfg, rt, bundle);
    // The container's mount namespace has its own copy: the host's goes.
    if let Err(e) = hostrootfs::unmount(&root) {
        eprintln!("berth monitor: {e}");
    }
    result
}

fn create_and_supervise(cfg: &MonitorConfig, rt: &OciRuntime, bundle: &Path) -> Result<(), String> {
    let pipe =
        || nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"));
    let (out_r, out_w) = match pipe() {
        Ok(p) => p,
        Err(e) => return fail(e),
    };
    let (err_r, err_w) = match pipe() {
        Ok(p) => p,
        Err(e) => return fail(e),
    };
    // As with berth's init: the monitor keeps the write end of stdin, so a
    // reader blocks instead of seeing EOF.
    let (stdin_r, stdin_w): (Option<OwnedFd>, Option<OwnedFd>) = if cfg.stdin {
        match pipe() {
            Ok((r, w)) => (Some(r), Some(w)),
            Err(e) => return fail(e),
        }
    } else {
        (None, None)
    };
    let pid_file = bundle.join("init.pid");
    let log = bundle.join("runtime.log");
    let mut cmd = rt.create_command(&cfg.id, bundle, &pid_file, &log);
    cmd.stdin(stdin_r.map(Stdio::from).unwrap_or_else(Stdio::null))
        .stdout(Stdio::from(out_w))
        .stderr(Stdio::from(err_w));
    let status = cmd.status();
    // Drops the command's copies of the pipes' write ends.
    drop(cmd);
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => {
            let mut msg = oci::log_errors(&log);
            if msg.is_empty() {
                msg = drain(&err_r);
            }
            return fail(format!(
                "{} create failed ({s}): {msg}",
                rt.binary.display()
            ));
        }
        Err(e) => return fail(format!("run {} create: {e}", rt.binary.display())),
    }
    let pid = match std::fs::read_to_string(&pid_file)
        .map_err(|e| e.to_string())
        .and_then(|s| s.trim().parse::<i32>().map_err(|e| e.to_string()))
    {
        Ok(p) if p > 0 => p,
        Ok(p) => return fail(format!("{}: bad pid {p}", pid_file.display())),
        Err(e) => return fail(format!("read {}: {e}", pid_file.display())),
    };
    supervise(cfg, pid, out_r, Some(err_r), stdin_w, false, None)
}

/// What a failed runtime wrote to the stderr pipe, without blocking on a
/// process that may still hold it.
fn drain(fd: &OwnedFd) -> String {
    let _ = nix::fcntl::fcntl(
        fd,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    );
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = nix::unistd::read(fd, &mut buf) {
        if n == 0 || out.len() > 16 * 1024 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&out).trim().to_string()
}
