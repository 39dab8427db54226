//! `suanli agent`: a pool's agent. It registers the pool from a fleet file, keeps the
//! `PoolService.ConnectAgent` stream open (Hello, then a Heartbeat every interval the broker
//! asks for) and runs the leases the broker starts on the pool.
//!
//! Running a lease is simulated: the agent reports STARTED at once and FINISHED after the
//! lease's length divided by `--speedup`; no job is executed and no device is touched.
//!
//! The stream is reopened with backoff whenever it breaks. Hello then lists the leases still
//! running, so the broker neither starts them again nor stops them. A lease whose job finished
//! while the agent was away is reported FINISHED as soon as the broker has welcomed it back; if
//! a FINISHED report was lost with a broken stream, the broker starts the lease again and the
//! agent answers STARTED and FINISHED at once.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use clap::Args;
use rand::RngExt as _;
use suanli_core::{Catalogue, Fleet, PoolSpec, fleet};
use suanli_proto::v1::pool_service_client::PoolServiceClient;
use suanli_proto::v1::{
    AgentMessage, BrokerMessage, EndReason, Heartbeat, Hello, LeaseReport, LeaseReportKind,
    RegisterPoolRequest, StartLease, agent_message, broker_message,
};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status};

use crate::client::{self, Authed, Bearer, GlobalArgs, Role};
use crate::parse;
use crate::serve::shutdown_signal;
use crate::time::now_unix_ms;

/// How many finished leases the agent remembers, to answer a StartLease whose FINISHED report
/// the broker never received.
const FINISHED_MEMORY: usize = 100_000;
/// Shortest and longest wait before reconnecting.
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(15);
/// Heartbeat interval when the broker's Welcome gives none.
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(5);

/// `suanli agent`.
#[derive(Args, Clone, Debug)]
pub struct AgentArgs {
    /// Fleet file holding the pool's spec, or a built-in fleet (futian-2024, futian-2025).
    #[arg(long, value_name = "FILE")]
    pub fleet: String,
    /// Id of the pool this agent runs.
    #[arg(long, value_name = "ID")]
    pub pool: String,
    /// Finish simulated jobs this many times faster than their leases (10: a 2h lease
    /// reports FINISHED after 12 minutes).
    #[arg(long, value_name = "X", default_value_t = 1.0, value_parser = speedup)]
    pub speedup: f64,
}

fn speedup(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(x) if x.is_finite() && x > 0.0 => Ok(x),
        _ => Err(format!(
            "{text:?}: expected a number above 0, for example 1 or 60"
        )),
    }
}

/// The pool's spec from a fleet file or a built-in fleet.
fn load_pool(fleet_arg: &str, pool: &str) -> anyhow::Result<PoolSpec> {
    let text = if Path::new(fleet_arg).exists() {
        std::fs::read_to_string(fleet_arg)
            .with_context(|| format!("--fleet {fleet_arg}: cannot read"))?
    } else {
        match fleet_arg {
            "futian-2024" => fleet::FUTIAN_2024.to_string(),
            "futian-2025" => fleet::FUTIAN_2025.to_string(),
            _ => bail!(
                "--fleet {fleet_arg}: no such file (built-in fleets: futian-2024, futian-2025)"
            ),
        }
    };
    let fleet = Fleet::from_toml(&text, &Catalogue::builtin())
        .with_context(|| format!("--fleet {fleet_arg}"))?;
    let count = fleet.pools.len();
    fleet
        .pools
        .into_iter()
        .find(|p| p.id == pool)
        .ok_or_else(|| {
            anyhow!(
                "--pool {pool}: no such pool in fleet {} ({count} pools)",
                fleet.name
            )
        })
}

/// How long a simulated job runs: the lease's length divided by the speedup.
fn simulated_run_time(start_unix_ms: u64, end_unix_ms: u64, speedup: f64) -> Duration {
    let ms = end_unix_ms.saturating_sub(start_unix_ms) as f64 / speedup;
    Duration::try_from_secs_f64(ms / 1000.0).unwrap_or(Duration::MAX)
}

