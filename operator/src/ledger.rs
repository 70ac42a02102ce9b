//! The operator's account of device capacity: what each node offers, what
//! bound pods hold, and what is promised but not bound yet, kept up to date
//! from watch events (never rebuilt per reconcile).
//!
//! A reconcile decides under the ledger's lock: it reads its view (free
//! devices on the nodes its template may use, less what other workloads were
//! promised and what other tenants' queued pods will take), chooses, and
//! records its own promise (a claim) before the lock is released. So
//! concurrent reconciles never promise the same device twice, and a burst of
//! workloads fills each type exactly.
//!
//! A claim is the replicas a workload was given on a type and not yet bound,
//! assumed on the nodes the view had room on (first fit). When one of its
//! pods binds, the claim shrinks on that node (or, if the scheduler chose
//! another node, where it assumed most). A workload's next reconcile
//! recomputes its claim from scratch, so the assumption never drifts.
//!
//! Workloads that wait for capacity are queued here too, by priority then
//! age; devices that free up wake only as many of them as they can serve.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Mutex;

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::ResourceExt;
use rm_crds::{DeviceType, InferenceWorkload, Placement, labels};

use crate::capacity::{
    CapacitySnapshot, NodeCapacity, is_schedulable, is_terminated, node_devices, node_pod_slots,
    pod_device_requests, whole_replicas,
};
use crate::config::OperatorConfig;
use crate::constraints::{NodeConstraints, NodeFacts};
use crate::render::DEVICE_TYPE;
use crate::selection::{
    Current, NoChoice, Parts, Selection, SpreadNow, select_device, select_spread,
};

/// A node's room for one type in the aggregate index: free devices, and
/// the pods it can take (capped at the free devices).
type Room = (i64, i64);

/// A workload: namespace and name.
pub type WorkloadKey = (String, String);
type PodKey = (String, String);

/// What one node offers and what bound pods hold on it.
#[derive(Clone, Debug, Default)]
struct NodeEntry {
    facts: NodeFacts,
    schedulable: bool,
    allocatable: BTreeMap<DeviceType, i64>,
    pod_slots: Option<i64>,
    used: BTreeMap<DeviceType, i64>,
    pods: i64,
}

/// What the ledger keeps of a pod.
#[derive(Clone, Debug, PartialEq)]
struct PodEntry {
    node: Option<String>,
    devices: BTreeMap<DeviceType, i64>,
    /// The InferenceWorkload the pod belongs to (its label).
    owner: Option<WorkloadKey>,
    /// The device type its template was made for (our annotation).
    device_type: Option<DeviceType>,
}

/// Replicas promised to a workload on one type and not bound yet.
#[derive(Clone, Debug, PartialEq)]
struct Claim {
    device_type: DeviceType,
    per_replica: i64,
    /// Replicas assumed on each node.
    assumed: BTreeMap<String, i64>,
}

/// Devices and pods held on one node.
#[derive(Clone, Debug, Default, PartialEq)]
struct Held {
    devices: BTreeMap<DeviceType, i64>,
    pods: i64,
}

/// A workload waiting for capacity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Waiter {
    /// Higher first (the template's pod priority).
    pub priority: i32,
    /// Older first: creation time, seconds.
    pub created: i64,
    /// Types it would take, in its order.
    pub types: Vec<DeviceType>,
    pub per_replica: i64,
    /// Replicas it still needs placed.
    pub replicas: i64,
}

/// The nodes one set of node constraints admits, counted per type by their
/// room (free devices, pods they can take): a decision reads a few entries
/// per type, and its promise walks only nodes with room, so deciding costs
/// the same on 100 nodes or 5,000. Kept up to date on every change of a
/// node's room, for every index.
#[derive(Debug)]
struct RoomIndex {
    constraints: NodeConstraints,
    /// Nodes whose labels and taints the constraints admit.
    members: HashSet<String>,
    /// Per type, the schedulable members counted by room.
    hist: BTreeMap<DeviceType, BTreeMap<Room, i64>>,
    /// The room each member is counted under, per type.
    counted: HashMap<String, Vec<(DeviceType, Room)>>,
    /// Per type, the schedulable members with room, in name order (first
    /// fit).
    with_room: BTreeMap<DeviceType, BTreeSet<String>>,
    last_used: u64,
}

/// Indexes kept for templates with node constraints; beyond that the least
/// recently used one goes (it is rebuilt, once, if it is needed again).
const MAX_INDEXES: usize = 64;

#[derive(Debug, Default)]
struct State {
    nodes: BTreeMap<String, NodeEntry>,
    /// Nodes offering each type, so a view reads only those.
    by_type: BTreeMap<DeviceType, BTreeSet<String>>,
    pods: HashMap<PodKey, PodEntry>,
    /// Workloads' bound pods: devices and pods per node.
    own_used: HashMap<WorkloadKey, BTreeMap<String, Held>>,
    /// Unbound pods that request devices.
    unbound: HashMap<PodKey, PodEntry>,
    /// Per workload, one claim per type (several with `placement: spread`).
    claims: HashMap<WorkloadKey, Vec<Claim>>,
    /// All claims' assumed devices and pods, per node.
    claimed: BTreeMap<String, Held>,
    waiters: HashMap<WorkloadKey, Waiter>,
    /// Workloads with `moveUp` below their first type: the higher types
    /// they would move to.
    movers: HashMap<WorkloadKey, Vec<DeviceType>>,
    /// Capacity indexes, one per set of node constraints in use (by
    /// `NodeConstraints::key`; the empty set is templates without any).
    indexes: HashMap<String, RoomIndex>,
    /// Indexes looked up so far: the clock that picks the one to evict.
    lookups: u64,
    /// Objects seen since a watch (re)list began: what is not seen again is gone.
    resync_nodes: Option<BTreeSet<String>>,
    resync_pods: Option<BTreeSet<PodKey>>,
}

/// The capacity account; one per operator, shared by all reconciles.
#[derive(Debug)]
pub struct Ledger {
    config: OperatorConfig,
    state: Mutex<State>,
}

/// Devices a change made free, per type (the input of wake-ups).
pub type Freed = BTreeMap<DeviceType, i64>;

impl Ledger {
    pub fn new(config: OperatorConfig) -> Self {
        Ledger {
            config,
            state: Mutex::new(State::default()),
        }
    }

