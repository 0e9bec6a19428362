//! Participants, liquidity, positions, counters, settlement windows, statements, vouchers, the
//! dashboard and the operator's metrics.

use super::*;

pub(super) async fn onboard(
    Signed(state, caller, body, _permit): Signed,
) -> Result<Response, ApiError> {
    operator_only(&caller)?;
    let (view, secret) = state.switch.onboard(json_body(&body)?).await?;
    Ok(ok(
        StatusCode::CREATED,
        &serde_json::json!({"participant": view, "secret_hex": secret}),
    ))
}

pub(super) async fn change(
    Path(bic): Path<String>,
    Signed(state, caller, body, _permit): Signed,
) -> Result<Response, ApiError> {
    operator_only(&caller)?;
    Ok(ok(
        StatusCode::OK,
        &state.switch.change(&bic, json_body(&body)?).await?,
    ))
}

pub(super) async fn liquidity(
    Path(bic): Path<String>,
    Signed(state, caller, body, _permit): Signed,
) -> Result<Response, ApiError> {
    operator_only(&caller)?;
    Ok(ok(
        StatusCode::OK,
        &state.switch.liquidity(&bic, json_body(&body)?).await?,
    ))
}

pub(super) async fn participant(
    Path(bic): Path<String>,
    Signed(state, caller, _, _permit): Signed,
) -> Result<Response, ApiError> {
    self_or_operator(&caller, &bic)?;
    Ok(ok(StatusCode::OK, &state.switch.participant_view(&bic)?))
}

pub(super) async fn positions(
    Path(bic): Path<String>,
    Signed(state, caller, _, _permit): Signed,
) -> Result<Response, ApiError> {
    self_or_operator(&caller, &bic)?;
    Ok(ok(StatusCode::OK, &state.switch.positions(&bic).await?))
}

pub(super) async fn stats(Signed(state, caller, _, _permit): Signed) -> Result<Response, ApiError> {
    operator_only(&caller)?;
    Ok(ok(StatusCode::OK, &state.switch.stats_view()))
}

/// The number in `name=<digits>` of a query, if present.
pub(super) fn query_number(query: Option<&str>, name: &str) -> Result<Option<u64>, ApiError> {
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        if let Some((key, value)) = pair.split_once('=') {
            if key == name {
                return value.parse().map(Some).map_err(|_| {
                    ApiError::new(400, "invalid_query", format!("{name} must be a number"))
                        .with_reason("FF01")
                });
            }
        }
    }
    Ok(None)
}

pub(super) fn query_text<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query
        .unwrap_or("")
        .split('&')
        .filter_map(|p| p.split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value)
}

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct CloseBody {
    #[serde(default = "yes")]
    settle: bool,
}

pub(super) fn yes() -> bool {
    true
}

pub(super) async fn close_window(
    Signed(state, caller, body, _permit): Signed,
) -> Result<Response, ApiError> {
    let request: CloseBody = if body.is_empty() {
        CloseBody { settle: true }
    } else {
        json_body(&body)?
    };
    let report = state.switch.close_window(&caller, request.settle).await?;
    Ok(ok(StatusCode::OK, &report))
}

pub(super) async fn settle_window(
    WindowNumber(window): WindowNumber,
    Signed(state, caller, _, _permit): Signed,
) -> Result<Response, ApiError> {
    Ok(ok(
        StatusCode::OK,
        &state.switch.settle_window(&caller, window).await?,
    ))
}

pub(super) async fn list_windows(
    Signed(state, caller, _, _permit): Signed,
) -> Result<Response, ApiError> {
    Ok(ok(
        StatusCode::OK,
        &state
            .switch
            .windows(&caller, crate::clearing::WINDOWS_LISTED_MAX)
            .await?,
    ))
}

