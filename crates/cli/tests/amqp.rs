//! Participants over AMQP 0-9-1 with a real RabbitMQ broker (Debian's `rabbitmq-server`,
//! installed by .ci/run, started here as a private node on free loopback ports): the switch
//! (`clearhouse serve` with an `[amqp]` section), simulated banks on the broker
//! (`clearhouse sim-banks --amqp`) and on HTTP, and this test as an AMQP debtor agent.

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clearhouse_amqp::client::AmqpParticipant;
use clearhouse_amqp::testing::Rabbit;
use clearhouse_amqp::{queues, signed_headers, HEADER_METHOD, HEADER_PATH};
use serde_json::{json, Value};

use common::*;

/// HTTP bank, AMQP bank served by sim-banks, AMQP bank nobody serves, AMQP bank = this test.
const HTTP_BANK: &str = "MQHTDEFF";
const MQ_BANK: &str = "MQSBDEFF";
const SILENT_BANK: &str = "MQSIDEFF";
const TEST_BANK: &str = "MQTEDEFF";
const BANKS: [&str; 4] = [HTTP_BANK, MQ_BANK, SILENT_BANK, TEST_BANK];

struct Scheme {
    dir: tempfile::TempDir,
    rabbit: Rabbit,
    url: String,
    server: Option<Killed>,
    _banks: Option<Killed>,
    runtime: tokio::runtime::Runtime,
}

impl Scheme {
    fn start() -> Scheme {
        let dir = tempfile::tempdir().unwrap();
        let rabbit = Rabbit::start(dir.path()).unwrap();
        let config = dir.path().join("switch.toml");
        std::fs::write(
            &config,
            format!(
                "settle_deadline_ms = 3000\n\n[amqp]\nurl = \"{}\"\nprefetch = 64\n",
                rabbit.switch_url()
            ),
        )
        .unwrap();
        let data = dir.path().join("data");
        let (server, url) = spawn(
            &[
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--config",
                config.to_str().unwrap(),
            ],
            Some(&data),
            &[],
        );
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let mut scheme = Scheme {
            dir,
            rabbit,
            url,
            server: Some(server),
            _banks: None,
            runtime,
        };
        let banks_file = scheme.dir.path().join("banks.json");
        std::fs::write(
            &banks_file,
            json!(BANKS
                .iter()
                .map(|b| json!({"bic": b, "secret_hex": secret(b), "amqp": *b == MQ_BANK}))
                .collect::<Vec<_>>())
            .to_string(),
        )
        .unwrap();
        let broker = scheme.rabbit.url();
        let (banks, banks_url) = spawn(
            &[
                "sim-banks",
                "--reject-per-10k",
                "2000",
                "--banks",
                banks_file.to_str().unwrap(),
                "--amqp",
                &broker,
            ],
            None,
            &[],
        );
        scheme._banks = Some(banks);
        let op = scheme.operator();
        scheme.runtime.block_on(async {
            for bic in BANKS {
                let endpoint = if bic == HTTP_BANK {
                    format!("{banks_url}/bank/{bic}")
                } else {
                    "amqp:".to_string()
                };
                let (status, body) = call(&op, "POST", "/v1/admin/participants", json!({
                    "bic": bic, "name": format!("Bank {bic}"), "endpoint": endpoint,
                    "currencies": {"EUR": {"model": "prefunded"}}, "secret_hex": secret(bic),
                }))
                .await
                .unwrap();
                assert_eq!(status, 201, "{body}");
                let (status, body) = call(&op, "POST", &format!("/v1/admin/participants/{bic}/liquidity"), json!({
                    "request_id": format!("fund-{bic}"), "currency": "EUR", "amount": "100000.00", "direction": "in"}))
                .await
                .unwrap();
                assert_eq!(status, 200, "{body}");
            }
        });
        // The participants' broker users, as the operator fetches them.
        let output = Command::new(env!("CARGO_BIN_EXE_clearhouse"))
            .args(["admin", "--url", &scheme.url, "--key-file"])
            .arg(scheme.dir.path().join("data").join("operator.key"))
            .arg("amqp-definitions")
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let definitions: Value = serde_json::from_slice(&output.stdout).unwrap();
        // The participants' broker users, as the operator imports them.
        assert_eq!(definitions["users"].as_array().unwrap().len(), 3);
        scheme.rabbit.import(&definitions).unwrap();
        scheme
    }

