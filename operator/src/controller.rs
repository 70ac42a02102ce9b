//! The InferenceWorkload controller: watches workloads, their Deployments,
//! and the nodes and pods that make up free capacity (the ledger);
//! reconciles each workload into Deployments on the device types
//! `selection` picks (one, or one per type with `placement: spread`).
//!
//! A reconcile reads only from the watch caches and writes only what changed:
//! the Deployment (and, for served workloads, the Service) when its rendered
//! hash differs, the status when it differs, an Event when the decision
//! changes. At steady state it writes nothing.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::scheduling::v1::PriorityClass;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use rm_crds::{DeviceType, InferenceWorkload, Placement, TypePlacement, labels};
use serde_json::json;

use crate::config::OperatorConfig;
use crate::ledger::{Freed, Ledger, WorkloadKey};
use crate::metrics::Metrics;
use crate::own_writes::OwnStatusWrites;
use crate::own_writes::{OwnDeploymentWrites, RejectedDeployments};
use crate::placement::{
    Unschedulable, current_placement, deployed_device_type, failing_pods, is_for_device_type,
    is_own_pod, ready_pods, unschedulable_pods,
};
use crate::render::{deployment_name, deployment_names, is_current, render_part};
use crate::selection::{Decision, Parts, Selection, SpreadNow};
use crate::serve::{is_controlled_by, render_service, service_is_current};
use crate::status::{DeploymentError, Observed, ServiceState, desired_status};
use crate::workload_pods::WorkloadPods;

/// Field manager of every write the operator makes (server-side apply).
pub const FIELD_MANAGER: &str = "rm-operator";

/// Shared state of all reconciles.
pub struct Context {
    pub client: Client,
    pub config: OperatorConfig,
    /// Capacity: offered, held, and promised (see `ledger`).
    pub ledger: Arc<Ledger>,
    /// Reconcile requests for workloads woken by a reconcile.
    pub wake: futures::channel::mpsc::UnboundedSender<ObjectRef<InferenceWorkload>>,
    /// Each workload's own pods (readiness, failures, placement).
    pub pods: Arc<WorkloadPods>,
    pub deployments: Store<Deployment>,
    /// Services of served workloads (labelled with the workload).
    pub services: Store<Service>,
    /// PriorityClasses, for the order of waiting workloads.
    pub priority_classes: Store<PriorityClass>,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub own_writes: Arc<OwnStatusWrites>,
    /// Deployments this operator wrote that its cache may not have yet.
    pub applied: OwnDeploymentWrites,
    /// Deployments the apiserver refused, by what was sent.
    pub rejected: RejectedDeployments,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the workload has no namespace")]
    NoNamespace,
    #[error("writing to the apiserver failed: {0}")]
    Kube(#[from] kube::Error),
}

impl Error {
    fn metric_label(&self) -> &'static str {
        match self {
            Error::NoNamespace => "no_namespace",
            Error::Kube(_) => "kube",
        }
    }
}

/// Which workloads may be watched: all namespaces, or one.
#[derive(Clone, Debug, Default)]
pub struct Scope {
    pub namespace: Option<String>,
}

impl Scope {
    fn api<K>(&self, client: Client) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as Resource>::DynamicType: Default,
    {
        match &self.namespace {
            Some(ns) => Api::namespaced(client, ns),
            None => Api::all(client),
        }
    }
}

