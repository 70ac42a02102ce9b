//! `kubectl inference status [NAME]`: each workload with its device type and
//! resource, replicas ready/wanted, phase, the reason of the device choice
//! and, for served workloads, the endpoint of their API; with NAME also its
//! conditions and its pods with their nodes and devices. `-w` keeps printing changes; `-o wide|json|yaml`.
//!
//! The rendering functions take plain objects and are tested without a
//! cluster; `run` only fetches and prints.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;

use futures::TryStreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use rm_crds::workload::condition;
use rm_crds::{InferenceWorkload, Phase, labels};

use crate::cli::{OutputFormat, StatusArgs};
use crate::connect::Scope;
use crate::error::{Error, Result};
use crate::output;
use crate::table::{Cell, Paint, Table, Tone, age_since};

/// Index of AGE in a row built with `wide` and `all_namespaces`.
const AGE_COLUMN_WIDE_ALL: usize = 8;

/// Columns of the workload table.
fn headers(wide: bool, all_namespaces: bool) -> Vec<&'static str> {
    let mut h = vec![];
    if all_namespaces {
        h.push("namespace");
    }
    h.extend([
        "name", "device", "resource", "ready", "phase", "reason", "endpoint", "age",
    ]);
    if wide {
        h.extend(["model", "message"]);
    }
    h
}

/// One row of the workload table.
pub fn workload_row(
    iw: &InferenceWorkload,
    wide: bool,
    all_namespaces: bool,
    now: jiff::Timestamp,
) -> Vec<Cell> {
    let status = iw.status.as_ref();
    let device = status.and_then(|s| s.device.as_ref());
    let mut row: Vec<Cell> = vec![];
    if all_namespaces {
        row.push(iw.namespace().unwrap_or_default().into());
    }
    row.push(iw.name_any().into());
    // Spread over several types: each with its replicas ("rbln:1,gpu:7").
    let placements = status.map(|s| s.placements.as_slice()).unwrap_or_default();
    row.push(match device {
        Some(_) if placements.len() > 1 => placements
            .iter()
            .map(|p| format!("{}:{}", p.device_type, p.replicas))
            .collect::<Vec<_>>()
            .join(",")
            .into(),
        Some(d) => d.device_type.to_string().into(),
        None => Cell::new("<none>", Tone::Dim),
    });
    row.push(match device {
        Some(d) => match &d.resource_name {
            Some(r) => format!("{r}={}", d.count).into(),
            None => "-".into(),
        },
        None => Cell::new("<none>", Tone::Dim),
    });
    let ready = status.map_or(0, |s| s.ready_replicas);
    let wanted = iw.spec.replicas;
    row.push(Cell::new(
        format!("{ready}/{wanted}"),
        if ready >= wanted {
            Tone::Normal
        } else {
            Tone::Warn
        },
    ));
    row.push(match status.and_then(|s| s.phase) {
        Some(p) => Cell::new(format!("{p:?}"), phase_tone(p)),
        None => Cell::new("<none>", Tone::Dim),
    });
    row.push(
        device_selected(iw)
            .map(|c| c.reason.clone())
            .unwrap_or_else(|| "-".into())
            .into(),
    );
    row.push(endpoint_cell(iw));
    row.push(age_since(creation(iw), now).into());
    if wide {
        row.push(iw.spec.model.source.clone().into());
        row.push(
            device
                .map(|d| d.reason.clone())
                .or_else(|| device_selected(iw).map(|c| c.message.clone()))
                .unwrap_or_else(|| "-".into())
                .into(),
        );
    }
    row
}

/// The API's URL while it has ready pods; `<pending>` while a served
/// workload has none (as kubectl shows a LoadBalancer waiting for its
/// address); `-` when the workload is not served.
fn endpoint_cell(iw: &InferenceWorkload) -> Cell {
    match iw.status.as_ref().and_then(|s| s.endpoint.as_ref()) {
        Some(url) => Cell::new(url.clone(), Tone::Good),
        None if iw.spec.serve.is_some() => Cell::new("<pending>", Tone::Warn),
        None => "-".into(),
    }
}

