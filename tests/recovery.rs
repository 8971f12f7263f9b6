//! kill -9 of the daemon at each step of the lifecycle (BERTH_FAILPOINT makes
//! berth SIGKILL itself there), then a restart: nothing half-made stays
//! visible, nothing leaks, and every RPC works on what was recovered.

mod common;

use common::*;
use cri_proto::v1 as cri;
use cri_proto::v1::runtime_service_client::RuntimeServiceClient;
use std::time::{Duration, Instant};
use tonic::transport::Channel;

const IMAGE: &str = "127.0.0.1:5000/busybox:latest";

fn pod_config(name: &str) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.into(),
            uid: format!("uid-{name}"),
            namespace: "default".into(),
            attempt: 0,
        }),
        linux: Some(cri::LinuxPodSandboxConfig {
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

fn ctr_config(name: &str) -> cri::ContainerConfig {
    cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(cri::ImageSpec {
            image: IMAGE.into(),
            ..Default::default()
        }),
        command: vec!["sleep".into(), "1000".into()],
        ..Default::default()
    }
}

async fn run_pod(
    rt: &mut RuntimeServiceClient<Channel>,
    name: &str,
) -> Result<String, tonic::Status> {
    rt.run_pod_sandbox(cri::RunPodSandboxRequest {
        config: Some(pod_config(name)),
        runtime_handler: String::new(),
    })
    .await
    .map(|r| r.into_inner().pod_sandbox_id)
}

async fn create(
    rt: &mut RuntimeServiceClient<Channel>,
    pod: &str,
    name: &str,
) -> Result<String, tonic::Status> {
    rt.create_container(cri::CreateContainerRequest {
        pod_sandbox_id: pod.into(),
        config: Some(ctr_config(name)),
        sandbox_config: Some(pod_config("p")),
    })
    .await
    .map(|r| r.into_inner().container_id)
}

/// Waits for the daemon to have killed itself at the failpoint.
fn wait_dead(berth: &mut Berth) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while berth.is_running() {
        assert!(Instant::now() < deadline, "berth did not hit its failpoint");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// berth's infra and monitor processes still alive for this daemon's dirs.
fn berth_helpers(berth: &Berth) -> Vec<String> {
    let dir = berth.dir.display().to_string();
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat
            .rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
        {
            continue;
        }
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains(&dir) && (cmd.contains(" pause ") || cmd.contains(" monitor ")) {
            found.push(format!("{pid}: {cmd}"));
        }
    }
    found
}

fn entries(p: std::path::PathBuf) -> Vec<String> {
    std::fs::read_dir(p)
        .map(|r| {
            r.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn kill_at_every_step_then_recover() {
    let Env {
        mut berth, reg, ns, ..
    } = Env::start(&["busybox"]).await;

    // A pod and a running container that must survive every crash below.
    let mut rt = berth.runtime_client().await;
    let keep_pod = run_pod(&mut rt, "keep").await.unwrap();
    let keep_ctr = create(&mut rt, &keep_pod, "keep").await.unwrap();
    rt.start_container(cri::StartContainerRequest {
        container_id: keep_ctr.clone(),
    })
    .await
    .unwrap();

    let arm = |berth: &mut Berth, point: &str| {
        berth.opts.env = vec![("BERTH_FAILPOINT".into(), point.into())];
        berth.restart();
    };
    let disarm = |berth: &mut Berth| {
        berth.opts.env.clear();
        berth.restart();
    };

    for point in ["pod-after-record", "pod-after-netns", "pod-after-infra"] {
        arm(&mut berth, point);
        let mut rt = berth.runtime_client().await;
        assert!(
            run_pod(&mut rt, point).await.is_err(),
            "{point}: berth died"
        );
        wait_dead(&mut berth);
        disarm(&mut berth);
        let mut rt = berth.runtime_client().await;
        let pods = rt
            .list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
            .await
            .unwrap()
            .into_inner()
            .items;
        assert_eq!(
            pods.iter().map(|p| p.id.clone()).collect::<Vec<_>>(),
            vec![keep_pod.clone()],
            "{point}"
        );
        assert_eq!(
            entries(berth.state_dir.join("netns")),
            vec![keep_pod.clone()],
            "{point}: pins"
        );
        assert_eq!(
            entries(berth.root.join("pods")),
            vec![keep_pod.clone()],
            "{point}: records"
        );
        assert_eq!(
            berth_helpers(&berth).len(),
            2,
            "{point}: only keep's infra and monitor: {:?}",
            berth_helpers(&berth)
        );
        // The same pod can be made now.
        let id = run_pod(&mut rt, point).await.unwrap();
        rt.remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: id })
            .await
            .unwrap();
    }

    for point in [
        "ctr-after-record",
        "ctr-after-monitor",
        "ctr-before-created",
    ] {
        arm(&mut berth, point);
        let mut rt = berth.runtime_client().await;
        assert!(
            create(&mut rt, &keep_pod, point).await.is_err(),
            "{point}: berth died"
        );
        wait_dead(&mut berth);
        disarm(&mut berth);
        let mut rt = berth.runtime_client().await;
        let ctrs = rt
            .list_containers(cri::ListContainersRequest { filter: None })
            .await
            .unwrap()
            .into_inner()
            .containers;
        assert_eq!(
            ctrs.iter().map(|c| c.id.clone()).collect::<Vec<_>>(),
            vec![keep_ctr.clone()],
            "{point}"
        );
        assert_eq!(
            entries(berth.root.join("containers")),
            vec![keep_ctr.clone()],
            "{point}: dirs"
        );
        // The init of the half-made container died with its monitor.
        let deadline = Instant::now() + Duration::from_secs(5);
        while berth_helpers(&berth).len() != 2 {
            assert!(
                Instant::now() < deadline,
                "{point}: leftovers {:?}",
                berth_helpers(&berth)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let id = create(&mut rt, &keep_pod, point).await.unwrap();
        rt.remove_container(cri::RemoveContainerRequest { container_id: id })
            .await
            .unwrap();
    }

    // Killed right after StartContainer let the process go: it runs.
    let mut rt = berth.runtime_client().await;
    let started = create(&mut rt, &keep_pod, "started").await.unwrap();
    arm(&mut berth, "ctr-start-after-fifo");
    let mut rt = berth.runtime_client().await;
    assert!(rt
        .start_container(cri::StartContainerRequest {
            container_id: started.clone()
        })
        .await
        .is_err());
    wait_dead(&mut berth);
    disarm(&mut berth);
    let mut rt = berth.runtime_client().await;
    let s = rt
        .container_status(cri::ContainerStatusRequest {
            container_id: started.clone(),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap();
    assert_eq!(s.state, cri::ContainerState::ContainerRunning as i32);
    rt.stop_container(cri::StopContainerRequest {
        container_id: started.clone(),
        timeout: 0,
    })
    .await
    .unwrap();

    // The survivor kept running through all of it.
    let s = rt
        .container_status(cri::ContainerStatusRequest {
            container_id: keep_ctr.clone(),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap();
    assert_eq!(s.state, cri::ContainerState::ContainerRunning as i32);

    // Killed in StopPodSandbox after the infra died: not ready, then removable.
    arm(&mut berth, "pod-stop-after-kill");
    let mut rt = berth.runtime_client().await;
    assert!(rt
        .stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: keep_pod.clone()
        })
        .await
        .is_err());
    wait_dead(&mut berth);
    disarm(&mut berth);
    let mut rt = berth.runtime_client().await;
    let p = rt
        .pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: keep_pod.clone(),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap();
    assert_eq!(p.state, cri::PodSandboxState::SandboxNotready as i32);
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: keep_pod.clone(),
    })
    .await
    .unwrap();
    assert!(entries(berth.root.join("containers")).is_empty());
    assert!(entries(berth.state_dir.join("netns")).is_empty());
    assert!(
        berth_helpers(&berth).is_empty(),
        "{:?}",
        berth_helpers(&berth)
    );
    let dir = berth.dir.clone();
    drop(rt);
    drop(berth);
    drop(reg);
    ns.assert_no_leaks(&dir);
}
