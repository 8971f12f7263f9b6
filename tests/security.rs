//! Security context and namespace options, asserted from inside real
//! containers: capabilities, no_new_privs, seccomp, AppArmor, masked and
//! read-only paths, devices, sysctls, rlimits, mount propagation, recursive
//! read-only mounts, PID/IPC/network namespace modes, users and groups.

// The deprecated seccomp_profile_path / apparmor_profile fields are tested on
// purpose: older callers still send them.
#![allow(deprecated)]

mod common;

use common::*;
use cri_proto::v1 as cri;
use std::path::Path;
use std::time::{Duration, Instant};
use tonic::Code;

/// The default capability set (containerd's), as a CapEff mask.
const DEFAULT_CAPS: &str = "00000000a80425fb";

fn image(name: &str) -> String {
    image_ref(name)
}

async fn start() -> Env {
    start_with(&[]).await
}

/// berth with the busybox and security images pulled, plus `more`.
async fn start_with(more: &[&str]) -> Env {
    let mut images = vec!["busybox", "security"];
    images.extend_from_slice(more);
    Env::start(&images).await
}

impl Env {
    /// [`Env::pod_config`] with its Linux part changed by `f`.
    fn pod_config_with(
        &self,
        name: &str,
        f: impl FnOnce(&mut cri::LinuxPodSandboxConfig),
    ) -> cri::PodSandboxConfig {
        let mut config = self.pod_config(name);
        f(config.linux.as_mut().unwrap());
        config
    }

    async fn try_pod(
        &mut self,
        name: &str,
        f: impl FnOnce(&mut cri::LinuxPodSandboxConfig),
    ) -> Result<String, tonic::Status> {
        let config = self.pod_config_with(name, f);
        self.try_run_pod(config).await
    }

    /// Waits until the container's own process (the one that ran as PID 1
    /// of its namespace, or the init) runs the workload: StartContainer
    /// returns once the exec is allowed, not once it happened.
    async fn wait_exec(&mut self, id: &str, cmdline: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (out, _) = self
                .exec(
                    id,
                    "for f in /proc/[0-9]*/cmdline; do tr '\\0' ' ' < $f; echo; done 2>/dev/null",
                )
                .await;
            if out.lines().any(|l| l.trim_end() == cmdline) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{id} never ran {cmdline:?}: {out}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A container running `script` in `image`, logging to `<name>/0.log`.
fn ctr(name: &str, img: &str, script: &str) -> cri::ContainerConfig {
    cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(cri::ImageSpec {
            image: image(img),
            ..Default::default()
        }),
        command: vec!["sh".into(), "-c".into(), script.into()],
        log_path: format!("{name}/0.log"),
        ..Default::default()
    }
}

/// `ctr` with a security context set up by `f`.
fn secured(
    name: &str,
    img: &str,
    script: &str,
    f: impl FnOnce(&mut cri::LinuxContainerSecurityContext),
) -> cri::ContainerConfig {
    let mut c = ctr(name, img, script);
    let mut sc = cri::LinuxContainerSecurityContext {
        namespace_options: Some(ns_opts(
            cri::NamespaceMode::Pod,
            cri::NamespaceMode::Container,
            cri::NamespaceMode::Pod,
        )),
        ..Default::default()
    };
    f(&mut sc);
    c.linux = Some(cri::LinuxContainerConfig {
        security_context: Some(sc),
        ..Default::default()
    });
    c
}

fn caps(add: &[&str], drop: &[&str], ambient: &[&str]) -> Option<cri::Capability> {
    let v = |l: &[&str]| l.iter().map(|s| s.to_string()).collect();
    Some(cri::Capability {
        add_capabilities: v(add),
        drop_capabilities: v(drop),
        add_ambient_capabilities: v(ambient),
    })
}

fn profile(t: cri::security_profile::ProfileType, r: &str) -> Option<cri::SecurityProfile> {
    Some(cri::SecurityProfile {
        profile_type: t as i32,
        localhost_ref: r.into(),
    })
}

/// Sets up a container security context.
type SetSc = Box<dyn FnOnce(&mut cri::LinuxContainerSecurityContext)>;

/// `Field:\tvalue` of a /proc/<pid>/status text.
fn field(status: &str, name: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|| panic!("no {name} in {status:?}"))
}

const SHOW_STATUS: &str =
    "grep -E '^(Cap|NoNewPrivs|Seccomp)' /proc/self/status; echo READY; exec sleep 1000";

