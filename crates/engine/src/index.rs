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

use crate::codec::{self, Prune, RecordPut};
use crate::compact::{self, ChunkWriter, INDEX_FORMAT, INDEX_FORMATS_READABLE};
use crate::voucher_pack;
use crate::vouchers::{Voucher, VoucherChain};
use crate::EngineError;

/// The index cache by default: 1 GiB, redb's own default (see
/// [`crate::NodeOptions::index_cache_bytes`]; the switch sets its own, `index_cache_mb`).
pub const INDEX_CACHE_BYTES_DEFAULT: usize = 1 << 30;

const TRANSFERS: TableDefinition<u128, &[u8]> = TableDefinition::new("transfers");
/// Account events in chunks: key (account id, timestamp of the chunk's first event), value the
/// chunk's events in timestamp order (compact::ChunkWriter). One index transaction writes
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
/// Retention's replacements of pruned records (tombstones), apart from the live records: the
/// records table then loses whole pages when a window is pruned (its keys grow with time), and
/// the tombstones, also in key order, go in whole pages when they are cleared.
const RECORDS_PRUNED: TableDefinition<u128, &[u8]> = TableDefinition::new("records_pruned");
const RECORD_ALIASES: TableDefinition<u128, u128> = TableDefinition::new("record_aliases");
/// Format 4: account number -> account id. The `transfers` table names a numbered account by its
/// number (a varint of 1 to 3 bytes) instead of its 16-byte id. Numbers are given in the order
/// accounts first appear in a transfer this index writes, up to [`ACCOUNT_NUMBERS_MAX`]; they are
/// this file's own (another copy of the same journal may number differently).
const ACCOUNT_NUMBERS: TableDefinition<u32, u128> = TableDefinition::new("account_numbers");
/// Most accounts given a number (the map is held in memory: 4 MB at most); later accounts are
/// stored by id.
pub const ACCOUNT_NUMBERS_MAX: usize = 65_536;
/// The voucher chain: sequence number -> chain hash (32 bytes) followed by the body.
const VOUCHERS: TableDefinition<u64, &[u8]> = TableDefinition::new("vouchers");

/// How many entries ahead the index prefetches the transfers and events it reads out of order.
const PREFETCH_DISTANCE: usize = 8;

/// Hints the CPU to load `item` (all its cache lines) ahead of use; nothing else.
#[inline(always)]
fn prefetch<T>(item: &T) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let start = (item as *const T).cast::<i8>();
        let size = std::mem::size_of::<T>().max(1);
        let mut offset = 0;
        while offset < size + 63 {
            // SAFETY: SSE is part of the x86_64 baseline, and a prefetch is only a hint: it reads
            // nothing into the program, cannot fault, and the addresses lie within `item` (or one
            // byte past a line boundary inside it).
            unsafe { _mm_prefetch::<_MM_HINT_T0>(start.wrapping_add(offset.min(size - 1))) };
            offset += 64;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = item;
}

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

/// How much of the index file one table takes (redb's own accounting).
#[derive(Clone, Debug)]
pub struct TableStorage {
    pub table: &'static str,
    pub entries: u64,
    /// Keys and values as inserted.
    pub stored_bytes: u64,
    /// Branch pages' keys and other B-tree metadata.
    pub metadata_bytes: u64,
    /// Allocated but unused within the table's pages.
    pub fragmented_bytes: u64,
    pub leaf_pages: u64,
    pub branch_pages: u64,
}

/// Where an index file's bytes go, table by table. Opens the file read-only: the node that owns
/// it must be stopped (redb refuses a second opener, and this says so).
pub fn storage_report(path: &Path) -> Result<Vec<TableStorage>, EngineError> {
    use redb::ReadableTableMetadata;
    fn one<K: redb::Key + 'static, V: redb::Value + 'static>(
        txn: &redb::ReadTransaction,
        table: &'static str,
        definition: TableDefinition<K, V>,
    ) -> Result<TableStorage, EngineError> {
        let opened = match txn.open_table(definition) {
            Ok(opened) => opened,
            // A table this build adds, in an index an older build wrote and this one has not
            // opened yet: empty.
            Err(redb::TableError::TableDoesNotExist(_)) => {
                return Ok(TableStorage {
                    table,
                    entries: 0,
                    stored_bytes: 0,
                    metadata_bytes: 0,
                    fragmented_bytes: 0,
                    leaf_pages: 0,
                    branch_pages: 0,
                })
            }
            Err(error) => return Err(index_error("open table")(error.into())),
        };
        let stats = redb_try!(opened.stats(), "table stats");
        Ok(TableStorage {
            table,
            entries: redb_try!(opened.len(), "table length"),
            stored_bytes: stats.stored_bytes(),
            metadata_bytes: stats.metadata_bytes(),
            fragmented_bytes: stats.fragmented_bytes(),
            leaf_pages: stats.leaf_pages(),
            branch_pages: stats.branch_pages(),
        })
    }
    let db = redb_try!(redb::ReadOnlyDatabase::open(path), "open index read-only");
    let txn = redb_try!(db.begin_read(), "begin read");
    Ok(vec![
        one(&txn, "transfers", TRANSFERS)?,
        one(&txn, "account_events", ACCOUNT_EVENTS)?,
        one(&txn, "pending", PENDING)?,
        one(&txn, "accounts", ACCOUNTS)?,
        one(&txn, "meta", META)?,
        one(&txn, "records", RECORDS)?,
        one(&txn, "records_open", RECORDS_OPEN)?,
        one(&txn, "records_pruned", RECORDS_PRUNED)?,
        one(&txn, "record_aliases", RECORD_ALIASES)?,
        one(&txn, "vouchers", VOUCHERS)?,
        one(&txn, "account_numbers", ACCOUNT_NUMBERS)?,
    ])
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
    /// Retention: what leaves the index, in journal order (after this update's writes).
    pub prunes: Vec<Prune>,
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
    /// Vouchers from this sequence on are stored packed ([`crate::voucher_pack`]); those before it
    /// (written by format 2, before the index was re-marked 3) hold their body as is.
    vouchers_packed_from: u64,
    /// Vouchers from this sequence on (format 4) start with a byte saying whether their chain hash
    /// follows; it is kept for every [`VOUCHER_HASH_EVERY`]th voucher and the last of each index
    /// transaction, and recomputed from the bodies for the others. Those before it hold theirs.
    vouchers_sparse_from: u64,
    /// Whether account events are written and account history answered.
    account_history: bool,
    /// The `account_numbers` table in memory: read by every transfer decoded, grown by the index
    /// thread (before its transaction commits, so no reader meets a number it does not know).
    account_numbers: std::sync::RwLock<AccountNumbers>,
}

#[derive(Default)]
struct AccountNumbers {
    ids: Vec<u128>,
    by_id: std::collections::HashMap<u128, u32>,
}

impl Index {
    /// Opens (or creates) the index with the default cache
    /// ([`INDEX_CACHE_BYTES_DEFAULT`]).
    pub fn open(path: &Path) -> Result<Index, EngineError> {
        Index::open_with(path, INDEX_CACHE_BYTES_DEFAULT, true)
    }

