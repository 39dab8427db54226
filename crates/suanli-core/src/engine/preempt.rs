//! Victim search: which spot leases, and which leases on borrowed capacity, a critical or
//! standard request that does not fit may end to make room, fewest victims first. A search
//! walks the preemptible leases of the request's node groups ([`VictimIndex`]), so a pass
//! allows only so many; a search that found nothing is not made again for the same shape until
//! something it read changed, and none is made for a shape whose models hold no preemptible
//! lease (see `incremental`).

use super::*;

/// What a victim search did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Preempted {
    /// It found no victims, or was not made.
    Nothing,
    /// It ended victims and placed the request.
    Placed,
    /// It ended victims, and the request waits still, for this reason: what a try right after
    /// would find.
    Freed(WaitReason),
}

/// The order victims are chosen in: spot before reclaimed borrowing, youngest first.
type VictimOrder = (Reverse<Priority>, Reverse<Millis>, Reverse<RequestId>);

/// The preemptible leases by node group, in the order victims are chosen, so a search walks
/// only the leases of the groups its request could use (part of [`super::LeaseIndex`]).
#[derive(Clone, Debug, Default)]
pub(crate) struct VictimIndex {
    /// Per group, the preemptible leases with a slice in it.
    by_group: Vec<BTreeSet<VictimOrder>>,
    /// Per group, the devices those leases hold in it.
    devices: Vec<u64>,
    /// Per group and node, the devices those leases hold on it.
    on_node: Vec<Vec<u16>>,
    /// Per model, the preemptible leases with a slice on it.
    per_model: Vec<u32>,
    /// The models with a preemptible lease (bit `m` for model `m`).
    models: u64,
}

impl VictimIndex {
    fn order(id: RequestId, priority: Priority, lease: &Lease) -> VictimOrder {
        (Reverse(priority), Reverse(lease.start), Reverse(id))
    }

    /// A preemptible lease was placed (`placed`) or ended.
    pub(super) fn count(
        &mut self,
        supply: &Supply,
        id: RequestId,
        priority: Priority,
        lease: &Lease,
        placed: bool,
    ) {
        let order = Self::order(id, priority, lease);
        let mut models = 0u64;
        for s in &lease.slices {
            let (g, n) = (s.group as usize, s.node as usize);
            if self.by_group.len() <= g {
                self.by_group.resize_with(g + 1, BTreeSet::new);
                self.devices.resize(g + 1, 0);
                self.on_node.resize_with(g + 1, Vec::new);
            }
            if self.on_node[g].len() <= n {
                self.on_node[g].resize(n + 1, 0);
            }
            if placed {
                self.by_group[g].insert(order);
                self.devices[g] += s.devices as u64;
                self.on_node[g][n] += s.devices;
            } else {
                self.by_group[g].remove(&order);
                self.devices[g] -= s.devices as u64;
                self.on_node[g][n] -= s.devices;
            }
            models |= 1 << supply.groups[g].model.0;
        }
        for m in (0..64).filter(|m| models & (1 << m) != 0) {
            if self.per_model.len() <= m {
                self.per_model.resize(m + 1, 0);
            }
            if placed {
                self.per_model[m] += 1;
            } else {
                self.per_model[m] -= 1;
            }
            if self.per_model[m] > 0 {
                self.models |= 1 << m;
            } else {
                self.models &= !(1 << m);
            }
        }
    }

    /// The models with a preemptible lease (bit `m` for model `m`).
    pub(super) fn models(&self) -> u64 {
        self.models
    }

    /// What differs from `expect`, the index rebuilt from the engine's leases, if anything: for
    /// the audit.
    pub(super) fn fault(&self, expect: &VictimIndex) -> Option<String> {
        if self.models != expect.models {
            return Some(format!(
                "models with preemptible leases {:#b}, rebuilt {:#b}",
                self.models, expect.models
            ));
        }
        let groups = self.by_group.len().max(expect.by_group.len());
        for g in 0..groups as u32 {
            let (have, want) = (self.in_group(g), expect.in_group(g));
            let on_node = |index: &VictimIndex| {
                let mut v = index.on_node.get(g as usize).cloned().unwrap_or_default();
                while v.last() == Some(&0) {
                    v.pop();
                }
                v
            };
            if !have.eq(want)
                || self.devices_in(g) != expect.devices_in(g)
                || on_node(self) != on_node(expect)
            {
                return Some(format!("preemptible leases of node group {g} differ"));
            }
        }
        None
    }

    /// The preemptible leases with a slice in group `g`, most expendable first.
    fn in_group(&self, g: u32) -> impl Iterator<Item = &VictimOrder> {
        self.by_group.get(g as usize).into_iter().flatten()
    }

    /// The devices preemptible leases hold in group `g`.
    fn devices_in(&self, g: u32) -> u64 {
        self.devices.get(g as usize).copied().unwrap_or(0)
    }

