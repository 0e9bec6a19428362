//! The PostgreSQL reporting mirror: payments, returns, liquidity, windows, positions and fund
//! adjustments as documented tables (`crates/export/migrations`, applied at connect), and every
//! voucher as hashed.
//!
//! Exactly once: each batch is one transaction that inserts its rows and moves
//! `clearhouse_export_state.last_seq` from the value this exporter read to the batch's last
//! voucher (the row is locked `FOR UPDATE` and compared first). A crash of the exporter or of
//! PostgreSQL mid-batch leaves nothing of the batch; the next start reads `last_seq` back and
//! continues after it. A second exporter writing the same mirror finds `last_seq` moved and
//! fails instead of writing twice. Rows are inserted with `unnest` over arrays: one statement per
//! table per batch.

use std::collections::BTreeMap;
use std::time::Duration;

use clearhouse_clearing::event::VoucherEvent;
use tokio_postgres::{Client, NoTls};

use crate::{event_kind, ExportError, Resume, Sink, Voucher};

const SINK: &str = "postgres";

/// The migrations, in order (version = position + 1).
pub const MIGRATIONS: [(&str, &str); 1] =
    [("0001_mirror", include_str!("../migrations/0001_mirror.sql"))];

/// Longest a statement or the whole batch transaction may take before the connection is dropped
/// and the batch retried (a PostgreSQL that stopped answering must not hang the exporter).
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone, Debug)]
pub struct PostgresOptions {
    /// A libpq-style connection string, e.g. `host=127.0.0.1 port=5432 user=u dbname=d`.
    pub dsn: String,
    /// The schema holding the mirror (created if missing).
    pub schema: String,
}

pub struct PostgresSink {
    options: PostgresOptions,
    client: Option<Client>,
    last_seq: u64,
    open_window: u64,
}

fn pg(error: impl std::fmt::Display) -> ExportError {
    ExportError::sink(SINK, error)
}

/// A SQL identifier we accept unquoted.
fn valid_schema(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

fn timestamp_sql() -> &'static str {
    "('epoch'::timestamptz + (t.final_at_ns / 1000) * interval '1 microsecond')"
}

impl PostgresSink {
    pub fn new(options: PostgresOptions) -> Result<PostgresSink, ExportError> {
        if !valid_schema(&options.schema) {
            return Err(ExportError::Config(format!(
                "schema {:?}: lower-case letters, digits and _ (at most 63)",
                options.schema
            )));
        }
        Ok(PostgresSink {
            options,
            client: None,
            last_seq: 0,
            open_window: 1,
        })
    }

    async fn connect(&mut self) -> Result<&Client, ExportError> {
        if self.client.as_ref().is_some_and(|c| c.is_closed()) {
            self.client = None;
        }
        if self.client.is_none() {
            let (client, connection) = tokio::time::timeout(
                STATEMENT_TIMEOUT,
                tokio_postgres::connect(&self.options.dsn, NoTls),
            )
            .await
            .map_err(|_| pg("connecting timed out"))?
            .map_err(pg)?;
            tokio::spawn(async move {
                if let Err(error) = connection.await {
                    tracing::debug!(%error, "postgres connection ended");
                }
            });
            let schema = &self.options.schema;
            client
                .batch_execute(&format!(
                    "SET statement_timeout = {}; CREATE SCHEMA IF NOT EXISTS {schema}; SET search_path TO {schema}",
                    STATEMENT_TIMEOUT.as_millis()
                ))
                .await
                .map_err(pg)?;
            migrate(&client).await?;
            self.client = Some(client);
        }
        Ok(self.client.as_ref().expect("connected"))
    }

