//! The supply side and the placement policies.
//!
//! [`Supply`] holds every pool and node group with its free capacity and the [`Index`] over them.
//! [`Supply::plan`] answers "where would this request go now under this policy?" without changing
//! anything; [`Supply::commit`] then takes the devices. Keeping the two apart lets the engine
//! check quota and reservations against a concrete plan before it commits.

use std::ops::Range;

use rustc_hash::FxHashMap;

use crate::capacity::{NodeSet, Slice};
use crate::catalogue::Catalogue;
use crate::fleet::PoolSpec;
use crate::index::{GroupStats, Index, OrderKeys};
use crate::request::{Runtimes, Shape, WaitReason};
use crate::subsidy::Discount;
use crate::units::{ModelIx, PoolIx, Tflops};

/// How to choose among the node groups that satisfy a request.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    serde::Serialize,
    serde::Deserialize,
)]
pub enum Policy {
    /// Lowest price: per device-hour for gangs, per TFLOPS-hour for elastic requests.
    #[default]
    Cheapest,
    /// Lowest price for the tenant after its compute vouchers pay their share: as
    /// [`Policy::Cheapest`], with each group's price scaled by the share the tenant pays there
    /// (see [`crate::subsidy`]). The same as `Cheapest` for a tenant without vouchers.
    CheapestAfterSubsidy,
    /// Local pools first, then the shortest round trip.
    LowestLatency,
    /// The group with the least free capacity that still fits: keeps large holes for large jobs.
    BestFit,
}

impl Policy {
    /// The name used in configuration and requests.
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::Cheapest => "cheapest",
            Policy::CheapestAfterSubsidy => "cheapest_after_subsidy",
            Policy::LowestLatency => "lowest_latency",
            Policy::BestFit => "best_fit",
        }
    }

    /// Parses a name from [`Policy::as_str`].
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "cheapest" => Some(Policy::Cheapest),
            "cheapest_after_subsidy" => Some(Policy::CheapestAfterSubsidy),
            "lowest_latency" => Some(Policy::LowestLatency),
            "best_fit" => Some(Policy::BestFit),
            _ => None,
        }
    }
}

/// Whether a pool takes new work.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub enum PoolHealth {
    /// Takes new work.
    Healthy,
    /// Keeps its leases but takes no new work.
    Draining,
    /// Its agent is gone: its leases were ended or requeued and it takes no work.
    Lost,
}

impl PoolHealth {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            PoolHealth::Healthy => "healthy",
            PoolHealth::Draining => "draining",
            PoolHealth::Lost => "lost",
        }
    }
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct Pool {
    pub spec: PoolSpec,
    pub region: u32,
    pub zone: u32,
    pub health: PoolHealth,
    pub groups: Range<u32>,
    /// What the pool's agent runs (see [`Runtimes`]).
    #[serde(default)]
    pub runtimes: Runtimes,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct Group {
    pub pool: PoolIx,
    pub model: ModelIx,
    pub tflops_per_device: u32,
    pub price: u64,
    pub nodes: NodeSet,
}

/// Interned names (regions, data zones), in first-seen order.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub(crate) struct Names {
    ids: FxHashMap<String, u32>,
}

impl Names {
    pub fn intern(&mut self, name: &str) -> u32 {
        if let Some(&id) = self.ids.get(name) {
            return id;
        }
        let id = self.ids.len() as u32;
        self.ids.insert(name.to_string(), id);
        id
    }

    pub fn get(&self, name: &str) -> Option<u32> {
        self.ids.get(name).copied()
    }
}

/// A request's constraints resolved to indexes.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub(crate) struct Filter {
    /// Bit `i` set: model `i` allowed.
    pub models: u64,
    /// Sorted region ids; empty = any.
    pub regions: Vec<u32>,
    /// Sorted pool indexes; empty = any.
    pub pools: Vec<u32>,
    pub max_rtt_ms: u32,
    pub zone: Option<u32>,
    pub max_price: u64,
    /// Runtimes the request's workload needs; none for a capacity lease.
    pub runtimes: Runtimes,
}

impl Filter {
    fn admits_pool(&self, ix: PoolIx, pool: &Pool) -> bool {
        pool.spec.rtt_ms <= self.max_rtt_ms
            && self.zone.is_none_or(|z| z == pool.zone)
            && (self.regions.is_empty() || self.regions.binary_search(&pool.region).is_ok())
            && (self.pools.is_empty() || self.pools.binary_search(&ix.0).is_ok())
            && pool.runtimes.covers(self.runtimes)
    }
}

/// Where a request would go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Plan {
    /// The whole gang in one group.
    Gang { group: u32 },
    /// Devices per group.
    Elastic { parts: Vec<(u32, u64)> },
}

