//! Pod networks: the built-in bridge network (veth pairs, on-disk IPAM,
//! nftables NAT and host ports) or standard CNI plugins. Knows pods only as
//! ids with a network namespace pin; nothing about CRI.
//!
//! Each driver records on disk what it is about to create before creating it
//! (`<root>/network/...`), so [`Network::reconcile`] can remove whatever a
//! kill -9 left behind that no live pod owns.

mod builtin;
mod cni;
mod ipam;
mod link;
mod nft;

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("invalid port mapping: {0}")]
    InvalidPort(String),
    #[error("host port {host_port}/{protocol}{on} is already mapped by pod sandbox {owner}")]
    PortConflict {
        host_port: u16,
        protocol: Protocol,
        on: String,
        owner: String,
    },
    #[error("no free address left in {0}")]
    Exhausted(String),
    #[error("network is not ready: {0}")]
    NotReady(String),
    #[error("{what}: {message}")]
    Netlink { what: String, message: String },
    #[error("network namespace {netns}: {message}")]
    Netns { netns: String, message: String },
    #[error("nftables: {0}")]
    Nftables(String),
    #[error("CNI plugin {plugin} {command}: {message}")]
    Cni {
        plugin: String,
        command: String,
        message: String,
    },
    #[error("CNI config: {0}")]
    CniConfig(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    State(#[from] crate::store::StoreError),
}

/// Which network non-hostNetwork pods get.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// berth's own bridge network.
    #[default]
    Builtin,
    /// Plugins from the CNI config directory.
    Cni,
    /// Loopback only.
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        })
    }
}

/// A host port forwarded to the pod (`host_port` is never 0 here: mappings
/// without a host port need nothing from the network).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortMapping {
    pub protocol: Protocol,
    pub container_port: u16,
    pub host_port: u16,
    /// Only this host address; `None` for all of them.
    pub host_ip: Option<IpAddr>,
}

impl PortMapping {
    /// Whether two mappings would claim the same host socket.
    fn overlaps(&self, o: &PortMapping) -> bool {
        self.protocol == o.protocol
            && self.host_port == o.host_port
            && match (self.host_ip, o.host_ip) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            }
    }

    fn describe_ip(&self) -> String {
        self.host_ip
            .map(|ip| format!(" on {ip}"))
            .unwrap_or_default()
    }
}

/// Rejects a pod whose own mappings claim one host port twice.
fn check_own_ports(ports: &[PortMapping]) -> Result<(), NetworkError> {
    for (i, a) in ports.iter().enumerate() {
        if ports[..i].iter().any(|b| a.overlaps(b)) {
            return Err(NetworkError::InvalidPort(format!(
                "host port {}/{}{} is listed twice",
                a.host_port,
                a.protocol,
                a.describe_ip()
            )));
        }
    }
    Ok(())
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dns {
    pub servers: Vec<String>,
    pub searches: Vec<String>,
    pub options: Vec<String>,
}

/// What a driver needs to know about a pod.
#[derive(Debug, Clone)]
pub struct PodNetwork {
    pub id: String,
    pub netns: PathBuf,
    pub name: String,
    pub namespace: String,
    pub uid: String,
    pub ports: Vec<PortMapping>,
    pub dns: Option<Dns>,
}

/// Network settings (the `[network]` config section).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkConfig {
    /// builtin, cni or none.
    pub mode: Mode,
    /// Bridge of the built-in network.
    pub bridge: String,
    pub subnet: ipnet::Ipv4Net,
    /// Default: the first address of `subnet`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway: Option<std::net::Ipv4Addr>,
    /// Gives pods an IPv6 address too (dual stack).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subnet_v6: Option<ipnet::Ipv6Net>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway_v6: Option<std::net::Ipv6Addr>,
    pub mtu: u32,
    /// Turn on IP forwarding (needed for egress and host ports).
    pub ip_forward: bool,
    pub cni_conf_dir: PathBuf,
    pub cni_bin_dirs: Vec<PathBuf>,
    /// Seconds one CNI plugin invocation may take before it is killed.
    pub cni_plugin_timeout_secs: u64,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig {
            mode: Mode::Builtin,
            bridge: "berth0".into(),
            subnet: "10.88.0.0/16".parse().expect("static subnet"),
            gateway: None,
            subnet_v6: None,
            gateway_v6: None,
            mtu: 1500,
            ip_forward: true,
            cni_conf_dir: PathBuf::from("/etc/cni/net.d"),
            cni_bin_dirs: vec![PathBuf::from("/opt/cni/bin"), PathBuf::from("/usr/lib/cni")],
            cni_plugin_timeout_secs: 60,
        }
    }
}

impl NetworkConfig {
    pub fn gateway_v4(&self) -> std::net::Ipv4Addr {
        self.gateway
            .unwrap_or_else(|| self.subnet.hosts().next().unwrap_or(self.subnet.addr()))
    }

    pub fn gateway_v6(&self) -> Option<std::net::Ipv6Addr> {
        self.subnet_v6.map(|n| {
            self.gateway_v6
                .unwrap_or_else(|| (u128::from(n.network()) + 1).into())
        })
    }

