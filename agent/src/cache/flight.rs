//! Single-flight compiles: the first request for a missing entry leads the
//! compile, later ones follow it and all see the same progress and result.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::Serialize;
use tokio::sync::watch;

use super::key::CacheKey;
use super::store::now_ms;

/// State of one compile, as followers and the API see it.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum CompileState {
    Running { fraction: f32, stage: String },
    Ready,
    Failed { status: u16, message: String },
}

/// A compile in progress, as listed by the API.
#[derive(Clone, Debug, Serialize)]
pub struct FlightView {
    pub key: CacheKey,
    pub backend: String,
    /// The model digest: who may see the compile follows the model.
    pub model: String,
    pub started_unix_ms: u64,
    #[serde(flatten)]
    pub state: CompileState,
}

struct Flight {
    tx: watch::Sender<CompileState>,
    backend: String,
    model: String,
    started_unix_ms: u64,
}

#[derive(Default)]
pub struct InFlight {
    map: Mutex<HashMap<CacheKey, Flight>>,
}

/// The request that runs the compile. Dropping it without `finish` reports a
/// failure to the followers, so they never wait forever.
pub struct Leader {
    inflight: Arc<InFlight>,
    key: CacheKey,
    tx: watch::Sender<CompileState>,
    finished: bool,
}

pub enum Role {
    Leader(Leader, watch::Receiver<CompileState>),
    Follower(watch::Receiver<CompileState>),
}

impl InFlight {
    fn lock(&self) -> MutexGuard<'_, HashMap<CacheKey, Flight>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Joins the compile of `key`, starting it if none runs.
    pub fn join(self: &Arc<Self>, key: &CacheKey, backend: &str, model: &str) -> Role {
        let mut map = self.lock();
        if let Some(f) = map.get(key) {
            return Role::Follower(f.tx.subscribe());
        }
        let (tx, rx) = watch::channel(CompileState::Running {
            fraction: 0.0,
            stage: "queued".into(),
        });
        map.insert(
            key.clone(),
            Flight {
                tx: tx.clone(),
                backend: backend.to_string(),
                model: model.to_string(),
                started_unix_ms: now_ms(),
            },
        );
        Role::Leader(
            Leader {
                inflight: self.clone(),
                key: key.clone(),
                tx,
                finished: false,
            },
            rx,
        )
    }

    pub fn get(&self, key: &CacheKey) -> Option<FlightView> {
        self.lock().get(key).map(|f| FlightView {
            key: key.clone(),
            backend: f.backend.clone(),
            model: f.model.clone(),
            started_unix_ms: f.started_unix_ms,
            state: f.tx.borrow().clone(),
        })
    }

    pub fn list(&self) -> Vec<FlightView> {
        let mut v: Vec<FlightView> = self
            .lock()
            .iter()
            .map(|(k, f)| FlightView {
                key: k.clone(),
                backend: f.backend.clone(),
                model: f.model.clone(),
                started_unix_ms: f.started_unix_ms,
                state: f.tx.borrow().clone(),
            })
            .collect();
        v.sort_by_key(|f| f.started_unix_ms);
        v
    }
}

impl Leader {
    pub fn key(&self) -> &CacheKey {
        &self.key
    }

    /// A progress callback that can be sent to other threads.
    pub fn progress_fn(&self) -> crate::backend::ProgressFn {
        let tx = self.tx.clone();
        Arc::new(move |fraction: f32, stage: &str| {
            tx.send_replace(CompileState::Running {
                fraction: fraction.clamp(0.0, 1.0),
                stage: stage.to_string(),
            });
        })
    }

    /// Ends the flight: it leaves the map first (the entry is already in the
    /// store on success), then every follower gets `state`.
    pub fn finish(mut self, state: CompileState) {
        self.finished = true;
        self.inflight.lock().remove(&self.key);
        self.tx.send_replace(state);
    }
}

impl Drop for Leader {
    fn drop(&mut self) {
        if !self.finished {
            self.inflight.lock().remove(&self.key);
            self.tx.send_replace(CompileState::Failed {
                status: 500,
                message: "the compile task ended without a result; retry the prepare".into(),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> CacheKey {
        "a".repeat(64).parse().expect("valid key")
    }

    #[test]
    fn second_join_follows_the_first() {
        let f = Arc::new(InFlight::default());
        let Role::Leader(leader, _) = f.join(&key(), "cpu", "sha256:m") else {
            panic!("first join must lead")
        };
        let Role::Follower(rx) = f.join(&key(), "cpu", "sha256:m") else {
            panic!("second join must follow")
        };
        (leader.progress_fn())(0.5, "quantize");
        assert_eq!(
            *rx.borrow(),
            CompileState::Running {
                fraction: 0.5,
                stage: "quantize".into()
            }
        );
        leader.finish(CompileState::Ready);
        assert_eq!(*rx.borrow(), CompileState::Ready);
        assert!(f.get(&key()).is_none());
        assert!(matches!(
            f.join(&key(), "cpu", "sha256:m"),
            Role::Leader(..)
        ));
    }

    #[test]
    fn dropped_leader_fails_followers() {
        let f = Arc::new(InFlight::default());
        let Role::Leader(leader, _) = f.join(&key(), "cpu", "sha256:m") else {
            panic!("first join must lead")
        };
        let Role::Follower(rx) = f.join(&key(), "cpu", "sha256:m") else {
            panic!("second join must follow")
        };
        drop(leader);
        assert!(matches!(*rx.borrow(), CompileState::Failed { .. }));
    }
}
