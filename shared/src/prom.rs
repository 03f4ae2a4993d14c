//! The Prometheus text exposition format, as every `/metrics` producer of the project writes it.

use std::fmt::Write;

/// `# HELP` and `# TYPE` lines of a metric family (`kind`: `counter` or `gauge`).
pub fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// A metric without labels: its header and its one sample.
pub fn metric(out: &mut String, name: &str, kind: &str, help: &str, value: u64) {
    header(out, name, kind, help);
    let _ = writeln!(out, "{name} {value}");
}

/// A metric family with one label: its header and one sample `name{label="v"} value` per item.
pub fn labeled<L: std::fmt::Display>(
    out: &mut String,
    name: &str,
    kind: &str,
    help: &str,
    label: &str,
    samples: impl IntoIterator<Item = (L, u64)>,
) {
    header(out, name, kind, help);
    for (v, value) in samples {
        let _ = writeln!(out, "{name}{{{label}=\"{v}\"}} {value}");
    }
}

/// Upper bounds (seconds) of the latency buckets every histogram of the project uses: from a
/// disk sync on a fast device (50 µs) to a stall worth an alert (2.5 s).
pub const LATENCY_BUCKETS: [f64; 15] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5,
];

/// A latency histogram in the Prometheus sense (cumulative `_bucket{le}`, `_sum`, `_count`,
/// seconds), lock-free: an observation is two relaxed atomic adds and a short bucket search, so
/// it can sit on a hot path (a commit, a round).
#[derive(Debug)]
pub struct Histogram {
    /// Observations per bucket (not cumulative); the last one is `+Inf`.
    counts: [std::sync::atomic::AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_ns: std::sync::atomic::AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

impl Histogram {
    pub const fn new() -> Histogram {
        #[allow(clippy::declare_interior_mutable_const)]
        const ZERO: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        Histogram {
            counts: [ZERO; LATENCY_BUCKETS.len() + 1],
            sum_ns: ZERO,
        }
    }

    pub fn observe(&self, d: std::time::Duration) {
        use std::sync::atomic::Ordering::Relaxed;
        let secs = d.as_secs_f64();
        let i = LATENCY_BUCKETS.partition_point(|&le| le < secs);
        self.counts[i].fetch_add(1, Relaxed);
        self.sum_ns
            .fetch_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX), Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        use std::sync::atomic::Ordering::Relaxed;
        self.counts.iter().map(|c| c.load(Relaxed)).sum()
    }

    /// The family's header and its samples; `name` ends in `_seconds`.
    pub fn render(&self, out: &mut String, name: &str, help: &str) {
        use std::sync::atomic::Ordering::Relaxed;
        header(out, name, "histogram", help);
        let mut cum = 0;
        for (i, c) in self.counts.iter().enumerate() {
            cum += c.load(Relaxed);
            match LATENCY_BUCKETS.get(i) {
                Some(le) => {
                    let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cum}");
                }
                None => {
                    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cum}");
                }
            }
        }
        let sum = self.sum_ns.load(Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {cum}");
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_histogram_renders_cumulative_buckets_a_sum_and_a_count_in_seconds() {
        use std::time::Duration;
        let h = super::Histogram::new();
        h.observe(Duration::from_micros(70)); // le 0.0001
        h.observe(Duration::from_micros(100)); // le 0.0001 (bounds are inclusive)
        h.observe(Duration::from_millis(3)); // le 0.005
        h.observe(Duration::from_secs(9)); // +Inf
        assert_eq!(h.count(), 4);
        let mut s = String::new();
        h.render(&mut s, "im_t_seconds", "Time.");
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(lines[0], "# HELP im_t_seconds Time.");
        assert_eq!(lines[1], "# TYPE im_t_seconds histogram");
        assert_eq!(lines[2], "im_t_seconds_bucket{le=\"0.00005\"} 0");
        assert_eq!(lines[3], "im_t_seconds_bucket{le=\"0.0001\"} 2");
        assert!(s.contains("im_t_seconds_bucket{le=\"0.0025\"} 2\n"));
        assert!(s.contains("im_t_seconds_bucket{le=\"0.005\"} 3\n"));
        assert!(s.contains("im_t_seconds_bucket{le=\"2.5\"} 3\n"));
        assert!(s.contains("im_t_seconds_bucket{le=\"+Inf\"} 4\n"));
        assert!(s.contains("im_t_seconds_sum 9.00317\n"), "{s}");
        assert!(s.ends_with("im_t_seconds_count 4\n"));
    }

    #[test]
    fn text_format() {
        let mut s = String::new();
        super::metric(&mut s, "im_x_total", "counter", "Things.", 3);
        assert_eq!(
            s,
            "# HELP im_x_total Things.\n# TYPE im_x_total counter\nim_x_total 3\n"
        );
        let mut s = String::new();
        super::labeled(&mut s, "im_q", "gauge", "Depth.", "core", [(0, 5), (1, 7)]);
        assert_eq!(
            s,
            "# HELP im_q Depth.\n# TYPE im_q gauge\nim_q{core=\"0\"} 5\nim_q{core=\"1\"} 7\n"
        );
    }
}
