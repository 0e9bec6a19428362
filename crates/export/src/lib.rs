//! Exporters: follow the switch's voucher chain, in chain (journal) order, and feed each voucher
//! exactly once into a sink that banks' data, risk and finance teams already run:
//!
//! - [`postgres`]: a reporting mirror in PostgreSQL (documented tables, migrations in
//!   `crates/export/migrations`), each batch one transaction that also stores the last voucher
//!   applied;
//! - [`archive`]: a Parquet file per closed settlement window, written atomically;
//! - [`kafka`]: one topic per event kind on a Kafka-protocol broker, keyed by payment id, with
//!   the voucher's sequence and chain hash in headers.
//!
//! The [`Exporter`] reads pages of the chain from a [`Source`] (a running switch over its signed
//! API, or the switch in the same process), checks every voucher against the chain (each hash
//! recomputed from the previous one, each window checkpoint's signature), and hands bounded
//! batches to the [`Sink`]. Where to start is always read back from the sink itself, at start
//! and after every failure, never from a local counter: that, and each sink writing a batch all
//! or nothing (or, for Kafka, skipping what the broker already holds), is what makes it exactly
//! once across crashes of either side.
//!
//! What it deliberately does not do: it never writes to the switch and never blocks it (it only
//! reads committed vouchers; a sink that is down makes the exporter wait and retry, not the
//! payments); it does not transform amounts (minor units, as integers or decimals); it does not
//! run its own cluster of exporters: one exporter per sink (two would be refused by the sink's
//! own position check, see each sink).

pub mod archive;
pub mod kafka;
pub mod postgres;
pub mod retention;
pub mod source;

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use clearhouse_clearing::event::VoucherEvent;
use clearhouse_clearing::export::Checkpoint;
use clearhouse_engine::vouchers::{chain_hash, leaf_digest};
use clearhouse_switch::exports::ExportStatus;

pub use source::{HttpSource, LocalSource, Source, SourcePage};

/// Most vouchers handed to a sink at once.
pub const BATCH_MAX: usize = 4_096;

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The switch could not be read (down, refused, malformed answer): retried.
    #[error("reading the voucher chain: {0}")]
    Source(String),
    /// The sink refused or is unreachable: retried, from the position read back from the sink.
    #[error("{sink}: {message}")]
    Sink { sink: &'static str, message: String },
    /// The chain does not hold together, or the sink holds vouchers of another chain: never
    /// retried (an operator must look).
    #[error("voucher chain check failed: {0}")]
    Chain(String),
    /// The sink's configuration cannot work.
    #[error("configuration: {0}")]
    Config(String),
}

impl ExportError {
    pub fn sink(sink: &'static str, message: impl std::fmt::Display) -> ExportError {
        ExportError::Sink {
            sink,
            message: message.to_string(),
        }
    }

    /// Whether trying again may help.
    pub fn is_transient(&self) -> bool {
        matches!(self, ExportError::Source(_) | ExportError::Sink { .. })
    }
}

/// One checked voucher.
#[derive(Clone, Debug)]
pub struct Voucher {
    pub seq: u64,
    /// The chain hash at this voucher.
    pub hash: [u8; 32],
    /// The canonical body (what was hashed).
    pub body: String,
    pub event: VoucherEvent,
    /// For a `window_closed` voucher: the operator's signed checkpoint over this hash.
    pub checkpoint: Option<Checkpoint>,
}

/// Where a sink's data ends, read back from the sink.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resume {
    /// The first voucher to hand to the sink.
    pub next_seq: u64,
    /// A voucher the sink holds and its chain hash there: checked against the switch's chain
    /// (a sink filled from another switch, or a switch whose data was replaced, is refused).
    pub anchor: Option<(u64, [u8; 32])>,
}

impl Resume {
    pub const START: Resume = Resume {
        next_seq: 1,
        anchor: None,
    };
}

/// A destination of vouchers. Every method is all or nothing: after an error the exporter asks
/// [`Sink::resume`] again and continues from there.
pub trait Sink: Send {
    /// "postgres", "parquet" or "kafka".
    fn kind(&self) -> &'static str;

    /// Connects if needed and reads back where the sink's data ends.
    fn resume(&mut self) -> impl Future<Output = Result<Resume, ExportError>> + Send;

    /// Takes the next vouchers, in chain order, starting where the sink ended.
    fn write(&mut self, batch: &[Voucher]) -> impl Future<Output = Result<(), ExportError>> + Send;

    /// The last voucher the sink holds durably (0: none).
    fn durable_seq(&self) -> u64;

    /// A run that caught up ends: let go of anything not durable (it is read again next time).
    fn close(&mut self) {}
}