    /// A ledger of lists (tests, benchmarks).
    pub fn from_lists<'a>(
        nodes: impl IntoIterator<Item = &'a Node>,
        pods: impl IntoIterator<Item = &'a Pod>,
        config: &OperatorConfig,
    ) -> Self {
        let ledger = Ledger::new(config.clone());
        for n in nodes {
            ledger.apply_node(n);
        }
        for p in pods {
            ledger.apply_pod(p);
        }
        ledger
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain counters behind; the
        // next event or reconcile corrects them, so poisoning is ignored.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A node was added or changed. Returns the devices it made free.
    pub fn apply_node(&self, node: &Node) -> Freed {
        let Some(name) = node.metadata.name.clone() else {
            return Freed::new();
        };
        let mut st = self.lock();
        if let Some(seen) = st.resync_nodes.as_mut() {
            seen.insert(name.clone());
        }
        let before = st
            .nodes
            .get(&name)
            .map(|n| (n.offered(), n.facts.taints.clone()));
        let entry = st.nodes.entry(name.clone()).or_default();
        entry.facts = NodeFacts::of(node);
        entry.schedulable = is_schedulable(node);
        entry.allocatable = node_devices(node, &self.config);
        entry.pod_slots = node_pod_slots(node);
        let after = entry.offered();
        let types: Vec<DeviceType> = entry.allocatable.keys().copied().collect();
        for (t, set) in st.by_type.iter_mut() {
            if !types.contains(t) {
                set.remove(&name);
            }
        }
        for t in types {
            st.by_type.entry(t).or_default().insert(name.clone());
        }
        let taints_now = entry_taints(&st, &name);
        st.readmit(&name);
        match before {
            // A taint that goes (the node lifecycle controller's `not-ready`
            // often goes after Ready comes) opens the node to templates
            // that did not tolerate it: all it offers counts as freed.
            Some((_, taints)) if taints.iter().any(|t| !taints_now.contains(t)) => after,
            Some((offered, _)) => increase(offered, after),
            None => increase(BTreeMap::new(), after),
        }
    }

    pub fn delete_node(&self, name: &str) {
        let mut st = self.lock();
        st.remove_node(name);
    }

    /// A watch of nodes starts over (a relist): nodes not applied before
    /// `end_node_resync` are gone.
    pub fn begin_node_resync(&self) {
        self.lock().resync_nodes = Some(BTreeSet::new());
    }

    pub fn end_node_resync(&self) {
        let mut st = self.lock();
        let Some(seen) = st.resync_nodes.take() else {
            return;
        };
        for n in unseen(st.nodes.keys(), &seen) {
            st.remove_node(&n);
        }
    }

    pub fn begin_pod_resync(&self) {
        self.lock().resync_pods = Some(BTreeSet::new());
    }

    /// Ends a relist of pods; returns the devices the vanished pods freed.
    pub fn end_pod_resync(&self) -> Freed {
        let mut st = self.lock();
        let Some(seen) = st.resync_pods.take() else {
            return Freed::new();
        };
        let mut freed = Freed::new();
        for k in unseen(st.pods.keys(), &seen) {
            add_all(&mut freed, &st.remove_pod(&k));
        }
        freed
    }

    /// A pod was added or changed. Returns the devices it made free (it
    /// finished, or is being deleted).
    pub fn apply_pod(&self, pod: &Pod) -> Freed {
        let (Some(ns), Some(name)) = (pod.namespace(), pod.metadata.name.clone()) else {
            return Freed::new();
        };
        let key = (ns.clone(), name);
        let mut st = self.lock();
        if let Some(seen) = st.resync_pods.as_mut() {
            seen.insert(key.clone());
        }
        // A pod being deleted or finished holds its devices no more as far
        // as choosing goes: they are as good as free.
        if is_terminated(pod) || pod.metadata.deletion_timestamp.is_some() {
            return st.remove_pod(&key);
        }
        let entry = PodEntry {
            node: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
            devices: pod_device_requests(pod, &self.config),
            owner: pod
                .labels()
                .get(labels::WORKLOAD)
                .map(|w| (ns.clone(), w.clone())),
            device_type: pod
                .annotations()
                .get(DEVICE_TYPE)
                .and_then(|t| t.parse().ok()),
        };
        if st.pods.get(&key) == Some(&entry) {
            return Freed::new();
        }
        // A change (it was bound, most often) frees nothing.
        st.take_pod(&key);
        st.insert_pod(key, entry);
        Freed::new()
    }

    pub fn delete_pod(&self, pod: &Pod) -> Freed {
        let (Some(ns), Some(name)) = (pod.namespace(), pod.metadata.name.clone()) else {
            return Freed::new();
        };
        self.lock().remove_pod(&(ns, name))
    }

    /// A workload is gone: its claim and place in the queue go with it.
    pub fn forget(&self, w: &WorkloadKey) -> Freed {
        let mut st = self.lock();
        st.waiters.remove(w);
        st.movers.remove(w);
        st.drop_claim(w)
    }

    /// Keeps the promises and places in the queue of the workloads that
    /// exist: after a watch of workloads lists them again, those deleted
    /// meanwhile (no Delete event reached the operator) must not hold
    /// devices. Returns the devices that frees.
    pub fn retain_workloads(&self, exists: impl Fn(&WorkloadKey) -> bool) -> Freed {
        let mut st = self.lock();
        let gone: BTreeSet<WorkloadKey> = st
            .claims
            .keys()
            .chain(st.waiters.keys())
            .chain(st.movers.keys())
            .filter(|w| !exists(w))
            .cloned()
            .collect();
        let mut freed = Freed::new();
        for w in gone {
            st.waiters.remove(&w);
            st.movers.remove(&w);
            add_all(&mut freed, &st.drop_claim(&w));
        }
        freed
    }

    /// Decides for workload `w` under the lock: `choose` gets the capacity
    /// the workload sees and returns its choice: promises (type, replicas
    /// wanted on it, devices per replica; one per type), or none, and how it
    /// waits if replicas stay unplaced. The promises are recorded before the
    /// lock is released. Also returns the devices its earlier promises held
    /// and these no longer do (to wake others with).
    pub fn decide<T>(
        &self,
        w: &WorkloadKey,
        constraints: &NodeConstraints,
        types: &[DeviceType],
        choose: impl FnOnce(&CapacitySnapshot) -> (T, Vec<Promise>, Wait),
    ) -> (T, Freed) {
        let mut st = self.lock();
        st.ensure_index(constraints);
        let view = st.view(w, constraints, types);
        let (out, promises, wait) = choose(&view);
        let mut freed = st.drop_claim(w);
        let unplaced = if promises.is_empty() {
            None
        } else {
            let mut pods_taken = BTreeMap::new();
            let mut unplaced = 0;
            for p in &promises {
                // cpu, or a type the cluster has no resource for: nothing
                // to count, and always room.
                if self.config.resource_name(p.device_type).is_some() {
                    let queued = view
                        .claimed_unbound
                        .get(&p.device_type)
                        .copied()
                        .unwrap_or(0);
                    unplaced += st.claim(w, constraints, p, queued, &mut pods_taken);
                }
            }
            for c in st.claims.get(w).into_iter().flatten() {
                let now: i64 = c.assumed.values().sum::<i64>() * c.per_replica;
                if let Some(f) = freed.get_mut(&c.device_type) {
                    *f -= now;
                }
            }
            Some(unplaced)
        };
        match (wait, unplaced) {
            (Wait::IfUnplaced(mut waiter), Some(n)) if n > 0 => {
                waiter.replicas = n;
                st.waiters.insert(w.clone(), waiter);
            }
            (Wait::IfUnplaced(waiter), None) | (Wait::Always(waiter), _) => {
                st.waiters.insert(w.clone(), waiter);
            }
            _ => {
                st.waiters.remove(w);
            }
        }
        freed.retain(|_, n| *n > 0);
        (out, freed)
    }

    /// The waiting workloads that `freed` devices can serve, in priority
    /// order then age, each counted against what it would take.
    pub fn wake(&self, freed: &Freed) -> Vec<WorkloadKey> {
        if freed.values().all(|n| *n <= 0) {
            return vec![];
        }
        let st = self.lock();
        let mut budget = freed.clone();
        let mut queue: Vec<(&WorkloadKey, &Waiter)> = st.waiters.iter().collect();
        queue.sort_by(|a, b| {
            (-a.1.priority, a.1.created, a.0).cmp(&(-b.1.priority, b.1.created, b.0))
        });
        // Workloads that may move up to a type that freed devices: few, and
        // each checks for room for all its replicas when it reconciles.
        let mut woken: Vec<WorkloadKey> = st
            .movers
            .iter()
            .filter(|(_, higher)| higher.iter().any(|t| freed.get(t).is_some_and(|n| *n > 0)))
            .map(|(w, _)| w.clone())
            .collect();
        woken.sort();
        for (w, waiter) in queue {
            let Some(t) = waiter
                .types
                .iter()
                .find(|t| budget.get(t).copied().unwrap_or(0) >= waiter.per_replica)
            else {
                continue;
            };
            let left = budget.entry(*t).or_default();
            let take = (*left / waiter.per_replica).min(waiter.replicas.max(1));
            *left -= take * waiter.per_replica;
            woken.push(w.clone());
            if budget.values().all(|n| *n <= 0) {
                break;
            }
        }
        woken
    }

    /// Free capacity as workload `w` sees it, for tests (reconciles use
    /// `decide`).
    pub fn view(
        &self,
        w: &WorkloadKey,
        constraints: &NodeConstraints,
        types: &[DeviceType],
    ) -> CapacitySnapshot {
        let mut st = self.lock();
        st.ensure_index(constraints);
        st.view(w, constraints, types)
    }

    /// The same view read node by node (the oracle of the indexed one).
    #[cfg(test)]
    fn view_by_node(
        &self,
        w: &WorkloadKey,
        constraints: &NodeConstraints,
        types: &[DeviceType],
    ) -> CapacitySnapshot {
        self.lock().view_by_node(w, constraints, types)
    }

    /// The device selection for a workload, made under the lock with its
    /// promises recorded: `select_device` (or `select_spread`, with where
    /// its replicas are now in `spread_now`) on the capacity its
    /// template may use. It waits in the queue when replicas find no room
    /// (never for a spec that no capacity fixes). Returns the replicas per
    /// type to run. `priority` orders it in the queue (`pod_priority`).
    pub fn choose(
        &self,
        w: &WorkloadKey,
        iw: &InferenceWorkload,
        config: &OperatorConfig,
        current: Option<&Current>,
        spread_now: &SpreadNow,
        priority: i32,
    ) -> (Selection, Parts, Freed) {
        let template_spec = iw.spec.template.as_ref().and_then(|t| t.spec.as_ref());
        let constraints = NodeConstraints::of(template_spec);
        let replicas = i64::from(iw.spec.replicas.max(0));
        let per_replica = i64::from(iw.spec.devices_per_replica.max(1));
        let spread = iw.spec.placement == Placement::Spread;
        let ((selection, parts), freed) = self.decide(w, &constraints, &DeviceType::ALL, |view| {
            let (selection, parts, unplaced) = if spread {
                select_spread(&iw.spec, config, view, spread_now)
            } else {
                let selection = select_device(&iw.spec, config, view, current);
                let parts = selection
                    .chosen()
                    .map(|c| (c.clone(), u32::try_from(replicas).unwrap_or(0)))
                    .into_iter()
                    .collect();
                (selection, parts, 0)
            };
            let waiter = Waiter {
                priority,
                created: iw
                    .metadata
                    .creation_timestamp
                    .as_ref()
                    .map_or(0, |t| t.0.as_second()),
                types: selection.order.clone(),
                per_replica,
                replicas,
            };
            let promises: Vec<Promise> = parts
                .iter()
                .map(|(c, n)| Promise {
                    device_type: c.device_type,
                    replicas: i64::from(*n),
                    per_replica,
                })
                .collect();
            let wait = match &selection.result {
                Err(NoChoice::NoCapacity) => Wait::Always(waiter),
                Err(_) => Wait::Never,
                Ok(_) if unplaced > 0 => Wait::Always(Waiter {
                    replicas: i64::from(unplaced),
                    ..waiter
                }),
                Ok(_) => Wait::IfUnplaced(waiter),
            };
            ((selection, parts), promises, wait)
        });
        // Types above the lowest one it runs on: devices freed there wake it.
        let higher: Vec<DeviceType> = match parts.last() {
            Some((c, _)) if iw.spec.move_up => selection
                .order
                .iter()
                .take_while(|t| **t != c.device_type)
                .copied()
                .collect(),
            _ => vec![],
        };
        let mut st = self.lock();
        if higher.is_empty() {
            st.movers.remove(w);
        } else {
            st.movers.insert(w.clone(), higher);
        }
        drop(st);
        (selection, parts, freed)
    }

    /// Replicas promised and not bound, per type (tests).
    pub fn claimed_replicas(&self) -> BTreeMap<DeviceType, i64> {
        let st = self.lock();
        let mut out = BTreeMap::new();
        for c in st.claims.values().flatten() {
            *out.entry(c.device_type).or_default() += c.assumed.values().sum::<i64>();
        }
        out
    }

    /// Workloads waiting for capacity.
    pub fn waiting(&self) -> usize {
        self.lock().waiters.len()
    }
}

