//! The ledger state machine: applies batches of events deterministically.
//!
//! Inputs are the events and the batch timestamp; nothing else (no clock, no I/O, no randomness),
//! so replaying the same batches from the same state yields the same state and results.

use std::collections::BTreeSet;

use rustc_hash::{FxHashMap, FxHashSet};

use crate::results::{CreateAccountResult, CreateTransferResult};
use crate::types::*;

/// Limits that bound the memory the ledger holds. Exceeding one answers a result code, never a panic.
#[derive(Clone, Copy, Debug)]
pub struct LedgerLimits {
    pub accounts_max: usize,
    /// Pending transfers not yet posted, voided or expired.
    pub pending_transfers_max: usize,
    /// Most pending transfers one pulse expires; the rest wait for the next pulse.
    pub expiries_per_pulse_max: usize,
}

impl Default for LedgerLimits {
    fn default() -> Self {
        LedgerLimits {
            accounts_max: 10_000_000,
            pending_transfers_max: 10_000_000,
            expiries_per_pulse_max: BATCH_EVENTS_MAX,
        }
    }
}

/// What one account saw at one timestamp, for the account history index.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct AccountEvent {
    pub account_id: u128,
    pub timestamp: u64,
    /// The transfer (for expiries: the pending transfer that expired, as created).
    pub transfer: Transfer,
    pub kind: AccountEventKind,
    /// Balances after the event, kept only for accounts with the HISTORY flag.
    pub balance: Option<Balance>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
pub enum AccountEventKind {
    /// The account is the transfer's debit account.
    Debit = 1,
    /// The account is the transfer's credit account.
    Credit = 2,
    /// A pending transfer expired and released this account's debit reservation.
    ExpiryDebit = 3,
    /// A pending transfer expired and released this account's credit reservation.
    ExpiryCredit = 4,
}

impl AccountEventKind {
    pub fn from_u8(value: u8) -> Option<Self> {
        Some(match value {
            1 => Self::Debit,
            2 => Self::Credit,
            3 => Self::ExpiryDebit,
            4 => Self::ExpiryCredit,
            _ => return None,
        })
    }
    pub fn is_transfer(self) -> bool {
        matches!(self, Self::Debit | Self::Credit)
    }
}

/// Everything one batch changed, for the on-disk index. Filled by each batch, drained by the engine.
#[derive(Default, Debug)]
pub struct ChangeSet {
    /// New transfers, and pending transfers whose status changed (latest version wins).
    pub transfers: Vec<StoredTransfer>,
    pub account_events: Vec<AccountEvent>,
    /// New accounts.
    pub accounts_created: Vec<Account>,
}

impl ChangeSet {
    pub fn clear(&mut self) {
        self.transfers.clear();
        self.account_events.clear();
        self.accounts_created.clear();
    }
    fn lengths(&self) -> (usize, usize, usize) {
        (
            self.transfers.len(),
            self.account_events.len(),
            self.accounts_created.len(),
        )
    }
    fn truncate(&mut self, lengths: (usize, usize, usize)) {
        self.transfers.truncate(lengths.0);
        self.account_events.truncate(lengths.1);
        self.accounts_created.truncate(lengths.2);
    }
}

/// Scalar state that a snapshot must carry besides accounts and pending transfers.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct LedgerScalars {
    pub last_timestamp: u64,
    pub transfer_id_max: u128,
    pub transfers_count: u64,
}

enum Undo {
    AccountChanged(Account),
    AccountInserted(u128),
    TransferInserted(u128),
    TransferChanged(StoredTransfer),
    ExpiryInserted((u64, u128)),
    ExpiryRemoved((u64, u128)),
    Totals(u32, Balance),
    Scalars(LedgerScalars, usize),
}

/// The double-entry ledger.
///
/// Memory: every account; every pending transfer that is still pending; and a cache of transfers
/// that the engine fills before a batch (prefetch) and trims once they are on disk (eviction).
/// The engine guarantees that, when a batch runs, every transfer whose id or pending id the batch
/// names is in the cache if it exists at all (see [`Ledger::transfer_ids_to_prefetch`]).
pub struct Ledger {
    limits: LedgerLimits,
    accounts: FxHashMap<u128, Account>,
    transfers: FxHashMap<u128, StoredTransfer>,
    expiries: BTreeSet<(u64, u128)>,
    pending_count: usize,
    /// Per ledger: sums of the four balance columns over all its accounts.
    totals: Vec<(u32, Balance)>,
    scalars: LedgerScalars,
    undo: Vec<Undo>,
    recording_undo: bool,
    changes: ChangeSet,
    dirty_accounts: FxHashSet<u128>,
    /// See [`Ledger::set_account_events`].
    account_events_on: bool,
}

/// Why the ledger refused a whole batch (nothing was applied).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchError {
    TooManyEvents { count: usize, max: usize },
}

impl std::fmt::Display for BatchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BatchError::TooManyEvents { count, max } => {
                write!(f, "batch holds {count} events, at most {max} are allowed")
            }
        }
    }
}
impl std::error::Error for BatchError {}

