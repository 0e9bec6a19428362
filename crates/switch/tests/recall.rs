//! Recalls over HTTP: camt.056 from the debtor agent, camt.029 from the creditor agent; an
//! accepted recall returns the money at once (and shows in clearing), a rejected one moves
//! nothing; bad reasons, strangers and replays are refused.

use clearhouse_iso20022::recall::{Assignment, Camt029, Camt056, Original};
use serde_json::{json, Value};

mod common;
use common::*;

const A: &str = "RCLADEFF";
const B: &str = "RCLBDEFF";
const C: &str = "RCLCDEFF";

fn camt056(case: &str, uetr: &str, reason: &str, from: &str) -> String {
    Camt056 {
        assignment: Assignment {
            id: format!("ASG-{case}"),
            assigner_bic: from.into(),
            assignee_bic: "CLRHXXXX".into(),
            created: "2026-11-25T08:00:00.000Z".into(),
            case_id: Some(case.into()),
            case_creator_bic: Some(from.into()),
        },
        original: Original {
            uetr: Some(uetr.into()),
            ..Original::default()
        },
        reason: Some(reason.into()),
        ..Camt056::default()
    }
    .to_xml()
}

fn camt029(case: &str, accept: bool, reason: Option<&str>) -> String {
    Camt029 {
        assignment: Assignment {
            id: format!("RES-{case}"),
            assigner_bic: B.into(),
            assignee_bic: A.into(),
            created: "2026-11-25T08:01:00.000Z".into(),
            case_id: Some(case.into()),
            case_creator_bic: Some(A.into()),
        },
        confirmation: if accept { "CNCL" } else { "RJCR" }.into(),
        status: Some(if accept { "ACCR" } else { "RJCR" }.into()),
        reason: reason.map(str::to_string),
        ..Camt029::default()
    }
    .to_xml()
}

/// Posts an ISO 20022 message; the answer is ISO 20022 too (issue 17.7): a camt.029 with the
/// recall's state (checked against the XSD), an admi.002 message reject, or JSON for
/// authentication and authorization errors. Returned as JSON for the assertions.
async fn post_xml(
    client: &clearhouse_switch::client::SignedClient,
    path: &str,
    xml: &str,
) -> (u16, Value) {
    let (status, body) = client.request("POST", path, xml.as_bytes()).await.unwrap();
    let limits = clearhouse_iso20022::Limits::default();
    if let Ok(answer) = Camt029::parse(&body, &limits) {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), &body).unwrap();
        let lint = std::process::Command::new("xmllint")
            .args(["--noout", "--schema"])
            .arg(
                std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("../../../shared/iso20022/xsd/camt.029.001.09.xsd"),
            )
            .arg(file.path())
            .output()
            .expect("xmllint");
        assert!(
            lint.status.success(),
            "{}",
            String::from_utf8_lossy(&lint.stderr)
        );
        let state = match answer.status.as_deref() {
            Some("PDCR") => "requested",
            Some("ACCR") => "accepted",
            Some("RJCR") => "rejected",
            other => panic!("camt.029 status {other:?}"),
        };
        return (
            status,
            json!({"camt": "029", "state": state, "recall_id": answer.cancellation_status_id,
                   "rejection_reason": answer.reason, "to": answer.assignment.assignee_bic}),
        );
    }
    if let Ok(reject) = clearhouse_iso20022::admi::Admi002::parse(&body, &limits) {
        return (
            status,
            json!({"admi": "002", "reason": reject.reason, "message": reject.description}),
        );
    }
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

