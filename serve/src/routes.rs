//! The HTTP routes: OpenAI's completions and chat completions over the
//! agent's generate, models, device status, health, readiness, metrics.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::{Stream, StreamExt};
use hyper::Method;
use serde_json::{Value, json};

use crate::agent::{AgentClient, NdjsonStream};
use crate::config::Config;
use crate::metrics::{InFlight, Metrics};
use crate::model::{ModelState, Phase, Prepared, not_ready_message};
use crate::openai::{
    self, ChoiceOutput, Endpoint, OpenAiError, PromptInput, SSE_DONE, Sampling, sse_data,
};
use crate::stop::StopScanner;

pub struct AppState {
    pub cfg: Config,
    pub agent: AgentClient,
    pub model: ModelState,
    pub metrics: Metrics,
    pub started_unix: u64,
}

type Shared = Arc<AppState>;

pub fn router(state: Shared) -> Router {
    Router::new()
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/devices/status", get(devices_status))
        .route("/v1/devices/switch", post(devices_switch))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .fallback(|| async { OpenAiError::not_found("no such route; see serve/README.md") })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            count_requests,
        ))
        .with_state(state)
}

const ROUTES: [&str; 8] = [
    "/v1/models",
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/devices/status",
    "/v1/devices/switch",
    "/health",
    "/ready",
    "/metrics",
];

/// Counts every answer by route and status (unknown paths as one label, so
/// that scanners cannot grow the series).
async fn count_requests(State(s): State<Shared>, req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    let route = ROUTES
        .iter()
        .find(|r| **r == path)
        .copied()
        .unwrap_or("other");
    let method = req.method().clone();
    let started = Instant::now();
    let resp = next.run(req).await;
    let status = resp.status().as_u16();
    s.metrics.request(route, status);
    if route != "/metrics" && route != "/health" && route != "/ready" {
        tracing::info!(%method, route, status, ms = started.elapsed().as_secs_f64() * 1000.0, "request");
    }
    resp
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn request_id(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{prefix}-{nanos:x}")
}

async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

async fn ready(State(s): State<Shared>) -> Response {
    let phase = s.model.get();
    let msg = not_ready_message(&s.cfg.model_name, &s.cfg.device, &phase);
    match phase {
        Phase::Ready(_) => {
            Json(json!({"status": "ready", "model": s.cfg.model_name})).into_response()
        }
        _ => OpenAiError::not_ready(msg).into_response(),
    }
}

async fn metrics(State(s): State<Shared>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(s.model.ready().is_some()),
    )
        .into_response()
}

async fn models(State(s): State<Shared>) -> Json<Value> {
    Json(json!({"object": "list", "data": [{
        "id": s.cfg.model_name, "object": "model", "created": s.started_unix, "owned_by": "rm-abstract",
    }]}))
}

async fn devices_status(State(s): State<Shared>) -> Result<Json<Value>, OpenAiError> {
    let phase = s.model.get();
    let system = s.agent.json(Method::GET, "/v1/system", None).await;
    let (devices, agent_error) = match &system {
        Ok(v) => (v["devices"].clone(), Value::Null),
        Err(e) => (Value::Null, json!(e.to_string())),
    };
    let prepared = match &phase {
        Phase::Ready(p) => {
            json!({"key": p.key, "backend": p.backend, "device_type": p.device_type, "devices": p.devices})
        }
        _ => Value::Null,
    };
    Ok(Json(json!({
        "model": s.cfg.model_name,
        "workload": s.cfg.workload,
        "device": s.cfg.device,
        "ready": matches!(phase, Phase::Ready(_)),
        "status": not_ready_message(&s.cfg.model_name, &s.cfg.device, &phase),
        "running": prepared,
        "node_devices": devices,
        "agent_error": agent_error,
    })))
}

