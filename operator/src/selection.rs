//! Device selection: which device type a workload runs on, and why.
//!
//! A pure function of the workload spec, the cluster configuration, a
//! capacity snapshot and where the workload runs now. The rules:
//! 1. An explicit device (`rbln`, `gpu:0`, ...) is taken as asked; capacity is
//!    only reported.
//! 2. Once replicas run on a type they stay there (no flapping) unless the
//!    device part of the spec changes. Pods unschedulable longer than the
//!    grace period move the workload only when none of its replicas is
//!    ready there (ready replicas never move: scaling up does not uproot
//!    them) and another type has room for all of them; then it moves there.
//! 3. Otherwise walk the priority list (the workload's `devicePriority`, else
//!    the cluster's): the first type with room for every replica wins; if none
//!    has, the accelerator with room for the most (`PartialCapacity`; ties go
//!    to the higher priority); if none has room for one, `cpu` when listed;
//!    else nothing (`NoCapacity`: wait and pick again when capacity changes).
//!    `cpu` listed last is the fallback of step 3; listed earlier it is a
//!    preference like any other type (it always has room).
//!
//! Why this converges: a workload moves only off a type where all its pods
//! are stuck, only to a type with room for all its replicas in the
//! operator's ledger (which counts every promise not bound yet), and its
//! promise is recorded before any other decision reads capacity. So the
//! type it moves to takes all its pods, and nothing makes it move again
//! unless capacity the operator cannot see (another scheduler's, or CPU and
//! memory requests) runs out.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::time::Duration;

use rm_crds::{DeviceRequest, DeviceType, InferenceWorkloadSpec};

use crate::capacity::CapacitySnapshot;
use crate::config::OperatorConfig;

/// How one candidate type looked when the choice was made.
#[derive(Clone, Debug, PartialEq)]
pub struct Candidate {
    pub device_type: DeviceType,
    /// Free devices over all nodes (`None` for cpu: no device resource).
    pub free_devices: Option<i64>,
    /// Replicas that fit (`None` for cpu: unbounded).
    pub replicas_fit: Option<u32>,
}

impl Candidate {
    fn holds(&self, replicas: u32) -> bool {
        self.replicas_fit.is_none_or(|f| f >= replicas)
    }
}

/// Why the chosen type was chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// First type in priority order with room for all replicas.
    Full,
    /// No type holds all replicas: the highest-priority one that holds some.
    Partial,
    /// No accelerator has room for a replica: `cpu` as the fallback.
    CpuFallback,
    /// The spec names the device type.
    Explicit,
    /// The replicas already run on this type.
    Kept,
    /// Pods were unschedulable too long on `from`; moved here.
    Reselected { from: DeviceType },
    /// `placement: spread`: replicas over several types, this the first.
    Spread,
    /// `moveUp`: room for every replica freed on this higher type.
    MovedUp { from: DeviceType },
}

impl Decision {
    /// The `DeviceSelected` condition reason.
    pub fn reason(self) -> &'static str {
        match self {
            Decision::Full => "Selected",
            Decision::Partial => "PartialCapacity",
            Decision::CpuFallback => "CpuFallback",
            Decision::Explicit => "Explicit",
            Decision::Kept => "Kept",
            Decision::Reselected { .. } => "Reselected",
            Decision::Spread => "Spread",
            Decision::MovedUp { .. } => "MovedUp",
        }
    }
}

/// The device chosen for a workload.
#[derive(Clone, Debug, PartialEq)]
pub struct Chosen {
    pub device_type: DeviceType,
    pub decision: Decision,
    /// Value of `RM_DEVICE` in the pods: the type, with the index when the
    /// spec gave one.
    pub device_string: String,
}

/// Why no device type was chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoChoice {
    /// Nothing listed has room: wait for capacity.
    NoCapacity,
    /// The request and the priority list exclude each other.
    NoCandidate,
    /// `spec.device` does not parse (the CRD's validation normally stops it).
    InvalidDevice,
}

impl NoChoice {
    pub fn reason(self) -> &'static str {
        match self {
            NoChoice::NoCapacity => "NoCapacity",
            NoChoice::NoCandidate => "NoCandidate",
            NoChoice::InvalidDevice => "InvalidDevice",
        }
    }
}

/// The outcome of a selection, with the explanation for status and Events.
#[derive(Clone, Debug, PartialEq)]
pub struct Selection {
    pub result: Result<Chosen, NoChoice>,
    /// The priority list walked, after the request's filter.
    pub order: Vec<DeviceType>,
    pub candidates: Vec<Candidate>,
    /// One or two sentences a person can act on.
    pub message: String,
}

impl Selection {
    pub fn chosen(&self) -> Option<&Chosen> {
        self.result.as_ref().ok()
    }

    /// The condition reason: the decision's, or why there is none.
    pub fn reason(&self) -> &'static str {
        match &self.result {
            Ok(c) => c.decision.reason(),
            Err(n) => n.reason(),
        }
    }
}

/// Where the workload's replicas run now.
#[derive(Clone, Debug, PartialEq)]
pub struct Current {
    pub device_type: DeviceType,
    /// The device fields of the spec are those the placement was made for.
    pub same_basis: bool,
    /// How long the oldest unschedulable pod has been unschedulable.
    pub unschedulable_for: Option<Duration>,
    /// Replicas ready on this type.
    pub ready: u32,
}

