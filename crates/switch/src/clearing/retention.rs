//! Retention: settled windows leave the hot store once the archive holds them, oldest first.
//!
//! The caller (the retention driver beside the archive, `clearhouse-export`) reads a window's
//! archive file back, checks it on its own (chain, signature), and hands this module the
//! (sequence, hash) of every voucher it holds. Here the archive is checked against the hot chain
//! voucher by voucher and against the window's signed checkpoint; only then does the window's
//! history leave the index, as journaled prunes of at most [`PRUNE_PAYMENTS_MAX`] payments each:
//! - a payment record becomes a 25-byte tombstone (its window and instruction alias), so a
//!   duplicate instruction is still refused and a status query says "archived"; its end-to-end
//!   and UETR aliases and its ledger transfers (reservation, post, void, offset leg) go;
//! - a return record goes with its alias and transfer;
//! - the last prune removes the window's vouchers and anchors the chain at the window's signed
//!   checkpoint, and drops the account-event chunks before the window's close.
//!
//! When the scheme's duplicate window has passed, [`Clearing::clear_tombstones`] removes the
//! tombstones and instruction aliases of a pruned window.
//!
//! Crash safety: each prune is one journal record; the state record is written after the last
//! one, and a rerun skips what is done (tombstones are recognised, and pruned vouchers are
//! recognised by the chain's anchor). Balances, accounts, participants, window reports and plans
//! stay hot.

use super::*;
use crate::stored::{decode, encode, Archived, Stored};
use clearhouse_engine::Prune;

/// Most payments (or returns) one journaled prune removes.
pub const PRUNE_PAYMENTS_MAX: usize = 4_096;

/// How far retention has gone (a record in the engine).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetentionState {
    /// Windows 1..=pruned_through have left the hot store (their payments are tombstones).
    pub pruned_through: u64,
    /// Windows 1..=cleared_through have no tombstones left either (duplicate window over).
    pub cleared_through: u64,
    /// The signed checkpoint the hot chain starts after (window `pruned_through`'s close).
    pub anchor: Option<Checkpoint>,
    /// Window `pruned_through`'s closing booked balances are kept (statements of later windows
    /// chain from them) in this many chunk records ([`KeyScheme::closings_chunk`]).
    #[serde(default)]
    pub closing_balances_chunks: u32,
    /// The same for window `pruned_through + 1`, written before its vouchers leave (a prune
    /// interrupted after that finds them).
    #[serde(default)]
    pub next_closing_balances_chunks: Option<u32>,
}

/// The records holding `balances` as chunks of window `window`, and how many.
fn closings_records(
    keys: KeyScheme,
    window: u64,
    balances: &clearhouse_clearing::statement::Balances,
) -> (Vec<RecordPut>, u32) {
    let rows: Vec<(&str, &str, String)> = balances
        .iter()
        .map(|((participant, currency), balance)| {
            (participant.as_str(), currency.as_str(), balance.to_string())
        })
        .collect();
    let bytes = serde_json::to_vec(&rows).expect("balances serialize");
    let puts: Vec<RecordPut> = bytes
        .chunks(PLAN_CHUNK_BYTES)
        .enumerate()
        .map(|(i, chunk)| RecordPut {
            key: keys.closings_chunk(window, i as u32),
            value: chunk.to_vec(),
            ..RecordPut::default()
        })
        .collect();
    let count = puts.len() as u32;
    (puts, count)
}

impl Clearing {
    /// The closing balances kept for pruned window `window` in `chunks` records.
    pub(super) async fn kept_closings(
        &self,
        window: u64,
        chunks: u32,
    ) -> Result<clearhouse_clearing::statement::Balances, ApiError> {
        let keys: Vec<u128> = (0..chunks)
            .map(|i| self.keys.closings_chunk(window, i))
            .collect();
        let values = {
            let node = self.node.clone();
            blocking(move || node.get_records(&keys)).await?
        };
        let mut bytes = Vec::new();
        for value in values {
            bytes.extend(value.ok_or_else(|| {
                internal(format!(
                    "window {window}'s kept closing balances are missing"
                ))
            })?);
        }
        if bytes.is_empty() {
            return Ok(Default::default());
        }
        let rows: Vec<(String, String, String)> =
            serde_json::from_slice(&bytes).map_err(internal)?;
        rows.into_iter()
            .map(|(participant, currency, balance)| {
                Ok((
                    (participant, currency),
                    balance.parse::<i128>().map_err(internal)?,
                ))
            })
            .collect()
    }
}

