//! What a run measured: the recorder that follows the engine's events on the virtual clock,
//! and the [`Summary`] it ends with.
//!
//! Definitions (all times on the virtual clock):
//! - **measurement window**: from the first arrival, or from the end of a stated warm-up after
//!   it ([`Recorder::measure_after`]), to the last arrival. Utilisation, its breakdowns,
//!   fragmentation, the offered load and the figures of jobs (waits, completion times,
//!   slowdowns, fairness) are taken over the window: the drain after the last arrival (when the
//!   fleet empties) does not dilute them, nor, with a warm-up, the filling of an empty fleet.
//!   Counts of jobs, the bill and the time series cover the whole run.
//! - **steady state** ([`Steadiness`]): the window's samples split in two halves; a queue that
//!   at least doubles from the first half to the second (by more than 10 jobs), or arrivals
//!   turned away at the queue's limit, mean the fleet is saturated; utilisation rising by more
//!   than 5 points beyond what the offered load rose by means it was still filling up;
//!   otherwise the run measured a steady state.
//! - **utilisation**: time-weighted TFLOPS held by leases over rated TFLOPS, overall, local
//!   (the centre and the clouds) vs external, by model and by pool.
//! - **wait**: from a job's arrival to its first placement, over jobs that were placed.
//! - **job completion time (JCT)**: from arrival to the end of its last lease, over completed
//!   jobs; **bounded slowdown**: max(1, JCT / max(run time, 10 s)).
//! - **Jain's fairness**: over tenants with a completed job, each tenant's share of speed
//!   x = 1 / (its mean bounded slowdown); J = (Σx)² / (n Σx²), 1 when every tenant's jobs were
//!   slowed alike, 1/n when one tenant got all the speed.
//! - **fragmentation**: see [`crate::fragmentation`].
//! - **cost, subsidy, tenants paid**: by the billing rules ([`crate::accounts`]): every lease
//!   attempt that ends is charged for the time it was held, at the prices fixed at placement,
//!   each part rounded to the fen; the subsidy policy's vouchers pay their share and the
//!   tenants the rest, so cost = subsidy + tenants paid, to the fen. The same cost computed
//!   without rounding (the engine's price per hour of each lease times the time held) differs
//!   from it by at most half a fen per lease part; the billed figure is the one reported.
//!   Leases still held when the run ends are settled at its end (the loop runs until the last
//!   lease ends, so normally there are none; `leases_open_at_end` counts them).
//! - **queue_mean**, **in_system_mean**: time-averaged number of waiting jobs and of jobs in
//!   the system over the whole run (for Little's law).

use std::collections::BTreeMap;

use rustc_hash::FxHashMap;
use suanli_core::engine::Event;
use suanli_core::{Engine, Millis, RequestId, RequestSpec, RequestState, Shape, Tflops};

use crate::accounts::{BilledPart, Billing, BillingFigures, POOL_KINDS, SubsidyPolicy};
use crate::error::SimError;
use crate::fragmentation::{Demand, Waiting, stranded};
use crate::layout::Layout;

/// Jobs shorter than this count as this long in the bounded slowdown.
pub const SLOWDOWN_BOUND_MS: Millis = 10_000;

/// Timeline buckets kept before neighbours are merged (and the step doubled).
const MAX_BUCKETS: usize = 4096;
/// Fragmentation samples kept before every other one is dropped (and the spacing doubled).
const MAX_SAMPLES: usize = 1024;
/// First timeline step and fragmentation spacing.
const FIRST_STEP_MS: Millis = 60_000;
const FIRST_SAMPLE_EVERY_MS: Millis = 3_600_000;

/// How a job ended, or that it has not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fate {
    Live,
    Rejected,
    Ended(RequestState),
}

#[derive(Clone, Copy, Debug)]
struct JobRecord {
    submit: Millis,
    placed: Option<Millis>,
    end: Millis,
    duration: Millis,
    tenant: u32,
    demand: u32,
    requeues: u16,
    queued: bool,
    fate: Fate,
}

/// A live lease's footprint: TFLOPS by (pool, model).
#[derive(Clone, Debug)]
struct Footprint {
    parts: Vec<(u32, u16, Tflops)>,
    tflops: Tflops,
    local: Tflops,
    start: Millis,
    price_fen_per_hour: u64,
    /// Devices per node group, for the bill.
    billed: Vec<BilledPart>,
    tenant: u32,
    /// 1 for the first lease of a request, 2 after one requeue, ...
    attempt: u32,
}

/// The integral of a stepwise value over time, up to a cut-off.
#[derive(Clone, Copy, Debug, Default)]
struct Area {
    value: u64,
    last: Millis,
    area: u128,
}

impl Area {
    fn advance(&mut self, now: Millis, cutoff: Millis) {
        let until = now.min(cutoff);
        if until > self.last {
            self.area += self.value as u128 * (until - self.last) as u128;
        }
        self.last = self.last.max(now);
    }

    fn add(&mut self, now: Millis, cutoff: Millis, delta: u64) {
        self.advance(now, cutoff);
        self.value += delta;
    }

    fn sub(&mut self, now: Millis, cutoff: Millis, delta: u64) {
        self.advance(now, cutoff);
        self.value = self.value.saturating_sub(delta);
    }
}

/// Allocated TFLOPS-time in fixed buckets from the window's start; the step doubles when the
/// buckets would exceed [`MAX_BUCKETS`].
#[derive(Clone, Debug)]
struct Timeline {
    start: Millis,
    step: Millis,
    buckets: Vec<u128>,
}

