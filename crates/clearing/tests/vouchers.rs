//! Voucher chains built by the engine's own chaining code, exported, verified, tampered with, and
//! netted: the netting is checked against an independent recomputation from the vouchers.

use std::collections::BTreeMap;

use clearhouse_clearing::event::VoucherEvent;
use clearhouse_clearing::export::{
    sign_checkpoint, verify_export, verify_participant_view, Checkpoint, ExportWriter, ViewEntry,
};
use clearhouse_clearing::netting::{accumulators_from_vouchers, Accumulators, SettlementPlan};
use clearhouse_clearing::ClearingError;
use clearhouse_engine::vouchers::{leaf_digest, Voucher, VoucherChain};
use ed25519_dalek::SigningKey;
use proptest::prelude::*;

const BANKS: [&str; 5] = ["AAAAGB2L", "BBBBGB2L", "CCCCGB2L", "DDDDGB2L", "EEEEGB2L"];

fn payment(i: u64, from: usize, to: usize, amount: u128) -> VoucherEvent {
    VoucherEvent::PaymentSettled {
        payment: format!("{i:032x}"),
        uetr: format!("uetr-{i}"),
        end_to_end_id: format!("e2e-{i}"),
        debtor_agent: BANKS[from].into(),
        creditor_agent: BANKS[to].into(),
        currency: "EUR".into(),
        amount,
        at_ns: i,
    }
}

/// A chain of `payments` split into windows every `per_window` payments, with checkpoints.
fn build(
    key: &SigningKey,
    payments: &[(usize, usize, u128)],
    per_window: usize,
) -> (Vec<Voucher>, Vec<Checkpoint>, Vec<VoucherEvent>) {
    let mut chain = VoucherChain::default();
    let mut vouchers = Vec::new();
    let mut checkpoints = Vec::new();
    let mut events = Vec::new();
    let mut window = 1;
    for (i, &(from, to, amount)) in payments.iter().enumerate() {
        let event = payment(i as u64, from, to, amount);
        vouchers.push(chain.append(event.to_bytes()));
        events.push(event);
        if (i + 1) % per_window == 0 {
            let event = VoucherEvent::WindowClosed {
                window,
                opened_at_ns: 0,
                closed_at_ns: i as u64,
            };
            let voucher = chain.append(event.to_bytes());
            checkpoints.push(sign_checkpoint(key, window, voucher.seq, voucher.hash));
            vouchers.push(voucher);
            events.push(event);
            window += 1;
        }
    }
    (vouchers, checkpoints, events)
}

/// A frame of an export: start, end, the voucher sequence an error in it names, checkpoint?
type Frame = (usize, usize, u64, bool);

/// The export, and for each byte the sequence number an error there must name.
fn export(
    key: &SigningKey,
    vouchers: &[Voucher],
    checkpoints: &[Checkpoint],
) -> (Vec<u8>, Vec<Frame>) {
    let mut writer = ExportWriter::new(Vec::new(), &key.verifying_key()).unwrap();
    let mut frames = Vec::new();
    let mut offset = 22 + 32;
    let mut checkpoints = checkpoints.iter().peekable();
    for voucher in vouchers {
        writer
            .voucher(voucher.seq, &voucher.hash, &voucher.body)
            .unwrap();
        let length = 1 + 8 + 32 + 2 + voucher.body.len();
        frames.push((offset, offset + length, voucher.seq, false));
        offset += length;
        while let Some(checkpoint) = checkpoints.next_if(|c| c.seq == voucher.seq) {
            writer.checkpoint(checkpoint).unwrap();
            frames.push((offset, offset + 113, voucher.seq, true));
            offset += 113;
        }
    }
    (writer.finish().unwrap(), frames)
}

fn named_seq(error: &ClearingError) -> u64 {
    match error {
        ClearingError::Voucher { seq, .. }
        | ClearingError::Checkpoint { seq, .. }
        | ClearingError::Export { seq, .. } => *seq,
        other => panic!("unexpected error {other}"),
    }
}

#[test]
fn a_good_export_verifies_and_any_flipped_byte_is_named() {
    let key = SigningKey::from_bytes(&[7; 32]);
    let payments: Vec<(usize, usize, u128)> = (0..40)
        .map(|i| (i % 5, (i * 3 + 1) % 5, 100 + i as u128))
        .filter(|(a, b, _)| a != b)
        .collect();
    let (vouchers, checkpoints, _) = build(&key, &payments, 10);
    let (bytes, frames) = export(&key, &vouchers, &checkpoints);
    let report = verify_export(&bytes[..], Some(&key.verifying_key()), |_| {}).unwrap();
    assert_eq!(report.vouchers, vouchers.len() as u64);
    assert_eq!(report.checkpoints, checkpoints.len() as u64);
    assert_eq!(report.last_checkpoint_seq, checkpoints.last().unwrap().seq);

    // Another operator's key is refused.
    let other = SigningKey::from_bytes(&[8; 32]);
    assert!(verify_export(&bytes[..], Some(&other.verifying_key()), |_| {}).is_err());

    for position in 0..bytes.len() {
        let mut tampered = bytes.clone();
        tampered[position] ^= 0xFF;
        let error = verify_export(&tampered[..], None, |_| {}).expect_err(&format!(
            "a flipped byte at {position} must fail verification"
        ));
        let frame = frames.iter().find(|f| f.0 <= position && position < f.1);
        match frame {
            // The header: nothing verified yet; a key flip shows at the first checkpoint.
            None if position < 54 => {}
            // The end frame.
            None => assert_eq!(named_seq(&error), vouchers.len() as u64 + 1, "{error}"),
            Some(&(start, _, seq, is_checkpoint)) => {
                let named = named_seq(&error);
                if is_checkpoint && position == start {
                    // A damaged checkpoint tag reads as an unknown frame before the next voucher.
                    assert_eq!(named, seq + 1, "at {position}: {error}");
                } else {
                    assert_eq!(named, seq, "at {position}: {error}");
                }
            }
        }
    }
    // Cut short anywhere: an error, never a pass.
    for cut in 0..bytes.len() {
        assert!(verify_export(&bytes[..cut], None, |_| {}).is_err());
    }
}

