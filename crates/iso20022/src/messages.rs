//! Typed pacs.008.001.08 and pacs.002.001.10: read from and written to element trees, in schema
//! order, only the elements present.

use crate::xml::{self, Element, Limits, XmlError};

pub const PACS_008_NS: &str = "urn:iso:std:iso:20022:tech:xsd:pacs.008.001.08";
pub const PACS_002_NS: &str = "urn:iso:std:iso:20022:tech:xsd:pacs.002.001.10";
pub const PACS_028_NS: &str = "urn:iso:std:iso:20022:tech:xsd:pacs.028.001.03";
pub const PACS_004_NS: &str = "urn:iso:std:iso:20022:tech:xsd:pacs.004.001.09";
pub const HEAD_001_NS: &str = "urn:iso:std:iso:20022:tech:xsd:head.001.001.02";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    #[error("XML: {0}")]
    Xml(#[from] XmlError),
    #[error("{path}: required element missing")]
    Missing { path: String },
    #[error("{path}: {reason}")]
    Invalid { path: String, reason: String },
    #[error("unsupported message {namespace:?} (supported: pacs.008.001.08, pacs.002.001.10, pacs.004.001.09, pacs.028.001.03)")]
    Unsupported { namespace: String },
}

/// A financial institution: BIC, and/or a clearing-system member id (e.g. a US routing number
/// with clearing system USABA).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Agent {
    pub bic: Option<String>,
    pub clearing_system: Option<String>,
    pub member_id: Option<String>,
}

/// An account: IBAN, or another identifier.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Account {
    pub iban: Option<String>,
    pub other_id: Option<String>,
}

/// One CdtTrfTxInf.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CreditTransfer {
    pub instruction_id: Option<String>,
    pub end_to_end_id: String,
    pub transaction_id: Option<String>,
    pub uetr: Option<String>,
    /// The decimal text as sent (the switch converts it to minor units and checks decimals).
    pub amount: String,
    pub currency: String,
    pub settlement_date: Option<String>,
    pub charge_bearer: String,
    pub instructing_agent: Option<Agent>,
    pub instructed_agent: Option<Agent>,
    pub debtor_name: Option<String>,
    pub debtor_account: Option<Account>,
    pub debtor_agent: Agent,
    pub creditor_agent: Agent,
    pub creditor_name: Option<String>,
    pub creditor_account: Option<Account>,
    pub remittance_unstructured: Vec<String>,
}

/// FIToFICstmrCdtTrf.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pacs008 {
    pub message_id: String,
    pub creation: String,
    pub number_of_transactions: String,
    pub settlement_method: String,
    pub clearing_system: Option<String>,
    pub transactions: Vec<CreditTransfer>,
}

/// FIToFIPmtStsRpt with one TxInfAndSts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pacs002 {
    pub message_id: String,
    pub creation: String,
    pub original_message_id: String,
    pub original_message_name: String,
    pub original_instruction_id: Option<String>,
    pub original_end_to_end_id: Option<String>,
    pub original_transaction_id: Option<String>,
    pub original_uetr: Option<String>,
    /// ExternalPaymentTransactionStatus1Code: ACSC, RJCT, PDNG, ACCP, ...
    pub status: String,
    pub reason: Option<String>,
    pub acceptance: Option<String>,
}

/// FIToFIPmtStsReq with one TxInf: "what became of this payment?"
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pacs028 {
    pub message_id: String,
    pub creation: String,
    pub status_request_id: Option<String>,
    pub original_message_id: Option<String>,
    pub original_message_name: Option<String>,
    pub original_instruction_id: Option<String>,
    pub original_end_to_end_id: Option<String>,
    pub original_transaction_id: Option<String>,
    pub original_uetr: Option<String>,
}

/// PmtRtr with one TxInf: money of a settled payment sent back.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pacs004 {
    pub message_id: String,
    pub creation: String,
    pub settlement_method: String,
    pub return_id: Option<String>,
    pub original_message_id: Option<String>,
    pub original_message_name: Option<String>,
    pub original_instruction_id: Option<String>,
    pub original_end_to_end_id: Option<String>,
    pub original_transaction_id: Option<String>,
    pub original_uetr: Option<String>,
    /// Decimal text, as sent.
    pub returned_amount: String,
    pub currency: String,
    pub settlement_date: Option<String>,
    pub charge_bearer: Option<String>,
    /// ExternalReturnReason1Code.
    pub reason: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    Pacs004(Pacs004),
    Pacs008(Pacs008),
    Pacs002(Pacs002),
    Pacs028(Pacs028),
}

