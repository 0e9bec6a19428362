//! The switch's durable data: participants (registry file) and payment records (engine records),
//! and the deterministic ids that tie them to ledger accounts and transfers.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// A 128-bit id derived from labelled parts (SHA-256, first 16 bytes), never 0 or u128::MAX
/// (the ledger reserves both).
pub fn id128(parts: &[&[u8]]) -> u128 {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update((part.len() as u32).to_le_bytes());
        hasher.update(part);
    }
    let digest = hasher.finalize();
    let id = u128::from_le_bytes(digest[..16].try_into().expect("16 bytes"));
    id.clamp(1, u128::MAX - 1)
}

pub fn position_account(bic: &str, currency: &str) -> u128 {
    id128(&[b"position", bic.as_bytes(), currency.as_bytes()])
}
pub fn settlement_account(currency: &str) -> u128 {
    id128(&[b"settlement-bank", currency.as_bytes()])
}
pub fn ndc_account(currency: &str) -> u128 {
    id128(&[b"net-debit-cap-lines", currency.as_bytes()])
}
/// A payment's key: its acceptance time (ns) in the high 64 bits, so keys grow with time and the
/// index appends instead of scattering writes over random B-tree leaves; 60 bits of the
/// instruction's hash below, and 4 low bits left zero for the post and void transfer ids.
pub fn payment_key(accepted_at_ns: u64, debtor_agent: &str, instruction_id: &str) -> u128 {
    let hash = instruction_alias(debtor_agent, instruction_id) as u64 as u128;
    (u128::from(accepted_at_ns) << 64) | (hash & !0xF) | 0x10
}
/// What makes a payment unique for idempotency: the debtor agent and its instruction id.
pub fn instruction_alias(debtor_agent: &str, instruction_id: &str) -> u128 {
    id128(&[
        b"payment",
        debtor_agent.as_bytes(),
        instruction_id.as_bytes(),
    ])
}
pub fn post_id(payment: u128) -> u128 {
    payment | 1
}
pub fn void_id(payment: u128) -> u128 {
    payment | 2
}
/// The credit leg of a payment settled by offsetting (its debit leg takes the post id).
pub fn offset_credit_id(payment: u128) -> u128 {
    payment | 3
}
pub fn end_to_end_alias(debtor_agent: &str, end_to_end_id: &str) -> u128 {
    id128(&[b"e2e", debtor_agent.as_bytes(), end_to_end_id.as_bytes()])
}
pub fn uetr_alias(uetr: &str) -> u128 {
    id128(&[b"uetr", uetr.as_bytes()])
}

/// How a data directory derives the ids of its few hash-keyed records and transfers
/// (participants, clearing state, window records and plans, fund adjustments, liquidity and
/// net-debit-cap transfers, recalls, retention state).
///
/// Payment keys grow with time (their acceptance time in the high 64 bits: 2^124 and above for
/// any time after 2006), and redb packs a B-tree leaf full only when a new key sorts after the
/// whole table's last key. One uniform 128-bit hash key above the payment keys turns every payment
/// insert into a split of a leaf in two halves, so the records and transfers tables stay half
/// empty. [`KeyScheme::Compact`] keeps those ids below 2^124 (124 bits of hash): every payment
/// key is then the table's last key and leaves fill. Directories created before it keep
/// [`KeyScheme::Legacy`] (their ids cannot change under existing ledger transfers); the scheme is
/// a record of the directory ([`KEY_SCHEME_RECORD`]), written with the first clearing state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyScheme {
    /// Full 128-bit hash ids (directories created before the compact scheme).
    Legacy,
    /// Hash ids below 2^124, under every payment key.
    Compact,
}

/// The record that names a directory's [`KeyScheme`] (value `b"compact"`); absent in legacy
/// directories. A fixed key below 2^124 (the ASCII of "key-scheme").
pub const KEY_SCHEME_RECORD: u128 = 0x6b65_792d_7363_6865_6d65;
pub const KEY_SCHEME_COMPACT: &[u8] = b"compact";

