//! ImageService through the CRI socket, against real registries.

mod common;

use common::*;
use cri_proto::v1 as cri;
use cri_proto::v1::image_service_client::ImageServiceClient;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use tonic::transport::Channel;
use tonic::Code;

/// docker.io and the local registry itself both point at 127.0.0.1:5000 over HTTP.
const LOCAL_REGISTRIES: &str = r#"
[[registry]]
prefix = "docker.io"
location = "127.0.0.1:5000"
insecure = true

[[registry]]
location = "127.0.0.1:5000"
insecure = true
"#;

fn spec(image: &str) -> Option<cri::ImageSpec> {
    Some(cri::ImageSpec {
        image: image.to_string(),
        ..Default::default()
    })
}

async fn pull(c: &mut ImageServiceClient<Channel>, image: &str) -> Result<String, tonic::Status> {
    pull_auth(c, image, None).await
}

async fn pull_auth(
    c: &mut ImageServiceClient<Channel>,
    image: &str,
    auth: Option<cri::AuthConfig>,
) -> Result<String, tonic::Status> {
    c.pull_image(cri::PullImageRequest {
        image: spec(image),
        auth,
        sandbox_config: None,
    })
    .await
    .map(|r| r.into_inner().image_ref)
}

async fn status(c: &mut ImageServiceClient<Channel>, image: &str) -> Option<cri::Image> {
    c.image_status(cri::ImageStatusRequest {
        image: spec(image),
        verbose: false,
    })
    .await
    .expect("ImageStatus")
    .into_inner()
    .image
}

async fn list(c: &mut ImageServiceClient<Channel>) -> Vec<cri::Image> {
    c.list_images(cri::ListImagesRequest { filter: None })
        .await
        .expect("ListImages")
        .into_inner()
        .images
}

async fn remove(c: &mut ImageServiceClient<Channel>, image: &str) {
    c.remove_image(cri::RemoveImageRequest { image: spec(image) })
        .await
        .unwrap_or_else(|e| panic!("RemoveImage {image}: {e}"));
}

/// The manifest digest the test image's layout says it has.
fn top_digest(image: &str) -> String {
    layout_top_descriptor(image)["digest"]
        .as_str()
        .unwrap()
        .to_string()
}

fn config_digest(image: &str) -> String {
    let m = layout_json(image, &top_digest(image));
    m["config"]["digest"].as_str().unwrap().to_string()
}

fn layers_dir(berth: &Berth) -> PathBuf {
    berth.root.join("layers")
}

/// Unpacked layer directories (without staging dirs).
fn layer_dirs(berth: &Berth) -> Vec<PathBuf> {
    std::fs::read_dir(layers_dir(berth))
        .unwrap()
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .map(|e| e.path())
        .collect()
}

/// The unpacked layer dir that holds `rel` (searched top to bottom is not
/// needed: test images add each path in one layer only).
fn find_in_layers(berth: &Berth, rel: &str) -> Option<PathBuf> {
    layer_dirs(berth)
        .into_iter()
        .map(|d| d.join(rel))
        .find(|p| p.symlink_metadata().is_ok())
}

fn dir_entries(p: &Path) -> usize {
    std::fs::read_dir(p).map(|r| r.count()).unwrap_or(0)
}

/// Nothing of a failed or interrupted pull is left in berth's temp areas.
fn assert_no_partials(berth: &Berth) {
    for d in ["content/ingest", "layers/.staging"] {
        let p = berth.root.join(d);
        assert_eq!(dir_entries(&p), 0, "leftovers in {}", p.display());
    }
}

struct Env {
    berth: Berth,
    reg: Registry,
    ns: Netns,
}

fn start_local(images: &[(&str, &str)]) -> Env {
    let ns = Netns::new();
    let reg = Registry::start(&ns, RegistryOpts::default());
    for (image, dest) in images {
        reg.push(image, dest);
    }
    let berth = Berth::start(
        &ns,
        BerthOpts {
            registries_conf: Some(LOCAL_REGISTRIES.into()),
            ..Default::default()
        },
    );
    Env { berth, reg, ns }
}

impl Env {
    fn finish(self) {
        let dir = self.berth.dir.clone();
        let Env { berth, reg, ns } = self;
        drop(berth);
        drop(reg);
        ns.assert_no_leaks(&dir);
        drop(ns);
        assert_no_leaks(&dir);
    }
}

