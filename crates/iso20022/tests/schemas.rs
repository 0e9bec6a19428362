//! Conformance: every message we emit is valid against the official XSD (xmllint, many generated
//! messages in one run), every shared sample parses, and parse -> emit -> parse keeps every field
//! we model.

use std::path::{Path, PathBuf};
use std::process::Command;

use clearhouse_iso20022::camt;
use clearhouse_iso20022::messages::{Account, Agent};
use clearhouse_iso20022::recall;
use clearhouse_iso20022::{
    time, CreditTransfer, Limits, Message, Pacs002, Pacs004, Pacs008, Pacs028,
};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;

fn shared() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/iso20022")
}

fn id(max: usize) -> impl Strategy<Value = String> {
    proptest::string::string_regex(&format!(
        "[A-Za-z0-9/?:().,'+ -]{{0,{}}}[A-Za-z0-9]",
        max - 1
    ))
    .unwrap()
}
fn bic() -> impl Strategy<Value = String> {
    proptest::string::string_regex("[A-Z]{6}[A-Z0-9]{2}([A-Z0-9]{3})?").unwrap()
}
fn uetr() -> impl Strategy<Value = String> {
    proptest::string::string_regex(
        "[a-f0-9]{8}-[a-f0-9]{4}-4[a-f0-9]{3}-[89ab][a-f0-9]{3}-[a-f0-9]{12}",
    )
    .unwrap()
}
fn agent() -> impl Strategy<Value = Agent> {
    prop_oneof![
        bic().prop_map(|bic| Agent {
            bic: Some(bic),
            ..Agent::default()
        }),
        proptest::string::string_regex("[0-9]{9}")
            .unwrap()
            .prop_map(|routing| Agent {
                bic: None,
                clearing_system: Some("USABA".into()),
                member_id: Some(routing),
            }),
    ]
}
fn account() -> impl Strategy<Value = Account> {
    prop_oneof![
        proptest::string::string_regex("[A-Z]{2}[0-9]{2}[A-Z0-9]{8,30}")
            .unwrap()
            .prop_map(|iban| Account {
                iban: Some(iban),
                other_id: None
            }),
        id(34).prop_map(|other| Account {
            iban: None,
            other_id: Some(other)
        }),
    ]
}
fn transfer() -> impl Strategy<Value = CreditTransfer> {
    (
        (
            proptest::option::of(id(35)),
            id(35),
            proptest::option::of(id(35)),
            proptest::option::of(uetr()),
        ),
        (
            1u64..10_000_000_000,
            0u32..3,
            prop_oneof![Just("EUR"), Just("USD"), Just("JPY")],
            prop_oneof![Just("SLEV"), Just("DEBT"), Just("SHAR")],
        ),
        (
            proptest::option::of(agent()),
            proptest::option::of(agent()),
            agent(),
            agent(),
        ),
        (
            proptest::option::of(id(140)),
            proptest::option::of(account()),
            proptest::option::of(id(140)),
            proptest::option::of(account()),
        ),
        proptest::collection::vec(id(140), 0..3),
    )
        .prop_map(
            |(
                (instr, e2e, tx, uetr),
                (minor, decimals, ccy, chrg),
                (instg, instd, dbtr_agt, cdtr_agt),
                (dn, da, cn, ca),
                rmt,
            )| {
                let amount = match decimals {
                    0 => minor.to_string(),
                    d => format!(
                        "{}.{:0width$}",
                        minor / 10u64.pow(d),
                        minor % 10u64.pow(d),
                        width = d as usize
                    ),
                };
                CreditTransfer {
                    instruction_id: instr,
                    end_to_end_id: e2e,
                    transaction_id: tx,
                    uetr,
                    amount,
                    currency: ccy.into(),
                    settlement_date: Some(time::date(1_795_591_845_000_000_000)),
                    charge_bearer: chrg.into(),
                    instructing_agent: instg,
                    instructed_agent: instd,
                    debtor_name: dn,
                    debtor_account: da,
                    debtor_agent: dbtr_agt,
                    creditor_agent: cdtr_agt,
                    creditor_name: cn,
                    creditor_account: ca,
                    remittance_unstructured: rmt,
                }
            },
        )
}
fn pacs008() -> impl Strategy<Value = Pacs008> {
    (
        id(35),
        0u64..4_000_000_000_000_000_000,
        proptest::collection::vec(transfer(), 1..3),
        prop_oneof![Just("CLRG"), Just("INDA")],
    )
        .prop_map(|(msg_id, at, transactions, method)| Pacs008 {
            message_id: msg_id,
            creation: time::date_time(at),
            number_of_transactions: transactions.len().to_string(),
            settlement_method: method.into(),
            clearing_system: (method == "CLRG").then(|| "FDN".to_string()),
            transactions,
        })
}
fn pacs002() -> impl Strategy<Value = Pacs002> {
    (
        (
            id(35),
            id(35),
            proptest::option::of(id(35)),
            proptest::option::of(id(35)),
        ),
        (
            proptest::option::of(uetr()),
            prop_oneof![
                Just(("ACSC", None)),
                Just(("RJCT", Some("AC04"))),
                Just(("RJCT", Some("AB05"))),
                Just(("PDNG", None))
            ],
        ),
        proptest::option::of(0u64..4_000_000_000_000_000_000),
    )
        .prop_map(
            |((msg, orig, instr, e2e), (uetr, (status, reason)), accepted)| Pacs002 {
                message_id: msg,
                creation: time::date_time(1_795_591_845_123_000_000),
                original_message_id: orig,
                original_message_name: "pacs.008.001.08".into(),
                original_instruction_id: instr,
                original_end_to_end_id: e2e,
                original_transaction_id: None,
                original_uetr: uetr,
                status: status.into(),
                reason: reason.map(str::to_string),
                acceptance: accepted.map(time::date_time),
            },
        )
}

