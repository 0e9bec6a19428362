//! Prometheus metrics (text exposition format 0.0.4), written by hand: counters and fixed-bucket
//! latency histograms on atomics, rendered on request.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the latency buckets, seconds.
const BUCKETS: [f64; 15] = [
    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0,
];

#[derive(Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        for (bound, bucket) in BUCKETS.iter().zip(&self.buckets) {
            if seconds <= *bound {
                bucket.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
    }

    /// Cumulative counts per bucket upper bound (seconds), the total count and the sum in
    /// microseconds: what a client needs to compute percentiles over an interval.
    pub fn snapshot(&self) -> (Vec<(f64, u64)>, u64, u64) {
        (
            BUCKETS
                .iter()
                .zip(&self.buckets)
                .map(|(bound, bucket)| (*bound, bucket.load(Ordering::Relaxed)))
                .collect(),
            self.count.load(Ordering::Relaxed),
            self.sum_micros.load(Ordering::Relaxed),
        )
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        for (bound, bucket) in BUCKETS.iter().zip(&self.buckets) {
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels},le=\"{bound}\"}} {}",
                bucket.load(Ordering::Relaxed)
            );
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {count}");
        let _ = writeln!(
            out,
            "{name}_sum{{{labels}}} {}",
            self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count{{{labels}}} {count}");
    }
}

/// Latency of each stage of a payment.
#[derive(Default)]
pub struct PaymentLatency {
    /// Accepted by the switch -> final state durable.
    pub end_to_end: Histogram,
    /// Reservation (pending transfer + record) durable.
    pub reserve: Histogram,
    /// Forward to the creditor agent -> its decision.
    pub creditor: Histogram,
    /// Decision -> post or void durable.
    pub settle: Histogram,
}

impl PaymentLatency {
    pub fn render(&self, out: &mut String) {
        let name = "clearhouse_payment_stage_seconds";
        let _ = writeln!(out, "# HELP {name} Latency of each stage of a payment.");
        let _ = writeln!(out, "# TYPE {name} histogram");
        for (stage, histogram) in [
            ("end_to_end", &self.end_to_end),
            ("reserve", &self.reserve),
            ("creditor_answer", &self.creditor),
            ("settle", &self.settle),
        ] {
            histogram.render(out, name, &format!("stage=\"{stage}\""));
        }
    }
}

/// Writes one metric with its help and type lines.
/// Counts go in as integers (exact), durations and ratios as floats.
pub fn metric<V: std::fmt::Display>(
    out: &mut String,
    name: &str,
    kind: &str,
    help: &str,
    samples: &[(&str, V)],
) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, value) in samples {
        if labels.is_empty() {
            let _ = writeln!(out, "{name} {value}");
        } else {
            let _ = writeln!(out, "{name}{{{labels}}} {value}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_count_into_cumulative_buckets() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(1500));
        h.observe(Duration::from_millis(30));
        let mut out = String::new();
        h.render(&mut out, "x", "stage=\"a\"");
        assert!(out.contains("x_bucket{stage=\"a\",le=\"0.001\"} 0"));
        assert!(out.contains("x_bucket{stage=\"a\",le=\"0.002\"} 1"));
        assert!(out.contains("x_bucket{stage=\"a\",le=\"0.05\"} 2"));
        assert!(out.contains("x_bucket{stage=\"a\",le=\"+Inf\"} 2"));
        assert!(out.contains("x_count{stage=\"a\"} 2"));
        assert!(out.contains("x_sum{stage=\"a\"} 0.0315"));
    }
}