#[tokio::test]
async fn capabilities_default_add_drop_and_ambient() {
    let mut env = start().await;
    let pod = env.pod("caps").await;
    let mut ids = Vec::new();
    for (name, c, user) in [
        ("default", caps(&[], &[], &[]), None),
        ("admin", caps(&["SYS_ADMIN"], &["CAP_CHOWN"], &[]), None),
        ("none", caps(&[], &["ALL"], &[]), None),
        ("all", caps(&["ALL"], &["kill"], &[]), None),
        (
            "ambient",
            caps(&["NET_BIND_SERVICE"], &[], &["NET_BIND_SERVICE"]),
            Some(1000),
        ),
        ("nonroot", caps(&[], &[], &[]), Some(1000)),
    ] {
        let cfg = secured(name, "busybox", SHOW_STATUS, |sc| {
            sc.capabilities = c;
            sc.run_as_user = user.map(|value| cri::Int64Value { value });
        });
        ids.push((name, env.run(&pod, cfg).await));
    }
    let all_held = u64::from_str_radix(
        &field(
            &std::fs::read_to_string("/proc/self/status").unwrap(),
            "CapPrm",
        ),
        16,
    )
    .unwrap();
    for (name, id) in ids {
        let log = env.output_with(&id, "caps", name, "READY").await;
        let (exec, code) = env.exec(&id, "grep -E '^Cap' /proc/self/status").await;
        assert_eq!(code, 0, "{exec}");
        let eff = u64::from_str_radix(&field(&log, "CapEff"), 16).unwrap();
        let bnd = u64::from_str_radix(&field(&log, "CapBnd"), 16).unwrap();
        let want: u64 = match name {
            "default" => u64::from_str_radix(DEFAULT_CAPS, 16).unwrap(),
            "admin" => (u64::from_str_radix(DEFAULT_CAPS, 16).unwrap() | 1 << 21) & !1,
            "none" => 0,
            "all" => all_held & !(1 << 5),
            "ambient" => 1 << 10,
            _ => 0,
        };
        assert_eq!(eff, want, "{name}: CapEff {eff:x}, want {want:x}\n{log}");
        // ExecSync runs with the same capabilities.
        assert_eq!(field(&exec, "CapEff"), field(&log, "CapEff"), "{name} exec");
        assert_eq!(field(&exec, "CapBnd"), field(&log, "CapBnd"), "{name} exec");
        if name == "nonroot" {
            // A non-root user keeps its bounding set but no effective caps.
            assert_eq!(bnd, u64::from_str_radix(DEFAULT_CAPS, 16).unwrap());
        }
        if name == "ambient" {
            assert_eq!(field(&log, "CapAmb"), "0000000000000400");
        }
    }
    // Capability errors are the caller's.
    for bad in ["NOT_A_CAP", "CAP_FLY"] {
        let e = env
            .create(
                &pod,
                secured("bad", "busybox", "true", |sc| {
                    sc.capabilities = caps(&[bad], &[], &[])
                }),
            )
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains(bad), "{e:?}");
    }
    env.finish().await;
}

#[tokio::test]
async fn privileged_container_gets_everything() {
    let mut env = start().await;
    // Only a privileged sandbox may hold privileged containers.
    let plain = env.pod("plain").await;
    let e = env
        .create(
            &plain,
            secured("p", "busybox", "true", |sc| sc.privileged = true),
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("privileged"), "{e:?}");

    let pod = env
        .try_pod("priv", |l| {
            l.security_context.as_mut().unwrap().privileged = true;
        })
        .await
        .unwrap();
    let id = env
        .run(
            &pod,
            secured("p", "busybox", SHOW_STATUS, |sc| {
                sc.privileged = true;
                sc.seccomp = profile(cri::security_profile::ProfileType::RuntimeDefault, "");
                sc.masked_paths = vec!["/proc/timer_list".into()];
                sc.readonly_paths = vec!["/proc/sys".into()];
            }),
        )
        .await;
    let log = env.output_with(&id, "priv", "p", "READY").await;
    let held = field(
        &std::fs::read_to_string("/proc/self/status").unwrap(),
        "CapPrm",
    );
    assert_eq!(field(&log, "CapEff"), held, "all of berth's capabilities");
    assert_eq!(field(&log, "Seccomp"), "0", "no seccomp");
    // No masked or read-only paths, sysfs read-write.
    let (out, code) = env
        .exec(
            &id,
            "head -c 20 /proc/timer_list | wc -c; \
             grep -E ' /sys (sysfs)' /proc/mounts | cut -d' ' -f4 | cut -d, -f1; \
             echo x > /proc/sys/kernel/domainname && cat /proc/sys/kernel/domainname",
        )
        .await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(out, "20\nrw\nx\n");
    // The host's devices.
    let host: Vec<String> = ["kmsg", "loop-control", "full"]
        .iter()
        .filter(|d| Path::new("/dev").join(d).exists())
        .map(|d| d.to_string())
        .collect();
    assert!(!host.is_empty());
    for d in host {
        let (out, code) = env
            .exec(&id, &format!("test -c /dev/{d} && echo yes"))
            .await;
        assert_eq!((out.as_str(), code), ("yes\n", 0), "/dev/{d}");
    }
    env.finish().await;
}

