//! clearhouse-ledger: the double-entry ledger state machine.
//!
//! It does: accounts and transfers with 128-bit ids; single-phase, pending (with timeout), post
//! (full or partial) and void transfers; expiry of pending transfers by the batch clock; balancing
//! transfers; closing transfers; linked chains that succeed or fail as one unit; balance limits;
//! idempotency (an id seen before answers `Exists` or `ExistsWithDifferent*`); one result code per
//! event; per-ledger conservation of money asserted after every batch.
//!
//! It deliberately does not: perform I/O, read a clock or randomness (time comes in with each batch,
//! so the journal can replay it exactly), serialize anything (the journal and index own byte
//! layouts), or answer range queries (the engine's on-disk index does).

pub mod results;
pub mod state_machine;
pub mod types;

pub use results::{CreateAccountResult, CreateTransferResult};
pub use state_machine::{
    AccountEvent, AccountEventKind, AccountFilter, BatchError, ChangeSet, Ledger, LedgerLimits,
    LedgerScalars,
};
pub use types::*;
