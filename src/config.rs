//! berth's configuration: a TOML file (default /etc/berth/config.toml when it
//! exists) with command-line flags layered on top.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const DEFAULT_CONFIG_PATH: &str = "/etc/berth/config.toml";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("read config {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("parse config {path}: {source}")]
    Parse {
        path: String,
        source: Box<toml::de::Error>,
    },
    #[error("config {key}: {reason}")]
    Invalid { key: &'static str, reason: String },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// CRI gRPC socket.
    pub socket: PathBuf,
    /// Persistent state: content store, layers, image index, pods, containers.
    pub root: PathBuf,
    /// Volatile state, wiped by a reboot.
    pub state_dir: PathBuf,
    /// containers-registries.conf(5) v2 file with mirrors and registry settings.
    pub registries_config: PathBuf,
    /// tracing filter: error, warn, info, debug, trace or a full EnvFilter directive.
    pub log_level: String,
    pub image: ImageConfig,
    pub cgroup: CgroupConfig,
    pub stats: StatsConfig,
    pub container: ContainerConfig,
    pub network: crate::network::NetworkConfig,
    pub streaming: StreamingConfig,
    pub metrics: MetricsConfig,
    pub security: SecurityConfig,
    pub runtime: crate::handlers::RuntimeConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Where the Prometheus endpoint (GET /metrics) listens; unset: off.
    pub address: Option<std::net::SocketAddr>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct SecurityConfig {
    /// "required": a non-privileged container whose cgroup device program
    /// cannot be attached (no usable cgroup v2) is refused; "best-effort":
    /// it runs without one.
    pub device_policy: crate::cgroup::devices::Enforcement,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StatsConfig {
    /// Seconds between two walks of one container's writable layer (its disk
    /// use is served from the last walk in between).
    pub writable_layer_interval_secs: u64,
}

impl Default for StatsConfig {
    fn default() -> Self {
        StatsConfig {
            writable_layer_interval_secs: 10,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ContainerConfig {
    /// RLIMIT_NOFILE of container processes (soft, hard). The hard limit is
    /// capped at berth's own (raising it needs CAP_SYS_RESOURCE).
    pub nofile_soft: u64,
    pub nofile_hard: u64,
}

impl Default for ContainerConfig {
    fn default() -> Self {
        // What containerd 2 gives: select()-safe soft limit, generous hard one.
        ContainerConfig {
            nofile_soft: 1024,
            nofile_hard: 524288,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StreamingConfig {
    /// Address the Exec/Attach/PortForward HTTP server listens on.
    pub address: std::net::IpAddr,
    /// 0 picks a free port.
    pub port: u16,
    /// Seconds a URL returned by Exec/Attach/PortForward stays usable.
    pub token_ttl_secs: u64,
    /// Seconds a streaming connection may stay without traffic.
    pub idle_timeout_secs: u64,
    /// Connections (including ones still upgrading) served at once.
    pub max_connections: usize,
    /// PEM certificate chain and private key: with both, the server speaks
    /// TLS only and its URLs are https.
    pub tls_cert: Option<std::path::PathBuf>,
    pub tls_key: Option<std::path::PathBuf>,
}

impl Default for StreamingConfig {
    fn default() -> Self {
        StreamingConfig {
            address: std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            port: 0,
            token_ttl_secs: 60,
            idle_timeout_secs: 4 * 3600,
            max_connections: 256,
            tls_cert: None,
            tls_key: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct CgroupConfig {
    /// auto: use cgroup v2 when it is mounted at /sys/fs/cgroup; on; off.
    pub mode: crate::cgroup::Mode,
    /// Run with a requested limit unapplied when its controller is missing.
    pub allow_missing_controllers: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ImageConfig {
    /// Per-registry CA certificates: `<certs_dir>/<host[:port]>/*.crt` (PEM).
    pub certs_dir: PathBuf,
    /// Extra PEM CA files trusted for every registry.
    pub ca_files: Vec<PathBuf>,
    /// Layers downloaded at once per pull.
    pub max_concurrent_downloads: usize,
    /// Seconds without progress after which a registry request is abandoned.
    pub registry_timeout_secs: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            socket: PathBuf::from("/run/berth/berth.sock"),
            root: PathBuf::from("/var/lib/berth"),
            state_dir: PathBuf::from("/run/berth"),
            registries_config: PathBuf::from("/etc/berth/registries.conf"),
            log_level: "info".into(),
            image: ImageConfig::default(),
            cgroup: CgroupConfig::default(),
            stats: StatsConfig::default(),
            container: ContainerConfig::default(),
            network: crate::network::NetworkConfig::default(),
            streaming: StreamingConfig::default(),
            metrics: MetricsConfig::default(),
            security: SecurityConfig::default(),
            runtime: crate::handlers::RuntimeConfig::default(),
        }
    }
}

impl Default for ImageConfig {
    fn default() -> Self {
        ImageConfig {
            certs_dir: PathBuf::from("/etc/berth/certs.d"),
            ca_files: Vec::new(),
            max_concurrent_downloads: 3,
            registry_timeout_secs: 60,
        }
    }
}

/// Values given on the command line; each overrides the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub socket: Option<PathBuf>,
    pub root: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub registries_config: Option<PathBuf>,
    pub log_level: Option<String>,
}

impl Config {
    /// Loads `path` if given (it must exist), else the default path if it
    /// exists, else the built-in defaults; then applies `overrides`.
    pub fn load(path: Option<&Path>, overrides: Overrides) -> Result<Config, ConfigError> {
        let mut cfg = match path {
            Some(p) => Self::from_file(p)?,
            None if Path::new(DEFAULT_CONFIG_PATH).exists() => {
                Self::from_file(Path::new(DEFAULT_CONFIG_PATH))?
            }
            None => Config::default(),
        };
        if let Some(v) = overrides.socket {
            cfg.socket = v;
        }
        if let Some(v) = overrides.root {
            cfg.root = v;
        }
        if let Some(v) = overrides.state_dir {
            cfg.state_dir = v;
        }
        if let Some(v) = overrides.registries_config {
            cfg.registries_config = v;
        }
        if let Some(v) = overrides.log_level {
            cfg.log_level = v;
        }
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_toml(&text).map_err(|source| ConfigError::Parse {
            path: path.display().to_string(),
            source: Box::new(source),
        })
    }

    pub fn from_toml(text: &str) -> Result<Config, toml::de::Error> {
        toml::from_str(text)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        for (key, p) in [
            ("socket", &self.socket),
            ("root", &self.root),
            ("state_dir", &self.state_dir),
        ] {
            if !p.is_absolute() {
                return Err(ConfigError::Invalid {
                    key,
                    reason: format!("{} is not an absolute path", p.display()),
                });
            }
        }
        if self.container.nofile_soft > self.container.nofile_hard {
            return Err(ConfigError::Invalid {
                key: "container.nofile_soft",
                reason: "must not exceed container.nofile_hard".into(),
            });
        }
        if self.image.max_concurrent_downloads == 0 {
            return Err(ConfigError::Invalid {
                key: "image.max_concurrent_downloads",
                reason: "must be at least 1".into(),
            });
        }
        self.network
            .validate()
            .map_err(|(key, reason)| ConfigError::Invalid { key, reason })?;

        self.runtime
            .validate()
            .map_err(|(key, reason)| ConfigError::Invalid { key, reason })?;
        if self.streaming.token_ttl_secs == 0 {
            return Err(ConfigError::Invalid {
                key: "streaming.token_ttl_secs",
                reason: "must be at least 1".into(),
            });
        }
        if self.streaming.max_connections == 0 {
            return Err(ConfigError::Invalid {
                key: "streaming.max_connections",
                reason: "must be at least 1".into(),
            });
        }
        if self.streaming.tls_cert.is_some() != self.streaming.tls_key.is_some() {
            return Err(ConfigError::Invalid {
                key: "streaming.tls_cert",
                reason: "streaming.tls_cert and streaming.tls_key go together".into(),
            });
        }
        Ok(())
    }
}

/// The full default configuration, one comment per key (`berth config default`).
pub fn default_toml() -> String {
    let d = Config::default();
    format!(
        r#"# berth configuration (TOML). Every key is optional; shown are the defaults.
# Command-line flags of `berth serve` override these values.

# Unix socket serving the CRI v1 RuntimeService and ImageService (mode 0660).
socket = "{socket}"

# Persistent state: content store, unpacked layers, image index, pods, containers.
root = "{root}"

# Volatile state (sockets, netns pins); expected on a tmpfs wiped at boot.
state_dir = "{state_dir}"

# containers-registries.conf(5) version 2 file: [[registry]] prefix/location/
# insecure/blocked and [[registry.mirror]] entries. Ignored when absent.
registries_config = "{registries}"

# Log filter for stderr: error, warn, info, debug, trace (or an EnvFilter directive).
log_level = "{log_level}"

[image]
# Per-registry CA certificates, as <certs_dir>/<host[:port]>/*.crt (PEM).
certs_dir = "{certs_dir}"

# Extra PEM CA files trusted for every registry.
ca_files = []

# How many layers of one pull download at the same time.
max_concurrent_downloads = {mcd}

# Seconds a registry connection may stall before the request fails.
registry_timeout_secs = {rts}

[cgroup]
# auto: use cgroup v2 when it is mounted at /sys/fs/cgroup (pure v2 hosts);
# "on" also uses a hybrid host's /sys/fs/cgroup/unified; "off" never.
mode = "auto"

# Run containers whose requested limits need a missing controller (warning
# once per controller) instead of failing CreateContainer.
allow_missing_controllers = false

[stats]
# Seconds between two walks of a container's writable layer (upper directory)
# for its disk use; stats calls in between serve the last walk's result.
writable_layer_interval_secs = {wli}

[container]
# RLIMIT_NOFILE soft limit of container processes.
nofile_soft = {nofile_soft}

# RLIMIT_NOFILE hard limit, capped at berth's own hard limit (raising it
# would need CAP_SYS_RESOURCE).
nofile_hard = {nofile_hard}

[network]
# Network of non-hostNetwork pods: "builtin" (berth's bridge, veth pairs,
# IPAM, NAT and host ports), "cni" (plugins configured in cni_conf_dir) or
# "none" (loopback only).
mode = "builtin"

# builtin: the bridge, created on first use and removed with the last pod.
bridge = "{bridge}"

# builtin: pod IPv4 subnet.
subnet = "{subnet}"

# builtin: the gateway, the bridge's address (default: the subnet's first
# address), e.g.
#   gateway = "{gateway}"

# builtin: an IPv6 subnet gives every pod an IPv6 address too (dual stack),
# with its gateway (default: the subnet's first address), e.g.
#   subnet_v6 = "fd00:88::/64"
#   gateway_v6 = "fd00:88::1"

# builtin: MTU of the bridge and of the pods' eth0.
mtu = {mtu}

# builtin: turn on net.ipv4.ip_forward (and IPv6 forwarding with subnet_v6),
# which egress and host ports need; berth logs when it does.
ip_forward = true

# cni: directory whose first *.conflist/*.conf/*.json (by name) is the pod
# network; re-read at each pod, so a config written later needs no restart.
cni_conf_dir = "{cni_conf}"

# cni: directories searched for plugin binaries, in order.
cni_bin_dirs = [{cni_bins}]

# cni: seconds one plugin invocation (ADD/DEL/CHECK) may run before it is
# killed and the operation fails.
cni_plugin_timeout_secs = {cni_timeout}

[streaming]
# Address of the HTTP server whose URLs Exec, Attach and PortForward
# return (SPDY/3.1 and WebSocket upgrades).
address = "{s_addr}"

# Its port; 0 picks a free port at every start.
port = {s_port}

# Seconds a returned URL stays usable; each URL works once.
token_ttl_secs = {s_ttl}

# Seconds a streaming session may go without traffic before it is closed.
idle_timeout_secs = {s_idle}

# Connections served at once (the rest are refused), upgrading ones included.
max_connections = {s_max}

# PEM certificate chain and private key: with both set the server speaks
# only TLS and the URLs are https (unset: plain http).
# tls_cert = "/etc/berth/streaming.crt"
# tls_key = "/etc/berth/streaming.key"

[metrics]
# Prometheus text endpoint (GET /metrics): RPC counts, errors and latencies,
# pods and containers by state, image pulls, berth's processes, memory and
# fds. Off unless an address is set, e.g.
# address = "127.0.0.1:9405"

[security]
# Device access of containers is a BPF program on each container's cgroup
# (cgroup v2): only the standard devices, the CRI-requested ones with their
# permissions, and mknod. Where it cannot be attached (no usable cgroup v2,
# e.g. cgroup.mode = "off" or a hybrid host), "required" refuses to create
# non-privileged containers (FailedPrecondition); "best-effort" runs them
# without it (a warning each), leaving device nodes they create or are
# given guarded by file permissions alone. Privileged containers get every
# device either way.
device_policy = "required"

[runtime]
# RuntimeClass handlers, picked by RunPodSandbox's runtime_handler (the
# RuntimeClass's `handler`). The empty name is berth's built-in runtime.
# Each [runtime.handlers.<name>] (a DNS label) is one of:
#
#   type = "builtin": berth's own runtime with its own defaults:
#     user_namespaces = true         # its pods may ask for a user namespace
#     default_capabilities = [...]   # base capability set (default: containerd's)
#
#   type = "oci": an external OCI runtime (runc, crun, youki...) that runs
#   the bundle berth writes; berth's monitor still owns logs and exit status:
#     binary = "/usr/sbin/runc"      # absolute; must answer --version at start
#     root = "/run/berth/runtimes/<name>"   # its --root (this is the default)
#     args = []                      # extra global arguments
#     cgroup_manager = "cgroupfs"    # "cgroupfs": the runtime puts the container
#                                    # in berth's cgroup for it; "disabled": no
#                                    # cgroups at all (crun only), for hosts
#                                    # whose cgroups berth must not touch
#
# e.g.
#   [runtime.handlers.runc]
#   type = "oci"
#   binary = "/usr/sbin/runc"
"#,
        socket = d.socket.display(),
        root = d.root.display(),
        state_dir = d.state_dir.display(),
        registries = d.registries_config.display(),
        log_level = d.log_level,
        certs_dir = d.image.certs_dir.display(),
        mcd = d.image.max_concurrent_downloads,
        rts = d.image.registry_timeout_secs,
        wli = d.stats.writable_layer_interval_secs,
        nofile_soft = d.container.nofile_soft,
        nofile_hard = d.container.nofile_hard,
        bridge = d.network.bridge,
        subnet = d.network.subnet,
        gateway = d.network.gateway_v4(),
        mtu = d.network.mtu,
        cni_conf = d.network.cni_conf_dir.display(),
        cni_bins = d
            .network
            .cni_bin_dirs
            .iter()
            .map(|p| format!("{:?}", p.display().to_string()))
            .collect::<Vec<_>>()
            .join(", "),
        cni_timeout = d.network.cni_plugin_timeout_secs,
        s_addr = d.streaming.address,
        s_port = d.streaming.port,
        s_ttl = d.streaming.token_ttl_secs,
        s_idle = d.streaming.idle_timeout_secs,
        s_max = d.streaming.max_connections,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_toml_parses_to_defaults() {
        assert_eq!(
            Config::from_toml(&default_toml()).unwrap(),
            Config::default()
        );
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let e = Config::from_toml("sockett = \"/x\"").unwrap_err();
        assert!(e.to_string().contains("sockett"), "{e}");
    }

    #[test]
    fn flags_override_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "root = \"/srv/berth\"\nlog_level = \"warn\"\n").unwrap();
        let cfg = Config::load(
            Some(&p),
            Overrides {
                log_level: Some("debug".into()),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(cfg.root, PathBuf::from("/srv/berth"));
        assert_eq!(cfg.log_level, "debug");
    }

    #[test]
    fn network_section() {
        let c = Config::from_toml(
            "[network]\nmode = \"cni\"\nsubnet = \"10.5.0.0/24\"\nsubnet_v6 = \"fd00:5::/64\"\n",
        )
        .unwrap();
        assert_eq!(c.network.mode, crate::network::Mode::Cni);
        assert_eq!(c.network.gateway_v4().to_string(), "10.5.0.1");
        assert!(Config::from_toml("[network]\nmode = \"bridge\"\n").is_err());
        let mut bad = Config::default();
        bad.network.mtu = 10;
        assert!(matches!(
            bad.validate(),
            Err(ConfigError::Invalid {
                key: "network.mtu",
                ..
            })
        ));
    }

    #[test]
    fn streaming_tls_needs_both_cert_and_key() {
        let mut c = Config::from_toml("[streaming]\ntls_cert = \"/etc/c.pem\"\n").unwrap();
        assert!(matches!(
            c.validate(),
            Err(ConfigError::Invalid {
                key: "streaming.tls_cert",
                ..
            })
        ));
        c.streaming.tls_key = Some("/etc/k.pem".into());
        assert!(c.validate().is_ok());
    }

    #[test]
    fn device_policy_defaults_to_required() {
        use crate::cgroup::devices::Enforcement;
        assert_eq!(
            Config::default().security.device_policy,
            Enforcement::Required
        );
        let c = Config::from_toml("[security]\ndevice_policy = \"best-effort\"\n").unwrap();
        assert_eq!(c.security.device_policy, Enforcement::BestEffort);
        let e = Config::from_toml("[security]\ndevice_policy = \"off\"\n").unwrap_err();
        assert!(e.to_string().contains("best-effort"), "{e}");
    }

    #[test]
    fn relative_paths_are_invalid() {
        let e = Config::load(
            None,
            Overrides {
                root: Some("rel".into()),
                ..Default::default()
            },
        );
        // Only meaningful when no system config file overrides the flag.
        assert!(e.is_err());
    }
}