#[tokio::test]
async fn reference_forms_and_lookups() {
    let env = start_local(&[
        ("busybox", "library/busybox:latest"),
        ("busybox", "team/busybox:v1"),
    ]);
    let mut c = env.berth.image_client().await;
    let id = config_digest("busybox");
    let digest = top_digest("busybox");

    assert_eq!(pull(&mut c, "busybox").await.unwrap(), id);
    let img = status(&mut c, "busybox").await.expect("busybox present");
    assert_eq!(img.id, id);
    assert_eq!(img.repo_tags, vec!["docker.io/library/busybox:latest"]);
    assert_eq!(
        img.repo_digests,
        vec![format!("docker.io/library/busybox@{digest}")]
    );
    let manifest = layout_json("busybox", &digest);
    let layer_size: u64 = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["size"].as_u64().unwrap())
        .sum();
    assert_eq!(img.size, layer_size, "size is the sum of compressed layers");
    assert!(!img.pinned);

    // host:port/path:tag, name@digest, name:tag@digest all name the same image.
    assert_eq!(
        pull(&mut c, "127.0.0.1:5000/team/busybox:v1")
            .await
            .unwrap(),
        id
    );
    assert_eq!(
        pull(&mut c, &format!("127.0.0.1:5000/team/busybox@{digest}"))
            .await
            .unwrap(),
        id
    );
    assert_eq!(
        pull(
            &mut c,
            &format!("docker.io/library/busybox:latest@{digest}")
        )
        .await
        .unwrap(),
        id
    );
    let img = status(&mut c, &id).await.expect("by id");
    let mut tags = img.repo_tags.clone();
    tags.sort();
    assert_eq!(
        tags,
        vec![
            "127.0.0.1:5000/team/busybox:v1",
            "docker.io/library/busybox:latest"
        ]
    );
    assert!(img
        .repo_digests
        .contains(&format!("127.0.0.1:5000/team/busybox@{digest}")));

    // Lookups: id, id prefix (with and without sha256:), tag, digest.
    let hex = id.strip_prefix("sha256:").unwrap();
    for q in [
        id.clone(),
        hex[..12].to_string(),
        format!("sha256:{}", &hex[..12]),
        "docker.io/library/busybox".into(),
        "library/busybox:latest".into(),
        format!("busybox@{digest}"),
    ] {
        assert_eq!(
            status(&mut c, &q).await.map(|i| i.id),
            Some(id.clone()),
            "lookup {q}"
        );
    }
    // Absent images are no error; invalid references are.
    assert!(status(&mut c, "nothere:latest").await.is_none());
    let e = pull(&mut c, "Invalid/Ref:!").await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("Invalid/Ref:!"), "{}", e.message());
    let e = pull(&mut c, "").await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = pull(&mut c, "127.0.0.1:5000/nope:latest")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(
        e.message().contains("127.0.0.1:5000/nope:latest"),
        "{}",
        e.message()
    );

    // Filtered list; verbose status carries the config.
    let filtered = c
        .list_images(cri::ListImagesRequest {
            filter: Some(cri::ImageFilter {
                image: spec("127.0.0.1:5000/team/busybox:v1"),
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .images;
    assert_eq!(filtered.len(), 1);
    assert_eq!(list(&mut c).await.len(), 1);
    let verbose = c
        .image_status(cri::ImageStatusRequest {
            image: spec("busybox"),
            verbose: true,
        })
        .await
        .unwrap()
        .into_inner();
    let info: serde_json::Value = serde_json::from_str(&verbose.info["info"]).unwrap();
    assert_eq!(info["imageSpec"]["architecture"], "amd64");
    assert_eq!(info["imageSpec"]["config"]["Cmd"][0], "sh");
    env.finish();
}

#[tokio::test]
async fn formats_and_layer_contents() {
    let env = start_local(&[
        ("multiarch", "multi:latest"),
        ("zstd", "zstd:latest"),
        ("uncompressed", "plain:latest"),
        ("layered", "layered:latest"),
        ("user-numeric", "user-numeric:latest"),
        ("user-named", "user-named:latest"),
        ("devnode", "devnode:latest"),
    ]);
    env.reg.push_v2s2("busybox", "v2s2:latest");
    let mut c = env.berth.image_client().await;
    let b = &env.berth;

    // An index resolves to linux/amd64; the repo digest is the index's.
    pull(&mut c, "127.0.0.1:5000/multi:latest").await.unwrap();
    let img = status(&mut c, "127.0.0.1:5000/multi").await.unwrap();
    assert_eq!(
        img.repo_digests,
        vec![format!("127.0.0.1:5000/multi@{}", top_digest("multiarch"))]
    );
    let arch = find_in_layers(b, "arch").expect("/arch unpacked");
    assert_eq!(std::fs::read_to_string(arch).unwrap(), "amd64\n");

    for image in ["zstd", "plain", "v2s2"] {
        pull(&mut c, &format!("127.0.0.1:5000/{image}:latest"))
            .await
            .unwrap_or_else(|e| panic!("pull {image}: {e}"));
    }
    assert!(find_in_layers(b, "zstd-marker").is_some());

    let img = status(&mut c, "127.0.0.1:5000/v2s2:latest").await.unwrap();
    assert_eq!(img.id, config_digest("busybox"), "same config as busybox");

    pull(&mut c, "127.0.0.1:5000/user-numeric").await.unwrap();
    pull(&mut c, "127.0.0.1:5000/user-named").await.unwrap();
    let n = status(&mut c, "127.0.0.1:5000/user-numeric").await.unwrap();
    assert_eq!(n.uid.map(|u| u.value), Some(1000));
    assert_eq!(n.username, "");
    let n = status(&mut c, "127.0.0.1:5000/user-named").await.unwrap();
    assert_eq!(n.uid, None);
    assert_eq!(n.username, "app");

    // Whiteouts, opaque dirs, ownership, modes, xattrs, links.
    pull(&mut c, "127.0.0.1:5000/layered").await.unwrap();
    let wh = find_in_layers(b, "data/b").expect("whiteout for data/b");
    let m = wh.symlink_metadata().unwrap();
    assert!(
        m.file_type().is_char_device() && m.rdev() == 0,
        "data/b is a 0/0 whiteout"
    );
    let keep_dirs: Vec<PathBuf> = layer_dirs(b)
        .into_iter()
        .map(|d| d.join("keep"))
        .filter(|p| p.join("y").exists())
        .collect();
    assert_eq!(keep_dirs.len(), 1);
    let opaque = xattr(&keep_dirs[0], "trusted.overlay.opaque");
    assert_eq!(opaque.as_deref(), Some(&b"y"[..]));
    let suid = find_in_layers(b, "bin/suid-test").unwrap();
    assert_eq!(suid.metadata().unwrap().mode() & 0o7777, 0o4755);
    let owned = find_in_layers(b, "home/app/owned").unwrap();
    let m = owned.metadata().unwrap();
    assert_eq!((m.uid(), m.gid()), (1000, 1000));
    let a = find_in_layers(b, "data/a").unwrap();
    assert_eq!(xattr(&a, "user.berth").as_deref(), Some(&b"test"[..]));
    let hard = a.parent().unwrap().join("hard");
    assert_eq!(hard.metadata().unwrap().ino(), a.metadata().unwrap().ino());
    let link = a.parent().unwrap().join("link");
    assert_eq!(std::fs::read_link(link).unwrap(), PathBuf::from("a"));
    assert!(a
        .parent()
        .unwrap()
        .join("fifo")
        .metadata()
        .unwrap()
        .file_type()
        .is_fifo());
    assert_eq!(a.metadata().unwrap().mtime(), 1_700_000_000);

    // Device nodes in a layer are skipped, the pull succeeds.
    pull(&mut c, "127.0.0.1:5000/devnode").await.unwrap();
    assert!(find_in_layers(b, "devnode-ok").is_some());
    assert!(find_in_layers(b, "dev/evil-null").is_none());
    assert!(find_in_layers(b, "dev/evil-sda").is_none());
    assert!(b.log().contains("evil-sda"), "skipped device is logged");

    // Shared layers: removing one image keeps layers another one uses.
    let before = layer_dirs(b).len();
    remove(&mut c, "127.0.0.1:5000/layered").await;
    let after = layer_dirs(b).len();
    assert_eq!(before - after, 3, "layered's own 3 layers are reclaimed");
    assert!(status(&mut c, "127.0.0.1:5000/plain").await.is_some());
    env.finish();
}

fn xattr(p: &Path, name: &str) -> Option<Vec<u8>> {
    let out = std::process::Command::new("getfattr")
        .args(["--absolute-names", "--only-values", "-h", "-n", name])
        .arg(p)
        .output()
        .ok()?;
    out.status.success().then_some(out.stdout)
}

#[tokio::test]
async fn remove_is_by_any_name_and_idempotent() {
    let env = start_local(&[("busybox", "a/one:1"), ("busybox", "b/two:2")]);
    let mut c = env.berth.image_client().await;
    pull(&mut c, "127.0.0.1:5000/a/one:1").await.unwrap();
    pull(&mut c, "127.0.0.1:5000/b/two:2").await.unwrap();
    assert_eq!(
        status(&mut c, "127.0.0.1:5000/a/one:1")
            .await
            .unwrap()
            .repo_tags
            .len(),
        2
    );
    assert!(!layer_dirs(&env.berth).is_empty());
    remove(&mut c, "127.0.0.1:5000/b/two:2").await;
    assert!(
        status(&mut c, "127.0.0.1:5000/a/one:1").await.is_none(),
        "all tags gone"
    );
    assert!(list(&mut c).await.is_empty());
    assert!(layer_dirs(&env.berth).is_empty(), "layers reclaimed");
    let blobs = env.berth.root.join("content/sha256");
    assert_eq!(dir_entries(&blobs), 0, "blobs reclaimed");
    // Again, and an image that never existed, and by id: all fine.
    remove(&mut c, "127.0.0.1:5000/b/two:2").await;
    remove(&mut c, "never/was:here").await;
    remove(&mut c, &config_digest("busybox")).await;
    // ImageFsInfo reports berth's own directories.
    pull(&mut c, "127.0.0.1:5000/a/one:1").await.unwrap();
    let fs = c
        .image_fs_info(cri::ImageFsInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    let img = &fs.image_filesystems[0];
    assert!(img
        .fs_id
        .as_ref()
        .unwrap()
        .mountpoint
        .starts_with(env.berth.root.to_str().unwrap()));
    assert!(
        img.used_bytes.as_ref().unwrap().value > 500_000,
        "busybox is ~1 MB"
    );
    assert!(img.inodes_used.as_ref().unwrap().value > 10);
    assert!(img.timestamp > 0);
    assert_eq!(fs.container_filesystems.len(), 1);
    env.finish();
}

#[tokio::test]
async fn mirrors_keep_the_requested_name() {
    let ns = Netns::new();
    let reg = Registry::start(&ns, RegistryOpts::default());
    reg.push("busybox", "k8s-mirror/pause:3.10");
    let conf = r#"
[[registry]]
prefix = "registry.k8s.io"
location = "registry.k8s.io"
[[registry.mirror]]
location = "127.0.0.1:5999/down"
insecure = true
[[registry.mirror]]
location = "127.0.0.1:5000/k8s-mirror"
insecure = true

[[registry]]
location = "blocked.example.com"
blocked = true
"#;
    let berth = Berth::start(
        &ns,
        BerthOpts {
            registries_conf: Some(conf.into()),
            ..Default::default()
        },
    );
    let mut c = berth.image_client().await;
    assert_eq!(
        pull(&mut c, "registry.k8s.io/pause:3.10").await.unwrap(),
        config_digest("busybox")
    );
    let img = status(&mut c, "registry.k8s.io/pause:3.10").await.unwrap();
    assert_eq!(img.repo_tags, vec!["registry.k8s.io/pause:3.10"]);
    assert_eq!(
        img.repo_digests,
        vec![format!("registry.k8s.io/pause@{}", top_digest("busybox"))]
    );
    let e = pull(&mut c, "blocked.example.com/x:1").await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("blocked"), "{}", e.message());
    let dir = berth.dir.clone();
    drop(berth);
    drop(reg);
    ns.assert_no_leaks(&dir);
}

#[tokio::test]
async fn tls_and_basic_auth() {
    let ns = Netns::new();
    let reg = Registry::start(
        &ns,
        RegistryOpts {
            port: 5001,
            tls: true,
            basic_auth: Some(("alice".into(), "s3cret".into())),
            ..Default::default()
        },
    );
    reg.push("busybox", "private/app:1");
    let ca = reg.ca_pem.clone().unwrap();
    let berth = Berth::start(
        &ns,
        BerthOpts {
            config_toml: format!("[image]\nca_files = [\"{}\"]\n", ca.display()),
            ..Default::default()
        },
    );
    let mut c = berth.image_client().await;
    let image = "127.0.0.1:5001/private/app:1";
    let e = pull(&mut c, image).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "anonymous: {e:?}");
    let creds = |user: &str, pass: &str| cri::AuthConfig {
        username: user.into(),
        password: pass.into(),
        ..Default::default()
    };
    let e = pull_auth(&mut c, image, Some(creds("alice", "wrong")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "wrong password: {e:?}");
    assert!(list(&mut c).await.is_empty());
    pull_auth(&mut c, image, Some(creds("alice", "s3cret")))
        .await
        .unwrap();
    remove(&mut c, image).await;
    // The `auth` form: base64 of user:password.
    use base64::Engine;
    let auth = cri::AuthConfig {
        auth: base64::engine::general_purpose::STANDARD.encode("alice:s3cret"),
        ..Default::default()
    };
    pull_auth(&mut c, image, Some(auth)).await.unwrap();
    assert!(status(&mut c, image).await.is_some());
    drop(c);

    // Without trusting the CA, TLS fails and says so.
    let untrusting = Berth::start(&ns, BerthOpts::default());
    let mut c = untrusting.image_client().await;
    let e = pull_auth(&mut c, image, Some(creds("alice", "s3cret")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    let dirs = [berth.dir.clone(), untrusting.dir.clone()];
    drop(untrusting);
    drop(berth);
    drop(reg);
    for d in dirs {
        ns.assert_no_leaks(&d);
    }
}

#[tokio::test]
async fn corrupted_blob_is_rejected_and_nothing_is_kept() {
    let env = start_local(&[("layered", "layered:latest"), ("busybox", "busybox:latest")]);
    // Corrupt the top layer in the registry's storage, keeping its size.
    let manifest = layout_json("layered", &top_digest("layered"));
    let top = manifest["layers"].as_array().unwrap().last().unwrap()["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let path = env.reg.blob_path(&top);
    let mut data = std::fs::read(&path).unwrap();
    let mid = data.len() / 2;
    data[mid] ^= 0xff;
    std::fs::write(&path, &data).unwrap();

    let mut c = env.berth.image_client().await;
    let e = pull(&mut c, "127.0.0.1:5000/layered").await.unwrap_err();
    assert_eq!(e.code(), Code::DataLoss, "{e:?}");
    assert!(
        e.message().contains(&top),
        "names the blob: {}",
        e.message()
    );
    assert!(list(&mut c).await.is_empty(), "no image visible");
    assert!(!env
        .berth
        .root
        .join("content/sha256")
        .join(&top[7..])
        .exists());
    assert_no_partials(&env.berth);
    // The daemon is fine and other pulls work.
    pull(&mut c, "127.0.0.1:5000/busybox").await.unwrap();
    env.finish();
}

#[tokio::test]
async fn evil_layers_fail_without_writing_outside() {
    let evil = [
        ("evil-abs", "evil-abs-pwned"),
        ("evil-dotdot", "evil-dotdot-pwned"),
        ("evil-symlink", "escape/evil-symlink-pwned"),
        ("evil-symlink-lower", "escape/evil-lower-pwned"),
        ("evil-hardlink", "passwd-link"),
        ("evil-hardlink-dotdot", "x"),
    ];
    let pushes: Vec<(&str, String)> = evil
        .iter()
        .map(|(i, _)| (*i, format!("{i}:latest")))
        .collect();
    let pushes: Vec<(&str, &str)> = pushes.iter().map(|(i, d)| (*i, d.as_str())).collect();
    let env = start_local(&pushes);
    let mut c = env.berth.image_client().await;
    let passwd_links = std::fs::metadata("/etc/passwd").unwrap().nlink();
    for (image, entry) in evil {
        let e = pull(&mut c, &format!("127.0.0.1:5000/{image}"))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{image}: {e:?}");
        let first = entry.split('/').next_back().unwrap();
        assert!(
            e.message().contains(first),
            "{image}: error names the entry {entry:?}: {}",
            e.message()
        );
        assert!(list(&mut c).await.is_empty(), "{image}: no image visible");
        assert_no_partials(&env.berth);
    }
    for f in [
        "/evil-abs-pwned",
        "/tmp/evil-dotdot-pwned",
        "/tmp/evil-symlink-pwned",
        "/tmp/evil-lower-pwned",
    ] {
        assert!(!Path::new(f).exists(), "{f} was written outside the layer");
    }
    assert_eq!(
        std::fs::metadata("/etc/passwd").unwrap().nlink(),
        passwd_links
    );
    env.finish();
}

#[tokio::test]
async fn concurrent_pulls_share_downloads() {
    let env = start_local(&[
        ("busybox", "busybox:latest"),
        ("layered", "layered:latest"),
        ("zstd", "zstd:latest"),
    ]);
    let mut tasks = Vec::new();
    for image in [
        "busybox", "busybox", "busybox", "layered", "layered", "zstd",
    ] {
        let mut c = env.berth.image_client().await;
        tasks.push(tokio::spawn(async move {
            pull(&mut c, &format!("127.0.0.1:5000/{image}")).await
        }));
    }
    for t in tasks {
        t.await.unwrap().expect("concurrent pull");
    }
    let mut c = env.berth.image_client().await;
    assert_eq!(list(&mut c).await.len(), 3);
    // busybox's layer is shared by all three images: downloaded once.
    let bb_layer = layout_json("busybox", &top_digest("busybox"))["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let downloads = env
        .berth
        .log()
        .lines()
        .filter(|l| l.contains("blob downloaded") && l.contains(&bb_layer))
        .count();
    assert_eq!(downloads, 1, "busybox layer downloaded {downloads} times");
    env.finish();
}

#[tokio::test]
async fn kill_during_pull_then_clean_pull() {
    let mut env = start_local(&[("layered", "layered:latest"), ("multiarch", "multi:latest")]);
    for delay_ms in [0u64, 5, 20, 60, 150] {
        let c = env.berth.image_client().await;
        let pulling = tokio::spawn(async move {
            let mut c = c;
            pull(&mut c, "127.0.0.1:5000/layered").await
        });
        tokio::time::sleep(std::time::Duration::from_millis(delay_ms)).await;
        env.berth.kill9();
        let _ = pulling.await;
        env.berth.restart();
        let mut c = env.berth.image_client().await;
        // Either the pull completed before the kill, or nothing of it is visible.
        let images = list(&mut c).await;
        assert!(images.len() <= 1);
        assert_no_partials(&env.berth);
        pull(&mut c, "127.0.0.1:5000/layered").await.unwrap();
        remove(&mut c, "127.0.0.1:5000/layered").await;
        assert!(
            layer_dirs(&env.berth).is_empty(),
            "delay {delay_ms}: layers left"
        );
    }
    env.finish();
}

#[tokio::test]
async fn bearer_token_challenge_and_registry_token() {
    let ns = Netns::new();
    let tmp = tempfile::tempdir().unwrap();
    let tokens = token_server::TokenServer::start(&ns, tmp.path(), 5003, "alice", "s3cret");
    let reg = Registry::start(
        &ns,
        RegistryOpts {
            port: 5002,
            basic_auth: Some(("alice".into(), "s3cret".into())),
            token_auth: Some((tokens.realm.clone(), tokens.cert_pem.clone())),
            ..Default::default()
        },
    );
    reg.push("busybox", "private/tok:1");
    let berth = Berth::start(
        &ns,
        BerthOpts {
            registries_conf: Some(
                "[[registry]]\nlocation = \"127.0.0.1:5002\"\ninsecure = true\n".into(),
            ),
            ..Default::default()
        },
    );
    let mut c = berth.image_client().await;
    let image = "127.0.0.1:5002/private/tok:1";
    let e = pull(&mut c, image).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "anonymous: {e:?}");
    let before = tokens.issued.load(std::sync::atomic::Ordering::Relaxed);
    let creds = cri::AuthConfig {
        username: "alice".into(),
        password: "s3cret".into(),
        ..Default::default()
    };
    pull_auth(&mut c, image, Some(creds)).await.unwrap();
    assert!(
        tokens.issued.load(std::sync::atomic::Ordering::Relaxed) > before,
        "berth fetched a token from the realm"
    );
    remove(&mut c, image).await;
    // A registry token (as kubelet passes one) is sent as the bearer directly.
    let token = cri::AuthConfig {
        registry_token: tokens.mint("private/tok"),
        ..Default::default()
    };
    pull_auth(&mut c, image, Some(token)).await.unwrap();
    assert!(status(&mut c, image).await.is_some());
    let bad = cri::AuthConfig {
        registry_token: "not-a-token".into(),
        ..Default::default()
    };
    remove(&mut c, image).await;
    let e = pull_auth(&mut c, image, Some(bad)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "bad token: {e:?}");
    // An identity token is an OAuth2 refresh token, traded at the realm.
    let identity = |t: &str| cri::AuthConfig {
        identity_token: t.into(),
        ..Default::default()
    };
    pull_auth(&mut c, image, Some(identity(token_server::REFRESH_TOKEN)))
        .await
        .unwrap();
    remove(&mut c, image).await;
    let e = pull_auth(&mut c, image, Some(identity("stale")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "bad identity token: {e:?}");
    assert!(e.message().contains("identity token"), "{}", e.message());
    let dir = berth.dir.clone();
    drop(c);
    drop(berth);
    drop(reg);
    drop(tokens);
    ns.assert_no_leaks(&dir);
}