impl Timeline {
    fn add(&mut self, from: Millis, to: Millis, value: u64) {
        if value == 0 || to <= from {
            return;
        }
        let mut t = from.max(self.start);
        while t < to {
            let mut i = ((t - self.start) / self.step) as usize;
            while i >= MAX_BUCKETS {
                self.coarsen();
                i = ((t - self.start) / self.step) as usize;
            }
            if self.buckets.len() <= i {
                self.buckets.resize(i + 1, 0);
            }
            let bucket_end = self.start + (i as Millis + 1) * self.step;
            let until = bucket_end.min(to);
            self.buckets[i] += value as u128 * (until - t) as u128;
            t = until;
        }
    }

    fn coarsen(&mut self) {
        self.buckets = self.buckets.chunks(2).map(|c| c.iter().sum()).collect();
        self.step *= 2;
    }
}

/// What the recorder saw at one sample instant.
#[derive(Clone, Copy, Debug)]
struct Sample {
    at: Millis,
    /// Share of the free devices no waiting request could use, when something waits and a
    /// device is free.
    stranded_share: Option<f64>,
    stranded_tflops: Tflops,
    waiting: u64,
    allocated: Tflops,
    /// The window's offered compute so far (TFLOPS x milliseconds of run time).
    demanded: u128,
}

/// Whether a run's measurement window shows a steady state (see the module documentation).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Steadiness {
    /// Utilisation and the queue held level over the window.
    #[default]
    Steady,
    /// Utilisation rose over the window by more than the offered load did: the fleet was
    /// filling up; a longer warm-up is needed.
    Filling,
    /// The queue grew, or arrivals were turned away: demand exceeds what the fleet serves, and
    /// waits grow with the length of the run.
    Saturated,
    /// Too few samples in the window to tell (shorter than 8 hours).
    TooShort,
}

impl Steadiness {
    /// The verdict over the samples of a window, in time order.
    fn of(samples: &[Sample], capacity: Tflops, turned_away: bool) -> Steadiness {
        if turned_away {
            return Steadiness::Saturated;
        }
        if samples.len() < 8 {
            return Steadiness::TooShort;
        }
        let (first, second) = samples.split_at(samples.len() / 2);
        let mean_of = |half: &[Sample], f: fn(&Sample) -> f64| {
            half.iter().map(f).sum::<f64>() / half.len() as f64
        };
        let queue = |s: &Sample| s.waiting as f64;
        let used = |s: &Sample| s.allocated as f64;
        if mean_of(second, queue) > 2.0 * mean_of(first, queue) + 10.0 {
            return Steadiness::Saturated;
        }
        // Offered TFLOPS over each half: bursty arrivals offer more in one half than the other,
        // and the use that follows them is not filling up.
        let offered = |from: &Sample, to: &Sample| {
            (to.demanded - from.demanded) as f64 / (to.at - from.at).max(1) as f64
        };
        let (start, middle, end) = (&first[0], &second[0], &second[second.len() - 1]);
        let offered_rise = (offered(middle, end) - offered(start, middle)).max(0.0);
        let rise = mean_of(second, used) - mean_of(first, used) - offered_rise;
        if rise > 0.05 * capacity.max(1) as f64 {
            Steadiness::Filling
        } else {
            Steadiness::Steady
        }
    }
}

/// Where an engine node group is in the layout: its pool, its group (if the layout has it)
/// and its model.
type GroupPlace = (u32, Option<u32>, u16);

/// Follows the engine's events and integrates what a [`Summary`] reports.
#[derive(Clone, Debug)]
pub struct Recorder {
    layout: Layout,
    model_bits: FxHashMap<String, u16>,
    tenants: BTreeMap<String, u32>,
    tenant_names: Vec<String>,
    jobs: Vec<JobRecord>,
    live: FxHashMap<RequestId, u32>,
    leases: FxHashMap<RequestId, Footprint>,
    /// Per engine node group, once looked up: see [`Recorder::place_of`].
    group_places: Vec<Option<Option<GroupPlace>>>,
    pending: Option<JobRecord>,
    waiting: Waiting,
    healthy: Vec<bool>,
    window_start: Option<Millis>,
    window_end: Millis,
    /// The measurement window starts this long after the first arrival.
    warmup: Millis,
    /// Whether the warm-up is over (always, without one).
    measuring: bool,
    /// Arrivals turned away at the queue's limit: in all, and in the window.
    turned_away: u64,
    turned_away_in_window: u64,
    allocated: Area,
    local: Area,
    pools: Vec<Area>,
    models: Vec<Area>,
    queue: Area,
    in_system: Area,
    timeline: Timeline,
    samples: Vec<Sample>,
    sample_every: Millis,
    next_sample: Millis,
    cost_fen_ms: u128,
    billing: Billing,
    command_rejections: u64,
    demanded_tflops_ms: u128,
    last_event: Millis,
}

impl Recorder {
    /// A recorder for a fleet.
    pub fn new(layout: Layout) -> Self {
        let billing = Billing::new(&layout);
        let model_bits = layout
            .model_ids
            .iter()
            .enumerate()
            .map(|(i, id)| (id.clone(), i as u16))
            .collect();
        Recorder {
            pools: vec![Area::default(); layout.pool_ids.len()],
            models: vec![Area::default(); layout.model_ids.len()],
            healthy: vec![true; layout.pool_ids.len()],
            layout,
            model_bits,
            tenants: BTreeMap::new(),
            tenant_names: Vec::new(),
            jobs: Vec::new(),
            live: FxHashMap::default(),
            leases: FxHashMap::default(),
            group_places: Vec::new(),
            pending: None,
            waiting: Waiting::default(),
            window_start: None,
            window_end: Millis::MAX,
            warmup: 0,
            measuring: true,
            turned_away: 0,
            turned_away_in_window: 0,
            allocated: Area::default(),
            local: Area::default(),
            queue: Area::default(),
            in_system: Area::default(),
            timeline: Timeline {
                start: 0,
                step: FIRST_STEP_MS,
                buckets: Vec::new(),
            },
            samples: Vec::new(),
            sample_every: FIRST_SAMPLE_EVERY_MS,
            next_sample: Millis::MAX,
            cost_fen_ms: 0,
            billing,
            command_rejections: 0,
            demanded_tflops_ms: 0,
            last_event: 0,
        }
    }

