//! Process-level chaos: `clearhouse serve` under payment load (signed HTTP from 8 clients, real
//! simulated banks in their own process) is killed with SIGKILL at random moments, 20 times, and
//! restarted on the same data directory. Then: every payment a debtor agent was told is settled
//! is still settled, every rejection keeps its reason, every payment the switch ever accepted
//! reaches a final state, nothing stays reserved, the books balance, a window closes and
//! reconciles clean, and `clearhouse verify` accepts the voucher chain. And a signed request
//! captured just before each kill and sent again byte for byte after the restart (inside the
//! timestamp skew, its nonce unknown to the new process) is refused with 401
//! `signed_before_start`, while a request signed after the restart is accepted.

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clearhouse_switch::client::SignedClient;
use serde_json::{json, Value};

mod common;
use common::*;

const ROUNDS: u32 = 20;
const CLIENTS: u32 = 8;
const BANKS: [&str; 3] = ["KILADEFF", "KILBDEFF", "KILCDEFF"];
const FUNDING: &str = "1000000.00";
/// Short deadlines, so payments caught by a kill end within the test.
const DEADLINES: &[(&str, &str)] = &[
    ("CLEARHOUSE_SETTLE_DEADLINE_MS", "1500"),
    ("CLEARHOUSE_HARD_TIMEOUT_MS", "3000"),
    ("CLEARHOUSE_SYNC_WAIT_MS", "4000"),
    // Signatures may lead the switch's clock by 300 ms: a restarted switch refuses what was
    // signed before its start + 300 ms (short, so the load resumes quickly after each restart).
    ("CLEARHOUSE_CLOCK_LEAD_MS", "300"),
];

