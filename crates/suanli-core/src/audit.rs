//! A self-check of the engine's books, for tests, simulations and operators.
//!
//! [`Engine::audit`] recomputes from the leases what every cached figure should be and compares:
//! devices per node (free plus allocated is the node's size, nothing allocated twice), the free
//! totals and buckets of each node group, the shape of every lease, every tenant's usage and
//! counters, the wait queue, and the placement index. It changes nothing and costs a pass over
//! the fleet and the requests, so it belongs in tests and checks, not on the hot path.

use std::collections::BTreeSet;

use crate::engine::Engine;
use crate::placement::PoolHealth;
use crate::request::{Priority, RequestState, Shape, WaitReason};
use crate::units::{Millis, RequestId, Tflops};

/// An inconsistency found by [`Engine::audit`]. The message names the node group, node, request
/// or tenant at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuditError {
    /// A node's devices do not add up: free plus allocated differs from its size.
    #[error("pool {pool} group[{group}] node {node}: {detail}")]
    Node {
        /// Pool id.
        pool: String,
        /// Index of the node group in the pool.
        group: u32,
        /// Node index in the group.
        node: u32,
        /// What is wrong.
        detail: String,
    },
    /// A node group's cached totals or free-count buckets disagree with its nodes.
    #[error("pool {pool} group[{group}]: {detail}")]
    Group {
        /// Pool id.
        pool: String,
        /// Index of the node group in the pool.
        group: u32,
        /// What is wrong.
        detail: String,
    },
    /// The placement index of a model disagrees with a node group.
    #[error("index of model {model}: pool {pool} group[{group}]: {detail}")]
    Index {
        /// Accelerator model id.
        model: String,
        /// Pool id.
        pool: String,
        /// Index of the node group in the pool.
        group: u32,
        /// What is wrong.
        detail: String,
    },
    /// A request, its state or its lease is inconsistent.
    #[error("request {request}: {detail}")]
    Request {
        /// The request.
        request: RequestId,
        /// What is wrong.
        detail: String,
    },
    /// A tenant's usage or counters disagree with its requests.
    #[error("tenant {tenant:?}: {detail}")]
    Tenant {
        /// Tenant name.
        tenant: String,
        /// What is wrong.
        detail: String,
    },
    /// The wait queue disagrees with the queued requests.
    #[error("wait queue: {detail}")]
    Queue {
        /// What is wrong.
        detail: String,
    },
    /// One of the engine's own counters disagrees with the requests it counts.
    #[error("engine counter {counter}: {detail}")]
    Counter {
        /// The counter, e.g. `spot leases`.
        counter: &'static str,
        /// What is wrong.
        detail: String,
    },
}

/// What the requests say each tenant holds.
#[derive(Clone, Copy, Default)]
struct Books {
    used: Tflops,
    borrowed: Tflops,
    live_leases: u32,
    queued: u32,
}

impl Engine {
    /// Checks the engine's internal consistency and returns the first inconsistency found:
    /// - on every node of every group, the devices of all live leases plus the free devices
    ///   equal the node's size (no device is allocated twice or lost);
    /// - every group's cached free total and free-count buckets agree with its nodes;
    /// - every gang lease has exactly its nodes, each with its devices, on distinct nodes of one
    ///   group; every elastic lease holds at least the TFLOPS asked; no lease sits in a lost pool;
    /// - every tenant's usage, borrowing, live leases and queued count match its requests;
    /// - every queued request is in the wait queue and the queue counts exactly those;
    /// - every live lease's end time is due to expire, and the engine's counters of live,
    ///   spot and borrowing leases and of requests waiting for capacity are exact;
    /// - the placement index records for every group what the group holds now.
    pub fn audit(&self) -> Result<(), AuditError> {
        let mut held: Vec<Vec<u32>> = self
            .supply
            .groups
            .iter()
            .map(|g| vec![0; g.nodes.nodes() as usize])
            .collect();
        let mut books = vec![Books::default(); self.tenants.len()];
        let mut ids: Vec<RequestId> = self.requests.keys().copied().collect();
        ids.sort_unstable();
        for &id in &ids {
            self.audit_request(id, &mut held, &mut books)?;
        }
        self.audit_nodes(&held)?;
        self.audit_tenants(&books)?;
        self.audit_queue(&ids)?;
        self.audit_counters(&ids)?;
        self.audit_index()
    }

