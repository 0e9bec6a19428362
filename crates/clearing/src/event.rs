//! Business events as vouchers. The canonical bytes of an event are its compact JSON (fields in
//! declaration order, no whitespace, amounts as decimal strings of minor units), so anyone can
//! read a voucher and recompute its hash with standard tools.
//!
//! A voucher carries no window number: the window of a settled payment or return is fixed by its
//! place in the chain, between the `window_closed` vouchers before and after it (the chain follows
//! the journal, which is the commit order).

use serde::{Deserialize, Serialize};

/// u128 amounts as decimal strings.
mod amount {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &u128, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(value)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u128, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// i128 nets as decimal strings.
mod net {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &i128, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(value)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<i128, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum VoucherEvent {
    /// A payment settled: `amount` moved from the debtor agent's position to the creditor agent's.
    PaymentSettled {
        /// The payment id (32 hex digits).
        payment: String,
        uetr: String,
        end_to_end_id: String,
        debtor_agent: String,
        creditor_agent: String,
        currency: String,
        #[serde(with = "amount")]
        amount: u128,
        at_ns: u64,
    },
    /// A payment rejected with an ISO 20022 reason code; no money moved.
    PaymentRejected {
        payment: String,
        uetr: String,
        debtor_agent: String,
        creditor_agent: String,
        currency: String,
        #[serde(with = "amount")]
        amount: u128,
        reason: String,
        at_ns: u64,
    },
    /// (Part of) a settled payment sent back: `amount` from the returning agent (the original
    /// creditor agent) to the receiving agent (the original debtor agent).
    PaymentReturned {
        return_key: String,
        original_payment: String,
        original_uetr: String,
        returning_agent: String,
        receiving_agent: String,
        currency: String,
        #[serde(with = "amount")]
        amount: u128,
        reason: String,
        at_ns: u64,
    },
    /// Liquidity moved between the settlement bank and a participant's position.
    Liquidity {
        transfer: String,
        participant: String,
        currency: String,
        /// "in" (funding) or "out" (withdrawal).
        direction: String,
        #[serde(with = "amount")]
        amount: u128,
        at_ns: u64,
    },
    /// The cut-over: every payment and return before this voucher (and after the previous
    /// `window_closed`) belongs to `window`.
    WindowClosed {
        window: u64,
        opened_at_ns: u64,
        closed_at_ns: u64,
    },
    /// One fund adjustment of a window's settlement: `net` > 0 the participant receives it,
    /// `net` < 0 it pays it.
    FundAdjustment {
        window: u64,
        participant: String,
        currency: String,
        #[serde(with = "net")]
        net: i128,
    },
    /// A window's settlement is final: `adjustments` fund adjustments were posted as one atomic
    /// linked batch.
    WindowSettled {
        window: u64,
        adjustments: u32,
        settled_at_ns: u64,
    },
}

impl VoucherEvent {
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("voucher events always serialize")
    }

    pub fn parse(bytes: &[u8]) -> Result<VoucherEvent, String> {
        serde_json::from_slice(bytes).map_err(|error| error.to_string())
    }

    /// Whether `bic` is a party to this event (sees its body in its own voucher view).
    pub fn involves(&self, bic: &str) -> bool {
        match self {
            VoucherEvent::PaymentSettled {
                debtor_agent,
                creditor_agent,
                ..
            }
            | VoucherEvent::PaymentRejected {
                debtor_agent,
                creditor_agent,
                ..
            } => debtor_agent == bic || creditor_agent == bic,
            VoucherEvent::PaymentReturned {
                returning_agent,
                receiving_agent,
                ..
            } => returning_agent == bic || receiving_agent == bic,
            VoucherEvent::Liquidity { participant, .. }
            | VoucherEvent::FundAdjustment { participant, .. } => participant == bic,
            // Window events are public: every participant sees the cut-overs.
            VoucherEvent::WindowClosed { .. } | VoucherEvent::WindowSettled { .. } => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_bytes_round_trip_and_are_stable() {
        let event = VoucherEvent::PaymentSettled {
            payment: "00".repeat(16),
            uetr: "u".into(),
            end_to_end_id: "e".into(),
            debtor_agent: "AAAAGB2L".into(),
            creditor_agent: "BBBBGB2L".into(),
            currency: "EUR".into(),
            amount: 12_345,
            at_ns: 7,
        };
        let bytes = event.to_bytes();
        assert_eq!(
            String::from_utf8(bytes.clone()).unwrap(),
            r#"{"type":"payment_settled","payment":"00000000000000000000000000000000","uetr":"u","end_to_end_id":"e","debtor_agent":"AAAAGB2L","creditor_agent":"BBBBGB2L","currency":"EUR","amount":"12345","at_ns":7}"#
        );
        assert_eq!(VoucherEvent::parse(&bytes).unwrap(), event);
        assert!(event.involves("AAAAGB2L") && !event.involves("CCCCGB2L"));
        assert!(VoucherEvent::parse(br#"{"type":"payment_settled"}"#).is_err());
    }
}