    async fn write_batch(&mut self, batch: &[Voucher]) -> Result<(u64, u64), ExportError> {
        let expected = self.last_seq;
        let mut open_window = self.open_window;
        let rows = Rows::of(batch, &mut open_window);
        let last = batch.last().expect("a batch is not empty");
        let client = self.client.as_mut().expect("connected");
        let tx = client.transaction().await.map_err(pg)?;
        let state = tx
            .query_one(
                "SELECT last_seq FROM clearhouse_export_state WHERE id = 1 FOR UPDATE",
                &[],
            )
            .await
            .map_err(pg)?;
        let stored: i64 = state.get(0);
        if stored as u64 != expected {
            return Err(pg(format!(
                "the mirror's last voucher moved from {expected} to {stored} under this exporter (is a second exporter writing it?)"
            )));
        }
        tx.execute(
            "INSERT INTO vouchers (seq, hash, kind, window_no, body)
             SELECT * FROM unnest($1::bigint[], $2::bytea[], $3::text[], $4::bigint[], $5::text[])",
            &[
                &rows.v_seq,
                &rows.v_hash,
                &rows.v_kind,
                &rows.v_window,
                &rows.v_body,
            ],
        )
        .await
        .map_err(pg)?;
        if !rows.p_id.is_empty() {
            tx.execute(
                &format!(
                    "INSERT INTO payments (payment_id, uetr, end_to_end_id, debtor_agent, creditor_agent,
                        currency, amount, status, reason, final_at_ns, final_at, window_no, voucher_seq)
                     SELECT t.id, t.uetr, t.e2e, t.debtor, t.creditor, t.currency, t.amount::numeric,
                        t.status, t.reason, t.final_at_ns, {}, t.window_no, t.seq
                     FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                        $7::text[], $8::text[], $9::text[], $10::bigint[], $11::bigint[], $12::bigint[])
                     AS t(id, uetr, e2e, debtor, creditor, currency, amount, status, reason, final_at_ns, window_no, seq)",
                    timestamp_sql()
                ),
                &[
                    &rows.p_id, &rows.p_uetr, &rows.p_e2e, &rows.p_debtor, &rows.p_creditor,
                    &rows.p_currency, &rows.p_amount, &rows.p_status, &rows.p_reason, &rows.p_at,
                    &rows.p_window, &rows.p_seq,
                ],
            )
            .await
            .map_err(pg)?;
        }
        if !rows.r_key.is_empty() {
            tx.execute(
                "INSERT INTO returns (return_key, original_payment, original_uetr, returning_agent,
                    receiving_agent, currency, amount, reason, returned_at_ns, window_no, voucher_seq)
                 SELECT t.k, t.p, t.u, t.ra, t.rc, t.c, t.a::numeric, t.r, t.at, t.w, t.s
                 FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                    $7::text[], $8::text[], $9::bigint[], $10::bigint[], $11::bigint[])
                 AS t(k, p, u, ra, rc, c, a, r, at, w, s)",
                &[
                    &rows.r_key, &rows.r_payment, &rows.r_uetr, &rows.r_returning,
                    &rows.r_receiving, &rows.r_currency, &rows.r_amount, &rows.r_reason,
                    &rows.r_at, &rows.r_window, &rows.r_seq,
                ],
            )
            .await
            .map_err(pg)?;
        }
        if !rows.l_id.is_empty() {
            tx.execute(
                "INSERT INTO liquidity (transfer_id, participant, currency, direction, amount, at_ns,
                    window_no, voucher_seq)
                 SELECT t.id, t.p, t.c, t.d, t.a::numeric, t.at, t.w, t.s
                 FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bigint[],
                    $7::bigint[], $8::bigint[]) AS t(id, p, c, d, a, at, w, s)",
                &[
                    &rows.l_id, &rows.l_participant, &rows.l_currency, &rows.l_direction,
                    &rows.l_amount, &rows.l_at, &rows.l_window, &rows.l_seq,
                ],
            )
            .await
            .map_err(pg)?;
        }
        for w in &rows.closed {
            tx.execute(
                "INSERT INTO windows (window_no, opened_at_ns, closed_at_ns, closed_seq,
                    checkpoint_hash, checkpoint_signature)
                 VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (window_no) DO UPDATE SET opened_at_ns = EXCLUDED.opened_at_ns,
                    closed_at_ns = EXCLUDED.closed_at_ns, closed_seq = EXCLUDED.closed_seq,
                    checkpoint_hash = EXCLUDED.checkpoint_hash,
                    checkpoint_signature = EXCLUDED.checkpoint_signature",
                &[
                    &w.window,
                    &w.opened_at_ns,
                    &w.closed_at_ns,
                    &w.seq,
                    &w.checkpoint_hash,
                    &w.signature,
                ],
            )
            .await
            .map_err(pg)?;
        }
        for w in &rows.settled {
            tx.execute(
                "INSERT INTO windows (window_no, settled_at_ns, settled_seq, adjustments)
                 VALUES ($1, $2, $3, $4)
                 ON CONFLICT (window_no) DO UPDATE SET settled_at_ns = EXCLUDED.settled_at_ns,
                    settled_seq = EXCLUDED.settled_seq, adjustments = EXCLUDED.adjustments",
                &[&w.0, &w.1, &w.2, &w.3],
            )
            .await
            .map_err(pg)?;
        }
        if !rows.positions.is_empty() {
            let mut cols = PositionColumns::default();
            for ((window, participant, currency), p) in &rows.positions {
                cols.window.push(*window as i64);
                cols.participant.push(participant.clone());
                cols.currency.push(currency.clone());
                cols.sent.push(p.sent.to_string());
                cols.sent_count.push(p.sent_count as i64);
                cols.received.push(p.received.to_string());
                cols.received_count.push(p.received_count as i64);
            }
            tx.execute(
                "INSERT INTO positions (window_no, participant, currency, sent, sent_count, received,
                    received_count)
                 SELECT t.w, t.p, t.c, t.s::numeric, t.sc, t.r::numeric, t.rc
                 FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::bigint[],
                    $6::text[], $7::bigint[]) AS t(w, p, c, s, sc, r, rc)
                 ON CONFLICT (window_no, participant, currency) DO UPDATE SET
                    sent = positions.sent + EXCLUDED.sent,
                    sent_count = positions.sent_count + EXCLUDED.sent_count,
                    received = positions.received + EXCLUDED.received,
                    received_count = positions.received_count + EXCLUDED.received_count",
                &[
                    &cols.window,
                    &cols.participant,
                    &cols.currency,
                    &cols.sent,
                    &cols.sent_count,
                    &cols.received,
                    &cols.received_count,
                ],
            )
            .await
            .map_err(pg)?;
        }
        for f in &rows.adjustments {
            tx.execute(
                "INSERT INTO fund_adjustments (window_no, participant, currency, net, voucher_seq)
                 VALUES ($1, $2, $3, $4::text::numeric, $5)",
                &[&f.0, &f.1, &f.2, &f.3, &f.4],
            )
            .await
            .map_err(pg)?;
        }
        tx.execute(
            "UPDATE clearhouse_export_state SET last_seq = $1, last_hash = $2, open_window = $3,
                updated_at = now() WHERE id = 1",
            &[
                &(last.seq as i64),
                &last.hash.as_slice(),
                &(open_window as i64),
            ],
        )
        .await
        .map_err(pg)?;
        tx.commit().await.map_err(pg)?;
        Ok((last.seq, open_window))
    }
}

