//! Conversions between the `suanli.v1` messages and the core's types. Every field of every
//! incoming message is checked here, and a bad one is named in the error.

use suanli_core::query::{FleetUsage, LeaseView, PoolUsage, RequestView, TenantUsage, Utilisation};
use suanli_core::{
    Constraints, EndReason, GroupSpec, JobCause, JobOutcome, Policy, PoolHealth, PoolKind,
    PoolSpec, Priority, RequestSpec, RequestState, Runtime, Runtimes, Shape, TenantSpec,
    WaitReason, Workload,
};
use suanli_proto::v1 as pb;

use suanli_billing::{
    Budget, BudgetPeriod, Fen, Month, SubsidyReport, TenantStatement, Voucher, VoucherId,
    VoucherScope, VoucherSpec,
};

use crate::error::BrokerError;

/// Longest string the broker accepts in an identifier-like field.
pub const MAX_NAME_LEN: usize = 128;

fn check_name(field: &str, value: &str) -> Result<(), BrokerError> {
    if value.len() > MAX_NAME_LEN {
        return Err(BrokerError::field(
            field,
            format!("longer than {MAX_NAME_LEN} bytes"),
        ));
    }
    Ok(())
}

fn check_names(field: &str, values: &[String]) -> Result<(), BrokerError> {
    if values.len() > 64 {
        return Err(BrokerError::field(field, "more than 64 entries"));
    }
    for (i, v) in values.iter().enumerate() {
        check_name(&format!("{field}[{i}]"), v)?;
    }
    Ok(())
}

/// A request spec from the wire, for `tenant`.
pub fn request_spec(
    tenant: &str,
    spec: Option<pb::RequestSpec>,
    field: &str,
) -> Result<RequestSpec, BrokerError> {
    let spec = spec.ok_or_else(|| BrokerError::field(field, "required"))?;
    let shape = match spec.shape {
        Some(pb::request_spec::Shape::Gang(g)) => Shape::Gang {
            nodes: g.nodes,
            devices_per_node: u16::try_from(g.devices_per_node).map_err(|_| {
                BrokerError::field(format!("{field}.gang.devices_per_node"), "too large")
            })?,
        },
        Some(pb::request_spec::Shape::Elastic(e)) => Shape::Elastic {
            tflops: e.tflops,
            min_chunk_tflops: e.min_chunk_tflops,
        },
        None => {
            return Err(BrokerError::field(
                format!("{field}.shape"),
                "gang or elastic is required",
            ));
        }
    };
    let priority = match pb::Priority::try_from(spec.priority) {
        Ok(pb::Priority::Critical) => Priority::Critical,
        Ok(pb::Priority::Standard) | Ok(pb::Priority::Unspecified) => Priority::Standard,
        Ok(pb::Priority::Spot) => Priority::Spot,
        Err(_) => {
            return Err(BrokerError::field(
                format!("{field}.priority"),
                format!("unknown value {}", spec.priority),
            ));
        }
    };
    let policy = match pb::Policy::try_from(spec.policy) {
        Ok(pb::Policy::Unspecified) => None,
        Ok(pb::Policy::Cheapest) => Some(Policy::Cheapest),
        Ok(pb::Policy::LowestLatency) => Some(Policy::LowestLatency),
        Ok(pb::Policy::BestFit) => Some(Policy::BestFit),
        Ok(pb::Policy::CheapestAfterSubsidy) => Some(Policy::CheapestAfterSubsidy),
        Err(_) => {
            return Err(BrokerError::field(
                format!("{field}.policy"),
                format!("unknown value {}", spec.policy),
            ));
        }
    };
    let c = spec.constraints.unwrap_or_default();
    check_names(&format!("{field}.constraints.models"), &c.models)?;
    check_names(&format!("{field}.constraints.regions"), &c.regions)?;
    check_names(&format!("{field}.constraints.pools"), &c.pools)?;
    if let Some(z) = &c.data_zone {
        check_name(&format!("{field}.constraints.data_zone"), z)?;
    }
    Ok(RequestSpec {
        tenant: tenant.to_string(),
        shape,
        duration_ms: spec.duration_ms,
        priority,
        constraints: Constraints {
            models: c.models,
            regions: c.regions,
            pools: c.pools,
            max_rtt_ms: c.max_rtt_ms,
            data_zone: c.data_zone,
            max_price_fen_per_device_hour: c.max_price_fen_per_device_hour,
        },
        policy,
        start_after_ms: spec.start_after_unix_ms,
        deadline_ms: spec.deadline_unix_ms,
        requeue: spec.requeue,
        workload: match spec.workload {
            Some(w) => Some(Box::new(workload(w, &format!("{field}.workload"))?)),
            None => None,
        },
    })
}

