//! The broker's Prometheus metrics, served at `/metrics` in the text format 0.0.4.
//!
//! Three sources, each a collector of one registry:
//! - the fleet as the published views show it (capacity and allocation per pool and per
//!   accelerator model, pools by health, the queue by priority and reason, tenants' usage and
//!   quota), read at scrape time: a scrape never waits for the writer and keeps no copy;
//! - the writer ([`WriterMetrics`]): commands and engine events counted as they happen, the
//!   time each decision and each batch's apply and commit took, leases by state;
//! - gRPC ([`RpcLayer`]): calls by method and final status, and their latency.
//!
//! Capacity is in TFLOPS (1P = 1000 TFLOPS), the unit of the API; durations in seconds.
//! The writer runs at tens of thousands of commands a second, so what it updates is relaxed
//! atomics in arrays fixed at start-up and indexed by enum: no label lookup, lock or
//! allocation per event. The RPC layer adds one look-up of the path per call, in a map fixed
//! at start-up.

use std::fmt::Error as FmtError;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use prost::Message as _;
use rustc_hash::FxHashMap;
use suanli_core::{Command, EndReason, Event};
use suanli_proto::v1 as pb;

use crate::service::pool::ReportFate;
use crate::views::Views;

/// The label set of a series without labels.
const NO_LABELS: [(&str, &str); 0] = [];

/// The `Content-Type` of what [`Metrics::render`] writes.
pub(crate) const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Everything `/metrics` shows.
#[derive(Debug)]
pub(crate) struct Metrics {
    registry: Registry,
}

impl Metrics {
    /// The broker's metrics over its views, its writer's counters and its gRPC calls.
    pub(crate) fn new(
        views: Arc<Views>,
        writer: Arc<WriterMetrics>,
        rpc: Arc<RpcMetrics>,
        replica: Arc<crate::ha::Replica>,
        trail: crate::trail::Trail,
    ) -> Self {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(FleetCollector { views }));
        registry.register_collector(Box::new(ReplicaCollector(replica)));
        registry.register_collector(Box::new(AuthCollector(trail)));
        registry.register_collector(Box::new(writer));
        registry.register_collector(Box::new(rpc));
        Metrics { registry }
    }

    /// One scrape in the Prometheus text format.
    pub(crate) fn render(&self) -> Result<String, FmtError> {
        let mut out = String::with_capacity(64 * 1024);
        prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

// ---------------------------------------------------------------------------------------------
// Encoding helpers

/// Writes one metric family: its descriptor, then every series; nothing at all when there is
/// no series (a family without samples only adds noise).
fn family<L: EncodeLabelSet, V: Copy>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    ty: MetricType,
    series: impl IntoIterator<Item = (L, V)>,
    mut write: impl FnMut(&mut MetricEncoder, V) -> Result<(), FmtError>,
) -> Result<(), FmtError> {
    let mut series = series.into_iter().peekable();
    if series.peek().is_none() {
        return Ok(());
    }
    let mut m = enc.encode_descriptor(name, help, None, ty)?;
    for (labels, v) in series {
        write(&mut m.encode_family(&labels)?, v)?;
    }
    Ok(())
}

fn gauges<L: EncodeLabelSet>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (L, u64)>,
) -> Result<(), FmtError> {
    family(enc, name, help, MetricType::Gauge, series, |m, v| {
        m.encode_gauge(&v)
    })
}

fn counters<L: EncodeLabelSet>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (L, u64)>,
) -> Result<(), FmtError> {
    family(enc, name, help, MetricType::Counter, series, |m, v| {
        m.encode_counter::<NoLabelSet, _, u64>(&v, None)
    })
}

fn histograms<'h, L: EncodeLabelSet>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (L, &'h Histogram)>,
) -> Result<(), FmtError> {
    family(enc, name, help, MetricType::Histogram, series, |m, h| {
        h.encode(m)
    })
}

/// A histogram of fixed buckets updated with atomics only. Values are integers in a raw unit
/// (nanoseconds, operations), exported divided by `per_unit` (1e9 for seconds): a division,
/// since a product with 1e-9 would print the bound 1 µs as `1.0000000000000002e-06`.
#[derive(Debug)]
pub(crate) struct Histogram {
    bounds: &'static [u64],
    per_unit: f64,
    /// Observations per bucket (not cumulative); the last is above every bound.
    buckets: Box<[AtomicU64]>,
    sum: AtomicU64,
}

/// Bucket bounds of durations, in nanoseconds: 1 µs to 10 s.
const SECONDS_BOUNDS_NS: &[u64] = &[
    1_000,
    2_500,
    5_000,
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    10_000_000_000,
];

/// Bucket bounds of queue waits, in milliseconds: placed at once, then 1 ms to a day.
const WAIT_BOUNDS_MS: &[u64] = &[
    0, 1, 5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 30_000, 60_000, 300_000,
    900_000, 3_600_000, 21_600_000, 86_400_000,
];

/// Bucket bounds of batch sizes, in operations, up to the writer's largest batch.
const BATCH_BOUNDS: &[u64] = &[1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096];

