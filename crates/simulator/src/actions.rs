//! One seeded action per step: new payments, resubmissions, returns, status queries, decisions,
//! liquidity, window close and settlement.

use crate::*;

impl World {
    pub(crate) fn act(&mut self) -> Outcome {
        let roll = self.rng.below(100);
        match roll {
            0..=24 => self.new_payment(),
            25..=61 | 94..=97 => {
                // A burst of deliveries: the network moves faster than the clock.
                for _ in 0..1 + self.rng.below(4) {
                    self.deliver()?;
                }
                Ok(())
            }
            62..=71 => {
                let by = if self.rng.chance(60) {
                    self.rng.below(200)
                } else {
                    self.rng.below(ADVANCE_MAX_MS + 1)
                };
                self.advance(by)
            }
            72..=74 => self.duplicate_submission(),
            75..=77 => self.return_payment(),
            78..=83 => self.status_query(),
            89 => self.prune(false),
            84..=88 => {
                let bank = self.rng.below(PREFUNDED as u64) as usize;
                let amount = 1 + u128::from(self.rng.below(AMOUNT_MAX));
                let direction = if self.rng.chance(60) {
                    LiquidityDirection::In
                } else {
                    LiquidityDirection::Out
                };
                self.liquidity(bank, amount, direction)
            }
            90..=91 => self.close_window(),
            92..=93 => self.settle_window(),
            _ if self.replica.is_some() && self.rng.chance(33) => self.partition(),
            _ => self.power_loss(),
        }
    }

    pub(crate) fn new_payment(&mut self) -> Outcome {
        let debtor = self.rng.below(BANKS as u64) as usize;
        let creditor = (debtor + 1 + self.rng.below(BANKS as u64 - 1) as usize) % BANKS;
        let amount = if self.rng.chance(5) {
            // Beyond what anyone has.
            FUNDING * 4 + u128::from(self.rng.below(1000))
        } else {
            1 + u128::from(self.rng.below(AMOUNT_MAX))
        };
        let n = self.payments.len();
        let request = PaymentRequest {
            instruction_id: format!("SIM-{n}"),
            end_to_end_id: format!("E2E-{n}"),
            uetr: None,
            debtor_agent: self.banks[debtor].bic.clone(),
            creditor_agent: self.banks[creditor].bic.clone(),
            amount: format_amount(amount, EXPONENT),
            currency: CURRENCY.into(),
            debtor: Party {
                name: "Debtor".into(),
                account: format!("DE{n:020}"),
            },
            creditor: Party {
                name: "Creditor".into(),
                account: format!("FR{n:020}"),
            },
            remittance_information: Some(format!("simulated payment {n}")),
            message_id: None,
            transaction_id: None,
        };
        let fits = amount as i128 <= self.available(debtor);
        let switch = self.live().switch.clone();
        let caller = Caller::Participant(self.banks[debtor].bic.clone());
        let (_, view) = self
            .block_on(switch.submit(&caller, request.clone()))
            .map_err(|e| format!("submit of p{n} refused: {}", api(e)))?;
        let id = u128::from_str_radix(&view.payment_id, 16).map_err(|e| e.to_string())?;
        let state = State::of_view(&view)?;
        self.trace(format!(
            "submit p{n} b{debtor}->b{creditor} {amount} => {state:?}"
        ));
        let expected = match (fits, self.banks[debtor].deferred) {
            (true, _) => State::Pending,
            (false, false) => State::Rejected("AM04".into()),
            (false, true) => State::Rejected("AM23".into()),
        };
        if state != expected {
            return Err(format!(
                "p{n} answered {state:?}, the model expects {expected:?} (available {})",
                self.available(debtor)
            ));
        }
        self.report.payments += 1;
        self.by_id.insert(id, n);
        self.payments.push(Payment {
            id,
            debtor,
            creditor,
            amount,
            request,
            deadline_ns: view.deadline_ns,
            state: State::Pending,
            forwards_due: 0,
            notes_due: 0,
            notes_to: Vec::new(),
            expected_final: None,
            timeout_reason: "AB05",
            interrupted: None,
            told: [None, None],
            returned: 0,
            returns: Vec::new(),
            archived: false,
        });
        if view.deadline_ns != self.clock.now_ns() + DEADLINE_MS * 1_000_000 {
            return Err(format!(
                "p{n} deadline not {DEADLINE_MS} ms after acceptance"
            ));
        }
        match state {
            State::Pending => self.payments[n].forwards_due = 1,
            // Rejected before anything was reserved: answered, not notified.
            rejected => self.settle_in_model(n, rejected),
        }
        self.pump()
    }