#[derive(Clone, Debug)]
pub struct ExportOptions {
    /// Vouchers per batch (1 to [`BATCH_MAX`]).
    pub batch_max: usize,
    /// Keep following the chain once caught up.
    pub follow: bool,
    /// How often a caught-up exporter asks for new vouchers.
    pub poll_interval: Duration,
    /// Longest wait between retries of a failed sink or source.
    pub backoff_max: Duration,
    /// Without `follow`: failed attempts in a row before giving up.
    pub attempts_max: u32,
    /// Checkpoints must be signed by this key (None: the key the switch names, recorded).
    pub public_key: Option<ed25519_dalek::VerifyingKey>,
}

impl Default for ExportOptions {
    fn default() -> Self {
        ExportOptions {
            batch_max: 1_000,
            follow: false,
            poll_interval: Duration::from_millis(200),
            backoff_max: Duration::from_secs(5),
            attempts_max: 5,
            public_key: None,
        }
    }
}

/// What one run did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ExportReport {
    pub vouchers: u64,
    pub batches: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    pub durable_seq: u64,
    pub head_seq: u64,
    pub errors: u64,
}

/// Follows a source into a sink.
pub struct Exporter<S, K> {
    source: S,
    sink: K,
    options: ExportOptions,
    status: Arc<ExportStatus>,
}

fn now_ns() -> u64 {
    clearhouse_switch::clock::now_ns()
}

impl<S: Source, K: Sink> Exporter<S, K> {
    pub fn new(source: S, sink: K, options: ExportOptions, status: Arc<ExportStatus>) -> Self {
        Exporter {
            source,
            sink,
            options,
            status,
        }
    }

    pub fn status(&self) -> &Arc<ExportStatus> {
        &self.status
    }

    pub fn sink(&self) -> &K {
        &self.sink
    }

    fn failed(&self, error: &ExportError, attempt: u32) -> Duration {
        self.status.up.store(
            !matches!(error, ExportError::Sink { .. }),
            Ordering::Relaxed,
        );
        self.status.errors_total.fetch_add(1, Ordering::Relaxed);
        *self.status.last_error.lock().expect("export error") = Some(error.to_string());
        let backoff = Duration::from_millis(100u64.saturating_mul(1 << attempt.min(10)))
            .min(self.options.backoff_max);
        // Every failure while it lasts would flood the log: the first, then every 16th.
        if attempt.is_multiple_of(16) {
            tracing::warn!(
                export = %self.status.name,
                sink = self.sink.kind(),
                %error,
                attempt,
                retry_in_ms = backoff.as_millis() as u64,
                "export attempt failed; payments are not affected, the exporter catches up once it succeeds"
            );
        }
        backoff
    }

