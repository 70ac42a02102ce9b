//! The pods of each workload (those with its label), kept from the pod
//! watch, so that a reconcile reads its own pods only: its cost does not
//! grow with the pods of the cluster. Capacity, which needs every pod, is
//! the ledger's.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use rm_crds::labels;

use crate::ledger::WorkloadKey;

type PodKey = (WorkloadKey, String);

#[derive(Default)]
struct Index {
    by_workload: HashMap<WorkloadKey, BTreeMap<String, Arc<Pod>>>,
    /// Pods seen since a relist began: the others are gone.
    resync: Option<BTreeSet<PodKey>>,
}

#[derive(Default)]
pub struct WorkloadPods {
    index: Mutex<Index>,
}

fn key(pod: &Pod) -> Option<PodKey> {
    let workload = pod.labels().get(labels::WORKLOAD)?.clone();
    Some(((pod.namespace()?, workload), pod.metadata.name.clone()?))
}

impl WorkloadPods {
    fn lock(&self) -> std::sync::MutexGuard<'_, Index> {
        // Plain data; a panic elsewhere cannot leave it torn.
        self.index
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A pod was added or changed (pods of no workload are ignored).
    pub fn apply(&self, pod: Pod) {
        let Some((w, name)) = key(&pod) else {
            return;
        };
        let mut index = self.lock();
        if let Some(seen) = index.resync.as_mut() {
            seen.insert((w.clone(), name.clone()));
        }
        index
            .by_workload
            .entry(w)
            .or_default()
            .insert(name, Arc::new(pod));
    }

    pub fn delete(&self, pod: &Pod) {
        let Some((w, name)) = key(pod) else {
            return;
        };
        let mut index = self.lock();
        if let Some(pods) = index.by_workload.get_mut(&w) {
            pods.remove(&name);
            if pods.is_empty() {
                index.by_workload.remove(&w);
            }
        }
    }

    pub fn begin_resync(&self) {
        self.lock().resync = Some(BTreeSet::new());
    }

    pub fn end_resync(&self) {
        let mut index = self.lock();
        let Some(seen) = index.resync.take() else {
            return;
        };
        index.by_workload.retain(|w, pods| {
            pods.retain(|name, _| seen.contains(&(w.clone(), name.clone())));
            !pods.is_empty()
        });
    }

    /// The workload's pods.
    pub fn of(&self, w: &WorkloadKey) -> Vec<Arc<Pod>> {
        self.lock()
            .by_workload
            .get(w)
            .map(|pods| pods.values().cloned().collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(ns: &str, name: &str, workload: Option<&str>) -> Pod {
        let mut p: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": ns}
        }))
        .unwrap();
        if let Some(w) = workload {
            p.labels_mut().insert(labels::WORKLOAD.into(), w.into());
        }
        p
    }

    #[test]
    fn pods_are_found_by_their_workload_and_a_relist_drops_the_gone() {
        let index = WorkloadPods::default();
        index.apply(pod("a", "w-1", Some("w")));
        index.apply(pod("a", "w-2", Some("w")));
        index.apply(pod("b", "w-1", Some("w")));
        index.apply(pod("a", "other", None));
        let w = ("a".to_string(), "w".to_string());
        assert_eq!(index.of(&w).len(), 2);
        assert_eq!(
            index.of(&("b".into(), "w".into())).len(),
            1,
            "namespaces apart"
        );
        index.delete(&pod("a", "w-1", Some("w")));
        assert_eq!(index.of(&w).len(), 1);
        index.begin_resync();
        index.apply(pod("b", "w-1", Some("w")));
        index.end_resync();
        assert!(index.of(&w).is_empty(), "not listed again: gone");
        assert_eq!(index.of(&("b".into(), "w".into())).len(), 1);
    }
}
