//! Free device capacity of the cluster, per node and device type:
//! node allocatable of the resource minus the requests of the non-terminated
//! pods bound to that node. `from_cluster` is a pure function of nodes and
//! pods (for `kubectl inference`); the operator's own view, which also counts
//! what is promised but not bound yet, comes from `ledger`.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Node, Pod, ResourceRequirements};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use rm_crds::DeviceType;

use crate::config::OperatorConfig;

/// Capacity of one schedulable node.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NodeCapacity {
    pub name: String,
    pub allocatable: BTreeMap<DeviceType, i64>,
    pub free: BTreeMap<DeviceType, i64>,
    /// Pods the node can still take (its `pods` allocatable minus its
    /// pods); `None` when not tracked.
    pub pod_room: Option<i64>,
    /// How many nodes this entry stands for: 1 for a node; the ledger's
    /// aggregate view counts nodes of equal room as one entry (and takes
    /// one out with -1).
    pub weight: i64,
}

/// Free devices on every schedulable node.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CapacitySnapshot {
    pub nodes: Vec<NodeCapacity>,
    /// Devices that pods not bound to a node yet will take somewhere (other
    /// tenants' queued pods): they come off the total.
    pub claimed_unbound: BTreeMap<DeviceType, i64>,
}

impl CapacitySnapshot {
    /// Builds the snapshot. Nodes that are cordoned or not Ready hold no
    /// capacity: the scheduler would not place a replica there.
    pub fn from_cluster<'a>(
        nodes: impl IntoIterator<Item = &'a Node>,
        pods: impl IntoIterator<Item = &'a Pod>,
        config: &OperatorConfig,
    ) -> Self {
        let mut by_name: BTreeMap<String, NodeCapacity> = nodes
            .into_iter()
            .filter(|n| is_schedulable(n))
            .filter_map(|n| {
                let name = n.metadata.name.clone()?;
                let allocatable = node_devices(n, config);
                Some((
                    name.clone(),
                    NodeCapacity {
                        name,
                        free: allocatable.clone(),
                        allocatable,
                        pod_room: None,
                        weight: 1,
                    },
                ))
            })
            .collect();
        for pod in pods {
            if is_terminated(pod) {
                continue;
            }
            let Some(node) = pod
                .spec
                .as_ref()
                .and_then(|s| s.node_name.as_ref())
                .and_then(|n| by_name.get_mut(n))
            else {
                continue;
            };
            for (t, used) in pod_device_requests(pod, config) {
                if let Some(free) = node.free.get_mut(&t) {
                    *free -= used;
                }
            }
        }
        for node in by_name.values_mut() {
            // More requested than offered (a device went away under a
            // running pod): the node is full, no more.
            for free in node.free.values_mut() {
                *free = (*free).max(0);
            }
        }
        CapacitySnapshot {
            nodes: by_name.into_values().collect(),
            claimed_unbound: BTreeMap::new(),
        }
    }

    /// Replicas of `per_replica` devices each that fit, each on one node,
    /// after the devices queued pods will take (counted as whole replicas).
    pub fn replicas_that_fit(&self, t: DeviceType, per_replica: u32) -> u32 {
        let per = i64::from(per_replica.max(1));
        let on_nodes: i64 = self
            .nodes
            .iter()
            .map(|n| {
                // A node's free count is negative where promises assumed
                // more replicas than the scheduler left room for (it put
                // a pod elsewhere): those replicas go to other nodes, so
                // the shortfall counts against the total.
                let by_devices = n.free.get(&t).copied().unwrap_or(0).div_euclid(per);
                n.weight
                    * n.pod_room
                        .map_or(by_devices, |room| by_devices.min(room.max(0)))
            })
            .sum();
        let queued = self.claimed_unbound.get(&t).copied().unwrap_or(0).max(0);
        let total = (on_nodes - whole_replicas(queued, per)).max(0);
        u32::try_from(total).unwrap_or(u32::MAX)
    }

    /// Free devices of a type, over all nodes, less what queued pods take.
    pub fn free_devices(&self, t: DeviceType) -> i64 {
        let on_nodes: i64 = self
            .nodes
            .iter()
            .map(|n| n.weight * n.free.get(&t).copied().unwrap_or(0))
            .sum();
        (on_nodes - self.claimed_unbound.get(&t).copied().unwrap_or(0)).max(0)
    }

    /// Nodes that have the type at all.
    pub fn nodes_with(&self, t: DeviceType) -> usize {
        self.nodes
            .iter()
            .filter(|n| n.allocatable.contains_key(&t))
            .map(|n| n.weight)
            .sum::<i64>()
            .try_into()
            .unwrap_or(0)
    }
}

/// Replicas of `per` devices that `devices` amount to, rounded up.
pub(crate) fn whole_replicas(devices: i64, per: i64) -> i64 {
    let per = per.max(1);
    (devices.max(0) + per - 1) / per
}

/// Devices of each type the node offers (its allocatable), types with none
/// left out.
pub fn node_devices(node: &Node, config: &OperatorConfig) -> BTreeMap<DeviceType, i64> {
    let Some(alloc) = node.status.as_ref().and_then(|s| s.allocatable.as_ref()) else {
        return BTreeMap::new();
    };
    config
        .resource_names
        .iter()
        .filter_map(|(t, r)| Some((*t, quantity_count(alloc.get(r)?))))
        .filter(|(_, n)| *n > 0)
        .collect()
}

/// Pods the node takes at most (its `pods` allocatable), if it says.
pub fn node_pod_slots(node: &Node) -> Option<i64> {
    node.status
        .as_ref()?
        .allocatable
        .as_ref()?
        .get("pods")
        .map(quantity_count)
        .filter(|n| *n > 0)
}

