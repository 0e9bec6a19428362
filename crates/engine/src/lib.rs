//! clearhouse-engine: the durable ledger node.
//!
//! It does: run the ledger state machine on one thread; journal each batch and fsync a whole
//! group of batches at once (group commit) before answering any of them; prefetch from the
//! on-disk index the transfers a batch names that are not in memory; index every transfer and
//! account event in redb on a second thread; checkpoint (fsync the index with all accounts) at
//! intervals and delete the journal segments a checkpoint covers; recover by loading the last
//! checkpoint and replaying the journal after it; expire pending transfers with journaled pulses.
//!
//! It deliberately does not: speak any network protocol (the server and CLI do), know payments or
//! participants (it stores the switch's records as opaque bytes), or trust the clock beyond stamping batches (the clock is read
//! here, once per batch, and journaled, so replay never reads it).

pub mod codec;
pub mod compact;
pub mod index;
pub mod node;
pub mod replica;
pub mod voucher_pack;
pub mod vouchers;

pub use codec::{Prune, RecordPut};
pub use index::INDEX_CACHE_BYTES_DEFAULT;
pub use index::QUERY_LIMIT_MAX;
pub use node::{MetricsSnapshot, Node, NodeOptions, NodeStats, RecoveryReport, SubmitOutcome};
pub use vouchers::{Voucher, VoucherStamp};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Journal(#[from] clearhouse_journal::JournalError),
    #[error("index: {context}: {message}")]
    Index {
        context: &'static str,
        message: String,
    },
    #[error(transparent)]
    Codec(#[from] codec::CodecError),
    #[error("batch refused: {0}")]
    Batch(#[from] clearhouse_ledger::BatchError),
    #[error("engine: the request queue is full ({limit} requests); retry later")]
    Overloaded { limit: usize },
    #[error("engine: stopped: {reason}")]
    Stopped { reason: String },
    #[error("engine: disk full: {free_bytes} bytes free in {path}, at least {required_bytes} are kept free for the journal and index; request refused, nothing changed")]
    DiskFull {
        path: std::path::PathBuf,
        free_bytes: u64,
        required_bytes: u64,
    },
    #[error("engine: the data directory {path} is on a read-only filesystem; request refused, nothing changed")]
    ReadOnly { path: std::path::PathBuf },
    #[error("engine: record {key:#x} refused: {reason}")]
    RecordRefused { key: u128, reason: String },
    #[error("engine: recovery failed: {0}")]
    Recovery(String),
    #[error("engine: this node is a standby; writes go to the leader")]
    NotLeader,
    #[error("engine: records from the leader sent to a node that is not a follower")]
    NotFollower,
    #[error("engine: the replicated log cannot take writes now (no quorum or publishing paused); request refused, nothing changed")]
    ReplicationUnavailable,
    #[error("engine: this node's history diverges from the leader's: {0}")]
    Diverged(String),
}
