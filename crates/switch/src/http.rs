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

mod admin;
mod iso;
mod payments;

use admin::*;
use iso::*;
use payments::*;

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

/// A signed request, admitted: a slot among the concurrent requests (503 when none is free), a
/// verified signature (401), and the caller within its rate (429). Handlers take it as their
/// last argument, `Signed(state, caller, body, _permit)`; the slot is held until the handler
/// answers.
struct Signed(
    AppState,
    Caller,
    Bytes,
    /// Held until the handler answers.
    tokio::sync::OwnedSemaphorePermit,
);

impl axum::extract::FromRequest<AppState> for Signed {
    type Rejection = Response;

    async fn from_request(
        request: axum::extract::Request,
        state: &AppState,
    ) -> Result<Signed, Response> {
        // The headers are taken out (not copied) for the signature check; the body extractor
        // does not read them.
        let (mut parts, body) = request.into_parts();
        let headers = std::mem::take(&mut parts.headers);
        let (method, uri) = (parts.method.clone(), parts.uri.clone());
        let body = Bytes::from_request(axum::extract::Request::from_parts(parts, body), state)
            .await
            .map_err(IntoResponse::into_response)?;
        let Ok(permit) = state.requests.clone().try_acquire_owned() else {
            return Err(
                ApiError::new(503, "server_busy", "too many requests in progress")
                    .retry_after(1)
                    .into_response(),
            );
        };
        let caller = authenticate(state, &method, &uri, &headers, &body)
            .map_err(IntoResponse::into_response)?;
        if let Caller::Participant(bic) = &caller {
            if !state.rates.admit(bic, std::time::Instant::now()) {
                return Err(ApiError::new(
                    429,
                    "rate_limited",
                    format!(
                        "more than {} requests per second from {bic}",
                        state.switch.config.participant_requests_per_second
                    ),
                )
                .retry_after(1)
                .into_response());
            }
        }
        Ok(Signed(state.clone(), caller, body, permit))
    }
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

/// Serves a router built on [`router`] (with layers of the caller's, e.g. a replicated leader's
/// lease check) on `listener`, plain HTTP, until `shutdown` completes.
pub async fn serve_router(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    accept_loop(listener, router, None, shutdown).await
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
