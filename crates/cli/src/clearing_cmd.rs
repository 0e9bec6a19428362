//! `verify`, `export-vouchers` and `bench clearing` (workload C1 of shared/bench/WORKLOAD.md).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use clearhouse_clearing::event::VoucherEvent;
use clearhouse_clearing::export::verify_export;
use clearhouse_engine::{Node, RecordPut};
use clearhouse_ledger::Transfer;
use clearhouse_switch::model::{position_account, TRANSFER_CODE_PAYMENT};
use clearhouse_switch::switch::{OnboardRequest, TermsRequest};
use clearhouse_switch::{Caller, Switch, SwitchConfig};
use ed25519_dalek::VerifyingKey;
use serde_json::json;

use crate::common::{data_dir, machine, percent_of_bp, switch_node_options, Progress};
use crate::workload::Rng;

#[derive(clap::Args)]
pub struct VerifyArgs {
    /// Verify a stopped server's data directory in place.
    #[arg(long, conflicts_with = "export")]
    data_dir: Option<PathBuf>,
    /// Verify an export file (from `clearhouse export-vouchers`).
    #[arg(long)]
    export: Option<PathBuf>,
    /// With --data-dir after retention: the Parquet archive directory; its files up to the
    /// pruned horizon are read back and verified first, so the whole chain is verified, from the
    /// first voucher through the hot part (without it, the hot part is verified from the signed
    /// checkpoint it is anchored at).
    #[arg(long, requires = "data_dir")]
    archive: Option<PathBuf>,
    /// The operator's Ed25519 public key (64 hex digits) to trust; default: the key file
    /// operator-ed25519.pub of --data-dir (for an export without it: the key inside the export,
    /// reported so you can compare it with the one you trust).
    #[arg(long)]
    public_key: Option<String>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

fn parse_key(hex_text: &str) -> anyhow::Result<VerifyingKey> {
    let bytes: [u8; 32] = hex::decode(hex_text.trim())
        .ok()
        .and_then(|b| b.try_into().ok())
        .context("a public key is 64 hex digits")?;
    VerifyingKey::from_bytes(&bytes).context("not an Ed25519 public key")
}

/// Exit codes: 0 the chain and every checkpoint hold; 1 they do not (the message names the first
/// voucher or checkpoint that fails); 2 the input could not be read.
pub fn verify(args: VerifyArgs) -> anyhow::Result<()> {
    match verify_inner(args) {
        Ok(()) => Ok(()),
        Err(error) => {
            eprintln!("clearhouse verify: cannot read the input: {error:#}");
            std::process::exit(2);
        }
    }
}

fn verify_inner(args: VerifyArgs) -> anyhow::Result<()> {
    let trusted = match (&args.public_key, &args.data_dir) {
        (Some(text), _) => Some(parse_key(text)?),
        (None, Some(dir)) => {
            let path = dir.join("operator-ed25519.pub");
            Some(parse_key(
                &std::fs::read_to_string(&path)
                    .with_context(|| format!("reading {}", path.display()))?,
            )?)
        }
        (None, None) => None,
    };
    let started = Instant::now();
    let result = match (&args.data_dir, &args.export) {
        (Some(dir), None) => {
            if !dir.join("ledger").exists() {
                eprintln!("clearhouse verify: {} has no ledger", dir.display());
                std::process::exit(2);
            }
            let node = match Node::start(switch_node_options(dir)) {
                Ok(node) => node,
                // A record whose checksum fails in the middle of the journal was altered (or
                // damaged) after it was written: that is a failed verification, not "unreadable".
                Err(clearhouse_engine::EngineError::Journal(
                    error @ clearhouse_journal::JournalError::Corrupt { .. },
                )) => {
                    eprintln!(
                        "clearhouse verify: FAILED: the journal was altered or damaged after it was written: {error}; the vouchers of that record cannot be trusted"
                    );
                    std::process::exit(1);
                }
                Err(error) => return Err(error).context("opening the data directory"),
            };
            let key = trusted.expect("a data directory has its key");
            let archived = match &args.archive {
                None => None,
                Some(dir) => {
                    let state = clearhouse_switch::clearing::retention_state_of(&node)
                        .map_err(|e| anyhow::anyhow!("{e}"))?;
                    let mut progress =
                        Progress::new("verify archive", state.pruned_through, "windows");
                    let mut verifier = None;
                    for window in 1..=state.pruned_through {
                        let path = dir.join(clearhouse_export::archive::file_name(window));
                        match clearhouse_export::archive::read_window(&path, &key, verifier.take())
                        {
                            Ok(read) => verifier = Some(read.verifier),
                            Err(error) => {
                                eprintln!("clearhouse verify: FAILED: the archive: {error}");
                                std::process::exit(1);
                            }
                        }
                        progress.update(window);
                    }
                    progress.finish();
                    verifier
                }
            };
            let mut progress = Progress::new("verify", 0, "vouchers");
            let result =
                clearhouse_switch::clearing::verify_data_dir(&node, &key, archived, |done| {
                    progress.total = progress.total.max(done);
                    progress.update(done)
                });
            progress.finish();
            result
        }
        (None, Some(file)) => {
            let size = std::fs::metadata(file)
                .with_context(|| format!("reading {}", file.display()))?
                .len();
            let input =
                std::fs::File::open(file).with_context(|| format!("reading {}", file.display()))?;
            let mut progress = Progress::new("verify", size, "bytes");
            let result = verify_export(input, trusted.as_ref(), |done| progress.update(done));
            progress.finish();
            result
        }
        _ => bail!("give --data-dir or --export"),
    };
    match result {
        Ok(report) => {
            if args.json {
                let mut value = serde_json::to_value(&report)?;
                value["seconds"] = json!(started.elapsed().as_secs_f64());
                println!("{value}");
            } else {
                println!(
                    "verified: {} vouchers chained, {} signed checkpoints (last at voucher {}), head {} ; {} vouchers after the last checkpoint are chained but not signed yet; operator key {}{}",
                    report.vouchers,
                    report.checkpoints,
                    report.last_checkpoint_seq,
                    report.head_hash,
                    report.unsigned_tail,
                    report.public_key,
                    if trusted.is_none() { " (taken from the export: compare it with the key you trust)" } else { "" }
                );
                if report.anchored_at > 0 {
                    println!(
                        "vouchers 1 to {} are archived: the hot part was verified from the signed checkpoint at voucher {} (give --archive DIR to verify the whole chain)",
                        report.anchored_at, report.anchored_at
                    );
                }
            }
            Ok(())
        }
        Err(error) => {
            eprintln!("clearhouse verify: FAILED: {error}");
            std::process::exit(1);
        }
    }
}

#[derive(clap::Args)]
pub struct ExportArgs {
    /// The data directory of a stopped server.
    #[arg(long)]
    data_dir: PathBuf,
    /// The export file to write.
    #[arg(long)]
    out: PathBuf,
}

pub fn export(args: ExportArgs) -> anyhow::Result<()> {
    let key_path = args.data_dir.join("operator-ed25519.pub");
    let key = parse_key(
        &std::fs::read_to_string(&key_path)
            .with_context(|| format!("reading {}", key_path.display()))?,
    )?;
    let node =
        Node::start(switch_node_options(&args.data_dir)).context("opening the data directory")?;
    let file = std::fs::File::create(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let mut progress = Progress::new("export", 0, "vouchers");
    let (writer, vouchers, checkpoints) = clearhouse_switch::clearing::export_vouchers(
        &node,
        &key,
        std::io::BufWriter::new(file),
        |done| {
            progress.total = progress.total.max(done);
            progress.update(done)
        },
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    progress.finish();
    writer
        .into_inner()
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .sync_all()?;
    println!(
        "exported {vouchers} vouchers and {checkpoints} checkpoints to {}",
        args.out.display()
    );
    Ok(())
}

#[derive(clap::Args)]
pub struct ClearingBenchArgs {
    /// Settled payments in the window.
    #[arg(long, default_value_t = 1_000_000)]
    payments: u64,
    /// Participants (all deferred net settlement, EUR).
    #[arg(long, default_value_t = 100)]
    participants: u32,
    /// Data directory (default: a fresh temporary directory under the current one).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// A BIC for participant `i`: four letters from `i`, then DEFF.
fn bic(i: u32) -> String {
    let mut letters = [b'A'; 4];
    let mut n = i;
    for slot in letters.iter_mut().rev() {
        *slot = b'A' + (n % 26) as u8;
        n /= 26;
    }
    format!("{}DEFF", String::from_utf8_lossy(&letters))
}

/// Payments per load batch: about 700 bytes each in the journal, whose records hold at most 1 MiB.
const LOAD_BATCH: usize = 1_000;

/// Workload C1: one window of N settled payments over P participants, then close, settle,
/// reconcile, statements, export and verify, each timed.
///
/// The payments are loaded straight into the engine as settled payments (a ledger transfer
/// between the two positions, the payment's voucher, and the window's commit-time accumulator
/// update, exactly what the switch's settle step writes), not through the HTTP lifecycle, which
/// workload P1 measures.
pub fn bench(args: ClearingBenchArgs) -> anyhow::Result<()> {
    if args.participants < 2 {
        bail!("--participants must be at least 2");
    }
    let (dir, _temp) = data_dir(&args.data_dir)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let report = runtime.block_on(async {
        let node = Node::start(switch_node_options(&dir)).context("starting the node")?;
        let switch = Switch::start(node.clone(), SwitchConfig::default(), &dir)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let bics: Vec<String> = (0..args.participants).map(bic).collect();
        for b in &bics {
            let mut currencies = BTreeMap::new();
            currencies.insert(
                "EUR".to_string(),
                TermsRequest {
                    model: clearhouse_switch::model::SettlementModel::DeferredNet,
                    net_debit_cap: Some("1000000000000.00".into()),
                    per_payment_max: None,
                    liquidity_alert_below: None,
                },
            );
            switch
                .onboard(OnboardRequest {
                    bic: b.clone(),
                    name: format!("Bank {b}"),
                    endpoint: "http://127.0.0.1:9".into(),
                    currencies,
                    secret_hex: None,
                    routing_number: None,
                })
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        // Load the window.
        let loading = Instant::now();
        let mut rng = Rng::new(args.seed);
        let mut progress = Progress::new("load", args.payments, "payments");
        let mut loaded = 0u64;
        let mut gross = 0u128;
        while loaded < args.payments {
            let count = (args.payments - loaded).min(LOAD_BATCH as u64) as usize;
            let mut transfers = Vec::with_capacity(count);
            let mut records = Vec::with_capacity(count);
            let mut moves = Vec::with_capacity(count);
            for i in 0..count {
                let n = loaded + i as u64;
                let from = (rng.next_u64() % args.participants as u64) as u32;
                let to = (from + 1 + (rng.next_u64() % (args.participants as u64 - 1)) as u32)
                    % args.participants;
                let amount = 1 + u128::from(rng.next_u64() % 100_000);
                gross += amount;
                let (payer, payee) = (bics[from as usize].clone(), bics[to as usize].clone());
                // Keyed as the switch keys its payments (acceptance time first), so the index
                // sees the same insert order as under real traffic.
                let id = clearhouse_switch::model::payment_key(
                    clearhouse_switch::clock::now_ns(),
                    &payer,
                    &format!("C1-{n}"),
                );
                transfers.push(Transfer {
                    id,
                    debit_account_id: position_account(&payer, "EUR"),
                    credit_account_id: position_account(&payee, "EUR"),
                    amount,
                    ledger: 978,
                    code: TRANSFER_CODE_PAYMENT,
                    ..Transfer::default()
                });
                let event = VoucherEvent::PaymentSettled {
                    payment: format!("{id:032x}"),
                    uetr: clearhouse_switch::model::new_uetr(),
                    end_to_end_id: format!("C1-{n}"),
                    debtor_agent: payer.clone(),
                    creditor_agent: payee.clone(),
                    currency: "EUR".into(),
                    amount,
                    at_ns: clearhouse_switch::clock::now_ns(),
                };
                let body = event.to_bytes();
                records.push(RecordPut {
                    key: id,
                    value: body.clone(),
                    when_transfer_ok: Some(i as u32),
                    voucher: Some(body),
                    ..RecordPut::default()
                });
                moves.push((payer, payee, amount));
            }
            let counter = switch.clearing.counter();
            let outcome = clearhouse_switch::engine_io::submit_then(
                &node,
                transfers,
                records,
                move |outcome| {
                    for ((payer, payee, amount), written) in moves.iter().zip(&outcome.written) {
                        if *written {
                            counter(payer, payee, "EUR", *amount);
                        }
                    }
                },
            )
            .await?;
            if let Some(bad) = outcome.written.iter().position(|w| !w) {
                bail!(
                    "payment {bad} of a load batch failed: {:?}",
                    outcome.results[bad]
                );
            }
            loaded += count as u64;
            progress.update(loaded);
        }
        progress.finish();
        let load_seconds = loading.elapsed().as_secs_f64();
        let error = |e: clearhouse_switch::ApiError| anyhow::anyhow!("{e}");

        let started = Instant::now();
        let closed = switch
            .close_window(&Caller::Operator, false)
            .await
            .map_err(error)?;
        let close_ms = started.elapsed().as_secs_f64() * 1000.0;
        let started = Instant::now();
        let settled = switch
            .clearing
            .settle_only(closed.window)
            .await
            .map_err(error)?;
        let settle_ms = started.elapsed().as_secs_f64() * 1000.0;
        // Reconciliation reads the window's vouchers from the index, which is still catching up
        // with the load (close and settle never wait for it): time that apart.
        let started = Instant::now();
        {
            let node = node.clone();
            tokio::task::spawn_blocking(move || node.vouchers(u64::MAX, 1)).await??;
        }
        let index_catch_up_ms = started.elapsed().as_secs_f64() * 1000.0;
        let started = Instant::now();
        let reconciled = switch
            .clearing
            .reconcile(closed.window, settled)
            .await
            .map_err(error)?;
        let reconcile_ms = started.elapsed().as_secs_f64() * 1000.0;

        let started = Instant::now();
        let statements = switch
            .clearing
            .statements(closed.window)
            .await
            .map_err(error)?;
        let statements_dir = dir.join("statements");
        std::fs::create_dir_all(&statements_dir)?;
        let mut entries = 0usize;
        for statement in statements.iter() {
            entries += statement.entries.len();
            let path = statements_dir.join(format!(
                "window-{}-{}-{}.csv",
                statement.window, statement.participant, statement.currency
            ));
            let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
            statement.write_csv(&mut out)?;
            out.flush()?;
        }
        let statements_ms = started.elapsed().as_secs_f64() * 1000.0;

        let figures = reconciled
            .plan
            .as_ref()
            .and_then(|p| p.figures.first().cloned())
            .context("a plan with figures")?;
        if figures.gross != gross {
            bail!("window gross {} but {gross} was loaded", figures.gross);
        }
        drop(switch);
        Ok::<_, anyhow::Error>((
            node,
            json!({
                "workload": "C1",
                "payments": args.payments,
                "participants": args.participants,
                "load_seconds": load_seconds,
                "close_ms": close_ms,
                "settle_ms": settle_ms,
                "close_and_settle_ms": close_ms + settle_ms,
                "index_catch_up_ms": index_catch_up_ms,
                "reconcile_ms": reconcile_ms,
                "breaks": reconciled.breaks.len(),
                "statements": statements.len(),
                "statement_entries": entries,
                "statements_ms": statements_ms,
                // From the close command until every participant's statements are written:
                // what participants wait for.
                "window_cycle_ms": close_ms + settle_ms + index_catch_up_ms + reconcile_ms + statements_ms,
                "instructions": reconciled.plan.as_ref().map_or(0, |p| p.instructions.len()),
                "gross_minor_units": figures.gross.to_string(),
                "net_minor_units": figures.net.to_string(),
                "netting_efficiency_bp": figures.netting_efficiency_bp,
            }),
        ))
    });
    let (node, mut report) = report?;
    // Export and verify the whole chain (the load's vouchers, the close, the settlement).
    let key = parse_key(&std::fs::read_to_string(dir.join("operator-ed25519.pub"))?)?;
    let export_path = dir.join("vouchers.export");
    let started = Instant::now();
    let (writer, vouchers, _) = clearhouse_switch::clearing::export_vouchers(
        &node,
        &key,
        std::io::BufWriter::new(std::fs::File::create(&export_path)?),
        |_| {},
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    writer.into_inner().map_err(|e| anyhow::anyhow!("{e}"))?;
    let export_ms = started.elapsed().as_secs_f64() * 1000.0;
    let started = Instant::now();
    let verified = verify_export(std::fs::File::open(&export_path)?, Some(&key), |_| {})?;
    let verify_ms = started.elapsed().as_secs_f64() * 1000.0;
    let started = Instant::now();
    let in_place = clearhouse_switch::clearing::verify_data_dir(&node, &key, None, |_| {})?;
    let verify_data_dir_ms = started.elapsed().as_secs_f64() * 1000.0;
    assert_eq!(verified.vouchers, vouchers);
    assert_eq!(in_place.vouchers, vouchers);
    report["vouchers"] = json!(vouchers);
    report["export_ms"] = json!(export_ms);
    report["verify_export_ms"] = json!(verify_ms);
    report["verify_data_dir_ms"] = json!(verify_data_dir_ms);
    report["machine"] = json!(machine());
    drop(node);
    if args.json {
        println!("{report}");
    } else {
        println!(
            "C1: {} payments over {} participants (loaded in {:.1} s)\n  whole window cycle {:.0} ms (close, settle, index catch-up, reconcile, every participant's statements)\n  close {:.1} ms + settle {:.1} ms = {:.1} ms ({} instructions, netting efficiency {})\n  index catch-up after the load {:.0} ms, reconcile and build every statement {:.0} ms ({} breaks)\n  statements as CSV {:.0} ms ({} statements, {} entries)\n  export {:.0} ms, verify {:.0} ms ({} vouchers), verify in place {:.0} ms\n  machine: {}",
            report["payments"], report["participants"], report["load_seconds"].as_f64().unwrap_or(0.0),
            report["window_cycle_ms"].as_f64().unwrap_or(0.0),
            report["close_ms"].as_f64().unwrap_or(0.0), report["settle_ms"].as_f64().unwrap_or(0.0),
            report["close_and_settle_ms"].as_f64().unwrap_or(0.0), report["instructions"],
            percent_of_bp(report["netting_efficiency_bp"].as_u64().unwrap_or(0)),
            report["index_catch_up_ms"].as_f64().unwrap_or(0.0),
            report["reconcile_ms"].as_f64().unwrap_or(0.0), report["breaks"],
            report["statements_ms"].as_f64().unwrap_or(0.0), report["statements"], report["statement_entries"],
            export_ms, verify_ms, vouchers, verify_data_dir_ms, report["machine"].as_str().unwrap_or("")
        );
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct ReconcileArgs {
    /// The switch's base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// The operator key file (`<key id> <hex secret>`).
    #[arg(long, default_value = "data/operator.key")]
    key_file: PathBuf,
    /// The participant whose movements the statement shows.
    #[arg(long)]
    participant: String,
    /// The closed settlement window to reconcile.
    #[arg(long)]
    window: u64,
    /// The statement: camt.053, camt.054 (XML) or CSV (header with amount, currency, direction,
    /// and optionally uetr, end_to_end_id, status; amounts in minor units).
    #[arg(long)]
    statement: PathBuf,
    /// text, json or csv.
    #[arg(long, default_value = "text")]
    format: String,
}

/// The statement's lines, amounts in minor units.
fn statement_lines(path: &Path) -> anyhow::Result<Vec<clearhouse_clearing::reconcile::TheirLine>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'<') {
        let text = String::from_utf8(bytes).context("a CSV statement must be UTF-8")?;
        return clearhouse_clearing::reconcile::parse_csv(&text).map_err(|e| anyhow::anyhow!(e));
    }
    let limits = clearhouse_iso20022::Limits {
        bytes_max: 512 << 20,
        elements_max: 20_000_000,
        ..clearhouse_iso20022::Limits::default()
    };
    let report = clearhouse_iso20022::camt::CashReport::parse(&bytes, &limits)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let mut lines = Vec::new();
    for entry in report.reports.iter().flat_map(|r| &r.entries) {
        let position = lines.len() as u64 + 1;
        let currency = clearhouse_switch::money::currency(&entry.currency)
            .with_context(|| format!("entry {position}: unknown currency {}", entry.currency))?;
        lines.push(clearhouse_clearing::reconcile::TheirLine {
            position,
            uetr: entry.uetr.clone(),
            end_to_end_id: entry.end_to_end_id.clone(),
            amount: clearhouse_switch::money::parse_amount(&entry.amount, currency.exponent)
                .map_err(|e| anyhow::anyhow!("entry {position}: {e}"))?,
            currency: entry.currency.clone(),
            credit: entry.credit,
            status: match entry.status.as_str() {
                "BOOK" => "booked",
                "PDNG" => "pending",
                _ => "info",
            }
            .into(),
        });
    }
    Ok(lines)
}

/// What the switch's vouchers of `window` say about `participant`.
async fn our_lines(
    client: &clearhouse_switch::client::SignedClient,
    participant: &str,
    window: u64,
) -> anyhow::Result<Vec<clearhouse_clearing::reconcile::OurLine>> {
    let get = |path: String| async move {
        let (status, body) = client.request("GET", &path, b"").await?;
        let value: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        if status != 200 {
            bail!(
                "GET {path}: {status} {}",
                value["message"].as_str().unwrap_or("")
            );
        }
        Ok::<_, anyhow::Error>(value)
    };
    let closed_seq = |report: &serde_json::Value| report["checkpoint"]["seq"].as_u64();
    let report = get(format!("/v1/windows/{window}")).await?;
    let end = closed_seq(&report).with_context(|| format!("window {window} is not closed yet"))?;
    let start = if window == 1 {
        1
    } else {
        closed_seq(&get(format!("/v1/windows/{}", window - 1)).await?)
            .context("the previous window has no checkpoint")?
            + 1
    };
    let mut progress = Progress::new("vouchers", end + 1 - start, "read");
    let mut lines = Vec::new();
    // Carried amounts per adjusted window: (participant, currency) -> minor units.
    let mut carried: BTreeMap<u64, BTreeMap<(String, String), u128>> = BTreeMap::new();
    let mut from = start;
    while from <= end {
        let page = get(format!("/v1/vouchers?from={from}&limit=4096")).await?;
        let entries = page["entries"].as_array().cloned().unwrap_or_default();
        if entries.is_empty() {
            break;
        }
        for entry in &entries {
            let seq = entry["seq"].as_u64().unwrap_or(0);
            if seq > end {
                break;
            }
            from = seq + 1;
            let Some(body) = entry["body"].as_str() else {
                continue;
            };
            let event = VoucherEvent::parse(body.as_bytes()).map_err(|e| anyhow::anyhow!(e))?;
            use clearhouse_clearing::reconcile::OurLine;
            let line = |uetr: &str,
                        e2e: Option<&str>,
                        amount: u128,
                        currency: &str,
                        credit: bool,
                        status: &str| OurLine {
                voucher: seq,
                uetr: Some(uetr.to_string()),
                end_to_end_id: e2e.map(str::to_string),
                amount,
                currency: currency.to_string(),
                credit,
                status: status.to_string(),
            };
            match &event {
                VoucherEvent::PaymentSettled {
                    uetr,
                    end_to_end_id,
                    debtor_agent,
                    creditor_agent,
                    currency,
                    amount,
                    ..
                } if debtor_agent == participant || creditor_agent == participant => {
                    lines.push(line(
                        uetr,
                        Some(end_to_end_id),
                        *amount,
                        currency,
                        creditor_agent == participant,
                        "settled",
                    ));
                }
                VoucherEvent::PaymentRejected {
                    uetr,
                    debtor_agent,
                    creditor_agent,
                    currency,
                    amount,
                    ..
                } if debtor_agent == participant || creditor_agent == participant => {
                    lines.push(line(
                        uetr,
                        None,
                        *amount,
                        currency,
                        creditor_agent == participant,
                        "rejected",
                    ));
                }
                VoucherEvent::PaymentReturned {
                    original_uetr,
                    returning_agent,
                    receiving_agent,
                    currency,
                    amount,
                    ..
                } if returning_agent == participant || receiving_agent == participant => {
                    lines.push(line(
                        original_uetr,
                        None,
                        *amount,
                        currency,
                        receiving_agent == participant,
                        "settled",
                    ));
                }
                VoucherEvent::Liquidity {
                    participant: p,
                    currency,
                    direction,
                    amount,
                    ..
                } if p == participant => {
                    lines.push(OurLine {
                        voucher: seq,
                        uetr: None,
                        end_to_end_id: None,
                        amount: *amount,
                        currency: currency.clone(),
                        credit: direction == "in",
                        status: "settled".into(),
                    });
                }
                VoucherEvent::FundAdjustment {
                    window: adjusted,
                    participant: p,
                    currency,
                    net,
                } if p == participant => {
                    // As the ledger moved it: a net receiver's adjustment is its net less what
                    // was carried (the adjusted window's report says how much).
                    if !carried.contains_key(adjusted) {
                        let report = get(format!("/v1/windows/{adjusted}")).await?;
                        let mut amounts = BTreeMap::new();
                        for entry in report["carried_minor_units"]
                            .as_array()
                            .cloned()
                            .unwrap_or_default()
                        {
                            if let (Some(who), Some(code), Some(amount)) =
                                (entry[0].as_str(), entry[1].as_str(), entry[2].as_str())
                            {
                                let amount: u128 = amount.parse().with_context(|| {
                                    format!("window {adjusted}: carried amount {amount:?}")
                                })?;
                                amounts.insert((who.to_string(), code.to_string()), amount);
                            }
                        }
                        carried.insert(*adjusted, amounts);
                    }
                    let left = carried[adjusted]
                        .get(&(p.clone(), currency.clone()))
                        .copied()
                        .unwrap_or(0);
                    let moved = net
                        .unsigned_abs()
                        .saturating_sub(if *net > 0 { left } else { 0 });
                    if moved > 0 {
                        lines.push(OurLine {
                            voucher: seq,
                            uetr: None,
                            end_to_end_id: None,
                            amount: moved,
                            currency: currency.clone(),
                            credit: *net < 0,
                            status: "settled".into(),
                        });
                    }
                }
                _ => {}
            }
        }
        progress.update(from - start);
    }
    progress.finish();
    Ok(lines)
}

/// Exit codes: 0 the statement agrees with the switch, 1 it does not (the report lists every
/// difference), 2 an input could not be read or the switch refused.
pub fn reconcile(args: ReconcileArgs) -> anyhow::Result<()> {
    let outcome = (|| {
        let (key_id, secret) = crate::common::read_operator_key(&args.key_file)?;
        let client = clearhouse_switch::client::SignedClient::new(&args.url, &key_id, secret);
        let theirs = statement_lines(&args.statement)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let ours = runtime.block_on(our_lines(&client, &args.participant, args.window))?;
        let total = theirs.len() as u64;
        let mut progress = Progress::new("match", total, "lines");
        let report =
            clearhouse_clearing::reconcile::reconcile(ours, theirs, |n| progress.update(n));
        progress.finish();
        Ok::<_, anyhow::Error>(report)
    })();
    let report = match outcome {
        Ok(report) => report,
        Err(error) => {
            eprintln!("clearhouse reconcile: {error:#}");
            std::process::exit(2);
        }
    };
    match args.format.as_str() {
        "json" => println!("{}", json!({"summary": report.summary(), "report": report})),
        "csv" => print!("{}", report.to_csv()),
        _ => {
            println!(
                "window {} of {}: {} matched, {} in the switch but not in the statement, {} in the statement but not in the switch, {} mismatched",
                args.window,
                args.participant,
                report.matched.len(),
                report.missing_in_statement.len(),
                report.missing_in_switch.len(),
                report.mismatches.len()
            );
            for line in &report.missing_in_statement {
                println!(
                    "  missing in statement: voucher {} uetr {} {} {} {}",
                    line.voucher,
                    line.uetr.as_deref().unwrap_or("-"),
                    if line.credit { "credit" } else { "debit" },
                    line.amount,
                    line.currency
                );
            }
            for line in &report.missing_in_switch {
                println!(
                    "  missing in switch: statement line {} uetr {} {} {} {}",
                    line.position,
                    line.uetr.as_deref().unwrap_or("-"),
                    if line.credit { "credit" } else { "debit" },
                    line.amount,
                    line.currency
                );
            }
            for m in &report.mismatches {
                println!(
                    "  mismatch ({}): voucher {} vs statement line {}: {} {} {} vs {} {} {}",
                    m.fields,
                    m.ours.voucher,
                    m.theirs.position,
                    m.ours.amount,
                    if m.ours.credit { "credit" } else { "debit" },
                    m.ours.status,
                    m.theirs.amount,
                    if m.theirs.credit { "credit" } else { "debit" },
                    m.theirs.status
                );
            }
        }
    }
    if !report.is_clean() {
        std::process::exit(1);
    }
    Ok(())
}
