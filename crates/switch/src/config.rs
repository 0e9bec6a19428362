//! The switch's configuration (TOML), every field with a sane default.

use serde::Deserialize;

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SwitchConfig {
    /// Address the HTTP API listens on.
    pub listen: String,
    /// A payment not accepted by its creditor agent by then is rejected (AB05 / AB08).
    pub settle_deadline_ms: u64,
    /// The ledger reservation's own timeout: even if the switch is down, the liquidity is
    /// released by then (the ledger voids the reservation itself).
    pub hard_timeout_ms: u64,
    /// How long a submit request waits for the final state before answering PDNG (HTTP 202).
    pub sync_wait_ms: u64,
    /// Largest request body accepted (bytes), checked before parsing.
    pub body_bytes_max: usize,
    /// Payments reserved and not yet final, per debtor agent and in total.
    pub in_flight_per_participant_max: usize,
    pub in_flight_total_max: usize,
    /// Concurrent outbound calls to one participant.
    pub outbound_per_participant_max: usize,
    /// Timeout of one outbound HTTP call.
    pub outbound_call_timeout_ms: u64,
    /// Notifications waiting for delivery to one participant.
    pub notification_queue_max: usize,
    /// Notifications waiting for delivery to all participants together (about 2 KB each).
    pub notification_queue_total_max: usize,
    /// Delivery attempts of one batch of notifications before it is dropped (logged; the
    /// participant can still ask for the status).
    pub notification_attempts_max: u32,
    /// Allowed clock skew of signed requests (and the replay window): how far a signature's
    /// timestamp may lag the switch's clock.
    pub clock_skew_ms: u64,
    /// How far a signature's timestamp may lead the switch's clock. A (re)started switch refuses
    /// timestamps earlier than its start plus this, so no request signed for an earlier process
    /// is accepted twice (docs/SECURITY.md, "Replays across restarts").
    pub clock_lead_ms: u64,
    /// Nonces remembered (replay protection); beyond it requests are refused with 503.
    pub nonces_max: usize,
    /// Finished payments kept in memory for fast status answers and duplicate checks.
    pub recent_payments_max: usize,
    /// Participants the switch accepts.
    pub participants_max: usize,
    /// Requests per second one participant may make (a token bucket refilled at this rate),
    /// beyond it 429 with Retry-After; and how many it may make at once after a quiet spell.
    /// The operator is not limited.
    pub participant_requests_per_second: u64,
    pub participant_requests_burst: u64,
    /// The switch's own BIC, in the business application headers it writes.
    pub scheme_bic: String,
    /// TLS: PEM certificate chain and private key; both or neither (plain HTTP, e.g. behind a
    /// TLS-terminating proxy or on loopback).
    pub tls_cert_pem: Option<std::path::PathBuf>,
    pub tls_key_pem: Option<std::path::PathBuf>,
    /// Close (and settle) the settlement window every this many seconds; 0 = only by operator
    /// command.
    pub window_close_every_seconds: u64,
    /// Also close (and settle) the window at these times of day, UTC, "HH:MM" (e.g. ["12:00",
    /// "16:30"]); empty = none. Combines with `window_close_every_seconds`.
    pub window_close_at_utc: Vec<String>,
    /// Liquidity-saving mode for these currencies: a payment that does not fit the debtor
    /// agent's liquidity is queued (after its creditor agent accepts) instead of rejected, and
    /// settled by multilateral offsetting before its deadline (else rejected AB05).
    pub liquidity_saving_currencies: Vec<String>,
    /// Most payments queued for liquidity at once; beyond it, AM04/AM23 as without the mode.
    pub queued_payments_max: usize,
    /// How often the gridlock resolution runs even without a liquidity change.
    pub gridlock_interval_ms: u64,
    /// The scheme's rules beyond the XSD: generic, sepa_instant (EUR, IBANs, BICs) or fednow
    /// (USD, account numbers, routing numbers, business application header required).
    pub scheme_profile: crate::profile::SchemeProfile,
    /// The ledger index's page cache, MiB: the largest single part of the switch's resident
    /// memory (docs/MEMORY.md). Pages beyond it are read back from the file.
    pub index_cache_mb: u64,
}

