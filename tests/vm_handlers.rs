//! VM-only (see tests/vm_smoke.rs for the rules): runc (Debian's package)
//! as a delegating RuntimeClass handler. runc cannot run without cgroups,
//! so this needs the VM's pure cgroup v2: the container must land in the
//! cgroup berth made for it, and everything must be gone after removal.

mod common;

use common::handlers::*;
use cri_proto::v1 as cri;
use std::path::Path;

const RUNC: &str = "/usr/sbin/runc";
const PARENT: &str = "kubepods-handlers/pod-runc";

fn require_vm() {
    if std::env::var("BERTH_VM").as_deref() != Ok("1") {
        panic!(
            "this test only runs inside the test VM (pure cgroup v2): run it with \
             scripts/vm-test after cargo build --release --all-targets"
        );
    }
}

#[tokio::test]
#[ignore = "needs the test VM: scripts/vm-test"]
async fn vm_runc_runs_the_container_lifecycle() {
    require_vm();
    assert!(
        Path::new(RUNC).exists(),
        "{RUNC} is missing: install the Debian package runc (scripts/install-test-deps)"
    );
    let mut env = HandlerEnv::start(&format!(
        "[cgroup]\nmode = \"on\"\n[runtime.handlers.runc]\ntype = \"oci\"\nbinary = \"{RUNC}\"\n"
    ))
    .await;
    let root = env.berth.state_dir.join("runtimes/runc");
    delegated_lifecycle(&mut env, "runc", &root, PARENT).await;

    // The container runs in the cgroup berth made for it, which goes with it.
    let cfg = env.pod_config("cg", PARENT);
    let pod = env.run_pod(&cfg, "runc").await.unwrap();
    let id = env.run_sh(&pod, &cfg, "sleeper", "sleep 1000").await;
    let info = env
        .rt
        .container_status(cri::ContainerStatusRequest {
            container_id: id.clone(),
            verbose: true,
        })
        .await
        .unwrap()
        .into_inner()
        .info;
    let info: serde_json::Value = serde_json::from_str(&info["info"]).unwrap();
    let pid = info["pid"].as_i64().unwrap();
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert_eq!(cgroup.trim(), format!("0::/{PARENT}/{id}"));
    env.rt
        .stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await
        .unwrap();
    env.rt
        .remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: pod,
        })
        .await
        .unwrap();
    assert!(!Path::new("/sys/fs/cgroup").join(PARENT).join(&id).exists());
    assert!(!root.join(&id).exists());

    let HandlerEnv {
        rt,
        mut berth,
        reg,
        ns,
    } = env;
    drop(rt);
    berth.stop();
    ns.assert_no_leaks(&berth.dir);
    drop((berth, reg));
    let _ = std::fs::remove_dir(Path::new("/sys/fs/cgroup").join(PARENT));
    let _ = std::fs::remove_dir("/sys/fs/cgroup/kubepods-handlers");
}
