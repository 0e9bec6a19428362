//! Settlement windows on the live switch: positions accumulated at commit time, exact cut-over,
//! multilateral net settlement posted as one linked ledger batch, signed checkpoints of the
//! voucher chain, and internal reconciliation.
//!
//! Exactness: the engine answers submits in journal order on one thread. Settled payments and
//! returns are added to the open window's accumulators in their commit callback, and a close
//! swaps the accumulators in its own commit callback, so every payment lands in exactly the
//! window its place in the journal (and in the voucher chain) says, and closing pauses nothing.
//! After a restart the open window's accumulators are recomputed from the vouchers.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use clearhouse_clearing::event::VoucherEvent;
use clearhouse_clearing::export::{sign_checkpoint, Checkpoint};
use clearhouse_clearing::netting::{
    accumulators_from_vouchers, Accumulators, SettlementPlan, WindowAccumulation,
};
use clearhouse_clearing::report::{Break, WindowReport, WindowState};
use clearhouse_engine::{Node, RecordPut, SubmitOutcome};
use clearhouse_ledger::{CreateTransferResult, Transfer, TransferFlags};
use ed25519_dalek::{SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::clock::now_ns;
use crate::engine_io::{blocking, engine_submit, submit_then, write_private};
use crate::error::{internal, ApiError};
use crate::model::*;
use crate::money::currency;

mod retention;
mod settlement;
mod statements;
mod vouchers;

pub use retention::{retention_state_of, PruneReport, RetentionState, PRUNE_PAYMENTS_MAX};
use statements::StatementsBuilt;
pub use statements::{statement_camt053, statement_camt054};
pub use vouchers::{
    export_vouchers, participant_view, verify_data_dir, walk_vouchers, VoucherPage,
    VOUCHER_PAGE_MAX,
};

/// Vouchers read per index query when scanning the chain.
const VOUCHER_PAGE: usize = 8_192;
/// Windows kept in memory with their plans.
const WINDOWS_CACHED_MAX: usize = 64;
/// Bytes of plan JSON per record (records hold at most 4 KiB).
const PLAN_CHUNK_BYTES: usize = 3_900;
/// Attempts of a settlement batch that a receiver's spending raced (then the window stays closed).
const SETTLE_ATTEMPTS_MAX: u32 = 4;
/// Most windows listed at once.
pub const WINDOWS_LISTED_MAX: u64 = 100;

/// The data directory's [`KeyScheme`]: named by its record, else legacy when a clearing state
/// exists under the legacy key, else None (a new directory: [`Clearing::start`] chooses compact).
pub fn key_scheme_of(node: &Node) -> Result<Option<KeyScheme>, ApiError> {
    let legacy_state = KeyScheme::Legacy.clearing_state();
    let mut found = node.get_records(&[KEY_SCHEME_RECORD, legacy_state])?;
    let legacy = found.pop().flatten();
    let named = found.pop().flatten();
    match KeyScheme::from_record(named.as_deref()).map_err(internal)? {
        Some(scheme) => Ok(Some(scheme)),
        None if legacy.is_some() => Ok(Some(KeyScheme::Legacy)),
        None => Ok(None),
    }
}

/// [`key_scheme_of`] for readers of a directory: nothing stored yet reads as compact.
pub fn key_scheme_or_compact(node: &Node) -> Result<KeyScheme, ApiError> {
    Ok(key_scheme_of(node)?.unwrap_or(KeyScheme::Compact))
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct StateRecord {
    /// The open window.
    window: u64,
    opened_at_ns: u64,
}

/// A window as stored: the report without its plan (kept in chunk records), and where its
/// `window_closed` voucher is.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct WindowRecord {
    /// Stored without its plan; the cached copy has it.
    report: WindowReport,
    closed_seq: Option<u64>,
    plan_chunks: u32,
}

struct Live {
    window: u64,
    opened_at_ns: u64,
    current: Accumulators,
    /// Closed windows' accumulators until their plan is stored.
    closed: BTreeMap<u64, Accumulators>,
}

pub struct Clearing {
    node: Node,
    /// How this directory derives its hash-keyed record and transfer ids.
    pub keys: KeyScheme,
    key: SigningKey,
    live: Arc<Mutex<Live>>,
    /// Close and settle run one at a time.
    admin: tokio::sync::Mutex<()>,
    /// Retention (pruning, clearing tombstones) runs one step at a time.
    retention: tokio::sync::Mutex<()>,
    /// Recent windows as stored (with their plans), so close and settle never wait for the index.
    cache: Mutex<BTreeMap<u64, WindowRecord>>,
    /// Closing booked balances of recent windows (statements chain them: a window's opening is
    /// the previous closing); at most [`CLOSING_BALANCES_CACHED_MAX`] windows.
    closings: Mutex<BTreeMap<u64, Arc<clearhouse_clearing::statement::Balances>>>,
    /// Every participant's statements of the window built last. Statements are built one window
    /// at a time under this lock, so a burst of statement requests after a close builds the
    /// window once and holds one window's statements in memory, not one copy per request.
    statements_built: StatementsBuilt,
    /// Reconciliation breaks found since start (alarm), and accumulation failures.
    pub breaks_total: AtomicU64,
    pub windows_closed: AtomicU64,
    pub windows_settled: AtomicU64,
}

/// Which positions settle net: (participant, currency) -> deferred net?
pub type SettlementModels = BTreeMap<(String, String), bool>;

pub fn settlement_models(participants: &BTreeMap<String, Participant>) -> SettlementModels {
    participants
        .values()
        .flat_map(|p| {
            p.currencies.iter().map(|(code, terms)| {
                (
                    (p.bic.clone(), code.clone()),
                    terms.model == SettlementModel::DeferredNet,
                )
            })
        })
        .collect()
}

/// The operator's Ed25519 key that signs checkpoints: `operator-ed25519.key` (hex seed, 0600) in
/// the data directory, created on first start, with the public key beside it.
pub fn load_or_create_signing_key(data_dir: &Path) -> std::io::Result<SigningKey> {
    let path = data_dir.join("operator-ed25519.key");
    let key = match std::fs::read_to_string(&path) {
        Ok(text) => {
            let seed: [u8; 32] = hex::decode(text.trim())
                .ok()
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| {
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("{} is not 32 bytes of hex", path.display()),
                    )
                })?;
            SigningKey::from_bytes(&seed)
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            let mut seed = [0u8; 32];
            getrandom::fill(&mut seed).expect("operating system randomness");
            write_private(&path, hex::encode(seed).as_bytes())?;
            SigningKey::from_bytes(&seed)
        }
        Err(error) => return Err(error),
    };
    std::fs::write(
        data_dir.join("operator-ed25519.pub"),
        format!("{}\n", hex::encode(key.verifying_key().as_bytes())),
    )?;
    Ok(key)
}