/// Whether a decision queues the workload for freed devices.
#[derive(Clone, Debug)]
pub enum Wait {
    /// Never (cpu, or a spec no capacity fixes).
    Never,
    /// If its promises leave replicas without room (or it has none); the
    /// waiter's `replicas` become those left.
    IfUnplaced(Waiter),
    /// Yes, for the waiter's `replicas`.
    Always(Waiter),
}

/// What a decision promises: `replicas` of `per_replica` devices on
/// `device_type`, less those already bound there.
#[derive(Clone, Debug)]
pub struct Promise {
    pub device_type: DeviceType,
    pub replicas: i64,
    pub per_replica: i64,
}

impl NodeEntry {
    /// Devices offered to new pods: none when cordoned or not Ready.
    fn offered(&self) -> BTreeMap<DeviceType, i64> {
        if !self.schedulable {
            return BTreeMap::new();
        }
        self.allocatable
            .iter()
            .map(|(t, n)| (*t, n - self.used.get(t).copied().unwrap_or(0)))
            .collect()
    }
}

impl State {
    fn remove_node(&mut self, name: &str) {
        self.nodes.remove(name);
        for set in self.by_type.values_mut() {
            set.remove(name);
        }
        self.readmit(name);
    }

    fn insert_pod(&mut self, key: PodKey, entry: PodEntry) {
        match &entry.node {
            Some(node) => {
                let n = self.nodes.entry(node.clone()).or_default();
                n.pods += 1;
                for (t, d) in &entry.devices {
                    *n.used.entry(*t).or_default() += d;
                }
                if let Some(owner) = &entry.owner {
                    let mine = self
                        .own_used
                        .entry(owner.clone())
                        .or_default()
                        .entry(node.clone())
                        .or_default();
                    mine.pods += 1;
                    add_all(&mut mine.devices, &entry.devices);
                    // Bound: one replica of the claim is now a pod.
                    if let Some(t) = entry.device_type
                        && entry.devices.contains_key(&t)
                    {
                        self.claim_bound(owner, t, node);
                    }
                }
                self.refresh(node);
            }
            None if !entry.devices.is_empty() => {
                self.unbound.insert(key.clone(), entry.clone());
            }
            None => {}
        }
        self.pods.insert(key, entry);
    }

    /// The pod leaves: returns the devices that frees (a queued pod's
    /// too: what it would have taken is free again).
    fn remove_pod(&mut self, key: &PodKey) -> Freed {
        self.take_pod(key).map(|e| e.devices).unwrap_or_default()
    }

    /// Takes the pod out of every count.
    fn take_pod(&mut self, key: &PodKey) -> Option<PodEntry> {
        let entry = self.pods.remove(key)?;
        self.unbound.remove(key);
        let Some(node) = &entry.node else {
            return Some(entry);
        };
        if let Some(n) = self.nodes.get_mut(node) {
            n.pods -= 1;
            sub_all(&mut n.used, &entry.devices);
        }
        self.refresh(node);
        if let Some(owner) = &entry.owner
            && let Some(by_node) = self.own_used.get_mut(owner)
        {
            if let Some(mine) = by_node.get_mut(node) {
                mine.pods -= 1;
                sub_all(&mut mine.devices, &entry.devices);
                if mine.pods <= 0 {
                    by_node.remove(node);
                }
            }
            if by_node.is_empty() {
                self.own_used.remove(owner);
            }
        }
        Some(entry)
    }

