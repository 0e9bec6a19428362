//! The `clearhouse` command.
//!
//! It does: run the payment switch (`serve`), a whole demo scheme with simulated banks (`demo`),
//! the simulated banks alone (`sim-banks`), the benchmarks (`bench ledger|core|recovery|payments`)
//! and the ledger node behind a line protocol on stdin/stdout (`node`, used by the crash tests).
//! It deliberately does not: hold any logic of its own beyond wiring and measuring; the switch,
//! ledger and journal live in their crates.

mod admin;
mod bench;
mod clearing_cmd;
mod common;
mod export;
mod ha;
mod ha_demo;
mod init;
mod iso_bench;
mod node_protocol;
mod payments;
mod simulate;
mod storage;
mod workload;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "clearhouse",
    version,
    about = "clearhouse: real-time payment switch and clearing house"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Prepares a fresh data directory: a commented configuration file, the operator key and the
    /// Ed25519 key that signs window checkpoints.
    ///
    /// Example: clearhouse init --data-dir data && clearhouse serve --data-dir data --config data/switch.toml
    Init(init::InitArgs),
    /// Runs the payment switch: HTTP API on its embedded storage.
    ///
    /// Example: clearhouse serve --data-dir data --listen 127.0.0.1:8080
    Serve(payments::ServeArgs),
    /// A complete scheme on this machine: the switch and simulated banks (separate processes,
    /// signed HTTP on loopback) sending and accepting payments, with live progress and a summary.
    ///
    /// Example: clearhouse demo --participants 20 --seconds 15
    Demo(payments::DemoArgs),
    /// The operator's commands against a running switch: onboard, limits, suspend/resume,
    /// liquidity, positions, payment status.
    ///
    /// Example: clearhouse admin --url http://127.0.0.1:8080 --key-file data/operator.key stats
    Admin(admin::AdminArgs),
    /// Verifies the voucher chain and every signed window checkpoint, of a stopped server's data
    /// directory or of an export; names the first voucher that does not hold. Exit code 0 verified,
    /// 1 not, 2 unreadable input.
    ///
    /// Example: clearhouse verify --export vouchers.export --public-key $(cat data/operator-ed25519.pub)
    Verify(clearing_cmd::VerifyArgs),
    /// Reconciles a participant's or settlement bank's statement (camt.053, camt.054 or CSV)
    /// against a closed window of a running switch: matched, missing on either side, amount,
    /// direction, currency and status mismatches. Exit code 0 clean, 1 differences, 2 error.
    ///
    /// Example: clearhouse reconcile --participant BANKDEFF --window 3 --statement bank.camt053.xml
    Reconcile(clearing_cmd::ReconcileArgs),
    /// Writes the whole voucher chain with its signed checkpoints to one file, for auditors.
    ///
    /// Example: clearhouse export-vouchers --data-dir data --out vouchers.export
    ExportVouchers(clearing_cmd::ExportArgs),
    /// Follows a running switch's voucher chain into a PostgreSQL reporting mirror, a Parquet
    /// archive (a file per closed window) or a Kafka-protocol broker (a topic per event kind),
    /// each voucher exactly once; where to start is read back from the sink (docs/EXPORT.md).
    ///
    /// Example: clearhouse export parquet --dir archive --key-file data/operator.key
    Export(export::ExportArgs),
    /// Simulated participant banks (creditor side) for the demo and the payments benchmark.
    ///
    /// Example: clearhouse sim-banks --banks banks.json --reject-per-10k 100
    SimBanks(payments::SimBanksArgs),
    /// Deterministic simulation: the real engine, switch and clearing with simulated banks, a
    /// simulated clock, message faults and power-loss crashes, every invariant checked after every
    /// step. A seed reproduces its run exactly (docs/RELIABILITY.md). Exit 1 when a seed fails.
    ///
    /// Example: clearhouse simulate --seed 1 --seeds 20 --steps 1000
    Simulate(simulate::SimulateArgs),
    /// Where a stopped server's disk goes: each index table's entries, bytes stored, B-tree
    /// metadata, fragmentation and pages, and the journal's size.
    ///
    /// Example: clearhouse storage --data-dir data
    Storage(storage::StorageArgs),
    /// Benchmarks that print figures (see BENCHMARKS.md).
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Runs the durable ledger node on a data directory, speaking a line protocol on stdin/stdout.
    ///
    /// Each answer is written only after the request is durable. Used by the crash tests.
    /// Example: printf 'accounts 1 10\n' | clearhouse node --data-dir /tmp/ledger
    Node {
        #[arg(long)]
        data_dir: PathBuf,
        /// Journal segment size in bytes.
        #[arg(long, default_value_t = clearhouse_journal::SEGMENT_SIZE_DEFAULT)]
        segment_size: u64,
        /// A durable index checkpoint every this many journal records.
        #[arg(long, default_value_t = 32)]
        checkpoint_every_records: u64,
        /// Transfers acknowledged but not yet indexed before the engine waits for the index.
        /// The node keeps this many times 2 KiB free on disk.
        #[arg(long, default_value_t = 1_000_000)]
        unindexed_transfers_max: u64,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Workload L1 of shared/bench/WORKLOAD.md: TigerBeetle's `benchmark` defaults, full durability.
    ///
    /// Example: clearhouse bench ledger --transfer-count 1000000 --json
    Ledger(bench::LedgerArgs),
    /// The in-memory ledger state machine alone, on one core (no journal, no index).
    ///
    /// Example: clearhouse bench core --transfer-count 5000000
    Core(bench::CoreArgs),
    /// Recovery: a child process loads N transfers through a node and aborts (no clean stop);
    /// then this process times the restart (checkpoint load + journal replay).
    ///
    /// Example: clearhouse bench recovery --transfer-count 1000000
    Recovery(bench::RecoveryArgs),
    /// Workload P1 of shared/bench/WORKLOAD.md: payments end to end over signed HTTP, with the
    /// switch and the simulated banks as separate processes.
    ///
    /// Example: clearhouse bench payments --payments 200000 --json
    Payments(payments::PaymentsArgs),
    /// Workload C1 of shared/bench/WORKLOAD.md: one window of N settled payments; times close,
    /// settle, reconcile, statements, export and verify.
    ///
    /// Example: clearhouse bench clearing --payments 1000000 --participants 100 --json
    Clearing(clearing_cmd::ClearingBenchArgs),
    /// A long run at a steady offered rate, windows closing on a schedule, retention on: every
    /// minute the switch's RSS, the hot store's bytes per payment, the archive's size and the
    /// minute's latency percentiles (memory and disk should stay flat).
    ///
    /// Example: clearhouse bench soak --minutes 30 --rate 2000
    Soak(payments::SoakArgs),
    /// ISO 20022: parse and emit throughput of pacs.008 on one core.
    ///
    /// Example: clearhouse bench iso20022 --messages 200000
    Iso20022(iso_bench::IsoArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // The simulation's injected faults log errors by design: silent unless asked.
    let default_level = match cli.command {
        Command::Simulate(_) => "off",
        _ => "warn",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("CLEARHOUSE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    // CLEARHOUSE_LOG_FORMAT=json: one JSON object per line (for log shippers); human otherwise.
    if std::env::var("CLEARHOUSE_LOG_FORMAT").is_ok_and(|f| f == "json") {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
    } else {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
    }
    match cli.command {
        Command::Bench(BenchCommand::Ledger(args)) => bench::ledger(args),
        Command::Bench(BenchCommand::Core(args)) => bench::core(args),
        Command::Bench(BenchCommand::Recovery(args)) => bench::recovery(args),
        Command::Bench(BenchCommand::Payments(args)) => payments::bench(args),
        Command::Bench(BenchCommand::Iso20022(args)) => iso_bench::run(args),
        Command::Bench(BenchCommand::Clearing(args)) => clearing_cmd::bench(args),
        Command::Bench(BenchCommand::Soak(args)) => payments::soak(args),
        Command::Verify(args) => clearing_cmd::verify(args),
        Command::Reconcile(args) => clearing_cmd::reconcile(args),
        Command::ExportVouchers(args) => clearing_cmd::export(args),
        Command::Serve(args) => payments::serve(args),
        Command::Demo(args) => payments::demo(args),
        Command::SimBanks(args) => payments::sim_banks(args),
        Command::Admin(args) => admin::run(args),
        Command::Simulate(args) => simulate::run(args),
        Command::Init(args) => init::run(args),
        Command::Storage(args) => storage::run(args),
        Command::Export(args) => export::run(args),
        Command::Node {
            data_dir,
            segment_size,
            checkpoint_every_records,
            unindexed_transfers_max,
        } => node_protocol::run(
            data_dir,
            segment_size,
            checkpoint_every_records,
            unindexed_transfers_max,
        ),
    }
}