impl Ledger {
    pub fn new(limits: LedgerLimits) -> Ledger {
        Ledger {
            limits,
            accounts: FxHashMap::default(),
            transfers: FxHashMap::default(),
            expiries: BTreeSet::new(),
            pending_count: 0,
            totals: Vec::new(),
            scalars: LedgerScalars::default(),
            undo: Vec::new(),
            recording_undo: false,
            changes: ChangeSet::default(),
            dirty_accounts: FxHashSet::default(),
            account_events_on: true,
        }
    }

    /// Whether transfers leave [`AccountEvent`]s (the account-history index behind
    /// `get_account_transfers` and `get_account_balances`); on by default. A node that never
    /// asks for account history (the payment switch) turns them off: its index then writes
    /// neither the events nor their balances.
    pub fn set_account_events(&mut self, on: bool) {
        self.account_events_on = on;
    }

    /// Rebuilds a ledger from a snapshot: all accounts, all still-pending transfers and the scalars.
    pub fn restore(
        limits: LedgerLimits,
        accounts: impl IntoIterator<Item = Account>,
        pending: impl IntoIterator<Item = StoredTransfer>,
        scalars: LedgerScalars,
    ) -> Ledger {
        let mut ledger = Ledger::new(limits);
        for account in accounts {
            ledger.add_totals(account.ledger, &Account::default(), &account);
            let previous = ledger.accounts.insert(account.id, account);
            assert!(
                previous.is_none(),
                "snapshot holds account {} twice",
                account.id
            );
        }
        for stored in pending {
            assert_eq!(stored.status, PendingStatus::Pending);
            if let Some(expires_at) = stored.expires_at() {
                ledger.expiries.insert((expires_at, stored.transfer.id));
            }
            ledger.pending_count += 1;
            ledger.transfers.insert(stored.transfer.id, stored);
        }
        ledger.scalars = scalars;
        ledger.assert_invariants_full();
        ledger
    }

    pub fn scalars(&self) -> LedgerScalars {
        self.scalars
    }

    pub fn accounts(&self) -> impl Iterator<Item = &Account> {
        self.accounts.values()
    }

    pub fn account(&self, id: u128) -> Option<&Account> {
        self.accounts.get(&id)
    }

    /// A transfer from the cache (the engine prefetches from disk what is not there).
    pub fn cached_transfer(&self, id: u128) -> Option<&StoredTransfer> {
        self.transfers.get(&id)
    }

    pub fn cached_transfers_count(&self) -> usize {
        self.transfers.len()
    }

    pub fn pending_transfers(&self) -> impl Iterator<Item = &StoredTransfer> {
        self.transfers
            .values()
            .filter(|stored| stored.status == PendingStatus::Pending)
    }

    pub fn pending_count(&self) -> usize {
        self.pending_count
    }

    /// Per-ledger sums of debits and credits (pending, posted).
    pub fn totals(&self) -> &[(u32, Balance)] {
        &self.totals
    }

    /// The change set of the batches applied since the last [`Ledger::take_changes`].
    pub fn take_changes(&mut self, into: &mut ChangeSet) {
        std::mem::swap(into, &mut self.changes);
        self.changes.clear();
    }

    /// Accounts changed since the last call (for snapshots); clears the set.
    pub fn take_dirty_accounts(&mut self) -> Vec<Account> {
        let dirty: Vec<Account> = self
            .dirty_accounts
            .iter()
            .filter_map(|id| self.accounts.get(id).copied())
            .collect();
        self.dirty_accounts.clear();
        dirty
    }

    /// The ids a batch of transfers needs that are neither cached nor known to be absent.
    /// A transfer id above the largest id ever created cannot exist, so it needs no disk lookup.
    pub fn transfer_ids_to_prefetch(&self, transfers: &[Transfer], out: &mut Vec<u128>) {
        let id_max = self.scalars.transfer_id_max;
        for transfer in transfers {
            for id in [transfer.id, transfer.pending_id] {
                if id != 0 && id <= id_max && !self.transfers.contains_key(&id) {
                    out.push(id);
                }
            }
        }
    }

    /// Puts a transfer read from disk into the cache. Must be the latest version of it.
    pub fn insert_prefetched(&mut self, stored: StoredTransfer) {
        debug_assert!(stored.transfer.id <= self.scalars.transfer_id_max);
        self.transfers.entry(stored.transfer.id).or_insert(stored);
    }

    /// Drops a transfer from the cache once it is safely on disk. Pending transfers stay.
    pub fn evict(&mut self, id: u128) {
        if let Some(stored) = self.transfers.get(&id) {
            if stored.status != PendingStatus::Pending {
                self.transfers.remove(&id);
            }
        }
    }

    /// The earliest moment a pending transfer expires, if any is pending with a timeout.
    pub fn next_expiry(&self) -> Option<u64> {
        self.expiries.first().map(|(at, _)| *at)
    }

    fn batch_timestamp(&mut self, now: u64, count: usize) -> u64 {
        let base = now.max(self.scalars.last_timestamp + 1);
        self.scalars.last_timestamp = base + count as u64 - 1;
        base
    }

    // ----- create_accounts -------------------------------------------------------------------

