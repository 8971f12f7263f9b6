//! Resource usage as the kernel reports it: cgroup v2 files (cpu.stat,
//! memory.*, pids.current, *.pressure) and, where no cgroup is in use,
//! `/proc/<pid>/stat|status`, plus `/proc/<pid>/net/dev` for pod networks.
//!
//! Parsers are pure functions over file contents; the `read_*` functions do
//! the (few, small) reads. A file that is missing (controller not enabled,
//! kernel without PSI) leaves its fields `None`: stats never fail because a
//! controller is absent.

use std::path::Path;

/// One sample of a cgroup or a process. Every field is optional: only what
/// the host can tell is filled in.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Usage {
    /// Cumulative CPU time, all cores, nanoseconds.
    pub cpu_ns: Option<u64>,
    pub cpu_user_ns: Option<u64>,
    pub cpu_system_ns: Option<u64>,
    /// All memory charged (memory.current), bytes.
    pub memory_usage: Option<u64>,
    /// memory.current minus inactive_file, as kubelet and cAdvisor define it.
    pub working_set: Option<u64>,
    /// Anonymous memory (incl. swap cache and THP).
    pub rss: Option<u64>,
    /// Page cache.
    pub cache: Option<u64>,
    pub page_faults: Option<u64>,
    pub major_page_faults: Option<u64>,
    /// memory.max when it is not "max".
    pub memory_limit: Option<u64>,
    pub swap_usage: Option<u64>,
    /// memory.swap.max when it is not "max".
    pub swap_limit: Option<u64>,
    pub processes: Option<u64>,
    pub cpu_psi: Option<Psi>,
    pub memory_psi: Option<Psi>,
    pub io_psi: Option<Psi>,
}

impl Usage {
    /// Adds another member's counters and gauges (a pod is the sum of its
    /// parts). Limits and pressure do not add up: they are dropped.
    pub fn add(&mut self, o: &Usage) {
        fn sum(a: &mut Option<u64>, b: Option<u64>) {
            if let Some(b) = b {
                *a = Some(a.unwrap_or(0).saturating_add(b));
            }
        }
        sum(&mut self.cpu_ns, o.cpu_ns);
        sum(&mut self.cpu_user_ns, o.cpu_user_ns);
        sum(&mut self.cpu_system_ns, o.cpu_system_ns);
        sum(&mut self.memory_usage, o.memory_usage);
        sum(&mut self.working_set, o.working_set);
        sum(&mut self.rss, o.rss);
        sum(&mut self.cache, o.cache);
        sum(&mut self.page_faults, o.page_faults);
        sum(&mut self.major_page_faults, o.major_page_faults);
        sum(&mut self.swap_usage, o.swap_usage);
        sum(&mut self.processes, o.processes);
        self.memory_limit = None;
        self.swap_limit = None;
        self.cpu_psi = None;
        self.memory_psi = None;
        self.io_psi = None;
    }
}

/// Pressure stall information of one resource (`<res>.pressure`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Psi {
    pub some: PsiLine,
    /// Absent for cpu on kernels before 5.13 (and at the root cgroup).
    pub full: Option<PsiLine>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PsiLine {
    pub avg10: f64,
    pub avg60: f64,
    pub avg300: f64,
    /// Total stall time, microseconds (as the kernel counts it).
    pub total_us: u64,
}

/// Counters of one network interface from /proc/net/dev.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetDevice {
    pub name: String,
    pub rx_bytes: u64,
    pub rx_packets: u64,
    pub rx_errors: u64,
    pub rx_dropped: u64,
    pub tx_bytes: u64,
    pub tx_packets: u64,
    pub tx_errors: u64,
    pub tx_dropped: u64,
}

/// The fields of /proc/<pid>/stat that stats use (see proc(5)).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProcStat {
    pub minflt: u64,
    pub cminflt: u64,
    pub majflt: u64,
    pub cmajflt: u64,
    /// Clock ticks.
    pub utime: u64,
    pub stime: u64,
    pub cutime: u64,
    pub cstime: u64,
    /// Clock ticks after boot; with the pid it names the process.
    pub start_time: u64,
}

