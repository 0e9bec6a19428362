//! Positions and multilateral netting.
//!
//! The switch feeds [`Accumulators`] at commit time (O(1) per payment); closing a window turns
//! them into a [`SettlementPlan`] in O(participants): net positions, who pays and who receives
//! how much, and the figures users plan with (gross, net, netting efficiency, liquidity saved,
//! peak exposure).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::event::VoucherEvent;
use crate::ClearingError;

/// What one participant sent and received in one currency within a window.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    pub sent: u128,
    pub received: u128,
    pub sent_count: u64,
    pub received_count: u64,
    /// The lowest running net (received - sent) seen in the window: its peak exposure.
    pub lowest_net: i128,
}

impl Position {
    pub fn net(&self) -> Result<i128, ClearingError> {
        let received = i128::try_from(self.received).map_err(|_| ClearingError::Overflow("net"))?;
        let sent = i128::try_from(self.sent).map_err(|_| ClearingError::Overflow("net"))?;
        received
            .checked_sub(sent)
            .ok_or(ClearingError::Overflow("net"))
    }
}

/// Positions per (participant, currency).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Accumulators {
    pub positions: BTreeMap<(String, String), Position>,
    /// Payments and returns counted, per currency.
    pub transfers: BTreeMap<String, u64>,
}

impl Accumulators {
    /// Counts one movement of `amount` from `payer` to `payee` (a settled payment or a return).
    /// On overflow nothing changes.
    pub fn add(
        &mut self,
        payer: &str,
        payee: &str,
        currency: &str,
        amount: u128,
    ) -> Result<(), ClearingError> {
        let key = |bic: &str| (bic.to_string(), currency.to_string());
        let mut out = self.positions.get(&key(payer)).copied().unwrap_or_default();
        let mut into = self.positions.get(&key(payee)).copied().unwrap_or_default();
        let overflow = || ClearingError::Overflow("accumulating a position");
        out.sent = out.sent.checked_add(amount).ok_or_else(overflow)?;
        out.sent_count += 1;
        into.received = into.received.checked_add(amount).ok_or_else(overflow)?;
        into.received_count += 1;
        let out_net = out.net()?;
        into.net()?;
        out.lowest_net = out.lowest_net.min(out_net);
        self.positions.insert(key(payer), out);
        self.positions.insert(key(payee), into);
        *self.transfers.entry(currency.to_string()).or_default() += 1;
        Ok(())
    }

    /// Counts what a voucher moved between positions (settled payments and returns); other
    /// events move nothing here.
    pub fn add_event(&mut self, event: &VoucherEvent) -> Result<(), ClearingError> {
        match event {
            VoucherEvent::PaymentSettled {
                debtor_agent,
                creditor_agent,
                currency,
                amount,
                ..
            } => self.add(debtor_agent, creditor_agent, currency, *amount),
            VoucherEvent::PaymentReturned {
                returning_agent,
                receiving_agent,
                currency,
                amount,
                ..
            } => self.add(returning_agent, receiving_agent, currency, *amount),
            _ => Ok(()),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.positions.is_empty()
    }
}

/// One participant's result for a window in one currency.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetPosition {
    pub participant: String,
    pub currency: String,
    /// Settled by deferred net settlement (else prefunded: already settled gross).
    pub deferred: bool,
    #[serde(
        rename = "sent_minor_units",
        alias = "sent",
        with = "crate::report::u128_string"
    )]
    pub sent: u128,
    #[serde(
        rename = "received_minor_units",
        alias = "received",
        with = "crate::report::u128_string"
    )]
    pub received: u128,
    pub sent_count: u64,
    pub received_count: u64,
    /// received - sent: > 0 the participant is owed, < 0 it owes.
    #[serde(
        rename = "net_minor_units",
        alias = "net",
        with = "crate::report::i128_string"
    )]
    pub net: i128,
    #[serde(
        rename = "peak_exposure_minor_units",
        alias = "peak_exposure",
        with = "crate::report::u128_string"
    )]
    pub peak_exposure: u128,
}