impl Histogram {
    fn new(bounds: &'static [u64], per_unit: f64) -> Self {
        Histogram {
            bounds,
            per_unit,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0),
        }
    }

    fn seconds() -> Self {
        Self::new(SECONDS_BOUNDS_NS, 1e9)
    }

    fn observe_raw(&self, v: u64) {
        let i = self.bounds.partition_point(|&b| b < v);
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum.fetch_add(v, Relaxed);
    }

    fn observe(&self, d: Duration) {
        self.observe_raw(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    }

    /// The number of observations.
    fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Relaxed)).sum()
    }

    fn encode(&self, m: &mut MetricEncoder) -> Result<(), FmtError> {
        // The count is the buckets' total, so that `_count` equals the `+Inf` bucket even
        // when observations land during the scrape.
        let mut count = 0;
        let buckets: Vec<(f64, u64)> = self
            .bounds
            .iter()
            .map(|&b| b as f64 / self.per_unit)
            .chain([f64::INFINITY])
            .zip(self.buckets.iter().map(|b| b.load(Relaxed)))
            .inspect(|&(_, n)| count += n)
            .collect();
        let sum = self.sum.load(Relaxed) as f64 / self.per_unit;
        m.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }
}

// ---------------------------------------------------------------------------------------------
// The fleet, from the published views

/// The replica's place in its group: its role, its term, how far and how stale its views are
/// (a broker on its own leads, always).
struct ReplicaCollector(Arc<crate::ha::Replica>);

impl std::fmt::Debug for ReplicaCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReplicaCollector")
    }
}

impl Collector for ReplicaCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), FmtError> {
        let role = self.0.role();
        let (index, staleness_ms) = self.0.position(crate::writer::wall_ms());
        let e = &mut enc;
        let none: [(&str, &str); 0] = [];
        gauges(
            e,
            "suanli_replica_leader",
            "1 while this broker leads its group (a broker on its own always does), else 0.",
            [(none, u64::from(role.leader))],
        )?;
        gauges(
            e,
            "suanli_replica_term",
            "The term this broker leads, or last led or tried to lead (0: never).",
            [(none, role.term.max(0) as u64)],
        )?;
        gauges(
            e,
            "suanli_replica_log_index",
            "The next command log index this broker's views have applied.",
            [(none, index)],
        )?;
        family(
            e,
            "suanli_replica_staleness_seconds",
            "How old the last log entry this broker's views applied is: the staleness of its \
             answers (the leader logs at least one entry per tick).",
            MetricType::Gauge,
            [(none, staleness_ms as f64 / 1e3)],
            |m, v| m.encode_gauge(&v),
        )
    }
}

/// Failed authentications (see [`crate::trail`]).
struct AuthCollector(crate::trail::Trail);

impl std::fmt::Debug for AuthCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuthCollector")
    }
}

impl Collector for AuthCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), FmtError> {
        counters(
            &mut enc,
            "suanli_auth_failures",
            "Calls refused for their credential (missing, unknown, revoked or expired token), on \
             gRPC and HTTP, since this broker started.",
            [(NO_LABELS, self.0.auth_failures_total())],
        )
    }
}

/// Gauges of the current state, computed at scrape time from the latest snapshot.
#[derive(Debug)]
struct FleetCollector {
    views: Arc<Views>,
}

