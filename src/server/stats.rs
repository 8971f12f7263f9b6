//! Stats and metrics RPCs: container and pod samples -> CRI ContainerStats,
//! PodSandboxStats and cAdvisor-style metrics (kubelet's CRI metrics
//! collector turns ListMetricDescriptors + ListPodSandboxMetrics into its
//! /metrics/cadvisor output).

use super::Daemon;
use crate::cgroup::stats::{NetDevice, Psi, PsiLine, Usage};
use crate::container::stats::ContainerSample;
use crate::container::{ContainerFilter, ContainerRecord};
use crate::pod::stats::PodSample;
use crate::pod::{PodFilter, PodRecord};
use cri_proto::v1 as cri;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use tonic::Status;

/// A pod with its sample and those of its containers.
struct PodView {
    pod: PodRecord,
    sample: PodSample,
    containers: Vec<(ContainerRecord, ContainerSample)>,
}

async fn blocking<T: Send + 'static>(
    d: &Arc<Daemon>,
    f: impl FnOnce(&Daemon) -> Result<T, Status> + Send + 'static,
) -> Result<T, Status> {
    let d = d.clone();
    tokio::task::spawn_blocking(move || f(&d))
        .await
        .map_err(|e| Status::internal(format!("stats task: {e}")))?
}

fn required(rpc: &str, field: &str, v: &str) -> Result<(), Status> {
    if v.is_empty() {
        return Err(Status::invalid_argument(format!(
            "{rpc}: {field} is required"
        )));
    }
    Ok(())
}

/// Forgets cached rates and walks of removed containers and pods.
fn prune(d: &Daemon) {
    let ctrs: HashSet<String> = d
        .containers
        .list(&ContainerFilter::default())
        .into_iter()
        .map(|c| c.id)
        .collect();
    d.container_stats.retain(&ctrs);
    let pods: HashSet<String> = d
        .pods
        .list(&PodFilter::default())
        .into_iter()
        .map(|p| p.id)
        .collect();
    d.pod_stats.retain(&pods);
}

fn view(d: &Daemon, pod: PodRecord) -> PodView {
    let containers: Vec<(ContainerRecord, ContainerSample)> = d
        .containers
        .list(&ContainerFilter {
            pod_id: Some(pod.id.clone()),
            ..Default::default()
        })
        .into_iter()
        .filter(|c| c.pod_id == pod.id)
        .map(|c| {
            let s = d.container_stats.sample(&c);
            (c, s)
        })
        .collect();
    let usages: Vec<&Usage> = containers.iter().map(|(_, s)| &s.usage).collect();
    let sample = d.pod_stats.sample(&pod, &usages);
    PodView {
        pod,
        sample,
        containers,
    }
}

pub async fn container_stats(
    d: &Arc<Daemon>,
    req: cri::ContainerStatsRequest,
) -> Result<cri::ContainerStatsResponse, Status> {
    required("ContainerStats", "container_id", &req.container_id)?;
    blocking(d, move |d| {
        let rec = d
            .containers
            .get(&req.container_id)
            .map_err(super::container::status_of)?;
        let s = d.container_stats.sample(&rec);
        Ok(cri::ContainerStatsResponse {
            stats: Some(to_container_stats(d, &rec, &s)),
        })
    })
    .await
}

pub async fn list_container_stats(
    d: &Arc<Daemon>,
    req: cri::ListContainerStatsRequest,
) -> Result<cri::ListContainerStatsResponse, Status> {
    let f = req.filter.unwrap_or_default();
    let filter = ContainerFilter {
        id: (!f.id.is_empty()).then_some(f.id),
        pod_id: (!f.pod_sandbox_id.is_empty()).then_some(f.pod_sandbox_id),
        state: None,
        labels: f.label_selector.into_iter().collect(),
    };
    blocking(d, move |d| {
        prune(d);
        let stats = d
            .containers
            .list(&filter)
            .iter()
            .map(|rec| to_container_stats(d, rec, &d.container_stats.sample(rec)))
            .collect();
        Ok(cri::ListContainerStatsResponse { stats })
    })
    .await
}

