//! VM-only (see tests/vm_smoke.rs for the rules): with pure cgroup v2 the
//! stats come from the container's cgroup and match what the container did:
//! memory it filled shows in its working set, a busy loop in its CPU usage,
//! the processes it started in pids.current; the pod's figures come from
//! its kubelet cgroup parent.

mod common;

use common::*;
use cri_proto::v1 as cri;
use std::path::Path;
use std::time::{Duration, Instant};

fn require_vm() {
    if std::env::var("BERTH_VM").as_deref() != Ok("1") {
        panic!(
            "this test only runs inside the test VM (pure cgroup v2): run it with \
             scripts/vm-test after cargo build --release --all-targets"
        );
    }
}

const IMAGE: &str = "127.0.0.1:5000/busybox:latest";
const PARENT: &str = "kubepods-stats/pod-stats-test";
const LIMIT: u64 = 128 << 20;
const FILL: u64 = 40 << 20;

fn pod_config() -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: "stats".into(),
            uid: "stats-uid".into(),
            namespace: "default".into(),
            attempt: 0,
        }),
        linux: Some(cri::LinuxPodSandboxConfig {
            cgroup_parent: PARENT.into(),
            security_context: Some(cri::LinuxSandboxSecurityContext {
                namespace_options: Some(cri::NamespaceOption {
                    pid: cri::NamespaceMode::Container as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn val(v: &Option<cri::UInt64Value>) -> u64 {
    v.as_ref().expect("value present").value
}

#[tokio::test]
#[ignore = "needs the test VM: scripts/vm-test"]
async fn vm_stats_follow_cgroup_usage() {
    require_vm();
    let Env {
        mut rt,
        berth,
        reg,
        ns,
        ..
    } = Env::start(&["busybox"]).await;
    let pod = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(pod_config()),
            runtime_handler: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .pod_sandbox_id;

    // Fills 40 MiB of the pod's /dev/shm (tmpfs: charged to the writer's
    // cgroup and never inactive file cache, so all of it is working set),
    // burns CPU for 3 s, then leaves 4 sleeping children: 5 processes.
    let script = format!(
        "dd if=/dev/zero of=/dev/shm/fill bs=1M count={} 2>/dev/null; \
         timeout 3 sh -c 'while :; do :; done'; \
         for i in 1 2 3 4; do sleep 1000 & done; wait",
        FILL >> 20
    );
    let id = rt
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(cri::ContainerConfig {
                metadata: Some(cri::ContainerMetadata {
                    name: "load".into(),
                    attempt: 0,
                }),
                image: Some(cri::ImageSpec {
                    image: IMAGE.into(),
                    ..Default::default()
                }),
                command: vec!["sh".into(), "-c".into(), script],
                linux: Some(cri::LinuxContainerConfig {
                    resources: Some(cri::LinuxContainerResources {
                        memory_limit_in_bytes: LIMIT as i64,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            sandbox_config: Some(pod_config()),
        })
        .await
        .unwrap()
        .into_inner()
        .container_id;
    rt.start_container(cri::StartContainerRequest {
        container_id: id.clone(),
    })
    .await
    .unwrap();

    // Wait for the steady state: the 4 sleeps started (5 processes) and a
    // CPU rate computed from two samples.
    let deadline = Instant::now() + Duration::from_secs(240);
    let s = loop {
        let s = rt
            .container_stats(cri::ContainerStatsRequest {
                container_id: id.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .stats
            .unwrap();
        let procs = std::fs::read_to_string(
            Path::new("/sys/fs/cgroup")
                .join(PARENT)
                .join(&id)
                .join("pids.current"),
        )
        .unwrap_or_default();
        let rate = s.cpu.as_ref().and_then(|c| c.usage_nano_cores);
        if procs.trim() == "5" && rate.is_some() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "no steady state (pids.current {procs:?}): {s:#?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let cg = Path::new("/sys/fs/cgroup").join(PARENT).join(&id);
    let cpu = s.cpu.unwrap();
    let burned = val(&cpu.usage_core_nano_seconds);
    assert!(burned >= 1_500_000_000, "3 s busy loop, usage {burned} ns");
    let mem = s.memory.unwrap();
    let ws = val(&mem.working_set_bytes);
    assert!(ws >= FILL, "working set {ws} < the {FILL} bytes filled");
    assert!(ws <= LIMIT);
    assert!(val(&mem.usage_bytes) >= ws);
    assert_eq!(val(&mem.available_bytes), LIMIT - ws);
    assert!(mem.rss_bytes.is_some() && mem.page_faults.is_some());
    assert!(mem.major_page_faults.is_some());
    if cg.join("memory.swap.current").exists() {
        let swap = s.swap.expect("swap from memory.swap.current");
        assert!(swap.swap_usage_bytes.is_some());
    }
    if cg.join("cpu.pressure").exists() {
        assert!(cpu.psi.is_some() && mem.psi.is_some());
        assert!(s.io.and_then(|io| io.psi).is_some());
    }

    // The pod: its kubelet cgroup parent holds the infra and the container.
    let p = rt
        .pod_sandbox_stats(cri::PodSandboxStatsRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .stats
        .unwrap()
        .linux
        .unwrap();
    assert!(val(&p.cpu.unwrap().usage_core_nano_seconds) >= burned);
    assert!(val(&p.memory.unwrap().working_set_bytes) >= FILL);
    let pod_procs = val(&p.process.unwrap().process_count);
    assert!(
        pod_procs >= 6,
        "5 in the container + the infra: {pod_procs}"
    );
    assert_eq!(p.containers.len(), 1);

    // Metrics carry the same figures.
    let m = rt
        .list_pod_sandbox_metrics(cri::ListPodSandboxMetricsRequest {})
        .await
        .unwrap()
        .into_inner()
        .pod_metrics;
    let cm = &m
        .iter()
        .find(|x| x.pod_sandbox_id == pod)
        .unwrap()
        .container_metrics[0];
    let get = |name: &str| {
        cm.metrics
            .iter()
            .find(|x| x.name == name)
            .unwrap_or_else(|| panic!("no {name}: {cm:#?}"))
            .value
            .unwrap()
            .value
    };
    assert_eq!(get("container_processes"), 5);
    assert_eq!(get("container_spec_memory_limit_bytes"), LIMIT);
    assert!(get("container_memory_working_set_bytes") >= FILL);
    assert!(get("container_cpu_usage_seconds_total") >= 1);

    rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    })
    .await
    .unwrap();
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    })
    .await
    .unwrap();
    assert!(!cg.exists(), "container cgroup removed");
    let dir = berth.dir.clone();
    drop(rt);
    drop(berth);
    drop(reg);
    ns.assert_no_leaks(&dir);
    // Leave the VM's hierarchy as found.
    let _ = std::fs::remove_dir(Path::new("/sys/fs/cgroup").join(PARENT));
    let _ = std::fs::remove_dir("/sys/fs/cgroup/kubepods-stats");
}