/// A settlement instruction: `net` > 0 the settlement bank pays the participant, < 0 the
/// participant pays the settlement bank.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instruction {
    pub participant: String,
    pub currency: String,
    #[serde(
        rename = "net_minor_units",
        alias = "net",
        with = "crate::report::i128_string"
    )]
    pub net: i128,
}

/// Per-currency figures of a window.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CurrencyFigures {
    pub currency: String,
    pub transfers: u64,
    /// Sum of all amounts moved (what gross settlement would have moved).
    #[serde(
        rename = "gross_minor_units",
        alias = "gross",
        with = "crate::report::u128_string"
    )]
    pub gross: u128,
    /// Sum of the net debit positions (what netting moves).
    #[serde(
        rename = "net_minor_units",
        alias = "net",
        with = "crate::report::u128_string"
    )]
    pub net: u128,
    /// gross - net.
    #[serde(
        rename = "liquidity_saved_minor_units",
        alias = "liquidity_saved",
        with = "crate::report::u128_string"
    )]
    pub liquidity_saved: u128,
    /// (gross - net) / gross in basis points (10,000 = everything offset), 0 when gross is 0.
    pub netting_efficiency_bp: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SettlementPlan {
    pub window: u64,
    pub positions: Vec<NetPosition>,
    pub instructions: Vec<Instruction>,
    pub figures: Vec<CurrencyFigures>,
}

impl SettlementPlan {
    /// Nets the accumulators of `window`. `deferred(participant, currency)` says whether that
    /// position settles net (instructions are only for those). Checks that nets sum to zero per
    /// currency (every amount received was sent by somebody).
    pub fn compute(
        window: u64,
        accumulators: &Accumulators,
        deferred: impl Fn(&str, &str) -> bool,
    ) -> Result<SettlementPlan, ClearingError> {
        let mut positions = Vec::with_capacity(accumulators.positions.len());
        let mut instructions = Vec::new();
        let mut figures: BTreeMap<&str, CurrencyFigures> = BTreeMap::new();
        let mut sums: BTreeMap<&str, i128> = BTreeMap::new();
        let overflow = || ClearingError::Overflow("netting");
        for ((participant, currency), position) in &accumulators.positions {
            let net = position.net()?;
            let is_deferred = deferred(participant, currency);
            let sum = sums.entry(currency).or_default();
            *sum = sum.checked_add(net).ok_or_else(overflow)?;
            let figure = figures.entry(currency).or_insert_with(|| CurrencyFigures {
                currency: currency.clone(),
                transfers: accumulators.transfers.get(currency).copied().unwrap_or(0),
                gross: 0,
                net: 0,
                liquidity_saved: 0,
                netting_efficiency_bp: 0,
            });
            figure.gross = figure
                .gross
                .checked_add(position.sent)
                .ok_or_else(overflow)?;
            if net < 0 {
                figure.net = figure
                    .net
                    .checked_add(net.unsigned_abs())
                    .ok_or_else(overflow)?;
            }
            if is_deferred && net != 0 {
                instructions.push(Instruction {
                    participant: participant.clone(),
                    currency: currency.clone(),
                    net,
                });
            }
            positions.push(NetPosition {
                participant: participant.clone(),
                currency: currency.clone(),
                deferred: is_deferred,
                sent: position.sent,
                received: position.received,
                sent_count: position.sent_count,
                received_count: position.received_count,
                net,
                peak_exposure: if position.lowest_net < 0 {
                    position.lowest_net.unsigned_abs()
                } else {
                    0
                },
            });
        }
        for (currency, sum) in &sums {
            if *sum != 0 {
                return Err(ClearingError::Voucher {
                    seq: 0,
                    reason: format!("window {window}: nets in {currency} sum to {sum}, not 0"),
                });
            }
        }
        let figures = figures
            .into_values()
            .map(|mut figure| {
                figure.liquidity_saved = figure.gross - figure.net;
                // liquidity_saved <= gross, so this is at most 10,000 (0 when gross is 0).
                figure.netting_efficiency_bp = figure
                    .liquidity_saved
                    .saturating_mul(10_000)
                    .checked_div(figure.gross)
                    .unwrap_or(0) as u32;
                figure
            })
            .collect();
        Ok(SettlementPlan {
            window,
            positions,
            instructions,
            figures,
        })
    }
}

