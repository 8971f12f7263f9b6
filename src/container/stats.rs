//! Container stats: a sample of the container's cgroup (or, without
//! cgroups, of its init process), the CPU rate since the previous sample,
//! and the writable layer's disk use from a cached background walk of the
//! container's upper directory.

use super::{ContainerRecord, ContainerState};
use crate::cgroup::stats::{self as cgstats, CpuRates, Usage};
use crate::store::lock;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

/// Disk use of a writable layer as of `timestamp` (unix ns).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerUsage {
    pub bytes: u64,
    pub inodes: u64,
    pub timestamp: i64,
}

/// One container's stats.
#[derive(Debug, Clone, Default)]
pub struct ContainerSample {
    /// Unix ns.
    pub timestamp: i64,
    pub usage: Usage,
    /// CPU nanoseconds per second since the previous sample (>= 1 s ago).
    pub nano_cores: Option<u64>,
    pub writable_layer: Option<LayerUsage>,
}

pub struct ContainerStats {
    containers_dir: PathBuf,
    rates: CpuRates,
    layers: LayerScanner,
}

impl ContainerStats {
    /// `containers_dir` holds `<id>/upper`; writable layers are walked at
    /// most once per `layer_interval` each.
    pub fn new(containers_dir: &Path, layer_interval: Duration) -> ContainerStats {
        ContainerStats {
            containers_dir: containers_dir.to_path_buf(),
            rates: CpuRates::default(),
            layers: LayerScanner::new(layer_interval),
        }
    }

    /// Samples one container: a few small file reads, never a walk or a
    /// process spawn (the writable layer comes from the cache, and a walk is
    /// queued in the background when the cached one is stale).
    pub fn sample(&self, rec: &ContainerRecord) -> ContainerSample {
        let timestamp = now_ns();
        let usage = match (&rec.cgroup, rec.state) {
            // The cgroup outlives the processes until removal: an exited
            // container still shows the CPU it used.
            (Some(cg), _) => cgstats::read_cgroup(cg),
            (None, ContainerState::Running) => rec
                .init
                .and_then(|i| cgstats::read_process(i.pid, i.start_time))
                .unwrap_or_default(),
            (None, _) => Usage::default(),
        };
        let nano_cores = usage
            .cpu_ns
            .and_then(|cpu| self.rates.update(&rec.id, timestamp, cpu));
        let writable_layer = self
            .layers
            .get(&rec.id, &self.containers_dir.join(&rec.id).join("upper"));
        ContainerSample {
            timestamp,
            usage,
            nano_cores,
            writable_layer,
        }
    }

    /// Drops the cached state of containers that no longer exist.
    pub fn retain(&self, ids: &HashSet<String>) {
        self.rates.retain(|k| ids.contains(k));
        self.layers.retain(ids);
    }
}

fn now_ns() -> i64 {
    chrono::Utc::now().timestamp_nanos_opt().unwrap_or(0)
}

struct LayerEntry {
    usage: Option<LayerUsage>,
    /// When the last walk was queued.
    queued_at: Instant,
    /// A walk is queued or running: no second one is queued meanwhile.
    pending: bool,
}

/// Walks upper directories on one background thread, at most once per
/// interval per container, so a List call never waits for a walk (a
/// container with millions of files only delays its own fresh figure).
struct LayerScanner {
    interval: Duration,
    entries: Arc<Mutex<HashMap<String, LayerEntry>>>,
    queue: Mutex<Option<mpsc::Sender<(String, PathBuf)>>>,
}

impl LayerScanner {
    fn new(interval: Duration) -> LayerScanner {
        LayerScanner {
            interval,
            entries: Arc::new(Mutex::new(HashMap::new())),
            queue: Mutex::new(None),
        }
    }

    /// The latest walk's result (`None` until a first walk has finished);
    /// queues a walk when there is none or the last one is older than the
    /// interval.
    fn get(&self, id: &str, upper: &Path) -> Option<LayerUsage> {
        let mut entries = lock(&self.entries);
        let e = entries.entry(id.to_string()).or_insert_with(|| LayerEntry {
            usage: None,
            queued_at: Instant::now(),
            pending: false,
        });
        let due = e.usage.is_none() || e.queued_at.elapsed() >= self.interval;
        if due && !e.pending && self.enqueue(id, upper) {
            e.pending = true;
            e.queued_at = Instant::now();
        }
        e.usage
    }

