//! The OpenAI API's shapes: request parsing with errors that name the
//! parameter, the sampling settings sent to the agent, response and stream
//! chunk bodies, and OpenAI-shaped errors. Pure functions.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use crate::agent::AgentCallError;

/// Most choices one request may ask for (each is one generation).
pub const MAX_N: usize = 16;
/// The agent's own bound on new tokens.
pub const MAX_TOKENS: usize = 8192;

/// `{"error": {"message", "type", "param", "code"}}` with its status.
#[derive(Debug, Clone, PartialEq)]
pub struct OpenAiError {
    pub status: u16,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<String>,
    pub retry_after: Option<u64>,
}

impl OpenAiError {
    pub fn bad_param(param: &str, message: impl Into<String>) -> Self {
        OpenAiError {
            status: 400,
            message: message.into(),
            kind: "invalid_request_error",
            param: Some(param.into()),
            code: None,
            retry_after: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        OpenAiError {
            param: None,
            ..Self::bad_param("", message)
        }
    }

    pub fn unknown_model(asked: &str, served: &str) -> Self {
        OpenAiError {
            status: 404,
            message: format!("The model `{asked}` does not exist; this server serves `{served}`."),
            kind: "invalid_request_error",
            param: Some("model".into()),
            code: Some("model_not_found".into()),
            retry_after: None,
        }
    }

    pub fn not_ready(message: impl Into<String>) -> Self {
        OpenAiError {
            status: 503,
            message: message.into(),
            kind: "service_unavailable",
            param: None,
            code: Some("model_not_ready".into()),
            retry_after: Some(5),
        }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        OpenAiError {
            status: 404,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
            code: Some("not_found".into()),
            retry_after: None,
        }
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        OpenAiError {
            status: 409,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
            code: Some("conflict".into()),
            retry_after: None,
        }
    }

    /// The agent's refusal as the client's error: its 4xx stay 4xx (a
    /// prompt too long for the model is the caller's to fix), its 5xx are
    /// this server's.
    pub fn from_agent(e: &AgentCallError) -> Self {
        match e {
            AgentCallError::Status {
                status,
                code,
                message,
                ..
            } => OpenAiError {
                status: *status,
                message: message.clone(),
                kind: if *status < 500 {
                    "invalid_request_error"
                } else {
                    "server_error"
                },
                param: None,
                code: Some(code.clone()).filter(|c| !c.is_empty()),
                retry_after: matches!(status, 429 | 503).then_some(2),
            },
            other => OpenAiError {
                status: 502,
                message: other.to_string(),
                kind: "server_error",
                param: None,
                code: Some("agent_unreachable".into()),
                retry_after: Some(2),
            },
        }
    }

    pub fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut resp = (status, Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        resp
    }
}

/// Sampling and output settings common to both endpoints.
#[derive(Clone, Debug, PartialEq)]
pub struct Sampling {
    pub max_tokens: usize,
    pub temperature: f64,
    pub top_p: Option<f64>,
    pub n: usize,
    pub stop: Vec<String>,
    pub seed: Option<u64>,
    pub stream: bool,
    pub include_usage: bool,
}

impl Sampling {
    /// The agent's generate body for one choice (ids from `/v1/render`).
    pub fn agent_body(&self, key: &str, device: &str, input_ids: &[u32], seed: u64) -> Value {
        json!({
            "key": key, "device": device, "input_ids": input_ids,
            "max_new_tokens": self.max_tokens,
            "do_sample": self.temperature > 0.0,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": seed,
            "stream": true,
        })
    }
}

type Obj = Map<String, Value>;

fn num(o: &Obj, name: &str) -> Result<Option<f64>, OpenAiError> {
    match o.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .ok_or_else(|| OpenAiError::bad_param(name, format!("{name} must be a number"))),
    }
}

fn count(o: &Obj, name: &str) -> Result<Option<u64>, OpenAiError> {
    match o.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| {
            OpenAiError::bad_param(name, format!("{name} must be a non-negative integer"))
        }),
    }
}

