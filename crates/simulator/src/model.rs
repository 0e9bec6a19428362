//! The model: what the switch must have done, kept by the simulator independently of it: each
//! payment's state, each bank's balance, reservations, incoming amounts, window positions.

use crate::*;

impl World {
    pub(crate) fn reserved(&self, bank: usize) -> u128 {
        self.payments
            .iter()
            .filter(|p| p.state == State::Pending && p.debtor == bank)
            .map(|p| p.amount)
            .sum()
    }

    pub(crate) fn incoming(&self, bank: usize) -> u128 {
        self.payments
            .iter()
            .filter(|p| p.state == State::Pending && p.creditor == bank)
            .map(|p| p.amount)
            .sum()
    }

    pub(crate) fn available(&self, bank: usize) -> i128 {
        let b = &self.banks[bank];
        let cap = if b.deferred { CAP as i128 } else { 0 };
        b.balance + cap - self.reserved(bank) as i128
    }

    /// A payment leaves Pending: the model moves its money and counts it.
    pub(crate) fn settle_in_model(&mut self, index: usize, state: State) {
        let p = &mut self.payments[index];
        assert_eq!(p.state, State::Pending, "p{index} was already final");
        p.state = state.clone();
        let (debtor, creditor, amount) = (p.debtor, p.creditor, p.amount);
        match state {
            State::Settled => {
                self.report.settled += 1;
                self.banks[debtor].balance -= amount as i128;
                self.banks[creditor].balance += amount as i128;
                self.banks[debtor].window_sent += amount;
                self.banks[creditor].window_received += amount;
            }
            State::Rejected(reason) => *self.report.rejected.entry(reason).or_default() += 1,
            State::Pending => unreachable!("settle_in_model to Pending"),
        }
    }

    pub(crate) fn outstanding(&self) -> u64 {
        self.payments
            .iter()
            .map(|p| u64::from(p.forwards_due) + u64::from(p.notes_due))
            .sum::<u64>()
            + u64::from(self.return_notes_due)
    }

    pub(crate) fn describe_outstanding(&self) -> String {
        let mut due = Vec::new();
        if self.return_notes_due > 0 {
            due.push(format!("{} return notification(s)", self.return_notes_due));
        }
        for (i, p) in self.payments.iter().enumerate() {
            if p.forwards_due > 0 {
                due.push(format!("forward of p{i}"));
            }
            if p.notes_due > 0 {
                due.push(format!(
                    "{} notification(s) of p{i} ({:?})",
                    p.notes_due, p.expected_final
                ));
            }
        }
        due.join(", ")
    }

    pub(crate) fn index_of(&self, view: &PaymentView) -> Result<usize, String> {
        u128::from_str_radix(&view.payment_id, 16)
            .ok()
            .and_then(|id| self.by_id.get(&id).copied())
            .ok_or_else(|| format!("a call about unknown payment {}", view.payment_id))
    }

    /// The switch will finalize `index` with `state`: two notifications.
    pub(crate) fn expect_final(&mut self, index: usize, state: State) {
        let p = &mut self.payments[index];
        p.notes_due += 2;
        p.expected_final = Some(state);
    }

    pub(crate) fn apply_liquidity(
        &mut self,
        bank: usize,
        amount: u128,
        direction: LiquidityDirection,
    ) {
        let signed = match direction {
            LiquidityDirection::In => amount as i128,
            LiquidityDirection::Out => -(amount as i128),
        };
        self.banks[bank].balance += signed;
        self.external_total += signed;
    }

    /// Fund adjustments of a settled window, checked against the model and applied to it.
    pub(crate) fn apply_settlement(
        &mut self,
        report: &clearhouse_clearing::report::WindowReport,
    ) -> Outcome {
        self.report.windows_settled += 1;
        if !report.breaks.is_empty() || !report.reconciled {
            return Err(format!(
                "window {} settled with breaks: {:?}",
                report.window, report.breaks
            ));
        }
        let plan = report
            .plan
            .as_ref()
            .ok_or("settled window without a plan")?;
        for instruction in &plan.instructions {
            let bank = self
                .banks
                .iter()
                .position(|b| b.bic == instruction.participant)
                .ok_or("instruction for an unknown participant")?;
            if !self.banks[bank].deferred {
                return Err(format!("a fund adjustment for prefunded b{bank}"));
            }
            let carried: u128 = report
                .carried
                .iter()
                .filter(|(p, _, _)| *p == instruction.participant)
                .map(|(_, _, amount)| amount.parse::<u128>().unwrap_or(u128::MAX))
                .sum();
            let moved = instruction
                .net
                .unsigned_abs()
                .checked_sub(carried)
                .ok_or_else(|| format!("b{bank} carried {carried}, more than its net"))?;
            let signed = if instruction.net < 0 {
                moved as i128
            } else {
                -(moved as i128)
            };
            self.banks[bank].balance += signed;
            self.external_total += signed;
        }
        Ok(())
    }

    /// The window's positions as the switch computed them equal the model's, bank by bank.
    pub(crate) fn window_positions_match(
        &self,
        plan: &clearhouse_clearing::netting::SettlementPlan,
        what: &str,
    ) -> Outcome {
        for (i, bank) in self.banks.iter().enumerate() {
            let (sent, received) = plan
                .positions
                .iter()
                .find(|p| p.participant == bank.bic)
                .map_or((0, 0), |p| (p.sent, p.received));
            if (sent, received) != (bank.window_sent, bank.window_received) {
                return Err(format!(
                    "{what}: b{i} sent {sent} received {received}; the model has {} and {}",
                    bank.window_sent, bank.window_received
                ));
            }
        }
        Ok(())
    }
}
