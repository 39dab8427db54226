//! The console's JSON: plain serde structs built from one published [`Snapshot`] (and the
//! request map for the queue's head), so a page load never waits for the writer and shows the
//! same figures as `OperatorService`. Enum values go out as short lower-case names (`external`,
//! `capacity_busy`), the same keys `FleetSummary.by_kind` uses.

use serde::Serialize;
use suanli_core::TFLOPS_PER_P;
use suanli_proto::v1 as pb;

use crate::views::{Snapshot, Views};

/// Queued requests the overview lists when the page does not say.
pub(crate) const QUEUE_SHOWN: usize = 200;
/// Most queued requests the overview lists at all: the page shows counts for the rest.
pub(crate) const QUEUE_SHOWN_MAX: usize = 1000;
/// Schedulable capacity the district reached at the end of 2024: the first mark on the
/// capacity gauge (the second is the configured target).
const MARK_2024_TFLOPS: u64 = 10_000 * TFLOPS_PER_P;

/// Capacity and allocation of a part of the fleet, as `pb::Utilisation` plus what is free.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub(crate) struct Util {
    pub capacity_tflops: u64,
    pub allocated_tflops: u64,
    /// Capacity not held by a lease (out-of-service devices included: the API gives them as
    /// a device count only).
    pub free_tflops: u64,
    pub capacity_devices: u64,
    pub allocated_devices: u64,
    pub unavailable_devices: u64,
}

impl From<Option<&pb::Utilisation>> for Util {
    fn from(u: Option<&pb::Utilisation>) -> Self {
        let u = u.copied().unwrap_or_default();
        Util {
            capacity_tflops: u.capacity_tflops,
            allocated_tflops: u.allocated_tflops,
            free_tflops: u.capacity_tflops.saturating_sub(u.allocated_tflops),
            capacity_devices: u.capacity_devices,
            allocated_devices: u.allocated_devices,
            unavailable_devices: u.unavailable_devices,
        }
    }
}

/// One part of a breakdown (a model, a region, a pool kind).
#[derive(Debug, Serialize)]
pub(crate) struct Keyed<'a> {
    pub key: &'a str,
    #[serde(flatten)]
    pub util: Util,
}

/// A line drawn on the capacity gauge.
#[derive(Debug, Serialize)]
pub(crate) struct Mark {
    pub label: &'static str,
    pub tflops: u64,
}

/// Pools by health.
#[derive(Debug, Default, Serialize)]
pub(crate) struct Health {
    pub healthy: u32,
    pub draining: u32,
    pub lost: u32,
}

/// A count of queued requests under a name.
#[derive(Debug, Serialize)]
pub(crate) struct Count {
    pub key: &'static str,
    pub count: u32,
}

/// A queued request as the queue table shows it.
#[derive(Debug, Serialize)]
pub(crate) struct QueueRow<'a> {
    pub id: u64,
    pub position: u32,
    pub tenant: String,
    /// `gang` or `elastic` (empty when the request is no longer readable).
    pub shape: &'static str,
    /// Gang: nodes x devices per node.
    pub nodes: u32,
    pub devices_per_node: u32,
    /// Elastic: the amount of compute wanted.
    pub tflops: u64,
    pub models: Vec<String>,
    pub priority: &'a str,
    pub reason: &'a str,
    pub duration_ms: u64,
    pub submit_time_unix_ms: u64,
    pub estimated_start_unix_ms: Option<u64>,
}

/// The queue: counts of all of it, the first rows of it.
#[derive(Debug, Serialize)]
pub(crate) struct Queue<'a> {
    pub length: u32,
    pub by_priority: Vec<Count>,
    pub by_reason: Vec<Count>,
    pub head: Vec<QueueRow<'a>>,
}

/// A tenant's usage against its quota.
#[derive(Debug, Serialize)]
pub(crate) struct TenantRow<'a> {
    pub id: &'a str,
    pub quota_tflops: u64,
    pub borrow_limit_tflops: Option<u64>,
    pub weight: u32,
    pub used_tflops: u64,
    pub borrowed_tflops: u64,
    pub live_leases: u32,
    pub queued: u32,
}

