//! Helpers every subcommand shares: the node options of a switch's data directory, progress
//! bars on stderr (recovery, long jobs), benchmark data directories, percentiles, the machine's
//! description. It imports no subcommand.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clearhouse_engine::NodeOptions;

/// The node under the switch (serve, and the CLI commands that open a switch's data directory):
/// payments arrive as many small groups, so the index takes them in fewer, larger transactions.
pub(crate) fn switch_node_options(data_dir: &Path) -> NodeOptions {
    let mut options = NodeOptions::new(data_dir.join("ledger"));
    options.recovery_progress = Some(recovery_progress);
    options.group_requests_max = 256;
    options.request_queue_max = 8192;
    options.index_transaction_interval_min = Duration::from_millis(50);
    options.index_jobs_per_transaction_max = 256;
    options.index_queue_max = 256;
    // The switch answers from payment records, vouchers and statements, never from account
    // history: its index keeps none (about a sixth less written per payment).
    options.account_history = false;
    options
}

/// Basis points as a percentage with two decimals, in integers: 9940 -> "99.40 %".
pub(crate) fn percent_of_bp(bp: u64) -> String {
    format!("{}.{:02} %", bp / 100, bp % 100)
}

/// The operator key file (`<key id> <hex secret>`): its key id and secret.
pub(crate) fn read_operator_key(path: &std::path::Path) -> anyhow::Result<(String, Vec<u8>)> {
    use anyhow::Context;
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the operator key {}", path.display()))?;
    let mut parts = text.split_whitespace();
    let key_id = parts.next().context("operator key id")?.to_string();
    let secret = hex::decode(parts.next().context("operator secret")?)
        .context("the operator secret is hex")?;
    Ok((key_id, secret))
}

/// Progress on stderr when it is a terminal: one line, rewritten.
pub(crate) struct Progress {
    label: &'static str,
    pub(crate) total: u64,
    unit: &'static str,
    shown: bool,
    last: Instant,
}

impl Progress {
    pub(crate) fn new(label: &'static str, total: u64, unit: &'static str) -> Progress {
        Progress {
            label,
            total,
            unit,
            shown: std::io::stderr().is_terminal(),
            last: Instant::now() - Duration::from_secs(1),
        }
    }

    pub(crate) fn update(&mut self, done: u64) {
        if !self.shown || self.last.elapsed() < Duration::from_millis(100) {
            return;
        }
        self.last = Instant::now();
        draw_bar(self.label, done, self.total, self.unit);
    }

    pub(crate) fn finish(&mut self) {
        if self.shown {
            self.last = Instant::now() - Duration::from_secs(1);
            self.update(self.total);
            eprintln!();
        }
    }
}

/// One line of a progress bar on stderr, rewritten in place.
fn draw_bar(label: &str, done: u64, total: u64, unit: &str) {
    let width = 30u64;
    let done = done.min(total);
    let filled = ((done * width).checked_div(total).unwrap_or(0)) as usize;
    let percent = (done * 100).checked_div(total).unwrap_or(0);
    eprint!(
        "\r{label} [{}{}] {percent:>3}% {done} / {total} {unit}",
        "#".repeat(filled),
        " ".repeat(width as usize - filled),
    );
}

/// A progress bar for the engine's recovery (journal replay), on stderr when it is a terminal.
pub(crate) fn recovery_progress(done: u64, total: u64) {
    if !std::io::stderr().is_terminal() || total == 0 {
        return;
    }
    draw_bar("recovery", done, total, "journal records");
    if done >= total {
        eprintln!();
    }
}

/// p-th percentile (0..=100) of sorted durations, in milliseconds (3 decimals).
pub(crate) fn percentile_ms(sorted: &[Duration], p: u64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((sorted.len() as u64 - 1) * p).div_ceil(100) as usize;
    (sorted[rank].as_micros() as f64 / 1000.0 * 1000.0).round() / 1000.0
}

pub(crate) fn data_dir(
    given: &Option<PathBuf>,
) -> anyhow::Result<(PathBuf, Option<tempfile::TempDir>)> {
    match given {
        Some(dir) => {
            if dir.exists() && std::fs::read_dir(dir)?.next().is_some() {
                bail!(
                    "data directory {} is not empty; the benchmark needs a fresh one",
                    dir.display()
                );
            }
            Ok((dir.clone(), None))
        }
        None => {
            let temp = tempfile::Builder::new()
                .prefix("clearhouse-bench-")
                .tempdir_in(std::env::current_dir()?)
                .context("creating a temporary data directory")?;
            Ok((temp.path().to_path_buf(), Some(temp)))
        }
    }
}

pub(crate) fn machine() -> String {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split(':').nth(1))
                .map(|name| name.trim().to_string())
        })
        .unwrap_or_default();
    format!("{cpus} cpus, {model}")
}

/// Bytes allocated on disk under `dir` (st_blocks, so preallocated journal segments count at their
/// reserved size), recursively; files that vanish while walking are skipped.
pub(crate) fn disk_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut total = 0;
    for entry in entries.flatten() {
        let Ok(metadata) = entry.metadata() else {
            continue;
        };
        if metadata.is_dir() {
            total += disk_bytes(&entry.path());
        } else {
            total += metadata.blocks() * 512;
        }
    }
    total
}