/// Every pool and node group, with free capacity and the placement index.
///
/// Saved without its index: reading one back rebuilds the index from the groups (see
/// [`SavedSupply`]), which gives the same answers as the index kept up to date step by step.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(from = "SavedSupply")]
pub(crate) struct Supply {
    pub catalogue: Catalogue,
    pub pools: Vec<Pool>,
    pub groups: Vec<Group>,
    pub pool_ids: FxHashMap<String, PoolIx>,
    pub regions: Names,
    pub zones: Names,
    #[serde(skip)]
    pub index: Index,
    /// For each model, its groups: the members of its index.
    model_groups: Vec<Vec<u32>>,
    /// Models whose index must be rebuilt before the next placement (bit set). Registering a
    /// fleet of many pools then rebuilds each model once, not once per pool.
    #[serde(skip)]
    stale_models: u64,
}

/// A [`Supply`] as saved: every field but the index.
#[derive(serde::Deserialize)]
pub(crate) struct SavedSupply {
    catalogue: Catalogue,
    pools: Vec<Pool>,
    groups: Vec<Group>,
    pool_ids: FxHashMap<String, PoolIx>,
    regions: Names,
    zones: Names,
    model_groups: Vec<Vec<u32>>,
}

impl From<SavedSupply> for Supply {
    fn from(s: SavedSupply) -> Self {
        let models = s.catalogue.len();
        let mut supply = Supply {
            catalogue: s.catalogue,
            pools: s.pools,
            groups: s.groups,
            pool_ids: s.pool_ids,
            regions: s.regions,
            zones: s.zones,
            index: Index::new(models),
            model_groups: s.model_groups,
            stale_models: 0,
        };
        supply.rebuild_now(supply.all_models());
        supply
    }
}

impl Supply {
    pub fn new(catalogue: Catalogue) -> Self {
        let models = catalogue.len();
        Supply {
            catalogue,
            pools: Vec::new(),
            groups: Vec::new(),
            pool_ids: FxHashMap::default(),
            regions: Names::default(),
            zones: Names::default(),
            index: Index::new(models),
            model_groups: vec![Vec::new(); models],
            stale_models: 0,
        }
    }

    pub fn all_models(&self) -> u64 {
        if self.catalogue.len() >= 64 {
            u64::MAX
        } else {
            (1u64 << self.catalogue.len()) - 1
        }
    }

    /// The node groups of model `m` (none for a model the catalogue does not have).
    pub(crate) fn groups_of_model(&self, m: usize) -> &[u32] {
        self.model_groups.get(m).map_or(&[], Vec::as_slice)
    }

    /// What the index should record for a group now.
    pub fn stats(&self, g: u32) -> GroupStats {
        let group = &self.groups[g as usize];
        if self.pools[group.pool.0 as usize].health != PoolHealth::Healthy {
            return GroupStats::default();
        }
        GroupStats {
            max_node_free: group.nodes.max_node_free(),
            free_devices: group.nodes.free_devices(),
        }
    }

    pub fn refresh(&mut self, g: u32) {
        let model = self.groups[g as usize].model.0 as usize;
        if self.stale_models & (1 << model) != 0 {
            return; // rebuilt from scratch before the next placement
        }
        let s = self.stats(g);
        self.index.refresh(model, g, s);
    }

    /// Models whose index waits for a rebuild (bit set), for audits.
    pub fn stale_models(&self) -> u64 {
        self.stale_models
    }

    /// Makes the index current for a placement under `policy`.
    fn prepare(&mut self, policy: Policy) {
        if self.stale_models != 0 {
            let models = std::mem::take(&mut self.stale_models);
            self.rebuild_now(models);
        }
        if policy == Policy::BestFit {
            let groups = &self.groups;
            self.index
                .flush_best_fit(|g| groups[g as usize].model.0 as usize);
        }
    }

    fn order_keys(&self, g: u32) -> OrderKeys {
        let group = &self.groups[g as usize];
        let pool = &self.pools[group.pool.0 as usize];
        OrderKeys {
            price: group.price,
            rtt_ms: pool.spec.rtt_ms,
            local: pool.spec.kind.is_local(),
        }
    }

    /// Marks the index of every model in `models` (a bit set) for a rebuild.
    pub fn rebuild(&mut self, models: u64) {
        self.stale_models |= models;
    }

    fn rebuild_now(&mut self, models: u64) {
        let stats: Vec<GroupStats> = (0..self.groups.len() as u32)
            .map(|g| self.stats(g))
            .collect();
        for m in 0..self.catalogue.len() {
            if models & (1 << m) == 0 {
                continue;
            }
            let keyed: Vec<(u32, OrderKeys)> = self.model_groups[m]
                .iter()
                .map(|&g| (g, self.order_keys(g)))
                .collect();
            self.index.rebuild_model(m, &keyed, &stats);
        }
    }

