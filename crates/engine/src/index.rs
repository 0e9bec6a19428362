//! The on-disk index (redb): every transfer by id, every account event by (account, timestamp),
//! pending transfers, every account, and the ledger scalars, all as of one journal sequence.
//!
//! The journal is the source of truth; the index is derived from it. Each index transaction
//! brings the whole index to a consistent state as of a journal sequence (`applied_seq`). Most
//! commit without fsync (redb `Durability::None`); a checkpoint commits with fsync, after which the
//! journal before it may be deleted. After a crash redb comes back at its last durable commit, and
//! recovery replays the journal after that commit's `applied_seq`.

use std::path::Path;

use clearhouse_ledger::{
    Account, AccountEvent, AccountFilter, Balance, ChangeSet, LedgerScalars, PendingStatus,
    StoredTransfer, Transfer,
};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};

use crate::codec::{self, RecordPut};
use crate::vouchers::{Voucher, VoucherChain};
use crate::EngineError;

const TRANSFERS: TableDefinition<u128, &[u8]> = TableDefinition::new("transfers");
/// Account events in chunks: key (account id, timestamp of the chunk's first event), value the
/// chunk's events in timestamp order (codec::encode_account_event). One index transaction writes
/// one chunk per touched account (split at ACCOUNT_EVENTS_PER_CHUNK_MAX), so a transaction costs
/// O(accounts touched) B-tree inserts, not O(events); a query reads a few chunks sequentially.
const ACCOUNT_EVENTS: TableDefinition<(u128, u64), &[u8]> = TableDefinition::new("account_events");
const ACCOUNT_EVENTS_PER_CHUNK_MAX: usize = 256;
const PENDING: TableDefinition<u128, u8> = TableDefinition::new("pending");
const ACCOUNTS: TableDefinition<u128, &[u8]> = TableDefinition::new("accounts");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
/// Application records (payments, ...) by key, the open ones, and alias keys.
const RECORDS: TableDefinition<u128, &[u8]> = TableDefinition::new("records");
const RECORDS_OPEN: TableDefinition<u128, u8> = TableDefinition::new("records_open");
const RECORD_ALIASES: TableDefinition<u128, u128> = TableDefinition::new("record_aliases");
/// The voucher chain: sequence number -> chain hash (32 bytes) followed by the body.
const VOUCHERS: TableDefinition<u64, &[u8]> = TableDefinition::new("vouchers");

/// Most results one query returns, as in TigerBeetle.
pub const QUERY_LIMIT_MAX: u32 = 8_190;

fn index_error(context: &'static str) -> impl FnOnce(redb::Error) -> EngineError {
    move |error| EngineError::Index {
        context,
        message: error.to_string(),
    }
}

macro_rules! redb_try {
    ($expr:expr, $context:expr) => {
        $expr.map_err(|error| index_error($context)(error.into()))?
    };
}

/// The state one index transaction brings the index to: as of journal sequence `seq`.
pub struct IndexUpdate {
    pub seq: u64,
    pub changes: ChangeSet,
    /// Accounts changed since the previous update, as of `seq` (later entries win).
    pub accounts: Vec<Account>,
    pub scalars: LedgerScalars,
    /// Application records written (their conditions held), in journal order.
    pub records: Vec<RecordPut>,
    /// Vouchers appended, in chain order.
    pub vouchers: Vec<Voucher>,
    /// Commit with fsync: a checkpoint that lets the journal before it be deleted.
    pub durable: bool,
}

/// What a checkpoint on disk holds, to restore the ledger from.
pub struct Restored {
    pub seq: u64,
    pub scalars: LedgerScalars,
    pub accounts: Vec<Account>,
    pub pending: Vec<StoredTransfer>,
    /// The voucher chain's head as of `seq`.
    pub vouchers: VoucherChain,
}

pub struct Index {
    db: Database,
}

