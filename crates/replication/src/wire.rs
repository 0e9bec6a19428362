//! The stream message format: one message per journal group (split when larger than
//! [`MESSAGE_BYTES_MAX`]), the records exactly as journaled, with a CRC32C over the payload.
//!
//! Payload: per record `seq u64 | kind u16 | timestamp u64 | len u32 | payload`, little endian,
//! then `crc32c u32` of all that. Headers: `Clearhouse-Kind` (`group` or `barrier`),
//! `Clearhouse-Term`, `Clearhouse-Node`, `Clearhouse-First` and `Clearhouse-Last` (journal
//! sequences; a barrier carries last = the leader's last applied record and first = last + 1),
//! `Clearhouse-Chain` (`{vouchers}:{hash hex}` after the message, on a group's last part and on
//! barriers), and `Nats-Msg-Id` `{term}-{first}` (`{term}-barrier`) for deduplicated resends.

use async_nats::HeaderMap;
use clearhouse_journal::Record;

/// Most payload bytes in one stream message (the NATS servers run with `max_payload` 8 MiB).
pub const MESSAGE_BYTES_MAX: usize = 4 << 20;
const RECORD_HEADER: usize = 8 + 2 + 8 + 4;

pub const KIND: &str = "Clearhouse-Kind";
pub const TERM: &str = "Clearhouse-Term";
pub const NODE: &str = "Clearhouse-Node";
pub const FIRST: &str = "Clearhouse-First";
pub const LAST: &str = "Clearhouse-Last";
pub const CHAIN: &str = "Clearhouse-Chain";

/// Splits a group's records into message payloads of at most [`MESSAGE_BYTES_MAX`] (a record is
/// never split; one record is at most about 1 MiB).
pub fn encode(records: &[Record]) -> Vec<(u64, u64, Vec<u8>)> {
    let mut out = Vec::new();
    let mut payload = Vec::new();
    let mut first = 0;
    for record in records {
        let size = RECORD_HEADER + record.payload.len();
        if !payload.is_empty() && payload.len() + size + 4 > MESSAGE_BYTES_MAX {
            let last = record.seq - 1;
            out.push((first, last, seal(std::mem::take(&mut payload))));
        }
        if payload.is_empty() {
            first = record.seq;
        }
        payload.extend_from_slice(&record.seq.to_le_bytes());
        payload.extend_from_slice(&record.kind.to_le_bytes());
        payload.extend_from_slice(&record.timestamp.to_le_bytes());
        payload.extend_from_slice(&(record.payload.len() as u32).to_le_bytes());
        payload.extend_from_slice(&record.payload);
    }
    if let Some(last) = records.last() {
        out.push((first, last.seq, seal(payload)));
    }
    out
}

fn seal(mut payload: Vec<u8>) -> Vec<u8> {
    let crc = crc32c::crc32c(&payload);
    payload.extend_from_slice(&crc.to_le_bytes());
    payload
}

/// Decodes a message payload, checking its CRC and that sequences are contiguous.
pub fn decode(payload: &[u8]) -> Result<Vec<Record>, String> {
    if payload.len() < 4 {
        return Err("message shorter than its checksum".into());
    }
    let (body, crc) = payload.split_at(payload.len() - 4);
    if crc32c::crc32c(body) != u32::from_le_bytes(crc.try_into().expect("4 bytes")) {
        return Err("message checksum mismatch".into());
    }
    let mut records: Vec<Record> = Vec::new();
    let mut at = 0;
    while at < body.len() {
        if body.len() - at < RECORD_HEADER {
            return Err(format!("truncated record header at byte {at}"));
        }
        let seq = u64::from_le_bytes(body[at..at + 8].try_into().expect("8"));
        let kind = u16::from_le_bytes(body[at + 8..at + 10].try_into().expect("2"));
        let timestamp = u64::from_le_bytes(body[at + 10..at + 18].try_into().expect("8"));
        let len = u32::from_le_bytes(body[at + 18..at + 22].try_into().expect("4")) as usize;
        at += RECORD_HEADER;
        if body.len() - at < len {
            return Err(format!("record {seq} claims {len} bytes, fewer remain"));
        }
        if let Some(previous) = records.last() {
            if seq != previous.seq + 1 {
                return Err(format!("record {seq} follows {}", previous.seq));
            }
        }
        records.push(Record {
            seq,
            kind,
            timestamp,
            payload: body[at..at + len].to_vec(),
        });
        at += len;
    }
    Ok(records)
}

pub fn chain_value(seq: u64, hash: &[u8; 32]) -> String {
    format!("{seq}:{}", hex::encode(hash))
}

pub fn parse_chain(value: &str) -> Option<(u64, [u8; 32])> {
    let (seq, hash) = value.split_once(':')?;
    let bytes = hex::decode(hash).ok()?;
    Some((seq.parse().ok()?, bytes.try_into().ok()?))
}

/// A header as text (None when absent).
pub fn header<'a>(headers: Option<&'a HeaderMap>, name: &str) -> Option<&'a str> {
    headers?.get(name).map(|value| value.as_str())
}

pub fn header_u64(headers: Option<&HeaderMap>, name: &str) -> Option<u64> {
    header(headers, name)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(seq: u64, len: usize) -> Record {
        Record {
            seq,
            kind: 3,
            timestamp: seq * 10,
            payload: vec![seq as u8; len],
        }
    }

    #[test]
    fn groups_round_trip_and_split_at_the_size_limit() {
        let records: Vec<Record> = (5..15).map(|seq| record(seq, 1 << 20)).collect();
        let messages = encode(&records);
        assert!(messages.len() >= 3, "10 MiB of records in 4 MiB messages");
        let mut decoded = Vec::new();
        let mut expected_first = 5;
        for (first, last, payload) in &messages {
            assert!(payload.len() <= MESSAGE_BYTES_MAX);
            assert_eq!(*first, expected_first);
            let part = decode(payload).unwrap();
            assert_eq!((part[0].seq, part.last().unwrap().seq), (*first, *last));
            expected_first = last + 1;
            decoded.extend(part);
        }
        assert_eq!(decoded, records);
    }

    #[test]
    fn a_flipped_byte_or_a_gap_is_refused() {
        let (_, _, mut payload) = encode(&[record(1, 10), record(2, 10)]).remove(0);
        payload[12] ^= 1;
        assert!(decode(&payload).unwrap_err().contains("checksum"));
        let mut gap = encode(&[record(1, 10)]).remove(0).2;
        gap.truncate(gap.len() - 4);
        let tail = encode(&[record(3, 10)]).remove(0).2;
        gap.extend_from_slice(&tail[..tail.len() - 4]);
        let gap = seal(gap);
        assert!(decode(&gap).unwrap_err().contains("follows"));
    }

    #[test]
    fn chain_header_round_trips() {
        let hash = [7u8; 32];
        assert_eq!(parse_chain(&chain_value(42, &hash)), Some((42, hash)));
        assert_eq!(parse_chain("x:00"), None);
    }
}