#[tokio::test]
async fn no_new_privs_stops_setuid_gain() {
    let mut env = start().await;
    let pod = env.pod("nnp").await;
    // /bin/euid is setuid root and exits with its effective uid (mod 256).
    let script = "/bin/euid; echo euid=$?; grep NoNewPrivs /proc/self/status; echo READY; \
                  exec sleep 1000";
    let free = env
        .run(
            &pod,
            secured("free", "security", script, |sc| {
                sc.run_as_user = Some(cri::Int64Value { value: 1000 });
            }),
        )
        .await;
    let held = env
        .run(
            &pod,
            secured("held", "security", script, |sc| {
                sc.run_as_user = Some(cri::Int64Value { value: 1000 });
                sc.no_new_privs = true;
            }),
        )
        .await;
    let log = env.output_with(&free, "nnp", "free", "READY").await;
    assert!(
        log.contains("euid=0"),
        "setuid works without no_new_privs: {log}"
    );
    assert_eq!(field(&log, "NoNewPrivs"), "0");
    let log = env.output_with(&held, "nnp", "held", "READY").await;
    assert!(
        log.contains("euid=232"),
        "1000 % 256 with no_new_privs: {log}"
    );
    assert_eq!(field(&log, "NoNewPrivs"), "1");
    let (out, _) = env
        .exec(
            &held,
            "/bin/euid; echo $?; grep NoNewPrivs /proc/self/status",
        )
        .await;
    assert_eq!(field(&format!("x: {out}"), "x"), "232", "{out}");
    assert_eq!(field(&out, "NoNewPrivs"), "1");
    env.finish().await;
}

#[tokio::test]
async fn readonly_rootfs_masked_and_readonly_paths() {
    let mut env = start().await;
    let pod = env.pod("paths").await;
    let probe = "echo READY; exec sleep 1000";
    // No security context at all: the default lists.
    let defaults = env.run(&pod, ctr("defaults", "busybox", probe)).await;
    // As sent: one masked path, nothing read-only.
    let custom = env
        .run(
            &pod,
            secured("custom", "busybox", probe, |sc| {
                sc.masked_paths = vec!["/etc/hostname".into()];
                sc.capabilities = caps(&["SYS_ADMIN"], &[], &[]);
            }),
        )
        .await;
    // Empty lists: nothing (the Unmasked proc mount type).
    let unmasked = env
        .run(
            &pod,
            secured("unmasked", "busybox", probe, |sc| {
                sc.readonly_rootfs = true;
            }),
        )
        .await;
    let check = "head -c 20 /proc/timer_list | wc -c; cat /etc/hostname | wc -c; \
                 (echo x > /proc/sys/kernel/domainname) 2>/dev/null && echo sys-rw || echo sys-ro; \
                 touch /newfile 2>/dev/null && echo root-rw || echo root-ro";
    let (out, _) = env.exec(&defaults, check).await;
    assert_eq!(out, "0\n11\nsys-ro\nroot-rw\n", "defaults");
    let (out, _) = env.exec(&custom, check).await;
    assert_eq!(out, "20\n0\nsys-rw\nroot-rw\n", "as sent");
    let (out, _) = env.exec(&unmasked, check).await;
    assert_eq!(out, "20\n11\nsys-rw\nroot-ro\n", "unmasked, read-only root");
    // The read-only root is the whole rootfs; mounts on it stay writable.
    let (out, code) = env
        .exec(
            &unmasked,
            "touch /tmp/x 2>/dev/null || echo denied; touch /dev/shm/x && echo shm-rw",
        )
        .await;
    assert_eq!((out.as_str(), code), ("denied\nshm-rw\n", 0));
    env.finish().await;
}

