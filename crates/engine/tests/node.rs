//! The durable node against the plain in-memory ledger (itself checked against a reference model
//! in crates/ledger/tests/model.rs): same results and balances through prefetch, cache eviction,
//! checkpoints, segment deletion and restarts; and index queries against a naive recomputation.

use std::collections::BTreeMap;
use std::time::Duration;

use clearhouse_engine::{Node, NodeOptions};
use clearhouse_ledger::{
    Account, AccountFilter, AccountFlags, CreateTransferResult, Ledger, LedgerLimits,
    PendingStatus, Transfer, TransferFlags,
};
use proptest::prelude::*;

fn small_options(dir: &std::path::Path) -> NodeOptions {
    let mut options = NodeOptions::new(dir);
    options.journal.segment_size = clearhouse_journal::SEGMENT_SIZE_MIN;
    options.checkpoint_every_records = 3;
    options.group_requests_max = 4;
    options.unindexed_transfers_max = 10_000;
    options.disk_free_min_bytes = 16 * 1024 * 1024;
    options
}

fn accounts(count: u128) -> Vec<Account> {
    (1..=count)
        .map(|id| Account {
            id,
            ledger: 1,
            code: 1,
            flags: if id % 3 == 0 {
                AccountFlags::DEBITS_MUST_NOT_EXCEED_CREDITS.with(AccountFlags::HISTORY)
            } else {
                AccountFlags::HISTORY
            },
            ..Account::default()
        })
        .collect()
}

#[derive(Clone, Debug)]
enum Op {
    Transfers(Vec<Transfer>),
    Restart,
}

/// The first page of both sides of an account's history.
fn all_of(account_id: u128) -> AccountFilter {
    AccountFilter {
        account_id,
        timestamp_min: 0,
        timestamp_max: 0,
        limit: 10,
        debits: true,
        credits: true,
        reversed: false,
    }
}

/// A posted transfer of ledger 1, code 1.
fn plain_transfer(
    id: u128,
    debit_account_id: u128,
    credit_account_id: u128,
    amount: u128,
) -> Transfer {
    Transfer {
        id,
        debit_account_id,
        credit_account_id,
        amount,
        ledger: 1,
        code: 1,
        ..Transfer::default()
    }
}

fn transfer_strategy() -> impl Strategy<Value = Transfer> {
    (
        1u128..=60,
        1u128..=6,
        1u128..=6,
        prop_oneof![Just(0u128), 1u128..=500],
        0u8..6,
        1u128..=60,
        any::<bool>(),
    )
        .prop_map(|(id, debit, credit, amount, kind, pending_id, linked)| {
            let mut t = Transfer {
                id,
                debit_account_id: debit,
                credit_account_id: credit,
                amount,
                ledger: 1,
                code: 1,
                ..Transfer::default()
            };
            match kind {
                0 | 1 => {}
                2 => t.flags = TransferFlags::PENDING,
                3 => {
                    t.flags = TransferFlags::POST_PENDING;
                    t.pending_id = pending_id;
                    t.debit_account_id = 0;
                    t.credit_account_id = 0;
                }
                4 => {
                    t.flags = TransferFlags::VOID_PENDING;
                    t.pending_id = pending_id;
                    t.debit_account_id = 0;
                    t.credit_account_id = 0;
                    t.amount = 0;
                }
                _ => t.flags = TransferFlags::BALANCING_DEBIT,
            }
            if linked {
                t.flags = t.flags.with(TransferFlags::LINKED);
            }
            t
        })
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => prop::collection::vec(transfer_strategy(), 1..16).prop_map(Op::Transfers),
        1 => Just(Op::Restart),
    ]
}

