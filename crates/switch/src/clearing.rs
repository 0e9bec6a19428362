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
use clearhouse_clearing::netting::{accumulators_from_vouchers, Accumulators, SettlementPlan};
use clearhouse_clearing::report::{Break, WindowReport, WindowState};
use clearhouse_engine::{EngineError, Node, RecordPut, SubmitOutcome};
use clearhouse_ledger::{CreateTransferResult, Transfer, TransferFlags};
use ed25519_dalek::{SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::model::*;
use crate::money::currency;
use crate::switch::{blocking, engine_submit, now_ns, write_private, ApiError};

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

fn state_key() -> u128 {
    id128(&[b"clearing-state"])
}
fn window_key(window: u64) -> u128 {
    id128(&[b"window", &window.to_le_bytes()])
}
fn plan_chunk_key(window: u64, chunk: u32) -> u128 {
    id128(&[b"window-plan", &window.to_le_bytes(), &chunk.to_le_bytes()])
}
/// Windows whose closing booked balances are kept in memory for statements.
const CLOSING_BALANCES_CACHED_MAX: usize = 64;

pub fn fund_adjustment_id(window: u64, bic: &str, currency: &str) -> u128 {
    id128(&[
        b"fund-adjustment",
        &window.to_le_bytes(),
        bic.as_bytes(),
        currency.as_bytes(),
    ])
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
    key: SigningKey,
    live: Arc<Mutex<Live>>,
    /// Close and settle run one at a time.
    admin: tokio::sync::Mutex<()>,
    /// Recent windows as stored (with their plans), so close and settle never wait for the index.
    cache: Mutex<BTreeMap<u64, WindowRecord>>,
    /// Closing booked balances of recent windows (statements chain them: a window's opening is
    /// the previous closing); at most [`CLOSING_BALANCES_CACHED_MAX`] windows.
    closings: Mutex<BTreeMap<u64, Arc<clearhouse_clearing::statement::Balances>>>,
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

/// Submits and runs `on_commit` on the engine's answering thread, in journal order, before the
/// caller is woken.
pub async fn submit_then(
    node: &Node,
    transfers: Vec<Transfer>,
    records: Vec<RecordPut>,
    on_commit: impl FnOnce(&SubmitOutcome) + Send + 'static,
) -> Result<SubmitOutcome, EngineError> {
    let (sender, receiver) = oneshot::channel();
    node.submit_with(transfers, records, move |result| {
        if let Ok(outcome) = &result {
            on_commit(outcome);
        }
        let _ = sender.send(result);
    })?;
    receiver.await.unwrap_or_else(|_| {
        Err(EngineError::Stopped {
            reason: "the engine dropped the request".into(),
        })
    })
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

fn internal(error: impl std::fmt::Display) -> ApiError {
    ApiError::new(500, "clearing_failed", error.to_string())
}

impl Clearing {
    /// Loads the clearing state, recomputes the open window's positions from the vouchers, and
    /// completes any window whose close was interrupted (checkpoint and plan).
    pub async fn start(
        node: Node,
        key: SigningKey,
        models: &SettlementModels,
    ) -> Result<Clearing, ApiError> {
        let state = match read_json::<StateRecord>(&node, state_key()).await? {
            Some(state) => state,
            None => {
                let state = StateRecord {
                    window: 1,
                    opened_at_ns: now_ns(),
                };
                engine_submit(&node, vec![], vec![plain(state_key(), &state)]).await?;
                state
            }
        };
        // Scan from the last window whose closing voucher is known.
        let mut start_window = 1;
        let mut start_seq = 1;
        let mut back = state.window.saturating_sub(1);
        while back >= 1 {
            if let Some(record) = read_json::<WindowRecord>(&node, window_key(back)).await? {
                if let Some(seq) = record.closed_seq {
                    start_window = back + 1;
                    start_seq = seq + 1;
                    break;
                }
            }
            back -= 1;
        }
        let mut events = Vec::new();
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
                events.push(event);
            }
        }
        let (mut windows, open) =
            accumulators_from_vouchers(start_window, &events).map_err(internal)?;
        if open != state.window {
            return Err(internal(format!(
                "the vouchers end in window {open} but the clearing state says window {} is open",
                state.window
            )));
        }
        let current = windows.remove(&state.window).unwrap_or_default();
        let clearing = Clearing {
            node,
            key,
            live: Arc::new(Mutex::new(Live {
                window: state.window,
                opened_at_ns: state.opened_at_ns,
                current,
                closed: BTreeMap::new(),
            })),
            admin: tokio::sync::Mutex::new(()),
            cache: Mutex::new(BTreeMap::new()),
            closings: Mutex::new(BTreeMap::new()),
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
            let mut record = plain(state_key(), &next);
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
                key: plan_chunk_key(report.window, i as u32),
                value: chunk.to_vec(),
                when_transfer_ok: condition,
                ..RecordPut::default()
            });
        }
        records.append(&mut extra);
        let mut window_record = plain(window_key(report.window), &record);
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
        let Some(mut record) = read_json::<WindowRecord>(&self.node, window_key(window)).await?
        else {
            return Ok(None);
        };
        let keys: Vec<u128> = (0..record.plan_chunks)
            .map(|i| plan_chunk_key(window, i))
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

    /// Settles a closed window: every fund adjustment in one linked ledger batch, with a voucher
    /// each and the window's `window_settled` voucher, all or nothing; then reconciles.
    /// Idempotent: settling a settled window answers its report.
    pub async fn settle(&self, window: u64) -> Result<WindowReport, ApiError> {
        let mut report = self.settle_only(window).await?;
        if report.reconciled {
            return Ok(report);
        }
        if report.carried.is_empty() {
            // Settled by a batch that a crash separated from its reconciliation: the carried
            // amounts (computed after the batch) are read again from the ledger.
            if let Some(plan) = report.plan.clone() {
                report.carried = self.carried(window, &plan).await?;
            }
        }
        self.reconcile(window, report).await
    }

    /// What each net receiver's fund adjustment could not take back (balancing debit, or no
    /// transfer at all): participant, currency, amount carried.
    async fn carried(
        &self,
        window: u64,
        plan: &SettlementPlan,
    ) -> Result<Vec<(String, String, String)>, ApiError> {
        let ids: Vec<u128> = plan
            .instructions
            .iter()
            .map(|i| fund_adjustment_id(window, &i.participant, &i.currency))
            .collect();
        let moved = if ids.is_empty() {
            vec![]
        } else {
            let node = self.node.clone();
            blocking(move || node.lookup_transfers(ids)).await?
        };
        let moved: BTreeMap<u128, u128> = moved
            .into_iter()
            .map(|s| (s.transfer.id, s.transfer.amount))
            .collect();
        let mut carried = Vec::new();
        for instruction in &plan.instructions {
            let id = fund_adjustment_id(window, &instruction.participant, &instruction.currency);
            let left = instruction
                .net
                .unsigned_abs()
                .saturating_sub(moved.get(&id).copied().unwrap_or(0));
            if left > 0 {
                carried.push((
                    instruction.participant.clone(),
                    instruction.currency.clone(),
                    left.to_string(),
                ));
            }
        }
        Ok(carried)
    }

    /// Position accounts of the plan's net receivers with nothing available: their receipts were
    /// spent in the next window.
    async fn receivers_with_nothing_left(
        &self,
        plan: &SettlementPlan,
    ) -> Result<std::collections::BTreeSet<u128>, ApiError> {
        let receivers: Vec<u128> = plan
            .instructions
            .iter()
            .filter(|i| i.net > 0)
            .filter_map(|i| currency(&i.currency).map(|c| position_account(&i.participant, c.code)))
            .collect();
        if receivers.is_empty() {
            return Ok(Default::default());
        }
        let node = self.node.clone();
        Ok(blocking(move || node.lookup_accounts(receivers))
            .await?
            .into_iter()
            .filter(|a| {
                a.credits_posted
                    .saturating_sub(a.debits_posted)
                    .saturating_sub(a.debits_pending)
                    == 0
            })
            .map(|a| a.id)
            .collect())
    }

    /// Settles without reconciling (see [`Clearing::settle`]).
    pub async fn settle_only(&self, window: u64) -> Result<WindowReport, ApiError> {
        let _admin = self.admin.lock().await;
        let no_models = SettlementModels::new();
        let mut report = self.report(window, &no_models).await?;
        match report.state {
            WindowState::Open => {
                return Err(ApiError::new(
                    409,
                    "window_open",
                    format!("window {window} is open; close it first"),
                ))
            }
            WindowState::Settled => return Ok(report),
            WindowState::Closed => {}
        }
        let plan = report
            .plan
            .clone()
            .ok_or_else(|| internal("closed window without plan"))?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let empty = self.receivers_with_nothing_left(&plan).await?;
            let mut transfers = Vec::with_capacity(plan.instructions.len());
            let mut skipped = Vec::new();
            let mut records = Vec::with_capacity(plan.instructions.len());
            for instruction in &plan.instructions {
                let c = currency(&instruction.currency).ok_or_else(|| {
                    internal(format!("unknown currency {}", instruction.currency))
                })?;
                let position = position_account(&instruction.participant, c.code);
                let settlement = settlement_account(c.code);
                let id = fund_adjustment_id(window, &instruction.participant, c.code);
                if instruction.net > 0 && empty.contains(&position) {
                    // Spent in full in the next window: no transfer (the ledger refuses a balancing
                    // debit that can move nothing); the whole net is carried and reported.
                    skipped.push(records.len());
                    records.push(RecordPut {
                        key: id,
                        value: serde_json::to_vec(instruction).expect("instructions serialize"),
                        voucher: Some(
                            VoucherEvent::FundAdjustment {
                                window,
                                participant: instruction.participant.clone(),
                                currency: instruction.currency.clone(),
                                net: instruction.net,
                            }
                            .to_bytes(),
                        ),
                        ..RecordPut::default()
                    });
                    continue;
                }
                let (debit, credit, flags) = if instruction.net < 0 {
                    // A net payer paid in at the settlement bank: its position is restored.
                    (settlement, position, TransferFlags::LINKED)
                } else {
                    // A net receiver is paid out: what it received leaves its position (at most what
                    // is there; the rest is carried and reported).
                    (
                        position,
                        settlement,
                        TransferFlags::LINKED.with(TransferFlags::BALANCING_DEBIT),
                    )
                };
                records.push(RecordPut {
                    key: id,
                    value: serde_json::to_vec(instruction).expect("instructions serialize"),
                    when_transfer_ok: Some(transfers.len() as u32),
                    voucher: Some(
                        VoucherEvent::FundAdjustment {
                            window,
                            participant: instruction.participant.clone(),
                            currency: instruction.currency.clone(),
                            net: instruction.net,
                        }
                        .to_bytes(),
                    ),
                    ..RecordPut::default()
                });
                transfers.push(Transfer {
                    id,
                    debit_account_id: debit,
                    credit_account_id: credit,
                    amount: instruction.net.unsigned_abs(),
                    ledger: c.numeric,
                    code: TRANSFER_CODE_FUND_ADJUSTMENT,
                    flags,
                    ..Transfer::default()
                });
            }
            if let Some(last) = transfers.last_mut() {
                last.flags = last.flags.without(TransferFlags::LINKED);
            }
            // Skipped instructions' records stand or fall with the linked chain.
            let chain_ok = transfers.len().checked_sub(1).map(|i| i as u32);
            for &i in &skipped {
                records[i].when_transfer_ok = chain_ok;
            }
            if transfers.len() > clearhouse_ledger::BATCH_EVENTS_MAX {
                return Err(ApiError::new(
                    409,
                    "too_many_adjustments",
                    format!(
                        "{} fund adjustments exceed one batch ({})",
                        transfers.len(),
                        clearhouse_ledger::BATCH_EVENTS_MAX
                    ),
                ));
            }
            report.state = WindowState::Settled;
            report.settled_at_ns = Some(now_ns());
            let outcome = self
                .store(&report, self.closed_seq(window).await?, transfers, records)
                .await?;
            let failed = outcome.results.iter().position(|r| {
                !matches!(r, CreateTransferResult::Ok | CreateTransferResult::Exists)
            });
            let Some(failed) = failed else {
                break;
            };
            let cause = outcome
                .results
                .iter()
                .find(|r| {
                    !matches!(
                        r,
                        CreateTransferResult::Ok
                            | CreateTransferResult::Exists
                            | CreateTransferResult::LinkedEventFailed
                    )
                })
                .unwrap_or(&outcome.results[failed]);
            if *cause == CreateTransferResult::ExceedsCredits && attempt < SETTLE_ATTEMPTS_MAX {
                // A receiver spent what was left between the lookup and the batch: again.
                continue;
            }
            return Err(ApiError::new(
                    409,
                    "settlement_refused",
                    format!(
                        "the ledger refused fund adjustment {failed} ({cause:?}); nothing was posted and window {window} stays closed"
                    ),
                ));
        }
        self.windows_settled.fetch_add(1, Ordering::Relaxed);
        report.carried = self.carried(window, &plan).await?;
        tracing::info!(
            window,
            adjustments = plan.instructions.len(),
            "window settled"
        );
        Ok(report)
    }

    /// Internal reconciliation of a settled window: the positions recomputed from the window's
    /// vouchers equal the plan's; every instruction is on the ledger with its amount and
    /// accounts; nets sum to zero (checked when the plan was made). Breaks are stored in the
    /// window's report, counted, and logged as errors.
    pub async fn reconcile(
        &self,
        window: u64,
        mut report: WindowReport,
    ) -> Result<WindowReport, ApiError> {
        let _admin = self.admin.lock().await;
        let mut breaks = Vec::new();
        let events: Vec<VoucherEvent> = self
            .window_events(window)
            .await?
            .into_iter()
            .map(|(_, event)| event)
            .collect();
        let (windows, _) = accumulators_from_vouchers(window, &events).map_err(internal)?;
        let recomputed = windows.get(&window).cloned().unwrap_or_default();
        let plan = report.plan.clone().unwrap_or(SettlementPlan {
            window,
            positions: vec![],
            instructions: vec![],
            figures: vec![],
        });
        let mut planned: BTreeMap<(String, String), (u128, u128)> = plan
            .positions
            .iter()
            .map(|p| {
                (
                    (p.participant.clone(), p.currency.clone()),
                    (p.sent, p.received),
                )
            })
            .collect();
        for (key, position) in &recomputed.positions {
            let found = planned.remove(key);
            if found != Some((position.sent, position.received)) {
                breaks.push(Break {
                    check: "positions_vs_vouchers".into(),
                    subject: format!("{} {}", key.0, key.1),
                    expected: format!("sent {} received {}", position.sent, position.received),
                    found: found.map_or("no position".into(), |(s, r)| {
                        format!("sent {s} received {r}")
                    }),
                });
            }
        }
        for (key, (sent, received)) in planned {
            breaks.push(Break {
                check: "positions_vs_vouchers".into(),
                subject: format!("{} {}", key.0, key.1),
                expected: "no vouchers".into(),
                found: format!("sent {sent} received {received}"),
            });
        }
        let ids: Vec<u128> = plan
            .instructions
            .iter()
            .map(|i| fund_adjustment_id(window, &i.participant, &i.currency))
            .collect();
        let on_ledger: BTreeMap<u128, Transfer> = if ids.is_empty() {
            BTreeMap::new()
        } else {
            let node = self.node.clone();
            blocking(move || node.lookup_transfers(ids))
                .await?
                .into_iter()
                .map(|s| (s.transfer.id, s.transfer))
                .collect()
        };
        let carried: BTreeMap<(String, String), u128> = report
            .carried
            .iter()
            .map(|(p, c, a)| ((p.clone(), c.clone()), a.parse().unwrap_or(0)))
            .collect();
        for instruction in &plan.instructions {
            let id = fund_adjustment_id(window, &instruction.participant, &instruction.currency);
            let position = position_account(&instruction.participant, &instruction.currency);
            let settlement = settlement_account(&instruction.currency);
            let expected_accounts = if instruction.net < 0 {
                (settlement, position)
            } else {
                (position, settlement)
            };
            let carried = carried
                .get(&(
                    instruction.participant.clone(),
                    instruction.currency.clone(),
                ))
                .copied()
                .unwrap_or(0);
            let subject = format!("{} {}", instruction.participant, instruction.currency);
            match on_ledger.get(&id) {
                Some(t)
                    if (t.debit_account_id, t.credit_account_id) == expected_accounts
                        && t.amount.checked_add(carried)
                            == Some(instruction.net.unsigned_abs()) => {}
                // Carried in full: no transfer was made.
                None if carried == instruction.net.unsigned_abs() && instruction.net > 0 => {}
                Some(t) => breaks.push(Break {
                    check: "instruction_vs_ledger".into(),
                    subject,
                    expected: format!("{} (carried {carried})", instruction.net.unsigned_abs()),
                    found: format!(
                        "{} between {:x} and {:x}",
                        t.amount, t.debit_account_id, t.credit_account_id
                    ),
                }),
                None => breaks.push(Break {
                    check: "instruction_vs_ledger".into(),
                    subject,
                    expected: instruction.net.to_string(),
                    found: "no fund adjustment on the ledger".into(),
                }),
            }
        }
        if !breaks.is_empty() {
            self.breaks_total
                .fetch_add(breaks.len() as u64, Ordering::Relaxed);
            tracing::error!(
                window,
                breaks = breaks.len(),
                "reconciliation breaks: positions, vouchers and ledger disagree"
            );
        }
        report.breaks = breaks;
        report.reconciled = true;
        let closed_seq = self.closed_seq(window).await?;
        // Rewrite the record only (no voucher: the window_settled voucher is already chained).
        let mut stored = report.clone();
        stored.plan = None;
        let plan_chunks = self
            .window_record(window)
            .await?
            .map_or(0, |r| r.plan_chunks);
        let record = WindowRecord {
            report: stored,
            closed_seq,
            plan_chunks,
        };
        engine_submit(&self.node, vec![], vec![plain(window_key(window), &record)]).await?;
        self.remember(WindowRecord {
            report: report.clone(),
            closed_seq,
            plan_chunks,
        });
        Ok(report)
    }
}

