//! Container lifecycle through the CRI socket: real processes in real
//! namespaces on an overlay rootfs made from a pulled image.

mod common;

use common::devices::pure_cgroup2_host;
use common::*;
use cri_proto::v1 as cri;
use std::time::{Duration, Instant};
use tonic::Code;

const IMAGE: &str = BUSYBOX;

async fn start() -> Env {
    Env::start(&["busybox", "user-numeric"]).await
}

impl Env {
    async fn run_sh(&mut self, pod: &str, name: &str, script: &str) -> String {
        self.run(pod, sh(name, script)).await
    }
}

fn sh(name: &str, script: &str) -> cri::ContainerConfig {
    common::sh(name, IMAGE, script)
}

#[tokio::test]
async fn lifecycle_exit_codes_and_logs() {
    let mut env = start().await;
    let pod = env.pod("life").await;
    let id = env
        .create(
            &pod,
            sh("c", "echo out; echo err >&2; printf partial; exit 3"),
        )
        .await
        .unwrap();
    let s = env.status(&id).await;
    assert_eq!(s.state, cri::ContainerState::ContainerCreated as i32);
    assert!(s.created_at > 0 && s.started_at == 0);
    assert_eq!(s.image.unwrap().image, IMAGE);
    assert!(
        s.image_ref.starts_with("127.0.0.1:5000/busybox@sha256:"),
        "{}",
        s.image_ref
    );
    assert!(s.image_id.starts_with("sha256:"));
    assert!(s.log_path.ends_with("c/0.log"));
    env.rt
        .start_container(cri::StartContainerRequest {
            container_id: id.clone(),
        })
        .await
        .unwrap();
    let s = env.wait_exit(&id).await;
    assert_eq!(s.exit_code, 3);
    assert_eq!(s.reason, "Error");
    assert!(s.started_at >= s.created_at && s.finished_at >= s.started_at);
    let log = env.log("life", "c");
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines.len(), 3, "{log}");
    for l in &lines {
        let ts = l.split(' ').next().unwrap();
        assert!(
            chrono::DateTime::parse_from_rfc3339(ts).is_ok(),
            "timestamp {ts}"
        );
    }
    assert!(lines.iter().any(|l| l.ends_with(" stdout F out")), "{log}");
    assert!(lines.iter().any(|l| l.ends_with(" stderr F err")), "{log}");
    assert!(
        lines.iter().any(|l| l.ends_with(" stdout P partial")),
        "{log}"
    );

    let ok = env.run_sh(&pod, "ok", "true").await;
    let s = env.wait_exit(&ok).await;
    assert_eq!((s.exit_code, s.reason.as_str()), (0, "Completed"));

    // Contract points.
    let e = env
        .rt
        .start_container(cri::StartContainerRequest {
            container_id: ok.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let e = env.create(&pod, sh("ok", "true")).await.unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    let e = env
        .rt
        .container_status(cri::ContainerStatusRequest {
            container_id: "0123abcd".into(),
            verbose: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    for _ in 0..2 {
        env.rt
            .remove_container(cri::RemoveContainerRequest {
                container_id: ok.clone(),
            })
            .await
            .unwrap();
        env.rt
            .stop_container(cri::StopContainerRequest {
                container_id: ok.clone(),
                timeout: 0,
            })
            .await
            .unwrap();
    }
    // A command that is not in the image cannot run.
    let bad = env
        .create(
            &pod,
            cri::ContainerConfig {
                command: vec!["/no/such/binary".into()],
                ..sh("bad", "")
            },
        )
        .await
        .unwrap();
    let e = env
        .rt
        .start_container(cri::StartContainerRequest {
            container_id: bad.clone(),
        })
        .await
        .unwrap_err();
    assert!(e.message().contains("/no/such/binary"), "{e:?}");
    let s = env.status(&bad).await;
    assert_eq!(s.state, cri::ContainerState::ContainerExited as i32);
    assert_eq!(s.reason, "ContainerCannotRun");
    assert_eq!(s.exit_code, 128);
    // The image of a container cannot be removed.
    let mut im = env.berth.image_client().await;
    let e = im
        .remove_image(cri::RemoveImageRequest {
            image: Some(cri::ImageSpec {
                image: IMAGE.into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    env.finish().await;
}

#[tokio::test]
async fn environment_user_mounts_and_pod_files() {
    let mut env = start().await;
    let pod = env.pod("envpod").await;
    let vol = env.berth.dir.join("vol");
    std::fs::create_dir_all(&vol).unwrap();
    std::fs::write(vol.join("in"), "from-host").unwrap();
    let ro = env.berth.dir.join("ro");
    std::fs::create_dir_all(&ro).unwrap();
    let cfg = cri::ContainerConfig {
        working_dir: "/work/dir".into(),
        envs: vec![
            cri::KeyValue {
                key: "GREETING".into(),
                value: b"hi there".to_vec(),
            },
            cri::KeyValue {
                key: "PATH".into(),
                value: b"/bin:/usr/bin".to_vec(),
            },
        ],
        mounts: vec![
            cri::Mount {
                container_path: "/vol".into(),
                host_path: vol.display().to_string(),
                ..Default::default()
            },
            cri::Mount {
                container_path: "/ro".into(),
                host_path: ro.display().to_string(),
                readonly: true,
                ..Default::default()
            },
        ],
        ..sh(
            "c",
            "echo \"greeting=$GREETING\"; echo \"path=$PATH\"; echo \"cwd=$(pwd)\"; echo \"id=$(id -u):$(id -g)\"; \
             echo \"hostname=$(hostname)\"; cat /vol/in; echo; echo written > /vol/out; \
             touch /ro/x 2>/dev/null && echo ro-writable || echo ro-readonly; \
             grep -c nameserver /etc/resolv.conf; cat /etc/resolv.conf; cat /etc/hostname; \
             grep -q localhost /etc/hosts && echo hosts-ok; echo pid1=$(cat /proc/1/cmdline | tr '\\0' ' ')",
        )
    };
    let id = env.create(&pod, cfg).await.unwrap();
    env.rt
        .start_container(cri::StartContainerRequest {
            container_id: id.clone(),
        })
        .await
        .unwrap();
    let s = env.wait_exit(&id).await;
    let out = env.output("envpod", "c");
    assert_eq!(s.exit_code, 0, "{out}");
    for want in [
        "greeting=hi there",
        "path=/bin:/usr/bin",
        "cwd=/work/dir",
        "id=0:0",
        "hostname=envpod-host",
        "from-host",
        "ro-readonly",
        "nameserver 10.96.0.10",
        "search default.svc.cluster.local",
        "options ndots:5",
        "envpod-host",
        "hosts-ok",
        "pid1=sh -c",
    ] {
        assert!(
            out.lines().any(|l| l.starts_with(want)),
            "missing {want:?} in:\n{out}"
        );
    }
    assert_eq!(
        std::fs::read_to_string(vol.join("out")).unwrap(),
        "written\n"
    );
    assert!(!ro.join("x").exists());

    // The image's USER, and run_as_user overriding it.
    let mut user = sh("u1", "id -u; id -g");
    user.image = Some(cri::ImageSpec {
        image: "127.0.0.1:5000/user-numeric:latest".into(),
        ..Default::default()
    });
    let id = env.create(&pod, user.clone()).await.unwrap();
    env.rt
        .start_container(cri::StartContainerRequest {
            container_id: id.clone(),
        })
        .await
        .unwrap();
    let s = env.wait_exit(&id).await;
    assert_eq!(env.output("envpod", "u1"), "1000\n1000");
    let u = s.user.unwrap().linux.unwrap();
    assert_eq!((u.uid, u.gid), (1000, 1000));
    let mut as_nobody = sh("u2", "id -u");
    as_nobody.linux = Some(cri::LinuxContainerConfig {
        security_context: Some(cri::LinuxContainerSecurityContext {
            run_as_user: Some(cri::Int64Value { value: 65534 }),
            ..Default::default()
        }),
        ..Default::default()
    });
    let id = env.create(&pod, as_nobody).await.unwrap();
    env.rt
        .start_container(cri::StartContainerRequest {
            container_id: id.clone(),
        })
        .await
        .unwrap();
    env.wait_exit(&id).await;
    assert_eq!(env.output("envpod", "u2"), "65534");
    // A bind source that does not exist is refused at create.
    let e = env
        .create(
            &pod,
            cri::ContainerConfig {
                mounts: vec![cri::Mount {
                    container_path: "/x".into(),
                    host_path: "/no/such/host/path".into(),
                    ..Default::default()
                }],
                ..sh("m", "true")
            },
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("/no/such/host/path"), "{e:?}");
    env.finish().await;
}

#[tokio::test]
async fn stop_timeout_escalates_and_restart_keeps_containers() {
    let mut env = start().await;
    let pod = env.pod("stoppod").await;
    // sleep as PID 1 ignores SIGTERM: the stop must escalate to SIGKILL.
    let stubborn = env.run_sh(&pod, "stubborn", "exec sleep 1000").await;
    // A shell with a TERM handler exits on its own.
    let polite = env
        .run_sh(
            &pod,
            "polite",
            "trap 'echo got-term; exit 0' TERM; echo ready; while true; do sleep 0.1; done",
        )
        .await;
    let chatty = env
        .run_sh(
            &pod,
            "chatty",
            "i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.1; done",
        )
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        env.status(&stubborn).await.state,
        cri::ContainerState::ContainerRunning as i32
    );

    let t = Instant::now();
    env.rt
        .stop_container(cri::StopContainerRequest {
            container_id: stubborn.clone(),
            timeout: 1,
        })
        .await
        .unwrap();
    let s = env.status(&stubborn).await;
    assert_eq!(s.state, cri::ContainerState::ContainerExited as i32);
    assert_eq!(s.exit_code, 137, "killed by SIGKILL");
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "the timeout was honoured"
    );

    env.rt
        .stop_container(cri::StopContainerRequest {
            container_id: polite.clone(),
            timeout: 30,
        })
        .await
        .unwrap();
    let s = env.status(&polite).await;
    assert_eq!(s.exit_code, 0);
    assert!(env.output("stoppod", "polite").contains("got-term"));

    // kill -9 of the daemon: the running container keeps running and logging.
    let before = env.log("stoppod", "chatty").lines().count();
    env.berth.kill9();
    tokio::time::sleep(Duration::from_millis(500)).await;
    env.berth.restart();
    env.rt = env.berth.runtime_client().await;
    let s = env.status(&chatty).await;
    assert_eq!(s.state, cri::ContainerState::ContainerRunning as i32);
    assert!(env.log("stoppod", "chatty").lines().count() > before + 2);
    assert_eq!(env.status(&stubborn).await.exit_code, 137);

    // Log rotation: kubelet renames the file and asks for a reopen.
    let log = env.logs.join("stoppod/chatty/0.log");
    std::fs::rename(&log, log.with_extension("log.1")).unwrap();
    env.rt
        .reopen_container_log(cri::ReopenContainerLogRequest {
            container_id: chatty.clone(),
        })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(std::fs::read_to_string(&log).unwrap().contains("tick"));
    // Not running: refused, and no file appears.
    let plog = env.logs.join("stoppod/polite/0.log");
    std::fs::remove_file(&plog).unwrap();
    let e = env
        .rt
        .reopen_container_log(cri::ReopenContainerLogRequest {
            container_id: polite.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(!plog.exists());

    // Removing a running container kills it.
    env.rt
        .remove_container(cri::RemoveContainerRequest {
            container_id: chatty.clone(),
        })
        .await
        .unwrap();
    let list = env
        .rt
        .list_containers(cri::ListContainersRequest { filter: None })
        .await
        .unwrap()
        .into_inner()
        .containers;
    assert!(!list.iter().any(|c| c.id == chatty));
    env.finish().await;
}

#[tokio::test]
async fn list_filters() {
    let mut env = start().await;
    let p1 = env.pod("lp1").await;
    let p2 = env.pod("lp2").await;
    let mut cfg = sh("a", "sleep 30");
    cfg.labels.insert("app".into(), "web".into());
    let a = env.create(&p1, cfg).await.unwrap();
    let b = env.run_sh(&p2, "b", "sleep 30").await;
    let list = |f: cri::ContainerFilter| {
        let mut rt = env.rt.clone();
        async move {
            let mut ids: Vec<String> = rt
                .list_containers(cri::ListContainersRequest { filter: Some(f) })
                .await
                .unwrap()
                .into_inner()
                .containers
                .into_iter()
                .map(|c| c.id)
                .collect();
            ids.sort();
            ids
        }
    };
    assert_eq!(
        list(cri::ContainerFilter {
            pod_sandbox_id: p1.clone(),
            ..Default::default()
        })
        .await,
        vec![a.clone()]
    );
    assert_eq!(
        list(cri::ContainerFilter {
            id: b[..8].into(),
            ..Default::default()
        })
        .await,
        vec![b.clone()]
    );
    assert_eq!(
        list(cri::ContainerFilter {
            state: Some(cri::ContainerStateValue {
                state: cri::ContainerState::ContainerRunning as i32
            }),
            ..Default::default()
        })
        .await,
        vec![b.clone()]
    );
    let mut sel = std::collections::HashMap::new();
    sel.insert("app".to_string(), "web".to_string());
    assert_eq!(
        list(cri::ContainerFilter {
            label_selector: sel,
            ..Default::default()
        })
        .await,
        vec![a.clone()]
    );
    env.finish().await;
}

#[tokio::test]
async fn exec_sync_runs_inside_the_container() {
    let mut env = start().await;
    let pod = env.pod("execpod").await;
    let mut cfg = sh("c", "echo $$ > /tmp/pid1; exec sleep 1000");
    cfg.envs = vec![cri::KeyValue {
        key: "FROM_CRI".into(),
        value: b"yes".to_vec(),
    }];
    cfg.working_dir = "/tmp".into();
    let id = env.create(&pod, cfg).await.unwrap();
    // Not running yet: refused.
    let e = env
        .rt
        .exec_sync(cri::ExecSyncRequest {
            container_id: id.clone(),
            cmd: vec!["true".into()],
            timeout: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    env.rt
        .start_container(cri::StartContainerRequest {
            container_id: id.clone(),
        })
        .await
        .unwrap();
    let exec = |cmd: &str, timeout: i64| {
        let mut rt = env.rt.clone();
        let req = cri::ExecSyncRequest {
            container_id: id.clone(),
            cmd: vec!["sh".into(), "-c".into(), cmd.into()],
            timeout,
        };
        async move { rt.exec_sync(req).await.unwrap().into_inner() }
    };
    let r = exec(
        "hostname; pwd; echo $FROM_CRI; cat /tmp/pid1; echo oops >&2; exit 7",
        0,
    )
    .await;
    assert_eq!(
        String::from_utf8_lossy(&r.stdout),
        "execpod-host\n/tmp\nyes\n1\n"
    );
    assert_eq!(String::from_utf8_lossy(&r.stderr), "oops\n");
    assert_eq!(r.exit_code, 7);
    // The exec sees the container's processes (its PID namespace).
    let r = exec("cat /proc/1/cmdline | tr '\\0' ' '", 0).await;
    assert_eq!(String::from_utf8_lossy(&r.stdout), "sleep 1000 ");
    // The timeout is honoured: the process is killed.
    let t = Instant::now();
    let r = exec("sleep 30", 1).await;
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t.elapsed()
    );
    assert_ne!(r.exit_code, 0);
    let r = exec("cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' ' '", 0).await;
    let procs = String::from_utf8_lossy(&r.stdout);
    assert!(
        !procs.contains("sleep 30 "),
        "the timed-out process is gone: {procs}"
    );
    let r = env
        .rt
        .exec_sync(cri::ExecSyncRequest {
            container_id: id.clone(),
            cmd: vec!["no-such-command".into()],
            timeout: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.exit_code, 127);
    env.finish().await;
}

#[tokio::test]
async fn stop_signal_and_oom_score_adj() {
    let mut env = start().await;
    let pod = env.pod("sigpod").await;
    let mut cfg = sh(
        "usr1",
        "trap 'echo got-usr1; exit 0' USR1; cat /proc/self/oom_score_adj; while true; do sleep 0.1; done",
    );
    cfg.stop_signal = cri::Signal::Sigusr1 as i32;
    cfg.linux = Some(cri::LinuxContainerConfig {
        resources: Some(cri::LinuxContainerResources {
            oom_score_adj: 500,
            ..Default::default()
        }),
        ..Default::default()
    });
    let id = env.create(&pod, cfg).await.unwrap();
    env.rt
        .start_container(cri::StartContainerRequest {
            container_id: id.clone(),
        })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    env.rt
        .stop_container(cri::StopContainerRequest {
            container_id: id.clone(),
            timeout: 30,
        })
        .await
        .unwrap();
    let s = env.status(&id).await;
    assert_eq!(s.exit_code, 0, "the CRI stop signal was sent");
    assert_eq!(s.stop_signal, cri::Signal::Sigusr1 as i32);
    let out = env.output("sigpod", "usr1");
    assert!(out.contains("got-usr1"), "{out}");
    assert!(out.starts_with("500"), "{out}");
    // Below berth's own value without CAP_SYS_RESOURCE: raised to berth's.
    let own: i64 =
        std::fs::read_to_string(format!("/proc/{}/oom_score_adj", env.berth.pid().unwrap()))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
    let mut low = sh("low", "cat /proc/self/oom_score_adj");
    low.linux = Some(cri::LinuxContainerConfig {
        resources: Some(cri::LinuxContainerResources {
            oom_score_adj: -999,
            ..Default::default()
        }),
        ..Default::default()
    });
    let id = env.create(&pod, low).await.unwrap();
    env.rt
        .start_container(cri::StartContainerRequest {
            container_id: id.clone(),
        })
        .await
        .unwrap();
    let s = env.wait_exit(&id).await;
    assert_eq!(s.exit_code, 0);
    let got: i64 = env.output("sigpod", "low").trim().parse().unwrap();
    assert!(got == own || got == -999, "got {got}, berth's own {own}");
    env.finish().await;
}

#[tokio::test]
async fn containers_of_a_pod_share_dev_shm() {
    let mut env = start().await;
    let pod = env.pod("shmpod").await;
    let writer = env
        .run_sh(&pod, "writer", "echo shared > /dev/shm/token")
        .await;
    assert_eq!(env.wait_exit(&writer).await.exit_code, 0);
    let reader = env
        .run_sh(
            &pod,
            "reader",
            "cat /dev/shm/token; grep ' /dev/shm ' /proc/mounts | grep -c tmpfs",
        )
        .await;
    assert_eq!(env.wait_exit(&reader).await.exit_code, 0);
    assert_eq!(env.output("shmpod", "reader"), "shared\n1");
    // Another pod does not see it.
    let other = env.pod("shmpod2").await;
    let probe = env
        .run_sh(
            &other,
            "probe",
            "test -e /dev/shm/token && echo seen || echo unseen",
        )
        .await;
    env.wait_exit(&probe).await;
    assert_eq!(env.output("shmpod2", "probe"), "unseen");
    env.finish().await;
}

/// On a host without a usable cgroup v2 (this development host's hybrid
/// layout), a requested limit is refused naming its controller, unless the
/// config tolerates missing controllers.
#[tokio::test]
async fn limits_without_cgroups_need_tolerance() {
    let pure_v2 = pure_cgroup2_host();
    if pure_v2 {
        eprintln!(
            "SKIP: this host has cgroup v2 at /sys/fs/cgroup; the VM suite covers limits there"
        );
        return;
    }
    let mut env = start().await;
    let pod = env.pod("nocg").await;
    let mut cfg = sh("limited", "echo ran");
    cfg.linux = Some(cri::LinuxContainerConfig {
        resources: Some(cri::LinuxContainerResources {
            memory_limit_in_bytes: 64 << 20,
            ..Default::default()
        }),
        ..Default::default()
    });
    let e = env.create(&pod, cfg.clone()).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("memory"), "{}", e.message());
    assert!(
        e.message().contains("allow_missing_controllers"),
        "{}",
        e.message()
    );

    // Tolerated: it runs, with a warning in berth's log.
    env.berth.opts.config_toml = "[cgroup]\nallow_missing_controllers = true\n".into();
    std::fs::write(&env.berth.config_path, &env.berth.opts.config_toml).unwrap();
    env.berth.restart();
    env.rt = env.berth.runtime_client().await;
    let id = env.create(&pod, cfg).await.unwrap();
    env.rt
        .start_container(cri::StartContainerRequest {
            container_id: id.clone(),
        })
        .await
        .unwrap();
    assert_eq!(env.wait_exit(&id).await.exit_code, 0);
    assert!(env.berth.log().contains("limit not applied"));
    env.finish().await;
}

fn ppid_of(pid: i32) -> i32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = stat.rsplit_once(')').unwrap().1;
    rest.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Monitors come from the monitor zygote but belong to the daemon (they are
/// its children) and show which container they watch, as a monitor started
/// directly would.
#[tokio::test]
async fn monitors_are_daemon_children_named_after_their_container() {
    let mut env = start().await;
    let pod = env.pod("zygote").await;
    let a = env.run_sh(&pod, "a", "sleep 600").await;
    let b = env.run_sh(&pod, "b", "sleep 600").await;
    let daemon = env.berth.pid().unwrap();
    let mut monitors = Vec::new();
    for id in [&a, &b] {
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
        let v: serde_json::Value = serde_json::from_str(&info["info"]).unwrap();
        let init = v["pid"].as_i64().unwrap() as i32;
        let monitor = ppid_of(init);
        assert_eq!(ppid_of(monitor), daemon, "monitor {monitor} of {id}");
        let cmdline = std::fs::read(format!("/proc/{monitor}/cmdline")).unwrap();
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        assert_eq!(args[1..3], ["monitor", "--config"], "{args:?}");
        assert!(args[3].contains(id.as_str()), "{args:?}");
        monitors.push(monitor);
    }
    assert_ne!(monitors[0], monitors[1]);
    // Each container still stops on its own.
    env.rt
        .stop_container(cri::StopContainerRequest {
            container_id: a.clone(),
            timeout: 0,
        })
        .await
        .unwrap();
    assert_eq!(env.wait_exit(&a).await.exit_code, 137);
    assert_eq!(
        env.status(&b).await.state,
        cri::ContainerState::ContainerRunning as i32
    );
    env.finish().await;
}

/// tty gives the container a terminal from its own devpts as stdio and
/// controlling terminal (its output logged as stdout); stdin keeps an open
/// pipe as the container's stdin; without either, stdin is /dev/null.
#[tokio::test]
async fn tty_and_stdin() {
    let mut env = start().await;
    let pod = env.pod("tty").await;
    let script = "tty; test -t 0 && echo stdin-is-tty; readlink /proc/self/fd/0; \
                  ls -l /proc/self/fd/1 >/dev/null && echo done";
    let mut cfgs = Vec::new();
    for (name, tty, stdin) in [("t", true, true), ("s", false, true), ("n", false, false)] {
        let mut c = sh(name, script);
        c.tty = tty;
        c.stdin = stdin;
        cfgs.push((name, c));
    }
    let mut ids = Vec::new();
    for (name, c) in cfgs {
        let id = env.create(&pod, c).await.unwrap();
        env.rt
            .start_container(cri::StartContainerRequest {
                container_id: id.clone(),
            })
            .await
            .unwrap();
        ids.push((name, id));
    }
    for (_, id) in &ids {
        assert_eq!(env.wait_exit(id).await.exit_code, 0, "{id}");
    }
    let t = env.output("tty", "t");
    assert!(t.contains("/dev/pts/0"), "{t}");
    assert!(t.contains("stdin-is-tty"), "{t}");
    assert!(
        env.log("tty", "t").lines().all(|l| l.contains(" stdout ")),
        "{}",
        env.log("tty", "t")
    );
    let s = env.output("tty", "s");
    assert!(s.contains("not a tty") && s.contains("pipe:["), "{s}");
    assert!(!s.contains("stdin-is-tty"), "{s}");
    let n = env.output("tty", "n");
    assert!(n.contains("/dev/null"), "{n}");
    env.finish().await;
}

/// UpdateContainerResources on a host without usable cgroups: limits are
/// refused naming the controller; oom_score_adj (not a cgroup setting)
/// applies to the running process; ContainerStatus shows what was
/// recorded; exited and unknown containers are refused.
#[tokio::test]
async fn update_resources_on_a_host_without_cgroups() {
    let pure_v2 = pure_cgroup2_host();
    if pure_v2 {
        eprintln!("SKIP: this host has cgroup v2 at /sys/fs/cgroup; the VM suite covers updates");
        return;
    }
    let mut env = start().await;
    let pod = env.pod("upd").await;
    let id = env.run_sh(&pod, "sleeper", "sleep 600").await;
    let update = |linux: cri::LinuxContainerResources| cri::UpdateContainerResourcesRequest {
        container_id: id.clone(),
        linux: Some(linux),
        ..Default::default()
    };
    let e = env
        .rt
        .update_container_resources(update(cri::LinuxContainerResources {
            cpu_quota: 50_000,
            cpu_period: 100_000,
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("cpu"), "{}", e.message());
    env.rt
        .update_container_resources(update(cri::LinuxContainerResources {
            oom_score_adj: 700,
            ..Default::default()
        }))
        .await
        .unwrap();
    let info = env
        .rt
        .container_status(cri::ContainerStatusRequest {
            container_id: id.clone(),
            verbose: true,
        })
        .await
        .unwrap()
        .into_inner();
    let v: serde_json::Value = serde_json::from_str(&info.info["info"]).unwrap();
    let pid = v["pid"].as_i64().unwrap();
    let adj = std::fs::read_to_string(format!("/proc/{pid}/oom_score_adj")).unwrap();
    assert_eq!(adj.trim(), "700");
    let shown = info.status.unwrap().resources.unwrap().linux.unwrap();
    assert_eq!(shown.oom_score_adj, 700);
    assert_eq!(shown.cpu_quota, 0, "the refused update left nothing behind");

    let e = env
        .rt
        .update_container_resources(cri::UpdateContainerResourcesRequest {
            container_id: "no-such-container".into(),
            linux: Some(Default::default()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    env.rt
        .stop_container(cri::StopContainerRequest {
            container_id: id.clone(),
            timeout: 0,
        })
        .await
        .unwrap();
    let e = env
        .rt
        .update_container_resources(update(Default::default()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");

    // The pod's sandbox: best effort, unknown pods are NotFound.
    env.rt
        .update_pod_sandbox_resources(cri::UpdatePodSandboxResourcesRequest {
            pod_sandbox_id: pod.clone(),
            overhead: None,
            resources: Some(cri::LinuxContainerResources {
                cpu_shares: 512,
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    let e = env
        .rt
        .update_pod_sandbox_resources(cri::UpdatePodSandboxResourcesRequest {
            pod_sandbox_id: "no-such-pod".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    env.finish().await;
}
