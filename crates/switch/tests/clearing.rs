//! Settlement windows end to end over HTTP: exact cut-over, multilateral net settlement posted on
//! the ledger, signed checkpoints, participants verifying their own vouchers, restart recovery of
//! the open window, and a full export that verifies.

use clearhouse_clearing::export::{verify_export, verify_participant_view, Checkpoint, ViewEntry};
use clearhouse_engine::Node;
use serde_json::{json, Value};

mod common;
use common::*;

const A: &str = "AAAADEFF";
const B: &str = "BBBBDEFF";
const C: &str = "CCCCDEFF";
const P: &str = "PREFDEFF";

async fn pay(url: &str, debtor: &str, creditor: &str, id: &str, amount: &str) {
    let (status, body) = call(
        &client_of(url, debtor),
        "POST",
        "/v1/payments",
        payment(debtor, creditor, id, amount),
    )
    .await;
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("ACSC")),
        "{body}"
    );
}

fn instruction_of(report: &Value, bic: &str) -> Option<String> {
    report["plan"]["instructions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["participant"] == bic)
        .map(|i| i["net_minor_units"].as_str().unwrap().to_string())
}

#[test]
fn windows_net_settle_sign_and_survive_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let banks_runtime = banks_runtime();
    let (banks, _) = banks_runtime.block_on(start_banks(
        vec![bank(A), bank(B), bank(C), bank(P)],
        accepting(),
    ));
    let running = start_switch(dir.path(), config());
    let url = running.url.clone();
    banks_runtime.block_on(async {
        let op = operator(dir.path(), &url);
        for bic in [A, B, C] {
            onboard(
                &op,
                bic,
                &banks,
                json!({"model": "deferred_net", "net_debit_cap": "1000.00"}),
            )
            .await;
        }
        onboard(&op, P, &banks, json!({"model": "prefunded"})).await;
        fund(&op, P, "500.00").await;
        pay(&url, A, B, "W1-1", "100.00").await;
        pay(&url, B, C, "W1-2", "70.00").await;
        pay(&url, C, A, "W1-3", "50.00").await;
        pay(&url, P, A, "W1-4", "30.00").await;
        pay(&url, A, P, "W1-5", "10.00").await;

        // The open window's preview already nets.
        let (status, preview) = call(&op, "GET", "/v1/windows/1", Value::Null).await;
        assert_eq!(status, 200, "{preview}");
        assert_eq!(preview["state"], "open");
        assert_eq!(instruction_of(&preview, A).as_deref(), Some("-3000"));

        // Only the operator closes windows.
        let (status, _) = call(
            &client_of(&url, A),
            "POST",
            "/v1/admin/windows/close",
            Value::Null,
        )
        .await;
        assert_eq!(status, 403);

        let report = close_and_settle(&op).await;
        // A pays 30.00, B receives 30.00, C receives 20.00; the prefunded P settled gross.
        assert_eq!(instruction_of(&report, A).as_deref(), Some("-3000"));
        assert_eq!(instruction_of(&report, B).as_deref(), Some("3000"));
        assert_eq!(instruction_of(&report, C).as_deref(), Some("2000"));
        assert_eq!(instruction_of(&report, P), None);
        let figures = &report["plan"]["figures"][0];
        assert_eq!(figures["gross_minor_units"], "26000");
        assert_eq!(figures["net_minor_units"], "5000");
        assert_eq!(figures["netting_efficiency_bp"], 8076);
        assert!(report["checkpoint"]["signature"].is_string());
        // Settlement reset the deferred-net positions to their caps.
        for bic in [A, B, C] {
            assert_eq!(available(&op, bic).await, "1000.00", "{bic}");
        }
        assert_eq!(available(&op, P).await, "480.00");
        // Settling again changes nothing.
        let (status, again) = call(&op, "POST", "/v1/admin/windows/1/settle", Value::Null).await;
        assert_eq!(
            (status, &again["settled_at_ns"]),
            (200, &report["settled_at_ns"])
        );
        assert_eq!(available(&op, A).await, "1000.00");

        // Window 2 is open and counts new payments.
        pay(&url, A, B, "W2-1", "5.00").await;
        // /metrics (unauthenticated) carries aggregates only: no participant, no BIC (issue 17.2:
        // it exposed every participant's liquidity to anyone reaching the port).
        let plain = clearhouse_switch::client::SignedClient::new(&url, "none", vec![]);
        let (status, metrics) = plain.send("GET", "/metrics", b"", &[]).await.unwrap();
        assert_eq!(status, 200);
        let metrics = String::from_utf8_lossy(&metrics).into_owned();
        for line in [
            "clearhouse_window_gross_minor_units{currency=\"EUR\"} 500",
            "clearhouse_window_open 2",
            "clearhouse_reconciliation_breaks_total 0",
        ] {
            assert!(metrics.contains(line), "{line} not in {metrics}");
        }
        for secret in ["participant=", A, B, C, P, "available_minor_units", "net_debit_cap"] {
            assert!(!metrics.contains(secret), "{secret} in /metrics: {metrics}");
        }
        // The operator's signed metrics carry the positions; a participant may not read them.
        let (status, operator_metrics) = op.request("GET", "/v1/admin/metrics", b"").await.unwrap();
        assert_eq!(status, 200);
        let operator_metrics = String::from_utf8_lossy(&operator_metrics).into_owned();
        for line in [
            "clearhouse_window_open 2",
            "clearhouse_participant_available_minor_units{participant=\"BBBBDEFF\",currency=\"EUR\"} 100500",
            "clearhouse_participant_net_debit_cap_used_ratio{participant=\"AAAADEFF\",currency=\"EUR\"} 0.0050",
        ] {
            assert!(operator_metrics.contains(line), "{line} not in {operator_metrics}");
        }
        let (status, _) = client_of(&url, B).request("GET", "/v1/admin/metrics", b"").await.unwrap();
        assert_eq!(status, 403);
        let (status, _) = plain.send("GET", "/v1/admin/metrics", b"", &[]).await.unwrap();
        assert_eq!(status, 401);

        // A participant sees only its own positions...
        let (status, mine) = call(&client_of(&url, B), "GET", "/v1/windows/1", Value::Null).await;
        assert_eq!(status, 200);
        let positions = mine["plan"]["positions"].as_array().unwrap();
        assert_eq!(positions.len(), 1);
        assert_eq!(positions[0]["participant"], B);
        // ...and verifies its own vouchers against the signed checkpoint.
        let (status, page) = call(
            &client_of(&url, B),
            "GET",
            "/v1/vouchers?from=1&limit=100",
            Value::Null,
        )
        .await;
        assert_eq!(status, 200, "{page}");
        let entries: Vec<ViewEntry> = serde_json::from_value(page["entries"].clone()).unwrap();
        let checkpoint: Checkpoint =
            serde_json::from_value(page["checkpoints"][0].clone()).unwrap();
        let key: [u8; 32] = hex::decode(page["public_key"].as_str().unwrap())
            .unwrap()
            .try_into()
            .unwrap();
        let key = ed25519_dalek::VerifyingKey::from_bytes(&key).unwrap();
        let own = verify_participant_view(B, &[0; 32], &entries, &checkpoint, &key).unwrap();
        // Its two payments and the window close.
        assert_eq!(own.len(), 3, "{own:?}");
        assert!(entries.iter().filter(|e| e.body.is_some()).count() >= 3);
        assert!(entries.iter().any(|e| e.body.is_none()));

        // B's statement of window 1: credited 100.00 by A, debited 70.00 to C.
        let (status, statement) = call(
            &client_of(&url, B),
            "GET",
            "/v1/windows/1/statement",
            Value::Null,
        )
        .await;
        assert_eq!(status, 200, "{statement}");
        assert_eq!(statement[0]["total_credits_minor_units"], "10000");
        assert_eq!(statement[0]["total_debits_minor_units"], "7000");
        assert_eq!(statement[0]["entries"].as_array().unwrap().len(), 2);
        let (status, _) = call(
            &client_of(&url, B),
            "GET",
            &format!("/v1/windows/1/statement?participant={A}"),
            Value::Null,
        )
        .await;
        assert_eq!(status, 403);

        // CSV and SVG reports.
        let (status, csv) = op
            .request("GET", "/v1/windows/1?format=csv", b"")
            .await
            .unwrap();
        assert_eq!(status, 200);
        let csv = String::from_utf8(csv.to_vec()).unwrap();
        assert!(
            csv.contains(&format!("1,{A},EUR,deferred_net,11000,2,8000,2,-3000,")),
            "{csv}"
        );
        let (status, svg) = op
            .request("GET", "/v1/windows/1?format=svg", b"")
            .await
            .unwrap();
        assert_eq!(status, 200);
        assert!(String::from_utf8(svg.to_vec()).unwrap().starts_with("<svg"));
    });
    drop(running);

    // After a restart the open window's positions come back from the vouchers.
    let running = start_switch(dir.path(), config());
    let url = running.url.clone();
    banks_runtime.block_on(async {
        let op = operator(dir.path(), &url);
        let (_, preview) = call(&op, "GET", "/v1/windows/2", Value::Null).await;
        assert_eq!(
            instruction_of(&preview, A).as_deref(),
            Some("-500"),
            "{preview}"
        );
        let (status, report) = call(&op, "POST", "/v1/admin/windows/close", Value::Null).await;
        assert_eq!(
            (status, &report["state"]),
            (200, &json!("settled")),
            "{report}"
        );
        assert_eq!(report["breaks"], json!([]));
        assert_eq!(instruction_of(&report, B).as_deref(), Some("500"));
        let (_, list) = call(&op, "GET", "/v1/windows", Value::Null).await;
        assert_eq!(list[0]["window"], 3);
        assert_eq!(list[0]["state"], "open");
        assert_eq!(list.as_array().unwrap().len(), 3);

        // Statements carry booked balances (issue 17.3: OPBD was always 0 and CLBD the window's
        // net): each window opens at the previous one's close, the settlement fund adjustments
        // are entries (in the window they were posted in), and the last closing balance is the
        // position's balance on the ledger. Window 3 holds only window 2's adjustments.
        let (status, report) = call(&op, "POST", "/v1/admin/windows/close", Value::Null).await;
        assert_eq!(
            (status, &report["state"]),
            (200, &json!("settled")),
            "{report}"
        );
        for bic in [A, B, C, P] {
            let mut closing = "0".to_string();
            let mut adjustments = 0;
            for window in 1..=3 {
                let (status, statement) = call(
                    &op,
                    "GET",
                    &format!("/v1/windows/{window}/statement?participant={bic}"),
                    Value::Null,
                )
                .await;
                assert_eq!(status, 200, "{bic} window {window}: {statement}");
                let statement = &statement[0];
                assert_eq!(
                    statement["opening_balance_minor_units"].as_str(),
                    Some(closing.as_str()),
                    "{bic} window {window}: {statement}"
                );
                let entries = statement["entries"].as_array().unwrap();
                adjustments += entries
                    .iter()
                    .filter(|e| e["kind"] == "fund_adjustment")
                    .count();
                let moved: i128 = entries
                    .iter()
                    .map(|e| {
                        let amount: i128 =
                            e["amount_minor_units"].as_str().unwrap().parse().unwrap();
                        if e["credit"] == true {
                            amount
                        } else {
                            -amount
                        }
                    })
                    .sum();
                let opening: i128 = closing.parse().unwrap();
                closing = statement["closing_balance_minor_units"]
                    .as_str()
                    .unwrap()
                    .to_string();
                assert_eq!(
                    closing.parse::<i128>().unwrap(),
                    opening + moved,
                    "{bic} window {window}"
                );
            }
            let (_, positions) = call(
                &op,
                "GET",
                &format!("/v1/participants/{bic}/positions"),
                Value::Null,
            )
            .await;
            let balance: i128 = positions[0]["balance"]
                .as_str()
                .unwrap()
                .replace('.', "")
                .parse()
                .unwrap();
            assert_eq!(
                closing.parse::<i128>().unwrap(),
                balance,
                "{bic}: the closing balance is the ledger's"
            );
            if bic != P {
                assert!(
                    adjustments > 0,
                    "{bic}: deferred net, its fund adjustments are entries"
                );
            }
        }
        // The camt.053 says the same: OPBD of window 2 = CLBD of window 1.
        let camt = |window: u64| {
            let op = op.clone();
            async move {
                let (status, xml) = op
                    .request(
                        "GET",
                        &format!("/v1/windows/{window}/statement?participant={B}&format=camt053"),
                        b"",
                    )
                    .await
                    .unwrap();
                assert_eq!(status, 200);
                let report = clearhouse_iso20022::camt::CashReport::parse(
                    &xml,
                    &clearhouse_iso20022::Limits::default(),
                )
                .unwrap();
                let balance = |code: &str| {
                    let b = report.reports[0]
                        .balances
                        .iter()
                        .find(|b| b.code == code)
                        .unwrap()
                        .clone();
                    (b.amount, b.credit)
                };
                (balance("OPBD"), balance("CLBD"))
            }
        };
        let (_, closing_1) = camt(1).await;
        let (opening_2, _) = camt(2).await;
        assert_eq!(opening_2, closing_1);
    });
    drop(running);

    // The full export verifies against the operator's public key.
    let node = Node::start(node_options(dir.path())).unwrap();
    let public = std::fs::read_to_string(dir.path().join("operator-ed25519.pub")).unwrap();
    let public: [u8; 32] = hex::decode(public.trim()).unwrap().try_into().unwrap();
    let public = ed25519_dalek::VerifyingKey::from_bytes(&public).unwrap();
    let (bytes, vouchers, checkpoints) =
        clearhouse_switch::clearing::export_vouchers(&node, &public, Vec::new(), |_| {}).unwrap();
    assert_eq!(checkpoints, 3);
    let report = verify_export(&bytes[..], Some(&public), |_| {}).unwrap();
    assert_eq!(report.vouchers, vouchers);
    assert_eq!(report.checkpoints, 3);
}