fn pool_labels(p: &pb::Pool) -> [(&'static str, &str); 3] {
    [
        ("pool", p.id.as_str()),
        ("kind", pool_kind(p.kind)),
        ("region", p.region.as_str()),
    ]
}

fn tenant(t: &pb::Tenant) -> [(&'static str, &str); 1] {
    [("tenant", t.id.as_str())]
}

fn usage(t: &pb::Tenant) -> pb::TenantUsage {
    t.usage.unwrap_or_default()
}

fn pool_kind(k: i32) -> &'static str {
    match pb::PoolKind::try_from(k) {
        Ok(pb::PoolKind::LocalCentre) => "local_centre",
        Ok(pb::PoolKind::LocalCloud) => "local_cloud",
        Ok(pb::PoolKind::External) => "external",
        _ => "unspecified",
    }
}

const HEALTH: [(pb::PoolHealth, &str); 3] = [
    (pb::PoolHealth::Healthy, "healthy"),
    (pb::PoolHealth::Draining, "draining"),
    (pb::PoolHealth::Lost, "lost"),
];

const PRIORITIES: [&str; 3] = ["critical", "standard", "spot"];

const WAIT_REASONS: [(pb::WaitReason, &str); 6] = [
    (pb::WaitReason::Pending, "pending"),
    (pb::WaitReason::NotYetStartable, "not_yet_startable"),
    (pb::WaitReason::NoMatchingPool, "no_matching_pool"),
    (pb::WaitReason::Quota, "quota"),
    (pb::WaitReason::CapacityBusy, "capacity_busy"),
    (pb::WaitReason::BehindReservation, "behind_reservation"),
];

impl Collector for FleetCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), FmtError> {
        let s = self.views.snapshot();
        let e = &mut enc;
        type Pick = fn(&pb::Utilisation) -> u64;
        let figures: [(&str, &str, Pick); 5] = [
            (
                "capacity_tflops",
                "rated dense FP16 capacity, in TFLOPS (1P = 1000 TFLOPS)",
                |u| u.capacity_tflops,
            ),
            (
                "allocated_tflops",
                "capacity held by leases, in TFLOPS",
                |u| u.allocated_tflops,
            ),
            ("capacity_devices", "accelerator devices", |u| {
                u.capacity_devices
            }),
            (
                "allocated_devices",
                "accelerator devices held by leases",
                |u| u.allocated_devices,
            ),
            (
                "unavailable_devices",
                "devices on nodes out of service (neither free nor allocated)",
                |u| u.unavailable_devices,
            ),
        ];
        for (suffix, what, pick) in figures {
            gauges(
                e,
                &format!("suanli_pool_{suffix}"),
                &format!("Per pool: {what}."),
                s.pools.iter().map(|p| {
                    let u = p.utilisation.unwrap_or_default();
                    (pool_labels(p), pick(&u))
                }),
            )?;
        }
        for (suffix, what, pick) in figures {
            gauges(
                e,
                &format!("suanli_model_{suffix}"),
                &format!("Per accelerator model, over every pool: {what}."),
                s.fleet.by_model.iter().map(|k| {
                    let u = k.utilisation.unwrap_or_default();
                    ([("model", k.key.as_str())], pick(&u))
                }),
            )?;
        }
        gauges(
            e,
            "suanli_pool_health",
            "1 for the health state each pool is in, 0 for the others.",
            s.pools.iter().flat_map(|p| {
                HEALTH.iter().map(move |&(h, name)| {
                    (
                        [("pool", p.id.as_str()), ("health", name)],
                        u64::from(p.health == h as i32),
                    )
                })
            }),
        )?;
        let by_health = s.fleet.pools.unwrap_or_default();
        gauges(
            e,
            "suanli_pools",
            "Registered pools by health.",
            [
                ([("health", "healthy")], u64::from(by_health.healthy)),
                ([("health", "draining")], u64::from(by_health.draining)),
                ([("health", "lost")], u64::from(by_health.lost)),
            ],
        )?;
        gauges(
            e,
            "suanli_fleet_target_tflops",
            "The district's target for schedulable capacity, in TFLOPS.",
            (s.fleet.target_tflops > 0).then_some((NO_LABELS, s.fleet.target_tflops)),
        )?;
        let q = &s.queue;
        gauges(
            e,
            "suanli_queue_requests",
            "Queued requests by priority class.",
            PRIORITIES
                .iter()
                .zip(q.by_priority)
                .map(|(&p, n)| ([("priority", p)], u64::from(n))),
        )?;
        gauges(
            e,
            "suanli_queue_requests_by_reason",
            "Queued requests by why they wait.",
            WAIT_REASONS.iter().map(|&(r, name)| {
                let n = q
                    .by_reason
                    .iter()
                    .find(|&&(k, _)| k == r as i32)
                    .map_or(0, |&(_, n)| n);
                ([("reason", name)], u64::from(n))
            }),
        )?;
        gauges(
            e,
            "suanli_tenant_quota_tflops",
            "Each tenant's nominal quota, in TFLOPS.",
            s.tenants.iter().map(|t| (tenant(t), t.quota_tflops)),
        )?;
        gauges(
            e,
            "suanli_tenant_borrow_limit_tflops",
            "How far beyond its quota a tenant may borrow, in TFLOPS (absent: no limit).",
            s.tenants
                .iter()
                .filter_map(|t| Some((tenant(t), t.borrow_limit_tflops?))),
        )?;
        gauges(
            e,
            "suanli_tenant_used_tflops",
            "Capacity held by each tenant's live leases, in TFLOPS.",
            s.tenants.iter().map(|t| (tenant(t), usage(t).used_tflops)),
        )?;
        gauges(
            e,
            "suanli_tenant_borrowed_tflops",
            "Part of each tenant's use beyond its quota (reclaimable), in TFLOPS.",
            s.tenants
                .iter()
                .map(|t| (tenant(t), usage(t).borrowed_tflops)),
        )?;
        gauges(
            e,
            "suanli_tenant_leases",
            "Each tenant's leases holding capacity (placed or running).",
            s.tenants
                .iter()
                .map(|t| (tenant(t), u64::from(usage(t).live_leases))),
        )?;
        gauges(
            e,
            "suanli_tenant_queued_requests",
            "Each tenant's queued requests.",
            s.tenants
                .iter()
                .map(|t| (tenant(t), u64::from(usage(t).queued))),
        )?;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// The writer

/// Names of the engine's commands, indexed by [`command_kind`].
const COMMANDS: [&str; 16] = [
    "register_pool",
    "update_pool",
    "drain_pool",
    "undrain_pool",
    "lose_pool",
    "restore_pool",
    "set_node_health",
    "set_tenant",
    "submit",
    "cancel",
    "release",
    "lease_started",
    "lease_finished",
    "tick",
    "set_subsidies",
    "set_pool_runtimes",
];

/// The index of a command's kind in [`COMMANDS`].
pub(crate) fn command_kind(c: &Command) -> usize {
    match c {
        Command::RegisterPool(_) => 0,
        Command::UpdatePool(_) => 1,
        Command::DrainPool { .. } => 2,
        Command::UndrainPool { .. } => 3,
        Command::LosePool { .. } => 4,
        Command::RestorePool { .. } => 5,
        Command::SetNodeHealth { .. } => 6,
        Command::SetTenant(_) => 7,
        Command::Submit(_) => 8,
        Command::Cancel { .. } => 9,
        Command::Release { .. } => 10,
        Command::LeaseStarted { .. } => 11,
        Command::LeaseFinished { .. } => 12,
        Command::Tick => 13,
        Command::SetSubsidies { .. } => 14,
        Command::SetPoolRuntimes { .. } => 15,
    }
}

/// Names of the reasons a lease ends, indexed by [`end_reason`].
const END_REASONS: [&str; 9] = [
    "released",
    "expired",
    "finished",
    "job_failed",
    "cancelled",
    "deadline_missed",
    "preempted",
    "pool_lost",
    "node_lost",
];

fn end_reason(r: EndReason) -> usize {
    match r {
        EndReason::Released => 0,
        EndReason::Expired => 1,
        EndReason::Finished => 2,
        EndReason::JobFailed => 3,
        EndReason::Cancelled => 4,
        EndReason::DeadlineMissed => 5,
        EndReason::Preempted => 6,
        EndReason::PoolLost => 7,
        EndReason::NodeLost => 8,
    }
}

/// The states of a lease: placed (capacity held, the pool has not confirmed the start) and
/// running.
const LEASE_STATES: [(pb::RequestState, &str); 2] = [
    (pb::RequestState::Placed, "placed"),
    (pb::RequestState::Running, "running"),
];

/// What the writer counts and times. Updated by the writer's thread alone, read by scrapes.
#[derive(Debug)]
pub(crate) struct WriterMetrics {
    /// Per command kind: applied, rejected.
    commands: [[AtomicU64; 2]; COMMANDS.len()],
    /// Per command kind: the engine's time to apply it (a decision; a tick is expiry and a
    /// slice of a scheduling pass).
    decisions: [Histogram; COMMANDS.len()],
    submitted: AtomicU64,
    placed: AtomicU64,
    started: AtomicU64,
    requeued: [AtomicU64; END_REASONS.len()],
    ended: [AtomicU64; END_REASONS.len()],
    /// Requests in each of [`LEASE_STATES`], as the views show them.
    leases: [AtomicI64; LEASE_STATES.len()],
    /// Time from queueing (submission or requeue) to placement.
    queue_wait: Histogram,
    batch_ops: Histogram,
    apply: Histogram,
    commit: Histogram,
    /// Lease reports from agents, by [`ReportFate`] (counted by the agents' streams).
    reports: [AtomicU64; REPORT_FATES.len()],
    /// Batches the command log could not take.
    log_failures: AtomicU64,
    /// 1 while the command log cannot be written and mutations are refused.
    log_unwritable: AtomicU64,
}

/// What became of agents' lease reports, in the order of `reports`.
const REPORT_FATES: [ReportFate; 4] = [
    ReportFate::Applied,
    ReportFate::Duplicate,
    ReportFate::Stale,
    ReportFate::Contradicting,
];

impl Default for WriterMetrics {
    fn default() -> Self {
        WriterMetrics {
            commands: Default::default(),
            decisions: std::array::from_fn(|_| Histogram::seconds()),
            submitted: AtomicU64::new(0),
            placed: AtomicU64::new(0),
            started: AtomicU64::new(0),
            requeued: Default::default(),
            ended: Default::default(),
            leases: Default::default(),
            queue_wait: Histogram::new(WAIT_BOUNDS_MS, 1e3),
            batch_ops: Histogram::new(BATCH_BOUNDS, 1.0),
            apply: Histogram::seconds(),
            commit: Histogram::seconds(),
            reports: Default::default(),
            log_failures: AtomicU64::new(0),
            log_unwritable: AtomicU64::new(0),
        }
    }
}

impl WriterMetrics {
    /// The engine applied a command of `kind` (see [`command_kind`]) in `took`.
    pub(crate) fn decided(&self, kind: usize, took: Duration, rejected: bool) {
        self.commands[kind][usize::from(rejected)].fetch_add(1, Relaxed);
        self.decisions[kind].observe(took);
    }

