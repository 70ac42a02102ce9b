//! `kubectl inference explain NAME`: why a workload runs on its device.
//!
//! Every decision here is the operator's own: the capacity comes from
//! `rm_operator::capacity::CapacitySnapshot`, the choice from
//! `rm_operator::selection::select_device`, fed with the same inputs the
//! operator's reconcile uses (nodes, live pods, the Deployment's placement
//! annotations). "What would change it" asks `select_device` again on
//! modified snapshots (more free devices of a type, none of the chosen type),
//! so the plugin never carries a second copy of the rules.

use std::fmt::Write as _;
use std::io::Write as _;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};
use rm_crds::{DeviceType, InferenceWorkload};
use rm_operator::capacity::{CapacitySnapshot, NodeCapacity};
use rm_operator::config::OperatorConfig;
use rm_operator::placement::{capacity_for, current_placement};
use rm_operator::selection::{Current, Decision, NoChoice, Selection, select_device};

use crate::cli::ExplainArgs;
use crate::connect::Scope;
use crate::error::{Error, Result};
use crate::table::{Cell, Paint, Table, Tone};

/// Everything the explanation is computed from.
pub struct ExplainInput<'a> {
    pub workload: &'a InferenceWorkload,
    pub config: &'a OperatorConfig,
    pub nodes: &'a [Node],
    /// Non-terminated pods of every namespace.
    pub pods: &'a [Pod],
    /// The workload's Deployment, if the operator wrote one.
    pub deployment: Option<&'a Deployment>,
    pub now: jiff::Timestamp,
}

/// A snapshot with one more (imaginary) node holding `extra` free devices of `t`.
fn with_extra(capacity: &CapacitySnapshot, t: DeviceType, extra: i64) -> CapacitySnapshot {
    let mut c = capacity.clone();
    c.nodes.push(NodeCapacity {
        name: "(what if)".into(),
        allocatable: [(t, extra)].into(),
        free: [(t, extra)].into(),
        pod_room: None,
        weight: 1,
    });
    c
}

/// A snapshot in which no device of `t` is free.
fn without_free(capacity: &CapacitySnapshot, t: DeviceType) -> CapacitySnapshot {
    let mut c = capacity.clone();
    for n in &mut c.nodes {
        if let Some(f) = n.free.get_mut(&t) {
            *f = 0;
        }
    }
    c
}

fn chosen_type(sel: &Selection) -> Option<DeviceType> {
    sel.chosen().map(|c| c.device_type)
}

