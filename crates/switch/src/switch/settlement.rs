//! A reserved payment's way out: forwarding to the creditor agent (through the transport),
//! decisions, the deadline, finalization (post or void with the final record, one journal
//! record), notifications, and resuming open payments after a restart.

use super::*;

impl Switch {
    pub(super) fn release(&self, id: u128, debtor: &str) {
        let mut set = self.in_flight.lock().expect("in flight");
        if let Some(entry) = set.payments.remove(&id) {
            set.by_instruction.remove(&entry.record.instruction_alias());
            if let Some(count) = set.per_debtor.get_mut(debtor) {
                *count -= 1;
            }
        }
    }

    /// Counts and caches a final record.
    pub(super) fn finished(&self, record: &PaymentRecord) {
        match record.state {
            PaymentState::Settled => {
                self.stats.settled.fetch_add(1, Ordering::Relaxed);
            }
            PaymentState::Rejected => {
                self.stats.rejected.fetch_add(1, Ordering::Relaxed);
                *self
                    .stats
                    .rejected_by_reason
                    .lock()
                    .expect("stats")
                    .entry(record.reason.clone().unwrap_or_default())
                    .or_default() += 1;
            }
            PaymentState::Reserved => unreachable!("only final records are finished"),
        }
        // The record is durable (acknowledged), so the journal has reached at least this sequence;
        // once the index has too, the index answers for it and the cache may let it go.
        let acknowledged = self.node.committed_seq();
        let indexed = self.node.indexed_seq();
        let mut recent = self.recent.lock().expect("recent");
        recent.map.insert(record.id(), record.clone());
        recent
            .by_instruction
            .insert(record.instruction_alias(), record.id());
        recent.order.push_back((acknowledged, record.id()));
        // Over the limit, evict only what the index already holds (duplicate checks read the
        // index without waiting for it); if the index lags, the cache grows until it catches up
        // (the engine's unindexed-transfers limit bounds that lag).
        while recent.order.len() > self.config.recent_payments_max {
            let &(seq, id) = recent.order.front().expect("non-empty");
            if seq > indexed {
                break;
            }
            recent.order.pop_front();
            if let Some(old) = recent.map.remove(&id) {
                recent.by_instruction.remove(&old.instruction_alias());
            }
        }
    }

    /// A creditor agent's decision, given after it answered 202.
    pub fn decide(&self, caller: &Caller, id: u128, decision: Decision) -> Result<(), ApiError> {
        let entry = self
            .in_flight
            .lock()
            .expect("in flight")
            .payments
            .get(&id)
            .cloned();
        let Some(entry) = entry else {
            return Err(ApiError::new(
                409,
                "not_in_flight",
                "the payment is not waiting for a decision (unknown, or already final)",
            ));
        };
        if *caller != Caller::Participant(entry.record.creditor_agent.clone()) {
            return Err(ApiError::not_found("payment"));
        }
        if let Decision::Reject(reason) = &decision {
            if !is_status_reason_code(reason) {
                return Err(ApiError::bad_request(
                    format!("{reason:?} is not an ISO 20022 status reason code"),
                    "FF01",
                ));
            }
        }
        let sender = entry.decision.lock().expect("decision").take();
        match sender {
            Some(sender) => {
                let _ = sender.send(decision);
                Ok(())
            }
            None => Err(ApiError::new(
                409,
                "already_decided",
                "a decision for this payment was already taken",
            )),
        }
    }

    /// Drives one reserved payment to its final state.
    pub(super) async fn drive(self: Arc<Self>, entry: Arc<InFlight>) {
        let decision = self.ask_creditor(&entry).await;
        self.finalize(entry.clone(), decision).await;
    }

