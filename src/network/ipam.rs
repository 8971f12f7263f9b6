//! On-disk IP address allocation for the built-in network.
//!
//! One file per leased address, `<dir>/<address>`, holding the owner's pod id.
//! Creating the file with O_EXCL is the reservation, so a lease is durable the
//! moment it exists and two allocations can never hand out the same address;
//! a crash leaves at most a file whose owner has no network record, which
//! [`Ipam::retain`] removes at startup. `last` remembers the most recent lease
//! so addresses are handed out round robin, as CNI's host-local does, rather
//! than reusing a just-released address (stale ARP/conntrack entries).

use super::NetworkError;
use ipnet::IpNet;
use std::collections::BTreeSet;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

/// Upper bound of addresses tried per allocation (an IPv6 /64 is never
/// scanned in full).
const MAX_TRIES: u128 = 1 << 16;

pub struct Ipam {
    dir: PathBuf,
    subnet: IpNet,
    gateway: IpAddr,
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> NetworkError {
    move |source| NetworkError::Io { what, source }
}

fn to_u128(a: IpAddr) -> u128 {
    match a {
        IpAddr::V4(a) => u32::from(a) as u128,
        IpAddr::V6(a) => u128::from(a),
    }
}

fn from_u128(v: u128, like: IpAddr) -> IpAddr {
    match like {
        IpAddr::V4(_) => IpAddr::V4((v as u32).into()),
        IpAddr::V6(_) => IpAddr::V6(v.into()),
    }
}

impl Ipam {
    pub fn new(dir: PathBuf, subnet: IpNet, gateway: IpAddr) -> Ipam {
        Ipam {
            dir,
            subnet,
            gateway,
        }
    }

    /// The usable range: the subnet without its network address, its
    /// broadcast address (IPv4) and the gateway.
    fn bounds(&self) -> (u128, u128) {
        let first = to_u128(self.subnet.network()) + 1;
        let last = match self.subnet {
            IpNet::V4(_) => to_u128(self.subnet.broadcast()) - 1,
            IpNet::V6(_) => to_u128(self.subnet.broadcast()),
        };
        (first, last)
    }

    /// Leases a free address to `owner`.
    pub fn allocate(&self, owner: &str) -> Result<IpAddr, NetworkError> {
        std::fs::create_dir_all(&self.dir).map_err(io(format!("create {}", self.dir.display())))?;
        let (first, last) = self.bounds();
        let size = last.saturating_sub(first) + 1;
        let start = std::fs::read_to_string(self.dir.join("last"))
            .ok()
            .and_then(|s| s.trim().parse::<IpAddr>().ok())
            .map(to_u128)
            .filter(|v| (first..=last).contains(v))
            .map(|v| if v == last { first } else { v + 1 })
            .unwrap_or(first);
        let gw = to_u128(self.gateway);
        for i in 0..size.min(MAX_TRIES) {
            let v = first + (start - first + i) % size;
            if v == gw {
                continue;
            }
            let ip = from_u128(v, self.gateway);
            let path = self.dir.join(ip.to_string());
            match std::fs::File::options()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut f) => {
                    let w = f.write_all(owner.as_bytes()).and_then(|_| f.sync_all());
                    if let Err(e) = w.and_then(|_| crate::store::sync_dir(&self.dir)) {
                        let _ = std::fs::remove_file(&path);
                        return Err(io(format!("record lease {}", path.display()))(e));
                    }
                    // Only a hint for the next search: losing it is harmless.
                    let _ = crate::store::write_atomic(
                        &self.dir.join("last"),
                        ip.to_string().as_bytes(),
                    );
                    return Ok(ip);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(io(format!("create lease {}", path.display()))(e)),
            }
        }
        Err(NetworkError::Exhausted(self.subnet.to_string()))
    }

    /// The addresses leased to each owner.
    fn leases(&self) -> Vec<(IpAddr, String)> {
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        rd.flatten()
            .filter_map(|e| {
                let ip = e.file_name().to_str()?.parse::<IpAddr>().ok()?;
                let owner = std::fs::read_to_string(e.path()).unwrap_or_default();
                Some((ip, owner))
            })
            .collect()
    }

    /// Releases every address leased to `owner`. Idempotent.
    pub fn release(&self, owner: &str) -> Result<(), NetworkError> {
        for (ip, o) in self.leases() {
            if o == owner {
                self.remove(ip)?;
            }
        }
        Ok(())
    }

    fn remove(&self, ip: IpAddr) -> Result<(), NetworkError> {
        let p = self.dir.join(ip.to_string());
        match std::fs::remove_file(&p) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(io(format!("remove lease {}", p.display()))(e))
            }
            _ => Ok(()),
        }
    }

    /// Releases the leases of owners not in `owners` (crash leftovers and
    /// leases whose file was written but never completed).
    pub fn retain(&self, owners: &BTreeSet<String>) {
        for (ip, o) in self.leases() {
            if !owners.contains(&o) {
                tracing::warn!(%ip, owner = %o, "releasing an address no pod network owns");
                if let Err(e) = self.remove(ip) {
                    tracing::error!(error = %e, "release address");
                }
            }
        }
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.leases().is_empty()
    }
}

pub fn lease_dir(root: &Path, subnet: &IpNet) -> PathBuf {
    root.join(subnet.to_string().replace('/', "_"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ipam(dir: &Path, net: &str, gw: &str) -> Ipam {
        Ipam::new(dir.to_path_buf(), net.parse().unwrap(), gw.parse().unwrap())
    }

    #[test]
    fn hands_out_each_address_once_and_skips_gateway() {
        let d = tempfile::tempdir().unwrap();
        let a = ipam(d.path(), "10.1.0.0/29", "10.1.0.1");
        let mut got: Vec<String> = (0..5)
            .map(|i| a.allocate(&format!("p{i}")).unwrap().to_string())
            .collect();
        got.sort();
        assert_eq!(
            got,
            ["10.1.0.2", "10.1.0.3", "10.1.0.4", "10.1.0.5", "10.1.0.6"]
        );
        assert!(matches!(a.allocate("p9"), Err(NetworkError::Exhausted(_))));
        a.release("p2").unwrap();
        assert_eq!(a.allocate("p9").unwrap().to_string(), "10.1.0.4");
        a.release("nobody").unwrap();
    }

    #[test]
    fn round_robin_after_release() {
        let d = tempfile::tempdir().unwrap();
        let a = ipam(d.path(), "10.1.0.0/24", "10.1.0.1");
        assert_eq!(a.allocate("a").unwrap().to_string(), "10.1.0.2");
        a.release("a").unwrap();
        assert_eq!(a.allocate("b").unwrap().to_string(), "10.1.0.3");
    }

    #[test]
    fn retain_drops_unowned_leases() {
        let d = tempfile::tempdir().unwrap();
        let a = ipam(d.path(), "fd00::/64", "fd00::1");
        assert_eq!(a.allocate("a").unwrap().to_string(), "fd00::2");
        a.allocate("b").unwrap();
        a.retain(&["a".to_string()].into());
        assert_eq!(a.leases().len(), 1);
        a.release("a").unwrap();
        assert!(a.is_empty());
    }
}