    /// Adds a validated pool (its id is new) and returns its index and the models it touches.
    pub fn add_pool(&mut self, spec: PoolSpec) -> (PoolIx, u64) {
        let ix = PoolIx(self.pools.len() as u32);
        let first = self.groups.len() as u32;
        let mut models = 0u64;
        for g in &spec.groups {
            let model = self.catalogue.lookup(&g.model).expect("validated pool");
            models |= 1 << model.0;
            self.model_groups[model.0 as usize].push(self.groups.len() as u32);
            self.groups.push(Group {
                pool: ix,
                model,
                tflops_per_device: self.catalogue.model(model).fp16_dense_tflops,
                price: g.price_fen_per_device_hour,
                nodes: NodeSet::new(g.nodes, g.devices_per_node),
            });
        }
        self.pool_ids.insert(spec.id.clone(), ix);
        self.pools.push(Pool {
            region: self.regions.intern(&spec.region),
            zone: self.zones.intern(&spec.data_zone),
            health: PoolHealth::Healthy,
            groups: first..self.groups.len() as u32,
            runtimes: Runtimes::NONE,
            spec,
        });
        (ix, models)
    }

    /// Whether a group satisfies a filter, ignoring its current load and health.
    pub fn admits(&self, f: &Filter, g: u32) -> bool {
        let group = &self.groups[g as usize];
        f.models & (1 << group.model.0) != 0
            && group.price <= f.max_price
            && f.admits_pool(group.pool, &self.pools[group.pool.0 as usize])
    }

    /// Whether a group could ever hold the shape, were it empty.
    pub fn could_hold(&self, g: u32, shape: &Shape) -> bool {
        let nodes = &self.groups[g as usize].nodes;
        match *shape {
            Shape::Gang {
                nodes: n,
                devices_per_node: m,
            } => nodes.devices_per_node() >= m && nodes.nodes() >= n,
            Shape::Elastic { .. } => true,
        }
    }

    /// Groups that satisfy the filter, could hold the shape, and sit in a healthy pool.
    pub fn candidate_groups(&self, f: &Filter, shape: &Shape) -> Vec<u32> {
        (0..self.groups.len() as u32)
            .filter(|&g| self.healthy_and_admitted(f, g) && self.could_hold(g, shape))
            .collect()
    }

    /// A flag per group, set for `groups`.
    pub fn group_mask(&self, groups: &[u32]) -> Vec<bool> {
        let mut mask = vec![false; self.groups.len()];
        for &g in groups {
            mask[g as usize] = true;
        }
        mask
    }

    /// Groups that satisfy the filter and sit in a healthy pool, whatever the shape.
    pub fn admitted_groups(&self, f: &Filter) -> Vec<u32> {
        (0..self.groups.len() as u32)
            .filter(|&g| self.healthy_and_admitted(f, g))
            .collect()
    }

    fn healthy_and_admitted(&self, f: &Filter, g: u32) -> bool {
        self.pools[self.groups[g as usize].pool.0 as usize].health == PoolHealth::Healthy
            && self.admits(f, g)
    }

    /// Whether any pool, healthy or not, could ever run the request.
    pub fn matchable(&self, f: &Filter, shape: &Shape) -> bool {
        match *shape {
            Shape::Gang { .. } => (0..self.groups.len() as u32)
                .any(|g| self.admits(f, g) && self.could_hold(g, shape)),
            Shape::Elastic { tflops, .. } => {
                let mut total: Tflops = 0;
                for g in 0..self.groups.len() as u32 {
                    if self.admits(f, g) {
                        let group = &self.groups[g as usize];
                        total += group.nodes.capacity() * group.tflops_per_device as u64;
                        if total >= tflops {
                            return true;
                        }
                    }
                }
                false
            }
        }
    }

    /// Why no registered pool could ever hold the request, even with the whole fleet free
    /// and healthy; `None` when one could. The kinds of workload pools run are not asked:
    /// they are the agents', and an agent that runs the request's kind may connect later.
    pub fn why_unsatisfiable(&self, f: &Filter, shape: &Shape) -> Option<String> {
        let f = &Filter {
            runtimes: Runtimes::NONE,
            ..f.clone()
        };
        if self.matchable(f, shape) {
            return None;
        }
        let fleet: Tflops = self
            .groups
            .iter()
            .map(|g| g.nodes.capacity() * g.tflops_per_device as u64)
            .sum();
        let whole = fleet;
        let fleet = format!("the fleet holds {}", petaflops(fleet));
        let admitted: Vec<&Group> = (0..self.groups.len() as u32)
            .filter(|&g| self.admits(f, g))
            .map(|g| &self.groups[g as usize])
            .collect();
        if admitted.is_empty() {
            return Some(format!(
                "no node group of {} meets its constraints (regions, pools, data zone, \
                 latency, price); {fleet}",
                self.model_names(f.models)
            ));
        }
        let why = match *shape {
            Shape::Gang {
                nodes,
                devices_per_node,
            } => {
                let wide = admitted
                    .iter()
                    .filter(|g| g.nodes.devices_per_node() >= devices_per_node);
                match wide.map(|g| g.nodes.nodes()).max() {
                    None => format!(
                        "no node of {} has {devices_per_node} devices; the largest have {}",
                        self.model_names(f.models),
                        admitted
                            .iter()
                            .map(|g| g.nodes.devices_per_node())
                            .max()
                            .unwrap_or(0)
                    ),
                    Some(most) => format!(
                        "no node group of {} has {nodes} nodes of {devices_per_node} devices; \
                         the largest has {most}",
                        self.model_names(f.models)
                    ),
                }
            }
            Shape::Elastic { tflops, .. } => {
                let held: Tflops = admitted
                    .iter()
                    .map(|g| g.nodes.capacity() * g.tflops_per_device as u64)
                    .sum();
                if held == whole {
                    return Some(format!("{} asked, but {fleet}", petaflops(tflops)));
                }
                format!(
                    "{} asked, but the pools it may use hold {} in all",
                    petaflops(tflops),
                    petaflops(held)
                )
            }
        };
        Some(format!("{why}; {fleet}"))
    }