/// What pruning one window did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PruneReport {
    pub window: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    pub payments: u64,
    pub returns: u64,
    /// Journaled prunes it took (0: the window was already pruned).
    pub prunes: u64,
    /// The pruned payments' keys (for caches in front of the index to let go of them).
    #[serde(skip)]
    pub keys: Vec<u128>,
}

/// Reads the retention state of a node (blocking; for `verify` on a stopped data directory).
pub fn retention_state_of(node: &Node) -> Result<RetentionState, ApiError> {
    let keys = super::key_scheme_or_compact(node)?;
    match node.get_records(&[keys.retention_state()])?.pop().flatten() {
        None => Ok(RetentionState::default()),
        Some(bytes) => serde_json::from_slice(&bytes).map_err(internal),
    }
}

impl Clearing {
    pub async fn retention_state(&self) -> Result<RetentionState, ApiError> {
        Ok(
            read_json::<RetentionState>(&self.node, self.keys.retention_state())
                .await?
                .unwrap_or_default(),
        )
    }

    /// The first and last voucher of a closed window's archive file: from the one after the
    /// previous window's close through this window's close.
    pub async fn window_span(&self, window: u64) -> Result<(u64, u64), ApiError> {
        let last = self.closed_seq(window).await?.ok_or_else(|| {
            ApiError::new(409, "window_open", format!("window {window} is not closed"))
        })?;
        let first = match window {
            0 => return Err(ApiError::new(404, "not_found", "window 0")),
            1 => 1,
            _ => {
                self.closed_seq(window - 1)
                    .await?
                    .ok_or_else(|| internal(format!("window {} has no close", window - 1)))?
                    + 1
            }
        };
        Ok((first, last))
    }

