//! What the API takes and shows: callers, payment requests and views, returns, participants,
//! positions, liquidity, status queries, counters. Plain data over the records of `model.rs`; it
//! imports nothing above the model, money and the error type.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::clock::now_ns;
use crate::model::*;
use crate::money::{self, currency};

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

#[derive(Clone, Debug, Serialize)]
pub struct StatsView {
    pub submitted: u64,
    pub settled: u64,
    pub rejected: u64,
    pub in_flight: usize,
    pub rejected_by_reason: BTreeMap<String, u64>,
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
    pub(crate) fn of(p: &Participant) -> ParticipantView {
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

/// A recall as notified: the record, and the ISO 20022 message that moved it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RecallNotice {
    pub recall: RecallRecord,
    pub xml: String,
}