    /// Forwards the payment to its creditor agent and waits for its decision (in the answer, or
    /// later by the decision call) until the deadline.
    pub(super) async fn ask_creditor(&self, entry: &Arc<InFlight>) -> Decision {
        let record = &entry.record;
        let (decision_sender, decision_receiver) = oneshot::channel();
        *entry.decision.lock().expect("decision") = Some(decision_sender);
        let remaining =
            Duration::from_nanos(record.deadline_ns.saturating_sub(self.clock.now_ns()));
        let deadline = tokio::time::Instant::now() + remaining;
        let creditor = self.participants().get(&record.creditor_agent).cloned();
        let forwarding = std::time::Instant::now();
        let decision = match creditor {
            None => Decision::Reject("CNOR".into()),
            Some(creditor) => {
                let view = PaymentView::of(record);
                let forward = self
                    .outbound
                    .forward(&creditor, &view, deadline, record.deadline_ns);
                tokio::pin!(forward);
                let mut decision_receiver = decision_receiver;
                tokio::select! {
                    biased;
                    result = &mut forward => match result {
                        Ok(Some(decision)) => decision,
                        Ok(None) => {
                            // 202: the creditor agent decides later, until the deadline.
                            match self
                                .clock
                                .timeout_at_ns(record.deadline_ns, &mut decision_receiver)
                                .await
                            {
                                Some(Ok(decision)) => decision,
                                _ => Decision::Reject("AB05".into()),
                            }
                        }
                        Err(ForwardError::Unreachable) => Decision::Reject("AB08".into()),
                        Err(ForwardError::NoAnswer) => Decision::Reject("AB05".into()),
                    },
                    Ok(decision) = &mut decision_receiver => decision,
                }
            }
        };
        self.latency.creditor.observe(forwarding.elapsed());
        decision
    }

