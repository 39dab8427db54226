//! The waiting queue: one FIFO per (priority class, tenant), kept in submission order.
//!
//! The scheduling pass walks the classes in order and, inside a class, always serves the tenant
//! with the smallest weighted share next (see `Engine::schedule`). Requests that leave the queue
//! (placed, cancelled) are dropped lazily: the pass skips them and [`WaitQueue::compact`] removes
//! them, so leaving the queue costs O(1).

use std::collections::{BTreeMap, VecDeque};

use crate::request::Priority;
use crate::units::{RequestId, TenantIx};

#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub(crate) struct WaitQueue {
    pub classes: [BTreeMap<TenantIx, VecDeque<RequestId>>; 3],
    /// Entries no longer queued but still in a deque.
    stale: usize,
    entries: usize,
}

impl WaitQueue {
    /// Adds a request at its place in submission order (at the back for a new request; a
    /// requeued one goes back where its id puts it). A requeued request whose entry from an
    /// earlier wait is still there, not yet compacted, takes that entry back: it is never filed
    /// twice.
    pub fn push(&mut self, class: Priority, tenant: TenantIx, id: RequestId) {
        let q = self.classes[class.rank()].entry(tenant).or_default();
        if q.back().is_none_or(|&last| last < id) {
            q.push_back(id);
        } else {
            let at = q.partition_point(|&x| x < id);
            if q.get(at) == Some(&id) {
                self.stale -= 1;
                return;
            }
            q.insert(at, id);
        }
        self.entries += 1;
    }

    /// Notes that a request of `tenant` in `class` left the queue. Its entry goes at once when
    /// it is at the front of its FIFO (the usual case: the oldest request starts first), with
    /// any left entries behind it, so a queue that drains keeps no stale entries for the passes
    /// to walk; an entry further back is dropped at the next compaction.
    pub fn left(
        &mut self,
        class: Priority,
        tenant: TenantIx,
        mut queued: impl FnMut(RequestId) -> bool,
    ) {
        self.stale += 1;
        let class = &mut self.classes[class.rank()];
        let Some(q) = class.get_mut(&tenant) else {
            return;
        };
        while q.front().is_some_and(|&id| !queued(id)) {
            q.pop_front();
            self.stale -= 1;
            self.entries -= 1;
        }
        if q.is_empty() {
            class.remove(&tenant);
        }
    }

    /// Requests still waiting.
    pub fn len(&self) -> usize {
        self.entries - self.stale
    }

    /// Whether compaction would free a meaningful share of the entries.
    pub fn wants_compaction(&self) -> bool {
        self.stale > 1024 && self.stale * 2 > self.entries
    }

    /// Drops every entry that is no longer queued.
    pub fn compact(&mut self, mut queued: impl FnMut(RequestId) -> bool) {
        for class in &mut self.classes {
            class.retain(|_, q| {
                q.retain(|&id| queued(id));
                !q.is_empty()
            });
        }
        self.entries = self
            .classes
            .iter()
            .flat_map(|c| c.values())
            .map(|q| q.len())
            .sum();
        self.stale = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requeued_requests_return_to_their_place() {
        let mut q = WaitQueue::default();
        let t = TenantIx(0);
        for id in [1, 2, 5] {
            q.push(Priority::Standard, t, RequestId(id));
        }
        q.push(Priority::Standard, t, RequestId(3));
        let order: Vec<u64> = q.classes[1][&t].iter().map(|r| r.0).collect();
        assert_eq!(order, [1, 2, 3, 5]);
        q.left(Priority::Standard, t, |id| id != RequestId(2)); // not at the front: stays
        assert_eq!(q.classes[1][&t].len(), 4);
        q.compact(|id| id != RequestId(2));
        assert_eq!(q.len(), 3);
    }

    #[test]
    fn entries_that_leave_from_the_front_go_at_once() {
        let mut q = WaitQueue::default();
        let t = TenantIx(0);
        for id in [1, 2, 3] {
            q.push(Priority::Critical, t, RequestId(id));
        }
        // 2 leaves first (stays, behind 1), then 1: both go, 3 is the front.
        q.left(Priority::Critical, t, |id| id != RequestId(2));
        q.left(Priority::Critical, t, |id| id == RequestId(3));
        let order: Vec<u64> = q.classes[0][&t].iter().map(|r| r.0).collect();
        assert_eq!((order, q.len()), (vec![3], 1));
        q.left(Priority::Critical, t, |_| false);
        assert!(q.classes[0].is_empty(), "an emptied FIFO is dropped");
        assert_eq!(q.len(), 0);
    }

    #[test]
    fn a_request_requeued_before_compaction_is_filed_once() {
        let mut q = WaitQueue::default();
        let t = TenantIx(0);
        for id in [1, 2] {
            q.push(Priority::Spot, t, RequestId(id));
        }
        q.left(Priority::Spot, t, |id| id != RequestId(1)); // 1 is placed: its entry goes
        q.push(Priority::Spot, t, RequestId(1)); // 1 is preempted and requeued
        let order: Vec<u64> = q.classes[2][&t].iter().map(|r| r.0).collect();
        assert_eq!(order, [1, 2]);
        assert_eq!(q.len(), 2);
        q.compact(|_| true);
        assert_eq!(q.len(), 2);
    }

    #[test]
    fn a_request_preempted_twice_keeps_one_place_in_the_pass() {
        use crate::engine::Command;
        use crate::fleet::PoolKind::External;
        use crate::testkit::*;

        let mut e = engine(vec![pool("p", External, 5, &[("h100", 8, 1, 1000)])]);
        let mut spot = gang("a", 1, 8, "h100");
        spot.priority = Priority::Spot;
        spot.requeue = true;
        let s = submit(&mut e, spot.clone(), 0);
        let x = submit(&mut e, gang("a", 1, 8, "h100"), 0);
        ok(e.apply(Command::Tick, 1)); // x preempts s, which waits
        ok(e.apply(Command::Release { request: x }, 2));
        ok(e.apply(Command::Tick, 3)); // s runs again
        submit(&mut e, gang("a", 1, 8, "h100"), 4);
        ok(e.apply(Command::Tick, 4)); // and is preempted again
        spot.requeue = false;
        let y = submit(&mut e, spot, 5);
        ok(e.apply(Command::Tick, 6));
        assert_eq!(e.queue_len(), 2);
        assert_eq!(e.explain(s).unwrap().position, 1);
        assert_eq!(e.explain(y).unwrap().position, 2, "s was ranked once");
        assert_eq!(e.audit(), Ok(()));
    }
}
