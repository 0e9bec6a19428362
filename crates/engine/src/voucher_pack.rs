//! How the index stores a voucher body: packed, losslessly. The chain hashes the body's exact
//! bytes (canonical JSON, see `clearhouse_clearing::event`), and every reader gets those bytes
//! back; only the index's copy is smaller (about 95 bytes for a settled payment's 270).
//!
//! Packed form: a tag byte, then
//! - tag 0: the body as is (a body with any byte of 0x80 or above is never packed);
//! - tag 1: a sequence of codes: a byte below 0x80 is itself; `0x80 + i` is [`TOKENS`]`[i]`;
//!   [`HEX32`] then 16 bytes is 32 lowercase hex digits; [`UUID`] then 16 bytes is a lowercase
//!   hyphenated UUID; [`NUMBER`] then a LEB128 varint is that u64 in decimal (written so only for
//!   runs of 2 to 19 digits without a leading zero, so it reads back to the same digits).
//!
//! Packing is a substitution of exact byte strings, so `unpack(pack(b)) == b` for every `b`,
//! whatever the tokens are; they only decide how small the result is. The tokens are the fixed
//! parts of the voucher events' canonical JSON. Documented in docs/JOURNAL_FORMAT.md; the list may
//! only ever grow at its end (a stored code names a token by its position).

use crate::codec::CodecError;
use crate::compact::{put_u64, Cursor};

const TAG_RAW: u8 = 0;
const TAG_PACKED: u8 = 1;
const HEX32: u8 = 0xF0;
const UUID: u8 = 0xF1;
const NUMBER: u8 = 0xF2;

/// Fixed strings of the canonical voucher JSON; code `0x80 + index`. Append only.
pub const TOKENS: &[&str] = &[
    "{\"type\":\"payment_settled\",\"payment\":\"",
    "{\"type\":\"payment_rejected\",\"payment\":\"",
    "{\"type\":\"payment_returned\",\"return_key\":\"",
    "{\"type\":\"liquidity\",\"transfer\":\"",
    "{\"type\":\"window_closed\",\"window\":",
    "{\"type\":\"fund_adjustment\",\"window\":",
    "{\"type\":\"window_settled\",\"window\":",
    "\",\"uetr\":\"",
    "\",\"end_to_end_id\":\"",
    "\",\"debtor_agent\":\"",
    "\",\"creditor_agent\":\"",
    "\",\"currency\":\"",
    "\",\"amount\":\"",
    "\",\"reason\":\"",
    "\",\"at_ns\":",
    "\",\"original_payment\":\"",
    "\",\"original_uetr\":\"",
    "\",\"returning_agent\":\"",
    "\",\"receiving_agent\":\"",
    "\",\"participant\":\"",
    "\",\"direction\":\"",
    ",\"opened_at_ns\":",
    ",\"closed_at_ns\":",
    ",\"participant\":\"",
    "\",\"net\":\"",
    ",\"adjustments\":",
    ",\"settled_at_ns\":",
    "\"}",
];

/// The index's form of `body`.
pub fn pack(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() / 2 + 8);
    if body.iter().any(|&b| b >= 0x80) {
        out.push(TAG_RAW);
        out.extend_from_slice(body);
        return out;
    }
    out.push(TAG_PACKED);
    let mut i = 0;
    'next: while i < body.len() {
        let rest = &body[i..];
        // The longest token that matches here (every token starts with `{`, `"` or `,`).
        let mut best: Option<(usize, usize)> = None;
        if matches!(rest[0], b'{' | b'"' | b',') {
            for (index, token) in TOKENS.iter().enumerate() {
                if rest.starts_with(token.as_bytes())
                    && best.is_none_or(|(_, len)| token.len() > len)
                {
                    best = Some((index, token.len()));
                }
            }
        }
        if let Some((index, len)) = best {
            out.push(0x80 + index as u8);
            i += len;
            continue 'next;
        }
        if let Some(bytes) = uuid_bytes(rest) {
            out.push(UUID);
            out.extend_from_slice(&bytes);
            i += 36;
            continue 'next;
        }
        if rest.len() >= 32 && rest[..32].iter().all(|&b| is_hex(b)) {
            out.push(HEX32);
            out.extend_from_slice(&hex_bytes(&rest[..32]));
            i += 32;
            continue 'next;
        }
        let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
        if (2..=19).contains(&digits) && rest[0] != b'0' {
            let text = std::str::from_utf8(&rest[..digits]).expect("ASCII digits");
            if let Ok(value) = text.parse::<u64>() {
                out.push(NUMBER);
                put_u64(&mut out, value);
                i += digits;
                continue 'next;
            }
        }
        out.push(rest[0]);
        i += 1;
    }
    out
}

