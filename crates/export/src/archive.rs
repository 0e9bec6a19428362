//! The Parquet archive: one file per closed settlement window, `window-<W, 10 digits>.parquet`,
//! holding every voucher of the chain from the one after window W-1's `window_closed` through
//! window W's `window_closed` (so W's payments, returns and liquidity, and the fund adjustments
//! and settlement of W-1), one row per voucher, with typed columns for querying and the voucher
//! body as hashed. docs/EXPORT.md documents the schema.
//!
//! File metadata (key-value): `clearhouse.format` (1), `clearhouse.window`,
//! `clearhouse.first_seq`, `clearhouse.last_seq`, `clearhouse.previous_hash` (the chain hash
//! before the first row), `clearhouse.last_hash` and `clearhouse.checkpoint_signature`: with
//! them and the operator's public key a file is verifiable on its own (recompute the chain from
//! the bodies, check the signature over the last hash).
//!
//! Atomic: rows go to `.window-<W>.parquet.tmp` in row groups of at most [`ROW_GROUP_ROWS`]
//! (bounded memory for any window size); at the window's `window_closed` the file is closed,
//! fsynced, renamed into place and the directory fsynced. A crash leaves at most a temporary
//! file, removed at the next start, which resumes after the last complete file's `last_seq`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use clearhouse_clearing::event::VoucherEvent;
use parquet::basic::Compression;
use parquet::data_type::{
    ByteArray, ByteArrayType, FixedLenByteArray, FixedLenByteArrayType, Int64Type,
};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::parser::parse_message_type;

use crate::{event_kind, ExportError, Resume, Sink, Voucher};

const SINK: &str = "parquet";

/// Rows buffered before they are written out as a row group.
pub const ROW_GROUP_ROWS: usize = 65_536;

/// The archive's row schema (Parquet message type).
pub const SCHEMA: &str = "message clearhouse_voucher {
  REQUIRED INT64 seq;
  REQUIRED FIXED_LEN_BYTE_ARRAY (32) hash;
  REQUIRED BYTE_ARRAY kind (UTF8);
  REQUIRED INT64 window_no;
  OPTIONAL BYTE_ARRAY payment_id (UTF8);
  OPTIONAL BYTE_ARRAY uetr (UTF8);
  OPTIONAL BYTE_ARRAY end_to_end_id (UTF8);
  OPTIONAL BYTE_ARRAY reference (UTF8);
  OPTIONAL BYTE_ARRAY debtor_agent (UTF8);
  OPTIONAL BYTE_ARRAY creditor_agent (UTF8);
  OPTIONAL BYTE_ARRAY participant (UTF8);
  OPTIONAL BYTE_ARRAY currency (UTF8);
  OPTIONAL FIXED_LEN_BYTE_ARRAY (16) amount (DECIMAL(38,0));
  OPTIONAL BYTE_ARRAY reason (UTF8);
  OPTIONAL BYTE_ARRAY direction (UTF8);
  OPTIONAL INT64 at_ns;
  REQUIRED BYTE_ARRAY body (UTF8);
}";

/// Text columns, in schema order after `window_no`.
const TEXT_COLUMNS: usize = 8;
const AMOUNT_MAX: i128 = 99_999_999_999_999_999_999_999_999_999_999_999_999;

fn io(error: impl std::fmt::Display) -> ExportError {
    ExportError::sink(SINK, error)
}

#[derive(Default)]
struct Optional<T> {
    values: Vec<T>,
    levels: Vec<i16>,
}

impl<T> Optional<T> {
    fn push(&mut self, value: Option<T>) {
        match value {
            Some(value) => {
                self.values.push(value);
                self.levels.push(1);
            }
            None => self.levels.push(0),
        }
    }
}

/// Buffered rows, as columns.
#[derive(Default)]
struct Columns {
    seq: Vec<i64>,
    hash: Vec<FixedLenByteArray>,
    kind: Vec<ByteArray>,
    window: Vec<i64>,
    /// payment_id, uetr, end_to_end_id, reference, debtor_agent, creditor_agent, participant,
    /// currency
    text: [Optional<ByteArray>; TEXT_COLUMNS],
    amount: Optional<FixedLenByteArray>,
    reason: Optional<ByteArray>,
    direction: Optional<ByteArray>,
    at_ns: Optional<i64>,
    body: Vec<ByteArray>,
}