/// Runs the controller until `shutdown` resolves.
pub async fn run(
    client: Client,
    config: OperatorConfig,
    scope: Scope,
    metrics: Arc<Metrics>,
    reporter: Reporter,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
    ready: Arc<std::sync::atomic::AtomicBool>,
) {
    let workloads: Api<InferenceWorkload> = scope.api(client.clone());
    let deployments_api: Api<Deployment> = scope.api(client.clone());
    let services_api: Api<Service> = scope.api(client.clone());
    let pods_api: Api<Pod> = Api::all(client.clone());
    let nodes_api: Api<Node> = Api::all(client.clone());

    // Caches stripped of what the decisions never read, to keep memory low.
    // Nodes live in the ledger only (capacity, labels, taints).
    let ledger = Arc::new(Ledger::new(config.clone()));
    let node_stream = watcher(nodes_api, watcher::Config::default()).default_backoff();
    // Finished pods hold no devices; leave them out.
    let pod_config =
        watcher::Config::default().fields("status.phase!=Succeeded,status.phase!=Failed");
    let slim_config = config.clone();
    let pod_stream = watcher(pods_api, pod_config)
        .default_backoff()
        .modify(move |p| slim_pod(p, &slim_config));
    let pods = Arc::new(WorkloadPods::default());
    let (deployments, deployment_writer) = reflector::store();
    let deployment_stream = watcher(
        deployments_api,
        watcher::Config::default().labels(labels::WORKLOAD),
    )
    .default_backoff()
    .modify(|d: &mut Deployment| {
        // Decisions read the annotations, the template's annotations and
        // the status; the pod spec is the user's and can be large.
        d.managed_fields_mut().clear();
        d.spec.template.spec = None;
    })
    .reflect(deployment_writer)
    .touched_objects();
    let (priority_classes, class_writer) = reflector::store();
    let class_stream = watcher(
        Api::<PriorityClass>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .modify(|c: &mut PriorityClass| c.managed_fields_mut().clear())
    .reflect(class_writer)
    .touched_objects();
    let (services, service_writer) = reflector::store();
    let service_stream = watcher(
        services_api,
        watcher::Config::default().labels(labels::WORKLOAD),
    )
    .default_backoff()
    .modify(|s: &mut Service| s.managed_fields_mut().clear())
    .reflect(service_writer)
    .touched_objects();

    // The caches are driven by tasks of their own, so that they fill
    // independently of the controller, and changes reach it as reconcile
    // requests mapped to the affected workloads only.
    let (trigger, triggers) = futures::channel::mpsc::unbounded::<ObjectRef<InferenceWorkload>>();

    let own_writes = Arc::new(OwnStatusWrites::default());
    let seen = own_writes.clone();
    let (workload_store, workload_writer) = reflector::store();
    let gone_ledger = ledger.clone();
    let gone_trigger = trigger.clone();
    let listed = workload_store.clone();
    let workload_stream = watcher(workloads, watcher::Config::default())
        .default_backoff()
        .modify(|iw: &mut InferenceWorkload| {
            iw.managed_fields_mut().clear();
            iw.annotations_mut()
                .remove("kubectl.kubernetes.io/last-applied-configuration");
        })
        .reflect(workload_writer)
        .inspect_ok(move |ev| {
            // A deleted workload's promise frees what it held for waiters.
            let freed = match ev {
                watcher::Event::Delete(iw) => match (iw.namespace(), iw.metadata.name.clone()) {
                    (Some(ns), Some(name)) => gone_ledger.forget(&(ns, name)),
                    _ => Freed::new(),
                },
                // Listed again (after a watch gap): those deleted meanwhile
                // sent no Delete event.
                watcher::Event::InitDone => gone_ledger.retain_workloads(|(ns, name)| {
                    listed.get(&ObjectRef::new(name).within(ns)).is_some()
                }),
                _ => Freed::new(),
            };
            send_all(&gone_trigger, wake_refs(&gone_ledger, &freed));
        })
        .applied_objects()
        .inspect_ok(move |iw| seen.seen(iw));
    let controller = Controller::for_stream(workload_stream, workload_store.clone());

    let (nodes_synced, node_sync) = tokio::sync::oneshot::channel();
    spawn_ledger_feed(node_stream, trigger.clone(), nodes_synced, {
        let ledger = ledger.clone();
        move |ev: watcher::Event<Node>| {
            let freed = match ev {
                watcher::Event::Init => {
                    ledger.begin_node_resync();
                    Freed::new()
                }
                watcher::Event::InitApply(n) | watcher::Event::Apply(n) => ledger.apply_node(&n),
                watcher::Event::InitDone => {
                    ledger.end_node_resync();
                    Freed::new()
                }
                watcher::Event::Delete(n) => {
                    ledger.delete_node(&n.name_any());
                    Freed::new()
                }
            };
            wake_refs(&ledger, &freed)
        }
    });
    let (pods_synced, pod_sync) = tokio::sync::oneshot::channel();
    let scope_ns = scope.namespace.clone();
    spawn_ledger_feed(pod_stream, trigger.clone(), pods_synced, {
        let ledger = ledger.clone();
        let pods = pods.clone();
        move |ev: watcher::Event<Pod>| {
            let (own, freed) = match ev {
                watcher::Event::Init => {
                    ledger.begin_pod_resync();
                    pods.begin_resync();
                    (None, Freed::new())
                }
                watcher::Event::InitApply(p) => {
                    let freed = ledger.apply_pod(&p);
                    pods.apply(p);
                    (None, freed)
                }
                watcher::Event::InitDone => {
                    pods.end_resync();
                    (None, ledger.end_pod_resync())
                }
                watcher::Event::Apply(p) => {
                    let freed = ledger.apply_pod(&p);
                    let own = own_workload(&p);
                    pods.apply(p);
                    (own, freed)
                }
                watcher::Event::Delete(p) => {
                    pods.delete(&p);
                    (own_workload(&p), ledger.delete_pod(&p))
                }
            };
            let mut refs: Vec<_> = own.into_iter().collect();
            refs.extend(wake_refs(&ledger, &freed));
            // Pods are watched in all namespaces; workloads maybe in one.
            if let Some(ns) = &scope_ns {
                refs.retain(|r| r.namespace.as_deref() == Some(ns.as_str()));
            }
            refs
        }
    });
    spawn_trigger(deployment_stream, trigger.clone(), |d: Deployment| {
        owner_workload(&d.metadata)
    });
    spawn_trigger(service_stream, trigger.clone(), |s: Service| {
        owner_workload(&s.metadata)
    });
    // A class's value changes only the order of later wake-ups.
    spawn_trigger(class_stream, trigger.clone(), |_: PriorityClass| None);

    let _ = tokio::join!(
        node_sync,
        pod_sync,
        deployments.wait_until_ready(),
        services.wait_until_ready(),
        priority_classes.wait_until_ready()
    );
    tracing::info!("node, pod, deployment and service caches synced");

    let ctx = Arc::new(Context {
        recorder: Recorder::new(client.clone(), reporter),
        client,
        config,
        ledger,
        wake: trigger,
        pods,
        deployments,
        services,
        priority_classes,
        metrics: metrics.clone(),
        own_writes,
        applied: OwnDeploymentWrites::default(),
        rejected: RejectedDeployments::default(),
    });
    let phase_store = workload_store.clone();
    // Ready to reconcile: the controller itself holds reconciles until its
    // own workload cache is synced.
    ready.store(true, std::sync::atomic::Ordering::Relaxed);
    tokio::spawn(async move {
        // The workloads-by-phase gauge, recounted from the cache.
        loop {
            let state = phase_store.state();
            metrics.count_phases(state.iter().map(AsRef::as_ref));
            tokio::time::sleep(Duration::from_secs(10)).await;
        }
    });

    controller
        .reconcile_on(triggers)
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            match res {
                Ok((obj, _)) => tracing::debug!(workload = %obj, "reconciled"),
                Err(e) => tracing::debug!(error = %e, "reconcile did not run"),
            }
        })
        .await;
}

