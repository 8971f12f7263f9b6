//! Container breakout attempts, made from inside real containers: mount
//! targets that are symlinks to host paths, a symlink-swap race on a volume,
//! rewriting the host's berth binary through /proc/<pid>/exe, host fds
//! leaking into the workload or exec'd processes, and berth's own mounts
//! and directories showing up in a container.

mod common;

use common::breakout::{sh_container, volume, Cri};
use cri_proto::v1 as cri;
use sha2::{Digest, Sha256};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn sha256_of(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    hex::encode(Sha256::digest(bytes))
}

/// Mount points of berth's mount namespace (the test's private one) that
/// lie outside berth's own directory.
fn mounts_outside(cri: &Cri) -> BTreeSet<String> {
    let info = std::fs::read_to_string(format!("/proc/{}/mountinfo", cri.ns.pid())).unwrap();
    let dir = cri.berth.dir.display().to_string();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| !m.starts_with(&dir))
        .map(String::from)
        .collect()
}

/// The value after `KEY ` on the line that starts with it.
fn field<'a>(lines: &'a [String], key: &str) -> &'a str {
    lines
        .iter()
        .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no {key} line in {lines:#?}"))
}

#[tokio::test]
async fn symlinked_mount_targets_land_inside_the_rootfs() {
    let mut cri = Cri::start(&["evil-mounts"]).await;
    let shadow = sha256_of(Path::new("/etc/shadow"));
    let passwd = sha256_of(Path::new("/etc/passwd"));
    let mounts_before = mounts_outside(&cri);
    let vol = cri.berth.dir.join("evil-vol");
    std::fs::create_dir(&vol).unwrap();
    std::fs::write(vol.join("marker"), "volume").unwrap();

    let pod = cri
        .pod("evil", |p| {
            p.dns_config = Some(cri::DnsConfig {
                servers: vec!["10.0.0.53".into()],
                searches: vec!["evil.test".into()],
                options: vec![],
            });
        })
        .await;
    // /etc/resolv.conf -> /etc/shadow, /etc/hosts -> ../../(...)/tmp/...,
    // /vol -> /, /mask -> ../../(...)/etc in the image.
    let mut c = sh_container(
        "evil",
        "evil-mounts",
        "echo RESOLV $(grep nameserver /etc/resolv.conf); \
         echo HOSTS $(grep -c localhost /etc/hosts); \
         echo VOL $(cat /berth-evil-vol/marker); \
         echo PASSWD $(wc -c < /etc/passwd); \
         echo DONE; exec sleep 1000",
    );
    c.mounts.push(volume(&vol, "/vol/berth-evil-vol"));
    c.linux = Some(cri::LinuxContainerConfig {
        security_context: Some(cri::LinuxContainerSecurityContext {
            masked_paths: vec!["/proc/kcore".into(), "/mask/passwd".into()],
            ..Default::default()
        }),
        ..Default::default()
    });
    cri.run(&pod, c).await;
    let log = cri.log_through("evil", "evil", "DONE").await;

    // Each mount is where the container itself resolves the symlink.
    assert_eq!(field(&log, "RESOLV"), "nameserver 10.0.0.53");
    assert_ne!(
        field(&log, "HOSTS"),
        "0",
        "berth's hosts file at /etc/hosts"
    );
    assert_eq!(field(&log, "VOL"), "volume");
    assert_eq!(
        field(&log, "PASSWD"),
        "0",
        "/mask/passwd masks the image's /etc/passwd"
    );

    // And nothing of it reached the host.
    assert!(!Path::new("/berth-evil-vol").exists());
    assert!(!Path::new("/tmp/berth-evil-hosts").exists());
    assert_eq!(sha256_of(Path::new("/etc/shadow")), shadow);
    assert_eq!(sha256_of(Path::new("/etc/passwd")), passwd);
    assert_eq!(mounts_outside(&cri), mounts_before);
    cri.finish().await;
}

