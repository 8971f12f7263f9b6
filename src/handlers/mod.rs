//! RuntimeClass handlers: the runtimes a pod's `runtime_handler` can pick.
//! The empty name is berth's built-in runtime; the config may add more, each
//! either the built-in runtime with its own settings or an external OCI
//! runtime binary (runc, crun, youki...) that berth drives through its CLI
//! (see [`oci`]) while its own monitor keeps owning logs and exit status.

pub mod oci;

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub use oci::OciRuntime;

#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    #[error("runtime handler {name:?}: {reason}")]
    Invalid { name: String, reason: String },
    #[error("runtime handler {name:?}: create its state directory {path}: {source}")]
    StateDir {
        name: String,
        path: String,
        source: std::io::Error,
    },
}

/// `[runtime]` in the config.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeConfig {
    /// `[runtime.handlers.<name>]`: the handlers besides the default one.
    pub handlers: BTreeMap<String, HandlerConfig>,
}

/// One `[runtime.handlers.<name>]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum HandlerConfig {
    Builtin(BuiltinConfig),
    Oci(OciConfig),
}

/// The built-in runtime with its own defaults.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BuiltinConfig {
    /// Pods of this handler may ask for a user namespace (advertised in
    /// Status as features.user_namespaces).
    pub user_namespaces: bool,
    /// Capabilities a non-privileged container starts from before its
    /// security context adds or drops any; unset: containerd's default set.
    pub default_capabilities: Option<Vec<String>>,
}

impl Default for BuiltinConfig {
    /// berth's own runtime: user namespaces where the kernel allows them.
    fn default() -> Self {
        BuiltinConfig {
            user_namespaces: true,
            default_capabilities: None,
        }
    }
}

/// An external OCI runtime.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OciConfig {
    /// Absolute path of the runtime binary.
    pub binary: PathBuf,
    /// The runtime's own state directory (`--root`); default
    /// `<state_dir>/runtimes/<name>`.
    #[serde(default)]
    pub root: Option<PathBuf>,
    /// Extra global arguments, given before the command.
    #[serde(default)]
    pub args: Vec<String>,
    /// Who makes the container's cgroup.
    #[serde(default)]
    pub cgroup_manager: CgroupManager,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CgroupManager {
    /// The runtime puts the container in berth's cgroup for it (cgroupfs
    /// driver, as berth's own runtime).
    #[default]
    Cgroupfs,
    /// No cgroups at all (crun's `--cgroup-manager=disabled`): for hosts
    /// whose cgroups berth must not touch. runc cannot run this way.
    Disabled,
}

/// A RuntimeClass handler name is a DNS label (as Kubernetes validates
/// RuntimeClass.handler).
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

impl RuntimeConfig {
    /// Checks what needs no external program (names, paths).
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        for (name, h) in &self.handlers {
            let key = "runtime.handlers";
            if name.is_empty() {
                if !matches!(h, HandlerConfig::Builtin(_)) {
                    return Err((
                        key,
                        "the default handler \"\" is berth's built-in runtime; \
                         only its built-in settings can be configured"
                            .into(),
                    ));
                }
            } else if !valid_name(name) {
                return Err((
                    key,
                    format!("handler name {name:?} is not a DNS label (a-z, 0-9, '-', at most 63)"),
                ));
            }
            if let HandlerConfig::Oci(o) = h {
                if !o.binary.is_absolute() {
                    return Err((
                        key,
                        format!(
                            "handler {name:?}: binary {} is not an absolute path",
                            o.binary.display()
                        ),
                    ));
                }
                if o.root.as_ref().is_some_and(|r| !r.is_absolute()) {
                    return Err((
                        key,
                        format!("handler {name:?}: root is not an absolute path"),
                    ));
                }
            }
            if let HandlerConfig::Builtin(b) = h {
                for c in b.default_capabilities.iter().flatten() {
                    if c.parse::<caps::Capability>().is_err() {
                        return Err((key, format!("handler {name:?}: unknown capability {c:?}")));
                    }
                }
            }
        }
        Ok(())
    }
}

/// What a handler runs containers with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Builtin(BuiltinConfig),
    Oci(OciRuntime),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handler {
    pub name: String,
    pub kind: Kind,
}

impl Handler {
    /// The external runtime, for a delegating handler.
    pub fn oci(&self) -> Option<&OciRuntime> {
        match &self.kind {
            Kind::Oci(r) => Some(r),
            Kind::Builtin(_) => None,
        }
    }

    pub fn builtin(&self) -> Option<&BuiltinConfig> {
        match &self.kind {
            Kind::Builtin(b) => Some(b),
            Kind::Oci(_) => None,
        }
    }
}

