//! RuntimeClass handlers on the host: a pod's runtime_handler picks berth's
//! built-in runtime or crun (Debian's package) driven through its CLI, with
//! cgroups disabled, as this host's cgroups must not be touched. runc needs
//! cgroups: tests/vm_handlers.rs runs the same lifecycle with it in the VM.

mod common;

use common::handlers::*;
use common::*;
use cri_proto::v1 as cri;
use std::path::PathBuf;
use std::process::Stdio;

const CRUN: &str = "/usr/bin/crun";

fn crun_config() -> String {
    require_crun();
    format!(
        "[runtime.handlers.crun]\ntype = \"oci\"\nbinary = \"{CRUN}\"\n\
         cgroup_manager = \"disabled\"\n\
         [runtime.handlers.strict]\ntype = \"builtin\"\n\
         default_capabilities = [\"CAP_KILL\"]\n"
    )
}

/// crun refuses every container, even with cgroups disabled, on a hybrid
/// host whose cgroup2 side has a controller (this one's has hugetlb). In
/// the test's private mount namespace (never the host's) an empty tmpfs
/// covers /sys/fs/cgroup/unified, so crun sees a v1-only host and, with
/// `cgroup_manager = "disabled"`, touches no cgroup at all.
async fn crun_env() -> HandlerEnv {
    let ns = Netns::new();
    if std::fs::read_to_string("/sys/fs/cgroup/unified/cgroup.controllers")
        .is_ok_and(|c| !c.trim().is_empty())
    {
        ns.run_ok(&[
            "mount",
            "-t",
            "tmpfs",
            "-o",
            "ro,size=4k",
            "berth-test-hide-hybrid-cgroup2",
            "/sys/fs/cgroup/unified",
        ]);
    }
    HandlerEnv::start_in(ns, &crun_config()).await
}

fn require_crun() {
    assert!(
        std::path::Path::new(CRUN).exists(),
        "{CRUN} is missing: install the Debian package crun (scripts/install-test-deps)"
    );
}

#[tokio::test]
async fn crun_runs_the_container_lifecycle() {
    let mut env = crun_env().await;
    let root = env.berth.state_dir.join("runtimes/crun");
    delegated_lifecycle(&mut env, "crun", &root, "").await;
    let HandlerEnv {
        rt,
        mut berth,
        reg,
        ns,
    } = env;
    drop(rt);
    berth.stop();
    let left: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(left.is_empty(), "crun state left: {left:?}");
    ns.assert_no_leaks(&berth.dir);
    drop((berth, reg));
}

#[tokio::test]
async fn status_lists_handlers_and_unknown_ones_are_refused() {
    let mut env = crun_env().await;
    let st = env
        .rt
        .status(cri::StatusRequest { verbose: false })
        .await
        .unwrap()
        .into_inner();
    let names: Vec<&str> = st
        .runtime_handlers
        .iter()
        .map(|h| h.name.as_str())
        .collect();
    assert_eq!(names, ["", "crun", "strict"]);
    let crun = &st.runtime_handlers[1].features.unwrap();
    assert!(!crun.recursive_read_only_mounts && !crun.user_namespaces);

    let cfg = env.pod_config("nope", "");
    let e = env.run_pod(&cfg, "kata").await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    assert!(
        e.message().contains("\"kata\"") && e.message().contains("\"crun\""),
        "{e}"
    );
    // Nothing was made for the refused pod.
    let pods = env
        .rt
        .list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
        .await
        .unwrap()
        .into_inner()
        .items;
    assert!(pods.is_empty(), "{pods:?}");

    // A built-in handler with its own base capability set: only CAP_KILL
    // (bit 5) is left in the container's bounding set.
    let cfg = env.pod_config("strict", "");
    let pod = env.run_pod(&cfg, "strict").await.unwrap();
    let id = env.run_sh(&pod, &cfg, "caps", "sleep 1000").await;
    let r = env
        .exec(&id, &["grep", "CapBnd", "/proc/self/status"])
        .await;
    assert_eq!(
        String::from_utf8_lossy(&r.stdout).split_whitespace().last(),
        Some("0000000000000020")
    );
    // tty is refused for a delegating handler instead of half-working.
    let cfg = env.pod_config("tty", "");
    let pod2 = env.run_pod(&cfg, "crun").await.unwrap();
    let e = env
        .rt
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: pod2.clone(),
            config: Some(cri::ContainerConfig {
                metadata: Some(cri::ContainerMetadata {
                    name: "t".into(),
                    attempt: 0,
                }),
                image: Some(cri::ImageSpec {
                    image: BUSYBOX.into(),
                    ..Default::default()
                }),
                tty: true,
                ..Default::default()
            }),
            sandbox_config: Some(cfg),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    for p in [pod, pod2] {
        env.rt
            .stop_pod_sandbox(cri::StopPodSandboxRequest {
                pod_sandbox_id: p.clone(),
            })
            .await
            .unwrap();
        env.rt
            .remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: p })
            .await
            .unwrap();
    }
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
}

#[test]
fn a_handler_whose_runtime_does_not_run_stops_startup() {
    let ns = Netns::new();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        "[runtime.handlers.gone]\ntype = \"oci\"\nbinary = \"/nonexistent/runc\"\n",
    )
    .unwrap();
    let out = ns
        .command(env!("CARGO_BIN_EXE_berth"))
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .arg("--root")
        .arg(dir.path().join("root"))
        .arg("--state-dir")
        .arg(dir.path().join("run"))
        .arg("--socket")
        .arg(dir.path().join("run/berth.sock"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("\"gone\"") && err.contains("/nonexistent/runc"),
        "{err}"
    );
    assert!(!dir.path().join("run/berth.sock").exists());
}
