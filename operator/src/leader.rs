//! Leader election on a `coordination.k8s.io/v1` Lease, so that several
//! operator replicas can run and only one reconciles.
//!
//! The holder renews every `renew_every`; a candidate takes the lease once
//! `renewTime + leaseDurationSeconds` has passed. Writes carry the
//! resourceVersion they read, so two candidates cannot both win. With the
//! defaults (15 s lease, 2 s retry) a new leader takes over within 17 s of the
//! old one dying, and at once when it stops cleanly (it releases the lease).

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use kube::{Client, ResourceExt};

#[derive(Clone, Debug)]
pub struct LeaderElection {
    api: Api<Lease>,
    name: String,
    identity: String,
    lease_duration: Duration,
    renew_every: Duration,
}

impl LeaderElection {
    pub fn new(client: Client, namespace: &str, name: &str, identity: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            renew_every: Duration::from_secs(2),
        }
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Waits until this process holds the lease.
    pub async fn acquire(&self) {
        let mut logged_holder = None;
        loop {
            match self.try_acquire_or_renew().await {
                Ok(Attempt::Held) => {
                    tracing::info!(lease = %self.name, identity = %self.identity, "became leader");
                    return;
                }
                Ok(Attempt::HeldBy(holder)) => {
                    if logged_holder.as_ref() != Some(&holder) {
                        tracing::info!(lease = %self.name, %holder, "waiting for leadership");
                        logged_holder = Some(holder);
                    }
                }
                Err(e) => {
                    tracing::warn!(lease = %self.name, error = %e, "cannot read or write the lease")
                }
            }
            tokio::time::sleep(self.renew_every).await;
        }
    }

    /// Renews the lease until leadership is lost: another holder took it, or
    /// renewals failed for longer than the lease lasts. Returns then.
    pub async fn hold(&self) {
        let mut last_renewal = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(self.renew_every).await;
            match self.try_acquire_or_renew().await {
                Ok(Attempt::Held) => last_renewal = tokio::time::Instant::now(),
                Ok(Attempt::HeldBy(holder)) => {
                    tracing::error!(lease = %self.name, %holder, "lost leadership to another holder");
                    return;
                }
                Err(e) => {
                    tracing::warn!(lease = %self.name, error = %e, "lease renewal failed");
                    if last_renewal.elapsed() > self.lease_duration {
                        tracing::error!(lease = %self.name, "could not renew the lease in time; leadership lost");
                        return;
                    }
                }
            }
        }
    }

    /// Gives the lease up so that a standby takes over at once.
    pub async fn release(&self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.name).await else {
            return;
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.renew_time = None;
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => tracing::info!(lease = %self.name, "released leadership"),
            Err(e) => tracing::warn!(lease = %self.name, error = %e, "could not release the lease"),
        }
    }

    async fn try_acquire_or_renew(&self) -> Result<Attempt, kube::Error> {
        let now = MicroTime(jiff::Timestamp::now());
        let duration_secs = i32::try_from(self.lease_duration.as_secs()).unwrap_or(15);
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(duration_secs),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(Attempt::Held),
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    Ok(Attempt::HeldBy("another candidate".into()))
                }
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let mine = holder == self.identity;
        let expired = spec.renew_time.as_ref().is_none_or(|t| {
            let lasts = i64::from(spec.lease_duration_seconds.unwrap_or(duration_secs));
            t.0.as_second() + lasts < now.0.as_second()
        });
        if !mine && !holder.is_empty() && !expired {
            return Ok(Attempt::HeldBy(holder));
        }
        if !mine {
            spec.acquire_time = Some(now.clone());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
            spec.holder_identity = Some(self.identity.clone());
        }
        spec.renew_time = Some(now);
        spec.lease_duration_seconds = Some(duration_secs);
        // replace carries the resourceVersion read above: a concurrent
        // writer makes this fail with 409 instead of both winning.
        match self
            .api
            .replace(&lease.name_any(), &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(Attempt::Held),
            Err(kube::Error::Api(e)) if e.code == 409 => {
                Ok(Attempt::HeldBy("another candidate".into()))
            }
            Err(e) => Err(e),
        }
    }
}

enum Attempt {
    Held,
    HeldBy(String),
}
