//! Signed checkpoints, full voucher exports, and verification.
//!
//! A checkpoint is the operator's Ed25519 signature over
//! `"clearhouse-checkpoint-v1" ‖ window (u64 LE) ‖ seq (u64 LE) ‖ chain hash at seq`, made when a
//! window closes. An export is a self-contained binary file:
//!
//! ```text
//! magic "CLEARHOUSE-VOUCHERS-1\n" (22 bytes), operator public key (32 bytes), then frames:
//!   'V' seq (u64 LE) hash (32) body length (u16 LE) body      one voucher, in sequence order
//!   'C' window (u64 LE) seq (u64 LE) hash (32) signature (64)  a checkpoint, right after voucher seq
//!   'E' vouchers (u64 LE) checkpoints (u64 LE)                 the end; nothing may follow
//! ```
//!
//! [`verify_export`] recomputes every hash from the bodies, checks every checkpoint's hash and
//! signature, and names the first voucher (or checkpoint) that does not hold.

use std::io::{BufRead, Read, Write};

use clearhouse_engine::vouchers::{chain_hash, leaf_digest, GENESIS_HASH, VOUCHER_BODY_MAX};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::event::VoucherEvent;
use crate::ClearingError;

pub const EXPORT_MAGIC: &[u8; 22] = b"CLEARHOUSE-VOUCHERS-1\n";
const CHECKPOINT_DOMAIN: &[u8] = b"clearhouse-checkpoint-v1";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub window: u64,
    pub seq: u64,
    #[serde(with = "hex_bytes")]
    pub hash: [u8; 32],
    #[serde(with = "hex_bytes")]
    pub signature: [u8; 64],
}

mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer, const N: usize>(
        value: &[u8; N],
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&hex::encode(value))
    }

    pub fn deserialize<'de, D: Deserializer<'de>, const N: usize>(
        deserializer: D,
    ) -> Result<[u8; N], D::Error> {
        let text = String::deserialize(deserializer)?;
        let bytes = hex::decode(&text).map_err(serde::de::Error::custom)?;
        bytes
            .try_into()
            .map_err(|_| serde::de::Error::custom(format!("expected {N} bytes of hex")))
    }
}

pub fn checkpoint_message(window: u64, seq: u64, hash: &[u8; 32]) -> Vec<u8> {
    let mut message = Vec::with_capacity(CHECKPOINT_DOMAIN.len() + 48);
    message.extend_from_slice(CHECKPOINT_DOMAIN);
    message.extend_from_slice(&window.to_le_bytes());
    message.extend_from_slice(&seq.to_le_bytes());
    message.extend_from_slice(hash);
    message
}

pub fn sign_checkpoint(key: &SigningKey, window: u64, seq: u64, hash: [u8; 32]) -> Checkpoint {
    let signature = key.sign(&checkpoint_message(window, seq, &hash));
    Checkpoint {
        window,
        seq,
        hash,
        signature: signature.to_bytes(),
    }
}

pub fn verify_checkpoint(
    public_key: &VerifyingKey,
    checkpoint: &Checkpoint,
) -> Result<(), ClearingError> {
    public_key
        .verify(
            &checkpoint_message(checkpoint.window, checkpoint.seq, &checkpoint.hash),
            &Signature::from_bytes(&checkpoint.signature),
        )
        .map_err(|_| ClearingError::Checkpoint {
            window: checkpoint.window,
            seq: checkpoint.seq,
            reason: "the signature does not verify with the operator's public key".into(),
        })
}

/// Writes an export; call [`ExportWriter::finish`] at the end.
pub struct ExportWriter<W: Write> {
    out: W,
    vouchers: u64,
    checkpoints: u64,
}

impl<W: Write> ExportWriter<W> {
    pub fn new(mut out: W, public_key: &VerifyingKey) -> Result<ExportWriter<W>, ClearingError> {
        out.write_all(EXPORT_MAGIC)?;
        out.write_all(public_key.as_bytes())?;
        Ok(ExportWriter {
            out,
            vouchers: 0,
            checkpoints: 0,
        })
    }

    pub fn voucher(&mut self, seq: u64, hash: &[u8; 32], body: &[u8]) -> Result<(), ClearingError> {
        assert!(body.len() <= VOUCHER_BODY_MAX);
        self.out.write_all(b"V")?;
        self.out.write_all(&seq.to_le_bytes())?;
        self.out.write_all(hash)?;
        self.out.write_all(&(body.len() as u16).to_le_bytes())?;
        self.out.write_all(body)?;
        self.vouchers += 1;
        Ok(())
    }

