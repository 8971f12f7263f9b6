//! Pods with their own user namespace (kubelet's hostUsers: false) on the
//! host kernel: mappings, idmapped rootfs and pod files, volumes, ExecSync,
//! and the refusal of malformed or overlapping mappings.

mod common;

use common::userns::*;
use cri_proto::v1 as cri;
use std::os::unix::fs::MetadataExt;
use tonic::Code;

#[tokio::test]
async fn userns_pod_runs_under_its_mapping() {
    let mut env = start_userns_env("").await;
    let status = env
        .rt
        .status(cri::StatusRequest { verbose: false })
        .await
        .unwrap()
        .into_inner();
    let handler = &status.runtime_handlers[0];
    assert!(handler.features.unwrap().user_namespaces);
    assert!(!status.features.unwrap().user_namespaces_host_network);

    let (_pod, ctr, host) = assert_pod_runs_mapped(&mut env, "mapped").await;
    // ExecSync joins the pod's user namespace too: root inside, the mapped
    // id for what it writes on the host.
    let exec = env.sh(&ctr, "id -u && touch /vol/by-exec").await;
    assert_eq!(exec.stdout, "0\n", "{}", exec.stderr);
    assert_eq!(
        std::fs::metadata(env.vol.join("by-exec")).unwrap().uid(),
        host
    );
    env.finish().await;
}

#[tokio::test]
async fn userns_mappings_are_validated_and_exclusive() {
    let mut env = start_userns_env("").await;
    let host = free_host_ids();
    let a = env.pod_config("a", Some(pod_userns(host)));
    let a_id = env.run_pod(a).await.unwrap();

    // Another pod sharing host ids with a running one.
    let overlapping = env.pod_config("b", Some(pod_userns(host + 1000)));
    let e = env.run_pod(overlapping.clone()).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message().contains("overlap") && e.message().contains(&a_id),
        "{e:?}"
    );
    // A disjoint range is fine.
    let c = env.pod_config("c", Some(pod_userns(host + 2 * POD_IDS)));
    env.run_pod(c).await.unwrap();

    // The record is on disk: a restarted daemon still refuses the overlap.
    env.berth.restart();
    env.rt = env.berth.runtime_client().await;
    let e = env.run_pod(overlapping.clone()).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");

    // Once that pod is stopped, its range is free again.
    env.rt
        .stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: a_id,
        })
        .await
        .unwrap();
    env.run_pod(overlapping).await.unwrap();

    let free = host + 4 * POD_IDS;
    let malformed: [(&str, cri::UserNamespace, &str); 5] = [
        (
            "empty",
            cri::UserNamespace {
                mode: cri::NamespaceMode::Pod as i32,
                ..Default::default()
            },
            "no uid mappings",
        ),
        (
            "zero",
            {
                let mut u = pod_userns(free);
                u.uids[0].length = 0;
                u
            },
            "length 0",
        ),
        (
            "noroot",
            {
                let mut u = pod_userns(free);
                u.gids[0].container_id = 1;
                u
            },
            "container gid 0",
        ),
        (
            "self-overlap",
            {
                let mut u = pod_userns(free);
                u.uids.push(cri::IdMapping {
                    host_id: free + 10,
                    container_id: POD_IDS,
                    length: 5,
                });
                u
            },
            "overlap on the host",
        ),
        (
            "container-mode",
            cri::UserNamespace {
                mode: cri::NamespaceMode::Container as i32,
                ..pod_userns(free)
            },
            "only POD or NODE",
        ),
    ];
    for (name, u, why) in malformed {
        let e = env
            .run_pod(env.pod_config(name, Some(u)))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{name}: {e:?}");
        assert!(e.message().contains(why), "{name}: {e:?}");
    }
    let mut host_net = env.pod_config("hostnet", Some(pod_userns(free)));
    host_net
        .linux
        .as_mut()
        .unwrap()
        .security_context
        .as_mut()
        .unwrap()
        .namespace_options
        .as_mut()
        .unwrap()
        .network = cri::NamespaceMode::Node as i32;
    let e = env.run_pod(host_net).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("host's network"), "{e:?}");
    // Refused requests leave nothing behind.
    let pods = env
        .rt
        .list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
        .await
        .unwrap()
        .into_inner()
        .items;
    assert_eq!(pods.len(), 3);
    env.finish().await;
}
