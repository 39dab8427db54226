//! Read-only views of the engine: fleet utilisation (by pool, model, region and pool kind),
//! tenants' usage, requests and leases, and why a queued request waits.

use std::collections::BTreeMap;

use crate::engine::Engine;
use crate::fleet::PoolKind;
use crate::placement::PoolHealth;
use crate::request::{Priority, RequestState, Shape, WaitReason};
use crate::units::{Millis, RequestId, Tflops};

/// Capacity and allocation of some part of the fleet.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Utilisation {
    /// Rated capacity.
    pub capacity_tflops: Tflops,
    /// Capacity held by leases.
    pub allocated_tflops: Tflops,
    /// Devices in all.
    pub capacity_devices: u64,
    /// Devices held by leases.
    pub allocated_devices: u64,
    /// Devices on nodes out of service: part of the capacity, neither free nor allocated.
    pub unavailable_devices: u64,
}

impl Utilisation {
    /// Allocated over capacity, 0 when there is no capacity.
    pub fn fraction(&self) -> f64 {
        if self.capacity_tflops == 0 {
            0.0
        } else {
            self.allocated_tflops as f64 / self.capacity_tflops as f64
        }
    }

    fn add(&mut self, other: &Utilisation) {
        self.capacity_tflops += other.capacity_tflops;
        self.allocated_tflops += other.allocated_tflops;
        self.capacity_devices += other.capacity_devices;
        self.allocated_devices += other.allocated_devices;
        self.unavailable_devices += other.unavailable_devices;
    }
}

/// One pool's state and utilisation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolUsage {
    /// Pool id.
    pub id: String,
    /// Pool name.
    pub name: String,
    /// Local centre, local cloud or external.
    pub kind: PoolKind,
    /// Region.
    pub region: String,
    /// Data zone.
    pub data_zone: String,
    /// Round trip from the district.
    pub rtt_ms: u32,
    /// Health.
    pub health: PoolHealth,
    /// Utilisation.
    pub usage: Utilisation,
}

/// Utilisation of the whole fleet and its breakdowns.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FleetUsage {
    /// The whole fleet.
    pub total: Utilisation,
    /// Local pools (the centre and the clouds).
    pub local: Utilisation,
    /// External pools.
    pub external: Utilisation,
    /// By accelerator model id.
    pub by_model: BTreeMap<String, Utilisation>,
    /// By region.
    pub by_region: BTreeMap<String, Utilisation>,
    /// By pool kind name.
    pub by_kind: BTreeMap<&'static str, Utilisation>,
    /// Every pool, in registration order.
    pub pools: Vec<PoolUsage>,
}

/// A tenant's quota and usage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TenantUsage {
    /// Tenant name.
    pub name: String,
    /// Nominal quota.
    pub quota_tflops: Tflops,
    /// Borrowing limit (`None` = unlimited).
    pub borrow_limit_tflops: Option<Tflops>,
    /// Fair-share weight.
    pub weight: u32,
    /// Capacity held now.
    pub used_tflops: Tflops,
    /// Part of it beyond the quota (borrowed, reclaimable).
    pub borrowed_tflops: Tflops,
    /// Live leases.
    pub live_leases: u32,
    /// Queued requests.
    pub queued: u32,
}

/// Where one part of a lease sits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeasePart {
    /// Pool id.
    pub pool: String,
    /// Index of the node group in the pool.
    pub group: u32,
    /// Accelerator model id.
    pub model: String,
    /// Node index in the group.
    pub node: u32,
    /// Devices on that node.
    pub devices: u16,
}

/// A placed request's lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseView {
    /// When it was placed.
    pub start: Millis,
    /// When it expires.
    pub end: Millis,
    /// Compute held.
    pub tflops: Tflops,
    /// Price per hour fixed at placement, in fen.
    pub price_fen_per_hour: u64,
    /// Part of the compute placed on borrowed quota.
    pub borrowed_tflops: Tflops,
    /// Node by node.
    pub parts: Vec<LeasePart>,
}

/// A placed request's lease by node group, without names: what a shell that keeps its own
/// tables of the fleet reads at every placement ([`Engine::lease_groups`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseGroups<'a> {
    /// When it expires.
    pub end: Millis,
    /// Price per hour fixed at placement, in fen.
    pub price_fen_per_hour: u64,
    /// Its slices: node group (as [`Engine::group_place`] names it), node and devices.
    pub slices: &'a [crate::capacity::Slice],
}

