//! Model-based property test: random batches run against the real `Ledger` and against a small,
//! obviously-correct reference model written independently here (BTreeMaps, whole-state clones
//! for linked chains, linear scans for expiry). Results, accounts, transfers, pending state and
//! next expiry must be identical after every operation.

use std::collections::BTreeMap;

use clearhouse_ledger::*;
use proptest::prelude::*;

const LIMITS: LedgerLimits = LedgerLimits {
    accounts_max: 6,
    pending_transfers_max: 5,
    expiries_per_pulse_max: 2,
};
const NS: u64 = NANOSECONDS_PER_SECOND;

#[derive(Clone, Default)]
struct Model {
    accounts: BTreeMap<u128, Account>,
    transfers: BTreeMap<u128, StoredTransfer>,
    last_timestamp: u64,
}

fn expires_at(t: &Transfer) -> Option<u64> {
    (t.flags.contains(TransferFlags::PENDING) && t.timeout > 0)
        .then(|| t.timestamp.saturating_add(t.timeout as u64 * NS))
}

impl Model {
    fn pending_count(&self) -> usize {
        self.transfers
            .values()
            .filter(|s| s.status == PendingStatus::Pending)
            .count()
    }

    fn next_expiry(&self) -> Option<u64> {
        self.transfers
            .values()
            .filter(|s| s.status == PendingStatus::Pending)
            .filter_map(|s| expires_at(&s.transfer))
            .min()
    }

    fn timestamps(&mut self, now: u64, count: usize) -> u64 {
        let base = now.max(self.last_timestamp + 1);
        self.last_timestamp = base + count as u64 - 1;
        base
    }

    /// Splits a batch into chains: (first, last, open) index ranges.
    fn chains(linked: &[bool]) -> Vec<(usize, usize, bool)> {
        let mut out = Vec::new();
        let mut start = 0;
        while start < linked.len() {
            let mut end = start;
            while linked[end] && end + 1 < linked.len() {
                end += 1;
            }
            out.push((start, end, linked[end]));
            start = end + 1;
        }
        out
    }

    #[allow(clippy::too_many_arguments)]
    fn run<E, R: Copy + PartialEq>(
        &mut self,
        events: &[E],
        base: u64,
        linked: impl Fn(&E) -> bool,
        apply: impl Fn(&mut Model, u64, &E) -> R,
        ok: R,
        failed: R,
        open: R,
    ) -> Vec<R> {
        let flags: Vec<bool> = events.iter().map(&linked).collect();
        let mut results = Vec::new();
        for (start, end, is_open) in Self::chains(&flags) {
            let saved = (self.accounts.clone(), self.transfers.clone());
            let mut chain_results = Vec::new();
            let mut failure = None;
            #[allow(clippy::needless_range_loop)]
            for i in start..=end {
                let r = if is_open && i == end {
                    open
                } else {
                    apply(self, base + i as u64, &events[i])
                };
                chain_results.push(r);
                if r != ok {
                    failure = Some(i);
                    break;
                }
            }
            match failure {
                None => results.extend(chain_results),
                Some(f) => {
                    self.accounts = saved.0;
                    self.transfers = saved.1;
                    for i in start..=end {
                        results.push(if i == f {
                            chain_results[i - start]
                        } else {
                            failed
                        });
                    }
                }
            }
        }
        results
    }

    fn create_accounts(&mut self, now: u64, events: &[Account]) -> Vec<CreateAccountResult> {
        if events.is_empty() {
            return vec![];
        }
        let base = self.timestamps(now, events.len());
        self.run(
            events,
            base,
            |a| a.flags.contains(AccountFlags::LINKED),
            Model::create_account,
            CreateAccountResult::Ok,
            CreateAccountResult::LinkedEventFailed,
            CreateAccountResult::LinkedEventChainOpen,
        )
    }

