//! Pod sandbox stats: the pod's CPU/memory/process figures and its network
//! counters.
//!
//! With a kubelet cgroup parent, that parent is the pod's cgroup (the infra
//! cgroup and every container cgroup live below it) and is read as a whole.
//! Otherwise (no cgroups, or berth's shared default parent) the pod is the
//! sum of its infra process or cgroup and the container samples the caller
//! passes in. Network counters come from /proc/<infra>/net/dev: the infra
//! process lives in the pod's network namespace.

use super::{PodRecord, PodState};
use crate::cgroup::stats::{self as cgstats, CpuRates, NetDevice, Usage};
use std::collections::HashSet;

#[derive(Debug, Clone, Default)]
pub struct PodSample {
    /// Unix ns.
    pub timestamp: i64,
    pub usage: Usage,
    pub nano_cores: Option<u64>,
    /// Interfaces of the pod's network namespace other than lo; `None` for
    /// host-network pods and pods whose infra process is gone.
    pub network: Option<Vec<NetDevice>>,
}

#[derive(Default)]
pub struct PodStats {
    rates: CpuRates,
}

impl PodStats {
    pub fn new() -> PodStats {
        PodStats::default()
    }

    /// Samples a pod; `containers` are the current samples of its
    /// containers, summed in when the pod has no cgroup of its own.
    pub fn sample(&self, pod: &PodRecord, containers: &[&Usage]) -> PodSample {
        let timestamp = chrono::Utc::now().timestamp_nanos_opt().unwrap_or(0);
        let ready = pod.state == PodState::Ready;
        let pod_cgroup = pod
            .cgroup
            .as_deref()
            .filter(|_| !pod.spec.cgroup_parent.trim_matches('/').is_empty())
            .and_then(|infra_cg| infra_cg.parent());
        let usage = match pod_cgroup {
            Some(parent) => cgstats::read_cgroup(parent),
            None => {
                let mut sum = Usage::default();
                let infra = match &pod.cgroup {
                    Some(cg) => Some(cgstats::read_cgroup(cg)),
                    None => pod
                        .infra
                        .filter(|_| ready)
                        .and_then(|i| cgstats::read_process(i.pid, i.start_time)),
                };
                for u in infra.iter().chain(containers.iter().copied()) {
                    sum.add(u);
                }
                sum
            }
        };
        let nano_cores = usage
            .cpu_ns
            .and_then(|cpu| self.rates.update(&pod.id, timestamp, cpu));
        let network = match (&pod.netns, pod.infra) {
            (Some(_), Some(i)) if ready => cgstats::read_net_dev(i.pid, i.start_time).map(|devs| {
                devs.into_iter()
                    .filter(|d| d.name != "lo")
                    .collect::<Vec<_>>()
            }),
            _ => None,
        };
        PodSample {
            timestamp,
            usage,
            nano_cores,
            network,
        }
    }

    /// Drops the cached state of pods that no longer exist.
    pub fn retain(&self, ids: &HashSet<String>) {
        self.rates.retain(|k| ids.contains(k));
    }
}
