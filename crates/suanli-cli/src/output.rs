//! What the client commands print: aligned tables and key-value blocks for people, JSON for
//! programs.
//!
//! Tables use the platform's units: compute in P with one decimal (1P = 1000 TFLOPS), money in
//! CNY with two decimals (the API counts fen), times in RFC 3339 UTC, enums by their short
//! lower-case names (`queued`, `capacity_busy`).
//!
//! JSON mirrors the proto messages: the same field names as the proto files, integers as JSON
//! numbers in the API's units (`_tflops`, `_ms`, `_unix_ms`, `_fen`), enums by their full proto
//! names (`REQUEST_STATE_QUEUED`), unset optional fields and messages as `null`, and of a
//! `oneof` only the member that is set.

use std::fmt::Write as _;

use serde_json::{Map, Value, json};
use suanli_core::TFLOPS_PER_P;
use suanli_proto::v1::{
    Constraints, EndReason, FleetSummary, JobCause, JobOutcome, KeyedUtilisation, Lease, LeasePart,
    Policy, Pool, PoolHealth, PoolKind, Priority, Quote, Request, RequestEvent, RequestEventKind,
    RequestSpec, RequestState, Tenant, Utilisation, WaitInfo, WaitReason, Workload,
    request_spec::Shape,
};

use crate::time::format_rfc3339;

// ---------------------------------------------------------------------------------------------
// Units

/// Compute in P with one decimal, rounded to the nearest tenth: `10496.1`.
pub fn p(tflops: u64) -> String {
    let tenths = (u128::from(tflops) + 50) / 100;
    format!("{}.{}", tenths / 10, tenths % 10)
}

/// Compute in P with as many decimals as needed to be exact: `5`, `1.5`, `0.25`.
pub fn p_exact(tflops: u64) -> String {
    let (whole, frac) = (tflops / TFLOPS_PER_P, tflops % TFLOPS_PER_P);
    if frac == 0 {
        whole.to_string()
    } else {
        format!("{whole}.{}", format!("{frac:03}").trim_end_matches('0'))
    }
}

/// Money in CNY with two decimals: 123456 fen is `1234.56`.
pub fn cny(fen: u64) -> String {
    format!("{}.{:02}", fen / 100, fen % 100)
}

/// `part` as a percentage of `whole` with one decimal, `-` when `whole` is zero.
pub fn pct(part: u64, whole: u64) -> String {
    if whole == 0 {
        return "-".to_string();
    }
    let tenths = (u128::from(part) * 1000 + u128::from(whole) / 2) / u128::from(whole);
    format!("{}.{}", tenths / 10, tenths % 10)
}

/// A time as RFC 3339 UTC, `-` for zero (unset).
pub fn time(unix_ms: u64) -> String {
    if unix_ms == 0 {
        "-".to_string()
    } else {
        format_rfc3339(unix_ms)
    }
}

/// A duration in the units people write: `2h`, `1h30m`, `45s`, `1d6h`, `250ms`.
pub fn duration(ms: u64) -> String {
    if ms == 0 {
        return "0s".to_string();
    }
    let mut out = String::new();
    let mut rest = ms;
    for (unit, size) in [
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1000),
        ("ms", 1),
    ] {
        if rest >= size {
            write!(out, "{}{unit}", rest / size).expect("write to String");
            rest %= size;
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Enums

/// The full proto name of an enum value, or its number when this client does not know it.
fn enum_name<E: TryFrom<i32>>(value: i32, name: impl Fn(&E) -> &'static str) -> String {
    E::try_from(value)
        .map(|e| name(&e).to_string())
        .unwrap_or_else(|_| value.to_string())
}

/// The short lower-case name of an enum value: `REQUEST_STATE_QUEUED` is `queued`.
fn enum_short<E: TryFrom<i32>>(
    value: i32,
    prefix: &str,
    name: impl Fn(&E) -> &'static str,
) -> String {
    let full = enum_name(value, name);
    full.strip_prefix(prefix)
        .unwrap_or(&full)
        .to_ascii_lowercase()
}

/// Short name of a request state.
pub fn state(v: i32) -> String {
    enum_short(v, "REQUEST_STATE_", RequestState::as_str_name)
}
/// Short name of a priority class; unset is `standard`, as the broker treats it.
pub fn priority(v: i32) -> String {
    if v == Priority::Unspecified as i32 {
        return "standard".to_string();
    }
    enum_short(v, "PRIORITY_", Priority::as_str_name)
}
/// Short name of a placement policy; unset is the broker's default.
pub fn policy(v: i32) -> String {
    if v == Policy::Unspecified as i32 {
        return "broker default".to_string();
    }
    enum_short(v, "POLICY_", Policy::as_str_name)
}
/// Short name of a wait reason.
pub fn wait_reason(v: i32) -> String {
    enum_short(v, "WAIT_REASON_", WaitReason::as_str_name)
}
/// Short name of an end reason.
pub fn end_reason(v: i32) -> String {
    enum_short(v, "END_REASON_", EndReason::as_str_name)
}
/// Short name of a job's end cause.
pub fn job_cause(v: i32) -> String {
    enum_short(v, "JOB_CAUSE_", JobCause::as_str_name)
}

/// How a job ended, in a few words: `failed, exit 3 on node 1: ...`.
pub fn outcome_text(o: &JobOutcome) -> String {
    let mut text = job_cause(o.cause);
    match (o.exit_code, o.signal) {
        (_, Some(s)) => write!(text, ", signal {s}").expect("write to String"),
        (Some(c), None) if c != 0 || o.cause != JobCause::Completed as i32 => {
            write!(text, ", exit {c}").expect("write to String")
        }
        _ => {}
    }
    if o.cause != JobCause::Completed as i32 {
        write!(text, " on node {}", o.node_rank).expect("write to String");
    }
    if !o.message.is_empty() {
        write!(text, ": {}", o.message).expect("write to String");
    }
    text
}

/// A workload as a command line, with its environment and folder.
pub fn workload_text(w: &Workload) -> String {
    let mut text: Vec<String> = w
        .env
        .iter()
        .map(|v| format!("{}={}", v.name, shell_word(&v.value)))
        .collect();
    text.extend(w.argv.iter().map(|a| shell_word(a)));
    let mut text = text.join(" ");
    if !w.working_dir.is_empty() {
        write!(text, "  (in {})", w.working_dir).expect("write to String");
    }
    if !w.image.is_empty() {
        write!(text, "  (image {})", w.image).expect("write to String");
    }
    text
}

/// A word as a shell would need it quoted, for reading (not for running).
fn shell_word(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b));
    if plain {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', "'\\''"))
    }
}

