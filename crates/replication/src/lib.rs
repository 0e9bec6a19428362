//! clearhouse-replication: high availability on NATS JetStream.
//!
//! It does: publish every journal group of the leader to a 3-replica JetStream stream with
//! `Nats-Expected-Last-Sequence` (fencing: a deposed leader's next publish fails, whatever the
//! clocks say) and hand the engine a ticket that resolves once the stream's quorum stored it
//! ([`publisher`]); follow the stream on standbys and apply each group through the engine's
//! follower path, with the voucher chain checked after each group ([`follower`]); cut, at start,
//! journal records a node wrote as leader that the stream never stored ([`follower::StreamTail`]);
//! elect the leader with a key-value lease (TTL, compare-and-set by revision) ([`lease`]); start
//! a NATS cluster on loopback for tests and the HA demo ([`testing`]).
//!
//! It deliberately does not: implement consensus (NATS does), decide what a payment is (the
//! switch does), or trust the lease for safety: two nodes that both believe they lead can never
//! both append, because the stream checks the expected last sequence in its own log order.
//! Snapshots ([`snapshot`]) bring back a node the stream was trimmed past.

pub mod follower;
pub mod lease;
pub mod publisher;
pub mod snapshot;
pub mod testing;
pub mod wire;

use std::time::Duration;

pub use async_nats::jetstream::stream::Stream;

use async_nats::jetstream::{self, stream};

/// The `[replication]` section of a node's configuration.
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicationConfig {
    /// This node's name (unique in the cluster; shown in the lease and in logs).
    pub node_id: String,
    /// The NATS servers (all of them: the client moves to another when one fails).
    pub nats_urls: Vec<String>,
    /// The URL participants use to reach this node when it leads (in 503 `not_leader` answers).
    pub advertise: String,
    /// Never take the lease: a read-only follower (disaster-recovery copy, reporting).
    #[serde(default)]
    pub standby_only: bool,
    #[serde(default = "default_stream")]
    pub stream: String,
    #[serde(default = "default_replicas")]
    pub replicas: usize,
    /// Stream retention in bytes (oldest messages are discarded beyond it: a node further
    /// behind than that cannot catch up from the stream).
    #[serde(default = "default_stream_max_bytes")]
    pub stream_max_bytes: i64,
    #[serde(default = "default_lease_ttl_ms")]
    pub lease_ttl_ms: u64,
    #[serde(default = "default_lease_renew_ms")]
    pub lease_renew_ms: u64,
    /// How long a leader retries one group's publish (no stream leader, lost connection) before
    /// it gives up and steps down.
    #[serde(default = "default_publish_retry_ms")]
    pub publish_retry_ms: u64,
    /// Stream retention in messages (-1: no limit but `stream_max_bytes`).
    #[serde(default = "default_stream_max_messages")]
    pub stream_max_messages: i64,
    /// A standby uploads a snapshot every this many stream messages it applied.
    #[serde(default = "default_snapshot_every_messages")]
    pub snapshot_every_messages: u64,
}

fn default_stream_max_messages() -> i64 {
    -1
}
fn default_snapshot_every_messages() -> u64 {
    100_000
}

fn default_stream() -> String {
    "CLEARHOUSE".into()
}
fn default_replicas() -> usize {
    3
}
fn default_stream_max_bytes() -> i64 {
    2 << 30
}
fn default_lease_ttl_ms() -> u64 {
    2_000
}
fn default_lease_renew_ms() -> u64 {
    400
}
fn default_publish_retry_ms() -> u64 {
    12_000
}

impl ReplicationConfig {
    pub fn subject(&self) -> String {
        format!("{}.journal", self.stream.to_lowercase())
    }
    pub fn lease_bucket(&self) -> String {
        format!("{}_lease", self.stream.to_lowercase())
    }
    pub fn lease_ttl(&self) -> Duration {
        Duration::from_millis(self.lease_ttl_ms)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    #[error("nats: {0}")]
    Nats(String),
    #[error("replicated stream: {0}")]
    Stream(String),
    #[error("this node diverges from the replicated stream: {0}")]
    Diverged(String),
    #[error("the stream no longer holds what this node needs: {0}; restore this node from another node's data directory")]
    Trimmed(String),
    #[error("deposed: {0}")]
    Deposed(String),
    #[error("this node does not belong to the cluster: {0}")]
    Identity(String),
}

pub(crate) fn nats<E: std::fmt::Display>(error: E) -> ReplicationError {
    ReplicationError::Nats(error.to_string())
}

/// Connects to the NATS cluster (reconnecting by itself to another server when one fails).
pub async fn connect(config: &ReplicationConfig) -> Result<jetstream::Context, ReplicationError> {
    let client = async_nats::ConnectOptions::new()
        .name(format!("clearhouse-{}", config.node_id))
        .retry_on_initial_connect()
        .connection_timeout(Duration::from_secs(2))
        .request_timeout(Some(Duration::from_secs(2)))
        .connect(config.nats_urls.clone())
        .await
        .map_err(nats)?;
    let context = jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(2))
        .build(client);
    Ok(context)
}

