//! The standby's side: find where to resume in the stream, cut a journal tail the stream never
//! stored, and apply the stream's groups through the engine's follower path.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::consumer::{pull::OrderedConfig, DeliverPolicy};
use async_nats::jetstream::stream::Stream;
use clearhouse_engine::replica::TailCheck;
use clearhouse_engine::Node;
use clearhouse_journal::Record;
use futures_util::{FutureExt, StreamExt};

use crate::{nats, wire, ReplicationError};

/// Where a standby stands, for `/ready`, metrics and the takeover.
#[derive(Default)]
pub struct FollowerStatus {
    /// The last stream message applied (durably).
    pub applied_stream_seq: AtomicU64,
    /// Messages in the stream after it, as the consumer last reported.
    pub lag_messages: AtomicU64,
    /// Nanoseconds since the Unix epoch at which the last applied message was published.
    pub applied_published_ns: AtomicU64,
    pub diverged: Mutex<Option<String>>,
}

/// The first stream sequence holding journal records at or after `journal_next` (the stream's
/// last sequence + 1 when it holds none). Binary search on the `Clearhouse-Last` headers.
pub async fn locate(stream: &Stream, journal_next: u64) -> Result<u64, ReplicationError> {
    // The stream may discard its oldest messages while this searches: try again from fresh
    // bounds (a few times, then give the error).
    let mut attempt = 0;
    loop {
        match locate_once(stream, journal_next).await {
            Err(ReplicationError::Nats(reason)) if attempt < 5 => {
                attempt += 1;
                tracing::debug!(%reason, attempt, "locating in the stream again");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => return other,
        }
    }
}

async fn locate_once(stream: &Stream, journal_next: u64) -> Result<u64, ReplicationError> {
    let info = stream.get_info().await.map_err(nats)?;
    let (first, last) = (info.state.first_sequence, info.state.last_sequence);
    if last == 0 || info.state.messages == 0 {
        return Ok(last + 1);
    }
    let last_of = |seq: u64| async move {
        let message = stream.get_raw_message(seq).await.map_err(nats)?;
        let headers = Some(&message.headers);
        let (Some(f), Some(l)) = (
            wire::header_u64(headers, wire::FIRST),
            wire::header_u64(headers, wire::LAST),
        ) else {
            return Err(ReplicationError::Stream(format!(
                "message {seq} lacks its journal range headers"
            )));
        };
        Ok::<(u64, u64), ReplicationError>((f, l))
    };
    let (mut lo, mut hi) = (first, last + 1);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if last_of(mid).await?.1 >= journal_next {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    if lo == first {
        let (f, _) = last_of(first).await?;
        if f > journal_next {
            return Err(ReplicationError::Trimmed(format!(
                "the stream's first message (sequence {first}) starts at journal record {f}, this node needs {journal_next}"
            )));
        }
    }
    Ok(lo)
}

/// The [`TailCheck`] against the stream: keeps the local records the stream holds byte for byte.
pub struct StreamTail {
    pub stream: Stream,
    pub runtime: tokio::runtime::Handle,
}

impl TailCheck for StreamTail {
    fn keep_through(&self, checkpoint_seq: u64, tail: &[Record]) -> Result<u64, String> {
        if tail.is_empty() {
            return Ok(checkpoint_seq);
        }
        self.runtime.block_on(async {
            let mut seq = locate(&self.stream, checkpoint_seq + 1)
                .await
                .map_err(|e| e.to_string())?;
            let mut kept = checkpoint_seq;
            let mut local = tail.iter().peekable();
            let last = self
                .stream
                .get_info()
                .await
                .map_err(|e| e.to_string())?
                .state
                .last_sequence;
            while seq <= last && local.peek().is_some() {
                let message = self
                    .stream
                    .get_raw_message(seq)
                    .await
                    .map_err(|e| e.to_string())?;
                seq += 1;
                if wire::header(Some(&message.headers), wire::KIND) != Some("group") {
                    continue;
                }
                for record in wire::decode(&message.payload)? {
                    if record.seq <= kept {
                        continue;
                    }
                    match local.next() {
                        Some(mine) if *mine == record => kept = record.seq,
                        _ => return Ok(kept),
                    }
                }
            }
            Ok(kept)
        })
    }
}

/// Applies the stream to a follower node from where its journal ends, until `stop` is set.
/// Several ready messages are applied as one group (one fdatasync).
pub async fn follow(
    stream: Stream,
    node: Node,
    status: Arc<FollowerStatus>,
    stop: Arc<AtomicBool>,
) -> Result<(), ReplicationError> {
    let mut expected = locate(&stream, node.committed_seq() + 1).await?;
    let consumer = stream
        .create_consumer(OrderedConfig {
            deliver_policy: DeliverPolicy::ByStartSequence {
                start_sequence: expected,
            },
            ..Default::default()
        })
        .await
        .map_err(nats)?;
    let mut messages = consumer.messages().await.map_err(nats)?;
    status
        .applied_stream_seq
        .store(expected.saturating_sub(1), Ordering::SeqCst);
    let mut records: Vec<Record> = Vec::new();
    let mut chain: Option<(u64, [u8; 32])> = None;
    while !stop.load(Ordering::SeqCst) {
        let first = match tokio::time::timeout(Duration::from_millis(100), messages.next()).await {
            Err(_) => continue,
            Ok(None) => return Err(ReplicationError::Stream("the consumer ended".into())),
            Ok(Some(message)) => message.map_err(nats)?,
        };
        let mut batch = vec![first];
        while batch.len() < 256 {
            match messages.next().now_or_never() {
                Some(Some(message)) => batch.push(message.map_err(nats)?),
                _ => break,
            }
        }
        let mut last_applied = None;
        for message in batch {
            let info = message.info().map_err(nats)?;
            let (seq, pending, published) = (
                info.stream_sequence,
                info.pending,
                info.published.unix_timestamp_nanos(),
            );
            if seq < expected {
                continue;
            }
            if seq > expected {
                return Err(ReplicationError::Trimmed(format!(
                    "stream message {expected} is gone (the next is {seq})"
                )));
            }
            expected = seq + 1;
            let headers = message.headers.as_ref();
            match wire::header(headers, wire::KIND) {
                Some("group") => {
                    let decoded = wire::decode(&message.payload).map_err(|reason| {
                        ReplicationError::Stream(format!("message {seq}: {reason}"))
                    })?;
                    records.extend(decoded);
                    if let Some(value) = wire::header(headers, wire::CHAIN) {
                        chain = wire::parse_chain(value);
                    }
                }
                Some("barrier") => {
                    // A new term: its leader had applied exactly what this node has applied.
                    flush(&node, &mut records, &mut chain).await?;
                    let leader_last = wire::header_u64(headers, wire::LAST).unwrap_or(0);
                    let mine = node.committed_seq();
                    if leader_last != mine {
                        return diverged(
                            &status,
                            format!(
                                "barrier at stream sequence {seq}: the new leader had applied journal record {leader_last}, this node {mine}"
                            ),
                        );
                    }
                }
                other => {
                    return Err(ReplicationError::Stream(format!(
                        "message {seq} has unknown kind {other:?}"
                    )))
                }
            }
            last_applied = Some((seq, pending, published));
        }
        flush(&node, &mut records, &mut chain)
            .await
            .inspect_err(|error| {
                if let ReplicationError::Diverged(reason) = error {
                    *status.diverged.lock().expect("status") = Some(reason.clone());
                }
            })?;
        if let Some((seq, pending, published)) = last_applied {
            status.applied_stream_seq.store(seq, Ordering::SeqCst);
            status.lag_messages.store(pending, Ordering::SeqCst);
            status
                .applied_published_ns
                .store(published.max(0) as u64, Ordering::SeqCst);
        }
    }
    Ok(())
}

fn diverged(status: &FollowerStatus, reason: String) -> Result<(), ReplicationError> {
    tracing::error!(%reason, "this node diverges from the replicated stream; it stops applying");
    *status.diverged.lock().expect("status") = Some(reason.clone());
    Err(ReplicationError::Diverged(reason))
}

async fn flush(
    node: &Node,
    records: &mut Vec<Record>,
    chain: &mut Option<(u64, [u8; 32])>,
) -> Result<(), ReplicationError> {
    if records.is_empty() {
        return Ok(());
    }
    let (node, batch, expected_chain) = (node.clone(), std::mem::take(records), chain.take());
    tokio::task::spawn_blocking(move || node.apply(batch, expected_chain))
        .await
        .map_err(|e| ReplicationError::Stream(e.to_string()))?
        .map_err(|error| match error {
            clearhouse_engine::EngineError::Diverged(reason) => ReplicationError::Diverged(reason),
            clearhouse_engine::EngineError::Stopped { reason } if reason.contains("diverges") => {
                ReplicationError::Diverged(reason)
            }
            other => ReplicationError::Stream(other.to_string()),
        })?;
    Ok(())
}
