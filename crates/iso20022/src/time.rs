//! ISO 8601 dates and times from Unix nanoseconds (UTC), without a calendar crate.

/// (year, month, day) of a day count since 1970-01-01 (Howard Hinnant's civil_from_days).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// `2026-11-25T07:30:00.123Z`
pub fn date_time(unix_ns: u64) -> String {
    let seconds = (unix_ns / 1_000_000_000) as i64;
    let millis = (unix_ns / 1_000_000) % 1000;
    let (y, m, d) = civil_from_days(seconds.div_euclid(86_400));
    let s = seconds.rem_euclid(86_400);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

/// `2026-11-25`
pub fn date(unix_ns: u64) -> String {
    let (y, m, d) = civil_from_days((unix_ns / 1_000_000_000) as i64 / 86_400);
    format!("{y:04}-{m:02}-{d:02}")
}

#[cfg(test)]
mod tests {
    #[test]
    fn known_instants() {
        assert_eq!(super::date_time(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            super::date_time(951_782_400_000_000_000),
            "2000-02-29T00:00:00.000Z"
        );
        assert_eq!(
            super::date_time(1_795_591_845_123_000_000),
            "2026-11-25T07:30:45.123Z"
        );
        assert_eq!(super::date(1_795_591_845_123_000_000), "2026-11-25");
    }
}