impl Message {
    /// Parses a message: a bare Document, or a Document with its business application header
    /// inside any envelope; the Document's namespace selects the message and version.
    pub fn parse(bytes: &[u8], limits: &Limits) -> Result<Message, MessageError> {
        let root = xml::parse(bytes, limits)?;
        let document = root.find("Document").ok_or_else(|| MessageError::Missing {
            path: format!("/{}/Document", root.name),
        })?;
        Message::from_document(document)
    }
}

/// The business application header (head.001.001.02) that may travel with a message.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AppHeader {
    pub from: Agent,
    pub to: Agent,
    pub business_message_id: String,
    /// The message it heads, e.g. "pacs.008.001.08".
    pub message_definition: String,
    pub business_service: Option<String>,
    pub created: String,
}

/// The namespace of the envelope clearhouse writes around a header and a document (ISO 20022
/// leaves the envelope to the network; SWIFT and FedNow each have their own).
pub const ENVELOPE_NS: &str = "urn:clearhouse:xsd:envelope:1";

impl AppHeader {
    pub fn from_element(element: &Element) -> Result<AppHeader, MessageError> {
        if &*element.ns != HEAD_001_NS {
            return Err(MessageError::Unsupported {
                namespace: element.ns.to_string(),
            });
        }
        let r = Reader::new(element, "/AppHdr".into());
        Ok(AppHeader {
            from: agent(&r.req_sub("Fr/FIId")?)?,
            to: agent(&r.req_sub("To/FIId")?)?,
            business_message_id: r.req("BizMsgIdr")?,
            message_definition: r.req("MsgDefIdr")?,
            business_service: r.opt("BizSvc"),
            created: r.req("CreDt")?,
        })
    }

    /// The AppHdr element, in schema order.
    pub fn to_element(&self) -> Element {
        let ns = HEAD_001_NS;
        let party = |name: &str, a: &Agent| {
            let fi = agent_element(ns, "FIId", a);
            Element::new(ns, name).child(fi)
        };
        Element::new(ns, "AppHdr")
            .child(party("Fr", &self.from))
            .child(party("To", &self.to))
            .leaf("BizMsgIdr", self.business_message_id.as_str())
            .leaf("MsgDefIdr", self.message_definition.as_str())
            .leaf_opt("BizSvc", self.business_service.as_deref())
            .leaf("CreDt", self.created.as_str())
    }
}

/// A header and a document in clearhouse's envelope.
pub fn envelope_xml(header: &AppHeader, document: Element) -> String {
    xml::emit(
        &Element::new(ENVELOPE_NS, "Envelope")
            .child(header.to_element())
            .child(document),
    )
}

impl Message {
    /// Like [`Message::parse`], also returning the business application header when one travels
    /// with the document (anywhere in the envelope).
    pub fn parse_with_header(
        bytes: &[u8],
        limits: &Limits,
    ) -> Result<(Option<AppHeader>, Message), MessageError> {
        let root = xml::parse(bytes, limits)?;
        let header = root
            .find("AppHdr")
            .map(AppHeader::from_element)
            .transpose()?;
        let document = root.find("Document").ok_or_else(|| MessageError::Missing {
            path: format!("/{}/Document", root.name),
        })?;
        Ok((header, Message::from_document(document)?))
    }

    /// The typed message of a Document element, chosen by its namespace.
    pub fn from_document(document: &Element) -> Result<Message, MessageError> {
        match &*document.ns {
            PACS_008_NS => Ok(Message::Pacs008(Pacs008::from_document(document)?)),
            PACS_002_NS => Ok(Message::Pacs002(Pacs002::from_document(document)?)),
            PACS_028_NS => Ok(Message::Pacs028(Pacs028::from_document(document)?)),
            PACS_004_NS => Ok(Message::Pacs004(Pacs004::from_document(document)?)),
            other => Err(MessageError::Unsupported {
                namespace: other.to_string(),
            }),
        }
    }
}

/// Reads children of one element, naming missing ones by their path.
struct Reader<'a> {
    element: &'a Element,
    path: String,
}

