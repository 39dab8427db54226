//! Incremental passes: a pass that tries only the waiting requests whose answer could have
//! changed since they were last tried, in the order the full pass would try them.
//!
//! A try is a function of what it reads: the capacity and the preemptible leases of the
//! request's node groups, its tenant's usage, the reservation, the clock and the fleet's shape.
//! Every change to one of these is recorded as a *wake* on what it touches:
//! - capacity freed in a group wakes the requests that could use it: the first waiting for
//!   capacity of each shape (the rest of the shape follow only while the capacity lasts), and
//!   every one held by the reservation or by quota;
//! - capacity taken wakes those held by the reservation or by quota (their plan may be gone);
//! - a preemptible lease placed wakes the first of each shape that may search for victims;
//! - a tenant's usage changing wakes all its requests when its quota could bind;
//! - a start time or a deadline coming wakes that request; pools, nodes and tenants changing
//!   wake everything (a full pass).
//!
//! The pass then keeps the full pass's order exactly: it walks the same tenant runs, by the
//! same shares, and pops a run whose wakes are exhausted as the full pass would walk through
//! it without effect. While no reservation is held, it follows each run's requests waiting for
//! capacity, as the full pass would give the reservation to the first that does not fit; when
//! the new reservation lets more through than the last one, every request it held is tried
//! again. Wakes that happen during the pass (a placement, a preemption, a lease ending between
//! slices) reach the pass under way as well as the next one.
//!
//! Requests are found through [`QueueIndex`]: per *shape key* (priority class, tenant, filter,
//! shape, policy), the waiting requests by reason, and per node group the keys that could use
//! it. A victim search's outcome is the same for every request of a key, so a search that found
//! nothing is not repeated until something it read changed: the key remembers when.

use super::*;
use crate::units::ModelIx;

/// What happened in some node groups (see [`Engine::wake_groups`]).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum GroupChange {
    /// Capacity came free.
    Freed,
    /// Capacity was taken by a lease others may preempt.
    TakenByPreemptible,
    /// Capacity was taken by a lease others may not preempt.
    Taken,
}

/// What changed since a pass: see the module documentation.
#[derive(Clone, Debug, Default, Hash, serde::Serialize, serde::Deserialize)]
pub(crate) struct Wakes {
    /// Everything: the next pass is a full one.
    pub full: bool,
    /// Shape keys whose first request waiting for capacity is tried, and the next after each
    /// that does not end waiting for capacity: capacity they could use came free.
    pub keys: BTreeSet<u32>,
    /// Models whose keys' requests held by the reservation or by quota are tried (bit `m`
    /// for model `m`): capacity of theirs came free or was taken.
    pub held_models: u64,
    /// Tenants whose every request is tried.
    pub tenants: BTreeSet<TenantIx>,
}

impl Wakes {
    fn is_empty(&self) -> bool {
        !self.full && self.keys.is_empty() && self.tenants.is_empty() && self.held_models == 0
    }
}

/// The requests of one shape key: they fit, and find victims, alike.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct ShapeKey {
    pub class: Priority,
    pub tenant: TenantIx,
    pub filter_key: u64,
    pub shape: Shape,
    pub policy: Policy,
    /// The filter its requests share, to find the groups it could use.
    pub filter: Filter,
    /// Waiting requests that found no capacity.
    pub busy: BTreeSet<RequestId>,
    /// Waiting requests held by the reservation or by quota.
    pub held: BTreeSet<RequestId>,
    /// When the last victim search for it found nothing (0: never).
    pub searched_at: u64,
    /// What it needs: devices for a gang, TFLOPS for an elastic request.
    pub need: u64,
    /// Its requests in the queue, for whatever reason.
    pub waiting: u32,
    /// The most a placement of one of its requests can count against quota.
    pub most: Tflops,
}

/// How a wait reason files a request in the index.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Bucket {
    Busy,
    Behind,
    Quota,
    Idle,
}

fn bucket(reason: WaitReason) -> Bucket {
    match reason {
        WaitReason::CapacityBusy => Bucket::Busy,
        WaitReason::BehindReservation => Bucket::Behind,
        WaitReason::Quota => Bucket::Quota,
        WaitReason::Pending
        | WaitReason::NotYetStartable
        | WaitReason::NoMatchingPool
        | WaitReason::WorkloadUnsupported => Bucket::Idle,
    }
}