    pub fn checkpoint(&mut self, checkpoint: &Checkpoint) -> Result<(), ClearingError> {
        self.out.write_all(b"C")?;
        self.out.write_all(&checkpoint.window.to_le_bytes())?;
        self.out.write_all(&checkpoint.seq.to_le_bytes())?;
        self.out.write_all(&checkpoint.hash)?;
        self.out.write_all(&checkpoint.signature)?;
        self.checkpoints += 1;
        Ok(())
    }

    pub fn finish(mut self) -> Result<W, ClearingError> {
        self.out.write_all(b"E")?;
        self.out.write_all(&self.vouchers.to_le_bytes())?;
        self.out.write_all(&self.checkpoints.to_le_bytes())?;
        self.out.flush()?;
        Ok(self.out)
    }
}

/// What a verification found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    pub vouchers: u64,
    pub checkpoints: u64,
    /// The last voucher and its hash (hex), and the last signed one.
    pub head_seq: u64,
    pub head_hash: String,
    pub last_checkpoint_seq: u64,
    /// Vouchers after the last checkpoint: chained correctly but not yet signed.
    pub unsigned_tail: u64,
    pub public_key: String,
    /// Vouchers 1..=this were not verified here but taken from the signed checkpoint at this
    /// voucher (the hot part of a data directory after retention); 0: from the first voucher.
    #[serde(default)]
    pub anchored_at: u64,
}

/// Incremental verifier of a chain given in sequence order (used for exports and the live data
/// directory alike).
#[derive(Clone, Debug)]
pub struct ChainVerifier {
    public_key: VerifyingKey,
    seq: u64,
    hash: [u8; 32],
    /// The window the last voucher closed, when it was a `window_closed` voucher.
    closed_window: Option<u64>,
    checkpoints: u64,
    last_checkpoint_seq: u64,
    /// Vouchers 1..=this were taken on trust of a signed checkpoint (retention's anchor).
    anchored_at: u64,
}

impl ChainVerifier {
    /// A verifier that starts after a signed checkpoint instead of at the genesis: the hot part
    /// of a chain whose older vouchers retention moved to the archive. The checkpoint's
    /// signature is checked here; what it signs is taken as the chain up to it.
    pub fn anchored(
        public_key: VerifyingKey,
        checkpoint: &Checkpoint,
    ) -> Result<ChainVerifier, ClearingError> {
        verify_checkpoint(&public_key, checkpoint)?;
        Ok(ChainVerifier {
            public_key,
            seq: checkpoint.seq,
            hash: checkpoint.hash,
            closed_window: None,
            checkpoints: 1,
            last_checkpoint_seq: checkpoint.seq,
            anchored_at: checkpoint.seq,
        })
    }

    /// A verifier that takes (seq, hash) as the chain so far without a signature: for checking
    /// one archive file on its own (its last checkpoint is then checked as usual).
    pub fn starting_at(public_key: VerifyingKey, seq: u64, hash: [u8; 32]) -> ChainVerifier {
        ChainVerifier {
            public_key,
            seq,
            hash,
            closed_window: None,
            checkpoints: 0,
            last_checkpoint_seq: seq,
            anchored_at: seq,
        }
    }

    /// The last voucher verified and its hash.
    pub fn head(&self) -> (u64, [u8; 32]) {
        (self.seq, self.hash)
    }

    pub fn new(public_key: VerifyingKey) -> ChainVerifier {
        ChainVerifier {
            public_key,
            seq: 0,
            hash: GENESIS_HASH,
            closed_window: None,
            checkpoints: 0,
            last_checkpoint_seq: 0,
            anchored_at: 0,
        }
    }

    pub fn voucher(&mut self, seq: u64, hash: &[u8; 32], body: &[u8]) -> Result<(), ClearingError> {
        let fail = |reason: String| ClearingError::Voucher { seq, reason };
        if seq != self.seq + 1 {
            return Err(fail(format!(
                "sequence number {seq} where {} was expected",
                self.seq + 1
            )));
        }
        let computed = chain_hash(&self.hash, seq, &leaf_digest(body));
        if &computed != hash {
            return Err(fail(format!(
                "hash does not match its body and the previous hash (stored {}, computed {})",
                hex::encode(hash),
                hex::encode(computed)
            )));
        }
        let event = VoucherEvent::parse(body)
            .map_err(|error| fail(format!("body is not a voucher event: {error}")))?;
        self.closed_window = match event {
            VoucherEvent::WindowClosed { window, .. } => Some(window),
            _ => None,
        };
        self.seq = seq;
        self.hash = computed;
        Ok(())
    }

