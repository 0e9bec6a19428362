//! What the switch stores in the engine's application records, and its byte layout.
//!
//! Payments, the one record written for every payment (twice: reserved, then final) and replicated
//! with it, are a compact binary layout (below). Participants, returns and recalls, written
//! rarely, are tagged JSON. The first byte tells which: `0x01` a binary payment, `{` JSON (also
//! every payment written before the binary layout existed, so older data directories read as
//! before). Documented in docs/JOURNAL_FORMAT.md ("Switch records"); change both together.
//!
//! Decoding never panics on hostile bytes: truncated, overlong or non-UTF-8 input is a
//! [`StoredError`].

use clearhouse_engine::compact::{put_u128, put_u64, Cursor};
use serde::{Deserialize, Serialize};

use crate::model::{
    uuid_text, Participant, Party, PaymentRecord, PaymentState, RecallRecord, ReturnRecord,
};

/// What the engine stores for the switch.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Stored {
    Participant(Participant),
    Payment(Box<PaymentRecord>),
    Return(Box<ReturnRecord>),
    Recall(Box<RecallRecord>),
    /// What retention leaves of a payment whose window went to the archive, for as long as the
    /// scheme's duplicate window lasts (binary only, never JSON).
    #[serde(skip)]
    Archived(Archived),
}

/// A pruned payment's tombstone: the window it settled (or was rejected) in, and its
/// instruction alias (so the alias can go with the tombstone when the duplicate window ends).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Archived {
    pub window: u64,
    pub instruction_alias: u128,
}