    fn claim_bound(&mut self, owner: &WorkloadKey, t: DeviceType, node: &str) {
        let Some(claim) = self
            .claims
            .get_mut(owner)
            .and_then(|cs| cs.iter_mut().find(|c| c.device_type == t))
        else {
            return;
        };
        // Where the scheduler put it, else where most were assumed.
        let at = if claim.assumed.get(node).copied().unwrap_or(0) > 0 {
            node.to_string()
        } else {
            match claim.assumed.iter().max_by_key(|(_, n)| **n) {
                Some((n, _)) => n.clone(),
                None => return,
            }
        };
        let per = claim.per_replica;
        if let Some(n) = claim.assumed.get_mut(&at) {
            *n -= 1;
            if *n <= 0 {
                claim.assumed.remove(&at);
            }
        }
        let held = self.claimed.entry(at.clone()).or_default();
        *held.devices.entry(t).or_default() -= per;
        held.pods -= 1;
        self.refresh(&at);
    }

    fn drop_claim(&mut self, w: &WorkloadKey) -> Freed {
        let mut freed = Freed::new();
        for claim in self.claims.remove(w).into_iter().flatten() {
            for (node, n) in &claim.assumed {
                let held = self.claimed.entry(node.clone()).or_default();
                *held.devices.entry(claim.device_type).or_default() -= n * claim.per_replica;
                held.pods -= n;
                *freed.entry(claim.device_type).or_default() += n * claim.per_replica;
                self.refresh(node);
            }
        }
        freed
    }

    /// Records the promise on the nodes the template may use with room
    /// (first fit, in name order); returns the replicas that found no room.
    /// `pods_taken` carries the pod slots earlier promises of the same
    /// decision took, per node; `queued` the devices other tenants' queued
    /// pods will take of the type (they are older: they go first).
    fn claim(
        &mut self,
        w: &WorkloadKey,
        constraints: &NodeConstraints,
        p: &Promise,
        queued: i64,
        pods_taken: &mut BTreeMap<String, i64>,
    ) -> i64 {
        let per = p.per_replica.max(1);
        let bound: i64 = self
            .own_used
            .get(w)
            .map(|by_node| {
                by_node
                    .values()
                    .map(|h| h.devices.get(&p.device_type).copied().unwrap_or(0) / per)
                    .sum()
            })
            .unwrap_or(0);
        let mut left = (p.replicas - bound).max(0);
        let mut queued = whole_replicas(queued, per);
        let mut assumed = BTreeMap::new();
        // Stops at the first nodes that hold the promise: the cost follows
        // the replicas, not the nodes.
        for name in self.candidate_nodes(w, constraints, p.device_type) {
            if left == 0 {
                break;
            }
            let Some((free, pod_room)) = self.room_for(w, name, p.device_type) else {
                continue;
            };
            let by_devices = free.max(0) / per;
            let taken = pods_taken.get(name).copied().unwrap_or(0);
            let mut room = pod_room.map_or(by_devices, |r| by_devices.min((r - taken).max(0)));
            let skip = room.min(queued);
            queued -= skip;
            room -= skip;
            let take = room.min(left);
            if take > 0 {
                assumed.insert(name.clone(), take);
                left -= take;
            }
        }
        for (name, n) in &assumed {
            *pods_taken.entry(name.clone()).or_default() += n;
        }
        for (node, n) in &assumed {
            let held = self.claimed.entry(node.clone()).or_default();
            *held.devices.entry(p.device_type).or_default() += n * per;
            held.pods += n;
        }
        let touched: Vec<String> = assumed.keys().cloned().collect();
        if !assumed.is_empty() {
            self.claims.entry(w.clone()).or_default().push(Claim {
                device_type: p.device_type,
                per_replica: per,
                assumed,
            });
        }
        for node in touched {
            self.refresh(&node);
        }
        left
    }