/// Applies the migrations not applied yet, each in its own transaction, one migrator at a time.
async fn migrate(client: &Client) -> Result<(), ExportError> {
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS clearhouse_migrations (
                version integer PRIMARY KEY, name text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now())",
        )
        .await
        .map_err(pg)?;
    for (i, (name, sql)) in MIGRATIONS.iter().enumerate() {
        let version = i as i32 + 1;
        client.batch_execute("BEGIN").await.map_err(pg)?;
        let result = async {
            client
                .execute("SELECT pg_advisory_xact_lock(7283019401)", &[])
                .await?;
            let done = client
                .query_opt(
                    "SELECT 1 FROM clearhouse_migrations WHERE version = $1",
                    &[&version],
                )
                .await?;
            if done.is_none() {
                client.batch_execute(sql).await?;
                client
                    .execute(
                        "INSERT INTO clearhouse_migrations (version, name) VALUES ($1, $2)",
                        &[&version, name],
                    )
                    .await?;
                tracing::info!(version, name, "postgres mirror: migration applied");
            }
            Ok::<_, tokio_postgres::Error>(())
        }
        .await;
        match result {
            Ok(()) => client.batch_execute("COMMIT").await.map_err(pg)?,
            Err(error) => {
                let _ = client.batch_execute("ROLLBACK").await;
                return Err(pg(format!("migration {name}: {error}")));
            }
        }
    }
    Ok(())
}

/// A `window_closed` voucher as a `windows` row.
struct ClosedWindow {
    window: i64,
    opened_at_ns: i64,
    closed_at_ns: i64,
    seq: i64,
    checkpoint_hash: Option<Vec<u8>>,
    signature: Option<Vec<u8>>,
}

/// Position deltas of a batch, as columns.
#[derive(Default)]
struct PositionColumns {
    window: Vec<i64>,
    participant: Vec<String>,
    currency: Vec<String>,
    sent: Vec<String>,
    sent_count: Vec<i64>,
    received: Vec<String>,
    received_count: Vec<i64>,
}

#[derive(Default)]
struct Position {
    sent: u128,
    sent_count: u64,
    received: u128,
    received_count: u64,
}

