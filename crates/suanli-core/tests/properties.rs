//! Properties of the engine over random fleets, tenants and command sequences, checked through
//! the public API and [`Engine::audit`] after every command.
//!
//! A scenario is a small fleet (1 to 6 pools of 1 to 3 node groups), 1 to 4 tenants and 30 to 150
//! steps. Each step advances the clock and applies one command: submissions of gangs and elastic
//! requests (some invalid, impossible or beyond quota), cancels, releases, start and end reports
//! of known and unknown requests, ticks, pool and node health changes and pool updates.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use proptest::sample::{Index, select, subsequence};
use proptest::test_runner::{FileFailurePersistence, TestCaseError};
use suanli_core::engine::MAX_DURATION_MS;
use suanli_core::{
    Catalogue, Command, Constraints, EndReason, Engine, EngineConfig, Event, GroupSpec, JobCause,
    JobOutcome, PoolHealth, PoolKind, PoolSpec, Priority, RequestId, RequestSpec, RequestState,
    Runtimes, Shape, Subsidy, SubsidyPools, TenantSpec, WaitReason, Workload,
};

const FLEET_MODELS: [&str; 4] = ["h100", "a800", "rtx4090", "ascend-910b"];
/// Models a request may name: those of the fleet, two the fleet never has, one unknown.
const ASKED_MODELS: [&str; 7] = [
    "h100",
    "a800",
    "rtx4090",
    "ascend-910b",
    "h800",
    "mi300x",
    "z9",
];
const REGIONS: [&str; 4] = [
    "guangdong-shenzhen",
    "guizhou-guiyang",
    "inner-mongolia-hohhot",
    "gansu-qingyang",
];
const ZONES: [&str; 2] = ["mainland", "hetao"];

#[derive(Clone, Debug)]
struct Scenario {
    policy: suanli_core::Policy,
    /// Small slices make every pass over a few requests go on across ticks.
    pass_slice: u32,
    pools: Vec<PoolSpec>,
    tenants: Vec<TenantSpec>,
    steps: Vec<Step>,
}

/// Advance the clock by `dt` milliseconds, then apply the command `op` stands for.
#[derive(Clone, Debug)]
struct Step {
    dt: u64,
    op: Op,
}

#[derive(Clone, Debug)]
enum Op {
    Submit(Box<SubmitOp>),
    Tick,
    Request(RequestOp, IdRef),
    Pool(PoolOp, Pick),
    Update(UpdateOp),
    /// A node of a pool (group and node taken modulo what the pool has, one past the end now
    /// and then) goes out of service or comes back.
    Node {
        pool: Pick,
        group: u32,
        node: u32,
        healthy: bool,
    },
    /// A tenant's vouchers as placement sees them are set (rates of 0 are refused), by pool
    /// kind, by one pool, or everywhere; none clears them.
    Subsidies(Pick, Vec<(u32, SubsidyScopeOp)>),
    /// A pool's agent announces what it runs (bit 0: commands, bit 1: containers).
    Runtimes(Pick, u8),
}

#[derive(Clone, Debug)]
enum SubsidyScopeOp {
    All,
    Local,
    Pool(Pick),
}

#[derive(Clone, Copy, Debug)]
enum RequestOp {
    Cancel,
    Release,
    Started,
    Finished { failed: bool },
}

#[derive(Clone, Copy, Debug)]
enum PoolOp {
    Drain,
    Undrain,
    Lose,
    Restore,
}

/// One of the tenants or pools, or (`None`) one the engine does not know.
type Pick = Option<Index>;

fn pick<'a, T>(p: &Pick, among: &'a [T]) -> Option<&'a T> {
    p.as_ref()
        .filter(|_| !among.is_empty())
        .map(|ix| ix.get(among))
}

fn pick_strategy() -> impl Strategy<Value = Pick> {
    prop_oneof![1 => Just(None), 12 => any::<Index>().prop_map(Some)]
}

/// Which request a command names.
#[derive(Clone, Debug)]
enum IdRef {
    /// One of the live requests.
    Live(Index),
    /// Any request ever submitted, most of them ended.
    Seen(Index),
    /// An id the engine never gave.
    Unknown,
}

#[derive(Clone, Debug)]
enum StartAfter {
    /// This long before now.
    Past(u64),
    /// This long after now.
    In(u64),
    /// The end of time.
    Never,
}

#[derive(Clone, Debug)]
enum Deadline {
    /// This long after the earliest possible end.
    Slack(u64),
    /// This long before the earliest possible end: rejected.
    TooEarly(u64),
    /// The end of time.
    Never,
}

#[derive(Clone, Debug)]
struct SubmitOp {
    tenant: Pick,
    shape: Shape,
    duration_ms: u64,
    priority: Priority,
    constraints: Constraints,
    /// Restrict to one pool.
    in_pool: Option<Pick>,
    policy: Option<suanli_core::Policy>,
    start_after: Option<StartAfter>,
    deadline: Option<Deadline>,
    requeue: bool,
    /// A job to run: a command, or (true) a container image.
    workload: Option<bool>,
}

