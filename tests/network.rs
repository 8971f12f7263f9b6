//! Pod networking against a real daemon, all inside the test's private
//! network namespace (never the host's): the built-in bridge network (pod to
//! pod, pod to host, egress NAT to another test-made namespace, TCP/UDP host
//! ports from the test's namespace and from a "client" namespace, IPAM reuse
//! rules, dual stack, teardown idempotence, kill -9 mid-setup) and the CNI
//! driver with Debian's containernetworking-plugins and a hung plugin.
//!
//! Sockets are made by test threads that joined the pod's (or another)
//! network namespace with setns(2); a socket stays in the namespace it was
//! created in, so the test can then use it from anywhere.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use cri::runtime_service_client::RuntimeServiceClient;
use cri_proto::v1 as cri;
use tonic::transport::Channel;
use tonic::{Code, Status};

type Rt = RuntimeServiceClient<Channel>;

const RPC_TIMEOUT: Duration = Duration::from_secs(30);
const IO_TIMEOUT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------
// CRI helpers
// ---------------------------------------------------------------------------

fn pod_config(name: &str, ports: Vec<cri::PortMapping>) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.into(),
            uid: format!("uid-{name}"),
            namespace: "net".into(),
            attempt: 0,
        }),
        dns_config: Some(cri::DnsConfig {
            servers: vec!["10.96.0.10".into()],
            searches: vec!["net.svc.cluster.local".into()],
            options: vec!["ndots:5".into()],
        }),
        port_mappings: ports,
        linux: Some(cri::LinuxPodSandboxConfig::default()),
        ..Default::default()
    }
}

fn port(proto: cri::Protocol, container: i32, host: i32) -> cri::PortMapping {
    cri::PortMapping {
        protocol: proto as i32,
        container_port: container,
        host_port: host,
        host_ip: String::new(),
    }
}

async fn rpc<T>(
    what: &str,
    fut: impl std::future::Future<Output = Result<tonic::Response<T>, Status>>,
) -> Result<T, Status> {
    match tokio::time::timeout(RPC_TIMEOUT, fut).await {
        Ok(r) => r.map(tonic::Response::into_inner),
        Err(_) => panic!("{what} did not answer within {RPC_TIMEOUT:?}"),
    }
}

async fn try_run(rt: &mut Rt, cfg: cri::PodSandboxConfig) -> Result<String, Status> {
    rpc(
        "RunPodSandbox",
        rt.run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(cfg),
            runtime_handler: String::new(),
        }),
    )
    .await
    .map(|r| r.pod_sandbox_id)
}

async fn run(rt: &mut Rt, cfg: cri::PodSandboxConfig) -> String {
    let name = cfg.metadata.as_ref().unwrap().name.clone();
    try_run(rt, cfg)
        .await
        .unwrap_or_else(|e| panic!("RunPodSandbox {name}: {e:?}"))
}

async fn stop(rt: &mut Rt, id: &str) {
    rpc(
        "StopPodSandbox",
        rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: id.into(),
        }),
    )
    .await
    .unwrap_or_else(|e| panic!("StopPodSandbox {id}: {e:?}"));
}

async fn remove(rt: &mut Rt, id: &str) {
    rpc(
        "RemovePodSandbox",
        rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: id.into(),
        }),
    )
    .await
    .unwrap_or_else(|e| panic!("RemovePodSandbox {id}: {e:?}"));
}

/// (ip, additional ips) from PodSandboxStatus.network.
async fn pod_ips(rt: &mut Rt, id: &str) -> (String, Vec<String>) {
    let s = rpc(
        "PodSandboxStatus",
        rt.pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: id.into(),
            verbose: false,
        }),
    )
    .await
    .unwrap()
    .status
    .unwrap();
    let n = s.network.expect("status.network");
    (n.ip, n.additional_ips.into_iter().map(|i| i.ip).collect())
}

/// /proc/<infra pid>/ns/net of a ready pod (its pin is only mounted in the
/// test's mount namespace, where berth runs).
async fn pod_netns(rt: &mut Rt, id: &str) -> PathBuf {
    let resp = rpc(
        "PodSandboxStatus",
        rt.pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: id.into(),
            verbose: true,
        }),
    )
    .await
    .unwrap();
    let info: serde_json::Value = serde_json::from_str(&resp.info["info"]).unwrap();
    let pid = info["pid"].as_i64().expect("info.pid");
    PathBuf::from(format!("/proc/{pid}/ns/net"))
}

