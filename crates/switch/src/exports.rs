//! What the switch shows of the exporters that follow its voucher chain (`clearhouse-export`):
//! each registers an [`ExportStatus`] and updates it; the switch renders them on `/metrics` and
//! the operator's dashboard. The switch never waits for an exporter: these are plain atomics.

use std::fmt::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use serde::Serialize;

/// Most exporters one switch shows (each is a configured sink).
pub const EXPORTS_MAX: usize = 16;

/// One exporter's progress, written by the exporter, read by `/metrics` and the dashboard.
#[derive(Debug, Default)]
pub struct ExportStatus {
    /// The configured name (unique per switch).
    pub name: String,
    /// "postgres", "parquet" or "kafka".
    pub sink: String,
    /// The last voucher the sink holds durably (read back from the sink).
    pub durable_seq: AtomicU64,
    /// The last voucher the exporter has read from the chain (may be ahead of `durable_seq`:
    /// the Parquet archive makes a window durable when it closes).
    pub read_seq: AtomicU64,
    /// The chain head when last asked.
    pub head_seq: AtomicU64,
    /// When the sink last held every voucher of the chain (ns since the epoch; 0: never yet).
    pub caught_up_at_ns: AtomicU64,
    /// The sink answered the last attempt.
    pub up: AtomicBool,
    /// Failed attempts (sink or source) since start.
    pub errors_total: AtomicU64,
    /// Vouchers written to the sink since start.
    pub vouchers_total: AtomicU64,
    /// The last error, for the operator (no personal data: sink and transport messages only).
    pub last_error: Mutex<Option<String>>,
}

impl ExportStatus {
    pub fn new(name: &str, sink: &str) -> ExportStatus {
        ExportStatus {
            name: name.into(),
            sink: sink.into(),
            ..ExportStatus::default()
        }
    }

    /// Vouchers in the chain the sink does not hold yet.
    pub fn lag_vouchers(&self) -> u64 {
        self.head_seq
            .load(Ordering::Relaxed)
            .saturating_sub(self.durable_seq.load(Ordering::Relaxed))
    }

    /// Seconds since the sink last held the whole chain (0 while it does).
    pub fn lag_seconds(&self, now_ns: u64) -> f64 {
        if self.lag_vouchers() == 0 {
            return 0.0;
        }
        let since = self.caught_up_at_ns.load(Ordering::Relaxed);
        if since == 0 {
            return 0.0;
        }
        now_ns.saturating_sub(since) as f64 / 1e9
    }

    pub fn view(&self, now_ns: u64) -> ExportView {
        ExportView {
            name: self.name.clone(),
            sink: self.sink.clone(),
            durable_seq: self.durable_seq.load(Ordering::Relaxed),
            read_seq: self.read_seq.load(Ordering::Relaxed),
            head_seq: self.head_seq.load(Ordering::Relaxed),
            lag_vouchers: self.lag_vouchers(),
            lag_seconds: (self.lag_seconds(now_ns) * 1000.0).round() / 1000.0,
            up: self.up.load(Ordering::Relaxed),
            errors_total: self.errors_total.load(Ordering::Relaxed),
            last_error: self.last_error.lock().expect("export error").clone(),
        }
    }
}

/// An exporter as the dashboard shows it (operator only).
#[derive(Clone, Debug, Serialize)]
pub struct ExportView {
    pub name: String,
    pub sink: String,
    pub durable_seq: u64,
    pub read_seq: u64,
    pub head_seq: u64,
    pub lag_vouchers: u64,
    pub lag_seconds: f64,
    pub up: bool,
    pub errors_total: u64,
    pub last_error: Option<String>,
}

/// How one exporter's figure is read: (status, now in ns) -> its text (counts as integers).
type Gauge = fn(&ExportStatus, u64) -> String;

/// The exporters of one switch.
#[derive(Default)]
pub struct Exports {
    list: RwLock<Vec<Arc<ExportStatus>>>,
}

impl Exports {
    /// Registers an exporter; `None` if the name is taken or [`EXPORTS_MAX`] are registered.
    pub fn register(&self, name: &str, sink: &str) -> Option<Arc<ExportStatus>> {
        let mut list = self.list.write().expect("exports");
        if list.len() >= EXPORTS_MAX || list.iter().any(|e| e.name == name) {
            return None;
        }
        let status = Arc::new(ExportStatus::new(name, sink));
        list.push(status.clone());
        Some(status)
    }

    pub fn views(&self, now_ns: u64) -> Vec<ExportView> {
        let list = self.list.read().expect("exports");
        list.iter().map(|e| e.view(now_ns)).collect()
    }

    /// Prometheus text for every exporter (nothing when none is configured).
    pub fn render(&self, out: &mut String, now_ns: u64) {
        let list = self.list.read().expect("exports");
        if list.is_empty() {
            return;
        }
        let gauges: [(&str, &str, Gauge); 6] = [
            (
                "clearhouse_export_durable_seq",
                "The last voucher the sink holds durably.",
                |e, _| (e.durable_seq.load(Ordering::Relaxed)).to_string(),
            ),
            (
                "clearhouse_export_lag_vouchers",
                "Vouchers in the chain the sink does not hold yet.",
                |e, _| (e.lag_vouchers()).to_string(),
            ),
            (
                "clearhouse_export_lag_seconds",
                "Seconds since the sink last held the whole chain (0 while it does).",
                |e, now| e.lag_seconds(now).to_string(),
            ),
            (
                "clearhouse_export_up",
                "1 if the sink answered the last attempt.",
                |e, _| (u8::from(e.up.load(Ordering::Relaxed))).to_string(),
            ),
            (
                "clearhouse_export_errors_total",
                "Failed export attempts (sink or source) since start.",
                |e, _| (e.errors_total.load(Ordering::Relaxed)).to_string(),
            ),
            (
                "clearhouse_export_vouchers_total",
                "Vouchers written to the sink since start.",
                |e, _| (e.vouchers_total.load(Ordering::Relaxed)).to_string(),
            ),
        ];
        for (name, help, value) in gauges {
            let kind = if name.ends_with("_total") {
                "counter"
            } else {
                "gauge"
            };
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for export in list.iter() {
                let _ = writeln!(
                    out,
                    "{name}{{export=\"{}\",sink=\"{}\"}} {}",
                    export.name,
                    export.sink,
                    value(export, now_ns)
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_and_rendering() {
        let exports = Exports::default();
        let pg = exports.register("mirror", "postgres").unwrap();
        assert!(
            exports.register("mirror", "kafka").is_none(),
            "names are unique"
        );
        pg.head_seq.store(10, Ordering::Relaxed);
        pg.durable_seq.store(4, Ordering::Relaxed);
        pg.caught_up_at_ns.store(1_000_000_000, Ordering::Relaxed);
        assert_eq!(pg.lag_vouchers(), 6);
        assert_eq!(pg.lag_seconds(3_500_000_000), 2.5);
        let mut out = String::new();
        exports.render(&mut out, 3_500_000_000);
        assert!(
            out.contains("clearhouse_export_lag_vouchers{export=\"mirror\",sink=\"postgres\"} 6")
        );
        assert!(
            out.contains("clearhouse_export_lag_seconds{export=\"mirror\",sink=\"postgres\"} 2.5")
        );
        pg.durable_seq.store(10, Ordering::Relaxed);
        assert_eq!(pg.lag_seconds(9_000_000_000), 0.0, "caught up: no lag");
    }
}
