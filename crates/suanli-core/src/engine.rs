//! The engine: a deterministic state machine from commands to events.
//!
//! [`Engine::apply`] takes a [`Command`] and the caller's `now` and returns what happened as
//! [`Event`]s. A rejected command changes nothing and yields one [`Event::Rejected`].
//!
//! # Scheduling
//! A submitted request is placed at once when nothing of its class or a more important one is
//! waiting for capacity; otherwise it waits for the next [`Command::Tick`]. A tick first expires
//! leases whose time is up, then walks a pass over the queue, at most
//! [`EngineConfig::pass_slice`] requests of it (a longer pass goes on at the next tick):
//! - classes in order (critical, standard, spot); inside a class the tenant with the smallest
//!   weighted share (usage over weight) goes next, and a tenant's own requests go FIFO;
//! - a request that fits, and whose tenant stays within quota plus borrowing limit, is placed;
//! - a critical or standard request that does not fit may preempt spot leases, and, when its
//!   tenant is within its nominal quota, leases that other tenants placed on borrowed capacity;
//! - the first request that still does not fit gets a reservation: the time its capacity frees up,
//!   estimated from lease end times, and the groups it could use. Later requests are backfilled
//!   only if they end before that time or use none of those groups (EASY backfill).
//!
//! A pass after capacity came free (or time came, or requests arrived) is *incremental*: it
//! tries only the waiting requests whose answer could have changed, in the order above, and
//! decides exactly as a pass over everything would (see `incremental`). A pass over everything
//! runs after the fleet's shape or a tenant changed, and is counted ([`Engine::pass_counts`]).
//!
//! # Layout
//! This file holds the engine's state and the lifecycle of pools, tenants and requests; the
//! passes are in `pass`, what makes them incremental (the queue index and the wakes) in
//! `incremental`, the reservation estimates in `estimate`, the victim search in `preempt`,
//! and the reading of older saved engines in `legacy`, each an `impl Engine` of its own.
//! [`Engine::apply`] stays the one entry point.

use std::cmp::{Ordering, Reverse};
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::hash::{Hash, Hasher};

use rustc_hash::{FxHashMap, FxHashSet, FxHasher};

use crate::capacity::Slice;
use crate::catalogue::Catalogue;
use crate::digest::Fnv64;
use crate::error::CoreError;
use crate::fleet::{Fleet, FleetError, PoolSpec};
use crate::placement::{Filter, Plan, Policy, PoolHealth, Supply};
use crate::queue::WaitQueue;
use crate::request::{
    EndReason, JobCause, JobOutcome, Priority, RequestSpec, RequestState, Runtimes, Shape,
    TenantSpec, WaitReason,
};
use crate::subsidy::{Discount, Subsidy};
use crate::units::{Millis, PoolIx, RequestId, TenantIx, Tflops};

mod estimate;
mod incremental;
mod legacy;
mod pass;
mod preempt;

use estimate::EndsByGroup;
use incremental::{FitBounds, GroupChange, Picked, QueueIndex, Wakes};
pub use legacy::EngineBeforeIncremental;
use preempt::{Preempted, VictimIndex};

/// Longest duration a request may ask for: one year.
pub const MAX_DURATION_MS: Millis = 366 * 24 * 3600 * 1000;

/// Settings of the engine that are not per request.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EngineConfig {
    /// Placement policy for requests that name none.
    pub default_policy: Policy,
    /// Queue entries one tick's slice of a scheduling pass walks at most (at least 1); see
    /// [`PASS_SLICE`], the default.
    pub pass_slice: u32,
    /// Whether a pass tries only the requests whose answer could have changed (see
    /// `engine/incremental.rs`); off, every pass tries every waiting request. Both decide
    /// alike; the switch is there to show it.
    pub incremental: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            default_policy: Policy::default(),
            pass_slice: PASS_SLICE,
            incremental: true,
        }
    }
}

/// What the engine is asked to do. Every command is applied at a caller-given `now`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Command {
    /// Add a pool with all its nodes free.
    RegisterPool(PoolSpec),
    /// Change a registered pool: name, kind, region, RTT, zone, prices, interconnect, and node
    /// counts (nodes can be added; removed only when they are free). Models and node sizes of
    /// its groups cannot change.
    UpdatePool(PoolSpec),
    /// Keep the pool's leases but place nothing new there.
    DrainPool {
        /// Pool id.
        pool: String,
    },
    /// Let a draining pool take new work again.
    UndrainPool {
        /// Pool id.
        pool: String,
    },
    /// The pool is gone: its leases end as lost, or go back to the queue when they asked to.
    LosePool {
        /// Pool id.
        pool: String,
    },
    /// A lost pool is back, with all its nodes free.
    RestorePool {
        /// Pool id.
        pool: String,
    },
    /// A node went out of service (its leases end as lost, or go back to the queue when they
    /// asked to) or came back (wholly free). Setting the health a node has changes nothing.
    SetNodeHealth {
        /// Pool id.
        pool: String,
        /// Index of the node group in the pool.
        group: u32,
        /// Index of the node in the group.
        node: u32,
        /// Whether it can run work.
        healthy: bool,
    },
    /// Create or change a tenant.
    SetTenant(TenantSpec),
    /// Set (an empty list removes) the compute vouchers that can pay a tenant's bills now, as
    /// placement sees them: under [`Policy::CheapestAfterSubsidy`] the tenant's requests go
    /// where it pays least after them. The shell sends this whenever a voucher is issued, runs
    /// out or expires; the tenant need not be known yet. Placed leases stay where they are.
    SetSubsidies {
        /// The tenant's name.
        tenant: String,
        /// Its vouchers' rates and scopes.
        subsidies: Vec<Subsidy>,
    },
    /// A tenant asks for compute.
    Submit(RequestSpec),
    /// The tenant withdraws a queued request or stops a placed one.
    Cancel {
        /// The request.
        request: RequestId,
    },
    /// The tenant is done with a placed request before its time.
    Release {
        /// The request.
        request: RequestId,
    },
    /// The pool confirms that a placed lease started.
    LeaseStarted {
        /// The request.
        request: RequestId,
    },
    /// The pool reports that a lease's job ended: the request completes when the outcome's
    /// cause is [`JobCause::Completed`] and fails otherwise.
    LeaseFinished {
        /// The request.
        request: RequestId,
        /// How the job ended.
        outcome: JobOutcome,
    },
    /// Expire leases whose time is up and schedule what waits.
    Tick,
    /// Set the kinds of workload a pool's agent runs (announced when the agent connects):
    /// requests with a workload go only where their kind runs.
    SetPoolRuntimes {
        /// Pool id.
        pool: String,
        /// What its agent runs; empty for none.
        runtimes: Runtimes,
    },
}

/// What happened.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Event {
    /// A pool joined the fleet.
    PoolRegistered {
        /// Pool id.
        pool: String,
    },
    /// A pool's specification changed.
    PoolUpdated {
        /// Pool id.
        pool: String,
    },
    /// A pool's health changed.
    PoolHealthChanged {
        /// Pool id.
        pool: String,
        /// New health.
        health: PoolHealth,
    },
    /// A node went out of service or came back.
    NodeHealthChanged {
        /// Pool id.
        pool: String,
        /// Index of the node group in the pool.
        group: u32,
        /// Index of the node in the group.
        node: u32,
        /// Whether it can run work now.
        healthy: bool,
    },
    /// A tenant was created or changed.
    TenantSet {
        /// Tenant name.
        tenant: String,
    },
    /// A tenant's subsidies were set (see [`Command::SetSubsidies`]).
    SubsidiesSet {
        /// The tenant's name.
        tenant: String,
    },
    /// A request was accepted and queued.
    Submitted {
        /// The new request's id.
        request: RequestId,
    },
    /// A request got a lease.
    Placed {
        /// The request.
        request: RequestId,
    },
    /// The pool confirmed the lease started.
    Started {
        /// The request.
        request: RequestId,
    },
    /// A lease ended but the request went back to the queue.
    Requeued {
        /// The request.
        request: RequestId,
        /// Why its lease ended.
        reason: EndReason,
    },
    /// A request reached a final state; the engine forgets it.
    Ended {
        /// The request.
        request: RequestId,
        /// Its final state.
        state: RequestState,
        /// Why.
        reason: EndReason,
    },
    /// The command was rejected and changed nothing. Not serialisable: a rejection is an
    /// answer, never state.
    #[serde(skip)]
    Rejected {
        /// Why.
        error: CoreError,
    },
}

#[derive(Clone, Debug, Hash, serde::Serialize, serde::Deserialize)]
pub(crate) struct Tenant {
    pub spec: TenantSpec,
    pub used: Tflops,
    pub borrowed: Tflops,
    pub live_leases: u32,
    pub queued: u32,
    /// When its usage last fell with its quota in reach: its victim searches may reclaim
    /// borrowed capacity again.
    pub relieved_at: u64,
}

impl Tenant {
    fn limit(&self) -> Tflops {
        self.spec
            .quota_tflops
            .saturating_add(self.spec.borrow_limit_tflops.unwrap_or(Tflops::MAX))
    }
}

#[derive(Clone, Debug, Hash, serde::Serialize, serde::Deserialize)]
pub(crate) struct Lease {
    pub slices: Vec<Slice>,
    pub start: Millis,
    pub end: Millis,
    pub tflops: Tflops,
    pub price_fen_per_hour: u64,
    /// TFLOPS of this lease above its tenant's quota when it was placed: reclaimable.
    pub borrowed: Tflops,
}

#[derive(Clone, Debug, Hash, serde::Serialize, serde::Deserialize)]
pub(crate) struct Request {
    pub tenant: TenantIx,
    pub shape: Shape,
    pub duration: Millis,
    pub priority: Priority,
    pub filter: Filter,
    /// Hash of the filter, so the pass can remember shapes that did not fit.
    pub filter_key: u64,
    pub policy: Policy,
    pub start_after: Millis,
    pub deadline: Option<Millis>,
    pub requeue: bool,
    pub submitted_at: Millis,
    pub state: RequestState,
    /// Whether it sits in the wait queue (a new request is tried before it is queued).
    pub in_queue: bool,
    /// The pass during which it was last queued: a victim requeued by a pass waits for the
    /// next one.
    #[serde(default)]
    pub queued_in_pass: u64,
    pub reason: WaitReason,
    /// Its shape key in the queue index, once queued.
    pub key: u32,
    /// Fleet epoch at which `matchable` was computed.
    pub match_epoch: u64,
    pub matchable: bool,
    pub lease: Option<Lease>,
}

/// What [`Engine::earliest_fit`] needs of a request.
pub(crate) struct Probe {
    pub shape: Shape,
    pub start_after: Millis,
}

impl Request {
    pub(crate) fn probe(&self) -> Probe {
        Probe {
            shape: self.shape,
            start_after: self.start_after,
        }
    }
}

/// A dry run of a submission: where it would go now, or why it would wait.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Quote {
    /// Where it would be placed, when it would be placed at once.
    pub placement: Option<QuotePlacement>,
    /// Why it would wait otherwise.
    pub reason: Option<WaitReason>,
    /// When it could start, estimated from lease end times, when it would wait.
    pub earliest_start: Option<Millis>,
}

/// The placement of a quote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuotePlacement {
    /// Devices per node group.
    pub parts: Vec<QuotePart>,
    /// Compute it would hold.
    pub tflops: Tflops,
    /// Price per hour in fen.
    pub price_fen_per_hour: u64,
}

/// Devices a quote takes in one node group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuotePart {
    /// Pool id.
    pub pool: String,
    /// Index of the group in the pool.
    pub group: u32,
    /// Accelerator model id.
    pub model: String,
    /// Devices.
    pub devices: u64,
}

/// The live leases indexed by node group, for the victim search and the reservation estimate.
/// Derived from the leases: left out of snapshots, built when an engine is loaded, kept up to
/// date as leases start and end.
#[derive(Clone, Debug, Default)]
pub(crate) struct LeaseIndex {
    victims: VictimIndex,
    ends: EndsByGroup,
}

impl LeaseIndex {
    fn of(e: &Engine) -> LeaseIndex {
        let mut index = LeaseIndex::default();
        for &(_, id) in &e.ends {
            let r = &e.requests[&id];
            if let Some(lease) = &r.lease {
                let preemptible = e.preemptible.contains(&id);
                index.count(&e.supply, id, r.priority, lease, preemptible, true);
            }
        }
        index
    }

    /// A lease was placed (`placed`) or ended.
    fn count(
        &mut self,
        supply: &Supply,
        id: RequestId,
        priority: Priority,
        lease: &Lease,
        preemptible: bool,
        placed: bool,
    ) {
        self.ends.count(id, lease, placed);
        if preemptible {
            self.victims.count(supply, id, priority, lease, placed);
        }
    }
}

impl Lease {
    /// Gives the devices this lease holds in group `g` back to `free` (that group's free
    /// devices per node): how many nodes it brings to `m` free, or `None` if it holds none
    /// there.
    pub(crate) fn refill(&self, g: u32, free: &mut [u16], m: u16) -> Option<u32> {
        let mut reached = None;
        for s in self.slices.iter().filter(|s| s.group == g) {
            let before = free[s.node as usize];
            free[s.node as usize] += s.devices;
            let now = u32::from(before < m && free[s.node as usize] >= m);
            reached = Some(reached.unwrap_or(0) + now);
        }
        reached
    }
}

/// The reservation of the first request that could not be placed in the last pass.
#[derive(Clone, Debug, Hash, serde::Serialize, serde::Deserialize)]
pub(crate) struct Reservation {
    pub request: RequestId,
    /// When enough capacity frees up, by lease end times; `None` if it never does by itself.
    pub at: Option<Millis>,
    /// The groups it could use.
    pub groups: Vec<bool>,
}

/// Share of a tenant for fair-share ordering: usage over weight, compared exactly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Share {
    used: Tflops,
    weight: u32,
    tenant: TenantIx,
}