#[tokio::test]
async fn symlink_swap_race_on_a_volume_never_mounts_a_host_path() {
    let mut cri = Cri::start(&["busybox"]).await;
    let mounts_before = mounts_outside(&cri);
    let shared = cri.berth.dir.join("shared");
    let data = cri.berth.dir.join("data");
    std::fs::create_dir(&shared).unwrap();
    std::fs::create_dir(&data).unwrap();
    std::fs::write(data.join("marker"), "data").unwrap();
    let target = "berth-race-target";
    let pod = cri.pod("race", |_| {}).await;

    // `a` flips between missing, a directory and a symlink to `/` as fast
    // as the shell goes, until the test drops `stop` into the volume.
    let mut attacker = sh_container(
        "attacker",
        "busybox",
        "cd /shared; echo SWAPPING; \
         while [ ! -e stop ]; do rm -rf a; mkdir a; rm -rf a; ln -s / a; done; \
         echo DONE; exec sleep 1000",
    );
    attacker.mounts.push(volume(&shared, "/shared"));
    cri.run(&pod, attacker).await;
    cri.log_through("race", "attacker", "SWAPPING").await;

    let mut created = 0;
    for i in 0..30 {
        let name = format!("victim-{i}");
        let mut victim = sh_container(&name, "busybox", "exec sleep 1000");
        victim.mounts.push(volume(&shared, "/data"));
        victim
            .mounts
            .push(volume(&data, &format!("/data/a/{target}")));
        let id = match cri.create(&pod, victim).await {
            Ok(id) => id,
            // The target vanished between two steps of the swap.
            Err(e) => {
                assert!(
                    e.message().contains(target) || e.message().contains("/data/a"),
                    "{e:?}"
                );
                continue;
            }
        };
        created += 1;
        cri.rt
            .start_container(cri::StartContainerRequest {
                container_id: id.clone(),
            })
            .await
            .unwrap();
        // Where the container has it depends on what `a` was at mount
        // time: a directory (/data/a/...) or the symlink to the container's
        // own root (/...). Either way inside; never on the host. (The
        // attacker's `rm -rf a` may since have detached it.)
        let (out, _) = cri
            .sh(&id, &format!("grep {target} /proc/self/mountinfo; true"))
            .await;
        for line in out.lines() {
            let at = line.split(' ').nth(4).unwrap_or("");
            assert!(
                at == format!("/{target}") || at == format!("/data/a/{target}"),
                "victim {i} has the volume at {at:?}"
            );
        }
        cri.remove(&id).await;
        assert!(!Path::new("/").join(target).exists());
    }
    std::fs::write(shared.join("stop"), "").unwrap();
    cri.log_through("race", "attacker", "DONE").await;
    eprintln!("{created}/30 victims created during the race");
    assert!(!Path::new("/").join(target).exists());
    assert_eq!(mounts_outside(&cri), mounts_before);
    cri.finish().await;
}

/// `berth` processes the test can see (daemon, zygote, monitors, pod infra
/// processes): all mention berth's directory on their command line.
fn berth_processes(dir: &Path) -> Vec<(i32, PathBuf)> {
    let needle = dir.display().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&needle))
        })
        .filter_map(|pid| Some((pid, std::fs::read_link(format!("/proc/{pid}/exe")).ok()?)))
        .collect()
}