    /// Exports until caught up (or, with `follow`, forever). `progress(done, head)` after each
    /// batch.
    pub async fn run(
        &mut self,
        mut progress: impl FnMut(u64, u64) + Send,
    ) -> Result<ExportReport, ExportError> {
        let mut report = ExportReport::default();
        let mut attempt = 0u32;
        let batch_max = self.options.batch_max.clamp(1, BATCH_MAX);
        'resume: loop {
            let resume = match self.sink.resume().await {
                Ok(resume) => resume,
                Err(error) => {
                    self.back_off(error, &mut attempt, &mut report).await?;
                    continue 'resume;
                }
            };
            self.status.up.store(true, Ordering::Relaxed);
            self.status
                .durable_seq
                .store(self.sink.durable_seq(), Ordering::Relaxed);
            if report.first_seq == 0 {
                report.first_seq = resume.next_seq;
            }
            let mut from = resume.next_seq.max(1);
            let mut previous: Option<[u8; 32]> = None;
            let mut unsigned_looks = 0u32;
            loop {
                let page = match self.source.page(from, batch_max).await {
                    Ok(page) => page,
                    Err(error) => {
                        self.back_off(error, &mut attempt, &mut report).await?;
                        continue 'resume;
                    }
                };
                self.status.head_seq.store(page.head_seq, Ordering::Relaxed);
                report.head_seq = page.head_seq;
                let batch = self.check(&page, from, &mut previous, &resume)?;
                if batch.is_empty() {
                    if !page.entries.is_empty() {
                        // A window's checkpoint is being signed: look again shortly (bounded:
                        // a checkpoint missing for 10 s is a failure, retried as one).
                        unsigned_looks += 1;
                        if unsigned_looks < 500 {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            continue;
                        }
                        let error = ExportError::Source(format!(
                            "voucher {from} closes a window whose signed checkpoint is missing"
                        ));
                        self.back_off(error, &mut attempt, &mut report).await?;
                        continue 'resume;
                    }
                    unsigned_looks = 0;
                    if self.sink.durable_seq() >= page.head_seq {
                        self.status
                            .caught_up_at_ns
                            .store(now_ns(), Ordering::Relaxed);
                    }
                    if !self.options.follow {
                        report.durable_seq = self.sink.durable_seq();
                        self.sink.close();
                        return Ok(report);
                    }
                    tokio::time::sleep(self.options.poll_interval).await;
                    continue;
                }
                if self.status.caught_up_at_ns.load(Ordering::Relaxed) == 0 {
                    // Behind since start: lag counts from the first look.
                    self.status
                        .caught_up_at_ns
                        .store(now_ns(), Ordering::Relaxed);
                }
                if let Err(error) = self.sink.write(&batch).await {
                    self.back_off(error, &mut attempt, &mut report).await?;
                    continue 'resume;
                }
                attempt = 0;
                let last = batch.last().expect("a batch is not empty").seq;
                let durable = self.sink.durable_seq();
                report.vouchers += batch.len() as u64;
                report.batches += 1;
                report.last_seq = last;
                report.durable_seq = durable;
                self.status.up.store(true, Ordering::Relaxed);
                self.status.read_seq.store(last, Ordering::Relaxed);
                self.status.durable_seq.store(durable, Ordering::Relaxed);
                self.status
                    .vouchers_total
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                if durable >= page.head_seq {
                    self.status
                        .caught_up_at_ns
                        .store(now_ns(), Ordering::Relaxed);
                }
                progress(last, page.head_seq.max(last));
                from = last + 1;
            }
        }
    }

    /// After a failed attempt: gives up (a chain or configuration fault, or a one-off run out of
    /// attempts) or waits, with backoff, before the exporter resumes from the sink.
    async fn back_off(
        &self,
        error: ExportError,
        attempt: &mut u32,
        report: &mut ExportReport,
    ) -> Result<(), ExportError> {
        report.errors += 1;
        if !error.is_transient()
            || (!self.options.follow && *attempt + 1 >= self.options.attempts_max)
        {
            return Err(error);
        }
        let wait = self.failed(&error, *attempt);
        *attempt += 1;
        self.sleep_refreshing_head(wait).await;
        Ok(())
    }

    /// Waits before a retry while the sink is down; meanwhile the lag on `/metrics` keeps
    /// growing with the chain (its head is read every half second).
    async fn sleep_refreshing_head(&self, wait: Duration) {
        let until = tokio::time::Instant::now() + wait;
        loop {
            let from = self.status.durable_seq.load(Ordering::Relaxed) + 1;
            if let Ok(page) = self.source.page(from, 1).await {
                self.status.head_seq.store(page.head_seq, Ordering::Relaxed);
            }
            let now = tokio::time::Instant::now();
            if now >= until {
                return;
            }
            tokio::time::sleep((until - now).min(Duration::from_millis(500))).await;
        }
    }

    /// Checks a page against the chain and turns it into vouchers.
    fn check(
        &self,
        page: &SourcePage,
        from: u64,
        previous: &mut Option<[u8; 32]>,
        resume: &Resume,
    ) -> Result<Vec<Voucher>, ExportError> {
        let mut hash = match previous {
            Some(hash) => *hash,
            None => page.previous_hash,
        };
        if previous.is_none() {
            if let Some((seq, anchor)) = resume.anchor {
                if seq + 1 == from && anchor != page.previous_hash {
                    return Err(ExportError::Chain(format!(
                        "the sink holds voucher {seq} with hash {} but the switch's chain has {} there: the sink was filled from another chain",
                        hex::encode(anchor),
                        hex::encode(page.previous_hash)
                    )));
                }
            }
        }
        if let (Some(pinned), Some(key)) = (&self.options.public_key, &page.public_key) {
            if pinned != key {
                return Err(ExportError::Chain(format!(
                    "the switch signs with operator key {} but {} is the one trusted",
                    hex::encode(key.as_bytes()),
                    hex::encode(pinned.as_bytes())
                )));
            }
        }
        let mut out = Vec::with_capacity(page.entries.len());
        for (i, (seq, leaf, body)) in page.entries.iter().enumerate() {
            if *seq != from + i as u64 {
                return Err(ExportError::Chain(format!(
                    "voucher {} expected, the switch answered {seq}",
                    from + i as u64
                )));
            }
            let Some(body) = body else {
                return Err(ExportError::Source(format!(
                    "voucher {seq} came without its body: the exporter needs the operator's key"
                )));
            };
            let digest = leaf_digest(body.as_bytes());
            if &digest != leaf {
                return Err(ExportError::Chain(format!(
                    "voucher {seq}: the body does not hash to its leaf digest"
                )));
            }
            let at = chain_hash(&hash, *seq, &digest);
            if let Some((anchor_seq, anchor)) = resume.anchor {
                if anchor_seq == *seq && anchor != at {
                    return Err(ExportError::Chain(format!(
                        "the sink holds voucher {seq} with hash {} but the switch's chain has {}: the sink was filled from another chain",
                        hex::encode(anchor),
                        hex::encode(at)
                    )));
                }
            }
            let event = VoucherEvent::parse(body.as_bytes())
                .map_err(|e| ExportError::Chain(format!("voucher {seq}: {e}")))?;
            let checkpoint = page.checkpoints.iter().find(|c| c.seq == *seq).cloned();
            if let VoucherEvent::WindowClosed { window, .. } = &event {
                let Some(checkpoint) = &checkpoint else {
                    // The close signs the chain head just after its voucher is durable: the
                    // batch ends here and the next look finds the signature.
                    tracing::debug!(window, seq, "window checkpoint not signed yet");
                    break;
                };
                let key = self.options.public_key.or(page.public_key).ok_or_else(|| {
                    ExportError::Source("no operator key to check checkpoints".into())
                })?;
                if checkpoint.hash != at || checkpoint.window != *window {
                    return Err(ExportError::Chain(format!(
                        "window {window}'s checkpoint does not name voucher {seq}'s hash"
                    )));
                }
                clearhouse_clearing::export::verify_checkpoint(&key, checkpoint)
                    .map_err(|e| ExportError::Chain(e.to_string()))?;
            }
            hash = at;
            out.push(Voucher {
                seq: *seq,
                hash,
                body: body.clone(),
                event,
                checkpoint,
            });
        }
        *previous = Some(hash);
        Ok(out)
    }
}

