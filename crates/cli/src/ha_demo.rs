//! `clearhouse demo --ha`: three NATS JetStream servers and three clearhouse nodes on loopback,
//! signed payment load on the leader, the leader killed (SIGKILL) mid-traffic; prints the
//! takeover time and checks that every payment a bank was told is final stands on the new leader.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clearhouse_replication::testing::NatsCluster;
use clearhouse_switch::client::SignedClient;
use serde_json::{json, Value};

const BANKS: [&str; 4] = ["HADEMOAA", "HADEMOBB", "HADEMOCC", "HADEMODD"];

fn secret(bic: &str) -> String {
    hex::encode(format!("demo-secret-{bic}-0123456789"))
}

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn exe() -> anyhow::Result<std::path::PathBuf> {
    std::env::current_exe().context("locating the clearhouse binary")
}

fn spawn_listening(mut command: Command) -> anyhow::Result<(Proc, String)> {
    use std::io::BufRead;
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
    let Some(url) = line.trim().strip_prefix("listening on ") else {
        bail!("a child did not start (said {line:?})");
    };
    Ok((Proc(child), url.to_string()))
}

fn start_node(data: &Path, config: &Path) -> anyhow::Result<Proc> {
    let mut command = Command::new(exe()?);
    command
        .args(["serve", "--config"])
        .arg(config)
        .arg("--data-dir")
        .arg(data)
        .env("CLEARHOUSE_CLOCK_LEAD_MS", "300")
        .env("CLEARHOUSE_SETTLE_DEADLINE_MS", "2000")
        .env("CLEARHOUSE_HARD_TIMEOUT_MS", "4000");
    Ok(spawn_listening(command)?.0)
}

async fn leader(urls: &[String]) -> Option<String> {
    for url in urls {
        let plain = SignedClient::new(url, "none", vec![]);
        if let Ok((200, _)) = plain.send("GET", "/ready", b"", &[]).await {
            return Some(url.clone());
        }
    }
    None
}

async fn wait_leader(urls: &[String], within: Duration) -> anyhow::Result<String> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Some(url) = leader(urls).await {
            return Ok(url);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bail!("no node became leader within {} s", within.as_secs())
}

async fn call(
    client: &SignedClient,
    method: &str,
    path: &str,
    body: Value,
) -> Option<(u16, Value)> {
    let bytes = if body.is_null() {
        vec![]
    } else {
        body.to_string().into_bytes()
    };
    let (status, answer) = client.request(method, path, &bytes).await.ok()?;
    Some((
        status,
        serde_json::from_slice(&answer).unwrap_or(Value::Null),
    ))
}

fn bank(url: &str, bic: &str) -> SignedClient {
    SignedClient::new(
        url,
        &format!("{bic}-1"),
        hex::decode(secret(bic)).expect("hex"),
    )
}