async fn network_ready(rt: &mut Rt) -> cri::RuntimeCondition {
    let s = rpc("Status", rt.status(cri::StatusRequest { verbose: false }))
        .await
        .unwrap();
    s.status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.r#type == "NetworkReady")
        .expect("NetworkReady condition")
}

fn assert_code<T: std::fmt::Debug>(r: Result<T, Status>, code: Code, what: &str) -> Status {
    match r {
        Err(s) if s.code() == code => s,
        other => panic!("{what}: expected {code:?}, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------
// namespaces and sockets
// ---------------------------------------------------------------------------

fn test_netns(ns: &Netns) -> PathBuf {
    PathBuf::from(format!("/proc/{}/ns/net", ns.pid()))
}

/// Runs `f` on a thread inside the network namespace at `netns`.
fn in_netns<T: Send + 'static>(netns: &Path, f: impl FnOnce() -> T + Send + 'static) -> T {
    let p = netns.to_path_buf();
    std::thread::spawn(move || {
        let f_ns = std::fs::File::open(&p).unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
        nix::sched::setns(&f_ns, nix::sched::CloneFlags::CLONE_NEWNET)
            .unwrap_or_else(|e| panic!("setns {}: {e}", p.display()));
        f()
    })
    .join()
    .expect("netns thread panicked")
}

fn listen(netns: &Path, addr: &str) -> TcpListener {
    let a: SocketAddr = addr.parse().unwrap();
    in_netns(netns, move || {
        TcpListener::bind(a).unwrap_or_else(|e| panic!("bind {a}: {e}"))
    })
}

fn connect(netns: &Path, addr: &str) -> std::io::Result<TcpStream> {
    let a: SocketAddr = addr.parse().unwrap();
    in_netns(netns, move || TcpStream::connect_timeout(&a, IO_TIMEOUT))
}

/// Connects from `from` to `addr`, which `l` must serve (directly or through
/// DNAT); exchanges a message each way. Returns the client address the
/// server saw.
fn tcp_round_trip(l: &TcpListener, from: &Path, addr: &str) -> SocketAddr {
    let mut c = connect(from, addr).unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    let (mut s, peer) = l.accept().expect("accept");
    for st in [&c, &s] {
        st.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    }
    c.write_all(b"ping").unwrap();
    let mut b = [0u8; 4];
    s.read_exact(&mut b).expect("server reads");
    assert_eq!(&b, b"ping");
    s.write_all(b"pong").unwrap();
    c.read_exact(&mut b).expect("client reads");
    assert_eq!(&b, b"pong");
    peer
}

fn udp_round_trip(server: &UdpSocket, from: &Path, addr: &str) {
    let a: SocketAddr = addr.parse().unwrap();
    let c = in_netns(from, move || {
        UdpSocket::bind(if a.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }).unwrap()
    });
    c.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    server.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    c.send_to(b"ping", a).unwrap();
    let mut b = [0u8; 16];
    let (n, peer) = server.recv_from(&mut b).expect("UDP server receives");
    assert_eq!(&b[..n], b"ping");
    server.send_to(b"pong", peer).unwrap();
    let (n, _) = c.recv_from(&mut b).expect("UDP client gets the reply");
    assert_eq!(&b[..n], b"pong");
}

fn sh(cmd: &mut Command) -> String {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `ip args` inside the network namespace at `netns`.
fn ip_in(netns: &Path, args: &[&str]) -> String {
    sh(Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .arg("ip")
        .args(args))
}

/// A second test-made namespace ("outside"/"client"), linked to the test's
/// namespace by a veth: 192.168.77.1 there, 192.168.77.2 here. It has no
/// route to any pod subnet, so reaching it from a pod proves NAT.
struct Outside {
    netns: PathBuf,
    _child: std::process::Child,
}

const OUTSIDE_IP: &str = "192.168.77.2";
const TEST_NS_IP: &str = "192.168.77.1";

fn outside(ns: &Netns) -> Outside {
    let child = ns
        .command("unshare")
        .args(["--net", "sleep", "infinity"])
        .spawn()
        .expect("spawn unshare");
    let pid = child.id();
    let netns = PathBuf::from(format!("/proc/{pid}/ns/net"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::read_link(&netns).ok() == std::fs::read_link(test_netns(ns)).ok()
        || std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .unwrap_or_default()
            .trim()
            != "sleep"
    {
        assert!(Instant::now() < deadline, "outside namespace not ready");
        std::thread::sleep(Duration::from_millis(10));
    }
    let t = test_netns(ns);
    ip_in(
        &t,
        &[
            "link", "add", "out0", "type", "veth", "peer", "name", "out1",
        ],
    );
    ip_in(&t, &["link", "set", "out1", "netns", &pid.to_string()]);
    ip_in(
        &t,
        &["addr", "add", &format!("{TEST_NS_IP}/24"), "dev", "out0"],
    );
    ip_in(&t, &["link", "set", "out0", "up"]);
    ip_in(
        &netns,
        &["addr", "add", &format!("{OUTSIDE_IP}/24"), "dev", "out1"],
    );
    ip_in(&netns, &["link", "set", "out1", "up"]);
    ip_in(&netns, &["link", "set", "lo", "up"]);
    Outside {
        netns,
        _child: child,
    }
}

/// Nothing of the built-in network is left in the test namespace or on disk.
fn assert_network_clean(ns: &Netns, berth: &Berth, bridge: &str) {
    let links = ip_in(&test_netns(ns), &["-o", "link", "show"]);
    assert!(!links.contains("bveth"), "veths left: {links}");
    assert!(
        !links.contains(&format!(": {bridge}:")),
        "bridge {bridge} left: {links}"
    );
    let tables = sh(Command::new("nsenter")
        .arg(format!("--net={}", test_netns(ns).display()))
        .args(["nft", "list", "tables"]));
    assert!(!tables.contains("inet berth"), "nft table left: {tables}");
    let ipam = berth.root.join("network/ipam");
    if let Ok(rd) = std::fs::read_dir(&ipam) {
        for d in rd.flatten() {
            let leases: Vec<String> = std::fs::read_dir(d.path())
                .unwrap()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.parse::<std::net::IpAddr>().is_ok())
                .collect();
            assert!(
                leases.is_empty(),
                "leases left in {}: {leases:?}",
                d.path().display()
            );
        }
    }
    let recs: Vec<_> = std::fs::read_dir(berth.root.join("network/pods"))
        .map(|r| r.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(recs.is_empty(), "network records left: {recs:?}");
}

fn finish(ns: Netns, berth: Berth, rt: Rt) {
    drop(rt);
    let dir = berth.dir.clone();
    drop(berth);
    ns.assert_no_leaks(&dir);
}

fn builtin(extra: &str) -> BerthOpts {
    BerthOpts {
        config_toml: format!("[network]\nmtu = 1400\n{extra}"),
        ..Default::default()
    }
}

// ---------------------------------------------------------------------------
// built-in network
// ---------------------------------------------------------------------------

/// Two pods on the bridge: addresses in the subnet, eth0 with the MTU and a
/// default route via the gateway, TCP both ways, pod to the host's bridge
/// address, the pod's files; teardown leaves nothing.
#[tokio::test]
async fn pods_talk_over_the_bridge() {
    let ns = Netns::new();
    let berth = Berth::start(&ns, builtin(""));
    let mut rt = berth.runtime_client().await;
    let ready = network_ready(&mut rt).await;
    assert!(ready.status, "NetworkReady: {ready:?}");

    let a = run(&mut rt, pod_config("a", vec![])).await;
    let b = run(&mut rt, pod_config("b", vec![])).await;
    let (ip_a, extra_a) = pod_ips(&mut rt, &a).await;
    let (ip_b, _) = pod_ips(&mut rt, &b).await;
    assert!(
        ip_a.starts_with("10.88.") && ip_b.starts_with("10.88."),
        "{ip_a} {ip_b}"
    );
    assert_ne!(ip_a, ip_b);
    assert!(extra_a.is_empty(), "no IPv6 configured: {extra_a:?}");
    let (na, nb) = (pod_netns(&mut rt, &a).await, pod_netns(&mut rt, &b).await);

    let link = ip_in(&na, &["-o", "addr", "show", "dev", "eth0"]);
    assert!(link.contains(&format!("inet {ip_a}/16")), "{link}");
    let l = ip_in(&na, &["-o", "link", "show", "dev", "eth0"]);
    assert!(l.contains("mtu 1400") && l.contains("UP"), "{l}");
    let route = ip_in(&na, &["route", "show", "default"]);
    assert!(route.contains("via 10.88.0.1 dev eth0"), "{route}");
    let br = ip_in(&test_netns(&ns), &["-o", "addr", "show", "dev", "berth0"]);
    assert!(br.contains("inet 10.88.0.1/16"), "{br}");
    // The harness's leak check sees them while the pods exist.
    let objs = berth_network_objects(ns.pid());
    assert!(
        objs.iter().any(|o| o.contains("bveth")) && objs.iter().any(|o| o.contains("inet berth")),
        "{objs:?}"
    );

    // Pod to pod, both ways, with the real source addresses.
    let la = listen(&na, "0.0.0.0:7000");
    let lb = listen(&nb, "0.0.0.0:7000");
    let peer = tcp_round_trip(&la, &nb, &format!("{ip_a}:7000"));
    assert_eq!(peer.ip().to_string(), ip_b);
    let peer = tcp_round_trip(&lb, &na, &format!("{ip_b}:7000"));
    assert_eq!(peer.ip().to_string(), ip_a);
    // Pod to the host's bridge address.
    let lh = listen(&test_netns(&ns), "10.88.0.1:7001");
    let peer = tcp_round_trip(&lh, &na, "10.88.0.1:7001");
    assert_eq!(peer.ip().to_string(), ip_a);

    // DNS config and hosts files name the pod's address.
    let dir = berth.root.join("pods").join(&a);
    let resolv = std::fs::read_to_string(dir.join("resolv.conf")).unwrap();
    assert!(
        resolv.contains("nameserver 10.96.0.10")
            && resolv.contains("search net.svc.cluster.local")
            && resolv.contains("options ndots:5"),
        "{resolv}"
    );
    let hosts = std::fs::read_to_string(dir.join("hosts")).unwrap();
    assert!(hosts.contains(&format!("{ip_a}\ta")), "{hosts}");

    drop((la, lb, lh));
    for id in [&a, &b] {
        stop(&mut rt, id).await;
    }
    // Stopped pods no longer have the network, the namespace stays until removal.
    assert_network_clean(&ns, &berth, "berth0");
    for id in [&a, &b] {
        remove(&mut rt, id).await;
    }
    finish(ns, berth, rt);
}

/// Egress through MASQUERADE to a namespace that has no route back to the
/// pods, and TCP/UDP host ports reached from the test's namespace (through
/// 127.0.0.1, and the bridge address) and from that client namespace;
/// conflicting host ports fail the second pod.
#[tokio::test]
async fn egress_nat_and_host_ports() {
    let ns = Netns::new();
    let out = outside(&ns);
    let berth = Berth::start(&ns, builtin(""));
    let mut rt = berth.runtime_client().await;
    let web = run(
        &mut rt,
        pod_config(
            "web",
            vec![
                port(cri::Protocol::Tcp, 8080, 18080),
                port(cri::Protocol::Udp, 5353, 15353),
                // SCTP rules are accepted too (no SCTP traffic: the module
                // may be missing).
                port(cri::Protocol::Sctp, 9999, 19999),
                // Only on 127.0.0.1.
                cri::PortMapping {
                    host_ip: "127.0.0.1".into(),
                    ..port(cri::Protocol::Tcp, 8080, 18090)
                },
                // No host port: nothing to forward.
                port(cri::Protocol::Tcp, 9090, 0),
            ],
        ),
    )
    .await;
    let (ip, _) = pod_ips(&mut rt, &web).await;
    let pod = pod_netns(&mut rt, &web).await;
    let tns = test_netns(&ns);

    // Egress: the outside namespace sees the test namespace's address.
    let lo = listen(&out.netns, &format!("{OUTSIDE_IP}:7100"));
    let peer = tcp_round_trip(&lo, &pod, &format!("{OUTSIDE_IP}:7100"));
    assert_eq!(peer.ip().to_string(), TEST_NS_IP, "egress is masqueraded");

    // Host ports.
    let l = listen(&pod, "0.0.0.0:8080");
    tcp_round_trip(&l, &tns, "127.0.0.1:18080");
    tcp_round_trip(&l, &tns, "10.88.0.1:18080");
    let peer = tcp_round_trip(&l, &out.netns, &format!("{TEST_NS_IP}:18080"));
    assert_eq!(
        peer.ip().to_string(),
        OUTSIDE_IP,
        "external clients keep their address"
    );
    tcp_round_trip(&l, &tns, "127.0.0.1:18090");
    assert!(
        connect(&tns, "10.88.0.1:18090").is_err(),
        "a host_ip mapping answers on another address"
    );
    let u = in_netns(&pod, || UdpSocket::bind("0.0.0.0:5353").unwrap());
    udp_round_trip(&u, &tns, "127.0.0.1:15353");
    udp_round_trip(&u, &out.netns, &format!("{TEST_NS_IP}:15353"));
    // The container port itself is reachable directly too.
    tcp_round_trip(&l, &tns, &format!("{ip}:8080"));
    // Hairpin: the pod reaches its own host port through the host's address,
    // and sees the connection come from the host.
    let peer = tcp_round_trip(&l, &pod, "10.88.0.1:18080");
    assert_eq!(peer.ip().to_string(), "10.88.0.1");

    // Same host port and protocol: refused, naming the port and the owner.
    let e = assert_code(
        try_run(
            &mut rt,
            pod_config("clash", vec![port(cri::Protocol::Tcp, 80, 18080)]),
        )
        .await,
        Code::FailedPrecondition,
        "conflicting host port",
    );
    assert!(
        e.message().contains("18080") && e.message().contains(&web),
        "{}",
        e.message()
    );
    // Same port, another protocol: fine.
    let other = run(
        &mut rt,
        pod_config("udp", vec![port(cri::Protocol::Udp, 80, 18080)]),
    )
    .await;
    // Invalid mappings are rejected up front.
    assert_code(
        try_run(
            &mut rt,
            pod_config("bad", vec![port(cri::Protocol::Tcp, 0, 18081)]),
        )
        .await,
        Code::InvalidArgument,
        "container port 0",
    );
    assert_code(
        try_run(
            &mut rt,
            pod_config("bad2", vec![port(cri::Protocol::Tcp, 80, 70000)]),
        )
        .await,
        Code::InvalidArgument,
        "host port 70000",
    );

    // Once the owner stops, its host port is free again and its rules gone.
    drop((l, u, lo));
    stop(&mut rt, &web).await;
    assert!(
        connect(&tns, "127.0.0.1:18080").is_err(),
        "host port still forwarded after StopPodSandbox"
    );
    let again = run(
        &mut rt,
        pod_config("again", vec![port(cri::Protocol::Tcp, 80, 18080)]),
    )
    .await;
    for id in [&web, &other, &again] {
        stop(&mut rt, id).await;
        remove(&mut rt, id).await;
    }
    assert_network_clean(&ns, &berth, "berth0");
    finish(ns, berth, rt);
}

/// A /29 holds five pods: a sixth fails while they hold their addresses,
/// also after a daemon restart; releasing one makes its address usable.
#[tokio::test]
async fn addresses_are_never_shared_and_reused_after_release() {
    let ns = Netns::new();
    let mut berth = Berth::start(
        &ns,
        builtin("subnet = \"10.77.0.0/29\"\nbridge = \"br-small\"\n"),
    );
    let mut rt = berth.runtime_client().await;
    let mut pods = Vec::new();
    for i in 0..5 {
        let id = run(&mut rt, pod_config(&format!("p{i}"), vec![])).await;
        pods.push((id.clone(), pod_ips(&mut rt, &id).await.0));
    }
    let mut ips: Vec<&String> = pods.iter().map(|p| &p.1).collect();
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), 5, "{pods:?}");
    assert!(
        !ips.iter().any(|i| *i == "10.77.0.1"),
        "gateway handed out: {pods:?}"
    );
    let e = assert_code(
        try_run(&mut rt, pod_config("p5", vec![])).await,
        Code::ResourceExhausted,
        "sixth pod",
    );
    assert!(e.message().contains("10.77.0.0/29"), "{}", e.message());

    berth.restart();
    let mut rt = berth.runtime_client().await;
    assert_code(
        try_run(&mut rt, pod_config("p5", vec![])).await,
        Code::ResourceExhausted,
        "sixth pod after restart",
    );
    // The pods kept their addresses and their network across the restart.
    let (id0, ip0) = pods[0].clone();
    let (id1, ip1) = pods[1].clone();
    assert_eq!(pod_ips(&mut rt, &id0).await.0, ip0);
    let l = listen(&pod_netns(&mut rt, &id0).await, "0.0.0.0:7000");
    tcp_round_trip(&l, &pod_netns(&mut rt, &id1).await, &format!("{ip0}:7000"));
    drop(l);

    stop(&mut rt, &id1).await;
    assert_eq!(
        pod_ips(&mut rt, &id1).await.0,
        "",
        "a stopped pod reports no address"
    );
    let p5 = run(&mut rt, pod_config("p5", vec![])).await;
    assert_eq!(
        pod_ips(&mut rt, &p5).await.0,
        ip1,
        "the released address is reused"
    );
    pods.push((p5, ip1));
    for (id, _) in &pods {
        // Twice: teardown is idempotent.
        stop(&mut rt, id).await;
        stop(&mut rt, id).await;
        remove(&mut rt, id).await;
        remove(&mut rt, id).await;
    }
    assert_network_clean(&ns, &berth, "br-small");
    finish(ns, berth, rt);
}

/// An IPv6 subnet gives every pod a second address (additional_ips), a
/// default route, and IPv6 reachability between pods.
#[tokio::test]
async fn dual_stack() {
    let ns = Netns::new();
    let berth = Berth::start(&ns, builtin("subnet_v6 = \"fd00:77::/64\"\n"));
    let mut rt = berth.runtime_client().await;
    let a = run(&mut rt, pod_config("a", vec![])).await;
    let b = run(&mut rt, pod_config("b", vec![])).await;
    let (ip4, extra) = pod_ips(&mut rt, &a).await;
    assert!(ip4.starts_with("10.88."), "{ip4}");
    assert_eq!(extra.len(), 1, "{extra:?}");
    assert!(extra[0].starts_with("fd00:77::"), "{extra:?}");
    let (_, extra_b) = pod_ips(&mut rt, &b).await;
    let (na, nb) = (pod_netns(&mut rt, &a).await, pod_netns(&mut rt, &b).await);
    let route = ip_in(&na, &["-6", "route", "show", "default"]);
    assert!(route.contains("via fd00:77::1"), "{route}");
    let l = listen(&na, "[::]:7000");
    let peer = tcp_round_trip(&l, &nb, &format!("[{}]:7000", extra[0]));
    assert_eq!(peer.ip().to_string(), extra_b[0]);
    drop(l);
    for id in [&a, &b] {
        stop(&mut rt, id).await;
        remove(&mut rt, id).await;
    }
    assert_network_clean(&ns, &berth, "berth0");
    finish(ns, berth, rt);
}

/// kill -9 at every step of the network setup: after a restart nothing of
/// the half-made pod is left (veth, address lease, record, bridge, nftables
/// table), and the same pod can then be made. The netns being gone before
/// StopPodSandbox is fine too.
#[tokio::test]
async fn kill_during_network_setup_leaves_nothing() {
    let ns = Netns::new();
    let mut berth = Berth::start(&ns, builtin(""));
    for point in [
        "net-after-record",
        "net-after-ipam",
        "net-after-veth",
        "net-after-rules",
    ] {
        berth.opts.env = vec![("BERTH_FAILPOINT".into(), point.into())];
        berth.restart();
        let mut rt = berth.runtime_client().await;
        assert!(
            try_run(
                &mut rt,
                pod_config(point, vec![port(cri::Protocol::Tcp, 80, 18080)])
            )
            .await
            .is_err(),
            "{point}: berth survived"
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while berth.is_running() {
            assert!(Instant::now() < deadline, "{point}: berth did not die");
            std::thread::sleep(Duration::from_millis(10));
        }
        berth.opts.env.clear();
        berth.restart();
        assert_network_clean(&ns, &berth, "berth0");
    }
    let mut rt = berth.runtime_client().await;
    let id = run(
        &mut rt,
        pod_config("after", vec![port(cri::Protocol::Tcp, 80, 18080)]),
    )
    .await;
    // The namespace disappearing under berth does not block teardown.
    let pin = berth.state_dir.join("netns").join(&id);
    ns.run_ok(&["umount", "-l", pin.to_str().unwrap()]);
    stop(&mut rt, &id).await;
    stop(&mut rt, &id).await;
    remove(&mut rt, &id).await;
    assert_network_clean(&ns, &berth, "berth0");
    finish(ns, berth, rt);
}

/// network.mode = "none": pods get loopback only, and NetworkReady is true.
#[tokio::test]
async fn mode_none_gives_loopback_only() {
    let ns = Netns::new();
    let berth = Berth::start(
        &ns,
        BerthOpts {
            config_toml: "[network]\nmode = \"none\"\n".into(),
            ..Default::default()
        },
    );
    let mut rt = berth.runtime_client().await;
    assert!(network_ready(&mut rt).await.status);
    let id = run(&mut rt, pod_config("lo", vec![])).await;
    assert_eq!(pod_ips(&mut rt, &id).await.0, "");
    let links = ip_in(&pod_netns(&mut rt, &id).await, &["-o", "link"]);
    assert!(!links.contains("eth0"), "{links}");
    stop(&mut rt, &id).await;
    remove(&mut rt, &id).await;
    finish(ns, berth, rt);
}

// ---------------------------------------------------------------------------
// CNI
// ---------------------------------------------------------------------------

fn cni_conflist(data: &Path) -> String {
    serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "berth-test",
        "plugins": [
            {
                "type": "bridge",
                "bridge": "cni0",
                "isGateway": true,
                "ipMasq": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": "10.22.0.0/24"}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": data.join("ipam"),
                }
            },
            {"type": "portmap", "capabilities": {"portMappings": true}}
        ]
    })
    .to_string()
}

