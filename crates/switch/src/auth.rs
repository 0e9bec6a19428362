//! Signed requests, both directions: participant -> switch and switch -> participant.
//!
//! Each request carries four headers: key id, timestamp (Unix milliseconds), nonce (16-64
//! characters), and an HMAC-SHA256 signature (hex) over
//! `METHOD \n PATH?QUERY \n TIMESTAMP \n NONCE \n hex(SHA-256(body))`.
//! The receiver refuses unknown keys, bad signatures, timestamps outside the allowed skew (lagging
//! by at most `window_ms`, leading by at most `lead_ms`) and any nonce already seen within that
//! window (replays).
//!
//! Replays across restarts: the nonces live in memory only (no fsync on the request path), so a
//! cache also refuses every timestamp earlier than the moment its process started serving plus
//! the allowed lead (`not_before_ms`). Any request an earlier process accepted was signed before
//! that process died plus the lead, hence before `not_before_ms`: it cannot be accepted again. A
//! client refused this way (`AuthError::SignedBeforeStart`) signs again with a fresh timestamp.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::sync::Mutex;

use hmac::{Hmac, Mac};
use rustc_hash::FxHashSet;
use sha2::{Digest, Sha256};

pub const HEADER_KEY_ID: &str = "x-ch-key-id";
pub const HEADER_TIMESTAMP: &str = "x-ch-timestamp";
pub const HEADER_NONCE: &str = "x-ch-nonce";
pub const HEADER_SIGNATURE: &str = "x-ch-signature";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing or malformed header {0}")]
    MissingHeader(&'static str),
    #[error("unknown key id")]
    UnknownKey,
    #[error("timestamp is {skew_ms} ms away from the switch's clock (allowed: {allowed_ms} ms)")]
    Stale { skew_ms: i64, allowed_ms: u64 },
    #[error("signature does not match")]
    BadSignature,
    #[error("nonce already used within the replay window")]
    Replayed,
    #[error("signed at {timestamp_ms}, before this node started serving at {not_before_ms} (Unix ms): sign the request again with a fresh timestamp")]
    SignedBeforeStart {
        timestamp_ms: u64,
        not_before_ms: u64,
    },
    #[error("too many recent nonces; retry shortly")]
    NonceCacheFull,
}

pub fn body_digest_hex(body: &[u8]) -> String {
    hex::encode(Sha256::digest(body))
}

fn mac(
    secret: &[u8],
    method: &str,
    path: &str,
    timestamp: &str,
    nonce: &str,
    body: &[u8],
) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    for part in [method, path, timestamp, nonce] {
        mac.update(part.as_bytes());
        mac.update(b"\n");
    }
    mac.update(body_digest_hex(body).as_bytes());
    mac
}

/// The signature of a request, hex.
pub fn signature(
    secret: &[u8],
    method: &str,
    path: &str,
    timestamp: &str,
    nonce: &str,
    body: &[u8],
) -> String {
    hex::encode(
        mac(secret, method, path, timestamp, nonce, body)
            .finalize()
            .into_bytes(),
    )
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub fn new_nonce() -> String {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).expect("operating system randomness");
    hex::encode(b)
}

/// The four headers for a request signed now with a fresh nonce.
pub fn sign_request(
    key_id: &str,
    secret: &[u8],
    method: &str,
    path: &str,
    body: &[u8],
) -> [(&'static str, String); 4] {
    let timestamp = now_ms().to_string();
    let nonce = new_nonce();
    let sig = signature(secret, method, path, &timestamp, &nonce, body);
    [
        (HEADER_KEY_ID, key_id.to_string()),
        (HEADER_TIMESTAMP, timestamp),
        (HEADER_NONCE, nonce),
        (HEADER_SIGNATURE, sig),
    ]
}

/// The signed headers of one incoming request, as received.
pub struct SignedHeaders<'a> {
    pub key_id: &'a str,
    pub timestamp: &'a str,
    pub nonce: &'a str,
    pub signature: &'a str,
}

