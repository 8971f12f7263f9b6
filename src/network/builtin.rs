//! The built-in network: bridge, one veth pair per pod (`eth0` inside),
//! addresses from [`Ipam`], MASQUERADE and host-port DNAT in berth's
//! nftables table.
//!
//! Records: `<dir>/pods/<pod id>.json` ([`Attachment`]) is written before
//! any of the pod's objects exist, and the host end of its veth is named
//! after the pod id, so every object can be found again after a crash. The
//! bridge and the nftables table are shared: they exist while at least one
//! attachment does.

use super::ipam::{lease_dir, Ipam};
use super::{link, nft, NetworkConfig, NetworkError, PodNetwork, PortMapping, Readiness};
use crate::store::{lock, read_json, write_json};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Host ends of berth's veths: the prefix plus 10 hex digits of the pod id
/// (15 characters, the kernel's limit).
const VETH_PREFIX: &str = "bveth";
const POD_IFNAME: &str = "eth0";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    pub id: String,
    pub netns: PathBuf,
    pub veth: String,
    pub ips: Vec<IpAddr>,
    pub ports: Vec<PortMapping>,
}

struct Family {
    subnet: IpNet,
    gateway: IpAddr,
    ipam: Ipam,
}

pub struct Builtin {
    bridge: String,
    mtu: u32,
    ip_forward: bool,
    families: Vec<Family>,
    records: PathBuf,
    /// Loaded attachments; also serialises every change to shared objects.
    pods: Mutex<BTreeMap<String, Attachment>>,
}

fn veth_name(id: &str) -> String {
    let short: String = id.chars().take(10).collect();
    format!("{VETH_PREFIX}{short}")
}

fn write_sysctl(path: &str, value: &str) -> Result<bool, NetworkError> {
    let cur = std::fs::read_to_string(path).unwrap_or_default();
    if cur.trim() == value {
        return Ok(false);
    }
    std::fs::write(path, value).map_err(|source| NetworkError::Io {
        what: format!("write {path}"),
        source,
    })?;
    Ok(true)
}

impl Builtin {
    pub fn new(cfg: &NetworkConfig, dir: &Path) -> Builtin {
        let ipam_dir = dir.join("ipam");
        let mut families = Vec::new();
        let v4 = IpNet::V4(cfg.subnet);
        families.push(Family {
            subnet: v4,
            gateway: IpAddr::V4(cfg.gateway_v4()),
            ipam: Ipam::new(lease_dir(&ipam_dir, &v4), v4, IpAddr::V4(cfg.gateway_v4())),
        });
        if let (Some(n), Some(gw)) = (cfg.subnet_v6, cfg.gateway_v6()) {
            let v6 = IpNet::V6(n);
            families.push(Family {
                subnet: v6,
                gateway: IpAddr::V6(gw),
                ipam: Ipam::new(lease_dir(&ipam_dir, &v6), v6, IpAddr::V6(gw)),
            });
        }
        Builtin {
            bridge: cfg.bridge.clone(),
            mtu: cfg.mtu,
            ip_forward: cfg.ip_forward,
            families,
            records: dir.join("pods"),
            pods: Mutex::new(BTreeMap::new()),
        }
    }

    fn record_path(&self, id: &str) -> PathBuf {
        self.records.join(format!("{id}.json"))
    }

    fn persist(&self, a: &Attachment) -> Result<(), NetworkError> {
        std::fs::create_dir_all(&self.records).map_err(|source| NetworkError::Io {
            what: format!("create {}", self.records.display()),
            source,
        })?;
        Ok(write_json(&self.record_path(&a.id), a)?)
    }

