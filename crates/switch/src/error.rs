//! The API's error: HTTP status, a stable code, a message, and the ISO 20022 reason code where one
//! exists. The bottom of the switch's module stack: it imports nothing from the switch.

use clearhouse_engine::EngineError;

/// An API error: HTTP status, a stable code, a message, and the ISO reason code where one exists.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ApiError {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
    pub reason: Option<&'static str>,
    pub retry_after_seconds: Option<u64>,
}

impl ApiError {
    pub fn new(status: u16, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            reason: None,
            retry_after_seconds: None,
        }
    }
    pub fn with_reason(mut self, reason: &'static str) -> ApiError {
        self.reason = Some(reason);
        self
    }
    pub fn retry_after(mut self, seconds: u64) -> ApiError {
        self.retry_after_seconds = Some(seconds);
        self
    }
    pub(crate) fn bad_request(message: impl Into<String>, reason: &'static str) -> ApiError {
        ApiError::new(400, "invalid_request", message).with_reason(reason)
    }
    /// A payment whose window retention moved to the archive (only its tombstone is hot).
    pub fn archived(window: u64) -> ApiError {
        ApiError::new(
            410,
            "archived",
            format!(
                "the payment finished in settlement window {window}, which is archived: ask the archive (docs/RETENTION.md)"
            ),
        )
    }
    pub(crate) fn not_found(what: &str) -> ApiError {
        ApiError::new(404, "not_found", format!("{what} not found"))
    }
}

impl From<EngineError> for ApiError {
    fn from(error: EngineError) -> ApiError {
        match error {
            EngineError::Overloaded { .. } => {
                ApiError::new(503, "overloaded", error.to_string()).retry_after(1)
            }
            EngineError::DiskFull { .. } => {
                ApiError::new(503, "disk_full", error.to_string()).retry_after(60)
            }
            EngineError::ReadOnly { .. } => {
                ApiError::new(503, "storage_read_only", error.to_string()).retry_after(60)
            }
            EngineError::ReplicationUnavailable => {
                ApiError::new(503, "replication_unavailable", error.to_string()).retry_after(1)
            }
            EngineError::NotLeader => {
                ApiError::new(503, "not_leader", error.to_string()).retry_after(1)
            }
            EngineError::Stopped { .. } => {
                ApiError::new(503, "engine_stopped", error.to_string()).retry_after(1)
            }
            other => ApiError::new(500, "engine_failed", other.to_string()),
        }
    }
}

/// A failure inside clearing (500 `clearing_failed`).
pub(crate) fn internal(error: impl std::fmt::Display) -> ApiError {
    ApiError::new(500, "clearing_failed", error.to_string())
}
