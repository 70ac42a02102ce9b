//! `kubectl inference devices`: per node and device type the capacity,
//! allocatable, in use and free devices, and the node's health; totals per
//! type, including the free devices the operator can use (Ready, uncordoned
//! nodes), computed by the operator's own `CapacitySnapshot`.

use std::fmt::Write as _;
use std::io::Write as _;

use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};
use rm_crds::DeviceType;
use rm_operator::capacity::{CapacitySnapshot, pod_device_requests};
use rm_operator::config::OperatorConfig;
use serde::Serialize;

use crate::cli::{DevicesArgs, OutputFormat};
use crate::error::{Error, Result};
use crate::output;
use crate::table::{Cell, Paint, Table, Tone};

/// Health of a node as the scheduler sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum NodeHealth {
    Ready,
    NotReady,
    /// Ready but cordoned (`spec.unschedulable`).
    SchedulingDisabled,
}

impl NodeHealth {
    fn of(node: &Node) -> Self {
        let ready = node
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        let cordoned = node
            .spec
            .as_ref()
            .and_then(|s| s.unschedulable)
            .unwrap_or(false);
        match (ready, cordoned) {
            (false, _) => NodeHealth::NotReady,
            (true, true) => NodeHealth::SchedulingDisabled,
            (true, false) => NodeHealth::Ready,
        }
    }

    fn cell(self) -> Cell {
        match self {
            NodeHealth::Ready => Cell::new("Ready", Tone::Good),
            NodeHealth::NotReady => Cell::new("NotReady", Tone::Bad),
            NodeHealth::SchedulingDisabled => Cell::new("Ready,SchedulingDisabled", Tone::Warn),
        }
    }
}

/// One device type on one node.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeDevices {
    pub node: String,
    pub health: NodeHealth,
    #[serde(rename = "type")]
    pub device_type: DeviceType,
    pub resource_name: String,
    pub capacity: i64,
    pub allocatable: i64,
    /// Requested by the non-terminated pods bound to the node.
    pub in_use: i64,
    /// Allocatable minus in use (never below zero).
    pub free: i64,
}

/// One device type over the cluster.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TypeTotals {
    #[serde(rename = "type")]
    pub device_type: DeviceType,
    pub resource_name: String,
    pub nodes: usize,
    pub capacity: i64,
    pub allocatable: i64,
    pub in_use: i64,
    pub free: i64,
    /// Free on Ready, uncordoned nodes: what the operator's selection counts.
    pub schedulable_free: i64,
}

/// The whole report, also the `-o json|yaml` document.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceReport {
    pub nodes: Vec<NodeDevices>,
    pub totals: Vec<TypeTotals>,
    /// Nodes with none of the configured device resources (they run cpu workloads).
    pub nodes_without_devices: Vec<String>,
}

fn count(q: Option<&Quantity>) -> i64 {
    // Extended resources are whole numbers, as the operator counts them.
    q.and_then(|q| q.0.trim().parse().ok()).unwrap_or(0)
}