#[derive(Debug, thiserror::Error)]
pub enum StoredError {
    #[error("record: {0}")]
    Binary(#[from] clearhouse_engine::codec::CodecError),
    #[error("record: {0}")]
    Json(#[from] serde_json::Error),
    #[error("record: {0}")]
    Invalid(&'static str),
}

/// The first byte of a binary payment record, layout version 1 (still read; no longer written).
const TAG_PAYMENT_V1: u8 = 0x01;
/// The first byte of a binary payment record, layout version 2: version 1 without the key (the
/// record's own key in the engine) and, when it is the key's high 64 bits, the acceptance time.
const TAG_PAYMENT_V2: u8 = 0x03;
/// The first byte of a tombstone: tag, window (u64 LE), instruction alias (u128 LE).
const TAG_ARCHIVED: u8 = 0x02;
const ARCHIVED_LEN: usize = 25;
/// Longest string field a record may hold (the longest the switch accepts is 140 bytes).
const STRING_MAX: usize = 4096;

const QUEUED: u8 = 1 << 0;
const HAS_REASON: u8 = 1 << 1;
const HAS_FINISHED: u8 = 1 << 2;
const HAS_MESSAGE_ID: u8 = 1 << 3;
const HAS_TRANSACTION_ID: u8 = 1 << 4;
const HAS_REMITTANCE: u8 = 1 << 5;
/// The UETR is a lowercase UUID and is stored as its 16 bytes (else as text).
const UETR_BINARY: u8 = 1 << 6;
const FLAGS_ALL: u8 = (1 << 7) - 1;
/// Version 2 only: the acceptance time is stored (it is not the key's high 64 bits).
const ACCEPTED_STORED: u8 = 1 << 7;

pub fn encode(stored: &Stored) -> Vec<u8> {
    match stored {
        Stored::Payment(record) => encode_payment(record),
        Stored::Archived(archived) => {
            let mut out = Vec::with_capacity(ARCHIVED_LEN);
            out.push(TAG_ARCHIVED);
            out.extend_from_slice(&archived.window.to_le_bytes());
            out.extend_from_slice(&archived.instruction_alias.to_le_bytes());
            out
        }
        other => serde_json::to_vec(other).expect("records serialize"),
    }
}

/// A record from its stored bytes and the key it is stored under (a version 2 payment leaves its
/// key, and usually its acceptance time, to it).
pub fn decode(key: u128, bytes: &[u8]) -> Result<Stored, StoredError> {
    match bytes.first() {
        Some(&TAG_PAYMENT_V1) => Ok(Stored::Payment(Box::new(decode_binary_payment(
            None, bytes,
        )?))),
        Some(&TAG_PAYMENT_V2) => Ok(Stored::Payment(Box::new(decode_binary_payment(
            Some(key),
            bytes,
        )?))),
        Some(&TAG_ARCHIVED) if bytes.len() == ARCHIVED_LEN => Ok(Stored::Archived(Archived {
            window: u64::from_le_bytes(bytes[1..9].try_into().expect("8 bytes")),
            instruction_alias: u128::from_le_bytes(bytes[9..25].try_into().expect("16 bytes")),
        })),
        Some(&TAG_ARCHIVED) => Err(StoredError::Invalid("tombstone of the wrong length")),
        _ => Ok(serde_json::from_slice(bytes)?),
    }
}

/// A payment record from its stored bytes (any layout) and its key; `None` for another kind of
/// record.
pub fn decode_payment(key: u128, bytes: &[u8]) -> Result<Option<PaymentRecord>, StoredError> {
    Ok(match decode(key, bytes)? {
        Stored::Payment(record) => Some(*record),
        Stored::Participant(_) | Stored::Return(_) | Stored::Recall(_) | Stored::Archived(_) => {
            None
        }
    })
}

/// Layout (integers little-endian; `varint` LEB128; `text` a varint length and UTF-8 bytes):
/// tag u8 = 3, state u8 (0 reserved, 1 settled, 2 rejected), flags u8, accepted_at_ns u64 only
/// with flag bit 7 (else it is the key's high 64 bits, as [`crate::model::payment_key`] makes
/// it), deadline_ns u64, finished_at_ns u64 (0 when none), amount varint, returned varint,
/// instruction_id, end_to_end_id (text), uetr (16 bytes or text, by flag), debtor_agent,
/// creditor_agent, currency, debtor name, debtor account, creditor name, creditor account (text),
/// then by flag: remittance_information, message_id, transaction_id, reason (text).
/// Version 1 (tag 1, still read) has the key u128 after the flags and accepted_at_ns always.
/// The fixed-width times keep the final record as long as the reserved one (but for a reason),
/// so the index rewrites it in place instead of splitting its page.
fn encode_payment(r: &PaymentRecord) -> Vec<u8> {
    let uetr = uetr_bytes(&r.uetr);
    let accepted_stored = r.accepted_at_ns != (r.key >> 64) as u64;
    let mut flags = 0u8;
    for (on, bit) in [
        (r.queued, QUEUED),
        (r.reason.is_some(), HAS_REASON),
        (r.finished_at_ns.is_some(), HAS_FINISHED),
        (r.message_id.is_some(), HAS_MESSAGE_ID),
        (r.transaction_id.is_some(), HAS_TRANSACTION_ID),
        (r.remittance_information.is_some(), HAS_REMITTANCE),
        (uetr.is_some(), UETR_BINARY),
        (accepted_stored, ACCEPTED_STORED),
    ] {
        if on {
            flags |= bit;
        }
    }
    let mut out = Vec::with_capacity(160);
    out.push(TAG_PAYMENT_V2);
    out.push(match r.state {
        PaymentState::Reserved => 0,
        PaymentState::Settled => 1,
        PaymentState::Rejected => 2,
    });
    out.push(flags);
    if accepted_stored {
        out.extend_from_slice(&r.accepted_at_ns.to_le_bytes());
    }
    out.extend_from_slice(&r.deadline_ns.to_le_bytes());
    out.extend_from_slice(&r.finished_at_ns.unwrap_or(0).to_le_bytes());
    put_u128(&mut out, r.amount);
    put_u128(&mut out, r.returned);
    put_text(&mut out, &r.instruction_id);
    put_text(&mut out, &r.end_to_end_id);
    match uetr {
        Some(bytes) => out.extend_from_slice(&bytes),
        None => put_text(&mut out, &r.uetr),
    }
    for text in [
        &r.debtor_agent,
        &r.creditor_agent,
        &r.currency,
        &r.debtor.name,
        &r.debtor.account,
        &r.creditor.name,
        &r.creditor.account,
    ] {
        put_text(&mut out, text);
    }
    for text in [
        &r.remittance_information,
        &r.message_id,
        &r.transaction_id,
        &r.reason,
    ]
    .into_iter()
    .flatten()
    {
        put_text(&mut out, text);
    }
    out
}

/// Version 1 (`key` None: the value holds it) or 2 (the key it is stored under).
fn decode_binary_payment(key: Option<u128>, bytes: &[u8]) -> Result<PaymentRecord, StoredError> {
    let mut c = Cursor::new(bytes, "payment record");
    let _tag = c.u8()?;
    let state = match c.u8()? {
        0 => PaymentState::Reserved,
        1 => PaymentState::Settled,
        2 => PaymentState::Rejected,
        _ => return Err(StoredError::Invalid("unknown payment state")),
    };
    let flags = c.u8()?;
    let known = match key {
        None => FLAGS_ALL,
        Some(_) => FLAGS_ALL | ACCEPTED_STORED,
    };
    if flags & !known != 0 {
        return Err(StoredError::Invalid("unknown payment flags"));
    }
    let u64_le = |c: &mut Cursor| -> Result<u64, StoredError> {
        Ok(u64::from_le_bytes(c.take(8)?.try_into().expect("8 bytes")))
    };
    let (key, accepted_at_ns) = match key {
        None => (
            u128::from_le_bytes(c.take(16)?.try_into().expect("16 bytes")),
            u64_le(&mut c)?,
        ),
        Some(key) if flags & ACCEPTED_STORED != 0 => (key, u64_le(&mut c)?),
        Some(key) => (key, (key >> 64) as u64),
    };
    let deadline_ns = u64_le(&mut c)?;
    let finished_at_ns = u64_le(&mut c)?;
    let amount = c.u128()?;
    let returned = c.u128()?;
    let instruction_id = text(&mut c)?;
    let end_to_end_id = text(&mut c)?;
    let uetr = if flags & UETR_BINARY != 0 {
        uuid_text(c.take(16)?.try_into().expect("16 bytes"))
    } else {
        text(&mut c)?
    };
    let debtor_agent = text(&mut c)?;
    let creditor_agent = text(&mut c)?;
    let currency = text(&mut c)?;
    let debtor = Party {
        name: text(&mut c)?,
        account: text(&mut c)?,
    };
    let creditor = Party {
        name: text(&mut c)?,
        account: text(&mut c)?,
    };
    let optional = |c: &mut Cursor, bit: u8| -> Result<Option<String>, StoredError> {
        if flags & bit != 0 {
            text(c).map(Some)
        } else {
            Ok(None)
        }
    };
    let remittance_information = optional(&mut c, HAS_REMITTANCE)?;
    let message_id = optional(&mut c, HAS_MESSAGE_ID)?;
    let transaction_id = optional(&mut c, HAS_TRANSACTION_ID)?;
    let reason = optional(&mut c, HAS_REASON)?;
    if !c.remaining().is_empty() {
        return Err(StoredError::Invalid("bytes after the payment record"));
    }
    if returned > amount {
        return Err(StoredError::Invalid("returned exceeds the amount"));
    }
    Ok(PaymentRecord {
        key,
        instruction_id,
        end_to_end_id,
        uetr,
        debtor_agent,
        creditor_agent,
        currency,
        amount,
        debtor,
        creditor,
        remittance_information,
        message_id,
        transaction_id,
        state,
        reason,
        accepted_at_ns,
        deadline_ns,
        finished_at_ns: (flags & HAS_FINISHED != 0).then_some(finished_at_ns),
        returned,
        queued: flags & QUEUED != 0,
    })
}

fn put_text(out: &mut Vec<u8>, text: &str) {
    put_u64(out, text.len() as u64);
    out.extend_from_slice(text.as_bytes());
}

fn text(c: &mut Cursor) -> Result<String, StoredError> {
    let len = c.u64()?;
    if len > STRING_MAX as u64 {
        return Err(StoredError::Invalid("text field too long"));
    }
    let bytes = c.take(len as usize)?;
    String::from_utf8(bytes.to_vec()).map_err(|_| StoredError::Invalid("text field not UTF-8"))
}

/// The 16 bytes of a lowercase hyphenated UUID, when `uetr` is exactly that (the text form is
/// what round-trips; anything else is stored as text).
fn uetr_bytes(uetr: &str) -> Option<[u8; 16]> {
    let b = uetr.as_bytes();
    if b.len() != 36 {
        return None;
    }
    let mut out = [0u8; 16];
    let mut nibbles = 0usize;
    for (i, &ch) in b.iter().enumerate() {
        if matches!(i, 8 | 13 | 18 | 23) {
            if ch != b'-' {
                return None;
            }
            continue;
        }
        let v = match ch {
            b'0'..=b'9' => ch - b'0',
            b'a'..=b'f' => ch - b'a' + 10,
            _ => return None,
        };
        out[nibbles / 2] |= if nibbles.is_multiple_of(2) { v << 4 } else { v };
        nibbles += 1;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> PaymentRecord {
        PaymentRecord {
            key: crate::model::payment_key(1_700_000_000_000_000_000, "BANKDEFF", "INSTR-1"),
            instruction_id: "INSTR-1".into(),
            end_to_end_id: "E2E-1".into(),
            uetr: "eb6305c9-1f7f-49de-aed0-16487c27b42d".into(),
            debtor_agent: "BANKDEFF".into(),
            creditor_agent: "BANKFRPPXXX".into(),
            currency: "EUR".into(),
            amount: 12_345,
            debtor: Party {
                name: "Jörg Müller".into(),
                account: "DE89370400440532013000".into(),
            },
            creditor: Party {
                name: "Alice".into(),
                account: "FR7630006000011234567890189".into(),
            },
            remittance_information: Some("invoice 42".into()),
            message_id: Some("MSG-1".into()),
            transaction_id: None,
            state: PaymentState::Reserved,
            reason: None,
            accepted_at_ns: 1_700_000_000_000_000_000,
            deadline_ns: 1_700_000_010_000_000_000,
            finished_at_ns: None,
            returned: 0,
            queued: false,
        }
    }

    fn round_trip(record: &PaymentRecord) -> PaymentRecord {
        let bytes = encode(&Stored::Payment(Box::new(record.clone())));
        assert_eq!(bytes[0], TAG_PAYMENT_V2);
        decode_payment(record.key, &bytes).unwrap().unwrap()
    }

    /// The version 1 layout, as builds before version 2 wrote it.
    fn encode_v1(r: &PaymentRecord) -> Vec<u8> {
        let mut r = r.clone();
        // Version 2 with the acceptance time stored is version 1 without the key.
        r.accepted_at_ns = r.accepted_at_ns.wrapping_add(1);
        let mut v2 = encode(&Stored::Payment(Box::new(r.clone())));
        assert_ne!(v2[2] & ACCEPTED_STORED, 0);
        let accepted = (r.accepted_at_ns.wrapping_sub(1)).to_le_bytes();
        v2[3..11].copy_from_slice(&accepted);
        let mut v1 = vec![TAG_PAYMENT_V1, v2[1], v2[2] & !ACCEPTED_STORED];
        v1.extend_from_slice(&r.key.to_le_bytes());
        v1.extend_from_slice(&v2[3..]);
        v1
    }

    #[test]
    fn version_1_records_still_read_and_version_2_leaves_the_key_out() {
        let record = sample();
        let v1 = encode_v1(&record);
        // Read whatever key they are given: version 1 holds its own.
        assert_eq!(decode_payment(0, &v1).unwrap().unwrap(), record);
        let v2 = encode(&Stored::Payment(Box::new(record.clone())));
        assert_eq!(v2.len() + 24, v1.len());
        // A version 2 record read under another key is that key's (the engine keys it).
        let other = decode_payment(record.key + (1 << 64), &v2)
            .unwrap()
            .unwrap();
        assert_eq!(
            (other.key, other.accepted_at_ns),
            (record.key + (1 << 64), record.accepted_at_ns + 1)
        );
        // An acceptance time that is not the key's is kept.
        let mut odd = record.clone();
        odd.accepted_at_ns -= 7;
        assert_eq!(round_trip(&odd), odd);
        // Flag bit 7 means nothing in version 1.
        let mut bad = v1;
        bad[2] |= ACCEPTED_STORED;
        assert!(decode(record.key, &bad).is_err());
    }

    #[test]
    fn payments_round_trip_and_the_final_record_keeps_its_length() {
        let reserved = sample();
        assert_eq!(round_trip(&reserved), reserved);
        let mut settled = reserved.clone();
        settled.state = PaymentState::Settled;
        settled.finished_at_ns = Some(reserved.accepted_at_ns + 5);
        assert_eq!(round_trip(&settled), settled);
        let encoded = |r: &PaymentRecord| encode(&Stored::Payment(Box::new(r.clone()))).len();
        assert_eq!(encoded(&settled), encoded(&reserved));
        let json = serde_json::to_vec(&Stored::Payment(Box::new(settled.clone()))).unwrap();
        assert!(
            encoded(&settled) * 3 < json.len(),
            "{} vs {}",
            encoded(&settled),
            json.len()
        );
        let mut rejected = settled.clone();
        rejected.state = PaymentState::Rejected;
        rejected.reason = Some("AB05".into());
        rejected.uetr = "not-a-uuid".into();
        rejected.queued = true;
        rejected.transaction_id = Some("TX".into());
        rejected.remittance_information = None;
        assert_eq!(round_trip(&rejected), rejected);
        // An upper-case UUID is kept as text, so it round-trips exactly.
        let mut upper = reserved;
        upper.uetr = upper.uetr.to_uppercase();
        assert_eq!(round_trip(&upper), upper);
    }

    #[test]
    fn json_records_written_before_the_binary_layout_still_read() {
        let record = sample();
        let json = serde_json::to_vec(&Stored::Payment(Box::new(record.clone()))).unwrap();
        assert_eq!(json[0], b'{');
        assert_eq!(decode_payment(record.key, &json).unwrap().unwrap(), record);
    }

    #[test]
    fn every_truncation_and_trailing_byte_is_an_error() {
        let record = sample();
        for bytes in [
            encode(&Stored::Payment(Box::new(record.clone()))),
            encode_v1(&record),
        ] {
            let key = record.key;
            for len in 0..bytes.len() {
                assert!(decode(key, &bytes[..len]).is_err(), "truncated to {len}");
            }
            let mut longer = bytes.clone();
            longer.push(0);
            assert!(decode(key, &longer).is_err());
            let mut bad_state = bytes.clone();
            bad_state[1] = 3;
            assert!(decode(key, &bad_state).is_err());
        }
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(mut bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            for tag in [TAG_PAYMENT_V1, TAG_PAYMENT_V2] {
                if let Some(first) = bytes.first_mut() {
                    *first = tag;
                }
                let _ = decode(7, &bytes);
            }
        }

        #[test]
        fn any_payment_round_trips(
            amount in any::<u128>(),
            texts in proptest::collection::vec("\\PC{0,40}", 11),
            flags in any::<u8>(),
            times in any::<[u64; 3]>(),
        ) {
            let optional = |bit: u8, text: &String| (flags & bit != 0).then(|| text.clone());
            let record = PaymentRecord {
                key: u128::from(times[0]) << 64 | 0x10,
                instruction_id: texts[0].clone(),
                end_to_end_id: texts[1].clone(),
                uetr: texts[2].clone(),
                debtor_agent: texts[3].clone(),
                creditor_agent: texts[4].clone(),
                currency: texts[5].clone(),
                amount,
                debtor: Party { name: texts[6].clone(), account: texts[7].clone() },
                creditor: Party { name: texts[8].clone(), account: texts[9].clone() },
                remittance_information: optional(HAS_REMITTANCE, &texts[10]),
                message_id: optional(HAS_MESSAGE_ID, &texts[0]),
                transaction_id: optional(HAS_TRANSACTION_ID, &texts[1]),
                state: [PaymentState::Reserved, PaymentState::Settled, PaymentState::Rejected][flags as usize % 3],
                reason: optional(HAS_REASON, &texts[2]),
                accepted_at_ns: times[0],
                deadline_ns: times[1],
                finished_at_ns: (flags & HAS_FINISHED != 0).then_some(times[2]),
                returned: amount / 2,
                queued: flags & QUEUED != 0,
            };
            prop_assert_eq!(round_trip(&record), record.clone());
            prop_assert_eq!(decode_payment(0, &encode_v1(&record)).unwrap().unwrap(), record);
        }
    }
}