impl<'a> Reader<'a> {
    fn new(element: &'a Element, path: String) -> Reader<'a> {
        Reader { element, path }
    }
    fn opt(&self, path: &str) -> Option<String> {
        self.element.text_at(path).map(str::to_string)
    }
    fn req(&self, path: &str) -> Result<String, MessageError> {
        self.opt(path).ok_or_else(|| self.missing(path))
    }
    fn missing(&self, path: &str) -> MessageError {
        MessageError::Missing {
            path: format!("{}/{path}", self.path),
        }
    }
    fn sub(&self, path: &str) -> Option<Reader<'a>> {
        self.element
            .at(path)
            .map(|e| Reader::new(e, format!("{}/{path}", self.path)))
    }
    /// The one child named `name` (the scheme takes one transaction per message).
    fn only(&self, name: &str) -> Result<Reader<'a>, MessageError> {
        if self.element.all(name).count() > 1 {
            return Err(MessageError::Invalid {
                path: format!("{}/{name}", self.path),
                reason: format!("exactly one {name} per message"),
            });
        }
        self.req_sub(name)
    }

    fn req_sub(&self, path: &str) -> Result<Reader<'a>, MessageError> {
        self.sub(path).ok_or_else(|| self.missing(path))
    }
}

fn agent(r: &Reader<'_>) -> Result<Agent, MessageError> {
    let fin = r.req_sub("FinInstnId")?;
    let agent = Agent {
        bic: fin.opt("BICFI"),
        clearing_system: fin.opt("ClrSysMmbId/ClrSysId/Cd"),
        member_id: fin.opt("ClrSysMmbId/MmbId"),
    };
    if agent.bic.is_none() && agent.member_id.is_none() {
        return Err(MessageError::Invalid {
            path: fin.path,
            reason: "an agent needs BICFI or ClrSysMmbId/MmbId".into(),
        });
    }
    Ok(agent)
}

fn account(r: &Reader<'_>) -> Account {
    Account {
        iban: r.opt("Id/IBAN"),
        other_id: r.opt("Id/Othr/Id"),
    }
}

/// OrgnlGrpInf: the message a report, request or return refers to.
fn original_group(ns: &str, message_id: &str, message_name: &str) -> Element {
    Element::new(ns, "OrgnlGrpInf")
        .leaf("OrgnlMsgId", message_id)
        .leaf("OrgnlMsgNmId", message_name)
}

fn agent_element(ns: &str, name: &str, agent: &Agent) -> Element {
    let mut fin = Element::new(ns, "FinInstnId").leaf_opt("BICFI", agent.bic.as_deref());
    if let Some(member) = &agent.member_id {
        let mut clr = Element::new(ns, "ClrSysMmbId");
        if let Some(system) = &agent.clearing_system {
            clr = clr.child(Element::new(ns, "ClrSysId").leaf("Cd", system.as_str()));
        }
        fin = fin.child(clr.leaf("MmbId", member.as_str()));
    }
    Element::new(ns, name).child(fin)
}

fn account_element(ns: &str, name: &str, account: &Account) -> Element {
    let mut id = Element::new(ns, "Id");
    if let Some(iban) = &account.iban {
        id = id.leaf("IBAN", iban.as_str());
    } else if let Some(other) = &account.other_id {
        id = id.child(Element::new(ns, "Othr").leaf("Id", other.as_str()));
    }
    Element::new(ns, name).child(id)
}

