//! The low-level runtime: the only place with `unsafe`. Each unsafe block
//! says why it is sound. Callers get plain functions over paths and pids.

pub mod asyncfd;
pub mod bpf;
pub mod exec;
pub mod fdpass;
pub mod hostrootfs;
pub mod identity;
pub mod idmap;
pub mod imagevol;
pub mod init;
pub mod mountattr;
pub mod mountfd;
pub mod netns;
pub mod process;
pub mod pty;
pub mod resolve;
pub mod seccomp;
pub mod selfexe;
pub mod shm;
pub mod sysctl;
pub mod userns;

#[derive(Debug, thiserror::Error)]
pub enum LinuxError {
    #[error("{op} {object}: {source}")]
    Sys {
        op: &'static str,
        object: String,
        source: std::io::Error,
    },
}

pub(crate) fn sys<E: Into<std::io::Error>>(
    op: &'static str,
    object: impl std::fmt::Display,
) -> impl FnOnce(E) -> LinuxError {
    let object = object.to_string();
    move |e| LinuxError::Sys {
        op,
        object,
        source: e.into(),
    }
}