    /// The models of a filter's bit set, for messages: `h100 or a800`, or `any model`.
    fn model_names(&self, models: u64) -> String {
        if models == self.all_models() {
            return "any model".into();
        }
        let names: Vec<&str> = (0..self.catalogue.len())
            .filter(|m| models & (1 << m) != 0)
            .map(|m| self.catalogue.model(ModelIx(m as u16)).id.as_str())
            .collect();
        names.join(" or ")
    }

    /// Why an unmatchable request waits: no pool runs its kind of workload, when pools would
    /// match it otherwise; no matching pool at all otherwise.
    pub fn unmatched_reason(&self, f: &Filter, shape: &Shape) -> WaitReason {
        let any_runtime = Filter {
            runtimes: Runtimes::NONE,
            ..f.clone()
        };
        if f.runtimes != Runtimes::NONE && self.matchable(&any_runtime, shape) {
            WaitReason::WorkloadUnsupported
        } else {
            WaitReason::NoMatchingPool
        }
    }

    /// The smallest TFLOPS the request can take: the cheapest allowed model for a gang.
    pub fn min_tflops(&self, f: &Filter, shape: &Shape) -> Tflops {
        match *shape {
            Shape::Gang {
                nodes,
                devices_per_node,
            } => {
                let per_device = (0..self.catalogue.len())
                    .filter(|m| f.models & (1 << m) != 0)
                    .map(|m| self.catalogue.model(ModelIx(m as u16)).fp16_dense_tflops as u64)
                    .min()
                    .unwrap_or(0);
                nodes as u64 * devices_per_node as u64 * per_device
            }
            Shape::Elastic { tflops, .. } => tflops,
        }
    }

    /// The key under which a group competes across models: smaller is better.
    fn key(
        &self,
        policy: Policy,
        g: u32,
        elastic: bool,
        discount: Option<&Discount>,
    ) -> (u64, u64, u64) {
        let group = &self.groups[g as usize];
        let pool = &self.pools[group.pool.0 as usize];
        let rtt = pool.spec.rtt_ms as u64;
        match policy {
            Policy::Cheapest | Policy::CheapestAfterSubsidy => {
                let per_unit = if elastic {
                    group.tflops_per_device as u64
                } else {
                    1_000_000
                };
                let price = match discount {
                    None => group.price * 1_000_000 / per_unit,
                    // What the tenant pays, one step finer than a share of the list price: the
                    // product is below 1e8 fen x 1e6 ppm x 1e6, exact in u128.
                    Some(d) => {
                        let share = u128::from(d.share_ppm[g as usize]);
                        let p = u128::from(group.price) * share * 1_000_000 / u128::from(per_unit);
                        u64::try_from(p).unwrap_or(u64::MAX)
                    }
                };
                (price, rtt, g as u64)
            }
            Policy::LowestLatency => (
                (!pool.spec.kind.is_local() as u64) << 32 | rtt,
                group.price,
                g as u64,
            ),
            Policy::BestFit if elastic => (
                group.nodes.free_devices() * group.tflops_per_device as u64,
                g as u64,
                0,
            ),
            Policy::BestFit => (group.nodes.free_devices(), g as u64, 0),
        }
    }

    /// The next group of one model, in policy order after `cursor`, that may have a node with
    /// `m` free devices and `need` free devices in all. Advances the cursor past it.
    fn next_in_model(
        &self,
        policy: Policy,
        model: usize,
        cursor: &mut Cursor,
        m: u16,
        need: u64,
    ) -> Option<u32> {
        let mi = &self.index.models[model];
        match policy {
            Policy::Cheapest | Policy::CheapestAfterSubsidy | Policy::LowestLatency => {
                let tree = if policy == Policy::LowestLatency {
                    &mi.latency
                } else {
                    &mi.cheapest
                };
                let leaf = tree.find_first(cursor.leaf, m, need)?;
                cursor.leaf = leaf + 1;
                Some(tree.group(leaf))
            }
            Policy::BestFit => {
                let start = cursor.after.map_or((need, 0), |(f, g)| (f, g + 1));
                let &(f, g) = mi
                    .by_free
                    .range(start..)
                    .find(|&&(_, g)| self.groups[g as usize].nodes.max_node_free() >= m)?;
                cursor.after = Some((f, g));
                Some(g)
            }
        }
    }

