//! ISO 20022 on the switch: a pacs.008 (one transaction) becomes the same [`PaymentRequest`] as
//! the JSON API's, and every answer is a pacs.002 of the payment's state. JSON and XML are two
//! views of the same payment.

use clearhouse_iso20022::messages::{Account, Agent};
use clearhouse_iso20022::{envelope_xml, AppHeader, Element};
use clearhouse_iso20022::{time, CreditTransfer, Limits, Message, Pacs002, Pacs004, Pacs008};

use crate::api::{PaymentRequest, PaymentView};
use crate::clock::now_ns;
use crate::error::ApiError;
use crate::model::Party;

pub const PACS_008_NAME: &str = "pacs.008.001.08";

/// Bounds for XML from participants (the HTTP body limit applies before these).
pub fn limits() -> Limits {
    Limits {
        bytes_max: 256 * 1024,
        depth_max: 24,
        elements_max: 2_000,
        text_bytes_max: 2_048,
    }
}

fn account_text(account: &Option<Account>) -> String {
    account
        .as_ref()
        .and_then(|a| a.iban.clone().or_else(|| a.other_id.clone()))
        .unwrap_or_default()
}

/// A parsed pacs.008 and the one transaction the scheme accepts per message.
pub struct Submission {
    pub header: Option<AppHeader>,
    pub message: Pacs008,
    pub request: PaymentRequest,
}

/// Checks a business application header: sent by the authenticated participant, for this
/// message type.
pub fn check_header(
    header: &AppHeader,
    sender: &str,
    definition: &str,
    resolve: &dyn Fn(&str) -> Option<String>,
) -> Result<(), ApiError> {
    let from = header
        .from
        .bic
        .clone()
        .or_else(|| header.from.member_id.as_deref().and_then(resolve));
    if from.as_deref() != Some(sender) {
        return Err(ApiError::new(
            403,
            "header_sender_mismatch",
            "AppHdr/Fr must be the authenticated participant (BICFI or its routing number)",
        ));
    }
    if header.message_definition != definition {
        return Err(ApiError::new(
            400,
            "header_definition_mismatch",
            format!("AppHdr/MsgDefIdr must be {definition}"),
        )
        .with_reason("FF01"));
    }
    Ok(())
}

/// The answer's XML: the document alone, or with a reply header when the request had one.
pub fn answer_xml(
    request_header: Option<&AppHeader>,
    scheme_bic: &str,
    definition: &str,
    document: Element,
) -> String {
    match request_header {
        None => clearhouse_iso20022::xml::emit(&document),
        Some(request) => {
            let now = now_ns();
            let reply = AppHeader {
                from: Agent {
                    bic: Some(scheme_bic.to_string()),
                    ..Agent::default()
                },
                to: request.from.clone(),
                business_message_id: format!("CH{now:x}"),
                message_definition: definition.to_string(),
                business_service: request.business_service.clone(),
                created: time::date_time(now),
            };
            envelope_xml(&reply, document)
        }
    }
}