    pub fn setup(&self, pod: &PodNetwork) -> Result<Vec<IpAddr>, NetworkError> {
        let mut pods = lock(&self.pods);
        for other in pods.values().filter(|a| a.id != pod.id) {
            for mine in &pod.ports {
                if let Some(p) = other.ports.iter().find(|p| p.overlaps(mine)) {
                    return Err(NetworkError::PortConflict {
                        host_port: p.host_port,
                        protocol: p.protocol,
                        on: mine.describe_ip(),
                        owner: other.id.clone(),
                    });
                }
            }
        }
        let mut a = Attachment {
            id: pod.id.clone(),
            netns: pod.netns.clone(),
            veth: veth_name(&pod.id),
            ips: Vec::new(),
            ports: pod.ports.clone(),
        };
        let made = (|| {
            self.persist(&a)?;
            crate::failpoint::hit("net-after-record");
            for f in &self.families {
                a.ips.push(f.ipam.allocate(&a.id)?);
            }
            self.persist(&a)?;
            crate::failpoint::hit("net-after-ipam");
            pods.insert(a.id.clone(), a.clone());
            self.connect(&a)?;
            crate::failpoint::hit("net-after-veth");
            self.apply_rules(&pods)?;
            crate::failpoint::hit("net-after-rules");
            Ok(())
        })();
        if let Err(e) = made {
            if let Err(cleanup) = self.teardown_locked(&mut pods, &pod.id) {
                tracing::error!(pod = %pod.id, error = %cleanup, "network cleanup after a failed setup");
            }
            return Err(e);
        }
        tracing::info!(pod = %pod.id, ips = ?a.ips, veth = %a.veth, "pod network up");
        Ok(a.ips)
    }

    /// Bridge (first use), veth, and the pod side of it.
    fn connect(&self, a: &Attachment) -> Result<(), NetworkError> {
        let gw_addrs: Vec<(IpAddr, u8)> = self
            .families
            .iter()
            .map(|f| (f.gateway, f.subnet.prefix_len()))
            .collect();
        let (bridge, mtu, veth, netns) = (
            self.bridge.clone(),
            self.mtu,
            a.veth.clone(),
            a.netns.clone(),
        );
        link::run(None, move |h| async move {
            let idx = link::ensure_bridge(&h, &bridge, mtu, &gw_addrs).await?;
            link::create_veth(&h, &veth, POD_IFNAME, &netns, idx, mtu).await
        })?;
        self.host_sysctls()?;
        let addrs: Vec<(IpAddr, u8)> = a
            .ips
            .iter()
            .zip(&self.families)
            .map(|(ip, f)| (*ip, f.subnet.prefix_len()))
            .collect();
        let gws: Vec<IpAddr> = self.families.iter().map(|f| f.gateway).collect();
        link::run(Some(&a.netns), move |h| async move {
            link::configure_pod_side(&h, POD_IFNAME, &addrs, &gws).await
        })
    }

    fn host_sysctls(&self) -> Result<(), NetworkError> {
        // Host ports reached through 127.0.0.1 from the host itself are
        // routed out of the bridge only with route_localnet.
        write_sysctl(
            &format!("/proc/sys/net/ipv4/conf/{}/route_localnet", self.bridge),
            "1",
        )?;
        if self.ip_forward {
            if write_sysctl("/proc/sys/net/ipv4/ip_forward", "1")? {
                tracing::info!("turned on IPv4 forwarding (network.ip_forward)");
            }
            if self.families.len() > 1
                && write_sysctl("/proc/sys/net/ipv6/conf/all/forwarding", "1")?
            {
                tracing::info!("turned on IPv6 forwarding (network.ip_forward)");
            }
        }
        Ok(())
    }

    fn apply_rules(&self, pods: &BTreeMap<String, Attachment>) -> Result<(), NetworkError> {
        if pods.is_empty() {
            return nft::delete_table();
        }
        let subnets: Vec<IpNet> = self.families.iter().map(|f| f.subnet).collect();
        let ports: Vec<nft::PodPorts<'_>> = pods
            .values()
            .map(|a| nft::PodPorts {
                ips: &a.ips,
                ports: &a.ports,
            })
            .collect();
        nft::apply(&nft::ruleset(&self.bridge, &subnets, &ports))
    }

