//! Recalls: camt.056.001.08 (FI to FI payment cancellation request) and camt.029.001.09
//! (resolution of investigation), one underlying transaction each, as the switch takes them.

use crate::messages::MessageError;
use crate::xml::{self, Element, Limits};

pub const CAMT_056_NS: &str = "urn:iso:std:iso:20022:tech:xsd:camt.056.001.08";
pub const CAMT_029_NS: &str = "urn:iso:std:iso:20022:tech:xsd:camt.029.001.09";

/// What both messages carry: the assignment (who asks whom) and the case.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Assignment {
    pub id: String,
    pub assigner_bic: String,
    pub assignee_bic: String,
    pub created: String,
    pub case_id: Option<String>,
    pub case_creator_bic: Option<String>,
}

/// The original payment a recall is about.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Original {
    pub message_id: Option<String>,
    pub message_name: Option<String>,
    pub instruction_id: Option<String>,
    pub end_to_end_id: Option<String>,
    pub transaction_id: Option<String>,
    pub uetr: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Camt056 {
    pub assignment: Assignment,
    pub cancellation_id: Option<String>,
    pub original: Original,
    /// The original interbank settlement amount (decimal text) and currency.
    pub original_amount: Option<(String, String)>,
    /// ExternalCancellationReason1Code (DUPL, TECH, FRAD, CUST, AM09, ...).
    pub reason: Option<String>,
    pub additional_info: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Camt029 {
    pub assignment: Assignment,
    /// Sts/Conf: ExternalInvestigationExecutionConfirmation1Code (CNCL cancelled as requested,
    /// RJCR rejected, PDCR pending...).
    pub confirmation: String,
    pub cancellation_status_id: Option<String>,
    pub original: Original,
    /// TxCxlSts: ACCR (accepted), RJCR (rejected), PDCR (pending).
    pub status: Option<String>,
    /// ExternalPaymentCancellationRejection1Code when rejected (ARDT, NOAS, NOOR, LEGL, CUST...).
    pub reason: Option<String>,
    pub additional_info: Vec<String>,
}

fn missing(path: String) -> MessageError {
    MessageError::Missing { path }
}

fn opt(e: &Element, path: &str) -> Option<String> {
    e.text_at(path).map(str::to_string)
}

fn req(e: &Element, path: &str, at: &str) -> Result<String, MessageError> {
    opt(e, path).ok_or_else(|| missing(format!("{at}/{path}")))
}

fn read_assignment(body: &Element, at: &str, case_name: &str) -> Result<Assignment, MessageError> {
    let a = body
        .get("Assgnmt")
        .ok_or_else(|| missing(format!("{at}/Assgnmt")))?;
    let at_a = format!("{at}/Assgnmt");
    Ok(Assignment {
        id: req(a, "Id", &at_a)?,
        assigner_bic: req(a, "Assgnr/Agt/FinInstnId/BICFI", &at_a)?,
        assignee_bic: req(a, "Assgne/Agt/FinInstnId/BICFI", &at_a)?,
        created: req(a, "CreDtTm", &at_a)?,
        case_id: opt(body, &format!("{case_name}/Id")),
        case_creator_bic: opt(body, &format!("{case_name}/Cretr/Agt/FinInstnId/BICFI")),
    })
}

fn agent(ns: &str, name: &str, bic: &str) -> Element {
    Element::new(ns, name)
        .child(Element::new(ns, "Agt").child(Element::new(ns, "FinInstnId").leaf("BICFI", bic)))
}

fn assignment_element(ns: &str, a: &Assignment) -> Element {
    Element::new(ns, "Assgnmt")
        .leaf("Id", a.id.as_str())
        .child(agent(ns, "Assgnr", &a.assigner_bic))
        .child(agent(ns, "Assgne", &a.assignee_bic))
        .leaf("CreDtTm", a.created.as_str())
}

fn case_element(ns: &str, name: &str, a: &Assignment) -> Option<Element> {
    let id = a.case_id.as_deref()?;
    Some(Element::new(ns, name).leaf("Id", id).child(agent(
        ns,
        "Cretr",
        a.case_creator_bic.as_deref().unwrap_or(&a.assigner_bic),
    )))
}

fn original_group(ns: &str, o: &Original) -> Option<Element> {
    Some(
        Element::new(ns, "OrgnlGrpInf")
            .leaf("OrgnlMsgId", o.message_id.as_deref()?)
            .leaf(
                "OrgnlMsgNmId",
                o.message_name.as_deref().unwrap_or("pacs.008.001.08"),
            ),
    )
}

/// The reason block both messages share (Rsn/Cd and AddtlInf), when there is anything in it.
fn reason_element(
    ns: &str,
    name: &str,
    code: &Option<String>,
    additional_info: &[String],
) -> Option<Element> {
    if code.is_none() && additional_info.is_empty() {
        return None;
    }
    let mut reason = Element::new(ns, name);
    if let Some(code) = code {
        reason = reason.child(Element::new(ns, "Rsn").leaf("Cd", code.as_str()));
    }
    for info in additional_info {
        reason = reason.leaf("AddtlInf", info.as_str());
    }
    Some(reason)
}

/// The reason block's code and additional information, as read.
fn read_reason(tx: &Element, name: &str) -> (Option<String>, Vec<String>) {
    match tx.get(name) {
        Some(r) => (
            opt(r, "Rsn/Cd"),
            r.all("AddtlInf").map(|e| e.text.clone()).collect(),
        ),
        None => (None, Vec::new()),
    }
}

fn read_original(tx: &Element) -> Original {
    Original {
        message_id: opt(tx, "OrgnlGrpInf/OrgnlMsgId"),
        message_name: opt(tx, "OrgnlGrpInf/OrgnlMsgNmId"),
        instruction_id: opt(tx, "OrgnlInstrId"),
        end_to_end_id: opt(tx, "OrgnlEndToEndId"),
        transaction_id: opt(tx, "OrgnlTxId"),
        uetr: opt(tx, "OrgnlUETR"),
    }
}

fn only_one<'a>(parent: &'a Element, name: &'a str, at: &str) -> Result<&'a Element, MessageError> {
    let mut all = parent.all(name);
    let first = all.next().ok_or_else(|| missing(format!("{at}/{name}")))?;
    if all.next().is_some() {
        return Err(MessageError::Invalid {
            path: format!("{at}/{name}"),
            reason: format!("exactly one {name} per message"),
        });
    }
    Ok(first)
}

fn document(bytes: &[u8], limits: &Limits, ns: &str) -> Result<Element, MessageError> {
    let root = xml::parse(bytes, limits)?;
    let document = root
        .find("Document")
        .ok_or_else(|| missing(format!("/{}/Document", root.name)))?;
    if &*document.ns != ns {
        return Err(MessageError::Unsupported {
            namespace: document.ns.to_string(),
        });
    }
    Ok(document.clone())
}

impl Camt056 {
    pub fn parse(bytes: &[u8], limits: &Limits) -> Result<Camt056, MessageError> {
        let document = document(bytes, limits, CAMT_056_NS)?;
        let at = "/Document/FIToFIPmtCxlReq";
        let body = document
            .get("FIToFIPmtCxlReq")
            .ok_or_else(|| missing(at.to_string()))?;
        let assignment = read_assignment(body, at, "Case")?;
        let underlying = only_one(body, "Undrlyg", at)?;
        let tx = only_one(underlying, "TxInf", &format!("{at}/Undrlyg"))?;
        let original_amount = tx.get("OrgnlIntrBkSttlmAmt").map(|amount| {
            (
                amount.text.clone(),
                amount.attr_value("Ccy").unwrap_or_default().to_string(),
            )
        });
        let (reason, additional_info) = read_reason(tx, "CxlRsnInf");
        Ok(Camt056 {
            assignment,
            cancellation_id: opt(tx, "CxlId"),
            original: read_original(tx),
            original_amount,
            reason,
            additional_info,
        })
    }

    pub fn to_document(&self) -> Element {
        let ns = CAMT_056_NS;
        let o = &self.original;
        let mut tx = Element::new(ns, "TxInf").leaf_opt("CxlId", self.cancellation_id.as_deref());
        if let Some(group) = original_group(ns, o) {
            tx = tx.child(group);
        }
        tx = tx
            .leaf_opt("OrgnlInstrId", o.instruction_id.as_deref())
            .leaf_opt("OrgnlEndToEndId", o.end_to_end_id.as_deref())
            .leaf_opt("OrgnlTxId", o.transaction_id.as_deref())
            .leaf_opt("OrgnlUETR", o.uetr.as_deref());
        if let Some((amount, currency)) = &self.original_amount {
            tx = tx.child(
                Element::new(ns, "OrgnlIntrBkSttlmAmt")
                    .attr("Ccy", currency.as_str())
                    .with_text(amount),
            );
        }
        if let Some(reason) = reason_element(ns, "CxlRsnInf", &self.reason, &self.additional_info) {
            tx = tx.child(reason);
        }
        let mut body =
            Element::new(ns, "FIToFIPmtCxlReq").child(assignment_element(ns, &self.assignment));
        if let Some(case) = case_element(ns, "Case", &self.assignment) {
            body = body.child(case);
        }
        body = body.child(Element::new(ns, "Undrlyg").child(tx));
        Element::new(ns, "Document").child(body)
    }

    pub fn to_xml(&self) -> String {
        xml::emit(&self.to_document())
    }
}

impl Camt029 {
    pub fn parse(bytes: &[u8], limits: &Limits) -> Result<Camt029, MessageError> {
        let document = document(bytes, limits, CAMT_029_NS)?;
        let at = "/Document/RsltnOfInvstgtn";
        let body = document
            .get("RsltnOfInvstgtn")
            .ok_or_else(|| missing(at.to_string()))?;
        let assignment = read_assignment(body, at, "RslvdCase")?;
        let confirmation = req(body, "Sts/Conf", at)?;
        let details = only_one(body, "CxlDtls", at)?;
        let tx = only_one(details, "TxInfAndSts", &format!("{at}/CxlDtls"))?;
        let (reason, additional_info) = read_reason(tx, "CxlStsRsnInf");
        Ok(Camt029 {
            assignment,
            confirmation,
            cancellation_status_id: opt(tx, "CxlStsId"),
            original: read_original(tx),
            status: opt(tx, "TxCxlSts"),
            reason,
            additional_info,
        })
    }

    pub fn to_document(&self) -> Element {
        let ns = CAMT_029_NS;
        let o = &self.original;
        let mut tx = Element::new(ns, "TxInfAndSts")
            .leaf_opt("CxlStsId", self.cancellation_status_id.as_deref());
        if let Some(group) = original_group(ns, o) {
            tx = tx.child(group);
        }
        // Note the schema's order here: OrgnlTxId, (OrgnlClrSysRef), then OrgnlUETR.
        tx = tx
            .leaf_opt("OrgnlInstrId", o.instruction_id.as_deref())
            .leaf_opt("OrgnlEndToEndId", o.end_to_end_id.as_deref())
            .leaf_opt("OrgnlTxId", o.transaction_id.as_deref())
            .leaf_opt("OrgnlUETR", o.uetr.as_deref())
            .leaf_opt("TxCxlSts", self.status.as_deref());
        if let Some(reason) =
            reason_element(ns, "CxlStsRsnInf", &self.reason, &self.additional_info)
        {
            tx = tx.child(reason);
        }
        let mut body =
            Element::new(ns, "RsltnOfInvstgtn").child(assignment_element(ns, &self.assignment));
        if let Some(case) = case_element(ns, "RslvdCase", &self.assignment) {
            body = body.child(case);
        }
        body = body
            .child(Element::new(ns, "Sts").leaf("Conf", self.confirmation.as_str()))
            .child(Element::new(ns, "CxlDtls").child(tx));
        Element::new(ns, "Document").child(body)
    }

    pub fn to_xml(&self) -> String {
        xml::emit(&self.to_document())
    }
}
