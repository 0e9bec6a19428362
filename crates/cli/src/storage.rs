//! `clearhouse storage`: where a stopped server's disk goes (the index's tables, the journal).

use std::path::PathBuf;

use anyhow::Context;
use serde_json::json;

use crate::common::disk_bytes;

#[derive(clap::Args)]
pub struct StorageArgs {
    /// The server's data directory (the server must be stopped: the index is opened read-only).
    #[arg(long)]
    data_dir: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run(args: StorageArgs) -> anyhow::Result<()> {
    let ledger = args.data_dir.join("ledger");
    let index = ledger.join("index.redb");
    let tables = clearhouse_engine::index::storage_report(&index)
        .with_context(|| format!("reading {} (is the server stopped?)", index.display()))?;
    let index_bytes = std::fs::metadata(&index)?.len();
    let journal_bytes = disk_bytes(&ledger.join("journal"));
    if args.json {
        let tables: Vec<_> = tables
            .iter()
            .map(|t| {
                json!({
                    "table": t.table,
                    "entries": t.entries,
                    "stored_bytes": t.stored_bytes,
                    "metadata_bytes": t.metadata_bytes,
                    "fragmented_bytes": t.fragmented_bytes,
                    "leaf_pages": t.leaf_pages,
                    "branch_pages": t.branch_pages,
                })
            })
            .collect();
        let report = json!({
            "index_file_bytes": index_bytes,
            "journal_bytes": journal_bytes,
            "tables": tables,
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "{:<16} {:>11} {:>13} {:>13} {:>13} {:>9} {:>11}",
        "table", "entries", "stored", "metadata", "fragmented", "pages", "bytes/entry"
    );
    for t in &tables {
        let used = t.stored_bytes + t.metadata_bytes + t.fragmented_bytes;
        println!(
            "{:<16} {:>11} {:>13} {:>13} {:>13} {:>9} {:>11}",
            t.table,
            t.entries,
            t.stored_bytes,
            t.metadata_bytes,
            t.fragmented_bytes,
            t.leaf_pages + t.branch_pages,
            used.checked_div(t.entries).unwrap_or(0),
        );
    }
    println!(
        "index file {index_bytes} bytes (the rest is free pages); journal {journal_bytes} bytes"
    );
    Ok(())
}
