//! Image volumes (CRI Mount.image, image_sub_path): an image's filesystem,
//! read-only, at a container path; sub paths resolved inside the image;
//! bad ones refused with nothing left behind; the image pinned while used.

mod common;

use common::*;
use cri_proto::v1 as cri;
use tonic::Code;

const SLEEPER: &str = "sleep 1000";

fn with_mounts(name: &str, mounts: Vec<cri::Mount>) -> cri::ContainerConfig {
    cri::ContainerConfig {
        mounts,
        ..sh(name, BUSYBOX, SLEEPER)
    }
}

async fn container_fs_used(env: &mut Env) -> u64 {
    env.im
        .image_fs_info(cri::ImageFsInfoRequest {})
        .await
        .unwrap()
        .into_inner()
        .container_filesystems[0]
        .used_bytes
        .as_ref()
        .unwrap()
        .value
}

#[tokio::test]
async fn image_content_read_only_sub_paths_and_removal() {
    let mut env = Env::start_images(
        &["busybox", "volume-data", "layered"],
        &["busybox", "volume-data", "layered"],
        BerthOpts::default(),
    )
    .await;
    let pod = env.pod("vols").await;
    let before = container_fs_used(&mut env).await;
    let ctr = env
        .create(
            &pod,
            with_mounts(
                "reader",
                vec![
                    // One layer: a bind of it. Several: overlayfs.
                    image_mount("/vol", "volume-data", ""),
                    image_mount("/layered", "layered", ""),
                    image_mount("/sub", "volume-data", "data/sub"),
                    image_mount("/rel", "volume-data", "data/rel"),
                    image_mount("/file", "volume-data", "data/hello"),
                ],
            ),
        )
        .await
        .unwrap();
    env.rt
        .start_container(cri::StartContainerRequest {
            container_id: ctr.clone(),
        })
        .await
        .unwrap();

    let (code, out, err) = env
        .exec_cmd(
            &ctr,
            &[
                "sh",
                "-c",
                "cat /vol/data/hello /sub/c /rel/c /file /layered/data/new /layered/keep/y; \
                 ls /sub; test -e /layered/data/b || echo b-whited-out; \
                 test -e /layered/keep/x || echo keep-opaque; \
                 wc -c < /vol/data/big",
            ],
        )
        .await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out,
        "hello from an image volume\nc\nc\nhello from an image volume\nnew\ny\n\
         c\nb-whited-out\nkeep-opaque\n4194304\n"
    );
    for path in ["/vol/x", "/layered/x", "/sub/x", "/vol/data/hello", "/file"] {
        let (code, _, err) = env
            .exec_cmd(&ctr, &["sh", "-c", &format!("echo x >> {path}")])
            .await;
        assert_ne!(code, 0, "{path} is writable");
        assert!(err.contains("Read-only file system"), "{path}: {err}");
    }

    // ContainerStatus reports the image and sub path, not berth's mount point.
    let st = env
        .rt
        .container_status(cri::ContainerStatusRequest {
            container_id: ctr.clone(),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap();
    let sub = st
        .mounts
        .iter()
        .find(|m| m.container_path == "/sub")
        .unwrap();
    assert_eq!(sub.image.as_ref().unwrap().image, image_ref("volume-data"));
    assert_eq!(sub.image_sub_path, "data/sub");
    assert!(sub.host_path.is_empty() && sub.readonly);

    // The mounts are berth's (in its mount namespace), under the container.
    let cdir = env.berth.root.join("containers").join(&ctr);
    assert_eq!(ns_mounts_under(&env.ns, &cdir).len(), 5);
    // The 4 MiB of /vol/data/big are the image filesystem's, not the
    // containers'.
    let after = container_fs_used(&mut env).await;
    assert!(
        after < before + (4 << 20),
        "container filesystem grew from {before} to {after}"
    );

    // Pinned while a container uses them, even stopped.
    env.rt
        .stop_container(cri::StopContainerRequest {
            container_id: ctr.clone(),
            timeout: 0,
        })
        .await
        .unwrap();
    for image in ["volume-data", "layered"] {
        let e = env.remove_image(image).await.unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        assert!(e.message().contains(&ctr), "{}", e.message());
    }
    env.rt
        .remove_container(cri::RemoveContainerRequest {
            container_id: ctr.clone(),
        })
        .await
        .unwrap();
    assert!(ns_mounts_under(&env.ns, &env.berth.root.join("containers")).is_empty());
    assert!(!cdir.exists());
    env.remove_image("volume-data").await.unwrap();
    env.remove_image("layered").await.unwrap();
    env.finish().await;
}

#[tokio::test]
async fn bad_image_volumes_fail_naming_them_and_leave_nothing() {
    let mut env = Env::start_images(
        &["busybox", "volume-data", "layered"],
        &["busybox", "volume-data"],
        BerthOpts::default(),
    )
    .await;
    let pod = env.pod("bad").await;
    let cases: Vec<(Vec<cri::Mount>, Code, &str)> = vec![
        (
            vec![image_mount("/v", "volume-data", "missing/dir")],
            Code::InvalidArgument,
            "\"missing/dir\" does not exist",
        ),
        (
            vec![image_mount("/v", "volume-data", "data/up/etc")],
            Code::InvalidArgument,
            "\"data/up/etc\" escapes",
        ),
        (
            vec![image_mount("/v", "volume-data", "data/abs")],
            Code::InvalidArgument,
            "\"data/abs\" escapes",
        ),
        (
            vec![image_mount("/v", "volume-data", "../data")],
            Code::InvalidArgument,
            "\"../data\" must be relative",
        ),
        // Pulled images only (kubelet pulls them first).
        (
            vec![image_mount("/v", "layered", "")],
            Code::NotFound,
            "127.0.0.1:5000/layered:latest",
        ),
        // A good volume mounted before the bad one is undone.
        (
            vec![
                image_mount("/ok", "volume-data", ""),
                image_mount("/ok-sub", "volume-data", "data/sub"),
                image_mount("/v", "volume-data", "data/sub/c/nope"),
            ],
            Code::InvalidArgument,
            "\"data/sub/c/nope\" does not exist",
        ),
    ];
    for (i, (mounts, code, needle)) in cases.into_iter().enumerate() {
        let e = env
            .create(&pod, with_mounts(&format!("c{i}"), mounts))
            .await
            .unwrap_err();
        assert_eq!(e.code(), code, "case {i}: {e:?}");
        assert!(e.message().contains(needle), "case {i}: {}", e.message());
        let listed = env
            .rt
            .list_containers(cri::ListContainersRequest { filter: None })
            .await
            .unwrap()
            .into_inner()
            .containers;
        assert!(listed.is_empty(), "case {i}: {listed:?}");
        let containers_dir = env.berth.root.join("containers");
        assert!(ns_mounts_under(&env.ns, &containers_dir).is_empty());
        assert_eq!(std::fs::read_dir(&containers_dir).unwrap().count(), 0);
    }
    // Nothing pins the image after the failures.
    env.remove_image("volume-data").await.unwrap();
    env.finish().await;
}

/// A daemon killed while a container has image volumes finds them again
/// (the container keeps its content) and still unmounts them on removal.
#[tokio::test]
async fn volumes_survive_a_daemon_restart() {
    let mut env = Env::start_images(
        &["busybox", "volume-data"],
        &["busybox", "volume-data"],
        BerthOpts::default(),
    )
    .await;
    let pod = env.pod("restart").await;
    let ctr = env
        .create(
            &pod,
            with_mounts("c", vec![image_mount("/sub", "volume-data", "data/sub")]),
        )
        .await
        .unwrap();
    env.rt
        .start_container(cri::StartContainerRequest {
            container_id: ctr.clone(),
        })
        .await
        .unwrap();
    env.berth.restart();
    env.rt = env.berth.runtime_client().await;
    env.im = env.berth.image_client().await;
    let (code, out, _) = env.exec_cmd(&ctr, &["cat", "/sub/c"]).await;
    assert_eq!((code, out.as_str()), (0, "c\n"));
    let e = env.remove_image("volume-data").await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    env.rt
        .remove_container(cri::RemoveContainerRequest {
            container_id: ctr.clone(),
        })
        .await
        .unwrap();
    assert!(ns_mounts_under(&env.ns, &env.berth.root.join("containers")).is_empty());
    env.finish().await;
}
