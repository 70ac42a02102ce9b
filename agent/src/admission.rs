//! Admission: how many requests run at once on each resource (the CPU's
//! compute slots, one worker's device set, the compile slots), who waits,
//! and who is refused.
//!
//! Waiting requests are queued per tenant (namespace) and served round-robin
//! between tenants, first-come within one: a namespace that sends a hundred
//! requests waits behind its own, not in front of everyone else's. Each
//! namespace may have only so many requests waiting on a resource (429, its
//! own doing), and the whole queue is bounded (503, the node is busy): a
//! client is told to come back rather than left to wait without end, and no
//! tenant can grow the agent's memory by queueing.
//!
//! A permit is a slot; dropping it hands the slot to the next waiter. A
//! waiter that goes away (its client disconnected) is skipped.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

/// Bounds on one kind of work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bounds {
    /// Requests that run at once on one resource.
    pub slots: usize,
    /// Of those, how many one tenant may hold: a tenant at its share waits
    /// even when a slot is free, so that long work (compiles take hours)
    /// cannot hold every slot.
    pub per_tenant_slots: usize,
    /// Requests one tenant may have waiting on one resource.
    pub per_tenant_queue: usize,
    /// Requests waiting on one resource, all tenants together.
    pub queue: usize,
}

/// Why a request was not queued.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error(
        "namespace {tenant} already has {waiting} requests waiting for {resource} on this node (at most {limit}); wait for them to finish, then retry"
    )]
    TenantQueueFull {
        tenant: String,
        resource: String,
        waiting: usize,
        limit: usize,
    },
    #[error(
        "{resource} on this node is busy: {waiting} requests are waiting (at most {limit}); retry later"
    )]
    QueueFull {
        resource: String,
        waiting: usize,
        limit: usize,
    },
}

impl Refused {
    /// 429 when the tenant's own requests fill its share; 503 when the node
    /// is busy for everyone.
    pub fn http_status(&self) -> u16 {
        match self {
            Refused::TenantQueueFull { .. } => 429,
            Refused::QueueFull { .. } => 503,
        }
    }
}

#[derive(Default)]
struct Resource {
    running: usize,
    /// Slots held, per tenant.
    held: HashMap<String, usize>,
    /// Tenants with waiters, in the order they are next served.
    order: VecDeque<String>,
    waiting: HashMap<String, VecDeque<oneshot::Sender<Permit>>>,
    queued: usize,
}

impl Resource {
    /// Forgets the waiters whose request went away (client hung up) before
    /// their turn, so that they no longer count against their namespace's
    /// share or the queue. Otherwise they would count until the slot is
    /// next handed on, which may be long: a worker busy with a cancelled
    /// request keeps its slot until it answers.
    fn forget_gone(&mut self) {
        if self.queued == 0 {
            return;
        }
        let mut queued = 0;
        self.waiting.retain(|_, q| {
            q.retain(|tx| !tx.is_closed());
            queued += q.len();
            !q.is_empty()
        });
        let waiting = &self.waiting;
        self.order.retain(|t| waiting.contains_key(t));
        self.queued = queued;
    }

    fn release(&mut self, tenant: &str) {
        self.running = self.running.saturating_sub(1);
        if let Some(n) = self.held.get_mut(tenant) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.held.remove(tenant);
            }
        }
    }
}

#[derive(Default)]
struct State {
    resources: HashMap<String, Resource>,
}

/// The admission state of one kind of work (requests, or compiles).
#[derive(Clone)]
pub struct Admission {
    bounds: Bounds,
    state: Arc<Mutex<State>>,
}

/// A running slot on a resource; dropping it frees the slot for the next
/// tenant in turn.
pub struct Permit {
    resource: String,
    tenant: String,
    state: Arc<Mutex<State>>,
    bounds: Bounds,
    /// Set once the slot was handed on (a permit sent to a waiter that had
    /// already gone comes back and is released again).
    released: bool,
}

/// A place in a resource's queue, or a slot at once.
pub enum Ticket {
    Ready(Permit),
    Queued {
        /// Requests ahead of this one when it was queued.
        ahead: usize,
        rx: oneshot::Receiver<Permit>,
    },
}

impl Ticket {
    /// Waits for the slot. The slot is never lost: if the waiter is dropped
    /// after being granted, the permit it held is dropped with it.
    pub async fn wait(self) -> Option<Permit> {
        match self {
            Ticket::Ready(p) => Some(p),
            Ticket::Queued { rx, .. } => rx.await.ok(),
        }
    }
}

impl Admission {
    pub fn new(bounds: Bounds) -> Self {
        Admission {
            bounds: Bounds {
                slots: bounds.slots.max(1),
                per_tenant_slots: bounds.per_tenant_slots.max(1),
                ..bounds
            },
            state: Arc::new(Mutex::new(State::default())),
        }
    }