/// The detail view's endpoint line: the URL and the model's id in the API,
/// or why it does not answer yet.
fn endpoint_detail(iw: &InferenceWorkload) -> Option<String> {
    let serve = iw.spec.serve.as_ref()?;
    let model = rm_operator::serve::model_name(iw, serve);
    if let Some(url) = iw.status.as_ref().and_then(|s| s.endpoint.as_ref()) {
        return Some(format!("{url} (model {model:?})"));
    }
    let why = iw
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == condition::SERVING))
        .map(|c| format!("{}: {}", c.reason, c.message))
        .unwrap_or_else(|| "not reconciled yet".into());
    Some(format!("<pending> (model {model:?}) {why}"))
}

fn phase_tone(p: Phase) -> Tone {
    match p {
        Phase::Running => Tone::Good,
        Phase::Pending | Phase::Progressing | Phase::Degraded => Tone::Warn,
        Phase::Failed => Tone::Bad,
    }
}

fn creation(iw: &InferenceWorkload) -> Option<jiff::Timestamp> {
    iw.metadata.creation_timestamp.as_ref().map(|t| t.0)
}

fn device_selected(
    iw: &InferenceWorkload,
) -> Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    iw.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == condition::DEVICE_SELECTED)
}

/// The table of workloads, sorted by namespace and name.
pub fn workload_table(
    workloads: &[InferenceWorkload],
    wide: bool,
    all_namespaces: bool,
    now: jiff::Timestamp,
) -> Table {
    let mut sorted: Vec<&InferenceWorkload> = workloads.iter().collect();
    sorted.sort_by_key(|iw| (iw.namespace(), iw.name_any()));
    let mut table = Table::new(&headers(wide, all_namespaces));
    for iw in sorted {
        table.push(workload_row(iw, wide, all_namespaces, now));
    }
    table
}

