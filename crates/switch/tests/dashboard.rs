//! The live dashboard in a real headless Chromium (Debian's `chromium`, installed by .ci/run)
//! while payments flow: the page signs its own API calls, live figures appear and change between
//! two loads, a participant sees only its own positions, and a screenshot is saved.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

mod common;
use common::*;

const BANKS: [&str; 3] = ["DASHDEFF", "BORDDEFF", "VIEWDEFF"];

/// Loads the page in headless Chromium, lets it poll for `budget_ms` of virtual time, and
/// returns the DOM (or takes a screenshot into `screenshot`).
fn chromium(url: &str, budget_ms: u64, screenshot: Option<&PathBuf>) -> String {
    let profile = tempfile::tempdir().unwrap();
    let mut command = Command::new("chromium");
    command.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,1100",
        &format!("--virtual-time-budget={budget_ms}"),
    ]);
    command.arg(format!("--user-data-dir={}", profile.path().display()));
    match screenshot {
        Some(path) => command.arg(format!("--screenshot={}", path.display())),
        None => command.arg("--dump-dom"),
    };
    let output = command
        .arg(url)
        .output()
        .expect("chromium (Debian package chromium; .ci/run installs it)");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn text_of(dom: &str, id: &str) -> String {
    let start = dom
        .find(&format!("id=\"{id}\">"))
        .unwrap_or_else(|| panic!("#{id} not in the page: {dom}"))
        + id.len()
        + 6;
    dom[start..start + dom[start..].find('<').unwrap()].to_string()
}