    fn enqueue(&self, id: &str, upper: &Path) -> bool {
        let mut q = lock(&self.queue);
        if q.is_none() {
            let (tx, rx) = mpsc::channel::<(String, PathBuf)>();
            let entries = self.entries.clone();
            let spawned = std::thread::Builder::new()
                .name("layer-usage".into())
                .spawn(move || {
                    // Ends when the scanner (the sender) is dropped.
                    for (id, upper) in rx {
                        let usage = walk(&upper);
                        if let Some(e) = lock(&entries).get_mut(&id) {
                            e.pending = false;
                            if usage.is_some() {
                                e.usage = usage;
                            }
                        }
                    }
                });
            match spawned {
                Ok(_) => *q = Some(tx),
                Err(e) => {
                    tracing::error!(error = %e, "cannot start the writable layer usage thread");
                    return false;
                }
            }
        }
        q.as_ref()
            .is_some_and(|tx| tx.send((id.to_string(), upper.to_path_buf())).is_ok())
    }

    fn retain(&self, ids: &HashSet<String>) {
        lock(&self.entries).retain(|k, _| ids.contains(k));
    }
}

/// Bytes (allocated blocks, as du counts them) and inodes below `upper`,
/// not counting `upper` itself; hard links count once; mounts are not
/// crossed and symlinks not followed. `None` when `upper` is unreadable.
fn walk(upper: &Path) -> Option<LayerUsage> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(upper).ok()?;
    let mut usage = LayerUsage {
        bytes: 0,
        inodes: 0,
        timestamp: 0,
    };
    let mut linked = HashSet::new();
    for entry in walkdir::WalkDir::new(upper)
        .min_depth(1)
        .same_file_system(true)
        .into_iter()
        .flatten()
    {
        let Ok(m) = entry.metadata() else { continue };
        if m.nlink() > 1 && !m.is_dir() && !linked.insert((m.dev(), m.ino())) {
            continue;
        }
        usage.inodes += 1;
        usage.bytes += m.blocks() * 512;
    }
    usage.timestamp = now_ns();
    Some(usage)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walk_counts_files_once() {
        let d = tempfile::tempdir().unwrap();
        let up = d.path().join("upper");
        std::fs::create_dir_all(up.join("etc/sub")).unwrap();
        std::fs::write(up.join("etc/big"), vec![7u8; 256 << 10]).unwrap();
        std::fs::hard_link(up.join("etc/big"), up.join("etc/sub/link")).unwrap();
        std::os::unix::fs::symlink("/etc", up.join("l")).unwrap();
        let u = walk(&up).unwrap();
        // etc, etc/sub, etc/big (+ its link, once), l
        assert_eq!(u.inodes, 4);
        assert!(u.bytes >= 256 << 10, "{u:?}");
        assert!(u.bytes < 2 * (256 << 10), "hard link counted twice: {u:?}");
        assert!(walk(&d.path().join("missing")).is_none());
    }

    #[test]
    fn scanner_serves_cached_results_and_rewalks_after_the_interval() {
        let d = tempfile::tempdir().unwrap();
        let up = d.path().join("upper");
        std::fs::create_dir(&up).unwrap();
        let s = LayerScanner::new(Duration::from_millis(200));
        let wait = |want: &dyn Fn(Option<LayerUsage>) -> bool| {
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let u = s.get("c", &up);
                if want(u) {
                    return u;
                }
                assert!(Instant::now() < deadline, "no walk result: {u:?}");
                std::thread::sleep(Duration::from_millis(20));
            }
        };
        let first = wait(&|u| u.is_some()).unwrap();
        assert_eq!(first.inodes, 0);
        std::fs::write(up.join("f"), vec![1u8; 64 << 10]).unwrap();
        let second = wait(&|u| u.is_some_and(|u| u.inodes == 1)).unwrap();
        assert!(second.bytes >= 64 << 10);
        s.retain(&HashSet::new());
        assert!(lock(&s.entries).is_empty());
    }
}
