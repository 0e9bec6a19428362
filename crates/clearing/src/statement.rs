//! Per-participant statements of a window: every entry that moved the participant's position
//! (payments settled, returns, liquidity), with totals, built in one pass over the window's
//! vouchers and written as CSV (camt.053 rendering belongs to the ISO 20022 crate).

use std::collections::BTreeMap;
use std::io::Write;

use serde::{Deserialize, Serialize};

use crate::event::VoucherEvent;
use crate::ClearingError;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The voucher that proves the entry.
    pub voucher: u64,
    pub kind: String,
    /// UETR of the payment (or of the returned payment), or the liquidity transfer id.
    pub reference: String,
    pub counterparty: String,
    pub credit: bool,
    #[serde(with = "crate::report::u128_string")]
    pub amount: u128,
    pub at_ns: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Statement {
    pub participant: String,
    pub currency: String,
    pub window: u64,
    pub entries: Vec<Entry>,
    #[serde(with = "crate::report::u128_string")]
    pub total_credits: u128,
    #[serde(with = "crate::report::u128_string")]
    pub total_debits: u128,
}

impl Statement {
    pub fn net(&self) -> Result<i128, ClearingError> {
        let credits =
            i128::try_from(self.total_credits).map_err(|_| ClearingError::Overflow("net"))?;
        let debits =
            i128::try_from(self.total_debits).map_err(|_| ClearingError::Overflow("net"))?;
        credits
            .checked_sub(debits)
            .ok_or(ClearingError::Overflow("net"))
    }

    pub fn write_csv(&self, out: &mut impl Write) -> std::io::Result<()> {
        writeln!(
            out,
            "window,participant,currency,voucher,kind,reference,counterparty,direction,amount,at_ns"
        )?;
        for e in &self.entries {
            writeln!(
                out,
                "{},{},{},{},{},{},{},{},{},{}",
                self.window,
                self.participant,
                self.currency,
                e.voucher,
                e.kind,
                e.reference,
                e.counterparty,
                if e.credit { "credit" } else { "debit" },
                e.amount,
                e.at_ns
            )?;
        }
        Ok(())
    }
}

/// Builds every participant's statement for one window, one voucher at a time.
#[derive(Default)]
pub struct Statements {
    window: u64,
    statements: BTreeMap<(String, String), Statement>,
}

impl Statements {
    pub fn new(window: u64) -> Statements {
        Statements {
            window,
            statements: BTreeMap::new(),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn entry(
        &mut self,
        participant: &str,
        currency: &str,
        voucher: u64,
        kind: &str,
        reference: &str,
        counterparty: &str,
        credit: bool,
        amount: u128,
        at_ns: u64,
    ) -> Result<(), ClearingError> {
        let window = self.window;
        let statement = self
            .statements
            .entry((participant.to_string(), currency.to_string()))
            .or_insert_with(|| Statement {
                participant: participant.to_string(),
                currency: currency.to_string(),
                window,
                ..Statement::default()
            });
        let total = if credit {
            &mut statement.total_credits
        } else {
            &mut statement.total_debits
        };
        *total = total
            .checked_add(amount)
            .ok_or(ClearingError::Overflow("statement totals"))?;
        statement.entries.push(Entry {
            voucher,
            kind: kind.to_string(),
            reference: reference.to_string(),
            counterparty: counterparty.to_string(),
            credit,
            amount,
            at_ns,
        });
        Ok(())
    }

    pub fn add(&mut self, voucher: u64, event: &VoucherEvent) -> Result<(), ClearingError> {
        match event {
            VoucherEvent::PaymentSettled {
                uetr,
                debtor_agent,
                creditor_agent,
                currency,
                amount,
                at_ns,
                ..
            } => {
                self.entry(
                    debtor_agent,
                    currency,
                    voucher,
                    "payment",
                    uetr,
                    creditor_agent,
                    false,
                    *amount,
                    *at_ns,
                )?;
                self.entry(
                    creditor_agent,
                    currency,
                    voucher,
                    "payment",
                    uetr,
                    debtor_agent,
                    true,
                    *amount,
                    *at_ns,
                )
            }
            VoucherEvent::PaymentReturned {
                original_uetr,
                returning_agent,
                receiving_agent,
                currency,
                amount,
                at_ns,
                ..
            } => {
                self.entry(
                    returning_agent,
                    currency,
                    voucher,
                    "return",
                    original_uetr,
                    receiving_agent,
                    false,
                    *amount,
                    *at_ns,
                )?;
                self.entry(
                    receiving_agent,
                    currency,
                    voucher,
                    "return",
                    original_uetr,
                    returning_agent,
                    true,
                    *amount,
                    *at_ns,
                )
            }
            VoucherEvent::Liquidity {
                transfer,
                participant,
                currency,
                direction,
                amount,
                at_ns,
            } => self.entry(
                participant,
                currency,
                voucher,
                "liquidity",
                transfer,
                "settlement-bank",
                direction == "in",
                *amount,
                *at_ns,
            ),
            _ => Ok(()),
        }
    }

    pub fn finish(self) -> Vec<Statement> {
        self.statements.into_values().collect()
    }
}