fn pacs028() -> impl Strategy<Value = Pacs028> {
    (
        (
            id(35),
            proptest::option::of(id(35)),
            proptest::option::of(id(35)),
        ),
        (
            proptest::option::of(id(35)),
            proptest::option::of(id(35)),
            proptest::option::of(id(35)),
            proptest::option::of(uetr()),
        ),
    )
        .prop_map(|((msg, req, orig), (instr, e2e, tx, uetr))| Pacs028 {
            message_id: msg,
            creation: time::date_time(1_795_591_845_123_000_000),
            status_request_id: req,
            original_message_name: orig.as_ref().map(|_| "pacs.008.001.08".to_string()),
            original_message_id: orig,
            original_instruction_id: instr,
            original_end_to_end_id: e2e,
            original_transaction_id: tx,
            original_uetr: uetr,
        })
}

fn pacs004() -> impl Strategy<Value = Pacs004> {
    (
        (
            id(35),
            proptest::option::of(id(35)),
            proptest::option::of(id(35)),
        ),
        (
            proptest::option::of(id(35)),
            proptest::option::of(id(35)),
            proptest::option::of(uetr()),
        ),
        (
            1u64..1_000_000_000,
            prop_oneof![Just("AC04"), Just("FOCR"), Just("MS03"), Just("AM09")],
            proptest::option::of(prop_oneof![Just("SLEV"), Just("SHAR")]),
        ),
    )
        .prop_map(
            |((msg, rtr, orig), (instr, e2e, uetr), (cents, reason, chrg))| Pacs004 {
                message_id: msg,
                creation: time::date_time(1_795_591_845_123_000_000),
                settlement_method: "CLRG".into(),
                return_id: rtr,
                original_message_name: orig.as_ref().map(|_| "pacs.008.001.08".to_string()),
                original_message_id: orig,
                original_instruction_id: instr,
                original_end_to_end_id: e2e,
                original_transaction_id: None,
                original_uetr: uetr,
                returned_amount: format!("{}.{:02}", cents / 100, cents % 100),
                currency: "EUR".into(),
                settlement_date: Some(time::date(1_795_591_845_123_000_000)),
                charge_bearer: chrg.map(str::to_string),
                reason: Some(reason.into()),
            },
        )
}

fn app_header() -> impl Strategy<Value = clearhouse_iso20022::AppHeader> {
    (
        agent(),
        agent(),
        id(35),
        proptest::option::of(id(35)),
        0u64..4_000_000_000_000_000_000,
    )
        .prop_map(
            |(from, to, id, service, at)| clearhouse_iso20022::AppHeader {
                from,
                to,
                business_message_id: id,
                message_definition: "pacs.008.001.08".into(),
                business_service: service,
                created: time::date_time(at),
            },
        )
}

