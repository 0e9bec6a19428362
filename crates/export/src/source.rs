//! Where vouchers come from: a running switch over its signed API (`GET /v1/vouchers`, the
//! operator's key), or the switch in the same process (`serve` with `[[export]]` sections).

use std::future::Future;
use std::sync::Arc;

use clearhouse_clearing::export::Checkpoint;
use clearhouse_switch::clearing::{Clearing, VoucherPage};
use clearhouse_switch::client::SignedClient;

use crate::ExportError;

/// A page of the chain with every body (the operator's view).
#[derive(Clone, Debug, Default)]
pub struct SourcePage {
    /// The chain hash before the first entry.
    pub previous_hash: [u8; 32],
    /// Sequence, leaf digest and body (None if the caller may not see it).
    pub entries: Vec<(u64, [u8; 32], Option<String>)>,
    /// Signed checkpoints of the windows closed in this page.
    pub checkpoints: Vec<Checkpoint>,
    /// The key the switch says signs its checkpoints.
    pub public_key: Option<ed25519_dalek::VerifyingKey>,
    /// The chain's last voucher when the page was read.
    pub head_seq: u64,
}

impl SourcePage {
    fn from_view(page: VoucherPage) -> Result<SourcePage, ExportError> {
        let malformed = |what: &str| ExportError::Source(format!("malformed voucher page: {what}"));
        let previous_hash: [u8; 32] = hex::decode(&page.previous_hash)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| malformed("previous_hash"))?;
        let public_key = hex::decode(&page.public_key)
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .and_then(|b| ed25519_dalek::VerifyingKey::from_bytes(&b).ok());
        Ok(SourcePage {
            previous_hash,
            entries: page
                .entries
                .into_iter()
                .map(|e| (e.seq, e.leaf, e.body))
                .collect(),
            checkpoints: page.checkpoints,
            public_key,
            head_seq: page.head_seq,
        })
    }
}

/// Reads the chain.
pub trait Source: Send + Sync {
    /// Vouchers `from..from + limit` (fewer at the head).
    fn page(
        &self,
        from: u64,
        limit: usize,
    ) -> impl Future<Output = Result<SourcePage, ExportError>> + Send;
}

/// A running switch, over HTTP, signed with the operator's key.
pub struct HttpSource {
    client: SignedClient,
}

impl HttpSource {
    pub fn new(client: SignedClient) -> HttpSource {
        HttpSource { client }
    }
}

impl Source for HttpSource {
    async fn page(&self, from: u64, limit: usize) -> Result<SourcePage, ExportError> {
        let path = format!("/v1/vouchers?from={from}&limit={limit}");
        let (status, body) = self
            .client
            .request("GET", &path, b"")
            .await
            .map_err(|e| ExportError::Source(e.to_string()))?;
        if status != 200 {
            let message = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["message"].as_str().map(str::to_string))
                .unwrap_or_default();
            return Err(ExportError::Source(format!(
                "GET {path}: {status} {message}"
            )));
        }
        let page: VoucherPage = serde_json::from_slice(&body)
            .map_err(|e| ExportError::Source(format!("GET {path}: {e}")))?;
        SourcePage::from_view(page)
    }
}

/// The switch in this process.
pub struct LocalSource {
    clearing: Arc<Clearing>,
}

impl LocalSource {
    pub fn new(clearing: Arc<Clearing>) -> LocalSource {
        LocalSource { clearing }
    }
}

impl Source for LocalSource {
    async fn page(&self, from: u64, limit: usize) -> Result<SourcePage, ExportError> {
        let page = self
            .clearing
            .voucher_page(None, from, limit)
            .await
            .map_err(|e| ExportError::Source(e.to_string()))?;
        SourcePage::from_view(page)
    }
}