/// `key value` lines (cpu.stat, memory.stat): the value of `key`.
pub fn flat_keyed(content: &str, key: &str) -> Option<u64> {
    content.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// A single-value file (memory.current, pids.current, memory.max...):
/// `None` for "max" (no limit) or anything unparsable.
pub fn single_value(content: &str) -> Option<u64> {
    content.trim().parse().ok()
}

/// `some avg10=0.12 avg60=0.05 avg300=0.01 total=12345` and the `full` line.
pub fn pressure(content: &str) -> Option<Psi> {
    let mut some = None;
    let mut full = None;
    for l in content.lines() {
        let mut words = l.split_whitespace();
        let kind = words.next();
        let mut line = PsiLine::default();
        let mut seen = 0;
        for w in words {
            let Some((k, v)) = w.split_once('=') else {
                continue;
            };
            match k {
                "avg10" => line.avg10 = v.parse().ok()?,
                "avg60" => line.avg60 = v.parse().ok()?,
                "avg300" => line.avg300 = v.parse().ok()?,
                "total" => line.total_us = v.parse().ok()?,
                _ => continue,
            }
            seen += 1;
        }
        if seen != 4 {
            return None;
        }
        match kind {
            Some("some") => some = Some(line),
            Some("full") => full = Some(line),
            _ => {}
        }
    }
    Some(Psi { some: some?, full })
}

/// /proc/net/dev: two header lines, then `name: rx(8 fields) tx(8 fields)`.
pub fn net_dev(content: &str) -> Vec<NetDevice> {
    content
        .lines()
        .filter_map(|l| {
            let (name, rest) = l.split_once(':')?;
            let v: Vec<u64> = rest
                .split_whitespace()
                .map(|f| f.parse().ok())
                .collect::<Option<_>>()?;
            if v.len() < 16 {
                return None;
            }
            Some(NetDevice {
                name: name.trim().to_string(),
                rx_bytes: v[0],
                rx_packets: v[1],
                rx_errors: v[2],
                rx_dropped: v[3],
                tx_bytes: v[8],
                tx_packets: v[9],
                tx_errors: v[10],
                tx_dropped: v[11],
            })
        })
        .collect()
}

/// /proc/<pid>/stat. The command name (field 2) may hold spaces and
/// parentheses, so fields are counted from the last ')'.
pub fn proc_stat(content: &str) -> Option<ProcStat> {
    let rest = content.rsplit_once(')')?.1;
    // rest[0] is field 3 (state).
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |field: usize| -> Option<u64> { f.get(field - 3)?.parse().ok() };
    Some(ProcStat {
        minflt: n(10)?,
        cminflt: n(11)?,
        majflt: n(12)?,
        cmajflt: n(13)?,
        utime: n(14)?,
        stime: n(15)?,
        cutime: n(16)?,
        cstime: n(17)?,
        start_time: n(22)?,
    })
}

/// A `Key:   123 kB` line of /proc/<pid>/status, in bytes.
pub fn status_kb(content: &str, key: &str) -> Option<u64> {
    content.lines().find_map(|l| {
        let v = l.strip_prefix(key)?.strip_prefix(':')?;
        let kb: u64 = v.split_whitespace().next()?.parse().ok()?;
        Some(kb * 1024)
    })
}

/// The shortest window a CPU rate is computed over: callers sampling in quick
/// succession (kubelet's summary and eviction loops, crictl) get the rate of
/// the last full window rather than the noise of a few milliseconds.
pub const MIN_RATE_WINDOW_NS: i64 = 1_000_000_000;

/// CPU rates (usage_nano_cores) from successive samples of cumulative CPU
/// time, one series per key (a container or pod id), kept in memory.
#[derive(Default)]
pub struct CpuRates {
    last: std::sync::Mutex<std::collections::HashMap<String, RateState>>,
}

#[derive(Clone, Copy)]
struct RateState {
    at_ns: i64,
    cpu_ns: u64,
    rate: Option<u64>,
}

impl CpuRates {
    /// Records a sample taken at `at_ns` and returns the rate in CPU
    /// nanoseconds per second: `None` for a first sample or after the counter
    /// went backwards (a member left a pod).
    pub fn update(&self, key: &str, at_ns: i64, cpu_ns: u64) -> Option<u64> {
        let mut last = crate::store::lock(&self.last);
        let new = RateState {
            at_ns,
            cpu_ns,
            rate: None,
        };
        let Some(prev) = last.get(key).copied() else {
            last.insert(key.to_string(), new);
            return None;
        };
        let window = at_ns - prev.at_ns;
        if window < MIN_RATE_WINDOW_NS {
            return prev.rate;
        }
        let rate = cpu_ns.checked_sub(prev.cpu_ns).map(|d| {
            (u128::from(d) * 1_000_000_000 / window as u128).min(u128::from(u64::MAX)) as u64
        });
        last.insert(key.to_string(), RateState { rate, ..new });
        rate
    }

    /// Forgets the series whose key `keep` rejects (removed objects).
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        crate::store::lock(&self.last).retain(|k, _| keep(k));
    }
}