fn text(value: &str) -> Option<ByteArray> {
    Some(ByteArray::from(value.as_bytes().to_vec()))
}

fn decimal(value: i128) -> Result<Option<FixedLenByteArray>, ExportError> {
    if !(-AMOUNT_MAX..=AMOUNT_MAX).contains(&value) {
        return Err(ExportError::Chain(format!(
            "amount {value} does not fit the archive's decimal(38,0)"
        )));
    }
    Ok(Some(FixedLenByteArray::from(value.to_be_bytes().to_vec())))
}

fn unsigned(value: u128) -> Result<Option<FixedLenByteArray>, ExportError> {
    decimal(i128::try_from(value).unwrap_or(i128::MAX))
}

impl Columns {
    fn len(&self) -> usize {
        self.seq.len()
    }

    fn push(&mut self, v: &Voucher, window: u64) -> Result<(), ExportError> {
        self.seq.push(v.seq as i64);
        self.hash.push(FixedLenByteArray::from(v.hash.to_vec()));
        self.kind
            .push(ByteArray::from(event_kind(&v.event).as_bytes().to_vec()));
        self.window.push(window as i64);
        self.body.push(ByteArray::from(v.body.as_bytes().to_vec()));
        // payment_id, uetr, end_to_end_id, reference, debtor, creditor, participant, currency
        let mut t: [Option<ByteArray>; TEXT_COLUMNS] = Default::default();
        let (mut amount, mut reason, mut direction, mut at) = (None, None, None, None);
        match &v.event {
            VoucherEvent::PaymentSettled {
                payment,
                uetr,
                end_to_end_id,
                debtor_agent,
                creditor_agent,
                currency,
                amount: a,
                at_ns,
            } => {
                t = [
                    text(payment),
                    text(uetr),
                    text(end_to_end_id),
                    None,
                    text(debtor_agent),
                    text(creditor_agent),
                    None,
                    text(currency),
                ];
                amount = unsigned(*a)?;
                at = Some(*at_ns as i64);
            }
            VoucherEvent::PaymentRejected {
                payment,
                uetr,
                debtor_agent,
                creditor_agent,
                currency,
                amount: a,
                reason: r,
                at_ns,
            } => {
                t = [
                    text(payment),
                    text(uetr),
                    None,
                    None,
                    text(debtor_agent),
                    text(creditor_agent),
                    None,
                    text(currency),
                ];
                amount = unsigned(*a)?;
                reason = text(r);
                at = Some(*at_ns as i64);
            }
            VoucherEvent::PaymentReturned {
                return_key,
                original_payment,
                original_uetr,
                returning_agent,
                receiving_agent,
                currency,
                amount: a,
                reason: r,
                at_ns,
            } => {
                t = [
                    text(original_payment),
                    text(original_uetr),
                    None,
                    text(return_key),
                    text(returning_agent),
                    text(receiving_agent),
                    None,
                    text(currency),
                ];
                amount = unsigned(*a)?;
                reason = text(r);
                at = Some(*at_ns as i64);
            }
            VoucherEvent::Liquidity {
                transfer,
                participant,
                currency,
                direction: d,
                amount: a,
                at_ns,
            } => {
                t[3] = text(transfer);
                t[6] = text(participant);
                t[7] = text(currency);
                amount = unsigned(*a)?;
                direction = text(d);
                at = Some(*at_ns as i64);
            }
            VoucherEvent::WindowClosed { closed_at_ns, .. } => at = Some(*closed_at_ns as i64),
            VoucherEvent::FundAdjustment {
                participant,
                currency,
                net,
                ..
            } => {
                t[6] = text(participant);
                t[7] = text(currency);
                amount = decimal(*net)?;
            }
            VoucherEvent::WindowSettled { settled_at_ns, .. } => at = Some(*settled_at_ns as i64),
        }
        for (column, value) in self.text.iter_mut().zip(t) {
            column.push(value);
        }
        self.amount.push(amount);
        self.reason.push(reason);
        self.direction.push(direction);
        self.at_ns.push(at);
        Ok(())
    }

