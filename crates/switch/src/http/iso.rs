//! ISO 20022 handlers, ISO in and ISO out: pacs.008 -> pacs.002, pacs.028 -> pacs.002, pacs.004
//! -> pacs.002, camt.056 / camt.029 -> camt.029; refusals no business message answers are an
//! admi.002 message reject.

use super::*;

pub(super) fn xml_response(status: StatusCode, xml: String) -> Response {
    (status, [("content-type", "application/xml")], xml).into_response()
}

/// POST /v1/iso20022/pacs.008: a pacs.008 in, a pacs.002 out (ACSC, RJCT with reason, or PDNG
/// with 202 when not final in time). An unreadable message is a JSON 400 (FF01, element path).
pub(super) async fn submit_pacs008(
    Signed(state, caller, body, _permit): Signed,
) -> Result<Response, ApiError> {
    let resolve = |rtn: &str| state.switch.bic_of_routing_number(rtn);
    let submission = crate::iso::read_pacs008(&body, &resolve)?;
    if submission.header.is_none() && state.switch.config.scheme_profile.requires_header() {
        return Err(ApiError::new(
            400,
            "header_required",
            "this scheme requires the business application header (head.001.001.02) with every pacs.008",
        )
        .with_reason("FF01"));
    }
    if let (Some(header), Caller::Participant(me)) = (&submission.header, &caller) {
        crate::iso::check_header(header, me, crate::iso::PACS_008_NAME, &resolve)?;
    }
    let original = submission.message.message_id.clone();
    let header = submission.header.clone();
    let scheme_bic = state.switch.config.scheme_bic.clone();
    let answer = |status: StatusCode, report: clearhouse_iso20022::Pacs002| {
        xml_response(
            status,
            crate::iso::answer_xml(
                header.as_ref(),
                &scheme_bic,
                "pacs.002.001.10",
                report.to_document(),
            ),
        )
    };
    match state.switch.submit(&caller, submission.request).await {
        Ok((done, view)) => Ok(answer(
            if done {
                StatusCode::OK
            } else {
                StatusCode::ACCEPTED
            },
            crate::iso::pacs002_of(&view, &original),
        )),
        // Refusals with an ISO reason are answered in ISO: pacs.002 RJCT.
        Err(error) if error.reason.is_some() && error.status != 401 && error.status != 403 => {
            Ok(answer(
                StatusCode::from_u16(error.status).unwrap_or(StatusCode::BAD_REQUEST),
                crate::iso::pacs002_refusal(&submission.message, error.reason.unwrap_or("NARR")),
            ))
        }
        Err(error) => Err(error),
    }
}

/// POST /v1/iso20022/pacs.028: a status request (by OrgnlUETR, OrgnlInstrId or OrgnlEndToEndId)
/// answered with a pacs.002 of the payment's state; only the debtor or creditor agent may ask.
pub(super) async fn status_pacs028(
    Signed(state, caller, body, _permit): Signed,
) -> Result<Response, ApiError> {
    // Every refusal is ISO 20022 too: a pacs.002 RJCT where the handler writes one, an
    // admi.002 message reject for the rest (authentication errors stay JSON).
    let handled = async move {
        let request = match clearhouse_iso20022::Message::parse(&body, &crate::iso::limits()) {
            Ok(clearhouse_iso20022::Message::Pacs028(request)) => request,
            Ok(_) => {
                return Err(
                    ApiError::new(400, "unsupported_message", "send a pacs.028.001.03")
                        .with_reason("FF01"),
                )
            }
            Err(error) => {
                return Err(
                    ApiError::new(400, "invalid_message", error.to_string()).with_reason("FF01")
                )
            }
        };
        let query = match (
            &request.original_uetr,
            &request.original_instruction_id,
            &request.original_end_to_end_id,
        ) {
            (Some(uetr), _, _) => StatusQuery {
                uetr: Some(uetr.clone()),
                ..StatusQuery::default()
            },
            (None, Some(instruction), _) => StatusQuery {
                instruction_id: Some(instruction.clone()),
                ..StatusQuery::default()
            },
            (None, None, Some(e2e)) => StatusQuery {
                end_to_end_id: Some(e2e.clone()),
                ..StatusQuery::default()
            },
            _ => {
                return Err(ApiError::new(
                    400,
                    "no_reference",
                    "a pacs.028 needs OrgnlUETR, OrgnlInstrId or OrgnlEndToEndId",
                )
                .with_reason("FF01"))
            }
        };
        let view = state.switch.status(&caller, query).await?;
        let original = request
            .original_message_id
            .clone()
            .or_else(|| view.message_id.clone())
            .unwrap_or_else(|| view.instruction_id.clone());
        Ok(xml_response(
            StatusCode::OK,
            crate::iso::pacs002_of(&view, &original).to_xml(),
        ))
    }
    .await;
    handled.or_else(|error| iso_refusal(error, "NONREF"))
}