/// A switch is the operator's work: the workload's spec says the device.
async fn devices_switch(State(s): State<Shared>) -> OpenAiError {
    let name = s.cfg.workload.as_deref().unwrap_or("<name>");
    OpenAiError::conflict(format!(
        "this server does not switch devices itself: the device is the InferenceWorkload's spec.device, changed through the apiserver, e.g. kubectl patch inferenceworkload {name} --type merge -p '{{\"spec\":{{\"device\":\"rbln\"}}}}'; the operator then rolls out a server on the new device"
    ))
}

/// The prepared entry, or the 503 that says how far the model is.
fn ready_model(s: &AppState) -> Result<Prepared, OpenAiError> {
    let phase = s.model.get();
    match phase {
        Phase::Ready(p) => Ok(p),
        other => Err(OpenAiError::not_ready(not_ready_message(
            &s.cfg.model_name,
            &s.cfg.device,
            &other,
        ))),
    }
}

/// Token ids of a prompt, as the agent runs them.
async fn render(s: &AppState, key: &str, body: Value) -> Result<Vec<u32>, OpenAiError> {
    let mut body = body;
    body["key"] = json!(key);
    let v = s
        .agent
        .json(Method::POST, "/v1/render", Some(&body))
        .await
        .map_err(|e| OpenAiError::from_agent(&e))?;
    Ok(v["input_ids"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_u64().map(|n| n as u32))
                .collect()
        })
        .unwrap_or_default())
}

async fn completions(State(s): State<Shared>, body: Bytes) -> Result<Response, OpenAiError> {
    let o = openai::request_object(&body, &s.cfg.model_name)?;
    let sampling = openai::sampling(&o, 16)?;
    let prompts = openai::completion_prompts(&o)?;
    let p = ready_model(&s)?;
    let mut ids = Vec::with_capacity(prompts.len());
    for prompt in prompts {
        ids.push(match prompt {
            PromptInput::Ids(v) => v,
            PromptInput::Text(t) => render(&s, &p.key, json!({"prompt": t})).await?,
        });
    }
    generate(s, p, Endpoint::Completions, ids, sampling).await
}

async fn chat_completions(State(s): State<Shared>, body: Bytes) -> Result<Response, OpenAiError> {
    let o = openai::request_object(&body, &s.cfg.model_name)?;
    let sampling = openai::sampling(&o, s.cfg.default_chat_max_tokens)?;
    let messages = openai::chat_messages(&o)?;
    let p = ready_model(&s)?;
    let ids = render(
        &s,
        &p.key,
        json!({"messages": messages, "add_generation_prompt": true}),
    )
    .await?;
    generate(s, p, Endpoint::Chat, vec![ids], sampling).await
}

/// What one choice's generation gives, in order.
enum ChoiceEvent {
    Text(String),
    End { finish: String, tokens: usize },
    Error(OpenAiError),
}

/// Counts a generation whose client went away before its end.
struct Abandon {
    state: Shared,
    ended: bool,
}

impl Drop for Abandon {
    fn drop(&mut self) {
        if !self.ended {
            self.state.metrics.cancelled.fetch_add(1, Ordering::Relaxed);
            tracing::info!("client went away; generation stopped");
        }
    }
}

struct ChoiceRun {
    lines: Option<NdjsonStream>,
    scanner: StopScanner,
    /// Events decided but not yet given (text, then the end).
    pending: std::collections::VecDeque<ChoiceEvent>,
    tokens: usize,
    started: Instant,
    last_token: Option<Instant>,
    abandon: Abandon,
}

impl ChoiceRun {
    /// Ends the run: the agent's stream is dropped (a generation still
    /// running stops), and `events` are what is left to give.
    fn end(&mut self, events: impl IntoIterator<Item = ChoiceEvent>) {
        self.lines = None;
        self.abandon.ended = true;
        self.pending.extend(events);
    }

