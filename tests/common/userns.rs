//! Shared scaffolding for the user-namespace tests (tests/userns.rs on the
//! host, tests/vm_userns.rs in the VM): berth with busybox pulled, pods with
//! kubelet-style id mappings, a host volume, and exec into containers.

use super::{Berth, BerthOpts, Netns, Registry, RegistryOpts};
use cri_proto::v1 as cri;
use cri_proto::v1::runtime_service_client::RuntimeServiceClient;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use tonic::transport::Channel;

pub const USERNS_IMAGE: &str = "127.0.0.1:5000/busybox:latest";
/// Ids kubelet gives a pod: 65536 of them, on a 65536 boundary.
pub const POD_IDS: u32 = 65536;

pub struct UsernsEnv {
    pub rt: RuntimeServiceClient<Channel>,
    pub berth: Berth,
    pub reg: Registry,
    pub ns: Netns,
    /// A host directory given to containers as a volume at /vol: mode 0777
    /// (like kubelet's emptyDir), holding `secret`, root's, mode 0600.
    pub vol: PathBuf,
    /// Pods get this cgroup parent ("" leaves cgroups to berth's mode).
    pub cgroup_parent: String,
}

/// A CRI user namespace of mode POD mapping container ids 0..65536 to
/// `host..host+65536`, for uids and gids alike.
pub fn pod_userns(host: u32) -> cri::UserNamespace {
    let m = vec![cri::IdMapping {
        host_id: host,
        container_id: 0,
        length: POD_IDS,
    }];
    cri::UserNamespace {
        mode: cri::NamespaceMode::Pod as i32,
        uids: m.clone(),
        gids: m,
    }
}

/// A host id range nobody on this host uses, different per test process.
pub fn free_host_ids() -> u32 {
    // Well above kubelet's default range (which starts at 65536 * 2 and
    // grows with pods): 2^30 + a per-process block, below 2^31, which
    // Linux 6.12's devpts refuses as a gid= option (6.18's takes it).
    (1u32 << 30) + (std::process::id() % 1024) * 8 * POD_IDS
}