fn flag(o: &Obj, name: &str) -> Result<bool, OpenAiError> {
    match o.get(name) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(OpenAiError::bad_param(
            name,
            format!("{name} must be a boolean"),
        )),
    }
}

/// The request's JSON object and its `model`, checked against the served one.
pub fn request_object(body: &[u8], served: &str) -> Result<Obj, OpenAiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| OpenAiError::bad_request(format!("the body is not valid JSON: {e}")))?;
    let Value::Object(o) = v else {
        return Err(OpenAiError::bad_request("the body must be a JSON object"));
    };
    match o.get("model") {
        Some(Value::String(m)) if m == served => Ok(o),
        Some(Value::String(m)) => Err(OpenAiError::unknown_model(m, served)),
        _ => Err(OpenAiError::bad_param(
            "model",
            "model is required (a string)",
        )),
    }
}

/// Parameters both endpoints share; `default_max` when `max_tokens` is absent.
pub fn sampling(o: &Obj, default_max: usize) -> Result<Sampling, OpenAiError> {
    // Chat's newer name wins, as in OpenAI's API.
    let (max_name, max) = match count(o, "max_completion_tokens")? {
        Some(m) => ("max_completion_tokens", Some(m)),
        None => ("max_tokens", count(o, "max_tokens")?),
    };
    let max_tokens = max.map_or(default_max, |m| m as usize);
    if max_tokens == 0 || max_tokens > MAX_TOKENS {
        return Err(OpenAiError::bad_param(
            max_name,
            format!("{max_name} must be 1 to {MAX_TOKENS}, got {max_tokens}"),
        ));
    }
    let temperature = num(o, "temperature")?.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(OpenAiError::bad_param(
            "temperature",
            format!("temperature must be 0 to 2, got {temperature}"),
        ));
    }
    let top_p = num(o, "top_p")?;
    if let Some(p) = top_p
        && !(p > 0.0 && p <= 1.0)
    {
        return Err(OpenAiError::bad_param(
            "top_p",
            format!("top_p must be in (0, 1], got {p}"),
        ));
    }
    let n = count(o, "n")?.unwrap_or(1) as usize;
    if n == 0 || n > MAX_N {
        return Err(OpenAiError::bad_param(
            "n",
            format!("n must be 1 to {MAX_N}, got {n}"),
        ));
    }
    let stop = match o.get("stop") {
        None | Some(Value::Null) => vec![],
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|s| s.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| {
                OpenAiError::bad_param("stop", "stop must be a string or a list of strings")
            })?,
        Some(_) => {
            return Err(OpenAiError::bad_param(
                "stop",
                "stop must be a string or a list of strings",
            ));
        }
    };
    if stop.len() > 4 || stop.iter().any(String::is_empty) {
        return Err(OpenAiError::bad_param(
            "stop",
            "stop takes at most 4 non-empty strings",
        ));
    }
    let seed = match o.get("seed") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_i64()
                .map(|s| s as u64)
                .ok_or_else(|| OpenAiError::bad_param("seed", "seed must be an integer"))?,
        ),
    };
    let stream = flag(o, "stream")?;
    let include_usage = match o.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(Value::Object(so)) => {
            if !stream {
                return Err(OpenAiError::bad_param(
                    "stream_options",
                    "stream_options goes with stream: true",
                ));
            }
            flag(so, "include_usage").map_err(|_| {
                OpenAiError::bad_param(
                    "stream_options",
                    "stream_options.include_usage must be a boolean",
                )
            })?
        }
        Some(_) => {
            return Err(OpenAiError::bad_param(
                "stream_options",
                "stream_options must be an object",
            ));
        }
    };
    for name in ["presence_penalty", "frequency_penalty"] {
        if num(o, name)?.is_some_and(|p| p != 0.0) {
            return Err(OpenAiError::bad_param(
                name,
                format!("{name} is not supported by this server; leave it 0"),
            ));
        }
    }
    if o.get("logit_bias")
        .is_some_and(|b| b.as_object().is_some_and(|m| !m.is_empty()))
    {
        return Err(OpenAiError::bad_param(
            "logit_bias",
            "logit_bias is not supported by this server",
        ));
    }
    Ok(Sampling {
        max_tokens,
        temperature,
        top_p,
        n,
        stop,
        seed,
        stream,
        include_usage,
    })
}

