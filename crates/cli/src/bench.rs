//! Benchmarks: commands that print figures. Nothing here asserts a timing.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clearhouse_engine::{Node, NodeOptions};
use clearhouse_ledger::{
    AccountFilter, CreateAccountResult, CreateTransferResult, Ledger, LedgerLimits,
    BATCH_EVENTS_MAX,
};
use serde_json::json;

use crate::common::{data_dir, machine, percentile_ms};
use crate::workload::{l1_accounts, l1_transfer, L1Shape, Rng};

#[derive(clap::Args, Clone)]
pub struct LedgerArgs {
    #[arg(long, default_value_t = 10_000)]
    account_count: u64,
    /// Debit accounts drawn from the first H accounts with probability --transfer-hot-percent.
    #[arg(long, default_value_t = 0)]
    account_count_hot: u64,
    #[arg(long, default_value_t = 0)]
    transfer_hot_percent: u64,
    /// Share of transfers created pending (timeout 1 s, left to expire).
    #[arg(long, default_value_t = 0)]
    transfer_pending_percent: u64,
    #[arg(long, default_value_t = 10_000_000)]
    transfer_count: u64,
    #[arg(long, default_value_t = BATCH_EVENTS_MAX as u64)]
    transfer_batch_size: u64,
    /// Requests in flight (one thread each).
    #[arg(long, default_value_t = 1)]
    clients: u64,
    #[arg(long, default_value_t = 100)]
    query_count: u64,
    #[arg(long, default_value_t = 8_190)]
    query_limit: u32,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Data directory (default: a fresh temporary directory, removed afterwards).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Replicated (R3): every journal group also published to a JetStream stream on 3 loopback
    /// nats-servers, answered only once the stream stored it.
    #[arg(long)]
    replicated: bool,
}

#[derive(clap::Args, Clone)]
pub struct CoreArgs {
    #[arg(long, default_value_t = 10_000)]
    account_count: u64,
    #[arg(long, default_value_t = 10_000_000)]
    transfer_count: u64,
    #[arg(long, default_value_t = BATCH_EVENTS_MAX as u64)]
    transfer_batch_size: u64,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Clone)]
pub struct RecoveryArgs {
    #[arg(long, default_value_t = 10_000)]
    account_count: u64,
    #[arg(long, default_value_t = 10_000_000)]
    transfer_count: u64,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    #[arg(long)]
    data_dir: Option<PathBuf>,
    #[arg(long)]
    json: bool,
    /// Internal: load, then abort without a clean stop (the parent process times the restart).
    #[arg(long, hide = true)]
    crash_after_load: bool,
}

fn percentiles(mut samples: Vec<Duration>) -> serde_json::Value {
    samples.sort_unstable();
    json!({
        "p1": percentile_ms(&samples, 1),
        "p50": percentile_ms(&samples, 50),
        "p99": percentile_ms(&samples, 99),
        "p100": percentile_ms(&samples, 100),
    })
}

fn proc_field(file: &str, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(file).ok()?;
    let line = text.lines().find(|line| line.starts_with(key))?;
    line[key.len()..].split_whitespace().next()?.parse().ok()
}

fn peak_rss_bytes() -> u64 {
    proc_field("/proc/self/status", "VmHWM:").unwrap_or(0) * 1024
}

/// Bytes this process caused to be written to storage (all files: journal and index).
fn storage_bytes_written() -> u64 {
    proc_field("/proc/self/io", "write_bytes:").unwrap_or(0)
}

