//! clearhouse-journal: the write-ahead log.
//!
//! It does: append records (kind, timestamp, opaque payload) to preallocated segment files with a
//! CRC32C per record; make them durable with one `fdatasync` for a whole group of records (group
//! commit); on open, scan every segment, cut back a torn tail (a crash mid-write) to the last whole
//! record, and refuse to start, naming file and offset, on corruption anywhere else; reserve disk
//! space before the caller executes a batch, so a full disk is refused up front and never leaves a
//! half-written record; delete segments that a durable snapshot has made unnecessary.
//!
//! It deliberately does not: know what a payload means (the engine encodes operations), keep
//! anything but the current segment open, or replicate (that will go through NATS JetStream).
//!
//! The byte layout is documented in docs/JOURNAL_FORMAT.md; keep the two in step.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Format version written in every segment header.
pub const FORMAT_VERSION: u32 = 1;
pub const SEGMENT_MAGIC: [u8; 8] = *b"CHJRNL\0\x01";
pub const SEGMENT_HEADER_SIZE: u64 = 64;
pub const RECORD_MAGIC: u32 = 0xC1EA_4E01;
pub const RECORD_HEADER_SIZE: usize = 32;
/// Largest payload of one record: a full batch of 8,189 events of 128 bytes, plus room for headers.
pub const RECORD_PAYLOAD_MAX: usize = 1024 * 1024 + 4096;
/// Smallest segment that holds at least one record of the largest size.
pub const SEGMENT_SIZE_MIN: u64 =
    SEGMENT_HEADER_SIZE + (RECORD_HEADER_SIZE + RECORD_PAYLOAD_MAX) as u64;
pub const SEGMENT_SIZE_DEFAULT: u64 = 64 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal: {operation} {path}: {source}")]
    Io {
        operation: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("journal: disk full: cannot allocate {bytes} bytes for segment {path}; free space and retry")]
    DiskFull { path: PathBuf, bytes: u64 },
    #[error("journal: corrupt at {path} offset {offset}: {reason}; refusing to start (nothing was changed)")]
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    #[error("journal: record payload of {len} bytes exceeds the limit of {max}")]
    RecordTooLarge { len: usize, max: usize },
    #[error(
        "journal: segment {path} has format version {found}, this build reads version {expected}"
    )]
    Version {
        path: PathBuf,
        found: u32,
        expected: u32,
    },
    #[error("journal: a previous write or sync failed; the journal refuses further writes until restart")]
    Poisoned,
}

fn io_error<'a>(
    operation: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> JournalError + 'a {
    move |source| JournalError::Io {
        operation,
        path: path.to_path_buf(),
        source,
    }
}

/// One record read back from the journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub seq: u64,
    pub kind: u16,
    pub timestamp: u64,
    pub payload: Vec<u8>,
}

#[derive(Clone, Debug)]
pub struct JournalOptions {
    pub segment_size: u64,
    /// Storage faults injected by the deterministic simulator; `None` in production.
    pub faults: Option<std::sync::Arc<StorageFaults>>,
}

impl Default for JournalOptions {
    fn default() -> Self {
        JournalOptions {
            segment_size: SEGMENT_SIZE_DEFAULT,
            faults: None,
        }
    }
}

/// A simulated power loss for the deterministic simulator: once armed, the next write of a group
/// puts only its first `keep_bytes` bytes on disk (0: the unsynced data is lost; fewer than the
/// group: a torn write; all: it reached the disk but was never acknowledged), is never synced,
/// and the journal is dead from then on (as the process would be).
#[derive(Debug, Default)]
pub struct StorageFaults {
    armed: std::sync::atomic::AtomicBool,
    keep_bytes: std::sync::atomic::AtomicU64,
    tripped: std::sync::atomic::AtomicBool,
    written: std::sync::atomic::AtomicU64,
    length: std::sync::atomic::AtomicU64,
}

impl StorageFaults {
    pub fn arm_power_loss(&self, keep_bytes: u64) {
        use std::sync::atomic::Ordering;
        self.keep_bytes.store(keep_bytes, Ordering::SeqCst);
        self.tripped.store(false, Ordering::SeqCst);
        self.armed.store(true, Ordering::SeqCst);
    }

