//! Statements of closed windows: every participant's entries, with the booked balances that
//! chain window to window (closing balances cached for recent windows), in JSON, CSV, camt.053
//! and camt.054.

use super::*;

/// Windows whose closing booked balances are kept in memory for statements.
const CLOSING_BALANCES_CACHED_MAX: usize = 64;

/// The window whose statements were built last, and those statements (see
/// `Clearing::statements`).
pub(super) type StatementsBuilt =
    tokio::sync::Mutex<Option<(u64, Arc<Vec<clearhouse_clearing::statement::Statement>>)>>;

impl Clearing {
    /// 410 `archived` if retention has pruned `window`.
    async fn refuse_archived(&self, window: u64) -> Result<(), ApiError> {
        let pruned = self.retention_state().await?.pruned_through;
        if (1..=pruned).contains(&window) {
            return Err(ApiError::new(
                410,
                "archived",
                format!("window {window} is archived (retention: windows 1 to {pruned}); its vouchers are in the archive"),
            ));
        }
        Ok(())
    }

    /// The vouchers of a closed window, its closing voucher last.
    pub async fn window_events(&self, window: u64) -> Result<Vec<(u64, VoucherEvent)>, ApiError> {
        self.refuse_archived(window).await?;
        let end = self.closed_seq(window).await?.ok_or_else(|| {
            ApiError::new(409, "window_open", format!("window {window} is not closed"))
        })?;
        let start = if window == 1 {
            1
        } else {
            self.closed_seq(window - 1)
                .await?
                .ok_or_else(|| internal("previous window without closing voucher"))?
                + 1
        };
        let mut events = Vec::with_capacity((end + 1).saturating_sub(start).min(1 << 20) as usize);
        // Pages are read (and unpacked) on the blocking pool while the page before is parsed
        // here: the two halves of the work overlap on two cores.
        let fetch = |from: u64| {
            let node = self.node.clone();
            let limit = VOUCHER_PAGE.min((end - from + 1) as usize);
            tokio::task::spawn_blocking(move || node.voucher_bodies(from, limit))
        };
        let mut from = start;
        let mut reading = (from <= end).then(|| fetch(from));
        while let Some(read) = reading.take() {
            let page = read
                .await
                .map_err(|error| internal(error.to_string()))?
                .map_err(ApiError::from)?;
            if page.first().map(|(seq, _)| *seq) != Some(from) {
                return Err(ApiError::new(
                    410,
                    "archived",
                    format!("voucher {from} of window {window} is not in the hot store"),
                ));
            }
            let Some(last) = page.last() else { break };
            from = last.0 + 1;
            if from <= end {
                reading = Some(fetch(from));
            }
            for (seq, body) in page {
                events.push((seq, VoucherEvent::parse(&body).map_err(internal)?));
            }
        }
        Ok(events)
    }

    /// Every participant's statement of a closed window (one pass over its vouchers), with the
    /// booked balances at its opening (the previous window's closing) and closing. Built one
    /// window at a time and kept until another window's are asked for: a closed window's
    /// vouchers never change, and every participant fetches the same window after a close.
    pub async fn statements(
        &self,
        window: u64,
    ) -> Result<Arc<Vec<clearhouse_clearing::statement::Statement>>, ApiError> {
        let mut built = self.statements_built.lock().await;
        if let Some((at, statements)) = &*built {
            if *at == window {
                // Retention may have pruned the window since.
                self.refuse_archived(window).await?;
                return Ok(statements.clone());
            }
        }
        // The previous window's statements go before this one's are built (one in memory).
        *built = None;
        let events = self.window_events(window).await?;
        let statements = self.statements_and_closings(window, &events).await?;
        *built = Some((window, statements.clone()));
        Ok(statements)
    }

    /// A window's statements from its vouchers, its closing balances remembered on the way.
    async fn statements_and_closings(
        &self,
        window: u64,
        events: &[(u64, VoucherEvent)],
    ) -> Result<Arc<Vec<clearhouse_clearing::statement::Statement>>, ApiError> {
        let openings = self.closing_balances(window.saturating_sub(1)).await?;
        let (statements, closings) = self.statements_of(window, &openings, events).await?;
        self.remember_closings(window, Arc::new(closings));
        Ok(Arc::new(statements))
    }