/// `/api/overview`: everything on the page but the pool table.
#[derive(Debug, Serialize)]
pub(crate) struct Overview<'a> {
    pub time_unix_ms: u64,
    pub marks: Vec<Mark>,
    pub total: Util,
    pub local: Util,
    pub external: Util,
    pub by_model: Vec<Keyed<'a>>,
    pub by_region: Vec<Keyed<'a>>,
    pub by_kind: Vec<Keyed<'a>>,
    pub pools: Health,
    pub live_leases: u32,
    pub queue: Queue<'a>,
    pub tenants: Vec<TenantRow<'a>>,
    /// Requests whose jobs ended most recently, newest first.
    pub jobs: Vec<JobRow>,
}

/// A request whose job ended, as the recent jobs table shows it.
#[derive(Debug, Serialize)]
pub(crate) struct JobRow {
    pub id: u64,
    pub tenant: String,
    pub state: &'static str,
    pub cause: &'static str,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub node_rank: u32,
    pub message: String,
    pub pools: Vec<String>,
    pub ended_unix_ms: u64,
}

/// A node group of a pool.
#[derive(Debug, Serialize)]
pub(crate) struct Group<'a> {
    pub model: &'a str,
    pub devices_per_node: u32,
    pub nodes: u32,
    pub interconnect: &'a str,
    pub price_fen_per_device_hour: u64,
}

/// A row of the pool table.
#[derive(Debug, Serialize)]
pub(crate) struct PoolRow<'a> {
    pub id: &'a str,
    pub display_name: &'a str,
    pub kind: &'static str,
    pub region: &'a str,
    pub rtt_ms: u32,
    pub data_zone: &'a str,
    pub health: &'static str,
    pub groups: Vec<Group<'a>>,
    #[serde(flatten)]
    pub util: Util,
}

/// `/api/pools`: every pool in registration order. No timestamp, so the text changes only
/// when a pool does and the page can skip redrawing the table.
#[derive(Debug, Serialize)]
pub(crate) struct Pools<'a> {
    pub pools: Vec<PoolRow<'a>>,
}

/// The overview of `snapshot`, with at most `shown` rows of the queue (their tenant and shape
/// read from `views`).
pub(crate) fn overview<'a>(snapshot: &'a Snapshot, views: &Views, shown: usize) -> Overview<'a> {
    let fleet = &snapshot.fleet;
    let keyed = |list: &'a [pb::KeyedUtilisation]| {
        list.iter()
            .map(|k| Keyed {
                key: &k.key,
                util: k.utilisation.as_ref().into(),
            })
            .collect()
    };
    let health = fleet
        .pools
        .as_ref()
        .map_or_else(Health::default, |h| Health {
            healthy: h.healthy,
            draining: h.draining,
            lost: h.lost,
        });
    let summary = fleet.queue.clone().unwrap_or_default();
    let mut marks = vec![Mark {
        label: "end of 2024",
        tflops: MARK_2024_TFLOPS,
    }];
    if fleet.target_tflops > 0 {
        marks.push(Mark {
            label: "target",
            tflops: fleet.target_tflops,
        });
    }
    Overview {
        time_unix_ms: fleet.time_unix_ms,
        marks,
        total: fleet.total.as_ref().into(),
        local: fleet.local.as_ref().into(),
        external: fleet.external.as_ref().into(),
        by_model: keyed(&fleet.by_model),
        by_region: keyed(&fleet.by_region),
        by_kind: keyed(&fleet.by_kind),
        pools: health,
        live_leases: fleet.live_leases,
        queue: Queue {
            length: summary.length,
            by_priority: summary
                .by_priority
                .iter()
                .map(|c| Count {
                    key: priority_name(c.priority),
                    count: c.count,
                })
                .collect(),
            by_reason: summary
                .by_reason
                .iter()
                .map(|c| Count {
                    key: reason_name(c.reason),
                    count: c.count,
                })
                .collect(),
            head: queue_head(snapshot, views, shown),
        },
        tenants: snapshot
            .tenants
            .iter()
            .map(|t| {
                let u = t.usage.unwrap_or_default();
                TenantRow {
                    id: &t.id,
                    quota_tflops: t.quota_tflops,
                    borrow_limit_tflops: t.borrow_limit_tflops,
                    weight: t.weight,
                    used_tflops: u.used_tflops,
                    borrowed_tflops: u.borrowed_tflops,
                    live_leases: u.live_leases,
                    queued: u.queued,
                }
            })
            .collect(),
        jobs: recent_jobs(views),
    }
}

