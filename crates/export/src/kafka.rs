//! The Kafka-protocol event stream: one topic per event kind, `<prefix>.<kind>` (payment_settled,
//! payment_rejected, payment_returned, liquidity, window_closed, fund_adjustment,
//! window_settled); the value is the voucher body as hashed (canonical JSON); headers
//! `clearhouse-seq` (decimal), `clearhouse-hash` (hex chain hash) and `clearhouse-kind`. Key:
//! the payment id (for returns the original payment's), the participant for liquidity and fund
//! adjustments, the window number for window events; the partition is chosen as the Java
//! client's default partitioner does (murmur2 of the key), so keyed consumers agree.
//!
//! Client: rskafka (pure Rust: no librdkafka C build on a 2-core machine, and the calls this
//! needs, produce, fetch, list offsets, create topics, are all it must do). It has no idempotent
//! producer (producer ids), so exactly once is done here, from what the broker holds:
//! - vouchers go out in chunks of at most [`CHUNK_MAX`], each (topic, partition) of a chunk in one
//!   produce request (appended whole or not at all), and a chunk completes before the next starts;
//! - the client never resends on its own (its retry deadline is zero): a produce whose answer
//!   is lost is an error, and the exporter resumes;
//! - resuming reads the last record of every partition back (its `clearhouse-seq`), starts
//!   [`CHUNK_MAX`] vouchers before the highest, and skips in each partition what it already holds.
//!
//! Every voucher before the chunk that held the highest sequence was complete; inside that chunk
//! each partition is skipped up to its own last sequence: nothing is lost or written twice. (One
//! exception, outside our control: a broker that throttles a produce it accepted, with client
//! quotas, makes rskafka wait and send it again; consumers can drop a repeated `clearhouse-seq`.)

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use clearhouse_clearing::event::VoucherEvent;
use rskafka::chrono::{DateTime, Utc};
use rskafka::client::partition::{Compression, OffsetAt, PartitionClient, UnknownTopicHandling};
use rskafka::client::{Client, ClientBuilder};
use rskafka::record::Record;
use rskafka::BackoffConfig;

use crate::{event_kind, ExportError, Resume, Sink, Voucher, EVENT_KINDS};

const SINK: &str = "kafka";

/// Reads of the partitions' ends at a resume, at most (see [`KafkaSink::resume`]).
const RESUME_READS_MAX: usize = 5;
/// Between two reads of the partitions' ends at a resume.
const RESUME_SETTLE: Duration = Duration::from_millis(500);

/// Vouchers per chunk (and how far back a resume looks).
pub const CHUNK_MAX: usize = 1_024;

/// Longest any one broker call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

pub const SEQ_HEADER: &str = "clearhouse-seq";
pub const HASH_HEADER: &str = "clearhouse-hash";
pub const KIND_HEADER: &str = "clearhouse-kind";

#[derive(Clone, Debug)]
pub struct KafkaOptions {
    /// Bootstrap brokers, `host:port`.
    pub brokers: Vec<String>,
    /// Topic names are `<prefix>.<kind>`.
    pub topic_prefix: String,
    /// Partitions of topics this sink creates (existing topics keep theirs).
    pub partitions: i32,
    /// Replication factor of topics this sink creates.
    pub replication_factor: i16,
}

pub struct KafkaSink {
    options: KafkaOptions,
    client: Option<Client>,
    /// Per kind (index in [`EVENT_KINDS`]): its partitions' clients.
    partitions: Vec<Vec<Arc<PartitionClient>>>,
    /// The last sequence each (kind, partition) holds.
    last: BTreeMap<(usize, i32), u64>,
    durable: u64,
}

fn kafka(error: impl std::fmt::Display) -> ExportError {
    ExportError::sink(SINK, error)
}