    pub(super) async fn finalize(&self, entry: Arc<InFlight>, decision: Decision) {
        let mut record = entry.record.clone();
        let id = record.id();
        let c = currency(&record.currency).expect("validated");
        let (transfer, state, reason) = match decision {
            Decision::Accept => (
                Transfer {
                    id: post_id(id),
                    pending_id: id,
                    amount: record.amount,
                    ledger: c.numeric,
                    code: TRANSFER_CODE_PAYMENT,
                    flags: TransferFlags::POST_PENDING,
                    ..Transfer::default()
                },
                PaymentState::Settled,
                None,
            ),
            Decision::Reject(reason) => (
                Transfer {
                    id: void_id(id),
                    pending_id: id,
                    ledger: c.numeric,
                    code: TRANSFER_CODE_PAYMENT,
                    flags: TransferFlags::VOID_PENDING,
                    ..Transfer::default()
                },
                PaymentState::Rejected,
                Some(reason),
            ),
        };
        record.state = state;
        record.reason = reason;
        record.finished_at_ns = Some(self.clock.now_ns());
        let put = |record: &PaymentRecord, condition| RecordPut {
            key: id,
            value: encode(&Stored::Payment(Box::new(record.clone()))),
            open: false,
            aliases: vec![],
            when_transfer_ok: condition,
            voucher: Some(payment_voucher(record)),
        };
        let settling = std::time::Instant::now();
        let mut attempts = 0;
        let outcome = loop {
            // A settled payment counts in the open window in its commit callback (journal order).
            let count = (record.state == PaymentState::Settled).then(|| {
                let counter = self.clearing.counter();
                let (payer, payee, code, amount) = (
                    record.debtor_agent.clone(),
                    record.creditor_agent.clone(),
                    record.currency.clone(),
                    record.amount,
                );
                move |outcome: &SubmitOutcome| {
                    if outcome.written[0] {
                        counter(&payer, &payee, &code, amount);
                    }
                }
            });
            let submitted = submit_then(
                &self.node,
                vec![transfer],
                vec![put(&record, Some(0))],
                move |outcome| {
                    if let Some(count) = count {
                        count(outcome)
                    }
                },
            )
            .await;
            match submitted {
                Ok(outcome) => break Some(outcome),
                Err(EngineError::Overloaded { .. }) if attempts < FINALIZE_ATTEMPTS_MAX => {
                    attempts += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(error) => {
                    tracing::error!(payment = %format!("{id:032x}"), %error, "cannot finalize; the payment stays open until the next start");
                    break None;
                }
            }
        };
        let Some(outcome) = outcome else { return };
        match outcome.results[0] {
            CreateTransferResult::Ok | CreateTransferResult::Exists => {}
            CreateTransferResult::PendingTransferExpired => {
                // The ledger released the liquidity at the hard timeout: rejected on timeout.
                record.state = PaymentState::Rejected;
                record.reason = Some("AB05".into());
                if let Err(error) =
                    engine_submit(&self.node, vec![], vec![put(&record, None)]).await
                {
                    tracing::error!(payment = %format!("{id:032x}"), %error, "cannot record the expiry; retried at the next start");
                    return;
                }
            }
            other => {
                // Already posted or voided by an earlier run: the record on disk is final.
                match self.find_on_disk(id).await {
                    Some(existing) if existing.state != PaymentState::Reserved => record = existing,
                    _ => {
                        tracing::error!(payment = %format!("{id:032x}"), result = ?other, "reservation already final but its record is not");
                        return;
                    }
                }
            }
        }
        self.latency.settle.observe(settling.elapsed());
        self.complete(&entry, record);
    }

    /// A payment's final record is durable: count it, answer the waiting debtor agent, notify
    /// both agents, release its in-flight slot.
    pub(super) fn complete(&self, entry: &Arc<InFlight>, record: PaymentRecord) {
        self.latency.end_to_end.observe(Duration::from_nanos(
            self.clock.now_ns().saturating_sub(record.accepted_at_ns),
        ));
        self.finished(&record);
        // Notifications carry the final state twice: JSON, and as the pacs.002 an ISO 20022
        // participant expects.
        let mut view = PaymentView::of(&record);
        let original_message = view
            .message_id
            .clone()
            .unwrap_or_else(|| view.instruction_id.clone());
        view.pacs_002 = Some(crate::iso::pacs002_of(&view, &original_message).to_xml());
        self.notify(
            &record.creditor_agent,
            Notification::Payment(Box::new(view.clone())),
        );
        let _ = entry.done.send(Some(record.clone()));
        if !entry.debtor_waiting.load(Ordering::SeqCst) {
            self.notify(&record.debtor_agent, Notification::Payment(Box::new(view)));
        }
        self.release(record.id(), &record.debtor_agent);
        if (record.state == PaymentState::Settled || record.queued)
            && !self.config.liquidity_saving_currencies.is_empty()
        {
            // Liquidity moved (or a queued payment left the queue): try the queue again.
            self.lsm.wake.notify_one();
        }
    }

    pub(super) async fn find_on_disk(&self, id: u128) -> Option<PaymentRecord> {
        let node = self.node.clone();
        let value = blocking(move || node.get_records(&[id]))
            .await
            .ok()?
            .pop()
            .flatten()?;
        crate::stored::decode_payment(id, &value).ok().flatten()
    }

    /// Picks up an open payment after a restart; `reserved`: its reservation is still pending.
    pub(super) fn resume(self: &Arc<Self>, record: PaymentRecord, reserved: bool) {
        let id = record.id();
        let (done, _) = watch::channel(None);
        let entry = Arc::new(InFlight {
            record: record.clone(),
            done,
            decision: Mutex::new(None),
            debtor_waiting: AtomicBool::new(false),
        });
        {
            let mut set = self.in_flight.lock().expect("in flight");
            set.payments.insert(id, entry.clone());
            set.by_instruction.insert(record.instruction_alias(), id);
            *set.per_debtor
                .entry(record.debtor_agent.clone())
                .or_default() += 1;
        }
        tracing::info!(payment = %format!("{id:032x}"), reserved, "resuming an open payment");
        let switch = self.clone();
        if record.queued {
            // Queued for liquidity when the switch stopped: nothing was reserved; rejected on
            // timeout rather than settled without the creditor agent's fresh decision.
            tokio::spawn(async move { switch.reject_unreserved(entry, "AB05").await });
        } else if reserved && record.deadline_ns > self.clock.now_ns() {
            tokio::spawn(async move { switch.drive(entry).await });
        } else {
            // Past the deadline (or already expired by the ledger): rejected on timeout.
            tokio::spawn(async move {
                switch
                    .finalize(entry, Decision::Reject("AB05".into()))
                    .await
            });
        }
    }
}