/// Limits of a workload (see `Workload` in `types.proto`).
pub mod workload_limits {
    /// Entries of argv.
    pub const ARGV_ENTRIES: usize = 256;
    /// Bytes of one argv entry, or of one env value.
    pub const VALUE_BYTES: usize = 4096;
    /// Entries of env.
    pub const ENV_ENTRIES: usize = 128;
    /// Bytes of an env name.
    pub const ENV_NAME_BYTES: usize = 128;
    /// Bytes of working_dir, or of image.
    pub const PATH_BYTES: usize = 1024;
    /// Bytes of the whole workload.
    pub const TOTAL_BYTES: usize = 64 * 1024;
    /// Longest stop grace, in seconds.
    pub const STOP_GRACE_S: u32 = 3600;
}

/// A workload from the wire, every limit checked; `field` names it in errors.
pub fn workload(w: pb::Workload, field: &str) -> Result<Workload, BrokerError> {
    use workload_limits::*;
    let bad = |sub: String, why: String| BrokerError::field(format!("{field}.{sub}"), why);
    if w.argv.is_empty() {
        return Err(bad("argv".into(), "required: the program to run".into()));
    }
    if w.argv.len() > ARGV_ENTRIES {
        return Err(bad(
            "argv".into(),
            format!("{} entries, more than {ARGV_ENTRIES}", w.argv.len()),
        ));
    }
    if w.argv[0].is_empty() {
        return Err(bad("argv[0]".into(), "empty: the program to run".into()));
    }
    let mut total = 0;
    for (i, a) in w.argv.iter().enumerate() {
        if a.len() > VALUE_BYTES {
            return Err(bad(
                format!("argv[{i}]"),
                format!("{} bytes, more than {VALUE_BYTES}", a.len()),
            ));
        }
        if a.contains('\0') {
            return Err(bad(format!("argv[{i}]"), "contains a NUL byte".into()));
        }
        total += a.len();
    }
    if w.env.len() > ENV_ENTRIES {
        return Err(bad(
            "env".into(),
            format!("{} entries, more than {ENV_ENTRIES}", w.env.len()),
        ));
    }
    let mut env = Vec::with_capacity(w.env.len());
    for (i, v) in w.env.into_iter().enumerate() {
        let name_ok = !v.name.is_empty()
            && v.name.len() <= ENV_NAME_BYTES
            && v.name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_')
            && !v.name.as_bytes()[0].is_ascii_digit();
        if !name_ok {
            return Err(bad(
                format!("env[{i}].name"),
                format!(
                    "{:?} is not a variable name (1 to {ENV_NAME_BYTES} letters, digits and _, \
                     not starting with a digit)",
                    v.name
                ),
            ));
        }
        if v.name.starts_with("SUANLI_") {
            return Err(bad(
                format!("env[{i}].name"),
                format!(
                    "{} is set by the agent (SUANLI_ names are reserved)",
                    v.name
                ),
            ));
        }
        if v.value.len() > VALUE_BYTES {
            return Err(bad(
                format!("env[{i}].value"),
                format!("{} bytes, more than {VALUE_BYTES}", v.value.len()),
            ));
        }
        if v.value.contains('\0') {
            return Err(bad(format!("env[{i}].value"), "contains a NUL byte".into()));
        }
        total += v.name.len() + v.value.len();
        env.push((v.name, v.value));
    }
    for (name, value) in [("working_dir", &w.working_dir), ("image", &w.image)] {
        if value.len() > PATH_BYTES {
            return Err(bad(
                name.into(),
                format!("{} bytes, more than {PATH_BYTES}", value.len()),
            ));
        }
        if value.contains('\0') {
            return Err(bad(name.into(), "contains a NUL byte".into()));
        }
        total += value.len();
    }
    if w.stop_grace_s > STOP_GRACE_S {
        return Err(bad(
            "stop_grace_s".into(),
            format!("{} s, more than {STOP_GRACE_S}", w.stop_grace_s),
        ));
    }
    if total > TOTAL_BYTES {
        return Err(BrokerError::field(
            field,
            format!("{total} bytes in all, more than {TOTAL_BYTES}"),
        ));
    }
    let some = |s: String| (!s.is_empty()).then_some(s);
    Ok(Workload {
        argv: w.argv,
        env,
        working_dir: some(w.working_dir),
        image: some(w.image),
        stop_grace_s: w.stop_grace_s,
    })
}