/// Drives a watch stream (filling its cache) and sends the workloads each
/// changed object maps to.
fn spawn_trigger<K, S, F, I>(
    stream: S,
    trigger: futures::channel::mpsc::UnboundedSender<ObjectRef<InferenceWorkload>>,
    map: F,
) where
    S: futures::Stream<Item = Result<K, watcher::Error>> + Send + 'static,
    K: Send + 'static,
    F: Fn(K) -> I + Send + 'static,
    I: IntoIterator<Item = ObjectRef<InferenceWorkload>>,
{
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(item) = stream.next().await {
            match item {
                Ok(obj) => {
                    for r in map(obj) {
                        if trigger.unbounded_send(r).is_err() {
                            return;
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "watch failed; retrying with back-off"),
            }
        }
    });
}

/// Drives a watch stream into the ledger: `on_event` applies each event
/// and returns the workloads to reconcile. `synced` fires after the first
/// complete list.
fn spawn_ledger_feed<K, S, F>(
    stream: S,
    trigger: futures::channel::mpsc::UnboundedSender<ObjectRef<InferenceWorkload>>,
    synced: tokio::sync::oneshot::Sender<()>,
    mut on_event: F,
) where
    S: futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
    K: Send + 'static,
    F: FnMut(watcher::Event<K>) -> Vec<ObjectRef<InferenceWorkload>> + Send + 'static,
{
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        let mut synced = Some(synced);
        while let Some(item) = stream.next().await {
            match item {
                Ok(ev) => {
                    let done = matches!(ev, watcher::Event::InitDone);
                    let refs = on_event(ev);
                    if done && let Some(s) = synced.take() {
                        let _ = s.send(());
                    }
                    if !send_all(&trigger, refs) {
                        return;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "watch failed; retrying with back-off"),
            }
        }
    });
}

/// Sends reconcile requests; false once the controller is gone.
fn send_all(
    trigger: &futures::channel::mpsc::UnboundedSender<ObjectRef<InferenceWorkload>>,
    refs: Vec<ObjectRef<InferenceWorkload>>,
) -> bool {
    refs.into_iter().all(|r| trigger.unbounded_send(r).is_ok())
}

/// The waiting workloads that freed devices can serve.
fn wake_refs(ledger: &Ledger, freed: &Freed) -> Vec<ObjectRef<InferenceWorkload>> {
    ledger
        .wake(freed)
        .into_iter()
        .map(|(ns, name)| ObjectRef::new(&name).within(&ns))
        .collect()
}

/// The workload a pod belongs to (its label).
fn own_workload(pod: &Pod) -> Option<ObjectRef<InferenceWorkload>> {
    let name = pod.labels().get(labels::WORKLOAD)?;
    Some(ObjectRef::new(name).within(&pod.namespace()?))
}

/// The workload that controls a Deployment or Service.
fn owner_workload(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> Option<ObjectRef<InferenceWorkload>> {
    let owner = meta
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true) && o.kind == "InferenceWorkload")?;
    Some(ObjectRef::new(&owner.name).within(meta.namespace.as_deref()?))
}