    /// Starts the measurement window `warmup` after the first arrival instead of at it (see
    /// the module documentation). Call before the first event.
    pub fn measure_after(&mut self, warmup: Millis) {
        self.warmup = warmup;
        self.measuring = warmup == 0;
    }

    /// Where the measurement window starts (the first arrival until there is one).
    fn measure_start(&self) -> Millis {
        self.window_start.unwrap_or(0).saturating_add(self.warmup)
    }

    /// Ends the warm-up at `at`: what was integrated so far is dropped, and the window's
    /// figures start from zero. The series and the bill keep the whole run.
    fn begin_measurement(&mut self, at: Millis) {
        self.measuring = true;
        let cut = self.window_end;
        self.flush_timeline(at, cut);
        let window_areas = [&mut self.allocated, &mut self.local]
            .into_iter()
            .chain(self.pools.iter_mut())
            .chain(self.models.iter_mut());
        for a in window_areas {
            a.advance(at, cut);
            a.area = 0;
        }
        self.demanded_tflops_ms = 0;
        self.samples.retain(|s| s.at >= at);
    }

    /// The fleet layout.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The run's accounts.
    pub fn billing(&self) -> &Billing {
        &self.billing
    }

    /// Tenants whose voucher ran out since the last call.
    pub fn take_exhausted_vouchers(&mut self) -> Vec<String> {
        self.billing.take_exhausted()
    }

    /// Issues every tenant its voucher under `policy` at `now`, before the first lease.
    pub fn open_subsidy(
        &mut self,
        policy: &SubsidyPolicy,
        tenants: &[String],
        now: Millis,
    ) -> Result<(), SimError> {
        self.billing.open(policy, tenants, now)
    }

    /// Called before a Submit is applied at `now`: the next `Submitted` (or `Rejected`) event
    /// is this request's.
    pub fn expect_submit(&mut self, spec: &RequestSpec, now: Millis) {
        let tenant = match self.tenants.get(&spec.tenant) {
            Some(&t) => t,
            None => {
                let t = self.tenant_names.len() as u32;
                self.tenants.insert(spec.tenant.clone(), t);
                self.tenant_names.push(spec.tenant.clone());
                t
            }
        };
        let models = self.model_mask(spec);
        let demand = self.waiting.intern(Demand {
            models,
            shape: spec.shape,
        });
        self.note_demand(spec, models, now);
        if self.window_start.is_none() {
            self.window_start = Some(now);
            self.timeline.start = now;
            self.next_sample = now;
            for a in self.area_list_mut() {
                a.last = now;
            }
        }
        self.pending = Some(JobRecord {
            submit: now,
            placed: None,
            end: 0,
            duration: spec.duration_ms,
            tenant,
            demand,
            requeues: 0,
            queued: false,
            fate: Fate::Live,
        });
    }

    /// Models a request accepts, as a mask of the layout's model bits.
    fn model_mask(&self, spec: &RequestSpec) -> u64 {
        if spec.constraints.models.is_empty() {
            u64::MAX
        } else {
            spec.constraints
                .models
                .iter()
                .filter_map(|m| self.model_bits.get(m))
                .fold(0u64, |mask, &i| mask | 1u64 << (i as u32 % 64))
        }
    }

    /// Counts an arrival's compute (TFLOPS x run time) in the offered load of the window.
    fn note_demand(&mut self, spec: &RequestSpec, models: u64, now: Millis) {
        if !self.measuring || now > self.window_end {
            return;
        }
        let tflops = match spec.shape {
            Shape::Elastic { tflops, .. } => tflops,
            // A gang's TFLOPS depend on the model placement picks; count its devices at the
            // smallest model it accepts.
            Shape::Gang {
                nodes,
                devices_per_node,
            } => {
                let smallest = (0..self.layout.model_tflops.len())
                    .filter(|&i| models & (1u64 << (i as u32 % 64)) != 0)
                    .map(|i| self.layout.model_tflops[i])
                    .min()
                    .unwrap_or(0);
                nodes as Tflops * devices_per_node as Tflops * smallest
            }
        };
        self.demanded_tflops_ms += tflops as u128 * spec.duration_ms as u128;
    }

    /// An arrival turned away because the queue was at its limit: offered, never submitted.
    pub fn turn_away(&mut self, spec: &RequestSpec, now: Millis) {
        self.turned_away += 1;
        if self.measuring && now <= self.window_end {
            self.turned_away_in_window += 1;
        }
        let models = self.model_mask(spec);
        self.note_demand(spec, models, now);
    }

    fn area_list_mut(&mut self) -> impl Iterator<Item = &mut Area> {
        [
            &mut self.allocated,
            &mut self.local,
            &mut self.queue,
            &mut self.in_system,
        ]
        .into_iter()
        .chain(self.pools.iter_mut())
        .chain(self.models.iter_mut())
    }

    /// Marks a pool lost or restored (lost pools hold no free devices for fragmentation).
    pub fn set_healthy(&mut self, pool: u32, healthy: bool) {
        if let Some(h) = self.healthy.get_mut(pool as usize) {
            *h = healthy;
        }
    }

    /// Ends the measurement window at `now` (the last arrival).
    pub fn close_window(&mut self, now: Millis) {
        if self.window_end == Millis::MAX {
            self.window_end = now;
        }
    }