pub async fn pod_sandbox_stats(
    d: &Arc<Daemon>,
    req: cri::PodSandboxStatsRequest,
) -> Result<cri::PodSandboxStatsResponse, Status> {
    required("PodSandboxStats", "pod_sandbox_id", &req.pod_sandbox_id)?;
    blocking(d, move |d| {
        let pod = d
            .pods
            .get(&req.pod_sandbox_id)
            .map_err(super::pod::status_of)?;
        let v = view(d, pod);
        Ok(cri::PodSandboxStatsResponse {
            stats: Some(to_pod_stats(d, &v)),
        })
    })
    .await
}

pub async fn list_pod_sandbox_stats(
    d: &Arc<Daemon>,
    req: cri::ListPodSandboxStatsRequest,
) -> Result<cri::ListPodSandboxStatsResponse, Status> {
    let f = req.filter.unwrap_or_default();
    let filter = PodFilter {
        id: (!f.id.is_empty()).then_some(f.id),
        state: None,
        labels: f.label_selector.into_iter().collect(),
    };
    blocking(d, move |d| {
        prune(d);
        let stats = d
            .pods
            .list(&filter)
            .into_iter()
            .map(|p| to_pod_stats(d, &view(d, p)))
            .collect();
        Ok(cri::ListPodSandboxStatsResponse { stats })
    })
    .await
}

pub fn list_metric_descriptors() -> cri::ListMetricDescriptorsResponse {
    cri::ListMetricDescriptorsResponse {
        descriptors: DESCRIPTORS
            .iter()
            .map(|m| cri::MetricDescriptor {
                name: m.name.into(),
                help: m.help.into(),
                label_keys: BASE_LABELS
                    .iter()
                    .copied()
                    .chain(m.extra_label)
                    .map(|k| k.to_string())
                    .collect(),
            })
            .collect(),
    }
}

pub async fn list_pod_sandbox_metrics(
    d: &Arc<Daemon>,
) -> Result<cri::ListPodSandboxMetricsResponse, Status> {
    blocking(d, |d| {
        prune(d);
        let pod_metrics = d
            .pods
            .list(&PodFilter::default())
            .into_iter()
            .map(|p| pod_metrics(d, &view(d, p)))
            .collect();
        Ok(cri::ListPodSandboxMetricsResponse { pod_metrics })
    })
    .await
}

// ---------------------------------------------------------------------------
// CRI stats messages
// ---------------------------------------------------------------------------

fn u64v(v: u64) -> cri::UInt64Value {
    cri::UInt64Value { value: v }
}

