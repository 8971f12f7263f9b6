//! The container init: created by the monitor with clone(2) in a new mount
//! (and maybe PID) namespace, it builds the rootfs from the OCI spec (overlay,
//! standard and CRI mounts, devices, masked and read-only paths), pivots into
//! it, drops to the container user, waits on the exec fifo until
//! StartContainer, and execs the workload.
//!
//! The monitor is single-threaded, so the cloned child may use the normal
//! Rust library (allocation included) before it execs.

use super::identity::Identity;
use super::mountfd;
use super::resolve::{self, open_in_root, Create};
use super::{sys, LinuxError};
use nix::fcntl::{open, OFlag};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::stat::Mode;
use nix::unistd::{chdir, pivot_root};
use oci_spec::runtime::Spec;
use rustix::mount::MountAttrFlags;
use std::ffi::CString;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

/// Everything the init needs besides the spec.
pub struct InitPlan<'a> {
    pub spec: &'a Spec,
    /// Directory holding the unpacked layers; `lowers` are names inside it,
    /// top-most first (relative names keep the overlay option string short).
    pub layers_dir: &'a Path,
    pub lowers: &'a [String],
    pub upper: &'a Path,
    pub work: &'a Path,
    pub fifo: &'a Path,
    /// The init reports `R` (ready), `W<msg>` (ready, but the command will not
    /// start) or `E<msg>` (failed) here, then closes it.
    pub sync: RawFd,
    pub stdout: RawFd,
    pub stderr: RawFd,
    /// The container's stdin (a pipe the monitor holds); /dev/null if unset.
    pub stdin: Option<RawFd>,
    /// Terminal mode: a unix socket on which the init sends the master of a
    /// pty it opens inside the container; the slave becomes its stdio and
    /// controlling terminal.
    pub console: Option<RawFd>,
    /// Entered first, so all the init's setup is accounted to the container.
    pub cgroup: Option<&'a Path>,
}

/// Clones the init into a new mount namespace (and a new PID namespace when
/// `new_pid`). Returns its pid. Must be called from a single-threaded process.
pub fn spawn(plan: &InitPlan<'_>, new_pid: bool) -> Result<i32, LinuxError> {
    let mut stack = vec![0u8; 1024 * 1024];
    let mut flags = nix::sched::CloneFlags::CLONE_NEWNS;
    if new_pid {
        flags |= nix::sched::CloneFlags::CLONE_NEWPID;
    }
    let cb = Box::new(|| -> isize {
        let err = match run(plan) {
            Ok(never) => match never {},
            Err(e) => e,
        };
        // Before "ready" the monitor reads this; after it, stderr is the
        // container's log, where kubelet users will look.
        eprintln!("berth init: {err}");
        let msg = format!("E{err}");
        let _ = nix::unistd::write(
            // SAFETY: the sync fd is open for the whole life of the init.
            unsafe { std::os::fd::BorrowedFd::borrow_raw(plan.sync) },
            msg.as_bytes(),
        );
        1
    });
    // SAFETY: the monitor calling this is single-threaded, so the child (a
    // copy of it, no CLONE_VM) may run ordinary Rust code. The stack buffer
    // outlives the call in the parent; the child has its own copy.
    let pid = unsafe { nix::sched::clone(cb, &mut stack, flags, Some(libc::SIGCHLD)) }
        .map_err(sys("clone container init", "monitor"))?;
    Ok(pid.as_raw())
}

enum Never {}