/// Exponential backoff with jitter between reconnection attempts.
struct Backoff {
    next: Duration,
}

impl Backoff {
    fn new() -> Self {
        Backoff { next: BACKOFF_MIN }
    }

    /// The ceiling of the next wait (the wait itself is 50 to 100 % of it).
    #[cfg(test)]
    fn ceiling(&self) -> Duration {
        self.next
    }

    fn next_delay(&mut self) -> Duration {
        let ceiling = self.next;
        self.next = (ceiling * 2).min(BACKOFF_MAX);
        ceiling.mul_f64(rand::rng().random_range(0.5..=1.0))
    }

    fn reset(&mut self) {
        self.next = BACKOFF_MIN;
    }
}

/// Why a stream ended.
enum SessionEnd {
    /// Try again after a pause.
    Retry(String),
    /// The broker does not know the pool: register it again.
    Unregistered,
    /// Stop the agent.
    Fatal(anyhow::Error),
}

fn classify(pool: &str, what: &str, status: Status) -> SessionEnd {
    let line = client::status_line(&status);
    match status.code() {
        Code::NotFound => SessionEnd::Unregistered,
        Code::Aborted => SessionEnd::Fatal(anyhow!(
            "{what}: {line} (another agent connected for pool {pool} and replaced this one)"
        )),
        Code::Unauthenticated
        | Code::PermissionDenied
        | Code::InvalidArgument
        | Code::FailedPrecondition
        | Code::Unimplemented => {
            SessionEnd::Fatal(anyhow::Error::from(status).context(what.to_string()))
        }
        _ => SessionEnd::Retry(format!("{what}: {line}")),
    }
}

/// A lease the agent is running.
struct RunningLease {
    timer: AbortHandle,
}

/// The leases of the pool and how to report on them.
struct Agent {
    pool: String,
    speedup: f64,
    running: BTreeMap<u64, RunningLease>,
    finished: BTreeSet<u64>,
    finished_order: VecDeque<u64>,
    done_tx: mpsc::UnboundedSender<u64>,
}

type Outbox = mpsc::Sender<AgentMessage>;

fn report(request: u64, kind: LeaseReportKind, detail: &str) -> AgentMessage {
    AgentMessage {
        body: Some(agent_message::Body::LeaseReport(LeaseReport {
            request,
            kind: kind as i32,
            time_unix_ms: now_unix_ms(),
            detail: detail.to_string(),
        })),
    }
}

async fn send(out: &Outbox, msg: AgentMessage) -> Result<(), SessionEnd> {
    out.send(msg)
        .await
        .map_err(|_| SessionEnd::Retry("the stream to the broker closed".into()))
}

impl Agent {
    fn remember_finished(&mut self, request: u64) {
        if self.finished.insert(request) {
            self.finished_order.push_back(request);
            if self.finished_order.len() > FINISHED_MEMORY {
                let old = self.finished_order.pop_front().expect("not empty");
                self.finished.remove(&old);
            }
        }
    }

    async fn start(&mut self, s: StartLease, out: &Outbox) -> Result<(), SessionEnd> {
        let id = s.request;
        if self.running.contains_key(&id) {
            tracing::info!(
                request = id,
                "StartLease for a lease already running: confirming it"
            );
            return send(out, report(id, LeaseReportKind::Started, "simulated")).await;
        }
        if self.finished.contains(&id) {
            tracing::info!(
                request = id,
                "StartLease for a lease whose simulated job already finished: reporting it again"
            );
            send(out, report(id, LeaseReportKind::Started, "simulated")).await?;
            return send(
                out,
                report(id, LeaseReportKind::Finished, "simulated job finished"),
            )
            .await;
        }
        let run = simulated_run_time(s.start_unix_ms, s.end_unix_ms, self.speedup);
        let devices: u32 = s.parts.iter().map(|p| p.devices).sum();
        let done = self.done_tx.clone();
        let timer = tokio::spawn(async move {
            tokio::time::sleep(run).await;
            let _ = done.send(id);
        })
        .abort_handle();
        self.running.insert(id, RunningLease { timer });
        tracing::info!(
            request = id,
            tenant = %s.tenant,
            devices,
            "simulated job started; it will report FINISHED in {:?} (lease length / speedup {})",
            run,
            self.speedup
        );
        send(out, report(id, LeaseReportKind::Started, "simulated")).await
    }

