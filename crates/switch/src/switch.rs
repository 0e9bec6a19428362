//! The payment switch's core: participants, liquidity, and the payment lifecycle on the durable
//! ledger node.
//!
//! Lifecycle of one payment (ids are derived from the debtor agent and the instruction id, so
//! every step is idempotent):
//! 1. validate; a business rejection is recorded (RJCT + reason) so a resubmission answers the
//!    same;
//! 2. reserve: a pending ledger transfer debtor position -> creditor position with the ledger's
//!    own timeout (the hard timeout), written atomically with the payment record (open);
//! 3. forward to the creditor agent (signed); it accepts or rejects, in its answer or later;
//! 4. accept posts the reservation, reject or the deadline voids it, each written atomically
//!    with the final record (closed); a reservation the ledger already expired is recorded as
//!    rejected AB05;
//! 5. the debtor agent gets the final state in its submit answer when it comes in time, and by
//!    notification otherwise; the creditor agent is always notified.
//!
//! After a restart every open record is picked up again: a live reservation gets its remaining
//! deadline, an expired one is recorded as rejected.

use std::collections::{BTreeMap, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use clearhouse_clearing::report::WindowReport;
use clearhouse_clearing::VoucherEvent;
use clearhouse_engine::{EngineError, Node, RecordPut, SubmitOutcome};

use crate::clearing::Clearing;
use crate::clock::now_ns;
use crate::engine_io::{blocking, engine_submit, submit_then, write_private};

mod admission;
mod dashboard;
mod lsm;
mod observe;
mod participants;
mod recall;
mod returns;
mod settlement;
mod status;
mod windows;

// The API's shapes and error live below the switch (api.rs, error.rs); re-exported here, where
// callers have always found them.
pub use crate::api::*;
pub use crate::error::ApiError;
pub use crate::model::{RecallRecord, RecallState};

use clearhouse_ledger::{
    Account, AccountFlags, CreateAccountResult, CreateTransferResult, PendingStatus, Transfer,
    TransferFlags,
};
pub use dashboard::DashboardView;
use rustc_hash::FxHashMap;
use serde::Serialize;
use tokio::sync::{oneshot, watch};

use crate::auth::{self, AuthError, NonceCache, SignedHeaders};
use crate::config::SwitchConfig;
use crate::model::*;
use crate::money::{self, currency};
use crate::outbound::{Decision, ForwardError, Notification, Outbound};
use crate::stored::{decode, encode, Stored};

/// The voucher of a payment's final state (settled or rejected).
fn payment_voucher(record: &PaymentRecord) -> Vec<u8> {
    let payment = format!("{:032x}", record.id());
    let at_ns = record.finished_at_ns.unwrap_or(record.accepted_at_ns);
    match record.state {
        PaymentState::Settled => VoucherEvent::PaymentSettled {
            payment,
            uetr: record.uetr.clone(),
            end_to_end_id: record.end_to_end_id.clone(),
            debtor_agent: record.debtor_agent.clone(),
            creditor_agent: record.creditor_agent.clone(),
            currency: record.currency.clone(),
            amount: record.amount,
            at_ns,
        },
        PaymentState::Rejected | PaymentState::Reserved => VoucherEvent::PaymentRejected {
            payment,
            uetr: record.uetr.clone(),
            debtor_agent: record.debtor_agent.clone(),
            creditor_agent: record.creditor_agent.clone(),
            currency: record.currency.clone(),
            amount: record.amount,
            reason: record.reason.clone().unwrap_or_default(),
            at_ns,
        },
    }
    .to_bytes()
}

fn operator(caller: &Caller) -> Result<(), ApiError> {
    match caller {
        Caller::Operator => Ok(()),
        Caller::Participant(_) => Err(ApiError::new(
            403,
            "forbidden",
            "operator credentials required",
        )),
    }
}

/// A payment between reservation and its final state.
struct InFlight {
    record: PaymentRecord,
    /// The final record, once there is one.
    done: watch::Sender<Option<PaymentRecord>>,
    /// A later decision of the creditor agent (after it answered 202).
    decision: Mutex<Option<oneshot::Sender<Decision>>>,
    /// The debtor agent is still waiting in its submit request (no notification needed).
    debtor_waiting: AtomicBool,
}

#[derive(Default)]
struct InFlightSet {
    payments: FxHashMap<u128, Arc<InFlight>>,
    /// Instruction alias -> payment key.
    by_instruction: FxHashMap<u128, u128>,
    per_debtor: FxHashMap<String, usize>,
}

/// Recently finished payments, FIFO-bounded, for status answers and duplicate checks without a
/// disk read (it also covers records the index has not written yet).
#[derive(Default)]
struct Recent {
    map: FxHashMap<u128, PaymentRecord>,
    /// Instruction alias -> payment key.
    by_instruction: FxHashMap<u128, u128>,
    /// (journal sequence acknowledged when the record was cached, key), oldest first.
    order: VecDeque<(u64, u128)>,
}

/// Figures for the dashboard, the demo and the benchmark.
#[derive(Default)]
pub struct SwitchStats {
    pub submitted: AtomicU64,
    pub settled: AtomicU64,
    pub rejected: AtomicU64,
    pub rejected_by_reason: Mutex<BTreeMap<String, u64>>,
}

pub struct OperatorKey {
    pub key_id: String,
    pub secret: Vec<u8>,
}

impl OperatorKey {
    /// Reads `operator.key` in the data directory, creating it (mode 0600) on first start.
    pub fn load_or_create(data_dir: &Path) -> std::io::Result<OperatorKey> {
        let path = data_dir.join("operator.key");
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                let mut secret = [0u8; 32];
                getrandom::fill(&mut secret).map_err(|e| std::io::Error::other(e.to_string()))?;
                let text = format!("operator {}\n", hex::encode(secret));
                write_private(&path, text.as_bytes())?;
                text
            }
            Err(error) => return Err(error),
        };
        let mut parts = text.split_whitespace();
        match (parts.next(), parts.next().and_then(|h| hex::decode(h).ok())) {
            (Some(key_id), Some(secret)) if secret.len() >= 16 => Ok(OperatorKey {
                key_id: key_id.to_string(),
                secret,
            }),
            _ => Err(std::io::Error::other(format!(
                "{} must hold \"<key id> <hex secret of 16+ bytes>\"",
                path.display()
            ))),
        }
    }
}

