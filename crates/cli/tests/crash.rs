//! Crash test with a real process: the ledger node runs as a child process under load and is
//! killed with SIGKILL at random moments; after each restart every acknowledged transfer must be
//! present exactly once, an unacknowledged batch must be all there or not at all, books must
//! balance, and a retried acknowledged request must answer `exists`.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const ACCOUNTS: u128 = 50;
const ROUNDS: u64 = 20;
const RESULT_OK: &str = "0";
const RESULT_EXISTS: &str = "32";

struct Process {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
}

fn start(dir: &std::path::Path) -> Process {
    let mut child = Command::new(env!("CARGO_BIN_EXE_clearhouse"))
        .args(["node", "--data-dir"])
        .arg(dir)
        // Small segments and frequent checkpoints, so kills land in every phase.
        .args([
            "--segment-size",
            "1200000",
            "--checkpoint-every-records",
            "5",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn clearhouse node");
    let stdin = child.stdin.take().unwrap();
    let stdout: ChildStdout = child.stdout.take().unwrap();
    let (sender, lines) = mpsc::sync_channel(16);
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if sender.send(line).is_err() {
                break;
            }
        }
    });
    let process = Process {
        child,
        stdin,
        lines,
    };
    let ready = process
        .lines
        .recv_timeout(Duration::from_secs(60))
        .expect("node ready");
    assert!(ready.starts_with("ready"), "{ready}");
    process
}

fn request(process: &mut Process, line: &str) -> Option<String> {
    writeln!(process.stdin, "{line}").ok()?;
    process.stdin.flush().ok()?;
    process.lines.recv_timeout(Duration::from_secs(30)).ok()
}

/// A tiny deterministic PRNG (SplitMix64) so a failing round can be rerun exactly.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Clone, Copy)]
struct Sent {
    debit: u128,
    credit: u128,
    amount: u128,
}

fn encode(batch: &[(u128, Sent)]) -> String {
    let items: Vec<String> = batch
        .iter()
        .map(|(id, s)| format!("{id}:{}:{}:{}", s.debit, s.credit, s.amount))
        .collect();
    format!("transfers {}", items.join(","))
}