impl Ord for Share {
    fn cmp(&self, other: &Self) -> Ordering {
        let a = self.used as u128 * other.weight as u128;
        let b = other.used as u128 * self.weight as u128;
        a.cmp(&b).then(self.tenant.cmp(&other.tenant))
    }
}

impl PartialOrd for Share {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// The allocation engine. See the module documentation.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Engine {
    pub(crate) config: EngineConfig,
    pub(crate) supply: Supply,
    pub(crate) tenants: Vec<Tenant>,
    pub(crate) tenant_ids: FxHashMap<String, TenantIx>,
    pub(crate) requests: FxHashMap<RequestId, Request>,
    pub(crate) queue: WaitQueue,
    /// The live leases by end time: expiry takes them from the front, and the reservation
    /// estimate walks them in order.
    ends: BTreeSet<(Millis, RequestId)>,
    pub(crate) live_leases: usize,
    /// Queued requests per class that wait for capacity (or have not been looked at yet).
    capacity_waiting: [u32; 3],
    spot_leases: u32,
    borrowing_leases: u32,
    /// Live leases a preemption may end (spot, or holding borrowed capacity): the victim search
    /// looks only at these, not at every request.
    preemptible: BTreeSet<RequestId>,
    /// The live leases indexed by node group (derived from them; built when missing, at the
    /// next command).
    #[serde(skip)]
    lease_index: Option<LeaseIndex>,
    /// The groups each filter reserved for or searched for admits in healthy pools, until the
    /// fleet changes (derived; at most [`CANDIDATE_CACHE`] filters).
    #[serde(skip)]
    candidate_cache: FxHashMap<u64, (Filter, Vec<u32>)>,
    pub(crate) reservation: Option<Reservation>,
    /// Whether something happened since the last pass that a pass could act on (capacity freed,
    /// a request queued, the fleet or a tenant changed). Without it, and before the first of
    /// `timed`, a tick skips the pass: it would decide exactly what the last one decided.
    pass_due: bool,
    /// When waiting requests' start times come and their deadlines become unmeetable.
    timed: BTreeSet<(Millis, RequestId)>,
    /// Requests queued since the last pass.
    arrivals: Vec<RequestId>,
    /// The waiting requests by shape key and reason (see `incremental`).
    index: QueueIndex,
    /// The last stamp given to a wake: wakes and victim searches are ordered by stamps.
    stamp: u64,
    /// The stamp of the last change to the fleet or a tenant.
    fleet_woke: u64,
    /// What changed since the last pass began, for the next one.
    pending: Wakes,
    /// What changed since the pass under way last looked, for it.
    inbox: Wakes,
    /// Passes by kind and requests tried, for the shells' figures.
    pass_counts: PassCounts,
    /// What the free capacity could hold, until it changes (derived).
    #[serde(skip)]
    fit: FitBounds,
    /// The pass under way, when the last tick did not finish it.
    pass: Option<PassInProgress>,
    /// Passes made so far (full and arrivals-only).
    #[serde(default)]
    passes: u64,
    /// Bumped whenever the fleet changes shape, so cached `matchable` answers are recomputed.
    fleet_epoch: u64,
    /// Tenants' compute vouchers as placement sees them, by tenant name, resolved against the
    /// fleet (see [`crate::subsidy`]). Set by the shell; only the policy "cheapest after
    /// subsidy" reads them.
    subsidies: BTreeMap<String, Discount>,
    next_request: u64,
    pub(crate) now: Millis,
}

/// Scheduling passes made, by kind, and the requests they tried: an incremental pass tries only
/// what could have changed, a full one everything waiting.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PassCounts {
    /// Passes over every waiting request: the first, and those after the fleet or a tenant
    /// changed (or all, when the engine is set to full passes).
    pub full: u64,
    /// Passes over the requests whose answer could have changed.
    pub incremental: u64,
    /// Passes over the requests that arrived since the last pass only.
    pub arrivals: u64,
    /// Requests tried by passes of all kinds.
    pub tried: u64,
    /// Requests an incremental pass looked at to find the next victim search worth making.
    pub looked_at: u64,
    /// Requests an incremental pass passed over without trying them: it could tell that
    /// trying would change nothing.
    pub passed_over: u64,
    /// Victim searches made (each a walk over the preemptible leases of some node groups).
    pub searches: u64,
}

/// Filters whose admitted groups are kept at most (see [`Engine::candidates_of`]).
const CANDIDATE_CACHE: usize = 4096;

/// Victim searches (each a scan of the live leases) one pass may make; requests beyond them
/// wait for the next pass. Bounds a pass over a long queue on a full fleet.
pub const PREEMPTION_SEARCHES_PER_PASS: u32 = 32;

/// Queue entries one tick's slice of a pass walks at most, unless the config says otherwise (a
/// placement counts for [`PLACEMENT_WEIGHT`] entries). A pass over a longer queue goes on at
/// the next tick from where it stopped, so a tick costs about a millisecond however long the
/// queue: calls that wait behind it in the broker wait that long, not for a pass over tens of
/// thousands of requests. Requests not yet reached wait until the pass reaches them, one tick
/// per slice.
pub const PASS_SLICE: u32 = 2048;

/// What a placement counts for in a slice, in queue entries walked: placing a request (and
/// what the shell does with each placement) costs some tens of times walking past one that
/// waits, so a slice that places much stops sooner.
pub const PLACEMENT_WEIGHT: u32 = 32;

/// A scheduling pass under way: what it still has to walk. It is part of the engine's state
/// (snapshots keep it), so a recovered engine goes on with it as the live one would.
#[derive(Clone, Debug, Hash, serde::Serialize, serde::Deserialize)]
struct PassInProgress {
    /// Its number: requests queued since it began wait for the next pass.
    id: u64,
    /// Per class, each tenant's requests as the queue held them when the pass began.
    classes: [Vec<TenantRun>; 3],
    /// The class being walked.
    class: usize,
    /// Victim searches left.
    preemption_budget: u32,
    /// For an incremental pass, what it keeps besides its runs.
    picked: Option<Picked>,
}

/// One tenant's requests of one class in a pass: all of them in queue order (a full or an
/// arrivals pass), or those an incremental pass picked, and where the walk is.
#[derive(Clone, Debug, Hash, serde::Serialize, serde::Deserialize)]
struct TenantRun {
    tenant: TenantIx,
    ids: Vec<RequestId>,
    walked: usize,
    /// The requests picked, for an incremental pass.
    picked: Option<BTreeSet<RequestId>>,
    /// The last request taken.
    cursor: RequestId,
    /// Whether the walk is over: a full pass's run has walked all; an incremental pass's had
    /// nothing left to try when its turn came.
    closed: bool,
}

impl TenantRun {
    fn new(tenant: TenantIx, ids: Vec<RequestId>) -> Self {
        TenantRun {
            tenant,
            ids,
            walked: 0,
            picked: None,
            cursor: RequestId(0),
            closed: false,
        }
    }

    fn picked(tenant: TenantIx) -> Self {
        TenantRun {
            picked: Some(BTreeSet::new()),
            ..TenantRun::new(tenant, Vec::new())
        }
    }

    fn open(&self) -> bool {
        !self.closed && (self.picked.is_some() || self.walked < self.ids.len())
    }

    /// The first id the walk has not passed.
    fn after(&self) -> RequestId {
        RequestId(self.cursor.0 + 1)
    }

    /// Adds a request to an incremental run, unless the walk is past it.
    fn pick(&mut self, id: RequestId) {
        if let Some(todo) = self.picked.as_mut()
            && !self.closed
            && id > self.cursor
        {
            todo.insert(id);
        }
    }

    /// Takes `next` (the next of `ids` for a full or arrivals run, found by the engine for an
    /// incremental one); none closes the run.
    fn take(&mut self, next: Option<RequestId>) -> Option<RequestId> {
        match next {
            Some(id) => self.cursor = id,
            None => self.closed = true,
        }
        next
    }
}

/// What one slice of a scheduling pass remembers while it walks the queue.
struct PassState {
    /// (filter, shape, policy) that found no capacity, even by preemption.
    failed: FxHashSet<(u64, Shape, Policy)>,
    /// Victim searches left.
    preemption_budget: u32,
}

/// Outcome of trying to start one queued request.
enum Start {
    Placed,
    Waits,
    Gone,
}

impl Engine {
    /// An engine with a catalogue and no pools or tenants.
    pub fn new(config: EngineConfig, catalogue: Catalogue) -> Self {
        Engine {
            config,
            supply: Supply::new(catalogue),
            tenants: Vec::new(),
            tenant_ids: FxHashMap::default(),
            requests: FxHashMap::default(),
            queue: WaitQueue::default(),
            ends: BTreeSet::new(),
            live_leases: 0,
            capacity_waiting: [0; 3],
            spot_leases: 0,
            borrowing_leases: 0,
            preemptible: BTreeSet::new(),
            lease_index: Some(LeaseIndex::default()),
            candidate_cache: FxHashMap::default(),
            reservation: None,
            pass_due: false,
            timed: BTreeSet::new(),
            arrivals: Vec::new(),
            index: QueueIndex::default(),
            stamp: 1,
            fleet_woke: 1,
            pending: Wakes::default(),
            inbox: Wakes::default(),
            pass_counts: PassCounts::default(),
            fit: FitBounds::default(),
            pass: None,
            passes: 0,
            fleet_epoch: 0,
            subsidies: BTreeMap::new(),
            next_request: 1,
            now: 0,
        }
    }

    /// An engine with every pool of a fleet registered at time 0.
    pub fn with_fleet(
        config: EngineConfig,
        catalogue: Catalogue,
        fleet: &Fleet,
    ) -> Result<Self, CoreError> {
        let mut e = Engine::new(config, catalogue);
        for pool in &fleet.pools {
            e.register_pool(pool.clone())?;
        }
        Ok(e)
    }

    /// The engine's settings.
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Changes the engine's settings; a pass under way goes on as it began.
    pub fn config_mut(&mut self) -> &mut EngineConfig {
        &mut self.config
    }

    /// Applies a command at `now` and returns its events.
    pub fn apply(&mut self, command: Command, now: Millis) -> Vec<Event> {
        let mut out = Vec::new();
        self.apply_into(command, now, &mut out);
        out
    }

    /// Applies a command at `now`, appending its events to `out`. Time never goes backwards: an
    /// earlier `now` is taken as the latest time seen. A rejected command changes nothing, not
    /// even the time.
    pub fn apply_into(&mut self, command: Command, now: Millis, out: &mut Vec<Event>) {
        let before = self.now;
        self.now = self.now.max(now);
        if self.lease_index.is_none() {
            self.lease_index = Some(LeaseIndex::of(self));
        }
        let frees_or_reshapes = !matches!(
            command,
            Command::Submit(_)
                | Command::LeaseStarted { .. }
                | Command::Tick
                | Command::SetSubsidies { .. }
        );
        // What may change every waiting request's answer: the fleet's shape and the tenants.
        let reshapes = matches!(
            command,
            Command::RegisterPool(_)
                | Command::UpdatePool(_)
                | Command::DrainPool { .. }
                | Command::UndrainPool { .. }
                | Command::LosePool { .. }
                | Command::RestorePool { .. }
                | Command::SetNodeHealth { .. }
                | Command::SetTenant(_)
                | Command::SetPoolRuntimes { .. }
        );
        let result = match command {
            Command::RegisterPool(spec) => self.register_pool(spec).map(|p| {
                out.push(Event::PoolRegistered { pool: p });
            }),
            Command::UpdatePool(spec) => self.update_pool(spec, out),
            Command::DrainPool { pool } => self.set_health(&pool, PoolHealth::Draining, out),
            Command::UndrainPool { pool } => self.set_health(&pool, PoolHealth::Healthy, out),
            Command::LosePool { pool } => self.set_health(&pool, PoolHealth::Lost, out),
            Command::RestorePool { pool } => self.set_health(&pool, PoolHealth::Healthy, out),
            Command::SetNodeHealth {
                pool,
                group,
                node,
                healthy,
            } => self.set_node_health(pool, group, node, healthy, out),
            Command::SetTenant(spec) => self.set_tenant(spec, out),
            Command::SetSubsidies { tenant, subsidies } => {
                self.set_subsidies(tenant, subsidies, out)
            }
            Command::Submit(spec) => self.submit(spec, out),
            Command::Cancel { request } => self.cancel(request, out),
            Command::Release { request } => self.end_live(
                request,
                "release",
                RequestState::Completed,
                EndReason::Released,
                out,
            ),
            Command::LeaseStarted { request } => self.started(request, out),
            Command::LeaseFinished { request, outcome } => {
                let (state, reason) = if outcome.cause == JobCause::Completed {
                    (RequestState::Completed, EndReason::Finished)
                } else {
                    (RequestState::Failed, EndReason::JobFailed)
                };
                self.end_live(request, "finish", state, reason, out)
            }
            Command::Tick => {
                self.expire(out);
                self.schedule(out);
                Ok(())
            }
            Command::SetPoolRuntimes { pool, runtimes } => self.set_runtimes(&pool, runtimes, out),
        };
        if reshapes {
            self.candidate_cache.clear();
        }
        if result.is_ok() && reshapes {
            self.wake_all();
        }
        match result {
            Ok(()) if frees_or_reshapes => self.pass_due = true,
            Ok(()) => {}
            Err(error) => {
                self.now = before;
                out.push(Event::Rejected { error });
            }
        }
    }

    // ----- pools -----

    fn register_pool(&mut self, spec: PoolSpec) -> Result<String, CoreError> {
        spec.validate(&self.supply.catalogue)?;
        if self.supply.pool_ids.contains_key(&spec.id) {
            return Err(CoreError::DuplicatePool { pool: spec.id });
        }
        let id = spec.id.clone();
        let (_, models) = self.supply.add_pool(spec);
        self.supply.rebuild(models);
        self.fleet_epoch += 1;
        self.resolve_subsidies();
        Ok(id)
    }