/// Liquidity-saving mode: three banks with no liquidity pay each other in a cycle. No payment fits
/// alone and no two offset; the gridlock resolution settles all three at once. A payment that
/// nothing offsets waits until its deadline and is rejected AB05. The window nets them like any
/// other, and reconciles.
#[test]
fn a_gridlock_only_multilateral_offsetting_resolves_is_settled() {
    let dir = tempfile::tempdir().unwrap();
    let banks_runtime = banks_runtime();
    let (banks, _) = banks_runtime.block_on(start_banks(
        vec![bank(A), bank(B), bank(C), bank(P)],
        accepting(),
    ));
    let running = start_switch(
        dir.path(),
        clearhouse_switch::SwitchConfig {
            liquidity_saving_currencies: vec!["EUR".into()],
            gridlock_interval_ms: 50,
            ..config()
        },
    );
    let url = running.url.clone();
    banks_runtime.block_on(async {
        let op = operator(dir.path(), &url);
        for bic in [A, B, C, P] {
            onboard(&op, bic, &banks, json!({"model": "prefunded"})).await;
        }
        let mut cycle = Vec::new();
        for (i, (debtor, creditor)) in [(A, B), (B, C), (C, A)].into_iter().enumerate() {
            let url = url.clone();
            cycle.push(tokio::spawn(async move {
                call(
                    &client_of(&url, debtor),
                    "POST",
                    "/v1/payments",
                    payment(debtor, creditor, &format!("G-{i}"), "100.00"),
                )
                .await
            }));
        }
        let lonely = {
            let url = url.clone();
            tokio::spawn(async move {
                call(
                    &client_of(&url, P),
                    "POST",
                    "/v1/payments",
                    payment(P, A, "G-lonely", "5.00"),
                )
                .await
            })
        };
        for task in cycle {
            let (status, body) = task.await.unwrap();
            assert_eq!(
                (status, body["status"].as_str()),
                (200, Some("ACSC")),
                "{body}"
            );
        }
        let (status, body) = lonely.await.unwrap();
        assert_eq!(
            (status, body["status"].as_str(), body["reason"].as_str()),
            (200, Some("RJCT"), Some("AB05")),
            "{body}"
        );
        for bic in [A, B, C, P] {
            assert_eq!(available(&op, bic).await, "0.00", "{bic}");
        }
        let (_, metrics) = op.request("GET", "/metrics", b"").await.unwrap();
        assert!(String::from_utf8_lossy(&metrics).contains("clearhouse_payments_queued 0"));
        let (status, report) = call(&op, "POST", "/v1/admin/windows/close", Value::Null).await;
        assert_eq!(status, 200, "{report}");
        assert_eq!(report["breaks"], json!([]));
        let figures = &report["plan"]["figures"][0];
        assert_eq!(figures["gross_minor_units"], "30000");
        assert_eq!(figures["net_minor_units"], "0");
        assert_eq!(figures["netting_efficiency_bp"], 10000);
    });
    drop(running);
}

