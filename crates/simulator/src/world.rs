//! The simulated world around the real switch: its start on the data directory (and what the
//! disk says after a restart), the simulated banks onboarded and funded, and the network between
//! them: calls the switch emits are pumped, held, delivered, dropped, duplicated or reordered,
//! and the creditor agents answer now, later, never or not at all; the clock moves.

use crate::*;

impl World {
    pub(crate) fn new(options: &SimOptions) -> World {
        let banks = (0..BANKS)
            .map(|i| Bank {
                bic: format!("SIM{}DEFF", (b'A' + i as u8) as char),
                deferred: i >= PREFUNDED,
                balance: 0,
                window_sent: 0,
                window_received: 0,
            })
            .collect();
        World {
            steps: options.steps,
            step: 0,
            verbose: options.verbose,
            rng: Rng(options.seed),
            clock: SimClock::new(START_NS),
            storage: Arc::new(StorageFaults::default()),
            data_dir: if options.replicated {
                options.data_dir.join("n0")
            } else {
                options.data_dir.clone()
            },
            live: None,
            replica: options
                .replicated
                .then(|| replica::Replica::new(&options.data_dir)),
            banks,
            payments: Vec::new(),
            by_id: BTreeMap::new(),
            network: VecDeque::new(),
            closed_unsettled: Vec::new(),
            interrupted_liquidity: None,
            interrupted_window: None,
            interrupted_prune: false,
            archive: Vec::new(),
            liquidity_requests: 0,
            returns_made: 0,
            return_notes_due: 0,
            external_total: 0,
            digest: blake3::Hasher::new(),
            tail: VecDeque::new(),
            report: SimReport {
                seed: options.seed,
                ..SimReport::default()
            },
        }
    }

    pub(crate) fn trace(&mut self, line: String) {
        let line = format!("{:>5} {line}", self.step);
        if self.verbose {
            eprintln!("{line}");
        }
        self.digest.update(line.as_bytes());
        self.digest.update(b"\n");
        if self.tail.len() == 40 {
            self.tail.pop_front();
        }
        self.tail.push_back(line);
    }

    pub(crate) fn live(&self) -> &Live {
        self.live.as_ref().expect("the switch runs")
    }

    pub(crate) fn block_on<F: std::future::Future>(&self, future: F) -> F::Output {
        self.live().runtime.block_on(future)
    }

    pub(crate) fn run_all(&mut self) -> Outcome {
        self.start()?;
        self.onboard()?;
        self.check()?;
        while self.step < self.steps {
            self.step += 1;
            self.act()?;
            if self.replica.is_some() && self.rng.chance(40) {
                // The standby lags: it applies a few groups now and then.
                let count = 1 + self.rng.below(3) as usize;
                self.standby_apply(count)?;
            }
            self.check()?;
            if self.step.is_multiple_of(25) {
                self.verify_vouchers()?;
                self.check_standby()?;
            }
        }
        self.step += 1;
        self.finish()
    }

