//! External reconciliation: the switch's view of a participant's movements against a statement
//! from the participant or the settlement bank (camt.053, camt.054 or CSV, parsed by the caller).
//!
//! Matching, in order: by UETR, then by end-to-end id, then by amount, direction and currency
//! among what is left (first come, first served). Each line of either side ends in exactly one
//! bucket: matched, missing on one side, or a mismatch (amount, direction, currency or status).

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

/// What the switch knows of one movement of the participant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OurLine {
    /// The voucher that proves it.
    pub voucher: u64,
    pub uetr: Option<String>,
    pub end_to_end_id: Option<String>,
    #[serde(
        rename = "amount_minor_units",
        alias = "amount",
        with = "crate::report::u128_string"
    )]
    pub amount: u128,
    pub currency: String,
    pub credit: bool,
    /// "settled" (money moved) or "rejected" (it did not).
    pub status: String,
}

/// One line of the external statement, amounts already in minor units.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TheirLine {
    /// Where it is in the file (1-based line or entry number), for the report.
    pub position: u64,
    pub uetr: Option<String>,
    pub end_to_end_id: Option<String>,
    #[serde(
        rename = "amount_minor_units",
        alias = "amount",
        with = "crate::report::u128_string"
    )]
    pub amount: u128,
    pub currency: String,
    pub credit: bool,
    /// "booked" (money moved), "pending", or "info".
    pub status: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mismatch {
    pub ours: OurLine,
    pub theirs: TheirLine,
    /// amount, direction, currency, status (comma separated when several).
    pub fields: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReconciliationReport {
    pub matched: Vec<(OurLine, TheirLine)>,
    /// In the switch, not in the statement.
    pub missing_in_statement: Vec<OurLine>,
    /// In the statement, not in the switch.
    pub missing_in_switch: Vec<TheirLine>,
    pub mismatches: Vec<Mismatch>,
}

impl ReconciliationReport {
    pub fn is_clean(&self) -> bool {
        self.missing_in_statement.is_empty()
            && self.missing_in_switch.is_empty()
            && self.mismatches.is_empty()
    }

    pub fn summary(&self) -> serde_json::Value {
        serde_json::json!({
            "matched": self.matched.len(),
            "missing_in_statement": self.missing_in_statement.len(),
            "missing_in_switch": self.missing_in_switch.len(),
            "mismatches": self.mismatches.len(),
            "clean": self.is_clean(),
        })
    }

    /// One CSV row per line of either side that did not match cleanly, after a header row.
    pub fn to_csv(&self) -> String {
        let mut out = String::from(
            "result,fields,voucher,statement_position,uetr,end_to_end_id,our_amount,their_amount,currency,our_direction,their_direction,our_status,their_status\n",
        );
        let direction = |credit: bool| if credit { "credit" } else { "debit" };
        let text = |v: &Option<String>| v.clone().unwrap_or_default();
        for line in &self.missing_in_statement {
            out.push_str(&format!(
                "missing_in_statement,,{},,{},{},{},,{},{},,{},\n",
                line.voucher,
                text(&line.uetr),
                text(&line.end_to_end_id),
                line.amount,
                line.currency,
                direction(line.credit),
                line.status
            ));
        }
        for line in &self.missing_in_switch {
            out.push_str(&format!(
                "missing_in_switch,,,{},{},{},,{},{},,{},,{}\n",
                line.position,
                text(&line.uetr),
                text(&line.end_to_end_id),
                line.amount,
                line.currency,
                direction(line.credit),
                line.status
            ));
        }
        for m in &self.mismatches {
            out.push_str(&format!(
                "mismatch,\"{}\",{},{},{},{},{},{},{},{},{},{},{}\n",
                m.fields,
                m.ours.voucher,
                m.theirs.position,
                text(&m.ours.uetr).max(text(&m.theirs.uetr)),
                text(&m.ours.end_to_end_id).max(text(&m.theirs.end_to_end_id)),
                m.ours.amount,
                m.theirs.amount,
                m.ours.currency,
                direction(m.ours.credit),
                direction(m.theirs.credit),
                m.ours.status,
                m.theirs.status
            ));
        }
        out
    }
}

fn differences(ours: &OurLine, theirs: &TheirLine) -> Vec<&'static str> {
    let mut fields = Vec::new();
    if ours.amount != theirs.amount {
        fields.push("amount");
    }
    if ours.credit != theirs.credit {
        fields.push("direction");
    }
    if ours.currency != theirs.currency {
        fields.push("currency");
    }
    let moved = ours.status == "settled";
    let booked = theirs.status == "booked";
    if moved != booked {
        fields.push("status");
    }
    fields
}

