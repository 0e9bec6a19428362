//! The switch's inbound side: connects (and reconnects), declares each AMQP participant's
//! exchange and queues, consumes its instructions, checks them, runs them through the switch's
//! HTTP router in process, publishes the answer, and only then acknowledges the instruction.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use clearhouse_switch::auth;
use clearhouse_switch::switch::Switch;
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, ConfirmSelectOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use tokio::time::Instant;
use tower::ServiceExt;

use crate::link::Link;
use crate::{
    header_text, queues, AmqpError, SignedFields, HEADER_METHOD, HEADER_PATH, HEADER_STATUS,
};

/// Largest answer body read back from the router.
const ANSWER_BYTES_MAX: usize = 4 * 1024 * 1024;
/// How long an answer is retried before the instruction is handed back to the broker
/// (redelivered later, answered the same).
const ANSWER_PUBLISH_WINDOW: Duration = Duration::from_secs(10);
/// How often the participant list is looked at for new AMQP participants.
const SYNC_EVERY: Duration = Duration::from_millis(500);
/// Retries of an instruction the switch answered 429 or 503 (overloaded) before that answer is
/// sent as it is.
const BUSY_RETRIES_MAX: u32 = 5;
/// Waits of 500 ms for the switch's replay guard after a restart (see [`Context::run`]).
const RESTART_WAITS_MAX: u32 = 240;
/// How far an instruction's timestamp may lead the switch's clock.
const LEAD_MS_MAX: u64 = 30_000;

/// Starts the gateway: a task that keeps a connection to the broker, declares and consumes
/// every AMQP participant's instruction queue, and serves the instructions through `router`.
pub fn start(link: Arc<Link>, switch: Arc<Switch>, router: Router) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(100);
        loop {
            match session(&link, &switch, &router).await {
                Ok(()) => backoff = Duration::from_millis(100),
                Err(error) => {
                    tracing::warn!(%error, retry_in_ms = backoff.as_millis() as u64, "AMQP broker link down; forwards to AMQP participants wait, then end AB08");
                }
            }
            link.set_channel(None);
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    })
}

