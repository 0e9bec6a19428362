//! `clearhouse reconcile` against a real `clearhouse serve` and `clearhouse sim-banks`: the
//! switch's own camt.053 statement reconciles clean (exit 0); a changed amount, a dropped line
//! and a line the switch never saw are each reported (exit 1).

use std::path::Path;
use std::process::Command;

use clearhouse_switch::client::SignedClient;
use serde_json::{json, Value};

mod common;
use common::*;

const A: &str = "AAAADEFF";
const B: &str = "BBBBDEFF";

#[test]
fn statements_reconcile_clean_and_differences_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (_server, url) = spawn(&["serve", "--listen", "127.0.0.1:0"], Some(&data), &[]);
    let banks_file = dir.path().join("banks.json");
    std::fs::write(
        &banks_file,
        json!([{"bic": A, "secret_hex": secret(A)}, {"bic": B, "secret_hex": secret(B)}])
            .to_string(),
    )
    .unwrap();
    let (_banks, banks_url) = spawn(
        &[
            "sim-banks",
            "--reject-per-10k",
            "0",
            "--banks",
            banks_file.to_str().unwrap(),
        ],
        None,
        &[],
    );
    let key_text = std::fs::read_to_string(data.join("operator.key")).unwrap();
    let mut parts = key_text.split_whitespace();
    let operator = SignedClient::new(
        &url,
        parts.next().unwrap(),
        hex::decode(parts.next().unwrap()).unwrap(),
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let call = |client: &SignedClient, method: &str, path: &str, body: Value| {
        let body = if body.is_null() {
            vec![]
        } else {
            body.to_string().into_bytes()
        };
        let (status, answer) = runtime
            .block_on(client.request(method, path, &body))
            .unwrap();
        (status, answer.to_vec())
    };
    for bic in [A, B] {
        let (status, body) = call(
            &operator,
            "POST",
            "/v1/admin/participants",
            json!({
                "bic": bic, "name": format!("Bank {bic}"), "endpoint": format!("{banks_url}/bank/{bic}"),
                "currencies": {"EUR": {"model": "deferred_net", "net_debit_cap": "1000.00"}},
                "secret_hex": secret(bic),
            }),
        );
        assert_eq!(status, 201, "{}", String::from_utf8_lossy(&body));
    }
    let a = SignedClient::new(&url, &format!("{A}-1"), hex::decode(secret(A)).unwrap());
    for (i, amount) in ["10.00", "20.50", "3.25"].iter().enumerate() {
        let (status, body) = call(
            &a,
            "POST",
            "/v1/payments",
            json!({
                "instruction_id": format!("R-{i}"), "end_to_end_id": format!("E2E-R-{i}"),
                "debtor_agent": A, "creditor_agent": B, "amount": amount, "currency": "EUR",
                "debtor": {"name": "Alice", "account": "DE89370400440532013000"},
                "creditor": {"name": "Bob", "account": "FR1420041010050500013M02606"},
            }),
        );
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    }
    let (status, body) = call(&operator, "POST", "/v1/admin/windows/close", Value::Null);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));

    // B's statement as the switch writes it: valid camt.053, and it reconciles clean.
    let (status, camt) = call(
        &operator,
        "GET",
        &format!("/v1/windows/1/statement?participant={B}&format=camt053"),
        Value::Null,
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&camt));
    let statement = dir.path().join("b.camt053.xml");
    std::fs::write(&statement, &camt).unwrap();
    let xsd = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/iso20022/xsd/camt.053.001.08.xsd");
    let lint = Command::new("xmllint")
        .args(["--noout", "--schema"])
        .arg(&xsd)
        .arg(&statement)
        .output()
        .expect("xmllint (libxml2-utils)");
    assert!(
        lint.status.success(),
        "{}",
        String::from_utf8_lossy(&lint.stderr)
    );
    let reconcile = |file: &Path, format: &str| {
        Command::new(env!("CARGO_BIN_EXE_clearhouse"))
            .args(["reconcile", "--url", &url, "--key-file"])
            .arg(data.join("operator.key"))
            .args([
                "--participant",
                B,
                "--window",
                "1",
                "--format",
                format,
                "--statement",
            ])
            .arg(file)
            .output()
            .unwrap()
    };
    // The same entries as a camt.054: valid too, and it reconciles clean as well.
    let (status, camt054) = call(
        &operator,
        "GET",
        &format!("/v1/windows/1/statement?participant={B}&format=camt054"),
        Value::Null,
    );
    assert_eq!(status, 200);
    let notification = dir.path().join("b.camt054.xml");
    std::fs::write(&notification, &camt054).unwrap();
    let lint = Command::new("xmllint")
        .args(["--noout", "--schema"])
        .arg(xsd.with_file_name("camt.054.001.08.xsd"))
        .arg(&notification)
        .output()
        .unwrap();
    assert!(
        lint.status.success(),
        "{}",
        String::from_utf8_lossy(&lint.stderr)
    );
    assert_eq!(reconcile(&notification, "text").status.code(), Some(0));
    let clean = reconcile(&statement, "json");
    assert_eq!(
        clean.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&clean.stderr)
    );
    let report: Value = serde_json::from_slice(&clean.stdout).unwrap();
    assert_eq!(report["summary"]["matched"], 3);

    // The bank booked 20.51 instead of 20.50.
    let tampered = String::from_utf8(camt)
        .unwrap()
        .replace(">20.50<", ">20.51<");
    std::fs::write(&statement, tampered).unwrap();
    let differs = reconcile(&statement, "json");
    assert_eq!(differs.status.code(), Some(1));
    let report: Value = serde_json::from_slice(&differs.stdout).unwrap();
    assert_eq!(report["summary"]["mismatches"], 1);
    assert_eq!(report["report"]["mismatches"][0]["fields"], "amount");

    // A CSV statement: one payment missing, one the switch never saw.
    let (_, json_statement) = call(
        &operator,
        "GET",
        &format!("/v1/windows/1/statement?participant={B}"),
        Value::Null,
    );
    let entries: Value = serde_json::from_slice(&json_statement).unwrap();
    let entries = entries[0]["entries"].as_array().unwrap();
    let mut csv = String::from("uetr,amount,currency,direction\n");
    for entry in &entries[..2] {
        csv.push_str(&format!(
            "{},{},EUR,credit\n",
            entry["reference"].as_str().unwrap(),
            entry["amount_minor_units"].as_str().unwrap()
        ));
    }
    csv.push_str("aaaaaaaa-bbbb-4ccc-8ddd-eeeeeeeeeeee,999,EUR,credit\n");
    let csv_file = dir.path().join("b.csv");
    std::fs::write(&csv_file, csv).unwrap();
    let differs = reconcile(&csv_file, "csv");
    assert_eq!(differs.status.code(), Some(1));
    let text = String::from_utf8_lossy(&differs.stdout);
    assert!(text.contains("missing_in_statement,"), "{text}");
    assert!(text.contains("missing_in_switch,"), "{text}");
    // Unreadable input: exit 2.
    let missing = reconcile(&dir.path().join("nothing.csv"), "text");
    assert_eq!(missing.status.code(), Some(2));
}
