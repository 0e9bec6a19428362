//! Deterministic, seed-driven simulation of clearhouse: the real engine (ledger, journal with
//! real files and fsync, index), the real switch (payment lifecycle, liquidity, idempotency,
//! resume after restart) and real clearing (windows, netting, fund adjustments, the voucher
//! chain), driven by simulated participants on a simulated clock, under injected faults:
//! messages to and from participants dropped, delayed, duplicated and reordered; creditor agents
//! that answer late, never, or cannot be reached; switch crashes by power loss during a journal
//! write (the write lost, torn, or on disk but never acknowledged) and restarts, with time
//! passing while the switch is down. Retention is a step too: the oldest settled window's
//! vouchers go to the simulator's archive and the window is pruned from the hot store (also
//! under power loss); pruned payments must then answer "archived" to status queries and stay
//! refused as duplicates, and the chain is verified whole, archive first.
//!
//! Every random choice comes from the seed; the switch runs on a single-threaded runtime that
//! moves only while the simulator waits for what it expects the switch to emit, and time moves
//! only when the simulator advances it. A seed therefore reproduces the same run: the same
//! actions, faults, outcomes and trace (its BLAKE3 digest is in the report).
//!
//! After every step it checks a model of what must be true against the real components:
//! every participant's ledger balance, reserved and incoming amounts; no reservation alive past
//! its deadline; every payment in exactly one final state, never changing, answered the same to
//! status queries and duplicate submissions; the open window's positions; the voucher chain and
//! its signed checkpoints, and that it holds each settled payment exactly once.
//!
//! What it deliberately does not do: HTTP (the simulated network replaces the participant
//! calls; the HTTP layer has its own tests), the liquidity-saving queue, recalls, and faults
//! inside the index store (it is rebuilt from the journal).
//!
//! Files: this one holds the data (options, report, the world's state, the model's records);
//! `world.rs` the world (the switch's start and restarts, banks, network, clock), `faults.rs`
//! power loss and what it interrupts, `actions.rs` the seeded steps, `model.rs` what must be true
//! kept independently of the switch, `checks.rs` the model against the real components.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clearhouse_clearing::event::VoucherEvent;
use clearhouse_engine::{Node, NodeOptions};
use clearhouse_journal::StorageFaults;
use clearhouse_switch::clock::{Clock, SimClock};
use clearhouse_switch::config::SwitchConfig;
use clearhouse_switch::model::{Party, PaymentState, SettlementModel};
use clearhouse_switch::money::{format_amount, format_signed};
use clearhouse_switch::outbound::{Decision, Notification, SimAnswer, SimCall, Transport};
use clearhouse_switch::switch::{
    ApiError, Caller, Environment, LiquidityDirection, LiquidityRequest, OnboardRequest,
    PaymentRequest, PaymentView, StatusQuery, Switch, TermsRequest,
};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

mod actions;
mod checks;
mod faults;
mod model;
mod replica;
mod world;

/// Simulated participants: the first three prefunded, the others deferred net.
const BANKS: usize = 5;
const PREFUNDED: usize = 3;
const CURRENCY: &str = "EUR";
const EXPONENT: u8 = 2;
/// Initial funding of a prefunded participant and net debit cap of a deferred one (minor units).
const FUNDING: u128 = 5_000_000;
const CAP: u128 = 3_000_000;
const AMOUNT_MAX: u64 = 1_500_000;
const DEADLINE_MS: u64 = 4_000;
const HARD_TIMEOUT_MS: u64 = 9_000;
/// Largest clock step while the switch runs: below `HARD_TIMEOUT_MS - DEADLINE_MS`, so the switch
/// always rejects at the deadline before the ledger's own expiry.
const ADVANCE_MAX_MS: u64 = 3_000;
/// Longest downtime of a crash (may pass reservations' hard timeouts).
const DOWNTIME_MAX_MS: u64 = 12_000;
/// Messages held in the simulated network, and calls the switch may queue to it.
const NETWORK_MAX: usize = 4_096;
const CALLS_MAX: usize = 4_096;
/// Real time the simulator waits for something it expects the switch to emit.
const WAIT_REAL: Duration = Duration::from_secs(30);
/// Simulated time starts at a fixed instant (2027-01-15) so payment ids reproduce.
const START_NS: u64 = 1_800_000_000_000_000_000;
const REJECT_REASONS: [&str; 4] = ["AC04", "AC06", "AG01", "RR04"];

