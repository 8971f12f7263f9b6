//! VM-only (pure cgroup v2; see tests/vm_smoke.rs for the rules): every
//! container's cgroup carries berth's device program. Inside a
//! non-privileged container, root with CAP_MKNOD can create a node for a
//! block device but not open it; /dev/null and the CRI-requested device
//! work with exactly the permissions asked for; a privileged container
//! opens the block device. UpdateContainerResources swaps the program for a
//! new one without a gap, and after removal no program is left, in the
//! kernel or as an fd of the daemon.

mod common;

use common::devices::*;
use common::*;
use cri_proto::v1 as cri;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

const PARENT: &str = "devpol-test";

/// A node for the host's /dev/loop0, then opens tried one by one.
fn probe(major: u64, minor: u64) -> String {
    format!(
        "{OUTCOMES}\nrm -f /dev/blk; mknod /dev/blk b {major} {minor} && echo 'mknod => ok'\n\
         o ': </dev/blk'\no ': </dev/given'\no ': >/dev/given'\no ': </dev/null'\no ': >/dev/null'\n"
    )
}

const EXPECTED: &str = "mknod => ok\n\
    : </dev/blk => Operation not permitted\n\
    : </dev/given => ok\n\
    : >/dev/given => Operation not permitted\n\
    : </dev/null => ok\n\
    : >/dev/null => ok\n";

#[tokio::test]
#[ignore = "needs the test VM: scripts/vm-test"]
async fn vm_device_policy_is_enforced_replaced_and_removed() {
    assert_eq!(
        std::env::var("BERTH_VM").as_deref(),
        Ok("1"),
        "runs only in the test VM: scripts/vm-test after cargo build --release --all-targets"
    );
    // The VM has no disks: loop devices are real block devices.
    let st = std::process::Command::new("modprobe")
        .arg("loop")
        .status()
        .expect("run modprobe");
    assert!(st.success(), "modprobe loop: {st}");
    let loop0 = std::fs::metadata("/dev/loop0").expect("/dev/loop0");
    assert!(loop0.file_type().is_block_device());
    let (major, minor) = (
        nix::sys::stat::major(loop0.rdev()),
        nix::sys::stat::minor(loop0.rdev()),
    );
    // The harness keeps berth's default (device_policy = "required") here.
    let mut env = start(BerthOpts::default()).await;
    let daemon = env.berth.pid().unwrap();

    let plain = pod_config("devpol", PARENT, false);
    let pod = env.run_pod(&plain).await;
    let given = cri::Device {
        container_path: "/dev/given".into(),
        host_path: "/dev/loop1".into(),
        permissions: "r".into(),
    };
    let id = env
        .run(
            &pod,
            &plain,
            container_config("c", "sleep 1000", false, vec![given]),
        )
        .await;
    let cg = Path::new("/sys/fs/cgroup").join(PARENT).join(&id);
    let progs = cgroup_device_programs(&cg);
    assert_eq!(progs.len(), 1, "{progs:?}");
    assert_eq!(progs[0].1, "berth_devices");
    let (code, out) = env.sh(&id, &probe(major, minor)).await;
    assert_eq!((code, out.as_str()), (0, EXPECTED));

    let privileged = pod_config("devpol-priv", PARENT, true);
    let ppod = env.run_pod(&privileged).await;
    let pid = env
        .run(
            &ppod,
            &privileged,
            container_config("p", "sleep 1000", true, vec![]),
        )
        .await;
    let pcg = Path::new("/sys/fs/cgroup").join(PARENT).join(&pid);
    assert_eq!(cgroup_device_programs(&pcg).len(), 1);
    let (code, out) = env
        .sh(
            &pid,
            &format!("{OUTCOMES}\no ': </dev/loop0'\no ': >/dev/loop0'"),
        )
        .await;
    assert_eq!(
        (code, out.as_str()),
        (0, ": </dev/loop0 => ok\n: >/dev/loop0 => ok\n")
    );

    // An update replaces the program (a new one, still exactly one) and
    // the policy holds as before.
    env.rt
        .update_container_resources(cri::UpdateContainerResourcesRequest {
            container_id: id.clone(),
            linux: Some(cri::LinuxContainerResources {
                cpu_shares: 512,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("UpdateContainerResources");
    let after = cgroup_device_programs(&cg);
    assert_eq!(after.len(), 1, "{after:?}");
    assert_ne!(after[0].0, progs[0].0, "the program was not replaced");
    let (code, out) = env.sh(&id, &probe(major, minor)).await;
    assert_eq!((code, out.as_str()), (0, EXPECTED));
    assert_eq!(
        bpf_fds(daemon),
        Vec::<String>::new(),
        "BPF fds held by berth"
    );

    for c in [&id, &pid] {
        env.rt
            .remove_container(cri::RemoveContainerRequest {
                container_id: c.to_string(),
            })
            .await
            .expect("RemoveContainer");
    }
    assert!(!cg.exists() && !pcg.exists());
    // The kernel frees a removed cgroup's programs from a workqueue, after
    // the rmdir returns: wait for it (bounded), it must happen.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !loaded_programs("berth_devices").is_empty() && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert_eq!(loaded_programs("berth_devices"), Vec::<u64>::new());
    assert_eq!(
        bpf_fds(daemon),
        Vec::<String>::new(),
        "BPF fds held by berth"
    );
    env.finish().await;
    let _ = std::fs::remove_dir(Path::new("/sys/fs/cgroup").join(PARENT));
}