pub fn ledger(args: LedgerArgs) -> anyhow::Result<()> {
    if args.account_count < 2 || args.transfer_batch_size == 0 || args.clients == 0 {
        bail!("--account-count must be at least 2, --transfer-batch-size and --clients at least 1");
    }
    if args.transfer_batch_size > BATCH_EVENTS_MAX as u64 {
        bail!("--transfer-batch-size is at most {BATCH_EVENTS_MAX}");
    }
    let (dir, _temp) = data_dir(&args.data_dir)?;
    let mut options = NodeOptions::new(&dir);
    let _replication = if args.replicated {
        let (cluster, runtime, publisher) = crate::ha_demo::bench_publisher(&dir)?;
        options.replication = clearhouse_engine::replica::Replication::Leader(publisher);
        Some((cluster, runtime))
    } else {
        None
    };
    let node = Node::start(options)?;
    let written_before = storage_bytes_written();

    for chunk in l1_accounts(args.account_count).chunks(BATCH_EVENTS_MAX) {
        let results = node.create_accounts(chunk.to_vec())?;
        if let Some(bad) = results.iter().find(|r| **r != CreateAccountResult::Ok) {
            bail!("creating accounts failed: {bad}");
        }
    }
    let shape = L1Shape {
        account_count: args.account_count,
        account_count_hot: args.account_count_hot,
        transfer_hot_percent: args.transfer_hot_percent,
        transfer_pending_percent: args.transfer_pending_percent,
    };
    let batches = args.transfer_count.div_ceil(args.transfer_batch_size);
    if !args.json {
        eprintln!(
            "bench ledger: {} transfers in {} requests of up to {}, {} accounts, {} client(s), seed {}, data in {}",
            args.transfer_count, batches, args.transfer_batch_size, args.account_count, args.clients, args.seed,
            dir.display()
        );
    }
    let started = Instant::now();
    let latencies: Vec<Duration> = std::thread::scope(|scope| -> anyhow::Result<Vec<Duration>> {
        let mut handles = Vec::new();
        for client in 0..args.clients {
            let node = node.clone();
            let args = args.clone();
            handles.push(scope.spawn(move || -> anyhow::Result<Vec<Duration>> {
                let mut rng = Rng::new(args.seed.wrapping_add(client));
                let mut latencies = Vec::new();
                let mut last_report = Instant::now();
                for batch in (client..batches).step_by(args.clients as usize) {
                    let first = batch * args.transfer_batch_size + 1;
                    let last = (first + args.transfer_batch_size - 1).min(args.transfer_count);
                    let transfers: Vec<_> = (first..=last)
                        .map(|id| l1_transfer(&mut rng, &shape, id as u128))
                        .collect();
                    let sent = Instant::now();
                    let results = loop {
                        match node.create_transfers(transfers.clone()) {
                            Err(clearhouse_engine::EngineError::Overloaded { .. }) => {
                                std::thread::sleep(Duration::from_millis(1))
                            }
                            other => break other?,
                        }
                    };
                    latencies.push(sent.elapsed());
                    if let Some(bad) = results.iter().find(|r| **r != CreateTransferResult::Ok) {
                        bail!("transfer batch {batch} failed: {bad}");
                    }
                    if client == 0 && !args.json && last_report.elapsed() > Duration::from_secs(2) {
                        last_report = Instant::now();
                        eprintln!(
                            "  ... {last} transfers ({:.0}/s)",
                            last as f64 / started.elapsed().as_secs_f64()
                        );
                    }
                }
                Ok(latencies)
            }));
        }
        let mut all = Vec::new();
        for handle in handles {
            all.extend(handle.join().expect("client thread")?);
        }
        Ok(all)
    })?;
    let transfer_seconds = started.elapsed().as_secs_f64();
    let transfers_per_second = (args.transfer_count as f64 / transfer_seconds).round();

    // Query phase: all transfers of a random account, debits and credits, from the on-disk index.
    let mut rng = Rng::new(args.seed ^ 0x5eed);
    let mut query_latencies = Vec::new();
    let mut results_total = 0usize;
    let index_catch_up = Instant::now();
    node.get_account_transfers(&AccountFilter {
        account_id: 1,
        timestamp_min: 0,
        timestamp_max: 0,
        limit: 1,
        debits: true,
        credits: true,
        reversed: false,
    })?;
    let index_catch_up = index_catch_up.elapsed();
    for _ in 0..args.query_count {
        let filter = AccountFilter {
            account_id: 1 + rng.below(args.account_count) as u128,
            timestamp_min: 0,
            timestamp_max: 0,
            limit: args.query_limit,
            debits: true,
            credits: true,
            reversed: false,
        };
        let sent = Instant::now();
        let transfers = node.get_account_transfers(&filter)?;
        query_latencies.push(sent.elapsed());
        results_total += transfers.len();
    }
    let stats = node.stats()?;
    drop(node);
    let bytes_written = storage_bytes_written().saturating_sub(written_before);
    let index_bytes = std::fs::metadata(dir.join("index.redb"))
        .map(|m| m.len())
        .unwrap_or(0);
    let report = json!({
        "workload": "L1",
        "machine": machine(),
        "seed": args.seed,
        "accounts": args.account_count,
        "transfers": args.transfer_count,
        "transfer_batch_size": args.transfer_batch_size,
        "clients": args.clients,
        "durability": "each request answered after its journal record is fdatasync'ed (group commit)",
        "transfers_per_second": transfers_per_second,
        "transfers_per_second_until_indexed": (args.transfer_count as f64 / (transfer_seconds + index_catch_up.as_secs_f64())).round(),
        "transfer_phase_seconds": (transfer_seconds * 1000.0).round() / 1000.0,
        "batch_latency_ms": percentiles(latencies),
        "query_count": args.query_count,
        "query_results_mean": (results_total as u64).checked_div(args.query_count).unwrap_or(0),
        "query_latency_ms": percentiles(query_latencies),
        "index_catch_up_ms": index_catch_up.as_millis() as u64,
        "bytes_written": bytes_written,
        "journal_bytes_written": stats.journal_bytes_written,
        "bytes_written_per_transfer": bytes_written / args.transfer_count.max(1),
        "index_file_bytes": index_bytes,
        "peak_rss_bytes": peak_rss_bytes(),
        "in_memory": "all accounts, pending transfers, and transfers not yet indexed (at most unindexed_transfers_max); history lives in the on-disk index",
        "note": "transfers_per_second runs until the last answer (everything durable in the journal); the index may still be catching up then (index_catch_up_ms), which transfers_per_second_until_indexed includes: on short runs trust the latter",
    });
    print_report(&report, args.json, "bench ledger (L1)");
    Ok(())
}