/// The fewest extra free devices of `t` (on nodes with room for whole
/// replicas) that make a fresh selection pick `t`; `None` when no number does.
fn devices_to_flip(
    iw: &InferenceWorkload,
    config: &OperatorConfig,
    capacity: &CapacitySnapshot,
    t: DeviceType,
) -> Option<i64> {
    let per = i64::from(iw.spec.devices_per_replica.max(1));
    let replicas = i64::from(iw.spec.replicas.max(1));
    let picks = |k: i64| {
        chosen_type(&select_device(
            &iw.spec,
            config,
            &with_extra(capacity, t, k * per),
            None,
        )) == Some(t)
    };
    // Replicas to add, 1..=replicas; monotone, so bisect.
    if !picks(replicas) {
        return None;
    }
    let (mut lo, mut hi) = (1, replicas);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if picks(mid) {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    Some(lo * per)
}

fn decision_words(sel: &Selection) -> String {
    match &sel.result {
        Ok(c) => format!("{} ({})", c.device_type, c.decision.reason()),
        Err(n) => format!("none ({})", n.reason()),
    }
}

fn priority_list(iw: &InferenceWorkload, config: &OperatorConfig) -> String {
    match &iw.spec.device_priority {
        Some(p) => format!(
            "{} (spec.devicePriority; overrides the cluster's)",
            p.iter().map(|t| t.as_str()).collect::<Vec<_>>().join(" > ")
        ),
        None => {
            let order = config.priority_order();
            let list = order
                .iter()
                .map(|t| format!("{t} {}", config.priority(*t)))
                .collect::<Vec<_>>()
                .join(" > ");
            let mut notes = vec!["cluster"];
            if order.last() == Some(&DeviceType::Cpu) {
                notes.push("cpu is the fallback");
            } else {
                notes.push("no cpu fallback");
            }
            if order
                .windows(2)
                .any(|w| config.priority(w[0]) == config.priority(w[1]))
            {
                notes.push("ties keep the order rbln, furiosa, gpu, cpu");
            }
            format!("{list} ({})", notes.join("; "))
        }
    }
}

/// The explanation as text.
pub fn explain(input: &ExplainInput<'_>, paint: Paint) -> String {
    let iw = input.workload;
    let config = input.config;
    // The operator's own view: this workload's devices count as free for it.
    let fresh_capacity = capacity_for(iw, input.nodes, input.pods, config);
    let current = input
        .deployment
        .and_then(|d| current_placement(iw, d, input.pods, input.now))
        .map(|(current, _)| current);
    let selection = select_device(&iw.spec, config, &fresh_capacity, current.as_ref());
    let fresh = select_device(&iw.spec, config, &fresh_capacity, None);

    let bold = |s: &str| paint.paint(Tone::Bold, s);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} {}/{}: device {}, {} replica(s) of {} device(s) each",
        bold("Workload"),
        iw.namespace().unwrap_or_default(),
        iw.name_any(),
        iw.spec.device,
        iw.spec.replicas,
        iw.spec.devices_per_replica
    );
    let _ = writeln!(out, "{} {}", bold("Priority:"), priority_list(iw, config));
    let _ = writeln!(out, "{}", bold("Candidates:"));
    let replicas = u32::try_from(iw.spec.replicas.max(0)).unwrap_or(0);
    let chosen = chosen_type(&selection);
    let mut t = Table::new(&[
        "",
        "type",
        "priority",
        "resource",
        "nodes",
        "free",
        "replicas that fit",
    ]);
    for (i, c) in selection.candidates.iter().enumerate() {
        let is_chosen = chosen == Some(c.device_type);
        let fit = match c.replicas_fit {
            Some(f) => Cell::new(
                format!("{f} (need {replicas})"),
                if f >= replicas {
                    Tone::Good
                } else if f > 0 {
                    Tone::Warn
                } else {
                    Tone::Bad
                },
            ),
            None => "unbounded".into(),
        };
        t.push(vec![
            Cell::new(if is_chosen { "->" } else { "" }, Tone::Bold),
            Cell::new(
                format!("{}. {}", i + 1, c.device_type),
                if is_chosen { Tone::Bold } else { Tone::Normal },
            ),
            config.priority(c.device_type).to_string().into(),
            config.resource_name(c.device_type).unwrap_or("-").into(),
            match c.free_devices {
                Some(_) => fresh_capacity.nodes_with(c.device_type).to_string().into(),
                None => "-".into(),
            },
            c.free_devices
                .map_or_else(|| "-".to_string(), |f| f.to_string())
                .into(),
            fit,
        ]);
    }
    if selection.candidates.is_empty() {
        out.push_str("  <none>\n");
    } else {
        for line in t.render(paint).lines() {
            let _ = writeln!(out, "  {line}");
        }
    }
    let tone = if selection.chosen().is_some() {
        Tone::Good
    } else {
        Tone::Bad
    };
    let _ = writeln!(
        out,
        "{} {}",
        bold("Decision:"),
        paint.paint(tone, &decision_words(&selection))
    );
    let _ = writeln!(out, "  {}", selection.message);

    if let Some(status) = iw.status.as_ref().and_then(|s| s.device.as_ref()) {
        if Some(status.device_type) == chosen {
            let _ = writeln!(
                out,
                "{} the operator reports {} too.",
                bold("Status:"),
                status.device_type
            );
        } else {
            let _ = writeln!(
                out,
                "{} {}",
                bold("Status:"),
                paint.paint(
                    Tone::Warn,
                    &format!(
                        "the operator reports {}, not {}: it has not reconciled since capacity changed, or it runs with other flags (pass the operator's --priority, --resource-name, --cpu-fallback here)",
                        status.device_type,
                        chosen.map_or("none".into(), |t| t.to_string())
                    )
                )
            );
        }
    }

    let _ = writeln!(out, "{}", bold("What would change it:"));
    for line in what_would_change(
        iw,
        config,
        &selection,
        &fresh,
        &fresh_capacity,
        current.as_ref(),
    ) {
        let _ = writeln!(out, "  - {line}");
    }
    out
}

