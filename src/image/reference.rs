//! Image references, normalised the way kubelet and containerd name images:
//! `busybox` -> `docker.io/library/busybox:latest`.
//!
//! Written by hand: the grammar is small, and berth needs exact control over
//! normalisation and error messages (the registry client's parser differs in
//! details such as `index.docker.io` handling).

use std::fmt;

pub const DEFAULT_DOMAIN: &str = "docker.io";
const LEGACY_DOMAIN: &str = "index.docker.io";
const MAX_NAME_LEN: usize = 255;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid image reference {reference:?}: {reason}")]
pub struct ReferenceError {
    pub reference: String,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ImageRef {
    /// Registry host with optional port, e.g. `docker.io`, `127.0.0.1:5000`.
    pub domain: String,
    /// Repository path, e.g. `library/busybox`.
    pub path: String,
    pub tag: Option<String>,
    /// `sha256:<hex>`.
    pub digest: Option<String>,
}

impl ImageRef {
    pub fn parse(s: &str) -> Result<ImageRef, ReferenceError> {
        let err = |reason: &str| ReferenceError {
            reference: s.to_string(),
            reason: reason.to_string(),
        };
        if s.is_empty() {
            return Err(err("empty reference"));
        }
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => (r, Some(parse_digest(d).map_err(|r| err(&r))?)),
            None => (s, None),
        };
        // A ':' after the last '/' starts the tag; earlier ones belong to a port.
        let last_slash = rest.rfind('/').map(|i| i + 1).unwrap_or(0);
        let (name, tag) = match rest[last_slash..].find(':') {
            Some(i) => {
                let i = last_slash + i;
                (&rest[..i], Some(rest[i + 1..].to_string()))
            }
            None => (rest, None),
        };
        if let Some(t) = &tag {
            if !valid_tag(t) {
                return Err(err(&format!("invalid tag {t:?}")));
            }
        }
        if name.is_empty() {
            return Err(err("empty repository name"));
        }
        let (mut domain, mut path) = match name.split_once('/') {
            Some((first, remainder))
                if first.contains(['.', ':'])
                    || first == "localhost"
                    || first.chars().any(|c| c.is_ascii_uppercase()) =>
            {
                (first.to_string(), remainder.to_string())
            }
            _ => (DEFAULT_DOMAIN.to_string(), name.to_string()),
        };
        if domain == LEGACY_DOMAIN {
            domain = DEFAULT_DOMAIN.to_string();
        }
        if domain == DEFAULT_DOMAIN && !path.contains('/') {
            path = format!("library/{path}");
        }
        if !valid_domain(&domain) {
            return Err(err(&format!("invalid registry host {domain:?}")));
        }
        for comp in path.split('/') {
            if !valid_path_component(comp) {
                return Err(err(&format!(
                    "invalid repository path component {comp:?} (lowercase letters, digits and separators . _ __ - only)"
                )));
            }
        }
        if domain.len() + 1 + path.len() > MAX_NAME_LEN {
            return Err(err("repository name longer than 255 characters"));
        }
        let tag = match (tag, &digest) {
            (None, None) => Some("latest".to_string()),
            (t, _) => t,
        };
        Ok(ImageRef {
            domain,
            path,
            tag,
            digest,
        })
    }

    /// `domain/path`, without tag or digest.
    pub fn name(&self) -> String {
        format!("{}/{}", self.domain, self.path)
    }

    /// `domain/path:tag`, when the reference has a tag.
    pub fn tagged(&self) -> Option<String> {
        self.tag.as_ref().map(|t| format!("{}:{t}", self.name()))
    }

