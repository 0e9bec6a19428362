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
    let url = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("{line}"))
        .to_string();
    (Killed(child), url)
}

/// The HMAC secret the tests give a simulated bank (hex).
pub fn secret(bic: &str) -> String {
    hex::encode(format!("secret-of-{bic}-0123456789"))
}