/// Keeps only what capacity, placement and triggers read of a pod: every
/// pod of the cluster passes through the watch, and workloads' pods are
/// kept, so the rest is dropped, down to the containers' non-device
/// resources.
fn slim_pod(p: &mut Pod, config: &OperatorConfig) {
    use k8s_openapi::api::core::v1::{Container, PodSpec, PodStatus, ResourceRequirements};
    let devices_only = |m: &Option<BTreeMap<String, Quantity>>| {
        m.as_ref()
            .map(|m| {
                m.iter()
                    .filter(|(k, _)| config.resource_names.values().any(|r| r == *k))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect::<BTreeMap<_, _>>()
            })
            .filter(|m| !m.is_empty())
    };
    let slim_container = |c: &Container| Container {
        name: c.name.clone(),
        resources: c
            .resources
            .as_ref()
            .map(|r| ResourceRequirements {
                requests: devices_only(&r.requests),
                limits: devices_only(&r.limits),
                ..Default::default()
            })
            .filter(|r| r.requests.is_some() || r.limits.is_some()),
        ..Default::default()
    };
    let spec = p.spec.as_ref().map(|s| PodSpec {
        node_name: s.node_name.clone(),
        containers: s.containers.iter().map(slim_container).collect(),
        init_containers: s
            .init_containers
            .as_ref()
            .map(|cs| cs.iter().map(slim_container).collect()),
        ..Default::default()
    });
    // Why a workload's own containers fail goes into its status; other
    // pods are only counted.
    let own = p.labels().contains_key(labels::WORKLOAD);
    let status = p.status.as_ref().map(|s| PodStatus {
        phase: s.phase.clone(),
        container_statuses: s
            .container_statuses
            .as_ref()
            .filter(|_| own)
            .map(|cs| slim_container_statuses(cs)),
        init_container_statuses: s
            .init_container_statuses
            .as_ref()
            .filter(|_| own)
            .map(|cs| slim_container_statuses(cs)),
        conditions: s.conditions.as_ref().map(|cs| {
            cs.iter()
                .filter(|c| c.type_ == "PodScheduled" || c.type_ == "Ready")
                .cloned()
                .collect()
        }),
        ..Default::default()
    });
    p.managed_fields_mut().clear();
    p.annotations_mut()
        .retain(|k, _| k == crate::render::DEVICE_TYPE);
    // Only the workload label is read, by every reconcile, for every pod.
    p.labels_mut().retain(|k, _| k == labels::WORKLOAD);
    p.metadata.owner_references = None;
    p.spec = spec;
    p.status = status;
}

/// What `placement::failing_pods` reads: name, state and the last
/// termination, its message cut to what a status shows.
fn slim_container_statuses(
    cs: &[k8s_openapi::api::core::v1::ContainerStatus],
) -> Vec<k8s_openapi::api::core::v1::ContainerStatus> {
    use k8s_openapi::api::core::v1::{
        ContainerState, ContainerStateTerminated, ContainerStateWaiting, ContainerStatus,
    };
    let terminated = |t: &ContainerStateTerminated| ContainerStateTerminated {
        exit_code: t.exit_code,
        reason: t.reason.clone(),
        // The last lines are the ones read.
        message: t.message.as_deref().map(|m| {
            let mut start = m.len().saturating_sub(1024);
            while !m.is_char_boundary(start) {
                start += 1;
            }
            m[start..].to_string()
        }),
        ..Default::default()
    };
    let state = |s: &ContainerState| ContainerState {
        running: s.running.clone(),
        terminated: s.terminated.as_ref().map(terminated),
        waiting: s.waiting.as_ref().map(|w| ContainerStateWaiting {
            reason: w.reason.clone(),
            message: w.message.clone(),
        }),
    };
    cs.iter()
        .map(|c| ContainerStatus {
            name: c.name.clone(),
            ready: c.ready,
            restart_count: c.restart_count,
            state: c.state.as_ref().map(state),
            last_state: c.last_state.as_ref().map(state),
            ..Default::default()
        })
        .collect()
}

