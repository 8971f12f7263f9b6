//! Memory of processes from procfs: Pss from `/proc/PID/smaps_rollup` and
//! finding processes by command line.

use std::path::Path;

use anyhow::{bail, Context};

/// Memory of one process, in KiB: Pss (shared pages divided among the
/// processes mapping them), Rss and anonymous memory (heap, stacks: what a
/// process allocates itself, unlike the file pages of its binary that Pss
/// splits with every other process running the same binary).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Mem {
    pub pss_kib: u64,
    pub rss_kib: u64,
    pub anon_kib: u64,
}

/// Parses the `Pss:`, `Rss:` and `Anonymous:` lines of an smaps_rollup file.
pub fn parse_rollup(text: &str) -> anyhow::Result<Mem> {
    let field = |name: &str| -> anyhow::Result<u64> {
        let line = text
            .lines()
            .find(|l| l.starts_with(name))
            .with_context(|| format!("no {name} line"))?;
        let mut words = line[name.len()..].split_whitespace();
        let value = words
            .next()
            .with_context(|| format!("{name} without a value"))?;
        if words.next() != Some("kB") {
            bail!("{name}: unexpected unit in {line:?}");
        }
        value
            .parse()
            .with_context(|| format!("{name}: bad value in {line:?}"))
    };
    Ok(Mem {
        pss_kib: field("Pss:")?,
        rss_kib: field("Rss:")?,
        anon_kib: field("Anonymous:")?,
    })
}

/// Pss and Rss of process `pid`.
pub fn mem_of(pid: i32) -> anyhow::Result<Mem> {
    let path = format!("/proc/{pid}/smaps_rollup");
    let text = std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
    parse_rollup(&text).with_context(|| format!("parse {path}"))
}

/// The command line of `pid` with its arguments joined by single spaces
/// (None for kernel threads, zombies and processes that are gone).
pub fn cmdline(pid: i32) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    if raw.is_empty() {
        return None;
    }
    let args: Vec<String> = raw
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    Some(args.join(" "))
}

/// This process's PID as /proc knows it (getpid() differs when /proc belongs
/// to another PID namespace).
fn own_pid() -> i32 {
    std::fs::read_link("/proc/self")
        .ok()
        .and_then(|p| p.to_str().and_then(|s| s.parse().ok()))
        .unwrap_or(std::process::id() as i32)
}

/// PIDs whose command line (arguments joined by spaces) contains every one
/// of `patterns`, except `exclude` and this process itself (whose own
/// arguments may well contain the patterns).
pub fn find(patterns: &[String], exclude: &[i32]) -> Vec<i32> {
    find_in(Path::new("/proc"), patterns, exclude)
}

fn find_in(proc: &Path, patterns: &[String], exclude: &[i32]) -> Vec<i32> {
    let me = own_pid();
    let mut pids = Vec::new();
    let Ok(dir) = std::fs::read_dir(proc) else {
        return pids;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        if pid == me || exclude.contains(&pid) {
            continue;
        }
        if cmdline(pid).is_some_and(|c| patterns.iter().all(|p| c.contains(p.as_str()))) {
            pids.push(pid);
        }
    }
    pids.sort_unstable();
    pids
}

/// Count and summed memory of a set of processes.
#[derive(Clone, Copy, Debug, Default)]
pub struct Group {
    pub count: usize,
    pub pss_kib: u64,
    pub rss_kib: u64,
    pub anon_kib: u64,
}

/// Sums the memory of the processes matching `patterns` (see [`find`];
/// processes that exit while being measured are left out).
pub fn group(patterns: &[String], exclude: &[i32]) -> Group {
    let mut g = Group::default();
    for pid in find(patterns, exclude) {
        if let Ok(m) = mem_of(pid) {
            g.count += 1;
            g.pss_kib += m.pss_kib;
            g.rss_kib += m.rss_kib;
            g.anon_kib += m.anon_kib;
        }
    }
    g
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_smaps_rollup() {
        let text =
            "55d0c0a00000-7ffd5e5f2000 ---p 00000000 00:00 0                          [rollup]\n\
                    Rss:                4312 kB\n\
                    Pss:                1234 kB\n\
                    Pss_Dirty:           800 kB\n\
                    Pss_Anon:            700 kB\n\
                    Private_Dirty:       780 kB\n\
                    Anonymous:           800 kB\n";
        assert_eq!(
            parse_rollup(text).unwrap(),
            Mem {
                pss_kib: 1234,
                rss_kib: 4312,
                anon_kib: 800,
            }
        );
        assert!(parse_rollup("Rss: 1 kB\n").is_err());
        assert!(parse_rollup("Rss: 1 kB\nPss: x kB\n").is_err());
    }

    #[test]
    fn measures_itself() {
        let me = std::process::id() as i32;
        let m = mem_of(me).unwrap();
        assert!(m.pss_kib > 0 && m.rss_kib >= m.pss_kib, "{m:?}");
        assert!(m.anon_kib > 0 && m.anon_kib <= m.rss_kib, "{m:?}");
        assert_eq!(own_pid(), me);
        assert!(cmdline(me).is_some());
        // The test binary never matches itself.
        let own = cmdline(me).unwrap();
        assert!(!find(&[own], &[]).contains(&me));
        // A child whose arguments are unique is found, by all patterns.
        let mut child = std::process::Command::new("sleep")
            .arg("1000.123456")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let want = |p: &[&str]| find(&p.iter().map(|s| s.to_string()).collect::<Vec<_>>(), &[]);
        let mut found = Vec::new();
        for _ in 0..100 {
            found = want(&["sleep", "1000.123456"]);
            if !found.is_empty() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(found, vec![pid]);
        assert!(want(&["sleep 1000.123456", "no-such-arg"]).is_empty());
        assert!(find(&["1000.123456".to_string()], &[pid]).is_empty());
        let g = group(&["sleep 1000.123456".to_string()], &[]);
        assert_eq!(g.count, 1);
        assert!(g.pss_kib > 0);
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