/// A batch as columns.
#[derive(Default)]
struct Rows {
    v_seq: Vec<i64>,
    v_hash: Vec<Vec<u8>>,
    v_kind: Vec<&'static str>,
    v_window: Vec<i64>,
    v_body: Vec<String>,
    p_id: Vec<String>,
    p_uetr: Vec<String>,
    p_e2e: Vec<Option<String>>,
    p_debtor: Vec<String>,
    p_creditor: Vec<String>,
    p_currency: Vec<String>,
    p_amount: Vec<String>,
    p_status: Vec<&'static str>,
    p_reason: Vec<Option<String>>,
    p_at: Vec<i64>,
    p_window: Vec<i64>,
    p_seq: Vec<i64>,
    r_key: Vec<String>,
    r_payment: Vec<String>,
    r_uetr: Vec<String>,
    r_returning: Vec<String>,
    r_receiving: Vec<String>,
    r_currency: Vec<String>,
    r_amount: Vec<String>,
    r_reason: Vec<String>,
    r_at: Vec<i64>,
    r_window: Vec<i64>,
    r_seq: Vec<i64>,
    l_id: Vec<String>,
    l_participant: Vec<String>,
    l_currency: Vec<String>,
    l_direction: Vec<String>,
    l_amount: Vec<String>,
    l_at: Vec<i64>,
    l_window: Vec<i64>,
    l_seq: Vec<i64>,
    closed: Vec<ClosedWindow>,
    /// window, settled at, seq, adjustments
    settled: Vec<(i64, i64, i64, i32)>,
    positions: BTreeMap<(u64, String, String), Position>,
    /// window, participant, currency, net (decimal text), seq
    adjustments: Vec<(i64, String, String, String, i64)>,
}

