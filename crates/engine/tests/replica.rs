//! The engine's replication roles, with an in-memory log in place of the stream: a follower fed
//! the leader's groups ends in the same state (accounts, transfers, expiries, records, voucher
//! chain) and survives a restart; a flipped byte stops it; a leader whose log fails answers
//! nothing, and the unreplicated tail is cut at the next start; a leader whose log is
//! unavailable refuses writes before executing them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clearhouse_engine::replica::{
    GroupLog, ReplicaTicket, ReplicatedGroup, Replication, TailCheck, TailCheckHandle,
};
use clearhouse_engine::{EngineError, Node, NodeOptions, RecordPut};
use clearhouse_journal::Record;
use clearhouse_ledger::{Account, AccountFlags, PendingStatus, Transfer, TransferFlags};

#[derive(Default)]
struct MemoryLog {
    groups: Mutex<Vec<ReplicatedGroup>>,
    fail: AtomicBool,
    unavailable: AtomicBool,
}

impl GroupLog for MemoryLog {
    fn submit(&self, group: ReplicatedGroup) -> ReplicaTicket {
        let (sender, ticket) = ReplicaTicket::new();
        if self.fail.load(Ordering::SeqCst) {
            sender.resolve(Err("the log refused the group".into()));
        } else {
            let mut groups = self.groups.lock().unwrap();
            groups.push(group);
            sender.resolve(Ok(groups.len() as u64));
        }
        ticket
    }
    fn available(&self) -> bool {
        !self.unavailable.load(Ordering::SeqCst)
    }
}

fn options(dir: &std::path::Path, replication: Replication) -> NodeOptions {
    let mut options = NodeOptions::new(dir);
    options.journal.segment_size = clearhouse_journal::SEGMENT_SIZE_MIN;
    options.checkpoint_every_records = 3;
    options.group_requests_max = 4;
    options.disk_free_min_bytes = 16 * 1024 * 1024;
    options.pulse_interval = Duration::from_millis(20);
    options.replication = replication;
    options
}

fn accounts(count: u128) -> Vec<Account> {
    (1..=count)
        .map(|id| Account {
            id,
            ledger: 1,
            code: 1,
            flags: AccountFlags::HISTORY,
            ..Account::default()
        })
        .collect()
}

fn transfer(id: u128, debit: u128, credit: u128, amount: u128) -> Transfer {
    Transfer {
        id,
        debit_account_id: debit,
        credit_account_id: credit,
        amount,
        ledger: 1,
        code: 1,
        ..Transfer::default()
    }
}

/// A leader's history: accounts, transfers, pending ones posted, voided and expired (by pulses),
/// and submits with records and vouchers.
fn leader_history(node: &Node) {
    node.create_accounts(accounts(6)).unwrap();
    for n in 0..30u128 {
        let mut t = transfer(100 + n, 1 + n % 6, 1 + (n + 1) % 6, 10 + n);
        if n % 3 == 0 {
            t.flags = TransferFlags::PENDING;
            t.timeout = if n % 2 == 0 { 1 } else { 3600 };
        }
        node.create_transfers(vec![t]).unwrap();
    }
    let post = Transfer {
        id: 200,
        pending_id: 103,
        flags: TransferFlags::POST_PENDING,
        ..Transfer::default()
    };
    let void = Transfer {
        id: 201,
        pending_id: 109,
        flags: TransferFlags::VOID_PENDING,
        ..Transfer::default()
    };
    node.create_transfers(vec![post, void]).unwrap();
    for n in 0..5u128 {
        let outcome = node
            .submit(
                vec![transfer(300 + n, 2, 3, 5)],
                vec![RecordPut {
                    key: 900 + n,
                    value: vec![n as u8; 40],
                    open: n % 2 == 0,
                    aliases: vec![9_000 + n],
                    when_transfer_ok: Some(0),
                    voucher: Some(vec![7; 20 + n as usize]),
                }],
            )
            .unwrap();
        assert!(outcome.written[0]);
    }
    // Let every 1 s pending transfer expire through journaled pulses (all of them: a pulse may
    // expire some and a later one the rest, and the follower gets only the groups written so far).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let short: Vec<u128> = (0..30u128)
        .filter(|n| n % 3 == 0 && n % 2 == 0)
        .map(|n| 100 + n)
        .collect();
    while node
        .lookup_transfers(short.clone())
        .unwrap()
        .iter()
        .any(|t| t.status != PendingStatus::Expired)
    {
        assert!(std::time::Instant::now() < deadline, "never expired");
        std::thread::sleep(Duration::from_millis(50));
    }
    node.create_transfers(vec![transfer(400, 4, 5, 1)]).unwrap();
}