impl Index {
    pub fn open(path: &Path) -> Result<Index, EngineError> {
        let db = redb_try!(Database::create(path), "open index");
        let index = Index { db };
        // Make sure every table exists so read transactions never miss one.
        let mut txn = redb_try!(index.db.begin_write(), "begin write");
        redb_try!(txn.set_durability(Durability::Immediate), "durability");
        {
            redb_try!(txn.open_table(TRANSFERS), "open table");
            redb_try!(txn.open_table(ACCOUNT_EVENTS), "open table");
            redb_try!(txn.open_table(PENDING), "open table");
            redb_try!(txn.open_table(ACCOUNTS), "open table");
            redb_try!(txn.open_table(META), "open table");
            redb_try!(txn.open_table(RECORDS), "open table");
            redb_try!(txn.open_table(RECORDS_OPEN), "open table");
            redb_try!(txn.open_table(RECORD_ALIASES), "open table");
            redb_try!(txn.open_table(VOUCHERS), "open table");
        }
        redb_try!(txn.commit(), "commit");
        Ok(index)
    }

    /// Reads the last durable checkpoint (all zero for a new data directory).
    pub fn restore(&self) -> Result<Restored, EngineError> {
        let txn = redb_try!(self.db.begin_read(), "begin read");
        let meta = redb_try!(txn.open_table(META), "open meta");
        // Every index transaction leaves the index consistent as of its `applied_seq` (transfers,
        // account events, pending set, accounts and scalars together), whether or not it was
        // durable; after a crash redb comes back at its last durable transaction.
        let seq = match redb_try!(meta.get("applied_seq"), "read meta") {
            Some(value) => {
                u64::from_le_bytes(value.value().try_into().map_err(|_| EngineError::Index {
                    context: "applied_seq",
                    message: "bad length".into(),
                })?)
            }
            None => 0,
        };
        let scalars = match redb_try!(meta.get("scalars"), "read meta") {
            Some(value) => codec::decode_scalars(value.value())?,
            None => LedgerScalars::default(),
        };
        let accounts_table = redb_try!(txn.open_table(ACCOUNTS), "open accounts");
        let mut accounts = Vec::new();
        for entry in redb_try!(accounts_table.iter(), "iterate accounts") {
            let (_, value) = redb_try!(entry, "read account");
            accounts.push(codec::decode_account(value.value())?);
        }
        let pending_table = redb_try!(txn.open_table(PENDING), "open pending");
        let transfers = redb_try!(txn.open_table(TRANSFERS), "open transfers");
        let mut pending = Vec::new();
        for entry in redb_try!(pending_table.iter(), "iterate pending") {
            let (id, _) = redb_try!(entry, "read pending");
            let value = redb_try!(transfers.get(id.value()), "read transfer").ok_or_else(|| {
                EngineError::Index {
                    context: "pending",
                    message: format!("pending transfer {} missing", id.value()),
                }
            })?;
            let stored = codec::decode_stored_transfer(value.value())?;
            assert_eq!(stored.status, PendingStatus::Pending);
            pending.push(stored);
        }
        let vouchers_table = redb_try!(txn.open_table(VOUCHERS), "open vouchers");
        let vouchers = match redb_try!(vouchers_table.last(), "read last voucher") {
            Some((seq, value)) => {
                let voucher = decode_voucher(seq.value(), value.value())?;
                VoucherChain {
                    seq: voucher.seq,
                    hash: voucher.hash,
                }
            }
            None => VoucherChain::default(),
        };
        Ok(Restored {
            seq,
            scalars,
            accounts,
            pending,
            vouchers,
        })
    }

