//! `suanli loadgen`: drives a broker the way many AI companies do, and measures how fast it
//! answers `SubmitRequest`.
//!
//! Two ways to drive it:
//! - open loop (`--rate N`): submissions are due on a fixed schedule, N per second, whatever
//!   the broker's speed; each latency counts from the time the submission was due, so a slow
//!   broker cannot hide its slowness by delaying the next submissions (no coordinated
//!   omission).
//! - closed loop (`--concurrency N`): N workers, each submitting as soon as its previous
//!   submission was answered; latency counts from the send.
//!
//! The requests are a seeded mix of gang (1x1 to 4x8) and elastic (200 to 20000 TFLOPS)
//! requests of a few minutes, across tenants, each with a unique idempotency key. The calls
//! are spread over several HTTP/2 connections so that one connection is not the bottleneck.
//! Latencies are of successful submissions; failures are counted by gRPC code, with the first
//! message of each. In the open loop, `issue_lag_max_ms` is how late the generator itself sent
//! a submission: when it is large, the generator (on the broker's cores, or held by
//! `--max-in-flight`) could not keep the schedule, and the latencies include that lag.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::bail;
use clap::Args;
use rand::rngs::StdRng;
use rand::{RngExt as _, SeedableRng as _};
use serde_json::{Value, json};
use suanli_proto::failover::LeaderChannel;
use suanli_proto::v1::tenant_service_client::TenantServiceClient;
use suanli_proto::v1::{
    CancelRequestRequest, ElasticShape, GangShape, Priority, ReleaseRequestRequest, Request,
    RequestSpec, RequestState, SubmitRequestRequest, request_spec::Shape,
};
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;
use tonic::Status;
use tonic::metadata::{Ascii, MetadataValue};

use crate::client::{self, Bearer, GlobalArgs};
use crate::output;
use crate::parse;
use crate::serve::shutdown_signal;

/// Requests sent when neither `--requests` nor `--duration` bounds the run.
const DEFAULT_REQUESTS: u64 = 10_000;
/// Workers of the closed loop when neither `--rate` nor `--concurrency` is given.
const DEFAULT_CONCURRENCY: u32 = 64;
/// Closed-loop workers sharing one HTTP/2 connection.
const WORKERS_PER_CONNECTION: u32 = 64;
/// Connections of the open loop.
const OPEN_LOOP_CONNECTIONS: u32 = 4;

/// `suanli loadgen`.
#[derive(Args, Clone, Debug)]
pub struct LoadgenArgs {
    /// Open loop: submit N requests per second on a fixed schedule; latency counts from each
    /// submission's due time.
    #[arg(long, value_name = "N", value_parser = positive_rate, conflicts_with = "concurrency")]
    pub rate: Option<f64>,
    /// Closed loop: N workers, each submitting back to back [default: 64 without --rate].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub concurrency: Option<u32>,
    /// Stop after N submissions [default: 10000 without --duration].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub requests: Option<u64>,
    /// Stop submitting after this long (60, 30s, 5m; a bare number is seconds).
    #[arg(long, value_name = "DURATION", value_parser = run_length_ms)]
    pub duration: Option<u64>,
    /// Tenants to submit as, comma-separated [default: every tenant of the credentials file].
    #[arg(long, value_name = "NAMES", value_delimiter = ',')]
    pub tenants: Vec<String>,
    /// Give back each request once submitted: release it when placed, cancel it when queued,
    /// so the fleet and the queue do not fill up.
    #[arg(long)]
    pub release: bool,
    /// Seed of the request mix.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub seed: u64,
    /// HTTP/2 connections [default: one per 64 workers; 4 with --rate].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub connections: Option<u32>,
    /// Open loop: most submissions in flight; a due submission beyond it waits, and the wait
    /// counts in its latency.
    #[arg(long, value_name = "N", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_in_flight: u32,
    /// Deadline of each call; a call past it counts as DEADLINE_EXCEEDED.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse::positive_duration_ms)]
    pub timeout: u64,
    /// Jobs instead of capacity: run N short jobs on --job-pool through its agent and measure
    /// submission to RUNNING, job exit to end, and jobs per minute (with --concurrency at a
    /// time, 8 by default).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..), conflicts_with_all = ["rate", "requests", "duration", "release"], help_heading = "Jobs")]
    pub jobs: Option<u64>,
    /// The pool the jobs run on (its agent must run commands).
    #[arg(
        long,
        value_name = "POOL",
        requires = "jobs",
        default_value = "futian-aicc",
        help_heading = "Jobs"
    )]
    pub job_pool: String,
    /// Devices each job holds on its one node.
    #[arg(
        long,
        value_name = "N",
        requires = "jobs",
        default_value_t = 1,
        help_heading = "Jobs"
    )]
    pub job_devices: u32,
    /// How long each job sleeps before it exits.
    #[arg(long, value_name = "DURATION", requires = "jobs", default_value = "0s", value_parser = parse::duration_ms, help_heading = "Jobs")]
    pub job_sleep: u64,
}

