//! The index's value encoding: transfers and account events in a compact, variable-length form.
//!
//! The journal keeps the fixed 128-byte layouts of `codec` (simple to check, cheap to write); the
//! index stores every transfer three times (by id, and inline in the account events of both
//! accounts) and is bound by the bytes its copy-on-write B-tree writes, so there each value is
//! packed: LEB128 varints, fields that are zero left out behind a presence mask, the account an
//! event belongs to left out of its transfer, timestamps and balances as deltas from the previous
//! event of the same chunk. Documented byte by byte in docs/JOURNAL_FORMAT.md ("Index format");
//! change both together and bump [`INDEX_FORMAT`].
//!
//! Decoding never panics on hostile bytes: a truncated or overlong value is a [`CodecError`].

use clearhouse_ledger::{
    AccountEvent, AccountEventKind, Balance, PendingStatus, StoredTransfer, Transfer, TransferFlags,
};

use crate::codec::CodecError;

/// The version of the index's value encoding, kept in the index's `meta` table.
pub const INDEX_FORMAT: u32 = 4;
/// The earlier formats this build still opens (the index is marked 4 on open): their values are
/// those of format 4 without the bits added since (format 2: `PENDING_IS_DELTA` and `ID_IS_KEY`;
/// format 3: `TIMESTAMP_NEAR_ID`), so they decode unchanged.
pub const INDEX_FORMATS_READABLE: [u32; 2] = [2, 3];

const DEBIT_IS_SELF: u16 = 1 << 0;
const CREDIT_IS_SELF: u16 = 1 << 1;
const HAS_PENDING_ID: u16 = 1 << 2;
const HAS_USER_DATA_128: u16 = 1 << 3;
const HAS_USER_DATA_64: u16 = 1 << 4;
const HAS_USER_DATA_32: u16 = 1 << 5;
const HAS_TIMEOUT: u16 = 1 << 6;
const HAS_FLAGS: u16 = 1 << 7;
/// Format 3: the pending id is stored as a zigzag delta from the transfer's id (a post or void
/// whose id is its pending transfer's plus 1 or 2, as the switch's are, takes one byte, not 19).
const PENDING_IS_DELTA: u16 = 1 << 8;
/// Format 3: the id is not stored; it is the table's key.
const ID_IS_KEY: u16 = 1 << 9;
/// Format 4: the timestamp is a zigzag delta from the id's high 64 bits, not from the usual base.
/// Ids that begin with a time (the switch's payment keys: acceptance ns, then a hash) are
/// committed microseconds to milliseconds after it: 3 or 4 bytes instead of 9.
const TIMESTAMP_NEAR_ID: u16 = 1 << 10;
/// Format 4, `transfers` table only: the debit (bit 11) or credit (bit 12) account is a varint
/// account number (the index's `account_numbers` table), not its 16-byte id.
const DEBIT_IS_NUMBER: u16 = 1 << 11;
const CREDIT_IS_NUMBER: u16 = 1 << 12;
const MASK_ALL: u16 = (1 << 13) - 1;

/// Bit of an event's kind byte: a balance follows the transfer.
const EVENT_HAS_BALANCE: u8 = 0x80;
/// Bit of an event's kind byte (format 3): the event names its transfer by id (the `transfers`
/// table, written in the same index transaction, holds it) instead of holding a copy.
const EVENT_TRANSFER_BY_ID: u8 = 0x40;

/// Appends `v` as a LEB128 varint (also used by the switch's binary payment records).
#[inline]
pub fn put_u64(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Appends `v` as a LEB128 varint.
#[inline]
pub fn put_u128(out: &mut Vec<u8>, mut v: u128) {
    while v > u64::MAX as u128 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    put_u64(out, v as u64);
}

#[inline]
fn zigzag_u128(current: u128, previous: u128) -> u128 {
    let delta = current.wrapping_sub(previous) as i128;
    ((delta << 1) ^ (delta >> 127)) as u128
}

#[inline]
fn unzigzag_u128(z: u128, previous: u128) -> u128 {
    let delta = ((z >> 1) as i128) ^ -((z & 1) as i128);
    previous.wrapping_add(delta as u128)
}

#[inline]
fn zigzag_u64(current: u64, base: u64) -> u64 {
    let delta = current.wrapping_sub(base) as i64;
    ((delta << 1) ^ (delta >> 63)) as u64
}

/// Bytes of `v` as a LEB128 varint.
#[inline]
fn varint_len(v: u64) -> u32 {
    (64 - v.leading_zeros()).max(1).div_ceil(7)
}

#[inline]
fn unzigzag_u64(z: u64, base: u64) -> u64 {
    let delta = ((z >> 1) as i64) ^ -((z & 1) as i64);
    base.wrapping_add(delta as u64)
}

fn error(what: &'static str, expected: usize, found: usize) -> CodecError {
    CodecError {
        what,
        expected,
        found,
    }
}

/// Reads what [`put_u64`] and [`put_u128`] wrote, and raw bytes; every read is bounds-checked and
/// names `what` in its error.
pub struct Cursor<'a> {
    bytes: &'a [u8],
    what: &'static str,
}

