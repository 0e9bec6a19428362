//! The README's main command and the payments benchmark, as a user runs them: real processes
//! (switch, simulated banks, load generator) over signed HTTP on loopback.

use std::process::Command;

fn clearhouse(dir: &std::path::Path, args: &[&str]) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_clearhouse"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run clearhouse");
    (
        output.status.success(),
        format!(
            "{}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    )
}

#[test]
fn bench_payments_reports_every_figure_and_the_books_balance() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, output) = clearhouse(
        dir.path(),
        &[
            "bench",
            "payments",
            "--participants",
            "4",
            "--payments",
            "400",
            "--clients",
            "4",
            "--reject-per-10k",
            "2500",
            "--json",
        ],
    );
    assert!(ok, "{output}");
    let json_start = output.find('{').expect("a JSON object");
    let json_end = output.rfind('}').unwrap();
    let report: serde_json::Value = serde_json::from_str(&output[json_start..=json_end]).unwrap();
    let settled = report["settled"].as_u64().unwrap();
    let rejected = report["rejected_by_reason"]["AC04"].as_u64().unwrap_or(0);
    assert_eq!(settled + rejected, 400, "{report}");
    assert!(
        rejected > 40 && rejected < 200,
        "about a quarter rejected: {report}"
    );
    assert!(report["settled_per_second"].as_f64().unwrap() > 0.0);
    for key in ["p50", "p99", "p999", "max"] {
        assert!(report["latency_ms"][key].as_f64().unwrap() > 0.0, "{key}");
    }
    assert!(report["cpu_seconds_per_1000"].as_f64().unwrap() > 0.0);
    // Per process (issue 14): the three shares are measured and add up to the total.
    let by = &report["cpu_seconds_per_1000_by_process"];
    let parts: f64 = ["switch", "banks", "load_generator"]
        .iter()
        .map(|p| by[p].as_f64().unwrap())
        .sum();
    assert!(by["switch"].as_f64().unwrap() > 0.0, "{report}");
    assert!(
        (parts - report["cpu_seconds_per_1000"].as_f64().unwrap()).abs() < 0.01,
        "{report}"
    );
    // The switch's CPU by thread: the engine's own threads are there by name.
    let threads = report["switch_cpu_seconds_per_1000_by_thread"]
        .as_object()
        .unwrap();
    for name in ["clearhouse-engi", "clearhouse-sync", "clearhouse-inde"] {
        assert!(threads.contains_key(name), "{name}: {report}");
    }
    // Disk per settled payment (issue 21) is reported, beside what the ledger holds in all.
    assert!(
        report["disk_bytes_per_payment"].as_u64().is_some(),
        "{report}"
    );
    assert!(
        report["ledger_disk_bytes"].as_u64().unwrap() > 0,
        "{report}"
    );
    assert_eq!(report["books_balance"], true);
    assert_eq!(report["switch_stats"]["settled"].as_u64(), Some(settled));
    assert_eq!(report["http_errors_by_status"], serde_json::json!({}));
    // The traffic's window closes, settles and reconciles clean; every settled payment is in it.
    assert_eq!(report["window"]["state"], "settled", "{report}");
    assert_eq!(report["window"]["reconciliation_breaks"], 0);
    assert_eq!(report["window"]["transfers"].as_u64(), Some(settled));
    // The temporary data directory is removed afterwards.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn the_demo_runs_a_scheme_and_prints_a_summary() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, output) = clearhouse(
        dir.path(),
        &[
            "demo",
            "--participants",
            "3",
            "--seconds",
            "2",
            "--clients",
            "4",
        ],
    );
    assert!(ok, "{output}");
    assert!(
        output.contains("books balance (sum of positions = liquidity funded): true"),
        "{output}"
    );
    assert!(
        output.contains("payments") && output.contains("/s"),
        "live progress: {output}"
    );
    assert!(
        output.contains("clearing: window 1 settled")
            && output.contains("reconciliation breaks: 0"),
        "{output}"
    );
}

#[test]
fn bench_payments_in_iso20022_settles_through_pacs008_and_pacs002() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, output) = clearhouse(
        dir.path(),
        &[
            "bench",
            "payments",
            "--participants",
            "3",
            "--payments",
            "200",
            "--clients",
            "4",
            "--xml",
            "--json",
        ],
    );
    assert!(ok, "{output}");
    let report: serde_json::Value =
        serde_json::from_str(&output[output.find('{').unwrap()..=output.rfind('}').unwrap()])
            .unwrap();
    let rejected: u64 = report["rejected_by_reason"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(
        report["settled"].as_u64().unwrap() + rejected,
        200,
        "{report}"
    );
    assert!(
        report["rejected_by_reason"].get("?").is_none(),
        "every answer is a readable pacs.002: {report}"
    );
    assert_eq!(report["books_balance"], true);
}