/// Waits (bounded: 10 s) until the switch at `url` answers `/ready` with 200: it accepts
/// signatures made now.
async fn wait_ready(url: &str) {
    let plain = SignedClient::new(url, "none", vec![]);
    for _ in 0..200 {
        if let Ok((200, _)) = plain.send("GET", "/ready", b"", &[]).await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{url} was not ready within 10 s");
}

/// What the debtor agent was told about each instruction: (debtor, status, reason).
type Told = Arc<Mutex<ToldMap>>;

#[test]
fn the_switch_survives_sigkill_under_load_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let banks_file = dir.path().join("banks.json");
    std::fs::write(
        &banks_file,
        json!(BANKS
            .iter()
            .map(|b| json!({"bic": b, "secret_hex": secret(b)}))
            .collect::<Vec<_>>())
        .to_string(),
    )
    .unwrap();
    let (_banks, banks_url) = spawn(
        &[
            "sim-banks",
            "--reject-per-10k",
            "100",
            "--banks",
            banks_file.to_str().unwrap(),
        ],
        None,
        DEADLINES,
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let operator = |url: &str| {
        let text = std::fs::read_to_string(data.join("operator.key")).unwrap();
        let mut parts = text.split_whitespace();
        SignedClient::new(
            url,
            parts.next().unwrap(),
            hex::decode(parts.next().unwrap()).unwrap(),
        )
    };
    let (server, url) = spawn(
        &["serve", "--listen", "127.0.0.1:0"],
        Some(&data),
        DEADLINES,
    );
    let mut server = Some(server);
    runtime.block_on(async {
        let op = operator(&url);
        for bic in BANKS {
            let (status, body) = call(&op, "POST", "/v1/admin/participants", json!({
                "bic": bic, "name": format!("Bank {bic}"), "endpoint": format!("{banks_url}/bank/{bic}"),
                "currencies": {"EUR": {"model": "prefunded"}}, "secret_hex": secret(bic),
            })).await.unwrap();
            assert_eq!(status, 201, "{body}");
            let (status, _) = call(&op, "POST", &format!("/v1/admin/participants/{bic}/liquidity"), json!({
                "request_id": "fund", "currency": "EUR", "amount": FUNDING, "direction": "in"})).await.unwrap();
            assert_eq!(status, 200);
        }
    });
    let told: Told = Arc::new(Mutex::new(BTreeMap::new()));
    let mut url = url;
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for round in 0..ROUNDS {
        let load: Vec<_> = (0..CLIENTS)
            .map(|c| {
                let url = url.clone();
                let told = told.clone();
                runtime.spawn(async move {
                    for n in 0.. {
                        let debtor = BANKS[((c + n) % 3) as usize];
                        let creditor = BANKS[((c + n + 1) % 3) as usize];
                        let instruction = format!("K{round}-{c}-{n}");
                        told.lock().unwrap().insert(instruction.clone(), (debtor.to_string(), None));
                        let answer = call(&client(&url, debtor), "POST", "/v1/payments", json!({
                            "instruction_id": instruction, "end_to_end_id": format!("E2E-{instruction}"),
                            "debtor_agent": debtor, "creditor_agent": creditor, "amount": "1.00", "currency": "EUR",
                            "debtor": {"name": "Alice", "account": "DE89370400440532013000"},
                            "creditor": {"name": "Bob", "account": "FR1420041010050500013M02606"},
                        })).await;
                        match answer {
                            Some((200, body)) if body["status"] != "PDNG" => {
                                told.lock().unwrap().insert(instruction, (debtor.to_string(), Some((
                                    body["status"].as_str().unwrap().to_string(),
                                    body["reason"].as_str().map(str::to_string),
                                ))));
                            }
                            // The switch died under the request, or it answered "still pending".
                            _ => {}
                        }
                    }
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(150 + next() % 350));
        // A signed read captured (and answered) just before the kill.
        let bic = BANKS[round as usize % 3];
        let path = format!("/v1/participants/{bic}/positions");
        let captured = clearhouse_switch::auth::sign_request(
            &format!("{bic}-1"),
            &hex::decode(secret(bic)).unwrap(),
            "GET",
            &path,
            b"",
        );
        let (status, _) = runtime
            .block_on(client(&url, bic).send("GET", &path, b"", &captured))
            .unwrap();
        assert_eq!(status, 200, "round {round}: the capture is a good request");
        drop(server.take()); // SIGKILL
        for task in load {
            task.abort();
        }
        let (restarted, new_url) = spawn(
            &["serve", "--listen", "127.0.0.1:0"],
            Some(&data),
            DEADLINES,
        );
        server = Some(restarted);
        url = new_url;
        runtime.block_on(async {
            // Replayed byte for byte on the new process, right away and once it is ready: refused.
            for moment in ["at once", "once ready"] {
                if moment == "once ready" {
                    wait_ready(&url).await;
                }
                let (status, answer) = client(&url, bic)
                    .send("GET", &path, b"", &captured)
                    .await
                    .unwrap();
                let answer: Value = serde_json::from_slice(&answer).unwrap();
                assert_eq!(
                    (status, answer["code"].as_str()),
                    (401, Some("signed_before_start")),
                    "round {round}: a capture replayed after the restart ({moment}): {answer}"
                );
            }
            // Signed after the restart: accepted.
            let (status, body) = call(&client(&url, bic), "GET", &path, Value::Null)
                .await
                .unwrap();
            assert_eq!(status, 200, "round {round}: a fresh request: {body}");
        });
    }
    // Past the hard timeout: every payment caught by a kill has ended.
    std::thread::sleep(Duration::from_millis(3_500));
    let told = told.lock().unwrap().clone();
    let settled_told = told
        .values()
        .filter(|(_, t)| matches!(t, Some((s, _)) if s == "ACSC"))
        .count();
    assert!(
        settled_told > 100,
        "the load settled only {settled_told} payments"
    );
    runtime.block_on(async {
        let op = operator(&url);
        let settled_now = check_told_and_books(&url, &op, &told, &BANKS, 3 * 100_000_000).await;
        assert!(settled_now > 0);
    });
    drop(server.take());
    let verify = Command::new(env!("CARGO_BIN_EXE_clearhouse"))
        .args(["verify", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "{}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
}
