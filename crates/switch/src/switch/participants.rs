//! Participants and their liquidity: onboarding (ledger accounts, credit lines, the record),
//! changes of terms and status, liquidity in and out, positions, and the low-liquidity watch.

use super::*;

impl Switch {
    pub async fn onboard(
        &self,
        request: OnboardRequest,
    ) -> Result<(ParticipantView, String), ApiError> {
        let _admin = self.admin.lock().await;
        if !is_bic(&request.bic) {
            return Err(ApiError::bad_request(
                "bic must be a BIC (8 or 11 characters)",
                "RC01",
            ));
        }
        if request.name.is_empty() || request.name.len() > 140 {
            return Err(ApiError::bad_request(
                "name must be 1 to 140 characters",
                "FF01",
            ));
        }
        check_endpoint(&request.endpoint)?;
        match &request.routing_number {
            Some(rtn) if !crate::profile::is_routing_number(rtn) => {
                return Err(ApiError::bad_request(
                    "routing_number must be 9 digits with a valid ABA check digit",
                    "RC01",
                ))
            }
            Some(rtn) if self.bic_of_routing_number(rtn).is_some() => {
                return Err(ApiError::new(
                    409,
                    "routing_number_taken",
                    format!("routing number {rtn} belongs to another participant"),
                ))
            }
            None if self.config.scheme_profile.uses_routing_numbers() => {
                return Err(ApiError::bad_request(
                    "this scheme identifies participants by routing_number",
                    "RC01",
                ))
            }
            _ => {}
        }
        if let Some(only) = self.config.scheme_profile.currency() {
            if request.currencies.keys().any(|code| code != only) {
                return Err(ApiError::bad_request(
                    format!("this scheme clears {only} only"),
                    "AM03",
                ));
            }
        }
        if self.participants().contains_key(&request.bic) {
            return Err(ApiError::new(
                409,
                "participant_exists",
                format!("{} is already onboarded", request.bic),
            ));
        }
        if self.participants().len() >= self.config.participants_max {
            return Err(ApiError::new(
                409,
                "participants_limit",
                "participants_max reached",
            ));
        }
        if request.currencies.is_empty() || request.currencies.len() > 16 {
            return Err(ApiError::bad_request("1 to 16 currencies", "FF01"));
        }
        let secret_hex = match request.secret_hex {
            Some(secret) => {
                if hex::decode(&secret).map_or(true, |s| s.len() < 16) {
                    return Err(ApiError::bad_request(
                        "secret_hex must be hex of 16 bytes or more",
                        "FF01",
                    ));
                }
                secret
            }
            None => {
                let mut secret = [0u8; 32];
                getrandom::fill(&mut secret).expect("operating system randomness");
                hex::encode(secret)
            }
        };
        let mut currencies = BTreeMap::new();
        let mut accounts = Vec::new();
        let mut lines = Vec::new();
        for (code, terms) in &request.currencies {
            let c = currency(code).ok_or_else(|| {
                ApiError::bad_request(format!("currency {code:?} is not supported"), "AM03")
            })?;
            let parse = |v: &Option<String>| v.as_deref().map_or(Ok(0), |t| amount_in(t, c));
            let net_debit_cap = parse(&terms.net_debit_cap)?;
            if terms.model == SettlementModel::Prefunded && net_debit_cap != 0 {
                return Err(ApiError::bad_request(
                    "a prefunded participant has no net debit cap",
                    "FF01",
                ));
            }
            currencies.insert(
                code.clone(),
                CurrencyTerms {
                    model: terms.model,
                    net_debit_cap,
                    per_payment_max: parse(&terms.per_payment_max)?,
                    liquidity_alert_below: parse(&terms.liquidity_alert_below)?,
                },
            );
            let account = |id, code, flags| Account {
                id,
                ledger: c.numeric,
                code,
                flags,
                ..Account::default()
            };
            accounts.push(account(
                position_account(&request.bic, code),
                ACCOUNT_CODE_POSITION,
                AccountFlags::DEBITS_MUST_NOT_EXCEED_CREDITS.with(AccountFlags::HISTORY),
            ));
            accounts.push(account(
                settlement_account(code),
                ACCOUNT_CODE_SETTLEMENT_BANK,
                AccountFlags::NONE,
            ));
            accounts.push(account(
                ndc_account(code),
                ACCOUNT_CODE_NDC_LINES,
                AccountFlags::NONE,
            ));
            if net_debit_cap > 0 {
                lines.push(Transfer {
                    id: self.clearing.keys.ndc_line(&request.bic, code, b"onboard"),
                    debit_account_id: ndc_account(code),
                    credit_account_id: position_account(&request.bic, code),
                    amount: net_debit_cap,
                    ledger: c.numeric,
                    code: TRANSFER_CODE_NDC_LINE,
                    ..Transfer::default()
                });
            }
        }
        let results = {
            let node = self.node.clone();
            blocking(move || node.create_accounts(accounts)).await?
        };
        if let Some(bad) = results
            .iter()
            .find(|r| !matches!(r, CreateAccountResult::Ok | CreateAccountResult::Exists))
        {
            return Err(ApiError::new(
                500,
                "ledger_refused",
                format!("creating accounts: {bad:?}"),
            ));
        }
        let participant = Participant {
            key_id: format!("{}-1", request.bic),
            bic: request.bic.clone(),
            name: request.name,
            endpoint: request.endpoint.trim_end_matches('/').to_string(),
            status: ParticipantStatus::Active,
            secret_hex: secret_hex.clone(),
            currencies,
            routing_number: request.routing_number.clone(),
        };
        // The net debit cap lines and the participant record are written together.
        let record = RecordPut {
            key: self.clearing.keys.participant(&participant.bic),
            value: encode(&Stored::Participant(participant.clone())),
            open: true,
            aliases: vec![],
            when_transfer_ok: None,
            voucher: None,
        };
        let outcome = engine_submit(&self.node, lines, vec![record]).await?;
        if let Some(bad) = outcome
            .results
            .iter()
            .find(|r| !matches!(r, CreateTransferResult::Ok | CreateTransferResult::Exists))
        {
            return Err(ApiError::new(
                500,
                "ledger_refused",
                format!("net debit cap line: {bad:?}"),
            ));
        }
        let mut all = (*self.participants()).clone();
        all.insert(participant.bic.clone(), participant.clone());
        self.install_participants(all);
        tracing::info!(bic = %participant.bic, "participant onboarded");
        Ok((ParticipantView::of(&participant), secret_hex))
    }

