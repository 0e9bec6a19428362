//! `serve` with a `[replication]` section: the node's roles in a replicated cluster.
//!
//! Standby: reconcile the journal's tail with the stream, follow the stream, answer participants
//! 503 `not_leader` with the leader's address, poll the lease. Promotion (the lease taken):
//! renew it, apply the stream to its end, publish the term's barrier (fencing the old leader),
//! restart the node as leader with the publisher, start the switch (open payments resume as after
//! a restart), serve the API. A leader that loses the lease, its validity or the stream exits
//! with code 75 (EX_TEMPFAIL): its supervisor restarts it, as a standby.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use clearhouse_engine::replica::{Replication, TailCheckHandle};
use clearhouse_engine::Node;
use clearhouse_replication::follower::{self, FollowerStatus, StreamTail};
use clearhouse_replication::lease::{Held, Holder, Lease};
use clearhouse_replication::publisher::{self, Publisher, Term};
use clearhouse_replication::{snapshot, ReplicationConfig};
use clearhouse_switch::{Switch, SwitchConfig};
use serde_json::json;

use crate::common::switch_node_options;

/// Exit code of a node that stopped leading (deposed, lease lost, stream unreachable): restart it.
pub const EXIT_STEPPED_DOWN: i32 = 75;

/// Splits a configuration file into the switch's part and the `[replication]` section.
/// A configuration file split into the switch's own part and the sections of the components
/// beside it.
pub struct SplitConfig {
    pub rest: String,
    pub replication: Option<ReplicationConfig>,
    pub exports: Vec<clearhouse_export::ExportConfig>,
    pub amqp: Option<clearhouse_amqp::AmqpConfig>,
    pub retention: Option<clearhouse_export::retention::RetentionConfig>,
}

