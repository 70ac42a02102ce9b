//! The HTTP/JSON API: on the unix socket for pods, and `/metrics` +
//! `/healthz` on TCP. Handlers decode, call [`crate::service::Agent`], and
//! encode; streamed answers are newline-delimited JSON.

pub mod types;

use std::convert::Infallible;
use std::io::Write;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use futures::StreamExt;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use crate::auth::Caller;
use crate::backend::TokenFn;
use crate::cache::{CacheKey, CompileState};
use crate::metrics::Gauges;
use crate::service::{Agent, AgentError, ForwardRequest, GenerateRequest, PrepareRequest};
use types::{ForwardBody, GenerateBody, PrepareBody, RegisterBody, RenderBody, parse_options};

/// Largest JSON request body.
pub const MAX_JSON_BODY: usize = 8 << 20;

/// An error answer: `{"error": {"status", "code", "message"}}`.
pub struct ApiError {
    status: u16,
    code: &'static str,
    message: String,
    /// Seconds, for answers the client should simply retry.
    retry_after: Option<u32>,
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError {
            status: 400,
            code: "bad_request",
            message: message.into(),
            retry_after: None,
        }
    }
}

impl From<AgentError> for ApiError {
    fn from(e: AgentError) -> Self {
        ApiError {
            status: e.http_status(),
            code: e.code(),
            retry_after: e.retry_after(),
            message: e.to_string(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if status.is_server_error() {
            tracing::warn!(status = self.status, code = self.code, message = %self.message, "request failed");
        } else {
            tracing::debug!(status = self.status, code = self.code, message = %self.message, "request refused");
        }
        let mut resp = (
            status,
            Json(json!({"error": {"status": self.status, "code": self.code, "message": self.message}})),
        )
            .into_response();
        if let Some(s) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from(s));
        }
        resp
    }
}

type ApiResult<T> = Result<T, ApiError>;

fn parse_json<T: DeserializeOwned>(body: &Bytes) -> ApiResult<T> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
}

/// The caller's token: `Authorization: Bearer <token>` (or `X-RM-Token`).
fn token(headers: &HeaderMap) -> Option<String> {
    if let Some(v) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        if let Some(t) = v.strip_prefix("Bearer ") {
            return Some(t.trim().to_string()).filter(|t| !t.is_empty());
        }
    }
    headers
        .get("x-rm-token")
        .and_then(|v| v.to_str().ok())
        .map(|s| s.trim().to_string())
        .filter(|t| !t.is_empty())
}

/// Who sends the request (see [`Agent::identify`]).
async fn caller(agent: &Agent, headers: &HeaderMap) -> ApiResult<Caller> {
    Ok(agent.identify(token(headers).as_deref()).await?)
}

fn parse_key(s: &str) -> ApiResult<CacheKey> {
    s.parse()
        .map_err(|e: crate::cache::key::BadCacheKey| ApiError::bad_request(e.to_string()))
}

fn ndjson_line(v: &impl Serialize) -> String {
    let mut s = serde_json::to_string(v).unwrap_or_else(|_| "{}".into());
    s.push('\n');
    s
}

fn ndjson_response(rx: mpsc::UnboundedReceiver<String>) -> Response {
    ndjson_body(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|line| (line, rx))
    }))
}