impl Pacs008 {
    pub fn from_document(document: &Element) -> Result<Pacs008, MessageError> {
        let doc = Reader::new(document, "/Document".into());
        let body = doc.req_sub("FIToFICstmrCdtTrf")?;
        let header = body.req_sub("GrpHdr")?;
        let mut transactions = Vec::new();
        for (index, tx) in body.element.all("CdtTrfTxInf").enumerate() {
            let r = Reader::new(tx, format!("{}/CdtTrfTxInf[{}]", body.path, index + 1));
            let amount = r
                .element
                .get("IntrBkSttlmAmt")
                .ok_or_else(|| r.missing("IntrBkSttlmAmt"))?;
            transactions.push(CreditTransfer {
                instruction_id: r.opt("PmtId/InstrId"),
                end_to_end_id: r.req("PmtId/EndToEndId")?,
                transaction_id: r.opt("PmtId/TxId"),
                uetr: r.opt("PmtId/UETR"),
                amount: amount.text.clone(),
                currency: amount
                    .attr_value("Ccy")
                    .ok_or_else(|| r.missing("IntrBkSttlmAmt/@Ccy"))?
                    .to_string(),
                settlement_date: r.opt("IntrBkSttlmDt"),
                charge_bearer: r.req("ChrgBr")?,
                instructing_agent: r.sub("InstgAgt").map(|a| agent(&a)).transpose()?,
                instructed_agent: r.sub("InstdAgt").map(|a| agent(&a)).transpose()?,
                debtor_name: r.opt("Dbtr/Nm"),
                debtor_account: r.sub("DbtrAcct").map(|a| account(&a)),
                debtor_agent: agent(&r.req_sub("DbtrAgt")?)?,
                creditor_agent: agent(&r.req_sub("CdtrAgt")?)?,
                creditor_name: r.opt("Cdtr/Nm"),
                creditor_account: r.sub("CdtrAcct").map(|a| account(&a)),
                remittance_unstructured: r
                    .element
                    .get("RmtInf")
                    .map(|rmt| rmt.all("Ustrd").map(|u| u.text.clone()).collect())
                    .unwrap_or_default(),
            });
        }
        if transactions.is_empty() {
            return Err(body.missing("CdtTrfTxInf"));
        }
        Ok(Pacs008 {
            message_id: header.req("MsgId")?,
            creation: header.req("CreDtTm")?,
            number_of_transactions: header.req("NbOfTxs")?,
            settlement_method: header.req("SttlmInf/SttlmMtd")?,
            clearing_system: header.opt("SttlmInf/ClrSys/Cd"),
            transactions,
        })
    }

    /// The Document element, in schema order.
    pub fn to_document(&self) -> Element {
        let ns = PACS_008_NS;
        let mut settlement =
            Element::new(ns, "SttlmInf").leaf("SttlmMtd", self.settlement_method.as_str());
        if let Some(system) = &self.clearing_system {
            settlement = settlement.child(Element::new(ns, "ClrSys").leaf("Cd", system.as_str()));
        }
        let header = Element::new(ns, "GrpHdr")
            .leaf("MsgId", self.message_id.as_str())
            .leaf("CreDtTm", self.creation.as_str())
            .leaf("NbOfTxs", self.number_of_transactions.as_str())
            .child(settlement);
        let mut body = Element::new(ns, "FIToFICstmrCdtTrf").child(header);
        for tx in &self.transactions {
            let pmt_id = Element::new(ns, "PmtId")
                .leaf_opt("InstrId", tx.instruction_id.as_deref())
                .leaf("EndToEndId", tx.end_to_end_id.as_str())
                .leaf_opt("TxId", tx.transaction_id.as_deref())
                .leaf_opt("UETR", tx.uetr.as_deref());
            let mut amount = Element::new(ns, "IntrBkSttlmAmt").attr("Ccy", tx.currency.as_str());
            amount.text = tx.amount.clone();
            let mut e = Element::new(ns, "CdtTrfTxInf")
                .child(pmt_id)
                .child(amount)
                .leaf_opt("IntrBkSttlmDt", tx.settlement_date.as_deref())
                .leaf("ChrgBr", tx.charge_bearer.as_str());
            if let Some(a) = &tx.instructing_agent {
                e = e.child(agent_element(ns, "InstgAgt", a));
            }
            if let Some(a) = &tx.instructed_agent {
                e = e.child(agent_element(ns, "InstdAgt", a));
            }
            e = e.child(Element::new(ns, "Dbtr").leaf_opt("Nm", tx.debtor_name.as_deref()));
            if let Some(a) = &tx.debtor_account {
                e = e.child(account_element(ns, "DbtrAcct", a));
            }
            e = e
                .child(agent_element(ns, "DbtrAgt", &tx.debtor_agent))
                .child(agent_element(ns, "CdtrAgt", &tx.creditor_agent))
                .child(Element::new(ns, "Cdtr").leaf_opt("Nm", tx.creditor_name.as_deref()));
            if let Some(a) = &tx.creditor_account {
                e = e.child(account_element(ns, "CdtrAcct", a));
            }
            if !tx.remittance_unstructured.is_empty() {
                let mut rmt = Element::new(ns, "RmtInf");
                for line in &tx.remittance_unstructured {
                    rmt = rmt.leaf("Ustrd", line.as_str());
                }
                e = e.child(rmt);
            }
            body = body.child(e);
        }
        Element::new(ns, "Document").child(body)
    }

