//! Byte layouts of ledger objects in the journal (and of accounts and scalars in the index):
//! fixed-size, little-endian. Documented in docs/JOURNAL_FORMAT.md ("Payload kinds"); change both
//! together. The index's transfers and account events use the compact form of [`crate::compact`].

use clearhouse_ledger::{Account, AccountFlags, LedgerScalars, Transfer, TransferFlags};

pub const ACCOUNT_SIZE: usize = 128;
pub const TRANSFER_SIZE: usize = 128;

/// Journal record kinds.
pub const KIND_CREATE_ACCOUNTS: u16 = 1;
pub const KIND_CREATE_TRANSFERS: u16 = 2;
pub const KIND_PULSE: u16 = 3;
/// Transfers and application records in one atomic, durable batch ([`encode_submit`]).
pub const KIND_SUBMIT: u16 = 4;
/// Retention: what leaves the index ([`encode_prune`]).
pub const KIND_PRUNE: u16 = 5;

/// Most keys in each list of one prune.
pub const PRUNE_KEYS_MAX: usize = 16_384;
/// Longest replacement value of a pruned record (a tombstone, not a record).
pub const PRUNE_REPLACEMENT_MAX: usize = 64;

/// Largest value of one application record.
pub const RECORD_VALUE_MAX: usize = 4096;
/// Most alias keys of one application record.
pub const RECORD_ALIASES_MAX: usize = 4;
/// Most application records in one batch.
pub const RECORD_PUTS_MAX: usize = 8189;

/// An application record written with a batch of transfers: `value` is stored under `key`
/// (replacing any earlier value), each alias then resolves to `key`, and `open` keeps the key in
/// the set of open records (so an application can find its unfinished work after a restart).
/// With `when_transfer_ok = Some(i)` the record is written only if transfer `i` of the same batch
/// succeeded, atomically with it. A record with a `voucher` appends that body to the voucher
/// chain (see [`crate::vouchers`]) when, and only when, the record is written.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecordPut {
    pub key: u128,
    pub value: Vec<u8>,
    pub open: bool,
    pub aliases: Vec<u128>,
    pub when_transfer_ok: Option<u32>,
    pub voucher: Option<Vec<u8>>,
}

/// Retention: what one journaled prune removes from the index (the journal and its replicas
/// replay it, so every copy of the index forgets the same things). The ledger's balances and
/// accounts are untouched: only the history of finished work goes.
/// - `delete`: application records to remove, with their open mark (an open record is kept);
/// - `replace`: records to replace with a short value (a tombstone the application still reads
///   by its key; the index keeps tombstones apart from the live records);
/// - `aliases`: alias keys to remove;
/// - `transfers`: transfers to remove from the index (a pending one is refused);
/// - `vouchers_through`/`anchor_hash`: vouchers 1..=through leave the index, and the chain is
///   anchored at (through, hash), which must be the stored hash of voucher `through`;
/// - `events_before`: each account's event chunks that lie wholly before this timestamp go
///   (its last chunk starting at or before it stays).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Prune {
    pub delete: Vec<u128>,
    pub replace: Vec<(u128, Vec<u8>)>,
    pub aliases: Vec<u128>,
    pub transfers: Vec<u128>,
    pub vouchers_through: u64,
    pub anchor_hash: [u8; 32],
    pub events_before: u64,
}

/// A prune payload: header (8), vouchers_through (u64), anchor hash (32), events_before (u64),
/// counts of delete, replace, aliases, transfers (u32 each), the delete keys, each replacement as
/// key (16), length (u8) and bytes, the aliases, the transfer ids (16 bytes each).
pub fn encode_prune(prune: &Prune) -> Vec<u8> {
    let mut out = Vec::with_capacity(
        PAYLOAD_HEADER_SIZE
            + 64
            + 16 * (prune.delete.len() + prune.aliases.len() + prune.transfers.len())
            + 40 * prune.replace.len(),
    );
    out.extend_from_slice(&[0u8; PAYLOAD_HEADER_SIZE]);
    let mut w = Writer(&mut out);
    w.u64(prune.vouchers_through);
    w.0.extend_from_slice(&prune.anchor_hash);
    w.u64(prune.events_before);
    for count in [
        prune.delete.len(),
        prune.replace.len(),
        prune.aliases.len(),
        prune.transfers.len(),
    ] {
        w.u32(count as u32);
    }
    for key in &prune.delete {
        w.u128(*key);
    }
    for (key, value) in &prune.replace {
        w.u128(*key);
        w.0.push(value.len() as u8);
        w.0.extend_from_slice(value);
    }
    for key in prune.aliases.iter().chain(&prune.transfers) {
        w.u128(*key);
    }
    out
}