    /// Samples fragmentation if a sample is due before `now`; the engine is in the state it
    /// held since the last event.
    pub fn sample_before(&mut self, now: Millis, engine: &Engine) {
        self.take_samples_before(now, engine);
        if !self.measuring && self.window_start.is_some() {
            let at = self.measure_start();
            if at <= now && at <= self.window_end {
                self.begin_measurement(at);
            }
        }
    }

    fn take_samples_before(&mut self, now: Millis, engine: &Engine) {
        if now <= self.next_sample || self.next_sample > self.window_end {
            return;
        }
        let (stranded_share, stranded_tflops) = if self.waiting.any() {
            let s = stranded(
                &self.layout,
                &engine.node_free_table(),
                &self.healthy,
                &self.waiting,
            );
            (
                (s.free > 0).then(|| s.stranded as f64 / s.free as f64),
                s.stranded_tflops,
            )
        } else {
            (None, 0)
        };
        // The state held over the whole gap, so one sample stands for every due instant.
        while self.next_sample < now && self.next_sample <= self.window_end {
            self.samples.push(Sample {
                at: self.next_sample,
                stranded_share,
                stranded_tflops,
                waiting: self.queue.value,
                allocated: self.allocated.value,
                demanded: self.demanded_tflops_ms,
            });
            self.next_sample += self.sample_every;
            if self.samples.len() >= MAX_SAMPLES {
                self.samples = self.samples.iter().step_by(2).copied().collect();
                self.sample_every *= 2;
            }
        }
    }

    /// Follows one event of a command applied at `now`; for a placement, returns when its
    /// lease ends.
    pub fn on_event(&mut self, event: &Event, now: Millis, engine: &Engine) -> Option<Millis> {
        self.last_event = self.last_event.max(now);
        let cut = self.window_end;
        match event {
            Event::Submitted { request } => {
                let mut job = self.pending.take().unwrap_or(JobRecord {
                    submit: now,
                    placed: None,
                    end: 0,
                    duration: 0,
                    tenant: 0,
                    demand: 0,
                    requeues: 0,
                    queued: false,
                    fate: Fate::Live,
                });
                job.queued = true;
                self.waiting.add(job.demand);
                self.live.insert(*request, self.jobs.len() as u32);
                self.jobs.push(job);
                self.queue.add(now, Millis::MAX, 1);
                self.in_system.add(now, Millis::MAX, 1);
            }
            Event::Rejected { .. } => match self.pending.take() {
                Some(mut job) => {
                    job.fate = Fate::Rejected;
                    self.jobs.push(job);
                }
                None => self.command_rejections += 1,
            },
            Event::Placed { request } => {
                let lease = engine.lease_groups(*request);
                let end = lease.as_ref().map(|l| l.end);
                let Some(&ix) = self.live.get(request) else {
                    return end;
                };
                self.unqueue(ix, now);
                let job = &mut self.jobs[ix as usize];
                job.placed.get_or_insert(now);
                let (tenant, attempt) = (job.tenant, u32::from(job.requeues) + 1);
                if let Some(lease) = lease {
                    let mut fp = Footprint {
                        parts: Vec::with_capacity(1),
                        tflops: 0,
                        local: 0,
                        start: now,
                        price_fen_per_hour: lease.price_fen_per_hour,
                        billed: Vec::with_capacity(1),
                        tenant,
                        attempt,
                    };
                    for part in lease.slices {
                        let Some((pool, group, model)) = self.place_of(engine, part.group) else {
                            continue;
                        };
                        if let Some(g) = group {
                            let devices = u64::from(part.devices);
                            match fp.billed.iter_mut().find(|b| b.0 == g) {
                                Some(b) => b.1 += devices,
                                None => fp.billed.push((g, devices)),
                            }
                        }
                        let t = part.devices as Tflops * self.layout.model_tflops[model as usize];
                        fp.tflops += t;
                        if self.layout.pool_local[pool as usize] {
                            fp.local += t;
                        }
                        match fp.parts.iter_mut().find(|p| p.0 == pool && p.1 == model) {
                            Some(p) => p.2 += t,
                            None => fp.parts.push((pool, model, t)),
                        }
                    }
                    self.hold(&fp, now, cut, true);
                    self.leases.insert(*request, fp);
                }
                return end;
            }
            Event::Requeued { request, .. } => {
                self.release(*request, now, cut);
                if let Some(&ix) = self.live.get(request) {
                    let job = &mut self.jobs[ix as usize];
                    job.requeues = job.requeues.saturating_add(1);
                    if !job.queued {
                        job.queued = true;
                        let demand = job.demand;
                        self.waiting.add(demand);
                        self.queue.add(now, Millis::MAX, 1);
                    }
                }
            }
            Event::Ended { request, state, .. } => {
                self.release(*request, now, cut);
                if let Some(ix) = self.live.remove(request) {
                    self.unqueue(ix, now);
                    let job = &mut self.jobs[ix as usize];
                    job.fate = Fate::Ended(*state);
                    job.end = now;
                    self.in_system.sub(now, Millis::MAX, 1);
                }
            }
            _ => {}
        }
        None
    }

    /// Where an engine node group is in the layout: its pool, its group (if the layout has
    /// it) and its model; `None` for a pool or model the layout does not know. Found by name
    /// once per group, not at every placement.
    fn place_of(&mut self, engine: &Engine, g: u32) -> Option<GroupPlace> {
        if let Some(&Some(known)) = self.group_places.get(g as usize) {
            return known;
        }
        let place = engine.group_place(g).and_then(|(pool, group, model)| {
            let pool = self.layout.pool(pool)?;
            let model = *self.model_bits.get(model)?;
            Some((pool, self.layout.group(pool, group), model))
        });
        if self.group_places.len() <= g as usize {
            self.group_places.resize(g as usize + 1, None);
        }
        // Groups are only ever added to the engine: what a number names does not change.
        self.group_places[g as usize] = Some(place);
        place
    }