pub fn split_config(text: &str) -> anyhow::Result<SplitConfig> {
    let table: toml::Table = toml::from_str(text).context("parsing the configuration")?;
    let replication: Option<ReplicationConfig> = table
        .get("replication")
        .map(|section| section.clone().try_into())
        .transpose()
        .context("the [replication] section")?;
    let exports: Vec<clearhouse_export::ExportConfig> = match table.get("export") {
        None => Vec::new(),
        Some(toml::Value::Array(sections)) => sections
            .iter()
            .enumerate()
            .map(|(i, section)| {
                section
                    .clone()
                    .try_into()
                    .with_context(|| format!("[[export]] section {}", i + 1))
            })
            .collect::<anyhow::Result<_>>()?,
        Some(_) => bail!("export sections are written [[export]], one per sink"),
    };
    // A bad export section stops every node at start, not a standby at its takeover.
    for export in &exports {
        export.sink_config().map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let amqp: Option<clearhouse_amqp::AmqpConfig> = table
        .get("amqp")
        .map(|section| section.clone().try_into())
        .transpose()
        .context("the [amqp] section")?;
    if let Some(amqp) = &amqp {
        amqp.check().map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let retention: Option<clearhouse_export::retention::RetentionConfig> = table
        .get("retention")
        .map(|section| section.clone().try_into())
        .transpose()
        .context("the [retention] section")?;
    if let Some(retention) = &retention {
        retention
            .archive_dir(&exports, std::path::Path::new("."))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    if replication.is_none() && exports.is_empty() && amqp.is_none() && retention.is_none() {
        return Ok(SplitConfig {
            rest: text.to_string(),
            replication,
            exports,
            amqp,
            retention,
        });
    }
    // The switch's own parser refuses unknown sections: hand it the text without these.
    let mut rest = String::new();
    let mut inside = false;
    for line in text.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with('[') {
            inside = trimmed.starts_with("[replication]")
                || trimmed.starts_with("[[export]]")
                || trimmed.starts_with("[amqp]")
                || trimmed.starts_with("[retention]");
        }
        if !inside {
            rest.push_str(line);
            rest.push('\n');
        }
    }
    Ok(SplitConfig {
        rest,
        replication,
        exports,
        amqp,
        retention,
    })
}

struct StandbyState {
    node_id: String,
    status: Arc<FollowerStatus>,
    leader: Mutex<Option<Holder>>,
    stream_last: std::sync::atomic::AtomicU64,
}

fn standby_answer(state: &StandbyState, status: StatusCode, code: &str) -> Response {
    let leader = state.leader.lock().expect("leader").clone();
    let applied = state.status.applied_stream_seq.load(Ordering::SeqCst);
    let lag = state
        .stream_last
        .load(Ordering::SeqCst)
        .saturating_sub(applied);
    let published = state.status.applied_published_ns.load(Ordering::SeqCst);
    let lag_ms = if lag == 0 || published == 0 {
        0
    } else {
        (now_ns().saturating_sub(published as u128) / 1_000_000) as u64
    };
    let diverged = state.status.diverged.lock().expect("diverged").clone();
    let body = json!({
        "code": code,
        "message": match &diverged {
            Some(reason) => format!("this node diverges from the replicated stream and serves nothing: {reason}"),
            None => "this node is a standby; send requests to the leader".into(),
        },
        "role": "standby",
        "node_id": state.node_id,
        "leader": leader.as_ref().map(|l| l.advertise.clone()),
        "leader_node_id": leader.as_ref().map(|l| l.node_id.clone()),
        "applied_stream_seq": applied,
        "lag_messages": lag,
        "lag_ms": lag_ms,
        "state": if diverged.is_some() { "diverged" } else if lag > 256 { "lagging" } else { "following" },
    });
    let mut response = (status, axum::Json(body)).into_response();
    let headers = response.headers_mut();
    headers.insert("retry-after", "1".parse().expect("header"));
    if let Some(leader) = leader.and_then(|l| l.advertise.parse().ok()) {
        headers.insert("clearhouse-leader", leader);
    }
    response
}

fn now_ns() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// A standby answers participants 503 `not_leader` with the leader's address (no proxy: a proxy
/// would add a hop and a queue to the hot path and forward to a dead leader exactly when it
/// matters; load balancers follow `/ready`, 200 on the leader only).
fn standby_router(state: Arc<StandbyState>) -> Router {
    let health = {
        let state = state.clone();
        move || {
            let state = state.clone();
            async move { standby_answer(&state, StatusCode::OK, "standby") }
        }
    };
    let ready = {
        let state = state.clone();
        move || {
            let state = state.clone();
            async move { standby_answer(&state, StatusCode::SERVICE_UNAVAILABLE, "not_leader") }
        }
    };
    let metrics = {
        let state = state.clone();
        move || {
            let state = state.clone();
            async move {
                let applied = state.status.applied_stream_seq.load(Ordering::SeqCst);
                let last = state.stream_last.load(Ordering::SeqCst);
                let diverged = state.status.diverged.lock().expect("d").is_some() as u8;
                format!(
                    "# TYPE clearhouse_replication_role gauge\nclearhouse_replication_role{{role=\"standby\"}} 1\n# TYPE clearhouse_replication_applied_stream_seq gauge\nclearhouse_replication_applied_stream_seq {applied}\n# TYPE clearhouse_replication_lag_messages gauge\nclearhouse_replication_lag_messages {}\n# TYPE clearhouse_replication_diverged gauge\nclearhouse_replication_diverged {diverged}\n",
                    last.saturating_sub(applied)
                )
            }
        }
    };
    let fallback = move || {
        let state = state.clone();
        async move { standby_answer(&state, StatusCode::SERVICE_UNAVAILABLE, "not_leader") }
    };
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .fallback(fallback)
}

/// The leader's `/metrics` with the replication figures appended.
async fn with_replication_metrics(
    response: Response,
    metrics: &clearhouse_replication::publisher::PublishMetrics,
    term: u64,
    lease_left: Duration,
) -> Response {
    let (mut parts, body) = response.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, 16 << 20).await else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    let mut text = String::from_utf8_lossy(&bytes).into_owned();
    let load = |value: &std::sync::atomic::AtomicU64| value.load(Ordering::Relaxed);
    text.push_str(&format!(
        "# HELP clearhouse_replication_role This node's role (leader or standby).
# TYPE clearhouse_replication_role gauge
clearhouse_replication_role{{role=\"leader\"}} 1
         # HELP clearhouse_replication_term The leader's term (the lease revision it took).
# TYPE clearhouse_replication_term gauge
clearhouse_replication_term {term}
         # HELP clearhouse_replication_stream_seq The last stream sequence this leader published.
# TYPE clearhouse_replication_stream_seq gauge
clearhouse_replication_stream_seq {}
         # HELP clearhouse_replication_published_messages_total Stream messages published (journal groups, coalesced).
# TYPE clearhouse_replication_published_messages_total counter
clearhouse_replication_published_messages_total {}
         # HELP clearhouse_replication_publish_seconds_total Time from publish to the stream's ack, summed.
# TYPE clearhouse_replication_publish_seconds_total counter
clearhouse_replication_publish_seconds_total {:.6}
         # HELP clearhouse_replication_resends_total Publishes resent after a timeout or lost connection.
# TYPE clearhouse_replication_resends_total counter
clearhouse_replication_resends_total {}
         # HELP clearhouse_replication_lease_valid_seconds How long this leader may still act without a renewal.
# TYPE clearhouse_replication_lease_valid_seconds gauge
clearhouse_replication_lease_valid_seconds {:.3}
",
        load(&metrics.last_stream_seq),
        load(&metrics.messages),
        load(&metrics.publish_nanos) as f64 / 1e9,
        load(&metrics.resends),
        lease_left.as_secs_f64(),
    ));
    parts.headers.remove(axum::http::header::CONTENT_LENGTH);
    Response::from_parts(parts, axum::body::Body::from(text))
}

fn lease_lapsed() -> Response {
    let mut response = (
        StatusCode::SERVICE_UNAVAILABLE,
        axum::Json(json!({"code": "not_leader", "message": "this node's leader lease lapsed; it steps down"})),
    )
        .into_response();
    response
        .headers_mut()
        .insert("retry-after", "1".parse().expect("header"));
    response
}

fn lease_lapsed_outcome_unknown() -> Response {
    let mut response = (
        StatusCode::SERVICE_UNAVAILABLE,
        axum::Json(json!({"code": "outcome_unknown", "message": "this node's leader lease lapsed while the request ran; ask the leader for the payment's status before resubmitting"})),
    )
        .into_response();
    response
        .headers_mut()
        .insert("retry-after", "1".parse().expect("header"));
    response
}

fn step_down(reason: &str) -> ! {
    tracing::error!(
        reason,
        "stepping down: this process exits so its supervisor restarts it as a standby"
    );
    eprintln!("clearhouse: stepping down: {reason}");
    std::process::exit(EXIT_STEPPED_DOWN)
}

pub fn serve_replicated(
    data_dir: PathBuf,
    config: SwitchConfig,
    replication: ReplicationConfig,
    exports: Vec<clearhouse_export::ExportConfig>,
) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let handle = runtime.handle().clone();
    runtime.block_on(run(data_dir, config, replication, exports, handle))
}

async fn run(
    data_dir: PathBuf,
    config: SwitchConfig,
    replication: ReplicationConfig,
    exports: Vec<clearhouse_export::ExportConfig>,
    handle: tokio::runtime::Handle,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(&data_dir)?;
    for key in [
        "operator.key",
        "operator-ed25519.key",
        "operator-ed25519.pub",
    ] {
        if !data_dir.join(key).exists() {
            bail!(
                "{} is missing: every node of a replicated cluster needs the same operator keys (run `clearhouse init` once and copy operator.key, operator-ed25519.key and operator-ed25519.pub into each node's data directory)",
                data_dir.join(key).display()
            );
        }
    }
    let js = clearhouse_replication::connect(&replication).await?;
    let mut objects = None;
    for _ in 0..120 {
        match clearhouse_replication::ensure_objects(&js, &replication).await {
            Ok(found) => {
                objects = Some(found);
                break;
            }
            Err(error) => {
                tracing::warn!(%error, "waiting for JetStream");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    let Some((stream, kv)) = objects else {
        bail!("JetStream did not become available within 60 s");
    };
    let mut keys = blake3::Hasher::new();
    keys.update(b"clearhouse operator keys v1\0");
    for key in ["operator.key", "operator-ed25519.pub"] {
        let bytes = std::fs::read(data_dir.join(key))
            .with_context(|| format!("reading {}", data_dir.join(key).display()))?;
        keys.update(&(bytes.len() as u64).to_le_bytes());
        keys.update(&bytes);
    }
    clearhouse_replication::check_identity(&js, &replication, keys.finalize().to_hex().to_string())
        .await
        .map_err(|error| anyhow::anyhow!("{error}"))?;
    let lease = Lease::new(kv, replication.lease_ttl());
    let me = Holder {
        node_id: replication.node_id.clone(),
        advertise: replication.advertise.clone(),
    };

    // Standby: reconcile the tail, recover (from a snapshot when the stream was trimmed past
    // this node), follow.
    let snapshots = snapshot::store(&js, &replication).await?;
    let mut node = match start_follower(
        &data_dir,
        &stream,
        &handle,
        true,
        config.index_cache_bytes(),
    )
    .await
    {
        Ok(node) if !trimmed_past(&stream, &node).await => node,
        started => {
            if let Err(error) = &started {
                if !error.to_string().contains("no longer holds") {
                    return Err(anyhow::anyhow!("{error:#}"));
                }
            }
            drop(started);
            let ledger = data_dir.join("ledger");
            let manifest = snapshot::restore_newest(
                &snapshots,
                &ledger,
                switch_node_options(&data_dir).journal,
            )
            .await
            .context("restoring a snapshot (the stream no longer holds what this node needs)")?;
            eprintln!(
                "clearhouse node {}: restored the snapshot taken by {} at stream sequence {} (journal record {})",
                replication.node_id, manifest.taken_by, manifest.stream_seq, manifest.journal_seq
            );
            start_follower(
                &data_dir,
                &stream,
                &handle,
                false,
                config.index_cache_bytes(),
            )
            .await?
        }
    };
    let cut = node.recovery_report().unreplicated_records_cut;
    if cut > 0 {
        eprintln!(
            "clearhouse: cut {cut} journal records the stream never stored (never acknowledged)"
        );
    }
    let status = Arc::new(FollowerStatus::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut follow_task = Some(tokio::spawn(follower::follow(
        stream.clone(),
        node.clone(),
        status.clone(),
        stop.clone(),
    )));
    let state = Arc::new(StandbyState {
        node_id: replication.node_id.clone(),
        status: status.clone(),
        leader: Mutex::new(None),
        stream_last: Default::default(),
    });
    let listener = tokio::net::TcpListener::bind(&config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    let address = listener.local_addr()?;
    println!("listening on http://{address}");
    use std::io::Write;
    std::io::stdout().flush()?;
    eprintln!(
        "clearhouse node {}: standby on http://{address}, following stream {}",
        replication.node_id, replication.stream
    );
    let (standby_stop, standby_stopped) = tokio::sync::oneshot::channel::<()>();
    let standby =
        axum::serve(listener, standby_router(state.clone())).with_graceful_shutdown(async move {
            let _ = standby_stopped.await;
        });
    let standby_server = tokio::spawn(async move { standby.await });
    let mut term_signal =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut diverged = false;
    let mut snapshot_at = status.applied_stream_seq.load(Ordering::SeqCst);
    let snapshot_running = Arc::new(AtomicBool::new(false));
    let held = loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            _ = term_signal.recv() => return Ok(()),
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
        if let Ok(info) = stream.get_info().await {
            state
                .stream_last
                .store(info.state.last_sequence, Ordering::SeqCst);
        }
        if follow_task.as_ref().is_some_and(|task| task.is_finished()) {
            let result = follow_task.take().expect("task").await?;
            if let Err(clearhouse_replication::ReplicationError::Trimmed(reason)) = &result {
                // Fell behind the stream's retention: restart, which restores a snapshot.
                step_down(&format!(
                    "the stream was trimmed past this standby: {reason}"
                ));
            }
            if let Err(error) = result {
                tracing::error!(%error, "following the stream stopped; this node serves nothing and never leads");
                *status.diverged.lock().expect("d") = Some(error.to_string());
                diverged = true;
            }
        }
        // A snapshot every `snapshot_every_messages`: stop applying at a message boundary, stop
        // the node cleanly (a checkpoint), copy its index, start following again, upload.
        let applied = status.applied_stream_seq.load(Ordering::SeqCst);
        if !diverged
            && applied >= snapshot_at + replication.snapshot_every_messages
            && !snapshot_running.load(Ordering::SeqCst)
        {
            if let Some(task) = follow_task.take() {
                let started = Instant::now();
                stop.store(true, Ordering::SeqCst);
                let result = task.await?;
                tracing::info!(
                    ms = started.elapsed().as_millis() as u64,
                    "snapshot: follower stopped"
                );
                let stats = {
                    let node = node.clone();
                    tokio::task::spawn_blocking(move || node.stats()).await??
                };
                let applied = status.applied_stream_seq.load(Ordering::SeqCst);
                tokio::task::spawn_blocking(move || drop(node)).await?;
                let copy = data_dir.join("snapshot.index.tmp");
                std::fs::copy(data_dir.join("ledger").join("index.redb"), &copy)
                    .context("copying the index for a snapshot")?;
                tracing::info!(
                    ms = started.elapsed().as_millis() as u64,
                    "snapshot: index copied"
                );
                node = start_follower(
                    &data_dir,
                    &stream,
                    &handle,
                    false,
                    config.index_cache_bytes(),
                )
                .await?;
                tracing::info!(
                    ms = started.elapsed().as_millis() as u64,
                    "snapshot: follower restarted"
                );
                stop.store(false, Ordering::SeqCst);
                follow_task = Some(tokio::spawn(follower::follow(
                    stream.clone(),
                    node.clone(),
                    status.clone(),
                    stop.clone(),
                )));
                if let Err(error) = result {
                    step_down(&format!("following the stream stopped: {error}"));
                }
                snapshot_at = applied;
                let manifest = snapshot::Manifest {
                    stream_seq: applied,
                    journal_seq: stats.committed_seq,
                    chain_seq: stats.chain_seq,
                    chain_hash: hex::encode(stats.chain_hash),
                    index_bytes: 0,
                    index_blake3: String::new(),
                    taken_by: replication.node_id.clone(),
                };
                let (store, running) = (snapshots.clone(), snapshot_running.clone());
                running.store(true, Ordering::SeqCst);
                tokio::spawn(async move {
                    match snapshot::upload(&store, &copy, manifest).await {
                        Ok(()) => tracing::info!(stream_seq = applied, "snapshot uploaded"),
                        Err(error) => tracing::warn!(%error, "snapshot upload failed"),
                    }
                    let _ = std::fs::remove_file(&copy);
                    running.store(false, Ordering::SeqCst);
                });
            }
        }
        let holder = match lease.holder().await {
            Ok(holder) => holder,
            Err(error) => {
                tracing::warn!(%error, "reading the lease");
                continue;
            }
        };
        let free = holder.is_none();
        *state.leader.lock().expect("leader") = holder;
        if free && !replication.standby_only && !diverged {
            match lease.try_acquire(&me).await {
                Ok(Some(held)) => break held,
                Ok(None) => {}
                Err(error) => tracing::warn!(%error, "taking the lease"),
            }
        }
    };
    let takeover_started = Instant::now();
    eprintln!(
        "clearhouse node {}: took the lease (term {}); catching up",
        replication.node_id, held.term
    );
    let held = Arc::new(Mutex::new(held));
    let lease = Arc::new(lease);
    let renewal = spawn_renewal(
        lease.clone(),
        me.clone(),
        held.clone(),
        replication.lease_renew_ms,
    );

    // Apply the stream to its end, then stop following.
    let last = stream
        .get_info()
        .await
        .map_err(anyhow::Error::msg)?
        .state
        .last_sequence;
    loop {
        if status.applied_stream_seq.load(Ordering::SeqCst) >= last {
            break;
        }
        if follow_task.as_ref().is_none_or(|task| task.is_finished()) {
            step_down("the follower stopped before catching up");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.store(true, Ordering::SeqCst);
    if let Some(task) = follow_task.take() {
        if let Err(error) = task.await? {
            step_down(&format!("the follower failed: {error}"));
        }
    }
    let stats = {
        let node = node.clone();
        tokio::task::spawn_blocking(move || node.stats()).await??
    };
    // The follower node stops cleanly (a checkpoint): the leader node starts from it.
    tokio::task::spawn_blocking(move || drop(node)).await?;
    let term = Term {
        term: held.lock().expect("held").term,
        node_id: replication.node_id.clone(),
    };
    let barrier = match publisher::publish_barrier(
        &js,
        &replication.subject(),
        &term,
        last,
        stats.committed_seq,
        (stats.chain_seq, stats.chain_hash),
    )
    .await
    {
        Ok(seq) => seq,
        Err(reason) => step_down(&format!("publishing the term's barrier: {reason}")),
    };
    let publisher = Publisher::start(
        &handle,
        js.clone(),
        replication.subject(),
        term.clone(),
        barrier,
        Duration::from_millis(replication.publish_retry_ms),
    );
    let node = {
        let (dir, publisher) = (data_dir.clone(), publisher.clone());
        let index_cache_bytes = config.index_cache_bytes();
        tokio::task::spawn_blocking(move || {
            let mut options = switch_node_options(&dir);
            options.index_cache_bytes = index_cache_bytes;
            options.replication = Replication::Leader(publisher);
            Node::start(options)
        })
        .await?
        .context("starting the ledger node as leader")?
    };
    let switch = Switch::start(node.clone(), config.clone(), &data_dir)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    // Exporters run on the leader only; a new leader's resume where the sinks end.
    clearhouse_export::spawn_in_process(&switch, &data_dir, &exports)?;
    let _ = standby_stop.send(());
    let _ = standby_server.await;
    let listener = bind_again(&address).await?;
    eprintln!(
        "clearhouse node {}: leader (term {}, barrier at stream sequence {barrier}) on http://{address}, {} ms after taking the lease",
        replication.node_id,
        term.term,
        takeover_started.elapsed().as_millis()
    );
    // Anything that stops the node (a failed publish: deposed or no quorum past the retry time)
    // ends this process: nothing more is answered.
    {
        let node = node.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(50)).await;
                if let Some(reason) = node.stop_reason() {
                    step_down(&reason);
                }
            }
        });
    }
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("signal handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    // Every answer is computed and sent only while the lease is valid on this node's monotonic
    // clock: a leader paused past its lease (SIGSTOP, a long GC-like stall) answers nothing, not
    // even a read, when it resumes; writes are fenced by the stream anyway.
    let validity = held.clone();
    let metrics = publisher.metrics.clone();
    let term_number = term.term;
    let router = clearhouse_switch::http::router(switch).layer(axum::middleware::from_fn(
        move |request: axum::extract::Request, next: axum::middleware::Next| {
            let (validity, metrics) = (validity.clone(), metrics.clone());
            async move {
                let valid_until = || validity.lock().expect("held").valid_until;
                if Instant::now() >= valid_until() {
                    return lease_lapsed();
                }
                let is_metrics = request.uri().path() == "/metrics";
                let response = next.run(request).await;
                if Instant::now() >= valid_until() {
                    // Computed, perhaps written, but not to be sent: the outcome is unknown to
                    // the client, who asks the next leader (by instruction id).
                    return lease_lapsed_outcome_unknown();
                }
                if is_metrics && response.status() == StatusCode::OK {
                    let lease_left = valid_until().saturating_duration_since(Instant::now());
                    return with_replication_metrics(response, &metrics, term_number, lease_left)
                        .await;
                }
                response
            }
        },
    ));
    clearhouse_switch::http::serve_router(listener, router, shutdown).await?;
    // A graceful stop: no more renewals, then the lease is released so a standby takes over
    // without waiting for the TTL.
    renewal.abort();
    let held = held.lock().expect("held").clone();
    match lease.release(&held).await {
        Ok(()) => eprintln!(
            "clearhouse node {}: stopped; lease released",
            replication.node_id
        ),
        Err(error) => tracing::warn!(%error, "releasing the lease"),
    }
    Ok(())
}

/// Starts the ledger node as a follower (with the tail check against the stream at a first
/// start).
async fn start_follower(
    data_dir: &Path,
    stream: &clearhouse_replication::Stream,
    handle: &tokio::runtime::Handle,
    tail_check: bool,
    index_cache_bytes: usize,
) -> anyhow::Result<Node> {
    let (dir, stream, handle) = (data_dir.to_path_buf(), stream.clone(), handle.clone());
    tokio::task::spawn_blocking(move || {
        let mut options = switch_node_options(&dir);
        options.index_cache_bytes = index_cache_bytes;
        options.replication = Replication::Follower;
        if tail_check {
            options.tail_check = Some(TailCheckHandle(Arc::new(StreamTail {
                stream,
                runtime: handle,
            })));
        }
        Node::start(options)
    })
    .await?
    .context("starting the ledger node as a standby")
}

/// True when the stream no longer holds the records right after this node's journal.
async fn trimmed_past(stream: &clearhouse_replication::Stream, node: &Node) -> bool {
    matches!(
        follower::locate(stream, node.committed_seq() + 1).await,
        Err(clearhouse_replication::ReplicationError::Trimmed(_))
    )
}

/// Renews the lease; exits the process once its validity passed without a renewal, or at once
/// when another node wrote the lease.
fn spawn_renewal(
    lease: Arc<Lease>,
    me: Holder,
    held: Arc<Mutex<Held>>,
    every_ms: u64,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let mut current = held.lock().expect("held").clone();
            let renewed = tokio::time::timeout(
                current
                    .valid_until
                    .saturating_duration_since(Instant::now()),
                lease.renew(&me, &mut current),
            )
            .await;
            match renewed {
                Ok(Ok(())) => *held.lock().expect("held") = current,
                Ok(Err(clearhouse_replication::ReplicationError::Deposed(reason))) => {
                    step_down(&reason)
                }
                Ok(Err(error)) => tracing::warn!(%error, "renewing the lease"),
                Err(_) => {}
            }
            if Instant::now() >= held.lock().expect("held").valid_until {
                step_down("the lease's validity passed without a renewal");
            }
            tokio::time::sleep(Duration::from_millis(every_ms)).await;
        }
    })
}

async fn bind_again(address: &std::net::SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    for _ in 0..100 {
        if let Ok(listener) = tokio::net::TcpListener::bind(address).await {
            return Ok(listener);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bail!("could not bind {address} again after the standby listener closed")
}
