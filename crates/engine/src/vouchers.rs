//! The voucher chain: an append-only, hash-chained log of business events, written atomically
//! with the application records that carry them and chained in journal order, so replay rebuilds
//! exactly the same chain.
//!
//! `leaf = BLAKE3(body)`, `hash(n) = BLAKE3("clearhouse-voucher-v1" ‖ n (u64 LE) ‖ hash(n-1) ‖ leaf)`,
//! `hash(0) = 32 zero bytes`. Chaining the leaf rather than the body lets a participant check its
//! own vouchers against a signed chain head given only the leaves of everybody else's.

/// Largest voucher body (the canonical bytes of one business event).
pub const VOUCHER_BODY_MAX: usize = 1024;

/// The hash before the first voucher.
pub const GENESIS_HASH: [u8; 32] = [0; 32];

const DOMAIN: &[u8] = b"clearhouse-voucher-v1";

/// One voucher as stored: its sequence number (1, 2, ...), its chain hash and its body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Voucher {
    pub seq: u64,
    pub hash: [u8; 32],
    pub body: Vec<u8>,
}

/// Where a voucher landed: its sequence number and chain hash.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VoucherStamp {
    pub seq: u64,
    pub hash: [u8; 32],
}

pub fn leaf_digest(body: &[u8]) -> [u8; 32] {
    *blake3::hash(body).as_bytes()
}

/// The chain hash of voucher `seq` from the previous hash and the voucher's leaf digest.
pub fn chain_hash(previous: &[u8; 32], seq: u64, leaf: &[u8; 32]) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new();
    hasher.update(DOMAIN);
    hasher.update(&seq.to_le_bytes());
    hasher.update(previous);
    hasher.update(leaf);
    *hasher.finalize().as_bytes()
}

/// The head of the chain: the last voucher's sequence number and hash.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VoucherChain {
    pub seq: u64,
    pub hash: [u8; 32],
}

impl Default for VoucherChain {
    fn default() -> VoucherChain {
        VoucherChain {
            seq: 0,
            hash: GENESIS_HASH,
        }
    }
}

impl VoucherChain {
    pub fn append(&mut self, body: Vec<u8>) -> Voucher {
        assert!(
            body.len() <= VOUCHER_BODY_MAX,
            "voucher body checked at submit"
        );
        let seq = self.seq.checked_add(1).expect("voucher sequence overflow");
        let hash = chain_hash(&self.hash, seq, &leaf_digest(&body));
        self.seq = seq;
        self.hash = hash;
        Voucher { seq, hash, body }
    }

    pub fn stamp(&self) -> VoucherStamp {
        VoucherStamp {
            seq: self.seq,
            hash: self.hash,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_field_changes_the_hash() {
        let mut a = VoucherChain::default();
        let first = a.append(b"one".to_vec());
        let second = a.append(b"two".to_vec());
        assert_eq!(first.seq, 1);
        assert_eq!(second.seq, 2);
        assert_eq!(
            second.hash,
            chain_hash(&first.hash, 2, &leaf_digest(b"two"))
        );
        assert_ne!(
            second.hash,
            chain_hash(&first.hash, 3, &leaf_digest(b"two"))
        );
        assert_ne!(
            second.hash,
            chain_hash(&GENESIS_HASH, 2, &leaf_digest(b"two"))
        );
        assert_ne!(
            second.hash,
            chain_hash(&first.hash, 2, &leaf_digest(b"tw0"))
        );
    }
}
