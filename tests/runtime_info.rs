//! The daemon itself: runtime-info RPCs, locking, shutdown, CLI helpers.

mod common;

use common::*;
use cri_proto::v1 as cri;
use std::process::Stdio;
use tonic::Code;

#[tokio::test]
async fn version_status_and_runtime_config() {
    let ns = Netns::new();
    let berth = Berth::start(&ns, BerthOpts::default());
    let mut rt = berth.runtime_client().await;

    let v = rt
        .version(cri::VersionRequest {
            version: "v1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.runtime_name, "berth");
    assert_eq!(v.runtime_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(v.runtime_api_version, "v1");

    let s = rt
        .status(cri::StatusRequest { verbose: true })
        .await
        .unwrap()
        .into_inner();
    let conds = s.status.unwrap().conditions;
    let runtime = conds.iter().find(|c| c.r#type == "RuntimeReady").unwrap();
    assert!(runtime.status);
    let net = conds.iter().find(|c| c.r#type == "NetworkReady").unwrap();
    if !net.status {
        assert!(!net.reason.is_empty() && !net.message.is_empty());
    }
    let cfg: serde_json::Value = serde_json::from_str(&s.info["config"]).unwrap();
    assert_eq!(cfg["root"], berth.root.to_str().unwrap());
    assert_eq!(cfg["socket"], berth.socket.to_str().unwrap());
    let quiet = rt
        .status(cri::StatusRequest { verbose: false })
        .await
        .unwrap()
        .into_inner();
    assert!(quiet.info.is_empty());

    let rc = rt
        .runtime_config(cri::RuntimeConfigRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        rc.linux.unwrap().cgroup_driver,
        cri::CgroupDriver::Cgroupfs as i32
    );

    // RPCs of later capabilities say so, by name.
    let e = rt
        .checkpoint_container(cri::CheckpointContainerRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unimplemented);
    assert!(
        e.message().contains("CheckpointContainer"),
        "{}",
        e.message()
    );

    // UpdateRuntimeConfig keeps kubelet's pod CIDR (across restarts) and
    // refuses what is not one.
    let cidr = |c: &str| cri::UpdateRuntimeConfigRequest {
        runtime_config: Some(cri::RuntimeConfig {
            network_config: Some(cri::NetworkConfig { pod_cidr: c.into() }),
        }),
    };
    rt.update_runtime_config(cidr("10.244.1.0/24,fd00:10:244:1::/64"))
        .await
        .unwrap();
    let e = rt
        .update_runtime_config(cidr("10.244.1.0/33"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let mut berth = berth;
    berth.restart();
    let mut rt = berth.runtime_client().await;
    let s = rt
        .status(cri::StatusRequest { verbose: true })
        .await
        .unwrap()
        .into_inner();
    assert!(
        s.info["runtimeConfig"].contains("10.244.1.0/24,fd00:10:244:1::/64"),
        "{:?}",
        s.info
    );

    // Socket is 0660.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&berth.socket)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o660);
    let dir = berth.dir.clone();
    drop(berth);
    ns.assert_no_leaks(&dir);
}

#[tokio::test]
async fn second_daemon_refuses_and_sigterm_is_clean() {
    let ns = Netns::new();
    let mut berth = Berth::start(&ns, BerthOpts::default());

    // Same root, other socket: refused, naming the root.
    let other_sock = berth.dir.join("other.sock");
    let out = ns
        .command(env!("CARGO_BIN_EXE_berth"))
        .args(["serve", "--root"])
        .arg(&berth.root)
        .arg("--state-dir")
        .arg(berth.dir.join("run2"))
        .arg("--socket")
        .arg(&other_sock)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already serving root"), "{err}");
    assert!(!other_sock.exists());

    // Same socket, other root: refused too, and the socket keeps working.
    let out = ns
        .command(env!("CARGO_BIN_EXE_berth"))
        .args(["serve", "--root"])
        .arg(berth.dir.join("root2"))
        .arg("--state-dir")
        .arg(berth.dir.join("run2"))
        .arg("--socket")
        .arg(&berth.socket)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already serving socket"), "{err}");
    let mut rt = berth.runtime_client().await;
    rt.version(cri::VersionRequest::default()).await.unwrap();
    drop(rt);
    // Let the client runtime close its connection: a graceful shutdown waits
    // for open connections to acknowledge it (bounded by the grace period).
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;

    let st = berth.stop();
    assert!(st.success(), "exit status after SIGTERM: {st}");
    assert!(!berth.socket.exists(), "socket removed on shutdown");
    assert!(berth.log().contains("berth stopped"));
    // And it starts again on the same dirs.
    berth.restart();
    let mut rt = berth.runtime_client().await;
    rt.version(cri::VersionRequest::default()).await.unwrap();
    let dir = berth.dir.clone();
    drop(rt);
    drop(berth);
    ns.assert_no_leaks(&dir);
}

#[test]
fn check_and_default_config() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_berth"))
        .arg("check")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for item in [
        "kernel",
        "cgroup v2",
        "overlayfs",
        "user namespaces",
        "idmapped mounts: tmpfs",
        "idmapped mounts: overlayfs layers",
        "nftables",
        "seccomp",
    ] {
        assert!(
            text.lines().any(|l| l.contains(item)
                && (l.starts_with("OK") || l.starts_with("FAIL") || l.starts_with("WARN"))),
            "no line for {item}:\n{text}"
        );
    }
    // Exit status agrees with the FAIL lines.
    let failed = text.lines().any(|l| l.starts_with("FAIL"));
    assert_eq!(out.status.success(), !failed, "{text}");

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(["config", "default"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let v: toml::Value = toml::from_str(&text).unwrap();
    assert_eq!(v["socket"].as_str(), Some("/run/berth/berth.sock"));
    assert_eq!(v["root"].as_str(), Some("/var/lib/berth"));
    // Every key has a comment above it.
    let keys = text.lines().filter(|l| l.contains(" = ")).count();
    let commented = text
        .lines()
        .collect::<Vec<_>>()
        .windows(2)
        .filter(|w| w[1].contains(" = ") && w[0].starts_with('#'))
        .count();
    assert_eq!(keys, commented, "{text}");
}

#[tokio::test]
async fn bad_config_is_a_clear_error() {
    let ns = Netns::new();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "sockett = 1\n").unwrap();
    let out = ns
        .command(env!("CARGO_BIN_EXE_berth"))
        .args(["serve", "--config"])
        .arg(&cfg)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.toml") && err.contains("sockett"), "{err}");
}
