//! Replication as simulated components (`SimOptions::replicated`): the replicated log (a vector
//! of groups with the stream's rules: only the leader appends, an acknowledged group is in it),
//! the lease (a holder and an expiry on the simulated clock), and a standby node on a second data
//! directory that applies the log with a lag.
//!
//! Faults: the leader's group lost before the log stored it, or stored with its ack lost (the
//! leader stops answering either way: outcome unknown), or a power loss during its local write
//! (never submitted), or a partition (the leader, alive, cut off from the log: see
//! [`World::partition`]). Each ends in a failover: the lease expires on the clock, the standby
//! applies the rest of the log, checks the barrier (its journal ends where the log does), and
//! becomes the leader; the old leader's directory restarts as the standby, cutting the records
//! the log never stored. The model is the same as for a single node, with one rule changed: a
//! write is durable when the log holds it, not when the old leader's disk does.

use std::sync::Mutex;

use clearhouse_engine::replica::{
    GroupLog, ReplicaTicket, ReplicatedGroup, Replication, TailCheck, TailCheckHandle,
};
use clearhouse_journal::Record;

use crate::*;

/// The lease's TTL on the simulated clock.
pub(crate) const LEASE_TTL_MS: u64 = 2_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LogFault {
    /// The next group is not stored; its ticket fails.
    PublishLost,
    /// The next group is stored; its ticket fails.
    AckLost,
}

#[derive(Default)]
pub(crate) struct SimLog {
    groups: Mutex<Vec<ReplicatedGroup>>,
    armed: Mutex<Option<LogFault>>,
    /// The fault that ended the last term (read when the new leader resolves what it
    /// interrupted).
    tripped: Mutex<Option<LogFault>>,
    /// Like the real publisher: after a failed group, every later group of the term fails.
    term_failed: Mutex<bool>,
    /// The term of the last takeover's barrier: a leader of an earlier term is refused, as the
    /// stream refuses a publish whose expected last sequence is stale.
    fence: Mutex<u64>,
    /// The term whose leader is cut off from the log (a partition), if any.
    cut_off: Mutex<Option<u64>>,
}

impl SimLog {
    pub(crate) fn arm(&self, fault: Option<LogFault>) {
        *self.armed.lock().expect("log") = fault;
        *self.tripped.lock().expect("log") = None;
    }
    /// A new term (after a failover, its barrier): the new leader's groups are taken again, and
    /// any leader of an earlier term is fenced off.
    pub(crate) fn new_term(&self, term: u64) {
        *self.term_failed.lock().expect("log") = false;
        *self.fence.lock().expect("log") = term;
    }
    /// Cuts the leader of `term` off from the log (`None`: the partition heals).
    pub(crate) fn cut_off(&self, term: Option<u64>) {
        *self.cut_off.lock().expect("log") = term;
    }
    pub(crate) fn tripped(&self) -> Option<LogFault> {
        *self.tripped.lock().expect("log")
    }
    pub(crate) fn len(&self) -> usize {
        self.groups.lock().expect("log").len()
    }
    pub(crate) fn groups(&self, from: usize, to: usize) -> Vec<ReplicatedGroup> {
        self.groups.lock().expect("log")[from..to].to_vec()
    }
    /// The last journal sequence the log holds.
    pub(crate) fn last_journal_seq(&self) -> u64 {
        self.groups
            .lock()
            .expect("log")
            .iter()
            .rev()
            .find_map(|g| g.records.last().map(|r| r.seq))
            .unwrap_or(0)
    }
}

/// One leader's view of the log: its term decides whether the log takes its groups.
pub(crate) struct SimLogHandle {
    pub(crate) log: Arc<SimLog>,
    pub(crate) term: u64,
}

impl GroupLog for SimLogHandle {
    fn submit(&self, group: ReplicatedGroup) -> ReplicaTicket {
        if *self.log.cut_off.lock().expect("log") == Some(self.term) {
            let (sender, ticket) = ReplicaTicket::new();
            sender.resolve(Err("the log is unreachable".into()));
            return ticket;
        }
        let fence = *self.log.fence.lock().expect("log");
        if self.term < fence {
            let (sender, ticket) = ReplicaTicket::new();
            sender.resolve(Err(format!(
                "wrong last sequence: term {fence} took over after this leader's term {}",
                self.term
            )));
            return ticket;
        }
        self.log.submit(group)
    }

