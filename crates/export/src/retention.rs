//! The retention driver: moves settled windows out of the switch's hot store once the Parquet
//! archive holds them, oldest first, and never before.
//!
//! Every `interval_ms` it looks at the next window to prune (the one after the last pruned):
//! when more than `hot_windows` closed windows are newer than it, it reads that window's archive
//! file back ([`crate::archive::read_window`]: every hash recomputed, the checkpoint's signature
//! checked), checks the file against the window's report (its checkpoint, and the count of
//! payments and returns it settled), and hands the file's (sequence, hash) list to
//! `Clearing::prune_window`, which checks it against the hot chain voucher by voucher before
//! anything leaves. A missing, unreadable or differing archive stops pruning, loudly: an error in
//! the log, `clearhouse_retention_blocked 1` on `/metrics`, the reason on the dashboard; it is
//! retried every interval and pruning resumes by itself once the archive is right.
//!
//! When a pruned window's duplicate window has passed (`duplicate_window_seconds` after its
//! close), its tombstones and instruction aliases go too (the keys read from its archive file).

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use clearhouse_switch::switch::{Caller, Switch};

use crate::archive::{self, ParquetSink};
use crate::ExportError;

/// The `[retention]` section of the switch's configuration.
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionConfig {
    /// Closed windows kept hot (the newest ones); older settled windows are pruned once the
    /// archive holds them. At least 1.
    pub hot_windows: u64,
    /// The name of the `[[export]]` with sink "parquet" whose files are the archive.
    pub archive: String,
    /// How long after its window closed an instruction id is still refused as a duplicate
    /// (default 7 days).
    #[serde(default = "default_duplicate_window_seconds")]
    pub duplicate_window_seconds: u64,
    /// How often retention looks for work (default 10 s).
    #[serde(default = "default_interval_ms")]
    pub interval_ms: u64,
}

fn default_duplicate_window_seconds() -> u64 {
    7 * 86_400
}
fn default_interval_ms() -> u64 {
    10_000
}

impl RetentionConfig {
    /// Checks the section against the exports; the archive's directory.
    pub fn archive_dir(
        &self,
        exports: &[crate::ExportConfig],
        data_dir: &Path,
    ) -> Result<PathBuf, ExportError> {
        if self.hot_windows == 0 {
            return Err(ExportError::Config(
                "[retention] hot_windows must be at least 1".into(),
            ));
        }
        if !(100..=3_600_000).contains(&self.interval_ms) {
            return Err(ExportError::Config(
                "[retention] interval_ms is 100 to 3,600,000".into(),
            ));
        }
        let export = exports
            .iter()
            .find(|e| e.name == self.archive)
            .ok_or_else(|| {
                ExportError::Config(format!(
                    "[retention] archive = {:?} names no [[export]]",
                    self.archive
                ))
            })?;
        match export.sink_config()? {
            crate::SinkConfig::Parquet(dir) => Ok(data_dir.join(dir)),
            _ => Err(ExportError::Config(format!(
                "[retention] archive = {:?} is not a parquet export",
                self.archive
            ))),
        }
    }
}

/// What one look did.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    Pruned(u64),
    Cleared(u64),
    Nothing,
}

/// Starts the retention driver on the switch in this process.
pub fn spawn(
    switch: &Arc<Switch>,
    config: RetentionConfig,
    archive_dir: PathBuf,
) -> tokio::task::JoinHandle<()> {
    let status = &switch.storage.retention;
    status.enabled.store(true, Ordering::Relaxed);
    status
        .hot_windows
        .store(config.hot_windows, Ordering::Relaxed);
    let switch = switch.clone();
    tokio::spawn(async move {
        tracing::info!(hot_windows = config.hot_windows, archive = %archive_dir.display(), "retention: pruning settled windows behind the archive");
        loop {
            let status = &switch.storage.retention;
            match step(&switch, &config, &archive_dir).await {
                Ok(step) => {
                    if status.blocked.swap(false, Ordering::Relaxed) {
                        tracing::info!("retention: pruning resumed");
                    }
                    *status.last_error.lock().expect("retention error") = None;
                    if step != Step::Nothing {
                        continue; // more may be due: look again at once
                    }
                }
                Err(error) => {
                    if !status.blocked.swap(true, Ordering::Relaxed) {
                        tracing::error!(%error, "retention: pruning stopped; the hot store keeps growing until the archive is right");
                    }
                    *status.last_error.lock().expect("retention error") = Some(error);
                }
            }
            tokio::time::sleep(Duration::from_millis(config.interval_ms)).await;
        }
    })
}