    /// SIGKILL to the switch, then a new one on the same data directory and configuration.
    fn kill_and_restart_switch(&mut self) {
        drop(self.server.take());
        let (server, url) = spawn(
            &[
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--config",
                self.dir.path().join("switch.toml").to_str().unwrap(),
            ],
            Some(&self.dir.path().join("data")),
            &[],
        );
        self.server = Some(server);
        self.url = url;
    }

    fn operator(&self) -> clearhouse_switch::client::SignedClient {
        let text =
            std::fs::read_to_string(self.dir.path().join("data").join("operator.key")).unwrap();
        let mut parts = text.split_whitespace();
        clearhouse_switch::client::SignedClient::new(
            &self.url,
            parts.next().unwrap(),
            hex::decode(parts.next().unwrap()).unwrap(),
        )
    }

    /// This test's bank on the broker (retried until the switch has declared its queues).
    fn connect(&self, bic: &str) -> Arc<AmqpParticipant> {
        let broker = self.rabbit.url();
        let secret = hex::decode(secret(bic)).unwrap();
        let started = Instant::now();
        loop {
            match self
                .runtime
                .block_on(AmqpParticipant::connect(&broker, bic, &secret))
            {
                Ok(participant) => return Arc::new(participant),
                Err(error) => {
                    assert!(
                        started.elapsed() < Duration::from_secs(30),
                        "{bic} on the broker: {error}"
                    );
                    std::thread::sleep(Duration::from_millis(300));
                }
            }
        }
    }
}

fn payment(debtor: &str, creditor: &str, instruction: &str, amount: &str) -> Value {
    json!({
        "instruction_id": instruction, "end_to_end_id": format!("E2E-{instruction}"),
        "debtor_agent": debtor, "creditor_agent": creditor, "amount": amount, "currency": "EUR",
        "debtor": {"name": "Alice", "account": "DE89370400440532013000"},
        "creditor": {"name": "Bob", "account": "FR1420041010050500013M02606"},
    })
}