    /// Whether the armed power loss happened.
    pub fn tripped(&self) -> bool {
        self.tripped.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Bytes of the failed write that reached the disk, and the write's length.
    pub fn written(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering;
        (
            self.written.load(Ordering::SeqCst),
            self.length.load(Ordering::SeqCst),
        )
    }

    /// Applies the armed fault to a write of `buffer` at `offset`: `None` when not armed.
    fn intercept(&self, file: &File, offset: u64, buffer: &[u8]) -> Option<std::io::Error> {
        use std::sync::atomic::Ordering;
        if !self.armed.swap(false, Ordering::SeqCst) {
            return None;
        }
        let keep = (self.keep_bytes.load(Ordering::SeqCst) as usize).min(buffer.len());
        let _ = file.write_all_at(&buffer[..keep], offset);
        self.written.store(keep as u64, Ordering::SeqCst);
        self.length.store(buffer.len() as u64, Ordering::SeqCst);
        self.tripped.store(true, Ordering::SeqCst);
        Some(std::io::Error::other("simulated power loss"))
    }
}

fn segment_path(dir: &Path, first_seq: u64) -> PathBuf {
    dir.join(format!("segment-{first_seq:020}.wal"))
}

fn padded(len: usize) -> usize {
    (len + 7) & !7
}

/// What opening the journal found.
#[derive(Debug, Default, Clone)]
pub struct OpenReport {
    pub segments: usize,
    pub records: u64,
    pub last_seq: u64,
    /// Bytes of a torn tail that were cut off (a crash during the last, unacknowledged write).
    pub torn_tail_bytes_cut: u64,
    pub torn_tail_at: Option<(PathBuf, u64)>,
}

struct Segment {
    path: PathBuf,
    first_seq: u64,
}

fn list_segments(dir: &Path) -> Result<Vec<Segment>, JournalError> {
    let mut segments = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_error("read directory", dir))? {
        let entry = entry.map_err(io_error("read directory", dir))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if let Some(number) = name
            .strip_prefix("segment-")
            .and_then(|rest| rest.strip_suffix(".wal"))
        {
            if let Ok(first_seq) = number.parse::<u64>() {
                segments.push(Segment {
                    path: entry.path(),
                    first_seq,
                });
            }
        } else if name.ends_with(".wal.tmp") {
            // A segment whose creation did not finish: it never held a record.
            fs::remove_file(entry.path()).map_err(io_error("remove", &entry.path()))?;
        }
    }
    segments.sort_by_key(|segment| segment.first_seq);
    Ok(segments)
}

/// Header of a record, parsed.
struct RecordHeader {
    checksum: u32,
    magic: u32,
    kind: u16,
    payload_len: u32,
    seq: u64,
    timestamp: u64,
}

fn parse_header(bytes: &[u8]) -> RecordHeader {
    let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
    let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap());
    RecordHeader {
        checksum: u32_at(0),
        magic: u32_at(4),
        kind: u16::from_le_bytes(bytes[8..10].try_into().unwrap()),
        payload_len: u32_at(12),
        seq: u64_at(16),
        timestamp: u64_at(24),
    }
}

fn encode_record(buffer: &mut Vec<u8>, seq: u64, kind: u16, timestamp: u64, payload: &[u8]) {
    let start = buffer.len();
    buffer.extend_from_slice(&[0u8; 4]);
    buffer.extend_from_slice(&RECORD_MAGIC.to_le_bytes());
    buffer.extend_from_slice(&kind.to_le_bytes());
    buffer.extend_from_slice(&0u16.to_le_bytes());
    buffer.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    buffer.extend_from_slice(&seq.to_le_bytes());
    buffer.extend_from_slice(&timestamp.to_le_bytes());
    buffer.extend_from_slice(payload);
    let end = start + RECORD_HEADER_SIZE + padded(payload.len());
    buffer.resize(end, 0);
    let checksum = crc32c::crc32c(&buffer[start + 4..start + RECORD_HEADER_SIZE + payload.len()]);
    buffer[start..start + 4].copy_from_slice(&checksum.to_le_bytes());
}

/// Outcome of decoding the record at one offset.
enum Decoded {
    Record(Record, u64),
    End,
    Invalid(String),
}

fn decode_at(data: &[u8], offset: usize, expected_seq: Option<u64>) -> Decoded {
    if offset + RECORD_HEADER_SIZE > data.len() {
        return if data[offset..].iter().all(|b| *b == 0) {
            Decoded::End
        } else {
            Decoded::Invalid("record header runs past the end of the segment".into())
        };
    }
    let header_bytes = &data[offset..offset + RECORD_HEADER_SIZE];
    if header_bytes.iter().all(|b| *b == 0) {
        return Decoded::End;
    }
    let header = parse_header(header_bytes);
    if header.magic != RECORD_MAGIC {
        return Decoded::Invalid(format!("bad record magic {:#010x}", header.magic));
    }
    let len = header.payload_len as usize;
    if len > RECORD_PAYLOAD_MAX {
        return Decoded::Invalid(format!("record length {len} exceeds {RECORD_PAYLOAD_MAX}"));
    }
    let end = offset + RECORD_HEADER_SIZE + len;
    if end > data.len() {
        return Decoded::Invalid("record runs past the end of the segment".into());
    }
    let checksum = crc32c::crc32c(&data[offset + 4..end]);
    if checksum != header.checksum {
        return Decoded::Invalid(format!(
            "checksum mismatch (stored {:#010x}, computed {checksum:#010x})",
            header.checksum
        ));
    }
    if let Some(expected) = expected_seq {
        if header.seq != expected {
            return Decoded::Invalid(format!(
                "sequence {} where {expected} was expected",
                header.seq
            ));
        }
    }
    Decoded::Record(
        Record {
            seq: header.seq,
            kind: header.kind,
            timestamp: header.timestamp,
            payload: data[offset + RECORD_HEADER_SIZE..end].to_vec(),
        },
        (offset + RECORD_HEADER_SIZE + padded(len)) as u64,
    )
}

