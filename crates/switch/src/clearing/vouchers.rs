//! The voucher chain as callers see it: pages (a participant gets its own bodies and everyone
//! else's leaf digests), participant views of reports, and the whole chain walked for export and
//! verification of a data directory.

use super::*;

/// A page of the voucher chain as one caller may see it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VoucherPage {
    /// The chain hash before the first entry (hex; zeros before voucher 1).
    pub previous_hash: String,
    pub entries: Vec<clearhouse_clearing::export::ViewEntry>,
    /// Signed checkpoints of windows whose closing voucher is in this page.
    pub checkpoints: Vec<clearhouse_clearing::export::Checkpoint>,
    /// The operator's Ed25519 public key (hex) that signs checkpoints.
    pub public_key: String,
    /// Where the next page starts, when there may be one.
    pub next_from: Option<u64>,
    /// The chain's last voucher when the page was read (an exporter's lag is measured from it).
    #[serde(default)]
    pub head_seq: u64,
}

/// Most vouchers in one page.
pub const VOUCHER_PAGE_MAX: usize = 4_096;

impl Clearing {
    /// Vouchers `from..from+limit`: every entry's leaf digest, and bodies only of the events
    /// `participant` is party to (all of them for the operator, `participant = None`).
    pub async fn voucher_page(
        &self,
        participant: Option<&str>,
        from: u64,
        limit: usize,
    ) -> Result<VoucherPage, ApiError> {
        let from = from.max(1);
        let limit = limit.clamp(1, VOUCHER_PAGE_MAX);
        let (vouchers, head_seq, anchor) = {
            let node = self.node.clone();
            blocking(move || {
                // The head first: every voucher read after it is at most this far along.
                let head = node.stats()?.chain_seq;
                let anchor = node.vouchers_anchor()?;
                Ok::<_, clearhouse_engine::EngineError>((
                    node.vouchers(from - 1, limit + 1)?,
                    head,
                    anchor,
                ))
            })
            .await?
        };
        if from <= anchor.0 {
            return Err(ApiError::new(
                410,
                "archived",
                format!(
                    "vouchers 1 to {} are archived (retention); the hot chain starts at {}",
                    anchor.0,
                    anchor.0 + 1
                ),
            ));
        }
        let mut previous_hash = if from - 1 == anchor.0 && anchor.0 > 0 {
            anchor.1
        } else {
            clearhouse_engine::vouchers::GENESIS_HASH
        };
        let mut entries = Vec::with_capacity(limit);
        let mut checkpoints = Vec::new();
        for voucher in vouchers {
            if voucher.seq < from {
                previous_hash = voucher.hash;
                continue;
            }
            let event = VoucherEvent::parse(&voucher.body).map_err(internal)?;
            let visible = participant.is_none_or(|bic| event.involves(bic));
            if let VoucherEvent::WindowClosed { window, .. } = event {
                if let Some(record) =
                    read_json::<WindowRecord>(&self.node, self.keys.window(window)).await?
                {
                    if let Some(checkpoint) = record.report.checkpoint {
                        checkpoints.push(checkpoint);
                    }
                }
            }
            entries.push(clearhouse_clearing::export::ViewEntry {
                seq: voucher.seq,
                leaf: clearhouse_engine::vouchers::leaf_digest(&voucher.body),
                body: visible.then(|| String::from_utf8_lossy(&voucher.body).into_owned()),
            });
        }
        let next_from = (entries.len() == limit).then(|| from + limit as u64);
        let entries_last = entries.last().map_or(0, |e| e.seq);
        Ok(VoucherPage {
            previous_hash: hex::encode(previous_hash),
            entries,
            checkpoints,
            public_key: hex::encode(self.public_key().as_bytes()),
            next_from,
            head_seq: head_seq.max(entries_last),
        })
    }
}

/// What a participant may see of a window: its own positions and instructions, and the
/// scheme-wide figures.
pub fn participant_view(mut report: WindowReport, bic: &str) -> WindowReport {
    if let Some(plan) = &mut report.plan {
        plan.positions.retain(|p| p.participant == bic);
        plan.instructions.retain(|i| i.participant == bic);
    }
    report.carried.retain(|(p, _, _)| p == bic);
    report.breaks.clear();
    report
}

/// Walks the voucher chain in order from voucher `from`, with each window's signed checkpoint
/// right after its closing voucher; `progress` gets the vouchers seen so far. Blocking: for the
/// CLI, on a data directory no server is using.
pub fn walk_vouchers(
    node: &Node,
    from: u64,
    mut on_voucher: impl FnMut(&clearhouse_engine::Voucher) -> Result<(), ApiError>,
    mut on_checkpoint: impl FnMut(&Checkpoint) -> Result<(), ApiError>,
    mut progress: impl FnMut(u64),
) -> Result<(u64, u64), ApiError> {
    let keys = super::key_scheme_or_compact(node)?;
    let (mut vouchers, mut checkpoints) = (0u64, 0u64);
    let mut from = from.max(1);
    loop {
        let page = node.vouchers(from, VOUCHER_PAGE)?;
        let Some(last) = page.last() else { break };
        from = last.seq + 1;
        for voucher in page {
            on_voucher(&voucher)?;
            vouchers += 1;
            if let Ok(VoucherEvent::WindowClosed { window, .. }) =
                VoucherEvent::parse(&voucher.body)
            {
                let stored = node.get_records(&[keys.window(window)])?.pop().flatten();
                let record: Option<WindowRecord> = stored
                    .map(|bytes| serde_json::from_slice(&bytes))
                    .transpose()
                    .map_err(internal)?;
                if let Some(checkpoint) = record.and_then(|r| r.report.checkpoint) {
                    on_checkpoint(&checkpoint)?;
                    checkpoints += 1;
                }
            }
        }
        progress(vouchers);
    }
    Ok((vouchers, checkpoints))
}