    fn set_subsidies(
        &mut self,
        tenant: String,
        terms: Vec<Subsidy>,
        out: &mut Vec<Event>,
    ) -> Result<(), CoreError> {
        Discount::validate(&tenant, &terms)?;
        if terms.is_empty() {
            self.subsidies.remove(&tenant);
        } else {
            let groups = self.group_pools();
            let discount = Discount::resolve(terms, groups.into_iter());
            self.subsidies.insert(tenant.clone(), discount);
        }
        if let Some(&t) = self.tenant_ids.get(&tenant) {
            self.wake_tenant_requests(t);
        }
        out.push(Event::SubsidiesSet { tenant });
        Ok(())
    }

    /// The vouchers set for a tenant by [`Command::SetSubsidies`].
    pub fn subsidies(&self, tenant: &str) -> &[Subsidy] {
        self.subsidies.get(tenant).map_or(&[], |d| &d.terms)
    }

    /// The pool of each node group, in group order.
    fn group_pools(&self) -> Vec<&PoolSpec> {
        let supply = &self.supply;
        supply
            .groups
            .iter()
            .map(|g| &supply.pools[g.pool.0 as usize].spec)
            .collect()
    }

    /// Resolves every tenant's subsidies again after the fleet changed.
    fn resolve_subsidies(&mut self) {
        if self.subsidies.is_empty() {
            return;
        }
        let subsidies = std::mem::take(&mut self.subsidies);
        let groups = self.group_pools();
        let resolved = subsidies
            .into_iter()
            .map(|(t, d)| (t, Discount::resolve(d.terms, groups.iter().copied())))
            .collect();
        self.subsidies = resolved;
    }

    fn pool_ix(&self, pool: &str) -> Result<PoolIx, CoreError> {
        self.supply
            .pool_ids
            .get(pool)
            .copied()
            .ok_or_else(|| CoreError::UnknownPool {
                pool: pool.to_string(),
            })
    }

    fn update_pool(&mut self, spec: PoolSpec, out: &mut Vec<Event>) -> Result<(), CoreError> {
        let ix = self.pool_ix(&spec.id)?;
        spec.validate(&self.supply.catalogue)?;
        let pool = &self.supply.pools[ix.0 as usize];
        let bad = |field: String, reason: &str| {
            CoreError::InvalidPool(FleetError::Invalid {
                pool: spec.id.clone(),
                field,
                reason: reason.to_string(),
            })
        };
        if spec.groups.len() != pool.spec.groups.len() {
            return Err(bad(
                "group".into(),
                "the number of node groups cannot change",
            ));
        }
        for (i, (new, old)) in spec.groups.iter().zip(&pool.spec.groups).enumerate() {
            if new.model != old.model {
                return Err(bad(format!("group[{i}].model"), "cannot change"));
            }
            if new.devices_per_node != old.devices_per_node {
                return Err(bad(format!("group[{i}].devices_per_node"), "cannot change"));
            }
            let g = &self.supply.groups[pool.groups.start as usize + i];
            if new.nodes < old.nodes
                && g.nodes.free_per_node()[new.nodes as usize..]
                    .iter()
                    .any(|&f| f != new.devices_per_node)
            {
                return Err(bad(
                    format!("group[{i}].nodes"),
                    "the nodes to remove still hold leases",
                ));
            }
        }
        // Checked: now apply.
        let first = pool.groups.start;
        let mut models = 0u64;
        for (i, new) in spec.groups.iter().enumerate() {
            let g = &mut self.supply.groups[first as usize + i];
            models |= 1 << g.model.0;
            g.price = new.price_fen_per_device_hour;
            let have = g.nodes.nodes();
            if new.nodes > have {
                g.nodes.grow(new.nodes - have);
            } else {
                g.nodes.shrink(have - new.nodes);
            }
        }
        let region = self.supply.regions.intern(&spec.region);
        let zone = self.supply.zones.intern(&spec.data_zone);
        let pool = &mut self.supply.pools[ix.0 as usize];
        pool.region = region;
        pool.zone = zone;
        let id = spec.id.clone();
        pool.spec = spec;
        self.supply.rebuild(models);
        self.fleet_epoch += 1;
        self.resolve_subsidies();
        out.push(Event::PoolUpdated { pool: id });
        Ok(())
    }

    fn set_node_health(
        &mut self,
        pool: String,
        group: u32,
        node: u32,
        healthy: bool,
        out: &mut Vec<Event>,
    ) -> Result<(), CoreError> {
        let ix = self.pool_ix(&pool)?;
        let groups = self.supply.pools[ix.0 as usize].groups.clone();
        let g = groups.start + group;
        if !groups.contains(&g) || node >= self.supply.groups[g as usize].nodes.nodes() {
            return Err(CoreError::UnknownNode { pool, group, node });
        }
        if self.supply.groups[g as usize].nodes.is_down(node) != healthy {
            return Ok(());
        }
        if healthy {
            self.supply.groups[g as usize].nodes.set_up(node);
        } else {
            self.lose_leases(|s| s.group == g && s.node == node, EndReason::NodeLost, out);
            self.supply.groups[g as usize].nodes.set_down(node);
        }
        self.supply.refresh(g);
        out.push(Event::NodeHealthChanged {
            pool,
            group,
            node,
            healthy,
        });
        Ok(())
    }

    /// Ends as lost (or requeues, when they asked to) the leases with a slice `on` a failed
    /// part of the fleet, in id order.
    fn lose_leases(
        &mut self,
        on: impl Fn(&Slice) -> bool,
        reason: EndReason,
        out: &mut Vec<Event>,
    ) {
        let mut lost: Vec<RequestId> = self
            .requests
            .iter()
            .filter(|(_, r)| r.lease.as_ref().is_some_and(|l| l.slices.iter().any(&on)))
            .map(|(&id, _)| id)
            .collect();
        lost.sort_unstable();
        for id in lost {
            self.end_lease(id, RequestState::Lost, reason, out);
        }
    }

    fn set_health(
        &mut self,
        pool: &str,
        to: PoolHealth,
        out: &mut Vec<Event>,
    ) -> Result<(), CoreError> {
        let ix = self.pool_ix(pool)?;
        let from = self.supply.pools[ix.0 as usize].health;
        let allowed = matches!(
            (from, to),
            (PoolHealth::Healthy, PoolHealth::Draining)
                | (PoolHealth::Draining | PoolHealth::Lost, PoolHealth::Healthy)
                | (PoolHealth::Healthy | PoolHealth::Draining, PoolHealth::Lost)
        );
        if !allowed {
            return Err(CoreError::PoolState {
                pool: pool.to_string(),
                health: from.as_str(),
                action: match to {
                    PoolHealth::Healthy => "restore or undrain",
                    PoolHealth::Draining => "drain",
                    PoolHealth::Lost => "lose",
                },
            });
        }
        self.supply.pools[ix.0 as usize].health = to;
        if to == PoolHealth::Lost {
            let groups = self.supply.pools[ix.0 as usize].groups.clone();
            self.lose_leases(|s| groups.contains(&s.group), EndReason::PoolLost, out);
        }
        for g in self.supply.pools[ix.0 as usize].groups.clone() {
            self.supply.refresh(g);
        }
        out.push(Event::PoolHealthChanged {
            pool: pool.to_string(),
            health: to,
        });
        Ok(())
    }

    fn set_runtimes(
        &mut self,
        pool: &str,
        runtimes: Runtimes,
        out: &mut Vec<Event>,
    ) -> Result<(), CoreError> {
        let ix = self.pool_ix(pool)?;
        let p = &mut self.supply.pools[ix.0 as usize];
        if p.runtimes != runtimes {
            p.runtimes = runtimes;
            // Requests that could run nowhere may match now, or no longer.
            self.fleet_epoch += 1;
            out.push(Event::PoolUpdated {
                pool: pool.to_string(),
            });
        }
        Ok(())
    }

    // ----- tenants -----

    fn set_tenant(&mut self, spec: TenantSpec, out: &mut Vec<Event>) -> Result<(), CoreError> {
        let invalid = |field, reason: &str| CoreError::InvalidTenant {
            tenant: spec.name.clone(),
            field,
            reason: reason.to_string(),
        };
        if spec.name.is_empty() {
            return Err(invalid("name", "must not be empty"));
        }
        if spec.weight == 0 {
            return Err(invalid("weight", "must be at least 1"));
        }
        let name = spec.name.clone();
        match self.tenant_ids.get(&spec.name) {
            Some(&t) => self.tenants[t.0 as usize].spec = spec,
            None => {
                let t = TenantIx(self.tenants.len() as u32);
                self.tenant_ids.insert(spec.name.clone(), t);
                self.tenants.push(Tenant {
                    spec,
                    used: 0,
                    borrowed: 0,
                    live_leases: 0,
                    queued: 0,
                    relieved_at: 0,
                });
            }
        }
        out.push(Event::TenantSet { tenant: name });
        Ok(())
    }

    // ----- requests -----

    fn resolve_filter(&self, spec: &RequestSpec) -> Result<Filter, CoreError> {
        let c = &spec.constraints;
        let mut models = 0u64;
        for (i, m) in c.models.iter().enumerate() {
            let ix = self.supply.catalogue.lookup(m).ok_or_else(|| {
                CoreError::field(
                    format!("constraints.models[{i}]"),
                    format!("unknown accelerator model {m:?}"),
                )
            })?;
            models |= 1 << ix.0;
        }
        if models == 0 {
            models = self.supply.all_models();
        }
        let mut regions = Vec::with_capacity(c.regions.len());
        for (i, r) in c.regions.iter().enumerate() {
            regions.push(self.supply.regions.get(r).ok_or_else(|| {
                CoreError::field(
                    format!("constraints.regions[{i}]"),
                    format!("no pool is in region {r:?}"),
                )
            })?);
        }
        regions.sort_unstable();
        regions.dedup();
        let mut pools = Vec::with_capacity(c.pools.len());
        for (i, p) in c.pools.iter().enumerate() {
            let ix = self.supply.pool_ids.get(p).ok_or_else(|| {
                CoreError::field(
                    format!("constraints.pools[{i}]"),
                    format!("unknown pool {p:?}"),
                )
            })?;
            pools.push(ix.0);
        }
        pools.sort_unstable();
        pools.dedup();
        let zone = match &c.data_zone {
            Some(z) => Some(self.supply.zones.get(z).ok_or_else(|| {
                CoreError::field(
                    "constraints.data_zone",
                    format!("no pool is in data zone {z:?}"),
                )
            })?),
            None => None,
        };
        Ok(Filter {
            models,
            regions,
            pools,
            max_rtt_ms: c.max_rtt_ms.unwrap_or(u32::MAX),
            zone,
            max_price: c.max_price_fen_per_device_hour.unwrap_or(u64::MAX),
            runtimes: spec
                .workload
                .as_ref()
                .map_or(Runtimes::NONE, |w| w.runtime().bit()),
        })
    }

