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

#[tokio::test]
#[ignore = "needs the test VM: scripts/vm-test"]
async fn vm_limits_oom_and_cleanup() {
    require_vm();
    let ns = Netns::new();
    let reg = Registry::start(&ns, RegistryOpts::default());
    reg.push("busybox", "busybox:latest");
    let berth = Berth::start(
        &ns,
        BerthOpts {
            registries_conf: Some(
                "[[registry]]\nlocation = \"127.0.0.1:5000\"\ninsecure = true\n".into(),
            ),
            ..Default::default()
        },
    );
    let mut im = berth.image_client().await;
    im.pull_image(cri::PullImageRequest {
        image: Some(cri::ImageSpec {
            image: IMAGE.into(),
            ..Default::default()
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut rt = berth.runtime_client().await;
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
    drop(im);
    drop(berth);
    drop(reg);
    ns.assert_no_leaks(&dir);
    // Leave the VM's hierarchy as found.
    let _ = std::fs::remove_dir(Path::new("/sys/fs/cgroup").join(parent));
    let _ = std::fs::remove_dir("/sys/fs/cgroup/kubepods");
}