    fn create_account(&mut self, timestamp: u64, a: &Account) -> CreateAccountResult {
        use CreateAccountResult::*;
        let both = AccountFlags::DEBITS_MUST_NOT_EXCEED_CREDITS
            .with(AccountFlags::CREDITS_MUST_NOT_EXCEED_DEBITS);
        let checks = [
            (a.timestamp != 0, TimestampMustBeZero),
            (a.flags.has_reserved_bits(), ReservedFlag),
            (a.id == 0, IdMustNotBeZero),
            (a.id == u128::MAX, IdMustNotBeIntMax),
            (a.flags.contains(both), FlagsAreMutuallyExclusive),
            (a.debits_pending != 0, DebitsPendingMustBeZero),
            (a.debits_posted != 0, DebitsPostedMustBeZero),
            (a.credits_pending != 0, CreditsPendingMustBeZero),
            (a.credits_posted != 0, CreditsPostedMustBeZero),
            (a.ledger == 0, LedgerMustNotBeZero),
            (a.code == 0, CodeMustNotBeZero),
            (
                a.flags.contains(AccountFlags::CLOSED),
                ClosedFlagMustNotBeSet,
            ),
        ];
        if let Some((_, r)) = checks.iter().find(|(bad, _)| *bad) {
            return *r;
        }
        if let Some(e) = self.accounts.get(&a.id) {
            let strip = |f: AccountFlags| {
                f.without(AccountFlags::LINKED)
                    .without(AccountFlags::CLOSED)
            };
            let diffs = [
                (strip(a.flags) != strip(e.flags), ExistsWithDifferentFlags),
                (
                    a.user_data_128 != e.user_data_128,
                    ExistsWithDifferentUserData128,
                ),
                (
                    a.user_data_64 != e.user_data_64,
                    ExistsWithDifferentUserData64,
                ),
                (
                    a.user_data_32 != e.user_data_32,
                    ExistsWithDifferentUserData32,
                ),
                (a.ledger != e.ledger, ExistsWithDifferentLedger),
                (a.code != e.code, ExistsWithDifferentCode),
            ];
            return diffs.iter().find(|(d, _)| *d).map_or(Exists, |(_, r)| *r);
        }
        if self.accounts.len() >= LIMITS.accounts_max {
            return AccountsFull;
        }
        self.accounts.insert(
            a.id,
            Account {
                timestamp,
                flags: a.flags.without(AccountFlags::LINKED),
                ..*a
            },
        );
        Ok
    }

    fn create_transfers(&mut self, now: u64, events: &[Transfer]) -> Vec<CreateTransferResult> {
        if events.is_empty() {
            return vec![];
        }
        let base = self.timestamps(now, events.len());
        self.run(
            events,
            base,
            |t| t.flags.contains(TransferFlags::LINKED),
            Model::create_transfer,
            CreateTransferResult::Ok,
            CreateTransferResult::LinkedEventFailed,
            CreateTransferResult::LinkedEventChainOpen,
        )
    }

