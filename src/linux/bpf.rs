//! cgroup v2 device programs (BPF_PROG_TYPE_CGROUP_DEVICE) over bpf(2):
//! load, attach to a cgroup (replacing berth's previous one atomically),
//! list and detach.
//!
//! Hand-written rather than through a crate, as runc, crun and youki do:
//! the program is ~20 instructions generated at run time, and the crates
//! that load BPF either want a compiled ELF object (aya, with a BPF
//! toolchain to build it) or link the C libbpf (libbpf-rs/libbpf-sys);
//! none takes raw instructions. Four syscall commands on a zeroed
//! `union bpf_attr` are all that is needed.
//!
//! Attachments use BPF_F_ALLOW_MULTI: a program in a descendant cgroup can
//! then only restrict further, never override the container's own. The
//! attachment holds the program, so no fd stays open in the daemon; the
//! kernel drops it with the cgroup.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error("bpf {op} ({object}): {source}")]
    Sys {
        op: &'static str,
        object: String,
        source: std::io::Error,
    },
    #[error("bpf program {name} rejected by the verifier: {source}: {log}")]
    Verifier {
        name: String,
        source: std::io::Error,
        log: String,
    },
}

fn sys(
    op: &'static str,
    object: impl std::fmt::Display,
) -> impl FnOnce(std::io::Error) -> BpfError {
    let object = object.to_string();
    move |source| BpfError::Sys { op, object, source }
}

/// One eBPF instruction (struct bpf_insn).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Insn {
    pub code: u8,
    /// dst register in the low nibble, src in the high one.
    pub regs: u8,
    pub off: i16,
    pub imm: i32,
}

/// Registers and opcodes the device programs use (linux/bpf.h, bpf_common.h).
pub mod op {
    pub const R0: u8 = 0;
    pub const R1: u8 = 1;
    pub const R2: u8 = 2;
    pub const R3: u8 = 3;
    pub const R4: u8 = 4;
    pub const R5: u8 = 5;
    /// BPF_LDX | BPF_MEM | BPF_W
    pub const LDX_W: u8 = 0x61;
    /// BPF_ALU | BPF_AND | BPF_K
    pub const AND32_K: u8 = 0x54;
    /// BPF_ALU | BPF_RSH | BPF_K
    pub const RSH32_K: u8 = 0x74;
    /// BPF_ALU | BPF_MOV | BPF_K
    pub const MOV32_K: u8 = 0xb4;
    /// BPF_ALU | BPF_MOV | BPF_X
    pub const MOV32_X: u8 = 0xbc;
    /// BPF_JMP | BPF_JEQ | BPF_K
    pub const JEQ_K: u8 = 0x15;
    /// BPF_JMP | BPF_JNE | BPF_K
    pub const JNE_K: u8 = 0x55;
    /// BPF_JMP | BPF_JNE | BPF_X
    pub const JNE_X: u8 = 0x5d;
    /// BPF_JMP | BPF_EXIT
    pub const EXIT: u8 = 0x95;
}

impl Insn {
    pub const fn new(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
        Insn {
            code,
            regs: (src << 4) | (dst & 0x0f),
            off,
            imm,
        }
    }
}

#[cfg(test)]
impl Insn {
    pub fn dst(&self) -> u8 {
        self.regs & 0x0f
    }
    pub fn src(&self) -> u8 {
        self.regs >> 4
    }
}

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_DETACH: libc::c_long = 9;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_PROG_TYPE_CGROUP_DEVICE: u32 = 15;
const BPF_CGROUP_DEVICE: u32 = 6;
const BPF_F_ALLOW_MULTI: u32 = 2;
const BPF_F_REPLACE: u32 = 4;
/// BPF_OBJ_NAME_LEN, the trailing NUL included.
const NAME_LEN: usize = 16;
/// Offset of `name` in struct bpf_prog_info.
const INFO_NAME: usize = 64;

/// A zeroed `union bpf_attr` (or bpf_prog_info), larger than the kernel's:
/// the kernel accepts trailing zeroes, and it writes some results back at
/// fixed offsets (BPF_PROG_QUERY's revision at 56), so the buffer must
/// cover every field of the commands used.
#[repr(C, align(8))]
struct Attr([u8; 256]);

