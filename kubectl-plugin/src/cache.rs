//! `kubectl inference cache`: the compile caches of the node agents.
//!
//! Agents are the pods labelled `app.kubernetes.io/name=rm-agent`; each is
//! asked `GET /v1/cache` on its container port named `http`, through the
//! apiserver's pod proxy (`/api/v1/namespaces/NS/pods/NAME:PORT/proxy/...`),
//! so the plugin needs nothing but the kubeconfig's access to the apiserver
//! (RBAC: `get` on `pods/proxy`), never a route to the nodes.
//!
//! The agent lists every tenant's entries only to its admin token: the plugin
//! reads it from the Secret that the agent pod's volume named `admin-token`
//! mounts (RBAC: `get` on that Secret in the agent's namespace, what a
//! cluster operator has) and sends it as `X-RM-Token` (the apiserver strips
//! `Authorization` before proxying).
//!
//! The agent lists every tenant's entries only to its admin token: the plugin
//! reads it from the Secret that the agent pod's volume named `admin-token`
//! mounts (RBAC: `get` on that Secret in the agent's namespace, what a
//! cluster operator has) and sends it as `X-RM-Token` (the apiserver strips
//! `Authorization` before proxying).

use std::io::Write as _;

use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::cli::{CacheArgs, OutputFormat};
use crate::connect::Connection;
use crate::connect::Scope;
use crate::error::{Error, Result};
use crate::output;
use crate::table::{Cell, Paint, Table, Tone, age_since, human_bytes};

/// Label of the node agents' pods.
pub const AGENT_SELECTOR: &str = "app.kubernetes.io/name=rm-agent";
/// Name of the agents' container port that serves the HTTP API.
pub const AGENT_PORT_NAME: &str = "http";
/// Name of the agent pod's volume that mounts the admin token's Secret.
pub const ADMIN_TOKEN_VOLUME: &str = "admin-token";
/// Key of the token in that Secret.
pub const ADMIN_TOKEN_KEY: &str = "token";

/// When an entry was last used: unix milliseconds (the agent's
/// `last_used_unix_ms`) or an RFC 3339 time.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LastUsed {
    UnixMs(u64),
    Time(String),
}

impl LastUsed {
    fn timestamp(&self) -> Option<jiff::Timestamp> {
        match self {
            LastUsed::UnixMs(ms) => {
                jiff::Timestamp::from_millisecond(i64::try_from(*ms).ok()?).ok()
            }
            LastUsed::Time(s) => s.parse().ok(),
        }
    }
}

/// One compiled model in an agent's cache. Accepts the agent's field names
/// (`device_type`, `last_used_unix_ms`) and the short ones.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CacheEntry {
    pub key: String,
    #[serde(default)]
    pub backend: String,
    #[serde(default, alias = "device_type")]
    pub device: String,
    #[serde(default)]
    pub size_bytes: u64,
    #[serde(default, alias = "last_used_unix_ms")]
    pub last_used: Option<LastUsed>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hits: Option<u64>,
}

/// What one agent answered.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AgentCache {
    pub namespace: String,
    pub pod: String,
    pub node: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub entries: Vec<CacheEntry>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The entries of a `GET /v1/cache` body: a list, or `{"entries": [...]}`.
pub fn parse_listing(body: &str) -> std::result::Result<Vec<CacheEntry>, String> {
    let value: Value =
        serde_json::from_str(body).map_err(|e| format!("the answer is not JSON: {e}"))?;
    let list = match value {
        Value::Array(_) => value,
        Value::Object(mut o) => o
            .remove("entries")
            .ok_or("the answer has no \"entries\" list")?,
        _ => return Err("the answer is neither a list nor an object".into()),
    };
    serde_json::from_value(list).map_err(|e| format!("unexpected cache entry: {e}"))
}