#[tokio::test]
async fn host_binary_cannot_be_opened_for_writing_from_a_container() {
    let binary = Path::new(env!("CARGO_BIN_EXE_berth"));
    let hash = sha256_of(binary);
    let mut cri = Cri::start(&["busybox"]).await;
    // The pod shares one PID namespace, so its infra process is visible,
    // and the attacker may ptrace (CAP_SYS_PTRACE), so that the kernel's
    // ptrace checks are not what stops it: it can open /proc/<pid>/exe of
    // every berth process it sees.
    let pod = cri
        .pod("exe", |p| {
            p.linux = Some(cri::LinuxPodSandboxConfig {
                security_context: Some(cri::LinuxSandboxSecurityContext {
                    namespace_options: Some(cri::NamespaceOption {
                        pid: cri::NamespaceMode::Pod as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            });
        })
        .await;
    let mut attacker = sh_container(
        "attacker",
        "busybox",
        "i=0; while [ $i -lt 300 ]; do \
           for d in /proc/[0-9]*; do \
             [ \"$d\" = /proc/$$ ] && continue; \
             l=$(readlink $d/exe 2>/dev/null) || continue; \
             echo \"SEEN $l\"; \
             if (exec 3<>$d/exe) 2>/dev/null; then \
               echo \"OPEN $l\"; \
               case \"$l\" in /memfd:*) (printf x 1<>$d/exe) 2>/dev/null && echo \"WROTE $l\";; esac; \
             fi; \
           done; i=$((i+1)); \
         done 2>/dev/null | sort -u; echo DONE; exec sleep 1000",
    );
    attacker.linux = Some(cri::LinuxContainerConfig {
        security_context: Some(cri::LinuxContainerSecurityContext {
            capabilities: Some(cri::Capability {
                add_capabilities: vec!["SYS_PTRACE".into()],
                ..Default::default()
            }),
            namespace_options: Some(cri::NamespaceOption {
                pid: cri::NamespaceMode::Pod as i32,
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    });
    let id = cri.run(&pod, attacker).await;
    // Exec helpers enter the container's PID namespace over and over while
    // the attacker scans.
    for _ in 0..20 {
        let (out, code) = cri.sh(&id, "echo hi").await;
        assert_eq!((out.as_str(), code), ("hi\n", 0));
    }
    let log = cri.log_through("exe", "attacker", "DONE").await;

    let seen: Vec<&String> = log.iter().filter(|l| l.starts_with("SEEN ")).collect();
    assert!(
        seen.iter().any(|l| l.starts_with("SEEN /memfd:berth")),
        "the infra process (berth, from its sealed copy) is visible: {log:#?}"
    );
    for l in &log {
        assert!(!l.starts_with("WROTE"), "{l}: {log:#?}");
        if let Some(target) = l.strip_prefix("OPEN ") {
            assert!(
                !target.contains(&binary.display().to_string()),
                "host binary opened for writing: {log:#?}"
            );
            assert!(
                target.starts_with("/memfd:") || !target.contains("berth"),
                "{l}"
            );
        }
    }
    // Every berth process runs from the sealed copy.
    let procs = berth_processes(&cri.berth.dir);
    assert!(
        procs.len() >= 3,
        "daemon, zygote, monitor, infra: {procs:?}"
    );
    for (pid, exe) in &procs {
        assert!(
            exe.to_string_lossy().starts_with("/memfd:berth"),
            "process {pid} runs {}",
            exe.display()
        );
    }
    assert_eq!(sha256_of(binary), hash, "host binary unchanged");
    cri.finish().await;
}

#[tokio::test]
async fn workload_infra_and_exec_get_only_their_stdio() {
    let mut cri = Cri::start(&["busybox"]).await;
    // One PID namespace for the pod: PID 1 is its infra process (berth).
    let pod = cri.pod("fds", |_| {}).await;
    let mut c = sh_container("fds", "busybox", "");
    c.command = vec!["sleep".into(), "1000".into()];
    let id = cri.run(&pod, c).await;
    let mut workload = String::new();
    for _ in 0..500 {
        workload = cri
            .exec(&id, &["pidof", "sleep"])
            .await
            .0
            .trim()
            .to_string();
        if !workload.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(!workload.is_empty(), "the workload never exec'd");
    for pid in ["1", workload.as_str()] {
        let (fds, code) = cri.exec(&id, &["ls", &format!("/proc/{pid}/fd")]).await;
        assert_eq!((fds.as_str(), code), ("0\n1\n2\n", 0), "pid {pid}");
    }
    // An exec'd process: ls's own directory handle takes the lowest free
    // fd, 3; any fd it had inherited would be listed besides.
    let (exec, code) = cri.exec(&id, &["ls", "/proc/self/fd"]).await;
    assert_eq!((exec.as_str(), code), ("0\n1\n2\n3\n", 0));
    cri.finish().await;
}

#[tokio::test]
async fn berth_state_is_unreachable_and_its_mounts_do_not_propagate() {
    let mut cri = Cri::start(&["busybox"]).await;
    let first = cri.pod("first", |_| {}).await;
    let id = cri
        .run(
            &first,
            sh_container("a", "busybox", "echo UP; exec sleep 1000"),
        )
        .await;
    cri.log_through("first", "a", "UP").await;
    let mountpoints = "cut -d' ' -f5 /proc/self/mountinfo | sort";
    let (before, _) = cri.sh(&id, mountpoints).await;

    // berth's binary, root, state and content are not in the container.
    let binary = env!("CARGO_BIN_EXE_berth");
    let b = &cri.berth;
    let paths = [
        PathBuf::from(binary),
        b.dir.clone(),
        b.root.clone(),
        b.state_dir.clone(),
        b.root.join("content"),
    ];
    for p in &paths {
        let (out, code) = cri.sh(&id, &format!("ls -d {}", p.display())).await;
        assert_ne!(code, 0, "{} reachable: {out}", p.display());
    }
    let (out, _) = cri.sh(&id, "cat /proc/self/mountinfo").await;
    let state = cri.berth.state_dir.display().to_string();
    assert!(
        !out.lines()
            .any(|l| l.split(' ').nth(4).is_some_and(|m| m.starts_with(&state))),
        "{out}"
    );

    // berth mounts more (a pod's netns pin and shm, another container's
    // rootfs): none of it appears in the running container.
    let second = cri.pod("second", |_| {}).await;
    cri.run(
        &second,
        sh_container("b", "busybox", "echo UP; exec sleep 1000"),
    )
    .await;
    cri.log_through("second", "b", "UP").await;
    let (after, _) = cri.sh(&id, mountpoints).await;
    assert_eq!(before, after);
    cri.finish().await;
}