    fn create_transfer(&mut self, timestamp: u64, t: &Transfer) -> CreateTransferResult {
        use CreateTransferResult::*;
        use TransferFlags as F;
        let f = t.flags;
        let pending = f.contains(F::PENDING);
        let post = f.contains(F::POST_PENDING);
        let void = f.contains(F::VOID_PENDING);
        let balancing = f.contains(F::BALANCING_DEBIT) || f.contains(F::BALANCING_CREDIT);
        let closing = f.contains(F::CLOSING_DEBIT) || f.contains(F::CLOSING_CREDIT);
        let phases = [pending, post, void].iter().filter(|x| **x).count();
        let mut checks = vec![
            (t.timestamp != 0, TimestampMustBeZero),
            (f.has_reserved_bits(), ReservedFlag),
            (t.id == 0, IdMustNotBeZero),
            (t.id == u128::MAX, IdMustNotBeIntMax),
            (
                phases > 1 || ((post || void) && (balancing || closing)),
                FlagsAreMutuallyExclusive,
            ),
        ];
        if post || void {
            checks.extend([
                (t.pending_id == 0, PendingIdMustNotBeZero),
                (t.pending_id == u128::MAX, PendingIdMustNotBeIntMax),
                (t.pending_id == t.id, PendingIdMustBeDifferent),
                (t.timeout != 0, TimeoutReservedForPendingTransfer),
            ]);
        } else {
            checks.extend([
                (t.pending_id != 0, PendingIdMustBeZero),
                (t.debit_account_id == 0, DebitAccountIdMustNotBeZero),
                (
                    t.debit_account_id == u128::MAX,
                    DebitAccountIdMustNotBeIntMax,
                ),
                (t.credit_account_id == 0, CreditAccountIdMustNotBeZero),
                (
                    t.credit_account_id == u128::MAX,
                    CreditAccountIdMustNotBeIntMax,
                ),
                (
                    t.debit_account_id == t.credit_account_id,
                    AccountsMustBeDifferent,
                ),
                (
                    t.timeout != 0 && !pending,
                    TimeoutReservedForPendingTransfer,
                ),
                (closing && !pending, ClosingTransferMustBePending),
                (t.ledger == 0, LedgerMustNotBeZero),
                (t.code == 0, CodeMustNotBeZero),
                (t.amount == 0 && !balancing, AmountMustNotBeZero),
            ]);
        }
        // Only the first failing check counts, in order.
        for (bad, result) in &checks {
            if *bad {
                return *result;
            }
        }
        if let Some(e) = self.transfers.get(&t.id).map(|s| s.transfer) {
            let amount_differs = if balancing {
                t.amount != 0 && t.amount < e.amount
            } else if post || void {
                t.amount != 0 && t.amount != e.amount
            } else {
                t.amount != e.amount
            };
            let diffs = [
                (f.without(F::LINKED) != e.flags, ExistsWithDifferentFlags),
                (
                    t.debit_account_id != 0 && t.debit_account_id != e.debit_account_id,
                    ExistsWithDifferentDebitAccountId,
                ),
                (
                    t.credit_account_id != 0 && t.credit_account_id != e.credit_account_id,
                    ExistsWithDifferentCreditAccountId,
                ),
                (amount_differs, ExistsWithDifferentAmount),
                (t.pending_id != e.pending_id, ExistsWithDifferentPendingId),
                (
                    t.user_data_128 != e.user_data_128,
                    ExistsWithDifferentUserData128,
                ),
                (
                    t.user_data_64 != e.user_data_64,
                    ExistsWithDifferentUserData64,
                ),
                (
                    t.user_data_32 != e.user_data_32,
                    ExistsWithDifferentUserData32,
                ),
                (t.timeout != e.timeout, ExistsWithDifferentTimeout),
                (
                    t.ledger != 0 && t.ledger != e.ledger,
                    ExistsWithDifferentLedger,
                ),
                (t.code != 0 && t.code != e.code, ExistsWithDifferentCode),
            ];
            return diffs.iter().find(|(d, _)| *d).map_or(Exists, |(_, r)| *r);
        }
        if post || void {
            return self.resolve(timestamp, t, post);
        }
        let Some(dr) = self.accounts.get(&t.debit_account_id).copied() else {
            return DebitAccountNotFound;
        };
        let Some(cr) = self.accounts.get(&t.credit_account_id).copied() else {
            return CreditAccountNotFound;
        };
        if dr.ledger != cr.ledger {
            return AccountsMustHaveTheSameLedger;
        }
        if t.ledger != dr.ledger {
            return TransferMustHaveTheSameLedgerAsAccounts;
        }
        if dr.flags.contains(AccountFlags::CLOSED) {
            return DebitAccountAlreadyClosed;
        }
        if cr.flags.contains(AccountFlags::CLOSED) {
            return CreditAccountAlreadyClosed;
        }
        let mut amount = if t.amount == 0 { u128::MAX } else { t.amount };
        if f.contains(F::BALANCING_DEBIT) {
            let used = dr.debits_posted.saturating_add(dr.debits_pending);
            amount = amount.min(dr.credits_posted.saturating_sub(used));
            if amount == 0 {
                return ExceedsCredits;
            }
        }
        if f.contains(F::BALANCING_CREDIT) {
            let used = cr.credits_posted.saturating_add(cr.credits_pending);
            amount = amount.min(cr.debits_posted.saturating_sub(used));
            if amount == 0 {
                return ExceedsDebits;
            }
        }
        let fits = |a: u128, b: u128| a.checked_add(b).is_some();
        if pending {
            if !fits(dr.debits_pending, amount) {
                return OverflowsDebitsPending;
            }
            if !fits(cr.credits_pending, amount) {
                return OverflowsCreditsPending;
            }
        } else {
            if !fits(dr.debits_posted, amount) {
                return OverflowsDebitsPosted;
            }
            if !fits(cr.credits_posted, amount) {
                return OverflowsCreditsPosted;
            }
        }
        let dr_total = dr
            .debits_pending
            .checked_add(dr.debits_posted)
            .and_then(|x| x.checked_add(amount));
        let cr_total = cr
            .credits_pending
            .checked_add(cr.credits_posted)
            .and_then(|x| x.checked_add(amount));
        let Some(dr_total) = dr_total else {
            return OverflowsDebits;
        };
        let Some(cr_total) = cr_total else {
            return OverflowsCredits;
        };
        if t.timeout != 0 && timestamp.checked_add(t.timeout as u64 * NS).is_none() {
            return OverflowsTimeout;
        }
        if dr
            .flags
            .contains(AccountFlags::DEBITS_MUST_NOT_EXCEED_CREDITS)
            && dr_total > dr.credits_posted
        {
            return ExceedsCredits;
        }
        if cr
            .flags
            .contains(AccountFlags::CREDITS_MUST_NOT_EXCEED_DEBITS)
            && cr_total > cr.debits_posted
        {
            return ExceedsDebits;
        }
        if pending && self.pending_count() >= LIMITS.pending_transfers_max {
            return PendingTransfersFull;
        }
        let dr = self.accounts.get_mut(&t.debit_account_id).unwrap();
        if pending {
            dr.debits_pending += amount;
            if f.contains(F::CLOSING_DEBIT) {
                dr.flags = dr.flags.with(AccountFlags::CLOSED);
            }
        } else {
            dr.debits_posted += amount;
        }
        let cr = self.accounts.get_mut(&t.credit_account_id).unwrap();
        if pending {
            cr.credits_pending += amount;
            if f.contains(F::CLOSING_CREDIT) {
                cr.flags = cr.flags.with(AccountFlags::CLOSED);
            }
        } else {
            cr.credits_posted += amount;
        }
        self.transfers.insert(
            t.id,
            StoredTransfer {
                transfer: Transfer {
                    amount,
                    timestamp,
                    flags: f.without(F::LINKED),
                    ..*t
                },
                status: if pending {
                    PendingStatus::Pending
                } else {
                    PendingStatus::None
                },
            },
        );
        Ok
    }

