//! `clearhouse bench iso20022`: parse and emit throughput of pacs.008 on one core.

use std::time::Instant;

use clearhouse_iso20022::{Limits, Message};
use serde_json::json;

#[derive(clap::Args)]
pub struct IsoArgs {
    /// Messages parsed (and, separately, emitted).
    #[arg(long, default_value_t = 200_000)]
    messages: u64,
    #[arg(long)]
    json: bool,
}

pub fn run(args: IsoArgs) -> anyhow::Result<()> {
    let sample_path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/iso20022/samples/cbprplus-synthetic/pacs008_credit_transfer_sample.document.xml");
    // The shared sample when it is there (a realistic message with postal addresses), else ours.
    let bytes = std::fs::read(&sample_path).unwrap_or_else(|_| fallback().into_bytes());
    let limits = Limits::default();
    let Message::Pacs008(message) = Message::parse(&bytes, &limits)? else {
        anyhow::bail!("the sample is not a pacs.008");
    };
    let started = Instant::now();
    let mut fields = 0usize;
    for _ in 0..args.messages {
        let Message::Pacs008(parsed) = Message::parse(std::hint::black_box(&bytes), &limits)?
        else {
            unreachable!()
        };
        fields += parsed.transactions[0].end_to_end_id.len();
    }
    let parse_seconds = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let mut written = 0usize;
    for _ in 0..args.messages {
        written += std::hint::black_box(&message).to_xml().len();
    }
    let emit_seconds = started.elapsed().as_secs_f64();
    let report = json!({
        "message": "pacs.008.001.08",
        "message_bytes": bytes.len(),
        "messages": args.messages,
        "parses_per_second": (args.messages as f64 / parse_seconds).round(),
        "emits_per_second": (args.messages as f64 / emit_seconds).round(),
        "emitted_bytes_per_message": written / args.messages.max(1) as usize,
        "checksum": fields,
        "machine": crate::common::machine(),
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "pacs.008 ({} bytes): {} parses/s, {} emits/s on one core",
            bytes.len(),
            report["parses_per_second"],
            report["emits_per_second"]
        );
    }
    Ok(())
}

fn fallback() -> String {
    clearhouse_iso20022::Pacs008 {
        message_id: "M1".into(),
        creation: "2026-11-25T00:00:00.000Z".into(),
        number_of_transactions: "1".into(),
        settlement_method: "CLRG".into(),
        clearing_system: None,
        transactions: vec![clearhouse_iso20022::CreditTransfer {
            end_to_end_id: "E2E".into(),
            amount: "1.00".into(),
            currency: "EUR".into(),
            charge_bearer: "SLEV".into(),
            debtor_agent: clearhouse_iso20022::messages::Agent {
                bic: Some("BANKDEFF".into()),
                ..Default::default()
            },
            creditor_agent: clearhouse_iso20022::messages::Agent {
                bic: Some("BANKFRPP".into()),
                ..Default::default()
            },
            ..Default::default()
        }],
    }
    .to_xml()
}