    pub(crate) fn duplicate_submission(&mut self) -> Outcome {
        if self.payments.is_empty() {
            return self.new_payment();
        }
        let index = self.rng.below(self.payments.len() as u64) as usize;
        let changed = self.rng.chance(20);
        let p = &self.payments[index];
        let mut request = p.request.clone();
        if changed {
            request.end_to_end_id.push('X');
        }
        let caller = Caller::Participant(self.banks[p.debtor].bic.clone());
        let archived = p.archived;
        let switch = self.live().switch.clone();
        let answer = self.block_on(switch.submit(&caller, request));
        self.report.duplicate_submissions += 1;
        let p = &self.payments[index];
        if archived {
            // Within the duplicate window an archived instruction id stays taken.
            return match answer {
                Err(e) if e.status == 409 && e.reason == Some("DUPL") => {
                    self.trace(format!("resubmit archived p{index} => 409 DUPL"));
                    self.pump()
                }
                other => Err(format!(
                    "resubmitted archived p{index} answered {:?}",
                    other.map(|(_, v)| v.status).map_err(api)
                )),
            };
        }
        match (changed, answer) {
            (false, Ok((_, view))) => {
                let state = State::of_view(&view)?;
                if view.payment_id != format!("{:032x}", p.id) || state != p.state {
                    return Err(format!(
                        "resubmitted p{index} answered {} {state:?}, the model has {:?}",
                        view.payment_id, p.state
                    ));
                }
                self.trace(format!("resubmit p{index} => same payment, {state:?}"));
            }
            (true, Err(error)) if error.status == 409 => {
                self.trace(format!("resubmit p{index} changed => 409 {}", error.code));
            }
            (changed, answer) => {
                return Err(format!(
                    "resubmitted p{index} (changed: {changed}) answered {:?}",
                    answer.map(|(_, v)| v.status).map_err(api)
                ))
            }
        }
        self.pump()
    }

    /// The creditor agent returns (part of) a settled payment: a new return, a replay of an
    /// earlier one (answered the same, money moved once), or more than is left (AM09).
    pub(crate) fn return_payment(&mut self) -> Outcome {
        let settled: Vec<usize> = (0..self.payments.len())
            .filter(|&i| self.payments[i].state == State::Settled && !self.payments[i].archived)
            .collect();
        if settled.is_empty() {
            return self.new_payment();
        }
        let index = settled[self.rng.below(settled.len() as u64) as usize];
        let p = &self.payments[index];
        let (creditor, debtor, open) = (p.creditor, p.debtor, p.amount - p.returned);
        let replay = !p.returns.is_empty() && self.rng.chance(25);
        let (return_id, amount, requested) = if replay {
            let (id, amount) = p.returns[self.rng.below(p.returns.len() as u64) as usize].clone();
            (id, amount, Some(format_amount(amount, EXPONENT)))
        } else {
            self.returns_made += 1;
            let id = format!("RET-{}", self.returns_made);
            match self.rng.below(4) {
                0 => (id, open, None),
                1 => (id, open + 1, Some(format_amount(open + 1, EXPONENT))),
                _ => {
                    let amount = 1 + u128::from(
                        self.rng
                            .below(u64::try_from(open).unwrap_or(u64::MAX).max(1)),
                    );
                    (id, amount, Some(format_amount(amount, EXPONENT)))
                }
            }
        };
        let request = clearhouse_switch::switch::ReturnRequest {
            return_id: return_id.clone(),
            amount: requested,
            reason: "CUST".into(),
            currency: None,
        };
        let caller = Caller::Participant(self.banks[creditor].bic.clone());
        let switch = self.live().switch.clone();
        let answer = self.block_on(switch.return_payment(&caller, p.id, request));
        self.trace(format!(
            "return {return_id} of p{index} {amount} (open {open}, replay {replay}) => {}",
            match &answer {
                Ok(_) => "done".to_string(),
                Err(e) => format!("{} {}", e.status, e.code),
            }
        ));
        let expected: Result<(), &str> = if replay {
            Ok(())
        } else if amount == 0 || amount > open {
            Err("AM09")
        } else if amount as i128 > self.available(creditor) {
            Err("AM04")
        } else {
            Ok(())
        };
        match (answer, expected) {
            (Ok(view), Ok(())) => {
                if view.amount != format_amount(amount, EXPONENT) {
                    return Err(format!(
                        "return {return_id} answered amount {}",
                        view.amount
                    ));
                }
                if replay {
                    self.report.returns_refused_or_replayed += 1;
                    return Ok(());
                }
                self.report.returns += 1;
                let p = &mut self.payments[index];
                p.returned += amount;
                p.returns.push((return_id, amount));
                self.banks[creditor].balance -= amount as i128;
                self.banks[debtor].balance += amount as i128;
                self.banks[creditor].window_sent += amount;
                self.banks[debtor].window_received += amount;
                self.return_notes_due += 2;
                self.pump()
            }
            (Err(e), Err(reason)) if e.reason == Some(reason) => {
                self.report.returns_refused_or_replayed += 1;
                Ok(())
            }
            (answer, expected) => Err(format!(
                "return {return_id} of p{index}: expected {expected:?}, answered {:?}",
                answer.map(|v| v.amount).map_err(api)
            )),
        }
    }