/// Decodes a prune payload ([`encode_prune`]); refuses overlong lists and trailing bytes.
pub fn decode_prune(payload: &[u8]) -> Result<Prune, CodecError> {
    sealed_results(payload)?;
    let bytes = &payload[PAYLOAD_HEADER_SIZE..];
    let short = |what, expected, found| CodecError {
        what,
        expected,
        found,
    };
    if bytes.len() < 64 {
        return Err(short("prune header", 64, bytes.len()));
    }
    let mut r = Reader(bytes);
    let vouchers_through = r.u64();
    let anchor_hash = r.take::<32>();
    let events_before = r.u64();
    let counts = [r.u32(), r.u32(), r.u32(), r.u32()].map(|c| c as usize);
    if let Some(&count) = counts.iter().find(|c| **c > PRUNE_KEYS_MAX) {
        return Err(short("prune list", PRUNE_KEYS_MAX, count));
    }
    let keys = |r: &mut Reader, count: usize| -> Result<Vec<u128>, CodecError> {
        if r.0.len() / 16 < count {
            return Err(short("prune keys", count * 16, r.0.len()));
        }
        Ok((0..count).map(|_| r.u128()).collect())
    };
    let delete = keys(&mut r, counts[0])?;
    let mut replace = Vec::with_capacity(counts[1]);
    for _ in 0..counts[1] {
        if r.0.len() < 17 {
            return Err(short("prune replacement", 17, r.0.len()));
        }
        let key = r.u128();
        let [length] = r.take::<1>();
        let length = length as usize;
        if length > PRUNE_REPLACEMENT_MAX || r.0.len() < length {
            return Err(short("prune replacement value", length, r.0.len()));
        }
        replace.push((key, r.0[..length].to_vec()));
        r.0 = &r.0[length..];
    }
    let aliases = keys(&mut r, counts[2])?;
    let transfers = keys(&mut r, counts[3])?;
    if !r.0.is_empty() {
        return Err(short("end of prune payload", 0, r.0.len()));
    }
    Ok(Prune {
        delete,
        replace,
        aliases,
        transfers,
        vouchers_through,
        anchor_hash,
        events_before,
    })
}

#[derive(Debug, thiserror::Error)]
#[error("codec: {what}: expected {expected} bytes, found {found}")]
pub struct CodecError {
    pub what: &'static str,
    pub expected: usize,
    pub found: usize,
}

struct Writer<'a>(&'a mut Vec<u8>);
impl Writer<'_> {
    fn u128(&mut self, v: u128) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
}

struct Reader<'a>(&'a [u8]);
impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let (head, rest) = self.0.split_at(N);
        self.0 = rest;
        head.try_into().expect("length checked by the caller")
    }
    fn u128(&mut self) -> u128 {
        u128::from_le_bytes(self.take())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take())
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take())
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.take())
    }
}

/// Account, 128 bytes: id, debits_pending, debits_posted, credits_pending, credits_posted,
/// user_data_128 (6 x u128 = 96), user_data_64 (8), user_data_32 (4), ledger (4), code (2),
/// flags (2), timestamp (8), reserved zero (4).
pub fn encode_account(out: &mut Vec<u8>, a: &Account) {
    let mut w = Writer(out);
    w.u128(a.id);
    w.u128(a.debits_pending);
    w.u128(a.debits_posted);
    w.u128(a.credits_pending);
    w.u128(a.credits_posted);
    w.u128(a.user_data_128);
    w.u64(a.user_data_64);
    w.u32(a.user_data_32);
    w.u32(a.ledger);
    w.u16(a.code);
    w.u16(a.flags.0);
    w.u64(a.timestamp);
    w.u32(0);
}

pub fn decode_account(bytes: &[u8]) -> Result<Account, CodecError> {
    check(bytes, ACCOUNT_SIZE, "account")?;
    let mut r = Reader(bytes);
    Ok(Account {
        id: r.u128(),
        debits_pending: r.u128(),
        debits_posted: r.u128(),
        credits_pending: r.u128(),
        credits_posted: r.u128(),
        user_data_128: r.u128(),
        user_data_64: r.u64(),
        user_data_32: r.u32(),
        ledger: r.u32(),
        code: r.u16(),
        flags: AccountFlags(r.u16()),
        timestamp: r.u64(),
    })
}