    pub fn create_accounts(
        &mut self,
        now: u64,
        events: &[Account],
        results: &mut Vec<CreateAccountResult>,
    ) -> Result<(), BatchError> {
        if events.len() > BATCH_EVENTS_MAX {
            return Err(BatchError::TooManyEvents {
                count: events.len(),
                max: BATCH_EVENTS_MAX,
            });
        }
        results.clear();
        if events.is_empty() {
            return Ok(());
        }
        let base = self.batch_timestamp(now, events.len());
        run_chains(
            self,
            events,
            results,
            |account| account.flags.contains(AccountFlags::LINKED),
            |ledger, index, account| ledger.create_account(base + index as u64, account),
            CreateAccountResult::Ok,
            CreateAccountResult::LinkedEventFailed,
            CreateAccountResult::LinkedEventChainOpen,
        );
        self.assert_invariants_cheap();
        Ok(())
    }

    fn create_account(&mut self, timestamp: u64, a: &Account) -> CreateAccountResult {
        use CreateAccountResult as R;
        if a.timestamp != 0 {
            return R::TimestampMustBeZero;
        }
        if a.flags.has_reserved_bits() {
            return R::ReservedFlag;
        }
        if a.id == 0 {
            return R::IdMustNotBeZero;
        }
        if a.id == ID_MAX {
            return R::IdMustNotBeIntMax;
        }
        if a.flags.contains(
            AccountFlags::DEBITS_MUST_NOT_EXCEED_CREDITS
                .with(AccountFlags::CREDITS_MUST_NOT_EXCEED_DEBITS),
        ) {
            return R::FlagsAreMutuallyExclusive;
        }
        if a.debits_pending != 0 {
            return R::DebitsPendingMustBeZero;
        }
        if a.debits_posted != 0 {
            return R::DebitsPostedMustBeZero;
        }
        if a.credits_pending != 0 {
            return R::CreditsPendingMustBeZero;
        }
        if a.credits_posted != 0 {
            return R::CreditsPostedMustBeZero;
        }
        if a.ledger == 0 {
            return R::LedgerMustNotBeZero;
        }
        if a.code == 0 {
            return R::CodeMustNotBeZero;
        }
        if a.flags.contains(AccountFlags::CLOSED) {
            return R::ClosedFlagMustNotBeSet;
        }
        if let Some(e) = self.accounts.get(&a.id) {
            let ignore = AccountFlags::LINKED.with(AccountFlags::CLOSED);
            return if a.flags.without(ignore) != e.flags.without(ignore) {
                R::ExistsWithDifferentFlags
            } else if a.user_data_128 != e.user_data_128 {
                R::ExistsWithDifferentUserData128
            } else if a.user_data_64 != e.user_data_64 {
                R::ExistsWithDifferentUserData64
            } else if a.user_data_32 != e.user_data_32 {
                R::ExistsWithDifferentUserData32
            } else if a.ledger != e.ledger {
                R::ExistsWithDifferentLedger
            } else if a.code != e.code {
                R::ExistsWithDifferentCode
            } else {
                R::Exists
            };
        }
        if self.accounts.len() >= self.limits.accounts_max {
            return R::AccountsFull;
        }
        let account = Account {
            timestamp,
            flags: a.flags.without(AccountFlags::LINKED),
            ..*a
        };
        self.accounts.insert(account.id, account);
        if self.recording_undo {
            self.undo.push(Undo::AccountInserted(account.id));
        }
        if !self
            .totals
            .iter()
            .any(|(ledger, _)| *ledger == account.ledger)
        {
            // A new ledger's totals start (and, on rollback, stay) at zero: harmless.
            self.totals.push((account.ledger, Balance::default()));
        }
        self.changes.accounts_created.push(account);
        self.dirty_accounts.insert(account.id);
        R::Ok
    }

    // ----- create_transfers ------------------------------------------------------------------

    pub fn create_transfers(
        &mut self,
        now: u64,
        events: &[Transfer],
        results: &mut Vec<CreateTransferResult>,
    ) -> Result<(), BatchError> {
        if events.len() > BATCH_EVENTS_MAX {
            return Err(BatchError::TooManyEvents {
                count: events.len(),
                max: BATCH_EVENTS_MAX,
            });
        }
        results.clear();
        if events.is_empty() {
            return Ok(());
        }
        let base = self.batch_timestamp(now, events.len());
        run_chains(
            self,
            events,
            results,
            |transfer| transfer.flags.contains(TransferFlags::LINKED),
            |ledger, index, transfer| ledger.create_transfer(base + index as u64, transfer),
            CreateTransferResult::Ok,
            CreateTransferResult::LinkedEventFailed,
            CreateTransferResult::LinkedEventChainOpen,
        );
        self.assert_invariants_cheap();
        Ok(())
    }