fn run(p: &InitPlan<'_>) -> Result<Never, String> {
    // If the monitor dies (killed during recovery of a half-made container),
    // the init must not linger without anyone to report its exit.
    let monitor = nix::unistd::getppid();
    // Until the workload's exec (which resets it), no process of the
    // container may ptrace this one or open its /proc files (exe, fds, mem).
    nix::sys::prctl::set_dumpable(false).map_err(|e| format!("make the init non-dumpable: {e}"))?;
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
        .map_err(|e| format!("set parent-death signal: {e}"))?;
    if nix::unistd::getppid() != monitor {
        return Err("the monitor exited".into());
    }
    let spec = p.spec;
    if let Some(cg) = p.cgroup {
        std::fs::write(cg.join("cgroup.procs"), "0")
            .map_err(|e| format!("enter cgroup {}: {e}", cg.display()))?;
        let wants_cgroupns = spec.linux().as_ref().is_some_and(|l| {
            l.namespaces().as_deref().unwrap_or(&[]).iter().any(|n| {
                n.typ() == oci_spec::runtime::LinuxNamespaceType::Cgroup && n.path().is_none()
            })
        });
        if wants_cgroupns {
            // Unshared after entering: the container's cgroup is its root.
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWCGROUP)
                .map_err(|e| format!("new cgroup namespace: {e}"))?;
        }
    }
    let root = spec
        .root()
        .as_ref()
        .map(|r| r.path().clone())
        .ok_or("spec has no root")?;
    let process = spec.process().as_ref().ok_or("spec has no process")?;
    let linux = spec.linux().as_ref();
    // Prepared (seccomp compiled) before any work, so a bad profile fails early.
    let identity = Identity::from_process(process, linux.and_then(|l| l.seccomp().as_ref()))?;
    set_root_propagation(
        linux
            .and_then(|l| l.rootfs_propagation().as_deref())
            .unwrap_or("rslave"),
        &root,
    )?;

    // The pod's user namespace: every mount is made from the host's (this
    // mount namespace belongs to it, so the container's root can change no
    // mount), and the init joins the pod's just before becoming the
    // container's user.
    let userns = UserNs::of(spec)?;

    // The overlay rootfs exists only in this mount namespace: when the
    // container's last process exits, it goes away with it.
    let lowers = match &userns {
        None => {
            chdir(p.layers_dir).map_err(|e| format!("chdir {}: {e}", p.layers_dir.display()))?;
            p.lowers.join(":")
        }
        Some(u) => u.stage_layers(p)?,
    };
    let data = format!(
        "lowerdir={lowers},upperdir={},workdir={}",
        p.upper.display(),
        p.work.display()
    );
    mount(
        Some("overlay"),
        &root,
        Some("overlay"),
        MsFlags::empty(),
        Some(data.as_str()),
    )
    .map_err(|e| format!("mount overlay rootfs at {}: {e}", root.display()))?;
    // Every mount target below is resolved from this fd, never by path.
    let rootfd: OwnedFd = open(
        &root,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| format!("open rootfs {}: {e}", root.display()))?;
    let rootfd = rootfd.as_fd();

    for m in spec.mounts().as_deref().unwrap_or(&[]) {
        mount_one(rootfd, m, userns.as_ref()).map_err(|e| {
            format!(
                "mount {} on {}: {e}",
                m.source()
                    .as_ref()
                    .map(|s| s.display().to_string())
                    .unwrap_or_default(),
                m.destination().display()
            )
        })?;
    }
    make_devices(rootfd)?;
    for d in linux.and_then(|l| l.devices().as_deref()).unwrap_or(&[]) {
        make_device(rootfd, d, userns.as_ref())
            .map_err(|e| format!("create device {}: {e}", d.path().display()))?;
    }
    if let Some(linux) = linux {
        for path in linux.masked_paths().as_deref().unwrap_or(&[]) {
            mask(rootfd, path).map_err(|e| format!("mask {path}: {e}"))?;
        }
        for path in linux.readonly_paths().as_deref().unwrap_or(&[]) {
            readonly(rootfd, path).map_err(|e| format!("make {path} read-only: {e}"))?;
        }
    }
    let fifo: OwnedFd = open(p.fifo, OFlag::O_PATH | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(|e| format!("open exec fifo {}: {e}", p.fifo.display()))?;

    // A handle on the old root: after pivot_root, "." and "/" both name
    // the new one.
    let old_root: OwnedFd = open(
        "/",
        OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| format!("open the old root: {e}"))?;
    nix::unistd::fchdir(rootfd).map_err(|e| format!("chdir rootfs: {e}"))?;
    pivot_root(".", ".").map_err(|e| format!("pivot_root: {e}"))?;
    nix::unistd::fchdir(&old_root).map_err(|e| format!("fchdir old root: {e}"))?;
    drop(old_root);
    // The old root may hold mounts shared with the host: detaching them must
    // not propagate there.
    mount(
        None::<&str>,
        ".",
        None::<&str>,
        MsFlags::MS_SLAVE | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| format!("make the old root a slave: {e}"))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(|e| format!("detach old root: {e}"))?;
    chdir("/").map_err(|e| format!("chdir /: {e}"))?;

    // Opened here, from the container's own devpts, so that the terminal's
    // name resolves inside the container (ttyname, /dev/tty).
    let pty_slave = match p.console {
        Some(console) => Some(open_console(console, process.user(), userns.as_ref())?),
        None => None,
    };
    let cwd = process.cwd();
    std::fs::create_dir_all(cwd).map_err(|e| format!("working dir {}: {e}", cwd.display()))?;
    chdir(cwd).map_err(|e| format!("chdir {}: {e}", cwd.display()))?;
    // After the working directory exists.
    if spec
        .root()
        .as_ref()
        .and_then(|r| r.readonly())
        .unwrap_or(false)
    {
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY,
            None::<&str>,
        )
        .map_err(|e| format!("make the root read-only: {e}"))?;
    }
    let args = process.args().clone().unwrap_or_default();
    let env = process.env().clone().unwrap_or_default();
    let start_error =
        resolve_executable(args.first().map(String::as_str).unwrap_or(""), &env).err();
    if let Some(u) = &userns {
        // Last: from here on no capability reaches beyond the pod's namespaces.
        nix::sched::setns(&u.fd, nix::sched::CloneFlags::CLONE_NEWUSER)
            .map_err(|e| format!("join the pod's user namespace: {e}"))?;
    }

    identity.enter().map_err(|(step, e)| {
        format!(
            "{} (uid {}, gid {}): {}",
            step.name(),
            identity.uid,
            identity.gid,
            nix::errno::Errno::from_raw(e)
        )
    })?;

    let devnull = open(
        "/dev/null",
        OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| format!("open /dev/null: {e}"))?;
    let stdio = match &pty_slave {
        Some(s) => [s.as_raw_fd(); 3],
        None => [p.stdin.unwrap_or(devnull.as_raw_fd()), p.stdout, p.stderr],
    };
    for (to, from) in stdio.into_iter().enumerate() {
        // SAFETY: dup2 onto the standard fds of this process; all sources are open.
        if unsafe { libc::dup2(from, to as RawFd) } < 0 {
            return Err(format!("set up stdio: {}", std::io::Error::last_os_error()));
        }
    }
    if pty_slave.is_some() {
        nix::unistd::setsid().map_err(|e| format!("setsid: {e}"))?;
        // SAFETY: TIOCSCTTY takes an int argument; fd 0 is the pty slave.
        if unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) } < 0 {
            return Err(format!(
                "make the pty the controlling terminal: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    drop(pty_slave);
    let ready = match &start_error {
        None => "R".to_string(),
        Some(e) => format!("W{e}"),
    };
    // SAFETY: the sync fd stays open until this write; nothing else owns it.
    let sync = unsafe { std::os::fd::BorrowedFd::borrow_raw(p.sync) };
    nix::unistd::write(sync, ready.as_bytes()).map_err(|e| format!("report ready: {e}"))?;
    nix::unistd::close(p.sync).ok();

    // Blocks until StartContainer opens the fifo for reading.
    let path = format!("/proc/self/fd/{}", fifo.as_raw_fd());
    let mut w = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .map_err(|e| format!("open exec fifo: {e}"))?;
    let _ = w.write_all(b"0");
    drop(w);
    drop(fifo);

    let exe = match resolve_executable(&args[0], &env) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(127);
        }
    };
    let c = |s: &str| CString::new(s).unwrap_or_default();
    let argv: Vec<CString> = args.iter().map(|a| c(a)).collect();
    let envp: Vec<CString> = env.iter().map(|e| c(e)).collect();
    let exe = c(&exe.to_string_lossy());
    // Only stdio reaches the workload: whatever else this process holds
    // (inherited from the monitor or opened here) closes on exec.
    super::exec::close_fds_except(&mut [], libc::CLOSE_RANGE_CLOEXEC);
    if let Err((step, e)) = identity.seal() {
        eprintln!(
            "berth init: {}: {}",
            step.name(),
            nix::errno::Errno::from_raw(e)
        );
        std::process::exit(126);
    }
    let err = nix::unistd::execve(&exe, &argv, &envp).unwrap_err();
    eprintln!("exec {:?}: {err}", args[0]);
    std::process::exit(if err == nix::errno::Errno::ENOENT {
        127
    } else {
        126
    });
}