    /// An engine event of the running broker (not of recovery).
    pub(crate) fn event(&self, ev: &Event) {
        let counter = match ev {
            Event::Submitted { .. } => &self.submitted,
            Event::Placed { .. } => &self.placed,
            Event::Started { .. } => &self.started,
            Event::Requeued { reason, .. } => &self.requeued[end_reason(*reason)],
            Event::Ended { reason, .. } => &self.ended[end_reason(*reason)],
            _ => return,
        };
        counter.fetch_add(1, Relaxed);
    }

    /// An agent's lease report was dealt with.
    pub(crate) fn report(&self, fate: ReportFate) {
        let i = REPORT_FATES
            .iter()
            .position(|f| *f == fate)
            .expect("every fate is listed");
        self.reports[i].fetch_add(1, Relaxed);
    }

    /// The command log failed to take a batch, and mutations are refused until it can.
    pub(crate) fn log_failed(&self) {
        self.log_failures.fetch_add(1, Relaxed);
        self.log_unwritable.store(1, Relaxed);
    }

    /// The command log took a write again.
    pub(crate) fn log_writable(&self) {
        self.log_unwritable.store(0, Relaxed);
    }

    /// A request was placed `ms` milliseconds after it was queued.
    pub(crate) fn waited(&self, ms: u64) {
        self.queue_wait.observe_raw(ms);
    }

