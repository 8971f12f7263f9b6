//! VM-only (scripts/vm-test; see tests/vm_smoke.rs for the rules): a pod
//! with its own user namespace on the VM's kernel, with cgroups on.

mod common;

use common::userns::*;

const PARENT: &str = "kubepods-userns";

#[tokio::test]
#[ignore = "needs the test VM: scripts/vm-test"]
async fn vm_userns_pod_maps_ids_and_volumes() {
    assert_eq!(
        std::env::var("BERTH_VM").as_deref(),
        Ok("1"),
        "only inside the test VM (scripts/vm-test): it makes cgroups"
    );
    let mut env = start_userns_env(&format!("/{PARENT}")).await;
    let (_pod, ctr, _host) = assert_pod_runs_mapped(&mut env, "vm-mapped").await;
    // The container is in its own cgroup.
    let cg = env.sh(&ctr, "cat /proc/self/cgroup").await;
    assert_eq!(cg.stdout.trim(), "0::/", "{}", cg.stderr);
    env.finish().await;
    let _ = std::fs::remove_dir(std::path::Path::new("/sys/fs/cgroup").join(PARENT));
}