/// `args[0]` as the kernel should exec it, looked up in the container's PATH.
fn resolve_executable(arg0: &str, env: &[String]) -> Result<PathBuf, String> {
    use std::os::unix::fs::PermissionsExt;
    if arg0.is_empty() {
        return Err("no command given".into());
    }
    let is_exe = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if arg0.contains('/') {
        return if is_exe(Path::new(arg0)) {
            Ok(PathBuf::from(arg0))
        } else {
            Err(format!("exec: {arg0:?}: no such executable file"))
        };
    }
    let path = env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    path.split(':')
        .map(|d| Path::new(d).join(arg0))
        .find(|p| is_exe(p))
        .ok_or_else(|| format!("exec: {arg0:?}: executable file not found in $PATH"))
}

fn flags_and_data(options: &[String]) -> (MsFlags, Vec<String>, Option<MsFlags>) {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    let mut propagation = None;
    for o in options {
        match o.as_str() {
            "ro" => flags |= MsFlags::MS_RDONLY,
            "rw" => {}
            "nosuid" => flags |= MsFlags::MS_NOSUID,
            "nodev" => flags |= MsFlags::MS_NODEV,
            "noexec" => flags |= MsFlags::MS_NOEXEC,
            "strictatime" => flags |= MsFlags::MS_STRICTATIME,
            "relatime" => flags |= MsFlags::MS_RELATIME,
            "noatime" => flags |= MsFlags::MS_NOATIME,
            "bind" => flags |= MsFlags::MS_BIND,
            "rbind" => flags |= MsFlags::MS_BIND | MsFlags::MS_REC,
            "private" => propagation = Some(MsFlags::MS_PRIVATE),
            "rprivate" => propagation = Some(MsFlags::MS_PRIVATE | MsFlags::MS_REC),
            "slave" => propagation = Some(MsFlags::MS_SLAVE),
            "rslave" => propagation = Some(MsFlags::MS_SLAVE | MsFlags::MS_REC),
            "shared" => propagation = Some(MsFlags::MS_SHARED),
            "rshared" => propagation = Some(MsFlags::MS_SHARED | MsFlags::MS_REC),
            // Handled by the caller (an idmapped clone with the pod's
            // mappings; mount_setattr after the mount).
            "rro" | "idmap" => {}
            // mount(2) data is comma-separated, and specs (ours included)
            // may carry several filesystem options in one string; fsconfig
            // takes them one by one.
            other => data.extend(other.split(',').filter(|s| !s.is_empty()).map(String::from)),
        }
    }
    (flags, data, propagation)
}

