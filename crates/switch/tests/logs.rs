//! No secret and no personal data in the logs: the switch runs with every log level on (trace,
//! every crate) while payments settle, are rejected and time out, a return and a window close
//! happen, ISO 20022 messages come in, and attackers send bad signatures and malformed bodies
//! that carry personal data; then the captured log is searched for every secret and every piece
//! of personal data that went in.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const PAYER: &str = "PAYRDEFF";
const PAYEE: &str = "PAYEDEFF";
const SILENT: &str = "SLNTDEFF";

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn personal_payment(instruction: &str, creditor_agent: &str, amount: &str) -> Value {
    json!({
        "instruction_id": instruction, "end_to_end_id": format!("E2E-{instruction}"),
        "debtor_agent": PAYER, "creditor_agent": creditor_agent, "amount": amount, "currency": "EUR",
        "debtor": {"name": "Zacharias Quillfeather", "account": "DE44500105175407324931"},
        "creditor": {"name": "Philippa Marchbanks", "account": "FR7630006000011234567890189"},
        "remittance_information": "Invoice for Dr Zacharias Quillfeather, Birkenweg 12",
    })
}

#[test]
fn logs_hold_no_secret_and_no_personal_data() {
    let captured = Captured::default();
    let writer = captured.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .init();

    let dir = tempfile::tempdir().unwrap();
    let banks_runtime = banks_runtime();
    let ((accepting, _), (silent, _)) = banks_runtime.block_on(async {
        (
            start_banks(vec![bank(PAYER), bank(PAYEE)], accepting()).await,
            start_banks(
                vec![bank(SILENT)],
                clearhouse_switch::sim::SimOptions {
                    defer: true,
                    ..accepting()
                },
            )
            .await,
        )
    });
    let running = start_switch(dir.path(), config());
    let url = running.url.clone();
    banks_runtime.block_on(async {
        let op = operator(dir.path(), &url);
        for (bic, endpoint) in [(PAYER, &accepting), (PAYEE, &accepting), (SILENT, &silent)] {
            onboard(&op, bic, endpoint, json!({"model": "prefunded"})).await;
        }
        fund(&op, PAYER, "1000.00").await;
        let payer = client_of(&url, PAYER);
        // Settled, then returned.
        let (status, settled) = call(
            &payer,
            "POST",
            "/v1/payments",
            personal_payment("L-1", PAYEE, "10.00"),
        )
        .await;
        assert_eq!(
            (status, settled["status"].as_str()),
            (200, Some("ACSC")),
            "{settled}"
        );
        let payee = client_of(&url, PAYEE);
        let id = settled["payment_id"].as_str().unwrap().to_string();
        let (status, body) = call(
            &payee,
            "POST",
            &format!("/v1/payments/{id}/return"),
            json!({"return_id": "R-1", "amount": "10.00", "reason": "CUST"}),
        )
        .await;
        assert!(status < 300, "{body}");
        // Rejected for liquidity, and timed out at a creditor agent that never answers.
        let (_, body) = call(
            &payer,
            "POST",
            "/v1/payments",
            personal_payment("L-2", PAYEE, "99999.00"),
        )
        .await;
        assert_eq!(body["status"], "RJCT", "{body}");
        let (_, body) = call(
            &payer,
            "POST",
            "/v1/payments",
            personal_payment("L-3", SILENT, "5.00"),
        )
        .await;
        assert_eq!(body["reason"], "AB05", "{body}");
        // A status query, an invalid body carrying personal data, a forged signature.
        let (status, _) = call(&payer, "GET", &format!("/v1/payments/{id}"), Value::Null).await;
        assert_eq!(status, 200);
        let mut broken = personal_payment("L-4", PAYEE, "1.00").to_string();
        broken.push_str("}}");
        let (status, _) = call_raw(&payer, "/v1/payments", broken.as_bytes()).await;
        assert_eq!(status, 400);
        let mut bad_amount = personal_payment("L-5", PAYEE, "1.00");
        bad_amount["amount"] = json!("1.001");
        let (status, _) = call(&payer, "POST", "/v1/payments", bad_amount).await;
        assert_eq!(status, 400);
        let forger = clearhouse_switch::client::SignedClient::new(
            &url,
            &format!("{PAYER}-1"),
            b"not-the-secret-at-all".to_vec(),
        );
        let (status, _) = call(
            &forger,
            "POST",
            "/v1/payments",
            personal_payment("L-6", PAYEE, "1.00"),
        )
        .await;
        assert_eq!(status, 401);
        // ISO 20022 with personal data in the XML: settled, and again as a broken document.
        let tx = clearhouse_iso20022::CreditTransfer {
            instruction_id: Some("X-1".into()),
            end_to_end_id: "E2E-X-1".into(),
            amount: "12.50".into(),
            currency: "EUR".into(),
            charge_bearer: "SLEV".into(),
            debtor_name: Some("Zacharias Quillfeather".into()),
            debtor_account: Some(clearhouse_iso20022::messages::Account {
                iban: Some("DE44500105175407324931".into()),
                other_id: None,
            }),
            debtor_agent: clearhouse_iso20022::messages::Agent {
                bic: Some(PAYER.into()),
                ..Default::default()
            },
            creditor_agent: clearhouse_iso20022::messages::Agent {
                bic: Some(PAYEE.into()),
                ..Default::default()
            },
            creditor_name: Some("Philippa Marchbanks".into()),
            creditor_account: Some(clearhouse_iso20022::messages::Account {
                iban: Some("FR7630006000011234567890189".into()),
                other_id: None,
            }),
            ..Default::default()
        };
        let pacs008 = clearhouse_iso20022::Pacs008 {
            message_id: "MSG-L-1".into(),
            creation: "2026-11-25T07:30:00.000Z".into(),
            number_of_transactions: "1".into(),
            settlement_method: "CLRG".into(),
            clearing_system: None,
            transactions: vec![tx],
        };
        let xml = pacs008.to_xml();
        let (status, _) = call_raw(&payer, "/v1/iso20022/pacs.008", xml.as_bytes()).await;
        assert_eq!(status, 200);
        let (status, _) = call_raw(
            &payer,
            "/v1/iso20022/pacs.008",
            &xml.as_bytes()[..xml.len() - 40],
        )
        .await;
        assert_eq!(status, 400);
        // A window closes and settles.
        let (status, body) = call(
            &op,
            "POST",
            "/v1/admin/windows/close",
            json!({"settle": true}),
        )
        .await;
        assert!(status < 300, "{body}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    });
    drop(running);

    let log = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(
        log.len() > 2_000,
        "the log captured something: {} bytes",
        log.len()
    );
    assert!(
        log.contains("switch started"),
        "the switch's own logs are captured"
    );
    let operator_key = std::fs::read_to_string(dir.path().join("operator.key")).unwrap();
    let operator_secret = operator_key.split_whitespace().nth(1).unwrap().to_string();
    let mut forbidden: Vec<(String, String)> = vec![
        ("operator secret".into(), operator_secret),
        (
            "checkpoint signing key".into(),
            std::fs::read_to_string(dir.path().join("operator-ed25519.key"))
                .unwrap_or_default()
                .trim()
                .to_string(),
        ),
        ("debtor name".into(), "Quillfeather".into()),
        ("creditor name".into(), "Marchbanks".into()),
        ("debtor account".into(), "DE44500105175407324931".into()),
        (
            "creditor account".into(),
            "FR7630006000011234567890189".into(),
        ),
        ("remittance".into(), "Birkenweg".into()),
    ];
    for bic in [PAYER, PAYEE, SILENT] {
        forbidden.push((format!("secret of {bic}"), hex::encode(secret(bic))));
        forbidden.push((
            format!("raw secret of {bic}"),
            String::from_utf8(secret(bic)).unwrap(),
        ));
    }
    for (what, value) in forbidden {
        if value.is_empty() {
            continue;
        }
        assert!(
            !log.contains(&value),
            "the log holds the {what}: {:?}",
            log.lines().find(|l| l.contains(&value))
        );
    }
}
