//! `clearhouse init` prepares a data directory that `clearhouse serve --config` starts from, and
//! refuses a directory that is not empty.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};

#[test]
fn init_writes_a_config_and_key_that_serve_starts_from() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let init = Command::new(env!("CARGO_BIN_EXE_clearhouse"))
        .args(["init", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let config = std::fs::read_to_string(data.join("switch.toml")).unwrap();
    assert!(
        config.contains("# A payment not accepted by its creditor agent")
            && config.contains("settle_deadline_ms = 10000")
    );
    let mode = std::fs::metadata(data.join("operator.key"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "the operator key is private");
    let mode = std::fs::metadata(data.join("operator-ed25519.key"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "the checkpoint signing key is private");
    assert_eq!(
        std::fs::read_to_string(data.join("operator-ed25519.pub"))
            .unwrap()
            .trim()
            .len(),
        64
    );
    // A second init refuses, changing nothing.
    let again = Command::new(env!("CARGO_BIN_EXE_clearhouse"))
        .args(["init", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert_eq!(
        std::fs::read_to_string(data.join("switch.toml")).unwrap(),
        config
    );
    // serve starts from it (the listen address overridden to a free port).
    let mut child = Command::new(env!("CARGO_BIN_EXE_clearhouse"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .arg("--config")
        .arg(data.join("switch.toml"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(line.starts_with("listening on http://127.0.0.1:"), "{line}");
}