    /// A checkpoint must sign the voucher just verified, which must close its window.
    pub fn checkpoint(&mut self, checkpoint: &Checkpoint) -> Result<(), ClearingError> {
        let fail = |reason: String| ClearingError::Checkpoint {
            window: checkpoint.window,
            seq: checkpoint.seq,
            reason,
        };
        if checkpoint.seq != self.seq || checkpoint.seq == 0 {
            return Err(fail(format!(
                "signs voucher {} but follows voucher {}",
                checkpoint.seq, self.seq
            )));
        }
        if self.closed_window != Some(checkpoint.window) {
            return Err(fail(format!(
                "voucher {} does not close window {}",
                checkpoint.seq, checkpoint.window
            )));
        }
        if checkpoint.hash != self.hash {
            return Err(fail("signed hash differs from the chain's hash".into()));
        }
        verify_checkpoint(&self.public_key, checkpoint)?;
        self.checkpoints += 1;
        self.last_checkpoint_seq = checkpoint.seq;
        Ok(())
    }

    pub fn report(&self) -> VerifyReport {
        VerifyReport {
            vouchers: self.seq,
            checkpoints: self.checkpoints,
            head_seq: self.seq,
            head_hash: hex::encode(self.hash),
            last_checkpoint_seq: self.last_checkpoint_seq,
            unsigned_tail: self.seq - self.last_checkpoint_seq,
            public_key: hex::encode(self.public_key.as_bytes()),
            anchored_at: self.anchored_at,
        }
    }
}

/// Verifies a full export. With `trusted_key`, the export's key must be that key (else the key in
/// the export is used, and reported, so the caller can compare it with the one it trusts).
/// `progress` is called with the bytes read so far, every 64 KiB or so.
pub fn verify_export(
    input: impl Read,
    trusted_key: Option<&VerifyingKey>,
    mut progress: impl FnMut(u64),
) -> Result<VerifyReport, ClearingError> {
    let mut reader = std::io::BufReader::with_capacity(1 << 20, input);
    let mut offset = 0u64;
    let mut next_report = 0u64;
    let export_error = |offset: u64, seq: u64, reason: String| ClearingError::Export {
        offset,
        seq,
        reason,
    };
    let read = |reader: &mut std::io::BufReader<_>,
                buffer: &mut [u8],
                offset: &mut u64,
                seq: u64,
                what: &str|
     -> Result<(), ClearingError> {
        reader.read_exact(buffer).map_err(|error| {
            export_error(*offset, seq, format!("cut short reading {what}: {error}"))
        })?;
        *offset += buffer.len() as u64;
        Ok(())
    };
    let mut magic = [0u8; 22];
    read(&mut reader, &mut magic, &mut offset, 0, "the header")?;
    if &magic != EXPORT_MAGIC {
        return Err(export_error(0, 0, "not a clearhouse voucher export".into()));
    }
    let mut key = [0u8; 32];
    read(&mut reader, &mut key, &mut offset, 0, "the public key")?;
    let public_key = VerifyingKey::from_bytes(&key)
        .map_err(|_| export_error(22, 0, "the public key is not an Ed25519 key".into()))?;
    if let Some(trusted) = trusted_key {
        if trusted != &public_key {
            return Err(export_error(
                22,
                0,
                format!(
                    "signed with key {} but the trusted key is {}",
                    hex::encode(key),
                    hex::encode(trusted.as_bytes())
                ),
            ));
        }
    }
    let mut verifier = ChainVerifier::new(public_key);
    let mut body = vec![0u8; VOUCHER_BODY_MAX];
    loop {
        if offset >= next_report {
            progress(offset);
            next_report = offset + (64 << 10);
        }
        let next = verifier.seq + 1;
        let mut tag = [0u8; 1];
        read(&mut reader, &mut tag, &mut offset, next, "a frame tag")?;
        match tag[0] {
            b'V' => {
                let mut head = [0u8; 42];
                read(&mut reader, &mut head, &mut offset, next, "a voucher")?;
                let seq = u64::from_le_bytes(head[..8].try_into().expect("8"));
                let hash: [u8; 32] = head[8..40].try_into().expect("32");
                let len = u16::from_le_bytes([head[40], head[41]]) as usize;
                if len == 0 || len > VOUCHER_BODY_MAX {
                    return Err(ClearingError::Voucher {
                        seq: next,
                        reason: format!("body length {len} is out of 1..={VOUCHER_BODY_MAX}"),
                    });
                }
                read(
                    &mut reader,
                    &mut body[..len],
                    &mut offset,
                    next,
                    "a voucher body",
                )?;
                // A damaged sequence number is reported under the number expected there.
                verifier
                    .voucher(seq, &hash, &body[..len])
                    .map_err(|error| match error {
                        ClearingError::Voucher { reason, .. } => {
                            ClearingError::Voucher { seq: next, reason }
                        }
                        other => other,
                    })?;
            }
            b'C' => {
                let mut frame = [0u8; 112];
                read(
                    &mut reader,
                    &mut frame,
                    &mut offset,
                    verifier.seq,
                    "a checkpoint",
                )?;
                let checkpoint = Checkpoint {
                    window: u64::from_le_bytes(frame[..8].try_into().expect("8")),
                    seq: u64::from_le_bytes(frame[8..16].try_into().expect("8")),
                    hash: frame[16..48].try_into().expect("32"),
                    signature: frame[48..112].try_into().expect("64"),
                };
                verifier
                    .checkpoint(&checkpoint)
                    .map_err(|error| match error {
                        ClearingError::Checkpoint { window, reason, .. } => {
                            ClearingError::Checkpoint {
                                window,
                                seq: verifier.seq,
                                reason,
                            }
                        }
                        other => other,
                    })?;
            }
            b'E' => {
                let mut counts = [0u8; 16];
                read(&mut reader, &mut counts, &mut offset, next, "the end frame")?;
                let vouchers = u64::from_le_bytes(counts[..8].try_into().expect("8"));
                let checkpoints = u64::from_le_bytes(counts[8..].try_into().expect("8"));
                if vouchers != verifier.seq || checkpoints != verifier.checkpoints {
                    return Err(export_error(
                        offset,
                        next,
                        format!(
                            "the end frame counts {vouchers} vouchers and {checkpoints} checkpoints, the export holds {} and {}",
                            verifier.seq, verifier.checkpoints
                        ),
                    ));
                }
                if !reader.fill_buf()?.is_empty() {
                    return Err(export_error(
                        offset,
                        next,
                        "bytes after the end frame".into(),
                    ));
                }
                progress(offset);
                return Ok(verifier.report());
            }
            other => {
                return Err(export_error(
                    offset - 1,
                    next,
                    format!("unknown frame tag {other:#04x}"),
                ))
            }
        }
    }
}

