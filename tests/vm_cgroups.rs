//! VM-only (see tests/vm_smoke.rs for the rules): containers get their own
//! cgroup v2 with the CRI limits, OOM kills are reported as kubelet expects,
//! and nothing of the cgroup is left after removal.

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

fn pod_config(cgroup_parent: &str) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: "cg".into(),
            uid: "cg-uid".into(),
            namespace: "default".into(),
            attempt: 0,
        }),
        linux: Some(cri::LinuxPodSandboxConfig {
            cgroup_parent: cgroup_parent.into(),
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

fn container(name: &str, script: &str, res: cri::LinuxContainerResources) -> cri::ContainerConfig {
    cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(cri::ImageSpec {
            image: IMAGE.into(),
            ..Default::default()
        }),
        command: vec!["sh".into(), "-c".into(), script.into()],
        linux: Some(cri::LinuxContainerConfig {
            resources: Some(res),
            ..Default::default()
        }),
        ..Default::default()
    }
}

struct Vm {
    rt: cri::runtime_service_client::RuntimeServiceClient<tonic::transport::Channel>,
    berth: Berth,
    reg: Registry,
    ns: Netns,
}

/// Registry with busybox, berth, busybox pulled.
async fn setup() -> Vm {
    require_vm();
    let Env {
        rt, berth, reg, ns, ..
    } = Env::start(&["busybox"]).await;
    Vm { rt, berth, reg, ns }
}

impl Vm {
    /// Stops and removes every pod, checks for leaks, removes `parent`.
    async fn finish(self, parents: &[&str]) {
        let Vm { rt, berth, reg, ns } = self;
        teardown(rt, berth, reg, ns).await;
        for parent in parents {
            let mut p = Path::new("/sys/fs/cgroup").join(parent);
            while p != Path::new("/sys/fs/cgroup") {
                let _ = std::fs::remove_dir(&p);
                p.pop();
            }
        }
    }
}

#[tokio::test]
#[ignore = "needs the test VM: scripts/vm-test"]
async fn vm_limits_oom_and_cleanup() {
    let Vm {
        mut rt,
        berth,
        reg,
        ns,
    } = setup().await;
    let parent = "kubepods/pod-cg-test";
    let pod = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(pod_config(parent)),
            runtime_handler: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .pod_sandbox_id;

    // The infra process lives in the sandbox's own cgroup under the parent.
    let pod_cg = Path::new("/sys/fs/cgroup").join(parent).join(&pod);
    let infra_procs = std::fs::read_to_string(pod_cg.join("cgroup.procs")).unwrap();
    assert_eq!(
        infra_procs.lines().count(),
        1,
        "infra in {}: {infra_procs}",
        pod_cg.display()
    );

    // Limits land in the container's cgroup files.
    let limited = cri::LinuxContainerResources {
        cpu_period: 100_000,
        cpu_quota: 50_000,
        cpu_shares: 512,
        memory_limit_in_bytes: 96 << 20,
        unified: [("pids.max".to_string(), "64".to_string())].into(),
        ..Default::default()
    };
    let id = rt
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(container(
                "limited",
                "cat /proc/self/cgroup; sleep 1000",
                limited,
            )),
            sandbox_config: Some(pod_config(parent)),
        })
        .await
        .unwrap()
        .into_inner()
        .container_id;
    let cg = Path::new("/sys/fs/cgroup").join(parent).join(&id);
    let read = |f: &str| std::fs::read_to_string(cg.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
    assert_eq!(read("cpu.max").trim(), "50000 100000");
    assert_eq!(read("cpu.weight").trim(), "20", "kubelet's shares->weight");
    assert_eq!(read("memory.max").trim(), (96u64 << 20).to_string());
    assert_eq!(read("pids.max").trim(), "64");
    rt.start_container(cri::StartContainerRequest {
        container_id: id.clone(),
    })
    .await
    .unwrap();
    // The container's process is in that cgroup before it runs.
    let procs = read("cgroup.procs");
    assert_eq!(procs.lines().count(), 1, "{procs}");
    // Inside, its own cgroup is the root of a read-only cgroupfs.
    let exec = rt
        .exec_sync(cri::ExecSyncRequest {
            container_id: id.clone(),
            cmd: vec![
                "sh".into(),
                "-c".into(),
                "cat /proc/1/cgroup; cat /sys/fs/cgroup/memory.max; touch /sys/fs/cgroup/x 2>/dev/null || echo cgroupfs-ro".into(),
            ],
            timeout: 60,
        })
        .await
        .unwrap()
        .into_inner();
    let out = String::from_utf8_lossy(&exec.stdout);
    assert_eq!(
        out,
        format!("0::/\n{}\ncgroupfs-ro\n", 96u64 << 20),
        "stderr: {}",
        String::from_utf8_lossy(&exec.stderr)
    );

    // Allocating past memory.max: OOM-killed, reported as OOMKilled/137.
    let oom = rt
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(container(
                "hog",
                "cat /dev/zero | head -c 300000000 | tail -c 200000000 > /dev/null",
                cri::LinuxContainerResources {
                    memory_limit_in_bytes: 32 << 20,
                    ..Default::default()
                },
            )),
            sandbox_config: Some(pod_config(parent)),
        })
        .await
        .unwrap()
        .into_inner()
        .container_id;
    rt.start_container(cri::StartContainerRequest {
        container_id: oom.clone(),
    })
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let s = loop {
        let s = rt
            .container_status(cri::ContainerStatusRequest {
                container_id: oom.clone(),
                verbose: false,
            })
            .await
            .unwrap()
            .into_inner()
            .status
            .unwrap();
        if s.state == cri::ContainerState::ContainerExited as i32 {
            break s;
        }
        assert!(Instant::now() < deadline, "hog never exited");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let hog_cg = Path::new("/sys/fs/cgroup").join(parent).join(&oom);
    let events = std::fs::read_to_string(hog_cg.join("memory.events")).unwrap_or_default();
    let exit = std::fs::read_to_string(berth.root.join("containers").join(&oom).join("exit.json"))
        .unwrap_or_default();
    let mlog =
        std::fs::read_to_string(berth.root.join("containers").join(&oom).join("monitor.log"))
            .unwrap_or_default();
    assert_eq!(
        s.reason, "OOMKilled",
        "{s:?}\nmemory.events: {events}\nexit.json: {exit}\nmonitor.log: {mlog}"
    );

    // A limit whose controller is missing is refused unless tolerated: rdma
    // has no such file, so use a bogus unified key to check validation.
    let e = rt
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(container(
                "bad",
                "true",
                cri::LinuxContainerResources {
                    unified: [("../escape".to_string(), "1".to_string())].into(),
                    ..Default::default()
                },
            )),
            sandbox_config: Some(pod_config(parent)),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");

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
    assert!(!pod_cg.exists(), "sandbox cgroup removed");
    let dir = berth.dir.clone();
    drop(rt);
    drop(berth);
    drop(reg);
    ns.assert_no_leaks(&dir);
    // Leave the VM's hierarchy as found.
    let _ = std::fs::remove_dir(Path::new("/sys/fs/cgroup").join(parent));
    let _ = std::fs::remove_dir("/sys/fs/cgroup/kubepods");
}