fn ndjson_body(lines: impl futures::Stream<Item = String> + Send + 'static) -> Response {
    let stream = lines.map(Ok::<_, Infallible>);
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// The router served on the unix socket.
pub fn socket_router(agent: Arc<Agent>) -> Router {
    let blobs = Router::new()
        .route(
            "/v1/blobs/{sha256}",
            get(head_blob)
                .head(head_blob)
                .put(put_blob)
                .delete(delete_blob),
        )
        .layer(DefaultBodyLimit::disable());
    Router::new()
        .route("/healthz", get(healthz))
        .route("/v1/backends", get(backends))
        .route("/v1/system", get(system))
        .route("/v1/cache", get(cache_list))
        .route("/v1/cache/{key}", delete(cache_delete).get(cache_get))
        .route("/v1/compiles", get(compiles))
        .route("/v1/models", post(register_model))
        .route("/v1/prepare", post(prepare))
        .route("/v1/generate", post(generate))
        .route("/v1/render", post(render))
        .route("/v1/forward", post(forward))
        .route("/metrics", get(metrics_for_caller))
        .layer(DefaultBodyLimit::max(MAX_JSON_BODY))
        .merge(blobs)
        .fallback(not_found)
        .with_state(agent)
}

/// The router served on `--metrics-addr`: metrics, health, and the cache
/// listing, which `kubectl inference cache` reaches through the apiserver's
/// pod proxy with the admin token (a caller sees what its token allows, as on
/// the socket; without a token, nothing). Nothing that runs a model or
/// changes the cache is served here.
pub fn metrics_router(agent: Arc<Agent>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/v1/cache", get(cache_list))
        .with_state(agent)
}

async fn not_found() -> ApiError {
    ApiError {
        status: 404,
        code: "not_found",
        message: "no such endpoint; see agent/README.md for the API".into(),
        retry_after: None,
    }
}

async fn healthz(State(agent): State<Arc<Agent>>) -> Json<Value> {
    Json(json!({
        "status": "ok",
        "version": crate::VERSION,
        "cache_entries": agent.store.list().len(),
    }))
}

async fn backends(State(agent): State<Arc<Agent>>, headers: HeaderMap) -> ApiResult<Json<Value>> {
    caller(&agent, &headers).await?;
    Ok(Json(json!({ "backends": backend_list(&agent) })))
}

/// What this node has: the node, the CPU and the caller's accelerators,
/// and the backends as `/v1/backends` lists them.
async fn system(State(agent): State<Arc<Agent>>, headers: HeaderMap) -> ApiResult<Json<Value>> {
    let who = caller(&agent, &headers).await?;
    // /proc reads are small but blocking.
    let (node, cpu) = tokio::task::spawn_blocking(crate::system::node)
        .await
        .map_err(|e| {
            ApiError::from(AgentError::Backend(crate::backend::BackendError::Internal(
                e.to_string(),
            )))
        })?;
    let devices = crate::system::devices(&node, &cpu, &who);
    Ok(Json(json!({
        "agent": {"version": crate::VERSION},
        "node": node,
        "devices": devices,
        "backends": backend_list(&agent),
    })))
}

fn backend_list(agent: &Agent) -> Vec<Value> {
    agent
        .backends
        .all()
        .iter()
        .map(|b| {
            let info = b.info();
            let avail = b.probe();
            json!({
                "name": info.name,
                "display_name": info.display_name,
                "version": info.version,
                "vendor": info.vendor,
                "priority": info.priority,
                "device_types": info.device_types,
                "compiler_version": info.compiler_version,
                "available": avail.available,
                "reason": avail.reason,
                "status": b.status(),
            })
        })
        .collect()
}

/// The entries and compiles the caller may see; sizes are the node's.
async fn cache_list(State(agent): State<Arc<Agent>>, headers: HeaderMap) -> ApiResult<Json<Value>> {
    let who = caller(&agent, &headers).await?;
    Ok(Json(json!({
        "entries": agent.visible_entries(&who),
        "total_bytes": agent.store.total_bytes(),
        "max_bytes": agent.store.max_bytes(),
        "compiles": agent.visible_compiles(&who),
        "stats": agent.metrics.snapshot(),
    })))
}

async fn cache_get(
    State(agent): State<Arc<Agent>>,
    headers: HeaderMap,
    Path(key): Path<String>,
) -> ApiResult<Json<Value>> {
    let who = caller(&agent, &headers).await?;
    let key = parse_key(&key)?;
    if let Some(f) = agent
        .visible_compiles(&who)
        .into_iter()
        .find(|f| f.key == key)
    {
        return Ok(Json(json!({"key": key, "compile": f})));
    }
    match agent
        .visible_entries(&who)
        .into_iter()
        .find(|e| e.key == key)
    {
        Some(e) => Ok(Json(json!({"key": key, "entry": e}))),
        None => Err(AgentError::Store(crate::cache::StoreError::NotFound(key)).into()),
    }
}

async fn compiles(State(agent): State<Arc<Agent>>, headers: HeaderMap) -> ApiResult<Json<Value>> {
    let who = caller(&agent, &headers).await?;
    Ok(Json(json!({ "compiles": agent.visible_compiles(&who) })))
}

async fn cache_delete(
    State(agent): State<Arc<Agent>>,
    headers: HeaderMap,
    Path(key): Path<String>,
) -> ApiResult<Json<Value>> {
    let who = caller(&agent, &headers).await?;
    let key = parse_key(&key)?;
    let freed = agent.delete(&key, &who)?;
    tracing::info!(key = %key, freed, caller = %who.describe(), "cache entry deleted");
    Ok(Json(json!({"deleted": key, "freed_bytes": freed})))
}

async fn register_model(
    State(agent): State<Arc<Agent>>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    let who = caller(&agent, &headers).await?;
    let b: RegisterBody = parse_json(&body)?;
    let m = agent.register(b.source, &who).await?;
    Ok(Json(json!({
        "model": m.digest,
        "format": m.format,
        "files": m.files,
        "bytes": m.bytes,
    })))
}

/// Present only when this caller uploaded it: others' blobs are as absent.
async fn head_blob(
    State(agent): State<Arc<Agent>>,
    headers: HeaderMap,
    Path(sha): Path<String>,
) -> ApiResult<StatusCode> {
    let who = caller(&agent, &headers).await?;
    let has = agent.has_blob(&sha, &who)?;
    Ok(if has {
        StatusCode::OK
    } else {
        StatusCode::NOT_FOUND
    })
}

/// Stores a blob. A blob already on the node but not yet this caller's is
/// uploaded and verified all the same (the bytes are the proof of holding
/// it), then granted; the copy on disk stays one.
async fn put_blob(
    State(agent): State<Arc<Agent>>,
    headers: HeaderMap,
    Path(sha): Path<String>,
    body: Body,
) -> ApiResult<Json<Value>> {
    let who = caller(&agent, &headers).await?;
    if agent.has_blob(&sha, &who)? {
        return Ok(Json(
            json!({"sha256": sha, "stored": false, "reason": "already present"}),
        ));
    }
    // Checked before a byte is read (with the declared length), and the body
    // is cut off at the allowance (a client may declare nothing, or lie).
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        .unwrap_or(0);
    // Promised to this upload until it ends (`promise` dropped): uploads
    // running at once cannot together pass the quota or the disk's floor.
    let (allowed, promise) = agent.upload_allowance(&who, declared)?;
    let (tmp, mut file) = agent.models.blob_temp(&sha).map_err(AgentError::from)?;
    let mut hasher = Sha256::new();
    let mut stream = body.into_data_stream();
    let mut n = 0u64;
    while let Some(chunk) = stream.next().await {
        // `tmp` removes the partial file when this returns early or the
        // client goes away (the future is dropped).
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => return Err(ApiError::bad_request(format!("upload interrupted: {e}"))),
        };
        hasher.update(&chunk);
        n += chunk.len() as u64;
        if n > allowed {
            // The limit it passed, as the decision names it for this size
            // (without its own promise).
            drop(promise);
            let e = match agent.upload_allowance(&who, n) {
                Err(e) => e,
                Ok(_) => AgentError::Quota(crate::quota::QuotaError::TooLarge {
                    size: n,
                    max: allowed,
                }),
            };
            return Err(e.into());
        }
        // Small synchronous writes; uploads are rare and sequential.
        if let Err(e) = file.write_all(&chunk) {
            return Err(
                AgentError::Source(crate::source::SourceError::Upload(e.to_string())).into(),
            );
        }
    }
    let got = crate::cache::key::hex(&hasher.finalize());
    agent
        .models
        .finish_blob(&sha, tmp, file, &got)
        .map_err(AgentError::from)?;
    agent.grant_blob(&sha, &who)?;
    // Counted by its grant from now on.
    drop(promise);
    Ok(Json(json!({"sha256": sha, "stored": true, "bytes": n})))
}

