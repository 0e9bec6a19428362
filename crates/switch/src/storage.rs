//! What the switch shows of its disk and of retention: the data directory's size sampled over
//! time (growth per day, days until its filesystem is full) and how far retention has pruned.
//! Sampled when `/metrics` or the dashboard is read (at most every [`SAMPLE_INTERVAL_NS`]),
//! never by a task of its own; the samples are bounded.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use serde::Serialize;

/// Shortest time between two samples of the data directory's size.
pub const SAMPLE_INTERVAL_NS: u64 = 10_000_000_000;
/// Samples kept (a day at one a minute, more often when read more often).
const SAMPLES_MAX: usize = 1_440;
/// Growth is reported once the samples span at least this long.
const GROWTH_SPAN_MIN_NS: u64 = 30_000_000_000;

/// Retention's progress, written by the retention driver, read by `/metrics` and the dashboard.
#[derive(Debug, Default)]
pub struct RetentionStatus {
    pub enabled: AtomicBool,
    pub hot_windows: AtomicU64,
    pub pruned_through: AtomicU64,
    pub cleared_through: AtomicU64,
    /// Pruning is stopped (the archive is missing, unreadable or differs from the chain).
    pub blocked: AtomicBool,
    pub last_error: Mutex<Option<String>>,
    pub payments_pruned_total: AtomicU64,
    pub windows_pruned_total: AtomicU64,
}

/// The data directory's size over time, and retention.
pub struct Storage {
    data_dir: PathBuf,
    samples: Mutex<VecDeque<(u64, u64)>>,
    pub retention: RetentionStatus,
}

/// The storage figures as the dashboard shows them (operator only).
#[derive(Clone, Debug, Default, Serialize)]
pub struct StorageView {
    pub disk_bytes: u64,
    /// The hot store alone: the ledger node's journal and index (`ledger/`).
    pub hot_bytes: u64,
    pub free_bytes: u64,
    /// Bytes a day, from the samples (None until they span 30 s).
    pub growth_bytes_per_day: Option<i64>,
    /// Days until the filesystem is full at that growth (None when not growing).
    pub days_until_full: Option<f64>,
    pub retention_enabled: bool,
    pub hot_windows: u64,
    pub pruned_through: u64,
    pub cleared_through: u64,
    pub retention_blocked: bool,
    pub retention_error: Option<String>,
}

/// Allocated bytes of the files in `dir` and its subdirectories (at most 4 levels deep; symbolic
/// links are not followed).
pub fn dir_bytes(dir: &Path) -> u64 {
    fn walk(dir: &Path, depth: u32) -> u64 {
        use std::os::unix::fs::MetadataExt;
        let Ok(entries) = std::fs::read_dir(dir) else {
            return 0;
        };
        let mut total = 0;
        for entry in entries.flatten() {
            let Ok(meta) = entry.path().symlink_metadata() else {
                continue;
            };
            if meta.is_dir() {
                if depth > 0 {
                    total += walk(&entry.path(), depth - 1);
                }
            } else if meta.is_file() {
                total += meta.blocks() * 512;
            }
        }
        total
    }
    walk(dir, 4)
}

impl Storage {
    pub fn new(data_dir: &Path) -> Storage {
        Storage {
            data_dir: data_dir.to_path_buf(),
            samples: Mutex::new(VecDeque::new()),
            retention: RetentionStatus::default(),
        }
    }

    /// Takes a sample when the last is older than [`SAMPLE_INTERVAL_NS`]; the figures.
    pub fn view(&self, now_ns: u64) -> StorageView {
        let mut samples = self.samples.lock().expect("storage samples");
        if samples
            .back()
            .is_none_or(|(at, _)| now_ns.saturating_sub(*at) >= SAMPLE_INTERVAL_NS)
        {
            samples.push_back((now_ns, dir_bytes(&self.data_dir)));
            while samples.len() > SAMPLES_MAX {
                samples.pop_front();
            }
        }
        let (first, last) = (
            *samples.front().expect("one sample"),
            *samples.back().expect("one sample"),
        );
        drop(samples);
        let (free_bytes, _) = clearhouse_engine::node::free_bytes(&self.data_dir);
        let span = last.0.saturating_sub(first.0);
        let growth = (span >= GROWTH_SPAN_MIN_NS).then(|| {
            let grown = i128::from(last.1) - i128::from(first.1);
            (grown * 86_400_000_000_000 / i128::from(span)) as i64
        });
        let r = &self.retention;
        StorageView {
            disk_bytes: last.1,
            hot_bytes: dir_bytes(&self.data_dir.join("ledger")),
            free_bytes,
            growth_bytes_per_day: growth,
            days_until_full: growth
                .filter(|g| *g > 0)
                .map(|g| ((free_bytes as f64 / g as f64) * 10.0).round() / 10.0),
            retention_enabled: r.enabled.load(Ordering::Relaxed),
            hot_windows: r.hot_windows.load(Ordering::Relaxed),
            pruned_through: r.pruned_through.load(Ordering::Relaxed),
            cleared_through: r.cleared_through.load(Ordering::Relaxed),
            retention_blocked: r.blocked.load(Ordering::Relaxed),
            retention_error: r.last_error.lock().expect("retention error").clone(),
        }
    }

    /// Prometheus text: disk, growth, and retention when it is on.
    pub fn render(&self, out: &mut String, now_ns: u64) {
        let view = self.view(now_ns);
        let mut gauge = |name: &str, help: &str, value: String| {
            let kind = if name.ends_with("_total") {
                "counter"
            } else {
                "gauge"
            };
            crate::metrics::metric(out, name, kind, help, &[("", value)]);
        };
        gauge(
            "clearhouse_disk_bytes",
            "Bytes the data directory takes on disk (journal, index, keys, and an archive kept inside it).",
            view.disk_bytes.to_string(),
        );
        gauge(
            "clearhouse_hot_store_bytes",
            "Bytes the hot store takes: the ledger node's journal and index (retention keeps it flat).",
            view.hot_bytes.to_string(),
        );
        gauge(
            "clearhouse_disk_free_bytes",
            "Bytes free on the data directory's filesystem.",
            view.free_bytes.to_string(),
        );
        if let Some(growth) = view.growth_bytes_per_day {
            gauge(
                "clearhouse_disk_growth_bytes_per_day",
                "The data directory's growth, from its size sampled since start.",
                growth.to_string(),
            );
        }
        if let Some(days) = view.days_until_full {
            gauge(
                "clearhouse_disk_days_until_full",
                "Days until the filesystem is full at the measured growth.",
                days.to_string(),
            );
        }
        if view.retention_enabled {
            let r = &self.retention;
            gauge(
                "clearhouse_retention_pruned_through_window",
                "Settled windows 1 to this one have left the hot store (they are in the archive).",
                view.pruned_through.to_string(),
            );
            gauge(
                "clearhouse_retention_tombstones_cleared_through_window",
                "Windows whose duplicate window is over and whose tombstones are gone too.",
                view.cleared_through.to_string(),
            );
            gauge(
                "clearhouse_retention_blocked",
                "1 while pruning is stopped (archive missing, unreadable or not matching).",
                u8::from(view.retention_blocked).to_string(),
            );
            gauge(
                "clearhouse_retention_payments_pruned_total",
                "Payments moved out of the hot store since start.",
                r.payments_pruned_total.load(Ordering::Relaxed).to_string(),
            );
            gauge(
                "clearhouse_retention_windows_pruned_total",
                "Windows pruned since start.",
                r.windows_pruned_total.load(Ordering::Relaxed).to_string(),
            );
        }
    }
}