fn same_state(a: &Node, b: &Node) {
    let ids: Vec<u128> = (1..=6).collect();
    assert_eq!(
        a.lookup_accounts(ids.clone()).unwrap(),
        b.lookup_accounts(ids).unwrap()
    );
    let transfers: Vec<u128> = (100..130)
        .chain(200..202)
        .chain(300..305)
        .chain(400..401)
        .collect();
    assert_eq!(
        a.lookup_transfers(transfers.clone()).unwrap(),
        b.lookup_transfers(transfers).unwrap()
    );
    let keys: Vec<u128> = (900..905).collect();
    assert_eq!(a.get_records(&keys).unwrap(), b.get_records(&keys).unwrap());
    let (sa, sb) = (a.stats().unwrap(), b.stats().unwrap());
    assert_eq!(
        (sa.committed_seq, sa.chain_seq, sa.chain_hash),
        (sb.committed_seq, sb.chain_seq, sb.chain_hash)
    );
    assert_eq!(a.vouchers(1, 100).unwrap().len(), 5);
    assert_eq!(
        a.vouchers(1, 100)
            .unwrap()
            .iter()
            .map(|v| v.hash)
            .collect::<Vec<_>>(),
        b.vouchers(1, 100)
            .unwrap()
            .iter()
            .map(|v| v.hash)
            .collect::<Vec<_>>()
    );
}