/// Validates files against an XSD in one xmllint run; panics with xmllint's words on failure.
fn xmllint(xsd: &str, files: &[PathBuf]) {
    let (ok, errors) = xmllint_run(xsd, files);
    assert!(ok, "{errors}");
}

fn xmllint_run(xsd: &str, files: &[PathBuf]) -> (bool, String) {
    let output = Command::new("xmllint")
        .arg("--noout")
        .arg("--schema")
        .arg(shared().join("xsd").join(xsd))
        .args(files)
        .output()
        .expect("xmllint (Debian package libxml2-utils; .ci/run installs it)");
    let errors = String::from_utf8_lossy(&output.stderr)
        .lines()
        .filter(|l| !l.ends_with(" validates"))
        .take(20)
        .collect::<Vec<_>>()
        .join("\n");
    (output.status.success(), errors)
}

#[test]
fn the_schema_check_itself_catches_an_invalid_message() {
    let dir = tempfile::tempdir().unwrap();
    let mut message = generate(pacs008(), 1).remove(0);
    message.transactions[0].amount = "1.123456".into();
    let path = dir.path().join("bad.xml");
    std::fs::write(&path, message.to_xml()).unwrap();
    let (ok, errors) = xmllint_run("pacs.008.001.08.xsd", &[path]);
    assert!(!ok && errors.contains("IntrBkSttlmAmt"), "{errors}");
}

fn generate<T: std::fmt::Debug>(strategy: impl Strategy<Value = T>, count: usize) -> Vec<T> {
    let mut runner = TestRunner::deterministic();
    (0..count)
        .map(|_| strategy.new_tree(&mut runner).unwrap().current())
        .collect()
}

#[test]
fn emitted_messages_validate_against_the_official_schemas_and_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits::default();
    let mut files = Vec::new();
    for (i, message) in generate(pacs008(), 300).into_iter().enumerate() {
        let xml = message.to_xml();
        assert_eq!(
            Message::parse(xml.as_bytes(), &limits).unwrap(),
            Message::Pacs008(message),
            "round trip"
        );
        let path = dir.path().join(format!("pacs008-{i}.xml"));
        std::fs::write(&path, xml).unwrap();
        files.push(path);
    }
    xmllint("pacs.008.001.08.xsd", &files);
    let mut files = Vec::new();
    for (i, message) in generate(pacs002(), 300).into_iter().enumerate() {
        let xml = message.to_xml();
        assert_eq!(
            Message::parse(xml.as_bytes(), &limits).unwrap(),
            Message::Pacs002(message),
            "round trip"
        );
        let path = dir.path().join(format!("pacs002-{i}.xml"));
        std::fs::write(&path, xml).unwrap();
        files.push(path);
    }
    xmllint("pacs.002.001.10.xsd", &files);
    let mut files = Vec::new();
    for (i, message) in generate(pacs028(), 200).into_iter().enumerate() {
        let xml = message.to_xml();
        assert_eq!(
            Message::parse(xml.as_bytes(), &limits).unwrap(),
            Message::Pacs028(message),
            "round trip"
        );
        let path = dir.path().join(format!("pacs028-{i}.xml"));
        std::fs::write(&path, xml).unwrap();
        files.push(path);
    }
    xmllint("pacs.028.001.03.xsd", &files);
    let mut files = Vec::new();
    for (i, message) in generate(pacs004(), 200).into_iter().enumerate() {
        let xml = message.to_xml();
        assert_eq!(
            Message::parse(xml.as_bytes(), &limits).unwrap(),
            Message::Pacs004(message),
            "round trip"
        );
        let path = dir.path().join(format!("pacs004-{i}.xml"));
        std::fs::write(&path, xml).unwrap();
        files.push(path);
    }
    xmllint("pacs.004.001.09.xsd", &files);
    // Headers: each validates alone against head.001; in an envelope with its document, both
    // come back as they went.
    let mut files = Vec::new();
    let mut envelopes = Vec::new();
    let documents = generate(pacs008(), 100);
    for (i, (header, document)) in generate(app_header(), 100)
        .into_iter()
        .zip(documents)
        .enumerate()
    {
        let xml = clearhouse_iso20022::envelope_xml(&header, document.to_document());
        let (read_header, message) = Message::parse_with_header(xml.as_bytes(), &limits).unwrap();
        assert_eq!(
            (read_header.as_ref(), message),
            (Some(&header), Message::Pacs008(document))
        );
        let path = dir.path().join(format!("apphdr-{i}.xml"));
        std::fs::write(&path, clearhouse_iso20022::xml::emit(&header.to_element())).unwrap();
        files.push(path);
        let path = dir.path().join(format!("envelope-{i}.xml"));
        std::fs::write(&path, &xml).unwrap();
        envelopes.push(path);
    }
    xmllint("head.001.001.02.xsd", &files);
    // The envelope has a published schema (crates/iso20022/xsd/clearhouse.envelope.1.xsd, issue
    // 17.7): placed beside the official schemas, it validates header and document together.
    let schemas = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(shared().join("xsd")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, schemas.path().join(path.file_name().unwrap())).unwrap();
    }
    let envelope_xsd = schemas.path().join("clearhouse.envelope.1.xsd");
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("xsd/clearhouse.envelope.1.xsd"),
        &envelope_xsd,
    )
    .unwrap();
    let lint = |files: &[PathBuf]| {
        Command::new("xmllint")
            .arg("--noout")
            .arg("--schema")
            .arg(&envelope_xsd)
            .args(files)
            .output()
            .expect("xmllint")
    };
    let output = lint(&envelopes);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // And it checks: a document with an invalid amount inside a good envelope fails.
    let mut bad = generate(pacs008(), 1).remove(0);
    bad.transactions[0].amount = "1.123456".into();
    let header = generate(app_header(), 1).remove(0);
    let path = dir.path().join("envelope-bad.xml");
    std::fs::write(
        &path,
        clearhouse_iso20022::envelope_xml(&header, bad.to_document()),
    )
    .unwrap();
    let output = lint(&[path]);
    assert!(
        !output.status.success(),
        "an invalid document in an envelope"
    );
}

