//! Hostile clients over real HTTP: per-participant rate limits, slow clients (headers and bodies
//! that never finish), XML bombs (entity expansion, deep nesting) and oversized documents.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const A: &str = "ATTKDEFF";
const B: &str = "BYSTDEFF";

fn terms() -> Value {
    json!({"model": "prefunded"})
}

#[test]
fn a_participant_over_its_rate_gets_429_and_nobody_else_does() {
    let dir = tempfile::tempdir().unwrap();
    let config = clearhouse_switch::SwitchConfig {
        participant_requests_per_second: 5,
        participant_requests_burst: 5,
        ..config()
    };
    let running = start_switch(dir.path(), config);
    running.runtime.block_on(async {
        let op = operator(dir.path(), &running.url);
        onboard(&op, A, "http://127.0.0.1:9", terms()).await;
        onboard(&op, B, "http://127.0.0.1:9", terms()).await;
        let (a, b) = (client_of(&running.url, A), client_of(&running.url, B));
        let path = format!("/v1/participants/{A}/positions");
        let mut statuses = Vec::new();
        for _ in 0..12 {
            let (status, body) = call(&a, "GET", &path, Value::Null).await;
            if status == 429 {
                assert_eq!(body["code"], "rate_limited", "{body}");
            }
            statuses.push(status);
        }
        let ok = statuses.iter().filter(|&&s| s == 200).count();
        let limited = statuses.iter().filter(|&&s| s == 429).count();
        // The burst of 5 (plus what refilled at 5/s during the loop), the rest refused.
        assert!((5..=8).contains(&ok) && ok + limited == 12, "{statuses:?}");
        // Retry-After is set.
        let answer = raw_get(&running.url, A, &path).await;
        assert!(answer.starts_with("HTTP/1.1 429"), "{answer}");
        assert!(
            answer.to_ascii_lowercase().contains("retry-after: 1\r\n"),
            "{answer}"
        );
        // Another participant and the operator are not affected.
        let (status, _) = call(
            &b,
            "GET",
            &format!("/v1/participants/{B}/positions"),
            Value::Null,
        )
        .await;
        assert_eq!(status, 200);
        for _ in 0..20 {
            let (status, _) = call(&op, "GET", &path, Value::Null).await;
            assert_eq!(status, 200);
        }
        // The bucket refills: after a second, A may call again.
        tokio::time::sleep(Duration::from_millis(1_100)).await;
        let (status, _) = call(&a, "GET", &path, Value::Null).await;
        assert_eq!(status, 200);
    });
    drop(running);
}