async fn create_start(
    rt: &mut cri::runtime_service_client::RuntimeServiceClient<tonic::transport::Channel>,
    pod: &str,
    parent: &str,
    c: cri::ContainerConfig,
) -> String {
    let id = rt
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: pod.into(),
            config: Some(c),
            sandbox_config: Some(pod_config(parent)),
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
    id
}

fn cg_read(cg: &Path, f: &str) -> String {
    std::fs::read_to_string(cg.join(f))
        .unwrap_or_else(|e| panic!("{}/{f}: {e}", cg.display()))
        .trim()
        .to_string()
}

fn stat_field(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(key).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no {key} in {text}"))
}

/// Throttling, cpuset, pids, hugetlb and unified limits are enforced by the
/// kernel; UpdateContainerResources changes them live, all or nothing.
#[tokio::test]
#[ignore = "needs the test VM: scripts/vm-test"]
async fn vm_enforcement_and_live_updates() {
    let mut vm = setup().await;
    let parent = "kubepods/pod-enforce";
    let pod = vm
        .rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(pod_config(parent)),
            runtime_handler: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .pod_sandbox_id;

    // A busy loop limited to 20% of a CPU, pinned to CPU 0.
    let busy = create_start(
        &mut vm.rt,
        &pod,
        parent,
        container(
            "busy",
            "while :; do :; done",
            cri::LinuxContainerResources {
                cpu_period: 100_000,
                cpu_quota: 20_000,
                cpuset_cpus: "0".into(),
                hugepage_limits: vec![cri::HugepageLimit {
                    page_size: "2MB".into(),
                    limit: 4 << 20,
                }],
                unified: [("memory.high".to_string(), "209715200".to_string())].into(),
                ..Default::default()
            },
        ),
    )
    .await;
    let cg = Path::new("/sys/fs/cgroup").join(parent).join(&busy);
    assert_eq!(cg_read(&cg, "cpuset.cpus"), "0");
    assert_eq!(cg_read(&cg, "hugetlb.2MB.max"), (4u64 << 20).to_string());
    assert_eq!(cg_read(&cg, "memory.high"), "209715200");
    let before = cg_read(&cg, "cpu.stat");
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = cg_read(&cg, "cpu.stat");
    let wall_us = t0.elapsed().as_micros() as u64;
    let used = stat_field(&after, "usage_usec ") - stat_field(&before, "usage_usec ");
    let throttled = stat_field(&after, "nr_throttled ") - stat_field(&before, "nr_throttled ");
    assert!(throttled > 0, "the busy loop was never throttled: {after}");
    // 20% of one CPU, with room for the period boundaries of a slow VM.
    assert!(
        used * 100 <= wall_us * 35,
        "used {used} us of CPU in {wall_us} us with a 20% quota"
    );
    // The container sees its cpuset.
    let exec = vm
        .rt
        .exec_sync(cri::ExecSyncRequest {
            container_id: busy.clone(),
            cmd: vec![
                "grep".into(),
                "Cpus_allowed_list".into(),
                "/proc/self/status".into(),
            ],
            timeout: 60,
        })
        .await
        .unwrap()
        .into_inner();
    let out = String::from_utf8_lossy(&exec.stdout);
    assert_eq!(out.split_whitespace().nth(1), Some("0"), "{out}");

    // Live update: quota, memory, pids and unified change together...
    let mut updated = cri::LinuxContainerResources {
        cpu_period: 100_000,
        cpu_quota: 50_000,
        memory_limit_in_bytes: 64 << 20,
        cpuset_cpus: "0".into(),
        unified: [
            ("pids.max".to_string(), "30".to_string()),
            ("memory.high".to_string(), "52428800".to_string()),
        ]
        .into(),
        ..Default::default()
    };
    vm.rt
        .update_container_resources(cri::UpdateContainerResourcesRequest {
            container_id: busy.clone(),
            linux: Some(updated.clone()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(cg_read(&cg, "cpu.max"), "50000 100000");
    assert_eq!(cg_read(&cg, "memory.max"), (64u64 << 20).to_string());
    assert_eq!(cg_read(&cg, "pids.max"), "30");
    assert_eq!(cg_read(&cg, "memory.high"), "52428800");
    let status = vm
        .rt
        .container_status(cri::ContainerStatusRequest {
            container_id: busy.clone(),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap();
    let shown = status.resources.and_then(|r| r.linux).unwrap();
    assert_eq!(shown.cpu_quota, 50_000);
    assert_eq!(shown.memory_limit_in_bytes, 64 << 20);
    // ...and not at all when one of them cannot be applied: a memory limit
    // below the current usage is refused, the quota stays as it was.
    updated.cpu_quota = 70_000;
    updated.memory_limit_in_bytes = 4096;
    let e = vm
        .rt
        .update_container_resources(cri::UpdateContainerResourcesRequest {
            container_id: busy.clone(),
            linux: Some(updated),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("below the current usage"), "{e:?}");
    assert_eq!(cg_read(&cg, "cpu.max"), "50000 100000");
    assert_eq!(cg_read(&cg, "memory.max"), (64u64 << 20).to_string());

    // A fork bomb stays at its pids limit; the node stays fine.
    let bomb = create_start(
        &mut vm.rt,
        &pod,
        parent,
        container(
            "bomb",
            "i=0; while [ $i -lt 60 ]; do sleep 1000 & i=$((i+1)); done; wait",
            cri::LinuxContainerResources {
                unified: [("pids.max".to_string(), "16".to_string())].into(),
                ..Default::default()
            },
        ),
    )
    .await;
    let bomb_cg = Path::new("/sys/fs/cgroup").join(parent).join(&bomb);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let events = cg_read(&bomb_cg, "pids.events");
        if stat_field(&events, "max ") > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "never hit pids.max: {events}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let current: u64 = cg_read(&bomb_cg, "pids.current").parse().unwrap();
    assert!(current <= 16, "pids.current {current} above the limit");
    vm.rt
        .version(cri::VersionRequest::default())
        .await
        .expect("the daemon answers while the bomb runs");
    vm.rt
        .stop_container(cri::StopContainerRequest {
            container_id: bomb.clone(),
            timeout: 0,
        })
        .await
        .unwrap();
    // cgroup.kill took every process of the bomb, not just its init.
    let deadline = Instant::now() + Duration::from_secs(30);
    while bomb_cg.exists() && cg_read(&bomb_cg, "pids.current") != "0" {
        assert!(
            Instant::now() < deadline,
            "bomb processes survived the stop"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    vm.finish(&[parent]).await;
}
