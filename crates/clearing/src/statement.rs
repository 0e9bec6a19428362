//! Per-participant statements of a window: every entry that moved the participant's position
//! (payments settled, returns, liquidity, settlement fund adjustments), with totals and the
//! position's booked balance at the window's opening and closing, built in one pass over the
//! window's vouchers and written as CSV (camt.053 rendering belongs to the ISO 20022 crate).
//!
//! The booked balance is what the participant holds at the switch: liquidity in minus out,
//! payments received minus sent, returns, fund adjustments. A deferred-net participant's net
//! debit cap is a credit line, not a balance, and is not part of it (the positions API reports it
//! separately). Each window's closing balance is the next window's opening balance: the caller
//! passes the previous window's closing balances ([`Statements::with_openings`]).

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
    #[serde(
        rename = "amount_minor_units",
        alias = "amount",
        with = "crate::report::u128_string"
    )]
    pub amount: u128,
    pub at_ns: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Statement {
    pub participant: String,
    pub currency: String,
    pub window: u64,
    pub entries: Vec<Entry>,
    #[serde(
        rename = "total_credits_minor_units",
        alias = "total_credits",
        with = "crate::report::u128_string"
    )]
    pub total_credits: u128,
    #[serde(
        rename = "total_debits_minor_units",
        alias = "total_debits",
        with = "crate::report::u128_string"
    )]
    pub total_debits: u128,
    /// Booked balance when the window opened (the previous window's closing balance), signed
    /// minor units (negative: the participant owes the scheme).
    #[serde(
        rename = "opening_balance_minor_units",
        alias = "opening_balance",
        with = "crate::report::i128_string"
    )]
    pub opening_balance: i128,
    /// Booked balance when the window closed: opening + credits - debits.
    #[serde(
        rename = "closing_balance_minor_units",
        alias = "closing_balance",
        with = "crate::report::i128_string"
    )]
    pub closing_balance: i128,
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

    /// One row per entry; every row repeats the window's opening and closing booked balances
    /// (signed minor units), so a statement with entries carries both. Amounts in minor units.
    pub fn write_csv(&self, out: &mut impl Write) -> std::io::Result<()> {
        writeln!(
            out,
            "window,participant,currency,voucher,kind,reference,counterparty,direction,amount,at_ns,opening_balance,closing_balance"
        )?;
        for e in &self.entries {
            writeln!(
                out,
                "{},{},{},{},{},{},{},{},{},{},{},{}",
                self.window,
                self.participant,
                self.currency,
                e.voucher,
                e.kind,
                e.reference,
                e.counterparty,
                if e.credit { "credit" } else { "debit" },
                e.amount,
                e.at_ns,
                self.opening_balance,
                self.closing_balance
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

/// Booked balances by (participant, currency), signed minor units.
pub type Balances = BTreeMap<(String, String), i128>;

impl Statements {
    /// Statements of `window` for a scheme that starts with nothing (window 1).
    pub fn new(window: u64) -> Statements {
        Statements::with_openings(window, &Balances::new())
    }

    /// Statements of `window` whose positions opened at `openings` (the previous window's
    /// closing balances): every position with a balance gets a statement, moved or not, so the
    /// chain of balances never breaks.
    pub fn with_openings(window: u64, openings: &Balances) -> Statements {
        let statements = openings
            .iter()
            .map(|((participant, currency), balance)| {
                (
                    (participant.clone(), currency.clone()),
                    Statement {
                        participant: participant.clone(),
                        currency: currency.clone(),
                        window,
                        opening_balance: *balance,
                        closing_balance: *balance,
                        ..Statement::default()
                    },
                )
            })
            .collect();
        Statements { window, statements }
    }

    /// A settlement fund adjustment as it moved the position on the ledger: `moved` signed minor
    /// units (positive: credited, a net payer paid in; negative: debited, a net receiver paid
    /// out; 0 when the whole amount was carried). The voucher holds the window's net; what moved
    /// can be less (a net receiver that already spent its receipts), so the caller reads it from
    /// the ledger. A zero movement is not an entry.
    pub fn adjustment(
        &mut self,
        voucher: u64,
        participant: &str,
        currency: &str,
        adjusted_window: u64,
        moved: i128,
        at_ns: u64,
    ) -> Result<(), ClearingError> {
        if moved == 0 {
            return Ok(());
        }
        self.entry(
            participant,
            currency,
            voucher,
            "fund_adjustment",
            &format!("window-{adjusted_window}"),
            "settlement-bank",
            moved > 0,
            moved.unsigned_abs(),
            at_ns,
        )
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

    /// The statements, each with its closing balance; and those closing balances (the next
    /// window's openings).
    pub fn finish(self) -> Result<(Vec<Statement>, Balances), ClearingError> {
        let mut closings = Balances::new();
        let mut out = Vec::with_capacity(self.statements.len());
        for (key, mut statement) in self.statements {
            statement.closing_balance = statement
                .opening_balance
                .checked_add(statement.net()?)
                .ok_or(ClearingError::Overflow("closing balance"))?;
            closings.insert(key, statement.closing_balance);
            out.push(statement);
        }
        Ok((out, closings))
    }
}