pub async fn reconcile(iw: Arc<InferenceWorkload>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile();
    let ns = iw.namespace().ok_or(Error::NoNamespace)?;
    let name = iw.name_any();
    let now = jiff::Timestamp::now();
    let key: WorkloadKey = (ns.clone(), name.clone());
    let pods = ctx.pods.of(&key);
    let spread = iw.spec.placement == Placement::Spread;
    // The Deployments the workload owns, by name: our own last write where
    // the cache has not caught up with it (a lagging cache must not look
    // like "no Deployment", a fresh choice with no grace).
    let owned: BTreeMap<String, Deployment> = deployment_names(&name)
        .filter_map(|n| {
            let dref = ObjectRef::<Deployment>::new(&n).within(&ns);
            let cached = ctx.deployments.get(&dref);
            let d = ctx.applied.newest(&dref, cached.as_deref())?;
            is_controlled_by(&d.metadata, &iw).then_some((n, d))
        })
        .collect();
    let whole = owned.get(&name).cloned();
    let (current, unschedulable) = match whole
        .as_ref()
        .filter(|_| !spread)
        .and_then(|d| current_placement(&iw, d, pods.iter().map(AsRef::as_ref), now))
    {
        Some((current, unschedulable)) => (Some(current), unschedulable),
        None => (None, None),
    };
    // Where a `spread` workload's replicas are (it never moves them, but
    // for one at a time with `moveUp`).
    let spread_now = if spread {
        spread_now(&iw, &name, &owned, &pods, &ctx.config, now)
    } else {
        SpreadNow::default()
    };
    let (selection, parts) = decide(&iw, &key, current.as_ref(), &spread_now, &ctx);
    let part_types: Vec<DeviceType> = parts.iter().map(|(c, _)| c.device_type).collect();
    let of_part_types =
        |p: &&Pod| is_own_pod(p, &iw) && part_types.iter().any(|t| is_for_device_type(p, *t));
    let failing = failing_pods(pods.iter().map(AsRef::as_ref).filter(of_part_types), now);
    let unschedulable = if spread {
        unschedulable_pods(pods.iter().map(AsRef::as_ref).filter(of_part_types), now)
    } else {
        unschedulable
    };

    let mut deployment_error = None;
    let mut applied: BTreeMap<String, Deployment> = BTreeMap::new();
    for (chosen, replicas) in &parts {
        let replicas = i32::try_from(*replicas).unwrap_or(i32::MAX);
        let dname = deployment_name(&name, spread.then_some(chosen.device_type));
        let dref = ObjectRef::<Deployment>::new(&dname).within(&ns);
        let existing = owned.get(&dname);
        // A move up rolls with a surge until no pod of another type is
        // left, so that the ready count never drops.
        let surge = iw.spec.move_up
            && (matches!(chosen.decision, Decision::MovedUp { .. })
                || pods
                    .iter()
                    .any(|p| !is_for_device_type(p, chosen.device_type)));
        match render_part(&iw, chosen, replicas, spread, surge, &ctx.config) {
            Ok(desired) if existing.is_some_and(|e| is_current(e, &desired)) => {}
            // Refused as it is: sending it again changes nothing until the
            // spec does (every capacity event would re-send it).
            Ok(desired) if let Some(err) = ctx.rejected.get(&dref, &desired) => {
                deployment_error = Some(err);
            }
            Ok(desired) => {
                let api: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ns);
                ctx.metrics.write("deployment");
                match api
                    .patch(
                        &dname,
                        &PatchParams::apply(FIELD_MANAGER).force(),
                        &Patch::Apply(&desired),
                    )
                    .await
                {
                    Ok(d) => {
                        tracing::info!(workload = %name, namespace = %ns, deployment = %dname, device = %chosen.device_type, replicas, "applied Deployment");
                        ctx.applied.record(&dref, &d);
                        ctx.rejected.forget(&dref);
                        applied.insert(dname, d);
                    }
                    // The apiserver refused it: report it, do not retry hot.
                    Err(kube::Error::Api(e)) if (400..500).contains(&e.code) && e.code != 409 => {
                        let err = DeploymentError {
                            code: e.code,
                            message: e.message.clone(),
                        };
                        if err.is_spec_error() {
                            ctx.rejected.record(&dref, &desired, &err);
                        }
                        deployment_error = Some(err);
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            Err(e) => {
                deployment_error = Some(DeploymentError {
                    code: 422,
                    message: e.to_string(),
                })
            }
        }
    }
    // Deployments of types (or a placement) no longer chosen go; with
    // nothing chosen the old one stays and serves.
    if !parts.is_empty() && deployment_error.is_none() {
        let wanted: Vec<String> = parts
            .iter()
            .map(|(c, _)| deployment_name(&name, spread.then_some(c.device_type)))
            .collect();
        for stale in owned.keys().filter(|n| !wanted.contains(n)) {
            let api: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ns);
            ctx.metrics.write("deployment");
            match api.delete(stale, &DeleteParams::default()).await {
                Ok(_) => {
                    tracing::info!(workload = %name, namespace = %ns, deployment = %stale, "deleted a Deployment of a type no longer chosen")
                }
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    let deployment_of = |dname: &str| applied.get(dname).or_else(|| owned.get(dname));
    // Ready replicas on the types the status reports: right after a move
    // the Deployment still counts the old type's pods.
    let ready_on = |t: DeviceType| {
        i32::try_from(ready_pods(
            pods.iter()
                .map(AsRef::as_ref)
                .filter(|p| is_own_pod(p, &iw) && is_for_device_type(p, t)),
        ))
        .unwrap_or(i32::MAX)
    };
    let mut placements: Vec<TypePlacement> = parts
        .iter()
        .map(|(c, n)| TypePlacement {
            device_type: c.device_type,
            replicas: i32::try_from(*n).unwrap_or(i32::MAX),
            ready_replicas: ready_on(c.device_type),
        })
        .collect();
    // Types the workload is leaving whose pods still serve (a move rolls).
    for t in DeviceType::ALL {
        if !part_types.contains(&t) && ready_on(t) > 0 {
            placements.push(TypePlacement {
                device_type: t,
                replicas: 0,
                ready_replicas: ready_on(t),
            });
        }
    }
    let serving_ready = placements.iter().map(|p| p.ready_replicas).sum();
    let deployment = match parts.first() {
        Some((c, _)) => deployment_of(&deployment_name(&name, spread.then_some(c.device_type))),
        None => deployment_of(&name),
    };
    let reported_type = selection
        .chosen()
        .map(|c| c.device_type)
        .or_else(|| deployment.and_then(deployed_device_type));
    let ready_pods = if parts.is_empty() {
        reported_type.map(ready_on)
    } else {
        Some(
            placements
                .iter()
                .filter(|p| p.replicas > 0)
                .map(|p| p.ready_replicas)
                .sum(),
        )
    };
    let replicas = spread.then(|| {
        parts
            .iter()
            .filter_map(|(c, _)| {
                deployment_of(&deployment_name(&name, Some(c.device_type)))?
                    .status
                    .as_ref()?
                    .replicas
            })
            .sum()
    });

    let service = reconcile_service(&iw, &ns, &name, &ctx).await?;

    let observed = Observed {
        service,
        deployment,
        deployment_error,
        ready_pods,
        serving_ready: Some(serving_ready),
        replicas,
        placements,
        unschedulable: unschedulable.as_ref().map(|u| (u.count, u.message.clone())),
        failing: failing.map(|f| (f.count, f.message)),
    };
    // The cache may lag behind our own last status write: decide against
    // that write, so that carried-over reasons and timestamps are kept and
    // nothing is written or announced twice.
    let stored = ctx.own_writes.newer_than_cache(&iw).map(|status| {
        let mut stored = (*iw).clone();
        stored.status = Some(status);
        stored
    });
    let stored = stored.as_ref().unwrap_or(&iw);
    let status = desired_status(stored, &selection, &observed, &ctx.config, &Time(now));
    if stored.status.as_ref() != Some(&status) {
        // A decision that changes shows in the status, so Events are decided
        // here, against the stored status.
        publish_decision_events(
            stored,
            &status,
            &selection,
            observed
                .deployment_error
                .as_ref()
                .map(DeploymentError::advice)
                .as_deref(),
            observed.failing.as_ref().map(|(_, m)| m.as_str()),
            &ctx,
        )
        .await;
        let api: Api<InferenceWorkload> = Api::namespaced(ctx.client.clone(), &ns);
        let patch = json!({
            "apiVersion": "rm-abstract.io/v1alpha1",
            "kind": "InferenceWorkload",
            "status": status,
        });
        ctx.metrics.write("status");
        match api
            .patch_status(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await
        {
            Ok(written) => ctx.own_writes.record(&written),
            // Deleted meanwhile: nothing left to report on.
            Err(kube::Error::Api(e)) if e.code == 404 => {
                ctx.own_writes.forget(&iw);
                return Ok(Action::await_change());
            }
            // The stored status is unknown; what was recorded before stands.
            Err(e) => return Err(e.into()),
        }
    }

    Ok(requeue_after(
        &selection,
        unschedulable.as_ref(),
        &ctx.config,
    ))
}

/// The priority the workload's pods will have, as the Priority admission
/// plugin sets it: the template's `priority`, else its `priorityClassName`'s
/// value, else the global default class's, else 0. Orders the workloads
/// waiting for devices.
pub fn pod_priority(iw: &InferenceWorkload, classes: &Store<PriorityClass>) -> i32 {
    let spec = iw.spec.template.as_ref().and_then(|t| t.spec.as_ref());
    if let Some(p) = spec.and_then(|s| s.priority) {
        return p;
    }
    match spec.and_then(|s| s.priority_class_name.as_deref()) {
        Some(name) => classes
            .get(&ObjectRef::new(name))
            .map_or(0, |c| c.value.unwrap_or(0)),
        None => classes
            .state()
            .iter()
            .find(|c| c.global_default == Some(true))
            .map_or(0, |c| c.value.unwrap_or(0)),
    }
}

/// A `spread` workload's replicas per type (its Deployments'), the ready
/// ones, and the types whose pods are stuck (unschedulable past the grace
/// period, or failing).
fn spread_now(
    iw: &InferenceWorkload,
    name: &str,
    owned: &BTreeMap<String, Deployment>,
    pods: &[Arc<Pod>],
    config: &OperatorConfig,
    now: jiff::Timestamp,
) -> SpreadNow {
    let mut out = SpreadNow::default();
    for t in DeviceType::ALL {
        let Some(d) = owned.get(&deployment_name(name, Some(t))) else {
            continue;
        };
        let of_type = || {
            pods.iter()
                .map(AsRef::as_ref)
                .filter(move |p| is_own_pod(p, iw) && is_for_device_type(p, t))
        };
        out.replicas
            .insert(t, u32::try_from(d.spec.replicas.unwrap_or(0)).unwrap_or(0));
        out.ready.insert(t, ready_pods(of_type()));
        let stuck = unschedulable_pods(of_type(), now)
            .is_some_and(|u| u.longest > config.unschedulable_grace);
        if stuck || failing_pods(of_type(), now).is_some() {
            out.stuck.insert(t);
        }
    }
    out
}

/// Chooses the device (under the ledger's lock, see `Ledger::choose`);
/// devices the workload no longer needs wake whoever waits for them.
fn decide(
    iw: &InferenceWorkload,
    key: &WorkloadKey,
    current: Option<&crate::selection::Current>,
    spread_now: &SpreadNow,
    ctx: &Context,
) -> (Selection, Parts) {
    let priority = pod_priority(iw, &ctx.priority_classes);
    let (selection, parts, freed) =
        ctx.ledger
            .choose(key, iw, &ctx.config, current, spread_now, priority);
    for r in wake_refs(&ctx.ledger, &freed) {
        tracing::debug!(workload = %r, "woken by devices another workload released");
        ctx.wake.unbounded_send(r).ok();
    }
    (selection, parts)
}

/// The Service of a served workload: applied when it differs from what is
/// rendered, deleted when `spec.serve` is removed. A Service of the same name
/// that the workload does not control is left alone and reported.
async fn reconcile_service(
    iw: &InferenceWorkload,
    ns: &str,
    name: &str,
    ctx: &Context,
) -> Result<ServiceState, Error> {
    let api: Api<Service> = Api::namespaced(ctx.client.clone(), ns);
    let cached = ctx.services.get(&ObjectRef::new(name).within(ns));
    let desired = match render_service(iw) {
        Ok(Some(desired)) => desired,
        Ok(None) => {
            if let Some(svc) = cached.filter(|s| is_controlled_by(&s.metadata, iw)) {
                ctx.metrics.write("service");
                match api.delete(&svc.name_any(), &DeleteParams::default()).await {
                    Ok(_) => {
                        tracing::info!(workload = %name, namespace = %ns, "spec.serve removed; deleted the Service")
                    }
                    Err(kube::Error::Api(e)) if e.code == 404 => {}
                    Err(e) => return Err(e.into()),
                }
            }
            return Ok(ServiceState::Absent);
        }
        Err(e) => {
            return Ok(ServiceState::Failed {
                reason: "ServiceRejected",
                message: e.to_string(),
            });
        }
    };
    if let Some(existing) = cached.as_deref()
        && is_controlled_by(&existing.metadata, iw)
        && service_is_current(existing, &desired)
    {
        return Ok(ServiceState::Present);
    }
    // Not in the cache as ours: only then is a read needed, to make sure a
    // Service of that name is not someone else's before taking it over.
    if !cached
        .as_deref()
        .is_some_and(|s| is_controlled_by(&s.metadata, iw))
        && let Some(other) = api.get_opt(name).await?
        && !is_controlled_by(&other.metadata, iw)
    {
        return Ok(ServiceState::Failed {
            reason: "ServiceConflict",
            message: format!(
                "a Service named {name} exists and is not this workload's; delete or rename it, and the operator creates its own"
            ),
        });
    }
    ctx.metrics.write("service");
    match api
        .patch(
            name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&desired),
        )
        .await
    {
        Ok(_) => {
            tracing::info!(workload = %name, namespace = %ns, port = iw.spec.serve.as_ref().map(|s| s.port), "applied Service");
            Ok(ServiceState::Present)
        }
        Err(kube::Error::Api(e)) if (400..500).contains(&e.code) && e.code != 409 => {
            Ok(ServiceState::Failed {
                reason: "ServiceRejected",
                message: format!("the Service was rejected: {}", e.message),
            })
        }
        Err(e) => Err(e.into()),
    }
}

/// Watches re-trigger on capacity changes; the timer only covers what no
/// watch event announces: a grace period running out.
fn requeue_after(
    selection: &Selection,
    unschedulable: Option<&Unschedulable>,
    config: &OperatorConfig,
) -> Action {
    // Once the grace period is over, the decision it allowed has been made
    // (moved, or kept for a reason a watch event changes): no timer then,
    // or a stuck workload would be reconciled every second.
    match (selection.chosen(), unschedulable) {
        (Some(_), Some(u)) if u.longest <= config.unschedulable_grace => {
            let left = config.unschedulable_grace.saturating_sub(u.longest);
            Action::requeue(left + Duration::from_secs(1))
        }
        _ => Action::requeue(Duration::from_secs(300)),
    }
}

pub fn error_policy(iw: Arc<InferenceWorkload>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.error(error.metric_label());
    tracing::warn!(workload = %iw.name_any(), error = %error, "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(5))
}

/// One Event per change of decision, never one per reconcile.
async fn publish_decision_events(
    iw: &InferenceWorkload,
    status: &rm_crds::InferenceWorkloadStatus,
    selection: &Selection,
    deployment_error: Option<&str>,
    failing: Option<&str>,
    ctx: &Context,
) {
    let previous = iw.status.as_ref();
    let previous_type = previous
        .and_then(|s| s.device.as_ref())
        .map(|d| d.device_type);
    let previous_reason = previous
        .and_then(|s| {
            s.conditions
                .iter()
                .find(|c| c.type_ == rm_crds::workload::condition::DEVICE_SELECTED)
        })
        .map(|c| c.reason.as_str());
    let event = match selection.chosen() {
        Some(c) if Some(c.device_type) != previous_type => {
            ctx.metrics
                .selection(c.device_type.as_str(), c.decision.reason());
            let reason = match c.decision {
                Decision::Reselected { .. } => "Reselected",
                Decision::MovedUp { .. } => "MovedUp",
                _ if previous_type.is_some() => "Reselected",
                _ => "DeviceSelected",
            };
            Some((EventType::Normal, reason, selection.message.clone()))
        }
        // `spread` moving up on the types it runs on already.
        Some(c)
            if matches!(c.decision, Decision::MovedUp { .. })
                && previous_reason != Some(selection.reason()) =>
        {
            Some((EventType::Normal, "MovedUp", selection.message.clone()))
        }
        None if previous_reason != Some(selection.reason()) => Some((
            EventType::Warning,
            selection.reason(),
            selection.message.clone(),
        )),
        _ => None,
    };
    // Once per episode: while the Available condition already says so, not again.
    let previous_available = previous
        .and_then(|s| {
            s.conditions
                .iter()
                .find(|c| c.type_ == rm_crds::workload::condition::AVAILABLE)
        })
        .map(|c| c.reason.as_str());
    let rejected = deployment_error.filter(|_| {
        !matches!(
            previous_available,
            Some("DeploymentRejected" | "DeploymentForbidden")
        )
    });
    let failing = failing.filter(|_| previous_available != Some("ContainersFailing"));
    // Serving: announced when the endpoint starts answering, and when the
    // Service cannot be written; each once per change of reason.
    let serving = |s: Option<&rm_crds::InferenceWorkloadStatus>| {
        s.and_then(|s| {
            s.conditions
                .iter()
                .find(|c| c.type_ == rm_crds::workload::condition::SERVING)
        })
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
    };
    let serving_event = match (serving(previous), serving(Some(status))) {
        (before, Some((now_status, reason, message)))
            if before.as_ref().map(|b| &b.1) != Some(&reason) =>
        {
            match (now_status.as_str(), reason.as_str()) {
                ("True", _) => Some((EventType::Normal, "EndpointReady", message)),
                (_, "ServiceConflict") => Some((EventType::Warning, "ServiceConflict", message)),
                (_, "ServiceRejected") => Some((EventType::Warning, "ServiceRejected", message)),
                _ => None,
            }
        }
        _ => None,
    };
    let events = event
        .into_iter()
        .chain(serving_event)
        .chain(rejected.map(|e| (EventType::Warning, "DeploymentRejected", e.to_string())))
        .chain(failing.map(|f| {
            (
                EventType::Warning,
                "ContainersFailing",
                format!("the workload's pods fail: {f}"),
            )
        }));
    for (type_, reason, note) in events {
        ctx.metrics.write("event");
        let ev = Event {
            type_,
            reason: reason.into(),
            note: Some(truncate(&note, 1000)),
            action: "SelectDevice".into(),
            secondary: None,
        };
        if let Err(e) = ctx.recorder.publish(&ev, &iw.object_ref(&())).await {
            tracing::warn!(workload = %iw.name_any(), error = %e, "cannot publish event");
        }
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capacity::pod_device_requests;
    use crate::placement::is_own_pod;

    fn workload(ns: &str, name: &str) -> InferenceWorkload {
        serde_json::from_value(json!({
            "apiVersion": "rm-abstract.io/v1alpha1",
            "kind": "InferenceWorkload",
            "metadata": {"name": name, "namespace": ns},
            "spec": {
                "model": {"source": "org/model"},
                "template": {"spec": {"containers": [{"name": "app", "image": "x"}]}}
            }
        }))
        .unwrap()
    }

    #[test]
    fn a_slim_pod_keeps_what_decisions_read() {
        let config = OperatorConfig::default();
        let gpu = config.resource_name(rm_crds::DeviceType::Gpu).unwrap();
        let mut pod: Pod = serde_json::from_value(json!({
            "metadata": {
                "name": "p", "namespace": "ns",
                "labels": {labels::WORKLOAD: "w", "app": "x"},
                "annotations": {crate::render::DEVICE_TYPE: "gpu", "other": "dropped"}
            },
            "spec": {
                "nodeName": "n1",
                "initContainers": [{"name": "i", "image": "x", "resources": {"limits": {"cpu": "1"}}}],
                "containers": [
                    {"name": "a", "image": "x", "env": [{"name": "E", "value": "v"}],
                     "resources": {"requests": {"cpu": "2", gpu: "2"}, "limits": {"memory": "1Gi", gpu: "2"}}},
                    {"name": "b", "image": "x", "resources": {"limits": {"memory": "1Gi"}}}
                ]
            },
            "status": {"phase": "Pending", "conditions": [
                {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/3 nodes"},
                {"type": "Ready", "status": "False"}
            ]}
        }))
        .unwrap();
        let before = pod_device_requests(&pod, &config);
        slim_pod(&mut pod, &config);

        assert_eq!(pod_device_requests(&pod, &config), before);
        assert_eq!(before[&rm_crds::DeviceType::Gpu], 2);
        let spec = pod.spec.as_ref().unwrap();
        assert_eq!(spec.node_name.as_deref(), Some("n1"));
        let a = &spec.containers[0];
        assert!(a.env.is_none() && a.image.is_none());
        let res = a.resources.as_ref().unwrap();
        assert_eq!(
            res.requests.as_ref().unwrap().keys().collect::<Vec<_>>(),
            [gpu]
        );
        assert_eq!(
            res.limits.as_ref().unwrap().keys().collect::<Vec<_>>(),
            [gpu]
        );
        assert!(
            spec.containers[1].resources.is_none(),
            "no device, no resources"
        );
        assert!(
            spec.init_containers.as_ref().unwrap()[0]
                .resources
                .is_none()
        );
        let conditions = pod.status.as_ref().unwrap().conditions.as_ref().unwrap();
        assert_eq!(conditions.len(), 2, "PodScheduled and Ready");
        assert_eq!(conditions[0].type_, "PodScheduled");
        assert_eq!(pod.annotations().len(), 1);
        assert_eq!(pod.labels().len(), 1);
        assert!(is_own_pod(&pod, &workload("ns", "w")));
        assert!(!is_own_pod(&pod, &workload("other", "w")));
        assert!(!is_own_pod(&pod, &workload("ns", "w2")));
    }

    #[test]
    fn a_pod_without_the_label_is_no_workloads_own() {
        let pod: Pod =
            serde_json::from_value(json!({"metadata": {"name": "p", "namespace": "ns"}})).unwrap();
        let mut nameless = workload("ns", "w");
        nameless.metadata.name = None;
        assert!(!is_own_pod(&pod, &nameless));
        assert!(!is_own_pod(&pod, &workload("ns", "w")));
    }
}
