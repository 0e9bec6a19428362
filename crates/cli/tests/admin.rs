//! The operator CLI against a real `clearhouse serve` process.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

struct Server(std::process::Child);
impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_operator_cli_onboards_funds_limits_and_suspends() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut child = Command::new(env!("CARGO_BIN_EXE_clearhouse"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let _server = Server(child);
    let url = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap()
        .to_string();
    let key = data.join("operator.key");
    let admin = |args: &[&str]| {
        let output = Command::new(env!("CARGO_BIN_EXE_clearhouse"))
            .args(["admin", "--url", &url, "--key-file"])
            .arg(&key)
            .args(args)
            .output()
            .unwrap();
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).to_string()
                + &String::from_utf8_lossy(&output.stderr),
        )
    };
    let (ok, out) = admin(&[
        "onboard",
        "--bic",
        "BANKDEFF",
        "--name",
        "Bank",
        "--endpoint",
        "http://127.0.0.1:9/x",
        "--currency",
        "EUR:deferred_net:cap=100.00:max=50.00",
    ]);
    assert!(ok && out.contains("secret_hex"), "{out}");
    let (ok, out) = admin(&[
        "liquidity",
        "BANKDEFF",
        "--currency",
        "EUR",
        "--amount",
        "10",
        "--request-id",
        "r1",
    ]);
    assert!(ok, "{out}");
    let (ok, out) = admin(&["positions", "BANKDEFF"]);
    assert!(ok && out.contains("\"available\": \"110.00\""), "{out}");
    let (ok, out) = admin(&[
        "limits",
        "BANKDEFF",
        "--currency",
        "EUR",
        "--per-payment-max",
        "1.234",
    ]);
    assert!(
        !ok && out.contains("AM12"),
        "a bad amount is refused with its reason code: {out}"
    );
    let (ok, out) = admin(&["suspend", "BANKDEFF"]);
    assert!(ok && out.contains("\"status\": \"suspended\""), "{out}");
    let (ok, out) = admin(&[
        "onboard",
        "--bic",
        "BANKDEFF",
        "--name",
        "Again",
        "--endpoint",
        "http://127.0.0.1:9",
        "--currency",
        "EUR:prefunded",
    ]);
    assert!(!ok && out.contains("participant_exists"), "{out}");
    // Window 1 holds the liquidity voucher only: it closes and settles with nothing to net.
    let (ok, out) = admin(&["close-window"]);
    assert!(ok && out.contains("\"state\": \"settled\""), "{out}");
    let (ok, out) = admin(&["windows"]);
    assert!(ok && out.contains("\"window\": 2"), "{out}");
    let (ok, out) = admin(&["window", "1", "--format", "csv"]);
    assert!(
        ok && out.starts_with("window,participant,currency"),
        "{out}"
    );
    let (ok, out) = admin(&["window", "1", "--format", "svg"]);
    assert!(ok && out.starts_with("<svg"), "{out}");
    let (ok, out) = admin(&[
        "statement",
        "1",
        "--participant",
        "BANKDEFF",
        "--format",
        "csv",
    ]);
    assert!(ok && out.contains("liquidity"), "{out}");
    let (ok, out) = admin(&["settle-window", "2"]);
    assert!(!ok && out.contains("window_open"), "{out}");
    // Someone else's key file: refused.
    std::fs::write(
        dir.path().join("forged.key"),
        "operator 00112233445566778899aabbccddeeff\n",
    )
    .unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_clearhouse"))
        .args(["admin", "--url", &url, "--key-file"])
        .arg(dir.path().join("forged.key"))
        .arg("stats")
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("401 unauthorized"));
}