fn camt_entry() -> impl Strategy<Value = camt::Entry> {
    (
        (
            1u64..100_000_000,
            any::<bool>(),
            prop_oneof![Just("BOOK"), Just("PDNG"), Just("INFO")],
        ),
        (
            proptest::option::of(id(35)),
            proptest::option::of(id(35)),
            proptest::option::of(uetr()),
        ),
        (
            proptest::option::of(bic()),
            proptest::option::of(bic()),
            proptest::option::of(id(35)),
        ),
        any::<bool>(),
    )
        .prop_map(
            |((cents, credit, status), (instr, e2e, uetr), (debtor, creditor, reference), code)| {
                camt::Entry {
                    amount: format!("{}.{:02}", cents / 100, cents % 100),
                    currency: "EUR".into(),
                    credit,
                    status: status.into(),
                    booking_date: Some(time::date(1_795_591_845_123_000_000)),
                    account_servicer_reference: reference,
                    bank_transaction_code: code.then(|| {
                        (
                            "PMNT".into(),
                            if credit { "RCDT" } else { "ICDT" }.into(),
                            "DMCT".into(),
                        )
                    }),
                    instruction_id: instr,
                    end_to_end_id: e2e,
                    uetr,
                    debtor_agent: debtor,
                    creditor_agent: creditor,
                    additional_info: None,
                }
            },
        )
}

fn camt_report(kind: camt::ReportKind) -> impl Strategy<Value = camt::CashReport> {
    (
        id(35),
        proptest::collection::vec(
            (
                id(35),
                any::<bool>(),
                proptest::collection::vec(camt_entry(), 0..20),
                0u64..1_000_000_000,
            ),
            1..3,
        ),
    )
        .prop_map(move |(message_id, reports)| camt::CashReport {
            kind,
            message_id,
            created: time::date_time(1_795_591_845_123_000_000),
            reports: reports
                .into_iter()
                .map(|(id, iban, entries, opening)| camt::AccountReport {
                    id,
                    created: Some(time::date_time(1_795_591_845_123_000_000)),
                    account_iban: iban.then(|| "DE89370400440532013000".to_string()),
                    account_other: (!iban).then(|| "AAAADEFF-EUR".to_string()),
                    account_currency: Some("EUR".into()),
                    balances: if kind == camt::ReportKind::Statement {
                        ["OPBD", "CLBD"]
                            .iter()
                            .map(|code| camt::Balance {
                                code: code.to_string(),
                                amount: format!("{}.{:02}", opening / 100, opening % 100),
                                currency: "EUR".into(),
                                credit: true,
                                date: time::date(1_795_591_845_123_000_000),
                            })
                            .collect()
                    } else {
                        vec![]
                    },
                    entries,
                })
                .collect(),
        })
}