    /// Prunes settled window `window` (the next after the last pruned) from the hot store.
    /// `archived` is the archive's (sequence, hash) of every voucher of the window's span, read
    /// back from the archive by the caller. Refused (409, nothing changed) when the window is
    /// not settled, not next, or the archive differs from the chain in any voucher.
    pub async fn prune_window(
        &self,
        window: u64,
        archived: &[(u64, [u8; 32])],
    ) -> Result<PruneReport, ApiError> {
        let _one_at_a_time = self.retention.lock().await;
        let refuse = |message: String| ApiError::new(409, "retention_refused", message);
        let mut state = self.retention_state().await?;
        let mut report = PruneReport {
            window,
            ..PruneReport::default()
        };
        if window <= state.pruned_through {
            return Ok(report);
        }
        if window != state.pruned_through + 1 {
            return Err(refuse(format!(
                "windows are pruned in order: the next is {}, not {window}",
                state.pruned_through + 1
            )));
        }
        let record = self
            .window_record(window)
            .await?
            .ok_or_else(|| ApiError::not_found("window"))?;
        if record.report.state != WindowState::Settled {
            return Err(refuse(format!("window {window} is not settled")));
        }
        let checkpoint = record
            .report
            .checkpoint
            .clone()
            .ok_or_else(|| refuse(format!("window {window} has no signed checkpoint")))?;
        let (first, last) = self.window_span(window).await?;
        (report.first_seq, report.last_seq) = (first, last);
        let expected = (last + 1).saturating_sub(first) as usize;
        if archived.len() != expected
            || archived
                .iter()
                .enumerate()
                .any(|(i, (seq, _))| *seq != first + i as u64)
        {
            return Err(refuse(format!(
                "the archive of window {window} holds {} vouchers, the chain {expected} ({first}..={last})",
                archived.len()
            )));
        }
        if archived.last().map(|(_, hash)| *hash) != Some(checkpoint.hash) {
            return Err(refuse(format!(
                "the archive of window {window} does not end at its signed checkpoint"
            )));
        }
        let anchor = {
            let node = self.node.clone();
            blocking(move || node.vouchers_anchor()).await?
        };
        if anchor.0 < last {
            if anchor.0 + 1 != first {
                return Err(refuse(format!(
                    "the hot chain starts after voucher {}, window {window} after {}",
                    anchor.0,
                    first - 1
                )));
            }
            // The archive against the hot chain, voucher by voucher; the keys to prune.
            let mut payments = Vec::new();
            let mut returns = Vec::new();
            let mut from = first;
            while from <= last {
                let page = {
                    let node = self.node.clone();
                    let limit = VOUCHER_PAGE.min((last + 1 - from) as usize);
                    blocking(move || node.vouchers(from, limit)).await?
                };
                if page.is_empty() || page[0].seq != from {
                    return Err(internal(format!(
                        "voucher {from} is missing from the hot chain"
                    )));
                }
                for voucher in &page {
                    let (seq, hash) = archived[(voucher.seq - first) as usize];
                    if seq != voucher.seq || hash != voucher.hash {
                        return Err(refuse(format!(
                            "the archive differs from the chain at voucher {}",
                            voucher.seq
                        )));
                    }
                    let key = |hex_key: &str| {
                        u128::from_str_radix(hex_key, 16)
                            .map_err(|_| internal(format!("voucher {seq}: bad key {hex_key:?}")))
                    };
                    match VoucherEvent::parse(&voucher.body).map_err(internal)? {
                        VoucherEvent::PaymentSettled { payment, .. }
                        | VoucherEvent::PaymentRejected { payment, .. } => {
                            payments.push(key(&payment)?)
                        }
                        VoucherEvent::PaymentReturned { return_key, .. } => {
                            returns.push(key(&return_key)?)
                        }
                        _ => {}
                    }
                }
                from = page.last().expect("not empty").seq + 1;
            }
            report.payments = payments.len() as u64;
            report.returns = returns.len() as u64;
            for chunk in payments.chunks(PRUNE_PAYMENTS_MAX) {
                let prune = self.prune_of(window, chunk).await?;
                self.submit_prune(prune).await?;
                report.prunes += 1;
            }
            report.keys = payments;
            for chunk in returns.chunks(PRUNE_PAYMENTS_MAX) {
                let prune = self.prune_of(window, chunk).await?;
                self.submit_prune(prune).await?;
                report.prunes += 1;
            }
            // Statements after this window chain from its closing balances: kept before its
            // vouchers go.
            let closings = self.closing_balances(window).await?;
            let (mut puts, chunks) = closings_records(self.keys, window, &closings);
            state.next_closing_balances_chunks = Some(chunks);
            puts.push(plain(self.keys.retention_state(), &state));
            engine_submit(&self.node, vec![], puts).await?;
            self.submit_prune(Prune {
                vouchers_through: last,
                anchor_hash: checkpoint.hash,
                events_before: record.report.closed_at_ns.unwrap_or(0),
                ..Prune::default()
            })
            .await?;
            report.prunes += 1;
        }
        state.closing_balances_chunks =
            state.next_closing_balances_chunks.take().ok_or_else(|| {
                internal(format!(
                "window {window}'s vouchers left the hot store without its closing balances kept"
            ))
            })?;
        state.pruned_through = window;
        state.anchor = Some(checkpoint);
        engine_submit(
            &self.node,
            vec![],
            vec![plain(self.keys.retention_state(), &state)],
        )
        .await?;
        tracing::info!(
            window,
            payments = report.payments,
            returns = report.returns,
            first_seq = first,
            last_seq = last,
            "retention: window pruned from the hot store"
        );
        Ok(report)
    }

