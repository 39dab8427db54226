//! Reservation estimates: when the capacity a waiting request needs frees up, from the end
//! times of the live leases, and which node groups it would use. The first request of a pass
//! that does not fit holds a reservation; later ones are backfilled only if they end before
//! it or use none of its groups. A gang fits in one group, so its estimate walks only the
//! leases of its candidate groups, group by group ([`EndsByGroup`]), and stops a group's walk
//! once it is later than another group's fit.

use super::*;

/// The live leases' slices of each node group by end time (part of [`super::LeaseIndex`]):
/// `(end, lease, node, devices)`. An estimate walks these and reads no request, so a walk is
/// a scan of one ordered set rather than a lookup and a list of slices per lease.
#[derive(Clone, Debug, Default)]
pub(crate) struct EndsByGroup {
    by_group: Vec<BTreeSet<(Millis, RequestId, u32, u16)>>,
}

impl EndsByGroup {
    /// A lease was placed (`placed`) or ended.
    pub(super) fn count(&mut self, id: RequestId, lease: &Lease, placed: bool) {
        for s in &lease.slices {
            let g = s.group as usize;
            if self.by_group.len() <= g {
                self.by_group.resize_with(g + 1, BTreeSet::new);
            }
            let entry = (lease.end, id, s.node, s.devices);
            if placed {
                self.by_group[g].insert(entry);
            } else {
                self.by_group[g].remove(&entry);
            }
        }
    }

    fn in_group(&self, g: u32) -> impl Iterator<Item = &(Millis, RequestId, u32, u16)> {
        self.by_group.get(g as usize).into_iter().flatten()
    }

    /// What differs from `expect`, the index rebuilt from the engine's leases, if anything: for
    /// the audit.
    pub(super) fn fault(&self, expect: &EndsByGroup) -> Option<String> {
        let groups = self.by_group.len().max(expect.by_group.len());
        (0..groups as u32)
            .find(|&g| !self.in_group(g).eq(expect.in_group(g)))
            .map(|g| format!("lease ends of node group {g} differ"))
    }
}

impl Engine {
    /// The reservation of a request that does not fit now.
    pub(super) fn reserve(&mut self, id: RequestId) -> Reservation {
        let candidates = self.candidates_of(id);
        let r = &self.requests[&id];
        let groups = self.supply.group_mask(&candidates);
        Reservation {
            request: id,
            at: self.earliest_fit(&r.probe(), &candidates, &groups),
            groups,
        }
    }

    /// When the request would fit if leases ended at their end times and nothing else were
    /// placed: a scratch copy of the candidate groups is refilled lease by lease.
    pub(crate) fn earliest_fit(
        &self,
        r: &Probe,
        candidates: &[u32],
        is_candidate: &[bool],
    ) -> Option<Millis> {
        self.estimate(r, candidates, is_candidate, true)
    }