    fn stop(&mut self, request: u64, reason: i32) {
        let reason = EndReason::try_from(reason)
            .map(|r| r.as_str_name())
            .unwrap_or("unknown reason");
        match self.running.remove(&request) {
            Some(lease) => {
                lease.timer.abort();
                tracing::info!(request, reason, "simulated job stopped by the broker");
            }
            None => tracing::debug!(request, reason, "StopLease for a lease not running"),
        }
    }

    async fn finish(&mut self, request: u64, out: &Outbox) -> Result<(), SessionEnd> {
        if self.running.remove(&request).is_none() {
            return Ok(());
        }
        self.remember_finished(request);
        tracing::info!(request, "simulated job finished");
        send(
            out,
            report(request, LeaseReportKind::Finished, "simulated job finished"),
        )
        .await
    }

    /// One ConnectAgent stream, from Hello until it breaks.
    async fn session(
        &mut self,
        client: &mut PoolServiceClient<Authed>,
        done_rx: &mut mpsc::UnboundedReceiver<u64>,
        backoff: &mut Backoff,
    ) -> SessionEnd {
        let (out, rx) = mpsc::channel(1024);
        let hello = Hello {
            pool: self.pool.clone(),
            agent_version: format!("suanli-agent/{}", env!("CARGO_PKG_VERSION")),
            running_requests: self.running.keys().copied().collect(),
        };
        out.try_send(AgentMessage {
            body: Some(agent_message::Body::Hello(hello)),
        })
        .expect("an empty channel has room");
        let mut inbound = match client.connect_agent(ReceiverStream::new(rx)).await {
            Ok(r) => r.into_inner(),
            Err(s) => return classify(&self.pool, "opening the agent stream", s),
        };
        let welcome = match inbound.message().await {
            Ok(Some(BrokerMessage {
                body: Some(broker_message::Body::Welcome(w)),
            })) => w,
            Ok(Some(_)) => {
                return SessionEnd::Fatal(anyhow!(
                    "the broker's first message on the agent stream was not a Welcome"
                ));
            }
            Ok(None) => {
                return SessionEnd::Retry("the broker closed the stream before Welcome".into());
            }
            Err(s) => return classify(&self.pool, "waiting for Welcome", s),
        };
        backoff.reset();
        let every = match welcome.heartbeat_interval_ms {
            0 => DEFAULT_HEARTBEAT,
            ms => Duration::from_millis(ms),
        };
        tracing::info!(
            pool = %self.pool,
            running = self.running.len(),
            "connected to the broker; heartbeat every {:?}",
            every
        );
        let mut heartbeat = tokio::time::interval(every);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let result: Result<(), SessionEnd> = async {
            loop {
                tokio::select! {
                    _ = heartbeat.tick() => {
                        let beat = Heartbeat { time_unix_ms: now_unix_ms(), nodes: Vec::new() };
                        send(&out, AgentMessage {
                            body: Some(agent_message::Body::Heartbeat(beat)),
                        }).await?;
                    }
                    msg = inbound.message() => match msg {
                        Ok(Some(m)) => match m.body {
                            Some(broker_message::Body::StartLease(s)) => self.start(s, &out).await?,
                            Some(broker_message::Body::StopLease(s)) => self.stop(s.request, s.reason),
                            Some(broker_message::Body::Welcome(_)) => {
                                tracing::debug!("a second Welcome, ignored");
                            }
                            None => tracing::warn!("a message from the broker without a body, ignored"),
                        },
                        Ok(None) => {
                            return Err(SessionEnd::Retry("the broker closed the stream".into()));
                        }
                        Err(s) => return Err(classify(&self.pool, "agent stream", s)),
                    },
                    Some(request) = done_rx.recv() => self.finish(request, &out).await?,
                }
            }
        }
        .await;
        match result {
            Ok(()) => unreachable!("the session loop only ends with an error"),
            Err(end) => end,
        }
    }
}

