//! The waiting queue: one FIFO per (priority class, tenant), kept in submission order.
//!
//! The scheduling pass walks the classes in order and, inside a class, always serves the tenant
//! with the smallest weighted share next (see `Engine::schedule`). Requests that leave the queue
//! (placed, cancelled) are dropped lazily: the pass skips them and [`WaitQueue::compact`] removes
//! them, so leaving the queue costs O(1).

use std::collections::{BTreeMap, VecDeque};

use crate::request::Priority;
use crate::units::{RequestId, TenantIx};

#[derive(Clone, Debug, Default)]
pub(crate) struct WaitQueue {
    pub classes: [BTreeMap<TenantIx, VecDeque<RequestId>>; 3],
    /// Entries no longer queued but still in a deque.
    stale: usize,
    entries: usize,
}

impl WaitQueue {
    /// Adds a request at its place in submission order (at the back for a new request; a
    /// requeued one goes back where its id puts it).
    pub fn push(&mut self, class: Priority, tenant: TenantIx, id: RequestId) {
        let q = self.classes[class.rank()].entry(tenant).or_default();
        if q.back().is_none_or(|&last| last < id) {
            q.push_back(id);
        } else {
            let at = q.partition_point(|&x| x < id);
            q.insert(at, id);
        }
        self.entries += 1;
    }

    /// Notes that a request left the queue; its entry is dropped at the next compaction.
    pub fn left(&mut self) {
        self.stale += 1;
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
        q.left();
        q.compact(|id| id != RequestId(2));
        assert_eq!(q.len(), 3);
    }
}