    fn create_transfer(&mut self, timestamp: u64, t: &Transfer) -> CreateTransferResult {
        use CreateTransferResult as R;
        if t.timestamp != 0 {
            return R::TimestampMustBeZero;
        }
        if t.flags.has_reserved_bits() {
            return R::ReservedFlag;
        }
        if t.id == 0 {
            return R::IdMustNotBeZero;
        }
        if t.id == ID_MAX {
            return R::IdMustNotBeIntMax;
        }
        let f = t.flags;
        let phase_flags = [
            TransferFlags::PENDING,
            TransferFlags::POST_PENDING,
            TransferFlags::VOID_PENDING,
        ]
        .iter()
        .filter(|flag| f.contains(**flag))
        .count();
        let resolves = f.intersects(TransferFlags::POST_PENDING.with(TransferFlags::VOID_PENDING));
        let balancing =
            f.intersects(TransferFlags::BALANCING_DEBIT.with(TransferFlags::BALANCING_CREDIT));
        let closing =
            f.intersects(TransferFlags::CLOSING_DEBIT.with(TransferFlags::CLOSING_CREDIT));
        if phase_flags > 1 || (resolves && (balancing || closing)) {
            return R::FlagsAreMutuallyExclusive;
        }
        if resolves {
            if t.pending_id == 0 {
                return R::PendingIdMustNotBeZero;
            }
            if t.pending_id == ID_MAX {
                return R::PendingIdMustNotBeIntMax;
            }
            if t.pending_id == t.id {
                return R::PendingIdMustBeDifferent;
            }
            if t.timeout != 0 {
                return R::TimeoutReservedForPendingTransfer;
            }
        } else {
            if t.pending_id != 0 {
                return R::PendingIdMustBeZero;
            }
            if t.debit_account_id == 0 {
                return R::DebitAccountIdMustNotBeZero;
            }
            if t.debit_account_id == ID_MAX {
                return R::DebitAccountIdMustNotBeIntMax;
            }
            if t.credit_account_id == 0 {
                return R::CreditAccountIdMustNotBeZero;
            }
            if t.credit_account_id == ID_MAX {
                return R::CreditAccountIdMustNotBeIntMax;
            }
            if t.debit_account_id == t.credit_account_id {
                return R::AccountsMustBeDifferent;
            }
            if t.timeout != 0 && !f.contains(TransferFlags::PENDING) {
                return R::TimeoutReservedForPendingTransfer;
            }
            if closing && !f.contains(TransferFlags::PENDING) {
                return R::ClosingTransferMustBePending;
            }
            if t.ledger == 0 {
                return R::LedgerMustNotBeZero;
            }
            if t.code == 0 {
                return R::CodeMustNotBeZero;
            }
            if t.amount == 0 && !balancing {
                return R::AmountMustNotBeZero;
            }
        }

        if let Some(existing) = self.transfers.get(&t.id) {
            return transfer_exists_result(t, &existing.transfer);
        }
        if resolves {
            self.resolve_pending(timestamp, t)
        } else {
            self.create_single_or_pending(timestamp, t)
        }
    }

    fn create_single_or_pending(&mut self, timestamp: u64, t: &Transfer) -> CreateTransferResult {
        use CreateTransferResult as R;
        let f = t.flags;
        let Some(dr) = self.accounts.get(&t.debit_account_id).copied() else {
            return R::DebitAccountNotFound;
        };
        let Some(cr) = self.accounts.get(&t.credit_account_id).copied() else {
            return R::CreditAccountNotFound;
        };
        if dr.ledger != cr.ledger {
            return R::AccountsMustHaveTheSameLedger;
        }
        if t.ledger != dr.ledger {
            return R::TransferMustHaveTheSameLedgerAsAccounts;
        }
        if dr.flags.contains(AccountFlags::CLOSED) {
            return R::DebitAccountAlreadyClosed;
        }
        if cr.flags.contains(AccountFlags::CLOSED) {
            return R::CreditAccountAlreadyClosed;
        }
        let mut amount = if t.amount == 0 { u128::MAX } else { t.amount };
        if f.contains(TransferFlags::BALANCING_DEBIT) {
            let available = dr
                .credits_posted
                .saturating_sub(dr.debits_posted.saturating_add(dr.debits_pending));
            amount = amount.min(available);
            if amount == 0 {
                return R::ExceedsCredits;
            }
        }
        if f.contains(TransferFlags::BALANCING_CREDIT) {
            let available = cr
                .debits_posted
                .saturating_sub(cr.credits_posted.saturating_add(cr.credits_pending));
            amount = amount.min(available);
            if amount == 0 {
                return R::ExceedsDebits;
            }
        }
        let pending = f.contains(TransferFlags::PENDING);
        if pending {
            if dr.debits_pending.checked_add(amount).is_none() {
                return R::OverflowsDebitsPending;
            }
            if cr.credits_pending.checked_add(amount).is_none() {
                return R::OverflowsCreditsPending;
            }
        } else {
            if dr.debits_posted.checked_add(amount).is_none() {
                return R::OverflowsDebitsPosted;
            }
            if cr.credits_posted.checked_add(amount).is_none() {
                return R::OverflowsCreditsPosted;
            }
        }
        let Some(dr_total) = dr
            .debits_pending
            .checked_add(dr.debits_posted)
            .and_then(|sum| sum.checked_add(amount))
        else {
            return R::OverflowsDebits;
        };
        let Some(cr_total) = cr
            .credits_pending
            .checked_add(cr.credits_posted)
            .and_then(|sum| sum.checked_add(amount))
        else {
            return R::OverflowsCredits;
        };
        if t.timeout != 0
            && timestamp
                .checked_add(t.timeout as u64 * NANOSECONDS_PER_SECOND)
                .is_none()
        {
            return R::OverflowsTimeout;
        }
        if dr
            .flags
            .contains(AccountFlags::DEBITS_MUST_NOT_EXCEED_CREDITS)
            && dr_total > dr.credits_posted
        {
            return R::ExceedsCredits;
        }
        if cr
            .flags
            .contains(AccountFlags::CREDITS_MUST_NOT_EXCEED_DEBITS)
            && cr_total > cr.debits_posted
        {
            return R::ExceedsDebits;
        }
        if pending && self.pending_count >= self.limits.pending_transfers_max {
            return R::PendingTransfersFull;
        }

        // Every check passed: apply. Nothing below can fail.
        let mut dr_new = dr;
        let mut cr_new = cr;
        if pending {
            dr_new.debits_pending += amount;
            cr_new.credits_pending += amount;
            if f.contains(TransferFlags::CLOSING_DEBIT) {
                dr_new.flags = dr_new.flags.with(AccountFlags::CLOSED);
            }
            if f.contains(TransferFlags::CLOSING_CREDIT) {
                cr_new.flags = cr_new.flags.with(AccountFlags::CLOSED);
            }
        } else {
            dr_new.debits_posted += amount;
            cr_new.credits_posted += amount;
        }
        let stored = StoredTransfer {
            transfer: Transfer {
                amount,
                timestamp,
                flags: f.without(TransferFlags::LINKED),
                ..*t
            },
            status: if pending {
                PendingStatus::Pending
            } else {
                PendingStatus::None
            },
        };
        self.put_account(dr, dr_new);
        self.put_account(cr, cr_new);
        self.insert_transfer(stored);
        if pending {
            self.save_scalars();
            self.pending_count += 1;
            if let Some(expires_at) = stored.expires_at() {
                self.insert_expiry((expires_at, t.id));
            }
        }
        self.record_transfer_events(timestamp, &stored.transfer, &dr_new, &cr_new, false);
        R::Ok
    }