/// A live request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestView {
    /// Id.
    pub id: RequestId,
    /// Tenant name.
    pub tenant: String,
    /// State.
    pub state: RequestState,
    /// Priority class.
    pub priority: Priority,
    /// Shape.
    pub shape: Shape,
    /// Estimated duration.
    pub duration_ms: Millis,
    /// Submission time.
    pub submitted_at: Millis,
    /// Why it waits, when queued.
    pub reason: Option<WaitReason>,
    /// Its lease, when placed or running.
    pub lease: Option<LeaseView>,
}

/// A queued request as the queue shows it. Borrows the tenant's name: a long queue is listed
/// often, and a copy of every name would cost more than the rest of the entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueuedRequest<'a> {
    /// Id.
    pub id: RequestId,
    /// Tenant name.
    pub tenant: &'a str,
    /// Priority class.
    pub priority: Priority,
    /// 1-based place in the order the next pass tries the queue if it places nothing.
    pub position: u32,
    /// Why it waits.
    pub reason: WaitReason,
    /// Submission time.
    pub submitted_at: Millis,
}

/// Why a queued request waits and when it may start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WaitInfo {
    /// 1-based place in the order the next pass tries the queue if it places nothing: classes
    /// in order, tenants by weighted share, each tenant's requests by arrival.
    pub position: u32,
    /// The reason.
    pub reason: WaitReason,
    /// Earliest start estimated from lease end times, ignoring the requests ahead of it, when
    /// one can be given (capacity waits and start times).
    pub earliest_start: Option<Millis>,
}

impl Engine {
    /// Utilisation of the fleet, by pool, model, region and pool kind.
    pub fn fleet_usage(&self) -> FleetUsage {
        let s = &self.supply;
        let mut usage = FleetUsage::default();
        for pool in &s.pools {
            let mut pu = Utilisation::default();
            for g in pool.groups.clone() {
                let group = &s.groups[g as usize];
                let per = group.tflops_per_device as u64;
                let cap = group.nodes.capacity();
                let down = group.nodes.down_devices();
                let used = cap - group.nodes.free_devices() - down;
                let u = Utilisation {
                    capacity_tflops: cap * per,
                    allocated_tflops: used * per,
                    capacity_devices: cap,
                    allocated_devices: used,
                    unavailable_devices: down,
                };
                pu.add(&u);
                let model = s.catalogue.model(group.model).id.clone();
                usage.by_model.entry(model).or_default().add(&u);
            }
            usage.total.add(&pu);
            if pool.spec.kind.is_local() {
                usage.local.add(&pu);
            } else {
                usage.external.add(&pu);
            }
            usage
                .by_region
                .entry(pool.spec.region.clone())
                .or_default()
                .add(&pu);
            usage
                .by_kind
                .entry(pool.spec.kind.as_str())
                .or_default()
                .add(&pu);
            usage.pools.push(PoolUsage {
                id: pool.spec.id.clone(),
                name: pool.spec.name.clone(),
                kind: pool.spec.kind,
                region: pool.spec.region.clone(),
                data_zone: pool.spec.data_zone.clone(),
                rtt_ms: pool.spec.rtt_ms,
                health: pool.health,
                usage: pu,
            });
        }
        usage
    }

    /// Every tenant's usage, by name.
    pub fn tenant_usages(&self) -> Vec<TenantUsage> {
        let mut names: Vec<&String> = self.tenant_ids.keys().collect();
        names.sort_unstable();
        names
            .into_iter()
            .filter_map(|name| self.tenant_usage(name))
            .collect()
    }

    /// One tenant's usage.
    pub fn tenant_usage(&self, name: &str) -> Option<TenantUsage> {
        let t = &self.tenants[self.tenant_ids.get(name)?.0 as usize];
        Some(TenantUsage {
            name: t.spec.name.clone(),
            quota_tflops: t.spec.quota_tflops,
            borrow_limit_tflops: t.spec.borrow_limit_tflops,
            weight: t.spec.weight,
            used_tflops: t.used,
            borrowed_tflops: t.borrowed,
            live_leases: t.live_leases,
            queued: t.queued,
        })
    }