/// `/v1/completions`' prompts: a string or a list of strings (token-id
/// prompts too, as the API allows).
#[derive(Clone, Debug, PartialEq)]
pub enum PromptInput {
    Text(String),
    Ids(Vec<u32>),
}

pub fn completion_prompts(o: &Obj) -> Result<Vec<PromptInput>, OpenAiError> {
    let bad = || {
        OpenAiError::bad_param(
            "prompt",
            "prompt must be a string, a list of strings, or token ids",
        )
    };
    let ids = |v: &Value| -> Option<Vec<u32>> {
        v.as_array()?
            .iter()
            .map(|x| x.as_u64().and_then(|n| u32::try_from(n).ok()))
            .collect()
    };
    let prompts = match o.get("prompt") {
        Some(Value::String(s)) => vec![PromptInput::Text(s.clone())],
        Some(Value::Array(a)) if a.iter().all(Value::is_string) && !a.is_empty() => a
            .iter()
            .filter_map(|s| s.as_str().map(|s| PromptInput::Text(s.to_string())))
            .collect(),
        Some(v @ Value::Array(a)) if a.first().is_some_and(Value::is_number) => {
            vec![PromptInput::Ids(ids(v).ok_or_else(bad)?)]
        }
        Some(Value::Array(a)) if a.first().is_some_and(Value::is_array) => a
            .iter()
            .map(|p| ids(p).map(PromptInput::Ids).ok_or_else(bad))
            .collect::<Result<_, _>>()?,
        None => return Err(OpenAiError::bad_param("prompt", "prompt is required")),
        _ => return Err(bad()),
    };
    if flag(o, "echo")? {
        return Err(OpenAiError::bad_param(
            "echo",
            "echo is not supported by this server",
        ));
    }
    if o.get("logprobs").is_some_and(|l| !l.is_null()) {
        return Err(OpenAiError::bad_param(
            "logprobs",
            "logprobs are not supported by this server",
        ));
    }
    if o.get("suffix").is_some_and(|s| !s.is_null()) {
        return Err(OpenAiError::bad_param(
            "suffix",
            "suffix is not supported by this server",
        ));
    }
    if let Some(b) = count(o, "best_of")?
        && b as usize != count(o, "n")?.unwrap_or(1) as usize
    {
        return Err(OpenAiError::bad_param(
            "best_of",
            "best_of other than n is not supported by this server",
        ));
    }
    Ok(prompts)
}

/// Chat messages as the agent's template takes them: text parts of a
/// content list are joined into one string (the form templates expect).
pub fn chat_messages(o: &Obj) -> Result<Vec<Value>, OpenAiError> {
    let bad = |m: String| OpenAiError::bad_param("messages", m);
    let Some(Value::Array(list)) = o.get("messages") else {
        return Err(bad(
            "messages must be a list of {role, content} objects".into()
        ));
    };
    if list.is_empty() {
        return Err(bad("messages must hold at least one message".into()));
    }
    if o.get("logprobs").is_some_and(|l| l.as_bool() == Some(true)) {
        return Err(OpenAiError::bad_param(
            "logprobs",
            "logprobs are not supported by this server",
        ));
    }
    if o.get("tools")
        .is_some_and(|t| t.as_array().is_some_and(|t| !t.is_empty()))
    {
        return Err(OpenAiError::bad_param(
            "tools",
            "tools are not supported by this server",
        ));
    }
    if let Some(rf) = o.get("response_format")
        && !rf.is_null()
        && rf.get("type").and_then(Value::as_str) != Some("text")
    {
        return Err(OpenAiError::bad_param(
            "response_format",
            "only response_format {\"type\": \"text\"} is supported",
        ));
    }
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let Value::Object(m) = m else {
                return Err(bad(format!("messages[{i}] must be an object")));
            };
            if !m.get("role").is_some_and(Value::is_string) {
                return Err(bad(format!("messages[{i}].role must be a string")));
            }
            let mut m = m.clone();
            if let Some(Value::Array(parts)) = m.get("content") {
                let mut text = String::new();
                for p in parts {
                    match (
                        p.get("type").and_then(Value::as_str),
                        p.get("text").and_then(Value::as_str),
                    ) {
                        (Some("text"), Some(t)) => text.push_str(t),
                        _ => {
                            return Err(bad(format!(
                                "messages[{i}].content: only text parts are supported"
                            )));
                        }
                    }
                }
                m.insert("content".into(), Value::String(text));
            }
            Ok(Value::Object(m))
        })
        .collect()
}

