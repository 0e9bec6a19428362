//! Scheme profiles: the rules of a scheme that the XSD does not capture, chosen in the config
//! (`scheme_profile`). `generic` checks only what every profile checks; `sepa_instant` is
//! SCT Inst-like (EUR, IBANs with a valid checksum, agents by BIC); `fednow` is FedNow-like (USD,
//! account numbers, agents by ABA routing number, a business application header on every
//! pacs.008). Deadlines stay in the config (`settle_deadline_ms`, `hard_timeout_ms`): 10 s / 20 s
//! suit both.

use serde::{Deserialize, Serialize};

use crate::api::PaymentRequest;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SchemeProfile {
    #[default]
    Generic,
    SepaInstant,
    Fednow,
}

/// A refusal: the ISO reason code and what is wrong.
pub type Refusal = (&'static str, String);

impl SchemeProfile {
    /// The one currency the scheme clears, if it is a one-currency scheme.
    pub fn currency(self) -> Option<&'static str> {
        match self {
            SchemeProfile::Generic => None,
            SchemeProfile::SepaInstant => Some("EUR"),
            SchemeProfile::Fednow => Some("USD"),
        }
    }

    /// Whether every pacs.008 must travel with a business application header.
    pub fn requires_header(self) -> bool {
        self == SchemeProfile::Fednow
    }

    /// Whether participants are identified by ABA routing numbers (and must have one).
    pub fn uses_routing_numbers(self) -> bool {
        self == SchemeProfile::Fednow
    }

    /// The profile's rules for one payment: currency and account formats.
    pub fn check_payment(self, r: &PaymentRequest) -> Result<(), Refusal> {
        if let Some(code) = self.currency() {
            if r.currency != code {
                return Err((
                    "AM03",
                    format!("this scheme clears {code} only, not {}", r.currency),
                ));
            }
        }
        for (field, account, reason) in [
            ("debtor", &r.debtor.account, "AC02"),
            ("creditor", &r.creditor.account, "AC03"),
        ] {
            let ok = match self {
                SchemeProfile::Generic => true,
                SchemeProfile::SepaInstant => is_iban(account),
                SchemeProfile::Fednow => is_us_account_number(account),
            };
            if !ok {
                let expected = match self {
                    SchemeProfile::SepaInstant => "an IBAN with a valid check sum",
                    _ => "an account number of 1 to 17 digits",
                };
                return Err((reason, format!("{field} account must be {expected}")));
            }
        }
        Ok(())
    }
}

/// An IBAN: country code, check digits, 11 to 30 alphanumerics, and the ISO 7064 mod 97-10
/// check sum holds.
pub fn is_iban(text: &str) -> bool {
    let b = text.as_bytes();
    if !(15..=34).contains(&b.len())
        || !b[..2].iter().all(u8::is_ascii_uppercase)
        || !b[2..4].iter().all(u8::is_ascii_digit)
        || !b[4..]
            .iter()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit())
    {
        return false;
    }
    let mut remainder = 0u32;
    for &c in b[4..].iter().chain(&b[..4]) {
        let value = if c.is_ascii_digit() {
            u32::from(c - b'0')
        } else {
            u32::from(c - b'A') + 10
        };
        remainder = if value >= 10 {
            (remainder * 100 + value) % 97
        } else {
            (remainder * 10 + value) % 97
        };
    }
    remainder == 1
}

/// An ABA routing transit number: 9 digits whose weighted sum (3, 7, 1, ...) is a multiple of 10.
pub fn is_routing_number(text: &str) -> bool {
    let b = text.as_bytes();
    b.len() == 9
        && b.iter().all(u8::is_ascii_digit)
        && b.iter()
            .zip([3, 7, 1, 3, 7, 1, 3, 7, 1])
            .map(|(c, w)| u32::from(c - b'0') * w)
            .sum::<u32>()
            % 10
            == 0
}

/// A US deposit account number: 1 to 17 digits.
pub fn is_us_account_number(text: &str) -> bool {
    (1..=17).contains(&text.len()) && text.bytes().all(|c| c.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_checked_by_their_check_sums() {
        assert!(is_iban("DE89370400440532013000"));
        assert!(is_iban("FR1420041010050500013M02606"));
        assert!(is_iban("GB82WEST12345698765432"));
        assert!(!is_iban("DE89370400440532013001"));
        assert!(!is_iban("de89370400440532013000"));
        assert!(!is_iban("DE8937040044"));
        assert!(is_routing_number("011000015"));
        assert!(is_routing_number("021000021"));
        assert!(!is_routing_number("021000022"));
        assert!(!is_routing_number("02100002"));
        assert!(is_us_account_number("123456789"));
        assert!(!is_us_account_number("12345678901234567890"));
        assert!(!is_us_account_number("DE89370400440532013000"));
    }
}