fn cni_opts(conf: &Path, bins: &[&Path], timeout: u64) -> BerthOpts {
    let bins: Vec<String> = bins
        .iter()
        .map(|b| format!("{:?}", b.display().to_string()))
        .collect();
    BerthOpts {
        config_toml: format!(
            "[network]\nmode = \"cni\"\ncni_conf_dir = {:?}\ncni_bin_dirs = [{}]\ncni_plugin_timeout_secs = {timeout}\n",
            conf.display().to_string(),
            bins.join(", ")
        ),
        ..Default::default()
    }
}

/// CNI mode with Debian's bridge, host-local and portmap plugins: not ready
/// until a config appears (picked up without a restart), then pods get
/// addresses, talk to each other, and host ports work; StopPodSandbox runs
/// DEL (the host-local lease and the veth go).
#[tokio::test]
async fn cni_bridge_host_local_portmap() {
    let ns = Netns::new();
    let tmp = tempfile::tempdir().unwrap();
    ns.track_dir(tmp.path());
    let conf = tmp.path().join("net.d");
    std::fs::create_dir(&conf).unwrap();
    let out = outside(&ns);
    let berth = Berth::start(&ns, cni_opts(&conf, &[Path::new("/usr/lib/cni")], 30));
    let mut rt = berth.runtime_client().await;
    let nr = network_ready(&mut rt).await;
    assert!(
        !nr.status && !nr.reason.is_empty() && !nr.message.is_empty(),
        "{nr:?}"
    );
    assert_code(
        try_run(&mut rt, pod_config("early", vec![])).await,
        Code::FailedPrecondition,
        "RunPodSandbox without a CNI config",
    );

    std::fs::write(conf.join("10-test.conflist"), cni_conflist(tmp.path())).unwrap();
    let nr = network_ready(&mut rt).await;
    assert!(nr.status, "{nr:?}");

    let a = run(
        &mut rt,
        pod_config(
            "a",
            vec![
                port(cri::Protocol::Tcp, 8080, 18080),
                port(cri::Protocol::Udp, 5353, 15353),
            ],
        ),
    )
    .await;
    let b = run(&mut rt, pod_config("b", vec![])).await;
    let (ip_a, _) = pod_ips(&mut rt, &a).await;
    let (ip_b, _) = pod_ips(&mut rt, &b).await;
    assert!(
        ip_a.starts_with("10.22.0.") && ip_b.starts_with("10.22.0."),
        "{ip_a} {ip_b}"
    );
    assert_ne!(ip_a, ip_b);
    let (na, nb) = (pod_netns(&mut rt, &a).await, pod_netns(&mut rt, &b).await);
    let l = listen(&na, "0.0.0.0:8080");
    let peer = tcp_round_trip(&l, &nb, &format!("{ip_a}:8080"));
    assert_eq!(peer.ip().to_string(), ip_b);
    tcp_round_trip(&l, &test_netns(&ns), "10.22.0.1:18080");
    let peer = tcp_round_trip(&l, &out.netns, &format!("{TEST_NS_IP}:18080"));
    assert_eq!(peer.ip().to_string(), OUTSIDE_IP);
    let u = in_netns(&na, || UdpSocket::bind("0.0.0.0:5353").unwrap());
    udp_round_trip(&u, &out.netns, &format!("{TEST_NS_IP}:15353"));
    // Egress through the bridge plugin's ipMasq.
    let lo = listen(&out.netns, &format!("{OUTSIDE_IP}:7100"));
    let peer = tcp_round_trip(&lo, &nb, &format!("{OUTSIDE_IP}:7100"));
    assert_eq!(peer.ip().to_string(), TEST_NS_IP, "egress is masqueraded");
    drop((l, u, lo));

    let leases = tmp.path().join("ipam/berth-test");
    assert!(leases.join(&ip_a).exists(), "host-local lease of {ip_a}");
    stop(&mut rt, &a).await;
    stop(&mut rt, &a).await;
    assert!(
        !leases.join(&ip_a).exists(),
        "lease of {ip_a} kept after StopPodSandbox"
    );
    stop(&mut rt, &b).await;
    for id in [&a, &b] {
        remove(&mut rt, id).await;
    }
    let links = ip_in(&test_netns(&ns), &["-o", "link"]);
    assert!(!links.contains("veth"), "veths left: {links}");
    let cache: Vec<_> = std::fs::read_dir(berth.root.join("network/cni"))
        .map(|r| r.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(cache.is_empty(), "CNI cache left: {cache:?}");
    finish(ns, berth, rt);
}

/// A plugin that never answers is killed (with what it started) after
/// cni_plugin_timeout_secs, and RunPodSandbox fails saying so.
#[tokio::test]
async fn cni_hung_plugin_times_out() {
    let ns = Netns::new();
    let tmp = tempfile::tempdir().unwrap();
    ns.track_dir(tmp.path());
    let conf = tmp.path().join("net.d");
    let bin = tmp.path().join("bin");
    std::fs::create_dir(&conf).unwrap();
    std::fs::create_dir(&bin).unwrap();
    let plugin = bin.join("hang");
    std::fs::write(&plugin, "#!/bin/sh\nexec sleep 3600\n").unwrap();
    sh(Command::new("chmod").arg("755").arg(&plugin));
    std::fs::write(
        conf.join("10-hang.conflist"),
        r#"{"cniVersion":"1.0.0","name":"hang","plugins":[{"type":"hang"}]}"#,
    )
    .unwrap();
    let berth = Berth::start(&ns, cni_opts(&conf, &[&bin], 1));
    let mut rt = berth.runtime_client().await;
    assert!(network_ready(&mut rt).await.status);
    let e = try_run(&mut rt, pod_config("hung", vec![]))
        .await
        .unwrap_err();
    assert!(
        e.message().contains("hang") && e.message().contains("timed out"),
        "{}",
        e.message()
    );
    let pods = rpc(
        "ListPodSandbox",
        rt.list_pod_sandbox(cri::ListPodSandboxRequest { filter: None }),
    )
    .await
    .unwrap()
    .items;
    assert!(pods.is_empty(), "{pods:?}");
    // No plugin process survives its timeout.
    let plugin_s = plugin.display().to_string();
    let left: Vec<i32> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let c = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let c = String::from_utf8_lossy(&c).replace('\0', " ");
            c.contains(&plugin_s) || c.trim() == "sleep 3600"
        })
        .collect();
    assert!(left.is_empty(), "plugin processes left: {left:?}");
    finish(ns, berth, rt);
}

