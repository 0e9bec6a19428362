//! Deterministic, seed-driven simulation of clearhouse: the real engine (ledger, journal with
//! real files and fsync, index), the real switch (payment lifecycle, liquidity, idempotency,
//! resume after restart) and real clearing (windows, netting, fund adjustments, the voucher
//! chain), driven by simulated participants on a simulated clock, under injected faults:
//! messages to and from participants dropped, delayed, duplicated and reordered; creditor agents
//! that answer late, never, or cannot be reached; switch crashes by power loss during a journal
//! write (the write lost, torn, or on disk but never acknowledged) and restarts, with time
//! passing while the switch is down.
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

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clearhouse_clearing::event::VoucherEvent;
use clearhouse_engine::{Node, NodeOptions};
use clearhouse_journal::StorageFaults;
use clearhouse_switch::clock::{Clock, SimClock};
use clearhouse_switch::config::SwitchConfig;
use clearhouse_switch::model::{Party, SettlementModel};
use clearhouse_switch::money::{format_amount, format_signed};
use clearhouse_switch::outbound::{Decision, Notification, SimAnswer, SimCall, Transport};
use clearhouse_switch::switch::{
    ApiError, Caller, Environment, LiquidityDirection, LiquidityRequest, OnboardRequest,
    PaymentRequest, PaymentView, StatusQuery, Switch, TermsRequest,
};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

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
    banks: Vec<Bank>,
    payments: Vec<Payment>,
    by_id: BTreeMap<u128, usize>,
    network: VecDeque<Message>,
    closed_unsettled: Vec<u64>,
    interrupted_liquidity: Option<InterruptedLiquidity>,
    /// A close (false) or settlement (true) of this window a power loss interrupted.
    interrupted_window: Option<(u64, bool)>,
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

impl World {
    fn new(options: &SimOptions) -> World {
        let banks = (0..BANKS)
            .map(|i| Bank {
                bic: format!("SIM{}DEFF", (b'A' + i as u8) as char),
                deferred: i >= PREFUNDED,
                balance: 0,
                window_sent: 0,
                window_received: 0,
            })
            .collect();
        World {
            steps: options.steps,
            step: 0,
            verbose: options.verbose,
            rng: Rng(options.seed),
            clock: SimClock::new(START_NS),
            storage: Arc::new(StorageFaults::default()),
            data_dir: options.data_dir.clone(),
            live: None,
            banks,
            payments: Vec::new(),
            by_id: BTreeMap::new(),
            network: VecDeque::new(),
            closed_unsettled: Vec::new(),
            interrupted_liquidity: None,
            interrupted_window: None,
            liquidity_requests: 0,
            returns_made: 0,
            return_notes_due: 0,
            external_total: 0,
            digest: blake3::Hasher::new(),
            tail: VecDeque::new(),
            report: SimReport {
                seed: options.seed,
                ..SimReport::default()
            },
        }
    }

    fn trace(&mut self, line: String) {
        let line = format!("{:>5} {line}", self.step);
        if self.verbose {
            eprintln!("{line}");
        }
        self.digest.update(line.as_bytes());
        self.digest.update(b"\n");
        if self.tail.len() == 40 {
            self.tail.pop_front();
        }
        self.tail.push_back(line);
    }

    fn live(&self) -> &Live {
        self.live.as_ref().expect("the switch runs")
    }

    fn block_on<F: std::future::Future>(&self, future: F) -> F::Output {
        self.live().runtime.block_on(future)
    }

    fn run_all(&mut self) -> Outcome {
        self.start()?;
        self.onboard()?;
        self.check()?;
        while self.step < self.steps {
            self.step += 1;
            self.act()?;
            self.check()?;
            if self.step.is_multiple_of(25) {
                self.verify_vouchers()?;
            }
        }
        self.step += 1;
        self.finish()
    }

    // ------------------------------------------------------------------ lifecycle of the switch