    /// The views were cleared (a replica reads its state back): the lease gauges start again
    /// from zero as the records come back.
    pub(crate) fn forget_leases(&self) {
        for gauge in &self.leases {
            gauge.store(0, Relaxed);
        }
    }

    /// A request record in the views moved from state `from` (none: new) to `to` (wire
    /// values): keeps the lease gauges equal to the records' states.
    pub(crate) fn moved(&self, from: Option<i32>, to: i32) {
        if from == Some(to) {
            return;
        }
        let slot = |s: i32| LEASE_STATES.iter().position(|&(st, _)| st as i32 == s);
        if let Some(i) = from.and_then(slot) {
            self.leases[i].fetch_sub(1, Relaxed);
        }
        if let Some(i) = slot(to) {
            self.leases[i].fetch_add(1, Relaxed);
        }
    }

    /// A batch of `ops` operations was applied in `apply`; its log entries, if any, were made
    /// durable in `commit`.
    pub(crate) fn batch(&self, ops: usize, entries: usize, apply: Duration, commit: Duration) {
        if ops == 0 && entries == 0 {
            return;
        }
        // A batch without operations is a tick's or a timer's: its apply time counts, but
        // it is no batch of calls.
        if ops > 0 {
            self.batch_ops.observe_raw(ops as u64);
        }
        self.apply.observe(apply);
        if entries > 0 {
            self.commit.observe(commit);
        }
    }
}

impl Collector for WriterMetrics {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), FmtError> {
        let e = &mut enc;
        counters(
            e,
            "suanli_agent_reports",
            "Lease reports from pools' agents, by fate: applied, duplicate (repeats what the broker knows), stale (an ended or replaced lease) or contradicting (warned about). All are acknowledged.",
            REPORT_FATES
                .iter()
                .zip(&self.reports)
                .map(|(f, c)| ([("fate", f.as_str())], c.load(Relaxed))),
        )?;
        counters(
            e,
            "suanli_commands",
            "Commands the engine applied or rejected, by kind.",
            COMMANDS.iter().enumerate().flat_map(|(i, &c)| {
                [("applied", 0), ("rejected", 1)].map(|(outcome, j)| {
                    (
                        [("command", c), ("outcome", outcome)],
                        self.commands[i][j].load(Relaxed),
                    )
                })
            }),
        )?;
        histograms(
            e,
            "suanli_decision_seconds",
            "Time the engine took to apply one command, by kind (a tick is a slice of a scheduling pass).",
            COMMANDS
                .iter()
                .zip(&self.decisions)
                .map(|(&c, h)| ([("command", c)], h)),
        )?;
        let one = |name: &str, help: &str, c: &AtomicU64| {
            (name.to_string(), help.to_string(), c.load(Relaxed))
        };
        for (name, help, v) in [
            one(
                "suanli_requests_submitted",
                "Requests accepted.",
                &self.submitted,
            ),
            one(
                "suanli_requests_placed",
                "Placements: requests given a lease.",
                &self.placed,
            ),
            one(
                "suanli_requests_started",
                "Leases whose pool confirmed the start.",
                &self.started,
            ),
        ] {
            counters(e, &name, &help, [(NO_LABELS, v)])?;
        }
        counters(
            e,
            "suanli_command_log_failures",
            "Batches the command log could not take (a full disk, a failed store): their calls were refused and nothing of them took effect.",
            [(NO_LABELS, self.log_failures.load(Relaxed))],
        )?;
        gauges(
            e,
            "suanli_command_log_unwritable",
            "1 while the command log cannot be written: mutations are refused, reads go on.",
            [(NO_LABELS, self.log_unwritable.load(Relaxed))],
        )?;
        counters(
            e,
            "suanli_requests_requeued",
            "Leases that ended with their request put back in the queue, by why they ended.",
            END_REASONS
                .iter()
                .zip(&self.requeued)
                .map(|(&r, c)| ([("reason", r)], c.load(Relaxed))),
        )?;
        counters(
            e,
            "suanli_requests_ended",
            "Requests that reached a final state, by why.",
            END_REASONS
                .iter()
                .zip(&self.ended)
                .map(|(&r, c)| ([("reason", r)], c.load(Relaxed))),
        )?;
        gauges(
            e,
            "suanli_leases",
            "Leases holding capacity, by state.",
            LEASE_STATES
                .iter()
                .zip(&self.leases)
                .map(|(&(_, s), g)| ([("state", s)], g.load(Relaxed).max(0) as u64)),
        )?;
        histograms(
            e,
            "suanli_request_queue_wait_seconds",
            "Time from queueing (submission, or requeue after preemption or a lost pool) to \
             placement; 0 for a request placed at submission.",
            [(NO_LABELS, &self.queue_wait)],
        )?;
        histograms(
            e,
            "suanli_writer_batch_operations",
            "Operations the writer took as one batch.",
            [(NO_LABELS, &self.batch_ops)],
        )?;
        histograms(
            e,
            "suanli_writer_apply_seconds",
            "Time to apply one batch (decisions, scheduling passes, simulated leases).",
            [(NO_LABELS, &self.apply)],
        )?;
        histograms(
            e,
            "suanli_writer_commit_seconds",
            "Time to append one batch to the command log and sync it.",
            [(NO_LABELS, &self.commit)],
        )?;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// gRPC

/// Status code names as gRPC's own libraries print them (`OK`, `InvalidArgument`, ...),
/// indexed by code.
const CODES: [&str; 17] = [
    "OK",
    "Canceled",
    "Unknown",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
    "Unauthenticated",
];
const CANCELLED: usize = 1;
const UNKNOWN: usize = 2;

/// A `grpc-status` value as an index into [`CODES`]; anything else is Unknown.
fn code_of(v: &[u8]) -> usize {
    std::str::from_utf8(v)
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
        .filter(|&c| c < CODES.len())
        .unwrap_or(UNKNOWN)
}

#[derive(Debug)]
struct MethodStats {
    service: String,
    method: String,
    codes: [AtomicU64; CODES.len()],
    latency: Histogram,
}

impl MethodStats {
    fn new(service: &str, method: &str) -> Self {
        MethodStats {
            service: service.into(),
            method: method.into(),
            codes: Default::default(),
            latency: Histogram::seconds(),
        }
    }
}

/// Calls per method and code, and their latency. Methods are those of the descriptor sets
/// given at start-up; any other path counts as method `unknown`, so that a client cannot grow
/// the label sets.
#[derive(Debug)]
pub(crate) struct RpcMetrics {
    index: FxHashMap<String, usize>,
    /// One per known method, then `unknown`.
    methods: Box<[MethodStats]>,
}

impl RpcMetrics {
    /// Knows the methods of every service in the encoded descriptor sets.
    pub(crate) fn new(descriptor_sets: &[&[u8]]) -> Self {
        let mut index = FxHashMap::default();
        let mut methods = Vec::new();
        for bytes in descriptor_sets {
            let Ok(set) = prost_types::FileDescriptorSet::decode(*bytes) else {
                continue;
            };
            for file in &set.file {
                for svc in &file.service {
                    let service = match file.package() {
                        "" => svc.name().to_string(),
                        pkg => format!("{pkg}.{}", svc.name()),
                    };
                    for m in &svc.method {
                        let path = format!("/{service}/{}", m.name());
                        if let std::collections::hash_map::Entry::Vacant(slot) = index.entry(path) {
                            slot.insert(methods.len());
                            methods.push(MethodStats::new(&service, m.name()));
                        }
                    }
                }
            }
        }
        methods.push(MethodStats::new("unknown", "unknown"));
        RpcMetrics {
            index,
            methods: methods.into(),
        }
    }

