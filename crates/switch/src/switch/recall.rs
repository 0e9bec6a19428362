//! Recalls: camt.056 -> camt.029 -> pacs.004. The debtor agent asks to cancel a settled payment
//! (camt.056, with an ISO cancellation reason); the switch records the request and passes it to
//! the creditor agent; the creditor agent answers (camt.029): accepted, and the switch returns the
//! unreturned amount from it to the debtor agent at once (the same return as a pacs.004, reason
//! FOCR "following cancellation request", in clearing like any return), or rejected with an ISO
//! rejection reason. Both agents are notified, with the message in ISO 20022 form.

use clearhouse_iso20022::recall::{Assignment, Camt029, Camt056, Original};

use super::*;
use crate::api::RecallNotice;
use crate::model::{RecallRecord, RecallState};

const CANCELLATION_REASON_CODES: &str = include_str!("../cancellation_reason_codes.txt");
const CANCELLATION_REJECTION_CODES: &str = include_str!("../cancellation_rejection_codes.txt");

fn is_code_in(list: &str, code: &str) -> bool {
    code.len() == 4 && list.lines().any(|line| line == code)
}

impl Switch {
    async fn read_recall(&self, key: u128) -> Result<Option<RecallRecord>, ApiError> {
        let node = self.node.clone();
        let value = blocking(move || node.get_records(&[key]))
            .await?
            .pop()
            .flatten();
        match value.map(|v| decode(key, &v)) {
            None => Ok(None),
            Some(Ok(Stored::Recall(r))) => Ok(Some(*r)),
            Some(_) => Err(ApiError::new(500, "corrupt_record", "not a recall")),
        }
    }

    async fn write_recall(&self, record: &RecallRecord) -> Result<(), ApiError> {
        let key = u128::from_str_radix(&record.recall_id, 16).expect("our own hex");
        let put = RecordPut {
            key,
            value: encode(&Stored::Recall(Box::new(record.clone()))),
            ..RecordPut::default()
        };
        engine_submit(&self.node, vec![], vec![put]).await?;
        Ok(())
    }