    fn resolve_pending(&mut self, timestamp: u64, t: &Transfer) -> CreateTransferResult {
        use CreateTransferResult as R;
        let post = t.flags.contains(TransferFlags::POST_PENDING);
        let Some(p) = self.transfers.get(&t.pending_id).copied() else {
            return R::PendingTransferNotFound;
        };
        let pt = p.transfer;
        if !pt.flags.contains(TransferFlags::PENDING) {
            return R::PendingTransferNotPending;
        }
        if t.debit_account_id != 0 && t.debit_account_id != pt.debit_account_id {
            return R::PendingTransferHasDifferentDebitAccountId;
        }
        if t.credit_account_id != 0 && t.credit_account_id != pt.credit_account_id {
            return R::PendingTransferHasDifferentCreditAccountId;
        }
        if t.ledger != 0 && t.ledger != pt.ledger {
            return R::PendingTransferHasDifferentLedger;
        }
        if t.code != 0 && t.code != pt.code {
            return R::PendingTransferHasDifferentCode;
        }
        if post && t.amount > pt.amount {
            return R::ExceedsPendingTransferAmount;
        }
        if !post && t.amount != 0 && t.amount != pt.amount {
            return R::PendingTransferHasDifferentAmount;
        }
        match p.status {
            PendingStatus::Posted => return R::PendingTransferAlreadyPosted,
            PendingStatus::Voided => return R::PendingTransferAlreadyVoided,
            PendingStatus::Expired => return R::PendingTransferExpired,
            PendingStatus::None => unreachable!("a PENDING transfer always has a pending status"),
            PendingStatus::Pending => {}
        }
        if let Some(expires_at) = p.expires_at() {
            if expires_at <= timestamp {
                // Due but not yet expired by a pulse: the reservation is no longer valid.
                return R::PendingTransferExpired;
            }
        }
        let dr = *self
            .accounts
            .get(&pt.debit_account_id)
            .expect("the debit account of a pending transfer exists");
        let cr = *self
            .accounts
            .get(&pt.credit_account_id)
            .expect("the credit account of a pending transfer exists");
        // No money moves into or out of a closed account: a post is refused unless the pending
        // transfer being posted is the one that closed it. Voiding (and expiry) stay possible.
        if post {
            if dr.flags.contains(AccountFlags::CLOSED)
                && !pt.flags.contains(TransferFlags::CLOSING_DEBIT)
            {
                return R::DebitAccountAlreadyClosed;
            }
            if cr.flags.contains(AccountFlags::CLOSED)
                && !pt.flags.contains(TransferFlags::CLOSING_CREDIT)
            {
                return R::CreditAccountAlreadyClosed;
            }
        }
        let amount = if post {
            if t.amount == 0 {
                pt.amount
            } else {
                t.amount
            }
        } else {
            pt.amount
        };
        let mut dr_new = dr;
        let mut cr_new = cr;
        dr_new.debits_pending = dr.debits_pending.checked_sub(pt.amount).expect("reserved");
        cr_new.credits_pending = cr.credits_pending.checked_sub(pt.amount).expect("reserved");
        if post {
            let Some(debits_posted) = dr.debits_posted.checked_add(amount) else {
                return R::OverflowsDebitsPosted;
            };
            let Some(credits_posted) = cr.credits_posted.checked_add(amount) else {
                return R::OverflowsCreditsPosted;
            };
            dr_new.debits_posted = debits_posted;
            cr_new.credits_posted = credits_posted;
        } else {
            if pt.flags.contains(TransferFlags::CLOSING_DEBIT) {
                dr_new.flags = dr_new.flags.without(AccountFlags::CLOSED);
            }
            if pt.flags.contains(TransferFlags::CLOSING_CREDIT) {
                cr_new.flags = cr_new.flags.without(AccountFlags::CLOSED);
            }
        }
        let stored = StoredTransfer {
            transfer: Transfer {
                debit_account_id: pt.debit_account_id,
                credit_account_id: pt.credit_account_id,
                ledger: pt.ledger,
                code: if t.code == 0 { pt.code } else { t.code },
                amount,
                timestamp,
                flags: t.flags.without(TransferFlags::LINKED),
                ..*t
            },
            status: PendingStatus::None,
        };
        self.put_account(dr, dr_new);
        self.put_account(cr, cr_new);
        self.set_pending_status(
            p,
            if post {
                PendingStatus::Posted
            } else {
                PendingStatus::Voided
            },
        );
        self.insert_transfer(stored);
        self.record_transfer_events(timestamp, &stored.transfer, &dr_new, &cr_new, false);
        R::Ok
    }