/// Builds the report from the cluster's nodes and pods.
pub fn device_report(nodes: &[Node], pods: &[Pod], config: &OperatorConfig) -> DeviceReport {
    let live_pods: Vec<&Pod> = pods
        .iter()
        .filter(|p| {
            !matches!(
                p.status.as_ref().and_then(|s| s.phase.as_deref()),
                Some("Succeeded" | "Failed")
            )
        })
        .collect();
    let mut sorted: Vec<&Node> = nodes.iter().collect();
    sorted.sort_by_key(|n| n.name_any());
    let mut report = DeviceReport::default();
    for node in sorted {
        let name = node.name_any();
        let health = NodeHealth::of(node);
        let status = node.status.as_ref();
        let mut any = false;
        for t in DeviceType::ALL {
            let Some(resource) = config.resource_name(t) else {
                continue;
            };
            let capacity = count(status.and_then(|s| s.capacity.as_ref()?.get(resource)));
            let allocatable = count(status.and_then(|s| s.allocatable.as_ref()?.get(resource)));
            if capacity == 0 && allocatable == 0 {
                continue;
            }
            any = true;
            let in_use: i64 = live_pods
                .iter()
                .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(&name))
                .filter_map(|p| pod_device_requests(p, config).get(&t).copied())
                .sum();
            report.nodes.push(NodeDevices {
                node: name.clone(),
                health,
                device_type: t,
                resource_name: resource.to_string(),
                capacity,
                allocatable,
                in_use,
                free: (allocatable - in_use).max(0),
            });
        }
        if !any {
            report.nodes_without_devices.push(name);
        }
    }
    let snapshot = CapacitySnapshot::from_cluster(nodes, live_pods.iter().copied(), config);
    for t in DeviceType::ALL {
        let Some(resource) = config.resource_name(t) else {
            continue;
        };
        let rows: Vec<&NodeDevices> = report.nodes.iter().filter(|r| r.device_type == t).collect();
        if rows.is_empty() {
            continue;
        }
        report.totals.push(TypeTotals {
            device_type: t,
            resource_name: resource.to_string(),
            nodes: rows.len(),
            capacity: rows.iter().map(|r| r.capacity).sum(),
            allocatable: rows.iter().map(|r| r.allocatable).sum(),
            in_use: rows.iter().map(|r| r.in_use).sum(),
            free: rows.iter().map(|r| r.free).sum(),
            schedulable_free: snapshot.free_devices(t),
        });
    }
    report
}

fn free_cell(free: i64, allocatable: i64) -> Cell {
    let tone = if free == 0 && allocatable > 0 {
        Tone::Bad
    } else if free * 4 < allocatable {
        Tone::Warn
    } else {
        Tone::Good
    };
    Cell::new(free.to_string(), tone)
}

/// The node table, the totals table and a line for nodes without devices.
pub fn render_report(report: &DeviceReport, paint: Paint) -> String {
    let mut out = String::new();
    if report.nodes.is_empty() {
        out.push_str("No node advertises rbln, furiosa or gpu devices (under the configured resource names).\n");
    } else {
        let mut t = Table::new(&[
            "node",
            "health",
            "type",
            "resource",
            "capacity",
            "allocatable",
            "in use",
            "free",
        ]);
        for r in &report.nodes {
            t.push(vec![
                r.node.clone().into(),
                r.health.cell(),
                r.device_type.to_string().into(),
                r.resource_name.clone().into(),
                r.capacity.to_string().into(),
                r.allocatable.to_string().into(),
                r.in_use.to_string().into(),
                free_cell(r.free, r.allocatable),
            ]);
        }
        out.push_str(&t.render(paint));
        out.push('\n');
        let mut t = Table::new(&[
            "type",
            "resource",
            "nodes",
            "capacity",
            "allocatable",
            "in use",
            "free",
            "schedulable free",
        ]);
        for r in &report.totals {
            t.push(vec![
                r.device_type.to_string().into(),
                r.resource_name.clone().into(),
                r.nodes.to_string().into(),
                r.capacity.to_string().into(),
                r.allocatable.to_string().into(),
                r.in_use.to_string().into(),
                free_cell(r.free, r.allocatable),
                free_cell(r.schedulable_free, r.allocatable),
            ]);
        }
        out.push_str(&t.render(paint));
    }
    if !report.nodes_without_devices.is_empty() {
        let _ = writeln!(
            out,
            "\n{} node(s) without accelerators (cpu only).",
            report.nodes_without_devices.len()
        );
    }
    out
}

