//! Settlement of a closed window: fund adjustments as one linked ledger batch (net payers
//! restored, net receivers paid out, what a receiver already spent carried), and internal
//! reconciliation of the plan against the vouchers and the ledger.

use super::*;

impl Clearing {
    /// Settles a closed window: every fund adjustment in one linked ledger batch, with a voucher
    /// each and the window's `window_settled` voucher, all or nothing; then reconciles.
    /// Idempotent: settling a settled window answers its report.
    pub async fn settle(&self, window: u64) -> Result<WindowReport, ApiError> {
        let mut report = self.settle_only(window).await?;
        if report.reconciled {
            return Ok(report);
        }
        if report.carried.is_empty() {
            // Settled by a batch that a crash separated from its reconciliation: the carried
            // amounts (computed after the batch) are read again from the ledger.
            if let Some(plan) = report.plan.clone() {
                report.carried = self.carried(window, &plan).await?;
            }
        }
        self.reconcile(window, report).await
    }

    /// What each net receiver's fund adjustment could not take back (balancing debit, or no
    /// transfer at all): participant, currency, amount carried.
    pub(super) async fn carried(
        &self,
        window: u64,
        plan: &SettlementPlan,
    ) -> Result<Vec<(String, String, String)>, ApiError> {
        let ids: Vec<u128> = plan
            .instructions
            .iter()
            .map(|i| {
                self.keys
                    .fund_adjustment(window, &i.participant, &i.currency)
            })
            .collect();
        let moved = if ids.is_empty() {
            vec![]
        } else {
            let node = self.node.clone();
            blocking(move || node.lookup_transfers(ids)).await?
        };
        let moved: BTreeMap<u128, u128> = moved
            .into_iter()
            .map(|s| (s.transfer.id, s.transfer.amount))
            .collect();
        let mut carried = Vec::new();
        for instruction in &plan.instructions {
            let id =
                self.keys
                    .fund_adjustment(window, &instruction.participant, &instruction.currency);
            let left = instruction
                .net
                .unsigned_abs()
                .saturating_sub(moved.get(&id).copied().unwrap_or(0));
            if left > 0 {
                carried.push((
                    instruction.participant.clone(),
                    instruction.currency.clone(),
                    left.to_string(),
                ));
            }
        }
        Ok(carried)
    }

    /// Position accounts of the plan's net receivers with nothing available: their receipts were
    /// spent in the next window.
    pub(super) async fn receivers_with_nothing_left(
        &self,
        plan: &SettlementPlan,
    ) -> Result<std::collections::BTreeSet<u128>, ApiError> {
        let receivers: Vec<u128> = plan
            .instructions
            .iter()
            .filter(|i| i.net > 0)
            .filter_map(|i| currency(&i.currency).map(|c| position_account(&i.participant, c.code)))
            .collect();
        if receivers.is_empty() {
            return Ok(Default::default());
        }
        let node = self.node.clone();
        Ok(blocking(move || node.lookup_accounts(receivers))
            .await?
            .into_iter()
            .filter(|a| {
                a.credits_posted
                    .saturating_sub(a.debits_posted)
                    .saturating_sub(a.debits_pending)
                    == 0
            })
            .map(|a| a.id)
            .collect())
    }

