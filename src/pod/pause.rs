//! `berth pause`: the pod infra process. It holds the pod's IPC/UTS (and,
//! when shared, PID) namespaces, reaps zombies as PID 1 of a shared PID
//! namespace, and exits on SIGTERM/SIGINT. It starts no runtime and no
//! allocator-heavy machinery, so its private memory stays tiny.

use nix::sys::signal::{SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};

pub fn run() -> ! {
    let mut set = SigSet::empty();
    for s in [
        Signal::SIGCHLD,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
    ] {
        set.add(s);
    }
    // Blocked signals stay pending for sigwait; as PID 1 of a namespace
    // unhandled signals would otherwise be ignored by the kernel.
    if set.thread_block().is_err() {
        std::process::exit(1);
    }
    loop {
        match set.wait() {
            Ok(Signal::SIGCHLD) => reap_all(),
            Ok(Signal::SIGTERM | Signal::SIGINT) => std::process::exit(0),
            _ => {}
        }
    }
}

fn reap_all() {
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(_) => return,
            Ok(_) => continue,
        }
    }
}