    pub(crate) fn status_query(&mut self) -> Outcome {
        if self.payments.is_empty() {
            return self.advance(10);
        }
        let index = self.rng.below(self.payments.len() as u64) as usize;
        let p = &self.payments[index];
        let asker = if self.rng.chance(50) {
            p.debtor
        } else {
            p.creditor
        };
        let archived = p.archived;
        let query = StatusQuery {
            payment_id: Some(format!("{:032x}", p.id)),
            instruction_id: None,
            end_to_end_id: None,
            debtor_agent: None,
            uetr: None,
        };
        let caller = Caller::Participant(self.banks[asker].bic.clone());
        let switch = self.live().switch.clone();
        let answer = self.block_on(switch.status(&caller, query));
        if archived {
            // A tombstone names no one: a participant asking by payment id learns nothing.
            self.report.status_queries += 1;
            return match answer {
                Err(e) if e.status == 404 => {
                    self.trace(format!("status p{index} by b{asker} => archived (404)"));
                    Ok(())
                }
                other => Err(format!(
                    "status of archived p{index} for b{asker}: {:?}",
                    other.map(|v| v.status).map_err(api)
                )),
            };
        }
        let view = answer.map_err(|e| format!("status of p{index} for b{asker}: {}", api(e)))?;
        let state = State::of_view(&view)?;
        self.report.status_queries += 1;
        if state != self.payments[index].state {
            return Err(format!(
                "status of p{index}: {state:?}, the model has {:?}",
                self.payments[index].state
            ));
        }
        self.trace(format!("status p{index} by b{asker} => {state:?}"));
        Ok(())
    }

    pub(crate) fn decide(&mut self, index: usize, decision: Decision) -> Outcome {
        let p = &self.payments[index];
        let caller = Caller::Participant(self.banks[p.creditor].bic.clone());
        let pending = p.state == State::Pending && p.notes_due == 0;
        let switch = self.live().switch.clone();
        let answer = switch.decide(&caller, p.id, decision.clone());
        self.trace(format!(
            "decide p{index} {decision:?} => {}",
            match &answer {
                Ok(()) => "taken".to_string(),
                Err(e) => format!("{} {}", e.status, e.code),
            }
        ));
        match (answer, pending) {
            (Ok(()), true) => {
                self.expect_final(index, State::of_decision(&decision));
                self.pump()
            }
            (Err(e), false) if e.status == 409 => Ok(()),
            (answer, pending) => Err(format!(
                "decision on p{index} (model pending: {pending}) answered {:?}",
                answer.map_err(api)
            )),
        }
    }

    pub(crate) fn liquidity(
        &mut self,
        bank: usize,
        amount: u128,
        direction: LiquidityDirection,
    ) -> Outcome {
        self.liquidity_requests += 1;
        let request = LiquidityRequest {
            request_id: format!("LIQ-{}", self.liquidity_requests),
            currency: CURRENCY.into(),
            amount: format_amount(amount, EXPONENT),
            direction,
        };
        let fits = direction == LiquidityDirection::In || amount as i128 <= self.available(bank);
        let switch = self.live().switch.clone();
        let bic = self.banks[bank].bic.clone();
        let answer = self.block_on(switch.liquidity(&bic, request));
        self.trace(format!(
            "liquidity b{bank} {direction:?} {amount} => {}",
            match &answer {
                Ok(_) => "done".to_string(),
                Err(e) => format!("{} {}", e.status, e.code),
            }
        ));
        match (answer, fits) {
            (Ok(_), true) => {
                self.report.liquidity_transfers += 1;
                self.apply_liquidity(bank, amount, direction);
                self.pump()
            }
            (Err(e), false) if e.reason == Some("AM04") => Ok(()),
            (answer, fits) => Err(format!(
                "liquidity {direction:?} {amount} for b{bank} (model fits: {fits}) answered {:?}",
                answer.map(|_| ()).map_err(api)
            )),
        }
    }

    pub(crate) fn close_window(&mut self) -> Outcome {
        let settle = self.rng.chance(50);
        let switch = self.live().switch.clone();
        let report = self
            .block_on(switch.close_window(&Caller::Operator, settle))
            .map_err(|e| format!("close window: {}", api(e)))?;
        self.report.windows_closed += 1;
        let plan = report.plan.clone().ok_or("closed window without a plan")?;
        self.window_positions_match(&plan, &format!("window {} closed", report.window))?;
        for bank in &mut self.banks {
            bank.window_sent = 0;
            bank.window_received = 0;
        }
        self.trace(format!("close window {} (settle: {settle})", report.window));
        if settle {
            self.apply_settlement(&report)?;
        } else {
            self.closed_unsettled.push(report.window);
        }
        self.pump()
    }

