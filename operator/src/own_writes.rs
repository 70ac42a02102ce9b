//! What this operator wrote that its caches have not seen yet: workload
//! statuses, Deployments; and the Deployments the apiserver refused.
//!
//! A watch cache lags behind the operator's own writes: a reconcile that runs
//! between a status write and its watch event reads the old status, and would
//! write the same status again and announce its decision twice. Reading the
//! stored object before every status write (a GET) avoids that, at the price
//! of one request per write; this memo avoids it for free.
//!
//! A reconcile may hold a copy of the workload older than the cache itself,
//! so "the watch has delivered our write" is not enough: the memo also
//! remembers which versions the watch delivered after it, and a copy is
//! current only when it is our write or one of those. An entry expires after
//! `ttl`: a watch that re-lists may skip our exact version, and then an old
//! entry must not hide for long a status someone else wrote later.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;
use rm_crds::{InferenceWorkload, InferenceWorkloadStatus};

use crate::render::RENDER_HASH;
use crate::status::DeploymentError;

/// How long an entry may wait for its watch event. Watch events arrive in
/// milliseconds; this only bounds a missed one.
pub const DEFAULT_TTL: Duration = Duration::from_secs(30);

struct Written {
    uid: Option<String>,
    resource_version: String,
    status: InferenceWorkloadStatus,
    at: Instant,
    /// The watch delivered our write...
    delivered: bool,
    /// ...and then these versions.
    later: Vec<String>,
}

pub struct OwnStatusWrites {
    ttl: Duration,
    entries: Mutex<HashMap<ObjectRef<InferenceWorkload>, Written>>,
}

impl Default for OwnStatusWrites {
    fn default() -> Self {
        Self::new(DEFAULT_TTL)
    }
}

impl OwnStatusWrites {
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ObjectRef<InferenceWorkload>, Written>> {
        // The map holds plain data; a panic elsewhere cannot leave it torn.
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records what the apiserver answered to our status write.
    pub fn record(&self, written: &InferenceWorkload) {
        let (Some(resource_version), Some(status)) = (
            written.metadata.resource_version.clone(),
            written.status.clone(),
        ) else {
            return;
        };
        let now = Instant::now();
        let mut entries = self.lock();
        entries.retain(|_, w| now.duration_since(w.at) < self.ttl);
        entries.insert(
            ObjectRef::from_obj(written),
            Written {
                uid: written.metadata.uid.clone(),
                resource_version,
                status,
                at: now,
                delivered: false,
                later: Vec::new(),
            },
        );
    }

    /// The watch delivered this version (called in watch order).
    pub fn seen(&self, cached: &InferenceWorkload) {
        let Some(rv) = cached.metadata.resource_version.as_ref() else {
            return;
        };
        let mut entries = self.lock();
        let Some(w) = entries.get_mut(&ObjectRef::from_obj(cached)) else {
            return;
        };
        if w.delivered {
            w.later.push(rv.clone());
        } else if *rv == w.resource_version {
            w.delivered = true;
        }
    }

    /// Forgets a workload that was deleted meanwhile.
    pub fn forget(&self, iw: &InferenceWorkload) {
        self.lock().remove(&ObjectRef::from_obj(iw));
    }

    /// The status last written for this workload, if the given copy predates
    /// that write; `None` when the copy holds it.
    pub fn newer_than_cache(&self, cached: &InferenceWorkload) -> Option<InferenceWorkloadStatus> {
        let entries = self.lock();
        let w = entries.get(&ObjectRef::from_obj(cached))?;
        let rv = cached.metadata.resource_version.as_ref();
        let holds_our_write =
            rv == Some(&w.resource_version) || rv.is_some_and(|rv| w.later.contains(rv));
        let stands_in =
            w.uid == cached.metadata.uid && !holds_our_write && w.at.elapsed() < self.ttl;
        stands_in.then(|| w.status.clone())
    }
}

type Key = ObjectRef<Deployment>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Plain data; a panic elsewhere cannot leave it torn.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Deployments the operator wrote, until its Deployment cache has them: a
/// reconcile right after a write must not see "no Deployment" (and choose
/// afresh, with no grace) or the one before it. Resource versions are
/// compared as numbers (etcd revisions); one that is not a number makes
/// the cache win.
#[derive(Default)]
pub struct OwnDeploymentWrites {
    entries: Mutex<HashMap<Key, (Deployment, Instant)>>,
}

impl OwnDeploymentWrites {
    pub fn record(&self, workload: &Key, written: &Deployment) {
        let mut slim = written.clone();
        // As the cache keeps it: the decisions never read the pod spec.
        slim.managed_fields_mut().clear();
        slim.spec.template.spec = None;
        let now = Instant::now();
        let mut entries = lock(&self.entries);
        entries.retain(|_, (_, at)| now.duration_since(*at) < DEFAULT_TTL);
        entries.insert(workload.clone(), (slim, now));
    }

