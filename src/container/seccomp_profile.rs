//! Seccomp profiles as OCI `linux.seccomp` JSON: berth's RuntimeDefault
//! allowlist, and Localhost profile files (OCI or docker format).

use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::path::Path;

/// Allowed for every container: what ordinary programs need. Not here (so
/// denied with EPERM): kernel keyrings, kexec, modules, swap, mounts and
/// namespaces, clock setting, reboot, bpf/perf, userfaultfd, handle-based
/// open... unless a capability below grants them.
const ALLOWED: &[&str] = &[
    "accept",
    "accept4",
    "access",
    "adjtimex",
    "alarm",
    "arch_prctl",
    "bind",
    "brk",
    "cachestat",
    "capget",
    "capset",
    "chdir",
    "chmod",
    "chown",
    "chown32",
    "clock_adjtime",
    "clock_adjtime64",
    "clock_getres",
    "clock_getres_time64",
    "clock_gettime",
    "clock_gettime64",
    "clock_nanosleep",
    "clock_nanosleep_time64",
    "close",
    "close_range",
    "connect",
    "copy_file_range",
    "creat",
    "dup",
    "dup2",
    "dup3",
    "epoll_create",
    "epoll_create1",
    "epoll_ctl",
    "epoll_ctl_old",
    "epoll_pwait",
    "epoll_pwait2",
    "epoll_wait",
    "epoll_wait_old",
    "eventfd",
    "eventfd2",
    "execve",
    "execveat",
    "exit",
    "exit_group",
    "faccessat",
    "faccessat2",
    "fadvise64",
    "fadvise64_64",
    "fallocate",
    "fanotify_mark",
    "fchdir",
    "fchmod",
    "fchmodat",
    "fchmodat2",
    "fchown",
    "fchown32",
    "fchownat",
    "fcntl",
    "fcntl64",
    "fdatasync",
    "fgetxattr",
    "flistxattr",
    "flock",
    "fork",
    "fremovexattr",
    "fsetxattr",
    "fstat",
    "fstat64",
    "fstatat64",
    "fstatfs",
    "fstatfs64",
    "fsync",
    "ftruncate",
    "ftruncate64",
    "futex",
    "futex_requeue",
    "futex_time64",
    "futex_wait",
    "futex_waitv",
    "futex_wake",
    "futimesat",
    "getcpu",
    "getcwd",
    "getdents",
    "getdents64",
    "getegid",
    "getegid32",
    "geteuid",
    "geteuid32",
    "getgid",
    "getgid32",
    "getgroups",
    "getgroups32",
    "getitimer",
    "getpeername",
    "getpgid",
    "getpgrp",
    "getpid",
    "getppid",
    "getpriority",
    "getrandom",
    "getresgid",
    "getresgid32",
    "getresuid",
    "getresuid32",
    "getrlimit",
    "get_robust_list",
    "getrusage",
    "getsid",
    "getsockname",
    "getsockopt",
    "get_thread_area",
    "gettid",
    "gettimeofday",
    "getuid",
    "getuid32",
    "getxattr",
    "getxattrat",
    "inotify_add_watch",
    "inotify_init",
    "inotify_init1",
    "inotify_rm_watch",
    "io_cancel",
    "ioctl",
    "io_destroy",
    "io_getevents",
    "io_pgetevents",
    "io_pgetevents_time64",
    "ioprio_get",
    "ioprio_set",
    "io_setup",
    "io_submit",
    "ipc",
    "kill",
    "landlock_add_rule",
    "landlock_create_ruleset",
    "landlock_restrict_self",
    "lchown",
    "lchown32",
    "lgetxattr",
    "link",
    "linkat",
    "listen",
    "listmount",
    "listxattr",
    "listxattrat",
    "llistxattr",
    "_llseek",
    "lremovexattr",
    "lseek",
    "lsetxattr",
    "lstat",
    "lstat64",
    "madvise",
    "map_shadow_stack",
    "membarrier",
    "memfd_create",
    "memfd_secret",
    "mincore",
    "mkdir",
    "mkdirat",
    "mknod",
    "mknodat",
    "mlock",
    "mlock2",
    "mlockall",
    "mmap",
    "mmap2",
    "mprotect",
    "mq_getsetattr",
    "mq_notify",
    "mq_open",
    "mq_timedreceive",
    "mq_timedreceive_time64",
    "mq_timedsend",
    "mq_timedsend_time64",
    "mq_unlink",
    "mremap",
    "mseal",
    "msgctl",
    "msgget",
    "msgrcv",
    "msgsnd",
    "msync",
    "munlock",
    "munlockall",
    "munmap",
    "name_to_handle_at",
    "nanosleep",
    "newfstatat",
    "_newselect",
    "open",
    "openat",
    "openat2",
    "pause",
    "pidfd_open",
    "pidfd_send_signal",
    "pipe",
    "pipe2",
    "pkey_alloc",
    "pkey_free",
    "pkey_mprotect",
    "poll",
    "ppoll",
    "ppoll_time64",
    "prctl",
    "pread64",
    "preadv",
    "preadv2",
    "prlimit64",
    "process_mrelease",
    "pselect6",
    "pselect6_time64",
    "pwrite64",
    "pwritev",
    "pwritev2",
    "read",
    "readahead",
    "readlink",
    "readlinkat",
    "readv",
    "recv",
    "recvfrom",
    "recvmmsg",
    "recvmmsg_time64",
    "recvmsg",
    "remap_file_pages",
    "removexattr",
    "removexattrat",
    "rename",
    "renameat",
    "renameat2",
    "restart_syscall",
    "rmdir",
    "rseq",
    "rt_sigaction",
    "rt_sigpending",
    "rt_sigprocmask",
    "rt_sigqueueinfo",
    "rt_sigreturn",
    "rt_sigsuspend",
    "rt_sigtimedwait",
    "rt_sigtimedwait_time64",
    "rt_tgsigqueueinfo",
    "sched_getaffinity",
    "sched_getattr",
    "sched_getparam",
    "sched_get_priority_max",
    "sched_get_priority_min",
    "sched_getscheduler",
    "sched_rr_get_interval",
    "sched_rr_get_interval_time64",
    "sched_setaffinity",
    "sched_setattr",
    "sched_setparam",
    "sched_setscheduler",
    "sched_yield",
    "seccomp",
    "select",
    "semctl",
    "semget",
    "semop",
    "semtimedop",
    "semtimedop_time64",
    "send",
    "sendfile",
    "sendfile64",
    "sendmmsg",
    "sendmsg",
    "sendto",
    "setfsgid",
    "setfsgid32",
    "setfsuid",
    "setfsuid32",
    "setgid",
    "setgid32",
    "setgroups",
    "setgroups32",
    "setitimer",
    "setpgid",
    "setpriority",
    "setregid",
    "setregid32",
    "setresgid",
    "setresgid32",
    "setresuid",
    "setresuid32",
    "setreuid",
    "setreuid32",
    "setrlimit",
    "set_robust_list",
    "setsid",
    "setsockopt",
    "set_thread_area",
    "set_tid_address",
    "setuid",
    "setuid32",
    "setxattr",
    "setxattrat",
    "shmat",
    "shmctl",
    "shmdt",
    "shmget",
    "shutdown",
    "sigaltstack",
    "signalfd",
    "signalfd4",
    "sigprocmask",
    "sigreturn",
    "socketcall",
    "socketpair",
    "splice",
    "stat",
    "stat64",
    "statfs",
    "statfs64",
    "statmount",
    "statx",
    "symlink",
    "symlinkat",
    "sync",
    "sync_file_range",
    "syncfs",
    "sysinfo",
    "tee",
    "tgkill",
    "time",
    "timer_create",
    "timer_delete",
    "timer_getoverrun",
    "timer_gettime",
    "timer_gettime64",
    "timer_settime",
    "timer_settime64",
    "timerfd_create",
    "timerfd_gettime",
    "timerfd_gettime64",
    "timerfd_settime",
    "timerfd_settime64",
    "times",
    "tkill",
    "truncate",
    "truncate64",
    "ugetrlimit",
    "umask",
    "uname",
    "unlink",
    "unlinkat",
    "uretprobe",
    "utime",
    "utimensat",
    "utimensat_time64",
    "utimes",
    "vfork",
    "vmsplice",
    "wait4",
    "waitid",
    "waitpid",
    "write",
    "writev",
];

