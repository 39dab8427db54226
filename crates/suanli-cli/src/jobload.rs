//! `suanli loadgen --jobs N`: runs N short jobs through a pool's agent and measures what a
//! tenant waits for around its job, not the broker alone:
//! - start: from the submission's send to the RUNNING event on a watch stream;
//! - running lag: from the job's own first instruction (it prints the clock) to that event,
//!   negative when the pool reports the start before the job's program runs (a Slurm job is
//!   running for Slurm before its task is launched);
//! - end: from the job's own exit (it prints the clock as its last act) to the event that
//!   ends the request;
//! - throughput: jobs completed per minute with `--concurrency` jobs in flight.
//!
//! Each job is `/bin/sh -c 'date +%s%3N; sleep S; date +%s%3N'` on one node of the named pool;
//! its output is read back with `StreamLogs`. The client, the agent and the jobs must share a
//! clock: run it on the pool's machine (or a Slurm cluster's login node).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde_json::json;
use suanli_proto::v1 as pb;
use tokio::sync::{Semaphore, oneshot};

use crate::client::{self, GlobalArgs};
use crate::loadgen::percentile;
use crate::parse;
use crate::time::now_unix_ms;

/// What a job-latency run is asked for.
#[derive(Clone, Debug)]
pub struct JobLoad {
    /// Jobs to run.
    pub jobs: u64,
    /// Jobs in flight at once.
    pub concurrency: u32,
    /// The pool to run them on.
    pub pool: String,
    /// Devices per job (one node).
    pub devices: u32,
    /// How long each job sleeps before it prints the clock and exits.
    pub sleep_ms: u64,
    /// Print one JSON object instead of a table.
    pub json: bool,
}

/// What one job saw: (ms from send to RUNNING, ms from the job's exit to its end, state).
struct Seen {
    running_at: Option<u64>,
    ended_at: Option<u64>,
    state: i32,
}

#[derive(Default)]
struct Watched {
    seen: HashMap<u64, Seen>,
    waiting: HashMap<u64, oneshot::Sender<()>>,
}

/// Runs the job load and prints its figures.
pub async fn run(g: &GlobalArgs, load: &JobLoad) -> anyhow::Result<()> {
    let (client, _) = client::tenant_client(g).await?;
    let watched = Arc::new(Mutex::new(Watched::default()));
    let mut watch = client
        .clone()
        .watch_requests(pb::WatchRequestsRequest::default())
        .await
        .context("watching the tenant's requests")?
        .into_inner();
    {
        let watched = Arc::clone(&watched);
        tokio::spawn(async move {
            while let Ok(Some(e)) = watch.message().await {
                let now = now_unix_ms();
                let Some(r) = e.request else { continue };
                let mut w = watched.lock().expect("not poisoned");
                let seen = w.seen.entry(r.id).or_insert(Seen {
                    running_at: None,
                    ended_at: None,
                    state: r.state,
                });
                seen.state = r.state;
                if r.state == pb::RequestState::Running as i32 && seen.running_at.is_none() {
                    seen.running_at = Some(now);
                }
                let ended = !matches!(
                    pb::RequestState::try_from(r.state),
                    Ok(pb::RequestState::Queued
                        | pb::RequestState::Placed
                        | pb::RequestState::Running)
                );
                if ended && seen.ended_at.is_none() {
                    seen.ended_at = Some(now);
                    if let Some(tx) = w.waiting.remove(&r.id) {
                        let _ = tx.send(());
                    }
                }
            }
        });
    }
    let slots = Arc::new(Semaphore::new(load.concurrency as usize));
    let started = std::time::Instant::now();
    let mut tasks = Vec::new();
    for i in 0..load.jobs {
        let permit = Arc::clone(&slots).acquire_owned().await?;
        let mut client = client.clone();
        let watched = Arc::clone(&watched);
        let load = load.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            one_job(&mut client, &watched, &load, i).await
        }));
    }
    let mut starts = Vec::new();
    let mut lags = Vec::new();
    let mut ends = Vec::new();
    let mut failed = 0u64;
    for t in tasks {
        match t.await? {
            Ok((start, lag, end)) => {
                starts.push(start);
                lags.push(lag);
                ends.push(end);
            }
            Err(e) => {
                failed += 1;
                tracing::warn!(error = %e, "job failed");
            }
        }
    }
    let elapsed = started.elapsed();
    starts.sort_unstable();
    lags.sort_unstable();
    ends.sort_unstable();
    let per_minute = starts.len() as f64 * 60.0 / elapsed.as_secs_f64();
    let q = |v: &[u64], p: f64| percentile(v, p).unwrap_or(0);
    let qi = |v: &[i64], p: f64| percentile(v, p).unwrap_or(0);
    if load.json {
        println!(
            "{}",
            json!({
                "jobs": load.jobs,
                "completed": starts.len(),
                "failed": failed,
                "concurrency": load.concurrency,
                "pool": load.pool,
                "seconds": elapsed.as_secs_f64(),
                "jobs_per_minute": per_minute,
                "start_ms": {"p50": q(&starts, 50.0), "p99": q(&starts, 99.0), "max": starts.last()},
                "running_lag_ms": {"p50": qi(&lags, 50.0), "p99": qi(&lags, 99.0), "max": lags.last()},
                "end_ms": {"p50": q(&ends, 50.0), "p99": q(&ends, 99.0), "max": ends.last()},
            })
        );
    } else {
        println!(
            "{} jobs on {} ({} completed, {failed} failed), {} at a time, in {:.1} s: {per_minute:.0} jobs/min",
            load.jobs,
            load.pool,
            starts.len(),
            load.concurrency,
            elapsed.as_secs_f64()
        );
        println!(
            "submission to RUNNING  p50 {} ms  p99 {} ms  max {} ms",
            q(&starts, 50.0),
            q(&starts, 99.0),
            starts.last().unwrap_or(&0)
        );
        println!(
            "job start to RUNNING   p50 {} ms  p99 {} ms  max {} ms",
            qi(&lags, 50.0),
            qi(&lags, 99.0),
            lags.last().unwrap_or(&0)
        );
        println!(
            "job exit to its end    p50 {} ms  p99 {} ms  max {} ms",
            q(&ends, 50.0),
            q(&ends, 99.0),
            ends.last().unwrap_or(&0)
        );
    }
    if failed > 0 {
        bail!("{failed} of {} jobs did not complete", load.jobs);
    }
    Ok(())
}