    fn unqueue(&mut self, ix: u32, now: Millis) {
        let job = &mut self.jobs[ix as usize];
        if job.queued {
            job.queued = false;
            let demand = job.demand;
            self.waiting.remove(demand);
            self.queue.sub(now, Millis::MAX, 1);
        }
    }

    fn hold(&mut self, fp: &Footprint, now: Millis, cut: Millis, take: bool) {
        self.flush_timeline(now, cut);
        let apply = |a: &mut Area, v: u64| {
            if take {
                a.add(now, cut, v)
            } else {
                a.sub(now, cut, v)
            }
        };
        apply(&mut self.allocated, fp.tflops);
        apply(&mut self.local, fp.local);
        for &(pool, model, t) in &fp.parts {
            apply(&mut self.pools[pool as usize], t);
            apply(&mut self.models[model as usize], t);
        }
    }

    /// Adds the allocation held since the last change to the timeline, up to `now`.
    fn flush_timeline(&mut self, now: Millis, cut: Millis) {
        let from = self.allocated.last;
        if from < cut {
            self.timeline.add(from, now.min(cut), self.allocated.value);
        }
    }

    fn release(&mut self, request: RequestId, now: Millis, cut: Millis) {
        if let Some(fp) = self.leases.remove(&request) {
            self.hold(&fp, now, cut, false);
            self.settle(request, &fp, now, false);
        }
    }

    /// Charges a lease that ended (or is cut off by the end of the run, `open`) at `now`.
    fn settle(&mut self, request: RequestId, fp: &Footprint, now: Millis, open: bool) {
        self.cost_fen_ms += fp.price_fen_per_hour as u128 * (now - fp.start.min(now)) as u128;
        let tenant = self
            .tenant_names
            .get(fp.tenant as usize)
            .map_or("unknown", String::as_str);
        self.billing
            .settle(request, fp.attempt, tenant, fp.start, now, &fp.billed, open);
    }

    /// Jobs waiting now.
    pub fn waiting_count(&self) -> u64 {
        self.queue.value
    }

    /// Ids of requests still waiting, ascending.
    pub fn waiting_requests(&self) -> Vec<RequestId> {
        let mut ids: Vec<RequestId> = self
            .live
            .iter()
            .filter(|(_, ix)| self.jobs[**ix as usize].queued)
            .map(|(&id, _)| id)
            .collect();
        ids.sort_unstable();
        ids
    }
}