/// The wire form of a workload.
pub fn workload_to_pb(w: &Workload) -> pb::Workload {
    pb::Workload {
        argv: w.argv.clone(),
        env: w
            .env
            .iter()
            .map(|(name, value)| pb::EnvVar {
                name: name.clone(),
                value: value.clone(),
            })
            .collect(),
        working_dir: w.working_dir.clone().unwrap_or_default(),
        image: w.image.clone().unwrap_or_default(),
        stop_grace_s: w.stop_grace_s,
    }
}

/// The runtimes an agent announced; unknown values are named.
pub fn runtimes(values: &[i32], field: &str) -> Result<Runtimes, BrokerError> {
    let mut out = Vec::with_capacity(values.len());
    for (i, &v) in values.iter().enumerate() {
        out.push(match pb::WorkloadRuntime::try_from(v) {
            Ok(pb::WorkloadRuntime::Command) => Runtime::Command,
            Ok(pb::WorkloadRuntime::Container) => Runtime::Container,
            _ => {
                return Err(BrokerError::field(
                    format!("{field}[{i}]"),
                    format!("unknown workload runtime {v}"),
                ));
            }
        });
    }
    Ok(Runtimes::of(out))
}

/// The longest outcome message kept.
pub const MAX_OUTCOME_MESSAGE: usize = 1024;

/// A job outcome from an agent's report; `failed` is the report's kind, for reports without
/// an outcome (older agents, simulated jobs).
pub fn job_outcome(o: Option<pb::JobOutcome>, failed: bool) -> JobOutcome {
    let fallback = if failed {
        JobCause::Failed
    } else {
        JobCause::Completed
    };
    let Some(o) = o else {
        return JobOutcome::bare(fallback);
    };
    let cause = match pb::JobCause::try_from(o.cause) {
        Ok(pb::JobCause::Completed) => JobCause::Completed,
        Ok(pb::JobCause::Failed) => JobCause::Failed,
        Ok(pb::JobCause::Cancelled) => JobCause::Cancelled,
        Ok(pb::JobCause::TimedOut) => JobCause::TimedOut,
        Ok(pb::JobCause::NodeFailed) => JobCause::NodeFailed,
        Ok(pb::JobCause::Preempted) => JobCause::Preempted,
        Ok(pb::JobCause::LaunchFailed) => JobCause::LaunchFailed,
        Ok(pb::JobCause::Unspecified) | Err(_) => fallback,
    };
    let mut message = o.message;
    if message.len() > MAX_OUTCOME_MESSAGE {
        let mut end = MAX_OUTCOME_MESSAGE;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
    }
    JobOutcome {
        cause,
        exit_code: o.exit_code,
        signal: o.signal,
        node_rank: o.node_rank,
        message,
    }
}

/// The wire form of a job outcome.
pub fn job_outcome_to_pb(o: &JobOutcome) -> pb::JobOutcome {
    pb::JobOutcome {
        cause: match o.cause {
            JobCause::Completed => pb::JobCause::Completed,
            JobCause::Failed => pb::JobCause::Failed,
            JobCause::Cancelled => pb::JobCause::Cancelled,
            JobCause::TimedOut => pb::JobCause::TimedOut,
            JobCause::NodeFailed => pb::JobCause::NodeFailed,
            JobCause::Preempted => pb::JobCause::Preempted,
            JobCause::LaunchFailed => pb::JobCause::LaunchFailed,
        } as i32,
        exit_code: o.exit_code,
        signal: o.signal,
        node_rank: o.node_rank,
        message: o.message.clone(),
    }
}

/// The wire form of a core request spec.
pub fn spec_to_pb(spec: &RequestSpec) -> pb::RequestSpec {
    pb::RequestSpec {
        shape: Some(match spec.shape {
            Shape::Gang {
                nodes,
                devices_per_node,
            } => pb::request_spec::Shape::Gang(pb::GangShape {
                nodes,
                devices_per_node: devices_per_node as u32,
            }),
            Shape::Elastic {
                tflops,
                min_chunk_tflops,
            } => pb::request_spec::Shape::Elastic(pb::ElasticShape {
                tflops,
                min_chunk_tflops,
            }),
        }),
        duration_ms: spec.duration_ms,
        priority: priority_to_pb(spec.priority) as i32,
        constraints: Some(pb::Constraints {
            models: spec.constraints.models.clone(),
            regions: spec.constraints.regions.clone(),
            pools: spec.constraints.pools.clone(),
            max_rtt_ms: spec.constraints.max_rtt_ms,
            data_zone: spec.constraints.data_zone.clone(),
            max_price_fen_per_device_hour: spec.constraints.max_price_fen_per_device_hour,
        }),
        policy: match spec.policy {
            None => pb::Policy::Unspecified,
            Some(Policy::Cheapest) => pb::Policy::Cheapest,
            Some(Policy::LowestLatency) => pb::Policy::LowestLatency,
            Some(Policy::BestFit) => pb::Policy::BestFit,
            Some(Policy::CheapestAfterSubsidy) => pb::Policy::CheapestAfterSubsidy,
        } as i32,
        start_after_unix_ms: spec.start_after_ms,
        deadline_unix_ms: spec.deadline_ms,
        requeue: spec.requeue,
        workload: spec.workload.as_deref().map(workload_to_pb),
        // Only asked at submission; the record does not keep it.
        wait_for_pools: false,
    }
}