fn what_would_change(
    iw: &InferenceWorkload,
    config: &OperatorConfig,
    selection: &Selection,
    fresh: &Selection,
    fresh_capacity: &CapacitySnapshot,
    current: Option<&Current>,
) -> Vec<String> {
    let mut lines = vec![];
    let per = iw.spec.devices_per_replica.max(1);
    let decision = selection.chosen().map(|c| c.decision);
    match (&selection.result, decision) {
        (Err(NoChoice::InvalidDevice | NoChoice::NoCandidate), _) => {
            lines.push("fix spec.device or spec.devicePriority as the decision says; capacity plays no part until then".into());
            return lines;
        }
        (_, Some(Decision::Explicit)) => {
            let mut auto = iw.spec.clone();
            auto.device = "auto".into();
            let would = select_device(&auto, config, fresh_capacity, None);
            lines.push(format!(
                "spec.device names the type, so priorities and capacity do not choose; with spec.device: auto the choice now would be {}",
                decision_words(&would)
            ));
            return lines;
        }
        _ => {}
    }
    // Replicas running on the chosen type stay there (no flapping), whether
    // the operator calls it Kept or the walk would pick the same type anyway.
    let running = current.filter(|c| {
        c.same_basis && selection.chosen().map(|x| x.device_type) == Some(c.device_type)
    });
    if let Some(cur) = running.map(|c| c.device_type) {
        lines.push(format!(
            "nothing while the replicas run: they stay on {cur} as long as spec.device, spec.devicePriority and spec.devicesPerReplica are unchanged (no flapping), even when a higher-priority type gets room"
        ));
        lines.push(format!(
            "changing one of those fields makes the operator choose again: with today's capacity (this workload's own devices counted as free) it would choose {}",
            decision_words(fresh)
        ));
        lines.push(format!(
            "pods unschedulable on {cur} for longer than {}s (the grace period) also make it choose again, without {cur}",
            config.unschedulable_grace.as_secs()
        ));
    }
    // Which higher-priority type would win, and with how many more devices.
    let fresh_choice = chosen_type(fresh);
    let higher: Vec<DeviceType> = fresh
        .order
        .iter()
        .copied()
        .take_while(|t| Some(*t) != fresh_choice)
        .filter(|t| config.resource_name(*t).is_some() && *t != DeviceType::Cpu)
        .collect();
    let prefix = if running.is_some() {
        "for a new choice: "
    } else {
        ""
    };
    for t in higher {
        match devices_to_flip(iw, config, fresh_capacity, t) {
            Some(k) => lines.push(format!(
                "{prefix}{k} more free {t} device(s) ({} more replica(s) of {per} on a node) would make it {t}",
                k / i64::from(per)
            )),
            None => lines.push(format!(
                "{prefix}no number of free {t} devices would make it {t}"
            )),
        }
    }
    if let Some(Decision::Partial) = fresh.chosen().map(|c| c.decision) {
        if let (Some(t), Some(c)) = (
            fresh_choice,
            fresh
                .candidates
                .iter()
                .find(|c| Some(c.device_type) == fresh_choice),
        ) {
            let missing = i64::from(u32::try_from(iw.spec.replicas.max(0)).unwrap_or(0))
                - i64::from(c.replicas_fit.unwrap_or(0));
            lines.push(format!(
                "{} more free {t} device(s) would give room for every replica; until then the rest stay Pending",
                missing.max(0) * i64::from(per)
            ));
        }
    }
    if let Some(t) = fresh_choice.filter(|t| *t != DeviceType::Cpu) {
        let would = select_device(&iw.spec, config, &without_free(fresh_capacity, t), None);
        lines.push(format!(
            "{prefix}with no free {t} device the choice would be {}",
            decision_words(&would)
        ));
    }
    if selection.result == Err(NoChoice::NoCapacity)
        && !config.cpu_fallback
        && iw.spec.device_priority.is_none()
    {
        lines.push("the operator's cpu fallback is off (--cpu-fallback=false); with it on, cpu would run the workload".into());
    }
    if lines.is_empty() {
        lines.push(format!(
            "{} is the first choice of the priority list and has room; only a change of priorities or spec.device would change it",
            fresh_choice.map_or("it".into(), |t| t.to_string())
        ));
    }
    lines
}