/// Windows close and settle on their own on the configured schedule.
#[test]
fn windows_close_on_schedule() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_switch(
        dir.path(),
        clearhouse_switch::SwitchConfig {
            window_close_every_seconds: 1,
            ..config()
        },
    );
    let url = running.url.clone();
    running.runtime.block_on(async {
        tokio::time::sleep(std::time::Duration::from_millis(2_600)).await;
        let op = operator(dir.path(), &url);
        let (status, list) = call(&op, "GET", "/v1/windows", Value::Null).await;
        assert_eq!(status, 200, "{list}");
        let open = list[0]["window"].as_u64().unwrap();
        assert!(open >= 3, "{list}");
        assert_eq!(list[1]["state"], "settled", "{list}");
        assert_eq!(list[1]["reconciled"], true, "{list}");
    });
    drop(running);
}

/// Statements of old windows still answer when the cache of closing balances (64 windows) is
/// full of newer ones: the balances are carried forward while walking, not re-read from a cache
/// that evicts the oldest window as soon as it is inserted.
#[test]
fn statements_of_old_windows_survive_a_full_balance_cache() {
    let dir = tempfile::tempdir().unwrap();
    let running = start_switch(dir.path(), config());
    running.runtime.block_on(async {
        let op = operator(dir.path(), &running.url);
        onboard(&op, P, "http://127.0.0.1:9", json!({"model": "prefunded"})).await;
        fund(&op, P, "500.00").await;
        for _ in 0..70 {
            let (status, report) = call(&op, "POST", "/v1/admin/windows/close", Value::Null).await;
            assert_eq!(status, 200, "{report}");
        }
        // Window 70's statement walks windows 1..=69 and fills the cache with 7..=70.
        for window in [70, 2, 1, 69] {
            let (status, statement) = call(
                &op,
                "GET",
                &format!("/v1/windows/{window}/statement?participant={P}"),
                Value::Null,
            )
            .await;
            assert_eq!(status, 200, "window {window}: {statement}");
            let expected = if window == 1 { "0" } else { "50000" };
            assert_eq!(
                statement[0]["opening_balance_minor_units"], expected,
                "window {window}: {statement}"
            );
            assert_eq!(statement[0]["closing_balance_minor_units"], "50000");
        }
    });
}