pub struct Switch {
    node: Node,
    pub config: SwitchConfig,
    operator: OperatorKey,
    participants: crate::outbound::Registry,
    keys: RwLock<Arc<FxHashMap<String, String>>>,
    admin: tokio::sync::Mutex<()>,
    nonces: NonceCache,
    in_flight: Mutex<InFlightSet>,
    recent: Mutex<Recent>,
    outbound: Outbound,
    pub stats: SwitchStats,
    pub latency: crate::metrics::PaymentLatency,
    alerted: Mutex<FxHashMap<(String, String), bool>>,
    /// Returns run one at a time (they are rare; it keeps "never more than the payment" simple).
    returns: tokio::sync::Mutex<()>,
    /// Settlement windows, netting, checkpoints.
    pub clearing: Arc<Clearing>,
    /// Liquidity-saving mode: payments queued for liquidity, settled by multilateral offsetting.
    lsm: lsm::Queue,
    /// Deadlines and timestamps: the system clock, or the simulator's.
    clock: crate::clock::Clock,
    /// The exporters following the voucher chain (shown on `/metrics` and the dashboard).
    pub exports: crate::exports::Exports,
    /// The data directory's size and growth, and retention's progress.
    pub storage: crate::storage::Storage,
    /// More Prometheus text for `/metrics` from components beside the switch (the AMQP
    /// gateway), rendered in order.
    pub metrics_extra: std::sync::Mutex<Vec<MetricsRenderer>>,
}

/// Appends Prometheus text.
pub type MetricsRenderer = Arc<dyn Fn(&mut String) + Send + Sync>;

/// What the switch runs against: the system clock and HTTP (production), or the deterministic
/// simulator's clock and network.
#[derive(Clone, Default)]
pub struct Environment {
    pub clock: crate::clock::Clock,
    pub transport: crate::outbound::Transport,
}

/// Attempts of a finalizing write refused by an overloaded engine before giving up (the
/// payment stays open and is picked up again at the next start).
const FINALIZE_ATTEMPTS_MAX: u32 = 200;

impl Switch {
    /// Starts the switch on a running node: loads participants and picks up open payments.
    pub async fn start(
        node: Node,
        config: SwitchConfig,
        data_dir: &Path,
    ) -> Result<Arc<Switch>, ApiError> {
        Self::start_in(node, config, data_dir, Environment::default()).await
    }