fn deferred(models: &SettlementModels) -> impl Fn(&str, &str) -> bool + '_ {
    |bic, code| {
        models
            .get(&(bic.to_string(), code.to_string()))
            .copied()
            .unwrap_or(false)
    }
}

impl Clearing {
    /// Loads the clearing state, recomputes the open window's positions from the vouchers, and
    /// completes any window whose close was interrupted (checkpoint and plan).
    pub async fn start(
        node: Node,
        key: SigningKey,
        models: &SettlementModels,
    ) -> Result<Clearing, ApiError> {
        let (keys, fresh) = {
            let node = node.clone();
            match blocking(move || Ok(key_scheme_of(&node))).await?? {
                Some(keys) => (keys, false),
                None => (KeyScheme::Compact, true),
            }
        };
        let state = match read_json::<StateRecord>(&node, keys.clearing_state()).await? {
            Some(state) => state,
            None => {
                let state = StateRecord {
                    window: 1,
                    opened_at_ns: now_ns(),
                };
                let mut puts = vec![plain(keys.clearing_state(), &state)];
                if fresh {
                    // The scheme is written with the first state: one journal record.
                    puts.push(RecordPut {
                        key: KEY_SCHEME_RECORD,
                        value: KEY_SCHEME_COMPACT.to_vec(),
                        ..RecordPut::default()
                    });
                }
                engine_submit(&node, vec![], puts).await?;
                state
            }
        };
        // Scan from the last window whose closing voucher is known.
        let mut start_window = 1;
        let mut start_seq = 1;
        let mut back = state.window.saturating_sub(1);
        while back >= 1 {
            if let Some(record) = read_json::<WindowRecord>(&node, keys.window(back)).await? {
                if let Some(seq) = record.closed_seq {
                    start_window = back + 1;
                    start_seq = seq + 1;
                    break;
                }
            }
            back -= 1;
        }
        // One page in memory at a time: the open window can be long (windows close only by
        // schedule or by the operator).
        let mut accumulation = WindowAccumulation::new(start_window);
        let mut closes = BTreeMap::new();
        let mut from = start_seq;
        loop {
            let page = {
                let node = node.clone();
                blocking(move || node.vouchers(from, VOUCHER_PAGE)).await?
            };
            let Some(last) = page.last() else { break };
            from = last.seq + 1;
            for voucher in page {
                let event = VoucherEvent::parse(&voucher.body).map_err(|error| {
                    internal(format!("voucher {} does not parse: {error}", voucher.seq))
                })?;
                if let VoucherEvent::WindowClosed { window, .. } = &event {
                    closes.insert(*window, (voucher.seq, voucher.hash));
                }
                accumulation.add(&event).map_err(internal)?;
            }
        }
        let (mut windows, open) = accumulation.finish();
        if open != state.window {
            return Err(internal(format!(
                "the vouchers end in window {open} but the clearing state says window {} is open",
                state.window
            )));
        }
        let current = windows.remove(&state.window).unwrap_or_default();
        let clearing = Clearing {
            node,
            keys,
            key,
            live: Arc::new(Mutex::new(Live {
                window: state.window,
                opened_at_ns: state.opened_at_ns,
                current,
                closed: BTreeMap::new(),
            })),
            admin: tokio::sync::Mutex::new(()),
            retention: tokio::sync::Mutex::new(()),
            cache: Mutex::new(BTreeMap::new()),
            closings: Mutex::new(BTreeMap::new()),
            statements_built: tokio::sync::Mutex::new(None),
            breaks_total: AtomicU64::new(0),
            windows_closed: AtomicU64::new(0),
            windows_settled: AtomicU64::new(0),
        };
        for (window, accumulators) in windows {
            let Some(&(seq, hash)) = closes.get(&window) else {
                continue;
            };
            tracing::warn!(window, "completing a window whose close was interrupted");
            let times = clearing.closing_time(seq).await?;
            clearing
                .complete_close(window, seq, hash, times, &accumulators, models)
                .await?;
        }
        Ok(clearing)
    }