/// The container port named `http` of a pod, as a number (the pod proxy
/// does not resolve port names).
pub fn http_port(pod: &Pod) -> Option<i32> {
    pod.spec
        .as_ref()?
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| p.name.as_deref() == Some(AGENT_PORT_NAME))
        .map(|p| p.container_port)
}

/// The Secret the pod's `admin-token` volume mounts, if it has one.
pub fn admin_secret_name(pod: &Pod) -> Option<String> {
    pod.spec
        .as_ref()?
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == ADMIN_TOKEN_VOLUME)?
        .secret
        .as_ref()?
        .secret_name
        .clone()
}

/// The admin token of an agent pod: `Ok(None)` for a pod without the volume
/// (an agent run without one trusts every caller).
async fn admin_token(client: &Client, pod: &Pod) -> std::result::Result<Option<String>, String> {
    let Some(secret) = admin_secret_name(pod) else {
        return Ok(None);
    };
    let namespace = pod.namespace().unwrap_or_default();
    let api: Api<Secret> = Api::namespaced(client.clone(), &namespace);
    let s = api.get(&secret).await.map_err(|e| {
        let why = match e {
            kube::Error::Api(s) => format!("{} ({})", s.message, s.code),
            other => other.to_string(),
        };
        format!(
            "cannot read the agent's admin token (Secret {namespace}/{secret}): {why}; listing every namespace's cache entries needs `get` on that Secret"
        )
    })?;
    let token = s
        .data
        .as_ref()
        .and_then(|d| d.get(ADMIN_TOKEN_KEY))
        .map(|b| String::from_utf8_lossy(&b.0).trim().to_string())
        .filter(|t| !t.is_empty())
        .ok_or_else(|| format!("Secret {namespace}/{secret} has no {ADMIN_TOKEN_KEY:?}"))?;
    Ok(Some(token))
}

/// The table of entries over all agents, and one line per agent that failed.
pub fn render(agents: &[AgentCache], paint: Paint, now: jiff::Timestamp) -> (String, String) {
    let mut t = Table::new(&[
        "node",
        "key",
        "backend",
        "device",
        "size",
        "hits",
        "last used",
    ]);
    let mut sorted: Vec<&AgentCache> = agents.iter().collect();
    sorted.sort_by_key(|a| (a.node.clone(), a.pod.clone()));
    let (mut entries, mut bytes) = (0usize, 0u64);
    let mut errors = String::new();
    for a in &sorted {
        if let Some(e) = &a.error {
            errors.push_str(&paint.paint(
                Tone::Bad,
                &format!("agent {}/{} on node {}: {e}\n", a.namespace, a.pod, a.node),
            ));
            continue;
        }
        let mut list: Vec<&CacheEntry> = a.entries.iter().collect();
        list.sort_by(|x, y| {
            let tx = x.last_used.as_ref().and_then(LastUsed::timestamp);
            let ty = y.last_used.as_ref().and_then(LastUsed::timestamp);
            ty.cmp(&tx).then_with(|| x.key.cmp(&y.key))
        });
        for e in list {
            entries += 1;
            bytes += e.size_bytes;
            t.push(vec![
                a.node.clone().into(),
                e.key.chars().take(12).collect::<String>().into(),
                e.backend.clone().into(),
                e.device.clone().into(),
                human_bytes(e.size_bytes).into(),
                e.hits.map_or_else(|| "-".into(), |h| h.to_string()).into(),
                match e.last_used.as_ref().and_then(LastUsed::timestamp) {
                    Some(ts) => format!("{} ago", age_since(Some(ts), now)).into(),
                    None => Cell::new("-", Tone::Dim),
                },
            ]);
        }
    }
    let reached = sorted.iter().filter(|a| a.error.is_none()).count();
    let mut out = String::new();
    if entries > 0 {
        out.push_str(&t.render(paint));
        out.push('\n');
    }
    out.push_str(&format!(
        "{entries} cache entr{} ({}) on {reached} of {} agent(s).\n",
        if entries == 1 { "y" } else { "ies" },
        human_bytes(bytes),
        sorted.len()
    ));
    (out, errors)
}

