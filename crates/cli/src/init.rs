//! `clearhouse init`: a fresh data directory with a commented configuration file and the
//! operator's key, ready for `clearhouse serve --data-dir DIR --config DIR/switch.toml`.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clearhouse_switch::SwitchConfig;

#[derive(clap::Args)]
pub struct InitArgs {
    /// The data directory to create (must not exist or be empty).
    #[arg(long, default_value = "data")]
    data_dir: PathBuf,
}

pub fn run(args: InitArgs) -> anyhow::Result<()> {
    if args.data_dir.exists() && std::fs::read_dir(&args.data_dir)?.next().is_some() {
        bail!(
            "{} is not empty; init only prepares a fresh data directory",
            args.data_dir.display()
        );
    }
    std::fs::create_dir_all(&args.data_dir)?;
    let d = SwitchConfig::default();
    let config = format!(
        r#"# clearhouse switch configuration. Every field is optional; the values shown are the defaults.
# Use: clearhouse serve --data-dir {dir} --config {dir}/switch.toml

# Address the HTTP API listens on.
listen = "{listen}"

# A payment not accepted by its creditor agent by then is rejected (AB05, or AB08 if never reached).
settle_deadline_ms = {settle}
# The ledger reservation's own timeout: liquidity is released by then even if the switch is down.
hard_timeout_ms = {hard}
# How long a submit waits for the final state before answering PDNG (HTTP 202).
sync_wait_ms = {sync}

# Limits (requests beyond them are refused with 413, 429 or 503, never queued without bound).
body_bytes_max = {body}
in_flight_per_participant_max = {ifp}
in_flight_total_max = {ift}
outbound_per_participant_max = {opp}
outbound_call_timeout_ms = {oct}
notification_queue_max = {nqm}
notification_attempts_max = {nam}
# Allowed clock skew of signed requests (how far a timestamp may lag), and the replay window.
clock_skew_ms = {skew}
# How far a signature's timestamp may lead the switch's clock; after a (re)start, requests signed
# before start + this are refused (401 signed_before_start: sign again), so captured requests of an
# earlier process cannot be replayed.
clock_lead_ms = {lead}
nonces_max = {nonces}
recent_payments_max = {recent}
participants_max = {pmax}
# Per participant: requests per second (token bucket) and burst; beyond them 429 with Retry-After.
participant_requests_per_second = {rps}
participant_requests_burst = {burst}

# The switch's BIC in the ISO 20022 headers it writes.
scheme_bic = "{bic}"

# Clearing: close (and settle) the settlement window every this many seconds; 0 = only on the
# operator's command (clearhouse admin close-window). Each close signs the voucher chain head with
# the operator's Ed25519 key ({dir}/operator-ed25519.key, created on first start).
window_close_every_seconds = {windows}
# And/or at fixed times of day, UTC, e.g. ["12:00", "16:30"].
window_close_at_utc = []

# Liquidity-saving mode, per currency: a payment that does not fit its debtor agent's liquidity is
# queued (after its creditor agent accepts) and settled by multilateral offsetting before its
# deadline, instead of rejected at once. E.g. ["EUR"].
liquidity_saving_currencies = []
queued_payments_max = {queued}
gridlock_interval_ms = {gridlock}

# The scheme's rules beyond the XSD: "generic", "sepa_instant" (EUR, IBANs with check sums, agents
# by BIC) or "fednow" (USD, account numbers, agents by ABA routing number, a business application
# header on every pacs.008; onboard participants with routing_number).
scheme_profile = "generic"

# TLS (rustls): both or neither. Without them the API is plain HTTP (loopback, or behind a proxy).
# tls_cert_pem = "/etc/clearhouse/cert.pem"
# tls_key_pem = "/etc/clearhouse/key.pem"
"#,
        dir = args.data_dir.display(),
        listen = d.listen,
        settle = d.settle_deadline_ms,
        hard = d.hard_timeout_ms,
        sync = d.sync_wait_ms,
        body = d.body_bytes_max,
        ifp = d.in_flight_per_participant_max,
        ift = d.in_flight_total_max,
        opp = d.outbound_per_participant_max,
        oct = d.outbound_call_timeout_ms,
        nqm = d.notification_queue_max,
        nam = d.notification_attempts_max,
        skew = d.clock_skew_ms,
        lead = d.clock_lead_ms,
        nonces = d.nonces_max,
        recent = d.recent_payments_max,
        pmax = d.participants_max,
        rps = d.participant_requests_per_second,
        burst = d.participant_requests_burst,
        bic = d.scheme_bic,
        windows = d.window_close_every_seconds,
        queued = d.queued_payments_max,
        gridlock = d.gridlock_interval_ms,
    );
    // The file must parse back into exactly the defaults.
    SwitchConfig::from_toml(&config).context("the generated configuration does not parse")?;
    let config_path = args.data_dir.join("switch.toml");
    std::fs::write(&config_path, config)?;
    let key = clearhouse_switch::switch::OperatorKey::load_or_create(&args.data_dir)?;
    let signing = clearhouse_switch::clearing::load_or_create_signing_key(&args.data_dir)?;
    println!(
        "created {}\n  configuration: {}\n  operator key:  {} (key id {:?}, mode 0600)\n  checkpoint signing key: {} (Ed25519, mode 0600; public key {} in operator-ed25519.pub)\nnext: clearhouse serve --data-dir {} --config {}",
        args.data_dir.display(),
        config_path.display(),
        args.data_dir.join("operator.key").display(),
        key.key_id,
        args.data_dir.join("operator-ed25519.key").display(),
        hex::encode(signing.verifying_key().as_bytes()),
        args.data_dir.display(),
        config_path.display()
    );
    Ok(())
}