/// Matches the two sides. `progress` is called with the lines handled so far.
pub fn reconcile(
    ours: Vec<OurLine>,
    theirs: Vec<TheirLine>,
    mut progress: impl FnMut(u64),
) -> ReconciliationReport {
    let mut report = ReconciliationReport::default();
    let mut by_uetr: BTreeMap<String, VecDeque<usize>> = BTreeMap::new();
    let mut by_e2e: BTreeMap<String, VecDeque<usize>> = BTreeMap::new();
    let mut by_amount: BTreeMap<(u128, bool, String), VecDeque<usize>> = BTreeMap::new();
    for (i, line) in ours.iter().enumerate() {
        if let Some(uetr) = &line.uetr {
            by_uetr.entry(uetr.clone()).or_default().push_back(i);
        }
        if let Some(e2e) = &line.end_to_end_id {
            by_e2e.entry(e2e.clone()).or_default().push_back(i);
        }
        by_amount
            .entry((line.amount, line.credit, line.currency.clone()))
            .or_default()
            .push_back(i);
    }
    let mut taken = vec![false; ours.len()];
    let take = |queue: Option<&mut VecDeque<usize>>, taken: &mut [bool]| -> Option<usize> {
        let queue = queue?;
        while let Some(i) = queue.pop_front() {
            if !taken[i] {
                taken[i] = true;
                return Some(i);
            }
        }
        None
    };
    let mut unmatched_theirs = Vec::new();
    for (n, line) in theirs.into_iter().enumerate() {
        if n % 4096 == 0 {
            progress(n as u64);
        }
        // A reference that is present decides: a UETR or end-to-end id that the switch does
        // not know is not matched by amount.
        let found = if let Some(uetr) = &line.uetr {
            take(by_uetr.get_mut(uetr), &mut taken)
        } else if let Some(e2e) = &line.end_to_end_id {
            take(by_e2e.get_mut(e2e), &mut taken)
        } else {
            take(
                by_amount.get_mut(&(line.amount, line.credit, line.currency.clone())),
                &mut taken,
            )
        };
        match found {
            Some(i) => {
                let fields = differences(&ours[i], &line);
                if fields.is_empty() {
                    report.matched.push((ours[i].clone(), line));
                } else {
                    report.mismatches.push(Mismatch {
                        ours: ours[i].clone(),
                        theirs: line,
                        fields: fields.join(","),
                    });
                }
            }
            None => unmatched_theirs.push(line),
        }
    }
    report.missing_in_switch = unmatched_theirs;
    // A rejected payment that the statement does not show is agreement, not a gap.
    report.missing_in_statement = ours
        .into_iter()
        .zip(taken)
        .filter(|(line, taken)| !taken && line.status == "settled")
        .map(|(line, _)| line)
        .collect();
    report
}

