//! "Become the container's identity": rlimits, AppArmor, capability sets,
//! groups, uid/gid, no_new_privs and seccomp, from the OCI spec's process.
//! One code path for the container init and for ExecSync's command.
//!
//! [`Identity::from_process`] does all the parsing and allocation up front;
//! [`Identity::enter`] and [`Identity::seal`] then make raw syscalls only, so
//! they are safe in a child cloned from the multi-threaded daemon. The
//! capability syscalls are raw (not the `caps` crate's setters, which
//! allocate) for that reason; `caps` names and numbers the capabilities.

use oci_spec::runtime::{PosixRlimitType, Process};
use seccompiler::BpfProgram;
use std::ffi::CString;
use std::str::FromStr;

/// A step of [`Identity::enter`] / [`Identity::seal`], for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum Step {
    OomScoreAdj = 0,
    Rlimit,
    AppArmor,
    KeepCaps,
    Bounding,
    SetGroups,
    SetGid,
    SetUid,
    CapSet,
    Ambient,
    NoNewPrivs,
    Seccomp,
}

const STEPS: [(Step, &str); 12] = [
    (Step::OomScoreAdj, "write /proc/self/oom_score_adj"),
    (Step::Rlimit, "set rlimit"),
    (Step::AppArmor, "set AppArmor profile"),
    (Step::KeepCaps, "prctl(PR_SET_KEEPCAPS)"),
    (Step::Bounding, "drop from the capability bounding set"),
    (Step::SetGroups, "setgroups"),
    (Step::SetGid, "setgid"),
    (Step::SetUid, "setuid"),
    (Step::CapSet, "capset"),
    (Step::Ambient, "raise ambient capability"),
    (Step::NoNewPrivs, "prctl(PR_SET_NO_NEW_PRIVS)"),
    (Step::Seccomp, "install seccomp filter"),
];

impl Step {
    pub fn name(self) -> &'static str {
        STEPS[self as usize].1
    }

    pub fn from_index(i: i32) -> Option<Step> {
        usize::try_from(i)
            .ok()
            .and_then(|i| STEPS.get(i))
            .map(|s| s.0)
    }
}

/// The capability sets, as bit masks.
#[derive(Debug, Clone, Default)]
struct Caps {
    bounding_drop: Vec<u32>,
    effective: u64,
    permitted: u64,
    inheritable: u64,
    ambient: Vec<u32>,
}

#[derive(Debug, Clone)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<libc::gid_t>,
    caps: Option<Caps>,
    no_new_privs: bool,
    rlimits: Vec<(libc::c_int, libc::rlimit64)>,
    /// The value for /proc/self/oom_score_adj (the container's already).
    oom_score_adj: Option<CString>,
    seccomp: Vec<BpfProgram>,
    /// (attr file, "exec <profile>")
    apparmor: Option<(CString, CString)>,
}

/// The highest capability number the running kernel knows.
pub fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
}

/// A capability name as OCI and the CRI spell it ("CAP_CHOWN", "chown").
pub fn cap_number(name: &str) -> Option<u32> {
    let upper = name.to_ascii_uppercase();
    let full = if upper.starts_with("CAP_") {
        upper
    } else {
        format!("CAP_{upper}")
    };
    caps::Capability::from_str(&full)
        .ok()
        .map(|c| u32::from(c.index()))
}

fn mask_of<T: serde::Serialize>(set: Option<&std::collections::HashSet<T>>) -> Result<u64, String> {
    let mut m = 0u64;
    for c in set.into_iter().flatten() {
        let name = serde_json::to_value(c)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default();
        let n = cap_number(&name).ok_or_else(|| format!("unknown capability {name:?}"))?;
        m |= 1 << n;
    }
    Ok(m)
}

fn rlimit_resource(t: PosixRlimitType) -> libc::c_int {
    (match t {
        PosixRlimitType::RlimitCpu => libc::RLIMIT_CPU,
        PosixRlimitType::RlimitFsize => libc::RLIMIT_FSIZE,
        PosixRlimitType::RlimitData => libc::RLIMIT_DATA,
        PosixRlimitType::RlimitStack => libc::RLIMIT_STACK,
        PosixRlimitType::RlimitCore => libc::RLIMIT_CORE,
        PosixRlimitType::RlimitRss => libc::RLIMIT_RSS,
        PosixRlimitType::RlimitNproc => libc::RLIMIT_NPROC,
        PosixRlimitType::RlimitNofile => libc::RLIMIT_NOFILE,
        PosixRlimitType::RlimitMemlock => libc::RLIMIT_MEMLOCK,
        PosixRlimitType::RlimitAs => libc::RLIMIT_AS,
        PosixRlimitType::RlimitLocks => libc::RLIMIT_LOCKS,
        PosixRlimitType::RlimitSigpending => libc::RLIMIT_SIGPENDING,
        PosixRlimitType::RlimitMsgqueue => libc::RLIMIT_MSGQUEUE,
        PosixRlimitType::RlimitNice => libc::RLIMIT_NICE,
        PosixRlimitType::RlimitRtprio => libc::RLIMIT_RTPRIO,
        PosixRlimitType::RlimitRttime => libc::RLIMIT_RTTIME,
    }) as libc::c_int
}

