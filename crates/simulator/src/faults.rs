//! Power loss: the next journal write keeps none, part or all of its bytes, the engine dies, the
//! world waits out the downtime and restarts the switch on the same files; what was in flight
//! (decisions, liquidity, window close and settlement) is resolved against what reached the disk.

use crate::*;

impl World {
    pub(crate) fn crash(&mut self) {
        if let Some(live) = self.orphan_live() {
            // Dropping the runtime drops every task of the switch; then the engine's threads stop
            // (a poisoned journal wrote nothing more).
            let Live {
                runtime,
                node,
                switch,
                calls,
            } = live;
            drop(runtime);
            drop(calls);
            drop(switch);
            drop(node);
        }
    }

    /// Takes the running switch out of the world (to stop it, or to keep it running deposed):
    /// the forwards it holds belong to it, so their answers go nowhere.
    pub(crate) fn orphan_live(&mut self) -> Option<Live> {
        for message in self.network.iter_mut() {
            if let Message::Forward { answer, .. } = message {
                *answer = None;
            }
        }
        self.live.take()
    }

    /// A power loss while the journal writes: armed, then one action that writes; the process
    /// dies with the write lost, torn, or whole but unacknowledged; time passes; it restarts.
    pub(crate) fn power_loss(&mut self) -> Outcome {
        let keep = match self.rng.below(3) {
            0 => 0,
            1 => 1 + self.rng.below(700),
            _ => u64::MAX,
        };
        // Replicated: half the faults hit the log instead of the disk.
        let log_fault = match &self.replica {
            Some(_) if self.rng.chance(50) => Some(if self.rng.chance(50) {
                replica::LogFault::AckLost
            } else {
                replica::LogFault::PublishLost
            }),
            _ => None,
        };
        if let Some(replica) = &self.replica {
            replica.log.arm(log_fault);
        }
        if log_fault.is_none() {
            self.storage.arm_power_loss(keep);
        }
        let pending: Vec<usize> = (0..self.payments.len())
            .filter(|&i| {
                self.payments[i].state == State::Pending && self.payments[i].notes_due == 0
            })
            .collect();
        let target = self.rng.below(10);
        if target < 2 {
            // During a window close (not settled with it).
            let switch = self.live().switch.clone();
            let open = self
                .block_on(switch.windows(&Caller::Operator, 1))
                .map_err(|e| format!("windows: {}", api(e)))?
                .first()
                .map(|r| r.window)
                .ok_or("no open window")?;
            if self
                .block_on(switch.close_window(&Caller::Operator, false))
                .is_ok()
            {
                return Err("a window close was acknowledged though its write failed".into());
            }
            self.trace(format!("power loss during the close of window {open}"));
            self.interrupted_window = Some((open, false));
        } else if target == 4 && self.next_to_prune()?.1 {
            self.prune(true)?;
            self.interrupted_prune = true;
        } else if target < 4 && !self.closed_unsettled.is_empty() {
            let window = self.closed_unsettled[0];
            let switch = self.live().switch.clone();
            if self
                .block_on(switch.settle_window(&Caller::Operator, window))
                .is_ok()
            {
                return Err("a settlement was acknowledged though its write failed".into());
            }
            self.trace(format!(
                "power loss during the settlement of window {window}"
            ));
            self.interrupted_window = Some((window, true));
        } else if pending.is_empty() {
            let bank = self.rng.below(PREFUNDED as u64) as usize;
            let amount = 1 + u128::from(self.rng.below(AMOUNT_MAX));
            self.liquidity_requests += 1;
            let request = LiquidityRequest {
                request_id: format!("LIQ-{}", self.liquidity_requests),
                currency: CURRENCY.into(),
                amount: format_amount(amount, EXPONENT),
                direction: LiquidityDirection::In,
            };
            let switch = self.live().switch.clone();
            let bic = self.banks[bank].bic.clone();
            if self
                .block_on(switch.liquidity(&bic, request.clone()))
                .is_ok()
            {
                return Err("a liquidity transfer was acknowledged though its write failed".into());
            }
            self.trace(format!("power loss during liquidity b{bank} In {amount}"));
            self.interrupted_liquidity = Some(InterruptedLiquidity {
                bank,
                request,
                amount,
            });
        } else {
            let index = pending[self.rng.below(pending.len() as u64) as usize];
            let decision = if self.rng.chance(80) {
                Decision::Accept
            } else {
                Decision::Reject("AC04".into())
            };
            let p = &self.payments[index];
            let caller = Caller::Participant(self.banks[p.creditor].bic.clone());
            let switch = self.live().switch.clone();
            switch
                .decide(&caller, p.id, decision.clone())
                .map_err(|e| format!("decision on pending p{index}: {}", api(e)))?;
            self.trace(format!("power loss during decision p{index} {decision:?}"));
            self.payments[index].interrupted = Some(decision);
        }
        // Let the switch run until the write fails.
        let storage = self.storage.clone();
        let log = self.replica.as_ref().map(|replica| replica.log.clone());
        let tripped = self.block_on(async move {
            for _ in 0..3_000 {
                let log_tripped = log.as_ref().is_some_and(|log| log.tripped().is_some());
                if (log_fault.is_none() && storage.tripped()) || log_tripped {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            false
        });
        if !tripped {
            return Err("the armed write never happened".into());
        }
        let (written, length) = self.storage.written();
        match log_fault {
            Some(replica::LogFault::AckLost) => self.report.faults.acks_lost += 1,
            Some(replica::LogFault::PublishLost) => self.report.faults.publishes_lost += 1,
            None => match written {
                0 => self.report.faults.writes_lost += 1,
                w if w < length => self.report.faults.writes_torn += 1,
                _ => self.report.faults.writes_unacknowledged_on_disk += 1,
            },
        }
        self.report.faults.crashes += 1;
        self.crash();
        // The dead leader's lease runs out a TTL after its last renewal (now).
        let now = self.clock.now_ns();
        if let Some(replica) = self.replica.as_mut() {
            replica.lease.expires_ns = now + replica::LEASE_TTL_MS * 1_000_000;
        }
        let down = self.rng.below(DOWNTIME_MAX_MS + 1);
        self.clock.advance(down * 1_000_000);
        self.trace(format!(
            "crash: {} of {} bytes of the write on disk; down for {down} ms",
            if written == length {
                "all".into()
            } else {
                written.to_string()
            },
            length
        ));
        if self.replica.is_some() {
            self.failover()?;
        } else {
            self.start()?;
        }
        // The interrupted liquidity transfer: retried with its request id, applied once.
        if let Some(interrupted) = self.interrupted_liquidity.take() {
            let switch = self.live().switch.clone();
            let bic = self.banks[interrupted.bank].bic.clone();
            self.block_on(switch.liquidity(&bic, interrupted.request))
                .map_err(|e| format!("retried liquidity: {}", api(e)))?;
            self.apply_liquidity(interrupted.bank, interrupted.amount, LiquidityDirection::In);
            self.trace(format!("liquidity b{} retried => done", interrupted.bank));
            self.pump()?;
        }
        // An interrupted prune: done again (what survived is recognised and skipped).
        if std::mem::take(&mut self.interrupted_prune) {
            self.prune(false)?;
        }
        // An interrupted close or settlement: done whole (the write survived) or not at all.
        if let Some((window, settling)) = self.interrupted_window.take() {
            self.resolve_interrupted_window(window, settling)?;
        }
        self.verify_vouchers()
    }

    pub(crate) fn resolve_interrupted_window(&mut self, window: u64, settling: bool) -> Outcome {
        let switch = self.live().switch.clone();
        let report = self
            .block_on(switch.window_report(&Caller::Operator, window))
            .map_err(|e| format!("window {window} after restart: {}", api(e)))?;
        use clearhouse_clearing::report::WindowState;
        match (settling, report.state) {
            (false, WindowState::Open) => {
                self.trace(format!("window {window} still open after restart"));
            }
            (false, WindowState::Closed) => {
                // The close survived: its plan must be the model's window, and it is signed.
                if report.checkpoint.is_none() {
                    return Err(format!(
                        "window {window} closed without its checkpoint after restart"
                    ));
                }
                let plan = report.plan.clone().ok_or("closed window without a plan")?;
                self.window_positions_match(
                    &plan,
                    &format!("interrupted close of window {window}"),
                )?;
                for bank in &mut self.banks {
                    bank.window_sent = 0;
                    bank.window_received = 0;
                }
                self.report.windows_closed += 1;
                self.closed_unsettled.push(window);
                self.trace(format!("window {window} closed by the surviving write"));
            }
            (true, WindowState::Closed) => {
                self.trace(format!("window {window} still closed after restart"));
            }
            (true, WindowState::Settled) => {
                // The settlement survived; settling again reconciles it (idempotent).
                let report = self
                    .block_on(switch.settle_window(&Caller::Operator, window))
                    .map_err(|e| format!("settling window {window} again: {}", api(e)))?;
                self.closed_unsettled.retain(|&w| w != window);
                self.apply_settlement(&report)?;
                self.trace(format!("window {window} settled by the surviving write"));
            }
            (settling, state) => {
                return Err(format!(
                    "window {window} is {state:?} after an interrupted {}",
                    if settling { "settlement" } else { "close" }
                ))
            }
        }
        self.pump()
    }
}