/// One connection's life: returns when it breaks.
async fn session(link: &Arc<Link>, switch: &Arc<Switch>, router: &Router) -> Result<(), AmqpError> {
    let connection = Connection::connect(
        &link.config.url,
        ConnectionProperties::default().with_connection_name("clearhouse-switch".into()),
    )
    .await?;
    link.status.connects_total.fetch_add(1, Ordering::Relaxed);
    let publishing = connection.create_channel().await?;
    publishing
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let answers = connection.create_channel().await?;
    answers
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    link.set_channel(Some(publishing));
    tracing::info!("connected to the AMQP broker");
    let mut consuming: BTreeSet<String> = BTreeSet::new();
    let mut consumers = tokio::task::JoinSet::new();
    loop {
        if !connection.status().connected() {
            return Err(AmqpError::Broker("connection lost".into()));
        }
        while let Some(done) = consumers.try_join_next() {
            if let Ok(Err(error)) = done {
                return Err(error);
            }
        }
        let amqp: Vec<_> = switch
            .participants()
            .values()
            .filter(|p| p.over_amqp() && !consuming.contains(&p.bic))
            .map(|p| p.bic.clone())
            .collect();
        for bic in amqp {
            let channel = connection.create_channel().await?;
            declare(&channel, link, &bic).await?;
            channel
                .basic_qos(link.config.prefetch, BasicQosOptions::default())
                .await?;
            let consumer = channel
                .basic_consume(
                    queues::inbound(&bic).into(),
                    format!("switch-{bic}").into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            tracing::info!(%bic, "consuming the participant's instructions");
            consuming.insert(bic.clone());
            let context = Arc::new(Context {
                link: link.clone(),
                switch: switch.clone(),
                router: router.clone(),
                bic,
            });
            consumers.spawn(consume(context, consumer));
        }
        tokio::time::sleep(SYNC_EVERY).await;
    }
}

/// The participant's exchange and four queues (idempotent: the same arguments every time).
async fn declare(channel: &Channel, link: &Link, bic: &str) -> Result<(), AmqpError> {
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    for queue in [
        queues::inbound(bic),
        queues::forwards(bic),
        queues::notifications(bic),
        queues::answers(bic),
    ] {
        channel
            .queue_declare(queue.into(), durable, link.config.queue_arguments())
            .await?;
    }
    channel
        .exchange_declare(
            queues::inbound(bic).into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_bind(
            queues::inbound(bic).into(),
            queues::inbound(bic).into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok(())
}

struct Context {
    link: Arc<Link>,
    switch: Arc<Switch>,
    router: Router,
    bic: String,
}

/// Consumes one participant's instructions; each is served in its own task (at most `prefetch`
/// unacknowledged at once, the broker's limit).
async fn consume(context: Arc<Context>, mut consumer: lapin::Consumer) -> Result<(), AmqpError> {
    while let Some(delivery) = consumer.next().await {
        let delivery = delivery?;
        let context = context.clone();
        tokio::spawn(async move { context.serve(delivery).await });
    }
    Err(AmqpError::Broker(format!(
        "the consumer of {} ended",
        queues::inbound(&context.bic)
    )))
}

/// An answer to an instruction: HTTP status and body.
struct Answer {
    status: u16,
    body: Vec<u8>,
    content_type: String,
}

impl Answer {
    fn refused(status: u16, code: &str, message: &str) -> Answer {
        Answer {
            status,
            body: serde_json::json!({"code": code, "message": message})
                .to_string()
                .into_bytes(),
            content_type: "application/json".into(),
        }
    }
}

impl Context {
    async fn serve(&self, delivery: Delivery) {
        let properties = &delivery.properties;
        let message_id = properties
            .message_id()
            .as_ref()
            .map(|m| m.as_str().to_string())
            .unwrap_or_default();
        let method = header_text(properties, HEADER_METHOD).unwrap_or_default();
        let path = header_text(properties, HEADER_PATH).unwrap_or_default();
        self.link
            .status
            .instructions_total
            .fetch_add(1, Ordering::Relaxed);
        let answer = match self.check(&delivery, &message_id, &method, &path) {
            Ok((secret, key_id)) => self.run(&method, &path, &delivery, &secret, &key_id).await,
            Err(refused) => {
                self.link
                    .status
                    .refused_total
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(bic = %self.bic, status = refused.status, answer = %String::from_utf8_lossy(&refused.body), "instruction refused");
                refused
            }
        };
        let participant = self.switch.participants().get(&self.bic).cloned();
        let published = match participant {
            Some(participant) => {
                let properties = BasicProperties::default()
                    .with_correlation_id(message_id.into())
                    .with_type("answer".into());
                self.link
                    .publish_signed(
                        &participant,
                        &queues::answers(&self.bic),
                        &answer.body,
                        properties,
                        &[
                            (HEADER_STATUS, answer.status.to_string()),
                            (HEADER_METHOD, method),
                            (HEADER_PATH, path),
                            ("content-type", answer.content_type),
                        ],
                        Instant::now() + ANSWER_PUBLISH_WINDOW,
                    )
                    .await
                    .is_ok()
            }
            None => false,
        };
        // Acknowledged only once the answer is confirmed by the broker; otherwise back to the
        // queue, served again later (the same answer: instructions are idempotent).
        if published {
            let _ = delivery.ack(BasicAckOptions::default()).await;
        } else {
            let _ = delivery
                .nack(BasicNackOptions {
                    requeue: true,
                    ..BasicNackOptions::default()
                })
                .await;
        }
    }

    /// Checks where an instruction comes from and its signature; returns the participant's
    /// secret and key id.
    fn check(
        &self,
        delivery: &Delivery,
        message_id: &str,
        method: &str,
        path: &str,
    ) -> Result<(Vec<u8>, String), Answer> {
        let properties = &delivery.properties;
        if message_id.is_empty() || message_id.len() > 128 {
            return Err(Answer::refused(
                400,
                "message_id",
                "an instruction needs a message_id of 1 to 128 characters (its answer's correlation_id)",
            ));
        }
        let body_max = self.switch.config.body_bytes_max;
        if delivery.data.len() > body_max {
            return Err(Answer::refused(
                413,
                "body_too_large",
                &format!("the body is larger than {body_max} bytes"),
            ));
        }
        // The broker checks user_id against the publisher's login; its absence is refused here,
        // so the queue's owner published it.
        let user = properties.user_id().as_ref().map(|u| u.as_str());
        if user != Some(self.bic.as_str()) {
            return Err(Answer::refused(
                401,
                "unauthorized",
                "the user_id property must name the publishing participant",
            ));
        }
        if !matches!(method, "GET" | "POST" | "PATCH") || !path.starts_with("/v1/") {
            return Err(Answer::refused(
                400,
                "bad_instruction",
                "x-ch-method must be GET, POST or PATCH and x-ch-path a /v1/ path",
            ));
        }
        let participant = self
            .switch
            .participants()
            .get(&self.bic)
            .cloned()
            .ok_or_else(|| Answer::refused(401, "unauthorized", "unknown participant"))?;
        let signed = SignedFields::of(properties);
        let signed = signed.headers();
        if signed.key_id != participant.key_id {
            return Err(Answer::refused(
                401,
                "unauthorized",
                "the key id is not the queue owner's",
            ));
        }
        let secret = hex::decode(&participant.secret_hex)
            .map_err(|_| Answer::refused(401, "unauthorized", "unknown key"))?;
        if let Err(error) = auth::verify_signature(&signed, &secret, method, path, &delivery.data) {
            return Err(Answer::refused(401, "unauthorized", &error.to_string()));
        }
        let now = auth::now_ms();
        let signed_at: u64 = signed.timestamp.parse().unwrap_or(0);
        if signed_at.saturating_add(self.link.config.message_age_max_ms) < now
            || signed_at > now.saturating_add(LEAD_MS_MAX)
        {
            return Err(Answer::refused(
                401,
                "expired",
                &format!(
                    "signed at {signed_at} ms, now {now} ms: older than {} ms or ahead of the switch's clock",
                    self.link.config.message_age_max_ms
                ),
            ));
        }
        Ok((secret, participant.key_id))
    }

    /// Runs a checked instruction through the switch's router, as the same participant's HTTP
    /// request (signed afresh, so the router's own checks and limits apply unchanged).
    async fn run(
        &self,
        method: &str,
        path: &str,
        delivery: &Delivery,
        secret: &[u8],
        participant_key: &str,
    ) -> Answer {
        let content_type = delivery
            .properties
            .content_type()
            .as_ref()
            .map_or("application/json", |c| c.as_str())
            .to_string();
        let mut attempt = 0;
        let mut restart_waits = 0;
        loop {
            let mut request = axum::http::Request::builder()
                .method(method)
                .uri(path)
                .header("content-type", &content_type)
                .header("content-length", delivery.data.len());
            for (name, value) in
                auth::sign_request(participant_key, secret, method, path, &delivery.data)
            {
                request = request.header(name, value);
            }
            let Ok(request) = request.body(axum::body::Body::from(delivery.data.clone())) else {
                return Answer::refused(400, "bad_instruction", "the path is not a valid URI");
            };
            let response = match self.router.clone().oneshot(request).await {
                Ok(response) => response,
                Err(never) => match never {},
            };
            let status = response.status().as_u16();
            let content_type = response
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("application/json")
                .to_string();
            let body = axum::body::to_bytes(response.into_body(), ANSWER_BYTES_MAX)
                .await
                .map(|b| b.to_vec())
                .unwrap_or_default();
            if matches!(status, 429 | 503) && attempt < BUSY_RETRIES_MAX {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
                continue;
            }
            // Just after a restart the switch refuses requests signed before it started serving
            // plus the clock lead it allows (its replay guard across restarts); the instruction
            // itself was checked above, so it is signed afresh once that moment has passed.
            if status == 401
                && restart_waits < RESTART_WAITS_MAX
                && serde_json::from_slice::<serde_json::Value>(&body)
                    .is_ok_and(|b| b["code"] == "signed_before_start")
            {
                restart_waits += 1;
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            return Answer {
                status,
                body,
                content_type,
            };
        }
    }
}