/// The kind of an event as its topic and table name say it.
pub fn event_kind(event: &VoucherEvent) -> &'static str {
    match event {
        VoucherEvent::PaymentSettled { .. } => "payment_settled",
        VoucherEvent::PaymentRejected { .. } => "payment_rejected",
        VoucherEvent::PaymentReturned { .. } => "payment_returned",
        VoucherEvent::Liquidity { .. } => "liquidity",
        VoucherEvent::WindowClosed { .. } => "window_closed",
        VoucherEvent::FundAdjustment { .. } => "fund_adjustment",
        VoucherEvent::WindowSettled { .. } => "window_settled",
    }
}

/// Every event kind, in the order of [`VoucherEvent`].
pub const EVENT_KINDS: [&str; 7] = [
    "payment_settled",
    "payment_rejected",
    "payment_returned",
    "liquidity",
    "window_closed",
    "fund_adjustment",
    "window_settled",
];

/// One `[[export]]` section of the switch's configuration: a sink `serve` runs in process.
/// `sink` says which, and only that sink's fields may be given.
#[derive(Clone, Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportConfig {
    /// Unique per switch: names the exporter in logs, `/metrics` and the dashboard.
    pub name: String,
    /// "postgres", "parquet" or "kafka".
    pub sink: String,
    /// Vouchers per batch (1 to 4,096; default 1,000).
    pub batch_max: Option<usize>,
    /// postgres: libpq-style connection string.
    pub dsn: Option<String>,
    /// postgres: the schema holding the mirror (default "clearhouse").
    pub schema: Option<String>,
    /// parquet: the archive directory (relative: to the data directory).
    pub dir: Option<std::path::PathBuf>,
    /// kafka: bootstrap brokers, `host:port`.
    pub brokers: Option<Vec<String>>,
    /// kafka: topic names are `<prefix>.<kind>` (default "clearhouse").
    pub topic_prefix: Option<String>,
    /// kafka: partitions and replication factor of the topics it creates (default 1 and 1).
    pub partitions: Option<i32>,
    pub replication_factor: Option<i16>,
}

/// A checked sink configuration.
#[derive(Clone, Debug)]
pub enum SinkConfig {
    Postgres(postgres::PostgresOptions),
    Parquet(std::path::PathBuf),
    Kafka(kafka::KafkaOptions),
}

