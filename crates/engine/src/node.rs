//! The node: an engine thread that owns the ledger and the journal, and an index thread.
//!
//! Request path: client -> bounded request queue -> engine thread drains up to
//! `group_requests_max` requests -> for each write: reserve journal space (a full disk refuses the
//! request here, before anything changes), prefetch from the index, execute on the ledger, append
//! the journal record -> one write for the group -> the sync thread fdatasyncs it (while the
//! engine builds the next group: pipelined group commit, at most `SYNC_QUEUE_MAX` groups ahead),
//! then answers the group, then hands its changes to the index thread through a bounded queue.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clearhouse_journal::{Journal, JournalOptions, Record};
use clearhouse_ledger::{
    Account, AccountFilter, Balance, ChangeSet, CreateAccountResult, CreateTransferResult, Ledger,
    LedgerLimits, StoredTransfer, Transfer,
};
use rustc_hash::FxHashMap;

use crate::codec::{
    self, Prune, RecordPut, KIND_CREATE_ACCOUNTS, KIND_CREATE_TRANSFERS, KIND_PRUNE, KIND_PULSE,
    KIND_SUBMIT, PRUNE_KEYS_MAX, PRUNE_REPLACEMENT_MAX, RECORD_ALIASES_MAX, RECORD_PUTS_MAX,
    RECORD_VALUE_MAX,
};
use crate::index::{Index, IndexUpdate, INDEX_CACHE_BYTES_DEFAULT};
use crate::replica::{
    ReplicaTicket, ReplicatedGroup, Replication, TailCheckHandle, TICKET_WAIT_MAX,
};
use crate::vouchers::{Voucher, VoucherChain, VoucherStamp, VOUCHER_BODY_MAX};
use crate::EngineError;

#[derive(Clone, Debug)]
pub struct NodeOptions {
    pub data_dir: PathBuf,
    pub journal: JournalOptions,
    pub limits: LedgerLimits,
    /// Requests waiting for the engine thread; beyond it, callers get `Overloaded`.
    pub request_queue_max: usize,
    /// Requests executed and made durable by one fdatasync.
    pub group_requests_max: usize,
    /// Index jobs (groups) waiting for the index thread; beyond it the engine waits (backpressure).
    pub index_queue_max: usize,
    /// Transfers acknowledged but not yet indexed; beyond it the engine waits (backpressure).
    /// Bounds the memory the index queue and the ledger's cache hold.
    pub unindexed_transfers_max: u64,
    /// A durable checkpoint every this many journal records.
    pub checkpoint_every_records: u64,
    /// Shortest time between two index transactions. Many small groups (the payment switch's
    /// traffic) then share one transaction instead of each rewriting the same B-tree pages;
    /// queries wait for the index up to this much longer.
    pub index_transaction_interval_min: Duration,
    /// Most queued groups merged into one index transaction.
    pub index_jobs_per_transaction_max: usize,
    /// How often the engine wakes to expire pending transfers when idle.
    pub pulse_interval: Duration,
    /// Requests are refused (before anything changes) while the data directory's filesystem has
    /// less free space than this plus what the unindexed transfers may still need
    /// (`unindexed_transfers_max` x 2 KiB), so neither the journal nor the index meets a full disk
    /// mid-write.
    pub disk_free_min_bytes: u64,
    /// Called during recovery with (journal records replayed, records to replay), every 1,024
    /// records and at the end: for progress bars.
    pub recovery_progress: Option<fn(u64, u64)>,
    /// A simulated clock (ns since the Unix epoch) the engine reads instead of the system clock:
    /// the deterministic simulator moves it. `None` in production.
    pub clock: Option<Arc<AtomicU64>>,
    /// Single node (default), replicated leader, or follower (crate::replica).
    pub replication: Replication,
    /// Checks the journal's tail against the replicated log at start and cuts what it never
    /// stored (crate::replica::TailCheck); `None`: no check (single node).
    pub tail_check: Option<TailCheckHandle>,
    /// The index's page cache (redb's read cache and write buffer together), bytes. Most of a
    /// switch's resident memory at a steady load is this cache (docs/MEMORY.md); pages beyond
    /// it are read back from the file (the operating system's page cache).
    pub index_cache_bytes: usize,
    /// Keep each account's transfers and balances in the index for `get_account_transfers` and
    /// `get_account_balances` (on by default). Off, transfers leave no account events and the
    /// index writes about a sixth less per payment; those two queries are then refused. It can
    /// be turned off for an existing index, not back on (the history would have a hole).
    pub account_history: bool,
}

impl NodeOptions {
    pub fn new(data_dir: impl Into<PathBuf>) -> NodeOptions {
        NodeOptions {
            data_dir: data_dir.into(),
            journal: JournalOptions::default(),
            limits: LedgerLimits::default(),
            request_queue_max: 1024,
            group_requests_max: 64,
            index_queue_max: 64,
            unindexed_transfers_max: 1_000_000,
            checkpoint_every_records: 32,
            index_transaction_interval_min: Duration::ZERO,
            index_jobs_per_transaction_max: 64,
            pulse_interval: Duration::from_millis(100),
            disk_free_min_bytes: 256 * 1024 * 1024,
            recovery_progress: None,
            clock: None,
            replication: Replication::None,
            tail_check: None,
            index_cache_bytes: INDEX_CACHE_BYTES_DEFAULT,
            account_history: true,
        }
    }
}

/// What recovery found and did.
#[derive(Clone, Debug, Default)]
pub struct RecoveryReport {
    pub checkpoint_seq: u64,
    pub records_replayed: u64,
    pub accounts: usize,
    pub pending_transfers: usize,
    pub torn_tail_bytes_cut: u64,
    /// Records cut because the replicated log never stored them (never acknowledged).
    pub unreplicated_records_cut: u64,
    pub duration: Duration,
}

#[derive(Clone, Debug, Default)]
pub struct NodeStats {
    pub journal_bytes_written: u64,
    pub committed_seq: u64,
    pub indexed_seq: u64,
    pub checkpoint_seq: u64,
    pub cached_transfers: usize,
    /// The voucher chain's head: vouchers so far and the last one's hash.
    pub chain_seq: u64,
    pub chain_hash: [u8; 32],
}

/// Journal records replayed per index transaction during recovery.
const REPLAY_RECORDS_PER_INDEX_TRANSACTION: usize = 16;

/// An answer ready to be given once its group is durable.
type Delivery = Box<dyn FnOnce() + Send>;

/// A written group on its way to durability: synced, then answered, then indexed.
struct SyncJob {
    /// The segment file to fdatasync (None: nothing was written; answer after earlier groups).
    file: Option<Arc<std::fs::File>>,
    last_seq: u64,
    deliveries: Vec<Delivery>,
    update: Option<IndexUpdate>,
    /// A leader's group: answered only once the replicated log stored it too.
    ticket: Option<ReplicaTicket>,
}

/// Groups written and waiting for their fdatasync: the engine runs at most this far ahead of the
/// disk.
const SYNC_QUEUE_MAX: usize = 2;
/// The same for a replicated leader (groups written but not yet both synced and stored by the
/// stream): memory stays bounded by this many groups' copies.
const REPLICATED_SYNC_QUEUE_MAX: usize = 4;