impl Attr {
    fn new() -> Attr {
        Attr([0; 256])
    }
    fn u32(mut self, off: usize, v: u32) -> Attr {
        self.0[off..off + 4].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn u64(mut self, off: usize, v: u64) -> Attr {
        self.0[off..off + 8].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn get_u32(&self, off: usize) -> u32 {
        let mut b = [0; 4];
        b.copy_from_slice(&self.0[off..off + 4]);
        u32::from_ne_bytes(b)
    }
}

/// bpf(cmd, attr): the syscall's non-negative result.
fn bpf(cmd: libc::c_long, attr: &mut Attr) -> std::io::Result<i64> {
    // SAFETY: `attr` is a valid, writable, 8-aligned buffer of the size
    // passed; every pointer stored in it (instructions, license, log,
    // id array, info) points into memory the caller keeps alive and
    // sized as the length stored beside it.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.0.as_mut_ptr(),
            std::mem::size_of::<Attr>() as libc::c_uint,
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn owned(fd: i64) -> OwnedFd {
    // SAFETY: the kernel just returned this new fd to us; nothing else owns it.
    unsafe { OwnedFd::from_raw_fd(fd as i32) }
}

/// A loaded device program; closing it (drop) frees it unless attached.
#[derive(Debug)]
pub struct DeviceProgram {
    fd: OwnedFd,
    name: String,
}

impl DeviceProgram {
    /// BPF_PROG_LOAD of `insns` as a cgroup device program named `name`
    /// (at most 15 characters of [A-Za-z0-9_.]). On a verifier rejection
    /// the load is repeated with a log, which goes into the error.
    pub fn load(name: &str, insns: &[Insn]) -> Result<DeviceProgram, BpfError> {
        const LICENSE: &[u8] = b"Apache-2.0\0";
        let mut pname = [0u8; NAME_LEN];
        for (d, s) in pname.iter_mut().zip(name.bytes().take(NAME_LEN - 1)) {
            *d = s;
        }
        let attr = |log: Option<&mut Vec<u8>>| {
            let mut a = Attr::new()
                .u32(0, BPF_PROG_TYPE_CGROUP_DEVICE)
                .u32(4, insns.len() as u32)
                .u64(8, insns.as_ptr() as u64)
                .u64(16, LICENSE.as_ptr() as u64)
                .u32(68, BPF_CGROUP_DEVICE);
            a.0[48..48 + NAME_LEN].copy_from_slice(&pname);
            if let Some(log) = log {
                a = a
                    .u32(24, 1)
                    .u32(28, log.len() as u32)
                    .u64(32, log.as_mut_ptr() as u64);
            }
            a
        };
        match bpf(BPF_PROG_LOAD, &mut attr(None)) {
            Ok(fd) => Ok(DeviceProgram {
                fd: owned(fd),
                name: name.to_string(),
            }),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EACCES)) => {
                let mut log = vec![0u8; 64 << 10];
                let again = bpf(BPF_PROG_LOAD, &mut attr(Some(&mut log)));
                if let Ok(fd) = again {
                    return Ok(DeviceProgram {
                        fd: owned(fd),
                        name: name.to_string(),
                    });
                }
                let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
                let text = String::from_utf8_lossy(&log[..end]);
                let tail: Vec<&str> = text.lines().rev().take(6).collect();
                Err(BpfError::Verifier {
                    name: name.to_string(),
                    source: e,
                    log: tail.into_iter().rev().collect::<Vec<_>>().join(" | "),
                })
            }
            Err(e) => Err(sys("load", name)(e)),
        }
    }

    /// Attaches the program to the cgroup at `cgroup`, atomically replacing
    /// a program of the same name already there (BPF_F_REPLACE), so the
    /// cgroup is never without one. Extra programs of that name (none
    /// unless something else attached one) are detached afterwards.
    pub fn attach(&self, cgroup: &Path) -> Result<(), BpfError> {
        let cg = open_dir(cgroup)?;
        let ours: Vec<Attached> = attached_fds(&cg, cgroup)?
            .into_iter()
            .filter(|a| a.name == self.name)
            .collect();
        let mut flags = BPF_F_ALLOW_MULTI;
        let mut replace = 0;
        if let Some(old) = ours.first() {
            flags |= BPF_F_REPLACE;
            replace = old.fd.as_raw_fd() as u32;
        }
        let mut a = Attr::new()
            .u32(0, cg.as_raw_fd() as u32)
            .u32(4, self.fd.as_raw_fd() as u32)
            .u32(8, BPF_CGROUP_DEVICE)
            .u32(12, flags)
            .u32(16, replace);
        bpf(BPF_PROG_ATTACH, &mut a).map_err(sys("attach", cgroup.display()))?;
        for extra in ours.iter().skip(1) {
            detach(&cg, cgroup, extra)?;
        }
        Ok(())
    }
}

/// A program attached to a cgroup, with an fd that keeps it for a detach.
struct Attached {
    id: u32,
    name: String,
    fd: OwnedFd,
}

fn open_dir(path: &Path) -> Result<OwnedFd, BpfError> {
    std::fs::File::open(path)
        .map(OwnedFd::from)
        .map_err(sys("open cgroup", path.display()))
}

/// The ids of the device programs attached to the cgroup itself (not its
/// ancestors'), by BPF_PROG_QUERY.
fn query(cg: &OwnedFd, path: &Path) -> Result<Vec<u32>, BpfError> {
    let mut cap = 16usize;
    loop {
        let mut ids = vec![0u32; cap];
        let mut a = Attr::new()
            .u32(0, cg.as_raw_fd() as u32)
            .u32(4, BPF_CGROUP_DEVICE)
            .u64(16, ids.as_mut_ptr() as u64)
            .u32(24, cap as u32);
        match bpf(BPF_PROG_QUERY, &mut a) {
            Ok(_) => {
                ids.truncate(a.get_u32(24) as usize);
                return Ok(ids);
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && cap < 4096 => {
                cap = (a.get_u32(24) as usize).max(cap * 2);
            }
            Err(e) => return Err(sys("query", path.display())(e)),
        }
    }
}

fn attached_fds(cg: &OwnedFd, path: &Path) -> Result<Vec<Attached>, BpfError> {
    let mut out = Vec::new();
    for id in query(cg, path)? {
        let mut a = Attr::new().u32(0, id);
        let fd = match bpf(BPF_PROG_GET_FD_BY_ID, &mut a) {
            Ok(fd) => owned(fd),
            // Detached meanwhile.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
            Err(e) => return Err(sys("get program by id", id)(e)),
        };
        let mut info = Attr::new();
        let mut a = Attr::new()
            .u32(0, fd.as_raw_fd() as u32)
            .u32(4, std::mem::size_of::<Attr>() as u32)
            .u64(8, info.0.as_mut_ptr() as u64);
        bpf(BPF_OBJ_GET_INFO_BY_FD, &mut a).map_err(sys("program info", id))?;
        let name = &info.0[INFO_NAME..INFO_NAME + NAME_LEN];
        let end = name.iter().position(|&b| b == 0).unwrap_or(NAME_LEN);
        out.push(Attached {
            id,
            name: String::from_utf8_lossy(&name[..end]).into_owned(),
            fd,
        });
    }
    Ok(out)
}

fn detach(cg: &OwnedFd, path: &Path, p: &Attached) -> Result<(), BpfError> {
    let mut a = Attr::new()
        .u32(0, cg.as_raw_fd() as u32)
        .u32(4, p.fd.as_raw_fd() as u32)
        .u32(8, BPF_CGROUP_DEVICE);
    match bpf(BPF_PROG_DETACH, &mut a) {
        Ok(_) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(e) => Err(sys("detach", format!("{} from {}", p.id, path.display()))(
            e,
        )),
    }
}

/// Detaches every device program from the cgroup (before it is removed,
/// so the programs are freed now rather than when the kernel gets to
/// releasing the cgroup). Returns how many there were.
pub fn detach_all(cgroup: &Path) -> Result<usize, BpfError> {
    let cg = match std::fs::File::open(cgroup) {
        Ok(f) => OwnedFd::from(f),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(sys("open cgroup", cgroup.display())(e)),
    };
    let progs = attached_fds(&cg, cgroup)?;
    for p in &progs {
        detach(&cg, cgroup, p)?;
    }
    Ok(progs.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open_bpf_fds() -> usize {
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .flatten()
            .filter(|e| {
                std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy().contains("bpf-prog"))
            })
            .count()
    }

    #[test]
    fn loads_a_device_program_and_closes_it() {
        use op::*;
        // allow everything: r0 = 1; exit
        let ok = [Insn::new(MOV32_K, R0, 0, 0, 1), Insn::new(EXIT, 0, 0, 0, 0)];
        let before = open_bpf_fds();
        let p = DeviceProgram::load("berth_test", &ok).expect("BPF_PROG_LOAD (root, 6.x)");
        assert_eq!(open_bpf_fds(), before + 1);
        drop(p);
        assert_eq!(open_bpf_fds(), before);
        // An invalid return value (2) is refused, with the verifier's log.
        let bad = [Insn::new(MOV32_K, R0, 0, 0, 2), Insn::new(EXIT, 0, 0, 0, 0)];
        let e = DeviceProgram::load("berth_test", &bad).unwrap_err();
        assert!(
            matches!(e, BpfError::Verifier { ref log, .. } if !log.is_empty()),
            "{e}"
        );
        assert_eq!(open_bpf_fds(), before);
    }

    #[test]
    fn instruction_encoding() {
        let i = Insn::new(op::LDX_W, op::R2, op::R1, 4, 0);
        assert_eq!((i.dst(), i.src()), (2, 1));
        assert_eq!(i.regs, 0x12);
        assert_eq!(std::mem::size_of::<Insn>(), 8);
    }
}