#[derive(Clone, Debug)]
struct UpdateOp {
    pool: Pick,
    /// Nodes added to each group, by group index.
    grow: Vec<u32>,
    /// Remove the last node of the first group (refused when it holds leases).
    shrink_first: bool,
    price: Option<u64>,
    rtt_ms: Option<u32>,
    region: Option<&'static str>,
    data_zone: Option<&'static str>,
}

// ----- strategies -----

fn group_spec() -> impl Strategy<Value = GroupSpec> {
    (
        select(&FLEET_MODELS[..]),
        1u16..=8,
        1u32..=6,
        0u64..=5000,
        select(&["nvlink", "hccs", "pcie"][..]),
    )
        .prop_map(|(model, dpn, nodes, price, ic)| GroupSpec {
            model: model.into(),
            devices_per_node: dpn,
            nodes,
            interconnect: ic.into(),
            price_fen_per_device_hour: price,
        })
}

fn pools() -> impl Strategy<Value = Vec<PoolSpec>> {
    let pool = (
        select(
            &[
                PoolKind::LocalCentre,
                PoolKind::LocalCloud,
                PoolKind::External,
                PoolKind::External,
            ][..],
        ),
        select(&REGIONS[..]),
        0u32..=60,
        select(&ZONES[..]),
        prop::collection::vec(group_spec(), 1..=3),
    );
    prop::collection::vec(pool, 1..=6).prop_map(|pools| {
        pools
            .into_iter()
            .enumerate()
            .map(|(i, (kind, region, rtt_ms, zone, groups))| PoolSpec {
                id: format!("p{i}"),
                name: format!("pool {i}"),
                kind,
                region: region.into(),
                rtt_ms,
                data_zone: zone.into(),
                groups,
                billing_increment_s: None,
            })
            .collect()
    })
}

fn tenants() -> impl Strategy<Value = Vec<TenantSpec>> {
    let quota = prop_oneof![
        1 => Just(0u64),
        4 => 0u64..=8_000,
        4 => 0u64..=40_000,
        1 => Just(u64::MAX),
    ];
    let borrow = prop_oneof![
        2 => Just(None),
        1 => Just(Some(0u64)),
        3 => (0u64..=20_000).prop_map(Some),
    ];
    prop::collection::vec((quota, borrow, 1u32..=4), 1..=4).prop_map(|ts| {
        ts.into_iter()
            .enumerate()
            .map(
                |(i, (quota_tflops, borrow_limit_tflops, weight))| TenantSpec {
                    name: format!("t{i}"),
                    quota_tflops,
                    borrow_limit_tflops,
                    weight,
                },
            )
            .collect()
    })
}

fn shape() -> impl Strategy<Value = Shape> {
    let gang = |(nodes, devices_per_node)| Shape::Gang {
        nodes,
        devices_per_node,
    };
    let elastic = |(tflops, min_chunk_tflops)| Shape::Elastic {
        tflops,
        min_chunk_tflops,
    };
    prop_oneof![
        4 => (1u32..=2, 1u16..=4).prop_map(gang),
        2 => (1u32..=4, 1u16..=8).prop_map(gang),
        1 => (0u32..=8, 0u16..=17).prop_map(gang),
        3 => (1u64..=5_000)
            .prop_flat_map(|t| (Just(t), 0..=t))
            .prop_map(elastic),
        2 => (1u64..=20_000)
            .prop_flat_map(|t| (Just(t), 0..=t))
            .prop_map(elastic),
        1 => (0u64..=200_000, 0u64..=100_000).prop_map(elastic),
    ]
}

fn constraints() -> impl Strategy<Value = Constraints> {
    let names = |v: Vec<&str>| v.into_iter().map(String::from).collect::<Vec<_>>();
    (
        prop_oneof![
            5 => Just(Vec::new()),
            3 => subsequence(&FLEET_MODELS[..], 1..=2).prop_map(names),
            1 => subsequence(&ASKED_MODELS[..], 1..=2).prop_map(names),
        ],
        prop_oneof![
            9 => Just(Vec::new()),
            1 => select(&[REGIONS[0], REGIONS[1], REGIONS[2], REGIONS[3], "mars"][..])
                .prop_map(|r| vec![r.to_string()]),
        ],
        prop::option::weighted(0.1, 0u32..=60),
        prop::option::weighted(0.1, select(&["mainland", "hetao", "moon"][..])),
        prop::option::weighted(0.1, 0u64..=5000),
    )
        .prop_map(
            |(models, regions, max_rtt_ms, zone, max_price)| Constraints {
                models,
                regions,
                pools: Vec::new(),
                max_rtt_ms,
                data_zone: zone.map(String::from),
                max_price_fen_per_device_hour: max_price,
            },
        )
}

