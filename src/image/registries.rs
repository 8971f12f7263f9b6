//! containers-registries.conf(5) version 2: per-prefix registry settings and
//! mirrors. Only the keys that change where berth pulls from are honoured;
//! others (unqualified-search-registries, aliases, ...) are accepted and ignored.

use super::reference::ImageRef;
use serde::Deserialize;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum RegistriesError {
    #[error("read registries config {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("parse registries config {path}: {source}")]
    Parse {
        path: String,
        source: Box<toml::de::Error>,
    },
    #[error("registries config {path}: {reason}")]
    Invalid { path: String, reason: String },
}

#[derive(Debug, Default, Clone, Deserialize)]
pub struct RegistriesConf {
    #[serde(default)]
    registry: Vec<RegistryEntry>,
}

#[derive(Debug, Default, Clone, Deserialize)]
struct RegistryEntry {
    #[serde(default)]
    prefix: String,
    #[serde(default)]
    location: String,
    #[serde(default)]
    insecure: bool,
    #[serde(default)]
    blocked: bool,
    #[serde(default, rename = "mirror-by-digest-only")]
    mirror_by_digest_only: bool,
    #[serde(default)]
    mirror: Vec<MirrorEntry>,
}

#[derive(Debug, Default, Clone, Deserialize)]
struct MirrorEntry {
    location: String,
    #[serde(default)]
    insecure: bool,
    /// "all" (default), "digest-only" or "tag-only".
    #[serde(default, rename = "pull-from-mirror")]
    pull_from_mirror: String,
}

/// One place to try for a pull: the reference rewritten for that registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub reference: ImageRef,
    /// Plain HTTP instead of HTTPS.
    pub insecure: bool,
    pub mirror: bool,
}

/// Where a reference may be pulled from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    Blocked { prefix: String },
    Endpoints(Vec<Endpoint>),
}

impl RegistriesConf {
    /// Loads the file; a missing file means "no special settings".
    pub fn load(path: &Path) -> Result<RegistriesConf, RegistriesError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(RegistriesConf::default())
            }
            Err(source) => {
                return Err(RegistriesError::Read {
                    path: path.display().to_string(),
                    source,
                })
            }
        };
        Self::parse(&text).map_err(|e| match e {
            RegistriesError::Parse { source, .. } => RegistriesError::Parse {
                path: path.display().to_string(),
                source,
            },
            RegistriesError::Invalid { reason, .. } => RegistriesError::Invalid {
                path: path.display().to_string(),
                reason,
            },
            other => other,
        })
    }

    pub fn parse(text: &str) -> Result<RegistriesConf, RegistriesError> {
        let mut conf: RegistriesConf =
            toml::from_str(text).map_err(|source| RegistriesError::Parse {
                path: String::new(),
                source: Box::new(source),
            })?;
        for r in &mut conf.registry {
            if r.prefix.is_empty() {
                r.prefix = r.location.clone();
            }
            if r.prefix.is_empty() {
                return Err(RegistriesError::Invalid {
                    path: String::new(),
                    reason: "a [[registry]] needs a prefix or a location".into(),
                });
            }
            if r.location.is_empty() && !r.prefix.starts_with("*.") {
                r.location = r.prefix.clone();
            }
            for m in &r.mirror {
                if m.location.is_empty() {
                    return Err(RegistriesError::Invalid {
                        path: String::new(),
                        reason: format!("a mirror of {} has no location", r.prefix),
                    });
                }
            }
        }
        Ok(conf)
    }

    /// Endpoints for `r`, mirrors first, in the order the file lists them.
    pub fn resolve(&self, r: &ImageRef) -> Resolution {
        let name = r.name();
        let entry = self
            .registry
            .iter()
            .filter(|e| prefix_matches(&e.prefix, &name))
            .max_by_key(|e| e.prefix.len());
        let Some(entry) = entry else {
            return Resolution::Endpoints(vec![Endpoint {
                reference: r.clone(),
                insecure: false,
                mirror: false,
            }]);
        };
        if entry.blocked {
            return Resolution::Blocked {
                prefix: entry.prefix.clone(),
            };
        }
        let rewrite = |location: &str| -> Option<ImageRef> {
            if entry.prefix.starts_with("*.") {
                // Wildcard prefixes match whole hosts; the location replaces the host.
                if location.is_empty() {
                    return Some(r.clone());
                }
                let rest = name.split_once('/').map(|x| x.1).unwrap_or("");
                return rewrite_name(r, &format!("{location}/{rest}"));
            }
            let suffix = &name[entry.prefix.len()..];
            rewrite_name(r, &format!("{location}{suffix}"))
        };
        let by_digest = r.digest.is_some();
        let mut out = Vec::new();
        if !entry.mirror_by_digest_only || by_digest {
            for m in &entry.mirror {
                let allowed = match m.pull_from_mirror.as_str() {
                    "digest-only" => by_digest,
                    "tag-only" => !by_digest,
                    _ => true,
                };
                if let (true, Some(reference)) = (allowed, rewrite(&m.location)) {
                    out.push(Endpoint {
                        reference,
                        insecure: m.insecure,
                        mirror: true,
                    });
                }
            }
        }
        if let Some(reference) = rewrite(&entry.location) {
            out.push(Endpoint {
                reference,
                insecure: entry.insecure,
                mirror: false,
            });
        }
        Resolution::Endpoints(out)
    }
}

