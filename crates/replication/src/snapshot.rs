//! Snapshots, for a node the stream was trimmed past: a standby's index, checkpointed at a
//! stream message boundary, stored in a JetStream object store; a node restores the newest one
//! and follows the stream from there.
//!
//! A snapshot is two objects: `snap-{stream_seq:020}.index` (the redb index file, copied while no
//! node had it open, after a clean stop: a durable checkpoint of everything applied) and
//! `snap-{stream_seq:020}.json` (the [`Manifest`]: positions, chain head, size and BLAKE3 of the
//! index). Restoring moves the old ledger directory aside, writes the index, checks its size and
//! hash, and creates an empty journal that continues at the next journal sequence. Operator keys
//! never go into snapshots.

use std::path::{Path, PathBuf};

use async_nats::jetstream::{self, object_store, stream::StorageType};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use crate::{nats, ReplicationConfig, ReplicationError};

/// Snapshots kept in the store (older ones are deleted after an upload).
pub const SNAPSHOTS_KEPT: usize = 2;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Manifest {
    /// The last stream message applied.
    pub stream_seq: u64,
    /// The last journal record applied (the index's checkpoint).
    pub journal_seq: u64,
    pub chain_seq: u64,
    pub chain_hash: String,
    pub index_bytes: u64,
    pub index_blake3: String,
    pub taken_by: String,
}

pub async fn store(
    js: &jetstream::Context,
    config: &ReplicationConfig,
) -> Result<object_store::ObjectStore, ReplicationError> {
    let bucket = format!("{}_snapshots", config.stream.to_lowercase());
    if let Ok(store) = js.get_object_store(&bucket).await {
        return Ok(store);
    }
    js.create_object_store(object_store::Config {
        bucket,
        storage: StorageType::File,
        num_replicas: config.replicas,
        ..Default::default()
    })
    .await
    .map_err(nats)
}

fn name(stream_seq: u64, what: &str) -> String {
    format!("snap-{stream_seq:020}.{what}")
}

fn blake3_of(path: &Path) -> Result<(u64, String), ReplicationError> {
    let mut hasher = blake3::Hasher::new();
    let mut file = std::fs::File::open(path).map_err(io)?;
    let bytes = std::io::copy(&mut file, &mut hasher).map_err(io)?;
    Ok((bytes, hasher.finalize().to_hex().to_string()))
}

fn io(error: std::io::Error) -> ReplicationError {
    ReplicationError::Stream(format!("snapshot file: {error}"))
}

/// Uploads an index copy (taken after a clean stop) with its manifest; deletes snapshots beyond
/// [`SNAPSHOTS_KEPT`].
pub async fn upload(
    store: &object_store::ObjectStore,
    index_copy: &Path,
    mut manifest: Manifest,
) -> Result<(), ReplicationError> {
    let (bytes, hash) = blake3_of(index_copy)?;
    manifest.index_bytes = bytes;
    manifest.index_blake3 = hash;
    let mut file = tokio::fs::File::open(index_copy).await.map_err(io)?;
    store
        .put(name(manifest.stream_seq, "index").as_str(), &mut file)
        .await
        .map_err(nats)?;
    let json = serde_json::to_vec(&manifest).expect("json");
    store
        .put(
            name(manifest.stream_seq, "json").as_str(),
            &mut json.as_slice(),
        )
        .await
        .map_err(nats)?;
    let mut taken = manifests(store).await?;
    taken.sort_unstable();
    while taken.len() > SNAPSHOTS_KEPT {
        let old = taken.remove(0);
        let _ = store.delete(name(old, "json")).await;
        let _ = store.delete(name(old, "index")).await;
    }
    Ok(())
}

/// The stream sequences of the snapshots in the store.
async fn manifests(store: &object_store::ObjectStore) -> Result<Vec<u64>, ReplicationError> {
    let mut list = store.list().await.map_err(nats)?;
    let mut out = Vec::new();
    while let Some(info) = list.next().await {
        let info = info.map_err(nats)?;
        if info.deleted {
            continue;
        }
        if let Some(seq) = info
            .name
            .strip_prefix("snap-")
            .and_then(|rest| rest.strip_suffix(".json"))
            .and_then(|seq| seq.parse().ok())
        {
            out.push(seq);
        }
        if out.len() > 1_000 {
            break;
        }
    }
    Ok(out)
}

/// Replaces `ledger_dir` with the newest snapshot (the old directory is kept beside it as
/// `{ledger_dir}.before-restore-{unix seconds}`). Returns the manifest restored.
pub async fn restore_newest(
    store: &object_store::ObjectStore,
    ledger_dir: &Path,
    journal_options: clearhouse_journal::JournalOptions,
) -> Result<Manifest, ReplicationError> {
    let newest = manifests(store).await?.into_iter().max().ok_or_else(|| {
        ReplicationError::Trimmed("no snapshot in the store to restore from".into())
    })?;
    let mut json = Vec::new();
    let mut object = store.get(name(newest, "json")).await.map_err(nats)?;
    tokio::io::copy(&mut object, &mut json).await.map_err(io)?;
    let manifest: Manifest = serde_json::from_slice(&json)
        .map_err(|e| ReplicationError::Stream(format!("snapshot manifest {newest}: {e}")))?;
    let staging: PathBuf = ledger_dir.with_extension("restore");
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).map_err(io)?;
    let index = staging.join("index.redb");
    let mut object = store.get(name(newest, "index")).await.map_err(nats)?;
    let mut file = tokio::fs::File::create(&index).await.map_err(io)?;
    tokio::io::copy(&mut object, &mut file).await.map_err(io)?;
    file.sync_all().await.map_err(io)?;
    drop(file);
    let (bytes, hash) = blake3_of(&index)?;
    if (bytes, hash.as_str()) != (manifest.index_bytes, manifest.index_blake3.as_str()) {
        return Err(ReplicationError::Stream(format!(
            "snapshot {newest}: the index downloaded has {bytes} bytes, BLAKE3 {hash}; the manifest says {} bytes, {}",
            manifest.index_bytes, manifest.index_blake3
        )));
    }
    clearhouse_journal::Journal::create_at(
        &staging.join("journal"),
        manifest.journal_seq + 1,
        journal_options,
    )
    .map_err(|e| ReplicationError::Stream(e.to_string()))?;
    if ledger_dir.exists() {
        let seconds = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let aside = PathBuf::from(format!("{}.before-restore-{seconds}", ledger_dir.display()));
        std::fs::rename(ledger_dir, &aside).map_err(io)?;
    }
    std::fs::rename(&staging, ledger_dir).map_err(io)?;
    if let Some(parent) = ledger_dir.parent() {
        std::fs::File::open(parent)
            .and_then(|dir| dir.sync_all())
            .map_err(io)?;
    }
    Ok(manifest)
}