#[tokio::test]
async fn seccomp_profiles() {
    use cri::security_profile::ProfileType::*;
    let mut env = start().await;
    let pod = env.pod("sec").await;
    let dir = env.berth.dir.join("profiles");
    std::fs::create_dir_all(&dir).unwrap();
    // docker format, with includes/excludes and per-rule actions.
    let deny_mkdir = dir.join("deny-mkdir.json");
    std::fs::write(
        &deny_mkdir,
        r#"{"defaultAction": "SCMP_ACT_ALLOW",
            "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86"],
            "syscalls": [
              {"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13},
              {"names": ["chroot"], "action": "SCMP_ACT_ERRNO",
               "excludes": {"caps": ["CAP_SYS_CHROOT"]}}
            ]}"#,
    )
    .unwrap();
    let probe =
        "grep -E '^(Seccomp|CapEff):' /proc/self/status; /bin/keyctl-probe; echo keyctl=$?; \
                 hostname changed 2>/dev/null && echo hostname-ok || echo hostname-denied; \
                 echo READY; exec sleep 1000";
    let cases: Vec<(&str, cri::ContainerConfig)> = vec![
        (
            "unconfined",
            secured("unconfined", "security", probe, |sc| {
                sc.seccomp = profile(Unconfined, "");
                sc.capabilities = caps(&["SYS_ADMIN"], &[], &[]);
            }),
        ),
        (
            "default",
            secured("default", "security", probe, |sc| {
                sc.seccomp = profile(RuntimeDefault, "");
            }),
        ),
        // With the capability, RuntimeDefault lets its syscalls through.
        (
            "default-admin",
            secured("default-admin", "security", probe, |sc| {
                sc.seccomp = profile(RuntimeDefault, "");
                sc.capabilities = caps(&["SYS_ADMIN"], &[], &[]);
            }),
        ),
        (
            "legacy",
            secured("legacy", "security", probe, |sc| {
                sc.seccomp_profile_path = "runtime/default".into();
            }),
        ),
        (
            "local",
            secured("local", "security", probe, |sc| {
                sc.seccomp = profile(Localhost, deny_mkdir.to_str().unwrap());
            }),
        ),
        (
            "legacy-local",
            secured("legacy-local", "security", probe, |sc| {
                sc.seccomp_profile_path = format!("localhost/{}", deny_mkdir.display());
                sc.no_new_privs = true;
            }),
        ),
    ];
    let mut ids = Vec::new();
    for (name, cfg) in cases {
        ids.push((name, env.run(&pod, cfg).await));
    }
    for (name, id) in ids {
        let log = env.output_with(&id, "sec", name, "READY").await;
        let (mode, keyctl, hostname) = match name {
            "unconfined" => ("0", "keyctl=0", "hostname-ok"),
            "default" | "legacy" => ("2", "keyctl=1", "hostname-denied"),
            "default-admin" => ("2", "keyctl=1", "hostname-ok"),
            _ => ("2", "keyctl=0", "hostname-denied"),
        };
        assert_eq!(field(&log, "Seccomp"), mode, "{name}: {log}");
        if name == "default" || name == "local" {
            // CAP_SYS_ADMIN, held to install the filter, is gone after exec.
            assert_eq!(field(&log, "CapEff"), DEFAULT_CAPS, "{name}");
        }
        assert!(log.contains(keyctl), "{name}: {log}");
        assert!(log.contains(hostname), "{name}: {log}");
        // ExecSync runs under the same filter.
        let (out, _) = env
            .exec(&id, "grep -E '^Seccomp:' /proc/self/status; mkdir /tmp/d 2>&1; /bin/keyctl-probe; echo $?")
            .await;
        assert_eq!(field(&out, "Seccomp"), mode, "{name}: {out}");
        let denied = out.contains("Permission denied");
        assert_eq!(denied, name.contains("local"), "{name}: {out}");
        assert!(
            out.ends_with(&format!("{}\n", &keyctl[7..])),
            "{name}: {out}"
        );
    }
    // Profiles that cannot be used fail CreateContainer, naming them.
    let broken = dir.join("broken.json");
    std::fs::write(&broken, "{\"defaultAction\": ").unwrap();
    for (what, p) in [
        ("missing", profile(Localhost, "/nonexistent/profile.json")),
        ("broken", profile(Localhost, broken.to_str().unwrap())),
        ("relative", profile(Localhost, "relative.json")),
    ] {
        let e = env
            .create(&pod, secured(what, "busybox", "true", |sc| sc.seccomp = p))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{what}: {e:?}");
        assert!(e.message().contains("seccomp"), "{what}: {e:?}");
    }
    let e = env
        .create(
            &pod,
            secured("bogus", "busybox", "true", |sc| {
                sc.seccomp_profile_path = "bogus".into()
            }),
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    env.finish().await;
}

#[tokio::test]
async fn apparmor_profiles_on_this_host() {
    use cri::security_profile::ProfileType::*;
    let enabled = std::fs::read_to_string("/sys/module/apparmor/parameters/enabled")
        .is_ok_and(|s| s.trim() == "Y");
    if enabled {
        eprintln!("skipped: AppArmor is enabled here; this test covers hosts without it");
        return;
    }
    eprintln!("AppArmor is not enabled on this host: applying profiles is not tested, only how they are refused");
    let mut env = start().await;
    let pod = env.pod("aa").await;
    for (name, p, legacy) in [
        ("default", profile(RuntimeDefault, ""), ""),
        ("unconfined", profile(Unconfined, ""), ""),
        ("legacy", None, "runtime/default"),
    ] {
        let id = env
            .run(
                &pod,
                secured(name, "busybox", "exec sleep 1000", |sc| {
                    sc.apparmor = p;
                    sc.apparmor_profile = legacy.into();
                }),
            )
            .await;
        let (out, code) = env.exec(&id, "echo ok").await;
        assert_eq!((out.as_str(), code), ("ok\n", 0));
    }
    for (p, legacy) in [
        (profile(Localhost, "my-profile"), ""),
        (None, "localhost/my-profile"),
    ] {
        let e = env
            .create(
                &pod,
                secured("named", "busybox", "true", |sc| {
                    sc.apparmor = p;
                    sc.apparmor_profile = legacy.into();
                }),
            )
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(
            e.message().contains("my-profile") && e.message().contains("AppArmor"),
            "{e:?}"
        );
    }
    env.finish().await;
}