    /// Handles one line of the agent's stream.
    fn line(&mut self, line: Value) {
        match line["event"].as_str() {
            Some("token") => {
                let now = Instant::now();
                let m = &self.abandon.state.metrics;
                match self.last_token {
                    None => m
                        .time_to_first_token
                        .observe((now - self.started).as_secs_f64()),
                    Some(t) => m.inter_token_latency.observe((now - t).as_secs_f64()),
                }
                self.last_token = Some(now);
                m.generated_tokens.fetch_add(1, Ordering::Relaxed);
                self.tokens += 1;
                let scan = self.scanner.push(line["text"].as_str().unwrap_or(""));
                let text = (!scan.text.is_empty()).then_some(ChoiceEvent::Text(scan.text));
                if scan.stopped {
                    let end = ChoiceEvent::End {
                        finish: "stop".into(),
                        tokens: self.tokens,
                    };
                    self.end(text.into_iter().chain([end]));
                } else {
                    self.pending.extend(text);
                }
            }
            Some("done") => {
                let finish = openai::finish_reason(
                    line["outputs"][0]["finish_reason"]
                        .as_str()
                        .unwrap_or("eos"),
                );
                let rest = self.scanner.finish();
                let text = (!rest.is_empty()).then_some(ChoiceEvent::Text(rest));
                let end = ChoiceEvent::End {
                    finish: finish.into(),
                    tokens: self
                        .tokens
                        .max(line["usage"]["completion_tokens"].as_u64().unwrap_or(0) as usize),
                };
                self.end(text.into_iter().chain([end]));
            }
            Some("error") => {
                let e = crate::agent::AgentCallError::Status {
                    status: line["status"].as_u64().unwrap_or(500) as u16,
                    code: line["code"].as_str().unwrap_or("").into(),
                    message: line["message"].as_str().unwrap_or("").into(),
                    retry_after: None,
                };
                self.end([ChoiceEvent::Error(OpenAiError::from_agent(&e))]);
            }
            _ => {}
        }
    }
}

/// One choice: the agent's NDJSON tokens as text cut at the stop strings.
/// The agent's stream is dropped at a stop string (or when this stream is
/// dropped: the client went away), which closes its connection and so stops
/// the generation in the agent.
fn choice_stream(
    s: Shared,
    lines: NdjsonStream,
    stops: Vec<String>,
    started: Instant,
) -> impl Stream<Item = ChoiceEvent> + Send {
    let run = ChoiceRun {
        lines: Some(lines),
        scanner: StopScanner::new(stops),
        pending: Default::default(),
        tokens: 0,
        started,
        last_token: None,
        abandon: Abandon {
            state: s,
            ended: false,
        },
    };
    futures::stream::unfold(run, |mut run| async move {
        loop {
            if let Some(e) = run.pending.pop_front() {
                return Some((e, run));
            }
            let lines = run.lines.as_mut()?;
            match lines.next().await {
                Some(Ok(line)) => run.line(line),
                Some(Err(e)) => run.end([ChoiceEvent::Error(OpenAiError::from_agent(&e))]),
                None => {
                    let e = crate::agent::AgentCallError::Transport(
                        "the generation ended without a result".into(),
                    );
                    run.end([ChoiceEvent::Error(OpenAiError::from_agent(&e))]);
                }
            }
        }
    })
}

