//! Stats and metrics through the CRI socket on a host without usable cgroup
//! v2 (this one): the fields that exist there follow what the containers do
//! (writable layer, CPU and memory of the init, pod network counters), the
//! rest is left out, filters select, unknown ids are NotFound.

mod common;

use common::*;
use cri_proto::v1 as cri;
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tonic::Code;

const IMAGE: &str = "127.0.0.1:5000/busybox:latest";
const DEADLINE: Duration = Duration::from_secs(60);

async fn start() -> Env {
    Env::start_with(
        &["busybox"],
        BerthOpts {
            // Walk writable layers every second so growth shows quickly.
            config_toml: "[stats]\nwritable_layer_interval_secs = 1\n".into(),
            ..Default::default()
        },
    )
    .await
}

fn sh(name: &str, script: &str, labels: &[(&str, &str)]) -> cri::ContainerConfig {
    let mut cfg = common::sh(name, IMAGE, script);
    cfg.labels = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    cfg
}

impl Env {
    /// A pod labelled `pod=<name>` with the given network mode.
    async fn pod_net(&mut self, name: &str, network: cri::NamespaceMode) -> String {
        let mut config = self.pod_config(name);
        config.labels = [("pod".to_string(), name.to_string())].into();
        let linux = config.linux.as_mut().unwrap();
        let opts = linux.security_context.as_mut().unwrap();
        opts.namespace_options.as_mut().unwrap().network = network as i32;
        self.run_pod(config).await
    }

    async fn exec_code(&mut self, id: &str, script: &str) -> i32 {
        self.exec(id, script).await.1
    }