#[test]
fn recalls_return_the_money_when_accepted_and_nothing_when_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let banks_runtime = banks_runtime();
    let (banks, counters) =
        banks_runtime.block_on(start_banks(vec![bank(A), bank(B), bank(C)], accepting()));
    let running = start_switch(dir.path(), config());
    let url = running.url.clone();
    banks_runtime.block_on(async {
        let op = operator(dir.path(), &url);
        for bic in [A, B, C] {
            onboard(&op, bic, &banks, json!({"model": "prefunded"})).await;
        }
        fund(&op, A, "100.00").await;
        fund(&op, B, "10.00").await;
        let (a, b, c) = (client_of(&url, A), client_of(&url, B), client_of(&url, C));
        let (status, paid) = call(&a, "POST", "/v1/payments", payment(A, B, "R-1", "30.00")).await;
        assert_eq!(
            (status, paid["status"].as_str()),
            (200, Some("ACSC")),
            "{paid}"
        );
        let uetr = paid["uetr"].as_str().unwrap().to_string();

        // Bad reason, strangers, the wrong side: refused, nothing recorded.
        let (status, body) = post_xml(
            &a,
            "/v1/iso20022/camt.056",
            &camt056("C-0", &uetr, "ZZZZ", A),
        )
        .await;
        assert_eq!(
            (status, body["reason"].as_str()),
            (400, Some("FF01")),
            "{body}"
        );
        let (status, _) = post_xml(
            &c,
            "/v1/iso20022/camt.056",
            &camt056("C-0", &uetr, "DUPL", C),
        )
        .await;
        assert_eq!(status, 404, "another participant's payment is not found");
        let (status, _) = post_xml(
            &c,
            "/v1/iso20022/camt.056",
            &camt056("C-0", &uetr, "DUPL", A),
        )
        .await;
        assert_eq!(status, 403, "the assigner must be the caller");
        let (status, _) = post_xml(&a, "/v1/iso20022/camt.056", "<Document/>").await;
        assert_eq!(status, 400);
        // The original amount, when stated, must be the payment's: currency (AM03), amount.
        for (amount, currency, reason) in [("30.00", "USD", "AM03"), ("29.99", "EUR", "FF01")] {
            let mut request = clearhouse_iso20022::recall::Camt056::parse(
                camt056("C-0", &uetr, "DUPL", A).as_bytes(),
                &clearhouse_iso20022::Limits::default(),
            )
            .unwrap();
            request.original_amount = Some((amount.into(), currency.into()));
            let (status, body) = post_xml(&a, "/v1/iso20022/camt.056", &request.to_xml()).await;
            assert_eq!(
                (status, body["reason"].as_str()),
                (400, Some(reason)),
                "{amount} {currency}: {body}"
            );
        }

        // The request, and its replay.
        let (status, recall) = post_xml(
            &a,
            "/v1/iso20022/camt.056",
            &camt056("C-1", &uetr, "DUPL", A),
        )
        .await;
        assert_eq!(
            (status, recall["state"].as_str()),
            (202, Some("requested")),
            "{recall}"
        );
        assert_eq!(recall["to"], A, "the answer is addressed to the requester");
        let (_, shown) = call(
            &a,
            "GET",
            &format!("/v1/recalls/{}", recall["recall_id"].as_str().unwrap()),
            Value::Null,
        )
        .await;
        assert_eq!(shown["assignee"], B);
        let (status, again) = post_xml(
            &a,
            "/v1/iso20022/camt.056",
            &camt056("C-1", &uetr, "DUPL", A),
        )
        .await;
        assert_eq!((status, &again["recall_id"]), (202, &recall["recall_id"]));

        // The creditor agent accepts: the 30.00 goes back at once.
        let (status, resolved) =
            post_xml(&b, "/v1/iso20022/camt.029", &camt029("C-1", true, None)).await;
        assert_eq!(status, 200, "{resolved}");
        assert_eq!(resolved["state"], "accepted");
        // The return it made (RCL-<case>), asked again by its id: answered the same.
        let (status, returned) = call(
            &b,
            "POST",
            &format!(
                "/v1/payments/{}/return",
                paid["payment_id"].as_str().unwrap()
            ),
            json!({"return_id": "RCL-C-1", "reason": "FOCR"}),
        )
        .await;
        assert_eq!(status, 200, "{returned}");
        assert_eq!(returned["amount"], "30.00");
        // What the agents are notified with: the return as a pacs.004, valid per the XSD.
        let view: clearhouse_switch::switch::ReturnView =
            serde_json::from_value(returned.clone()).unwrap();
        let pacs004 = dir.path().join("return.pacs004.xml");
        std::fs::write(&pacs004, view.pacs004().to_xml()).unwrap();
        let lint = std::process::Command::new("xmllint")
            .args(["--noout", "--schema"])
            .arg(
                std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("../../../shared/iso20022/xsd/pacs.004.001.09.xsd"),
            )
            .arg(&pacs004)
            .output()
            .expect("xmllint");
        assert!(
            lint.status.success(),
            "{}",
            String::from_utf8_lossy(&lint.stderr)
        );
        assert_eq!(available(&a, A).await, "100.00");
        assert_eq!(available(&b, B).await, "10.00");
        let recall_path = format!("/v1/recalls/{}", recall["recall_id"].as_str().unwrap());
        let (status, shown) = call(&a, "GET", &recall_path, Value::Null).await;
        assert_eq!((status, shown["state"].as_str()), (200, Some("accepted")));
        let (status, _) = call(&c, "GET", &recall_path, Value::Null).await;
        assert_eq!(status, 404);
        // Accepting again answers the same, moves nothing.
        let (status, _) = post_xml(&b, "/v1/iso20022/camt.029", &camt029("C-1", true, None)).await;
        assert_eq!(status, 200);
        assert_eq!(available(&a, A).await, "100.00");

        // A second payment, recalled and rejected: nothing moves.
        let (_, paid) = call(&a, "POST", "/v1/payments", payment(A, B, "R-2", "20.00")).await;
        let uetr = paid["uetr"].as_str().unwrap().to_string();
        let (status, _) = post_xml(
            &a,
            "/v1/iso20022/camt.056",
            &camt056("C-2", &uetr, "FRAD", A),
        )
        .await;
        assert_eq!(status, 202);
        let (status, body) = post_xml(
            &b,
            "/v1/iso20022/camt.029",
            &camt029("C-2", false, Some("ZZZZ")),
        )
        .await;
        assert_eq!(
            (status, body["reason"].as_str()),
            (400, Some("FF01")),
            "{body}"
        );
        let (status, resolved) = post_xml(
            &b,
            "/v1/iso20022/camt.029",
            &camt029("C-2", false, Some("NOAS")),
        )
        .await;
        assert_eq!(status, 200, "{resolved}");
        assert_eq!(resolved["state"], "rejected");
        assert_eq!(resolved["rejection_reason"], "NOAS");
        assert_eq!(available(&a, A).await, "80.00");
        // Accepting after rejecting: refused.
        let (status, _) = post_xml(&b, "/v1/iso20022/camt.029", &camt029("C-2", true, None)).await;
        assert_eq!(status, 409);

        // The return is in clearing: A paid 50 and got 30 back; B the opposite.
        let (status, report) = call(&op, "POST", "/v1/admin/windows/close", Value::Null).await;
        assert_eq!(status, 200, "{report}");
        assert_eq!(report["breaks"], json!([]));
        let net_of = |bic: &str| {
            report["plan"]["positions"]
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["participant"] == bic)
                .map(|p| p["net_minor_units"].as_str().unwrap().to_string())
        };
        assert_eq!(net_of(A).as_deref(), Some("-2000"));
        assert_eq!(net_of(B).as_deref(), Some("2000"));
        // Notifications reached the banks (the camt.056 to B, the camt.029s to A, payments).
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert!(
            counters
                .notifications
                .load(std::sync::atomic::Ordering::Relaxed)
                >= 4
        );
    });
    drop(running);
}