    /// Retention: the oldest settled window not yet pruned leaves the hot store, its vouchers
    /// taken into the simulator's archive first. With `faulted` a power loss is armed: the prune
    /// fails, and is done again after the restart.
    pub(crate) fn prune(&mut self, faulted: bool) -> Outcome {
        let switch = self.live().switch.clone();
        let node = self.live().node.clone();
        let (window, settled) = self.next_to_prune()?;
        if !settled {
            if faulted {
                return Err("no window to prune".into());
            }
            self.trace(format!("prune: window {window} is not settled yet"));
            return Ok(());
        }
        let (first, last) = self
            .block_on(switch.clearing.window_span(window))
            .map_err(|e| format!("span of window {window}: {}", api(e)))?;
        let anchor = node.vouchers_anchor().map_err(|e| format!("anchor: {e}"))?;
        let vouchers: Vec<clearhouse_engine::Voucher> = if anchor.0 >= last {
            // A prune whose last write survived a power loss unacknowledged: the vouchers left
            // the hot store, and the archive took them before.
            self.archive
                .iter()
                .filter(|(seq, _, _)| (first..=last).contains(seq))
                .map(|(seq, hash, body)| clearhouse_engine::Voucher {
                    seq: *seq,
                    hash: *hash,
                    body: body.clone(),
                })
                .collect()
        } else {
            node.vouchers(first, (last + 1 - first) as usize)
                .map_err(|e| format!("vouchers of window {window}: {e}"))?
        };
        if vouchers.first().map(|v| v.seq) != Some(first)
            || vouchers.len() as u64 != last + 1 - first
        {
            return Err(format!(
                "window {window}'s vouchers {first}..={last} are neither hot nor archived"
            ));
        }
        // The archive: appended once per window (a retried prune finds it there already).
        if self.archive.last().is_none_or(|(seq, _, _)| *seq < last) {
            self.archive
                .extend(vouchers.iter().map(|v| (v.seq, v.hash, v.body.clone())));
        }
        let archived: Vec<(u64, [u8; 32])> = vouchers.iter().map(|v| (v.seq, v.hash)).collect();
        let answer = self.block_on(switch.prune_window(window, &archived));
        if faulted {
            return match answer {
                Ok(_) => Err(format!(
                    "prune of window {window} acknowledged though its write failed"
                )),
                Err(_) => {
                    self.report.faults.prunes_interrupted += 1;
                    self.trace(format!("power loss during the prune of window {window}"));
                    Ok(())
                }
            };
        }
        let report = answer.map_err(|e| format!("prune window {window}: {}", api(e)))?;
        let mut archived_now = 0;
        for voucher in &vouchers {
            if let Ok(
                VoucherEvent::PaymentSettled { payment, .. }
                | VoucherEvent::PaymentRejected { payment, .. },
            ) = VoucherEvent::parse(&voucher.body)
            {
                let id = u128::from_str_radix(&payment, 16).map_err(|e| e.to_string())?;
                if let Some(&index) = self.by_id.get(&id) {
                    if self.payments[index].state == State::Pending {
                        return Err(format!(
                            "p{index} has a final voucher but is pending in the model"
                        ));
                    }
                    self.payments[index].archived = true;
                    archived_now += 1;
                }
            }
        }
        if report.payments != archived_now {
            return Err(format!(
                "prune of window {window}: {} payments pruned, the model knows {archived_now}",
                report.payments
            ));
        }
        self.report.windows_pruned += 1;
        self.report.payments_archived += archived_now;
        self.trace(format!(
            "prune window {window}: {archived_now} payments archived"
        ));
        self.pump()
    }

    /// The next window to prune, and whether it is settled (prunable).
    pub(crate) fn next_to_prune(&mut self) -> Result<(u64, bool), String> {
        let switch = self.live().switch.clone();
        let state = self
            .block_on(switch.clearing.retention_state())
            .map_err(|e| format!("retention state: {}", api(e)))?;
        let window = state.pruned_through + 1;
        let settled = self
            .block_on(switch.window_report(&Caller::Operator, window))
            .is_ok_and(|r| r.state == clearhouse_clearing::report::WindowState::Settled);
        Ok((window, settled))
    }

    pub(crate) fn settle_window(&mut self) -> Outcome {
        let Some(window) = self.closed_unsettled.first().copied() else {
            return self.close_window();
        };
        let switch = self.live().switch.clone();
        let report = self
            .block_on(switch.settle_window(&Caller::Operator, window))
            .map_err(|e| format!("settle window {window}: {}", api(e)))?;
        self.closed_unsettled.remove(0);
        self.trace(format!("settle window {window}"));
        self.apply_settlement(&report)?;
        self.pump()
    }
}
