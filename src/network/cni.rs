//! CNI driver: runs standard CNI plugins (spec 1.0, also 0.3/0.4 results)
//! for each pod, as containerd and CRI-O do.
//!
//! Invoking a plugin is an exec with a JSON document on stdin and CNI_*
//! variables in the environment; it is written here rather than taken from a
//! crate because the Rust CNI crates implement the plugin side, not the
//! runtime side, and berth needs its own timeout and process-group kill.
//!
//! The conf dir is read again for every pod and for every Status call, so a
//! config that appears later (a network add-on installing itself) is used
//! without a restart. What ADD was run with is cached in
//! `<dir>/cni/<pod id>.json` before the plugins run (the intent record), and
//! DEL always uses that cached config and result, as libcni does.

use super::{NetworkConfig, NetworkError, PodNetwork, Readiness};
use crate::store::{read_json, write_json};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

const IFNAME: &str = "eth0";

pub struct Cni {
    conf_dir: PathBuf,
    bin_dirs: Vec<PathBuf>,
    timeout: Duration,
    cache: PathBuf,
}

/// A network configuration list (a single-plugin `.conf` is wrapped in one).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct ConfList {
    #[serde(rename = "cniVersion")]
    cni_version: String,
    name: String,
    #[serde(default, rename = "disableCheck")]
    disable_check: bool,
    plugins: Vec<Map<String, Value>>,
    /// Which file it came from (for messages).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    source: String,
}

/// The intent record and cache of one pod's ADD.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Cached {
    id: String,
    netns: PathBuf,
    conf: ConfList,
    cni_args: String,
    runtime_config: Value,
    /// The final ADD result, once ADD succeeded.
    result: Option<Value>,
}

fn conf_err(m: String) -> NetworkError {
    NetworkError::CniConfig(m)
}

/// Loads the first config file (by name) of `dir`.
fn load_conf(dir: &Path) -> Result<ConfList, NetworkError> {
    let rd = std::fs::read_dir(dir)
        .map_err(|e| conf_err(format!("no network config: read {}: {e}", dir.display())))?;
    let mut files: Vec<PathBuf> = rd
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && p.extension()
                    .is_some_and(|x| x == "conflist" || x == "conf" || x == "json")
        })
        .collect();
    files.sort();
    let Some(p) = files.first() else {
        return Err(conf_err(format!(
            "no network config found in {}",
            dir.display()
        )));
    };
    let text =
        std::fs::read_to_string(p).map_err(|e| conf_err(format!("read {}: {e}", p.display())))?;
    let v: Value =
        serde_json::from_str(&text).map_err(|e| conf_err(format!("parse {}: {e}", p.display())))?;
    let mut list = if p.extension().is_some_and(|x| x == "conflist") {
        serde_json::from_value::<ConfList>(v)
            .map_err(|e| conf_err(format!("{}: {e}", p.display())))?
    } else {
        let Value::Object(plugin) = v else {
            return Err(conf_err(format!("{}: not a JSON object", p.display())));
        };
        let s = |k: &str| {
            plugin
                .get(k)
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string()
        };
        ConfList {
            cni_version: s("cniVersion"),
            name: s("name"),
            disable_check: false,
            plugins: vec![plugin],
            source: String::new(),
        }
    };
    list.source = p.display().to_string();
    if list.name.is_empty() || list.plugins.is_empty() {
        return Err(conf_err(format!(
            "{}: needs a name and plugins",
            p.display()
        )));
    }
    for pl in &list.plugins {
        if pl
            .get("type")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
        {
            return Err(conf_err(format!("{}: a plugin has no type", p.display())));
        }
    }
    Ok(list)
}

fn plugin_type(p: &Map<String, Value>) -> &str {
    p.get("type").and_then(Value::as_str).unwrap_or("")
}