    /// A camt.056 from the debtor agent of a settled payment.
    pub async fn recall_request(
        &self,
        caller: &Caller,
        request: Camt056,
    ) -> Result<RecallRecord, ApiError> {
        let Caller::Participant(me) = caller else {
            return Err(ApiError::new(
                403,
                "forbidden",
                "recalls come from debtor agents",
            ));
        };
        if request.assignment.assigner_bic != *me {
            return Err(ApiError::new(
                403,
                "assigner_mismatch",
                "Assgnmt/Assgnr must be the authenticated participant",
            ));
        }
        let case_id = request
            .assignment
            .case_id
            .clone()
            .unwrap_or_else(|| request.assignment.id.clone());
        if !is_max35(&case_id) {
            return Err(ApiError::bad_request(
                "the case id must be 1 to 35 characters",
                "FF01",
            ));
        }
        let reason = request.reason.clone().unwrap_or_default();
        if !is_code_in(CANCELLATION_REASON_CODES, &reason) {
            return Err(ApiError::bad_request(
                format!("CxlRsnInf/Rsn/Cd {reason:?} is not an ExternalCancellationReason1Code"),
                "FF01",
            ));
        }
        // The original: by UETR, else by the debtor agent's end-to-end id.
        let alias = match (&request.original.uetr, &request.original.end_to_end_id) {
            (Some(uetr), _) => uetr_alias(uetr),
            (None, Some(e2e)) => end_to_end_alias(me, e2e),
            (None, None) => {
                return Err(ApiError::bad_request(
                    "name the original payment by OrgnlUETR or OrgnlEndToEndId",
                    "FF01",
                ))
            }
        };
        let original = match self.resolve(alias).await? {
            Some(id) => self.find(id).await?,
            None => None,
        }
        .filter(|p| p.debtor_agent == *me)
        .ok_or_else(|| ApiError::not_found("payment"))?;
        if original.state != PaymentState::Settled {
            return Err(ApiError::new(
                409,
                "not_settled",
                "only a settled payment can be recalled",
            ));
        }
        // The original amount, when the recall states it, must be the payment's: same currency
        // (AM03), same amount (AM02 would be misleading for a smaller figure: FF01 names it).
        if let Some((amount, code)) = &request.original_amount {
            if *code != original.currency {
                return Err(ApiError::bad_request(
                    format!(
                        "OrgnlIntrBkSttlmAmt is in {code:?} but the payment was in {}",
                        original.currency
                    ),
                    "AM03",
                ));
            }
            let c = currency(&original.currency).expect("stored currencies are known");
            if money::parse_amount(amount, c.exponent).ok() != Some(original.amount) {
                return Err(ApiError::bad_request(
                    format!(
                        "OrgnlIntrBkSttlmAmt {amount} is not the payment's amount {}",
                        money::format_amount(original.amount, c.exponent)
                    ),
                    "FF01",
                ));
            }
        }
        let key = self.clearing.keys.recall(me, &case_id);
        if let Some(existing) = self.read_recall(key).await? {
            return if existing.payment_id == format!("{:032x}", original.id()) {
                Ok(existing)
            } else {
                Err(ApiError::new(
                    409,
                    "duplicate_case",
                    "this case id was used for another recall",
                )
                .with_reason("DUPL"))
            };
        }
        let record = RecallRecord {
            recall_id: format!("{key:032x}"),
            case_id: case_id.clone(),
            payment_id: format!("{:032x}", original.id()),
            original_uetr: original.uetr.clone(),
            original_end_to_end_id: original.end_to_end_id.clone(),
            requested_by: me.clone(),
            assignee: original.creditor_agent.clone(),
            reason,
            additional_info: request.additional_info.iter().take(2).cloned().collect(),
            state: RecallState::Requested,
            rejection_reason: None,
            return_id: None,
            requested_at_ns: self.clock.now_ns(),
            resolved_at_ns: None,
        };
        self.write_recall(&record).await?;
        tracing::info!(recall = %record.recall_id, payment = %record.payment_id, reason = %record.reason, "recall requested");
        // The creditor agent gets the request as a camt.056 (from the switch, to it).
        let forwarded = Camt056 {
            assignment: Assignment {
                id: format!("CH{:x}", now_ns()),
                assigner_bic: self.config.scheme_bic.clone(),
                assignee_bic: record.assignee.clone(),
                created: clearhouse_iso20022::time::date_time(now_ns()),
                case_id: Some(case_id),
                case_creator_bic: Some(me.clone()),
            },
            original: Original {
                message_id: original.message_id.clone(),
                message_name: original
                    .message_id
                    .as_ref()
                    .map(|_| "pacs.008.001.08".into()),
                instruction_id: Some(original.instruction_id.clone()),
                end_to_end_id: Some(original.end_to_end_id.clone()),
                transaction_id: None,
                uetr: Some(original.uetr.clone()),
            },
            ..request
        };
        self.notify(
            &record.assignee,
            Notification::Recall(Box::new(RecallNotice {
                recall: record.clone(),
                xml: forwarded.to_xml(),
            })),
        );
        Ok(record)
    }

