//! The participant's side of the queues: what a bank's middleware does, used by the simulated
//! banks (`clearhouse sim-banks --amqp`), the benchmark and the tests. It sends instructions to
//! its exchange and matches the switch's answers by correlation id; it takes forwarded payments
//! and notifications off its queues, checking the switch's signature on each.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clearhouse_switch::auth;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use tokio::sync::oneshot;

use crate::{
    header_text, participant_password, queues, signed_headers, verify_from_switch,
    with_credentials, AmqpError, HEADER_METHOD, HEADER_PATH, HEADER_STATUS,
};

/// How long a publish waits for the broker's confirm.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);
/// Answers awaited at once at most (a bound on the map of pending requests).
const PENDING_MAX: usize = 65_536;

/// The switch's answer to one instruction.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
}

/// One participant connected to the broker as its own user.
pub struct AmqpParticipant {
    pub bic: String,
    key_id: String,
    secret: Vec<u8>,
    connection: Connection,
    channel: Channel,
    pending: Arc<Mutex<HashMap<String, oneshot::Sender<Answer>>>>,
    /// Answers whose signature did not verify (dropped).
    pub bad_signatures: Arc<AtomicU64>,
}

impl AmqpParticipant {
    /// Connects as `bic` (password derived from its secret) to `url`
    /// (`amqp://host:port/vhost`) and starts taking its answers.
    pub async fn connect(
        url: &str,
        bic: &str,
        secret: &[u8],
    ) -> Result<AmqpParticipant, AmqpError> {
        Self::connect_with(url, bic, secret, true).await
    }

    /// [`AmqpParticipant::connect`], taking the answers queue or not. The answers to a
    /// participant's instructions are spread over every consumer of `ch.ans.<BIC>`: only the
    /// system that sends instructions and waits for their answers takes it (a creditor agent's
    /// process that only sends decisions does not).
    pub async fn connect_with(
        url: &str,
        bic: &str,
        secret: &[u8],
        take_answers: bool,
    ) -> Result<AmqpParticipant, AmqpError> {
        let url = with_credentials(url, bic, &participant_password(secret))?;
        let connection = Connection::connect(
            &url,
            ConnectionProperties::default().with_connection_name(bic.into()),
        )
        .await?;
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let participant = AmqpParticipant {
            bic: bic.to_string(),
            key_id: format!("{bic}-1"),
            secret: secret.to_vec(),
            connection,
            channel,
            pending: Arc::new(Mutex::new(HashMap::new())),
            bad_signatures: Arc::new(AtomicU64::new(0)),
        };
        if take_answers {
            participant.take_answers().await?;
        }
        Ok(participant)
    }

    /// A consumer of `queue` on a channel of its own, at most `prefetch` unacknowledged.
    async fn consume(&self, queue: &str, prefetch: u16) -> Result<lapin::Consumer, AmqpError> {
        let channel = self.connection.create_channel().await?;
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await?;
        Ok(channel
            .basic_consume(
                queue.into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?)
    }

    async fn take_answers(&self) -> Result<(), AmqpError> {
        let queue = queues::answers(&self.bic);
        let mut consumer = self.consume(&queue, 1024).await?;
        let pending = self.pending.clone();
        let secret = self.secret.clone();
        let bad = self.bad_signatures.clone();
        tokio::spawn(async move {
            while let Some(Ok(delivery)) = consumer.next().await {
                if verify_from_switch(&delivery.properties, &secret, &queue, &delivery.data) {
                    let id = delivery
                        .properties
                        .correlation_id()
                        .as_ref()
                        .map(|c| c.as_str().to_string())
                        .unwrap_or_default();
                    let status = header_text(&delivery.properties, HEADER_STATUS)
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(0);
                    let waiter = pending.lock().expect("pending").remove(&id);
                    if let Some(waiter) = waiter {
                        let _ = waiter.send(Answer {
                            status,
                            body: delivery.data.clone(),
                        });
                    }
                } else {
                    bad.fetch_add(1, Ordering::Relaxed);
                }
                let _ = delivery.ack(BasicAckOptions::default()).await;
            }
        });
        Ok(())
    }

    /// Publishes an instruction (the HTTP request `method path` with `body`, signed as on HTTP)
    /// to `exchange` (normally its own, `ch.in.<BIC>`), with `message_id`; waits for the
    /// broker's confirm.
    pub async fn publish_instruction(
        &self,
        exchange: &str,
        message_id: &str,
        method: &str,
        path: &str,
        body: &[u8],
        content_type: &str,
    ) -> Result<(), AmqpError> {
        let headers = signed_headers(
            &self.key_id,
            &self.secret,
            method,
            path,
            body,
            &[(HEADER_METHOD, method.into()), (HEADER_PATH, path.into())],
        );
        self.publish_raw(exchange, message_id, body, content_type, headers)
            .await
    }

    /// Publishes a message as it is (the tests forge with it).
    pub async fn publish_raw(
        &self,
        exchange: &str,
        message_id: &str,
        body: &[u8],
        content_type: &str,
        headers: FieldTable,
    ) -> Result<(), AmqpError> {
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_message_id(message_id.into())
            .with_user_id(self.bic.clone().into())
            .with_content_type(content_type.into())
            .with_headers(headers);
        let publish = async {
            self.channel
                .basic_publish(
                    exchange.into(),
                    "".into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    body,
                    properties,
                )
                .await?
                .await
        };
        let confirmation = tokio::time::timeout(CONFIRM_TIMEOUT, publish)
            .await
            .map_err(|_| AmqpError::Timeout(CONFIRM_TIMEOUT.as_millis() as u64))??;
        match confirmation {
            Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
            Confirmation::Ack(Some(returned)) => Err(AmqpError::Refused(format!(
                "returned: {}",
                returned.reply_text
            ))),
            Confirmation::Nack(_) => Err(AmqpError::Refused("nack (queue full)".into())),
        }
    }

    /// Sends an instruction to its own exchange and waits up to `timeout` for the answer.
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        body: &[u8],
        content_type: &str,
        timeout: Duration,
    ) -> Result<Answer, AmqpError> {
        let message_id = auth::new_nonce();
        self.request_with_id(&message_id, method, path, body, content_type, timeout)
            .await
    }