fn labels(m: &BTreeMap<String, String>) -> HashMap<String, String> {
    m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

fn psi_data(l: &PsiLine) -> cri::PsiData {
    cri::PsiData {
        // The kernel counts microseconds; CRI wants nanoseconds.
        total: l.total_us.saturating_mul(1000),
        avg10: l.avg10,
        avg60: l.avg60,
        avg300: l.avg300,
    }
}

fn psi(p: &Option<Psi>) -> Option<cri::PsiStats> {
    p.as_ref().map(|p| cri::PsiStats {
        full: p.full.as_ref().map(psi_data),
        some: Some(psi_data(&p.some)),
    })
}

fn cpu(ts: i64, u: &Usage, nano_cores: Option<u64>) -> Option<cri::CpuUsage> {
    u.cpu_ns.map(|ns| cri::CpuUsage {
        timestamp: ts,
        usage_core_nano_seconds: Some(u64v(ns)),
        usage_nano_cores: nano_cores.map(u64v),
        psi: psi(&u.cpu_psi),
    })
}

fn memory(ts: i64, u: &Usage) -> Option<cri::MemoryUsage> {
    let ws = u.working_set?;
    Some(cri::MemoryUsage {
        timestamp: ts,
        working_set_bytes: Some(u64v(ws)),
        available_bytes: u.memory_limit.map(|l| u64v(l.saturating_sub(ws))),
        usage_bytes: u.memory_usage.map(u64v),
        rss_bytes: u.rss.map(u64v),
        page_faults: u.page_faults.map(u64v),
        major_page_faults: u.major_page_faults.map(u64v),
        psi: psi(&u.memory_psi),
    })
}

fn swap(ts: i64, u: &Usage) -> Option<cri::SwapUsage> {
    let used = u.swap_usage?;
    Some(cri::SwapUsage {
        timestamp: ts,
        swap_available_bytes: u.swap_limit.map(|l| u64v(l.saturating_sub(used))),
        swap_usage_bytes: Some(u64v(used)),
    })
}

fn io(ts: i64, u: &Usage) -> Option<cri::IoUsage> {
    u.io_psi.as_ref().map(|_| cri::IoUsage {
        timestamp: ts,
        psi: psi(&u.io_psi),
    })
}

fn to_container_stats(
    d: &Daemon,
    rec: &ContainerRecord,
    s: &ContainerSample,
) -> cri::ContainerStats {
    let ts = s.timestamp;
    cri::ContainerStats {
        attributes: Some(cri::ContainerAttributes {
            id: rec.id.clone(),
            metadata: Some(cri::ContainerMetadata {
                name: rec.spec.name.clone(),
                attempt: rec.spec.attempt,
            }),
            labels: labels(&rec.spec.labels),
            annotations: labels(&rec.spec.annotations),
        }),
        cpu: cpu(ts, &s.usage, s.nano_cores),
        memory: memory(ts, &s.usage),
        writable_layer: s.writable_layer.map(|l| cri::FilesystemUsage {
            timestamp: l.timestamp,
            // The filesystem holding the layer, as ImageFsInfo names it.
            fs_id: Some(cri::FilesystemIdentifier {
                mountpoint: d.images.container_fs_dir().display().to_string(),
            }),
            used_bytes: Some(u64v(l.bytes)),
            inodes_used: Some(u64v(l.inodes)),
        }),
        swap: swap(ts, &s.usage),
        io: io(ts, &s.usage),
    }
}

fn iface(n: &NetDevice) -> cri::NetworkInterfaceUsage {
    cri::NetworkInterfaceUsage {
        name: n.name.clone(),
        rx_bytes: Some(u64v(n.rx_bytes)),
        rx_errors: Some(u64v(n.rx_errors)),
        tx_bytes: Some(u64v(n.tx_bytes)),
        tx_errors: Some(u64v(n.tx_errors)),
    }
}

/// eth0 (the pod's interface by convention) is the default; without it the
/// first one. No interface at all gives no NetworkUsage: kubelet reads the
/// default interface's fields without a nil check.
fn network(ts: i64, devs: &Option<Vec<NetDevice>>) -> Option<cri::NetworkUsage> {
    let devs = devs.as_ref().filter(|d| !d.is_empty())?;
    let default = devs.iter().position(|d| d.name == "eth0").unwrap_or(0);
    Some(cri::NetworkUsage {
        timestamp: ts,
        default_interface: Some(iface(&devs[default])),
        interfaces: devs
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != default)
            .map(|(_, n)| iface(n))
            .collect(),
    })
}

fn to_pod_stats(d: &Daemon, v: &PodView) -> cri::PodSandboxStats {
    let (p, s) = (&v.pod, &v.sample);
    let ts = s.timestamp;
    cri::PodSandboxStats {
        attributes: Some(cri::PodSandboxAttributes {
            id: p.id.clone(),
            metadata: Some(cri::PodSandboxMetadata {
                name: p.spec.name.clone(),
                uid: p.spec.uid.clone(),
                namespace: p.spec.namespace.clone(),
                attempt: p.spec.attempt,
            }),
            labels: labels(&p.spec.labels),
            annotations: labels(&p.spec.annotations),
        }),
        linux: Some(cri::LinuxPodSandboxStats {
            cpu: cpu(ts, &s.usage, s.nano_cores),
            memory: memory(ts, &s.usage),
            network: network(ts, &s.network),
            process: s.usage.processes.map(|n| cri::ProcessUsage {
                timestamp: ts,
                process_count: Some(u64v(n)),
            }),
            containers: v
                .containers
                .iter()
                .map(|(rec, cs)| to_container_stats(d, rec, cs))
                .collect(),
            io: io(ts, &s.usage),
        }),
        windows: None,
    }
}