/// Sends a JSON instruction over the broker; returns (status, body).
async fn instruct(bank: &AmqpParticipant, method: &str, path: &str, body: &Value) -> (u16, Value) {
    let bytes = if body.is_null() {
        Vec::new()
    } else {
        body.to_string().into_bytes()
    };
    let answer = bank
        .request(
            method,
            path,
            &bytes,
            "application/json",
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    (
        answer.status,
        serde_json::from_slice(&answer.body).unwrap_or(Value::Null),
    )
}

#[test]
fn the_payment_lifecycle_over_rabbitmq_mixed_with_http() {
    let mut scheme = Scheme::start();
    let me = scheme.connect(TEST_BANK);
    let url = scheme.url.clone();
    let mut told: ToldMap = BTreeMap::new();
    let (outcomes, duplicate, silent) = scheme.runtime.block_on(async {
        let mut outcomes = BTreeMap::<String, usize>::new();
        // AMQP debtor -> HTTP creditor, HTTP debtor -> AMQP creditor, AMQP -> AMQP.
        for n in 0..60u32 {
            let (debtor, creditor) = match n % 3 {
                0 => (TEST_BANK, HTTP_BANK),
                1 => (HTTP_BANK, MQ_BANK),
                _ => (TEST_BANK, MQ_BANK),
            };
            let instruction = format!("MQ-{n}");
            let body = payment(
                debtor,
                creditor,
                &instruction,
                &format!("{}.{:02}", 1 + n, n),
            );
            let (status, answer) = if debtor == TEST_BANK {
                instruct(&me, "POST", "/v1/payments", &body).await
            } else {
                call(&client(&url, debtor), "POST", "/v1/payments", body)
                    .await
                    .unwrap()
            };
            assert_eq!(status, 200, "{instruction}: {answer}");
            let state = answer["status"].as_str().unwrap().to_string();
            let reason = answer["reason"].as_str().map(str::to_string);
            assert!(
                state == "ACSC" || (state == "RJCT" && reason.as_deref() == Some("AC04")),
                "{answer}"
            );
            *outcomes
                .entry(format!("{debtor}->{creditor} {state}"))
                .or_default() += 1;
            told.insert(instruction, (debtor.to_string(), Some((state, reason))));
        }
        // The same instruction again, in a new message: the same answer, nothing new.
        let first = payment(TEST_BANK, MQ_BANK, "MQ-2", "3.02");
        let (status, again) = instruct(&me, "POST", "/v1/payments", &first).await;
        let (_, original) = call(
            &client(&url, TEST_BANK),
            "GET",
            "/v1/payments?instruction_id=MQ-2",
            Value::Null,
        )
        .await
        .unwrap();
        assert_eq!(status, 200, "{again}");
        let duplicate = (again["payment_id"] == original["payment_id"])
            && (again["status"] == original["status"]);
        // A creditor agent on the broker that never reads its queue: AB05 at the deadline.
        let (status, silent) = instruct(
            &me,
            "POST",
            "/v1/payments",
            &payment(TEST_BANK, SILENT_BANK, "MQ-SILENT", "1.00"),
        )
        .await;
        assert_eq!(status, 200, "{silent}");
        told.insert(
            "MQ-SILENT".into(),
            (TEST_BANK.into(), Some(("RJCT".into(), Some("AB05".into())))),
        );
        (outcomes, duplicate, silent)
    });
    eprintln!("outcomes: {outcomes:?}");
    assert!(duplicate, "a duplicate instruction is answered the same");
    assert_eq!(silent["status"], "RJCT");
    assert_eq!(silent["reason"], "AB05");
    for pair in [
        format!("{TEST_BANK}->{HTTP_BANK} ACSC"),
        format!("{HTTP_BANK}->{MQ_BANK} ACSC"),
        format!("{TEST_BANK}->{MQ_BANK} ACSC"),
    ] {
        assert!(outcomes.contains_key(&pair), "{pair} in {outcomes:?}");
    }
    assert!(
        outcomes.keys().any(|k| k.ends_with("RJCT")),
        "some rejected (AC04): {outcomes:?}"
    );

    // A forged instruction on its own queue (body changed after signing): 401, nothing made.
    let forged = scheme.runtime.block_on(async {
        let signed = payment(TEST_BANK, HTTP_BANK, "MQ-FORGED", "1.00").to_string();
        let altered = payment(TEST_BANK, HTTP_BANK, "MQ-FORGED", "9999.00").to_string();
        let secret = hex::decode(secret(TEST_BANK)).unwrap();
        let headers = signed_headers(
            &format!("{TEST_BANK}-1"),
            &secret,
            "POST",
            "/v1/payments",
            signed.as_bytes(),
            &[
                (HEADER_METHOD, "POST".into()),
                (HEADER_PATH, "/v1/payments".into()),
            ],
        );
        me.publish_raw(
            &queues::inbound(TEST_BANK),
            "forged-1",
            altered.as_bytes(),
            "application/json",
            headers,
        )
        .await
        .unwrap();
        // Its answer arrives on the answers queue under its message id: wait for the refusal by
        // asking for the payment until the forged message has surely been served.
        tokio::time::sleep(Duration::from_secs(2)).await;
        call(
            &client(&url, TEST_BANK),
            "GET",
            "/v1/payments?instruction_id=MQ-FORGED",
            Value::Null,
        )
        .await
        .unwrap()
    });
    assert_eq!(
        forged.0, 404,
        "a forged instruction changed nothing: {}",
        forged.1
    );
    let metrics = metrics_text(&url);
    let refused = metric(&metrics, "clearhouse_amqp_refused_total");
    assert!(
        refused >= 1,
        "the forged instruction counted as refused: {metrics}"
    );

    // Publishing into another participant's queue is refused by the broker itself.
    let intruder = scheme.connect(TEST_BANK);
    let intrusion = scheme.runtime.block_on(
        intruder.publish_instruction(
            &queues::inbound(MQ_BANK),
            "intrusion-1",
            "POST",
            "/v1/payments",
            payment(MQ_BANK, HTTP_BANK, "MQ-INTRUDER", "1.00")
                .to_string()
                .as_bytes(),
            "application/json",
        ),
    );
    let error = intrusion
        .expect_err("the broker refuses a write to another's exchange")
        .to_string();
    assert!(
        error.contains("ACCESS_REFUSED") || error.contains("403"),
        "{error}"
    );
    let intruder = scheme.connect(TEST_BANK);
    let intrusion = scheme.runtime.block_on(intruder.publish_instruction(
        "",
        "intrusion-2",
        "POST",
        "/v1/payments",
        b"{}",
        "application/json",
    ));
    let error = intrusion
        .expect_err("the default exchange is closed to participants")
        .to_string();
    assert!(
        error.contains("ACCESS_REFUSED") || error.contains("403"),
        "{error}"
    );

    // The broker crashes: an HTTP debtor's payment to an AMQP creditor ends AB08 (the forward
    // could not be queued), payments between HTTP participants are not touched... and once the
    // broker is back, everyone reconnects and payments over the broker settle again.
    scheme.rabbit.kill();
    let (status, unreachable) = scheme
        .runtime
        .block_on(call(
            &client(&url, HTTP_BANK),
            "POST",
            "/v1/payments",
            payment(HTTP_BANK, MQ_BANK, "MQ-DOWN", "1.00"),
        ))
        .unwrap();
    assert_eq!(status, 200, "{unreachable}");
    assert_eq!(unreachable["status"], "RJCT", "{unreachable}");
    assert_eq!(unreachable["reason"], "AB08", "{unreachable}");
    told.insert(
        "MQ-DOWN".into(),
        (HTTP_BANK.into(), Some(("RJCT".into(), Some("AB08".into())))),
    );
    scheme.rabbit.run().unwrap();
    let started = Instant::now();
    let settled_after = loop {
        let n = started.elapsed().as_millis();
        let instruction = format!("MQ-BACK-{n}");
        let (status, answer) = scheme
            .runtime
            .block_on(call(
                &client(&url, HTTP_BANK),
                "POST",
                "/v1/payments",
                payment(HTTP_BANK, MQ_BANK, &instruction, "2.00"),
            ))
            .unwrap();
        assert_eq!(status, 200, "{answer}");
        let state = answer["status"].as_str().unwrap().to_string();
        let reason = answer["reason"].as_str().map(str::to_string);
        told.insert(
            instruction,
            (HTTP_BANK.into(), Some((state.clone(), reason.clone()))),
        );
        if state == "ACSC" {
            break started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "settling over the broker again: {answer}"
        );
    };
    eprintln!("payments over the broker settle again {settled_after:?} after its restart");
    // The test's own bank reconnects too, and its instructions are served again.
    let me = scheme.connect(TEST_BANK);
    let (status, again) = scheme.runtime.block_on(instruct(
        &me,
        "POST",
        "/v1/payments",
        &payment(TEST_BANK, HTTP_BANK, "MQ-AFTER", "1.00"),
    ));
    assert_eq!(status, 200, "{again}");
    told.insert(
        "MQ-AFTER".into(),
        (
            TEST_BANK.into(),
            Some((
                again["status"].as_str().unwrap().into(),
                again["reason"].as_str().map(str::to_string),
            )),
        ),
    );

    // Every answer stands, books balance, the window holds each settled payment once.
    let op = scheme.operator();
    scheme.runtime.block_on(check_told_and_books(
        &url,
        &op,
        &told,
        &BANKS,
        4 * 10_000_000,
    ));
}

fn metric(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} in {metrics}"))
}