/// One entry of a participant's view of the chain: every voucher's leaf digest, and the body of
/// the vouchers the participant is party to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViewEntry {
    pub seq: u64,
    #[serde(with = "hex_bytes")]
    pub leaf: [u8; 32],
    /// The canonical body (UTF-8 JSON) when the participant is party to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
}

/// Checks a participant's view: its own vouchers hash to their leaves and involve it, the chain
/// from `previous_hash` through every leaf reaches the checkpoint's hash, and the checkpoint is
/// signed by `public_key`. Returns the participant's verified events.
pub fn verify_participant_view(
    participant: &str,
    previous_hash: &[u8; 32],
    entries: &[ViewEntry],
    checkpoint: &Checkpoint,
    public_key: &VerifyingKey,
) -> Result<Vec<(u64, VoucherEvent)>, ClearingError> {
    verify_checkpoint(public_key, checkpoint)?;
    let mut hash = *previous_hash;
    let first = entries.first().map_or(0, |e| e.seq);
    let mut own = Vec::new();
    for (expected, entry) in (first..).zip(entries) {
        let fail = |reason: String| ClearingError::Voucher {
            seq: entry.seq,
            reason,
        };
        if entry.seq != expected {
            return Err(fail(format!("expected voucher {expected}")));
        }
        if let Some(body) = &entry.body {
            if leaf_digest(body.as_bytes()) != entry.leaf {
                return Err(fail("body does not hash to its leaf".into()));
            }
            let event = VoucherEvent::parse(body.as_bytes()).map_err(fail)?;
            if !event.involves(participant) {
                return Err(fail(format!("does not involve {participant}")));
            }
            own.push((entry.seq, event));
        }
        hash = chain_hash(&hash, entry.seq, &entry.leaf);
        if entry.seq == checkpoint.seq {
            if hash != checkpoint.hash {
                return Err(fail("the chain does not reach the signed hash".into()));
            }
            return Ok(own);
        }
    }
    Err(ClearingError::Checkpoint {
        window: checkpoint.window,
        seq: checkpoint.seq,
        reason: "the view ends before the signed voucher".into(),
    })
}