fn print_report(report: &serde_json::Value, as_json: bool, title: &str) {
    if as_json {
        println!("{report}");
        return;
    }
    println!("{title}");
    if let serde_json::Value::Object(map) = report {
        for (key, value) in map {
            println!("  {key:<28} {value}");
        }
    }
}

pub fn core(args: CoreArgs) -> anyhow::Result<()> {
    if args.account_count < 2
        || args.transfer_batch_size == 0
        || args.transfer_batch_size > BATCH_EVENTS_MAX as u64
    {
        bail!("--account-count must be at least 2 and --transfer-batch-size within 1..={BATCH_EVENTS_MAX}");
    }
    let mut ledger = Ledger::new(LedgerLimits::default());
    let mut account_results = Vec::new();
    for chunk in l1_accounts(args.account_count).chunks(BATCH_EVENTS_MAX) {
        ledger.create_accounts(1, chunk, &mut account_results)?;
    }
    let shape = L1Shape {
        account_count: args.account_count,
        account_count_hot: 0,
        transfer_hot_percent: 0,
        transfer_pending_percent: 0,
    };
    let mut rng = Rng::new(args.seed);
    // Generate first, so the figure is the state machine alone.
    let transfers: Vec<_> = (1..=args.transfer_count as u128)
        .map(|id| l1_transfer(&mut rng, &shape, id))
        .collect();
    let mut results = Vec::new();
    let mut changes = clearhouse_ledger::ChangeSet::default();
    let mut busy = Duration::ZERO;
    for (index, batch) in transfers
        .chunks(args.transfer_batch_size as usize)
        .enumerate()
    {
        let started = Instant::now();
        ledger.create_transfers(1_000 + index as u64 * 10_000, batch, &mut results)?;
        busy += started.elapsed();
        assert!(results.iter().all(|r| *r == CreateTransferResult::Ok));
        // As the engine does once the index holds them: hand over the changes, evict the batch.
        ledger.take_changes(&mut changes);
        for transfer in batch {
            ledger.evict(transfer.id);
        }
    }
    let report = json!({
        "benchmark": "in-memory ledger state machine, one core",
        "machine": machine(),
        "transfers": args.transfer_count,
        "transfer_batch_size": args.transfer_batch_size,
        "seconds": (busy.as_secs_f64() * 1000.0).round() / 1000.0,
        "transfers_per_second": (args.transfer_count as f64 / busy.as_secs_f64()).round(),
        "nanoseconds_per_transfer": busy.as_nanos() as u64 / args.transfer_count.max(1),
    });
    print_report(&report, args.json, "bench core");
    Ok(())
}