/// Submits one job, waits for its end, reads its output: (ms from send to RUNNING, ms from
/// the job's first instruction to RUNNING, ms from its exit to its end).
async fn one_job(
    client: &mut suanli_proto::v1::tenant_service_client::TenantServiceClient<client::Authed>,
    watched: &Mutex<Watched>,
    load: &JobLoad,
    i: u64,
) -> anyhow::Result<(u64, i64, u64)> {
    let sleep = format!("{}.{:03}", load.sleep_ms / 1000, load.sleep_ms % 1000);
    let spec = pb::RequestSpec {
        shape: Some(pb::request_spec::Shape::Gang(pb::GangShape {
            nodes: 1,
            devices_per_node: load.devices,
        })),
        duration_ms: 600_000,
        constraints: Some(pb::Constraints {
            pools: vec![load.pool.clone()],
            ..Default::default()
        }),
        workload: Some(pb::Workload {
            argv: vec![
                "/bin/sh".into(),
                "-c".into(),
                format!("date +%s%3N; sleep {sleep}; date +%s%3N"),
            ],
            ..Default::default()
        }),
        ..Default::default()
    };
    let sent = now_unix_ms();
    let r = client
        .submit_request(pb::SubmitRequestRequest {
            request_id: format!("jobload-{}-{i}", parse::new_request_id()),
            spec: Some(spec),
        })
        .await?
        .into_inner();
    let (tx, rx) = oneshot::channel();
    let already = {
        let mut w = watched.lock().expect("not poisoned");
        let ended = w.seen.get(&r.id).is_some_and(|s| s.ended_at.is_some());
        if !ended {
            w.waiting.insert(r.id, tx);
        }
        ended
    };
    if !already {
        tokio::time::timeout(Duration::from_secs(600), rx)
            .await
            .context("no end within 600 s")??;
    }
    let (running_at, ended_at, state) = {
        let w = watched.lock().expect("not poisoned");
        let s = &w.seen[&r.id];
        (s.running_at, s.ended_at.expect("ended"), s.state)
    };
    if state != pb::RequestState::Completed as i32 {
        bail!("request {} ended {}", r.id, crate::output::state(state));
    }
    let running_at = running_at.context("no RUNNING event was seen")?;
    let mut logs = client
        .stream_logs(pb::StreamLogsRequest {
            name: r.name.clone(),
            stream: pb::LogStream::Stdout as i32,
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(chunk) = logs.message().await? {
        out.extend(chunk.data);
    }
    let text = String::from_utf8_lossy(&out);
    let clock: Vec<u64> = text.lines().filter_map(|l| l.trim().parse().ok()).collect();
    let [began, exited] = clock[..] else {
        bail!("job {} printed {text:?}, not the clock twice", r.id);
    };
    Ok((
        running_at.saturating_sub(sent),
        running_at as i64 - began as i64,
        ended_at.saturating_sub(exited),
    ))
}