#[test]
fn camt_statements_and_notifications_validate_and_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits::default();
    for (kind, xsd, name) in [
        (
            camt::ReportKind::Statement,
            "camt.053.001.08.xsd",
            "camt053",
        ),
        (
            camt::ReportKind::Notification,
            "camt.054.001.08.xsd",
            "camt054",
        ),
    ] {
        let mut files = Vec::new();
        for (i, report) in generate(camt_report(kind), 150).into_iter().enumerate() {
            let xml = report.to_xml();
            assert_eq!(
                camt::CashReport::parse(xml.as_bytes(), &limits).unwrap(),
                report,
                "round trip"
            );
            let path = dir.path().join(format!("{name}-{i}.xml"));
            std::fs::write(&path, xml).unwrap();
            files.push(path);
        }
        xmllint(xsd, &files);
    }
}

fn assignment() -> impl Strategy<Value = recall::Assignment> {
    (id(35), bic(), bic(), proptest::option::of(id(35)), bic()).prop_map(
        |(id, assigner, assignee, case, creator)| recall::Assignment {
            id,
            // Case/Cretr is mandatory with a case.
            case_creator_bic: case.as_ref().map(|_| creator),
            assigner_bic: assigner,
            assignee_bic: assignee,
            created: time::date_time(1_795_591_845_123_000_000),
            case_id: case,
        },
    )
}

fn original() -> impl Strategy<Value = recall::Original> {
    (
        proptest::option::of(id(35)),
        proptest::option::of(id(35)),
        proptest::option::of(id(35)),
        proptest::option::of(id(35)),
        proptest::option::of(uetr()),
    )
        .prop_map(|(message, instr, e2e, tx, uetr)| recall::Original {
            message_name: message.as_ref().map(|_| "pacs.008.001.08".to_string()),
            message_id: message,
            instruction_id: instr,
            end_to_end_id: e2e,
            transaction_id: tx,
            uetr,
        })
}

fn camt056() -> impl Strategy<Value = recall::Camt056> {
    (
        assignment(),
        proptest::option::of(id(35)),
        original(),
        proptest::option::of(1u64..1_000_000),
        proptest::option::of(prop_oneof![
            Just("DUPL"),
            Just("TECH"),
            Just("FRAD"),
            Just("CUST"),
            Just("AM09")
        ]),
        proptest::collection::vec(id(105), 0..2),
    )
        .prop_map(
            |(assignment, cancellation, original, cents, reason, info)| recall::Camt056 {
                assignment,
                cancellation_id: cancellation,
                original,
                original_amount: cents
                    .map(|c| (format!("{}.{:02}", c / 100, c % 100), "EUR".to_string())),
                reason: reason.map(str::to_string),
                additional_info: info,
            },
        )
}

fn camt029() -> impl Strategy<Value = recall::Camt029> {
    (
        assignment(),
        prop_oneof![
            Just(("CNCL", "ACCR", None)),
            Just(("RJCR", "RJCR", Some("NOAS"))),
            Just(("RJCR", "RJCR", Some("LEGL")))
        ],
        proptest::option::of(id(35)),
        original(),
        proptest::collection::vec(id(105), 0..2),
    )
        .prop_map(
            |(assignment, (confirmation, status, reason), id, original, info)| recall::Camt029 {
                assignment,
                confirmation: confirmation.into(),
                cancellation_status_id: id,
                original,
                status: Some(status.into()),
                reason: reason.map(str::to_string),
                additional_info: info,
            },
        )
}

#[test]
fn recall_messages_validate_and_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits::default();
    let mut files = Vec::new();
    for (i, message) in generate(camt056(), 200).into_iter().enumerate() {
        let xml = message.to_xml();
        assert_eq!(
            recall::Camt056::parse(xml.as_bytes(), &limits).unwrap(),
            message
        );
        let path = dir.path().join(format!("camt056-{i}.xml"));
        std::fs::write(&path, xml).unwrap();
        files.push(path);
    }
    xmllint("camt.056.001.08.xsd", &files);
    let mut files = Vec::new();
    for (i, message) in generate(camt029(), 200).into_iter().enumerate() {
        let xml = message.to_xml();
        assert_eq!(
            recall::Camt029::parse(xml.as_bytes(), &limits).unwrap(),
            message
        );
        let path = dir.path().join(format!("camt029-{i}.xml"));
        std::fs::write(&path, xml).unwrap();
        files.push(path);
    }
    xmllint("camt.029.001.09.xsd", &files);
    // The namespace selects the message: a camt.029 is not a camt.056.
    let one = generate(camt029(), 1).remove(0).to_xml();
    assert!(recall::Camt056::parse(one.as_bytes(), &limits).is_err());
}

