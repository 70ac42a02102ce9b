//! A small client of the node agent's API on its unix socket (HTTP/1.1 over
//! hyper): JSON calls, NDJSON streams, blob uploads. One connection per
//! call: dropping a stream closes its connection, which is how the agent
//! learns that a client went away and stops the generation.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::Stream;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode, header};
use hyper_util::rt::TokioIo;
use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum AgentCallError {
    #[error("cannot reach the node agent at {socket}: {reason}")]
    Connect { socket: String, reason: String },
    #[error("the node agent's answer broke off: {0}")]
    Transport(String),
    #[error("the node agent answered {status}: {message}")]
    Status {
        status: u16,
        code: String,
        message: String,
        retry_after: Option<u64>,
    },
    #[error("the node agent's answer is not JSON: {0}")]
    Decode(String),
}

impl AgentCallError {
    /// Whether waiting and asking again may help (the agent not there yet,
    /// busy, a token not yet bound).
    pub fn is_retryable(&self) -> bool {
        match self {
            AgentCallError::Connect { .. } | AgentCallError::Transport(_) => true,
            AgentCallError::Status { status, .. } => matches!(status, 429 | 502 | 503 | 504),
            AgentCallError::Decode(_) => false,
        }
    }
}

type Body = BoxBody<Bytes, std::io::Error>;

pub fn json_body(v: &Value) -> Body {
    Full::new(Bytes::from(v.to_string()))
        .map_err(|never| match never {})
        .boxed()
}

fn empty() -> Body {
    Full::new(Bytes::new())
        .map_err(|never| match never {})
        .boxed()
}

/// Aborts the connection's task when the answer is dropped: the socket
/// closes and the agent sees the client gone.
struct ConnGuard(tokio::task::JoinHandle<()>);

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// An answer whose body is still to be read.
pub struct AgentResponse {
    pub status: StatusCode,
    body: Incoming,
    _conn: ConnGuard,
}

#[derive(Clone, Debug)]
pub struct AgentClient {
    socket: PathBuf,
    token: Option<String>,
}

impl AgentClient {
    pub fn new(socket: &Path, token: Option<String>) -> Self {
        AgentClient {
            socket: socket.to_path_buf(),
            token,
        }
    }

    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Body>,
        headers: &[(header::HeaderName, String)],
    ) -> Result<AgentResponse, AgentCallError> {
        let connect = |e: &dyn std::fmt::Display| AgentCallError::Connect {
            socket: self.socket.display().to_string(),
            reason: e.to_string(),
        };
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|e| connect(&e))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| connect(&e))?;
        let guard = ConnGuard(tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "agent connection ended");
            }
        }));
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, "rm-agent");
        if let Some(t) = &self.token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let has_body = body.is_some();
        if has_body && !headers.iter().any(|(h, _)| h == header::CONTENT_TYPE) {
            req = req.header(header::CONTENT_TYPE, "application/json");
        }
        for (h, v) in headers {
            req = req.header(h, v);
        }
        let req = req
            .body(body.unwrap_or_else(empty))
            .map_err(|e| AgentCallError::Transport(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| AgentCallError::Transport(e.to_string()))?;
        Ok(AgentResponse {
            status: resp.status(),
            body: resp.into_body(),
            _conn: guard,
        })
    }

    /// A JSON call; a non-2xx answer is an error with the agent's message.
    pub async fn json(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, AgentCallError> {
        let resp = self.send(method, path, body.map(json_body), &[]).await?;
        let ok = resp.status.is_success();
        let status = resp.status.as_u16();
        let bytes = resp.bytes().await?;
        if !ok {
            return Err(status_error(status, &bytes));
        }
        if bytes.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&bytes).map_err(|e| AgentCallError::Decode(e.to_string()))
    }

    /// A streamed call: NDJSON lines, or the error the agent answered.
    pub async fn ndjson(&self, path: &str, body: &Value) -> Result<NdjsonStream, AgentCallError> {
        let resp = self
            .send(Method::POST, path, Some(json_body(body)), &[])
            .await?;
        if !resp.status.is_success() {
            let status = resp.status.as_u16();
            let bytes = resp.bytes().await?;
            return Err(status_error(status, &bytes));
        }
        Ok(NdjsonStream {
            resp,
            buf: Vec::new(),
            done: false,
        })
    }

    /// Status of `HEAD <path>`.
    pub async fn head(&self, path: &str) -> Result<StatusCode, AgentCallError> {
        let resp = self.send(Method::HEAD, path, None, &[]).await?;
        Ok(resp.status)
    }

    /// Uploads one file as a blob (`PUT /v1/blobs/<sha256>`), streamed, with
    /// `Expect: 100-continue` as the in-pod client sends it.
    pub async fn put_blob(
        &self,
        sha256: &str,
        file: &Path,
        size: u64,
    ) -> Result<(), AgentCallError> {
        let f = tokio::fs::File::open(file)
            .await
            .map_err(|e| AgentCallError::Transport(format!("{}: {e}", file.display())))?;
        let frames = futures::StreamExt::map(tokio_util::io::ReaderStream::new(f), |r| {
            r.map(hyper::body::Frame::data)
        });
        let body = BodyExt::boxed(http_body_util::StreamBody::new(frames));
        let resp = self
            .send(
                Method::PUT,
                &format!("/v1/blobs/{sha256}"),
                Some(body),
                &[
                    (header::CONTENT_LENGTH, size.to_string()),
                    (header::CONTENT_TYPE, "application/octet-stream".into()),
                    (header::EXPECT, "100-continue".into()),
                ],
            )
            .await?;
        let status = resp.status.as_u16();
        let ok = resp.status.is_success();
        let bytes = resp.bytes().await?;
        if ok {
            Ok(())
        } else {
            Err(status_error(status, &bytes))
        }
    }
}

impl AgentResponse {
    pub async fn bytes(self) -> Result<Bytes, AgentCallError> {
        let AgentResponse { body, _conn, .. } = self;
        let collected = body
            .collect()
            .await
            .map_err(|e| AgentCallError::Transport(e.to_string()))?;
        Ok(collected.to_bytes())
    }
}

/// The agent's error object, `{"error": {"status", "code", "message"}}`.
pub fn status_error(status: u16, body: &[u8]) -> AgentCallError {
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let e = &v["error"];
    AgentCallError::Status {
        status,
        code: e["code"].as_str().unwrap_or("").to_string(),
        message: e["message"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| String::from_utf8_lossy(body).into_owned()),
        retry_after: None,
    }
}

/// NDJSON objects from a streamed answer. Dropping it closes the
/// connection.
pub struct NdjsonStream {
    resp: AgentResponse,
    buf: Vec<u8>,
    done: bool,
}

impl Stream for NdjsonStream {
    type Item = Result<Value, AgentCallError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        use hyper::body::Body as _;
        loop {
            if let Some(pos) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return Poll::Ready(Some(
                    serde_json::from_slice(&line)
                        .map_err(|e| AgentCallError::Decode(e.to_string())),
                ));
            }
            if self.done {
                return Poll::Ready(None);
            }
            match Pin::new(&mut self.resp.body).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    self.done = true;
                    if !self.buf.is_empty() {
                        self.buf.push(b'\n');
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    self.done = true;
                    return Poll::Ready(Some(Err(AgentCallError::Transport(e.to_string()))));
                }
                Poll::Ready(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
            }
        }
    }
}
