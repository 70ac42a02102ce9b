//! Which nodes a workload's pods may land on, as the scheduler decides it:
//! the template's `nodeSelector`, its required node affinity, and the
//! taints it does not tolerate. Preferred affinity and inter-pod affinity
//! only rank nodes; they never make one unusable, so they are left out.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Node, NodeSelectorRequirement, NodeSelectorTerm, PodSpec, Taint, Toleration,
};

/// The node filters of one pod template, kept in the form they are checked.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NodeConstraints {
    node_selector: BTreeMap<String, String>,
    /// Required node affinity: a node must match one term (ORed); `None`
    /// when the template has none.
    required_terms: Option<Vec<NodeSelectorTerm>>,
    tolerations: Vec<Toleration>,
    /// The constraints in one canonical string (empty when there are none):
    /// templates with equal constraints share one capacity index.
    key: String,
}

/// Why a node is not usable for a template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mismatch {
    NodeSelector,
    Affinity,
    Taint(String),
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Mismatch::NodeSelector => f.write_str("the template's nodeSelector"),
            Mismatch::Affinity => f.write_str("the template's required node affinity"),
            Mismatch::Taint(key) => write!(f, "a taint the template does not tolerate ({key})"),
        }
    }
}

/// The parts of a node the constraints read.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NodeFacts {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// Taints with effect NoSchedule or NoExecute (PreferNoSchedule only
    /// ranks).
    pub taints: Vec<Taint>,
}

impl NodeFacts {
    pub fn of(node: &Node) -> Self {
        NodeFacts {
            name: node.metadata.name.clone().unwrap_or_default(),
            labels: node.metadata.labels.clone().unwrap_or_default(),
            taints: node
                .spec
                .as_ref()
                .and_then(|s| s.taints.as_ref())
                .map(|ts| {
                    ts.iter()
                        .filter(|t| t.effect == "NoSchedule" || t.effect == "NoExecute")
                        .cloned()
                        .collect()
                })
                .unwrap_or_default(),
        }
    }
}

impl NodeConstraints {
    pub fn of(spec: Option<&PodSpec>) -> Self {
        let Some(spec) = spec else {
            return Self::default();
        };
        let mut c = NodeConstraints {
            node_selector: spec.node_selector.clone().unwrap_or_default(),
            required_terms: spec
                .affinity
                .as_ref()
                .and_then(|a| a.node_affinity.as_ref())
                .and_then(|a| {
                    a.required_during_scheduling_ignored_during_execution
                        .as_ref()
                })
                .map(|s| s.node_selector_terms.clone()),
            tolerations: spec.tolerations.clone().unwrap_or_default(),
            key: String::new(),
        };
        if !c.is_unconstrained() {
            // Debug output of ordered maps and plain structs is canonical.
            c.key = format!(
                "{:?}|{:?}|{:?}",
                c.node_selector, c.required_terms, c.tolerations
            );
        }
        c
    }

    /// Equal for equal constraints; empty for none.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// No selector, required affinity or toleration: the template may use
    /// every untainted node.
    fn is_unconstrained(&self) -> bool {
        self.node_selector.is_empty()
            && self.required_terms.is_none()
            && self.tolerations.is_empty()
    }

    /// `None` when a pod of this template may be scheduled on the node.
    pub fn check(&self, node: &NodeFacts) -> Option<Mismatch> {
        if !self
            .node_selector
            .iter()
            .all(|(k, v)| node.labels.get(k) == Some(v))
        {
            return Some(Mismatch::NodeSelector);
        }
        if let Some(terms) = &self.required_terms
            && !terms.iter().any(|t| term_matches(t, node))
        {
            return Some(Mismatch::Affinity);
        }
        node.taints
            .iter()
            .find(|taint| !self.tolerations.iter().any(|t| tolerates(t, taint)))
            .map(|taint| Mismatch::Taint(taint.key.clone()))
    }
}

/// A term matches when all its expressions and fields do; an empty term
/// matches nothing (the scheduler's rule).
fn term_matches(term: &NodeSelectorTerm, node: &NodeFacts) -> bool {
    let exprs = term.match_expressions.as_deref().unwrap_or_default();
    let fields = term.match_fields.as_deref().unwrap_or_default();
    if exprs.is_empty() && fields.is_empty() {
        return false;
    }
    exprs
        .iter()
        .all(|r| requirement_matches(r, node.labels.get(&r.key).map(String::as_str)))
        && fields.iter().all(|r| {
            // `metadata.name` is the only field the scheduler supports.
            r.key == "metadata.name" && requirement_matches(r, Some(node.name.as_str()))
        })
}