#[test]
fn acknowledged_transfers_survive_sigkill() {
    let seed = std::env::var("CLEARHOUSE_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0xC1EA_2026u64);
    eprintln!("crash test seed {seed} (rerun with CLEARHOUSE_CRASH_SEED={seed})");
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().unwrap();
    let mut process = start(dir.path());
    let created = request(&mut process, &format!("accounts 1 {ACCOUNTS}")).unwrap();
    assert!(created.starts_with("results 0"), "{created}");

    let mut acknowledged: BTreeMap<u128, Sent> = BTreeMap::new();
    // Batches sent whose answer never came: all or nothing after restart.
    let mut unacknowledged: Vec<Vec<(u128, Sent)>> = Vec::new();
    let mut next_id: u128 = 1;
    let mut acknowledged_batches: Vec<Vec<(u128, Sent)>> = Vec::new();
    let mut kills = 0;

    for round in 0..ROUNDS {
        let run_for = Duration::from_millis(50 + rng.below(400));
        let started = Instant::now();
        // Load: batches of 1..300 transfers until the kill time, one request in flight.
        let killer = {
            let pid = process.child.id();
            std::thread::spawn(move || {
                std::thread::sleep(run_for);
                // SAFETY: sending a signal to our own child process by pid.
                unsafe { libc_kill(pid as i32, 9) };
            })
        };
        loop {
            let size = 1 + rng.below(300) as u128;
            let batch: Vec<(u128, Sent)> = (next_id..next_id + size)
                .map(|id| {
                    let debit = 1 + rng.below(ACCOUNTS as u64) as u128;
                    let mut credit = 1 + rng.below(ACCOUNTS as u64) as u128;
                    if credit == debit {
                        credit = debit % ACCOUNTS + 1;
                    }
                    (
                        id,
                        Sent {
                            debit,
                            credit,
                            amount: 1 + rng.below(1000) as u128,
                        },
                    )
                })
                .collect();
            next_id += size;
            match request(&mut process, &encode(&batch)) {
                Some(answer) => {
                    let codes: Vec<&str> =
                        answer.trim_start_matches("results ").split(',').collect();
                    assert_eq!(codes.len(), batch.len(), "{answer}");
                    assert!(
                        codes.iter().all(|c| *c == RESULT_OK),
                        "round {round}: {answer}"
                    );
                    acknowledged.extend(batch.iter().copied());
                    acknowledged_batches.push(batch);
                }
                None => {
                    unacknowledged.push(batch);
                    break;
                }
            }
            if started.elapsed() > run_for + Duration::from_secs(5) {
                panic!("the node was not killed in time");
            }
        }
        killer.join().unwrap();
        let status = process.child.wait().unwrap();
        assert!(!status.success(), "the node must have died by SIGKILL");
        kills += 1;

        process = start(dir.path());
        // Every acknowledged transfer is present with its fields.
        let ids: Vec<u128> = acknowledged.keys().copied().collect();
        let mut present = BTreeMap::new();
        for chunk in ids.chunks(2000) {
            let line = request(
                &mut process,
                &format!(
                    "lookup {}",
                    chunk
                        .iter()
                        .map(|id| id.to_string())
                        .collect::<Vec<_>>()
                        .join(",")
                ),
            )
            .unwrap();
            for item in line
                .trim_start_matches("transfers ")
                .split(',')
                .filter(|s| !s.is_empty())
            {
                let f: Vec<u128> = item.split(':').map(|x| x.parse().unwrap()).collect();
                present.insert(
                    f[0],
                    Sent {
                        debit: f[1],
                        credit: f[2],
                        amount: f[3],
                    },
                );
            }
        }
        for (id, sent) in &acknowledged {
            let got = present
                .get(id)
                .unwrap_or_else(|| panic!("round {round}: acknowledged transfer {id} lost"));
            assert_eq!(
                (got.debit, got.credit, got.amount),
                (sent.debit, sent.credit, sent.amount)
            );
        }
        // The unacknowledged batch is atomic: all of it or none of it.
        let last = unacknowledged.last().unwrap().clone();
        let ids = last
            .iter()
            .map(|(id, _)| id.to_string())
            .collect::<Vec<_>>()
            .join(",");
        let line = request(&mut process, &format!("lookup {ids}")).unwrap();
        let found = line
            .trim_start_matches("transfers ")
            .split(',')
            .filter(|s| !s.is_empty())
            .count();
        assert!(
            found == 0 || found == last.len(),
            "round {round}: batch half applied ({found} of {})",
            last.len()
        );
        if found == last.len() {
            acknowledged.extend(last.iter().copied());
            acknowledged_batches.push(last);
        }
        // Books balance and every account equals the sum of the transfers that touch it: nothing
        // is duplicated or lost.
        let ids = (1..=ACCOUNTS)
            .map(|id| id.to_string())
            .collect::<Vec<_>>()
            .join(",");
        let line = request(&mut process, &format!("balances {ids}")).unwrap();
        let mut debits = vec![0u128; ACCOUNTS as usize + 1];
        let mut credits = vec![0u128; ACCOUNTS as usize + 1];
        for sent in acknowledged.values() {
            debits[sent.debit as usize] += sent.amount;
            credits[sent.credit as usize] += sent.amount;
        }
        let (mut total_debits, mut total_credits) = (0u128, 0u128);
        for item in line.trim_start_matches("balances ").split(',') {
            let f: Vec<u128> = item.split(':').map(|x| x.parse().unwrap()).collect();
            assert_eq!(
                f[2], debits[f[0] as usize],
                "round {round}: debits of account {}",
                f[0]
            );
            assert_eq!(
                f[4], credits[f[0] as usize],
                "round {round}: credits of account {}",
                f[0]
            );
            total_debits += f[2];
            total_credits += f[4];
        }
        assert_eq!(
            total_debits, total_credits,
            "round {round}: books do not balance"
        );
        // A retried acknowledged request answers `exists` for every transfer and moves nothing.
        let retry = &acknowledged_batches[rng.below(acknowledged_batches.len() as u64) as usize];
        let answer = request(&mut process, &encode(retry)).unwrap();
        assert!(
            answer
                .trim_start_matches("results ")
                .split(',')
                .all(|c| c == RESULT_EXISTS),
            "round {round}: retry answered {answer}"
        );
    }
    let _ = request(&mut process, "quit");
    let _ = process.child.wait();
    eprintln!(
        "crash test: {kills} kills survived, {} acknowledged transfers checked",
        acknowledged.len()
    );
    assert_eq!(kills, ROUNDS);
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, signal: i32) -> i32;
}