impl ExportConfig {
    pub fn sink_config(&self) -> Result<SinkConfig, ExportError> {
        let name = &self.name;
        let stray = |fields: &[(&str, bool)]| -> Result<(), ExportError> {
            match fields.iter().find(|(_, given)| *given) {
                Some((field, _)) => Err(ExportError::Config(format!(
                    "export {name:?}: `{field}` is not a field of a {} sink",
                    self.sink
                ))),
                None => Ok(()),
            }
        };
        let missing = |field: &str| {
            ExportError::Config(format!(
                "export {name:?}: a {} sink needs `{field}`",
                self.sink
            ))
        };
        let postgres_fields = [
            ("dsn", self.dsn.is_some()),
            ("schema", self.schema.is_some()),
        ];
        let parquet_fields = [("dir", self.dir.is_some())];
        let kafka_fields = [
            ("brokers", self.brokers.is_some()),
            ("topic_prefix", self.topic_prefix.is_some()),
            ("partitions", self.partitions.is_some()),
            ("replication_factor", self.replication_factor.is_some()),
        ];
        match self.sink.as_str() {
            "postgres" => {
                stray(&parquet_fields)?;
                stray(&kafka_fields)?;
                Ok(SinkConfig::Postgres(postgres::PostgresOptions {
                    dsn: self.dsn.clone().ok_or_else(|| missing("dsn"))?,
                    schema: self.schema.clone().unwrap_or_else(|| "clearhouse".into()),
                }))
            }
            "parquet" => {
                stray(&postgres_fields)?;
                stray(&kafka_fields)?;
                Ok(SinkConfig::Parquet(
                    self.dir.clone().ok_or_else(|| missing("dir"))?,
                ))
            }
            "kafka" => {
                stray(&postgres_fields)?;
                stray(&parquet_fields)?;
                Ok(SinkConfig::Kafka(kafka::KafkaOptions {
                    brokers: self.brokers.clone().ok_or_else(|| missing("brokers"))?,
                    topic_prefix: self
                        .topic_prefix
                        .clone()
                        .unwrap_or_else(|| "clearhouse".into()),
                    partitions: self.partitions.unwrap_or(1),
                    replication_factor: self.replication_factor.unwrap_or(1),
                }))
            }
            other => Err(ExportError::Config(format!(
                "export {name:?}: sink {other:?} is not one of postgres, parquet, kafka"
            ))),
        }
    }
}

/// Starts every configured exporter on the switch in this process, each in its own task,
/// following the chain for as long as the process runs. Checks each configuration first: a bad
/// one stops the start, a sink that is down does not (its exporter retries and says so).
pub fn spawn_in_process(
    switch: &Arc<clearhouse_switch::switch::Switch>,
    data_dir: &std::path::Path,
    configs: &[ExportConfig],
) -> Result<Vec<tokio::task::JoinHandle<()>>, ExportError> {
    let checked = configs
        .iter()
        .map(|c| c.sink_config().map(|sink| (c, sink)))
        .collect::<Result<Vec<_>, _>>()?;
    let mut handles = Vec::new();
    for (config, sink) in checked {
        let status = switch
            .exports
            .register(&config.name, &config.sink)
            .ok_or_else(|| {
                ExportError::Config(format!(
                    "export {:?}: the name is taken, or more than {} exports",
                    config.name,
                    clearhouse_switch::exports::EXPORTS_MAX
                ))
            })?;
        let options = ExportOptions {
            batch_max: config.batch_max.unwrap_or(1_000).clamp(1, BATCH_MAX),
            follow: true,
            ..ExportOptions::default()
        };
        let source = LocalSource::new(switch.clearing.clone());
        let name = config.name.clone();
        let handle = match sink {
            SinkConfig::Postgres(options_pg) => {
                let sink = postgres::PostgresSink::new(options_pg)?;
                tokio::spawn(follow(Exporter::new(source, sink, options, status), name))
            }
            SinkConfig::Parquet(dir) => {
                let sink = archive::ParquetSink::new(&data_dir.join(dir))?;
                tokio::spawn(follow(Exporter::new(source, sink, options, status), name))
            }
            SinkConfig::Kafka(options_kafka) => {
                let sink = kafka::KafkaSink::new(options_kafka)?;
                tokio::spawn(follow(Exporter::new(source, sink, options, status), name))
            }
        };
        handles.push(handle);
    }
    Ok(handles)
}

async fn follow<S: Source, K: Sink>(mut exporter: Exporter<S, K>, name: String) {
    tracing::info!(export = %name, sink = exporter.sink().kind(), "exporter following the voucher chain");
    if let Err(error) = exporter.run(|_, _| {}).await {
        // Only a chain or configuration fault ends a following exporter: an operator must look.
        *exporter.status().last_error.lock().expect("export error") = Some(error.to_string());
        exporter.status().up.store(false, Ordering::Relaxed);
        tracing::error!(export = %name, %error, "exporter stopped");
    }
}
