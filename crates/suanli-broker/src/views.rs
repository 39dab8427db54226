//! Read views: what queries read, published by the writer after every batch, so that a read
//! never waits for the writer. Requests (live and ended) sit in a concurrent map; the fleet,
//! pools, tenants and the queue are swapped in whole as one immutable snapshot.

use std::sync::{Arc, RwLock};

use dashmap::DashMap;
use rustc_hash::FxHashMap;
use suanli_proto::v1 as pb;

/// A queued request as the queue view shows it.
#[derive(Clone, Debug)]
pub struct Queued {
    /// Request id.
    pub id: u64,
    /// Priority (wire value).
    pub priority: pb::Priority,
    /// Why it waits.
    pub reason: pb::WaitReason,
    /// Position in the last pass.
    pub position: u32,
}

/// The queue as of its last rebuild. A long queue is rebuilt less often than the rest of the
/// snapshot and shared, not copied, between snapshots.
#[derive(Debug, Default)]
pub struct QueueView {
    /// The queue in order.
    pub entries: Vec<Queued>,
    /// Wait reason and position of every queued request.
    pub wait: FxHashMap<u64, (pb::WaitReason, u32)>,
    /// Queued requests per priority class: critical, standard, spot.
    pub by_priority: [u32; 3],
    /// Queued requests per wait reason (wire value), ascending.
    pub by_reason: Vec<(i32, u32)>,
    /// Estimated start (unix ms) of the requests at the head of the queue.
    pub starts: FxHashMap<u64, u64>,
}

impl QueueView {
    /// Indexes and counts the queue in order; `starts` are the estimated starts of its head.
    pub fn new(entries: Vec<Queued>, starts: FxHashMap<u64, u64>) -> Self {
        let mut wait = FxHashMap::with_capacity_and_hasher(entries.len(), Default::default());
        let mut by_priority = [0u32; 3];
        let mut by_reason = std::collections::BTreeMap::<i32, u32>::new();
        for q in &entries {
            wait.insert(q.id, (q.reason, q.position));
            by_priority[(q.priority as i32 - 1).clamp(0, 2) as usize] += 1;
            *by_reason.entry(q.reason as i32).or_default() += 1;
        }
        QueueView {
            entries,
            wait,
            by_priority,
            by_reason: by_reason.into_iter().collect(),
            starts,
        }
    }
}

/// The whole-fleet part of the views, replaced at once.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// The fleet summary.
    pub fleet: pb::FleetSummary,
    /// Every pool, in registration order.
    pub pools: Vec<pb::Pool>,
    /// Every tenant, by name.
    pub tenants: Vec<pb::Tenant>,
    /// The queue.
    pub queue: Arc<QueueView>,
    /// The request holding the reservation and its estimated start.
    pub reserved: Option<(u64, Option<u64>)>,
}

/// Everything queries read.
#[derive(Debug, Default)]
pub struct Views {
    /// Every request ever submitted, by id.
    pub requests: DashMap<u64, Arc<pb::Request>>,
    /// Each tenant's request ids, ascending.
    pub by_tenant: DashMap<String, Vec<u64>>,
    snapshot: RwLock<Arc<Snapshot>>,
    /// Requests whose jobs ended most recently, oldest first (at most [`RECENT_JOBS`]).
    recent_jobs: std::sync::Mutex<std::collections::VecDeque<u64>>,
}

/// How many ended jobs the console lists.
pub const RECENT_JOBS: usize = 50;

impl Views {
    /// Takes over everything `other` holds, for a writer that read its state back into views
    /// of its own: a request both hold is replaced in place and the ones `other` lacks go
    /// last, so a reader meanwhile sees the old record or the new, never none.
    pub fn take_over(&self, other: &Views) {
        for r in other.requests.iter() {
            self.requests.insert(*r.key(), r.value().clone());
        }
        self.requests
            .retain(|id, _| other.requests.contains_key(id));
        for t in other.by_tenant.iter() {
            self.by_tenant.insert(t.key().clone(), t.value().clone());
        }
        self.by_tenant
            .retain(|tenant, _| other.by_tenant.contains_key(tenant));
        *self.recent_jobs.lock().expect("views") = other.recent_jobs.lock().expect("views").clone();
        *self.snapshot.write().expect("views") = other.snapshot();
    }

    /// The latest snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.read().expect("views").clone()
    }

    /// Replaces the snapshot.
    pub fn publish(&self, s: Snapshot) {
        *self.snapshot.write().expect("views") = Arc::new(s);
    }

    /// A request's job ended (it has an outcome): the console lists it among the recent ones.
    pub fn job_ended(&self, id: u64) {
        let mut jobs = self.recent_jobs.lock().expect("views");
        jobs.push_back(id);
        if jobs.len() > RECENT_JOBS {
            jobs.pop_front();
        }
    }

    /// The requests whose jobs ended most recently, newest first.
    pub fn recent_jobs(&self) -> Vec<u64> {
        self.recent_jobs
            .lock()
            .expect("views")
            .iter()
            .rev()
            .copied()
            .collect()
    }

    /// A request with its current wait information.
    pub fn request(&self, id: u64) -> Option<pb::Request> {
        let r = self.requests.get(&id)?;
        let mut r = (**r).clone();
        if let Some(w) = r.wait.as_mut() {
            let snapshot = self.snapshot();
            if let Some(&(reason, position)) = snapshot.queue.wait.get(&id) {
                w.reason = reason as i32;
                w.position = position;
            }
            // The reservation's estimate knows backfill; the shadow schedule's does not.
            w.earliest_start_unix_ms = match snapshot.reserved {
                Some((held, at)) if held == id => at,
                _ => snapshot.queue.starts.get(&id).copied(),
            };
        }
        Some(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: u64, tenant: &str, state: pb::RequestState) -> Arc<pb::Request> {
        Arc::new(pb::Request {
            id,
            tenant: tenant.into(),
            state: state as i32,
            ..Default::default()
        })
    }

    #[test]
    fn taking_over_replaces_keeps_and_drops_as_the_other_views_say() {
        let old = Views::default();
        old.requests
            .insert(1, record(1, "a", pb::RequestState::Running));
        old.requests
            .insert(2, record(2, "a", pb::RequestState::Queued));
        old.by_tenant.insert("a".into(), vec![1, 2]);
        old.by_tenant.insert("gone".into(), vec![9]);
        old.job_ended(1);
        let new = Views::default();
        new.requests
            .insert(2, record(2, "a", pb::RequestState::Placed));
        new.requests
            .insert(3, record(3, "b", pb::RequestState::Queued));
        new.by_tenant.insert("a".into(), vec![2]);
        new.by_tenant.insert("b".into(), vec![3]);
        new.publish(Snapshot {
            reserved: Some((3, None)),
            ..Default::default()
        });

        old.take_over(&new);
        let mut ids: Vec<u64> = old.requests.iter().map(|r| *r.key()).collect();
        ids.sort_unstable();
        assert_eq!(ids, [2, 3]);
        assert_eq!(
            old.requests.get(&2).unwrap().state,
            pb::RequestState::Placed as i32
        );
        assert_eq!(old.by_tenant.get("a").unwrap().clone(), [2]);
        assert!(old.by_tenant.get("gone").is_none());
        assert!(old.recent_jobs().is_empty());
        assert_eq!(old.snapshot().reserved, Some((3, None)));
    }
}