/// The requests whose jobs ended most recently, with how they ended.
fn recent_jobs(views: &Views) -> Vec<JobRow> {
    views
        .recent_jobs()
        .into_iter()
        .filter_map(|id| views.requests.get(&id).map(|r| r.clone()))
        .filter_map(|r| {
            let o = r.outcome.as_ref()?;
            let mut pools: Vec<String> = r
                .lease
                .iter()
                .flat_map(|l| l.parts.iter().map(|p| p.pool.clone()))
                .collect();
            pools.dedup();
            Some(JobRow {
                id: r.id,
                tenant: r.tenant.clone(),
                state: match pb::RequestState::try_from(r.state) {
                    Ok(pb::RequestState::Completed) => "completed",
                    _ => "failed",
                },
                cause: cause_name(o.cause),
                exit_code: o.exit_code,
                signal: o.signal,
                node_rank: o.node_rank,
                message: o.message.clone(),
                pools,
                ended_unix_ms: r.update_time_unix_ms,
            })
        })
        .collect()
}

fn cause_name(c: i32) -> &'static str {
    match pb::JobCause::try_from(c) {
        Ok(pb::JobCause::Completed) => "completed",
        Ok(pb::JobCause::Failed) => "failed",
        Ok(pb::JobCause::Cancelled) => "cancelled",
        Ok(pb::JobCause::TimedOut) => "timed_out",
        Ok(pb::JobCause::NodeFailed) => "node_failed",
        Ok(pb::JobCause::Preempted) => "preempted",
        Ok(pb::JobCause::LaunchFailed) => "launch_failed",
        _ => "unspecified",
    }
}

/// The first `shown` requests of the queue, in queue order.
fn queue_head<'a>(snapshot: &'a Snapshot, views: &Views, shown: usize) -> Vec<QueueRow<'a>> {
    snapshot
        .queue
        .entries
        .iter()
        .take(shown)
        .map(|q| {
            // The same estimate `Views::request` gives: the reservation's knows backfill.
            let estimated_start_unix_ms = match snapshot.reserved {
                Some((held, at)) if held == q.id => at,
                _ => snapshot.queue.starts.get(&q.id).copied(),
            };
            let mut row = QueueRow {
                id: q.id,
                position: q.position,
                tenant: String::new(),
                shape: "",
                nodes: 0,
                devices_per_node: 0,
                tflops: 0,
                models: Vec::new(),
                priority: priority_name(q.priority as i32),
                reason: reason_name(q.reason as i32),
                duration_ms: 0,
                submit_time_unix_ms: 0,
                estimated_start_unix_ms,
            };
            // Clone the Arc out so no map shard stays locked while the row is filled.
            let request = views.requests.get(&q.id).map(|r| r.clone());
            if let Some(r) = request {
                row.tenant = r.tenant.clone();
                row.submit_time_unix_ms = r.submit_time_unix_ms;
                if let Some(spec) = &r.spec {
                    row.duration_ms = spec.duration_ms;
                    if let Some(c) = &spec.constraints {
                        row.models = c.models.clone();
                    }
                    match &spec.shape {
                        Some(pb::request_spec::Shape::Gang(g)) => {
                            row.shape = "gang";
                            row.nodes = g.nodes;
                            row.devices_per_node = g.devices_per_node;
                        }
                        Some(pb::request_spec::Shape::Elastic(e)) => {
                            row.shape = "elastic";
                            row.tflops = e.tflops;
                        }
                        None => {}
                    }
                }
            }
            row
        })
        .collect()
}