/// The part of the spec a placement depends on; a change means reselect.
pub fn selection_basis(spec: &InferenceWorkloadSpec) -> String {
    let request = spec
        .device_request()
        .map(|r| r.to_string())
        .unwrap_or_else(|_| spec.device.clone());
    let priority = spec
        .device_priority
        .as_ref()
        .map(|p| p.iter().map(|t| t.as_str()).collect::<Vec<_>>().join(","))
        .unwrap_or_else(|| "cluster".into());
    format!("{request};{priority};{}", spec.devices_per_replica)
}

pub fn select_device(
    spec: &InferenceWorkloadSpec,
    config: &OperatorConfig,
    capacity: &CapacitySnapshot,
    current: Option<&Current>,
) -> Selection {
    let request = match spec.device_request() {
        Ok(r) => r,
        Err(e) => {
            return Selection {
                result: Err(NoChoice::InvalidDevice),
                order: vec![],
                candidates: vec![],
                message: format!("spec.device: {e}"),
            };
        }
    };
    let replicas = u32::try_from(spec.replicas.max(0)).unwrap_or(0);
    let per_replica = spec.devices_per_replica;
    let base_order = spec
        .device_priority
        .clone()
        .unwrap_or_else(|| config.priority_order());
    let order: Vec<DeviceType> = match request {
        DeviceRequest::Exact { device_type, .. } => vec![device_type],
        _ => {
            let allowed = request.candidate_types();
            base_order
                .iter()
                .copied()
                .filter(|t| allowed.contains(t))
                .collect()
        }
    };
    let candidates: Vec<Candidate> = order
        .iter()
        .map(|t| candidate(*t, config, capacity, per_replica))
        .collect();
    let free = describe_candidates(&candidates, per_replica);
    let device_string = |t: DeviceType| match request.index() {
        Some(i) => format!("{t}:{i}"),
        None => t.to_string(),
    };
    let chosen = |t: DeviceType, decision: Decision| Chosen {
        device_type: t,
        decision,
        device_string: device_string(t),
    };

    if order.is_empty() {
        let listed = base_order
            .iter()
            .map(|t| t.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        return Selection {
            result: Err(NoChoice::NoCandidate),
            order,
            candidates,
            message: format!(
                "device {request} allows none of the listed types [{listed}]; add an NPU type to spec.devicePriority or change spec.device"
            ),
        };
    }

    if let DeviceRequest::Exact { device_type, .. } = request {
        let c = &candidates[0];
        let room = if c.holds(replicas) {
            format!("room for all {replicas} replicas")
        } else {
            format!(
                "room for {} of {replicas} replicas; the rest stay Pending until {} frees up",
                c.replicas_fit.unwrap_or(0),
                config.resource_name(device_type).unwrap_or("capacity")
            )
        };
        return Selection {
            result: Ok(chosen(device_type, Decision::Explicit)),
            message: format!("device {request} requested explicitly; {free}; {room}"),
            order,
            candidates,
        };
    }

    let mut excluded = None;
    if let Some(cur) = current.filter(|c| c.same_basis && order.contains(&c.device_type)) {
        match cur.unschedulable_for {
            Some(stuck) if stuck > config.unschedulable_grace && cur.ready > 0 => {
                return Selection {
                    result: Ok(chosen(cur.device_type, Decision::Kept)),
                    message: format!(
                        "kept {}: {} replica(s) are ready there and do not move; pods unschedulable for {}s wait there for room; {free}",
                        cur.device_type,
                        cur.ready,
                        stuck.as_secs()
                    ),
                    order,
                    candidates,
                };
            }
            Some(stuck) if stuck > config.unschedulable_grace => excluded = Some((cur, stuck)),
            _ => {
                // "Kept" only when staying put differs from what the walk
                // would pick now; otherwise the walk's own reason holds.
                let all: Vec<&Candidate> = candidates.iter().collect();
                let now = walk(&all, replicas);
                let rank = |t: DeviceType| order.iter().position(|o| *o == t);
                if let Some((t, Decision::Full)) = now
                    && spec.move_up
                    && cur.unschedulable_for.is_none()
                    && cur.ready >= replicas
                    && rank(t) < rank(cur.device_type)
                {
                    return Selection {
                        result: Ok(chosen(
                            t,
                            Decision::MovedUp {
                                from: cur.device_type,
                            },
                        )),
                        message: format!(
                            "moving up from {} to {t} (spec.moveUp): {t} has room for all {replicas} replicas; one replica at a time, each new one Ready before an old one goes; {free}",
                            cur.device_type
                        ),
                        order,
                        candidates,
                    };
                }
                if now.is_none_or(|(t, _)| t != cur.device_type) {
                    let would = now
                        .map(|(t, _)| t.to_string())
                        .unwrap_or_else(|| "nothing".into());
                    return Selection {
                        result: Ok(chosen(cur.device_type, Decision::Kept)),
                        message: format!(
                            "kept {}, where the replicas run, although {would} would be chosen now: running replicas do not move while the device spec is unchanged; {free}",
                            cur.device_type
                        ),
                        order,
                        candidates,
                    };
                }
            }
        }
    }

    let walked: Vec<&Candidate> = candidates
        .iter()
        .filter(|c| excluded.is_none_or(|(cur, _)| c.device_type != cur.device_type))
        .collect();
    let listed = order
        .iter()
        .map(|t| t.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    let walk = walk(&walked, replicas)
        // A move goes only where all replicas fit, never to partial room
        // (moving between partial rooms is what flaps).
        .filter(|(_, d)| excluded.is_none() || *d != Decision::Partial);

    let (result, why) = match (walk, excluded) {
        (Some((t, _)), Some((cur, stuck))) => (
            Ok(chosen(
                t,
                Decision::Reselected {
                    from: cur.device_type,
                },
            )),
            format!(
                "pods were unschedulable on {} for {}s (grace {}s); moved to {t}",
                cur.device_type,
                stuck.as_secs(),
                config.unschedulable_grace.as_secs()
            ),
        ),
        (None, Some((cur, stuck))) => (
            Ok(chosen(cur.device_type, Decision::Kept)),
            format!(
                "pods unschedulable on {} for {}s, but no other listed type has room for all {replicas} replicas; kept it",
                cur.device_type,
                stuck.as_secs()
            ),
        ),
        (Some((t, Decision::Full)), None) => (
            Ok(chosen(t, Decision::Full)),
            format!("chose {t}: first in [{listed}] with room for all {replicas} replicas"),
        ),
        (Some((t, Decision::Partial)), None) => (
            Ok(chosen(t, Decision::Partial)),
            format!(
                "chose {t}: no type has room for all {replicas} replicas; {t} has room for the most; the rest stay Pending there until devices free up"
            ),
        ),
        (Some((t, d)), None) => (
            Ok(chosen(t, d)),
            format!(
                "chose {t}: no accelerator in [{listed}] has room for a replica, cpu is the fallback"
            ),
        ),
        (None, None) => (
            Err(NoChoice::NoCapacity),
            format!(
                "no type in [{listed}] has room for a replica of {per_replica} device(s); waiting for capacity (add nodes, free devices, or widen spec.devicePriority)"
            ),
        ),
    };
    Selection {
        result,
        message: format!("{why}; {free}"),
        order,
        candidates,
    }
}

/// Replicas per type: one part with `placement: single`, one per type
/// with replicas with `spread`.
pub type Parts = Vec<(Chosen, u32)>;

/// Where a `spread` workload's replicas are now.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SpreadNow {
    /// Replicas each type's Deployment asks for.
    pub replicas: BTreeMap<DeviceType, u32>,
    /// Ready pods of each type.
    pub ready: BTreeMap<DeviceType, u32>,
    /// Types with pods unschedulable past the grace period, or failing.
    pub stuck: BTreeSet<DeviceType>,
}

/// A `moveUp` step of a `spread` workload, as its Deployments show it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum MoveStep {
    None,
    /// One replica more than wanted, not ready on `to`, above `from`.
    InFlight {
        from: DeviceType,
        to: DeviceType,
    },
}