async fn timed<T, E: std::fmt::Display>(
    what: &str,
    call: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, ExportError> {
    tokio::time::timeout(CALL_TIMEOUT, call)
        .await
        .map_err(|_| kafka(format!("{what}: no answer in {} s", CALL_TIMEOUT.as_secs())))?
        .map_err(|e| kafka(format!("{what}: {e}")))
}

/// The Java client's murmur2 (`org.apache.kafka.common.utils.Utils.murmur2`).
pub fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let length = data.len() as u32;
    let mut h: u32 = SEED ^ length;
    let chunks = data.chunks_exact(4);
    let tail = chunks.remainder();
    for chunk in chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    match tail.len() {
        3 => {
            h ^= (tail[2] as u32) << 16;
            h ^= (tail[1] as u32) << 8;
            h ^= tail[0] as u32;
            h = h.wrapping_mul(M);
        }
        2 => {
            h ^= (tail[1] as u32) << 8;
            h ^= tail[0] as u32;
            h = h.wrapping_mul(M);
        }
        1 => {
            h ^= tail[0] as u32;
            h = h.wrapping_mul(M);
        }
        _ => {}
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition the Java client's default partitioner picks for `key`.
pub fn partition_for(key: &[u8], partitions: usize) -> usize {
    ((murmur2(key) & 0x7fff_ffff) as usize) % partitions.max(1)
}

/// The record key of an event.
pub fn record_key(event: &VoucherEvent) -> String {
    match event {
        VoucherEvent::PaymentSettled { payment, .. }
        | VoucherEvent::PaymentRejected { payment, .. } => payment.clone(),
        VoucherEvent::PaymentReturned {
            original_payment, ..
        } => original_payment.clone(),
        VoucherEvent::Liquidity { participant, .. }
        | VoucherEvent::FundAdjustment { participant, .. } => participant.clone(),
        VoucherEvent::WindowClosed { window, .. } | VoucherEvent::WindowSettled { window, .. } => {
            window.to_string()
        }
    }
}

fn event_time(event: &VoucherEvent) -> DateTime<Utc> {
    let ns = match event {
        VoucherEvent::PaymentSettled { at_ns, .. }
        | VoucherEvent::PaymentRejected { at_ns, .. }
        | VoucherEvent::PaymentReturned { at_ns, .. }
        | VoucherEvent::Liquidity { at_ns, .. } => Some(*at_ns),
        VoucherEvent::WindowClosed { closed_at_ns, .. } => Some(*closed_at_ns),
        VoucherEvent::WindowSettled { settled_at_ns, .. } => Some(*settled_at_ns),
        VoucherEvent::FundAdjustment { .. } => None,
    };
    ns.and_then(|ns| i64::try_from(ns).ok())
        .map(DateTime::from_timestamp_nanos)
        .unwrap_or_else(Utc::now)
}

fn kind_index(event: &VoucherEvent) -> usize {
    let kind = event_kind(event);
    EVENT_KINDS
        .iter()
        .position(|k| *k == kind)
        .expect("every kind is listed")
}

impl KafkaSink {
    pub fn new(options: KafkaOptions) -> Result<KafkaSink, ExportError> {
        if options.brokers.is_empty() {
            return Err(ExportError::Config("no Kafka broker given".into()));
        }
        let valid = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
        if options.topic_prefix.is_empty()
            || options.topic_prefix.len() > 200
            || !options.topic_prefix.chars().all(valid)
        {
            return Err(ExportError::Config(format!(
                "topic prefix {:?}: letters, digits, '.', '_' and '-' (at most 200)",
                options.topic_prefix
            )));
        }
        if !(1..=1024).contains(&options.partitions) || options.replication_factor < 1 {
            return Err(ExportError::Config(
                "partitions 1 to 1024, replication factor at least 1".into(),
            ));
        }
        Ok(KafkaSink {
            options,
            client: None,
            partitions: Vec::new(),
            last: BTreeMap::new(),
            durable: 0,
        })
    }

    pub fn topic(&self, kind: &str) -> String {
        format!("{}.{kind}", self.options.topic_prefix)
    }

    async fn connect(&mut self) -> Result<(), ExportError> {
        let backoff = BackoffConfig {
            init_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(1),
            base: 2.0,
            // Never resend by itself: a lost answer must reach us (see the module comment).
            deadline: Some(Duration::ZERO),
        };
        let client = timed(
            "connecting",
            ClientBuilder::new(self.options.brokers.clone())
                .client_id("clearhouse-export")
                .backoff_config(backoff)
                .build(),
        )
        .await?;
        let existing = timed("listing topics", client.list_topics()).await?;
        let controller = client.controller_client().map_err(kafka)?;
        let mut partitions = Vec::new();
        for kind in EVENT_KINDS {
            let name = self.topic(kind);
            let count = match existing.iter().find(|t| t.name == name) {
                Some(topic) => topic.partitions.len() as i32,
                None => {
                    timed(
                        &format!("creating topic {name}"),
                        controller.create_topic(
                            name.clone(),
                            self.options.partitions,
                            self.options.replication_factor,
                            10_000,
                        ),
                    )
                    .await?;
                    tracing::info!(topic = %name, partitions = self.options.partitions, "kafka: topic created");
                    self.options.partitions
                }
            };
            let mut clients = Vec::new();
            for partition in 0..count.max(1) {
                let mut attempt = 0;
                let client = loop {
                    // A topic just created takes a moment to get its leaders.
                    match timed(
                        &format!("{name}/{partition}"),
                        client.partition_client(
                            name.clone(),
                            partition,
                            UnknownTopicHandling::Error,
                        ),
                    )
                    .await
                    {
                        Ok(c) => break c,
                        Err(error) if attempt < 50 => {
                            attempt += 1;
                            tracing::debug!(%error, "partition not ready");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        Err(error) => return Err(error),
                    }
                };
                clients.push(Arc::new(client));
            }
            partitions.push(clients);
        }
        self.partitions = partitions;
        self.client = Some(client);
        Ok(())
    }

    /// The last record's sequence and hash of one partition (None: empty). Reads from the
    /// listed end offset to the fetch's high watermark, whichever is further: some brokers list
    /// the end of a multi-record batch short of its last record.
    async fn last_record(
        partition: &PartitionClient,
    ) -> Result<Option<(u64, [u8; 32])>, ExportError> {
        let what = format!("{}/{}", partition.topic(), partition.partition());
        let latest = timed(&what, partition.get_offset(OffsetAt::Latest)).await?;
        if latest <= 0 {
            return Ok(None);
        }
        let mut offset = latest - 1;
        let mut last = None;
        for _ in 0..1_000 {
            let (records, high_watermark) =
                timed(&what, partition.fetch_records(offset, 1..4_000_000, 1_000)).await?;
            let before = offset;
            for record in records {
                if record.offset >= offset {
                    offset = record.offset + 1;
                    last = Some(record);
                }
            }
            if offset >= high_watermark || offset == before {
                break;
            }
        }
        let record = last.ok_or_else(|| {
            kafka(format!(
                "{what}: the last record (before offset {latest}) could not be read"
            ))
        })?;
        let header = |name: &str| {
            record
                .record
                .headers
                .get(name)
                .and_then(|v| std::str::from_utf8(v).ok())
                .map(str::to_string)
        };
        let seq = header(SEQ_HEADER)
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or_else(|| ExportError::Chain(format!("{what}: the last record has no {SEQ_HEADER} header: the topic holds other data")))?;
        let hash: [u8; 32] = header(HASH_HEADER)
            .and_then(|h| hex::decode(h).ok())
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| {
                ExportError::Chain(format!(
                    "{what}: the last record has no valid {HASH_HEADER} header"
                ))
            })?;
        Ok(Some((seq, hash)))
    }

    async fn write_chunk(&mut self, chunk: &[Voucher]) -> Result<(), ExportError> {
        // (kind, partition) -> records, in chain order.
        let mut groups: BTreeMap<(usize, usize), (Vec<Record>, u64)> = BTreeMap::new();
        for v in chunk {
            let kind = kind_index(&v.event);
            let key = record_key(&v.event);
            let partition = partition_for(key.as_bytes(), self.partitions[kind].len());
            let held = self
                .last
                .get(&(kind, partition as i32))
                .copied()
                .unwrap_or(0);
            if v.seq <= held {
                continue;
            }
            let mut headers = BTreeMap::new();
            headers.insert(SEQ_HEADER.to_string(), v.seq.to_string().into_bytes());
            headers.insert(HASH_HEADER.to_string(), hex::encode(v.hash).into_bytes());
            headers.insert(
                KIND_HEADER.to_string(),
                event_kind(&v.event).as_bytes().to_vec(),
            );
            let group = groups.entry((kind, partition)).or_default();
            group.0.push(Record {
                key: Some(key.into_bytes()),
                value: Some(v.body.as_bytes().to_vec()),
                headers,
                timestamp: event_time(&v.event),
            });
            group.1 = v.seq;
        }
        for ((kind, partition), (records, last)) in groups {
            let client = self.partitions[kind][partition].clone();
            let what = format!("producing to {}/{partition}", client.topic());
            timed(&what, client.produce(records, Compression::NoCompression)).await?;
            self.last.insert((kind, partition as i32), last);
        }
        Ok(())
    }
}

impl Sink for KafkaSink {
    fn kind(&self) -> &'static str {
        SINK
    }

    async fn resume(&mut self) -> Result<Resume, ExportError> {
        self.client = None;
        self.connect().await?;
        // A produce request an earlier (killed) exporter left in flight can still be appended
        // after a first read: read the partitions' ends until two reads RESUME_SETTLE apart
        // agree (bounded), so that such a request is counted, not written again.
        let mut highest: Option<(u64, [u8; 32])> = None;
        for round in 0..RESUME_READS_MAX {
            let before = std::mem::take(&mut self.last);
            highest = None;
            for (kind, clients) in self.partitions.iter().enumerate() {
                for client in clients {
                    if let Some((seq, hash)) = Self::last_record(client).await? {
                        self.last.insert((kind, client.partition()), seq);
                        if highest.is_none_or(|(s, _)| seq > s) {
                            highest = Some((seq, hash));
                        }
                    }
                }
            }
            if round > 0 && before == self.last {
                break;
            }
            if round + 1 < RESUME_READS_MAX {
                tokio::time::sleep(RESUME_SETTLE).await;
            }
        }
        let Some((seq, hash)) = highest else {
            self.durable = 0;
            return Ok(Resume::START);
        };
        let next_seq = seq.saturating_sub(CHUNK_MAX as u64 - 1).max(1);
        self.durable = next_seq - 1;
        Ok(Resume {
            next_seq,
            anchor: Some((seq, hash)),
        })
    }

    async fn write(&mut self, batch: &[Voucher]) -> Result<(), ExportError> {
        if self.client.is_none() {
            return Err(kafka("not connected"));
        }
        for chunk in batch.chunks(CHUNK_MAX) {
            if let Err(error) = self.write_chunk(chunk).await {
                self.client = None;
                return Err(error);
            }
            self.durable = chunk.last().expect("chunks are not empty").seq;
        }
        Ok(())
    }

    fn durable_seq(&self) -> u64 {
        self.durable
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur2_matches_the_java_client() {
        // Values from the Java client's own tests (UtilsTest.testMurmur2).
        assert_eq!(murmur2(b"21"), -973932308);
        assert_eq!(murmur2(b"foobar"), -790332482);
        assert_eq!(murmur2(b"a-little-bit-long-string"), -985981536);
        assert_eq!(murmur2(b"a-little-bit-longer-string"), -1486304829);
        assert_eq!(
            murmur2(b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8"),
            -58897971
        );
        assert_eq!(murmur2(b"abc"), 479470107);
    }
}