impl<'a> SignedHeaders<'a> {
    /// The four headers of an HTTP request (empty when absent: the signature check fails).
    pub fn of_http(headers: &'a axum::http::HeaderMap) -> SignedHeaders<'a> {
        let get = |name| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
        };
        SignedHeaders {
            key_id: get(HEADER_KEY_ID),
            timestamp: get(HEADER_TIMESTAMP),
            nonce: get(HEADER_NONCE),
            signature: get(HEADER_SIGNATURE),
        }
    }
}

/// Checks a request's signature with `secret`, its timestamp against `now_ms`, and its nonce
/// against `nonces` (recorded only when everything else holds).
pub fn verify(
    headers: &SignedHeaders<'_>,
    secret: &[u8],
    method: &str,
    path: &str,
    body: &[u8],
    now_ms: u64,
    nonces: &NonceCache,
) -> Result<(), AuthError> {
    let timestamp: u64 = headers
        .timestamp
        .parse()
        .map_err(|_| AuthError::MissingHeader(HEADER_TIMESTAMP))?;
    // In i128: any u64 timestamp minus any u64 now fits (found by fuzzing: 2^63 overflowed i64).
    let skew_ms = i128::from(timestamp) - i128::from(now_ms);
    let allowed_ms = if skew_ms > 0 {
        nonces.lead_ms
    } else {
        nonces.window_ms
    };
    if skew_ms.unsigned_abs() > u128::from(allowed_ms) {
        return Err(AuthError::Stale {
            skew_ms: skew_ms.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64,
            allowed_ms,
        });
    }
    if !(16..=64).contains(&headers.nonce.len()) {
        return Err(AuthError::MissingHeader(HEADER_NONCE));
    }
    let expected = hex::decode(headers.signature).map_err(|_| AuthError::BadSignature)?;
    mac(secret, method, path, headers.timestamp, headers.nonce, body)
        .verify_slice(&expected)
        .map_err(|_| AuthError::BadSignature)?;
    // After the signature: only a genuine request learns when this node started.
    let not_before_ms = nonces.not_before_ms();
    if timestamp < not_before_ms {
        return Err(AuthError::SignedBeforeStart {
            timestamp_ms: timestamp,
            not_before_ms,
        });
    }
    nonces.check_and_insert(headers.key_id, headers.nonce, timestamp, now_ms)
}

/// Checks only a message's signature (key, method, path, timestamp, nonce, body), not its age
/// or nonce: for messages that wait in a queue (AMQP), whose freshness and replays the
/// receiver bounds in its own way (a maximum age; idempotent instructions).
pub fn verify_signature(
    headers: &SignedHeaders<'_>,
    secret: &[u8],
    method: &str,
    path: &str,
    body: &[u8],
) -> Result<(), AuthError> {
    if !(16..=64).contains(&headers.nonce.len()) {
        return Err(AuthError::MissingHeader(HEADER_NONCE));
    }
    let expected = hex::decode(headers.signature).map_err(|_| AuthError::BadSignature)?;
    mac(secret, method, path, headers.timestamp, headers.nonce, body)
        .verify_slice(&expected)
        .map_err(|_| AuthError::BadSignature)
}

/// Nonces seen within the replay window (± the allowed clock skew), bounded; and the earliest
/// timestamp this process accepts (see the module's comment on replays across restarts).
pub struct NonceCache {
    pub window_ms: u64,
    /// How far a timestamp may lead the receiver's clock.
    pub lead_ms: u64,
    max: usize,
    not_before_ms: AtomicU64,
    inner: Mutex<NonceState>,
}

#[derive(Default)]
struct NonceState {
    seen: FxHashSet<u128>,
    /// (expires at ms, key), in insertion order; expiry is insertion time + 2 windows, so the
    /// queue is ordered by expiry.
    order: VecDeque<(u64, u128)>,
}

