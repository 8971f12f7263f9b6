//! Device access policy on a host without a usable cgroup v2 (this
//! development host): with berth's defaults a non-privileged container,
//! which could open any device node it creates, is refused with an error
//! naming the config key; `device_policy = "best-effort"` runs it; a
//! privileged container needs no policy; `berth check` says so. What the
//! program enforces is proven in the VM (tests/vm_devices.rs).

mod common;

use common::devices::*;
use common::*;
use std::process::Command;
use tonic::Code;

#[tokio::test]
async fn without_cgroup2_the_default_refuses_unprotected_containers() {
    if pure_cgroup2_host() {
        eprintln!(
            "skipped: cgroup2 at /sys/fs/cgroup, device programs apply (tests/vm_devices.rs)"
        );
        return;
    }
    let mut env = start(BerthOpts {
        strict_defaults: true,
        ..Default::default()
    })
    .await;
    let plain = pod_config("devpol", "", false);
    let pod = env.run_pod(&plain).await;
    let e = env
        .create(&pod, &plain, container_config("c", "true", false, vec![]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    for part in [
        "device",
        "no usable cgroup v2",
        "device_policy",
        "best-effort",
        "[security]",
    ] {
        assert!(
            e.message().contains(part),
            "{part:?} not in {}",
            e.message()
        );
    }
    // Nothing of it was made.
    let listed = env
        .rt
        .list_containers(cri_proto::v1::ListContainersRequest { filter: None })
        .await
        .unwrap()
        .into_inner()
        .containers;
    assert!(listed.is_empty(), "{listed:?}");
    let left: Vec<_> = std::fs::read_dir(env.berth.root.join("containers"))
        .unwrap()
        .collect();
    assert!(left.is_empty(), "{left:?}");
    assert!(env
        .berth
        .log()
        .contains("non-privileged containers will be refused"));

    // A privileged container may use every device anyway: created.
    let privileged = pod_config("devpol-priv", "", true);
    let ppod = env.run_pod(&privileged).await;
    let id = env
        .run(
            &ppod,
            &privileged,
            container_config("p", "sleep 100", true, vec![]),
        )
        .await;
    let (code, out) = env.sh(&id, "echo up").await;
    assert_eq!((code, out.as_str()), (0, "up\n"));

    // The explicit opt-out runs it, with a warning.
    env.berth.opts.config_toml = "[security]\ndevice_policy = \"best-effort\"\n".into();
    env.berth.opts.strict_defaults = false;
    env.berth.restart();
    env.rt = env.berth.runtime_client().await;
    let id = env
        .run(
            &pod,
            &plain,
            container_config("c", "sleep 100", false, vec![]),
        )
        .await;
    let (code, out) = env.sh(&id, "echo up").await;
    assert_eq!((code, out.as_str()), (0, "up\n"));
    assert!(env
        .berth
        .log()
        .contains("running without a device access policy"));
    env.finish().await;
}

#[test]
fn berth_check_reports_the_device_policy() {
    let out = Command::new(env!("CARGO_BIN_EXE_berth"))
        .arg("check")
        .output()
        .expect("run berth check");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find(|l| l.contains("device policy"))
        .unwrap_or_else(|| panic!("no device policy line in:\n{stdout}"));
    if pure_cgroup2_host() {
        assert!(line.starts_with("OK"), "{line}");
    } else {
        assert!(line.starts_with("FAIL"), "{line}");
        assert!(line.contains("device_policy = \"best-effort\""), "{line}");
        assert!(!out.status.success());
    }
}
