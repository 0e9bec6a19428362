//! The checks after every step and at the end: the ledger against the model (balances,
//! reservations, incoming, positions, money conserved), every payment final once, the windows, and
//! the voucher chain verified.

use crate::*;

impl World {
    /// Ends the run: every deadline passes, every held message is delivered, the window closes
    /// and settles, and every payment answers its final state.
    pub(crate) fn finish(&mut self) -> Outcome {
        self.advance(DEADLINE_MS + 1)?;
        while !self.network.is_empty() {
            let message = self.network.pop_front().expect("not empty");
            match message {
                Message::Forward { payment, answer } => {
                    if let Some(answer) = answer {
                        if answer.send(SimAnswer::Decided(Decision::Accept)).is_ok() {
                            return Err(format!(
                                "p{payment}: the switch still waits after every deadline"
                            ));
                        }
                    }
                }
                Message::Decide { payment, decision } => self.decide(payment, decision)?,
                Message::Notify { .. } => {}
            }
        }
        if let Some(p) = self.payments.iter().position(|p| p.state == State::Pending) {
            return Err(format!("p{p} is not final after every deadline"));
        }
        while !self.closed_unsettled.is_empty() {
            self.settle_window()?;
        }
        let switch = self.live().switch.clone();
        let report = self
            .block_on(switch.close_window(&Caller::Operator, true))
            .map_err(|e| format!("final close: {}", api(e)))?;
        self.report.windows_closed += 1;
        self.apply_settlement(&report)?;
        for bank in &mut self.banks {
            bank.window_sent = 0;
            bank.window_received = 0;
        }
        self.check()?;
        for index in 0..self.payments.len() {
            let p = &self.payments[index];
            let query = StatusQuery {
                payment_id: Some(format!("{:032x}", p.id)),
                instruction_id: None,
                end_to_end_id: None,
                debtor_agent: None,
                uetr: None,
            };
            let answer = self.block_on(switch.status(&Caller::Operator, query));
            if p.archived {
                match answer {
                    Err(e) if e.status == 410 && e.code == "archived" => continue,
                    other => {
                        return Err(format!(
                            "final status of archived p{index}: {:?}",
                            other.map(|v| v.status).map_err(api)
                        ))
                    }
                }
            }
            let view = answer.map_err(|e| format!("final status of p{index}: {}", api(e)))?;
            if State::of_view(&view)? != self.payments[index].state {
                return Err(format!("final status of p{index} disagrees with the model"));
            }
        }
        self.verify_vouchers()?;
        self.trace(format!(
            "end: {} payments, {} settled, balances and chain verified",
            self.report.payments, self.report.settled
        ));
        self.report.steps = self.step - 1;
        self.crash();
        Ok(())
    }