    /// The nodes of group `g` that would have `m` devices free were every preemptible lease
    /// on them ended, given what each has free now.
    fn nodes_that_could_free(&self, g: u32, free: &[u16], m: u16) -> u32 {
        let on_node = self.on_node.get(g as usize).map_or(&[][..], Vec::as_slice);
        free.iter()
            .enumerate()
            .filter(|&(n, &f)| {
                u32::from(f) + u32::from(on_node.get(n).copied().unwrap_or(0)) >= u32::from(m)
            })
            .count() as u32
    }
}

impl Engine {
    /// Frees capacity for a critical or standard request by preempting spot leases and leases
    /// on borrowed capacity, fewest victims first; then places it. Returns what it did.
    pub(super) fn try_preempt(
        &mut self,
        id: RequestId,
        budget: &mut u32,
        out: &mut Vec<Event>,
    ) -> Preempted {
        let r = &self.requests[&id];
        if r.priority == Priority::Spot {
            return Preempted::Nothing;
        }
        // The last search for this request's shape found nothing and nothing it read changed.
        if !self.search_stale(r) {
            return Preempted::Nothing;
        }
        if *budget == 0 {
            return Preempted::Nothing;
        }
        let t = &self.tenants[r.tenant.0 as usize];
        let need = self.supply.min_tflops(&r.filter, &r.shape);
        let within_quota = t.used + need <= t.spec.quota_tflops;
        if self.spot_leases == 0 && (!within_quota || self.borrowing_leases == 0) {
            self.searched(id);
            return Preempted::Nothing;
        }
        *budget -= 1;
        self.pass_counts.searches += 1;
        let candidates = self.candidates_of(id);
        let r = &self.requests[&id];
        let eligible = |vid: &RequestId| {
            let v = &self.requests[vid];
            v.priority == Priority::Spot
                || (within_quota
                    && v.lease.as_ref().is_some_and(|l| l.borrowed > 0)
                    && v.tenant != r.tenant
                    && v.priority >= r.priority)
        };
        let chosen = match r.shape {
            Shape::Gang {
                nodes,
                devices_per_node,
            } => self.gang_victims(&candidates, eligible, nodes, devices_per_node),
            Shape::Elastic {
                tflops,
                min_chunk_tflops,
            } => {
                // Not even every preemptible lease of the groups would make room.
                let could_free: Tflops = candidates
                    .iter()
                    .map(|&g| {
                        let group = &self.supply.groups[g as usize];
                        (group.nodes.free_devices() + self.victims().devices_in(g))
                            * group.tflops_per_device as u64
                    })
                    .sum();
                if could_free < tflops {
                    self.searched(id);
                    return Preempted::Nothing;
                }
                // Victims of every candidate group, most expendable first.
                let mut victims: Vec<VictimOrder> = candidates
                    .iter()
                    .flat_map(|&g| self.victims().in_group(g))
                    .filter(|(_, _, Reverse(vid))| eligible(vid))
                    .copied()
                    .collect();
                victims.sort_unstable();
                victims.dedup();
                self.elastic_victims(&candidates, &victims, tflops, min_chunk_tflops)
            }
        };
        let Some(chosen) = chosen else {
            self.searched(id);
            return Preempted::Nothing;
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
                    // The plan counts more against quota than the least the shape could.
                    return Preempted::Freed(WaitReason::Quota);
                }
                self.dequeue(id);
                self.place(id, &plan, size, out);
                Preempted::Placed
            }
            None => Preempted::Freed(WaitReason::CapacityBusy),
        }
    }

    /// The smallest set of victims (in preference order) that lets the gang fit in one group.
    pub(super) fn gang_victims(
        &self,
        candidates: &[u32],
        eligible: impl Fn(&RequestId) -> bool,
        nodes: u32,
        m: u16,
    ) -> Option<Vec<RequestId>> {
        let mut best: Option<(usize, Tflops, Vec<RequestId>)> = None;
        for &g in candidates {
            let group = &self.supply.groups[g as usize];
            // Not even every preemptible lease of the group would make room.
            let could_free = group.nodes.free_devices() + self.victims().devices_in(g);
            if could_free < nodes as u64 * m as u64
                || self
                    .victims()
                    .nodes_that_could_free(g, group.nodes.free_per_node(), m)
                    < nodes
            {
                continue;
            }
            let mut free = group.nodes.free_per_node().to_vec();
            let mut fit = free.iter().filter(|&&f| f >= m).count() as u32;
            let mut chosen = Vec::new();
            let mut freed: Tflops = 0;
            for (_, _, Reverse(vid)) in self.victims().in_group(g) {
                if fit >= nodes || best.as_ref().is_some_and(|b| chosen.len() >= b.0) {
                    break;
                }
                if !eligible(vid) {
                    continue;
                }
                let lease = self.requests[vid].lease.as_ref().expect("victim lease");
                if let Some(reached) = lease.refill(g, &mut free, m) {
                    fit += reached;
                    chosen.push(*vid);
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
        victims: &[VictimOrder],
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
