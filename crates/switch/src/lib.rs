//! clearhouse-switch: the real-time payment switch.
//!
//! It does: keep participants (BIC, currencies, settlement model, limits, endpoint, key) and their
//! liquidity positions on the ledger; run the payment lifecycle (validate, reserve, forward to the
//! creditor agent, settle or reject with an ISO 20022 reason code, within a deadline, exactly one
//! final state, surviving restarts); authenticate every request (HMAC-SHA256 signed, replay and
//! staleness refused); serve the HTTP API (axum) with an OpenAPI document; forward and notify over
//! signed HTTP with bounded concurrency, queues and retries; terminate TLS (rustls) when
//! configured.
//!
//! It deliberately does not: move money outside the ledger (every balance is a ledger account,
//! every movement a ledger transfer), keep its own files besides the operator key (participants
//! and payments are engine records, journaled with the transfers they explain), parse XML itself (clearhouse-iso20022 does; `iso.rs` converts a pacs.008 into
//! the same [`switch::PaymentRequest`] as JSON and answers with pacs.002).

pub mod api;
pub mod auth;
pub mod clearing;
pub mod client;
pub mod clock;
pub mod config;
pub mod engine_io;
pub mod error;
pub mod exports;
pub mod http;
pub mod iso;
pub mod metrics;
pub mod model;
pub mod money;
pub mod outbound;
pub mod profile;
pub mod sim;
pub mod storage;
pub mod stored;
pub mod switch;

pub use config::SwitchConfig;
pub use switch::{ApiError, Caller, PaymentRequest, PaymentView, Switch};