/// A GET signed as `bic` over a raw connection: the whole response, headers included.
async fn raw_get(url: &str, bic: &str, path: &str) -> String {
    let address = url.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let mut request = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n");
    let key_id = format!("{bic}-1");
    for (name, value) in
        clearhouse_switch::auth::sign_request(&key_id, &secret(bic), "GET", path, b"")
    {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    read_until_closed(&mut stream, Duration::from_secs(10)).await
}

#[test]
fn slow_clients_are_cut_off_and_do_not_block_others() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_switch(dir.path(), config());
    running.runtime.block_on(async {
        let op = operator(dir.path(), &running.url);
        let address = running.url.trim_start_matches("http://").to_string();
        // Headers that never finish.
        let mut headers_only = tokio::net::TcpStream::connect(&address).await.unwrap();
        headers_only
            .write_all(b"POST /v1/payments HTTP/1.1\r\nhost: x\r\n")
            .await
            .unwrap();
        // A body that never finishes.
        let mut slow_body = tokio::net::TcpStream::connect(&address).await.unwrap();
        slow_body
            .write_all(b"POST /v1/payments HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"instr")
            .await
            .unwrap();
        // Idle connections that never send anything.
        let mut idle = Vec::new();
        for _ in 0..50 {
            idle.push(tokio::net::TcpStream::connect(&address).await.unwrap());
        }
        let started = Instant::now();
        // Meanwhile everybody else is served at once.
        for _ in 0..10 {
            let (status, _) = call(&op, "GET", "/v1/stats", Value::Null).await;
            assert_eq!(status, 200);
        }
        assert!(started.elapsed() < Duration::from_secs(5));
        // The slow body gets 408 with a clear error, within the body timeout.
        let answer = read_until_closed(&mut slow_body, Duration::from_secs(20)).await;
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(answer.contains("request_timeout"), "{answer}");
        // The unfinished headers and the idle connections are closed by the server.
        let answer = read_until_closed(&mut headers_only, Duration::from_secs(20)).await;
        assert!(!answer.starts_with("HTTP/1.1 2"), "{answer}");
        for connection in &mut idle {
            read_until_closed(connection, Duration::from_secs(20)).await;
        }
        let waited = started.elapsed();
        assert!(waited < Duration::from_secs(20), "{waited:?}");
        // And the server still serves.
        let (status, _) = call(&op, "GET", "/v1/stats", Value::Null).await;
        assert_eq!(status, 200);
    });
    drop(running);
}

/// Reads until the server closes the connection (panics if it does not within `limit`).
async fn read_until_closed(stream: &mut tokio::net::TcpStream, limit: Duration) -> String {
    let mut out = Vec::new();
    let read = tokio::time::timeout(limit, stream.read_to_end(&mut out)).await;
    assert!(read.is_ok(), "the server kept a slow connection open");
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn xml_bombs_and_oversized_documents_are_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_switch(dir.path(), config());
    running.runtime.block_on(async {
        let op = operator(dir.path(), &running.url);
        onboard(&op, A, "http://127.0.0.1:9", terms()).await;
        let a = client_of(&running.url, A);
        let ns = "urn:iso:std:iso:20022:tech:xsd:pacs.008.001.08";
        // Billion laughs: entities declared in a DTD.
        let laughs = format!(
            r#"<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;"><!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">]><Document xmlns="{ns}"><FIToFICstmrCdtTrf><GrpHdr><MsgId>&lol2;</MsgId></GrpHdr></FIToFICstmrCdtTrf></Document>"#
        );
        // External entity (XXE).
        let xxe = format!(
            r#"<?xml version="1.0"?><!DOCTYPE d [<!ENTITY x SYSTEM "file:///etc/passwd">]><Document xmlns="{ns}"><FIToFICstmrCdtTrf><GrpHdr><MsgId>&x;</MsgId></GrpHdr></FIToFICstmrCdtTrf></Document>"#
        );
        // Deep nesting, within the body limit.
        let deep = format!(
            r#"<Document xmlns="{ns}">{}{}</Document>"#,
            "<a>".repeat(5_000),
            "</a>".repeat(5_000)
        );
        // An undeclared entity reference without a DTD.
        let undeclared = format!(
            r#"<Document xmlns="{ns}"><FIToFICstmrCdtTrf><GrpHdr><MsgId>&bomb;</MsgId></GrpHdr></FIToFICstmrCdtTrf></Document>"#
        );
        for (name, body) in [
            ("billion laughs", laughs),
            ("external entity", xxe),
            ("deep nesting", deep),
            ("undeclared entity", undeclared),
        ] {
            let started = Instant::now();
            let (status, answer) = call_raw(&a, "/v1/iso20022/pacs.008", body.as_bytes()).await;
            assert_eq!(status, 400, "{name}: {answer}");
            assert!(
                answer["message"].as_str().is_some_and(|m| !m.is_empty()),
                "{name}: {answer}"
            );
            assert!(started.elapsed() < Duration::from_secs(2), "{name} took long");
            assert!(!answer.to_string().contains("root:"), "{name} leaked a file");
        }
        // A document over the body limit: 413 before parsing.
        let huge = format!(r#"<Document xmlns="{ns}">{}</Document>"#, "x".repeat(200 * 1024));
        let (status, answer) = call_raw(&a, "/v1/iso20022/pacs.008", huge.as_bytes()).await;
        assert_eq!((status, answer["code"].as_str()), (413, Some("body_too_large")));
        // Nothing was recorded and the server is fine.
        let (status, stats) = call(&op, "GET", "/v1/stats", Value::Null).await;
        assert_eq!(status, 200);
        assert_eq!(stats["submitted"], 0, "{stats}");
    });
    drop(running);
}

/// Found by schemathesis: a liquidity request id reused with another amount, direction or
/// currency answered 500; it is a 409 DUPL and nothing moves.
#[test]
fn a_reused_liquidity_request_id_is_refused_not_a_server_error() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_switch(dir.path(), config());
    running.runtime.block_on(async {
        let op = operator(dir.path(), &running.url);
        onboard(&op, A, "http://127.0.0.1:9", terms()).await;
        let path = format!("/v1/admin/participants/{A}/liquidity");
        let first =
            json!({"request_id": "r1", "currency": "EUR", "amount": "10.00", "direction": "in"});
        let (status, _) = call(&op, "POST", &path, first.clone()).await;
        assert_eq!(status, 200);
        for changed in [
            json!({"request_id": "r1", "currency": "EUR", "amount": "11.00", "direction": "in"}),
            json!({"request_id": "r1", "currency": "EUR", "amount": "10.00", "direction": "out"}),
        ] {
            let (status, body) = call(&op, "POST", &path, changed).await;
            assert_eq!(
                (status, body["reason"].as_str()),
                (409, Some("DUPL")),
                "{body}"
            );
        }
        let (status, _) = call(&op, "POST", &path, first).await;
        assert_eq!(status, 200, "the same request again is idempotent");
        assert_eq!(available(&op, A).await, "10.00");
    });
    drop(running);
}
