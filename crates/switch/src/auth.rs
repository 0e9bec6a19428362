//! Signed requests, both directions: participant -> switch and switch -> participant.
//!
//! Each request carries four headers: key id, timestamp (Unix milliseconds), nonce (16-64
//! characters), and an HMAC-SHA256 signature (hex) over
//! `METHOD \n PATH?QUERY \n TIMESTAMP \n NONCE \n hex(SHA-256(body))`.
//! The receiver refuses unknown keys, bad signatures, timestamps outside the allowed skew and any
//! nonce already seen within that window (replays).

use std::collections::VecDeque;
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
    if skew_ms.unsigned_abs() > u128::from(nonces.window_ms) {
        return Err(AuthError::Stale {
            skew_ms: skew_ms.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64,
            allowed_ms: nonces.window_ms,
        });
    }
    if !(16..=64).contains(&headers.nonce.len()) {
        return Err(AuthError::MissingHeader(HEADER_NONCE));
    }
    let expected = hex::decode(headers.signature).map_err(|_| AuthError::BadSignature)?;
    mac(secret, method, path, headers.timestamp, headers.nonce, body)
        .verify_slice(&expected)
        .map_err(|_| AuthError::BadSignature)?;
    nonces.check_and_insert(headers.key_id, headers.nonce, timestamp, now_ms)
}

/// Nonces seen within the replay window (± the allowed clock skew), bounded.
pub struct NonceCache {
    pub window_ms: u64,
    max: usize,
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
    pub fn new(window_ms: u64, max: usize) -> NonceCache {
        NonceCache {
            window_ms,
            max,
            inner: Mutex::new(NonceState::default()),
        }
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