    /// Where a request would be placed now, or `None`. `avoid` marks groups it must not use.
    /// Changes nothing but the index's own bookkeeping.
    pub fn plan(
        &mut self,
        f: &Filter,
        shape: &Shape,
        policy: Policy,
        avoid: Option<&[bool]>,
    ) -> Option<Plan> {
        self.plan_for(f, shape, policy, avoid, None)
    }

    /// [`Supply::plan`] for a tenant with a discount: under
    /// [`Policy::CheapestAfterSubsidy`] groups rank by the price the tenant pays there.
    pub fn plan_for(
        &mut self,
        f: &Filter,
        shape: &Shape,
        policy: Policy,
        avoid: Option<&[bool]>,
        discount: Option<&Discount>,
    ) -> Option<Plan> {
        self.prepare(policy);
        let discount = discount.filter(|_| policy == Policy::CheapestAfterSubsidy);
        let walk = Walk { policy, discount };
        match *shape {
            Shape::Gang {
                nodes,
                devices_per_node,
            } => self.plan_gang(f, nodes, devices_per_node, walk, avoid),
            Shape::Elastic {
                tflops,
                min_chunk_tflops,
            } => self.plan_elastic(f, tflops, min_chunk_tflops, walk, avoid),
        }
    }

    /// The next group of one model in a walk's order after `cursor` that may fit, and, when the
    /// walk has a discount, whose share is `share`: within one share, price order is the order
    /// of what the tenant pays.
    fn next_of(
        &self,
        walk: Walk<'_>,
        lane: Lane,
        cursor: &mut Cursor,
        m: u16,
        need: u64,
    ) -> Option<u32> {
        loop {
            let g = self.next_in_model(walk.policy, lane.model, cursor, m, need)?;
            match (walk.discount, lane.share) {
                (Some(d), Some(share)) if d.share_ppm[g as usize] != share => continue,
                _ => return Some(g),
            }
        }
    }

    /// The lanes a walk visits: one per allowed model, times one per share under a discount.
    fn lanes(&self, f: &Filter, walk: Walk<'_>) -> Vec<Lane> {
        let shares: &[u32] = walk.discount.map_or(&[], |d| &d.shares);
        models_of(f.models, self.catalogue.len())
            .flat_map(|model| {
                let per_share = shares.iter().map(move |&s| Lane {
                    model,
                    share: Some(s),
                });
                let whole = shares.is_empty().then_some(Lane { model, share: None });
                per_share.chain(whole)
            })
            .collect()
    }

    fn usable(&self, f: &Filter, g: u32, avoid: Option<&[bool]>) -> bool {
        avoid.is_none_or(|a| !a[g as usize]) && self.admits(f, g)
    }

    fn plan_gang(
        &self,
        f: &Filter,
        n: u32,
        m: u16,
        walk: Walk<'_>,
        avoid: Option<&[bool]>,
    ) -> Option<Plan> {
        let need = n as u64 * m as u64;
        let mut best: Option<((u64, u64, u64), u32)> = None;
        for lane in self.lanes(f, walk) {
            let mut cursor = Cursor::default();
            while let Some(g) = self.next_of(walk, lane, &mut cursor, m, need) {
                if self.usable(f, g, avoid)
                    && self.groups[g as usize].nodes.nodes_with_at_least(m) >= n
                {
                    let key = self.key(walk.policy, g, false, walk.discount);
                    if best.is_none_or(|(k, _)| key < k) {
                        best = Some((key, g));
                    }
                    break;
                }
            }
        }
        best.map(|(_, group)| Plan::Gang { group })
    }

    fn plan_elastic(
        &self,
        f: &Filter,
        tflops: Tflops,
        min_chunk: Tflops,
        walk: Walk<'_>,
        avoid: Option<&[bool]>,
    ) -> Option<Plan> {
        // One cursor per lane, merged by key so that models (and shares) compete group by
        // group.
        let mut heads: Vec<(Lane, Cursor, Option<u32>)> = self
            .lanes(f, walk)
            .into_iter()
            .map(|lane| {
                let mut c = Cursor::default();
                let g = self.next_of(walk, lane, &mut c, 1, 1);
                (lane, c, g)
            })
            .collect();
        let mut parts = Vec::new();
        let mut missing = tflops;
        while missing > 0 {
            let (i, g) = heads
                .iter()
                .enumerate()
                .filter_map(|(i, h)| {
                    h.2.map(|g| (self.key(walk.policy, g, true, walk.discount), i, g))
                })
                .min()
                .map(|(_, i, g)| (i, g))?;
            let (lane, cursor, next) = &mut heads[i];
            *next = self.next_of(walk, *lane, cursor, 1, 1);
            if !self.usable(f, g, avoid) {
                continue;
            }
            let group = &self.groups[g as usize];
            let per_device = group.tflops_per_device as u64;
            let devices = group.nodes.free_devices().min(missing.div_ceil(per_device));
            let chunk = devices * per_device;
            if devices == 0 || chunk < min_chunk.min(missing) {
                continue;
            }
            parts.push((g, devices));
            missing = missing.saturating_sub(chunk);
        }
        Some(Plan::Elastic { parts })
    }