impl SpreadNow {
    /// Every replica ready and none stuck.
    fn settled(&self, replicas: u32) -> bool {
        self.stuck.is_empty()
            && self.replicas.values().sum::<u32>() == replicas
            && self
                .replicas
                .iter()
                .all(|(t, n)| self.ready.get(t).copied().unwrap_or(0) >= *n)
    }

    /// A step in flight: exactly one replica more than `replicas`, the one
    /// type short of ready ones ranking above a lower type with replicas.
    fn move_step(&self, replicas: u32, order: &[DeviceType]) -> MoveStep {
        if self.replicas.values().sum::<u32>() != replicas + 1 {
            return MoveStep::None;
        }
        let short: Vec<DeviceType> = self
            .replicas
            .iter()
            .filter(|(t, n)| self.ready.get(t).copied().unwrap_or(0) < **n)
            .map(|(t, _)| *t)
            .collect();
        let rank = |t: DeviceType| order.iter().position(|o| *o == t);
        let [to] = short[..] else {
            return MoveStep::None;
        };
        let from = order
            .iter()
            .rev()
            .find(|t| self.replicas.get(t).copied().unwrap_or(0) > 0)
            .copied();
        match (from, rank(to)) {
            (Some(from), Some(r)) if rank(from).is_some_and(|f| f > r) => {
                MoveStep::InFlight { from, to }
            }
            _ => MoveStep::None,
        }
    }
}