    /// Pool id and index in the pool of a global group index.
    fn group_name(&self, g: u32) -> (String, u32) {
        let pool = &self.supply.pools[self.supply.groups[g as usize].pool.0 as usize];
        (pool.spec.id.clone(), g - pool.groups.start)
    }

    fn audit_request(
        &self,
        id: RequestId,
        held: &mut [Vec<u32>],
        books: &mut [Books],
    ) -> Result<(), AuditError> {
        let fail = |detail: String| AuditError::Request {
            request: id,
            detail,
        };
        let r = &self.requests[&id];
        let Some(b) = books.get_mut(r.tenant.0 as usize) else {
            return Err(fail(format!("belongs to no tenant (index {})", r.tenant.0)));
        };
        match (r.state, &r.lease) {
            (RequestState::Queued, None) => {
                b.queued += 1;
                return Ok(());
            }
            (RequestState::Queued, Some(_)) => {
                return Err(fail("is queued but holds a lease".into()));
            }
            (RequestState::Placed | RequestState::Running, None) => {
                return Err(fail(format!("is {} but holds no lease", r.state.as_str())));
            }
            (RequestState::Placed | RequestState::Running, Some(_)) => {}
            (state, _) => {
                return Err(fail(format!("is {} but still kept", state.as_str())));
            }
        }
        let lease = r.lease.as_ref().expect("checked above");
        let groups = &self.supply.groups;
        let mut tflops: Tflops = 0;
        for s in &lease.slices {
            let Some(group) = groups.get(s.group as usize) else {
                return Err(fail(format!("holds a slice of unknown group {}", s.group)));
            };
            let place = || {
                let (pool, gi) = self.group_name(s.group);
                format!("pool {pool} group[{gi}] node {}", s.node)
            };
            if s.node >= group.nodes.nodes() {
                let n = group.nodes.nodes();
                return Err(fail(format!("holds {}, of a group of {n} nodes", place())));
            }
            if s.devices == 0 {
                return Err(fail(format!("holds an empty slice on {}", place())));
            }
            if self.supply.pools[group.pool.0 as usize].health == PoolHealth::Lost {
                return Err(fail(format!("holds {} in a lost pool", place())));
            }
            held[s.group as usize][s.node as usize] += s.devices as u32;
            tflops += s.devices as u64 * group.tflops_per_device as u64;
        }
        if tflops != lease.tflops {
            return Err(fail(format!(
                "its lease records {} TFLOPS but its devices make {tflops}",
                lease.tflops
            )));
        }
        if lease.borrowed > lease.tflops {
            return Err(fail(format!(
                "borrows {} TFLOPS of a {} TFLOPS lease",
                lease.borrowed, lease.tflops
            )));
        }
        match r.shape {
            Shape::Gang {
                nodes,
                devices_per_node,
            } => {
                if lease.slices.len() != nodes as usize {
                    return Err(fail(format!(
                        "a gang of {nodes} nodes holds {} slices",
                        lease.slices.len()
                    )));
                }
                let first = lease.slices[0].group;
                let mut seen = BTreeSet::new();
                for s in &lease.slices {
                    if s.group != first {
                        return Err(fail("a gang spans more than one node group".into()));
                    }
                    if s.devices != devices_per_node {
                        return Err(fail(format!(
                            "a gang of {devices_per_node} devices per node holds {} on node {}",
                            s.devices, s.node
                        )));
                    }
                    if !seen.insert(s.node) {
                        return Err(fail(format!("a gang holds node {} twice", s.node)));
                    }
                }
            }
            Shape::Elastic { tflops: asked, .. } => {
                if lease.tflops < asked {
                    return Err(fail(format!(
                        "an elastic request of {asked} TFLOPS holds only {}",
                        lease.tflops
                    )));
                }
            }
        }
        b.used += lease.tflops;
        b.borrowed += lease.borrowed;
        b.live_leases += 1;
        Ok(())
    }