/// The queue index: see the module documentation.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub(crate) struct QueueIndex {
    /// Every shape key ever seen (keys are few and keep their search stamps).
    pub keys: Vec<ShapeKey>,
    /// Per class and tenant, the waiting requests that found no capacity or are held by the
    /// reservation: the reservation goes to the first of these that does not fit.
    pub capacity: [BTreeMap<TenantIx, BTreeSet<RequestId>>; 3],
    /// Per class and tenant, the waiting requests held by the reservation.
    pub behind: [BTreeMap<TenantIx, BTreeSet<RequestId>>; 3],
    /// Per tenant, how many of its keys with requests waiting may count each amount against
    /// quota at most: its usage changing matters only when its quota is within that much of it.
    pub tenant_most: BTreeMap<TenantIx, BTreeMap<Tflops, u32>>,
    /// Keys with requests waiting for capacity, by model they allow ([`ANY_MODEL`] for those
    /// that allow every one) and shape (gang or not), ordered by what they need: freed
    /// capacity wakes only those that need no more than is free.
    pub busy_keys: [BTreeMap<u16, NeedBuckets>; 2],
    /// Keys with requests held by the reservation or by quota, by model they allow.
    pub held_keys: BTreeMap<u16, BTreeSet<u32>>,
    /// Per model, when capacity last came free or a preemptible lease was placed in one of its
    /// groups: a victim search for a key made before is worth making again.
    pub model_woke: Vec<u64>,
    /// Shape keys by what they are, derived from `keys`.
    #[serde(skip)]
    ids: Option<FxHashMap<KeyOf, u32>>,
}

/// What makes a shape key: class, tenant, filter (by hash), shape and policy.
type KeyOf = (Priority, TenantIx, u64, Shape, Policy);

/// Keys with what they need, in buckets by powers of two of the need: a key joins or leaves in
/// constant time (keys come and go with every request of a shape of its own), and the keys
/// needing at most some amount are those of the buckets up to its own.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub(crate) struct NeedBuckets(BTreeMap<u8, FxHashSet<(u64, u32)>>);

impl NeedBuckets {
    fn bucket(need: u64) -> u8 {
        (u64::BITS - need.leading_zeros()) as u8
    }

    fn insert(&mut self, need: u64, k: u32) {
        self.0
            .entry(Self::bucket(need))
            .or_default()
            .insert((need, k));
    }

