//! Untrusted XML: every message the switch reads (pacs.008 with or without a header, pacs.028,
//! pacs.004, camt.053/054 statements) must answer Ok or a clear error, never panic, within the
//! bounds; whatever parses must re-emit and parse back the same.
#![no_main]

use clearhouse_iso20022::camt::CashReport;
use clearhouse_iso20022::{Limits, Message};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = Limits::default();
    if let Ok((_, message)) = Message::parse_with_header(data, &limits) {
        let xml = match &message {
            Message::Pacs008(m) => m.to_xml(),
            Message::Pacs002(m) => m.to_xml(),
            Message::Pacs028(m) => m.to_xml(),
            Message::Pacs004(m) => m.to_xml(),
        };
        let again = Message::parse(xml.as_bytes(), &limits).expect("what we emit parses");
        assert_eq!(again, message, "round trip");
    }
    if let Ok(report) = CashReport::parse(data, &limits) {
        let again = CashReport::parse(report.to_xml().as_bytes(), &limits).expect("re-parses");
        assert_eq!(again, report, "round trip");
    }
});
