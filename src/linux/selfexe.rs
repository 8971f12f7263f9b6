//! berth runs from a sealed memfd copy of its own binary, so that no berth
//! process a container can see (a container init before its exec, an exec
//! helper's child before it execs the command, a pod's infra process)
//! exposes the host's berth binary through /proc/<pid>/exe: the
//! CVE-2019-5736 class, where a container opens that link and rewrites the
//! runtime on the host.
//!
//! `berth serve` copies /proc/self/exe into a memfd once, seals it against
//! any change (F_SEAL_WRITE, F_SEAL_GROW, F_SEAL_SHRINK, then F_SEAL_SEAL so
//! the seals cannot be lifted) and re-execs itself from it before it starts
//! any thread. From then on /proc/self/exe of the daemon, and of everything
//! it clones (exec helpers) or execs from that memfd (the monitor zygote,
//! hence every monitor and container init, and the pod infra processes),
//! is the sealed copy: the kernel refuses every write to it, whoever holds
//! it. The memfd's pages are shared by all those processes like the page
//! cache of a file, so monitors stay as small as before.

use super::{sys, LinuxError};
use rustix::fs::{MemfdFlags, SealFlags};
use std::ffi::{CString, OsString};
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;
use std::sync::OnceLock;

/// No write, no size change, and no change to these seals.
const SEALS: SealFlags = SealFlags::SEAL
    .union(SealFlags::SHRINK)
    .union(SealFlags::GROW)
    .union(SealFlags::WRITE);

/// How berth starts its own helper processes.
#[derive(Debug)]
pub struct SelfExe {
    /// What to exec: /proc/self/fd/<memfd> (valid in this process and in
    /// any child until it execs), or the binary's path when not sealed.
    pub exec: PathBuf,
    /// The binary's path on the host: argv[0] of the helpers, so that ps
    /// and berth's own process matching see the usual command lines.
    pub name: PathBuf,
    /// Keeps `exec` valid.
    _memfd: Option<OwnedFd>,
}

fn is_sealed(fd: &std::fs::File) -> bool {
    rustix::fs::fcntl_get_seals(fd).is_ok_and(|s| s.contains(SEALS))
}

/// The part of the ELF file `exe` that the kernel and the dynamic loader
/// read: up to the end of its last PT_LOAD segment (and of the program
/// headers). What follows, the debug line tables, symbols and section
/// headers (about 100 MB of a release build's 120), would sit in the memfd,
/// that is in RAM, for nothing; panics then print no symbol names, their
/// messages and source locations stay. None if `exe` is not a 64-bit
/// little-endian ELF file. Three header fields and the program headers are
/// read by hand: an ELF crate for that would be out of proportion.
fn loaded_len(exe: &std::fs::File) -> Option<u64> {
    use std::os::unix::fs::FileExt;
    const PT_LOAD: u32 = 1;
    let u64_at =
        |b: &[u8], at: usize| Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?));
    let u16_at =
        |b: &[u8], at: usize| Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?));
    let mut hdr = [0u8; 64];
    exe.read_exact_at(&mut hdr, 0).ok()?;
    // Magic, ELFCLASS64, ELFDATA2LSB.
    if hdr[..4] != *b"\x7fELF" || hdr[4] != 2 || hdr[5] != 1 {
        return None;
    }
    let phoff = u64_at(&hdr, 0x20)?;
    let phentsize = u64::from(u16_at(&hdr, 0x36)?);
    let phnum = u64::from(u16_at(&hdr, 0x38)?);
    if phentsize < 56 {
        return None;
    }
    let mut end = phoff.checked_add(phnum.checked_mul(phentsize)?)?;
    let mut ph = [0u8; 56];
    for i in 0..phnum {
        exe.read_exact_at(&mut ph, phoff + i * phentsize).ok()?;
        if u32::from_le_bytes(ph[..4].try_into().ok()?) == PT_LOAD {
            end = end.max(u64_at(&ph, 8)?.checked_add(u64_at(&ph, 0x20)?)?);
        }
    }
    Some(end)
}