/// CNI versions before 0.4.0 have no CHECK.
fn supports_check(version: &str) -> bool {
    let mut it = version.split('.').map(|n| n.parse::<u32>().unwrap_or(0));
    (it.next().unwrap_or(0), it.next().unwrap_or(0)) >= (0, 4)
}

/// The addresses of a result: `ips` (0.3.0 and later) or `ip4`/`ip6` (0.2.0).
fn result_ips(result: &Value) -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut push = |cidr: Option<&str>| {
        if let Some(ip) = cidr
            .and_then(|c| c.split('/').next())
            .and_then(|a| a.parse::<IpAddr>().ok())
        {
            out.push(ip);
        }
    };
    if let Some(ips) = result.get("ips").and_then(Value::as_array) {
        for i in ips {
            push(i.get("address").and_then(Value::as_str));
        }
    }
    for k in ["ip4", "ip6"] {
        push(
            result
                .get(k)
                .and_then(|v| v.get("ip"))
                .and_then(Value::as_str),
        );
    }
    // IPv4 first: kubelet takes the first address as the pod IP.
    out.sort_by_key(|ip| ip.is_ipv6());
    out
}

impl Cni {
    pub fn new(cfg: &NetworkConfig, dir: &Path) -> Cni {
        Cni {
            conf_dir: cfg.cni_conf_dir.clone(),
            bin_dirs: cfg.cni_bin_dirs.clone(),
            timeout: Duration::from_secs(cfg.cni_plugin_timeout_secs),
            cache: dir.join("cni"),
        }
    }

    fn cache_path(&self, id: &str) -> PathBuf {
        self.cache.join(format!("{id}.json"))
    }

    fn find_plugin(&self, ty: &str) -> Option<PathBuf> {
        if ty.contains('/') {
            return None;
        }
        self.bin_dirs
            .iter()
            .map(|d| d.join(ty))
            .find(|p| p.is_file())
    }

    pub fn readiness(&self) -> Readiness {
        let list = match load_conf(&self.conf_dir) {
            Ok(l) => l,
            Err(e) => {
                return Readiness::not_ready(
                    "NetworkPluginNotReady",
                    format!("cni config uninitialized: {e}"),
                )
            }
        };
        let missing: Vec<&str> = list
            .plugins
            .iter()
            .map(plugin_type)
            .filter(|t| self.find_plugin(t).is_none())
            .collect();
        if !missing.is_empty() {
            return Readiness::not_ready(
                "NetworkPluginNotReady",
                format!(
                    "CNI plugins {missing:?} of {} not found in {:?}",
                    list.source, self.bin_dirs
                ),
            );
        }
        Readiness::ready()
    }

