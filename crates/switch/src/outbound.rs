//! Calls from the switch to participants: forwarding payments to creditor agents and delivering
//! notifications. One trait, [`ParticipantTransport`], is all the payment lifecycle knows; signed
//! HTTP ([`HttpTransport`]: bounded concurrent calls per participant, queued notifications per
//! participant, bounded attempts, in order per participant) is its first implementation, the
//! deterministic simulator's network the second, and a message-queue transport (AMQP) slots in
//! beside them as `Transport::Custom`.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, Semaphore};

use crate::api::{PaymentView, PositionView, RecallNotice, ReturnView};
use crate::auth;
use crate::config::SwitchConfig;
use crate::model::{is_status_reason_code, Participant};

/// The key id the switch signs its own requests with (the secret is the participant's).
pub const SWITCH_KEY_ID: &str = "switch";

/// Largest answer read from a participant.
const ANSWER_BYTES_MAX: usize = 16 * 1024;
/// Notifications sent in one request.
const NOTIFICATIONS_PER_REQUEST_MAX: usize = 256;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Accept,
    /// With an ISO 20022 status reason code.
    Reject(String),
}

/// A creditor agent's answer (or a later decision): `{"status":"ACCP"}` or
/// `{"status":"RJCT","reason":"AC04"}`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecisionBody {
    pub status: String,
    #[serde(default)]
    pub reason: Option<String>,
}

impl DecisionBody {
    pub fn decision(&self) -> Option<Decision> {
        match (self.status.as_str(), &self.reason) {
            ("ACCP" | "ACTC" | "ACSP", None) => Some(Decision::Accept),
            ("RJCT", Some(reason)) if is_status_reason_code(reason) => {
                Some(Decision::Reject(reason.clone()))
            }
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardError {
    /// Never reached the creditor agent before the deadline (AB08).
    Unreachable,
    /// Reached it, but no usable answer before the deadline (AB05).
    NoAnswer,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Notification {
    Payment(Box<PaymentView>),
    Return(Box<ReturnView>),
    LiquidityAlert(PositionView),
    Recall(Box<RecallNotice>),
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// How the switch reaches participants. The payment lifecycle talks only to this trait: it
/// forwards a payment and waits for the creditor agent's answer until the deadline, and queues
/// notifications; how they travel (signed HTTP, the simulator's network, a message queue) is
/// the implementation's business. Implementations bound their own concurrency, queues and
/// retries, and never block the caller of `notify`.
pub trait ParticipantTransport: Send + Sync + 'static {
    /// Forwards `payment` to its creditor agent, retrying until `deadline` (`deadline_ns` on the
    /// switch's clock). `Ok(None)`: the creditor agent will decide later (the decision call).
    fn forward<'a>(
        &'a self,
        creditor: &'a Participant,
        payment: &'a PaymentView,
        deadline: tokio::time::Instant,
        deadline_ns: u64,
    ) -> Pin<Box<dyn Future<Output = Result<Option<Decision>, ForwardError>> + Send + 'a>>;

    /// Queues a notification for a participant; delivered in order, bounded, never blocking.
    fn notify(&self, participant: &Participant, notification: Notification);
}

/// Which transport to participants the switch starts with: signed HTTP (production), the
/// deterministic simulator's bounded channel to simulated participants (which decides what is
/// lost, late, duplicated or reordered), or any other [`ParticipantTransport`].
#[derive(Clone, Default)]
pub enum Transport {
    #[default]
    Http,
    Simulated(mpsc::Sender<SimCall>),
    Custom(Arc<dyn ParticipantTransport>),
    /// Signed HTTP for participants with an http:// endpoint, the given message-queue
    /// transport for those whose endpoint is `amqp:`.
    HttpAndQueues(Arc<dyn ParticipantTransport>),
}

/// A call to a simulated participant.
pub enum SimCall {
    /// A payment forwarded to its creditor agent; `answer` is its synchronous answer (dropping
    /// it unanswered is a lost message: the switch waits until the deadline).
    Forward {
        payment: Box<PaymentView>,
        answer: tokio::sync::oneshot::Sender<SimAnswer>,
    },
    Notify {
        participant: String,
        notification: Notification,
    },
}

/// A simulated creditor agent's synchronous answer to a forward.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SimAnswer {
    /// 200 with a decision.
    Decided(Decision),
    /// 202: decides later with the decision call.
    Later,
    /// The connection was refused until the deadline.
    Unreachable,
}

/// The switch's side of the transport: forwards and notifications go through whichever
/// [`ParticipantTransport`] it was started with.
pub struct Outbound {
    transport: Arc<dyn ParticipantTransport>,
    /// For participants whose endpoint is `amqp:` (when the switch runs a queue transport).
    queues: Option<Arc<dyn ParticipantTransport>>,
}

impl Outbound {
    pub fn new(
        config: &SwitchConfig,
        registry: Registry,
        transport: Transport,
        clock: crate::clock::Clock,
    ) -> Outbound {
        let mut queues = None;
        let transport: Arc<dyn ParticipantTransport> = match transport {
            Transport::Http => Arc::new(HttpTransport::new(config, registry)),
            Transport::Simulated(sender) => Arc::new(SimulatedTransport { sender, clock }),
            Transport::Custom(transport) => transport,
            Transport::HttpAndQueues(mq) => {
                queues = Some(mq);
                Arc::new(HttpTransport::new(config, registry))
            }
        };
        Outbound { transport, queues }
    }

    /// The transport that reaches `participant`.
    fn to(&self, participant: &Participant) -> &Arc<dyn ParticipantTransport> {
        match &self.queues {
            Some(queues) if participant.over_amqp() => queues,
            _ => &self.transport,
        }
    }

    /// See [`ParticipantTransport::forward`].
    pub async fn forward(
        &self,
        creditor: &Participant,
        payment: &PaymentView,
        deadline: tokio::time::Instant,
        deadline_ns: u64,
    ) -> Result<Option<Decision>, ForwardError> {
        self.to(creditor)
            .forward(creditor, payment, deadline, deadline_ns)
            .await
    }

    /// See [`ParticipantTransport::notify`].
    pub fn notify(&self, participant: &Participant, notification: Notification) {
        self.to(participant).notify(participant, notification)
    }
}

/// The simulator's network: every call is a message on a bounded channel; the simulator decides
/// what arrives, when, and what comes back.
struct SimulatedTransport {
    sender: mpsc::Sender<SimCall>,
    clock: crate::clock::Clock,
}

impl ParticipantTransport for SimulatedTransport {
    fn forward<'a>(
        &'a self,
        _creditor: &'a Participant,
        payment: &'a PaymentView,
        _deadline: tokio::time::Instant,
        deadline_ns: u64,
    ) -> Pin<Box<dyn Future<Output = Result<Option<Decision>, ForwardError>> + Send + 'a>> {
        Box::pin(async move {
            let (answer, answered) = tokio::sync::oneshot::channel();
            let call = SimCall::Forward {
                payment: Box::new(payment.clone()),
                answer,
            };
            if self.sender.try_send(call).is_err() {
                // The simulated network is full: as a refused connection, until the deadline.
                self.clock.sleep_until_ns(deadline_ns).await;
                return Err(ForwardError::Unreachable);
            }
            match self.clock.timeout_at_ns(deadline_ns, answered).await {
                Some(Ok(SimAnswer::Decided(decision))) => Ok(Some(decision)),
                Some(Ok(SimAnswer::Later)) => Ok(None),
                Some(Ok(SimAnswer::Unreachable)) => {
                    self.clock.sleep_until_ns(deadline_ns).await;
                    Err(ForwardError::Unreachable)
                }
                // Lost on the way (or its answer was): nothing more until the deadline.
                Some(Err(_)) => {
                    self.clock.sleep_until_ns(deadline_ns).await;
                    Err(ForwardError::NoAnswer)
                }
                None => Err(ForwardError::NoAnswer),
            }
        })
    }