    /// Opens (or creates) the index with a page cache of `cache_bytes`, with or without account
    /// history ([`crate::NodeOptions::account_history`]).
    pub fn open_with(
        path: &Path,
        cache_bytes: usize,
        account_history: bool,
    ) -> Result<Index, EngineError> {
        let db = redb_try!(
            redb::Builder::new()
                .set_cache_size(cache_bytes)
                .create(path),
            "open index"
        );
        let mut index = Index {
            db,
            vouchers_packed_from: 0,
            vouchers_sparse_from: 0,
            account_history,
            account_numbers: Default::default(),
        };
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
            redb_try!(txn.open_table(RECORDS_PRUNED), "open table");
            redb_try!(txn.open_table(RECORD_ALIASES), "open table");
            redb_try!(txn.open_table(ACCOUNT_NUMBERS), "open table");
            redb_try!(txn.open_table(VOUCHERS), "open table");
        }
        {
            let mut meta = redb_try!(txn.open_table(META), "open meta");
            let format =
                redb_try!(meta.get("index_format"), "read meta").map(|v| v.value().to_vec());
            let applied = redb_try!(meta.get("applied_seq"), "read meta").is_some();
            match format {
                Some(bytes) if bytes.as_slice() == INDEX_FORMAT.to_le_bytes() => {}
                // Older formats' values decode as this one's; mark the index with this format,
                // since what this build writes from now on an older build could not read.
                Some(bytes) if bytes.as_slice() == 3u32.to_le_bytes() => {
                    redb_try!(
                        meta.insert("index_format", INDEX_FORMAT.to_le_bytes().as_slice()),
                        "write meta"
                    );
                    let next = next_voucher_seq(&txn)?;
                    redb_try!(
                        meta.insert("vouchers_sparse_from", next.to_le_bytes().as_slice()),
                        "write meta"
                    );
                }
                // Format 2 also stored its vouchers unpacked: they stay so, later ones are packed.
                Some(bytes) if bytes.as_slice() == 2u32.to_le_bytes() => {
                    redb_try!(
                        meta.insert("index_format", INDEX_FORMAT.to_le_bytes().as_slice()),
                        "write meta"
                    );
                    let next = next_voucher_seq(&txn)?;
                    for key in ["vouchers_packed_from", "vouchers_sparse_from"] {
                        redb_try!(
                            meta.insert(key, next.to_le_bytes().as_slice()),
                            "write meta"
                        );
                    }
                }
                None if !applied => {
                    redb_try!(
                        meta.insert("index_format", INDEX_FORMAT.to_le_bytes().as_slice()),
                        "write meta"
                    );
                }
                found => {
                    return Err(EngineError::Index {
                        context: "index format",
                        message: format!(
                            "{} holds index format {}, this build reads formats {INDEX_FORMATS_READABLE:?} and {INDEX_FORMAT} only; \
                             run the build that wrote it, or start with a new data directory",
                            path.display(),
                            found
                                .and_then(|b| b.try_into().ok().map(u32::from_le_bytes))
                                .map_or("1 (unversioned)".to_string(), |v| v.to_string()),
                        ),
                    });
                }
            }
            // Account history: an index kept without it (from its creation, or since it was
            // turned off) cannot answer for the time in between, so it is never turned back on.
            // An index from before this setting kept it.
            let kept = redb_try!(meta.get("account_history"), "read meta")
                .map(|value| value.value() != [0])
                .unwrap_or(applied);
            if account_history && !kept && applied {
                return Err(EngineError::Index {
                    context: "account history",
                    message: format!(
                        "{} was kept without account history; it cannot be turned back on for this index \
                         (start with account history off, or with a new data directory)",
                        path.display()
                    ),
                });
            }
            redb_try!(
                meta.insert("account_history", [u8::from(account_history)].as_slice()),
                "write meta"
            );
            for (key, field) in [
                ("vouchers_packed_from", &mut index.vouchers_packed_from),
                ("vouchers_sparse_from", &mut index.vouchers_sparse_from),
            ] {
                let stored =
                    redb_try!(meta.get(key), "read meta").map(|value| value.value().to_vec());
                if let Some(bytes) = stored {
                    *field = u64::from_le_bytes(bytes.as_slice().try_into().map_err(|_| {
                        EngineError::Index {
                            context: "vouchers layout",
                            message: format!("{key}: bad length"),
                        }
                    })?);
                }
            }
        }
        {
            let table = redb_try!(txn.open_table(ACCOUNT_NUMBERS), "open account numbers");
            let numbers = index.account_numbers.get_mut().expect("account numbers");
            for entry in redb_try!(table.iter(), "iterate account numbers") {
                let (number, id) = redb_try!(entry, "read account number");
                if number.value() as usize != numbers.ids.len() {
                    return Err(EngineError::Index {
                        context: "account numbers",
                        message: format!("number {} out of order", number.value()),
                    });
                }
                numbers.by_id.insert(id.value(), number.value());
                numbers.ids.push(id.value());
            }
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
            let stored = compact::decode_stored_transfer(
                id.value(),
                value.value(),
                &self.account_numbers.read().expect("account numbers").ids,
            )?;
            assert_eq!(stored.status, PendingStatus::Pending);
            pending.push(stored);
        }
        let vouchers_table = redb_try!(txn.open_table(VOUCHERS), "open vouchers");
        let last =
            redb_try!(vouchers_table.last(), "read last voucher").map(|(seq, _)| seq.value());
        let vouchers = match last {
            Some(seq) => VoucherChain {
                seq,
                hash: self.hash_of(&vouchers_table, &meta, seq)?,
            },
            // Every voucher pruned: the chain continues from its anchor.
            None => {
                let (seq, hash) = read_anchor(&meta)?;
                VoucherChain { seq, hash }
            }
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
        self.apply_all(std::slice::from_ref(update))
    }