/// `placement: spread`: as many replicas as fit on each type in priority
/// order. The replicas a type holds now (`current`) stay there, so scaling
/// up places only the new ones and nothing running moves; scaling down
/// removes from the lowest-priority type first. Replicas with room nowhere
/// go to `cpu` when it is the fallback, else wait (`unplaced`). An explicit
/// device is one type: the whole workload goes there, as with `single`.
pub fn select_spread(
    spec: &InferenceWorkloadSpec,
    config: &OperatorConfig,
    capacity: &CapacitySnapshot,
    now: &SpreadNow,
) -> (Selection, Parts, u32) {
    let current = &now.replicas;
    let base = select_device(spec, config, capacity, None);
    let replicas = u32::try_from(spec.replicas.max(0)).unwrap_or(0);
    let explicit = matches!(spec.device_request(), Ok(DeviceRequest::Exact { .. }));
    if explicit || base.result.is_err() && base.candidates.is_empty() {
        let parts = base
            .chosen()
            .map(|c| (c.clone(), replicas))
            .into_iter()
            .collect();
        return (base, parts, 0);
    }
    let cpu_is_fallback = base
        .candidates
        .last()
        .is_some_and(|c| c.device_type == DeviceType::Cpu);
    let mut counts: Vec<(DeviceType, u32)> = base
        .order
        .iter()
        .map(|t| (*t, current.get(t).copied().unwrap_or(0)))
        .collect();
    let mut total: u32 = counts.iter().map(|(_, n)| n).sum();
    // Scale down from the lowest priority up.
    for (_, n) in counts.iter_mut().rev() {
        let drop = (*n).min(total.saturating_sub(replicas));
        *n -= drop;
        total -= drop;
    }
    let rank = |t: DeviceType| base.order.iter().position(|o| *o == t);
    let mut moving = None;
    if spec.move_up
        && let MoveStep::InFlight { from, to } = now.move_step(replicas, &base.order)
    {
        counts = base
            .order
            .iter()
            .map(|t| (*t, current.get(t).copied().unwrap_or(0)))
            .collect();
        total = replicas;
        if now.stuck.contains(&to) {
            // The surge replica cannot run there: it goes, and the old
            // replicas stay.
            if let Some(i) = rank(to) {
                counts[i].1 = counts[i].1.saturating_sub(1);
            }
        } else {
            // Not ready yet: nothing goes.
            moving = Some((from, to));
        }
    }
    let mut need = replicas.saturating_sub(total);
    let last = base.candidates.len().saturating_sub(1);
    for (i, c) in base.candidates.iter().enumerate() {
        if need == 0 || (cpu_is_fallback && i == last) {
            break;
        }
        let n = &mut counts[i].1;
        // `replicas_fit` counts the workload's own replicas as room.
        let room = c.replicas_fit.map_or(need, |fit| fit.saturating_sub(*n));
        let add = room.min(need);
        *n += add;
        need -= add;
    }
    if need > 0 && cpu_is_fallback {
        counts[last].1 += need;
        need = 0;
    }
    // `moveUp`, one replica at a time: with every replica ready and none
    // stuck, one more on the highest type with room above the lowest type
    // that holds replicas. It is taken from there once it is ready.
    if spec.move_up && moving.is_none() && need == 0 && now.settled(replicas) {
        let lowest = counts.iter().rposition(|(_, n)| *n > 0);
        let higher = base
            .candidates
            .iter()
            .enumerate()
            .take(lowest.unwrap_or(0))
            .find(|(i, c)| c.replicas_fit.is_none_or(|fit| fit > counts[*i].1));
        if let (Some(low), Some((i, _))) = (lowest, higher) {
            counts[i].1 += 1;
            moving = Some((counts[low].0, counts[i].0));
        }
    }
    let device_string = |t: DeviceType| t.to_string();
    let parts: Parts = counts
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(t, n)| {
            (
                Chosen {
                    device_type: *t,
                    decision: Decision::Spread,
                    device_string: device_string(*t),
                },
                *n,
            )
        })
        .collect();
    let free = describe_candidates(&base.candidates, spec.devices_per_replica);
    let listed = base
        .order
        .iter()
        .map(|t| t.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    let split = parts
        .iter()
        .map(|(c, n)| format!("{} {n}", c.device_type))
        .collect::<Vec<_>>()
        .join(", ");
    let waiting = if need > 0 {
        format!("; {need} wait for capacity")
    } else {
        String::new()
    };
    let (result, message) = match (parts.first(), moving) {
        (Some((c, _)), Some((from, to))) => (
            Ok(Chosen {
                decision: Decision::MovedUp { from },
                ..c.clone()
            }),
            format!(
                "moving up one replica from {from} to {to} (spec.moveUp): {split}; the new replica is Ready before the old one goes; {free}"
            ),
        ),
        (Some((c, _)), None) => (
            Ok(c.clone()),
            format!(
                "spread {replicas} replicas over [{listed}] in that order: {split}{waiting}; running replicas stay where they are; {free}"
            ),
        ),
        (None, _) => (
            Err(NoChoice::NoCapacity),
            format!(
                "no type in [{listed}] has room for a replica of {} device(s); waiting for capacity (add nodes, free devices, or widen spec.devicePriority); {free}",
                spec.devices_per_replica
            ),
        ),
    };
    (
        Selection {
            result,
            order: base.order,
            candidates: base.candidates,
            message,
        },
        parts,
        need,
    )
}