const CAP_SYS_ADMIN: u32 = 21;

impl Identity {
    #[cfg(test)]
    /// Just a user and groups: capabilities as they are, nothing else.
    pub fn user(uid: u32, gid: u32, groups: Vec<libc::gid_t>) -> Identity {
        Identity {
            uid,
            gid,
            groups,
            caps: None,
            no_new_privs: false,
            rlimits: Vec::new(),
            oom_score_adj: None,
            seccomp: Vec::new(),
            apparmor: None,
        }
    }

    /// Everything the process section asks for, prepared (seccomp compiled).
    pub fn from_process(
        p: &Process,
        seccomp: Option<&oci_spec::runtime::LinuxSeccomp>,
    ) -> Result<Identity, String> {
        let user = p.user();
        let groups = user.additional_gids().clone().unwrap_or_default();
        let no_new_privs = p.no_new_privileges().unwrap_or(false);
        let seccomp = match seccomp {
            Some(s) => super::seccomp::compile(s)?,
            None => Vec::new(),
        };
        let caps = match p.capabilities() {
            None => None,
            Some(c) => {
                // Only what berth holds can be kept (on a host without
                // CAP_SYS_RESOURCE, "all capabilities" means all but it).
                let held = caps::read(None, caps::CapSet::Permitted)
                    .map(|set| set.iter().fold(0u64, |m, c| m | c.bitmask()))
                    .map_err(|e| format!("read berth's capabilities: {e}"))?;
                let bounding = mask_of(c.bounding().as_ref())?;
                let mut effective = mask_of(c.effective().as_ref())? & held;
                let mut permitted = mask_of(c.permitted().as_ref())? & held;
                let inheritable = mask_of(c.inheritable().as_ref())? & held;
                let ambient_mask = mask_of(c.ambient().as_ref())? & held;
                // Installing a filter without no_new_privs needs
                // CAP_SYS_ADMIN. It is held until the exec, which drops it:
                // it is in neither the bounding, inheritable nor ambient set.
                if !seccomp.is_empty() && !no_new_privs {
                    effective |= 1 << CAP_SYS_ADMIN;
                    permitted |= 1 << CAP_SYS_ADMIN;
                }
                let last = last_cap().min(63);
                Some(Caps {
                    bounding_drop: (0..=last).filter(|n| bounding & (1 << n) == 0).collect(),
                    effective,
                    permitted,
                    inheritable,
                    ambient: (0..=last)
                        .filter(|n| ambient_mask & (1 << n) != 0)
                        .collect(),
                })
            }
        };
        let rlimits = p
            .rlimits()
            .as_deref()
            .unwrap_or(&[])
            .iter()
            .map(|r| {
                (
                    rlimit_resource(r.typ()),
                    libc::rlimit64 {
                        rlim_cur: r.soft(),
                        rlim_max: r.hard(),
                    },
                )
            })
            .collect();
        let apparmor = match p.apparmor_profile().as_deref() {
            None | Some("") => None,
            Some(name) => {
                let path = if std::path::Path::new("/proc/thread-self/attr/apparmor").exists() {
                    "/proc/thread-self/attr/apparmor/exec"
                } else {
                    "/proc/thread-self/attr/exec"
                };
                Some((
                    CString::new(path).map_err(|e| e.to_string())?,
                    CString::new(format!("exec {name}"))
                        .map_err(|_| format!("AppArmor profile {name:?} holds a NUL byte"))?,
                ))
            }
        };
        Ok(Identity {
            uid: user.uid(),
            gid: user.gid(),
            groups,
            caps,
            no_new_privs,
            rlimits,
            oom_score_adj: p
                .oom_score_adj()
                .map(|v| CString::new(v.to_string()).unwrap_or_default()),
            seccomp,
            apparmor,
        })
    }