    pub fn public_key(&self) -> VerifyingKey {
        self.key.verifying_key()
    }

    /// The open window and its start.
    pub fn open_window(&self) -> (u64, u64) {
        let live = self.live.lock().expect("clearing");
        (live.window, live.opened_at_ns)
    }

    /// A commit hook: counts a settled payment or return in the open window. Runs on the engine's
    /// answering thread, in journal order.
    pub fn counter(&self) -> impl Fn(&str, &str, &str, u128) + Send + Sync + 'static {
        let live = self.live.clone();
        move |payer, payee, code, amount| {
            let mut live = live.lock().expect("clearing");
            if let Err(error) = live.current.add(payer, payee, code, amount) {
                // Money did move on the ledger; reconciliation at close will show the break.
                tracing::error!(%error, payer, payee, "cannot count a settled amount in the window");
            }
        }
    }

    /// Snapshot of the open window's positions, as a preview plan.
    pub fn preview(&self, models: &SettlementModels) -> Result<WindowReport, ApiError> {
        let (window, opened_at_ns, accumulators) = {
            let live = self.live.lock().expect("clearing");
            (live.window, live.opened_at_ns, live.current.clone())
        };
        let plan =
            SettlementPlan::compute(window, &accumulators, deferred(models)).map_err(internal)?;
        Ok(WindowReport {
            window,
            state: WindowState::Open,
            opened_at_ns,
            closed_at_ns: None,
            settled_at_ns: None,
            checkpoint: None,
            plan: Some(plan),
            carried: vec![],
            breaks: vec![],
            reconciled: false,
        })
    }

    /// Closes the open window: the cut-over voucher and the next window's state are one journal
    /// record, the accumulators are swapped in its commit callback, then the chain head is signed
    /// and the plan stored. With `settle`, the window is settled right after.
    pub async fn close(
        &self,
        models: &SettlementModels,
        settle: bool,
    ) -> Result<WindowReport, ApiError> {
        let report = {
            let _admin = self.admin.lock().await;
            let (window, opened_at_ns) = self.open_window();
            let closed_at_ns = now_ns();
            let event = VoucherEvent::WindowClosed {
                window,
                opened_at_ns,
                closed_at_ns,
            };
            let next = StateRecord {
                window: window + 1,
                opened_at_ns: closed_at_ns,
            };
            let mut record = plain(self.keys.clearing_state(), &next);
            record.voucher = Some(event.to_bytes());
            let live = self.live.clone();
            let outcome = submit_then(&self.node, vec![], vec![record], move |outcome| {
                if outcome.written[0] {
                    let mut live = live.lock().expect("clearing");
                    assert_eq!(live.window, window, "windows close one at a time");
                    let accumulators = std::mem::take(&mut live.current);
                    live.closed.insert(window, accumulators);
                    live.window = window + 1;
                    live.opened_at_ns = closed_at_ns;
                }
            })
            .await?;
            let stamp = outcome.vouchers[0].expect("an unconditional record is written");
            let accumulators = self
                .live
                .lock()
                .expect("clearing")
                .closed
                .remove(&window)
                .expect("swapped in the commit callback");
            self.windows_closed.fetch_add(1, Ordering::Relaxed);
            let report = self
                .complete_close(
                    window,
                    stamp.seq,
                    stamp.hash,
                    (closed_at_ns, opened_at_ns),
                    &accumulators,
                    models,
                )
                .await?;
            tracing::info!(
                window,
                voucher = stamp.seq,
                positions = report.plan.as_ref().map_or(0, |p| p.positions.len()),
                "window closed and signed"
            );
            report
        };
        if settle {
            self.settle(report.window).await
        } else {
            Ok(report)
        }
    }

    /// Signs the checkpoint at the closing voucher, computes the plan and stores the window.
    async fn complete_close(
        &self,
        window: u64,
        seq: u64,
        hash: [u8; 32],
        (closed_at_ns, opened_at_ns): (u64, u64),
        accumulators: &Accumulators,
        models: &SettlementModels,
    ) -> Result<WindowReport, ApiError> {
        let checkpoint = sign_checkpoint(&self.key, window, seq, hash);
        let plan =
            SettlementPlan::compute(window, accumulators, deferred(models)).map_err(internal)?;
        let report = WindowReport {
            window,
            state: WindowState::Closed,
            opened_at_ns,
            closed_at_ns: Some(closed_at_ns),
            settled_at_ns: None,
            checkpoint: Some(checkpoint),
            plan: Some(plan),
            carried: vec![],
            breaks: vec![],
            reconciled: false,
        };
        self.store(&report, Some(seq), vec![], vec![]).await?;
        Ok(report)
    }

    /// The close time and open time written in a `window_closed` voucher.
    async fn closing_time(&self, seq: u64) -> Result<(u64, u64), ApiError> {
        let node = self.node.clone();
        let voucher = blocking(move || node.vouchers(seq, 1))
            .await?
            .pop()
            .filter(|v| v.seq == seq)
            .ok_or_else(|| internal(format!("voucher {seq} is missing")))?;
        match VoucherEvent::parse(&voucher.body).map_err(internal)? {
            VoucherEvent::WindowClosed {
                closed_at_ns,
                opened_at_ns,
                ..
            } => Ok((closed_at_ns, opened_at_ns)),
            other => Err(internal(format!(
                "voucher {seq} is {other:?}, not a window close"
            ))),
        }
    }

    /// Writes a window's record and plan chunks, with `transfers` and `extra` records in the same
    /// journal record; the window record is conditional on the last transfer when there are any
    /// (a linked batch: all or nothing).
    async fn store(
        &self,
        report: &WindowReport,
        closed_seq: Option<u64>,
        transfers: Vec<Transfer>,
        mut extra: Vec<RecordPut>,
    ) -> Result<SubmitOutcome, ApiError> {
        let plan_json = serde_json::to_vec(&report.plan).expect("plans serialize");
        let chunks: Vec<&[u8]> = plan_json.chunks(PLAN_CHUNK_BYTES).collect();
        let condition = transfers.len().checked_sub(1).map(|i| i as u32);
        let mut stored = report.clone();
        stored.plan = None;
        let record = WindowRecord {
            report: stored,
            closed_seq,
            plan_chunks: chunks.len() as u32,
        };
        let mut records = Vec::with_capacity(chunks.len() + 1 + extra.len());
        for (i, chunk) in chunks.iter().enumerate() {
            records.push(RecordPut {
                key: self.keys.plan_chunk(report.window, i as u32),
                value: chunk.to_vec(),
                when_transfer_ok: condition,
                ..RecordPut::default()
            });
        }
        records.append(&mut extra);
        let mut window_record = plain(self.keys.window(report.window), &record);
        window_record.when_transfer_ok = condition;
        if report.state == WindowState::Settled {
            window_record.voucher = Some(
                VoucherEvent::WindowSettled {
                    window: report.window,
                    adjustments: transfers.len() as u32,
                    settled_at_ns: report.settled_at_ns.unwrap_or(0),
                }
                .to_bytes(),
            );
        }
        records.push(window_record);
        let outcome = engine_submit(&self.node, transfers, records).await?;
        if outcome.written.last() == Some(&true) {
            self.remember(WindowRecord {
                report: report.clone(),
                closed_seq,
                plan_chunks: chunks.len() as u32,
            });
        }
        Ok(outcome)
    }

    fn remember(&self, record: WindowRecord) {
        let mut cache = self.cache.lock().expect("clearing cache");
        cache.insert(record.report.window, record);
        while cache.len() > WINDOWS_CACHED_MAX {
            cache.pop_first();
        }
    }

    /// A stored window with its plan: from memory, else from the index.
    async fn window_record(&self, window: u64) -> Result<Option<WindowRecord>, ApiError> {
        if let Some(record) = self.cache.lock().expect("clearing cache").get(&window) {
            return Ok(Some(record.clone()));
        }
        let Some(mut record) =
            read_json::<WindowRecord>(&self.node, self.keys.window(window)).await?
        else {
            return Ok(None);
        };
        let keys: Vec<u128> = (0..record.plan_chunks)
            .map(|i| self.keys.plan_chunk(window, i))
            .collect();
        let chunks = {
            let node = self.node.clone();
            blocking(move || node.get_records(&keys)).await?
        };
        let mut plan = Vec::new();
        for chunk in chunks {
            plan.extend(chunk.ok_or_else(|| internal("a plan chunk is missing"))?);
        }
        if !plan.is_empty() {
            record.report.plan = serde_json::from_slice(&plan).map_err(internal)?;
        }
        self.remember(record.clone());
        Ok(Some(record))
    }

    async fn closed_seq(&self, window: u64) -> Result<Option<u64>, ApiError> {
        Ok(self.window_record(window).await?.and_then(|r| r.closed_seq))
    }

    /// A stored window (or the open one, as a preview).
    pub async fn report(
        &self,
        window: u64,
        models: &SettlementModels,
    ) -> Result<WindowReport, ApiError> {
        if window == self.open_window().0 {
            return self.preview(models);
        }
        let record = self
            .window_record(window)
            .await?
            .ok_or_else(|| ApiError::new(404, "not_found", format!("window {window} not found")))?;
        let report = record.report;
        Ok(report)
    }

    /// The most recent windows, newest first (the open one included).
    pub async fn list(
        &self,
        models: &SettlementModels,
        limit: u64,
    ) -> Result<Vec<WindowReport>, ApiError> {
        let (open, _) = self.open_window();
        let mut out = vec![self.preview(models)?];
        let mut window = open - 1;
        let limit = limit.clamp(1, WINDOWS_LISTED_MAX);
        while window >= 1 && (out.len() as u64) < limit {
            let mut report = self.report(window, models).await?;
            report.plan = report.plan.map(|mut plan| {
                plan.positions.clear();
                plan.instructions.clear();
                plan
            });
            out.push(report);
            window -= 1;
        }
        Ok(out)
    }
}

fn plain<T: Serialize>(key: u128, value: &T) -> RecordPut {
    RecordPut {
        key,
        value: serde_json::to_vec(value).expect("clearing records serialize"),
        ..RecordPut::default()
    }
}

async fn read_json<T: serde::de::DeserializeOwned + Send + 'static>(
    node: &Node,
    key: u128,
) -> Result<Option<T>, ApiError> {
    let node = node.clone();
    let value = blocking(move || node.get_records(&[key]))
        .await?
        .pop()
        .flatten();
    match value {
        None => Ok(None),
        Some(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|error| internal(format!("clearing record {key:x}: {error}"))),
    }
}