fn requirement_matches(r: &NodeSelectorRequirement, value: Option<&str>) -> bool {
    let values = r.values.as_deref().unwrap_or_default();
    let number = |s: &str| s.parse::<i64>().ok();
    match r.operator.as_str() {
        "In" => value.is_some_and(|v| values.iter().any(|x| x == v)),
        "NotIn" => value.is_none_or(|v| !values.iter().any(|x| x == v)),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        "Gt" | "Lt" => {
            let (Some(v), Some(bound)) = (
                value.and_then(number),
                values.first().and_then(|b| number(b)),
            ) else {
                return false;
            };
            if r.operator == "Gt" {
                v > bound
            } else {
                v < bound
            }
        }
        _ => false,
    }
}

/// The scheduler's toleration rule: same key (or an empty key with
/// `Exists`, which tolerates everything), same effect unless the toleration
/// leaves it empty, and an equal value for `Equal` (the default operator).
fn tolerates(t: &Toleration, taint: &Taint) -> bool {
    let effect_ok = t
        .effect
        .as_deref()
        .is_none_or(|e| e.is_empty() || e == taint.effect);
    let exists = t.operator.as_deref() == Some("Exists");
    let key = t.key.as_deref().unwrap_or_default();
    if key.is_empty() {
        return exists && effect_ok;
    }
    effect_ok
        && key == taint.key
        && (exists
            || t.value.as_deref().unwrap_or_default() == taint.value.as_deref().unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn facts(labels: &[(&str, &str)], taints: serde_json::Value) -> NodeFacts {
        let node: Node = serde_json::from_value(json!({
            "metadata": {
                "name": "n1",
                "labels": labels.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>()
            },
            "spec": {"taints": taints}
        }))
        .unwrap();
        NodeFacts::of(&node)
    }

    fn constraints(spec: serde_json::Value) -> NodeConstraints {
        let mut spec = spec;
        spec["containers"] = json!([{"name": "c"}]);
        NodeConstraints::of(Some(&serde_json::from_value(spec).unwrap()))
    }

    #[test]
    fn no_template_constraints_admit_every_untainted_node() {
        let c = NodeConstraints::of(None);
        assert_eq!(c.check(&facts(&[("pool", "a")], json!([]))), None);
        assert_eq!(
            c.check(&facts(&[], json!([{"key": "gpu", "effect": "NoSchedule"}]))),
            Some(Mismatch::Taint("gpu".into()))
        );
        assert_eq!(
            c.check(&facts(
                &[],
                json!([{"key": "soft", "effect": "PreferNoSchedule"}])
            )),
            None,
            "PreferNoSchedule only ranks"
        );
    }

    #[test]
    fn node_selector_needs_every_label() {
        let c = constraints(json!({"nodeSelector": {"pool": "gpu", "zone": "a"}}));
        assert_eq!(
            c.check(&facts(&[("pool", "gpu"), ("zone", "a")], json!([]))),
            None
        );
        assert_eq!(
            c.check(&facts(&[("pool", "gpu")], json!([]))),
            Some(Mismatch::NodeSelector)
        );
    }

    #[test]
    fn required_affinity_terms_are_ored_and_expressions_anded() {
        let c = constraints(
            json!({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [
                        {"key": "pool", "operator": "In", "values": ["gpu", "npu"]},
                        {"key": "cores", "operator": "Gt", "values": ["8"]}
                    ]},
                    {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["special"]}]}
                ]
            }}}}),
        );
        assert_eq!(
            c.check(&facts(&[("pool", "npu"), ("cores", "16")], json!([]))),
            None
        );
        assert_eq!(
            c.check(&facts(&[("pool", "npu"), ("cores", "4")], json!([]))),
            Some(Mismatch::Affinity)
        );
        assert_eq!(
            c.check(&facts(&[("pool", "cpu"), ("cores", "16")], json!([]))),
            Some(Mismatch::Affinity)
        );
        let not_in = constraints(
            json!({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": [
                    {"key": "pool", "operator": "NotIn", "values": ["cpu"]},
                    {"key": "spot", "operator": "DoesNotExist"}
                ]}]
            }}}}),
        );
        assert_eq!(
            not_in.check(&facts(&[], json!([]))),
            None,
            "NotIn matches a missing label"
        );
        assert_eq!(
            not_in.check(&facts(&[("spot", "true")], json!([]))),
            Some(Mismatch::Affinity)
        );
    }

    #[test]
    fn tolerations_follow_the_schedulers_rules() {
        let taint = json!([{"key": "dedicated", "value": "inference", "effect": "NoSchedule"}]);
        let node = facts(&[], taint);
        for (toleration, ok) in [
            (
                json!({"key": "dedicated", "value": "inference", "effect": "NoSchedule"}),
                true,
            ),
            (json!({"key": "dedicated", "operator": "Exists"}), true),
            (json!({"operator": "Exists"}), true),
            (json!({"key": "dedicated", "value": "training"}), false),
            (
                json!({"key": "dedicated", "operator": "Exists", "effect": "NoExecute"}),
                false,
            ),
            (json!({"key": "other", "operator": "Exists"}), false),
        ] {
            let c = constraints(json!({"tolerations": [toleration.clone()]}));
            assert_eq!(c.check(&node).is_none(), ok, "{toleration}");
        }
    }
}
