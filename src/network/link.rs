//! Links, addresses and routes over rtnetlink.
//!
//! Each call runs on its own thread with a small current-thread runtime:
//! the netlink socket belongs to the network namespace of the thread that
//! opens it, and callers are both blocking RPC threads and the async startup
//! path, neither of which may block on the daemon's runtime.

use super::NetworkError;
use futures::TryStreamExt;
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags, AddressHeaderFlags};
use rtnetlink::packet_route::link::{InfoData, InfoVeth, LinkAttribute};
use rtnetlink::{Handle, LinkBridge, LinkBridgePort, LinkMessageBuilder, LinkUnspec, LinkVeth};
use std::future::Future;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::path::Path;

const ENODEV: i32 = libc::ENODEV;
const EEXIST: i32 = libc::EEXIST;

fn nl(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetworkError {
    let what = what.into();
    move |e| NetworkError::Netlink {
        what,
        message: e.to_string(),
    }
}

fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

/// Runs `f` with a netlink handle in the daemon's own network namespace, or
/// in the one pinned at `netns`.
pub fn run<T, F, Fut>(netns: Option<&Path>, f: F) -> Result<T, NetworkError>
where
    T: Send + 'static,
    F: FnOnce(Handle) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, NetworkError>>,
{
    let body = move || -> Result<T, NetworkError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(|source| NetworkError::Io {
                what: "start netlink runtime".into(),
                source,
            })?;
        rt.block_on(async move {
            let (conn, handle, _) =
                rtnetlink::new_connection().map_err(|source| NetworkError::Io {
                    what: "open netlink socket".into(),
                    source,
                })?;
            let conn = tokio::spawn(conn);
            let r = f(handle).await;
            conn.abort();
            r
        })
    };
    match netns {
        Some(p) => crate::linux::netns::run_in(p, body).map_err(|e| NetworkError::Netns {
            netns: p.display().to_string(),
            message: e.to_string(),
        })?,
        None => std::thread::spawn(body).join().unwrap_or_else(|_| {
            Err(NetworkError::Io {
                what: "netlink thread".into(),
                source: std::io::Error::other("panicked"),
            })
        }),
    }
}

/// The index of link `name`, if it exists.
pub async fn index(h: &Handle, name: &str) -> Result<Option<u32>, NetworkError> {
    let mut links = h.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(Some(m)) => Ok(Some(m.header.index)),
        Ok(None) => Ok(None),
        Err(e) if errno(&e) == Some(ENODEV) => Ok(None),
        Err(e) => Err(nl(format!("look up link {name}"))(e)),
    }
}

/// Names of every link in the namespace.
pub async fn names(h: &Handle) -> Result<Vec<String>, NetworkError> {
    let mut out = Vec::new();
    let mut links = h.link().get().execute();
    while let Some(m) = links.try_next().await.map_err(nl("list links"))? {
        for a in m.attributes {
            if let LinkAttribute::IfName(n) = a {
                out.push(n);
            }
        }
    }
    Ok(out)
}

/// Deletes link `name`; an absent link is fine.
pub async fn delete(h: &Handle, name: &str) -> Result<(), NetworkError> {
    let Some(i) = index(h, name).await? else {
        return Ok(());
    };
    match h.link().del(i).execute().await {
        Err(e) if errno(&e) != Some(ENODEV) => Err(nl(format!("delete link {name}"))(e)),
        _ => Ok(()),
    }
}

/// Adds `addr/prefix` to link `index` unless it is there already. IPv6
/// addresses skip duplicate address detection: berth's allocator already
/// guarantees uniqueness, and a tentative address would fail the first
/// connections.
pub async fn add_address(
    h: &Handle,
    index: u32,
    addr: IpAddr,
    prefix: u8,
) -> Result<(), NetworkError> {
    let mut req = h.address().add(index, addr, prefix);
    if addr.is_ipv6() {
        let m = req.message_mut();
        m.header.flags |= AddressHeaderFlags::Nodad;
        m.attributes
            .push(AddressAttribute::Flags(AddressFlags::Nodad));
    }
    match req.execute().await {
        Err(e) if errno(&e) != Some(EEXIST) => Err(nl(format!("add address {addr}/{prefix}"))(e)),
        _ => Ok(()),
    }
}