    fn slot(&self, path: &str) -> usize {
        self.index
            .get(path)
            .copied()
            .unwrap_or(self.methods.len() - 1)
    }

    fn record(&self, slot: usize, code: usize, took: Duration) {
        let m = &self.methods[slot];
        m.codes[code].fetch_add(1, Relaxed);
        m.latency.observe(took);
    }
}

impl Collector for RpcMetrics {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), FmtError> {
        let e = &mut enc;
        counters(
            e,
            "suanli_grpc_server_handled",
            "gRPC calls completed, by method and final status code.",
            self.methods.iter().flat_map(|m| {
                m.codes.iter().enumerate().filter_map(move |(code, n)| {
                    let n = n.load(Relaxed);
                    (n > 0).then_some((
                        [
                            ("grpc_service", m.service.as_str()),
                            ("grpc_method", m.method.as_str()),
                            ("grpc_code", CODES[code]),
                        ],
                        n,
                    ))
                })
            }),
        )?;
        histograms(
            e,
            "suanli_grpc_server_handling_seconds",
            "Time from a gRPC call's arrival to its final status (a stream's whole life).",
            self.methods
                .iter()
                .filter(|m| m.latency.count() > 0)
                .map(|m| {
                    (
                        [
                            ("grpc_service", m.service.as_str()),
                            ("grpc_method", m.method.as_str()),
                        ],
                        &m.latency,
                    )
                }),
        )?;
        Ok(())
    }
}

/// A tower layer for the gRPC server that records every call in [`RpcMetrics`].
#[derive(Clone, Debug)]
pub(crate) struct RpcLayer(pub(crate) Arc<RpcMetrics>);

impl<S> tower_layer::Layer<S> for RpcLayer {
    type Service = RpcService<S>;

