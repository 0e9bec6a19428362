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

use crate::clearing::{submit_then, Clearing};

mod dashboard;
mod lsm;
mod recall;

pub use recall::{RecallNotice, RecallRecord, RecallState};

use clearhouse_ledger::{
    Account, AccountFlags, CreateAccountResult, CreateTransferResult, PendingStatus, Transfer,
    TransferFlags,
};
pub use dashboard::DashboardView;
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, watch};

use crate::auth::{self, AuthError, NonceCache, SignedHeaders};
use crate::config::SwitchConfig;
use crate::model::*;
use crate::money::{self, currency};
use crate::outbound::{Decision, ForwardError, Notification, Outbound};

/// An API error: HTTP status, a stable code, a message, and the ISO reason code where one exists.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ApiError {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
    pub reason: Option<&'static str>,
    pub retry_after_seconds: Option<u64>,
}

impl ApiError {
    pub fn new(status: u16, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            reason: None,
            retry_after_seconds: None,
        }
    }
    pub fn with_reason(mut self, reason: &'static str) -> ApiError {
        self.reason = Some(reason);
        self
    }
    pub fn retry_after(mut self, seconds: u64) -> ApiError {
        self.retry_after_seconds = Some(seconds);
        self
    }
    pub(crate) fn bad_request(message: impl Into<String>, reason: &'static str) -> ApiError {
        ApiError::new(400, "invalid_request", message).with_reason(reason)
    }
    fn not_found(what: &str) -> ApiError {
        ApiError::new(404, "not_found", format!("{what} not found"))
    }
}

impl From<EngineError> for ApiError {
    fn from(error: EngineError) -> ApiError {
        match error {
            EngineError::Overloaded { .. } => {
                ApiError::new(503, "overloaded", error.to_string()).retry_after(1)
            }
            EngineError::DiskFull { .. } => {
                ApiError::new(503, "disk_full", error.to_string()).retry_after(60)
            }
            EngineError::ReadOnly { .. } => {
                ApiError::new(503, "storage_read_only", error.to_string()).retry_after(60)
            }
            other => ApiError::new(500, "engine_failed", other.to_string()),
        }
    }
}

/// Who is calling: a participant (by BIC) or the operator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    Operator,
    Participant(String),
}

/// A payment as submitted in JSON (the ISO 20022 pacs.008 path converts into this).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PaymentRequest {
    pub instruction_id: String,
    pub end_to_end_id: String,
    #[serde(default)]
    pub uetr: Option<String>,
    pub debtor_agent: String,
    pub creditor_agent: String,
    pub amount: String,
    pub currency: String,
    pub debtor: Party,
    pub creditor: Party,
    #[serde(default)]
    pub remittance_information: Option<String>,
    /// The message that carried it (pacs.008 GrpHdr/MsgId), for status reports.
    #[serde(default)]
    pub message_id: Option<String>,
    /// The transaction identification the instruction carried (pacs.008 PmtId/TxId), echoed in
    /// every pacs.002 about it (OrgnlTxId).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transaction_id: Option<String>,
}

/// A payment as the API shows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PaymentView {
    pub payment_id: String,
    pub instruction_id: String,
    pub end_to_end_id: String,
    pub uetr: String,
    pub debtor_agent: String,
    pub creditor_agent: String,
    pub amount: String,
    pub currency: String,
    pub debtor: Party,
    pub creditor: Party,
    pub remittance_information: Option<String>,
    pub message_id: Option<String>,
    /// ISO 20022 transaction status: PDNG, ACSC or RJCT.
    pub status: String,
    pub reason: Option<String>,
    pub accepted_at_ns: u64,
    pub deadline_ns: u64,
    pub finished_at_ns: Option<u64>,
    /// Returned so far with pacs.004 (0 when none).
    pub returned_amount: String,
    /// The instruction's PmtId/TxId, when it carried one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transaction_id: Option<String>,
    /// In notifications of a final state: the same state as a pacs.002.001.10 document.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pacs_002: Option<String>,
}

impl PaymentView {
    pub fn of(record: &PaymentRecord) -> PaymentView {
        let exponent = currency(&record.currency).map_or(2, |c| c.exponent);
        PaymentView {
            payment_id: format!("{:032x}", record.id()),
            instruction_id: record.instruction_id.clone(),
            end_to_end_id: record.end_to_end_id.clone(),
            uetr: record.uetr.clone(),
            debtor_agent: record.debtor_agent.clone(),
            creditor_agent: record.creditor_agent.clone(),
            amount: money::format_amount(record.amount, exponent),
            currency: record.currency.clone(),
            debtor: record.debtor.clone(),
            creditor: record.creditor.clone(),
            remittance_information: record.remittance_information.clone(),
            message_id: record.message_id.clone(),
            status: record.state.iso_status().to_string(),
            reason: record.reason.clone(),
            accepted_at_ns: record.accepted_at_ns,
            deadline_ns: record.deadline_ns,
            finished_at_ns: record.finished_at_ns,
            returned_amount: money::format_amount(record.returned, exponent),
            transaction_id: record.transaction_id.clone(),
            pacs_002: None,
        }
    }
}

/// A return as the API shows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReturnView {
    pub return_key: String,
    pub return_id: String,
    pub payment_id: String,
    pub original_instruction_id: String,
    pub original_end_to_end_id: String,
    pub original_uetr: String,
    pub returning_agent: String,
    pub receiving_agent: String,
    pub amount: String,
    pub currency: String,
    pub reason: String,
    /// Returns settle at once or are refused: always ACSC here.
    pub status: String,
    pub settled_at_ns: u64,
    /// In notifications: the return as a pacs.004.001.09 document.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pacs_004: Option<String>,
}

impl ReturnView {
    pub fn of(r: &ReturnRecord) -> ReturnView {
        let exponent = currency(&r.currency).map_or(2, |c| c.exponent);
        ReturnView {
            return_key: format!("{:032x}", r.key),
            return_id: r.return_id.clone(),
            payment_id: format!("{:032x}", r.original_key),
            original_instruction_id: r.original_instruction_id.clone(),
            original_end_to_end_id: r.original_end_to_end_id.clone(),
            original_uetr: r.original_uetr.clone(),
            returning_agent: r.returning_agent.clone(),
            receiving_agent: r.receiving_agent.clone(),
            amount: money::format_amount(r.amount, exponent),
            currency: r.currency.clone(),
            reason: r.reason.clone(),
            status: "ACSC".into(),
            settled_at_ns: r.settled_at_ns,
            pacs_004: None,
        }
    }

    /// The return as the pacs.004 a participant would have sent for it.
    pub fn pacs004(&self) -> clearhouse_iso20022::Pacs004 {
        clearhouse_iso20022::Pacs004 {
            message_id: format!("CH{:x}", now_ns()),
            creation: clearhouse_iso20022::time::date_time(now_ns()),
            settlement_method: "CLRG".into(),
            return_id: Some(self.return_id.clone()),
            original_message_id: None,
            original_message_name: None,
            original_instruction_id: Some(self.original_instruction_id.clone()),
            original_end_to_end_id: Some(self.original_end_to_end_id.clone()),
            original_transaction_id: None,
            original_uetr: Some(self.original_uetr.clone()),
            returned_amount: self.amount.clone(),
            currency: self.currency.clone(),
            settlement_date: Some(clearhouse_iso20022::time::date(self.settled_at_ns)),
            charge_bearer: Some("SLEV".into()),
            reason: Some(self.reason.clone()),
        }
    }
}

/// A return request (JSON; pacs.004 converts into it): by the original creditor agent.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ReturnRequest {
    pub return_id: String,
    /// Decimal; the whole unreturned amount when absent.
    #[serde(default)]
    pub amount: Option<String>,
    /// ExternalReturnReason1Code, e.g. AC04, MS03, FOCR.
    pub reason: String,
    /// The returned amount's currency (ISO 4217); when given it must be the payment's, else the
    /// return is refused with AM03. A pacs.004 always gives it (RtrdIntrBkSttlmAmt/@Ccy).
    #[serde(default)]
    pub currency: Option<String>,
}

/// What the engine stores for the switch (the JSON value of each record).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Stored {
    Participant(Participant),
    Payment(Box<PaymentRecord>),
    Return(Box<ReturnRecord>),
    Recall(Box<recall::RecallRecord>),
}

fn participant_key(bic: &str) -> u128 {
    id128(&[b"participant", bic.as_bytes()])
}

fn encode(stored: &Stored) -> Vec<u8> {
    serde_json::to_vec(stored).expect("records serialize")
}

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

pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
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