impl<'a> Cursor<'a> {
    pub fn new(bytes: &'a [u8], what: &'static str) -> Cursor<'a> {
        Cursor { bytes, what }
    }

    /// The bytes not read yet.
    pub fn remaining(&self) -> &'a [u8] {
        self.bytes
    }

    /// The next `n` bytes.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], CodecError> {
        if self.bytes.len() < n {
            return Err(error(self.what, n, self.bytes.len()));
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    pub fn u8(&mut self) -> Result<u8, CodecError> {
        let (&first, rest) = self
            .bytes
            .split_first()
            .ok_or_else(|| error(self.what, 1, 0))?;
        self.bytes = rest;
        Ok(first)
    }

    /// A LEB128 varint of at most `bits` bits, in its shortest form or not, but never longer than
    /// the type allows and never with bits beyond it.
    fn varint(&mut self, bits: u32) -> Result<u128, CodecError> {
        let mut value = 0u128;
        let mut shift = 0u32;
        loop {
            let byte = self.u8()?;
            let payload = (byte & 0x7f) as u128;
            if shift >= bits || (shift > 0 && bits - shift < 7 && payload >> (bits - shift) != 0) {
                return Err(error(
                    self.what,
                    (bits as usize).div_ceil(7),
                    shift as usize / 7 + 1,
                ));
            }
            value |= payload << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
            shift += 7;
        }
    }

    pub fn u128(&mut self) -> Result<u128, CodecError> {
        self.varint(128)
    }
    pub fn u64(&mut self) -> Result<u64, CodecError> {
        Ok(self.varint(64)? as u64)
    }
    fn u32(&mut self) -> Result<u32, CodecError> {
        Ok(self.varint(32)? as u32)
    }
    fn u16(&mut self) -> Result<u16, CodecError> {
        Ok(self.varint(16)? as u16)
    }
}