/// Every configured handler, checked at startup.
#[derive(Debug, Clone)]
pub struct Handlers {
    list: Vec<Handler>,
}

impl Handlers {
    /// Resolves the config: each OCI runtime must answer `--version`, and
    /// gets its state directory.
    pub fn load(cfg: &RuntimeConfig, state_dir: &Path) -> Result<Handlers, HandlerError> {
        let mut list = Vec::new();
        if !cfg.handlers.contains_key("") {
            list.push(Handler {
                name: String::new(),
                kind: Kind::Builtin(BuiltinConfig::default()),
            });
        }
        for (name, h) in &cfg.handlers {
            let kind = match h {
                HandlerConfig::Builtin(b) => Kind::Builtin(b.clone()),
                HandlerConfig::Oci(o) => {
                    let root = o
                        .root
                        .clone()
                        .unwrap_or_else(|| state_dir.join("runtimes").join(name));
                    std::fs::create_dir_all(&root).map_err(|source| HandlerError::StateDir {
                        name: name.clone(),
                        path: root.display().to_string(),
                        source,
                    })?;
                    let rt = OciRuntime::probe(name, o, root).map_err(|reason| {
                        HandlerError::Invalid {
                            name: name.clone(),
                            reason,
                        }
                    })?;
                    Kind::Oci(rt)
                }
            };
            list.push(Handler {
                name: name.clone(),
                kind,
            });
        }
        list.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Handlers { list })
    }

    pub fn get(&self, name: &str) -> Option<&Handler> {
        self.list.iter().find(|h| h.name == name)
    }

    pub fn all(&self) -> &[Handler] {
        &self.list
    }

    /// The known names, quoted, for error messages.
    pub fn names(&self) -> String {
        self.list
            .iter()
            .map(|h| format!("{:?}", h.name))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml_text: &str) -> Result<RuntimeConfig, toml::de::Error> {
        toml::from_str(toml_text)
    }

    #[test]
    fn handler_tables_parse() {
        let c = parse(
            "[handlers.crun]\ntype = \"oci\"\nbinary = \"/usr/bin/crun\"\n\
             cgroup_manager = \"disabled\"\nargs = [\"--debug\"]\n\
             [handlers.strict]\ntype = \"builtin\"\nuser_namespaces = true\n\
             default_capabilities = [\"CAP_CHOWN\"]\n",
        )
        .unwrap();
        assert_eq!(
            c.handlers["crun"],
            HandlerConfig::Oci(OciConfig {
                binary: "/usr/bin/crun".into(),
                root: None,
                args: vec!["--debug".into()],
                cgroup_manager: CgroupManager::Disabled,
            })
        );
        assert!(matches!(&c.handlers["strict"], HandlerConfig::Builtin(b) if b.user_namespaces));
        c.validate().unwrap();
    }

    #[test]
    fn bad_handlers_are_rejected() {
        assert!(parse("[handlers.x]\ntype = \"oci\"\nbinary = \"/b\"\nbinaryy = 1\n").is_err());
        assert!(parse("[handlers.x]\ntype = \"kata\"\n").is_err());
        assert!(parse("[handlers.x]\nbinary = \"/b\"\n").is_err());
        for (text, needle) in [
            ("[handlers.X]\ntype = \"builtin\"\n", "DNS label"),
            (
                "[handlers.r]\ntype = \"oci\"\nbinary = \"runc\"\n",
                "absolute",
            ),
            (
                "[handlers.\"\"]\ntype = \"oci\"\nbinary = \"/b\"\n",
                "default handler",
            ),
            (
                "[handlers.b]\ntype = \"builtin\"\ndefault_capabilities = [\"CAP_NOPE\"]\n",
                "CAP_NOPE",
            ),
        ] {
            let e = parse(text).unwrap().validate().unwrap_err();
            assert!(e.1.contains(needle), "{text}: {}", e.1);
        }
    }

    #[test]
    fn missing_binary_fails_load() {
        let dir = tempfile::tempdir().unwrap();
        let c = parse("[handlers.gone]\ntype = \"oci\"\nbinary = \"/nonexistent/runc\"\n").unwrap();
        let e = Handlers::load(&c, dir.path()).unwrap_err().to_string();
        assert!(e.contains("gone") && e.contains("/nonexistent/runc"), "{e}");
    }

    #[test]
    fn default_handler_is_always_there() {
        let dir = tempfile::tempdir().unwrap();
        let h = Handlers::load(&RuntimeConfig::default(), dir.path()).unwrap();
        assert_eq!(h.names(), "\"\"");
        assert!(h.get("").unwrap().builtin().is_some());
        assert!(h.get("runc").is_none());
    }
}
