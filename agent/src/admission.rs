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
//!
//! Requests may name a group (the model they run) and its own slot count
//! ([`Admission::enqueue_in`]): the CPU's llama.cpp engine batches up to
//! `--cpu-max-batch` sequences of one model in one context, so that many
//! requests of the same model run at once, while a request for another
//! model waits until the running group has drained. When such a waiter is
//! at the head of the turn, no newcomer of the running group jumps ahead
//! of it, so a busy model cannot starve another one.

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

impl Bounds {
    /// One tenant's share of a group of `slots`: all of them where the
    /// bounds give a tenant every slot (requests), else the bounds' share.
    fn share(&self, slots: usize) -> usize {
        if self.per_tenant_slots >= self.slots {
            slots.max(self.per_tenant_slots)
        } else {
            self.per_tenant_slots
        }
    }
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

/// A request waiting for its turn.
struct Waiter {
    group: String,
    slots: usize,
    tx: oneshot::Sender<Permit>,
}

#[derive(Default)]
struct Resource {
    running: usize,
    /// The group (model) of the running requests.
    group: String,
    /// Slots held, per tenant.
    held: HashMap<String, usize>,
    /// Tenants with waiters, in the order they are next served.
    order: VecDeque<String>,
    waiting: HashMap<String, VecDeque<Waiter>>,
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
            q.retain(|w| !w.tx.is_closed());
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
        self.enqueue_in(resource, tenant, "", self.bounds.slots)
    }

    /// [`Admission::enqueue`] for a request of `group` (a model), of which
    /// `slots` may run at once on `resource` (at least the bounds' slots);
    /// requests of another group wait until the running group has drained.
    pub fn enqueue_in(
        &self,
        resource: &str,
        tenant: &str,
        group: &str,
        slots: usize,
    ) -> Result<Ticket, Refused> {
        let slots = slots.max(self.bounds.slots);
        let share = self.bounds.share(slots);
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let r = st.resources.entry(resource.to_string()).or_default();
        r.forget_gone();
        let holds = r.held.get(tenant).copied().unwrap_or(0);
        let waits_before = r.waiting.get(tenant).is_some_and(|q| !q.is_empty());
        let other_waits = r.waiting.values().flatten().any(|w| w.group != group);
        let fits = r.running == 0 || (r.group == group && r.running < slots && !other_waits);
        if fits && holds < share && !waits_before {
            r.running += 1;
            r.group = group.to_string();
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
        q.push_back(Waiter {
            group: group.to_string(),
            slots,
            tx,
        });
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
        // Hand the freed slots to the next tenants in turn whose waiter is
        // still there and who hold less than their share; a waiter whose
        // client left is skipped. A waiter of another group than the
        // running one waits at the head until the group has drained; then
        // as many of its group as fit start together.
        let mut skipped = Vec::new();
        while let Some(tenant) = r.order.pop_front() {
            let Some(q) = r.waiting.get_mut(&tenant) else {
                continue;
            };
            let Some(w) = q.front() else {
                r.waiting.remove(&tenant);
                continue;
            };
            let holds = r.held.get(&tenant).copied().unwrap_or(0);
            if holds >= self.bounds.share(w.slots) {
                skipped.push(tenant);
                continue;
            }
            let fits = r.running == 0 || (w.group == r.group && r.running < w.slots);
            if !fits {
                r.order.push_front(tenant);
                break;
            }
            let Some(w) = q.pop_front() else {
                continue;
            };
            r.queued -= 1;
            let more = !q.is_empty();
            if !more {
                r.waiting.remove(&tenant);
            }
            r.running += 1;
            r.group = w.group;
            *r.held.entry(tenant.clone()).or_default() += 1;
            let next = Permit {
                resource: self.resource.clone(),
                tenant: tenant.clone(),
                state: self.state.clone(),
                bounds: self.bounds,
                released: false,
            };
            match w.tx.send(next) {
                Ok(()) => {
                    if more {
                        r.order.push_back(tenant);
                    }
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

    #[test]
    fn a_group_runs_up_to_its_slots_at_once_and_another_group_waits_for_it_to_drain() {
        let a = admission(1, 100, 100);
        // Model m batches 3: three requests of one tenant run at once.
        let m: Vec<Permit> = (0..3)
            .map(|_| ready(a.enqueue_in("cpu", "a", "m", 3).unwrap()))
            .collect();
        assert_eq!(a.running(), 3);
        let mut m4 = queued(a.enqueue_in("cpu", "a", "m", 3).unwrap());
        // Model n waits while m runs...
        let mut n1 = queued(a.enqueue_in("cpu", "b", "n", 1).unwrap());
        // ...and from now on newcomers of m queue behind it.
        let mut m5 = queued(a.enqueue_in("cpu", "c", "m", 3).unwrap());
        let mut it = m.into_iter();
        drop(it.next());
        // m4 was first in turn and m still runs: it takes the free slot.
        let p4 = m4.try_recv().expect("m's waiter runs beside its group");
        assert!(n1.try_recv().is_err());
        drop(it.next());
        drop(it.next());
        // n is at the head now: m5 may not pass it, and n waits for m4.
        assert!(n1.try_recv().is_err());
        assert!(m5.try_recv().is_err());
        drop(p4);
        let pn = n1.try_recv().expect("n runs once m drained");
        assert!(m5.try_recv().is_err(), "n runs alone (1 slot)");
        drop(pn);
        let _p5 = m5.try_recv().expect("then m again");
        assert_eq!(a.running(), 1);
    }

    #[test]
    fn a_drained_group_hands_every_slot_of_the_next_one_at_once() {
        let a = admission(1, 100, 100);
        let n = ready(a.enqueue_in("cpu", "a", "n", 1).unwrap());
        let mut waiters: Vec<_> = (0..4)
            .map(|i| queued(a.enqueue_in("cpu", &format!("t{i}"), "m", 3).unwrap()))
            .collect();
        drop(n);
        let started: Vec<Permit> = waiters
            .iter_mut()
            .filter_map(|w| w.try_recv().ok())
            .collect();
        assert_eq!(started.len(), 3, "three of m's four start together");
        assert_eq!(a.running(), 3);
        assert_eq!(a.waiting(), 1);
    }
}