/// The message when no agent pod exists.
pub fn no_agents_message(scope: &Scope) -> String {
    let where_ = match scope {
        Scope::All => "any namespace".to_string(),
        Scope::Namespace(ns) => format!("namespace {ns:?}"),
    };
    format!(
        "No node agents found: no pods labelled {AGENT_SELECTOR} in {where_}.\n\
         The agents run as the rm-abstract chart's DaemonSet; install the chart, or pass -n with its namespace.\n"
    )
}

async fn ask_agent(client: &Client, pod: &Pod) -> AgentCache {
    let namespace = pod.namespace().unwrap_or_default();
    let name = pod.name_any();
    let node = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .unwrap_or_else(|| "<none>".into());
    let mut result = AgentCache {
        namespace: namespace.clone(),
        pod: name.clone(),
        node,
        entries: vec![],
        error: None,
    };
    let phase = pod.status.as_ref().and_then(|s| s.phase.clone());
    if phase.as_deref() != Some("Running") {
        result.error = Some(format!(
            "not running (phase {})",
            phase.unwrap_or_else(|| "unknown".into())
        ));
        return result;
    }
    let Some(port) = http_port(pod) else {
        result.error = Some(format!("has no container port named {AGENT_PORT_NAME:?}"));
        return result;
    };
    let token = match admin_token(client, pod).await {
        Ok(t) => t,
        Err(e) => {
            result.error = Some(e);
            return result;
        }
    };
    let path = format!("/api/v1/namespaces/{namespace}/pods/{name}:{port}/proxy/v1/cache");
    let mut builder = http::Request::get(&path);
    if let Some(t) = &token {
        builder = builder.header("X-RM-Token", t.as_str());
    }
    let request = match builder.body(Vec::new()) {
        Ok(r) => r,
        Err(e) => {
            result.error = Some(format!("cannot build the request {path}: {e}"));
            return result;
        }
    };
    match client.request_text(request).await {
        Ok(body) => match parse_listing(&body) {
            Ok(entries) => result.entries = entries,
            Err(e) => result.error = Some(format!("GET {path}: {e}")),
        },
        Err(e) => {
            let why = match e {
                kube::Error::Api(s) => format!("{} ({})", s.message, s.code),
                other => other.to_string(),
            };
            result.error = Some(format!(
                "unreachable through the apiserver proxy (GET {path}): {why}"
            ));
        }
    }
    result
}