    /// Settles without reconciling (see [`Clearing::settle`]).
    pub async fn settle_only(&self, window: u64) -> Result<WindowReport, ApiError> {
        let _admin = self.admin.lock().await;
        let no_models = SettlementModels::new();
        let mut report = self.report(window, &no_models).await?;
        match report.state {
            WindowState::Open => {
                return Err(ApiError::new(
                    409,
                    "window_open",
                    format!("window {window} is open; close it first"),
                ))
            }
            WindowState::Settled => return Ok(report),
            WindowState::Closed => {}
        }
        let plan = report
            .plan
            .clone()
            .ok_or_else(|| internal("closed window without plan"))?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let empty = self.receivers_with_nothing_left(&plan).await?;
            let mut transfers = Vec::with_capacity(plan.instructions.len());
            let mut skipped = Vec::new();
            let mut records = Vec::with_capacity(plan.instructions.len());
            for instruction in &plan.instructions {
                let c = currency(&instruction.currency).ok_or_else(|| {
                    internal(format!("unknown currency {}", instruction.currency))
                })?;
                let position = position_account(&instruction.participant, c.code);
                let settlement = settlement_account(c.code);
                let id = self
                    .keys
                    .fund_adjustment(window, &instruction.participant, c.code);
                if instruction.net > 0 && empty.contains(&position) {
                    // Spent in full in the next window: no transfer (the ledger refuses a balancing
                    // debit that can move nothing); the whole net is carried and reported.
                    skipped.push(records.len());
                    records.push(RecordPut {
                        key: id,
                        value: serde_json::to_vec(instruction).expect("instructions serialize"),
                        voucher: Some(
                            VoucherEvent::FundAdjustment {
                                window,
                                participant: instruction.participant.clone(),
                                currency: instruction.currency.clone(),
                                net: instruction.net,
                            }
                            .to_bytes(),
                        ),
                        ..RecordPut::default()
                    });
                    continue;
                }
                let (debit, credit, flags) = if instruction.net < 0 {
                    // A net payer paid in at the settlement bank: its position is restored.
                    (settlement, position, TransferFlags::LINKED)
                } else {
                    // A net receiver is paid out: what it received leaves its position (at most what
                    // is there; the rest is carried and reported).
                    (
                        position,
                        settlement,
                        TransferFlags::LINKED.with(TransferFlags::BALANCING_DEBIT),
                    )
                };
                records.push(RecordPut {
                    key: id,
                    value: serde_json::to_vec(instruction).expect("instructions serialize"),
                    when_transfer_ok: Some(transfers.len() as u32),
                    voucher: Some(
                        VoucherEvent::FundAdjustment {
                            window,
                            participant: instruction.participant.clone(),
                            currency: instruction.currency.clone(),
                            net: instruction.net,
                        }
                        .to_bytes(),
                    ),
                    ..RecordPut::default()
                });
                transfers.push(Transfer {
                    id,
                    debit_account_id: debit,
                    credit_account_id: credit,
                    amount: instruction.net.unsigned_abs(),
                    ledger: c.numeric,
                    code: TRANSFER_CODE_FUND_ADJUSTMENT,
                    flags,
                    ..Transfer::default()
                });
            }
            if let Some(last) = transfers.last_mut() {
                last.flags = last.flags.without(TransferFlags::LINKED);
            }
            // Skipped instructions' records stand or fall with the linked chain.
            let chain_ok = transfers.len().checked_sub(1).map(|i| i as u32);
            for &i in &skipped {
                records[i].when_transfer_ok = chain_ok;
            }
            if transfers.len() > clearhouse_ledger::BATCH_EVENTS_MAX {
                return Err(ApiError::new(
                    409,
                    "too_many_adjustments",
                    format!(
                        "{} fund adjustments exceed one batch ({})",
                        transfers.len(),
                        clearhouse_ledger::BATCH_EVENTS_MAX
                    ),
                ));
            }
            report.state = WindowState::Settled;
            report.settled_at_ns = Some(now_ns());
            let outcome = self
                .store(&report, self.closed_seq(window).await?, transfers, records)
                .await?;
            let failed = outcome.results.iter().position(|r| {
                !matches!(r, CreateTransferResult::Ok | CreateTransferResult::Exists)
            });
            let Some(failed) = failed else {
                break;
            };
            let cause = outcome
                .results
                .iter()
                .find(|r| {
                    !matches!(
                        r,
                        CreateTransferResult::Ok
                            | CreateTransferResult::Exists
                            | CreateTransferResult::LinkedEventFailed
                    )
                })
                .unwrap_or(&outcome.results[failed]);
            if *cause == CreateTransferResult::ExceedsCredits && attempt < SETTLE_ATTEMPTS_MAX {
                // A receiver spent what was left between the lookup and the batch: again.
                continue;
            }
            return Err(ApiError::new(
                    409,
                    "settlement_refused",
                    format!(
                        "the ledger refused fund adjustment {failed} ({cause:?}); nothing was posted and window {window} stays closed"
                    ),
                ));
        }
        self.windows_settled.fetch_add(1, Ordering::Relaxed);
        report.carried = self.carried(window, &plan).await?;
        tracing::info!(
            window,
            adjustments = plan.instructions.len(),
            "window settled"
        );
        Ok(report)
    }

    /// Internal reconciliation of a settled window: the positions recomputed from the window's
    /// vouchers equal the plan's; every instruction is on the ledger with its amount and
    /// accounts; nets sum to zero (checked when the plan was made). Breaks are stored in the
    /// window's report, counted, and logged as errors.
    pub async fn reconcile(
        &self,
        window: u64,
        mut report: WindowReport,
    ) -> Result<WindowReport, ApiError> {
        let _admin = self.admin.lock().await;
        let mut breaks = Vec::new();
        let events = self.window_events(window).await?;
        let (windows, _) =
            accumulators_from_vouchers(window, events.iter().map(|(_, event)| event))
                .map_err(internal)?;
        let recomputed = windows.get(&window).cloned().unwrap_or_default();
        let plan = report.plan.clone().unwrap_or(SettlementPlan {
            window,
            positions: vec![],
            instructions: vec![],
            figures: vec![],
        });
        let mut planned: BTreeMap<(String, String), (u128, u128)> = plan
            .positions
            .iter()
            .map(|p| {
                (
                    (p.participant.clone(), p.currency.clone()),
                    (p.sent, p.received),
                )
            })
            .collect();
        for (key, position) in &recomputed.positions {
            let found = planned.remove(key);
            if found != Some((position.sent, position.received)) {
                breaks.push(Break {
                    check: "positions_vs_vouchers".into(),
                    subject: format!("{} {}", key.0, key.1),
                    expected: format!("sent {} received {}", position.sent, position.received),
                    found: found.map_or("no position".into(), |(s, r)| {
                        format!("sent {s} received {r}")
                    }),
                });
            }
        }
        for (key, (sent, received)) in planned {
            breaks.push(Break {
                check: "positions_vs_vouchers".into(),
                subject: format!("{} {}", key.0, key.1),
                expected: "no vouchers".into(),
                found: format!("sent {sent} received {received}"),
            });
        }
        let ids: Vec<u128> = plan
            .instructions
            .iter()
            .map(|i| {
                self.keys
                    .fund_adjustment(window, &i.participant, &i.currency)
            })
            .collect();
        let on_ledger: BTreeMap<u128, Transfer> = if ids.is_empty() {
            BTreeMap::new()
        } else {
            let node = self.node.clone();
            blocking(move || node.lookup_transfers(ids))
                .await?
                .into_iter()
                .map(|s| (s.transfer.id, s.transfer))
                .collect()
        };
        let carried: BTreeMap<(String, String), u128> = report
            .carried
            .iter()
            .map(|(p, c, a)| ((p.clone(), c.clone()), a.parse().unwrap_or(0)))
            .collect();
        for instruction in &plan.instructions {
            let id =
                self.keys
                    .fund_adjustment(window, &instruction.participant, &instruction.currency);
            let position = position_account(&instruction.participant, &instruction.currency);
            let settlement = settlement_account(&instruction.currency);
            let expected_accounts = if instruction.net < 0 {
                (settlement, position)
            } else {
                (position, settlement)
            };
            let carried = carried
                .get(&(
                    instruction.participant.clone(),
                    instruction.currency.clone(),
                ))
                .copied()
                .unwrap_or(0);
            let subject = format!("{} {}", instruction.participant, instruction.currency);
            match on_ledger.get(&id) {
                Some(t)
                    if (t.debit_account_id, t.credit_account_id) == expected_accounts
                        && t.amount.checked_add(carried)
                            == Some(instruction.net.unsigned_abs()) => {}
                // Carried in full: no transfer was made.
                None if carried == instruction.net.unsigned_abs() && instruction.net > 0 => {}
                Some(t) => breaks.push(Break {
                    check: "instruction_vs_ledger".into(),
                    subject,
                    expected: format!("{} (carried {carried})", instruction.net.unsigned_abs()),
                    found: format!(
                        "{} between {:x} and {:x}",
                        t.amount, t.debit_account_id, t.credit_account_id
                    ),
                }),
                None => breaks.push(Break {
                    check: "instruction_vs_ledger".into(),
                    subject,
                    expected: instruction.net.to_string(),
                    found: "no fund adjustment on the ledger".into(),
                }),
            }
        }
        if !breaks.is_empty() {
            self.breaks_total
                .fetch_add(breaks.len() as u64, Ordering::Relaxed);
            tracing::error!(
                window,
                breaks = breaks.len(),
                "reconciliation breaks: positions, vouchers and ledger disagree"
            );
        }
        report.breaks = breaks;
        report.reconciled = true;
        let closed_seq = self.closed_seq(window).await?;
        // Rewrite the record only (no voucher: the window_settled voucher is already chained).
        let mut stored = report.clone();
        stored.plan = None;
        let plan_chunks = self
            .window_record(window)
            .await?
            .map_or(0, |r| r.plan_chunks);
        let record = WindowRecord {
            report: stored,
            closed_seq,
            plan_chunks,
        };
        engine_submit(
            &self.node,
            vec![],
            vec![plain(self.keys.window(window), &record)],
        )
        .await?;
        self.remember(WindowRecord {
            report: report.clone(),
            closed_seq,
            plan_chunks,
        });
        // Every participant's statements from the vouchers just read: participants fetch them
        // after a close, and retention needs the closing balances.
        self.build_statements_from(window, &events).await;
        Ok(report)
    }
}