    fn layer(&self, inner: S) -> RpcService<S> {
        RpcService {
            inner,
            metrics: self.0.clone(),
        }
    }
}

/// See [`RpcLayer`].
#[derive(Clone, Debug)]
pub(crate) struct RpcService<S> {
    inner: S,
    metrics: Arc<RpcMetrics>,
}

/// One call being recorded. Recorded exactly once: with its status, or as cancelled when the
/// response (or its body) is dropped before the status was seen (the client went away).
struct Call {
    metrics: Arc<RpcMetrics>,
    slot: usize,
    start: tokio::time::Instant,
    done: bool,
}

impl Call {
    fn finish(&mut self, code: usize) {
        if !self.done {
            self.done = true;
            self.metrics.record(self.slot, code, self.start.elapsed());
        }
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        self.finish(CANCELLED);
    }
}

impl<S, B, RB> tower_service::Service<http::Request<B>> for RpcService<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<RB>>,
{
    type Response = http::Response<RpcBody<RB>>;
    type Error = S::Error;
    type Future = RpcFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let call = Call {
            slot: self.metrics.slot(req.uri().path()),
            metrics: self.metrics.clone(),
            start: tokio::time::Instant::now(),
            done: false,
        };
        RpcFuture {
            inner: self.inner.call(req),
            call: Some(call),
        }
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`RpcService`].
    pub(crate) struct RpcFuture<F> {
        #[pin]
        inner: F,
        call: Option<Call>,
    }
}

impl<F, RB, E> Future for RpcFuture<F>
where
    F: Future<Output = Result<http::Response<RB>, E>>,
{
    type Output = Result<http::Response<RpcBody<RB>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = std::task::ready!(this.inner.poll(cx));
        let mut call = this.call.take();
        Poll::Ready(match result {
            Ok(resp) => {
                // A trailers-only response (most errors) carries its status in the headers;
                // any other in the trailers at the end of its body.
                if let Some(v) = resp.headers().get("grpc-status")
                    && let Some(c) = call.as_mut()
                {
                    c.finish(code_of(v.as_bytes()));
                }
                Ok(resp.map(|inner| RpcBody { inner, call }))
            }
            Err(e) => {
                if let Some(c) = call.as_mut() {
                    c.finish(UNKNOWN);
                }
                Err(e)
            }
        })
    }
}

pin_project_lite::pin_project! {
    /// A response body that reads the call's status in its trailers.
    pub(crate) struct RpcBody<B> {
        #[pin]
        inner: B,
        call: Option<Call>,
    }
}

