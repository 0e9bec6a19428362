//! Plain data types of the ledger: accounts, transfers, flags, balances.
//!
//! Money is an unsigned integer number of minor units (`u128`), as in TigerBeetle.
//! These types carry no serialization: the journal and index define their own byte layouts.

/// Largest id value: reserved, never a valid id.
pub const ID_MAX: u128 = u128::MAX;

/// Most events one `create_accounts` / `create_transfers` batch may hold.
/// Chosen so that a batch of 128-byte events fits a 1 MiB message with its header, as in TigerBeetle.
pub const BATCH_EVENTS_MAX: usize = 8_189;

/// Timeouts are given in seconds and the engine clock counts nanoseconds.
pub const NANOSECONDS_PER_SECOND: u64 = 1_000_000_000;

macro_rules! flags {
    ($name:ident : $repr:ty { $($flag:ident = $bit:expr),* $(,)? }) => {
        #[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
        pub struct $name(pub $repr);
        impl $name {
            $(pub const $flag: $name = $name(1 << $bit);)*
            pub const NONE: $name = $name(0);
            pub const ALL: $name = $name(0 $(| (1 << $bit))*);
            #[inline]
            pub fn contains(self, other: $name) -> bool { self.0 & other.0 == other.0 }
            #[inline]
            pub fn intersects(self, other: $name) -> bool { self.0 & other.0 != 0 }
            #[inline]
            pub fn with(self, other: $name) -> $name { $name(self.0 | other.0) }
            #[inline]
            pub fn without(self, other: $name) -> $name { $name(self.0 & !other.0) }
            /// True when a bit outside the defined flags is set.
            #[inline]
            pub fn has_reserved_bits(self) -> bool { self.0 & !Self::ALL.0 != 0 }
        }
        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                let mut names = Vec::new();
                $(if self.contains($name::$flag) { names.push(stringify!($flag)); })*
                if self.has_reserved_bits() { names.push("RESERVED"); }
                write!(f, "{}({})", stringify!($name), names.join("|"))
            }
        }
    };
}

flags!(AccountFlags: u16 {
    LINKED = 0,
    DEBITS_MUST_NOT_EXCEED_CREDITS = 1,
    CREDITS_MUST_NOT_EXCEED_DEBITS = 2,
    HISTORY = 3,
    CLOSED = 4,
});

flags!(TransferFlags: u16 {
    LINKED = 0,
    PENDING = 1,
    POST_PENDING = 2,
    VOID_PENDING = 3,
    BALANCING_DEBIT = 4,
    BALANCING_CREDIT = 5,
    CLOSING_DEBIT = 6,
    CLOSING_CREDIT = 7,
});

/// An account. Immutable once created, except its four balances and the CLOSED flag
/// (which only a pending closing transfer sets; voiding or expiry of that transfer clears it,
/// posting it makes it permanent).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Account {
    pub id: u128,
    pub debits_pending: u128,
    pub debits_posted: u128,
    pub credits_pending: u128,
    pub credits_posted: u128,
    pub user_data_128: u128,
    pub user_data_64: u64,
    pub user_data_32: u32,
    /// The ledger (currency) the account belongs to. Transfers only move money within one ledger.
    pub ledger: u32,
    pub code: u16,
    pub flags: AccountFlags,
    /// Set by the ledger at creation (nanoseconds, strictly increasing across all events).
    pub timestamp: u64,
}

impl Account {
    pub fn balance(&self) -> Balance {
        Balance {
            debits_pending: self.debits_pending,
            debits_posted: self.debits_posted,
            credits_pending: self.credits_pending,
            credits_posted: self.credits_posted,
        }
    }
}

/// The four balances of an account at one moment.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Balance {
    pub debits_pending: u128,
    pub debits_posted: u128,
    pub credits_pending: u128,
    pub credits_posted: u128,
}

/// A transfer of `amount` minor units from `debit_account_id` to `credit_account_id`.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Transfer {
    pub id: u128,
    pub debit_account_id: u128,
    pub credit_account_id: u128,
    pub amount: u128,
    /// For POST_PENDING / VOID_PENDING: the pending transfer being resolved. Zero otherwise.
    pub pending_id: u128,
    pub user_data_128: u128,
    pub user_data_64: u64,
    pub user_data_32: u32,
    /// For PENDING transfers: seconds after creation at which the reservation expires (0 = never).
    pub timeout: u32,
    pub ledger: u32,
    pub code: u16,
    pub flags: TransferFlags,
    /// Set by the ledger at creation.
    pub timestamp: u64,
}

/// What became of a pending transfer.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
#[repr(u8)]
pub enum PendingStatus {
    /// Not a pending transfer.
    #[default]
    None = 0,
    Pending = 1,
    Posted = 2,
    Voided = 3,
    Expired = 4,
}

impl PendingStatus {
    pub fn from_u8(value: u8) -> Option<PendingStatus> {
        Some(match value {
            0 => PendingStatus::None,
            1 => PendingStatus::Pending,
            2 => PendingStatus::Posted,
            3 => PendingStatus::Voided,
            4 => PendingStatus::Expired,
            _ => return None,
        })
    }
}

/// A transfer as the ledger stores it: the transfer plus, for pending transfers, their fate.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct StoredTransfer {
    pub transfer: Transfer,
    pub status: PendingStatus,
}

impl StoredTransfer {
    /// When a pending transfer with a timeout expires (nanoseconds), if it can.
    pub fn expires_at(&self) -> Option<u64> {
        if self.transfer.flags.contains(TransferFlags::PENDING) && self.transfer.timeout > 0 {
            Some(
                self.transfer
                    .timestamp
                    .saturating_add(self.transfer.timeout as u64 * NANOSECONDS_PER_SECOND),
            )
        } else {
            None
        }
    }
}