/// The figures of one run. Field names are the keys of `suanli sim --json`.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct Summary {
    /// Fleet name.
    pub fleet: String,
    /// Workload name.
    pub workload: String,
    /// Default placement policy of the engine.
    pub policy: String,
    /// Seed of the synthetic workload and of pool failures.
    pub seed: u64,
    /// Arrival times were divided by this.
    pub load_factor: f64,
    /// Device counts were multiplied by this.
    pub size_factor: f64,
    /// TFLOPS of one device of a job naming no model.
    pub reference_tflops: u64,
    /// Passes came at multiples of this many milliseconds (absent: at every event that called
    /// for one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tick_interval_ms: Option<u64>,
    /// Whether every pass was a full one (see [`crate::SimConfig::full_passes`]).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub full_passes: bool,
    /// Scheduling passes over every waiting request.
    pub passes_full: u64,
    /// Scheduling passes over the requests whose answer could have changed.
    pub passes_incremental: u64,
    /// Requests tried by the passes, in all.
    pub requests_tried: u64,
    /// Rated capacity of the fleet, in P.
    pub capacity_p: f64,
    /// Compute the jobs arriving in the window asked for (TFLOPS x run time) over the window's
    /// length, in P: the demand offered to the fleet.
    pub offered_p: f64,
    /// Jobs in the workload (after skipped rows).
    pub jobs: u64,
    /// Jobs the engine accepted.
    pub submitted: u64,
    /// Jobs the engine refused (for example, larger than any tenant may hold).
    pub rejected: u64,
    /// Jobs placed at least once.
    pub placed: u64,
    /// Jobs that ran to their end.
    pub completed: u64,
    /// Jobs that failed (for example, a deadline that could no longer be met).
    pub failed: u64,
    /// Jobs still waiting when nothing else could happen (no lease left to end), withdrawn at
    /// the end of the run: their demand can never be met by this fleet.
    pub unserved: u64,
    /// Jobs preempted or lost for good (jobs ask to be requeued, so normally 0).
    pub preempted_or_lost: u64,
    /// Times a lease was preempted or lost and its job went back to the queue.
    pub requeues: u64,
    /// Trace rows left out with `--skip-bad-rows`.
    pub skipped_rows: u64,
    /// Whether arrivals were stopped because too many jobs waited (see `max_waiting`).
    pub saturated: bool,
    /// Jobs of the workload not fed because the run was stopped as saturated.
    pub not_submitted: u64,
    /// Arrivals turned away because the queue was at its limit (see `queue_limit`).
    #[serde(skip_serializing_if = "is_zero")]
    pub turned_away: u64,
    /// Of the arrivals in the measurement window, the share turned away.
    #[serde(skip_serializing_if = "is_zero_f64")]
    pub turned_away_share: f64,
    /// From the first arrival to the start of the measurement window, hours (0: no warm-up).
    #[serde(skip_serializing_if = "is_zero_f64")]
    pub warmup_h: f64,
    /// Length of the measurement window (from the first arrival, or the end of the warm-up,
    /// to the last arrival), hours.
    pub window_h: f64,
    /// Whether the window measured a steady state (see the module documentation).
    pub steadiness: Steadiness,
    /// From the first arrival to the last event, hours.
    pub makespan_h: f64,
    /// Time-weighted share of the fleet's TFLOPS held by leases over the window.
    pub utilisation: f64,
    /// The same for local pools.
    pub utilisation_local: f64,
    /// The same for external pools.
    pub utilisation_external: f64,
    /// By accelerator model (models the fleet has).
    pub utilisation_by_model: BTreeMap<String, f64>,
    /// By pool id.
    pub utilisation_by_pool: BTreeMap<String, f64>,
    /// Mean wait from arrival to first placement, seconds.
    pub wait_mean_s: f64,
    /// Median wait.
    pub wait_p50_s: f64,
    /// 95th percentile wait.
    pub wait_p95_s: f64,
    /// 99th percentile wait.
    pub wait_p99_s: f64,
    /// Longest wait.
    pub wait_max_s: f64,
    /// Mean job completion time of completed jobs, seconds.
    pub jct_mean_s: f64,
    /// Median job completion time.
    pub jct_p50_s: f64,
    /// 99th percentile job completion time.
    pub jct_p99_s: f64,
    /// Mean bounded slowdown of completed jobs.
    pub bounded_slowdown_mean: f64,
    /// Jain's index over tenants' shares of speed (see the module documentation).
    pub jain_fairness: f64,
    /// Mean share of free devices no waiting request could use (see `fragmentation`).
    pub fragmentation: f64,
    /// Samples behind `fragmentation` (instants with a waiting request and a free device).
    pub fragmentation_samples: u64,
    /// Mean capacity of stranded free devices over all samples of the window (0 while nothing
    /// waits), in P: compute idle while work waits.
    pub stranded_p: f64,
    /// Time-averaged number of waiting jobs over the run.
    pub queue_mean: f64,
    /// Time-averaged number of jobs in the system (waiting or running) over the run.
    pub in_system_mean: f64,
    /// Accepted jobs per hour over the run.
    pub arrival_rate_per_h: f64,
    /// The subsidy policy (`null`: none, no voucher was issued).
    pub subsidy_policy: Option<String>,
    /// What the leases cost, by the billing rules, in yuan (see the module documentation).
    pub cost_yuan: f64,
    /// What the vouchers paid of it: what the subsidy policy cost the district, in yuan.
    pub subsidy_yuan: f64,
    /// What the tenants paid themselves, in yuan: `cost_yuan - subsidy_yuan`.
    pub tenant_paid_yuan: f64,
    /// `cost_yuan` in fen, exact.
    pub cost_fen: i64,
    /// `subsidy_yuan` in fen, exact.
    pub subsidy_fen: i64,
    /// `tenant_paid_yuan` in fen, exact: `cost_fen = subsidy_fen + tenant_paid_fen`.
    pub tenant_paid_fen: i64,
    /// Subsidy by pool kind (`local_centre`, `local_cloud`, `external`), in yuan.
    pub subsidy_by_pool_kind: BTreeMap<String, f64>,
    /// Share of the cost the district paid: `subsidy_fen / cost_fen` (0 without cost).
    pub subsidy_share: f64,
    /// Face value of all vouchers issued, in yuan (`null` when unlimited or no policy).
    pub vouchers_face_yuan: Option<f64>,
    /// Vouchers issued (one per tenant under a policy).
    pub vouchers_issued: u64,
    /// Vouchers with nothing left at the end of the run.
    pub vouchers_exhausted: u64,
    /// Lease attempts settled (charged).
    pub leases_settled: u64,
    /// Of those, leases still held when the run ended, settled at its end time.
    pub leases_open_at_end: u64,
    /// The cost without rounding: each lease's price per hour fixed by the engine times the
    /// time held, in yuan. A cross-check of `cost_yuan`, which it differs from by at most half
    /// a fen per lease part; not in the JSON.
    #[serde(skip)]
    pub cost_unrounded_yuan: f64,
    /// Commands other than submissions that the engine rejected (0 in a sound run).
    pub command_rejections: u64,
    /// The engine's digest at the end of the run (hex).
    pub digest: String,
}

fn is_zero(x: &u64) -> bool {
    *x == 0
}

fn is_zero_f64(x: &f64) -> bool {
    *x == 0.0
}

/// The series behind the charts.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Series {
    /// (hours since the first arrival, utilisation) per timeline bucket of the window.
    pub utilisation: Vec<(f64, f64)>,
    /// (wait in seconds, share of placed jobs that waited at most that long), 201 points.
    pub wait_cdf: Vec<(f64, f64)>,
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn mean(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        0.0
    } else {
        xs.iter().sum::<f64>() / xs.len() as f64
    }
}

fn ratio(num: u128, den: u128) -> f64 {
    if den == 0 {
        0.0
    } else {
        num as f64 / den as f64
    }
}