    // ----- pulse: expiry ---------------------------------------------------------------------

    /// Expires pending transfers due at or before `now`, at most `expiries_per_pulse_max` of them.
    /// Returns how many expired.
    pub fn pulse(&mut self, now: u64) -> usize {
        let mut due = Vec::new();
        for (at, id) in self.expiries.iter() {
            if *at > now.max(self.scalars.last_timestamp)
                || due.len() >= self.limits.expiries_per_pulse_max
            {
                break;
            }
            due.push((*at, *id));
        }
        if due.is_empty() {
            return 0;
        }
        let base = self.batch_timestamp(now, due.len());
        for (index, key) in due.iter().enumerate() {
            let timestamp = base + index as u64;
            let p = *self
                .transfers
                .get(&key.1)
                .expect("expiring transfer is cached");
            assert_eq!(p.status, PendingStatus::Pending);
            let pt = p.transfer;
            let dr = *self.accounts.get(&pt.debit_account_id).expect("account");
            let cr = *self.accounts.get(&pt.credit_account_id).expect("account");
            let mut dr_new = dr;
            let mut cr_new = cr;
            dr_new.debits_pending = dr.debits_pending.checked_sub(pt.amount).expect("reserved");
            cr_new.credits_pending = cr.credits_pending.checked_sub(pt.amount).expect("reserved");
            if pt.flags.contains(TransferFlags::CLOSING_DEBIT) {
                dr_new.flags = dr_new.flags.without(AccountFlags::CLOSED);
            }
            if pt.flags.contains(TransferFlags::CLOSING_CREDIT) {
                cr_new.flags = cr_new.flags.without(AccountFlags::CLOSED);
            }
            self.put_account(dr, dr_new);
            self.put_account(cr, cr_new);
            self.set_pending_status(p, PendingStatus::Expired);
            self.record_transfer_events(timestamp, &pt, &dr_new, &cr_new, true);
        }
        self.assert_invariants_cheap();
        due.len()
    }

    // ----- mutation helpers (each records its undo while a linked chain runs) ----------------

    fn put_account(&mut self, old: Account, new: Account) {
        if self.recording_undo {
            self.undo.push(Undo::AccountChanged(old));
        }
        self.add_totals(new.ledger, &old, &new);
        self.accounts.insert(new.id, new);
        self.dirty_accounts.insert(new.id);
    }

    fn add_totals(&mut self, ledger: u32, old: &Account, new: &Account) {
        let index = match self.totals.iter().position(|(l, _)| *l == ledger) {
            Some(index) => index,
            None => {
                self.totals.push((ledger, Balance::default()));
                self.totals.len() - 1
            }
        };
        let (_, totals) = &mut self.totals[index];
        if self.recording_undo {
            self.undo.push(Undo::Totals(ledger, *totals));
        }
        // Apply the account's deltas column by column. Totals are kept modulo 2^128: two
        // accounts may each hold close to u128::MAX, so the true sum can exceed u128. Equal true
        // totals stay equal modulo 2^128, so the debit/credit check still catches any imbalance
        // short of an exact multiple of 2^128.
        totals.debits_pending = totals
            .debits_pending
            .wrapping_sub(old.debits_pending)
            .wrapping_add(new.debits_pending);
        totals.debits_posted = totals
            .debits_posted
            .wrapping_sub(old.debits_posted)
            .wrapping_add(new.debits_posted);
        totals.credits_pending = totals
            .credits_pending
            .wrapping_sub(old.credits_pending)
            .wrapping_add(new.credits_pending);
        totals.credits_posted = totals
            .credits_posted
            .wrapping_sub(old.credits_posted)
            .wrapping_add(new.credits_posted);
    }

