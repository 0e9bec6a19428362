//! The leader lease: one key in a JetStream key-value bucket whose entries expire after the
//! TTL (the bucket's `max_age`). Taken with create (fails while a live entry exists), renewed
//! with update by revision (fails once anyone else wrote it), released with a purge by revision.
//!
//! The lease only decides who should try to write; it is not what keeps money safe (the
//! stream's expected last sequence is). The leader's own view of its validity is measured on its
//! monotonic clock from when a renewal was *sent*, minus a guard for clock drift.

use std::time::{Duration, Instant};

use async_nats::jetstream::kv::{self, Operation};
use serde::{Deserialize, Serialize};

use crate::{nats, ReplicationError};

const KEY: &str = "leader";
/// Subtracted from the TTL for the leader's own view of its validity.
pub const GUARD: Duration = Duration::from_millis(300);

/// The lease's value: who leads and where participants reach it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Holder {
    pub node_id: String,
    pub advertise: String,
}

pub struct Lease {
    store: kv::Store,
    ttl: Duration,
}

/// A lease this node holds.
#[derive(Clone, Debug)]
pub struct Held {
    /// The revision of the latest write (the term is the revision it was created with).
    pub revision: u64,
    pub term: u64,
    /// This node must stop acting as leader at this instant unless a renewal succeeds first.
    pub valid_until: Instant,
}

impl Lease {
    pub fn new(store: kv::Store, ttl: Duration) -> Lease {
        Lease { store, ttl }
    }

    /// The current holder, if the lease is held (None when expired, released or never taken).
    pub async fn holder(&self) -> Result<Option<Holder>, ReplicationError> {
        match self.store.entry(KEY).await.map_err(nats)? {
            Some(entry) if entry.operation == Operation::Put => {
                Ok(serde_json::from_slice(&entry.value).ok())
            }
            _ => Ok(None),
        }
    }

    /// Takes the lease if nobody holds it.
    pub async fn try_acquire(&self, me: &Holder) -> Result<Option<Held>, ReplicationError> {
        let sent = Instant::now();
        let value = serde_json::to_vec(me).expect("json").into();
        match self.store.create(KEY, value).await {
            Ok(revision) => Ok(Some(Held {
                revision,
                term: revision,
                valid_until: sent + self.ttl.saturating_sub(GUARD),
            })),
            Err(error) if error.kind() == kv::CreateErrorKind::AlreadyExists => Ok(None),
            Err(error) => Err(nats(error)),
        }
    }

    /// Renews a held lease. `Deposed` when someone else wrote it since.
    pub async fn renew(&self, me: &Holder, held: &mut Held) -> Result<(), ReplicationError> {
        let sent = Instant::now();
        let value = serde_json::to_vec(me).expect("json").into();
        match self.store.update(KEY, value, held.revision).await {
            Ok(revision) => {
                held.revision = revision;
                held.valid_until = sent + self.ttl.saturating_sub(GUARD);
                Ok(())
            }
            Err(error) if error.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                Err(ReplicationError::Deposed(format!(
                    "the lease was written by another node: {error}"
                )))
            }
            Err(error) => Err(nats(error)),
        }
    }

    /// Gives the lease up at once (a graceful stop), so a standby need not wait for the TTL.
    pub async fn release(&self, held: &Held) -> Result<(), ReplicationError> {
        self.store
            .purge_expect_revision(KEY, Some(held.revision))
            .await
            .map_err(nats)
    }
}
