//! Manifests, indexes and image configs as registries serve them: media
//! types, parsing with size and digest checks, and the platform choice.

use super::PullError;
use serde::Deserialize;
use sha2::{Digest, Sha256};

const MAX_MANIFEST_BYTES: usize = 4 << 20;

pub const MT_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MT_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MT_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const MT_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

#[derive(Deserialize)]
pub(super) struct Descriptor {
    #[serde(rename = "mediaType", default)]
    pub(super) media_type: String,
    pub(super) digest: String,
    pub(super) size: u64,
    #[serde(default)]
    pub(super) platform: Option<Platform>,
}

#[derive(Deserialize, Default)]
pub(super) struct Platform {
    #[serde(default)]
    pub(super) architecture: String,
    #[serde(default)]
    pub(super) os: String,
    #[serde(default)]
    pub(super) variant: String,
}

#[derive(Deserialize)]
pub(super) struct Manifest {
    #[serde(rename = "schemaVersion", default)]
    pub(super) schema_version: i64,
    #[serde(rename = "mediaType", default)]
    pub(super) media_type: String,
    #[serde(default)]
    pub(super) config: Option<Descriptor>,
    #[serde(default)]
    pub(super) layers: Option<Vec<Descriptor>>,
    #[serde(default)]
    pub(super) manifests: Option<Vec<Descriptor>>,
}

#[derive(Deserialize, Default)]
pub(super) struct ImageConfigJson {
    #[serde(default)]
    pub(super) config: Option<ContainerConfigJson>,
    #[serde(default)]
    pub(super) rootfs: Option<RootFs>,
}

#[derive(Deserialize, Default)]
pub(super) struct ContainerConfigJson {
    #[serde(rename = "User", default)]
    pub(super) user: Option<String>,
}

#[derive(Deserialize, Default)]
pub(super) struct RootFs {
    #[serde(default)]
    pub(super) diff_ids: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Compression {
    None,
    Gzip,
    Zstd,
}

pub(super) fn layer_compression(media_type: &str) -> Option<Compression> {
    match media_type {
        "application/vnd.oci.image.layer.v1.tar"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar" => Some(Compression::None),
        "application/vnd.oci.image.layer.v1.tar+gzip"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
        | "application/vnd.docker.image.rootfs.diff.tar.gzip"
        | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Some(Compression::Gzip),
        "application/vnd.oci.image.layer.v1.tar+zstd"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"
        | "application/vnd.docker.image.rootfs.diff.tar.zstd" => Some(Compression::Zstd),
        _ => None,
    }
}

pub(super) fn sha256_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

pub(super) fn verify_manifest(
    image: &str,
    bytes: &[u8],
    expected: Option<&str>,
) -> Result<String, PullError> {
    if bytes.len() > MAX_MANIFEST_BYTES {
        return Err(PullError::Unsupported {
            image: image.to_string(),
            detail: format!("manifest of {} bytes is too large", bytes.len()),
        });
    }
    let actual = format!("sha256:{}", sha256_hex(bytes));
    if let Some(e) = expected {
        if e != actual {
            return Err(PullError::Integrity {
                image: image.to_string(),
                what: "manifest",
                digest: e.to_string(),
                detail: format!("content hashes to {actual}"),
            });
        }
    }
    Ok(actual)
}

pub(super) fn parse_manifest(image: &str, bytes: &[u8]) -> Result<Manifest, PullError> {
    let m: Manifest = serde_json::from_slice(bytes).map_err(|e| PullError::Unsupported {
        image: image.to_string(),
        detail: format!("manifest is not valid JSON: {e}"),
    })?;
    if m.schema_version != 2 {
        return Err(PullError::Unsupported {
            image: image.to_string(),
            detail: format!(
                "manifest schema version {} (only Docker schema 2 and OCI manifests are supported)",
                m.schema_version
            ),
        });
    }
    if !m.media_type.is_empty()
        && ![
            MT_OCI_MANIFEST,
            MT_OCI_INDEX,
            MT_DOCKER_MANIFEST,
            MT_DOCKER_LIST,
        ]
        .contains(&m.media_type.as_str())
    {
        return Err(PullError::Unsupported {
            image: image.to_string(),
            detail: format!("manifest media type {:?}", m.media_type),
        });
    }
    Ok(m)
}

/// This machine as OCI names it: (architecture, preferred variant).
pub fn host_arch() -> (&'static str, &'static str) {
    match std::env::consts::ARCH {
        "x86_64" => ("amd64", ""),
        "aarch64" => ("arm64", "v8"),
        "arm" => ("arm", "v7"),
        "x86" => ("386", ""),
        "powerpc64" => ("ppc64le", ""),
        "s390x" => ("s390x", ""),
        "riscv64" => ("riscv64", ""),
        other => (other, ""),
    }
}

pub(super) fn choose_platform(entries: &[Descriptor]) -> Option<String> {
    let (arch, variant) = host_arch();
    let candidates: Vec<&Descriptor> = entries
        .iter()
        .filter(|e| {
            e.platform
                .as_ref()
                .is_some_and(|p| p.os == "linux" && p.architecture == arch)
        })
        .collect();
    let score = |d: &&Descriptor| {
        let v = d
            .platform
            .as_ref()
            .map(|p| p.variant.as_str())
            .unwrap_or("");
        if v == variant {
            2
        } else if v.is_empty() || (arch == "amd64" && v == "v1") {
            1
        } else {
            0
        }
    };
    candidates
        .iter()
        .max_by_key(|d| score(d))
        .filter(|d| score(d) > 0 || candidates.len() == 1)
        .map(|d| d.digest.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(arch: &str, variant: &str, d: &str) -> Descriptor {
        Descriptor {
            media_type: MT_OCI_MANIFEST.into(),
            digest: d.into(),
            size: 1,
            platform: Some(Platform {
                architecture: arch.into(),
                os: "linux".into(),
                variant: variant.into(),
            }),
        }
    }

    #[test]
    fn platform_choice() {
        let e = vec![
            desc("arm64", "v8", "a"),
            desc("amd64", "", "b"),
            desc("arm", "v7", "c"),
        ];
        assert_eq!(choose_platform(&e).as_deref(), Some("b"));
        let e = vec![desc("arm64", "", "a")];
        assert_eq!(choose_platform(&e), None);
    }

    #[test]
    fn manifest_checks() {
        let m = br#"{"schemaVersion":1,"name":"x"}"#;
        assert!(matches!(
            parse_manifest("i", m),
            Err(PullError::Unsupported { .. })
        ));
        let ok = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"x","digest":"sha256:00","size":1},"layers":[]}"#;
        assert!(parse_manifest("i", ok).is_ok());
        let d = verify_manifest("i", ok, None).unwrap();
        assert!(verify_manifest("i", ok, Some(&d)).is_ok());
        let wrong = format!("sha256:{}", "0".repeat(64));
        assert!(matches!(
            verify_manifest("i", ok, Some(&wrong)),
            Err(PullError::Integrity { .. })
        ));
    }
}