impl Clearing {
    /// The vouchers of a closed window, its closing voucher last.
    pub async fn window_events(&self, window: u64) -> Result<Vec<(u64, VoucherEvent)>, ApiError> {
        let end = self.closed_seq(window).await?.ok_or_else(|| {
            ApiError::new(409, "window_open", format!("window {window} is not closed"))
        })?;
        let start = if window == 1 {
            1
        } else {
            self.closed_seq(window - 1)
                .await?
                .ok_or_else(|| internal("previous window without closing voucher"))?
                + 1
        };
        let mut events = Vec::with_capacity((end + 1).saturating_sub(start).min(1 << 20) as usize);
        let mut from = start;
        while from <= end {
            let page = {
                let node = self.node.clone();
                let limit = VOUCHER_PAGE.min((end - from + 1) as usize);
                blocking(move || node.vouchers(from, limit)).await?
            };
            let Some(last) = page.last() else { break };
            from = last.seq + 1;
            for voucher in page {
                events.push((
                    voucher.seq,
                    VoucherEvent::parse(&voucher.body).map_err(internal)?,
                ));
            }
        }
        Ok(events)
    }

    /// Every participant's statement of a closed window (one pass over its vouchers), with the
    /// booked balances at its opening (the previous window's closing) and closing.
    pub async fn statements(
        &self,
        window: u64,
    ) -> Result<Vec<clearhouse_clearing::statement::Statement>, ApiError> {
        let openings = self.closing_balances(window.saturating_sub(1)).await?;
        let (statements, closings) = self.window_statements(window, &openings).await?;
        self.remember_closings(window, closings);
        Ok(statements)
    }