/// Wire priority.
pub fn priority_to_pb(p: Priority) -> pb::Priority {
    match p {
        Priority::Critical => pb::Priority::Critical,
        Priority::Standard => pb::Priority::Standard,
        Priority::Spot => pb::Priority::Spot,
    }
}

/// Wire request state.
pub fn state_to_pb(s: RequestState) -> pb::RequestState {
    match s {
        RequestState::Queued => pb::RequestState::Queued,
        RequestState::Placed => pb::RequestState::Placed,
        RequestState::Running => pb::RequestState::Running,
        RequestState::Completed => pb::RequestState::Completed,
        RequestState::Failed => pb::RequestState::Failed,
        RequestState::Cancelled => pb::RequestState::Cancelled,
        RequestState::Preempted => pb::RequestState::Preempted,
        RequestState::Lost => pb::RequestState::Lost,
    }
}

/// Wire wait reason.
pub fn reason_to_pb(r: WaitReason) -> pb::WaitReason {
    match r {
        WaitReason::Pending => pb::WaitReason::Pending,
        WaitReason::NotYetStartable => pb::WaitReason::NotYetStartable,
        WaitReason::NoMatchingPool => pb::WaitReason::NoMatchingPool,
        WaitReason::Quota => pb::WaitReason::Quota,
        WaitReason::CapacityBusy => pb::WaitReason::CapacityBusy,
        WaitReason::BehindReservation => pb::WaitReason::BehindReservation,
        WaitReason::WorkloadUnsupported => pb::WaitReason::WorkloadUnsupported,
    }
}

/// Wire end reason.
pub fn end_to_pb(r: EndReason) -> pb::EndReason {
    match r {
        EndReason::Released => pb::EndReason::Released,
        EndReason::Expired => pb::EndReason::Expired,
        EndReason::Finished => pb::EndReason::Finished,
        EndReason::JobFailed => pb::EndReason::JobFailed,
        EndReason::Cancelled => pb::EndReason::Cancelled,
        EndReason::DeadlineMissed => pb::EndReason::DeadlineMissed,
        EndReason::Preempted => pb::EndReason::Preempted,
        EndReason::PoolLost => pb::EndReason::PoolLost,
        EndReason::NodeLost => pb::EndReason::NodeLost,
    }
}

/// The resource name of a request.
pub fn request_name(tenant: &str, id: u64) -> String {
    format!("tenants/{tenant}/requests/{id}")
}

/// Parses `tenants/{tenant}/requests/{id}`.
pub fn parse_request_name(name: &str, field: &str) -> Result<(String, u64), BrokerError> {
    let bad = || {
        BrokerError::field(
            field,
            format!("{name:?} is not tenants/{{tenant}}/requests/{{id}}"),
        )
    };
    let mut parts = name.split('/');
    match (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) {
        (Some("tenants"), Some(t), Some("requests"), Some(id), None) if !t.is_empty() => {
            Ok((t.to_string(), id.parse().map_err(|_| bad())?))
        }
        _ => Err(bad()),
    }
}

/// Parses `pools/{pool}` (or a bare pool id).
pub fn parse_pool_name(name: &str, field: &str) -> Result<String, BrokerError> {
    let id = name.strip_prefix("pools/").unwrap_or(name);
    if id.is_empty() || id.contains('/') {
        return Err(BrokerError::field(
            field,
            format!("{name:?} is not pools/{{pool}}"),
        ));
    }
    check_name(field, id)?;
    Ok(id.to_string())
}

fn lease_to_pb(l: &LeaseView) -> pb::Lease {
    pb::Lease {
        start_unix_ms: l.start,
        end_unix_ms: l.end,
        tflops: l.tflops,
        price_fen_per_hour: l.price_fen_per_hour,
        borrowed_tflops: l.borrowed_tflops,
        parts: l
            .parts
            .iter()
            .map(|p| pb::LeasePart {
                pool: p.pool.clone(),
                group: p.group,
                model: p.model.clone(),
                node: p.node,
                devices: p.devices as u32,
                // Fixed by the writer at placement.
                price_fen_per_device_hour: 0,
                billing_increment_s: None,
            })
            .collect(),
        running_since_unix_ms: None,
    }
}