    /// Applies one update in one transaction; durable updates commit with fsync.
    pub fn apply(&self, update: &IndexUpdate) -> Result<(), EngineError> {
        let changes = &update.changes;
        let mut txn = redb_try!(self.db.begin_write(), "begin write");
        redb_try!(
            txn.set_durability(if update.durable {
                Durability::Immediate
            } else {
                Durability::None
            }),
            "durability"
        );
        let mut buffer = Vec::with_capacity(128);
        {
            let mut transfers = redb_try!(txn.open_table(TRANSFERS), "open transfers");
            let mut pending = redb_try!(txn.open_table(PENDING), "open pending");
            // Insert in id order (B-tree friendly) through a permutation, so the 129-byte records
            // are not moved; the sort is stable, so a later version of a transfer is written last.
            let mut order: Vec<(u128, u32)> = changes
                .transfers
                .iter()
                .enumerate()
                .map(|(index, stored)| (stored.transfer.id, index as u32))
                .collect();
            order.sort_by_key(|(id, _)| *id);
            for (_, index) in &order {
                let stored = &changes.transfers[*index as usize];
                buffer.clear();
                codec::encode_stored_transfer(&mut buffer, stored);
                redb_try!(
                    transfers.insert(stored.transfer.id, buffer.as_slice()),
                    "insert transfer"
                );
                if stored.status == PendingStatus::Pending {
                    redb_try!(pending.insert(stored.transfer.id, 1u8), "insert pending");
                } else if stored.status != PendingStatus::None {
                    redb_try!(pending.remove(stored.transfer.id), "remove pending");
                }
            }
            let mut events = redb_try!(txn.open_table(ACCOUNT_EVENTS), "open account events");
            // Order events by (account, timestamp) through a permutation (events are ~220 bytes);
            // each run of one account becomes one or more chunks.
            let all = &changes.account_events;
            let mut order: Vec<(u128, u64, u32)> = all
                .iter()
                .enumerate()
                .map(|(index, event)| (event.account_id, event.timestamp, index as u32))
                .collect();
            order.sort_unstable();
            let mut start = 0;
            while start < order.len() {
                let account_id = order[start].0;
                let mut end = start;
                while end < order.len()
                    && order[end].0 == account_id
                    && end - start < ACCOUNT_EVENTS_PER_CHUNK_MAX
                {
                    end += 1;
                }
                buffer.clear();
                for position in start..end {
                    if position > start {
                        assert!(
                            order[position - 1].1 < order[position].1,
                            "account events of one account have unique timestamps"
                        );
                    }
                    codec::encode_account_event(&mut buffer, &all[order[position].2 as usize]);
                }
                redb_try!(
                    events.insert((account_id, order[start].1), buffer.as_slice()),
                    "insert account events"
                );
                start = end;
            }
            let mut accounts = redb_try!(txn.open_table(ACCOUNTS), "open accounts");
            for account in changes.accounts_created.iter().chain(&update.accounts) {
                buffer.clear();
                codec::encode_account(&mut buffer, account);
                redb_try!(
                    accounts.insert(account.id, buffer.as_slice()),
                    "insert account"
                );
            }
            if !update.records.is_empty() {
                let mut records = redb_try!(txn.open_table(RECORDS), "open records");
                let mut open = redb_try!(txn.open_table(RECORDS_OPEN), "open records_open");
                let mut aliases = redb_try!(txn.open_table(RECORD_ALIASES), "open aliases");
                for put in &update.records {
                    redb_try!(
                        records.insert(put.key, put.value.as_slice()),
                        "insert record"
                    );
                    if put.open {
                        redb_try!(open.insert(put.key, 1u8), "insert open record");
                    } else {
                        redb_try!(open.remove(put.key), "remove open record");
                    }
                    for alias in &put.aliases {
                        redb_try!(aliases.insert(*alias, put.key), "insert alias");
                    }
                }
            }
            if !update.vouchers.is_empty() {
                let mut vouchers = redb_try!(txn.open_table(VOUCHERS), "open vouchers");
                // The chain has no gaps: this update starts right after the last stored voucher.
                let last =
                    redb_try!(vouchers.last(), "read last voucher").map(|(seq, _)| seq.value());
                let first = update.vouchers[0].seq;
                if first != last.unwrap_or(0) + 1
                    || update.vouchers.windows(2).any(|w| w[1].seq != w[0].seq + 1)
                {
                    return Err(EngineError::Index {
                        context: "vouchers",
                        message: format!(
                            "voucher chain gap: the index ends at {last:?}, the update starts at {first}"
                        ),
                    });
                }
                for voucher in &update.vouchers {
                    buffer.clear();
                    buffer.extend_from_slice(&voucher.hash);
                    buffer.extend_from_slice(&voucher.body);
                    redb_try!(
                        vouchers.insert(voucher.seq, buffer.as_slice()),
                        "insert voucher"
                    );
                }
            }
            let mut meta = redb_try!(txn.open_table(META), "open meta");
            redb_try!(
                meta.insert("applied_seq", update.seq.to_le_bytes().as_slice()),
                "write meta"
            );
            redb_try!(
                meta.insert("scalars", codec::encode_scalars(&update.scalars).as_slice()),
                "write meta"
            );
            if update.durable {
                redb_try!(
                    meta.insert("checkpoint_seq", update.seq.to_le_bytes().as_slice()),
                    "write meta"
                );
            }
        }
        redb_try!(txn.commit(), "commit");
        Ok(())
    }