    fn audit_nodes(&self, held: &[Vec<u32>]) -> Result<(), AuditError> {
        for (g, group) in self.supply.groups.iter().enumerate() {
            let nodes = &group.nodes;
            let size = nodes.devices_per_node();
            let free = nodes.free_per_node();
            let down = nodes.down();
            let (pool, gi) = self.group_name(g as u32);
            for (node, (&f, &allocated)) in free.iter().zip(&held[g]).enumerate() {
                let detail = if down[node] {
                    if f == 0 && allocated == 0 {
                        continue;
                    }
                    format!("is out of service but has {f} free and {allocated} allocated")
                } else if allocated > size as u32 {
                    format!(
                        "{allocated} devices allocated on a node of {size}: a device is \
                         allocated twice"
                    )
                } else if f as u32 + allocated != size as u32 {
                    format!("{f} free + {allocated} allocated is not its {size} devices")
                } else {
                    continue;
                };
                return Err(AuditError::Node {
                    pool,
                    group: gi,
                    node: node as u32,
                    detail,
                });
            }
            let group_err = |detail: String| AuditError::Group {
                pool: pool.clone(),
                group: gi,
                detail,
            };
            let out_of_service = down.iter().filter(|&&d| d).count() as u64;
            if down.len() != free.len() || nodes.down_devices() != out_of_service * size as u64 {
                return Err(group_err(format!(
                    "counts {} devices out of service but {out_of_service} of its {} nodes are",
                    nodes.down_devices(),
                    down.len()
                )));
            }
            let sum: u64 = free.iter().map(|&f| f as u64).sum();
            if nodes.free_devices() != sum {
                return Err(group_err(format!(
                    "caches {} free devices but its nodes have {sum}",
                    nodes.free_devices()
                )));
            }
            let (buckets, positions) = (nodes.buckets(), nodes.positions());
            if buckets.len() != size as usize + 1 || positions.len() != free.len() {
                return Err(group_err(format!(
                    "has {} free-count buckets and {} positions for {} nodes of {size}",
                    buckets.len(),
                    positions.len(),
                    free.len()
                )));
            }
            // Each node at its place in the bucket of its free count, and no other entry:
            // then every bucket holds exactly the nodes with that free count.
            for (node, &f) in free.iter().enumerate() {
                let at = positions[node] as usize;
                if buckets[f as usize].get(at) != Some(&(node as u32)) {
                    return Err(group_err(format!(
                        "node {node} has {f} free but is not at its place {at} in that bucket"
                    )));
                }
            }
            let filed: usize = buckets.iter().map(Vec::len).sum();
            if filed != free.len() {
                return Err(group_err(format!(
                    "its buckets file {filed} entries for {} nodes",
                    free.len()
                )));
            }
        }
        Ok(())
    }

    fn audit_tenants(&self, books: &[Books]) -> Result<(), AuditError> {
        for (t, b) in self.tenants.iter().zip(books) {
            let mismatch = |what: &str, has: u64, should: u64| AuditError::Tenant {
                tenant: t.spec.name.clone(),
                detail: format!("records {what} {has} but its requests make {should}"),
            };
            if t.used != b.used {
                return Err(mismatch("used TFLOPS", t.used, b.used));
            }
            if t.borrowed != b.borrowed {
                return Err(mismatch("borrowed TFLOPS", t.borrowed, b.borrowed));
            }
            if t.live_leases != b.live_leases {
                return Err(mismatch(
                    "live leases",
                    t.live_leases as u64,
                    b.live_leases as u64,
                ));
            }
            if t.queued != b.queued {
                return Err(mismatch("queued", t.queued as u64, b.queued as u64));
            }
        }
        Ok(())
    }