    /// [`AmqpParticipant::request`] with a given message id (a resend uses the same one).
    pub async fn request_with_id(
        &self,
        message_id: &str,
        method: &str,
        path: &str,
        body: &[u8],
        content_type: &str,
        timeout: Duration,
    ) -> Result<Answer, AmqpError> {
        let (sender, receiver) = oneshot::channel();
        {
            let mut pending = self.pending.lock().expect("pending");
            if pending.len() >= PENDING_MAX {
                return Err(AmqpError::Refused(
                    "too many instructions awaiting answers".into(),
                ));
            }
            pending.insert(message_id.to_string(), sender);
        }
        let sent = self
            .publish_instruction(
                &queues::inbound(&self.bic),
                message_id,
                method,
                path,
                body,
                content_type,
            )
            .await;
        if let Err(error) = sent {
            self.pending.lock().expect("pending").remove(message_id);
            return Err(error);
        }
        match tokio::time::timeout(timeout, receiver).await {
            Ok(Ok(answer)) => Ok(answer),
            _ => {
                self.pending.lock().expect("pending").remove(message_id);
                Err(AmqpError::Timeout(timeout.as_millis() as u64))
            }
        }
    }

    /// Takes forwarded payments off its queue: `decide` gets each payment's JSON (switch
    /// signature checked) and returns the decision body (`{"status":"ACCP"}` or
    /// `{"status":"RJCT","reason":"AC04"}`), or `None` to stay silent. The decision is sent as
    /// the decision instruction; the forward is acknowledged once that is confirmed.
    pub async fn serve_forwards<F>(
        self: &Arc<Self>,
        prefetch: u16,
        decide: F,
    ) -> Result<(), AmqpError>
    where
        F: Fn(&serde_json::Value) -> Option<serde_json::Value> + Send + Sync + 'static,
    {
        let queue = queues::forwards(&self.bic);
        let mut consumer = self.consume(&queue, prefetch).await?;
        let me = self.clone();
        let decide = Arc::new(decide);
        tokio::spawn(async move {
            while let Some(Ok(delivery)) = consumer.next().await {
                let me = me.clone();
                let decide = decide.clone();
                let queue = queue.clone();
                tokio::spawn(async move {
                    if !verify_from_switch(&delivery.properties, &me.secret, &queue, &delivery.data)
                    {
                        me.bad_signatures.fetch_add(1, Ordering::Relaxed);
                        let _ = delivery.ack(BasicAckOptions::default()).await;
                        return;
                    }
                    let payment: serde_json::Value =
                        serde_json::from_slice(&delivery.data).unwrap_or_default();
                    if let (Some(decision), Some(id)) =
                        (decide(&payment), payment["payment_id"].as_str())
                    {
                        let path = format!("/v1/payments/{id}/decision");
                        let body = decision.to_string();
                        let _ = me
                            .publish_instruction(
                                &queues::inbound(&me.bic),
                                &auth::new_nonce(),
                                "POST",
                                &path,
                                body.as_bytes(),
                                "application/json",
                            )
                            .await;
                    }
                    let _ = delivery.ack(BasicAckOptions::default()).await;
                });
            }
        });
        Ok(())
    }

    /// Takes notifications off its queue, counting them into `count` (signature checked).
    pub async fn take_notifications(&self, count: Arc<AtomicU64>) -> Result<(), AmqpError> {
        let queue = queues::notifications(&self.bic);
        let mut consumer = self.consume(&queue, 256).await?;
        let secret = self.secret.clone();
        let bad = self.bad_signatures.clone();
        tokio::spawn(async move {
            while let Some(Ok(delivery)) = consumer.next().await {
                if verify_from_switch(&delivery.properties, &secret, &queue, &delivery.data) {
                    let n = serde_json::from_slice::<Vec<serde_json::Value>>(&delivery.data)
                        .map_or(0, |list| list.len() as u64);
                    count.fetch_add(n, Ordering::Relaxed);
                } else {
                    bad.fetch_add(1, Ordering::Relaxed);
                }
                let _ = delivery.ack(BasicAckOptions::default()).await;
            }
        });
        Ok(())
    }

    /// Whether the connection to the broker is still up (a participant reconnects when not).
    pub fn is_connected(&self) -> bool {
        self.connection.status().connected()
    }

    /// Closes the connection.
    pub async fn close(&self) {
        let _ = self.connection.close(200, "bye".into()).await;
    }
}