// ---------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------

/// Label keys of every metric (CRI-O's set); values: container id, container
/// name ("POD" for pod-level metrics), image.
const BASE_LABELS: [&str; 3] = ["id", "name", "image"];

struct Descriptor {
    name: &'static str,
    help: &'static str,
    extra_label: Option<&'static str>,
    counter: bool,
}

const fn desc(
    name: &'static str,
    help: &'static str,
    extra_label: Option<&'static str>,
    counter: bool,
) -> Descriptor {
    Descriptor {
        name,
        help,
        extra_label,
        counter,
    }
}

/// cAdvisor's names, help texts and label sets for what berth can measure.
/// Values are integers (CRI's Metric carries a UInt64Value): seconds are
/// whole seconds. container_fs_inodes_total is cAdvisor's filesystem inode
/// capacity, not a container's use, so it is not served.
const DESCRIPTORS: &[Descriptor] = &[
    desc("container_cpu_usage_seconds_total", "Cumulative cpu time consumed in seconds.", Some("cpu"), true),
    desc("container_cpu_user_seconds_total", "Cumulative user cpu time consumed in seconds.", None, true),
    desc("container_cpu_system_seconds_total", "Cumulative system cpu time consumed in seconds.", None, true),
    desc("container_memory_working_set_bytes", "Current working set in bytes.", None, false),
    desc("container_memory_usage_bytes", "Current memory usage in bytes, including all memory regardless of when it was accessed.", None, false),
    desc("container_memory_rss", "Size of RSS in bytes.", None, false),
    desc("container_memory_cache", "Number of bytes of page cache memory.", None, false),
    desc("container_memory_swap", "Container swap usage in bytes.", None, false),
    desc("container_spec_memory_limit_bytes", "Memory limit for the container.", None, false),
    desc("container_spec_cpu_period", "CPU period of the container.", None, false),
    desc("container_spec_cpu_quota", "CPU quota of the container.", None, false),
    desc("container_spec_cpu_shares", "CPU share of the container.", None, false),
    desc("container_processes", "Number of processes running inside the container.", None, false),
    desc("container_start_time_seconds", "Start time of the container since unix epoch in seconds.", None, false),
    desc("container_fs_usage_bytes", "Number of bytes that are consumed by the container on this filesystem.", Some("device"), false),
    desc("container_network_receive_bytes_total", "Cumulative count of bytes received.", Some("interface"), true),
    desc("container_network_receive_packets_total", "Cumulative count of packets received.", Some("interface"), true),
    desc("container_network_receive_packets_dropped_total", "Cumulative count of packets dropped while receiving.", Some("interface"), true),
    desc("container_network_receive_errors_total", "Cumulative count of errors encountered while receiving.", Some("interface"), true),
    desc("container_network_transmit_bytes_total", "Cumulative count of bytes transmitted.", Some("interface"), true),
    desc("container_network_transmit_packets_total", "Cumulative count of packets transmitted.", Some("interface"), true),
    desc("container_network_transmit_packets_dropped_total", "Cumulative count of packets dropped while transmitting.", Some("interface"), true),
    desc("container_network_transmit_errors_total", "Cumulative count of errors encountered while transmitting.", Some("interface"), true),
    desc("container_pressure_cpu_waiting_seconds_total", "Total time duration tasks in the container have waited due to CPU congestion.", None, true),
    desc("container_pressure_cpu_stalled_seconds_total", "Total time duration no tasks in the container could make progress due to CPU congestion.", None, true),
    desc("container_pressure_memory_waiting_seconds_total", "Total time duration tasks in the container have waited due to memory congestion.", None, true),
    desc("container_pressure_memory_stalled_seconds_total", "Total time duration no tasks in the container could make progress due to memory congestion.", None, true),
    desc("container_pressure_io_waiting_seconds_total", "Total time duration tasks in the container have waited due to IO congestion.", None, true),
    desc("container_pressure_io_stalled_seconds_total", "Total time duration no tasks in the container could make progress due to IO congestion.", None, true),
];

