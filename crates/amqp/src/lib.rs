//! clearhouse-amqp: participants connected over AMQP 0-9-1 (RabbitMQ) instead of HTTP.
//!
//! A participant whose endpoint is `amqp:` has four durable queues on the scheme's broker
//! (names in [`queues`]):
//! - `ch.in.<BIC>`: its instructions to the switch. It publishes to the fanout exchange of the
//!   same name, the only thing it may write (its broker user's permissions); the switch consumes
//!   with manual acks.
//! - `ch.fwd.<BIC>`: payments forwarded to it as creditor agent, to accept or reject.
//! - `ch.ntf.<BIC>`: notifications (final states, returns, recalls, liquidity alerts).
//! - `ch.ans.<BIC>`: the switch's answer to each instruction (`correlation_id` = its
//!   `message_id`).
//!
//! An instruction carries the same body and the same signature as the HTTP request it stands
//! for (headers `x-ch-method`, `x-ch-path` and the four `x-ch-*` signature headers): the
//! gateway checks the signature with the participant's secret, then runs the request through the
//! switch's own HTTP router in process, so validation, authorization, limits, idempotency and
//! the answers are those of HTTP. The inbound message is acknowledged to the broker only after
//! the answer is published and confirmed, and the answer is only produced once the switch has
//! made the instruction durable in its journal: a crash in between redelivers the instruction,
//! and the duplicate is answered the same (instructions are idempotent by their ids).
//!
//! Every message the switch publishes is persistent, confirmed by the broker, and signed with
//! the participant's secret (key id `switch`, method `PUBLISH`, path = the queue's name), so
//! whoever runs the broker can neither forge nor alter one.
//!
//! What this crate deliberately does not do: manage the broker's users (RabbitMQ has no AMQP
//! call for it; [`definitions`] writes a definitions file the operator imports), TLS to the
//! broker, or any other broker than RabbitMQ-compatible AMQP 0-9-1.

pub mod client;
pub mod definitions;
mod gateway;
mod link;
pub mod testing;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use lapin::types::{AMQPValue, FieldTable};
use serde::{Deserialize, Serialize};

pub use gateway::start;
pub use link::{Link, PublishError};

/// Header: the HTTP method an instruction stands for.
pub const HEADER_METHOD: &str = "x-ch-method";
/// Header: the HTTP path (and query) an instruction stands for.
pub const HEADER_PATH: &str = "x-ch-path";
/// Header on answers: the HTTP status the instruction got.
pub const HEADER_STATUS: &str = "x-ch-status";
/// The signed "method" of every message the switch publishes (its "path" is the queue name).
pub const PUBLISH_METHOD: &str = "PUBLISH";

/// Queue and exchange names of one participant.
pub mod queues {
    /// Instructions from the participant: a fanout exchange and the queue bound to it.
    pub fn inbound(bic: &str) -> String {
        format!("ch.in.{bic}")
    }
    /// Payments forwarded to the participant as creditor agent.
    pub fn forwards(bic: &str) -> String {
        format!("ch.fwd.{bic}")
    }
    /// Notifications to the participant.
    pub fn notifications(bic: &str) -> String {
        format!("ch.ntf.{bic}")
    }
    /// Answers to the participant's instructions.
    pub fn answers(bic: &str) -> String {
        format!("ch.ans.{bic}")
    }
}

/// The `[amqp]` section of the switch's configuration.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpConfig {
    /// The broker, as the switch's own user: `amqp://switch:PASSWORD@host:5672/VHOST`.
    pub url: String,
    /// Unacknowledged instructions per participant the switch works on at once.
    #[serde(default = "default_prefetch")]
    pub prefetch: u16,
    /// Messages a participant's queue holds at most; beyond, the broker refuses publishes
    /// (`x-overflow = reject-publish`: a nack to the publisher, nothing dropped silently).
    #[serde(default = "default_queue_length_max")]
    pub queue_length_max: u32,
    /// Bytes a participant's queue holds at most (same overflow rule).
    #[serde(default = "default_queue_bytes_max")]
    pub queue_bytes_max: u64,
    /// Oldest instruction (by its signed timestamp) the switch still acts on: one that waited
    /// longer in its queue is answered 401 `expired` and changes nothing.
    #[serde(default = "default_message_age_max_ms")]
    pub message_age_max_ms: u64,
}