    /// Compute a plan would take, in TFLOPS, and its price per hour in fen.
    pub fn plan_size(&self, plan: &Plan, shape: &Shape) -> (Tflops, u64) {
        let mut tflops = 0;
        let mut price = 0;
        let mut add = |g: u32, devices: u64| {
            let group = &self.groups[g as usize];
            tflops += devices * group.tflops_per_device as u64;
            price += devices * group.price;
        };
        match (plan, shape) {
            (
                Plan::Gang { group },
                Shape::Gang {
                    nodes,
                    devices_per_node,
                },
            ) => add(*group, *nodes as u64 * *devices_per_node as u64),
            (Plan::Elastic { parts }, _) => parts.iter().for_each(|&(g, d)| add(g, d)),
            _ => unreachable!("a plan matches its shape"),
        }
        (tflops, price)
    }

    /// Takes the devices of a plan made just before, and refreshes the index.
    pub fn commit(&mut self, plan: &Plan, shape: &Shape, out: &mut Vec<Slice>) {
        match (plan, shape) {
            (
                Plan::Gang { group },
                Shape::Gang {
                    nodes,
                    devices_per_node,
                },
            ) => {
                self.groups[*group as usize].nodes.take_gang(
                    *group,
                    *nodes,
                    *devices_per_node,
                    out,
                );
                self.refresh(*group);
            }
            (Plan::Elastic { parts }, _) => {
                for &(g, devices) in parts {
                    self.groups[g as usize].nodes.take_devices(g, devices, out);
                    self.refresh(g);
                }
            }
            _ => unreachable!("a plan matches its shape"),
        }
    }

    /// Gives a lease's devices back and refreshes the index.
    pub fn give_back(&mut self, slices: &[Slice]) {
        let mut last = None;
        for s in slices {
            self.groups[s.group as usize].nodes.give(s.node, s.devices);
            if last != Some(s.group) {
                if let Some(g) = last {
                    self.refresh(g);
                }
                last = Some(s.group);
            }
        }
        if let Some(g) = last {
            self.refresh(g);
        }
    }
}

/// How one placement walks the groups: the policy's order, and for
/// [`Policy::CheapestAfterSubsidy`] the tenant's discount.
#[derive(Clone, Copy)]
struct Walk<'a> {
    policy: Policy,
    discount: Option<&'a Discount>,
}

/// One model's groups, or with a discount those of one share of the price.
#[derive(Clone, Copy, Debug)]
struct Lane {
    model: usize,
    share: Option<u32>,
}

/// Position of a walk through one model's order.
#[derive(Clone, Copy, Debug, Default)]
struct Cursor {
    leaf: usize,
    after: Option<(u64, u32)>,
}

fn models_of(mask: u64, count: usize) -> impl Iterator<Item = usize> {
    (0..count).filter(move |m| mask & (1 << m) != 0)
}

