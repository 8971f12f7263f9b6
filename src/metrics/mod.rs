//! Prometheus metrics of the daemon itself (kubelet's CRI stats are in
//! server/stats.rs). Counters and histograms are recorded as RPCs and pulls
//! happen, always (a few atomic adds); gauges of the node's state are read at
//! scrape time. Served only when `[metrics] address` is set (see serve.rs).

mod serve;

pub use serve::{start, MetricsError};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::LazyLock;
use std::time::Duration;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Method {
    method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodCode {
    method: String,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct State {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    result: String,
}

/// What only the daemon knows, counted at scrape time.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    /// (state, count), every state listed even when 0.
    pub pods: Vec<(&'static str, i64)>,
    pub containers: Vec<(&'static str, i64)>,
    /// Live container monitors and pod infra processes.
    pub monitors: i64,
    pub infra: i64,
}

struct Metrics {
    registry: Registry,
    rpc_requests: Family<Method, Counter>,
    rpc_errors: Family<MethodCode, Counter>,
    rpc_duration: Family<Method, Histogram>,
    pulls: Family<Outcome, Counter>,
    pull_bytes: Counter,
    pull_duration: Histogram,
    pods: Family<State, Gauge>,
    containers: Family<State, Gauge>,
    monitors: Gauge,
    infra: Gauge,
    rss: Gauge,
    fds: Gauge,
}

fn rpc_histogram() -> Histogram {
    // 0.5 ms .. ~16 s.
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let mut registry = Registry::with_prefix("berth");
    let m = Metrics {
        rpc_requests: Family::default(),
        rpc_errors: Family::default(),
        rpc_duration: Family::new_with_constructor(rpc_histogram),
        pulls: Family::default(),
        pull_bytes: Counter::default(),
        // 10 ms .. ~5 min.
        pull_duration: Histogram::new(exponential_buckets(0.01, 2.0, 15)),
        pods: Family::default(),
        containers: Family::default(),
        monitors: Gauge::default(),
        infra: Gauge::default(),
        rss: Gauge::default(),
        fds: Gauge::default(),
        registry: Registry::default(),
    };
    registry.register(
        "rpc_requests",
        "CRI RPCs served, by method",
        m.rpc_requests.clone(),
    );
    registry.register(
        "rpc_errors",
        "CRI RPCs that failed, by method and gRPC status code",
        m.rpc_errors.clone(),
    );
    registry.register(
        "rpc_duration_seconds",
        "Time to serve a CRI RPC (for streams: to produce the stream), by method",
        m.rpc_duration.clone(),
    );
    registry.register(
        "image_pulls",
        "PullImage calls, by result (success, failure)",
        m.pulls.clone(),
    );
    registry.register(
        "image_pull_bytes",
        "Size of the images pulled successfully (their layers and config)",
        m.pull_bytes.clone(),
    );
    registry.register(
        "image_pull_duration_seconds",
        "Time a successful pull took",
        m.pull_duration.clone(),
    );
    registry.register("pods", "Pod sandboxes, by state", m.pods.clone());
    registry.register("containers", "Containers, by state", m.containers.clone());
    registry.register(
        "monitor_processes",
        "Live container monitor processes",
        m.monitors.clone(),
    );
    registry.register(
        "infra_processes",
        "Live pod infra (pause) processes",
        m.infra.clone(),
    );
    registry.register(
        "resident_memory_bytes",
        "Resident memory of the berth daemon",
        m.rss.clone(),
    );
    registry.register(
        "open_fds",
        "Open file descriptors of the berth daemon",
        m.fds.clone(),
    );
    Metrics { registry, ..m }
});

/// Records one finished RPC; `code` is None when it succeeded.
pub fn rpc_done(method: &str, code: Option<tonic::Code>, took: Duration) {
    let m = &*METRICS;
    let method = method.to_string();
    m.rpc_requests
        .get_or_create(&Method {
            method: method.clone(),
        })
        .inc();
    m.rpc_duration
        .get_or_create(&Method {
            method: method.clone(),
        })
        .observe(took.as_secs_f64());
    if let Some(code) = code {
        m.rpc_errors
            .get_or_create(&MethodCode {
                method,
                code: format!("{code:?}"),
            })
            .inc();
    }
}

/// Records one PullImage: its size when it succeeded.
pub fn pull_done(bytes: Option<u64>, took: Duration) {
    let m = &*METRICS;
    let result = if bytes.is_some() {
        "success"
    } else {
        "failure"
    };
    m.pulls
        .get_or_create(&Outcome {
            result: result.into(),
        })
        .inc();
    if let Some(b) = bytes {
        m.pull_bytes.inc_by(b);
        m.pull_duration.observe(took.as_secs_f64());
    }
}

/// The exposition text, gauges refreshed from `snap` and /proc/self.
pub fn render(snap: &Snapshot) -> String {
    let m = &*METRICS;
    for (family, counts) in [(&m.pods, &snap.pods), (&m.containers, &snap.containers)] {
        for (state, n) in counts {
            family
                .get_or_create(&State {
                    state: (*state).into(),
                })
                .set(*n);
        }
    }
    m.monitors.set(snap.monitors);
    m.infra.set(snap.infra);
    m.rss.set(resident_bytes().unwrap_or(0));
    m.fds.set(open_fds().unwrap_or(0));
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &m.registry) {
        tracing::error!(error = %e, "cannot encode metrics");
    }
    out
}

/// VmRSS from /proc/self/status.
fn resident_bytes() -> Option<i64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: i64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

fn open_fds() -> Option<i64> {
    Some(std::fs::read_dir("/proc/self/fd").ok()?.count() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_recorded_rpcs_and_process_gauges() {
        rpc_done("Version", None, Duration::from_millis(2));
        rpc_done(
            "RemoveImage",
            Some(tonic::Code::FailedPrecondition),
            Duration::ZERO,
        );
        let text = render(&Snapshot {
            pods: vec![("ready", 2)],
            ..Default::default()
        });
        assert!(
            text.contains("berth_rpc_requests_total{method=\"Version\"}"),
            "{text}"
        );
        assert!(
            text.contains(
                "berth_rpc_errors_total{method=\"RemoveImage\",code=\"FailedPrecondition\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("berth_rpc_duration_seconds_bucket{"),
            "{text}"
        );
        assert!(text.contains("berth_pods{state=\"ready\"} 2"), "{text}");
        assert!(resident_bytes().unwrap() > 0);
        assert!(open_fds().unwrap() >= 3);
    }
}