    /// Problems with the settings, as (key, reason).
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        let b = &self.bridge;
        if b.is_empty() || b.len() > 15 || b.contains(['/', ' ', ':']) || b == "." || b == ".." {
            return Err((
                "network.bridge",
                format!(
                    "{b:?} is not a valid interface name (1-15 characters, no '/', ':' or spaces)"
                ),
            ));
        }
        if self.subnet.prefix_len() > 30 {
            return Err((
                "network.subnet",
                format!("{} has no room for pods", self.subnet),
            ));
        }
        let gw = self.gateway_v4();
        if !self.subnet.contains(&gw)
            || gw == self.subnet.network()
            || gw == self.subnet.broadcast()
        {
            return Err((
                "network.gateway",
                format!("{gw} is not a host address of {}", self.subnet),
            ));
        }
        if let Some(n) = self.subnet_v6 {
            if n.prefix_len() > 126 {
                return Err(("network.subnet_v6", format!("{n} has no room for pods")));
            }
            let gw = self.gateway_v6().unwrap_or(n.network());
            if !n.contains(&gw) || gw == n.network() {
                return Err((
                    "network.gateway_v6",
                    format!("{gw} is not a host address of {n}"),
                ));
            }
        }
        if !(68..=65535).contains(&self.mtu) {
            return Err(("network.mtu", format!("{} is outside 68..65535", self.mtu)));
        }
        if self.cni_plugin_timeout_secs == 0 {
            return Err((
                "network.cni_plugin_timeout_secs",
                "must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

/// Whether pods can get a network now (the CRI NetworkReady condition).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Readiness {
    pub ready: bool,
    pub reason: String,
    pub message: String,
}

impl Readiness {
    fn ready() -> Readiness {
        Readiness {
            ready: true,
            reason: String::new(),
            message: String::new(),
        }
    }

    fn not_ready(reason: &str, message: String) -> Readiness {
        Readiness {
            ready: false,
            reason: reason.into(),
            message,
        }
    }
}

/// The configured driver.
pub enum Network {
    Builtin(builtin::Builtin),
    Cni(cni::Cni),
    None,
}

impl Network {
    /// `root` is berth's persistent state directory.
    pub fn new(cfg: &NetworkConfig, root: &Path) -> Network {
        let dir = root.join("network");
        match cfg.mode {
            Mode::Builtin => Network::Builtin(builtin::Builtin::new(cfg, &dir)),
            Mode::Cni => Network::Cni(cni::Cni::new(cfg, &dir)),
            Mode::None => Network::None,
        }
    }

    /// Connects the pod; returns its addresses (primary first).
    pub fn setup(&self, pod: &PodNetwork) -> Result<Vec<IpAddr>, NetworkError> {
        check_own_ports(&pod.ports)?;
        match self {
            Network::Builtin(b) => b.setup(pod),
            Network::Cni(c) => c.setup(pod),
            Network::None => Ok(Vec::new()),
        }
    }

    /// Disconnects the pod and releases what it held. Idempotent; works
    /// after a half-done setup and when the namespace is already gone.
    pub fn teardown(&self, id: &str, netns: &Path) -> Result<(), NetworkError> {
        match self {
            Network::Builtin(b) => b.teardown(id),
            Network::Cni(c) => c.teardown(id, netns),
            Network::None => Ok(()),
        }
    }

    /// At startup: removes the networks of pods not in `live` (pod id ->
    /// netns pin) and every object no record owns.
    pub fn reconcile(&self, live: &BTreeMap<String, PathBuf>) {
        match self {
            Network::Builtin(b) => b.reconcile(live),
            Network::Cni(c) => c.reconcile(live),
            Network::None => {}
        }
    }

    pub fn readiness(&self) -> Readiness {
        match self {
            Network::Builtin(b) => b.readiness(),
            Network::Cni(c) => c.readiness(),
            Network::None => Readiness::ready(),
        }
    }
}

/// The first `name` executable in `PATH`.
fn in_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pm(port: u16, ip: Option<&str>) -> PortMapping {
        PortMapping {
            protocol: Protocol::Tcp,
            container_port: 80,
            host_port: port,
            host_ip: ip.map(|i| i.parse().unwrap()),
        }
    }

    #[test]
    fn overlapping_ports() {
        assert!(pm(80, None).overlaps(&pm(80, Some("10.0.0.1"))));
        assert!(!pm(80, Some("10.0.0.2")).overlaps(&pm(80, Some("10.0.0.1"))));
        assert!(!pm(81, None).overlaps(&pm(80, None)));
        let mut udp = pm(80, None);
        udp.protocol = Protocol::Udp;
        assert!(!udp.overlaps(&pm(80, None)));
        assert!(check_own_ports(&[pm(80, None), pm(80, None)]).is_err());
    }

    #[test]
    fn config_validation() {
        let mut c = NetworkConfig::default();
        assert!(c.validate().is_ok());
        assert_eq!(c.gateway_v4().to_string(), "10.88.0.1");
        c.subnet_v6 = Some("fd00:88::/64".parse().unwrap());
        assert_eq!(c.gateway_v6().unwrap().to_string(), "fd00:88::1");
        c.bridge = "a-very-long-bridge-name".into();
        assert_eq!(c.validate().unwrap_err().0, "network.bridge");
        c.bridge = "br".into();
        c.gateway = Some("10.99.0.1".parse().unwrap());
        assert_eq!(c.validate().unwrap_err().0, "network.gateway");
    }
}