/// The MOUNT_ATTR_* equivalent of mount(2) flags.
fn mount_attrs(flags: MsFlags) -> MountAttrFlags {
    let mut a = MountAttrFlags::empty();
    for (ms, attr) in [
        (MsFlags::MS_RDONLY, MountAttrFlags::MOUNT_ATTR_RDONLY),
        (MsFlags::MS_NOSUID, MountAttrFlags::MOUNT_ATTR_NOSUID),
        (MsFlags::MS_NODEV, MountAttrFlags::MOUNT_ATTR_NODEV),
        (MsFlags::MS_NOEXEC, MountAttrFlags::MOUNT_ATTR_NOEXEC),
        (
            MsFlags::MS_STRICTATIME,
            MountAttrFlags::MOUNT_ATTR_STRICTATIME,
        ),
        (MsFlags::MS_NOATIME, MountAttrFlags::MOUNT_ATTR_NOATIME),
    ] {
        if flags.contains(ms) {
            a |= attr;
        }
    }
    a
}

fn mount_one(
    root: BorrowedFd<'_>,
    m: &oci_spec::runtime::Mount,
    userns: Option<&UserNs>,
) -> Result<(), String> {
    let options = m.options().clone().unwrap_or_default();
    let (flags, data, propagation) = flags_and_data(&options);
    let typ = m.typ().clone().unwrap_or_default();
    let source = m.source().clone().unwrap_or_default();
    let attrs = mount_attrs(flags);
    let is_bind = flags.contains(MsFlags::MS_BIND) || typ == "bind";
    let (tree, create) = if is_bind {
        let meta = std::fs::metadata(&source).map_err(|e| format!("source: {e}"))?;
        let rec = flags.contains(MsFlags::MS_REC);
        let tree = if options.iter().any(|o| o == "idmap") {
            let u = userns.ok_or("an idmapped mount needs the pod's user namespace")?;
            super::idmap::idmapped_tree(&source, u.fd.as_fd(), rec)
                .map_err(|e| format!("idmapped clone of the source: {e}"))?
        } else {
            mountfd::clone_tree(&source, rec).map_err(|e| format!("clone source: {e}"))?
        };
        // Flags of a bind apply to its top mount (as a remount would);
        // "rro" extends read-only to the mounts below.
        mountfd::set_attrs(&tree, attrs, false).map_err(|e| format!("set flags: {e}"))?;
        let create = if meta.is_dir() {
            Create::Dir
        } else {
            Create::File
        };
        (tree, create)
    } else {
        let tree = mountfd::new_fs(&typ, &source.to_string_lossy(), &data, attrs)
            .map_err(|e| format!("new {typ} filesystem: {e}"))?;
        (tree, Create::Dir)
    };
    if let Some(p) = propagation {
        let rec = p.contains(MsFlags::MS_REC);
        mountfd::set_propagation(&tree, (p - MsFlags::MS_REC).bits(), rec)
            .map_err(|e| format!("propagation: {e}"))?;
    }
    if options.iter().any(|o| o == "rro") {
        mountfd::set_attrs(&tree, MountAttrFlags::MOUNT_ATTR_RDONLY, true)
            .map_err(|e| format!("recursive read-only: {e}"))?;
    }
    let target = open_in_root(root, m.destination(), create)
        .map_err(|e| format!("resolve the target in the rootfs: {e}"))?;
    mountfd::attach(&tree, &target).map_err(|e| e.to_string())
}