    pub fn participant_view(&self, bic: &str) -> Result<ParticipantView, ApiError> {
        self.participants()
            .get(bic)
            .map(ParticipantView::of)
            .ok_or_else(|| ApiError::not_found("participant"))
    }

    pub async fn change(
        &self,
        bic: &str,
        change: ChangeRequest,
    ) -> Result<ParticipantView, ApiError> {
        let _admin = self.admin.lock().await;
        let mut participant = self
            .participants()
            .get(bic)
            .cloned()
            .ok_or_else(|| ApiError::not_found("participant"))?;
        if let Some(status) = change.status {
            participant.status = status;
        }
        if let Some(endpoint) = &change.endpoint {
            check_endpoint(endpoint)?;
            participant.endpoint = endpoint.trim_end_matches('/').to_string();
        }
        let mut transfers = Vec::new();
        let mut note = None;
        if change.net_debit_cap.is_some()
            || change.per_payment_max.is_some()
            || change.liquidity_alert_below.is_some()
        {
            let code = change.currency.clone().ok_or_else(|| {
                ApiError::bad_request("currency is required to change limits", "FF01")
            })?;
            let c =
                currency(&code).ok_or_else(|| ApiError::bad_request("unknown currency", "AM03"))?;
            let terms = participant.currencies.get_mut(&code).ok_or_else(|| {
                ApiError::bad_request(format!("{code} is not enabled for {bic}"), "AM03")
            })?;
            let parse = |t: &str| amount_in(t, c);
            if let Some(v) = &change.per_payment_max {
                terms.per_payment_max = parse(v)?;
            }
            if let Some(v) = &change.liquidity_alert_below {
                terms.liquidity_alert_below = parse(v)?;
            }
            if let Some(v) = &change.net_debit_cap {
                let new_cap = parse(v)?;
                if terms.model != SettlementModel::DeferredNet {
                    return Err(ApiError::bad_request(
                        "only a deferred-net participant has a net debit cap",
                        "FF01",
                    ));
                }
                let position = position_account(bic, &code);
                let account = {
                    let node = self.node.clone();
                    blocking(move || node.lookup_accounts(vec![position])).await?
                };
                let account = account
                    .first()
                    .copied()
                    .ok_or_else(|| ApiError::new(500, "ledger", "position account missing"))?;
                let available = available(&account);
                let mut id_nonce = [0u8; 16];
                getrandom::fill(&mut id_nonce).expect("randomness");
                let id = self.clearing.keys.ndc_line(bic, &code, &id_nonce);
                if new_cap >= terms.net_debit_cap {
                    transfers.push(Transfer {
                        id,
                        debit_account_id: ndc_account(&code),
                        credit_account_id: position,
                        amount: new_cap - terms.net_debit_cap,
                        ledger: c.numeric,
                        code: TRANSFER_CODE_NDC_LINE,
                        ..Transfer::default()
                    });
                    terms.net_debit_cap = new_cap;
                } else {
                    let reduction = terms.net_debit_cap - new_cap;
                    if reduction > available && !change.allow_below_exposure {
                        return Err(ApiError::new(
                            409,
                            "cap_below_exposure",
                            format!(
                                "lowering the net debit cap by {} needs that much available liquidity, {} is available; set allow_below_exposure to lower it as far as possible now",
                                money::format_amount(reduction, c.exponent),
                                money::format_amount(available, c.exponent)
                            ),
                        )
                        .with_reason("AM23"));
                    }
                    let applied = reduction.min(available);
                    if applied < reduction {
                        note = Some(format!(
                            "net debit cap lowered by {} of {}: exposure holds the rest",
                            money::format_amount(applied, c.exponent),
                            money::format_amount(reduction, c.exponent)
                        ));
                    }
                    if applied > 0 {
                        transfers.push(Transfer {
                            id,
                            debit_account_id: position,
                            credit_account_id: ndc_account(&code),
                            amount: applied,
                            ledger: c.numeric,
                            code: TRANSFER_CODE_NDC_LINE,
                            ..Transfer::default()
                        });
                    }
                    terms.net_debit_cap -= applied;
                }
            }
        }
        let record = RecordPut {
            key: self.clearing.keys.participant(bic),
            value: encode(&Stored::Participant(participant.clone())),
            open: true,
            aliases: vec![],
            when_transfer_ok: (!transfers.is_empty()).then_some(0),
            voucher: None,
        };
        let outcome = engine_submit(&self.node, transfers, vec![record]).await?;
        if let Some(result) = outcome.results.first() {
            if *result != CreateTransferResult::Ok {
                return Err(ApiError::new(
                    409,
                    "ledger_refused",
                    format!("changing the net debit cap: {result:?} (exposure changed meanwhile); nothing changed"),
                )
                .with_reason("AM23"));
            }
        }
        if let Some(note) = note {
            tracing::warn!(
                bic,
                note,
                "net debit cap lowered below exposure by operator override"
            );
        }
        let mut all = (*self.participants()).clone();
        all.insert(bic.to_string(), participant.clone());
        self.install_participants(all);
        Ok(ParticipantView::of(&participant))
    }