impl Recorder {
    /// Closes the books at `end` (the last event) and computes the summary and the series;
    /// an error only if the accounts overflowed.
    pub fn finish(&mut self, end: Millis) -> Result<(Summary, Series), SimError> {
        let start = self.window_start.unwrap_or(0);
        let end = end.max(self.last_event).max(start);
        // Leases still held are settled at the end, in request order (vouchers pay in the
        // order of settlement).
        let mut open: Vec<(RequestId, Footprint)> = self.leases.drain().collect();
        open.sort_unstable_by_key(|(id, _)| *id);
        for (request, fp) in &open {
            self.settle(*request, fp, end, true);
        }
        let billing = self.billing.figures()?;
        self.close_window(end);
        let cut = self.window_end;
        // The window: from the end of the warm-up (empty if the arrivals stopped before it).
        let measured_from = self.measure_start().min(cut);
        if !self.measuring {
            self.begin_measurement(measured_from);
        }
        self.flush_timeline(cut, cut);
        for a in self.area_list_mut() {
            a.advance(cut, cut);
        }
        self.queue.advance(end, Millis::MAX);
        self.in_system.advance(end, Millis::MAX);
        let window = (cut - measured_from).max(1) as u128;
        let run = (end - start).max(1) as u128;
        let l = &self.layout;
        let mut s = Summary {
            capacity_p: l.capacity as f64 / 1000.0,
            // One arrival instant has no rate: no offered load.
            offered_p: if cut > measured_from {
                ratio(self.demanded_tflops_ms, window) / 1000.0
            } else {
                0.0
            },
            warmup_h: (measured_from - start) as f64 / 3.6e6,
            window_h: (cut - measured_from) as f64 / 3.6e6,
            turned_away: self.turned_away,
            steadiness: Steadiness::of(&self.samples, l.capacity, self.turned_away_in_window > 0),
            makespan_h: (end - start) as f64 / 3.6e6,
            utilisation: ratio(self.allocated.area, l.capacity as u128 * window),
            utilisation_local: ratio(self.local.area, l.local_capacity as u128 * window),
            utilisation_external: ratio(
                self.allocated.area - self.local.area.min(self.allocated.area),
                (l.capacity - l.local_capacity) as u128 * window,
            ),
            queue_mean: ratio(self.queue.area, run),
            in_system_mean: ratio(self.in_system.area, run),
            cost_unrounded_yuan: ratio(self.cost_fen_ms, 3_600_000 * 100),
            command_rejections: self.command_rejections,
            ..Summary::default()
        };
        for (i, a) in self.models.iter().enumerate() {
            if l.model_capacity[i] > 0 {
                s.utilisation_by_model.insert(
                    l.model_ids[i].clone(),
                    ratio(a.area, l.model_capacity[i] as u128 * window),
                );
            }
        }
        for (i, a) in self.pools.iter().enumerate() {
            s.utilisation_by_pool.insert(
                l.pool_ids[i].clone(),
                ratio(a.area, l.pool_capacity[i] as u128 * window),
            );
        }
        let mut waits = Vec::new();
        let mut jcts = Vec::new();
        let mut slowdowns = Vec::new();
        let mut tenant_slowdown = vec![(0.0f64, 0u64); self.tenant_names.len()];
        let mut arrived_in_window = self.turned_away_in_window;
        for j in &self.jobs {
            s.jobs += 1;
            // Counts cover the run; the figures of jobs, the jobs arriving in the window.
            let measured = j.submit >= measured_from && j.submit <= cut;
            arrived_in_window += u64::from(measured);
            match j.fate {
                Fate::Rejected => {
                    s.rejected += 1;
                    continue;
                }
                Fate::Live => {}
                Fate::Ended(RequestState::Completed) => {
                    s.completed += 1;
                    if measured {
                        let jct = (j.end - j.submit) as f64;
                        let bsd = (jct / j.duration.max(SLOWDOWN_BOUND_MS) as f64).max(1.0);
                        jcts.push(jct / 1000.0);
                        slowdowns.push(bsd);
                        if let Some(t) = tenant_slowdown.get_mut(j.tenant as usize) {
                            t.0 += bsd;
                            t.1 += 1;
                        }
                    }
                }
                Fate::Ended(RequestState::Failed) => s.failed += 1,
                Fate::Ended(RequestState::Cancelled) => s.unserved += 1,
                Fate::Ended(_) => s.preempted_or_lost += 1,
            }
            s.submitted += 1;
            s.requeues += j.requeues as u64;
            if let Some(p) = j.placed {
                s.placed += 1;
                if measured {
                    waits.push((p - j.submit) as f64 / 1000.0);
                }
            }
        }
        s.turned_away_share = ratio(
            u128::from(self.turned_away_in_window),
            u128::from(arrived_in_window),
        );
        s.arrival_rate_per_h = s.submitted as f64 / (run as f64 / 3.6e6);
        waits.sort_by(f64::total_cmp);
        jcts.sort_by(f64::total_cmp);
        s.wait_mean_s = mean(&waits);
        s.wait_p50_s = percentile(&waits, 0.50);
        s.wait_p95_s = percentile(&waits, 0.95);
        s.wait_p99_s = percentile(&waits, 0.99);
        s.wait_max_s = waits.last().copied().unwrap_or(0.0);
        s.jct_mean_s = mean(&jcts);
        s.jct_p50_s = percentile(&jcts, 0.50);
        s.jct_p99_s = percentile(&jcts, 0.99);
        s.bounded_slowdown_mean = mean(&slowdowns);
        let shares: Vec<f64> = tenant_slowdown
            .iter()
            .filter(|t| t.1 > 0)
            .map(|t| t.1 as f64 / t.0)
            .collect();
        let sum: f64 = shares.iter().sum();
        let squares: f64 = shares.iter().map(|x| x * x).sum();
        s.jain_fairness = if shares.is_empty() {
            1.0
        } else {
            sum * sum / (shares.len() as f64 * squares)
        };
        self.bill_into(&mut s, &billing);
        let fragments: Vec<f64> = self
            .samples
            .iter()
            .filter_map(|x| x.stranded_share)
            .collect();
        s.fragmentation = mean(&fragments);
        let stranded: Vec<f64> = self
            .samples
            .iter()
            .map(|x| x.stranded_tflops as f64 / 1000.0)
            .collect();
        s.stranded_p = mean(&stranded);
        s.fragmentation_samples = fragments.len() as u64;

        let tl = &self.timeline;
        let utilisation = tl
            .buckets
            .iter()
            .enumerate()
            .map(|(i, area)| {
                let from = tl.start + i as Millis * tl.step;
                let len = (from + tl.step).min(cut).saturating_sub(from).max(1);
                (
                    (from - start) as f64 / 3.6e6,
                    ratio(*area, l.capacity as u128 * len as u128),
                )
            })
            .collect();
        let wait_cdf = if waits.is_empty() {
            Vec::new()
        } else {
            (0..=200)
                .map(|i| {
                    let q = i as f64 / 200.0;
                    (percentile(&waits, q), q)
                })
                .collect()
        };
        Ok((
            s,
            Series {
                utilisation,
                wait_cdf,
            },
        ))
    }