/// Every pool of `snapshot`.
pub(crate) fn pools(snapshot: &Snapshot) -> Pools<'_> {
    Pools {
        pools: snapshot
            .pools
            .iter()
            .map(|p| PoolRow {
                id: &p.id,
                display_name: if p.display_name.is_empty() {
                    &p.id
                } else {
                    &p.display_name
                },
                kind: kind_name(p.kind),
                region: &p.region,
                rtt_ms: p.rtt_ms,
                data_zone: &p.data_zone,
                health: health_name(p.health),
                groups: p
                    .groups
                    .iter()
                    .map(|g| Group {
                        model: &g.model,
                        devices_per_node: g.devices_per_node,
                        nodes: g.nodes,
                        interconnect: &g.interconnect,
                        price_fen_per_device_hour: g.price_fen_per_device_hour,
                    })
                    .collect(),
                util: p.utilisation.as_ref().into(),
            })
            .collect(),
    }
}

fn priority_name(p: i32) -> &'static str {
    match pb::Priority::try_from(p) {
        Ok(pb::Priority::Critical) => "critical",
        Ok(pb::Priority::Standard) => "standard",
        Ok(pb::Priority::Spot) => "spot",
        _ => "unspecified",
    }
}

fn reason_name(r: i32) -> &'static str {
    match pb::WaitReason::try_from(r) {
        Ok(pb::WaitReason::Pending) => "pending",
        Ok(pb::WaitReason::NotYetStartable) => "not_yet_startable",
        Ok(pb::WaitReason::NoMatchingPool) => "no_matching_pool",
        Ok(pb::WaitReason::Quota) => "quota",
        Ok(pb::WaitReason::CapacityBusy) => "capacity_busy",
        Ok(pb::WaitReason::BehindReservation) => "behind_reservation",
        Ok(pb::WaitReason::WorkloadUnsupported) => "workload_unsupported",
        _ => "unspecified",
    }
}

fn kind_name(k: i32) -> &'static str {
    match pb::PoolKind::try_from(k) {
        Ok(pb::PoolKind::LocalCentre) => "local_centre",
        Ok(pb::PoolKind::LocalCloud) => "local_cloud",
        Ok(pb::PoolKind::External) => "external",
        _ => "unspecified",
    }
}