pub async fn run(client: Client, args: &DevicesArgs, paint: Paint) -> Result<()> {
    let config = args.config.load()?;
    let nodes = Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(Error::kube("list nodes"))?;
    let pods = Api::<Pod>::all(client)
        .list(&ListParams::default().fields("status.phase!=Succeeded,status.phase!=Failed"))
        .await
        .map_err(Error::kube("list pods in all namespaces"))?;
    let report = device_report(&nodes.items, &pods.items, &config);
    let text = match args.output {
        Some(f @ (OutputFormat::Json | OutputFormat::Yaml)) => {
            output::encode(&output::data_value(&report)?, f)?
        }
        _ => render_report(&report, paint),
    };
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(text.as_bytes())?;
    stdout.flush()?;
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;

    pub fn node(name: &str, resources: &[(&str, i64)], ready: bool, cordoned: bool) -> Node {
        let mut alloc = serde_json::Map::new();
        alloc.insert("cpu".into(), json!("32"));
        for (r, n) in resources {
            alloc.insert((*r).into(), json!(n.to_string()));
        }
        serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {"unschedulable": cordoned},
            "status": {
                "capacity": alloc,
                "allocatable": alloc,
                "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]
            }
        }))
        .unwrap()
    }

    pub fn pod_on(node: &str, resource: &str, n: i64, phase: &str) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": format!("p-{node}-{n}")},
            "spec": {"nodeName": node, "containers": [{"name": "c", "resources": {"limits": {resource: n.to_string()}}}]},
            "status": {"phase": phase}
        }))
        .unwrap()
    }

    #[test]
    fn free_is_allocatable_minus_in_use_and_totals_count_only_schedulable_nodes() {
        let nodes = [
            node(
                "atom-1",
                &[("rebellions.ai/ATOM", 4), ("nvidia.com/gpu", 2)],
                true,
                false,
            ),
            node("gpu-1", &[("nvidia.com/gpu", 8)], false, false),
            node("rngd-1", &[("furiosa.ai/rngd", 2)], true, true),
            node("plain", &[], true, false),
        ];
        let pods = [
            pod_on("atom-1", "rebellions.ai/ATOM", 3, "Running"),
            pod_on("atom-1", "nvidia.com/gpu", 2, "Succeeded"),
            pod_on("gpu-1", "nvidia.com/gpu", 1, "Pending"),
        ];
        let report = device_report(&nodes, &pods, &OperatorConfig::default());
        assert_eq!(report.nodes_without_devices, ["plain"]);
        assert_eq!(
            render_report(&report, Paint::Plain),
            "\
NODE     HEALTH                     TYPE      RESOURCE             CAPACITY   ALLOCATABLE   IN USE   FREE
atom-1   Ready                      rbln      rebellions.ai/ATOM   4          4             3        1
atom-1   Ready                      gpu       nvidia.com/gpu       2          2             0        2
gpu-1    NotReady                   gpu       nvidia.com/gpu       8          8             1        7
rngd-1   Ready,SchedulingDisabled   furiosa   furiosa.ai/rngd      2          2             0        2

TYPE      RESOURCE             NODES   CAPACITY   ALLOCATABLE   IN USE   FREE   SCHEDULABLE FREE
rbln      rebellions.ai/ATOM   1       4          4             3        1      1
furiosa   furiosa.ai/rngd      1       2          2             0        2      0
gpu       nvidia.com/gpu       2       10         10            1        9      2

1 node(s) without accelerators (cpu only).
"
        );
    }

    #[test]
    fn configured_resource_names_decide_what_counts() {
        let nodes = [node(
            "n",
            &[("rebellions.ai/npu", 2), ("rebellions.ai/ATOM", 1)],
            true,
            false,
        )];
        let config = OperatorConfig::load(&rm_operator::config::Overrides {
            resource_names: vec![(DeviceType::Rbln, "rebellions.ai/npu".into())],
            ..Default::default()
        })
        .unwrap();
        let report = device_report(&nodes, &[], &config);
        assert_eq!(report.nodes.len(), 1);
        assert_eq!(report.nodes[0].resource_name, "rebellions.ai/npu");
        assert_eq!(report.totals[0].schedulable_free, 2);
    }
}
