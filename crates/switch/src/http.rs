//! The HTTP API (axum): signed requests in, JSON out, errors as
//! `{"code": ..., "message": ..., "reason": ISO code or null}` with a stable code.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post};
use axum::Router;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::Semaphore;

use crate::auth::{self, AuthError, SignedHeaders};
use crate::outbound::DecisionBody;
use crate::switch::{ApiError, Caller, StatusQuery, Switch};

/// Requests being handled at once; beyond it the server answers 503 at once.
pub const CONCURRENT_REQUESTS_MAX: usize = 8192;

/// Most connections open at once; beyond it new connections wait in the kernel's backlog.
pub const CONNECTIONS_MAX: usize = 4096;
/// A request's headers must arrive within this after the connection is ready for one (slow
/// clients, idle keep-alive connections).
const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// A request's body must arrive within this.
const BODY_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// How long a shutdown waits for open connections to finish their requests.
const SHUTDOWN_DRAIN: std::time::Duration = std::time::Duration::from_secs(10);

#[derive(Clone)]
struct AppState {
    switch: Arc<Switch>,
    requests: Arc<Semaphore>,
    rates: Arc<RateLimiter>,
}

/// Per-participant token buckets: `per_second` tokens a second, at most `burst` saved up.
/// Integer arithmetic in millitokens; one bucket per authenticated participant (bounded by the
/// participants the switch accepts).
pub struct RateLimiter {
    per_second: u64,
    burst: u64,
    buckets: std::sync::Mutex<rustc_hash::FxHashMap<String, (u64, std::time::Instant)>>,
}

impl RateLimiter {
    pub fn new(per_second: u64, burst: u64) -> RateLimiter {
        RateLimiter {
            per_second,
            burst,
            buckets: std::sync::Mutex::new(rustc_hash::FxHashMap::default()),
        }
    }

    /// Takes one token of `participant`'s bucket; false when it is empty.
    pub fn admit(&self, participant: &str, now: std::time::Instant) -> bool {
        let full = self.burst.saturating_mul(1000);
        let mut buckets = self.buckets.lock().expect("rate buckets");
        let (tokens, last) = buckets
            .entry(participant.to_string())
            .or_insert((full, now));
        let elapsed_us = now.saturating_duration_since(*last).as_micros();
        // per_second tokens a second = per_second millitokens a millisecond.
        let refill = elapsed_us
            .saturating_mul(u128::from(self.per_second))
            .checked_div(1000)
            .unwrap_or(0);
        *tokens = u64::try_from(u128::from(*tokens).saturating_add(refill))
            .unwrap_or(u64::MAX)
            .min(full);
        *last = now;
        if *tokens >= 1000 {
            *tokens -= 1000;
            true
        } else {
            false
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = serde_json::json!({
            "code": self.code,
            "message": self.message,
            "reason": self.reason,
        });
        let mut response = (status, axum::Json(body)).into_response();
        if let Some(seconds) = self.retry_after_seconds {
            response
                .headers_mut()
                .insert("retry-after", HeaderValue::from(seconds));
        }
        response
    }
}

/// A window number from the path; anything else is a JSON 400 (FF01) like every other error.
struct WindowNumber(u64);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for WindowNumber {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        let Path(text) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::bad_request(format!("window: {e}"), "FF01").into_response())?;
        text.parse().map(WindowNumber).map_err(|_| {
            ApiError::bad_request("a window is a number from 0 to 2^64 - 1", "FF01").into_response()
        })
    }
}

fn auth_error(error: AuthError) -> ApiError {
    match error {
        AuthError::NonceCacheFull => ApiError::new(503, "replay_cache_full", error.to_string()),
        // A request signed for an earlier process (or just before this one's start): the client
        // signs again; `code` tells it so without parsing the message.
        AuthError::SignedBeforeStart { .. } => {
            ApiError::new(401, "signed_before_start", error.to_string()).retry_after(1)
        }
        _ => ApiError::new(401, "unauthorized", error.to_string()),
    }
}

fn header<'a>(headers: &'a HeaderMap, name: &'static str) -> Result<&'a str, ApiError> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| auth_error(AuthError::MissingHeader(name)))
}