pub async fn run(client: Client, scope: &Scope, args: &ExplainArgs, paint: Paint) -> Result<()> {
    let config = args.config.load()?;
    let ns = scope.single()?;
    let iw = Api::<InferenceWorkload>::namespaced(client.clone(), ns)
        .get_opt(&args.name)
        .await
        .map_err(Error::kube(format!("get inferenceworkloads {}", args.name)))?
        .ok_or_else(|| Error::NotFound {
            kind: "InferenceWorkload",
            name: args.name.clone(),
            namespace: ns.to_string(),
        })?;
    let nodes = Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(Error::kube("list nodes"))?;
    let pods = Api::<Pod>::all(client.clone())
        .list(&ListParams::default().fields("status.phase!=Succeeded,status.phase!=Failed"))
        .await
        .map_err(Error::kube("list pods in all namespaces"))?;
    let deployment = Api::<Deployment>::namespaced(client, ns)
        .get_opt(&args.name)
        .await
        .map_err(Error::kube(format!("get deployments {}", args.name)))?;
    let text = explain(
        &ExplainInput {
            workload: &iw,
            config: &config,
            nodes: &nodes.items,
            pods: &pods.items,
            deployment: deployment.as_ref(),
            now: jiff::Timestamp::now(),
        },
        paint,
    );
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(text.as_bytes())?;
    stdout.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::tests::{node, pod_on};
    use crate::status::tests::{now, workload};
    use rm_crds::labels;
    use rm_operator::render::{DEVICE_TYPE, SELECTION_BASIS};
    use rm_operator::selection::selection_basis;
    use serde_json::json;

    const ATOM: &str = "rebellions.ai/ATOM";
    const RNGD: &str = "furiosa.ai/rngd";
    const GPU: &str = "nvidia.com/gpu";

    fn run(
        iw: &InferenceWorkload,
        config: &OperatorConfig,
        nodes: &[Node],
        pods: &[Pod],
        dep: Option<&Deployment>,
    ) -> String {
        explain(
            &ExplainInput {
                workload: iw,
                config,
                nodes,
                pods,
                deployment: dep,
                now: now(),
            },
            Paint::Plain,
        )
    }

    fn deployment_on(t: &str, basis: &str) -> Deployment {
        serde_json::from_value(json!({
            "metadata": {"name": "llama", "annotations": {SELECTION_BASIS: basis}},
            "spec": {"selector": {}, "template": {"metadata": {"annotations": {DEVICE_TYPE: t}}}}
        }))
        .unwrap()
    }

    #[test]
    fn a_new_workload_gets_the_first_type_with_room_and_says_what_would_flip_it() {
        let iw = workload("llama", json!({"replicas": 2}), json!({}));
        let nodes = [
            node("atom-1", &[(ATOM, 1)], true, false),
            node("rngd-1", &[(RNGD, 4)], true, false),
            node("gpu-1", &[(GPU, 8)], true, false),
        ];
        let text = run(&iw, &OperatorConfig::default(), &nodes, &[], None);
        assert_eq!(
            text,
            "\
Workload ml/llama: device auto, 2 replica(s) of 1 device(s) each
Priority: rbln 100 > furiosa 100 > gpu 75 > cpu 0 (cluster; cpu is the fallback; ties keep the order rbln, furiosa, gpu, cpu)
Candidates:
       TYPE         PRIORITY   RESOURCE             NODES   FREE   REPLICAS THAT FIT
       1. rbln      100        rebellions.ai/ATOM   1       1      1 (need 2)
  ->   2. furiosa   100        furiosa.ai/rngd      1       4      4 (need 2)
       3. gpu       75         nvidia.com/gpu       1       8      8 (need 2)
       4. cpu       0          -                    -       -      unbounded
Decision: furiosa (Selected)
  chose furiosa: first in [rbln, furiosa, gpu, cpu] with room for all 2 replicas; free: rbln 1 (1 replica(s) of 1 fit), furiosa 4 (4 replica(s) of 1 fit), gpu 8 (8 replica(s) of 1 fit), cpu unbounded
What would change it:
  - 1 more free rbln device(s) (1 more replica(s) of 1 on a node) would make it rbln
  - with no free furiosa device the choice would be gpu (Selected)
"
        );
    }

    #[test]
    fn a_running_workload_is_kept_and_the_explanation_says_no_flapping() {
        let iw = workload(
            "llama",
            json!({"replicas": 1}),
            json!({"device": {"type": "gpu", "resourceName": GPU, "count": 1, "reason": "x"}}),
        );
        let mut own = pod_on("gpu-1", GPU, 1, "Running");
        own.metadata.namespace = Some("ml".into());
        own.metadata.labels = Some([(labels::WORKLOAD.to_string(), "llama".to_string())].into());
        let nodes = [
            node("gpu-1", &[(GPU, 1)], true, false),
            node("atom-1", &[(ATOM, 2)], true, false),
        ];
        let dep = deployment_on("gpu", &selection_basis(&iw.spec));
        let text = run(&iw, &OperatorConfig::default(), &nodes, &[own], Some(&dep));
        assert!(text.contains("Decision: gpu (Kept)"), "{text}");
        assert!(
            text.contains("Status: the operator reports gpu too."),
            "{text}"
        );
        assert!(
            text.contains("they stay on gpu as long as spec.device"),
            "{text}"
        );
        assert!(text.contains("it would choose rbln (Selected)"), "{text}");
        // A changed device spec is a new choice.
        let changed = deployment_on("gpu", "npu;cluster;1");
        let text = run(&iw, &OperatorConfig::default(), &nodes, &[], Some(&changed));
        assert!(text.contains("Decision: rbln (Selected)"), "{text}");
        assert!(
            text.contains("the operator reports gpu, not rbln"),
            "{text}"
        );
    }

    #[test]
    fn no_capacity_without_fallback_lists_what_each_type_would_need() {
        let iw = workload(
            "big",
            json!({"replicas": 2, "devicesPerReplica": 2}),
            json!({}),
        );
        let config = OperatorConfig {
            cpu_fallback: false,
            ..OperatorConfig::default()
        };
        let nodes = [node("gpu-1", &[(GPU, 1)], true, false)];
        let text = run(&iw, &config, &nodes, &[], None);
        assert!(text.contains("Decision: none (NoCapacity)"), "{text}");
        // One replica's worth suffices: partial room beats waiting.
        assert!(
            text.contains(
                "2 more free rbln device(s) (1 more replica(s) of 2 on a node) would make it rbln"
            ),
            "{text}"
        );
        assert!(text.contains("2 more free gpu device(s)"), "{text}");
        assert!(text.contains("cpu fallback is off"), "{text}");
        assert!(text.contains("(cluster; no cpu fallback;"), "{text}");
    }

    #[test]
    fn an_explicit_device_says_what_auto_would_choose() {
        let iw = workload("w", json!({"device": "cuda:0"}), json!({}));
        let nodes = [node("atom-1", &[(ATOM, 2)], true, false)];
        let text = run(&iw, &OperatorConfig::default(), &nodes, &[], None);
        assert!(text.contains("Decision: gpu (Explicit)"), "{text}");
        assert!(
            text.contains("with spec.device: auto the choice now would be rbln (Selected)"),
            "{text}"
        );
    }
}