    /// [`Switch::start`] in a given environment (the simulator's clock and network).
    pub async fn start_in(
        node: Node,
        config: SwitchConfig,
        data_dir: &Path,
        environment: Environment,
    ) -> Result<Arc<Switch>, ApiError> {
        let operator = OperatorKey::load_or_create(data_dir)
            .map_err(|e| ApiError::new(500, "operator_key", e.to_string()))?;
        let limit = config.in_flight_total_max + config.participants_max + 1;
        let open = {
            let node = node.clone();
            blocking(move || node.open_records(limit)).await?
        };
        let mut participants = BTreeMap::new();
        let mut payments = Vec::new();
        for (key, value) in open {
            match decode(key, &value) {
                Ok(Stored::Participant(p)) => {
                    participants.insert(p.bic.clone(), p);
                }
                Ok(Stored::Payment(p)) => payments.push(*p),
                Ok(Stored::Return(_)) | Ok(Stored::Recall(_)) | Ok(Stored::Archived(_)) => {}
                Err(error) => {
                    return Err(ApiError::new(
                        500,
                        "corrupt_record",
                        format!("record {key:#x} does not parse: {error}"),
                    ))
                }
            }
        }
        let signing_key = crate::clearing::load_or_create_signing_key(data_dir)
            .map_err(|e| ApiError::new(500, "operator_key", e.to_string()))?;
        let clearing = Arc::new(
            Clearing::start(
                node.clone(),
                signing_key,
                &crate::clearing::settlement_models(&participants),
            )
            .await?,
        );
        let registry: crate::outbound::Registry = Arc::new(RwLock::new(Arc::new(BTreeMap::new())));
        let outbound = Outbound::new(
            &config,
            registry.clone(),
            environment.transport,
            environment.clock.clone(),
        );
        let switch = Arc::new(Switch {
            node,
            operator,
            // Serving starts now: nothing signed for an earlier process is accepted.
            nonces: NonceCache::serving_from(
                config.clock_skew_ms,
                config.clock_lead_ms,
                config.nonces_max,
                auth::now_ms(),
            ),
            participants: registry,
            keys: RwLock::new(Arc::new(FxHashMap::default())),
            admin: tokio::sync::Mutex::new(()),
            in_flight: Mutex::new(InFlightSet::default()),
            recent: Mutex::new(Recent::default()),
            outbound,
            stats: SwitchStats::default(),
            latency: crate::metrics::PaymentLatency::default(),
            alerted: Mutex::new(FxHashMap::default()),
            returns: tokio::sync::Mutex::new(()),
            clearing,
            lsm: lsm::Queue::default(),
            clock: environment.clock,
            exports: crate::exports::Exports::default(),
            storage: crate::storage::Storage::new(data_dir),
            metrics_extra: std::sync::Mutex::new(Vec::new()),
            config,
        });
        switch.install_participants(participants);
        tracing::info!(
            participants = switch.participants().len(),
            open_payments = payments.len(),
            "switch started"
        );
        // One ledger lookup for all open payments (in requests of a query's size), not one each.
        let ids: Vec<u128> = payments.iter().map(PaymentRecord::id).collect();
        let mut pending = rustc_hash::FxHashSet::default();
        for chunk in ids.chunks(clearhouse_engine::QUERY_LIMIT_MAX as usize) {
            let node = switch.node.clone();
            let chunk = chunk.to_vec();
            for stored in blocking(move || node.lookup_transfers(chunk)).await? {
                if stored.status == PendingStatus::Pending {
                    pending.insert(stored.transfer.id);
                }
            }
        }
        for record in payments {
            let reserved = pending.contains(&record.id());
            switch.resume(record, reserved);
        }
        let watcher = switch.clone();
        tokio::spawn(async move { watcher.watch_liquidity().await });
        switch.spawn_window_schedule();
        if !switch.config.liquidity_saving_currencies.is_empty() {
            let resolver = switch.clone();
            tokio::spawn(async move { resolver.resolve_gridlocks().await });
        }
        Ok(switch)
    }

    /// The participant a routing number names.
    pub fn bic_of_routing_number(&self, routing_number: &str) -> Option<String> {
        self.participants()
            .values()
            .find(|p| p.routing_number.as_deref() == Some(routing_number))
            .map(|p| p.bic.clone())
    }

    pub fn participants(&self) -> Arc<BTreeMap<String, Participant>> {
        self.participants.read().expect("participants").clone()
    }