    /// The newer of the cached Deployment and our last write.
    pub fn newest(&self, workload: &Key, cached: Option<&Deployment>) -> Option<Deployment> {
        let mut entries = lock(&self.entries);
        let Some((written, at)) = entries.get(workload) else {
            return cached.cloned();
        };
        let rv = |d: &Deployment| d.metadata.resource_version.as_deref()?.parse::<u64>().ok();
        let ours_is_newer = at.elapsed() < DEFAULT_TTL
            && match cached {
                None => true,
                Some(c) if c.metadata.uid != written.metadata.uid => false,
                Some(c) => matches!((rv(c), rv(written)), (Some(c), Some(w)) if c < w),
            };
        if ours_is_newer {
            Some(written.clone())
        } else {
            entries.remove(workload);
            cached.cloned()
        }
    }
}

/// Deployments the apiserver refused for the workload's spec (400, 422),
/// by their rendered hash: the same Deployment is not sent again until
/// the spec (and so the hash) changes.
#[derive(Default)]
pub struct RejectedDeployments {
    entries: Mutex<HashMap<Key, (String, DeploymentError)>>,
}

fn render_hash(d: &Deployment) -> Option<&String> {
    d.annotations().get(RENDER_HASH)
}

impl RejectedDeployments {
    pub fn record(&self, workload: &Key, sent: &Deployment, error: &DeploymentError) {
        if let Some(hash) = render_hash(sent) {
            lock(&self.entries).insert(workload.clone(), (hash.clone(), error.clone()));
        }
    }

    /// Why this very Deployment was refused before, if it was.
    pub fn get(&self, workload: &Key, desired: &Deployment) -> Option<DeploymentError> {
        let entries = lock(&self.entries);
        let (hash, error) = entries.get(workload)?;
        (Some(hash) == render_hash(desired)).then(|| error.clone())
    }