/// The wire form of a live request.
pub fn request_to_pb(v: &RequestView, spec: &pb::RequestSpec, now: u64) -> pb::Request {
    pb::Request {
        name: request_name(&v.tenant, v.id.0),
        id: v.id.0,
        tenant: v.tenant.clone(),
        spec: Some(spec.clone()),
        state: state_to_pb(v.state) as i32,
        wait: v.reason.map(|r| pb::WaitInfo {
            reason: reason_to_pb(r) as i32,
            position: 0,
            earliest_start_unix_ms: None,
        }),
        lease: v.lease.as_ref().map(lease_to_pb),
        end_reason: pb::EndReason::Unspecified as i32,
        submit_time_unix_ms: v.submitted_at,
        update_time_unix_ms: now,
        // Counted by the writer.
        leases: 0,
        // Set by the writer when the job ends.
        outcome: None,
    }
}

/// Wire utilisation.
pub fn utilisation_to_pb(u: &Utilisation) -> pb::Utilisation {
    pb::Utilisation {
        capacity_tflops: u.capacity_tflops,
        allocated_tflops: u.allocated_tflops,
        capacity_devices: u.capacity_devices,
        allocated_devices: u.allocated_devices,
        unavailable_devices: u.unavailable_devices,
    }
}

fn kind_to_pb(k: PoolKind) -> pb::PoolKind {
    match k {
        PoolKind::LocalCentre => pb::PoolKind::LocalCentre,
        PoolKind::LocalCloud => pb::PoolKind::LocalCloud,
        PoolKind::External => pb::PoolKind::External,
    }
}

/// Wire pool health.
pub fn health_to_pb(h: PoolHealth) -> pb::PoolHealth {
    match h {
        PoolHealth::Healthy => pb::PoolHealth::Healthy,
        PoolHealth::Draining => pb::PoolHealth::Draining,
        PoolHealth::Lost => pb::PoolHealth::Lost,
    }
}

/// The wire form of a pool with its utilisation.
pub fn pool_to_pb(spec: &PoolSpec, usage: &PoolUsage) -> pb::Pool {
    pb::Pool {
        health: health_to_pb(usage.health) as i32,
        utilisation: Some(utilisation_to_pb(&usage.usage)),
        ..pool_spec_to_pb(spec)
    }
}

/// The wire form of a pool's specification (a registration).
pub fn pool_spec_to_pb(spec: &PoolSpec) -> pb::Pool {
    pb::Pool {
        name: format!("pools/{}", spec.id),
        id: spec.id.clone(),
        display_name: spec.name.clone(),
        kind: kind_to_pb(spec.kind) as i32,
        region: spec.region.clone(),
        rtt_ms: spec.rtt_ms,
        data_zone: spec.data_zone.clone(),
        groups: spec
            .groups
            .iter()
            .map(|g| pb::NodeGroup {
                model: g.model.clone(),
                devices_per_node: g.devices_per_node as u32,
                nodes: g.nodes,
                interconnect: g.interconnect.clone(),
                price_fen_per_device_hour: g.price_fen_per_device_hour,
            })
            .collect(),
        health: pb::PoolHealth::Unspecified as i32,
        utilisation: None,
        billing_increment_s: spec.billing_increment_s,
    }
}

/// A pool spec from the wire.
pub fn pool_from_pb(p: Option<pb::Pool>, field: &str) -> Result<PoolSpec, BrokerError> {
    let p = p.ok_or_else(|| BrokerError::field(field, "required"))?;
    let id = if p.id.is_empty() {
        p.name.strip_prefix("pools/").unwrap_or(&p.name).to_string()
    } else {
        p.id
    };
    check_name(&format!("{field}.id"), &id)?;
    let kind = match pb::PoolKind::try_from(p.kind) {
        Ok(pb::PoolKind::LocalCentre) => PoolKind::LocalCentre,
        Ok(pb::PoolKind::LocalCloud) => PoolKind::LocalCloud,
        Ok(pb::PoolKind::External) => PoolKind::External,
        _ => {
            return Err(BrokerError::field(
                format!("{field}.kind"),
                "local_centre, local_cloud or external is required",
            ));
        }
    };
    let mut groups = Vec::with_capacity(p.groups.len());
    for (i, g) in p.groups.into_iter().enumerate() {
        groups.push(GroupSpec {
            model: g.model,
            devices_per_node: u16::try_from(g.devices_per_node).map_err(|_| {
                BrokerError::field(format!("{field}.groups[{i}].devices_per_node"), "too large")
            })?,
            nodes: g.nodes,
            interconnect: g.interconnect,
            price_fen_per_device_hour: g.price_fen_per_device_hour,
        });
    }
    Ok(PoolSpec {
        name: if p.display_name.is_empty() {
            id.clone()
        } else {
            p.display_name
        },
        id,
        kind,
        region: p.region,
        rtt_ms: p.rtt_ms,
        data_zone: p.data_zone,
        groups,
        billing_increment_s: p.billing_increment_s,
    })
}