    fn available(&self) -> bool {
        *self.log.cut_off.lock().expect("log") != Some(self.term)
    }
}

impl SimLog {
    fn submit(&self, group: ReplicatedGroup) -> ReplicaTicket {
        let (sender, ticket) = ReplicaTicket::new();
        if *self.term_failed.lock().expect("log") {
            sender.resolve(Err("an earlier group of this term failed".into()));
            return ticket;
        }
        let fault = self.armed.lock().expect("log").take();
        let mut groups = self.groups.lock().expect("log");
        // A group must continue the log (only the leader appends, in order).
        let last = groups
            .iter()
            .rev()
            .find_map(|g| g.records.last().map(|r| r.seq))
            .unwrap_or(0);
        if group.records.first().map(|r| r.seq) != Some(last + 1) {
            sender.resolve(Err(format!(
                "the log's last journal record is {last}; a group starting at {:?} does not follow it",
                group.records.first().map(|r| r.seq)
            )));
            return ticket;
        }
        match fault {
            None => {
                groups.push(group);
                sender.resolve(Ok(groups.len() as u64));
            }
            Some(LogFault::AckLost) => {
                groups.push(group);
                *self.term_failed.lock().expect("log") = true;
                *self.tripped.lock().expect("log") = fault;
                sender.resolve(Err("the ack was lost".into()));
            }
            Some(LogFault::PublishLost) => {
                *self.term_failed.lock().expect("log") = true;
                *self.tripped.lock().expect("log") = fault;
                sender.resolve(Err("the publish was lost".into()));
            }
        }
        ticket
    }
}

/// The tail check against the simulated log: keeps the local records it holds byte for byte.
struct SimTail(Arc<SimLog>);

impl TailCheck for SimTail {
    fn keep_through(&self, checkpoint_seq: u64, tail: &[Record]) -> Result<u64, String> {
        let groups = self.0.groups.lock().expect("log");
        let mut kept = checkpoint_seq;
        let mut stored = groups.iter().flat_map(|g| g.records.iter());
        for mine in tail {
            match stored.find(|r| r.seq >= mine.seq) {
                Some(record) if record == mine => kept = mine.seq,
                _ => break,
            }
        }
        Ok(kept)
    }
}

pub(crate) struct SimLease {
    pub(crate) holder: usize,
    pub(crate) term: u64,
    /// The holder renews while it runs; a dead holder's lease expires at this instant.
    pub(crate) expires_ns: u64,
}

pub(crate) struct Replica {
    pub(crate) log: Arc<SimLog>,
    pub(crate) lease: SimLease,
    pub(crate) dirs: [PathBuf; 2],
    pub(crate) leader: usize,
    pub(crate) standby: Option<Node>,
    /// Log groups the standby has applied.
    pub(crate) applied: usize,
    /// A deposed leader still runs on the standby's directory: no standby starts there yet.
    pub(crate) hold_standby: bool,
}

impl Replica {
    pub(crate) fn new(data_dir: &std::path::Path) -> Replica {
        Replica {
            log: Arc::new(SimLog::default()),
            lease: SimLease {
                holder: 0,
                term: 1,
                expires_ns: 0,
            },
            dirs: [data_dir.join("n0"), data_dir.join("n1")],
            leader: 0,
            standby: None,
            applied: 0,
            hold_standby: false,
        }
    }
}

pub(crate) fn node_options(dir: &std::path::Path, clock: &SimClock) -> NodeOptions {
    let mut options = NodeOptions::new(dir);
    options.clock = Some(clock.shared());
    options.journal.segment_size = 4 * 1024 * 1024;
    options.disk_free_min_bytes = 16 * 1024 * 1024;
    options.unindexed_transfers_max = 100_000;
    // As the switch runs (crates/cli's switch_node_options): no account history.
    options.account_history = false;
    options
}

