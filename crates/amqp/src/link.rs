//! The switch's connection to the broker (a publishing channel in confirm mode, replaced on
//! every reconnect) and the [`QueueTransport`] that forwards payments and notifications through
//! it.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clearhouse_switch::config::SwitchConfig;
use clearhouse_switch::model::Participant;
use clearhouse_switch::outbound::{
    Decision, ForwardError, Notification, ParticipantTransport, QueuedNotifications, SWITCH_KEY_ID,
};
use clearhouse_switch::switch::PaymentView;
use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Channel, Confirmation};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::{queues, signed_headers, AmqpConfig, AmqpStatus, PUBLISH_METHOD};

/// Notifications per message (as in one HTTP notification request).
const NOTIFICATIONS_PER_MESSAGE_MAX: usize = 256;
/// How long one notification message is retried before it is dropped (status queries still
/// answer).
const NOTIFICATION_PUBLISH_WINDOW: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("not published before the deadline: {last}")]
    Deadline { last: String },
}

/// The switch's link to the broker.
pub struct Link {
    pub config: AmqpConfig,
    pub status: Arc<AmqpStatus>,
    channel: watch::Sender<Option<Channel>>,
}

impl Link {
    pub fn new(config: AmqpConfig) -> Arc<Link> {
        Arc::new(Link {
            config,
            status: Arc::new(AmqpStatus::default()),
            channel: watch::channel(None).0,
        })
    }

    /// The publishing channel of the current connection (none while disconnected).
    pub(crate) fn set_channel(&self, channel: Option<Channel>) {
        self.status
            .connected
            .store(channel.is_some(), Ordering::Relaxed);
        self.channel.send_replace(channel);
    }

    /// Publishes one persistent message and waits for the broker's confirm, retrying (any
    /// connection, backoff 20 to 500 ms) until `deadline`. A nack (queue full) or a return
    /// (no such queue) counts as not published.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
        deadline: Instant,
    ) -> Result<(), PublishError> {
        let mut receiver = self.channel.subscribe();
        let mut backoff = Duration::from_millis(20);
        let mut last = String::from("not connected to the broker");
        let properties = properties.with_delivery_mode(2);
        loop {
            if Instant::now() >= deadline {
                self.status
                    .publish_failures_total
                    .fetch_add(1, Ordering::Relaxed);
                return Err(PublishError::Deadline { last });
            }
            let channel = receiver.borrow_and_update().clone();
            if let Some(channel) = channel {
                let attempt = async {
                    channel
                        .basic_publish(
                            exchange.into(),
                            routing_key.into(),
                            BasicPublishOptions {
                                mandatory: true,
                                ..BasicPublishOptions::default()
                            },
                            body,
                            properties.clone(),
                        )
                        .await?
                        .await
                };
                match tokio::time::timeout_at(deadline, attempt).await {
                    Err(_) => last = "no confirm from the broker before the deadline".into(),
                    Ok(Ok(Confirmation::Ack(None) | Confirmation::NotRequested)) => {
                        self.status.published_total.fetch_add(1, Ordering::Relaxed);
                        return Ok(());
                    }
                    Ok(Ok(Confirmation::Ack(Some(returned)))) => {
                        last = format!("returned by the broker: {}", returned.reply_text)
                    }
                    Ok(Ok(Confirmation::Nack(_))) => {
                        last = "refused by the broker (queue full)".into()
                    }
                    Ok(Err(error)) => last = error.to_string(),
                }
            }
            let wake = (Instant::now() + backoff).min(deadline);
            // Wakes early when a new connection comes up.
            let _ = tokio::time::timeout_at(wake, receiver.changed()).await;
            backoff = (backoff * 2).min(Duration::from_millis(500));
        }
    }

    /// Publishes a message signed for `participant` to its queue `queue` (default exchange).
    pub async fn publish_signed(
        &self,
        participant: &Participant,
        queue: &str,
        body: &[u8],
        properties: BasicProperties,
        extra_headers: &[(&str, String)],
        deadline: Instant,
    ) -> Result<(), PublishError> {
        let secret = hex::decode(&participant.secret_hex).map_err(|_| PublishError::Deadline {
            last: "the participant's secret is not hex".into(),
        })?;
        let headers = signed_headers(
            SWITCH_KEY_ID,
            &secret,
            PUBLISH_METHOD,
            queue,
            body,
            extra_headers,
        );
        self.publish(
            "",
            queue,
            body,
            properties
                .with_headers(headers)
                .with_content_type("application/json".into()),
            deadline,
        )
        .await
    }
}