async fn step(
    switch: &Arc<Switch>,
    config: &RetentionConfig,
    archive_dir: &Path,
) -> Result<Step, String> {
    let clearing = &switch.clearing;
    let state = clearing
        .retention_state()
        .await
        .map_err(|e| e.to_string())?;
    let status = &switch.storage.retention;
    status
        .pruned_through
        .store(state.pruned_through, Ordering::Relaxed);
    status
        .cleared_through
        .store(state.cleared_through, Ordering::Relaxed);
    let key = clearing.public_key();
    // Tombstones of windows whose duplicate window is over.
    let clear = state.cleared_through + 1;
    if clear <= state.pruned_through {
        let report = switch
            .window_report(&Caller::Operator, clear)
            .await
            .map_err(|e| e.to_string())?;
        let closed = report.closed_at_ns.unwrap_or(u64::MAX);
        let due = closed.saturating_add(config.duplicate_window_seconds * 1_000_000_000);
        if due <= clearhouse_switch::clock::now_ns() {
            let read = read_archive(archive_dir, clear, &key).await?;
            let cleared = clearing
                .clear_tombstones(clear, &read.payments)
                .await
                .map_err(|e| e.to_string())?;
            status.cleared_through.store(clear, Ordering::Relaxed);
            tracing::info!(
                window = clear,
                cleared,
                "retention: duplicate window over; tombstones removed"
            );
            return Ok(Step::Cleared(clear));
        }
    }
    let next = state.pruned_through + 1;
    let (open, _) = clearing.open_window();
    if next + config.hot_windows >= open {
        return Ok(Step::Nothing);
    }
    let report = switch
        .window_report(&Caller::Operator, next)
        .await
        .map_err(|e| e.to_string())?;
    if report.state != clearhouse_clearing::report::WindowState::Settled {
        return Err(format!(
            "window {next} is older than the hot horizon but not settled: it is pruned once settled"
        ));
    }
    let read = read_archive(archive_dir, next, &key).await?;
    let checkpoint = report
        .checkpoint
        .as_ref()
        .ok_or_else(|| format!("window {next} has no signed checkpoint"))?;
    if read.checkpoint != *checkpoint {
        return Err(format!(
            "the archive file of window {next} ends at voucher {} but the window's checkpoint is voucher {}",
            read.checkpoint.seq, checkpoint.seq
        ));
    }
    // The window's report counts what settled in it (payments and returns, each once).
    let counted: u64 = report
        .plan
        .as_ref()
        .map_or(0, |plan| plan.positions.iter().map(|p| p.sent_count).sum());
    if counted != read.settled + read.returned {
        return Err(format!(
            "the archive file of window {next} holds {} settled payments and {} returns, the window's report counts {counted}",
            read.settled, read.returned
        ));
    }
    let started = std::time::Instant::now();
    let pruned = switch
        .prune_window(next, &read.vouchers)
        .await
        .map_err(|e| e.to_string())?;
    status.pruned_through.store(next, Ordering::Relaxed);
    status.windows_pruned_total.fetch_add(1, Ordering::Relaxed);
    status
        .payments_pruned_total
        .fetch_add(pruned.payments, Ordering::Relaxed);
    tracing::info!(
        window = next,
        payments = pruned.payments,
        prunes = pruned.prunes,
        ms = started.elapsed().as_millis() as u64,
        "retention: window archived and pruned"
    );
    Ok(Step::Pruned(next))
}

/// Reads a window's archive file back (on the blocking pool).
async fn read_archive(
    dir: &Path,
    window: u64,
    key: &ed25519_dalek::VerifyingKey,
) -> Result<archive::ReadWindow, String> {
    let path = dir.join(archive::file_name(window));
    if !path.exists() {
        let have = ParquetSink::files(dir)
            .map(|files| files.last().map(|(w, _)| *w))
            .unwrap_or(None);
        return Err(format!(
            "the archive has no file for window {window} ({}; newest file: window {})",
            path.display(),
            have.map_or("none".to_string(), |w| w.to_string())
        ));
    }
    let key = *key;
    tokio::task::spawn_blocking(move || archive::read_window(&path, &key, None))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())
}