pub(crate) fn is_schedulable(node: &Node) -> bool {
    let cordoned = node
        .spec
        .as_ref()
        .and_then(|s| s.unschedulable)
        .unwrap_or(false);
    let ready = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    !cordoned && ready
}

pub(crate) fn is_terminated(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

/// Devices a pod holds per type: the larger of the sum over its containers
/// and the largest init container (the scheduler's effective request).
pub fn pod_device_requests(pod: &Pod, config: &OperatorConfig) -> BTreeMap<DeviceType, i64> {
    let mut out = BTreeMap::new();
    let Some(spec) = pod.spec.as_ref() else {
        return out;
    };
    for (t, resource) in &config.resource_names {
        let sum: i64 = spec
            .containers
            .iter()
            .map(|c| container_request(c.resources.as_ref(), resource))
            .sum();
        let init_max = spec
            .init_containers
            .iter()
            .flatten()
            .map(|c| container_request(c.resources.as_ref(), resource))
            .max()
            .unwrap_or(0);
        let n = sum.max(init_max);
        if n > 0 {
            out.insert(*t, n);
        }
    }
    out
}

/// Extended resources are requested through limits (requests default to
/// them), so take the request if set, else the limit.
fn container_request(res: Option<&ResourceRequirements>, resource: &str) -> i64 {
    let Some(res) = res else { return 0 };
    res.requests
        .as_ref()
        .and_then(|r| r.get(resource))
        .or_else(|| res.limits.as_ref().and_then(|l| l.get(resource)))
        .map(quantity_count)
        .unwrap_or(0)
}

/// Extended resources are whole numbers; anything else counts as zero.
pub(crate) fn quantity_count(q: &Quantity) -> i64 {
    q.0.trim().parse().unwrap_or(0)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;

    pub fn node(name: &str, resources: &[(&str, i64)]) -> Node {
        let mut alloc = serde_json::Map::new();
        alloc.insert("cpu".into(), json!("32"));
        for (r, n) in resources {
            alloc.insert((*r).into(), json!(n.to_string()));
        }
        serde_json::from_value(json!({
            "metadata": {"name": name},
            "status": {
                "allocatable": alloc,
                "conditions": [{"type": "Ready", "status": "True"}]
            }
        }))
        .unwrap()
    }

    pub fn pod_on(node: &str, resource: &str, n: i64, phase: &str) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": format!("p-{node}-{n}")},
            "spec": {
                "nodeName": node,
                "containers": [{"name": "c", "resources": {"limits": {resource: n.to_string()}}}]
            },
            "status": {"phase": phase}
        }))
        .unwrap()
    }

    #[test]
    fn free_is_allocatable_minus_running_requests() {
        let config = OperatorConfig::default();
        let nodes = [
            node("a", &[("rebellions.ai/ATOM", 4), ("nvidia.com/gpu", 2)]),
            node("b", &[("rebellions.ai/ATOM", 2)]),
        ];
        let pods = [
            pod_on("a", "rebellions.ai/ATOM", 3, "Running"),
            pod_on("a", "nvidia.com/gpu", 2, "Succeeded"),
            pod_on("b", "rebellions.ai/ATOM", 1, "Pending"),
            pod_on("gone", "rebellions.ai/ATOM", 1, "Running"),
        ];
        let snap = CapacitySnapshot::from_cluster(&nodes, &pods, &config);
        assert_eq!(snap.free_devices(DeviceType::Rbln), 1 + 1);
        assert_eq!(
            snap.free_devices(DeviceType::Gpu),
            2,
            "finished pods free their devices"
        );
        assert_eq!(snap.replicas_that_fit(DeviceType::Rbln, 1), 2);
        assert_eq!(
            snap.replicas_that_fit(DeviceType::Rbln, 2),
            0,
            "one node per replica"
        );
        assert_eq!(snap.nodes_with(DeviceType::Furiosa), 0);
    }

    #[test]
    fn cordoned_and_not_ready_nodes_hold_nothing() {
        let config = OperatorConfig::default();
        let mut cordoned = node("a", &[("nvidia.com/gpu", 8)]);
        cordoned.spec = Some(serde_json::from_value(json!({"unschedulable": true})).unwrap());
        let mut not_ready = node("b", &[("nvidia.com/gpu", 8)]);
        not_ready.status.as_mut().unwrap().conditions = Some(vec![
            serde_json::from_value(json!({"type": "Ready", "status": "False"})).unwrap(),
        ]);
        let snap = CapacitySnapshot::from_cluster(&[cordoned, not_ready], &[], &config);
        assert_eq!(snap.free_devices(DeviceType::Gpu), 0);
    }

    #[test]
    fn init_containers_count_by_their_maximum() {
        let config = OperatorConfig::default();
        let pod: Pod = serde_json::from_value(json!({
            "spec": {
                "initContainers": [
                    {"name": "i1", "resources": {"limits": {"nvidia.com/gpu": "3"}}},
                    {"name": "i2", "resources": {"limits": {"nvidia.com/gpu": "1"}}}
                ],
                "containers": [
                    {"name": "a", "resources": {"requests": {"nvidia.com/gpu": "1"}, "limits": {"nvidia.com/gpu": "1"}}},
                    {"name": "b", "resources": {"limits": {"nvidia.com/gpu": "1"}}}
                ]
            }
        }))
        .unwrap();
        assert_eq!(pod_device_requests(&pod, &config)[&DeviceType::Gpu], 3);
    }
}
