//! Victim search: which spot leases, and which leases on borrowed capacity, a critical or
//! standard request that does not fit may end to make room, fewest victims first. A search
//! costs a walk over the preemptible leases, so a pass allows only so many; and a search that
//! found nothing is not made again for the same shape until something it read changed (see
//! `incremental`).

use super::*;

impl Engine {
    /// Frees capacity for a critical or standard request by preempting spot leases and leases
    /// on borrowed capacity, fewest victims first; then places it. Returns whether it was placed.
    pub(super) fn try_preempt(
        &mut self,
        id: RequestId,
        budget: &mut u32,
        out: &mut Vec<Event>,
    ) -> bool {
        let r = &self.requests[&id];
        if r.priority == Priority::Spot {
            return false;
        }
        // The last search for this request's shape found nothing and nothing it read changed.
        if !self.search_stale(r) {
            return false;
        }
        if *budget == 0 {
            return false;
        }
        let t = &self.tenants[r.tenant.0 as usize];
        let need = self.supply.min_tflops(&r.filter, &r.shape);
        let within_quota = t.used + need <= t.spec.quota_tflops;
        if self.spot_leases == 0 && (!within_quota || self.borrowing_leases == 0) {
            self.searched(id);
            return false;
        }
        *budget -= 1;
        let candidates = self.supply.candidate_groups(&r.filter, &r.shape);
        let mut is_candidate = vec![false; self.supply.groups.len()];
        for &g in &candidates {
            is_candidate[g as usize] = true;
        }
        // Victims, most expendable first: spot before reclaimed borrowing, youngest first.
        let mut victims: Vec<(Reverse<Priority>, Reverse<Millis>, Reverse<RequestId>)> = self
            .preemptible
            .iter()
            .map(|vid| (vid, &self.requests[vid]))
            .filter(|(_, v)| {
                let Some(l) = v.lease.as_ref() else {
                    return false;
                };
                let eligible = v.priority == Priority::Spot
                    || (within_quota
                        && l.borrowed > 0
                        && v.tenant != r.tenant
                        && v.priority >= r.priority);
                eligible && l.slices.iter().any(|s| is_candidate[s.group as usize])
            })
            .map(|(&vid, v)| {
                (
                    Reverse(v.priority),
                    Reverse(v.lease.as_ref().expect("lease").start),
                    Reverse(vid),
                )
            })
            .collect();
        victims.sort_unstable();
        let chosen = match r.shape {
            Shape::Gang {
                nodes,
                devices_per_node,
            } => self.gang_victims(&candidates, &victims, nodes, devices_per_node),
            Shape::Elastic {
                tflops,
                min_chunk_tflops,
            } => self.elastic_victims(&candidates, &victims, tflops, min_chunk_tflops),
        };
        let Some(chosen) = chosen else {
            self.searched(id);
            return false;
        };
        for v in chosen {
            self.end_lease(v, RequestState::Preempted, EndReason::Preempted, out);
        }
        let r = &self.requests[&id];
        let discount = discount_of(&self.subsidies, &self.tenants, r.tenant, r.policy);
        match self
            .supply
            .plan_for(&r.filter, &r.shape, r.policy, None, discount)
        {
            Some(plan) => {
                let size = self.supply.plan_size(&plan, &r.shape);
                if !self.quota_allows(r.tenant, size.0) {
                    return false;
                }
                self.dequeue(id);
                self.place(id, &plan, size, out);
                true
            }
            _ => false,
        }
    }

    /// The smallest set of victims (in preference order) that lets the gang fit in one group.
    pub(super) fn gang_victims(
        &self,
        candidates: &[u32],
        victims: &[(Reverse<Priority>, Reverse<Millis>, Reverse<RequestId>)],
        nodes: u32,
        m: u16,
    ) -> Option<Vec<RequestId>> {
        let mut best: Option<(usize, Tflops, Vec<RequestId>)> = None;
        for &g in candidates {
            let mut free = self.supply.groups[g as usize]
                .nodes
                .free_per_node()
                .to_vec();
            let mut fit = free.iter().filter(|&&f| f >= m).count() as u32;
            let mut chosen = Vec::new();
            let mut freed: Tflops = 0;
            for &(_, _, Reverse(vid)) in victims {
                if fit >= nodes || best.as_ref().is_some_and(|b| chosen.len() >= b.0) {
                    break;
                }
                let lease = self.requests[&vid].lease.as_ref().expect("victim lease");
                let mut touches = false;
                for s in lease.slices.iter().filter(|s| s.group == g) {
                    let before = free[s.node as usize];
                    free[s.node as usize] += s.devices;
                    if before < m && free[s.node as usize] >= m {
                        fit += 1;
                    }
                    touches = true;
                }
                if touches {
                    chosen.push(vid);
                    freed += lease.tflops;
                }
            }
            if fit >= nodes
                && best
                    .as_ref()
                    .is_none_or(|b| (chosen.len(), freed) < (b.0, b.1))
            {
                best = Some((chosen.len(), freed, chosen));
            }
        }
        best.map(|b| b.2)
    }

    /// Victims (in preference order) until the candidate groups hold the elastic amount in
    /// pieces the placement will take. A group counts only once it has at least
    /// min(min chunk, amount) free: the placement takes such a group for whatever is still
    /// missing and may pass over a smaller one, so ending victims for capacity in smaller
    /// pieces would end them for nothing (and, requeued, they would be placed and ended again
    /// pass after pass).
    pub(super) fn elastic_victims(
        &self,
        candidates: &[u32],
        victims: &[(Reverse<Priority>, Reverse<Millis>, Reverse<RequestId>)],
        tflops: Tflops,
        min_chunk: Tflops,
    ) -> Option<Vec<RequestId>> {
        let threshold = min_chunk.min(tflops);
        let group_tflops = |g: u32| self.supply.groups[g as usize].tflops_per_device as u64;
        let mut free: FxHashMap<u32, Tflops> = candidates
            .iter()
            .map(|&g| {
                let devices = self.supply.groups[g as usize].nodes.free_devices();
                (g, devices * group_tflops(g))
            })
            .collect();
        let mut usable: Tflops = free.values().filter(|&&f| f >= threshold).sum();
        let mut chosen = Vec::new();
        for &(_, _, Reverse(vid)) in victims {
            if usable >= tflops {
                break;
            }
            let lease = self.requests[&vid].lease.as_ref().expect("victim lease");
            for s in &lease.slices {
                let Some(f) = free.get_mut(&s.group) else {
                    continue;
                };
                let before = *f;
                *f += s.devices as u64 * group_tflops(s.group);
                if before >= threshold {
                    usable += *f - before;
                } else if *f >= threshold {
                    usable += *f;
                }
            }
            chosen.push(vid);
        }
        (usable >= tflops).then_some(chosen)
    }
}