    /// The values of application records, in the order of `keys` (None where absent).
    pub fn get_records(&self, keys: &[u128]) -> Result<Vec<Option<Vec<u8>>>, EngineError> {
        let txn = redb_try!(self.db.begin_read(), "begin read");
        let records = redb_try!(txn.open_table(RECORDS), "open records");
        let mut out = Vec::with_capacity(keys.len());
        for key in keys {
            out.push(redb_try!(records.get(*key), "read record").map(|v| v.value().to_vec()));
        }
        Ok(out)
    }

    /// Vouchers with sequence numbers from `from_seq` on, in order, at most `limit`.
    pub fn vouchers(&self, from_seq: u64, limit: usize) -> Result<Vec<Voucher>, EngineError> {
        let txn = redb_try!(self.db.begin_read(), "begin read");
        let table = redb_try!(txn.open_table(VOUCHERS), "open vouchers");
        let mut out = Vec::with_capacity(limit.min(65_536));
        for entry in redb_try!(table.range(from_seq..), "range vouchers") {
            if out.len() >= limit {
                break;
            }
            let (seq, value) = redb_try!(entry, "read voucher");
            out.push(decode_voucher(seq.value(), value.value())?);
        }
        Ok(out)
    }

    /// The key an alias resolves to.
    pub fn resolve_alias(&self, alias: u128) -> Result<Option<u128>, EngineError> {
        let txn = redb_try!(self.db.begin_read(), "begin read");
        let aliases = redb_try!(txn.open_table(RECORD_ALIASES), "open aliases");
        Ok(redb_try!(aliases.get(alias), "read alias").map(|v| v.value()))
    }

    /// Every open record, key order, at most `limit`.
    pub fn open_records(&self, limit: usize) -> Result<Vec<(u128, Vec<u8>)>, EngineError> {
        let txn = redb_try!(self.db.begin_read(), "begin read");
        let open = redb_try!(txn.open_table(RECORDS_OPEN), "open records_open");
        let records = redb_try!(txn.open_table(RECORDS), "open records");
        let mut out = Vec::new();
        for entry in redb_try!(open.iter(), "iterate open records") {
            if out.len() >= limit {
                break;
            }
            let (key, _) = redb_try!(entry, "read open record");
            let key = key.value();
            let value =
                redb_try!(records.get(key), "read record").ok_or_else(|| EngineError::Index {
                    context: "records_open",
                    message: format!("open record {key} has no value"),
                })?;
            out.push((key, value.value().to_vec()));
        }
        Ok(out)
    }

    pub fn get_transfers(
        &self,
        ids: &[u128],
        mut found: impl FnMut(StoredTransfer),
    ) -> Result<(), EngineError> {
        if ids.is_empty() {
            return Ok(());
        }
        let txn = redb_try!(self.db.begin_read(), "begin read");
        let transfers = redb_try!(txn.open_table(TRANSFERS), "open transfers");
        for id in ids {
            if let Some(value) = redb_try!(transfers.get(*id), "read transfer") {
                found(codec::decode_stored_transfer(value.value())?);
            }
        }
        Ok(())
    }

