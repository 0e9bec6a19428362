//! Currencies and amounts: decimal strings at the edge, integer minor units inside.

/// A currency the switch can clear: ISO 4217 alphabetic code, numeric code (the ledger id) and
/// minor-unit exponent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Currency {
    pub code: &'static str,
    pub numeric: u32,
    pub exponent: u8,
}

const CURRENCIES: &[Currency] = &[
    Currency {
        code: "AUD",
        numeric: 36,
        exponent: 2,
    },
    Currency {
        code: "BRL",
        numeric: 986,
        exponent: 2,
    },
    Currency {
        code: "CAD",
        numeric: 124,
        exponent: 2,
    },
    Currency {
        code: "CHF",
        numeric: 756,
        exponent: 2,
    },
    Currency {
        code: "CNY",
        numeric: 156,
        exponent: 2,
    },
    Currency {
        code: "EUR",
        numeric: 978,
        exponent: 2,
    },
    Currency {
        code: "GBP",
        numeric: 826,
        exponent: 2,
    },
    Currency {
        code: "INR",
        numeric: 356,
        exponent: 2,
    },
    Currency {
        code: "JPY",
        numeric: 392,
        exponent: 0,
    },
    Currency {
        code: "KES",
        numeric: 404,
        exponent: 2,
    },
    Currency {
        code: "KWD",
        numeric: 414,
        exponent: 3,
    },
    Currency {
        code: "NGN",
        numeric: 566,
        exponent: 2,
    },
    Currency {
        code: "SEK",
        numeric: 752,
        exponent: 2,
    },
    Currency {
        code: "SGD",
        numeric: 702,
        exponent: 2,
    },
    Currency {
        code: "USD",
        numeric: 840,
        exponent: 2,
    },
    Currency {
        code: "ZAR",
        numeric: 710,
        exponent: 2,
    },
];

pub fn currency(code: &str) -> Option<Currency> {
    CURRENCIES.iter().copied().find(|c| c.code == code)
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AmountError {
    #[error("amount {0:?} is not a decimal number like 12.34")]
    Syntax(String),
    #[error("amount {amount:?} has more than {exponent} decimals")]
    TooManyDecimals { amount: String, exponent: u8 },
    #[error("amount {0:?} is too large")]
    Overflow(String),
}

/// Largest amount accepted anywhere (ISO 20022 allows 18 digits in total).
pub const AMOUNT_DIGITS_MAX: usize = 18;

/// Parses "12.34" into minor units with checked arithmetic; no sign, no exponent, no spaces.
pub fn parse_amount(text: &str, exponent: u8) -> Result<u128, AmountError> {
    let syntax = || AmountError::Syntax(text.chars().take(40).collect());
    let (whole, fraction) = match text.split_once('.') {
        Some((whole, fraction)) if !fraction.is_empty() => (whole, fraction),
        Some(_) => return Err(syntax()),
        None => (text, ""),
    };
    if whole.is_empty()
        || !whole.bytes().all(|b| b.is_ascii_digit())
        || !fraction.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(syntax());
    }
    // Significant digits, as the XSD's totalDigits counts them: leading zeros of the whole part
    // and trailing zeros of the fraction do not count ("12.00" has 2, like what we format).
    let fraction_trimmed = fraction.trim_end_matches('0');
    if whole.trim_start_matches('0').len() + fraction_trimmed.len() > AMOUNT_DIGITS_MAX
        || whole.len() > 64
        || fraction.len() > 64
    {
        return Err(AmountError::Overflow(text.chars().take(40).collect()));
    }
    if fraction_trimmed.len() > exponent as usize {
        return Err(AmountError::TooManyDecimals {
            amount: text.to_string(),
            exponent,
        });
    }
    let overflow = || AmountError::Overflow(text.to_string());
    let mut minor: u128 = 0;
    for b in whole.bytes() {
        minor = minor
            .checked_mul(10)
            .and_then(|m| m.checked_add(u128::from(b - b'0')))
            .ok_or_else(overflow)?;
    }
    for i in 0..exponent as usize {
        let digit = fraction_trimmed.as_bytes().get(i).map_or(0, |b| b - b'0');
        minor = minor
            .checked_mul(10)
            .and_then(|m| m.checked_add(u128::from(digit)))
            .ok_or_else(overflow)?;
    }
    Ok(minor)
}

/// Formats minor units as a decimal string with exactly `exponent` decimals.
pub fn format_amount(minor: u128, exponent: u8) -> String {
    if exponent == 0 {
        return minor.to_string();
    }
    let scale = 10u128.pow(u32::from(exponent));
    format!(
        "{}.{:0width$}",
        minor / scale,
        minor % scale,
        width = exponent as usize
    )
}

/// Formats a signed figure (positions can be negative under deferred net settlement).
pub fn format_signed(value: i128, exponent: u8) -> String {
    let text = format_amount(value.unsigned_abs(), exponent);
    if value < 0 {
        format!("-{text}")
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_parse_exactly_and_refuse_what_they_cannot_represent() {
        assert_eq!(parse_amount("12.34", 2), Ok(1234));
        assert_eq!(parse_amount("12.3", 2), Ok(1230));
        assert_eq!(parse_amount("12", 2), Ok(1200));
        assert_eq!(parse_amount("0.10", 2), Ok(10));
        assert_eq!(parse_amount("12.340", 2), Ok(1234));
        assert_eq!(parse_amount("7", 0), Ok(7));
        assert_eq!(parse_amount("1.001", 3), Ok(1001));
        assert!(matches!(
            parse_amount("12.345", 2),
            Err(AmountError::TooManyDecimals { .. })
        ));
        assert!(matches!(
            parse_amount("1.5", 0),
            Err(AmountError::TooManyDecimals { .. })
        ));
        for bad in [
            "", ".5", "5.", "-1", "+1", "1e3", "1,00", " 1", "1.2.3", "abc",
        ] {
            assert!(
                matches!(parse_amount(bad, 2), Err(AmountError::Syntax(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            parse_amount("1234567890123456789", 2),
            Err(AmountError::Overflow(_))
        ));
        // Found by the fuzzer: what we format must parse back, trailing zeros included.
        assert_eq!(
            parse_amount("22222222220222000.00", 2),
            Ok(2_222_222_222_022_200_000)
        );
        assert_eq!(format_amount(1234, 2), "12.34");
        assert_eq!(format_amount(5, 2), "0.05");
        assert_eq!(format_amount(5, 0), "5");
        assert_eq!(format_signed(-5, 3), "-0.005");
        assert_eq!(currency("EUR").unwrap().numeric, 978);
        assert!(currency("XXX").is_none());
    }
}