pub fn recovery(args: RecoveryArgs) -> anyhow::Result<()> {
    if args.account_count < 2 {
        bail!("--account-count must be at least 2");
    }
    if args.crash_after_load {
        // Child: load through a real node, then die without a clean stop (as kill -9 would).
        let dir = args
            .data_dir
            .clone()
            .context("--crash-after-load needs --data-dir")?;
        let node = Node::start(NodeOptions::new(&dir))?;
        load_l1(&node, &args)?;
        std::process::abort();
    }
    let (dir, _temp) = data_dir(&args.data_dir)?;
    let load_started = Instant::now();
    let status = std::process::Command::new(std::env::current_exe()?)
        .args(["bench", "recovery", "--crash-after-load", "--data-dir"])
        .arg(&dir)
        .args(["--transfer-count", &args.transfer_count.to_string()])
        .args(["--account-count", &args.account_count.to_string()])
        .args(["--seed", &args.seed.to_string()])
        .stderr(std::process::Stdio::null())
        .status()?;
    if status.success() {
        bail!("the loading process was expected to abort after loading");
    }
    let load_seconds = load_started.elapsed().as_secs_f64();
    let started = Instant::now();
    let mut options = NodeOptions::new(&dir);
    options.recovery_progress = Some(crate::common::recovery_progress);
    let node = Node::start(options)?;
    let elapsed = started.elapsed();
    let report = node.recovery_report().clone();
    let account = node.lookup_accounts(vec![1])?;
    let stats = node.stats()?;
    drop(node);
    let report = json!({
        "benchmark": "restart after a crash (abort) that followed N acknowledged transfers: load checkpoint, replay the journal after it",
        "machine": machine(),
        "transfers": args.transfer_count,
        "load_seconds": (load_seconds * 1000.0).round() / 1000.0,
        "checkpoint_seq": report.checkpoint_seq,
        "records_replayed": report.records_replayed,
        "journal_records_total": stats.committed_seq,
        "recovery_seconds": (elapsed.as_secs_f64() * 1000.0).round() / 1000.0,
        "account_1_debits_posted": account.first().map(|a| a.debits_posted.to_string()),
    });
    print_report(&report, args.json, "bench recovery");
    Ok(())
}

fn load_l1(node: &Node, args: &RecoveryArgs) -> anyhow::Result<()> {
    for chunk in l1_accounts(args.account_count).chunks(BATCH_EVENTS_MAX) {
        node.create_accounts(chunk.to_vec())?;
    }
    let shape = L1Shape {
        account_count: args.account_count,
        account_count_hot: 0,
        transfer_hot_percent: 0,
        transfer_pending_percent: 0,
    };
    let mut rng = Rng::new(args.seed);
    let mut id = 1u128;
    while id <= args.transfer_count as u128 {
        let last = (id + BATCH_EVENTS_MAX as u128 - 1).min(args.transfer_count as u128);
        let batch: Vec<_> = (id..=last)
            .map(|i| l1_transfer(&mut rng, &shape, i))
            .collect();
        let results = node.create_transfers(batch)?;
        if results.iter().any(|r| *r != CreateTransferResult::Ok) {
            bail!("load failed");
        }
        id = last + 1;
    }
    Ok(())
}