    fn insert_transfer(&mut self, stored: StoredTransfer) {
        self.save_scalars();
        let previous = self.transfers.insert(stored.transfer.id, stored);
        assert!(previous.is_none(), "transfer ids are unique");
        if self.recording_undo {
            self.undo.push(Undo::TransferInserted(stored.transfer.id));
        }
        self.scalars.transfer_id_max = self.scalars.transfer_id_max.max(stored.transfer.id);
        self.scalars.transfers_count += 1;
        self.changes.transfers.push(stored);
    }

    fn set_pending_status(&mut self, p: StoredTransfer, status: PendingStatus) {
        debug_assert_eq!(p.status, PendingStatus::Pending);
        self.save_scalars();
        if self.recording_undo {
            self.undo.push(Undo::TransferChanged(p));
        }
        let updated = StoredTransfer { status, ..p };
        self.transfers.insert(p.transfer.id, updated);
        self.pending_count -= 1;
        if let Some(expires_at) = p.expires_at() {
            let key = (expires_at, p.transfer.id);
            if self.expiries.remove(&key) && self.recording_undo {
                self.undo.push(Undo::ExpiryRemoved(key));
            }
        }
        self.changes.transfers.push(updated);
    }

    fn insert_expiry(&mut self, key: (u64, u128)) {
        if self.expiries.insert(key) && self.recording_undo {
            self.undo.push(Undo::ExpiryInserted(key));
        }
    }

    fn save_scalars(&mut self) {
        if self.recording_undo {
            self.undo
                .push(Undo::Scalars(self.scalars, self.pending_count));
        }
    }

    fn record_transfer_events(
        &mut self,
        timestamp: u64,
        t: &Transfer,
        dr: &Account,
        cr: &Account,
        expiry: bool,
    ) {
        if !self.account_events_on {
            return;
        }
        let (debit_kind, credit_kind) = if expiry {
            (
                AccountEventKind::ExpiryDebit,
                AccountEventKind::ExpiryCredit,
            )
        } else {
            (AccountEventKind::Debit, AccountEventKind::Credit)
        };
        for (account, kind) in [(dr, debit_kind), (cr, credit_kind)] {
            self.changes.account_events.push(AccountEvent {
                account_id: account.id,
                timestamp,
                transfer: *t,
                kind,
                balance: account
                    .flags
                    .contains(AccountFlags::HISTORY)
                    .then(|| account.balance()),
            });
        }
    }

    fn begin_chain(&mut self) -> (usize, (usize, usize, usize)) {
        debug_assert!(!self.recording_undo);
        self.recording_undo = true;
        (self.undo.len(), self.changes.lengths())
    }

    fn end_chain(&mut self, mark: (usize, (usize, usize, usize)), rollback: bool) {
        if rollback {
            while self.undo.len() > mark.0 {
                match self.undo.pop().expect("undo entry") {
                    Undo::AccountChanged(account) => {
                        self.accounts.insert(account.id, account);
                    }
                    Undo::AccountInserted(id) => {
                        self.accounts.remove(&id);
                    }
                    Undo::TransferInserted(id) => {
                        self.transfers.remove(&id);
                    }
                    Undo::TransferChanged(stored) => {
                        self.transfers.insert(stored.transfer.id, stored);
                    }
                    Undo::ExpiryInserted(key) => {
                        self.expiries.remove(&key);
                    }
                    Undo::ExpiryRemoved(key) => {
                        self.expiries.insert(key);
                    }
                    Undo::Totals(ledger, totals) => {
                        let entry = self
                            .totals
                            .iter_mut()
                            .find(|(l, _)| *l == ledger)
                            .expect("totals of a known ledger");
                        entry.1 = totals;
                    }
                    Undo::Scalars(scalars, pending_count) => {
                        // Timestamps are not rolled back: they were handed out for the batch.
                        let last_timestamp = self.scalars.last_timestamp;
                        self.scalars = LedgerScalars {
                            last_timestamp,
                            ..scalars
                        };
                        self.pending_count = pending_count;
                    }
                }
            }
            self.changes.truncate(mark.1);
        }
        self.undo.truncate(mark.0);
        self.recording_undo = false;
    }

    // ----- invariants ------------------------------------------------------------------------

    /// O(ledgers): per ledger, debits equal credits, pending and posted. Runs after every batch,
    /// in release builds too. In debug builds it also recomputes the totals from every account.
    pub fn assert_invariants_cheap(&self) {
        for (ledger, totals) in &self.totals {
            assert_eq!(
                totals.debits_pending, totals.credits_pending,
                "ledger {ledger}: pending debits and credits differ"
            );
            assert_eq!(
                totals.debits_posted, totals.credits_posted,
                "ledger {ledger}: posted debits and credits differ"
            );
        }
        assert!(self.undo.is_empty() && !self.recording_undo);
        if cfg!(debug_assertions) {
            self.assert_invariants_full();
        }
    }

