//! Reservation estimates: when the capacity a waiting request needs frees up, from the end
//! times of the live leases, and which node groups it would use. The first request of a pass
//! that does not fit holds a reservation; later ones are backfilled only if they end before
//! it or use none of its groups.

use super::*;

impl Engine {
    /// The reservation of a request that does not fit now.
    pub(super) fn reserve(&self, id: RequestId) -> Reservation {
        let r = &self.requests[&id];
        let candidates = self.supply.candidate_groups(&r.filter, &r.shape);
        let mut groups = vec![false; self.supply.groups.len()];
        for &g in &candidates {
            groups[g as usize] = true;
        }
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
}
