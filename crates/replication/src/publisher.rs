//! The leader's publisher: each journal group goes to the stream with the expected last
//! sequence of the previous message of this term, in order, and its ticket resolves only when
//! the stream (its raft quorum) stored it.
//!
//! Resends after a timeout or a lost connection carry the same `Nats-Msg-Id` and the same
//! expected sequence, so a message that was stored but whose ack was lost is acked again as a
//! duplicate, never stored twice. `WrongLastSequence` means another node appended (a new leader's
//! barrier): this node is deposed, every later group fails, and it must step down.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, context::PublishErrorKind, message::PublishMessage};
use async_nats::HeaderMap;
use clearhouse_engine::replica::{GroupLog, ReplicaTicket, ReplicatedGroup, TicketSender};

use crate::wire;

/// Groups waiting to be published (the engine keeps at most a few in flight; this is a bound,
/// not a buffer).
const QUEUE_MAX: usize = 64;
/// Most queued groups published as one message (the wire format splits at 4 MiB anyway).
const COALESCE_GROUPS_MAX: usize = 16;

/// Publishing figures for metrics.
#[derive(Default)]
pub struct PublishMetrics {
    pub messages: AtomicU64,
    pub publish_nanos: AtomicU64,
    pub resends: AtomicU64,
    pub last_stream_seq: AtomicU64,
}

pub struct Publisher {
    sender: tokio::sync::mpsc::Sender<(ReplicatedGroup, TicketSender)>,
    available: Arc<AtomicBool>,
    failed: Arc<Mutex<Option<String>>>,
    pub metrics: Arc<PublishMetrics>,
}

/// Who publishes, for the headers.
#[derive(Clone)]
pub struct Term {
    pub term: u64,
    pub node_id: String,
}

impl Publisher {
    /// Starts the publishing task on `runtime`; the first group expects `last_stream_seq` (the
    /// term's barrier).
    pub fn start(
        runtime: &tokio::runtime::Handle,
        js: jetstream::Context,
        subject: String,
        term: Term,
        last_stream_seq: u64,
        retry_for: Duration,
    ) -> Arc<Publisher> {
        let (sender, mut receiver) =
            tokio::sync::mpsc::channel::<(ReplicatedGroup, TicketSender)>(QUEUE_MAX);
        let publisher = Arc::new(Publisher {
            sender,
            available: Arc::new(AtomicBool::new(true)),
            failed: Arc::new(Mutex::new(None)),
            metrics: Arc::new(PublishMetrics::default()),
        });
        publisher
            .metrics
            .last_stream_seq
            .store(last_stream_seq, Ordering::SeqCst);
        let (available, failed, metrics) = (
            publisher.available.clone(),
            publisher.failed.clone(),
            publisher.metrics.clone(),
        );
        runtime.spawn(async move {
            let mut last = last_stream_seq;
            while let Some(first_group) = receiver.recv().await {
                // Groups that queued up while the previous publish was in flight go out as one
                // message (fewer raft rounds per payment); each one's ticket resolves with it.
                let mut tickets = Vec::new();
                let mut group = first_group.0;
                tickets.push(first_group.1);
                while tickets.len() < COALESCE_GROUPS_MAX {
                    let Ok((next, ticket)) = receiver.try_recv() else {
                        break;
                    };
                    group.records.extend(next.records);
                    (group.chain_seq, group.chain_hash) = (next.chain_seq, next.chain_hash);
                    tickets.push(ticket);
                }
                if let Some(reason) = failed.lock().expect("failed").clone() {
                    for ticket in tickets {
                        ticket.resolve(Err(reason.clone()));
                    }
                    continue;
                }
                let parts = wire::encode(&group.records);
                let count = parts.len();
                let mut outcome = Ok(last);
                for (index, (first, last_journal, payload)) in parts.into_iter().enumerate() {
                    let mut headers = HeaderMap::new();
                    headers.insert(wire::KIND, "group");
                    headers.insert(wire::TERM, term.term.to_string().as_str());
                    headers.insert(wire::NODE, term.node_id.as_str());
                    headers.insert(wire::FIRST, first.to_string().as_str());
                    headers.insert(wire::LAST, last_journal.to_string().as_str());
                    if index + 1 == count {
                        headers.insert(
                            wire::CHAIN,
                            wire::chain_value(group.chain_seq, &group.chain_hash).as_str(),
                        );
                    }
                    let id = format!("{}-{first}", term.term);
                    let started = Instant::now();
                    match publish(
                        &js,
                        &subject,
                        headers,
                        payload.into(),
                        &id,
                        last,
                        retry_for,
                        &available,
                        &metrics,
                    )
                    .await
                    {
                        Ok(seq) => {
                            last = seq;
                            outcome = Ok(seq);
                            metrics.messages.fetch_add(1, Ordering::Relaxed);
                            metrics
                                .publish_nanos
                                .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
                            metrics.last_stream_seq.store(seq, Ordering::SeqCst);
                        }
                        Err(reason) => {
                            tracing::error!(%reason, journal_seq = first, "publishing a journal group failed; this leader steps down");
                            available.store(false, Ordering::SeqCst);
                            *failed.lock().expect("failed") = Some(reason.clone());
                            outcome = Err(reason);
                            break;
                        }
                    }
                }
                for ticket in tickets {
                    ticket.resolve(outcome.clone());
                }
            }
        });
        publisher
    }