    /// O(accounts + pending): recomputes every total from the accounts and checks the expiry index.
    pub fn assert_invariants_full(&self) {
        let mut sums: FxHashMap<u32, Balance> = FxHashMap::default();
        for account in self.accounts.values() {
            // Modulo 2^128, like the running totals (see `add_totals`).
            let sum = sums.entry(account.ledger).or_default();
            sum.debits_pending = sum.debits_pending.wrapping_add(account.debits_pending);
            sum.debits_posted = sum.debits_posted.wrapping_add(account.debits_posted);
            sum.credits_pending = sum.credits_pending.wrapping_add(account.credits_pending);
            sum.credits_posted = sum.credits_posted.wrapping_add(account.credits_posted);
        }
        for (ledger, totals) in &self.totals {
            let sum = sums.get(ledger).copied().unwrap_or_default();
            assert_eq!(
                sum, *totals,
                "ledger {ledger}: totals drifted from the accounts"
            );
            assert_eq!(sum.debits_pending, sum.credits_pending);
            assert_eq!(sum.debits_posted, sum.credits_posted);
        }
        let pending = self
            .transfers
            .values()
            .filter(|s| s.status == PendingStatus::Pending)
            .count();
        assert_eq!(pending, self.pending_count, "pending count drifted");
        for (at, id) in &self.expiries {
            let stored = self.transfers.get(id).expect("expiring transfer is cached");
            assert_eq!(stored.status, PendingStatus::Pending);
            assert_eq!(stored.expires_at(), Some(*at));
        }
    }
}

fn transfer_exists_result(t: &Transfer, e: &Transfer) -> CreateTransferResult {
    use CreateTransferResult as R;
    let f = t.flags;
    let resolves = f.intersects(TransferFlags::POST_PENDING.with(TransferFlags::VOID_PENDING));
    let balancing =
        f.intersects(TransferFlags::BALANCING_DEBIT.with(TransferFlags::BALANCING_CREDIT));
    let amount_differs = if balancing {
        t.amount != 0 && t.amount < e.amount
    } else if resolves {
        t.amount != 0 && t.amount != e.amount
    } else {
        t.amount != e.amount
    };
    if f.without(TransferFlags::LINKED) != e.flags {
        R::ExistsWithDifferentFlags
    } else if t.debit_account_id != 0 && t.debit_account_id != e.debit_account_id {
        R::ExistsWithDifferentDebitAccountId
    } else if t.credit_account_id != 0 && t.credit_account_id != e.credit_account_id {
        R::ExistsWithDifferentCreditAccountId
    } else if amount_differs {
        R::ExistsWithDifferentAmount
    } else if t.pending_id != e.pending_id {
        R::ExistsWithDifferentPendingId
    } else if t.user_data_128 != e.user_data_128 {
        R::ExistsWithDifferentUserData128
    } else if t.user_data_64 != e.user_data_64 {
        R::ExistsWithDifferentUserData64
    } else if t.user_data_32 != e.user_data_32 {
        R::ExistsWithDifferentUserData32
    } else if t.timeout != e.timeout {
        R::ExistsWithDifferentTimeout
    } else if t.ledger != 0 && t.ledger != e.ledger {
        R::ExistsWithDifferentLedger
    } else if t.code != 0 && t.code != e.code {
        R::ExistsWithDifferentCode
    } else {
        R::Exists
    }
}

/// Runs a batch event by event, grouping linked events into chains that succeed or fail as one.
#[allow(clippy::too_many_arguments)]
fn run_chains<E, R: Copy + PartialEq>(
    ledger: &mut Ledger,
    events: &[E],
    results: &mut Vec<R>,
    is_linked: impl Fn(&E) -> bool,
    mut apply: impl FnMut(&mut Ledger, usize, &E) -> R,
    ok: R,
    linked_event_failed: R,
    linked_event_chain_open: R,
) {
    let count = events.len();
    let mut index = 0;
    while index < count {
        if !is_linked(&events[index]) {
            let result = apply(ledger, index, &events[index]);
            results.push(result);
            index += 1;
            continue;
        }
        // A chain: events[index..=end], where end is the first event without LINKED.
        let start = index;
        let end = (start..count)
            .find(|i| !is_linked(&events[*i]))
            .unwrap_or(count - 1);
        let chain_open = is_linked(&events[end]);
        let mark = ledger.begin_chain();
        let mut failure: Option<(usize, R)> = None;
        for (i, event) in events.iter().enumerate().take(end + 1).skip(start) {
            let result = if chain_open && i == end {
                linked_event_chain_open
            } else {
                apply(ledger, i, event)
            };
            if result != ok {
                failure = Some((i, result));
                break;
            }
        }
        ledger.end_chain(mark, failure.is_some());
        for i in start..=end {
            results.push(match failure {
                None => ok,
                Some((failed, result)) if failed == i => result,
                Some(_) => linked_event_failed,
            });
        }
        index = end + 1;
    }
}

/// Which transfers of an account a query wants, and in what order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AccountFilter {
    pub account_id: u128,
    /// Inclusive; 0 means no lower bound.
    pub timestamp_min: u64,
    /// Inclusive; 0 means no upper bound.
    pub timestamp_max: u64,
    pub limit: u32,
    pub debits: bool,
    pub credits: bool,
    /// Newest first.
    pub reversed: bool,
}
