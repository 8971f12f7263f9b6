//! Checks the integration-test harness itself (tests/common): test images,
//! network namespaces, registries (plain and TLS + basic auth), skopeo
//! pushes, the Berth process plumbing (with a stand-in daemon), and that
//! nothing is left running afterwards.

mod common;

use std::fs;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;
use sha2::{Digest, Sha256};

const IMAGES: &[&str] = &[
    "busybox",
    "multiarch",
    "user-numeric",
    "user-named",
    "zstd",
    "uncompressed",
    "layered",
    "devnode",
    "evil-abs",
    "evil-dotdot",
    "evil-symlink",
    "evil-symlink-lower",
    "evil-hardlink",
    "evil-hardlink-dotdot",
];

fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

fn alive(pid: i32) -> bool {
    // Alive and not a zombie.
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let rest = &stat[stat.rfind(')').unwrap() + 2..];
            !rest.starts_with('Z')
        }
        Err(_) => false,
    }
}

fn wait_dead(pid: i32) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while alive(pid) {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

fn processes_in_net_ns(ns: &str) -> Vec<i32> {
    let mut v = Vec::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if fs::read_link(format!("/proc/{pid}/ns/net")).is_ok_and(|l| l.to_string_lossy() == ns)
            && alive(pid)
        {
            v.push(pid);
        }
    }
    v
}

#[test]
fn images_are_built_and_valid() {
    let dir = images_dir();
    for name in IMAGES {
        let top = layout_top_descriptor(name);
        assert_eq!(
            top["annotations"]["org.opencontainers.image.ref.name"], "latest",
            "{name}"
        );
        let digest = top["digest"].as_str().unwrap();
        let blob = layout_blob(name, digest);
        assert_eq!(sha256(&blob), digest, "{name}");
        assert_eq!(blob.len() as u64, top["size"].as_u64().unwrap(), "{name}");
    }
    // multiarch: index of three platforms
    let top = layout_top_descriptor("multiarch");
    assert_eq!(top["mediaType"], "application/vnd.oci.image.index.v1+json");
    let idx = layout_json("multiarch", top["digest"].as_str().unwrap());
    let plats: Vec<String> = idx["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let p = &m["platform"];
            let mut s = format!(
                "{}/{}",
                p["os"].as_str().unwrap(),
                p["architecture"].as_str().unwrap()
            );
            if let Some(v) = p["variant"].as_str() {
                s = format!("{s}/{v}");
            }
            s
        })
        .collect();
    assert_eq!(plats, ["linux/amd64", "linux/arm64", "linux/arm/v7"]);
    // user images
    for (name, user) in [("user-numeric", "1000:1000"), ("user-named", "app")] {
        let m = layout_json(
            name,
            layout_top_descriptor(name)["digest"].as_str().unwrap(),
        );
        let c = layout_json(name, m["config"]["digest"].as_str().unwrap());
        assert_eq!(c["config"]["User"], user);
    }
    // big is not built by default
    assert!(!dir.join("big").exists() || dir.join(".stamp-big").exists());
}

/// A stand-in for the berth binary: binds the --socket path, exits 0 on
/// SIGTERM, logs to stderr.
const FAKE_DAEMON: &str = r#"#!/usr/bin/env python3
import os, signal, socket, sys
args = sys.argv[1:]
sock = args[args.index("--socket") + 1]
os.makedirs(os.path.dirname(sock), exist_ok=True)
if os.path.exists(sock):
    os.unlink(sock)
print("fake berth starting:", " ".join(args), file=sys.stderr, flush=True)
s = socket.socket(socket.AF_UNIX)
s.bind(sock)
s.listen(16)
def term(*_):
    print("fake berth: SIGTERM", file=sys.stderr, flush=True)
    os.unlink(sock)
    sys.exit(0)
signal.signal(signal.SIGTERM, term)
while True:
    c, _ = s.accept()
    c.close()
"#;