/// The rootfs propagation: "rslave" (default: host mounts reach the
/// container, nothing flows back), "rprivate", or "rshared" (a bidirectional
/// CRI mount: mounts keep the propagation they have in berth's namespace, so
/// a shared source stays a peer). In every case the mount holding the rootfs
/// is made private, so the overlay and everything mounted in it stay here.
fn set_root_propagation(mode: &str, root: &Path) -> Result<(), String> {
    let (target, flags) = match mode {
        "rprivate" | "private" => ("/", MsFlags::MS_PRIVATE | MsFlags::MS_REC),
        "rshared" | "shared" => ("/", MsFlags::MS_SLAVE),
        _ => ("/", MsFlags::MS_SLAVE | MsFlags::MS_REC),
    };
    mount(None::<&str>, target, None::<&str>, flags, None::<&str>)
        .map_err(|e| format!("set root propagation {mode}: {e}"))?;
    let parent = super::mountattr::mount_point_of(root)
        .map_err(|e| format!("find the mount of {}: {e}", root.display()))?;
    mount(
        None::<&str>,
        &parent,
        None::<&str>,
        MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| format!("make {} private: {e}", parent.display()))
}

/// The parent directory (resolved in the rootfs, created if missing) and
/// the file name of `path`.
fn parent_in_root<'a>(
    root: BorrowedFd<'_>,
    path: &'a Path,
) -> Result<(OwnedFd, &'a std::ffi::OsStr), String> {
    let name = path
        .file_name()
        .ok_or_else(|| format!("{} names no file", path.display()))?;
    let parent = path.parent().unwrap_or(Path::new("/"));
    let dir = open_in_root(root, parent, Create::Dir)
        .map_err(|e| format!("resolve {} in the rootfs: {e}", parent.display()))?;
    Ok((dir, name))
}