    fn account_events(
        &self,
        filter: &AccountFilter,
        mut keep: impl FnMut(&AccountEvent) -> bool,
    ) -> Result<Vec<AccountEvent>, EngineError> {
        let limit = filter.limit.min(QUERY_LIMIT_MAX) as usize;
        let min = filter.timestamp_min;
        let max = if filter.timestamp_max == 0 {
            u64::MAX
        } else {
            filter.timestamp_max
        };
        let mut out = Vec::new();
        if limit == 0 || min > max {
            return Ok(out);
        }
        let account = filter.account_id;
        let txn = redb_try!(self.db.begin_read(), "begin read");
        let events = redb_try!(txn.open_table(ACCOUNT_EVENTS), "open account events");
        let mut chunk = Vec::with_capacity(ACCOUNT_EVENTS_PER_CHUNK_MAX);
        if filter.reversed {
            // Chunks starting at or before `max`, newest first; stop below `min`.
            for entry in redb_try!(events.range((account, 0)..=(account, max)), "range").rev() {
                let (key, value) = redb_try!(entry, "read account events");
                chunk.clear();
                codec::decode_account_events(account, value.value(), &mut chunk)?;
                for event in chunk.iter().rev() {
                    if event.timestamp <= max && event.timestamp >= min && keep(event) {
                        out.push(*event);
                        if out.len() >= limit {
                            return Ok(out);
                        }
                    }
                }
                if key.value().1 < min {
                    break;
                }
            }
        } else {
            // The chunk that may hold `min` starts at or before it.
            let first =
                match redb_try!(events.range((account, 0)..=(account, min)), "range").next_back() {
                    Some(entry) => redb_try!(entry, "read account events").0.value().1,
                    None => min,
                };
            for entry in redb_try!(events.range((account, first)..=(account, max)), "range") {
                let (_, value) = redb_try!(entry, "read account events");
                chunk.clear();
                codec::decode_account_events(account, value.value(), &mut chunk)?;
                for event in &chunk {
                    if event.timestamp > max {
                        return Ok(out);
                    }
                    if event.timestamp >= min && keep(event) {
                        out.push(*event);
                        if out.len() >= limit {
                            return Ok(out);
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    /// Transfers of an account within the filter, oldest first (newest first when reversed).
    pub fn get_account_transfers(
        &self,
        filter: &AccountFilter,
    ) -> Result<Vec<Transfer>, EngineError> {
        let events = self.account_events(filter, |event| {
            event.kind.is_transfer()
                && ((filter.debits && event.kind == clearhouse_ledger::AccountEventKind::Debit)
                    || (filter.credits
                        && event.kind == clearhouse_ledger::AccountEventKind::Credit))
        })?;
        Ok(events.into_iter().map(|event| event.transfer).collect())
    }

    /// Balances of an account (with the HISTORY flag) after each event within the filter.
    pub fn get_account_balances(
        &self,
        filter: &AccountFilter,
    ) -> Result<Vec<(u64, Balance)>, EngineError> {
        let events = self.account_events(filter, |event| {
            event.balance.is_some()
                && (!event.kind.is_transfer()
                    || (filter.debits && event.kind == clearhouse_ledger::AccountEventKind::Debit)
                    || (filter.credits
                        && event.kind == clearhouse_ledger::AccountEventKind::Credit))
        })?;
        Ok(events
            .into_iter()
            .map(|event| (event.timestamp, event.balance.expect("filtered")))
            .collect())
    }
}

fn decode_voucher(seq: u64, value: &[u8]) -> Result<Voucher, EngineError> {
    if value.len() < 32 {
        return Err(EngineError::Index {
            context: "vouchers",
            message: format!(
                "voucher {seq} is {} bytes, shorter than its hash",
                value.len()
            ),
        });
    }
    Ok(Voucher {
        seq,
        hash: value[..32].try_into().expect("32 bytes"),
        body: value[32..].to_vec(),
    })
}
