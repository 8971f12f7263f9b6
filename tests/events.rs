//! GetContainerEvents (Evented PLEG) and the streaming list RPCs.

mod common;

use common::*;
use cri_proto::v1 as cri;
use cri_proto::v1::runtime_service_client::RuntimeServiceClient;
use std::time::Duration;
use tonic::transport::Channel;

const IMAGE: &str = "127.0.0.1:5000/busybox:latest";

async fn start() -> (Netns, Registry, Berth) {
    let Env { berth, reg, ns, .. } = Env::start(&["busybox"]).await;
    (ns, reg, berth)
}

fn pod_config(name: &str) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.into(),
            uid: format!("uid-{name}"),
            namespace: "default".into(),
            attempt: 0,
        }),
        ..Default::default()
    }
}

async fn container(
    rt: &mut RuntimeServiceClient<Channel>,
    pod: &str,
    pod_name: &str,
    name: &str,
    script: &str,
) -> String {
    rt.create_container(cri::CreateContainerRequest {
        pod_sandbox_id: pod.into(),
        config: Some(cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: name.into(),
                attempt: 0,
            }),
            image: Some(cri::ImageSpec {
                image: IMAGE.into(),
                ..Default::default()
            }),
            command: vec!["sh".into(), "-c".into(), script.into()],
            ..Default::default()
        }),
        sandbox_config: Some(pod_config(pod_name)),
    })
    .await
    .unwrap()
    .into_inner()
    .container_id
}

type Event = (String, i32);

/// Reads events until the pod's DELETED event (or panics after 30 s).
async fn collect(
    mut s: tonic::Streaming<cri::ContainerEventResponse>,
    pod: String,
) -> (Vec<Event>, Vec<cri::ContainerEventResponse>) {
    let mut seen = Vec::new();
    let mut full = Vec::new();
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(30), s.message())
            .await
            .unwrap_or_else(|_| panic!("no DELETED event for the pod; saw {seen:?}"))
            .unwrap()
            .expect("stream ended early");
        seen.push((ev.container_id.clone(), ev.container_event_type));
        let done = ev.container_id == pod
            && ev.container_event_type == cri::ContainerEventType::ContainerDeletedEvent as i32;
        full.push(ev);
        if done {
            return (seen, full);
        }
    }
}