/// Parses a statement in CSV: a header row naming at least `amount` (minor units), `currency`
/// and `direction` (credit/debit, or CRDT/DBIT), and optionally `uetr`, `end_to_end_id`,
/// `status` (booked by default). Fields must not contain commas or quotes.
pub fn parse_csv(text: &str) -> Result<Vec<TheirLine>, String> {
    let mut lines = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty());
    let (_, header) = lines.next().ok_or("empty statement")?;
    let columns: Vec<String> = header
        .split(',')
        .map(|c| c.trim().to_ascii_lowercase())
        .collect();
    let column = |name: &str| columns.iter().position(|c| c == name);
    let (Some(amount), Some(currency), Some(direction)) =
        (column("amount"), column("currency"), column("direction"))
    else {
        return Err("the header must name amount, currency and direction".into());
    };
    let (uetr, e2e, status) = (column("uetr"), column("end_to_end_id"), column("status"));
    let mut out = Vec::new();
    for (number, line) in lines {
        let line_number = number as u64 + 1;
        if line.contains('"') {
            return Err(format!(
                "line {line_number}: quoted fields are not supported"
            ));
        }
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        if fields.len() != columns.len() {
            return Err(format!(
                "line {line_number}: {} fields where the header has {}",
                fields.len(),
                columns.len()
            ));
        }
        let text = |i: Option<usize>| i.map(|i| fields[i]).filter(|v| !v.is_empty());
        out.push(TheirLine {
            position: line_number,
            uetr: text(uetr).map(str::to_string),
            end_to_end_id: text(e2e).map(str::to_string),
            amount: fields[amount].parse().map_err(|_| {
                format!(
                    "line {line_number}: amount {:?} is not a whole number of minor units",
                    fields[amount]
                )
            })?,
            currency: fields[currency].to_string(),
            credit: match fields[direction].to_ascii_lowercase().as_str() {
                "credit" | "crdt" => true,
                "debit" | "dbit" => false,
                other => {
                    return Err(format!(
                        "line {line_number}: direction {other:?} is not credit or debit"
                    ))
                }
            },
            status: match text(status).map(str::to_ascii_lowercase).as_deref() {
                None | Some("booked") | Some("book") | Some("settled") => "booked".into(),
                Some("pending") | Some("pdng") => "pending".into(),
                Some(_) => "info".into(),
            },
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ours(voucher: u64, uetr: Option<&str>, amount: u128, status: &str) -> OurLine {
        OurLine {
            voucher,
            uetr: uetr.map(str::to_string),
            end_to_end_id: Some(format!("E{voucher}")),
            amount,
            currency: "EUR".into(),
            credit: true,
            status: status.into(),
        }
    }

    #[test]
    fn every_line_lands_in_one_bucket() {
        let statement = "uetr,end_to_end_id,amount,currency,direction,status\n\
            u1,,100,EUR,credit,booked\n\
            ,E2,200,EUR,credit,booked\n\
            u3,,301,EUR,credit,booked\n\
            ,,400,EUR,credit,booked\n\
            u9,,999,EUR,credit,booked\n\
            u5,,500,EUR,credit,booked\n";
        let theirs = parse_csv(statement).unwrap();
        let report = reconcile(
            vec![
                ours(1, Some("u1"), 100, "settled"),
                ours(2, Some("u2"), 200, "settled"),
                ours(3, Some("u3"), 300, "settled"),
                ours(4, Some("u4"), 400, "settled"),
                ours(5, Some("u5"), 500, "rejected"),
                ours(6, Some("u6"), 600, "settled"),
                ours(7, Some("u7"), 700, "rejected"),
            ],
            theirs,
            |_| {},
        );
        assert_eq!(report.matched.len(), 3); // by UETR, by end-to-end id, by amount
        assert_eq!(report.mismatches.len(), 2);
        assert_eq!(report.mismatches[0].fields, "amount");
        assert_eq!(report.mismatches[1].fields, "status");
        assert_eq!(report.missing_in_switch.len(), 1);
        assert_eq!(report.missing_in_switch[0].position, 6);
        // 6 settled and unseen; 7 rejected and unseen is agreement.
        assert_eq!(report.missing_in_statement.len(), 1);
        assert_eq!(report.missing_in_statement[0].voucher, 6);
        assert!(!report.is_clean());
        assert_eq!(report.to_csv().lines().count(), 1 + 1 + 1 + 2);
        assert!(parse_csv("amount,currency\n1,EUR\n").is_err());
        assert!(parse_csv("amount,currency,direction\n1.5,EUR,credit\n").is_err());
    }
}
