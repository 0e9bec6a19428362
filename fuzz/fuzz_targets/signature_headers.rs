//! Untrusted signature headers: any key id, timestamp, nonce and signature must be refused
//! cleanly (or accepted only with the right signature), never panic.
#![no_main]

use clearhouse_switch::auth::{self, NonceCache, SignedHeaders};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.splitn(5, '\n');
    let (key_id, timestamp, nonce, signature, body) = (
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
    );
    let headers = SignedHeaders {
        key_id,
        timestamp,
        nonce,
        signature,
    };
    let nonces = NonceCache::new(30_000, 1_000);
    let now = 1_795_591_845_000;
    let secret = b"fuzzing-secret-0123456789";
    let result = auth::verify(&headers, secret, "POST", "/v1/payments", body.as_bytes(), now, &nonces);
    if result.is_ok() {
        // Only the right signature passes.
        assert_eq!(
            signature,
            auth::signature(secret, "POST", "/v1/payments", timestamp, nonce, body.as_bytes())
        );
    }
});
