//! The discrete-event loop: arrivals, lease ends, pool failures and recoveries, and ticks, on a
//! virtual clock.
//!
//! At each instant, in this order: pools fail or come back; if a lease ends, a deadline can no
//! longer be met, or a pool changed, the engine ticks (expiring leases and scheduling what
//! waits); then the jobs arriving at that instant are submitted, and if one of them had to
//! queue, the engine ticks once more so it is tried at once (the broker ticks within a few
//! milliseconds; the simulator's tick comes without that delay, and walks its whole pass at
//! once). Placed leases are confirmed at once and run exactly their duration. The loop ends when
//! nothing is left to happen; jobs still waiting then can never be placed and are withdrawn
//! (counted as unserved).
//!
//! With [`SimConfig::tick_interval_ms`] set, the ticks those events call for come at the next
//! multiple of the interval instead, one for all of them: a lease then holds its capacity until
//! that tick, and a queued job waits for it. This models a scheduler that runs at an interval
//! (as Slurm's backfill does); it is no longer needed for speed, since a pass at every event
//! tries only the requests whose answer could have changed.
//!
//! Every decision is the engine's: the loop only chooses *when* to apply commands.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use suanli_core::engine::Command;
use suanli_core::{Catalogue, Engine, EngineConfig, Fleet, Millis, Policy, TenantSpec, Tflops};

use crate::accounts::SubsidyPolicy;
use crate::driver::{Driver, Finished};
use crate::error::SimError;
use crate::job::{RequestBuilder, RequestRule};
use crate::layout::Layout;
use crate::workload::Workload;

/// Random pool failures: each pool fails after an exponential time with mean `mtbf_h` hours
/// and comes back after an exponential time with mean `mttr_h` hours. No new failure starts
/// after the last arrival.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Failures {
    /// Mean time between failures of one pool, hours.
    pub mtbf_h: f64,
    /// Mean time to repair, hours.
    pub mttr_h: f64,
}

/// Settings of one run.
#[derive(Clone, Debug, PartialEq)]
pub struct SimConfig {
    /// The engine's default placement policy.
    pub policy: Policy,
    /// How jobs become requests, and the load and size factors.
    pub rule: RequestRule,
    /// Seed of pool failures (the synthetic workload has its own, set when it is built).
    pub seed: u64,
    /// Optional pool failures.
    pub failures: Option<Failures>,
    /// Keep every applied command (for [`crate::replay`]).
    pub record_commands: bool,
    /// Stop feeding arrivals once more jobs than this wait: the fleet is saturated, and every
    /// scheduling pass would walk an ever longer queue. `None` = feed the whole workload.
    pub max_waiting: Option<u64>,
    /// Turn away the jobs that arrive while this many wait, as the broker refuses submissions
    /// beyond its `max_waiting`, and go on with the rest: a saturated fleet then stays
    /// saturated, with a bounded queue, for as long as jobs arrive. `None` = no limit.
    pub queue_limit: Option<u64>,
    /// Measure from this long after the first arrival, so that the figures describe the
    /// fleet once filled rather than while it fills (see [`crate::metrics`]). 0 = from the
    /// first arrival.
    pub warmup_ms: Millis,
    /// The voucher every tenant receives at the start, valid for the whole run; `None` = no
    /// subsidy (leases are still charged). See [`crate::accounts`].
    pub subsidy: Option<SubsidyPolicy>,
    /// Schedule at multiples of this many milliseconds rather than at every event that calls
    /// for a pass (see the module documentation). `None` = at every such event.
    pub tick_interval_ms: Option<Millis>,
    /// Make every scheduling pass a full one, over every waiting request, instead of trying
    /// only what could have changed: the same decisions, slower; for comparison.
    pub full_passes: bool,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            policy: Policy::default(),
            rule: RequestRule::default(),
            seed: 1,
            failures: None,
            record_commands: false,
            max_waiting: None,
            queue_limit: None,
            warmup_ms: 0,
            subsidy: None,
            tick_interval_ms: None,
            full_passes: false,
        }
    }
}