/// A device node of the spec, created with the host device's numbers (by
/// the init while still in the host's user namespace, so no bind is needed;
/// its owner is the pod's id for it).
fn make_device(
    root: BorrowedFd<'_>,
    d: &oci_spec::runtime::LinuxDevice,
    userns: Option<&UserNs>,
) -> Result<(), String> {
    use oci_spec::runtime::LinuxDeviceType as T;
    use rustix::fs::{AtFlags, FileType};
    match open_in_root(root, d.path(), Create::Nothing) {
        // Already there (the standard nodes are bound from the host's).
        Ok(_) => return Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
        Err(e) => return Err(format!("resolve in the rootfs: {e}")),
    }
    let (dir, name) = parent_in_root(root, d.path())?;
    let kind = match d.typ() {
        T::B => FileType::BlockDevice,
        T::P => FileType::Fifo,
        _ => FileType::CharacterDevice,
    };
    let mode = rustix::fs::Mode::from_raw_mode(d.file_mode().unwrap_or(0o666) & 0o7777);
    let dev = rustix::fs::makedev(d.major() as u32, d.minor() as u32);
    rustix::fs::mknodat(&dir, name, kind, mode, dev).map_err(|e| format!("mknod: {e}"))?;
    // mknod applies the umask; the node must have the mode asked for.
    // AT_SYMLINK_NOFOLLOW: the name was just created as a node, and a swap
    // for a symlink must not redirect the chmod/chown.
    let node = rustix::fs::openat(
        &dir,
        name,
        rustix::fs::OFlags::PATH | rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map_err(|e| format!("open the new node: {e}"))?;
    rustix::fs::chmodat(&node, "", mode, AtFlags::EMPTY_PATH)
        .or_else(|_| {
            // Kernels without fchmodat2 (< 6.6): through the fd's proc link,
            // which names the node itself.
            rustix::fs::chmod(format!("/proc/self/fd/{}", node.as_raw_fd()), mode)
        })
        .map_err(|e| format!("chmod: {e}"))?;
    let (uid, gid) = match userns {
        None => (d.uid(), d.gid()),
        Some(u) => (
            Some(u.host_uid(d.uid().unwrap_or(0))?),
            Some(u.host_gid(d.gid().unwrap_or(0))?),
        ),
    };
    rustix::fs::chownat(
        &node,
        "",
        uid.map(rustix::fs::Uid::from_raw),
        gid.map(rustix::fs::Gid::from_raw),
        AtFlags::EMPTY_PATH,
    )
    .map_err(|e| format!("chown: {e}"))
}

fn make_devices(root: BorrowedFd<'_>) -> Result<(), String> {
    for name in ["null", "zero", "full", "random", "urandom", "tty"] {
        let dest = Path::new("/dev").join(name);
        let target = open_in_root(root, &dest, Create::File)
            .map_err(|e| format!("create /dev/{name}: {e}"))?;
        mountfd::clone_tree(&dest, false)
            .and_then(|tree| mountfd::attach(&tree, &target))
            .map_err(|e| format!("bind /dev/{name}: {e}"))?;
    }
    let dev = open_in_root(root, Path::new("/dev"), Create::Dir)
        .map_err(|e| format!("resolve /dev in the rootfs: {e}"))?;
    for (link, to) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("ptmx", "pts/ptmx"),
        ("core", "/proc/kcore"),
    ] {
        let _ = rustix::fs::symlinkat(to, &dev, link);
    }
    Ok(())
}

