//! Simulated participant banks, for the demo, the benchmark and the end-to-end tests: one HTTP
//! server hosting many banks under `/bank/{BIC}`. Each bank verifies the switch's signature,
//! then accepts or rejects (AC04) incoming payments (a fixed share, chosen by payment id so a
//! retry gets the same answer) after a configurable delay, or defers and decides later through
//! the switch's decision API. This is a stand-in for the banks' systems, not part of the switch.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;

use crate::auth::{self, NonceCache, SignedHeaders};
use crate::client::SignedClient;
use crate::outbound::{Notification, SWITCH_KEY_ID};
use crate::switch::PaymentView;

#[derive(Clone, Debug)]
pub struct SimBank {
    pub bic: String,
    pub secret: Vec<u8>,
}

#[derive(Clone, Debug)]
pub struct SimOptions {
    /// Per ten thousand payments, how many are rejected with AC04 (100 = 1 %).
    pub reject_per_10k: u32,
    pub delay: Duration,
    /// Answer 202 and send the decision later through the switch's API.
    pub defer: bool,
    /// The switch, for deferred decisions (none: deferred payments are never decided).
    pub switch_url: Option<String>,
}

#[derive(Default)]
pub struct SimCounters {
    pub payments: AtomicU64,
    pub rejected: AtomicU64,
    pub notifications: AtomicU64,
    pub bad_signatures: AtomicU64,
}

struct SimState {
    banks: HashMap<String, SimBank>,
    options: SimOptions,
    nonces: NonceCache,
    counters: Arc<SimCounters>,
}

/// The bank a request is for, if the switch signed it; otherwise the status to answer (404, or
/// 401 counting the bad signature).
fn admit<'a>(
    state: &'a SimState,
    bic: &str,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<&'a SimBank, StatusCode> {
    let bank = state.banks.get(bic).ok_or(StatusCode::NOT_FOUND)?;
    let signed = SignedHeaders::of_http(headers);
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let verified = signed.key_id == SWITCH_KEY_ID
        && auth::verify(
            &signed,
            &bank.secret,
            method.as_str(),
            path,
            body,
            auth::now_ms(),
            &state.nonces,
        )
        .is_ok();
    if !verified {
        state
            .counters
            .bad_signatures
            .fetch_add(1, Ordering::Relaxed);
        return Err(StatusCode::UNAUTHORIZED);
    }
    Ok(bank)
}

/// Whether the simulated bank rejects this payment (stable per payment id).
pub fn rejects(payment_id: &str, reject_per_10k: u32) -> bool {
    let h = crate::model::id128(&[b"sim-decision", payment_id.as_bytes()]);
    (h % 10_000) < u128::from(reject_per_10k)
}

async fn payment(
    State(state): State<Arc<SimState>>,
    Path(bic): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let bank = match admit(&state, &bic, &method, &uri, &headers, &body) {
        Ok(bank) => bank,
        Err(answer) => return answer.into_response(),
    };
    let Ok(payment) = serde_json::from_slice::<PaymentView>(&body) else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    state.counters.payments.fetch_add(1, Ordering::Relaxed);
    let reject = rejects(&payment.payment_id, state.options.reject_per_10k);
    if reject {
        state.counters.rejected.fetch_add(1, Ordering::Relaxed);
    }
    let answer = if reject {
        serde_json::json!({"status": "RJCT", "reason": "AC04"})
    } else {
        serde_json::json!({"status": "ACCP"})
    };
    if state.options.defer {
        // Without a switch URL the bank never decides (a creditor agent that goes silent).
        if let Some(url) = state.options.switch_url.clone() {
            let client = SignedClient::new(&url, &format!("{bic}-1"), bank.secret.clone());
            let delay = state.options.delay;
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let path = format!("/v1/payments/{}/decision", payment.payment_id);
                let _ = client
                    .request("POST", &path, answer.to_string().as_bytes())
                    .await;
            });
        }
        return StatusCode::ACCEPTED.into_response();
    }
    if !state.options.delay.is_zero() {
        tokio::time::sleep(state.options.delay).await;
    }
    (StatusCode::OK, axum::Json(answer)).into_response()
}

async fn notifications(
    State(state): State<Arc<SimState>>,
    Path(bic): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(answer) = admit(&state, &bic, &method, &uri, &headers, &body) {
        return answer.into_response();
    }
    match serde_json::from_slice::<Vec<Notification>>(&body) {
        Ok(list) => {
            state
                .counters
                .notifications
                .fetch_add(list.len() as u64, Ordering::Relaxed);
            StatusCode::NO_CONTENT.into_response()
        }
        Err(_) => StatusCode::BAD_REQUEST.into_response(),
    }
}

/// The banks' router; `counters` tells what they saw.
pub fn router(banks: Vec<SimBank>, options: SimOptions, counters: Arc<SimCounters>) -> Router {
    let state = Arc::new(SimState {
        banks: banks.into_iter().map(|b| (b.bic.clone(), b)).collect(),
        options,
        nonces: NonceCache::new(30_000, 4_000_000),
        counters,
    });
    Router::new()
        .route("/bank/{bic}/payments", post(payment))
        .route("/bank/{bic}/notifications", post(notifications))
        .layer(axum::extract::DefaultBodyLimit::max(4 * 1024 * 1024))
        .with_state(state)
}
