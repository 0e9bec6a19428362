//! Settlement windows on the live switch: close, settle, reports, statements and vouchers as
//! each caller may see them, and the close schedule.

use super::*;

impl Switch {
    /// Closes the open settlement window (operator), settling it right away with `settle`.
    pub async fn close_window(
        &self,
        caller: &Caller,
        settle: bool,
    ) -> Result<WindowReport, ApiError> {
        operator(caller)?;
        let models = crate::clearing::settlement_models(&self.participants());
        let report = self.clearing.close(&models, settle).await;
        self.lsm.wake.notify_one();
        report
    }

    /// Retention: prunes a settled window whose archive holds `archived` (see
    /// `Clearing::prune_window`), and lets the cache of recent payments go of its payments so
    /// every answer about them comes from their tombstone.
    pub async fn prune_window(
        &self,
        window: u64,
        archived: &[(u64, [u8; 32])],
    ) -> Result<crate::clearing::PruneReport, ApiError> {
        // Returns rewrite their payment's record: none runs while a window is pruned, so a
        // return either finds its payment hot (and completes before) or archived (refused).
        let _returns = self.returns.lock().await;
        let report = self.clearing.prune_window(window, archived).await?;
        let mut recent = self.recent.lock().expect("recent");
        let Recent {
            map,
            by_instruction,
            order,
        } = &mut *recent;
        for key in &report.keys {
            if let Some(old) = map.remove(key) {
                by_instruction.remove(&old.instruction_alias());
            }
        }
        order.retain(|(_, key)| map.contains_key(key));
        Ok(report)
    }

    pub async fn settle_window(
        &self,
        caller: &Caller,
        window: u64,
    ) -> Result<WindowReport, ApiError> {
        operator(caller)?;
        let report = self.clearing.settle(window).await;
        // Fund adjustments changed positions: queued payments may fit now.
        self.lsm.wake.notify_one();
        report
    }

    /// A window's report; a participant sees only its own positions.
    pub async fn window_report(
        &self,
        caller: &Caller,
        window: u64,
    ) -> Result<WindowReport, ApiError> {
        let models = crate::clearing::settlement_models(&self.participants());
        let report = self.clearing.report(window, &models).await?;
        Ok(match caller {
            Caller::Operator => report,
            Caller::Participant(bic) => crate::clearing::participant_view(report, bic),
        })
    }

    /// A participant's statements of a closed window (one per currency); the operator names the
    /// participant.
    pub async fn statements(
        &self,
        caller: &Caller,
        window: u64,
        participant: Option<&str>,
    ) -> Result<Vec<clearhouse_clearing::statement::Statement>, ApiError> {
        let bic = match (caller, participant) {
            (Caller::Participant(me), None) => me.clone(),
            (Caller::Participant(me), Some(bic)) if me == bic => me.clone(),
            (Caller::Participant(_), Some(_)) => {
                return Err(ApiError::new(
                    403,
                    "forbidden",
                    "a participant can only read its own statements",
                ))
            }
            (Caller::Operator, Some(bic)) => bic.to_string(),
            (Caller::Operator, None) => {
                return Err(ApiError::bad_request("participant=BIC is required", "FF01"))
            }
        };
        let statements = self.clearing.statements(window).await?;
        Ok(statements
            .iter()
            .filter(|s| s.participant == bic)
            .cloned()
            .collect())
    }

    /// The open window and the `limit - 1` most recent closed ones.
    pub async fn windows(
        &self,
        caller: &Caller,
        limit: u64,
    ) -> Result<Vec<WindowReport>, ApiError> {
        let models = crate::clearing::settlement_models(&self.participants());
        let reports = self.clearing.list(&models, limit).await?;
        Ok(match caller {
            Caller::Operator => reports,
            Caller::Participant(bic) => reports
                .into_iter()
                .map(|r| crate::clearing::participant_view(r, bic))
                .collect(),
        })
    }

    pub async fn vouchers(
        &self,
        caller: &Caller,
        from: u64,
        limit: usize,
    ) -> Result<crate::clearing::VoucherPage, ApiError> {
        let participant = match caller {
            Caller::Operator => None,
            Caller::Participant(bic) => Some(bic.as_str()),
        };
        self.clearing.voucher_page(participant, from, limit).await
    }

    /// Closes windows on the configured schedule (every `window_close_every_seconds`, and at the
    /// `window_close_at_utc` times), settling each; a failed close is logged and tried again at
    /// the next scheduled time.
    pub fn spawn_window_schedule(self: &Arc<Self>) {
        let now = || now_ns() / 1_000_000_000;
        if self.config.seconds_to_next_close(now(), now()).is_none() {
            return;
        }
        let switch = self.clone();
        tokio::spawn(async move {
            let mut last = now();
            loop {
                let Some(wait) = switch.config.seconds_to_next_close(now(), last) else {
                    return;
                };
                tokio::time::sleep(Duration::from_secs(wait.max(1))).await;
                last = now();
                if let Err(error) = switch.close_window(&Caller::Operator, true).await {
                    tracing::warn!(%error, "scheduled window close failed; tried again at the next scheduled time");
                }
            }
        });
    }
}