/// Runs `n` choices of each prompt (OpenAI's order: prompt by prompt) and
/// answers JSON or SSE.
async fn generate(
    s: Shared,
    p: Prepared,
    endpoint: Endpoint,
    prompts: Vec<Vec<u32>>,
    sampling: Sampling,
) -> Result<Response, OpenAiError> {
    let in_flight = InFlight::start(&s.metrics.in_flight);
    let started = Instant::now();
    let prompt_tokens: usize = prompts.iter().map(Vec::len).sum();
    let base_seed = sampling.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
    });
    // Each choice is its own generation; all are sent at once, and the
    // agent runs them side by side in one batch (llama.cpp on the CPU).
    let mut streams = Vec::new();
    for (pi, ids) in prompts.iter().enumerate() {
        for j in 0..sampling.n {
            let index = pi * sampling.n + j;
            let seed = base_seed.wrapping_add(index as u64);
            let body = sampling.agent_body(&p.key, &s.cfg.device, ids, seed);
            let lines = s
                .agent
                .ndjson("/v1/generate", &body)
                .await
                .map_err(|e| OpenAiError::from_agent(&e))?;
            streams.push(
                choice_stream(s.clone(), lines, sampling.stop.clone(), started)
                    .map(move |e| (index, e))
                    .boxed(),
            );
        }
    }
    let id = request_id(match endpoint {
        Endpoint::Completions => "cmpl",
        Endpoint::Chat => "chatcmpl",
    });
    let created = now_unix();
    let model = s.cfg.model_name.clone();
    if !sampling.stream {
        let mut choices: Vec<ChoiceOutput> = (0..streams.len())
            .map(|index| ChoiceOutput {
                index,
                ..Default::default()
            })
            .collect();
        let mut merged = futures::stream::select_all(streams);
        while let Some((index, ev)) = merged.next().await {
            match ev {
                ChoiceEvent::Text(t) => choices[index].text.push_str(&t),
                ChoiceEvent::End { finish, tokens } => {
                    choices[index].finish_reason = finish;
                    choices[index].completion_tokens = tokens;
                }
                ChoiceEvent::Error(e) => return Err(e),
            }
        }
        drop(in_flight);
        let body = match endpoint {
            Endpoint::Completions => {
                openai::completion_response(&id, created, &model, &choices, prompt_tokens)
            }
            Endpoint::Chat => openai::chat_response(&id, created, &model, &choices, prompt_tokens),
        };
        return Ok(Json(body).into_response());
    }
    let include_usage = sampling.include_usage;
    let n_choices = streams.len();
    let opening: Vec<String> = match endpoint {
        Endpoint::Chat => (0..n_choices)
            .map(|i| {
                let head = openai::StreamHead {
                    endpoint,
                    id: &id,
                    created,
                    model: &model,
                    include_usage,
                };
                sse_data(&openai::chunk(&head, i, None, None))
            })
            .collect(),
        Endpoint::Completions => vec![],
    };
    let merged = futures::stream::select_all(streams);
    let state = s.clone();
    let sse = futures::stream::iter(opening).chain(futures::stream::unfold(
        (merged, 0usize, false, Some(in_flight_owned(state))),
        move |(mut merged, mut completion, finished, guard)| {
            let (id, model) = (id.clone(), model.clone());
            async move {
                if finished {
                    return None;
                }
                let chunk = |i, text: Option<&str>, finish: Option<&str>| {
                    let head = openai::StreamHead {
                        endpoint,
                        id: &id,
                        created,
                        model: &model,
                        include_usage,
                    };
                    sse_data(&openai::chunk(&head, i, text, finish))
                };
                match merged.next().await {
                    Some((i, ChoiceEvent::Text(t))) => {
                        Some((chunk(i, Some(&t), None), (merged, completion, false, guard)))
                    }
                    Some((i, ChoiceEvent::End { finish, tokens })) => {
                        completion += tokens;
                        Some((
                            chunk(i, None, Some(&finish)),
                            (merged, completion, false, guard),
                        ))
                    }
                    Some((_, ChoiceEvent::Error(e))) => {
                        let out = format!("{}{SSE_DONE}", sse_data(&e.body()));
                        Some((out, (merged, completion, true, guard)))
                    }
                    None => {
                        let mut out = String::new();
                        if include_usage {
                            out.push_str(&sse_data(&openai::usage_chunk(
                                endpoint,
                                &id,
                                created,
                                &model,
                                prompt_tokens,
                                completion,
                            )));
                        }
                        out.push_str(SSE_DONE);
                        Some((out, (merged, completion, true, None)))
                    }
                }
            }
        },
    ));
    drop(in_flight);
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(sse.map(Ok::<_, Infallible>)))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response()))
}

/// The in-flight count of a streamed answer, held by its body.
struct StreamInFlight(Shared);

impl Drop for StreamInFlight {
    fn drop(&mut self) {
        self.0.metrics.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

fn in_flight_owned(s: Shared) -> StreamInFlight {
    s.metrics.in_flight.fetch_add(1, Ordering::Relaxed);
    StreamInFlight(s)
}