    fn notify(&self, participant: &Participant, notification: Notification) {
        let call = SimCall::Notify {
            participant: participant.bic.clone(),
            notification,
        };
        if self.sender.try_send(call).is_err() {
            tracing::warn!(bic = %participant.bic, "simulated network full; notification dropped");
        }
    }
}

/// Signed HTTP to `{endpoint}/payments` and `{endpoint}/notifications`: bounded concurrent
/// calls per participant, one ordered, bounded notification queue and worker per participant,
/// retries with backoff until the deadline (forwards) or for a bounded number of attempts
/// (notifications).
pub struct HttpTransport {
    client: HttpClient,
    registry: Registry,
    permits: Mutex<FxHashMap<String, Arc<Semaphore>>>,
    notifiers: Mutex<FxHashMap<String, mpsc::Sender<Notification>>>,
    per_participant_max: usize,
    call_timeout: Duration,
    queue_max: usize,
    queued: QueuedNotifications,
    attempts_max: u32,
}

enum CallError {
    Connect,
    Other,
}

impl HttpTransport {
    pub fn new(config: &SwitchConfig, registry: Registry) -> HttpTransport {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(2)));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(config.outbound_per_participant_max * 4)
            .build(connector);
        HttpTransport {
            client,
            registry,
            permits: Mutex::new(FxHashMap::default()),
            notifiers: Mutex::new(FxHashMap::default()),
            per_participant_max: config.outbound_per_participant_max,
            call_timeout: Duration::from_millis(config.outbound_call_timeout_ms),
            queue_max: config.notification_queue_max,
            queued: QueuedNotifications::new(config.notification_queue_total_max),
            attempts_max: config.notification_attempts_max,
        }
    }

    fn permits(&self, bic: &str) -> Arc<Semaphore> {
        self.permits
            .lock()
            .expect("permits")
            .entry(bic.to_string())
            .or_insert_with(|| Arc::new(Semaphore::new(self.per_participant_max)))
            .clone()
    }

    async fn call(
        client: &HttpClient,
        participant: &Participant,
        path_suffix: &str,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<(u16, Bytes), CallError> {
        let url = format!("{}{}", participant.endpoint, path_suffix);
        let uri: hyper::Uri = url.parse().map_err(|_| CallError::Connect)?;
        let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
        let secret = hex::decode(&participant.secret_hex).map_err(|_| CallError::Connect)?;
        let mut builder = hyper::Request::post(uri).header("content-type", "application/json");
        for (name, value) in auth::sign_request(SWITCH_KEY_ID, &secret, "POST", &path, &body) {
            builder = builder.header(name, value);
        }
        let request = builder
            .body(Full::new(Bytes::from(body)))
            .map_err(|_| CallError::Other)?;
        let response = match tokio::time::timeout(timeout, client.request(request)).await {
            Err(_) => return Err(CallError::Other),
            Ok(Err(error)) if error.is_connect() => return Err(CallError::Connect),
            Ok(Err(_)) => return Err(CallError::Other),
            Ok(Ok(response)) => response,
        };
        let status = response.status().as_u16();
        let body = Limited::new(response.into_body(), ANSWER_BYTES_MAX);
        let bytes = tokio::time::timeout(timeout, body.collect())
            .await
            .map_err(|_| CallError::Other)?
            .map_err(|_| CallError::Other)?
            .to_bytes();
        Ok((status, bytes))
    }

    async fn forward_http(
        &self,
        creditor: &Participant,
        payment: &PaymentView,
        deadline: tokio::time::Instant,
    ) -> Result<Option<Decision>, ForwardError> {
        let body = serde_json::to_vec(payment).expect("payment serializes");
        let permits = self.permits(&creditor.bic);
        let mut reached = false;
        let mut backoff = Duration::from_millis(20);
        let give_up = |reached| {
            if reached {
                ForwardError::NoAnswer
            } else {
                ForwardError::Unreachable
            }
        };
        loop {
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Err(give_up(reached));
            }
            let Ok(Ok(permit)) = tokio::time::timeout_at(deadline, permits.acquire()).await else {
                return Err(give_up(reached));
            };
            let timeout = self
                .call_timeout
                .min(deadline - tokio::time::Instant::now());
            let result =
                HttpTransport::call(&self.client, creditor, "/payments", body.clone(), timeout)
                    .await;
            drop(permit);
            match result {
                Ok((200, bytes)) => {
                    match serde_json::from_slice::<DecisionBody>(&bytes)
                        .ok()
                        .and_then(|b| b.decision())
                    {
                        Some(decision) => return Ok(Some(decision)),
                        None => {
                            tracing::warn!(creditor = %creditor.bic, "creditor agent answered with an unusable decision; rejecting AB09");
                            return Ok(Some(Decision::Reject("AB09".into())));
                        }
                    }
                }
                Ok((202, _)) => return Ok(None),
                Ok((status, _)) => {
                    reached = true;
                    tracing::debug!(creditor = %creditor.bic, status, "creditor agent refused the forward; retrying");
                }
                Err(CallError::Connect) => {}
                Err(CallError::Other) => reached = true,
            }
            let sleep_until = (tokio::time::Instant::now() + backoff).min(deadline);
            tokio::time::sleep_until(sleep_until).await;
            backoff = (backoff * 2).min(Duration::from_millis(500));
        }
    }

    /// Queues a notification for a participant; delivered in order by one worker per participant.
    fn notify_http(&self, participant: &Participant, notification: Notification) {
        let mut notifiers = self.notifiers.lock().expect("notifiers");
        let sender = notifiers.entry(participant.bic.clone()).or_insert_with(|| {
            let (sender, receiver) = mpsc::channel(self.queue_max);
            let worker = NotificationWorker {
                client: self.client.clone(),
                participant: participant.clone(),
                registry: self.registry.clone(),
                attempts_max: self.attempts_max,
                timeout: self.call_timeout,
                queued: self.queued.clone(),
            };
            tokio::spawn(worker.run(receiver));
            sender
        });
        self.queued.offer(&participant.bic, sender, notification);
    }
}