/// The sync thread: makes each written group durable, then answers it and hands it to the index.
/// After a failed sync nothing more is answered (callers see the node stopped).
fn sync_loop(progress: &Progress, jobs: Receiver<SyncJob>, index_sender: SyncSender<IndexUpdate>) {
    let mut failed = false;
    while let Ok(job) = jobs.recv() {
        if failed {
            continue;
        }
        if let Some(file) = &job.file {
            let started = std::time::Instant::now();
            let synced = file.sync_data();
            progress.metrics.syncs.fetch_add(1, Ordering::Relaxed);
            progress
                .metrics
                .sync_nanos
                .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
            if let Err(error) = synced {
                tracing::error!(%error, "journal fdatasync failed; the node stops accepting work");
                let mut state = progress.indexed.lock().expect("progress");
                state
                    .error
                    .get_or_insert_with(|| format!("journal fdatasync failed: {error}"));
                progress.stopped.store(true, Ordering::SeqCst);
                progress.indexed_changed.notify_all();
                failed = true;
                continue;
            }
        }
        if let Some(ticket) = job.ticket {
            if let Err(error) = ticket.wait(TICKET_WAIT_MAX) {
                // Outcome unknown: the group may or may not be in the log. Answer nothing more;
                // the node stops, and the next leader's state decides (clients retry by key).
                tracing::error!(%error, last_seq = job.last_seq, "replication failed; the node stops accepting work");
                let mut state = progress.indexed.lock().expect("progress");
                state
                    .error
                    .get_or_insert_with(|| format!("replication failed: {error}"));
                progress.stopped.store(true, Ordering::SeqCst);
                progress.indexed_changed.notify_all();
                failed = true;
                continue;
            }
        }
        progress
            .committed_seq
            .fetch_max(job.last_seq, Ordering::SeqCst);
        if let Some(update) = job.update {
            // Blocks when the index queue is full: backpressure, never dropped work.
            if index_sender.send(update).is_err() {
                failed = true;
                continue;
            }
        }
        for delivery in job.deliveries {
            delivery();
        }
    }
}

/// Where an answer goes: a callback run on the engine's sync thread (it must not block).
type Reply<T> = Box<dyn FnOnce(Result<T, EngineError>) + Send>;

/// The outcome of a submit: one result per transfer, and for each record whether it was written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubmitOutcome {
    pub results: Vec<CreateTransferResult>,
    pub written: Vec<bool>,
    /// For each record: where its voucher landed in the chain (None: no voucher, or not written).
    pub vouchers: Vec<Option<VoucherStamp>>,
}

enum Request {
    CreateAccounts(Vec<Account>, Reply<Vec<CreateAccountResult>>),
    CreateTransfers(Vec<Transfer>, Reply<Vec<CreateTransferResult>>),
    Submit(Vec<Transfer>, Vec<RecordPut>, Reply<SubmitOutcome>),
    Prune(Box<Prune>, Reply<()>),
    LookupAccounts(Vec<u128>, Reply<Vec<Account>>),
    LookupTransfers(Vec<u128>, Reply<Vec<StoredTransfer>>),
    Stats(Reply<NodeStats>),
    /// A follower's: the leader's records, and the voucher chain head expected after them.
    Apply(Vec<Record>, Option<(u64, [u8; 32])>, Reply<u64>),
}

/// Progress shared between the threads and query callers.
struct Progress {
    committed_seq: AtomicU64,
    indexed: Mutex<IndexedState>,
    indexed_changed: Condvar,
    stopped: AtomicBool,
    metrics: EngineMetrics,
}

/// Counters for monitoring (Prometheus), updated as the node works.
#[derive(Default)]
pub struct EngineMetrics {
    /// Journal groups synced, and the total time their fdatasync took.
    pub syncs: AtomicU64,
    pub sync_nanos: AtomicU64,
    /// Requests executed (writes and lookups) and groups they came in.
    pub requests: AtomicU64,
    pub groups: AtomicU64,
}

/// A snapshot of the node's figures for monitoring.
#[derive(Clone, Debug, Default)]
pub struct MetricsSnapshot {
    pub syncs: u64,
    pub sync_seconds_total: f64,
    pub requests: u64,
    pub groups: u64,
    pub committed_seq: u64,
    pub indexed_seq: u64,
    pub checkpoint_seq: u64,
    pub stopped: bool,
}

impl Progress {
    /// Blocks until `done` holds for the index thread's state, or the index thread failed.
    fn wait_until(&self, done: impl Fn(&IndexedState) -> bool) -> Result<(), EngineError> {
        let mut state = self.indexed.lock().expect("progress");
        while !done(&state) {
            if let Some(error) = &state.error {
                return Err(EngineError::Stopped {
                    reason: error.clone(),
                });
            }
            state = self
                .indexed_changed
                .wait_timeout(state, Duration::from_millis(100))
                .expect("progress")
                .0;
        }
        Ok(())
    }
}

#[derive(Default)]
struct IndexedState {
    seq: u64,
    /// Transfer records (new or changed) the index has written, counted like `Engine::transfers_sent`.
    transfers_indexed: u64,
    checkpoint_seq: u64,
    error: Option<String>,
}

/// A handle to a running node. Cloneable; every clone talks to the same engine thread.
#[derive(Clone)]
pub struct Node {
    inner: Arc<NodeInner>,
}

struct NodeInner {
    requests: SyncSender<Request>,
    request_queue_max: usize,
    index: Arc<Index>,
    progress: Arc<Progress>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    recovery: RecoveryReport,
}