#[test]
fn the_dashboard_shows_live_figures_in_a_real_browser() {
    let dir = tempfile::tempdir().unwrap();
    let banks_runtime = banks_runtime();
    let (banks, _) = banks_runtime.block_on(start_banks(
        BANKS.iter().map(|b| bank(b)).collect(),
        accepting(),
    ));
    // Chromium's virtual time (--virtual-time-budget) runs the page's clock ahead of the
    // switch's by up to the budget: allow signatures to lead by 5 s (the switch then refuses
    // signatures for its first 5 s; the signed client waits that out).
    let running = start_switch(
        dir.path(),
        clearhouse_switch::SwitchConfig {
            clock_lead_ms: 5_000,
            ..config()
        },
    );
    let url = running.url.clone();
    let stop = Arc::new(AtomicBool::new(false));
    banks_runtime.block_on(async {
        let op = operator(dir.path(), &url);
        for bic in BANKS {
            onboard(&op, bic, &banks, json!({"model": "prefunded"})).await;
            fund(&op, bic, "100000.00").await;
        }
    });
    // Traffic until the test is done (at most 20,000 payments).
    let load = {
        let url = url.clone();
        let stop = stop.clone();
        banks_runtime.spawn(async move {
            let mut sent = 0u32;
            while !stop.load(Ordering::SeqCst) && sent < 20_000 {
                let (debtor, creditor) = (BANKS[sent as usize % 3], BANKS[(sent as usize + 1) % 3]);
                let (status, body) = call(
                    &client_of(&url, debtor),
                    "POST",
                    "/v1/payments",
                    payment(debtor, creditor, &format!("D-{sent}"), "1.00"),
                )
                .await;
                assert_eq!(status, 200, "{body}");
                sent += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            sent
        })
    };
    let key = std::fs::read_to_string(dir.path().join("operator.key")).unwrap();
    let mut parts = key.split_whitespace();
    let (key_id, operator_secret) = (parts.next().unwrap(), parts.next().unwrap());
    let page = format!("{url}/dashboard#key_id={key_id}&secret={operator_secret}");

    let first = chromium(&page, 2_500, None);
    assert!(
        first.contains("data-ready=\"1\""),
        "the page never loaded data: {first}"
    );
    assert_eq!(text_of(&first, "viewer"), "operator");
    let settled_first: u64 = text_of(&first, "settled-total").parse().unwrap();
    assert!(settled_first > 0, "{first}");
    for bic in BANKS {
        assert!(
            first.contains(&format!("data-bic=\"{bic}\"")),
            "{bic} row missing"
        );
    }
    assert!(first.contains("ACSC"), "recent payments are listed");
    std::thread::sleep(Duration::from_millis(700));
    let second = chromium(&page, 2_500, None);
    let settled_second: u64 = text_of(&second, "settled-total").parse().unwrap();
    assert!(
        settled_second > settled_first,
        "live figures change: {settled_first} then {settled_second}"
    );
    assert!(
        text_of(&second, "updates").parse::<u64>().unwrap() >= 2,
        "the page keeps polling"
    );

    // A participant sees only its own positions.
    let participant = format!(
        "{url}/dashboard#key_id={}-1&secret={}",
        BANKS[2],
        hex::encode(common::secret(BANKS[2]))
    );
    let own = chromium(&participant, 2_000, None);
    assert_eq!(text_of(&own, "viewer"), BANKS[2]);
    assert!(own.contains(&format!("data-bic=\"{}\"", BANKS[2])));
    assert!(
        !own.contains(&format!("data-bic=\"{}\"", BANKS[0])),
        "another bank's row shown"
    );
    assert!(
        !own.contains(&format!("data-bic=\"{}\"", BANKS[1])),
        "another bank's row shown"
    );
    // Every recent payment the page lists is the participant's own (it is debtor or creditor
    // agent): payments between the two other banks (every third one) never show.
    let recent = own
        .split("<tbody id=\"recent\">")
        .nth(1)
        .and_then(|rest| rest.split("</tbody>").next())
        .expect("the recent payments table");
    let rows: Vec<&str> = recent.split("<tr>").skip(1).collect();
    assert!(
        !rows.is_empty(),
        "the participant's own payments are listed: {recent}"
    );
    for row in rows {
        assert!(row.contains(BANKS[2]), "a payment of others shown: {row}");
    }
    // The snapshot the page reads holds nothing of other participants: positions, payments,
    // the open and closed windows' positions and instructions.
    banks_runtime.block_on(async {
        let (status, view) = call(
            &client_of(&url, BANKS[2]),
            "GET",
            "/v1/dashboard",
            Value::Null,
        )
        .await;
        assert_eq!(status, 200, "{view}");
        let text = view.to_string();
        for p in view["participants"].as_array().unwrap() {
            assert_eq!(p["bic"], BANKS[2], "{p}");
        }
        for r in view["recent"].as_array().unwrap() {
            assert!(
                r["debtor_agent"] == BANKS[2] || r["creditor_agent"] == BANKS[2],
                "{r}"
            );
        }
        let mut windows = vec![view["window"].clone()];
        windows.extend(view["windows"].as_array().unwrap().iter().cloned());
        for w in windows {
            if let Some(plan) = w["plan"].as_object() {
                for key in ["positions", "instructions"] {
                    for entry in plan[key].as_array().unwrap() {
                        assert_eq!(entry["participant"], BANKS[2], "{key}: {entry}");
                    }
                }
            }
            assert!(w["breaks"].as_array().is_none_or(|b| b.is_empty()), "{w}");
        }
        assert!(text.contains(BANKS[2]));
    });

    // Wrong credentials: no data, an error shown.
    let wrong = chromium(
        &format!("{url}/dashboard#key_id={key_id}&secret=00ff"),
        1_500,
        None,
    );
    assert!(wrong.contains("data-ready=\"0\""));
    assert!(text_of(&wrong, "error").contains("401"), "{wrong}");

    let screenshot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    let _ = std::fs::remove_file(&screenshot);
    chromium(&page, 3_000, Some(&screenshot));
    let png = std::fs::read(&screenshot).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "screenshot at {}",
        screenshot.display()
    );

    stop.store(true, Ordering::SeqCst);
    let sent = banks_runtime.block_on(load).unwrap();
    assert!(sent > 0);
    drop(running);
}
