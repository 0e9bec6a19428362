//! JSON payment handlers: submit, query, status by id, the creditor agent's decision, returns.

use super::*;

pub(super) async fn submit_payment(
    Signed(state, caller, body, _permit): Signed,
) -> Result<Response, ApiError> {
    let request = json_body(&body)?;
    let (done, view) = state.switch.submit(&caller, request).await?;
    Ok(ok(
        if done {
            StatusCode::OK
        } else {
            StatusCode::ACCEPTED
        },
        &view,
    ))
}

pub(super) async fn query_payment(
    RawQuery(query): RawQuery,
    Signed(state, caller, _, _permit): Signed,
) -> Result<Response, ApiError> {
    let query: StatusQuery = serde_urlencoded_like(query.as_deref().unwrap_or(""))?;
    let view = state.switch.status(&caller, query).await?;
    Ok(ok(StatusCode::OK, &view))
}

/// Parses `a=b&c=d` (no percent-decoding needed: every field is an id of safe characters).
pub(super) fn serde_urlencoded_like(query: &str) -> Result<StatusQuery, ApiError> {
    let mut map = serde_json::Map::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').ok_or_else(|| {
            ApiError::new(400, "invalid_query", "query parameters are key=value")
                .with_reason("FF01")
        })?;
        if value.contains('%') || value.contains('+') {
            return Err(ApiError::new(
                400,
                "invalid_query",
                "encoded characters are not accepted in ids",
            )
            .with_reason("FF01"));
        }
        map.insert(
            key.to_string(),
            serde_json::Value::String(value.to_string()),
        );
    }
    serde_json::from_value(serde_json::Value::Object(map))
        .map_err(|e| ApiError::new(400, "invalid_query", e.to_string()).with_reason("FF01"))
}

pub(super) async fn get_payment(
    Path(id): Path<String>,
    Signed(state, caller, _, _permit): Signed,
) -> Result<Response, ApiError> {
    let query = StatusQuery {
        payment_id: Some(id),
        ..StatusQuery::default()
    };
    Ok(ok(
        StatusCode::OK,
        &state.switch.status(&caller, query).await?,
    ))
}

pub(super) async fn decide(
    Path(id): Path<String>,
    Signed(state, caller, body, _permit): Signed,
) -> Result<Response, ApiError> {
    let id = u128::from_str_radix(&id, 16).map_err(|_| {
        ApiError::new(400, "invalid_id", "payment id is 32 hex digits").with_reason("FF01")
    })?;
    let decision: DecisionBody = json_body(&body)?;
    let decision = decision.decision().ok_or_else(|| {
        ApiError::new(
            400,
            "invalid_decision",
            "status ACCP without reason, or RJCT with an ISO 20022 status reason code",
        )
        .with_reason("FF01")
    })?;
    state.switch.decide(&caller, id, decision)?;
    Ok(ok(
        StatusCode::ACCEPTED,
        &serde_json::json!({"accepted": true}),
    ))
}

/// POST /v1/payments/{id}/return: the creditor agent returns (part of) a settled payment.
pub(super) async fn return_payment(
    Path(id): Path<String>,
    Signed(state, caller, body, _permit): Signed,
) -> Result<Response, ApiError> {
    let key = u128::from_str_radix(&id, 16).map_err(|_| {
        ApiError::new(400, "invalid_id", "payment id is 32 hex digits").with_reason("FF01")
    })?;
    let view = state
        .switch
        .return_payment(&caller, key, json_body(&body)?)
        .await?;
    Ok(ok(StatusCode::OK, &view))
}