impl Drop for NodeInner {
    fn drop(&mut self) {
        self.progress.stopped.store(true, Ordering::SeqCst);
        // The engine thread notices `stopped` within one pulse interval and exits.
        for thread in self.threads.lock().expect("threads").drain(..) {
            let _ = thread.join();
        }
    }
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

impl Node {
    /// Opens the data directory (creating it), recovers, and starts the threads.
    pub fn start(options: NodeOptions) -> Result<Node, EngineError> {
        let started = std::time::Instant::now();
        std::fs::create_dir_all(&options.data_dir).map_err(|error| {
            EngineError::Recovery(format!(
                "cannot create data directory {}: {error}",
                options.data_dir.display()
            ))
        })?;
        if free_bytes(&options.data_dir).1 {
            return Err(EngineError::ReadOnly {
                path: options.data_dir.clone(),
            });
        }
        let index = Arc::new(Index::open_with(
            &options.data_dir.join("index.redb"),
            options.index_cache_bytes,
            options.account_history,
        )?);
        let restored = index.restore()?;
        let journal_dir = options.data_dir.join("journal");
        let (mut journal, mut open_report) = Journal::open(&journal_dir, options.journal.clone())?;
        let mut unreplicated_records_cut = 0;
        if let Some(check) = &options.tail_check {
            let mut tail = Vec::new();
            clearhouse_journal::read_records(&journal_dir, restored.seq, |record| {
                tail.push(record);
                Ok(())
            })?;
            let keep = check
                .0
                .keep_through(restored.seq, &tail)
                .map_err(EngineError::Recovery)?;
            if keep < restored.seq {
                return Err(EngineError::Recovery(format!(
                    "the replicated log lacks journal records up to {} that the index's checkpoint holds: this node's history diverges from the log; reseed it",
                    restored.seq
                )));
            }
            if tail.last().is_some_and(|last| last.seq > keep) {
                drop(journal);
                unreplicated_records_cut = clearhouse_journal::truncate_after(&journal_dir, keep)?;
                tracing::warn!(
                    from_seq = keep + 1,
                    records = unreplicated_records_cut,
                    "journal: cut records the replicated log never stored (written as leader, never acknowledged)"
                );
                let reopened = Journal::open(&journal_dir, options.journal.clone())?;
                journal = reopened.0;
                open_report = reopened.1;
            }
        }
        if matches!(options.replication, Replication::Leader(_)) {
            journal.capture();
        }
        if open_report.records == 0 && restored.seq > 0 && journal.next_seq() <= restored.seq {
            return Err(EngineError::Recovery(format!(
                "the index has a checkpoint at journal sequence {} but the journal in {} is empty",
                restored.seq,
                journal_dir.display()
            )));
        }
        let first_on_disk = journal.first_seq_on_disk()?;
        if open_report.records > 0 && first_on_disk > restored.seq + 1 {
            return Err(EngineError::Recovery(format!(
                "journal starts at sequence {first_on_disk} but the checkpoint covers only up to {}: records are missing",
                restored.seq
            )));
        }
        if open_report.records == 0 && journal.next_seq() == 1 && restored.seq > 0 {
            unreachable!("handled above");
        }
        let mut ledger = Ledger::restore(
            options.limits,
            restored.accounts.iter().copied(),
            restored.pending.iter().copied(),
            restored.scalars,
        );
        ledger.set_account_events(options.account_history);
        let mut recovery = RecoveryReport {
            checkpoint_seq: restored.seq,
            accounts: restored.accounts.len(),
            pending_transfers: restored.pending.len(),
            torn_tail_bytes_cut: open_report.torn_tail_bytes_cut,
            unreplicated_records_cut,
            ..RecoveryReport::default()
        };

        // Replay the journal after the checkpoint. Changes are indexed in groups of records;
        // until a group is indexed its transfers stay in the ledger's cache, so prefetch sees them.
        let mut changes = ChangeSet::default();
        let mut pending_changes = ChangeSet::default();
        let mut pending_records = 0usize;
        let mut replayed = 0u64;
        let mut last_seq = restored.seq;
        let corrupt =
            |seq: u64, what: &str, error: EngineError| clearhouse_journal::JournalError::Corrupt {
                path: journal_dir.clone(),
                offset: 0,
                reason: format!("{what} of record {seq} failed: {error}"),
            };
        // Records after the checkpoint (an estimate: the journal may hold a few before it).
        let to_replay = open_report.last_seq.saturating_sub(restored.seq);
        let mut app_records: Vec<RecordPut> = Vec::new();
        let mut chain = restored.vouchers;
        let mut app_vouchers: Vec<Voucher> = Vec::new();
        let mut app_prunes: Vec<Prune> = Vec::new();
        let flush = |ledger: &mut Ledger,
                     pending_changes: &mut ChangeSet,
                     pending_records: &mut Vec<RecordPut>,
                     pending_vouchers: &mut Vec<Voucher>,
                     pending_prunes: &mut Vec<Prune>,
                     seq: u64|
         -> Result<(), EngineError> {
            let update = IndexUpdate {
                seq,
                records: std::mem::take(pending_records),
                vouchers: std::mem::take(pending_vouchers),
                prunes: std::mem::take(pending_prunes),
                changes: std::mem::take(pending_changes),
                accounts: ledger.take_dirty_accounts(),
                scalars: ledger.scalars(),
                durable: false,
            };
            index.apply(&update)?;
            for stored in &update.changes.transfers {
                ledger.evict(stored.transfer.id);
            }
            Ok(())
        };
        let mut prefetched = Vec::new();
        clearhouse_journal::read_records(&journal_dir, restored.seq, |record| {
            prefetched.clear();
            replay(
                &index,
                &mut ledger,
                &record,
                &mut app_records,
                &mut chain,
                &mut app_vouchers,
                &mut app_prunes,
                &mut prefetched,
            )
            .map_err(|error| corrupt(record.seq, "replay", error))?;
            replayed += 1;
            last_seq = record.seq;
            if replayed.is_multiple_of(1024) {
                if let Some(progress) = options.recovery_progress {
                    progress(replayed, to_replay);
                }
            }
            ledger.take_changes(&mut changes);
            pending_changes
                .transfers
                .extend_from_slice(&changes.transfers);
            pending_changes
                .account_events
                .extend_from_slice(&changes.account_events);
            pending_changes
                .accounts_created
                .extend_from_slice(&changes.accounts_created);
            pending_records += 1;
            if pending_records >= REPLAY_RECORDS_PER_INDEX_TRANSACTION {
                pending_records = 0;
                flush(
                    &mut ledger,
                    &mut pending_changes,
                    &mut app_records,
                    &mut app_vouchers,
                    &mut app_prunes,
                    record.seq,
                )
                .map_err(|error| corrupt(record.seq, "indexing", error))?;
            }
            Ok(())
        })?;
        flush(
            &mut ledger,
            &mut pending_changes,
            &mut app_records,
            &mut app_vouchers,
            &mut app_prunes,
            last_seq,
        )?;
        recovery.records_replayed = replayed;
        if let Some(progress) = options.recovery_progress {
            progress(replayed, replayed);
        }
        if replayed > 0 {
            index.apply(&IndexUpdate {
                seq: last_seq,
                records: Vec::new(),
                vouchers: Vec::new(),
                prunes: Vec::new(),
                changes: ChangeSet::default(),
                accounts: ledger.take_dirty_accounts(),
                scalars: ledger.scalars(),
                durable: true,
            })?;
            journal.remove_segments_through(last_seq)?;
        } else {
            ledger.take_dirty_accounts();
        }
        ledger.assert_invariants_full();
        recovery.duration = started.elapsed();
        tracing::info!(
            checkpoint_seq = recovery.checkpoint_seq,
            records_replayed = recovery.records_replayed,
            accounts = recovery.accounts,
            pending = recovery.pending_transfers,
            torn_tail_bytes_cut = recovery.torn_tail_bytes_cut,
            duration_ms = recovery.duration.as_millis() as u64,
            "recovered"
        );

        let progress = Arc::new(Progress {
            committed_seq: AtomicU64::new(last_seq),
            indexed: Mutex::new(IndexedState {
                seq: last_seq,
                transfers_indexed: 0,
                checkpoint_seq: last_seq,
                error: None,
            }),
            indexed_changed: Condvar::new(),
            stopped: AtomicBool::new(false),
            metrics: EngineMetrics::default(),
        });
        let (request_sender, request_receiver) = mpsc::sync_channel(options.request_queue_max);
        let (index_sender, index_receiver) = mpsc::sync_channel(options.index_queue_max);
        // A replicated leader waits for the stream's ack as well as the fdatasync: a deeper
        // pipeline keeps the engine executing while a publish is in flight.
        let sync_queue_max = match options.replication {
            Replication::Leader(_) => REPLICATED_SYNC_QUEUE_MAX,
            _ => SYNC_QUEUE_MAX,
        };
        let (sync_sender, sync_receiver) = mpsc::sync_channel(sync_queue_max);
        let (spare_sender, spare_receiver) = mpsc::sync_channel(SPARE_CHANGE_SETS_MAX);
        let sync_thread = {
            let progress = progress.clone();
            std::thread::Builder::new()
                .name("clearhouse-sync".into())
                .spawn(move || sync_loop(&progress, sync_receiver, index_sender))
                .expect("spawn sync thread")
        };
        let index_thread = {
            let index = index.clone();
            let interval_min = options.index_transaction_interval_min;
            let jobs_per_transaction_max = options.index_jobs_per_transaction_max.max(1);
            let progress = progress.clone();
            std::thread::Builder::new()
                .name("clearhouse-index".into())
                .spawn(move || {
                    index_loop(
                        &index,
                        &progress,
                        index_receiver,
                        &spare_sender,
                        interval_min,
                        jobs_per_transaction_max,
                    )
                })
                .expect("spawn index thread")
        };
        let engine_thread = {
            let index = index.clone();
            let progress = progress.clone();
            let mut engine = Engine {
                options: options.clone(),
                ledger,
                journal,
                index,
                progress,
                sync_sender,
                spare_changes: spare_receiver,
                recent: VecDeque::new(),
                touched: FxHashMap::default(),
                records_since_checkpoint: 0,
                transfers_sent: 0,
                checkpoint_seq_done: last_seq,
                records: Vec::new(),
                chain,
                vouchers: Vec::new(),
                prunes: Vec::new(),
                free_bytes_this_group: None,
            };
            std::thread::Builder::new()
                .name("clearhouse-engine".into())
                .spawn(move || engine.run(request_receiver))
                .expect("spawn engine thread")
        };
        Ok(Node {
            inner: Arc::new(NodeInner {
                requests: request_sender,
                request_queue_max: options.request_queue_max,
                index,
                progress,
                threads: Mutex::new(vec![engine_thread, sync_thread, index_thread]),
                recovery,
            }),
        })
    }

    /// A follower's: appends the leader's records (those after this node's last; earlier ones are
    /// skipped) verbatim and replays them, checking each record's sealed results and, after
    /// them, the voucher chain head. Answers the last journal sequence once durable. Any
    /// mismatch stops the node: its history diverges from the leader's.
    pub fn apply(
        &self,
        records: Vec<Record>,
        chain: Option<(u64, [u8; 32])>,
    ) -> Result<u64, EngineError> {
        self.call(|reply| Request::Apply(records, chain, reply))
    }

    /// The error that stopped the node, if it stopped.
    pub fn stop_reason(&self) -> Option<String> {
        if !self.inner.progress.stopped.load(Ordering::SeqCst) {
            return None;
        }
        let state = self.inner.progress.indexed.lock().expect("progress");
        Some(state.error.clone().unwrap_or_else(|| "stopped".into()))
    }