/// The body `pack` was given; an error for bytes `pack` cannot have written, or a body longer than
/// `max`.
pub fn unpack(stored: &[u8], max: usize) -> Result<Vec<u8>, CodecError> {
    let error = |found: usize| CodecError {
        what: "packed voucher",
        expected: max,
        found,
    };
    let (&tag, rest) = stored.split_first().ok_or_else(|| error(0))?;
    match tag {
        TAG_RAW if rest.len() <= max => return Ok(rest.to_vec()),
        TAG_PACKED => {}
        _ => return Err(error(tag as usize)),
    }
    let mut out = Vec::with_capacity(rest.len() * 2);
    let mut c = Cursor::new(rest, "packed voucher");
    while !c.remaining().is_empty() {
        let code = c.u8()?;
        match code {
            0..=0x7F => out.push(code),
            HEX32 => out.extend_from_slice(hex::encode(c.take(16)?).as_bytes()),
            UUID => {
                let h = hex::encode(c.take(16)?);
                for (part, range) in [0..8, 8..12, 12..16, 16..20, 20..32]
                    .into_iter()
                    .enumerate()
                {
                    if part > 0 {
                        out.push(b'-');
                    }
                    out.extend_from_slice(&h.as_bytes()[range]);
                }
            }
            NUMBER => out.extend_from_slice(c.u64()?.to_string().as_bytes()),
            _ => {
                let token = TOKENS
                    .get((code - 0x80) as usize)
                    .ok_or_else(|| error(code as usize))?;
                out.extend_from_slice(token.as_bytes());
            }
        }
        if out.len() > max {
            return Err(error(out.len()));
        }
    }
    Ok(out)
}

fn is_hex(b: u8) -> bool {
    b.is_ascii_digit() || (b'a'..=b'f').contains(&b)
}

fn hex_bytes(text: &[u8]) -> Vec<u8> {
    hex::decode(text).expect("checked hex digits")
}

fn uuid_bytes(rest: &[u8]) -> Option<Vec<u8>> {
    let candidate = rest.get(..36)?;
    let mut digits = Vec::with_capacity(32);
    for (i, &b) in candidate.iter().enumerate() {
        if matches!(i, 8 | 13 | 18 | 23) {
            if b != b'-' {
                return None;
            }
        } else if is_hex(b) {
            digits.push(b);
        } else {
            return None;
        }
    }
    Some(hex_bytes(&digits))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SETTLED: &str = "{\"type\":\"payment_settled\",\"payment\":\"0000018c2f1e5a7b3c9d00000000a1b0\",\"uetr\":\"eb6305c9-1f7f-49de-aed0-16487c27b42d\",\"end_to_end_id\":\"E2E-000123\",\"debtor_agent\":\"BANKDEFF\",\"creditor_agent\":\"BANKFRPP\",\"currency\":\"EUR\",\"amount\":\"12345\",\"at_ns\":1700000000123456789}";

    #[test]
    fn a_settled_payment_packs_to_a_third_and_reads_back_exactly() {
        let packed = pack(SETTLED.as_bytes());
        assert_eq!(unpack(&packed, 1024).unwrap(), SETTLED.as_bytes());
        assert!(
            packed.len() * 5 < SETTLED.len() * 2,
            "{} of {}",
            packed.len(),
            SETTLED.len()
        );
    }

    #[test]
    fn what_cannot_be_packed_is_kept_whole_and_bad_input_is_an_error() {
        let body = "{\"name\":\"Jörg\"}".as_bytes();
        let packed = pack(body);
        assert_eq!(packed[0], TAG_RAW);
        assert_eq!(unpack(&packed, 1024).unwrap(), body);
        // Leading zeros, a 20-digit run, upper-case hex: kept as literal bytes, exactly.
        for body in [
            "007",
            "12345678901234567890",
            "ABCDEF0123456789ABCDEF0123456789",
            "0",
        ] {
            assert_eq!(
                unpack(&pack(body.as_bytes()), 1024).unwrap(),
                body.as_bytes()
            );
        }
        assert!(unpack(&[], 1024).is_err());
        assert!(unpack(&[7], 1024).is_err());
        assert!(unpack(&[TAG_PACKED, 0x80 + TOKENS.len() as u8], 1024).is_err());
        assert!(unpack(&[TAG_PACKED, HEX32, 1, 2], 1024).is_err());
        assert!(
            unpack(&pack(SETTLED.as_bytes()), 100).is_err(),
            "longer than allowed"
        );
    }

    #[test]
    fn every_token_starts_with_a_byte_the_packer_looks_at() {
        assert!(TOKENS
            .iter()
            .all(|t| matches!(t.as_bytes()[0], b'{' | b'"' | b',')));
        assert!(TOKENS.len() <= usize::from(HEX32 - 0x80));
    }

    proptest! {
        #[test]
        fn every_body_reads_back_exactly(
            parts in proptest::collection::vec(
                prop_oneof![
                    proptest::sample::select(TOKENS.to_vec()).prop_map(String::from),
                    "[0-9a-f]{30,40}",
                    "[0-9]{1,22}",
                    "[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}",
                    "\\PC{0,8}",
                    any::<u8>().prop_map(|b| char::from(b % 0x80).to_string()),
                ],
                0..20,
            )
        ) {
            let body = parts.concat();
            let packed = pack(body.as_bytes());
            prop_assert_eq!(unpack(&packed, 4096).unwrap(), body.as_bytes());
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = unpack(&bytes, 1024);
        }
    }
}
