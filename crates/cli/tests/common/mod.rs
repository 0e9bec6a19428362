//! Helpers shared by the CLI's process-level tests: `clearhouse` child processes that print
//! `listening on URL` first, killed (SIGKILL) when dropped.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `clearhouse <args> [--data-dir data]` with extra environment, and returns it with the
/// URL it listens on.
pub fn spawn(args: &[&str], data: Option<&Path>, env: &[(&str, &str)]) -> (Killed, String) {
    try_spawn(args, data, env).unwrap_or_else(|line| panic!("{line}"))
}

/// [`spawn`], or the first line it printed instead of `listening on URL` (a process that exits
/// at once, e.g. a replicated node stepping down again).
pub fn try_spawn(
    args: &[&str],
    data: Option<&Path>,
    env: &[(&str, &str)],
) -> Result<(Killed, String), String> {
    let mut command = Command::new(env!("CARGO_BIN_EXE_clearhouse"));
    command.args(args).envs(env.iter().copied());
    if let Some(data) = data {
        command.arg("--data-dir").arg(data);
    }
    let mut child = command
        .stdout(Stdio::piped())
        // TEST_CHILD_STDERR=1 shows the children's logs (debugging a failing test).
        .stderr(if std::env::var_os("TEST_CHILD_STDERR").is_some() {
            Stdio::inherit()
        } else {
            Stdio::null()
        })
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let killed = Killed(child);
    match line.trim().strip_prefix("listening on ") {
        Some(url) => Ok((killed, url.to_string())),
        None => Err(line),
    }
}

/// The HMAC secret the tests give a simulated bank (hex).
pub fn secret(bic: &str) -> String {
    hex::encode(format!("secret-of-{bic}-0123456789"))
}

/// A participant's signed client, with the secret the tests give `bic`.
pub fn client(url: &str, bic: &str) -> clearhouse_switch::client::SignedClient {
    clearhouse_switch::client::SignedClient::new(
        url,
        &format!("{bic}-1"),
        hex::decode(secret(bic)).unwrap(),
    )
}

/// A signed JSON call: (status, body), or None when the switch did not answer.
pub async fn call(
    client: &clearhouse_switch::client::SignedClient,
    method: &str,
    path: &str,
    body: serde_json::Value,
) -> Option<(u16, serde_json::Value)> {
    let bytes = if body.is_null() {
        vec![]
    } else {
        body.to_string().into_bytes()
    };
    let (status, answer) = client.request(method, path, &bytes).await.ok()?;
    Some((
        status,
        serde_json::from_slice(&answer).unwrap_or(serde_json::Value::Null),
    ))
}

/// What each debtor agent was told about each instruction: (debtor, Some((status, reason)) when
/// the answer was final).
pub type ToldMap = std::collections::BTreeMap<String, (String, Option<(String, Option<String>)>)>;

/// The end-of-run checks of the kill tests, against the switch at `url` (past the hard timeout):
/// every final answer a debtor agent was given stands (same status and reason); every other
/// instruction is absent or final; nothing stays reserved and the positions of `banks` sum to
/// `funded_minor_units`; a window close has no breaks and holds every settled payment exactly
/// once. Returns the number of payments settled now.
pub async fn check_told_and_books(
    url: &str,
    operator: &clearhouse_switch::client::SignedClient,
    told: &ToldMap,
    banks: &[&str],
    funded_minor_units: i128,
) -> usize {
    use serde_json::{json, Value};
    let mut settled_now = 0usize;
    for (instruction, (debtor, was_told)) in told {
        let (status, now) = call(
            &client(url, debtor),
            "GET",
            &format!("/v1/payments?instruction_id={instruction}"),
            Value::Null,
        )
        .await
        .unwrap();
        if now["status"] == "ACSC" {
            settled_now += 1;
        }
        match was_told {
            Some((state, reason)) => {
                assert_eq!(
                    status, 200,
                    "{instruction} was answered {state} but is now {now}"
                );
                assert_eq!(
                    now["status"].as_str(),
                    Some(state.as_str()),
                    "{instruction}: {now}"
                );
                assert_eq!(
                    now["reason"].as_str(),
                    reason.as_deref(),
                    "{instruction}: {now}"
                );
            }
            // Never answered: never accepted (404), or accepted and final by now.
            None => assert!(
                status == 404 || (status == 200 && now["status"] != "PDNG"),
                "{instruction}: {status} {now}"
            ),
        }
    }
    check_books(operator, banks, funded_minor_units).await;
    let (status, window) = call(operator, "POST", "/v1/admin/windows/close", Value::Null)
        .await
        .unwrap();
    assert_eq!(status, 200, "{window}");
    assert_eq!(window["breaks"], json!([]), "{window}");
    assert_eq!(
        window["plan"]["figures"][0]["transfers"].as_u64().unwrap() as usize,
        settled_now,
        "the window holds every settled payment exactly once"
    );
    settled_now
}

/// Nothing stays reserved, and the positions of `banks` sum to `funded_minor_units` (payments
/// only move money between positions).
pub async fn check_books(
    operator: &clearhouse_switch::client::SignedClient,
    banks: &[&str],
    funded_minor_units: i128,
) {
    use serde_json::Value;
    let mut total: i128 = 0;
    for bic in banks {
        let (_, positions) = call(
            operator,
            "GET",
            &format!("/v1/participants/{bic}/positions"),
            Value::Null,
        )
        .await
        .unwrap();
        assert_eq!(
            positions[0]["reserved_outgoing"], "0.00",
            "{bic}: {positions}"
        );
        total += positions[0]["balance"]
            .as_str()
            .unwrap()
            .replace('.', "")
            .parse::<i128>()
            .unwrap();
    }
    assert_eq!(
        total, funded_minor_units,
        "positions sum to what was funded"
    );
}

/// The dashboard at `url`, signed in as the operator of `data`, as headless Chromium renders it
/// after `budget_ms` of virtual time (Debian's `chromium`, installed by .ci/run).
#[allow(dead_code)]
pub fn dashboard_dom(url: &str, data: &Path, budget_ms: u64) -> String {
    let key = std::fs::read_to_string(data.join("operator.key")).unwrap();
    let mut parts = key.split_whitespace();
    let (key_id, secret) = (parts.next().unwrap(), parts.next().unwrap());
    let profile = tempfile::tempdir().unwrap();
    let output = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--dump-dom",
        ])
        .arg(format!("--virtual-time-budget={budget_ms}"))
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("{url}/dashboard#key_id={key_id}&secret={secret}"))
        .output()
        .expect("chromium (Debian package chromium; .ci/run installs it)");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// `GET /metrics` of the switch at `url` (plain HTTP/1.1, unauthenticated), headers included.
#[allow(dead_code)]
pub fn metrics_text(url: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(url.trim_start_matches("http://")).unwrap();
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    text
}