    fn resolve(&mut self, timestamp: u64, t: &Transfer, post: bool) -> CreateTransferResult {
        use CreateTransferResult::*;
        let Some(p) = self.transfers.get(&t.pending_id).copied() else {
            return PendingTransferNotFound;
        };
        let pt = p.transfer;
        if !pt.flags.contains(TransferFlags::PENDING) {
            return PendingTransferNotPending;
        }
        let checks = [
            (
                t.debit_account_id != 0 && t.debit_account_id != pt.debit_account_id,
                PendingTransferHasDifferentDebitAccountId,
            ),
            (
                t.credit_account_id != 0 && t.credit_account_id != pt.credit_account_id,
                PendingTransferHasDifferentCreditAccountId,
            ),
            (
                t.ledger != 0 && t.ledger != pt.ledger,
                PendingTransferHasDifferentLedger,
            ),
            (
                t.code != 0 && t.code != pt.code,
                PendingTransferHasDifferentCode,
            ),
            (post && t.amount > pt.amount, ExceedsPendingTransferAmount),
            (
                !post && t.amount != 0 && t.amount != pt.amount,
                PendingTransferHasDifferentAmount,
            ),
            (
                p.status == PendingStatus::Posted,
                PendingTransferAlreadyPosted,
            ),
            (
                p.status == PendingStatus::Voided,
                PendingTransferAlreadyVoided,
            ),
            (p.status == PendingStatus::Expired, PendingTransferExpired),
            (
                expires_at(&pt).is_some_and(|at| at <= timestamp),
                PendingTransferExpired,
            ),
        ];
        for (bad, result) in checks {
            if bad {
                return result;
            }
        }
        let amount = if post && t.amount != 0 {
            t.amount
        } else {
            pt.amount
        };
        let mut dr = self.accounts[&pt.debit_account_id];
        let mut cr = self.accounts[&pt.credit_account_id];
        let closed = |a: &Account| a.flags.contains(AccountFlags::CLOSED);
        if post && closed(&dr) && !pt.flags.contains(TransferFlags::CLOSING_DEBIT) {
            return DebitAccountAlreadyClosed;
        }
        if post && closed(&cr) && !pt.flags.contains(TransferFlags::CLOSING_CREDIT) {
            return CreditAccountAlreadyClosed;
        }
        dr.debits_pending -= pt.amount;
        cr.credits_pending -= pt.amount;
        if post {
            let (Some(d), Some(c)) = (
                dr.debits_posted.checked_add(amount),
                cr.credits_posted.checked_add(amount),
            ) else {
                return if dr.debits_posted.checked_add(amount).is_none() {
                    OverflowsDebitsPosted
                } else {
                    OverflowsCreditsPosted
                };
            };
            dr.debits_posted = d;
            cr.credits_posted = c;
        } else {
            if pt.flags.contains(TransferFlags::CLOSING_DEBIT) {
                dr.flags = dr.flags.without(AccountFlags::CLOSED);
            }
            if pt.flags.contains(TransferFlags::CLOSING_CREDIT) {
                cr.flags = cr.flags.without(AccountFlags::CLOSED);
            }
        }
        self.accounts.insert(dr.id, dr);
        self.accounts.insert(cr.id, cr);
        self.transfers.get_mut(&pt.id).unwrap().status = if post {
            PendingStatus::Posted
        } else {
            PendingStatus::Voided
        };
        self.transfers.insert(
            t.id,
            StoredTransfer {
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
            },
        );
        Ok
    }