/// kill -9 of the daemon before and after the CNI ADD: the restarted daemon
/// runs DEL from its cache, so neither a host-local lease nor a veth is
/// left, and the pod can then be made.
#[tokio::test]
async fn cni_kill_during_setup_leaves_nothing() {
    let ns = Netns::new();
    let tmp = tempfile::tempdir().unwrap();
    ns.track_dir(tmp.path());
    let conf = tmp.path().join("net.d");
    std::fs::create_dir(&conf).unwrap();
    std::fs::write(conf.join("10-test.conflist"), cni_conflist(tmp.path())).unwrap();
    let mut berth = Berth::start(&ns, cni_opts(&conf, &[Path::new("/usr/lib/cni")], 30));
    let leases = tmp.path().join("ipam/berth-test");
    let ips_leased = || -> Vec<String> {
        std::fs::read_dir(&leases)
            .map(|r| {
                r.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.parse::<std::net::IpAddr>().is_ok())
                    .collect()
            })
            .unwrap_or_default()
    };
    for point in ["net-after-record", "net-cni-after-add"] {
        berth.opts.env = vec![("BERTH_FAILPOINT".into(), point.into())];
        berth.restart();
        let mut rt = berth.runtime_client().await;
        assert!(
            try_run(&mut rt, pod_config(point, vec![])).await.is_err(),
            "{point}: berth survived"
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while berth.is_running() {
            assert!(Instant::now() < deadline, "{point}: berth did not die");
            std::thread::sleep(Duration::from_millis(10));
        }
        if point == "net-cni-after-add" {
            assert_eq!(ips_leased().len(), 1, "ADD ran before the kill");
        }
        berth.opts.env.clear();
        berth.restart();
        assert!(
            ips_leased().is_empty(),
            "{point}: leases left {:?}",
            ips_leased()
        );
        let links = ip_in(&test_netns(&ns), &["-o", "link"]);
        assert!(!links.contains("veth"), "{point}: veths left: {links}");
    }
    let mut rt = berth.runtime_client().await;
    let id = run(&mut rt, pod_config("after", vec![])).await;
    assert!(pod_ips(&mut rt, &id).await.0.starts_with("10.22.0."));
    stop(&mut rt, &id).await;
    remove(&mut rt, &id).await;
    assert!(ips_leased().is_empty());
    finish(ns, berth, rt);
}