pub async fn set_up(h: &Handle, index: u32, what: &str) -> Result<(), NetworkError> {
    h.link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(nl(format!("set {what} up")))
}

/// Creates bridge `name` (if needed) with the gateway addresses, up.
pub async fn ensure_bridge(
    h: &Handle,
    name: &str,
    mtu: u32,
    addrs: &[(IpAddr, u8)],
) -> Result<u32, NetworkError> {
    let idx = match index(h, name).await? {
        Some(i) => i,
        None => {
            match h
                .link()
                .add(LinkBridge::new(name).mtu(mtu).build())
                .execute()
                .await
            {
                Err(e) if errno(&e) != Some(EEXIST) => {
                    return Err(nl(format!("create bridge {name}"))(e))
                }
                _ => {}
            }
            index(h, name).await?.ok_or_else(|| NetworkError::Netlink {
                what: format!("create bridge {name}"),
                message: "bridge vanished after creation".into(),
            })?
        }
    };
    for (a, p) in addrs {
        add_address(h, idx, *a, *p).await?;
    }
    set_up(h, idx, name).await?;
    Ok(idx)
}

/// Creates the veth pair `host` <-> `peer`, the peer end made directly inside
/// the namespace pinned at `netns` (so its name never clashes on the host),
/// and attaches `host` to bridge `bridge`, up.
pub async fn create_veth(
    h: &Handle,
    host: &str,
    peer: &str,
    netns: &Path,
    bridge: u32,
    mtu: u32,
) -> Result<(), NetworkError> {
    let ns = std::fs::File::open(netns).map_err(|source| NetworkError::Io {
        what: format!("open netns {}", netns.display()),
        source,
    })?;
    let peer_msg = LinkMessageBuilder::<LinkUnspec>::new()
        .name(peer.to_string())
        .mtu(mtu)
        .setns_by_fd(ns.as_raw_fd())
        .build();
    let msg = LinkVeth::new(host, peer)
        .mtu(mtu)
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer_msg)))
        .build();
    h.link()
        .add(msg)
        .execute()
        .await
        .map_err(nl(format!("create veth {host}")))?;
    drop(ns);
    let idx = index(h, host).await?.ok_or_else(|| NetworkError::Netlink {
        what: format!("create veth {host}"),
        message: "link vanished after creation".into(),
    })?;
    h.link()
        .set(
            LinkUnspec::new_with_index(idx)
                .controller(bridge)
                .up()
                .build(),
        )
        .execute()
        .await
        .map_err(nl(format!("attach {host} to the bridge")))?;
    // Hairpin, as CNI's bridge plugin offers it: on hosts with
    // br_netfilter, a pod reaching its own host port is DNAT-ed while still
    // bridged and must go back out of the port it came in on.
    h.link()
        .set_port(LinkBridgePort::new(idx).hairpin(true).build())
        .execute()
        .await
        .map_err(nl(format!("set hairpin on {host}")))
}

/// Inside the pod's namespace: `ifname` up with its addresses and a default
/// route per family through the gateway.
pub async fn configure_pod_side(
    h: &Handle,
    ifname: &str,
    addrs: &[(IpAddr, u8)],
    gateways: &[IpAddr],
) -> Result<(), NetworkError> {
    let idx = index(h, ifname)
        .await?
        .ok_or_else(|| NetworkError::Netlink {
            what: format!("configure {ifname}"),
            message: "no such link in the pod namespace".into(),
        })?;
    for (a, p) in addrs {
        add_address(h, idx, *a, *p).await?;
    }
    set_up(h, idx, ifname).await?;
    for gw in gateways {
        let msg = match gw {
            IpAddr::V4(g) => rtnetlink::RouteMessageBuilder::<std::net::Ipv4Addr>::new()
                .gateway(*g)
                .output_interface(idx)
                .build(),
            IpAddr::V6(g) => rtnetlink::RouteMessageBuilder::<std::net::Ipv6Addr>::new()
                .gateway(*g)
                .output_interface(idx)
                .build(),
        };
        match h.route().add(msg).execute().await {
            Err(e) if errno(&e) != Some(EEXIST) => {
                return Err(nl(format!("add default route via {gw}"))(e))
            }
            _ => {}
        }
    }
    Ok(())
}
