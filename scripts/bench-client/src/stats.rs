//! Summaries of timing samples.

use serde_json::{json, Value};

/// Percentile `p` (0..=100) of `sorted` (ascending, non-empty), linearly
/// interpolated between the closest ranks (numpy's default method).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    assert!(!sorted.is_empty(), "percentile of no samples");
    let pos = p.clamp(0.0, 100.0) / 100.0 * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

/// Summary of durations given in seconds.
#[derive(Clone, Copy, Debug)]
pub struct Summary {
    pub n: usize,
    pub p50: f64,
    pub p99: f64,
    pub mean: f64,
    pub min: f64,
    pub max: f64,
}

impl Summary {
    pub fn of(samples: &[f64]) -> Option<Summary> {
        if samples.is_empty() {
            return None;
        }
        let mut v = samples.to_vec();
        v.sort_by(f64::total_cmp);
        Some(Summary {
            n: v.len(),
            p50: percentile(&v, 50.0),
            p99: percentile(&v, 99.0),
            mean: v.iter().sum::<f64>() / v.len() as f64,
            min: v[0],
            max: v[v.len() - 1],
        })
    }

    /// `{"n","p50_ms","p99_ms","mean_ms","min_ms","max_ms"}`.
    pub fn to_json(self) -> Value {
        json!({
            "n": self.n,
            "p50_ms": ms(self.p50),
            "p99_ms": ms(self.p99),
            "mean_ms": ms(self.mean),
            "min_ms": ms(self.min),
            "max_ms": ms(self.max),
        })
    }
}

/// Seconds as milliseconds rounded to microseconds.
pub fn ms(seconds: f64) -> f64 {
    (seconds * 1e6).round() / 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(percentile(&v, 50.0), 2.5);
        assert_eq!(percentile(&v, 0.0), 1.0);
        assert_eq!(percentile(&v, 100.0), 4.0);
        assert!((percentile(&v, 99.0) - 3.97).abs() < 1e-9);
        assert_eq!(percentile(&[7.0], 99.0), 7.0);
    }

    #[test]
    fn summary() {
        assert!(Summary::of(&[]).is_none());
        let s = Summary::of(&[0.003, 0.001, 0.002]).unwrap();
        assert_eq!((s.n, s.p50, s.min, s.max), (3, 0.002, 0.001, 0.003));
        assert_eq!(s.to_json()["p50_ms"], 2.0);
        assert_eq!(ms(0.0012345678), 1.235);
    }
}