fn submit_op() -> impl Strategy<Value = SubmitOp> {
    let duration = prop_oneof![
        30 => 1u64..=14_400_000,
        1 => Just(0u64),
        1 => Just(MAX_DURATION_MS),
        1 => Just(MAX_DURATION_MS + 1),
    ];
    let priority = select(
        &[
            Priority::Critical,
            Priority::Standard,
            Priority::Standard,
            Priority::Spot,
            Priority::Spot,
        ][..],
    );
    let policy = prop::option::of(select(
        &[
            suanli_core::Policy::Cheapest,
            suanli_core::Policy::CheapestAfterSubsidy,
            suanli_core::Policy::LowestLatency,
            suanli_core::Policy::BestFit,
        ][..],
    ));
    let start_after = prop::option::weighted(
        0.2,
        prop_oneof![
            1 => (0u64..=10_000_000).prop_map(StartAfter::Past),
            4 => (0u64..=5_000_000).prop_map(StartAfter::In),
            1 => Just(StartAfter::Never),
        ],
    );
    let deadline = prop::option::weighted(
        0.2,
        prop_oneof![
            4 => (0u64..=5_000_000).prop_map(Deadline::Slack),
            1 => (1u64..=1_000).prop_map(Deadline::TooEarly),
            1 => Just(Deadline::Never),
        ],
    );
    (
        pick_strategy(),
        shape(),
        duration,
        priority,
        constraints(),
        prop::option::weighted(0.1, pick_strategy()),
        policy,
        start_after,
        deadline,
        (
            prop::bool::weighted(0.3),
            prop::option::weighted(0.3, prop::bool::weighted(0.3)),
        ),
    )
        .prop_map(
            |(
                tenant,
                shape,
                duration_ms,
                priority,
                constraints,
                in_pool,
                policy,
                start_after,
                deadline,
                (requeue, workload),
            )| {
                SubmitOp {
                    tenant,
                    shape,
                    duration_ms,
                    priority,
                    constraints,
                    in_pool,
                    policy,
                    start_after,
                    deadline,
                    requeue,
                    workload,
                }
            },
        )
}

