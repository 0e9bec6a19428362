//! A payment's way in: duplicate detection by instruction, admission checks (participants,
//! currencies, amounts, limits, scheme profile), business rejections recorded with their ISO
//! reason, and the reservation written atomically with the open payment record.

use super::*;

impl Switch {
    /// Submits a payment and waits (up to `sync_wait_ms`) for its final state.
    pub async fn submit(
        self: &Arc<Self>,
        caller: &Caller,
        request: PaymentRequest,
    ) -> Result<(bool, PaymentView), ApiError> {
        let uetr_given = request.uetr.is_some();
        let record = self.admit(caller, request)?;
        let id = record.id();
        self.stats.submitted.fetch_add(1, Ordering::Relaxed);
        // Duplicates: in flight, recently finished, or on disk.
        match self.find_instruction(record.instruction_alias()).await {
            Ok(Some(existing)) => {
                return self.answer_duplicate(existing, &record, uetr_given).await
            }
            Ok(None) => {}
            // Within the duplicate window an archived instruction is refused as any duplicate
            // whose content cannot be compared: the instruction id is taken.
            Err(error) if error.code == "archived" => {
                return Err(ApiError::new(
                    409,
                    "duplicate_instruction",
                    format!(
                        "this instruction id was used by a payment that is archived now ({})",
                        error.message
                    ),
                )
                .with_reason("DUPL"))
            }
            Err(error) => return Err(error),
        }
        // A UETR the switch generated is fresh; one the participant chose may be reused.
        // (An index read of microseconds: done in place, not on the blocking pool.)
        let uetr_owner = match uetr_given {
            true => self.node.resolve_alias_now(uetr_alias(&record.uetr))?,
            false => None,
        };
        if uetr_owner.is_some_and(|owner| owner != id) {
            return Err(ApiError::new(
                409,
                "duplicate_uetr",
                "this UETR belongs to another payment",
            )
            .with_reason("DUPL"));
        }
        // Claim the instruction (a concurrent identical submit waits for this one) within the
        // limits. A rejection below is cached before the claim is released, so a duplicate
        // always finds the payment somewhere: in flight, in the recent cache, or in the index.
        let (entry, receiver) = match self.claim(&record)? {
            Ok(claimed) => claimed,
            Err(existing) => return self.answer_duplicate(existing, &record, uetr_given).await,
        };
        if let Some(reason) = self.business_check(&record) {
            let debtor = record.debtor_agent.clone();
            let answer = self.reject_before_reservation(record, reason, &entry).await;
            self.release(id, &debtor);
            return answer;
        }
        // Reserve: the pending transfer and the open record, atomically.
        let transfer = self.reservation(&record);
        let put = RecordPut {
            key: id,
            value: encode(&Stored::Payment(Box::new(record.clone()))),
            open: true,
            aliases: vec![
                record.instruction_alias(),
                end_to_end_alias(&record.debtor_agent, &record.end_to_end_id),
                uetr_alias(&record.uetr),
            ],
            when_transfer_ok: Some(0),
            voucher: None,
        };
        let reserving = std::time::Instant::now();
        let outcome = match engine_submit(&self.node, vec![transfer], vec![put]).await {
            Ok(outcome) => {
                self.latency.reserve.observe(reserving.elapsed());
                outcome
            }
            Err(error) => {
                self.release(id, &record.debtor_agent);
                return Err(error.into());
            }
        };
        match outcome.results[0] {
            CreateTransferResult::Ok => {}
            CreateTransferResult::ExceedsCredits
                if self
                    .config
                    .liquidity_saving_currencies
                    .contains(&record.currency) =>
            {
                return self.queue_payment(record, entry, receiver).await;
            }
            CreateTransferResult::ExceedsCredits => {
                let reason = match self
                    .terms_of(&record.debtor_agent, &record.currency)
                    .map(|t| t.model)
                {
                    Some(SettlementModel::DeferredNet) => "AM23",
                    _ => "AM04",
                };
                let debtor = record.debtor_agent.clone();
                let answer = self.reject_before_reservation(record, reason, &entry).await;
                self.release(id, &debtor);
                return answer;
            }
            other => {
                // Exists*: the id was reserved before (the record is on disk); anything else is
                // a ledger refusal of a payment that passed validation.
                self.release(id, &record.debtor_agent);
                if let Some(existing) = self.find(id).await? {
                    return self.answer_duplicate(existing, &record, uetr_given).await;
                }
                tracing::error!(payment = %format!("{id:032x}"), result = ?other, "ledger refused a validated reservation");
                return Err(ApiError::new(500, "ledger_refused", format!("{other:?}")));
            }
        }
        let driver = self.clone();
        let driven = entry.clone();
        tokio::spawn(async move { driver.drive(driven).await });
        self.wait_final(entry, receiver).await
    }

