//! `serve`, `sim-banks`, `demo` and `bench payments`: the switch as a process, simulated banks as
//! another, and a load generator (workload P1 of shared/bench/WORKLOAD.md) driving both over
//! signed HTTP on loopback.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clearhouse_engine::Node;
use clearhouse_switch::client::SignedClient;
use clearhouse_switch::sim::{self, SimBank, SimCounters, SimOptions};
use clearhouse_switch::{Switch, SwitchConfig};
use serde_json::{json, Value};

use crate::common::{
    data_dir, disk_bytes, machine, percent_of_bp, percentile_ms, switch_node_options,
};
use crate::workload::Rng;

#[derive(clap::Args)]
pub struct ServeArgs {
    /// Data directory (created on first start, with the operator key).
    #[arg(long, default_value = "data")]
    data_dir: PathBuf,
    /// Configuration file (TOML); every field has a default (see crates/switch/src/config.rs).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Listen address (overrides the config file).
    #[arg(long)]
    listen: Option<String>,
}

pub fn serve(args: ServeArgs) -> anyhow::Result<()> {
    // The file (if any), then CLEARHOUSE_<FIELD> environment overrides, then --listen.
    let text = match &args.config {
        Some(path) => {
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
        }
        None => String::new(),
    };
    let crate::ha::SplitConfig {
        rest: text,
        replication,
        exports,
        amqp,
        retention,
    } = crate::ha::split_config(&text)?;
    let mut config = SwitchConfig::from_toml_and_env(&text, std::env::vars())?;
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if let Some(replication) = replication {
        if amqp.is_some() {
            bail!("[amqp] with [replication] is not supported yet: run the AMQP gateway on a single node");
        }
        if retention.is_some() {
            bail!("[retention] with [replication] is not supported yet: run retention on a single node");
        }
        return crate::ha::serve_replicated(args.data_dir, config, replication, exports);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        std::fs::create_dir_all(&args.data_dir)?;
        let mut options = switch_node_options(&args.data_dir);
        options.index_cache_bytes = config.index_cache_bytes();
        let node = Node::start(options).context("starting the ledger node")?;
        // Participants whose endpoint is `amqp:` are reached through the broker's queues.
        let amqp = amqp
            .map(|amqp| clearhouse_amqp::Amqp::new(amqp, &config))
            .transpose()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let environment = clearhouse_switch::switch::Environment {
            transport: match &amqp {
                Some(amqp) => clearhouse_switch::outbound::Transport::HttpAndQueues(
                    amqp.transport.clone(),
                ),
                None => clearhouse_switch::outbound::Transport::Http,
            },
            ..Default::default()
        };
        let switch = Switch::start_in(node, config.clone(), &args.data_dir, environment)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        clearhouse_export::spawn_in_process(&switch, &args.data_dir, &exports)?;
        if let Some(retention) = retention {
            let dir = retention.archive_dir(&exports, &args.data_dir)?;
            clearhouse_export::retention::spawn(&switch, retention, dir);
        }
        let mut router = clearhouse_switch::http::router(switch.clone());
        if let Some(amqp) = &amqp {
            let status = amqp.link.status.clone();
            switch
                .metrics_extra
                .lock()
                .expect("metrics")
                .push(Arc::new(move |out: &mut String| status.render(out)));
            let vhost = clearhouse_amqp::vhost_of(&amqp.link.config.url);
            router = router.merge(clearhouse_amqp::definitions::routes(switch.clone(), vhost));
            clearhouse_amqp::start(amqp.link.clone(), switch.clone(), router.clone());
        }
        let listener = tokio::net::TcpListener::bind(&config.listen)
            .await
            .with_context(|| format!("binding {}", config.listen))?;
        let address = listener.local_addr()?;
        let tls = match (&config.tls_cert_pem, &config.tls_key_pem) {
            (Some(cert), Some(key)) => Some(clearhouse_switch::http::tls_acceptor(cert, key)?),
            _ => None,
        };
        let scheme = if tls.is_some() { "https" } else { "http" };
        // The first line of stdout is the address (the demo and benchmark read it).
        println!("listening on {scheme}://{address}");
        eprintln!(
            "clearhouse switch: {scheme}://{address} (OpenAPI: /openapi.json, dashboard: /dashboard), data in {}, operator key in {}",
            args.data_dir.display(),
            args.data_dir.join("operator.key").display()
        );
        std::io::stdout().flush()?;
        let shutdown = async {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("signal handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        };
        match tls {
            Some(acceptor) => {
                clearhouse_switch::http::serve_tls(listener, switch, acceptor, shutdown).await?
            }
            None => clearhouse_switch::http::serve_router(listener, router, shutdown).await?,
        }
        Ok(())
    })
}

#[derive(clap::Args)]
pub struct SimBanksArgs {
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// JSON file: [{"bic": "...", "secret_hex": "..."}, ...]
    #[arg(long)]
    banks: PathBuf,
    /// Share of incoming payments rejected with AC04, per 10,000 (100 = 1 %).
    #[arg(long, default_value_t = 100)]
    reject_per_10k: u32,
    /// Delay before answering, milliseconds.
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
    /// The scheme's RabbitMQ broker (`amqp://host:port/vhost`): banks marked `"amqp": true` in
    /// the banks file take their forwarded payments and notifications off their queues there
    /// (as their own broker user) instead of over HTTP.
    #[arg(long)]
    amqp: Option<String>,
}

/// A simulated bank on the broker: answers forwarded payments like the HTTP banks (the same
/// stable accept/reject choice per payment id) and counts notifications; reconnects (every
/// 500 ms while the broker or its queues are not there) for as long as the process runs.
fn sim_amqp_bank(url: &str, bank: &SimBank, reject_per_10k: u32, counters: Arc<SimCounters>) {
    let (url, bank) = (url.to_string(), bank.clone());
    tokio::spawn(async move {
        loop {
            match sim_amqp_session(&url, &bank, reject_per_10k, counters.clone()).await {
                Ok(participant) => {
                    eprintln!("bank {} on the broker", bank.bic);
                    while participant.is_connected() {
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                    eprintln!("bank {}: broker connection lost; reconnecting", bank.bic);
                }
                Err(error) => tracing::debug!(bic = %bank.bic, %error, "not on the broker yet"),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
}

async fn sim_amqp_session(
    url: &str,
    bank: &SimBank,
    reject_per_10k: u32,
    counters: Arc<SimCounters>,
) -> Result<Arc<clearhouse_amqp::client::AmqpParticipant>, clearhouse_amqp::AmqpError> {
    let participant = Arc::new(
        clearhouse_amqp::client::AmqpParticipant::connect_with(url, &bank.bic, &bank.secret, false)
            .await?,
    );
    let seen = counters.clone();
    participant
        .serve_forwards(256, move |payment| {
            let id = payment["payment_id"].as_str()?;
            seen.payments.fetch_add(1, Ordering::Relaxed);
            Some(if sim::rejects(id, reject_per_10k) {
                seen.rejected.fetch_add(1, Ordering::Relaxed);
                json!({"status": "RJCT", "reason": "AC04"})
            } else {
                json!({"status": "ACCP"})
            })
        })
        .await?;
    participant
        .take_notifications(Arc::new(AtomicU64::new(0)))
        .await?;
    Ok(participant)
}

pub fn sim_banks(args: SimBanksArgs) -> anyhow::Result<()> {
    let list: Vec<Value> = serde_json::from_slice(&std::fs::read(&args.banks)?)?;
    let banks = list
        .iter()
        .map(|b| {
            Ok(SimBank {
                bic: b["bic"].as_str().context("bic")?.to_string(),
                secret: hex::decode(b["secret_hex"].as_str().context("secret_hex")?)?,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&args.listen).await?;
        println!("listening on http://{}", listener.local_addr()?);
        std::io::stdout().flush()?;
        let options = SimOptions {
            reject_per_10k: args.reject_per_10k,
            delay: Duration::from_millis(args.delay_ms),
            defer: false,
            switch_url: None,
        };
        let counters = Arc::new(SimCounters::default());
        for (bank, entry) in banks.iter().zip(&list) {
            if entry["amqp"].as_bool() != Some(true) {
                continue;
            }
            let url = args
                .amqp
                .as_deref()
                .context("a bank marked \"amqp\": true needs --amqp URL")?;
            sim_amqp_bank(url, bank, args.reject_per_10k, counters.clone());
        }
        axum::serve(listener, sim::router(banks, options, counters)).await?;
        Ok(())
    })
}

#[derive(clap::Args, Clone)]
pub struct PaymentsArgs {
    /// Participants (all prefunded, one currency).
    #[arg(long, default_value_t = 100)]
    participants: usize,
    /// Payments to submit (after warm-up).
    #[arg(long, default_value_t = 200_000)]
    payments: u64,
    /// Stop after this many seconds instead (0: run all --payments).
    #[arg(long, default_value_t = 0)]
    seconds: u64,
    /// Concurrent debtor-agent connections, one payment in flight each.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Offered load in payments per second across all clients (0: as fast as answered).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Share of payments the simulated creditor agents reject (AC04), per 10,000.
    #[arg(long, default_value_t = 100)]
    reject_per_10k: u32,
    /// Simulated creditor agents' answer delay, milliseconds.
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Data directory for the switch (default: a fresh temporary one, removed afterwards).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Submit ISO 20022 pacs.008 XML (answers are pacs.002) instead of JSON.
    #[arg(long)]
    xml: bool,
    /// Print one JSON object with the figures.
    #[arg(long)]
    json: bool,
    /// An extra switch configuration (TOML), e.g. with `[[export]]` sections: the switch runs
    /// them in process, and the report gains each exporter's vouchers per second and how long it
    /// took to catch up after the load. Not with --replicated.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Replicated (R3): 3 NATS JetStream servers on loopback, the switch as leader and a standby
    /// following it; adds the NATS servers' and the standby's CPU and the standby's lag.
    #[arg(long)]
    replicated: bool,
    /// Every participant over AMQP: a private RabbitMQ node on loopback (rabbitmq-server must
    /// be installed), endpoints `amqp:`, debtors publish to their queues and read the answers
    /// there, the simulated creditor agents decide off theirs; adds the broker's CPU.
    #[arg(long)]
    amqp: bool,
    /// Close (and settle) the settlement window every this many seconds while the load runs
    /// (0: once, after it).
    #[arg(long, default_value_t = 0)]
    window_seconds: u64,
    /// Every this many seconds, a line (and a row of the JSON's `samples`): payments so far,
    /// the interval's latency percentiles, the switch's RSS, the hot store's and the archive's
    /// bytes (0: none).
    #[arg(long, default_value_t = 0)]
    sample_seconds: u64,
    /// Retention on: a Parquet archive in the data directory and `[retention]` keeping this many
    /// closed windows hot (give --window-seconds too; not with --config, --replicated, --amqp).
    #[arg(long)]
    retention_hot_windows: Option<u64>,
    /// With --retention-hot-windows: the scheme's duplicate window (seconds; retention's default
    /// is 7 days).
    #[arg(long)]
    retention_duplicate_window_seconds: Option<u64>,
}

/// `bench soak`: a long run at a steady offered rate with windows closing on a schedule and
/// retention on, sampled every minute.
#[derive(clap::Args)]
pub struct SoakArgs {
    #[arg(long, default_value_t = 30)]
    minutes: u64,
    /// Offered load, payments per second.
    #[arg(long, default_value_t = 2_000)]
    rate: u64,
    /// A settlement window closes (and settles) every this many seconds.
    #[arg(long, default_value_t = 60)]
    window_seconds: u64,
    /// Closed windows kept hot by retention (older ones go to the Parquet archive); 0: off.
    #[arg(long, default_value_t = 2)]
    hot_windows: u64,
    /// Seconds between samples.
    #[arg(long, default_value_t = 60)]
    sample_seconds: u64,
    /// How long an instruction id stays refused as a duplicate (then its tombstone goes too);
    /// retention's default is 7 days, longer than a soak.
    #[arg(long)]
    duplicate_window_seconds: Option<u64>,
    #[arg(long, default_value_t = 100)]
    participants: usize,
    #[arg(long, default_value_t = 64)]
    clients: usize,
    #[arg(long)]
    data_dir: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

pub fn soak(args: SoakArgs) -> anyhow::Result<()> {
    if args.minutes == 0 || args.rate == 0 || args.window_seconds == 0 || args.sample_seconds == 0 {
        bail!("--minutes, --rate, --window-seconds and --sample-seconds are at least 1");
    }
    let run = PaymentsArgs {
        participants: args.participants,
        payments: u64::MAX,
        seconds: args.minutes * 60,
        clients: args.clients,
        rate: args.rate,
        reject_per_10k: 100,
        delay_ms: 0,
        seed: 42,
        data_dir: args.data_dir,
        xml: false,
        json: args.json,
        config: None,
        replicated: false,
        amqp: false,
        window_seconds: args.window_seconds,
        sample_seconds: args.sample_seconds,
        retention_hot_windows: (args.hot_windows > 0).then_some(args.hot_windows),
        retention_duplicate_window_seconds: args.duplicate_window_seconds,
    };
    if !args.json {
        eprintln!(
            "soak: {} min at {}/s offered, a window every {} s, retention {}",
            args.minutes,
            args.rate,
            args.window_seconds,
            if args.hot_windows > 0 {
                format!("on ({} closed windows hot)", args.hot_windows)
            } else {
                "off".to_string()
            }
        );
    }
    bench(run)
}

#[derive(clap::Args)]
pub struct DemoArgs {
    #[arg(long, default_value_t = 20)]
    participants: usize,
    /// How long the simulated banks send payments.
    #[arg(long, default_value_t = 15)]
    seconds: u64,
    #[arg(long, default_value_t = 32)]
    clients: usize,
    /// Offered load (payments/s); 0: as fast as the switch answers.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// High availability instead: 3 NATS JetStream servers (nats-server must be installed) and
    /// 3 clearhouse nodes; the leader is killed mid-traffic, and the takeover time and what was
    /// lost (nothing) are printed.
    #[arg(long)]
    ha: bool,
    /// How the participants reach the switch: `http` (signed HTTP both ways) or `amqp` (their
    /// queues on a private RabbitMQ node on loopback; rabbitmq-server must be installed).
    #[arg(long, default_value = "http", value_parser = ["http", "amqp"])]
    transport: String,
}

pub fn demo(args: DemoArgs) -> anyhow::Result<()> {
    if args.ha {
        return crate::ha_demo::run(args.seconds, args.clients.min(8));
    }
    let run = PaymentsArgs {
        participants: args.participants,
        payments: u64::MAX,
        seconds: args.seconds,
        clients: args.clients,
        rate: args.rate,
        reject_per_10k: 100,
        delay_ms: 0,
        seed: 42,
        data_dir: None,
        xml: false,
        json: false,
        config: None,
        replicated: false,
        amqp: args.transport == "amqp",
        window_seconds: 0,
        sample_seconds: 0,
        retention_hot_windows: None,
        retention_duplicate_window_seconds: None,
    };
    let report = run_p1(&run, true)?;
    println!();
    println!(
        "demo summary ({} participants, {} s, {} connections, signed requests, full durability)",
        args.participants, args.seconds, args.clients
    );
    print_report(&report);
    Ok(())
}

pub fn bench(args: PaymentsArgs) -> anyhow::Result<()> {
    let report = run_p1(&args, !args.json)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    Ok(())
}

fn print_report(r: &Value) {
    if let Some(samples) = r["samples"].as_array().filter(|s| !s.is_empty()) {
        let rss: Vec<u64> = samples
            .iter()
            .map(|s| s["switch_rss_bytes"].as_u64().unwrap_or(0))
            .collect();
        let first = &samples[0];
        let last = &samples[samples.len() - 1];
        println!(
            "  samples: {}; switch RSS {} MB first, {} MB last, {} MB max; hot store {} -> {} MB ({} bytes per payment at the end); archive {} MB; p99 per interval max {} ms",
            samples.len(),
            rss[0] / 1_000_000,
            rss[rss.len() - 1] / 1_000_000,
            rss.iter().max().copied().unwrap_or(0) / 1_000_000,
            first["hot_store_bytes"].as_u64().unwrap_or(0) / 1_000_000,
            last["hot_store_bytes"].as_u64().unwrap_or(0) / 1_000_000,
            last["hot_bytes_per_payment"],
            last["archive_bytes"].as_u64().unwrap_or(0) / 1_000_000,
            samples
                .iter()
                .map(|s| s["latency_ms"]["p99"].as_f64().unwrap_or(0.0))
                .fold(0.0, f64::max)
        );
    }
    if let Some(windows) = r["windows_closed_during_load"]
        .as_array()
        .filter(|w| !w.is_empty())
    {
        println!(
            "  windows closed during the load: {}, slowest close+settle+reconcile {:.0} ms, reconciliation breaks {}",
            windows.len(),
            windows
                .iter()
                .map(|w| w["close_settle_reconcile_ms"].as_f64().unwrap_or(0.0))
                .fold(0.0, f64::max),
            windows
                .iter()
                .map(|w| w["reconciliation_breaks"].as_u64().unwrap_or(0))
                .sum::<u64>()
        );
    }
    if let Some(exports) = r["exports"].as_object() {
        for (name, e) in exports {
            println!(
                "  export {name}: {} vouchers during the load ({}/s), {} behind at its end, caught up {} ms after the window close",
                e["vouchers_during_load"],
                e["vouchers_per_second_during_load"],
                e["lag_vouchers_at_end_of_load"],
                e["caught_up_ms_after_close"]
            );
        }
    }
    println!(
        "  settled:             {} ({:.0}/s)",
        r["settled"],
        r["settled_per_second"].as_f64().unwrap_or(0.0)
    );
    println!("  rejected by reason:  {}", r["rejected_by_reason"]);
    println!(
        "  latency ms (submit -> final state at the debtor agent): p50 {} p99 {} p99.9 {} max {}",
        r["latency_ms"]["p50"],
        r["latency_ms"]["p99"],
        r["latency_ms"]["p999"],
        r["latency_ms"]["max"]
    );
    let by = &r["cpu_seconds_per_1000_by_process"];
    println!(
        "  CPU seconds per 1,000 payments: {} (switch {}, banks {}, load generator {})",
        r["cpu_seconds_per_1000"], by["switch"], by["banks"], by["load_generator"]
    );
    if let Some(threads) = r["switch_cpu_seconds_per_1000_by_thread"].as_object() {
        let mut busiest: Vec<(&String, f64)> = threads
            .iter()
            .map(|(name, v)| (name, v.as_f64().unwrap_or(0.0)))
            .filter(|(_, v)| *v > 0.0)
            .collect();
        busiest.sort_by(|a, b| b.1.total_cmp(&a.1));
        let shown: Vec<String> = busiest.iter().map(|(n, v)| format!("{n} {v}")).collect();
        println!("  switch threads (CPU s per 1,000): {}", shown.join(", "));
    }
    println!(
        "  disk: {} bytes per settled payment (journal + index, after the window closed)",
        r["disk_bytes_per_payment"]
    );
    println!(
        "  books balance (sum of positions = liquidity funded): {}",
        r["books_balance"]
    );
    println!("  switch counters: {}", r["switch_stats"]);
    let w = &r["window"];
    println!(
        "  clearing: window {} {} in {:.0} ms: {} payments, gross {} net {} (minor units; netting efficiency {}), chain head signed at voucher {}, reconciliation breaks: {}",
        w["window"],
        w["state"].as_str().unwrap_or("?"),
        w["close_settle_reconcile_ms"].as_f64().unwrap_or(0.0),
        w["transfers"],
        w["gross_minor_units"].as_str().unwrap_or("?"),
        w["net_minor_units"].as_str().unwrap_or("?"),
        percent_of_bp(w["netting_efficiency_bp"].as_u64().unwrap_or(0)),
        w["checkpoint_voucher"],
        w["reconciliation_breaks"]
    );
}

/// A child process that prints `listening on URL` first.
struct Service {
    child: Child,
    url: String,
}

impl Service {
    fn spawn(mut command: Command, what: &str) -> anyhow::Result<Service> {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {what}"))?;
        let stdout = child.stdout.take().context("stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let Some(url) = line.trim().strip_prefix("listening on ") else {
            let _ = child.kill();
            bail!("{what} did not start (said {line:?})");
        };
        Ok(Service {
            url: url.to_string(),
            child,
        })
    }

    /// User + system CPU seconds so far (Linux /proc).
    fn cpu_seconds(&self) -> f64 {
        cpu_seconds_of(&format!("/proc/{}/stat", self.child.id()))
    }

    /// CPU seconds so far per thread name (threads of one name, such as the async runtime's
    /// workers, added up); threads that ended are not counted.
    fn cpu_seconds_by_thread(&self) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        let dir = format!("/proc/{}/task", self.child.id());
        let Ok(tasks) = std::fs::read_dir(&dir) else {
            return out;
        };
        for task in tasks.flatten() {
            let path = task.path();
            let name = std::fs::read_to_string(path.join("comm"))
                .map(|n| n.trim().to_string())
                .unwrap_or_default();
            let seconds = cpu_seconds_of(&path.join("stat").to_string_lossy());
            *out.entry(name).or_insert(0.0) += seconds;
        }
        out
    }

    fn stop(mut self) {
        // SIGTERM: the switch stops cleanly (checkpoint).
        terminate(self.child.id());
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn terminate(pid: u32) {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status();
}

fn cpu_seconds_of(stat_path: &str) -> f64 {
    let Ok(text) = std::fs::read_to_string(stat_path) else {
        return 0.0;
    };
    // Fields after the command name (which may contain spaces, closed by ')').
    let Some(rest) = text.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of stat, 11 and 12 after the name and state.
    (ticks(11) + ticks(12)) as f64 / 100.0
}

fn bic_of(index: usize) -> String {
    let letters = |mut n: usize| {
        let mut s = [b'A'; 3];
        for slot in s.iter_mut().rev() {
            *slot = b'A' + (n % 26) as u8;
            n /= 26;
        }
        String::from_utf8(s.to_vec()).expect("ascii")
    };
    format!("B{}DEFF", letters(index))
}

fn parse_minor(text: &str) -> i128 {
    let negative = text.starts_with('-');
    let digits: String = text.chars().filter(|c| c.is_ascii_digit()).collect();
    let value: i128 = digits.parse().unwrap_or(0);
    if negative {
        -value
    } else {
        value
    }
}

fn run_p1(args: &PaymentsArgs, progress: bool) -> anyhow::Result<Value> {
    if args.participants < 2 || args.clients == 0 {
        bail!("need at least 2 participants and 1 client");
    }
    if args.replicated && args.config.is_some() {
        bail!("--config and --replicated do not go together (the replicated run writes its own)");
    }
    if args.amqp && (args.replicated || args.config.is_some()) {
        bail!("--amqp goes with neither --replicated nor --config (it writes its own)");
    }
    if args.retention_hot_windows.is_some()
        && (args.amqp || args.replicated || args.config.is_some() || args.window_seconds == 0)
    {
        bail!("--retention-hot-windows needs --window-seconds, and goes with none of --amqp, --replicated, --config");
    }
    let (dir, _temp) = data_dir(&args.data_dir)?;
    let exe = std::env::current_exe()?;
    let banks: Vec<(String, String)> = (0..args.participants)
        .map(|i| {
            // 16 bytes per bank, derived from its index: a benchmark, not a deployment.
            let secret = clearhouse_switch::model::id128(&[b"bench-secret", &i.to_le_bytes()]);
            (bic_of(i), hex::encode(secret.to_le_bytes()))
        })
        .collect();
    let banks_file = dir.join("sim-banks.json");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        &banks_file,
        serde_json::to_vec(
            &banks
                .iter()
                .map(|(bic, secret)| json!({"bic": bic, "secret_hex": secret, "amqp": args.amqp}))
                .collect::<Vec<_>>(),
        )?,
    )?;
    let switch_dir = dir.join("switch");
    let rabbit = if args.amqp {
        Some(clearhouse_amqp::testing::Rabbit::start(&dir).map_err(|e| anyhow::anyhow!("{e}"))?)
    } else {
        None
    };
    let amqp_config = match &rabbit {
        Some(rabbit) => {
            let path = dir.join("amqp.toml");
            std::fs::write(
                &path,
                format!(
                    "[amqp]\nurl = \"{}\"\nprefetch = {}\n",
                    rabbit.switch_url(),
                    args.clients.clamp(1, 4096)
                ),
            )?;
            Some(path)
        }
        None => None,
    };
    let retention_config = match args.retention_hot_windows {
        Some(hot) => {
            let path = dir.join("retention.toml");
            std::fs::write(
                &path,
                format!(
                    "[[export]]\nname = \"archive\"\nsink = \"parquet\"\ndir = \"archive\"\n\n[retention]\nhot_windows = {hot}\narchive = \"archive\"\ninterval_ms = 1000\n{}",
                    args.retention_duplicate_window_seconds
                        .map_or(String::new(), |s| format!("duplicate_window_seconds = {s}\n"))
                ),
            )?;
            Some(path)
        }
        None => None,
    };
    let replicated = if args.replicated {
        Some(crate::ha_demo::Replicated::start(&exe, &dir, &switch_dir)?)
    } else {
        None
    };
    let switch = Service::spawn(
        {
            let mut c = Command::new(&exe);
            c.args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
                .arg(&switch_dir);
            if let Some(replicated) = &replicated {
                c.arg("--config").arg(&replicated.configs[0]);
            } else if let Some(config) = args
                .config
                .as_ref()
                .or(amqp_config.as_ref())
                .or(retention_config.as_ref())
            {
                c.arg("--config").arg(config);
            }
            c
        },
        "the switch",
    )?;
    let standby = match &replicated {
        Some(replicated) => {
            replicated.wait_ready(&switch.url)?;
            Some(Service::spawn(
                {
                    let mut c = Command::new(&exe);
                    c.args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
                        .arg(&replicated.standby_dir)
                        .arg("--config")
                        .arg(&replicated.configs[1]);
                    c
                },
                "the standby",
            )?)
        }
        None => None,
    };
    let mut extra_pids: Vec<(&str, Vec<u32>)> = match (&replicated, &standby) {
        (Some(replicated), Some(standby)) => vec![
            ("nats", replicated.cluster.pids()),
            ("standby", vec![standby.child.id()]),
        ],
        _ => Vec::new(),
    };
    if let Some(pid) = rabbit.as_ref().and_then(|r| r.pid()) {
        extra_pids.push(("rabbitmq", vec![pid]));
    }
    let extra_cpu = |pids: &[u32]| -> f64 {
        pids.iter()
            .map(|pid| cpu_seconds_of(&format!("/proc/{pid}/stat")))
            .sum()
    };
    let extra_before: Vec<f64> = extra_pids.iter().map(|(_, p)| extra_cpu(p)).collect();
    let lag_sampler = standby
        .as_ref()
        .map(|standby| crate::ha_demo::LagSampler::start(&standby.url));
    let sim = Service::spawn(
        {
            let mut c = Command::new(&exe);
            c.args(["sim-banks", "--banks"]).arg(&banks_file);
            c.args([
                "--reject-per-10k",
                &args.reject_per_10k.to_string(),
                "--delay-ms",
                &args.delay_ms.to_string(),
            ]);
            if let Some(rabbit) = &rabbit {
                c.args(["--amqp", &rabbit.url()]);
            }
            c
        },
        "the simulated banks",
    )?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let report = runtime.block_on(drive(
        args,
        &switch,
        &sim,
        &switch_dir,
        &banks,
        progress,
        rabbit.as_ref(),
    ));
    let mut report = report?;
    if args.config.is_some() {
        // The Parquet archive makes a window durable when it closes: close it, as a scheme's
        // schedule would, then wait for every exporter to hold the whole chain.
        let operator = operator_client(&switch_dir, &switch.url)?;
        let (status, body) =
            runtime.block_on(operator.request("POST", "/v1/admin/windows/close", b""))?;
        if status != 200 {
            bail!(
                "closing the window: {status} {}",
                String::from_utf8_lossy(&body)
            );
        }
        let closed: Value = serde_json::from_slice(&body).unwrap_or_default();
        let close_seq = closed["checkpoint"]["seq"].as_u64().unwrap_or(u64::MAX);
        report["exports"] = export_figures(&switch.url, &report, close_seq)?;
    }
    // The CPU of the processes beside the switch (broker, NATS servers, standby), per 1,000.
    let payments = report["payments"].as_u64().unwrap_or(0).max(1) as f64;
    let mut total = report["cpu_seconds_per_1000"].as_f64().unwrap_or(0.0);
    for ((name, pids), before) in extra_pids.iter().zip(&extra_before) {
        let per_1000 = ((extra_cpu(pids) - before) * 1000.0 / payments * 1000.0).round() / 1000.0;
        report["cpu_seconds_per_1000_by_process"][*name] = json!(per_1000);
        total += per_1000;
    }
    let total = json!((total * 1000.0).round() / 1000.0);
    if rabbit.is_some() {
        report["cpu_seconds_per_1000_with_broker"] = total.clone();
        report["workload"] = json!(format!(
            "{} over AMQP (a RabbitMQ node on loopback; every participant's endpoint amqp:)",
            report["workload"].as_str().unwrap_or("P1")
        ));
    }
    if let Some(sampler) = lag_sampler {
        report["cpu_seconds_per_1000_with_replication"] = total;
        report["standby_lag"] = sampler.finish();
        // Stream messages per payment: what the NATS servers store and replicate.
        let published = crate::ha_demo::get(&switch.url, "/metrics").and_then(|(_, text)| {
            text.lines()
                .find_map(|line| {
                    line.strip_prefix("clearhouse_replication_published_messages_total ")
                })
                .and_then(|value| value.trim().parse::<u64>().ok())
        });
        if let Some(messages) = published {
            report["stream_messages"] = json!(messages);
            // A ratio of two counts (no amount), rounded to 3 places for the report.
            report["stream_messages_per_payment"] =
                json!((messages as f64 / payments * 1000.0).round() / 1000.0);
        }
        report["workload"] = json!(format!(
            "{} replicated (R3 JetStream stream on 3 loopback nats-servers, 1 standby)",
            report["workload"].as_str().unwrap_or("P1")
        ));
    }
    drop(runtime);
    switch.stop();
    if let Some(standby) = standby {
        standby.stop();
    }
    sim.stop();
    Ok(report)
}

fn operator_client(switch_dir: &Path, url: &str) -> anyhow::Result<SignedClient> {
    let (key_id, secret) = crate::common::read_operator_key(&switch_dir.join("operator.key"))?;
    Ok(SignedClient::new(url, &key_id, secret))
}

/// Each in-process exporter of the switch at `url` after the load: vouchers written, their rate
/// over the load's seconds, and how long it took (bounded: 120 s) after the window close to hold
/// the chain through the close.
fn export_figures(
    url: &str,
    report: &serde_json::Value,
    close_seq: u64,
) -> anyhow::Result<serde_json::Value> {
    // Per exporter: vouchers written, lag, durable sequence.
    let read = || -> BTreeMap<String, (f64, f64, f64)> {
        let mut out: BTreeMap<String, (f64, f64, f64)> = BTreeMap::new();
        let text = crate::ha_demo::get(url, "/metrics")
            .map(|(_, t)| t)
            .unwrap_or_default();
        for line in text.lines() {
            for (metric, slot) in [
                ("clearhouse_export_vouchers_total{export=\"", 0),
                ("clearhouse_export_lag_vouchers{export=\"", 1),
                ("clearhouse_export_durable_seq{export=\"", 2),
            ] {
                if let Some(rest) = line.strip_prefix(metric) {
                    let name = rest.split('"').next().unwrap_or("").to_string();
                    let value = rest
                        .rsplit(' ')
                        .next()
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0.0);
                    let entry = out.entry(name).or_default();
                    match slot {
                        0 => entry.0 = value,
                        1 => entry.1 = value,
                        _ => entry.2 = value,
                    }
                }
            }
        }
        out
    };
    let seconds = report["seconds"].as_f64().unwrap_or(1.0).max(1e-3);
    let at_end = read();
    let started = Instant::now();
    let mut caught_up: BTreeMap<String, Option<u128>> = BTreeMap::new();
    // Caught up: the sink holds the chain through the window's close (the Parquet archive is
    // durable per window, so "no lag" would wait for the next close).
    while started.elapsed() < Duration::from_secs(120) {
        for (name, (_, _, durable)) in read() {
            if durable >= close_seq as f64 {
                caught_up
                    .entry(name)
                    .or_insert(Some(started.elapsed().as_millis()));
            }
        }
        if caught_up.len() >= at_end.len() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut out = serde_json::Map::new();
    for (name, (vouchers, lag, _)) in at_end {
        out.insert(
            name.clone(),
            json!({
                "vouchers_during_load": vouchers,
                "vouchers_per_second_during_load": (vouchers / seconds).round(),
                "lag_vouchers_at_end_of_load": lag,
                "caught_up_ms_after_close": caught_up.get(&name).copied().flatten(),
            }),
        );
    }
    Ok(serde_json::Value::Object(out))
}

async fn call(
    client: &SignedClient,
    method: &str,
    path: &str,
    body: &Value,
) -> anyhow::Result<(u16, Value)> {
    let bytes = if body.is_null() {
        Vec::new()
    } else {
        body.to_string().into_bytes()
    };
    let (status, answer) = client.request(method, path, &bytes).await?;
    Ok((
        status,
        serde_json::from_slice(&answer).unwrap_or(Value::Null),
    ))
}

/// A debtor agent of the load: signed HTTP, or its queues on the broker.
enum Debtor {
    Http(SignedClient),
    Amqp(Box<clearhouse_amqp::client::AmqpParticipant>),
}

impl Debtor {
    async fn request(
        &self,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> anyhow::Result<(u16, Vec<u8>)> {
        match self {
            Debtor::Http(client) => {
                let (status, bytes) = client.request(method, path, body).await?;
                Ok((status, bytes.to_vec()))
            }
            Debtor::Amqp(participant) => {
                let content_type = if path.contains("iso20022") {
                    "application/xml"
                } else {
                    "application/json"
                };
                let answer = participant
                    .request(method, path, body, content_type, Duration::from_secs(60))
                    .await
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                Ok((answer.status, answer.body))
            }
        }
    }
}

/// Imports the participants' broker users, then connects each as a debtor agent (retried
/// until the switch has declared its queues, up to 30 s).
async fn amqp_debtors(
    op: &SignedClient,
    rabbit: &clearhouse_amqp::testing::Rabbit,
    banks: &[(String, String)],
) -> anyhow::Result<Vec<Debtor>> {
    let (status, definitions) = call(op, "GET", "/v1/admin/amqp/definitions", &Value::Null).await?;
    if status != 200 {
        bail!("broker definitions: {status} {definitions}");
    }
    rabbit
        .import(&definitions)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let url = rabbit.url();
    let mut debtors = Vec::with_capacity(banks.len());
    for (bic, secret) in banks {
        let secret = hex::decode(secret)?;
        let started = Instant::now();
        let participant = loop {
            match clearhouse_amqp::client::AmqpParticipant::connect(&url, bic, &secret).await {
                Ok(participant) => break participant,
                Err(error) if started.elapsed() > Duration::from_secs(30) => {
                    bail!("{bic} on the broker: {error}")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        };
        debtors.push(Debtor::Amqp(Box::new(participant)));
    }
    // The simulated creditor agents reconnect every 500 ms: give them that before the load.
    tokio::time::sleep(Duration::from_secs(2)).await;
    Ok(debtors)
}

#[derive(Default)]
struct Tally {
    latencies: Vec<Duration>,
    settled: u64,
    rejected: std::collections::BTreeMap<String, u64>,
    errors: std::collections::BTreeMap<u16, u64>,
}

async fn drive(
    args: &PaymentsArgs,
    switch: &Service,
    sim: &Service,
    switch_dir: &Path,
    banks: &[(String, String)],
    progress: bool,
    rabbit: Option<&clearhouse_amqp::testing::Rabbit>,
) -> anyhow::Result<Value> {
    let op = operator_client(switch_dir, &switch.url)?;
    let endpoint = |bic: &str| match rabbit {
        Some(_) => clearhouse_switch::model::AMQP_ENDPOINT.to_string(),
        None => format!("{}/bank/{bic}", sim.url),
    };
    const FUNDING: &str = "1000000000.00";
    for (bic, secret) in banks {
        let (status, body) = call(
            &op,
            "POST",
            "/v1/admin/participants",
            &json!({
                "bic": bic, "name": format!("Simulated bank {bic}"), "endpoint": endpoint(bic),
                "currencies": {"EUR": {"model": "prefunded"}}, "secret_hex": secret,
            }),
        )
        .await?;
        if status != 201 {
            bail!("onboarding {bic}: {status} {body}");
        }
        let (status, body) = call(&op, "POST", &format!("/v1/admin/participants/{bic}/liquidity"), &json!({
            "request_id": "initial-funding", "currency": "EUR", "amount": FUNDING, "direction": "in"
        })).await?;
        if status != 200 {
            bail!("funding {bic}: {status} {body}");
        }
    }
    if progress {
        eprintln!(
            "{} participants onboarded and funded; sending payments from {} connections...",
            banks.len(),
            args.clients
        );
    }
    let clients: Vec<Debtor> = match rabbit {
        None => banks
            .iter()
            .map(|(bic, secret)| {
                Debtor::Http(op.with_key(&format!("{bic}-1"), hex::decode(secret).expect("hex")))
            })
            .collect(),
        Some(rabbit) => amqp_debtors(&op, rabbit, banks).await?,
    };
    let clients = Arc::new(clients);
    let tally = Arc::new(Mutex::new(Tally::default()));
    let remaining = Arc::new(AtomicU64::new(args.payments));
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let stop_at = (args.seconds > 0).then(|| started + Duration::from_secs(args.seconds));
    let cpu_of = || {
        [
            switch.cpu_seconds(),
            sim.cpu_seconds(),
            cpu_seconds_of("/proc/self/stat"),
        ]
    };
    let cpu_before = cpu_of();
    let threads_before = switch.cpu_seconds_by_thread();
    let ledger_dir = switch_dir.join("ledger");
    let disk_before = disk_bytes(&ledger_dir);
    // The current sample interval's latencies (only when sampling).
    let sampling = args.sample_seconds > 0;
    let sampled: Arc<Mutex<Vec<Duration>>> = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    let clients_count = args.clients;
    let ticks_from = tokio::time::Instant::now();
    for worker in 0..args.clients {
        let sampled = sampled.clone();
        let clients = clients.clone();
        let tally = tally.clone();
        let remaining = remaining.clone();
        let done = done.clone();
        let mut rng = Rng::new(args.seed ^ (worker as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let xml = args.xml;
        let interval = (args.rate > 0)
            .then(|| Duration::from_secs_f64(args.clients as f64 / args.rate as f64));
        tasks.push(tokio::spawn(async move {
            let mut local = Tally::default();
            // Each client's ticks are offset by its share of the interval, so the offered
            // payments arrive evenly spaced (one every 0.5 ms at 2,000/s), not as a burst of
            // every client at once each interval, which no scheme's independent senders make.
            let phase = interval.map(|i| i * worker as u32 / clients_count.max(1) as u32);
            let mut ticker = interval.zip(phase).map(|(i, phase)| {
                let mut t = tokio::time::interval_at(ticks_from + phase, i);
                t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                t
            });
            let mut sequence = 0u64;
            loop {
                if stop_at.is_some_and(|at| Instant::now() >= at) {
                    break;
                }
                if remaining
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                    .is_err()
                {
                    break;
                }
                if let Some(t) = ticker.as_mut() {
                    t.tick().await;
                }
                let n = clients.len() as u64;
                let debtor = rng.below(n) as usize;
                let mut creditor = rng.below(n) as usize;
                if creditor == debtor {
                    creditor = (creditor + 1) % clients.len();
                }
                let debtor_bic = bic_of(debtor);
                sequence += 1;
                let cents = 1 + rng.below(100_000);
                let instruction = format!("W{worker}-{sequence}");
                let amount = format!("{}.{:02}", cents / 100, cents % 100);
                let (path, body) = if xml {
                    (
                        "/v1/iso20022/pacs.008",
                        pacs008(
                            &instruction,
                            &debtor_bic,
                            &bic_of(creditor),
                            &amount,
                            debtor,
                            creditor,
                        ),
                    )
                } else {
                    (
                        "/v1/payments",
                        json!({
                            "instruction_id": instruction,
                            "end_to_end_id": format!("E2E-{instruction}"),
                            "debtor_agent": debtor_bic, "creditor_agent": bic_of(creditor),
                            "amount": amount, "currency": "EUR",
                            "debtor": {"name": "Payer", "account": format!("ACC{debtor}")},
                            "creditor": {"name": "Payee", "account": format!("ACC{creditor}")},
                        })
                        .to_string(),
                    )
                };
                let sent = Instant::now();
                let answer = clients[debtor].request("POST", path, body.as_bytes()).await;
                match answer {
                    Ok((200, bytes)) => {
                        let latency = sent.elapsed();
                        local.latencies.push(latency);
                        if sampling {
                            sampled.lock().expect("samples").push(latency);
                        }
                        let view: Value = if xml {
                            pacs002_view(&bytes)
                        } else {
                            serde_json::from_slice(&bytes).unwrap_or(Value::Null)
                        };
                        match view["status"].as_str() {
                            Some("ACSC") => local.settled += 1,
                            _ => {
                                *local
                                    .rejected
                                    .entry(view["reason"].as_str().unwrap_or("?").to_string())
                                    .or_default() += 1
                            }
                        }
                    }
                    Ok((status, _)) => *local.errors.entry(status).or_default() += 1,
                    Err(_) => *local.errors.entry(0).or_default() += 1,
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
            let mut t = tally.lock().expect("tally");
            t.latencies.extend(local.latencies);
            t.settled += local.settled;
            for (k, v) in local.rejected {
                *t.rejected.entry(k).or_default() += v;
            }
            for (k, v) in local.errors {
                *t.errors.entry(k).or_default() += v;
            }
        }));
    }
    let reporter = {
        let done = done.clone();
        tokio::spawn(async move {
            let mut last = 0;
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            loop {
                tick.tick().await;
                let now = done.load(Ordering::Relaxed);
                if progress {
                    eprintln!(
                        "  {:>5.0} s  {:>9} payments  {:>7} /s",
                        started.elapsed().as_secs_f64(),
                        now,
                        now - last
                    );
                }
                last = now;
            }
        })
    };
    // Windows close on a schedule while the load runs (a scheme's day has many).
    let closed_windows: Arc<Mutex<Vec<Value>>> = Arc::new(Mutex::new(Vec::new()));
    let closer = (args.window_seconds > 0).then(|| {
        let (op, closed_windows) = (op.clone(), closed_windows.clone());
        let every = Duration::from_secs(args.window_seconds);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                let closing = Instant::now();
                match call(
                    &op,
                    "POST",
                    "/v1/admin/windows/close",
                    &json!({"settle": true}),
                )
                .await
                {
                    Ok((200, window)) => closed_windows.lock().expect("windows").push(json!({
                        "window": window["window"],
                        "state": window["state"],
                        "payments": window["plan"]["figures"][0]["transfers"],
                        "close_settle_reconcile_ms": closing.elapsed().as_secs_f64() * 1000.0,
                        "reconciliation_breaks": window["breaks"].as_array().map_or(0, |b| b.len()),
                    })),
                    Ok((status, body)) => eprintln!("closing a window: {status} {body}"),
                    Err(error) => eprintln!("closing a window: {error}"),
                }
            }
        })
    });
    // Samples: RSS, hot store and archive bytes, the interval's latency percentiles.
    let samples: Arc<Mutex<Vec<Value>>> = Arc::new(Mutex::new(Vec::new()));
    let sampler = sampling.then(|| {
        let (samples, sampled, done) = (samples.clone(), sampled.clone(), done.clone());
        let every = Duration::from_secs(args.sample_seconds);
        let (pid, ledger_dir, archive_dir) = (
            switch.child.id(),
            ledger_dir.clone(),
            switch_dir.join("archive"),
        );
        let switch_url = switch.url.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                let mut latencies = std::mem::take(&mut *sampled.lock().expect("samples"));
                latencies.sort_unstable();
                let payments = done.load(Ordering::Relaxed);
                let hot = disk_bytes(&ledger_dir);
                let url = switch_url.clone();
                // From /metrics: how far retention has pruned, and how far the index is behind
                // the journal (records acknowledged but not indexed yet).
                let metrics = tokio::task::spawn_blocking(move || {
                    crate::ha_demo::get(&url, "/metrics").map(|(_, text)| text)
                })
                .await
                .ok()
                .flatten()
                .unwrap_or_default();
                let gauge = |name: &str| {
                    metrics
                        .lines()
                        .find_map(|l| l.strip_prefix(name))
                        .and_then(|v| v.trim().parse::<u64>().ok())
                };
                let pruned = gauge("clearhouse_retention_pruned_through_window ");
                let index_lag = gauge("clearhouse_index_lag_records ");
                let row = json!({
                    "seconds": started.elapsed().as_secs(),
                    "payments": payments,
                    "interval_payments": latencies.len(),
                    "latency_ms": {
                        "p50": percentile_ms(&latencies, 50),
                        "p99": percentile_ms(&latencies, 99),
                        "p999": percentile_p1000(&latencies, 999),
                        "max": percentile_ms(&latencies, 100),
                    },
                    "switch_rss_bytes": rss_bytes(pid),
                    "hot_store_bytes": hot,
                    "hot_bytes_per_payment": hot.saturating_sub(disk_before).checked_div(payments).unwrap_or(0),
                    "archive_bytes": disk_bytes(&archive_dir),
                    "pruned_through_window": pruned,
                    "index_lag_records": index_lag,
                });
                if progress {
                    eprintln!(
                        "  sample {:>5} s: {:>9} payments, p50 {} p99 {} p99.9 {} max {} ms, RSS {} MB, hot store {} MB, archive {} MB, pruned through window {}",
                        row["seconds"], payments, row["latency_ms"]["p50"], row["latency_ms"]["p99"],
                        row["latency_ms"]["p999"], row["latency_ms"]["max"],
                        row["switch_rss_bytes"].as_u64().unwrap_or(0) / 1_000_000,
                        hot / 1_000_000,
                        row["archive_bytes"].as_u64().unwrap_or(0) / 1_000_000,
                        pruned.map_or("-".to_string(), |w| w.to_string()),
                    );
                }
                samples.lock().expect("samples").push(row);
            }
        })
    });
    for task in tasks {
        task.await?;
    }
    reporter.abort();
    if let Some(closer) = closer {
        closer.abort();
    }
    if let Some(sampler) = sampler {
        sampler.abort();
    }
    let elapsed = started.elapsed();
    let cpu_after = cpu_of();
    let threads_after = switch.cpu_seconds_by_thread();
    let tally = std::mem::take(&mut *tally.lock().expect("tally"));
    let total = tally.settled + tally.rejected.values().sum::<u64>();
    // Books: payments only move money between positions, so they still sum to what was funded.
    let mut sum: i128 = 0;
    for (bic, _) in banks {
        let (status, positions) = call(
            &op,
            "GET",
            &format!("/v1/participants/{bic}/positions"),
            &Value::Null,
        )
        .await?;
        if status != 200 {
            bail!("positions of {bic}: {status}");
        }
        sum += parse_minor(positions[0]["balance"].as_str().unwrap_or("0"));
    }
    let funded = parse_minor(FUNDING) * banks.len() as i128;
    let (_, stats) = call(&op, "GET", "/v1/stats", &Value::Null).await?;
    // Clearing: close the window the traffic ran in (cut-over, signed checkpoint, netting,
    // settlement, reconciliation) and report it.
    let closing = Instant::now();
    let (status, window) = call(
        &op,
        "POST",
        "/v1/admin/windows/close",
        &json!({"settle": true}),
    )
    .await?;
    if status != 200 {
        bail!("closing the window: {status} {window}");
    }
    let close_ms = closing.elapsed().as_secs_f64() * 1000.0;
    // Disk: what the load added under the ledger (journal + index), after the window close (which
    // waits for the index to catch up).
    let disk_after = disk_bytes(&ledger_dir);
    let per_1000 = |before: f64, after: f64| {
        if total > 0 {
            ((after - before) * 1000.0 / total as f64 * 1000.0).round() / 1000.0
        } else {
            0.0
        }
    };
    let cpu_total = |cpu: [f64; 3]| cpu.iter().sum::<f64>();
    let figures = &window["plan"]["figures"][0];
    let mut latencies = tally.latencies;
    latencies.sort_unstable();
    Ok(json!({
        "workload": if args.xml { "P1 (ISO 20022 pacs.008 in, pacs.002 out)" } else { "P1 (JSON)" },
        "machine": machine(),
        "participants": banks.len(),
        "clients": args.clients,
        "offered_rate": args.rate,
        "payments": total,
        "seconds": elapsed.as_secs_f64(),
        "settled": tally.settled,
        "settled_per_second": tally.settled as f64 / elapsed.as_secs_f64(),
        "rejected_by_reason": tally.rejected,
        "http_errors_by_status": tally.errors,
        "latency_ms": {
            "p50": percentile_ms(&latencies, 50),
            "p99": percentile_ms(&latencies, 99),
            "p999": percentile_p1000(&latencies, 999),
            "max": percentile_ms(&latencies, 100),
        },
        "cpu_seconds_per_1000": per_1000(cpu_total(cpu_before), cpu_total(cpu_after)),
        "cpu_seconds_per_1000_by_process": {
            "switch": per_1000(cpu_before[0], cpu_after[0]),
            "banks": per_1000(cpu_before[1], cpu_after[1]),
            "load_generator": per_1000(cpu_before[2], cpu_after[2]),
        },
        "switch_cpu_seconds_per_1000_by_thread": threads_after
            .iter()
            .map(|(name, after)| {
                let before = threads_before.get(name).copied().unwrap_or(0.0);
                (name.clone(), json!(per_1000(before, *after)))
            })
            .collect::<serde_json::Map<String, Value>>(),
        "disk_bytes_per_payment": disk_after.saturating_sub(disk_before).checked_div(tally.settled).unwrap_or(0),
        "ledger_disk_bytes": disk_after,
        "books_balance": sum == funded,
        "switch_stats": stats,
        "window": {
            "window": window["window"],
            "state": window["state"],
            "transfers": figures["transfers"],
            "gross_minor_units": figures["gross_minor_units"],
            "net_minor_units": figures["net_minor_units"],
            "netting_efficiency_bp": figures["netting_efficiency_bp"],
            "checkpoint_voucher": window["checkpoint"]["seq"],
            "reconciliation_breaks": window["breaks"].as_array().map_or(0, |b| b.len()),
            "close_settle_reconcile_ms": close_ms,
        },
        "samples": std::mem::take(&mut *samples.lock().expect("samples")),
        "windows_closed_during_load": std::mem::take(&mut *closed_windows.lock().expect("windows")),
        "signed_requests": true,
        "durability": "every reservation and final state fsynced (group commit) before it is answered",
    }))
}

/// Resident memory of a process (VmRSS), bytes; 0 if unknown.
fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

fn percentile_p1000(sorted: &[Duration], p: u64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((sorted.len() as u64 - 1) * p).div_ceil(1000) as usize;
    (sorted[rank].as_micros() as f64 / 1000.0 * 1000.0).round() / 1000.0
}

/// A one-transaction pacs.008 from the load generator.
fn pacs008(
    instruction: &str,
    debtor_bic: &str,
    creditor_bic: &str,
    amount: &str,
    debtor: usize,
    creditor: usize,
) -> String {
    use clearhouse_iso20022::messages::{Account, Agent};
    clearhouse_iso20022::Pacs008 {
        message_id: format!("M-{instruction}"),
        creation: clearhouse_iso20022::time::date_time(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0),
        ),
        number_of_transactions: "1".into(),
        settlement_method: "CLRG".into(),
        clearing_system: None,
        transactions: vec![clearhouse_iso20022::CreditTransfer {
            instruction_id: Some(instruction.to_string()),
            end_to_end_id: format!("E2E-{instruction}"),
            amount: amount.to_string(),
            currency: "EUR".into(),
            charge_bearer: "SLEV".into(),
            debtor_name: Some("Payer".into()),
            debtor_account: Some(Account {
                iban: None,
                other_id: Some(format!("ACC{debtor}")),
            }),
            debtor_agent: Agent {
                bic: Some(debtor_bic.to_string()),
                ..Agent::default()
            },
            creditor_agent: Agent {
                bic: Some(creditor_bic.to_string()),
                ..Agent::default()
            },
            creditor_name: Some("Payee".into()),
            creditor_account: Some(Account {
                iban: None,
                other_id: Some(format!("ACC{creditor}")),
            }),
            ..clearhouse_iso20022::CreditTransfer::default()
        }],
    }
    .to_xml()
}

/// The status and reason of a pacs.002 answer, as the JSON view's fields.
fn pacs002_view(bytes: &[u8]) -> Value {
    match clearhouse_iso20022::Message::parse(bytes, &clearhouse_iso20022::Limits::default()) {
        Ok(clearhouse_iso20022::Message::Pacs002(report)) => {
            json!({"status": report.status, "reason": report.reason})
        }
        _ => Value::Null,
    }
}
