//! Cash management reports: camt.053.001.08 (bank to customer statement) and camt.054.001.08
//! (bank to customer debit/credit notification), read and written with the entries a clearing
//! house reconciles on: amount, direction, status, references (end-to-end id, UETR, instruction
//! id), counterparty agents.
//!
//! Both messages carry the same account report: a statement (`Stmt`, with balances) or a
//! notification (`Ntfctn`, without). One model, [`AccountReport`], serves both.

use crate::messages::MessageError;
use crate::xml::{self, Element, Limits};

pub const CAMT_053_NS: &str = "urn:iso:std:iso:20022:tech:xsd:camt.053.001.08";
pub const CAMT_054_NS: &str = "urn:iso:std:iso:20022:tech:xsd:camt.054.001.08";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReportKind {
    /// camt.053: a statement, with opening and closing balances.
    Statement,
    /// camt.054: a debit/credit notification.
    Notification,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Balance {
    /// ExternalBalanceType1Code, e.g. OPBD (opening booked), CLBD (closing booked).
    pub code: String,
    /// Decimal text, as in the message.
    pub amount: String,
    pub currency: String,
    pub credit: bool,
    /// ISO date (YYYY-MM-DD).
    pub date: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Entry {
    pub amount: String,
    pub currency: String,
    /// CRDT (true) or DBIT.
    pub credit: bool,
    /// ExternalEntryStatus1Code: BOOK, PDNG, INFO...
    pub status: String,
    pub booking_date: Option<String>,
    pub account_servicer_reference: Option<String>,
    /// Bank transaction code: domain, family, sub-family (e.g. PMNT / RCDT / DMCT).
    pub bank_transaction_code: Option<(String, String, String)>,
    pub instruction_id: Option<String>,
    pub end_to_end_id: Option<String>,
    pub uetr: Option<String>,
    pub debtor_agent: Option<String>,
    pub creditor_agent: Option<String>,
    pub additional_info: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccountReport {
    pub id: String,
    pub created: Option<String>,
    /// The account: IBAN, or another identifier (Othr/Id).
    pub account_iban: Option<String>,
    pub account_other: Option<String>,
    pub account_currency: Option<String>,
    pub balances: Vec<Balance>,
    pub entries: Vec<Entry>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CashReport {
    pub kind: ReportKind,
    pub message_id: String,
    pub created: String,
    pub reports: Vec<AccountReport>,
}

fn missing(path: &str) -> MessageError {
    MessageError::Missing {
        path: path.to_string(),
    }
}

fn invalid(path: &str, reason: impl Into<String>) -> MessageError {
    MessageError::Invalid {
        path: path.to_string(),
        reason: reason.into(),
    }
}

fn text(e: &Element, path: &str, at: &str) -> Result<String, MessageError> {
    e.text_at(path)
        .map(str::to_string)
        .ok_or_else(|| missing(&format!("{at}/{path}")))
}

fn opt(e: &Element, path: &str) -> Option<String> {
    e.text_at(path).map(str::to_string)
}

fn credit_debit(e: &Element, at: &str) -> Result<bool, MessageError> {
    match e.text_at("CdtDbtInd") {
        Some("CRDT") => Ok(true),
        Some("DBIT") => Ok(false),
        Some(other) => Err(invalid(
            &format!("{at}/CdtDbtInd"),
            format!("{other:?} is neither CRDT nor DBIT"),
        )),
        None => Err(missing(&format!("{at}/CdtDbtInd"))),
    }
}

fn amount(e: &Element, at: &str) -> Result<(String, String), MessageError> {
    let amt = e.get("Amt").ok_or_else(|| missing(&format!("{at}/Amt")))?;
    let currency = amt
        .attr_value("Ccy")
        .ok_or_else(|| missing(&format!("{at}/Amt/@Ccy")))?;
    Ok((amt.text.clone(), currency.to_string()))
}

/// The XSD's UUIDv4Identifier: lowercase hex, version 4, variant 8-b.
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

fn agent_bic(e: &Element, path: &str) -> Option<String> {
    e.text_at(&format!("{path}/FinInstnId/BICFI"))
        .map(str::to_string)
}

impl CashReport {
    /// Parses a camt.053.001.08 or camt.054.001.08 (bare Document or inside an envelope); the
    /// namespace selects which.
    pub fn parse(bytes: &[u8], limits: &Limits) -> Result<CashReport, MessageError> {
        let root = xml::parse(bytes, limits)?;
        let document = root
            .find("Document")
            .ok_or_else(|| missing(&format!("/{}/Document", root.name)))?;
        CashReport::from_document(document)
    }

    pub fn from_document(document: &Element) -> Result<CashReport, MessageError> {
        let (kind, body_name, report_name) = match &*document.ns {
            CAMT_053_NS => (ReportKind::Statement, "BkToCstmrStmt", "Stmt"),
            CAMT_054_NS => (ReportKind::Notification, "BkToCstmrDbtCdtNtfctn", "Ntfctn"),
            other => {
                return Err(MessageError::Unsupported {
                    namespace: other.to_string(),
                })
            }
        };
        let at = format!("/Document/{body_name}");
        let body = document.get(body_name).ok_or_else(|| missing(&at))?;
        let message_id = text(body, "GrpHdr/MsgId", &at)?;
        let created = text(body, "GrpHdr/CreDtTm", &at)?;
        let mut reports = Vec::new();
        for (i, report) in body.all(report_name).enumerate() {
            let at = format!("{at}/{report_name}[{}]", i + 1);
            let mut balances = Vec::new();
            for (j, balance) in report.all("Bal").enumerate() {
                let at = format!("{at}/Bal[{}]", j + 1);
                let (amount, currency) = amount(balance, &at)?;
                balances.push(Balance {
                    code: opt(balance, "Tp/CdOrPrtry/Cd")
                        .or_else(|| opt(balance, "Tp/CdOrPrtry/Prtry"))
                        .ok_or_else(|| missing(&format!("{at}/Tp/CdOrPrtry")))?,
                    amount,
                    currency,
                    credit: credit_debit(balance, &at)?,
                    date: opt(balance, "Dt/Dt")
                        .or_else(|| opt(balance, "Dt/DtTm"))
                        .ok_or_else(|| missing(&format!("{at}/Dt")))?,
                });
            }
            if kind == ReportKind::Statement && balances.is_empty() {
                return Err(missing(&format!("{at}/Bal")));
            }
            let mut entries = Vec::new();
            for (j, entry) in report.all("Ntry").enumerate() {
                let at = format!("{at}/Ntry[{}]", j + 1);
                let (amount, currency) = amount(entry, &at)?;
                let tx = entry.at("NtryDtls/TxDtls");
                let refs = |name: &str| tx.and_then(|tx| opt(tx, &format!("Refs/{name}")));
                if let Some(uetr) = refs("UETR") {
                    if !is_uetr(&uetr) {
                        return Err(invalid(
                            &format!("{at}/NtryDtls/TxDtls/Refs/UETR"),
                            format!("{uetr:?} is not a lowercase UUID version 4 (the schema's UUIDv4Identifier)"),
                        ));
                    }
                }
                entries.push(Entry {
                    amount,
                    currency,
                    credit: credit_debit(entry, &at)?,
                    status: opt(entry, "Sts/Cd")
                        .or_else(|| opt(entry, "Sts/Prtry"))
                        .ok_or_else(|| missing(&format!("{at}/Sts")))?,
                    booking_date: opt(entry, "BookgDt/Dt").or_else(|| opt(entry, "BookgDt/DtTm")),
                    account_servicer_reference: opt(entry, "AcctSvcrRef"),
                    bank_transaction_code: match (
                        opt(entry, "BkTxCd/Domn/Cd"),
                        opt(entry, "BkTxCd/Domn/Fmly/Cd"),
                        opt(entry, "BkTxCd/Domn/Fmly/SubFmlyCd"),
                    ) {
                        (Some(d), Some(f), Some(s)) => Some((d, f, s)),
                        _ => None,
                    },
                    instruction_id: refs("InstrId"),
                    end_to_end_id: refs("EndToEndId"),
                    uetr: refs("UETR"),
                    debtor_agent: tx.and_then(|tx| agent_bic(tx, "RltdAgts/DbtrAgt")),
                    creditor_agent: tx.and_then(|tx| agent_bic(tx, "RltdAgts/CdtrAgt")),
                    additional_info: opt(entry, "AddtlNtryInf"),
                });
            }
            let account_iban = opt(report, "Acct/Id/IBAN");
            let account_other = opt(report, "Acct/Id/Othr/Id");
            if account_iban.is_none() && account_other.is_none() {
                // Found by fuzzing: the account's identification is mandatory (IBAN or Othr/Id).
                return Err(missing(&format!("{at}/Acct/Id (IBAN or Othr/Id)")));
            }
            reports.push(AccountReport {
                id: text(report, "Id", &at)?,
                created: opt(report, "CreDtTm"),
                account_iban,
                account_other,
                account_currency: opt(report, "Acct/Ccy"),
                balances,
                entries,
            });
        }
        if reports.is_empty() {
            return Err(missing(&format!("{at}/{report_name}")));
        }
        Ok(CashReport {
            kind,
            message_id,
            created,
            reports,
        })
    }

    /// The Document, in schema order, only the elements present.
    pub fn to_document(&self) -> Element {
        let (ns, body_name, report_name) = match self.kind {
            ReportKind::Statement => (CAMT_053_NS, "BkToCstmrStmt", "Stmt"),
            ReportKind::Notification => (CAMT_054_NS, "BkToCstmrDbtCdtNtfctn", "Ntfctn"),
        };
        let mut body = Element::new(ns, body_name).child(
            Element::new(ns, "GrpHdr")
                .leaf("MsgId", self.message_id.as_str())
                .leaf("CreDtTm", self.created.as_str()),
        );
        for report in &self.reports {
            let mut id = Element::new(ns, "Id");
            if let Some(iban) = &report.account_iban {
                id = id.leaf("IBAN", iban.as_str());
            } else {
                id = id.child(
                    Element::new(ns, "Othr")
                        .leaf("Id", report.account_other.as_deref().unwrap_or("")),
                );
            }
            let mut element = Element::new(ns, report_name)
                .leaf("Id", report.id.as_str())
                .leaf_opt("CreDtTm", report.created.as_deref())
                .child(
                    Element::new(ns, "Acct")
                        .child(id)
                        .leaf_opt("Ccy", report.account_currency.as_deref()),
                );
            if self.kind == ReportKind::Statement {
                for balance in &report.balances {
                    element = element.child(
                        Element::new(ns, "Bal")
                            .child(Element::new(ns, "Tp").child(
                                Element::new(ns, "CdOrPrtry").leaf("Cd", balance.code.as_str()),
                            ))
                            .child(
                                Element::new(ns, "Amt")
                                    .attr("Ccy", balance.currency.as_str())
                                    .with_text(&balance.amount),
                            )
                            .leaf("CdtDbtInd", if balance.credit { "CRDT" } else { "DBIT" })
                            .child(Element::new(ns, "Dt").leaf("Dt", balance.date.as_str())),
                    );
                }
            }
            for entry in &report.entries {
                let mut bank_code = Element::new(ns, "BkTxCd");
                if let Some((domain, family, sub)) = &entry.bank_transaction_code {
                    bank_code = bank_code.child(
                        Element::new(ns, "Domn").leaf("Cd", domain.as_str()).child(
                            Element::new(ns, "Fmly")
                                .leaf("Cd", family.as_str())
                                .leaf("SubFmlyCd", sub.as_str()),
                        ),
                    );
                }
                let mut ntry = Element::new(ns, "Ntry")
                    .child(
                        Element::new(ns, "Amt")
                            .attr("Ccy", entry.currency.as_str())
                            .with_text(&entry.amount),
                    )
                    .leaf("CdtDbtInd", if entry.credit { "CRDT" } else { "DBIT" })
                    .child(Element::new(ns, "Sts").leaf("Cd", entry.status.as_str()));
                if let Some(date) = &entry.booking_date {
                    ntry = ntry.child(Element::new(ns, "BookgDt").leaf("Dt", date.as_str()));
                }
                ntry = ntry
                    .leaf_opt("AcctSvcrRef", entry.account_servicer_reference.as_deref())
                    .child(bank_code);
                let has_refs = entry.instruction_id.is_some()
                    || entry.end_to_end_id.is_some()
                    || entry.uetr.is_some();
                let has_agents = entry.debtor_agent.is_some() || entry.creditor_agent.is_some();
                if has_refs || has_agents {
                    let mut tx = Element::new(ns, "TxDtls");
                    if has_refs {
                        tx = tx.child(
                            Element::new(ns, "Refs")
                                .leaf_opt("InstrId", entry.instruction_id.as_deref())
                                .leaf_opt("EndToEndId", entry.end_to_end_id.as_deref())
                                .leaf_opt("UETR", entry.uetr.as_deref()),
                        );
                    }
                    if has_agents {
                        let agent = |name: &str, bic: &str| {
                            Element::new(ns, name)
                                .child(Element::new(ns, "FinInstnId").leaf("BICFI", bic))
                        };
                        let mut agents = Element::new(ns, "RltdAgts");
                        if let Some(bic) = &entry.debtor_agent {
                            agents = agents.child(agent("DbtrAgt", bic));
                        }
                        if let Some(bic) = &entry.creditor_agent {
                            agents = agents.child(agent("CdtrAgt", bic));
                        }
                        tx = tx.child(agents);
                    }
                    ntry = ntry.child(Element::new(ns, "NtryDtls").child(tx));
                }
                ntry = ntry.leaf_opt("AddtlNtryInf", entry.additional_info.as_deref());
                element = element.child(ntry);
            }
            body = body.child(element);
        }
        Element::new(ns, "Document").child(body)
    }

    pub fn to_xml(&self) -> String {
        xml::emit(&self.to_document())
    }
}