fn id_ref() -> impl Strategy<Value = IdRef> {
    prop_oneof![
        6 => any::<Index>().prop_map(IdRef::Live),
        2 => any::<Index>().prop_map(IdRef::Seen),
        1 => Just(IdRef::Unknown),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let request_op = prop_oneof![
        Just(RequestOp::Cancel),
        Just(RequestOp::Release),
        Just(RequestOp::Started),
        any::<bool>().prop_map(|failed| RequestOp::Finished { failed }),
    ];
    let pool_op = select(
        &[
            PoolOp::Drain,
            PoolOp::Undrain,
            PoolOp::Lose,
            PoolOp::Restore,
        ][..],
    );
    let update = (
        pick_strategy(),
        prop::collection::vec(0u32..=2, 0..=3),
        prop::bool::weighted(0.3),
        prop::option::weighted(0.5, 0u64..=5000),
        prop::option::weighted(0.3, 0u32..=60),
        prop::option::weighted(0.2, select(&REGIONS[..])),
        prop::option::weighted(0.2, select(&ZONES[..])),
    )
        .prop_map(
            |(pool, grow, shrink_first, price, rtt_ms, region, data_zone)| UpdateOp {
                pool,
                grow,
                shrink_first,
                price,
                rtt_ms,
                region,
                data_zone,
            },
        );
    // A tick comes first: a failing case shrinks towards ticks, which do nothing when nothing
    // waits, so the commands that matter stand out.
    prop_oneof![
        5 => Just(Op::Tick),
        10 => submit_op().prop_map(|s| Op::Submit(Box::new(s))),
        8 => (request_op, id_ref()).prop_map(|(o, r)| Op::Request(o, r)),
        3 => (pool_op, pick_strategy()).prop_map(|(o, p)| Op::Pool(o, p)),
        1 => update.prop_map(Op::Update),
        3 => (pick_strategy(), 0u32..4, 0u32..8, prop::bool::weighted(0.4)).prop_map(
            |(pool, group, node, healthy)| Op::Node { pool, group, node, healthy }
        ),
        2 => (pick_strategy(), prop::collection::vec(subsidy_term(), 0..=2))
            .prop_map(|(tenant, terms)| Op::Subsidies(tenant, terms)),
        2 => (pick_strategy(), 0u8..=3).prop_map(|(pool, bits)| Op::Runtimes(pool, bits)),
    ]
}

fn subsidy_term() -> impl Strategy<Value = (u32, SubsidyScopeOp)> {
    let rate = prop_oneof![1 => Just(0u32), 8 => 1u32..=10_000, 1 => Just(10_000u32)];
    let scope = prop_oneof![
        Just(SubsidyScopeOp::All),
        Just(SubsidyScopeOp::Local),
        pick_strategy().prop_map(SubsidyScopeOp::Pool),
    ];
    (rate, scope)
}

fn scenario() -> impl Strategy<Value = Scenario> {
    scenario_of(op().boxed())
}

/// Scenarios of a busy fleet that keeps its shape: submissions, ends and ticks only, with
/// vouchers now and then, so that passes are incremental.
fn busy_scenario() -> impl Strategy<Value = Scenario> {
    let request_op = prop_oneof![
        1 => Just(RequestOp::Cancel),
        2 => Just(RequestOp::Release),
        1 => Just(RequestOp::Started),
        1 => any::<bool>().prop_map(|failed| RequestOp::Finished { failed }),
    ];
    let ops = prop_oneof![
        5 => Just(Op::Tick),
        12 => submit_op().prop_map(|s| Op::Submit(Box::new(s))),
        8 => (request_op, id_ref()).prop_map(|(o, r)| Op::Request(o, r)),
        1 => (pick_strategy(), prop::collection::vec(subsidy_term(), 0..=2))
            .prop_map(|(tenant, terms)| Op::Subsidies(tenant, terms)),
    ];
    scenario_of(ops.boxed())
}

fn scenario_of(ops: BoxedStrategy<Op>) -> impl Strategy<Value = Scenario> {
    let step = (
        prop_oneof![3 => Just(0u64), 5 => 0u64..=60_000, 1 => 0u64..=3_600_000],
        ops,
    )
        .prop_map(|(dt, op)| Step { dt, op });
    (
        select(
            &[
                suanli_core::Policy::Cheapest,
                suanli_core::Policy::LowestLatency,
                suanli_core::Policy::BestFit,
            ][..],
        ),
        select(&[1, 2, 3, 5, suanli_core::PASS_SLICE][..]),
        pools(),
        tenants(),
        prop::collection::vec(step, 30..=150),
    )
        .prop_map(|(policy, pass_slice, pools, tenants, steps)| Scenario {
            policy,
            pass_slice,
            pools,
            tenants,
            steps,
        })
}

// ----- running a scenario -----

/// An engine driven by a scenario, with what the driver needs to turn steps into commands.
struct Run {
    engine: Engine,
    now: u64,
    /// Every id the engine gave, with what was asked.
    submitted: BTreeMap<RequestId, RequestSpec>,
    /// The pools as last registered or updated.
    pools: Vec<PoolSpec>,
    tenants: Vec<TenantSpec>,
}

impl Run {
    fn new(s: &Scenario) -> Run {
        Run::with(s, true)
    }

    /// An engine whose passes are incremental or all full.
    fn with(s: &Scenario, incremental: bool) -> Run {
        let config = EngineConfig {
            default_policy: s.policy,
            pass_slice: s.pass_slice,
            incremental,
        };
        let mut engine = Engine::new(config, Catalogue::builtin());
        for p in &s.pools {
            let ev = engine.apply(Command::RegisterPool(p.clone()), 0);
            assert_eq!(ev, [Event::PoolRegistered { pool: p.id.clone() }]);
        }
        for t in &s.tenants {
            let ev = engine.apply(Command::SetTenant(t.clone()), 0);
            assert_eq!(
                ev,
                [Event::TenantSet {
                    tenant: t.name.clone()
                }]
            );
        }
        Run {
            engine,
            now: 0,
            submitted: BTreeMap::new(),
            pools: s.pools.clone(),
            tenants: s.tenants.clone(),
        }
    }

    fn pool_id(&self, p: &Pick) -> String {
        pick(p, &self.pools).map_or_else(|| "nowhere".to_string(), |p| p.id.clone())
    }

    fn request_id(&self, r: &IdRef) -> RequestId {
        match r {
            IdRef::Live(ix) => {
                let live = self.engine.live_requests();
                if live.is_empty() {
                    RequestId(0)
                } else {
                    *ix.get(&live)
                }
            }
            IdRef::Seen(ix) => {
                let seen: Vec<RequestId> = self.submitted.keys().copied().collect();
                if seen.is_empty() {
                    RequestId(0)
                } else {
                    *ix.get(&seen)
                }
            }
            IdRef::Unknown => RequestId(u64::MAX),
        }
    }

    fn request_spec(&self, s: &SubmitOp) -> RequestSpec {
        let now = self.now;
        let start_after_ms = s.start_after.as_ref().map(|a| match *a {
            StartAfter::Past(d) => now.saturating_sub(d),
            StartAfter::In(d) => now + d,
            StartAfter::Never => u64::MAX,
        });
        let earliest_end = now
            .max(start_after_ms.unwrap_or(0))
            .saturating_add(s.duration_ms);
        let deadline_ms = s.deadline.as_ref().map(|d| match *d {
            Deadline::Slack(d) => earliest_end.saturating_add(d),
            Deadline::TooEarly(d) => earliest_end.saturating_sub(d),
            Deadline::Never => u64::MAX,
        });
        RequestSpec {
            tenant: pick(&s.tenant, &self.tenants)
                .map_or_else(|| "ghost".to_string(), |t| t.name.clone()),
            shape: s.shape,
            duration_ms: s.duration_ms,
            priority: s.priority,
            constraints: Constraints {
                pools: s.in_pool.iter().map(|p| self.pool_id(p)).collect(),
                ..s.constraints.clone()
            },
            policy: s.policy,
            start_after_ms,
            deadline_ms,
            requeue: s.requeue,
            workload: s.workload.map(|image| {
                Box::new(Workload {
                    argv: vec!["train".into()],
                    image: image.then(|| "pytorch:2.5".into()),
                    ..Default::default()
                })
            }),
        }
    }

    fn update_spec(&self, u: &UpdateOp) -> PoolSpec {
        let Some(old) = pick(&u.pool, &self.pools) else {
            let mut spec = self.pools[0].clone();
            spec.id = "nowhere".into();
            return spec;
        };
        let mut spec = old.clone();
        for (i, g) in spec.groups.iter_mut().enumerate() {
            g.nodes += u.grow.get(i).copied().unwrap_or(0);
            if let Some(p) = u.price {
                g.price_fen_per_device_hour = p;
            }
        }
        if u.shrink_first && spec.groups[0].nodes > 1 {
            spec.groups[0].nodes -= 1;
        }
        if let Some(rtt) = u.rtt_ms {
            spec.rtt_ms = rtt;
        }
        if let Some(r) = u.region {
            spec.region = r.into();
        }
        if let Some(z) = u.data_zone {
            spec.data_zone = z.into();
        }
        spec
    }

    fn command(&self, op: &Op) -> Command {
        match op {
            Op::Submit(s) => Command::Submit(self.request_spec(s)),
            Op::Tick => Command::Tick,
            Op::Request(o, r) => {
                let request = self.request_id(r);
                match *o {
                    RequestOp::Cancel => Command::Cancel { request },
                    RequestOp::Release => Command::Release { request },
                    RequestOp::Started => Command::LeaseStarted { request },
                    RequestOp::Finished { failed } => Command::LeaseFinished {
                        request,
                        outcome: JobOutcome::bare(if failed {
                            JobCause::Failed
                        } else {
                            JobCause::Completed
                        }),
                    },
                }
            }
            Op::Pool(o, p) => {
                let pool = self.pool_id(p);
                match o {
                    PoolOp::Drain => Command::DrainPool { pool },
                    PoolOp::Undrain => Command::UndrainPool { pool },
                    PoolOp::Lose => Command::LosePool { pool },
                    PoolOp::Restore => Command::RestorePool { pool },
                }
            }
            Op::Update(u) => Command::UpdatePool(self.update_spec(u)),
            Op::Node {
                pool,
                group,
                node,
                healthy,
            } => Command::SetNodeHealth {
                pool: self.pool_id(pool),
                group: *group,
                node: *node,
                healthy: *healthy,
            },
            Op::Runtimes(pool, bits) => Command::SetPoolRuntimes {
                pool: self.pool_id(pool),
                runtimes: Runtimes(*bits),
            },
            Op::Subsidies(tenant, terms) => Command::SetSubsidies {
                tenant: pick(tenant, &self.tenants)
                    .map_or_else(|| "ghost".to_string(), |t| t.name.clone()),
                subsidies: terms
                    .iter()
                    .map(|(rate_bp, scope)| Subsidy {
                        rate_bp: *rate_bp,
                        pools: match scope {
                            SubsidyScopeOp::All => SubsidyPools::All,
                            SubsidyScopeOp::Local => SubsidyPools::Kinds(
                                [PoolKind::LocalCentre, PoolKind::LocalCloud].into(),
                            ),
                            SubsidyScopeOp::Pool(p) => {
                                SubsidyPools::Pools([self.pool_id(p)].into())
                            }
                        },
                    })
                    .collect(),
            },
        }
    }

    /// Applies a command at the current time and keeps the driver's books.
    fn apply(&mut self, command: Command) -> Vec<Event> {
        let events = self.engine.apply(command.clone(), self.now);
        for ev in &events {
            if let Event::Submitted { request } = ev {
                let Command::Submit(spec) = &command else {
                    panic!("{request} submitted by {command:?}");
                };
                self.submitted.insert(*request, spec.clone());
            }
        }
        if let Command::UpdatePool(spec) = &command
            && events
                == [Event::PoolUpdated {
                    pool: spec.id.clone(),
                }]
        {
            let ix = self.pools.iter().position(|p| p.id == spec.id).unwrap();
            self.pools[ix] = spec.clone();
        }
        events
    }

    /// Advances the clock and applies the step's command.
    fn step(&mut self, step: &Step) -> (Command, Vec<Event>) {
        self.now += step.dt;
        let command = self.command(&step.op);
        let events = self.apply(command.clone());
        (command, events)
    }
}

// ----- checks -----

fn audited(e: &Engine, command: &Command) -> Result<(), TestCaseError> {
    e.audit()
        .map_err(|err| TestCaseError::fail(format!("after {command:?}: {err}")))
}

/// Devices held by live leases, by (pool, group in pool, node).
fn allocated(e: &Engine) -> BTreeMap<(String, u32, u32), u32> {
    let mut held = BTreeMap::new();
    for id in e.live_requests() {
        if let Some(lease) = e.request(id).unwrap().lease {
            for p in lease.parts {
                *held.entry((p.pool, p.group, p.node)).or_insert(0) += p.devices as u32;
            }
        }
    }
    held
}

/// Free devices per node and node size, by (pool, group in pool).
fn free_table(e: &Engine) -> BTreeMap<(String, u32), (Vec<u16>, u16)> {
    let mut table = BTreeMap::new();
    let mut in_pool: BTreeMap<String, u32> = BTreeMap::new();
    for (pool, free, size) in e.node_free_table() {
        let g = in_pool.entry(pool.clone()).or_insert(0);
        table.insert((pool, *g), (free, size));
        *g += 1;
    }
    table
}

fn check_conservation(e: &Engine, command: &Command) -> Result<(), TestCaseError> {
    audited(e, command)?;
    let held = allocated(e);
    let table = free_table(e);
    for ((pool, g, node), &a) in &held {
        let Some((free, size)) = table.get(&(pool.clone(), *g)) else {
            return Err(TestCaseError::fail(format!(
                "a lease holds pool {pool} group {g}, which does not exist"
            )));
        };
        prop_assert!((*node as usize) < free.len(), "{pool}/{g}: node {node}");
        prop_assert!(
            a <= *size as u32,
            "{pool}/{g}/{node}: {a} allocated on a node of {size}"
        );
    }
    let down: BTreeSet<(String, u32, u32)> = e.down_nodes().into_iter().collect();
    for ((pool, g), (free, size)) in &table {
        for (node, &f) in free.iter().enumerate() {
            let a = held
                .get(&(pool.clone(), *g, node as u32))
                .copied()
                .unwrap_or(0);
            // A node out of service offers nothing and holds nothing.
            let size = if down.contains(&(pool.clone(), *g, node as u32)) {
                0
            } else {
                *size as u32
            };
            prop_assert_eq!(
                f as u32 + a,
                size,
                "{}/{}/{}: free + allocated after {:?}",
                pool,
                g,
                node,
                command
            );
        }
    }
    Ok(())
}

/// Every gang lease is whole: its nodes, each with its devices, distinct, in one group of one
/// pool; a queued request holds nothing.
fn check_gangs(e: &Engine) -> Result<(), TestCaseError> {
    for id in e.live_requests() {
        let r = e.request(id).unwrap();
        match (&r.lease, r.shape) {
            (None, _) => {}
            (Some(_), _) if r.state == RequestState::Queued => {
                return Err(TestCaseError::fail(format!("queued {id} holds a lease")));
            }
            (
                Some(lease),
                Shape::Gang {
                    nodes,
                    devices_per_node,
                },
            ) => {
                prop_assert_eq!(lease.parts.len(), nodes as usize, "{} parts", id);
                let first = &lease.parts[0];
                let mut seen = BTreeSet::new();
                for p in &lease.parts {
                    prop_assert_eq!(&p.pool, &first.pool, "{} spans pools", id);
                    prop_assert_eq!(p.group, first.group, "{} spans groups", id);
                    prop_assert_eq!(p.devices, devices_per_node, "{} part size", id);
                    prop_assert!(seen.insert(p.node), "{} holds node {} twice", id, p.node);
                }
            }
            (Some(lease), Shape::Elastic { tflops, .. }) => {
                prop_assert!(lease.tflops >= tflops, "{} holds too little", id);
            }
        }
    }
    Ok(())
}

/// A request placed by a command still holds its lease when the command ends, unless the same
/// command preempted it.
fn placed_and_held(e: &Engine, events: &[Event]) -> Result<Vec<RequestId>, TestCaseError> {
    let mut held = Vec::new();
    for (i, ev) in events.iter().enumerate() {
        let Event::Placed { request } = *ev else {
            continue;
        };
        if e.request(request).is_some_and(|r| r.lease.is_some()) {
            held.push(request);
            continue;
        }
        let preempted = events[i..].iter().any(|later| {
            matches!(later,
                Event::Requeued { request: r, reason: EndReason::Preempted }
                | Event::Ended { request: r, reason: EndReason::Preempted, .. }
                if *r == request)
        });
        prop_assert!(preempted, "{} was placed, then lost its lease", request);
    }
    Ok(held)
}

fn check_quotas(e: &Engine) -> Result<(), TestCaseError> {
    for t in e.tenant_usages() {
        let limit = t
            .quota_tflops
            .saturating_add(t.borrow_limit_tflops.unwrap_or(u64::MAX));
        prop_assert!(
            t.used_tflops <= limit,
            "tenant {} uses {} beyond its limit {}",
            t.name,
            t.used_tflops,
            limit
        );
        prop_assert!(t.borrowed_tflops <= t.used_tflops);
    }
    Ok(())
}

/// 128 cases per property, or `PROPTEST_CASES` when set (for a longer search).
fn config() -> ProptestConfig {
    let default = ProptestConfig::default();
    ProptestConfig {
        cases: if std::env::var_os("PROPTEST_CASES").is_some() {
            default.cases
        } else {
            128
        },
        // Failing cases are kept next to this file, in `properties.regressions`.
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("regressions"))),
        ..default
    }
}

