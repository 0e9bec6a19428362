//! clearhouse-clearing: what clearing means, independent of where the data lives.
//!
//! It does: define the business events that become vouchers and their canonical bytes
//! ([`event`]); accumulate per-participant positions and turn them into multilateral net
//! positions, settlement instructions and per-currency figures ([`netting`]); sign and verify
//! checkpoints of the voucher chain with Ed25519, write and verify full voucher exports, and verify
//! a participant's partial view against a signed checkpoint ([`export`]); render window reports
//! as JSON, CSV and SVG ([`report`]).
//!
//! It deliberately does not: touch the ledger or the network (the switch posts fund adjustments
//! and serves vouchers; the engine chains them in journal order), keep state across calls, or use
//! floating point for money (amounts are u128 minor units, nets i128, checked; ratios are integer
//! basis points).

pub mod event;
pub mod export;
pub mod netting;
pub mod reconcile;
pub mod report;
pub mod statement;

pub use event::VoucherEvent;
pub use netting::{Accumulators, Instruction, NetPosition, Position, SettlementPlan};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ClearingError {
    #[error("amount overflow while {0}")]
    Overflow(&'static str),
    #[error("voucher {seq}: {reason}")]
    Voucher { seq: u64, reason: String },
    #[error("checkpoint of window {window} at voucher {seq}: {reason}")]
    Checkpoint {
        window: u64,
        seq: u64,
        reason: String,
    },
    #[error("export at byte {offset} (voucher {seq}): {reason}")]
    Export {
        offset: u64,
        seq: u64,
        reason: String,
    },
    #[error("io: {0}")]
    Io(String),
}

impl From<std::io::Error> for ClearingError {
    fn from(error: std::io::Error) -> ClearingError {
        ClearingError::Io(error.to_string())
    }
}