    pub fn recovery_report(&self) -> &RecoveryReport {
        &self.inner.recovery
    }

    fn call<T: Send + 'static>(
        &self,
        make: impl FnOnce(Reply<T>) -> Request,
    ) -> Result<T, EngineError> {
        let (sender, receiver) = mpsc::sync_channel(1);
        self.enqueue(make(Box::new(move |result| {
            let _ = sender.send(result);
        })))?;
        receiver.recv().map_err(|_| self.stopped_error())?
    }

    /// Queues a request without waiting; refuses at once when the queue is full.
    fn enqueue(&self, request: Request) -> Result<(), EngineError> {
        match self.inner.requests.try_send(request) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => Err(EngineError::Overloaded {
                limit: self.inner.request_queue_max,
            }),
            Err(TrySendError::Disconnected(_)) => Err(self.stopped_error()),
        }
    }

    fn stopped_error(&self) -> EngineError {
        let reason = self
            .inner
            .progress
            .indexed
            .lock()
            .expect("progress")
            .error
            .clone()
            .unwrap_or_else(|| "the engine thread has exited".into());
        EngineError::Stopped { reason }
    }

    pub fn create_accounts(
        &self,
        accounts: Vec<Account>,
    ) -> Result<Vec<CreateAccountResult>, EngineError> {
        self.call(|reply| Request::CreateAccounts(accounts, reply))
    }

    pub fn create_transfers(
        &self,
        transfers: Vec<Transfer>,
    ) -> Result<Vec<CreateTransferResult>, EngineError> {
        self.call(|reply| Request::CreateTransfers(transfers, reply))
    }

    /// Transfers and application records as one atomic, durable batch (one journal record).
    pub fn submit(
        &self,
        transfers: Vec<Transfer>,
        records: Vec<RecordPut>,
    ) -> Result<SubmitOutcome, EngineError> {
        self.call(|reply| Request::Submit(transfers, records, reply))
    }

    /// [`Node::submit`] without blocking: `done` runs on the engine thread once the batch is
    /// durable (it must be quick and must not block). An `Err` here means the request was not
    /// queued (queue full or node stopped) and `done` will not run.
    pub fn submit_with(
        &self,
        transfers: Vec<Transfer>,
        records: Vec<RecordPut>,
        done: impl FnOnce(Result<SubmitOutcome, EngineError>) + Send + 'static,
    ) -> Result<(), EngineError> {
        self.enqueue(Request::Submit(transfers, records, Box::new(done)))
    }

    /// Retention: removes finished history from the index as one journaled record (replayed
    /// after a crash and by standbys, so every copy forgets the same things). Refused, with
    /// nothing changed, when a list is too long, a transfer is pending, or the voucher anchor is
    /// not the stored hash of voucher `vouchers_through`.
    pub fn prune(&self, prune: Prune) -> Result<(), EngineError> {
        self.call(|reply| Request::Prune(Box::new(prune), reply))
    }

    /// Where the voucher chain is anchored after retention: (last pruned voucher, its hash);
    /// (0, zeros) while nothing was pruned. Vouchers before it are no longer in the index.
    pub fn vouchers_anchor(&self) -> Result<(u64, [u8; 32]), EngineError> {
        self.wait_indexed()?;
        self.inner.index.vouchers_anchor()
    }

    /// Application records by key (None where absent), reading every acknowledged write.
    pub fn get_records(&self, keys: &[u128]) -> Result<Vec<Option<Vec<u8>>>, EngineError> {
        self.wait_indexed()?;
        self.inner.index.get_records(keys)
    }

    /// Like [`Node::get_records`] without waiting for the index: a write acknowledged in the last
    /// milliseconds may be missing (callers cover those from memory).
    pub fn get_records_now(&self, keys: &[u128]) -> Result<Vec<Option<Vec<u8>>>, EngineError> {
        self.inner.index.get_records(keys)
    }

    /// Like [`Node::resolve_alias`] without waiting for the index.
    pub fn resolve_alias_now(&self, alias: u128) -> Result<Option<u128>, EngineError> {
        self.inner.index.resolve_alias(alias)
    }

    /// The key an alias of an application record resolves to.
    pub fn resolve_alias(&self, alias: u128) -> Result<Option<u128>, EngineError> {
        self.wait_indexed()?;
        self.inner.index.resolve_alias(alias)
    }

    /// Vouchers from sequence `from_seq` on, at most `limit` (as of everything committed so far).
    pub fn vouchers(&self, from_seq: u64, limit: usize) -> Result<Vec<Voucher>, EngineError> {
        self.wait_indexed()?;
        self.inner.index.vouchers(from_seq, limit)
    }

    /// Voucher bodies from sequence `from_seq` on, at most `limit`, without their chain hashes
    /// (cheaper than [`Node::vouchers`] for readers of the events alone).
    pub fn voucher_bodies(
        &self,
        from_seq: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, EngineError> {
        self.wait_indexed()?;
        self.inner.index.voucher_bodies(from_seq, limit)
    }

    /// Open application records (at most `limit`), reading every acknowledged write.
    pub fn open_records(&self, limit: usize) -> Result<Vec<(u128, Vec<u8>)>, EngineError> {
        self.wait_indexed()?;
        self.inner.index.open_records(limit)
    }

    pub fn lookup_accounts(&self, ids: Vec<u128>) -> Result<Vec<Account>, EngineError> {
        self.call(|reply| Request::LookupAccounts(ids, reply))
    }

    pub fn lookup_transfers(&self, ids: Vec<u128>) -> Result<Vec<StoredTransfer>, EngineError> {
        self.call(|reply| Request::LookupTransfers(ids, reply))
    }

    pub fn stats(&self) -> Result<NodeStats, EngineError> {
        self.call(Request::Stats)
    }

    /// Monitoring figures (cheap: atomics and one short lock).
    pub fn metrics(&self) -> MetricsSnapshot {
        let progress = &self.inner.progress;
        let state = progress.indexed.lock().expect("progress");
        MetricsSnapshot {
            syncs: progress.metrics.syncs.load(Ordering::Relaxed),
            sync_seconds_total: progress.metrics.sync_nanos.load(Ordering::Relaxed) as f64 / 1e9,
            requests: progress.metrics.requests.load(Ordering::Relaxed),
            groups: progress.metrics.groups.load(Ordering::Relaxed),
            committed_seq: progress.committed_seq.load(Ordering::SeqCst),
            indexed_seq: state.seq,
            checkpoint_seq: state.checkpoint_seq,
            stopped: progress.stopped.load(Ordering::SeqCst),
        }
    }

    /// The journal sequence acknowledged so far (everything up to it is durable).
    pub fn committed_seq(&self) -> u64 {
        self.inner.progress.committed_seq.load(Ordering::SeqCst)
    }

    /// The journal sequence the index holds (queries that do not wait see up to here).
    pub fn indexed_seq(&self) -> u64 {
        self.inner.progress.indexed.lock().expect("progress").seq
    }

    /// Waits until the index holds everything acknowledged so far, so queries read their writes.
    fn wait_indexed(&self) -> Result<(), EngineError> {
        let target = self.inner.progress.committed_seq.load(Ordering::SeqCst);
        self.inner.progress.wait_until(|state| state.seq >= target)
    }

    /// Transfers of one account, from the on-disk index.
    pub fn get_account_transfers(
        &self,
        filter: &AccountFilter,
    ) -> Result<Vec<Transfer>, EngineError> {
        self.wait_indexed()?;
        self.inner.index.get_account_transfers(filter)
    }

    /// Balance history of one account (HISTORY flag), from the on-disk index.
    pub fn get_account_balances(
        &self,
        filter: &AccountFilter,
    ) -> Result<Vec<(u64, Balance)>, EngineError> {
        self.wait_indexed()?;
        self.inner.index.get_account_balances(filter)
    }
}