/// Builds metrics for one object (a container, or the pod as "POD").
struct Metrics<'a> {
    base: [&'a str; 3],
    out: Vec<cri::Metric>,
}

impl Metrics<'_> {
    /// `timestamp` 0 means measured now (kubelet's convention); cached
    /// values carry the time they were measured.
    fn push(&mut self, name: &str, extra: Option<&str>, value: Option<u64>, timestamp: i64) {
        let (Some(value), Some(d)) = (value, DESCRIPTORS.iter().find(|d| d.name == name)) else {
            return;
        };
        debug_assert_eq!(d.extra_label.is_some(), extra.is_some(), "{name}");
        self.out.push(cri::Metric {
            name: name.into(),
            timestamp,
            metric_type: if d.counter {
                cri::MetricType::Counter
            } else {
                cri::MetricType::Gauge
            } as i32,
            label_values: self
                .base
                .iter()
                .copied()
                .chain(extra)
                .map(String::from)
                .collect(),
            value: Some(u64v(value)),
        });
    }

    fn usage(&mut self, u: &Usage) {
        let secs = |ns: Option<u64>| ns.map(|n| n / 1_000_000_000);
        self.push(
            "container_cpu_usage_seconds_total",
            Some("total"),
            secs(u.cpu_ns),
            0,
        );
        self.push(
            "container_cpu_user_seconds_total",
            None,
            secs(u.cpu_user_ns),
            0,
        );
        self.push(
            "container_cpu_system_seconds_total",
            None,
            secs(u.cpu_system_ns),
            0,
        );
        self.push("container_memory_working_set_bytes", None, u.working_set, 0);
        self.push("container_memory_usage_bytes", None, u.memory_usage, 0);
        self.push("container_memory_rss", None, u.rss, 0);
        self.push("container_memory_cache", None, u.cache, 0);
        self.push("container_memory_swap", None, u.swap_usage, 0);
        self.push("container_processes", None, u.processes, 0);
        let us = |v: Option<u64>| v.map(|us| us / 1_000_000);
        for (res, p) in [
            ("cpu", &u.cpu_psi),
            ("memory", &u.memory_psi),
            ("io", &u.io_psi),
        ] {
            let Some(p) = p else { continue };
            let waiting = format!("container_pressure_{res}_waiting_seconds_total");
            self.push(&waiting, None, us(Some(p.some.total_us)), 0);
            let stalled = format!("container_pressure_{res}_stalled_seconds_total");
            self.push(&stalled, None, us(p.full.map(|f| f.total_us)), 0);
        }
    }
}

fn positive(v: i64) -> Option<u64> {
    u64::try_from(v).ok().filter(|v| *v > 0)
}

