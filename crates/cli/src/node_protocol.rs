//! `clearhouse node`: the durable ledger node behind a line protocol on stdin/stdout.
//!
//! Requests, one per line (ids and amounts in decimal):
//!   accounts FIRST_ID COUNT            create COUNT accounts (ledger 1, code 1) from FIRST_ID
//!   transfers ID:DEBIT:CREDIT:AMOUNT,...  create single-phase transfers on ledger 1, code 1
//!   lookup ID,...                      transfers that exist, as ID:DEBIT:CREDIT:AMOUNT,...
//!   balances ID,...                    accounts as ID:DEBITS_PENDING:DEBITS_POSTED:CREDITS_PENDING:CREDITS_POSTED,...
//!   quit
//! Answers, one line each: `results CODE,...` (numeric result codes), `transfers ...`,
//! `balances ...`, or `error MESSAGE`. A write is answered only once it is durable.

use std::io::{BufRead, Read, Write};
use std::path::PathBuf;

use anyhow::Context;
use clearhouse_engine::{Node, NodeOptions};
use clearhouse_ledger::{Account, Transfer};

const LINE_BYTES_MAX: usize = 4 * 1024 * 1024;

pub fn run(
    data_dir: PathBuf,
    segment_size: u64,
    checkpoint_every_records: u64,
    unindexed_transfers_max: u64,
) -> anyhow::Result<()> {
    let mut options = NodeOptions::new(&data_dir);
    options.journal.segment_size = segment_size;
    options.checkpoint_every_records = checkpoint_every_records;
    options.unindexed_transfers_max = unindexed_transfers_max;
    let node =
        Node::start(options).with_context(|| format!("starting node on {}", data_dir.display()))?;
    let recovery = node.recovery_report();
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    writeln!(
        out,
        "ready checkpoint_seq={} replayed={} torn_tail_bytes_cut={}",
        recovery.checkpoint_seq, recovery.records_replayed, recovery.torn_tail_bytes_cut
    )?;
    out.flush()?;
    let stdin = std::io::stdin();
    let mut line = String::new();
    let mut input = stdin.lock();
    loop {
        line.clear();
        let read = (&mut input)
            .take(LINE_BYTES_MAX as u64)
            .read_line(&mut line)?;
        if read == 0 || line.trim() == "quit" {
            break;
        }
        let answer = match handle(&node, line.trim()) {
            Ok(answer) => answer,
            Err(error) => format!("error {error:#}"),
        };
        writeln!(out, "{answer}")?;
        out.flush()?;
    }
    Ok(())
}

fn parse_ids(text: &str) -> anyhow::Result<Vec<u128>> {
    text.split(',')
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<u128>().with_context(|| format!("bad id {s:?}")))
        .collect()
}

fn results_line(codes: impl Iterator<Item = u32>) -> String {
    let codes: Vec<String> = codes.map(|code| code.to_string()).collect();
    format!("results {}", codes.join(","))
}

fn handle(node: &Node, line: &str) -> anyhow::Result<String> {
    let (command, rest) = line.split_once(' ').unwrap_or((line, ""));
    match command {
        "accounts" => {
            let mut parts = rest.split_whitespace();
            let first: u128 = parts.next().context("missing FIRST_ID")?.parse()?;
            let count: u128 = parts.next().context("missing COUNT")?.parse()?;
            let accounts = (first..first + count)
                .map(|id| Account {
                    id,
                    ledger: 1,
                    code: 1,
                    ..Account::default()
                })
                .collect();
            let results = node.create_accounts(accounts)?;
            Ok(results_line(results.iter().map(|r| r.as_u32())))
        }
        "transfers" => {
            let transfers = rest
                .split(',')
                .filter(|s| !s.is_empty())
                .map(|item| {
                    let fields: Vec<u128> = item
                        .split(':')
                        .map(|f| f.parse::<u128>())
                        .collect::<Result<_, _>>()
                        .with_context(|| format!("bad transfer {item:?}"))?;
                    anyhow::ensure!(fields.len() == 4, "a transfer is ID:DEBIT:CREDIT:AMOUNT");
                    Ok(Transfer {
                        id: fields[0],
                        debit_account_id: fields[1],
                        credit_account_id: fields[2],
                        amount: fields[3],
                        ledger: 1,
                        code: 1,
                        ..Transfer::default()
                    })
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let results = node.create_transfers(transfers)?;
            Ok(results_line(results.iter().map(|r| r.as_u32())))
        }
        "lookup" => {
            let found = node.lookup_transfers(parse_ids(rest)?)?;
            Ok(format!(
                "transfers {}",
                found
                    .iter()
                    .map(|s| {
                        let t = &s.transfer;
                        format!(
                            "{}:{}:{}:{}",
                            t.id, t.debit_account_id, t.credit_account_id, t.amount
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(",")
            ))
        }
        "balances" => {
            let accounts = node.lookup_accounts(parse_ids(rest)?)?;
            Ok(format!(
                "balances {}",
                accounts
                    .iter()
                    .map(|a| format!(
                        "{}:{}:{}:{}:{}",
                        a.id,
                        a.debits_pending,
                        a.debits_posted,
                        a.credits_pending,
                        a.credits_posted
                    ))
                    .collect::<Vec<_>>()
                    .join(",")
            ))
        }
        other => anyhow::bail!("unknown command {other:?}"),
    }
}
