//! Scheme profiles over HTTP: FedNow-like (USD, routing numbers, account numbers, header
//! required) and SEPA-Instant-like (EUR, IBANs with valid check sums).

use clearhouse_iso20022::messages::{Account, Agent};
use clearhouse_iso20022::{AppHeader, CreditTransfer, Limits, Message, Pacs008};
use clearhouse_switch::profile::SchemeProfile;
use clearhouse_switch::SwitchConfig;
use serde_json::json;

mod common;
use common::*;

const PAYER: &str = "PAYRUS33";
const PAYEE: &str = "PAYEUS33";
const PAYER_RTN: &str = "011000015";
const PAYEE_RTN: &str = "021000021";

fn fednow_pacs008(id: &str, currency: &str) -> Pacs008 {
    let by_routing = |rtn: &str| Agent {
        bic: None,
        clearing_system: Some("USABA".into()),
        member_id: Some(rtn.into()),
    };
    let account = |number: &str| Account {
        iban: None,
        other_id: Some(number.into()),
    };
    Pacs008 {
        message_id: format!("20261125{PAYER_RTN}{id}"),
        creation: "2026-11-25T07:30:00.000Z".into(),
        number_of_transactions: "1".into(),
        settlement_method: "CLRG".into(),
        clearing_system: None,
        transactions: vec![CreditTransfer {
            end_to_end_id: format!("E2E-{id}"),
            instruction_id: Some(id.into()),
            amount: "25.00".into(),
            currency: currency.into(),
            debtor_name: Some("Alice".into()),
            debtor_account: Some(account("123456789")),
            debtor_agent: by_routing(PAYER_RTN),
            creditor_agent: by_routing(PAYEE_RTN),
            creditor_name: Some("Bob".into()),
            creditor_account: Some(account("987654321")),
            ..Default::default()
        }],
    }
}

fn header(id: &str) -> AppHeader {
    AppHeader {
        from: Agent {
            bic: None,
            clearing_system: Some("USABA".into()),
            member_id: Some(PAYER_RTN.into()),
        },
        to: Agent {
            bic: None,
            clearing_system: Some("USABA".into()),
            member_id: Some("021151080".into()),
        },
        business_message_id: id.into(),
        message_definition: "pacs.008.001.08".into(),
        business_service: Some("frb.fednow.01".into()),
        created: "2026-11-25T07:30:00.000Z".into(),
    }
}