fn pod_metrics(d: &Daemon, v: &PodView) -> cri::PodSandboxMetrics {
    let device = d.images.container_fs_dir().display().to_string();
    let mut pod = Metrics {
        base: [&v.pod.id, "POD", ""],
        out: Vec::new(),
    };
    for n in v.sample.network.iter().flatten() {
        let i = Some(n.name.as_str());
        pod.push(
            "container_network_receive_bytes_total",
            i,
            Some(n.rx_bytes),
            0,
        );
        pod.push(
            "container_network_receive_packets_total",
            i,
            Some(n.rx_packets),
            0,
        );
        pod.push(
            "container_network_receive_packets_dropped_total",
            i,
            Some(n.rx_dropped),
            0,
        );
        pod.push(
            "container_network_receive_errors_total",
            i,
            Some(n.rx_errors),
            0,
        );
        pod.push(
            "container_network_transmit_bytes_total",
            i,
            Some(n.tx_bytes),
            0,
        );
        pod.push(
            "container_network_transmit_packets_total",
            i,
            Some(n.tx_packets),
            0,
        );
        pod.push(
            "container_network_transmit_packets_dropped_total",
            i,
            Some(n.tx_dropped),
            0,
        );
        pod.push(
            "container_network_transmit_errors_total",
            i,
            Some(n.tx_errors),
            0,
        );
    }
    let container_metrics = v
        .containers
        .iter()
        .map(|(rec, s)| {
            let mut m = Metrics {
                base: [&rec.id, &rec.spec.name, &rec.spec.image],
                out: Vec::new(),
            };
            m.usage(&s.usage);
            let r = &rec.spec.resources;
            let limit = s.usage.memory_limit.or(positive(r.memory_limit));
            m.push("container_spec_memory_limit_bytes", None, limit, 0);
            m.push("container_spec_cpu_period", None, positive(r.cpu_period), 0);
            m.push("container_spec_cpu_quota", None, positive(r.cpu_quota), 0);
            m.push("container_spec_cpu_shares", None, positive(r.cpu_shares), 0);
            let started = positive(rec.started_at).map(|ns| ns / 1_000_000_000);
            m.push("container_start_time_seconds", None, started, 0);
            if let Some(l) = s.writable_layer {
                let dev = Some(device.as_str());
                m.push("container_fs_usage_bytes", dev, Some(l.bytes), l.timestamp);
            }
            cri::ContainerMetrics {
                container_id: rec.id.clone(),
                metrics: m.out,
            }
        })
        .collect();
    cri::PodSandboxMetrics {
        pod_sandbox_id: v.pod.id.clone(),
        metrics: pod.out,
        container_metrics,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_are_unique_and_cadvisor_named() {
        let mut seen = HashSet::new();
        for d in DESCRIPTORS {
            assert!(seen.insert(d.name), "duplicate {}", d.name);
            assert!(d.name.starts_with("container_"), "{}", d.name);
            assert_eq!(d.counter, d.name.ends_with("_total"), "{}", d.name);
        }
        let r = list_metric_descriptors();
        let cpu = r
            .descriptors
            .iter()
            .find(|d| d.name == "container_cpu_usage_seconds_total")
            .unwrap();
        assert_eq!(cpu.label_keys, ["id", "name", "image", "cpu"]);
    }

    #[test]
    fn metrics_carry_their_labels_and_skip_unknown_values() {
        let mut m = Metrics {
            base: ["c1", "web", "img"],
            out: Vec::new(),
        };
        m.usage(&Usage {
            cpu_ns: Some(2_500_000_000),
            working_set: Some(4096),
            cpu_psi: Some(Psi {
                some: PsiLine {
                    total_us: 3_000_000,
                    ..Default::default()
                },
                full: None,
            }),
            ..Default::default()
        });
        let names: Vec<&str> = m.out.iter().map(|x| x.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "container_cpu_usage_seconds_total",
                "container_memory_working_set_bytes",
                "container_pressure_cpu_waiting_seconds_total"
            ]
        );
        let cpu = &m.out[0];
        assert_eq!(cpu.label_values, ["c1", "web", "img", "total"]);
        assert_eq!(cpu.value.unwrap().value, 2);
        assert_eq!(cpu.metric_type, cri::MetricType::Counter as i32);
        assert_eq!(m.out[1].metric_type, cri::MetricType::Gauge as i32);
        assert_eq!(m.out[2].value.unwrap().value, 3);
    }

    #[test]
    fn network_defaults_to_eth0_and_needs_an_interface() {
        let dev = |n: &str| NetDevice {
            name: n.into(),
            rx_bytes: 7,
            ..Default::default()
        };
        let n = network(1, &Some(vec![dev("net1"), dev("eth0")])).unwrap();
        assert_eq!(n.default_interface.unwrap().name, "eth0");
        assert_eq!(n.interfaces.len(), 1);
        assert_eq!(n.interfaces[0].name, "net1");
        assert!(network(1, &Some(vec![])).is_none());
        assert!(network(1, &None).is_none());
    }

    #[test]
    fn memory_available_needs_a_limit() {
        let u = Usage {
            working_set: Some(100),
            memory_limit: Some(1000),
            ..Default::default()
        };
        assert_eq!(memory(1, &u).unwrap().available_bytes.unwrap().value, 900);
        let unlimited = Usage {
            working_set: Some(100),
            ..Default::default()
        };
        assert!(memory(1, &unlimited).unwrap().available_bytes.is_none());
        assert!(memory(1, &Usage::default()).is_none());
    }
}