    fn install_participants(&self, participants: BTreeMap<String, Participant>) {
        let keys = participants
            .values()
            .map(|p| (p.key_id.clone(), p.bic.clone()))
            .collect();
        *self.participants.write().expect("participants") = Arc::new(participants);
        *self.keys.write().expect("keys") = Arc::new(keys);
    }

    // ---------------------------------------------------------------- authentication

    /// Verifies a signed request and says who sent it.
    pub fn authenticate(
        &self,
        headers: &SignedHeaders<'_>,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> Result<Caller, AuthError> {
        let (caller, secret) = if headers.key_id == self.operator.key_id {
            (Caller::Operator, self.operator.secret.clone())
        } else {
            let keys = self.keys.read().expect("keys").clone();
            let bic = keys.get(headers.key_id).ok_or(AuthError::UnknownKey)?;
            let participants = self.participants();
            let participant = participants.get(bic).ok_or(AuthError::UnknownKey)?;
            let secret = hex::decode(&participant.secret_hex).map_err(|_| AuthError::UnknownKey)?;
            (Caller::Participant(bic.clone()), secret)
        };
        auth::verify(
            headers,
            &secret,
            method,
            path,
            body,
            auth::now_ms(),
            &self.nonces,
        )?;
        Ok(caller)
    }

    // ---------------------------------------------------------------- participants

    // ---------------------------------------------------------------- payments

    fn notify(&self, bic: &str, notification: Notification) {
        if let Some(participant) = self.participants().get(bic) {
            self.outbound.notify(participant, notification);
        }
    }
}

/// An amount in `c`'s minor units from its decimal text; refused with AM12 when malformed or
/// with more decimals than the currency has.
fn amount_in(text: &str, c: money::Currency) -> Result<u128, ApiError> {
    money::parse_amount(text, c.exponent).map_err(|e| ApiError::bad_request(e.to_string(), "AM12"))
}

/// Like [`amount_in`], and zero is refused with AM01.
fn positive_amount_in(text: &str, c: money::Currency) -> Result<u128, ApiError> {
    match amount_in(text, c)? {
        0 => Err(ApiError::bad_request("amount must be positive", "AM01")),
        amount => Ok(amount),
    }
}

fn check_endpoint(endpoint: &str) -> Result<(), ApiError> {
    if endpoint.starts_with("https://") {
        // Refused rather than accepted and never reached: the switch's calls to participants
        // have no TLS client yet (every forward would end AB08, every notification be dropped).
        return Err(ApiError::bad_request(
            "https endpoints are not supported yet: the switch calls participants over plain HTTP; give an http:// endpoint (on a private network, or a TLS-terminating proxy beside the switch)",
            "FF01",
        ));
    }
    if endpoint == crate::model::AMQP_ENDPOINT {
        return Ok(());
    }
    let ok = endpoint.len() <= 200
        && endpoint.starts_with("http://")
        && endpoint.parse::<hyper::Uri>().is_ok();
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad_request(
            "endpoint must be an http:// URL of at most 200 characters, or \"amqp:\" (the participant's queues on the scheme's RabbitMQ broker)",
            "FF01",
        ))
    }
}

/// What a position can still send: posted credits - posted debits - reserved debits.
fn available(account: &Account) -> u128 {
    account
        .credits_posted
        .saturating_sub(account.debits_posted)
        .saturating_sub(account.debits_pending)
}

/// Share of a net debit cap in use, basis points: the cap minus what is left of it (None without
/// a cap).
fn cap_used_bp(net_debit_cap: u128, account: &Account) -> Option<u128> {
    let left = available(account).min(net_debit_cap);
    (net_debit_cap - left)
        .saturating_mul(10_000)
        .checked_div(net_debit_cap)
}

fn position_view(code: &str, terms: &CurrencyTerms, account: &Account) -> PositionView {
    let e = currency(code).map_or(2, |c| c.exponent);
    let balance = account.credits_posted as i128
        - account.debits_posted as i128
        - terms.net_debit_cap as i128;
    let available = available(account);
    PositionView {
        currency: code.to_string(),
        model: terms.model,
        balance: money::format_signed(balance, e),
        reserved_outgoing: money::format_amount(account.debits_pending, e),
        pending_incoming: money::format_amount(account.credits_pending, e),
        net_debit_cap: money::format_amount(terms.net_debit_cap, e),
        available: money::format_amount(available, e),
        liquidity_alert_below: money::format_amount(terms.liquidity_alert_below, e),
        below_alert: available < terms.liquidity_alert_below,
    }
}