    /// Nodes a promise of type `t` may go to, lazily: the workload's own
    /// nodes, then the nodes with room from its constraints' index, in name
    /// order.
    fn candidate_nodes<'a>(
        &'a self,
        w: &WorkloadKey,
        constraints: &NodeConstraints,
        t: DeviceType,
    ) -> impl Iterator<Item = &'a String> + 'a {
        let index = self.indexes.get(constraints.key());
        let own = self.own_nodes(w);
        let others = index
            .and_then(|i| i.with_room.get(&t))
            .into_iter()
            .flatten()
            .filter({
                let own = own.clone();
                move |n| !own.contains(n)
            });
        own.into_iter()
            .filter(move |n| {
                index.is_some_and(|i| i.members.contains(*n))
                    && self.nodes.get(*n).is_some_and(|e| e.schedulable)
            })
            .chain(others)
    }

    /// Nodes where the workload has pods or promises.
    fn own_nodes<'a>(&'a self, w: &WorkloadKey) -> BTreeSet<&'a String> {
        let mut names: BTreeSet<&String> = self
            .own_used
            .get(w)
            .map(|m| m.keys().collect())
            .unwrap_or_default();
        for c in self.claims.get(w).into_iter().flatten() {
            names.extend(c.assumed.keys());
        }
        names
    }

    /// Free devices of type `t` on a node as workload `w` sees them (its
    /// own pods and promises count as free for itself: re-deciding must not
    /// take its replicas for someone else's), and the pods it can take.
    fn room_for(&self, w: &WorkloadKey, name: &str, t: DeviceType) -> Option<(i64, Option<i64>)> {
        let n = self.nodes.get(name)?;
        let alloc = *n.allocatable.get(&t)?;
        let claimed = self.claimed.get(name);
        let mine = self.own_used.get(w).and_then(|m| m.get(name));
        let (mut mine_devices, mut mine_pods) = mine.map_or((0, 0), |m| {
            (m.devices.get(&t).copied().unwrap_or(0), m.pods)
        });
        for c in self.claims.get(w).into_iter().flatten() {
            if let Some(r) = c.assumed.get(name) {
                mine_pods += r;
                if c.device_type == t {
                    mine_devices += r * c.per_replica;
                }
            }
        }
        // Bound pods fill a node at most (a device may go away under a
        // running pod); promises may overfill it (see `replicas_that_fit`).
        let free = (alloc - n.used.get(&t).copied().unwrap_or(0)).max(0)
            - claimed.map_or(0, |c| c.devices.get(&t).copied().unwrap_or(0))
            + mine_devices;
        let pod_room = n
            .pod_slots
            .map(|slots| slots - n.pods - claimed.map_or(0, |c| c.pods) + mine_pods);
        Some((free, pod_room))
    }

    /// A node's room per type as others see it (less what bound pods and
    /// promises hold); `None` when it takes no pods.
    fn rooms(&self, name: &str) -> Option<Vec<(DeviceType, Room)>> {
        let n = self.nodes.get(name).filter(|n| n.schedulable)?;
        let claimed = self.claimed.get(name);
        let pods = n
            .pod_slots
            .map(|slots| slots - n.pods - claimed.map_or(0, |c| c.pods));
        Some(
            n.allocatable
                .iter()
                .map(|(t, alloc)| {
                    let free = (alloc - n.used.get(t).copied().unwrap_or(0)).max(0)
                        - claimed.map_or(0, |c| c.devices.get(t).copied().unwrap_or(0));
                    // Pod room beyond the free devices never matters: each
                    // replica takes at least one device. Capping it keeps the
                    // keys few.
                    let room = pods.map_or(free.max(0), |p| p.min(free.max(0)));
                    (*t, (free, room))
                })
                .collect(),
        )
    }

    /// Re-counts one node in every index that admits it (after anything
    /// that changes its room: its own state, a pod bound there, a promise).
    fn refresh(&mut self, name: &str) {
        let rooms = self.rooms(name);
        for index in self.indexes.values_mut() {
            index.uncount(name);
            if let Some(rooms) = &rooms
                && index.members.contains(name)
            {
                index.count(name, rooms);
            }
        }
    }

    /// After a node's labels or taints changed, or it went: which indexes
    /// admit it.
    fn readmit(&mut self, name: &str) {
        let facts = self.nodes.get(name).map(|n| &n.facts);
        for index in self.indexes.values_mut() {
            if facts.is_some_and(|f| index.constraints.check(f).is_none()) {
                index.members.insert(name.to_string());
            } else {
                index.members.remove(name);
            }
        }
        self.refresh(name);
    }

    /// Makes sure the index of `constraints` exists: built from the nodes on
    /// first use (linear, once); the least recently used goes when there are
    /// more than `MAX_INDEXES` (the one of no constraints stays).
    fn ensure_index(&mut self, constraints: &NodeConstraints) {
        self.lookups += 1;
        let now = self.lookups;
        if let Some(index) = self.indexes.get_mut(constraints.key()) {
            index.last_used = now;
            return;
        }
        if self.indexes.len() > MAX_INDEXES
            && let Some(oldest) = self
                .indexes
                .iter()
                .filter(|(k, _)| !k.is_empty())
                .min_by_key(|(_, i)| i.last_used)
                .map(|(k, _)| k.clone())
        {
            self.indexes.remove(&oldest);
        }
        let mut index = RoomIndex {
            constraints: constraints.clone(),
            members: HashSet::new(),
            hist: BTreeMap::new(),
            counted: HashMap::new(),
            with_room: BTreeMap::new(),
            last_used: now,
        };
        for (name, n) in &self.nodes {
            if constraints.check(&n.facts).is_none() {
                index.members.insert(name.clone());
                if let Some(rooms) = self.rooms(name) {
                    index.count(name, &rooms);
                }
            }
        }
        self.indexes.insert(constraints.key().to_string(), index);
    }

    /// The capacity the workload's template may use, from its index (made
    /// sure of before): a few entries per type however many nodes there
    /// are, corrected on the nodes where the workload has pods or promises
    /// (those count as free for itself).
    fn view(
        &self,
        w: &WorkloadKey,
        constraints: &NodeConstraints,
        types: &[DeviceType],
    ) -> CapacitySnapshot {
        let mut nodes = vec![];
        if let Some(index) = self.indexes.get(constraints.key()) {
            for t in types {
                for ((free, room), count) in index.hist.get(t).into_iter().flatten() {
                    nodes.push(aggregate_entry(*t, *free, Some(*room), *count));
                }
            }
            for name in self.own_nodes(w) {
                for (t, key) in index.counted.get(name).into_iter().flatten() {
                    if !types.contains(t) {
                        continue;
                    }
                    let Some((free, pod_room)) = self.room_for(w, name, *t) else {
                        continue;
                    };
                    nodes.push(aggregate_entry(*t, key.0, Some(key.1), -1));
                    let room = pod_room.map_or(free.max(0), |p| p.min(free.max(0)));
                    nodes.push(aggregate_entry(*t, free, Some(room), 1));
                }
            }
        }
        CapacitySnapshot {
            nodes,
            claimed_unbound: self.claimed_unbound(w),
        }
    }

    /// The view read node by node, every node of the types checked.
    #[cfg(test)]
    fn view_by_node(
        &self,
        w: &WorkloadKey,
        constraints: &NodeConstraints,
        types: &[DeviceType],
    ) -> CapacitySnapshot {
        let mut nodes = vec![];
        let names: BTreeSet<&String> = types
            .iter()
            .filter_map(|t| self.by_type.get(t))
            .flatten()
            .collect();
        for name in names {
            let Some(n) = self.nodes.get(name) else {
                continue;
            };
            if !n.schedulable || constraints.check(&n.facts).is_some() {
                continue;
            }
            let mut free = BTreeMap::new();
            let mut pod_room = None;
            for t in n.allocatable.keys() {
                if let Some((f, room)) = self.room_for(w, name, *t) {
                    free.insert(*t, f);
                    pod_room = room;
                }
            }
            nodes.push(NodeCapacity {
                name: name.clone(),
                allocatable: n.allocatable.clone(),
                free,
                pod_room,
                weight: 1,
            });
        }
        CapacitySnapshot {
            nodes,
            claimed_unbound: self.claimed_unbound(w),
        }
    }

    /// Devices other tenants' queued pods will take, per type.
    fn claimed_unbound(&self, w: &WorkloadKey) -> BTreeMap<DeviceType, i64> {
        let mut claimed_unbound = BTreeMap::new();
        for p in self.unbound.values() {
            // The workload's own queued pods are its claim, counted as such;
            // other workloads' are counted by their claims, unless they have
            // none on that type (after a restart, before they reconcile).
            let counted = match &p.owner {
                Some(o) if o == w => true,
                Some(o) => self
                    .claims
                    .get(o)
                    .into_iter()
                    .flatten()
                    .any(|c| p.devices.contains_key(&c.device_type)),
                None => false,
            };
            if !counted {
                add_all(&mut claimed_unbound, &p.devices);
            }
        }
        claimed_unbound
    }
}

impl RoomIndex {
    fn count(&mut self, name: &str, rooms: &[(DeviceType, Room)]) {
        for (t, room) in rooms {
            *self.hist.entry(*t).or_default().entry(*room).or_default() += 1;
            if room.0 > 0 && room.1 > 0 {
                self.with_room
                    .entry(*t)
                    .or_default()
                    .insert(name.to_string());
            }
        }
        self.counted.insert(name.to_string(), rooms.to_vec());
    }

    fn uncount(&mut self, name: &str) {
        for (t, room) in self.counted.remove(name).unwrap_or_default() {
            if let Some(h) = self.hist.get_mut(&t)
                && let Some(c) = h.get_mut(&room)
            {
                *c -= 1;
                if *c == 0 {
                    h.remove(&room);
                }
            }
            if let Some(s) = self.with_room.get_mut(&t) {
                s.remove(name);
            }
        }
    }
}

/// An entry of the aggregate view: `count` nodes with `free` devices of
/// type `t` and room for `room` pods.
fn aggregate_entry(t: DeviceType, free: i64, room: Option<i64>, count: i64) -> NodeCapacity {
    NodeCapacity {
        name: String::new(),
        allocatable: [(t, free.max(0))].into(),
        free: [(t, free)].into(),
        pod_room: room,
        weight: count,
    }
}

fn entry_taints(st: &State, name: &str) -> Vec<k8s_openapi::api::core::v1::Taint> {
    st.nodes
        .get(name)
        .map(|n| n.facts.taints.clone())
        .unwrap_or_default()
}

/// What a relist did not deliver again: gone.
fn unseen<'a, K: Ord + Clone + 'a>(
    keys: impl Iterator<Item = &'a K>,
    seen: &BTreeSet<K>,
) -> Vec<K> {
    keys.filter(|k| !seen.contains(*k)).cloned().collect()
}

