//! High availability under load: a 3-server NATS JetStream cluster and two `clearhouse serve`
//! nodes with `[replication]` on loopback. Signed payment load from 8 clients goes to the leader;
//! the leader is killed with SIGKILL at random moments, 20 times, and restarted (as a standby:
//! it cuts what the stream never stored). After each kill the other node must take over. At the
//! end: every payment a debtor agent was told is settled or rejected is still so on the final
//! leader, every payment the switch accepted is final, nothing stays reserved, the books balance,
//! a window close nets every settled payment exactly once, and `clearhouse verify` accepts both
//! nodes' voucher chains, which end at the same head.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clearhouse_replication::testing::{nats_server_binary, NatsCluster};
use clearhouse_switch::client::{ClientError, SignedClient};
use serde_json::{json, Value};

mod common;
use common::*;

const ROUNDS: u32 = 20;
const CLIENTS: u32 = 8;
const BANKS: [&str; 3] = ["HAAADEFF", "HABBDEFF", "HACCDEFF"];
const FUNDING: &str = "1000000.00";
const DEADLINES: &[(&str, &str)] = &[
    ("CLEARHOUSE_SETTLE_DEADLINE_MS", "1500"),
    ("CLEARHOUSE_HARD_TIMEOUT_MS", "3000"),
    ("CLEARHOUSE_SYNC_WAIT_MS", "4000"),
    ("CLEARHOUSE_CLOCK_LEAD_MS", "300"),
];

