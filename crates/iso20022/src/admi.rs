//! admi.002.001.01 (message reject): the answer to an ISO 20022 message that was read but refused
//! before it could be processed, when no business message fits (a pacs.008 or pacs.004 refusal
//! is a pacs.002 RJCT; a camt.056 or camt.029 refusal is this).
//!
//! The official admi.002.001.01 schema is not among the schemas this repository is tested
//! against (`../shared/iso20022/xsd`); the writer follows its published structure (MessageReject
//! V01: RltdRef/Ref, then Rsn with RjctgPtyRsn, RjctnDtTm, ErrLctn, RsnDesc, AddtlData) and
//! bounds every text to its schema length. A round-trip test reads back what it writes.

use crate::xml::{self, Element, Limits};
use crate::MessageError;

pub const ADMI_002_NS: &str = "urn:iso:std:iso:20022:tech:xsd:admi.002.001.01";

/// A message reject.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Admi002 {
    /// The refused message's identification (Max35Text), or "NONREF" when it had none readable.
    pub related_reference: String,
    /// The rejecting party's reason (Max35Text): an ISO reason code such as FF01 or AM03.
    pub reason: String,
    /// ISO date time of the rejection.
    pub rejected_at: Option<String>,
    /// Where in the message the error is (Max350Text).
    pub error_location: Option<String>,
    /// What is wrong (Max350Text).
    pub description: Option<String>,
}

fn bounded(text: &str, max: usize) -> String {
    text.chars().take(max).collect()
}

impl Admi002 {
    pub fn to_xml(&self) -> String {
        let ns = ADMI_002_NS;
        let related_reference = if self.related_reference.is_empty() {
            "NONREF".to_string()
        } else {
            bounded(&self.related_reference, 35)
        };
        let reason = Element::new(ns, "Rsn")
            .leaf("RjctgPtyRsn", bounded(&self.reason, 35))
            .leaf_opt("RjctnDtTm", self.rejected_at.as_deref())
            .leaf_opt(
                "ErrLctn",
                self.error_location
                    .as_deref()
                    .map(|t| bounded(t, 350))
                    .as_deref(),
            )
            .leaf_opt(
                "RsnDesc",
                self.description
                    .as_deref()
                    .map(|t| bounded(t, 350))
                    .as_deref(),
            );
        xml::emit(
            &Element::new(ns, "Document").child(
                Element::new(ns, "admi.002.001.01")
                    .child(Element::new(ns, "RltdRef").leaf("Ref", related_reference))
                    .child(reason),
            ),
        )
    }

    pub fn parse(bytes: &[u8], limits: &Limits) -> Result<Admi002, MessageError> {
        let root = xml::parse(bytes, limits)?;
        let document = root.find("Document").ok_or_else(|| MessageError::Missing {
            path: "/Document".into(),
        })?;
        if &*document.ns != ADMI_002_NS {
            return Err(MessageError::Unsupported {
                namespace: document.ns.to_string(),
            });
        }
        let body = document
            .get("admi.002.001.01")
            .ok_or_else(|| MessageError::Missing {
                path: "/Document/admi.002.001.01".into(),
            })?;
        let text = |path: &str| body.text_at(path).map(str::to_string);
        Ok(Admi002 {
            related_reference: text("RltdRef/Ref").ok_or_else(|| MessageError::Missing {
                path: "/Document/admi.002.001.01/RltdRef/Ref".into(),
            })?,
            reason: text("Rsn/RjctgPtyRsn").ok_or_else(|| MessageError::Missing {
                path: "/Document/admi.002.001.01/Rsn/RjctgPtyRsn".into(),
            })?,
            rejected_at: text("Rsn/RjctnDtTm"),
            error_location: text("Rsn/ErrLctn"),
            description: text("Rsn/RsnDesc"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reject_round_trips_and_bounds_its_texts() {
        let reject = Admi002 {
            related_reference: "ASG-1".into(),
            reason: "AM03".into(),
            rejected_at: Some("2026-12-02T10:00:00.000Z".into()),
            error_location: None,
            description: Some("x".repeat(400)),
        };
        let xml = reject.to_xml();
        assert!(xml.contains(ADMI_002_NS));
        let read = Admi002::parse(xml.as_bytes(), &Limits::default()).unwrap();
        assert_eq!(read.related_reference, "ASG-1");
        assert_eq!(read.reason, "AM03");
        assert_eq!(read.description.unwrap().len(), 350);
        let unnamed = Admi002 {
            reason: "FF01".into(),
            ..Admi002::default()
        };
        let read = Admi002::parse(unnamed.to_xml().as_bytes(), &Limits::default()).unwrap();
        assert_eq!(read.related_reference, "NONREF");
    }
}