    pub fn bounds(&self) -> Bounds {
        self.bounds
    }

    /// A slot on `resource` for `tenant` now, a place in its queue, or a
    /// refusal that says why.
    pub fn enqueue(&self, resource: &str, tenant: &str) -> Result<Ticket, Refused> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let r = st.resources.entry(resource.to_string()).or_default();
        r.forget_gone();
        let holds = r.held.get(tenant).copied().unwrap_or(0);
        let waits_before = r.waiting.get(tenant).is_some_and(|q| !q.is_empty());
        if r.running < self.bounds.slots && holds < self.bounds.per_tenant_slots && !waits_before {
            r.running += 1;
            *r.held.entry(tenant.to_string()).or_default() += 1;
            return Ok(Ticket::Ready(Permit {
                resource: resource.to_string(),
                tenant: tenant.to_string(),
                state: self.state.clone(),
                bounds: self.bounds,
                released: false,
            }));
        }
        let mine = r.waiting.get(tenant).map_or(0, VecDeque::len);
        if mine >= self.bounds.per_tenant_queue {
            return Err(Refused::TenantQueueFull {
                tenant: tenant.to_string(),
                resource: resource.to_string(),
                waiting: mine,
                limit: self.bounds.per_tenant_queue,
            });
        }
        if r.queued >= self.bounds.queue {
            return Err(Refused::QueueFull {
                resource: resource.to_string(),
                waiting: r.queued,
                limit: self.bounds.queue,
            });
        }
        let (tx, rx) = oneshot::channel();
        let q = r.waiting.entry(tenant.to_string()).or_default();
        if q.is_empty() {
            r.order.push_back(tenant.to_string());
        }
        q.push_back(tx);
        let ahead = r.queued + r.running;
        r.queued += 1;
        Ok(Ticket::Queued { ahead, rx })
    }

    /// Requests waiting, per resource (for metrics).
    pub fn waiting(&self) -> usize {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.resources.values().map(|r| r.queued).sum()
    }

    /// Requests running, all resources together (for metrics).
    pub fn running(&self) -> usize {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.resources.values().map(|r| r.running).sum()
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        self.released = true;
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let Some(r) = st.resources.get_mut(&self.resource) else {
            return;
        };
        r.release(&self.tenant);
        // Hand the slot to the next tenant in turn whose waiter is still
        // there and who holds less than its share; a waiter whose client
        // left is skipped.
        let mut skipped = Vec::new();
        while let Some(tenant) = r.order.pop_front() {
            let holds = r.held.get(&tenant).copied().unwrap_or(0);
            if holds >= self.bounds.per_tenant_slots {
                skipped.push(tenant);
                continue;
            }
            let Some(q) = r.waiting.get_mut(&tenant) else {
                continue;
            };
            let Some(tx) = q.pop_front() else {
                r.waiting.remove(&tenant);
                continue;
            };
            r.queued -= 1;
            let more = !q.is_empty();
            if !more {
                r.waiting.remove(&tenant);
            }
            r.running += 1;
            *r.held.entry(tenant.clone()).or_default() += 1;
            let next = Permit {
                resource: self.resource.clone(),
                tenant: tenant.clone(),
                state: self.state.clone(),
                bounds: self.bounds,
                released: false,
            };
            match tx.send(next) {
                Ok(()) => {
                    if more {
                        r.order.push_back(tenant);
                    }
                    break;
                }
                Err(mut back) => {
                    // The waiter went away: take the slot back and keep
                    // looking.
                    back.released = true;
                    r.release(&tenant);
                    if more {
                        r.order.push_front(tenant);
                    }
                }
            }
        }
        // Tenants at their share keep their place, in order, at the front.
        for t in skipped.into_iter().rev() {
            r.order.push_front(t);
        }
        if r.running == 0 && r.queued == 0 {
            st.resources.remove(&self.resource);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission(slots: usize, per_tenant: usize, queue: usize) -> Admission {
        Admission::new(Bounds {
            slots,
            per_tenant_slots: slots,
            per_tenant_queue: per_tenant,
            queue,
        })
    }

    fn ready(t: Ticket) -> Permit {
        match t {
            Ticket::Ready(p) => p,
            Ticket::Queued { .. } => panic!("expected a slot at once"),
        }
    }

    fn queued(t: Ticket) -> oneshot::Receiver<Permit> {
        match t {
            Ticket::Queued { rx, .. } => rx,
            Ticket::Ready(_) => panic!("expected to wait"),
        }
    }

    #[test]
    fn tenants_are_served_in_turn_not_in_arrival_order() {
        let a = admission(1, 10, 100);
        let running = ready(a.enqueue("cpu", "a").unwrap());
        // Tenant a queues three, then b one: b goes second, not fourth.
        let mut a_rx: Vec<_> = (0..3)
            .map(|_| queued(a.enqueue("cpu", "a").unwrap()))
            .collect();
        let mut b_rx = queued(a.enqueue("cpu", "b").unwrap());
        drop(running);
        let first = a_rx[0].try_recv().expect("a's first waiter runs first");
        assert!(b_rx.try_recv().is_err());
        drop(first);
        let second = b_rx.try_recv().expect("then b, before a's others");
        assert!(a_rx[1].try_recv().is_err());
        drop(second);
        let third = a_rx[1].try_recv().expect("then a's second");
        assert_eq!(a.waiting(), 1);
        drop(third);
        assert!(a_rx[2].try_recv().is_ok());
    }

    #[test]
    fn a_tenant_filling_its_share_gets_429_and_a_full_queue_503() {
        let a = admission(1, 2, 3);
        let _run = ready(a.enqueue("cpu", "a").unwrap());
        let _w1 = a.enqueue("cpu", "a").unwrap();
        let _w2 = a.enqueue("cpu", "a").unwrap();
        let e = a.enqueue("cpu", "a").err().unwrap();
        assert_eq!(e.http_status(), 429);
        assert!(e.to_string().contains("namespace a"), "{e}");
        let _w3 = a.enqueue("cpu", "b").unwrap();
        let e = a.enqueue("cpu", "c").err().unwrap();
        assert_eq!(e.http_status(), 503);
        // Other resources are not affected.
        assert!(matches!(a.enqueue("gpu:0", "c"), Ok(Ticket::Ready(_))));
    }

    #[test]
    fn a_waiter_that_left_is_skipped_and_the_slot_not_lost() {
        let a = admission(1, 10, 10);
        let run = ready(a.enqueue("cpu", "a").unwrap());
        let gone = queued(a.enqueue("cpu", "b").unwrap());
        let mut next = queued(a.enqueue("cpu", "c").unwrap());
        drop(gone);
        drop(run);
        let p = next.try_recv().expect("c runs: b had left");
        assert_eq!(a.running(), 1);
        drop(p);
        assert_eq!(a.running(), 0);
        assert_eq!(a.waiting(), 0);
        // And a fresh request gets the slot at once.
        assert!(matches!(a.enqueue("cpu", "d"), Ok(Ticket::Ready(_))));
    }

    #[test]
    fn waiters_that_left_count_against_no_share() {
        let a = admission(1, 2, 3);
        let run = ready(a.enqueue("cpu", "a").unwrap());
        // A namespace whose clients hang up while the slot stays taken is
        // not refused for requests it no longer has.
        for _ in 0..10 {
            drop(queued(a.enqueue("cpu", "a").unwrap()));
        }
        let mut w1 = queued(a.enqueue("cpu", "a").unwrap());
        let _w2 = queued(a.enqueue("cpu", "a").unwrap());
        assert_eq!(a.waiting(), 2);
        assert_eq!(
            a.enqueue("cpu", "a").err().map(|e| e.http_status()),
            Some(429)
        );
        let _b = queued(a.enqueue("cpu", "b").unwrap());
        assert_eq!(
            a.enqueue("cpu", "c").err().map(|e| e.http_status()),
            Some(503)
        );
        drop(run);
        assert!(w1.try_recv().is_ok(), "the first waiter still there runs");
    }

    #[test]
    fn slots_run_at_once_up_to_their_number() {
        let a = admission(2, 10, 10);
        let _p1 = ready(a.enqueue("cpu", "a").unwrap());
        let _p2 = ready(a.enqueue("cpu", "a").unwrap());
        let _w = queued(a.enqueue("cpu", "b").unwrap());
        assert_eq!(a.running(), 2);
    }

    #[test]
    fn a_tenant_at_its_share_waits_while_others_take_free_slots() {
        let a = Admission::new(Bounds {
            slots: 2,
            per_tenant_slots: 1,
            per_tenant_queue: 10,
            queue: 10,
        });
        let a1 = ready(a.enqueue("compile", "a").unwrap());
        // a's second waits although a slot is free; b takes it at once.
        let mut a2 = queued(a.enqueue("compile", "a").unwrap());
        let b1 = ready(a.enqueue("compile", "b").unwrap());
        assert!(a2.try_recv().is_err());
        // b's end does not hand a its second slot: a still holds its share.
        drop(b1);
        assert!(a2.try_recv().is_err());
        assert_eq!(a.running(), 1);
        // a's first ends: its second runs.
        drop(a1);
        let _a2 = a2.try_recv().expect("a's second runs after its first");
        assert_eq!(a.running(), 1);
    }
}