/// The journal stream and the lease bucket, created when missing (any node may; creation is
/// idempotent with the same configuration).
pub async fn ensure_objects(
    js: &jetstream::Context,
    config: &ReplicationConfig,
) -> Result<(stream::Stream, async_nats::jetstream::kv::Store), ReplicationError> {
    let journal = js
        .get_or_create_stream(stream::Config {
            name: config.stream.clone(),
            subjects: vec![config.subject()],
            retention: stream::RetentionPolicy::Limits,
            storage: stream::StorageType::File,
            num_replicas: config.replicas,
            max_bytes: config.stream_max_bytes,
            max_messages: config.stream_max_messages,
            max_message_size: wire::MESSAGE_BYTES_MAX as i32 + 64 * 1024,
            discard: stream::DiscardPolicy::Old,
            duplicate_window: Duration::from_secs(120),
            allow_direct: true,
            deny_delete: true,
            deny_purge: true,
            ..Default::default()
        })
        .await
        .map_err(nats)?;
    let lease = key_value_bucket(
        js,
        config,
        &config.lease_bucket(),
        stream::Config {
            max_age: config.lease_ttl(),
            duplicate_window: Duration::from_millis(config.lease_ttl_ms.min(120_000)),
            ..Default::default()
        },
    )
    .await?;
    Ok((journal, lease))
}

/// A key-value bucket (one value a key), created when missing as a stream with the key-value
/// layout: async-nats' create_key_value asks for account fields nats-server 2.9 does not send.
/// `extra` gives the bucket's own limits (age, duplicate window); the layout fields are set here.
async fn key_value_bucket(
    js: &jetstream::Context,
    config: &ReplicationConfig,
    bucket: &str,
    extra: stream::Config,
) -> Result<async_nats::jetstream::kv::Store, ReplicationError> {
    js.get_or_create_stream(stream::Config {
        name: format!("KV_{bucket}"),
        subjects: vec![format!("$KV.{bucket}.>")],
        storage: stream::StorageType::File,
        num_replicas: config.replicas,
        max_messages_per_subject: 1,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: stream::DiscardPolicy::New,
        ..extra
    })
    .await
    .map_err(nats)?;
    js.get_key_value(bucket).await.map_err(nats)
}

/// What every node of a cluster must share, recorded once in the `{stream}_meta` key-value bucket
/// by the first node: a fingerprint of the operator keys (BLAKE3 over the operator's HMAC key
/// file and the checkpoint signing public key; neither key is stored).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct ClusterIdentity {
    pub operator_keys_blake3: String,
    pub first_node: String,
}

/// Records the cluster's identity if none is, or checks this node's against it: a node whose
/// operator keys differ refuses to join (it would sign checkpoints nobody else's key verifies).
pub async fn check_identity(
    js: &jetstream::Context,
    config: &ReplicationConfig,
    operator_keys_blake3: String,
) -> Result<ClusterIdentity, ReplicationError> {
    let bucket = format!("{}_meta", config.stream.to_lowercase());
    let store = key_value_bucket(js, config, &bucket, stream::Config::default()).await?;
    let mine = ClusterIdentity {
        operator_keys_blake3,
        first_node: config.node_id.clone(),
    };
    let value = serde_json::to_vec(&mine).expect("json");
    match store.create("cluster", value.into()).await {
        Ok(_) => return Ok(mine),
        Err(error) if error.kind() == async_nats::jetstream::kv::CreateErrorKind::AlreadyExists => {
        }
        Err(error) => return Err(nats(error)),
    }
    let entry = store
        .entry("cluster")
        .await
        .map_err(nats)?
        .ok_or_else(|| ReplicationError::Identity("the cluster record vanished".into()))?;
    let recorded: ClusterIdentity = serde_json::from_slice(&entry.value)
        .map_err(|e| ReplicationError::Identity(format!("unreadable cluster record: {e}")))?;
    if recorded.operator_keys_blake3 != mine.operator_keys_blake3 {
        return Err(ReplicationError::Identity(format!(
            "its operator keys (fingerprint {}) differ from the cluster's ({}, recorded by node {}): copy operator.key, operator-ed25519.key and operator-ed25519.pub from a node of the cluster",
            &mine.operator_keys_blake3[..16],
            &recorded.operator_keys_blake3[..16.min(recorded.operator_keys_blake3.len())],
            recorded.first_node
        )));
    }
    Ok(recorded)
}