/// Steps 3 of the module rules over `candidates` in priority order.
fn walk(candidates: &[&Candidate], replicas: u32) -> Option<(DeviceType, Decision)> {
    let cpu_is_fallback = candidates
        .last()
        .is_some_and(|c| c.device_type == DeviceType::Cpu);
    let accelerators = || {
        candidates
            .iter()
            .filter(|c| c.device_type != DeviceType::Cpu)
    };
    for (i, c) in candidates.iter().enumerate() {
        let is_fallback = cpu_is_fallback && i + 1 == candidates.len();
        if c.device_type == DeviceType::Cpu && is_fallback {
            break;
        }
        if c.holds(replicas) {
            return Some((c.device_type, Decision::Full));
        }
    }
    // The most room; `max_by_key` keeps the last maximum, so walk in
    // reverse for ties to go to the higher priority.
    if let Some(c) = accelerators()
        .filter(|c| c.replicas_fit.is_some_and(|f| f >= 1))
        .rev()
        .max_by_key(|c| c.replicas_fit)
    {
        return Some((c.device_type, Decision::Partial));
    }
    if cpu_is_fallback {
        return Some((DeviceType::Cpu, Decision::CpuFallback));
    }
    None
}

fn candidate(
    t: DeviceType,
    config: &OperatorConfig,
    capacity: &CapacitySnapshot,
    per_replica: u32,
) -> Candidate {
    if t == DeviceType::Cpu || config.resource_name(t).is_none() {
        return Candidate {
            device_type: t,
            free_devices: None,
            replicas_fit: None,
        };
    }
    Candidate {
        device_type: t,
        free_devices: Some(capacity.free_devices(t)),
        replicas_fit: Some(capacity.replicas_that_fit(t, per_replica)),
    }
}

