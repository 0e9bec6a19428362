//! What the switch reports about itself: counters, Prometheus text (the aggregates of the
//! unauthenticated `/metrics`; per-participant liquidity only for the operator), readiness.

use super::*;

impl Switch {
    pub fn stats_view(&self) -> StatsView {
        StatsView {
            submitted: self.stats.submitted.load(Ordering::Relaxed),
            settled: self.stats.settled.load(Ordering::Relaxed),
            rejected: self.stats.rejected.load(Ordering::Relaxed),
            in_flight: self.in_flight.lock().expect("in flight").payments.len(),
            rejected_by_reason: self.stats.rejected_by_reason.lock().expect("stats").clone(),
        }
    }

    /// The unauthenticated `/metrics`: [`Switch::render_metrics`] plus the open window's figures
    /// per currency. Aggregates only: nothing per participant (liquidity positions are
    /// confidential between a participant and the operator; they are in
    /// [`Switch::render_participant_metrics`], served signed to the operator only).
    pub async fn render_metrics_full(&self) -> String {
        let mut out = self.render_metrics();
        self.render_window_metrics(&mut out);
        self.exports.render(&mut out, crate::clock::now_ns());
        self.storage.render(&mut out, crate::clock::now_ns());
        let extra = self.metrics_extra.lock().expect("metrics").clone();
        for render in extra {
            render(&mut out);
        }
        out
    }

    /// The operator's metrics (`GET /v1/admin/metrics`, signed): the aggregates of `/metrics`
    /// plus each participant's available liquidity and net debit cap use (the first 1,000
    /// participants).
    pub async fn render_operator_metrics(&self) -> String {
        let mut out = self.render_metrics_full().await;
        self.render_participant_metrics(&mut out).await;
        out
    }

    pub(super) async fn render_participant_metrics(&self, out: &mut String) {
        use crate::metrics::metric;
        let participants = self.participants();
        let mut keys = Vec::new();
        for p in participants.values().take(1_000) {
            for (code, terms) in &p.currencies {
                keys.push((p.bic.clone(), code.clone(), terms.net_debit_cap));
            }
        }
        let ids: Vec<u128> = keys
            .iter()
            .map(|(b, c, _)| position_account(b, c))
            .collect();
        let node = self.node.clone();
        if let Ok(accounts) = blocking(move || node.lookup_accounts(ids)).await {
            let by_id: FxHashMap<u128, Account> = accounts.into_iter().map(|a| (a.id, a)).collect();
            let mut available_samples = Vec::new();
            let mut used_samples = Vec::new();
            for (bic, code, cap) in &keys {
                let account = by_id
                    .get(&position_account(bic, code))
                    .copied()
                    .unwrap_or_default();
                let labels = format!("participant=\"{bic}\",currency=\"{code}\"");
                let left = available(&account);
                available_samples.push((labels.clone(), left.to_string()));
                if let Some(used_bp) = cap_used_bp(*cap, &account) {
                    // A ratio for Prometheus, written from integer basis points.
                    used_samples.push((
                        labels,
                        format!("{}.{:04}", used_bp / 10_000, used_bp % 10_000),
                    ));
                }
            }
            let available_refs: Vec<(&str, &str)> = available_samples
                .iter()
                .map(|(l, v)| (l.as_str(), v.as_str()))
                .collect();
            metric(
                out,
                "clearhouse_participant_available_minor_units",
                "gauge",
                "Liquidity a participant can send now (minor units): funds plus net debit cap, minus reservations.",
                &available_refs,
            );
            let used_refs: Vec<(&str, &str)> = used_samples
                .iter()
                .map(|(l, v)| (l.as_str(), v.as_str()))
                .collect();
            metric(
                out,
                "clearhouse_participant_net_debit_cap_used_ratio",
                "gauge",
                "Share of a deferred-net participant's net debit cap in use (0 to 1).",
                &used_refs,
            );
        }
    }

    pub(super) fn render_window_metrics(&self, out: &mut String) {
        use crate::metrics::metric;
        let participants = self.participants();
        let models = crate::clearing::settlement_models(&participants);
        if let Ok(preview) = self.clearing.preview(&models) {
            let figures = preview.plan.map(|p| p.figures).unwrap_or_default();
            let sample = |f: &dyn Fn(&clearhouse_clearing::netting::CurrencyFigures) -> String| {
                figures
                    .iter()
                    .map(|x| (format!("currency=\"{}\"", x.currency), f(x)))
                    .collect::<Vec<_>>()
            };
            for (name, help, values) in [
                (
                    "clearhouse_window_gross_minor_units",
                    "The open window's gross value (sum of payments and returns), minor units.",
                    sample(&|x| x.gross.to_string()),
                ),
                (
                    "clearhouse_window_net_minor_units",
                    "The open window's net value (sum of net debit positions), minor units.",
                    sample(&|x| x.net.to_string()),
                ),
                (
                    "clearhouse_window_transfers",
                    "Payments and returns in the open window.",
                    sample(&|x| x.transfers.to_string()),
                ),
            ] {
                let refs: Vec<(&str, &str)> = values
                    .iter()
                    .map(|(l, v)| (l.as_str(), v.as_str()))
                    .collect();
                metric(out, name, "gauge", help, &refs);
            }
        }
    }