    fn validate_shape(shape: &Shape) -> Result<(), CoreError> {
        match *shape {
            Shape::Gang {
                nodes,
                devices_per_node,
            } => {
                if nodes == 0 {
                    return Err(CoreError::field("shape.nodes", "must be at least 1"));
                }
                if devices_per_node == 0 || devices_per_node > crate::fleet::MAX_DEVICES_PER_NODE {
                    return Err(CoreError::field(
                        "shape.devices_per_node",
                        format!("must be 1..={}", crate::fleet::MAX_DEVICES_PER_NODE),
                    ));
                }
            }
            Shape::Elastic {
                tflops,
                min_chunk_tflops,
            } => {
                if tflops == 0 {
                    return Err(CoreError::field("shape.tflops", "must be at least 1"));
                }
                if min_chunk_tflops > tflops {
                    return Err(CoreError::field(
                        "shape.min_chunk_tflops",
                        format!("{min_chunk_tflops} is larger than the amount asked, {tflops}"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Checks a request spec against the tenant, the catalogue, the fleet, the clock and the
    /// tenant's quota, and resolves its constraints.
    fn admit(&self, spec: &RequestSpec) -> Result<(TenantIx, Filter), CoreError> {
        let (tenant, filter) = self.resolve(spec)?;
        let t = &self.tenants[tenant.0 as usize];
        let need = self.supply.min_tflops(&filter, &spec.shape);
        if need > t.limit() {
            return Err(CoreError::ExceedsQuota {
                tenant: spec.tenant.clone(),
                need,
                limit: t.limit(),
            });
        }
        Ok((tenant, filter))
    }

    /// [`Engine::admit`] but for the quota.
    fn resolve(&self, spec: &RequestSpec) -> Result<(TenantIx, Filter), CoreError> {
        let now = self.now;
        let tenant =
            *self
                .tenant_ids
                .get(&spec.tenant)
                .ok_or_else(|| CoreError::UnknownTenant {
                    tenant: spec.tenant.clone(),
                })?;
        Self::validate_shape(&spec.shape)?;
        if spec.duration_ms == 0 || spec.duration_ms > MAX_DURATION_MS {
            return Err(CoreError::field(
                "duration_ms",
                format!("must be 1..={MAX_DURATION_MS}"),
            ));
        }
        let start_after = spec.start_after_ms.unwrap_or(0);
        if let Some(deadline) = spec.deadline_ms {
            let earliest_end = now.max(start_after).saturating_add(spec.duration_ms);
            if deadline < earliest_end {
                return Err(CoreError::field(
                    "deadline_ms",
                    format!(
                        "{deadline} cannot be met: the earliest possible end is {earliest_end}"
                    ),
                ));
            }
        }
        let filter = self.resolve_filter(spec)?;
        Ok((tenant, filter))
    }

    /// Refuses a request that no registered pool could ever hold, even with the whole fleet
    /// free and healthy: a gang larger than every node group, an elastic request beyond all
    /// its pools hold. Submission itself lets such a request wait (pools may register
    /// later); a front end asks this first unless the request says it waits for pools. Also
    /// every check of a submission but the quota ([`CoreError::UnknownTenant`], a field): a
    /// request no pool could hold is refused for that, whatever the tenant's quota.
    pub fn check_satisfiable(&self, spec: &RequestSpec) -> Result<(), CoreError> {
        let (_, filter) = self.resolve(spec)?;
        match self.supply.why_unsatisfiable(&filter, &spec.shape) {
            Some(reason) => Err(CoreError::Unsatisfiable { reason }),
            None => Ok(()),
        }
    }

    /// Where and at what price a request would be placed if it were submitted at `now`,
    /// without submitting it. Changes nothing but the placement index's bookkeeping (and the
    /// clock, which never goes back).
    pub fn quote(&mut self, spec: &RequestSpec, now: Millis) -> Result<Quote, CoreError> {
        // A dry run changes nothing, not even the clock: only commands do, so that replaying
        // the commands gives this engine back.
        let before = self.now;
        self.now = self.now.max(now);
        let quote = self.quote_now(spec);
        self.now = before;
        quote
    }

    fn quote_now(&mut self, spec: &RequestSpec) -> Result<Quote, CoreError> {
        let (tenant, filter) = self.admit(spec)?;
        let policy = spec.policy.unwrap_or(self.config.default_policy);
        let waits = |reason, earliest_start| Quote {
            placement: None,
            reason: Some(reason),
            earliest_start,
        };
        if spec.start_after_ms.is_some_and(|t| t > self.now) {
            return Ok(waits(WaitReason::NotYetStartable, spec.start_after_ms));
        }
        let ahead: u32 = self.capacity_waiting[..=spec.priority.rank()].iter().sum();
        let discount = discount_of(&self.subsidies, &self.tenants, tenant, policy);
        let plan = self
            .supply
            .plan_for(&filter, &spec.shape, policy, None, discount);
        let Some(plan) = plan.filter(|_| ahead == 0) else {
            if !self.supply.matchable(&filter, &spec.shape) {
                return Ok(waits(
                    self.supply.unmatched_reason(&filter, &spec.shape),
                    None,
                ));
            }
            let candidates = self.supply.candidate_groups(&filter, &spec.shape);
            let is = self.supply.group_mask(&candidates);
            let probe = Probe {
                shape: spec.shape,
                start_after: spec.start_after_ms.unwrap_or(0),
            };
            let at = self.earliest_fit(&probe, &candidates, &is);
            return Ok(waits(WaitReason::CapacityBusy, at));
        };
        let (tflops, price) = self.supply.plan_size(&plan, &spec.shape);
        if !self.quota_allows(tenant, tflops) {
            return Ok(waits(WaitReason::Quota, None));
        }
        let mut parts: Vec<QuotePart> = Vec::new();
        let mut add = |g: u32, devices: u64| {
            let group = &self.supply.groups[g as usize];
            let pool = &self.supply.pools[group.pool.0 as usize];
            parts.push(QuotePart {
                pool: pool.spec.id.clone(),
                group: g - pool.groups.start,
                model: self.supply.catalogue.model(group.model).id.clone(),
                devices,
            });
        };
        match (&plan, spec.shape) {
            (
                Plan::Gang { group },
                Shape::Gang {
                    nodes,
                    devices_per_node,
                },
            ) => add(*group, nodes as u64 * devices_per_node as u64),
            (Plan::Elastic { parts }, _) => parts.iter().for_each(|&(g, d)| add(g, d)),
            _ => unreachable!("a plan matches its shape"),
        }
        Ok(Quote {
            placement: Some(QuotePlacement {
                parts,
                tflops,
                price_fen_per_hour: price,
            }),
            reason: None,
            earliest_start: None,
        })
    }

    fn submit(&mut self, spec: RequestSpec, out: &mut Vec<Event>) -> Result<(), CoreError> {
        let now = self.now;
        let (tenant, filter) = self.admit(&spec)?;
        let start_after = spec.start_after_ms.unwrap_or(0);
        let mut h = FxHasher::default();
        filter.hash(&mut h);
        let id = RequestId(self.next_request);
        self.next_request += 1;
        self.requests.insert(
            id,
            Request {
                tenant,
                shape: spec.shape,
                duration: spec.duration_ms,
                priority: spec.priority,
                filter,
                filter_key: h.finish(),
                policy: spec.policy.unwrap_or(self.config.default_policy),
                start_after,
                deadline: spec.deadline_ms,
                requeue: spec.requeue,
                submitted_at: now,
                state: RequestState::Queued,
                in_queue: false,
                queued_in_pass: 0,
                reason: WaitReason::Pending,
                key: 0,
                match_epoch: u64::MAX,
                matchable: false,
                lease: None,
            },
        );
        out.push(Event::Submitted { request: id });
        // Placed at once only if nothing of its class or above waits for capacity; otherwise
        // the next pass decides, in fair-share order.
        let ahead: u32 = self.capacity_waiting[..=spec.priority.rank()].iter().sum();
        if ahead == 0 && matches!(self.try_start(id, None, out), Start::Placed | Start::Gone) {
            return Ok(());
        }
        self.enqueue(id);
        Ok(())
    }

    fn enqueue(&mut self, id: RequestId) {
        self.arrivals.push(id);
        let key = self.key_of(id);
        let now = self.now;
        let r = self.requests.get_mut(&id).expect("request to queue");
        r.in_queue = true;
        r.queued_in_pass = self.passes;
        r.key = key;
        let (class, tenant, reason) = (r.priority, r.tenant, r.reason);
        for at in timed_points(r, now) {
            self.timed.insert((at, id));
        }
        self.refile(id, None, Some(reason));
        self.queue.push(class, tenant, id);
        self.tenants[tenant.0 as usize].queued += 1;
        if Self::waits_for_capacity(reason) {
            self.capacity_waiting[class.rank()] += 1;
        }
    }

    fn waits_for_capacity(reason: WaitReason) -> bool {
        matches!(
            reason,
            WaitReason::Pending | WaitReason::CapacityBusy | WaitReason::BehindReservation
        )
    }

    fn set_reason(&mut self, id: RequestId, reason: WaitReason) {
        let r = self.requests.get_mut(&id).expect("queued request");
        let (was, queued) = (r.reason, r.in_queue);
        set_reason(r, reason, &mut self.capacity_waiting);
        if queued {
            self.refile(id, Some(was), Some(reason));
        }
    }

    /// Takes a request out of the queue's books (the deque entry goes lazily). A request that
    /// was never queued needs nothing.
    fn dequeue(&mut self, id: RequestId) {
        let r = self.requests.get(&id).expect("queued request");
        if !r.in_queue {
            return;
        }
        let reason = r.reason;
        for at in timed_points(r, 0) {
            self.timed.remove(&(at, id));
        }
        self.refile(id, Some(reason), None);
        let r = self.requests.get_mut(&id).expect("queued request");
        r.in_queue = false;
        // The positions of those behind it change: the next tick ranks them again.
        self.pass_due = true;
        let (priority, tenant, waiting) =
            (r.priority, r.tenant, Self::waits_for_capacity(r.reason));
        if waiting {
            self.capacity_waiting[priority.rank()] -= 1;
        }
        self.tenants[tenant.0 as usize].queued -= 1;
        let requests = &self.requests;
        let queued = |q| requests.get(&q).is_some_and(|r: &Request| r.in_queue);
        self.queue.left(priority, tenant, queued);
        if self.queue.wants_compaction() {
            self.queue.compact(queued);
        }
    }

    fn cancel(&mut self, id: RequestId, out: &mut Vec<Event>) -> Result<(), CoreError> {
        let r = self
            .requests
            .get(&id)
            .ok_or(CoreError::UnknownRequest { request: id })?;
        if r.state == RequestState::Queued {
            self.dequeue(id);
            self.requests.remove(&id);
            out.push(Event::Ended {
                request: id,
                state: RequestState::Cancelled,
                reason: EndReason::Cancelled,
            });
            return Ok(());
        }
        self.end_live(
            id,
            "cancel",
            RequestState::Cancelled,
            EndReason::Cancelled,
            out,
        )
    }

    fn started(&mut self, id: RequestId, out: &mut Vec<Event>) -> Result<(), CoreError> {
        let r = self
            .requests
            .get_mut(&id)
            .ok_or(CoreError::UnknownRequest { request: id })?;
        if r.state != RequestState::Placed {
            return Err(CoreError::InvalidTransition {
                request: id,
                state: r.state.as_str(),
                action: "start",
            });
        }
        r.state = RequestState::Running;
        out.push(Event::Started { request: id });
        Ok(())
    }

    /// Ends a live lease on the tenant's or the pool's word.
    fn end_live(
        &mut self,
        id: RequestId,
        action: &'static str,
        state: RequestState,
        reason: EndReason,
        out: &mut Vec<Event>,
    ) -> Result<(), CoreError> {
        let r = self
            .requests
            .get(&id)
            .ok_or(CoreError::UnknownRequest { request: id })?;
        if !r.state.is_live_lease() {
            return Err(CoreError::InvalidTransition {
                request: id,
                state: r.state.as_str(),
                action,
            });
        }
        self.end_lease(id, state, reason, out);
        Ok(())
    }

    /// Frees a live lease. Preempted and lost leases of requests that asked for it go back to
    /// the queue; everything else ends and is forgotten.
    fn end_lease(
        &mut self,
        id: RequestId,
        state: RequestState,
        reason: EndReason,
        out: &mut Vec<Event>,
    ) {
        let r = self.requests.get_mut(&id).expect("live lease");
        let lease = r.lease.take().expect("live lease has a lease");
        let requeue = r.requeue && matches!(state, RequestState::Preempted | RequestState::Lost);
        let (tenant, priority) = (r.tenant, r.priority);
        self.supply.give_back(&lease.slices);
        self.pass_due = true;
        self.wake_groups(
            lease.slices.iter().map(|s| s.group).collect(),
            GroupChange::Freed,
        );
        let used = self.tenants[tenant.0 as usize].used;
        self.wake_tenant(tenant, used, used - lease.tflops);
        let t = &mut self.tenants[tenant.0 as usize];
        t.used -= lease.tflops;
        t.borrowed -= lease.borrowed;
        t.live_leases -= 1;
        self.live_leases -= 1;
        if priority == Priority::Spot {
            self.spot_leases -= 1;
        }
        if lease.borrowed > 0 {
            self.borrowing_leases -= 1;
        }
        let preemptible = self.preemptible.remove(&id);
        self.ends.remove(&(lease.end, id));
        self.lease_index
            .as_mut()
            .expect("built at every command")
            .count(&self.supply, id, priority, &lease, preemptible, false);
        if requeue {
            let r = self.requests.get_mut(&id).expect("live lease");
            r.state = RequestState::Queued;
            r.reason = WaitReason::Pending;
            self.enqueue(id);
            out.push(Event::Requeued {
                request: id,
                reason,
            });
        } else {
            self.requests.remove(&id);
            out.push(Event::Ended {
                request: id,
                state,
                reason,
            });
        }
    }

    fn expire(&mut self, out: &mut Vec<Event>) {
        while let Some(&(t, id)) = self.ends.first() {
            if t > self.now {
                break;
            }
            // A capacity lease that runs its course is done; a job still running at the end
            // of its time did not finish: it fails, timed out.
            let runs_a_job = self.requests[&id].filter.runtimes != Runtimes::NONE;
            let state = if runs_a_job {
                RequestState::Failed
            } else {
                RequestState::Completed
            };
            self.end_lease(id, state, EndReason::Expired, out);
        }
    }

    // ----- scheduling -----

    fn quota_allows(&self, tenant: TenantIx, tflops: Tflops) -> bool {
        quota_allows(&self.tenants[tenant.0 as usize], tflops)
    }

    fn refresh_matchable(&mut self, id: RequestId) -> bool {
        let epoch = self.fleet_epoch;
        let r = &self.requests[&id];
        if r.match_epoch == epoch {
            return r.matchable;
        }
        let m = self.supply.matchable(&r.filter, &r.shape);
        let r = self.requests.get_mut(&id).expect("queued request");
        r.matchable = m;
        r.match_epoch = epoch;
        m
    }

    /// Tries to place one queued request now. `pass` remembers shapes that found no capacity
    /// in this pass. Sets the wait reason when it stays queued.
    fn try_start(
        &mut self,
        id: RequestId,
        mut pass: Option<&mut PassState>,
        out: &mut Vec<Event>,
    ) -> Start {
        let now = self.now;
        // Every check before planning reads the request once: a pass over a long queue makes
        // them for each waiting request, and most stop here.
        let r = &self.requests[&id];
        if let Some(deadline) = r.deadline
            && now.max(r.start_after).saturating_add(r.duration) > deadline
        {
            self.dequeue(id);
            self.requests.remove(&id);
            out.push(Event::Ended {
                request: id,
                state: RequestState::Failed,
                reason: EndReason::DeadlineMissed,
            });
            return Start::Gone;
        }
        let memo = (r.filter_key, r.shape, r.policy);
        let early = if r.start_after > now {
            Some(WaitReason::NotYetStartable)
        } else if !quota_allows(
            &self.tenants[r.tenant.0 as usize],
            self.supply.min_tflops(&r.filter, &r.shape),
        ) {
            Some(WaitReason::Quota)
        } else {
            None
        };
        if let Some(reason) = early {
            self.set_reason(id, reason);
            return Start::Waits;
        }
        // A shape that found no capacity in this slice finds none now: capacity only came
        // free since if a preemption ended leases, which forgets what failed.
        let known_full = pass.as_ref().is_some_and(|p| p.failed.contains(&memo));
        let r = &self.requests[&id];
        let tenant = r.tenant;
        let discount = discount_of(&self.subsidies, &self.tenants, tenant, r.policy);
        let plan = if known_full {
            None
        } else {
            self.supply
                .plan_for(&r.filter, &r.shape, r.policy, None, discount)
        };
        let Some(mut plan) = plan else {
            if !self.refresh_matchable(id) {
                let r = &self.requests[&id];
                let reason = self.supply.unmatched_reason(&r.filter, &r.shape);
                self.set_reason(id, reason);
                return Start::Waits;
            }
            if let Some(p) = pass.as_mut() {
                match self.try_preempt(id, &mut p.preemption_budget, out) {
                    Preempted::Placed => {
                        p.failed.clear();
                        return Start::Placed;
                    }
                    Preempted::Freed(WaitReason::Quota) => {
                        // Capacity came free, but the plan's size is beyond the quota.
                        p.failed.clear();
                        self.set_reason(id, WaitReason::Quota);
                        return Start::Waits;
                    }
                    Preempted::Freed(_) => p.failed.clear(),
                    Preempted::Nothing => {
                        p.failed.insert(memo);
                    }
                }
                if self.reservation.is_none() {
                    self.reservation = Some(self.reserve(id));
                }
            }
            self.set_reason(id, WaitReason::CapacityBusy);
            return Start::Waits;
        };
        let mut size = self.supply.plan_size(&plan, &r.shape);
        if !self.quota_allows(tenant, size.0) {
            self.set_reason(id, WaitReason::Quota);
            return Start::Waits;
        }
        if let Some(res) = &self.reservation {
            let ends_in_time = res
                .at
                .is_some_and(|at| now.saturating_add(r.duration) <= at);
            if res.request != id && !ends_in_time && plan_touches(&plan, &res.groups) {
                let discount = discount_of(&self.subsidies, &self.tenants, tenant, r.policy);
                let avoid = Some(&res.groups[..]);
                let other = self
                    .supply
                    .plan_for(&r.filter, &r.shape, r.policy, avoid, discount);
                match other.map(|p| (self.supply.plan_size(&p, &r.shape), p)) {
                    Some((s, p)) if self.quota_allows(tenant, s.0) => (size, plan) = (s, p),
                    _ => {
                        self.set_reason(id, WaitReason::BehindReservation);
                        return Start::Waits;
                    }
                }
            }
        }
        self.dequeue(id);
        self.place(id, &plan, size, out);
        Start::Placed
    }

    /// Commits a plan for a request that has left the queue.
    fn place(
        &mut self,
        id: RequestId,
        plan: &Plan,
        (tflops, price): (Tflops, u64),
        out: &mut Vec<Event>,
    ) {
        let now = self.now;
        let r = self.requests.get_mut(&id).expect("request to place");
        let mut slices = Vec::new();
        self.supply.commit(plan, &r.shape, &mut slices);
        let groups: Vec<u32> = slices.iter().map(|s| s.group).collect();
        let tenant = r.tenant;
        let t = &mut self.tenants[r.tenant.0 as usize];
        let used_before = t.used;
        let over_before = t.used.saturating_sub(t.spec.quota_tflops);
        t.used += tflops;
        let borrowed = t.used.saturating_sub(t.spec.quota_tflops) - over_before;
        t.borrowed += borrowed;
        t.live_leases += 1;
        let end = now.saturating_add(r.duration);
        r.lease = Some(Lease {
            slices,
            start: now,
            end,
            tflops,
            price_fen_per_hour: price,
            borrowed,
        });
        r.state = RequestState::Placed;
        self.live_leases += 1;
        if r.priority == Priority::Spot {
            self.spot_leases += 1;
        }
        if borrowed > 0 {
            self.borrowing_leases += 1;
        }
        let preemptible = r.priority == Priority::Spot || borrowed > 0;
        if preemptible {
            self.preemptible.insert(id);
        }
        self.ends.insert((end, id));
        let r = &self.requests[&id];
        self.lease_index
            .as_mut()
            .expect("built at every command")
            .count(
                &self.supply,
                id,
                r.priority,
                r.lease.as_ref().expect("just placed"),
                preemptible,
                true,
            );
        // What others' tries read changed: capacity was taken, a lease others may preempt
        // was placed, the tenant's usage grew.
        let change = if preemptible {
            GroupChange::TakenByPreemptible
        } else {
            GroupChange::Taken
        };
        self.wake_groups(groups, change);
        self.wake_tenant(tenant, used_before, used_before + tflops);
        out.push(Event::Placed { request: id });
    }

    /// Counters kept for speed, for audits: live leases, requests waiting for capacity by
    /// class, spot leases, and leases on borrowed capacity.
    pub(crate) fn counters(&self) -> (usize, [u32; 3], u32, u32) {
        (
            self.live_leases,
            self.capacity_waiting,
            self.spot_leases,
            self.borrowing_leases,
        )
    }

    /// The live leases a preemption may end, for audits.
    pub(crate) fn preemptible(&self) -> &BTreeSet<RequestId> {
        &self.preemptible
    }

    /// The groups a waiting request could use ([`Supply::candidate_groups`]). What its filter
    /// admits is kept until the fleet changes: a reservation and a victim search each need
    /// it, and finding it reads every group.
    pub(crate) fn candidates_of(&mut self, id: RequestId) -> Vec<u32> {
        let r = &self.requests[&id];
        // Filters are told apart by their 64-bit key, as the slice's memo of what did not fit
        // and the queue's shape keys tell them (the audit checks that no two waiting requests
        // share a key with different filters): comparing the filters themselves here read
        // each request's lists at every search and reservation.
        let cached = self.candidate_cache.get(&r.filter_key);
        let admitted = match cached {
            Some((_, groups)) => groups,
            None => {
                if self.candidate_cache.len() >= CANDIDATE_CACHE {
                    self.candidate_cache.clear();
                }
                let groups = self.supply.admitted_groups(&r.filter);
                let entry = (r.filter.clone(), groups);
                &self
                    .candidate_cache
                    .entry(r.filter_key)
                    .insert_entry(entry)
                    .into_mut()
                    .1
            }
        };
        admitted
            .iter()
            .copied()
            .filter(|&g| self.supply.could_hold(g, &r.shape))
            .collect()
    }

    /// A filter whose groups kept for reservations and searches are no longer what it admits,
    /// if any: for audits.
    pub(crate) fn candidate_cache_fault(&self) -> Option<String> {
        let kept = self.candidate_cache.values().find_map(|(filter, groups)| {
            let now = self.supply.admitted_groups(filter);
            (now != *groups).then(|| format!("a filter kept groups {groups:?}, admits {now:?}"))
        });
        kept.or_else(|| {
            self.requests.iter().find_map(|(id, r)| {
                let (filter, _) = self.candidate_cache.get(&r.filter_key)?;
                (*filter != r.filter)
                    .then(|| format!("request {id}'s filter has the key of another filter kept"))
            })
        })
    }

    /// Where the fit bounds kept differ from bounds made afresh, if anywhere: for audits.
    pub(crate) fn fit_fault(&self) -> Option<String> {
        self.fit.fault(&self.supply)
    }

    /// What is wrong with the live leases by node group, if they are built: for audits.
    pub(crate) fn lease_index_fault(&self) -> Option<String> {
        let index = self.lease_index.as_ref()?;
        let expect = LeaseIndex::of(self);
        index
            .victims
            .fault(&expect.victims)
            .or_else(|| index.ends.fault(&expect.ends))
    }

    /// The preemptible leases by node group.
    pub(crate) fn victims(&self) -> &VictimIndex {
        &self
            .lease_index
            .as_ref()
            .expect("built at every command")
            .victims
    }

    /// The live leases by node group and end time, if they are built.
    pub(crate) fn lease_ends(&self) -> Option<&EndsByGroup> {
        self.lease_index.as_ref().map(|index| &index.ends)
    }

    /// Lease end times waiting to expire, for audits.
    pub(crate) fn pending_ends(&self) -> impl Iterator<Item = (Millis, RequestId)> + '_ {
        self.ends.iter().copied()
    }

    // ----- digest -----

    /// A stable digest of the whole state: equal digests mean equal engines.
    pub fn digest(&self) -> u64 {
        let mut h = Fnv64::default();
        self.now.hash(&mut h);
        self.next_request.hash(&mut h);
        self.tenants.hash(&mut h);
        for p in &self.supply.pools {
            (&p.spec, p.health, p.runtimes).hash(&mut h);
        }
        for g in &self.supply.groups {
            (g.price, g.nodes.free_per_node(), g.nodes.down()).hash(&mut h);
        }
        let mut ids: Vec<&RequestId> = self.requests.keys().collect();
        ids.sort_unstable();
        for id in ids {
            (id, &self.requests[id]).hash(&mut h);
        }
        self.subsidies.hash(&mut h);
        self.pass.hash(&mut h);
        h.finish()
    }
}

/// When a queued request's answer changes with the clock alone: its start time, if still to
/// come, and the first instant at which its deadline can no longer be met.
pub(crate) fn timed_points(r: &Request, now: Millis) -> impl Iterator<Item = Millis> {
    let start = (r.start_after > now).then_some(r.start_after);
    let unmeetable = r
        .deadline
        .map(|d| d.saturating_sub(r.duration).saturating_add(1));
    start.into_iter().chain(unmeetable)
}

/// Sets a request's wait reason and keeps the count of requests waiting for capacity.
fn set_reason(r: &mut Request, reason: WaitReason, capacity_waiting: &mut [u32; 3]) {
    let was = Engine::waits_for_capacity(r.reason);
    r.reason = reason;
    if !r.in_queue {
        return;
    }
    let is = Engine::waits_for_capacity(reason);
    let class = r.priority.rank();
    if was && !is {
        capacity_waiting[class] -= 1;
    } else if is && !was {
        capacity_waiting[class] += 1;
    }
}

/// A tenant's discount when its request's policy ranks by it.
fn discount_of<'a>(
    subsidies: &'a BTreeMap<String, Discount>,
    tenants: &[Tenant],
    tenant: TenantIx,
    policy: Policy,
) -> Option<&'a Discount> {
    if policy != Policy::CheapestAfterSubsidy || subsidies.is_empty() {
        return None;
    }
    subsidies.get(&tenants[tenant.0 as usize].spec.name)
}

/// Whether a tenant may hold `tflops` more.
fn quota_allows(t: &Tenant, tflops: Tflops) -> bool {
    t.used.saturating_add(tflops) <= t.limit()
}

fn plan_touches(plan: &Plan, groups: &[bool]) -> bool {
    match plan {
        Plan::Gang { group } => groups[*group as usize],
        Plan::Elastic { parts } => parts.iter().any(|&(g, _)| groups[g as usize]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::PoolKind::{External, LocalCentre};
    use crate::request::Runtime;
    use crate::subsidy::SubsidyPools;
    use crate::testkit::*;

    fn pool_of(e: &Engine, id: RequestId) -> String {
        e.request(id).unwrap().lease.unwrap().parts[0].pool.clone()
    }

    fn three_pools() -> Engine {
        engine(vec![
            pool("local", LocalCentre, 1, &[("h100", 8, 2, 3000)]),
            pool("cheap-far", External, 40, &[("h100", 8, 2, 1500)]),
            pool("mid", External, 10, &[("h100", 8, 1, 2000)]),
        ])
    }

    #[test]
    fn cheapest_picks_the_lowest_price() {
        let mut e = three_pools();
        let id = submit(&mut e, gang("a", 1, 8, "h100"), 0);
        assert_eq!(pool_of(&e, id), "cheap-far");
    }

    #[test]
    fn lowest_latency_picks_local_first() {
        let mut e = three_pools();
        let mut spec = gang("a", 1, 8, "h100");
        spec.policy = Some(Policy::LowestLatency);
        let id = submit(&mut e, spec.clone(), 0);
        assert_eq!(pool_of(&e, id), "local");
        let id2 = submit(&mut e, spec.clone(), 0);
        assert_eq!(pool_of(&e, id2), "local");
        let id3 = submit(&mut e, spec, 0);
        assert_eq!(pool_of(&e, id3), "mid", "then the shortest round trip");
    }

    #[test]
    fn best_fit_keeps_whole_groups_free() {
        let mut e = three_pools();
        let mut spec = gang("a", 1, 8, "h100");
        spec.policy = Some(Policy::BestFit);
        let id = submit(&mut e, spec, 0);
        assert_eq!(pool_of(&e, id), "mid", "the smallest group that fits");
        // A 2-node gang still finds a whole group.
        let id2 = submit(&mut e, gang("a", 2, 8, "h100"), 0);
        assert!(e.request(id2).unwrap().lease.is_some());
    }

    fn local_half_off() -> Vec<Subsidy> {
        vec![Subsidy {
            rate_bp: 6_000,
            pools: SubsidyPools::Kinds([LocalCentre].into()),
        }]
    }

    #[test]
    fn cheapest_after_subsidy_ranks_by_what_the_tenant_pays() {
        let mut e = three_pools();
        let mut spec = gang("a", 1, 8, "h100");
        spec.policy = Some(Policy::CheapestAfterSubsidy);
        // No vouchers: the same as cheapest.
        let id = submit(&mut e, spec.clone(), 0);
        assert_eq!(pool_of(&e, id), "cheap-far");
        // 60% off local: 3000 -> 1200 fen, below the 1500 of cheap-far.
        let set = Command::SetSubsidies {
            tenant: "a".into(),
            subsidies: local_half_off(),
        };
        let events = ok(e.apply(set, 1));
        assert_eq!(events, vec![Event::SubsidiesSet { tenant: "a".into() }]);
        assert_eq!(e.subsidies("a"), &local_half_off()[..]);
        let id2 = submit(&mut e, spec.clone(), 1);
        assert_eq!(pool_of(&e, id2), "local");
        // Plain cheapest ignores vouchers.
        let id3 = submit(&mut e, gang("a", 1, 8, "h100"), 1);
        assert_eq!(pool_of(&e, id3), "cheap-far");
        // The second local node, then what is left: mid at its list price.
        let id4 = submit(&mut e, spec.clone(), 1);
        assert_eq!(pool_of(&e, id4), "local");
        let id5 = submit(&mut e, spec.clone(), 1);
        assert_eq!(pool_of(&e, id5), "mid");
        let id6 = submit(&mut e, spec.clone(), 1);
        assert_eq!(e.request(id6).unwrap().state, RequestState::Queued);
        // Removing the vouchers: back to list prices for new placements.
        let clear = Command::SetSubsidies {
            tenant: "a".into(),
            subsidies: vec![],
        };
        ok(e.apply(clear, 2));
        assert!(e.subsidies("a").is_empty());
        assert!(e.audit().is_ok());
    }

    #[test]
    fn an_elastic_request_fills_the_subsidised_pools_first() {
        let mut e = three_pools();
        ok(e.apply(
            Command::SetSubsidies {
                tenant: "a".into(),
                subsidies: local_half_off(),
            },
            0,
        ));
        let mut spec = elastic("a", 989 * 20, 989);
        spec.policy = Some(Policy::CheapestAfterSubsidy);
        let id = submit(&mut e, spec.clone(), 0);
        let parts = e.request(id).unwrap().lease.unwrap().parts;
        let devices = |pool: &str| -> u64 {
            parts
                .iter()
                .filter(|p| p.pool == pool)
                .map(|p| p.devices as u64)
                .sum()
        };
        // 16 local devices first (1200), then cheap-far (1500) for the other 4.
        assert_eq!((devices("local"), devices("cheap-far")), (16, 4));
        spec.policy = Some(Policy::Cheapest);
        let mut e = three_pools();
        let id = submit(&mut e, spec, 0);
        let parts = e.request(id).unwrap().lease.unwrap().parts;
        assert!(parts.iter().all(|p| p.pool != "local"), "{parts:?}");
    }

    #[test]
    fn a_lease_by_node_group_names_what_the_request_view_names() {
        let mut e = three_pools();
        let id = submit(&mut e, elastic("a", 989 * 20, 989), 0);
        let view = e.request(id).unwrap().lease.unwrap();
        let groups = e.lease_groups(id).expect("placed");
        assert_eq!(
            (groups.end, groups.price_fen_per_hour),
            (view.end, view.price_fen_per_hour)
        );
        let named: Vec<(String, u32, String, u32, u16)> = groups
            .slices
            .iter()
            .map(|s| {
                let (pool, group, model) = e.group_place(s.group).expect("a group of the fleet");
                (pool.into(), group, model.into(), s.node, s.devices)
            })
            .collect();
        let viewed: Vec<_> = view
            .parts
            .iter()
            .map(|p| (p.pool.clone(), p.group, p.model.clone(), p.node, p.devices))
            .collect();
        assert_eq!(named, viewed);
        assert!(e.group_place(u32::MAX).is_none());
        assert!(e.lease_groups(RequestId(999)).is_none());
    }

    #[test]
    fn subsidies_cover_pools_registered_after_them_and_reject_bad_rates() {
        let mut e = engine(vec![pool("far", External, 40, &[("h100", 8, 1, 1000)])]);
        ok(e.apply(
            Command::SetSubsidies {
                tenant: "a".into(),
                subsidies: local_half_off(),
            },
            0,
        ));
        let digest = e.digest();
        let bad = Command::SetSubsidies {
            tenant: "a".into(),
            subsidies: vec![Subsidy {
                rate_bp: 0,
                pools: SubsidyPools::All,
            }],
        };
        let events = e.apply(bad, 0);
        assert!(
            matches!(&events[..], [Event::Rejected { error: CoreError::InvalidSubsidy { field, .. } }] if field == "subsidy[0].rate_bp"),
            "{events:?}"
        );
        assert_eq!(e.digest(), digest, "a rejected command changes nothing");
        ok(e.apply(
            Command::RegisterPool(pool("home", LocalCentre, 1, &[("h100", 8, 1, 2000)])),
            1,
        ));
        let mut spec = gang("a", 1, 8, "h100");
        spec.policy = Some(Policy::CheapestAfterSubsidy);
        let id = submit(&mut e, spec, 2);
        assert_eq!(pool_of(&e, id), "home", "2000 x 40% = 800 < 1000");
    }

    #[test]
    fn a_workload_goes_only_where_an_agent_runs_its_kind() {
        let mut e = engine(vec![
            pool("cheap", External, 5, &[("h100", 8, 2, 500)]),
            pool("dear", External, 5, &[("h100", 8, 2, 2000)]),
        ]);
        let command = |image: Option<&str>| {
            let mut spec = gang("a", 1, 8, "h100");
            spec.workload = Some(Box::new(crate::request::Workload {
                argv: vec!["python3".into(), "train.py".into()],
                image: image.map(Into::into),
                ..Default::default()
            }));
            spec
        };
        // No agent runs anything yet: it waits, and says why.
        let id = submit(&mut e, command(None), 0);
        ok(e.apply(Command::Tick, 1));
        assert_eq!(
            e.explain(id).unwrap().reason,
            WaitReason::WorkloadUnsupported
        );
        let set = |pool: &str, runtimes| Command::SetPoolRuntimes {
            pool: pool.into(),
            runtimes,
        };
        let digest = e.digest();
        ok(e.apply(set("dear", Runtimes::of([Runtime::Command])), 2));
        assert_ne!(e.digest(), digest, "runtimes are part of the state");
        ok(e.apply(Command::Tick, 3));
        assert_eq!(pool_of(&e, id), "dear", "the cheap pool runs nothing");
        // A capacity lease still goes to the cheapest pool; an image needs containers.
        let lease = submit(&mut e, gang("a", 1, 8, "h100"), 4);
        assert_eq!(pool_of(&e, lease), "cheap");
        let image = submit(&mut e, command(Some("pytorch:2.5")), 5);
        ok(e.apply(Command::Tick, 6));
        assert_eq!(
            e.explain(image).unwrap().reason,
            WaitReason::WorkloadUnsupported
        );
        // A constraint no pool meets is still no_matching_pool, workload or not.
        let mut far = command(None);
        far.constraints.max_rtt_ms = Some(1);
        let far = submit(&mut e, far, 7);
        ok(e.apply(Command::Tick, 8));
        assert_eq!(e.explain(far).unwrap().reason, WaitReason::NoMatchingPool);
        let unknown = e.apply(set("nowhere", Runtimes::NONE), 9);
        assert!(
            matches!(&unknown[..], [Event::Rejected { .. }]),
            "{unknown:?}"
        );
    }

    #[test]
    fn a_request_no_pool_could_ever_hold_is_named_as_such() {
        // 2 nodes of 8 h100 (989 TFLOPS each) and 4 of 8 a800 (312): 25.808P in all.
        let mut e = engine(vec![
            pool("p", External, 5, &[("h100", 8, 2, 500)]),
            pool("q", External, 5, &[("a800", 8, 4, 300)]),
        ]);
        let why = |e: &Engine, spec: RequestSpec| match e.check_satisfiable(&spec) {
            Err(CoreError::Unsatisfiable { reason }) => reason,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            why(&e, gang("a", 1_000_000, 8, "h100")),
            "no node group of h100 has 1000000 nodes of 8 devices; the largest has 2; \
             the fleet holds 25.808P"
        );
        assert_eq!(
            why(&e, gang("a", 1, 16, "a800")),
            "no node of a800 has 16 devices; the largest have 8; the fleet holds 25.808P"
        );
        assert_eq!(
            why(&e, elastic("a", 30_000, 0)),
            "30P asked, but the fleet holds 25.808P"
        );
        let mut a800 = elastic("a", 12_000, 0);
        a800.constraints.models = vec!["a800".into()];
        assert_eq!(
            why(&e, a800),
            "12P asked, but the pools it may use hold 9.984P in all; the fleet holds 25.808P"
        );
        let mut far = gang("a", 1, 8, "h100");
        far.constraints.max_rtt_ms = Some(1);
        assert!(why(&e, far).starts_with("no node group of h100 meets its constraints"));
        // A job no pool runs yet is not impossible: an agent that runs it may connect.
        let mut job = gang("a", 1, 8, "h100");
        job.workload = Some(Box::new(crate::request::Workload {
            argv: vec!["train".into()],
            ..crate::request::Workload::default()
        }));
        assert_eq!(e.check_satisfiable(&job), Ok(()));
        // Draining or losing a pool does not make a request impossible: it comes back.
        ok(e.apply(Command::DrainPool { pool: "p".into() }, 1));
        assert_eq!(e.check_satisfiable(&gang("a", 2, 8, "h100")), Ok(()));
        // Other faults are the submission's own, named as it names them.
        assert!(matches!(
            e.check_satisfiable(&gang("nobody", 1, 8, "h100")),
            Err(CoreError::UnknownTenant { .. })
        ));
        // The engine still lets such a request wait: the front end decides.
        let id = submit(&mut e, gang("a", 3, 8, "h100"), 2);
        ok(e.apply(Command::Tick, 3));
        assert_eq!(e.explain(id).unwrap().reason, WaitReason::NoMatchingPool);
    }

    #[test]
    fn a_job_outcome_decides_completed_or_failed() {
        let mut e = engine(vec![pool("p", External, 5, &[("h100", 8, 2, 500)])]);
        let done = submit(&mut e, gang("a", 1, 8, "h100"), 0);
        let failed = submit(&mut e, gang("a", 1, 8, "h100"), 0);
        let outcome = |cause| JobOutcome {
            exit_code: Some(3),
            ..JobOutcome::bare(cause)
        };
        ok(e.apply(
            Command::LeaseFinished {
                request: done,
                outcome: JobOutcome::bare(JobCause::Completed),
            },
            1,
        ));
        let ev = e.apply(
            Command::LeaseFinished {
                request: failed,
                outcome: outcome(JobCause::TimedOut),
            },
            2,
        );
        assert!(ev.contains(&Event::Ended {
            request: failed,
            state: RequestState::Failed,
            reason: EndReason::JobFailed,
        }));
        // At the end of its time a capacity lease is done, a job still running timed out.
        ok(e.apply(
            Command::SetPoolRuntimes {
                pool: "p".into(),
                runtimes: Runtimes::of([Runtime::Command]),
            },
            3,
        ));
        let lease = submit(&mut e, gang("a", 1, 8, "h100"), 3);
        let mut spec = gang("a", 1, 8, "h100");
        spec.workload = Some(Box::new(crate::request::Workload {
            argv: vec!["train".into()],
            ..Default::default()
        }));
        let job = submit(&mut e, spec, 3);
        let ev = e.apply(Command::Tick, 3 + 3_600_000);
        for (request, state) in [
            (lease, RequestState::Completed),
            (job, RequestState::Failed),
        ] {
            assert!(
                ev.contains(&Event::Ended {
                    request,
                    state,
                    reason: EndReason::Expired,
                }),
                "{ev:?}"
            );
        }
    }

    #[test]
    fn a_gang_is_placed_whole_in_one_group_or_waits() {
        let mut e = engine(vec![
            pool("p1", External, 5, &[("h100", 8, 2, 1000)]),
            pool("p2", External, 5, &[("h100", 8, 2, 1000)]),
        ]);
        // 3 nodes exist in no single group: never matchable.
        let id = submit(&mut e, gang("a", 3, 8, "h100"), 0);
        assert_eq!(e.request(id).unwrap().state, RequestState::Queued);
        ok(e.apply(Command::Tick, 1));
        assert_eq!(e.explain(id).unwrap().reason, WaitReason::NoMatchingPool);
        let id2 = submit(&mut e, gang("a", 2, 8, "h100"), 2);
        let parts = e.request(id2).unwrap().lease.unwrap().parts;
        assert_eq!(parts.len(), 2);
        assert!(
            parts
                .iter()
                .all(|p| p.pool == parts[0].pool && p.devices == 8)
        );
    }

    #[test]
    fn elastic_splits_across_pools_in_chunks() {
        let mut e = engine(vec![
            pool("p1", External, 5, &[("h100", 8, 1, 1000)]),
            pool("p2", External, 9, &[("a800", 8, 1, 200)]),
        ]);
        // 8 x 312 = 2496 on the cheaper-per-TFLOPS a800 (0.64 fen against 1.01), the rest on h100.
        let id = submit(&mut e, elastic("a", 5000, 900), 0);
        let lease = e.request(id).unwrap().lease.unwrap();
        let on = |p: &str| {
            lease
                .parts
                .iter()
                .filter(|x| x.pool == p)
                .map(|x| x.devices as u64)
                .sum::<u64>()
        };
        assert_eq!(on("p2"), 8);
        assert_eq!(on("p1"), (5000 - 2496u64).div_ceil(989));
        assert!(lease.tflops >= 5000);
    }

    #[test]
    fn elastic_refuses_chunks_below_the_minimum() {
        let mut e = engine(vec![pool("p1", External, 5, &[("h100", 8, 1, 1000)])]);
        let first = submit(&mut e, elastic("a", 989 * 7, 1), 0);
        assert!(e.request(first).unwrap().lease.is_some());
        // One device (989) is left: below the 2000 chunk, so the request waits.
        let id = submit(&mut e, elastic("a", 2000, 2000), 0);
        assert_eq!(e.request(id).unwrap().state, RequestState::Queued);
    }

    #[test]
    fn priority_classes_go_first_and_fifo_within_a_tenant() {
        let mut e = engine(vec![pool("p", External, 5, &[("h100", 8, 1, 1000)])]);
        let hold = submit(&mut e, gang("a", 1, 8, "h100"), 0);
        let std1 = submit(&mut e, gang("a", 1, 8, "h100"), 1);
        let std2 = submit(&mut e, gang("a", 1, 8, "h100"), 2);
        let mut crit = gang("a", 1, 8, "h100");
        crit.priority = Priority::Critical;
        let crit = submit(&mut e, crit, 3);
        ok(e.apply(Command::Release { request: hold }, 4));
        let ev = ok(e.apply(Command::Tick, 5));
        assert!(placed(&ev, crit));
        assert!(!placed(&ev, std1) && !placed(&ev, std2));
        ok(e.apply(Command::Release { request: crit }, 6));
        let ev = ok(e.apply(Command::Tick, 7));
        assert!(placed(&ev, std1), "FIFO inside the tenant");
        assert_eq!(e.explain(std2).unwrap().position, 1, "the one left waiting");
    }

    #[test]
    fn weighted_fair_share_serves_the_smallest_share_first() {
        let mut e = engine(vec![pool("p", External, 5, &[("h100", 1, 4, 1000)])]);
        ok(e.apply(Command::SetTenant(tenant("heavy", 10_000_000, None, 1)), 0));
        ok(e.apply(Command::SetTenant(tenant("light", 10_000_000, None, 3)), 0));
        let h = submit(&mut e, gang("heavy", 1, 1, "h100"), 0);
        let h2 = submit(&mut e, gang("heavy", 1, 1, "h100"), 0);
        assert!(e.request(h).unwrap().lease.is_some() && e.request(h2).unwrap().lease.is_some());
        let h3 = submit(&mut e, gang("heavy", 1, 1, "h100"), 0);
        let h4 = submit(&mut e, gang("heavy", 1, 1, "h100"), 0);
        let l1 = submit(&mut e, gang("light", 1, 1, "h100"), 1);
        let l2 = submit(&mut e, gang("light", 1, 1, "h100"), 1);
        let l3 = submit(&mut e, gang("light", 1, 1, "h100"), 1);
        // h3 and h4 were placed at once (nothing waited). Fill: now 4/4 busy.
        assert!(e.request(h3).unwrap().lease.is_some() && e.request(h4).unwrap().lease.is_some());
        for id in [h, h2, h3] {
            ok(e.apply(Command::Release { request: id }, 2));
        }
        let ev = ok(e.apply(Command::Tick, 3));
        // heavy holds 1 device at weight 1, light 0: light gets all three freed devices even
        // after it holds 2 (2/3 < 1).
        assert!(placed(&ev, l1) && placed(&ev, l2) && placed(&ev, l3));
    }

    #[test]
    fn backfill_runs_short_jobs_that_end_before_the_reserved_head() {
        let mut e = engine(vec![pool("p", External, 5, &[("h100", 8, 2, 1000)])]);
        let long = submit(&mut e, gang("a", 1, 8, "h100"), 0); // ends at 3_600_000
        let mut half = gang("a", 1, 4, "h100");
        half.duration_ms = 10_000_000;
        let half = submit(&mut e, half, 0);
        let head = submit(&mut e, gang("a", 2, 8, "h100"), 1); // needs both nodes
        let mut short = gang("a", 1, 2, "h100");
        short.duration_ms = 1_000_000;
        let short = submit(&mut e, short, 2);
        let mut too_long = gang("a", 1, 2, "h100");
        too_long.duration_ms = 20_000_000;
        let too_long = submit(&mut e, too_long, 2);
        let ev = ok(e.apply(Command::Tick, 3));
        assert!(!placed(&ev, head));
        assert!(placed(&ev, short), "ends before the head's reserved start");
        assert!(!placed(&ev, too_long));
        let w = e.explain(head).unwrap();
        assert_eq!(w.reason, WaitReason::CapacityBusy);
        assert_eq!(
            w.earliest_start,
            Some(10_000_000),
            "when both nodes are free"
        );
        assert_eq!(
            e.explain(too_long).unwrap().reason,
            WaitReason::BehindReservation
        );
        let _ = (long, half);
    }

    #[test]
    fn a_tick_with_only_new_arrivals_tries_only_them() {
        let mut e = engine(vec![pool("p", External, 5, &[("h100", 8, 2, 1000)])]);
        let hold = submit(&mut e, gang("a", 1, 4, "h100"), 0);
        let big = submit(&mut e, gang("a", 2, 8, "h100"), 0); // blocked by `hold`
        ok(e.apply(Command::Tick, 1));
        assert_eq!(e.explain(big).unwrap().position, 1);
        // A small short request arrives while `big` waits: it is not placed at submission (a
        // request of its class waits for capacity) but the next tick places it by backfill.
        let mut small = gang("a", 1, 4, "h100");
        small.duration_ms = 1000;
        let small = submit(&mut e, small, 2);
        assert_eq!(e.request(small).unwrap().state, RequestState::Queued);
        let ev = ok(e.apply(Command::Tick, 3));
        assert!(placed(&ev, small));
        assert_eq!(
            e.explain(big).unwrap().position,
            1,
            "the waiting request keeps its rank"
        );
        // Its placement changed the queue: the next tick ranks everything again.
        ok(e.apply(Command::Tick, 4));
        assert_eq!(e.explain(big).unwrap().reason, WaitReason::CapacityBusy);
        let _ = hold;
    }

    #[test]
    fn a_lease_ending_tries_only_what_its_capacity_could_serve() {
        let fleet = || {
            engine(vec![pool(
                "p",
                External,
                5,
                &[("h100", 8, 4, 1000), ("a800", 8, 4, 800)],
            )])
        };
        let mut runs = Vec::new();
        for incremental in [true, false] {
            let mut e = fleet();
            e.config.incremental = incremental;
            let mut held = Vec::new();
            for model in ["h100", "a800"] {
                for _ in 0..4 {
                    held.push(submit(&mut e, gang("a", 1, 8, model), 0));
                }
            }
            // Forty requests wait for each model, one shape each.
            for i in 0..80 {
                let model = if i % 2 == 0 { "h100" } else { "a800" };
                submit(&mut e, gang("a", 1, 8, model), 1);
            }
            ok(e.apply(Command::Tick, 2));
            let before = e.pass_counts();
            // An a800 node comes free: one waiting a800 request takes it.
            ok(e.apply(Command::Release { request: held[4] }, 3));
            let ev = ok(e.apply(Command::Tick, 4));
            assert_eq!(
                ev.iter()
                    .filter(|e| matches!(e, Event::Placed { .. }))
                    .count(),
                1
            );
            let after = e.pass_counts();
            runs.push((after.tried - before.tried, e.digest()));
            assert_eq!(e.audit(), Ok(()));
        }
        let [(incremental, a), (full, b)] = runs[..] else {
            unreachable!("two runs");
        };
        assert_eq!(a, b, "the same decisions");
        assert_eq!(full, 80, "a full pass tries everything waiting");
        // The reservation's holder (the first waiting), the a800 placed, the next a800 (which
        // finds the capacity gone).
        assert!(incremental <= 3, "an incremental pass tried {incremental}");
    }

    #[test]
    fn a_long_pass_goes_on_in_slices_and_arrivals_wait_for_the_next() {
        let mut e = engine(vec![
            pool("h", External, 5, &[("h100", 8, 1, 1000)]),
            pool("r", External, 5, &[("rtx4090", 8, 2, 100)]),
        ]);
        e.config.pass_slice = 3;
        // Every pass walks the whole queue, so that they go on in slices.
        e.config.incremental = false;
        submit(&mut e, gang("a", 1, 8, "h100"), 0); // fills the h100s
        for _ in 0..4 {
            submit(&mut e, gang("a", 1, 8, "h100"), 0);
        }
        let small = submit(&mut e, gang("a", 1, 8, "rtx4090"), 0); // queued behind them
        ok(e.apply(Command::Tick, 1));
        assert!(e.pass_in_progress(), "three of six entries walked");
        assert_eq!(e.request(small).unwrap().state, RequestState::Queued);
        let late = submit(&mut e, gang("a", 1, 8, "rtx4090"), 2);
        let ev = ok(e.apply(Command::Tick, 3));
        assert!(placed(&ev, small), "the pass went on where it stopped");
        assert!(!e.pass_in_progress());
        assert_eq!(
            e.request(late).unwrap().state,
            RequestState::Queued,
            "a request queued during a pass waits for the next"
        );
        ok(e.apply(Command::Tick, 4)); // a new pass: four h100 gangs, then `late`
        assert_eq!(e.request(late).unwrap().state, RequestState::Queued);
        let ev = ok(e.apply(Command::Tick, 5));
        assert!(placed(&ev, late));
        assert_eq!(e.explain(RequestId(5)).unwrap().position, 4);
        assert_eq!(e.audit(), Ok(()));
    }

    #[test]
    fn a_placement_counts_for_many_entries_in_a_slice() {
        let mut e = engine(vec![
            pool("h", External, 5, &[("h100", 8, 2, 1000)]),
            pool("r", External, 5, &[("rtx4090", 8, 4, 100)]),
        ]);
        e.config.pass_slice = PLACEMENT_WEIGHT;
        submit(&mut e, gang("a", 1, 8, "h100"), 0);
        let big = submit(&mut e, gang("a", 2, 8, "h100"), 0); // waits: the rest queue
        let small: Vec<_> = (0..3)
            .map(|_| submit(&mut e, gang("a", 1, 8, "rtx4090"), 0))
            .collect();
        let mut placed_per_tick = Vec::new();
        for now in 1..=4 {
            let ev = ok(e.apply(Command::Tick, now));
            placed_per_tick.push(small.iter().filter(|&&id| placed(&ev, id)).count());
        }
        assert_eq!(placed_per_tick, [1, 1, 1, 0], "one placement fills a slice");
        assert_eq!(e.request(big).unwrap().state, RequestState::Queued);
        assert_eq!(e.audit(), Ok(()));
    }

    #[test]
    fn standard_work_preempts_spot() {
        let mut e = engine(vec![pool("p", External, 5, &[("h100", 8, 1, 1000)])]);
        let mut spot = gang("a", 1, 8, "h100");
        spot.priority = Priority::Spot;
        spot.requeue = true;
        let spot = submit(&mut e, spot, 0);
        let std = submit(&mut e, gang("a", 1, 8, "h100"), 1);
        let ev = ok(e.apply(Command::Tick, 2));
        assert!(placed(&ev, std));
        assert!(ev.contains(&Event::Requeued {
            request: spot,
            reason: EndReason::Preempted
        }));
        assert_eq!(e.request(spot).unwrap().state, RequestState::Queued);
    }

    #[test]
    fn no_victim_search_where_no_lease_could_be_a_victim() {
        let mut e = engine(vec![pool(
            "p",
            External,
            5,
            &[("h100", 8, 1, 1000), ("a800", 8, 1, 800)],
        )]);
        // The a800 node is full of standard work; a spot lease holds the h100 node.
        submit(&mut e, gang("a", 1, 8, "a800"), 0);
        let mut spot = gang("a", 1, 8, "h100");
        spot.priority = Priority::Spot;
        let spot = submit(&mut e, spot, 0);
        let waiting = submit(&mut e, gang("a", 1, 8, "a800"), 1);
        let before = e.pass_counts().searches;
        for now in 2..5 {
            ok(e.apply(Command::Tick, now));
        }
        assert_eq!(e.request(waiting).unwrap().state, RequestState::Queued);
        assert_eq!(
            e.pass_counts().searches,
            before,
            "no a800 lease may be preempted: nothing to search"
        );
        // Work that may use the h100 searches, and preempts the spot lease.
        let mut either = gang("a", 1, 8, "a800");
        either.constraints.models = vec!["a800".into(), "h100".into()];
        let either = submit(&mut e, either, 5);
        let ev = ok(e.apply(Command::Tick, 6));
        assert!(placed(&ev, either), "{ev:?}");
        assert_eq!(e.pass_counts().searches, before + 1);
        assert_eq!(
            e.request(spot).map(|r| r.state),
            None,
            "ended, not requeued"
        );
        assert_eq!(e.audit(), Ok(()));
    }

    /// Two groups of one 8-device node, each half standard and half spot work.
    fn half_spot_fleet() -> (Engine, [RequestId; 2]) {
        let mut e = engine(vec![
            pool("p1", External, 5, &[("h100", 8, 1, 1000)]),
            pool("p2", External, 5, &[("h100", 8, 1, 1000)]),
        ]);
        let mut spots = Vec::new();
        for _ in 0..2 {
            submit(&mut e, gang("a", 1, 4, "h100"), 0);
            let mut spot = gang("a", 1, 4, "h100");
            spot.priority = Priority::Spot;
            spot.requeue = true;
            spots.push(submit(&mut e, spot, 0));
        }
        (e, [spots[0], spots[1]])
    }

    #[test]
    fn elastic_work_preempts_only_for_pieces_it_can_use() {
        // 8 devices in one piece: ending both spot leases frees 4 + 4, which it cannot use.
        let (mut e, spots) = half_spot_fleet();
        let whole = submit(&mut e, elastic("a", 8 * 989, 8 * 989), 1);
        for now in 2..5 {
            let ev = ok(e.apply(Command::Tick, now));
            assert!(!placed(&ev, whole));
            assert!(
                !ev.iter().any(|e| matches!(e, Event::Requeued { .. })),
                "{ev:?}"
            );
        }
        for s in spots {
            assert_eq!(e.request(s).unwrap().state, RequestState::Placed);
        }
        // In pieces of 4 devices it can use both: the spot leases go and it is placed.
        let (mut e, spots) = half_spot_fleet();
        let halves = submit(&mut e, elastic("a", 8 * 989, 4 * 989), 1);
        let ev = ok(e.apply(Command::Tick, 2));
        assert!(placed(&ev, halves));
        for s in spots {
            assert_eq!(e.request(s).unwrap().state, RequestState::Queued);
        }
    }

    #[test]
    fn spot_never_preempts_and_standard_never_preempts_standard() {
        let mut e = engine(vec![pool("p", External, 5, &[("h100", 8, 1, 1000)])]);
        let first = submit(&mut e, gang("a", 1, 8, "h100"), 0);
        let second = submit(&mut e, gang("a", 1, 8, "h100"), 1);
        let ev = ok(e.apply(Command::Tick, 2));
        assert!(!placed(&ev, second));
        assert_eq!(e.request(first).unwrap().state, RequestState::Placed);
    }

    #[test]
    fn borrowed_capacity_is_reclaimed_for_a_tenant_within_quota() {
        let mut e = engine(vec![pool("p", External, 5, &[("h100", 1, 4, 1000)])]);
        ok(e.apply(Command::SetTenant(tenant("owner", 2 * 989, Some(0), 1)), 0));
        ok(e.apply(Command::SetTenant(tenant("borrower", 989, None, 1)), 0));
        let b: Vec<RequestId> = (0..4)
            .map(|_| submit(&mut e, gang("borrower", 1, 1, "h100"), 0))
            .collect();
        assert_eq!(e.tenant_usage("borrower").unwrap().borrowed_tflops, 3 * 989);
        let o = submit(&mut e, gang("owner", 1, 1, "h100"), 1);
        let ev = ok(e.apply(Command::Tick, 2));
        assert!(placed(&ev, o));
        // The youngest borrowed lease went.
        assert!(ev.contains(&Event::Ended {
            request: b[3],
            state: RequestState::Preempted,
            reason: EndReason::Preempted
        }));
        assert_eq!(e.tenant_usage("borrower").unwrap().used_tflops, 3 * 989);
    }

    #[test]
    fn quota_and_borrowing_limit_hold() {
        let mut e = engine(vec![pool("p", External, 5, &[("h100", 1, 8, 1000)])]);
        ok(e.apply(Command::SetTenant(tenant("t", 989, Some(989), 1)), 0));
        let a = submit(&mut e, gang("t", 1, 1, "h100"), 0);
        let b = submit(&mut e, gang("t", 1, 1, "h100"), 0);
        let c = submit(&mut e, gang("t", 1, 1, "h100"), 0);
        assert!(e.request(a).unwrap().lease.is_some() && e.request(b).unwrap().lease.is_some());
        assert_eq!(e.explain(c).unwrap().reason, WaitReason::Quota);
        let ev = e.apply(Command::Submit(gang("t", 1, 3, "h100")), 0);
        assert!(matches!(
            ev[0],
            Event::Rejected {
                error: CoreError::ExceedsQuota { .. }
            }
        ));
    }

    #[test]
    fn leases_expire_and_pools_lost_requeue_what_asked() {
        let mut e = engine(vec![
            pool("p1", External, 5, &[("h100", 8, 1, 1000)]),
            pool("p2", External, 5, &[("h100", 8, 1, 2000)]),
        ]);
        let mut keep = gang("a", 1, 8, "h100");
        keep.requeue = true;
        let keep = submit(&mut e, keep, 0);
        let drop = submit(&mut e, gang("a", 1, 8, "h100"), 0);
        assert_eq!(pool_of(&e, keep), "p1");
        let ev = ok(e.apply(Command::LosePool { pool: "p1".into() }, 10));
        assert!(ev.contains(&Event::Requeued {
            request: keep,
            reason: EndReason::PoolLost
        }));
        let ev = ok(e.apply(Command::Tick, 3_600_000));
        assert!(ev.contains(&Event::Ended {
            request: drop,
            state: RequestState::Completed,
            reason: EndReason::Expired
        }));
        assert!(placed(&ev, keep));
        assert_eq!(pool_of(&e, keep), "p2", "p1 is lost");
        ok(e.apply(Command::RestorePool { pool: "p1".into() }, 3_600_001));
    }

    #[test]
    fn a_node_out_of_service_ends_its_leases_and_offers_nothing_until_back() {
        let mut e = engine(vec![pool("p", External, 5, &[("h100", 8, 2, 1000)])]);
        let mut keep = gang("a", 1, 8, "h100");
        keep.requeue = true;
        let keep = submit(&mut e, keep, 0);
        let other = submit(&mut e, gang("a", 1, 8, "h100"), 0);
        let node = e.request(keep).unwrap().lease.unwrap().parts[0].node;
        let down = |healthy| Command::SetNodeHealth {
            pool: "p".into(),
            group: 0,
            node,
            healthy,
        };
        let ev = ok(e.apply(down(false), 10));
        assert!(ev.contains(&Event::Requeued {
            request: keep,
            reason: EndReason::NodeLost
        }));
        assert_eq!(e.request(other).unwrap().state, RequestState::Placed);
        let total = e.fleet_usage().total;
        assert_eq!((total.allocated_devices, total.unavailable_devices), (8, 8));
        assert!(
            ok(e.apply(Command::Tick, 11)).is_empty(),
            "the other node is taken and this one is out"
        );
        assert!(
            ok(e.apply(down(false), 12)).is_empty(),
            "already out: no change"
        );
        let ev = ok(e.apply(down(true), 13));
        assert!(ev.contains(&Event::NodeHealthChanged {
            pool: "p".into(),
            group: 0,
            node,
            healthy: true
        }));
        assert!(placed(&ok(e.apply(Command::Tick, 14)), keep));
        let err = e.apply(
            Command::SetNodeHealth {
                pool: "p".into(),
                group: 1,
                node: 0,
                healthy: false,
            },
            15,
        );
        assert!(matches!(
            &err[..],
            [Event::Rejected {
                error: CoreError::UnknownNode { group: 1, .. }
            }]
        ));
    }

    #[test]
    fn waiting_requests_are_given_start_times_in_queue_order() {
        let mut e = engine(vec![pool("p", External, 5, &[("h100", 8, 1, 1000)])]);
        let hour = 3_600_000;
        let spec = |duration_ms| {
            let mut g = gang("a", 1, 8, "h100");
            g.duration_ms = duration_ms;
            g
        };
        submit(&mut e, spec(hour), 0);
        let first = submit(&mut e, spec(hour / 2), 0);
        let second = submit(&mut e, spec(hour), 0);
        let mut later = spec(hour);
        later.start_after_ms = Some(5 * hour);
        let third = submit(&mut e, later, 0);
        ok(e.apply(Command::Tick, 1));
        let head: Vec<RequestId> = e.queued().iter().map(|q| q.id).collect();
        assert_eq!(head, [first, second, third]);
        assert_eq!(
            e.estimated_starts(&head),
            [
                (first, Some(hour)),
                (second, Some(hour + hour / 2)),
                (third, Some(5 * hour))
            ]
        );
        assert_eq!(e.estimated_starts(&head[..1]), [(first, Some(hour))]);
    }

    #[test]
    fn draining_pools_keep_leases_and_take_nothing_new() {
        let mut e = engine(vec![pool("p", External, 5, &[("h100", 8, 2, 1000)])]);
        let a = submit(&mut e, gang("a", 1, 8, "h100"), 0);
        ok(e.apply(Command::DrainPool { pool: "p".into() }, 1));
        let b = submit(&mut e, gang("a", 1, 8, "h100"), 2);
        assert_eq!(e.request(a).unwrap().state, RequestState::Placed);
        assert_eq!(e.request(b).unwrap().state, RequestState::Queued);
        ok(e.apply(Command::UndrainPool { pool: "p".into() }, 3));
        assert!(placed(&ok(e.apply(Command::Tick, 4)), b));
        let err = e.apply(Command::UndrainPool { pool: "p".into() }, 5);
        assert!(matches!(
            err[0],
            Event::Rejected {
                error: CoreError::PoolState { .. }
            }
        ));
    }

    #[test]
    fn deadlines_and_start_times() {
        let mut e = engine(vec![pool("p", External, 5, &[("h100", 8, 1, 1000)])]);
        let hold = submit(&mut e, gang("a", 1, 8, "h100"), 0);
        let mut d = gang("a", 1, 8, "h100");
        d.deadline_ms = Some(5_000_000);
        let d = submit(&mut e, d, 0);
        let ev = ok(e.apply(Command::Tick, 2_000_000));
        assert!(ev.contains(&Event::Ended {
            request: d,
            state: RequestState::Failed,
            reason: EndReason::DeadlineMissed
        }));
        ok(e.apply(Command::Release { request: hold }, 2_000_001));
        let mut later = gang("a", 1, 8, "h100");
        later.start_after_ms = Some(9_000_000);
        let later = submit(&mut e, later, 2_000_002);
        assert_eq!(
            e.explain(later).unwrap().reason,
            WaitReason::NotYetStartable
        );
        assert_eq!(e.explain(later).unwrap().earliest_start, Some(9_000_000));
        assert!(placed(&ok(e.apply(Command::Tick, 9_000_000)), later));
    }

    #[test]
    fn a_start_and_deadline_at_the_end_of_time_do_not_overflow() {
        let mut e = engine(vec![pool("p", External, 5, &[("h100", 8, 1, 1000)])]);
        let mut spec = gang("a", 1, 8, "h100");
        spec.start_after_ms = Some(u64::MAX);
        spec.deadline_ms = Some(u64::MAX);
        let id = submit(&mut e, spec, 0);
        ok(e.apply(Command::Tick, 1));
        assert_eq!(e.explain(id).unwrap().reason, WaitReason::NotYetStartable);
    }

    #[test]
    fn a_rejected_command_does_not_move_the_clock() {
        let mut e = engine(vec![pool("p", External, 5, &[("h100", 8, 1, 1000)])]);
        let before = e.digest();
        let ev = e.apply(Command::Submit(gang("nobody", 1, 8, "h100")), 5_000);
        assert!(matches!(ev[..], [Event::Rejected { .. }]));
        assert_eq!((e.now(), e.digest()), (0, before));
        ok(e.apply(Command::Tick, 6_000));
        assert_eq!(e.now(), 6_000);
    }

    #[test]
    fn invalid_commands_are_rejected_with_the_field() {
        let mut e = three_pools();
        let cases: Vec<(RequestSpec, &str)> = vec![
            (gang("nobody", 1, 8, "h100"), "unknown tenant \"nobody\""),
            (
                gang("a", 0, 8, "h100"),
                "request field shape.nodes: must be at least 1",
            ),
            (
                gang("a", 1, 17, "h100"),
                "request field shape.devices_per_node: must be 1..=16",
            ),
            (
                gang("a", 1, 8, "z9"),
                "request field constraints.models[0]: unknown accelerator model \"z9\"",
            ),
            (
                elastic("a", 10, 20),
                "request field shape.min_chunk_tflops: 20 is larger than the amount asked, 10",
            ),
            (
                RequestSpec {
                    duration_ms: 0,
                    ..gang("a", 1, 8, "h100")
                },
                "request field duration_ms",
            ),
        ];
        for (spec, want) in cases {
            let ev = e.apply(Command::Submit(spec), 0);
            match &ev[..] {
                [Event::Rejected { error }] => {
                    assert!(error.to_string().starts_with(want), "{error} vs {want}")
                }
                other => panic!("expected a rejection, got {other:?}"),
            }
        }
        let ev = e.apply(
            Command::Release {
                request: RequestId(999),
            },
            0,
        );
        assert!(matches!(
            ev[0],
            Event::Rejected {
                error: CoreError::UnknownRequest { .. }
            }
        ));
        let dup = pool("local", LocalCentre, 1, &[("h100", 8, 1, 1)]);
        let ev = e.apply(Command::RegisterPool(dup), 0);
        assert_eq!(
            ev,
            [Event::Rejected {
                error: CoreError::DuplicatePool {
                    pool: "local".into()
                }
            }]
        );
    }

    #[test]
    fn update_pool_grows_and_refuses_to_remove_busy_nodes() {
        let mut e = engine(vec![pool("p", External, 5, &[("h100", 8, 1, 1000)])]);
        let a = submit(&mut e, gang("a", 1, 8, "h100"), 0);
        let grown = pool("p", External, 5, &[("h100", 8, 2, 900)]);
        ok(e.apply(Command::UpdatePool(grown), 1));
        let b = submit(&mut e, gang("a", 1, 8, "h100"), 2);
        assert!(e.request(b).unwrap().lease.is_some());
        let shrunk = pool("p", External, 5, &[("h100", 8, 1, 900)]);
        let ev = e.apply(Command::UpdatePool(shrunk), 3);
        assert_eq!(
            match &ev[0] {
                Event::Rejected { error } => error.to_string(),
                _ => String::new(),
            },
            "pool p: field group[0].nodes: the nodes to remove still hold leases"
        );
        let _ = a;
    }

    #[test]
    fn quote_tells_where_and_at_what_price_without_placing() {
        let mut e = engine(vec![pool("p", External, 5, &[("h100", 8, 1, 1000)])]);
        let digest = e.digest();
        let q = e.quote(&gang("a", 1, 8, "h100"), 0).unwrap();
        let placement = q.placement.unwrap();
        assert_eq!(placement.price_fen_per_hour, 8 * 1000);
        assert_eq!(placement.parts[0].pool, "p");
        assert_eq!(e.digest(), digest, "a quote changes nothing");
        let held = submit(&mut e, gang("a", 1, 8, "h100"), 0);
        let q = e.quote(&gang("a", 1, 8, "h100"), 10).unwrap();
        assert_eq!(q.reason, Some(WaitReason::CapacityBusy));
        assert_eq!(
            q.earliest_start,
            Some(3_600_000),
            "when the held lease ends"
        );
        let q = e.quote(&gang("a", 2, 8, "h100"), 10).unwrap();
        assert_eq!(q.reason, Some(WaitReason::NoMatchingPool));
        assert!(e.quote(&gang("nobody", 1, 8, "h100"), 10).is_err());
        let _ = held;
    }

    #[test]
    fn utilisation_by_kind_and_model() {
        let mut e = three_pools();
        submit(&mut e, gang("a", 1, 8, "h100"), 0);
        let u = e.fleet_usage();
        assert_eq!(u.total.capacity_devices, 40);
        assert_eq!(u.external.allocated_devices, 8);
        assert_eq!(u.local.allocated_devices, 0);
        assert_eq!(u.by_model["h100"].allocated_tflops, 8 * 989);
        assert_eq!(u.by_kind["external"].capacity_devices, 24);
    }
}