impl<B: http_body::Body> http_body::Body for RpcBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        let this = self.project();
        let frame = std::task::ready!(this.inner.poll_frame(cx));
        if let Some(call) = this.call.as_mut() {
            match &frame {
                Some(Ok(f)) => {
                    if let Some(v) = f.trailers_ref().and_then(|t| t.get("grpc-status")) {
                        call.finish(code_of(v.as_bytes()));
                    }
                }
                // The body failed, or ended without a status: not a gRPC answer.
                Some(Err(_)) | None => call.finish(UNKNOWN),
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_count_matches_the_inf_bucket() {
        let h = Histogram::seconds();
        h.observe(Duration::from_nanos(500)); // <= 1 µs
        h.observe(Duration::from_micros(1)); // exactly on the first bound
        h.observe(Duration::from_millis(3)); // <= 5 ms
        h.observe(Duration::from_secs(60)); // above every bound
        let mut registry = Registry::default();
        #[derive(Debug)]
        struct One(Histogram);
        impl Collector for One {
            fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), FmtError> {
                histograms(&mut enc, "t_seconds", "Test.", [(NO_LABELS, &self.0)])
            }
        }
        registry.register_collector(Box::new(One(h)));
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &registry).unwrap();
        let value = |series: &str| -> f64 {
            out.lines()
                .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
                .unwrap_or_else(|| panic!("{series} in\n{out}"))
                .parse()
                .unwrap()
        };
        assert_eq!(value("t_seconds_bucket{le=\"1e-06\"}"), 2.0, "{out}");
        assert_eq!(value("t_seconds_bucket{le=\"0.0025\"}"), 2.0);
        assert_eq!(value("t_seconds_bucket{le=\"0.005\"}"), 3.0);
        assert_eq!(value("t_seconds_bucket{le=\"10\"}"), 3.0);
        assert_eq!(value("t_seconds_bucket{le=\"+Inf\"}"), 4.0);
        assert_eq!(value("t_seconds_count"), 4.0);
        assert!((value("t_seconds_sum") - 60.0030015).abs() < 1e-9);
    }

    #[test]
    fn fleet_gauges_read_the_published_snapshot_and_empty_families_are_left_out() {
        let views = Arc::new(Views::default());
        let pool = |id: &str, health: pb::PoolHealth, allocated: u64| pb::Pool {
            id: id.into(),
            kind: pb::PoolKind::External as i32,
            region: "gy".into(),
            health: health as i32,
            utilisation: Some(pb::Utilisation {
                capacity_devices: 16,
                allocated_devices: allocated,
                ..Default::default()
            }),
            ..Default::default()
        };
        let tenant = |id: &str, limit: Option<u64>| pb::Tenant {
            id: id.into(),
            quota_tflops: 1000,
            borrow_limit_tflops: limit,
            ..Default::default()
        };
        views.publish(crate::views::Snapshot {
            pools: vec![
                pool("up", pb::PoolHealth::Healthy, 8),
                pool("gone", pb::PoolHealth::Lost, 0),
            ],
            tenants: vec![tenant("capped", Some(500)), tenant("free", None)],
            ..Default::default()
        });
        let metrics = Metrics::new(
            views,
            Arc::default(),
            Arc::new(RpcMetrics::new(&[])),
            crate::ha::Replica::standalone(),
            crate::trail::Trail::default(),
        );
        let out = metrics.render().unwrap();
        let has = |line: &str| out.lines().any(|l| l == line);
        assert!(
            has(r#"suanli_pool_allocated_devices{pool="up",kind="external",region="gy"} 8"#),
            "{out}"
        );
        assert!(has(r#"suanli_pool_health{pool="gone",health="lost"} 1"#));
        assert!(has(r#"suanli_pool_health{pool="gone",health="healthy"} 0"#));
        assert!(has(
            r#"suanli_tenant_borrow_limit_tflops{tenant="capped"} 500"#
        ));
        assert!(!out.contains(r#"suanli_tenant_borrow_limit_tflops{tenant="free"}"#));
        // No target configured, no call served: those families are absent, not empty.
        assert!(!out.contains("suanli_fleet_target_tflops"));
        assert!(!out.contains("suanli_grpc_server_handled"));
        assert!(has(r#"suanli_leases{state="running"} 0"#));
        // A broker on its own leads a group of one.
        assert!(has("suanli_replica_leader 1"), "{out}");
        assert!(has("suanli_replica_term 0"));
    }

    #[test]
    fn grpc_status_values_map_to_code_names_and_garbage_to_unknown() {
        assert_eq!(CODES[code_of(b"0")], "OK");
        assert_eq!(CODES[code_of(b"3")], "InvalidArgument");
        assert_eq!(CODES[code_of(b"16")], "Unauthenticated");
        for bad in [&b"17"[..], b"-1", b"", b"ok", b"\xff"] {
            assert_eq!(CODES[code_of(bad)], "Unknown", "{bad:?}");
        }
    }

    #[test]
    fn methods_come_from_the_descriptors_and_unknown_paths_share_one_slot() {
        let rpc = RpcMetrics::new(&[suanli_proto::FILE_DESCRIPTOR_SET, b"not a descriptor"]);
        let submit = rpc.slot("/suanli.v1.TenantService/SubmitRequest");
        assert_eq!(rpc.methods[submit].service, "suanli.v1.TenantService");
        assert_eq!(rpc.methods[submit].method, "SubmitRequest");
        let unknown = rpc.slot("/x.Y/Z");
        assert_eq!(unknown, rpc.slot("/suanli.v1.TenantService/Nope"));
        assert_eq!(rpc.methods[unknown].method, "unknown");
        assert_ne!(submit, unknown);
    }

    #[test]
    fn lease_gauges_follow_records_from_state_to_state() {
        let w = WriterMetrics::default();
        let (q, p, r, done) = (
            pb::RequestState::Queued as i32,
            pb::RequestState::Placed as i32,
            pb::RequestState::Running as i32,
            pb::RequestState::Completed as i32,
        );
        let get = |i: usize| w.leases[i].load(Relaxed);
        w.moved(None, q);
        w.moved(Some(q), p);
        w.moved(None, r);
        assert_eq!((get(0), get(1)), (1, 1));
        w.moved(Some(p), r);
        w.moved(Some(r), r);
        assert_eq!((get(0), get(1)), (0, 2));
        w.moved(Some(r), done);
        w.moved(Some(r), q);
        assert_eq!((get(0), get(1)), (0, 0));
    }

    #[test]
    fn every_command_and_end_reason_has_its_own_slot() {
        let reasons = [
            EndReason::Released,
            EndReason::Expired,
            EndReason::Finished,
            EndReason::JobFailed,
            EndReason::Cancelled,
            EndReason::DeadlineMissed,
            EndReason::Preempted,
            EndReason::PoolLost,
            EndReason::NodeLost,
        ];
        let mut slots: Vec<usize> = reasons.iter().map(|&r| end_reason(r)).collect();
        slots.sort_unstable();
        slots.dedup();
        assert_eq!(slots.len(), END_REASONS.len());
        assert_eq!(command_kind(&Command::Tick), 13);
        assert_eq!(COMMANDS[command_kind(&Command::Tick)], "tick");
    }
}