    async fn stats(&mut self, id: &str) -> cri::ContainerStats {
        self.rt
            .container_stats(cri::ContainerStatsRequest {
                container_id: id.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .stats
            .unwrap()
    }

    /// Polls ContainerStats until `ok` holds (the writable layer is walked
    /// in the background, rates need a second sample).
    async fn stats_until(
        &mut self,
        id: &str,
        what: &str,
        ok: impl Fn(&cri::ContainerStats) -> bool,
    ) -> cri::ContainerStats {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let s = self.stats(id).await;
            if ok(&s) {
                return s;
            }
            assert!(Instant::now() < deadline, "{what}: never seen in {s:#?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn pod_stats(&mut self, id: &str) -> cri::PodSandboxStats {
        self.rt
            .pod_sandbox_stats(cri::PodSandboxStatsRequest {
                pod_sandbox_id: id.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .stats
            .unwrap()
    }

    async fn list_stats(&mut self, f: cri::ContainerStatsFilter) -> Vec<String> {
        let mut ids: Vec<String> = self
            .rt
            .list_container_stats(cri::ListContainerStatsRequest { filter: Some(f) })
            .await
            .unwrap()
            .into_inner()
            .stats
            .into_iter()
            .map(|s| s.attributes.unwrap().id)
            .collect();
        ids.sort();
        ids
    }

    async fn list_pod_stats(&mut self, f: cri::PodSandboxStatsFilter) -> Vec<String> {
        let mut ids: Vec<String> = self
            .rt
            .list_pod_sandbox_stats(cri::ListPodSandboxStatsRequest { filter: Some(f) })
            .await
            .unwrap()
            .into_inner()
            .stats
            .into_iter()
            .map(|s| s.attributes.unwrap().id)
            .collect();
        ids.sort();
        ids
    }

    async fn infra_pid(&mut self, pod: &str) -> i32 {
        let info = self
            .rt
            .pod_sandbox_status(cri::PodSandboxStatusRequest {
                pod_sandbox_id: pod.into(),
                verbose: true,
            })
            .await
            .unwrap()
            .into_inner()
            .info;
        let v: serde_json::Value = serde_json::from_str(&info["info"]).unwrap();
        v["pid"].as_i64().unwrap() as i32
    }
}

fn val(v: &Option<cri::UInt64Value>) -> u64 {
    v.as_ref().expect("value present").value
}

#[tokio::test]
async fn container_stats_follow_the_workload() {
    let mut env = start().await;
    let pod = env.pod_net("work", cri::NamespaceMode::Pod).await;
    // The busy loop runs in the init itself: without cgroups the init's own
    // CPU time (plus its waited-for children's) is what is measured.
    let id = env
        .run(
            &pod,
            sh(
                "busy",
                "while [ ! -e /go ]; do sleep 0.1; done; \
                 i=0; while [ $i -lt 400000 ]; do i=$((i+1)); done; \
                 touch /done; exec sleep 1000",
                &[],
            ),
        )
        .await;

    // The first walk of the writable layer lands in the background.
    let s0 = env
        .stats_until(&id, "writable layer", |s| s.writable_layer.is_some())
        .await;
    let attrs = s0.attributes.clone().unwrap();
    assert_eq!(attrs.id, id);
    assert_eq!(attrs.metadata.unwrap().name, "busy");
    let layer0 = s0.writable_layer.clone().unwrap();
    assert!(layer0.timestamp > 0);
    assert!(
        layer0.fs_id.unwrap().mountpoint.ends_with("/containers"),
        "the containers' filesystem, as ImageFsInfo names it"
    );
    let cpu0 = s0.cpu.expect("cpu from /proc/<init>/stat");
    assert!(cpu0.timestamp > 0);
    let mem = s0.memory.expect("memory from /proc/<init>/status");
    assert!(val(&mem.working_set_bytes) > 0);
    assert!(mem.rss_bytes.is_some() && mem.page_faults.is_some());
    assert!(
        mem.available_bytes.is_none(),
        "no limit is enforced without cgroups"
    );
    assert!(s0.swap.is_none() && s0.io.is_none(), "no cgroup files here");
    assert!(cpu0.psi.is_none() && mem.psi.is_none());

    // Writing 4 MiB into the container's rootfs grows its writable layer.
    assert_eq!(
        env.exec_code(
            &id,
            "dd if=/dev/zero of=/big bs=1M count=4 2>/dev/null && sync"
        )
        .await,
        0
    );
    let used0 = val(&layer0.used_bytes);
    let inodes0 = val(&layer0.inodes_used);
    let s1 = env
        .stats_until(&id, "4 MiB in the writable layer", |s| {
            s.writable_layer
                .as_ref()
                .is_some_and(|l| val(&l.used_bytes) >= used0 + (4 << 20))
        })
        .await;
    assert!(val(&s1.writable_layer.unwrap().inodes_used) > inodes0);

    // Burning CPU in the container shows in its cumulative usage and rate.
    let before = env.stats(&id).await.cpu.unwrap();
    assert_eq!(env.exec_code(&id, "touch /go").await, 0);
    let deadline = Instant::now() + DEADLINE;
    while env.exec_code(&id, "test -e /done").await != 0 {
        assert!(Instant::now() < deadline, "busy loop never finished");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let after = env
        .stats_until(&id, "a CPU rate", |s| {
            s.cpu.as_ref().is_some_and(|c| c.usage_nano_cores.is_some())
        })
        .await
        .cpu
        .unwrap();
    let burned = val(&after.usage_core_nano_seconds) - val(&before.usage_core_nano_seconds);
    assert!(
        burned >= 250_000_000,
        "busy loop burned only {burned} ns: {before:?} -> {after:?}"
    );
    assert!(after.timestamp > before.timestamp);
    // The rate's value depends on when the previous sample was taken (the
    // loop may be over by then); its arithmetic has unit tests.
    assert!(after.usage_nano_cores.is_some(), "{after:?}");
    env.finish().await;
}

#[tokio::test]
async fn filters_and_unknown_ids() {
    let mut env = start().await;
    let p1 = env.pod_net("one", cri::NamespaceMode::Pod).await;
    let p2 = env.pod_net("two", cri::NamespaceMode::Pod).await;
    let a = env
        .run(&p1, sh("a", "exec sleep 1000", &[("app", "web")]))
        .await;
    let b = env
        .run(&p2, sh("b", "exec sleep 1000", &[("app", "db")]))
        .await;
    let mut both = vec![a.clone(), b.clone()];
    both.sort();
    let f = |id: &str, pod: &str, labels: &[(&str, &str)]| cri::ContainerStatsFilter {
        id: id.into(),
        pod_sandbox_id: pod.into(),
        label_selector: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    };
    assert_eq!(env.list_stats(f("", "", &[])).await, both);
    assert_eq!(env.list_stats(f(&a[..12], "", &[])).await, vec![a.clone()]);
    assert_eq!(env.list_stats(f("", &p2, &[])).await, vec![b.clone()]);
    assert_eq!(env.list_stats(f("", &p2[..12], &[])).await, vec![b.clone()]);
    assert_eq!(
        env.list_stats(f("", "", &[("app", "web")])).await,
        vec![a.clone()]
    );
    assert_eq!(env.list_stats(f(&a, &p2, &[])).await, Vec::<String>::new());
    assert!(env.list_stats(f("", "", &[("app", "x")])).await.is_empty());
    assert!(env.list_stats(f(&"f".repeat(64), "", &[])).await.is_empty());
    assert!(env.list_stats(f("", &"f".repeat(64), &[])).await.is_empty());
    let none = env
        .rt
        .list_container_stats(cri::ListContainerStatsRequest { filter: None })
        .await
        .unwrap()
        .into_inner()
        .stats;
    assert_eq!(none.len(), 2);

    let pf = |id: &str, labels: &[(&str, &str)]| cri::PodSandboxStatsFilter {
        id: id.into(),
        label_selector: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    };
    let mut pods = vec![p1.clone(), p2.clone()];
    pods.sort();
    assert_eq!(env.list_pod_stats(pf("", &[])).await, pods);
    assert_eq!(
        env.list_pod_stats(pf(&p1[..12], &[])).await,
        vec![p1.clone()]
    );
    assert_eq!(
        env.list_pod_stats(pf("", &[("pod", "two")])).await,
        vec![p2.clone()]
    );
    assert!(env.list_pod_stats(pf("", &[("pod", "x")])).await.is_empty());

    // Each pod's stats hold its own containers.
    let s = env.pod_stats(&p1).await;
    let linux = s.linux.unwrap();
    let ids: Vec<String> = linux
        .containers
        .iter()
        .map(|c| c.attributes.clone().unwrap().id)
        .collect();
    assert_eq!(ids, vec![a.clone()]);

    let unknown = "0".repeat(64);
    let e = env
        .rt
        .container_stats(cri::ContainerStatsRequest {
            container_id: unknown.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(e.message().contains(&unknown), "{}", e.message());
    let e = env
        .rt
        .container_stats(cri::ContainerStatsRequest {
            container_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = env
        .rt
        .pod_sandbox_stats(cri::PodSandboxStatsRequest {
            pod_sandbox_id: unknown.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(e.message().contains(&unknown), "{}", e.message());
    env.finish().await;
}

/// Sends `n` UDP datagrams of `size` bytes from inside the netns of `pid`.
fn send_udp(pid: i32, to: &str, n: usize, size: usize) {
    let to = to.to_string();
    std::thread::spawn(move || {
        let ns = std::fs::File::open(format!("/proc/{pid}/ns/net")).unwrap();
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        for _ in 0..n {
            s.send_to(&vec![0u8; size], &to).unwrap();
        }
    })
    .join()
    .unwrap();
}

#[tokio::test]
async fn pod_stats_network_and_metrics() {
    let mut env = start().await;
    let pod = env.pod_net("net", cri::NamespaceMode::Pod).await;
    let host = env.pod_net("host", cri::NamespaceMode::Node).await;
    let ctr = env.run(&pod, sh("app", "exec sleep 1000", &[])).await;

    let s = env.pod_stats(&pod).await;
    let attrs = s.attributes.unwrap();
    assert_eq!(attrs.id, pod);
    assert_eq!(attrs.metadata.unwrap().name, "net");
    assert_eq!(attrs.labels["pod"], "net");
    let linux = s.linux.unwrap();
    // Infra + container processes, without cgroups (idle ones may not have
    // used a clock tick yet).
    assert!(linux.cpu.unwrap().usage_core_nano_seconds.is_some());
    assert!(val(&linux.memory.unwrap().working_set_bytes) > 0);
    assert!(linux.process.is_none(), "process count needs pids.current");
    assert_eq!(linux.containers.len(), 1);

    // The pod's eth0 (built-in network): traffic sent to the gateway shows
    // in its tx counters.
    let before = linux
        .network
        .expect("the pod's eth0")
        .default_interface
        .unwrap();
    assert_eq!(before.name, "eth0");
    let infra = env.infra_pid(&pod).await;
    send_udp(infra, "10.88.0.1:9", 3, 1000);
    let net = env.pod_stats(&pod).await.linux.unwrap().network.unwrap();
    assert!(net.timestamp > 0);
    let eth0 = net.default_interface.unwrap();
    assert_eq!(eth0.name, "eth0");
    assert!(
        val(&eth0.tx_bytes) >= val(&before.tx_bytes) + 3000,
        "{before:?} -> {eth0:?}"
    );
    assert_eq!(val(&eth0.tx_errors), 0);
    assert!(eth0.rx_errors.is_some());
    assert!(
        net.interfaces
            .iter()
            .all(|i| i.name != "eth0" && i.name != "lo"),
        "{:?}",
        net.interfaces
    );

    // Host-network pods have no network of their own to report.
    let h = env.pod_stats(&host).await.linux.unwrap();
    assert!(h.network.is_none());
    assert!(h.containers.is_empty());

    // Metric descriptors in cAdvisor's names, and the metrics themselves.
    let descs = env
        .rt
        .list_metric_descriptors(cri::ListMetricDescriptorsRequest {})
        .await
        .unwrap()
        .into_inner()
        .descriptors;
    let keys: HashMap<String, Vec<String>> =
        descs.into_iter().map(|d| (d.name, d.label_keys)).collect();
    for name in [
        "container_cpu_usage_seconds_total",
        "container_memory_working_set_bytes",
        "container_memory_usage_bytes",
        "container_memory_rss",
        "container_memory_swap",
        "container_spec_memory_limit_bytes",
        "container_processes",
        "container_fs_usage_bytes",
        "container_network_receive_bytes_total",
        "container_network_transmit_bytes_total",
        "container_network_receive_errors_total",
        "container_network_transmit_errors_total",
        "container_pressure_cpu_waiting_seconds_total",
        "container_pressure_memory_stalled_seconds_total",
        "container_pressure_io_waiting_seconds_total",
    ] {
        assert!(keys.contains_key(name), "no descriptor {name}");
    }
    assert_eq!(
        keys["container_network_transmit_bytes_total"],
        ["id", "name", "image", "interface"]
    );

    // The walk of the container's layer is cached; poll until it is in.
    let deadline = Instant::now() + DEADLINE;
    let (pm, cm) = loop {
        let all = env
            .rt
            .list_pod_sandbox_metrics(cri::ListPodSandboxMetricsRequest {})
            .await
            .unwrap()
            .into_inner()
            .pod_metrics;
        assert_eq!(all.len(), 2, "both pods");
        let pm = all.into_iter().find(|p| p.pod_sandbox_id == pod).unwrap();
        assert_eq!(pm.container_metrics.len(), 1);
        let cm = pm.container_metrics[0].clone();
        if cm
            .metrics
            .iter()
            .any(|m| m.name == "container_fs_usage_bytes")
        {
            break (pm, cm);
        }
        assert!(Instant::now() < deadline, "no fs usage metric: {cm:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(cm.container_id, ctr);
    for m in pm.metrics.iter().chain(&cm.metrics) {
        assert_eq!(
            m.label_values.len(),
            keys[&m.name].len(),
            "labels of {m:?} vs {:?}",
            keys[&m.name]
        );
    }
    let metric = |ms: &[cri::Metric], name: &str, last_label: &str| -> cri::Metric {
        ms.iter()
            .find(|m| m.name == name && m.label_values.last().unwrap() == last_label)
            .unwrap_or_else(|| panic!("no {name} {last_label} in {ms:#?}"))
            .clone()
    };
    let cpu = metric(&cm.metrics, "container_cpu_usage_seconds_total", "total");
    assert_eq!(cpu.label_values, [ctr.as_str(), "app", IMAGE, "total"]);
    assert_eq!(cpu.metric_type, cri::MetricType::Counter as i32);
    let ws = metric(&cm.metrics, "container_memory_working_set_bytes", IMAGE);
    assert!(val(&ws.value) > 0);
    assert_eq!(ws.metric_type, cri::MetricType::Gauge as i32);
    let tx = metric(
        &pm.metrics,
        "container_network_transmit_bytes_total",
        "eth0",
    );
    assert_eq!(tx.label_values, [pod.as_str(), "POD", "", "eth0"]);
    assert!(val(&tx.value) >= 3000);
    let rx = metric(&pm.metrics, "container_network_receive_bytes_total", "eth0");
    assert_eq!(rx.metric_type, cri::MetricType::Counter as i32);
    env.finish().await;
}

/// Measurement, not a check of speed (run it by hand:
/// `cargo nextest run --release --test stats --run-ignored only`): the time
/// of ListContainerStats/ListPodSandboxStats with 100 running containers in
/// 10 pods, and, when strace is installed, the files the daemon opens for one
/// ListContainerStats call.
#[tokio::test]
#[ignore = "measurement: 100 containers; run by hand"]
async fn list_stats_of_100_containers() {
    let mut env = start().await;
    for p in 0..10 {
        let name = format!("many{p}");
        let pod = env.pod_net(&name, cri::NamespaceMode::Pod).await;
        for c in 0..10 {
            env.run(&pod, sh(&format!("c{c}"), "exec sleep 1000", &[]))
                .await;
        }
    }
    let list = cri::ListContainerStatsRequest { filter: None };
    // Warm up: the first call queues the writable layer walks.
    let deadline = Instant::now() + DEADLINE;
    loop {
        let s = env
            .rt
            .list_container_stats(list.clone())
            .await
            .unwrap()
            .into_inner()
            .stats;
        assert_eq!(s.len(), 100);
        if s.iter().all(|s| s.writable_layer.is_some()) {
            assert!(s.iter().all(|s| s.cpu.is_some() && s.memory.is_some()));
            break;
        }
        assert!(Instant::now() < deadline, "walks never finished");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut times = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        env.rt.list_container_stats(list.clone()).await.unwrap();
        times.push(t.elapsed());
    }
    times.sort();
    let mut pod_times = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        let r = env
            .rt
            .list_pod_sandbox_stats(cri::ListPodSandboxStatsRequest { filter: None })
            .await
            .unwrap()
            .into_inner();
        pod_times.push(t.elapsed());
        assert_eq!(r.stats.len(), 10);
    }
    pod_times.sort();
    eprintln!(
        "ListContainerStats, 100 containers: median {:?}, max {:?}; \
         ListPodSandboxStats, 10 pods: median {:?}, max {:?}",
        times[10], times[19], pod_times[10], pod_times[19]
    );
    let pid = env.berth.pid().unwrap();
    if let Ok(st) = std::process::Command::new("strace")
        .args([
            "-f",
            "-qq",
            "-e",
            "trace=openat,execve,clone,clone3,fork,vfork",
        ])
        .args(["-o", "/dev/stderr", "-p", &pid.to_string()])
        .stderr(std::process::Stdio::piped())
        .spawn()
    {
        tokio::time::sleep(Duration::from_secs(1)).await;
        env.rt.list_container_stats(list.clone()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(st.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        );
        let out = st.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stderr);
        let opens = text.lines().filter(|l| l.contains("openat(")).count();
        let spawns = text
            .lines()
            .filter(|l| l.contains("execve(") || l.contains("fork(") || l.contains("clone"))
            .count();
        eprintln!("one ListContainerStats of 100: {opens} files opened, {spawns} clone/exec calls");
        let mut by_name: std::collections::BTreeMap<String, usize> = Default::default();
        for l in text.lines().filter(|l| l.contains("openat(")) {
            if let Some(path) = l.split('"').nth(1) {
                let base = path.rsplit('/').next().unwrap_or(path).to_string();
                *by_name.entry(base).or_default() += 1;
            }
        }
        eprintln!("opened by file name: {by_name:?}");
    }
    env.finish().await;
}