#[test]
fn harness_smoke() {
    let images = ["busybox", "multiarch", "zstd", "layered"];
    let user = "tester".to_string();
    let pass = "s3cret-pw".to_string();

    let holder_pid;
    let net_ns;
    let mut pids = Vec::new();
    let mut dirs: Vec<PathBuf> = Vec::new();
    let fake = tempfile::tempdir().unwrap();
    {
        let ns = Netns::new();
        holder_pid = ns.pid();
        net_ns = fs::read_link(format!("/proc/{holder_pid}/ns/net"))
            .unwrap()
            .to_string_lossy()
            .into_owned();
        assert_ne!(
            net_ns,
            fs::read_link("/proc/self/ns/net")
                .unwrap()
                .to_string_lossy()
        );

        // Only lo, and it is up.
        let links = ns.run_ok(&["ip", "-o", "link", "show"]);
        assert_eq!(links.lines().count(), 1, "{links}");
        assert!(links.contains("lo:") && links.contains("UP"), "{links}");

        let plain = Registry::start(&ns, RegistryOpts::default());
        let secure = Registry::start(
            &ns,
            RegistryOpts {
                port: 5001,
                tls: true,
                basic_auth: Some((user.clone(), pass.clone())),
                ..Default::default()
            },
        );
        assert_eq!(plain.addr, "127.0.0.1:5000");
        assert_eq!(secure.addr, "127.0.0.1:5001");
        assert!(plain.ca_pem.is_none());
        let ca = secure.ca_pem.clone().unwrap();
        pids.extend([plain.pid().unwrap(), secure.pid().unwrap()]);
        dirs.extend([plain.dir.clone(), secure.dir.clone()]);

        for reg in [&plain, &secure] {
            for img in images {
                reg.push(img, &format!("test/{img}:latest"));
                let raw = reg.inspect_raw(&format!("test/{img}:latest"));
                let top = layout_top_descriptor(img);
                // Pushed byte for byte.
                assert_eq!(
                    sha256(raw.as_bytes()),
                    top["digest"].as_str().unwrap(),
                    "{img}"
                );
                let m: serde_json::Value = serde_json::from_str(&raw).unwrap();
                assert_eq!(m["mediaType"], top["mediaType"]);
                if img == "multiarch" {
                    assert_eq!(m["manifests"].as_array().unwrap().len(), 3);
                    // Every platform manifest is there too, by digest.
                    for d in m["manifests"].as_array().unwrap() {
                        let digest = d["digest"].as_str().unwrap();
                        let sub = reg.inspect_raw(&format!("test/{img}@{digest}"));
                        assert_eq!(sha256(sub.as_bytes()), digest);
                    }
                }
                if img == "zstd" {
                    for l in m["layers"].as_array().unwrap() {
                        assert_eq!(
                            l["mediaType"],
                            "application/vnd.oci.image.layer.v1.tar+zstd"
                        );
                    }
                }
                if img == "layered" {
                    assert_eq!(m["layers"].as_array().unwrap().len(), 4);
                }
            }
            reg.push_v2s2("busybox", "test/busybox-v2s2:1");
            let raw = reg.inspect_raw("test/busybox-v2s2:1");
            let m: serde_json::Value = serde_json::from_str(&raw).unwrap();
            assert_eq!(
                m["mediaType"],
                "application/vnd.docker.distribution.manifest.v2+json"
            );
            assert_eq!(
                m["layers"][0]["mediaType"],
                "application/vnd.docker.image.rootfs.diff.tar.gzip"
            );

            // blob_path points at the stored layer.
            let oci: serde_json::Value =
                serde_json::from_str(&reg.inspect_raw("test/busybox:latest")).unwrap();
            let layer = oci["layers"][0]["digest"].as_str().unwrap();
            let data = fs::read(reg.blob_path(layer)).unwrap();
            assert_eq!(sha256(&data), layer);
            assert!(reg.try_inspect_raw("test/nonexistent:latest").is_none());
        }

        // Basic auth is enforced.
        let out = ns.output(&[
            "skopeo",
            "--insecure-policy",
            "inspect",
            "--raw",
            "--tls-verify=false",
            "--retry-times",
            "0",
            "docker://127.0.0.1:5001/test/busybox:latest",
        ]);
        assert!(
            !out.status.success(),
            "anonymous access to the auth registry succeeded"
        );
        // The CA verifies the TLS registry's certificate (for 127.0.0.1).
        let certs = tempfile::tempdir().unwrap();
        fs::copy(&ca, certs.path().join("ca.crt")).unwrap();
        let creds = format!("{user}:{pass}");
        ns.run_ok(&[
            "skopeo",
            "--insecure-policy",
            "inspect",
            "--raw",
            "--retry-times",
            "0",
            "--cert-dir",
            certs.path().to_str().unwrap(),
            "--creds",
            &creds,
            "docker://127.0.0.1:5001/test/busybox:latest",
        ]);
        // ... and localhost
        ns.run_ok(&[
            "skopeo",
            "--insecure-policy",
            "inspect",
            "--raw",
            "--retry-times",
            "0",
            "--cert-dir",
            certs.path().to_str().unwrap(),
            "--creds",
            &creds,
            "docker://localhost:5001/test/busybox:latest",
        ]);

        // tcp_connect reaches the namespace's loopback.
        use std::io::{Read, Write};
        let mut s = ns.tcp_connect(&plain.addr).unwrap();
        s.write_all(b"GET /v2/ HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap();
        assert!(
            resp.starts_with("HTTP/1.0 200") || resp.starts_with("HTTP/1.1 200"),
            "{resp}"
        );
        assert!(plain.log().contains("/v2/"), "access log missing");

        // Stray processes that must be cleaned up by Netns::drop: a child
        // we forget to wait for, and a daemonized grandchild.
        let stray = ns.command("sleep").arg("1000").spawn().unwrap();
        pids.push(stray.id() as i32);
        std::mem::forget(stray);
        ns.run_ok(&["sh", "-c", "sleep 1001 >/dev/null 2>&1 & exit 0"]);

        // Berth plumbing with a stand-in daemon.
        let prog = fake.path().join("fake-berth");
        fs::write(&prog, FAKE_DAEMON).unwrap();
        {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&prog, fs::Permissions::from_mode(0o755)).unwrap();
        }
        let mut berth = Berth::start_program(
            &ns,
            BerthOpts {
                config_toml: "# test\n".into(),
                registries_conf: Some(format!("# ca {}\n", ca.display())),
                ..Default::default()
            },
            &prog,
        );
        dirs.push(berth.dir.clone());
        let log = berth.log();
        for arg in [
            "serve --config",
            "--root",
            "--state-dir",
            "--socket",
            "--registries-config",
            "--log-level debug",
        ] {
            assert!(log.contains(arg), "missing {arg} in {log}");
        }
        assert!(berth.socket.starts_with(&berth.dir));
        let p1 = berth.pid().unwrap();
        berth.restart();
        assert!(!alive(p1));
        let p2 = berth.pid().unwrap();
        let st = berth.stop();
        assert!(st.success(), "{st}");
        assert!(berth.log().contains("fake berth: SIGTERM"));
        berth.restart();
        let p3 = berth.pid().unwrap();
        berth.kill9();
        assert!(!alive(p2) && !alive(p3));
        berth.restart();
        pids.push(berth.pid().unwrap());
        // Netns cleanup must handle a Berth that is still running.
        let members = ns.members();
        assert!(members.len() >= 5, "{members:?}");
        pids.extend(members);
        assert!(ns.members().iter().all(|p| *p != holder_pid));
        drop(berth);
        ns.assert_no_leaks(&dirs[2]);
        drop(plain);
        drop(secure);
    }

    assert!(
        wait_dead(holder_pid),
        "namespace holder {holder_pid} still alive"
    );
    for pid in &pids {
        assert!(wait_dead(*pid), "process {pid} still alive");
    }
    let left = processes_in_net_ns(&net_ns);
    assert!(
        left.is_empty(),
        "processes left in the test netns: {left:?}"
    );
    for d in &dirs {
        assert_no_leaks(d);
        assert!(!d.exists(), "{} not removed", d.display());
    }
}

/// Dropping the harness objects while a test panics must not abort (no
/// panic inside Drop) and prints the logs.
#[test]
#[should_panic(expected = "deliberate failure")]
fn drops_cleanly_while_panicking() {
    let fake = tempfile::tempdir().unwrap();
    let prog = fake.path().join("fake-berth");
    fs::write(&prog, FAKE_DAEMON).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&prog, fs::Permissions::from_mode(0o755)).unwrap();
    }
    let ns = Netns::new();
    let _reg = Registry::start(&ns, RegistryOpts::default());
    let _berth = Berth::start_program(&ns, BerthOpts::default(), &prog);
    panic!("deliberate failure");
}
