//! `clearhouse simulate`: the deterministic simulation (crates/simulator) for chosen seeds, with
//! its figures; a failing seed prints the end of its trace and how to reproduce it.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

#[derive(Args)]
pub struct SimulateArgs {
    /// The first seed.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// How many seeds, from --seed on.
    #[arg(long, default_value_t = 1)]
    pub seeds: u64,
    /// Steps per seed.
    #[arg(long, default_value_t = 1000)]
    pub steps: u64,
    /// Print every trace line as it happens (to stderr).
    #[arg(long)]
    pub verbose: bool,
    /// One JSON object per seed instead of text.
    #[arg(long)]
    pub json: bool,
    /// Replicated: a simulated replicated log and lease, a lagging standby, failover on every
    /// crash (docs/RELIABILITY.md).
    #[arg(long)]
    pub replicated: bool,
    /// Where the data directories go (a fresh temporary directory per seed, removed after).
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
}

pub fn run(args: SimulateArgs) -> anyhow::Result<()> {
    let last = args
        .seed
        .checked_add(args.seeds.saturating_sub(1))
        .context("--seed + --seeds overflows")?;
    let mut failed = 0u64;
    for seed in args.seed..=last {
        let dir = match &args.work_dir {
            Some(parent) => tempfile::tempdir_in(parent),
            None => tempfile::tempdir(),
        }
        .context("creating the data directory")?;
        let options = clearhouse_simulator::SimOptions {
            seed,
            steps: args.steps,
            data_dir: dir.path().to_path_buf(),
            verbose: args.verbose,
            replicated: args.replicated,
        };
        match clearhouse_simulator::run(&options) {
            Ok(report) if args.json => println!("{}", serde_json::to_string(&report)?),
            Ok(r) => {
                let f = &r.faults;
                println!(
                    "seed {seed}: {} steps, {} payments ({} settled, rejected {:?}), {} windows settled; \
                     faults: {} dropped, {} duplicated, {} reordered, {} late, {} never answered, {} unreachable, \
                     {} crashes (writes lost {}, torn {}, on disk unacknowledged {}; publishes lost {}, acks lost {}; \
                     {} partitions, {} failovers, {} unreplicated records cut); {} checks, {} vouchers verified; trace {}",
                    r.steps, r.payments, r.settled, r.rejected, r.windows_settled,
                    f.messages_dropped, f.messages_duplicated, f.messages_reordered, f.answers_late,
                    f.answers_never, f.creditors_unreachable, f.crashes, f.writes_lost, f.writes_torn,
                    f.writes_unacknowledged_on_disk, f.publishes_lost, f.acks_lost, f.partitions, f.failovers,
                    f.unreplicated_records_cut, r.checks, r.vouchers_verified, &r.trace_digest[..16]
                );
            }
            Err(violation) => {
                failed += 1;
                for line in &violation.trace_tail {
                    eprintln!("{line}");
                }
                eprintln!("{violation}");
                eprintln!(
                    "reproduce: clearhouse simulate --seed {seed} --steps {} --verbose",
                    args.steps
                );
            }
        }
    }
    if failed > 0 {
        anyhow::bail!("{failed} seed(s) failed");
    }
    Ok(())
}