    fn remove(&mut self, need: u64, k: u32) {
        let b = Self::bucket(need);
        if let Some(set) = self.0.get_mut(&b) {
            set.remove(&(need, k));
            if set.is_empty() {
                self.0.remove(&b);
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The keys needing at most `bound`, in no particular order.
    fn up_to(&self, bound: u64) -> impl Iterator<Item = u32> + '_ {
        self.0
            .range(..=Self::bucket(bound))
            .flat_map(|(_, set)| set.iter())
            .filter(move |&&(need, _)| need <= bound)
            .map(|&(_, k)| k)
    }

    /// Every key with its need, ordered: for the audit.
    fn sorted(&self) -> BTreeSet<(u64, u32)> {
        self.0.values().flatten().copied().collect()
    }
}

/// Where a key allowing every model is filed.
const ANY_MODEL: u16 = u16::MAX;

/// The models of a mask, then [`ANY_MODEL`]: where the keys that could use them are filed.
fn with_any_model(models: u64) -> impl Iterator<Item = u16> {
    (0..64u16)
        .filter(move |&m| models & (1 << m) != 0)
        .chain([ANY_MODEL])
}

impl PassInProgress {
    /// The run of a tenant in a class, if the pass has not finished that class and the run's
    /// walk is not over.
    fn open_run(&mut self, class: usize, tenant: TenantIx) -> Option<&mut TenantRun> {
        if class < self.class {
            return None;
        }
        let runs = &mut self.classes[class];
        let i = runs.binary_search_by_key(&tenant, |run| run.tenant).ok()?;
        Some(&mut runs[i]).filter(|run| run.open())
    }
}

/// The models under which a key of this filter is filed.
fn filed_under(mask: u64, all: u64) -> impl Iterator<Item = u16> {
    let any = mask & all == all;
    let models = if any { 0 } else { mask };
    (0..64)
        .filter(move |m| models & (1 << m) != 0)
        .chain(any.then_some(ANY_MODEL))
}

impl Engine {
    /// The shape key of a request about to be queued, made if new.
    pub(super) fn key_of(&mut self, id: RequestId) -> u32 {
        let r = &self.requests[&id];
        let lookup = (r.priority, r.tenant, r.filter_key, r.shape, r.policy);
        let keys = &self.index.keys;
        let ids = self.index.ids.get_or_insert_with(|| {
            keys.iter()
                .enumerate()
                .map(|(k, key)| {
                    let lookup = (key.class, key.tenant, key.filter_key, key.shape, key.policy);
                    (lookup, k as u32)
                })
                .collect()
        });
        if let Some(&k) = ids.get(&lookup) {
            return k;
        }
        let k = keys.len() as u32;
        ids.insert(lookup, k);
        let filter = r.filter.clone();
        let supply = &self.supply;
        let groups = supply.groups.len() as u64;
        // A gang counts its devices at the largest model it allows; an elastic request what it
        // asks, plus less than a device of each group it may take a piece of.
        let largest_device = (0..supply.catalogue.len())
            .filter(|m| filter.models & (1 << m) != 0)
            .map(|m| supply.catalogue.model(ModelIx(m as u16)).fp16_dense_tflops as u64)
            .max()
            .unwrap_or(0);
        let (most, need) = match lookup.3 {
            Shape::Gang {
                nodes,
                devices_per_node,
            } => {
                let devices = nodes as u64 * devices_per_node as u64;
                (devices * largest_device, devices)
            }
            Shape::Elastic { tflops, .. } => {
                (tflops.saturating_add(groups * largest_device), tflops)
            }
        };
        self.index.keys.push(ShapeKey {
            class: lookup.0,
            tenant: lookup.1,
            filter_key: lookup.2,
            shape: lookup.3,
            policy: lookup.4,
            filter,
            busy: BTreeSet::new(),
            held: BTreeSet::new(),
            searched_at: 0,
            need,
            waiting: 0,
            most,
        });
        k
    }

    /// Files a queued request under its reason, or takes it out (`to: None`), from where
    /// `from` filed it.
    pub(super) fn refile(
        &mut self,
        id: RequestId,
        from: Option<WaitReason>,
        to: Option<WaitReason>,
    ) {
        let (from, to) = (from.map(bucket), to.map(bucket));
        if from == to {
            return;
        }
        let r = &self.requests[&id];
        let (k, class, tenant) = (r.key as usize, r.priority.rank(), r.tenant);
        let index = &mut self.index;
        let key = &mut index.keys[k];
        // Which sets the request leaves and joins: (key's busy, key's held, run's capacity,
        // run's behind).
        let sets = |b: Option<Bucket>| match b {
            Some(Bucket::Busy) => [true, false, true, false],
            Some(Bucket::Behind) => [false, true, true, true],
            Some(Bucket::Quota) => [false, true, false, false],
            Some(Bucket::Idle) | None => [false; 4],
        };
        let (left, joined) = (sets(from), sets(to));
        let was = (key.busy.is_empty(), key.held.is_empty());
        let joins = from.is_none();
        if joins || to.is_none() {
            key.waiting = if joins {
                key.waiting + 1
            } else {
                key.waiting - 1
            };
            // The key's first request in, or its last out.
            if key.waiting == u32::from(joins) {
                let most = index.tenant_most.entry(tenant).or_default();
                let count = most.entry(key.most).or_default();
                if joins {
                    *count += 1;
                } else {
                    *count -= 1;
                    if *count == 0 {
                        most.remove(&key.most);
                        if most.is_empty() {
                            index.tenant_most.remove(&tenant);
                        }
                    }
                }
            }
        }
        for (i, set) in [&mut key.busy, &mut key.held].into_iter().enumerate() {
            if left[i] && !joined[i] {
                set.remove(&id);
            } else if joined[i] && !left[i] {
                set.insert(id);
            }
        }
        let is = (key.busy.is_empty(), key.held.is_empty());
        if was.0 && !is.0 {
            // A search stamp counts only while requests of the key wait: wakes skip keys with
            // nothing waiting.
            key.searched_at = 0;
        }
        if was != is {
            let gang = matches!(key.shape, Shape::Gang { .. });
            let need = key.need;
            let all = (1u64 << self.supply.catalogue.len()) - 1;
            for m in filed_under(key.filter.models, all) {
                if was.0 != is.0 {
                    let set = index.busy_keys[usize::from(gang)].entry(m).or_default();
                    if is.0 {
                        set.remove(need, k as u32);
                    } else {
                        set.insert(need, k as u32);
                    }
                }
                if was.1 != is.1 {
                    let set = index.held_keys.entry(m).or_default();
                    if is.1 {
                        set.remove(&(k as u32));
                    } else {
                        set.insert(k as u32);
                    }
                }
            }
        }
        for (i, runs) in [&mut index.capacity, &mut index.behind]
            .into_iter()
            .enumerate()
        {
            let runs = &mut runs[class];
            if left[i + 2] && !joined[i + 2] {
                if let Some(set) = runs.get_mut(&tenant) {
                    set.remove(&id);
                    if set.is_empty() {
                        runs.remove(&tenant);
                    }
                }
            } else if joined[i + 2] && !left[i + 2] {
                runs.entry(tenant).or_default().insert(id);
            }
        }
    }

    fn next_stamp(&mut self) -> u64 {
        self.stamp += 1;
        self.stamp
    }

    fn wake(&mut self, f: impl Fn(&mut Wakes)) {
        f(&mut self.pending);
        f(&mut self.inbox);
    }

    /// Everything may decide differently: the fleet or a tenant changed.
    pub(super) fn wake_all(&mut self) {
        self.fit.mark(u64::MAX);
        self.fleet_woke = self.next_stamp();
        self.wake(|w| w.full = true);
    }

    /// Capacity came free or was taken in these groups. Requests held by the reservation or by
    /// quota are woken either way (their plan may have changed); requests waiting for capacity
    /// only when it came free and could now hold them (a gang in one of these groups, an
    /// elastic request in the free TFLOPS of its models). Freed capacity and preemptible leases
    /// also make the keys' victim searches worth making again; those are found by the pass
    /// itself, as long as it has searches left.
    pub(super) fn wake_groups(&mut self, mut groups: Vec<u32>, change: GroupChange) {
        let models: u64 = groups.iter().fold(0, |mask, &g| {
            mask | 1 << self.supply.groups[g as usize].model.0
        });
        self.fit.mark(models);
        if self.queue.len() == 0 {
            // Nothing waits: nothing to wake, and a key's search stamp starts afresh when a
            // request of it next waits for capacity.
            return;
        }
        let stamp = self.next_stamp();
        groups.sort_unstable();
        groups.dedup();
        let index = &mut self.index;
        if change != GroupChange::Taken {
            if index.model_woke.len() < self.supply.catalogue.len() {
                index.model_woke.resize(self.supply.catalogue.len(), 0);
            }
            for (m, woke) in index.model_woke.iter_mut().enumerate() {
                if models & (1 << m) != 0 {
                    *woke = stamp;
                }
            }
        }
        if !index.held_keys.values().all(BTreeSet::is_empty) {
            self.wake(|w| w.held_models |= models);
        }
        if change != GroupChange::Freed {
            return;
        }
        let filed: Vec<u16> = with_any_model(models).collect();
        let index = &self.index;
        let busy_here = filed.iter().any(|m| {
            index
                .busy_keys
                .iter()
                .any(|keys| keys.get(m).is_some_and(|k| !k.is_empty()))
        });
        if !busy_here {
            return;
        }
        self.fit.refresh(&self.supply);
        let fit = &self.fit;
        let supply = &self.supply;
        // A gang fits in one group: no more devices than a freed group has free.
        let most_devices = groups
            .iter()
            .map(|&g| supply.stats(g).free_devices)
            .max()
            .unwrap_or(0);
        // An elastic request may take pieces of every model it allows: no more TFLOPS than
        // the fleet has free.
        let free: Tflops = fit.models.iter().map(|f| f.total).sum();
        let mut woken = Vec::new();
        for m in filed {
            for (gang, bound) in [(true, most_devices), (false, free)] {
                let Some(keys) = index.busy_keys[usize::from(gang)].get(&m) else {
                    continue;
                };
                for k in keys.up_to(bound) {
                    let key = &index.keys[k as usize];
                    let holds = match key.shape {
                        Shape::Gang {
                            nodes,
                            devices_per_node,
                        } => groups.iter().any(|&g| {
                            supply.admits(&key.filter, g)
                                && supply.groups[g as usize]
                                    .nodes
                                    .nodes_with_at_least(devices_per_node)
                                    >= nodes
                        }),
                        // An elastic request that could use none of the freed groups has no
                        // more capacity than before.
                        Shape::Elastic { .. } => {
                            groups.iter().any(|&g| supply.admits(&key.filter, g))
                                && fit.could_hold(&key.filter, &key.shape)
                        }
                    };
                    if holds {
                        woken.push(k);
                    }
                }
            }
        }
        for k in woken {
            self.wake(|w| {
                w.keys.insert(k);
            });
        }
    }

    /// A tenant's usage went from `before` to `after`: its requests may now be over quota or
    /// back within it, and its victim searches may reclaim borrowed capacity again.
    pub(super) fn wake_tenant(&mut self, t: TenantIx, before: Tflops, after: Tflops) {
        if self.tenants[t.0 as usize].queued == 0 {
            // Nothing of it waits; its keys' search stamps start afresh when something does.
            return;
        }
        // With nothing waiting, any amount may come: a later search must not trust an earlier.
        let most = self
            .index
            .tenant_most
            .get(&t)
            .and_then(|m| m.last_key_value().map(|(&most, _)| most))
            .unwrap_or(Tflops::MAX);
        let tenant = &self.tenants[t.0 as usize];
        let binds = tenant.limit() < before.max(after).saturating_add(most);
        let relief = after < before && tenant.spec.quota_tflops < before.saturating_add(most);
        if relief {
            let stamp = self.next_stamp();
            self.tenants[t.0 as usize].relieved_at = stamp;
        }
        if (binds || relief) && self.tenants[t.0 as usize].queued > 0 {
            self.wake(|w| {
                w.tenants.insert(t);
            });
        }
    }

    /// Every request of a tenant may decide differently (its vouchers changed where its
    /// requests would go, and so what they would cost against its quota).
    pub(super) fn wake_tenant_requests(&mut self, t: TenantIx) {
        if self.tenants[t.0 as usize].queued > 0 {
            self.wake(|w| {
                w.tenants.insert(t);
            });
        }
    }

    /// Whether a victim search for this request could find what the last one for its key did
    /// not; see the module documentation.
    pub(super) fn search_stale(&self, r: &Request) -> bool {
        let key = &self.index.keys[r.key as usize];
        if key.filter.models & self.victims().models() == 0 {
            // No lease the search could end.
            return false;
        }
        let s = key.searched_at;
        s == 0
            || self.fleet_woke > s
            || self.tenants[r.tenant.0 as usize].relieved_at > s
            || self
                .index
                .model_woke
                .iter()
                .enumerate()
                .any(|(m, &woke)| woke > s && key.filter.models & (1 << m) != 0)
    }

    /// A victim search for this request's key found nothing.
    pub(super) fn searched(&mut self, r: RequestId) {
        let k = self.requests[&r].key;
        self.index.keys[k as usize].searched_at = self.stamp;
    }

    // ----- the incremental pass -----

    /// Begins a pass over what the wakes name (see the module documentation).
    pub(super) fn begin_incremental_pass(&mut self, wakes: Wakes, due: Vec<RequestId>) {
        let before = self.reservation.take();
        let classes = Priority::ALL.map(|class| {
            self.queue.classes[class.rank()]
                .keys()
                .map(|&tenant| TenantRun::picked(tenant))
                .collect()
        });
        self.begin_pass(classes);
        let mut pass = self.pass.take().expect("just begun");
        pass.picked = Some(Picked {
            chains: BTreeSet::new(),
            before,
            checked: false,
            held_models: 0,
        });
        let arrivals = std::mem::take(&mut self.arrivals);
        for id in arrivals.into_iter().chain(due) {
            self.pick(&mut pass, id);
        }
        self.apply_wakes(&mut pass, wakes);
        self.pass = Some(pass);
    }

    /// Adds a queued request to the pass under way, if its run has not walked past it.
    fn pick(&self, pass: &mut PassInProgress, id: RequestId) {
        let Some(r) = self.requests.get(&id).filter(|r| r.in_queue) else {
            return;
        };
        if let Some(run) = pass.open_run(r.priority.rank(), r.tenant) {
            run.pick(id);
        }
    }

    /// The next request of an incremental run to try: the first it picked, or one it finds
    /// itself. While no reservation is held, the next waiting for capacity (the full pass
    /// would give the reservation to the first that does not fit); while victim searches are
    /// left, the next waiting for capacity whose key's search could find what the last did
    /// not.
    pub(super) fn next_pick(
        &self,
        class: usize,
        run: &mut TenantRun,
        searches_left: bool,
        looked_at: &mut u32,
    ) -> Option<RequestId> {
        let todo = run.picked.as_ref()?;
        let mut next = todo.first().copied();
        let waiting = self.index.capacity[class].get(&run.tenant);
        if self.reservation.is_none()
            && let Some(&id) = waiting.and_then(|set| set.range(run.after()..).next())
        {
            next = Some(next.map_or(id, |n| n.min(id)));
        }
        if searches_left && class != Priority::Spot.rank() && self.victims().models() != 0 {
            // Each id is looked at once a pass: the walk moves past it.
            let until = next.unwrap_or(RequestId(u64::MAX));
            let found = waiting.and_then(|set| {
                set.range(run.after()..until).copied().find(|id| {
                    *looked_at += 1;
                    let r = &self.requests[id];
                    r.reason == WaitReason::CapacityBusy && self.search_stale(r)
                })
            });
            if found.is_some() {
                next = found;
            }
        }
        let id = next?;
        if let Some(todo) = run.picked.as_mut() {
            todo.remove(&id);
        }
        Some(id)
    }

    /// Adds to the pass under way what the wakes name.
    pub(super) fn apply_wakes(&self, pass: &mut PassInProgress, wakes: Wakes) {
        if pass.picked.is_none() || wakes.is_empty() {
            return;
        }
        let from = pass.class;
        for class in from..pass.classes.len() {
            for run in &mut pass.classes[class] {
                if !(wakes.full || wakes.tenants.contains(&run.tenant)) || !run.open() {
                    continue;
                }
                if let Some(fifo) = self.queue.classes[class].get(&run.tenant) {
                    let after = run.after();
                    let start = fifo.partition_point(|&id| id < after);
                    for &id in fifo.range(start..) {
                        run.pick(id);
                    }
                }
            }
        }
        for &k in &wakes.keys {
            let key = &self.index.keys[k as usize];
            let Some(run) = pass.open_run(key.class.rank(), key.tenant) else {
                continue;
            };
            if let Some(&id) = key.busy.range(run.after()..).next() {
                run.pick(id);
            }
            let picked = pass.picked.as_mut().expect("incremental pass");
            picked.chains.insert(k);
        }
        // Held requests of the models woken, once a pass: behind the walk nothing joins them.
        let picked = pass.picked.as_mut().expect("incremental pass");
        let models = wakes.held_models & !picked.held_models;
        if models != 0 {
            picked.held_models |= models;
            for m in with_any_model(models) {
                let Some(keys) = self.index.held_keys.get(&m) else {
                    continue;
                };
                for &k in keys {
                    let key = &self.index.keys[k as usize];
                    if let Some(run) = pass.open_run(key.class.rank(), key.tenant) {
                        for &id in key.held.range(run.after()..) {
                            run.pick(id);
                        }
                    }
                }
            }
        }
    }

    /// After a request of run `i` of the current class was tried: what the try woke, the next
    /// request of its key if the capacity lasted, the next waiting for capacity if no
    /// reservation is held yet, and every request the reservation held if the new one lets
    /// more through.
    pub(super) fn after_try(&mut self, pass: &mut PassInProgress, i: usize, key: u32) {
        let wakes = std::mem::take(&mut self.inbox);
        if pass.picked.is_none() {
            return;
        }
        self.apply_wakes(pass, wakes);
        let class = pass.class;
        let picked = pass.picked.as_ref().expect("picked pass");
        let run = &pass.classes[class][i];
        let k = &self.index.keys[key as usize];
        if picked.chains.contains(&key)
            && run.open()
            && let Some(&id) = k.busy.range(run.after()..).next()
        {
            // The last of the key tried did not end waiting for capacity (it would be in `busy`
            // behind the cursor otherwise): the next may fit too.
            let last_busy = self
                .requests
                .get(&run.cursor)
                .is_some_and(|r| r.in_queue && r.reason == WaitReason::CapacityBusy);
            if !last_busy {
                pass.classes[class][i].pick(id);
            }
        }
        match &self.reservation {
            None => {}
            Some(now_held) => {
                let picked = pass.picked.as_mut().expect("picked pass");
                if std::mem::replace(&mut picked.checked, true)
                    || !lets_more_through(now_held, picked.before.as_ref())
                {
                    return;
                }
                for c in class..pass.classes.len() {
                    for run in &mut pass.classes[c] {
                        if !run.open() {
                            continue;
                        }
                        if let Some(set) = self.index.behind[c].get(&run.tenant) {
                            for &id in set.range(run.after()..) {
                                run.pick(id);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Whether a request that `before` held could pass under `now`: not when `now` covers every
/// group `before` did and frees up no later (a request held ends too late for both).
fn lets_more_through(now: &Reservation, before: Option<&Reservation>) -> bool {
    let Some(before) = before else {
        // Nothing was held by a reservation that was not there.
        return false;
    };
    let covers = before
        .groups
        .iter()
        .zip(&now.groups)
        .all(|(&was, &is)| !was || is);
    let not_later = match (now.at, before.at) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(a), Some(b)) => a <= b,
    };
    !(covers && not_later && before.groups.len() == now.groups.len())
}

/// What the fleet's free capacity could hold at most, per model: kept until capacity changes
/// (each model's bound rebuilt from its own groups when they changed), so that an incremental
/// pass can tell, without planning, that a request cannot fit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct FitBounds {
    models: Vec<ModelFit>,
    /// Models whose capacity changed since their bound was made (bit `m` for model `m`).
    stale: u64,
}

impl Default for FitBounds {
    /// Every model stale: bounds are made when first asked for.
    fn default() -> FitBounds {
        FitBounds {
            models: Vec::new(),
            stale: u64::MAX,
        }
    }
}

/// What the free capacity of one model could hold at most.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct ModelFit {
    /// Free TFLOPS in all.
    total: Tflops,
    /// By devices per node, the most nodes of one group with that many free.
    nodes: Vec<u32>,
    /// The free TFLOPS of each group with some free, ascending.
    frees: Vec<Tflops>,
    /// `frees` summed from each index to the end (one longer, ending in 0).
    from: Vec<Tflops>,
}

impl ModelFit {
    /// The bound of model `m` from its groups' free capacity now.
    fn of(supply: &Supply, m: usize) -> ModelFit {
        let mut fit = ModelFit::default();
        for &g in supply.groups_of_model(m) {
            let stats = supply.stats(g);
            if stats.free_devices == 0 {
                continue;
            }
            let group = &supply.groups[g as usize];
            let free = stats.free_devices * group.tflops_per_device as u64;
            fit.total += free;
            fit.frees.push(free);
            let per_node = group.nodes.devices_per_node() as usize;
            if fit.nodes.len() <= per_node {
                fit.nodes.resize(per_node + 1, 0);
            }
            // Nodes with at least d free, for every d, summed from the most free down.
            let mut at_least = 0;
            for d in (1..=per_node).rev() {
                at_least += group.nodes.nodes_with_exactly(d as u16);
                fit.nodes[d] = fit.nodes[d].max(at_least);
            }
        }
        fit.frees.sort_unstable();
        fit.from = vec![0; fit.frees.len() + 1];
        for i in (0..fit.frees.len()).rev() {
            fit.from[i] = fit.from[i + 1] + fit.frees[i];
        }
        fit
    }
}

impl FitBounds {
    /// Every model's bound made afresh: what [`FitBounds::refresh`] must agree with.
    pub(super) fn of(supply: &Supply) -> FitBounds {
        let mut fit = FitBounds::default();
        fit.refresh(supply);
        fit
    }

    /// The capacity of these models (bit `m` for model `m`) changed.
    pub(super) fn mark(&mut self, models: u64) {
        self.stale |= models;
    }

    /// Brings the bounds of the models that changed up to date.
    pub(super) fn refresh(&mut self, supply: &Supply) {
        if self.stale == 0 {
            return;
        }
        let models = supply.catalogue.len();
        self.models.resize_with(models, ModelFit::default);
        for m in (0..models).filter(|&m| self.stale & (1 << m) != 0) {
            self.models[m] = ModelFit::of(supply, m);
        }
        self.stale = 0;
    }

    /// Where the bounds kept differ from bounds made afresh, if anywhere: for the audit.
    pub(super) fn fault(&self, supply: &Supply) -> Option<String> {
        if self.stale != 0 {
            return None;
        }
        let fresh = FitBounds::of(supply);
        (0..fresh.models.len())
            .find(|&m| self.models.get(m) != fresh.models.get(m))
            .map(|m| format!("the fit bound of model {m} differs from one made afresh"))
    }

    /// Whether the free capacity could hold a request of this filter and shape: a necessary
    /// condition for a placement. A gang needs its nodes free in one group. An elastic
    /// request takes a group for what is still missing only if the group has at least
    /// min(min chunk, missing) free: so, of the groups with less than min(min chunk, amount),
    /// it can take one only, for its last piece.
    fn could_hold(&self, filter: &Filter, shape: &Shape) -> bool {
        let allowed = self
            .models
            .iter()
            .enumerate()
            .filter(|&(m, _)| filter.models & (1 << m) != 0)
            .map(|(_, fit)| fit);
        match *shape {
            Shape::Gang {
                nodes,
                devices_per_node,
            } => allowed.into_iter().any(|fit| {
                fit.nodes
                    .get(devices_per_node as usize)
                    .is_some_and(|&n| n >= nodes)
            }),
            Shape::Elastic {
                tflops,
                min_chunk_tflops,
            } => {
                let piece = min_chunk_tflops.min(tflops);
                let (mut pieces, mut last) = (0, 0);
                for fit in allowed {
                    let i = fit.frees.partition_point(|&f| f < piece);
                    pieces += fit.from[i];
                    if i > 0 {
                        last = last.max(fit.frees[i - 1]);
                    }
                }
                pieces > 0 && pieces + last >= tflops
            }
        }
    }
}

impl Engine {
    /// Whether trying this request now would change nothing, which an incremental pass can
    /// tell without planning: it waits for capacity and still would (its start has come, its
    /// deadline can still be met, its quota allows it, the free capacity could not hold it),
    /// a reservation is held, and no victim search is due for it.
    pub(super) fn try_changes_nothing(&mut self, id: RequestId, searches_left: bool) -> bool {
        let r = &self.requests[&id];
        let now = self.now;
        if r.reason != WaitReason::CapacityBusy
            || self.reservation.is_none()
            || r.start_after > now
            || r.deadline
                .is_some_and(|d| now.max(r.start_after).saturating_add(r.duration) > d)
            || searches_left && r.priority != Priority::Spot && self.search_stale(r)
            || !quota_allows(
                &self.tenants[r.tenant.0 as usize],
                self.supply.min_tflops(&r.filter, &r.shape),
            )
        {
            return false;
        }
        self.fit.refresh(&self.supply);
        let r = &self.requests[&id];
        !self.fit.could_hold(&r.filter, &r.shape)
    }
}

/// What an incremental pass keeps besides its runs.
#[derive(Clone, Debug, Hash, serde::Serialize, serde::Deserialize)]
pub(crate) struct Picked {
    /// Keys whose requests waiting for capacity are followed while the capacity lasts.
    pub chains: BTreeSet<u32>,
    /// The reservation before the pass: requests it held stay held by one no more lenient.
    pub before: Option<Reservation>,
    /// Whether the pass's reservation was compared with `before` (once it is held).
    pub checked: bool,
    /// Models whose held requests were added (see [`Wakes::held_models`]).
    pub held_models: u64,
}

impl Engine {
    /// What is wrong with the queue index, if anything: for the audit. Every set is rebuilt
    /// from the queued requests and compared.
    pub(crate) fn queue_index_fault(&self) -> Option<String> {
        let mut expect = QueueIndex {
            keys: self.index.keys.clone(),
            ..QueueIndex::default()
        };
        for key in &mut expect.keys {
            key.busy.clear();
            key.held.clear();
            key.waiting = 0;
        }
        let mut timed = BTreeSet::new();
        let mut ids: Vec<&RequestId> = self.requests.keys().collect();
        ids.sort_unstable();
        for &id in ids {
            let r = &self.requests[&id];
            if !r.in_queue {
                continue;
            }
            let Some(key) = expect.keys.get_mut(r.key as usize) else {
                return Some(format!(
                    "request {id} has shape key {}, which is not",
                    r.key
                ));
            };
            if (key.class, key.tenant, key.filter_key, key.shape, key.policy)
                != (r.priority, r.tenant, r.filter_key, r.shape, r.policy)
            {
                return Some(format!("request {id} is filed under another's shape key"));
            }
            let class = r.priority.rank();
            let b = bucket(r.reason);
            match b {
                Bucket::Busy => key.busy.insert(id),
                Bucket::Behind | Bucket::Quota => key.held.insert(id),
                Bucket::Idle => false,
            };
            if matches!(b, Bucket::Busy | Bucket::Behind) {
                expect.capacity[class]
                    .entry(r.tenant)
                    .or_default()
                    .insert(id);
            }
            if b == Bucket::Behind {
                expect.behind[class].entry(r.tenant).or_default().insert(id);
            }
            key.waiting += 1;
            if key.waiting == 1 {
                *expect
                    .tenant_most
                    .entry(r.tenant)
                    .or_default()
                    .entry(key.most)
                    .or_default() += 1;
            }
            for at in timed_points(r, self.now).filter(|&at| at > self.now) {
                timed.insert((at, id));
            }
        }
        for (k, (is, should)) in self.index.keys.iter().zip(&expect.keys).enumerate() {
            if is.busy != should.busy || is.held != should.held || is.waiting != should.waiting {
                return Some(format!(
                    "shape key {k} files {:?} and {:?}, the queue says {:?} and {:?}",
                    is.busy, is.held, should.busy, should.held
                ));
            }
        }
        let all = (1u64 << self.supply.catalogue.len()) - 1;
        for (k, key) in expect.keys.iter().enumerate() {
            let gang = usize::from(matches!(key.shape, Shape::Gang { .. }));
            for m in filed_under(key.filter.models, all) {
                if !key.busy.is_empty() {
                    expect.busy_keys[gang]
                        .entry(m)
                        .or_default()
                        .insert(key.need, k as u32);
                }
                if !key.held.is_empty() {
                    expect.held_keys.entry(m).or_default().insert(k as u32);
                }
            }
        }
        let filed = |maps: &[BTreeMap<u16, NeedBuckets>; 2]| {
            maps.iter()
                .flat_map(|m| m.iter().filter(|(_, keys)| !keys.is_empty()))
                .map(|(m, keys)| (*m, keys.sorted()))
                .collect::<Vec<_>>()
        };
        let held = |map: &BTreeMap<u16, BTreeSet<u32>>| {
            map.iter()
                .filter(|(_, keys)| !keys.is_empty())
                .map(|(m, keys)| (*m, keys.clone()))
                .collect::<Vec<_>>()
        };
        if filed(&self.index.busy_keys) != filed(&expect.busy_keys)
            || held(&self.index.held_keys) != held(&expect.held_keys)
        {
            return Some("the keys filed by model are not those with requests waiting".into());
        }
        if self.index.capacity != expect.capacity || self.index.behind != expect.behind {
            return Some("the runs' requests waiting for capacity are not those queued".into());
        }
        if self.index.tenant_most != expect.tenant_most {
            return Some(format!(
                "the tenants' most per request are {:?}, the queue says {:?}",
                self.index.tenant_most, expect.tenant_most
            ));
        }
        // Points already past may have been taken by a pass; those to come must all be there.
        if let Some((at, id)) = timed.iter().find(|p| !self.timed.contains(p)) {
            return Some(format!("request {id} is not woken at {at}"));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::PoolKind::External;
    use crate::testkit::{elastic, engine, ok, pool, submit};

    #[test]
    fn the_fit_bound_of_an_elastic_request_counts_one_small_group_for_its_last_piece() {
        const H100: u64 = 989;
        // (devices asked, devices of the smallest piece, whether it is placed)
        for (devices, chunk, fits) in [(5, 3, true), (7, 3, false), (7, 1, true), (8, 1, false)] {
            // Free h100 groups of 4, 2 and 1 devices, the largest the cheapest (taken first).
            let mut e = engine(vec![
                pool("p1", External, 5, &[("h100", 4, 1, 900)]),
                pool("p2", External, 5, &[("h100", 2, 1, 1000)]),
                pool("p3", External, 5, &[("h100", 1, 1, 1000)]),
            ]);
            let spec = elastic("a", devices * H100, chunk * H100);
            // The request's filter, from a copy of the engine (a submission may place it).
            let mut copy = e.clone();
            let copied = submit(&mut copy, spec.clone(), 0);
            let r = &copy.requests[&copied];
            let bound = FitBounds::of(&e.supply).could_hold(&r.filter, &r.shape);
            let id = submit(&mut e, spec, 0);
            ok(e.apply(Command::Tick, 1));
            let is_placed = e.requests[&id].lease.is_some();
            assert_eq!(is_placed, fits, "{devices} devices in pieces of {chunk}");
            assert_eq!(
                bound, fits,
                "the bound for {devices} devices in pieces of {chunk}"
            );
        }
    }
}