    /// Writes the buffered rows as one row group and empties the buffer.
    fn write_group(
        &mut self,
        writer: &mut SerializedFileWriter<std::fs::File>,
    ) -> parquet::errors::Result<()> {
        let columns = std::mem::take(self);
        let mut group = writer.next_row_group()?;
        let mut index = 0;
        while let Some(mut column) = group.next_column()? {
            match index {
                0 => {
                    column
                        .typed::<Int64Type>()
                        .write_batch(&columns.seq, None, None)?;
                }
                1 => {
                    column.typed::<FixedLenByteArrayType>().write_batch(
                        &columns.hash,
                        None,
                        None,
                    )?;
                }
                2 => {
                    column
                        .typed::<ByteArrayType>()
                        .write_batch(&columns.kind, None, None)?;
                }
                3 => {
                    column
                        .typed::<Int64Type>()
                        .write_batch(&columns.window, None, None)?;
                }
                4..=11 => {
                    let c = &columns.text[index - 4];
                    column.typed::<ByteArrayType>().write_batch(
                        &c.values,
                        Some(&c.levels),
                        None,
                    )?;
                }
                12 => {
                    let c = &columns.amount;
                    column.typed::<FixedLenByteArrayType>().write_batch(
                        &c.values,
                        Some(&c.levels),
                        None,
                    )?;
                }
                13 | 14 => {
                    let c = if index == 13 {
                        &columns.reason
                    } else {
                        &columns.direction
                    };
                    column.typed::<ByteArrayType>().write_batch(
                        &c.values,
                        Some(&c.levels),
                        None,
                    )?;
                }
                15 => {
                    let c = &columns.at_ns;
                    column
                        .typed::<Int64Type>()
                        .write_batch(&c.values, Some(&c.levels), None)?;
                }
                16 => {
                    column
                        .typed::<ByteArrayType>()
                        .write_batch(&columns.body, None, None)?;
                }
                _ => unreachable!("the schema has 17 columns"),
            }
            column.close()?;
            index += 1;
        }
        group.close()?;
        Ok(())
    }
}

/// The window file being written.
struct Open {
    window: u64,
    first_seq: u64,
    previous_hash: [u8; 32],
    tmp: PathBuf,
    writer: SerializedFileWriter<std::fs::File>,
    rows: Columns,
}

pub struct ParquetSink {
    dir: PathBuf,
    /// The last voucher in a complete file, and its hash.
    durable: (u64, [u8; 32]),
    /// The window whose vouchers come next.
    window: u64,
    /// The last voucher taken (durable or buffered) and its hash.
    taken: (u64, [u8; 32]),
    open: Option<Box<Open>>,
}

/// What one archive file says about itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileInfo {
    pub window: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    pub previous_hash: [u8; 32],
    pub last_hash: [u8; 32],
    pub rows: u64,
}

pub fn file_name(window: u64) -> String {
    format!("window-{window:010}.parquet")
}