    fn start(&mut self) -> Outcome {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("runtime: {e}"))?;
        let mut options = NodeOptions::new(&self.data_dir);
        options.clock = Some(self.clock.shared());
        options.journal.faults = Some(self.storage.clone());
        // Small segments: every restart reads its segment whole, and a seed restarts ~20 times
        // (64 MiB each made the sweep spend most of its time in the kernel); rolling over to a
        // new segment is exercised more often too.
        options.journal.segment_size = 4 * 1024 * 1024;
        // The simulated clock drives expiry; the interval only bounds how long a stopping engine
        // takes to notice (each of a seed's restarts waits for it).
        options.pulse_interval = std::time::Duration::from_millis(5);
        options.disk_free_min_bytes = 16 * 1024 * 1024;
        options.unindexed_transfers_max = 100_000;
        let node = Node::start(options).map_err(|e| format!("engine start: {e}"))?;
        let (sender, calls) = mpsc::channel(CALLS_MAX);
        let environment = Environment {
            clock: Clock::Simulated(self.clock.clone()),
            transport: Transport::Simulated(sender),
        };
        let truth = self.disk_truth(&node)?;
        let switch = runtime
            .block_on(Switch::start_in(
                node.clone(),
                config(),
                &self.data_dir,
                environment,
            ))
            .map_err(|e| format!("switch start: {}", api(e)))?;
        self.live = Some(Live {
            runtime,
            node,
            switch,
            calls,
        });
        self.resume_expectations(truth)?;
        self.pump()
    }

    /// The state on disk of every payment the model has open, read from the recovered engine
    /// before the switch starts.
    fn disk_truth(&self, node: &Node) -> Result<Vec<(usize, State)>, String> {
        let open: Vec<usize> = (0..self.payments.len())
            .filter(|&i| self.payments[i].state == State::Pending)
            .collect();
        let ids: Vec<u128> = open.iter().map(|&i| self.payments[i].id).collect();
        let records = node
            .get_records(&ids)
            .map_err(|e| format!("reading records: {e}"))?;
        let mut truth = Vec::new();
        for (&index, record) in open.iter().zip(records) {
            let record = record.ok_or_else(|| {
                format!("p{index} was acknowledged as reserved but is not on disk after recovery")
            })?;
            let value: serde_json::Value =
                serde_json::from_slice(&record).map_err(|e| format!("p{index} record: {e}"))?;
            let state = match (value["state"].as_str(), value["reason"].as_str()) {
                (Some("Reserved"), _) => State::Pending,
                (Some("Settled"), _) => State::Settled,
                (Some("Rejected"), Some(reason)) => State::Rejected(reason.to_string()),
                other => return Err(format!("p{index} on disk in state {other:?}")),
            };
            truth.push((index, state));
        }
        Ok(truth)
    }

    /// After a restart: what the switch must emit for the payments it resumes.
    fn resume_expectations(&mut self, truth: Vec<(usize, State)>) -> Outcome {
        let now = self.clock.now_ns();
        let (written, length) = self.storage.written();
        for (index, state) in truth {
            let interrupted = self.payments[index].interrupted.take();
            match state {
                State::Pending => {
                    if interrupted.is_some() && written == length && length > 0 {
                        return Err(format!(
                            "p{index}: its final write reached the disk whole but recovery did not replay it"
                        ));
                    }
                    let p = &mut self.payments[index];
                    p.timeout_reason = "AB05";
                    if p.deadline_ns > now {
                        p.forwards_due += 1;
                    } else {
                        p.notes_due += 2;
                        p.expected_final = Some(State::Rejected("AB05".into()));
                    }
                }
                final_state => {
                    let Some(decision) = interrupted else {
                        return Err(format!(
                            "p{index} is {final_state:?} on disk though nothing final was written for it"
                        ));
                    };
                    if written < length {
                        return Err(format!(
                            "p{index}: a write cut at {written} of {length} bytes was replayed as {final_state:?}"
                        ));
                    }
                    if final_state != State::of_decision(&decision) {
                        return Err(format!(
                            "p{index} on disk {final_state:?}, but the interrupted decision was {decision:?}"
                        ));
                    }
                    // Durable though never acknowledged: final, and nobody was notified (the
                    // agents learn it by status query).
                    self.settle_in_model(index, final_state);
                }
            }
        }
        Ok(())
    }

    fn crash(&mut self) {
        if let Some(live) = self.live.take() {
            // Dropping the runtime drops every task of the switch; then the engine's threads stop
            // (a poisoned journal wrote nothing more).
            let Live {
                runtime,
                node,
                switch,
                calls,
            } = live;
            drop(runtime);
            drop(calls);
            drop(switch);
            drop(node);
        }
        // Held forwards belong to the dead process: their answers go nowhere.
        for message in self.network.iter_mut() {
            if let Message::Forward { answer, .. } = message {
                *answer = None;
            }
        }
    }

    fn onboard(&mut self) -> Outcome {
        for i in 0..BANKS {
            let bank = &self.banks[i];
            let mut currencies = BTreeMap::new();
            currencies.insert(
                CURRENCY.to_string(),
                TermsRequest {
                    model: if bank.deferred {
                        SettlementModel::DeferredNet
                    } else {
                        SettlementModel::Prefunded
                    },
                    net_debit_cap: bank.deferred.then(|| format_amount(CAP, EXPONENT)),
                    per_payment_max: None,
                    liquidity_alert_below: None,
                },
            );
            let request = OnboardRequest {
                bic: bank.bic.clone(),
                name: format!("Simulated bank {i}"),
                endpoint: "http://127.0.0.1:9/simulated".into(),
                currencies,
                secret_hex: None,
                routing_number: None,
            };
            let switch = self.live().switch.clone();
            self.block_on(switch.onboard(request))
                .map_err(|e| format!("onboarding b{i}: {}", api(e)))?;
            if !self.banks[i].deferred {
                self.liquidity(i, FUNDING, LiquidityDirection::In)?;
            }
        }
        self.trace(format!(
            "onboarded {BANKS} banks ({PREFUNDED} prefunded with {FUNDING}, the others deferred net with cap {CAP})"
        ));
        Ok(())
    }

    // ------------------------------------------------------------------ the model

    fn reserved(&self, bank: usize) -> u128 {
        self.payments
            .iter()
            .filter(|p| p.state == State::Pending && p.debtor == bank)
            .map(|p| p.amount)
            .sum()
    }

    fn incoming(&self, bank: usize) -> u128 {
        self.payments
            .iter()
            .filter(|p| p.state == State::Pending && p.creditor == bank)
            .map(|p| p.amount)
            .sum()
    }

    fn available(&self, bank: usize) -> i128 {
        let b = &self.banks[bank];
        let cap = if b.deferred { CAP as i128 } else { 0 };
        b.balance + cap - self.reserved(bank) as i128
    }

    /// A payment leaves Pending: the model moves its money and counts it.
    fn settle_in_model(&mut self, index: usize, state: State) {
        let p = &mut self.payments[index];
        assert_eq!(p.state, State::Pending, "p{index} was already final");
        p.state = state.clone();
        let (debtor, creditor, amount) = (p.debtor, p.creditor, p.amount);
        match state {
            State::Settled => {
                self.report.settled += 1;
                self.banks[debtor].balance -= amount as i128;
                self.banks[creditor].balance += amount as i128;
                self.banks[debtor].window_sent += amount;
                self.banks[creditor].window_received += amount;
            }
            State::Rejected(reason) => *self.report.rejected.entry(reason).or_default() += 1,
            State::Pending => unreachable!("settle_in_model to Pending"),
        }
    }

    fn outstanding(&self) -> u64 {
        self.payments
            .iter()
            .map(|p| u64::from(p.forwards_due) + u64::from(p.notes_due))
            .sum::<u64>()
            + u64::from(self.return_notes_due)
    }

    fn describe_outstanding(&self) -> String {
        let mut due = Vec::new();
        if self.return_notes_due > 0 {
            due.push(format!("{} return notification(s)", self.return_notes_due));
        }
        for (i, p) in self.payments.iter().enumerate() {
            if p.forwards_due > 0 {
                due.push(format!("forward of p{i}"));
            }
            if p.notes_due > 0 {
                due.push(format!(
                    "{} notification(s) of p{i} ({:?})",
                    p.notes_due, p.expected_final
                ));
            }
        }
        due.join(", ")
    }

    /// Runs the switch until it emitted everything the model expects, checking each call as it
    /// comes; the calls of one step enter the network in a fixed order.
    fn pump(&mut self) -> Outcome {
        let mut emitted: Vec<(u8, usize, usize, Message)> = Vec::new();
        loop {
            let waiting = self.outstanding() > 0;
            let call = {
                let live = self.live.as_mut().expect("the switch runs");
                match live.calls.try_recv() {
                    Ok(call) => Some(call),
                    Err(_) if !waiting => None,
                    Err(_) => {
                        let calls = &mut live.calls;
                        match live
                            .runtime
                            .block_on(async { tokio::time::timeout(WAIT_REAL, calls.recv()).await })
                        {
                            Ok(Some(call)) => Some(call),
                            Ok(None) => return Err("the switch dropped its network".into()),
                            Err(_) => {
                                return Err(format!(
                                    "waited {} s for the switch to emit: {}",
                                    WAIT_REAL.as_secs(),
                                    self.describe_outstanding()
                                ))
                            }
                        }
                    }
                }
            };
            let Some(call) = call else { break };
            if let Some(message) = self.account(call)? {
                let key = match &message {
                    Message::Forward { payment, .. } => (0, *payment, 0),
                    Message::Notify { payment, bank, .. } => (1, *payment, *bank),
                    Message::Decide { payment, .. } => (2, *payment, 0),
                };
                emitted.push((key.0, key.1, key.2, message));
            }
        }
        emitted.sort_by_key(|(kind, payment, bank, _)| (*kind, *payment, *bank));
        for (_, _, _, message) in emitted {
            self.trace(format!("  emits {}", message.describe()));
            if self.network.len() >= NETWORK_MAX {
                self.report.faults.messages_dropped += 1;
                continue;
            }
            self.network.push_back(message);
        }
        Ok(())
    }

    /// Checks one call of the switch against the model.
    fn account(&mut self, call: SimCall) -> Result<Option<Message>, String> {
        match call {
            SimCall::Forward { payment, answer } => {
                let index = self.index_of(&payment)?;
                let p = &mut self.payments[index];
                if p.forwards_due == 0 {
                    return Err(format!("unexpected forward of p{index} ({:?})", p.state));
                }
                p.forwards_due -= 1;
                Ok(Some(Message::Forward {
                    payment: index,
                    answer: Some(answer),
                }))
            }
            SimCall::Notify {
                participant,
                notification,
            } => {
                let view = match notification {
                    Notification::Payment(view) => view,
                    // Alerts come on a real-time timer: not part of the deterministic trace.
                    Notification::LiquidityAlert(_) => return Ok(None),
                    Notification::Return(notice) => {
                        if self.return_notes_due == 0 {
                            return Err(format!(
                                "an unexpected return notification ({})",
                                notice.return_id
                            ));
                        }
                        self.return_notes_due -= 1;
                        return Ok(None);
                    }
                    Notification::Recall(_) => {
                        return Err("a recall notification nobody asked for".into())
                    }
                };
                let index = self.index_of(&view)?;
                let bank = self
                    .banks
                    .iter()
                    .position(|b| b.bic == participant)
                    .ok_or_else(|| format!("notification to unknown {participant}"))?;
                let state = State::of_view(&view)?;
                let p = &mut self.payments[index];
                if p.notes_due == 0 {
                    return Err(format!(
                        "unexpected notification of p{index} to b{bank}: {state:?}"
                    ));
                }
                if Some(&state) != p.expected_final.as_ref() {
                    return Err(format!(
                        "p{index} notified {state:?} to b{bank}, the model expects {:?}",
                        p.expected_final
                    ));
                }
                if bank != p.debtor && bank != p.creditor || p.notes_to.contains(&bank) {
                    return Err(format!(
                        "p{index} notified twice or to a stranger (b{bank})"
                    ));
                }
                p.notes_due -= 1;
                p.notes_to.push(bank);
                if p.notes_due == 0 {
                    p.notes_to.clear();
                }
                if p.state == State::Pending {
                    self.settle_in_model(index, state.clone());
                }
                Ok(Some(Message::Notify {
                    payment: index,
                    bank,
                    state,
                }))
            }
        }
    }

    fn index_of(&self, view: &PaymentView) -> Result<usize, String> {
        u128::from_str_radix(&view.payment_id, 16)
            .ok()
            .and_then(|id| self.by_id.get(&id).copied())
            .ok_or_else(|| format!("a call about unknown payment {}", view.payment_id))
    }

    /// The switch will finalize `index` with `state`: two notifications.
    fn expect_final(&mut self, index: usize, state: State) {
        let p = &mut self.payments[index];
        p.notes_due += 2;
        p.expected_final = Some(state);
    }

    // ------------------------------------------------------------------ actions

    fn act(&mut self) -> Outcome {
        let roll = self.rng.below(100);
        match roll {
            0..=24 => self.new_payment(),
            25..=61 | 94..=97 => {
                // A burst of deliveries: the network moves faster than the clock.
                for _ in 0..1 + self.rng.below(4) {
                    self.deliver()?;
                }
                Ok(())
            }
            62..=71 => {
                let by = if self.rng.chance(60) {
                    self.rng.below(200)
                } else {
                    self.rng.below(ADVANCE_MAX_MS + 1)
                };
                self.advance(by)
            }
            72..=74 => self.duplicate_submission(),
            75..=77 => self.return_payment(),
            78..=83 => self.status_query(),
            84..=89 => {
                let bank = self.rng.below(PREFUNDED as u64) as usize;
                let amount = 1 + u128::from(self.rng.below(AMOUNT_MAX));
                let direction = if self.rng.chance(60) {
                    LiquidityDirection::In
                } else {
                    LiquidityDirection::Out
                };
                self.liquidity(bank, amount, direction)
            }
            90..=91 => self.close_window(),
            92..=93 => self.settle_window(),
            _ => self.power_loss(),
        }
    }

    fn new_payment(&mut self) -> Outcome {
        let debtor = self.rng.below(BANKS as u64) as usize;
        let creditor = (debtor + 1 + self.rng.below(BANKS as u64 - 1) as usize) % BANKS;
        let amount = if self.rng.chance(5) {
            // Beyond what anyone has.
            FUNDING * 4 + u128::from(self.rng.below(1000))
        } else {
            1 + u128::from(self.rng.below(AMOUNT_MAX))
        };
        let n = self.payments.len();
        let request = PaymentRequest {
            instruction_id: format!("SIM-{n}"),
            end_to_end_id: format!("E2E-{n}"),
            uetr: None,
            debtor_agent: self.banks[debtor].bic.clone(),
            creditor_agent: self.banks[creditor].bic.clone(),
            amount: format_amount(amount, EXPONENT),
            currency: CURRENCY.into(),
            debtor: Party {
                name: "Debtor".into(),
                account: format!("DE{n:020}"),
            },
            creditor: Party {
                name: "Creditor".into(),
                account: format!("FR{n:020}"),
            },
            remittance_information: Some(format!("simulated payment {n}")),
            message_id: None,
            transaction_id: None,
        };
        let fits = amount as i128 <= self.available(debtor);
        let switch = self.live().switch.clone();
        let caller = Caller::Participant(self.banks[debtor].bic.clone());
        let (_, view) = self
            .block_on(switch.submit(&caller, request.clone()))
            .map_err(|e| format!("submit of p{n} refused: {}", api(e)))?;
        let id = u128::from_str_radix(&view.payment_id, 16).map_err(|e| e.to_string())?;
        let state = State::of_view(&view)?;
        self.trace(format!(
            "submit p{n} b{debtor}->b{creditor} {amount} => {state:?}"
        ));
        let expected = match (fits, self.banks[debtor].deferred) {
            (true, _) => State::Pending,
            (false, false) => State::Rejected("AM04".into()),
            (false, true) => State::Rejected("AM23".into()),
        };
        if state != expected {
            return Err(format!(
                "p{n} answered {state:?}, the model expects {expected:?} (available {})",
                self.available(debtor)
            ));
        }
        self.report.payments += 1;
        self.by_id.insert(id, n);
        self.payments.push(Payment {
            id,
            debtor,
            creditor,
            amount,
            request,
            deadline_ns: view.deadline_ns,
            state: State::Pending,
            forwards_due: 0,
            notes_due: 0,
            notes_to: Vec::new(),
            expected_final: None,
            timeout_reason: "AB05",
            interrupted: None,
            told: [None, None],
            returned: 0,
            returns: Vec::new(),
        });
        if view.deadline_ns != self.clock.now_ns() + DEADLINE_MS * 1_000_000 {
            return Err(format!(
                "p{n} deadline not {DEADLINE_MS} ms after acceptance"
            ));
        }
        match state {
            State::Pending => self.payments[n].forwards_due = 1,
            // Rejected before anything was reserved: answered, not notified.
            rejected => self.settle_in_model(n, rejected),
        }
        self.pump()
    }

    fn duplicate_submission(&mut self) -> Outcome {
        if self.payments.is_empty() {
            return self.new_payment();
        }
        let index = self.rng.below(self.payments.len() as u64) as usize;
        let changed = self.rng.chance(20);
        let p = &self.payments[index];
        let mut request = p.request.clone();
        if changed {
            request.end_to_end_id.push('X');
        }
        let caller = Caller::Participant(self.banks[p.debtor].bic.clone());
        let switch = self.live().switch.clone();
        let answer = self.block_on(switch.submit(&caller, request));
        self.report.duplicate_submissions += 1;
        let p = &self.payments[index];
        match (changed, answer) {
            (false, Ok((_, view))) => {
                let state = State::of_view(&view)?;
                if view.payment_id != format!("{:032x}", p.id) || state != p.state {
                    return Err(format!(
                        "resubmitted p{index} answered {} {state:?}, the model has {:?}",
                        view.payment_id, p.state
                    ));
                }
                self.trace(format!("resubmit p{index} => same payment, {state:?}"));
            }
            (true, Err(error)) if error.status == 409 => {
                self.trace(format!("resubmit p{index} changed => 409 {}", error.code));
            }
            (changed, answer) => {
                return Err(format!(
                    "resubmitted p{index} (changed: {changed}) answered {:?}",
                    answer.map(|(_, v)| v.status).map_err(api)
                ))
            }
        }
        self.pump()
    }

    /// The creditor agent returns (part of) a settled payment: a new return, a replay of an
    /// earlier one (answered the same, money moved once), or more than is left (AM09).
    fn return_payment(&mut self) -> Outcome {
        let settled: Vec<usize> = (0..self.payments.len())
            .filter(|&i| self.payments[i].state == State::Settled)
            .collect();
        if settled.is_empty() {
            return self.new_payment();
        }
        let index = settled[self.rng.below(settled.len() as u64) as usize];
        let p = &self.payments[index];
        let (creditor, debtor, open) = (p.creditor, p.debtor, p.amount - p.returned);
        let replay = !p.returns.is_empty() && self.rng.chance(25);
        let (return_id, amount, requested) = if replay {
            let (id, amount) = p.returns[self.rng.below(p.returns.len() as u64) as usize].clone();
            (id, amount, Some(format_amount(amount, EXPONENT)))
        } else {
            self.returns_made += 1;
            let id = format!("RET-{}", self.returns_made);
            match self.rng.below(4) {
                0 => (id, open, None),
                1 => (id, open + 1, Some(format_amount(open + 1, EXPONENT))),
                _ => {
                    let amount = 1 + u128::from(
                        self.rng
                            .below(u64::try_from(open).unwrap_or(u64::MAX).max(1)),
                    );
                    (id, amount, Some(format_amount(amount, EXPONENT)))
                }
            }
        };
        let request = clearhouse_switch::switch::ReturnRequest {
            return_id: return_id.clone(),
            amount: requested,
            reason: "CUST".into(),
            currency: None,
        };
        let caller = Caller::Participant(self.banks[creditor].bic.clone());
        let switch = self.live().switch.clone();
        let answer = self.block_on(switch.return_payment(&caller, p.id, request));
        self.trace(format!(
            "return {return_id} of p{index} {amount} (open {open}, replay {replay}) => {}",
            match &answer {
                Ok(_) => "done".to_string(),
                Err(e) => format!("{} {}", e.status, e.code),
            }
        ));
        let expected: Result<(), &str> = if replay {
            Ok(())
        } else if amount == 0 || amount > open {
            Err("AM09")
        } else if amount as i128 > self.available(creditor) {
            Err("AM04")
        } else {
            Ok(())
        };
        match (answer, expected) {
            (Ok(view), Ok(())) => {
                if view.amount != format_amount(amount, EXPONENT) {
                    return Err(format!(
                        "return {return_id} answered amount {}",
                        view.amount
                    ));
                }
                if replay {
                    self.report.returns_refused_or_replayed += 1;
                    return Ok(());
                }
                self.report.returns += 1;
                let p = &mut self.payments[index];
                p.returned += amount;
                p.returns.push((return_id, amount));
                self.banks[creditor].balance -= amount as i128;
                self.banks[debtor].balance += amount as i128;
                self.banks[creditor].window_sent += amount;
                self.banks[debtor].window_received += amount;
                self.return_notes_due += 2;
                self.pump()
            }
            (Err(e), Err(reason)) if e.reason == Some(reason) => {
                self.report.returns_refused_or_replayed += 1;
                Ok(())
            }
            (answer, expected) => Err(format!(
                "return {return_id} of p{index}: expected {expected:?}, answered {:?}",
                answer.map(|v| v.amount).map_err(api)
            )),
        }
    }

    fn status_query(&mut self) -> Outcome {
        if self.payments.is_empty() {
            return self.advance(10);
        }
        let index = self.rng.below(self.payments.len() as u64) as usize;
        let p = &self.payments[index];
        let asker = if self.rng.chance(50) {
            p.debtor
        } else {
            p.creditor
        };
        let query = StatusQuery {
            payment_id: Some(format!("{:032x}", p.id)),
            instruction_id: None,
            end_to_end_id: None,
            debtor_agent: None,
            uetr: None,
        };
        let caller = Caller::Participant(self.banks[asker].bic.clone());
        let switch = self.live().switch.clone();
        let view = self
            .block_on(switch.status(&caller, query))
            .map_err(|e| format!("status of p{index} for b{asker}: {}", api(e)))?;
        let state = State::of_view(&view)?;
        self.report.status_queries += 1;
        if state != self.payments[index].state {
            return Err(format!(
                "status of p{index}: {state:?}, the model has {:?}",
                self.payments[index].state
            ));
        }
        self.trace(format!("status p{index} by b{asker} => {state:?}"));
        Ok(())
    }

    fn advance(&mut self, by_ms: u64) -> Outcome {
        self.clock.advance(by_ms * 1_000_000);
        self.report.faults.clock_advances += 1;
        let now = self.clock.now_ns();
        let mut timed_out = Vec::new();
        for i in 0..self.payments.len() {
            let p = &self.payments[i];
            if p.state == State::Pending && p.deadline_ns <= now && p.notes_due == 0 {
                timed_out.push(i);
            }
        }
        for &i in &timed_out {
            let reason = self.payments[i].timeout_reason;
            self.expect_final(i, State::Rejected(reason.into()));
        }
        self.trace(format!("advance {by_ms} ms; {} time out", timed_out.len()));
        self.pump()
    }

    fn deliver(&mut self) -> Outcome {
        if self.network.is_empty() {
            return Ok(());
        }
        let at = if self.rng.chance(25) {
            self.rng.below(self.network.len() as u64) as usize
        } else {
            0
        };
        if at != 0 {
            self.report.faults.messages_reordered += 1;
        }
        let message = self.network.remove(at).expect("index in range");
        if self.rng.chance(7) {
            self.report.faults.messages_dropped += 1;
            self.trace(format!("drop {}", message.describe()));
            return Ok(());
        }
        if self.rng.chance(7) && self.network.len() < NETWORK_MAX {
            self.report.faults.messages_duplicated += 1;
            self.trace(format!("duplicate {}", message.describe()));
            self.network.push_back(message.copy());
        }
        match message {
            Message::Forward { payment, answer } => self.creditor_answers(payment, answer),
            Message::Decide { payment, decision } => self.decide(payment, decision),
            Message::Notify {
                payment,
                bank,
                state,
            } => {
                let p = &mut self.payments[payment];
                let slot = usize::from(bank == p.creditor);
                if let Some(told) = &p.told[slot] {
                    if *told != state {
                        return Err(format!(
                            "b{bank} was told p{payment} {told:?}, now {state:?}"
                        ));
                    }
                }
                p.told[slot] = Some(state.clone());
                self.trace(format!("b{bank} learns p{payment} {state:?}"));
                Ok(())
            }
        }
    }

    fn creditor_answers(
        &mut self,
        index: usize,
        answer: Option<oneshot::Sender<SimAnswer>>,
    ) -> Outcome {
        let decision = if self.rng.chance(88) {
            Decision::Accept
        } else {
            let reason = REJECT_REASONS[self.rng.below(REJECT_REASONS.len() as u64) as usize];
            Decision::Reject(reason.into())
        };
        let Some(answer) = answer else {
            // A copy (or from before a crash): the bank answers by a decision call, sometimes.
            if self.rng.chance(50) {
                self.network.push_back(Message::Decide {
                    payment: index,
                    decision: decision.clone(),
                });
            }
            self.trace(format!(
                "b{} sees p{index} again",
                self.payments[index].creditor
            ));
            return Ok(());
        };
        let roll = self.rng.below(100);
        let (sim_answer, label) = match roll {
            0..=71 => (SimAnswer::Decided(decision.clone()), "answers"),
            72..=85 => (SimAnswer::Later, "answers later"),
            86..=93 => {
                self.report.faults.answers_never += 1;
                drop(answer);
                self.trace(format!("p{index}: creditor never answers"));
                return Ok(());
            }
            _ => (SimAnswer::Unreachable, "unreachable"),
        };
        let pending =
            self.payments[index].state == State::Pending && self.payments[index].notes_due == 0;
        let sent = answer.send(sim_answer.clone()).is_ok();
        if sent != pending {
            return Err(format!(
                "the switch {} waiting for p{index}'s answer, the model has it {:?}",
                if sent { "was" } else { "was not" },
                self.payments[index].state
            ));
        }
        self.trace(format!(
            "p{index}: creditor {label} {decision:?} (switch waiting: {sent})"
        ));
        if !sent {
            return Ok(());
        }
        match sim_answer {
            SimAnswer::Decided(decision) => {
                self.expect_final(index, State::of_decision(&decision));
            }
            SimAnswer::Later => {
                self.report.faults.answers_late += 1;
                self.network.push_back(Message::Decide {
                    payment: index,
                    decision,
                });
            }
            SimAnswer::Unreachable => {
                self.report.faults.creditors_unreachable += 1;
                self.payments[index].timeout_reason = "AB08";
            }
        }
        self.pump()
    }

    fn decide(&mut self, index: usize, decision: Decision) -> Outcome {
        let p = &self.payments[index];
        let caller = Caller::Participant(self.banks[p.creditor].bic.clone());
        let pending = p.state == State::Pending && p.notes_due == 0;
        let switch = self.live().switch.clone();
        let answer = switch.decide(&caller, p.id, decision.clone());
        self.trace(format!(
            "decide p{index} {decision:?} => {}",
            match &answer {
                Ok(()) => "taken".to_string(),
                Err(e) => format!("{} {}", e.status, e.code),
            }
        ));
        match (answer, pending) {
            (Ok(()), true) => {
                self.expect_final(index, State::of_decision(&decision));
                self.pump()
            }
            (Err(e), false) if e.status == 409 => Ok(()),
            (answer, pending) => Err(format!(
                "decision on p{index} (model pending: {pending}) answered {:?}",
                answer.map_err(api)
            )),
        }
    }

    fn liquidity(&mut self, bank: usize, amount: u128, direction: LiquidityDirection) -> Outcome {
        self.liquidity_requests += 1;
        let request = LiquidityRequest {
            request_id: format!("LIQ-{}", self.liquidity_requests),
            currency: CURRENCY.into(),
            amount: format_amount(amount, EXPONENT),
            direction,
        };
        let fits = direction == LiquidityDirection::In || amount as i128 <= self.available(bank);
        let switch = self.live().switch.clone();
        let bic = self.banks[bank].bic.clone();
        let answer = self.block_on(switch.liquidity(&bic, request));
        self.trace(format!(
            "liquidity b{bank} {direction:?} {amount} => {}",
            match &answer {
                Ok(_) => "done".to_string(),
                Err(e) => format!("{} {}", e.status, e.code),
            }
        ));
        match (answer, fits) {
            (Ok(_), true) => {
                self.report.liquidity_transfers += 1;
                self.apply_liquidity(bank, amount, direction);
                self.pump()
            }
            (Err(e), false) if e.reason == Some("AM04") => Ok(()),
            (answer, fits) => Err(format!(
                "liquidity {direction:?} {amount} for b{bank} (model fits: {fits}) answered {:?}",
                answer.map(|_| ()).map_err(api)
            )),
        }
    }

    fn apply_liquidity(&mut self, bank: usize, amount: u128, direction: LiquidityDirection) {
        let signed = match direction {
            LiquidityDirection::In => amount as i128,
            LiquidityDirection::Out => -(amount as i128),
        };
        self.banks[bank].balance += signed;
        self.external_total += signed;
    }

    fn close_window(&mut self) -> Outcome {
        let settle = self.rng.chance(50);
        let switch = self.live().switch.clone();
        let report = self
            .block_on(switch.close_window(&Caller::Operator, settle))
            .map_err(|e| format!("close window: {}", api(e)))?;
        self.report.windows_closed += 1;
        let plan = report.plan.clone().ok_or("closed window without a plan")?;
        for (i, bank) in self.banks.iter().enumerate() {
            let (sent, received) = plan
                .positions
                .iter()
                .find(|p| p.participant == bank.bic)
                .map_or((0, 0), |p| (p.sent, p.received));
            if (sent, received) != (bank.window_sent, bank.window_received) {
                return Err(format!(
                    "window {} closed with b{i} sent {sent} received {received}; the model has {} and {}",
                    report.window, bank.window_sent, bank.window_received
                ));
            }
        }
        for bank in &mut self.banks {
            bank.window_sent = 0;
            bank.window_received = 0;
        }
        self.trace(format!("close window {} (settle: {settle})", report.window));
        if settle {
            self.apply_settlement(&report)?;
        } else {
            self.closed_unsettled.push(report.window);
        }
        self.pump()
    }

    fn settle_window(&mut self) -> Outcome {
        let Some(window) = self.closed_unsettled.first().copied() else {
            return self.close_window();
        };
        let switch = self.live().switch.clone();
        let report = self
            .block_on(switch.settle_window(&Caller::Operator, window))
            .map_err(|e| format!("settle window {window}: {}", api(e)))?;
        self.closed_unsettled.remove(0);
        self.trace(format!("settle window {window}"));
        self.apply_settlement(&report)?;
        self.pump()
    }

    /// Fund adjustments of a settled window, checked against the model and applied to it.
    fn apply_settlement(&mut self, report: &clearhouse_clearing::report::WindowReport) -> Outcome {
        self.report.windows_settled += 1;
        if !report.breaks.is_empty() || !report.reconciled {
            return Err(format!(
                "window {} settled with breaks: {:?}",
                report.window, report.breaks
            ));
        }
        let plan = report
            .plan
            .as_ref()
            .ok_or("settled window without a plan")?;
        for instruction in &plan.instructions {
            let bank = self
                .banks
                .iter()
                .position(|b| b.bic == instruction.participant)
                .ok_or("instruction for an unknown participant")?;
            if !self.banks[bank].deferred {
                return Err(format!("a fund adjustment for prefunded b{bank}"));
            }
            let carried: u128 = report
                .carried
                .iter()
                .filter(|(p, _, _)| *p == instruction.participant)
                .map(|(_, _, amount)| amount.parse::<u128>().unwrap_or(u128::MAX))
                .sum();
            let moved = instruction
                .net
                .unsigned_abs()
                .checked_sub(carried)
                .ok_or_else(|| format!("b{bank} carried {carried}, more than its net"))?;
            let signed = if instruction.net < 0 {
                moved as i128
            } else {
                -(moved as i128)
            };
            self.banks[bank].balance += signed;
            self.external_total += signed;
        }
        Ok(())
    }

    /// A power loss while the journal writes: armed, then one action that writes; the process
    /// dies with the write lost, torn, or whole but unacknowledged; time passes; it restarts.
    fn power_loss(&mut self) -> Outcome {
        let keep = match self.rng.below(3) {
            0 => 0,
            1 => 1 + self.rng.below(700),
            _ => u64::MAX,
        };
        self.storage.arm_power_loss(keep);
        let pending: Vec<usize> = (0..self.payments.len())
            .filter(|&i| {
                self.payments[i].state == State::Pending && self.payments[i].notes_due == 0
            })
            .collect();
        let target = self.rng.below(10);
        if target < 2 {
            // During a window close (not settled with it).
            let switch = self.live().switch.clone();
            let open = self
                .block_on(switch.windows(&Caller::Operator, 1))
                .map_err(|e| format!("windows: {}", api(e)))?
                .first()
                .map(|r| r.window)
                .ok_or("no open window")?;
            if self
                .block_on(switch.close_window(&Caller::Operator, false))
                .is_ok()
            {
                return Err("a window close was acknowledged though its write failed".into());
            }
            self.trace(format!("power loss during the close of window {open}"));
            self.interrupted_window = Some((open, false));
        } else if target < 4 && !self.closed_unsettled.is_empty() {
            let window = self.closed_unsettled[0];
            let switch = self.live().switch.clone();
            if self
                .block_on(switch.settle_window(&Caller::Operator, window))
                .is_ok()
            {
                return Err("a settlement was acknowledged though its write failed".into());
            }
            self.trace(format!(
                "power loss during the settlement of window {window}"
            ));
            self.interrupted_window = Some((window, true));
        } else if pending.is_empty() {
            let bank = self.rng.below(PREFUNDED as u64) as usize;
            let amount = 1 + u128::from(self.rng.below(AMOUNT_MAX));
            self.liquidity_requests += 1;
            let request = LiquidityRequest {
                request_id: format!("LIQ-{}", self.liquidity_requests),
                currency: CURRENCY.into(),
                amount: format_amount(amount, EXPONENT),
                direction: LiquidityDirection::In,
            };
            let switch = self.live().switch.clone();
            let bic = self.banks[bank].bic.clone();
            if self
                .block_on(switch.liquidity(&bic, request.clone()))
                .is_ok()
            {
                return Err("a liquidity transfer was acknowledged though its write failed".into());
            }
            self.trace(format!("power loss during liquidity b{bank} In {amount}"));
            self.interrupted_liquidity = Some(InterruptedLiquidity {
                bank,
                request,
                amount,
            });
        } else {
            let index = pending[self.rng.below(pending.len() as u64) as usize];
            let decision = if self.rng.chance(80) {
                Decision::Accept
            } else {
                Decision::Reject("AC04".into())
            };
            let p = &self.payments[index];
            let caller = Caller::Participant(self.banks[p.creditor].bic.clone());
            let switch = self.live().switch.clone();
            switch
                .decide(&caller, p.id, decision.clone())
                .map_err(|e| format!("decision on pending p{index}: {}", api(e)))?;
            self.trace(format!("power loss during decision p{index} {decision:?}"));
            self.payments[index].interrupted = Some(decision);
        }
        // Let the switch run until the write fails.
        let storage = self.storage.clone();
        let tripped = self.block_on(async move {
            for _ in 0..3_000 {
                if storage.tripped() {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            false
        });
        if !tripped {
            return Err("the armed write never happened".into());
        }
        let (written, length) = self.storage.written();
        match written {
            0 => self.report.faults.writes_lost += 1,
            w if w < length => self.report.faults.writes_torn += 1,
            _ => self.report.faults.writes_unacknowledged_on_disk += 1,
        }
        self.report.faults.crashes += 1;
        self.crash();
        let down = self.rng.below(DOWNTIME_MAX_MS + 1);
        self.clock.advance(down * 1_000_000);
        self.trace(format!(
            "crash: {} of {} bytes of the write on disk; down for {down} ms",
            if written == length {
                "all".into()
            } else {
                written.to_string()
            },
            length
        ));
        self.start()?;
        // The interrupted liquidity transfer: retried with its request id, applied once.
        if let Some(interrupted) = self.interrupted_liquidity.take() {
            let switch = self.live().switch.clone();
            let bic = self.banks[interrupted.bank].bic.clone();
            self.block_on(switch.liquidity(&bic, interrupted.request))
                .map_err(|e| format!("retried liquidity: {}", api(e)))?;
            self.apply_liquidity(interrupted.bank, interrupted.amount, LiquidityDirection::In);
            self.trace(format!("liquidity b{} retried => done", interrupted.bank));
            self.pump()?;
        }
        // An interrupted close or settlement: done whole (the write survived) or not at all.
        if let Some((window, settling)) = self.interrupted_window.take() {
            self.resolve_interrupted_window(window, settling)?;
        }
        self.verify_vouchers()
    }

    fn resolve_interrupted_window(&mut self, window: u64, settling: bool) -> Outcome {
        let switch = self.live().switch.clone();
        let report = self
            .block_on(switch.window_report(&Caller::Operator, window))
            .map_err(|e| format!("window {window} after restart: {}", api(e)))?;
        use clearhouse_clearing::report::WindowState;
        match (settling, report.state) {
            (false, WindowState::Open) => {
                self.trace(format!("window {window} still open after restart"));
            }
            (false, WindowState::Closed) => {
                // The close survived: its plan must be the model's window, and it is signed.
                if report.checkpoint.is_none() {
                    return Err(format!(
                        "window {window} closed without its checkpoint after restart"
                    ));
                }
                let plan = report.plan.clone().ok_or("closed window without a plan")?;
                for (i, bank) in self.banks.iter().enumerate() {
                    let (sent, received) = plan
                        .positions
                        .iter()
                        .find(|p| p.participant == bank.bic)
                        .map_or((0, 0), |p| (p.sent, p.received));
                    if (sent, received) != (bank.window_sent, bank.window_received) {
                        return Err(format!(
                            "interrupted close of window {window}: b{i} sent {sent} received {received}; the model has {} and {}",
                            bank.window_sent, bank.window_received
                        ));
                    }
                }
                for bank in &mut self.banks {
                    bank.window_sent = 0;
                    bank.window_received = 0;
                }
                self.report.windows_closed += 1;
                self.closed_unsettled.push(window);
                self.trace(format!("window {window} closed by the surviving write"));
            }
            (true, WindowState::Closed) => {
                self.trace(format!("window {window} still closed after restart"));
            }
            (true, WindowState::Settled) => {
                // The settlement survived; settling again reconciles it (idempotent).
                let report = self
                    .block_on(switch.settle_window(&Caller::Operator, window))
                    .map_err(|e| format!("settling window {window} again: {}", api(e)))?;
                self.closed_unsettled.retain(|&w| w != window);
                self.apply_settlement(&report)?;
                self.trace(format!("window {window} settled by the surviving write"));
            }
            (settling, state) => {
                return Err(format!(
                    "window {window} is {state:?} after an interrupted {}",
                    if settling { "settlement" } else { "close" }
                ))
            }
        }
        self.pump()
    }

    /// Ends the run: every deadline passes, every held message is delivered, the window closes
    /// and settles, and every payment answers its final state.
    fn finish(&mut self) -> Outcome {
        self.advance(DEADLINE_MS + 1)?;
        while !self.network.is_empty() {
            let message = self.network.pop_front().expect("not empty");
            match message {
                Message::Forward { payment, answer } => {
                    if let Some(answer) = answer {
                        if answer.send(SimAnswer::Decided(Decision::Accept)).is_ok() {
                            return Err(format!(
                                "p{payment}: the switch still waits after every deadline"
                            ));
                        }
                    }
                }
                Message::Decide { payment, decision } => self.decide(payment, decision)?,
                Message::Notify { .. } => {}
            }
        }
        if let Some(p) = self.payments.iter().position(|p| p.state == State::Pending) {
            return Err(format!("p{p} is not final after every deadline"));
        }
        while !self.closed_unsettled.is_empty() {
            self.settle_window()?;
        }
        let switch = self.live().switch.clone();
        let report = self
            .block_on(switch.close_window(&Caller::Operator, true))
            .map_err(|e| format!("final close: {}", api(e)))?;
        self.report.windows_closed += 1;
        self.apply_settlement(&report)?;
        for bank in &mut self.banks {
            bank.window_sent = 0;
            bank.window_received = 0;
        }
        self.check()?;
        for index in 0..self.payments.len() {
            let p = &self.payments[index];
            let query = StatusQuery {
                payment_id: Some(format!("{:032x}", p.id)),
                instruction_id: None,
                end_to_end_id: None,
                debtor_agent: None,
                uetr: None,
            };
            let view = self
                .block_on(switch.status(&Caller::Operator, query))
                .map_err(|e| format!("final status of p{index}: {}", api(e)))?;
            if State::of_view(&view)? != self.payments[index].state {
                return Err(format!("final status of p{index} disagrees with the model"));
            }
        }
        self.verify_vouchers()?;
        self.trace(format!(
            "end: {} payments, {} settled, balances and chain verified",
            self.report.payments, self.report.settled
        ));
        self.report.steps = self.step - 1;
        self.crash();
        Ok(())
    }

    // ------------------------------------------------------------------ invariants

    /// After every step: the ledger agrees with the model for every participant; no reservation
    /// outlives its deadline; the open window's positions are the model's.
    fn check(&mut self) -> Outcome {
        let switch = self.live().switch.clone();
        let now = self.clock.now_ns();
        for (i, p) in self.payments.iter().enumerate() {
            if p.state == State::Pending && p.deadline_ns <= now {
                return Err(format!("p{i} still reserved after its deadline"));
            }
        }
        let mut ledger_total: i128 = 0;
        for i in 0..BANKS {
            let bic = self.banks[i].bic.clone();
            let positions = self
                .block_on(switch.positions(&bic))
                .map_err(|e| format!("positions of b{i}: {}", api(e)))?;
            let position = positions
                .iter()
                .find(|p| p.currency == CURRENCY)
                .ok_or("no EUR position")?;
            let expected = (
                format_signed(self.banks[i].balance, EXPONENT),
                format_amount(self.reserved(i), EXPONENT),
                format_amount(self.incoming(i), EXPONENT),
                format_amount(self.available(i).max(0) as u128, EXPONENT),
            );
            let actual = (
                position.balance.clone(),
                position.reserved_outgoing.clone(),
                position.pending_incoming.clone(),
                position.available.clone(),
            );
            if actual != expected {
                return Err(format!(
                    "b{i} on the ledger (balance, reserved, incoming, available) = {actual:?}, the model has {expected:?}"
                ));
            }
            let balance = position.balance.trim_start_matches('-');
            let magnitude = clearhouse_switch::money::parse_amount(balance, EXPONENT)
                .map_err(|e| format!("b{i} balance {}: {e}", position.balance))?;
            let magnitude = i128::try_from(magnitude).map_err(|e| e.to_string())?;
            ledger_total += if position.balance.starts_with('-') {
                -magnitude
            } else {
                magnitude
            };
        }
        // Money is conserved: payments only move it between positions.
        if ledger_total != self.external_total {
            return Err(format!(
                "the positions on the ledger sum to {ledger_total}, but {} entered from outside",
                self.external_total
            ));
        }
        let reports = self
            .block_on(switch.windows(&Caller::Operator, 1))
            .map_err(|e| format!("windows: {}", api(e)))?;
        let open = reports.first().ok_or("no open window")?;
        let plan = open.plan.as_ref().ok_or("open window without figures")?;
        for (i, bank) in self.banks.iter().enumerate() {
            let (sent, received) = plan
                .positions
                .iter()
                .find(|p| p.participant == bank.bic)
                .map_or((0, 0), |p| (p.sent, p.received));
            if (sent, received) != (bank.window_sent, bank.window_received) {
                return Err(format!(
                    "open window {}: b{i} sent {sent} received {received}; the model has {} and {}",
                    open.window, bank.window_sent, bank.window_received
                ));
            }
        }
        self.report.checks += 1;
        Ok(())
    }

    /// The voucher chain verifies (hashes and signed checkpoints) and holds every settled payment
    /// exactly once.
    fn verify_vouchers(&mut self) -> Outcome {
        let node = self.live().node.clone();
        let key = clearhouse_switch::clearing::load_or_create_signing_key(&self.data_dir)
            .map_err(|e| format!("checkpoint key: {e}"))?
            .verifying_key();
        let verified = clearhouse_switch::clearing::verify_data_dir(&node, &key, |_| {})
            .map_err(|e| format!("voucher chain: {e}"))?;
        let mut settled = BTreeSet::new();
        let mut from = 0;
        loop {
            let page = node
                .vouchers(from, 4096)
                .map_err(|e| format!("vouchers: {e}"))?;
            let Some(last) = page.last() else { break };
            from = last.seq + 1;
            for voucher in &page {
                if let Ok(VoucherEvent::PaymentSettled { payment, .. }) =
                    VoucherEvent::parse(&voucher.body)
                {
                    if !settled.insert(payment.clone()) {
                        return Err(format!("payment {payment} settled twice in the chain"));
                    }
                }
            }
        }
        let model: BTreeSet<String> = self
            .payments
            .iter()
            .filter(|p| p.state == State::Settled)
            .map(|p| format!("{:032x}", p.id))
            .collect();
        if settled != model {
            let missing: Vec<_> = model.difference(&settled).collect();
            let extra: Vec<_> = settled.difference(&model).collect();
            return Err(format!(
                "the chain's settled payments differ from the model: missing {missing:?}, extra {extra:?}"
            ));
        }
        self.report.vouchers_verified = verified.vouchers;
        self.trace(format!(
            "chain verified: {} vouchers, {} checkpoints, {} settled payments",
            verified.vouchers,
            verified.checkpoints,
            settled.len()
        ));
        Ok(())
    }
}