/// Short name of a pool kind.
pub fn pool_kind(v: i32) -> String {
    enum_short(v, "POOL_KIND_", PoolKind::as_str_name)
}
/// Short name of a pool health state.
pub fn pool_health(v: i32) -> String {
    enum_short(v, "POOL_HEALTH_", PoolHealth::as_str_name)
}
/// Short name of a request event kind.
pub fn event_kind(v: i32) -> String {
    enum_short(v, "REQUEST_EVENT_KIND_", RequestEventKind::as_str_name)
}

// ---------------------------------------------------------------------------------------------
// Tables

/// A table of left- or right-aligned columns, separated by two spaces.
pub struct Table {
    header: Vec<&'static str>,
    right: Vec<bool>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these columns; a column whose name starts with `>` is right-aligned (for
    /// numbers), and the `>` is not printed.
    pub fn new(columns: &[&'static str]) -> Self {
        Table {
            header: columns.iter().map(|c| c.trim_start_matches('>')).collect(),
            right: columns.iter().map(|c| c.starts_with('>')).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; it must have one cell per column.
    pub fn row(&mut self, cells: Vec<String>) {
        debug_assert_eq!(cells.len(), self.header.len(), "one cell per column");
        self.rows.push(cells);
    }

    /// The table as lines of text, header first, each line ending in a newline.
    pub fn render(&self) -> String {
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        let header: Vec<String> = self.header.iter().map(|h| h.to_string()).collect();
        for row in std::iter::once(&header).chain(&self.rows) {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                if i > 0 {
                    line.push_str("  ");
                }
                let pad = widths[i] - cell.chars().count();
                if self.right[i] {
                    line.extend(std::iter::repeat_n(' ', pad));
                    line.push_str(cell);
                } else {
                    line.push_str(cell);
                    line.extend(std::iter::repeat_n(' ', pad));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// Aligned `key  value` lines.
fn fields(pairs: &[(&str, String)]) -> String {
    let width = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    pairs
        .iter()
        .map(|(k, v)| format!("{k:<width$}  {v}\n"))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// People: requests

/// A request's shape: `gang 2x8` or `elastic 5P` (with `min 0.5P` when chunks are bounded).
pub fn shape(spec: Option<&RequestSpec>) -> String {
    match spec.and_then(|s| s.shape.as_ref()) {
        Some(Shape::Gang(g)) => format!("gang {}x{}", g.nodes, g.devices_per_node),
        Some(Shape::Elastic(e)) if e.min_chunk_tflops > 0 => format!(
            "elastic {}P min {}P",
            p_exact(e.tflops),
            p_exact(e.min_chunk_tflops)
        ),
        Some(Shape::Elastic(e)) => format!("elastic {}P", p_exact(e.tflops)),
        None => "-".to_string(),
    }
}

/// Pool ids of lease parts, each once, in order of first appearance.
pub fn part_pools(parts: &[LeasePart]) -> Vec<&str> {
    let mut pools: Vec<&str> = Vec::new();
    for part in parts {
        if !pools.contains(&part.pool.as_str()) {
            pools.push(&part.pool);
        }
    }
    pools
}

fn constraints_text(c: Option<&Constraints>) -> String {
    let Some(c) = c else {
        return "none".to_string();
    };
    let mut out = Vec::new();
    if !c.models.is_empty() {
        out.push(format!("models={}", c.models.join(",")));
    }
    if !c.regions.is_empty() {
        out.push(format!("regions={}", c.regions.join(",")));
    }
    if !c.pools.is_empty() {
        out.push(format!("pools={}", c.pools.join(",")));
    }
    if let Some(rtt) = c.max_rtt_ms {
        out.push(format!("max_rtt={rtt}ms"));
    }
    if let Some(zone) = &c.data_zone {
        out.push(format!("data_zone={zone}"));
    }
    if let Some(price) = c.max_price_fen_per_device_hour {
        out.push(format!("max_price={} CNY/device-h", cny(price)));
    }
    if out.is_empty() {
        "none".to_string()
    } else {
        out.join(" ")
    }
}

fn wait_text(w: &WaitInfo) -> String {
    let mut text = format!("{}, position {}", wait_reason(w.reason), w.position);
    if let Some(at) = w.earliest_start_unix_ms {
        write!(text, ", earliest start {}", time(at)).expect("write to String");
    }
    text
}

fn lease_text(l: &Lease) -> String {
    let running = l
        .running_since_unix_ms
        .map_or(String::new(), |t| format!(", running since {}", time(t)));
    format!(
        "{} to {}, {} P (borrowed {} P), {} CNY/h{running}",
        time(l.start_unix_ms),
        time(l.end_unix_ms),
        p(l.tflops),
        p(l.borrowed_tflops),
        cny(l.price_fen_per_hour)
    )
}

fn parts_table(parts: &[LeasePart]) -> Table {
    let mut t = Table::new(&["POOL", ">GROUP", "MODEL", ">NODE", ">DEVICES"]);
    for part in parts {
        t.row(vec![
            part.pool.clone(),
            part.group.to_string(),
            part.model.clone(),
            part.node.to_string(),
            part.devices.to_string(),
        ]);
    }
    t
}

/// One request, field by field, with its lease's nodes.
pub fn request_detail(r: &Request) -> String {
    let spec = r.spec.as_ref();
    let mut pairs = vec![
        ("name", r.name.clone()),
        ("state", state(r.state)),
        ("shape", shape(spec)),
    ];
    if let Some(s) = spec {
        pairs.push(("duration", duration(s.duration_ms)));
        pairs.push(("priority", priority(s.priority)));
        pairs.push(("policy", policy(s.policy)));
        pairs.push(("constraints", constraints_text(s.constraints.as_ref())));
        if let Some(at) = s.start_after_unix_ms {
            pairs.push(("start after", time(at)));
        }
        if let Some(at) = s.deadline_unix_ms {
            pairs.push(("deadline", time(at)));
        }
        pairs.push(("requeue", s.requeue.to_string()));
        if let Some(w) = &s.workload {
            pairs.push(("job", workload_text(w)));
        }
    }
    pairs.push(("submitted", time(r.submit_time_unix_ms)));
    pairs.push(("updated", time(r.update_time_unix_ms)));
    if let Some(w) = &r.wait {
        pairs.push(("waiting", wait_text(w)));
    }
    if let Some(l) = &r.lease {
        pairs.push(("lease", lease_text(l)));
    }
    if r.end_reason != EndReason::Unspecified as i32 {
        pairs.push(("end reason", end_reason(r.end_reason)));
    }
    if let Some(o) = &r.outcome {
        pairs.push(("job ended", outcome_text(o)));
    }
    let mut out = fields(&pairs);
    if let Some(l) = r.lease.as_ref().filter(|l| !l.parts.is_empty()) {
        out.push('\n');
        out.push_str(&parts_table(&l.parts).render());
    }
    out
}

/// What a request is doing, in a few words: its wait reason, its pools or its end reason.
fn request_status(r: &Request) -> String {
    if let Some(w) = &r.wait {
        return format!("{} (#{})", wait_reason(w.reason), w.position);
    }
    if let Some(o) = &r.outcome {
        return outcome_text(o);
    }
    if r.end_reason != EndReason::Unspecified as i32 {
        return end_reason(r.end_reason);
    }
    match &r.lease {
        Some(l) => part_pools(&l.parts).join(","),
        None => "-".to_string(),
    }
}

/// A tenant's requests, one per line.
pub fn requests_table(requests: &[Request]) -> Table {
    let mut t = Table::new(&[
        ">ID",
        "STATE",
        "SHAPE",
        "PRIORITY",
        ">DURATION",
        ">HELD P",
        ">CNY/H",
        "DETAIL",
        "SUBMITTED",
    ]);
    for r in requests {
        let spec = r.spec.as_ref();
        let lease = r.lease.as_ref();
        t.row(vec![
            r.id.to_string(),
            state(r.state),
            shape(spec),
            spec.map(|s| priority(s.priority)).unwrap_or_default(),
            spec.map(|s| duration(s.duration_ms)).unwrap_or_default(),
            lease.map(|l| p(l.tflops)).unwrap_or_else(|| "-".into()),
            lease
                .map(|l| cny(l.price_fen_per_hour))
                .unwrap_or_else(|| "-".into()),
            request_status(r),
            time(r.submit_time_unix_ms),
        ]);
    }
    t
}

/// The operator's view of the queue, in queue order.
pub fn queue_table(requests: &[Request]) -> Table {
    let mut t = Table::new(&[
        ">POS",
        "REQUEST",
        "PRIORITY",
        "SHAPE",
        ">DURATION",
        "REASON",
        "EARLIEST START",
        "SUBMITTED",
    ]);
    for r in requests {
        let spec = r.spec.as_ref();
        let wait = r.wait.as_ref();
        t.row(vec![
            wait.map(|w| w.position.to_string()).unwrap_or_default(),
            r.name.clone(),
            spec.map(|s| priority(s.priority)).unwrap_or_default(),
            shape(spec),
            spec.map(|s| duration(s.duration_ms)).unwrap_or_default(),
            wait.map(|w| wait_reason(w.reason)).unwrap_or_default(),
            wait.and_then(|w| w.earliest_start_unix_ms)
                .map(time)
                .unwrap_or_else(|| "-".into()),
            time(r.submit_time_unix_ms),
        ]);
    }
    t
}

/// One line for a watched event.
pub fn event_line(e: &RequestEvent) -> String {
    let Some(r) = &e.request else {
        return format!("{}  {}", time(e.time_unix_ms), event_kind(e.kind));
    };
    let mut line = format!(
        "{}  {:<9}  {}  {}  {}",
        time(e.time_unix_ms),
        event_kind(e.kind),
        r.name,
        state(r.state),
        shape(r.spec.as_ref()),
    );
    if let Some(w) = &r.wait {
        write!(line, "  waiting: {}", wait_text(w)).expect("write to String");
    } else if let Some(l) = &r.lease {
        write!(
            line,
            "  on {}: {} P, {} CNY/h until {}",
            part_pools(&l.parts).join(","),
            p(l.tflops),
            cny(l.price_fen_per_hour),
            time(l.end_unix_ms)
        )
        .expect("write to String");
    }
    if r.end_reason != EndReason::Unspecified as i32 {
        write!(line, "  ({})", end_reason(r.end_reason)).expect("write to String");
    }
    if let Some(o) = &r.outcome {
        write!(line, "  job {}", outcome_text(o)).expect("write to String");
    }
    line
}

/// Where and at what price a request would be placed.
pub fn quote_detail(q: &Quote) -> String {
    let mut pairs = vec![
        ("quoted at", time(q.quote_time_unix_ms)),
        ("placeable now", q.placeable_now.to_string()),
    ];
    if q.placeable_now {
        pairs.push(("pools", q.pools.join(",")));
        pairs.push(("compute", format!("{} P", p(q.tflops))));
        pairs.push(("price", format!("{} CNY/h", cny(q.price_fen_per_hour))));
        pairs.push((
            "estimated cost",
            format!("{} CNY", cny(q.estimated_cost_fen)),
        ));
        pairs.push((
            "voucher subsidy",
            format!("{} CNY", cny(q.estimated_subsidy_fen)),
        ));
        pairs.push(("you would pay", format!("{} CNY", cny(q.estimated_due_fen))));
    } else {
        pairs.push(("would wait", wait_reason(q.wait_reason)));
        pairs.push((
            "earliest start",
            q.earliest_start_unix_ms
                .map(time)
                .unwrap_or_else(|| "unknown".into()),
        ));
    }
    let mut out = fields(&pairs);
    if !q.parts.is_empty() {
        out.push('\n');
        out.push_str(&parts_table(&q.parts).render());
    }
    out
}

// ---------------------------------------------------------------------------------------------
// People: the fleet

/// Pools, one per line.
pub fn pools_table(pools: &[Pool]) -> Table {
    let mut t = Table::new(&[
        "ID",
        "KIND",
        "REGION",
        ">RTT MS",
        "HEALTH",
        ">CAPACITY P",
        ">USED %",
    ]);
    for pool in pools {
        let u = pool.utilisation.unwrap_or_default();
        t.row(vec![
            pool.id.clone(),
            pool_kind(pool.kind),
            pool.region.clone(),
            pool.rtt_ms.to_string(),
            pool_health(pool.health),
            p(u.capacity_tflops),
            pct(u.allocated_tflops, u.capacity_tflops),
        ]);
    }
    t
}

/// One pool with its node groups.
pub fn pool_detail(pool: &Pool) -> String {
    let mut out = fields(&[
        ("name", pool.name.clone()),
        (
            "display name",
            if pool.display_name.is_empty() {
                pool.id.clone()
            } else {
                pool.display_name.clone()
            },
        ),
        ("kind", pool_kind(pool.kind)),
        ("region", pool.region.clone()),
        ("rtt", format!("{} ms", pool.rtt_ms)),
        ("data zone", pool.data_zone.clone()),
        ("health", pool_health(pool.health)),
        ("capacity", utilisation_line(pool.utilisation.as_ref())),
    ]);
    out.push('\n');
    let mut t = Table::new(&[
        ">GROUP",
        "MODEL",
        ">NODES",
        ">DEVICES/NODE",
        "INTERCONNECT",
        ">CNY/DEVICE-H",
    ]);
    for (i, g) in pool.groups.iter().enumerate() {
        t.row(vec![
            i.to_string(),
            g.model.clone(),
            g.nodes.to_string(),
            g.devices_per_node.to_string(),
            g.interconnect.clone(),
            cny(g.price_fen_per_device_hour),
        ]);
    }
    out.push_str(&t.render());
    out
}

/// Tenants with their quotas and usage.
pub fn tenants_table(tenants: &[Tenant]) -> Table {
    let mut t = Table::new(&[
        "ID",
        ">QUOTA P",
        ">BORROW LIMIT P",
        ">WEIGHT",
        ">USED P",
        ">BORROWED P",
        ">LEASES",
        ">QUEUED",
    ]);
    for tenant in tenants {
        let u = tenant.usage.unwrap_or_default();
        t.row(vec![
            tenant.id.clone(),
            p(tenant.quota_tflops),
            tenant
                .borrow_limit_tflops
                .map(p)
                .unwrap_or_else(|| "no limit".into()),
            tenant.weight.to_string(),
            p(u.used_tflops),
            p(u.borrowed_tflops),
            u.live_leases.to_string(),
            u.queued.to_string(),
        ]);
    }
    t
}

fn utilisation_line(u: Option<&Utilisation>) -> String {
    let u = u.copied().unwrap_or_default();
    format!(
        "{} P, {} P used ({} %), {} of {} devices",
        p(u.capacity_tflops),
        p(u.allocated_tflops),
        pct(u.allocated_tflops, u.capacity_tflops),
        u.allocated_devices,
        u.capacity_devices
    )
}

fn keyed_table(first: &'static str, rows: &[KeyedUtilisation]) -> Table {
    let mut t = Table::new(&[
        first,
        ">CAPACITY P",
        ">USED P",
        ">USED %",
        ">DEVICES",
        ">USED DEVICES",
    ]);
    for row in rows {
        let u = row.utilisation.unwrap_or_default();
        t.row(vec![
            row.key.clone(),
            p(u.capacity_tflops),
            p(u.allocated_tflops),
            pct(u.allocated_tflops, u.capacity_tflops),
            u.capacity_devices.to_string(),
            u.allocated_devices.to_string(),
        ]);
    }
    t
}

/// The fleet summary: totals, breakdowns by model, region and kind, and the queue.
pub fn fleet_summary(f: &FleetSummary) -> String {
    let total = f.total.unwrap_or_default();
    let pools = f.pools.unwrap_or_default();
    let mut pairs = vec![
        ("fleet at", time(f.time_unix_ms)),
        ("total", utilisation_line(f.total.as_ref())),
        ("local", utilisation_line(f.local.as_ref())),
        ("external", utilisation_line(f.external.as_ref())),
    ];
    if f.target_tflops > 0 {
        pairs.push((
            "target",
            format!(
                "{} P ({} % reached)",
                p(f.target_tflops),
                pct(total.capacity_tflops, f.target_tflops)
            ),
        ));
    }
    pairs.push((
        "pools",
        format!(
            "{} healthy, {} draining, {} lost",
            pools.healthy, pools.draining, pools.lost
        ),
    ));
    pairs.push(("live leases", f.live_leases.to_string()));
    let queue = f.queue.clone().unwrap_or_default();
    pairs.push(("queued", queue.length.to_string()));
    let mut out = fields(&pairs);
    for (title, first, rows) in [
        ("By model", "MODEL", &f.by_model),
        ("By region", "REGION", &f.by_region),
        ("By kind", "KIND", &f.by_kind),
    ] {
        writeln!(out, "\n{title}").expect("write to String");
        out.push_str(&keyed_table(first, rows).render());
    }
    out.push_str("\nQueue by priority\n");
    let mut t = Table::new(&["PRIORITY", ">QUEUED"]);
    for c in &queue.by_priority {
        t.row(vec![priority(c.priority), c.count.to_string()]);
    }
    out.push_str(&t.render());
    out.push_str("\nQueue by wait reason\n");
    let mut t = Table::new(&["REASON", ">QUEUED"]);
    for c in &queue.by_reason {
        t.row(vec![wait_reason(c.reason), c.count.to_string()]);
    }
    out.push_str(&t.render());
    out
}

// ---------------------------------------------------------------------------------------------
// Programs: JSON

fn opt<T: Into<Value>>(v: Option<T>) -> Value {
    v.map_or(Value::Null, Into::into)
}

/// A request's spec.
pub fn spec_json(s: &RequestSpec) -> Value {
    let mut m = Map::new();
    match &s.shape {
        Some(Shape::Gang(g)) => {
            m.insert(
                "gang".into(),
                json!({"nodes": g.nodes, "devices_per_node": g.devices_per_node}),
            );
        }
        Some(Shape::Elastic(e)) => {
            m.insert(
                "elastic".into(),
                json!({"tflops": e.tflops, "min_chunk_tflops": e.min_chunk_tflops}),
            );
        }
        None => {}
    }
    m.insert("duration_ms".into(), s.duration_ms.into());
    m.insert(
        "priority".into(),
        enum_name(s.priority, Priority::as_str_name).into(),
    );
    m.insert(
        "constraints".into(),
        s.constraints.as_ref().map_or(Value::Null, |c| {
            json!({
                "models": c.models,
                "regions": c.regions,
                "pools": c.pools,
                "max_rtt_ms": c.max_rtt_ms,
                "data_zone": c.data_zone,
                "max_price_fen_per_device_hour": c.max_price_fen_per_device_hour,
            })
        }),
    );
    m.insert(
        "policy".into(),
        enum_name(s.policy, Policy::as_str_name).into(),
    );
    m.insert("start_after_unix_ms".into(), opt(s.start_after_unix_ms));
    m.insert("deadline_unix_ms".into(), opt(s.deadline_unix_ms));
    m.insert("requeue".into(), s.requeue.into());
    if let Some(w) = &s.workload {
        m.insert(
            "workload".into(),
            json!({
                "argv": w.argv,
                "env": w.env.iter().map(|v| json!({"name": v.name, "value": v.value})).collect::<Vec<_>>(),
                "working_dir": w.working_dir,
                "image": w.image,
                "stop_grace_s": w.stop_grace_s,
            }),
        );
    }
    Value::Object(m)
}

/// Lease parts.
pub fn parts_json(parts: &[LeasePart]) -> Value {
    parts
        .iter()
        .map(|x| {
            json!({
                "pool": x.pool,
                "group": x.group,
                "model": x.model,
                "node": x.node,
                "devices": x.devices,
                "price_fen_per_device_hour": x.price_fen_per_device_hour,
            })
        })
        .collect()
}

/// A request.
pub fn request_json(r: &Request) -> Value {
    json!({
        "name": r.name,
        "id": r.id,
        "tenant": r.tenant,
        "spec": r.spec.as_ref().map_or(Value::Null, spec_json),
        "state": enum_name(r.state, RequestState::as_str_name),
        "wait": r.wait.as_ref().map_or(Value::Null, |w| json!({
            "reason": enum_name(w.reason, WaitReason::as_str_name),
            "position": w.position,
            "earliest_start_unix_ms": w.earliest_start_unix_ms,
        })),
        "lease": r.lease.as_ref().map_or(Value::Null, |l| json!({
            "start_unix_ms": l.start_unix_ms,
            "end_unix_ms": l.end_unix_ms,
            "tflops": l.tflops,
            "price_fen_per_hour": l.price_fen_per_hour,
            "borrowed_tflops": l.borrowed_tflops,
            "running_since_unix_ms": l.running_since_unix_ms,
            "parts": parts_json(&l.parts),
        })),
        "leases": r.leases,
        "end_reason": enum_name(r.end_reason, EndReason::as_str_name),
        "outcome": r.outcome.as_ref().map_or(Value::Null, |o| json!({
            "cause": enum_name(o.cause, JobCause::as_str_name),
            "exit_code": o.exit_code,
            "signal": o.signal,
            "node_rank": o.node_rank,
            "message": o.message,
        })),
        "submit_time_unix_ms": r.submit_time_unix_ms,
        "update_time_unix_ms": r.update_time_unix_ms,
    })
}

/// A page (or all pages) of requests, as `ListRequestsResponse` or `ListQueueResponse`.
pub fn requests_page_json(requests: &[Request], next_page_token: &str) -> Value {
    json!({
        "requests": requests.iter().map(request_json).collect::<Vec<_>>(),
        "next_page_token": next_page_token,
    })
}

/// A watched event.
pub fn event_json(e: &RequestEvent) -> Value {
    json!({
        "request": e.request.as_ref().map_or(Value::Null, request_json),
        "kind": enum_name(e.kind, RequestEventKind::as_str_name),
        "time_unix_ms": e.time_unix_ms,
    })
}

/// A quote.
pub fn quote_json(q: &Quote) -> Value {
    json!({
        "quote_time_unix_ms": q.quote_time_unix_ms,
        "placeable_now": q.placeable_now,
        "parts": parts_json(&q.parts),
        "pools": q.pools,
        "tflops": q.tflops,
        "price_fen_per_hour": q.price_fen_per_hour,
        "estimated_cost_fen": q.estimated_cost_fen,
        "estimated_subsidy_fen": q.estimated_subsidy_fen,
        "estimated_due_fen": q.estimated_due_fen,
        "wait_reason": enum_name(q.wait_reason, WaitReason::as_str_name),
        "earliest_start_unix_ms": q.earliest_start_unix_ms,
    })
}

/// Capacity and allocation.
pub fn utilisation_json(u: Option<&Utilisation>) -> Value {
    u.map_or(Value::Null, |u| {
        json!({
            "capacity_tflops": u.capacity_tflops,
            "allocated_tflops": u.allocated_tflops,
            "capacity_devices": u.capacity_devices,
            "allocated_devices": u.allocated_devices,
        })
    })
}

/// A pool.
pub fn pool_json(pool: &Pool) -> Value {
    json!({
        "name": pool.name,
        "id": pool.id,
        "display_name": pool.display_name,
        "kind": enum_name(pool.kind, PoolKind::as_str_name),
        "region": pool.region,
        "rtt_ms": pool.rtt_ms,
        "data_zone": pool.data_zone,
        "groups": pool.groups.iter().map(|g| json!({
            "model": g.model,
            "devices_per_node": g.devices_per_node,
            "nodes": g.nodes,
            "interconnect": g.interconnect,
            "price_fen_per_device_hour": g.price_fen_per_device_hour,
        })).collect::<Vec<_>>(),
        "health": enum_name(pool.health, PoolHealth::as_str_name),
        "utilisation": utilisation_json(pool.utilisation.as_ref()),
    })
}

/// A tenant.
pub fn tenant_json(t: &Tenant) -> Value {
    json!({
        "name": t.name,
        "id": t.id,
        "quota_tflops": t.quota_tflops,
        "borrow_limit_tflops": t.borrow_limit_tflops,
        "weight": t.weight,
        "usage": t.usage.as_ref().map_or(Value::Null, |u| json!({
            "used_tflops": u.used_tflops,
            "borrowed_tflops": u.borrowed_tflops,
            "live_leases": u.live_leases,
            "queued": u.queued,
        })),
    })
}

/// The fleet summary.
pub fn fleet_json(f: &FleetSummary) -> Value {
    let keyed = |rows: &[KeyedUtilisation]| -> Value {
        rows.iter()
            .map(|k| json!({"key": k.key, "utilisation": utilisation_json(k.utilisation.as_ref())}))
            .collect()
    };
    json!({
        "time_unix_ms": f.time_unix_ms,
        "total": utilisation_json(f.total.as_ref()),
        "local": utilisation_json(f.local.as_ref()),
        "external": utilisation_json(f.external.as_ref()),
        "by_model": keyed(&f.by_model),
        "by_region": keyed(&f.by_region),
        "by_kind": keyed(&f.by_kind),
        "pools": f.pools.map_or(Value::Null, |c| json!({
            "healthy": c.healthy, "draining": c.draining, "lost": c.lost,
        })),
        "live_leases": f.live_leases,
        "queue": f.queue.as_ref().map_or(Value::Null, |q| json!({
            "length": q.length,
            "by_priority": q.by_priority.iter().map(|c| json!({
                "priority": enum_name(c.priority, Priority::as_str_name),
                "count": c.count,
            })).collect::<Vec<_>>(),
            "by_reason": q.by_reason.iter().map(|c| json!({
                "reason": enum_name(c.reason, WaitReason::as_str_name),
                "count": c.count,
            })).collect::<Vec<_>>(),
        })),
        "target_tflops": f.target_tflops,
    })
}

/// Writes text to stdout. A reader that went away (`suanli watch | head`) ends the program
/// quietly, as it does for other command-line tools.
pub fn emit(text: &str) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: writing to stdout: {e}");
        std::process::exit(1);
    }
}

/// Prints a JSON value on one line.
pub fn print_json(v: &Value) {
    emit(&format!("{v}\n"));
}

#[cfg(test)]
mod tests {
    use suanli_proto::v1::{ElasticShape, GangShape};

    use super::*;

    #[test]
    fn job_ends_and_commands_read_as_people_write_them() {
        let failed = JobOutcome {
            cause: JobCause::Failed as i32,
            exit_code: Some(3),
            signal: None,
            node_rank: 1,
            message: "exit 3".into(),
        };
        assert_eq!(outcome_text(&failed), "failed, exit 3 on node 1: exit 3");
        let done = JobOutcome {
            cause: JobCause::Completed as i32,
            exit_code: Some(0),
            ..Default::default()
        };
        assert_eq!(outcome_text(&done), "completed");
        let killed = JobOutcome {
            cause: JobCause::TimedOut as i32,
            signal: Some(9),
            ..Default::default()
        };
        assert_eq!(outcome_text(&killed), "timed_out, signal 9 on node 0");
        let w = Workload {
            argv: vec![
                "python3".into(),
                "train.py".into(),
                "--name".into(),
                "a b".into(),
                "it's".into(),
            ],
            env: vec![suanli_proto::v1::EnvVar {
                name: "NCCL_DEBUG".into(),
                value: "INFO".into(),
            }],
            working_dir: "/data".into(),
            ..Default::default()
        };
        assert_eq!(
            workload_text(&w),
            "NCCL_DEBUG=INFO python3 train.py --name 'a b' 'it'\\''s'  (in /data)"
        );
    }
    use crate::parse;

    #[test]
    fn compute_in_p_with_one_decimal() {
        assert_eq!(p(0), "0.0");
        assert_eq!(p(1000), "1.0");
        assert_eq!(p(10_496_149), "10496.1");
        assert_eq!(p(10_496_150), "10496.2");
        assert_eq!(p(49), "0.0");
        assert_eq!(p(50), "0.1");
        assert_eq!(p(u64::MAX), "18446744073709551.6");
        assert_eq!(p_exact(5000), "5");
        assert_eq!(p_exact(1500), "1.5");
        assert_eq!(p_exact(250), "0.25");
        assert_eq!(p_exact(1), "0.001");
    }

    #[test]
    fn money_in_cny_with_two_decimals() {
        assert_eq!(cny(0), "0.00");
        assert_eq!(cny(5), "0.05");
        assert_eq!(cny(700), "7.00");
        assert_eq!(cny(123_456), "1234.56");
    }

    #[test]
    fn percentages() {
        assert_eq!(pct(0, 0), "-");
        assert_eq!(pct(1, 3), "33.3");
        assert_eq!(pct(2, 3), "66.7");
        assert_eq!(pct(5, 5), "100.0");
        assert_eq!(pct(u64::MAX, u64::MAX), "100.0");
    }

    #[test]
    fn durations_print_as_they_are_typed() {
        assert_eq!(duration(7_200_000), "2h");
        assert_eq!(duration(5_400_000), "1h30m");
        assert_eq!(duration(93_784_005), "1d2h3m4s5ms");
        assert_eq!(duration(0), "0s");
        for ms in [1, 999, 45_000, 5_400_000, 86_400_000, 93_784_005] {
            assert_eq!(parse::duration_ms(&duration(ms)), Ok(ms));
        }
    }

    #[test]
    fn times_and_unknown_enums() {
        assert_eq!(time(0), "-");
        assert_eq!(time(1_709_210_096_789), "2024-02-29T12:34:56Z");
        assert_eq!(state(RequestState::Queued as i32), "queued");
        assert_eq!(
            wait_reason(WaitReason::CapacityBusy as i32),
            "capacity_busy"
        );
        assert_eq!(state(99), "99");
        assert_eq!(priority(Priority::Unspecified as i32), "standard");
        assert_eq!(priority(Priority::Spot as i32), "spot");
        assert_eq!(enum_name(2, Priority::as_str_name), "PRIORITY_STANDARD");
    }

    #[test]
    fn tables_align_columns() {
        let mut t = Table::new(&["ID", ">CAPACITY P", "HEALTH"]);
        t.row(vec!["futian-aicc".into(), p(3_200_000), "healthy".into()]);
        t.row(vec!["gz".into(), p(800), "lost".into()]);
        assert_eq!(
            t.render(),
            "ID           CAPACITY P  HEALTH\n\
             futian-aicc      3200.0  healthy\n\
             gz                  0.8  lost\n"
        );
    }

    #[test]
    fn shapes() {
        let gang = RequestSpec {
            shape: Some(Shape::Gang(GangShape {
                nodes: 2,
                devices_per_node: 8,
            })),
            ..Default::default()
        };
        assert_eq!(shape(Some(&gang)), "gang 2x8");
        let elastic = RequestSpec {
            shape: Some(Shape::Elastic(ElasticShape {
                tflops: 5000,
                min_chunk_tflops: 500,
            })),
            ..Default::default()
        };
        assert_eq!(shape(Some(&elastic)), "elastic 5P min 0.5P");
        assert_eq!(shape(None), "-");
    }

    #[test]
    fn json_uses_proto_field_names_and_enum_names() {
        let r = Request {
            name: "tenants/acme/requests/3".into(),
            id: 3,
            tenant: "acme".into(),
            spec: Some(RequestSpec {
                shape: Some(Shape::Gang(GangShape {
                    nodes: 1,
                    devices_per_node: 8,
                })),
                duration_ms: 60_000,
                ..Default::default()
            }),
            state: RequestState::Queued as i32,
            wait: Some(WaitInfo {
                reason: WaitReason::Quota as i32,
                position: 4,
                earliest_start_unix_ms: None,
            }),
            ..Default::default()
        };
        let v = request_json(&r);
        assert_eq!(v["state"], "REQUEST_STATE_QUEUED");
        assert_eq!(v["spec"]["gang"]["devices_per_node"], 8);
        assert!(v["spec"].get("elastic").is_none());
        assert_eq!(v["spec"]["priority"], "PRIORITY_UNSPECIFIED");
        assert_eq!(v["wait"]["reason"], "WAIT_REASON_QUOTA");
        assert!(v["wait"]["earliest_start_unix_ms"].is_null());
        assert!(v["lease"].is_null());
        assert_eq!(v["end_reason"], "END_REASON_UNSPECIFIED");
    }
}