#[test]
fn the_fednow_profile_takes_routing_numbers_and_requires_the_header() {
    let dir = tempfile::tempdir().unwrap();
    let banks_runtime = banks_runtime();
    let (banks, _) =
        banks_runtime.block_on(start_banks(vec![bank(PAYER), bank(PAYEE)], accepting()));
    let running = start_switch(
        dir.path(),
        SwitchConfig {
            scheme_profile: SchemeProfile::Fednow,
            ..config()
        },
    );
    let url = running.url.clone();
    banks_runtime.block_on(async {
        let op = operator(dir.path(), &url);
        let onboard = |bic: &str, rtn: Option<&str>, currency: &str| {
            json!({
                "bic": bic, "name": format!("Bank {bic}"), "endpoint": format!("{banks}/bank/{bic}"),
                "currencies": {currency: {"model": "prefunded"}}, "secret_hex": hex::encode(secret(bic)),
                "routing_number": rtn,
            })
        };
        // Without a routing number, with a wrong check digit, or in EUR: refused.
        for (body, reason) in [
            (onboard(PAYER, None, "USD"), "RC01"),
            (onboard(PAYER, Some("011000016"), "USD"), "RC01"),
            (onboard(PAYER, Some(PAYER_RTN), "EUR"), "AM03"),
        ] {
            let (status, answer) = call(&op, "POST", "/v1/admin/participants", body).await;
            assert_eq!((status, answer["reason"].as_str()), (400, Some(reason)), "{answer}");
        }
        for (bic, rtn) in [(PAYER, PAYER_RTN), (PAYEE, PAYEE_RTN)] {
            let (status, answer) =
                call(&op, "POST", "/v1/admin/participants", onboard(bic, Some(rtn), "USD")).await;
            assert_eq!(status, 201, "{answer}");
        }
        let (status, _) = call(&op, "POST", "/v1/admin/participants", onboard("OTHRUS33", Some(PAYER_RTN), "USD")).await;
        assert_eq!(status, 409, "a routing number names one participant");
        let (status, _) = call(&op, "POST", &format!("/v1/admin/participants/{PAYER}/liquidity"), json!({
            "request_id": "f1", "currency": "USD", "amount": "1000.00", "direction": "in"})).await;
        assert_eq!(status, 200);

        let payer = client_of(&url, PAYER);
        let limits = Limits::default();
        // Agents and sender by routing number, with the header: settled, answered with a header.
        let message = fednow_pacs008("F-1", "USD");
        let envelope = clearhouse_iso20022::envelope_xml(&header("B-1"), message.to_document());
        let (status, answer) = payer.request("POST", "/v1/iso20022/pacs.008", envelope.as_bytes()).await.unwrap();
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&answer));
        let (reply, report) = Message::parse_with_header(&answer, &limits).unwrap();
        assert!(reply.is_some());
        assert!(matches!(report, Message::Pacs002(ref r) if r.status == "ACSC"), "{report:?}");
        assert_eq!(available(&payer, PAYER).await, "975.00");
        // Without the header: refused.
        let (status, answer) = payer
            .request("POST", "/v1/iso20022/pacs.008", fednow_pacs008("F-2", "USD").to_xml().as_bytes())
            .await
            .unwrap();
        assert_eq!(status, 400, "{}", String::from_utf8_lossy(&answer));
        assert!(String::from_utf8_lossy(&answer).contains("header_required"));
        // An IBAN where an account number belongs: AC02 (as a pacs.002 RJCT).
        let mut iban = fednow_pacs008("F-3", "USD");
        iban.transactions[0].debtor_account = Some(Account { iban: Some("DE89370400440532013000".into()), other_id: None });
        let envelope = clearhouse_iso20022::envelope_xml(&header("B-3"), iban.to_document());
        let (status, answer) = payer.request("POST", "/v1/iso20022/pacs.008", envelope.as_bytes()).await.unwrap();
        assert_eq!(status, 400);
        let (_, report) = Message::parse_with_header(&answer, &limits).unwrap();
        assert!(matches!(report, Message::Pacs002(ref r) if r.status == "RJCT" && r.reason.as_deref() == Some("AC02")), "{report:?}");
        // A header from another participant's routing number: 403.
        let mut forged = header("B-4");
        forged.from.member_id = Some(PAYEE_RTN.into());
        let envelope = clearhouse_iso20022::envelope_xml(&forged, fednow_pacs008("F-4", "USD").to_document());
        let (status, _) = payer.request("POST", "/v1/iso20022/pacs.008", envelope.as_bytes()).await.unwrap();
        assert_eq!(status, 403);
        // JSON in EUR: AM03.
        let (status, answer) = call(&payer, "POST", "/v1/payments", json!({
            "instruction_id": "J-1", "end_to_end_id": "E2E-J-1", "debtor_agent": PAYER, "creditor_agent": PAYEE,
            "amount": "1.00", "currency": "EUR",
            "debtor": {"name": "Alice", "account": "123456789"}, "creditor": {"name": "Bob", "account": "987654321"},
        })).await;
        assert_eq!((status, answer["reason"].as_str()), (400, Some("AM03")), "{answer}");

    });
    drop(running);
}

#[test]
fn the_sepa_instant_profile_takes_ibans_with_valid_check_sums() {
    let dir = tempfile::tempdir().unwrap();
    let banks_runtime = banks_runtime();
    let (banks, _) = banks_runtime.block_on(start_banks(
        vec![bank("SEPADEFF"), bank("SEPBFRPP")],
        accepting(),
    ));
    let running = start_switch(
        dir.path(),
        SwitchConfig {
            scheme_profile: SchemeProfile::SepaInstant,
            ..config()
        },
    );
    let url = running.url.clone();
    banks_runtime.block_on(async {
        let op = operator(dir.path(), &url);
        for bic in ["SEPADEFF", "SEPBFRPP"] {
            onboard(&op, bic, &banks, json!({"model": "prefunded"})).await;
        }
        fund(&op, "SEPADEFF", "100.00").await;
        let client = client_of(&url, "SEPADEFF");
        let pay = |id: &str, creditor_account: &str| {
            json!({
                "instruction_id": id, "end_to_end_id": format!("E2E-{id}"), "debtor_agent": "SEPADEFF",
                "creditor_agent": "SEPBFRPP", "amount": "10.00", "currency": "EUR",
                "debtor": {"name": "Alice", "account": "DE89370400440532013000"},
                "creditor": {"name": "Bob", "account": creditor_account},
            })
        };
        let (status, answer) = call(&client, "POST", "/v1/payments", pay("S-1", "FR1420041010050500013M02606")).await;
        assert_eq!((status, answer["status"].as_str()), (200, Some("ACSC")), "{answer}");
        // One digit off: the check sum fails.
        let (status, answer) = call(&client, "POST", "/v1/payments", pay("S-2", "FR1420041010050500013M02607")).await;
        assert_eq!((status, answer["reason"].as_str()), (400, Some("AC03")), "{answer}");
        assert_eq!(available(&client, "SEPADEFF").await, "90.00", "nothing moved for the refusal");
    });
    drop(running);
}