    /// Registers a payment as in flight within the limits, or returns the one already there.
    #[allow(clippy::type_complexity)]
    pub(super) fn claim(
        &self,
        record: &PaymentRecord,
    ) -> Result<
        Result<(Arc<InFlight>, watch::Receiver<Option<PaymentRecord>>), PaymentRecord>,
        ApiError,
    > {
        let mut set = self.in_flight.lock().expect("in flight");
        if let Some(key) = set.by_instruction.get(&record.instruction_alias()) {
            return Ok(Err(set.payments[key].record.clone()));
        }
        if set.payments.len() >= self.config.in_flight_total_max {
            return Err(
                ApiError::new(503, "switch_busy", "too many payments in flight").retry_after(1),
            );
        }
        let count = set
            .per_debtor
            .entry(record.debtor_agent.clone())
            .or_default();
        if *count >= self.config.in_flight_per_participant_max {
            return Err(ApiError::new(
                429,
                "too_many_in_flight",
                format!(
                    "{} payments of this participant are in flight (limit)",
                    self.config.in_flight_per_participant_max
                ),
            )
            .retry_after(1));
        }
        *count += 1;
        let (done, receiver) = watch::channel(None);
        let entry = Arc::new(InFlight {
            record: record.clone(),
            done,
            decision: Mutex::new(None),
            debtor_waiting: AtomicBool::new(true),
        });
        set.payments.insert(record.id(), entry.clone());
        set.by_instruction
            .insert(record.instruction_alias(), record.id());
        Ok(Ok((entry, receiver)))
    }

    pub(super) async fn wait_final(
        &self,
        entry: Arc<InFlight>,
        mut receiver: watch::Receiver<Option<PaymentRecord>>,
    ) -> Result<(bool, PaymentView), ApiError> {
        let wait = Duration::from_millis(self.config.sync_wait_ms);
        let finished = matches!(
            tokio::time::timeout(wait, receiver.wait_for(|v| v.is_some())).await,
            Ok(Ok(_))
        );
        let current = receiver.borrow().clone();
        match (finished, current) {
            (true, Some(final_record)) => Ok((true, PaymentView::of(&final_record))),
            _ => {
                entry.debtor_waiting.store(false, Ordering::SeqCst);
                // It may have finished in between: then the notification path has it too.
                let current = receiver.borrow().clone();
                Ok(match current {
                    Some(final_record) => (true, PaymentView::of(&final_record)),
                    None => (false, PaymentView::of(&entry.record)),
                })
            }
        }
    }

    pub(super) async fn answer_duplicate(
        &self,
        existing: PaymentRecord,
        submitted: &PaymentRecord,
        uetr_given: bool,
    ) -> Result<(bool, PaymentView), ApiError> {
        if !existing.same_instruction(submitted, uetr_given) {
            return Err(ApiError::new(
                409,
                "duplicate_instruction",
                "this instruction id was used for a different payment",
            )
            .with_reason("DUPL"));
        }
        let entry = self
            .in_flight
            .lock()
            .expect("in flight")
            .payments
            .get(&existing.id())
            .cloned();
        match entry {
            Some(entry) => {
                let receiver = entry.done.subscribe();
                self.wait_final(entry, receiver).await
            }
            None => Ok((
                existing.state != PaymentState::Reserved,
                PaymentView::of(&existing),
            )),
        }
    }