fn check_same_state(node: &Node, reference: &Ledger, ids_seen: &[u128]) {
    for account in node.lookup_accounts((1..=6).collect()).unwrap() {
        let expected = reference.account(account.id).unwrap();
        assert_eq!(
            account.balance(),
            expected.balance(),
            "account {}",
            account.id
        );
    }
    let stored = node.lookup_transfers(ids_seen.to_vec()).unwrap();
    let mut by_id = BTreeMap::new();
    for s in &stored {
        by_id.insert(s.transfer.id, *s);
    }
    for id in ids_seen {
        let expected = reference.cached_transfer(*id);
        let got = by_id.get(id);
        assert_eq!(got.is_some(), expected.is_some(), "transfer {id} presence");
        if let (Some(got), Some(expected)) = (got, expected) {
            assert_eq!(got.status, expected.status, "transfer {id} status");
            assert_eq!(got.transfer.amount, expected.transfer.amount);
            assert_eq!(
                got.transfer.debit_account_id,
                expected.transfer.debit_account_id
            );
            assert_eq!(got.transfer.flags, expected.transfer.flags);
        }
    }
    // Index queries against a naive recomputation from the transfers themselves.
    for account_id in 1..=6u128 {
        let mut expected: Vec<_> = stored
            .iter()
            .filter(|s| {
                s.transfer.debit_account_id == account_id
                    || s.transfer.credit_account_id == account_id
            })
            .map(|s| (s.transfer.timestamp, s.transfer.id))
            .collect();
        expected.sort();
        let filter = AccountFilter {
            account_id,
            timestamp_min: 0,
            timestamp_max: 0,
            limit: 8190,
            debits: true,
            credits: true,
            reversed: false,
        };
        let got: Vec<_> = node
            .get_account_transfers(&filter)
            .unwrap()
            .iter()
            .map(|t| (t.timestamp, t.id))
            .collect();
        assert_eq!(got, expected, "transfers of account {account_id}");
        let reversed: Vec<_> = node
            .get_account_transfers(&AccountFilter {
                reversed: true,
                limit: 3,
                ..filter
            })
            .unwrap()
            .iter()
            .map(|t| (t.timestamp, t.id))
            .collect();
        let mut newest: Vec<_> = expected.iter().rev().take(3).copied().collect();
        newest.truncate(3);
        assert_eq!(reversed, newest, "newest transfers of account {account_id}");
        // Time ranges, both directions: every window of the expected list.
        if expected.len() >= 2 {
            let (low, high) = (
                expected[expected.len() / 3].0,
                expected[expected.len() * 2 / 3].0,
            );
            let window: Vec<_> = expected
                .iter()
                .filter(|(ts, _)| *ts >= low && *ts <= high)
                .copied()
                .collect();
            let ranged = AccountFilter {
                timestamp_min: low,
                timestamp_max: high,
                ..filter
            };
            let got: Vec<_> = node
                .get_account_transfers(&ranged)
                .unwrap()
                .iter()
                .map(|t| (t.timestamp, t.id))
                .collect();
            assert_eq!(got, window, "account {account_id} from {low} to {high}");
            let got: Vec<_> = node
                .get_account_transfers(&AccountFilter {
                    reversed: true,
                    ..ranged
                })
                .unwrap()
                .iter()
                .map(|t| (t.timestamp, t.id))
                .collect();
            let mut reversed_window = window.clone();
            reversed_window.reverse();
            assert_eq!(got, reversed_window, "account {account_id} newest first");
            let debits_only: Vec<_> = node
                .get_account_transfers(&AccountFilter {
                    credits: false,
                    ..filter
                })
                .unwrap()
                .iter()
                .map(|t| t.debit_account_id)
                .collect();
            assert!(debits_only.iter().all(|debit| *debit == account_id));
        }
        // Balance history: the last entry equals the current balance.
        let history = node.get_account_balances(&filter).unwrap();
        if let Some((_, last)) = history.last() {
            assert_eq!(*last, reference.account(account_id).unwrap().balance());
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn durable_node_matches_the_in_memory_ledger(ops in prop::collection::vec(op_strategy(), 1..25)) {
        let dir = tempfile::tempdir().unwrap();
        let mut node = Node::start(small_options(dir.path())).unwrap();
        let mut reference = Ledger::new(LedgerLimits::default());
        let mut results = Vec::new();
        node.create_accounts(accounts(6)).unwrap();
        reference.create_accounts(1, &accounts(6), &mut results).unwrap();
        // Fund the limited accounts so that some debits pass.
        let funding: Vec<Transfer> = [3u128, 6].iter().map(|id| Transfer {
            id: 1000 + id, debit_account_id: 1, credit_account_id: *id, amount: 700, ledger: 1, code: 1,
            ..Transfer::default()
        }).collect();
        node.create_transfers(funding.clone()).unwrap();
        reference.create_transfers(2, &funding, &mut Vec::new()).unwrap();
        let mut ids_seen: Vec<u128> = vec![1003, 1006];
        for op in ops {
            match op {
                Op::Transfers(transfers) => {
                    let got = node.create_transfers(transfers.clone()).unwrap();
                    let mut expected = Vec::new();
                    reference.create_transfers(3, &transfers, &mut expected).unwrap();
                    prop_assert_eq!(&got, &expected);
                    ids_seen.extend(transfers.iter().map(|t| t.id));
                    ids_seen.sort_unstable();
                    ids_seen.dedup();
                }
                Op::Restart => {
                    drop(node);
                    node = Node::start(small_options(dir.path())).unwrap();
                }
            }
            check_same_state(&node, &reference, &ids_seen);
        }
        // A retry of every transfer seen answers as the reference does (idempotency).
        drop(node);
        let node = Node::start(small_options(dir.path())).unwrap();
        check_same_state(&node, &reference, &ids_seen);
    }
}

#[test]
fn pending_transfers_expire_by_the_engine_clock_and_survive_restart() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(small_options(dir.path())).unwrap();
    node.create_accounts(accounts(2)).unwrap();
    let pending = Transfer {
        id: 1,
        debit_account_id: 1,
        credit_account_id: 2,
        amount: 50,
        ledger: 1,
        code: 1,
        timeout: 1,
        flags: TransferFlags::PENDING,
        ..Transfer::default()
    };
    let long = Transfer {
        id: 2,
        timeout: 3600,
        ..pending
    };
    assert_eq!(
        node.create_transfers(vec![pending, long]).unwrap(),
        vec![CreateTransferResult::Ok; 2]
    );
    assert_eq!(
        node.lookup_accounts(vec![1]).unwrap()[0].debits_pending,
        100
    );
    drop(node);
    // Restart: the pending transfers come back from the checkpoint/journal and still expire.
    let node = Node::start(small_options(dir.path())).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let stored = node.lookup_transfers(vec![1]).unwrap();
        if stored[0].status == PendingStatus::Expired {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "pending transfer never expired"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let account = node.lookup_accounts(vec![1]).unwrap()[0];
    assert_eq!(
        account.debits_pending, 50,
        "only the long reservation remains"
    );
    let post = Transfer {
        id: 3,
        pending_id: 1,
        flags: TransferFlags::POST_PENDING,
        ..Transfer::default()
    };
    assert_eq!(
        node.create_transfers(vec![post]).unwrap(),
        vec![CreateTransferResult::PendingTransferExpired]
    );
    let post_long = Transfer {
        id: 4,
        pending_id: 2,
        flags: TransferFlags::POST_PENDING,
        amount: 20,
        ..Transfer::default()
    };
    assert_eq!(
        node.create_transfers(vec![post_long]).unwrap(),
        vec![CreateTransferResult::Ok]
    );
    drop(node);
    let node = Node::start(small_options(dir.path())).unwrap();
    let account = node.lookup_accounts(vec![1]).unwrap()[0];
    assert_eq!((account.debits_pending, account.debits_posted), (0, 20));
    let expired = node.lookup_transfers(vec![1, 2]).unwrap();
    assert_eq!(expired[0].status, PendingStatus::Expired);
    assert_eq!(expired[1].status, PendingStatus::Posted);
}

#[test]
fn an_oversized_batch_is_refused_whole_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(small_options(dir.path())).unwrap();
    node.create_accounts(accounts(2)).unwrap();
    let transfers: Vec<Transfer> = (1..=8190u128)
        .map(|id| Transfer {
            id,
            debit_account_id: 1,
            credit_account_id: 2,
            amount: 1,
            ledger: 1,
            code: 1,
            ..Transfer::default()
        })
        .collect();
    let error = node.create_transfers(transfers).unwrap_err();
    assert!(error.to_string().contains("8190 events"), "{error}");
    assert_eq!(node.lookup_accounts(vec![1]).unwrap()[0].debits_posted, 0);
    assert!(node.lookup_transfers(vec![1]).unwrap().is_empty());
}

#[test]
fn records_are_written_with_their_transfers_atomically_and_survive_restarts() {
    use clearhouse_engine::RecordPut;
    let dir = tempfile::tempdir().unwrap();
    let put = |key: u128, value: &str, open: bool, when: Option<u32>| RecordPut {
        key,
        value: value.as_bytes().to_vec(),
        open,
        aliases: vec![key + 1000],
        when_transfer_ok: when,
        voucher: Some(value.as_bytes().to_vec()),
    };
    {
        let node = Node::start(small_options(dir.path())).unwrap();
        node.create_accounts(accounts(3)).unwrap();
        let ok = plain_transfer(1, 1, 2, 5);
        // Account 3 must not go below zero: this transfer fails, so its record is not written.
        let fails = Transfer {
            id: 2,
            debit_account_id: 3,
            credit_account_id: 2,
            ..ok
        };
        let outcome = node
            .submit(
                vec![ok, fails],
                vec![
                    put(10, "ten", true, Some(0)),
                    put(20, "twenty", true, Some(1)),
                    put(30, "thirty", false, None),
                ],
            )
            .unwrap();
        assert_eq!(
            outcome.results,
            vec![
                CreateTransferResult::Ok,
                CreateTransferResult::ExceedsCredits
            ]
        );
        assert_eq!(outcome.written, vec![true, false, true]);
        // Only written records append their vouchers, in order, chained.
        use clearhouse_engine::vouchers::{chain_hash, leaf_digest, GENESIS_HASH};
        let first = chain_hash(&GENESIS_HASH, 1, &leaf_digest(b"ten"));
        let second = chain_hash(&first, 2, &leaf_digest(b"thirty"));
        let stamps: Vec<Option<(u64, [u8; 32])>> = outcome
            .vouchers
            .iter()
            .map(|v| v.map(|v| (v.seq, v.hash)))
            .collect();
        assert_eq!(stamps, vec![Some((1, first)), None, Some((2, second))]);
        let stored = node.vouchers(1, 10).unwrap();
        assert_eq!(stored.len(), 2);
        assert_eq!((stored[1].seq, stored[1].hash), (2, second));
        assert_eq!(stored[1].body, b"thirty".to_vec());
        // An empty voucher body is refused with the whole batch.
        let mut empty = put(50, "x", true, None);
        empty.voucher = Some(vec![]);
        assert!(node.submit(vec![], vec![empty]).is_err());
        // A condition naming a transfer that is not in the batch is refused whole.
        assert!(node
            .submit(vec![], vec![put(40, "x", true, Some(0))])
            .is_err());
        assert_eq!(
            node.get_records(&[10, 20, 30, 40]).unwrap(),
            vec![Some(b"ten".to_vec()), None, Some(b"thirty".to_vec()), None]
        );
        assert_eq!(node.resolve_alias(1010).unwrap(), Some(10));
        assert_eq!(node.resolve_alias(1020).unwrap(), None);
        assert_eq!(node.open_records(10).unwrap(), vec![(10, b"ten".to_vec())]);
    }
    // Closing a record after a restart (replayed or checkpointed, either way).
    let node = Node::start(small_options(dir.path())).unwrap();
    assert_eq!(
        node.get_records(&[10]).unwrap(),
        vec![Some(b"ten".to_vec())]
    );
    let outcome = node
        .submit(vec![], vec![put(10, "ten-done", false, None)])
        .unwrap();
    // The chain continues across the restart.
    let stored = node.vouchers(2, 10).unwrap();
    assert_eq!(outcome.vouchers[0].unwrap().seq, 3);
    assert_eq!(
        stored[1].hash,
        clearhouse_engine::vouchers::chain_hash(
            &stored[0].hash,
            3,
            &clearhouse_engine::vouchers::leaf_digest(b"ten-done")
        )
    );
    drop(node);
    let node = Node::start(small_options(dir.path())).unwrap();
    assert_eq!(
        node.get_records(&[10]).unwrap(),
        vec![Some(b"ten-done".to_vec())]
    );
    assert!(node.open_records(10).unwrap().is_empty());
    assert_eq!(node.lookup_transfers(vec![1, 2]).unwrap().len(), 1);
}

#[test]
fn a_prune_removes_finished_history_keeps_the_chain_and_replays_the_same() {
    use clearhouse_engine::{Prune, RecordPut};
    let dir = tempfile::tempdir().unwrap();
    let options = || {
        let mut options = small_options(dir.path());
        // No checkpoint before the end: a restart without the index replays every record.
        options.checkpoint_every_records = 1_000_000;
        options.journal.segment_size = 64 * 1024 * 1024;
        options
    };
    let put = |key: u128, open: bool| RecordPut {
        key,
        value: format!("record {key}").into_bytes(),
        open,
        aliases: vec![key + 1000],
        when_transfer_ok: None,
        voucher: Some(format!("voucher {key}").into_bytes()),
    };
    let transfer = |id: u128, flags: TransferFlags| Transfer {
        id,
        debit_account_id: 1,
        credit_account_id: 2,
        amount: 5,
        ledger: 1,
        code: 1,
        flags,
        ..Transfer::default()
    };
    let node = Node::start(options()).unwrap();
    node.create_accounts(accounts(2)).unwrap();
    // Records 1..=20 with vouchers 1..=20, transfers 1..=20; transfer 21 stays pending.
    for key in 1..=20u128 {
        let outcome = node
            .submit(
                vec![transfer(key, TransferFlags::default())],
                vec![put(key, key == 5)],
            )
            .unwrap();
        assert_eq!(outcome.results, vec![CreateTransferResult::Ok]);
    }
    node.submit(vec![transfer(21, TransferFlags::PENDING)], vec![])
        .unwrap();
    let vouchers = node.vouchers(1, 100).unwrap();
    assert_eq!(vouchers.len(), 20);
    let anchor = (vouchers[9].seq, vouchers[9].hash);
    let prune = Prune {
        delete: (1..=9).collect(),
        replace: vec![(10, b"gone".to_vec())],
        aliases: (1001..=1010).collect(),
        transfers: (1..=10).collect(),
        vouchers_through: anchor.0,
        anchor_hash: anchor.1,
        events_before: 0,
    };
    // Refused with nothing changed: a wrong anchor hash, a pending transfer, a voucher past
    // the head.
    let mut wrong = prune.clone();
    wrong.anchor_hash = vouchers[8].hash;
    assert!(node.prune(wrong).is_err());
    let mut pending = prune.clone();
    pending.transfers.push(21);
    assert!(node.prune(pending).is_err());
    let mut past = prune.clone();
    past.vouchers_through = 99;
    assert!(node.prune(past).is_err());
    assert_eq!(node.vouchers(1, 100).unwrap().len(), 20);
    assert_eq!(node.lookup_transfers(vec![1]).unwrap().len(), 1);

    node.prune(prune).unwrap();
    let check = |node: &Node| {
        let records = node.get_records(&[1, 5, 9, 10, 11]).unwrap();
        assert_eq!(records[0], None);
        assert_eq!(
            records[1],
            Some(b"record 5".to_vec()),
            "an open record stays"
        );
        assert_eq!(records[2], None);
        assert_eq!(
            records[3],
            Some(b"gone".to_vec()),
            "replaced by its tombstone"
        );
        assert_eq!(records[4], Some(b"record 11".to_vec()));
        assert_eq!(node.resolve_alias(1001).unwrap(), None);
        assert_eq!(node.resolve_alias(1011).unwrap(), Some(11));
        assert_eq!(node.vouchers_anchor().unwrap(), anchor);
        let left = node.vouchers(0, 100).unwrap();
        assert_eq!(left.first().map(|v| v.seq), Some(11));
        assert_eq!(left.len(), 10);
        let found: Vec<u128> = node
            .lookup_transfers((1..=21).collect())
            .unwrap()
            .iter()
            .map(|s| s.transfer.id)
            .collect();
        assert_eq!(found, (11..=21).collect::<Vec<_>>());
    };
    check(&node);
    // Balances are untouched by retention.
    let before = node.lookup_accounts(vec![1, 2]).unwrap();
    drop(node);
    // Rebuilding the index from the journal (the prune replayed) gives the same state.
    std::fs::remove_file(dir.path().join("index.redb")).unwrap();
    let node = Node::start(options()).unwrap();
    assert!(node.recovery_report().records_replayed > 20);
    check(&node);
    assert_eq!(node.lookup_accounts(vec![1, 2]).unwrap(), before);
    // Prune every voucher: the chain continues from its anchor after a restart.
    let head = node.vouchers(0, 100).unwrap().last().cloned().unwrap();
    node.prune(Prune {
        vouchers_through: head.seq,
        anchor_hash: head.hash,
        ..Prune::default()
    })
    .unwrap();
    assert!(node.vouchers(0, 100).unwrap().is_empty());
    drop(node);
    let node = Node::start(options()).unwrap();
    let outcome = node.submit(vec![], vec![put(30, false)]).unwrap();
    let stamp = outcome.vouchers[0].unwrap();
    assert_eq!(stamp.seq, 21);
    assert_eq!(
        stamp.hash,
        clearhouse_engine::vouchers::chain_hash(
            &head.hash,
            21,
            &clearhouse_engine::vouchers::leaf_digest(b"voucher 30")
        )
    );
}

/// Account history off (the switch's setting): balances and lookups as with it, no account
/// events in the index, the two history queries refused, and it cannot be turned back on.
#[test]
fn without_account_history_the_index_keeps_no_account_events_and_it_stays_off() {
    let dir = tempfile::tempdir().unwrap();
    let mut options = small_options(dir.path());
    options.account_history = false;
    let transfers: Vec<Transfer> = (1..=40u128)
        .map(|id| Transfer {
            id,
            debit_account_id: 1 + id % 2,
            credit_account_id: 3,
            amount: id,
            ledger: 1,
            code: 1,
            ..Transfer::default()
        })
        .collect();
    {
        let node = Node::start(options.clone()).unwrap();
        node.create_accounts(accounts(3)).unwrap();
        for chunk in transfers.chunks(7) {
            node.create_transfers(chunk.to_vec()).unwrap();
        }
        let credited = node.lookup_accounts(vec![3]).unwrap()[0].credits_posted;
        assert_eq!(credited, (1..=40u128).sum::<u128>());
        assert_eq!(
            node.lookup_transfers(vec![17]).unwrap()[0].transfer.amount,
            17
        );
        let filter = all_of(3);
        let error = node.get_account_transfers(&filter).unwrap_err().to_string();
        assert!(error.contains("no account history"), "{error}");
        let error = node.get_account_balances(&filter).unwrap_err().to_string();
        assert!(error.contains("no account history"), "{error}");
    }
    let index = dir.path().join("index.redb");
    let report = clearhouse_engine::index::storage_report(&index).unwrap();
    let events = report.iter().find(|t| t.table == "account_events").unwrap();
    assert_eq!(events.entries, 0, "no account events written");
    let transfers_table = report.iter().find(|t| t.table == "transfers").unwrap();
    assert_eq!(transfers_table.entries, 40);
    // Back on would leave a hole in the history: refused, by name.
    let error = Node::start(small_options(dir.path()))
        .err()
        .expect("refused")
        .to_string();
    assert!(error.contains("cannot be turned back on"), "{error}");
    // Off again: the node starts and has everything.
    let node = Node::start(options).unwrap();
    assert_eq!(node.lookup_transfers(vec![40]).unwrap().len(), 1);
}

/// An index kept with account history can be turned off (the history so far stays, the queries
/// are refused from then on).
#[test]
fn account_history_can_be_turned_off_for_an_existing_index() {
    let dir = tempfile::tempdir().unwrap();
    {
        let node = Node::start(small_options(dir.path())).unwrap();
        node.create_accounts(accounts(2)).unwrap();
        node.create_transfers(vec![plain_transfer(9, 1, 2, 5)])
            .unwrap();
    }
    let mut off = small_options(dir.path());
    off.account_history = false;
    let node = Node::start(off).unwrap();
    assert_eq!(node.lookup_accounts(vec![2]).unwrap()[0].credits_posted, 5);
}
