//! The engine's saved state from before incremental passes, read into today's engine, so that
//! a broker's older snapshots still open. Its first pass after reading is a full one; a pass
//! under way goes on as it was.

use super::*;

/// An engine as saved before incremental passes: read it, then turn it into an [`Engine`].
/// One can be made from an engine too, to write what an older broker wrote (for the tests of
/// readers); a pass under way is left out unless it walks the whole queue.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct EngineBeforeIncremental {
    config: ConfigBefore,
    supply: Supply,
    tenants: Vec<TenantBefore>,
    tenant_ids: FxHashMap<String, TenantIx>,
    requests: FxHashMap<RequestId, RequestBefore>,
    queue: WaitQueue,
    ends: BTreeSet<(Millis, RequestId)>,
    live_leases: usize,
    capacity_waiting: [u32; 3],
    spot_leases: u32,
    borrowing_leases: u32,
    preemptible: BTreeSet<RequestId>,
    reservation: Option<Reservation>,
    pass_due: bool,
    _next_timed: Millis,
    arrivals: Vec<RequestId>,
    _ranked: u32,
    pass: Option<PassBefore>,
    passes: u64,
    fleet_epoch: u64,
    subsidies: BTreeMap<String, Discount>,
    next_request: u64,
    now: Millis,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct ConfigBefore {
    default_policy: Policy,
    pass_slice: u32,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct TenantBefore {
    spec: TenantSpec,
    used: Tflops,
    borrowed: Tflops,
    live_leases: u32,
    queued: u32,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct RequestBefore {
    tenant: TenantIx,
    shape: Shape,
    duration: Millis,
    priority: Priority,
    filter: Filter,
    filter_key: u64,
    policy: Policy,
    start_after: Millis,
    deadline: Option<Millis>,
    requeue: bool,
    submitted_at: Millis,
    state: RequestState,
    in_queue: bool,
    queued_in_pass: u64,
    reason: WaitReason,
    _position: u32,
    match_epoch: u64,
    matchable: bool,
    lease: Option<Lease>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct PassBefore {
    id: u64,
    classes: [Vec<RunBefore>; 3],
    class: usize,
    _position: u32,
    preemption_budget: u32,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct RunBefore {
    tenant: TenantIx,
    ids: Vec<RequestId>,
    walked: usize,
}

impl From<EngineBeforeIncremental> for Engine {
    fn from(old: EngineBeforeIncremental) -> Engine {
        let requests = old
            .requests
            .into_iter()
            .map(|(id, r)| {
                let request = Request {
                    tenant: r.tenant,
                    shape: r.shape,
                    duration: r.duration,
                    priority: r.priority,
                    filter: r.filter,
                    filter_key: r.filter_key,
                    policy: r.policy,
                    start_after: r.start_after,
                    deadline: r.deadline,
                    requeue: r.requeue,
                    submitted_at: r.submitted_at,
                    state: r.state,
                    in_queue: r.in_queue,
                    queued_in_pass: r.queued_in_pass,
                    reason: r.reason,
                    key: 0,
                    match_epoch: r.match_epoch,
                    matchable: r.matchable,
                    lease: r.lease,
                };
                (id, request)
            })
            .collect();
        let mut e = Engine {
            config: EngineConfig {
                default_policy: old.config.default_policy,
                pass_slice: old.config.pass_slice,
                incremental: true,
            },
            supply: old.supply,
            tenants: old
                .tenants
                .into_iter()
                .map(|t| Tenant {
                    spec: t.spec,
                    used: t.used,
                    borrowed: t.borrowed,
                    live_leases: t.live_leases,
                    queued: t.queued,
                    relieved_at: 0,
                })
                .collect(),
            tenant_ids: old.tenant_ids,
            requests,
            queue: old.queue,
            ends: old.ends,
            live_leases: old.live_leases,
            capacity_waiting: old.capacity_waiting,
            spot_leases: old.spot_leases,
            borrowing_leases: old.borrowing_leases,
            preemptible: old.preemptible,
            lease_index: None,
            candidate_cache: FxHashMap::default(),
            reservation: old.reservation,
            pass_due: old.pass_due,
            timed: BTreeSet::new(),
            arrivals: old.arrivals,
            index: QueueIndex::default(),
            stamp: 1,
            fleet_woke: 1,
            pending: Wakes {
                full: true,
                ..Wakes::default()
            },
            inbox: Wakes::default(),
            pass_counts: PassCounts::default(),
            fit: FitBounds::default(),
            pass: old.pass.map(|p| PassInProgress {
                id: p.id,
                classes: p.classes.map(|runs| {
                    runs.into_iter()
                        .map(|run| TenantRun {
                            walked: run.walked,
                            cursor: run
                                .walked
                                .checked_sub(1)
                                .map_or(RequestId(0), |i| run.ids[i]),
                            ..TenantRun::new(run.tenant, run.ids)
                        })
                        .collect()
                }),
                class: p.class,
                preemption_budget: p.preemption_budget,
                picked: None,
            }),
            passes: old.passes,
            fleet_epoch: old.fleet_epoch,
            subsidies: old.subsidies,
            next_request: old.next_request,
            now: old.now,
        };
        // The index and the clock's wakes, from the queue.
        let mut queued: Vec<RequestId> = e
            .requests
            .iter()
            .filter(|(_, r)| r.in_queue)
            .map(|(&id, _)| id)
            .collect();
        queued.sort_unstable();
        for id in queued {
            let key = e.key_of(id);
            let r = e.requests.get_mut(&id).expect("queued request");
            r.key = key;
            let reason = r.reason;
            for at in timed_points(r, e.now) {
                e.timed.insert((at, id));
            }
            e.refile(id, None, Some(reason));
        }
        e
    }
}

impl From<&Engine> for EngineBeforeIncremental {
    fn from(e: &Engine) -> EngineBeforeIncremental {
        EngineBeforeIncremental {
            config: ConfigBefore {
                default_policy: e.config.default_policy,
                pass_slice: e.config.pass_slice,
            },
            supply: e.supply.clone(),
            tenants: e
                .tenants
                .iter()
                .map(|t| TenantBefore {
                    spec: t.spec.clone(),
                    used: t.used,
                    borrowed: t.borrowed,
                    live_leases: t.live_leases,
                    queued: t.queued,
                })
                .collect(),
            tenant_ids: e.tenant_ids.clone(),
            requests: e
                .requests
                .iter()
                .map(|(&id, r)| {
                    let before = RequestBefore {
                        tenant: r.tenant,
                        shape: r.shape,
                        duration: r.duration,
                        priority: r.priority,
                        filter: r.filter.clone(),
                        filter_key: r.filter_key,
                        policy: r.policy,
                        start_after: r.start_after,
                        deadline: r.deadline,
                        requeue: r.requeue,
                        submitted_at: r.submitted_at,
                        state: r.state,
                        in_queue: r.in_queue,
                        queued_in_pass: r.queued_in_pass,
                        reason: r.reason,
                        _position: 0,
                        match_epoch: r.match_epoch,
                        matchable: r.matchable,
                        lease: r.lease.clone(),
                    };
                    (id, before)
                })
                .collect(),
            queue: e.queue.clone(),
            ends: e.ends.clone(),
            live_leases: e.live_leases,
            capacity_waiting: e.capacity_waiting,
            spot_leases: e.spot_leases,
            borrowing_leases: e.borrowing_leases,
            preemptible: e.preemptible.clone(),
            reservation: e.reservation.clone(),
            pass_due: e.pass_due,
            _next_timed: Millis::MAX,
            arrivals: e.arrivals.clone(),
            _ranked: 0,
            pass: e
                .pass
                .as_ref()
                .filter(|p| p.picked.is_none())
                .map(|p| PassBefore {
                    id: p.id,
                    classes: p.classes.clone().map(|runs| {
                        runs.into_iter()
                            .map(|run| RunBefore {
                                tenant: run.tenant,
                                ids: run.ids,
                                walked: run.walked,
                            })
                            .collect()
                    }),
                    class: p.class,
                    _position: 0,
                    preemption_budget: p.preemption_budget,
                }),
            passes: e.passes,
            fleet_epoch: e.fleet_epoch,
            subsidies: e.subsidies.clone(),
            next_request: e.next_request,
            now: e.now,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::PoolKind::External;
    use crate::testkit::*;

    #[test]
    fn an_engine_saved_before_incremental_passes_reads_and_decides_on() {
        let mut e = engine(vec![pool("p", External, 5, &[("h100", 8, 2, 1000)])]);
        let hold = submit(&mut e, gang("a", 2, 8, "h100"), 0);
        let waiting = submit(&mut e, gang("a", 1, 8, "h100"), 1);
        ok(e.apply(Command::Tick, 2));
        let bytes = postcard::to_allocvec(&EngineBeforeIncremental::from(&e)).unwrap();
        let old: EngineBeforeIncremental = postcard::from_bytes(&bytes).unwrap();
        let mut read = Engine::from(old);
        assert_eq!(read.audit(), Ok(()));
        assert_eq!(read.digest(), e.digest());
        for engine in [&mut e, &mut read] {
            ok(engine.apply(Command::Release { request: hold }, 3));
            let ev = ok(engine.apply(Command::Tick, 4));
            assert!(ev.contains(&Event::Placed { request: waiting }));
        }
        assert_eq!(read.digest(), e.digest());
        assert_eq!(
            read.pass_counts().full,
            1,
            "the first pass read back is a full one"
        );
    }
}