/// Notes a tick `called` for at `now`, due at once or at the next multiple of the interval,
/// and makes the tick noted when it is due.
fn tick_when_due(
    driver: &mut Driver,
    tick_at: &mut Option<Millis>,
    called: bool,
    interval: Option<Millis>,
    now: Millis,
) {
    if called {
        let at = match interval {
            Some(i) if i > 1 => now.div_ceil(i).saturating_mul(i),
            _ => now,
        };
        *tick_at = Some(tick_at.map_or(at, |t| t.min(at)));
    }
    if tick_at.is_some_and(|at| at <= now) {
        *tick_at = None;
        driver.tick(now);
    }
}

/// A pool failing (`true`) or coming back.
type PoolEvent = Reverse<(Millis, u32, bool)>;

fn exp_ms(rng: &mut ChaCha8Rng, mean_h: f64) -> Millis {
    let u: f64 = 1.0 - rng.random::<f64>();
    (-u.ln() * mean_h * 3.6e6).max(1.0) as Millis
}

/// Runs a workload on a fleet and returns its figures.
pub fn simulate(
    fleet: &Fleet,
    catalogue: &Catalogue,
    workload: Workload,
    config: &SimConfig,
) -> Result<Finished, SimError> {
    config.rule.validate(catalogue)?;
    if config.queue_limit == Some(0) {
        return Err(SimError::option(
            "queue_limit",
            "must let at least one job wait",
        ));
    }
    if let Some(f) = config.failures
        && !(f.mtbf_h.is_finite() && f.mtbf_h > 0.0 && f.mttr_h.is_finite() && f.mttr_h > 0.0)
    {
        return Err(SimError::option(
            "failures",
            "mean times between failures and to repair must be positive",
        ));
    }
    let engine = Engine::with_fleet(
        EngineConfig {
            default_policy: config.policy,
            incremental: !config.full_passes,
            ..EngineConfig::default()
        },
        catalogue.clone(),
        fleet,
    )?;
    let layout = Layout::new(fleet, catalogue);
    let capacity: Tflops = layout.capacity;
    let mut driver = Driver::new(engine, layout, true, config.record_commands);
    driver.recorder_mut().measure_after(config.warmup_ms);
    // Quotas are not the question here: every tenant may hold the whole fleet, with equal weight.
    for tenant in &workload.tenants {
        let spec = TenantSpec {
            name: tenant.clone(),
            quota_tflops: capacity.max(1),
            borrow_limit_tflops: None,
            weight: 1,
        };
        if driver.apply(Command::SetTenant(spec), 0).rejected {
            return Err(SimError::option(
                "tenant",
                format!("the engine refused tenant {tenant:?}"),
            ));
        }
    }
    let builder = RequestBuilder::new(catalogue, &config.rule);
    let skipped = workload.skipped.len() as u64;
    let name = workload.name.clone();
    let tenants = workload.tenants;
    let mut jobs = workload
        .jobs
        .map(|mut j| {
            config.rule.scale(&mut j);
            j
        })
        .peekable();

    let mut rng = ChaCha8Rng::seed_from_u64(config.seed ^ 0x5eed_fa11);
    let mut pool_events: BinaryHeap<PoolEvent> = BinaryHeap::new();
    let first = jobs.peek().map_or(0, |j| j.submit_ms);
    if let Some(policy) = &config.subsidy {
        driver
            .recorder_mut()
            .open_subsidy(policy, &tenants, first)?;
        // Placement sees each voucher's rate and scope: the policy "cheapest after subsidy"
        // ranks pools by what the tenant pays there.
        let vouchers = driver.recorder_mut().billing().vouchers().to_vec();
        for v in vouchers {
            let set = Command::SetSubsidies {
                tenant: v.spec.tenant.clone(),
                subsidies: vec![v.as_subsidy()],
            };
            if driver.apply(set, first).rejected {
                return Err(SimError::option(
                    "subsidy",
                    format!(
                        "the engine refused the subsidy of tenant {:?}",
                        v.spec.tenant
                    ),
                ));
            }
        }
    }
    if let Some(f) = config.failures {
        for p in 0..fleet.pools.len() as u32 {
            pool_events.push(Reverse((first + exp_ms(&mut rng, f.mtbf_h), p, true)));
        }
    }
    let mut deadlines: BinaryHeap<Reverse<Millis>> = BinaryHeap::new();
    let mut arrivals_over = false;
    let mut saturated = false;
    let mut not_submitted = 0;
    let mut now = first;
    // The tick called for and not yet made.
    let mut tick_at: Option<Millis> = None;
    loop {
        let next_arrival = jobs.peek().map(|j| j.submit_ms);
        let next_pool = pool_events.peek().map(|r| r.0.0);
        let Some(t) = [
            next_arrival,
            driver.next_lease_end(),
            next_pool,
            deadlines.peek().map(|r| r.0),
            tick_at,
        ]
        .into_iter()
        .flatten()
        .min() else {
            break;
        };
        now = now.max(t);
        driver.advance_to(now);

        let mut tick = driver.pop_lease_ends(now);
        while deadlines.peek().is_some_and(|r| r.0 <= now) {
            deadlines.pop();
            tick = true;
        }
        while let Some(&Reverse((at, pool, fails))) = pool_events.peek() {
            if at > now {
                break;
            }
            pool_events.pop();
            let (Some(f), Some(spec)) = (config.failures, fleet.pools.get(pool as usize)) else {
                continue;
            };
            let id = spec.id.clone();
            let command = if fails {
                Command::LosePool { pool: id }
            } else {
                Command::RestorePool { pool: id }
            };
            driver.apply(command, now);
            driver.recorder_mut().set_healthy(pool, !fails);
            let (mean_h, next_fails) = if fails {
                (f.mttr_h, false)
            } else {
                (f.mtbf_h, true)
            };
            if !(next_fails && arrivals_over) {
                pool_events.push(Reverse((now + exp_ms(&mut rng, mean_h), pool, next_fails)));
            }
            tick = true;
        }
        tick_when_due(
            &mut driver,
            &mut tick_at,
            tick,
            config.tick_interval_ms,
            now,
        );

        let mut queued = false;
        while jobs.peek().is_some_and(|j| j.submit_ms <= now) {
            let Some(job) = jobs.next() else { break };
            let tenant = tenants
                .get(job.tenant as usize)
                .map_or("unknown", String::as_str);
            let spec = builder.request(&job, tenant, now);
            if config
                .queue_limit
                .is_some_and(|limit| driver.recorder_mut().waiting_count() >= limit)
            {
                driver.recorder_mut().turn_away(&spec, now);
                continue;
            }
            if let Some(deadline) = spec.deadline_ms {
                // The instant the job can no longer make its deadline if it has not started.
                deadlines.push(Reverse(
                    deadline.saturating_sub(spec.duration_ms).saturating_add(1),
                ));
            }
            queued |= driver.apply(Command::Submit(spec), now).queued;
        }
        if !arrivals_over
            && config
                .max_waiting
                .is_some_and(|max| driver.recorder_mut().waiting_count() > max)
        {
            saturated = true;
            not_submitted = jobs.by_ref().count() as u64;
        }
        if jobs.peek().is_none() && !arrivals_over {
            arrivals_over = true;
            driver.recorder_mut().close_window(now);
            // No new failure after the last arrival; pending recoveries still happen.
            pool_events.retain(|r| !r.0.2);
        }
        tick_when_due(
            &mut driver,
            &mut tick_at,
            queued,
            config.tick_interval_ms,
            now,
        );
    }
    let mut finished = driver.finish(now)?;
    let s = &mut finished.summary;
    s.fleet = fleet.name.clone();
    s.workload = name;
    s.policy = config.policy.as_str().to_string();
    s.seed = config.seed;
    s.load_factor = config.rule.load_factor;
    s.size_factor = config.rule.size_factor;
    s.reference_tflops = config.rule.reference_tflops;
    s.tick_interval_ms = config.tick_interval_ms;
    s.full_passes = config.full_passes;
    s.skipped_rows = skipped;
    s.saturated = saturated;
    s.not_submitted = not_submitted;
    Ok(finished)
}
