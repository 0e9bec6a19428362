//! The switch's calls into the engine and its own files: submit (with a commit-time callback),
//! blocking lookups off the async threads, and private files written durably. Imports nothing
//! above the error type.

use std::path::Path;

use clearhouse_engine::{EngineError, Node, RecordPut, SubmitOutcome};
use clearhouse_ledger::Transfer;
use tokio::sync::oneshot;

use crate::error::ApiError;

/// Submits to the engine and waits without blocking the runtime.
pub(crate) async fn engine_submit(
    node: &Node,
    transfers: Vec<Transfer>,
    records: Vec<RecordPut>,
) -> Result<SubmitOutcome, EngineError> {
    submit_then(node, transfers, records, |_| {}).await
}

/// Runs a blocking engine call (lookups, index reads) off the async threads.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, EngineError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|error| ApiError::new(500, "internal", error.to_string()))?
        .map_err(ApiError::from)
}

/// Writes a file readable by its owner only, durably (fsync file and directory).
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Submits and runs `on_commit` on the engine's answering thread, in journal order, before the
/// caller is woken.
pub async fn submit_then(
    node: &Node,
    transfers: Vec<Transfer>,
    records: Vec<RecordPut>,
    on_commit: impl FnOnce(&SubmitOutcome) + Send + 'static,
) -> Result<SubmitOutcome, EngineError> {
    let (sender, receiver) = oneshot::channel();
    node.submit_with(transfers, records, move |result| {
        if let Ok(outcome) = &result {
            on_commit(outcome);
        }
        let _ = sender.send(result);
    })?;
    receiver.await.unwrap_or_else(|_| {
        Err(EngineError::Stopped {
            reason: "the engine dropped the request".into(),
        })
    })
}
