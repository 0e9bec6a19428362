//! The switch end to end over real HTTP on loopback: a durable node, the switch's API, and
//! simulated banks (real HTTP servers verifying the switch's signatures).

use std::sync::atomic::Ordering;
use std::time::Duration;

use clearhouse_switch::auth;
use clearhouse_switch::client::SignedClient;
use clearhouse_switch::sim::{SimBank, SimOptions};
use clearhouse_switch::SwitchConfig;
use serde_json::{json, Value};

mod common;
use common::*;

const ACCEPTS: &str = "ACPTDEFF";
const REJECTS: &str = "RJCTDEFF";
const SILENT: &str = "SLNTDEFF";
const OFFLINE: &str = "OFFLDEFF";
const POOR: &str = "POORDEFF";
const DEBTOR: &str = "DBTRDEFF";
const DEFERS: &str = "DEFRDEFF";
const NET: &str = "NETSDEFF";

#[test]
fn payments_end_to_end_over_http() {
    let dir = tempfile::tempdir().unwrap();
    let banks_runtime = banks_runtime();
    let bank = |bic: &str| SimBank {
        bic: bic.to_string(),
        secret: secret(bic),
    };
    let ((accepting, accept_counters), (rejecting, _), (silent, _)) =
        banks_runtime.block_on(async {
            let opts = |reject_per_10k, defer| SimOptions {
                reject_per_10k,
                delay: Duration::ZERO,
                defer,
                switch_url: None,
            };
            (
                start_banks(
                    vec![bank(ACCEPTS), bank(DEBTOR), bank(POOR)],
                    opts(0, false),
                )
                .await,
                start_banks(vec![bank(REJECTS)], opts(10_000, false)).await,
                start_banks(vec![bank(SILENT)], opts(0, true)).await,
            )
        });
    // A port nothing listens on: the offline creditor agent.
    let offline = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", listener.local_addr().unwrap())
    };
    let running = start_switch(dir.path(), config());
    let url = running.url.clone();
    let silent_id = banks_runtime.block_on(async {
        let op = operator(dir.path(), &url);
        let prefunded = json!({"model": "prefunded", "per_payment_max": "1000.00"});
        for (bic, endpoint) in [
            (ACCEPTS, &accepting),
            (DEBTOR, &accepting),
            (POOR, &accepting),
            (REJECTS, &rejecting),
            (SILENT, &silent),
            (OFFLINE, &offline),
        ] {
            onboard(&op, bic, endpoint, prefunded.clone()).await;
        }
        fund(&op, DEBTOR, "5000.00").await;
        fund(&op, POOR, "10.00").await;
        let debtor = client_of(&url, DEBTOR);

        // Happy path: settled, positions moved, the creditor agent notified.
        let (status, body) = call(
            &debtor,
            "POST",
            "/v1/payments",
            payment(DEBTOR, ACCEPTS, "I-1", "100.25"),
        )
        .await;
        assert_eq!(
            (status, body["status"].as_str()),
            (200, Some("ACSC")),
            "{body}"
        );
        assert_eq!(available(&debtor, DEBTOR).await, "4899.75");
        assert_eq!(available(&op, ACCEPTS).await, "100.25");
        // Resubmission: the original outcome, money moved once.
        let (status, again) = call(
            &debtor,
            "POST",
            "/v1/payments",
            payment(DEBTOR, ACCEPTS, "I-1", "100.25"),
        )
        .await;
        assert_eq!(status, 200);
        assert_eq!(again, body);
        assert_eq!(available(&debtor, DEBTOR).await, "4899.75");
        // Concurrent identical submissions: one payment, one answer for all, money moved once.
        let mut copies = Vec::new();
        for _ in 0..8 {
            let client = debtor.clone();
            copies.push(tokio::spawn(async move { call(&client, "POST", "/v1/payments", payment(DEBTOR, ACCEPTS, "C-1", "1.00")).await }));
        }
        let mut ids = std::collections::BTreeSet::new();
        for copy in copies {
            let (status, body) = copy.await.unwrap();
            assert_eq!((status, body["status"].as_str()), (200, Some("ACSC")), "{body}");
            ids.insert(body["payment_id"].as_str().unwrap().to_string());
        }
        assert_eq!(ids.len(), 1, "one payment");
        assert_eq!(available(&debtor, DEBTOR).await, "4898.75");
        // Concurrent identical submissions that are rejected: one rejection, recorded once.
        let mut copies = Vec::new();
        for _ in 0..8 {
            let client = debtor.clone();
            copies.push(tokio::spawn(async move { call(&client, "POST", "/v1/payments", payment(DEBTOR, "NONEDEFF", "C-2", "1.00")).await }));
        }
        let mut ids = std::collections::BTreeSet::new();
        for copy in copies {
            let (_, body) = copy.await.unwrap();
            assert_eq!(body["reason"].as_str(), Some("CNOR"), "{body}");
            ids.insert(body["payment_id"].as_str().unwrap().to_string());
        }
        assert_eq!(ids.len(), 1, "one rejected payment");
        // Give the 1.00 back so the figures below stay as they were.
        let (status, _) = call(&client_of(&url, ACCEPTS), "POST", "/v1/payments", payment(ACCEPTS, DEBTOR, "C-3", "1.00")).await;
        assert_eq!(status, 200);
        assert_eq!(available(&debtor, DEBTOR).await, "4899.75");
        // Same instruction id, other content: DUPL, nothing changes.
        let (status, dupl) = call(
            &debtor,
            "POST",
            "/v1/payments",
            payment(DEBTOR, ACCEPTS, "I-1", "100.26"),
        )
        .await;
        assert_eq!(
            (status, dupl["reason"].as_str()),
            (409, Some("DUPL")),
            "{dupl}"
        );
        // Status by id, instruction id, end-to-end id, UETR.
        let id = body["payment_id"].as_str().unwrap();
        for query in [
            format!("/v1/payments/{id}"),
            "/v1/payments?instruction_id=I-1".into(),
            "/v1/payments?end_to_end_id=E2E-I-1".into(),
            format!("/v1/payments?uetr={}", body["uetr"].as_str().unwrap()),
        ] {
            let (status, found) = call(&debtor, "GET", &query, Value::Null).await;
            assert_eq!(
                (status, found["status"].as_str()),
                (200, Some("ACSC")),
                "{query}: {found}"
            );
        }
        // The creditor agent may read it too; another participant may not (404, not 403).
        assert_eq!(
            call(
                &client_of(&url, ACCEPTS),
                "GET",
                &format!("/v1/payments/{id}"),
                Value::Null
            )
            .await
            .0,
            200
        );
        assert_eq!(
            call(
                &client_of(&url, POOR),
                "GET",
                &format!("/v1/payments/{id}"),
                Value::Null
            )
            .await
            .0,
            404
        );

        // The same payment path in ISO 20022: a pacs.008 in, a pacs.002 out (XSD-valid).
        let tx = clearhouse_iso20022::CreditTransfer {
            instruction_id: Some("X-1".into()),
            end_to_end_id: "E2E-X-1".into(),
            transaction_id: Some("TX-X-1".into()),
            amount: "12.50".into(),
            currency: "EUR".into(),
            charge_bearer: "SLEV".into(),
            debtor_name: Some("Alice".into()),
            debtor_account: Some(clearhouse_iso20022::messages::Account { iban: Some("DE89370400440532013000".into()), other_id: None }),
            debtor_agent: clearhouse_iso20022::messages::Agent { bic: Some(DEBTOR.into()), ..Default::default() },
            creditor_agent: clearhouse_iso20022::messages::Agent { bic: Some(ACCEPTS.into()), ..Default::default() },
            creditor_name: Some("Bob".into()),
            creditor_account: Some(clearhouse_iso20022::messages::Account { iban: Some("FR1420041010050500013M02606".into()), other_id: None }),
            ..Default::default()
        };
        let mut pacs008 = clearhouse_iso20022::Pacs008 {
            message_id: "MSG-X-1".into(),
            creation: "2026-11-25T07:30:00.000Z".into(),
            number_of_transactions: "1".into(),
            settlement_method: "CLRG".into(),
            clearing_system: None,
            transactions: vec![tx],
        };
        let limits = clearhouse_iso20022::Limits::default();
        let (status, answer) = debtor.request("POST", "/v1/iso20022/pacs.008", pacs008.to_xml().as_bytes()).await.unwrap();
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&answer));
        let clearhouse_iso20022::Message::Pacs002(report) = clearhouse_iso20022::Message::parse(&answer, &limits).unwrap() else { panic!("a pacs.002") };
        assert_eq!((report.status.as_str(), report.original_message_id.as_str(), report.original_end_to_end_id.as_deref()), ("ACSC", "MSG-X-1", Some("E2E-X-1")));
        // Every original identification the instruction carried is echoed, TxId too (issue 17.4:
        // accepted payments left OrgnlTxId out).
        assert_eq!((report.original_instruction_id.as_deref(), report.original_transaction_id.as_deref()), (Some("X-1"), Some("TX-X-1")));
        let report_path = dir.path().join("pacs002.xml");
        std::fs::write(&report_path, &answer).unwrap();
        let lint = std::process::Command::new("xmllint").arg("--noout").arg("--schema")
            .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/iso20022/xsd/pacs.002.001.10.xsd"))
            .arg(&report_path).output().expect("xmllint");
        assert!(lint.status.success(), "{}", String::from_utf8_lossy(&lint.stderr));
        // JSON and XML are two views of one payment; resubmitting the XML answers the same.
        let (_, json_view) = call(&debtor, "GET", "/v1/payments?instruction_id=X-1", Value::Null).await;
        assert_eq!((json_view["status"].as_str(), json_view["amount"].as_str()), (Some("ACSC"), Some("12.50")));
        let (status, again) = debtor.request("POST", "/v1/iso20022/pacs.008", pacs008.to_xml().as_bytes()).await.unwrap();
        let clearhouse_iso20022::Message::Pacs002(again) = clearhouse_iso20022::Message::parse(&again, &limits).unwrap() else { panic!() };
        assert_eq!((status, again.status.as_str()), (200, "ACSC"));
        assert_eq!(available(&debtor, DEBTOR).await, "4887.25", "moved once");
        let (status, xml) = debtor.request("GET", &format!("/v1/payments/{}/pacs.002", json_view["payment_id"].as_str().unwrap()), b"").await.unwrap();
        let clearhouse_iso20022::Message::Pacs002(report) = clearhouse_iso20022::Message::parse(&xml, &limits).unwrap() else { panic!() };
        assert_eq!((report.original_message_id.as_str(), report.status.as_str()), ("MSG-X-1", "ACSC"), "the pacs.008's MsgId is kept");
        assert_eq!(status, 200);
        // With a business application header: checked against the sender, answered with one.
        let header = clearhouse_iso20022::AppHeader {
            from: clearhouse_iso20022::messages::Agent { bic: Some(DEBTOR.into()), ..Default::default() },
            to: clearhouse_iso20022::messages::Agent { bic: Some("CLRHXXXX".into()), ..Default::default() },
            business_message_id: "BAH-1".into(),
            message_definition: "pacs.008.001.08".into(),
            business_service: None,
            created: "2026-11-25T07:30:00.000Z".into(),
        };
        let mut with_header = pacs008.clone();
        with_header.message_id = "MSG-H-1".into();
        with_header.transactions[0].instruction_id = Some("H-1".into());
        with_header.transactions[0].end_to_end_id = "E2E-H-1".into();
        with_header.transactions[0].amount = "0.25".into();
        let (status, answer) = debtor
            .request("POST", "/v1/iso20022/pacs.008", clearhouse_iso20022::envelope_xml(&header, with_header.to_document()).as_bytes())
            .await
            .unwrap();
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&answer));
        let (reply_header, report) = clearhouse_iso20022::Message::parse_with_header(&answer, &limits).unwrap();
        let reply_header = reply_header.expect("a reply header");
        assert_eq!((reply_header.from.bic.as_deref(), reply_header.to.bic.as_deref(), reply_header.message_definition.as_str()), (Some("CLRHXXXX"), Some(DEBTOR), "pacs.002.001.10"));
        assert!(matches!(report, clearhouse_iso20022::Message::Pacs002(ref r) if r.status == "ACSC"), "{report:?}");
        let mut forged = header.clone();
        forged.from.bic = Some(POOR.into());
        with_header.transactions[0].instruction_id = Some("H-2".into());
        let (status, _) = debtor
            .request("POST", "/v1/iso20022/pacs.008", clearhouse_iso20022::envelope_xml(&forged, with_header.to_document()).as_bytes())
            .await
            .unwrap();
        assert_eq!(status, 403, "a header naming another sender");
        // Give the 0.25 back so the figures below stay as they were.
        let (status, _) = call(&client_of(&url, ACCEPTS), "POST", "/v1/payments", payment(ACCEPTS, DEBTOR, "H-3", "0.25")).await;
        assert_eq!(status, 200);

        // A pacs.028 status request by UETR answers with a pacs.002; a stranger gets 404.
        let status_request = clearhouse_iso20022::Pacs028 {
            message_id: "REQ-1".into(),
            creation: "2026-11-25T07:31:00.000Z".into(),
            original_message_id: Some("MSG-X-1".into()),
            original_message_name: Some("pacs.008.001.08".into()),
            original_uetr: Some(json_view["uetr"].as_str().unwrap().to_string()),
            ..Default::default()
        };
        let (status, answer) = debtor.request("POST", "/v1/iso20022/pacs.028", status_request.to_xml().as_bytes()).await.unwrap();
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&answer));
        let clearhouse_iso20022::Message::Pacs002(report) = clearhouse_iso20022::Message::parse(&answer, &limits).unwrap() else { panic!() };
        assert_eq!((report.status.as_str(), report.original_end_to_end_id.as_deref()), ("ACSC", Some("E2E-X-1")));
        assert_eq!(report.original_transaction_id.as_deref(), Some("TX-X-1"), "the status report echoes TxId too");
        let (status, answer) = client_of(&url, POOR).request("POST", "/v1/iso20022/pacs.028", status_request.to_xml().as_bytes()).await.unwrap();
        assert_eq!(status, 404);
        // ISO in, ISO out: the refusal is an admi.002 message reject (issue 17.7), not JSON.
        let reject = clearhouse_iso20022::admi::Admi002::parse(&answer, &limits).unwrap();
        assert_eq!(reject.reason, "not_found");
        // Returns: the creditor agent sends (part of) a settled payment back, JSON or pacs.004.
        let payment_id = json_view["payment_id"].as_str().unwrap().to_string();
        let creditor = client_of(&url, ACCEPTS);
        let return_path = format!("/v1/payments/{payment_id}/return");
        let (status, returned) = call(&creditor, "POST", &return_path, json!({"return_id": "RT-1", "amount": "2.50", "reason": "AC04"})).await;
        assert_eq!((status, returned["status"].as_str()), (200, Some("ACSC")), "{returned}");
        assert_eq!(available(&debtor, DEBTOR).await, "4889.75");
        let (_, again) = call(&creditor, "POST", &return_path, json!({"return_id": "RT-1", "amount": "2.50", "reason": "AC04"})).await;
        assert_eq!(again, returned, "a retried return answers the same");
        assert_eq!(available(&debtor, DEBTOR).await, "4889.75", "and moves nothing");
        let (status, body) = call(&creditor, "POST", &return_path, json!({"return_id": "RT-2", "amount": "10.01", "reason": "AC04"})).await;
        assert_eq!((status, body["reason"].as_str()), (409, Some("AM09")), "never more than the payment: {body}");
        let (status, _) = call(&debtor, "POST", &return_path, json!({"return_id": "RT-3", "reason": "AC04"})).await;
        assert_eq!(status, 404, "only the creditor agent returns");
        let (status, body) = call(&creditor, "POST", &return_path, json!({"return_id": "RT-4", "reason": "XX99"})).await;
        assert_eq!((status, body["reason"].as_str()), (400, Some("FF01")), "{body}");
        let pacs004 = clearhouse_iso20022::Pacs004 {
            message_id: "RET-MSG-1".into(),
            creation: "2026-11-25T07:40:00.000Z".into(),
            settlement_method: "CLRG".into(),
            return_id: Some("RT-5".into()),
            original_uetr: Some(json_view["uetr"].as_str().unwrap().to_string()),
            returned_amount: "10.00".into(),
            currency: "EUR".into(),
            reason: Some("MS03".into()),
            ..Default::default()
        };
        // A return in another currency than the payment's is refused (AM03) and moves nothing,
        // as pacs.004 and as JSON (issue 17.1: it was settled as if in EUR).
        let mut in_usd = pacs004.clone();
        in_usd.return_id = Some("RT-USD".into());
        in_usd.currency = "USD".into();
        let (status, answer) = creditor.request("POST", "/v1/iso20022/pacs.004", in_usd.to_xml().as_bytes()).await.unwrap();
        let clearhouse_iso20022::Message::Pacs002(report) = clearhouse_iso20022::Message::parse(&answer, &limits).unwrap() else { panic!() };
        assert_eq!((status, report.status.as_str(), report.reason.as_deref()), (400, "RJCT", Some("AM03")));
        let (status, body) = call(&creditor, "POST", &return_path, json!({"return_id": "RT-USD-2", "amount": "1.00", "currency": "GBP", "reason": "AC04"})).await;
        assert_eq!((status, body["reason"].as_str()), (400, Some("AM03")), "{body}");
        assert_eq!(available(&debtor, DEBTOR).await, "4889.75", "a refused return moves nothing");
        let (status, answer) = creditor.request("POST", "/v1/iso20022/pacs.004", pacs004.to_xml().as_bytes()).await.unwrap();
        let clearhouse_iso20022::Message::Pacs002(report) = clearhouse_iso20022::Message::parse(&answer, &limits).unwrap() else { panic!() };
        assert_eq!((status, report.status.as_str(), report.original_message_name.as_str()), (200, "ACSC", "pacs.004.001.09"));
        assert_eq!(available(&debtor, DEBTOR).await, "4899.75");
        let (_, view) = call(&debtor, "GET", &format!("/v1/payments/{payment_id}"), Value::Null).await;
        assert_eq!((view["status"].as_str(), view["returned_amount"].as_str()), (Some("ACSC"), Some("12.50")), "{view}");
        let mut again = pacs004.clone();
        again.return_id = Some("RT-6".into());
        again.returned_amount = "0.01".into();
        let (status, answer) = creditor.request("POST", "/v1/iso20022/pacs.004", again.to_xml().as_bytes()).await.unwrap();
        let clearhouse_iso20022::Message::Pacs002(report) = clearhouse_iso20022::Message::parse(&answer, &limits).unwrap() else { panic!() };
        assert_eq!((status, report.status.as_str(), report.reason.as_deref()), (409, "RJCT", Some("AM09")));

        // Rules the XSD does not check answer RJCT in a pacs.002: too many decimals for EUR.
        pacs008.message_id = "MSG-X-2".into();
        pacs008.transactions[0].instruction_id = Some("X-2".into());
        pacs008.transactions[0].amount = "1.005".into();
        let (status, answer) = debtor.request("POST", "/v1/iso20022/pacs.008", pacs008.to_xml().as_bytes()).await.unwrap();
        let clearhouse_iso20022::Message::Pacs002(report) = clearhouse_iso20022::Message::parse(&answer, &limits).unwrap() else { panic!() };
        assert_eq!((status, report.status.as_str(), report.reason.as_deref()), (400, "RJCT", Some("AM12")));
        // Unreadable XML: 400 FF01 naming the element, and a DTD is refused.
        let broken = pacs008.to_xml().replace("<EndToEndId>E2E-X-1</EndToEndId>", "");
        let (status, body) = call_raw(&debtor, "/v1/iso20022/pacs.008", broken.as_bytes()).await;
        assert_eq!((status, body["reason"].as_str()), (400, Some("FF01")), "{body}");
        assert!(body["message"].as_str().unwrap().contains("PmtId/EndToEndId"), "{body}");
        let dtd = "<?xml version=\"1.0\"?><!DOCTYPE d [<!ENTITY x \"y\">]><Document/>";
        let (status, body) = call_raw(&debtor, "/v1/iso20022/pacs.008", dtd.as_bytes()).await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(available(&debtor, DEBTOR).await, "4899.75", "nothing moved");

        // Every rejection reason, each recorded and answered with its ISO code.
        let cases = [
            (payment(DEBTOR, REJECTS, "R-AC04", "1.00"), "AC04"),
            (payment(POOR, ACCEPTS, "R-AM04", "10.01"), "AM04"),
            (payment(DEBTOR, ACCEPTS, "R-AM02", "1000.01"), "AM02"),
            (payment(DEBTOR, "NONEDEFF", "R-CNOR", "1.00"), "CNOR"),
            (payment(DEBTOR, OFFLINE, "R-AB08", "1.00"), "AB08"),
            (payment(DEBTOR, DEBTOR, "R-AG03", "1.00"), "AG03"),
        ];
        for (request, reason) in cases {
            let client = client_of(&url, request["debtor_agent"].as_str().unwrap());
            let (status, body) = call(&client, "POST", "/v1/payments", request.clone()).await;
            assert_eq!(
                (status, body["status"].as_str(), body["reason"].as_str()),
                (200, Some("RJCT"), Some(reason)),
                "{body}"
            );
            let again = call(&client, "POST", "/v1/payments", request).await;
            assert_eq!(again.1, body, "a resubmitted rejection answers the same");
        }
        // Liquidity released after every rejection: only the settled payment left the debtor.
        assert_eq!(available(&debtor, DEBTOR).await, "4899.75");
        assert_eq!(available(&op, POOR).await, "10.00");
        // Suspended creditor: AG01; resumed: settles.
        let (status, _) = call(
            &op,
            "PATCH",
            &format!("/v1/admin/participants/{ACCEPTS}"),
            json!({"status": "suspended"}),
        )
        .await;
        assert_eq!(status, 200);
        let (_, body) = call(
            &debtor,
            "POST",
            "/v1/payments",
            payment(DEBTOR, ACCEPTS, "R-AG01", "1.00"),
        )
        .await;
        assert_eq!(body["reason"].as_str(), Some("AG01"), "{body}");
        call(
            &op,
            "PATCH",
            &format!("/v1/admin/participants/{ACCEPTS}"),
            json!({"status": "active"}),
        )
        .await;
        // Bad input: a clear 4xx with a reason code, nothing recorded.
        let mut bad = payment(DEBTOR, ACCEPTS, "B-1", "1.001");
        assert_eq!(
            call(&debtor, "POST", "/v1/payments", bad.clone()).await.1["reason"].as_str(),
            Some("AM12")
        );
        bad["amount"] = json!("1.00");
        bad["currency"] = json!("XYZ");
        assert_eq!(
            call(&debtor, "POST", "/v1/payments", bad.clone()).await.1["reason"].as_str(),
            Some("AM03")
        );
        let (status, body) = debtor
            .request("POST", "/v1/payments", b"{not json")
            .await
            .unwrap();
        assert_eq!(status, 400, "{body:?}");
        assert_eq!(
            call(
                &debtor,
                "GET",
                "/v1/payments?instruction_id=B-1",
                Value::Null
            )
            .await
            .0,
            404
        );

        // Authorization matrix.
        let body = payment(DEBTOR, ACCEPTS, "A-1", "1.00").to_string();
        let raw = SignedClient::new(&url, "nobody", b"x".to_vec());
        assert_eq!(
            raw.send("POST", "/v1/payments", body.as_bytes(), &[])
                .await
                .unwrap()
                .0,
            401,
            "no credentials"
        );
        let (status, _) = call(
            &client_of(&url, POOR),
            "POST",
            "/v1/payments",
            payment(DEBTOR, ACCEPTS, "A-1", "1.00"),
        )
        .await;
        assert_eq!(status, 403, "submitting as another participant");
        let forged = SignedClient::new(&url, &format!("{DEBTOR}-1"), b"wrong secret".to_vec());
        assert_eq!(
            forged
                .request("POST", "/v1/payments", body.as_bytes())
                .await
                .unwrap()
                .0,
            401,
            "bad signature"
        );
        let headers = auth::sign_request(
            &format!("{DEBTOR}-1"),
            &secret(DEBTOR),
            "GET",
            &format!("/v1/payments/{id}"),
            b"",
        );
        assert_eq!(
            raw.send("GET", &format!("/v1/payments/{id}"), b"", &headers)
                .await
                .unwrap()
                .0,
            200
        );
        assert_eq!(
            raw.send("GET", &format!("/v1/payments/{id}"), b"", &headers)
                .await
                .unwrap()
                .0,
            401,
            "replayed nonce"
        );
        let stale_ts = (auth::now_ms() - 60_000).to_string();
        let nonce = auth::new_nonce();
        let sig = auth::signature(
            &secret(DEBTOR),
            "GET",
            &format!("/v1/payments/{id}"),
            &stale_ts,
            &nonce,
            b"",
        );
        let stale = [
            (auth::HEADER_KEY_ID, format!("{DEBTOR}-1")),
            (auth::HEADER_TIMESTAMP, stale_ts),
            (auth::HEADER_NONCE, nonce),
            (auth::HEADER_SIGNATURE, sig),
        ];
        assert_eq!(
            raw.send("GET", &format!("/v1/payments/{id}"), b"", &stale)
                .await
                .unwrap()
                .0,
            401,
            "stale timestamp"
        );
        assert_eq!(
            call(&debtor, "POST", "/v1/admin/participants", json!({}))
                .await
                .0,
            403,
            "participant on the operator API"
        );
        // An https endpoint is refused at onboarding (the switch has no TLS client for calls to
        // participants): before, it was accepted and every forward to it ended AB08.
        let (status, body) = call(&op, "POST", "/v1/admin/participants", json!({
            "bic": "TLSXDEFF", "name": "TLS bank", "endpoint": "https://bank.example/api",
            "currencies": {"EUR": {"model": "prefunded"}},
        })).await;
        assert_eq!((status, body["reason"].as_str()), (400, Some("FF01")), "{body}");
        assert!(body["message"].as_str().unwrap().contains("https"), "{body}");
        assert_eq!(
            call(
                &debtor,
                "GET",
                &format!("/v1/participants/{POOR}/positions"),
                Value::Null
            )
            .await
            .0,
            403
        );
        // Withdrawal beyond what is available: refused, nothing changes.
        let (status, body) = call(
            &op,
            "POST",
            &format!("/v1/admin/participants/{POOR}/liquidity"),
            json!({"request_id": "w1", "currency": "EUR", "amount": "10.01", "direction": "out"}),
        )
        .await;
        assert_eq!((status, body["reason"].as_str()), (409, Some("AM04")));

        // A creditor agent that answers 202 and decides later through the decision API.
        let (deferring, _) = start_banks(vec![bank(DEFERS)], SimOptions { reject_per_10k: 0, delay: Duration::from_millis(100), defer: true, switch_url: Some(url.clone()) }).await;
        onboard(&op, DEFERS, &deferring, prefunded.clone()).await;
        let (status, body) = call(&debtor, "POST", "/v1/payments", payment(DEBTOR, DEFERS, "D-1", "2.00")).await;
        assert_eq!((status, body["status"].as_str()), (200, Some("ACSC")), "{body}");
        assert_eq!(available(&debtor, DEBTOR).await, "4897.75");
        // A decision for a payment that is already final is refused, and changes nothing.
        let late = call(&client_of(&url, DEFERS), "POST", &format!("/v1/payments/{}/decision", body["payment_id"].as_str().unwrap()), json!({"status": "RJCT", "reason": "AC04"})).await;
        assert_eq!(late.0, 409, "{late:?}");

        // Deferred net settlement: a net debit cap instead of prefunding.
        onboard(&op, NET, &accepting, json!({"model": "deferred_net", "net_debit_cap": "100.00", "liquidity_alert_below": "30.00"})).await;
        let net = client_of(&url, NET);
        let (_, body) = call(&net, "POST", "/v1/payments", payment(NET, ACCEPTS, "N-1", "80.00")).await;
        assert_eq!(body["status"].as_str(), Some("ACSC"), "{body}");
        let (_, body) = call(&net, "POST", "/v1/payments", payment(NET, ACCEPTS, "N-2", "20.01")).await;
        assert_eq!(body["reason"].as_str(), Some("AM23"), "beyond the net debit cap: {body}");
        let (status, positions) = call(&net, "GET", &format!("/v1/participants/{NET}/positions"), Value::Null).await;
        assert_eq!(status, 200);
        assert_eq!((positions[0]["balance"].as_str(), positions[0]["available"].as_str()), (Some("-80.00"), Some("20.00")), "{positions}");
        assert_eq!(positions[0]["below_alert"], true);
        // Lowering the cap below the exposure needs the explicit override.
        let change = json!({"currency": "EUR", "net_debit_cap": "50.00"});
        let (status, body) = call(&op, "PATCH", &format!("/v1/admin/participants/{NET}"), change).await;
        assert_eq!((status, body["reason"].as_str()), (409, Some("AM23")), "{body}");
        assert_eq!(available(&net, NET).await, "20.00", "a refused change changes nothing");
        let change = json!({"currency": "EUR", "net_debit_cap": "50.00", "allow_below_exposure": true});
        let (status, body) = call(&op, "PATCH", &format!("/v1/admin/participants/{NET}"), change).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["currencies"]["EUR"]["net_debit_cap"].as_str(), Some("80.00"), "lowered as far as the exposure allows");
        assert_eq!(available(&net, NET).await, "0.00");
        // Raising it is always allowed.
        let (status, _) = call(&op, "PATCH", &format!("/v1/admin/participants/{NET}"), json!({"currency": "EUR", "net_debit_cap": "150.00"})).await;
        assert_eq!(status, 200);
        assert_eq!(available(&net, NET).await, "70.00");

        // Metrics (Prometheus text, no credentials) and readiness.
        let plain = SignedClient::new(&url, "scraper", vec![0]);
        let (status, text) = plain.send("GET", "/metrics", b"", &[]).await.unwrap();
        assert_eq!(status, 200);
        let text = String::from_utf8(text.to_vec()).unwrap();
        let value = |line_start: &str| -> f64 {
            text.lines()
                .find(|l| l.starts_with(line_start))
                .unwrap_or_else(|| panic!("{line_start} in\n{text}"))
                .rsplit(' ')
                .next()
                .unwrap()
                .parse()
                .unwrap()
        };
        assert!(value("clearhouse_payments_final_total{state=\"settled\"}") >= 5.0);
        assert!(value("clearhouse_payments_final_total{state=\"rejected\",reason=\"AC04\"}") >= 1.0);
        assert!(value("clearhouse_payment_stage_seconds_count{stage=\"end_to_end\"}") >= 5.0);
        assert!(value("clearhouse_payment_stage_seconds_count{stage=\"creditor_answer\"}") >= 5.0);
        assert!(value("clearhouse_journal_syncs_total") >= 10.0);
        assert_eq!(value("clearhouse_up"), 1.0);
        assert!(!text.contains("Alice") && !text.contains("DE89"), "no personal data in metrics");
        assert_eq!(plain.send("GET", "/ready", b"", &[]).await.unwrap().0, 200);

        // A silent creditor agent: reserved when the switch stops; the reservation survives.
        let silent_request = payment(DEBTOR, SILENT, "S-1", "50.00");
        let client = debtor.clone();
        let pending =
            tokio::spawn(
                async move { call(&client, "POST", "/v1/payments", silent_request).await },
            );
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            available(&debtor, DEBTOR).await,
            "4847.75",
            "50.00 reserved"
        );
        let (_, found) = call(
            &debtor,
            "GET",
            "/v1/payments?instruction_id=S-1",
            Value::Null,
        )
        .await;
        assert_eq!(found["status"].as_str(), Some("PDNG"));
        assert!(
            accept_counters.notifications.load(Ordering::Relaxed) >= 1,
            "creditor agent notified"
        );
        pending.abort();
        found["payment_id"].as_str().unwrap().to_string()
    });
    // Stop the switch whole (its tasks, the node's threads) with the payment in flight, restart.
    drop(running);
    let running = start_switch(dir.path(), config());
    let url = running.url.clone();
    banks_runtime.block_on(async {
        let debtor = client_of(&url, DEBTOR);
        let (status, found) = call(
            &debtor,
            "GET",
            &format!("/v1/payments/{silent_id}"),
            Value::Null,
        )
        .await;
        assert_eq!(status, 200);
        // The deadline still fires after the restart: AB05, liquidity released.
        let mut last = found;
        for _ in 0..100 {
            if last["status"] != "PDNG" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            last = call(
                &debtor,
                "GET",
                &format!("/v1/payments/{silent_id}"),
                Value::Null,
            )
            .await
            .1;
        }
        assert_eq!(
            (last["status"].as_str(), last["reason"].as_str()),
            (Some("RJCT"), Some("AB05")),
            "{last}"
        );
        assert_eq!(available(&debtor, DEBTOR).await, "4897.75");
        // Settled history survived too.
        let (_, body) = call(
            &debtor,
            "GET",
            "/v1/payments?instruction_id=I-1",
            Value::Null,
        )
        .await;
        assert_eq!(body["status"].as_str(), Some("ACSC"));
        // The OpenAPI document is served.
        let (status, doc) = SignedClient::new(&url, "x", vec![1])
            .send("GET", "/openapi.json", b"", &[])
            .await
            .unwrap();
        assert_eq!(status, 200);
        assert!(
            serde_json::from_slice::<Value>(&doc).unwrap()["paths"]["/v1/payments"].is_object()
        );
    });
    drop(running);
}

