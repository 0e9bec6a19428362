//! `clearhouse admin ...`: the operator's CLI over the switch's signed API (onboarding, limits,
//! suspend/resume, liquidity, positions, payment status). Prints the switch's JSON answers; exits
//! non-zero with the switch's error code and message on a refusal.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Subcommand;
use clearhouse_switch::client::SignedClient;
use serde_json::{json, Value};

#[derive(clap::Args)]
pub struct AdminArgs {
    /// The switch's base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// The operator key file (`<key id> <hex secret>`), created by the switch on first start.
    #[arg(long, default_value = "data/operator.key")]
    key_file: PathBuf,
    #[command(subcommand)]
    command: AdminCommand,
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Onboards a participant; prints its secret once.
    ///
    /// Example: clearhouse admin onboard --bic BANKDEFF --name "Bank" --endpoint http://10.0.0.5:9000
    ///   --currency EUR:prefunded:max=5000.00:alert=1000.00 --currency USD:deferred_net:cap=250000.00
    Onboard {
        #[arg(long)]
        bic: String,
        #[arg(long)]
        name: String,
        #[arg(long)]
        endpoint: String,
        /// CODE:MODEL[:cap=AMOUNT][:max=AMOUNT][:alert=AMOUNT], MODEL = prefunded | deferred_net.
        #[arg(long = "currency", required = true)]
        currencies: Vec<String>,
    },
    /// Shows a participant.
    ///
    /// Example: clearhouse admin show BANKDEFF
    Show { bic: String },
    /// Suspends a participant: its payments, in and out, are rejected (AG01) until resumed.
    ///
    /// Example: clearhouse admin suspend BANKDEFF
    Suspend { bic: String },
    /// Resumes a suspended participant.
    ///
    /// Example: clearhouse admin resume BANKDEFF
    Resume { bic: String },
    /// Changes limits of one currency.
    ///
    /// Example: clearhouse admin limits BANKDEFF --currency EUR --net-debit-cap 50000.00
    Limits {
        bic: String,
        #[arg(long)]
        currency: String,
        #[arg(long)]
        net_debit_cap: Option<String>,
        #[arg(long)]
        per_payment_max: Option<String>,
        #[arg(long)]
        liquidity_alert_below: Option<String>,
        /// Lower the net debit cap below the current exposure (as far as it allows now).
        #[arg(long)]
        allow_below_exposure: bool,
    },
    /// Moves liquidity in (from the settlement bank) or out; idempotent by --request-id.
    ///
    /// Example: clearhouse admin liquidity BANKDEFF --currency EUR --amount 1000.00 --request-id fund-1
    Liquidity {
        bic: String,
        #[arg(long)]
        currency: String,
        #[arg(long)]
        amount: String,
        #[arg(long)]
        request_id: String,
        /// Withdraw instead of fund.
        #[arg(long)]
        out: bool,
    },
    /// Positions and available liquidity.
    ///
    /// Example: clearhouse admin positions BANKDEFF
    Positions { bic: String },
    /// A payment by id (32 hex digits).
    ///
    /// Example: clearhouse admin payment 0189f3c2a4d5e6f70000000000000010
    Payment { id: String },
    /// Counters: submitted, settled, rejected by reason, in flight.
    ///
    /// Example: clearhouse admin stats
    Stats,
    /// Closes the open settlement window (exact cut-over, signed checkpoint, net positions) and
    /// settles it unless --no-settle.
    ///
    /// Example: clearhouse admin close-window
    CloseWindow {
        #[arg(long)]
        no_settle: bool,
    },
    /// Settles a closed window: fund adjustments as one linked batch, then reconciliation.
    ///
    /// Example: clearhouse admin settle-window 3
    SettleWindow { window: u64 },
    /// The RabbitMQ definitions (users and permissions) of the participants whose endpoint is
    /// `amqp:`, to import into the scheme's broker (the switch must run with `[amqp]`).
    ///
    /// Example: clearhouse admin amqp-definitions > p.json && rabbitmqctl import_definitions p.json
    AmqpDefinitions,
    /// The open window and the recent ones.
    ///
    /// Example: clearhouse admin windows
    Windows,
    /// One window's settlement report: json, csv, or svg (chart of net positions).
    ///
    /// Example: clearhouse admin window 3 --format svg > window-3.svg
    Window {
        window: u64,
        #[arg(long, default_value = "json")]
        format: String,
    },
    /// A participant's statement of a window: json, csv, camt053 or camt054.
    ///
    /// Example: clearhouse admin statement 3 --participant BANKDEFF --format camt053 > bank.xml
    Statement {
        window: u64,
        #[arg(long)]
        participant: String,
        #[arg(long, default_value = "json")]
        format: String,
    },
}