/// Allowed only with the capability (number) that governs them.
const BY_CAPABILITY: &[(u32, &[&str])] = &[
    (2, &["open_by_handle_at"]), // DAC_READ_SEARCH
    (
        21, // SYS_ADMIN
        &[
            "bpf",
            "clone",
            "clone3",
            "fanotify_init",
            "fsconfig",
            "fsmount",
            "fsopen",
            "fspick",
            "lookup_dcookie",
            "mount",
            "mount_setattr",
            "move_mount",
            "open_tree",
            "perf_event_open",
            "pivot_root",
            "quotactl",
            "quotactl_fd",
            "setdomainname",
            "sethostname",
            "setns",
            "syslog",
            "umount",
            "umount2",
            "unshare",
        ],
    ),
    (22, &["reboot"]),                                       // SYS_BOOT
    (18, &["chroot"]),                                       // SYS_CHROOT
    (16, &["delete_module", "init_module", "finit_module"]), // SYS_MODULE
    (20, &["acct"]),                                         // SYS_PACCT
    (
        19, // SYS_PTRACE
        &[
            "kcmp",
            "pidfd_getfd",
            "process_madvise",
            "process_vm_readv",
            "process_vm_writev",
            "ptrace",
        ],
    ),
    (17, &["iopl", "ioperm"]), // SYS_RAWIO
    (
        25,
        &["settimeofday", "stime", "clock_settime", "clock_settime64"],
    ), // SYS_TIME
    (26, &["vhangup"]),        // SYS_TTY_CONFIG
    (
        23,
        &[
            "get_mempolicy",
            "mbind",
            "set_mempolicy",
            "set_mempolicy_home_node",
        ],
    ), // SYS_NICE
    (34, &["syslog"]),         // SYSLOG
    (39, &["bpf"]),            // BPF
    (38, &["perf_event_open"]), // PERFMON
];