/// Verifies the request's signature and returns the caller.
fn authenticate(
    state: &AppState,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Caller, ApiError> {
    let signed = SignedHeaders {
        key_id: header(headers, auth::HEADER_KEY_ID)?,
        timestamp: header(headers, auth::HEADER_TIMESTAMP)?,
        nonce: header(headers, auth::HEADER_NONCE)?,
        signature: header(headers, auth::HEADER_SIGNATURE)?,
    };
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    state
        .switch
        .authenticate(&signed, method.as_str(), path, body)
        .map_err(auth_error)
}

fn json_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|error| {
        ApiError::new(400, "invalid_json", format!("body: {error}")).with_reason("FF01")
    })
}

fn operator_only(caller: &Caller) -> Result<(), ApiError> {
    match caller {
        Caller::Operator => Ok(()),
        Caller::Participant(_) => Err(ApiError::new(
            403,
            "forbidden",
            "operator credentials required",
        )),
    }
}

fn self_or_operator(caller: &Caller, bic: &str) -> Result<(), ApiError> {
    match caller {
        Caller::Operator => Ok(()),
        Caller::Participant(me) if me == bic => Ok(()),
        Caller::Participant(_) => Err(ApiError::new(
            403,
            "forbidden",
            "a participant can only read its own data",
        )),
    }
}

fn ok<T: Serialize>(status: StatusCode, value: &T) -> Response {
    (status, axum::Json(value)).into_response()
}

/// One signed request: the admission permit, authentication, then the handler.
async fn handle<F, Fut>(
    state: AppState,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
    handler: F,
) -> Response
where
    F: FnOnce(AppState, Caller, Bytes) -> Fut,
    Fut: std::future::Future<Output = Result<Response, ApiError>>,
{
    let Ok(_permit) = state.requests.clone().try_acquire_owned() else {
        return ApiError::new(503, "server_busy", "too many requests in progress")
            .retry_after(1)
            .into_response();
    };
    let caller = match authenticate(&state, &method, &uri, &headers, &body) {
        Ok(caller) => caller,
        Err(error) => return error.into_response(),
    };
    if let Caller::Participant(bic) = &caller {
        if !state.rates.admit(bic, std::time::Instant::now()) {
            return ApiError::new(
                429,
                "rate_limited",
                format!(
                    "more than {} requests per second from {bic}",
                    state.switch.config.participant_requests_per_second
                ),
            )
            .retry_after(1)
            .into_response();
        }
    }
    match handler(state, caller, body).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    }
}

async fn submit_payment(
    State(state): State<AppState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    handle(
        state,
        method,
        uri,
        headers,
        body,
        |state, caller, body| async move {
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
        },
    )
    .await
}