fn positive_rate(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(x) if x.is_finite() && x > 0.0 => Ok(x),
        _ => Err(format!("{text:?}: expected submissions per second above 0")),
    }
}

fn run_length_ms(text: &str) -> Result<u64, String> {
    let t = text.trim();
    if !t.is_empty() && t.bytes().all(|c| c.is_ascii_digit()) {
        return t
            .parse::<u64>()
            .ok()
            .and_then(|s| s.checked_mul(1000))
            .filter(|&ms| ms > 0)
            .ok_or_else(|| format!("{text:?}: expected a number of seconds above 0"));
    }
    parse::positive_duration_ms(t)
}

/// When the `i`th submission of an open loop at `rate` per second is due, from the start.
/// Computed from `i`, never accumulated, so the schedule does not drift.
pub fn schedule_offset(i: u64, rate: f64) -> Duration {
    Duration::from_nanos((i as f64 * 1e9 / rate).round() as u64)
}

/// The due times of an open loop: every `1/rate` seconds, until `requests` submissions or
/// `duration` have passed, whichever comes first.
pub fn schedule(
    rate: f64,
    requests: Option<u64>,
    duration: Option<Duration>,
) -> impl Iterator<Item = Duration> {
    (0..requests.unwrap_or(u64::MAX))
        .map(move |i| schedule_offset(i, rate))
        .take_while(move |&at| duration.is_none_or(|d| at < d))
}

/// The `q`th percentile (0 to 100) of sorted values, by the nearest-rank method: the smallest
/// value that at least `q` % of the values do not exceed.
pub fn percentile<T: Copy>(sorted: &[T], q: f64) -> Option<T> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q / 100.0 * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// The seeded request mix.
pub struct Mix {
    rng: StdRng,
}

