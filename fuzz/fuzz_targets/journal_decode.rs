//! Bytes from disk: journal payloads (submit batches with records and vouchers, transfer and
//! account batches) and voucher exports must decode or fail cleanly, never panic; a decoded
//! submit re-encodes to a payload that decodes to the same batch. The index's compact values
//! (stored transfers, account-event chunks) too: decode cleanly or fail, and re-encode the same.
#![no_main]

use clearhouse_engine::{codec, compact};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((transfers, records)) = codec::decode_submit(data) {
        let again = codec::encode_submit(&transfers, &records);
        let decoded = codec::decode_submit(&again).expect("what we encode decodes");
        assert_eq!(decoded, (transfers, records), "round trip");
    }
    let _ = codec::decode_batch(data, codec::decode_transfer);
    let _ = codec::decode_batch(data, codec::decode_account);
    // Accounts 0, 1 and 2 by number (the index's account_numbers table).
    let numbered = [7u128, 8, u128::MAX];
    if let Ok(stored) = compact::decode_stored_transfer(1, data, &numbered) {
        let mut again = Vec::new();
        let mut number_of = |id: u128| numbered.iter().position(|n| *n == id).map(|n| n as u32);
        compact::encode_stored_transfer(&mut again, &stored, &mut number_of);
        let key = stored.transfer.id;
        assert_eq!(
            compact::decode_stored_transfer(key, &again, &numbered).unwrap(),
            stored
        );
    }
    let mut events = Vec::new();
    if compact::decode_account_events(7, 1_000, data, &mut events).is_ok() && !events.is_empty() {
        let mut again = Vec::new();
        let mut writer = compact::ChunkWriter::new(1_000);
        for decoded in &events {
            writer.push(&mut again, &decoded.event);
        }
        // Written again, each event names its transfer by id (format 3).
        let mut decoded = Vec::new();
        compact::decode_account_events(7, 1_000, &again, &mut decoded).unwrap();
        let expected: Vec<_> = events
            .iter()
            .map(|d| clearhouse_ledger::AccountEvent {
                transfer: compact::transfer_reference(&d.event.transfer),
                ..d.event
            })
            .collect();
        let decoded: Vec<_> = decoded.iter().map(|d| d.event).collect();
        assert_eq!(decoded, expected);
    }
    let _ = clearhouse_clearing::export::verify_export(data, None, |_| {});
});