#[tokio::test]
async fn sysctls_in_pod_namespaces() {
    let mut env = start().await;
    let read = |p: &str| std::fs::read_to_string(p).unwrap();
    let host_port = read("/proc/sys/net/ipv4/ip_unprivileged_port_start");
    let host_shm = read("/proc/sys/kernel/shmmni");
    let pod = env
        .try_pod("sysctl", |l| {
            l.sysctls = [
                ("net.ipv4.ip_unprivileged_port_start", "81"),
                ("kernel.shmmni", "1234"),
                ("fs.mqueue.msg_max", "20"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        })
        .await
        .unwrap();
    let id = env.run(&pod, ctr("c", "busybox", "exec sleep 1000")).await;
    let (out, _) = env
        .exec(
            &id,
            "cat /proc/sys/net/ipv4/ip_unprivileged_port_start /proc/sys/kernel/shmmni \
             /proc/sys/fs/mqueue/msg_max",
        )
        .await;
    assert_eq!(out, "81\n1234\n20\n");
    // Nothing changed outside the pod.
    assert_eq!(
        read("/proc/sys/net/ipv4/ip_unprivileged_port_start"),
        host_port
    );
    assert_eq!(read("/proc/sys/kernel/shmmni"), host_shm);
    let out = env
        .ns
        .run_ok(&["cat", "/proc/sys/net/ipv4/ip_unprivileged_port_start"]);
    assert_ne!(out, "81\n");

    // Node-wide sysctls, or network ones for a host-network pod, are refused.
    let e = env
        .try_pod("bad1", |l| {
            l.sysctls.insert("vm.swappiness".into(), "10".into());
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("vm.swappiness"), "{e:?}");
    let e = env
        .try_pod("bad2", |l| {
            l.sysctls.insert("net.ipv4.ip_forward".into(), "1".into());
            l.security_context
                .as_mut()
                .unwrap()
                .namespace_options
                .as_mut()
                .unwrap()
                .network = cri::NamespaceMode::Node as i32;
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("host network"), "{e:?}");
    let e = env
        .try_pod("bad3", |l| {
            l.sysctls.insert("kernel.shmmax".into(), "1".into());
            l.security_context
                .as_mut()
                .unwrap()
                .namespace_options
                .as_mut()
                .unwrap()
                .ipc = cri::NamespaceMode::Node as i32;
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("host IPC"), "{e:?}");
    env.finish().await;
}

#[tokio::test]
async fn rlimit_nofile_default_and_oom_score_adj() {
    let mut env = start().await;
    let pod = env.pod("rl").await;
    let mut cfg = ctr(
        "c",
        "busybox",
        "ulimit -n; ulimit -Hn; echo READY; exec sleep 1000",
    );
    cfg.linux = Some(cri::LinuxContainerConfig {
        resources: Some(cri::LinuxContainerResources {
            oom_score_adj: 900,
            ..Default::default()
        }),
        ..Default::default()
    });
    let id = env.run(&pod, cfg).await;
    let log = env.output_with(&id, "rl", "c", "READY").await;
    let berth_hard = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .unwrap()
        .1;
    let hard = 524288u64.min(berth_hard);
    assert_eq!(log, format!("1024\n{hard}\nREADY"));
    let (out, _) = env
        .exec(&id, "ulimit -n; ulimit -Hn; cat /proc/self/oom_score_adj")
        .await;
    assert_eq!(out, format!("1024\n{hard}\n900\n"));
    env.finish().await;
}

#[tokio::test]
async fn devices_are_created_with_host_numbers() {
    let mut env = start().await;
    let pod = env.pod("dev").await;
    let mut cfg = ctr("c", "busybox", "exec sleep 1000");
    cfg.devices = vec![
        cri::Device {
            container_path: "/dev/mynull".into(),
            host_path: "/dev/null".into(),
            permissions: "rwm".into(),
        },
        cri::Device {
            container_path: "/dev/sub/zero".into(),
            host_path: "/dev/zero".into(),
            permissions: "r".into(),
        },
    ];
    let id = env.run(&pod, cfg).await;
    let (out, code) = env
        .exec(
            &id,
            "stat -c '%F %t:%T' /dev/mynull /dev/sub/zero; echo hi > /dev/mynull && echo written",
        )
        .await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        out,
        "character special file 1:3\ncharacter special file 1:5\nwritten\n"
    );
    for (host, perms, what) in [
        ("/dev/nope-not-here", "rwm", "nope-not-here"),
        ("/etc/hostname", "rwm", "not a device"),
        ("/dev/null", "rwx", "permissions"),
    ] {
        let mut cfg = ctr("bad", "busybox", "true");
        cfg.devices = vec![cri::Device {
            container_path: "/dev/x".into(),
            host_path: host.into(),
            permissions: perms.into(),
        }];
        let e = env.create(&pod, cfg).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains(what), "{what}: {e:?}");
    }
    env.finish().await;
}

#[tokio::test]
async fn mount_propagation_both_ways() {
    let mut env = start().await;
    let pod = env.pod("prop").await;
    // A shared mount in berth's mount namespace (the test's "host").
    let shared = env.berth.dir.join("shared");
    std::fs::create_dir_all(shared.join("from-host")).unwrap();
    let s = shared.display().to_string();
    env.ns.run_ok(&["mount", "--bind", &s, &s]);
    env.ns.run_ok(&["mount", "--make-shared", &s]);
    let modes = [
        ("private", cri::MountPropagation::PropagationPrivate),
        ("slave", cri::MountPropagation::PropagationHostToContainer),
        ("shared", cri::MountPropagation::PropagationBidirectional),
    ];
    let mut ids = Vec::new();
    for (name, mode) in modes {
        std::fs::create_dir_all(shared.join(format!("from-{name}"))).unwrap();
        let mut cfg = secured(name, "busybox", "exec sleep 1000", |sc| {
            sc.capabilities = caps(&["SYS_ADMIN"], &[], &[]);
        });
        cfg.mounts = vec![cri::Mount {
            container_path: "/mnt/p".into(),
            host_path: s.clone(),
            propagation: mode as i32,
            ..Default::default()
        }];
        ids.push((name, env.run(&pod, cfg).await));
    }
    // Host -> container.
    let from_host = shared.join("from-host").display().to_string();
    env.ns.run_ok(&[
        "mount", "-t", "tmpfs", "-o", "size=1m", "hostfs", &from_host,
    ]);
    for (name, id) in &ids {
        let (out, _) = env
            .exec(id, "grep -c ' /mnt/p/from-host ' /proc/self/mountinfo")
            .await;
        let want = if *name == "private" { "0\n" } else { "1\n" };
        assert_eq!(out, want, "{name} sees the host's mount");
    }
    // Container -> host.
    for (name, id) in &ids {
        let (out, code) = env
            .exec(
                id,
                &format!("mount -t tmpfs -o size=1m {name}fs /mnt/p/from-{name}"),
            )
            .await;
        assert_eq!(code, 0, "{name}: {out}");
    }
    let mountinfo = env.ns.run_ok(&["cat", "/proc/self/mountinfo"]);
    for (name, _) in &ids {
        let seen = mountinfo.contains(&format!("{s}/from-{name} "));
        assert_eq!(
            seen,
            *name == "shared",
            "host sees {name}'s mount:\n{mountinfo}"
        );
    }
    // A source that is not on a shared mount cannot propagate anything.
    let private = env.berth.dir.join("private-dir");
    std::fs::create_dir_all(&private).unwrap();
    for mode in [
        cri::MountPropagation::PropagationBidirectional,
        cri::MountPropagation::PropagationHostToContainer,
    ] {
        let mut cfg = ctr("bad", "busybox", "true");
        cfg.mounts = vec![cri::Mount {
            container_path: "/mnt/p".into(),
            host_path: private.display().to_string(),
            propagation: mode as i32,
            ..Default::default()
        }];
        let e = env.create(&pod, cfg).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains("propagation"), "{e:?}");
    }
    env.rt
        .remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: pod,
        })
        .await
        .unwrap();
    env.ns.run_ok(&["umount", "-R", &s]);
    env.finish().await;
}