/// Transfer, 128 bytes: id, debit_account_id, credit_account_id, amount, pending_id,
/// user_data_128 (6 x u128 = 96), user_data_64 (8), user_data_32 (4), timeout (4), ledger (4),
/// code (2), flags (2), timestamp (8).
pub fn encode_transfer(out: &mut Vec<u8>, t: &Transfer) {
    out.extend_from_slice(&transfer_bytes(t));
}

/// The 128-byte layout of a transfer, built on the stack and appended in one copy.
#[inline]
fn transfer_bytes(t: &Transfer) -> [u8; TRANSFER_SIZE] {
    let mut b = [0u8; TRANSFER_SIZE];
    b[0..16].copy_from_slice(&t.id.to_le_bytes());
    b[16..32].copy_from_slice(&t.debit_account_id.to_le_bytes());
    b[32..48].copy_from_slice(&t.credit_account_id.to_le_bytes());
    b[48..64].copy_from_slice(&t.amount.to_le_bytes());
    b[64..80].copy_from_slice(&t.pending_id.to_le_bytes());
    b[80..96].copy_from_slice(&t.user_data_128.to_le_bytes());
    b[96..104].copy_from_slice(&t.user_data_64.to_le_bytes());
    b[104..108].copy_from_slice(&t.user_data_32.to_le_bytes());
    b[108..112].copy_from_slice(&t.timeout.to_le_bytes());
    b[112..116].copy_from_slice(&t.ledger.to_le_bytes());
    b[116..118].copy_from_slice(&t.code.to_le_bytes());
    b[118..120].copy_from_slice(&t.flags.0.to_le_bytes());
    b[120..128].copy_from_slice(&t.timestamp.to_le_bytes());
    b
}

pub fn decode_transfer(bytes: &[u8]) -> Result<Transfer, CodecError> {
    check(bytes, TRANSFER_SIZE, "transfer")?;
    let mut r = Reader(bytes);
    Ok(Transfer {
        id: r.u128(),
        debit_account_id: r.u128(),
        credit_account_id: r.u128(),
        amount: r.u128(),
        pending_id: r.u128(),
        user_data_128: r.u128(),
        user_data_64: r.u64(),
        user_data_32: r.u32(),
        timeout: r.u32(),
        ledger: r.u32(),
        code: r.u16(),
        flags: TransferFlags(r.u16()),
        timestamp: r.u64(),
    })
}

/// Bytes before the events in every journal payload: the results digest (u32) and the number of
/// results it covers (u32).
pub const PAYLOAD_HEADER_SIZE: usize = 8;

/// A journal payload: a zeroed results digest (filled in by [`seal_results`] once the batch has
/// run), then the events.
pub fn encode_batch<T>(events: &[T], encode: fn(&mut Vec<u8>, &T)) -> Vec<u8> {
    let mut out = Vec::with_capacity(PAYLOAD_HEADER_SIZE + events.len() * 128);
    out.extend_from_slice(&[0u8; PAYLOAD_HEADER_SIZE]);
    for event in events {
        encode(&mut out, event);
    }
    out
}

/// CRC32C of the result codes (u32 little-endian each), so replay can prove it reproduced them.
pub fn results_digest(codes: impl Iterator<Item = u32>) -> (u32, u32) {
    let mut bytes = Vec::new();
    let mut count = 0u32;
    for code in codes {
        bytes.extend_from_slice(&code.to_le_bytes());
        count += 1;
    }
    (crc32c::crc32c(&bytes), count)
}

/// Writes the results digest into a payload's header.
pub fn seal_results(payload: &mut [u8], digest: (u32, u32)) {
    payload[0..4].copy_from_slice(&digest.0.to_le_bytes());
    payload[4..8].copy_from_slice(&digest.1.to_le_bytes());
}

/// The results digest a payload was sealed with.
pub fn sealed_results(payload: &[u8]) -> Result<(u32, u32), CodecError> {
    if payload.len() < PAYLOAD_HEADER_SIZE {
        return Err(CodecError {
            what: "payload header",
            expected: PAYLOAD_HEADER_SIZE,
            found: payload.len(),
        });
    }
    Ok((
        u32::from_le_bytes(payload[0..4].try_into().expect("4 bytes")),
        u32::from_le_bytes(payload[4..8].try_into().expect("4 bytes")),
    ))
}