/// The namespace flags clone(2) may not use without CAP_SYS_ADMIN.
const CLONE_NS_FLAGS: u64 = 0x7E02_0000;

/// berth's RuntimeDefault profile for a container with capabilities `caps`.
pub fn runtime_default(caps: &BTreeSet<u32>) -> Value {
    let mut allowed: Vec<&str> = ALLOWED.to_vec();
    for (cap, names) in BY_CAPABILITY {
        if caps.contains(cap) {
            allowed.extend_from_slice(names);
        }
    }
    allowed.sort_unstable();
    allowed.dedup();
    let mut syscalls = vec![json!({"names": allowed, "action": "SCMP_ACT_ALLOW"})];
    // Sockets of every family but AF_VSOCK (host communication).
    syscalls.push(json!({"names": ["socket"], "action": "SCMP_ACT_ALLOW",
        "args": [{"index": 0, "value": 40, "op": "SCMP_CMP_NE"}]}));
    // The personalities programs use (Linux, 32-bit emulation, and query).
    for p in [0u64, 8, 0x20000, 0x20008, 0xffff_ffff] {
        syscalls.push(json!({"names": ["personality"], "action": "SCMP_ACT_ALLOW",
            "args": [{"index": 0, "value": p, "op": "SCMP_CMP_EQ"}]}));
    }
    if !caps.contains(&21) {
        // clone without namespace flags; clone3's flags are in memory the
        // filter cannot read, so it answers ENOSYS and libc falls back.
        syscalls.push(json!({"names": ["clone"], "action": "SCMP_ACT_ALLOW",
            "args": [{"index": 0, "value": CLONE_NS_FLAGS, "valueTwo": 0,
                      "op": "SCMP_CMP_MASKED_EQ"}]}));
        syscalls.push(json!({"names": ["clone3"], "action": "SCMP_ACT_ERRNO",
            "errnoRet": libc::ENOSYS}));
    }
    json!({"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": libc::EPERM,
           "syscalls": syscalls})
}

