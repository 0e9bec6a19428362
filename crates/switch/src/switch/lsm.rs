//! Liquidity-saving mode: a payment that does not fit its debtor agent's liquidity is queued
//! instead of rejected (in the currencies configured for it). Its creditor agent is asked first,
//! as usual; once it accepts, the payment waits for liquidity until its deadline. A gridlock
//! resolution pass, run whenever liquidity changes and every `gridlock_interval_ms`, settles the
//! largest set of queued payments that fits every participant's liquidity at once (multilateral
//! offsetting), as one linked ledger batch: each payment's credit leg first (from the currency's
//! offsetting suspense account), then each debit leg, so a cycle that no order of single
//! payments could settle settles whole; the suspense account nets to zero in every batch.
//!
//! The set: start from the queue (oldest first, at most [`PASS_PAYMENTS_MAX`]); while some
//! participant's available liquidity plus its incoming minus its outgoing payments in the set is
//! negative, drop that participant's most recently queued outgoing payment. What remains fits.

use super::*;

/// Payments considered in one pass (two transfers each, and a journal record holds at most
/// 1 MiB: about 1.3 KB a payment).
pub const PASS_PAYMENTS_MAX: usize = 500;

#[derive(Default)]
pub(super) struct Queue {
    /// Accepted by their creditor agents, waiting for liquidity; oldest first.
    waiting: Mutex<Vec<Arc<InFlight>>>,
    /// Payments in the mode (asking their creditor agent, or waiting), for the limit.
    queued: std::sync::atomic::AtomicUsize,
    pub(super) wake: tokio::sync::Notify,
}

impl Queue {
    pub(super) fn len(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }
}

pub fn suspense_account(currency: &str) -> u128 {
    id128(&[b"lsm-suspense", currency.as_bytes()])
}

impl Switch {
    /// Queues a payment that did not fit (instead of rejecting it), within the limit.
    pub(super) async fn queue_payment(
        self: &Arc<Self>,
        mut record: PaymentRecord,
        entry: Arc<InFlight>,
        receiver: watch::Receiver<Option<PaymentRecord>>,
    ) -> Result<(bool, PaymentView), ApiError> {
        let id = record.id();
        if self.lsm.queued.fetch_add(1, Ordering::SeqCst) >= self.config.queued_payments_max {
            self.lsm.queued.fetch_sub(1, Ordering::SeqCst);
            let debtor = record.debtor_agent.clone();
            let answer = self.reject_before_reservation(record, "AM04", &entry).await;
            self.release(id, &debtor);
            return answer;
        }
        record.queued = true;
        let put = RecordPut {
            key: id,
            value: encode(&Stored::Payment(Box::new(record.clone()))),
            open: true,
            aliases: vec![
                record.instruction_alias(),
                end_to_end_alias(&record.debtor_agent, &record.end_to_end_id),
                uetr_alias(&record.uetr),
            ],
            ..RecordPut::default()
        };
        if let Err(error) = engine_submit(&self.node, vec![], vec![put]).await {
            self.lsm.queued.fetch_sub(1, Ordering::SeqCst);
            self.release(id, &record.debtor_agent);
            return Err(error.into());
        }
        tracing::info!(payment = %format!("{id:032x}"), "payment queued for liquidity");
        let driver = self.clone();
        let driven = entry.clone();
        tokio::spawn(async move { driver.drive_queued(driven).await });
        self.wait_final(entry, receiver).await
    }

    async fn drive_queued(self: Arc<Self>, entry: Arc<InFlight>) {
        match self.ask_creditor(&entry).await {
            Decision::Reject(reason) => self.reject_unreserved(entry, &reason).await,
            Decision::Accept => {
                self.lsm.waiting.lock().expect("queue").push(entry.clone());
                self.lsm.wake.notify_one();
                self.clock.sleep_until_ns(entry.record.deadline_ns).await;
                // Still waiting at the deadline: rejected. (If a resolution pass took it, that
                // pass finalizes it.)
                let still_waiting = {
                    let mut waiting = self.lsm.waiting.lock().expect("queue");
                    match waiting.iter().position(|e| Arc::ptr_eq(e, &entry)) {
                        Some(at) => {
                            waiting.remove(at);
                            true
                        }
                        None => false,
                    }
                };
                if still_waiting {
                    self.reject_unreserved(entry, "AB05").await;
                }
            }
        }
    }