/// Runs a day of a scheme in `dir`: two deferred-net banks and a prefunded one onboarded and
/// funded, three payments, window 1 closed and settled; then a restart and one more payment.
/// Returns the settled report of window 1.
fn a_day_in(dir: &std::path::Path) -> Value {
    let banks_runtime = banks_runtime();
    let (banks, _) =
        banks_runtime.block_on(start_banks(vec![bank(A), bank(B), bank(P)], accepting()));
    let running = start_switch(dir, config());
    let url = running.url.clone();
    let report = banks_runtime.block_on(async {
        let op = operator(dir, &url);
        for bic in [A, B] {
            let terms = json!({"model": "deferred_net", "net_debit_cap": "1000.00"});
            onboard(&op, bic, &banks, terms).await;
        }
        onboard(&op, P, &banks, json!({"model": "prefunded"})).await;
        fund(&op, P, "500.00").await;
        pay(&url, A, B, "D1-1", "100.00").await;
        pay(&url, B, A, "D1-2", "40.00").await;
        pay(&url, P, A, "D1-3", "25.00").await;
        close_and_settle(&op).await
    });
    drop(running);
    // After a restart the participants, their funds and the settled window are all found.
    let running = start_switch(dir, config());
    let url = running.url.clone();
    banks_runtime.block_on(async {
        let op = operator(dir, &url);
        assert_eq!(available(&op, P).await, "475.00");
        assert_eq!(available(&op, A).await, "1000.00");
        let (status, window) = call(&op, "GET", "/v1/windows/1", Value::Null).await;
        assert_eq!((status, &window["state"]), (200, &json!("settled")));
        pay(&url, A, P, "D2-1", "10.00").await;
        let (status, statement) = call(
            &op,
            "GET",
            &format!("/v1/windows/1/statement?participant={A}"),
            Value::Null,
        )
        .await;
        assert_eq!(status, 200, "{statement}");
    });
    drop(running);
    report
}