/// The target of a masked or read-only path, `None` when the image has no
/// such path.
fn existing(root: BorrowedFd<'_>, path: &str) -> Result<Option<OwnedFd>, String> {
    match open_in_root(root, Path::new(path), Create::Nothing) {
        Ok(fd) => Ok(Some(fd)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(format!("resolve in the rootfs: {e}")),
    }
}

fn mask(root: BorrowedFd<'_>, path: &str) -> Result<(), String> {
    let Some(target) = existing(root, path)? else {
        return Ok(());
    };
    let tree = if resolve::is_dir(&target).map_err(|e| e.to_string())? {
        mountfd::new_fs("tmpfs", "tmpfs", &[], MountAttrFlags::MOUNT_ATTR_RDONLY)
    } else {
        mountfd::clone_tree(Path::new("/dev/null"), false)
    }
    .map_err(|e| e.to_string())?;
    mountfd::attach(&tree, &target).map_err(|e| e.to_string())
}

fn readonly(root: BorrowedFd<'_>, path: &str) -> Result<(), String> {
    let Some(target) = existing(root, path)? else {
        return Ok(());
    };
    let tree = mountfd::clone_tree_at(target.as_fd()).map_err(|e| e.to_string())?;
    mountfd::set_attrs(
        &tree,
        MountAttrFlags::MOUNT_ATTR_RDONLY
            | MountAttrFlags::MOUNT_ATTR_NOSUID
            | MountAttrFlags::MOUNT_ATTR_NODEV
            | MountAttrFlags::MOUNT_ATTR_NOEXEC,
        false,
    )
    .map_err(|e| e.to_string())?;
    mountfd::attach(&tree, &target).map_err(|e| e.to_string())
}

/// Joins the namespace at `path` (a /proc/<pid>/ns/* file or a pin).
pub fn join_namespace(path: &Path, kind: nix::sched::CloneFlags) -> Result<(), LinuxError> {
    let f = std::fs::File::open(path).map_err(sys("open namespace", path.display()))?;
    nix::sched::setns(&f, kind).map_err(sys("join namespace", path.display()))
}

/// Opens a new pty in the container's /dev/ptmx, hands its master to the
/// monitor over `console` and returns the slave, owned by the container's
/// user so that it can reopen its terminal.
fn open_console(
    console: RawFd,
    user: &oci_spec::runtime::User,
    userns: Option<&UserNs>,
) -> Result<OwnedFd, String> {
    use nix::pty::{grantpt, posix_openpt, ptsname_r, unlockpt};
    let master = posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)
        .map_err(|e| format!("open /dev/ptmx: {e}"))?;
    grantpt(&master).map_err(|e| format!("grantpt: {e}"))?;
    unlockpt(&master).map_err(|e| format!("unlockpt: {e}"))?;
    let name = ptsname_r(&master).map_err(|e| format!("ptsname: {e}"))?;
    let slave = open(
        name.as_str(),
        OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| format!("open {name}: {e}"))?;
    let (uid, gid) = match userns {
        None => (user.uid(), user.gid()),
        Some(u) => (u.host_uid(user.uid())?, u.host_gid(user.gid())?),
    };
    nix::unistd::fchown(
        &slave,
        Some(nix::unistd::Uid::from_raw(uid)),
        Some(nix::unistd::Gid::from_raw(gid)),
    )
    .map_err(|e| format!("chown {name}: {e}"))?;
    // SAFETY: the console socket stays open for the whole setup.
    let sock = unsafe { std::os::fd::BorrowedFd::borrow_raw(console) };
    super::fdpass::send(sock, b"pty", &[master.as_fd()]).map_err(|e| e.to_string())?;
    nix::unistd::close(console).ok();
    Ok(slave)
}