    pub async fn liquidity(
        &self,
        bic: &str,
        request: LiquidityRequest,
    ) -> Result<PositionView, ApiError> {
        let participant = self
            .participants()
            .get(bic)
            .cloned()
            .ok_or_else(|| ApiError::not_found("participant"))?;
        if !is_max35(&request.request_id) {
            return Err(ApiError::bad_request(
                "request_id must be 1 to 35 characters",
                "FF01",
            ));
        }
        let c = currency(&request.currency)
            .filter(|c| participant.currencies.contains_key(c.code))
            .ok_or_else(|| {
                ApiError::bad_request(
                    format!("{} is not enabled for {bic}", request.currency),
                    "AM03",
                )
            })?;
        let amount = positive_amount_in(&request.amount, c)?;
        let position = position_account(bic, c.code);
        let settlement = settlement_account(c.code);
        let (debit, credit, code) = match request.direction {
            LiquidityDirection::In => (settlement, position, TRANSFER_CODE_LIQUIDITY_IN),
            LiquidityDirection::Out => (position, settlement, TRANSFER_CODE_LIQUIDITY_OUT),
        };
        let transfer = Transfer {
            id: self
                .clearing
                .keys
                .liquidity_transfer(bic, &request.request_id),
            debit_account_id: debit,
            credit_account_id: credit,
            amount,
            ledger: c.numeric,
            code,
            ..Transfer::default()
        };
        let voucher = VoucherEvent::Liquidity {
            transfer: format!("{:032x}", transfer.id),
            participant: bic.to_string(),
            currency: c.code.to_string(),
            direction: match request.direction {
                LiquidityDirection::In => "in",
                LiquidityDirection::Out => "out",
            }
            .to_string(),
            amount,
            at_ns: self.clock.now_ns(),
        };
        let record = RecordPut {
            key: transfer.id,
            value: voucher.to_bytes(),
            when_transfer_ok: Some(0),
            voucher: Some(voucher.to_bytes()),
            ..RecordPut::default()
        };
        let outcome = engine_submit(&self.node, vec![transfer], vec![record]).await?;
        match outcome.results[0] {
            CreateTransferResult::Ok | CreateTransferResult::Exists => {}
            CreateTransferResult::ExceedsCredits => {
                return Err(ApiError::new(
                    409,
                    "insufficient_liquidity",
                    "withdrawal exceeds available liquidity; nothing changed",
                )
                .with_reason("AM04"))
            }
            r if r.name().starts_with("ExistsWithDifferent") => {
                return Err(ApiError::new(
                    409,
                    "request_id_reused",
                    format!("request_id was used for a different liquidity transfer ({r:?})"),
                )
                .with_reason("DUPL"))
            }
            other => return Err(ApiError::new(500, "ledger_refused", format!("{other:?}"))),
        }
        tracing::info!(bic, currency = c.code, direction = ?request.direction, "liquidity transfer");
        self.lsm.wake.notify_one();
        self.positions(bic)
            .await?
            .into_iter()
            .find(|p| p.currency == c.code)
            .ok_or_else(|| ApiError::not_found("position"))
    }