/// A transfer relative to `own` (the account whose event this is; 0 for none) and to `base` (the
/// timestamp it is stored near); its id left out when `id_is_key` (the reader knows it).
fn put_transfer(
    out: &mut Vec<u8>,
    t: &Transfer,
    own: u128,
    base: u64,
    id_is_key: bool,
    number_of: &mut dyn FnMut(u128) -> Option<u32>,
) {
    let mut mask = 0u16;
    if id_is_key {
        mask |= ID_IS_KEY;
    }
    if t.debit_account_id == own {
        mask |= DEBIT_IS_SELF;
    }
    if t.credit_account_id == own {
        mask |= CREDIT_IS_SELF;
    }
    let debit_number = match mask & DEBIT_IS_SELF {
        0 => number_of(t.debit_account_id),
        _ => None,
    };
    let credit_number = match mask & CREDIT_IS_SELF {
        0 => number_of(t.credit_account_id),
        _ => None,
    };
    if debit_number.is_some() {
        mask |= DEBIT_IS_NUMBER;
    }
    if credit_number.is_some() {
        mask |= CREDIT_IS_NUMBER;
    }
    if t.pending_id != 0 {
        mask |= HAS_PENDING_ID | PENDING_IS_DELTA;
    }
    if t.user_data_128 != 0 {
        mask |= HAS_USER_DATA_128;
    }
    if t.user_data_64 != 0 {
        mask |= HAS_USER_DATA_64;
    }
    if t.user_data_32 != 0 {
        mask |= HAS_USER_DATA_32;
    }
    if t.timeout != 0 {
        mask |= HAS_TIMEOUT;
    }
    if t.flags.0 != 0 {
        mask |= HAS_FLAGS;
    }
    let near = (t.id >> 64) as u64;
    let base =
        if varint_len(zigzag_u64(t.timestamp, near)) < varint_len(zigzag_u64(t.timestamp, base)) {
            mask |= TIMESTAMP_NEAR_ID;
            near
        } else {
            base
        };
    put_u64(out, mask as u64);
    if !id_is_key {
        put_u128(out, t.id);
    }
    match debit_number {
        Some(number) => put_u64(out, number as u64),
        None if mask & DEBIT_IS_SELF == 0 => put_u128(out, t.debit_account_id),
        None => {}
    }
    match credit_number {
        Some(number) => put_u64(out, number as u64),
        None if mask & CREDIT_IS_SELF == 0 => put_u128(out, t.credit_account_id),
        None => {}
    }
    put_u128(out, t.amount);
    put_u64(out, t.ledger as u64);
    put_u64(out, t.code as u64);
    if mask & HAS_PENDING_ID != 0 {
        put_u128(out, zigzag_u128(t.pending_id, t.id));
    }
    if mask & HAS_USER_DATA_128 != 0 {
        put_u128(out, t.user_data_128);
    }
    if mask & HAS_USER_DATA_64 != 0 {
        put_u64(out, t.user_data_64);
    }
    if mask & HAS_USER_DATA_32 != 0 {
        put_u64(out, t.user_data_32 as u64);
    }
    if mask & HAS_TIMEOUT != 0 {
        put_u64(out, t.timeout as u64);
    }
    if mask & HAS_FLAGS != 0 {
        put_u64(out, t.flags.0 as u64);
    }
    put_u64(out, zigzag_u64(t.timestamp, base));
}

/// Reads what [`put_transfer`] wrote; `key` is the id when the value left it out (`None` where
/// no key holds it: then such a value is an error).
fn get_transfer(
    c: &mut Cursor,
    own: u128,
    base: u64,
    key: Option<u128>,
    numbered: &[u128],
) -> Result<Transfer, CodecError> {
    let mask = c.u16()?;
    if mask & !MASK_ALL != 0
        || (mask & PENDING_IS_DELTA != 0 && mask & HAS_PENDING_ID == 0)
        || (mask & DEBIT_IS_NUMBER != 0 && mask & DEBIT_IS_SELF != 0)
        || (mask & CREDIT_IS_NUMBER != 0 && mask & CREDIT_IS_SELF != 0)
        || (mask & ID_IS_KEY != 0 && key.is_none())
    {
        return Err(error(
            "transfer presence mask",
            MASK_ALL as usize,
            mask as usize,
        ));
    }
    let id = match key {
        Some(key) if mask & ID_IS_KEY != 0 => key,
        _ => c.u128()?,
    };
    let account = |c: &mut Cursor, is_self: u16, is_number: u16| {
        if mask & is_self != 0 {
            Ok(own)
        } else if mask & is_number != 0 {
            let number = c.u32()?;
            numbered
                .get(number as usize)
                .copied()
                .ok_or_else(|| error("account number", numbered.len(), number as usize))
        } else {
            c.u128()
        }
    };
    let debit_account_id = account(c, DEBIT_IS_SELF, DEBIT_IS_NUMBER)?;
    let credit_account_id = account(c, CREDIT_IS_SELF, CREDIT_IS_NUMBER)?;
    let amount = c.u128()?;
    let ledger = c.u32()?;
    let code = c.u16()?;
    let mut t = Transfer {
        id,
        debit_account_id,
        credit_account_id,
        amount,
        ledger,
        code,
        ..Transfer::default()
    };
    if mask & HAS_PENDING_ID != 0 {
        let stored = c.u128()?;
        t.pending_id = if mask & PENDING_IS_DELTA != 0 {
            unzigzag_u128(stored, id)
        } else {
            stored
        };
    }
    if mask & HAS_USER_DATA_128 != 0 {
        t.user_data_128 = c.u128()?;
    }
    if mask & HAS_USER_DATA_64 != 0 {
        t.user_data_64 = c.u64()?;
    }
    if mask & HAS_USER_DATA_32 != 0 {
        t.user_data_32 = c.u32()?;
    }
    if mask & HAS_TIMEOUT != 0 {
        t.timeout = c.u32()?;
    }
    if mask & HAS_FLAGS != 0 {
        t.flags = TransferFlags(c.u16()?);
    }
    let base = if mask & TIMESTAMP_NEAR_ID != 0 {
        (id >> 64) as u64
    } else {
        base
    };
    t.timestamp = unzigzag_u64(c.u64()?, base);
    Ok(t)
}

