//! The engine's side of replication: the hooks a replicated log (crate `clearhouse-replication`)
//! plugs into, with no network code here.
//!
//! A leader node hands every written group's records to a [`GroupLog`] and answers the group
//! only when it is both fdatasync'ed locally and stored by the log (its [`ReplicaTicket`]
//! resolved). A follower node executes nothing of its own: it appends the leader's records
//! verbatim and replays them ([`crate::Node::apply`]); a tail check at start
//! ([`TailCheck`]) cuts local records the log never stored.

use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::time::Duration;

use clearhouse_journal::Record;

/// One journal group on its way to the replicated log.
#[derive(Clone, Debug)]
pub struct ReplicatedGroup {
    pub records: Vec<Record>,
    /// The voucher chain's head after the group: (vouchers so far, hash of the last).
    pub chain_seq: u64,
    pub chain_hash: [u8; 32],
}

/// Where a leader replicates its groups. Implementations keep groups in submission order.
pub trait GroupLog: Send + Sync {
    /// Starts storing a group; the ticket resolves once the log stored it, or failed to.
    fn submit(&self, group: ReplicatedGroup) -> ReplicaTicket;
    /// False while the log cannot take groups (no quorum, publishing paused): the engine then
    /// refuses writes before executing them, so nothing changes.
    fn available(&self) -> bool;
}

/// Checks, at start, the journal records after the index's checkpoint against the replicated
/// log: returns the last journal sequence to keep. Records after it were written by this node as
/// a leader and never stored by the log (never acknowledged): they are cut before recovery.
pub trait TailCheck: Send + Sync {
    fn keep_through(&self, checkpoint_seq: u64, tail: &[Record]) -> Result<u64, String>;
}

/// The pending outcome of one submitted group: the log's position for it, or why it failed.
pub struct ReplicaTicket(Receiver<Result<u64, String>>);

/// The sending half of a [`ReplicaTicket`], kept by the log.
pub struct TicketSender(SyncSender<Result<u64, String>>);

impl TicketSender {
    pub fn resolve(self, outcome: Result<u64, String>) {
        let _ = self.0.try_send(outcome);
    }
}

impl ReplicaTicket {
    pub fn new() -> (TicketSender, ReplicaTicket) {
        let (sender, receiver) = mpsc::sync_channel(1);
        (TicketSender(sender), ReplicaTicket(receiver))
    }

    /// Waits for the outcome, at most `timeout`.
    pub fn wait(self, timeout: Duration) -> Result<u64, String> {
        match self.0.recv_timeout(timeout) {
            Ok(outcome) => outcome,
            Err(RecvTimeoutError::Timeout) => Err(format!(
                "the replicated log did not store the group within {} ms",
                timeout.as_millis()
            )),
            Err(RecvTimeoutError::Disconnected) => {
                Err("the replicated log stopped before storing the group".into())
            }
        }
    }
}

/// How a node takes part in replication.
#[derive(Clone, Default)]
pub enum Replication {
    /// A single node: nothing replicated (the default).
    #[default]
    None,
    /// The leader: every group goes to the log before it is answered.
    Leader(Arc<dyn GroupLog>),
    /// A follower: applies the leader's records ([`crate::Node::apply`]), refuses client writes,
    /// expires nothing on its own clock.
    Follower,
}

impl std::fmt::Debug for Replication {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Replication::None => "None",
            Replication::Leader(_) => "Leader",
            Replication::Follower => "Follower",
        })
    }
}

/// A [`TailCheck`] for [`crate::NodeOptions`] (Debug for the options' sake).
#[derive(Clone)]
pub struct TailCheckHandle(pub Arc<dyn TailCheck>);

impl std::fmt::Debug for TailCheckHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TailCheck")
    }
}

/// How long the sync thread waits for a ticket before it gives the group up (the log's own
/// retries are bounded well below this).
pub const TICKET_WAIT_MAX: Duration = Duration::from_secs(30);