/// Runs the agent until SIGINT or SIGTERM.
pub async fn run(g: &GlobalArgs, a: &AgentArgs) -> anyhow::Result<()> {
    let spec = load_pool(&a.fleet, &a.pool)?;
    let pool_msg = suanli_broker::convert::pool_spec_to_pb(&spec);
    let bearer = Bearer::new(&client::identity(g, Role::Agent(&a.pool))?.token)?;
    let endpoint = client::endpoint(&g.addr, g.ca_cert.as_deref())?;
    let register_id = parse::new_request_id();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    let mut agent = Agent {
        pool: a.pool.clone(),
        speedup: a.speedup,
        running: BTreeMap::new(),
        finished: BTreeSet::new(),
        finished_order: VecDeque::new(),
        done_tx,
    };
    tracing::info!(
        pool = %a.pool,
        groups = spec.groups.len(),
        speedup = a.speedup,
        "agent starting; leases are simulated, no job is executed"
    );
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    let mut backoff = Backoff::new();
    let mut registered = false;
    loop {
        let attempt = async {
            let channel = match endpoint.connect().await {
                Ok(c) => c,
                Err(e) => {
                    return SessionEnd::Retry(format!(
                        "cannot connect to the broker at {}: {}",
                        endpoint.uri(),
                        client::error_line(&e.into())
                    ));
                }
            };
            let mut pools = client::pool_client(channel, bearer.clone());
            if !registered {
                let req = RegisterPoolRequest {
                    request_id: register_id.clone(),
                    pool: Some(pool_msg.clone()),
                };
                match pools.register_pool(req).await {
                    Ok(reply) => {
                        let pool = reply.into_inner();
                        tracing::info!(pool = %pool.name, "pool registered");
                        registered = true;
                    }
                    Err(s) => {
                        return match classify(&a.pool, "registering the pool", s) {
                            SessionEnd::Unregistered => {
                                SessionEnd::Fatal(anyhow!("registering the pool: NOT_FOUND"))
                            }
                            other => other,
                        };
                    }
                }
            }
            agent.session(&mut pools, &mut done_rx, &mut backoff).await
        };
        let end = tokio::select! {
            () = &mut shutdown => return Ok(()),
            end = attempt => end,
        };
        let why = match end {
            SessionEnd::Fatal(e) => return Err(e),
            SessionEnd::Unregistered => {
                registered = false;
                "the broker does not know the pool; registering it again".to_string()
            }
            SessionEnd::Retry(why) => why,
        };
        let wait = backoff.next_delay();
        tracing::warn!("{why}; reconnecting in {wait:?}");
        tokio::select! {
            () = &mut shutdown => return Ok(()),
            () = tokio::time::sleep(wait) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_time_is_the_lease_length_over_the_speedup() {
        let hour = 3_600_000;
        assert_eq!(
            simulated_run_time(hour, 3 * hour, 1.0),
            Duration::from_secs(7200)
        );
        assert_eq!(
            simulated_run_time(0, 2 * hour, 10.0),
            Duration::from_secs(720)
        );
        assert_eq!(simulated_run_time(5, 1, 1.0), Duration::ZERO);
        assert_eq!(simulated_run_time(0, u64::MAX, 1e-300), Duration::MAX);
    }

    #[test]
    fn speedup_must_be_positive() {
        assert_eq!(speedup("60"), Ok(60.0));
        assert_eq!(speedup("0.5"), Ok(0.5));
        for bad in ["0", "-1", "inf", "NaN", "x"] {
            assert!(speedup(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn backoff_doubles_to_a_ceiling_and_resets() {
        let mut b = Backoff::new();
        let mut ceilings = Vec::new();
        for _ in 0..10 {
            let ceiling = b.ceiling();
            let wait = b.next_delay();
            assert!(
                wait <= ceiling && wait >= ceiling / 2,
                "{wait:?} vs {ceiling:?}"
            );
            ceilings.push(ceiling);
        }
        assert_eq!(ceilings[0], BACKOFF_MIN);
        assert_eq!(ceilings[1], BACKOFF_MIN * 2);
        assert_eq!(*ceilings.last().unwrap(), BACKOFF_MAX);
        b.reset();
        assert_eq!(b.ceiling(), BACKOFF_MIN);
    }

    #[test]
    fn pools_register_as_the_fleet_file_describes_them() {
        let spec = load_pool("futian-2024", "futian-aicc").unwrap();
        let pool = suanli_broker::convert::pool_spec_to_pb(&spec);
        assert_eq!(pool.id, "futian-aicc");
        assert_eq!(pool.kind, suanli_proto::v1::PoolKind::LocalCentre as i32);
        assert_eq!(pool.region, "guangdong-shenzhen");
        assert_eq!(pool.groups.len(), spec.groups.len());
        assert_eq!(pool.groups[0].model, "ascend-910b");
        assert_eq!(pool.groups[0].devices_per_node, 8);
        assert_eq!(pool.groups[0].nodes, 1000);
        assert_eq!(pool.groups[0].price_fen_per_device_hour, 700);
        assert_eq!(pool.name, "pools/futian-aicc");
        assert!(pool.utilisation.is_none(), "output-only fields stay unset");
        let err = load_pool("futian-2024", "no-such-pool").unwrap_err();
        assert!(err.to_string().contains("--pool no-such-pool"), "{err}");
        let err = load_pool("no-such-fleet.toml", "futian-aicc").unwrap_err();
        assert!(err.to_string().contains("built-in fleets"), "{err}");
    }

    #[tokio::test]
    async fn finished_leases_are_answered_when_started_again() {
        let (done_tx, _done_rx) = mpsc::unbounded_channel();
        let mut agent = Agent {
            pool: "p".into(),
            speedup: 1.0,
            running: BTreeMap::new(),
            finished: BTreeSet::new(),
            finished_order: VecDeque::new(),
            done_tx,
        };
        let (out, mut rx) = mpsc::channel(16);
        let start = StartLease {
            request: 7,
            tenant: "acme".into(),
            parts: Vec::new(),
            start_unix_ms: 0,
            end_unix_ms: 3_600_000,
        };
        let kind = |m: AgentMessage| match m.body {
            Some(agent_message::Body::LeaseReport(r)) => (r.request, r.kind),
            _ => panic!("not a report"),
        };
        assert!(agent.start(start.clone(), &out).await.is_ok());
        assert_eq!(
            kind(rx.recv().await.unwrap()),
            (7, LeaseReportKind::Started as i32)
        );
        assert!(agent.finish(7, &out).await.is_ok());
        assert_eq!(
            kind(rx.recv().await.unwrap()),
            (7, LeaseReportKind::Finished as i32)
        );
        assert!(agent.running.is_empty());
        // The broker never got FINISHED and starts the lease again.
        assert!(agent.start(start, &out).await.is_ok());
        assert_eq!(
            kind(rx.recv().await.unwrap()),
            (7, LeaseReportKind::Started as i32)
        );
        assert_eq!(
            kind(rx.recv().await.unwrap()),
            (7, LeaseReportKind::Finished as i32)
        );
        assert!(agent.running.is_empty());
        // A stopped lease is forgotten and its timer cancelled.
        let other = StartLease {
            request: 8,
            ..Default::default()
        };
        assert!(agent.start(other, &out).await.is_ok());
        agent.stop(8, EndReason::Released as i32);
        assert!(agent.running.is_empty());
        assert!(agent.finish(8, &out).await.is_ok());
        rx.recv().await.unwrap(); // STARTED of 8
        assert!(rx.try_recv().is_err(), "no FINISHED for a stopped lease");
    }
}