pub(super) async fn get_window(
    WindowNumber(window): WindowNumber,
    RawQuery(query): RawQuery,
    Signed(state, caller, _, _permit): Signed,
) -> Result<Response, ApiError> {
    let report = state.switch.window_report(&caller, window).await?;
    let typed = |content_type: &'static str, text: String| {
        ([(axum::http::header::CONTENT_TYPE, content_type)], text).into_response()
    };
    match query_text(query.as_deref(), "format").unwrap_or("json") {
        "json" => Ok(ok(StatusCode::OK, &report)),
        "csv" => Ok(typed("text/csv", report.to_csv())),
        "svg" => Ok(typed("image/svg+xml", report.to_svg())),
        other => Err(ApiError::new(
            400,
            "invalid_query",
            format!("format {other:?} is not one of json, csv, svg"),
        )
        .with_reason("FF01")),
    }
}

pub(super) async fn statements(
    WindowNumber(window): WindowNumber,
    RawQuery(query): RawQuery,
    Signed(state, caller, _, _permit): Signed,
) -> Result<Response, ApiError> {
    let participant = query_text(query.as_deref(), "participant");
    let statements = state
        .switch
        .statements(&caller, window, participant)
        .await?;
    match query_text(query.as_deref(), "format").unwrap_or("json") {
        "json" => Ok(ok(StatusCode::OK, &statements)),
        "csv" => {
            let mut out = Vec::new();
            for statement in &statements {
                statement
                    .write_csv(&mut out)
                    .map_err(|e| ApiError::new(500, "internal", e.to_string()))?;
            }
            Ok(([(axum::http::header::CONTENT_TYPE, "text/csv")], out).into_response())
        }
        "camt054" => {
            let xml = crate::clearing::statement_camt054(
                &statements,
                &format!("NTFC-W{window}-{}", participant.unwrap_or("own")),
            )?;
            Ok(([(axum::http::header::CONTENT_TYPE, "application/xml")], xml).into_response())
        }
        "camt053" => {
            let xml = crate::clearing::statement_camt053(
                &statements,
                &format!("STMT-W{window}-{}", participant.unwrap_or("own")),
            )?;
            Ok(([(axum::http::header::CONTENT_TYPE, "application/xml")], xml).into_response())
        }
        other => Err(ApiError::new(
            400,
            "invalid_query",
            format!("format {other:?} is not one of json, csv, camt053, camt054"),
        )
        .with_reason("FF01")),
    }
}

pub(super) async fn vouchers(
    RawQuery(query): RawQuery,
    Signed(state, caller, _, _permit): Signed,
) -> Result<Response, ApiError> {
    let from = query_number(query.as_deref(), "from")?.unwrap_or(1);
    let limit = query_number(query.as_deref(), "limit")?.unwrap_or(1_000);
    let page = state
        .switch
        .vouchers(&caller, from, limit.min(usize::MAX as u64) as usize)
        .await?;
    Ok(ok(StatusCode::OK, &page))
}

/// The live dashboard: one self-contained page (no external assets); it signs its own API calls.
pub(super) async fn dashboard_page() -> Response {
    (
        [
            (axum::http::header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (
                axum::http::header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:",
            ),
        ],
        include_str!("../dashboard.html"),
    )
        .into_response()
}

pub(super) async fn dashboard_data(
    Signed(state, caller, _, _permit): Signed,
) -> Result<Response, ApiError> {
    Ok(ok(StatusCode::OK, &state.switch.dashboard(&caller).await?))
}

/// GET /v1/admin/metrics: the operator's Prometheus text, signed like every API call: the
/// aggregates of `/metrics` plus per-participant liquidity (confidential, so not on `/metrics`).
pub(super) async fn operator_metrics(
    Signed(state, caller, _, _permit): Signed,
) -> Result<Response, ApiError> {
    operator_only(&caller)?;
    Ok((
        [("content-type", "text/plain; version=0.0.4")],
        state.switch.render_operator_metrics().await,
    )
        .into_response())
}