/// Re-execs this process from a sealed memfd copy of its binary, unless it
/// already runs from one. Only returns when it does (Ok) or on failure.
/// Must be called before any thread is started.
pub fn reexec_sealed() -> Result<(), LinuxError> {
    let mut exe = std::fs::File::open("/proc/self/exe").map_err(sys("open", "/proc/self/exe"))?;
    if is_sealed(&exe) {
        return Ok(());
    }
    let path = std::fs::read_link("/proc/self/exe").map_err(sys("readlink", "/proc/self/exe"))?;
    let flags = MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING;
    // MFD_EXEC (Linux >= 6.3) says it out loud where vm.memfd_noexec would
    // otherwise warn; older kernels do not know the flag.
    let memfd = rustix::fs::memfd_create("berth", flags | MemfdFlags::EXEC)
        .or_else(|_| rustix::fs::memfd_create("berth", flags))
        .map_err(sys("memfd_create for", path.display()))?;
    let mut copy = std::fs::File::from(memfd);
    let len = loaded_len(&exe).unwrap_or(u64::MAX);
    std::io::copy(&mut (&mut exe).take(len), &mut copy)
        .map_err(sys("copy into a memfd", path.display()))?;
    rustix::fs::fcntl_add_seals(&copy, SEALS)
        .map_err(sys("seal the memfd copy of", path.display()))?;
    let cstr = |s: OsString| CString::new(s.into_vec()).map_err(sys("exec", path.display()));
    // argv[0] becomes the absolute host path: what `name` reports after.
    let mut argv = vec![cstr(path.clone().into_os_string())?];
    for a in std::env::args_os().skip(1) {
        argv.push(cstr(a)?);
    }
    let env = std::env::vars_os()
        .map(|(k, v)| {
            let mut kv = k;
            kv.push("=");
            kv.push(v);
            cstr(kv)
        })
        .collect::<Result<Vec<_>, _>>()?;
    // Descriptors inherited from whoever started berth stop here: none of
    // them may reach a helper, and from there a container.
    super::exec::close_fds_except(&mut [], libc::CLOSE_RANGE_CLOEXEC);
    let err = nix::unistd::fexecve(&copy, &argv, &env).unwrap_err();
    Err(sys("exec the sealed copy of", path.display())(err))
}

/// This process's way to start berth helpers (see [`SelfExe`]).
pub fn current() -> &'static SelfExe {
    static SELF: OnceLock<SelfExe> = OnceLock::new();
    SELF.get_or_init(|| {
        let on_disk = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("berth"));
        match std::fs::File::open("/proc/self/exe") {
            Ok(f) if is_sealed(&f) => {
                let name = std::env::args_os()
                    .next()
                    .map(PathBuf::from)
                    .filter(|p| p.is_absolute())
                    .unwrap_or(on_disk);
                let memfd = OwnedFd::from(f);
                SelfExe {
                    exec: PathBuf::from(format!("/proc/self/fd/{}", memfd.as_raw_fd())),
                    name,
                    _memfd: Some(memfd),
                }
            }
            _ => SelfExe {
                exec: on_disk.clone(),
                name: on_disk,
                _memfd: None,
            },
        }
    })
}

/// Names this process (comm, as ps -o comm and /proc/<pid>/comm show it)
/// after the file name of argv[0]: a process exec'd from a memfd would
/// otherwise be called after the fd number.
pub fn name_after_argv0() {
    let Some(arg0) = std::env::args_os().next() else {
        return;
    };
    let base = PathBuf::from(arg0);
    let Some(file) = base.file_name() else {
        return;
    };
    if let Ok(c) = CString::new(file.as_bytes()) {
        let _ = nix::sys::prctl::set_name(&c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_loaded_part_of_an_elf_file_is_found() {
        let exe = std::fs::File::open("/proc/self/exe").unwrap();
        let size = exe.metadata().unwrap().len();
        let len = loaded_len(&exe).expect("the test binary is an ELF64 LE file");
        assert!(len > 4096 && len <= size, "{len} of {size}");
        let not_elf = std::fs::File::open("/proc/self/cmdline").unwrap();
        assert_eq!(loaded_len(&not_elf), None);
    }

    #[test]
    fn unsealed_process_execs_its_binary() {
        // The test binary does not run from a memfd: berth's own path.
        let me = current();
        assert_eq!(me.exec, std::env::current_exe().unwrap());
        assert_eq!(me.exec, me.name);
    }
}