#[derive(Clone, Debug)]
pub struct SimOptions {
    pub seed: u64,
    pub steps: u64,
    /// An empty directory for the data (journal, index, keys).
    pub data_dir: PathBuf,
    /// Print every trace line to stderr as it happens.
    pub verbose: bool,
    /// Replicated: a simulated replicated log and lease, a standby node on a second directory,
    /// failover instead of restart on every crash (crate's `replica.rs`).
    pub replicated: bool,
}

/// Faults injected during a run.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Faults {
    pub messages_dropped: u64,
    pub messages_duplicated: u64,
    pub messages_reordered: u64,
    pub answers_late: u64,
    pub answers_never: u64,
    pub creditors_unreachable: u64,
    pub crashes: u64,
    pub writes_lost: u64,
    pub writes_torn: u64,
    pub writes_unacknowledged_on_disk: u64,
    pub clock_advances: u64,
    /// Replicated runs: groups lost before the log stored them, groups stored with the ack lost,
    /// failovers, and records cut from a former leader's journal because the log never stored
    /// them.
    pub publishes_lost: u64,
    pub acks_lost: u64,
    pub failovers: u64,
    pub unreplicated_records_cut: u64,
    /// Replicated runs: leaders cut off from the log while alive (then deposed, and refused by
    /// the log when they tried to write again).
    pub partitions: u64,
    /// Prunes (retention) a power loss interrupted, done again after the restart.
    pub prunes_interrupted: u64,
}

#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct SimReport {
    pub seed: u64,
    pub steps: u64,
    pub payments: u64,
    pub settled: u64,
    pub rejected: BTreeMap<String, u64>,
    pub duplicate_submissions: u64,
    pub status_queries: u64,
    pub liquidity_transfers: u64,
    /// Returns (pacs.004) that moved money, and refused or replayed return requests.
    pub returns: u64,
    pub returns_refused_or_replayed: u64,
    pub windows_closed: u64,
    pub windows_settled: u64,
    /// Windows pruned from the hot store (retention), and the payments that left it.
    pub windows_pruned: u64,
    pub payments_archived: u64,
    pub vouchers_verified: u64,
    pub checks: u64,
    pub faults: Faults,
    /// Simulated time that passed, in ms.
    pub simulated_ms: u64,
    /// BLAKE3 of the trace: equal for two runs of the same seed.
    pub trace_digest: String,
}

/// An invariant that did not hold, or the switch not doing what it must.
#[derive(Debug, thiserror::Error)]
#[error("seed {seed} failed at step {step}: {message}")]
pub struct Violation {
    pub seed: u64,
    pub step: u64,
    pub message: String,
    /// The last lines of the trace.
    pub trace_tail: Vec<String>,
}

/// Runs one seed.
pub fn run(options: &SimOptions) -> Result<SimReport, Violation> {
    let mut world = World::new(options);
    let result = world.run_all();
    match result {
        Ok(()) => {
            world.report.trace_digest = world.digest.finalize().to_hex().to_string();
            world.report.simulated_ms = (world.clock.now_ns() - START_NS) / 1_000_000;
            Ok(world.report)
        }
        Err(message) => Err(Violation {
            seed: options.seed,
            step: world.step,
            message,
            trace_tail: world.tail.iter().cloned().collect(),
        }),
    }
}

/// splitmix64: small, fast, and the same everywhere.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum State {
    Pending,
    Settled,
    Rejected(String),
}

impl State {
    fn of_view(view: &PaymentView) -> Result<State, String> {
        match (view.status.as_str(), &view.reason) {
            ("PDNG", _) => Ok(State::Pending),
            ("ACSC", None) => Ok(State::Settled),
            ("RJCT", Some(reason)) => Ok(State::Rejected(reason.clone())),
            (status, reason) => Err(format!("payment status {status} with reason {reason:?}")),
        }
    }

    fn of_decision(decision: &Decision) -> State {
        match decision {
            Decision::Accept => State::Settled,
            Decision::Reject(reason) => State::Rejected(reason.clone()),
        }
    }
}