#[test]
fn shared_camt_samples_parse_and_the_schema_invalid_statement_is_refused() {
    let limits = Limits::default();
    let samples = shared().join("samples");
    let statement = camt::CashReport::parse(
        &std::fs::read(
            samples.join("camt053/viafintech_camt053_valid_example_v8.uetr-v4-fixed.xml"),
        )
        .unwrap(),
        &limits,
    )
    .unwrap();
    assert_eq!(statement.kind, camt::ReportKind::Statement);
    assert!(!statement.reports[0].entries.is_empty());
    assert!(!statement.reports[0].balances.is_empty());
    // The original has a version-5 UUID as UETR: refused, naming the element.
    let error = camt::CashReport::parse(
        &std::fs::read(samples.join("camt053/viafintech_camt053_valid_example_v8.xml")).unwrap(),
        &limits,
    )
    .unwrap_err()
    .to_string();
    assert!(
        error.contains("Refs/UETR") && error.contains("version 4"),
        "{error}"
    );
    for path in [
        "swiss-postfinance/camt054.001.08_postfinance_2022031011011199_v2019.xml",
        "cbprplus-synthetic/camt054_credit_notification_sample.xml",
    ] {
        let report = camt::CashReport::parse(&std::fs::read(samples.join(path)).unwrap(), &limits)
            .unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(report.kind, camt::ReportKind::Notification, "{path}");
        assert!(
            report.reports.iter().any(|r| !r.entries.is_empty()),
            "{path}"
        );
        // What we read, we write back valid and read again the same.
        let again = camt::CashReport::parse(report.to_xml().as_bytes(), &limits).unwrap();
        assert_eq!(again, report, "{path}");
    }
}

#[test]
fn every_shared_sample_parses_and_payments_round_trip() {
    let limits = Limits::default();
    let mut typed = 0;
    for folder in std::fs::read_dir(shared().join("samples")).unwrap() {
        for file in std::fs::read_dir(folder.unwrap().path()).unwrap() {
            let path = file.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            let root = clearhouse_iso20022::xml::parse(&bytes, &limits)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let Some(document) = root.find("Document") else {
                continue;
            };
            if document.ns.ends_with("pacs.008.001.08")
                || document.ns.ends_with("pacs.002.001.10")
                || document.ns.ends_with("pacs.004.001.09")
            {
                let message = Message::parse(&bytes, &limits)
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                let again = match &message {
                    Message::Pacs008(m) => Message::parse(m.to_xml().as_bytes(), &limits).unwrap(),
                    Message::Pacs002(m) => Message::parse(m.to_xml().as_bytes(), &limits).unwrap(),
                    Message::Pacs028(m) => Message::parse(m.to_xml().as_bytes(), &limits).unwrap(),
                    Message::Pacs004(m) => Message::parse(m.to_xml().as_bytes(), &limits).unwrap(),
                };
                assert_eq!(again, message, "{}", path.display());
                typed += 1;
            }
        }
    }
    assert!(
        typed >= 6,
        "pacs.008 and pacs.002 samples found and read: {typed}"
    );
}

#[test]
fn errors_name_the_element() {
    let limits = Limits::default();
    let sample = std::fs::read_to_string(
        shared().join("samples/cbprplus-synthetic/pacs008_credit_transfer_sample.document.xml"),
    )
    .unwrap();
    let broken = sample.replace("<pacs:EndToEndId>E2E-04138234</pacs:EndToEndId>", "");
    let error = Message::parse(broken.as_bytes(), &limits)
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("/Document/FIToFICstmrCdtTrf/CdtTrfTxInf[1]/PmtId/EndToEndId"),
        "{error}"
    );
    let other = sample.replace("pacs.008.001.08", "pacs.008.001.12");
    assert!(Message::parse(other.as_bytes(), &limits)
        .unwrap_err()
        .to_string()
        .contains("unsupported"));
}