/// A profile file: OCI `linux.seccomp` or docker's format (which adds
/// per-rule `includes`/`excludes` of capabilities and a `name` field).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct FileProfile {
    default_action: String,
    #[serde(default)]
    default_errno_ret: Option<u32>,
    #[serde(default)]
    architectures: Vec<String>,
    #[serde(default)]
    syscalls: Vec<FileRule>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct FileRule {
    #[serde(default)]
    names: Vec<String>,
    #[serde(default)]
    name: Option<String>,
    action: String,
    #[serde(default)]
    errno_ret: Option<u32>,
    #[serde(default)]
    args: Option<Vec<Value>>,
    #[serde(default)]
    includes: Filter,
    #[serde(default)]
    excludes: Filter,
}

#[derive(Debug, Default, Deserialize)]
struct Filter {
    #[serde(default)]
    caps: Vec<String>,
}

fn has_caps(list: &[String], caps: &BTreeSet<u32>) -> bool {
    list.iter()
        .all(|c| crate::linux::identity::cap_number(c).is_some_and(|n| caps.contains(&n)))
}

/// Reads and converts a Localhost profile for a container with `caps`.
pub fn localhost(path: &Path, caps: &BTreeSet<u32>) -> Result<Value, String> {
    if !path.is_absolute() {
        return Err(format!(
            "seccomp profile path {:?} is not absolute",
            path.display()
        ));
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("seccomp profile {}: {e}", path.display()))?;
    let p: FileProfile = serde_json::from_str(&text)
        .map_err(|e| format!("seccomp profile {}: {e}", path.display()))?;
    let _ = &p.architectures; // the filter is built for the native architecture
    let mut syscalls = Vec::new();
    for r in p.syscalls {
        if !has_caps(&r.includes.caps, caps) {
            continue;
        }
        if !r.excludes.caps.is_empty()
            && r.excludes
                .caps
                .iter()
                .any(|c| crate::linux::identity::cap_number(c).is_some_and(|n| caps.contains(&n)))
        {
            continue;
        }
        let mut names = r.names;
        names.extend(r.name);
        let mut rule = json!({"names": names, "action": r.action});
        if let Some(e) = r.errno_ret {
            rule["errnoRet"] = json!(e);
        }
        if let Some(a) = r.args {
            rule["args"] = json!(a);
        }
        syscalls.push(rule);
    }
    let mut out = json!({"defaultAction": p.default_action, "syscalls": syscalls});
    if let Some(e) = p.default_errno_ret {
        out["defaultErrnoRet"] = json!(e);
    }
    // Shape errors (an unknown action or operator) name the file.
    serde_json::from_value::<oci_spec::runtime::LinuxSeccomp>(out.clone())
        .map_err(|e| format!("seccomp profile {}: {e}", path.display()))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtime_default_compiles_and_follows_caps() {
        let none = runtime_default(&BTreeSet::new());
        let text = none.to_string();
        assert!(!text.contains("\"sethostname\""));
        assert!(!text.contains("\"keyctl\""));
        let admin = runtime_default(&BTreeSet::from([21]));
        assert!(admin.to_string().contains("\"sethostname\""));
        for v in [none, admin] {
            let p: oci_spec::runtime::LinuxSeccomp = serde_json::from_value(v).unwrap();
            assert!(!crate::linux::seccomp::compile(&p).unwrap().is_empty());
        }
    }

    #[test]
    fn docker_format_with_includes() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("p.json");
        std::fs::write(
            &f,
            r#"{"defaultAction":"SCMP_ACT_ALLOW","architectures":["SCMP_ARCH_X86_64"],
               "syscalls":[{"name":"mkdir","action":"SCMP_ACT_ERRNO","errnoRet":13},
                           {"names":["chroot"],"action":"SCMP_ACT_ERRNO",
                            "excludes":{"caps":["CAP_SYS_CHROOT"]}}]}"#,
        )
        .unwrap();
        let v = localhost(&f, &BTreeSet::from([18])).unwrap();
        assert_eq!(v["syscalls"].as_array().unwrap().len(), 1);
        std::fs::write(&f, "{not json").unwrap();
        assert!(localhost(&f, &BTreeSet::new())
            .unwrap_err()
            .contains("p.json"));
        assert!(localhost(&dir.path().join("missing.json"), &BTreeSet::new()).is_err());
    }
}