    fn bill_into(&self, s: &mut Summary, b: &BillingFigures) {
        let yuan = |f: suanli_billing::Fen| f.fen() as f64 / 100.0;
        let policy = self.billing.policy();
        s.subsidy_policy = policy.map(|p| p.to_string());
        s.cost_yuan = yuan(b.cost);
        s.subsidy_yuan = yuan(b.subsidy);
        s.tenant_paid_yuan = yuan(b.tenant_paid);
        s.cost_fen = b.cost.fen();
        s.subsidy_fen = b.subsidy.fen();
        s.tenant_paid_fen = b.tenant_paid.fen();
        s.subsidy_by_pool_kind = POOL_KINDS
            .iter()
            .zip(b.subsidy_by_kind)
            .map(|(k, f)| (k.as_str().to_string(), yuan(f)))
            .collect();
        s.subsidy_share = ratio(b.subsidy.fen().max(0) as u128, b.cost.fen().max(0) as u128);
        s.vouchers_face_yuan = policy
            .and_then(|p| p.per_tenant)
            .map(|face| face.fen() as f64 * b.vouchers_issued as f64 / 100.0);
        s.vouchers_issued = b.vouchers_issued;
        s.vouchers_exhausted = b.vouchers_exhausted;
        s.leases_settled = b.leases;
        s.leases_open_at_end = b.open_at_end;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_take_the_nearest_rank() {
        let xs: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&xs, 0.5), 50.0);
        assert_eq!(percentile(&xs, 0.99), 99.0);
        assert_eq!(percentile(&xs, 1.0), 100.0);
        assert_eq!(percentile(&xs, 0.0), 1.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }

    #[test]
    fn timeline_buckets_coarsen_and_keep_the_area() {
        let mut t = Timeline {
            start: 0,
            step: 10,
            buckets: Vec::new(),
        };
        t.add(0, 25, 4);
        assert_eq!(t.buckets, [40, 40, 20]);
        t.add(25, 10 * MAX_BUCKETS as Millis + 5, 1);
        assert_eq!(t.step, 20);
        let total: u128 = t.buckets.iter().sum();
        assert_eq!(total, 100 + (10 * MAX_BUCKETS as u128 + 5 - 25));
    }

    fn samples(points: &[(u64, Tflops)]) -> Vec<Sample> {
        points
            .iter()
            .enumerate()
            .map(|(i, &(waiting, allocated))| Sample {
                at: i as Millis * 3_600_000,
                stranded_share: None,
                stranded_tflops: 0,
                waiting,
                allocated,
                demanded: 0,
            })
            .collect()
    }

    /// Four hourly samples of (waiting, allocated) `first`, then four of `second`.
    fn halves(first: (u64, Tflops), second: (u64, Tflops)) -> Vec<Sample> {
        samples(&[first, first, first, first, second, second, second, second])
    }

    #[test]
    fn steadiness_tells_a_level_window_from_a_filling_or_saturated_one() {
        // Utilisation 70% +- 2 points, a queue of 5 +- 3.
        let level = samples(&[(5, 700), (8, 720), (2, 690), (5, 700), (6, 710), (4, 680)]);
        let level: Vec<Sample> = level.iter().chain(&level).copied().collect();
        assert_eq!(Steadiness::of(&level, 1000, false), Steadiness::Steady);
        // Arrivals turned away in the window: saturated, whatever the samples say.
        assert_eq!(Steadiness::of(&level, 1000, true), Steadiness::Saturated);
        // Utilisation from 50% to 70%: still filling.
        let filling = halves((0, 500), (0, 700));
        assert_eq!(Steadiness::of(&filling, 1000, false), Steadiness::Filling);
        // The same rise while the offered load rose as much (500 then 700 TFLOPS): following
        // a burst of arrivals is not filling up.
        let mut following = filling.clone();
        let hour = 3_600_000u128;
        for (i, s) in following.iter_mut().enumerate() {
            let i = i as u128;
            s.demanded = 500 * hour * i.min(4) + 700 * hour * i.saturating_sub(4);
        }
        assert_eq!(Steadiness::of(&following, 1000, false), Steadiness::Steady);
        // Utilisation up by exactly 5 points: steady.
        let flat = halves((0, 500), (0, 550));
        assert_eq!(Steadiness::of(&flat, 1000, false), Steadiness::Steady);
        // A queue from 100 to 300 at full use: saturated.
        let growing = halves((100, 990), (300, 990));
        assert_eq!(Steadiness::of(&growing, 1000, false), Steadiness::Saturated);
        // A queue from 2 to 12 is noise, not growth (at most twice the first half plus 10).
        let small = halves((2, 990), (12, 990));
        assert_eq!(Steadiness::of(&small, 1000, false), Steadiness::Steady);
        assert_eq!(
            Steadiness::of(&level[..7], 1000, false),
            Steadiness::TooShort
        );
    }
}