fn window_of(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("window-")?.strip_suffix(".parquet")?;
    (digits.len() == 10 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

fn hash_of(text: Option<&String>, what: &str) -> Result<[u8; 32], ExportError> {
    text.and_then(|t| hex::decode(t).ok())
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| {
            io(format!(
                "archive file metadata: {what} is not 64 hex digits"
            ))
        })
}

/// Reads an archive file's metadata.
pub fn read_file_info(path: &Path) -> Result<FileInfo, ExportError> {
    let file = std::fs::File::open(path).map_err(|e| io(format!("{}: {e}", path.display())))?;
    let reader =
        SerializedFileReader::new(file).map_err(|e| io(format!("{}: {e}", path.display())))?;
    let meta = reader.metadata().file_metadata();
    let kv: std::collections::HashMap<&str, &String> = meta
        .key_value_metadata()
        .map(|kv| {
            kv.iter()
                .filter_map(|k| k.value.as_ref().map(|v| (k.key.as_str(), v)))
                .collect()
        })
        .unwrap_or_default();
    let number = |key: &str| -> Result<u64, ExportError> {
        kv.get(key)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| io(format!("{}: metadata {key} missing", path.display())))
    };
    if number("clearhouse.format")? != 1 {
        return Err(io(format!("{}: unknown archive format", path.display())));
    }
    Ok(FileInfo {
        window: number("clearhouse.window")?,
        first_seq: number("clearhouse.first_seq")?,
        last_seq: number("clearhouse.last_seq")?,
        previous_hash: hash_of(kv.get("clearhouse.previous_hash").copied(), "previous_hash")?,
        last_hash: hash_of(kv.get("clearhouse.last_hash").copied(), "last_hash")?,
        rows: meta.num_rows() as u64,
    })
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

impl ParquetSink {
    pub fn new(dir: &Path) -> Result<ParquetSink, ExportError> {
        std::fs::create_dir_all(dir).map_err(|e| {
            ExportError::Config(format!("archive directory {}: {e}", dir.display()))
        })?;
        Ok(ParquetSink {
            dir: dir.to_path_buf(),
            durable: (0, [0; 32]),
            window: 1,
            taken: (0, [0; 32]),
            open: None,
        })
    }

    /// The complete files, in window order.
    pub fn files(dir: &Path) -> Result<Vec<(u64, PathBuf)>, ExportError> {
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(io)? {
            let entry = entry.map_err(io)?;
            let name = entry.file_name();
            if let Some(window) = name.to_str().and_then(window_of) {
                files.push((window, entry.path()));
            }
        }
        files.sort();
        Ok(files)
    }

    fn open_file(&self, first: &Voucher) -> Result<Box<Open>, ExportError> {
        let tmp = self.dir.join(format!(".{}.tmp", file_name(self.window)));
        let file =
            std::fs::File::create(&tmp).map_err(|e| io(format!("{}: {e}", tmp.display())))?;
        let schema = Arc::new(parse_message_type(SCHEMA).map_err(io)?);
        let properties = Arc::new(
            WriterProperties::builder()
                .set_compression(Compression::SNAPPY)
                .set_created_by(format!("clearhouse {}", env!("CARGO_PKG_VERSION")))
                .build(),
        );
        let writer = SerializedFileWriter::new(file, schema, properties).map_err(io)?;
        Ok(Box::new(Open {
            window: self.window,
            first_seq: first.seq,
            previous_hash: self.taken.1,
            tmp,
            writer,
            rows: Columns::default(),
        }))
    }

    fn discard(&mut self) {
        if let Some(open) = self.open.take() {
            let _ = std::fs::remove_file(&open.tmp);
        }
        self.taken = self.durable;
    }

    /// Closes the open window's file and puts it in place.
    fn finish(mut open: Box<Open>, dir: &Path, last: &Voucher) -> Result<(), ExportError> {
        if open.rows.len() > 0 {
            open.rows.write_group(&mut open.writer).map_err(io)?;
        }
        let signature = last
            .checkpoint
            .as_ref()
            .map(|c| hex::encode(c.signature))
            .unwrap_or_default();
        for (key, value) in [
            ("clearhouse.format", "1".to_string()),
            ("clearhouse.window", open.window.to_string()),
            ("clearhouse.first_seq", open.first_seq.to_string()),
            ("clearhouse.last_seq", last.seq.to_string()),
            ("clearhouse.previous_hash", hex::encode(open.previous_hash)),
            ("clearhouse.last_hash", hex::encode(last.hash)),
            ("clearhouse.checkpoint_signature", signature),
        ] {
            open.writer
                .append_key_value_metadata(KeyValue::new(key.to_string(), value));
        }
        open.writer.finish().map_err(io)?;
        open.writer.inner().sync_all().map_err(io)?;
        drop(open.writer);
        let path = dir.join(file_name(open.window));
        std::fs::rename(&open.tmp, &path).map_err(io)?;
        sync_dir(dir).map_err(io)?;
        Ok(())
    }

    fn write_blocking(&mut self, batch: &[Voucher]) -> Result<(), ExportError> {
        for v in batch {
            if v.seq != self.taken.0 + 1 {
                return Err(io(format!(
                    "voucher {} handed over after {}",
                    v.seq, self.taken.0
                )));
            }
            if self.open.is_none() {
                self.open = Some(self.open_file(v)?);
            }
            let window = match &v.event {
                VoucherEvent::WindowClosed { window, .. }
                | VoucherEvent::FundAdjustment { window, .. }
                | VoucherEvent::WindowSettled { window, .. } => *window,
                _ => self.window,
            };
            let open = self.open.as_mut().expect("opened");
            open.rows.push(v, window)?;
            self.taken = (v.seq, v.hash);
            if open.rows.len() >= ROW_GROUP_ROWS {
                open.rows.write_group(&mut open.writer).map_err(io)?;
            }
            if let VoucherEvent::WindowClosed { window, .. } = &v.event {
                if *window != self.window {
                    return Err(ExportError::Chain(format!(
                        "voucher {} closes window {window} but window {} is the open one",
                        v.seq, self.window
                    )));
                }
                let open = self.open.take().expect("opened");
                Self::finish(open, &self.dir, v)?;
                self.durable = (v.seq, v.hash);
                self.window = window + 1;
            }
        }
        Ok(())
    }
}

impl Sink for ParquetSink {
    fn kind(&self) -> &'static str {
        SINK
    }

    async fn resume(&mut self) -> Result<Resume, ExportError> {
        self.discard();
        for entry in std::fs::read_dir(&self.dir).map_err(io)? {
            let entry = entry.map_err(io)?;
            let name = entry.file_name();
            if name
                .to_str()
                .is_some_and(|n| n.starts_with(".window-") && n.ends_with(".tmp"))
            {
                std::fs::remove_file(entry.path()).map_err(io)?;
            }
        }
        let Some((window, path)) = Self::files(&self.dir)?.pop() else {
            self.durable = (0, [0; 32]);
            self.taken = self.durable;
            self.window = 1;
            return Ok(Resume::START);
        };
        let info = read_file_info(&path)?;
        if info.window != window {
            return Err(io(format!(
                "{}: says it holds window {}",
                path.display(),
                info.window
            )));
        }
        self.durable = (info.last_seq, info.last_hash);
        self.taken = self.durable;
        self.window = window + 1;
        Ok(Resume {
            next_seq: info.last_seq + 1,
            anchor: Some((info.last_seq, info.last_hash)),
        })
    }

    async fn write(&mut self, batch: &[Voucher]) -> Result<(), ExportError> {
        // File work is blocking: off the async workers, with this sink's state moved along.
        let mut state = ParquetSink {
            dir: self.dir.clone(),
            durable: self.durable,
            window: self.window,
            taken: self.taken,
            open: self.open.take(),
        };
        let batch = batch.to_vec();
        let (state, result) = tokio::task::spawn_blocking(move || {
            let result = state.write_blocking(&batch);
            (state, result)
        })
        .await
        .map_err(io)?;
        self.durable = state.durable;
        self.window = state.window;
        self.taken = state.taken;
        self.open = state.open;
        if result.is_err() {
            self.discard();
        }
        result
    }

    fn durable_seq(&self) -> u64 {
        self.durable.0
    }

    /// The open window's rows are not durable until it closes: its temporary file goes.
    fn close(&mut self) {
        self.discard();
    }
}