/// OpenAI's finish reasons from the agent's (`eos` is a natural stop).
pub fn finish_reason(agent: &str) -> &'static str {
    match agent {
        "length" => "length",
        _ => "stop",
    }
}

pub fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

/// One finished choice.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ChoiceOutput {
    pub index: usize,
    pub text: String,
    pub finish_reason: String,
    pub completion_tokens: usize,
}

pub fn completion_response(
    id: &str,
    created: u64,
    model: &str,
    choices: &[ChoiceOutput],
    prompt_tokens: usize,
) -> Value {
    let completion: usize = choices.iter().map(|c| c.completion_tokens).sum();
    json!({
        "id": id, "object": "text_completion", "created": created, "model": model,
        "choices": choices.iter().map(|c| json!({
            "index": c.index, "text": c.text, "logprobs": null, "finish_reason": c.finish_reason,
        })).collect::<Vec<_>>(),
        "usage": usage(prompt_tokens, completion),
    })
}

pub fn chat_response(
    id: &str,
    created: u64,
    model: &str,
    choices: &[ChoiceOutput],
    prompt_tokens: usize,
) -> Value {
    let completion: usize = choices.iter().map(|c| c.completion_tokens).sum();
    json!({
        "id": id, "object": "chat.completion", "created": created, "model": model,
        "choices": choices.iter().map(|c| json!({
            "index": c.index,
            "message": {"role": "assistant", "content": c.text},
            "logprobs": null, "finish_reason": c.finish_reason,
        })).collect::<Vec<_>>(),
        "usage": usage(prompt_tokens, completion),
    })
}

/// Which endpoint a stream's chunks are for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Completions,
    Chat,
}

/// What every chunk of one streamed answer repeats.
pub struct StreamHead<'a> {
    pub endpoint: Endpoint,
    pub id: &'a str,
    pub created: u64,
    pub model: &'a str,
    pub include_usage: bool,
}

/// One streamed chunk: text of a choice, or its end (`finish` set, text
/// empty), or the chat's opening `role` delta.
pub fn chunk(h: &StreamHead<'_>, index: usize, text: Option<&str>, finish: Option<&str>) -> Value {
    let (endpoint, id, created, model, include_usage) =
        (h.endpoint, h.id, h.created, h.model, h.include_usage);
    let mut v = match endpoint {
        Endpoint::Completions => json!({
            "id": id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": index, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish}],
        }),
        Endpoint::Chat => {
            let delta = match text {
                // The opening chunk says who speaks.
                None if finish.is_none() => json!({"role": "assistant", "content": ""}),
                None => json!({}),
                Some(t) => json!({"content": t}),
            };
            json!({
                "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": index, "delta": delta, "logprobs": null, "finish_reason": finish}],
            })
        }
    };
    // With include_usage every chunk carries "usage": null but the last.
    if include_usage && let Value::Object(m) = &mut v {
        m.insert("usage".into(), Value::Null);
    }
    v
}

/// The last chunk with include_usage: no choices, the totals.
pub fn usage_chunk(
    endpoint: Endpoint,
    id: &str,
    created: u64,
    model: &str,
    prompt: usize,
    completion: usize,
) -> Value {
    let object = match endpoint {
        Endpoint::Completions => "text_completion",
        Endpoint::Chat => "chat.completion.chunk",
    };
    json!({"id": id, "object": object, "created": created, "model": model, "choices": [], "usage": usage(prompt, completion)})
}

