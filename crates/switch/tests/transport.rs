//! The payment lifecycle talks to participants only through `ParticipantTransport`: a switch
//! started with another transport (here one that delivers in process, as a message-queue
//! transport would from its broker) runs the same lifecycle: the creditor agent's decision
//! settles or rejects, and both agents get their notifications through it. Real HTTP on loopback
//! for the API, the real engine.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use clearhouse_switch::model::Participant;
use clearhouse_switch::outbound::{
    Decision, ForwardError, Notification, ParticipantTransport, Transport,
};
use clearhouse_switch::switch::{Environment, PaymentView};
use serde_json::json;

mod common;
use common::*;

const A: &str = "TRNADEFF";
const B: &str = "TRNBDEFF";

/// Accepts every payment under 50.00 and rejects the rest with AM02; records what it was given.
#[derive(Default)]
struct InProcess {
    forwarded: Mutex<Vec<String>>,
    notified: Mutex<Vec<(String, String)>>,
}

impl ParticipantTransport for InProcess {
    fn forward<'a>(
        &'a self,
        creditor: &'a Participant,
        payment: &'a PaymentView,
        _deadline: tokio::time::Instant,
        _deadline_ns: u64,
    ) -> Pin<Box<dyn Future<Output = Result<Option<Decision>, ForwardError>> + Send + 'a>> {
        Box::pin(async move {
            self.forwarded
                .lock()
                .unwrap()
                .push(format!("{} {}", creditor.bic, payment.instruction_id));
            let cents: u64 = payment.amount.replace('.', "").parse().unwrap();
            Ok(Some(if cents < 5000 {
                Decision::Accept
            } else {
                Decision::Reject("AM02".into())
            }))
        })
    }

    fn notify(&self, participant: &Participant, notification: Notification) {
        let what = match &notification {
            Notification::Payment(view) => format!("{} {}", view.instruction_id, view.status),
            _ => "other".into(),
        };
        self.notified
            .lock()
            .unwrap()
            .push((participant.bic.clone(), what));
    }
}

#[test]
fn the_lifecycle_runs_over_any_transport() {
    let dir = tempfile::tempdir().unwrap();
    let transport = Arc::new(InProcess::default());
    let running = start_switch_in(
        dir.path(),
        config(),
        Environment {
            transport: Transport::Custom(transport.clone()),
            ..Environment::default()
        },
    );
    let url = running.url.clone();
    running.runtime.block_on(async {
        let op = operator(dir.path(), &url);
        for bic in [A, B] {
            // The endpoint is never called: the transport delivers.
            onboard(
                &op,
                bic,
                "http://127.0.0.1:9",
                json!({"model": "prefunded"}),
            )
            .await;
        }
        fund(&op, A, "100.00").await;
        let a = client_of(&url, A);
        let (status, settled) =
            call(&a, "POST", "/v1/payments", payment(A, B, "T-1", "10.00")).await;
        assert_eq!(
            (status, settled["status"].as_str()),
            (200, Some("ACSC")),
            "{settled}"
        );
        let (status, rejected) =
            call(&a, "POST", "/v1/payments", payment(A, B, "T-2", "60.00")).await;
        assert_eq!(
            (
                status,
                rejected["status"].as_str(),
                rejected["reason"].as_str()
            ),
            (200, Some("RJCT"), Some("AM02")),
            "{rejected}"
        );
        assert_eq!(available(&a, A).await, "90.00");
        assert_eq!(
            *transport.forwarded.lock().unwrap(),
            vec![format!("{B} T-1"), format!("{B} T-2")]
        );
        // The creditor agent is always notified; the debtor agent got its answer in time.
        let notified = transport.notified.lock().unwrap().clone();
        assert!(
            notified.contains(&(B.to_string(), "T-1 ACSC".to_string())),
            "{notified:?}"
        );
        assert!(
            notified.contains(&(B.to_string(), "T-2 RJCT".to_string())),
            "{notified:?}"
        );
    });
}