    fn pulse(&mut self, now: u64) -> usize {
        let horizon = now.max(self.last_timestamp);
        let mut due: Vec<(u64, u128)> = self
            .transfers
            .values()
            .filter(|s| s.status == PendingStatus::Pending)
            .filter_map(|s| expires_at(&s.transfer).map(|at| (at, s.transfer.id)))
            .filter(|(at, _)| *at <= horizon)
            .collect();
        due.sort();
        due.truncate(LIMITS.expiries_per_pulse_max);
        if due.is_empty() {
            return 0;
        }
        self.timestamps(now, due.len());
        for (_, id) in &due {
            let pt = self.transfers[id].transfer;
            let dr = self.accounts.get_mut(&pt.debit_account_id).unwrap();
            dr.debits_pending -= pt.amount;
            if pt.flags.contains(TransferFlags::CLOSING_DEBIT) {
                dr.flags = dr.flags.without(AccountFlags::CLOSED);
            }
            let cr = self.accounts.get_mut(&pt.credit_account_id).unwrap();
            cr.credits_pending -= pt.amount;
            if pt.flags.contains(TransferFlags::CLOSING_CREDIT) {
                cr.flags = cr.flags.without(AccountFlags::CLOSED);
            }
            self.transfers.get_mut(id).unwrap().status = PendingStatus::Expired;
        }
        due.len()
    }
}

#[derive(Clone, Debug)]
enum Op {
    Accounts(u64, Vec<Account>),
    Transfers(u64, Vec<Transfer>),
    Pulse(u64),
}

fn account_strategy() -> impl Strategy<Value = Account> {
    (
        1u128..=8,
        0u8..12,
        prop_oneof![3 => Just(1u32), 1 => Just(2u32)],
        prop::bool::weighted(0.2),
        0u8..3,
    )
        .prop_map(|(id, variant, ledger, linked, data)| {
            let mut a = Account {
                id,
                ledger,
                code: 1,
                user_data_32: data as u32,
                ..Account::default()
            };
            a.flags = match variant {
                0 => AccountFlags::DEBITS_MUST_NOT_EXCEED_CREDITS,
                1 => AccountFlags::CREDITS_MUST_NOT_EXCEED_DEBITS,
                2 => AccountFlags::HISTORY,
                3 => AccountFlags::DEBITS_MUST_NOT_EXCEED_CREDITS
                    .with(AccountFlags::CREDITS_MUST_NOT_EXCEED_DEBITS),
                4 => AccountFlags(1 << 9),
                5 => AccountFlags::CLOSED,
                _ => AccountFlags::NONE,
            };
            match variant {
                6 => a.ledger = 0,
                7 => a.code = 0,
                8 => a.id = 0,
                9 => a.credits_posted = 5,
                10 => a.timestamp = 1,
                _ => {}
            }
            if linked {
                a.flags = a.flags.with(AccountFlags::LINKED);
            }
            a
        })
}