    /// Builds and keeps a just-reconciled window's statements from the vouchers reconciliation
    /// read (one pass over the window instead of two). Best effort: on an error they are built
    /// when first asked for.
    pub(super) async fn build_statements_from(&self, window: u64, events: &[(u64, VoucherEvent)]) {
        let mut built = self.statements_built.lock().await;
        *built = None;
        match self.statements_and_closings(window, events).await {
            Ok(statements) => *built = Some((window, statements)),
            Err(error) => {
                tracing::warn!(window, %error, "statements not built with reconciliation; built when asked for");
            }
        }
    }

    /// Keeps `window`'s closing balances (the oldest window goes when the cache is full).
    pub(super) fn remember_closings(
        &self,
        window: u64,
        closings: Arc<clearhouse_clearing::statement::Balances>,
    ) {
        let mut cached = self.closings.lock().expect("closings");
        cached.insert(window, closings);
        while cached.len() > CLOSING_BALANCES_CACHED_MAX {
            cached.pop_first();
        }
    }

    /// The booked balances at the close of `window` (none before window 1): from the nearest
    /// cached earlier window, every window after it is walked once (its vouchers, and its fund
    /// adjustments as the ledger moved them).
    pub(super) async fn closing_balances(
        &self,
        window: u64,
    ) -> Result<Arc<clearhouse_clearing::statement::Balances>, ApiError> {
        let cached = {
            let cached = self.closings.lock().expect("closings");
            cached
                .range(..=window)
                .next_back()
                .map(|(w, b)| (*w, b.clone()))
        };
        // After retention the walk starts at the last pruned window's kept closing balances.
        let state = self.retention_state().await?;
        let (mut at, mut balances) = match cached {
            Some((w, b)) if w >= state.pruned_through => (w, b),
            _ if state.pruned_through == 0 => {
                (0, Arc::new(clearhouse_clearing::statement::Balances::new()))
            }
            _ if window < state.pruned_through => {
                return Err(ApiError::new(
                    410,
                    "archived",
                    format!(
                        "window {window} is archived (retention): its balances are in the archive"
                    ),
                ))
            }
            _ => (
                state.pruned_through,
                Arc::new(
                    self.kept_closings(state.pruned_through, state.closing_balances_chunks)
                        .await?,
                ),
            ),
        };
        while at < window {
            at += 1;
            let (_, closings) = self.window_statements(at, &balances).await?;
            // Carried forward from here, not re-read from the cache: a full cache of newer
            // windows evicts an old one as soon as it is inserted.
            balances = Arc::new(closings);
            self.remember_closings(at, balances.clone());
        }
        Ok(balances)
    }

    pub(super) async fn window_statements(
        &self,
        window: u64,
        openings: &clearhouse_clearing::statement::Balances,
    ) -> Result<
        (
            Vec<clearhouse_clearing::statement::Statement>,
            clearhouse_clearing::statement::Balances,
        ),
        ApiError,
    > {
        let events = self.window_events(window).await?;
        self.statements_of(window, openings, &events).await
    }

    /// A window's statements from its vouchers (`window_events`).
    pub(super) async fn statements_of(
        &self,
        window: u64,
        openings: &clearhouse_clearing::statement::Balances,
        events: &[(u64, VoucherEvent)],
    ) -> Result<
        (
            Vec<clearhouse_clearing::statement::Statement>,
            clearhouse_clearing::statement::Balances,
        ),
        ApiError,
    > {
        let mut statements =
            clearhouse_clearing::statement::Statements::with_openings(window, openings);
        // Fund adjustments as the ledger moved them (a net receiver's may have moved less than
        // its net, or nothing: the rest was carried).
        let adjustment_ids: Vec<u128> = events
            .iter()
            .filter_map(|(_, e)| match e {
                VoucherEvent::FundAdjustment {
                    window,
                    participant,
                    currency,
                    ..
                } => Some(self.keys.fund_adjustment(*window, participant, currency)),
                _ => None,
            })
            .collect();
        let moved: BTreeMap<u128, (u128, u64)> = if adjustment_ids.is_empty() {
            BTreeMap::new()
        } else {
            let node = self.node.clone();
            blocking(move || node.lookup_transfers(adjustment_ids))
                .await?
                .into_iter()
                .map(|s| (s.transfer.id, (s.transfer.amount, s.transfer.timestamp)))
                .collect()
        };
        for (seq, event) in events {
            if let VoucherEvent::FundAdjustment {
                window: adjusted,
                participant,
                currency,
                net,
            } = event
            {
                let id = self.keys.fund_adjustment(*adjusted, participant, currency);
                let (amount, at_ns) = moved.get(&id).copied().unwrap_or((0, 0));
                let amount = i128::try_from(amount).map_err(internal)?;
                // A net payer (net < 0) was credited; a net receiver debited.
                let signed = if *net < 0 { amount } else { -amount };
                statements
                    .adjustment(*seq, participant, currency, *adjusted, signed, at_ns)
                    .map_err(internal)?;
            } else {
                statements.add(*seq, event).map_err(internal)?;
            }
        }
        statements.finish().map_err(internal)
    }
}

