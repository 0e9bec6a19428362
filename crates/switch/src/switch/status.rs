//! Status queries: a payment by id, instruction, end-to-end id or UETR, for the two agents
//! it concerns (and the operator).

use super::*;

impl Switch {
    /// The payment of an instruction (debtor agent + instruction id), wherever it is.
    pub(super) async fn find_instruction(
        &self,
        alias: u128,
    ) -> Result<Option<PaymentRecord>, ApiError> {
        let key = self
            .in_flight
            .lock()
            .expect("in flight")
            .by_instruction
            .get(&alias)
            .copied();
        let key = key.or_else(|| {
            self.recent
                .lock()
                .expect("recent")
                .by_instruction
                .get(&alias)
                .copied()
        });
        let key = match key {
            Some(key) => Some(key),
            // An index read of microseconds: done in place, not on the blocking pool.
            None => self.node.resolve_alias_now(alias)?,
        };
        match key {
            Some(key) => self.find(key).await,
            None => Ok(None),
        }
    }

    /// A payment by id: in flight, recent, or from the index; `archived` (410) when only its
    /// tombstone is left (retention).
    pub(super) async fn find(&self, id: u128) -> Result<Option<PaymentRecord>, ApiError> {
        if let Some(entry) = self.in_flight.lock().expect("in flight").payments.get(&id) {
            return Ok(Some(
                entry
                    .done
                    .borrow()
                    .clone()
                    .unwrap_or_else(|| entry.record.clone()),
            ));
        }
        if let Some(record) = self.recent.lock().expect("recent").map.get(&id) {
            return Ok(Some(record.clone()));
        }
        // An index read of microseconds: done in place, not on the blocking pool.
        let value = self.node.get_records_now(&[id])?.pop().flatten();
        match value.map(|v| decode(id, &v)) {
            None => Ok(None),
            Some(Ok(Stored::Payment(record))) => Ok(Some(*record)),
            Some(Ok(Stored::Archived(archived))) => Err(ApiError::archived(archived.window)),
            Some(_) => Err(ApiError::new(
                500,
                "corrupt_record",
                format!("record {id:#x} is not a payment"),
            )),
        }
    }

    /// Status query: only the debtor or creditor agent (or the operator) may read a payment.
    pub async fn status(
        &self,
        caller: &Caller,
        query: StatusQuery,
    ) -> Result<PaymentView, ApiError> {
        let id =
            match (
                &query.payment_id,
                &query.instruction_id,
                &query.end_to_end_id,
                &query.uetr,
            ) {
                (Some(hex_id), None, None, None) => u128::from_str_radix(hex_id, 16)
                    .map_err(|_| ApiError::bad_request("payment_id is 32 hex digits", "FF01"))?,
                (None, Some(instruction_id), None, None) => match caller {
                    Caller::Participant(bic) => self
                        .find_instruction(instruction_alias(bic, instruction_id))
                        .await?
                        .ok_or_else(|| ApiError::not_found("payment"))?
                        .id(),
                    Caller::Operator => return Err(ApiError::bad_request(
                        "the operator asks by payment_id, end_to_end_id with debtor_agent, or uetr",
                        "FF01",
                    )),
                },
                (None, None, Some(e2e), None) => {
                    let debtor = match (caller, &query.debtor_agent) {
                        (_, Some(d)) => d.clone(),
                        (Caller::Participant(bic), None) => bic.clone(),
                        (Caller::Operator, None) => {
                            return Err(ApiError::bad_request(
                                "debtor_agent is required with end_to_end_id",
                                "FF01",
                            ))
                        }
                    };
                    self.resolve(end_to_end_alias(&debtor, e2e))
                        .await?
                        .ok_or_else(|| ApiError::not_found("payment"))?
                }
                (None, None, None, Some(uetr)) => self
                    .resolve(uetr_alias(uetr))
                    .await?
                    .ok_or_else(|| ApiError::not_found("payment"))?,
                _ => {
                    return Err(ApiError::bad_request(
                        "ask by exactly one of payment_id, instruction_id, end_to_end_id, uetr",
                        "FF01",
                    ))
                }
            };
        let record = match self.find(id).await {
            // A tombstone does not say whose payment it was: only the operator, or the debtor
            // agent asking by its own instruction id, learns that it is archived.
            Err(error)
                if error.code == "archived"
                    && matches!(caller, Caller::Participant(_))
                    && query.instruction_id.is_none() =>
            {
                return Err(ApiError::not_found("payment"))
            }
            found => found?.ok_or_else(|| ApiError::not_found("payment"))?,
        };
        match caller {
            Caller::Operator => {}
            Caller::Participant(bic)
                if *bic == record.debtor_agent || *bic == record.creditor_agent => {}
            // Not "forbidden": a participant must not learn that someone else's payment exists.
            Caller::Participant(_) => return Err(ApiError::not_found("payment")),
        }
        Ok(PaymentView::of(&record))
    }

    pub(super) async fn resolve(&self, alias: u128) -> Result<Option<u128>, ApiError> {
        let node = self.node.clone();
        blocking(move || node.resolve_alias(alias)).await
    }

    /// The key of a payment by UETR (for pacs.004 and pacs.028).
    pub async fn payment_by_uetr(&self, uetr: &str) -> Result<Option<u128>, ApiError> {
        self.resolve(uetr_alias(uetr)).await
    }
}