    /// Applies consecutive updates (in journal order) as one transaction, as of the last one's
    /// sequence; it commits with fsync if any of them is durable. The updates are read in place
    /// (no merged copy): the index thread's cost is what it writes.
    pub fn apply_all(&self, updates: &[IndexUpdate]) -> Result<(), EngineError> {
        let Some(last) = updates.last() else {
            return Ok(());
        };
        assert!(
            updates.windows(2).all(|w| w[0].seq <= w[1].seq),
            "index updates are in journal order"
        );
        let durable = updates.iter().any(|update| update.durable);
        let mut txn = redb_try!(self.db.begin_write(), "begin write");
        redb_try!(
            txn.set_durability(if durable {
                Durability::Immediate
            } else {
                Durability::None
            }),
            "durability"
        );
        let mut buffer = Vec::with_capacity(4096);
        {
            let mut transfers = redb_try!(txn.open_table(TRANSFERS), "open transfers");
            let mut numbers_table =
                redb_try!(txn.open_table(ACCOUNT_NUMBERS), "open account numbers");
            let mut numbering_failed = None;
            // An account's number, given now if it has none and numbers remain.
            let mut number_of = |id: u128| -> Option<u32> {
                if let Some(number) = self.account_numbers.read().expect("numbers").by_id.get(&id) {
                    return Some(*number);
                }
                let mut numbers = self.account_numbers.write().expect("account numbers");
                if numbers.ids.len() >= ACCOUNT_NUMBERS_MAX || numbering_failed.is_some() {
                    return None;
                }
                let number = numbers.ids.len() as u32;
                if let Err(error) = numbers_table.insert(number, id) {
                    numbering_failed = Some(error);
                    return None;
                }
                numbers.ids.push(id);
                numbers.by_id.insert(id, number);
                Some(number)
            };
            let mut pending = redb_try!(txn.open_table(PENDING), "open pending");
            // Insert in id order (B-tree friendly) through a permutation, so the records are not
            // moved; the sort is stable, so a later version of a transfer is written last.
            let count: usize = updates.iter().map(|u| u.changes.transfers.len()).sum();
            let mut order: Vec<(u128, u32, u32)> = Vec::with_capacity(count);
            for (job, update) in updates.iter().enumerate() {
                order.extend(
                    update
                        .changes
                        .transfers
                        .iter()
                        .enumerate()
                        .map(|(index, stored)| (stored.transfer.id, job as u32, index as u32)),
                );
            }
            // Journal order is often id order already (then no sort).
            if !order.is_sorted_by_key(|(id, _, _)| *id) {
                order.sort_by_key(|(id, _, _)| *id);
            }
            for (position, &(_, job, index)) in order.iter().enumerate() {
                if let Some(&(_, job, index)) = order.get(position + PREFETCH_DISTANCE) {
                    prefetch(&updates[job as usize].changes.transfers[index as usize]);
                }
                let stored = &updates[job as usize].changes.transfers[index as usize];
                buffer.clear();
                compact::encode_stored_transfer(&mut buffer, stored, &mut number_of);
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
            drop(order);
            if let Some(error) = numbering_failed {
                return Err(index_error("insert account number")(error.into()));
            }
            let mut events = redb_try!(txn.open_table(ACCOUNT_EVENTS), "open account events");
            // Chunks in key order; usually built in one sequential pass over the events (journal
            // order is timestamp order), else by sorting.
            let chunks = match chunks_in_one_pass(updates) {
                Some(chunks) => {
                    #[cfg(debug_assertions)]
                    assert!(
                        chunks == chunks_by_sorting(updates),
                        "the one-pass chunks equal the sorted ones"
                    );
                    chunks
                }
                None => chunks_by_sorting(updates),
            };
            for (account_id, first, bytes) in &chunks {
                redb_try!(
                    events.insert((*account_id, *first), bytes.as_slice()),
                    "insert account events"
                );
            }
            drop(chunks);
            let mut accounts = redb_try!(txn.open_table(ACCOUNTS), "open accounts");
            // One write per account: its latest version (the last in journal order).
            let mut latest: Vec<&Account> = updates
                .iter()
                .flat_map(|update| {
                    update
                        .changes
                        .accounts_created
                        .iter()
                        .chain(&update.accounts)
                })
                .collect();
            latest.reverse();
            latest.sort_by_key(|account| account.id);
            latest.dedup_by_key(|account| account.id);
            for account in latest {
                buffer.clear();
                codec::encode_account(&mut buffer, account);
                redb_try!(
                    accounts.insert(account.id, buffer.as_slice()),
                    "insert account"
                );
            }
            if updates
                .iter()
                .any(|update| !update.records.is_empty() || !update.prunes.is_empty())
            {
                let mut records = redb_try!(txn.open_table(RECORDS), "open records");
                let mut open = redb_try!(txn.open_table(RECORDS_OPEN), "open records_open");
                let mut aliases = redb_try!(txn.open_table(RECORD_ALIASES), "open aliases");
                let mut pruned = redb_try!(txn.open_table(RECORDS_PRUNED), "open pruned");
                // Puts and prunes in journal order: the same result however the updates are
                // grouped into transactions (live and replay group them differently).
                for update in updates {
                    put_records(&mut records, &mut open, &mut aliases, &update.records)?;
                    for prune in &update.prunes {
                        prune_records(&mut records, &mut pruned, &open, &mut aliases, prune)?;
                    }
                }
            }
            let vouchers_new: Vec<&Voucher> =
                updates.iter().flat_map(|update| &update.vouchers).collect();
            if !vouchers_new.is_empty() {
                let mut vouchers = redb_try!(txn.open_table(VOUCHERS), "open vouchers");
                // The chain has no gaps: this update starts right after the last stored voucher.
                let last =
                    redb_try!(vouchers.last(), "read last voucher").map(|(seq, _)| seq.value());
                let last = match last {
                    Some(last) => Some(last),
                    None => {
                        let meta = redb_try!(txn.open_table(META), "open meta");
                        Some(read_anchor(&meta)?.0).filter(|seq| *seq > 0)
                    }
                };
                let first = vouchers_new[0].seq;
                if first != last.unwrap_or(0) + 1
                    || vouchers_new.windows(2).any(|w| w[1].seq != w[0].seq + 1)
                {
                    return Err(EngineError::Index {
                        context: "vouchers",
                        message: format!(
                            "voucher chain gap: the index ends at {last:?}, the update starts at {first}"
                        ),
                    });
                }
                let last_new = vouchers_new.last().map_or(0, |v| v.seq);
                for voucher in vouchers_new {
                    buffer.clear();
                    if voucher.seq >= self.vouchers_sparse_from {
                        // The hash of every 64th and of the last (the chain head a restart reads).
                        let keep = voucher.seq % VOUCHER_HASH_EVERY == 0 || voucher.seq == last_new;
                        buffer.push(u8::from(keep));
                        if keep {
                            buffer.extend_from_slice(&voucher.hash);
                        }
                        buffer.extend_from_slice(&voucher_pack::pack(&voucher.body));
                    } else if voucher.seq >= self.vouchers_packed_from {
                        buffer.extend_from_slice(&voucher.hash);
                        buffer.extend_from_slice(&voucher_pack::pack(&voucher.body));
                    } else {
                        buffer.extend_from_slice(&voucher.hash);
                        buffer.extend_from_slice(&voucher.body);
                    }
                    redb_try!(
                        vouchers.insert(voucher.seq, buffer.as_slice()),
                        "insert voucher"
                    );
                }
            }
            let mut meta = redb_try!(txn.open_table(META), "open meta");
            redb_try!(
                meta.insert("applied_seq", last.seq.to_le_bytes().as_slice()),
                "write meta"
            );
            redb_try!(
                meta.insert("scalars", codec::encode_scalars(&last.scalars).as_slice()),
                "write meta"
            );
            if durable {
                redb_try!(
                    meta.insert("checkpoint_seq", last.seq.to_le_bytes().as_slice()),
                    "write meta"
                );
            }
        }
        // After this transaction's writes (the tables above are closed): the rest of retention
        // (records and aliases were pruned above, in journal order). Transfers, vouchers and
        // account events a prune removes are final and older than anything written since.
        for prune in updates.iter().flat_map(|update| &update.prunes) {
            apply_prune(&txn, prune)?;
        }
        redb_try!(txn.commit(), "commit");
        Ok(())
    }

    /// The values of application records, in the order of `keys` (None where absent).
    pub fn get_records(&self, keys: &[u128]) -> Result<Vec<Option<Vec<u8>>>, EngineError> {
        let txn = redb_try!(self.db.begin_read(), "begin read");
        let records = redb_try!(txn.open_table(RECORDS), "open records");
        let pruned = redb_try!(txn.open_table(RECORDS_PRUNED), "open pruned");
        let mut out = Vec::with_capacity(keys.len());
        for key in keys {
            let value = match redb_try!(records.get(*key), "read record") {
                Some(value) => Some(value.value().to_vec()),
                None => {
                    redb_try!(pruned.get(*key), "read pruned record").map(|v| v.value().to_vec())
                }
            };
            out.push(value);
        }
        Ok(out)
    }

    /// A stored voucher's hash (when the value holds it) and body: hash then body as is before
    /// `vouchers_packed_from`, hash then packed body before `vouchers_sparse_from`, then a byte
    /// (1: the hash follows, 0: not) and the packed body.
    fn decode_voucher(
        &self,
        seq: u64,
        value: &[u8],
    ) -> Result<(Option<[u8; 32]>, Vec<u8>), EngineError> {
        let short = || EngineError::Index {
            context: "vouchers",
            message: format!(
                "voucher {seq} is {} bytes, shorter than its hash",
                value.len()
            ),
        };
        let hash = |at: usize| -> Result<[u8; 32], EngineError> {
            value
                .get(at..at + 32)
                .map(|h| h.try_into().expect("32 bytes"))
                .ok_or_else(short)
        };
        let max = crate::vouchers::VOUCHER_BODY_MAX;
        if seq >= self.vouchers_sparse_from {
            return match value.first() {
                Some(0) => Ok((None, voucher_pack::unpack(&value[1..], max)?)),
                Some(1) => Ok((
                    Some(hash(1)?),
                    voucher_pack::unpack(value.get(33..).ok_or_else(short)?, max)?,
                )),
                _ => Err(EngineError::Index {
                    context: "vouchers",
                    message: format!("voucher {seq}: unknown layout byte {:?}", value.first()),
                }),
            };
        }
        let body = if seq >= self.vouchers_packed_from {
            voucher_pack::unpack(value.get(32..).ok_or_else(short)?, max)?
        } else {
            value.get(32..).ok_or_else(short)?.to_vec()
        };
        Ok((Some(hash(0)?), body))
    }

    /// The chain hash of voucher `seq` (which the table holds): stored, or recomputed from the
    /// nearest stored hash before it (at most [`VOUCHER_HASH_EVERY`] vouchers back), the anchor
    /// of a pruned chain, or the genesis hash.
    fn hash_of(
        &self,
        table: &impl ReadableTable<u64, &'static [u8]>,
        meta: &impl ReadableTable<&'static str, &'static [u8]>,
        seq: u64,
    ) -> Result<[u8; 32], EngineError> {
        // The vouchers without a stored hash from `seq` back, newest first.
        let mut bodies: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut expected = seq;
        let mut base = None;
        for entry in redb_try!(table.range(..=seq), "range vouchers").rev() {
            let (at, value) = redb_try!(entry, "read voucher");
            let at = at.value();
            if at != expected || bodies.len() as u64 > VOUCHER_WALK_MAX {
                break;
            }
            match self.decode_voucher(at, value.value())? {
                (Some(hash), _) => {
                    base = Some(hash);
                    break;
                }
                (None, body) => bodies.push((at, body)),
            }
            expected = at.saturating_sub(1);
        }
        let mut hash = match base {
            Some(hash) => hash,
            // Back to the start of the chain, or of what retention left of it.
            None if expected == 0 => crate::vouchers::GENESIS_HASH,
            None => match read_anchor(meta)? {
                (anchor_seq, anchor_hash) if anchor_seq == expected => anchor_hash,
                (anchor_seq, _) => {
                    return Err(EngineError::Index {
                        context: "vouchers",
                        message: format!(
                            "no chain hash for voucher {seq}: none kept from {expected} back (anchor {anchor_seq})"
                        ),
                    })
                }
            },
        };
        for (at, body) in bodies.iter().rev() {
            hash = crate::vouchers::chain_hash(&hash, *at, &crate::vouchers::leaf_digest(body));
        }
        Ok(hash)
    }

    /// Vouchers with sequence numbers from `from_seq` on, in order, at most `limit`, with their
    /// chain hashes.
    pub fn vouchers(&self, from_seq: u64, limit: usize) -> Result<Vec<Voucher>, EngineError> {
        let txn = redb_try!(self.db.begin_read(), "begin read");
        let table = redb_try!(txn.open_table(VOUCHERS), "open vouchers");
        let meta = redb_try!(txn.open_table(META), "open meta");
        let mut out: Vec<Voucher> = Vec::with_capacity(limit.min(65_536));
        for entry in redb_try!(table.range(from_seq..), "range vouchers") {
            if out.len() >= limit {
                break;
            }
            let (seq, value) = redb_try!(entry, "read voucher");
            let seq = seq.value();
            let (stored, body) = self.decode_voucher(seq, value.value())?;
            let hash = match (stored, out.last()) {
                (Some(hash), _) => hash,
                (None, Some(previous)) if previous.seq + 1 == seq => crate::vouchers::chain_hash(
                    &previous.hash,
                    seq,
                    &crate::vouchers::leaf_digest(&body),
                ),
                (None, _) => self.hash_of(&table, &meta, seq)?,
            };
            out.push(Voucher { seq, hash, body });
        }
        Ok(out)
    }

    /// Voucher bodies from `from_seq` on, in order, at most `limit`, without their chain hashes
    /// (which a reader of bodies alone need not recompute).
    pub fn voucher_bodies(
        &self,
        from_seq: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, EngineError> {
        let txn = redb_try!(self.db.begin_read(), "begin read");
        let table = redb_try!(txn.open_table(VOUCHERS), "open vouchers");
        let mut out = Vec::with_capacity(limit.min(65_536));
        for entry in redb_try!(table.range(from_seq..), "range vouchers") {
            if out.len() >= limit {
                break;
            }
            let (seq, value) = redb_try!(entry, "read voucher");
            out.push((
                seq.value(),
                self.decode_voucher(seq.value(), value.value())?.1,
            ));
        }
        Ok(out)
    }

    /// Where the chain is anchored after retention: (last pruned voucher, its hash); (0, zeros)
    /// while nothing was pruned.
    pub fn vouchers_anchor(&self) -> Result<(u64, [u8; 32]), EngineError> {
        let txn = redb_try!(self.db.begin_read(), "begin read");
        let meta = redb_try!(txn.open_table(META), "open meta");
        read_anchor(&meta)
    }

    /// The chain hash of voucher `seq` (None: not in the index).
    pub fn voucher_hash(&self, seq: u64) -> Result<Option<[u8; 32]>, EngineError> {
        let txn = redb_try!(self.db.begin_read(), "begin read");
        let table = redb_try!(txn.open_table(VOUCHERS), "open vouchers");
        let meta = redb_try!(txn.open_table(META), "open meta");
        if redb_try!(table.get(seq), "read voucher").is_none() {
            return Ok(None);
        }
        self.hash_of(&table, &meta, seq).map(Some)
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
                found(compact::decode_stored_transfer(
                    *id,
                    value.value(),
                    &self.account_numbers.read().expect("account numbers").ids,
                )?);
            }
        }
        Ok(())
    }