    /// Rlimits, AppArmor, groups, uid/gid and capabilities. Raw syscalls
    /// only; returns the failed step and its errno.
    pub fn enter(&self) -> Result<(), (Step, i32)> {
        let check = |r: libc::c_long, step: Step| -> Result<(), (Step, i32)> {
            if r < 0 {
                Err((step, errno()))
            } else {
                Ok(())
            }
        };
        if let Some(v) = &self.oom_score_adj {
            write_file(c"/proc/self/oom_score_adj", v).map_err(|e| (Step::OomScoreAdj, e))?;
        }
        for (res, lim) in &self.rlimits {
            // SAFETY: prlimit64 on ourselves with a live rlimit64; no old value.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_prlimit64,
                    0,
                    *res,
                    lim as *const libc::rlimit64,
                    std::ptr::null_mut::<libc::rlimit64>(),
                )
            };
            check(r, Step::Rlimit)?;
        }
        if let Some((path, value)) = &self.apparmor {
            write_file(path, value).map_err(|e| (Step::AppArmor, e))?;
        }
        if let Some(c) = &self.caps {
            // SAFETY: prctl with integer arguments only.
            check(
                unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) } as libc::c_long,
                Step::KeepCaps,
            )?;
            for n in &c.bounding_drop {
                // SAFETY: as above. EINVAL: a number this kernel lacks.
                let r = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, *n as libc::c_ulong, 0, 0, 0) };
                if r < 0 && errno() != libc::EINVAL {
                    return Err((Step::Bounding, errno()));
                }
            }
        }
        // SAFETY: raw set*id syscalls (glibc's wrappers would signal the
        // other threads of the process this may have been cloned from);
        // `groups` is a live array of `len` gids.
        unsafe {
            check(
                libc::syscall(libc::SYS_setgroups, self.groups.len(), self.groups.as_ptr()),
                Step::SetGroups,
            )?;
            check(
                libc::syscall(libc::SYS_setresgid, self.gid, self.gid, self.gid),
                Step::SetGid,
            )?;
            check(
                libc::syscall(libc::SYS_setresuid, self.uid, self.uid, self.uid),
                Step::SetUid,
            )?;
        }
        if let Some(c) = &self.caps {
            let header = CapHeader {
                version: LINUX_CAPABILITY_VERSION_3,
                pid: 0,
            };
            let half = |m: u64, i: u32| (m >> (32 * i)) as u32;
            let data = [0, 1].map(|i| CapData {
                effective: half(c.effective, i),
                permitted: half(c.permitted, i),
                inheritable: half(c.inheritable, i),
            });
            // SAFETY: capset with a v3 header and its two data elements.
            check(
                unsafe {
                    libc::syscall(libc::SYS_capset, &header as *const CapHeader, data.as_ptr())
                },
                Step::CapSet,
            )?;
            // SAFETY: prctl with integer arguments only.
            unsafe {
                check(
                    libc::prctl(
                        libc::PR_CAP_AMBIENT,
                        libc::PR_CAP_AMBIENT_CLEAR_ALL,
                        0,
                        0,
                        0,
                    ) as libc::c_long,
                    Step::Ambient,
                )?;
                for n in &c.ambient {
                    check(
                        libc::prctl(
                            libc::PR_CAP_AMBIENT,
                            libc::PR_CAP_AMBIENT_RAISE,
                            *n as libc::c_ulong,
                            0,
                            0,
                        ) as libc::c_long,
                        Step::Ambient,
                    )?;
                }
            }
        }
        Ok(())
    }

    /// no_new_privs and seccomp: the last steps before exec (nothing but the
    /// exec should run under the filter). Raw syscalls only.
    pub fn seal(&self) -> Result<(), (Step, i32)> {
        if self.no_new_privs {
            // SAFETY: prctl with integer arguments only.
            if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } < 0 {
                return Err((Step::NoNewPrivs, errno()));
            }
        }
        super::seccomp::install(&self.seccomp).map_err(|e| (Step::Seccomp, e))
    }
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Writes `value` to `path` with raw open/write/close; the errno on failure.
fn write_file(path: &std::ffi::CStr, value: &std::ffi::CStr) -> Result<(), i32> {
    // SAFETY: open/write/close on NUL-terminated strings we borrow; the fd
    // is ours and closed before returning.
    unsafe {
        let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(errno());
        }
        let bytes = value.to_bytes();
        let w = libc::write(fd, bytes.as_ptr().cast(), bytes.len());
        let e = errno();
        libc::close(fd);
        if w < 0 {
            return Err(e);
        }
    }
    Ok(())
}

fn errno() -> i32 {
    // No allocation for an OS error.
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EINVAL)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capability_names() {
        assert_eq!(cap_number("CAP_CHOWN"), Some(0));
        assert_eq!(cap_number("net_admin"), Some(12));
        assert_eq!(cap_number("SYS_ADMIN"), Some(CAP_SYS_ADMIN));
        assert_eq!(cap_number("CAP_NOPE"), None);
    }

    #[test]
    fn steps_are_named_in_order() {
        for (i, (s, _)) in STEPS.iter().enumerate() {
            assert_eq!(*s as usize, i);
            assert_eq!(Step::from_index(i as i32), Some(*s));
        }
    }
}