    /// Rejects a queued payment (nothing was reserved, so nothing moves on the ledger).
    pub(super) async fn reject_unreserved(&self, entry: Arc<InFlight>, reason: &str) {
        let mut record = entry.record.clone();
        record.queued = true;
        record.state = PaymentState::Rejected;
        record.reason = Some(reason.to_string());
        record.finished_at_ns = Some(self.clock.now_ns());
        let put = RecordPut {
            key: record.id(),
            value: encode(&Stored::Payment(Box::new(record.clone()))),
            voucher: Some(payment_voucher(&record)),
            ..RecordPut::default()
        };
        if let Err(error) = engine_submit(&self.node, vec![], vec![put]).await {
            tracing::error!(payment = %format!("{:032x}", record.id()), %error, "cannot record the rejection of a queued payment; rejected at the next start");
            return;
        }
        self.lsm.queued.fetch_sub(1, Ordering::SeqCst);
        self.complete(&entry, record);
    }

    /// The gridlock resolution loop (one per switch).
    pub(super) async fn resolve_gridlocks(self: Arc<Self>) {
        let mut accounts = Vec::new();
        for code in &self.config.liquidity_saving_currencies {
            match currency(code) {
                Some(c) => accounts.push(Account {
                    id: suspense_account(c.code),
                    ledger: c.numeric,
                    code: ACCOUNT_CODE_LSM_SUSPENSE,
                    ..Account::default()
                }),
                None => {
                    tracing::warn!(currency = %code, "liquidity-saving mode for an unknown currency")
                }
            }
        }
        let node = self.node.clone();
        if let Err(error) = blocking(move || node.create_accounts(accounts)).await {
            tracing::warn!(%error, "cannot create the offsetting accounts; liquidity-saving mode is off");
            return;
        }
        let interval = Duration::from_millis(self.config.gridlock_interval_ms.max(1));
        loop {
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = self.lsm.wake.notified() => {}
            }
            match self.resolve_once().await {
                Ok(0) => {}
                Ok(settled) => {
                    tracing::info!(settled, "gridlock resolution settled queued payments")
                }
                Err(error) => tracing::warn!(%error, "gridlock resolution pass failed; retried"),
            }
        }
    }

    /// One pass: the largest set that fits, settled as one linked batch. Returns how many settled.
    async fn resolve_once(&self) -> Result<usize, ApiError> {
        let snapshot: Vec<Arc<InFlight>> = {
            let waiting = self.lsm.waiting.lock().expect("queue");
            waiting.iter().take(PASS_PAYMENTS_MAX).cloned().collect()
        };
        if snapshot.is_empty() {
            return Ok(0);
        }
        let mut keys: Vec<(String, String)> = snapshot
            .iter()
            .flat_map(|e| {
                [
                    (e.record.debtor_agent.clone(), e.record.currency.clone()),
                    (e.record.creditor_agent.clone(), e.record.currency.clone()),
                ]
            })
            .collect();
        keys.sort();
        keys.dedup();
        let ids: Vec<u128> = keys.iter().map(|(b, c)| position_account(b, c)).collect();
        let accounts = {
            let node = self.node.clone();
            blocking(move || node.lookup_accounts(ids)).await?
        };
        let by_id: FxHashMap<u128, &Account> = accounts.iter().map(|a| (a.id, a)).collect();
        let mut liquidity: BTreeMap<(String, String), i128> = BTreeMap::new();
        for key in &keys {
            let available = by_id
                .get(&position_account(&key.0, &key.1))
                .map_or(0, |a| available(a));
            liquidity.insert(key.clone(), i128::try_from(available).unwrap_or(i128::MAX));
        }
        let mut active = vec![true; snapshot.len()];
        loop {
            let mut net = liquidity.clone();
            for (e, _) in snapshot.iter().zip(&active).filter(|(_, a)| **a) {
                let amount = i128::try_from(e.record.amount).unwrap_or(i128::MAX);
                let debtor = (e.record.debtor_agent.clone(), e.record.currency.clone());
                let creditor = (e.record.creditor_agent.clone(), e.record.currency.clone());
                *net.get_mut(&debtor).expect("key") -= amount;
                *net.get_mut(&creditor).expect("key") += amount;
            }
            let short: Vec<&(String, String)> = net
                .iter()
                .filter(|(_, v)| **v < 0)
                .map(|(k, _)| k)
                .collect();
            if short.is_empty() {
                break;
            }
            for key in short {
                if let Some(last) = (0..snapshot.len()).rev().find(|&i| {
                    active[i]
                        && snapshot[i].record.debtor_agent == key.0
                        && snapshot[i].record.currency == key.1
                }) {
                    active[last] = false;
                }
            }
        }
        let selected: Vec<Arc<InFlight>> = snapshot
            .into_iter()
            .zip(active)
            .filter(|(_, a)| *a)
            .map(|(e, _)| e)
            .collect();
        if selected.is_empty() {
            return Ok(0);
        }
        {
            // Take them out of the queue, unless a deadline took one meanwhile (next pass).
            let mut waiting = self.lsm.waiting.lock().expect("queue");
            if !selected
                .iter()
                .all(|e| waiting.iter().any(|w| Arc::ptr_eq(w, e)))
            {
                return Ok(0);
            }
            waiting.retain(|w| !selected.iter().any(|e| Arc::ptr_eq(w, e)));
        }
        let mut transfers = Vec::with_capacity(selected.len() * 2);
        let mut records = Vec::with_capacity(selected.len());
        let mut finals = Vec::with_capacity(selected.len());
        let now = self.clock.now_ns();
        for debit_legs in [false, true] {
            for e in &selected {
                let r = &e.record;
                let c = currency(&r.currency).expect("validated");
                let (id, debit, credit) = if debit_legs {
                    (
                        post_id(r.id()),
                        position_account(&r.debtor_agent, &r.currency),
                        suspense_account(&r.currency),
                    )
                } else {
                    (
                        offset_credit_id(r.id()),
                        suspense_account(&r.currency),
                        position_account(&r.creditor_agent, &r.currency),
                    )
                };
                transfers.push(Transfer {
                    id,
                    debit_account_id: debit,
                    credit_account_id: credit,
                    amount: r.amount,
                    ledger: c.numeric,
                    code: TRANSFER_CODE_PAYMENT,
                    flags: TransferFlags::LINKED,
                    ..Transfer::default()
                });
            }
        }
        if let Some(last) = transfers.last_mut() {
            last.flags = last.flags.without(TransferFlags::LINKED);
        }
        let last = transfers.len() as u32 - 1;
        for e in &selected {
            let mut record = e.record.clone();
            record.queued = true;
            record.state = PaymentState::Settled;
            record.finished_at_ns = Some(now);
            records.push(RecordPut {
                key: record.id(),
                value: encode(&Stored::Payment(Box::new(record.clone()))),
                when_transfer_ok: Some(last),
                voucher: Some(payment_voucher(&record)),
                ..RecordPut::default()
            });
            finals.push(record);
        }
        let counter = self.clearing.counter();
        let moves: Vec<(String, String, String, u128)> = finals
            .iter()
            .map(|r| {
                (
                    r.debtor_agent.clone(),
                    r.creditor_agent.clone(),
                    r.currency.clone(),
                    r.amount,
                )
            })
            .collect();
        let outcome = submit_then(&self.node, transfers, records, move |outcome| {
            if outcome.written.first() == Some(&true) {
                for (payer, payee, code, amount) in &moves {
                    counter(payer, payee, code, *amount);
                }
            }
        })
        .await;
        let settled = matches!(&outcome, Ok(o) if o.written.iter().all(|w| *w));
        if !settled {
            // Liquidity changed between the lookup and the batch (or the engine refused): all
            // or nothing, so nothing moved; back in the queue, oldest first.
            let mut waiting = self.lsm.waiting.lock().expect("queue");
            waiting.extend(selected);
            waiting.sort_by_key(|e| e.record.accepted_at_ns);
            return match outcome {
                Err(error) => Err(error.into()),
                Ok(o) => {
                    tracing::debug!(results = ?o.results.iter().find(|r| **r != CreateTransferResult::Ok), "offsetting batch refused");
                    Ok(0)
                }
            };
        }
        let count = selected.len();
        for (entry, record) in selected.iter().zip(finals) {
            self.lsm.queued.fetch_sub(1, Ordering::SeqCst);
            self.complete(entry, record);
        }
        Ok(count)
    }
}