impl ParticipantTransport for HttpTransport {
    fn forward<'a>(
        &'a self,
        creditor: &'a Participant,
        payment: &'a PaymentView,
        deadline: tokio::time::Instant,
        _deadline_ns: u64,
    ) -> Pin<Box<dyn Future<Output = Result<Option<Decision>, ForwardError>> + Send + 'a>> {
        Box::pin(self.forward_http(creditor, payment, deadline))
    }

    fn notify(&self, participant: &Participant, notification: Notification) {
        self.notify_http(participant, notification)
    }
}

/// Notifications queued or being delivered to every participant together, against
/// `notification_queue_total_max`: each participant's queue is bounded, and so are all of them,
/// so stalled endpoints cannot hold more than the limit (about 2 KB each). Shared by the HTTP
/// and AMQP transports.
#[derive(Clone)]
pub struct QueuedNotifications {
    queued: Arc<AtomicUsize>,
    max: usize,
}

impl QueuedNotifications {
    pub fn new(max: usize) -> QueuedNotifications {
        QueuedNotifications {
            queued: Arc::new(AtomicUsize::new(0)),
            max,
        }
    }

    /// Takes a place for one notification to `bic`; false (logged) when every place is taken.
    pub fn take(&self, bic: &str) -> bool {
        if self.queued.fetch_add(1, Ordering::SeqCst) < self.max {
            return true;
        }
        self.queued.fetch_sub(1, Ordering::SeqCst);
        tracing::warn!(bic, limit = self.max, "notification queues full (all participants together); notification dropped (status queries still answer)");
        false
    }

