//! The dashboard's data: one signed JSON snapshot (`GET /v1/dashboard`) that the page polls.
//! The operator sees the whole scheme; a participant sees its own positions, its own payments and
//! the scheme-wide counters. Payments are shown by id, agents (BICs), amount and state: no names,
//! no account numbers.

use super::*;

/// Most recent payments in a snapshot.
const RECENT_SHOWN_MAX: usize = 20;

#[derive(Serialize)]
pub struct DashboardParticipant {
    pub bic: String,
    pub status: ParticipantStatus,
    pub position: PositionView,
    /// Share of the net debit cap in use, basis points (deferred net only).
    pub cap_used_bp: u32,
}

#[derive(Serialize)]
pub struct DashboardPayment {
    /// The first 12 hex digits of the payment id.
    pub id: String,
    pub debtor_agent: String,
    pub creditor_agent: String,
    pub amount: String,
    pub currency: String,
    pub status: &'static str,
    pub reason: Option<String>,
}

#[derive(Serialize)]
pub struct DashboardLatency {
    /// Cumulative (upper bound seconds, count) per bucket, total count, sum in microseconds.
    pub buckets: Vec<(f64, u64)>,
    pub count: u64,
    pub sum_micros: u64,
}

#[derive(Serialize)]
pub struct DashboardView {
    /// "operator" or the participant's BIC.
    pub viewer: String,
    pub now_ns: u64,
    pub stats: StatsView,
    pub queued: usize,
    pub latency: DashboardLatency,
    pub participants: Vec<DashboardParticipant>,
    /// The open window as it stands (a participant: its own positions only).
    pub window: WindowReport,
    /// The last closed windows (summary), newest first.
    pub windows: Vec<WindowReport>,
    pub reconciliation_breaks_total: u64,
    /// The exporters following the voucher chain (operator only; empty for a participant).
    pub exports: Vec<crate::exports::ExportView>,
    /// Disk, growth and retention (operator only).
    pub storage: Option<crate::storage::StorageView>,
    pub recent: Vec<DashboardPayment>,
}

impl Switch {
    pub async fn dashboard(&self, caller: &Caller) -> Result<DashboardView, ApiError> {
        let participants = self.participants();
        let visible: Vec<&Participant> = participants
            .values()
            .filter(|p| match caller {
                Caller::Operator => true,
                Caller::Participant(me) => &p.bic == me,
            })
            .take(200)
            .collect();
        let mut ids = Vec::new();
        for p in &visible {
            for code in p.currencies.keys() {
                ids.push(position_account(&p.bic, code));
            }
        }
        let accounts = {
            let node = self.node.clone();
            blocking(move || node.lookup_accounts(ids)).await?
        };
        let by_id: FxHashMap<u128, Account> = accounts.into_iter().map(|a| (a.id, a)).collect();
        let mut rows = Vec::new();
        for p in &visible {
            for (code, terms) in &p.currencies {
                let account = by_id
                    .get(&position_account(&p.bic, code))
                    .copied()
                    .unwrap_or_default();
                let cap_used_bp = cap_used_bp(terms.net_debit_cap, &account).unwrap_or(0) as u32;
                rows.push(DashboardParticipant {
                    bic: p.bic.clone(),
                    status: p.status,
                    position: position_view(code, terms, &account),
                    cap_used_bp,
                });
            }
        }
        let recent: Vec<DashboardPayment> = {
            let recent = self.recent.lock().expect("recent");
            recent
                .order
                .iter()
                .rev()
                .filter_map(|(_, id)| recent.map.get(id))
                .filter(|r| match caller {
                    Caller::Operator => true,
                    Caller::Participant(me) => &r.debtor_agent == me || &r.creditor_agent == me,
                })
                .take(RECENT_SHOWN_MAX)
                .map(|r| DashboardPayment {
                    id: format!("{:032x}", r.id())[..12].to_string(),
                    debtor_agent: r.debtor_agent.clone(),
                    creditor_agent: r.creditor_agent.clone(),
                    amount: currency(&r.currency).map_or_else(
                        || r.amount.to_string(),
                        |c| money::format_amount(r.amount, c.exponent),
                    ),
                    currency: r.currency.clone(),
                    status: r.state.iso_status(),
                    reason: r.reason.clone(),
                })
                .collect()
        };
        let window = self
            .window_report(caller, self.clearing.open_window().0)
            .await?;
        // The open window comes first in the list: the 5 closed ones after it.
        let mut windows = self.windows(caller, 6).await?;
        windows.retain(|w| w.window != window.window);
        let (buckets, count, sum_micros) = self.latency.end_to_end.snapshot();
        Ok(DashboardView {
            viewer: match caller {
                Caller::Operator => "operator".into(),
                Caller::Participant(me) => me.clone(),
            },
            now_ns: now_ns(),
            stats: self.stats_view(),
            queued: self.lsm.len(),
            latency: DashboardLatency {
                buckets,
                count,
                sum_micros,
            },
            participants: rows,
            window,
            windows,
            reconciliation_breaks_total: self.clearing.breaks_total.load(Ordering::Relaxed),
            exports: match caller {
                Caller::Operator => self.exports.views(now_ns()),
                Caller::Participant(_) => Vec::new(),
            },
            storage: match caller {
                Caller::Operator => Some(self.storage.view(now_ns())),
                Caller::Participant(_) => None,
            },
            recent,
        })
    }
}