/// Takes the caller's hold on a blob; the file goes with the last holder.
async fn delete_blob(
    State(agent): State<Arc<Agent>>,
    headers: HeaderMap,
    Path(sha): Path<String>,
) -> ApiResult<Json<Value>> {
    let who = caller(&agent, &headers).await?;
    let removed = agent.delete_blob(&sha, &who)?;
    tracing::info!(sha256 = %sha, removed, caller = %who.describe(), "blob released");
    Ok(Json(
        json!({"sha256": sha, "released": true, "file_removed": removed}),
    ))
}

fn prepare_request(b: PrepareBody) -> ApiResult<(PrepareRequest, bool)> {
    let options = parse_options(b.options).map_err(ApiError::bad_request)?;
    Ok((
        PrepareRequest {
            model: b.model,
            source: b.source,
            device: b.device,
            backend: b.backend,
            options,
        },
        b.stream,
    ))
}

async fn prepare(
    State(agent): State<Arc<Agent>>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    let who = caller(&agent, &headers).await?;
    let (req, stream) = prepare_request(parse_json(&body)?)?;
    let started = std::time::Instant::now();
    let ticket = agent.start_prepare(req, &who).await?;
    if !stream {
        let p = agent.finish_prepare(ticket).await?;
        tracing::debug!(key = %p.key, cached = p.cached, us = started.elapsed().as_micros() as u64, "prepared");
        return Ok(Json(p).into_response());
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let prepared = ticket.prepared.clone();
    let mut watch = ticket.rx.clone();
    tokio::spawn(async move {
        if let Some(w) = watch.as_mut() {
            loop {
                let state = w.borrow_and_update().clone();
                if let CompileState::Running { fraction, stage } = &state {
                    let _ = tx.send(ndjson_line(&json!({
                        "event": "progress", "key": prepared.key, "fraction": fraction, "stage": stage,
                    })));
                } else {
                    break;
                }
                if w.changed().await.is_err() {
                    break;
                }
            }
        }
        match agent.finish_prepare(ticket).await {
            Ok(p) => {
                let mut v = serde_json::to_value(&p).unwrap_or(Value::Null);
                if let Value::Object(m) = &mut v {
                    m.insert("event".into(), json!("done"));
                }
                let _ = tx.send(ndjson_line(&v));
            }
            Err(e) => {
                let _ = tx.send(ndjson_line(&json!({
                    "event": "error", "status": e.http_status(), "code": e.code(), "message": e.to_string(),
                })));
            }
        }
    });
    Ok(ndjson_response(rx))
}

/// The request to run; a chat is rendered and tokenized here, so that the
/// backend gets the same ids `/v1/render` shows.
async fn generate_request(
    agent: &Agent,
    b: &GenerateBody,
    who: &Caller,
) -> ApiResult<GenerateRequest> {
    let key = parse_key(&b.key)?;
    let mut prompts = b.prompts().map_err(ApiError::bad_request)?;
    let params = b.params().map_err(ApiError::bad_request)?;
    if let Some(messages) = &b.messages {
        let chat = agent
            .render_chat(&key, messages, b.add_generation_prompt.unwrap_or(true), who)
            .await?;
        prompts = vec![crate::backend::Prompt::Ids(chat.input_ids)];
    }
    Ok(GenerateRequest {
        key,
        device: b.device.clone(),
        prompts,
        params,
    })
}

/// A chat as the model's template renders it, and its token ids (what a
/// generate with the same `messages` runs).
async fn render(
    State(agent): State<Arc<Agent>>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    let who = caller(&agent, &headers).await?;
    let b: RenderBody = parse_json(&body)?;
    let key = parse_key(&b.key)?;
    let chat = match (&b.messages, b.prompt) {
        (Some(messages), None) => {
            agent
                .render_chat(
                    &key,
                    messages,
                    b.add_generation_prompt.unwrap_or(true),
                    &who,
                )
                .await?
        }
        (None, Some(prompt)) if b.add_generation_prompt.is_none() => {
            let input_ids = agent.tokenize(&key, &prompt, &who).await?;
            crate::service::RenderedChat { prompt, input_ids }
        }
        _ => {
            return Err(ApiError::bad_request(
                "give \"messages\" (with \"add_generation_prompt\" if you like) or \"prompt\"",
            ));
        }
    };
    Ok(Json(
        json!({"key": key, "prompt": chat.prompt, "input_ids": chat.input_ids}),
    ))
}

fn usage(outputs: &[crate::backend::SequenceOutput]) -> Value {
    json!({
        "prompt_tokens": outputs.iter().map(|o| o.prompt_tokens).sum::<usize>(),
        "completion_tokens": outputs.iter().map(|o| o.token_ids.len()).sum::<usize>(),
    })
}

async fn generate(
    State(agent): State<Arc<Agent>>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    let who = caller(&agent, &headers).await?;
    let b: GenerateBody = parse_json(&body)?;
    let req = generate_request(&agent, &b, &who).await?;
    let key = req.key.clone();
    if !b.stream {
        let started = std::time::Instant::now();
        let outputs = agent.generate(req, &who, None).await?;
        return Ok(Json(json!({
            "key": key,
            "usage": usage(&outputs),
            "elapsed_ms": started.elapsed().as_secs_f64() * 1000.0,
            "outputs": outputs,
        }))
        .into_response());
    }
    // Bounded by bytes (a token's text may be long): a client that keeps
    // its connection open but stops reading must not make tokens pile up in
    // the agent's memory. Past the bound the client is taken as gone, and
    // its generation stopped.
    let (tx, rx) = mpsc::unbounded_channel::<String>();
    let waiting = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let stalled = Arc::new(tokio::sync::Notify::new());
    let tok_tx = tx.clone();
    let (on_stall, queued) = (stalled.clone(), waiting.clone());
    let queued_last = waiting.clone();
    let on_token: TokenFn = Arc::new(move |index, token_id, text| {
        let line = ndjson_line(&json!({
            "event": "token", "index": index, "token_id": token_id, "text": text,
        }));
        let n = line.len();
        if queued.fetch_add(n, std::sync::atomic::Ordering::Relaxed) + n > STREAM_BUFFER_BYTES {
            on_stall.notify_one();
        }
        let _ = tok_tx.send(line);
    });
    tokio::spawn(async move {
        let started = std::time::Instant::now();
        // A client that hangs up drops the response stream: the generation
        // is dropped with it, which stops the work at its next token.
        let generated = tokio::select! {
            r = agent.generate(req, &who, Some(on_token)) => r,
            () = tx.closed() => return,
            () = stalled.notified() => {
                tracing::info!(caller = %who.describe(), "streaming client stopped reading; generation stopped");
                return;
            }
        };
        let line = match generated {
            Ok(outputs) => ndjson_line(&json!({
                "event": "done",
                "key": key,
                "usage": usage(&outputs),
                "elapsed_ms": started.elapsed().as_secs_f64() * 1000.0,
                "outputs": outputs,
            })),
            Err(e) => ndjson_line(&json!({
                "event": "error", "status": e.http_status(), "code": e.code(), "message": e.to_string(),
            })),
        };
        // Counted like the tokens, so that the reader's count never goes
        // below zero.
        queued_last.fetch_add(line.len(), std::sync::atomic::Ordering::Relaxed);
        let _ = tx.send(line);
    });
    Ok(ndjson_body(futures::stream::unfold(rx, move |mut rx| {
        let waiting = waiting.clone();
        async move {
            let line = rx.recv().await?;
            waiting.fetch_sub(line.len(), std::sync::atomic::Ordering::Relaxed);
            Some((line, rx))
        }
    })))
}

/// Bytes of a streamed generation's lines that may wait for its client
/// (about 13 000 ordinary tokens; bursts of a batch on an accelerator fit).
const STREAM_BUFFER_BYTES: usize = 1 << 20;

/// `model(input_ids).logits`: base64 f32 rows per sequence (see
/// [`crate::backend::ForwardOutput`]).
async fn forward(
    State(agent): State<Arc<Agent>>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    let who = caller(&agent, &headers).await?;
    let b: ForwardBody = parse_json(&body)?;
    let req = ForwardRequest {
        key: parse_key(&b.key)?,
        device: b.device.clone(),
        input_ids: b.sequences().map_err(ApiError::bad_request)?,
        logits_to_keep: b.logits_to_keep,
    };
    let key = req.key.clone();
    let started = std::time::Instant::now();
    let outputs = agent.forward(req, &who).await?;
    Ok(Json(json!({
        "key": key,
        "logits_dtype": "float32-le-base64",
        "elapsed_ms": started.elapsed().as_secs_f64() * 1000.0,
        "outputs": outputs,
    })))
}

/// On the socket: for any identified caller. On TCP: for Prometheus.
async fn metrics_for_caller(
    State(agent): State<Arc<Agent>>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    caller(&agent, &headers).await?;
    Ok(metrics(State(agent)).await)
}

async fn metrics(State(agent): State<Arc<Agent>>) -> Response {
    let statuses: Vec<(String, Value)> = agent
        .backends
        .all()
        .iter()
        .map(|b| (b.info().name, b.status()))
        .collect();
    // Worker backends report these counters in their status.
    let per_backend = |field: &str| -> Vec<(String, u64)> {
        statuses
            .iter()
            .filter_map(|(name, s)| {
                s.get(field)
                    .and_then(Value::as_u64)
                    .map(|n| (name.clone(), n))
            })
            .collect()
    };
    let worker_restarts = per_backend("restarts");
    let workers_released = per_backend("released");
    let gauges = Gauges {
        cache_bytes: agent.store.total_bytes(),
        cache_max_bytes: agent.store.max_bytes(),
        cache_entries: agent.store.list().len(),
        compiles_running: agent.flights.list().len(),
        evictions: agent.store.evictions(),
        worker_restarts,
        requests_waiting: agent.requests.waiting(),
        requests_running: agent.requests.running(),
        compiles_waiting: agent.compiles.waiting(),
        hub_evictions: agent.models.hub_evictions(),
        workers_released,
    };
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        agent.metrics.render(&gauges),
    )
        .into_response()
}