#[test]
fn a_participant_verifies_its_own_vouchers_against_the_signed_head() {
    let key = SigningKey::from_bytes(&[9; 32]);
    let payments = vec![(0, 1, 10), (2, 3, 20), (1, 0, 5), (3, 4, 7)];
    let (vouchers, checkpoints, _) = build(&key, &payments, 4);
    let bank = BANKS[1];
    let view: Vec<ViewEntry> = vouchers
        .iter()
        .map(|v| {
            let event = VoucherEvent::parse(&v.body).unwrap();
            ViewEntry {
                seq: v.seq,
                leaf: leaf_digest(&v.body),
                body: event
                    .involves(bank)
                    .then(|| String::from_utf8(v.body.clone()).unwrap()),
            }
        })
        .collect();
    let checkpoint = &checkpoints[0];
    let own =
        verify_participant_view(bank, &[0; 32], &view, checkpoint, &key.verifying_key()).unwrap();
    // Its two payments and the public window cut-over.
    assert_eq!(own.len(), 3);
    // Others' bodies are not in the view.
    assert!(view[1].body.is_none());

    // A changed amount in its own voucher breaks the proof.
    let mut tampered = view.clone();
    tampered[0].body = Some(
        tampered[0]
            .body
            .clone()
            .unwrap()
            .replace("\"10\"", "\"11\""),
    );
    assert!(
        verify_participant_view(bank, &[0; 32], &tampered, checkpoint, &key.verifying_key())
            .is_err()
    );
    // So does a changed leaf of somebody else's voucher.
    let mut tampered = view.clone();
    tampered[1].leaf[0] ^= 1;
    assert!(
        verify_participant_view(bank, &[0; 32], &tampered, checkpoint, &key.verifying_key())
            .is_err()
    );
    // Or claiming another participant's voucher.
    assert!(
        verify_participant_view(BANKS[4], &[0; 32], &view, checkpoint, &key.verifying_key())
            .is_err()
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Netting from the accumulators the switch keeps agrees with a recomputation from the
    /// vouchers, and with a brute-force sum of each participant's amounts.
    #[test]
    fn netting_agrees_with_an_independent_recomputation(
        payments in proptest::collection::vec((0usize..5, 0usize..5, 1u128..1_000_000), 1..200),
        per_window in 1usize..50,
    ) {
        let payments: Vec<_> = payments.into_iter().filter(|(a, b, _)| a != b).collect();
        prop_assume!(!payments.is_empty());
        let key = SigningKey::from_bytes(&[1; 32]);
        let (_, _, events) = build(&key, &payments, per_window);

        // What the switch does: accumulate at commit, swap at each cut-over.
        let mut live: BTreeMap<u64, Accumulators> = BTreeMap::new();
        let mut current = Accumulators::default();
        let mut window = 1;
        for event in &events {
            if let VoucherEvent::WindowClosed { .. } = event {
                live.insert(window, std::mem::take(&mut current));
                window += 1;
            } else {
                current.add_event(event).unwrap();
            }
        }
        let (from_vouchers, open) = accumulators_from_vouchers(1, &events).unwrap();
        prop_assert_eq!(open, window);
        for (w, accumulators) in &live {
            prop_assert_eq!(Some(accumulators), from_vouchers.get(w));
            let plan = SettlementPlan::compute(*w, accumulators, |_, _| true).unwrap();
            // Brute force: the window's payments, summed per participant.
            let closes: Vec<usize> = events.iter().enumerate()
                .filter(|(_, e)| matches!(e, VoucherEvent::WindowClosed { .. }))
                .map(|(i, _)| i).collect();
            let start = if *w == 1 { 0 } else { closes[*w as usize - 2] + 1 };
            let end = closes[*w as usize - 1];
            let mut nets = [0i128; 5];
            let mut gross = 0u128;
            for event in &events[start..end] {
                if let VoucherEvent::PaymentSettled { debtor_agent, creditor_agent, amount, .. } = event {
                    let from = BANKS.iter().position(|b| b == debtor_agent).unwrap();
                    let to = BANKS.iter().position(|b| b == creditor_agent).unwrap();
                    nets[from] -= *amount as i128;
                    nets[to] += *amount as i128;
                    gross += amount;
                }
            }
            for instruction in &plan.instructions {
                let i = BANKS.iter().position(|b| *b == instruction.participant).unwrap();
                prop_assert_eq!(instruction.net, nets[i]);
            }
            prop_assert_eq!(plan.instructions.len(), nets.iter().filter(|n| **n != 0).count());
            prop_assert_eq!(plan.figures[0].gross, gross);
            let net_debits: u128 = nets.iter().filter(|n| **n < 0).map(|n| n.unsigned_abs()).sum();
            prop_assert_eq!(plan.figures[0].net, net_debits);
        }
    }
}