    fn remember_closings(&self, window: u64, closings: clearhouse_clearing::statement::Balances) {
        let mut cached = self.closings.lock().expect("closings");
        cached.insert(window, Arc::new(closings));
        while cached.len() > CLOSING_BALANCES_CACHED_MAX {
            cached.pop_first();
        }
    }

    /// The booked balances at the close of `window` (none before window 1): from the nearest
    /// cached earlier window, every window after it is walked once (its vouchers, and its fund
    /// adjustments as the ledger moved them).
    async fn closing_balances(
        &self,
        window: u64,
    ) -> Result<Arc<clearhouse_clearing::statement::Balances>, ApiError> {
        let (mut at, mut balances) = {
            let cached = self.closings.lock().expect("closings");
            match cached.range(..=window).next_back() {
                Some((w, b)) => (*w, b.clone()),
                None => (0, Arc::new(clearhouse_clearing::statement::Balances::new())),
            }
        };
        while at < window {
            at += 1;
            let (_, closings) = self.window_statements(at, &balances).await?;
            self.remember_closings(at, closings);
            balances = self
                .closings
                .lock()
                .expect("closings")
                .get(&at)
                .cloned()
                .ok_or_else(|| internal("closing balances just computed"))?;
        }
        Ok(balances)
    }

    async fn window_statements(
        &self,
        window: u64,
        openings: &clearhouse_clearing::statement::Balances,
    ) -> Result<
        (
            Vec<clearhouse_clearing::statement::Statement>,
            clearhouse_clearing::statement::Balances,
        ),
        ApiError,
    > {
        let mut statements =
            clearhouse_clearing::statement::Statements::with_openings(window, openings);
        let events = self.window_events(window).await?;
        // Fund adjustments as the ledger moved them (a net receiver's may have moved less than
        // its net, or nothing: the rest was carried).
        let adjustment_ids: Vec<u128> = events
            .iter()
            .filter_map(|(_, e)| match e {
                VoucherEvent::FundAdjustment {
                    window,
                    participant,
                    currency,
                    ..
                } => Some(fund_adjustment_id(*window, participant, currency)),
                _ => None,
            })
            .collect();
        let moved: BTreeMap<u128, (u128, u64)> = if adjustment_ids.is_empty() {
            BTreeMap::new()
        } else {
            let node = self.node.clone();
            blocking(move || node.lookup_transfers(adjustment_ids))
                .await?
                .into_iter()
                .map(|s| (s.transfer.id, (s.transfer.amount, s.transfer.timestamp)))
                .collect()
        };
        for (seq, event) in &events {
            if let VoucherEvent::FundAdjustment {
                window: adjusted,
                participant,
                currency,
                net,
            } = event
            {
                let id = fund_adjustment_id(*adjusted, participant, currency);
                let (amount, at_ns) = moved.get(&id).copied().unwrap_or((0, 0));
                let amount = i128::try_from(amount).map_err(internal)?;
                // A net payer (net < 0) was credited; a net receiver debited.
                let signed = if *net < 0 { amount } else { -amount };
                statements
                    .adjustment(*seq, participant, currency, *adjusted, signed, at_ns)
                    .map_err(internal)?;
            } else {
                statements.add(*seq, event).map_err(internal)?;
            }
        }
        statements.finish().map_err(internal)
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

/// A page of the voucher chain as one caller may see it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VoucherPage {
    /// The chain hash before the first entry (hex; zeros before voucher 1).
    pub previous_hash: String,
    pub entries: Vec<clearhouse_clearing::export::ViewEntry>,
    /// Signed checkpoints of windows whose closing voucher is in this page.
    pub checkpoints: Vec<clearhouse_clearing::export::Checkpoint>,
    /// The operator's Ed25519 public key (hex) that signs checkpoints.
    pub public_key: String,
    /// Where the next page starts, when there may be one.
    pub next_from: Option<u64>,
}

/// Most vouchers in one page.
pub const VOUCHER_PAGE_MAX: usize = 4_096;

impl Clearing {
    /// Vouchers `from..from+limit`: every entry's leaf digest, and bodies only of the events
    /// `participant` is party to (all of them for the operator, `participant = None`).
    pub async fn voucher_page(
        &self,
        participant: Option<&str>,
        from: u64,
        limit: usize,
    ) -> Result<VoucherPage, ApiError> {
        let from = from.max(1);
        let limit = limit.clamp(1, VOUCHER_PAGE_MAX);
        let vouchers = {
            let node = self.node.clone();
            blocking(move || node.vouchers(from - 1, limit + 1)).await?
        };
        let mut previous_hash = clearhouse_engine::vouchers::GENESIS_HASH;
        let mut entries = Vec::with_capacity(limit);
        let mut checkpoints = Vec::new();
        for voucher in vouchers {
            if voucher.seq < from {
                previous_hash = voucher.hash;
                continue;
            }
            let event = VoucherEvent::parse(&voucher.body).map_err(internal)?;
            let visible = participant.is_none_or(|bic| event.involves(bic));
            if let VoucherEvent::WindowClosed { window, .. } = event {
                if let Some(record) =
                    read_json::<WindowRecord>(&self.node, window_key(window)).await?
                {
                    if let Some(checkpoint) = record.report.checkpoint {
                        checkpoints.push(checkpoint);
                    }
                }
            }
            entries.push(clearhouse_clearing::export::ViewEntry {
                seq: voucher.seq,
                leaf: clearhouse_engine::vouchers::leaf_digest(&voucher.body),
                body: visible.then(|| String::from_utf8_lossy(&voucher.body).into_owned()),
            });
        }
        let next_from = (entries.len() == limit).then(|| from + limit as u64);
        Ok(VoucherPage {
            previous_hash: hex::encode(previous_hash),
            entries,
            checkpoints,
            public_key: hex::encode(self.public_key().as_bytes()),
            next_from,
        })
    }
}

/// What a participant may see of a window: its own positions and instructions, and the
/// scheme-wide figures.
pub fn participant_view(mut report: WindowReport, bic: &str) -> WindowReport {
    if let Some(plan) = &mut report.plan {
        plan.positions.retain(|p| p.participant == bic);
        plan.instructions.retain(|i| i.participant == bic);
    }
    report.carried.retain(|(p, _, _)| p == bic);
    report.breaks.clear();
    report
}

/// Walks the whole voucher chain in order, with each window's signed checkpoint right after its
/// closing voucher; `progress` gets the vouchers seen so far. Blocking: for the CLI, on a data
/// directory no server is using.
pub fn walk_vouchers(
    node: &Node,
    mut on_voucher: impl FnMut(&clearhouse_engine::Voucher) -> Result<(), ApiError>,
    mut on_checkpoint: impl FnMut(&Checkpoint) -> Result<(), ApiError>,
    mut progress: impl FnMut(u64),
) -> Result<(u64, u64), ApiError> {
    let (mut vouchers, mut checkpoints) = (0u64, 0u64);
    let mut from = 1;
    loop {
        let page = node.vouchers(from, VOUCHER_PAGE)?;
        let Some(last) = page.last() else { break };
        from = last.seq + 1;
        for voucher in page {
            on_voucher(&voucher)?;
            vouchers += 1;
            if let Ok(VoucherEvent::WindowClosed { window, .. }) =
                VoucherEvent::parse(&voucher.body)
            {
                let stored = node.get_records(&[window_key(window)])?.pop().flatten();
                let record: Option<WindowRecord> = stored
                    .map(|bytes| serde_json::from_slice(&bytes))
                    .transpose()
                    .map_err(internal)?;
                if let Some(checkpoint) = record.and_then(|r| r.report.checkpoint) {
                    on_checkpoint(&checkpoint)?;
                    checkpoints += 1;
                }
            }
        }
        progress(vouchers);
    }
    Ok((vouchers, checkpoints))
}

/// Writes the whole chain with its checkpoints as an export (see
/// [`clearhouse_clearing::export`]).
pub fn export_vouchers<W: std::io::Write>(
    node: &Node,
    public_key: &VerifyingKey,
    out: W,
    progress: impl FnMut(u64),
) -> Result<(W, u64, u64), ApiError> {
    let writer = std::cell::RefCell::new(
        clearhouse_clearing::export::ExportWriter::new(out, public_key).map_err(internal)?,
    );
    let (vouchers, checkpoints) = walk_vouchers(
        node,
        |v| {
            writer
                .borrow_mut()
                .voucher(v.seq, &v.hash, &v.body)
                .map_err(internal)
        },
        |c| writer.borrow_mut().checkpoint(c).map_err(internal),
        progress,
    )?;
    Ok((
        writer.into_inner().finish().map_err(internal)?,
        vouchers,
        checkpoints,
    ))
}

/// Verifies the chain and checkpoints of a data directory in place: every hash recomputed from
/// its body, every checkpoint's hash and signature. The error names the first voucher or
/// checkpoint that does not hold.
pub fn verify_data_dir(
    node: &Node,
    public_key: &VerifyingKey,
    progress: impl FnMut(u64),
) -> Result<clearhouse_clearing::export::VerifyReport, clearhouse_clearing::ClearingError> {
    let verifier =
        std::cell::RefCell::new(clearhouse_clearing::export::ChainVerifier::new(*public_key));
    let failure: std::cell::RefCell<Option<clearhouse_clearing::ClearingError>> =
        std::cell::RefCell::new(None);
    let keep = |result: Result<(), clearhouse_clearing::ClearingError>| {
        result.map_err(|error| {
            let message = error.to_string();
            *failure.borrow_mut() = Some(error);
            internal(message)
        })
    };
    let walked = walk_vouchers(
        node,
        |v| keep(verifier.borrow_mut().voucher(v.seq, &v.hash, &v.body)),
        |c| keep(verifier.borrow_mut().checkpoint(c)),
        progress,
    );
    if let Some(error) = failure.into_inner() {
        return Err(error);
    }
    walked.map_err(|error| clearhouse_clearing::ClearingError::Io(error.to_string()))?;
    Ok(verifier.into_inner().report())
}

/// A participant's window statement as a camt.053.001.08: one account report per currency, every
/// entry with its UETR and end-to-end reference, booked; the balances are the window's opening
/// (zero) and closing net movement, as proprietary balance types (the position's absolute balance
/// lives on the ledger, not in the window).
pub fn statement_camt053(
    statements: &[clearhouse_clearing::statement::Statement],
    message_id: &str,
) -> Result<String, ApiError> {
    statement_camt(
        statements,
        message_id,
        clearhouse_iso20022::camt::ReportKind::Statement,
    )
}

/// The same entries as a camt.054.001.08 debit/credit notification (no balances).
pub fn statement_camt054(
    statements: &[clearhouse_clearing::statement::Statement],
    message_id: &str,
) -> Result<String, ApiError> {
    statement_camt(
        statements,
        message_id,
        clearhouse_iso20022::camt::ReportKind::Notification,
    )
}

fn statement_camt(
    statements: &[clearhouse_clearing::statement::Statement],
    message_id: &str,
    kind: clearhouse_iso20022::camt::ReportKind,
) -> Result<String, ApiError> {
    use clearhouse_iso20022::camt;
    let now = now_ns();
    let mut reports = Vec::new();
    for statement in statements {
        let c = currency(&statement.currency)
            .ok_or_else(|| internal(format!("unknown currency {}", statement.currency)))?;
        let money = |minor: u128| crate::money::format_amount(minor, c.exponent);
        let balance = |code: &str, amount: i128| camt::Balance {
            code: code.to_string(),
            amount: money(amount.unsigned_abs()),
            currency: c.code.to_string(),
            credit: amount >= 0,
            date: clearhouse_iso20022::time::date(now),
        };
        let entries = statement
            .entries
            .iter()
            .map(|e| camt::Entry {
                amount: money(e.amount),
                currency: c.code.to_string(),
                credit: e.credit,
                status: "BOOK".into(),
                booking_date: Some(clearhouse_iso20022::time::date(e.at_ns)),
                account_servicer_reference: Some(format!("voucher-{}", e.voucher)),
                bank_transaction_code: Some((
                    "PMNT".into(),
                    if e.credit { "RCDT" } else { "ICDT" }.into(),
                    if e.kind == "return" { "RRTN" } else { "DMCT" }.into(),
                )),
                instruction_id: None,
                end_to_end_id: None,
                uetr: (e.kind == "payment" || e.kind == "return").then(|| e.reference.clone()),
                debtor_agent: None,
                creditor_agent: None,
                additional_info: Some(format!("{} with {}", e.kind, e.counterparty)),
            })
            .collect();
        reports.push(camt::AccountReport {
            id: format!("W{}-{}-{}", statement.window, statement.participant, c.code),
            created: Some(clearhouse_iso20022::time::date_time(now)),
            account_iban: None,
            account_other: Some(format!("{}-{}", statement.participant, c.code)),
            account_currency: Some(c.code.to_string()),
            // Booked balances of the position (the net debit cap is a credit line, not part of
            // them): the opening one is the previous window's closing one.
            balances: vec![
                balance("OPBD", statement.opening_balance),
                balance("CLBD", statement.closing_balance),
            ],
            entries,
        });
    }
    if reports.is_empty() {
        return Err(ApiError::new(
            404,
            "not_found",
            "no movements in this window",
        ));
    }
    Ok(camt::CashReport {
        kind,
        message_id: message_id.chars().take(35).collect(),
        created: clearhouse_iso20022::time::date_time(now),
        reports,
    }
    .to_xml())
}