    pub fn to_xml(&self) -> String {
        xml::emit(&self.to_document())
    }
}

impl Pacs002 {
    pub fn from_document(document: &Element) -> Result<Pacs002, MessageError> {
        let doc = Reader::new(document, "/Document".into());
        let body = doc.req_sub("FIToFIPmtStsRpt")?;
        let header = body.req_sub("GrpHdr")?;
        let tx = body.req_sub("TxInfAndSts")?;
        Ok(Pacs002 {
            message_id: header.req("MsgId")?,
            creation: header.req("CreDtTm")?,
            original_message_id: tx.req("OrgnlGrpInf/OrgnlMsgId")?,
            original_message_name: tx.req("OrgnlGrpInf/OrgnlMsgNmId")?,
            original_instruction_id: tx.opt("OrgnlInstrId"),
            original_end_to_end_id: tx.opt("OrgnlEndToEndId"),
            original_transaction_id: tx.opt("OrgnlTxId"),
            original_uetr: tx.opt("OrgnlUETR"),
            status: tx.req("TxSts")?,
            reason: tx.opt("StsRsnInf/Rsn/Cd"),
            acceptance: tx.opt("AccptncDtTm"),
        })
    }

    /// The Document element, in schema order.
    pub fn to_document(&self) -> Element {
        let ns = PACS_002_NS;
        let header = Element::new(ns, "GrpHdr")
            .leaf("MsgId", self.message_id.as_str())
            .leaf("CreDtTm", self.creation.as_str());
        let original = original_group(ns, &self.original_message_id, &self.original_message_name);
        let mut tx = Element::new(ns, "TxInfAndSts")
            .child(original)
            .leaf_opt("OrgnlInstrId", self.original_instruction_id.as_deref())
            .leaf_opt("OrgnlEndToEndId", self.original_end_to_end_id.as_deref())
            .leaf_opt("OrgnlTxId", self.original_transaction_id.as_deref())
            .leaf_opt("OrgnlUETR", self.original_uetr.as_deref())
            .leaf("TxSts", self.status.as_str());
        if let Some(reason) = &self.reason {
            tx = tx.child(
                Element::new(ns, "StsRsnInf")
                    .child(Element::new(ns, "Rsn").leaf("Cd", reason.as_str())),
            );
        }
        tx = tx.leaf_opt("AccptncDtTm", self.acceptance.as_deref());
        Element::new(ns, "Document")
            .child(Element::new(ns, "FIToFIPmtStsRpt").child(header).child(tx))
    }

    pub fn to_xml(&self) -> String {
        xml::emit(&self.to_document())
    }
}

impl Pacs028 {
    pub fn from_document(document: &Element) -> Result<Pacs028, MessageError> {
        let doc = Reader::new(document, "/Document".into());
        let body = doc.req_sub("FIToFIPmtStsReq")?;
        let header = body.req_sub("GrpHdr")?;
        let tx = body.only("TxInf")?;
        Ok(Pacs028 {
            message_id: header.req("MsgId")?,
            creation: header.req("CreDtTm")?,
            status_request_id: tx.opt("StsReqId"),
            original_message_id: tx.opt("OrgnlGrpInf/OrgnlMsgId"),
            original_message_name: tx.opt("OrgnlGrpInf/OrgnlMsgNmId"),
            original_instruction_id: tx.opt("OrgnlInstrId"),
            original_end_to_end_id: tx.opt("OrgnlEndToEndId"),
            original_transaction_id: tx.opt("OrgnlTxId"),
            original_uetr: tx.opt("OrgnlUETR"),
        })
    }