    fn audit_queue(&self, ids: &[RequestId]) -> Result<(), AuditError> {
        let mut queued = 0;
        for &id in ids {
            let r = &self.requests[&id];
            if r.state != RequestState::Queued {
                continue;
            }
            queued += 1;
            let filed = self.queue.classes[r.priority.rank()]
                .get(&r.tenant)
                .is_some_and(|q| q.contains(&id));
            if !filed {
                return Err(AuditError::Request {
                    request: id,
                    detail: format!(
                        "is queued but missing from the {} queue of its tenant",
                        r.priority.as_str()
                    ),
                });
            }
        }
        if self.queue.len() != queued {
            return Err(AuditError::Queue {
                detail: format!(
                    "counts {} waiting requests but {queued} are queued",
                    self.queue.len()
                ),
            });
        }
        match self
            .pass_fault()
            .or_else(|| self.queue_index_fault())
            .or_else(|| self.estimate_fault())
        {
            Some(detail) => Err(AuditError::Queue { detail }),
            None => Ok(()),
        }
    }

    fn audit_counters(&self, ids: &[RequestId]) -> Result<(), AuditError> {
        let due: BTreeSet<(Millis, RequestId)> = self.pending_ends().collect();
        let (mut live, mut waiting, mut spot, mut borrowing) = (0, [0u32; 3], 0, 0);
        let mut preemptible = BTreeSet::new();
        for &id in ids {
            let r = &self.requests[&id];
            let Some(lease) = &r.lease else {
                // The reasons under which the engine counts a request as waiting for capacity.
                let waits = matches!(
                    r.reason,
                    WaitReason::Pending | WaitReason::CapacityBusy | WaitReason::BehindReservation
                );
                if r.state == RequestState::Queued && waits {
                    waiting[r.priority.rank()] += 1;
                }
                continue;
            };
            if !due.contains(&(lease.end, id)) {
                return Err(AuditError::Request {
                    request: id,
                    detail: format!("its lease ends at {} but is not due to expire", lease.end),
                });
            }
            live += 1;
            spot += (r.priority == Priority::Spot) as u32;
            borrowing += (lease.borrowed > 0) as u32;
            if r.priority == Priority::Spot || lease.borrowed > 0 {
                preemptible.insert(id);
            }
        }
        let (has_live, has_waiting, has_spot, has_borrowing) = self.counters();
        let mismatch = |counter, has: &dyn std::fmt::Debug, should: &dyn std::fmt::Debug| {
            Err(AuditError::Counter {
                counter,
                detail: format!("records {has:?} but the requests make {should:?}"),
            })
        };
        if has_live != live {
            return mismatch("live leases", &has_live, &live);
        }
        if has_waiting != waiting {
            return mismatch(
                "waiting for capacity (critical, standard, spot)",
                &has_waiting,
                &waiting,
            );
        }
        if has_spot != spot {
            return mismatch("spot leases", &has_spot, &spot);
        }
        if has_borrowing != borrowing {
            return mismatch("borrowing leases", &has_borrowing, &borrowing);
        }
        if *self.preemptible() != preemptible {
            return mismatch("preemptible leases", self.preemptible(), &preemptible);
        }
        let derived = [
            ("live leases by node group", self.lease_index_fault()),
            ("candidate groups by filter", self.candidate_cache_fault()),
            ("fit bounds", self.fit_fault()),
        ];
        if let Some((counter, Some(detail))) = derived.into_iter().find(|(_, f)| f.is_some()) {
            return Err(AuditError::Counter { counter, detail });
        }
        if due.len() != live {
            return mismatch("lease ends due", &due.len(), &live);
        }
        Ok(())
    }