proptest! {
    #![proptest_config(config())]

    /// No device is ever allocated twice and, on every node of every group, free plus allocated
    /// devices equal the node's size, after every command: by the engine's own audit and by the
    /// public views (leases' parts against the free table).
    #[test]
    fn devices_are_conserved(s in scenario()) {
        let mut run = Run::new(&s);
        check_conservation(&run.engine, &Command::Tick)?;
        for step in &s.steps {
            let (command, _) = run.step(step);
            check_conservation(&run.engine, &command)?;
        }
    }

    /// A gang is placed whole or not at all: every gang placed has exactly its nodes, each with
    /// its devices per node, on distinct nodes of one group of one pool; a queued request holds
    /// nothing; an elastic lease holds at least what was asked.
    #[test]
    fn gangs_are_whole_or_nothing(s in scenario()) {
        let mut run = Run::new(&s);
        for step in &s.steps {
            let (_, events) = run.step(step);
            placed_and_held(&run.engine, &events)?;
            check_gangs(&run.engine)?;
        }
    }

    /// No tenant ever holds more than its quota plus its borrowing limit.
    #[test]
    fn quotas_hold(s in scenario()) {
        let mut run = Run::new(&s);
        for step in &s.steps {
            run.step(step);
            check_quotas(&run.engine)?;
        }
    }

    /// Ending everything gives everything back: after the sequence, cancelling every live
    /// request and bringing every pool and node back to health leaves every node fully free, every
    /// tenant at zero usage with no lease and nothing queued.
    #[test]
    fn releasing_everything_frees_the_fleet(s in scenario()) {
        let mut run = Run::new(&s);
        for step in &s.steps {
            run.step(step);
        }
        for id in run.engine.live_requests() {
            let ev = run.apply(Command::Cancel { request: id });
            prop_assert!(
                matches!(ev[..], [Event::Ended { request, reason: EndReason::Cancelled, .. }] if request == id),
                "cancel {}: {:?}", id, ev
            );
        }
        for p in run.engine.fleet_usage().pools {
            let command = match p.health {
                PoolHealth::Healthy => continue,
                PoolHealth::Draining => Command::UndrainPool { pool: p.id },
                PoolHealth::Lost => Command::RestorePool { pool: p.id },
            };
            let ev = run.apply(command);
            prop_assert!(
                matches!(ev[..], [Event::PoolHealthChanged { health: PoolHealth::Healthy, .. }]),
                "{:?}", ev
            );
        }
        for (pool, group, node) in run.engine.down_nodes() {
            let ev = run.apply(Command::SetNodeHealth { pool, group, node, healthy: true });
            prop_assert!(
                matches!(ev[..], [Event::NodeHealthChanged { healthy: true, .. }]),
                "{:?}", ev
            );
        }
        let ev = run.apply(Command::Tick);
        prop_assert!(ev.is_empty(), "nothing is left to schedule: {:?}", ev);
        audited(&run.engine, &Command::Tick)?;
        for (pool, free, size) in run.engine.node_free_table() {
            prop_assert!(free.iter().all(|&f| f == size), "pool {} not free: {:?}", pool, free);
        }
        for t in run.engine.tenant_usages() {
            prop_assert_eq!((t.used_tflops, t.borrowed_tflops, t.live_leases, t.queued), (0, 0, 0, 0), "tenant {}", t.name);
        }
        prop_assert_eq!(run.engine.queue_len(), 0);
        prop_assert_eq!(run.engine.live_lease_count(), 0);
        prop_assert_eq!(run.engine.fleet_usage().total.allocated_devices, 0);
    }

    /// The engine is deterministic: the same scenario applied to two fresh engines gives the
    /// same events and the same digest after every command.
    #[test]
    fn same_commands_same_state(s in scenario()) {
        let mut a = Run::new(&s);
        let mut b = Run::new(&s);
        prop_assert_eq!(a.engine.digest(), b.engine.digest());
        for step in &s.steps {
            let (ca, ea) = a.step(step);
            let (cb, eb) = b.step(step);
            prop_assert_eq!(&ca, &cb);
            prop_assert_eq!(&ea, &eb, "after {:?}", ca);
            prop_assert_eq!(a.engine.digest(), b.engine.digest(), "after {:?}", ca);
        }
    }

    /// A saved engine read back (a snapshot) is the same engine: it passes the audit, has the
    /// same digest, and from there the same commands give the same events and digests as the
    /// engine that was never saved.
    #[test]
    fn a_saved_engine_decides_the_same(s in scenario()) {
        let mut a = Run::new(&s);
        let (first, rest) = s.steps.split_at(s.steps.len() / 2);
        for step in first {
            a.step(step);
        }
        let saved = serde_json::to_vec(&a.engine).expect("an engine serialises");
        let mut b = Run {
            engine: serde_json::from_slice(&saved).expect("a saved engine reads back"),
            now: a.now,
            submitted: a.submitted.clone(),
            pools: a.pools.clone(),
            tenants: a.tenants.clone(),
        };
        b.engine.audit().map_err(|e| TestCaseError::fail(format!("restored: {e}")))?;
        prop_assert_eq!(a.engine.digest(), b.engine.digest());
        for step in rest {
            let (ca, ea) = a.step(step);
            let (_, eb) = b.step(step);
            prop_assert_eq!(&ea, &eb, "after {:?}", ca);
            prop_assert_eq!(a.engine.digest(), b.engine.digest(), "after {:?}", ca);
        }
    }

    /// Nothing panics, a rejection comes alone, and a rejected command changes nothing: the
    /// digest after it equals the digest before.
    #[test]
    fn rejections_change_nothing(s in scenario()) {
        let mut run = Run::new(&s);
        for step in &s.steps {
            let before = run.engine.digest();
            let (command, events) = run.step(step);
            let rejected = events.iter().filter(|e| matches!(e, Event::Rejected { .. })).count();
            if rejected > 0 {
                prop_assert_eq!(events.len(), 1, "a rejection with other events: {:?}", events);
                prop_assert_eq!(run.engine.digest(), before, "{:?} was rejected ({:?}) but changed the state", command, events);
            }
        }
    }

    /// A lease is placed only where its request may run: in a healthy pool, in a group whose
    /// model, pool, region, round trip, data zone and price satisfy the request's constraints.
    #[test]
    fn leases_respect_constraints(s in scenario()) {
        let mut run = Run::new(&s);
        for step in &s.steps {
            let (_, events) = run.step(step);
            let pools = run.engine.fleet_usage().pools;
            for id in placed_and_held(&run.engine, &events)? {
                let c = &run.submitted[&id].constraints;
                for part in run.engine.request(id).unwrap().lease.unwrap().parts {
                    let pool = pools.iter().find(|p| p.id == part.pool).unwrap();
                    let spec = run.pools.iter().find(|p| p.id == part.pool).unwrap();
                    let price = spec.groups[part.group as usize].price_fen_per_device_hour;
                    prop_assert_eq!(pool.health, PoolHealth::Healthy, "{} placed in {}", id, pool.id);
                    prop_assert!(c.models.is_empty() || c.models.contains(&part.model), "{} on {}", id, part.model);
                    prop_assert!(c.pools.is_empty() || c.pools.contains(&part.pool), "{} in {}", id, part.pool);
                    prop_assert!(c.regions.is_empty() || c.regions.contains(&pool.region), "{} in {}", id, pool.region);
                    prop_assert!(c.max_rtt_ms.is_none_or(|r| pool.rtt_ms <= r), "{} at {} ms", id, pool.rtt_ms);
                    prop_assert!(c.data_zone.as_ref().is_none_or(|z| *z == pool.data_zone), "{} in {}", id, pool.data_zone);
                    prop_assert!(c.max_price_fen_per_device_hour.is_none_or(|m| price <= m), "{} at {} fen", id, price);
                }
            }
        }
    }

    /// A lease keeps to its request's times: it starts no earlier than the start-after time,
    /// lasts exactly the duration asked, ends by the deadline, and no lease is still live after
    /// a tick at or past its end.
    #[test]
    fn leases_keep_their_times(s in scenario()) {
        let mut run = Run::new(&s);
        for step in &s.steps {
            let (command, _) = run.step(step);
            for id in run.engine.live_requests() {
                let Some(lease) = run.engine.request(id).unwrap().lease else {
                    continue;
                };
                let spec = &run.submitted[&id];
                prop_assert!(lease.start <= run.now, "{} starts in the future", id);
                prop_assert!(lease.start >= spec.start_after_ms.unwrap_or(0), "{} started early", id);
                prop_assert_eq!(lease.end, lease.start.saturating_add(spec.duration_ms), "{}", id);
                prop_assert!(spec.deadline_ms.is_none_or(|d| lease.end <= d), "{} ends late", id);
                if command == Command::Tick {
                    prop_assert!(lease.end > run.now, "{} outlived its end {}", id, lease.end);
                }
            }
        }
    }

    /// The queue counts what waits and ranks it once: after every command `queue_len()` is
    /// the number of queued requests, the queue lists each of them once at positions 1..=n,
    /// and a request's explanation gives the position the list does.
    #[test]
    fn queue_positions_rank_each_request_once(s in scenario()) {
        let mut run = Run::new(&s);
        for step in &s.steps {
            let (command, _) = run.step(step);
            let e = &run.engine;
            let queued: BTreeSet<RequestId> = e
                .live_requests()
                .into_iter()
                .filter(|&id| e.request(id).unwrap().state == RequestState::Queued)
                .collect();
            prop_assert_eq!(e.queue_len(), queued.len(), "after {:?}", command);
            let listed = e.queued();
            let ids: BTreeSet<RequestId> = listed.iter().map(|q| q.id).collect();
            prop_assert_eq!(&ids, &queued, "after {:?}", command);
            for (i, q) in listed.iter().enumerate() {
                prop_assert_eq!(q.position, i as u32 + 1);
                prop_assert_eq!(e.explain(q.id).unwrap().position, q.position);
            }
        }
    }

    /// Incremental passes decide as full passes do: the same scenario through an engine whose
    /// passes try only the requests whose answer could have changed, and through one whose
    /// every pass tries every waiting request, gives the same events and the same digest after
    /// every command. Passes are whole (one slice): a slice counts the requests it tries, so
    /// sliced passes of the two engines end at different requests.
    #[test]
    fn incremental_passes_decide_as_full_passes(s in scenario()) {
        incremental_and_full_agree(s)?;
    }

    /// The same on a busy fleet that keeps its shape, where nearly every pass is incremental.
    #[test]
    fn incremental_passes_decide_as_full_passes_on_a_busy_fleet(s in busy_scenario()) {
        incremental_and_full_agree(s)?;
    }
}

fn incremental_and_full_agree(mut s: Scenario) -> Result<(), TestCaseError> {
    s.pass_slice = u32::MAX;
    let mut incremental = Run::with(&s, true);
    let mut full = Run::with(&s, false);
    for step in &s.steps {
        let (command, a) = incremental.step(step);
        let (_, b) = full.step(step);
        prop_assert_eq!(&a, &b, "after {:?}", command);
        let waiting = |run: &Run| -> Vec<(RequestId, WaitReason)> {
            run.engine
                .queued()
                .iter()
                .map(|q| (q.id, q.reason))
                .collect()
        };
        prop_assert_eq!(
            incremental.engine.digest(),
            full.engine.digest(),
            "after {:?}: waiting {:?}, with full passes {:?}",
            command,
            waiting(&incremental),
            waiting(&full)
        );
        audited(&incremental.engine, &command)?;
    }
    Ok(())
}