/// Replays one journal record on the ledger (recovery): same path as live execution.
/// Replays one journal record on the ledger (recovery): same path as live execution, and the
/// results must match the digest sealed into the record when it first ran (determinism).
// The outputs are the caller's own buffers (recovery's and the follower engine's), each kept
// separately by both: a struct of borrows would only rename them.
#[allow(clippy::too_many_arguments)]
fn replay(
    index: &Index,
    ledger: &mut Ledger,
    record: &Record,
    records_out: &mut Vec<RecordPut>,
    chain: &mut VoucherChain,
    vouchers_out: &mut Vec<Voucher>,
    prunes_out: &mut Vec<Prune>,
    prefetched: &mut Vec<u128>,
) -> Result<(), EngineError> {
    let digest = match record.kind {
        KIND_PRUNE => {
            let prune = codec::decode_prune(&record.payload)?;
            for id in &prune.transfers {
                ledger.evict(*id);
            }
            prunes_out.push(prune);
            prune_digest()
        }
        KIND_SUBMIT => {
            let (transfers, records) = codec::decode_submit(&record.payload)?;
            prefetched.extend(prefetch(index, ledger, &transfers)?);
            let mut results = Vec::new();
            ledger.create_transfers(record.timestamp, &transfers, &mut results)?;
            let written = records_written(&records, &results);
            for (mut put, written) in records.into_iter().zip(&written) {
                if *written {
                    if let Some(body) = put.voucher.take() {
                        vouchers_out.push(chain.append(body));
                    }
                    records_out.push(put);
                }
            }
            submit_digest(&results, &written)
        }
        KIND_CREATE_ACCOUNTS => {
            let accounts = codec::decode_batch(&record.payload, codec::decode_account)?;
            let mut results = Vec::new();
            ledger.create_accounts(record.timestamp, &accounts, &mut results)?;
            codec::results_digest(results.iter().map(|r| r.as_u32()))
        }
        KIND_CREATE_TRANSFERS => {
            let transfers = codec::decode_batch(&record.payload, codec::decode_transfer)?;
            prefetched.extend(prefetch(index, ledger, &transfers)?);
            let mut results = Vec::new();
            ledger.create_transfers(record.timestamp, &transfers, &mut results)?;
            codec::results_digest(results.iter().map(|r| r.as_u32()))
        }
        KIND_PULSE => {
            let expired = ledger.pulse(record.timestamp);
            codec::results_digest(std::iter::once(expired as u32))
        }
        other => {
            return Err(EngineError::Recovery(format!(
                "unknown journal record kind {other} at sequence {}",
                record.seq
            )))
        }
    };
    let sealed = codec::sealed_results(&record.payload)?;
    if digest != sealed {
        return Err(EngineError::Recovery(format!(
            "replaying journal record {} gave results {digest:?} (crc32c, count) but {sealed:?} when it first ran: the ledger is not deterministic; refusing to continue",
            record.seq
        )));
    }
    Ok(())
}

/// Which records of a submit are written: those without a condition, and those whose transfer
/// succeeded.
fn records_written(records: &[RecordPut], results: &[CreateTransferResult]) -> Vec<bool> {
    records
        .iter()
        .map(|record| match record.when_transfer_ok {
            None => true,
            Some(i) => results[i as usize] == CreateTransferResult::Ok,
        })
        .collect()
}

/// What a prune's record is sealed with (it has no per-item results).
fn prune_digest() -> (u32, u32) {
    codec::results_digest(std::iter::once(1))
}

fn submit_digest(results: &[CreateTransferResult], written: &[bool]) -> (u32, u32) {
    codec::results_digest(
        results
            .iter()
            .map(|r| r.as_u32())
            .chain(written.iter().map(|w| *w as u32)),
    )
}

fn prefetch(
    index: &Index,
    ledger: &mut Ledger,
    transfers: &[Transfer],
) -> Result<Vec<u128>, EngineError> {
    let mut ids = Vec::new();
    ledger.transfer_ids_to_prefetch(transfers, &mut ids);
    ids.sort_unstable();
    ids.dedup();
    let mut found = Vec::with_capacity(ids.len());
    index.get_transfers(&ids, |stored| found.push(stored))?;
    let found_ids = found.iter().map(|stored| stored.transfer.id).collect();
    for stored in found {
        ledger.insert_prefetched(stored);
    }
    Ok(found_ids)
}

/// Emptied change sets kept for reuse between the index thread and the engine.
const SPARE_CHANGE_SETS_MAX: usize = 4;
/// Change sets holding room for more account events than this are freed, not reused (about
/// 7.5 MB: two full requests of 8,189 transfers).
const SPARE_CHANGE_SET_EVENTS_MAX: usize = 32_768;

/// A generous estimate of the bytes one transfer costs the index when it is written (the record,
/// two account events, copy-on-write pages); measured about 1 KB on workload L1.
const INDEX_BYTES_PER_TRANSFER_ESTIMATE: u64 = 2048;

fn index_loop(
    index: &Index,
    progress: &Progress,
    jobs: Receiver<IndexUpdate>,
    spare_changes: &SyncSender<ChangeSet>,
    interval_min: Duration,
    jobs_per_transaction_max: usize,
) {
    let mut last_commit = std::time::Instant::now();
    let mut batch: Vec<IndexUpdate> = Vec::with_capacity(jobs_per_transaction_max);
    while let Ok(job) = jobs.recv() {
        // Let more groups arrive unless this one is a checkpoint (a clean stop waits for it).
        let since = last_commit.elapsed();
        if !job.durable && since < interval_min {
            std::thread::sleep(interval_min - since);
        }
        // Write queued updates in one transaction (fewer copy-on-write page rewrites), read in
        // place rather than merged into one copy.
        batch.clear();
        batch.push(job);
        while batch.len() < jobs_per_transaction_max {
            let Ok(next) = jobs.try_recv() else { break };
            batch.push(next);
        }
        let transfers: u64 = batch
            .iter()
            .map(|job| job.changes.transfers.len() as u64)
            .sum();
        let last = batch.last().expect("one job at least");
        let (seq, durable) = (last.seq, batch.iter().any(|job| job.durable));
        let result = index.apply_all(&batch);
        last_commit = std::time::Instant::now();
        // Hand the emptied change sets back to the engine (a few, not too large; the rest are
        // freed here).
        for job in batch.drain(..) {
            let mut changes = job.changes;
            if changes.account_events.capacity() <= SPARE_CHANGE_SET_EVENTS_MAX {
                changes.clear();
                let _ = spare_changes.try_send(changes);
            }
        }
        let mut state = progress.indexed.lock().expect("progress");
        match result {
            Ok(()) => {
                assert!(seq >= state.seq, "index jobs arrive in order");
                state.seq = seq;
                state.transfers_indexed += transfers;
                if durable {
                    state.checkpoint_seq = seq;
                }
            }
            Err(error) => {
                tracing::error!(%error, seq, "index write failed; the node stops accepting work");
                state.error = Some(format!("index write failed: {error}"));
                progress.stopped.store(true, Ordering::SeqCst);
                progress.indexed_changed.notify_all();
                return;
            }
        }
        progress.indexed_changed.notify_all();
    }
}

struct Engine {
    options: NodeOptions,
    ledger: Ledger,
    journal: Journal,
    index: Arc<Index>,
    progress: Arc<Progress>,
    /// Groups written but not yet synced, with their answers and index update (pipeline depth).
    sync_sender: SyncSender<SyncJob>,
    /// Emptied change sets the index thread hands back, so a group's changes are collected into
    /// memory already allocated (and faulted in) instead of growing fresh vectors each group.
    spare_changes: Receiver<ChangeSet>,
    /// Transfers in the ledger's cache, with the journal sequence of their latest change.
    recent: VecDeque<(u64, u128)>,
    touched: FxHashMap<u128, u64>,
    records_since_checkpoint: u64,
    checkpoint_seq_done: u64,
    /// Transfer records sent to the index thread, for the unindexed-transfers limit.
    transfers_sent: u64,
    /// Application records written by the current group, for the index.
    records: Vec<RecordPut>,
    /// The voucher chain's head, and the vouchers the current group appended, for the index.
    chain: VoucherChain,
    vouchers: Vec<Voucher>,
    /// Prunes journaled by the current group, for the index.
    prunes: Vec<Prune>,
    /// Free bytes on the data directory's filesystem, read at the group's first write.
    free_bytes_this_group: Option<(u64, bool)>,
}