impl Default for SwitchConfig {
    fn default() -> Self {
        SwitchConfig {
            listen: "127.0.0.1:8080".into(),
            settle_deadline_ms: 10_000,
            hard_timeout_ms: 20_000,
            sync_wait_ms: 12_000,
            body_bytes_max: 64 * 1024,
            in_flight_per_participant_max: 4_096,
            in_flight_total_max: 100_000,
            outbound_per_participant_max: 64,
            outbound_call_timeout_ms: 5_000,
            notification_queue_max: 10_000,
            notification_queue_total_max: 100_000,
            notification_attempts_max: 8,
            clock_skew_ms: 30_000,
            clock_lead_ms: 2_000,
            nonces_max: 4_000_000,
            recent_payments_max: 200_000,
            participants_max: 10_000,
            participant_requests_per_second: 5_000,
            participant_requests_burst: 10_000,
            scheme_bic: "CLRHXXXX".into(),
            tls_cert_pem: None,
            tls_key_pem: None,
            window_close_every_seconds: 0,
            window_close_at_utc: vec![],
            liquidity_saving_currencies: vec![],
            queued_payments_max: 10_000,
            gridlock_interval_ms: 200,
            scheme_profile: crate::profile::SchemeProfile::Generic,
            index_cache_mb: 1024,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config: {0}")]
    Parse(#[from] toml::de::Error),
    #[error("config: {0}")]
    Invalid(String),
}

impl SwitchConfig {
    pub fn from_toml(text: &str) -> Result<SwitchConfig, ConfigError> {
        SwitchConfig::from_toml_and_env(text, std::iter::empty())
    }

    /// The file's settings, then overrides from the environment: `CLEARHOUSE_<FIELD>` (upper
    /// case) sets `<field>`, its value read as TOML (`CLEARHOUSE_SETTLE_DEADLINE_MS=5000`,
    /// `CLEARHOUSE_LIQUIDITY_SAVING_CURRENCIES='["EUR"]'`), or as a plain string when it is not
    /// TOML (`CLEARHOUSE_LISTEN=0.0.0.0:8080`). `CLEARHOUSE_LOG` and `CLEARHOUSE_LOG_FORMAT` are
    /// the logger's. An unknown field is an error, as in the file.
    pub fn from_toml_and_env(
        text: &str,
        env: impl Iterator<Item = (String, String)>,
    ) -> Result<SwitchConfig, ConfigError> {
        let mut table: toml::Table = toml::from_str(text)?;
        for (name, value) in env {
            let Some(field) = name.strip_prefix("CLEARHOUSE_") else {
                continue;
            };
            if matches!(field, "LOG" | "LOG_FORMAT") {
                continue;
            }
            let field = field.to_ascii_lowercase();
            let parsed = toml::from_str::<toml::Table>(&format!("v = {value}"))
                .ok()
                .and_then(|mut t| t.remove("v"))
                .unwrap_or(toml::Value::String(value));
            table.insert(field, parsed);
        }
        let config: SwitchConfig = table.try_into()?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: &str| Err(ConfigError::Invalid(m.into()));
        if self.settle_deadline_ms == 0 || self.hard_timeout_ms < self.settle_deadline_ms {
            return invalid("need 0 < settle_deadline_ms <= hard_timeout_ms");
        }
        if self.hard_timeout_ms / 1000 >= u64::from(u32::MAX) {
            return invalid("hard_timeout_ms too large");
        }
        if self.in_flight_per_participant_max == 0
            || self.in_flight_total_max == 0
            || self.outbound_per_participant_max == 0
            || self.notification_queue_max == 0
            || self.notification_queue_total_max == 0
            || self.body_bytes_max < 1024
            || self.participant_requests_per_second == 0
            || self.participant_requests_burst == 0
        {
            return invalid("limits must be positive (body_bytes_max at least 1024)");
        }
        if self.tls_cert_pem.is_some() != self.tls_key_pem.is_some() {
            return invalid("tls_cert_pem and tls_key_pem go together");
        }
        if self.window_close_at_utc.len() > 48 {
            return invalid("window_close_at_utc: at most 48 times of day");
        }
        for time in &self.window_close_at_utc {
            if minute_of_day(time).is_none() {
                return invalid("window_close_at_utc: times are \"HH:MM\" (00:00 to 23:59)");
            }
        }
        if self.queued_payments_max == 0 || self.gridlock_interval_ms == 0 {
            return invalid("queued_payments_max and gridlock_interval_ms must be positive");
        }
        if !(16..=1 << 20).contains(&self.index_cache_mb) {
            return invalid("index_cache_mb: 16 to 1048576 (MiB)");
        }
        Ok(())
    }

    /// `index_cache_mb` in bytes (validated: at most 1 TiB).
    pub fn index_cache_bytes(&self) -> usize {
        usize::try_from(self.index_cache_mb << 20).unwrap_or(usize::MAX)
    }

    /// Seconds from `now_unix_seconds` to the next scheduled window close, if any is configured.
    pub fn seconds_to_next_close(
        &self,
        now_unix_seconds: u64,
        last_close_unix_seconds: u64,
    ) -> Option<u64> {
        let every = (self.window_close_every_seconds > 0).then(|| {
            (last_close_unix_seconds + self.window_close_every_seconds)
                .saturating_sub(now_unix_seconds)
        });
        let second_of_day = now_unix_seconds % 86_400;
        let fixed = self
            .window_close_at_utc
            .iter()
            .filter_map(|t| minute_of_day(t))
            .map(|minute| {
                let at = u64::from(minute) * 60;
                if at > second_of_day {
                    at - second_of_day
                } else {
                    86_400 - second_of_day + at
                }
            })
            .min();
        match (every, fixed) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The ledger timeout in whole seconds, rounded up.
    pub fn hard_timeout_seconds(&self) -> u32 {
        self.hard_timeout_ms.div_ceil(1000) as u32
    }
}

/// "HH:MM" -> minutes since midnight.
fn minute_of_day(text: &str) -> Option<u16> {
    let (h, m) = text.split_once(':')?;
    if h.len() != 2 || m.len() != 2 {
        return None;
    }
    let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
    (h < 24 && m < 60).then_some(h * 60 + m)
}

#[cfg(test)]
mod schedule_tests {
    use super::*;

    #[test]
    fn the_environment_overrides_the_file() {
        let env = [
            ("CLEARHOUSE_SETTLE_DEADLINE_MS", "5000"),
            ("CLEARHOUSE_LISTEN", "0.0.0.0:9000"),
            ("CLEARHOUSE_LIQUIDITY_SAVING_CURRENCIES", "[\"EUR\"]"),
            ("CLEARHOUSE_LOG", "debug"),
            ("PATH", "/bin"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        let config =
            SwitchConfig::from_toml_and_env("settle_deadline_ms = 7000\n", env.into_iter())
                .unwrap();
        assert_eq!(config.settle_deadline_ms, 5000);
        assert_eq!(config.listen, "0.0.0.0:9000");
        assert_eq!(config.liquidity_saving_currencies, vec!["EUR".to_string()]);
        let unknown = [("CLEARHOUSE_NO_SUCH_FIELD".to_string(), "1".to_string())];
        assert!(SwitchConfig::from_toml_and_env("", unknown.into_iter()).is_err());
        let invalid = [("CLEARHOUSE_SETTLE_DEADLINE_MS".to_string(), "0".to_string())];
        assert!(SwitchConfig::from_toml_and_env("", invalid.into_iter()).is_err());
    }

    #[test]
    fn the_next_close_is_the_nearest_of_the_interval_and_the_times_of_day() {
        let mut config = SwitchConfig {
            window_close_at_utc: vec!["12:00".into(), "00:30".into()],
            ..SwitchConfig::default()
        };
        config.validate().unwrap();
        let day = 86_400 * 20_000;
        // 11:59:00 -> 12:00 in 60 s; 12:00:00 exactly -> next is 00:30 tomorrow.
        assert_eq!(
            config.seconds_to_next_close(day + 11 * 3600 + 59 * 60, 0),
            Some(60)
        );
        assert_eq!(
            config.seconds_to_next_close(day + 12 * 3600, 0),
            Some(12 * 3600 + 1800)
        );
        config.window_close_every_seconds = 30;
        assert_eq!(config.seconds_to_next_close(day + 100, day + 90), Some(20));
        config.window_close_at_utc = vec!["24:00".into()];
        assert!(config.validate().is_err());
        assert_eq!(SwitchConfig::default().seconds_to_next_close(day, 0), None);
    }
}