/// Recomputes each window's accumulators from a run of vouchers, independently of what the
/// switch accumulated at commit time: events before a `window_closed` belong to that window.
/// `open_window` is the window open at the first voucher given.
pub fn accumulators_from_vouchers<'a>(
    open_window: u64,
    events: impl IntoIterator<Item = &'a VoucherEvent>,
) -> Result<(BTreeMap<u64, Accumulators>, u64), ClearingError> {
    let mut accumulation = WindowAccumulation::new(open_window);
    for event in events {
        accumulation.add(event)?;
    }
    Ok(accumulation.finish())
}

/// [`accumulators_from_vouchers`] one voucher at a time, for a caller that reads the vouchers in
/// pages and keeps none of them (a restart's recount of the open window).
pub struct WindowAccumulation {
    windows: BTreeMap<u64, Accumulators>,
    window: u64,
}

impl WindowAccumulation {
    /// `open_window` is the window open at the first voucher to come.
    pub fn new(open_window: u64) -> WindowAccumulation {
        WindowAccumulation {
            windows: BTreeMap::new(),
            window: open_window,
        }
    }

    pub fn add(&mut self, event: &VoucherEvent) -> Result<(), ClearingError> {
        if let VoucherEvent::WindowClosed { window: closed, .. } = event {
            if *closed != self.window {
                return Err(ClearingError::Voucher {
                    seq: 0,
                    reason: format!(
                        "window {closed} closed while window {} was open",
                        self.window
                    ),
                });
            }
            self.windows.entry(self.window).or_default();
            self.window += 1;
            Ok(())
        } else {
            self.windows
                .entry(self.window)
                .or_default()
                .add_event(event)
        }
    }

    /// Each window's accumulators, and the window open after the last voucher.
    pub fn finish(self) -> (BTreeMap<u64, Accumulators>, u64) {
        (self.windows, self.window)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Amounts in minor units are named so in JSON (`*_minor_units`); records stored before the
    /// rename (plain names) still read.
    #[test]
    fn minor_unit_fields_are_named_so_and_old_names_still_read() {
        let position = NetPosition {
            participant: "A".into(),
            currency: "EUR".into(),
            deferred: true,
            sent: 100,
            received: 30,
            sent_count: 1,
            received_count: 1,
            net: -70,
            peak_exposure: 100,
        };
        let json = serde_json::to_value(&position).unwrap();
        for name in ["sent", "received", "net", "peak_exposure"] {
            assert!(json.get(name).is_none(), "{json}");
            assert!(json.get(format!("{name}_minor_units")).is_some(), "{json}");
        }
        let old = r#"{"participant":"A","currency":"EUR","deferred":true,"sent":"100","received":"30","sent_count":1,"received_count":1,"net":"-70","peak_exposure":"100"}"#;
        assert_eq!(serde_json::from_str::<NetPosition>(old).unwrap(), position);
    }

    #[test]
    fn a_simple_window_nets_to_instructions_and_figures() {
        let mut acc = Accumulators::default();
        acc.add("A", "B", "EUR", 100).unwrap();
        acc.add("B", "C", "EUR", 70).unwrap();
        acc.add("C", "A", "EUR", 50).unwrap();
        let plan = SettlementPlan::compute(1, &acc, |_, _| true).unwrap();
        let nets: Vec<(String, i128)> = plan
            .instructions
            .iter()
            .map(|i| (i.participant.clone(), i.net))
            .collect();
        assert_eq!(
            nets,
            vec![("A".into(), -50), ("B".into(), 30), ("C".into(), 20)]
        );
        let figures = &plan.figures[0];
        assert_eq!((figures.gross, figures.net), (220, 50));
        assert_eq!(figures.liquidity_saved, 170);
        assert_eq!(figures.netting_efficiency_bp, 7727);
        assert_eq!(plan.positions[0].peak_exposure, 100);
        // A prefunded participant gets no instruction but still counts in the figures.
        let plan = SettlementPlan::compute(1, &acc, |p, _| p != "A").unwrap();
        assert_eq!(plan.instructions.len(), 2);
        assert!(acc.clone().add("A", "B", "EUR", u128::MAX).is_err());
    }
}