/// An SSE event's bytes: `data: <json>\n\n`.
pub fn sse_data(v: &Value) -> String {
    format!("data: {v}\n\n")
}

pub const SSE_DONE: &str = "data: [DONE]\n\n";

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(v: Value) -> Obj {
        match v {
            Value::Object(o) => o,
            _ => panic!("not an object"),
        }
    }

    #[test]
    fn the_model_is_checked_and_unknown_ones_are_404() {
        let e = request_object(br#"{"model": "other"}"#, "served").expect_err("404");
        assert_eq!(
            (e.status, e.param.as_deref(), e.code.as_deref()),
            (404, Some("model"), Some("model_not_found"))
        );
        assert_eq!(e.body()["error"]["type"], "invalid_request_error");
        assert!(request_object(br#"{"model": "served"}"#, "served").is_ok());
        assert_eq!(request_object(b"{", "s").expect_err("bad").status, 400);
        assert_eq!(
            request_object(br#"{}"#, "s")
                .expect_err("bad")
                .param
                .as_deref(),
            Some("model")
        );
    }

    #[test]
    fn sampling_parameters_are_checked_naming_the_parameter() {
        let s = sampling(&obj(json!({"model": "m"})), 16).expect("defaults");
        assert_eq!(
            (s.max_tokens, s.temperature, s.n, s.stream),
            (16, 1.0, 1, false)
        );
        let s = sampling(
            &obj(
                json!({"max_tokens": 5, "temperature": 0, "stop": "\n", "seed": 3, "n": 2,
                                     "stream": true, "stream_options": {"include_usage": true}}),
            ),
            16,
        )
        .expect("ok");
        assert_eq!(
            (s.max_tokens, s.stop.clone(), s.seed, s.n, s.include_usage),
            (5, vec!["\n".to_string()], Some(3), 2, true)
        );
        let body = s.agent_body("k", "cpu", &[1, 2], 3);
        assert_eq!(body["do_sample"], false);
        assert_eq!(body["max_new_tokens"], 5);
        assert_eq!(body["input_ids"], json!([1, 2]));
        for (bad, param) in [
            (json!({"temperature": 3}), "temperature"),
            (json!({"temperature": "hot"}), "temperature"),
            (json!({"top_p": 0}), "top_p"),
            (json!({"n": 0}), "n"),
            (json!({"n": 99}), "n"),
            (json!({"max_tokens": 0}), "max_tokens"),
            (json!({"max_tokens": -1}), "max_tokens"),
            (
                json!({"max_completion_tokens": 100000}),
                "max_completion_tokens",
            ),
            (json!({"stop": [1]}), "stop"),
            (json!({"stop": ["a", "b", "c", "d", "e"]}), "stop"),
            (json!({"seed": "x"}), "seed"),
            (
                json!({"stream_options": {"include_usage": true}}),
                "stream_options",
            ),
            (json!({"presence_penalty": 0.5}), "presence_penalty"),
            (json!({"logit_bias": {"1": 5}}), "logit_bias"),
        ] {
            let e = sampling(&obj(bad.clone()), 16).expect_err("refused");
            assert_eq!(
                (e.status, e.param.as_deref()),
                (400, Some(param)),
                "{bad}: {e:?}"
            );
            assert!(e.message.contains(param), "{}", e.message);
        }
    }

    #[test]
    fn completion_prompts_come_as_strings_or_ids_and_echo_is_refused() {
        assert_eq!(
            completion_prompts(&obj(json!({"prompt": "a"}))).expect("ok"),
            vec![PromptInput::Text("a".into())]
        );
        assert_eq!(
            completion_prompts(&obj(json!({"prompt": ["a", "b"]})))
                .expect("ok")
                .len(),
            2
        );
        assert_eq!(
            completion_prompts(&obj(json!({"prompt": [1, 2]}))).expect("ok"),
            vec![PromptInput::Ids(vec![1, 2])]
        );
        assert_eq!(
            completion_prompts(&obj(json!({"prompt": [[1], [2]]})))
                .expect("ok")
                .len(),
            2
        );
        for (bad, param) in [
            (json!({}), "prompt"),
            (json!({"prompt": 5}), "prompt"),
            (json!({"prompt": "a", "echo": true}), "echo"),
            (json!({"prompt": "a", "logprobs": 2}), "logprobs"),
            (json!({"prompt": "a", "best_of": 3}), "best_of"),
        ] {
            assert_eq!(
                completion_prompts(&obj(bad))
                    .expect_err("refused")
                    .param
                    .as_deref(),
                Some(param)
            );
        }
    }

    #[test]
    fn chat_messages_keep_roles_and_join_text_parts() {
        let m = chat_messages(&obj(json!({"messages": [
            {"role": "system", "content": "s"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        ]}))).expect("ok");
        assert_eq!(m[1]["content"], "ab");
        for bad in [
            json!({}),
            json!({"messages": []}),
            json!({"messages": [{"content": "x"}]}),
            json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
        ] {
            assert_eq!(
                chat_messages(&obj(bad))
                    .expect_err("refused")
                    .param
                    .as_deref(),
                Some("messages")
            );
        }
        let e = chat_messages(&obj(json!({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]})))
            .expect_err("refused");
        assert_eq!(e.param.as_deref(), Some("tools"));
    }

    #[test]
    fn responses_and_chunks_have_openais_shape() {
        let c = [ChoiceOutput {
            index: 0,
            text: "Paris".into(),
            finish_reason: "stop".into(),
            completion_tokens: 2,
        }];
        let r = completion_response("cmpl-1", 7, "m", &c, 5);
        assert_eq!(r["choices"][0]["text"], "Paris");
        assert_eq!(
            r["usage"],
            json!({"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7})
        );
        let r = chat_response("chatcmpl-1", 7, "m", &c, 5);
        assert_eq!(
            r["choices"][0]["message"],
            json!({"role": "assistant", "content": "Paris"})
        );
        assert_eq!(r["object"], "chat.completion");
        let first = chunk(
            &StreamHead {
                endpoint: Endpoint::Chat,
                id: "i",
                created: 1,
                model: "m",
                include_usage: false,
            },
            0,
            None,
            None,
        );
        assert_eq!(
            first["choices"][0]["delta"],
            json!({"role": "assistant", "content": ""})
        );
        let mid = chunk(
            &StreamHead {
                endpoint: Endpoint::Chat,
                id: "i",
                created: 1,
                model: "m",
                include_usage: true,
            },
            1,
            Some("x"),
            None,
        );
        assert_eq!(
            (
                mid["choices"][0]["delta"]["content"].as_str(),
                mid["choices"][0]["index"].as_u64()
            ),
            (Some("x"), Some(1))
        );
        assert!(mid["usage"].is_null() && mid.as_object().is_some_and(|o| o.contains_key("usage")));
        let last = chunk(
            &StreamHead {
                endpoint: Endpoint::Chat,
                id: "i",
                created: 1,
                model: "m",
                include_usage: false,
            },
            0,
            None,
            Some("length"),
        );
        assert_eq!(
            (
                last["choices"][0]["delta"].clone(),
                last["choices"][0]["finish_reason"].clone()
            ),
            (json!({}), json!("length"))
        );
        let u = usage_chunk(Endpoint::Completions, "i", 1, "m", 3, 4);
        assert_eq!(
            (u["choices"].clone(), u["usage"]["total_tokens"].clone()),
            (json!([]), json!(7))
        );
        assert_eq!(sse_data(&json!({"a": 1})), "data: {\"a\":1}\n\n");
        assert_eq!(
            (finish_reason("eos"), finish_reason("length")),
            ("stop", "length")
        );
    }

    #[test]
    fn agent_errors_keep_their_status_and_transport_failures_are_502() {
        let e = OpenAiError::from_agent(&AgentCallError::Status {
            status: 400,
            code: "bad_request".into(),
            message: "too long".into(),
            retry_after: None,
        });
        assert_eq!((e.status, e.kind), (400, "invalid_request_error"));
        let e = OpenAiError::from_agent(&AgentCallError::Transport("x".into()));
        assert_eq!((e.status, e.kind), (502, "server_error"));
    }
}