fn transfer_strategy() -> impl Strategy<Value = Transfer> {
    let amount = prop_oneof![
        4 => 1u128..=200,
        1 => Just(0u128),
        1 => (u128::MAX - 300)..=u128::MAX,
    ];
    let account = || prop_oneof![8 => 1u128..=4, 1 => 0u128..=9];
    let kind = prop_oneof![12 => 0u8..12, 1 => 12u8..16];
    let linked = prop::bool::weighted(0.15);
    let ledger = prop_oneof![9 => Just(1u32), 1 => Just(2u32)];
    (
        1u128..=40,
        account(),
        account(),
        amount,
        kind,
        1u128..=40,
        0u32..=3,
        linked,
        ledger,
    )
        .prop_map(
            |(id, debit, credit, amount, kind, pending_id, timeout, linked, ledger)| {
                use TransferFlags as F;
                let mut t = Transfer {
                    id,
                    debit_account_id: debit,
                    credit_account_id: credit,
                    amount,
                    ledger,
                    code: 1,
                    ..Transfer::default()
                };
                match kind {
                    0..=2 => {}
                    3..=5 => {
                        t.flags = F::PENDING;
                        t.timeout = timeout;
                    }
                    6 | 7 => {
                        t.flags = F::POST_PENDING;
                        t.pending_id = pending_id;
                        if kind == 6 {
                            t.debit_account_id = 0;
                            t.credit_account_id = 0;
                            t.ledger = 0;
                            t.amount = t.amount.min(150);
                        }
                    }
                    8 => {
                        t.flags = F::VOID_PENDING;
                        t.pending_id = pending_id;
                        t.debit_account_id = 0;
                        t.credit_account_id = 0;
                        t.amount = 0;
                    }
                    9 => t.flags = F::BALANCING_DEBIT,
                    10 => t.flags = F::BALANCING_CREDIT,
                    11 => {
                        t.flags = F::PENDING.with(F::CLOSING_DEBIT);
                        t.timeout = timeout;
                    }
                    12 => t.flags = F::CLOSING_CREDIT,
                    13 => t.flags = F::PENDING.with(F::POST_PENDING),
                    14 => t.timeout = 1,
                    _ => t.code = 0,
                }
                if linked {
                    t.flags = t.flags.with(F::LINKED);
                }
                t
            },
        )
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let step = 0u64..2 * NS;
    prop_oneof![
        2 => (step.clone(), prop::collection::vec(account_strategy(), 0..6)).prop_map(|(s, a)| Op::Accounts(s, a)),
        6 => (step.clone(), prop::collection::vec(transfer_strategy(), 0..12)).prop_map(|(s, t)| Op::Transfers(s, t)),
        1 => step.prop_map(Op::Pulse),
    ]
}

