//! Crash-test hooks: with `BERTH_FAILPOINT=<name>` in its environment the
//! daemon SIGKILLs itself when it reaches that point, exactly as a `kill -9`
//! there would. Tests use it to prove recovery from every step.

use std::sync::OnceLock;

pub fn hit(name: &str) {
    static ARMED: OnceLock<Option<String>> = OnceLock::new();
    let armed = ARMED.get_or_init(|| std::env::var("BERTH_FAILPOINT").ok());
    if armed.as_deref() == Some(name) {
        tracing::error!(failpoint = name, "failpoint reached: killing berth");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
}