impl KeyScheme {
    /// A hash id under this scheme (never 0, never u128::MAX).
    pub fn id(self, parts: &[&[u8]]) -> u128 {
        let id = id128(parts);
        match self {
            KeyScheme::Legacy => id,
            KeyScheme::Compact => (id >> 4).max(1),
        }
    }
    /// The scheme named by the value of [`KEY_SCHEME_RECORD`], if any.
    pub fn from_record(value: Option<&[u8]>) -> Result<Option<KeyScheme>, String> {
        match value {
            None => Ok(None),
            Some(KEY_SCHEME_COMPACT) => Ok(Some(KeyScheme::Compact)),
            Some(other) => Err(format!(
                "unknown key scheme {:?}",
                String::from_utf8_lossy(other)
            )),
        }
    }
    pub fn participant(self, bic: &str) -> u128 {
        self.id(&[b"participant", bic.as_bytes()])
    }
    pub fn liquidity_transfer(self, bic: &str, request_id: &str) -> u128 {
        self.id(&[b"liquidity", bic.as_bytes(), request_id.as_bytes()])
    }
    /// A net debit cap line's transfer (`nonce`: b"onboard", or random for a change).
    pub fn ndc_line(self, bic: &str, currency: &str, nonce: &[u8]) -> u128 {
        self.id(&[b"ndc-line", bic.as_bytes(), currency.as_bytes(), nonce])
    }
    pub fn recall(self, requested_by: &str, case_id: &str) -> u128 {
        self.id(&[b"recall", requested_by.as_bytes(), case_id.as_bytes()])
    }
    pub fn clearing_state(self) -> u128 {
        self.id(&[b"clearing-state"])
    }
    pub fn window(self, window: u64) -> u128 {
        self.id(&[b"window", &window.to_le_bytes()])
    }
    pub fn plan_chunk(self, window: u64, chunk: u32) -> u128 {
        self.id(&[b"window-plan", &window.to_le_bytes(), &chunk.to_le_bytes()])
    }
    pub fn fund_adjustment(self, window: u64, bic: &str, currency: &str) -> u128 {
        self.id(&[
            b"fund-adjustment",
            &window.to_le_bytes(),
            bic.as_bytes(),
            currency.as_bytes(),
        ])
    }
    pub fn retention_state(self) -> u128 {
        self.id(&[b"retention-state"])
    }
    /// A chunk of a pruned window's closing balances.
    pub fn closings_chunk(self, window: u64, chunk: u32) -> u128 {
        self.id(&[
            b"retention-closings",
            &window.to_le_bytes(),
            &chunk.to_le_bytes(),
        ])
    }
}

/// u128 amounts as decimal strings in stored JSON (serde's buffered enums cannot carry u128).
mod u128_string {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &u128, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(value)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u128, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Ledger codes: what kind of account or transfer a ledger object is.
pub const ACCOUNT_CODE_POSITION: u16 = 1;
pub const ACCOUNT_CODE_SETTLEMENT_BANK: u16 = 2;
pub const ACCOUNT_CODE_NDC_LINES: u16 = 3;
pub const ACCOUNT_CODE_LSM_SUSPENSE: u16 = 4;
pub const TRANSFER_CODE_PAYMENT: u16 = 1;
pub const TRANSFER_CODE_LIQUIDITY_IN: u16 = 2;
pub const TRANSFER_CODE_LIQUIDITY_OUT: u16 = 3;
pub const TRANSFER_CODE_NDC_LINE: u16 = 4;
pub const TRANSFER_CODE_RETURN: u16 = 5;
pub const TRANSFER_CODE_FUND_ADJUSTMENT: u16 = 6;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SettlementModel {
    /// Real money prefunded from the settlement bank; payments settle gross.
    Prefunded,
    /// Positions accumulate within a window, bounded by the net debit cap.
    DeferredNet,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CurrencyTerms {
    pub model: SettlementModel,
    /// Minor units; the credit line a deferred-net participant may run up (0 when prefunded).
    #[serde(with = "u128_string")]
    pub net_debit_cap: u128,
    /// Minor units; a larger payment is rejected with AM02 (0 = no limit).
    #[serde(with = "u128_string")]
    pub per_payment_max: u128,
    /// Minor units; an alert is raised when available liquidity falls below it (0 = off).
    #[serde(with = "u128_string")]
    pub liquidity_alert_below: u128,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ParticipantStatus {
    Active,
    Suspended,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Participant {
    pub bic: String,
    pub name: String,
    /// Base URL of the participant's own API: the switch POSTs `{endpoint}/payments` and
    /// `{endpoint}/notifications`. [`AMQP_ENDPOINT`] (`amqp:`) instead: the participant is
    /// reached through its queues on the scheme's RabbitMQ broker (crates/amqp).
    pub endpoint: String,
    pub status: ParticipantStatus,
    pub key_id: String,
    /// HMAC-SHA256 secret (hex), shared with the participant; signs both directions.
    pub secret_hex: String,
    pub currencies: BTreeMap<String, CurrencyTerms>,
    /// ABA routing number (FedNow-like profile: how messages name this participant).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routing_number: Option<String>,
}

/// The endpoint of a participant connected over AMQP 0-9-1 rather than HTTP.
pub const AMQP_ENDPOINT: &str = "amqp:";

impl Participant {
    /// Whether the participant is reached through its message queues (AMQP), not HTTP.
    pub fn over_amqp(&self) -> bool {
        self.endpoint == AMQP_ENDPOINT
    }
}

/// ISO 20022 BIC shape: 4 letters (institution), 2 letters (country), 2 alphanumerics
/// (location), optionally 3 alphanumerics (branch).
pub fn is_bic(text: &str) -> bool {
    let b = text.as_bytes();
    (b.len() == 8 || b.len() == 11)
        && b[..6].iter().all(|c| c.is_ascii_uppercase())
        && b[6..]
            .iter()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit())
}

/// ISO 20022 Max35Text, restricted to printable ASCII without leading/trailing spaces.
pub fn is_max35(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 35
        && text.bytes().all(|b| (0x20..0x7f).contains(&b))
        && !text.starts_with(' ')
        && !text.ends_with(' ')
}

/// UETR: lowercase UUID v4 (the ISO 20022 pattern).
pub fn is_uetr(text: &str) -> bool {
    let b = text.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            14 => *c == b'4',
            19 => matches!(c, b'8' | b'9' | b'a' | b'b'),
            _ => c.is_ascii_digit() || (b'a'..=b'f').contains(c),
        })
}

/// A fresh random UETR (UUID v4, lowercase).
pub fn new_uetr() -> String {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).expect("operating system randomness");
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    uuid_text(&b)
}