    pub fn setup(&self, pod: &PodNetwork) -> Result<Vec<IpAddr>, NetworkError> {
        let conf =
            load_conf(&self.conf_dir).map_err(|e| NetworkError::NotReady(format!("CNI: {e}")))?;
        let mut rc = Map::new();
        let ports: Vec<Value> = pod
            .ports
            .iter()
            .map(|p| {
                let mut m = json!({
                    "hostPort": p.host_port,
                    "containerPort": p.container_port,
                    "protocol": p.protocol.to_string().to_lowercase(),
                });
                if let Some(ip) = p.host_ip {
                    m["hostIP"] = json!(ip.to_string());
                }
                m
            })
            .collect();
        rc.insert("portMappings".into(), Value::Array(ports));
        if let Some(d) = &pod.dns {
            rc.insert(
                "dns".into(),
                json!({"servers": d.servers, "searches": d.searches, "options": d.options}),
            );
        }
        let cached = Cached {
            id: pod.id.clone(),
            netns: pod.netns.clone(),
            conf,
            cni_args: format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID={}",
                pod.namespace, pod.name, pod.id, pod.uid
            ),
            runtime_config: Value::Object(rc),
            result: None,
        };
        std::fs::create_dir_all(&self.cache).map_err(|source| NetworkError::Io {
            what: format!("create {}", self.cache.display()),
            source,
        })?;
        write_json(&self.cache_path(&pod.id), &cached)?;
        crate::failpoint::hit("net-after-record");
        match self.run_list(&cached, "ADD") {
            Ok(result) => {
                crate::failpoint::hit("net-cni-after-add");
                let ips = result_ips(&result);
                let mut done = cached;
                done.result = Some(result);
                write_json(&self.cache_path(&pod.id), &done)?;
                tracing::info!(pod = %pod.id, ?ips, network = %done.conf.name, "pod network up (CNI)");
                Ok(ips)
            }
            Err(e) => {
                if let Err(cleanup) = self.teardown(&pod.id, &pod.netns) {
                    tracing::error!(pod = %pod.id, error = %cleanup, "CNI DEL after a failed ADD");
                }
                Err(e)
            }
        }
    }

    pub fn teardown(&self, id: &str, _netns: &Path) -> Result<(), NetworkError> {
        let path = self.cache_path(id);
        // Without a cache entry ADD was never attempted: nothing to undo.
        let Some(cached) = read_json::<Cached>(&path)? else {
            return Ok(());
        };
        self.run_list(&cached, "DEL")?;
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(NetworkError::Io {
                what: format!("remove {}", path.display()),
                source: e,
            }),
            _ => {
                tracing::info!(pod = %id, "pod network down (CNI)");
                Ok(())
            }
        }
    }

    pub fn reconcile(&self, live: &BTreeMap<String, PathBuf>) {
        let Ok(rd) = std::fs::read_dir(&self.cache) else {
            return;
        };
        for e in rd.flatten() {
            let p = e.path();
            let Some(id) = p
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".json"))
                .map(str::to_string)
            else {
                continue;
            };
            let cached = match read_json::<Cached>(&p) {
                Ok(Some(c)) => c,
                _ => continue,
            };
            if !live.contains_key(&id) {
                tracing::warn!(pod = %id, "removing the CNI network of a pod that no longer exists");
                if let Err(err) = self.teardown(&id, &cached.netns) {
                    tracing::error!(pod = %id, error = %err, "CNI DEL of a stale pod");
                }
            } else if cached.result.is_some()
                && !cached.conf.disable_check
                && supports_check(&cached.conf.cni_version)
            {
                if let Err(err) = self.run_list(&cached, "CHECK") {
                    tracing::warn!(pod = %id, error = %err, "CNI CHECK failed for a running pod");
                }
            }
        }
    }

    /// Runs every plugin of the list: in order for ADD and CHECK, in reverse
    /// for DEL; returns the last plugin's result (ADD).
    fn run_list(&self, c: &Cached, command: &str) -> Result<Value, NetworkError> {
        let mut prev = if command == "ADD" {
            None
        } else {
            c.result.clone()
        };
        let mut order: Vec<&Map<String, Value>> = c.conf.plugins.iter().collect();
        if command == "DEL" {
            order.reverse();
        }
        for plugin in order {
            let mut conf = plugin.clone();
            conf.insert("name".into(), json!(c.conf.name));
            conf.insert("cniVersion".into(), json!(c.conf.cni_version));
            if let Some(p) = &prev {
                conf.insert("prevResult".into(), p.clone());
            }
            // Only the capabilities a plugin declares reach it.
            let caps = plugin.get("capabilities").and_then(Value::as_object);
            let rc: Map<String, Value> = c
                .runtime_config
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(k, _)| {
                    caps.and_then(|m| m.get(k.as_str()))
                        .and_then(Value::as_bool)
                        .unwrap_or(false)
                })
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            if !rc.is_empty() {
                conf.insert("runtimeConfig".into(), Value::Object(rc));
            }
            let out = self.invoke(plugin_type(plugin), command, c, &Value::Object(conf))?;
            if command == "ADD" {
                prev = Some(out);
            }
        }
        Ok(prev.unwrap_or(Value::Null))
    }

    fn invoke(
        &self,
        ty: &str,
        command: &str,
        c: &Cached,
        conf: &Value,
    ) -> Result<Value, NetworkError> {
        let fail = |message: String| NetworkError::Cni {
            plugin: ty.to_string(),
            command: command.to_string(),
            message,
        };
        let bin = self
            .find_plugin(ty)
            .ok_or_else(|| fail(format!("not found in {:?}", self.bin_dirs)))?;
        let path = std::env::join_paths(&self.bin_dirs).unwrap_or_default();
        let mut child = Command::new(&bin)
            .env_clear()
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &c.id)
            .env("CNI_NETNS", &c.netns)
            .env("CNI_IFNAME", IFNAME)
            .env("CNI_ARGS", &c.cni_args)
            .env("CNI_PATH", &path)
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group, so a timeout kills whatever it started.
            .process_group(0)
            .spawn()
            .map_err(|e| fail(format!("start {}: {e}", bin.display())))?;
        let pid = child.id() as i32;
        let input = serde_json::to_vec(conf).unwrap_or_default();
        let stdin = child.stdin.take();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            if let Some(mut s) = stdin {
                let _ = s.write_all(&input);
            }
            let _ = tx.send(child.wait_with_output());
        });
        let out = match rx.recv_timeout(self.timeout) {
            Ok(r) => r.map_err(|e| fail(format!("wait: {e}")))?,
            Err(_) => {
                // The child is not reaped until the waiting thread returns,
                // so its pid (and group) cannot have been reused.
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
                let _ = rx.recv_timeout(Duration::from_secs(5));
                return Err(fail(format!(
                    "timed out after {:?} and was killed",
                    self.timeout
                )));
            }
        };
        if !out.status.success() {
            let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
            let msg = match (v.get("msg").and_then(Value::as_str), v.get("code")) {
                (Some(m), code) => {
                    let details = v.get("details").and_then(Value::as_str).unwrap_or("");
                    format!(
                        "error {}: {m}{}",
                        code.map(|c| c.to_string()).unwrap_or_default(),
                        if details.is_empty() {
                            String::new()
                        } else {
                            format!(" ({details})")
                        }
                    )
                }
                _ => format!(
                    "{}: {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            };
            return Err(fail(msg));
        }
        if command != "ADD" {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&out.stdout).map_err(|e| fail(format!("unreadable result: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_first_config_and_wraps_single_plugins() {
        let d = tempfile::tempdir().unwrap();
        assert!(load_conf(d.path()).is_err());
        std::fs::write(
            d.path().join("20-b.conf"),
            r#"{"cniVersion":"1.0.0","name":"b","type":"bridge"}"#,
        )
        .unwrap();
        std::fs::write(
            d.path().join("10-a.conflist"),
            r#"{"cniVersion":"1.0.0","name":"a","plugins":[{"type":"bridge"},{"type":"portmap"}]}"#,
        )
        .unwrap();
        let l = load_conf(d.path()).unwrap();
        assert_eq!((l.name.as_str(), l.plugins.len()), ("a", 2));
        std::fs::remove_file(d.path().join("10-a.conflist")).unwrap();
        let l = load_conf(d.path()).unwrap();
        assert_eq!(
            (l.name.as_str(), plugin_type(&l.plugins[0])),
            ("b", "bridge")
        );
    }

    #[test]
    fn result_addresses() {
        let r = json!({"ips":[{"address":"fd00::5/64"},{"address":"10.22.0.5/24","gateway":"10.22.0.1"}]});
        assert_eq!(
            result_ips(&r),
            vec![
                "10.22.0.5".parse::<IpAddr>().unwrap(),
                "fd00::5".parse().unwrap()
            ]
        );
        assert!(supports_check("1.0.0") && supports_check("0.4.0") && !supports_check("0.3.1"));
    }
}