async fn query_payment(
    State(state): State<AppState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> Response {
    handle(
        state,
        method,
        uri,
        headers,
        body,
        |state, caller, _| async move {
            let query: StatusQuery = serde_urlencoded_like(query.as_deref().unwrap_or(""))?;
            let view = state.switch.status(&caller, query).await?;
            Ok(ok(StatusCode::OK, &view))
        },
    )
    .await
}

/// Parses `a=b&c=d` (no percent-decoding needed: every field is an id of safe characters).
fn serde_urlencoded_like(query: &str) -> Result<StatusQuery, ApiError> {
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

async fn get_payment(
    State(state): State<AppState>,
    Path(id): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    handle(
        state,
        method,
        uri,
        headers,
        body,
        |state, caller, _| async move {
            let query = StatusQuery {
                payment_id: Some(id),
                ..StatusQuery::default()
            };
            Ok(ok(
                StatusCode::OK,
                &state.switch.status(&caller, query).await?,
            ))
        },
    )
    .await
}

async fn decide(
    State(state): State<AppState>,
    Path(id): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    handle(
        state,
        method,
        uri,
        headers,
        body,
        |state, caller, body| async move {
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
        },
    )
    .await
}

async fn onboard(
    State(state): State<AppState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    handle(
        state,
        method,
        uri,
        headers,
        body,
        |state, caller, body| async move {
            operator_only(&caller)?;
            let (view, secret) = state.switch.onboard(json_body(&body)?).await?;
            Ok(ok(
                StatusCode::CREATED,
                &serde_json::json!({"participant": view, "secret_hex": secret}),
            ))
        },
    )
    .await
}

async fn change(
    State(state): State<AppState>,
    Path(bic): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    handle(
        state,
        method,
        uri,
        headers,
        body,
        |state, caller, body| async move {
            operator_only(&caller)?;
            Ok(ok(
                StatusCode::OK,
                &state.switch.change(&bic, json_body(&body)?).await?,
            ))
        },
    )
    .await
}

async fn liquidity(
    State(state): State<AppState>,
    Path(bic): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    handle(
        state,
        method,
        uri,
        headers,
        body,
        |state, caller, body| async move {
            operator_only(&caller)?;
            Ok(ok(
                StatusCode::OK,
                &state.switch.liquidity(&bic, json_body(&body)?).await?,
            ))
        },
    )
    .await
}

async fn participant(
    State(state): State<AppState>,
    Path(bic): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    handle(
        state,
        method,
        uri,
        headers,
        body,
        |state, caller, _| async move {
            self_or_operator(&caller, &bic)?;
            Ok(ok(StatusCode::OK, &state.switch.participant_view(&bic)?))
        },
    )
    .await
}

async fn positions(
    State(state): State<AppState>,
    Path(bic): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    handle(
        state,
        method,
        uri,
        headers,
        body,
        |state, caller, _| async move {
            self_or_operator(&caller, &bic)?;
            Ok(ok(StatusCode::OK, &state.switch.positions(&bic).await?))
        },
    )
    .await
}

async fn stats(
    State(state): State<AppState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    handle(
        state,
        method,
        uri,
        headers,
        body,
        |state, caller, _| async move {
            operator_only(&caller)?;
            Ok(ok(StatusCode::OK, &state.switch.stats_view()))
        },
    )
    .await
}

fn xml_response(status: StatusCode, xml: String) -> Response {
    (status, [("content-type", "application/xml")], xml).into_response()
}

/// POST /v1/iso20022/pacs.008: a pacs.008 in, a pacs.002 out (ACSC, RJCT with reason, or PDNG
/// with 202 when not final in time). An unreadable message is a JSON 400 (FF01, element path).
async fn submit_pacs008(
    State(state): State<AppState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    handle(
        state,
        method,
        uri,
        headers,
        body,
        |state, caller, body| async move {
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
                Err(error)
                    if error.reason.is_some() && error.status != 401 && error.status != 403 =>
                {
                    Ok(answer(
                        StatusCode::from_u16(error.status).unwrap_or(StatusCode::BAD_REQUEST),
                        crate::iso::pacs002_refusal(
                            &submission.message,
                            error.reason.unwrap_or("NARR"),
                        ),
                    ))
                }
                Err(error) => Err(error),
            }
        },
    )
    .await
}

/// POST /v1/iso20022/pacs.028: a status request (by OrgnlUETR, OrgnlInstrId or OrgnlEndToEndId)
/// answered with a pacs.002 of the payment's state; only the debtor or creditor agent may ask.
async fn status_pacs028(
    State(state): State<AppState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    handle(
        state,
        method,
        uri,
        headers,
        body,
        |state, caller, body| async move {
            // Every refusal is ISO 20022 too: a pacs.002 RJCT where the handler writes one, an
            // admi.002 message reject for the rest (authentication errors stay JSON).
            let handled = async move {
                let request =
                    match clearhouse_iso20022::Message::parse(&body, &crate::iso::limits()) {
                        Ok(clearhouse_iso20022::Message::Pacs028(request)) => request,
                        Ok(_) => {
                            return Err(ApiError::new(
                                400,
                                "unsupported_message",
                                "send a pacs.028.001.03",
                            )
                            .with_reason("FF01"))
                        }
                        Err(error) => {
                            return Err(ApiError::new(400, "invalid_message", error.to_string())
                                .with_reason("FF01"))
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
        },
    )
    .await
}

/// POST /v1/payments/{id}/return: the creditor agent returns (part of) a settled payment.
async fn return_payment(
    State(state): State<AppState>,
    Path(id): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    handle(
        state,
        method,
        uri,
        headers,
        body,
        |state, caller, body| async move {
            let key = u128::from_str_radix(&id, 16).map_err(|_| {
                ApiError::new(400, "invalid_id", "payment id is 32 hex digits").with_reason("FF01")
            })?;
            let view = state
                .switch
                .return_payment(&caller, key, json_body(&body)?)
                .await?;
            Ok(ok(StatusCode::OK, &view))
        },
    )
    .await
}

/// POST /v1/iso20022/pacs.004: a return of a settled payment (found by OrgnlUETR), answered with
/// a pacs.002 (ACSC, or RJCT with a reason).
async fn return_pacs004(
    State(state): State<AppState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    handle(
        state,
        method,
        uri,
        headers,
        body,
        |state, caller, body| async move {
            // Every refusal is ISO 20022 too: a pacs.002 RJCT where the handler writes one, an
            // admi.002 message reject for the rest (authentication errors stay JSON).
            let handled = async move {
                let request =
                    match clearhouse_iso20022::Message::parse(&body, &crate::iso::limits()) {
                        Ok(clearhouse_iso20022::Message::Pacs004(request)) => request,
                        Ok(_) => {
                            return Err(ApiError::new(
                                400,
                                "unsupported_message",
                                "send a pacs.004.001.09",
                            )
                            .with_reason("FF01"))
                        }
                        Err(error) => {
                            return Err(ApiError::new(400, "invalid_message", error.to_string())
                                .with_reason("FF01"))
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
                    Err(error)
                        if error.reason.is_some() && error.status != 401 && error.status != 403 =>
                    {
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
        },
    )
    .await
}

/// GET /v1/payments/{id}/pacs.002: the payment's state as a pacs.002.
async fn get_payment_pacs002(
    State(state): State<AppState>,
    Path(id): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    handle(
        state,
        method,
        uri,
        headers,
        body,
        |state, caller, _| async move {
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
        },
    )
    .await
}

/// The number in `name=<digits>` of a query, if present.
fn query_number(query: Option<&str>, name: &str) -> Result<Option<u64>, ApiError> {
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        if let Some((key, value)) = pair.split_once('=') {
            if key == name {
                return value.parse().map(Some).map_err(|_| {
                    ApiError::new(400, "invalid_query", format!("{name} must be a number"))
                        .with_reason("FF01")
                });
            }
        }
    }
    Ok(None)
}

fn query_text<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query
        .unwrap_or("")
        .split('&')
        .filter_map(|p| p.split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value)
}

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct CloseBody {
    #[serde(default = "yes")]
    settle: bool,
}

fn yes() -> bool {
    true
}

async fn close_window(
    State(state): State<AppState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    handle(
        state,
        method,
        uri,
        headers,
        body,
        |state, caller, body| async move {
            let request: CloseBody = if body.is_empty() {
                CloseBody { settle: true }
            } else {
                json_body(&body)?
            };
            let report = state.switch.close_window(&caller, request.settle).await?;
            Ok(ok(StatusCode::OK, &report))
        },
    )
    .await
}

async fn settle_window(
    State(state): State<AppState>,
    WindowNumber(window): WindowNumber,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    handle(
        state,
        method,
        uri,
        headers,
        body,
        |state, caller, _| async move {
            Ok(ok(
                StatusCode::OK,
                &state.switch.settle_window(&caller, window).await?,
            ))
        },
    )
    .await
}

async fn list_windows(
    State(state): State<AppState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    handle(
        state,
        method,
        uri,
        headers,
        body,
        |state, caller, _| async move {
            Ok(ok(
                StatusCode::OK,
                &state
                    .switch
                    .windows(&caller, crate::clearing::WINDOWS_LISTED_MAX)
                    .await?,
            ))
        },
    )
    .await
}

async fn get_window(
    State(state): State<AppState>,
    WindowNumber(window): WindowNumber,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> Response {
    handle(
        state,
        method,
        uri,
        headers,
        body,
        |state, caller, _| async move {
            let report = state.switch.window_report(&caller, window).await?;
            let typed = |content_type: &'static str, text: String| {
                ([(axum::http::header::CONTENT_TYPE, content_type)], text).into_response()
            };
            match query_text(query.as_deref(), "format").unwrap_or("json") {
                "json" => Ok(ok(StatusCode::OK, &report)),
                "csv" => Ok(typed("text/csv", report.to_csv())),
                "svg" => Ok(typed("image/svg+xml", report.to_svg())),
                other => Err(ApiError::new(
                    400,
                    "invalid_query",
                    format!("format {other:?} is not one of json, csv, svg"),
                )
                .with_reason("FF01")),
            }
        },
    )
    .await
}

async fn statements(
    State(state): State<AppState>,
    WindowNumber(window): WindowNumber,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> Response {
    handle(
        state,
        method,
        uri,
        headers,
        body,
        |state, caller, _| async move {
            let participant = query_text(query.as_deref(), "participant");
            let statements = state
                .switch
                .statements(&caller, window, participant)
                .await?;
            match query_text(query.as_deref(), "format").unwrap_or("json") {
                "json" => Ok(ok(StatusCode::OK, &statements)),
                "csv" => {
                    let mut out = Vec::new();
                    for statement in &statements {
                        statement
                            .write_csv(&mut out)
                            .map_err(|e| ApiError::new(500, "internal", e.to_string()))?;
                    }
                    Ok(([(axum::http::header::CONTENT_TYPE, "text/csv")], out).into_response())
                }
                "camt054" => {
                    let xml = crate::clearing::statement_camt054(
                        &statements,
                        &format!("NTFC-W{window}-{}", participant.unwrap_or("own")),
                    )?;
                    Ok(
                        ([(axum::http::header::CONTENT_TYPE, "application/xml")], xml)
                            .into_response(),
                    )
                }
                "camt053" => {
                    let xml = crate::clearing::statement_camt053(
                        &statements,
                        &format!("STMT-W{window}-{}", participant.unwrap_or("own")),
                    )?;
                    Ok(
                        ([(axum::http::header::CONTENT_TYPE, "application/xml")], xml)
                            .into_response(),
                    )
                }
                other => Err(ApiError::new(
                    400,
                    "invalid_query",
                    format!("format {other:?} is not one of json, csv, camt053, camt054"),
                )
                .with_reason("FF01")),
            }
        },
    )
    .await
}

async fn vouchers(
    State(state): State<AppState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> Response {
    handle(
        state,
        method,
        uri,
        headers,
        body,
        |state, caller, _| async move {
            let from = query_number(query.as_deref(), "from")?.unwrap_or(1);
            let limit = query_number(query.as_deref(), "limit")?.unwrap_or(1_000);
            let page = state
                .switch
                .vouchers(&caller, from, limit.min(usize::MAX as u64) as usize)
                .await?;
            Ok(ok(StatusCode::OK, &page))
        },
    )
    .await
}

/// The live dashboard: one self-contained page (no external assets); it signs its own API calls.
async fn dashboard_page() -> Response {
    (
        [
            (axum::http::header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (
                axum::http::header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:",
            ),
        ],
        include_str!("dashboard.html"),
    )
        .into_response()
}

async fn dashboard_data(
    State(state): State<AppState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    handle(
        state,
        method,
        uri,
        headers,
        body,
        |state, caller, _| async move {
            Ok(ok(StatusCode::OK, &state.switch.dashboard(&caller).await?))
        },
    )
    .await
}

async fn recall_camt056(
    State(state): State<AppState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    handle(
        state,
        method,
        uri,
        headers,
        body,
        |state, caller, body| async move {
            let request =
                match clearhouse_iso20022::recall::Camt056::parse(&body, &crate::iso::limits()) {
                    Ok(request) => request,
                    Err(e) => {
                        return iso_refusal(
                            ApiError::new(400, "invalid_message", e.to_string())
                                .with_reason("FF01"),
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
        },
    )
    .await
}

fn caller_bic(caller: &Caller) -> String {
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
fn iso_refusal(error: ApiError, reference: &str) -> Result<Response, ApiError> {
    match error.reason.unwrap_or(error.code) {
        reason
            if (400..500).contains(&error.status) && error.status != 401 && error.status != 403 =>
        {
            let reject = clearhouse_iso20022::admi::Admi002 {
                related_reference: reference.to_string(),
                reason: reason.to_string(),
                rejected_at: Some(clearhouse_iso20022::time::date_time(crate::switch::now_ns())),
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

async fn recall_camt029(
    State(state): State<AppState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    handle(
        state,
        method,
        uri,
        headers,
        body,
        |state, caller, body| async move {
            let resolution =
                match clearhouse_iso20022::recall::Camt029::parse(&body, &crate::iso::limits()) {
                    Ok(resolution) => resolution,
                    Err(e) => {
                        return iso_refusal(
                            ApiError::new(400, "invalid_message", e.to_string())
                                .with_reason("FF01"),
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
        },
    )
    .await
}

async fn get_recall(
    State(state): State<AppState>,
    Path(id): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    handle(
        state,
        method,
        uri,
        headers,
        body,
        |state, caller, _| async move {
            Ok(ok(
                StatusCode::OK,
                &state.switch.recall_status(&caller, &id).await?,
            ))
        },
    )
    .await
}

async fn openapi() -> Response {
    (
        [("content-type", "application/json")],
        include_str!("openapi.json"),
    )
        .into_response()
}

async fn health() -> &'static str {
    "ok\n"
}

/// Readiness: 200 while the engine takes work, 503 once it stopped (disk or journal failure).
async fn ready(State(state): State<AppState>) -> Response {
    if state.switch.ready() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "engine stopped\n").into_response()
    }
}

/// Prometheus metrics (aggregates only: no participant data), unauthenticated for scrapers.
async fn metrics(State(state): State<AppState>) -> Response {
    (
        [("content-type", "text/plain; version=0.0.4")],
        state.switch.render_metrics_full().await,
    )
        .into_response()
}

/// GET /v1/admin/metrics: the operator's Prometheus text, signed like every API call: the
/// aggregates of `/metrics` plus per-participant liquidity (confidential, so not on `/metrics`).
async fn operator_metrics(
    State(state): State<AppState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    handle(
        state,
        method,
        uri,
        headers,
        body,
        |state, caller, _| async move {
            operator_only(&caller)?;
            Ok((
                [("content-type", "text/plain; version=0.0.4")],
                state.switch.render_operator_metrics().await,
            )
                .into_response())
        },
    )
    .await
}

async fn fallback() -> Response {
    ApiError::new(404, "no_route", "no such endpoint; see /openapi.json").into_response()
}

pub fn router(switch: Arc<Switch>) -> Router {
    let body_max = switch.config.body_bytes_max;
    let rates = Arc::new(RateLimiter::new(
        switch.config.participant_requests_per_second,
        switch.config.participant_requests_burst,
    ));
    let state = AppState {
        switch,
        requests: Arc::new(Semaphore::new(CONCURRENT_REQUESTS_MAX)),
        rates,
    };
    Router::new()
        .route("/v1/payments", post(submit_payment).get(query_payment))
        .route("/v1/payments/{id}", get(get_payment))
        .route("/v1/payments/{id}/decision", post(decide))
        .route("/v1/payments/{id}/pacs.002", get(get_payment_pacs002))
        .route("/v1/iso20022/pacs.008", post(submit_pacs008))
        .route("/v1/iso20022/pacs.028", post(status_pacs028))
        .route("/v1/iso20022/pacs.004", post(return_pacs004))
        .route("/v1/payments/{id}/return", post(return_payment))
        .route("/v1/participants/{bic}", get(participant))
        .route("/v1/participants/{bic}/positions", get(positions))
        .route("/v1/admin/participants", post(onboard))
        .route("/v1/admin/participants/{bic}", patch(change))
        .route("/v1/admin/participants/{bic}/liquidity", post(liquidity))
        .route("/v1/stats", get(stats))
        .route("/v1/admin/metrics", get(operator_metrics))
        .route("/v1/admin/windows/close", post(close_window))
        .route("/v1/admin/windows/{window}/settle", post(settle_window))
        .route("/v1/windows", get(list_windows))
        .route("/v1/windows/{window}", get(get_window))
        .route("/v1/windows/{window}/statement", get(statements))
        .route("/v1/vouchers", get(vouchers))
        .route("/v1/dashboard", get(dashboard_data))
        .route("/v1/iso20022/camt.056", post(recall_camt056))
        .route("/v1/iso20022/camt.029", post(recall_camt029))
        .route("/v1/recalls/{id}", get(get_recall))
        .route("/dashboard", get(dashboard_page))
        .route("/openapi.json", get(openapi))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .fallback(fallback)
        .layer(DefaultBodyLimit::max(body_max))
        .layer(axum::middleware::from_fn(move |request, next| {
            body_in_time(request, next, body_max)
        }))
        .with_state(state)
}

/// Reads the whole body, bounded in size and in time, before any handler runs: a slow client
/// gets 408 and its connection back, an oversized body 413, and neither holds a request slot.
async fn body_in_time(
    request: axum::extract::Request,
    next: axum::middleware::Next,
    body_max: usize,
) -> Response {
    let declared = request
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let too_large = || {
        ApiError::new(
            413,
            "body_too_large",
            format!("the body is larger than {body_max} bytes"),
        )
        .into_response()
    };
    if declared.is_some_and(|length| length > body_max as u64) {
        return too_large();
    }
    let (parts, body) = request.into_parts();
    match tokio::time::timeout(BODY_READ_TIMEOUT, axum::body::to_bytes(body, body_max)).await {
        Err(_) => ApiError::new(
            408,
            "request_timeout",
            format!(
                "the body did not arrive within {} s",
                BODY_READ_TIMEOUT.as_secs()
            ),
        )
        .into_response(),
        Ok(Err(error)) => {
            let limit = std::error::Error::source(&error)
                .is_some_and(|e| e.is::<http_body_util::LengthLimitError>());
            if limit {
                too_large()
            } else {
                ApiError::new(400, "bad_body", format!("reading the body: {error}")).into_response()
            }
        }
        Ok(Ok(bytes)) => {
            next.run(axum::extract::Request::from_parts(
                parts,
                axum::body::Body::from(bytes),
            ))
            .await
        }
    }
}

/// Serves the API on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    switch: Arc<Switch>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    accept_loop(listener, router(switch), None, shutdown).await
}

/// Most TLS connections open at once (the same bound as plain connections).
pub const TLS_CONNECTIONS_MAX: usize = CONNECTIONS_MAX;
/// A TLS handshake must finish within this.
const TLS_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A TLS acceptor from PEM files (certificate chain, private key), TLS 1.2/1.3 with rustls.
pub fn tls_acceptor(
    cert_pem: &std::path::Path,
    key_pem: &std::path::Path,
) -> Result<tokio_rustls::TlsAcceptor, std::io::Error> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    use tokio_rustls::rustls;
    let invalid = |what: &str, e: &dyn std::fmt::Display| {
        std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{what}: {e}"))
    };
    let certs = CertificateDer::pem_file_iter(cert_pem)
        .map_err(|e| invalid(&cert_pem.display().to_string(), &e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(&cert_pem.display().to_string(), &e))?;
    let key = PrivateKeyDer::from_pem_file(key_pem)
        .map_err(|e| invalid(&key_pem.display().to_string(), &e))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| invalid("TLS versions", &e))?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| invalid("certificate and key", &e))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Serves the API over TLS on `listener` until `shutdown` completes.
pub async fn serve_tls(
    listener: tokio::net::TcpListener,
    switch: Arc<Switch>,
    acceptor: tokio_rustls::TlsAcceptor,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    accept_loop(listener, router(switch), Some(acceptor), shutdown).await
}

/// Accepts connections (at most [`CONNECTIONS_MAX`] open), each served by HTTP/1.1 with a header
/// read timeout; on shutdown stops accepting, lets open connections finish their requests (idle
/// ones close), and waits for them up to [`SHUTDOWN_DRAIN`].
async fn accept_loop(
    listener: tokio::net::TcpListener,
    router: Router,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let connections = Arc::new(Semaphore::new(CONNECTIONS_MAX));
    let (stopping, stop) = tokio::sync::watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            _ = &mut shutdown => break,
            permit = connections.clone().acquire_owned() => permit.expect("never closed"),
        };
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let (router, tls, stop) = (router.clone(), tls.clone(), stop.clone());
        tokio::spawn(async move {
            let _permit = permit;
            match tls {
                None => serve_connection(hyper_util::rt::TokioIo::new(stream), router, stop).await,
                Some(acceptor) => {
                    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await
                    {
                        Ok(Ok(tls)) => {
                            serve_connection(hyper_util::rt::TokioIo::new(tls), router, stop).await
                        }
                        _ => tracing::debug!(%peer, "TLS handshake failed or timed out"),
                    }
                }
            }
        });
    }
    drop(listener);
    let _ = stopping.send(true);
    let all = u32::try_from(CONNECTIONS_MAX).expect("fits");
    let _ = tokio::time::timeout(SHUTDOWN_DRAIN, connections.acquire_many(all)).await;
    Ok(())
}

async fn serve_connection<I>(io: I, router: Router, mut stop: tokio::sync::watch::Receiver<bool>)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let service = hyper_util::service::TowerToHyperService::new(router);
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(io, service);
    tokio::pin!(connection);
    tokio::select! {
        _ = connection.as_mut() => {}
        _ = stop.changed() => {
            connection.as_mut().graceful_shutdown();
            let _ = connection.await;
        }
    }
}