fn terms(spec: &str) -> anyhow::Result<(String, Value)> {
    let mut parts = spec.split(':');
    let code = parts.next().context("currency code")?.to_string();
    let model = parts
        .next()
        .context("settlement model after the currency code")?;
    let mut terms = json!({"model": model});
    for part in parts {
        let (key, value) = part
            .split_once('=')
            .with_context(|| format!("{part:?}: expected key=amount"))?;
        let field = match key {
            "cap" => "net_debit_cap",
            "max" => "per_payment_max",
            "alert" => "liquidity_alert_below",
            other => bail!("unknown term {other:?} (cap, max, alert)"),
        };
        terms[field] = json!(value);
    }
    Ok((code, terms))
}

pub fn run(args: AdminArgs) -> anyhow::Result<()> {
    let (key_id, secret) = crate::common::read_operator_key(&args.key_file)?;
    let (method, path, body) = match args.command {
        AdminCommand::Onboard {
            bic,
            name,
            endpoint,
            currencies,
        } => {
            let mut map = serde_json::Map::new();
            for spec in &currencies {
                let (code, t) = terms(spec)?;
                map.insert(code, t);
            }
            (
                "POST",
                "/v1/admin/participants".to_string(),
                json!({"bic": bic, "name": name, "endpoint": endpoint, "currencies": map}),
            )
        }
        AdminCommand::Show { bic } => ("GET", format!("/v1/participants/{bic}"), Value::Null),
        AdminCommand::Suspend { bic } => (
            "PATCH",
            format!("/v1/admin/participants/{bic}"),
            json!({"status": "suspended"}),
        ),
        AdminCommand::Resume { bic } => (
            "PATCH",
            format!("/v1/admin/participants/{bic}"),
            json!({"status": "active"}),
        ),
        AdminCommand::Limits {
            bic,
            currency,
            net_debit_cap,
            per_payment_max,
            liquidity_alert_below,
            allow_below_exposure,
        } => (
            "PATCH",
            format!("/v1/admin/participants/{bic}"),
            json!({"currency": currency, "net_debit_cap": net_debit_cap, "per_payment_max": per_payment_max,
                   "liquidity_alert_below": liquidity_alert_below, "allow_below_exposure": allow_below_exposure}),
        ),
        AdminCommand::Liquidity {
            bic,
            currency,
            amount,
            request_id,
            out,
        } => (
            "POST",
            format!("/v1/admin/participants/{bic}/liquidity"),
            json!({"request_id": request_id, "currency": currency, "amount": amount, "direction": if out { "out" } else { "in" }}),
        ),
        AdminCommand::Positions { bic } => (
            "GET",
            format!("/v1/participants/{bic}/positions"),
            Value::Null,
        ),
        AdminCommand::Payment { id } => ("GET", format!("/v1/payments/{id}"), Value::Null),
        AdminCommand::Stats => ("GET", "/v1/stats".to_string(), Value::Null),
        AdminCommand::CloseWindow { no_settle } => (
            "POST",
            "/v1/admin/windows/close".to_string(),
            json!({"settle": !no_settle}),
        ),
        AdminCommand::SettleWindow { window } => (
            "POST",
            format!("/v1/admin/windows/{window}/settle"),
            Value::Null,
        ),
        AdminCommand::AmqpDefinitions => {
            ("GET", "/v1/admin/amqp/definitions".to_string(), Value::Null)
        }
        AdminCommand::Windows => ("GET", "/v1/windows".to_string(), Value::Null),
        AdminCommand::Window { window, format } => (
            "GET",
            format!("/v1/windows/{window}?format={format}"),
            Value::Null,
        ),
        AdminCommand::Statement {
            window,
            participant,
            format,
        } => (
            "GET",
            format!("/v1/windows/{window}/statement?participant={participant}&format={format}"),
            Value::Null,
        ),
    };
    let body = if body.is_null() {
        Vec::new()
    } else {
        body.to_string().into_bytes()
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (status, answer) = runtime.block_on(async {
        SignedClient::new(&args.url, &key_id, secret)
            .request(method, &path, &body)
            .await
    })?;
    let value: Value =
        serde_json::from_slice(&answer).unwrap_or_else(|_| json!(String::from_utf8_lossy(&answer)));
    if (200..300).contains(&status) {
        match &value {
            // CSV and SVG answers are printed as they are.
            Value::String(text) => print!("{text}"),
            other => println!("{}", serde_json::to_string_pretty(other)?),
        }
        Ok(())
    } else {
        bail!(
            "the switch refused ({status} {}): {}{}",
            value["code"].as_str().unwrap_or("?"),
            value["message"].as_str().unwrap_or(""),
            value["reason"]
                .as_str()
                .map(|r| format!(" [ISO reason {r}]"))
                .unwrap_or_default()
        )
    }
}