    /// The prune of some payments' or returns' records (read now): tombstones for payments,
    /// deletions for returns; records already tombstoned are skipped.
    async fn prune_of(&self, window: u64, keys: &[u128]) -> Result<Prune, ApiError> {
        let values = {
            let node = self.node.clone();
            let keys = keys.to_vec();
            blocking(move || node.get_records(&keys)).await?
        };
        let mut prune = Prune::default();
        for (key, value) in keys.iter().zip(values) {
            let Some(value) = value else { continue };
            match decode(*key, &value).map_err(internal)? {
                Stored::Payment(record) => {
                    if record.state == PaymentState::Reserved {
                        return Err(internal(format!(
                            "payment {key:032x} has a voucher but is still reserved"
                        )));
                    }
                    let tombstone = Archived {
                        window,
                        instruction_alias: record.instruction_alias(),
                    };
                    prune
                        .replace
                        .push((*key, encode(&Stored::Archived(tombstone))));
                    prune.aliases.push(end_to_end_alias(
                        &record.debtor_agent,
                        &record.end_to_end_id,
                    ));
                    prune.aliases.push(uetr_alias(&record.uetr));
                    prune.transfers.extend([
                        *key,
                        post_id(*key),
                        void_id(*key),
                        offset_credit_id(*key),
                    ]);
                }
                Stored::Return(record) => {
                    prune.delete.push(*key);
                    prune
                        .aliases
                        .push(return_alias(&record.returning_agent, &record.return_id));
                    prune.transfers.push(*key);
                }
                Stored::Archived(_) => {}
                Stored::Participant(_) | Stored::Recall(_) => {
                    return Err(internal(format!(
                        "record {key:032x} named by a payment voucher is not a payment"
                    )))
                }
            }
        }
        Ok(prune)
    }

    async fn submit_prune(&self, prune: Prune) -> Result<(), ApiError> {
        let node = self.node.clone();
        blocking(move || node.prune(prune)).await?;
        Ok(())
    }

    /// Removes the tombstones and instruction aliases of pruned window `window` (its duplicate
    /// window is over), given its payments' keys (from the archive). In window order.
    pub async fn clear_tombstones(&self, window: u64, keys: &[u128]) -> Result<u64, ApiError> {
        let _one_at_a_time = self.retention.lock().await;
        let mut state = self.retention_state().await?;
        if window <= state.cleared_through {
            return Ok(0);
        }
        if window != state.cleared_through + 1 || window > state.pruned_through {
            return Err(ApiError::new(
                409,
                "retention_refused",
                format!(
                    "tombstones are cleared in order, of pruned windows: the next is {}, pruned through {}",
                    state.cleared_through + 1,
                    state.pruned_through
                ),
            ));
        }
        let mut cleared = 0u64;
        for chunk in keys.chunks(PRUNE_PAYMENTS_MAX) {
            let values = {
                let node = self.node.clone();
                let keys = chunk.to_vec();
                blocking(move || node.get_records(&keys)).await?
            };
            let mut prune = Prune::default();
            for (key, value) in chunk.iter().zip(values) {
                if let Some(Ok(Stored::Archived(tombstone))) = value.map(|v| decode(*key, &v)) {
                    if tombstone.window == window {
                        prune.delete.push(*key);
                        prune.aliases.push(tombstone.instruction_alias);
                    }
                }
            }
            cleared += prune.delete.len() as u64;
            if !prune.delete.is_empty() {
                self.submit_prune(prune).await?;
            }
        }
        state.cleared_through = window;
        engine_submit(
            &self.node,
            vec![],
            vec![plain(self.keys.retention_state(), &state)],
        )
        .await?;
        Ok(cleared)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closing_balances_of_many_participants_are_kept_in_records_within_the_limit() {
        let balances: clearhouse_clearing::statement::Balances = (0..1_000)
            .map(|i| {
                (
                    (format!("BANK{i:04}XX"), "EUR".to_string()),
                    -(i as i128) * 1_000_003,
                )
            })
            .collect();
        let (puts, chunks) = closings_records(KeyScheme::Compact, 7, &balances);
        assert!(chunks > 1, "{chunks} chunks");
        assert_eq!(puts.len(), chunks as usize);
        let mut bytes = Vec::new();
        for (i, put) in puts.iter().enumerate() {
            assert!(put.value.len() <= clearhouse_engine::codec::RECORD_VALUE_MAX);
            assert_eq!(put.key, KeyScheme::Compact.closings_chunk(7, i as u32));
            bytes.extend(&put.value);
        }
        let rows: Vec<(String, String, String)> = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(rows.len(), 1_000);
        assert_eq!(
            rows[5],
            ("BANK0005XX".into(), "EUR".into(), "-5000015".into())
        );
    }
}