/// 16 bytes as a lowercase hyphenated UUID (8-4-4-4-12 hex digits).
pub fn uuid_text(bytes: &[u8; 16]) -> String {
    let h = hex::encode(bytes);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

const STATUS_REASON_CODES: &str = include_str!("status_reason_codes.txt");

const RETURN_REASON_CODES: &str = include_str!("return_reason_codes.txt");

/// Whether `code` is in ISO's ExternalReturnReason1Code set (copied from ../shared/iso20022).
pub fn is_return_reason_code(code: &str) -> bool {
    code.len() == 4 && RETURN_REASON_CODES.lines().any(|line| line == code)
}

/// Whether `code` is in ISO's ExternalStatusReason1Code set (copied from ../shared/iso20022).
pub fn is_status_reason_code(code: &str) -> bool {
    code.len() == 4 && STATUS_REASON_CODES.lines().any(|line| line == code)
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Party {
    pub name: String,
    pub account: String,
}

/// Where a payment is in its lifecycle. `Reserved` is the only open state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PaymentState {
    /// Liquidity reserved, waiting for the creditor agent (ISO status PDNG to the outside).
    Reserved,
    /// Settled: ISO ACSC.
    Settled,
    /// Rejected with a reason code: ISO RJCT.
    Rejected,
}

impl PaymentState {
    pub fn iso_status(self) -> &'static str {
        match self {
            PaymentState::Reserved => "PDNG",
            PaymentState::Settled => "ACSC",
            PaymentState::Rejected => "RJCT",
        }
    }
}

/// One payment as stored in the engine (JSON value of its record, keyed by [`payment_id`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentRecord {
    /// [`payment_key`]: the ledger id of the reservation and the record's key.
    #[serde(with = "u128_string")]
    pub key: u128,
    pub instruction_id: String,
    pub end_to_end_id: String,
    pub uetr: String,
    pub debtor_agent: String,
    pub creditor_agent: String,
    pub currency: String,
    #[serde(with = "u128_string")]
    pub amount: u128,
    pub debtor: Party,
    pub creditor: Party,
    pub remittance_information: Option<String>,
    /// The message that carried the payment (pacs.008 GrpHdr/MsgId), when there was one.
    #[serde(default)]
    pub message_id: Option<String>,
    /// The instruction's PmtId/TxId (pacs.008), echoed as OrgnlTxId.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transaction_id: Option<String>,
    pub state: PaymentState,
    pub reason: Option<String>,
    /// Wall-clock nanoseconds: accepted by the switch, the settlement deadline, the end.
    pub accepted_at_ns: u64,
    pub deadline_ns: u64,
    pub finished_at_ns: Option<u64>,
    /// Minor units returned so far (pacs.004), never more than `amount`.
    #[serde(default, with = "u128_string")]
    pub returned: u128,
    /// Liquidity-saving mode: the payment did not fit the debtor agent's liquidity and waits
    /// (nothing reserved) to be settled by offsetting, until its deadline.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub queued: bool,
}