/// A participant's window statement as a camt.053.001.08: one account report per currency, every
/// entry with its UETR and end-to-end reference, booked; the balances are the window's opening
/// (zero) and closing net movement, as proprietary balance types (the position's absolute balance
/// lives on the ledger, not in the window).
pub fn statement_camt053(
    statements: &[clearhouse_clearing::statement::Statement],
    message_id: &str,
) -> Result<String, ApiError> {
    statement_camt(
        statements,
        message_id,
        clearhouse_iso20022::camt::ReportKind::Statement,
    )
}

/// The same entries as a camt.054.001.08 debit/credit notification (no balances).
pub fn statement_camt054(
    statements: &[clearhouse_clearing::statement::Statement],
    message_id: &str,
) -> Result<String, ApiError> {
    statement_camt(
        statements,
        message_id,
        clearhouse_iso20022::camt::ReportKind::Notification,
    )
}

fn statement_camt(
    statements: &[clearhouse_clearing::statement::Statement],
    message_id: &str,
    kind: clearhouse_iso20022::camt::ReportKind,
) -> Result<String, ApiError> {
    use clearhouse_iso20022::camt;
    let now = now_ns();
    let mut reports = Vec::new();
    for statement in statements {
        let c = currency(&statement.currency)
            .ok_or_else(|| internal(format!("unknown currency {}", statement.currency)))?;
        let money = |minor: u128| crate::money::format_amount(minor, c.exponent);
        let balance = |code: &str, amount: i128| camt::Balance {
            code: code.to_string(),
            amount: money(amount.unsigned_abs()),
            currency: c.code.to_string(),
            credit: amount >= 0,
            date: clearhouse_iso20022::time::date(now),
        };
        let entries = statement
            .entries
            .iter()
            .map(|e| camt::Entry {
                amount: money(e.amount),
                currency: c.code.to_string(),
                credit: e.credit,
                status: "BOOK".into(),
                booking_date: Some(clearhouse_iso20022::time::date(e.at_ns)),
                account_servicer_reference: Some(format!("voucher-{}", e.voucher)),
                bank_transaction_code: Some((
                    "PMNT".into(),
                    if e.credit { "RCDT" } else { "ICDT" }.into(),
                    if e.kind == "return" { "RRTN" } else { "DMCT" }.into(),
                )),
                instruction_id: None,
                end_to_end_id: None,
                uetr: (e.kind == "payment" || e.kind == "return").then(|| e.reference.clone()),
                debtor_agent: None,
                creditor_agent: None,
                additional_info: Some(format!("{} with {}", e.kind, e.counterparty)),
            })
            .collect();
        reports.push(camt::AccountReport {
            id: format!("W{}-{}-{}", statement.window, statement.participant, c.code),
            created: Some(clearhouse_iso20022::time::date_time(now)),
            account_iban: None,
            account_other: Some(format!("{}-{}", statement.participant, c.code)),
            account_currency: Some(c.code.to_string()),
            // Booked balances of the position (the net debit cap is a credit line, not part of
            // them): the opening one is the previous window's closing one.
            balances: vec![
                balance("OPBD", statement.opening_balance),
                balance("CLBD", statement.closing_balance),
            ],
            entries,
        });
    }
    if reports.is_empty() {
        return Err(ApiError::new(
            404,
            "not_found",
            "no movements in this window",
        ));
    }
    Ok(camt::CashReport {
        kind,
        message_id: message_id.chars().take(35).collect(),
        created: clearhouse_iso20022::time::date_time(now),
        reports,
    }
    .to_xml())
}
