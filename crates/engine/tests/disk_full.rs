//! A full disk rejects new work with a clear error and corrupts nothing: the data directory sits
//! on a small tmpfs made by the test; once space returns, service resumes and every acknowledged
//! transfer is there. Needs root (mount); under CI (CI=true) it must run, elsewhere it says why
//! it did not.

use std::path::Path;
use std::process::Command;

use clearhouse_engine::{Node, NodeOptions};
use clearhouse_ledger::{Account, CreateTransferResult, Transfer};

struct Mount(std::path::PathBuf);
impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn mount_tmpfs(path: &Path, size: &str) -> bool {
    Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(path)
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn options(dir: &Path) -> NodeOptions {
    let mut options = NodeOptions::new(dir);
    options.journal.segment_size = clearhouse_journal::SEGMENT_SIZE_MIN;
    options.checkpoint_every_records = 4;
    options.disk_free_min_bytes = 8 * 1024 * 1024;
    // Small index transactions, so that the space kept free covers the largest one.
    options.unindexed_transfers_max = 1_000;
    options
}

#[test]
fn full_disk_refuses_work_clearly_and_loses_nothing() {
    let base = tempfile::tempdir().unwrap();
    if !mount_tmpfs(base.path(), "48m") {
        assert!(
            std::env::var("CI").is_err(),
            "CI must run the full-disk test: mounting a tmpfs failed (run as root)"
        );
        eprintln!("SKIPPED full-disk test: cannot mount a tmpfs here (needs root)");
        return;
    }
    let _mount = Mount(base.path().to_path_buf());
    let dir = base.path().join("data");
    let node = Node::start(options(&dir)).expect("start on the small filesystem");
    let accounts: Vec<Account> = (1..=20u128)
        .map(|id| Account {
            id,
            ledger: 1,
            code: 1,
            ..Account::default()
        })
        .collect();
    node.create_accounts(accounts).unwrap();
    let mut acknowledged: Vec<Transfer> = Vec::new();
    let mut next_id = 1u128;
    let mut error = None;
    for _ in 0..10_000 {
        let batch: Vec<Transfer> = (next_id..next_id + 500)
            .map(|id| Transfer {
                id,
                debit_account_id: 1 + id % 20,
                credit_account_id: 1 + (id + 1) % 20,
                amount: id,
                ledger: 1,
                code: 1,
                ..Transfer::default()
            })
            .collect();
        next_id += 500;
        match node.create_transfers(batch.clone()) {
            Ok(results) => {
                assert!(results.iter().all(|r| *r == CreateTransferResult::Ok));
                acknowledged.extend(batch);
            }
            Err(e) => {
                error = Some(e.to_string());
                break;
            }
        }
    }
    let error = error.expect("a 48 MiB filesystem must fill up");
    eprintln!("refused with: {error}");
    assert!(
        error.contains("disk full") || error.contains("No space left"),
        "the error must say the disk is full: {error}"
    );
    assert!(!acknowledged.is_empty());
    // Still refusing, still no panic.
    let again = node.create_transfers(vec![Transfer {
        id: next_id,
        debit_account_id: 1,
        credit_account_id: 2,
        amount: 1,
        ledger: 1,
        code: 1,
        ..Transfer::default()
    }]);
    assert!(again.is_err(), "no space yet: {again:?}");

    // Space returns: the same node serves again, without a restart.
    let remounted = Command::new("mount")
        .args(["-o", "remount,size=256m"])
        .arg(base.path())
        .status()
        .unwrap();
    assert!(remounted.success());
    let results = node
        .create_transfers(vec![Transfer {
            id: next_id + 2,
            debit_account_id: 3,
            credit_account_id: 4,
            amount: 1,
            ledger: 1,
            code: 1,
            ..Transfer::default()
        }])
        .expect("service resumes when space returns");
    assert_eq!(results, vec![CreateTransferResult::Ok]);
    drop(node);
    let node = Node::start(options(&dir)).expect("restart after space returned");
    let ids: Vec<u128> = acknowledged.iter().map(|t| t.id).collect();
    let found = node.lookup_transfers(ids.clone()).unwrap();
    assert_eq!(
        found.len(),
        ids.len(),
        "every acknowledged transfer is there"
    );
    for (stored, sent) in found.iter().zip(&acknowledged) {
        assert_eq!(stored.transfer.id, sent.id);
        assert_eq!(stored.transfer.amount, sent.amount);
    }
    let balances = node.lookup_accounts((1..=20).collect()).unwrap();
    let debits: u128 = balances.iter().map(|a| a.debits_posted).sum();
    let credits: u128 = balances.iter().map(|a| a.credits_posted).sum();
    let sent: u128 = acknowledged.iter().map(|t| t.amount).sum();
    assert_eq!(debits, credits, "books balance");
    assert_eq!(
        debits,
        sent + 1,
        "exactly the acknowledged amounts: the refused batch left no trace"
    );
    // New work is accepted again.
    let results = node
        .create_transfers(vec![Transfer {
            id: next_id + 1,
            debit_account_id: 1,
            credit_account_id: 2,
            amount: 1,
            ledger: 1,
            code: 1,
            ..Transfer::default()
        }])
        .unwrap();
    assert_eq!(results, vec![CreateTransferResult::Ok]);
}

fn transfer(id: u128) -> Transfer {
    Transfer {
        id,
        debit_account_id: 1 + id % 10,
        credit_account_id: 1 + (id + 1) % 10,
        amount: id,
        ledger: 1,
        code: 1,
        ..Transfer::default()
    }
}

fn remount(path: &Path, mode: &str) {
    let status = Command::new("mount")
        .args(["-o", &format!("remount,{mode}")])
        .arg(path)
        .status()
        .unwrap();
    assert!(status.success(), "remount {mode}");
}

/// A read-only data directory (mounted read-only, e.g. by the kernel after an I/O error): the
/// node does not start and says why, without changing a byte; once it is writable again the node
/// starts with everything acknowledged and serves. (Linux refuses to remount a filesystem
/// read-only while the node holds its journal open for writing, so a running node cannot be put in
/// that state here; its engine checks the read-only flag with the free space before every group.)
#[test]
fn read_only_data_directory_refuses_work_clearly_and_loses_nothing() {
    let base = tempfile::tempdir().unwrap();
    if !mount_tmpfs(base.path(), "64m") {
        assert!(
            std::env::var("CI").is_err(),
            "CI must run the read-only test: mounting a tmpfs failed (run as root)"
        );
        eprintln!("SKIPPED read-only test: cannot mount a tmpfs here (needs root)");
        return;
    }
    let _mount = Mount(base.path().to_path_buf());
    let dir = base.path().join("data");
    let node = Node::start(options(&dir)).expect("start");
    let accounts: Vec<Account> = (1..=10u128)
        .map(|id| Account {
            id,
            ledger: 1,
            code: 1,
            ..Account::default()
        })
        .collect();
    node.create_accounts(accounts).unwrap();
    let acknowledged: Vec<Transfer> = (1..=200).map(transfer).collect();
    for chunk in acknowledged.chunks(50) {
        let results = node.create_transfers(chunk.to_vec()).unwrap();
        assert!(results.iter().all(|r| *r == CreateTransferResult::Ok));
    }
    drop(node);
    let before = snapshot(&dir);

    remount(base.path(), "ro");
    for _ in 0..2 {
        let error = Node::start(options(&dir))
            .err()
            .expect("no start on a read-only directory");
        eprintln!("start refused with: {error}");
        assert!(
            error.to_string().to_lowercase().contains("read-only"),
            "the error must say the directory is read-only: {error}"
        );
    }
    remount(base.path(), "rw");
    assert_eq!(snapshot(&dir), before, "a refused start changed nothing");

    // Writable again: everything acknowledged is there and new work is accepted.
    let node = Node::start(options(&dir)).expect("restart");
    let ids: Vec<u128> = acknowledged.iter().map(|t| t.id).collect();
    assert_eq!(node.lookup_transfers(ids.clone()).unwrap().len(), ids.len());
    let results = node.create_transfers(vec![transfer(1_001)]).unwrap();
    assert_eq!(results, vec![CreateTransferResult::Ok]);
    let balances = node.lookup_accounts((1..=10).collect()).unwrap();
    let debits: u128 = balances.iter().map(|a| a.debits_posted).sum();
    let credits: u128 = balances.iter().map(|a| a.credits_posted).sum();
    let sent: u128 = acknowledged.iter().map(|t| t.amount).sum::<u128>() + 1_001;
    assert_eq!((debits, credits), (sent, sent));
}

/// Every file under `dir` with its contents.
fn snapshot(dir: &Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(path) = stack.pop() {
        for entry in std::fs::read_dir(&path).unwrap() {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_dir() {
                stack.push(entry.path());
            } else {
                out.push((entry.path(), std::fs::read(entry.path()).unwrap()));
            }
        }
    }
    out.sort();
    out
}