/// A transfer with its pending status, as the `transfers` table stores it (the key is its id, left
/// out of the value).
/// `number_of` gives an account's number, if it has (or may be given) one.
pub fn encode_stored_transfer(
    out: &mut Vec<u8>,
    stored: &StoredTransfer,
    number_of: &mut dyn FnMut(u128) -> Option<u32>,
) {
    out.push(stored.status as u8);
    put_transfer(out, &stored.transfer, 0, 0, true, number_of);
}

/// Reads a `transfers` value stored under `key`; `numbered[n]` is the id of account number `n`.
pub fn decode_stored_transfer(
    key: u128,
    bytes: &[u8],
    numbered: &[u128],
) -> Result<StoredTransfer, CodecError> {
    let mut c = Cursor {
        bytes,
        what: "stored transfer",
    };
    let status = c.u8()?;
    let status = PendingStatus::from_u8(status)
        .ok_or_else(|| error("pending status", 1, status as usize))?;
    let transfer = get_transfer(&mut c, 0, 0, Some(key), numbered)?;
    if !c.bytes.is_empty() {
        return Err(error("stored transfer trailing bytes", 0, c.bytes.len()));
    }
    Ok(StoredTransfer { transfer, status })
}

/// Appends the events of one chunk (one account, timestamps strictly increasing, the first equal
/// to the chunk's key); each event is stored relative to the one before it.
pub struct ChunkWriter {
    timestamp: u64,
    balance: Balance,
}

impl ChunkWriter {
    pub fn new(first_timestamp: u64) -> ChunkWriter {
        ChunkWriter {
            timestamp: first_timestamp,
            balance: Balance::default(),
        }
    }

    /// The timestamp of the last event pushed (of the chunk's key before the first).
    pub fn last_timestamp(&self) -> u64 {
        self.timestamp
    }

    pub fn push(&mut self, out: &mut Vec<u8>, event: &AccountEvent) {
        self.push_with(out, event, true);
    }

    /// `by_id` false writes the transfer inline, as format 2 did (kept to test reading it).
    fn push_with(&mut self, out: &mut Vec<u8>, event: &AccountEvent, by_id: bool) {
        assert!(
            event.timestamp >= self.timestamp,
            "account events of a chunk are in timestamp order"
        );
        put_u64(out, event.timestamp - self.timestamp);
        self.timestamp = event.timestamp;
        let kind = event.kind as u8;
        debug_assert_eq!(kind & (EVENT_HAS_BALANCE | EVENT_TRANSFER_BY_ID), 0);
        let by_id_bit = if by_id { EVENT_TRANSFER_BY_ID } else { 0 };
        let balance_bit = if event.balance.is_some() {
            EVENT_HAS_BALANCE
        } else {
            0
        };
        out.push(kind | by_id_bit | balance_bit);
        if by_id {
            put_u128(out, event.transfer.id);
        } else {
            put_transfer(
                out,
                &event.transfer,
                event.account_id,
                event.timestamp,
                false,
                &mut |_| None,
            );
        }
        if let Some(balance) = event.balance {
            let previous = self.balance;
            put_u128(
                out,
                zigzag_u128(balance.debits_pending, previous.debits_pending),
            );
            put_u128(
                out,
                zigzag_u128(balance.debits_posted, previous.debits_posted),
            );
            put_u128(
                out,
                zigzag_u128(balance.credits_pending, previous.credits_pending),
            );
            put_u128(
                out,
                zigzag_u128(balance.credits_posted, previous.credits_posted),
            );
            self.balance = balance;
        }
    }
}

/// One decoded account event. When `transfer_by_id`, the chunk named its transfer by id only:
/// `event.transfer` holds just that id until the reader fills it from the `transfers` table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodedEvent {
    pub event: AccountEvent,
    pub transfer_by_id: bool,
}