/// Extended resources (names with a `/`) a pod's containers ask for, as
/// `name=count`, comma-separated: the devices the kubelet allocated to it.
pub fn pod_devices(pod: &Pod) -> String {
    let mut sums: BTreeMap<String, i64> = BTreeMap::new();
    for c in pod.spec.iter().flat_map(|s| &s.containers) {
        let Some(res) = c.resources.as_ref() else {
            continue;
        };
        // Requests default to limits for extended resources; take one of them.
        let mut seen: BTreeMap<&String, i64> = BTreeMap::new();
        for map in [&res.limits, &res.requests].into_iter().flatten() {
            for (name, q) in map {
                if name.contains('/') {
                    seen.insert(name, q.0.trim().parse().unwrap_or(0));
                }
            }
        }
        for (name, n) in seen {
            *sums.entry(name.clone()).or_default() += n;
        }
    }
    if sums.is_empty() {
        return "-".into();
    }
    sums.iter()
        .map(|(r, n)| format!("{r}={n}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn pod_ready(pod: &Pod) -> (usize, usize) {
    let total = pod.spec.as_ref().map_or(0, |s| s.containers.len());
    let ready = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .map_or(0, |cs| cs.iter().filter(|c| c.ready).count());
    (ready, total)
}

/// `Running`, `Pending`, or the reason a pod waits (`Unschedulable`, ...).
fn pod_state(pod: &Pod) -> (String, Tone) {
    let status = pod.status.as_ref();
    if pod.metadata.deletion_timestamp.is_some() {
        return ("Terminating".into(), Tone::Warn);
    }
    let unschedulable = status
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| {
            cs.iter()
                .find(|c| c.type_ == "PodScheduled" && c.status == "False")
        })
        .and_then(|c| c.reason.clone());
    let phase = status
        .and_then(|s| s.phase.clone())
        .unwrap_or_else(|| "Unknown".into());
    match (phase.as_str(), unschedulable) {
        ("Pending", Some(reason)) => (reason, Tone::Bad),
        ("Running" | "Succeeded", _) => (phase, Tone::Good),
        ("Failed" | "Unknown", _) => (phase, Tone::Bad),
        _ => (phase, Tone::Warn),
    }
}

/// The pods of one workload: name, readiness, state, node, devices, age.
pub fn pod_table(pods: &[Pod], now: jiff::Timestamp) -> Table {
    let mut sorted: Vec<&Pod> = pods.iter().collect();
    sorted.sort_by_key(|p| p.name_any());
    let mut table = Table::new(&["name", "ready", "status", "node", "devices", "age"]);
    for pod in sorted {
        let (ready, total) = pod_ready(pod);
        let (state, tone) = pod_state(pod);
        table.push(vec![
            pod.name_any().into(),
            format!("{ready}/{total}").into(),
            Cell::new(state, tone),
            pod.spec
                .as_ref()
                .and_then(|s| s.node_name.clone())
                .map_or_else(|| Cell::new("<none>", Tone::Dim), Cell::from),
            pod_devices(pod).into(),
            age_since(pod.metadata.creation_timestamp.as_ref().map(|t| t.0), now).into(),
        ]);
    }
    table
}

/// The detail view of one workload and its pods.
pub fn workload_detail(
    iw: &InferenceWorkload,
    pods: &[Pod],
    paint: Paint,
    now: jiff::Timestamp,
) -> String {
    let mut out = String::new();
    let status = iw.status.as_ref();
    let device = status.and_then(|s| s.device.as_ref());
    let field = |out: &mut String, label: &str, value: &str| {
        let _ = writeln!(
            out,
            "{}{value}",
            paint.paint(Tone::Bold, &format!("{label:<13}"))
        );
    };
    field(&mut out, "Name:", &iw.name_any());
    field(&mut out, "Namespace:", &iw.namespace().unwrap_or_default());
    let model = match &iw.spec.model.revision {
        Some(rev) => format!("{} @ {rev}", iw.spec.model.source),
        None => iw.spec.model.source.clone(),
    };
    field(&mut out, "Model:", &model);
    let requested = match &iw.spec.device_priority {
        Some(p) => format!(
            "{} (devicePriority: {})",
            iw.spec.device,
            p.iter().map(|t| t.as_str()).collect::<Vec<_>>().join(", ")
        ),
        None => iw.spec.device.clone(),
    };
    field(&mut out, "Requested:", &requested);
    let chosen = match device {
        Some(d) => match &d.resource_name {
            Some(r) => format!("{} ({r} x{} per replica)", d.device_type, d.count),
            None => format!("{} (no device resource)", d.device_type),
        },
        None => "<none yet>".into(),
    };
    field(&mut out, "Device:", &chosen);
    let placements = status.map(|s| s.placements.as_slice()).unwrap_or_default();
    if placements.len() > 1 {
        let split = placements
            .iter()
            .map(|p| {
                format!(
                    "{} {}/{} ready",
                    p.device_type, p.ready_replicas, p.replicas
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        field(&mut out, "Spread:", &split);
    }
    let ready = status.map_or(0, |s| s.ready_replicas);
    field(
        &mut out,
        "Replicas:",
        &format!("{ready}/{} ready", iw.spec.replicas),
    );
    let phase = status
        .and_then(|s| s.phase)
        .map_or_else(|| "<none>".to_string(), |p| format!("{p:?}"));
    field(&mut out, "Phase:", &phase);
    if let Some(endpoint) = endpoint_detail(iw) {
        field(&mut out, "Endpoint:", &endpoint);
    }
    if let Some(d) = device {
        field(&mut out, "Reason:", &d.reason);
    }
    field(&mut out, "Age:", &age_since(creation(iw), now));

    let conditions = status.map(|s| s.conditions.as_slice()).unwrap_or_default();
    out.push_str(&paint.paint(Tone::Bold, "Conditions:"));
    out.push('\n');
    if conditions.is_empty() {
        out.push_str("  <none>\n");
    } else {
        let mut t = Table::new(&["type", "status", "reason", "age", "message"]);
        for c in conditions {
            let tone = match c.status.as_str() {
                "True" => Tone::Good,
                "False" => Tone::Warn,
                _ => Tone::Normal,
            };
            t.push(vec![
                c.type_.clone().into(),
                Cell::new(c.status.clone(), tone),
                c.reason.clone().into(),
                age_since(Some(c.last_transition_time.0), now).into(),
                c.message.clone().into(),
            ]);
        }
        out.push_str(&indent(&t.render(paint)));
    }
    out.push_str(&paint.paint(Tone::Bold, "Pods:"));
    out.push('\n');
    if pods.is_empty() {
        out.push_str("  <none>\n");
    } else {
        out.push_str(&indent(&pod_table(pods, now).render(paint)));
    }
    out
}

fn indent(text: &str) -> String {
    text.lines().fold(String::new(), |mut acc, l| {
        let _ = writeln!(acc, "  {l}");
        acc
    })
}

pub async fn run(client: Client, scope: &Scope, args: &StatusArgs, paint: Paint) -> Result<()> {
    let wide = args.output == Some(OutputFormat::Wide);
    let now = jiff::Timestamp::now();
    let mut stdout = std::io::stdout().lock();
    let (api, workloads) = match &args.name {
        Some(name) => {
            let ns = scope.single()?;
            let api: Api<InferenceWorkload> = Api::namespaced(client.clone(), ns);
            let iw = api
                .get_opt(name)
                .await
                .map_err(Error::kube(format!("get inferenceworkloads {name}")))?
                .ok_or_else(|| Error::NotFound {
                    kind: "InferenceWorkload",
                    name: name.clone(),
                    namespace: ns.to_string(),
                })?;
            (api, vec![iw])
        }
        None => {
            let api: Api<InferenceWorkload> = match scope {
                Scope::All => Api::all(client.clone()),
                Scope::Namespace(ns) => Api::namespaced(client.clone(), ns),
            };
            let list = api
                .list(&ListParams::default())
                .await
                .map_err(Error::kube("list inferenceworkloads"))?;
            (api, list.items)
        }
    };

    match (args.output, &args.name) {
        (Some(OutputFormat::Json | OutputFormat::Yaml), _) => {
            let format = args.output.unwrap_or(OutputFormat::Json);
            let value = match args.name {
                Some(_) => output::object_value(&workloads[0])?,
                None => output::list_value(&workloads)?,
            };
            stdout.write_all(output::encode(&value, format)?.as_bytes())?;
        }
        (_, Some(_)) if !args.watch => {
            let iw = &workloads[0];
            let ns = iw.namespace().unwrap_or_default();
            let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
            let selector = format!("{}={}", labels::WORKLOAD, iw.name_any());
            let pods = pods
                .list(&ListParams::default().labels(&selector))
                .await
                .map_err(Error::kube(format!("list pods -l {selector}")))?;
            stdout.write_all(workload_detail(iw, &pods.items, paint, now).as_bytes())?;
        }
        _ if workloads.is_empty() && !args.watch => {
            let where_ = match scope {
                Scope::All => "any namespace".to_string(),
                Scope::Namespace(ns) => format!("namespace {ns:?}"),
            };
            eprintln!("No InferenceWorkloads found in {where_}.");
        }
        _ => {
            let table = workload_table(&workloads, wide, scope.is_all(), now);
            stdout.write_all(table.render(paint).as_bytes())?;
        }
    }
    stdout.flush()?;
    drop(stdout);

    if args.watch {
        watch(api, &workloads, args, scope.is_all(), paint).await?;
    }
    Ok(())
}

/// Prints one line (or document) per change after the initial listing.
async fn watch(
    api: Api<InferenceWorkload>,
    initial: &[InferenceWorkload],
    args: &StatusArgs,
    all_namespaces: bool,
    paint: Paint,
) -> Result<()> {
    let wide = args.output == Some(OutputFormat::Wide);
    let mut config = watcher::Config::default();
    if let Some(name) = &args.name {
        config = config.fields(&format!("metadata.name={name}"));
    }
    let key = |iw: &InferenceWorkload| (iw.namespace(), iw.name_any());
    // What was printed last per workload, to print changes only; the age
    // column is left out so that time passing is not a change.
    let shown = |iw: &InferenceWorkload| {
        let mut row = workload_row(iw, true, true, jiff::Timestamp::UNIX_EPOCH);
        row.remove(AGE_COLUMN_WIDE_ALL);
        row.into_iter().map(|c| c.text).collect::<Vec<_>>()
    };
    let mut last: BTreeMap<_, _> = initial.iter().map(|iw| (key(iw), shown(iw))).collect();
    let base = workload_table(initial, wide, all_namespaces, jiff::Timestamp::now());
    let stream = kube::runtime::WatchStreamExt::applied_objects(watcher(api, config));
    futures::pin_mut!(stream);
    while let Some(iw) = stream
        .try_next()
        .await
        .map_err(|e| Error::Watch(e.to_string()))?
    {
        let now_shown = shown(&iw);
        if last.get(&key(&iw)) == Some(&now_shown) {
            continue;
        }
        last.insert(key(&iw), now_shown);
        let text = match args.output {
            Some(f @ (OutputFormat::Json | OutputFormat::Yaml)) => {
                let body = output::encode(&output::object_value(&iw)?, f)?;
                if f == OutputFormat::Yaml {
                    format!("---\n{body}")
                } else {
                    body
                }
            }
            _ => {
                let mut t = base.clone();
                t.push(workload_row(
                    &iw,
                    wide,
                    all_namespaces,
                    jiff::Timestamp::now(),
                ));
                t.render_rows(paint)
                    .lines()
                    .last()
                    .map(|l| format!("{l}\n"))
                    .unwrap_or_default()
            }
        };
        let mut stdout = std::io::stdout().lock();
        stdout.write_all(text.as_bytes())?;
        stdout.flush()?;
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;

    pub fn now() -> jiff::Timestamp {
        "2026-01-01T12:00:00Z".parse().unwrap()
    }

    pub fn workload(
        name: &str,
        extra_spec: serde_json::Value,
        status: serde_json::Value,
    ) -> InferenceWorkload {
        let mut spec = json!({
            "model": {"source": "HuggingFaceTB/SmolLM2-135M-Instruct"},
            "template": {"spec": {"containers": [{"name": "app", "image": "python:3.12"}]}}
        });
        for (k, v) in extra_spec.as_object().unwrap() {
            spec[k] = v.clone();
        }
        serde_json::from_value(json!({
            "apiVersion": "rm-abstract.io/v1alpha1",
            "kind": "InferenceWorkload",
            "metadata": {"name": name, "namespace": "ml", "creationTimestamp": "2026-01-01T11:55:00Z"},
            "spec": spec,
            "status": status,
        }))
        .unwrap()
    }

    fn running_on_rbln() -> InferenceWorkload {
        workload(
            "llama",
            json!({"replicas": 2}),
            json!({
                "phase": "Running",
                "replicas": 2,
                "readyReplicas": 2,
                "device": {"type": "rbln", "resourceName": "rebellions.ai/ATOM", "count": 1,
                           "reason": "chose rbln: first in [rbln, furiosa, gpu, cpu] with room for all 2 replicas; free: rbln 4"},
                "conditions": [
                    {"type": "DeviceSelected", "status": "True", "reason": "Selected", "message": "chose rbln",
                     "lastTransitionTime": "2026-01-01T11:55:01Z"},
                    {"type": "Available", "status": "True", "reason": "AllReplicasReady", "message": "2/2 ready",
                     "lastTransitionTime": "2026-01-01T11:56:00Z"}
                ]
            }),
        )
    }

    #[test]
    fn the_table_shows_device_resource_ready_phase_and_reason() {
        let pending = workload(
            "big",
            json!({"replicas": 3}),
            json!({"phase": "Pending", "replicas": 0, "readyReplicas": 0}),
        );
        let t = workload_table(&[running_on_rbln(), pending], false, false, now());
        assert_eq!(
            t.render(Paint::Plain),
            "\
NAME    DEVICE   RESOURCE               READY   PHASE     REASON     ENDPOINT   AGE
big     <none>   <none>                 0/3     Pending   -          -          5m
llama   rbln     rebellions.ai/ATOM=1   2/2     Running   Selected   -          5m
"
        );
    }

    #[test]
    fn wide_adds_model_and_the_full_reason_and_all_namespaces_adds_namespace() {
        let t = workload_table(&[running_on_rbln()], true, true, now());
        let text = t.render(Paint::Plain);
        let mut lines = text.lines();
        assert_eq!(
            lines.next().unwrap().split_whitespace().collect::<Vec<_>>(),
            [
                "NAMESPACE",
                "NAME",
                "DEVICE",
                "RESOURCE",
                "READY",
                "PHASE",
                "REASON",
                "ENDPOINT",
                "AGE",
                "MODEL",
                "MESSAGE"
            ]
        );
        let row = lines.next().unwrap();
        assert!(row.starts_with("ml "), "{row}");
        assert!(
            row.contains("HuggingFaceTB/SmolLM2-135M-Instruct   chose rbln: first in"),
            "{row}"
        );
    }

    fn served(status: serde_json::Value) -> InferenceWorkload {
        let mut iw = workload("chat", json!({"serve": {"modelName": "smol"}}), status);
        iw.spec.template = None;
        iw
    }

    #[test]
    fn served_workloads_show_their_endpoint_or_pending() {
        let ready = served(json!({
            "phase": "Running", "replicas": 1, "readyReplicas": 1,
            "endpoint": "http://chat.ml.svc:8000/v1",
            "device": {"type": "cpu", "count": 1, "reason": "cpu fallback"},
            "conditions": [{"type": "Serving", "status": "True", "reason": "EndpointReady",
                            "message": "ready", "lastTransitionTime": "2026-01-01T11:59:00Z"}]
        }));
        let waiting = served(json!({
            "phase": "Progressing", "replicas": 1, "readyReplicas": 0,
            "conditions": [{"type": "Serving", "status": "False", "reason": "NoReadyPods",
                            "message": "http://chat.ml.svc:8000/v1 answers once a serving container is ready",
                            "lastTransitionTime": "2026-01-01T11:59:00Z"}]
        }));
        let mut waiting_named = waiting.clone();
        waiting_named.metadata.name = Some("chat2".into());
        let t = workload_table(&[ready.clone(), waiting_named], false, false, now());
        assert_eq!(
            t.render(Paint::Plain),
            "\
NAME    DEVICE   RESOURCE   READY   PHASE         REASON   ENDPOINT                     AGE
chat    cpu      -          1/1     Running       -        http://chat.ml.svc:8000/v1   5m
chat2   <none>   <none>     0/1     Progressing   -        <pending>                    5m
"
        );
        let text = workload_detail(&ready, &[], Paint::Plain, now());
        assert!(
            text.contains("Endpoint:    http://chat.ml.svc:8000/v1 (model \"smol\")\n"),
            "{text}"
        );
        let text = workload_detail(&waiting, &[], Paint::Plain, now());
        assert!(
            text.contains(
                "Endpoint:    <pending> (model \"smol\") NoReadyPods: http://chat.ml.svc:8000/v1 answers once"
            ),
            "{text}"
        );
    }

    #[test]
    fn the_detail_lists_conditions_and_pods_with_their_devices() {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "llama-abc", "creationTimestamp": "2026-01-01T11:58:00Z"},
            "spec": {"nodeName": "atom-1", "containers": [{"name": "app",
                "resources": {"limits": {"rebellions.ai/ATOM": "1", "cpu": "2"}}}]},
            "status": {"phase": "Running", "containerStatuses": [{"name": "app", "ready": true,
                "restartCount": 0, "image": "x", "imageID": ""}]}
        }))
        .unwrap();
        let stuck: Pod = serde_json::from_value(json!({
            "metadata": {"name": "llama-def", "creationTimestamp": "2026-01-01T11:59:30Z"},
            "spec": {"containers": [{"name": "app",
                "resources": {"limits": {"rebellions.ai/ATOM": "1"}, "requests": {"rebellions.ai/ATOM": "1"}}}]},
            "status": {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable"}]}
        }))
        .unwrap();
        let text = workload_detail(&running_on_rbln(), &[stuck, pod], Paint::Plain, now());
        assert_eq!(
            text,
            "\
Name:        llama
Namespace:   ml
Model:       HuggingFaceTB/SmolLM2-135M-Instruct
Requested:   auto
Device:      rbln (rebellions.ai/ATOM x1 per replica)
Replicas:    2/2 ready
Phase:       Running
Reason:      chose rbln: first in [rbln, furiosa, gpu, cpu] with room for all 2 replicas; free: rbln 4
Age:         5m
Conditions:
  TYPE             STATUS   REASON             AGE     MESSAGE
  DeviceSelected   True     Selected           4m59s   chose rbln
  Available        True     AllReplicasReady   4m      2/2 ready
Pods:
  NAME        READY   STATUS          NODE     DEVICES                AGE
  llama-abc   1/1     Running         atom-1   rebellions.ai/ATOM=1   2m
  llama-def   0/1     Unschedulable   <none>   rebellions.ai/ATOM=1   30s
"
        );
    }

    #[test]
    fn a_spread_workload_shows_its_replicas_per_type() {
        let spread = workload(
            "wide",
            json!({"replicas": 8, "placement": "spread"}),
            json!({
                "phase": "Running", "replicas": 8, "readyReplicas": 8,
                "device": {"type": "rbln", "resourceName": "rebellions.ai/ATOM", "count": 1, "reason": "spread"},
                "placements": [
                    {"type": "rbln", "replicas": 1, "readyReplicas": 1},
                    {"type": "gpu", "replicas": 7, "readyReplicas": 6}
                ]
            }),
        );
        let t = workload_table(&[spread], false, false, now());
        let text = t.render(Paint::Plain);
        let row = text.lines().nth(1).unwrap();
        assert_eq!(
            row.split_whitespace().nth(1),
            Some("rbln:1,gpu:7"),
            "{text}"
        );
    }
}