/// The wire form of a tenant with its usage.
pub fn tenant_to_pb(t: &TenantUsage) -> pb::Tenant {
    pb::Tenant {
        name: format!("tenants/{}", t.name),
        id: t.name.clone(),
        quota_tflops: t.quota_tflops,
        borrow_limit_tflops: t.borrow_limit_tflops,
        weight: t.weight,
        usage: Some(pb::TenantUsage {
            used_tflops: t.used_tflops,
            borrowed_tflops: t.borrowed_tflops,
            live_leases: t.live_leases,
            queued: t.queued,
        }),
    }
}

/// A tenant spec from the wire.
pub fn tenant_from_pb(t: Option<pb::Tenant>, field: &str) -> Result<TenantSpec, BrokerError> {
    let t = t.ok_or_else(|| BrokerError::field(field, "required"))?;
    let name = if t.id.is_empty() {
        t.name
            .strip_prefix("tenants/")
            .unwrap_or(&t.name)
            .to_string()
    } else {
        t.id
    };
    if name.is_empty() || name.contains('/') {
        return Err(BrokerError::field(
            format!("{field}.id"),
            "a tenant name without '/' is required",
        ));
    }
    check_name(&format!("{field}.id"), &name)?;
    Ok(TenantSpec {
        name,
        quota_tflops: t.quota_tflops,
        borrow_limit_tflops: t.borrow_limit_tflops,
        weight: t.weight,
    })
}

/// Fleet-wide figures.
pub fn fleet_to_pb(
    u: &FleetUsage,
) -> (
    pb::Utilisation,
    Vec<pb::KeyedUtilisation>,
    Vec<pb::KeyedUtilisation>,
    Vec<pb::KeyedUtilisation>,
) {
    let keyed = |m: &std::collections::BTreeMap<String, Utilisation>| {
        m.iter()
            .map(|(k, v)| pb::KeyedUtilisation {
                key: k.clone(),
                utilisation: Some(utilisation_to_pb(v)),
            })
            .collect()
    };
    let kinds = u
        .by_kind
        .iter()
        .map(|(k, v)| pb::KeyedUtilisation {
            key: k.to_string(),
            utilisation: Some(utilisation_to_pb(v)),
        })
        .collect();
    (
        utilisation_to_pb(&u.total),
        keyed(&u.by_model),
        keyed(&u.by_region),
        kinds,
    )
}

// Accounting: vouchers, budgets, statements, the subsidy report.

fn kind_from_pb(value: i32, field: &str) -> Result<PoolKind, BrokerError> {
    match pb::PoolKind::try_from(value) {
        Ok(pb::PoolKind::LocalCentre) => Ok(PoolKind::LocalCentre),
        Ok(pb::PoolKind::LocalCloud) => Ok(PoolKind::LocalCloud),
        Ok(pb::PoolKind::External) => Ok(PoolKind::External),
        _ => Err(BrokerError::field(
            field,
            format!("{value} is not a pool kind (1 local centre, 2 local cloud, 3 external)"),
        )),
    }
}

fn fen_field(value: i64, field: &str) -> Result<Fen, BrokerError> {
    if value < 0 {
        return Err(BrokerError::field(field, format!("{value} is negative")));
    }
    Ok(Fen(value))
}

