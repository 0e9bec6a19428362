//! Helpers shared by the switch's end-to-end tests: a switch on its own runtime over real HTTP,
//! simulated banks, signed clients.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use clearhouse_engine::{Node, NodeOptions};
use clearhouse_switch::client::SignedClient;
use clearhouse_switch::sim::{self, SimBank, SimCounters, SimOptions};
use clearhouse_switch::switch::Environment;
use clearhouse_switch::{Switch, SwitchConfig};
use serde_json::{json, Value};

pub fn config() -> SwitchConfig {
    SwitchConfig {
        settle_deadline_ms: 1_500,
        hard_timeout_ms: 3_000,
        sync_wait_ms: 4_000,
        // Clients and switch share this machine's clock: no lead to allow, so a fresh switch
        // accepts signatures at once (tests of the lead set their own).
        clock_lead_ms: 0,
        ..SwitchConfig::default()
    }
}

pub fn node_options(dir: &std::path::Path) -> NodeOptions {
    let mut options = NodeOptions::new(dir.join("ledger"));
    options.disk_free_min_bytes = 16 * 1024 * 1024;
    options.unindexed_transfers_max = 10_000;
    options
}

/// The switch on its own runtime, so a test can stop it whole (tasks, node, threads).
pub struct Running {
    pub runtime: tokio::runtime::Runtime,
    pub url: String,
}

pub fn start_switch(dir: &std::path::Path, config: SwitchConfig) -> Running {
    start_switch_in(dir, config, Environment::default())
}

/// Like [`start_switch`], in another environment (a transport of the test's own).
pub fn start_switch_in(
    dir: &std::path::Path,
    config: SwitchConfig,
    environment: Environment,
) -> Running {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let url = runtime.block_on(async {
        let node = Node::start(node_options(dir)).unwrap();
        let switch = Switch::start_in(node, config, dir, environment)
            .await
            .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(clearhouse_switch::http::serve(
            listener,
            switch,
            std::future::pending(),
        ));
        url
    });
    Running { runtime, url }
}

/// A one-thread runtime for the simulated banks and the test's own clients.
pub fn banks_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

/// Closes the open window and settles it; asserts it settled, reconciled, with no break.
pub async fn close_and_settle(op: &SignedClient) -> Value {
    let (status, report) = call(
        op,
        "POST",
        "/v1/admin/windows/close",
        json!({"settle": true}),
    )
    .await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["state"], "settled", "{report}");
    assert_eq!(report["reconciled"], true, "{report}");
    assert_eq!(report["breaks"], json!([]), "{report}");
    report
}

pub async fn start_banks(banks: Vec<SimBank>, options: SimOptions) -> (String, Arc<SimCounters>) {
    let counters = Arc::new(SimCounters::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let router = sim::router(banks, options, counters.clone());
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    (url, counters)
}

pub fn operator(dir: &std::path::Path, url: &str) -> SignedClient {
    let text = std::fs::read_to_string(dir.join("operator.key")).unwrap();
    let mut parts = text.split_whitespace();
    let key_id = parts.next().unwrap();
    SignedClient::new(url, key_id, hex::decode(parts.next().unwrap()).unwrap())
}

pub async fn call(client: &SignedClient, method: &str, path: &str, body: Value) -> (u16, Value) {
    let bytes = if body.is_null() {
        Vec::new()
    } else {
        body.to_string().into_bytes()
    };
    let (status, answer) = client.request(method, path, &bytes).await.unwrap();
    (
        status,
        serde_json::from_slice(&answer).unwrap_or(Value::Null),
    )
}

pub async fn call_raw(client: &SignedClient, path: &str, body: &[u8]) -> (u16, Value) {
    let (status, answer) = client.request("POST", path, body).await.unwrap();
    (
        status,
        serde_json::from_slice(&answer).unwrap_or(Value::Null),
    )
}

pub fn secret(bic: &str) -> Vec<u8> {
    format!("secret-of-{bic}-0123456789").into_bytes()
}

pub async fn onboard(op: &SignedClient, bic: &str, endpoint: &str, terms: Value) {
    let (status, body) = call(
        op,
        "POST",
        "/v1/admin/participants",
        json!({
            "bic": bic, "name": format!("Bank {bic}"), "endpoint": format!("{endpoint}/bank/{bic}"),
            "currencies": {"EUR": terms}, "secret_hex": hex::encode(secret(bic)),
        }),
    )
    .await;
    assert_eq!(status, 201, "{body}");
}

pub async fn fund(op: &SignedClient, bic: &str, amount: &str) {
    let (status, body) = call(op, "POST", &format!("/v1/admin/participants/{bic}/liquidity"), json!({
        "request_id": format!("fund-{bic}-{amount}"), "currency": "EUR", "amount": amount, "direction": "in"
    })).await;
    assert_eq!(status, 200, "{body}");
}

pub fn payment(debtor: &str, creditor: &str, instruction: &str, amount: &str) -> Value {
    json!({
        "instruction_id": instruction, "end_to_end_id": format!("E2E-{instruction}"),
        "debtor_agent": debtor, "creditor_agent": creditor, "amount": amount, "currency": "EUR",
        "debtor": {"name": "Alice", "account": "DE89370400440532013000"},
        "creditor": {"name": "Bob", "account": "FR1420041010050500013M02606"},
    })
}

pub fn client_of(url: &str, bic: &str) -> SignedClient {
    SignedClient::new(url, &format!("{bic}-1"), secret(bic))
}

pub async fn available(client: &SignedClient, bic: &str) -> String {
    let (status, body) = call(
        client,
        "GET",
        &format!("/v1/participants/{bic}/positions"),
        Value::Null,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body[0]["available"].as_str().unwrap().to_string()
}

pub fn bank(bic: &str) -> SimBank {
    SimBank {
        bic: bic.to_string(),
        secret: secret(bic),
    }
}

pub fn accepting() -> SimOptions {
    SimOptions {
        reject_per_10k: 0,
        delay: Duration::ZERO,
        defer: false,
        switch_url: None,
    }
}