/// Reads a pacs.008 into a payment request. A message that does not parse is a 400 (FF01, with
/// the element path); one that parses but breaks a rule the XSD does not check answers RJCT.
pub fn read_pacs008(
    body: &[u8],
    resolve: &dyn Fn(&str) -> Option<String>,
) -> Result<Submission, ApiError> {
    let (header, message) = match Message::parse_with_header(body, &limits()) {
        Ok((header, Message::Pacs008(message))) => (header, message),
        Ok(_) => {
            return Err(
                ApiError::new(400, "unsupported_message", "submit a pacs.008.001.08")
                    .with_reason("FF01"),
            )
        }
        Err(error) => {
            return Err(ApiError::new(400, "invalid_message", error.to_string()).with_reason("FF01"))
        }
    };
    if message.transactions.len() != 1 || message.number_of_transactions != "1" {
        return Err(ApiError::new(
            400,
            "one_transaction_per_message",
            "this scheme takes exactly one CdtTrfTxInf per pacs.008, with NbOfTxs 1",
        )
        .with_reason("FF01"));
    }
    let tx: &CreditTransfer = &message.transactions[0];
    // Agents by BICFI, or by clearing-system member id (a routing number) of a participant.
    let bic = |agent: &clearhouse_iso20022::messages::Agent, what: &str| {
        agent
            .bic
            .clone()
            .or_else(|| agent.member_id.as_deref().and_then(resolve))
            .ok_or_else(|| {
                ApiError::new(
                    400,
                    "unknown_agent",
                    format!("{what}: neither a BICFI nor the routing number of a participant"),
                )
                .with_reason("RC01")
            })
    };
    let request = PaymentRequest {
        instruction_id: tx
            .instruction_id
            .clone()
            .or_else(|| tx.transaction_id.clone())
            .unwrap_or_else(|| message.message_id.clone()),
        end_to_end_id: tx.end_to_end_id.clone(),
        uetr: tx.uetr.clone(),
        debtor_agent: bic(&tx.debtor_agent, "DbtrAgt")?,
        creditor_agent: bic(&tx.creditor_agent, "CdtrAgt")?,
        amount: tx.amount.clone(),
        currency: tx.currency.clone(),
        debtor: Party {
            name: tx.debtor_name.clone().unwrap_or_default(),
            account: account_text(&tx.debtor_account),
        },
        creditor: Party {
            name: tx.creditor_name.clone().unwrap_or_default(),
            account: account_text(&tx.creditor_account),
        },
        remittance_information: (!tx.remittance_unstructured.is_empty())
            .then(|| tx.remittance_unstructured.join(" ")),
        message_id: Some(message.message_id.clone()),
        transaction_id: tx.transaction_id.clone(),
    };
    Ok(Submission {
        header,
        message,
        request,
    })
}

/// A pacs.002 reporting a payment's state (ACSC, RJCT with reason, or PDNG).
pub fn pacs002_of(view: &PaymentView, original_message_id: &str) -> Pacs002 {
    let now = now_ns();
    Pacs002 {
        message_id: format!("CH{:x}", now),
        creation: time::date_time(now),
        original_message_id: original_message_id.to_string(),
        original_message_name: PACS_008_NAME.into(),
        original_instruction_id: Some(view.instruction_id.clone()),
        original_end_to_end_id: Some(view.end_to_end_id.clone()),
        original_transaction_id: view.transaction_id.clone(),
        original_uetr: Some(view.uetr.clone()),
        status: view.status.clone(),
        reason: view.reason.clone(),
        acceptance: Some(time::date_time(view.accepted_at_ns)),
    }
}

/// A pacs.002 rejecting a message that was read but refused before it became a payment.
pub fn pacs002_refusal(message: &Pacs008, reason: &str) -> Pacs002 {
    let now = now_ns();
    let tx = &message.transactions[0];
    Pacs002 {
        message_id: format!("CH{:x}", now),
        creation: time::date_time(now),
        original_message_id: message.message_id.clone(),
        original_message_name: PACS_008_NAME.into(),
        original_instruction_id: tx.instruction_id.clone(),
        original_end_to_end_id: Some(tx.end_to_end_id.clone()),
        original_transaction_id: tx.transaction_id.clone(),
        original_uetr: tx.uetr.clone(),
        status: "RJCT".into(),
        reason: Some(reason.to_string()),
        acceptance: None,
    }
}

/// A pacs.002 answering a pacs.004: ACSC when the return settled, RJCT with a reason otherwise.
pub fn pacs002_of_return(request: &Pacs004, status: &str, reason: Option<&str>) -> Pacs002 {
    let now = now_ns();
    Pacs002 {
        message_id: format!("CH{:x}", now),
        creation: time::date_time(now),
        original_message_id: request.message_id.clone(),
        original_message_name: "pacs.004.001.09".into(),
        original_instruction_id: request.return_id.clone(),
        original_end_to_end_id: request.original_end_to_end_id.clone(),
        original_transaction_id: None,
        original_uetr: request.original_uetr.clone(),
        status: status.to_string(),
        reason: reason.map(str::to_string),
        acceptance: Some(time::date_time(now)),
    }
}