    /// Syntax and authorization: a 4xx here records nothing.
    pub(super) fn admit(
        &self,
        caller: &Caller,
        r: PaymentRequest,
    ) -> Result<PaymentRecord, ApiError> {
        if *caller != Caller::Participant(r.debtor_agent.clone()) {
            return Err(ApiError::new(
                403,
                "forbidden",
                "a participant can only submit payments as debtor agent itself",
            ));
        }
        for (field, value) in [
            ("instruction_id", &r.instruction_id),
            ("end_to_end_id", &r.end_to_end_id),
        ] {
            if !is_max35(value) {
                return Err(ApiError::bad_request(
                    format!("{field} must be 1 to 35 printable characters"),
                    "FF01",
                ));
            }
        }
        if !is_bic(&r.creditor_agent) {
            return Err(ApiError::bad_request(
                "creditor_agent must be a BIC",
                "RC01",
            ));
        }
        for (field, party) in [("debtor", &r.debtor), ("creditor", &r.creditor)] {
            if party.name.is_empty()
                || party.name.len() > 140
                || party.account.is_empty()
                || party.account.len() > 34
            {
                return Err(ApiError::bad_request(
                    format!("{field}: name 1-140 and account 1-34 characters"),
                    if field == "debtor" { "RR01" } else { "AC03" },
                ));
            }
        }
        if let Err((reason, message)) = self.config.scheme_profile.check_payment(&r) {
            return Err(ApiError::bad_request(message, reason));
        }
        if r.message_id.as_ref().is_some_and(|m| !is_max35(m)) {
            return Err(ApiError::bad_request(
                "message_id must be 1 to 35 printable characters",
                "FF01",
            ));
        }
        if r.remittance_information
            .as_ref()
            .is_some_and(|t| t.len() > 140)
        {
            return Err(ApiError::bad_request(
                "remittance_information: at most 140 characters",
                "FF01",
            ));
        }
        let uetr = match r.uetr {
            Some(u) if is_uetr(&u) => u,
            Some(_) => {
                return Err(ApiError::bad_request(
                    "uetr must be a lowercase UUID v4",
                    "FF01",
                ))
            }
            None => new_uetr(),
        };
        let c = currency(&r.currency).ok_or_else(|| {
            ApiError::bad_request(
                format!("currency {:?} is not supported", r.currency),
                "AM03",
            )
        })?;
        let amount = positive_amount_in(&r.amount, c)?;
        let now = self.clock.now_ns();
        Ok(PaymentRecord {
            key: payment_key(now, &r.debtor_agent, &r.instruction_id),
            instruction_id: r.instruction_id,
            end_to_end_id: r.end_to_end_id,
            uetr,
            debtor_agent: r.debtor_agent,
            creditor_agent: r.creditor_agent,
            currency: c.code.to_string(),
            amount,
            debtor: r.debtor,
            creditor: r.creditor,
            remittance_information: r.remittance_information,
            message_id: r.message_id,
            transaction_id: r.transaction_id,
            state: PaymentState::Reserved,
            reason: None,
            accepted_at_ns: now,
            deadline_ns: now + self.config.settle_deadline_ms * 1_000_000,
            finished_at_ns: None,
            returned: 0,
            queued: false,
        })
    }

    pub(super) fn terms_of(&self, bic: &str, code: &str) -> Option<CurrencyTerms> {
        self.participants().get(bic)?.currencies.get(code).cloned()
    }

    /// Business rules: a reason code here is recorded as a rejection.
    pub(super) fn business_check(&self, record: &PaymentRecord) -> Option<&'static str> {
        let participants = self.participants();
        let debtor = participants.get(&record.debtor_agent)?;
        let Some(creditor) = participants.get(&record.creditor_agent) else {
            return Some("CNOR");
        };
        if record.creditor_agent == record.debtor_agent {
            return Some("AG03");
        }
        if debtor.status != ParticipantStatus::Active
            || creditor.status != ParticipantStatus::Active
        {
            return Some("AG01");
        }
        let Some(terms) = debtor.currencies.get(&record.currency) else {
            return Some("AM03");
        };
        if !creditor.currencies.contains_key(&record.currency) {
            return Some("AM03");
        }
        if terms.per_payment_max > 0 && record.amount > terms.per_payment_max {
            return Some("AM02");
        }
        None
    }

    pub(super) fn reservation(&self, record: &PaymentRecord) -> Transfer {
        let c = currency(&record.currency).expect("validated");
        Transfer {
            id: record.id(),
            debit_account_id: position_account(&record.debtor_agent, &record.currency),
            credit_account_id: position_account(&record.creditor_agent, &record.currency),
            amount: record.amount,
            user_data_128: u128::from_str_radix(&record.uetr.replace('-', ""), 16).unwrap_or(0),
            timeout: self.config.hard_timeout_seconds(),
            ledger: c.numeric,
            code: TRANSFER_CODE_PAYMENT,
            flags: TransferFlags::PENDING,
            ..Transfer::default()
        }
    }

    pub(super) async fn reject_before_reservation(
        &self,
        mut record: PaymentRecord,
        reason: &'static str,
        entry: &InFlight,
    ) -> Result<(bool, PaymentView), ApiError> {
        record.state = PaymentState::Rejected;
        record.reason = Some(reason.to_string());
        record.finished_at_ns = Some(self.clock.now_ns());
        let put = RecordPut {
            key: record.id(),
            value: encode(&Stored::Payment(Box::new(record.clone()))),
            open: false,
            aliases: vec![
                record.instruction_alias(),
                end_to_end_alias(&record.debtor_agent, &record.end_to_end_id),
                uetr_alias(&record.uetr),
            ],
            when_transfer_ok: None,
            voucher: Some(payment_voucher(&record)),
        };
        engine_submit(&self.node, vec![], vec![put]).await?;
        self.finished(&record);
        // Concurrent duplicates of this instruction wait on it.
        let _ = entry.done.send(Some(record.clone()));
        tracing::info!(payment = %format!("{:032x}", record.id()), reason, "payment rejected");
        Ok((true, PaymentView::of(&record)))
    }
}