/// An archive file read back and checked on its own: every row's hash recomputed from its body
/// and the previous hash, the last hash against the metadata, the metadata's checkpoint signature
/// against the operator's key.
#[derive(Clone, Debug)]
pub struct ReadWindow {
    pub info: FileInfo,
    /// (sequence, hash) of every row, in order.
    pub vouchers: Vec<(u64, [u8; 32])>,
    /// Keys of the payments settled or rejected in the file's span.
    pub payments: Vec<u128>,
    /// Rows by kind: payments settled, rejected, returned.
    pub settled: u64,
    pub rejected: u64,
    pub returned: u64,
    /// The signed checkpoint at the file's last voucher.
    pub checkpoint: clearhouse_clearing::export::Checkpoint,
    /// The verifier after the file's last voucher (to go on into the next file or the hot chain).
    pub verifier: clearhouse_clearing::export::ChainVerifier,
}

/// Reads back and checks one archive file (see [`ReadWindow`]). With `verifier`, the file must
/// continue that chain (its `previous_hash` and first sequence); without, it is checked on its
/// own from its `previous_hash`.
pub fn read_window(
    path: &Path,
    public_key: &ed25519_dalek::VerifyingKey,
    verifier: Option<clearhouse_clearing::export::ChainVerifier>,
) -> Result<ReadWindow, ExportError> {
    use clearhouse_clearing::export::{ChainVerifier, Checkpoint};
    use parquet::record::RowAccessor;
    let at = |what: String| io(format!("{}: {what}", path.display()));
    let info = read_file_info(path)?;
    let file = std::fs::File::open(path).map_err(|e| at(e.to_string()))?;
    let reader = SerializedFileReader::new(file).map_err(|e| at(e.to_string()))?;
    let signature: [u8; 64] = reader
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .and_then(|kv| {
            kv.iter()
                .find(|k| k.key == "clearhouse.checkpoint_signature")
                .and_then(|k| k.value.as_ref())
                .and_then(|v| hex::decode(v).ok())
                .and_then(|b| b.try_into().ok())
        })
        .ok_or_else(|| at("metadata clearhouse.checkpoint_signature missing".into()))?;
    let checkpoint = Checkpoint {
        window: info.window,
        seq: info.last_seq,
        hash: info.last_hash,
        signature,
    };
    // The file continues the given chain, or starts its own from its previous hash: an anchored
    // verifier over a synthetic checkpoint is not available, so start at the genesis for window
    // files that begin at voucher 1 and check continuity by hand otherwise.
    let mut verifier = match verifier {
        Some(verifier) => {
            if verifier.head() != (info.first_seq - 1, info.previous_hash) {
                return Err(at(format!(
                    "does not continue the chain: it starts after voucher {} ({}), the chain so far ends at {}",
                    info.first_seq - 1,
                    hex::encode(info.previous_hash),
                    verifier.head().0
                )));
            }
            verifier
        }
        None if info.first_seq == 1 => ChainVerifier::new(*public_key),
        None => ChainVerifier::starting_at(*public_key, info.first_seq - 1, info.previous_hash),
    };
    let projection = parse_message_type(
        "message clearhouse_voucher { REQUIRED INT64 seq; REQUIRED FIXED_LEN_BYTE_ARRAY (32) hash; REQUIRED BYTE_ARRAY kind (UTF8); OPTIONAL BYTE_ARRAY payment_id (UTF8); REQUIRED BYTE_ARRAY body (UTF8); }",
    )
    .map_err(io)?;
    let mut out = ReadWindow {
        vouchers: Vec::with_capacity(info.rows as usize),
        payments: Vec::new(),
        settled: 0,
        rejected: 0,
        returned: 0,
        checkpoint: checkpoint.clone(),
        verifier: ChainVerifier::new(*public_key),
        info: info.clone(),
    };
    for row in reader.get_row_iter(Some(projection)).map_err(io)? {
        let row = row.map_err(io)?;
        let seq = row.get_long(0).map_err(io)? as u64;
        let hash: [u8; 32] = row
            .get_bytes(1)
            .map_err(io)?
            .data()
            .try_into()
            .map_err(|_| at(format!("row {seq}: hash is not 32 bytes")))?;
        let body = row.get_string(4).map_err(io)?;
        verifier
            .voucher(seq, &hash, body.as_bytes())
            .map_err(|e| at(e.to_string()))?;
        match row.get_string(2).map_err(io)?.as_str() {
            "payment_settled" => out.settled += 1,
            "payment_rejected" => out.rejected += 1,
            "payment_returned" => out.returned += 1,
            _ => {}
        }
        if let Ok(payment) = row.get_string(3) {
            if matches!(
                row.get_string(2).map_err(io)?.as_str(),
                "payment_settled" | "payment_rejected"
            ) {
                out.payments.push(
                    u128::from_str_radix(payment, 16)
                        .map_err(|_| at(format!("row {seq}: payment id {payment:?}")))?,
                );
            }
        }
        out.vouchers.push((seq, hash));
    }
    if verifier.head() != (info.last_seq, info.last_hash) || out.vouchers.len() as u64 != info.rows
    {
        return Err(at(format!(
            "rows end at voucher {} but the metadata says {} ({} rows)",
            verifier.head().0,
            info.last_seq,
            info.rows
        )));
    }
    verifier
        .checkpoint(&checkpoint)
        .map_err(|e| at(e.to_string()))?;
    out.verifier = verifier;
    Ok(out)
}