pub fn run(seconds: u64, clients: usize) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    eprintln!("starting 3 NATS JetStream servers (nats-server) on loopback ...");
    let cluster = NatsCluster::start(3, &dir.path().join("nats"))
        .context("starting nats-server (Debian package nats-server)")?;
    let nats: Vec<String> = cluster.urls().iter().map(|u| format!("\"{u}\"")).collect();
    let names = ["a", "b", "c"];
    let data: Vec<_> = names.iter().map(|n| dir.path().join(n)).collect();
    let status = Command::new(exe()?)
        .args(["init", "--data-dir"])
        .arg(&data[0])
        .stdout(Stdio::null())
        .status()?;
    if !status.success() {
        bail!("clearhouse init failed");
    }
    for other in &data[1..] {
        std::fs::create_dir_all(other)?;
        for key in [
            "operator.key",
            "operator-ed25519.key",
            "operator-ed25519.pub",
        ] {
            std::fs::copy(data[0].join(key), other.join(key))?;
        }
    }
    let mut urls = Vec::new();
    let mut configs = Vec::new();
    for name in names {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let config = dir.path().join(format!("{name}.toml"));
        std::fs::write(
            &config,
            format!(
                "listen = \"127.0.0.1:{port}\"\n\n[replication]\nnode_id = \"{name}\"\nnats_urls = [{}]\nadvertise = \"http://127.0.0.1:{port}\"\n",
                nats.join(", ")
            ),
        )?;
        urls.push(format!("http://127.0.0.1:{port}"));
        configs.push(config);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut nodes: Vec<Option<Proc>> = vec![Some(start_node(&data[0], &configs[0])?)];
    let first = runtime.block_on(wait_leader(&urls[..1], Duration::from_secs(30)))?;
    for i in 1..3 {
        nodes.push(Some(start_node(&data[i], &configs[i])?));
    }
    eprintln!(
        "3 nodes: leader {first}, standbys {} and {}",
        urls[1], urls[2]
    );
    let banks_file = dir.path().join("banks.json");
    std::fs::write(
        &banks_file,
        json!(BANKS
            .iter()
            .map(|b| json!({"bic": b, "secret_hex": secret(b)}))
            .collect::<Vec<_>>())
        .to_string(),
    )?;
    let mut command = Command::new(exe()?);
    command
        .args(["sim-banks", "--reject-per-10k", "100", "--banks"])
        .arg(&banks_file);
    let (_banks, banks_url) = spawn_listening(command)?;
    let key = std::fs::read_to_string(data[0].join("operator.key"))?;
    let mut parts = key.split_whitespace();
    let (key_id, key_hex) = (
        parts.next().context("key id")?.to_string(),
        parts.next().context("key")?.to_string(),
    );
    runtime.block_on(async {
        let op = SignedClient::new(&first, &key_id, hex::decode(&key_hex)?);
        for bic in BANKS {
            let (status, body) = call(&op, "POST", "/v1/admin/participants", json!({
                "bic": bic, "name": format!("Bank {bic}"), "endpoint": format!("{banks_url}/bank/{bic}"),
                "currencies": {"EUR": {"model": "prefunded"}}, "secret_hex": secret(bic),
            })).await.context("onboarding")?;
            if status != 201 {
                bail!("onboarding {bic}: {status} {body}");
            }
            call(&op, "POST", &format!("/v1/admin/participants/{bic}/liquidity"), json!({
                "request_id": "fund", "currency": "EUR", "amount": "1000000.00", "direction": "in"})).await;
        }
        Ok::<(), anyhow::Error>(())
    })?;
    // Load: each client sends to whichever node leads; answers that are final are remembered.
    let told: Arc<Mutex<BTreeMap<String, (String, String)>>> = Arc::default();
    let current = Arc::new(Mutex::new(first.clone()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load: Vec<_> = (0..clients)
        .map(|c| {
            let (told, current, stop, urls) = (told.clone(), current.clone(), stop.clone(), urls.clone());
            runtime.spawn(async move {
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    n += 1;
                    let debtor = BANKS[(c + n as usize) % BANKS.len()];
                    let creditor = BANKS[(c + n as usize + 1) % BANKS.len()];
                    let instruction = format!("HA-{c}-{n}");
                    let url = current.lock().expect("url").clone();
                    let answer = call(&bank(&url, debtor), "POST", "/v1/payments", json!({
                        "instruction_id": instruction, "end_to_end_id": format!("E2E-{instruction}"),
                        "debtor_agent": debtor, "creditor_agent": creditor, "amount": "1.00", "currency": "EUR",
                        "debtor": {"name": "Alice", "account": "DE89370400440532013000"},
                        "creditor": {"name": "Bob", "account": "FR1420041010050500013M02606"},
                    })).await;
                    match answer {
                        Some((200, body)) if body["status"] != "PDNG" => {
                            told.lock().expect("told").insert(instruction, (debtor.to_string(), body["status"].as_str().unwrap_or("").to_string()));
                        }
                        Some((200, _)) => {}
                        _ => {
                            if let Some(found) = leader(&urls).await {
                                *current.lock().expect("url") = found;
                            }
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                }
            })
        })
        .collect();
    let half = Duration::from_secs(seconds.max(4) / 2);
    let load_started = Instant::now();
    std::thread::sleep(half);
    let before = told.lock().expect("told").len();
    let rate_before = before as f64 / load_started.elapsed().as_secs_f64();
    let leader_index = urls.iter().position(|u| *u == first).expect("leader");
    eprintln!(
        "{before} payments answered final; killing the leader {first} (SIGKILL) mid-traffic ..."
    );
    drop(nodes[leader_index].take());
    let killed = Instant::now();
    let others: Vec<String> = urls.iter().filter(|u| **u != first).cloned().collect();
    let new_leader = runtime.block_on(wait_leader(&others, Duration::from_secs(30)))?;
    let takeover = killed.elapsed();
    *current.lock().expect("url") = new_leader.clone();
    eprintln!(
        "new leader {new_leader} after {} ms; restarting the killed node as a standby",
        takeover.as_millis()
    );
    nodes[leader_index] = Some(start_node(&data[leader_index], &configs[leader_index])?);
    std::thread::sleep(half);
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    runtime.block_on(async {
        for task in load {
            let _ = task.await;
        }
    });
    let told = told.lock().expect("told").clone();
    // Every answer a bank was given stands on the new leader.
    let (mut checked, mut lost) = (0usize, Vec::new());
    runtime.block_on(async {
        for (instruction, (debtor, was)) in &told {
            let now = call(
                &bank(&new_leader, debtor),
                "GET",
                &format!("/v1/payments?instruction_id={instruction}"),
                Value::Null,
            )
            .await;
            checked += 1;
            if !matches!(&now, Some((200, body)) if body["status"].as_str() == Some(was.as_str())) {
                lost.push(instruction.clone());
            }
        }
    });
    let settled = told.values().filter(|(_, s)| s == "ACSC").count();
    println!();
    println!("demo --ha summary: 3 NATS servers (R3 stream), 3 clearhouse nodes, leader killed with SIGKILL mid-traffic");
    println!(
        "  takeover (kill to the new leader's /ready 200): {} ms",
        takeover.as_millis()
    );
    println!(
        "  payments answered final: {} ({settled} settled), {before} of them before the kill ({rate_before:.0}/s with {clients} clients)",
        told.len()
    );
    println!(
        "  checked on the new leader: {checked}; lost or changed: {}",
        lost.len()
    );
    drop(cluster);
    if !lost.is_empty() {
        bail!(
            "payments changed after the failover: {:?}",
            &lost[..lost.len().min(10)]
        );
    }
    println!("  0 acknowledged payments lost");
    Ok(())
}

/// A replicated setup for `bench payments --replicated`: 3 NATS servers, the switch's data
/// directory initialised, a standby directory with the same operator keys, and both configs.
pub struct Replicated {
    pub cluster: NatsCluster,
    pub configs: [std::path::PathBuf; 2],
    pub standby_dir: std::path::PathBuf,
}

impl Replicated {
    pub fn start(exe: &Path, dir: &Path, switch_dir: &Path) -> anyhow::Result<Replicated> {
        let cluster = NatsCluster::start(3, &dir.join("nats"))
            .context("starting nats-server (Debian package nats-server)")?;
        let status = Command::new(exe)
            .args(["init", "--data-dir"])
            .arg(switch_dir)
            .stdout(Stdio::null())
            .status()?;
        if !status.success() {
            bail!("clearhouse init failed");
        }
        let standby_dir = dir.join("standby");
        std::fs::create_dir_all(&standby_dir)?;
        for key in [
            "operator.key",
            "operator-ed25519.key",
            "operator-ed25519.pub",
        ] {
            std::fs::copy(switch_dir.join(key), standby_dir.join(key))?;
        }
        let nats: Vec<String> = cluster.urls().iter().map(|u| format!("\"{u}\"")).collect();
        let config = |name: &str| -> anyhow::Result<std::path::PathBuf> {
            let path = dir.join(format!("{name}.toml"));
            std::fs::write(
                &path,
                format!(
                    "[replication]\nnode_id = \"{name}\"\nnats_urls = [{}]\nadvertise = \"http://{name}.invalid\"\n",
                    nats.join(", ")
                ),
            )?;
            Ok(path)
        };
        Ok(Replicated {
            configs: [config("bench-leader")?, config("bench-standby")?],
            cluster,
            standby_dir,
        })
    }

    /// Waits (30 s at most) until the node at `url` leads (`/ready` 200).
    pub fn wait_ready(&self, url: &str) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if get(url, "/ready").is_some_and(|(status, _)| status == 200) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("{url} did not become leader within 30 s")
    }
}

/// A plain HTTP/1.0 GET on loopback: (status, body).
pub(crate) fn get(url: &str, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let address = url.strip_prefix("http://")?;
    let mut stream = std::net::TcpStream::connect(address).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n").ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    let status = answer.split_whitespace().nth(1)?.parse().ok()?;
    let body = answer.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((status, body))
}

/// Samples a standby's lag (`/ready`) every 200 ms until finished.
pub struct LagSampler {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Vec<(u64, u64)>>,
}

impl LagSampler {
    pub fn start(url: &str) -> LagSampler {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (url, flag) = (url.to_string(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut samples = Vec::new();
            while !flag.load(std::sync::atomic::Ordering::SeqCst) && samples.len() < 100_000 {
                if let Some((_, body)) = get(&url, "/ready") {
                    if let Ok(value) = serde_json::from_str::<Value>(&body) {
                        samples.push((
                            value["lag_messages"].as_u64().unwrap_or(0),
                            value["lag_ms"].as_u64().unwrap_or(0),
                        ));
                    }
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            samples
        });
        LagSampler { stop, thread }
    }

    pub fn finish(self) -> Value {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let samples = self.thread.join().unwrap_or_default();
        let stats = |mut values: Vec<u64>| {
            values.sort_unstable();
            let at = |p: usize| {
                values
                    .get((values.len() * p / 100).min(values.len().saturating_sub(1)))
                    .copied()
                    .unwrap_or(0)
            };
            json!({"p50": at(50), "p99": at(99), "max": values.last().copied().unwrap_or(0)})
        };
        json!({
            "samples": samples.len(),
            "messages": stats(samples.iter().map(|s| s.0).collect()),
            "ms": stats(samples.iter().map(|s| s.1).collect()),
        })
    }
}

/// For `bench ledger --replicated`: 3 NATS servers, the journal stream, a barrier, and a
/// publisher for a leader node (term 1). Keep the returned values alive while the node runs.
pub fn bench_publisher(
    dir: &Path,
) -> anyhow::Result<(
    NatsCluster,
    tokio::runtime::Runtime,
    Arc<clearhouse_replication::publisher::Publisher>,
)> {
    let cluster = NatsCluster::start(3, &dir.join("nats"))
        .context("starting nats-server (Debian package nats-server)")?;
    let urls: Vec<String> = cluster.urls().iter().map(|u| format!("\"{u}\"")).collect();
    let config: clearhouse_replication::ReplicationConfig = toml::from_str(&format!(
        "node_id = \"bench\"\nnats_urls = [{}]\nadvertise = \"http://bench.invalid\"\nstream_max_bytes = 4294967296\n",
        urls.join(", ")
    ))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let publisher = runtime.block_on(async {
        let js = clearhouse_replication::connect(&config).await?;
        let mut ready = None;
        for _ in 0..120 {
            if clearhouse_replication::ensure_objects(&js, &config)
                .await
                .is_ok()
            {
                ready = Some(());
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        ready.context("JetStream did not become ready")?;
        let term = clearhouse_replication::publisher::Term {
            term: 1,
            node_id: "bench".into(),
        };
        let barrier = clearhouse_replication::publisher::publish_barrier(
            &js,
            &config.subject(),
            &term,
            0,
            0,
            (0, [0; 32]),
        )
        .await
        .map_err(anyhow::Error::msg)?;
        Ok::<_, anyhow::Error>(clearhouse_replication::publisher::Publisher::start(
            &tokio::runtime::Handle::current(),
            js,
            config.subject(),
            term,
            barrier,
            Duration::from_millis(config.publish_retry_ms),
        ))
    })?;
    Ok((cluster, runtime, publisher))
}
