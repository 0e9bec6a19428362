//! clearhouse-iso20022: ISO 20022 messages for the switch.
//!
//! It does: read XML into an element tree with bounds checked before and during parsing (size,
//! depth, element count, text length; DTDs and custom entities refused; errors name the element
//! path); select the message by the Document's namespace; read and write typed pacs.008.001.08
//! (customer credit transfer), pacs.002.001.10 (payment status report), pacs.004.001.09
//! (payment return), pacs.028.001.03 (payment status request), camt.053.001.08 (statement),
//! camt.054.001.08 (debit/credit notification), camt.056.001.08 / camt.029.001.09 (recalls),
//! admi.002.001.01 (message reject) and the head.001.001.02 business
//! application header, writing the right
//! namespace, only the elements present, in schema order; format ISO dates and times.
//!
//! It deliberately does not: validate against the XSDs at run time (the tests do, with xmllint);
//! make business decisions (the switch checks amounts, codes, BICs, UETRs); make scheme decisions; keep elements it does not model
//! (postal addresses, structured remittance): they are read past, not re-emitted.

pub mod admi;
pub mod camt;
pub mod messages;
pub mod recall;
pub mod time;
pub mod xml;

pub use messages::{
    envelope_xml, AppHeader, CreditTransfer, Message, MessageError, Pacs002, Pacs004, Pacs008,
    Pacs028, PACS_002_NS, PACS_004_NS, PACS_008_NS, PACS_028_NS,
};
pub use xml::{Element, Limits, XmlError};
