//! Bytes from disk: journal payloads (submit batches with records and vouchers, transfer and
//! account batches) and voucher exports must decode or fail cleanly, never panic; a decoded
//! submit re-encodes to a payload that decodes to the same batch.
#![no_main]

use clearhouse_engine::codec;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((transfers, records)) = codec::decode_submit(data) {
        let again = codec::encode_submit(&transfers, &records);
        let decoded = codec::decode_submit(&again).expect("what we encode decodes");
        assert_eq!(decoded, (transfers, records), "round trip");
    }
    let _ = codec::decode_batch(data, codec::decode_transfer);
    let _ = codec::decode_batch(data, codec::decode_account);
    let _ = clearhouse_clearing::export::verify_export(data, None, |_| {});
});