/// What a chunk keeps of a transfer: its id (the rest is in the `transfers` table).
pub fn transfer_reference(transfer: &Transfer) -> Transfer {
    Transfer {
        id: transfer.id,
        ..Transfer::default()
    }
}

/// Decodes every event of a chunk of `account_id` whose key timestamp is `first_timestamp`.
pub fn decode_account_events(
    account_id: u128,
    first_timestamp: u64,
    bytes: &[u8],
    out: &mut Vec<DecodedEvent>,
) -> Result<(), CodecError> {
    let mut c = Cursor {
        bytes,
        what: "account event",
    };
    let mut timestamp = first_timestamp;
    let mut previous = Balance::default();
    while !c.bytes.is_empty() {
        timestamp = timestamp
            .checked_add(c.u64()?)
            .ok_or_else(|| error("account event timestamp", 8, 9))?;
        let kind_byte = c.u8()?;
        let kind =
            AccountEventKind::from_u8(kind_byte & !(EVENT_HAS_BALANCE | EVENT_TRANSFER_BY_ID))
                .ok_or_else(|| error("account event kind", 1, kind_byte as usize))?;
        let transfer_by_id = kind_byte & EVENT_TRANSFER_BY_ID != 0;
        let transfer = if transfer_by_id {
            Transfer {
                id: c.u128()?,
                ..Transfer::default()
            }
        } else {
            get_transfer(&mut c, account_id, timestamp, None, &[])?
        };
        let balance = if kind_byte & EVENT_HAS_BALANCE != 0 {
            let balance = Balance {
                debits_pending: unzigzag_u128(c.u128()?, previous.debits_pending),
                debits_posted: unzigzag_u128(c.u128()?, previous.debits_posted),
                credits_pending: unzigzag_u128(c.u128()?, previous.credits_pending),
                credits_posted: unzigzag_u128(c.u128()?, previous.credits_posted),
            };
            previous = balance;
            Some(balance)
        } else {
            None
        };
        out.push(DecodedEvent {
            event: AccountEvent {
                account_id,
                timestamp,
                transfer,
                kind,
                balance,
            },
            transfer_by_id,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn transfer() -> impl Strategy<Value = Transfer> {
        // Each field either zero, small, or anything: the presence mask and varint widths.
        fn v128() -> impl Strategy<Value = u128> {
            prop_oneof![Just(0u128), 1u128..300, any::<u128>(), Just(u128::MAX)]
        }
        fn v64() -> impl Strategy<Value = u64> {
            prop_oneof![Just(0u64), 1u64..300, any::<u64>(), Just(u64::MAX)]
        }
        (
            (v128(), v128(), v128(), v128(), v128(), v128()),
            (
                v64(),
                any::<u32>(),
                any::<u32>(),
                any::<u32>(),
                any::<u16>(),
            ),
            (any::<u16>(), v64()),
        )
            .prop_map(
                |(
                    (id, debit, credit, amount, pending_id, ud128),
                    (ud64, ud32, timeout, ledger, code),
                    (flags, timestamp),
                )| Transfer {
                    id,
                    debit_account_id: debit,
                    credit_account_id: credit,
                    amount,
                    pending_id,
                    user_data_128: ud128,
                    user_data_64: ud64,
                    user_data_32: ud32,
                    timeout,
                    ledger,
                    code,
                    flags: TransferFlags(flags),
                    timestamp,
                },
            )
    }

    #[test]
    fn format_2_values_still_decode_and_format_3_posts_are_short() {
        // Format 2: status, mask (pending id present), id, debit, credit, amount, ledger, code,
        // pending id as is, timestamp.
        let format_2 = [1u8, 0x04, 5, 7, 8, 9, 1, 2, 3, 20];
        let stored = decode_stored_transfer(5, &format_2, &[]).unwrap();
        assert_eq!(stored.status, PendingStatus::from_u8(1).unwrap());
        let t = stored.transfer;
        assert_eq!(
            (t.id, t.debit_account_id, t.credit_account_id, t.amount),
            (5, 7, 8, 9)
        );
        assert_eq!((t.ledger, t.code, t.pending_id, t.timestamp), (1, 2, 3, 10));
        // A post whose id is its pending transfer's plus one: neither id costs 19 bytes.
        let pending = u128::MAX / 3;
        let post = StoredTransfer {
            transfer: Transfer {
                id: pending | 1,
                pending_id: pending,
                debit_account_id: 7,
                credit_account_id: 8,
                amount: 9,
                ledger: 1,
                code: 2,
                flags: TransferFlags(0),
                timestamp: 10,
                ..Transfer::default()
            },
            status: PendingStatus::from_u8(0).unwrap(),
        };
        let mut out = Vec::new();
        encode_stored_transfer(&mut out, &post, &mut |_| None);
        assert!(out.len() <= 12, "{} bytes", out.len());
        assert_eq!(
            decode_stored_transfer(pending | 1, &out, &[]).unwrap(),
            post
        );
        // A value that leaves its id to the key means nothing without one.
        let mut c = Cursor::new(&out[1..], "test");
        assert!(get_transfer(&mut c, 0, 0, None, &[]).is_err());
    }

    proptest! {
        #[test]
        fn stored_transfers_round_trip(t in transfer(), status in 0u8..5, numbers in 0u8..4) {
            let stored = StoredTransfer { transfer: t, status: PendingStatus::from_u8(status).unwrap() };
            // Accounts by number: neither, the debit, the credit, or both (numbers 0 to 300).
            let numbered: Vec<u128> = (0..300u128).map(|n| n + (1 << 100)).chain([t.debit_account_id, t.credit_account_id]).collect();
            let mut number_of = |id: u128| {
                let wanted = (id == t.debit_account_id && numbers & 1 != 0) || (id == t.credit_account_id && numbers & 2 != 0);
                wanted.then(|| numbered.iter().position(|n| *n == id).unwrap() as u32)
            };
            let mut out = Vec::new();
            encode_stored_transfer(&mut out, &stored, &mut number_of);
            let key = stored.transfer.id;
            prop_assert_eq!(decode_stored_transfer(key, &out, &numbered).unwrap(), stored);
            let mut plain = Vec::new();
            encode_stored_transfer(&mut plain, &stored, &mut |_| None);
            // Without the numbers, a numbered value is an error, never a wrong account.
            prop_assert!(out == plain || decode_stored_transfer(key, &out, &numbered[..1]).is_err());
            // Every strict prefix is an error, never a panic or a wrong value.
            for cut in 0..out.len() {
                prop_assert!(decode_stored_transfer(key, &out[..cut], &numbered).is_err());
            }
        }

        #[test]
        fn chunks_round_trip(
            account in 1u128..5,
            events in proptest::collection::vec(
                (transfer(), 0u64..1_000_000, 1u8..5, proptest::option::of(any::<[u128; 4]>()), any::<bool>()),
                1..20,
            ),
            first in any::<u32>(),
        ) {
            let mut timestamp = first as u64;
            let mut list = Vec::new();
            for (mut transfer, gap, kind, balance, own_debit) in events {
                timestamp += gap;
                if own_debit { transfer.debit_account_id = account } else { transfer.credit_account_id = account }
                list.push(AccountEvent {
                    account_id: account,
                    timestamp,
                    transfer,
                    kind: AccountEventKind::from_u8(kind).unwrap(),
                    balance: balance.map(|b| Balance {
                        debits_pending: b[0], debits_posted: b[1], credits_pending: b[2], credits_posted: b[3],
                    }),
                });
            }
            // Format 3 keeps each transfer's id (the reader looks the rest up); format 2 chunks,
            // with the transfer inline, still decode whole.
            for by_id in [true, false] {
                let expected: Vec<AccountEvent> = list
                    .iter()
                    .map(|e| AccountEvent {
                        transfer: if by_id { transfer_reference(&e.transfer) } else { e.transfer },
                        ..*e
                    })
                    .collect();
                let mut out = Vec::new();
                let mut writer = ChunkWriter::new(list[0].timestamp);
                for event in &list {
                    writer.push_with(&mut out, event, by_id);
                }
                let mut decoded = Vec::new();
                decode_account_events(account, list[0].timestamp, &out, &mut decoded).unwrap();
                prop_assert!(decoded.iter().all(|d| d.transfer_by_id == by_id));
                let events: Vec<AccountEvent> = decoded.iter().map(|d| d.event).collect();
                prop_assert_eq!(&events, &expected);
                for cut in 1..out.len() {
                    decoded.clear();
                    // A cut inside the last event is an error; a cut at an event boundary is a
                    // shorter chunk.
                    if decode_account_events(account, list[0].timestamp, &out[..cut], &mut decoded).is_ok() {
                        prop_assert!(decoded.len() < list.len());
                        let events: Vec<AccountEvent> = decoded.iter().map(|d| d.event).collect();
                        prop_assert_eq!(&events[..], &expected[..decoded.len()]);
                    }
                }
            }
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode_stored_transfer(1, &bytes, &[]);
            let mut out = Vec::new();
            let _ = decode_account_events(7, 1000, &bytes, &mut out);
        }
    }

    #[test]
    fn format_4_timestamps_of_time_keyed_ids_are_short() {
        let accepted = 1_764_000_000_123_456_789u64;
        let encoded = |id: u128, timestamp: u64| {
            let stored = StoredTransfer {
                transfer: Transfer {
                    id,
                    debit_account_id: 7,
                    credit_account_id: 8,
                    amount: 9,
                    ledger: 1,
                    code: 2,
                    timestamp,
                    ..Transfer::default()
                },
                status: PendingStatus::from_u8(1).unwrap(),
            };
            let mut out = Vec::new();
            encode_stored_transfer(&mut out, &stored, &mut |_| None);
            assert_eq!(decode_stored_transfer(id, &out, &[]).unwrap(), stored);
            out.len()
        };
        let payment_key = (u128::from(accepted) << 64) | 0xABCD_EF01_2345_6780;
        // Committed 2 ms after acceptance, or (a clock step) 1 ms before it: 3-4 bytes, not 9.
        let random = encoded(0x1234_5678_9abc_def0, accepted + 2_000_000);
        assert!(encoded(payment_key, accepted + 2_000_000) + 5 <= random);
        assert!(encoded(payment_key, accepted - 1_000_000) + 5 <= random);
        // Far from the id's time: the usual base, whichever is shorter.
        assert_eq!(encoded(payment_key, 10), encoded(0x1234, 10));
    }

    #[test]
    fn varints_reject_overlong_and_out_of_range() {
        // u16 field: 0xFFFF takes three bytes; a fourth continuation or a value above 16 bits fails.
        let mut c = Cursor {
            bytes: &[0xff, 0xff, 0x03],
            what: "t",
        };
        assert_eq!(c.u16().unwrap(), u16::MAX);
        let mut c = Cursor {
            bytes: &[0xff, 0xff, 0x04],
            what: "t",
        };
        assert!(c.u16().is_err());
        let mut c = Cursor {
            bytes: &[0x80, 0x80, 0x80, 0x00],
            what: "t",
        };
        assert!(c.u16().is_err());
        let mut out = Vec::new();
        put_u128(&mut out, u128::MAX);
        assert_eq!(out.len(), 19);
        let mut c = Cursor {
            bytes: &out,
            what: "t",
        };
        assert_eq!(c.u128().unwrap(), u128::MAX);
        out[18] += 1;
        let mut c = Cursor {
            bytes: &out,
            what: "t",
        };
        assert!(c.u128().is_err());
    }

    #[test]
    fn an_l1_event_is_small() {
        let event = AccountEvent {
            account_id: 4_321,
            timestamp: 1_764_000_000_000_000_000,
            transfer: Transfer {
                id: 9_999_999,
                debit_account_id: 4_321,
                credit_account_id: 9_876,
                amount: 12_345,
                ledger: 2,
                code: 65_000,
                timestamp: 1_764_000_000_000_000_000,
                ..Transfer::default()
            },
            kind: AccountEventKind::Debit,
            balance: Some(Balance {
                debits_posted: 987_654_321,
                credits_posted: 876_543_210,
                ..Balance::default()
            }),
        };
        let mut out = Vec::new();
        let mut writer = ChunkWriter::new(event.timestamp);
        writer.push(&mut out, &event);
        let first = out.len();
        let mut second = event;
        second.timestamp += 137;
        second.transfer.timestamp += 137;
        second.transfer.id += 1;
        second.balance.as_mut().unwrap().debits_posted += 12_345;
        writer.push(&mut out, &second);
        // The first event of a chunk carries its balances whole; later ones only the change.
        assert!(first <= 32, "first event {first} bytes");
        assert!(
            out.len() - first <= 24,
            "next event {} bytes",
            out.len() - first
        );
    }
}