    pub fn render_metrics(&self) -> String {
        use crate::metrics::metric;
        let mut out = String::with_capacity(8192);
        let stats = self.stats_view();
        let node = self.node.metrics();
        metric(
            &mut out,
            "clearhouse_payments_submitted_total",
            "counter",
            "Payments submitted (including duplicates and refusals).",
            &[("", stats.submitted)],
        );
        let mut finals = vec![("state=\"settled\"".to_string(), stats.settled)];
        for (reason, count) in &stats.rejected_by_reason {
            finals.push((format!("state=\"rejected\",reason=\"{reason}\""), *count));
        }
        let finals: Vec<(&str, u64)> = finals.iter().map(|(l, v)| (l.as_str(), *v)).collect();
        metric(
            &mut out,
            "clearhouse_payments_final_total",
            "counter",
            "Payments by final state (and ISO reason when rejected).",
            &finals,
        );
        metric(
            &mut out,
            "clearhouse_payments_in_flight",
            "gauge",
            "Payments reserved and not yet final.",
            &[("", stats.in_flight)],
        );
        metric(
            &mut out,
            "clearhouse_payments_queued",
            "gauge",
            "Payments queued for liquidity (liquidity-saving mode).",
            &[("", self.lsm.len())],
        );
        self.latency.render(&mut out);
        let (window, _) = self.clearing.open_window();
        metric(
            &mut out,
            "clearhouse_window_open",
            "gauge",
            "The settlement window open now.",
            &[("", window)],
        );
        metric(
            &mut out,
            "clearhouse_windows_total",
            "counter",
            "Settlement windows closed and settled since start.",
            &[
                (
                    "event=\"closed\"",
                    self.clearing.windows_closed.load(Ordering::Relaxed),
                ),
                (
                    "event=\"settled\"",
                    self.clearing.windows_settled.load(Ordering::Relaxed),
                ),
            ],
        );
        metric(
            &mut out,
            "clearhouse_reconciliation_breaks_total",
            "counter",
            "Internal reconciliation breaks found since start (any is an alarm).",
            &[("", self.clearing.breaks_total.load(Ordering::Relaxed))],
        );
        metric(
            &mut out,
            "clearhouse_participants",
            "gauge",
            "Participants onboarded.",
            &[("", self.participants().len())],
        );
        metric(
            &mut out,
            "clearhouse_journal_syncs_total",
            "counter",
            "Journal groups made durable (one fdatasync each).",
            &[("", node.syncs)],
        );
        metric(
            &mut out,
            "clearhouse_journal_sync_seconds_total",
            "counter",
            "Time spent in journal fdatasync.",
            &[("", node.sync_seconds_total)],
        );
        metric(
            &mut out,
            "clearhouse_engine_requests_total",
            "counter",
            "Requests executed by the engine.",
            &[("", node.requests)],
        );
        metric(
            &mut out,
            "clearhouse_engine_groups_total",
            "counter",
            "Groups the requests came in (requests / groups = mean group size).",
            &[("", node.groups)],
        );
        metric(
            &mut out,
            "clearhouse_journal_committed_sequence",
            "gauge",
            "Last durable journal record.",
            &[("", node.committed_seq)],
        );
        metric(
            &mut out,
            "clearhouse_index_lag_records",
            "gauge",
            "Journal records not yet in the on-disk index.",
            &[("", node.committed_seq.saturating_sub(node.indexed_seq))],
        );
        metric(
            &mut out,
            "clearhouse_checkpoint_sequence",
            "gauge",
            "Journal record covered by the last durable index checkpoint.",
            &[("", node.checkpoint_seq)],
        );
        metric(
            &mut out,
            "clearhouse_up",
            "gauge",
            "1 while the engine accepts work.",
            &[("", u64::from(!node.stopped))],
        );
        out
    }

    /// Whether the switch can take work (the engine has not stopped).
    /// Ready to serve: the engine runs and signatures made now are accepted (a (re)started node
    /// refuses timestamps earlier than its start plus the allowed clock lead).
    pub fn ready(&self) -> bool {
        !self.node.metrics().stopped && auth::now_ms() >= self.nonces.not_before_ms()
    }
}