pub async fn start_userns_env(cgroup_parent: &str) -> UsernsEnv {
    let ns = Netns::new();
    let reg = Registry::start(&ns, RegistryOpts::default());
    reg.push("busybox", "busybox:latest");
    let berth = Berth::start(
        &ns,
        BerthOpts {
            registries_conf: Some(
                "[[registry]]\nlocation = \"127.0.0.1:5000\"\ninsecure = true\n".into(),
            ),
            ..Default::default()
        },
    );
    let mut im = berth.image_client().await;
    im.pull_image(cri::PullImageRequest {
        image: Some(cri::ImageSpec {
            image: USERNS_IMAGE.into(),
            ..Default::default()
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    let vol = berth.dir.join("vol");
    std::fs::create_dir(&vol).unwrap();
    std::fs::set_permissions(&vol, std::fs::Permissions::from_mode(0o777)).unwrap();
    let secret = vol.join("secret");
    std::fs::write(&secret, "host root's\n").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let rt = berth.runtime_client().await;
    UsernsEnv {
        rt,
        berth,
        reg,
        ns,
        vol,
        cgroup_parent: cgroup_parent.into(),
    }
}

/// What an exec returned: exit code, stdout, stderr.
pub struct ExecOut {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl UsernsEnv {
    pub fn pod_config(
        &self,
        name: &str,
        userns: Option<cri::UserNamespace>,
    ) -> cri::PodSandboxConfig {
        cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: name.into(),
                uid: format!("uid-{name}"),
                namespace: "userns".into(),
                attempt: 0,
            }),
            hostname: name.into(),
            log_directory: self.berth.dir.join("logs").join(name).display().to_string(),
            linux: Some(cri::LinuxPodSandboxConfig {
                cgroup_parent: self.cgroup_parent.clone(),
                security_context: Some(cri::LinuxSandboxSecurityContext {
                    namespace_options: Some(cri::NamespaceOption {
                        network: cri::NamespaceMode::Pod as i32,
                        pid: cri::NamespaceMode::Container as i32,
                        ipc: cri::NamespaceMode::Pod as i32,
                        userns_options: userns,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    pub async fn run_pod(
        &mut self,
        config: cri::PodSandboxConfig,
    ) -> Result<String, tonic::Status> {
        self.rt
            .run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(config),
                runtime_handler: String::new(),
            })
            .await
            .map(|r| r.into_inner().pod_sandbox_id)
    }

    /// Creates and starts `sleep <tag>` (a tag that names it among the
    /// host's processes) with the volume at /vol.
    pub async fn sleeper(
        &mut self,
        pod: &str,
        pod_config: &cri::PodSandboxConfig,
        tag: &str,
    ) -> String {
        let config = cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: "sleeper".into(),
                attempt: 0,
            }),
            image: Some(cri::ImageSpec {
                image: USERNS_IMAGE.into(),
                ..Default::default()
            }),
            command: vec!["sleep".into(), tag.into()],
            mounts: vec![cri::Mount {
                container_path: "/vol".into(),
                host_path: self.vol.display().to_string(),
                ..Default::default()
            }],
            linux: Some(cri::LinuxContainerConfig::default()),
            ..Default::default()
        };
        let id = self
            .rt
            .create_container(cri::CreateContainerRequest {
                pod_sandbox_id: pod.into(),
                config: Some(config),
                sandbox_config: Some(pod_config.clone()),
            })
            .await
            .unwrap()
            .into_inner()
            .container_id;
        self.rt
            .start_container(cri::StartContainerRequest {
                container_id: id.clone(),
            })
            .await
            .unwrap();
        id
    }

    pub async fn sh(&mut self, container: &str, script: &str) -> ExecOut {
        let r = self
            .rt
            .exec_sync(cri::ExecSyncRequest {
                container_id: container.into(),
                cmd: vec!["sh".into(), "-c".into(), script.into()],
                timeout: 60,
            })
            .await
            .unwrap()
            .into_inner();
        ExecOut {
            code: r.exit_code,
            stdout: String::from_utf8_lossy(&r.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&r.stderr).into_owned(),
        }
    }

    /// Removes every pod, stops berth and checks that nothing leaked.
    pub async fn finish(self) {
        let UsernsEnv {
            rt, berth, reg, ns, ..
        } = self;
        super::teardown(rt, berth, reg, ns).await;
    }
}

/// The process on the host whose command line is `sleep <tag>`.
pub fn host_pid_of_sleep(tag: &str) -> i32 {
    let want = format!("sleep\0{tag}\0");
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .find(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c == want.as_bytes())
        })
        .unwrap_or_else(|| panic!("no `sleep {tag}` process on the host"))
}

/// The four ids of a `Uid:`/`Gid:` line of /proc/<pid>/status.
pub fn status_ids(pid: i32, key: &str) -> Vec<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
        .split_whitespace()
        .map(|v| v.parse().unwrap())
        .collect()
}

/// Runs a pod with its own user namespace and a container in it, and checks
/// the mapping from every side: /proc/self/uid_map and gid_map inside, root
/// inside, the image and pod files owned by that root (idmapped), a volume
/// file it writes owned by the mapped ids on the host, a host root's 0600
/// file in the volume not writable, and the workload's ids as the host
/// sees them (what ps shows). Returns (pod id, container id, host base id).
pub async fn assert_pod_runs_mapped(env: &mut UsernsEnv, name: &str) -> (String, String, u32) {
    let host = free_host_ids();
    let config = env.pod_config(name, Some(pod_userns(host)));
    let pod = env.run_pod(config.clone()).await.unwrap();
    let status = env
        .rt
        .pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: pod.clone(),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap();
    let reported = status
        .linux
        .and_then(|l| l.namespaces)
        .and_then(|n| n.options)
        .and_then(|o| o.userns_options);
    assert_eq!(reported, Some(pod_userns(host)));

    let tag = format!("{}", 7_000_000 + std::process::id());
    let ctr = env.sleeper(&pod, &config, &tag).await;
    let maps = env
        .sh(&ctr, "cat /proc/self/uid_map /proc/self/gid_map")
        .await;
    let fields: Vec<String> = maps.stdout.split_whitespace().map(String::from).collect();
    let want = format!("0 {host} {POD_IDS} 0 {host} {POD_IDS}");
    assert_eq!(fields.join(" "), want, "{}", maps.stderr);

    let ids = env.sh(&ctr, "id -u; id -g").await;
    assert_eq!(ids.stdout, "0\n0\n", "{}", ids.stderr);
    // Layers, the rootfs's root and berth's pod files belong to the pod's
    // root through idmapped mounts; the rootfs is writable.
    let owners = env
        .sh(
            &ctr,
            "stat -c '%u:%g' /bin /etc / /etc/hosts /etc/resolv.conf /etc/hostname && touch /made-here && stat -c '%u:%g' /made-here",
        )
        .await;
    assert_eq!(owners.code, 0, "{}", owners.stderr);
    assert!(
        owners.stdout.lines().all(|l| l == "0:0") && owners.stdout.lines().count() == 7,
        "{}",
        owners.stdout
    );

    let made = env.sh(&ctr, "echo made > /vol/made").await;
    assert_eq!(made.code, 0, "{}", made.stderr);
    let meta = std::fs::metadata(env.vol.join("made")).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!((meta.uid(), meta.gid()), (host, host));

    let secret = env.sh(&ctr, "echo overwritten >> /vol/secret").await;
    assert_ne!(secret.code, 0, "root in the pod wrote the host's 0600 file");
    assert!(secret.stderr.contains("denied"), "{}", secret.stderr);
    assert_eq!(
        std::fs::read_to_string(env.vol.join("secret")).unwrap(),
        "host root's\n"
    );

    let pid = host_pid_of_sleep(&tag);
    assert_eq!(status_ids(pid, "Uid:"), vec![host; 4]);
    assert_eq!(status_ids(pid, "Gid:"), vec![host; 4]);
    (pod, ctr, host)
}