/// The node whose `/ready` answers 200 (bounded: 20 s).
async fn wait_leader(urls: &[String]) -> String {
    for _ in 0..400 {
        for url in urls {
            let plain = SignedClient::new(url, "none", vec![]);
            if let Ok((200, _)) = plain.send("GET", "/ready", b"", &[]).await {
                return url.clone();
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no leader among {urls:?} within 20 s");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn node_config(dir: &Path, name: &str, port: u16, nats: &[String]) -> std::path::PathBuf {
    node_config_with(dir, name, port, nats, "")
}

fn node_config_with(
    dir: &Path,
    name: &str,
    port: u16,
    nats: &[String],
    extra: &str,
) -> std::path::PathBuf {
    let path = dir.join(format!("{name}.toml"));
    let urls: Vec<String> = nats.iter().map(|u| format!("\"{u}\"")).collect();
    std::fs::write(
        &path,
        format!(
            "listen = \"127.0.0.1:{port}\"\n\n[replication]\nnode_id = \"{name}\"\nnats_urls = [{}]\nadvertise = \"http://127.0.0.1:{port}\"\n{extra}",
            urls.join(", ")
        ),
    )
    .unwrap();
    path
}

fn start_node(data: &Path, config: &Path) -> Killed {
    spawn(
        &["serve", "--config", config.to_str().unwrap()],
        Some(data),
        DEADLINES,
    )
    .0
}

type Told = Arc<Mutex<ToldMap>>;

/// The tests of this file run one at a time: each starts 3 NATS servers and 2-3 nodes, and on 2
/// cores two such clusters at once only measure contention.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[test]
fn the_leader_killed_20_times_under_load_loses_nothing() {
    let _serial = one_at_a_time();
    let mut scheme = scheme_with("", "100");
    let (urls, data, configs) = (
        scheme.urls.clone(),
        scheme.data.clone(),
        scheme.configs.clone(),
    );
    let mut url = urls[0].clone();
    scheme.runtime.block_on(async {
        // The standby refuses participants and names the leader (once it has read the lease).
        let mut answer = None;
        for _ in 0..100 {
            answer = call(
                &client(&urls[1], BANKS[0]),
                "GET",
                "/v1/participants/HAAADEFF/positions",
                Value::Null,
            )
            .await;
            if answer
                .as_ref()
                .is_some_and(|(_, body)| body["leader"].is_string())
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (status, body) = answer.unwrap();
        // Each node says its role in /metrics (Prometheus text).
        for (url, role) in [(&urls[0], "leader"), (&urls[1], "standby")] {
            let (code, text) = SignedClient::new(url, "none", vec![])
                .send("GET", "/metrics", b"", &[])
                .await
                .unwrap();
            let text = String::from_utf8_lossy(&text);
            assert_eq!(code, 200);
            assert!(
                text.contains(&format!("clearhouse_replication_role{{role=\"{role}\"}} 1")),
                "{url}: {text}"
            );
        }
        assert_eq!(
            (status, body["code"].as_str()),
            (503, Some("not_leader")),
            "{body}"
        );
        assert_eq!(body["leader"].as_str(), Some(urls[0].as_str()), "{body}");
    });
    let told: Told = Arc::new(Mutex::new(BTreeMap::new()));
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut takeovers = Vec::new();
    for round in 0..ROUNDS {
        let load: Vec<_> = (0..CLIENTS)
            .map(|c| {
                let (url, told) = (url.clone(), told.clone());
                scheme.runtime.spawn(async move {
                    for n in 0.. {
                        let debtor = BANKS[((c + n) % 3) as usize];
                        let creditor = BANKS[((c + n + 1) % 3) as usize];
                        let instruction = format!("H{round}-{c}-{n}");
                        told.lock().unwrap().insert(instruction.clone(), (debtor.to_string(), None));
                        let answer = call(&client(&url, debtor), "POST", "/v1/payments", json!({
                            "instruction_id": instruction, "end_to_end_id": format!("E2E-{instruction}"),
                            "debtor_agent": debtor, "creditor_agent": creditor, "amount": "1.00", "currency": "EUR",
                            "debtor": {"name": "Alice", "account": "DE89370400440532013000"},
                            "creditor": {"name": "Bob", "account": "FR1420041010050500013M02606"},
                        })).await;
                        if let Some((200, body)) = answer {
                            if body["status"] != "PDNG" {
                                told.lock().unwrap().insert(instruction, (debtor.to_string(), Some((
                                    body["status"].as_str().unwrap().to_string(),
                                    body["reason"].as_str().map(str::to_string),
                                ))));
                            }
                        }
                    }
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(300 + next() % 700));
        let leader = urls.iter().position(|u| *u == url).unwrap();
        drop(scheme.nodes[leader].take()); // SIGKILL
        let killed_at = Instant::now();
        for task in load {
            task.abort();
        }
        let other = 1 - leader;
        let new_url = scheme.runtime.block_on(wait_leader(&urls[other..=other]));
        takeovers.push(killed_at.elapsed());
        url = new_url;
        scheme.nodes[leader] = Some(start_node(&data[leader], &configs[leader]));
    }
    let mut sorted = takeovers.clone();
    sorted.sort();
    eprintln!(
        "takeover (kill -9 to the new leader's /ready 200) over {ROUNDS} rounds: p50 {} ms, max {} ms",
        sorted[sorted.len() / 2].as_millis(),
        sorted.last().unwrap().as_millis()
    );
    // Past the hard timeout: every payment caught by a kill has ended.
    std::thread::sleep(Duration::from_millis(3_500));
    let told = told.lock().unwrap().clone();
    let answered = told.values().filter(|(_, t)| t.is_some()).count();
    assert!(answered > 200, "the load got only {answered} final answers");
    scheme.runtime.block_on(async {
        let op = scheme.operator(&url);
        let settled_now = check_told_and_books(&url, &op, &told, &BANKS, 3 * 100_000_000).await;
        eprintln!(
            "{} payments answered final, {settled_now} settled, across {ROUNDS} failovers",
            answered
        );
    });
    // Let the standby apply the window close, then stop both and verify both chains.
    std::thread::sleep(Duration::from_millis(1_000));
    drop(scheme.nodes);
    let mut heads = Vec::new();
    for data in &data {
        let verify = Command::new(env!("CARGO_BIN_EXE_clearhouse"))
            .args(["verify", "--data-dir"])
            .arg(data)
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&verify.stdout).to_string();
        assert!(
            verify.status.success(),
            "{}: {out}{}",
            data.display(),
            String::from_utf8_lossy(&verify.stderr)
        );
        heads.push(out);
    }
    assert_eq!(
        heads[0], heads[1],
        "both nodes end at the same voucher chain head"
    );
}

/// Two nodes and three NATS servers, set up and with the banks onboarded and funded.
struct Scheme {
    dir: tempfile::TempDir,
    cluster: NatsCluster,
    data: [std::path::PathBuf; 2],
    configs: [std::path::PathBuf; 2],
    urls: Vec<String>,
    nodes: [Option<Killed>; 2],
    _banks: Killed,
    runtime: tokio::runtime::Runtime,
}

fn scheme() -> Scheme {
    scheme_with("", "0")
}

/// `extra`: more `[replication]` settings; `reject_per_10k`: the simulated banks' AC04 rate.
fn scheme_with(extra: &str, reject_per_10k: &str) -> Scheme {
    assert!(
        nats_server_binary().is_some(),
        "these tests need nats-server (Debian package nats-server; bash .ci/run installs it)"
    );
    let dir = tempfile::tempdir().unwrap();
    let cluster = NatsCluster::start(3, &dir.path().join("nats")).unwrap();
    let nats = cluster.urls();
    let data = [dir.path().join("a"), dir.path().join("b")];
    let init = Command::new(env!("CARGO_BIN_EXE_clearhouse"))
        .args(["init", "--data-dir"])
        .arg(&data[0])
        .output()
        .unwrap();
    assert!(init.status.success());
    std::fs::create_dir_all(&data[1]).unwrap();
    for key in [
        "operator.key",
        "operator-ed25519.key",
        "operator-ed25519.pub",
    ] {
        std::fs::copy(data[0].join(key), data[1].join(key)).unwrap();
    }
    let ports = [free_port(), free_port()];
    let configs = [
        node_config_with(dir.path(), "a", ports[0], &nats, extra),
        node_config_with(dir.path(), "b", ports[1], &nats, extra),
    ];
    let urls: Vec<String> = ports
        .iter()
        .map(|p| format!("http://127.0.0.1:{p}"))
        .collect();
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
    let (banks, banks_url) = spawn(
        &[
            "sim-banks",
            "--reject-per-10k",
            reject_per_10k,
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
    let a = start_node(&data[0], &configs[0]);
    let leader = runtime.block_on(wait_leader(&urls));
    assert_eq!(leader, urls[0]);
    let b = start_node(&data[1], &configs[1]);
    let scheme = Scheme {
        dir,
        cluster,
        data,
        configs,
        urls,
        nodes: [Some(a), Some(b)],
        _banks: banks,
        runtime,
    };
    scheme.runtime.block_on(async {
        let op = scheme.operator(&scheme.urls[0]);
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
    scheme
}

impl Scheme {
    fn operator(&self, url: &str) -> SignedClient {
        let text = std::fs::read_to_string(self.data[0].join("operator.key")).unwrap();
        let mut parts = text.split_whitespace();
        SignedClient::new(
            url,
            parts.next().unwrap(),
            hex::decode(parts.next().unwrap()).unwrap(),
        )
    }

    /// Restarts nodes that exited (stepped down, code 75), as their supervisor would.
    fn supervise(&mut self) {
        for i in 0..2 {
            let exited = self.nodes[i]
                .as_mut()
                .is_none_or(|node| node.0.try_wait().unwrap().is_some());
            if exited {
                // A node that steps down again before it serves is restarted next time.
                self.nodes[i] = try_spawn(
                    &["serve", "--config", self.configs[i].to_str().unwrap()],
                    Some(&self.data[i]),
                    DEADLINES,
                )
                .ok()
                .map(|(node, _)| node);
            }
        }
    }
}

async fn pay(url: &str, instruction: &str) -> Option<(u16, Value)> {
    pay_raw(url, instruction).await.ok()
}

async fn pay_raw(url: &str, instruction: &str) -> Result<(u16, Value), ClientError> {
    let body = json!({
        "instruction_id": instruction, "end_to_end_id": format!("E2E-{instruction}"),
        "debtor_agent": BANKS[0], "creditor_agent": BANKS[1], "amount": "1.00", "currency": "EUR",
        "debtor": {"name": "Alice", "account": "DE89370400440532013000"},
        "creditor": {"name": "Bob", "account": "FR1420041010050500013M02606"},
    });
    let (status, answer) = client(url, BANKS[0])
        .request("POST", "/v1/payments", body.to_string().as_bytes())
        .await?;
    Ok((
        status,
        serde_json::from_slice(&answer).unwrap_or(Value::Null),
    ))
}

async fn status_of(url: &str, instruction: &str) -> (u16, Value) {
    call(
        &client(url, BANKS[0]),
        "GET",
        &format!("/v1/payments?instruction_id={instruction}"),
        Value::Null,
    )
    .await
    .unwrap()
}

#[test]
fn a_leader_paused_past_its_lease_acknowledges_nothing_after_the_takeover() {
    let _serial = one_at_a_time();
    let mut scheme = scheme();
    let urls = scheme.urls.clone();
    let old = urls[0].clone();
    let pid = scheme.nodes[0].as_ref().unwrap().0.id() as i32;
    scheme.runtime.block_on(async {
        let (status, body) = pay(&old, "BEFORE-PAUSE").await.unwrap();
        assert_eq!(
            (status, body["status"].as_str()),
            (200, Some("ACSC")),
            "{body}"
        );
    });
    // SIGSTOP the leader past its lease; the standby takes over.
    assert_eq!(unsafe { libc_kill(pid, 19) }, 0);
    let new = scheme.runtime.block_on(wait_leader(&urls[1..]));
    // Requests are sent to the paused leader now: its kernel queues them; it resumes with them.
    let attempts: Vec<_> = (0..40)
        .map(|n| {
            let old = old.clone();
            scheme.runtime.spawn(async move {
                let instruction = format!("TO-DEPOSED-{n}");
                let write = pay(&old, &instruction).await;
                let read = call(
                    &client(&old, BANKS[0]),
                    "GET",
                    &format!("/v1/participants/{}/positions", BANKS[0]),
                    Value::Null,
                )
                .await;
                (instruction, write, read)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(unsafe { libc_kill(pid, 18) }, 0); // SIGCONT
    scheme.runtime.block_on(async {
        for attempt in attempts {
            let (instruction, write, read) = attempt.await.unwrap();
            for (what, answer) in [("payment", &write), ("read", &read)] {
                if let Some((status, body)) = answer {
                    assert!(
                        *status == 503,
                        "{what} {instruction} answered {status} by the deposed leader: {body}"
                    );
                }
            }
            let (status, now) = status_of(&new, &instruction).await;
            assert_eq!(
                status, 404,
                "{instruction} must not exist on the new leader: {now}"
            );
        }
        let (status, body) = status_of(&new, "BEFORE-PAUSE").await;
        assert_eq!(
            (status, body["status"].as_str()),
            (200, Some("ACSC")),
            "{body}"
        );
        let (status, body) = pay(&new, "AFTER-TAKEOVER").await.unwrap();
        assert_eq!(
            (status, body["status"].as_str()),
            (200, Some("ACSC")),
            "{body}"
        );
    });
    // The old leader stepped down (exit 75) and comes back as a standby that follows the new one.
    let code = scheme.nodes[0].as_mut().unwrap().0.wait().unwrap().code();
    assert_eq!(code, Some(75), "the deposed leader exits with EX_TEMPFAIL");
    scheme.supervise();
    scheme.runtime.block_on(async {
        for _ in 0..100 {
            if let Some((503, body)) =
                call(&client(&old, BANKS[0]), "GET", "/ready", Value::Null).await
            {
                if body["leader"].as_str() == Some(new.as_str()) {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the old leader did not come back as a standby of {new}");
    });
}

#[test]
fn nats_one_server_down_service_continues_two_down_work_refused_then_resumes() {
    let _serial = one_at_a_time();
    let mut scheme = scheme();
    let urls = scheme.urls.clone();
    let mut leader = urls[0].clone();
    // One server down (the first: it may lead the stream or the lease bucket; raft re-elects).
    scheme.cluster.kill(0);
    let settled_with_one_down = scheme.runtime.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(40);
        let mut n = 0;
        loop {
            assert!(
                Instant::now() < deadline,
                "no payment settled within 40 s with one NATS server down"
            );
            n += 1;
            let instruction = format!("ONE-DOWN-{n}");
            if let Some((200, body)) = pay(&leader, &instruction).await {
                if body["status"] == "ACSC" {
                    return instruction;
                }
            }
            leader = wait_leader(&urls).await;
        }
    });
    scheme.supervise();
    // Two servers down: no quorum. Nothing may be acknowledged; every payment is refused.
    scheme.cluster.kill(1);
    // (instruction, refused cleanly by every node: `not_leader` or `replication_unavailable`,
    // both "nothing changed")
    let refused: Vec<(String, bool)> = scheme.runtime.block_on(async {
        let mut refused = Vec::new();
        let until = Instant::now() + Duration::from_secs(6);
        let mut n = 0;
        while Instant::now() < until {
            n += 1;
            let instruction = format!("NO-QUORUM-{n}");
            let mut clean = true;
            for url in &urls {
                match pay_raw(url, &instruction).await {
                    Ok((status, body)) => {
                        assert_eq!(
                            status, 503,
                            "{instruction} answered without a NATS quorum: {body}"
                        );
                        clean &= matches!(
                            body["code"].as_str(),
                            Some("not_leader" | "replication_unavailable")
                        );
                    }
                    // Never connected (the old leader exited): nothing was sent.
                    Err(ClientError::Transport { message, .. })
                        if message.contains("(Connect)") => {}
                    // Sent, then cut off or timed out: outcome unknown.
                    Err(_) => clean = false,
                }
            }
            refused.push((instruction, clean));
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        refused
    });
    // Quorum back: service resumes (a node steps down and is restarted by its supervisor).
    scheme.cluster.restart(0).unwrap();
    scheme.cluster.restart(1).unwrap();
    let resumed_at = Instant::now();
    let leader = loop {
        scheme.supervise();
        let found = scheme.runtime.block_on(async {
            for url in &urls {
                let plain = SignedClient::new(url, "none", vec![]);
                if let Ok((200, _)) = plain.send("GET", "/ready", b"", &[]).await {
                    if let Some((200, body)) = pay(
                        url,
                        &format!("RESUMED-{}", resumed_at.elapsed().as_millis()),
                    )
                    .await
                    {
                        if body["status"] == "ACSC" {
                            return Some(url.clone());
                        }
                    }
                }
            }
            None
        });
        if let Some(url) = found {
            break url;
        }
        assert!(
            resumed_at.elapsed() < Duration::from_secs(60),
            "service did not resume within 60 s of the quorum's return"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    eprintln!(
        "service resumed {} ms after the quorum returned",
        resumed_at.elapsed().as_millis()
    );
    // Past the hard timeout: what was acknowledged stands; nothing refused settled.
    std::thread::sleep(Duration::from_millis(3_500));
    scheme.runtime.block_on(async {
        let (status, body) = status_of(&leader, &settled_with_one_down).await;
        assert_eq!(
            (status, body["status"].as_str()),
            (200, Some("ACSC")),
            "{body}"
        );
        let mut clean_refusals = 0;
        for (instruction, clean) in &refused {
            let (status, body) = status_of(&leader, instruction).await;
            if *clean {
                clean_refusals += 1;
                assert_eq!(
                    status, 404,
                    "{instruction} was refused (nothing changed) but exists: {body}"
                );
            } else {
                // Outcome unknown to the client (no answer): absent, or final by now.
                assert!(
                    status == 404 || body["status"] != "PDNG",
                    "{instruction}: {status} {body}"
                );
            }
        }
        eprintln!("{} payments tried without a quorum, none answered 200; {clean_refusals} refused by both nodes with \"nothing changed\" and absent after", refused.len());
        assert!(refused.len() >= 5, "too few attempts without a quorum: {refused:?}");
        assert!(
            clean_refusals > 0,
            "no payment was refused by both nodes without reaching the ledger: {refused:?}"
        );
        check_books(&scheme.operator(&leader), &BANKS, 3 * 100_000_000).await;
    });
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, signal: i32) -> i32;
}

#[test]
fn a_node_the_stream_was_trimmed_past_restores_a_snapshot_and_can_take_over() {
    let _serial = one_at_a_time();
    // A stream that keeps 500 messages (more than a standby lags by here, where snapshots every
    // 50 messages pause its applying; fewer than the ~610 of the history).
    let extra = "stream_max_messages = 500\nsnapshot_every_messages = 50\n";
    let mut scheme = scheme_with(extra, "0");
    let urls = scheme.urls.clone();
    let leader = urls[0].clone();
    let paid: Vec<String> = scheme.runtime.block_on(async {
        let mut paid = Vec::new();
        for n in 0..300 {
            let instruction = format!("BEFORE-C-{n}");
            let (status, body) = pay(&leader, &instruction).await.unwrap();
            assert_eq!(
                (status, body["status"].as_str()),
                (200, Some("ACSC")),
                "{body}"
            );
            paid.push(instruction);
        }
        paid
    });
    // Give the standby a moment to upload its latest snapshot.
    std::thread::sleep(Duration::from_millis(1_500));
    // A third node with an empty ledger: the stream no longer starts at journal record 1.
    let c_dir = scheme.dir.path().join("c");
    std::fs::create_dir_all(&c_dir).unwrap();
    for key in [
        "operator.key",
        "operator-ed25519.key",
        "operator-ed25519.pub",
    ] {
        std::fs::copy(scheme.data[0].join(key), c_dir.join(key)).unwrap();
    }
    let c_port = free_port();
    let c_url = format!("http://127.0.0.1:{c_port}");
    let c_config = node_config_with(
        scheme.dir.path(),
        "c",
        c_port,
        &scheme.cluster.urls(),
        extra,
    );
    let mut c = start_node(&c_dir, &c_config);
    let mut followed = None;
    for _ in 0..200 {
        // Supervised: a node that steps down (exit 75) is restarted.
        // (It may step down again before it serves: then the next round restarts it.)
        if c.0.try_wait().unwrap().is_some() {
            if let Ok((node, _)) = try_spawn(
                &["serve", "--config", c_config.to_str().unwrap()],
                Some(&c_dir),
                DEADLINES,
            ) {
                c = node;
            }
        }
        let answer = scheme.runtime.block_on(call(
            &client(&c_url, BANKS[0]),
            "GET",
            "/ready",
            Value::Null,
        ));
        if let Some((503, body)) = answer {
            if body["state"] == "following"
                && body["lag_messages"] == 0
                && body["applied_stream_seq"].as_u64() > Some(500)
            {
                followed = Some(body);
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let followed = followed.expect("node c caught up");
    assert!(
        c_dir.read_dir().unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with("ledger")),
        "c has a ledger"
    );
    eprintln!("node c restored a snapshot and follows: {followed}");
    // Both other nodes die: c takes over with everything that was settled.
    drop(scheme.nodes[0].take());
    drop(scheme.nodes[1].take());
    let new = scheme
        .runtime
        .block_on(wait_leader(std::slice::from_ref(&c_url)));
    scheme.runtime.block_on(async {
        for instruction in &paid {
            let (status, body) = status_of(&new, instruction).await;
            assert_eq!(
                (status, body["status"].as_str()),
                (200, Some("ACSC")),
                "{instruction}: {body}"
            );
        }
        let (status, body) = pay(&new, "ON-C").await.unwrap();
        assert_eq!(
            (status, body["status"].as_str()),
            (200, Some("ACSC")),
            "{body}"
        );
    });
    let _ = c.0.kill();
    let _ = c.0.wait();
    let verify = Command::new(env!("CARGO_BIN_EXE_clearhouse"))
        .args(["verify", "--data-dir"])
        .arg(&c_dir)
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "{}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
}

#[test]
fn a_node_with_other_operator_keys_refuses_to_join_and_says_why() {
    let _serial = one_at_a_time();
    let scheme = scheme();
    // A data directory initialised on its own: other operator keys.
    let other = scheme.dir.path().join("other");
    let init = Command::new(env!("CARGO_BIN_EXE_clearhouse"))
        .args(["init", "--data-dir"])
        .arg(&other)
        .output()
        .unwrap();
    assert!(init.status.success());
    let config = node_config(
        scheme.dir.path(),
        "other",
        free_port(),
        &scheme.cluster.urls(),
    );
    let refused = Command::new(env!("CARGO_BIN_EXE_clearhouse"))
        .args(["serve", "--config"])
        .arg(&config)
        .arg("--data-dir")
        .arg(&other)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{stderr}");
    assert!(
        stderr.contains("operator keys") && stderr.contains("differ"),
        "{stderr}"
    );
    assert!(
        !other.join("ledger").join("journal").exists()
            || std::fs::read_dir(other.join("ledger").join("journal"))
                .unwrap()
                .count()
                == 0,
        "nothing was written"
    );
    // The cluster is unaffected.
    scheme.runtime.block_on(async {
        let (status, body) = pay(&scheme.urls[0], "AFTER-INTRUDER").await.unwrap();
        assert_eq!(
            (status, body["status"].as_str()),
            (200, Some("ACSC")),
            "{body}"
        );
    });
}
