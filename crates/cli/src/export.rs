//! `clearhouse export postgres|parquet|kafka`: follows a running switch's voucher chain into a
//! sink, once (until caught up) or `--follow`; where to start is read back from the sink.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use clearhouse_export::{
    archive::ParquetSink, kafka::KafkaOptions, kafka::KafkaSink, postgres::PostgresOptions,
    postgres::PostgresSink, ExportOptions, Exporter, HttpSource, Sink,
};
use clearhouse_switch::exports::ExportStatus;

use crate::common::{read_operator_key, Progress};

#[derive(clap::Args)]
pub struct ExportArgs {
    #[command(subcommand)]
    sink: SinkCommand,
    /// The switch's base URL.
    #[arg(long, global = true, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// The operator key file (`<key id> <hex secret>`): the exporter reads every voucher body.
    #[arg(long, global = true, default_value = "data/operator.key")]
    key_file: PathBuf,
    /// Keep following the chain once caught up (until stopped); without it, exit when caught up.
    #[arg(long, global = true)]
    follow: bool,
    /// Vouchers per batch (1 to 4,096).
    #[arg(long, global = true, default_value_t = 1_000)]
    batch: usize,
    /// Checkpoints must be signed by this operator key (64 hex digits); default: the key the
    /// switch names.
    #[arg(long, global = true)]
    public_key: Option<String>,
    /// Print the summary as JSON.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(clap::Subcommand)]
enum SinkCommand {
    /// The PostgreSQL reporting mirror (tables in crates/export/migrations, docs/EXPORT.md).
    ///
    /// Example: clearhouse export postgres --dsn "host=127.0.0.1 user=clearhouse dbname=reports"
    Postgres {
        /// libpq-style connection string.
        #[arg(long)]
        dsn: String,
        /// The schema holding the mirror (created if missing).
        #[arg(long, default_value = "clearhouse")]
        schema: String,
    },
    /// The Parquet archive: one file per closed settlement window.
    ///
    /// Example: clearhouse export parquet --dir archive
    Parquet {
        #[arg(long)]
        dir: PathBuf,
    },
    /// The event stream on a Kafka-protocol broker: a topic per event kind.
    ///
    /// Example: clearhouse export kafka --brokers 127.0.0.1:9092 --topic-prefix clearhouse
    Kafka {
        /// Bootstrap brokers, comma-separated `host:port`.
        #[arg(long, value_delimiter = ',')]
        brokers: Vec<String>,
        #[arg(long, default_value = "clearhouse")]
        topic_prefix: String,
        /// Partitions of the topics this creates.
        #[arg(long, default_value_t = 1)]
        partitions: i32,
        /// Replication factor of the topics this creates.
        #[arg(long, default_value_t = 1)]
        replication_factor: i16,
    },
}

pub fn run(args: ExportArgs) -> anyhow::Result<()> {
    let (key_id, secret) = read_operator_key(&args.key_file)?;
    let public_key = args
        .public_key
        .as_deref()
        .map(|text| -> anyhow::Result<ed25519_dalek::VerifyingKey> {
            let bytes: [u8; 32] = hex::decode(text.trim())
                .ok()
                .and_then(|b| b.try_into().ok())
                .context("--public-key is 64 hex digits")?;
            ed25519_dalek::VerifyingKey::from_bytes(&bytes).context("not an Ed25519 public key")
        })
        .transpose()?;
    let options = ExportOptions {
        batch_max: args.batch.clamp(1, clearhouse_export::BATCH_MAX),
        follow: args.follow,
        public_key,
        ..ExportOptions::default()
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let source = HttpSource::new(clearhouse_switch::client::SignedClient::new(
        &args.url, &key_id, secret,
    ));
    let json = args.json;
    runtime.block_on(async move {
        match args.sink {
            SinkCommand::Postgres { dsn, schema } => {
                let sink = PostgresSink::new(PostgresOptions { dsn, schema })?;
                drive(source, sink, options, json).await
            }
            SinkCommand::Parquet { dir } => {
                drive(source, ParquetSink::new(&dir)?, options, json).await
            }
            SinkCommand::Kafka {
                brokers,
                topic_prefix,
                partitions,
                replication_factor,
            } => {
                let sink = KafkaSink::new(KafkaOptions {
                    brokers,
                    topic_prefix,
                    partitions,
                    replication_factor,
                })?;
                drive(source, sink, options, json).await
            }
        }
    })
}

async fn drive<K: Sink>(
    source: HttpSource,
    sink: K,
    options: ExportOptions,
    json: bool,
) -> anyhow::Result<()> {
    let kind = sink.kind();
    let status = Arc::new(ExportStatus::new(kind, kind));
    let follow = options.follow;
    let mut exporter = Exporter::new(source, sink, options, status);
    let started = Instant::now();
    let mut progress = Progress::new("export", 0, "vouchers");
    let report = exporter
        .run(|done, head| {
            progress.total = head;
            progress.update(done);
            if follow {
                // A following exporter says where it is now and then (stderr, one line).
                tracing::debug!(done, head, "exported");
            }
        })
        .await;
    progress.finish();
    let report = report.with_context(|| format!("exporting to {kind}"))?;
    let seconds = started.elapsed().as_secs_f64();
    let rate = report.vouchers as f64 / seconds.max(1e-9);
    if json {
        let mut value = serde_json::to_value(&report)?;
        value["sink"] = serde_json::json!(kind);
        value["seconds"] = serde_json::json!((seconds * 1000.0).round() / 1000.0);
        value["vouchers_per_second"] = serde_json::json!(rate.round());
        println!("{value}");
    } else {
        println!(
            "{kind}: {} vouchers in {} batches ({:.0}/s, {:.2} s); the sink holds the chain through voucher {} of {}{}",
            report.vouchers,
            report.batches,
            rate,
            seconds,
            report.durable_seq,
            report.head_seq,
            if report.errors > 0 {
                format!("; {} failed attempts retried", report.errors)
            } else {
                String::new()
            }
        );
    }
    Ok(())
}