fn read(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

/// Samples a cgroup v2 directory: up to ten small reads of cgroupfs files
/// (no disk I/O), each optional (a controller not enabled there just leaves
/// its fields out).
pub fn read_cgroup(dir: &Path) -> Usage {
    let mut u = Usage::default();
    if let Some(cpu) = read(&dir.join("cpu.stat")) {
        u.cpu_ns = flat_keyed(&cpu, "usage_usec").map(|v| v * 1000);
        u.cpu_user_ns = flat_keyed(&cpu, "user_usec").map(|v| v * 1000);
        u.cpu_system_ns = flat_keyed(&cpu, "system_usec").map(|v| v * 1000);
    }
    u.memory_usage = read(&dir.join("memory.current")).and_then(|s| single_value(&s));
    u.memory_limit = read(&dir.join("memory.max")).and_then(|s| single_value(&s));
    if let Some(stat) = read(&dir.join("memory.stat")) {
        let inactive_file = flat_keyed(&stat, "inactive_file").unwrap_or(0);
        u.working_set = u.memory_usage.map(|m| m.saturating_sub(inactive_file));
        u.rss = flat_keyed(&stat, "anon");
        u.cache = flat_keyed(&stat, "file");
        u.page_faults = flat_keyed(&stat, "pgfault");
        u.major_page_faults = flat_keyed(&stat, "pgmajfault");
    }
    u.swap_usage = read(&dir.join("memory.swap.current")).and_then(|s| single_value(&s));
    u.swap_limit = read(&dir.join("memory.swap.max")).and_then(|s| single_value(&s));
    u.processes = read(&dir.join("pids.current")).and_then(|s| single_value(&s));
    if kernel_has_psi() {
        u.cpu_psi = read(&dir.join("cpu.pressure")).and_then(|s| pressure(&s));
        u.memory_psi = read(&dir.join("memory.pressure")).and_then(|s| pressure(&s));
        u.io_psi = read(&dir.join("io.pressure")).and_then(|s| pressure(&s));
    }
    u
}

/// Whether PSI is on (CONFIG_PSI and not booted with psi=0): without it the
/// three *.pressure reads per cgroup are skipped.
fn kernel_has_psi() -> bool {
    static PSI: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *PSI.get_or_init(|| std::fs::read_to_string("/proc/pressure/cpu").is_ok())
}

/// Samples one process where no cgroup is in use: two reads.
///
/// An approximation of the container, not the cgroup's exact figure: CPU is
/// utime+stime of the process plus cutime+cstime of the children it has
/// waited for (running children and processes joined later by exec are not
/// counted); memory is the process's own from /proc/<pid>/status (VmRSS,
/// RssAnon, RssFile), chosen over smaps_rollup because status is cheap to
/// read (smaps_rollup walks every mapping under the mm lock) and gives the
/// same resident totals. `None` when the process is gone or its pid now
/// names another process (`start_time` differs).
pub fn read_process(pid: i32, start_time: u64) -> Option<Usage> {
    let stat = proc_stat(&read(Path::new(&format!("/proc/{pid}/stat")))?)?;
    if stat.start_time != start_time {
        return None;
    }
    let status = read(Path::new(&format!("/proc/{pid}/status")))?;
    let tick_ns = 1_000_000_000 / clock_ticks_per_sec();
    let user = (stat.utime + stat.cutime) * tick_ns;
    let system = (stat.stime + stat.cstime) * tick_ns;
    let rss = status_kb(&status, "VmRSS");
    Some(Usage {
        cpu_ns: Some(user + system),
        cpu_user_ns: Some(user),
        cpu_system_ns: Some(system),
        memory_usage: rss,
        working_set: rss,
        rss: status_kb(&status, "RssAnon"),
        cache: status_kb(&status, "RssFile"),
        page_faults: Some(stat.minflt + stat.cminflt),
        major_page_faults: Some(stat.majflt + stat.cmajflt),
        ..Default::default()
    })
}

/// The interfaces of the network namespace `pid` lives in, or `None` when
/// the process is gone or is not the one named by `start_time`.
pub fn read_net_dev(pid: i32, start_time: u64) -> Option<Vec<NetDevice>> {
    let content = read(Path::new(&format!("/proc/{pid}/net/dev")))?;
    // Checked after the read: had the pid been reused before it, the start
    // time now differs and the counters are discarded.
    let stat = proc_stat(&read(Path::new(&format!("/proc/{pid}/stat")))?)?;
    (stat.start_time == start_time).then(|| net_dev(&content))
}

fn clock_ticks_per_sec() -> u64 {
    static TICKS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .ok()
            .flatten()
            .and_then(|t| u64::try_from(t).ok())
            .filter(|t| *t > 0)
            .unwrap_or(100)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_stat() {
        let s = "usage_usec 1234567\nuser_usec 1000000\nsystem_usec 234567\n\
                 core_sched.force_idle_usec 0\nnr_periods 10\nnr_throttled 2\nthrottled_usec 5000\n";
        assert_eq!(flat_keyed(s, "usage_usec"), Some(1_234_567));
        assert_eq!(flat_keyed(s, "nr_throttled"), Some(2));
        // A key must match whole, not as a prefix.
        assert_eq!(flat_keyed(s, "usage"), None);
        assert_eq!(flat_keyed(s, "missing"), None);
    }

    #[test]
    fn memory_files() {
        let stat = "anon 8388608\nfile 4096000\nkernel 1000\nactive_file 96000\n\
                    inactive_file 4000000\npgfault 5120\npgmajfault 3\n";
        assert_eq!(flat_keyed(stat, "anon"), Some(8_388_608));
        assert_eq!(flat_keyed(stat, "inactive_file"), Some(4_000_000));
        assert_eq!(flat_keyed(stat, "pgmajfault"), Some(3));
        assert_eq!(single_value("13000000\n"), Some(13_000_000));
        assert_eq!(single_value("max\n"), None);
        assert_eq!(single_value("7\n"), Some(7));
    }

    #[test]
    fn pressure_files() {
        let cpu = "some avg10=1.50 avg60=0.25 avg300=0.00 total=123456\n\
                   full avg10=0.00 avg60=0.00 avg300=0.00 total=789\n";
        let p = pressure(cpu).unwrap();
        assert_eq!(p.some.avg10, 1.5);
        assert_eq!(p.some.avg60, 0.25);
        assert_eq!(p.some.total_us, 123_456);
        assert_eq!(p.full.unwrap().total_us, 789);
        // Older kernels: cpu has no full line.
        let old = "some avg10=0.00 avg60=0.00 avg300=0.00 total=0\n";
        assert_eq!(pressure(old).unwrap().full, None);
        assert_eq!(pressure(""), None);
        assert_eq!(pressure("some avg10=x avg60=0 avg300=0 total=0\n"), None);
    }

    #[test]
    fn proc_net_dev() {
        let s = "Inter-|   Receive                                                |  Transmit\n \
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    \
lo:    1200      12    0    0    0     0          0         0     1200      12    0    0    0     0       0          0\n  \
eth0: 987654     321    2    1    0     0          0         0   123456     111    3    4    0     0       0          0\n";
        let d = net_dev(s);
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].name, "lo");
        let eth = &d[1];
        assert_eq!(eth.name, "eth0");
        assert_eq!(
            (eth.rx_bytes, eth.rx_packets, eth.rx_errors, eth.rx_dropped),
            (987_654, 321, 2, 1)
        );
        assert_eq!(
            (eth.tx_bytes, eth.tx_packets, eth.tx_errors, eth.tx_dropped),
            (123_456, 111, 3, 4)
        );
    }

    #[test]
    fn proc_pid_stat() {
        // A command name with a space and a ')' must not shift the fields.
        let s =
            "4242 (my (odd) cmd) S 1 4242 4242 0 -1 4194560 150 30 2 1 700 45 12 8 20 0 1 0 98765 \
                 2265088 200 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0\n";
        let p = proc_stat(s).unwrap();
        assert_eq!((p.minflt, p.cminflt, p.majflt, p.cmajflt), (150, 30, 2, 1));
        assert_eq!((p.utime, p.stime, p.cutime, p.cstime), (700, 45, 12, 8));
        assert_eq!(p.start_time, 98_765);
        assert_eq!(proc_stat("12 (x) S 1"), None);
    }

    #[test]
    fn proc_pid_status() {
        let s = "Name:\tsh\nVmPeak:\t    3000 kB\nVmRSS:\t    1536 kB\nRssAnon:\t     512 kB\n\
                 RssFile:\t    1024 kB\nThreads:\t1\n";
        assert_eq!(status_kb(s, "VmRSS"), Some(1536 * 1024));
        assert_eq!(status_kb(s, "RssAnon"), Some(512 * 1024));
        assert_eq!(status_kb(s, "Rss"), None);
    }

    #[test]
    fn this_process_is_sampled_and_a_wrong_start_time_is_not() {
        let pid = std::process::id() as i32;
        let st = proc_stat(&std::fs::read_to_string("/proc/self/stat").unwrap()).unwrap();
        let u = read_process(pid, st.start_time).unwrap();
        assert!(u.working_set.unwrap() > 0);
        assert!(u.rss.is_some());
        assert!(read_process(pid, st.start_time + 1).is_none());
        assert!(read_net_dev(pid, st.start_time).is_some());
        assert!(read_net_dev(pid, st.start_time + 1).is_none());
    }

    #[test]
    fn rates_need_a_full_window() {
        let r = CpuRates::default();
        let s = MIN_RATE_WINDOW_NS;
        assert_eq!(r.update("a", 0, 0), None, "first sample");
        assert_eq!(r.update("a", s / 2, 400), None, "window too short");
        // 0.5 CPU over 2 s.
        assert_eq!(r.update("a", 2 * s, 1_000_000_000), Some(500_000_000));
        // A quick second caller gets the same rate.
        assert_eq!(r.update("a", 2 * s + 10, 1_000_000_100), Some(500_000_000));
        // A counter going backwards yields no rate, then rates resume.
        assert_eq!(r.update("a", 4 * s, 10), None);
        assert_eq!(r.update("a", 5 * s, 10 + 250_000_000), Some(250_000_000));
        r.retain(|k| k != "a");
        assert_eq!(r.update("a", 6 * s, 0), None, "forgotten");
    }

    #[test]
    fn sums_drop_limits_and_pressure() {
        let a = Usage {
            cpu_ns: Some(10),
            memory_limit: Some(100),
            cpu_psi: Some(Psi::default()),
            ..Default::default()
        };
        let b = Usage {
            cpu_ns: Some(5),
            processes: Some(2),
            ..Default::default()
        };
        let mut s = a.clone();
        s.add(&b);
        assert_eq!(s.cpu_ns, Some(15));
        assert_eq!(s.processes, Some(2));
        assert_eq!(s.memory_usage, None);
        assert_eq!(s.memory_limit, None);
        assert_eq!(s.cpu_psi, None);
    }

    #[test]
    fn a_cgroup_dir_without_controllers_gives_nothing() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("cpu.stat"), "usage_usec 5\nuser_usec 3\n").unwrap();
        std::fs::write(d.path().join("memory.current"), "1000\n").unwrap();
        std::fs::write(
            d.path().join("memory.stat"),
            "anon 600\ninactive_file 300\n",
        )
        .unwrap();
        std::fs::write(d.path().join("memory.max"), "max\n").unwrap();
        let u = read_cgroup(d.path());
        assert_eq!(u.cpu_ns, Some(5000));
        assert_eq!(u.cpu_system_ns, None);
        assert_eq!(u.working_set, Some(700));
        assert_eq!(u.rss, Some(600));
        assert_eq!(u.memory_limit, None);
        assert_eq!(u.processes, None);
        assert_eq!(u.io_psi, None);
    }
}
