//! A signed HTTP client for the switch's API: what participants, the operator CLI, the
//! simulated banks, the demo and the benchmark use.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::auth;

/// Largest answer body read: a full page of the voucher chain (`VOUCHER_PAGE_MAX` = 4,096
/// vouchers, each body ≤ a few KiB as JSON; a page of settled payments is ~2.5 MB) fits with
/// room to spare.
const ANSWER_BYTES_MAX: usize = 32 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("request to {url} failed: {message}")]
    Transport { url: String, message: String },
    #[error("request to {url} timed out")]
    Timeout { url: String },
}

#[derive(Clone)]
pub struct SignedClient {
    http: Client<HttpConnector, Full<Bytes>>,
    base: String,
    key_id: String,
    secret: Vec<u8>,
    timeout: Duration,
}

impl SignedClient {
    /// `base` like `http://127.0.0.1:8080` (no trailing slash).
    pub fn new(base: &str, key_id: &str, secret: Vec<u8>) -> SignedClient {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        SignedClient {
            http: Client::builder(TokioExecutor::new())
                .pool_max_idle_per_host(1024)
                // Below the server's 10 s header read timeout, so the client never sends on an
                // idle connection the server is closing.
                .pool_idle_timeout(Duration::from_secs(5))
                .pool_timer(hyper_util::rt::TokioTimer::new())
                .build(connector),
            base: base.trim_end_matches('/').to_string(),
            key_id: key_id.to_string(),
            secret,
            timeout: Duration::from_secs(30),
        }
    }

    /// Same connection pool, other credentials.
    pub fn with_key(&self, key_id: &str, secret: Vec<u8>) -> SignedClient {
        SignedClient {
            key_id: key_id.to_string(),
            secret,
            ..self.clone()
        }
    }

    /// A signed request; returns the status and the body. A switch that (re)started moments ago
    /// refuses signatures older than its start plus the allowed clock lead (401
    /// `signed_before_start`): the request is signed again and resent, every 100 ms for at most
    /// [`RESIGN_ATTEMPTS_MAX`] attempts. Nothing was done by a refused request, so resending it
    /// is safe.
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> Result<(u16, Bytes), ClientError> {
        let mut attempt = 1;
        loop {
            let headers = auth::sign_request(&self.key_id, &self.secret, method, path, body);
            let (status, answer) = self.send(method, path, body, &headers).await?;
            if status == 401 && attempt < RESIGN_ATTEMPTS_MAX && signed_before_start(&answer) {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            return Ok((status, answer));
        }
    }

    /// A request with the given headers (tests forge and replay signatures with it).
    pub async fn send(
        &self,
        method: &str,
        path: &str,
        body: &[u8],
        headers: &[(&'static str, String)],
    ) -> Result<(u16, Bytes), ClientError> {
        let url = format!("{}{}", self.base, path);
        let transport = |message: String| ClientError::Transport {
            url: url.clone(),
            message,
        };
        let mut builder = hyper::Request::builder()
            .method(method)
            .uri(&url)
            .header("content-type", "application/json");
        for (name, value) in headers {
            builder = builder.header(*name, value);
        }
        let request = builder
            .body(Full::new(Bytes::copy_from_slice(body)))
            .map_err(|e| transport(e.to_string()))?;
        let work = async {
            let response = self
                .http
                .request(request)
                .await
                .map_err(|e| transport(e.to_string()))?;
            let status = response.status().as_u16();
            let bytes = Limited::new(response.into_body(), ANSWER_BYTES_MAX)
                .collect()
                .await
                .map_err(|e| transport(e.to_string()))?
                .to_bytes();
            Ok((status, bytes))
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| ClientError::Timeout { url: url.clone() })?
    }
}

/// Times [`SignedClient::request`] signs a request again after a `signed_before_start` refusal
/// (100 ms apart: 10 s, well past the default 2 s lead).
pub const RESIGN_ATTEMPTS_MAX: u32 = 100;

/// The answer is the switch's "signed before I started serving: sign again".
pub fn signed_before_start(answer: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(answer)
        .ok()
        .is_some_and(|v| v["code"] == "signed_before_start")
}