#[test]
fn overload_is_answered_early_and_nothing_is_left_reserved() {
    let dir = tempfile::tempdir().unwrap();
    let banks_runtime = banks_runtime();
    let bank = |bic: &str| SimBank {
        bic: bic.to_string(),
        secret: secret(bic),
    };
    let (silent, _) = banks_runtime.block_on(start_banks(
        vec![bank(SILENT), bank(DEBTOR)],
        SimOptions {
            reject_per_10k: 0,
            delay: Duration::ZERO,
            defer: true,
            switch_url: None,
        },
    ));
    let running = start_switch(
        dir.path(),
        SwitchConfig {
            in_flight_per_participant_max: 2,
            ..config()
        },
    );
    let url = running.url.clone();
    banks_runtime.block_on(async {
        let op = operator(dir.path(), &url);
        for bic in [SILENT, DEBTOR] {
            onboard(&op, bic, &silent, json!({"model": "prefunded"})).await;
        }
        fund(&op, DEBTOR, "100.00").await;
        let debtor = client_of(&url, DEBTOR);
        let mut waiting = Vec::new();
        for i in 0..2 {
            let client = debtor.clone();
            waiting.push(tokio::spawn(async move {
                call(
                    &client,
                    "POST",
                    "/v1/payments",
                    payment(DEBTOR, SILENT, &format!("O-{i}"), "10.00"),
                )
                .await
            }));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        // The third is refused at once, with a stable code; nothing reserved for it.
        let (status, body) = call(
            &debtor,
            "POST",
            "/v1/payments",
            payment(DEBTOR, SILENT, "O-2", "10.00"),
        )
        .await;
        assert_eq!(
            (status, body["code"].as_str()),
            (429, Some("too_many_in_flight")),
            "{body}"
        );
        assert_eq!(available(&debtor, DEBTOR).await, "80.00");
        // Both in flight end at the deadline (AB05) and release their liquidity.
        for task in waiting {
            let (status, body) = task.await.unwrap();
            assert_eq!(
                (status, body["reason"].as_str()),
                (200, Some("AB05")),
                "{body}"
            );
        }
        assert_eq!(available(&debtor, DEBTOR).await, "100.00");
        // The refused one was never recorded: submitting it now works (and reaches the deadline).
        let (status, body) = call(
            &debtor,
            "POST",
            "/v1/payments",
            payment(DEBTOR, SILENT, "O-2", "10.00"),
        )
        .await;
        assert_eq!(
            (status, body["reason"].as_str()),
            (200, Some("AB05")),
            "{body}"
        );
        // An oversized body is refused before parsing.
        let huge = vec![b'x'; 128 * 1024];
        let (status, _) = debtor.request("POST", "/v1/payments", &huge).await.unwrap();
        assert_eq!(status, 413);
    });
    drop(running);
}