    fn audit_index(&self) -> Result<(), AuditError> {
        let s = &self.supply;
        for (m, mi) in s.index.models.iter().enumerate() {
            if s.stale_models() & (1 << m) != 0 {
                continue; // rebuilt from scratch before the next placement
            }
            let model = &s.catalogue.models()[m].id;
            let fail = |g: u32, detail: String| {
                let (pool, group) = self.group_name(g);
                AuditError::Index {
                    model: model.clone(),
                    pool,
                    group,
                    detail,
                }
            };
            let of_model = |g: u32| s.groups[g as usize].model.0 as usize == m;
            for (order, tree) in [("cheapest", &mi.cheapest), ("lowest-latency", &mi.latency)] {
                let mut seen = vec![false; s.groups.len()];
                for (g, recorded) in tree.leaves() {
                    if g as usize >= s.groups.len() {
                        return Err(AuditError::Index {
                            model: model.clone(),
                            pool: "(none)".into(),
                            group: g,
                            detail: format!("the {order} order holds a group that does not exist"),
                        });
                    }
                    if !of_model(g) {
                        return Err(fail(
                            g,
                            format!("is of another model but in the {order} order"),
                        ));
                    }
                    if std::mem::replace(&mut seen[g as usize], true) {
                        return Err(fail(g, format!("is twice in the {order} order")));
                    }
                    let now = s.stats(g);
                    if recorded != now {
                        return Err(fail(
                            g,
                            format!(
                                "the {order} order records {} free devices, {} at most on a \
                                 node; the group has {} and {}",
                                recorded.free_devices,
                                recorded.max_node_free,
                                now.free_devices,
                                now.max_node_free
                            ),
                        ));
                    }
                }
                if let Some(g) =
                    (0..s.groups.len() as u32).find(|&g| of_model(g) && !seen[g as usize])
                {
                    return Err(fail(g, format!("is missing from the {order} order")));
                }
            }
            let keys = s.index.best_fit_keys();
            let want: BTreeSet<(u64, u32)> = (0..s.groups.len() as u32)
                .filter(|&g| of_model(g))
                .map(|g| (g, s.stats(g)))
                .filter(|(_, st)| st.max_node_free > 0)
                .map(|(g, st)| (st.free_devices, g))
                .collect();
            let recorded: BTreeSet<(u64, u32)> = (0..s.groups.len() as u32)
                .filter(|&g| of_model(g))
                .filter_map(|g| keys[g as usize].map(|k| (k, g)))
                .collect();
            if let Some(&(free, g)) = recorded.difference(&want).next() {
                return Err(fail(
                    g,
                    format!("the best-fit order files it under {free} free devices, wrongly"),
                ));
            }
            if let Some(&(free, g)) = want.difference(&recorded).next() {
                return Err(fail(
                    g,
                    format!("the best-fit order lacks it under {free} free devices"),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Command;
    use crate::fleet::PoolKind::External;
    use crate::testkit::*;

    fn busy_engine() -> (Engine, RequestId, RequestId) {
        let mut e = engine(vec![
            pool(
                "p1",
                External,
                5,
                &[("h100", 8, 2, 1000), ("a800", 4, 3, 500)],
            ),
            pool("p2", External, 9, &[("h100", 8, 2, 1500)]),
        ]);
        let g = submit(&mut e, gang("a", 2, 4, "h100"), 0);
        let el = submit(&mut e, elastic("a", 3000, 500), 0);
        (e, g, el)
    }

    #[test]
    fn a_healthy_engine_passes() {
        let (mut e, g, el) = busy_engine();
        assert_eq!(e.audit(), Ok(()));
        ok(e.apply(Command::DrainPool { pool: "p2".into() }, 1));
        ok(e.apply(Command::Release { request: g }, 2));
        ok(e.apply(Command::LosePool { pool: "p1".into() }, 3));
        assert!(
            e.request(el).is_none(),
            "the elastic lease was lost with p1"
        );
        assert_eq!(e.audit(), Ok(()));
        ok(e.apply(Command::RestorePool { pool: "p1".into() }, 4));
        ok(e.apply(Command::Tick, 5));
        assert_eq!(e.audit(), Ok(()));
    }

    /// The first slice of a request's lease.
    fn first_slice(e: &Engine, id: RequestId) -> crate::capacity::Slice {
        e.requests[&id].lease.as_ref().unwrap().slices[0]
    }

    #[test]
    fn a_device_freed_under_a_lease_is_named_by_group_and_node() {
        let (mut e, g, _) = busy_engine();
        let s = first_slice(&e, g);
        e.supply.groups[s.group as usize].nodes.give(s.node, 1);
        let (pool, gi) = e.group_name(s.group);
        let err = e.audit().unwrap_err();
        assert_eq!(
            err,
            AuditError::Node {
                pool: pool.clone(),
                group: gi,
                node: s.node,
                detail: "5 free + 4 allocated is not its 8 devices".into(),
            }
        );
        assert_eq!(
            err.to_string(),
            format!(
                "pool {pool} group[{gi}] node {}: 5 free + 4 allocated is not its 8 devices",
                s.node
            )
        );
    }

    #[test]
    fn a_device_allocated_twice_is_named() {
        let (mut e, g, el) = busy_engine();
        let mut s = first_slice(&e, g);
        s.devices = 8;
        e.requests
            .get_mut(&el)
            .unwrap()
            .lease
            .as_mut()
            .unwrap()
            .slices
            .push(s);
        let err = e.audit().unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("request {el}: its lease records")),
            "{err}"
        );
        // With the TFLOPS made to match, the double allocation itself is reported.
        let lease = e.requests.get_mut(&el).unwrap().lease.as_mut().unwrap();
        lease.tflops += 8 * 989;
        let (pool, gi) = e.group_name(s.group);
        let err = e.audit().unwrap_err().to_string();
        assert_eq!(
            err,
            format!(
                "pool {pool} group[{gi}] node {}: 12 devices allocated on a node of 8: a \
                 device is allocated twice",
                s.node
            )
        );
    }

    #[test]
    fn stale_index_and_tenant_books_are_named() {
        let (mut e, _, _) = busy_engine();
        // Take a device without a lease and without refreshing the index: the node is short.
        let g = e.supply.groups.len() as u32 - 1;
        let mut out = Vec::new();
        e.supply.groups[g as usize]
            .nodes
            .take_devices(g, 1, &mut out);
        let err = e.audit().unwrap_err().to_string();
        assert!(err.starts_with("pool p2 group[0] node "), "{err}");
        assert!(
            err.ends_with("7 free + 0 allocated is not its 8 devices"),
            "{err}"
        );
        // Give it back without refreshing the index: only the index is wrong now.
        e.supply.groups[g as usize].nodes.give(out[0].node, 1);
        assert_eq!(e.audit(), Ok(()));
        e.supply.groups[g as usize]
            .nodes
            .take_devices(g, 1, &mut out);
        e.supply.groups[g as usize].nodes.give(out[1].node, 1);
        e.supply.pools[1].health = PoolHealth::Draining;
        let err = e.audit().unwrap_err().to_string();
        assert!(
            err.starts_with("index of model h100: pool p2 group[0]: the cheapest order records 16"),
            "{err}"
        );
        e.supply.refresh(g);
        assert_eq!(e.audit(), Ok(()));
        e.tenants[0].used += 1;
        let err = e.audit().unwrap_err().to_string();
        assert!(
            err.starts_with("tenant \"a\": records used TFLOPS"),
            "{err}"
        );
    }

    #[test]
    fn a_lease_that_would_never_expire_and_a_stale_counter_are_named() {
        let (mut e, g, _) = busy_engine();
        e.requests.get_mut(&g).unwrap().lease.as_mut().unwrap().end += 1;
        let err = e.audit().unwrap_err().to_string();
        assert_eq!(
            err,
            format!("request {g}: its lease ends at 3600001 but is not due to expire")
        );
        e.requests.get_mut(&g).unwrap().lease.as_mut().unwrap().end -= 1;
        e.requests.get_mut(&g).unwrap().priority = Priority::Spot;
        let err = e.audit().unwrap_err().to_string();
        assert_eq!(
            err,
            "engine counter spot leases: records 0 but the requests make 1"
        );
    }
}