/// A voucher to issue, validated; errors name the field under `field`.
pub fn voucher_from_pb(
    v: Option<pb::VoucherSpec>,
    field: &str,
) -> Result<VoucherSpec, BrokerError> {
    let v = v.ok_or_else(|| BrokerError::field(field, "required"))?;
    let f = |name: &str| format!("{field}.{name}");
    for (name, value) in [("id", &v.id), ("tenant", &v.tenant)] {
        if value.is_empty() {
            return Err(BrokerError::field(f(name), "required"));
        }
        check_name(&f(name), value)?;
    }
    if v.face_value_fen <= 0 {
        return Err(BrokerError::field(
            f("face_value_fen"),
            "must be above zero",
        ));
    }
    if v.rate_bp == 0 || v.rate_bp > suanli_billing::FULL_RATE_BP {
        return Err(BrokerError::field(
            f("rate_bp"),
            format!("{} is outside 1..=10000 (0.01% to 100%)", v.rate_bp),
        ));
    }
    let per_lease_cap = match v.per_lease_cap_fen {
        Some(cap) if cap <= 0 => {
            return Err(BrokerError::field(
                f("per_lease_cap_fen"),
                "must be above zero",
            ));
        }
        cap => cap.map(Fen),
    };
    let scope = v
        .scope
        .ok_or_else(|| BrokerError::field(f("scope"), "required"))?;
    let given = usize::from(scope.all_pools)
        + usize::from(!scope.pools.is_empty())
        + usize::from(!scope.pool_kinds.is_empty());
    if given != 1 {
        return Err(BrokerError::field(
            f("scope"),
            "give exactly one of all_pools, pools and pool_kinds",
        ));
    }
    let scope = if scope.all_pools {
        VoucherScope::AllPools
    } else if !scope.pools.is_empty() {
        check_names(&f("scope.pools"), &scope.pools)?;
        VoucherScope::Pools(scope.pools.into_iter().collect())
    } else {
        VoucherScope::PoolKinds(
            scope
                .pool_kinds
                .iter()
                .map(|&k| kind_from_pb(k, &f("scope.pool_kinds")))
                .collect::<Result<_, _>>()?,
        )
    };
    if v.valid_until_unix_ms <= v.valid_from_unix_ms {
        return Err(BrokerError::field(
            f("valid_until_unix_ms"),
            "must be after valid_from_unix_ms",
        ));
    }
    let spec = VoucherSpec {
        id: VoucherId::new(v.id),
        tenant: v.tenant,
        face_value: Fen(v.face_value_fen),
        rate_bp: v.rate_bp,
        per_lease_cap,
        scope,
        valid_from: v.valid_from_unix_ms,
        valid_until: v.valid_until_unix_ms,
    };
    spec.validate().map_err(crate::billing::billing_error)?;
    Ok(spec)
}

/// A voucher with its balance.
pub fn voucher_to_pb(v: &Voucher) -> pb::VoucherBalance {
    let s = &v.spec;
    let scope = match &s.scope {
        VoucherScope::AllPools => pb::VoucherScope {
            all_pools: true,
            ..Default::default()
        },
        VoucherScope::Pools(pools) => pb::VoucherScope {
            pools: pools.iter().cloned().collect(),
            ..Default::default()
        },
        VoucherScope::PoolKinds(kinds) => pb::VoucherScope {
            pool_kinds: kinds.iter().map(|&k| kind_to_pb(k) as i32).collect(),
            ..Default::default()
        },
    };
    pb::VoucherBalance {
        spec: Some(pb::VoucherSpec {
            id: s.id.0.clone(),
            tenant: s.tenant.clone(),
            face_value_fen: s.face_value.fen(),
            rate_bp: s.rate_bp,
            per_lease_cap_fen: s.per_lease_cap.map(Fen::fen),
            scope: Some(scope),
            valid_from_unix_ms: s.valid_from,
            valid_until_unix_ms: s.valid_until,
        }),
        scope_label: s.scope.label(),
        issued_unix_ms: v.issued_at,
        used_fen: v.used.fen(),
        remaining_fen: v.remaining().fen(),
    }
}

/// A budget to set: `None` removes the tenant's budget.
pub fn budget_from_pb(b: Option<pb::Budget>, field: &str) -> Result<Option<Budget>, BrokerError> {
    let Some(b) = b else { return Ok(None) };
    let limit = fen_field(b.limit_fen, &format!("{field}.limit_fen"))?;
    match pb::BudgetPeriod::try_from(b.period) {
        Ok(pb::BudgetPeriod::Monthly) => Ok(Some(Budget::monthly(limit))),
        Ok(pb::BudgetPeriod::Total) => Ok(Some(Budget::total(limit))),
        _ => Err(BrokerError::field(
            format!("{field}.period"),
            format!("{} is not a budget period (1 monthly, 2 total)", b.period),
        )),
    }
}

/// A budget on the wire.
pub fn budget_to_pb(b: &Budget) -> pb::Budget {
    pb::Budget {
        limit_fen: b.limit.fen(),
        period: match b.period {
            BudgetPeriod::Monthly => pb::BudgetPeriod::Monthly,
            BudgetPeriod::Total => pb::BudgetPeriod::Total,
        } as i32,
    }
}