fn assert_same(ledger: &Ledger, model: &Model) {
    for id in 0..=9u128 {
        assert_eq!(ledger.account(id), model.accounts.get(&id), "account {id}");
    }
    for id in 0..=41u128 {
        assert_eq!(
            ledger.cached_transfer(id),
            model.transfers.get(&id),
            "transfer {id}"
        );
    }
    assert_eq!(
        ledger.pending_count(),
        model.pending_count(),
        "pending count"
    );
    assert_eq!(ledger.next_expiry(), model.next_expiry(), "next expiry");
    assert_eq!(
        ledger.scalars().last_timestamp,
        model.last_timestamp,
        "timestamps"
    );
    for (ledger_id, totals) in ledger.totals() {
        assert_eq!(
            totals.debits_pending, totals.credits_pending,
            "ledger {ledger_id}"
        );
        assert_eq!(
            totals.debits_posted, totals.credits_posted,
            "ledger {ledger_id}"
        );
    }
    ledger.assert_invariants_full();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn ledger_matches_the_reference_model(ops in prop::collection::vec(op_strategy(), 1..40)) {
        let mut ledger = Ledger::new(LIMITS);
        let mut model = Model::default();
        let mut now = NS;
        // Start from funded accounts so that limits and balancing have something to work with.
        let seed_accounts: Vec<Account> = (1..=4u128).map(|id| Account {
            id, ledger: 1, code: 1,
            flags: if id == 3 { AccountFlags::DEBITS_MUST_NOT_EXCEED_CREDITS } else { AccountFlags::NONE },
            ..Account::default()
        }).collect();
        let mut results = Vec::new();
        ledger.create_accounts(now, &seed_accounts, &mut results).unwrap();
        prop_assert_eq!(&results, &model.create_accounts(now, &seed_accounts));
        for op in ops {
            match op {
                Op::Accounts(step, accounts) => {
                    now += step;
                    let mut got = Vec::new();
                    ledger.create_accounts(now, &accounts, &mut got).unwrap();
                    prop_assert_eq!(got, model.create_accounts(now, &accounts), "{:?}", accounts);
                }
                Op::Transfers(step, transfers) => {
                    now += step;
                    let mut got = Vec::new();
                    ledger.create_transfers(now, &transfers, &mut got).unwrap();
                    prop_assert_eq!(got, model.create_transfers(now, &transfers), "{:?}", transfers);
                }
                Op::Pulse(step) => {
                    now += step;
                    prop_assert_eq!(ledger.pulse(now), model.pulse(now));
                }
            }
            assert_same(&ledger, &model);
        }
    }
}

fn account(id: u128, flags: AccountFlags) -> Account {
    Account {
        id,
        ledger: 1,
        code: 1,
        flags,
        ..Account::default()
    }
}

fn transfer(id: u128, debit: u128, credit: u128, amount: u128, flags: TransferFlags) -> Transfer {
    Transfer {
        id,
        debit_account_id: debit,
        credit_account_id: credit,
        amount,
        ledger: 1,
        code: 1,
        flags,
        ..Transfer::default()
    }
}

#[test]
fn a_failing_event_rolls_back_its_whole_linked_chain() {
    let mut ledger = Ledger::new(LedgerLimits::default());
    let mut results = Vec::new();
    ledger
        .create_accounts(
            1,
            &[
                account(1, AccountFlags::NONE),
                account(2, AccountFlags::NONE),
            ],
            &mut Vec::new(),
        )
        .unwrap();
    let chain = [
        transfer(10, 1, 2, 100, TransferFlags::LINKED),
        transfer(11, 1, 3, 5, TransferFlags::NONE), // account 3 does not exist
        transfer(12, 2, 1, 7, TransferFlags::NONE),
    ];
    ledger.create_transfers(10, &chain, &mut results).unwrap();
    use CreateTransferResult::*;
    assert_eq!(results, vec![LinkedEventFailed, CreditAccountNotFound, Ok]);
    assert_eq!(
        ledger.account(1).unwrap().debits_posted,
        0,
        "the chain's first transfer was undone"
    );
    assert_eq!(ledger.account(1).unwrap().credits_posted, 7);
    assert!(ledger.cached_transfer(10).is_none());
}

#[test]
fn a_partially_posted_transfer_cannot_be_posted_again() {
    let mut ledger = Ledger::new(LedgerLimits::default());
    let mut results = Vec::new();
    ledger
        .create_accounts(
            1,
            &[
                account(1, AccountFlags::NONE),
                account(2, AccountFlags::NONE),
            ],
            &mut Vec::new(),
        )
        .unwrap();
    ledger
        .create_transfers(
            10,
            &[transfer(1, 1, 2, 100, TransferFlags::PENDING)],
            &mut results,
        )
        .unwrap();
    let post = |id, amount| Transfer {
        id,
        pending_id: 1,
        amount,
        flags: TransferFlags::POST_PENDING,
        ..Transfer::default()
    };
    ledger
        .create_transfers(20, &[post(2, 60)], &mut results)
        .unwrap();
    assert_eq!(results, vec![CreateTransferResult::Ok]);
    let a = ledger.account(1).unwrap();
    assert_eq!(
        (a.debits_pending, a.debits_posted),
        (0, 60),
        "the unposted 40 is released"
    );
    ledger
        .create_transfers(30, &[post(3, 10)], &mut results)
        .unwrap();
    assert_eq!(
        results,
        vec![CreateTransferResult::PendingTransferAlreadyPosted]
    );
    // The same post again is idempotent.
    ledger
        .create_transfers(40, &[post(2, 60)], &mut results)
        .unwrap();
    assert_eq!(results, vec![CreateTransferResult::Exists]);
}