/// Writes the whole chain with its checkpoints as an export (see
/// [`clearhouse_clearing::export`]).
pub fn export_vouchers<W: std::io::Write>(
    node: &Node,
    public_key: &VerifyingKey,
    out: W,
    progress: impl FnMut(u64),
) -> Result<(W, u64, u64), ApiError> {
    let anchor = node.vouchers_anchor()?;
    if anchor.0 > 0 {
        return Err(ApiError::new(
            410,
            "archived",
            format!(
                "vouchers 1 to {} are in the archive (retention): an export holds a whole chain; verify with `clearhouse verify --data-dir D --archive DIR`",
                anchor.0
            ),
        ));
    }
    let writer = std::cell::RefCell::new(
        clearhouse_clearing::export::ExportWriter::new(out, public_key).map_err(internal)?,
    );
    let (vouchers, checkpoints) = walk_vouchers(
        node,
        1,
        |v| {
            writer
                .borrow_mut()
                .voucher(v.seq, &v.hash, &v.body)
                .map_err(internal)
        },
        |c| writer.borrow_mut().checkpoint(c).map_err(internal),
        progress,
    )?;
    Ok((
        writer.into_inner().finish().map_err(internal)?,
        vouchers,
        checkpoints,
    ))
}

/// Verifies the chain and checkpoints of a data directory in place: every hash recomputed from
/// its body, every checkpoint's hash and signature. The error names the first voucher or
/// checkpoint that does not hold. After retention the hot part is verified from the signed
/// checkpoint it is anchored at; with `archived` (a verifier that has checked the archive up to
/// that checkpoint) the whole chain is.
pub fn verify_data_dir(
    node: &Node,
    public_key: &VerifyingKey,
    archived: Option<clearhouse_clearing::export::ChainVerifier>,
    progress: impl FnMut(u64),
) -> Result<clearhouse_clearing::export::VerifyReport, clearhouse_clearing::ClearingError> {
    use clearhouse_clearing::export::ChainVerifier;
    use clearhouse_clearing::ClearingError;
    let io = |error: ApiError| ClearingError::Io(error.to_string());
    let anchor = node.vouchers_anchor().map_err(|e| io(ApiError::from(e)))?;
    let start = if anchor.0 == 0 {
        ChainVerifier::new(*public_key)
    } else {
        let state = super::retention_state_of(node).map_err(io)?;
        let keys = super::key_scheme_or_compact(node).map_err(io)?;
        // The anchor is the close of the last pruned window, or of the next one when a crash
        // came between its last prune and the retention state's update.
        let next_close = node
            .get_records(&[keys.window(state.pruned_through + 1)])
            .map_err(|e| io(ApiError::from(e)))?
            .pop()
            .flatten()
            .and_then(|bytes| serde_json::from_slice::<WindowRecord>(&bytes).ok())
            .and_then(|record| record.report.checkpoint);
        let checkpoint = state
            .anchor
            .into_iter()
            .chain(next_close)
            .find(|c| c.seq == anchor.0 && c.hash == anchor.1)
            .ok_or_else(|| ClearingError::Voucher {
                seq: anchor.0,
                reason: "the hot chain's anchor is not the signed checkpoint retention recorded"
                    .into(),
            })?;
        match archived {
            Some(archived) => {
                if archived.head() != anchor {
                    return Err(ClearingError::Voucher {
                        seq: anchor.0,
                        reason: format!(
                            "the archive ends at voucher {} ({}), the hot chain starts after voucher {} ({})",
                            archived.head().0,
                            hex::encode(archived.head().1),
                            anchor.0,
                            hex::encode(anchor.1)
                        ),
                    });
                }
                archived
            }
            None => ChainVerifier::anchored(*public_key, &checkpoint)?,
        }
    };
    let verifier = std::cell::RefCell::new(start);
    let failure: std::cell::RefCell<Option<clearhouse_clearing::ClearingError>> =
        std::cell::RefCell::new(None);
    let keep = |result: Result<(), clearhouse_clearing::ClearingError>| {
        result.map_err(|error| {
            let message = error.to_string();
            *failure.borrow_mut() = Some(error);
            internal(message)
        })
    };
    let walked = walk_vouchers(
        node,
        anchor.0 + 1,
        |v| keep(verifier.borrow_mut().voucher(v.seq, &v.hash, &v.body)),
        |c| keep(verifier.borrow_mut().checkpoint(c)),
        progress,
    );
    if let Some(error) = failure.into_inner() {
        return Err(error);
    }
    walked.map_err(|error| clearhouse_clearing::ClearingError::Io(error.to_string()))?;
    Ok(verifier.into_inner().report())
}