/// A new data directory derives its hash-keyed records and transfers below every payment key
/// (so redb packs the records and transfers tables); a directory created before keeps its ids,
/// and both run a day, restart and settle the same.
#[test]
fn new_directories_keep_hash_ids_below_payment_keys_and_older_ones_keep_theirs() {
    use clearhouse_switch::clearing::key_scheme_of;
    use clearhouse_switch::model::{payment_key, KeyScheme, KEY_SCHEME_RECORD};
    let lowest_payment_key = payment_key(1_700_000_000_000_000_000, "", "");
    let fresh = tempfile::tempdir().unwrap();
    let older = tempfile::tempdir().unwrap();
    {
        // What a directory created before the compact scheme holds after its first start: the
        // clearing state under the legacy key, and no scheme record.
        let node = Node::start(node_options(older.path())).unwrap();
        let state = json!({"window": 1, "opened_at_ns": 1_700_000_000_000_000_000u64});
        let put = clearhouse_engine::RecordPut {
            key: KeyScheme::Legacy.clearing_state(),
            value: state.to_string().into_bytes(),
            ..Default::default()
        };
        node.submit(vec![], vec![put]).unwrap();
    }
    let fresh_report = a_day_in(fresh.path());
    let older_report = a_day_in(older.path());
    assert_eq!(fresh_report["plan"], older_report["plan"]);

    for (dir, scheme) in [
        (fresh.path(), KeyScheme::Compact),
        (older.path(), KeyScheme::Legacy),
    ] {
        let node = Node::start(node_options(dir)).unwrap();
        assert_eq!(key_scheme_of(&node).unwrap(), Some(scheme));
        let other = match scheme {
            KeyScheme::Compact => KeyScheme::Legacy,
            KeyScheme::Legacy => KeyScheme::Compact,
        };
        let records = |keys: &[u128]| node.get_records(keys).unwrap();
        let keys = [
            scheme.participant(A),
            scheme.window(1),
            scheme.clearing_state(),
        ];
        assert!(records(&keys).iter().all(Option::is_some), "{scheme:?}");
        let others = [other.participant(A), other.window(1)];
        assert!(records(&others).iter().all(Option::is_none), "{scheme:?}");
        // The net payer's fund adjustment and the prefunded bank's liquidity are ledger
        // transfers under the directory's ids.
        let transfers = [
            scheme.fund_adjustment(1, A, "EUR"),
            scheme.liquidity_transfer(P, "fund-PREFDEFF-500.00"),
        ];
        let found = node.lookup_transfers(transfers.to_vec()).unwrap();
        assert_eq!(found.len(), 2, "{scheme:?}: {found:?}");
        if scheme == KeyScheme::Compact {
            assert!(keys
                .iter()
                .chain(&transfers)
                .all(|k| *k < lowest_payment_key));
            assert!(records(&[KEY_SCHEME_RECORD])[0].is_some());
        } else {
            assert!(records(&[KEY_SCHEME_RECORD])[0].is_none());
        }
    }
}