/// TFLOPS as petaflops for messages, exactly, thousands grouped: `10,496.256P`, `20.8P`, `30P`.
fn petaflops(tflops: Tflops) -> String {
    let whole = (tflops / 1000).to_string();
    let mut out = String::new();
    for (i, c) in whole.chars().enumerate() {
        if i > 0 && (whole.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    let fraction = tflops % 1000;
    if fraction > 0 {
        out.push_str(format!(".{fraction:03}").trim_end_matches('0'));
    }
    out.push('P');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn petaflops_are_written_exactly() {
        assert_eq!(petaflops(10_496_256), "10,496.256P");
        assert_eq!(petaflops(20_800), "20.8P");
        assert_eq!(petaflops(30_000), "30P");
        assert_eq!(petaflops(999), "0.999P");
        assert_eq!(petaflops(1_000_000_000), "1,000,000P");
    }
    use crate::fleet::PoolKind::{External, LocalCentre};
    use crate::testkit::pool;

    /// `local` (local, rtt 1, 3000 fen), `cheap` (external, rtt 40, 1000 fen, 1 node),
    /// `tight` (external, rtt 10, 2000 fen, 2 nodes with 4 free after `fill`).
    fn supply() -> Supply {
        let mut s = Supply::new(Catalogue::builtin());
        for p in [
            pool("local", LocalCentre, 1, &[("h100", 8, 2, 3000)]),
            pool("cheap", External, 40, &[("h100", 8, 1, 1000)]),
            pool(
                "tight",
                External,
                10,
                &[("h100", 8, 2, 2000), ("a800", 8, 4, 400)],
            ),
        ] {
            let (_, models) = s.add_pool(p);
            s.rebuild(models);
        }
        s
    }

    fn any(s: &Supply) -> Filter {
        Filter {
            models: s.all_models(),
            regions: vec![],
            pools: vec![],
            max_rtt_ms: u32::MAX,
            zone: None,
            max_price: u64::MAX,
            runtimes: Runtimes::NONE,
        }
    }

    fn h100(s: &Supply) -> Filter {
        Filter {
            models: 1 << s.catalogue.lookup("h100").unwrap().0,
            ..any(s)
        }
    }

    fn pool_of(s: &Supply, plan: &Plan) -> String {
        let g = match plan {
            Plan::Gang { group } => *group,
            Plan::Elastic { parts } => parts[0].0,
        };
        s.pools[s.groups[g as usize].pool.0 as usize]
            .spec
            .id
            .clone()
    }

    const ONE_NODE: Shape = Shape::Gang {
        nodes: 1,
        devices_per_node: 8,
    };

    #[test]
    fn cheapest_takes_the_lowest_device_price() {
        let mut s = supply();
        let f = h100(&s);
        let plan = s.plan(&f, &ONE_NODE, Policy::Cheapest, None).unwrap();
        assert_eq!(pool_of(&s, &plan), "cheap");
    }

    #[test]
    fn lowest_latency_takes_local_then_the_shortest_round_trip() {
        let mut s = supply();
        let f = h100(&s);
        let plan = s.plan(&f, &ONE_NODE, Policy::LowestLatency, None).unwrap();
        assert_eq!(pool_of(&s, &plan), "local");
        let far = Filter {
            max_rtt_ms: 39,
            pools: vec![1, 2],
            ..h100(&s)
        };
        let plan = s
            .plan(&far, &ONE_NODE, Policy::LowestLatency, None)
            .unwrap();
        assert_eq!(pool_of(&s, &plan), "tight");
    }

    #[test]
    fn best_fit_takes_the_group_with_least_room_that_fits() {
        let mut s = supply();
        let f = h100(&s);
        // Make `tight` the fullest h100 group that can still take one node.
        let mut out = Vec::new();
        s.commit(
            &Plan::Elastic {
                parts: vec![(2, 4)],
            },
            &Shape::Elastic {
                tflops: 1,
                min_chunk_tflops: 1,
            },
            &mut out,
        );
        let plan = s.plan(&f, &ONE_NODE, Policy::BestFit, None).unwrap();
        assert_eq!(
            pool_of(&s, &plan),
            "cheap",
            "8 free, the least of those that fit"
        );
        let half = Shape::Gang {
            nodes: 1,
            devices_per_node: 4,
        };
        let plan = s.plan(&f, &half, Policy::BestFit, None).unwrap();
        assert_eq!(
            pool_of(&s, &plan),
            "cheap",
            "8 free is less than tight's 12"
        );
    }

    #[test]
    fn elastic_merges_models_by_price_per_tflops_and_respects_avoid() {
        let mut s = supply();
        let f = any(&s);
        let shape = Shape::Elastic {
            tflops: 312 * 40,
            min_chunk_tflops: 1,
        };
        let Some(Plan::Elastic { parts }) = s.plan(&f, &shape, Policy::Cheapest, None) else {
            panic!()
        };
        // Per TFLOPS-hour: cheap's h100 1000/989 = 1.01 fen, then the a800 400/312 = 1.28 fen:
        // all 8 h100 (7,912 TFLOPS), then 15 a800 for the remaining 4,568.
        assert_eq!(parts, [(1, 8), (3, 15)]);
        let mut avoid = vec![false; s.groups.len()];
        avoid[3] = true;
        let Some(Plan::Elastic { parts }) = s.plan(&f, &shape, Policy::Cheapest, Some(&avoid))
        else {
            panic!()
        };
        assert_eq!(
            parts,
            [(1, 8), (2, 5)],
            "without the a800, tight's h100 (2.02 fen) is next"
        );
    }

    #[test]
    fn a_draining_pool_is_skipped_and_a_gang_never_spans_groups() {
        let mut s = supply();
        let f = h100(&s);
        s.pools[1].health = PoolHealth::Draining;
        s.refresh(1);
        let plan = s.plan(&f, &ONE_NODE, Policy::Cheapest, None).unwrap();
        assert_eq!(pool_of(&s, &plan), "tight");
        let three = Shape::Gang {
            nodes: 3,
            devices_per_node: 8,
        };
        assert_eq!(
            s.plan(&f, &three, Policy::Cheapest, None),
            None,
            "no h100 group has 3 nodes"
        );
    }

    mod after_subsidy {
        use proptest::prelude::*;

        use super::*;
        use crate::fleet::PoolKind;
        use crate::subsidy::{Subsidy, SubsidyPools};

        const KINDS: [PoolKind; 3] = [
            PoolKind::LocalCentre,
            PoolKind::LocalCloud,
            PoolKind::External,
        ];
        const MODELS: [&str; 2] = ["h100", "a800"];

        /// Pools of one group each: (kind, model, price, nodes, nodes taken, rtt).
        fn fleet() -> impl Strategy<Value = Vec<(usize, usize, u64, u32, u32, u32)>> {
            prop::collection::vec(
                (
                    0..3usize,
                    0..2usize,
                    1u64..5_000,
                    1u32..4,
                    0u32..4,
                    1u32..50,
                ),
                1..12,
            )
        }

        fn terms() -> impl Strategy<Value = Vec<(u32, Option<usize>)>> {
            prop::collection::vec((1u32..=10_000, prop::option::of(0..3usize)), 0..3)
        }

        fn build(pools: &[(usize, usize, u64, u32, u32, u32)]) -> Supply {
            let mut s = Supply::new(Catalogue::builtin());
            for (i, &(kind, model, price, nodes, taken, rtt)) in pools.iter().enumerate() {
                let spec = crate::testkit::pool(
                    &format!("p{i}"),
                    KINDS[kind],
                    rtt,
                    &[(MODELS[model], 8, nodes, price)],
                );
                let (_, models) = s.add_pool(spec);
                s.rebuild(models);
                let g = s.groups.len() as u32 - 1;
                let mut out = Vec::new();
                s.groups[g as usize].nodes.take_devices(
                    g,
                    u64::from(taken.min(nodes)) * 8,
                    &mut out,
                );
                s.refresh(g);
            }
            s
        }

        fn discount(s: &Supply, terms: &[(u32, Option<usize>)]) -> Discount {
            let terms = terms
                .iter()
                .map(|&(rate_bp, kind)| Subsidy {
                    rate_bp,
                    pools: kind.map_or(SubsidyPools::All, |k| {
                        SubsidyPools::Kinds([KINDS[k]].into())
                    }),
                })
                .collect();
            Discount::resolve(
                terms,
                s.groups.iter().map(|g| &s.pools[g.pool.0 as usize].spec),
            )
        }

        /// What the tenant pays per device-hour in a group, in fen x 1e6, with the tie-breaks.
        fn tenant_key(s: &Supply, d: &Discount, g: u32, per_unit: u128) -> (u128, u32, u32) {
            let group = &s.groups[g as usize];
            let rtt = s.pools[group.pool.0 as usize].spec.rtt_ms;
            (
                u128::from(group.price) * u128::from(d.share_ppm[g as usize]) * 1_000_000
                    / per_unit,
                rtt,
                g,
            )
        }

        proptest! {
            /// A gang goes to the group, among those that can hold it, where the tenant pays
            /// least after its vouchers; an elastic request takes groups in that order.
            #[test]
            fn placement_is_the_cheapest_for_the_tenant(pools in fleet(), terms in terms(), nodes in 1u32..3) {
                let mut s = build(&pools);
                let d = discount(&s, &terms);
                let f = super::any(&s);
                let gang = Shape::Gang { nodes, devices_per_node: 8 };
                let best = (0..s.groups.len() as u32)
                    .filter(|&g| s.groups[g as usize].nodes.nodes_with_at_least(8) >= nodes)
                    .min_by_key(|&g| tenant_key(&s, &d, g, 1_000_000));
                let plan = s.plan_for(&f, &gang, Policy::CheapestAfterSubsidy, None, Some(&d));
                prop_assert_eq!(plan, best.map(|group| Plan::Gang { group }));

                let tflops = 600 * 16;
                let elastic = Shape::Elastic { tflops, min_chunk_tflops: 1 };
                let mut order: Vec<u32> = (0..s.groups.len() as u32)
                    .filter(|&g| s.groups[g as usize].nodes.free_devices() > 0)
                    .collect();
                order.sort_by_key(|&g| tenant_key(&s, &d, g, u128::from(s.groups[g as usize].tflops_per_device)));
                let mut missing = tflops;
                let mut expected = Vec::new();
                for g in order {
                    if missing == 0 {
                        break;
                    }
                    let group = &s.groups[g as usize];
                    let per = u64::from(group.tflops_per_device);
                    let devices = group.nodes.free_devices().min(missing.div_ceil(per));
                    expected.push((g, devices));
                    missing = missing.saturating_sub(devices * per);
                }
                let plan = s.plan_for(&f, &elastic, Policy::CheapestAfterSubsidy, None, Some(&d));
                let expected = (missing == 0).then_some(Plan::Elastic { parts: expected });
                prop_assert_eq!(plan, expected);
            }
        }
    }
}
