//! Returns (pacs.004 or JSON): money of a settled payment back from its creditor agent to its
//! debtor agent, never more than the payment, each return once by its id, in clearing.

use super::*;

impl Switch {
    /// Returns (part of) a settled payment: its creditor agent sends the money back to its debtor
    /// agent, atomically with the return record and the payment's returned amount. Idempotent by
    /// (returning agent, return id).
    pub async fn return_payment(
        &self,
        caller: &Caller,
        payment_key: u128,
        request: ReturnRequest,
    ) -> Result<ReturnView, ApiError> {
        let Caller::Participant(me) = caller else {
            return Err(ApiError::new(
                403,
                "forbidden",
                "returns are sent by the payment's creditor agent",
            ));
        };
        if !is_max35(&request.return_id) {
            return Err(ApiError::bad_request(
                "return_id must be 1 to 35 printable characters",
                "FF01",
            ));
        }
        if !is_return_reason_code(&request.reason) {
            return Err(ApiError::bad_request(
                format!(
                    "{:?} is not an ISO 20022 return reason code",
                    request.reason
                ),
                "FF01",
            ));
        }
        let _one_at_a_time = self.returns.lock().await;
        let alias = return_alias(me, &request.return_id);
        let existing = {
            let node = self.node.clone();
            blocking(move || {
                Ok(match node.resolve_alias(alias)? {
                    Some(key) => node.get_records(&[key])?.pop().flatten().map(|v| (key, v)),
                    None => None,
                })
            })
            .await?
        };
        if let Some((key, value)) = existing {
            return match decode(key, &value) {
                Ok(Stored::Return(r)) if r.original_key == payment_key => Ok(ReturnView::of(&r)),
                _ => Err(ApiError::new(
                    409,
                    "duplicate_return_id",
                    "this return_id was used for another return",
                )
                .with_reason("DUPL")),
            };
        }
        let mut original = self
            .find(payment_key)
            .await?
            .ok_or_else(|| ApiError::not_found("payment"))?;
        if original.creditor_agent != *me {
            return Err(ApiError::not_found("payment"));
        }
        if original.state != PaymentState::Settled {
            return Err(ApiError::new(
                409,
                "not_settled",
                "only a settled payment can be returned",
            ));
        }
        if let Some(code) = &request.currency {
            if *code != original.currency {
                return Err(ApiError::bad_request(
                    format!(
                        "the return is in {code:?} but the payment was in {}",
                        original.currency
                    ),
                    "AM03",
                ));
            }
        }
        let c = currency(&original.currency).expect("stored currencies are known");
        let open = original.amount - original.returned;
        let amount = match &request.amount {
            Some(text) => amount_in(text, c)?,
            None => open,
        };
        if amount == 0 || amount > open {
            return Err(ApiError::new(
                409,
                "return_exceeds_payment",
                format!(
                    "{} of the payment is still unreturned",
                    money::format_amount(open, c.exponent)
                ),
            )
            .with_reason("AM09"));
        }
        let now = self.clock.now_ns();
        let record = ReturnRecord {
            key: crate::model::payment_key(now, me, &format!("return {}", request.return_id)),
            return_id: request.return_id.clone(),
            original_key: payment_key,
            original_instruction_id: original.instruction_id.clone(),
            original_end_to_end_id: original.end_to_end_id.clone(),
            original_uetr: original.uetr.clone(),
            returning_agent: me.clone(),
            receiving_agent: original.debtor_agent.clone(),
            currency: original.currency.clone(),
            amount,
            reason: request.reason.clone(),
            settled_at_ns: now,
        };
        original.returned += amount;
        let transfer = Transfer {
            id: record.key,
            debit_account_id: position_account(me, &original.currency),
            credit_account_id: position_account(&original.debtor_agent, &original.currency),
            amount,
            ledger: c.numeric,
            code: TRANSFER_CODE_RETURN,
            ..Transfer::default()
        };
        let puts = vec![
            RecordPut {
                key: record.key,
                value: encode(&Stored::Return(Box::new(record.clone()))),
                open: false,
                aliases: vec![alias],
                when_transfer_ok: Some(0),
                voucher: Some(
                    VoucherEvent::PaymentReturned {
                        return_key: format!("{:032x}", record.key),
                        original_payment: format!("{payment_key:032x}"),
                        original_uetr: record.original_uetr.clone(),
                        returning_agent: record.returning_agent.clone(),
                        receiving_agent: record.receiving_agent.clone(),
                        currency: record.currency.clone(),
                        amount: record.amount,
                        reason: record.reason.clone(),
                        at_ns: record.settled_at_ns,
                    }
                    .to_bytes(),
                ),
            },
            RecordPut {
                key: payment_key,
                value: encode(&Stored::Payment(Box::new(original.clone()))),
                open: false,
                aliases: vec![],
                when_transfer_ok: Some(0),
                voucher: None,
            },
        ];
        let counter = self.clearing.counter();
        let (payer, payee, code) = (
            record.returning_agent.clone(),
            record.receiving_agent.clone(),
            record.currency.clone(),
        );
        let outcome = submit_then(&self.node, vec![transfer], puts, move |outcome| {
            if outcome.written[0] {
                counter(&payer, &payee, &code, amount);
            }
        })
        .await?;
        match outcome.results[0] {
            CreateTransferResult::Ok => {}
            CreateTransferResult::ExceedsCredits => {
                return Err(ApiError::new(
                    409,
                    "insufficient_liquidity",
                    "the returning agent's position cannot cover the return; nothing changed",
                )
                .with_reason("AM04"))
            }
            other => return Err(ApiError::new(500, "ledger_refused", format!("{other:?}"))),
        }
        // The recent cache must show the new returned amount.
        {
            let mut recent = self.recent.lock().expect("recent");
            if let Some(cached) = recent.map.get_mut(&payment_key) {
                *cached = original.clone();
            }
        }
        let view = ReturnView::of(&record);
        tracing::info!(payment = %format!("{payment_key:032x}"), reason = %record.reason, "payment returned");
        // Both agents hear of it in JSON and as a pacs.004 (for a recall: the pacs.004 step).
        let mut notice = view.clone();
        notice.pacs_004 = Some(view.pacs004().to_xml());
        self.notify(
            &record.receiving_agent,
            Notification::Return(Box::new(notice.clone())),
        );
        self.notify(
            &record.returning_agent,
            Notification::Return(Box::new(notice)),
        );
        Ok(view)
    }
}