/// Decodes the events of a journal payload (after its header).
pub fn decode_batch<T>(
    payload: &[u8],
    decode: fn(&[u8]) -> Result<T, CodecError>,
) -> Result<Vec<T>, CodecError> {
    sealed_results(payload)?;
    let bytes = &payload[PAYLOAD_HEADER_SIZE..];
    if !bytes.len().is_multiple_of(128) {
        return Err(CodecError {
            what: "batch of 128-byte events",
            expected: bytes.len() / 128 * 128,
            found: bytes.len(),
        });
    }
    bytes.chunks_exact(128).map(decode).collect()
}

/// A submit payload: header (8), transfer count (u32), record count (u32), the transfers
/// (128 bytes each), then each record: key (16), condition (u32, u32::MAX = always), open (u8),
/// alias count (u8), voucher length (u16, 0 = no voucher), value length (u32), aliases (16 each),
/// value bytes, voucher bytes.
pub fn encode_submit(transfers: &[Transfer], puts: &[RecordPut]) -> Vec<u8> {
    let mut out =
        Vec::with_capacity(PAYLOAD_HEADER_SIZE + 8 + transfers.len() * 128 + puts.len() * 128);
    out.extend_from_slice(&[0u8; PAYLOAD_HEADER_SIZE]);
    let mut w = Writer(&mut out);
    w.u32(transfers.len() as u32);
    w.u32(puts.len() as u32);
    for transfer in transfers {
        encode_transfer(&mut out, transfer);
    }
    for put in puts {
        let mut w = Writer(&mut out);
        w.u128(put.key);
        w.u32(put.when_transfer_ok.unwrap_or(u32::MAX));
        w.0.push(put.open as u8);
        w.0.push(put.aliases.len() as u8);
        w.u16(put.voucher.as_ref().map_or(0, |v| v.len() as u16));
        w.u32(put.value.len() as u32);
        for alias in &put.aliases {
            w.u128(*alias);
        }
        out.extend_from_slice(&put.value);
        if let Some(voucher) = &put.voucher {
            out.extend_from_slice(voucher);
        }
    }
    out
}

/// Decodes a submit payload ([`encode_submit`]).
pub fn decode_submit(payload: &[u8]) -> Result<(Vec<Transfer>, Vec<RecordPut>), CodecError> {
    sealed_results(payload)?;
    let bytes = &payload[PAYLOAD_HEADER_SIZE..];
    if bytes.len() < 8 {
        return Err(CodecError {
            what: "submit counts",
            expected: 8,
            found: bytes.len(),
        });
    }
    let mut r = Reader(bytes);
    let transfer_count = r.u32() as usize;
    let put_count = r.u32() as usize;
    let mut rest = r.0;
    let short = |what, expected, found| CodecError {
        what,
        expected,
        found,
    };
    if rest.len() / 128 < transfer_count {
        return Err(short("submit transfers", transfer_count * 128, rest.len()));
    }
    let mut transfers = Vec::with_capacity(transfer_count);
    for _ in 0..transfer_count {
        transfers.push(decode_transfer(&rest[..128])?);
        rest = &rest[128..];
    }
    let mut puts = Vec::with_capacity(put_count.min(RECORD_PUTS_MAX));
    for _ in 0..put_count {
        if rest.len() < 28 {
            return Err(short("record header", 28, rest.len()));
        }
        let mut r = Reader(rest);
        let key = r.u128();
        let when = r.u32();
        let [open, alias_count] = r.take::<2>();
        let voucher_len = r.u16() as usize;
        let value_len = r.u32() as usize;
        let body = alias_count as usize * 16 + value_len + voucher_len;
        if alias_count as usize > RECORD_ALIASES_MAX
            || value_len > RECORD_VALUE_MAX
            || voucher_len > crate::vouchers::VOUCHER_BODY_MAX
            || r.0.len() < body
        {
            return Err(short("record body", body, r.0.len()));
        }
        let mut aliases = Vec::with_capacity(alias_count as usize);
        for _ in 0..alias_count {
            aliases.push(r.u128());
        }
        let value = r.0[..value_len].to_vec();
        let voucher = (voucher_len > 0).then(|| r.0[value_len..value_len + voucher_len].to_vec());
        rest = &r.0[value_len + voucher_len..];
        puts.push(RecordPut {
            key,
            value,
            open: open != 0,
            aliases,
            when_transfer_ok: (when != u32::MAX).then_some(when),
            voucher,
        });
    }
    if !rest.is_empty() {
        return Err(short("end of submit payload", 0, rest.len()));
    }
    Ok((transfers, puts))
}

