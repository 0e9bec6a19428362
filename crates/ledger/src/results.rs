//! Result codes: one per failure, so a client always knows exactly why an event was refused.
//! The numeric values are part of the journal and wire formats: append, never renumber.

macro_rules! result_codes {
    ($(#[$meta:meta])* $name:ident { $($variant:ident = $value:expr),* $(,)? }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
        #[repr(u32)]
        pub enum $name { $($variant = $value),* }
        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),*];
            pub fn as_u32(self) -> u32 { self as u32 }
            pub fn from_u32(value: u32) -> Option<$name> {
                match value { $($value => Some($name::$variant),)* _ => None }
            }
            /// snake_case name, stable, used in APIs and reports.
            pub fn name(self) -> &'static str {
                match self { $($name::$variant => stringify!($variant),)* }
            }
            pub fn is_ok(self) -> bool { self.as_u32() == 0 }
            /// Idempotent success: the same event was already applied with the same fields.
            pub fn is_ok_or_exists(self) -> bool { self.is_ok() || self.name() == "Exists" }
        }
        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result { f.write_str(self.name()) }
        }
    };
}

result_codes!(
    /// Outcome of one event of a `create_accounts` batch.
    CreateAccountResult {
        Ok = 0,
        LinkedEventFailed = 1,
        LinkedEventChainOpen = 2,
        TimestampMustBeZero = 3,
        ReservedField = 4,
        ReservedFlag = 5,
        IdMustNotBeZero = 6,
        IdMustNotBeIntMax = 7,
        FlagsAreMutuallyExclusive = 8,
        DebitsPendingMustBeZero = 9,
        DebitsPostedMustBeZero = 10,
        CreditsPendingMustBeZero = 11,
        CreditsPostedMustBeZero = 12,
        LedgerMustNotBeZero = 13,
        CodeMustNotBeZero = 14,
        ClosedFlagMustNotBeSet = 15,
        ExistsWithDifferentFlags = 16,
        ExistsWithDifferentUserData128 = 17,
        ExistsWithDifferentUserData64 = 18,
        ExistsWithDifferentUserData32 = 19,
        ExistsWithDifferentLedger = 20,
        ExistsWithDifferentCode = 21,
        Exists = 22,
        AccountsFull = 23,
    }
);

result_codes!(
    /// Outcome of one event of a `create_transfers` batch.
    CreateTransferResult {
        Ok = 0,
        LinkedEventFailed = 1,
        LinkedEventChainOpen = 2,
        TimestampMustBeZero = 3,
        ReservedFlag = 4,
        IdMustNotBeZero = 5,
        IdMustNotBeIntMax = 6,
        FlagsAreMutuallyExclusive = 7,
        DebitAccountIdMustNotBeZero = 8,
        DebitAccountIdMustNotBeIntMax = 9,
        CreditAccountIdMustNotBeZero = 10,
        CreditAccountIdMustNotBeIntMax = 11,
        AccountsMustBeDifferent = 12,
        PendingIdMustBeZero = 13,
        PendingIdMustNotBeZero = 14,
        PendingIdMustNotBeIntMax = 15,
        PendingIdMustBeDifferent = 16,
        TimeoutReservedForPendingTransfer = 17,
        LedgerMustNotBeZero = 18,
        CodeMustNotBeZero = 19,
        AmountMustNotBeZero = 20,
        ExistsWithDifferentFlags = 21,
        ExistsWithDifferentDebitAccountId = 22,
        ExistsWithDifferentCreditAccountId = 23,
        ExistsWithDifferentAmount = 24,
        ExistsWithDifferentPendingId = 25,
        ExistsWithDifferentUserData128 = 26,
        ExistsWithDifferentUserData64 = 27,
        ExistsWithDifferentUserData32 = 28,
        ExistsWithDifferentTimeout = 29,
        ExistsWithDifferentLedger = 30,
        ExistsWithDifferentCode = 31,
        Exists = 32,
        PendingTransferNotFound = 33,
        PendingTransferNotPending = 34,
        PendingTransferHasDifferentDebitAccountId = 35,
        PendingTransferHasDifferentCreditAccountId = 36,
        PendingTransferHasDifferentLedger = 37,
        PendingTransferHasDifferentCode = 38,
        ExceedsPendingTransferAmount = 39,
        PendingTransferHasDifferentAmount = 40,
        PendingTransferAlreadyPosted = 41,
        PendingTransferAlreadyVoided = 42,
        PendingTransferExpired = 43,
        DebitAccountNotFound = 44,
        CreditAccountNotFound = 45,
        AccountsMustHaveTheSameLedger = 46,
        TransferMustHaveTheSameLedgerAsAccounts = 47,
        DebitAccountAlreadyClosed = 48,
        CreditAccountAlreadyClosed = 49,
        OverflowsDebitsPending = 50,
        OverflowsCreditsPending = 51,
        OverflowsDebitsPosted = 52,
        OverflowsCreditsPosted = 53,
        OverflowsDebits = 54,
        OverflowsCredits = 55,
        OverflowsTimeout = 56,
        ExceedsCredits = 57,
        ExceedsDebits = 58,
        PendingTransfersFull = 59,
        ClosingTransferMustBePending = 60,
    }
);