    /// [`Engine::earliest_fit`], for a gang by its groups' own leases if `by_group` (and they
    /// are indexed), else by a walk over every live lease.
    fn estimate(
        &self,
        r: &Probe,
        candidates: &[u32],
        is_candidate: &[bool],
        by_group: bool,
    ) -> Option<Millis> {
        // The candidate groups' free devices per node, refilled lease by lease. What the fit
        // needs is kept up to date as devices come back, so each lease costs only its slices:
        // per group, the nodes with room for a gang's node; in all, the free TFLOPS.
        let mut scratch: FxHashMap<u32, (Vec<u16>, u64)> = FxHashMap::default();
        let mut best_nodes = 0u64;
        let mut free_tflops: Tflops = 0;
        let per_node = match r.shape {
            Shape::Gang {
                devices_per_node, ..
            } => devices_per_node,
            Shape::Elastic { .. } => 0,
        };
        for &g in candidates {
            let group = &self.supply.groups[g as usize];
            let free = group.nodes.free_per_node().to_vec();
            let roomy = free.iter().filter(|&&f| f >= per_node).count() as u64;
            free_tflops +=
                free.iter().map(|&f| f as u64).sum::<u64>() * group.tflops_per_device as u64;
            best_nodes = best_nodes.max(roomy);
            scratch.insert(g, (free, roomy));
        }
        let fits = |best_nodes: u64, free_tflops: Tflops| match r.shape {
            Shape::Gang { nodes, .. } => best_nodes >= nodes as u64,
            Shape::Elastic { tflops, .. } => free_tflops >= tflops,
        };
        if fits(best_nodes, free_tflops) {
            return Some(self.now.max(r.start_after));
        }
        if let (Shape::Gang { nodes, .. }, Some(ends), true) =
            (r.shape, self.lease_ends(), by_group)
        {
            return Self::earliest_gang_fit(ends, scratch, nodes, per_node, r.start_after);
        }
        for &(end, id) in &self.ends {
            let mut touched = false;
            for s in &self.requests[&id].lease.as_ref().expect("live").slices {
                if !is_candidate[s.group as usize] {
                    continue;
                }
                let Some((free, roomy)) = scratch.get_mut(&s.group) else {
                    continue;
                };
                let before = free[s.node as usize];
                free[s.node as usize] += s.devices;
                if before < per_node && free[s.node as usize] >= per_node {
                    *roomy += 1;
                    best_nodes = best_nodes.max(*roomy);
                }
                free_tflops += s.devices as u64
                    * self.supply.groups[s.group as usize].tflops_per_device as u64;
                touched = true;
            }
            if touched && fits(best_nodes, free_tflops) {
                return Some(end.max(r.start_after));
            }
        }
        None
    }

    /// [`Engine::earliest_fit`] of a gang that does not fit now: the earliest of its candidate
    /// groups' fits, each found from the group's own leases (`free` holds each group's free
    /// devices per node and the nodes with room).
    fn earliest_gang_fit(
        ends: &EndsByGroup,
        free: FxHashMap<u32, (Vec<u16>, u64)>,
        nodes: u32,
        per_node: u16,
        start_after: Millis,
    ) -> Option<Millis> {
        let mut best: Option<Millis> = None;
        for (g, (mut free, mut roomy)) in free {
            // A lease's slices are consecutive, so a fit found within a lease is at its end,
            // as after the whole lease.
            for &(end, _, node, devices) in ends.in_group(g) {
                if best.is_some_and(|b| end >= b) {
                    break;
                }
                let free = &mut free[node as usize];
                let before = *free;
                *free += devices;
                if before < per_node && *free >= per_node {
                    roomy += 1;
                    if roomy >= nodes as u64 {
                        best = Some(end);
                        break;
                    }
                }
            }
        }
        best.map(|end| end.max(start_after))
    }
}

impl Engine {
    /// Where a gang's estimate by its groups' leases differs from the walk over every live
    /// lease, if anywhere: for the audit, over the first waiting gangs.
    pub(crate) fn estimate_fault(&self) -> Option<String> {
        let mut ids: Vec<RequestId> = self
            .requests
            .iter()
            .filter(|(_, r)| r.in_queue && matches!(r.shape, Shape::Gang { .. }))
            .map(|(&id, _)| id)
            .collect();
        ids.sort_unstable();
        ids.into_iter().take(16).find_map(|id| {
            let r = &self.requests[&id];
            let candidates = self.supply.candidate_groups(&r.filter, &r.shape);
            let is = self.supply.group_mask(&candidates);
            let (by_group, walked) = (
                self.estimate(&r.probe(), &candidates, &is, true),
                self.estimate(&r.probe(), &candidates, &is, false),
            );
            (by_group != walked).then(|| {
                format!(
                    "request {id} fits at {by_group:?} by its groups' leases, at {walked:?} by \
                     every lease"
                )
            })
        })
    }
}