    /// A placed request's lease by node group ([`LeaseGroups`]); `None` if it holds none.
    /// [`Engine::request`] gives the same with names, copied.
    pub fn lease_groups(&self, id: RequestId) -> Option<LeaseGroups<'_>> {
        let lease = self.requests.get(&id)?.lease.as_ref()?;
        Some(LeaseGroups {
            end: lease.end,
            price_fen_per_hour: lease.price_fen_per_hour,
            slices: &lease.slices,
        })
    }

    /// Where node group `g` (as leases number groups) is: its pool's id, its index in the
    /// pool and its model's id.
    pub fn group_place(&self, g: u32) -> Option<(&str, u32, &str)> {
        let s = &self.supply;
        let group = s.groups.get(g as usize)?;
        let pool = &s.pools[group.pool.0 as usize];
        Some((
            &pool.spec.id,
            g - pool.groups.start,
            &s.catalogue.model(group.model).id,
        ))
    }

    /// A live (queued, placed or running) request.
    pub fn request(&self, id: RequestId) -> Option<RequestView> {
        let r = self.requests.get(&id)?;
        let s = &self.supply;
        let lease = r.lease.as_ref().map(|l| LeaseView {
            start: l.start,
            end: l.end,
            tflops: l.tflops,
            price_fen_per_hour: l.price_fen_per_hour,
            borrowed_tflops: l.borrowed,
            parts: l
                .slices
                .iter()
                .map(|sl| {
                    let g = &s.groups[sl.group as usize];
                    let pool = &s.pools[g.pool.0 as usize];
                    LeasePart {
                        pool: pool.spec.id.clone(),
                        group: sl.group - pool.groups.start,
                        model: s.catalogue.model(g.model).id.clone(),
                        node: sl.node,
                        devices: sl.devices,
                    }
                })
                .collect(),
        });
        Some(RequestView {
            id,
            tenant: self.tenants[r.tenant.0 as usize].spec.name.clone(),
            state: r.state,
            priority: r.priority,
            shape: r.shape,
            duration_ms: r.duration,
            submitted_at: r.submitted_at,
            reason: (r.state == RequestState::Queued).then_some(r.reason),
            lease,
        })
    }

    /// Ids of all live requests, ascending.
    pub fn live_requests(&self) -> Vec<RequestId> {
        let mut ids: Vec<RequestId> = self.requests.keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// Why a queued request waits, its position, and its earliest estimated start.
    pub fn explain(&self, id: RequestId) -> Option<WaitInfo> {
        let r = self.requests.get(&id)?;
        if r.state != RequestState::Queued {
            return None;
        }
        let earliest_start = match r.reason {
            WaitReason::NotYetStartable => Some(r.start_after),
            WaitReason::CapacityBusy | WaitReason::BehindReservation | WaitReason::Pending => {
                match &self.reservation {
                    Some(res) if res.request == id => res.at,
                    _ => {
                        let candidates = self.supply.candidate_groups(&r.filter, &r.shape);
                        let is = self.supply.group_mask(&candidates);
                        self.earliest_fit(&r.probe(), &candidates, &is)
                    }
                }
            }
            WaitReason::Quota | WaitReason::NoMatchingPool | WaitReason::WorkloadUnsupported => {
                None
            }
        };
        let position = self
            .queue_order()
            .iter()
            .position(|&q| q == id)
            .map_or(0, |i| i as u32 + 1);
        Some(WaitInfo {
            position,
            reason: r.reason,
            earliest_start,
        })
    }

    /// Estimated start times of waiting requests taken in the order given: the head of the
    /// queue, as [`Engine::queued`] lists it. Ids that are not waiting are left out.
    ///
    /// A shadow schedule on a copy of the fleet: leases end at their end times, and each
    /// request, in queue order, starts at the first lease end at which it fits after the
    /// requests ahead of it have started (and not before its start time); it then holds its
    /// capacity for its duration. Requests do not jump ahead of one another here, so a request
    /// that backfills may start sooner than estimated. `None`: it never fits by lease ends
    /// alone (it waits for quota, for a pool that can hold it, or for capacity that only a
    /// pool's return would bring).
    pub fn estimated_starts(&self, head: &[RequestId]) -> Vec<(RequestId, Option<Millis>)> {
        if head.is_empty() {
            return Vec::new();
        }
        let mut fleet = self.supply.clone();
        // Lease ends still to come, earliest first; the shadow leases of estimated requests
        // join them as they are made.
        let mut ends: std::collections::BinaryHeap<_> = self
            .requests
            .iter()
            .filter_map(|(&id, r)| {
                let l = r.lease.as_ref()?;
                Some(std::cmp::Reverse((l.end, id, l.slices.clone())))
            })
            .collect();
        let mut clock = self.now;
        let mut out = Vec::with_capacity(head.len());
        for &id in head {
            let Some(r) = self
                .requests
                .get(&id)
                .filter(|r| r.state == RequestState::Queued)
            else {
                continue;
            };
            if matches!(
                r.reason,
                WaitReason::Quota | WaitReason::NoMatchingPool | WaitReason::WorkloadUnsupported
            ) {
                out.push((id, None));
                continue;
            }
            let start = loop {
                if let Some(plan) = fleet.plan(&r.filter, &r.shape, r.policy, None) {
                    let at = clock.max(r.start_after);
                    let mut slices = Vec::new();
                    fleet.commit(&plan, &r.shape, &mut slices);
                    ends.push(std::cmp::Reverse((
                        at.saturating_add(r.duration),
                        id,
                        slices,
                    )));
                    break Some(at);
                }
                let Some(std::cmp::Reverse((end, _, slices))) = ends.pop() else {
                    break None;
                };
                fleet.give_back(&slices);
                clock = clock.max(end);
            };
            out.push((id, start));
        }
        out
    }

    /// Every queued request in queue order (the order of the last scheduling pass; requests
    /// submitted since come after, by id).
    pub fn queued(&self) -> Vec<QueuedRequest<'_>> {
        self.queue_order()
            .into_iter()
            .enumerate()
            .map(|(i, id)| {
                let r = &self.requests[&id];
                QueuedRequest {
                    id,
                    tenant: &self.tenants[r.tenant.0 as usize].spec.name,
                    priority: r.priority,
                    position: i as u32 + 1,
                    reason: r.reason,
                    submitted_at: r.submitted_at,
                }
            })
            .collect()
    }

    /// The waiting requests in the order the next pass would try them if it placed none:
    /// classes in order, inside a class tenants by weighted share, each tenant's in order of
    /// arrival.
    fn queue_order(&self) -> Vec<RequestId> {
        let mut order = Vec::with_capacity(self.queue.len());
        for class in &self.queue.classes {
            let mut tenants: Vec<_> = class.iter().collect();
            tenants.sort_by_key(|&(&t, _)| self.share(t));
            for (_, fifo) in tenants {
                order.extend(
                    fifo.iter()
                        .filter(|id| self.requests.get(id).is_some_and(|r| r.in_queue)),
                );
            }
        }
        order
    }

    /// The request holding the reservation of the last pass (the first that did not fit) and
    /// when its capacity is estimated to free up.
    pub fn reservation(&self) -> Option<(RequestId, Option<Millis>)> {
        self.reservation.as_ref().map(|r| (r.request, r.at))
    }

    /// Requests waiting in the queue.
    pub fn queue_len(&self) -> usize {
        self.queue.len()
    }

    /// How many requests `tenant` has waiting (none for an unknown tenant), and how many wait
    /// in all: what a bound on waiting requests is checked against.
    pub fn waiting(&self, tenant: &str) -> (u64, u64) {
        let mine = self
            .tenant_ids
            .get(tenant)
            .map_or(0, |t| u64::from(self.tenants[t.0 as usize].queued));
        (mine, self.queue.len() as u64)
    }

    /// Leases holding capacity.
    pub fn live_lease_count(&self) -> usize {
        self.live_leases
    }

    /// The earliest time a lease expires, so a shell knows when to tick next.
    pub fn next_lease_end(&self) -> Option<Millis> {
        self.requests
            .values()
            .filter_map(|r| r.lease.as_ref().map(|l| l.end))
            .min()
    }

    /// A registered pool's specification.
    pub fn pool_spec(&self, id: &str) -> Option<&crate::PoolSpec> {
        let ix = self.supply.pool_ids.get(id)?;
        Some(&self.supply.pools[ix.0 as usize].spec)
    }

    /// What a pool's agent runs (see [`crate::Runtimes`]), if the pool is registered.
    pub fn pool_runtimes(&self, id: &str) -> Option<crate::Runtimes> {
        let ix = self.supply.pool_ids.get(id)?;
        Some(self.supply.pools[ix.0 as usize].runtimes)
    }

    /// The time of the last command.
    pub fn now(&self) -> Millis {
        self.now
    }

    /// The catalogue in use.
    pub fn catalogue(&self) -> &crate::Catalogue {
        &self.supply.catalogue
    }

    /// For every node group: (pool id, free devices per node, devices per node). For checks
    /// and tests of conservation.
    pub fn node_free_table(&self) -> Vec<(String, Vec<u16>, u16)> {
        self.supply
            .groups
            .iter()
            .map(|g| {
                (
                    self.supply.pools[g.pool.0 as usize].spec.id.clone(),
                    g.nodes.free_per_node().to_vec(),
                    g.nodes.devices_per_node(),
                )
            })
            .collect()
    }

    /// Nodes out of service: (pool, index of the node group in the pool, node), in pool order.
    pub fn down_nodes(&self) -> Vec<(String, u32, u32)> {
        let s = &self.supply;
        let mut out = Vec::new();
        for pool in &s.pools {
            for (gi, g) in pool.groups.clone().enumerate() {
                let nodes = &s.groups[g as usize].nodes;
                for node in (0..nodes.nodes()).filter(|&n| nodes.is_down(n)) {
                    out.push((pool.spec.id.clone(), gi as u32, node));
                }
            }
        }
        out
    }
}
