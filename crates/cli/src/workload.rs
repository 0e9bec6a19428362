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
    /// An exponentially distributed integer with the given mean, by inverse transform sampling in
    /// integer fixed point: -ln(u / 2^64) = (64 - log2 u) * ln 2, with log2 to 16 fractional bits.
    pub fn exponential(&mut self, mean: u64) -> u64 {
        const FRACTION_BITS: u32 = 16;
        // ln 2 in Q32.
        const LN2_Q32: u128 = 2_977_044_472;
        let u = self.next_u64() | 1;
        let integer = 63 - u.leading_zeros();
        // The mantissa in [1, 2) as Q63; squaring it yields one bit of the logarithm at a time.
        let mut mantissa = (u as u128) << (63 - integer);
        let mut log2_q16 = (integer as u128) << FRACTION_BITS;
        for bit in (0..FRACTION_BITS).rev() {
            mantissa = (mantissa * mantissa) >> 63;
            if mantissa >= 1 << 64 {
                mantissa >>= 1;
                log2_q16 |= 1 << bit;
            }
        }
        let minus_ln_q48 = ((64u128 << FRACTION_BITS) - log2_q16) * LN2_Q32;
        ((minus_ln_q48 * mean as u128) >> (FRACTION_BITS + 32)) as u64
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exponential_samples_have_the_requested_mean_and_spread() {
        let mut rng = Rng::new(42);
        let count = 200_000u64;
        let samples: Vec<u64> = (0..count).map(|_| rng.exponential(10_000)).collect();
        let mean = samples.iter().sum::<u64>() / count;
        assert!((9_800..=10_200).contains(&mean), "mean {mean}");
        // For an exponential distribution, P(X > mean) = 1/e, about 36.8 %.
        let above = samples.iter().filter(|s| **s > 10_000).count() as u64 * 1000 / count;
        assert!(
            (358..=378).contains(&above),
            "{above} per mille above the mean"
        );
        assert!(samples.contains(&0) && samples.iter().any(|s| *s > 80_000));
    }
}