fn read_segment(path: &Path, segment_size_hint: u64) -> Result<Vec<u8>, JournalError> {
    let _ = segment_size_hint;
    let data = fs::read(path).map_err(io_error("read", path))?;
    if data.len() < SEGMENT_HEADER_SIZE as usize {
        return Err(JournalError::Corrupt {
            path: path.to_path_buf(),
            offset: 0,
            reason: "segment shorter than its header".into(),
        });
    }
    if data[0..8] != SEGMENT_MAGIC {
        return Err(JournalError::Corrupt {
            path: path.to_path_buf(),
            offset: 0,
            reason: "bad segment magic".into(),
        });
    }
    let checksum = u32::from_le_bytes(data[60..64].try_into().unwrap());
    if crc32c::crc32c(&data[0..60]) != checksum {
        return Err(JournalError::Corrupt {
            path: path.to_path_buf(),
            offset: 0,
            reason: "segment header checksum mismatch".into(),
        });
    }
    let version = u32::from_le_bytes(data[8..12].try_into().unwrap());
    if version != FORMAT_VERSION {
        return Err(JournalError::Version {
            path: path.to_path_buf(),
            found: version,
            expected: FORMAT_VERSION,
        });
    }
    Ok(data)
}

fn segment_header(first_seq: u64, segment_size: u64) -> [u8; SEGMENT_HEADER_SIZE as usize] {
    let mut header = [0u8; SEGMENT_HEADER_SIZE as usize];
    header[0..8].copy_from_slice(&SEGMENT_MAGIC);
    header[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    header[12..16].copy_from_slice(&(SEGMENT_HEADER_SIZE as u32).to_le_bytes());
    header[16..24].copy_from_slice(&segment_size.to_le_bytes());
    header[24..32].copy_from_slice(&first_seq.to_le_bytes());
    let checksum = crc32c::crc32c(&header[0..60]);
    header[60..64].copy_from_slice(&checksum.to_le_bytes());
    header
}

/// Reads every record with `seq > after_seq`, in order, checking each checksum and the sequence.
/// Stops with an error on corruption. Used for recovery after [`Journal::open`] repaired the tail.
pub fn read_records(
    dir: &Path,
    after_seq: u64,
    mut visit: impl FnMut(Record) -> Result<(), JournalError>,
) -> Result<u64, JournalError> {
    let segments = list_segments(dir)?;
    let mut expected: Option<u64> = None;
    let mut count = 0;
    for (index, segment) in segments.iter().enumerate() {
        // Skip segments entirely at or below after_seq.
        if let Some(next) = segments.get(index + 1) {
            if next.first_seq <= after_seq + 1 {
                continue;
            }
        }
        let data = read_segment(&segment.path, 0)?;
        let mut offset = SEGMENT_HEADER_SIZE as usize;
        if expected.is_none() {
            expected = Some(segment.first_seq);
        }
        loop {
            match decode_at(&data, offset, expected) {
                Decoded::Record(record, next) => {
                    offset = next as usize;
                    expected = Some(record.seq + 1);
                    if record.seq > after_seq {
                        count += 1;
                        visit(record)?;
                    }
                }
                Decoded::End => break,
                Decoded::Invalid(reason) => {
                    return Err(JournalError::Corrupt {
                        path: segment.path.clone(),
                        offset: offset as u64,
                        reason: match expected {
                            Some(seq) => format!("record {seq}: {reason}"),
                            None => reason,
                        },
                    })
                }
            }
        }
    }
    Ok(count)
}

/// The journal, open for appending.
pub struct Journal {
    dir: PathBuf,
    options: JournalOptions,
    file: Option<std::sync::Arc<File>>,
    path: PathBuf,
    segment_first_seq: u64,
    write_offset: u64,
    next_seq: u64,
    buffer: Vec<u8>,
    buffered_records: u64,
    bytes_written: u64,
    poisoned: bool,
    /// When set, a copy of every appended record, for replication (taken per group).
    captured: Option<Vec<Record>>,
}

impl Journal {
    /// Opens (or creates) the journal in `dir`: checks every segment, cuts back a torn tail.
    pub fn open(
        dir: &Path,
        options: JournalOptions,
    ) -> Result<(Journal, OpenReport), JournalError> {
        assert!(
            options.segment_size >= SEGMENT_SIZE_MIN,
            "segment size too small"
        );
        fs::create_dir_all(dir).map_err(io_error("create directory", dir))?;
        let segments = list_segments(dir)?;
        let mut report = OpenReport {
            segments: segments.len(),
            ..OpenReport::default()
        };
        let mut journal = Journal {
            dir: dir.to_path_buf(),
            options,
            file: None,
            path: PathBuf::new(),
            segment_first_seq: 1,
            write_offset: 0,
            next_seq: 1,
            buffer: Vec::with_capacity(RECORD_PAYLOAD_MAX * 2),
            buffered_records: 0,
            bytes_written: 0,
            poisoned: false,
            captured: None,
        };
        let mut expected: Option<u64> = None;
        for (index, segment) in segments.iter().enumerate() {
            let last = index + 1 == segments.len();
            let data = read_segment(&segment.path, journal.options.segment_size)?;
            if let Some(expected) = expected {
                if segment.first_seq != expected {
                    return Err(JournalError::Corrupt {
                        path: segment.path.clone(),
                        offset: 0,
                        reason: format!(
                            "segment starts at sequence {} but {expected} was expected (a segment is missing)",
                            segment.first_seq
                        ),
                    });
                }
            }
            let mut offset = SEGMENT_HEADER_SIZE as usize;
            let mut next_expected = segment.first_seq;
            loop {
                match decode_at(&data, offset, Some(next_expected)) {
                    Decoded::Record(record, next) => {
                        report.records += 1;
                        report.last_seq = record.seq;
                        next_expected = record.seq + 1;
                        offset = next as usize;
                    }
                    Decoded::End => break,
                    Decoded::Invalid(reason) => {
                        let later_valid =
                            last && Self::valid_record_after(&data, offset, next_expected);
                        if !last || later_valid {
                            return Err(JournalError::Corrupt {
                                path: segment.path.clone(),
                                offset: offset as u64,
                                reason: format!("record {next_expected}: {reason}"),
                            });
                        }
                        // A torn tail: the last write was cut by a crash before it was acknowledged.
                        let cut = data[offset..]
                            .iter()
                            .rposition(|b| *b != 0)
                            .map_or(0, |p| p + 1);
                        report.torn_tail_bytes_cut = cut as u64;
                        report.torn_tail_at = Some((segment.path.clone(), offset as u64));
                        tracing::warn!(
                            path = %segment.path.display(),
                            offset,
                            bytes = cut,
                            reason = %reason,
                            "journal: cutting back a torn tail left by a crash during an unacknowledged write"
                        );
                        let file = OpenOptions::new()
                            .write(true)
                            .open(&segment.path)
                            .map_err(io_error("open", &segment.path))?;
                        let zeros = vec![0u8; cut];
                        file.write_all_at(&zeros, offset as u64)
                            .map_err(io_error("write", &segment.path))?;
                        file.sync_data()
                            .map_err(io_error("fdatasync", &segment.path))?;
                        break;
                    }
                }
            }
            expected = Some(next_expected);
            if last {
                journal.file = Some(std::sync::Arc::new(
                    OpenOptions::new()
                        .write(true)
                        .open(&segment.path)
                        .map_err(io_error("open", &segment.path))?,
                ));
                journal.path = segment.path.clone();
                journal.segment_first_seq = segment.first_seq;
                journal.write_offset = offset as u64;
                journal.next_seq = next_expected;
                journal.options.segment_size = data.len() as u64;
            }
        }
        Ok((journal, report))
    }

    /// Creates an empty journal in `dir` (which must hold no segment) whose first record will
    /// have sequence `first_seq`: for a data directory restored from a snapshot whose index
    /// covers everything before it.
    pub fn create_at(
        dir: &Path,
        first_seq: u64,
        options: JournalOptions,
    ) -> Result<(), JournalError> {
        fs::create_dir_all(dir).map_err(io_error("create directory", dir))?;
        if !list_segments(dir)?.is_empty() {
            return Err(JournalError::Corrupt {
                path: dir.to_path_buf(),
                offset: 0,
                reason: "create_at needs a journal directory without segments".into(),
            });
        }
        let mut journal = Journal {
            dir: dir.to_path_buf(),
            options,
            file: None,
            path: PathBuf::new(),
            segment_first_seq: first_seq,
            write_offset: 0,
            next_seq: first_seq,
            buffer: Vec::new(),
            buffered_records: 0,
            bytes_written: 0,
            poisoned: false,
            captured: None,
        };
        journal.roll()
    }

    /// True when a whole, valid record with a sequence at or above `seq_min` starts after `offset`.
    fn valid_record_after(data: &[u8], offset: usize, seq_min: u64) -> bool {
        let mut candidate = padded(offset + 1);
        while candidate + RECORD_HEADER_SIZE <= data.len() {
            if data[candidate + 4..candidate + 8] == RECORD_MAGIC.to_le_bytes() {
                if let Decoded::Record(record, _) = decode_at(data, candidate, None) {
                    if record.seq >= seq_min {
                        return true;
                    }
                }
            }
            candidate += 8;
        }
        false
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The sequence number the next appended record gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Bytes written to segment files by this process (records, headers and zeroing; not preallocation).
    pub fn bytes_written(&self) -> u64 {
        self.bytes_written
    }

    /// Makes sure a record with this payload size can be appended without running out of disk:
    /// rolls to a new, preallocated segment when the current one is too full. Call before executing
    /// the batch: on `DiskFull` the caller refuses the batch and nothing has changed.
    pub fn reserve(&mut self, payload_len: usize) -> Result<(), JournalError> {
        if self.poisoned {
            return Err(JournalError::Poisoned);
        }
        if payload_len > RECORD_PAYLOAD_MAX {
            return Err(JournalError::RecordTooLarge {
                len: payload_len,
                max: RECORD_PAYLOAD_MAX,
            });
        }
        let needed = (RECORD_HEADER_SIZE + padded(payload_len)) as u64;
        let end = self.write_offset + self.buffer.len() as u64 + needed;
        if self.file.is_some() && end <= self.options.segment_size {
            return Ok(());
        }
        // The buffered records belong to the current segment: write and sync them there first,
        // since the group's commit will sync only the new segment.
        self.write_buffer()?;
        if let Some(file) = &self.file {
            if let Err(error) = file.sync_data() {
                self.poisoned = true;
                return Err(JournalError::Io {
                    operation: "fdatasync",
                    path: self.path.clone(),
                    source: error,
                });
            }
        }
        self.roll()
    }

    fn roll(&mut self) -> Result<(), JournalError> {
        let first_seq = self.next_seq;
        let path = segment_path(&self.dir, first_seq);
        let tmp = path.with_extension("wal.tmp");
        let file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&tmp)
            .map_err(io_error("create", &tmp))?;
        let size = self.options.segment_size;
        // SAFETY: plain syscall on an owned, open file descriptor.
        let result = unsafe {
            use std::os::fd::AsRawFd;
            libc::posix_fallocate(file.as_raw_fd(), 0, size as libc::off_t)
        };
        if result != 0 {
            drop(file);
            let _ = fs::remove_file(&tmp);
            if result == libc::ENOSPC {
                return Err(JournalError::DiskFull { path, bytes: size });
            }
            return Err(JournalError::Io {
                operation: "fallocate",
                path,
                source: io::Error::from_raw_os_error(result),
            });
        }
        let header = segment_header(first_seq, size);
        file.write_all_at(&header, 0)
            .map_err(io_error("write", &tmp))?;
        file.sync_all().map_err(io_error("fsync", &tmp))?;
        fs::rename(&tmp, &path).map_err(io_error("rename", &tmp))?;
        sync_dir(&self.dir)?;
        self.bytes_written += SEGMENT_HEADER_SIZE;
        self.file = Some(std::sync::Arc::new(file));
        self.path = path;
        self.segment_first_seq = first_seq;
        self.write_offset = SEGMENT_HEADER_SIZE;
        Ok(())
    }

    /// Appends a record to the group being built; it is durable only after [`Journal::commit`].
    /// [`Journal::reserve`] must have been called for this payload first.
    pub fn append(
        &mut self,
        kind: u16,
        timestamp: u64,
        payload: &[u8],
    ) -> Result<u64, JournalError> {
        if self.poisoned {
            return Err(JournalError::Poisoned);
        }
        let needed = (RECORD_HEADER_SIZE + padded(payload.len())) as u64;
        assert!(
            self.file.is_some()
                && self.write_offset + self.buffer.len() as u64 + needed
                    <= self.options.segment_size,
            "append without reserve"
        );
        let seq = self.next_seq;
        encode_record(&mut self.buffer, seq, kind, timestamp, payload);
        if let Some(captured) = &mut self.captured {
            captured.push(Record {
                seq,
                kind,
                timestamp,
                payload: payload.to_vec(),
            });
        }
        self.next_seq += 1;
        self.buffered_records += 1;
        Ok(seq)
    }

    fn write_buffer(&mut self) -> Result<(), JournalError> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let file = self
            .file
            .as_ref()
            .expect("a segment is open when records are buffered");
        let injected = self
            .options
            .faults
            .as_ref()
            .and_then(|faults| faults.intercept(file, self.write_offset, &self.buffer));
        if let Some(error) = injected {
            self.poisoned = true;
            return Err(JournalError::Io {
                operation: "write",
                path: self.path.clone(),
                source: error,
            });
        }
        if let Err(error) = file.write_all_at(&self.buffer, self.write_offset) {
            self.poisoned = true;
            return Err(JournalError::Io {
                operation: "write",
                path: self.path.clone(),
                source: error,
            });
        }
        self.write_offset += self.buffer.len() as u64;
        self.bytes_written += self.buffer.len() as u64;
        self.buffer.clear();
        Ok(())
    }

    /// Writes the buffered group without syncing it, and returns the segment file that holds it:
    /// the group is durable once `sync_data` on that file returns (pipelined group commit: the
    /// caller syncs on another thread while it builds the next group). `None` when nothing was
    /// buffered. An error poisons the journal.
    pub fn write_group(&mut self) -> Result<Option<std::sync::Arc<File>>, JournalError> {
        if self.poisoned {
            return Err(JournalError::Poisoned);
        }
        if self.buffered_records == 0 && self.buffer.is_empty() {
            return Ok(None);
        }
        self.write_buffer()?;
        self.buffered_records = 0;
        Ok(self.file.clone())
    }

    /// Writes the buffered group and makes it durable with one fdatasync (group commit).
    /// After an error the journal is poisoned: the state in memory is ahead of the disk, so the
    /// owner must stop and recover from the journal.
    pub fn commit(&mut self) -> Result<(), JournalError> {
        if self.poisoned {
            return Err(JournalError::Poisoned);
        }
        if self.buffered_records == 0 && self.buffer.is_empty() {
            return Ok(());
        }
        self.write_buffer()?;
        let file = self.file.as_ref().expect("segment open");
        if let Err(error) = file.sync_data() {
            self.poisoned = true;
            return Err(JournalError::Io {
                operation: "fdatasync",
                path: self.path.clone(),
                source: error,
            });
        }
        self.buffered_records = 0;
        Ok(())
    }

    /// Deletes segments all of whose records have sequence numbers at or below `seq`
    /// (a durable snapshot covers them). Never deletes the current segment.
    pub fn remove_segments_through(&mut self, seq: u64) -> Result<usize, JournalError> {
        let segments = list_segments(&self.dir)?;
        let mut removed = 0;
        for pair in segments.windows(2) {
            let (segment, next) = (&pair[0], &pair[1]);
            if next.first_seq <= seq + 1 && segment.first_seq != self.segment_first_seq {
                fs::remove_file(&segment.path).map_err(io_error("remove", &segment.path))?;
                removed += 1;
            }
        }
        if removed > 0 {
            sync_dir(&self.dir)?;
        }
        Ok(removed)
    }

    /// Keeps a copy of every record appended from now on, for [`Journal::take_captured`]
    /// (replication publishes each group's records).
    pub fn capture(&mut self) {
        self.captured.get_or_insert_with(Vec::new);
    }

    /// The records appended since the last call (empty unless [`Journal::capture`] was called).
    pub fn take_captured(&mut self) -> Vec<Record> {
        self.captured
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// The first sequence number still on disk.
    pub fn first_seq_on_disk(&self) -> Result<u64, JournalError> {
        Ok(list_segments(&self.dir)?
            .first()
            .map_or(self.next_seq, |segment| segment.first_seq))
    }
}

/// Cuts every record with a sequence above `keep_through` from a closed journal: zeroes them
/// from the first such record's offset to the end of its segment, fdatasyncs, and removes the
/// segments after it. Idempotent (a crash in the middle leaves either the old tail or a zeroed
/// one, which [`Journal::open`] reads as the end). Used by a replicated node to drop records it
/// wrote as leader that the replicated log never stored (they were never acknowledged).
/// Returns the number of records cut.
pub fn truncate_after(dir: &Path, keep_through: u64) -> Result<u64, JournalError> {
    let segments = list_segments(dir)?;
    let mut cut = 0u64;
    let mut removed = false;
    for (index, segment) in segments.iter().enumerate() {
        let next_first = segments.get(index + 1).map(|next| next.first_seq);
        if next_first.is_some_and(|first| first <= keep_through + 1) {
            continue; // every record of this segment is kept
        }
        if segment.first_seq > keep_through + 1 {
            // Wholly after the cut: count its records, then remove it.
            cut += count_records(&segment.path)?;
            fs::remove_file(&segment.path).map_err(io_error("remove", &segment.path))?;
            removed = true;
            continue;
        }
        let data = read_segment(&segment.path, 0)?;
        let mut offset = SEGMENT_HEADER_SIZE as usize;
        let mut expected = segment.first_seq;
        let mut cut_at = None;
        while let Decoded::Record(record, next) = decode_at(&data, offset, Some(expected)) {
            if record.seq > keep_through {
                cut_at.get_or_insert(offset);
                cut += 1;
            }
            expected = record.seq + 1;
            offset = next as usize;
        }
        if let Some(at) = cut_at {
            let end = data[at..]
                .iter()
                .rposition(|b| *b != 0)
                .map_or(0, |p| p + 1);
            let file = OpenOptions::new()
                .write(true)
                .open(&segment.path)
                .map_err(io_error("open", &segment.path))?;
            file.write_all_at(&vec![0u8; end], at as u64)
                .map_err(io_error("write", &segment.path))?;
            file.sync_data()
                .map_err(io_error("fdatasync", &segment.path))?;
        }
    }
    if removed {
        sync_dir(dir)?;
    }
    Ok(cut)
}

fn count_records(path: &Path) -> Result<u64, JournalError> {
    let data = read_segment(path, 0)?;
    let mut offset = SEGMENT_HEADER_SIZE as usize;
    let mut count = 0;
    while let Decoded::Record(_, next) = decode_at(&data, offset, None) {
        count += 1;
        offset = next as usize;
    }
    Ok(count)
}

fn sync_dir(dir: &Path) -> Result<(), JournalError> {
    File::open(dir)
        .and_then(|file| file.sync_all())
        .map_err(io_error("fsync directory", dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> JournalOptions {
        JournalOptions {
            segment_size: SEGMENT_SIZE_MIN + 4096,
            faults: None,
        }
    }

    fn write(dir: &Path, payloads: &[Vec<u8>]) {
        let (mut journal, _) = Journal::open(dir, options()).unwrap();
        for payload in payloads {
            journal.reserve(payload.len()).unwrap();
            journal.append(7, 1000, payload).unwrap();
            journal.commit().unwrap();
        }
    }

    fn read_all(dir: &Path) -> Vec<Record> {
        let mut records = Vec::new();
        read_records(dir, 0, |record| {
            records.push(record);
            Ok(())
        })
        .unwrap();
        records
    }

    #[test]
    fn records_round_trip_across_segments() {
        let dir = tempfile::tempdir().unwrap();
        let payloads: Vec<Vec<u8>> = (0..40u32)
            .map(|i| vec![i as u8; (i as usize * 37_001) % 300_000 + 1])
            .collect();
        write(dir.path(), &payloads);
        let records = read_all(dir.path());
        assert_eq!(records.len(), payloads.len());
        for (i, record) in records.iter().enumerate() {
            assert_eq!(record.seq, i as u64 + 1);
            assert_eq!(record.payload, payloads[i]);
        }
        assert!(list_segments(dir.path()).unwrap().len() > 1);
        // Reopen and continue.
        let (journal, report) = Journal::open(dir.path(), options()).unwrap();
        assert_eq!(report.last_seq, 40);
        assert_eq!(journal.next_seq(), 41);
    }

    #[test]
    fn truncate_after_cuts_mid_segment_and_across_segments_and_appending_resumes() {
        let dir = tempfile::tempdir().unwrap();
        let payloads: Vec<Vec<u8>> = (0..40u32)
            .map(|i| vec![i as u8; (i as usize * 37_001) % 300_000 + 1])
            .collect();
        write(dir.path(), &payloads);
        let segments_before = list_segments(dir.path()).unwrap().len();
        assert!(segments_before > 2);
        // Nothing above the last record: nothing cut.
        assert_eq!(truncate_after(dir.path(), 40).unwrap(), 0);
        // Cut in an early segment: later segments go, the rest of that one is zeroed.
        assert_eq!(truncate_after(dir.path(), 7).unwrap(), 33);
        assert_eq!(truncate_after(dir.path(), 7).unwrap(), 0, "idempotent");
        assert!(list_segments(dir.path()).unwrap().len() < segments_before);
        let records = read_all(dir.path());
        assert_eq!(records.len(), 7);
        assert_eq!(records[6].payload, payloads[6]);
        let (mut journal, report) = Journal::open(dir.path(), options()).unwrap();
        assert_eq!((report.last_seq, report.torn_tail_bytes_cut), (7, 0));
        assert_eq!(journal.next_seq(), 8);
        journal.reserve(3).unwrap();
        assert_eq!(journal.append(9, 5, b"new").unwrap(), 8);
        journal.commit().unwrap();
        drop(journal);
        let records = read_all(dir.path());
        assert_eq!(records.len(), 8);
        assert_eq!(records[7].payload, b"new");
        // Cut everything.
        assert_eq!(truncate_after(dir.path(), 0).unwrap(), 8);
        assert!(read_all(dir.path()).is_empty());
    }

    #[test]
    fn a_journal_created_at_a_sequence_continues_from_it() {
        let dir = tempfile::tempdir().unwrap();
        Journal::create_at(dir.path(), 501, options()).unwrap();
        assert!(
            Journal::create_at(dir.path(), 7, options()).is_err(),
            "not over segments"
        );
        let (mut journal, report) = Journal::open(dir.path(), options()).unwrap();
        assert_eq!((report.records, journal.next_seq()), (0, 501));
        journal.reserve(2).unwrap();
        assert_eq!(journal.append(1, 1, b"ok").unwrap(), 501);
        journal.commit().unwrap();
        drop(journal);
        let records = read_all(dir.path());
        assert_eq!((records.len(), records[0].seq), (1, 501));
    }

    #[test]
    fn capture_copies_each_appended_record_once() {
        let dir = tempfile::tempdir().unwrap();
        let (mut journal, _) = Journal::open(dir.path(), options()).unwrap();
        journal.reserve(2).unwrap();
        journal.append(1, 10, b"no").unwrap();
        assert!(journal.take_captured().is_empty(), "off by default");
        journal.capture();
        journal.reserve(3).unwrap();
        journal.append(2, 20, b"yes").unwrap();
        journal.reserve(1).unwrap();
        journal.append(3, 30, b"!").unwrap();
        let captured = journal.take_captured();
        assert_eq!(captured.len(), 2);
        assert_eq!(
            (captured[0].seq, captured[0].kind, captured[0].timestamp),
            (2, 2, 20)
        );
        assert_eq!(captured[1].payload, b"!");
        assert!(journal.take_captured().is_empty());
    }

    #[test]
    fn torn_tail_is_cut_back_to_the_last_whole_record() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), &[vec![1; 100], vec![2; 200], vec![3; 5000]]);
        let segment = &list_segments(dir.path()).unwrap()[0].path;
        let data = fs::read(segment).unwrap();
        // The third record starts after two records; tear it in the middle of its payload.
        let third = SEGMENT_HEADER_SIZE as usize + (32 + 104) + (32 + 200);
        let file = OpenOptions::new().write(true).open(segment).unwrap();
        file.write_all_at(&vec![0u8; 3000], (third + 32 + 2000) as u64)
            .unwrap();
        drop(data);
        let (journal, report) = Journal::open(dir.path(), options()).unwrap();
        assert_eq!(report.last_seq, 2);
        assert_eq!(report.torn_tail_at.as_ref().unwrap().1, third as u64);
        assert!(report.torn_tail_bytes_cut > 0);
        assert_eq!(journal.next_seq(), 3);
        drop(journal);
        assert_eq!(read_all(dir.path()).len(), 2);
        // Appending after the cut works and reads back.
        write(dir.path(), &[vec![9; 10]]);
        let records = read_all(dir.path());
        assert_eq!(records.len(), 3);
        assert_eq!(records[2].payload, vec![9; 10]);
    }

    #[test]
    fn flipped_bit_in_the_middle_stops_start_up_naming_file_and_offset() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), &[vec![1; 100], vec![2; 200], vec![3; 300]]);
        let segment = list_segments(dir.path()).unwrap()[0].path.clone();
        let second = SEGMENT_HEADER_SIZE as usize + 32 + 104;
        let mut data = fs::read(&segment).unwrap();
        data[second + 32 + 50] ^= 0x10;
        fs::write(&segment, &data).unwrap();
        let error = Journal::open(dir.path(), options())
            .err()
            .expect("must refuse");
        match &error {
            JournalError::Corrupt { path, offset, .. } => {
                assert_eq!(path, &segment);
                assert_eq!(*offset, second as u64);
            }
            other => panic!("unexpected {other:?}"),
        }
        let message = error.to_string();
        assert!(
            message.contains("segment-") && message.contains(&second.to_string()),
            "{message}"
        );
        // The file is unchanged: nothing was dropped.
        assert_eq!(fs::read(&segment).unwrap(), data);
    }

    #[test]
    fn corruption_in_an_older_segment_is_never_treated_as_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let payloads: Vec<Vec<u8>> = (0..6).map(|i| vec![i; 400_000]).collect();
        write(dir.path(), &payloads);
        let segments = list_segments(dir.path()).unwrap();
        assert!(segments.len() >= 2);
        let first = segments[0].path.clone();
        let mut data = fs::read(&first).unwrap();
        let last_record = data.iter().rposition(|b| *b != 0).unwrap();
        data[last_record] ^= 1;
        fs::write(&first, &data).unwrap();
        assert!(matches!(
            Journal::open(dir.path(), options()),
            Err(JournalError::Corrupt { .. })
        ));
    }
}