    pub fn forget(&self, workload: &Key) {
        lock(&self.entries).remove(workload);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rm_crds::Phase;

    fn workload(rv: &str, uid: &str, phase: Option<Phase>) -> InferenceWorkload {
        let mut iw: InferenceWorkload = serde_json::from_value(serde_json::json!({
            "apiVersion": "rm-abstract.io/v1alpha1",
            "kind": "InferenceWorkload",
            "metadata": {"name": "w", "namespace": "ns", "resourceVersion": rv, "uid": uid},
            "spec": {
                "model": {"source": "org/model"},
                "template": {"spec": {"containers": [{"name": "app", "image": "x"}]}}
            }
        }))
        .unwrap();
        iw.status = phase.map(|p| InferenceWorkloadStatus {
            phase: Some(p),
            ..Default::default()
        });
        iw
    }

    #[test]
    fn the_written_status_stands_in_until_the_watch_delivers_it() {
        let writes = OwnStatusWrites::default();
        let stale = workload("1", "u", None);
        assert_eq!(writes.newer_than_cache(&stale), None, "nothing written yet");

        writes.record(&workload("2", "u", Some(Phase::Pending)));
        let stood_in = writes.newer_than_cache(&stale).expect("cache lags");
        assert_eq!(stood_in.phase, Some(Phase::Pending));

        // Versions delivered before the write change nothing.
        writes.seen(&stale);
        assert!(writes.newer_than_cache(&stale).is_some());
        let caught_up = workload("2", "u", Some(Phase::Pending));
        writes.seen(&caught_up);
        assert_eq!(writes.newer_than_cache(&caught_up), None);
        assert!(
            writes.newer_than_cache(&stale).is_some(),
            "a reconcile may still hold a copy from before the write"
        );

        // A later change (the user's, say) is current too.
        let later = workload("3", "u", Some(Phase::Pending));
        writes.seen(&later);
        assert_eq!(writes.newer_than_cache(&later), None);
    }

    #[test]
    fn a_recreated_workload_or_an_old_entry_is_not_stood_in_for() {
        let writes = OwnStatusWrites::default();
        writes.record(&workload("2", "old-uid", Some(Phase::Running)));
        assert_eq!(
            writes.newer_than_cache(&workload("5", "new-uid", None)),
            None,
            "same name, another object"
        );

        let writes = OwnStatusWrites::new(Duration::ZERO);
        writes.record(&workload("2", "u", Some(Phase::Running)));
        assert_eq!(writes.newer_than_cache(&workload("1", "u", None)), None);
    }

    #[test]
    fn forget_drops_the_entry() {
        let writes = OwnStatusWrites::default();
        writes.record(&workload("2", "u", Some(Phase::Running)));
        writes.forget(&workload("1", "u", None));
        assert_eq!(writes.newer_than_cache(&workload("1", "u", None)), None);
    }

    fn deployment(rv: &str, uid: &str, hash: &str) -> Deployment {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "w", "namespace": "ns", "resourceVersion": rv, "uid": uid,
                "annotations": {RENDER_HASH: hash}},
            "spec": {"selector": {}, "template": {"spec": {"containers": [{"name": "c"}]}}}
        }))
        .unwrap()
    }

    #[test]
    fn our_deployment_stands_in_for_a_lagging_cache() {
        let key = ObjectRef::new("w").within("ns");
        let writes = OwnDeploymentWrites::default();
        let old = deployment("5", "u", "a");
        assert_eq!(writes.newest(&key, Some(&old)), Some(old.clone()));
        writes.record(&key, &deployment("9", "u", "b"));
        let got = writes.newest(&key, None).expect("not in the cache yet");
        assert_eq!(got.annotations()[RENDER_HASH], "b");
        assert!(got.spec.template.spec.is_none(), "kept slim");
        let got = writes.newest(&key, Some(&old)).unwrap();
        assert_eq!(got.annotations()[RENDER_HASH], "b", "the cache lags");
        let caught_up = deployment("12", "u", "b");
        assert_eq!(
            writes.newest(&key, Some(&caught_up)),
            Some(caught_up.clone())
        );
        assert_eq!(
            writes.newest(&key, Some(&old)),
            Some(old),
            "caught up once: the entry is gone"
        );
    }

    #[test]
    fn a_refused_deployment_is_known_by_its_hash() {
        let key = ObjectRef::new("w").within("ns");
        let rejected = RejectedDeployments::default();
        let err = DeploymentError {
            code: 422,
            message: "bad".into(),
        };
        rejected.record(&key, &deployment("1", "u", "a"), &err);
        assert_eq!(rejected.get(&key, &deployment("1", "u", "a")), Some(err));
        assert_eq!(
            rejected.get(&key, &deployment("1", "u", "b")),
            None,
            "the spec changed"
        );
        rejected.forget(&key);
        assert_eq!(rejected.get(&key, &deployment("1", "u", "a")), None);
    }
}