impl NonceCache {
    /// A cache that accepts timestamps `window_ms` either side of the clock and has no start
    /// moment (a receiver whose replays across restarts do not matter, or a test).
    pub fn new(window_ms: u64, max: usize) -> NonceCache {
        NonceCache {
            window_ms,
            lead_ms: window_ms,
            max,
            not_before_ms: AtomicU64::new(0),
            inner: Mutex::new(NonceState::default()),
        }
    }

    /// A cache for a node that starts serving at `started_ms`: timestamps may lag by `window_ms`
    /// and lead by `lead_ms`, and none earlier than `started_ms + lead_ms` is accepted.
    pub fn serving_from(window_ms: u64, lead_ms: u64, max: usize, started_ms: u64) -> NonceCache {
        let mut cache = NonceCache::new(window_ms, max);
        cache.lead_ms = lead_ms;
        cache.serve_from(started_ms);
        cache
    }

    /// The earliest signature timestamp accepted.
    pub fn not_before_ms(&self) -> u64 {
        self.not_before_ms.load(AtomicOrdering::SeqCst)
    }

    /// The node (again) starts serving at `started_ms` (for instance as a new leader): from now
    /// on nothing signed before `started_ms + lead_ms` is accepted. Never moves backwards.
    pub fn serve_from(&self, started_ms: u64) {
        self.not_before_ms.fetch_max(
            started_ms.saturating_add(self.lead_ms),
            AtomicOrdering::SeqCst,
        );
    }

