//! Untrusted JSON request bodies and amounts: parse or refuse, never panic.
#![no_main]

use clearhouse_switch::switch::{ChangeRequest, LiquidityRequest, OnboardRequest, ReturnRequest};
use clearhouse_switch::PaymentRequest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = serde_json::from_slice::<PaymentRequest>(data);
    let _ = serde_json::from_slice::<OnboardRequest>(data);
    let _ = serde_json::from_slice::<ChangeRequest>(data);
    let _ = serde_json::from_slice::<LiquidityRequest>(data);
    let _ = serde_json::from_slice::<ReturnRequest>(data);
    if let Ok(text) = std::str::from_utf8(data) {
        for exponent in [0, 2, 3] {
            if let Ok(minor) = clearhouse_switch::money::parse_amount(text, exponent) {
                // Whatever parses formats back to a value that parses to the same amount.
                let formatted = clearhouse_switch::money::format_amount(minor, exponent);
                assert_eq!(
                    clearhouse_switch::money::parse_amount(&formatted, exponent).ok(),
                    Some(minor)
                );
            }
        }
        let _ = clearhouse_clearing::reconcile::parse_csv(text);
    }
});