struct Payment {
    id: u128,
    debtor: usize,
    creditor: usize,
    amount: u128,
    request: PaymentRequest,
    deadline_ns: u64,
    state: State,
    /// Calls the switch must still emit for it, and the final state they must carry.
    forwards_due: u32,
    notes_due: u32,
    notes_to: Vec<usize>,
    expected_final: Option<State>,
    /// The reason a timeout will carry (AB08 after "unreachable").
    timeout_reason: &'static str,
    /// A decision whose write a power loss interrupted: its outcome is known only after restart.
    interrupted: Option<Decision>,
    /// What each agent was told by notifications.
    told: [Option<State>; 2],
    /// Returned so far (pacs.004), and the returns made (id, amount) for replays.
    returned: u128,
    returns: Vec<(String, u128)>,
    /// Its window was pruned (retention): only its tombstone is hot.
    archived: bool,
}

enum Message {
    /// To the creditor agent; `answer` is the synchronous answer (None for a duplicate copy).
    Forward {
        payment: usize,
        answer: Option<oneshot::Sender<SimAnswer>>,
    },
    /// To a participant: a payment's final state.
    Notify {
        payment: usize,
        bank: usize,
        state: State,
    },
    /// From the creditor agent: its decision call.
    Decide { payment: usize, decision: Decision },
}

impl Message {
    fn describe(&self) -> String {
        match self {
            Message::Forward { payment, answer } => {
                format!(
                    "forward p{payment}{}",
                    if answer.is_some() { "" } else { " (copy)" }
                )
            }
            Message::Notify {
                payment,
                bank,
                state,
            } => format!("notify p{payment} to b{bank} {state:?}"),
            Message::Decide { payment, decision } => format!("decide p{payment} {decision:?}"),
        }
    }

    fn copy(&self) -> Message {
        match self {
            Message::Forward { payment, .. } => Message::Forward {
                payment: *payment,
                answer: None,
            },
            Message::Notify {
                payment,
                bank,
                state,
            } => Message::Notify {
                payment: *payment,
                bank: *bank,
                state: state.clone(),
            },
            Message::Decide { payment, decision } => Message::Decide {
                payment: *payment,
                decision: decision.clone(),
            },
        }
    }
}

struct Bank {
    bic: String,
    deferred: bool,
    /// Ledger balance excluding the net debit cap line (credits - debits - cap).
    balance: i128,
    /// The open window's settled amounts.
    window_sent: u128,
    window_received: u128,
}

struct Live {
    runtime: tokio::runtime::Runtime,
    node: Node,
    switch: Arc<Switch>,
    calls: mpsc::Receiver<SimCall>,
}

/// A liquidity transfer a power loss interrupted: retried with the same request id.
struct InterruptedLiquidity {
    bank: usize,
    request: LiquidityRequest,
    amount: u128,
}

struct World {
    steps: u64,
    step: u64,
    verbose: bool,
    rng: Rng,
    clock: SimClock,
    storage: Arc<StorageFaults>,
    data_dir: PathBuf,
    live: Option<Live>,
    /// Replicated runs: the log, the lease, the standby.
    replica: Option<replica::Replica>,
    banks: Vec<Bank>,
    payments: Vec<Payment>,
    by_id: BTreeMap<u128, usize>,
    network: VecDeque<Message>,
    closed_unsettled: Vec<u64>,
    interrupted_liquidity: Option<InterruptedLiquidity>,
    /// A close (false) or settlement (true) of this window a power loss interrupted.
    interrupted_window: Option<(u64, bool)>,
    /// A prune a power loss interrupted: done again after the restart.
    interrupted_prune: bool,
    /// The simulator's archive: every voucher of the pruned windows (seq, hash, body), in order,
    /// taken from the chain before each prune.
    archive: Vec<(u64, [u8; 32], Vec<u8>)>,
    liquidity_requests: u64,
    returns_made: u64,
    /// Return notifications the switch still owes (two per return).
    return_notes_due: u32,
    /// Money that entered or left the participants' positions from outside: liquidity moved
    /// and fund adjustments. The positions on the ledger must always sum to it.
    external_total: i128,
    digest: blake3::Hasher,
    tail: VecDeque<String>,
    report: SimReport,
}

type Outcome = Result<(), String>;

fn config() -> SwitchConfig {
    SwitchConfig {
        settle_deadline_ms: DEADLINE_MS,
        hard_timeout_ms: HARD_TIMEOUT_MS,
        // Answer PDNG at once: the final state arrives by notification (and status query).
        sync_wait_ms: 0,
        ..SwitchConfig::default()
    }
}

fn api(error: ApiError) -> String {
    format!("{} {}: {}", error.status, error.code, error.message)
}