/// Forwards and notifications to participants over their queues.
pub struct QueueTransport {
    link: Arc<Link>,
    notifiers: Mutex<std::collections::HashMap<String, mpsc::Sender<Notification>>>,
    queue_max: usize,
    queued: QueuedNotifications,
    attempts_max: u32,
}

impl QueueTransport {
    pub fn new(link: Arc<Link>, config: &SwitchConfig) -> QueueTransport {
        QueueTransport {
            link,
            notifiers: Mutex::new(std::collections::HashMap::new()),
            queue_max: config.notification_queue_max,
            queued: QueuedNotifications::new(config.notification_queue_total_max),
            attempts_max: config.notification_attempts_max,
        }
    }

    async fn forward_queued(
        &self,
        creditor: &Participant,
        payment: &PaymentView,
        deadline: Instant,
    ) -> Result<Option<Decision>, ForwardError> {
        let body = serde_json::to_vec(payment).expect("payment serializes");
        let remaining_ms = deadline
            .saturating_duration_since(Instant::now())
            .as_millis()
            .max(1);
        // The forward expires with the payment's deadline: a creditor agent that reads its
        // queue late never sees a payment it can no longer accept.
        let properties = BasicProperties::default()
            .with_message_id(payment.payment_id.clone().into())
            .with_type(("forward").into())
            .with_expiration(remaining_ms.to_string().into());
        match self
            .link
            .publish_signed(
                creditor,
                &queues::forwards(&creditor.bic),
                &body,
                properties,
                &[],
                deadline,
            )
            .await
        {
            // Queued and confirmed: the creditor agent decides with the decision instruction.
            Ok(()) => Ok(None),
            Err(error) => {
                tracing::warn!(creditor = %creditor.bic, %error, "forward not queued before the deadline");
                Err(ForwardError::Unreachable)
            }
        }
    }
}

impl ParticipantTransport for QueueTransport {
    fn forward<'a>(
        &'a self,
        creditor: &'a Participant,
        payment: &'a PaymentView,
        deadline: Instant,
        _deadline_ns: u64,
    ) -> Pin<Box<dyn Future<Output = Result<Option<Decision>, ForwardError>> + Send + 'a>> {
        Box::pin(self.forward_queued(creditor, payment, deadline))
    }

    fn notify(&self, participant: &Participant, notification: Notification) {
        let mut notifiers = self.notifiers.lock().expect("notifiers");
        let sender = notifiers.entry(participant.bic.clone()).or_insert_with(|| {
            let (sender, receiver) = mpsc::channel(self.queue_max);
            tokio::spawn(notify_worker(
                self.link.clone(),
                participant.clone(),
                self.attempts_max,
                self.queued.clone(),
                receiver,
            ));
            sender
        });
        if !self.queued.offer(&participant.bic, sender, notification) {
            self.link
                .status
                .notifications_dropped_total
                .fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// One participant's notifications, in order, batched as on HTTP (a JSON array).
async fn notify_worker(
    link: Arc<Link>,
    participant: Participant,
    attempts_max: u32,
    queued: QueuedNotifications,
    mut receiver: mpsc::Receiver<Notification>,
) {
    let queue = queues::notifications(&participant.bic);
    let mut batch = Vec::with_capacity(NOTIFICATIONS_PER_MESSAGE_MAX);
    while let Some(first) = receiver.recv().await {
        batch.clear();
        batch.push(first);
        while batch.len() < NOTIFICATIONS_PER_MESSAGE_MAX {
            match receiver.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let body = serde_json::to_vec(&batch).expect("notifications serialize");
        // A stable id per content: a participant drops a message it has already seen.
        let id = hex::encode(clearhouse_switch::model::id128(&[&body]).to_be_bytes());
        let mut delivered = false;
        for _ in 0..attempts_max.max(1) {
            let properties = BasicProperties::default()
                .with_message_id(id.clone().into())
                .with_type("notifications".into());
            let deadline = Instant::now() + NOTIFICATION_PUBLISH_WINDOW;
            if link
                .publish_signed(&participant, &queue, &body, properties, &[], deadline)
                .await
                .is_ok()
            {
                delivered = true;
                break;
            }
        }
        if !delivered {
            link.status
                .notifications_dropped_total
                .fetch_add(batch.len() as u64, Ordering::Relaxed);
            tracing::warn!(bic = %participant.bic, count = batch.len(), "notifications not queued; dropped (status queries still answer)");
        }
        queued.release(batch.len());
    }
}