fn health_name(h: i32) -> &'static str {
    match pb::PoolHealth::try_from(h) {
        Ok(pb::PoolHealth::Healthy) => "healthy",
        Ok(pb::PoolHealth::Draining) => "draining",
        Ok(pb::PoolHealth::Lost) => "lost",
        _ => "unspecified",
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rustc_hash::FxHashMap;

    use super::*;
    use crate::views::{QueueView, Queued};

    fn util(capacity: u64, allocated: u64) -> Option<pb::Utilisation> {
        Some(pb::Utilisation {
            capacity_tflops: capacity,
            allocated_tflops: allocated,
            ..Default::default()
        })
    }

    fn queued(id: u64, position: u32, reason: pb::WaitReason) -> Queued {
        Queued {
            id,
            priority: pb::Priority::Standard,
            reason,
            position,
        }
    }

    #[test]
    fn recent_jobs_show_how_they_ended_newest_first() {
        let views = Views::default();
        for (id, cause, code) in [
            (3, pb::JobCause::Completed, 0),
            (4, pb::JobCause::Failed, 3),
        ] {
            views.requests.insert(
                id,
                Arc::new(pb::Request {
                    id,
                    tenant: "tenant-a".into(),
                    state: if code == 0 {
                        pb::RequestState::Completed
                    } else {
                        pb::RequestState::Failed
                    } as i32,
                    outcome: Some(pb::JobOutcome {
                        cause: cause as i32,
                        exit_code: Some(code),
                        node_rank: 1,
                        ..Default::default()
                    }),
                    lease: Some(pb::Lease {
                        parts: vec![pb::LeasePart {
                            pool: "futian-aicc".into(),
                            ..Default::default()
                        }],
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
            );
            views.job_ended(id);
        }
        // A job ended and then forgotten is left out.
        views.job_ended(99);
        let jobs = recent_jobs(&views);
        assert_eq!(jobs.iter().map(|j| j.id).collect::<Vec<_>>(), [4, 3]);
        assert_eq!(
            (jobs[0].state, jobs[0].cause, jobs[0].exit_code),
            ("failed", "failed", Some(3))
        );
        assert_eq!(jobs[0].pools, ["futian-aicc"]);
        assert_eq!((jobs[1].state, jobs[1].cause), ("completed", "completed"));
        for id in 100..200 {
            views.job_ended(id);
        }
        assert_eq!(views.recent_jobs().len(), crate::views::RECENT_JOBS);
        assert_eq!(views.recent_jobs()[0], 199);
    }

    #[test]
    fn the_overview_carries_the_snapshot_figures_and_caps_the_queue() {
        let views = Views::default();
        views.requests.insert(
            7,
            Arc::new(pb::Request {
                id: 7,
                tenant: "tenant-a".into(),
                spec: Some(pb::RequestSpec {
                    shape: Some(pb::request_spec::Shape::Gang(pb::GangShape {
                        nodes: 2,
                        devices_per_node: 8,
                    })),
                    duration_ms: 60_000,
                    ..Default::default()
                }),
                ..Default::default()
            }),
        );
        let entries = vec![
            queued(7, 1, pb::WaitReason::CapacityBusy),
            queued(8, 2, pb::WaitReason::NoMatchingPool),
            queued(9, 3, pb::WaitReason::Quota),
        ];
        let mut starts = FxHashMap::default();
        starts.insert(8, 1_000);
        let snapshot = Snapshot {
            fleet: pb::FleetSummary {
                time_unix_ms: 42,
                total: util(3000, 2000),
                // Allocated beyond capacity never happens, but must not underflow.
                local: util(1000, 1500),
                queue: Some(pb::QueueSummary {
                    length: 3,
                    ..Default::default()
                }),
                ..Default::default()
            },
            queue: Arc::new(QueueView::new(entries, starts)),
            reserved: Some((7, Some(500))),
            ..Default::default()
        };
        let o = overview(&snapshot, &views, 2);
        assert_eq!(o.time_unix_ms, 42);
        assert_eq!((o.total.capacity_tflops, o.total.free_tflops), (3000, 1000));
        assert_eq!(o.local.free_tflops, 0);
        assert_eq!(o.external, Util::default(), "a missing part reads as empty");
        assert_eq!(o.queue.length, 3);
        assert_eq!(o.queue.head.len(), 2, "capped at the number asked for");
        let head = &o.queue.head[0];
        assert_eq!(
            (head.tenant.as_str(), head.shape, head.nodes, head.reason),
            ("tenant-a", "gang", 2, "capacity_busy")
        );
        assert_eq!(head.estimated_start_unix_ms, Some(500), "the reservation's");
        let unknown = &o.queue.head[1];
        assert_eq!((unknown.tenant.as_str(), unknown.shape), ("", ""));
        assert_eq!(unknown.estimated_start_unix_ms, Some(1_000));
        assert_eq!(o.marks.len(), 1, "no target configured: only the 2024 mark");
    }

    #[test]
    fn pools_keep_registration_order_and_name_their_enums() {
        let pool = |id: &str, kind: pb::PoolKind, health: pb::PoolHealth| pb::Pool {
            id: id.into(),
            kind: kind as i32,
            health: health as i32,
            utilisation: util(100, 25),
            ..Default::default()
        };
        let snapshot = Snapshot {
            pools: vec![
                pool("z", pb::PoolKind::External, pb::PoolHealth::Lost),
                pool("a", pb::PoolKind::LocalCentre, pb::PoolHealth::Healthy),
            ],
            ..Default::default()
        };
        let p = pools(&snapshot);
        let got: Vec<_> = p
            .pools
            .iter()
            .map(|r| (r.id, r.display_name, r.kind, r.health, r.util.free_tflops))
            .collect();
        assert_eq!(
            got,
            [
                ("z", "z", "external", "lost", 75),
                ("a", "a", "local_centre", "healthy", 75)
            ]
        );
        let json = serde_json::to_value(&p).expect("json");
        assert_eq!(json["pools"][0]["capacity_tflops"], 100, "flattened");
        assert_eq!(kind_name(99), "unspecified", "an unknown wire value");
    }
}