    /// The account's events within the filter that `keep` keeps; with `transfers`, each with its
    /// whole transfer (read from the `transfers` table, in id order, where the chunk named it by
    /// id), else with at least its id.
    fn account_events(
        &self,
        filter: &AccountFilter,
        transfers_wanted: bool,
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
        let transfers = redb_try!(txn.open_table(TRANSFERS), "open transfers");
        let mut chunk = Vec::with_capacity(ACCOUNT_EVENTS_PER_CHUNK_MAX);
        // (transfer id, position in `out`) of the events whose transfer is still to be read.
        let mut by_id: Vec<(u128, usize)> = Vec::new();
        let mut take = |out: &mut Vec<AccountEvent>, decoded: &compact::DecodedEvent| {
            if decoded.transfer_by_id {
                by_id.push((decoded.event.transfer.id, out.len()));
            }
            out.push(decoded.event);
            out.len() >= limit
        };
        'scan: {
            if filter.reversed {
                // Chunks starting at or before `max`, newest first; stop below `min`.
                for entry in redb_try!(events.range((account, 0)..=(account, max)), "range").rev() {
                    let (key, value) = redb_try!(entry, "read account events");
                    chunk.clear();
                    compact::decode_account_events(
                        account,
                        key.value().1,
                        value.value(),
                        &mut chunk,
                    )?;
                    for decoded in chunk.iter().rev() {
                        let event = &decoded.event;
                        if event.timestamp <= max
                            && event.timestamp >= min
                            && keep(event)
                            && take(&mut out, decoded)
                        {
                            break 'scan;
                        }
                    }
                    if key.value().1 < min {
                        break;
                    }
                }
            } else {
                // The chunk that may hold `min` starts at or before it.
                let first = match redb_try!(events.range((account, 0)..=(account, min)), "range")
                    .next_back()
                {
                    Some(entry) => redb_try!(entry, "read account events").0.value().1,
                    None => min,
                };
                for entry in redb_try!(events.range((account, first)..=(account, max)), "range") {
                    let (key, value) = redb_try!(entry, "read account events");
                    chunk.clear();
                    compact::decode_account_events(
                        account,
                        key.value().1,
                        value.value(),
                        &mut chunk,
                    )?;
                    for decoded in &chunk {
                        let event = &decoded.event;
                        if event.timestamp > max {
                            break 'scan;
                        }
                        if event.timestamp >= min && keep(event) && take(&mut out, decoded) {
                            break 'scan;
                        }
                    }
                }
            }
        }
        if transfers_wanted {
            // In id order: neighbouring ids share the B-tree's pages.
            by_id.sort_unstable();
            // After retention, the chunk kept across the cut may name transfers that were pruned:
            // those events are left out. Without retention a missing transfer is corruption.
            let pruned = read_anchor(&redb_try!(txn.open_table(META), "open meta"))?.0 > 0;
            let mut gone = Vec::new();
            for (id, position) in by_id {
                match redb_try!(transfers.get(id), "read transfer") {
                    Some(value) => {
                        out[position].transfer = compact::decode_stored_transfer(
                            id,
                            value.value(),
                            &self.account_numbers.read().expect("account numbers").ids,
                        )?
                        .transfer;
                    }
                    None if pruned => gone.push(position),
                    None => {
                        return Err(EngineError::Index {
                            context: "account event",
                            message: format!(
                                "account event names transfer {id} that is not indexed"
                            ),
                        })
                    }
                }
            }
            if !gone.is_empty() {
                gone.sort_unstable();
                let mut position = 0;
                out.retain(|_| {
                    let keep = gone.binary_search(&position).is_err();
                    position += 1;
                    keep
                });
            }
        }
        Ok(out)
    }

    fn refuse_without_history(&self) -> Result<(), EngineError> {
        if self.account_history {
            return Ok(());
        }
        Err(EngineError::Index {
            context: "account history",
            message: "this node keeps no account history (NodeOptions::account_history is off)"
                .into(),
        })
    }

    /// Transfers of an account within the filter, oldest first (newest first when reversed).
    pub fn get_account_transfers(
        &self,
        filter: &AccountFilter,
    ) -> Result<Vec<Transfer>, EngineError> {
        self.refuse_without_history()?;
        let events = self.account_events(filter, true, |event| {
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
        self.refuse_without_history()?;
        let events = self.account_events(filter, false, |event| {
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

/// Format 4 keeps the chain hash of every this many vouchers (and of each index transaction's
/// last); a reader recomputes the others from the bodies after the nearest kept one.
pub const VOUCHER_HASH_EVERY: u64 = 64;
/// Most vouchers a hash is recomputed over (more means a damaged index: refused, not walked).
const VOUCHER_WALK_MAX: u64 = 4 * VOUCHER_HASH_EVERY;

/// The sequence number after the last stored voucher (1 for an empty table).
fn next_voucher_seq(txn: &redb::WriteTransaction) -> Result<u64, EngineError> {
    let vouchers = redb_try!(txn.open_table(VOUCHERS), "open vouchers");
    let last = redb_try!(vouchers.last(), "read last voucher").map_or(0, |(seq, _)| seq.value());
    Ok(last + 1)
}

/// The voucher chain's anchor in `meta`: (seq, hash) of the last pruned voucher, zeros if none.
fn read_anchor(
    meta: &impl ReadableTable<&'static str, &'static [u8]>,
) -> Result<(u64, [u8; 32]), EngineError> {
    match redb_try!(meta.get("vouchers_anchor"), "read meta") {
        None => Ok((0, [0; 32])),
        Some(value) => {
            let bytes = value.value();
            if bytes.len() != 40 {
                return Err(EngineError::Index {
                    context: "vouchers_anchor",
                    message: format!("{} bytes, expected 40", bytes.len()),
                });
            }
            Ok((
                u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")),
                bytes[8..].try_into().expect("32 bytes"),
            ))
        }
    }
}

/// Writes one update's `puts` in journal order (a later put of the same key or alias lands
/// last). (Writing a transaction's puts in key order instead was measured: the records table
/// stayed as fragmented, since the keys that land behind the B-tree's last key come from earlier
/// transactions; BENCHMARKS.md.)
fn put_records(
    records: &mut redb::Table<u128, &[u8]>,
    open: &mut redb::Table<u128, u8>,
    aliases: &mut redb::Table<u128, u128>,
    puts: &[RecordPut],
) -> Result<(), EngineError> {
    for put in puts {
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
    Ok(())
}

/// The records and aliases a prune removes (see [`Prune`]); an open record is kept.
fn prune_records(
    records: &mut redb::Table<u128, &[u8]>,
    pruned: &mut redb::Table<u128, &[u8]>,
    open: &redb::Table<u128, u8>,
    aliases: &mut redb::Table<u128, u128>,
    prune: &Prune,
) -> Result<(), EngineError> {
    for key in &prune.delete {
        if redb_try!(open.get(*key), "read open record").is_none() {
            redb_try!(records.remove(*key), "prune record");
            redb_try!(pruned.remove(*key), "prune tombstone");
        }
    }
    // A replacement moves the record out of the live table into the pruned one.
    for (key, value) in &prune.replace {
        if redb_try!(open.get(*key), "read open record").is_none()
            && redb_try!(records.remove(*key), "prune record").is_some()
        {
            redb_try!(pruned.insert(*key, value.as_slice()), "insert tombstone");
        }
    }
    for alias in &prune.aliases {
        redb_try!(aliases.remove(*alias), "prune alias");
    }
    Ok(())
}

/// Applies the rest of one prune within an index transaction (see [`Prune`]): transfers,
/// vouchers, account events. Deterministic: replay and standbys remove the same entries. A
/// pending transfer is never removed.
fn apply_prune(txn: &redb::WriteTransaction, prune: &Prune) -> Result<(), EngineError> {
    {
        let mut transfers = redb_try!(txn.open_table(TRANSFERS), "open transfers");
        let pending = redb_try!(txn.open_table(PENDING), "open pending");
        for id in &prune.transfers {
            if redb_try!(pending.get(*id), "read pending").is_none() {
                redb_try!(transfers.remove(*id), "prune transfer");
            }
        }
    }
    if prune.vouchers_through > 0 {
        let mut meta = redb_try!(txn.open_table(META), "open meta");
        if read_anchor(&meta)?.0 < prune.vouchers_through {
            let mut vouchers = redb_try!(txn.open_table(VOUCHERS), "open vouchers");
            redb_try!(
                vouchers.retain_in(..=prune.vouchers_through, |_, _| false),
                "prune vouchers"
            );
            let mut anchor = prune.vouchers_through.to_le_bytes().to_vec();
            anchor.extend_from_slice(&prune.anchor_hash);
            redb_try!(
                meta.insert("vouchers_anchor", anchor.as_slice()),
                "write meta"
            );
        }
    }
    if prune.events_before > 0 {
        let accounts: Vec<u128> = {
            let table = redb_try!(txn.open_table(ACCOUNTS), "open accounts");
            let mut ids = Vec::new();
            for entry in redb_try!(table.iter(), "iterate accounts") {
                ids.push(redb_try!(entry, "read account").0.value());
            }
            ids
        };
        let mut events = redb_try!(txn.open_table(ACCOUNT_EVENTS), "open account events");
        for account in accounts {
            // The chunks starting at or before the cut, but the last of them (it may reach past).
            let last = match redb_try!(
                events.range((account, 0)..=(account, prune.events_before)),
                "range"
            )
            .next_back()
            {
                Some(entry) => redb_try!(entry, "read account events").0.value().1,
                None => continue,
            };
            if last > 0 {
                redb_try!(
                    events.retain_in((account, 0)..(account, last), |_, _| false),
                    "prune account events"
                );
            }
        }
    }
    Ok(())
}

/// One account's chunk being built by [`chunks_in_one_pass`].
struct OpenChunk {
    writer: ChunkWriter,
    first: u64,
    count: usize,
    bytes: Vec<u8>,
}

/// The account-event chunks of `updates`, (account, first timestamp, bytes) in key order, built
/// in one sequential pass: each event is appended to its account's open chunk as it comes, so
/// the ~240-byte events are read in memory order instead of gathered in key order. None when an
/// account's events are not in strictly increasing timestamp order (then sort instead).
fn chunks_in_one_pass(updates: &[IndexUpdate]) -> Option<Vec<(u128, u64, Vec<u8>)>> {
    let mut open: rustc_hash::FxHashMap<u128, OpenChunk> = rustc_hash::FxHashMap::default();
    let mut chunks = Vec::new();
    for event in updates
        .iter()
        .flat_map(|update| &update.changes.account_events)
    {
        let chunk = open.entry(event.account_id).or_insert_with(|| OpenChunk {
            writer: ChunkWriter::new(event.timestamp),
            first: event.timestamp,
            count: 0,
            bytes: Vec::with_capacity(64 * 32),
        });
        if chunk.count > 0 && event.timestamp <= chunk.writer.last_timestamp() {
            return None;
        }
        if chunk.count == ACCOUNT_EVENTS_PER_CHUNK_MAX {
            let bytes = std::mem::replace(&mut chunk.bytes, Vec::with_capacity(64 * 32));
            chunks.push((event.account_id, chunk.first, bytes));
            chunk.writer = ChunkWriter::new(event.timestamp);
            chunk.first = event.timestamp;
            chunk.count = 0;
        }
        chunk.writer.push(&mut chunk.bytes, event);
        chunk.count += 1;
    }
    chunks.extend(
        open.into_iter()
            .map(|(account, chunk)| (account, chunk.first, chunk.bytes)),
    );
    chunks.sort_unstable_by_key(|(account, first, _)| (*account, *first));
    Some(chunks)
}

/// The account-event chunks of `updates` in key order, by sorting the events by (account,
/// timestamp) through a permutation and reading them in that order (prefetched a few ahead).
fn chunks_by_sorting(updates: &[IndexUpdate]) -> Vec<(u128, u64, Vec<u8>)> {
    let count: usize = updates.iter().map(|u| u.changes.account_events.len()).sum();
    let mut order: Vec<(u128, u64, u32, u32)> = Vec::with_capacity(count);
    for (job, update) in updates.iter().enumerate() {
        order.extend(
            update
                .changes
                .account_events
                .iter()
                .enumerate()
                .map(|(index, event)| {
                    (event.account_id, event.timestamp, job as u32, index as u32)
                }),
        );
    }
    order.sort_unstable();
    let event = |position: usize| {
        let (_, _, job, index) = order[position];
        &updates[job as usize].changes.account_events[index as usize]
    };
    let mut chunks = Vec::new();
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
        let mut bytes = Vec::new();
        let mut chunk = ChunkWriter::new(order[start].1);
        for position in start..end {
            if position + PREFETCH_DISTANCE < order.len() {
                prefetch(event(position + PREFETCH_DISTANCE));
            }
            if position > start {
                assert!(
                    order[position - 1].1 < order[position].1,
                    "account events of one account have unique timestamps"
                );
            }
            chunk.push(&mut bytes, event(position));
        }
        chunks.push((account_id, order[start].1, bytes));
        start = end;
    }
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A window-closed voucher body (packs well).
    fn window_closed(n: u64) -> Vec<u8> {
        format!(
            "{{\"type\":\"window_closed\",\"window\":{n},\"opened_at_ns\":1,\"closed_at_ns\":2}}"
        )
        .into_bytes()
    }

    /// Stores voucher 1 as `value`, the way an older format laid it out.
    fn put_voucher_1(index: &Index, value: &[u8]) {
        let txn = index.db.begin_write().unwrap();
        txn.open_table(VOUCHERS).unwrap().insert(1, value).unwrap();
        txn.commit().unwrap();
    }

    fn set_format(index: &Index, format: Option<u32>) {
        let txn = index.db.begin_write().unwrap();
        {
            let mut meta = txn.open_table(META).unwrap();
            match format {
                Some(format) => {
                    meta.insert("index_format", format.to_le_bytes().as_slice())
                        .unwrap();
                }
                None => {
                    meta.remove("index_format").unwrap();
                }
            }
        }
        txn.commit().unwrap();
    }

    #[test]
    fn an_index_of_another_format_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.redb");
        let index = Index::open(&path).unwrap();
        index
            .apply(&IndexUpdate {
                seq: 3,
                changes: ChangeSet::default(),
                accounts: Vec::new(),
                scalars: LedgerScalars::default(),
                records: Vec::new(),
                vouchers: Vec::new(),
                prunes: Vec::new(),
                durable: true,
            })
            .unwrap();
        drop(index);
        // Reopening the same format works and keeps the data.
        let index = Index::open(&path).unwrap();
        assert_eq!(index.restore().unwrap().seq, 3);
        // Formats 2 and 3 open, keep their data and are marked with the current format (what is
        // written from now on is that).
        let mut index = index;
        for older in INDEX_FORMATS_READABLE {
            set_format(&index, Some(older));
            drop(index);
            index = Index::open(&path).unwrap();
            assert_eq!(index.restore().unwrap().seq, 3);
            let txn = index.db.begin_read().unwrap();
            let format = txn.open_table(META).unwrap().get("index_format").unwrap();
            assert_eq!(
                format.unwrap().value(),
                INDEX_FORMAT.to_le_bytes().as_slice()
            );
        }
        // An unversioned index with data (format 1) and a future format are refused, unchanged.
        set_format(&index, None);
        drop(index);
        let error = Index::open(&path).err().expect("refused").to_string();
        assert!(error.contains("1 (unversioned)"), "{error}");
        assert!(error.contains("index.redb"), "{error}");
        let index = Index {
            db: Database::create(&path).unwrap(),
            vouchers_packed_from: 0,
            vouchers_sparse_from: 0,
            account_history: true,
            account_numbers: Default::default(),
        };
        set_format(&index, Some(INDEX_FORMAT + 1));
        drop(index);
        let error = Index::open(&path).err().expect("refused").to_string();
        assert!(
            error.contains(&format!("format {}", INDEX_FORMAT + 1)),
            "{error}"
        );
        // A new, empty index is stamped with the current format.
        let fresh = dir.path().join("fresh.redb");
        drop(Index::open(&fresh).unwrap());
        let index = Index::open(&fresh).unwrap();
        assert_eq!(index.restore().unwrap().seq, 0);
    }

    fn event(
        account: u128,
        timestamp: u64,
        id: u128,
        kind: clearhouse_ledger::AccountEventKind,
    ) -> AccountEvent {
        let (debit, credit) = match kind {
            clearhouse_ledger::AccountEventKind::Debit => (account, 99),
            _ => (99, account),
        };
        AccountEvent {
            account_id: account,
            timestamp,
            transfer: Transfer {
                id,
                debit_account_id: debit,
                credit_account_id: credit,
                amount: id * 10,
                ledger: 1,
                code: 1,
                timestamp,
                ..Transfer::default()
            },
            kind,
            balance: Some(Balance {
                debits_posted: id * 100,
                ..Balance::default()
            }),
        }
    }

    /// An update with these events and, as the ledger's change sets always have, their transfers.
    fn update(seq: u64, account_events: Vec<AccountEvent>) -> IndexUpdate {
        let mut transfers: Vec<StoredTransfer> = account_events
            .iter()
            .map(|e| StoredTransfer {
                transfer: e.transfer,
                status: PendingStatus::None,
            })
            .collect();
        transfers.sort_by_key(|t| t.transfer.id);
        transfers.dedup_by_key(|t| t.transfer.id);
        IndexUpdate {
            seq,
            changes: ChangeSet {
                transfers,
                account_events,
                ..ChangeSet::default()
            },
            accounts: Vec::new(),
            scalars: LedgerScalars::default(),
            records: Vec::new(),
            vouchers: Vec::new(),
            prunes: Vec::new(),
            durable: false,
        }
    }

    #[test]
    fn vouchers_keep_every_64th_hash_and_every_hash_reads_back_before_and_after_a_prune() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.redb");
        let body = window_closed;
        // Voucher 1 as a format 3 index stored it (hash, then packed body); then format 4.
        let mut chain = VoucherChain::default();
        let mut all = vec![chain.append(body(1))];
        let index = Index::open(&path).unwrap();
        put_voucher_1(
            &index,
            &[&all[0].hash[..], &voucher_pack::pack(&all[0].body)].concat(),
        );
        set_format(&index, Some(3));
        drop(index);
        let index = Index::open(&path).unwrap();
        assert_eq!(index.vouchers_sparse_from, 2);
        // 299 more in index transactions of 1 to 49 vouchers.
        let mut seq = 1;
        let mut size = 1;
        while all.len() < 300 {
            let mut next = update(seq, Vec::new());
            for _ in 0..size.min(300 - all.len()) {
                all.push(chain.append(body(all.len() as u64 + 1)));
                next.vouchers.push(all.last().unwrap().clone());
            }
            seq += 1;
            size = (size * 7) % 50 + 1;
            index.apply_all(&[next]).unwrap();
        }
        // Most values hold no hash.
        {
            let txn = index.db.begin_read().unwrap();
            let table = txn.open_table(VOUCHERS).unwrap();
            let hashed = (2..=300)
                .filter(|s| table.get(*s).unwrap().unwrap().value()[0] == 1)
                .count();
            assert!((4..40).contains(&hashed), "{hashed} of 299 hold their hash");
            assert_eq!(
                table.get(300).unwrap().unwrap().value()[0],
                1,
                "the head keeps its hash"
            );
        }
        let check = |index: &Index, first: u64| {
            for from in [first, first + 1, 63, 64, 65, 127, 200, 299, 300] {
                let from = from.max(first);
                let read = index.vouchers(from, 70).unwrap();
                assert_eq!(
                    read[..],
                    all[from as usize - 1..(from as usize - 1 + 70).min(300)]
                );
                let bodies = index.voucher_bodies(from, 3).unwrap();
                assert_eq!(bodies[0], (from, all[from as usize - 1].body.clone()));
            }
            for s in first..=300 {
                assert_eq!(
                    index.voucher_hash(s).unwrap(),
                    Some(all[s as usize - 1].hash),
                    "voucher {s}"
                );
            }
            assert_eq!(
                index.restore().unwrap().vouchers,
                VoucherChain {
                    seq: 300,
                    hash: all[299].hash
                }
            );
        };
        check(&index, 1);
        // Pruned through 100 (no hash kept there): 101 on are still verified from the anchor.
        let mut next = update(seq, Vec::new());
        next.prunes.push(Prune {
            vouchers_through: 100,
            anchor_hash: all[99].hash,
            ..Prune::default()
        });
        index.apply_all(&[next]).unwrap();
        assert_eq!(index.voucher_hash(100).unwrap(), None);
        check(&index, 101);
        drop(index);
        check(&Index::open(&path).unwrap(), 101);
    }

    #[test]
    fn vouchers_are_stored_packed_and_those_of_a_format_2_index_read_as_they_were() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.redb");
        let body = window_closed;
        let mut chain = VoucherChain::default();
        let first = chain.append(body(1));
        // A format 2 index holding voucher 1 as hash and raw body.
        let index = Index::open(&path).unwrap();
        put_voucher_1(&index, &[&first.hash[..], &first.body].concat());
        set_format(&index, Some(2));
        drop(index);
        // Opened by this build: voucher 2 on is packed, voucher 1 stays as it was.
        let index = Index::open(&path).unwrap();
        assert_eq!(index.vouchers_packed_from, 2);
        let second = chain.append(body(2));
        let mut next = update(1, Vec::new());
        next.vouchers = vec![second.clone()];
        index.apply_all(&[next]).unwrap();
        assert_eq!(
            index.vouchers(0, 10).unwrap(),
            vec![first.clone(), second.clone()]
        );
        let txn = index.db.begin_read().unwrap();
        let table = txn.open_table(VOUCHERS).unwrap();
        assert_eq!(table.get(1).unwrap().unwrap().value()[32..], first.body[..]);
        let stored = table.get(2).unwrap().unwrap().value().to_vec();
        assert!(
            stored.len() < 32 + second.body.len() / 2,
            "{} bytes",
            stored.len()
        );
        drop((table, txn));
        drop(index);
        // A reopened index keeps the boundary.
        let index = Index::open(&path).unwrap();
        assert_eq!(index.vouchers(0, 10).unwrap(), vec![first, second]);
        assert_eq!(index.restore().unwrap().vouchers.seq, 2);
    }

    #[test]
    fn prunes_and_puts_apply_in_journal_order_however_they_are_grouped() {
        let put = |key: u128, alias: u128| RecordPut {
            key,
            value: vec![1],
            aliases: vec![alias],
            ..RecordPut::default()
        };
        let prune = Prune {
            delete: vec![1],
            aliases: vec![100],
            ..Prune::default()
        };
        // Record 1 with alias 100; then a prune of both, then record 2 taking alias 100 over.
        let updates = || {
            let mut first = update(1, Vec::new());
            first.records = vec![put(1, 100)];
            let mut second = update(2, Vec::new());
            second.prunes = vec![prune.clone()];
            let mut third = update(3, Vec::new());
            third.records = vec![put(2, 100)];
            [first, second, third]
        };
        let dir = tempfile::tempdir().unwrap();
        let together = Index::open(&dir.path().join("together.redb")).unwrap();
        together.apply_all(&updates()).unwrap();
        let apart = Index::open(&dir.path().join("apart.redb")).unwrap();
        for one in updates() {
            apart.apply(&one).unwrap();
        }
        for index in [&together, &apart] {
            assert_eq!(index.resolve_alias(100).unwrap(), Some(2));
            assert_eq!(
                index.get_records(&[1, 2]).unwrap(),
                vec![None, Some(vec![1])]
            );
        }
    }

    #[test]
    fn the_storage_report_counts_each_table_and_needs_the_index_closed() {
        use clearhouse_ledger::AccountEventKind::Debit;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.redb");
        let index = Index::open(&path).unwrap();
        index
            .apply_all(&[update(
                1,
                (0..50)
                    .map(|i| event(1, 10 + i, i as u128 + 1, Debit))
                    .collect(),
            )])
            .unwrap();
        assert!(storage_report(&path).is_err(), "the node still has it open");
        drop(index);
        let report = storage_report(&path).unwrap();
        let table = |name: &str| report.iter().find(|t| t.table == name).unwrap();
        assert_eq!(table("transfers").entries, 50);
        assert!(table("transfers").stored_bytes >= 50 * 16);
        assert_eq!(table("account_events").entries, 1, "one chunk");
        assert_eq!(table("vouchers").entries, 0);
        // The transfers' accounts got numbers (one each), and the transfers name them so: a
        // transfer takes well under its two 16-byte account ids.
        assert!((1..=51).contains(&table("account_numbers").entries));
        assert_eq!(report.len(), 11);
    }

    #[test]
    fn chunks_are_the_same_in_one_pass_or_sorted_and_out_of_order_events_fall_back() {
        use clearhouse_ledger::AccountEventKind::{Credit, Debit};
        // Two updates, three accounts, more events of account 1 than one chunk holds.
        let mut first = Vec::new();
        for i in 0..300u64 {
            first.push(event(1, 1_000 + i * 2, i as u128 + 1, Debit));
            if i % 3 == 0 {
                first.push(event(2, 1_000 + i * 2 + 1, 10_000 + i as u128, Credit));
            }
        }
        let second = vec![
            event(3, 5_000, 20_000, Debit),
            event(1, 5_001, 20_001, Credit),
        ];
        let ordered = [update(1, first), update(2, second)];
        let one_pass = chunks_in_one_pass(&ordered).expect("in order");
        assert_eq!(one_pass, chunks_by_sorting(&ordered));
        assert_eq!(
            one_pass
                .iter()
                .map(|(a, t, _)| (*a, *t))
                .collect::<Vec<_>>(),
            vec![(1, 1_000), (1, 1_000 + 256 * 2), (2, 1_001), (3, 5_000)],
            "account 1 split at 256 events; its later events join its open chunk"
        );
        // Out of order within an account: no one-pass result; the index still stores them sorted.
        let shuffled = [update(
            1,
            vec![event(4, 700, 2, Debit), event(4, 600, 1, Credit)],
        )];
        assert!(chunks_in_one_pass(&shuffled).is_none());
        let dir = tempfile::tempdir().unwrap();
        let index = Index::open(&dir.path().join("index.redb")).unwrap();
        index.apply_all(&shuffled).unwrap();
        let filter = AccountFilter {
            account_id: 4,
            timestamp_min: 0,
            timestamp_max: 0,
            limit: 10,
            debits: true,
            credits: true,
            reversed: false,
        };
        let found = index.get_account_transfers(&filter).unwrap();
        assert_eq!(found.iter().map(|t| t.id).collect::<Vec<_>>(), vec![1, 2]);
        let balances = index.get_account_balances(&filter).unwrap();
        assert_eq!(
            balances
                .iter()
                .map(|(t, b)| (*t, b.debits_posted))
                .collect::<Vec<_>>(),
            vec![(600, 100), (700, 200)]
        );
    }
}