#[derive(Clone, Debug, Serialize)]
pub struct StatsView {
    pub submitted: u64,
    pub settled: u64,
    pub rejected: u64,
    pub in_flight: usize,
    pub rejected_by_reason: BTreeMap<String, u64>,
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

/// Writes a file readable by its owner only, durably (fsync file and directory).
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Onboarding request (operator).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OnboardRequest {
    pub bic: String,
    pub name: String,
    pub endpoint: String,
    pub currencies: BTreeMap<String, TermsRequest>,
    /// Hex HMAC secret to use; generated when absent (and returned once).
    #[serde(default)]
    pub secret_hex: Option<String>,
    /// ABA routing number (required by the FedNow-like profile).
    #[serde(default)]
    pub routing_number: Option<String>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TermsRequest {
    pub model: SettlementModel,
    #[serde(default)]
    pub net_debit_cap: Option<String>,
    #[serde(default)]
    pub per_payment_max: Option<String>,
    #[serde(default)]
    pub liquidity_alert_below: Option<String>,
}

/// Change request (operator): any subset.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ChangeRequest {
    #[serde(default)]
    pub status: Option<ParticipantStatus>,
    #[serde(default)]
    pub endpoint: Option<String>,
    #[serde(default)]
    pub currency: Option<String>,
    #[serde(default)]
    pub net_debit_cap: Option<String>,
    #[serde(default)]
    pub per_payment_max: Option<String>,
    #[serde(default)]
    pub liquidity_alert_below: Option<String>,
    /// Lower a net debit cap below the current exposure anyway: the line is reduced by what is
    /// available now and the participant cannot send until its position recovers.
    #[serde(default)]
    pub allow_below_exposure: bool,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LiquidityRequest {
    pub request_id: String,
    pub currency: String,
    pub amount: String,
    /// "in": funding from the settlement bank; "out": withdrawal to it.
    pub direction: LiquidityDirection,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LiquidityDirection {
    In,
    Out,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PositionView {
    pub currency: String,
    pub model: SettlementModel,
    /// Posted balance excluding the net debit cap line (negative: owes the scheme).
    pub balance: String,
    /// Reserved for outgoing payments in flight.
    pub reserved_outgoing: String,
    /// Incoming payments in flight.
    pub pending_incoming: String,
    pub net_debit_cap: String,
    /// What the participant can send now.
    pub available: String,
    pub liquidity_alert_below: String,
    pub below_alert: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ParticipantView {
    pub bic: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routing_number: Option<String>,
    pub name: String,
    pub endpoint: String,
    pub status: ParticipantStatus,
    pub key_id: String,
    pub currencies: BTreeMap<String, TermsView>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TermsView {
    pub model: SettlementModel,
    pub net_debit_cap: String,
    pub per_payment_max: String,
    pub liquidity_alert_below: String,
}

impl ParticipantView {
    fn of(p: &Participant) -> ParticipantView {
        ParticipantView {
            bic: p.bic.clone(),
            routing_number: p.routing_number.clone(),
            name: p.name.clone(),
            endpoint: p.endpoint.clone(),
            status: p.status,
            key_id: p.key_id.clone(),
            currencies: p
                .currencies
                .iter()
                .map(|(code, t)| {
                    let e = currency(code).map_or(2, |c| c.exponent);
                    (
                        code.clone(),
                        TermsView {
                            model: t.model,
                            net_debit_cap: money::format_amount(t.net_debit_cap, e),
                            per_payment_max: money::format_amount(t.per_payment_max, e),
                            liquidity_alert_below: money::format_amount(t.liquidity_alert_below, e),
                        },
                    )
                })
                .collect(),
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
}

/// What the switch runs against: the system clock and HTTP (production), or the deterministic
/// simulator's clock and network.
#[derive(Clone, Default)]
pub struct Environment {
    pub clock: crate::clock::Clock,
    pub transport: crate::outbound::Transport,
}

/// Submits to the engine and waits without blocking the runtime.
pub(crate) async fn engine_submit(
    node: &Node,
    transfers: Vec<Transfer>,
    records: Vec<RecordPut>,
) -> Result<SubmitOutcome, EngineError> {
    submit_then(node, transfers, records, |_| {}).await
}

/// Runs a blocking engine call (lookups, index reads) off the async threads.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, EngineError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|error| ApiError::new(500, "internal", error.to_string()))?
        .map_err(ApiError::from)
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
            match serde_json::from_slice::<Stored>(&value) {
                Ok(Stored::Participant(p)) => {
                    participants.insert(p.bic.clone(), p);
                }
                Ok(Stored::Payment(p)) => payments.push(*p),
                Ok(Stored::Return(_)) | Ok(Stored::Recall(_)) => {}
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

    pub fn stats_view(&self) -> StatsView {
        StatsView {
            submitted: self.stats.submitted.load(Ordering::Relaxed),
            settled: self.stats.settled.load(Ordering::Relaxed),
            rejected: self.stats.rejected.load(Ordering::Relaxed),
            in_flight: self.in_flight.lock().expect("in flight").payments.len(),
            rejected_by_reason: self.stats.rejected_by_reason.lock().expect("stats").clone(),
        }
    }

    /// The unauthenticated `/metrics`: [`Switch::render_metrics`] plus the open window's figures
    /// per currency. Aggregates only: nothing per participant (liquidity positions are
    /// confidential between a participant and the operator; they are in
    /// [`Switch::render_participant_metrics`], served signed to the operator only).
    pub async fn render_metrics_full(&self) -> String {
        let mut out = self.render_metrics();
        self.render_window_metrics(&mut out);
        out
    }

    /// The operator's metrics (`GET /v1/admin/metrics`, signed): the aggregates of `/metrics`
    /// plus each participant's available liquidity and net debit cap use (the first 1,000
    /// participants).
    pub async fn render_operator_metrics(&self) -> String {
        let mut out = self.render_metrics_full().await;
        self.render_participant_metrics(&mut out).await;
        out
    }

    async fn render_participant_metrics(&self, out: &mut String) {
        use crate::metrics::metric;
        let participants = self.participants();
        let mut keys = Vec::new();
        for p in participants.values().take(1_000) {
            for (code, terms) in &p.currencies {
                keys.push((p.bic.clone(), code.clone(), terms.net_debit_cap));
            }
        }
        let ids: Vec<u128> = keys
            .iter()
            .map(|(b, c, _)| position_account(b, c))
            .collect();
        let node = self.node.clone();
        if let Ok(accounts) = blocking(move || node.lookup_accounts(ids)).await {
            let by_id: FxHashMap<u128, Account> = accounts.into_iter().map(|a| (a.id, a)).collect();
            let mut available_samples = Vec::new();
            let mut used_samples = Vec::new();
            for (bic, code, cap) in &keys {
                let account = by_id
                    .get(&position_account(bic, code))
                    .copied()
                    .unwrap_or_default();
                let labels = format!("participant=\"{bic}\",currency=\"{code}\"");
                let left = available(&account);
                available_samples.push((labels.clone(), left.to_string()));
                if let Some(used_bp) = cap_used_bp(*cap, &account) {
                    // A ratio for Prometheus, written from integer basis points.
                    used_samples.push((
                        labels,
                        format!("{}.{:04}", used_bp / 10_000, used_bp % 10_000),
                    ));
                }
            }
            let available_refs: Vec<(&str, &str)> = available_samples
                .iter()
                .map(|(l, v)| (l.as_str(), v.as_str()))
                .collect();
            metric(
                out,
                "clearhouse_participant_available_minor_units",
                "gauge",
                "Liquidity a participant can send now (minor units): funds plus net debit cap, minus reservations.",
                &available_refs,
            );
            let used_refs: Vec<(&str, &str)> = used_samples
                .iter()
                .map(|(l, v)| (l.as_str(), v.as_str()))
                .collect();
            metric(
                out,
                "clearhouse_participant_net_debit_cap_used_ratio",
                "gauge",
                "Share of a deferred-net participant's net debit cap in use (0 to 1).",
                &used_refs,
            );
        }
    }

    fn render_window_metrics(&self, out: &mut String) {
        use crate::metrics::metric;
        let participants = self.participants();
        let models = crate::clearing::settlement_models(&participants);
        if let Ok(preview) = self.clearing.preview(&models) {
            let figures = preview.plan.map(|p| p.figures).unwrap_or_default();
            let sample = |f: &dyn Fn(&clearhouse_clearing::netting::CurrencyFigures) -> String| {
                figures
                    .iter()
                    .map(|x| (format!("currency=\"{}\"", x.currency), f(x)))
                    .collect::<Vec<_>>()
            };
            for (name, help, values) in [
                (
                    "clearhouse_window_gross_minor_units",
                    "The open window's gross value (sum of payments and returns), minor units.",
                    sample(&|x| x.gross.to_string()),
                ),
                (
                    "clearhouse_window_net_minor_units",
                    "The open window's net value (sum of net debit positions), minor units.",
                    sample(&|x| x.net.to_string()),
                ),
                (
                    "clearhouse_window_transfers",
                    "Payments and returns in the open window.",
                    sample(&|x| x.transfers.to_string()),
                ),
            ] {
                let refs: Vec<(&str, &str)> = values
                    .iter()
                    .map(|(l, v)| (l.as_str(), v.as_str()))
                    .collect();
                metric(out, name, "gauge", help, &refs);
            }
        }
    }

    pub fn render_metrics(&self) -> String {
        use crate::metrics::metric;
        let mut out = String::with_capacity(8192);
        let stats = self.stats_view();
        let node = self.node.metrics();
        metric(
            &mut out,
            "clearhouse_payments_submitted_total",
            "counter",
            "Payments submitted (including duplicates and refusals).",
            &[("", stats.submitted)],
        );
        let mut finals = vec![("state=\"settled\"".to_string(), stats.settled)];
        for (reason, count) in &stats.rejected_by_reason {
            finals.push((format!("state=\"rejected\",reason=\"{reason}\""), *count));
        }
        let finals: Vec<(&str, u64)> = finals.iter().map(|(l, v)| (l.as_str(), *v)).collect();
        metric(
            &mut out,
            "clearhouse_payments_final_total",
            "counter",
            "Payments by final state (and ISO reason when rejected).",
            &finals,
        );
        metric(
            &mut out,
            "clearhouse_payments_in_flight",
            "gauge",
            "Payments reserved and not yet final.",
            &[("", stats.in_flight)],
        );
        metric(
            &mut out,
            "clearhouse_payments_queued",
            "gauge",
            "Payments queued for liquidity (liquidity-saving mode).",
            &[("", self.lsm.len())],
        );
        self.latency.render(&mut out);
        let (window, _) = self.clearing.open_window();
        metric(
            &mut out,
            "clearhouse_window_open",
            "gauge",
            "The settlement window open now.",
            &[("", window)],
        );
        metric(
            &mut out,
            "clearhouse_windows_total",
            "counter",
            "Settlement windows closed and settled since start.",
            &[
                (
                    "event=\"closed\"",
                    self.clearing.windows_closed.load(Ordering::Relaxed),
                ),
                (
                    "event=\"settled\"",
                    self.clearing.windows_settled.load(Ordering::Relaxed),
                ),
            ],
        );
        metric(
            &mut out,
            "clearhouse_reconciliation_breaks_total",
            "counter",
            "Internal reconciliation breaks found since start (any is an alarm).",
            &[("", self.clearing.breaks_total.load(Ordering::Relaxed))],
        );
        metric(
            &mut out,
            "clearhouse_participants",
            "gauge",
            "Participants onboarded.",
            &[("", self.participants().len())],
        );
        metric(
            &mut out,
            "clearhouse_journal_syncs_total",
            "counter",
            "Journal groups made durable (one fdatasync each).",
            &[("", node.syncs)],
        );
        metric(
            &mut out,
            "clearhouse_journal_sync_seconds_total",
            "counter",
            "Time spent in journal fdatasync.",
            &[("", node.sync_seconds_total)],
        );
        metric(
            &mut out,
            "clearhouse_engine_requests_total",
            "counter",
            "Requests executed by the engine.",
            &[("", node.requests)],
        );
        metric(
            &mut out,
            "clearhouse_engine_groups_total",
            "counter",
            "Groups the requests came in (requests / groups = mean group size).",
            &[("", node.groups)],
        );
        metric(
            &mut out,
            "clearhouse_journal_committed_sequence",
            "gauge",
            "Last durable journal record.",
            &[("", node.committed_seq)],
        );
        metric(
            &mut out,
            "clearhouse_index_lag_records",
            "gauge",
            "Journal records not yet in the on-disk index.",
            &[("", node.committed_seq.saturating_sub(node.indexed_seq))],
        );
        metric(
            &mut out,
            "clearhouse_checkpoint_sequence",
            "gauge",
            "Journal record covered by the last durable index checkpoint.",
            &[("", node.checkpoint_seq)],
        );
        metric(
            &mut out,
            "clearhouse_up",
            "gauge",
            "1 while the engine accepts work.",
            &[("", u64::from(!node.stopped))],
        );
        out
    }

    /// Whether the switch can take work (the engine has not stopped).
    /// Ready to serve: the engine runs and signatures made now are accepted (a (re)started node
    /// refuses timestamps earlier than its start plus the allowed clock lead).
    pub fn ready(&self) -> bool {
        !self.node.metrics().stopped && auth::now_ms() >= self.nonces.not_before_ms()
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

    pub async fn onboard(
        &self,
        request: OnboardRequest,
    ) -> Result<(ParticipantView, String), ApiError> {
        let _admin = self.admin.lock().await;
        if !is_bic(&request.bic) {
            return Err(ApiError::bad_request(
                "bic must be a BIC (8 or 11 characters)",
                "RC01",
            ));
        }
        if request.name.is_empty() || request.name.len() > 140 {
            return Err(ApiError::bad_request(
                "name must be 1 to 140 characters",
                "FF01",
            ));
        }
        check_endpoint(&request.endpoint)?;
        match &request.routing_number {
            Some(rtn) if !crate::profile::is_routing_number(rtn) => {
                return Err(ApiError::bad_request(
                    "routing_number must be 9 digits with a valid ABA check digit",
                    "RC01",
                ))
            }
            Some(rtn) if self.bic_of_routing_number(rtn).is_some() => {
                return Err(ApiError::new(
                    409,
                    "routing_number_taken",
                    format!("routing number {rtn} belongs to another participant"),
                ))
            }
            None if self.config.scheme_profile.uses_routing_numbers() => {
                return Err(ApiError::bad_request(
                    "this scheme identifies participants by routing_number",
                    "RC01",
                ))
            }
            _ => {}
        }
        if let Some(only) = self.config.scheme_profile.currency() {
            if request.currencies.keys().any(|code| code != only) {
                return Err(ApiError::bad_request(
                    format!("this scheme clears {only} only"),
                    "AM03",
                ));
            }
        }
        if self.participants().contains_key(&request.bic) {
            return Err(ApiError::new(
                409,
                "participant_exists",
                format!("{} is already onboarded", request.bic),
            ));
        }
        if self.participants().len() >= self.config.participants_max {
            return Err(ApiError::new(
                409,
                "participants_limit",
                "participants_max reached",
            ));
        }
        if request.currencies.is_empty() || request.currencies.len() > 16 {
            return Err(ApiError::bad_request("1 to 16 currencies", "FF01"));
        }
        let secret_hex = match request.secret_hex {
            Some(secret) => {
                if hex::decode(&secret).map_or(true, |s| s.len() < 16) {
                    return Err(ApiError::bad_request(
                        "secret_hex must be hex of 16 bytes or more",
                        "FF01",
                    ));
                }
                secret
            }
            None => {
                let mut secret = [0u8; 32];
                getrandom::fill(&mut secret).expect("operating system randomness");
                hex::encode(secret)
            }
        };
        let mut currencies = BTreeMap::new();
        let mut accounts = Vec::new();
        let mut lines = Vec::new();
        for (code, terms) in &request.currencies {
            let c = currency(code).ok_or_else(|| {
                ApiError::bad_request(format!("currency {code:?} is not supported"), "AM03")
            })?;
            let parse = |v: &Option<String>| v.as_deref().map_or(Ok(0), |t| amount_in(t, c));
            let net_debit_cap = parse(&terms.net_debit_cap)?;
            if terms.model == SettlementModel::Prefunded && net_debit_cap != 0 {
                return Err(ApiError::bad_request(
                    "a prefunded participant has no net debit cap",
                    "FF01",
                ));
            }
            currencies.insert(
                code.clone(),
                CurrencyTerms {
                    model: terms.model,
                    net_debit_cap,
                    per_payment_max: parse(&terms.per_payment_max)?,
                    liquidity_alert_below: parse(&terms.liquidity_alert_below)?,
                },
            );
            let account = |id, code, flags| Account {
                id,
                ledger: c.numeric,
                code,
                flags,
                ..Account::default()
            };
            accounts.push(account(
                position_account(&request.bic, code),
                ACCOUNT_CODE_POSITION,
                AccountFlags::DEBITS_MUST_NOT_EXCEED_CREDITS.with(AccountFlags::HISTORY),
            ));
            accounts.push(account(
                settlement_account(code),
                ACCOUNT_CODE_SETTLEMENT_BANK,
                AccountFlags::NONE,
            ));
            accounts.push(account(
                ndc_account(code),
                ACCOUNT_CODE_NDC_LINES,
                AccountFlags::NONE,
            ));
            if net_debit_cap > 0 {
                lines.push(Transfer {
                    id: id128(&[
                        b"ndc-line",
                        request.bic.as_bytes(),
                        code.as_bytes(),
                        b"onboard",
                    ]),
                    debit_account_id: ndc_account(code),
                    credit_account_id: position_account(&request.bic, code),
                    amount: net_debit_cap,
                    ledger: c.numeric,
                    code: TRANSFER_CODE_NDC_LINE,
                    ..Transfer::default()
                });
            }
        }
        let results = {
            let node = self.node.clone();
            blocking(move || node.create_accounts(accounts)).await?
        };
        if let Some(bad) = results
            .iter()
            .find(|r| !matches!(r, CreateAccountResult::Ok | CreateAccountResult::Exists))
        {
            return Err(ApiError::new(
                500,
                "ledger_refused",
                format!("creating accounts: {bad:?}"),
            ));
        }
        let participant = Participant {
            key_id: format!("{}-1", request.bic),
            bic: request.bic.clone(),
            name: request.name,
            endpoint: request.endpoint.trim_end_matches('/').to_string(),
            status: ParticipantStatus::Active,
            secret_hex: secret_hex.clone(),
            currencies,
            routing_number: request.routing_number.clone(),
        };
        // The net debit cap lines and the participant record are written together.
        let record = RecordPut {
            key: participant_key(&participant.bic),
            value: encode(&Stored::Participant(participant.clone())),
            open: true,
            aliases: vec![],
            when_transfer_ok: None,
            voucher: None,
        };
        let outcome = engine_submit(&self.node, lines, vec![record]).await?;
        if let Some(bad) = outcome
            .results
            .iter()
            .find(|r| !matches!(r, CreateTransferResult::Ok | CreateTransferResult::Exists))
        {
            return Err(ApiError::new(
                500,
                "ledger_refused",
                format!("net debit cap line: {bad:?}"),
            ));
        }
        let mut all = (*self.participants()).clone();
        all.insert(participant.bic.clone(), participant.clone());
        self.install_participants(all);
        tracing::info!(bic = %participant.bic, "participant onboarded");
        Ok((ParticipantView::of(&participant), secret_hex))
    }

    pub fn participant_view(&self, bic: &str) -> Result<ParticipantView, ApiError> {
        self.participants()
            .get(bic)
            .map(ParticipantView::of)
            .ok_or_else(|| ApiError::not_found("participant"))
    }

    pub async fn change(
        &self,
        bic: &str,
        change: ChangeRequest,
    ) -> Result<ParticipantView, ApiError> {
        let _admin = self.admin.lock().await;
        let mut participant = self
            .participants()
            .get(bic)
            .cloned()
            .ok_or_else(|| ApiError::not_found("participant"))?;
        if let Some(status) = change.status {
            participant.status = status;
        }
        if let Some(endpoint) = &change.endpoint {
            check_endpoint(endpoint)?;
            participant.endpoint = endpoint.trim_end_matches('/').to_string();
        }
        let mut transfers = Vec::new();
        let mut note = None;
        if change.net_debit_cap.is_some()
            || change.per_payment_max.is_some()
            || change.liquidity_alert_below.is_some()
        {
            let code = change.currency.clone().ok_or_else(|| {
                ApiError::bad_request("currency is required to change limits", "FF01")
            })?;
            let c =
                currency(&code).ok_or_else(|| ApiError::bad_request("unknown currency", "AM03"))?;
            let terms = participant.currencies.get_mut(&code).ok_or_else(|| {
                ApiError::bad_request(format!("{code} is not enabled for {bic}"), "AM03")
            })?;
            let parse = |t: &str| amount_in(t, c);
            if let Some(v) = &change.per_payment_max {
                terms.per_payment_max = parse(v)?;
            }
            if let Some(v) = &change.liquidity_alert_below {
                terms.liquidity_alert_below = parse(v)?;
            }
            if let Some(v) = &change.net_debit_cap {
                let new_cap = parse(v)?;
                if terms.model != SettlementModel::DeferredNet {
                    return Err(ApiError::bad_request(
                        "only a deferred-net participant has a net debit cap",
                        "FF01",
                    ));
                }
                let position = position_account(bic, &code);
                let account = {
                    let node = self.node.clone();
                    blocking(move || node.lookup_accounts(vec![position])).await?
                };
                let account = account
                    .first()
                    .copied()
                    .ok_or_else(|| ApiError::new(500, "ledger", "position account missing"))?;
                let available = available(&account);
                let mut id_nonce = [0u8; 16];
                getrandom::fill(&mut id_nonce).expect("randomness");
                let id = id128(&[b"ndc-line", bic.as_bytes(), code.as_bytes(), &id_nonce]);
                if new_cap >= terms.net_debit_cap {
                    transfers.push(Transfer {
                        id,
                        debit_account_id: ndc_account(&code),
                        credit_account_id: position,
                        amount: new_cap - terms.net_debit_cap,
                        ledger: c.numeric,
                        code: TRANSFER_CODE_NDC_LINE,
                        ..Transfer::default()
                    });
                    terms.net_debit_cap = new_cap;
                } else {
                    let reduction = terms.net_debit_cap - new_cap;
                    if reduction > available && !change.allow_below_exposure {
                        return Err(ApiError::new(
                            409,
                            "cap_below_exposure",
                            format!(
                                "lowering the net debit cap by {} needs that much available liquidity, {} is available; set allow_below_exposure to lower it as far as possible now",
                                money::format_amount(reduction, c.exponent),
                                money::format_amount(available, c.exponent)
                            ),
                        )
                        .with_reason("AM23"));
                    }
                    let applied = reduction.min(available);
                    if applied < reduction {
                        note = Some(format!(
                            "net debit cap lowered by {} of {}: exposure holds the rest",
                            money::format_amount(applied, c.exponent),
                            money::format_amount(reduction, c.exponent)
                        ));
                    }
                    if applied > 0 {
                        transfers.push(Transfer {
                            id,
                            debit_account_id: position,
                            credit_account_id: ndc_account(&code),
                            amount: applied,
                            ledger: c.numeric,
                            code: TRANSFER_CODE_NDC_LINE,
                            ..Transfer::default()
                        });
                    }
                    terms.net_debit_cap -= applied;
                }
            }
        }
        let record = RecordPut {
            key: participant_key(bic),
            value: encode(&Stored::Participant(participant.clone())),
            open: true,
            aliases: vec![],
            when_transfer_ok: (!transfers.is_empty()).then_some(0),
            voucher: None,
        };
        let outcome = engine_submit(&self.node, transfers, vec![record]).await?;
        if let Some(result) = outcome.results.first() {
            if *result != CreateTransferResult::Ok {
                return Err(ApiError::new(
                    409,
                    "ledger_refused",
                    format!("changing the net debit cap: {result:?} (exposure changed meanwhile); nothing changed"),
                )
                .with_reason("AM23"));
            }
        }
        if let Some(note) = note {
            tracing::warn!(
                bic,
                note,
                "net debit cap lowered below exposure by operator override"
            );
        }
        let mut all = (*self.participants()).clone();
        all.insert(bic.to_string(), participant.clone());
        self.install_participants(all);
        Ok(ParticipantView::of(&participant))
    }

    pub async fn liquidity(
        &self,
        bic: &str,
        request: LiquidityRequest,
    ) -> Result<PositionView, ApiError> {
        let participant = self
            .participants()
            .get(bic)
            .cloned()
            .ok_or_else(|| ApiError::not_found("participant"))?;
        if !is_max35(&request.request_id) {
            return Err(ApiError::bad_request(
                "request_id must be 1 to 35 characters",
                "FF01",
            ));
        }
        let c = currency(&request.currency)
            .filter(|c| participant.currencies.contains_key(c.code))
            .ok_or_else(|| {
                ApiError::bad_request(
                    format!("{} is not enabled for {bic}", request.currency),
                    "AM03",
                )
            })?;
        let amount = positive_amount_in(&request.amount, c)?;
        let position = position_account(bic, c.code);
        let settlement = settlement_account(c.code);
        let (debit, credit, code) = match request.direction {
            LiquidityDirection::In => (settlement, position, TRANSFER_CODE_LIQUIDITY_IN),
            LiquidityDirection::Out => (position, settlement, TRANSFER_CODE_LIQUIDITY_OUT),
        };
        let transfer = Transfer {
            id: liquidity_transfer_id(bic, &request.request_id),
            debit_account_id: debit,
            credit_account_id: credit,
            amount,
            ledger: c.numeric,
            code,
            ..Transfer::default()
        };
        let voucher = VoucherEvent::Liquidity {
            transfer: format!("{:032x}", transfer.id),
            participant: bic.to_string(),
            currency: c.code.to_string(),
            direction: match request.direction {
                LiquidityDirection::In => "in",
                LiquidityDirection::Out => "out",
            }
            .to_string(),
            amount,
            at_ns: self.clock.now_ns(),
        };
        let record = RecordPut {
            key: transfer.id,
            value: voucher.to_bytes(),
            when_transfer_ok: Some(0),
            voucher: Some(voucher.to_bytes()),
            ..RecordPut::default()
        };
        let outcome = engine_submit(&self.node, vec![transfer], vec![record]).await?;
        match outcome.results[0] {
            CreateTransferResult::Ok | CreateTransferResult::Exists => {}
            CreateTransferResult::ExceedsCredits => {
                return Err(ApiError::new(
                    409,
                    "insufficient_liquidity",
                    "withdrawal exceeds available liquidity; nothing changed",
                )
                .with_reason("AM04"))
            }
            r if r.name().starts_with("ExistsWithDifferent") => {
                return Err(ApiError::new(
                    409,
                    "request_id_reused",
                    format!("request_id was used for a different liquidity transfer ({r:?})"),
                )
                .with_reason("DUPL"))
            }
            other => return Err(ApiError::new(500, "ledger_refused", format!("{other:?}"))),
        }
        tracing::info!(bic, currency = c.code, direction = ?request.direction, "liquidity transfer");
        self.lsm.wake.notify_one();
        self.positions(bic)
            .await?
            .into_iter()
            .find(|p| p.currency == c.code)
            .ok_or_else(|| ApiError::not_found("position"))
    }

    pub async fn positions(&self, bic: &str) -> Result<Vec<PositionView>, ApiError> {
        let participant = self
            .participants()
            .get(bic)
            .cloned()
            .ok_or_else(|| ApiError::not_found("participant"))?;
        let ids: Vec<u128> = participant
            .currencies
            .keys()
            .map(|code| position_account(bic, code))
            .collect();
        let accounts = {
            let node = self.node.clone();
            blocking(move || node.lookup_accounts(ids)).await?
        };
        Ok(participant
            .currencies
            .iter()
            .zip(accounts)
            .map(|((code, terms), account)| position_view(code, terms, &account))
            .collect())
    }

    /// Every second: positions below their alert threshold raise one alert per crossing
    /// (log + notification to the participant).
    async fn watch_liquidity(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let participants = self.participants();
            let mut ids = Vec::new();
            let mut keys = Vec::new();
            for p in participants.values() {
                for (code, terms) in &p.currencies {
                    if terms.liquidity_alert_below > 0 {
                        ids.push(position_account(&p.bic, code));
                        keys.push((p.bic.clone(), code.clone()));
                    }
                }
            }
            if ids.is_empty() {
                continue;
            }
            let node = self.node.clone();
            let Ok(Ok(accounts)) =
                tokio::task::spawn_blocking(move || node.lookup_accounts(ids)).await
            else {
                continue;
            };
            for ((bic, code), account) in keys.into_iter().zip(accounts) {
                let terms = &participants[&bic].currencies[&code];
                let below = available(&account) < terms.liquidity_alert_below;
                let mut alerted = self.alerted.lock().expect("alerted");
                let was = alerted
                    .insert((bic.clone(), code.clone()), below)
                    .unwrap_or(false);
                drop(alerted);
                if below && !was {
                    let view = position_view(&code, terms, &account);
                    tracing::warn!(
                        bic,
                        currency = code,
                        available = view.available,
                        threshold = view.liquidity_alert_below,
                        "liquidity below alert threshold"
                    );
                    self.notify(&bic, Notification::LiquidityAlert(view));
                }
            }
        }
    }

    // ---------------------------------------------------------------- payments

    /// Submits a payment and waits (up to `sync_wait_ms`) for its final state.
    pub async fn submit(
        self: &Arc<Self>,
        caller: &Caller,
        request: PaymentRequest,
    ) -> Result<(bool, PaymentView), ApiError> {
        let uetr_given = request.uetr.is_some();
        let record = self.admit(caller, request)?;
        let id = record.id();
        self.stats.submitted.fetch_add(1, Ordering::Relaxed);
        // Duplicates: in flight, recently finished, or on disk.
        if let Some(existing) = self.find_instruction(record.instruction_alias()).await? {
            return self.answer_duplicate(existing, &record, uetr_given).await;
        }
        // A UETR the switch generated is fresh; one the participant chose may be reused.
        // (An index read of microseconds: done in place, not on the blocking pool.)
        let uetr_owner = match uetr_given {
            true => self.node.resolve_alias_now(uetr_alias(&record.uetr))?,
            false => None,
        };
        if uetr_owner.is_some_and(|owner| owner != id) {
            return Err(ApiError::new(
                409,
                "duplicate_uetr",
                "this UETR belongs to another payment",
            )
            .with_reason("DUPL"));
        }
        // Claim the instruction (a concurrent identical submit waits for this one) within the
        // limits. A rejection below is cached before the claim is released, so a duplicate
        // always finds the payment somewhere: in flight, in the recent cache, or in the index.
        let (entry, receiver) = match self.claim(&record)? {
            Ok(claimed) => claimed,
            Err(existing) => return self.answer_duplicate(existing, &record, uetr_given).await,
        };
        if let Some(reason) = self.business_check(&record) {
            let debtor = record.debtor_agent.clone();
            let answer = self.reject_before_reservation(record, reason, &entry).await;
            self.release(id, &debtor);
            return answer;
        }
        // Reserve: the pending transfer and the open record, atomically.
        let transfer = self.reservation(&record);
        let put = RecordPut {
            key: id,
            value: encode(&Stored::Payment(Box::new(record.clone()))),
            open: true,
            aliases: vec![
                record.instruction_alias(),
                end_to_end_alias(&record.debtor_agent, &record.end_to_end_id),
                uetr_alias(&record.uetr),
            ],
            when_transfer_ok: Some(0),
            voucher: None,
        };
        let reserving = std::time::Instant::now();
        let outcome = match engine_submit(&self.node, vec![transfer], vec![put]).await {
            Ok(outcome) => {
                self.latency.reserve.observe(reserving.elapsed());
                outcome
            }
            Err(error) => {
                self.release(id, &record.debtor_agent);
                return Err(error.into());
            }
        };
        match outcome.results[0] {
            CreateTransferResult::Ok => {}
            CreateTransferResult::ExceedsCredits
                if self
                    .config
                    .liquidity_saving_currencies
                    .contains(&record.currency) =>
            {
                return self.queue_payment(record, entry, receiver).await;
            }
            CreateTransferResult::ExceedsCredits => {
                let reason = match self
                    .terms_of(&record.debtor_agent, &record.currency)
                    .map(|t| t.model)
                {
                    Some(SettlementModel::DeferredNet) => "AM23",
                    _ => "AM04",
                };
                let debtor = record.debtor_agent.clone();
                let answer = self.reject_before_reservation(record, reason, &entry).await;
                self.release(id, &debtor);
                return answer;
            }
            other => {
                // Exists*: the id was reserved before (the record is on disk); anything else is
                // a ledger refusal of a payment that passed validation.
                self.release(id, &record.debtor_agent);
                if let Some(existing) = self.find(id).await? {
                    return self.answer_duplicate(existing, &record, uetr_given).await;
                }
                tracing::error!(payment = %format!("{id:032x}"), result = ?other, "ledger refused a validated reservation");
                return Err(ApiError::new(500, "ledger_refused", format!("{other:?}")));
            }
        }
        let driver = self.clone();
        let driven = entry.clone();
        tokio::spawn(async move { driver.drive(driven).await });
        self.wait_final(entry, receiver).await
    }

    /// Registers a payment as in flight within the limits, or returns the one already there.
    #[allow(clippy::type_complexity)]
    fn claim(
        &self,
        record: &PaymentRecord,
    ) -> Result<
        Result<(Arc<InFlight>, watch::Receiver<Option<PaymentRecord>>), PaymentRecord>,
        ApiError,
    > {
        let mut set = self.in_flight.lock().expect("in flight");
        if let Some(key) = set.by_instruction.get(&record.instruction_alias()) {
            return Ok(Err(set.payments[key].record.clone()));
        }
        if set.payments.len() >= self.config.in_flight_total_max {
            return Err(
                ApiError::new(503, "switch_busy", "too many payments in flight").retry_after(1),
            );
        }
        let count = set
            .per_debtor
            .entry(record.debtor_agent.clone())
            .or_default();
        if *count >= self.config.in_flight_per_participant_max {
            return Err(ApiError::new(
                429,
                "too_many_in_flight",
                format!(
                    "{} payments of this participant are in flight (limit)",
                    self.config.in_flight_per_participant_max
                ),
            )
            .retry_after(1));
        }
        *count += 1;
        let (done, receiver) = watch::channel(None);
        let entry = Arc::new(InFlight {
            record: record.clone(),
            done,
            decision: Mutex::new(None),
            debtor_waiting: AtomicBool::new(true),
        });
        set.payments.insert(record.id(), entry.clone());
        set.by_instruction
            .insert(record.instruction_alias(), record.id());
        Ok(Ok((entry, receiver)))
    }

    async fn wait_final(
        &self,
        entry: Arc<InFlight>,
        mut receiver: watch::Receiver<Option<PaymentRecord>>,
    ) -> Result<(bool, PaymentView), ApiError> {
        let wait = Duration::from_millis(self.config.sync_wait_ms);
        let finished = matches!(
            tokio::time::timeout(wait, receiver.wait_for(|v| v.is_some())).await,
            Ok(Ok(_))
        );
        let current = receiver.borrow().clone();
        match (finished, current) {
            (true, Some(final_record)) => Ok((true, PaymentView::of(&final_record))),
            _ => {
                entry.debtor_waiting.store(false, Ordering::SeqCst);
                // It may have finished in between: then the notification path has it too.
                let current = receiver.borrow().clone();
                Ok(match current {
                    Some(final_record) => (true, PaymentView::of(&final_record)),
                    None => (false, PaymentView::of(&entry.record)),
                })
            }
        }
    }

    async fn answer_duplicate(
        &self,
        existing: PaymentRecord,
        submitted: &PaymentRecord,
        uetr_given: bool,
    ) -> Result<(bool, PaymentView), ApiError> {
        if !existing.same_instruction(submitted, uetr_given) {
            return Err(ApiError::new(
                409,
                "duplicate_instruction",
                "this instruction id was used for a different payment",
            )
            .with_reason("DUPL"));
        }
        let entry = self
            .in_flight
            .lock()
            .expect("in flight")
            .payments
            .get(&existing.id())
            .cloned();
        match entry {
            Some(entry) => {
                let receiver = entry.done.subscribe();
                self.wait_final(entry, receiver).await
            }
            None => Ok((
                existing.state != PaymentState::Reserved,
                PaymentView::of(&existing),
            )),
        }
    }

    /// Syntax and authorization: a 4xx here records nothing.
    fn admit(&self, caller: &Caller, r: PaymentRequest) -> Result<PaymentRecord, ApiError> {
        if *caller != Caller::Participant(r.debtor_agent.clone()) {
            return Err(ApiError::new(
                403,
                "forbidden",
                "a participant can only submit payments as debtor agent itself",
            ));
        }
        for (field, value) in [
            ("instruction_id", &r.instruction_id),
            ("end_to_end_id", &r.end_to_end_id),
        ] {
            if !is_max35(value) {
                return Err(ApiError::bad_request(
                    format!("{field} must be 1 to 35 printable characters"),
                    "FF01",
                ));
            }
        }
        if !is_bic(&r.creditor_agent) {
            return Err(ApiError::bad_request(
                "creditor_agent must be a BIC",
                "RC01",
            ));
        }
        for (field, party) in [("debtor", &r.debtor), ("creditor", &r.creditor)] {
            if party.name.is_empty()
                || party.name.len() > 140
                || party.account.is_empty()
                || party.account.len() > 34
            {
                return Err(ApiError::bad_request(
                    format!("{field}: name 1-140 and account 1-34 characters"),
                    if field == "debtor" { "RR01" } else { "AC03" },
                ));
            }
        }
        if let Err((reason, message)) = self.config.scheme_profile.check_payment(&r) {
            return Err(ApiError::bad_request(message, reason));
        }
        if r.message_id.as_ref().is_some_and(|m| !is_max35(m)) {
            return Err(ApiError::bad_request(
                "message_id must be 1 to 35 printable characters",
                "FF01",
            ));
        }
        if r.remittance_information
            .as_ref()
            .is_some_and(|t| t.len() > 140)
        {
            return Err(ApiError::bad_request(
                "remittance_information: at most 140 characters",
                "FF01",
            ));
        }
        let uetr = match r.uetr {
            Some(u) if is_uetr(&u) => u,
            Some(_) => {
                return Err(ApiError::bad_request(
                    "uetr must be a lowercase UUID v4",
                    "FF01",
                ))
            }
            None => new_uetr(),
        };
        let c = currency(&r.currency).ok_or_else(|| {
            ApiError::bad_request(
                format!("currency {:?} is not supported", r.currency),
                "AM03",
            )
        })?;
        let amount = positive_amount_in(&r.amount, c)?;
        let now = self.clock.now_ns();
        Ok(PaymentRecord {
            key: payment_key(now, &r.debtor_agent, &r.instruction_id),
            instruction_id: r.instruction_id,
            end_to_end_id: r.end_to_end_id,
            uetr,
            debtor_agent: r.debtor_agent,
            creditor_agent: r.creditor_agent,
            currency: c.code.to_string(),
            amount,
            debtor: r.debtor,
            creditor: r.creditor,
            remittance_information: r.remittance_information,
            message_id: r.message_id,
            transaction_id: r.transaction_id,
            state: PaymentState::Reserved,
            reason: None,
            accepted_at_ns: now,
            deadline_ns: now + self.config.settle_deadline_ms * 1_000_000,
            finished_at_ns: None,
            returned: 0,
            queued: false,
        })
    }

    fn terms_of(&self, bic: &str, code: &str) -> Option<CurrencyTerms> {
        self.participants().get(bic)?.currencies.get(code).cloned()
    }

    /// Business rules: a reason code here is recorded as a rejection.
    fn business_check(&self, record: &PaymentRecord) -> Option<&'static str> {
        let participants = self.participants();
        let debtor = participants.get(&record.debtor_agent)?;
        let Some(creditor) = participants.get(&record.creditor_agent) else {
            return Some("CNOR");
        };
        if record.creditor_agent == record.debtor_agent {
            return Some("AG03");
        }
        if debtor.status != ParticipantStatus::Active
            || creditor.status != ParticipantStatus::Active
        {
            return Some("AG01");
        }
        let Some(terms) = debtor.currencies.get(&record.currency) else {
            return Some("AM03");
        };
        if !creditor.currencies.contains_key(&record.currency) {
            return Some("AM03");
        }
        if terms.per_payment_max > 0 && record.amount > terms.per_payment_max {
            return Some("AM02");
        }
        None
    }

    fn reservation(&self, record: &PaymentRecord) -> Transfer {
        let c = currency(&record.currency).expect("validated");
        Transfer {
            id: record.id(),
            debit_account_id: position_account(&record.debtor_agent, &record.currency),
            credit_account_id: position_account(&record.creditor_agent, &record.currency),
            amount: record.amount,
            user_data_128: u128::from_str_radix(&record.uetr.replace('-', ""), 16).unwrap_or(0),
            timeout: self.config.hard_timeout_seconds(),
            ledger: c.numeric,
            code: TRANSFER_CODE_PAYMENT,
            flags: TransferFlags::PENDING,
            ..Transfer::default()
        }
    }

    async fn reject_before_reservation(
        &self,
        mut record: PaymentRecord,
        reason: &'static str,
        entry: &InFlight,
    ) -> Result<(bool, PaymentView), ApiError> {
        record.state = PaymentState::Rejected;
        record.reason = Some(reason.to_string());
        record.finished_at_ns = Some(self.clock.now_ns());
        let put = RecordPut {
            key: record.id(),
            value: encode(&Stored::Payment(Box::new(record.clone()))),
            open: false,
            aliases: vec![
                record.instruction_alias(),
                end_to_end_alias(&record.debtor_agent, &record.end_to_end_id),
                uetr_alias(&record.uetr),
            ],
            when_transfer_ok: None,
            voucher: Some(payment_voucher(&record)),
        };
        engine_submit(&self.node, vec![], vec![put]).await?;
        self.finished(&record);
        // Concurrent duplicates of this instruction wait on it.
        let _ = entry.done.send(Some(record.clone()));
        tracing::info!(payment = %format!("{:032x}", record.id()), reason, "payment rejected");
        Ok((true, PaymentView::of(&record)))
    }

    fn release(&self, id: u128, debtor: &str) {
        let mut set = self.in_flight.lock().expect("in flight");
        if let Some(entry) = set.payments.remove(&id) {
            set.by_instruction.remove(&entry.record.instruction_alias());
            if let Some(count) = set.per_debtor.get_mut(debtor) {
                *count -= 1;
            }
        }
    }

    /// Counts and caches a final record.
    fn finished(&self, record: &PaymentRecord) {
        match record.state {
            PaymentState::Settled => {
                self.stats.settled.fetch_add(1, Ordering::Relaxed);
            }
            PaymentState::Rejected => {
                self.stats.rejected.fetch_add(1, Ordering::Relaxed);
                *self
                    .stats
                    .rejected_by_reason
                    .lock()
                    .expect("stats")
                    .entry(record.reason.clone().unwrap_or_default())
                    .or_default() += 1;
            }
            PaymentState::Reserved => unreachable!("only final records are finished"),
        }
        // The record is durable (acknowledged), so the journal has reached at least this sequence;
        // once the index has too, the index answers for it and the cache may let it go.
        let acknowledged = self.node.committed_seq();
        let indexed = self.node.indexed_seq();
        let mut recent = self.recent.lock().expect("recent");
        recent.map.insert(record.id(), record.clone());
        recent
            .by_instruction
            .insert(record.instruction_alias(), record.id());
        recent.order.push_back((acknowledged, record.id()));
        // Over the limit, evict only what the index already holds (duplicate checks read the
        // index without waiting for it); if the index lags, the cache grows until it catches up
        // (the engine's unindexed-transfers limit bounds that lag).
        while recent.order.len() > self.config.recent_payments_max {
            let &(seq, id) = recent.order.front().expect("non-empty");
            if seq > indexed {
                break;
            }
            recent.order.pop_front();
            if let Some(old) = recent.map.remove(&id) {
                recent.by_instruction.remove(&old.instruction_alias());
            }
        }
    }

    /// The payment of an instruction (debtor agent + instruction id), wherever it is.
    async fn find_instruction(&self, alias: u128) -> Result<Option<PaymentRecord>, ApiError> {
        let key = self
            .in_flight
            .lock()
            .expect("in flight")
            .by_instruction
            .get(&alias)
            .copied();
        let key = key.or_else(|| {
            self.recent
                .lock()
                .expect("recent")
                .by_instruction
                .get(&alias)
                .copied()
        });
        let key = match key {
            Some(key) => Some(key),
            // An index read of microseconds: done in place, not on the blocking pool.
            None => self.node.resolve_alias_now(alias)?,
        };
        match key {
            Some(key) => self.find(key).await,
            None => Ok(None),
        }
    }

    /// A payment by id: in flight, recent, or from the index.
    async fn find(&self, id: u128) -> Result<Option<PaymentRecord>, ApiError> {
        if let Some(entry) = self.in_flight.lock().expect("in flight").payments.get(&id) {
            return Ok(Some(
                entry
                    .done
                    .borrow()
                    .clone()
                    .unwrap_or_else(|| entry.record.clone()),
            ));
        }
        if let Some(record) = self.recent.lock().expect("recent").map.get(&id) {
            return Ok(Some(record.clone()));
        }
        // An index read of microseconds: done in place, not on the blocking pool.
        let value = self.node.get_records_now(&[id])?.pop().flatten();
        match value.map(|v| serde_json::from_slice::<Stored>(&v)) {
            None => Ok(None),
            Some(Ok(Stored::Payment(record))) => Ok(Some(*record)),
            Some(_) => Err(ApiError::new(
                500,
                "corrupt_record",
                format!("record {id:#x} is not a payment"),
            )),
        }
    }

    /// Status query: only the debtor or creditor agent (or the operator) may read a payment.
    pub async fn status(
        &self,
        caller: &Caller,
        query: StatusQuery,
    ) -> Result<PaymentView, ApiError> {
        let id =
            match (
                &query.payment_id,
                &query.instruction_id,
                &query.end_to_end_id,
                &query.uetr,
            ) {
                (Some(hex_id), None, None, None) => u128::from_str_radix(hex_id, 16)
                    .map_err(|_| ApiError::bad_request("payment_id is 32 hex digits", "FF01"))?,
                (None, Some(instruction_id), None, None) => match caller {
                    Caller::Participant(bic) => self
                        .find_instruction(instruction_alias(bic, instruction_id))
                        .await?
                        .ok_or_else(|| ApiError::not_found("payment"))?
                        .id(),
                    Caller::Operator => return Err(ApiError::bad_request(
                        "the operator asks by payment_id, end_to_end_id with debtor_agent, or uetr",
                        "FF01",
                    )),
                },
                (None, None, Some(e2e), None) => {
                    let debtor = match (caller, &query.debtor_agent) {
                        (_, Some(d)) => d.clone(),
                        (Caller::Participant(bic), None) => bic.clone(),
                        (Caller::Operator, None) => {
                            return Err(ApiError::bad_request(
                                "debtor_agent is required with end_to_end_id",
                                "FF01",
                            ))
                        }
                    };
                    self.resolve(end_to_end_alias(&debtor, e2e))
                        .await?
                        .ok_or_else(|| ApiError::not_found("payment"))?
                }
                (None, None, None, Some(uetr)) => self
                    .resolve(uetr_alias(uetr))
                    .await?
                    .ok_or_else(|| ApiError::not_found("payment"))?,
                _ => {
                    return Err(ApiError::bad_request(
                        "ask by exactly one of payment_id, instruction_id, end_to_end_id, uetr",
                        "FF01",
                    ))
                }
            };
        let record = self
            .find(id)
            .await?
            .ok_or_else(|| ApiError::not_found("payment"))?;
        match caller {
            Caller::Operator => {}
            Caller::Participant(bic)
                if *bic == record.debtor_agent || *bic == record.creditor_agent => {}
            // Not "forbidden": a participant must not learn that someone else's payment exists.
            Caller::Participant(_) => return Err(ApiError::not_found("payment")),
        }
        Ok(PaymentView::of(&record))
    }

    async fn resolve(&self, alias: u128) -> Result<Option<u128>, ApiError> {
        let node = self.node.clone();
        blocking(move || node.resolve_alias(alias)).await
    }

    /// A creditor agent's decision, given after it answered 202.
    pub fn decide(&self, caller: &Caller, id: u128, decision: Decision) -> Result<(), ApiError> {
        let entry = self
            .in_flight
            .lock()
            .expect("in flight")
            .payments
            .get(&id)
            .cloned();
        let Some(entry) = entry else {
            return Err(ApiError::new(
                409,
                "not_in_flight",
                "the payment is not waiting for a decision (unknown, or already final)",
            ));
        };
        if *caller != Caller::Participant(entry.record.creditor_agent.clone()) {
            return Err(ApiError::not_found("payment"));
        }
        if let Decision::Reject(reason) = &decision {
            if !is_status_reason_code(reason) {
                return Err(ApiError::bad_request(
                    format!("{reason:?} is not an ISO 20022 status reason code"),
                    "FF01",
                ));
            }
        }
        let sender = entry.decision.lock().expect("decision").take();
        match sender {
            Some(sender) => {
                let _ = sender.send(decision);
                Ok(())
            }
            None => Err(ApiError::new(
                409,
                "already_decided",
                "a decision for this payment was already taken",
            )),
        }
    }

    /// Drives one reserved payment to its final state.
    async fn drive(self: Arc<Self>, entry: Arc<InFlight>) {
        let decision = self.ask_creditor(&entry).await;
        self.finalize(entry.clone(), decision).await;
    }

    /// Forwards the payment to its creditor agent and waits for its decision (in the answer, or
    /// later by the decision call) until the deadline.
    async fn ask_creditor(&self, entry: &Arc<InFlight>) -> Decision {
        let record = &entry.record;
        let (decision_sender, decision_receiver) = oneshot::channel();
        *entry.decision.lock().expect("decision") = Some(decision_sender);
        let remaining =
            Duration::from_nanos(record.deadline_ns.saturating_sub(self.clock.now_ns()));
        let deadline = tokio::time::Instant::now() + remaining;
        let creditor = self.participants().get(&record.creditor_agent).cloned();
        let forwarding = std::time::Instant::now();
        let decision = match creditor {
            None => Decision::Reject("CNOR".into()),
            Some(creditor) => {
                let view = PaymentView::of(record);
                let forward = self
                    .outbound
                    .forward(&creditor, &view, deadline, record.deadline_ns);
                tokio::pin!(forward);
                let mut decision_receiver = decision_receiver;
                tokio::select! {
                    biased;
                    result = &mut forward => match result {
                        Ok(Some(decision)) => decision,
                        Ok(None) => {
                            // 202: the creditor agent decides later, until the deadline.
                            match self
                                .clock
                                .timeout_at_ns(record.deadline_ns, &mut decision_receiver)
                                .await
                            {
                                Some(Ok(decision)) => decision,
                                _ => Decision::Reject("AB05".into()),
                            }
                        }
                        Err(ForwardError::Unreachable) => Decision::Reject("AB08".into()),
                        Err(ForwardError::NoAnswer) => Decision::Reject("AB05".into()),
                    },
                    Ok(decision) = &mut decision_receiver => decision,
                }
            }
        };
        self.latency.creditor.observe(forwarding.elapsed());
        decision
    }

    async fn finalize(&self, entry: Arc<InFlight>, decision: Decision) {
        let mut record = entry.record.clone();
        let id = record.id();
        let c = currency(&record.currency).expect("validated");
        let (transfer, state, reason) = match decision {
            Decision::Accept => (
                Transfer {
                    id: post_id(id),
                    pending_id: id,
                    amount: record.amount,
                    ledger: c.numeric,
                    code: TRANSFER_CODE_PAYMENT,
                    flags: TransferFlags::POST_PENDING,
                    ..Transfer::default()
                },
                PaymentState::Settled,
                None,
            ),
            Decision::Reject(reason) => (
                Transfer {
                    id: void_id(id),
                    pending_id: id,
                    ledger: c.numeric,
                    code: TRANSFER_CODE_PAYMENT,
                    flags: TransferFlags::VOID_PENDING,
                    ..Transfer::default()
                },
                PaymentState::Rejected,
                Some(reason),
            ),
        };
        record.state = state;
        record.reason = reason;
        record.finished_at_ns = Some(self.clock.now_ns());
        let put = |record: &PaymentRecord, condition| RecordPut {
            key: id,
            value: encode(&Stored::Payment(Box::new(record.clone()))),
            open: false,
            aliases: vec![],
            when_transfer_ok: condition,
            voucher: Some(payment_voucher(record)),
        };
        let settling = std::time::Instant::now();
        let mut attempts = 0;
        let outcome = loop {
            // A settled payment counts in the open window in its commit callback (journal order).
            let count = (record.state == PaymentState::Settled).then(|| {
                let counter = self.clearing.counter();
                let (payer, payee, code, amount) = (
                    record.debtor_agent.clone(),
                    record.creditor_agent.clone(),
                    record.currency.clone(),
                    record.amount,
                );
                move |outcome: &SubmitOutcome| {
                    if outcome.written[0] {
                        counter(&payer, &payee, &code, amount);
                    }
                }
            });
            let submitted = submit_then(
                &self.node,
                vec![transfer],
                vec![put(&record, Some(0))],
                move |outcome| {
                    if let Some(count) = count {
                        count(outcome)
                    }
                },
            )
            .await;
            match submitted {
                Ok(outcome) => break Some(outcome),
                Err(EngineError::Overloaded { .. }) if attempts < FINALIZE_ATTEMPTS_MAX => {
                    attempts += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(error) => {
                    tracing::error!(payment = %format!("{id:032x}"), %error, "cannot finalize; the payment stays open until the next start");
                    break None;
                }
            }
        };
        let Some(outcome) = outcome else { return };
        match outcome.results[0] {
            CreateTransferResult::Ok | CreateTransferResult::Exists => {}
            CreateTransferResult::PendingTransferExpired => {
                // The ledger released the liquidity at the hard timeout: rejected on timeout.
                record.state = PaymentState::Rejected;
                record.reason = Some("AB05".into());
                if let Err(error) =
                    engine_submit(&self.node, vec![], vec![put(&record, None)]).await
                {
                    tracing::error!(payment = %format!("{id:032x}"), %error, "cannot record the expiry; retried at the next start");
                    return;
                }
            }
            other => {
                // Already posted or voided by an earlier run: the record on disk is final.
                match self.find_on_disk(id).await {
                    Some(existing) if existing.state != PaymentState::Reserved => record = existing,
                    _ => {
                        tracing::error!(payment = %format!("{id:032x}"), result = ?other, "reservation already final but its record is not");
                        return;
                    }
                }
            }
        }
        self.latency.settle.observe(settling.elapsed());
        self.complete(&entry, record);
    }

    /// A payment's final record is durable: count it, answer the waiting debtor agent, notify
    /// both agents, release its in-flight slot.
    fn complete(&self, entry: &Arc<InFlight>, record: PaymentRecord) {
        self.latency.end_to_end.observe(Duration::from_nanos(
            self.clock.now_ns().saturating_sub(record.accepted_at_ns),
        ));
        self.finished(&record);
        // Notifications carry the final state twice: JSON, and as the pacs.002 an ISO 20022
        // participant expects.
        let mut view = PaymentView::of(&record);
        let original_message = view
            .message_id
            .clone()
            .unwrap_or_else(|| view.instruction_id.clone());
        view.pacs_002 = Some(crate::iso::pacs002_of(&view, &original_message).to_xml());
        self.notify(
            &record.creditor_agent,
            Notification::Payment(Box::new(view.clone())),
        );
        let _ = entry.done.send(Some(record.clone()));
        if !entry.debtor_waiting.load(Ordering::SeqCst) {
            self.notify(&record.debtor_agent, Notification::Payment(Box::new(view)));
        }
        self.release(record.id(), &record.debtor_agent);
        if (record.state == PaymentState::Settled || record.queued)
            && !self.config.liquidity_saving_currencies.is_empty()
        {
            // Liquidity moved (or a queued payment left the queue): try the queue again.
            self.lsm.wake.notify_one();
        }
    }

    async fn find_on_disk(&self, id: u128) -> Option<PaymentRecord> {
        let node = self.node.clone();
        let value = blocking(move || node.get_records(&[id]))
            .await
            .ok()?
            .pop()
            .flatten()?;
        match serde_json::from_slice::<Stored>(&value).ok()? {
            Stored::Payment(record) => Some(*record),
            Stored::Participant(_) | Stored::Return(_) | Stored::Recall(_) => None,
        }
    }

    /// Returns (part of) a settled payment: its creditor agent sends the money back to its debtor
    /// agent, atomically with the return record and the payment's returned amount. Idempotent by
    /// (returning agent, return id).
    pub async fn return_payment(
        &self,
        caller: &Caller,
        payment_key: u128,
        request: ReturnRequest,
    ) -> Result<ReturnView, ApiError> {
        let Caller::Participant(me) = caller else {
            return Err(ApiError::new(
                403,
                "forbidden",
                "returns are sent by the payment's creditor agent",
            ));
        };
        if !is_max35(&request.return_id) {
            return Err(ApiError::bad_request(
                "return_id must be 1 to 35 printable characters",
                "FF01",
            ));
        }
        if !is_return_reason_code(&request.reason) {
            return Err(ApiError::bad_request(
                format!(
                    "{:?} is not an ISO 20022 return reason code",
                    request.reason
                ),
                "FF01",
            ));
        }
        let _one_at_a_time = self.returns.lock().await;
        let alias = return_alias(me, &request.return_id);
        let existing = {
            let node = self.node.clone();
            blocking(move || {
                Ok(match node.resolve_alias(alias)? {
                    Some(key) => node.get_records(&[key])?.pop().flatten(),
                    None => None,
                })
            })
            .await?
        };
        if let Some(value) = existing {
            return match serde_json::from_slice::<Stored>(&value) {
                Ok(Stored::Return(r)) if r.original_key == payment_key => Ok(ReturnView::of(&r)),
                _ => Err(ApiError::new(
                    409,
                    "duplicate_return_id",
                    "this return_id was used for another return",
                )
                .with_reason("DUPL")),
            };
        }
        let mut original = self
            .find(payment_key)
            .await?
            .ok_or_else(|| ApiError::not_found("payment"))?;
        if original.creditor_agent != *me {
            return Err(ApiError::not_found("payment"));
        }
        if original.state != PaymentState::Settled {
            return Err(ApiError::new(
                409,
                "not_settled",
                "only a settled payment can be returned",
            ));
        }
        if let Some(code) = &request.currency {
            if *code != original.currency {
                return Err(ApiError::bad_request(
                    format!(
                        "the return is in {code:?} but the payment was in {}",
                        original.currency
                    ),
                    "AM03",
                ));
            }
        }
        let c = currency(&original.currency).expect("stored currencies are known");
        let open = original.amount - original.returned;
        let amount = match &request.amount {
            Some(text) => amount_in(text, c)?,
            None => open,
        };
        if amount == 0 || amount > open {
            return Err(ApiError::new(
                409,
                "return_exceeds_payment",
                format!(
                    "{} of the payment is still unreturned",
                    money::format_amount(open, c.exponent)
                ),
            )
            .with_reason("AM09"));
        }
        let now = self.clock.now_ns();
        let record = ReturnRecord {
            key: crate::model::payment_key(now, me, &format!("return {}", request.return_id)),
            return_id: request.return_id.clone(),
            original_key: payment_key,
            original_instruction_id: original.instruction_id.clone(),
            original_end_to_end_id: original.end_to_end_id.clone(),
            original_uetr: original.uetr.clone(),
            returning_agent: me.clone(),
            receiving_agent: original.debtor_agent.clone(),
            currency: original.currency.clone(),
            amount,
            reason: request.reason.clone(),
            settled_at_ns: now,
        };
        original.returned += amount;
        let transfer = Transfer {
            id: record.key,
            debit_account_id: position_account(me, &original.currency),
            credit_account_id: position_account(&original.debtor_agent, &original.currency),
            amount,
            ledger: c.numeric,
            code: TRANSFER_CODE_RETURN,
            ..Transfer::default()
        };
        let puts = vec![
            RecordPut {
                key: record.key,
                value: encode(&Stored::Return(Box::new(record.clone()))),
                open: false,
                aliases: vec![alias],
                when_transfer_ok: Some(0),
                voucher: Some(
                    VoucherEvent::PaymentReturned {
                        return_key: format!("{:032x}", record.key),
                        original_payment: format!("{payment_key:032x}"),
                        original_uetr: record.original_uetr.clone(),
                        returning_agent: record.returning_agent.clone(),
                        receiving_agent: record.receiving_agent.clone(),
                        currency: record.currency.clone(),
                        amount: record.amount,
                        reason: record.reason.clone(),
                        at_ns: record.settled_at_ns,
                    }
                    .to_bytes(),
                ),
            },
            RecordPut {
                key: payment_key,
                value: encode(&Stored::Payment(Box::new(original.clone()))),
                open: false,
                aliases: vec![],
                when_transfer_ok: Some(0),
                voucher: None,
            },
        ];
        let counter = self.clearing.counter();
        let (payer, payee, code) = (
            record.returning_agent.clone(),
            record.receiving_agent.clone(),
            record.currency.clone(),
        );
        let outcome = submit_then(&self.node, vec![transfer], puts, move |outcome| {
            if outcome.written[0] {
                counter(&payer, &payee, &code, amount);
            }
        })
        .await?;
        match outcome.results[0] {
            CreateTransferResult::Ok => {}
            CreateTransferResult::ExceedsCredits => {
                return Err(ApiError::new(
                    409,
                    "insufficient_liquidity",
                    "the returning agent's position cannot cover the return; nothing changed",
                )
                .with_reason("AM04"))
            }
            other => return Err(ApiError::new(500, "ledger_refused", format!("{other:?}"))),
        }
        // The recent cache must show the new returned amount.
        {
            let mut recent = self.recent.lock().expect("recent");
            if let Some(cached) = recent.map.get_mut(&payment_key) {
                *cached = original.clone();
            }
        }
        let view = ReturnView::of(&record);
        tracing::info!(payment = %format!("{payment_key:032x}"), reason = %record.reason, "payment returned");
        // Both agents hear of it in JSON and as a pacs.004 (for a recall: the pacs.004 step).
        let mut notice = view.clone();
        notice.pacs_004 = Some(view.pacs004().to_xml());
        self.notify(
            &record.receiving_agent,
            Notification::Return(Box::new(notice.clone())),
        );
        self.notify(
            &record.returning_agent,
            Notification::Return(Box::new(notice)),
        );
        Ok(view)
    }

    /// Closes the open settlement window (operator), settling it right away with `settle`.
    pub async fn close_window(
        &self,
        caller: &Caller,
        settle: bool,
    ) -> Result<WindowReport, ApiError> {
        operator(caller)?;
        let models = crate::clearing::settlement_models(&self.participants());
        let report = self.clearing.close(&models, settle).await;
        self.lsm.wake.notify_one();
        report
    }

    pub async fn settle_window(
        &self,
        caller: &Caller,
        window: u64,
    ) -> Result<WindowReport, ApiError> {
        operator(caller)?;
        let report = self.clearing.settle(window).await;
        // Fund adjustments changed positions: queued payments may fit now.
        self.lsm.wake.notify_one();
        report
    }

    /// A window's report; a participant sees only its own positions.
    pub async fn window_report(
        &self,
        caller: &Caller,
        window: u64,
    ) -> Result<WindowReport, ApiError> {
        let models = crate::clearing::settlement_models(&self.participants());
        let report = self.clearing.report(window, &models).await?;
        Ok(match caller {
            Caller::Operator => report,
            Caller::Participant(bic) => crate::clearing::participant_view(report, bic),
        })
    }

    /// A participant's statements of a closed window (one per currency); the operator names the
    /// participant.
    pub async fn statements(
        &self,
        caller: &Caller,
        window: u64,
        participant: Option<&str>,
    ) -> Result<Vec<clearhouse_clearing::statement::Statement>, ApiError> {
        let bic = match (caller, participant) {
            (Caller::Participant(me), None) => me.clone(),
            (Caller::Participant(me), Some(bic)) if me == bic => me.clone(),
            (Caller::Participant(_), Some(_)) => {
                return Err(ApiError::new(
                    403,
                    "forbidden",
                    "a participant can only read its own statements",
                ))
            }
            (Caller::Operator, Some(bic)) => bic.to_string(),
            (Caller::Operator, None) => {
                return Err(ApiError::bad_request("participant=BIC is required", "FF01"))
            }
        };
        let mut statements = self.clearing.statements(window).await?;
        statements.retain(|s| s.participant == bic);
        Ok(statements)
    }

    /// The open window and the `limit - 1` most recent closed ones.
    pub async fn windows(
        &self,
        caller: &Caller,
        limit: u64,
    ) -> Result<Vec<WindowReport>, ApiError> {
        let models = crate::clearing::settlement_models(&self.participants());
        let reports = self.clearing.list(&models, limit).await?;
        Ok(match caller {
            Caller::Operator => reports,
            Caller::Participant(bic) => reports
                .into_iter()
                .map(|r| crate::clearing::participant_view(r, bic))
                .collect(),
        })
    }

    pub async fn vouchers(
        &self,
        caller: &Caller,
        from: u64,
        limit: usize,
    ) -> Result<crate::clearing::VoucherPage, ApiError> {
        let participant = match caller {
            Caller::Operator => None,
            Caller::Participant(bic) => Some(bic.as_str()),
        };
        self.clearing.voucher_page(participant, from, limit).await
    }

    /// Closes windows on the configured schedule (every `window_close_every_seconds`, and at the
    /// `window_close_at_utc` times), settling each; a failed close is logged and tried again at
    /// the next scheduled time.
    pub fn spawn_window_schedule(self: &Arc<Self>) {
        let now = || now_ns() / 1_000_000_000;
        if self.config.seconds_to_next_close(now(), now()).is_none() {
            return;
        }
        let switch = self.clone();
        tokio::spawn(async move {
            let mut last = now();
            loop {
                let Some(wait) = switch.config.seconds_to_next_close(now(), last) else {
                    return;
                };
                tokio::time::sleep(Duration::from_secs(wait.max(1))).await;
                last = now();
                if let Err(error) = switch.close_window(&Caller::Operator, true).await {
                    tracing::warn!(%error, "scheduled window close failed; tried again at the next scheduled time");
                }
            }
        });
    }

    /// The key of a payment by UETR (for pacs.004 and pacs.028).
    pub async fn payment_by_uetr(&self, uetr: &str) -> Result<Option<u128>, ApiError> {
        self.resolve(uetr_alias(uetr)).await
    }

    fn notify(&self, bic: &str, notification: Notification) {
        if let Some(participant) = self.participants().get(bic) {
            self.outbound.notify(participant, notification);
        }
    }

    /// Picks up an open payment after a restart; `reserved`: its reservation is still pending.
    fn resume(self: &Arc<Self>, record: PaymentRecord, reserved: bool) {
        let id = record.id();
        let (done, _) = watch::channel(None);
        let entry = Arc::new(InFlight {
            record: record.clone(),
            done,
            decision: Mutex::new(None),
            debtor_waiting: AtomicBool::new(false),
        });
        {
            let mut set = self.in_flight.lock().expect("in flight");
            set.payments.insert(id, entry.clone());
            set.by_instruction.insert(record.instruction_alias(), id);
            *set.per_debtor
                .entry(record.debtor_agent.clone())
                .or_default() += 1;
        }
        tracing::info!(payment = %format!("{id:032x}"), reserved, "resuming an open payment");
        let switch = self.clone();
        if record.queued {
            // Queued for liquidity when the switch stopped: nothing was reserved; rejected on
            // timeout rather than settled without the creditor agent's fresh decision.
            tokio::spawn(async move { switch.reject_unreserved(entry, "AB05").await });
        } else if reserved && record.deadline_ns > self.clock.now_ns() {
            tokio::spawn(async move { switch.drive(entry).await });
        } else {
            // Past the deadline (or already expired by the ledger): rejected on timeout.
            tokio::spawn(async move {
                switch
                    .finalize(entry, Decision::Reject("AB05".into()))
                    .await
            });
        }
    }
}

/// How a payment is looked up.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusQuery {
    pub payment_id: Option<String>,
    pub instruction_id: Option<String>,
    pub end_to_end_id: Option<String>,
    pub debtor_agent: Option<String>,
    pub uetr: Option<String>,
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
    let ok = endpoint.len() <= 200
        && (endpoint.starts_with("http://") || endpoint.starts_with("https://"))
        && endpoint.parse::<hyper::Uri>().is_ok();
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad_request(
            "endpoint must be an http(s) URL of at most 200 characters",
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