#[test]
fn a_follower_fed_the_leaders_groups_ends_in_the_same_state_and_survives_a_restart() {
    let (leader_dir, follower_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let log = Arc::new(MemoryLog::default());
    let leader = Node::start(options(leader_dir.path(), Replication::Leader(log.clone()))).unwrap();
    leader_history(&leader);
    let follower = Node::start(options(follower_dir.path(), Replication::Follower)).unwrap();
    let groups = log.groups.lock().unwrap().clone();
    assert!(groups.len() > 10, "{} groups", groups.len());
    // Half the groups one by one, the rest merged (the follower batches ready messages).
    let (first, rest) = groups.split_at(groups.len() / 2);
    for group in first {
        follower
            .apply(
                group.records.clone(),
                Some((group.chain_seq, group.chain_hash)),
            )
            .unwrap();
    }
    let merged: Vec<Record> = rest.iter().flat_map(|g| g.records.clone()).collect();
    let last = rest.last().unwrap();
    follower
        .apply(merged, Some((last.chain_seq, last.chain_hash)))
        .unwrap();
    same_state(&leader, &follower);
    // A follower writes nothing of its own and expires nothing on its clock.
    assert!(matches!(
        follower.create_transfers(vec![transfer(500, 1, 2, 1)]),
        Err(EngineError::NotLeader)
    ));
    // Records it already has are skipped (a restart in the middle of a message).
    follower.apply(groups[0].records.clone(), None).unwrap();
    drop(follower);
    let follower = Node::start(options(follower_dir.path(), Replication::Follower)).unwrap();
    same_state(&leader, &follower);
}

#[test]
fn a_flipped_byte_or_a_wrong_chain_stops_the_follower() {
    let (leader_dir, follower_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let log = Arc::new(MemoryLog::default());
    let leader = Node::start(options(leader_dir.path(), Replication::Leader(log.clone()))).unwrap();
    leader_history(&leader);
    let groups = log.groups.lock().unwrap().clone();
    let follower = Node::start(options(follower_dir.path(), Replication::Follower)).unwrap();
    follower.apply(groups[0].records.clone(), None).unwrap();
    // The next group with its sealed results altered: replay refuses it.
    let mut tampered = groups[1].records.clone();
    let last = tampered[0].payload.len() - 1;
    tampered[0].payload[last] ^= 0x40;
    let error = follower.apply(tampered, None).unwrap_err().to_string();
    assert!(error.contains("diverges"), "{error}");
    assert!(follower.stop_reason().is_some());
    // A wrong chain head stops a fresh follower too.
    let other_dir = tempfile::tempdir().unwrap();
    let other = Node::start(options(other_dir.path(), Replication::Follower)).unwrap();
    let error = other
        .apply(
            groups[0].records.clone(),
            Some((groups[0].chain_seq, [9; 32])),
        )
        .unwrap_err()
        .to_string();
    assert!(error.contains("voucher chain"), "{error}");
}

/// A log that stored the journal through this sequence: later local records are cut.
struct StoredThrough(u64);
impl TailCheck for StoredThrough {
    fn keep_through(&self, checkpoint_seq: u64, _tail: &[Record]) -> Result<u64, String> {
        Ok(self.0.max(checkpoint_seq))
    }
}

#[test]
fn a_failed_ticket_answers_nothing_and_the_unreplicated_tail_is_cut_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(MemoryLog::default());
    let leader = Node::start(options(dir.path(), Replication::Leader(log.clone()))).unwrap();
    leader.create_accounts(accounts(2)).unwrap();
    let replicated_seq = leader.committed_seq();
    log.fail.store(true, Ordering::SeqCst);
    let error = leader
        .create_transfers(vec![transfer(1, 1, 2, 5)])
        .unwrap_err();
    assert!(error.to_string().contains("replication failed"), "{error}");
    assert_eq!(
        leader.committed_seq(),
        replicated_seq,
        "nothing more committed"
    );
    drop(leader);
    // The record is in the local journal (written before the log failed); at start the check
    // against the log cuts it.
    let mut restart = options(dir.path(), Replication::Follower);
    restart.tail_check = Some(TailCheckHandle(Arc::new(StoredThrough(replicated_seq))));
    let node = Node::start(restart).unwrap();
    assert!(node.recovery_report().unreplicated_records_cut >= 1);
    assert!(
        node.lookup_transfers(vec![1]).unwrap().is_empty(),
        "the unacknowledged transfer is gone"
    );
    assert_eq!(
        node.lookup_accounts(vec![1, 2]).unwrap().len(),
        2,
        "the replicated accounts stay"
    );
}

#[test]
fn an_unavailable_log_refuses_writes_before_anything_changes() {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(MemoryLog::default());
    let leader = Node::start(options(dir.path(), Replication::Leader(log.clone()))).unwrap();
    leader.create_accounts(accounts(2)).unwrap();
    let before = (leader.committed_seq(), log.groups.lock().unwrap().len());
    log.unavailable.store(true, Ordering::SeqCst);
    assert!(matches!(
        leader.create_transfers(vec![transfer(1, 1, 2, 5)]),
        Err(EngineError::ReplicationUnavailable)
    ));
    assert_eq!(
        (leader.committed_seq(), log.groups.lock().unwrap().len()),
        before
    );
    assert_eq!(leader.lookup_accounts(vec![1]).unwrap()[0].debits_posted, 0);
    log.unavailable.store(false, Ordering::SeqCst);
    leader.create_transfers(vec![transfer(1, 1, 2, 5)]).unwrap();
    assert_eq!(leader.lookup_accounts(vec![1]).unwrap()[0].debits_posted, 5);
}
