//! The exporters against real servers started here on loopback: PostgreSQL 15 (initdb in a
//! temporary directory), the Kafka-protocol broker tansu, and a real `clearhouse serve` with
//! `clearhouse sim-banks` under signed payment load. The exports are read back by third-party
//! clients: `psql`, pyarrow and confluent-kafka (librdkafka) from PyPI, pinned in
//! tests/export/requirements.txt. Each exporter is killed with SIGKILL while it works and
//! restarted; afterwards every voucher of the chain is in the sink exactly once, with the
//! switch's hash and body, and the sink's figures equal the windows' reports.

use std::collections::{BTreeMap, BTreeSet};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use clearhouse_engine::vouchers::{chain_hash, leaf_digest, GENESIS_HASH};
use clearhouse_switch::client::SignedClient;
use serde_json::{json, Value};

mod common;
use common::*;

const BANKS: [&str; 3] = ["EXPADEFF", "EXPBDEFF", "EXPCDEFF"];
const BIN: &str = env!("CARGO_BIN_EXE_clearhouse");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_port(port: u16, what: &str) {
    let started = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{what} did not listen on {port} within 60 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// The Python with pyarrow and confluent-kafka (a venv under target/, made once).
fn python() -> PathBuf {
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let requirements = root.join("tests/export/requirements.txt");
    let venv = root.join("target/export-venv");
    let stamp = venv.join(".requirements.txt");
    if std::fs::read(&stamp).ok() != std::fs::read(&requirements).ok() {
        let status = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .expect("python3");
        assert!(status.success(), "python3 -m venv (python3-venv)");
        let status = Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check", "-r"])
            .arg(&requirements)
            .status()
            .unwrap();
        assert!(
            status.success(),
            "pip install -r tests/export/requirements.txt"
        );
        std::fs::copy(&requirements, &stamp).unwrap();
    }
    venv.join("bin/python")
}

fn run_python(script: &str, args: &[&str]) -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/export")
        .join(script);
    let output = Command::new(python())
        .arg(script)
        .args(args)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

/// A PostgreSQL 15 server of the test's own, on a free loopback port, trust authentication.
struct Postgres {
    dir: PathBuf,
    port: u16,
    child: Option<Child>,
}

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

impl Postgres {
    fn as_postgres(program: &str) -> Command {
        if is_root() {
            // setpriv execs the program itself (no parent left behind to kill).
            let mut command = Command::new("setpriv");
            command.args([
                "--reuid=postgres",
                "--regid=postgres",
                "--init-groups",
                "--",
                program,
            ]);
            command
        } else {
            Command::new(program)
        }
    }

    fn start() -> Postgres {
        let dir = PathBuf::from(
            String::from_utf8(
                Command::new("mktemp")
                    .args(["-d", "/tmp/clearhouse-pg.XXXXXX"])
                    .output()
                    .unwrap()
                    .stdout,
            )
            .unwrap()
            .trim(),
        );
        if is_root() {
            assert!(Command::new("chown")
                .args(["postgres:postgres"])
                .arg(&dir)
                .status()
                .unwrap()
                .success());
        }
        let output = Self::as_postgres(&format!("{PG_BIN}/initdb"))
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"])
            .arg(dir.join("data"))
            .output()
            .expect("initdb (postgresql-15)");
        assert!(
            output.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let mut pg = Postgres {
            dir,
            port: free_port(),
            child: None,
        };
        pg.run();
        pg
    }

    /// Starts the server (again) on its data directory; after a crash, a first attempt may
    /// find the old server's last backends still exiting: it is tried again.
    fn run(&mut self) {
        let started = Instant::now();
        'spawn: loop {
            let mut child = Self::as_postgres(&format!("{PG_BIN}/postgres"))
                .arg("-D")
                .arg(self.dir.join("data"))
                .args(["-p", &self.port.to_string(), "-k"])
                .arg(&self.dir)
                .args([
                    "-c",
                    "listen_addresses=127.0.0.1",
                    "-c",
                    "max_connections=20",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            loop {
                assert!(
                    started.elapsed() < Duration::from_secs(60),
                    "postgres did not start"
                );
                if child.try_wait().unwrap().is_some() {
                    std::thread::sleep(Duration::from_millis(200));
                    continue 'spawn;
                }
                let ready = Command::new(format!("{PG_BIN}/pg_isready"))
                    .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
                    .output()
                    .unwrap();
                if ready.status.success() {
                    self.child = Some(child);
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    /// Stops the server the hard way (SIGKILL: what a crash looks like).
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // The postmaster's children exit when it is gone; wait for the port to close.
        let started = Instant::now();
        while TcpStream::connect(("127.0.0.1", self.port)).is_ok()
            && started.elapsed() < Duration::from_secs(20)
        {
            std::thread::sleep(Duration::from_millis(100));
        }
        std::thread::sleep(Duration::from_millis(500));
    }

    fn dsn(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            self.port
        )
    }

    /// One query through psql (a third-party client): rows of `|`-separated fields.
    fn query(&self, sql: &str) -> Vec<Vec<String>> {
        let output = Command::new("psql")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args([
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-At",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
            ])
            .arg(format!("SET search_path TO clearhouse; {sql}"))
            .output()
            .expect("psql");
        assert!(
            output.status.success(),
            "{sql}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout)
            .unwrap()
            .lines()
            .filter(|l| *l != "SET")
            .map(|l| l.split('|').map(str::to_string).collect())
            .collect()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The switch, simulated banks, and the operator's client.
struct Scheme {
    _dir: tempfile::TempDir,
    data: PathBuf,
    server: Option<Killed>,
    url: String,
    _banks: Killed,
    runtime: tokio::runtime::Runtime,
}

impl Scheme {
    fn start(config: Option<&str>) -> Scheme {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
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
                "500",
                "--banks",
                banks_file.to_str().unwrap(),
            ],
            None,
            &[],
        );
        let mut args = vec!["serve", "--listen", "127.0.0.1:0"];
        let config_path = dir.path().join("switch.toml");
        if let Some(config) = config {
            std::fs::write(&config_path, config).unwrap();
            args.extend(["--config", config_path.to_str().unwrap()]);
        }
        let (server, url) = spawn(&args, Some(&data), &[]);
        let scheme = Scheme {
            _dir: dir,
            data,
            server: Some(server),
            url,
            _banks: banks,
            runtime: tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap(),
        };
        let op = scheme.operator();
        scheme.runtime.block_on(async {
            for (i, bic) in BANKS.iter().enumerate() {
                // One prefunded participant, two settling deferred net: fund adjustments too.
                let terms = if i == 0 {
                    json!({"model": "prefunded"})
                } else {
                    json!({"model": "deferred_net", "net_debit_cap": "100000.00"})
                };
                let (status, body) = call(&op, "POST", "/v1/admin/participants", json!({
                    "bic": bic, "name": format!("Bank {bic}"), "endpoint": format!("{banks_url}/bank/{bic}"),
                    "currencies": {"EUR": terms}, "secret_hex": secret(bic),
                })).await.unwrap();
                assert_eq!(status, 201, "{body}");
            }
            let (status, body) = call(&op, "POST", &format!("/v1/admin/participants/{}/liquidity", BANKS[0]), json!({
                "request_id": "fund-0", "currency": "EUR", "amount": "500000.00", "direction": "in"})).await.unwrap();
            assert_eq!(status, 200, "{body}");
        });
        scheme
    }

    /// SIGKILLs the switch and starts it again on the same data directory and configuration.
    fn restart(&mut self) {
        self.server.take();
        let config = self._dir.path().join("switch.toml");
        let mut args = vec!["serve", "--listen", "127.0.0.1:0"];
        if config.exists() {
            args.extend(["--config", config.to_str().unwrap()]);
        }
        let (server, url) = spawn(&args, Some(&self.data), &[]);
        self.server = Some(server);
        self.url = url;
    }

    /// A signed GET as `who` (a BIC, or the operator): (status, body).
    fn get(&self, who: Option<&str>, path: &str) -> (u16, Value) {
        let signer = match who {
            Some(bic) => client(&self.url, bic),
            None => self.operator(),
        };
        self.runtime
            .block_on(call(&signer, "GET", path, Value::Null))
            .unwrap()
    }

    fn key_file(&self) -> PathBuf {
        self.data.join("operator.key")
    }

    fn operator(&self) -> SignedClient {
        let text = std::fs::read_to_string(self.key_file()).unwrap();
        let mut parts = text.split_whitespace();
        SignedClient::new(
            &self.url,
            parts.next().unwrap(),
            hex::decode(parts.next().unwrap()).unwrap(),
        )
    }

    /// `count` payments from 4 concurrent clients, amounts varied; a few settled ones returned.
    /// Returns instruction -> (payment id, final status).
    fn pay(&self, prefix: &str, count: u32) -> BTreeMap<String, (String, String)> {
        let url = self.url.clone();
        let prefix = prefix.to_string();
        self.runtime.block_on(async move {
            let tasks: Vec<_> = (0..4u32)
                .map(|c| {
                    let (url, prefix) = (url.clone(), prefix.clone());
                    tokio::spawn(async move {
                        let mut answers = Vec::new();
                        for n in (c..count).step_by(4) {
                            let debtor = BANKS[(n % 3) as usize];
                            let creditor = BANKS[((n + 1 + n / 3) % 3) as usize];
                            let creditor = if creditor == debtor { BANKS[((n + 2) % 3) as usize] } else { creditor };
                            let instruction = format!("{prefix}-{n}");
                            let amount = format!("{}.{:02}", 1 + n % 97, n % 100);
                            let (status, body) = call(&client(&url, debtor), "POST", "/v1/payments", json!({
                                "instruction_id": instruction, "end_to_end_id": format!("E2E-{instruction}"),
                                "debtor_agent": debtor, "creditor_agent": creditor, "amount": amount, "currency": "EUR",
                                "debtor": {"name": "Alice", "account": "DE89370400440532013000"},
                                "creditor": {"name": "Bob", "account": "FR1420041010050500013M02606"},
                            })).await.unwrap();
                            assert_eq!(status, 200, "{body}");
                            let id = body["payment_id"].as_str().unwrap().to_string();
                            let state = body["status"].as_str().unwrap().to_string();
                            if state == "ACSC" && n % 50 == 7 {
                                let (status, body) = call(&client(&url, creditor), "POST", &format!("/v1/payments/{id}/return"), json!({
                                    "return_id": format!("RET-{instruction}"), "reason": "AC04", "amount": "0.50"})).await.unwrap();
                                assert_eq!(status, 200, "{body}");
                            }
                            answers.push((instruction, (id, state)));
                        }
                        answers
                    })
                })
                .collect();
            let mut all = BTreeMap::new();
            for task in tasks {
                all.extend(task.await.unwrap());
            }
            all
        })
    }

    fn close_window(&self) -> Value {
        let op = self.operator();
        let (status, body) = self
            .runtime
            .block_on(call(&op, "POST", "/v1/admin/windows/close", Value::Null))
            .unwrap();
        assert_eq!(status, 200, "{body}");
        body
    }

    fn window(&self, window: u64) -> Value {
        let op = self.operator();
        let (status, body) = self
            .runtime
            .block_on(call(
                &op,
                "GET",
                &format!("/v1/windows/{window}"),
                Value::Null,
            ))
            .unwrap();
        assert_eq!(status, 200, "{body}");
        body
    }

    /// The whole chain from the switch: (seq, chain hash, body), each hash recomputed.
    fn chain(&self) -> Vec<(u64, [u8; 32], String)> {
        let op = self.operator();
        let mut out = Vec::new();
        let mut hash = GENESIS_HASH;
        let mut from = 1;
        loop {
            let (status, page) = self
                .runtime
                .block_on(call(
                    &op,
                    "GET",
                    &format!("/v1/vouchers?from={from}&limit=4096"),
                    Value::Null,
                ))
                .unwrap();
            assert_eq!(status, 200, "{page}");
            let entries = page["entries"].as_array().unwrap();
            for entry in entries {
                let seq = entry["seq"].as_u64().unwrap();
                let body = entry["body"].as_str().unwrap().to_string();
                hash = chain_hash(&hash, seq, &leaf_digest(body.as_bytes()));
                out.push((seq, hash, body));
            }
            match page["next_from"].as_u64() {
                Some(next) => from = next,
                None => break,
            }
        }
        out
    }

    fn metrics(&self) -> String {
        metrics_text(&self.url)
    }

    /// `clearhouse export <args>` against this switch, started (not waited for); its output
    /// is read only when it does not follow (a follower's log must not fill a pipe).
    fn export(&self, args: &[&str]) -> Child {
        let follows = args.contains(&"--follow");
        let output = || {
            if follows {
                Stdio::null()
            } else {
                Stdio::piped()
            }
        };
        Command::new(BIN)
            .arg("export")
            .args(args)
            .args(["--url", &self.url, "--key-file"])
            .arg(self.key_file())
            .stdout(output())
            .stderr(output())
            .spawn()
            .unwrap()
    }

    /// Runs an export until caught up; its JSON summary.
    fn export_once(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.push("--json");
        let output = self.export(&all).wait_with_output().unwrap();
        assert!(
            output.status.success(),
            "export {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).unwrap()
    }
}

impl Drop for Scheme {
    fn drop(&mut self) {
        self.server.take();
    }
}

/// Runs `load` on another thread while an exporter started by `start` is SIGKILLed `kills`
/// times at varied moments and started again.
fn kill_while_loading(
    scheme: &Scheme,
    kills: u32,
    start: impl Fn() -> Child,
    load: impl FnOnce() -> BTreeMap<String, (String, String)> + Send,
) -> BTreeMap<String, (String, String)> {
    std::thread::scope(|scope| {
        let loading = scope.spawn(load);
        let mut exporter = start();
        for round in 0..kills {
            std::thread::sleep(Duration::from_millis(300 + 170 * u64::from(round % 4)));
            exporter.kill().unwrap();
            exporter.wait().unwrap();
            exporter = start();
        }
        let answers = loading.join().unwrap();
        exporter.kill().unwrap();
        exporter.wait().unwrap();
        let _ = scheme;
        answers
    })
}

fn report_positions(report: &Value) -> BTreeMap<(String, String), (String, u64, String, u64)> {
    report["plan"]["positions"]
        .as_array()
        .map(|p| {
            p.iter()
                .map(|p| {
                    (
                        (
                            p["participant"].as_str().unwrap().to_string(),
                            p["currency"].as_str().unwrap().to_string(),
                        ),
                        (
                            p["sent_minor_units"].as_str().unwrap().to_string(),
                            p["sent_count"].as_u64().unwrap(),
                            p["received_minor_units"].as_str().unwrap().to_string(),
                            p["received_count"].as_u64().unwrap(),
                        ),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn postgres_mirror_is_exact_after_the_exporter_is_killed_mid_batch() {
    let pg = Postgres::start();
    let scheme = Scheme::start(None);
    let mut answers = scheme.pay("PG1", 400);
    scheme.close_window();
    let dsn = pg.dsn();
    let start = || scheme.export(&["postgres", "--dsn", &dsn, "--follow", "--batch", "200"]);
    answers.extend(kill_while_loading(&scheme, 6, start, || {
        scheme.pay("PG2", 1_200)
    }));
    scheme.close_window();
    answers.extend(scheme.pay("PG3", 100));
    let summary = scheme.export_once(&["postgres", "--dsn", &dsn]);

    let chain = scheme.chain();
    let head = chain.len() as u64;
    assert_eq!(summary["durable_seq"], json!(head), "{summary}");
    // Every voucher once, with the switch's hash and body.
    let rows = pg.query("SELECT seq, encode(hash, 'hex'), body FROM vouchers ORDER BY seq");
    assert_eq!(rows.len() as u64, head);
    for ((seq, hash, body), row) in chain.iter().zip(&rows) {
        assert_eq!(row[0], seq.to_string());
        assert_eq!(row[1], hex::encode(hash), "voucher {seq}");
        assert_eq!(&row[2], body, "voucher {seq}");
    }
    let state = pg.query(
        "SELECT last_seq, encode(last_hash, 'hex'), open_window FROM clearhouse_export_state",
    );
    assert_eq!(
        state[0],
        vec![
            head.to_string(),
            hex::encode(chain.last().unwrap().1),
            "3".to_string()
        ]
    );
    // Every final answer a debtor agent was given is in the mirror, with the same outcome.
    let payments: BTreeMap<String, String> = pg
        .query("SELECT payment_id, status FROM payments")
        .into_iter()
        .map(|r| (r[0].clone(), r[1].clone()))
        .collect();
    let payment_vouchers = chain
        .iter()
        .filter(|(_, _, b)| {
            b.contains("\"type\":\"payment_settled\"")
                || b.contains("\"type\":\"payment_rejected\"")
        })
        .count();
    assert_eq!(payments.len(), payment_vouchers);
    for (instruction, (id, state)) in &answers {
        let expected = match state.as_str() {
            "ACSC" => "settled",
            "RJCT" => "rejected",
            _ => continue,
        };
        assert_eq!(
            payments.get(id).map(String::as_str),
            Some(expected),
            "{instruction}"
        );
    }
    let returns = pg.query("SELECT count(*) FROM returns");
    assert!(
        returns[0][0].parse::<u64>().unwrap() > 0,
        "returns exported"
    );
    // Positions per window equal the windows' own reports; windows carry their checkpoints.
    for window in [1u64, 2] {
        let report = scheme.window(window);
        let mirror: BTreeMap<(String, String), (String, u64, String, u64)> = pg
            .query(&format!(
                "SELECT participant, currency, sent, sent_count, received, received_count FROM positions WHERE window_no = {window}"
            ))
            .into_iter()
            .map(|r| ((r[0].clone(), r[1].clone()), (r[2].clone(), r[3].parse().unwrap(), r[4].clone(), r[5].parse().unwrap())))
            .collect();
        assert_eq!(mirror, report_positions(&report), "window {window}");
        let closed = pg.query(&format!(
            "SELECT closed_seq, encode(checkpoint_signature, 'hex'), settled_seq IS NOT NULL FROM windows WHERE window_no = {window}"
        ));
        assert_eq!(
            closed[0][0],
            report["checkpoint"]["seq"].as_u64().unwrap().to_string()
        );
        assert_eq!(
            closed[0][1],
            report["checkpoint"]["signature"].as_str().unwrap()
        );
        assert_eq!(closed[0][2], "t", "window {window} settled");
        let adjustments: BTreeMap<String, String> = pg
            .query(&format!(
                "SELECT participant, net FROM fund_adjustments WHERE window_no = {window}"
            ))
            .into_iter()
            .map(|r| (r[0].clone(), r[1].clone()))
            .collect();
        let instructions: BTreeMap<String, String> = report["plan"]["instructions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| {
                (
                    i["participant"].as_str().unwrap().to_string(),
                    i["net_minor_units"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        assert_eq!(adjustments, instructions, "window {window}");
    }
    // A mirror filled from another chain is refused, and nothing is written.
    pg.query(
        "UPDATE clearhouse_export_state SET last_hash = '\\x00' || substring(last_hash from 2)",
    );
    let output = scheme
        .export(&["postgres", "--dsn", &dsn])
        .wait_with_output()
        .unwrap();
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("another chain"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn parquet_archive_has_a_file_per_window_that_pyarrow_reads_and_the_reports_agree() {
    let scheme = Scheme::start(None);
    let archive = scheme.data.parent().unwrap().join("archive");
    let dir = archive.to_str().unwrap().to_string();
    scheme.pay("AR1", 300);
    scheme.close_window();
    let start = || scheme.export(&["parquet", "--dir", &dir, "--follow", "--batch", "100"]);
    kill_while_loading(&scheme, 4, start, || {
        let answers = scheme.pay("AR2", 500);
        scheme.close_window();
        answers
    });
    // Killed mid-window: only complete files carry the final name.
    scheme.pay("AR3", 200);
    scheme.close_window();
    let summary = scheme.export_once(&["parquet", "--dir", &dir]);
    let chain = scheme.chain();
    let files = run_python("read_parquet.py", &[&dir]);
    let files = files.as_array().unwrap();
    assert_eq!(files.len(), 3, "one file per closed window");
    let leftovers: Vec<_> = std::fs::read_dir(&archive)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| !n.ends_with(".parquet") || n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let mut next = 1u64;
    for (i, file) in files.iter().enumerate() {
        let window = i as u64 + 1;
        let report = scheme.window(window);
        let meta = &file["metadata"];
        assert_eq!(file["file"], json!(format!("window-{window:010}.parquet")));
        assert_eq!(meta["clearhouse.window"], json!(window.to_string()));
        assert_eq!(file["first_seq"], json!(next));
        assert_eq!(file["contiguous"], json!(true));
        let last = report["checkpoint"]["seq"].as_u64().unwrap();
        assert_eq!(file["last_seq"], json!(last));
        assert_eq!(meta["clearhouse.last_seq"], json!(last.to_string()));
        assert_eq!(meta["clearhouse.last_hash"], report["checkpoint"]["hash"]);
        assert_eq!(
            meta["clearhouse.last_hash"],
            json!(hex::encode(chain[last as usize - 1].1))
        );
        assert_eq!(
            meta["clearhouse.checkpoint_signature"],
            report["checkpoint"]["signature"]
        );
        let previous = if next == 1 {
            GENESIS_HASH
        } else {
            chain[next as usize - 2].1
        };
        assert_eq!(
            meta["clearhouse.previous_hash"],
            json!(hex::encode(previous))
        );
        assert_eq!(file["rows"], json!(last + 1 - next));
        // Payments and returns counted and summed by pyarrow equal the window's figures.
        let sums = &file["by_kind_currency"];
        let figure = &report["plan"]["figures"][0];
        let rows = |key: &str| sums[key]["rows"].as_u64().unwrap_or(0);
        let amount = |key: &str| {
            sums[key]["amount"]
                .as_str()
                .map_or(0u128, |a| a.parse().unwrap())
        };
        assert_eq!(
            rows("payment_settled/EUR") + rows("payment_returned/EUR"),
            figure["transfers"].as_u64().unwrap(),
            "window {window}"
        );
        assert_eq!(
            (amount("payment_settled/EUR") + amount("payment_returned/EUR")).to_string(),
            figure["gross_minor_units"].as_str().unwrap(),
            "window {window}"
        );
        next = last + 1;
    }
    assert!(files[0]["schema"]
        .as_array()
        .unwrap()
        .contains(&json!("amount:decimal128(38, 0)")));
    assert_eq!(summary["durable_seq"], json!(next - 1));
}

struct Tansu(Child, u16);

impl Tansu {
    fn start() -> Tansu {
        let port = free_port();
        let url = format!("tcp://127.0.0.1:{port}");
        let child = Command::new("tansu")
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", "memory://tansu/"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tansu (cargo install tansu --locked --features dynostore)");
        wait_port(port, "tansu");
        Tansu(child, port)
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn kafka_topics_hold_every_voucher_once_after_the_exporter_is_killed() {
    let broker = Tansu::start();
    let scheme = Scheme::start(None);
    let brokers = format!("127.0.0.1:{}", broker.1);
    scheme.pay("KF1", 300);
    scheme.close_window();
    let start = || {
        scheme.export(&[
            "kafka",
            "--brokers",
            &brokers,
            "--topic-prefix",
            "ch",
            "--partitions",
            "2",
            "--follow",
            "--batch",
            "300",
        ])
    };
    kill_while_loading(&scheme, 5, start, || scheme.pay("KF2", 900));
    scheme.close_window();
    let summary = scheme.export_once(&[
        "kafka",
        "--brokers",
        &brokers,
        "--topic-prefix",
        "ch",
        "--partitions",
        "2",
    ]);
    let chain = scheme.chain();
    assert_eq!(summary["durable_seq"], json!(chain.len()));
    let topics = run_python("read_kafka.py", &[&brokers, "ch"]);
    let mut seen: BTreeMap<u64, (String, String, String, String)> = BTreeMap::new();
    for (topic, records) in topics.as_object().unwrap() {
        let mut last_per_partition: BTreeMap<u64, u64> = BTreeMap::new();
        for record in records.as_array().unwrap() {
            let partition = record[0].as_u64().unwrap();
            let key = record[2].as_str().unwrap().to_string();
            let seq = record[3].as_u64().unwrap();
            let hash = record[4].as_str().unwrap().to_string();
            let kind = record[5].as_str().unwrap().to_string();
            let value = record[6].as_str().unwrap().to_string();
            assert_eq!(topic, &format!("ch.{kind}"));
            // In each partition, in chain order.
            assert!(
                last_per_partition.get(&partition).is_none_or(|l| *l < seq),
                "{topic}/{partition}: {seq} after {:?}: {}",
                last_per_partition.get(&partition),
                records
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|r| format!("{}@{}:{}", r[3], r[0], r[1]))
                    .collect::<Vec<_>>()
                    .join(" ")
            );
            last_per_partition.insert(partition, seq);
            let previous = seen.insert(seq, (kind, key, hash, value));
            assert!(previous.is_none(), "voucher {seq} published twice");
        }
    }
    let missing: Vec<String> = chain
        .iter()
        .filter(|(seq, _, _)| !seen.contains_key(seq))
        .map(|(seq, _, body)| format!("{seq}:{}", &body[..body.len().min(40)]))
        .collect();
    assert!(missing.is_empty(), "not published: {missing:?}");
    assert_eq!(seen.len(), chain.len(), "every voucher published");
    let mut kinds = BTreeSet::new();
    for (seq, hash, body) in &chain {
        let (kind, key, published_hash, value) = &seen[seq];
        assert_eq!(published_hash, &hex::encode(hash), "voucher {seq}");
        assert_eq!(value, body, "voucher {seq}");
        let event: Value = serde_json::from_str(body).unwrap();
        assert_eq!(event["type"].as_str().unwrap(), kind);
        if kind.starts_with("payment_s") || kind == "payment_rejected" {
            assert_eq!(
                key,
                event["payment"].as_str().unwrap(),
                "keyed by payment id"
            );
        }
        kinds.insert(kind.clone());
    }
    for kind in [
        "payment_settled",
        "payment_rejected",
        "payment_returned",
        "liquidity",
        "window_closed",
        "fund_adjustment",
        "window_settled",
    ] {
        assert!(kinds.contains(kind), "{kind} exported: {kinds:?}");
    }
}

#[test]
fn serve_runs_exporters_in_process_and_a_sink_down_does_not_stop_payments() {
    let mut pg = Postgres::start();
    let config = format!(
        "[[export]]\nname = \"mirror\"\nsink = \"postgres\"\ndsn = \"{}\"\n\n[[export]]\nname = \"archive\"\nsink = \"parquet\"\ndir = \"archive\"\n",
        pg.dsn()
    );
    let scheme = Scheme::start(Some(&config));
    scheme.pay("IP1", 200);
    let lag = |name: &str| -> (u64, u64) {
        let metrics = scheme.metrics();
        let value = |metric: &str| {
            metrics
                .lines()
                .find(|l| l.starts_with(&format!("{metric}{{export=\"{name}\"")))
                .and_then(|l| l.rsplit(' ').next())
                .map(|v| v.parse::<f64>().unwrap() as u64)
                .unwrap_or_else(|| panic!("{metric} for {name} in {metrics}"))
        };
        (
            value("clearhouse_export_lag_vouchers"),
            value("clearhouse_export_up"),
        )
    };
    let wait_caught_up = |name: &str| {
        let started = Instant::now();
        while lag(name).0 > 0 {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "{name} caught up within 60 s"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    wait_caught_up("mirror");
    // PostgreSQL crashes: payments go on settling, the mirror's lag grows and it says it is down.
    pg.kill();
    let started = Instant::now();
    let answers = scheme.pay("IP2", 300);
    let settled = answers.values().filter(|(_, s)| s == "ACSC").count();
    assert!(
        settled > 250,
        "payments settle while the mirror is down: {settled}"
    );
    let started_lag = Instant::now();
    loop {
        let (behind, up) = lag("mirror");
        if behind > 300 && up == 0 {
            break;
        }
        assert!(
            started_lag.elapsed() < Duration::from_secs(5),
            "lag {behind}, up {up}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "300 payments with the mirror down in {:?}",
        started.elapsed()
    );
    // The dashboard, in a real browser, says the mirror is down and how far behind it is.
    let dom = dashboard_dom(&scheme.url, &scheme.data, 2_500);
    let row = export_row(&dom, "mirror");
    assert!(row.contains(">down<"), "{row}");
    assert!(row.contains("postgres"), "{row}");
    assert!(export_row(&dom, "archive").contains(">up<"), "{dom}");
    // Back: the mirror catches up by itself, and holds the whole chain.
    pg.run();
    wait_caught_up("mirror");
    let chain = scheme.chain();
    let rows = pg.query("SELECT count(*), max(seq) FROM vouchers");
    assert_eq!(
        rows[0],
        vec![chain.len().to_string(), chain.len().to_string()]
    );
    // The archive follows windows: a close makes its file.
    scheme.close_window();
    scheme.pay("IP3", 20);
    wait_caught_up("mirror");
    let archive = scheme
        .data
        .join("archive")
        .join("window-0000000001.parquet");
    let started = Instant::now();
    while !archive.exists() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "archive file for window 1"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The dashboard shows the exporters to the operator.
    let op = scheme.operator();
    let (status, dashboard) = scheme
        .runtime
        .block_on(call(&op, "GET", "/v1/dashboard", Value::Null))
        .unwrap();
    assert_eq!(status, 200);
    let names: Vec<&str> = dashboard["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["mirror", "archive"]);
    let dom = dashboard_dom(&scheme.url, &scheme.data, 2_500);
    let row = export_row(&dom, "mirror");
    assert!(row.contains(">up<"), "{row}");
}

/// The dashboard's table row of one exporter.
fn export_row(dom: &str, name: &str) -> String {
    let start = dom
        .find(&format!("data-export=\"{name}\""))
        .unwrap_or_else(|| panic!("exporter {name} not on the dashboard: {dom}"));
    dom[start..start + dom[start..].find("</tr>").unwrap()].to_string()
}

/// A metric's value on `/metrics` (the first line of that name), if it is there.
fn metric(scheme: &Scheme, name: &str) -> Option<f64> {
    scheme
        .metrics()
        .lines()
        .find(|l| l.starts_with(&format!("{name} ")))
        .and_then(|l| l.rsplit(' ').next())
        .map(|v| v.parse().unwrap())
}

fn wait_metric(scheme: &Scheme, name: &str, at_least: f64, seconds: u64) {
    let started = Instant::now();
    loop {
        let value = metric(scheme, name);
        if value.is_some_and(|v| v >= at_least) {
            return;
        }
        if started.elapsed() > Duration::from_secs(seconds) {
            let (_, dashboard) = scheme.get(None, "/v1/dashboard");
            panic!(
                "{name} reached {at_least} within {seconds} s (it is {value:?}); storage: {}",
                dashboard["storage"]
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Resubmits an instruction of `pay` with the same content (its debtor and amount recomputed).
fn resubmit(scheme: &Scheme, prefix: &str, n: u32) -> (u16, Value) {
    let debtor = BANKS[(n % 3) as usize];
    let creditor = BANKS[((n + 1 + n / 3) % 3) as usize];
    let creditor = if creditor == debtor {
        BANKS[((n + 2) % 3) as usize]
    } else {
        creditor
    };
    let instruction = format!("{prefix}-{n}");
    scheme
        .runtime
        .block_on(call(
            &client(&scheme.url, debtor),
            "POST",
            "/v1/payments",
            json!({
                "instruction_id": instruction, "end_to_end_id": format!("E2E-{instruction}"),
                "debtor_agent": debtor, "creditor_agent": creditor,
                "amount": format!("{}.{:02}", 1 + n % 97, n % 100), "currency": "EUR",
                "debtor": {"name": "Alice", "account": "DE89370400440532013000"},
                "creditor": {"name": "Bob", "account": "FR1420041010050500013M02606"},
            }),
        ))
        .unwrap()
}

#[test]
fn retention_prunes_only_what_the_archive_holds_and_survives_kill_9() {
    let config = "[[export]]\nname = \"archive\"\nsink = \"parquet\"\ndir = \"archive\"\n\n\
                  [retention]\nhot_windows = 1\narchive = \"archive\"\nduplicate_window_seconds = 40\ninterval_ms = 200\n";
    let mut scheme = Scheme::start(Some(config));
    let w1 = scheme.pay("W1", 300);
    scheme.close_window();
    let w2 = scheme.pay("W2", 200);
    scheme.close_window();
    let w3 = scheme.pay("W3", 200);
    scheme.close_window();
    // Window 4 is open, one closed window stays hot: 1 and 2 are pruned once archived.
    wait_metric(
        &scheme,
        "clearhouse_retention_pruned_through_window",
        2.0,
        60,
    );
    assert_eq!(metric(&scheme, "clearhouse_retention_blocked"), Some(0.0));
    assert!(metric(&scheme, "clearhouse_disk_bytes").unwrap() > 0.0);
    let settled_w1 = w1.iter().find(|(_, (_, s))| s == "ACSC").unwrap();
    let (instruction, (id, _)) = settled_w1;
    let n: u32 = instruction.strip_prefix("W1-").unwrap().parse().unwrap();
    let debtor = BANKS[(n % 3) as usize];
    // Status of a pruned payment: "archived" to the operator and to its debtor asking by its
    // instruction; a participant asking by payment id learns nothing (a tombstone names no one).
    let (status, body) = scheme.get(None, &format!("/v1/payments/{id}"));
    assert_eq!(
        (status, body["code"].as_str()),
        (410, Some("archived")),
        "{body}"
    );
    assert!(
        body["message"].as_str().unwrap().contains("window 1"),
        "{body}"
    );
    let (status, body) = scheme.get(
        Some(debtor),
        &format!("/v1/payments?instruction_id={instruction}"),
    );
    assert_eq!(status, 410, "{body}");
    let (status, _) = scheme.get(Some(debtor), &format!("/v1/payments/{id}"));
    assert_eq!(status, 404);
    // A duplicate of it is still refused within the duplicate window.
    let (status, body) = resubmit(&scheme, "W1", n);
    assert_eq!(
        (status, body["reason"].as_str()),
        (409, Some("DUPL")),
        "{body}"
    );
    // Hot payments answer as before.
    let (_, (hot_id, hot_state)) = w3.iter().next().unwrap();
    let (status, body) = scheme.get(None, &format!("/v1/payments/{hot_id}"));
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some(hot_state.as_str())),
        "{body}"
    );
    // The chain: vouchers up to window 2's close are archived; the hot part continues from there.
    let window2 = scheme.window(2);
    let anchor = window2["checkpoint"]["seq"].as_u64().unwrap();
    let (status, body) = scheme.get(None, "/v1/vouchers?from=1&limit=10");
    assert_eq!(
        (status, body["code"].as_str()),
        (410, Some("archived")),
        "{body}"
    );
    let (status, page) = scheme.get(None, &format!("/v1/vouchers?from={}&limit=10", anchor + 1));
    assert_eq!(status, 200, "{page}");
    assert_eq!(
        page["previous_hash"], window2["checkpoint"]["hash"],
        "{page}"
    );
    let (status, dashboard) = scheme.get(None, "/v1/dashboard");
    assert_eq!(status, 200);
    assert_eq!(dashboard["storage"]["pruned_through"], 2, "{dashboard}");

    // An archive file that is not right stops pruning, loudly, and nothing leaves the hot store.
    let archive = scheme.data.join("archive");
    let file3 = archive.join("window-0000000003.parquet");
    let good = std::fs::read(&file3).unwrap();
    // Cut short (as by a failing disk or a careless copy): unreadable.
    std::fs::write(&file3, &good[..good.len() / 2]).unwrap();
    scheme.pay("W4", 100);
    scheme.close_window();
    wait_metric(&scheme, "clearhouse_retention_blocked", 1.0, 30);
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(
        metric(&scheme, "clearhouse_retention_pruned_through_window"),
        Some(2.0)
    );
    let (_, (w3_id, _)) = w3.iter().next().unwrap();
    assert_eq!(scheme.get(None, &format!("/v1/payments/{w3_id}")).0, 200);
    // Missing: the same, and the dashboard says which file.
    std::fs::remove_file(&file3).unwrap();
    let started = Instant::now();
    loop {
        let (_, dashboard) = scheme.get(None, "/v1/dashboard");
        let storage = &dashboard["storage"];
        if storage["retention_error"]
            .as_str()
            .is_some_and(|e| e.contains("no file for window 3"))
        {
            assert_eq!(storage["retention_blocked"], true, "{storage}");
            assert_eq!(storage["pruned_through"], 2, "{storage}");
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "{storage}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Put right: pruning resumes by itself.
    std::fs::write(&file3, &good).unwrap();
    wait_metric(
        &scheme,
        "clearhouse_retention_pruned_through_window",
        3.0,
        30,
    );
    assert_eq!(metric(&scheme, "clearhouse_retention_blocked"), Some(0.0));

    // SIGKILL while windows are being pruned, at varied moments; every restart finishes the job.
    let mut all = w1.clone();
    all.extend(w2.clone());
    all.extend(w3.clone());
    for round in 0..3u64 {
        all.extend(scheme.pay(&format!("K{round}"), 400));
        scheme.close_window();
        std::thread::sleep(Duration::from_millis(40 + 90 * round));
        scheme.restart();
    }
    // Window 7 is hot now (6 at most pruned): its statement, for the next one's opening.
    let statement = |scheme: &Scheme, window: u64| {
        scheme.get(
            None,
            &format!("/v1/windows/{window}/statement?participant={}", BANKS[0]),
        )
    };
    let (status, seventh) = statement(&scheme, 7);
    assert_eq!(status, 200, "{seventh}");
    scheme.close_window();
    all.extend(scheme.pay("H", 60));
    // Windows 1..=8 are closed and settled, 9 open: 1..=7 pruned.
    wait_metric(
        &scheme,
        "clearhouse_retention_pruned_through_window",
        7.0,
        60,
    );
    let pruned = metric(&scheme, "clearhouse_retention_pruned_through_window").unwrap() as u64;
    // Every payment is hot or archived, never lost: archived ones are in the archive's files.
    // (Read by pyarrow, a third-party reader.)
    let mut archived_ids = BTreeSet::new();
    for file in run_python("read_parquet.py", &[archive.to_str().unwrap()])
        .as_array()
        .unwrap()
    {
        let window: u64 = file["metadata"]["clearhouse.window"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        if window <= pruned {
            for id in file["payment_ids"].as_array().unwrap() {
                archived_ids.insert(id.as_str().unwrap().to_string());
            }
        }
    }
    let mut hot = 0;
    let mut archived = 0;
    for (id, state) in all.values() {
        let (status, body) = scheme.get(None, &format!("/v1/payments/{id}"));
        match status {
            200 => {
                assert_eq!(body["status"].as_str(), Some(state.as_str()), "{body}");
                hot += 1;
            }
            410 => {
                assert!(
                    archived_ids.contains(id),
                    "payment {id} is neither hot nor in the archive: {body}; archive files {:?}",
                    std::fs::read_dir(&archive)
                        .unwrap()
                        .map(|e| e.unwrap().file_name())
                        .collect::<Vec<_>>()
                );
                archived += 1;
            }
            other => panic!("payment {id}: {other} {body}"),
        }
    }
    eprintln!("{hot} payments hot, {archived} archived");
    // Statements: an archived window's are refused; the first hot window's opening balances
    // chain from the kept closing balances of the last pruned one, also after a restart.
    assert_eq!(statement(&scheme, 1).0, 410);
    scheme.restart();
    let (status, eighth) = statement(&scheme, 8);
    assert_eq!(status, 200, "{eighth}");
    assert_eq!(
        eighth[0]["opening_balance_minor_units"], seventh[0]["closing_balance_minor_units"],
        "{eighth} {seventh}"
    );
    assert!(archived >= 700 && hot > 0, "{hot} hot, {archived} archived");
    // The duplicate window of window 1 ends: its tombstones go, and the instruction id is free.
    wait_metric(
        &scheme,
        "clearhouse_retention_tombstones_cleared_through_window",
        1.0,
        60,
    );
    let (status, body) = resubmit(&scheme, "W1", n);
    assert_eq!(status, 200, "{body}");
    assert_ne!(body["payment_id"].as_str(), Some(id.as_str()));

    // Stopped: the data directory verifies from its anchor, and with the archive as a whole.
    scheme.server.take();
    let verify = |archive_dir: Option<&Path>| {
        let mut command = Command::new(BIN);
        command
            .args(["verify", "--json", "--data-dir"])
            .arg(&scheme.data);
        if let Some(dir) = archive_dir {
            command.arg("--archive").arg(dir);
        }
        command.output().unwrap()
    };
    let passed = |output: std::process::Output| -> Value {
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).unwrap()
    };
    let report = passed(verify(None));
    assert!(report["anchored_at"].as_u64().unwrap() > 0, "{report}");
    let whole = passed(verify(Some(&archive)));
    assert_eq!(whole["anchored_at"], 0, "{whole}");
    assert_eq!(whole["head_hash"], report["head_hash"]);
    // An archive file swapped for another (window 2's under window 1's name) fails the
    // whole-chain verification.
    std::fs::copy(
        archive.join("window-0000000002.parquet"),
        archive.join("window-0000000001.parquet"),
    )
    .unwrap();
    let output = verify(Some(&archive));
    assert_eq!(
        output.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}