impl Mix {
    /// A mix; the same seed gives the same requests.
    pub fn new(seed: u64) -> Self {
        Mix {
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// Index of the tenant for the next request.
    pub fn tenant(&mut self, tenants: usize) -> usize {
        self.rng.random_range(0..tenants)
    }

    /// The next request: half gang (1 to 4 nodes of 1, 2, 4 or 8 devices), half elastic (200
    /// to 20000 TFLOPS, log-uniform, sometimes with a minimum chunk), 1 to 15 minutes long,
    /// 10 % critical, 70 % standard, 20 % spot.
    pub fn spec(&mut self) -> RequestSpec {
        let r = &mut self.rng;
        let shape = if r.random_bool(0.5) {
            Shape::Gang(GangShape {
                nodes: r.random_range(1..=4),
                devices_per_node: [1, 2, 4, 8][r.random_range(0..4)],
            })
        } else {
            let ln = r.random_range(200f64.ln()..=20_000f64.ln());
            let tflops = (ln.exp().round() as u64).clamp(200, 20_000);
            let min_chunk_tflops = if r.random_bool(0.5) { tflops / 4 } else { 0 };
            Shape::Elastic(ElasticShape {
                tflops,
                min_chunk_tflops,
            })
        };
        let priority = match r.random_range(0..10) {
            0 => Priority::Critical,
            1..=7 => Priority::Standard,
            _ => Priority::Spot,
        };
        RequestSpec {
            shape: Some(shape),
            duration_ms: r.random_range(60..=900) * 1000,
            priority: priority as i32,
            ..Default::default()
        }
    }
}

/// A tenant the generator submits as.
#[derive(Clone)]
struct Caller {
    auth: MetadataValue<Ascii>,
}

fn callers(g: &GlobalArgs, a: &LoadgenArgs) -> anyhow::Result<(Vec<Caller>, Vec<String>)> {
    let caller = |token: &str| -> anyhow::Result<Caller> {
        Ok(Caller {
            auth: Bearer::new(token)?
                .value()
                .cloned()
                .expect("a token makes a header"),
        })
    };
    if let Some(token) = &g.token {
        if !a.tenants.is_empty() {
            bail!(
                "--tenants picks tokens from the credentials file; with --token only that token is used"
            );
        }
        let name = g.tenant.clone().unwrap_or_else(|| "(--token)".into());
        return Ok((vec![caller(token)?], vec![name]));
    }
    let path = g.credentials_path();
    let creds = client::load_credentials(&path)?;
    let names: Vec<String> = if a.tenants.is_empty() {
        creds.tenants.iter().map(|t| t.name.clone()).collect()
    } else {
        a.tenants.clone()
    };
    if names.is_empty() {
        bail!("{} has no tenant; pass --token TOKEN", path.display());
    }
    let mut out = Vec::new();
    for name in &names {
        match creds.tenant(name) {
            Some(token) => out.push(caller(token)?),
            None => bail!(
                "--tenants: {name:?} is not in {} (it has: {})",
                path.display(),
                creds
                    .tenants
                    .iter()
                    .map(|t| t.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
    Ok((out, names))
}

/// What the run measured.
#[derive(Default)]
struct Tally {
    latencies_us: Vec<u64>,
    errors: BTreeMap<&'static str, u64>,
    /// The first message of each error code, so that a failure can be read, not only counted.
    error_samples: BTreeMap<&'static str, String>,
    /// Open loop: the latest a submission left after its due time.
    issue_lag: Option<Duration>,
    released: u64,
    cancelled: u64,
    give_back_errors: BTreeMap<&'static str, u64>,
}

impl Tally {
    fn merge(&mut self, other: Tally) {
        self.latencies_us.extend(other.latencies_us);
        for (code, n) in other.errors {
            *self.errors.entry(code).or_default() += n;
        }
        for (code, message) in other.error_samples {
            self.error_samples.entry(code).or_insert(message);
        }
        self.released += other.released;
        self.cancelled += other.cancelled;
        for (code, n) in other.give_back_errors {
            *self.give_back_errors.entry(code).or_default() += n;
        }
    }
}

/// One submission and, with `--release`, giving it back.
struct Shot {
    client: TenantServiceClient<LeaderChannel>,
    caller: Caller,
    request_id: String,
    spec: RequestSpec,
    timeout: Duration,
    release: bool,
}

impl Shot {
    fn call<T>(&self, msg: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        req.metadata_mut()
            .insert("authorization", self.caller.auth.clone());
        req.set_timeout(self.timeout);
        req
    }

    /// Submits, records the outcome with its latency counted from `since`, then gives the
    /// request back if asked.
    async fn fire(mut self, since: Instant, tally: &mut Tally, progress: &AtomicU64) {
        let req = self.call(SubmitRequestRequest {
            request_id: self.request_id.clone(),
            spec: Some(self.spec.clone()),
        });
        let result = self.client.submit_request(req).await;
        let latency = since.elapsed();
        progress.fetch_add(1, Ordering::Relaxed);
        match result {
            Ok(reply) => {
                tally
                    .latencies_us
                    .push(latency.as_micros().try_into().unwrap_or(u64::MAX));
                if self.release {
                    self.give_back(&reply.into_inner(), tally).await;
                }
            }
            Err(status) => {
                let code = client::code_name(status.code());
                *tally.errors.entry(code).or_default() += 1;
                tally
                    .error_samples
                    .entry(code)
                    .or_insert_with(|| client::status_line(&status));
            }
        }
    }

    async fn give_back(&mut self, r: &Request, tally: &mut Tally) {
        let name = r.name.clone();
        let request_id = format!("{}-back", self.request_id);
        let result: Result<bool, Status> = match RequestState::try_from(r.state) {
            Ok(RequestState::Placed | RequestState::Running) => {
                let req = self.call(ReleaseRequestRequest { request_id, name });
                self.client.release_request(req).await.map(|_| true)
            }
            Ok(RequestState::Queued) => {
                let req = self.call(CancelRequestRequest { request_id, name });
                self.client.cancel_request(req).await.map(|_| false)
            }
            _ => return,
        };
        match result {
            Ok(true) => tally.released += 1,
            Ok(false) => tally.cancelled += 1,
            Err(status) => {
                *tally
                    .give_back_errors
                    .entry(client::code_name(status.code()))
                    .or_default() += 1
            }
        }
    }
}

/// Makes the shots of a run.
#[derive(Clone)]
struct ShotMaker {
    clients: Vec<TenantServiceClient<LeaderChannel>>,
    callers: Vec<Caller>,
    run_id: String,
    timeout: Duration,
    release: bool,
}

impl ShotMaker {
    /// The `i`th submission of the run, on connection `conn` (modulo their number).
    fn make(&self, i: u64, conn: u64, mix: &mut Mix) -> Shot {
        Shot {
            client: self.clients[(conn % self.clients.len() as u64) as usize].clone(),
            caller: self.callers[mix.tenant(self.callers.len())].clone(),
            request_id: format!("loadgen-{}-{i}", self.run_id),
            spec: mix.spec(),
            timeout: self.timeout,
            release: self.release,
        }
    }
}

/// How the broker is driven.
#[derive(Clone, Copy, Debug)]
enum Mode {
    Open { rate: f64 },
    Closed { concurrency: u32 },
}

/// Runs the load and prints what it measured.
pub async fn run(g: &GlobalArgs, a: &LoadgenArgs) -> anyhow::Result<()> {
    if let Some(jobs) = a.jobs {
        let load = crate::jobload::JobLoad {
            jobs,
            concurrency: a.concurrency.unwrap_or(8),
            pool: a.job_pool.clone(),
            devices: a.job_devices,
            sleep_ms: a.job_sleep,
            json: g.json,
        };
        return crate::jobload::run(g, &load).await;
    }
    let (callers, names) = callers(g, a)?;
    let mode = match (a.rate, a.concurrency) {
        (Some(rate), _) => Mode::Open { rate },
        (None, c) => Mode::Closed {
            concurrency: c.unwrap_or(DEFAULT_CONCURRENCY),
        },
    };
    let requests = match (a.requests, a.duration) {
        (None, None) => Some(DEFAULT_REQUESTS),
        (r, _) => r,
    };
    let duration = a.duration.map(Duration::from_millis);
    let connections = a.connections.unwrap_or(match mode {
        Mode::Open { .. } => OPEN_LOOP_CONNECTIONS,
        Mode::Closed { concurrency } => concurrency.div_ceil(WORKERS_PER_CONNECTION),
    });
    let mut clients = Vec::new();
    for _ in 0..connections {
        let channel = client::connect(g).await?;
        clients.push(TenantServiceClient::new(channel));
    }
    tracing::info!(
        broker = %g.addr,
        ?mode,
        ?requests,
        ?duration,
        connections,
        tenants = %names.join(","),
        "load starting"
    );

    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    let progress = Arc::new(AtomicU64::new(0));
    let reporter = {
        let progress = progress.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            tick.tick().await;
            loop {
                tick.tick().await;
                tracing::info!(answered = progress.load(Ordering::Relaxed), "progress");
            }
        })
    };
    let maker = ShotMaker {
        clients,
        callers,
        run_id: parse::new_request_id()[..8].to_string(),
        timeout: Duration::from_millis(a.timeout),
        release: a.release,
    };
    let started = Instant::now();

    let tally = match mode {
        Mode::Open { rate } => {
            let tally = Arc::new(Mutex::new(Tally::default()));
            let in_flight = Arc::new(Semaphore::new(a.max_in_flight as usize));
            let mut mix = Mix::new(a.seed);
            let mut stop = stop_rx.clone();
            let mut issue_lag = Duration::ZERO;
            for (i, offset) in schedule(rate, requests, duration).enumerate() {
                let due = started + offset;
                tokio::select! {
                    () = tokio::time::sleep_until(due) => {}
                    _ = stop.wait_for(|s| *s) => break,
                }
                let permit = tokio::select! {
                    p = in_flight.clone().acquire_owned() => p.expect("never closed"),
                    _ = stop.wait_for(|s| *s) => break,
                };
                // How late this submission leaves: the generator's own lag (CPU, or its
                // --max-in-flight), which its latency includes.
                issue_lag = issue_lag.max(due.elapsed());
                let s = maker.make(i as u64, i as u64, &mut mix);
                let tally = tally.clone();
                let progress = progress.clone();
                tokio::spawn(async move {
                    let mut mine = Tally::default();
                    s.fire(due, &mut mine, &progress).await;
                    tally.lock().expect("tally lock").merge(mine);
                    drop(permit);
                });
            }
            let _ = in_flight.acquire_many(a.max_in_flight).await;
            let mut tally = std::mem::take(&mut *tally.lock().expect("tally lock"));
            tally.issue_lag = Some(issue_lag);
            tally
        }
        Mode::Closed { concurrency } => {
            let next = Arc::new(AtomicU64::new(0));
            let end = duration.map(|d| started + d);
            let mut workers = tokio::task::JoinSet::new();
            for w in 0..concurrency {
                let seed = a.seed ^ u64::from(w).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                let mut mix = Mix::new(seed);
                let next = next.clone();
                let stop = stop_rx.clone();
                let progress = progress.clone();
                let maker = maker.clone();
                workers.spawn(async move {
                    let mut mine = Tally::default();
                    loop {
                        if *stop.borrow() || end.is_some_and(|e| Instant::now() >= e) {
                            break;
                        }
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if requests.is_some_and(|n| i >= n) {
                            break;
                        }
                        let s = maker.make(i, u64::from(w), &mut mix);
                        s.fire(Instant::now(), &mut mine, &progress).await;
                    }
                    mine
                });
            }
            let mut tally = Tally::default();
            while let Some(done) = workers.join_next().await {
                tally.merge(done?);
            }
            tally
        }
    };
    let elapsed = started.elapsed();
    reporter.abort();

    let report = report(mode, connections, &tally, elapsed, a.release);
    if g.json {
        output::print_json(&report);
    } else {
        output::emit(&human(&report));
    }
    Ok(())
}

fn ms(us: Option<u64>) -> Value {
    us.map_or(Value::Null, |us| json!(us as f64 / 1000.0))
}

/// The run's figures as one JSON object.
fn report(mode: Mode, connections: u32, t: &Tally, elapsed: Duration, release: bool) -> Value {
    let mut sorted = t.latencies_us.clone();
    sorted.sort_unstable();
    let ok = sorted.len() as u64;
    let failed: u64 = t.errors.values().sum();
    let secs = elapsed.as_secs_f64();
    let (rate, concurrency) = match mode {
        Mode::Open { rate } => (Some(rate), None),
        Mode::Closed { concurrency } => (None, Some(concurrency)),
    };
    let mut v = json!({
        "mode": match mode { Mode::Open { .. } => "open", Mode::Closed { .. } => "closed" },
        "rate": rate,
        "concurrency": concurrency,
        "connections": connections,
        "submitted": ok + failed,
        "ok": ok,
        "errors": t.errors,
        "error_samples": t.error_samples,
        "elapsed_s": (secs * 1000.0).round() / 1000.0,
        "throughput_rps": if secs > 0.0 { (ok as f64 / secs * 10.0).round() / 10.0 } else { 0.0 },
        "p50_ms": ms(percentile(&sorted, 50.0)),
        "p90_ms": ms(percentile(&sorted, 90.0)),
        "p99_ms": ms(percentile(&sorted, 99.0)),
        "max_ms": ms(sorted.last().copied()),
        "issue_lag_max_ms": ms(t.issue_lag.map(|d| d.as_micros() as u64)),
    });
    if release {
        v["released"] = t.released.into();
        v["cancelled"] = t.cancelled.into();
        v["give_back_errors"] = json!(t.give_back_errors);
    }
    v
}

/// The report for people: one `key  value` line per figure.
fn human(v: &Value) -> String {
    let mut t = output::Table::new(&["FIGURE", "VALUE"]);
    for key in [
        "mode",
        "rate",
        "concurrency",
        "connections",
        "submitted",
        "ok",
        "errors",
        "error_samples",
        "elapsed_s",
        "throughput_rps",
        "p50_ms",
        "p90_ms",
        "p99_ms",
        "max_ms",
        "issue_lag_max_ms",
        "released",
        "cancelled",
        "give_back_errors",
    ] {
        let Some(value) = v.get(key) else { continue };
        let text = match value {
            Value::Null => continue,
            Value::String(s) => s.clone(),
            Value::Object(m) if m.is_empty() => "none".to_string(),
            Value::Object(m) => m
                .iter()
                .map(|(k, n)| format!("{k} {n}"))
                .collect::<Vec<_>>()
                .join(", "),
            other => other.to_string(),
        };
        t.row(vec![key.to_string(), text]);
    }
    t.render()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let values: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&values, 50.0), Some(50));
        assert_eq!(percentile(&values, 90.0), Some(90));
        assert_eq!(percentile(&values, 99.0), Some(99));
        assert_eq!(percentile(&values, 99.9), Some(100));
        assert_eq!(percentile(&values, 100.0), Some(100));
        assert_eq!(percentile(&values, 0.0), Some(1));
        assert_eq!(percentile(&[7], 99.0), Some(7));
        assert_eq!(percentile(&[1, 2, 3, 1000], 50.0), Some(2));
        assert_eq!(percentile(&[1, 2, 3, 1000], 99.0), Some(1000));
        assert_eq!(percentile::<u64>(&[], 50.0), None);
    }

    #[test]
    fn the_open_loop_schedule_is_fixed_and_bounded() {
        assert_eq!(schedule_offset(0, 100.0), Duration::ZERO);
        assert_eq!(schedule_offset(1, 100.0), Duration::from_millis(10));
        assert_eq!(schedule_offset(1, 0.5), Duration::from_secs(2));
        // No drift: the millionth submission at 1000/s is due after exactly 1000 s.
        assert_eq!(
            schedule_offset(1_000_000, 1000.0),
            Duration::from_secs(1000)
        );
        let by_count: Vec<_> = schedule(10.0, Some(3), None).collect();
        assert_eq!(by_count, [0, 100, 200].map(Duration::from_millis).to_vec());
        // Ten per second for one second: due at 0, 100, ..., 900 ms.
        assert_eq!(
            schedule(10.0, None, Some(Duration::from_secs(1))).count(),
            10
        );
        // The tighter bound wins.
        assert_eq!(
            schedule(10.0, Some(5), Some(Duration::from_secs(1))).count(),
            5
        );
        assert_eq!(
            schedule(1000.0, Some(1_000_000), Some(Duration::from_millis(1500))).count(),
            1500
        );
    }

    #[test]
    fn the_mix_is_seeded_and_within_its_bounds() {
        let (mut a, mut b) = (Mix::new(7), Mix::new(7));
        let (mut gangs, mut elastics) = (0, 0);
        for _ in 0..2000 {
            let spec = a.spec();
            assert_eq!(spec, b.spec(), "the same seed gives the same requests");
            assert_eq!(a.tenant(3), b.tenant(3));
            assert!((60_000..=900_000).contains(&spec.duration_ms));
            match spec.shape {
                Some(Shape::Gang(g)) => {
                    gangs += 1;
                    assert!((1..=4).contains(&g.nodes));
                    assert!([1, 2, 4, 8].contains(&g.devices_per_node));
                }
                Some(Shape::Elastic(e)) => {
                    elastics += 1;
                    assert!((200..=20_000).contains(&e.tflops));
                    assert!(e.min_chunk_tflops <= e.tflops);
                }
                None => panic!("every request has a shape"),
            }
        }
        assert!(
            gangs > 800 && elastics > 800,
            "{gangs} gang, {elastics} elastic"
        );
        assert_ne!(Mix::new(1).spec(), Mix::new(2).spec());
    }

    #[test]
    fn run_lengths_accept_seconds_and_units() {
        assert_eq!(run_length_ms("60"), Ok(60_000));
        assert_eq!(run_length_ms("5m"), Ok(300_000));
        assert!(run_length_ms("0").is_err());
        assert!(run_length_ms("soon").is_err());
        assert!(positive_rate("0").is_err());
        assert_eq!(positive_rate("250"), Ok(250.0));
    }

    #[test]
    fn the_report_has_the_figures_by_name() {
        let tally = Tally {
            latencies_us: vec![3000, 1000, 2000, 4000],
            errors: BTreeMap::from([("RESOURCE_EXHAUSTED", 2)]),
            ..Default::default()
        };
        let v = report(
            Mode::Open { rate: 100.0 },
            4,
            &tally,
            Duration::from_secs(2),
            false,
        );
        assert_eq!(v["ok"], 4);
        assert_eq!(v["submitted"], 6);
        assert_eq!(v["errors"]["RESOURCE_EXHAUSTED"], 2);
        assert_eq!(v["throughput_rps"], 2.0);
        assert_eq!(v["p50_ms"], 2.0);
        assert_eq!(v["p99_ms"], 4.0);
        assert_eq!(v["max_ms"], 4.0);
        assert!(v.get("released").is_none());
        let text = human(&v);
        assert!(text.contains("RESOURCE_EXHAUSTED 2"), "{text}");
        assert!(!text.contains("concurrency"), "{text}");
        for (key, value) in v.as_object().unwrap() {
            assert!(
                value.is_null() || text.contains(key.as_str()),
                "{key} missing: {text}"
            );
        }
        let with_release = report(
            Mode::Closed { concurrency: 8 },
            1,
            &tally,
            Duration::from_secs(2),
            true,
        );
        assert_eq!(with_release["released"], 0);
        let text = human(&with_release);
        for (key, value) in with_release.as_object().unwrap() {
            assert!(
                value.is_null() || text.contains(key.as_str()),
                "{key} missing: {text}"
            );
        }
    }
}