    /// Why publishing stopped for good (deposed, or the stream unreachable past the retry time).
    pub fn failure(&self) -> Option<String> {
        self.failed.lock().expect("failed").clone()
    }
}

impl GroupLog for Publisher {
    fn submit(&self, group: ReplicatedGroup) -> ReplicaTicket {
        let (sender, ticket) = ReplicaTicket::new();
        if let Some(reason) = self.failure() {
            sender.resolve(Err(reason));
            return ticket;
        }
        if let Err(error) = self.sender.try_send((group, sender)) {
            let (_, sender) = match error {
                tokio::sync::mpsc::error::TrySendError::Full(item)
                | tokio::sync::mpsc::error::TrySendError::Closed(item) => item,
            };
            sender.resolve(Err("the publish queue is full or closed".into()));
        }
        ticket
    }

    fn available(&self) -> bool {
        self.available.load(Ordering::SeqCst)
    }
}

/// Publishes one message expecting `expected` as the stream's last sequence; resends on
/// transient failures until `retry_for` passed. Returns the message's stream sequence.
#[allow(clippy::too_many_arguments)]
pub async fn publish(
    js: &jetstream::Context,
    subject: &str,
    headers: HeaderMap,
    payload: bytes::Bytes,
    id: &str,
    expected: u64,
    retry_for: Duration,
    available: &AtomicBool,
    metrics: &PublishMetrics,
) -> Result<u64, String> {
    let deadline = Instant::now() + retry_for;
    let mut delay = Duration::from_millis(50);
    loop {
        let message = PublishMessage::build()
            .payload(payload.clone())
            .headers(headers.clone())
            .message_id(id)
            .expected_last_sequence(expected);
        let result = match js.send_publish(subject.to_string(), message).await {
            Ok(ack) => ack.await,
            Err(error) => Err(error),
        };
        match result {
            Ok(ack) => {
                available.store(true, Ordering::SeqCst);
                if !ack.duplicate && ack.sequence != expected + 1 {
                    return Err(format!(
                        "the stream stored message {id} at sequence {} but {} was expected",
                        ack.sequence,
                        expected + 1
                    ));
                }
                return Ok(ack.sequence);
            }
            Err(error) if error.kind() == PublishErrorKind::WrongLastSequence => {
                return Err(format!(
                    "deposed: the stream's last sequence is no longer {expected} (another leader appended): {error}"
                ));
            }
            Err(error) => {
                available.store(false, Ordering::SeqCst);
                metrics.resends.fetch_add(1, Ordering::Relaxed);
                if Instant::now() >= deadline {
                    return Err(format!(
                        "the stream did not store message {id} within {} ms: {error}",
                        retry_for.as_millis()
                    ));
                }
                tracing::warn!(%error, id, "publish failed; resending");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_millis(500));
            }
        }
    }
}

/// A new term's first message: expects the stream's last sequence `expected` (everything this
/// node applied), and names the journal record and voucher chain head the term starts from. Once
/// it is stored, the previous leader's next publish fails `WrongLastSequence`.
pub async fn publish_barrier(
    js: &jetstream::Context,
    subject: &str,
    term: &Term,
    expected: u64,
    journal_last: u64,
    chain: (u64, [u8; 32]),
) -> Result<u64, String> {
    let mut headers = HeaderMap::new();
    headers.insert(wire::KIND, "barrier");
    headers.insert(wire::TERM, term.term.to_string().as_str());
    headers.insert(wire::NODE, term.node_id.as_str());
    headers.insert(wire::FIRST, (journal_last + 1).to_string().as_str());
    headers.insert(wire::LAST, journal_last.to_string().as_str());
    headers.insert(wire::CHAIN, wire::chain_value(chain.0, &chain.1).as_str());
    publish(
        js,
        subject,
        headers,
        bytes::Bytes::new(),
        &format!("{}-barrier", term.term),
        expected,
        Duration::from_secs(2),
        &AtomicBool::new(true),
        &PublishMetrics::default(),
    )
    .await
}