    pub async fn positions(&self, bic: &str) -> Result<Vec<PositionView>, ApiError> {
        let participant = self
            .participants()
            .get(bic)
            .cloned()
            .ok_or_else(|| ApiError::not_found("participant"))?;
        let ids: Vec<u128> = participant
            .currencies
            .keys()
            .map(|code| position_account(bic, code))
            .collect();
        let accounts = {
            let node = self.node.clone();
            blocking(move || node.lookup_accounts(ids)).await?
        };
        Ok(participant
            .currencies
            .iter()
            .zip(accounts)
            .map(|((code, terms), account)| position_view(code, terms, &account))
            .collect())
    }

    /// Every second: positions below their alert threshold raise one alert per crossing
    /// (log + notification to the participant).
    pub(super) async fn watch_liquidity(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let participants = self.participants();
            let mut ids = Vec::new();
            let mut keys = Vec::new();
            for p in participants.values() {
                for (code, terms) in &p.currencies {
                    if terms.liquidity_alert_below > 0 {
                        ids.push(position_account(&p.bic, code));
                        keys.push((p.bic.clone(), code.clone()));
                    }
                }
            }
            if ids.is_empty() {
                continue;
            }
            let node = self.node.clone();
            let Ok(Ok(accounts)) =
                tokio::task::spawn_blocking(move || node.lookup_accounts(ids)).await
            else {
                continue;
            };
            for ((bic, code), account) in keys.into_iter().zip(accounts) {
                let terms = &participants[&bic].currencies[&code];
                let below = available(&account) < terms.liquidity_alert_below;
                let mut alerted = self.alerted.lock().expect("alerted");
                let was = alerted
                    .insert((bic.clone(), code.clone()), below)
                    .unwrap_or(false);
                drop(alerted);
                if below && !was {
                    let view = position_view(&code, terms, &account);
                    tracing::warn!(
                        bic,
                        currency = code,
                        available = view.available,
                        threshold = view.liquidity_alert_below,
                        "liquidity below alert threshold"
                    );
                    self.notify(&bic, Notification::LiquidityAlert(view));
                }
            }
        }
    }
}