    pub fn teardown(&self, id: &str) -> Result<(), NetworkError> {
        let mut pods = lock(&self.pods);
        self.teardown_locked(&mut pods, id)
    }

    fn teardown_locked(
        &self,
        pods: &mut BTreeMap<String, Attachment>,
        id: &str,
    ) -> Result<(), NetworkError> {
        let known = pods.remove(id).is_some() || self.record_path(id).exists();
        // Deleting the host end removes the pair, wherever the peer is.
        let veth = veth_name(id);
        link::run(None, move |h| async move { link::delete(&h, &veth).await })?;
        for f in &self.families {
            f.ipam.release(id)?;
        }
        let rec = self.record_path(id);
        match std::fs::remove_file(&rec) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(NetworkError::Io {
                    what: format!("remove {}", rec.display()),
                    source: e,
                })
            }
            _ => {}
        }
        self.apply_rules(pods)?;
        if pods.is_empty() {
            self.remove_bridge()?;
        }
        if known {
            tracing::info!(pod = %id, "pod network down");
        }
        Ok(())
    }

    fn remove_bridge(&self) -> Result<(), NetworkError> {
        let bridge = self.bridge.clone();
        link::run(
            None,
            move |h| async move { link::delete(&h, &bridge).await },
        )
    }

    fn load(&self) -> BTreeMap<String, Attachment> {
        let mut out = BTreeMap::new();
        let Ok(rd) = std::fs::read_dir(&self.records) else {
            return out;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.extension().is_none_or(|x| x != "json") {
                continue;
            }
            match read_json::<Attachment>(&p) {
                Ok(Some(a)) => {
                    out.insert(a.id.clone(), a);
                }
                Ok(None) => {}
                Err(err) => {
                    // A torn record is impossible (atomic writes); an
                    // unreadable one is kept for inspection.
                    tracing::error!(record = %p.display(), error = %err, "unreadable network record");
                }
            }
        }
        out
    }

    pub fn reconcile(&self, live: &BTreeMap<String, PathBuf>) {
        let mut pods = lock(&self.pods);
        *pods = self.load();
        let dead: Vec<String> = pods
            .keys()
            .filter(|id| !live.contains_key(*id))
            .cloned()
            .collect();
        for id in dead {
            tracing::warn!(pod = %id, "removing the network of a pod that no longer exists");
            if let Err(e) = self.teardown_locked(&mut pods, &id) {
                tracing::error!(pod = %id, error = %e, "remove stale pod network");
            }
        }
        let owned: BTreeSet<String> = pods.values().map(|a| a.veth.clone()).collect();
        let stray = link::run(None, |h| async move { link::names(&h).await }).map(|names| {
            names
                .into_iter()
                .filter(|n| n.starts_with(VETH_PREFIX) && n.len() == 15 && !owned.contains(n))
                .collect::<Vec<_>>()
        });
        match stray {
            Ok(stray) => {
                for v in stray {
                    tracing::warn!(veth = %v, "removing a veth no pod network owns");
                    let name = v.clone();
                    if let Err(e) =
                        link::run(None, move |h| async move { link::delete(&h, &name).await })
                    {
                        tracing::error!(veth = %v, error = %e, "remove stray veth");
                    }
                }
            }
            Err(e) => tracing::error!(error = %e, "list links"),
        }
        let ids: BTreeSet<String> = pods.keys().cloned().collect();
        for f in &self.families {
            f.ipam.retain(&ids);
        }
        let r = self.apply_rules(&pods).and_then(|_| {
            if pods.is_empty() {
                self.remove_bridge()
            } else {
                Ok(())
            }
        });
        if let Err(e) = r {
            tracing::error!(error = %e, "restore the network's shared objects");
        }
    }

    pub fn readiness(&self) -> Readiness {
        if super::in_path("nft").is_none() {
            return Readiness::not_ready(
                "NftablesMissing",
                "the nft command (Debian package nftables) is needed for pod egress and host ports"
                    .into(),
            );
        }
        Readiness::ready()
    }
}