/// Two subscribers see the same events in the same order, each carrying
/// the pod's status and its containers' statuses.
#[tokio::test]
async fn two_subscribers_see_the_same_ordered_events() {
    let (ns, reg, berth) = start().await;
    let mut rt = berth.runtime_client().await;
    let a = rt
        .get_container_events(cri::GetEventsRequest {})
        .await
        .unwrap()
        .into_inner();
    let b = berth
        .runtime_client()
        .await
        .get_container_events(cri::GetEventsRequest {})
        .await
        .unwrap()
        .into_inner();

    let pod = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(pod_config("ev")),
            runtime_handler: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .pod_sandbox_id;
    let (ta, tb) = (
        tokio::spawn(collect(a, pod.clone())),
        tokio::spawn(collect(b, pod.clone())),
    );
    let ctr = container(&mut rt, &pod, "ev", "c", "exit 3").await;
    rt.start_container(cri::StartContainerRequest {
        container_id: ctr.clone(),
    })
    .await
    .unwrap();
    // Its exit is an event of its own, with the exit code in the statuses.
    loop {
        let s = rt
            .container_status(cri::ContainerStatusRequest {
                container_id: ctr.clone(),
                verbose: false,
            })
            .await
            .unwrap()
            .into_inner()
            .status
            .unwrap();
        if s.state == cri::ContainerState::ContainerExited as i32 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    rt.remove_container(cri::RemoveContainerRequest {
        container_id: ctr.clone(),
    })
    .await
    .unwrap();
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

    let (seen_a, full) = ta.await.unwrap();
    let (seen_b, _) = tb.await.unwrap();
    assert_eq!(seen_a, seen_b, "both subscribers, same order");
    use cri::ContainerEventType as T;
    let want: Vec<Event> = vec![
        (pod.clone(), T::ContainerCreatedEvent as i32),
        (pod.clone(), T::ContainerStartedEvent as i32),
        (ctr.clone(), T::ContainerCreatedEvent as i32),
        (ctr.clone(), T::ContainerStartedEvent as i32),
        (ctr.clone(), T::ContainerStoppedEvent as i32),
        (ctr.clone(), T::ContainerDeletedEvent as i32),
        (pod.clone(), T::ContainerStoppedEvent as i32),
        (pod.clone(), T::ContainerDeletedEvent as i32),
    ];
    assert_eq!(seen_a, want);
    let stopped = &full[4];
    assert_eq!(
        stopped.pod_sandbox_status.as_ref().map(|p| p.id.as_str()),
        Some(pod.as_str())
    );
    let st = stopped
        .containers_statuses
        .iter()
        .find(|s| s.id == ctr)
        .expect("the container's status");
    assert_eq!(st.exit_code, 3);
    assert!(full[5].containers_statuses.iter().all(|s| s.id != ctr));
    assert!(full.iter().all(|e| e.created_at > 0));

    let dir = berth.dir.clone();
    drop(rt);
    drop(berth);
    drop(reg);
    ns.assert_no_leaks(&dir);
}

/// 20,000 containers (records of an exited one, copied while berth is
/// down) come back from StreamContainers in messages a default 4 MiB client
/// accepts; ListContainers with kubelet's 16 MiB limit agrees.
#[tokio::test]
async fn streaming_lists_20000_containers() {
    let (ns, reg, mut berth) = start().await;
    let mut rt = berth.runtime_client().await;
    let pod = rt
        .run_pod_sandbox(cri::RunPodSandboxRequest {
            config: Some(pod_config("many")),
            runtime_handler: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .pod_sandbox_id;
    let ctr = container(&mut rt, &pod, "many", "c", "true").await;
    rt.stop_container(cri::StopContainerRequest {
        container_id: ctr.clone(),
        timeout: 0,
    })
    .await
    .unwrap();
    drop(rt);
    berth.stop();
    const N: usize = 20_000;
    let dir = berth.root.join("containers");
    let state = std::fs::read_to_string(dir.join(&ctr).join("state.json")).unwrap();
    let label = "x".repeat(200);
    for i in 0..N {
        let id = format!("{:064x}", i + 1);
        let mut v: serde_json::Value = serde_json::from_str(&state).unwrap();
        v["id"] = id.clone().into();
        v["spec"]["name"] = format!("copy-{i}").into();
        v["spec"]["labels"]["big"] = label.clone().into();
        std::fs::create_dir(dir.join(&id)).unwrap();
        std::fs::write(dir.join(&id).join("state.json"), v.to_string()).unwrap();
    }
    berth.restart();
    let mut rt = berth.runtime_client().await;
    let mut s = rt
        .stream_containers(cri::StreamContainersRequest { filter: None })
        .await
        .unwrap()
        .into_inner();
    let mut ids = Vec::new();
    let mut messages = 0;
    while let Some(m) = s.message().await.unwrap() {
        use prost::Message;
        assert!(m.encoded_len() < 4 << 20);
        messages += 1;
        ids.extend(m.containers.into_iter().map(|c| c.id));
    }
    assert_eq!(ids.len(), N + 1);
    assert!(messages > 1, "{messages} message(s)");
    let unique: std::collections::HashSet<_> = ids.iter().collect();
    assert_eq!(unique.len(), N + 1);
    let mut big =
        RuntimeServiceClient::new(berth.channel().await).max_decoding_message_size(16 << 20);
    let listed = big
        .list_containers(cri::ListContainersRequest { filter: None })
        .await
        .unwrap()
        .into_inner()
        .containers;
    assert_eq!(listed.len(), N + 1);
    // Filters apply as in ListContainers.
    let mut s = rt
        .stream_containers(cri::StreamContainersRequest {
            filter: Some(cri::ContainerFilter {
                id: ctr.clone(),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();
    let one = s.message().await.unwrap().unwrap();
    assert_eq!(one.containers.len(), 1);
    let pods = rt
        .stream_pod_sandboxes(cri::StreamPodSandboxesRequest { filter: None })
        .await
        .unwrap()
        .into_inner()
        .message()
        .await
        .unwrap()
        .unwrap();
    assert_eq!(pods.pod_sandboxes.len(), 1);

    // The copies are files only: drop them with berth down.
    drop((rt, big));
    berth.kill9();
    for i in 0..N {
        std::fs::remove_dir_all(dir.join(format!("{:064x}", i + 1))).unwrap();
    }
    berth.restart();
    let mut rt = berth.runtime_client().await;
    rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
        pod_sandbox_id: pod,
    })
    .await
    .unwrap();
    let d = berth.dir.clone();
    drop(rt);
    drop(berth);
    drop(reg);
    ns.assert_no_leaks(&d);
}

/// Every message of a server stream.
async fn drain<T>(s: Result<tonic::Response<tonic::Streaming<T>>, tonic::Status>) -> Vec<T> {
    let mut s = s.unwrap().into_inner();
    let mut out = Vec::new();
    while let Some(m) = s.message().await.unwrap() {
        out.push(m);
    }
    out
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

/// StreamContainerStats, StreamPodSandboxStats and StreamPodSandboxMetrics
/// answer for the same objects as their unary twins, filters included.
/// (Samples are taken anew by each call, so objects and attributes are
/// compared, not the usage figures.)
#[tokio::test]
async fn streaming_stats_match_the_unary_twins() {
    let (ns, reg, berth) = start().await;
    let mut rt = berth.runtime_client().await;
    let mut pods = Vec::new();
    let mut ctrs = Vec::new();
    for name in ["sa", "sb"] {
        let pod = rt
            .run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(pod_config(name)),
                runtime_handler: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .pod_sandbox_id;
        for c in ["c1", "c2"] {
            let id = container(&mut rt, &pod, name, c, "sleep 1000").await;
            rt.start_container(cri::StartContainerRequest {
                container_id: id.clone(),
            })
            .await
            .unwrap();
            ctrs.push(id);
        }
        pods.push(pod);
    }

    let mut im = berth.image_client().await;
    for filter in [
        None,
        Some(cri::ImageFilter {
            image: Some(cri::ImageSpec {
                image: IMAGE.into(),
                ..Default::default()
            }),
        }),
    ] {
        let unary = sorted(
            im.list_images(cri::ListImagesRequest {
                filter: filter.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .images
            .into_iter()
            .map(|i| i.id)
            .collect(),
        );
        let streamed = sorted(
            drain(
                im.stream_images(cri::StreamImagesRequest {
                    filter: filter.clone(),
                })
                .await,
            )
            .await
            .into_iter()
            .flat_map(|m| m.images)
            .map(|i| i.id)
            .collect(),
        );
        assert_eq!(streamed, unary);
        assert_eq!(unary.len(), 1);
    }

    let ctr_filters = [
        None,
        Some(cri::ContainerStatsFilter {
            id: ctrs[1].clone(),
            ..Default::default()
        }),
        Some(cri::ContainerStatsFilter {
            pod_sandbox_id: pods[1].clone(),
            ..Default::default()
        }),
        Some(cri::ContainerStatsFilter {
            id: "no-such-container".into(),
            ..Default::default()
        }),
    ];
    for filter in ctr_filters {
        let unary: Vec<_> = rt
            .list_container_stats(cri::ListContainerStatsRequest {
                filter: filter.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .stats
            .into_iter()
            .map(|s| s.attributes.unwrap())
            .collect();
        let streamed: Vec<_> = drain(
            rt.stream_container_stats(cri::StreamContainerStatsRequest {
                filter: filter.clone(),
            })
            .await,
        )
        .await
        .into_iter()
        .flat_map(|m| m.container_stats)
        .map(|s| s.attributes.unwrap())
        .collect();
        let key = |v: &[cri::ContainerAttributes]| {
            let mut v = v.to_vec();
            v.sort_by(|a, b| a.id.cmp(&b.id));
            v
        };
        assert_eq!(key(&streamed), key(&unary), "{filter:?}");
    }

    for filter in [
        None,
        Some(cri::PodSandboxStatsFilter {
            id: pods[0].clone(),
            ..Default::default()
        }),
    ] {
        let pod_ids = |stats: Vec<cri::PodSandboxStats>| {
            sorted(
                stats
                    .into_iter()
                    .map(|s| s.attributes.unwrap().id)
                    .collect(),
            )
        };
        let unary = pod_ids(
            rt.list_pod_sandbox_stats(cri::ListPodSandboxStatsRequest {
                filter: filter.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .stats,
        );
        let streamed = pod_ids(
            drain(
                rt.stream_pod_sandbox_stats(cri::StreamPodSandboxStatsRequest {
                    filter: filter.clone(),
                })
                .await,
            )
            .await
            .into_iter()
            .flat_map(|m| m.pod_sandbox_stats)
            .collect(),
        );
        assert_eq!(streamed, unary, "{filter:?}");
        assert_eq!(unary.len(), if filter.is_some() { 1 } else { 2 });
    }

    let shape = |m: Vec<cri::PodSandboxMetrics>| {
        sorted(
            m.into_iter()
                .map(|p| {
                    let ctrs = sorted(
                        p.container_metrics
                            .into_iter()
                            .map(|c| c.container_id)
                            .collect(),
                    );
                    format!("{} {ctrs:?}", p.pod_sandbox_id)
                })
                .collect(),
        )
    };
    let unary = shape(
        rt.list_pod_sandbox_metrics(cri::ListPodSandboxMetricsRequest {})
            .await
            .unwrap()
            .into_inner()
            .pod_metrics,
    );
    let streamed = shape(
        drain(
            rt.stream_pod_sandbox_metrics(cri::StreamPodSandboxMetricsRequest {})
                .await,
        )
        .await
        .into_iter()
        .flat_map(|m| m.pod_sandbox_metrics)
        .collect(),
    );
    assert_eq!(streamed, unary);
    assert_eq!(unary.len(), 2);

    for pod in pods {
        rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: pod,
        })
        .await
        .unwrap();
    }
    let dir = berth.dir.clone();
    drop(rt);
    drop(berth);
    drop(reg);
    ns.assert_no_leaks(&dir);
}