impl World {
    /// The leader node's replication role (None when not replicated).
    pub(crate) fn leader_replication(&self) -> Replication {
        match &self.replica {
            Some(replica) => Replication::Leader(Arc::new(SimLogHandle {
                log: replica.log.clone(),
                term: replica.lease.term,
            })),
            None => Replication::None,
        }
    }

    /// Starts the standby node on the other directory (cutting what the log never stored).
    pub(crate) fn start_standby(&mut self) -> Outcome {
        let clock = self.clock.clone();
        let Some(replica) = self.replica.as_mut() else {
            return Ok(());
        };
        let dir = replica.dirs[1 - replica.leader].clone();
        let mut options = node_options(&dir, &clock);
        options.replication = Replication::Follower;
        options.tail_check = Some(TailCheckHandle(Arc::new(SimTail(replica.log.clone()))));
        let node = Node::start(options).map_err(|e| format!("standby start: {e}"))?;
        let cut = node.recovery_report().unreplicated_records_cut;
        let committed = node.committed_seq();
        // Where the standby's journal ends in the log: it applies the groups after it.
        let groups = replica.log.groups(0, replica.log.len());
        replica.applied = groups
            .iter()
            .position(|g| g.records.last().is_some_and(|r| r.seq > committed))
            .unwrap_or(groups.len());
        replica.standby = Some(node);
        self.report.faults.unreplicated_records_cut += cut;
        self.trace(format!(
            "standby n{} started at journal record {committed}{}",
            1 - self.replica.as_ref().expect("replica").leader,
            if cut > 0 {
                format!(", {cut} records the log never stored cut")
            } else {
                String::new()
            }
        ));
        Ok(())
    }

    /// The standby applies up to `count` more log groups (it lags by the rest).
    pub(crate) fn standby_apply(&mut self, count: usize) -> Outcome {
        let Some(replica) = self.replica.as_mut() else {
            return Ok(());
        };
        let Some(node) = replica.standby.clone() else {
            return Ok(());
        };
        let to = replica.applied.saturating_add(count).min(replica.log.len());
        for group in replica.log.groups(replica.applied, to) {
            node.apply(group.records, Some((group.chain_seq, group.chain_hash)))
                .map_err(|e| format!("the standby diverges from the log: {e}"))?;
        }
        replica.applied = to;
        Ok(())
    }

    /// After the leader died: the lease expires, the standby applies the rest of the log and
    /// takes over (barrier: its journal ends where the log ends), the old leader's directory
    /// becomes the standby.
    pub(crate) fn failover(&mut self) -> Outcome {
        let expires = self.replica.as_ref().expect("replica").lease.expires_ns;
        if self.clock.now_ns() < expires {
            self.clock.advance(expires - self.clock.now_ns());
        }
        self.standby_apply(usize::MAX)?;
        let replica = self.replica.as_mut().expect("replica");
        let node = replica.standby.take().ok_or("no standby to take over")?;
        let (committed, in_log) = (node.committed_seq(), replica.log.last_journal_seq());
        if committed != in_log {
            return Err(format!(
                "barrier: the standby applied journal record {committed} but the log ends at {in_log}"
            ));
        }
        drop(node);
        let old = replica.leader;
        replica.leader = 1 - old;
        replica.lease = SimLease {
            holder: replica.leader,
            term: replica.lease.term + 1,
            expires_ns: 0,
        };
        replica.log.new_term(replica.lease.term);
        let (term, new_dir, old_dir) = (
            replica.lease.term,
            replica.dirs[replica.leader].clone(),
            replica.dirs[old].clone(),
        );
        // Every node holds the same operator keys.
        for key in [
            "operator.key",
            "operator-ed25519.key",
            "operator-ed25519.pub",
        ] {
            if !new_dir.join(key).exists() && old_dir.join(key).exists() {
                std::fs::copy(old_dir.join(key), new_dir.join(key))
                    .map_err(|e| format!("copying {key}: {e}"))?;
            }
        }
        self.data_dir = new_dir;
        self.report.faults.failovers += 1;
        self.trace(format!(
            "failover: n{} leads (term {term}) from journal record {committed}",
            1 - old
        ));
        self.start()
    }

