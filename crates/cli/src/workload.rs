//! Workload generation for the benchmarks: a small seeded PRNG and the L1 transfer generator.

use clearhouse_ledger::{Account, AccountFlags, Transfer, TransferFlags};

/// SplitMix64: tiny, fast, and good enough for workload generation (not for security).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in 0..bound.
    pub fn below(&mut self, bound: u64) -> u64 {
        ((self.next_u64() as u128 * bound as u128) >> 64) as u64
    }
    /// An exponentially distributed integer with the given mean (inverse transform sampling).
    /// Workload generation only: the ledger itself never sees a float.
    pub fn exponential(&mut self, mean: u64) -> u64 {
        let uniform = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        (-(1.0 - uniform).ln() * mean as f64) as u64
    }
}

pub const L1_LEDGER: u32 = 2;

pub fn l1_accounts(count: u64) -> Vec<Account> {
    (1..=count as u128)
        .map(|id| Account {
            id,
            ledger: L1_LEDGER,
            code: 1,
            flags: AccountFlags::HISTORY,
            ..Account::default()
        })
        .collect()
}

/// Parameters of the L1 generator and its variants.
#[derive(Clone, Copy, Debug)]
pub struct L1Shape {
    pub account_count: u64,
    pub account_count_hot: u64,
    pub transfer_hot_percent: u64,
    pub transfer_pending_percent: u64,
}

/// Transfer `id` of workload L1.
pub fn l1_transfer(rng: &mut Rng, shape: &L1Shape, id: u128) -> Transfer {
    let accounts = shape.account_count;
    let (debit, mut credit) =
        if shape.account_count_hot > 0 && rng.below(100) < shape.transfer_hot_percent {
            let hot = shape.account_count_hot.min(accounts - 1);
            (1 + rng.below(hot), 1 + hot + rng.below(accounts - hot))
        } else {
            (1 + rng.below(accounts), 1 + rng.below(accounts))
        };
    if credit == debit {
        credit = debit % accounts + 1;
    }
    let pending =
        shape.transfer_pending_percent > 0 && rng.below(100) < shape.transfer_pending_percent;
    Transfer {
        id,
        debit_account_id: debit as u128,
        credit_account_id: credit as u128,
        amount: 1 + rng.exponential(10_000) as u128,
        ledger: L1_LEDGER,
        code: 1 + rng.below(65_535) as u16,
        flags: if pending {
            TransferFlags::PENDING
        } else {
            TransferFlags::NONE
        },
        timeout: if pending { 1 } else { 0 },
        ..Transfer::default()
    }
}