fn describe_candidates(candidates: &[Candidate], per_replica: u32) -> String {
    let mut s = String::from("free:");
    for (i, c) in candidates.iter().enumerate() {
        let sep = if i == 0 { " " } else { ", " };
        match (c.free_devices, c.replicas_fit) {
            (Some(free), Some(fit)) => {
                let _ = write!(
                    s,
                    "{sep}{} {free} ({fit} replica(s) of {per_replica} fit)",
                    c.device_type
                );
            }
            _ => {
                let _ = write!(s, "{sep}{} unbounded", c.device_type);
            }
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capacity::tests::node;

    fn spec(device: &str, replicas: i32, priority: Option<&[DeviceType]>) -> InferenceWorkloadSpec {
        let mut s: InferenceWorkloadSpec = serde_json::from_value(serde_json::json!({
            "model": {"source": "gpt2"},
            "device": device,
            "replicas": replicas,
            "template": {"spec": {"containers": [{"name": "app"}]}}
        }))
        .unwrap();
        s.device_priority = priority.map(<[DeviceType]>::to_vec);
        s
    }

    fn snapshot(nodes: &[(&str, &[(&str, i64)])]) -> CapacitySnapshot {
        let nodes: Vec<_> = nodes.iter().map(|(n, r)| node(n, r)).collect();
        CapacitySnapshot::from_cluster(&nodes, &[], &OperatorConfig::default())
    }

    fn pick(spec: &InferenceWorkloadSpec, cap: &CapacitySnapshot) -> Selection {
        select_device(spec, &OperatorConfig::default(), cap, None)
    }

    fn chosen(sel: &Selection) -> (DeviceType, Decision) {
        let c = sel
            .chosen()
            .unwrap_or_else(|| panic!("nothing chosen: {}", sel.message));
        (c.device_type, c.decision)
    }

    const ATOM: &str = "rebellions.ai/ATOM";
    const RNGD: &str = "furiosa.ai/rngd";
    const GPU: &str = "nvidia.com/gpu";

    #[test]
    fn rbln_while_an_atom_node_has_room() {
        let cap = snapshot(&[("n", &[(ATOM, 4), (RNGD, 4), (GPU, 4)])]);
        let sel = pick(&spec("auto", 2, None), &cap);
        assert_eq!(chosen(&sel), (DeviceType::Rbln, Decision::Full));
        assert!(sel.message.contains("rbln 4"), "{}", sel.message);
    }

    #[test]
    fn atom_full_means_furiosa_then_gpu_then_cpu() {
        let cap = snapshot(&[("n", &[(ATOM, 0), (RNGD, 2), (GPU, 4)])]);
        assert_eq!(
            chosen(&pick(&spec("auto", 2, None), &cap)).0,
            DeviceType::Furiosa
        );
        let cap = snapshot(&[("n", &[(GPU, 4)])]);
        assert_eq!(
            chosen(&pick(&spec("auto", 2, None), &cap)).0,
            DeviceType::Gpu
        );
        let cap = snapshot(&[("n", &[])]);
        assert_eq!(
            chosen(&pick(&spec("auto", 2, None), &cap)),
            (DeviceType::Cpu, Decision::CpuFallback)
        );
    }

    #[test]
    fn partial_capacity_beats_the_cpu_fallback() {
        let cap = snapshot(&[("n", &[(GPU, 1)])]);
        let sel = pick(&spec("auto", 3, None), &cap);
        assert_eq!(chosen(&sel), (DeviceType::Gpu, Decision::Partial));
        assert_eq!(sel.reason(), "PartialCapacity");
    }

    #[test]
    fn no_capacity_without_cpu_means_pending() {
        let cap = snapshot(&[("n", &[(GPU, 0)])]);
        let config = OperatorConfig {
            cpu_fallback: false,
            ..OperatorConfig::default()
        };
        let sel = select_device(&spec("auto", 1, None), &config, &cap, None);
        assert_eq!(sel.result, Err(NoChoice::NoCapacity));
        assert!(
            sel.message.contains("waiting for capacity"),
            "{}",
            sel.message
        );
        let sel = pick(
            &spec("auto", 1, Some(&[DeviceType::Gpu, DeviceType::Rbln])),
            &cap,
        );
        assert_eq!(
            sel.result,
            Err(NoChoice::NoCapacity),
            "cpu not in the override"
        );
    }

    #[test]
    fn the_workload_priority_overrides_the_cluster() {
        let cap = snapshot(&[("n", &[(ATOM, 4), (RNGD, 4), (GPU, 4)])]);
        let sel = pick(
            &spec("auto", 1, Some(&[DeviceType::Gpu, DeviceType::Furiosa])),
            &cap,
        );
        assert_eq!(chosen(&sel).0, DeviceType::Gpu);
        assert_eq!(sel.order, [DeviceType::Gpu, DeviceType::Furiosa]);
        // cpu listed first is a preference, not a fallback.
        let sel = pick(
            &spec("auto", 1, Some(&[DeviceType::Cpu, DeviceType::Gpu])),
            &cap,
        );
        assert_eq!(chosen(&sel), (DeviceType::Cpu, Decision::Full));
    }

    #[test]
    fn an_explicit_device_skips_the_walk_but_reports_capacity() {
        let cap = snapshot(&[("n", &[(ATOM, 4), (GPU, 0)])]);
        let sel = pick(&spec("cuda:1", 2, None), &cap);
        let c = sel.chosen().unwrap();
        assert_eq!(
            (c.device_type, c.decision),
            (DeviceType::Gpu, Decision::Explicit)
        );
        assert_eq!(c.device_string, "gpu:1");
        assert!(sel.message.contains("room for 0 of 2"), "{}", sel.message);
    }

    #[test]
    fn npu_means_the_best_npu() {
        let cap = snapshot(&[("n", &[(RNGD, 1), (GPU, 8)])]);
        let sel = pick(&spec("npu", 1, None), &cap);
        assert_eq!(chosen(&sel).0, DeviceType::Furiosa);
        let sel = pick(&spec("npu", 1, Some(&[DeviceType::Gpu])), &cap);
        assert_eq!(sel.result, Err(NoChoice::NoCandidate));
    }

    #[test]
    fn running_replicas_keep_their_type_when_better_capacity_appears() {
        let cap = snapshot(&[("n", &[(ATOM, 8), (GPU, 8)])]);
        let current = Current {
            device_type: DeviceType::Gpu,
            same_basis: true,
            unschedulable_for: None,
            ready: 1,
        };
        let sel = select_device(
            &spec("auto", 1, None),
            &OperatorConfig::default(),
            &cap,
            Some(&current),
        );
        assert_eq!(chosen(&sel), (DeviceType::Gpu, Decision::Kept));
        // A change of the device spec reselects.
        let changed = Current {
            same_basis: false,
            ..current
        };
        let sel = select_device(
            &spec("auto", 1, None),
            &OperatorConfig::default(),
            &cap,
            Some(&changed),
        );
        assert_eq!(chosen(&sel).0, DeviceType::Rbln);
    }

    #[test]
    fn pods_stuck_past_the_grace_period_move_to_another_type() {
        let cap = snapshot(&[("n", &[(ATOM, 1), (GPU, 8)])]);
        let config = OperatorConfig::default();
        let stuck = Current {
            device_type: DeviceType::Rbln,
            same_basis: true,
            unschedulable_for: Some(config.unschedulable_grace + Duration::from_secs(1)),
            ready: 0,
        };
        let sel = select_device(&spec("auto", 1, None), &config, &cap, Some(&stuck));
        assert_eq!(
            chosen(&sel),
            (
                DeviceType::Gpu,
                Decision::Reselected {
                    from: DeviceType::Rbln
                }
            )
        );
        let within = Current {
            unschedulable_for: Some(Duration::from_secs(1)),
            ..stuck
        };
        let sel = select_device(&spec("auto", 1, None), &config, &cap, Some(&within));
        assert_eq!(
            chosen(&sel).0,
            DeviceType::Rbln,
            "within the grace period it stays"
        );
        let some_ready = Current { ready: 1, ..stuck };
        let sel = select_device(&spec("auto", 2, None), &config, &cap, Some(&some_ready));
        assert_eq!(
            chosen(&sel),
            (DeviceType::Rbln, Decision::Kept),
            "ready replicas never move: {}",
            sel.message
        );
    }

    #[test]
    fn partial_capacity_takes_the_most_room_and_never_moves_between_partials() {
        // 8 replicas: rbln fits 1, gpu 7: gpu, and stuck there it stays.
        let cap = snapshot(&[("a", &[(ATOM, 1)]), ("g", &[(GPU, 7)])]);
        let config = OperatorConfig {
            cpu_fallback: false,
            ..OperatorConfig::default()
        };
        let sel = select_device(&spec("auto", 8, None), &config, &cap, None);
        assert_eq!(chosen(&sel), (DeviceType::Gpu, Decision::Partial));
        let stuck = Current {
            device_type: DeviceType::Gpu,
            same_basis: true,
            unschedulable_for: Some(config.unschedulable_grace * 2),
            ready: 0,
        };
        let sel = select_device(&spec("auto", 8, None), &config, &cap, Some(&stuck));
        assert_eq!(
            chosen(&sel),
            (DeviceType::Gpu, Decision::Kept),
            "rbln has room for 1 of 8: no move: {}",
            sel.message
        );
        // Ties go to the higher priority.
        let cap = snapshot(&[("a", &[(ATOM, 2)]), ("g", &[(GPU, 2)])]);
        let sel = select_device(&spec("auto", 8, None), &config, &cap, None);
        assert_eq!(chosen(&sel), (DeviceType::Rbln, Decision::Partial));
    }

    #[test]
    fn replicas_need_their_devices_on_one_node() {
        let cap = snapshot(&[("a", &[(ATOM, 1)]), ("b", &[(ATOM, 1)]), ("c", &[(GPU, 2)])]);
        let mut s = spec("auto", 1, None);
        s.devices_per_replica = 2;
        assert_eq!(chosen(&pick(&s, &cap)).0, DeviceType::Gpu);
    }

    #[test]
    fn basis_changes_with_the_device_fields_only() {
        let a = spec("auto", 1, None);
        let mut b = a.clone();
        b.replicas = 5;
        assert_eq!(
            selection_basis(&a),
            selection_basis(&b),
            "scaling is not a device change"
        );
        b.device = "atom".into();
        assert_ne!(selection_basis(&a), selection_basis(&b));
    }

    /// A spread workload's Deployments: (type, replicas, ready).
    fn spread_now(parts: &[(DeviceType, u32, u32)]) -> SpreadNow {
        SpreadNow {
            replicas: parts.iter().map(|(t, n, _)| (*t, *n)).collect(),
            ready: parts.iter().map(|(t, _, r)| (*t, *r)).collect(),
            stuck: BTreeSet::new(),
        }
    }

    fn split(parts: &Parts) -> Vec<(DeviceType, u32)> {
        parts.iter().map(|(c, n)| (c.device_type, *n)).collect()
    }

    #[test]
    fn spread_moves_up_by_policy_one_ready_replica_at_a_time() {
        let config = OperatorConfig {
            cpu_fallback: false,
            ..OperatorConfig::default()
        };
        // Room for 3 on rbln; 2 run on rbln and 2 on gpu, all ready.
        let cap = snapshot(&[("a", &[(ATOM, 3)]), ("g", &[(GPU, 8)])]);
        let mut s = spec("auto", 4, None);
        let settled = spread_now(&[(DeviceType::Rbln, 2, 2), (DeviceType::Gpu, 2, 2)]);
        let (sel, parts, _) = select_spread(&s, &config, &cap, &settled);
        assert_eq!(split(&parts), [(DeviceType::Rbln, 2), (DeviceType::Gpu, 2)]);
        assert_eq!(sel.reason(), "Spread", "no policy, no move");

        s.move_up = true;
        // Step 1: one more on rbln; gpu keeps its 2.
        let (sel, parts, _) = select_spread(&s, &config, &cap, &settled);
        assert_eq!(split(&parts), [(DeviceType::Rbln, 3), (DeviceType::Gpu, 2)]);
        assert_eq!(sel.reason(), "MovedUp");
        assert!(sel.message.contains("from gpu to rbln"), "{}", sel.message);
        // Not ready yet: nothing goes.
        let in_flight = spread_now(&[(DeviceType::Rbln, 3, 2), (DeviceType::Gpu, 2, 2)]);
        let (sel, parts, _) = select_spread(&s, &config, &cap, &in_flight);
        assert_eq!(split(&parts), [(DeviceType::Rbln, 3), (DeviceType::Gpu, 2)]);
        assert_eq!(sel.reason(), "MovedUp");
        // Ready: one gpu replica goes.
        let ready = spread_now(&[(DeviceType::Rbln, 3, 3), (DeviceType::Gpu, 2, 2)]);
        let (_, parts, _) = select_spread(&s, &config, &cap, &ready);
        assert_eq!(split(&parts), [(DeviceType::Rbln, 3), (DeviceType::Gpu, 1)]);
        // rbln is full (room for 3): no further step.
        let done = spread_now(&[(DeviceType::Rbln, 3, 3), (DeviceType::Gpu, 1, 1)]);
        let (sel, parts, _) = select_spread(&s, &config, &cap, &done);
        assert_eq!(split(&parts), [(DeviceType::Rbln, 3), (DeviceType::Gpu, 1)]);
        assert_eq!(sel.reason(), "Spread");

        // A replica not ready anywhere holds the next step back.
        let unready = spread_now(&[(DeviceType::Rbln, 2, 2), (DeviceType::Gpu, 2, 1)]);
        let (_, parts, _) = select_spread(&s, &config, &cap, &unready);
        assert_eq!(split(&parts), [(DeviceType::Rbln, 2), (DeviceType::Gpu, 2)]);

        // The surge replica cannot be scheduled: it goes, the old stay.
        let mut stuck = in_flight.clone();
        stuck.stuck.insert(DeviceType::Rbln);
        let (_, parts, _) = select_spread(&s, &config, &cap, &stuck);
        assert_eq!(split(&parts), [(DeviceType::Rbln, 2), (DeviceType::Gpu, 2)]);
    }

    #[test]
    fn spread_fills_types_in_priority_order_and_keeps_what_runs() {
        let config = OperatorConfig {
            cpu_fallback: false,
            ..OperatorConfig::default()
        };
        let cap = snapshot(&[("a", &[(ATOM, 1)]), ("g", &[(GPU, 7)])]);
        let none = SpreadNow::default();
        let (sel, parts, unplaced) = select_spread(&spec("auto", 8, None), &config, &cap, &none);
        assert_eq!(split(&parts), [(DeviceType::Rbln, 1), (DeviceType::Gpu, 7)]);
        assert_eq!(unplaced, 0);
        assert_eq!(sel.reason(), "Spread");
        assert!(sel.message.contains("rbln 1, gpu 7"), "{}", sel.message);

        // 10 wanted: 2 wait.
        let (sel, _, unplaced) = select_spread(&spec("auto", 10, None), &config, &cap, &none);
        assert_eq!(unplaced, 2);
        assert!(
            sel.message.contains("2 wait for capacity"),
            "{}",
            sel.message
        );

        // Running: 4 on gpu (their devices count as free for the workload
        // itself). Scaling to 6 with room for 1 on rbln keeps the 4 and
        // places 1 on rbln and 1 more on gpu; nothing moves up.
        let running = spread_now(&[(DeviceType::Gpu, 4, 4)]);
        let (_, parts, _) = select_spread(&spec("auto", 6, None), &config, &cap, &running);
        assert_eq!(split(&parts), [(DeviceType::Rbln, 1), (DeviceType::Gpu, 5)]);

        // Scaling down takes from the lowest priority first.
        let running = spread_now(&[(DeviceType::Rbln, 1, 1), (DeviceType::Gpu, 7, 7)]);
        let (_, parts, _) = select_spread(&spec("auto", 3, None), &config, &cap, &running);
        assert_eq!(split(&parts), [(DeviceType::Rbln, 1), (DeviceType::Gpu, 2)]);
    }

    #[test]
    fn spread_puts_what_fits_nowhere_on_the_cpu_fallback() {
        let cap = snapshot(&[("a", &[(ATOM, 2)])]);
        let none = SpreadNow::default();
        let (_, parts, unplaced) = select_spread(
            &spec("auto", 5, None),
            &OperatorConfig::default(),
            &cap,
            &none,
        );
        assert_eq!(split(&parts), [(DeviceType::Rbln, 2), (DeviceType::Cpu, 3)]);
        assert_eq!(unplaced, 0);
        // An explicit device is one type: all there, as with single.
        let (sel, parts, _) = select_spread(
            &spec("gpu", 5, None),
            &OperatorConfig::default(),
            &cap,
            &none,
        );
        assert_eq!(sel.reason(), "Explicit");
        assert_eq!(parts.len(), 1);
        assert_eq!(parts[0].1, 5);
    }

    #[test]
    fn move_up_only_by_policy_only_up_and_only_when_all_are_ready() {
        let cap = snapshot(&[("a", &[(ATOM, 4)]), ("g", &[(GPU, 8)])]);
        let config = OperatorConfig::default();
        let on_gpu = Current {
            device_type: DeviceType::Gpu,
            same_basis: true,
            unschedulable_for: None,
            ready: 4,
        };
        let mut s = spec("auto", 4, None);
        let sel = select_device(&s, &config, &cap, Some(&on_gpu));
        assert_eq!(
            chosen(&sel),
            (DeviceType::Gpu, Decision::Kept),
            "off by default"
        );
        s.move_up = true;
        let sel = select_device(&s, &config, &cap, Some(&on_gpu));
        assert_eq!(
            chosen(&sel),
            (
                DeviceType::Rbln,
                Decision::MovedUp {
                    from: DeviceType::Gpu
                }
            )
        );
        assert_eq!(sel.reason(), "MovedUp");
        let not_all_ready = Current {
            ready: 3,
            ..on_gpu.clone()
        };
        let sel = select_device(&s, &config, &cap, Some(&not_all_ready));
        assert_eq!(chosen(&sel).0, DeviceType::Gpu, "waits until all are ready");
        // Room for 3 of 4 on rbln: no move.
        let small = snapshot(&[("a", &[(ATOM, 3)]), ("g", &[(GPU, 8)])]);
        let sel = select_device(&s, &config, &small, Some(&on_gpu));
        assert_eq!(chosen(&sel).0, DeviceType::Gpu);
        // Never down: on rbln with gpu free, it stays.
        let on_rbln = Current {
            device_type: DeviceType::Rbln,
            ..on_gpu
        };
        let sel = select_device(
            &s,
            &config,
            &snapshot(&[("g", &[(GPU, 8)])]),
            Some(&on_rbln),
        );
        assert_eq!(chosen(&sel).0, DeviceType::Rbln);
    }
}