#[test]
fn a_switch_killed_under_amqp_load_answers_every_instruction_after_its_restart() {
    let mut scheme = Scheme::start();
    let me = scheme.connect(TEST_BANK);
    let answered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // 4 senders on the broker, each instruction awaited (up to 2 minutes: across the restart).
    let senders: Vec<_> = (0..4u32)
        .map(|c| {
            let me = me.clone();
            let answered = answered.clone();
            scheme.runtime.spawn(async move {
                let mut answers = Vec::new();
                for n in 0..50u32 {
                    let instruction = format!("KILL-{c}-{n}");
                    let creditor = if n % 2 == 0 { HTTP_BANK } else { MQ_BANK };
                    let body = payment(
                        TEST_BANK,
                        creditor,
                        &instruction,
                        &format!("{}.{:02}", 1 + n, c),
                    );
                    let answer = me
                        .request_with_id(
                            &instruction,
                            "POST",
                            "/v1/payments",
                            body.to_string().as_bytes(),
                            "application/json",
                            Duration::from_secs(120),
                        )
                        .await
                        .unwrap_or_else(|e| panic!("{instruction}: {e}"));
                    let value: Value = serde_json::from_slice(&answer.body).unwrap_or(Value::Null);
                    answers.push((instruction, answer.status, value));
                    answered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                answers
            })
        })
        .collect();
    // Killed with a quarter answered: the rest are in flight or still in the queue.
    while answered.load(std::sync::atomic::Ordering::Relaxed) < 50 {
        std::thread::sleep(Duration::from_millis(5));
    }
    let killed_at = Instant::now();
    scheme.kill_and_restart_switch();
    eprintln!("switch restarted in {:?}", killed_at.elapsed());
    let mut told: ToldMap = BTreeMap::new();
    let mut settled = 0;
    for sender in senders {
        for (instruction, status, answer) in scheme.runtime.block_on(sender).unwrap() {
            assert_eq!(status, 200, "{instruction}: {answer}");
            let state = answer["status"].as_str().unwrap().to_string();
            assert!(
                state == "ACSC" || state == "RJCT",
                "{instruction}: final, {answer}"
            );
            settled += usize::from(state == "ACSC");
            let reason = answer["reason"].as_str().map(str::to_string);
            told.insert(instruction, (TEST_BANK.to_string(), Some((state, reason))));
        }
    }
    assert_eq!(told.len(), 200);
    assert!(settled > 100, "most settle: {settled}");
    let op = scheme.operator();
    let url = scheme.url.clone();
    scheme.runtime.block_on(check_told_and_books(
        &url,
        &op,
        &told,
        &BANKS,
        4 * 10_000_000,
    ));
}

/// ISO 20022 over the broker: `bench payments --amqp --xml` sends pacs.008 to the debtors'
/// queues and reads pacs.002 answers from theirs; every payment ends final, the books balance.
#[test]
fn pacs008_in_and_pacs002_out_over_the_broker() {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_clearhouse"))
        .args([
            "bench",
            "payments",
            "--payments",
            "300",
            "--participants",
            "4",
            "--clients",
            "4",
            "--amqp",
            "--xml",
            "--json",
            "--data-dir",
        ])
        .arg(dir.path().join("bench"))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    let rejected: u64 = report["rejected_by_reason"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(
        report["settled"].as_u64().unwrap() + rejected,
        300,
        "{report}"
    );
    assert!(report["settled"].as_u64().unwrap() > 250, "{report}");
    assert_eq!(report["http_errors_by_status"], json!({}), "{report}");
    assert_eq!(report["books_balance"], true, "{report}");
    assert!(report["workload"].as_str().unwrap().contains("pacs.008"));
    assert!(
        report["cpu_seconds_per_1000_by_process"]["rabbitmq"]
            .as_f64()
            .unwrap()
            > 0.0
    );
}

/// Connects `bic` to the broker at `broker`, retrying for up to 60 s (the broker restarting).
async fn connect_retrying(broker: &str, bic: &str) -> Arc<AmqpParticipant> {
    let secret = hex::decode(secret(bic)).unwrap();
    let started = Instant::now();
    loop {
        match AmqpParticipant::connect(broker, bic, &secret).await {
            Ok(participant) => return Arc::new(participant),
            Err(error) => {
                assert!(
                    started.elapsed() < Duration::from_secs(60),
                    "{bic} back on the broker: {error}"
                );
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    }
}

#[test]
fn the_broker_killed_and_restarted_under_load_loses_nothing() {
    let mut scheme = Scheme::start();
    let broker = scheme.rabbit.url();
    let url = scheme.url.clone();
    let me = Arc::new(tokio::sync::RwLock::new(scheme.connect(TEST_BANK)));
    let answered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // Over the broker: each instruction resent, with the same message id, on a new connection
    // until it is answered (what a participant's middleware does).
    let amqp_sender = {
        let (me, answered, broker) = (me.clone(), answered.clone(), broker.clone());
        scheme.runtime.spawn(async move {
            let mut answers = Vec::new();
            for n in 0..60u32 {
                let instruction = format!("BRK-MQ-{n}");
                let body = payment(TEST_BANK, HTTP_BANK, &instruction, &format!("{}.00", 1 + n))
                    .to_string();
                let started = Instant::now();
                let answer = loop {
                    let participant = me.read().await.clone();
                    match participant
                        .request_with_id(
                            &instruction,
                            "POST",
                            "/v1/payments",
                            body.as_bytes(),
                            "application/json",
                            Duration::from_secs(15),
                        )
                        .await
                    {
                        Ok(answer) => break answer,
                        Err(error) => {
                            assert!(
                                started.elapsed() < Duration::from_secs(120),
                                "{instruction}: {error}"
                            );
                            if !participant.is_connected() {
                                let fresh = connect_retrying(&broker, TEST_BANK).await;
                                *me.write().await = fresh;
                            }
                        }
                    }
                };
                let value: Value = serde_json::from_slice(&answer.body).unwrap_or(Value::Null);
                answers.push((instruction, answer.status, value));
                answered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            answers
        })
    };
    // Over HTTP to the AMQP creditor: AB08 while the broker is down, settled before and after.
    let http_sender = {
        let (url, answered) = (url.clone(), answered.clone());
        scheme.runtime.spawn(async move {
            let mut answers = Vec::new();
            for n in 0..60u32 {
                let instruction = format!("BRK-HT-{n}");
                let (status, value) = call(
                    &client(&url, HTTP_BANK),
                    "POST",
                    "/v1/payments",
                    payment(HTTP_BANK, MQ_BANK, &instruction, "2.00"),
                )
                .await
                .unwrap();
                answers.push((instruction, status, value));
                answered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            answers
        })
    };
    while answered.load(std::sync::atomic::Ordering::Relaxed) < 30 {
        std::thread::sleep(Duration::from_millis(5));
    }
    scheme.rabbit.kill();
    std::thread::sleep(Duration::from_secs(1));
    scheme.rabbit.run().unwrap();
    let mut told: ToldMap = BTreeMap::new();
    let mut outcomes = BTreeMap::<String, usize>::new();
    for (debtor, sender) in [(TEST_BANK, amqp_sender), (HTTP_BANK, http_sender)] {
        for (instruction, status, answer) in scheme.runtime.block_on(sender).unwrap() {
            assert_eq!(status, 200, "{instruction}: {answer}");
            let state = answer["status"].as_str().unwrap().to_string();
            let reason = answer["reason"].as_str().map(str::to_string);
            assert!(
                state == "ACSC" || state == "RJCT",
                "{instruction}: final, {answer}"
            );
            *outcomes
                .entry(format!(
                    "{debtor} {state} {}",
                    reason.clone().unwrap_or_default()
                ))
                .or_default() += 1;
            told.insert(instruction, (debtor.to_string(), Some((state, reason))));
        }
    }
    eprintln!("outcomes across the broker's restart: {outcomes:?}");
    assert_eq!(told.len(), 120);
    let op = scheme.operator();
    scheme.runtime.block_on(check_told_and_books(
        &url,
        &op,
        &told,
        &BANKS,
        4 * 10_000_000,
    ));
}