#[tokio::test]
async fn recursive_read_only_mounts() {
    let mut env = start().await;
    let info = env
        .rt
        .status(cri::StatusRequest { verbose: false })
        .await
        .unwrap()
        .into_inner();
    let rro = info.runtime_handlers[0]
        .features
        .unwrap()
        .recursive_read_only_mounts;
    assert!(rro, "this kernel has mount_setattr: advertised");
    assert!(info.features.unwrap().supplemental_groups_policy);
    let pod = env.pod("rro").await;
    let vol = env.berth.dir.join("vol");
    std::fs::create_dir_all(vol.join("sub")).unwrap();
    let v = vol.display().to_string();
    let sub = vol.join("sub").display().to_string();
    env.ns
        .run_ok(&["mount", "-t", "tmpfs", "-o", "size=1m", "subfs", &sub]);
    let mut ids = Vec::new();
    for (name, recursive) in [("ro", false), ("rro", true)] {
        let mut cfg = ctr(name, "busybox", "exec sleep 1000");
        cfg.mounts = vec![cri::Mount {
            container_path: "/vol".into(),
            host_path: v.clone(),
            readonly: true,
            recursive_read_only: recursive,
            ..Default::default()
        }];
        ids.push((name, env.run(&pod, cfg).await));
    }
    for (name, id) in &ids {
        let (out, _) = env
            .exec(id, "touch /vol/x 2>/dev/null || echo top-ro; touch /vol/sub/x 2>/dev/null && echo sub-rw || echo sub-ro")
            .await;
        let want = if *name == "rro" {
            "top-ro\nsub-ro\n"
        } else {
            "top-ro\nsub-rw\n"
        };
        assert_eq!(out, want, "{name}");
    }
    let mut cfg = ctr("bad", "busybox", "true");
    cfg.mounts = vec![cri::Mount {
        container_path: "/vol".into(),
        host_path: v.clone(),
        readonly: false,
        recursive_read_only: true,
        ..Default::default()
    }];
    let e = env.create(&pod, cfg).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    env.rt
        .remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: pod,
        })
        .await
        .unwrap();
    env.ns.run_ok(&["umount", &sub]);
    env.finish().await;
}