    /// `domain/path@digest` for a given manifest digest.
    pub fn with_digest(&self, digest: &str) -> String {
        format!("{}@{digest}", self.name())
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.name())?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

/// Validates `sha256:<64 lowercase hex>` and returns it.
pub fn parse_digest(d: &str) -> Result<String, String> {
    match d.split_once(':') {
        Some(("sha256", hex)) if is_hex(hex) && hex.len() == 64 => Ok(d.to_string()),
        Some(("sha256", _)) => Err(format!(
            "invalid digest {d:?}: expected 64 lowercase hex characters"
        )),
        Some((alg, _)) => Err(format!("unsupported digest algorithm {alg:?}")),
        None => Err(format!("invalid digest {d:?}")),
    }
}

pub fn is_hex(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn valid_tag(t: &str) -> bool {
    let b = t.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b[1..]
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

fn valid_domain(d: &str) -> bool {
    let (host, port) = match d.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (d, None),
    };
    if let Some(p) = port {
        if p.is_empty() || !p.bytes().all(|c| c.is_ascii_digit()) || p.len() > 5 {
            return false;
        }
    }
    !host.is_empty()
        && host.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// `[a-z0-9]+` runs joined by `.`, `_`, `__` or any number of `-`.
fn valid_path_component(c: &str) -> bool {
    let b = c.as_bytes();
    if b.is_empty() || !is_alnum(b[0]) || !is_alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if is_alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !is_alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

fn is_alnum(c: u8) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit()
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

    fn norm(s: &str) -> String {
        ImageRef::parse(s).unwrap().to_string()
    }

    #[test]
    fn normalises_like_kubelet() {
        assert_eq!(norm("busybox"), "docker.io/library/busybox:latest");
        assert_eq!(norm("busybox:1.36"), "docker.io/library/busybox:1.36");
        assert_eq!(norm("library/busybox"), "docker.io/library/busybox:latest");
        assert_eq!(norm("user/app:v1"), "docker.io/user/app:v1");
        assert_eq!(
            norm("index.docker.io/busybox"),
            "docker.io/library/busybox:latest"
        );
        assert_eq!(
            norm("registry.k8s.io/pause:3.10"),
            "registry.k8s.io/pause:3.10"
        );
        assert_eq!(norm("127.0.0.1:5000/a/b/c:tag"), "127.0.0.1:5000/a/b/c:tag");
        assert_eq!(norm("localhost/app"), "localhost/app:latest");
        assert_eq!(
            norm(&format!("busybox@{D}")),
            format!("docker.io/library/busybox@{D}")
        );
        assert_eq!(
            norm(&format!("busybox:1@{D}")),
            format!("docker.io/library/busybox:1@{D}")
        );
        assert_eq!(
            norm(&format!("127.0.0.1:5000/x@{D}")),
            format!("127.0.0.1:5000/x@{D}")
        );
    }

    #[test]
    fn parts() {
        let r = ImageRef::parse("127.0.0.1:5000/team/app:v2").unwrap();
        assert_eq!(r.domain, "127.0.0.1:5000");
        assert_eq!(r.path, "team/app");
        assert_eq!(r.tag.as_deref(), Some("v2"));
        assert_eq!(r.tagged().unwrap(), "127.0.0.1:5000/team/app:v2");
        assert_eq!(r.with_digest(D), format!("127.0.0.1:5000/team/app@{D}"));
    }

    #[test]
    fn rejects_invalid() {
        for bad in [
            "",
            "Busybox",
            "busybox:",
            "busybox:-bad",
            "busybox@sha256:abc",
            "busybox@md5:aaaa",
            "a//b",
            "a/b/",
            "-a",
            "a..b",
            "host:port/x",
            "busybox:tag:extra",
            "UPPER/x/Y",
        ] {
            let e = ImageRef::parse(bad);
            assert!(e.is_err(), "{bad:?} should be rejected, got {e:?}");
        }
        let e = ImageRef::parse("Bad").unwrap_err();
        assert!(e.to_string().contains("\"Bad\""), "{e}");
    }

    #[test]
    fn separators() {
        assert!(valid_path_component("a_b"));
        assert!(valid_path_component("a__b"));
        assert!(valid_path_component("a---b"));
        assert!(valid_path_component("a.b"));
        assert!(!valid_path_component("a___b"));
        assert!(!valid_path_component("a._b"));
    }
}