/// The pod's user namespace as the init uses it.
struct UserNs {
    fd: std::fs::File,
    uids: Vec<oci_spec::runtime::LinuxIdMapping>,
    gids: Vec<oci_spec::runtime::LinuxIdMapping>,
}

impl UserNs {
    fn of(spec: &Spec) -> Result<Option<UserNs>, String> {
        let Some(linux) = spec.linux() else {
            return Ok(None);
        };
        let Some(path) = linux
            .namespaces()
            .as_deref()
            .unwrap_or(&[])
            .iter()
            .find(|n| n.typ() == oci_spec::runtime::LinuxNamespaceType::User)
            .and_then(|n| n.path().clone())
        else {
            return Ok(None);
        };
        let fd = std::fs::File::open(&path)
            .map_err(|e| format!("open user namespace {}: {e}", path.display()))?;
        Ok(Some(UserNs {
            fd,
            uids: linux.uid_mappings().clone().unwrap_or_default(),
            gids: linux.gid_mappings().clone().unwrap_or_default(),
        }))
    }

    fn to_host(
        map: &[oci_spec::runtime::LinuxIdMapping],
        id: u32,
        kind: &str,
    ) -> Result<u32, String> {
        map.iter()
            .find(|m| {
                id >= m.container_id() && (id as u64) < m.container_id() as u64 + m.size() as u64
            })
            .map(|m| m.host_id() + (id - m.container_id()))
            .ok_or_else(|| format!("{kind} {id} is not mapped in the pod's user namespace"))
    }

    fn host_uid(&self, id: u32) -> Result<u32, String> {
        Self::to_host(&self.uids, id, "uid")
    }

    fn host_gid(&self, id: u32) -> Result<u32, String> {
        Self::to_host(&self.gids, id, "gid")
    }

    /// Idmapped clones of the image layers, mounted (in this mount
    /// namespace only) under the container's directory; returns the
    /// overlay lowerdir for them, relative to the working directory this
    /// leaves. Layers owned by root on disk are owned by the pod's root in
    /// the container; nothing is copied or chowned. The upper dir stays
    /// plain: what the container writes belongs to its mapped ids on the
    /// host, and its root directory to the pod's root.
    fn stage_layers(&self, p: &InitPlan<'_>) -> Result<String, String> {
        let uid = self.host_uid(0)?;
        let gid = self.host_gid(0)?;
        nix::unistd::chown(
            p.upper,
            Some(nix::unistd::Uid::from_raw(uid)),
            Some(nix::unistd::Gid::from_raw(gid)),
        )
        .map_err(|e| format!("chown {}: {e}", p.upper.display()))?;
        let staging = p
            .upper
            .parent()
            .ok_or("the upper dir has no parent")?
            .join("idmapped-layers");
        let mut names = Vec::with_capacity(p.lowers.len());
        for (i, lower) in p.lowers.iter().enumerate() {
            let target = staging.join(i.to_string());
            std::fs::create_dir_all(&target)
                .map_err(|e| format!("create {}: {e}", target.display()))?;
            super::idmap::bind_idmapped(&p.layers_dir.join(lower), &target, self.fd.as_fd(), false)
                .map_err(|e| format!("idmapped mount of layer {lower}: {e}"))?;
            names.push(i.to_string());
        }
        chdir(&staging).map_err(|e| format!("chdir {}: {e}", staging.display()))?;
        Ok(names.join(":"))
    }
}