fn add_all(into: &mut BTreeMap<DeviceType, i64>, from: &BTreeMap<DeviceType, i64>) {
    for (t, n) in from {
        *into.entry(*t).or_default() += n;
    }
}

fn sub_all(from: &mut BTreeMap<DeviceType, i64>, what: &BTreeMap<DeviceType, i64>) {
    for (t, n) in what {
        *from.entry(*t).or_default() -= n;
    }
    from.retain(|_, n| *n != 0);
}

/// Per type, how much `after` offers beyond `before`.
fn increase(before: BTreeMap<DeviceType, i64>, after: BTreeMap<DeviceType, i64>) -> Freed {
    after
        .into_iter()
        .filter_map(|(t, n)| {
            let more = n.max(0) - before.get(&t).copied().unwrap_or(0).max(0);
            (more > 0).then_some((t, more))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capacity::tests::node;
    use crate::selection::Decision;
    use serde_json::json;

    const ATOM: &str = "rebellions.ai/ATOM";
    const GPU: &str = "nvidia.com/gpu";

    fn workload(name: &str, spec: serde_json::Value) -> InferenceWorkload {
        let mut spec = spec;
        spec["model"] = json!({"source": "org/m"});
        if spec.get("template").is_none() {
            spec["template"] = json!({"spec": {"containers": [{"name": "app"}]}});
        }
        serde_json::from_value(json!({
            "apiVersion": "rm-abstract.io/v1alpha1", "kind": "InferenceWorkload",
            "metadata": {"name": name, "namespace": "ns", "creationTimestamp": format!("2026-01-01T00:00:{:02}Z", name.len() % 60)},
            "spec": spec
        }))
        .unwrap()
    }

    fn key(name: &str) -> WorkloadKey {
        ("ns".into(), name.into())
    }

    fn choose(l: &Ledger, name: &str, spec: serde_json::Value) -> Selection {
        l.choose(
            &key(name),
            &workload(name, spec),
            &OperatorConfig::default(),
            None,
            &SpreadNow::default(),
            0,
        )
        .0
    }

    fn chosen_type(s: &Selection) -> Option<DeviceType> {
        s.chosen().map(|c| c.device_type)
    }

    /// A pod of workload `w` made for `t`, bound to `node` or queued.
    fn own_pod(w: &str, i: usize, t: DeviceType, node: Option<&str>) -> Pod {
        let resource = OperatorConfig::default()
            .resource_name(t)
            .unwrap()
            .to_string();
        serde_json::from_value(json!({
            "metadata": {"name": format!("{w}-{i}"), "namespace": "ns",
                "labels": {labels::WORKLOAD: w}, "annotations": {DEVICE_TYPE: t.as_str()}},
            "spec": {"nodeName": node, "containers": [{"name": "c", "resources": {"limits": {resource: "1"}}}]},
            "status": {"phase": "Pending"}
        }))
        .unwrap()
    }

    #[test]
    fn a_burst_fills_each_type_exactly_once() {
        let nodes = [
            node("atom-1", &[(ATOM, 4)]),
            node("atom-2", &[(ATOM, 4)]),
            node("gpu-1", &[(GPU, 8)]),
            node("gpu-2", &[(GPU, 8)]),
        ];
        let l = Ledger::from_lists(&nodes, [], &OperatorConfig::default());
        let picks: Vec<_> = (0..20)
            .map(|i| chosen_type(&choose(&l, &format!("w{i}"), json!({"device": "auto"}))))
            .collect();
        let count = |t| picks.iter().filter(|p| **p == Some(t)).count();
        assert_eq!(count(DeviceType::Rbln), 8, "{picks:?}");
        assert_eq!(count(DeviceType::Gpu), 12, "{picks:?}");
        assert_eq!(
            l.claimed_replicas(),
            [(DeviceType::Rbln, 8), (DeviceType::Gpu, 12)].into()
        );
        // Re-deciding a workload sees its own promise as its own.
        let again = choose(&l, "w0", json!({"device": "auto"}));
        assert_eq!(
            chosen_type(&again),
            Some(DeviceType::Rbln),
            "{}",
            again.message
        );
        assert_eq!(l.claimed_replicas()[&DeviceType::Rbln], 8);
    }

    #[test]
    fn a_bound_pod_turns_its_promise_into_use() {
        let l = Ledger::from_lists(&[node("a", &[(ATOM, 2)])], [], &OperatorConfig::default());
        choose(&l, "w", json!({"device": "auto", "replicas": 2}));
        assert_eq!(l.claimed_replicas()[&DeviceType::Rbln], 2);
        l.apply_pod(&own_pod("w", 0, DeviceType::Rbln, None));
        assert_eq!(
            l.claimed_replicas()[&DeviceType::Rbln],
            2,
            "queued: still a promise"
        );
        l.apply_pod(&own_pod("w", 0, DeviceType::Rbln, Some("a")));
        assert_eq!(l.claimed_replicas()[&DeviceType::Rbln], 1);
        let other = l.view(
            &key("other"),
            &NodeConstraints::default(),
            &[DeviceType::Rbln],
        );
        assert_eq!(
            other.free_devices(DeviceType::Rbln),
            0,
            "one bound, one promised"
        );
        // Its next decision counts the bound replica as placed.
        choose(&l, "w", json!({"device": "auto", "replicas": 2}));
        assert_eq!(l.claimed_replicas()[&DeviceType::Rbln], 1);
        // Deleting the pod frees its device.
        let freed = l.delete_pod(&own_pod("w", 0, DeviceType::Rbln, Some("a")));
        assert_eq!(freed, [(DeviceType::Rbln, 1)].into());
    }

    #[test]
    fn the_template_decides_which_nodes_count() {
        let mut tainted = node("atom", &[(ATOM, 4)]);
        tainted.spec = Some(
            serde_json::from_value(
                json!({"taints": [{"key": "dedicated", "value": "batch", "effect": "NoSchedule"}]}),
            )
            .unwrap(),
        );
        let mut gpu = node("gpu", &[(GPU, 4)]);
        gpu.metadata.labels = Some([("pool".to_string(), "gpu".to_string())].into());
        let l = Ledger::from_lists(&[tainted, gpu], [], &OperatorConfig::default());
        let plain = choose(&l, "plain", json!({"device": "auto"}));
        assert_eq!(
            chosen_type(&plain),
            Some(DeviceType::Gpu),
            "the ATOM node is tainted"
        );
        let tolerant = choose(
            &l,
            "tolerant",
            json!({"device": "auto", "template": {"spec": {"containers": [{"name": "app"}],
                "tolerations": [{"key": "dedicated", "operator": "Exists"}]}}}),
        );
        assert_eq!(chosen_type(&tolerant), Some(DeviceType::Rbln));
        let pinned = choose(
            &l,
            "pinned",
            json!({"device": "auto", "template": {"spec": {"containers": [{"name": "app"}],
                "tolerations": [{"key": "dedicated", "operator": "Exists"}],
                "nodeSelector": {"pool": "gpu"}}}}),
        );
        assert_eq!(
            chosen_type(&pinned),
            Some(DeviceType::Gpu),
            "{}",
            pinned.message
        );
    }

    #[test]
    fn queued_pods_of_other_tenants_take_their_devices_first() {
        let foreign: Pod = serde_json::from_value(json!({
            "metadata": {"name": "training", "namespace": "other"},
            "spec": {"containers": [{"name": "c", "resources": {"limits": {ATOM: "3"}}}]},
            "status": {"phase": "Pending"}
        }))
        .unwrap();
        let l = Ledger::from_lists(
            &[node("a", &[(ATOM, 4)]), node("g", &[(GPU, 4)])],
            [&foreign],
            &OperatorConfig::default(),
        );
        let s = choose(&l, "w", json!({"device": "auto", "replicas": 2}));
        assert_eq!(chosen_type(&s), Some(DeviceType::Gpu), "{}", s.message);
        // The queued pod goes away: its devices wake a waiter.
        let freed = l.delete_pod(&foreign);
        assert_eq!(freed, [(DeviceType::Rbln, 3)].into());
    }

    #[test]
    fn freed_devices_wake_only_as_many_waiters_as_they_serve() {
        let config = OperatorConfig {
            cpu_fallback: false,
            ..OperatorConfig::default()
        };
        let l = Ledger::from_lists(&[node("a", &[(ATOM, 0)])], [], &config);
        let mut names = vec![];
        for i in 0..10 {
            let name = format!("waiter-{i:02}");
            let mut iw = workload(&name, json!({"device": "rbln"}));
            iw.metadata.creation_timestamp =
                Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    jiff::Timestamp::from_second(1_000 + i).unwrap(),
                ));
            let priority = if i == 7 { 100 } else { 0 };
            let (s, _, _) = l.choose(
                &key(&name),
                &iw,
                &config,
                None,
                &SpreadNow::default(),
                priority,
            );
            assert_eq!(s.chosen().map(|c| c.decision), Some(Decision::Explicit));
            names.push(name);
        }
        assert_eq!(l.waiting(), 10);
        let woken = l.wake(&[(DeviceType::Rbln, 1)].into());
        assert_eq!(woken, [key("waiter-07")], "the highest priority first");
        let woken = l.wake(&[(DeviceType::Rbln, 2)].into());
        assert_eq!(
            woken,
            [key("waiter-07"), key("waiter-00")],
            "then the oldest"
        );
        assert!(
            l.wake(&[(DeviceType::Gpu, 4)].into()).is_empty(),
            "nobody waits for gpu"
        );
    }

    #[test]
    fn workloads_deleted_unseen_give_back_their_promises() {
        let l = Ledger::from_lists(&[node("a", &[(ATOM, 2)])], [], &OperatorConfig::default());
        choose(&l, "kept", json!({}));
        choose(&l, "gone", json!({}));
        assert_eq!(l.claimed_replicas()[&DeviceType::Rbln], 2);
        let freed = l.retain_workloads(|w| w.1 == "kept");
        assert_eq!(freed, [(DeviceType::Rbln, 1)].into());
        assert_eq!(l.claimed_replicas()[&DeviceType::Rbln], 1);
    }

    #[test]
    fn a_relist_drops_what_is_gone() {
        let l = Ledger::from_lists(&[node("a", &[(ATOM, 2)])], [], &OperatorConfig::default());
        let pod = own_pod("w", 0, DeviceType::Rbln, Some("a"));
        l.apply_pod(&pod);
        let all = |l: &Ledger| l.view(&key("x"), &NodeConstraints::default(), &[DeviceType::Rbln]);
        assert_eq!(all(&l).free_devices(DeviceType::Rbln), 1);
        l.begin_pod_resync();
        let freed = l.end_pod_resync();
        assert_eq!(freed, [(DeviceType::Rbln, 1)].into());
        assert_eq!(all(&l).free_devices(DeviceType::Rbln), 2);
        l.begin_node_resync();
        l.end_node_resync();
        assert_eq!(
            all(&l).free_devices(DeviceType::Rbln),
            0,
            "the node is gone"
        );
    }

    #[test]
    fn a_full_node_by_pod_count_holds_no_replica() {
        let mut n = node("a", &[(ATOM, 4)]);
        n.status
            .as_mut()
            .unwrap()
            .allocatable
            .as_mut()
            .unwrap()
            .insert(
                "pods".into(),
                k8s_openapi::apimachinery::pkg::api::resource::Quantity("1".into()),
            );
        let busy: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "other"},
            "spec": {"nodeName": "a", "containers": [{"name": "c"}]},
            "status": {"phase": "Running"}
        }))
        .unwrap();
        let l = Ledger::from_lists(&[n], [&busy], &OperatorConfig::default());
        let v = l.view(&key("w"), &NodeConstraints::default(), &[DeviceType::Rbln]);
        assert_eq!(v.replicas_that_fit(DeviceType::Rbln, 1), 0);
    }

    /// Node constraints of a template from its pod spec's JSON.
    fn constraints(spec: serde_json::Value) -> NodeConstraints {
        let mut spec = spec;
        spec["containers"] = json!([]);
        NodeConstraints::of(Some(&serde_json::from_value(spec).unwrap()))
    }

    proptest::proptest! {
        /// The indexed view and the node-by-node one answer alike, for
        /// templates with and without node constraints, whatever the pods,
        /// promises, and nodes relabelled or tainted after the indexes
        /// were built.
        #[test]
        fn the_indexed_view_equals_the_node_by_node_one(
            allocs in proptest::collection::vec((0i64..9, 0i64..9, 1i64..12, 0u8..4), 1..12),
            bound in proptest::collection::vec((0usize..12, 0i64..3, proptest::bool::ANY), 0..30),
            decisions in proptest::collection::vec((1i32..6, 1u32..3, 0usize..4), 0..6),
            relabel in proptest::collection::vec((0usize..12, 0u8..4), 0..4),
        ) {
            let config = OperatorConfig::default();
            let make = |i: usize, atom: i64, gpu: i64, pods: i64, kind: u8| {
                let mut n = node(&format!("n{i:02}"), &[(ATOM, atom), (GPU, gpu)]);
                let pool = if kind % 2 == 0 { "a" } else { "b" };
                n.metadata.labels = Some([("pool".to_string(), pool.to_string())].into());
                if kind >= 2 {
                    n.spec = Some(serde_json::from_value(json!({"taints": [
                        {"key": "dedicated", "value": "inference", "effect": "NoSchedule"}
                    ]})).unwrap());
                }
                n.status.as_mut().unwrap().allocatable.as_mut().unwrap().insert(
                    "pods".into(),
                    k8s_openapi::apimachinery::pkg::api::resource::Quantity(pods.to_string()),
                );
                n
            };
            let nodes: Vec<Node> = allocs
                .iter()
                .enumerate()
                .map(|(i, (atom, gpu, pods, kind))| make(i, *atom, *gpu, *pods, *kind))
                .collect();
            let sets = [
                NodeConstraints::default(),
                constraints(json!({"nodeSelector": {"pool": "a"}})),
                constraints(json!({"tolerations": [{"key": "dedicated", "operator": "Exists"}]})),
                constraints(json!({
                    "tolerations": [{"key": "dedicated", "value": "inference"}],
                    "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [{"matchExpressions": [{"key": "pool", "operator": "NotIn", "values": ["a"]}]}]
                    }}}
                })),
            ];
            let l = Ledger::from_lists(&nodes, [], &config);
            for (i, (n, devices, own)) in bound.iter().enumerate() {
                let node = format!("n{:02}", n % allocs.len());
                let mut p = own_pod(if *own { "w0" } else { "other" }, i, DeviceType::Gpu, Some(&node));
                p.spec.as_mut().unwrap().containers[0].resources = Some(
                    serde_json::from_value(json!({"limits": {GPU: devices.to_string()}})).unwrap(),
                );
                l.apply_pod(&p);
            }
            for (i, (replicas, per, set)) in decisions.iter().enumerate() {
                let mut iw = workload(&format!("w{i}"), json!({"replicas": replicas}));
                iw.spec.devices_per_replica = *per;
                let template: serde_json::Value = match set {
                    0 => json!({"containers": []}),
                    1 => json!({"containers": [], "nodeSelector": {"pool": "a"}}),
                    2 => json!({"containers": [], "tolerations": [{"key": "dedicated", "operator": "Exists"}]}),
                    _ => json!({"containers": [], "tolerations": [{"key": "dedicated", "value": "inference"}],
                        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                            "nodeSelectorTerms": [{"matchExpressions": [{"key": "pool", "operator": "NotIn", "values": ["a"]}]}]
                        }}}}),
                };
                iw.spec.template = Some(serde_json::from_value(json!({"spec": template})).unwrap());
                l.choose(&key(&format!("w{i}")), &iw, &config, None, &SpreadNow::default(), 0);
            }
            // Labels and taints change under the built indexes.
            for (n, kind) in &relabel {
                let i = n % allocs.len();
                let (atom, gpu, pods, _) = allocs[i];
                l.apply_node(&make(i, atom, gpu, pods, *kind));
            }
            for c in &sets {
                for w in ["w0", "w1", "nobody"] {
                    let fast = l.view(&key(w), c, &DeviceType::ALL);
                    let slow = l.view_by_node(&key(w), c, &DeviceType::ALL);
                    for t in [DeviceType::Rbln, DeviceType::Gpu] {
                        proptest::prop_assert_eq!(fast.free_devices(t), slow.free_devices(t), "{} {} {:?}", w, t, c);
                        for per in 1..4 {
                            proptest::prop_assert_eq!(
                                fast.replicas_that_fit(t, per),
                                slow.replicas_that_fit(t, per),
                                "{} {} per {} {:?}", w, t, per, c
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn an_evicted_index_is_rebuilt_alike() {
        let config = OperatorConfig::default();
        let nodes: Vec<Node> = (0..4)
            .map(|i| {
                let mut n = node(&format!("n{i}"), &[(GPU, 4)]);
                n.metadata.labels = Some([("slot".to_string(), i.to_string())].into());
                n
            })
            .collect();
        let l = Ledger::from_lists(&nodes, [], &config);
        let pinned = |i: usize| {
            constraints(
                json!({"nodeSelector": {"slot": (i % 4).to_string()}, "tolerations": [{"key": format!("k{i}"), "operator": "Exists"}]}),
            )
        };
        let first = pinned(0);
        l.view(&key("w"), &NodeConstraints::default(), &DeviceType::ALL);
        assert_eq!(
            l.view(&key("w"), &first, &DeviceType::ALL)
                .free_devices(DeviceType::Gpu),
            4
        );
        // Enough other sets to evict the first one's index.
        for i in 1..=MAX_INDEXES + 1 {
            l.view(&key("w"), &pinned(i), &DeviceType::ALL);
        }
        assert!(!l.lock().indexes.contains_key(first.key()), "evicted");
        assert!(
            l.lock().indexes.contains_key(""),
            "the index of no constraints stays"
        );
        // A pod binds on n0 meanwhile; the rebuilt index sees it.
        let mut p = own_pod("other", 0, DeviceType::Gpu, Some("n0"));
        p.spec.as_mut().unwrap().containers[0].resources =
            Some(serde_json::from_value(json!({"limits": {GPU: "3"}})).unwrap());
        l.apply_pod(&p);
        let v = l.view(&key("w"), &first, &DeviceType::ALL);
        assert_eq!(v.free_devices(DeviceType::Gpu), 1);
        assert_eq!(
            v.free_devices(DeviceType::Gpu),
            l.view_by_node(&key("w"), &first, &DeviceType::ALL)
                .free_devices(DeviceType::Gpu)
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        /// A burst simulated step by step: workloads decide, their pods
        /// appear unbound, a scheduler binds them to a node with a free
        /// device, and workloads re-decide in between. The ledger never
        /// promises more than the cluster has.
        #[test]
        fn a_simulated_burst_never_overcommits(
            steps in proptest::collection::vec((0usize..40, 0u8..3), 1..300),
        ) {
            let config = OperatorConfig::default();
            let nodes: Vec<Node> = (0..4).map(|i| node(&format!("a{i}"), &[(ATOM, 3)])).collect();
            let l = Ledger::from_lists(&nodes, [], &config);
            let mut chosen: BTreeMap<usize, DeviceType> = BTreeMap::new();
            let mut pods: BTreeMap<usize, Option<String>> = BTreeMap::new();
            let mut used: BTreeMap<String, i64> = BTreeMap::new();
            for (w, action) in steps {
                let name = format!("w{w}");
                match action {
                    0 => {
                        let s = l.choose(&key(&name), &workload(&name, json!({})), &config, None, &SpreadNow::default(), 0).0;
                        if let Some(c) = s.chosen() {
                            // A new choice of type replaces the pod.
                            if chosen.insert(w, c.device_type) != Some(c.device_type) {
                                if let Some(Some(n)) = pods.remove(&w) {
                                    *used.get_mut(&n).unwrap() -= 1;
                                    l.delete_pod(&own_pod(&name, 0, DeviceType::Rbln, Some(&n)));
                                }
                            }
                        }
                    }
                    1 => {
                        if chosen.get(&w) == Some(&DeviceType::Rbln) && !pods.contains_key(&w) {
                            pods.insert(w, None);
                            l.apply_pod(&own_pod(&name, 0, DeviceType::Rbln, None));
                        }
                    }
                    _ => {
                        if let Some(slot @ None) = pods.get_mut(&w) {
                            if let Some(n) = (0..4).map(|i| format!("a{i}")).find(|n| used.get(n).copied().unwrap_or(0) < 3) {
                                *used.entry(n.clone()).or_default() += 1;
                                *slot = Some(n.clone());
                                l.apply_pod(&own_pod(&name, 0, DeviceType::Rbln, Some(&n)));
                            }
                        }
                    }
                }
                let on_rbln = chosen.values().filter(|t| **t == DeviceType::Rbln).count();
                proptest::prop_assert!(on_rbln <= 12, "{on_rbln} workloads were given rbln, 12 ATOMs exist");
            }
        }
    }

    #[test]
    fn a_node_that_arrives_wakes_a_waiter() {
        let config = OperatorConfig {
            cpu_fallback: false,
            ..OperatorConfig::default()
        };
        let l = Ledger::new(config.clone());
        let (s, _, _) = l.choose(
            &key("waits"),
            &workload("waits", json!({})),
            &config,
            None,
            &SpreadNow::default(),
            0,
        );
        assert_eq!(s.reason(), "NoCapacity");
        let mut n = node("new", &[(GPU, 1)]);
        let ready = n.status.as_mut().unwrap().conditions.take();
        assert!(l.wake(&l.apply_node(&n)).is_empty(), "not Ready yet");
        n.status.as_mut().unwrap().conditions = ready;
        // Ready, but the lifecycle controller's not-ready taint is still on.
        n.spec = Some(
            serde_json::from_value(json!({"taints": [{"key": "node.kubernetes.io/not-ready", "effect": "NoSchedule"}]}))
                .unwrap(),
        );
        let freed = l.apply_node(&n);
        let (s, _, _) = l.choose(
            &key("waits"),
            &workload("waits", json!({})),
            &config,
            None,
            &SpreadNow::default(),
            0,
        );
        assert_eq!(
            s.reason(),
            "NoCapacity",
            "the taint keeps it out: {freed:?}"
        );
        // The taint goes: that wakes the waiter, though the devices were
        // counted as offered before.
        n.spec = None;
        let freed = l.apply_node(&n);
        assert_eq!(freed, [(DeviceType::Gpu, 1)].into());
        assert_eq!(l.wake(&freed), [key("waits")]);
    }
}