    /// Queues `notification` for `bic`'s worker if a place is free, in all queues together and in
    /// its own; false (logged) when it was dropped.
    pub fn offer(
        &self,
        bic: &str,
        sender: &mpsc::Sender<Notification>,
        notification: Notification,
    ) -> bool {
        if !self.take(bic) {
            return false;
        }
        if sender.try_send(notification).is_err() {
            self.release(1);
            tracing::warn!(
                bic,
                limit = sender.max_capacity(),
                "notification queue full; notification dropped (status queries still answer)"
            );
            return false;
        }
        true
    }

    /// Gives back the places of `count` notifications (delivered, dropped or not queued).
    pub fn release(&self, count: usize) {
        let before = self.queued.fetch_sub(count, Ordering::SeqCst);
        assert!(before >= count, "notification places given back twice");
    }

    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::SeqCst)
    }
}

/// The switch's participants, shared with the notification workers.
pub type Registry = Arc<std::sync::RwLock<Arc<std::collections::BTreeMap<String, Participant>>>>;

struct NotificationWorker {
    client: HttpClient,
    participant: Participant,
    registry: Registry,
    attempts_max: u32,
    timeout: Duration,
    queued: QueuedNotifications,
}

impl NotificationWorker {
    async fn run(self, mut receiver: mpsc::Receiver<Notification>) {
        let mut batch = Vec::with_capacity(NOTIFICATIONS_PER_REQUEST_MAX);
        while let Some(first) = receiver.recv().await {
            batch.clear();
            batch.push(first);
            while batch.len() < NOTIFICATIONS_PER_REQUEST_MAX {
                match receiver.try_recv() {
                    Ok(next) => batch.push(next),
                    Err(_) => break,
                }
            }
            let body = serde_json::to_vec(&batch).expect("notifications serialize");
            let mut backoff = Duration::from_millis(100);
            let mut delivered = false;
            for _ in 0..self.attempts_max {
                // The participant as registered now (its endpoint or secret may have changed).
                let current = self
                    .registry
                    .read()
                    .expect("participants")
                    .get(&self.participant.bic)
                    .cloned()
                    .unwrap_or_else(|| self.participant.clone());
                match HttpTransport::call(
                    &self.client,
                    &current,
                    "/notifications",
                    body.clone(),
                    self.timeout,
                )
                .await
                {
                    Ok((status, _)) if (200..300).contains(&status) => {
                        delivered = true;
                        break;
                    }
                    _ => {
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            }
            if !delivered {
                tracing::warn!(bic = %self.participant.bic, count = batch.len(), attempts = self.attempts_max, "notifications not delivered; dropped (status queries still answer)");
            }
            self.queued.release(batch.len());
        }
    }
}

#[cfg(test)]
mod queued_notifications_tests {
    use super::QueuedNotifications;

    #[test]
    fn places_are_bounded_over_all_participants_and_given_back() {
        let queued = QueuedNotifications::new(3);
        let other = queued.clone();
        assert!(queued.take("BANKAAAA"));
        assert!(other.take("BANKBBBB"));
        assert!(queued.take("BANKCCCC"));
        assert!(!other.take("BANKAAAA"), "the fourth is refused");
        assert_eq!(queued.queued(), 3, "a refusal takes no place");
        other.release(2);
        assert!(queued.take("BANKBBBB"));
        assert_eq!(queued.queued(), 2);
    }
}