fn default_prefetch() -> u16 {
    256
}
fn default_queue_length_max() -> u32 {
    100_000
}
fn default_queue_bytes_max() -> u64 {
    256 * 1024 * 1024
}
fn default_message_age_max_ms() -> u64 {
    3_600_000
}

impl AmqpConfig {
    /// Checks the values; the URL's form is checked when connecting.
    pub fn check(&self) -> Result<(), AmqpError> {
        if !self.url.starts_with("amqp://") {
            return Err(AmqpError::Config(
                "amqp.url must start with amqp:// (TLS to the broker is not supported)".into(),
            ));
        }
        if self.prefetch == 0 || self.queue_length_max == 0 || self.queue_bytes_max == 0 {
            return Err(AmqpError::Config(
                "amqp.prefetch, queue_length_max and queue_bytes_max must be above 0".into(),
            ));
        }
        if self.message_age_max_ms < 1_000 {
            return Err(AmqpError::Config(
                "amqp.message_age_max_ms must be at least 1000".into(),
            ));
        }
        Ok(())
    }

    /// The arguments every participant queue is declared with (the same on every declaration,
    /// or the broker refuses it as inequivalent).
    pub fn queue_arguments(&self) -> FieldTable {
        let mut arguments = FieldTable::default();
        arguments.insert(
            "x-max-length".into(),
            AMQPValue::LongLongInt(i64::from(self.queue_length_max)),
        );
        arguments.insert(
            "x-max-length-bytes".into(),
            AMQPValue::LongLongInt(self.queue_bytes_max.min(i64::MAX as u64) as i64),
        );
        arguments.insert(
            "x-overflow".into(),
            AMQPValue::LongString("reject-publish".into()),
        );
        arguments
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AmqpError {
    #[error("AMQP broker: {0}")]
    Broker(String),
    #[error("configuration: {0}")]
    Config(String),
    #[error("no answer within {0} ms")]
    Timeout(u64),
    #[error("message refused: {0}")]
    Refused(String),
}

impl From<lapin::Error> for AmqpError {
    fn from(error: lapin::Error) -> AmqpError {
        AmqpError::Broker(error.to_string())
    }
}

/// The broker password of a participant's user, derived from its HMAC secret (so nothing more
/// is stored or handed over at onboarding): hex of HMAC-SHA256(secret, "clearhouse amqp
/// password"), 32 digits. A participant computes it the same way.
pub fn participant_password(secret: &[u8]) -> String {
    use hmac::{Hmac, Mac};
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(b"clearhouse amqp password");
    hex::encode(&mac.finalize().into_bytes()[..16])
}

/// `amqp://host:port/vhost` with `user:password@` put in.
pub fn with_credentials(url: &str, user: &str, password: &str) -> Result<String, AmqpError> {
    let rest = url
        .strip_prefix("amqp://")
        .ok_or_else(|| AmqpError::Config(format!("{url}: not an amqp:// URL")))?;
    let rest = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    Ok(format!("amqp://{user}:{password}@{rest}"))
}

/// The virtual host an `amqp://` URL names (`/` when it names none; `%2f` is `/`).
pub fn vhost_of(url: &str) -> String {
    let rest = url.strip_prefix("amqp://").unwrap_or(url);
    match rest.split_once('/') {
        Some((_, vhost)) if !vhost.is_empty() => vhost.replace("%2f", "/").replace("%2F", "/"),
        _ => "/".to_string(),
    }
}

fn auth_nonce() -> String {
    clearhouse_switch::auth::new_nonce()
}

/// A text header of a message, if present.
pub fn header_text(properties: &lapin::BasicProperties, name: &str) -> Option<String> {
    let headers = properties.headers().as_ref()?;
    match headers.inner().get(name)? {
        AMQPValue::LongString(text) => Some(String::from_utf8_lossy(text.as_bytes()).into_owned()),
        AMQPValue::ShortString(text) => Some(text.as_str().to_string()),
        AMQPValue::LongUInt(n) => Some(n.to_string()),
        AMQPValue::LongLongInt(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Headers carrying a signature over (`method`, `path`, `body`) with `secret` under `key_id`,
/// plus `extra` text headers.
pub fn signed_headers(
    key_id: &str,
    secret: &[u8],
    method: &str,
    path: &str,
    body: &[u8],
    extra: &[(&str, String)],
) -> FieldTable {
    let mut table = FieldTable::default();
    for (name, value) in clearhouse_switch::auth::sign_request(key_id, secret, method, path, body) {
        table.insert(name.into(), AMQPValue::LongString(value.into()));
    }
    for (name, value) in extra {
        table.insert((*name).into(), AMQPValue::LongString(value.clone().into()));
    }
    table
}

/// The four signature headers of a message, as received (empty when absent).
pub(crate) struct SignedFields {
    key_id: String,
    timestamp: String,
    nonce: String,
    signature: String,
}

impl SignedFields {
    pub(crate) fn of(properties: &lapin::BasicProperties) -> SignedFields {
        use clearhouse_switch::auth;
        let get = |name| header_text(properties, name).unwrap_or_default();
        SignedFields {
            key_id: get(auth::HEADER_KEY_ID),
            timestamp: get(auth::HEADER_TIMESTAMP),
            nonce: get(auth::HEADER_NONCE),
            signature: get(auth::HEADER_SIGNATURE),
        }
    }

    pub(crate) fn headers(&self) -> clearhouse_switch::auth::SignedHeaders<'_> {
        clearhouse_switch::auth::SignedHeaders {
            key_id: &self.key_id,
            timestamp: &self.timestamp,
            nonce: &self.nonce,
            signature: &self.signature,
        }
    }
}

/// Checks a message the switch published to `queue` (signature with the participant's secret,
/// key id `switch`), as a participant does.
pub fn verify_from_switch(
    properties: &lapin::BasicProperties,
    secret: &[u8],
    queue: &str,
    body: &[u8],
) -> bool {
    let signed = SignedFields::of(properties);
    signed.key_id == clearhouse_switch::outbound::SWITCH_KEY_ID
        && clearhouse_switch::auth::verify_signature(
            &signed.headers(),
            secret,
            PUBLISH_METHOD,
            queue,
            body,
        )
        .is_ok()
}

/// What the AMQP side is doing, for `/metrics`.
#[derive(Default)]
pub struct AmqpStatus {
    pub connected: AtomicBool,
    pub connects_total: AtomicU64,
    pub instructions_total: AtomicU64,
    pub refused_total: AtomicU64,
    pub published_total: AtomicU64,
    pub publish_failures_total: AtomicU64,
    pub notifications_dropped_total: AtomicU64,
}

impl AmqpStatus {
    /// Prometheus text.
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write;
        let lines: [(&str, &str, u64); 7] = [
            (
                "clearhouse_amqp_connected",
                "gauge",
                u64::from(self.connected.load(Ordering::Relaxed)),
            ),
            (
                "clearhouse_amqp_connects_total",
                "counter",
                self.connects_total.load(Ordering::Relaxed),
            ),
            (
                "clearhouse_amqp_instructions_total",
                "counter",
                self.instructions_total.load(Ordering::Relaxed),
            ),
            (
                "clearhouse_amqp_refused_total",
                "counter",
                self.refused_total.load(Ordering::Relaxed),
            ),
            (
                "clearhouse_amqp_published_total",
                "counter",
                self.published_total.load(Ordering::Relaxed),
            ),
            (
                "clearhouse_amqp_publish_failures_total",
                "counter",
                self.publish_failures_total.load(Ordering::Relaxed),
            ),
            (
                "clearhouse_amqp_notifications_dropped_total",
                "counter",
                self.notifications_dropped_total.load(Ordering::Relaxed),
            ),
        ];
        for (name, kind, value) in lines {
            let _ = writeln!(out, "# TYPE {name} {kind}\n{name} {value}");
        }
    }
}

/// The switch's side, started before the switch (its transport) and wired to it after.
pub struct Amqp {
    pub link: Arc<Link>,
    pub transport: Arc<link::QueueTransport>,
}

impl Amqp {
    /// Connects in the background (and reconnects, with backoff, for as long as the process
    /// runs); the transport publishes as soon as a connection is up.
    pub fn new(
        config: AmqpConfig,
        switch_config: &clearhouse_switch::config::SwitchConfig,
    ) -> Result<Amqp, AmqpError> {
        config.check()?;
        let link = Link::new(config);
        let transport = Arc::new(link::QueueTransport::new(link.clone(), switch_config));
        Ok(Amqp { link, transport })
    }
}