/// A month `YYYY-MM`; empty is the month containing `now`.
pub fn month_from_pb(text: &str, field: &str, now: u64) -> Result<Month, BrokerError> {
    if text.is_empty() {
        return Ok(Month::containing(now));
    }
    text.parse()
        .map_err(|e: suanli_billing::BillingError| BrokerError::field(field, e.to_string()))
}

/// A tenant's statement on the wire.
pub fn statement_to_pb(s: &TenantStatement) -> pb::Statement {
    pb::Statement {
        tenant: s.tenant.clone(),
        month: s.month.to_string(),
        leases: s.leases,
        lines: s
            .lines
            .iter()
            .map(|l| pb::UsageLine {
                model: l.model.clone(),
                pool_kind: kind_to_pb(l.pool_kind) as i32,
                lease_parts: l.lease_parts,
                milli_p_hours: u64::try_from(l.milli_p_hours()).unwrap_or(u64::MAX),
                cost_fen: l.cost.fen(),
                subsidy_fen: l.subsidy.fen(),
                due_fen: l.due.fen(),
            })
            .collect(),
        vouchers: s
            .vouchers
            .iter()
            .map(|v| pb::VoucherLine {
                voucher: v.voucher.0.clone(),
                rate_bp: v.rate_bp,
                scope: v.scope.clone(),
                issued_fen: v.issued.fen(),
                used_in_month_fen: v.used_in_month.fen(),
                remaining_fen: v.remaining.fen(),
            })
            .collect(),
        cost_fen: s.cost.fen(),
        subsidy_fen: s.subsidy.fen(),
        due_fen: s.due.fen(),
        adjustments_fen: s.adjustments_total.fen(),
        payable_fen: s.payable.fen(),
        usage_csv: s.usage_csv(),
        vouchers_csv: s.vouchers_csv(),
        adjustments: s
            .adjustments
            .iter()
            .map(|a| pb::Adjustment {
                time_unix_ms: a.at,
                amount_fen: a.amount.fen(),
                reason: a.reason.clone(),
            })
            .collect(),
    }
}

/// The subsidy report on the wire.
pub fn subsidy_report_to_pb(r: &SubsidyReport) -> pb::GetSubsidyReportResponse {
    pb::GetSubsidyReportResponse {
        months: r
            .months
            .iter()
            .map(|m| pb::SubsidyMonth {
                month: m.month.to_string(),
                by_pool_kind: m
                    .by_pool_kind
                    .iter()
                    .filter(|(_, a)| a.is_positive())
                    .map(|(&k, a)| pb::PoolKindAmount {
                        pool_kind: kind_to_pb(k) as i32,
                        amount_fen: a.fen(),
                    })
                    .collect(),
                spent_fen: m.spent.fen(),
                issued_fen: m.issued.fen(),
                budget_fen: m.budget.map(Fen::fen),
                remaining_fen: m.remaining.map(Fen::fen),
            })
            .collect(),
        csv: r.to_csv(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_names_parse_and_name_the_field() {
        assert_eq!(
            parse_request_name("tenants/a/requests/7", "name").unwrap(),
            ("a".into(), 7)
        );
        let e = parse_request_name("tenants/a/requests/x", "name").unwrap_err();
        assert_eq!(
            e.to_string(),
            "field name: \"tenants/a/requests/x\" is not tenants/{tenant}/requests/{id}"
        );
        assert!(parse_request_name("tenants//requests/1", "name").is_err());
    }

    #[test]
    fn a_spec_without_shape_is_refused_by_field() {
        let e = request_spec("a", Some(pb::RequestSpec::default()), "spec").unwrap_err();
        assert_eq!(
            e.to_string(),
            "field spec.shape: gang or elastic is required"
        );
        let e = request_spec("a", None, "spec").unwrap_err();
        assert_eq!(e.to_string(), "field spec: required");
    }

    #[test]
    fn specs_round_trip() {
        let spec = RequestSpec {
            tenant: "a".into(),
            shape: Shape::Gang {
                nodes: 2,
                devices_per_node: 8,
            },
            duration_ms: 5,
            priority: Priority::Spot,
            constraints: Constraints {
                models: vec!["h100".into()],
                max_rtt_ms: Some(3),
                ..Default::default()
            },
            policy: Some(Policy::BestFit),
            start_after_ms: Some(9),
            deadline_ms: None,
            requeue: true,
            workload: None,
        };
        assert_eq!(
            request_spec("a", Some(spec_to_pb(&spec)), "spec").unwrap(),
            spec
        );
    }
}
