//! User namespaces: writing a new namespace's id mappings from its
//! (privileged) parent, pinning it like a network namespace, and joining it.

use super::process::NewUserNs;
use super::{netns, sys, LinuxError};
use nix::mount::{mount, MsFlags};
use std::path::Path;

/// The uid_map/gid_map text for (container id, host id, length) ranges.
pub fn map_text(ranges: &[(u32, u32, u32)]) -> String {
    ranges
        .iter()
        .map(|(inside, outside, len)| format!("{inside} {outside} {len}\n"))
        .collect()
}

/// Writes the mappings of the new user namespace of `pid` (a child blocked
/// before doing anything) and pins it (and its network namespace when
/// asked). The writer has CAP_SETUID/CAP_SETGID over the namespace, so
/// setgroups stays allowed inside (the container's supplementary groups
/// need it). On error no pin is left.
pub fn set_up(pid: i32, u: &NewUserNs<'_>) -> Result<(), LinuxError> {
    let made = (|| {
        // Each map must be written with a single write(2).
        for (file, ranges) in [("uid_map", u.uids), ("gid_map", u.gids)] {
            let path = format!("/proc/{pid}/{file}");
            std::fs::write(&path, map_text(ranges)).map_err(sys("write", &path))?;
        }
        pin(pid, "user", u.pin)?;
        if let Some(net) = u.net_pin {
            pin(pid, "net", net)?;
            netns::run_in(net, netns::loopback_up)?
                .map_err(sys("bring lo up in", net.display()))?;
        }
        Ok(())
    })();
    if made.is_err() {
        let _ = netns::remove_pin(u.pin);
        if let Some(net) = u.net_pin {
            let _ = netns::remove_pin(net);
        }
    }
    made
}

/// Bind-mounts /proc/<pid>/ns/<kind> on `pin` (a new file).
fn pin(pid: i32, kind: &str, pin: &Path) -> Result<(), LinuxError> {
    std::fs::File::options()
        .write(true)
        .create_new(true)
        .open(pin)
        .map_err(sys("create namespace pin", pin.display()))?;
    mount(
        Some(format!("/proc/{pid}/ns/{kind}").as_str()),
        pin,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(sys("pin namespace at", pin.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_text_is_one_line_per_range() {
        assert_eq!(
            map_text(&[(0, 65536, 65536), (70000, 1000, 1)]),
            "0 65536 65536\n70000 1000 1\n"
        );
    }
}