enum Pending {
    Accounts(
        Reply<Vec<CreateAccountResult>>,
        Result<Vec<CreateAccountResult>, EngineError>,
    ),
    Transfers(
        Reply<Vec<CreateTransferResult>>,
        Result<Vec<CreateTransferResult>, EngineError>,
    ),
    Submit(Reply<SubmitOutcome>, Result<SubmitOutcome, EngineError>),
    Pruned(Reply<()>, Result<(), EngineError>),
    Applied(Reply<u64>, u64),
    Lookup(Request),
}

impl Engine {
    fn run(&mut self, requests: Receiver<Request>) {
        let mut group: Vec<Request> = Vec::with_capacity(self.options.group_requests_max);
        loop {
            if self.progress.stopped.load(Ordering::SeqCst) {
                break;
            }
            match requests.recv_timeout(self.options.pulse_interval) {
                Ok(request) => group.push(request),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            while group.len() < self.options.group_requests_max {
                match requests.try_recv() {
                    Ok(request) => group.push(request),
                    Err(_) => break,
                }
            }
            if let Err(error) = self.process_group(&mut group) {
                tracing::error!(%error, "engine: journal failed; stopping (state in memory is ahead of disk)");
                self.record_stop(&error);
                return;
            }
        }
        // A clean stop: checkpoint, so the next start replays nothing.
        let seq = self.journal.next_seq() - 1;
        let mut changes = ChangeSet::default();
        self.ledger.take_changes(&mut changes);
        let _ = self.sync_sender.send(SyncJob {
            file: None,
            last_seq: seq,
            deliveries: Vec::new(),
            ticket: None,
            update: Some(IndexUpdate {
                seq,
                records: std::mem::take(&mut self.records),
                vouchers: std::mem::take(&mut self.vouchers),
                prunes: std::mem::take(&mut self.prunes),
                changes,
                accounts: self.ledger.take_dirty_accounts(),
                scalars: self.ledger.scalars(),
                durable: true,
            }),
        });
    }

    /// Records why the node stops (the first cause is kept: the index thread may have recorded
    /// it already) and marks it stopped.
    fn record_stop(&self, error: &EngineError) {
        let mut state = self.progress.indexed.lock().expect("progress");
        state.error.get_or_insert_with(|| error.to_string());
        self.progress.stopped.store(true, Ordering::SeqCst);
        self.progress.indexed_changed.notify_all();
    }

    fn process_group(&mut self, group: &mut Vec<Request>) -> Result<(), EngineError> {
        self.free_bytes_this_group = None;
        if !group.is_empty() {
            self.progress
                .metrics
                .requests
                .fetch_add(group.len() as u64, Ordering::Relaxed);
            self.progress.metrics.groups.fetch_add(1, Ordering::Relaxed);
        }
        let mut answered: Vec<Pending> = Vec::with_capacity(group.len());
        let seq_before = self.journal.next_seq();
        let now = match &self.options.clock {
            Some(clock) => clock.load(Ordering::SeqCst),
            None => now_ns(),
        };
        // A follower writes only the leader's records; a leader whose log cannot take groups
        // refuses writes before executing them (nothing changes).
        let refusing = match &self.options.replication {
            Replication::None => false,
            Replication::Follower => true,
            Replication::Leader(log) => !log.available(),
        };
        if !refusing {
            self.pulse_due(now)?;
        }
        for request in group.drain(..) {
            let request = match (refusing, request) {
                (true, Request::CreateAccounts(_, reply)) => {
                    answered.push(Pending::Accounts(reply, Err(self.refusal())));
                    continue;
                }
                (true, Request::CreateTransfers(_, reply)) => {
                    answered.push(Pending::Transfers(reply, Err(self.refusal())));
                    continue;
                }
                (true, Request::Submit(_, _, reply)) => {
                    answered.push(Pending::Submit(reply, Err(self.refusal())));
                    continue;
                }
                (true, Request::Prune(_, reply)) => {
                    answered.push(Pending::Pruned(reply, Err(self.refusal())));
                    continue;
                }
                (_, Request::Apply(records, chain, reply)) => {
                    if !matches!(self.options.replication, Replication::Follower) {
                        reply(Err(EngineError::NotFollower));
                        continue;
                    }
                    // A mismatch is fatal: the node's history diverges from the leader's. The
                    // reason is recorded before the reply is dropped, so the caller reads it
                    // (not "the engine thread has exited").
                    let last = match self.apply_records(records, chain) {
                        Ok(last) => last,
                        Err(error) => {
                            self.record_stop(&error);
                            drop(reply);
                            return Err(error);
                        }
                    };
                    answered.push(Pending::Applied(reply, last));
                    continue;
                }
                (_, request) => request,
            };
            match request {
                Request::CreateAccounts(accounts, reply) => {
                    let result = self.execute(
                        KIND_CREATE_ACCOUNTS,
                        now,
                        &accounts,
                        codec::encode_account,
                        |r: &CreateAccountResult| r.as_u32(),
                        |ledger, now, results| {
                            let mut out = Vec::new();
                            ledger.create_accounts(now, &accounts, &mut out)?;
                            *results = out;
                            Ok(())
                        },
                    );
                    answered.push(Pending::Accounts(reply, result));
                }
                Request::CreateTransfers(transfers, reply) => {
                    let result = self.prefetch_and_touch(&transfers).and_then(|()| {
                        self.execute(
                            KIND_CREATE_TRANSFERS,
                            now,
                            &transfers,
                            codec::encode_transfer,
                            |r: &CreateTransferResult| r.as_u32(),
                            |ledger, now, results| {
                                let mut out = Vec::new();
                                ledger.create_transfers(now, &transfers, &mut out)?;
                                *results = out;
                                Ok(())
                            },
                        )
                    });
                    answered.push(Pending::Transfers(reply, result));
                }
                Request::Submit(transfers, records, reply) => {
                    let result = self.execute_submit(now, &transfers, records);
                    answered.push(Pending::Submit(reply, result));
                }
                Request::Prune(prune, reply) => {
                    let result = self.execute_prune(now, *prune);
                    answered.push(Pending::Pruned(reply, result));
                }
                other => answered.push(Pending::Lookup(other)),
            }
        }
        // The group's events were stamped up to the ledger's last timestamp, which may run ahead
        // of the clock. A post or void in it that found its pending transfer due by that
        // timestamp was answered PendingTransferExpired without releasing the reservation (the
        // ledger leaves that to a pulse, as TigerBeetle does); expire such transfers now, in the
        // same group and the same fsync, so no answer says "expired" while the reservation is
        // still held (found by simulation seed 100774: a payment rejected AB05 after a restart
        // kept its pending credit until the clock moved on).
        let stamped = self.ledger.scalars().last_timestamp;
        if stamped > now && !refusing {
            self.pulse_due(stamped)?;
        }
        // One write for the whole group; the sync thread fdatasyncs it and only then answers and
        // indexes it, while this thread builds the next group (pipelined group commit).
        let file = self.journal.write_group()?;
        let last_seq = self.journal.next_seq() - 1;
        let update = (last_seq >= seq_before).then(|| self.index_update(last_seq));
        // A leader's group goes to the replicated log now, in parallel with its fdatasync.
        let ticket = match &self.options.replication {
            Replication::Leader(log) if last_seq >= seq_before => {
                let records = self.journal.take_captured();
                Some(log.submit(ReplicatedGroup {
                    records,
                    chain_seq: self.chain.seq,
                    chain_hash: self.chain.hash,
                }))
            }
            _ => None,
        };
        let mut deliveries: Vec<Delivery> = Vec::with_capacity(answered.len());
        for pending in answered {
            deliveries.push(match pending {
                Pending::Accounts(reply, result) => Box::new(move || reply(result)),
                Pending::Transfers(reply, result) => Box::new(move || reply(result)),
                Pending::Submit(reply, result) => Box::new(move || reply(result)),
                Pending::Pruned(reply, result) => Box::new(move || reply(result)),
                Pending::Applied(reply, last) => Box::new(move || reply(Ok(last))),
                Pending::Lookup(request) => self.answer_lookup(request),
            });
        }
        self.sync_sender
            .send(SyncJob {
                file,
                last_seq,
                deliveries,
                update,
                ticket,
            })
            .map_err(|_| EngineError::Stopped {
                reason: "the sync thread has exited".into(),
            })?;
        // Backpressure: not too many transfers waiting for the index, however few groups hold them.
        let (sent, limit) = (self.transfers_sent, self.options.unindexed_transfers_max);
        self.progress
            .wait_until(|state| sent - state.transfers_indexed <= limit)?;
        self.evict_indexed();
        self.remove_covered_segments()?;
        Ok(())
    }

    /// Why a write is refused before execution: a follower takes none; a leader none while its
    /// log cannot take groups.
    fn refusal(&self) -> EngineError {
        match self.options.replication {
            Replication::Follower => EngineError::NotLeader,
            _ => EngineError::ReplicationUnavailable,
        }
    }

    /// A follower's write path: the leader's records, appended verbatim and replayed (the same
    /// code as recovery, which checks each record's sealed results), then the chain head checked.
    fn apply_records(
        &mut self,
        records: Vec<Record>,
        chain: Option<(u64, [u8; 32])>,
    ) -> Result<u64, EngineError> {
        let mut prefetched = Vec::new();
        for record in records {
            let next = self.journal.next_seq();
            if record.seq < next {
                continue; // already applied (a restart in the middle of a message)
            }
            if record.seq > next {
                return Err(EngineError::Diverged(format!(
                    "record {} arrived but {next} was expected: records are missing",
                    record.seq
                )));
            }
            self.check_disk_space()?;
            self.journal.reserve(record.payload.len())?;
            prefetched.clear();
            replay(
                &self.index,
                &mut self.ledger,
                &record,
                &mut self.records,
                &mut self.chain,
                &mut self.vouchers,
                &mut self.prunes,
                &mut prefetched,
            )
            .map_err(|error| {
                EngineError::Diverged(format!("replaying record {}: {error}", record.seq))
            })?;
            for id in prefetched.drain(..) {
                self.touch(record.seq, id);
            }
            let seq = self
                .journal
                .append(record.kind, record.timestamp, &record.payload)?;
            assert_eq!(
                seq, record.seq,
                "a follower's journal keeps the leader's sequence"
            );
        }
        if let Some((seq, hash)) = chain {
            if (self.chain.seq, self.chain.hash) != (seq, hash) {
                return Err(EngineError::Diverged(format!(
                    "voucher chain after journal record {}: local {}:{} but the leader's is {seq}:{}",
                    self.journal.next_seq() - 1,
                    self.chain.seq,
                    hex_short(&self.chain.hash),
                    hex_short(&hash)
                )));
            }
        }
        Ok(self.journal.next_seq() - 1)
    }

    /// Expires (one journaled pulse record, at most `expiries_per_pulse_max` transfers) the
    /// pending transfers due at `cutoff`, when there are any and the disk can take the record;
    /// replay runs the same pulse from the record's timestamp.
    fn pulse_due(&mut self, cutoff: u64) -> Result<(), EngineError> {
        if self.ledger.next_expiry().is_some_and(|at| at <= cutoff)
            && self.check_disk_space().is_ok()
            && self.journal.reserve(codec::PAYLOAD_HEADER_SIZE).is_ok()
        {
            let expired = self.ledger.pulse(cutoff);
            let mut payload = [0u8; codec::PAYLOAD_HEADER_SIZE];
            codec::seal_results(
                &mut payload,
                codec::results_digest(std::iter::once(expired as u32)),
            );
            self.journal.append(KIND_PULSE, cutoff, &payload)?;
        }
        Ok(())
    }

    /// Reserves journal space, executes on the ledger, appends the record. A refusal before
    /// execution (full disk, too many events) leaves the ledger untouched.
    fn execute<E, R>(
        &mut self,
        kind: u16,
        now: u64,
        events: &[E],
        encode: fn(&mut Vec<u8>, &E),
        code: fn(&R) -> u32,
        apply: impl FnOnce(&mut Ledger, u64, &mut Vec<R>) -> Result<(), clearhouse_ledger::BatchError>,
    ) -> Result<Vec<R>, EngineError> {
        if events.len() > clearhouse_ledger::BATCH_EVENTS_MAX {
            return Err(clearhouse_ledger::BatchError::TooManyEvents {
                count: events.len(),
                max: clearhouse_ledger::BATCH_EVENTS_MAX,
            }
            .into());
        }
        let payload = codec::encode_batch(events, encode);
        self.journal_and_apply(kind, now, payload, |ledger| {
            let mut results = Vec::new();
            apply(ledger, now, &mut results)?;
            let digest = codec::results_digest(results.iter().map(code));
            Ok((results, digest))
        })
    }

    /// The write path every journaled request takes: refuse on a full disk, reserve the journal
    /// space (so nothing runs that cannot be journaled), run on the ledger, seal the results'
    /// digest into the payload, append.
    fn journal_and_apply<T>(
        &mut self,
        kind: u16,
        now: u64,
        mut payload: Vec<u8>,
        apply: impl FnOnce(&mut Ledger) -> Result<(T, (u32, u32)), clearhouse_ledger::BatchError>,
    ) -> Result<T, EngineError> {
        self.check_disk_space()?;
        self.journal.reserve(payload.len())?;
        let (out, digest) = apply(&mut self.ledger)?;
        codec::seal_results(&mut payload, digest);
        self.journal.append(kind, now, &payload)?;
        Ok(out)
    }

    /// Loads from the index the transfers a batch names that are not cached, and keeps them
    /// cached until the index holds this batch's changes.
    fn prefetch_and_touch(&mut self, transfers: &[Transfer]) -> Result<(), EngineError> {
        let found = prefetch(&self.index, &mut self.ledger, transfers)?;
        let seq = self.journal.next_seq();
        for id in found {
            self.touch(seq, id);
        }
        Ok(())
    }

    /// Like [`Engine::execute`], for a submit: transfers and records in one journal record.
    fn execute_submit(
        &mut self,
        now: u64,
        transfers: &[Transfer],
        records: Vec<RecordPut>,
    ) -> Result<SubmitOutcome, EngineError> {
        for (count, max) in [
            (transfers.len(), clearhouse_ledger::BATCH_EVENTS_MAX),
            (records.len(), RECORD_PUTS_MAX),
        ] {
            if count > max {
                return Err(clearhouse_ledger::BatchError::TooManyEvents { count, max }.into());
            }
        }
        for record in &records {
            if record.value.len() > RECORD_VALUE_MAX
                || record.aliases.len() > RECORD_ALIASES_MAX
                || record
                    .voucher
                    .as_ref()
                    .is_some_and(|v| v.is_empty() || v.len() > VOUCHER_BODY_MAX)
                || record
                    .when_transfer_ok
                    .is_some_and(|i| i as usize >= transfers.len())
            {
                return Err(EngineError::RecordRefused {
                    key: record.key,
                    reason: format!(
                        "value {} bytes (max {RECORD_VALUE_MAX}), {} aliases (max {RECORD_ALIASES_MAX}), voucher {:?} bytes (1 to {VOUCHER_BODY_MAX}), condition {:?} over {} transfers",
                        record.value.len(),
                        record.aliases.len(),
                        record.voucher.as_ref().map(|v| v.len()),
                        record.when_transfer_ok,
                        transfers.len()
                    ),
                });
            }
        }
        self.prefetch_and_touch(transfers)?;
        let payload = codec::encode_submit(transfers, &records);
        let (results, written) = self.journal_and_apply(KIND_SUBMIT, now, payload, |ledger| {
            let mut results = Vec::new();
            ledger.create_transfers(now, transfers, &mut results)?;
            let written = records_written(&records, &results);
            let digest = submit_digest(&results, &written);
            Ok(((results, written), digest))
        })?;
        let mut vouchers = Vec::with_capacity(records.len());
        for (mut record, written) in records.into_iter().zip(&written) {
            let mut stamp = None;
            if *written {
                if let Some(body) = record.voucher.take() {
                    let voucher = self.chain.append(body);
                    stamp = Some(VoucherStamp {
                        seq: voucher.seq,
                        hash: voucher.hash,
                    });
                    self.vouchers.push(voucher);
                }
                self.records.push(record);
            }
            vouchers.push(stamp);
        }
        Ok(SubmitOutcome {
            results,
            written,
            vouchers,
        })
    }

    /// Checks and journals a prune (see [`Node::prune`]); the index applies it with the group.
    fn execute_prune(&mut self, now: u64, prune: Prune) -> Result<(), EngineError> {
        let refuse = |reason: String| EngineError::RecordRefused { key: 0, reason };
        let longest = [
            prune.delete.len(),
            prune.replace.len(),
            prune.aliases.len(),
            prune.transfers.len(),
        ]
        .into_iter()
        .max()
        .unwrap_or(0);
        if longest > PRUNE_KEYS_MAX {
            return Err(refuse(format!(
                "prune: a list of {longest} keys (max {PRUNE_KEYS_MAX})"
            )));
        }
        if let Some((key, value)) = prune
            .replace
            .iter()
            .find(|(_, v)| v.len() > PRUNE_REPLACEMENT_MAX)
        {
            return Err(refuse(format!(
                "prune: replacement of record {key:#x} is {} bytes (max {PRUNE_REPLACEMENT_MAX})",
                value.len()
            )));
        }
        if let Some(id) = prune.transfers.iter().find(|id| {
            self.ledger
                .cached_transfer(**id)
                .is_some_and(|s| s.status == clearhouse_ledger::PendingStatus::Pending)
        }) {
            return Err(refuse(format!("prune: transfer {id:#x} is pending")));
        }
        if prune.vouchers_through > self.chain.seq {
            return Err(refuse(format!(
                "prune: voucher {} is past the chain's head {}",
                prune.vouchers_through, self.chain.seq
            )));
        }
        let anchor = self.index.vouchers_anchor()?;
        if prune.vouchers_through > anchor.0 {
            match self.index.voucher_hash(prune.vouchers_through)? {
                Some(hash) if hash == prune.anchor_hash => {}
                Some(_) => {
                    return Err(refuse(format!(
                        "prune: the anchor hash is not voucher {}'s",
                        prune.vouchers_through
                    )))
                }
                None => {
                    return Err(refuse(format!(
                        "prune: voucher {} is not indexed yet; retry",
                        prune.vouchers_through
                    )))
                }
            }
        }
        let payload = codec::encode_prune(&prune);
        self.journal_and_apply(KIND_PRUNE, now, payload, |_| Ok(((), prune_digest())))?;
        for id in &prune.transfers {
            self.ledger.evict(*id);
        }
        self.prunes.push(prune);
        Ok(())
    }

    /// Refuses a write while the disk is too full or read-only. Free space is read (statvfs) once
    /// per group, not per request: the required margin dwarfs what one group can write.
    fn check_disk_space(&mut self) -> Result<(), EngineError> {
        // The index may still have to write every unindexed transfer (one transaction can hold
        // them all, copy-on-write pages included), so that much space must stay free too.
        let required_bytes = self.options.disk_free_min_bytes.saturating_add(
            self.options
                .unindexed_transfers_max
                .saturating_mul(INDEX_BYTES_PER_TRANSFER_ESTIMATE),
        );
        let (free_bytes, read_only) = *self
            .free_bytes_this_group
            .get_or_insert_with(|| free_bytes(&self.options.data_dir));
        if read_only {
            return Err(EngineError::ReadOnly {
                path: self.options.data_dir.clone(),
            });
        }
        if free_bytes < required_bytes {
            return Err(EngineError::DiskFull {
                path: self.options.data_dir.clone(),
                free_bytes,
                required_bytes,
            });
        }
        Ok(())
    }

    fn touch(&mut self, seq: u64, id: u128) {
        self.touched.insert(id, seq);
        self.recent.push_back((seq, id));
    }

    /// The group's changes for the index (sent by the sync thread once the group is durable).
    fn index_update(&mut self, seq: u64) -> IndexUpdate {
        // The ledger collects the next group's changes into a recycled set when there is one.
        let mut changes = self.spare_changes.try_recv().unwrap_or_default();
        self.ledger.take_changes(&mut changes);
        let ids: Vec<u128> = changes.transfers.iter().map(|s| s.transfer.id).collect();
        for id in ids {
            self.touch(seq, id);
        }
        self.records_since_checkpoint += 1;
        let durable = self.records_since_checkpoint >= self.options.checkpoint_every_records;
        if durable {
            self.records_since_checkpoint = 0;
        }
        self.transfers_sent += changes.transfers.len() as u64;
        IndexUpdate {
            seq,
            records: std::mem::take(&mut self.records),
            vouchers: std::mem::take(&mut self.vouchers),
            prunes: std::mem::take(&mut self.prunes),
            changes,
            accounts: self.ledger.take_dirty_accounts(),
            scalars: self.ledger.scalars(),
            durable,
        }
    }

    fn evict_indexed(&mut self) {
        let indexed = self.progress.indexed.lock().expect("progress").seq;
        while let Some(&(seq, id)) = self.recent.front() {
            if seq > indexed {
                break;
            }
            self.recent.pop_front();
            if self.touched.get(&id) == Some(&seq) {
                self.touched.remove(&id);
                self.ledger.evict(id);
            }
        }
    }

    fn remove_covered_segments(&mut self) -> Result<(), EngineError> {
        let checkpoint_seq = self
            .progress
            .indexed
            .lock()
            .expect("progress")
            .checkpoint_seq;
        if checkpoint_seq > self.checkpoint_seq_done {
            self.journal.remove_segments_through(checkpoint_seq)?;
            self.checkpoint_seq_done = checkpoint_seq;
        }
        Ok(())
    }

    /// Computes a lookup's answer now; it is delivered after the group is durable, so nobody
    /// reads state that is not durable yet.
    fn answer_lookup(&mut self, request: Request) -> Delivery {
        match request {
            Request::LookupAccounts(ids, reply) => {
                let accounts = ids
                    .iter()
                    .filter_map(|id| self.ledger.account(*id).copied())
                    .collect();
                Box::new(move || reply(Ok(accounts)))
            }
            Request::LookupTransfers(ids, reply) => {
                let mut missing = Vec::new();
                let mut found: FxHashMap<u128, StoredTransfer> = FxHashMap::default();
                for id in &ids {
                    match self.ledger.cached_transfer(*id) {
                        Some(stored) => {
                            found.insert(*id, *stored);
                        }
                        None => missing.push(*id),
                    }
                }
                let result = self
                    .index
                    .get_transfers(&missing, |stored| {
                        found.insert(stored.transfer.id, stored);
                    })
                    .map(|()| ids.iter().filter_map(|id| found.get(id).copied()).collect());
                Box::new(move || reply(result))
            }
            Request::Stats(reply) => {
                let state = self.progress.indexed.lock().expect("progress");
                let stats = NodeStats {
                    journal_bytes_written: self.journal.bytes_written(),
                    committed_seq: self.progress.committed_seq.load(Ordering::SeqCst),
                    indexed_seq: state.seq,
                    checkpoint_seq: state.checkpoint_seq,
                    cached_transfers: self.ledger.cached_transfers_count(),
                    chain_seq: self.chain.seq,
                    chain_hash: self.chain.hash,
                };
                Box::new(move || reply(Ok(stats)))
            }
            Request::CreateAccounts(..)
            | Request::CreateTransfers(..)
            | Request::Submit(..)
            | Request::Prune(..)
            | Request::Apply(..) => {
                unreachable!("writes are executed, not looked up")
            }
        }
    }
}

/// Bytes available to unprivileged writers on the filesystem holding `path` (u64::MAX if unknown),
/// and whether it is mounted read-only.
pub fn free_bytes(path: &Path) -> (u64, bool) {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return (u64::MAX, false);
    };
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: c_path is a valid NUL-terminated string and stat a valid out-pointer.
    if unsafe { libc::statvfs(c_path.as_ptr(), &mut stat) } != 0 {
        return (u64::MAX, false);
    }
    let read_only = stat.f_flag & libc::ST_RDONLY != 0;
    (
        (stat.f_bavail as u64).saturating_mul(stat.f_frsize as u64),
        read_only,
    )
}

fn hex_short(hash: &[u8; 32]) -> String {
    hash[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// The journal directory inside a data directory.
pub fn journal_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("journal")
}