/// Ledger scalars, as the index's `meta` table keeps them: last_timestamp (8), transfer_id_max
/// (16), transfers_count (8).
pub fn encode_scalars(scalars: &LedgerScalars) -> Vec<u8> {
    let mut out = Vec::with_capacity(32);
    let mut w = Writer(&mut out);
    w.u64(scalars.last_timestamp);
    w.u128(scalars.transfer_id_max);
    w.u64(scalars.transfers_count);
    out
}

pub fn decode_scalars(bytes: &[u8]) -> Result<LedgerScalars, CodecError> {
    check(bytes, 32, "scalars")?;
    let mut r = Reader(bytes);
    Ok(LedgerScalars {
        last_timestamp: r.u64(),
        transfer_id_max: r.u128(),
        transfers_count: r.u64(),
    })
}

fn check(bytes: &[u8], expected: usize, what: &'static str) -> Result<(), CodecError> {
    if bytes.len() == expected {
        Ok(())
    } else {
        Err(CodecError {
            what,
            expected,
            found: bytes.len(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn submit_payloads_round_trip_and_truncation_is_an_error() {
        let transfers = vec![Transfer {
            id: 7,
            amount: 9,
            ..Transfer::default()
        }];
        let puts = vec![
            RecordPut {
                key: 1,
                value: b"hello".to_vec(),
                open: true,
                aliases: vec![2, 3],
                when_transfer_ok: Some(0),
                voucher: Some(b"event".to_vec()),
            },
            RecordPut {
                key: u128::MAX,
                value: vec![],
                open: false,
                aliases: vec![],
                when_transfer_ok: None,
                voucher: None,
            },
        ];
        let payload = encode_submit(&transfers, &puts);
        assert_eq!(decode_submit(&payload).unwrap(), (transfers, puts));
        for cut in 0..payload.len() {
            assert!(decode_submit(&payload[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn prune_payloads_round_trip_and_truncation_is_an_error() {
        let prune = Prune {
            delete: vec![1, u128::MAX],
            replace: vec![(5, vec![2, 0, 1]), (6, vec![])],
            aliases: vec![7, 8, 9],
            transfers: vec![10],
            vouchers_through: 42,
            anchor_hash: [3; 32],
            events_before: 99,
        };
        let payload = encode_prune(&prune);
        assert_eq!(decode_prune(&payload).unwrap(), prune);
        for cut in 0..payload.len() {
            assert!(decode_prune(&payload[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = payload.clone();
        longer.push(0);
        assert!(decode_prune(&longer).is_err());
        assert_eq!(
            decode_prune(&encode_prune(&Prune::default())).unwrap(),
            Prune::default()
        );
    }

    #[test]
    fn layouts_are_128_bytes_and_round_trip() {
        let account = Account {
            id: u128::MAX - 1,
            debits_pending: 1,
            debits_posted: 2,
            credits_pending: 3,
            credits_posted: 4,
            user_data_128: 5,
            user_data_64: 6,
            user_data_32: 7,
            ledger: 8,
            code: 9,
            flags: AccountFlags::HISTORY,
            timestamp: 10,
        };
        let mut bytes = Vec::new();
        encode_account(&mut bytes, &account);
        assert_eq!(bytes.len(), ACCOUNT_SIZE);
        assert_eq!(decode_account(&bytes).unwrap(), account);
        let transfer = Transfer {
            id: 1,
            debit_account_id: 2,
            credit_account_id: 3,
            amount: u128::MAX,
            pending_id: 5,
            user_data_128: 6,
            user_data_64: 7,
            user_data_32: 8,
            timeout: 9,
            ledger: 10,
            code: 11,
            flags: TransferFlags::PENDING,
            timestamp: 12,
        };
        let mut bytes = Vec::new();
        encode_transfer(&mut bytes, &transfer);
        assert_eq!(bytes.len(), TRANSFER_SIZE);
        assert_eq!(decode_transfer(&bytes).unwrap(), transfer);
        assert!(decode_transfer(&bytes[..100]).is_err());
    }
}
