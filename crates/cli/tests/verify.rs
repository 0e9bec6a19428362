//! `clearhouse bench clearing` leaves a settled window in a data directory; `export-vouchers` and
//! `verify` check it, with exit codes scripts can rely on: 0 verified, 1 tampered (the message
//! names the voucher, or the journal record that was altered), 2 unreadable.

use std::process::Command;

fn clearhouse(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_clearhouse"))
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap()
}

#[test]
fn verify_passes_a_good_chain_and_names_a_tampered_voucher() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data_text = data.to_str().unwrap();
    let bench = clearhouse(&[
        "bench",
        "clearing",
        "--payments",
        "3000",
        "--participants",
        "7",
        "--data-dir",
        data_text,
        "--json",
    ]);
    assert!(
        bench.status.success(),
        "{}",
        String::from_utf8_lossy(&bench.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&bench.stdout).unwrap();
    assert_eq!(report["breaks"], 0);
    assert_eq!(report["statements"], 7);

    let verify = clearhouse(&["verify", "--data-dir", data_text]);
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
    assert!(String::from_utf8_lossy(&verify.stdout).contains("1 signed checkpoints"));

    let export = dir.path().join("vouchers.export");
    let export_text = export.to_str().unwrap();
    let out = clearhouse(&[
        "export-vouchers",
        "--data-dir",
        data_text,
        "--out",
        export_text,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = std::fs::read_to_string(data.join("operator-ed25519.pub")).unwrap();
    let good = clearhouse(&[
        "verify",
        "--export",
        export_text,
        "--public-key",
        key.trim(),
        "--json",
    ]);
    assert!(
        good.status.success(),
        "{}",
        String::from_utf8_lossy(&good.stderr)
    );
    let verified: serde_json::Value = serde_json::from_slice(&good.stdout).unwrap();
    assert_eq!(verified["checkpoints"], 1);

    // Change one digit of an amount in the middle of the export.
    let mut bytes = std::fs::read(&export).unwrap();
    let middle = bytes.len() / 2;
    let at = middle
        + bytes[middle..]
            .windows(10)
            .position(|w| w == b"\"amount\":\"")
            .unwrap()
        + 10;
    bytes[at] = if bytes[at] == b'1' { b'2' } else { b'1' };
    std::fs::write(&export, &bytes).unwrap();
    let bad = clearhouse(&[
        "verify",
        "--export",
        export_text,
        "--public-key",
        key.trim(),
    ]);
    assert_eq!(bad.status.code(), Some(1));
    let message = String::from_utf8_lossy(&bad.stderr);
    assert!(message.contains("FAILED: voucher "), "{message}");
    assert!(message.contains("hash does not match"), "{message}");

    let missing = clearhouse(&[
        "verify",
        "--data-dir",
        dir.path().join("nothing").to_str().unwrap(),
    ]);
    assert_eq!(missing.status.code(), Some(2));

    // Alter one byte in the middle of the journal (issue 17.5: this exited 2, "cannot read the
    // input"): a failed verification (1) naming the record, not an unreadable input.
    let journal = data.join("ledger").join("journal");
    let segment = std::fs::read_dir(&journal)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "wal"))
        .min()
        .unwrap();
    let mut bytes = std::fs::read(&segment).unwrap();
    let used = bytes.iter().rposition(|b| *b != 0).unwrap();
    bytes[used / 2] ^= 0x5a;
    std::fs::write(&segment, &bytes).unwrap();
    let altered = clearhouse(&["verify", "--data-dir", data_text]);
    let message = String::from_utf8_lossy(&altered.stderr);
    assert_eq!(altered.status.code(), Some(1), "{message}");
    assert!(
        message.contains("FAILED: the journal was altered"),
        "{message}"
    );
    assert!(message.contains("record "), "{message}");
}