#[test]
fn expiry_releases_the_reservation_and_reopens_a_closed_account() {
    let mut ledger = Ledger::new(LedgerLimits::default());
    let mut results = Vec::new();
    ledger
        .create_accounts(
            1,
            &[
                account(1, AccountFlags::NONE),
                account(2, AccountFlags::NONE),
            ],
            &mut Vec::new(),
        )
        .unwrap();
    let closing = Transfer {
        timeout: 2,
        ..transfer(
            1,
            1,
            2,
            30,
            TransferFlags::PENDING.with(TransferFlags::CLOSING_DEBIT),
        )
    };
    ledger
        .create_transfers(NS, &[closing], &mut results)
        .unwrap();
    assert_eq!(results, vec![CreateTransferResult::Ok]);
    assert!(ledger
        .account(1)
        .unwrap()
        .flags
        .contains(AccountFlags::CLOSED));
    ledger
        .create_transfers(
            NS + 10,
            &[transfer(2, 1, 2, 1, TransferFlags::NONE)],
            &mut results,
        )
        .unwrap();
    assert_eq!(
        results,
        vec![CreateTransferResult::DebitAccountAlreadyClosed]
    );
    assert_eq!(ledger.pulse(2 * NS), 0, "not yet due");
    assert_eq!(ledger.pulse(3 * NS + 10), 1);
    let a = ledger.account(1).unwrap();
    assert_eq!(a.debits_pending, 0);
    assert!(!a.flags.contains(AccountFlags::CLOSED));
    assert_eq!(
        ledger.cached_transfer(1).unwrap().status,
        PendingStatus::Expired
    );
    ledger
        .create_transfers(
            4 * NS,
            &[transfer(2, 1, 2, 1, TransferFlags::NONE)],
            &mut results,
        )
        .unwrap();
    assert_eq!(results, vec![CreateTransferResult::Ok]);
}

#[test]
fn a_pending_transfer_cannot_be_posted_into_an_account_closed_by_another() {
    // Found by the second model (crates/ledger/tests/model.rs): posting used to move money out of
    // an account that another pending transfer had closed.
    let mut ledger = Ledger::new(LedgerLimits::default());
    let accounts: Vec<Account> = (1..=3).map(|id| account(id, AccountFlags::NONE)).collect();
    ledger
        .create_accounts(1, &accounts, &mut Vec::new())
        .unwrap();
    let mut results = Vec::new();
    let ordinary = transfer(1, 1, 2, 10, TransferFlags::PENDING);
    let closing = transfer(
        2,
        1,
        3,
        1,
        TransferFlags::PENDING.with(TransferFlags::CLOSING_DEBIT),
    );
    ledger
        .create_transfers(10, &[ordinary, closing], &mut results)
        .unwrap();
    assert_eq!(results, vec![CreateTransferResult::Ok; 2]);
    let post = |id, pending_id| Transfer {
        id,
        pending_id,
        flags: TransferFlags::POST_PENDING,
        ..Transfer::default()
    };
    ledger
        .create_transfers(20, &[post(3, 1)], &mut results)
        .unwrap();
    assert_eq!(
        results,
        vec![CreateTransferResult::DebitAccountAlreadyClosed]
    );
    assert_eq!(ledger.account(1).unwrap().debits_posted, 0);
    // The closing transfer itself can be posted: the account stays closed for good.
    ledger
        .create_transfers(30, &[post(4, 2)], &mut results)
        .unwrap();
    assert_eq!(results, vec![CreateTransferResult::Ok]);
    assert_eq!(ledger.account(1).unwrap().debits_posted, 1);
    // The other reservation can still be voided, releasing it.
    let void = Transfer {
        id: 5,
        pending_id: 1,
        flags: TransferFlags::VOID_PENDING,
        ..Transfer::default()
    };
    ledger.create_transfers(40, &[void], &mut results).unwrap();
    assert_eq!(results, vec![CreateTransferResult::Ok]);
    assert_eq!(ledger.account(1).unwrap().debits_pending, 0);
}