/// A return of (part of) a settled payment: money from its creditor agent back to its debtor
/// agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReturnRecord {
    #[serde(with = "u128_string")]
    pub key: u128,
    pub return_id: String,
    #[serde(with = "u128_string")]
    pub original_key: u128,
    pub original_instruction_id: String,
    pub original_end_to_end_id: String,
    pub original_uetr: String,
    /// The original creditor agent, who sends the money back.
    pub returning_agent: String,
    /// The original debtor agent, who receives it.
    pub receiving_agent: String,
    pub currency: String,
    #[serde(with = "u128_string")]
    pub amount: u128,
    /// ExternalReturnReason1Code.
    pub reason: String,
    pub settled_at_ns: u64,
}

pub fn return_alias(returning_agent: &str, return_id: &str) -> u128 {
    id128(&[b"return", returning_agent.as_bytes(), return_id.as_bytes()])
}

impl PaymentRecord {
    pub fn id(&self) -> u128 {
        self.key
    }

    pub fn instruction_alias(&self) -> u128 {
        instruction_alias(&self.debtor_agent, &self.instruction_id)
    }

    /// Whether a resubmission is the same instruction (same business content); the UETR counts
    /// only when the resubmission carried one (else the switch generated it).
    pub fn same_instruction(&self, other: &PaymentRecord, compare_uetr: bool) -> bool {
        self.end_to_end_id == other.end_to_end_id
            && (!compare_uetr || self.uetr == other.uetr)
            && self.creditor_agent == other.creditor_agent
            && self.currency == other.currency
            && self.amount == other.amount
            && self.debtor == other.debtor
            && self.creditor == other.creditor
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_checked_by_shape() {
        assert!(is_bic("BANKDEFF"));
        assert!(is_bic("BANKDEFFXXX"));
        assert!(!is_bic("BANKDEF"));
        assert!(!is_bic("bankdeff"));
        assert!(!is_bic("BANK1EFF"));
        assert!(is_uetr(&new_uetr()));
        assert!(!is_uetr("eb6305c9-1f7f-49de-aed0-16487c27b42"));
        assert!(!is_uetr("EB6305C9-1F7F-49DE-AED0-16487C27B42D"));
        assert!(is_max35("E2E-1"));
        assert!(!is_max35(&"x".repeat(36)));
        assert!(!is_max35(" x"));
        assert!(is_status_reason_code("AC04"));
        assert!(!is_status_reason_code("ZZ99"));
        assert_ne!(instruction_alias("A", "BC"), instruction_alias("AB", "C"));
        let key = payment_key(1_000, "A", "B");
        assert_eq!(key >> 64, 1_000);
        assert!(payment_key(1_001, "A", "B") > key);
        assert!(![post_id(key), void_id(key)].contains(&key));
        assert_ne!(post_id(key), void_id(key));
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecallState {
    Requested,
    Accepted,
    Rejected,
}

/// A recall as stored (engine record) and shown.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecallRecord {
    /// 32 hex digits: derived from the requesting agent and its case id.
    pub recall_id: String,
    pub case_id: String,
    pub payment_id: String,
    pub original_uetr: String,
    pub original_end_to_end_id: String,
    /// The debtor agent, who asks.
    pub requested_by: String,
    /// The creditor agent, who decides.
    pub assignee: String,
    /// ExternalCancellationReason1Code.
    pub reason: String,
    pub additional_info: Vec<String>,
    pub state: RecallState,
    /// ExternalPaymentCancellationRejection1Code when rejected.
    pub rejection_reason: Option<String>,
    /// The return that carried the money back, when accepted.
    pub return_id: Option<String>,
    pub requested_at_ns: u64,
    pub resolved_at_ns: Option<u64>,
}