    pub(crate) fn start(&mut self) -> Outcome {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("runtime: {e}"))?;
        // Small segments: every restart reads its segment whole, and a seed restarts ~20 times
        // (64 MiB each made the sweep spend most of its time in the kernel); rolling over to a
        // new segment is exercised more often too.
        let mut options = replica::node_options(&self.data_dir, &self.clock);
        options.journal.faults = Some(self.storage.clone());
        options.replication = self.leader_replication();
        let node = Node::start(options).map_err(|e| format!("engine start: {e}"))?;
        let (sender, calls) = mpsc::channel(CALLS_MAX);
        let environment = Environment {
            clock: Clock::Simulated(self.clock.clone()),
            transport: Transport::Simulated(sender),
        };
        let truth = self.disk_truth(&node)?;
        let switch = runtime
            .block_on(Switch::start_in(
                node.clone(),
                config(),
                &self.data_dir,
                environment,
            ))
            .map_err(|e| format!("switch start: {}", api(e)))?;
        self.live = Some(Live {
            runtime,
            node,
            switch,
            calls,
        });
        self.resume_expectations(truth)?;
        if self
            .replica
            .as_ref()
            .is_some_and(|replica| replica.standby.is_none() && !replica.hold_standby)
        {
            self.start_standby()?;
        }
        self.pump()
    }

    /// (bytes of the interrupted write that count as durable, its length): on one node what
    /// reached the disk; replicated, the group is durable whole if the log stored it (ack lost),
    /// not at all otherwise (lost before the log, or the local write failed before publishing).
    pub(crate) fn interrupted_write(&self) -> (u64, u64) {
        match &self.replica {
            None => self.storage.written(),
            Some(replica) => match replica.log.tripped() {
                Some(replica::LogFault::AckLost) => (1, 1),
                Some(replica::LogFault::PublishLost) => (0, 1),
                None if self.storage.tripped() => (0, 1),
                None => (0, 0),
            },
        }
    }

    /// The state on disk of every payment the model has open, read from the recovered engine
    /// before the switch starts.
    pub(crate) fn disk_truth(&self, node: &Node) -> Result<Vec<(usize, State)>, String> {
        let open: Vec<usize> = (0..self.payments.len())
            .filter(|&i| self.payments[i].state == State::Pending)
            .collect();
        let ids: Vec<u128> = open.iter().map(|&i| self.payments[i].id).collect();
        let records = node
            .get_records(&ids)
            .map_err(|e| format!("reading records: {e}"))?;
        let mut truth = Vec::new();
        for (&index, record) in open.iter().zip(records) {
            let record = record.ok_or_else(|| {
                format!("p{index} was acknowledged as reserved but is not on disk after recovery")
            })?;
            let record =
                clearhouse_switch::stored::decode_payment(self.payments[index].id, &record)
                    .map_err(|e| format!("p{index} record: {e}"))?
                    .ok_or_else(|| format!("p{index}: its key holds another kind of record"))?;
            let state = match (record.state, record.reason) {
                (PaymentState::Reserved, _) => State::Pending,
                (PaymentState::Settled, _) => State::Settled,
                (PaymentState::Rejected, Some(reason)) => State::Rejected(reason),
                other => return Err(format!("p{index} on disk in state {other:?}")),
            };
            truth.push((index, state));
        }
        Ok(truth)
    }

    /// After a restart: what the switch must emit for the payments it resumes.
    pub(crate) fn resume_expectations(&mut self, truth: Vec<(usize, State)>) -> Outcome {
        let now = self.clock.now_ns();
        let (written, length) = self.interrupted_write();
        for (index, state) in truth {
            let interrupted = self.payments[index].interrupted.take();
            match state {
                State::Pending => {
                    if interrupted.is_some() && written == length && length > 0 {
                        return Err(format!(
                            "p{index}: its final write reached the disk whole but recovery did not replay it"
                        ));
                    }
                    let p = &mut self.payments[index];
                    p.timeout_reason = "AB05";
                    if p.deadline_ns > now {
                        p.forwards_due += 1;
                    } else {
                        p.notes_due += 2;
                        p.expected_final = Some(State::Rejected("AB05".into()));
                    }
                }
                final_state => {
                    let Some(decision) = interrupted else {
                        return Err(format!(
                            "p{index} is {final_state:?} on disk though nothing final was written for it"
                        ));
                    };
                    if written < length {
                        return Err(format!(
                            "p{index}: a write cut at {written} of {length} bytes was replayed as {final_state:?}"
                        ));
                    }
                    if final_state != State::of_decision(&decision) {
                        return Err(format!(
                            "p{index} on disk {final_state:?}, but the interrupted decision was {decision:?}"
                        ));
                    }
                    // Durable though never acknowledged: final, and nobody was notified (the
                    // agents learn it by status query).
                    self.settle_in_model(index, final_state);
                }
            }
        }
        Ok(())
    }

    pub(crate) fn onboard(&mut self) -> Outcome {
        for i in 0..BANKS {
            let bank = &self.banks[i];
            let mut currencies = BTreeMap::new();
            currencies.insert(
                CURRENCY.to_string(),
                TermsRequest {
                    model: if bank.deferred {
                        SettlementModel::DeferredNet
                    } else {
                        SettlementModel::Prefunded
                    },
                    net_debit_cap: bank.deferred.then(|| format_amount(CAP, EXPONENT)),
                    per_payment_max: None,
                    liquidity_alert_below: None,
                },
            );
            let request = OnboardRequest {
                bic: bank.bic.clone(),
                name: format!("Simulated bank {i}"),
                endpoint: "http://127.0.0.1:9/simulated".into(),
                currencies,
                secret_hex: None,
                routing_number: None,
            };
            let switch = self.live().switch.clone();
            self.block_on(switch.onboard(request))
                .map_err(|e| format!("onboarding b{i}: {}", api(e)))?;
            if !self.banks[i].deferred {
                self.liquidity(i, FUNDING, LiquidityDirection::In)?;
            }
        }
        self.trace(format!(
            "onboarded {BANKS} banks ({PREFUNDED} prefunded with {FUNDING}, the others deferred net with cap {CAP})"
        ));
        Ok(())
    }

    /// Runs the switch until it emitted everything the model expects, checking each call as it
    /// comes; the calls of one step enter the network in a fixed order.
    pub(crate) fn pump(&mut self) -> Outcome {
        let mut emitted: Vec<(u8, usize, usize, Message)> = Vec::new();
        loop {
            let waiting = self.outstanding() > 0;
            let call = {
                let live = self.live.as_mut().expect("the switch runs");
                match live.calls.try_recv() {
                    Ok(call) => Some(call),
                    Err(_) if !waiting => None,
                    Err(_) => {
                        let calls = &mut live.calls;
                        match live
                            .runtime
                            .block_on(async { tokio::time::timeout(WAIT_REAL, calls.recv()).await })
                        {
                            Ok(Some(call)) => Some(call),
                            Ok(None) => return Err("the switch dropped its network".into()),
                            Err(_) => {
                                return Err(format!(
                                    "waited {} s for the switch to emit: {}",
                                    WAIT_REAL.as_secs(),
                                    self.describe_outstanding()
                                ))
                            }
                        }
                    }
                }
            };
            let Some(call) = call else { break };
            if let Some(message) = self.account(call)? {
                let key = match &message {
                    Message::Forward { payment, .. } => (0, *payment, 0),
                    Message::Notify { payment, bank, .. } => (1, *payment, *bank),
                    Message::Decide { payment, .. } => (2, *payment, 0),
                };
                emitted.push((key.0, key.1, key.2, message));
            }
        }
        emitted.sort_by_key(|(kind, payment, bank, _)| (*kind, *payment, *bank));
        for (_, _, _, message) in emitted {
            self.trace(format!("  emits {}", message.describe()));
            if self.network.len() >= NETWORK_MAX {
                self.report.faults.messages_dropped += 1;
                continue;
            }
            self.network.push_back(message);
        }
        Ok(())
    }

    /// Checks one call of the switch against the model.
    pub(crate) fn account(&mut self, call: SimCall) -> Result<Option<Message>, String> {
        match call {
            SimCall::Forward { payment, answer } => {
                let index = self.index_of(&payment)?;
                let p = &mut self.payments[index];
                if p.forwards_due == 0 {
                    return Err(format!("unexpected forward of p{index} ({:?})", p.state));
                }
                p.forwards_due -= 1;
                Ok(Some(Message::Forward {
                    payment: index,
                    answer: Some(answer),
                }))
            }
            SimCall::Notify {
                participant,
                notification,
            } => {
                let view = match notification {
                    Notification::Payment(view) => view,
                    // Alerts come on a real-time timer: not part of the deterministic trace.
                    Notification::LiquidityAlert(_) => return Ok(None),
                    Notification::Return(notice) => {
                        if self.return_notes_due == 0 {
                            return Err(format!(
                                "an unexpected return notification ({})",
                                notice.return_id
                            ));
                        }
                        self.return_notes_due -= 1;
                        return Ok(None);
                    }
                    Notification::Recall(_) => {
                        return Err("a recall notification nobody asked for".into())
                    }
                };
                let index = self.index_of(&view)?;
                let bank = self
                    .banks
                    .iter()
                    .position(|b| b.bic == participant)
                    .ok_or_else(|| format!("notification to unknown {participant}"))?;
                let state = State::of_view(&view)?;
                let p = &mut self.payments[index];
                if p.notes_due == 0 {
                    return Err(format!(
                        "unexpected notification of p{index} to b{bank}: {state:?}"
                    ));
                }
                if Some(&state) != p.expected_final.as_ref() {
                    return Err(format!(
                        "p{index} notified {state:?} to b{bank}, the model expects {:?}",
                        p.expected_final
                    ));
                }
                if bank != p.debtor && bank != p.creditor || p.notes_to.contains(&bank) {
                    return Err(format!(
                        "p{index} notified twice or to a stranger (b{bank})"
                    ));
                }
                p.notes_due -= 1;
                p.notes_to.push(bank);
                if p.notes_due == 0 {
                    p.notes_to.clear();
                }
                if p.state == State::Pending {
                    self.settle_in_model(index, state.clone());
                }
                Ok(Some(Message::Notify {
                    payment: index,
                    bank,
                    state,
                }))
            }
        }
    }

    pub(crate) fn advance(&mut self, by_ms: u64) -> Outcome {
        self.clock.advance(by_ms * 1_000_000);
        self.report.faults.clock_advances += 1;
        let now = self.clock.now_ns();
        let mut timed_out = Vec::new();
        for i in 0..self.payments.len() {
            let p = &self.payments[i];
            if p.state == State::Pending && p.deadline_ns <= now && p.notes_due == 0 {
                timed_out.push(i);
            }
        }
        for &i in &timed_out {
            let reason = self.payments[i].timeout_reason;
            self.expect_final(i, State::Rejected(reason.into()));
        }
        self.trace(format!("advance {by_ms} ms; {} time out", timed_out.len()));
        self.pump()
    }

    pub(crate) fn deliver(&mut self) -> Outcome {
        if self.network.is_empty() {
            return Ok(());
        }
        let at = if self.rng.chance(25) {
            self.rng.below(self.network.len() as u64) as usize
        } else {
            0
        };
        if at != 0 {
            self.report.faults.messages_reordered += 1;
        }
        let message = self.network.remove(at).expect("index in range");
        if self.rng.chance(7) {
            self.report.faults.messages_dropped += 1;
            self.trace(format!("drop {}", message.describe()));
            return Ok(());
        }
        if self.rng.chance(7) && self.network.len() < NETWORK_MAX {
            self.report.faults.messages_duplicated += 1;
            self.trace(format!("duplicate {}", message.describe()));
            self.network.push_back(message.copy());
        }
        match message {
            Message::Forward { payment, answer } => self.creditor_answers(payment, answer),
            Message::Decide { payment, decision } => self.decide(payment, decision),
            Message::Notify {
                payment,
                bank,
                state,
            } => {
                let p = &mut self.payments[payment];
                let slot = usize::from(bank == p.creditor);
                if let Some(told) = &p.told[slot] {
                    if *told != state {
                        return Err(format!(
                            "b{bank} was told p{payment} {told:?}, now {state:?}"
                        ));
                    }
                }
                p.told[slot] = Some(state.clone());
                self.trace(format!("b{bank} learns p{payment} {state:?}"));
                Ok(())
            }
        }
    }

    pub(crate) fn creditor_answers(
        &mut self,
        index: usize,
        answer: Option<oneshot::Sender<SimAnswer>>,
    ) -> Outcome {
        let decision = if self.rng.chance(88) {
            Decision::Accept
        } else {
            let reason = REJECT_REASONS[self.rng.below(REJECT_REASONS.len() as u64) as usize];
            Decision::Reject(reason.into())
        };
        let Some(answer) = answer else {
            // A copy (or from before a crash): the bank answers by a decision call, sometimes.
            if self.rng.chance(50) {
                self.network.push_back(Message::Decide {
                    payment: index,
                    decision: decision.clone(),
                });
            }
            self.trace(format!(
                "b{} sees p{index} again",
                self.payments[index].creditor
            ));
            return Ok(());
        };
        let roll = self.rng.below(100);
        let (sim_answer, label) = match roll {
            0..=71 => (SimAnswer::Decided(decision.clone()), "answers"),
            72..=85 => (SimAnswer::Later, "answers later"),
            86..=93 => {
                self.report.faults.answers_never += 1;
                drop(answer);
                self.trace(format!("p{index}: creditor never answers"));
                return Ok(());
            }
            _ => (SimAnswer::Unreachable, "unreachable"),
        };
        let pending =
            self.payments[index].state == State::Pending && self.payments[index].notes_due == 0;
        let sent = answer.send(sim_answer.clone()).is_ok();
        if sent != pending {
            return Err(format!(
                "the switch {} waiting for p{index}'s answer, the model has it {:?}",
                if sent { "was" } else { "was not" },
                self.payments[index].state
            ));
        }
        self.trace(format!(
            "p{index}: creditor {label} {decision:?} (switch waiting: {sent})"
        ));
        if !sent {
            return Ok(());
        }
        match sim_answer {
            SimAnswer::Decided(decision) => {
                self.expect_final(index, State::of_decision(&decision));
            }
            SimAnswer::Later => {
                self.report.faults.answers_late += 1;
                self.network.push_back(Message::Decide {
                    payment: index,
                    decision,
                });
            }
            SimAnswer::Unreachable => {
                self.report.faults.creditors_unreachable += 1;
                self.payments[index].timeout_reason = "AB08";
            }
        }
        self.pump()
    }
}