    fn check_and_insert(
        &self,
        key_id: &str,
        nonce: &str,
        _timestamp: u64,
        now_ms: u64,
    ) -> Result<(), AuthError> {
        let key = crate::model::id128(&[key_id.as_bytes(), nonce.as_bytes()]);
        let mut state = self.inner.lock().expect("nonce cache");
        while let Some(&(expires, old)) = state.order.front() {
            if expires > now_ms {
                break;
            }
            state.order.pop_front();
            state.seen.remove(&old);
        }
        if state.seen.contains(&key) {
            return Err(AuthError::Replayed);
        }
        if state.seen.len() >= self.max {
            return Err(AuthError::NonceCacheFull);
        }
        // A timestamp is accepted up to one window either side of now, so a nonce must be
        // remembered for two windows from now.
        state.seen.insert(key);
        state.order.push_back((now_ms + 2 * self.window_ms, key));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_timestamp_is_refused_cleanly() {
        // Found by fuzzing: a timestamp of 2^63 and beyond overflowed the skew computation.
        let cache = NonceCache::new(30_000, 3);
        for timestamp in ["9223372036854775808", "18446744073709551615", "+0", "0"] {
            let headers = SignedHeaders {
                key_id: "k",
                timestamp,
                nonce: "0123456789abcdef",
                signature: "00",
            };
            assert!(matches!(
                verify(&headers, b"s", "GET", "/", b"", 1_795_591_845_000, &cache),
                Err(AuthError::Stale { .. })
            ));
        }
    }

    /// A request signed before the node started serving (captured from an earlier process) is
    /// refused even though its nonce is unknown to this process; one signed after is accepted;
    /// the lead is bounded separately from the lag.
    #[test]
    fn nothing_signed_before_the_start_is_accepted() {
        let started = 5_000_000;
        let cache = NonceCache::serving_from(30_000, 2_000, 100, started);
        let secret = b"secret";
        let check = |ts: u64, nonce: &str, now: u64| {
            let text = ts.to_string();
            let sig = signature(secret, "GET", "/", &text, nonce, b"");
            let headers = SignedHeaders {
                key_id: "k",
                timestamp: &text,
                nonce,
                signature: &sig,
            };
            verify(&headers, secret, "GET", "/", b"", now, &cache)
        };
        // Captured just before a kill at `started - 1`, replayed right after the restart: inside
        // the skew, unknown nonce, yet refused.
        assert_eq!(
            check(started - 1, "captured-before-kill", started + 10),
            Err(AuthError::SignedBeforeStart {
                timestamp_ms: started - 1,
                not_before_ms: started + 2_000
            })
        );
        // A clock leading by up to the lead could have signed `started + 1_999` before the kill.
        assert!(matches!(
            check(started + 1_999, "leading-clock-nonce", started + 10),
            Err(AuthError::SignedBeforeStart { .. })
        ));
        // Leading by more than the lead: stale, whatever the start.
        assert!(matches!(
            check(started + 20_000, "too-far-ahead-nonce", started + 10),
            Err(AuthError::Stale {
                allowed_ms: 2_000,
                ..
            })
        ));
        // Signed again after the start: accepted once, then a replay.
        let now = started + 2_500;
        assert_eq!(check(now, "signed-after-start", now), Ok(()));
        assert_eq!(
            check(now, "signed-after-start", now),
            Err(AuthError::Replayed)
        );
        // Lagging by up to the window is still fine.
        assert_eq!(check(now, "lagging-clock-nonce", now + 29_000), Ok(()));
        // Becoming leader again moves the start forward, never back.
        cache.serve_from(started + 10_000);
        assert!(matches!(
            check(now + 1, "before-new-start", now + 2),
            Err(AuthError::SignedBeforeStart { .. })
        ));
        cache.serve_from(0);
        assert_eq!(cache.not_before_ms(), started + 12_000);
    }

    #[test]
    fn signatures_bind_every_part_and_nonces_do_not_replay() {
        let cache = NonceCache::new(30_000, 3);
        let secret = b"secret";
        let now = 1_000_000;
        let ts = now.to_string();
        let sig = signature(
            secret,
            "POST",
            "/v1/payments",
            &ts,
            "0123456789abcdef",
            b"{}",
        );
        let headers = SignedHeaders {
            key_id: "k",
            timestamp: &ts,
            nonce: "0123456789abcdef",
            signature: &sig,
        };
        for (method, path, body, secret) in [
            ("GET", "/v1/payments", &b"{}"[..], &secret[..]),
            ("POST", "/v1/payment", b"{}", secret),
            ("POST", "/v1/payments", b"{ }", secret),
            ("POST", "/v1/payments", b"{}", b"other"),
        ] {
            assert_eq!(
                verify(&headers, secret, method, path, body, now, &cache),
                Err(AuthError::BadSignature)
            );
        }
        assert_eq!(
            verify(&headers, secret, "POST", "/v1/payments", b"{}", now, &cache),
            Ok(())
        );
        assert_eq!(
            verify(&headers, secret, "POST", "/v1/payments", b"{}", now, &cache),
            Err(AuthError::Replayed)
        );
        assert!(matches!(
            verify(
                &headers,
                secret,
                "POST",
                "/v1/payments",
                b"{}",
                now + 30_001,
                &cache
            ),
            Err(AuthError::Stale { .. })
        ));
        // Forgotten only after two windows.
        assert_eq!(
            verify(
                &headers,
                secret,
                "POST",
                "/v1/payments",
                b"{}",
                now + 30_000,
                &cache
            ),
            Err(AuthError::Replayed)
        );
        for i in 0..2 {
            let nonce = format!("nonce-number-{i:04}");
            let sig = signature(secret, "GET", "/", &ts, &nonce, b"");
            let h = SignedHeaders {
                key_id: "k",
                timestamp: &ts,
                nonce: &nonce,
                signature: &sig,
            };
            assert_eq!(verify(&h, secret, "GET", "/", b"", now, &cache), Ok(()));
        }
        let sig = signature(secret, "GET", "/", &ts, "one-nonce-too-many", b"");
        let h = SignedHeaders {
            key_id: "k",
            timestamp: &ts,
            nonce: "one-nonce-too-many",
            signature: &sig,
        };
        assert_eq!(
            verify(&h, secret, "GET", "/", b"", now, &cache),
            Err(AuthError::NonceCacheFull)
        );
    }
}