/// The namespace identity (`net:[...]`) of `kind` for a pid of the test's view.
fn ns_of(pid: i32, kind: &str) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}"))
        .unwrap()
        .display()
        .to_string()
}

#[tokio::test]
async fn pid_namespace_modes() {
    use cri::NamespaceMode::*;
    let mut env = start().await;
    let ps = "echo $$; cat /proc/1/cmdline | tr '\\0' ' '; echo";
    // Each container its own PID namespace: it is PID 1 there.
    let own = env.pod("own").await;
    let a = env
        .run(&own, secured("a", "busybox", "exec sleep 1001", |_| {}))
        .await;
    env.wait_exec(&a, "sleep 1001").await;
    let (out, _) = env
        .exec(
            &a,
            "cat /proc/1/cmdline | tr '\\0' ' '; echo; ls /proc | grep -c '^[0-9]'",
        )
        .await;
    assert_eq!(out.lines().next(), Some("sleep 1001 "), "{out}");
    // sleep, the exec'd sh and its children: nothing of the host's.
    assert!(
        out.lines().nth(1).unwrap().parse::<u32>().unwrap() <= 5,
        "{out}"
    );
    // TARGET: another container's namespace (ephemeral containers).
    let t = env
        .run(
            &own,
            secured("t", "busybox", "exec sleep 1000", |sc| {
                let n = sc.namespace_options.as_mut().unwrap();
                n.pid = Target as i32;
                n.target_id = a.clone();
            }),
        )
        .await;
    let (out, _) = env.exec(&t, ps).await;
    assert!(
        out.contains("\nsleep 1001 \n"),
        "target's PID 1 visible: {out}"
    );
    let e = env
        .create(
            &own,
            secured("t2", "busybox", "true", |sc| {
                let n = sc.namespace_options.as_mut().unwrap();
                n.pid = Target as i32;
                n.target_id = "0000ffff".into();
            }),
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    // POD: the infra process is PID 1 and containers see each other.
    let shared = env
        .try_pod("shared", |l| {
            l.security_context
                .as_mut()
                .unwrap()
                .namespace_options
                .as_mut()
                .unwrap()
                .pid = Pod as i32;
        })
        .await
        .unwrap();
    let mut ids = Vec::new();
    for n in ["x", "y"] {
        let cfg = secured(
            n,
            "busybox",
            &format!("exec sleep 10{}", n.len() + 1),
            |sc| {
                sc.namespace_options.as_mut().unwrap().pid = Pod as i32;
            },
        );
        ids.push(env.run(&shared, cfg).await);
    }
    for id in ids.clone() {
        env.wait_exec(&id, "sleep 102").await;
    }
    let (out, _) = env
        .exec(
            &ids[0],
            "cat /proc/1/cmdline | tr '\\0' ' '; echo; ps -o args",
        )
        .await;
    assert!(
        out.lines().next().unwrap().contains(" pause --pod "),
        "infra is PID 1: {out}"
    );
    assert_eq!(
        out.matches("sleep 102").count(),
        2,
        "both containers' sleeps: {out}"
    );

    // NODE: the host's processes, berth itself among them.
    let host = env
        .try_pod("hostpid", |l| {
            l.security_context
                .as_mut()
                .unwrap()
                .namespace_options
                .as_mut()
                .unwrap()
                .pid = Node as i32;
        })
        .await
        .unwrap();
    let h = env
        .run(
            &host,
            secured("h", "busybox", "exec sleep 1000", |sc| {
                sc.namespace_options.as_mut().unwrap().pid = Node as i32;
            }),
        )
        .await;
    let berth_pid = env.berth.pid().unwrap();
    let (out, _) = env
        .exec(
            &h,
            &format!("test -d /proc/{berth_pid} && readlink /proc/self/ns/pid"),
        )
        .await;
    assert_eq!(out.trim(), ns_of(berth_pid, "pid"));
    let (out, _) = env
        .exec(&a, &format!("test -d /proc/{berth_pid} && echo visible"))
        .await;
    assert_eq!(out, "", "a non-host container cannot see berth");
    env.finish().await;
}

#[tokio::test]
async fn host_network_and_ipc_namespaces() {
    use cri::NamespaceMode::*;
    let mut env = start().await;
    // An interface that only berth's (the "host's") network namespace has.
    env.ns.run_ok(&[
        "ip", "link", "add", "secveth0", "type", "veth", "peer", "name", "secveth1",
    ]);
    let berth_pid = env.berth.pid().unwrap();
    let host = env
        .try_pod("host", |l| {
            l.security_context.as_mut().unwrap().namespace_options =
                Some(ns_opts(Node, Container, Node));
        })
        .await
        .unwrap();
    let iso = env.pod("iso").await;
    let mut ids = Vec::new();
    for (pod, name, mode) in [(&host, "h", Node), (&iso, "i", Pod)] {
        let cfg = secured(name, "busybox", "exec sleep 1000", |sc| {
            sc.namespace_options = Some(ns_opts(mode, Container, mode));
        });
        let id = env.run(&pod.clone(), cfg).await;
        ids.push((name, id));
    }
    for (name, id) in &ids {
        let (out, _) = env
            .exec(
                id,
                "grep -c secveth0 /proc/net/dev; readlink /proc/self/ns/net; \
                 readlink /proc/self/ns/ipc",
            )
            .await;
        let lines: Vec<&str> = out.lines().collect();
        let host = *name == "h";
        assert_eq!(lines[0], if host { "1" } else { "0" }, "{name}: {out}");
        assert_eq!(lines[1] == ns_of(berth_pid, "net"), host, "{name}: {out}");
        assert_eq!(lines[2] == ns_of(berth_pid, "ipc"), host, "{name}: {out}");
    }
    env.ns.run_ok(&["ip", "link", "del", "secveth0"]);
    env.finish().await;
}

#[tokio::test]
async fn users_groups_and_status_user() {
    let mut env = start_with(&["user-name-group", "user-named"]).await;
    let pod = env.pod("users").await;
    let probe = "id -u; id -g; id -G; echo READY; exec sleep 1000";
    let cases: Vec<(&str, &str, SetSc, &str)> = vec![
        // Image USER "app:extra": names through /etc/passwd and /etc/group.
        (
            "namegroup",
            "user-name-group",
            Box::new(|_| {}),
            "1000\n2000\n2000\n",
        ),
        // Image USER "app": its /etc/group memberships (extra) merged.
        (
            "named",
            "user-named",
            Box::new(|_| {}),
            "1000\n1000\n1000 2000\n",
        ),
        (
            "byname",
            "busybox",
            Box::new(|sc| sc.run_as_username = "app".into()),
            "1000\n1000\n1000 2000\n",
        ),
        (
            "merge",
            "busybox",
            Box::new(|sc| {
                sc.run_as_user = Some(cri::Int64Value { value: 1000 });
                sc.run_as_group = Some(cri::Int64Value { value: 3000 });
                sc.supplemental_groups = vec![4000];
            }),
            "1000\n3000\n3000 2000 4000\n",
        ),
        (
            "strict",
            "busybox",
            Box::new(|sc| {
                sc.run_as_user = Some(cri::Int64Value { value: 1000 });
                sc.supplemental_groups = vec![4000];
                sc.supplemental_groups_policy = cri::SupplementalGroupsPolicy::Strict as i32;
            }),
            "1000\n1000\n1000 4000\n",
        ),
        ("root", "busybox", Box::new(|_| {}), "0\n0\n0\n"),
    ];
    let mut ids = Vec::new();
    for (name, img, f, want) in cases {
        let id = env.run(&pod, secured(name, img, probe, f)).await;
        ids.push((name, id, want));
    }
    for (name, id, want) in ids {
        let log = env.output_with(&id, "users", name, "READY").await;
        assert_eq!(log, format!("{want}READY"), "{name}");
        let (out, _) = env.exec(&id, "id -u; id -g; id -G").await;
        assert_eq!(out, want, "{name} exec");
        let u = env.status(&id).await.user.unwrap().linux.unwrap();
        let nums: Vec<i64> = want
            .split_whitespace()
            .map(|n| n.parse().unwrap())
            .collect();
        assert_eq!((u.uid, u.gid), (nums[0], nums[1]), "{name}");
        assert_eq!(u.supplemental_groups, nums[2..].to_vec(), "{name}");
    }
    for (what, f) in [
        (
            "ghost",
            Box::new(|sc: &mut cri::LinuxContainerSecurityContext| {
                sc.run_as_username = "ghost".into()
            }) as SetSc,
        ),
        (
            "run_as_group",
            Box::new(|sc: &mut cri::LinuxContainerSecurityContext| {
                sc.run_as_group = Some(cri::Int64Value { value: 5 })
            }),
        ),
    ] {
        let e = env
            .create(&pod, secured("bad", "busybox", "true", f))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains(what), "{e:?}");
    }
    env.finish().await;
}