fn prefix_matches(prefix: &str, name: &str) -> bool {
    if let Some(domain_suffix) = prefix.strip_prefix("*.") {
        let host = name.split('/').next().unwrap_or("");
        return host.ends_with(&format!(".{domain_suffix}"));
    }
    name == prefix
        || (name.starts_with(prefix)
            && (prefix.ends_with('/') || name.as_bytes().get(prefix.len()) == Some(&b'/')))
}

/// Re-parses `domain/path` with the tag and digest of `r`.
fn rewrite_name(r: &ImageRef, new_name: &str) -> Option<ImageRef> {
    let mut s = new_name.to_string();
    if let Some(t) = &r.tag {
        s.push(':');
        s.push_str(t);
    }
    if let Some(d) = &r.digest {
        s.push('@');
        s.push_str(d);
    }
    let mut parsed = ImageRef::parse(&s).ok()?;
    // A rewritten name keeps the caller's tag/digest choice exactly.
    parsed.tag = r.tag.clone();
    parsed.digest = r.digest.clone();
    Some(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONF: &str = r#"
unqualified-search-registries = ["docker.io"]

[[registry]]
prefix = "registry.k8s.io"
location = "registry.k8s.io"
[[registry.mirror]]
location = "127.0.0.1:5000/k8s-mirror"
insecure = true
[[registry.mirror]]
location = "mirror2.example.com"

[[registry]]
location = "blocked.example.com"
blocked = true

[[registry]]
prefix = "docker.io/library"
location = "127.0.0.1:5001/hub"
insecure = true

[[registry]]
prefix = "*.corp.example"
location = "proxy.example:8443"
mirror-by-digest-only = true
[[registry.mirror]]
location = "m.example"
"#;

    fn refs(res: Resolution) -> Vec<(String, bool)> {
        match res {
            Resolution::Endpoints(e) => e
                .into_iter()
                .map(|e| (e.reference.to_string(), e.insecure))
                .collect(),
            Resolution::Blocked { prefix } => vec![(format!("blocked {prefix}"), false)],
        }
    }

    #[test]
    fn mirrors_then_location() {
        let c = RegistriesConf::parse(CONF).unwrap();
        let r = ImageRef::parse("registry.k8s.io/pause:3.10").unwrap();
        assert_eq!(
            refs(c.resolve(&r)),
            vec![
                ("127.0.0.1:5000/k8s-mirror/pause:3.10".to_string(), true),
                ("mirror2.example.com/pause:3.10".to_string(), false),
                ("registry.k8s.io/pause:3.10".to_string(), false),
            ]
        );
    }

    #[test]
    fn blocked_and_unmatched() {
        let c = RegistriesConf::parse(CONF).unwrap();
        let r = ImageRef::parse("blocked.example.com/x").unwrap();
        assert_eq!(
            c.resolve(&r),
            Resolution::Blocked {
                prefix: "blocked.example.com".into()
            }
        );
        let r = ImageRef::parse("quay.io/x/y:1").unwrap();
        assert_eq!(refs(c.resolve(&r)), vec![("quay.io/x/y:1".into(), false)]);
        // Prefix match is per path component: docker.io/libraryx is not docker.io/library.
        let r = ImageRef::parse("docker.io/libraryx/y").unwrap();
        assert_eq!(
            refs(c.resolve(&r)),
            vec![("docker.io/libraryx/y:latest".into(), false)]
        );
    }

    #[test]
    fn location_rewrite() {
        let c = RegistriesConf::parse(CONF).unwrap();
        let r = ImageRef::parse("busybox").unwrap();
        assert_eq!(
            refs(c.resolve(&r)),
            vec![("127.0.0.1:5001/hub/busybox:latest".into(), true)]
        );
    }

    #[test]
    fn wildcard_and_digest_only() {
        let c = RegistriesConf::parse(CONF).unwrap();
        let r = ImageRef::parse("a.corp.example/team/app:v1").unwrap();
        assert_eq!(
            refs(c.resolve(&r)),
            vec![("proxy.example:8443/team/app:v1".into(), false)]
        );
        let d = "sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
        let r = ImageRef::parse(&format!("a.corp.example/team/app@{d}")).unwrap();
        assert_eq!(
            refs(c.resolve(&r)),
            vec![
                (format!("m.example/team/app@{d}"), false),
                (format!("proxy.example:8443/team/app@{d}"), false)
            ]
        );
    }

    #[test]
    fn bad_files() {
        assert!(RegistriesConf::parse("[[registry]]\ninsecure = true\n").is_err());
        assert!(RegistriesConf::parse("[[registry]\n").is_err());
        let dir = tempfile::tempdir().unwrap();
        let c = RegistriesConf::load(&dir.path().join("absent.conf")).unwrap();
        assert!(c.registry.is_empty());
    }
}