    /// A partition: the leader, alive, is cut off from the log. It refuses new work (nothing
    /// changes); its lease lapses and the standby takes over while it still runs; then the
    /// partition heals and the deposed leader tries to write again: the log refuses it (the new
    /// term's barrier fences it off), so it acknowledges nothing. Then it stops, and its directory
    /// restarts as the standby, cutting the record the log refused.
    pub(crate) fn partition(&mut self) -> Outcome {
        let term = self.replica.as_ref().expect("replica").lease.term;
        let log = self.replica.as_ref().expect("replica").log.clone();
        log.cut_off(Some(term));
        self.report.faults.partitions += 1;
        let bank = self.rng.below(PREFUNDED as u64) as usize;
        let bic = self.banks[bank].bic.clone();
        let probe = |n: u64| LiquidityRequest {
            request_id: format!("LIQ-PARTITION-{term}-{n}"),
            currency: CURRENCY.into(),
            amount: format_amount(1, EXPONENT),
            direction: LiquidityDirection::In,
        };
        let switch = self.live().switch.clone();
        let refused = self.block_on(switch.liquidity(&bic, probe(1))).is_err();
        drop(switch);
        if !refused {
            return Err("a leader cut off from the log acknowledged a liquidity transfer".into());
        }
        self.trace(format!(
            "partition: n{} (term {term}) cut off from the log; it refuses work",
            self.replica.as_ref().expect("replica").leader
        ));
        // Its lease runs out a TTL after its last renewal; the standby takes over meanwhile.
        let now = self.clock.now_ns();
        let replica = self.replica.as_mut().expect("replica");
        replica.lease.expires_ns = now + LEASE_TTL_MS * 1_000_000;
        replica.hold_standby = true;
        let deposed = self.orphan_live();
        self.failover()?;
        // The partition heals: the deposed leader, still running, tries again.
        log.cut_off(None);
        let groups = log.len();
        let answer = deposed.as_ref().map(|live| {
            let switch = live.switch.clone();
            live.runtime.block_on(switch.liquidity(&bic, probe(2)))
        });
        if let Some(Ok(_)) = answer {
            return Err(
                "a deposed leader acknowledged a liquidity transfer after the takeover".into(),
            );
        }
        if log.len() != groups {
            return Err("the log took a group from a deposed leader".into());
        }
        self.trace("partition healed: the deposed leader's write was refused by the log".into());
        drop(deposed);
        let replica = self.replica.as_mut().expect("replica");
        replica.hold_standby = false;
        self.start_standby()?;
        self.pump()
    }

    /// The standby, caught up, holds exactly what the log holds, which ends at the leader's
    /// voucher chain head (each record was replayed with its sealed results checked); the lease
    /// is held by the leader.
    pub(crate) fn check_standby(&mut self) -> Outcome {
        if self.replica.is_none() {
            return Ok(());
        }
        self.standby_apply(usize::MAX)?;
        let leader = self.live().node.clone();
        let replica = self.replica.as_ref().expect("replica");
        if replica.lease.holder != replica.leader {
            return Err(format!(
                "n{} leads but n{} holds the lease",
                replica.leader, replica.lease.holder
            ));
        }
        let Some(standby) = replica.standby.clone() else {
            return Ok(());
        };
        let in_log = replica
            .log
            .groups(0, replica.applied)
            .iter()
            .rev()
            .find_map(|g| g.records.last().map(|r| r.seq))
            .unwrap_or(0);
        let (a, b) = (
            leader.stats().map_err(|e| format!("leader stats: {e}"))?,
            standby.stats().map_err(|e| format!("standby stats: {e}"))?,
        );
        if b.committed_seq != in_log {
            return Err(format!(
                "the standby applied the log to journal record {} but the log ends at {in_log}",
                b.committed_seq
            ));
        }
        if (a.chain_seq, a.chain_hash) != (b.chain_seq, b.chain_hash) {
            return Err(format!(
                "the caught-up standby's voucher chain ({} vouchers) differs from the leader's ({})",
                b.chain_seq, a.chain_seq
            ));
        }
        self.report.checks += 1;
        Ok(())
    }
}