    /// After every step: the ledger agrees with the model for every participant; no reservation
    /// outlives its deadline; the open window's positions are the model's.
    pub(crate) fn check(&mut self) -> Outcome {
        let switch = self.live().switch.clone();
        let now = self.clock.now_ns();
        for (i, p) in self.payments.iter().enumerate() {
            if p.state == State::Pending && p.deadline_ns <= now {
                return Err(format!("p{i} still reserved after its deadline"));
            }
        }
        let mut ledger_total: i128 = 0;
        for i in 0..BANKS {
            let bic = self.banks[i].bic.clone();
            let positions = self
                .block_on(switch.positions(&bic))
                .map_err(|e| format!("positions of b{i}: {}", api(e)))?;
            let position = positions
                .iter()
                .find(|p| p.currency == CURRENCY)
                .ok_or("no EUR position")?;
            let expected = (
                format_signed(self.banks[i].balance, EXPONENT),
                format_amount(self.reserved(i), EXPONENT),
                format_amount(self.incoming(i), EXPONENT),
                format_amount(self.available(i).max(0) as u128, EXPONENT),
            );
            let actual = (
                position.balance.clone(),
                position.reserved_outgoing.clone(),
                position.pending_incoming.clone(),
                position.available.clone(),
            );
            if actual != expected {
                return Err(format!(
                    "b{i} on the ledger (balance, reserved, incoming, available) = {actual:?}, the model has {expected:?}"
                ));
            }
            let balance = position.balance.trim_start_matches('-');
            let magnitude = clearhouse_switch::money::parse_amount(balance, EXPONENT)
                .map_err(|e| format!("b{i} balance {}: {e}", position.balance))?;
            let magnitude = i128::try_from(magnitude).map_err(|e| e.to_string())?;
            ledger_total += if position.balance.starts_with('-') {
                -magnitude
            } else {
                magnitude
            };
        }
        // Money is conserved: payments only move it between positions.
        if ledger_total != self.external_total {
            return Err(format!(
                "the positions on the ledger sum to {ledger_total}, but {} entered from outside",
                self.external_total
            ));
        }
        let reports = self
            .block_on(switch.windows(&Caller::Operator, 1))
            .map_err(|e| format!("windows: {}", api(e)))?;
        let open = reports.first().ok_or("no open window")?;
        let plan = open.plan.as_ref().ok_or("open window without figures")?;
        self.window_positions_match(plan, &format!("open window {}", open.window))?;
        self.report.checks += 1;
        Ok(())
    }

    /// The voucher chain verifies (hashes and signed checkpoints) and holds every settled payment
    /// exactly once.
    pub(crate) fn verify_vouchers(&mut self) -> Outcome {
        let node = self.live().node.clone();
        let key = clearhouse_switch::clearing::load_or_create_signing_key(&self.data_dir)
            .map_err(|e| format!("checkpoint key: {e}"))?
            .verifying_key();
        // The archive (pruned windows) from the first voucher, then the hot part after it: the
        // whole chain verified.
        let archived = if self.archive.is_empty() {
            None
        } else {
            let mut verifier = clearhouse_clearing::export::ChainVerifier::new(key);
            for (seq, hash, body) in &self.archive {
                verifier
                    .voucher(*seq, hash, body)
                    .map_err(|e| format!("the archive: {e}"))?;
            }
            Some(verifier)
        };
        let verified = clearhouse_switch::clearing::verify_data_dir(&node, &key, archived, |_| {})
            .map_err(|e| format!("voucher chain: {e}"))?;
        let mut settled = BTreeSet::new();
        let mut bodies: Vec<Vec<u8>> = self.archive.iter().map(|(_, _, b)| b.clone()).collect();
        let mut from = self.archive.last().map_or(0, |(seq, _, _)| seq + 1);
        loop {
            let page = node
                .vouchers(from, 4096)
                .map_err(|e| format!("vouchers: {e}"))?;
            let Some(last) = page.last() else { break };
            from = last.seq + 1;
            bodies.extend(page.into_iter().map(|v| v.body));
        }
        for body in &bodies {
            if let Ok(VoucherEvent::PaymentSettled { payment, .. }) = VoucherEvent::parse(body) {
                if !settled.insert(payment.clone()) {
                    return Err(format!("payment {payment} settled twice in the chain"));
                }
            }
        }
        let model: BTreeSet<String> = self
            .payments
            .iter()
            .filter(|p| p.state == State::Settled)
            .map(|p| format!("{:032x}", p.id))
            .collect();
        if settled != model {
            let missing: Vec<_> = model.difference(&settled).collect();
            let extra: Vec<_> = settled.difference(&model).collect();
            return Err(format!(
                "the chain's settled payments differ from the model: missing {missing:?}, extra {extra:?}"
            ));
        }
        self.report.vouchers_verified = verified.vouchers;
        self.trace(format!(
            "chain verified: {} vouchers, {} checkpoints, {} settled payments",
            verified.vouchers,
            verified.checkpoints,
            settled.len()
        ));
        Ok(())
    }
}