    /// The Document element, in schema order.
    pub fn to_document(&self) -> Element {
        let ns = PACS_028_NS;
        let header = Element::new(ns, "GrpHdr")
            .leaf("MsgId", self.message_id.as_str())
            .leaf("CreDtTm", self.creation.as_str());
        let mut tx =
            Element::new(ns, "TxInf").leaf_opt("StsReqId", self.status_request_id.as_deref());
        if let (Some(id), Some(name)) = (&self.original_message_id, &self.original_message_name) {
            tx = tx.child(original_group(ns, id, name));
        }
        tx = tx
            .leaf_opt("OrgnlInstrId", self.original_instruction_id.as_deref())
            .leaf_opt("OrgnlEndToEndId", self.original_end_to_end_id.as_deref())
            .leaf_opt("OrgnlTxId", self.original_transaction_id.as_deref())
            .leaf_opt("OrgnlUETR", self.original_uetr.as_deref());
        Element::new(ns, "Document")
            .child(Element::new(ns, "FIToFIPmtStsReq").child(header).child(tx))
    }

    pub fn to_xml(&self) -> String {
        xml::emit(&self.to_document())
    }
}

impl Pacs004 {
    pub fn from_document(document: &Element) -> Result<Pacs004, MessageError> {
        let doc = Reader::new(document, "/Document".into());
        let body = doc.req_sub("PmtRtr")?;
        let header = body.req_sub("GrpHdr")?;
        let tx = body.only("TxInf")?;
        let amount = tx
            .element
            .get("RtrdIntrBkSttlmAmt")
            .ok_or_else(|| tx.missing("RtrdIntrBkSttlmAmt"))?;
        Ok(Pacs004 {
            message_id: header.req("MsgId")?,
            creation: header.req("CreDtTm")?,
            settlement_method: header.req("SttlmInf/SttlmMtd")?,
            return_id: tx.opt("RtrId"),
            original_message_id: tx.opt("OrgnlGrpInf/OrgnlMsgId"),
            original_message_name: tx.opt("OrgnlGrpInf/OrgnlMsgNmId"),
            original_instruction_id: tx.opt("OrgnlInstrId"),
            original_end_to_end_id: tx.opt("OrgnlEndToEndId"),
            original_transaction_id: tx.opt("OrgnlTxId"),
            original_uetr: tx.opt("OrgnlUETR"),
            returned_amount: amount.text.clone(),
            currency: amount
                .attr_value("Ccy")
                .ok_or_else(|| tx.missing("RtrdIntrBkSttlmAmt/@Ccy"))?
                .to_string(),
            settlement_date: tx.opt("IntrBkSttlmDt"),
            charge_bearer: tx.opt("ChrgBr"),
            reason: tx.opt("RtrRsnInf/Rsn/Cd"),
        })
    }

    /// The Document element, in schema order.
    pub fn to_document(&self) -> Element {
        let ns = PACS_004_NS;
        let header = Element::new(ns, "GrpHdr")
            .leaf("MsgId", self.message_id.as_str())
            .leaf("CreDtTm", self.creation.as_str())
            .leaf("NbOfTxs", "1")
            .child(Element::new(ns, "SttlmInf").leaf("SttlmMtd", self.settlement_method.as_str()));
        let mut tx = Element::new(ns, "TxInf").leaf_opt("RtrId", self.return_id.as_deref());
        if let (Some(id), Some(name)) = (&self.original_message_id, &self.original_message_name) {
            tx = tx.child(original_group(ns, id, name));
        }
        let mut amount = Element::new(ns, "RtrdIntrBkSttlmAmt").attr("Ccy", self.currency.as_str());
        amount.text = self.returned_amount.clone();
        tx = tx
            .leaf_opt("OrgnlInstrId", self.original_instruction_id.as_deref())
            .leaf_opt("OrgnlEndToEndId", self.original_end_to_end_id.as_deref())
            .leaf_opt("OrgnlTxId", self.original_transaction_id.as_deref())
            .leaf_opt("OrgnlUETR", self.original_uetr.as_deref())
            .child(amount)
            .leaf_opt("IntrBkSttlmDt", self.settlement_date.as_deref())
            .leaf_opt("ChrgBr", self.charge_bearer.as_deref());
        if let Some(reason) = &self.reason {
            tx = tx.child(
                Element::new(ns, "RtrRsnInf")
                    .child(Element::new(ns, "Rsn").leaf("Cd", reason.as_str())),
            );
        }
        Element::new(ns, "Document").child(Element::new(ns, "PmtRtr").child(header).child(tx))
    }

    pub fn to_xml(&self) -> String {
        xml::emit(&self.to_document())
    }
}