fn ns(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

impl Rows {
    /// Columns of `batch`; `open_window` is the window open before it, and after it on return.
    fn of(batch: &[Voucher], open_window: &mut u64) -> Rows {
        let mut rows = Rows::default();
        for v in batch {
            let seq = v.seq as i64;
            let window = match &v.event {
                VoucherEvent::WindowClosed { window, .. }
                | VoucherEvent::FundAdjustment { window, .. }
                | VoucherEvent::WindowSettled { window, .. } => *window,
                _ => *open_window,
            };
            rows.v_seq.push(seq);
            rows.v_hash.push(v.hash.to_vec());
            rows.v_kind.push(event_kind(&v.event));
            rows.v_window.push(window as i64);
            rows.v_body.push(v.body.clone());
            match &v.event {
                VoucherEvent::PaymentSettled {
                    payment,
                    uetr,
                    end_to_end_id,
                    debtor_agent,
                    creditor_agent,
                    currency,
                    amount,
                    at_ns,
                } => {
                    rows.payment(
                        v.seq,
                        window,
                        payment,
                        uetr,
                        Some(end_to_end_id),
                        debtor_agent,
                        creditor_agent,
                        currency,
                        *amount,
                        "settled",
                        None,
                        *at_ns,
                    );
                    rows.moved(window, debtor_agent, creditor_agent, currency, *amount);
                }
                VoucherEvent::PaymentRejected {
                    payment,
                    uetr,
                    debtor_agent,
                    creditor_agent,
                    currency,
                    amount,
                    reason,
                    at_ns,
                } => {
                    rows.payment(
                        v.seq,
                        window,
                        payment,
                        uetr,
                        None,
                        debtor_agent,
                        creditor_agent,
                        currency,
                        *amount,
                        "rejected",
                        Some(reason),
                        *at_ns,
                    );
                }
                VoucherEvent::PaymentReturned {
                    return_key,
                    original_payment,
                    original_uetr,
                    returning_agent,
                    receiving_agent,
                    currency,
                    amount,
                    reason,
                    at_ns,
                } => {
                    rows.r_key.push(return_key.clone());
                    rows.r_payment.push(original_payment.clone());
                    rows.r_uetr.push(original_uetr.clone());
                    rows.r_returning.push(returning_agent.clone());
                    rows.r_receiving.push(receiving_agent.clone());
                    rows.r_currency.push(currency.clone());
                    rows.r_amount.push(amount.to_string());
                    rows.r_reason.push(reason.clone());
                    rows.r_at.push(ns(*at_ns));
                    rows.r_window.push(window as i64);
                    rows.r_seq.push(seq);
                    rows.moved(window, returning_agent, receiving_agent, currency, *amount);
                }
                VoucherEvent::Liquidity {
                    transfer,
                    participant,
                    currency,
                    direction,
                    amount,
                    at_ns,
                } => {
                    rows.l_id.push(transfer.clone());
                    rows.l_participant.push(participant.clone());
                    rows.l_currency.push(currency.clone());
                    rows.l_direction.push(direction.clone());
                    rows.l_amount.push(amount.to_string());
                    rows.l_at.push(ns(*at_ns));
                    rows.l_window.push(window as i64);
                    rows.l_seq.push(seq);
                }
                VoucherEvent::WindowClosed {
                    window,
                    opened_at_ns,
                    closed_at_ns,
                } => {
                    rows.closed.push(ClosedWindow {
                        window: *window as i64,
                        opened_at_ns: ns(*opened_at_ns),
                        closed_at_ns: ns(*closed_at_ns),
                        seq,
                        checkpoint_hash: v.checkpoint.as_ref().map(|c| c.hash.to_vec()),
                        signature: v.checkpoint.as_ref().map(|c| c.signature.to_vec()),
                    });
                    *open_window = window + 1;
                }
                VoucherEvent::FundAdjustment {
                    window,
                    participant,
                    currency,
                    net,
                } => rows.adjustments.push((
                    *window as i64,
                    participant.clone(),
                    currency.clone(),
                    net.to_string(),
                    seq,
                )),
                VoucherEvent::WindowSettled {
                    window,
                    adjustments,
                    settled_at_ns,
                } => rows.settled.push((
                    *window as i64,
                    ns(*settled_at_ns),
                    seq,
                    i32::try_from(*adjustments).unwrap_or(i32::MAX),
                )),
            }
        }
        rows
    }

    #[allow(clippy::too_many_arguments)]
    fn payment(
        &mut self,
        seq: u64,
        window: u64,
        id: &str,
        uetr: &str,
        e2e: Option<&String>,
        debtor: &str,
        creditor: &str,
        currency: &str,
        amount: u128,
        status: &'static str,
        reason: Option<&String>,
        at_ns: u64,
    ) {
        self.p_id.push(id.into());
        self.p_uetr.push(uetr.into());
        self.p_e2e.push(e2e.cloned());
        self.p_debtor.push(debtor.into());
        self.p_creditor.push(creditor.into());
        self.p_currency.push(currency.into());
        self.p_amount.push(amount.to_string());
        self.p_status.push(status);
        self.p_reason.push(reason.cloned());
        self.p_at.push(ns(at_ns));
        self.p_window.push(window as i64);
        self.p_seq.push(seq as i64);
    }

    fn moved(&mut self, window: u64, from: &str, to: &str, currency: &str, amount: u128) {
        let sender = self
            .positions
            .entry((window, from.to_string(), currency.to_string()))
            .or_default();
        sender.sent = sender.sent.saturating_add(amount);
        sender.sent_count += 1;
        let receiver = self
            .positions
            .entry((window, to.to_string(), currency.to_string()))
            .or_default();
        receiver.received = receiver.received.saturating_add(amount);
        receiver.received_count += 1;
    }
}

impl Sink for PostgresSink {
    fn kind(&self) -> &'static str {
        SINK
    }

    async fn resume(&mut self) -> Result<Resume, ExportError> {
        let client = self.connect().await?;
        let row = client
            .query_one(
                "SELECT last_seq, last_hash, open_window FROM clearhouse_export_state WHERE id = 1",
                &[],
            )
            .await
            .map_err(pg)?;
        let last_seq: i64 = row.get(0);
        let last_hash: Vec<u8> = row.get(1);
        let open_window: i64 = row.get(2);
        self.last_seq = last_seq as u64;
        self.open_window = open_window as u64;
        let hash: [u8; 32] = last_hash
            .try_into()
            .map_err(|_| pg("clearhouse_export_state.last_hash is not 32 bytes"))?;
        Ok(Resume {
            next_seq: self.last_seq + 1,
            anchor: (self.last_seq > 0).then_some((self.last_seq, hash)),
        })
    }

    async fn write(&mut self, batch: &[Voucher]) -> Result<(), ExportError> {
        if batch.is_empty() {
            return Ok(());
        }
        if batch[0].seq != self.last_seq + 1 {
            return Err(pg(format!(
                "batch starts at voucher {} but the mirror ends at {}",
                batch[0].seq, self.last_seq
            )));
        }
        self.connect().await?;
        let result = tokio::time::timeout(STATEMENT_TIMEOUT, self.write_batch(batch)).await;
        match result {
            Ok(Ok((last, open_window))) => {
                self.last_seq = last;
                self.open_window = open_window;
                Ok(())
            }
            Ok(Err(error)) => {
                // The transaction rolled back when dropped; the connection may be broken.
                self.client = None;
                Err(error)
            }
            Err(_) => {
                self.client = None;
                Err(pg("the batch transaction timed out"))
            }
        }
    }

    fn durable_seq(&self) -> u64 {
        self.last_seq
    }
}