pub async fn run(conn: &Connection, args: &CacheArgs, paint: Paint) -> Result<()> {
    // The agents live in the chart's namespace, not the user's: without -n
    // look everywhere.
    let scope = if conn.namespace_given {
        conn.scope.clone()
    } else {
        Scope::All
    };
    let api: Api<Pod> = match &scope {
        Scope::All => Api::all(conn.client.clone()),
        Scope::Namespace(ns) => Api::namespaced(conn.client.clone(), ns),
    };
    let pods = api
        .list(&ListParams::default().labels(AGENT_SELECTOR))
        .await
        .map_err(Error::kube(format!("list pods -l {AGENT_SELECTOR}")))?;
    let mut stdout = std::io::stdout().lock();
    if pods.items.is_empty() {
        match args.output {
            Some(f @ (OutputFormat::Json | OutputFormat::Yaml)) => {
                stdout.write_all(output::encode(&Value::Array(vec![]), f)?.as_bytes())?;
            }
            _ => eprint!("{}", no_agents_message(&scope)),
        }
        return Ok(());
    }
    let agents =
        futures::future::join_all(pods.items.iter().map(|p| ask_agent(&conn.client, p))).await;
    match args.output {
        Some(f @ (OutputFormat::Json | OutputFormat::Yaml)) => {
            stdout.write_all(output::encode(&output::data_value(&agents)?, f)?.as_bytes())?;
        }
        _ => {
            let (text, errors) = render(&agents, paint, jiff::Timestamp::now());
            stdout.write_all(text.as_bytes())?;
            eprint!("{errors}");
        }
    }
    stdout.flush()?;
    let failed = agents.iter().filter(|a| a.error.is_some()).count();
    if failed > 0 {
        return Err(Error::AgentsUnreachable {
            failed,
            total: agents.len(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::tests::now;

    /// The agent's own `GET /v1/cache` shape (agent/src/api/mod.rs).
    const AGENT_BODY: &str = r#"{
        "entries": [
            {"key": "3f1c0a9e5b7d2c4e6f8a0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e",
             "backend": "cpu", "compiler_version": "candle-0.11.1", "device_type": "cpu",
             "model_digest": "sha256:abc", "options": {}, "size_bytes": 283115520,
             "created_unix_ms": 1767265200000, "last_used_unix_ms": 1767265320000, "in_use": false}
        ],
        "total_bytes": 283115520, "max_bytes": 10737418240, "compiles": [], "stats": {}
    }"#;

    #[test]
    fn the_admin_secret_is_the_one_the_admin_token_volume_mounts() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "rm-agent-x"},
            "spec": {"containers": [{"name": "agent"}], "volumes": [
                {"name": "tmp", "emptyDir": {}},
                {"name": "webhook-tls", "secret": {"secretName": "other"}},
                {"name": "admin-token", "secret": {"secretName": "rel-agent-admin"}}
            ]}
        }))
        .unwrap();
        assert_eq!(admin_secret_name(&pod).as_deref(), Some("rel-agent-admin"));
        let bare: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "rm-agent-y"},
            "spec": {"containers": [{"name": "agent"}]}
        }))
        .unwrap();
        assert_eq!(
            admin_secret_name(&bare),
            None,
            "an agent without one is asked without a token"
        );
    }

    #[test]
    fn the_agent_listing_and_a_plain_list_both_parse() {
        let entries = parse_listing(AGENT_BODY).unwrap();
        assert_eq!(entries[0].device, "cpu");
        assert_eq!(
            entries[0].last_used,
            Some(LastUsed::UnixMs(1_767_265_320_000))
        );
        let plain = r#"[{"key": "k1", "backend": "rbln", "device": "rbln", "size_bytes": 1024,
                        "last_used": "2026-01-01T11:00:00Z", "hits": 7}]"#;
        let entries = parse_listing(plain).unwrap();
        assert_eq!(entries[0].hits, Some(7));
        assert!(parse_listing("<html>").unwrap_err().contains("not JSON"));
        assert!(parse_listing("{}").unwrap_err().contains("entries"));
    }

    #[test]
    fn entries_of_every_agent_in_one_table_and_failures_apart() {
        let ok = AgentCache {
            namespace: "rm-system".into(),
            pod: "rm-agent-abc".into(),
            node: "atom-1".into(),
            entries: parse_listing(AGENT_BODY).unwrap(),
            error: None,
        };
        let down = AgentCache {
            namespace: "rm-system".into(),
            pod: "rm-agent-def".into(),
            node: "gpu-1".into(),
            entries: vec![],
            error: Some("not running (phase Pending)".into()),
        };
        let (text, errors) = render(&[down, ok], Paint::Plain, now());
        assert_eq!(
            text,
            "\
NODE     KEY            BACKEND   DEVICE   SIZE       HITS   LAST USED
atom-1   3f1c0a9e5b7d   cpu       cpu      270.0MiB   -      58m ago

1 cache entry (270.0MiB) on 1 of 2 agent(s).
"
        );
        assert_eq!(
            errors,
            "agent rm-system/rm-agent-def on node gpu-1: not running (phase Pending)\n"
        );
    }

    #[test]
    fn no_agents_is_a_friendly_message() {
        let msg = no_agents_message(&Scope::All);
        assert!(msg.starts_with("No node agents found"), "{msg}");
        assert!(msg.contains(AGENT_SELECTOR), "{msg}");
    }
}