    /// A camt.029 from the creditor agent: accept (the money goes back now) or reject.
    pub async fn recall_resolution(
        &self,
        caller: &Caller,
        resolution: Camt029,
    ) -> Result<(RecallRecord, Option<ReturnView>), ApiError> {
        let Caller::Participant(me) = caller else {
            return Err(ApiError::new(
                403,
                "forbidden",
                "recalls are resolved by creditor agents",
            ));
        };
        if resolution.assignment.assigner_bic != *me {
            return Err(ApiError::new(
                403,
                "assigner_mismatch",
                "Assgnmt/Assgnr must be the authenticated participant",
            ));
        }
        let case_id = resolution
            .assignment
            .case_id
            .clone()
            .ok_or_else(|| ApiError::bad_request("RslvdCase/Id names the recall", "FF01"))?;
        // The case belongs to the agent who opened it (RslvdCase/Cretr), else the assignee.
        let requester = resolution
            .assignment
            .case_creator_bic
            .clone()
            .unwrap_or_else(|| resolution.assignment.assignee_bic.clone());
        let mut record = self
            .read_recall(self.clearing.keys.recall(&requester, &case_id))
            .await?
            .filter(|r| r.assignee == *me)
            .ok_or_else(|| ApiError::not_found("recall"))?;
        let accept = match (
            resolution.status.as_deref(),
            resolution.confirmation.as_str(),
        ) {
            (Some("ACCR"), _) | (None, "CNCL") => true,
            (Some("RJCR"), _) | (None, "RJCR") => false,
            (status, confirmation) => {
                return Err(ApiError::bad_request(
                    format!(
                    "TxCxlSts {status:?} / Sts/Conf {confirmation:?}: answer ACCR (CNCL) or RJCR"
                ),
                    "FF01",
                ))
            }
        };
        let wanted = if accept {
            RecallState::Accepted
        } else {
            RecallState::Rejected
        };
        if record.state != RecallState::Requested {
            return if record.state == wanted {
                Ok((record, None))
            } else {
                Err(ApiError::new(
                    409,
                    "recall_resolved",
                    "this recall was already resolved otherwise",
                ))
            };
        }
        let mut returned = None;
        if accept {
            let payment_key = u128::from_str_radix(&record.payment_id, 16).expect("our own hex");
            let return_id: String = format!("RCL-{case_id}").chars().take(35).collect();
            let view = self
                .return_payment(
                    caller,
                    payment_key,
                    ReturnRequest {
                        return_id: return_id.clone(),
                        amount: None,
                        reason: "FOCR".into(),
                        currency: None,
                    },
                )
                .await?;
            record.return_id = Some(return_id);
            returned = Some(view);
        } else {
            let reason = resolution.reason.clone().unwrap_or_default();
            if !is_code_in(CANCELLATION_REJECTION_CODES, &reason) {
                return Err(ApiError::bad_request(
                    format!("CxlStsRsnInf/Rsn/Cd {reason:?} is not an ExternalPaymentCancellationRejection1Code"),
                    "FF01",
                ));
            }
            record.rejection_reason = Some(reason);
        }
        record.state = wanted;
        record.resolved_at_ns = Some(self.clock.now_ns());
        self.write_recall(&record).await?;
        tracing::info!(recall = %record.recall_id, state = ?record.state, "recall resolved");
        let answer = Camt029 {
            assignment: Assignment {
                id: format!("CH{:x}", now_ns()),
                assigner_bic: self.config.scheme_bic.clone(),
                assignee_bic: record.requested_by.clone(),
                created: clearhouse_iso20022::time::date_time(now_ns()),
                case_id: Some(case_id),
                case_creator_bic: Some(record.requested_by.clone()),
            },
            ..resolution
        };
        self.notify(
            &record.requested_by,
            Notification::Recall(Box::new(RecallNotice {
                recall: record.clone(),
                xml: answer.to_xml(),
            })),
        );
        Ok((record, returned))
    }

    /// The state of a recall as a camt.029.001.09 from the switch to `to`: PDCR while the
    /// creditor agent has not decided, CNCL / ACCR once the money went back, RJCR with the
    /// rejection reason; CxlStsId carries the recall id (`GET /v1/recalls/{id}`).
    pub fn recall_status_camt029(&self, record: &RecallRecord, to: &str) -> Camt029 {
        let now = now_ns();
        let (confirmation, status) = match record.state {
            RecallState::Requested => ("PDCR", "PDCR"),
            RecallState::Accepted => ("CNCL", "ACCR"),
            RecallState::Rejected => ("RJCR", "RJCR"),
        };
        Camt029 {
            assignment: Assignment {
                id: format!("CH{now:x}"),
                assigner_bic: self.config.scheme_bic.clone(),
                assignee_bic: to.to_string(),
                created: clearhouse_iso20022::time::date_time(now),
                case_id: Some(record.case_id.clone()),
                case_creator_bic: Some(record.requested_by.clone()),
            },
            confirmation: confirmation.into(),
            cancellation_status_id: Some(record.recall_id.clone()),
            original: Original {
                end_to_end_id: Some(record.original_end_to_end_id.clone()),
                uetr: Some(record.original_uetr.clone()),
                ..Original::default()
            },
            status: Some(status.into()),
            reason: record.rejection_reason.clone(),
            additional_info: record
                .return_id
                .iter()
                .map(|id| format!("returned as {id}"))
                .collect(),
        }
    }

    /// A recall, for the two agents it concerns.
    pub async fn recall_status(
        &self,
        caller: &Caller,
        recall_id: &str,
    ) -> Result<RecallRecord, ApiError> {
        let key = u128::from_str_radix(recall_id, 16)
            .map_err(|_| ApiError::bad_request("a recall id is 32 hex digits", "FF01"))?;
        let record = self
            .read_recall(key)
            .await?
            .ok_or_else(|| ApiError::not_found("recall"))?;
        match caller {
            Caller::Operator => Ok(record),
            Caller::Participant(me) if *me == record.requested_by || *me == record.assignee => {
                Ok(record)
            }
            Caller::Participant(_) => Err(ApiError::not_found("recall")),
        }
    }
}