/// POST /v1/iso20022/pacs.004: a return of a settled payment (found by OrgnlUETR), answered with
/// a pacs.002 (ACSC, or RJCT with a reason).
pub(super) async fn return_pacs004(
    Signed(state, caller, body, _permit): Signed,
) -> Result<Response, ApiError> {
    // Every refusal is ISO 20022 too: a pacs.002 RJCT where the handler writes one, an
    // admi.002 message reject for the rest (authentication errors stay JSON).
    let handled = async move {
        let request = match clearhouse_iso20022::Message::parse(&body, &crate::iso::limits()) {
            Ok(clearhouse_iso20022::Message::Pacs004(request)) => request,
            Ok(_) => {
                return Err(
                    ApiError::new(400, "unsupported_message", "send a pacs.004.001.09")
                        .with_reason("FF01"),
                )
            }
            Err(error) => {
                return Err(
                    ApiError::new(400, "invalid_message", error.to_string()).with_reason("FF01")
                )
            }
        };
        let uetr = request.original_uetr.clone().ok_or_else(|| {
            ApiError::new(
                400,
                "no_reference",
                "this scheme finds the original payment by OrgnlUETR",
            )
            .with_reason("FF01")
        })?;
        let key = state
            .switch
            .payment_by_uetr(&uetr)
            .await?
            .ok_or_else(|| ApiError::new(404, "not_found", "payment not found"))?;
        let return_request = crate::switch::ReturnRequest {
            return_id: request
                .return_id
                .clone()
                .unwrap_or_else(|| request.message_id.clone()),
            amount: Some(request.returned_amount.clone()),
            reason: request.reason.clone().unwrap_or_default(),
            currency: Some(request.currency.clone()),
        };
        match state
            .switch
            .return_payment(&caller, key, return_request)
            .await
        {
            Ok(_) => Ok(xml_response(
                StatusCode::OK,
                crate::iso::pacs002_of_return(&request, "ACSC", None).to_xml(),
            )),
            Err(error) if error.reason.is_some() && error.status != 401 && error.status != 403 => {
                Ok(xml_response(
                    StatusCode::from_u16(error.status).unwrap_or(StatusCode::BAD_REQUEST),
                    crate::iso::pacs002_of_return(&request, "RJCT", error.reason).to_xml(),
                ))
            }
            Err(error) => Err(error),
        }
    }
    .await;
    handled.or_else(|error| iso_refusal(error, "NONREF"))
}

/// GET /v1/payments/{id}/pacs.002: the payment's state as a pacs.002.
pub(super) async fn get_payment_pacs002(
    Path(id): Path<String>,
    Signed(state, caller, _, _permit): Signed,
) -> Result<Response, ApiError> {
    let query = StatusQuery {
        payment_id: Some(id),
        ..StatusQuery::default()
    };
    let view = state.switch.status(&caller, query).await?;
    Ok(xml_response(
        StatusCode::OK,
        crate::iso::pacs002_of(
            &view,
            view.message_id.as_deref().unwrap_or(&view.instruction_id),
        )
        .to_xml(),
    ))
}

pub(super) async fn recall_camt056(
    Signed(state, caller, body, _permit): Signed,
) -> Result<Response, ApiError> {
    let request = match clearhouse_iso20022::recall::Camt056::parse(&body, &crate::iso::limits()) {
        Ok(request) => request,
        Err(e) => {
            return iso_refusal(
                ApiError::new(400, "invalid_message", e.to_string()).with_reason("FF01"),
                "NONREF",
            )
        }
    };
    let reference = request.assignment.id.clone();
    match state.switch.recall_request(&caller, request).await {
        // Accepted for the creditor agent's decision: a camt.029 PDCR naming the recall.
        Ok(recall) => Ok(xml_response(
            StatusCode::ACCEPTED,
            state
                .switch
                .recall_status_camt029(&recall, &caller_bic(&caller))
                .to_xml(),
        )),
        Err(error) => iso_refusal(error, &reference),
    }
}

pub(super) fn caller_bic(caller: &Caller) -> String {
    match caller {
        Caller::Operator => "operator".into(),
        Caller::Participant(bic) => bic.clone(),
    }
}

/// A refused ISO 20022 message that no business message answers: an admi.002 message reject
/// with the same HTTP status, its reason the ISO reason code (FF01, AM03...) or, where none
/// applies, the error's code (`not_found`, `not_settled`, `recall_resolved`...).
/// Authentication and authorization errors (401, 403) and server errors stay JSON like on
/// every endpoint.
pub(super) fn iso_refusal(error: ApiError, reference: &str) -> Result<Response, ApiError> {
    match error.reason.unwrap_or(error.code) {
        reason
            if (400..500).contains(&error.status) && error.status != 401 && error.status != 403 =>
        {
            let reject = clearhouse_iso20022::admi::Admi002 {
                related_reference: reference.to_string(),
                reason: reason.to_string(),
                rejected_at: Some(clearhouse_iso20022::time::date_time(crate::clock::now_ns())),
                error_location: None,
                description: Some(error.message.clone()),
            };
            Ok(xml_response(
                StatusCode::from_u16(error.status).unwrap_or(StatusCode::BAD_REQUEST),
                reject.to_xml(),
            ))
        }
        _ => Err(error),
    }
}

pub(super) async fn recall_camt029(
    Signed(state, caller, body, _permit): Signed,
) -> Result<Response, ApiError> {
    let resolution = match clearhouse_iso20022::recall::Camt029::parse(&body, &crate::iso::limits())
    {
        Ok(resolution) => resolution,
        Err(e) => {
            return iso_refusal(
                ApiError::new(400, "invalid_message", e.to_string()).with_reason("FF01"),
                "NONREF",
            )
        }
    };
    let reference = resolution.assignment.id.clone();
    match state.switch.recall_resolution(&caller, resolution).await {
        // The recall as it now stands (CNCL / ACCR or RJCR), naming the return.
        Ok((recall, _)) => Ok(xml_response(
            StatusCode::OK,
            state
                .switch
                .recall_status_camt029(&recall, &caller_bic(&caller))
                .to_xml(),
        )),
        Err(error) => iso_refusal(error, &reference),
    }
}

pub(super) async fn get_recall(
    Path(id): Path<String>,
    Signed(state, caller, _, _permit): Signed,
) -> Result<Response, ApiError> {
    Ok(ok(
        StatusCode::OK,
        &state.switch.recall_status(&caller, &id).await?,
    ))
}
