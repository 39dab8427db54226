//! What the agent does with the broker's messages, whatever its backend: start and stop leases,
//! report how jobs ended, keep every report until the broker acknowledges it, and serve output.
//!
//! Reports are idempotent: the agent answers a StartLease for a lease it runs with STARTED again,
//! and one for a lease whose job ended (kept in a journal on disk, so across restarts too) with
//! STARTED and the end again, so nothing starts twice. The broker acknowledges each report; one
//! not acknowledged is sent again after a reconnect, or after [`RESEND_AFTER`].

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use suanli_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

use crate::backend::{
    Backend, BackendError, Job, JobEvent, Launched, LeaseId, NodeSlot, SavedOutcome, outcome,
};

/// A report not acknowledged after this long is sent again.
pub const RESEND_AFTER: Duration = Duration::from_secs(5);
/// How many ended leases the journal remembers.
const JOURNAL_KEEP: usize = 100_000;

/// The stream to the broker, as the runner writes to it.
pub type Outbox = mpsc::Sender<pb::AgentMessage>;

/// A lease the agent holds.
struct Held {
    id: LeaseId,
    /// Whether the backend runs a job for it (a capacity lease runs nothing).
    job: bool,
    grace: Duration,
    /// Whether its job runs (reported STARTED).
    started: bool,
}

/// An ended lease as the journal keeps it, one JSON line each.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Ended {
    request: u64,
    lease: u32,
    #[serde(flatten)]
    outcome: SavedOutcome,
}

/// The ends of leases' jobs, in memory and appended to a file.
struct Journal {
    path: Option<PathBuf>,
    by_lease: BTreeMap<LeaseId, Ended>,
    order: VecDeque<LeaseId>,
}

impl Journal {
    fn open(path: Option<PathBuf>) -> Result<Self, BackendError> {
        let mut j = Journal {
            path,
            by_lease: BTreeMap::new(),
            order: VecDeque::new(),
        };
        if let Some(p) = j.path.clone()
            && let Ok(text) = std::fs::read_to_string(&p)
        {
            for (i, line) in text.lines().enumerate() {
                match serde_json::from_str::<Ended>(line) {
                    Ok(e) => j.remember(e),
                    Err(e) => tracing::warn!(
                        journal = %p.display(),
                        line = i + 1,
                        error = %e,
                        "unreadable journal line skipped"
                    ),
                }
            }
            if text.lines().count() > 2 * JOURNAL_KEEP {
                j.rewrite()?;
            }
        }
        Ok(j)
    }

    fn remember(&mut self, e: Ended) {
        let id = LeaseId {
            request: e.request,
            lease: e.lease,
        };
        if self.by_lease.insert(id, e).is_none() {
            self.order.push_back(id);
            if self.order.len() > JOURNAL_KEEP {
                let old = self.order.pop_front().expect("not empty");
                self.by_lease.remove(&old);
            }
        }
    }

    fn rewrite(&self) -> Result<(), BackendError> {
        let Some(p) = &self.path else { return Ok(()) };
        let mut text = String::new();
        for id in &self.order {
            text.push_str(&serde_json::to_string(&self.by_lease[id]).expect("serialises"));
            text.push('\n');
        }
        let tmp = p.with_extension("tmp");
        std::fs::write(&tmp, text)
            .and_then(|()| std::fs::rename(&tmp, p))
            .map_err(|e| BackendError::Fatal(format!("journal {}: {e}", p.display())))
    }

    fn record(&mut self, id: LeaseId, o: &pb::JobOutcome) {
        let e = Ended {
            request: id.request,
            lease: id.lease,
            outcome: o.into(),
        };
        if let Some(p) = &self.path {
            let line = serde_json::to_string(&e).expect("serialises");
            let written = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .and_then(|mut f| writeln!(f, "{line}"));
            if let Err(err) = written {
                tracing::error!(journal = %p.display(), error = %err, "cannot append to the journal");
            }
        }
        self.remember(e);
    }

    fn get(&self, id: LeaseId) -> Option<pb::JobOutcome> {
        self.by_lease.get(&id).map(|e| e.outcome.clone().into())
    }

    fn latest(&self, request: u64) -> Option<LeaseId> {
        self.by_lease
            .range(
                LeaseId { request, lease: 0 }..=LeaseId {
                    request,
                    lease: u32::MAX,
                },
            )
            .next_back()
            .map(|(id, _)| *id)
    }
}

/// See the module documentation.
pub struct Runner {
    backend: Box<dyn Backend>,
    pool: String,
    leases: BTreeMap<u64, Held>,
    journal: Journal,
    pending: BTreeMap<(u64, u32, i32), (pb::LeaseReport, Instant)>,
    /// Leases whose jobs run, for the output followers.
    running: Arc<Mutex<BTreeSet<LeaseId>>>,
    log_tasks: HashMap<u64, AbortHandle>,
}

impl Runner {
    /// A runner over a backend; `journal` keeps ended leases across restarts (none: in memory
    /// only). Finds the backend's running jobs again.
    pub fn new(
        pool: &str,
        mut backend: Box<dyn Backend>,
        journal: Option<PathBuf>,
    ) -> Result<Self, BackendError> {
        let journal = Journal::open(journal)?;
        let mut leases = BTreeMap::new();
        let found = backend.recover()?;
        for id in &found {
            leases.insert(
                id.request,
                Held {
                    id: *id,
                    job: true,
                    grace: Duration::from_secs(10),
                    started: false,
                },
            );
        }
        if !found.is_empty() {
            tracing::info!(
                pool,
                jobs = found.len(),
                "found running jobs again after a restart"
            );
        }
        Ok(Runner {
            backend,
            pool: pool.to_string(),
            running: Arc::new(Mutex::new(found.into_iter().collect())),
            leases,
            journal,
            pending: BTreeMap::new(),
            log_tasks: HashMap::new(),
        })
    }

    /// The backend's name.
    pub fn backend_name(&self) -> &'static str {
        self.backend.name()
    }

    /// How often to call [`Runner::poll`].
    pub fn poll_interval(&self) -> Duration {
        self.backend.poll_interval()
    }

    /// Leases held now.
    pub fn held(&self) -> usize {
        self.leases.len()
    }

    /// Reports not acknowledged yet.
    pub fn unacknowledged(&self) -> usize {
        self.pending.len()
    }

    /// The first message of a stream.
    pub fn hello(&self, agent_version: &str) -> pb::Hello {
        pb::Hello {
            pool: self.pool.clone(),
            agent_version: agent_version.to_string(),
            running_requests: self.leases.keys().copied().collect(),
            runtimes: self
                .backend
                .runtimes()
                .into_iter()
                .map(|r| r as i32)
                .collect(),
            backend: self.backend.name().to_string(),
        }
    }

    /// The broker welcomed the agent: send every report it has not acknowledged.
    pub fn welcomed(&mut self, out: &Outbox) {
        let now = Instant::now();
        for (report, sent) in self.pending.values_mut() {
            *sent = now;
            let _ = out.try_send(message(report.clone()));
        }
    }

    /// Sends again the reports not acknowledged for [`RESEND_AFTER`].
    pub fn resend_overdue(&mut self, out: &Outbox) {
        let now = Instant::now();
        for (report, sent) in self.pending.values_mut() {
            if now.duration_since(*sent) >= RESEND_AFTER {
                *sent = now;
                let _ = out.try_send(message(report.clone()));
            }
        }
    }

    fn report(
        &mut self,
        out: &Outbox,
        id: LeaseId,
        kind: pb::LeaseReportKind,
        o: Option<pb::JobOutcome>,
    ) {
        let detail = o.as_ref().map(|o| o.message.clone()).unwrap_or_default();
        let report = pb::LeaseReport {
            request: id.request,
            kind: kind as i32,
            time_unix_ms: now_unix_ms(),
            detail,
            lease: id.lease,
            outcome: o,
        };
        let _ = out.try_send(message(report.clone()));
        self.pending.insert(
            (id.request, id.lease, kind as i32),
            (report, Instant::now()),
        );
    }

    fn report_end(&mut self, out: &Outbox, id: LeaseId, o: pb::JobOutcome) {
        let kind = if o.cause == pb::JobCause::Completed as i32 {
            pb::LeaseReportKind::Finished
        } else {
            pb::LeaseReportKind::Failed
        };
        self.report(out, id, kind, Some(o));
    }

    fn set_running(&self, id: LeaseId, on: bool) {
        let mut running = self.running.lock().expect("not poisoned");
        if on {
            running.insert(id);
        } else {
            running.remove(&id);
        }
    }

    /// Deals with one message from the broker.
    pub fn handle(&mut self, msg: pb::BrokerMessage, out: &Outbox) {
        use pb::broker_message::Body;
        match msg.body {
            Some(Body::StartLease(s)) => self.start(s, out),
            Some(Body::StopLease(s)) => self.stop(s.request, s.reason),
            Some(Body::ReportAck(a)) => {
                self.pending.remove(&(a.request, a.lease, a.kind));
            }
            Some(Body::LogsRequest(r)) => self.serve_logs(r, out),
            Some(Body::LogsCancel(c)) => {
                if let Some(task) = self.log_tasks.remove(&c.id) {
                    task.abort();
                }
            }
            Some(Body::Welcome(_)) => tracing::debug!("a second Welcome, ignored"),
            None => tracing::warn!("a message from the broker without a body, ignored"),
        }
    }

    fn start(&mut self, s: pb::StartLease, out: &Outbox) {
        let id = LeaseId {
            request: s.request,
            lease: s.lease.max(1),
        };
        if let Some(held) = self.leases.get(&s.request) {
            if held.id == id {
                if held.started {
                    tracing::info!(lease = %id, "StartLease for a lease already running: confirming it");
                    self.report(out, id, pb::LeaseReportKind::Started, None);
                }
                return;
            }
            if held.id.lease > id.lease {
                tracing::info!(lease = %id, "StartLease for an earlier lease of a request: ignored");
                return;
            }
            // The request was placed again: its earlier lease is over.
            self.stop(s.request, pb::EndReason::Unspecified as i32);
        }
        if let Some(o) = self.journal.get(id) {
            tracing::info!(lease = %id, "StartLease for a lease whose job already ended: reporting it again");
            self.report(out, id, pb::LeaseReportKind::Started, None);
            self.report_end(out, id, o);
            return;
        }
        let runs_commands = !self.backend.runtimes().is_empty();
        let Some(workload) = s
            .workload
            .clone()
            .or_else(|| (!runs_commands).then(Default::default))
        else {
            // A capacity lease on a pool that runs jobs: hold it until the broker stops it.
            self.leases.insert(
                s.request,
                Held {
                    id,
                    job: false,
                    grace: Duration::ZERO,
                    started: true,
                },
            );
            self.report(out, id, pb::LeaseReportKind::Started, None);
            return;
        };
        let job = job_of(&s, id, workload);
        let started = self.backend.start(&job);
        match started {
            Ok(launched) => {
                let running = launched == Launched::Running;
                tracing::info!(lease = %id, tenant = %s.tenant, nodes = job.nodes.len(), running, "job launched");
                self.leases.insert(
                    s.request,
                    Held {
                        id,
                        job: true,
                        grace: job.stop_grace(),
                        started: running,
                    },
                );
                self.set_running(id, true);
                if running {
                    self.report(out, id, pb::LeaseReportKind::Started, None);
                }
            }
            Err(e) => {
                if matches!(e, BackendError::Fatal(_)) {
                    tracing::error!(lease = %id, error = %e, "the backend failed to start a job");
                } else {
                    tracing::warn!(lease = %id, error = %e, "job could not start");
                }
                let o = outcome(pb::JobCause::LaunchFailed, e.to_string());
                self.journal.record(id, &o);
                self.report_end(out, id, o);
            }
        }
    }

    fn stop(&mut self, request: u64, reason: i32) {
        let reason = pb::EndReason::try_from(reason)
            .map(|r| r.as_str_name())
            .unwrap_or("unknown reason");
        match self.leases.remove(&request) {
            Some(held) => {
                if held.job {
                    self.backend.stop(held.id, held.grace);
                    self.set_running(held.id, false);
                }
                tracing::info!(lease = %held.id, reason, "lease stopped by the broker");
            }
            None => tracing::debug!(request, reason, "StopLease for a lease not held"),
        }
    }

    /// Asks the backend which jobs started running or ended, and reports them.
    pub fn poll(&mut self, out: &Outbox) {
        for event in self.backend.poll() {
            match event {
                JobEvent::Running(id) => {
                    let Some(held) = self.leases.get_mut(&id.request).filter(|h| h.id == id) else {
                        continue;
                    };
                    if !held.started {
                        held.started = true;
                        tracing::info!(lease = %id, "job running");
                        self.report(out, id, pb::LeaseReportKind::Started, None);
                    }
                }
                JobEvent::Ended(id, o) => {
                    if self.leases.get(&id.request).is_none_or(|h| h.id != id) {
                        continue;
                    }
                    self.leases.remove(&id.request);
                    self.set_running(id, false);
                    tracing::info!(lease = %id, cause = o.cause, exit_code = ?o.exit_code, "job ended");
                    // Journaled before it is reported: a restart answers from the journal.
                    self.journal.record(id, &o);
                    self.report_end(out, id, o);
                }
            }
        }
        self.log_tasks.retain(|_, t| !t.is_finished());
    }

    fn serve_logs(&mut self, r: pb::LogsRequest, out: &Outbox) {
        let id = if r.lease != 0 {
            Some(LeaseId {
                request: r.request,
                lease: r.lease,
            })
        } else {
            self.leases
                .get(&r.request)
                .map(|h| h.id)
                .or_else(|| self.journal.latest(r.request))
        };
        let files = id.and_then(|id| self.backend.logs(id, r.node_rank));
        let what = match id {
            Some(id) => format!("lease {id} node {}", r.node_rank),
            None => format!("request {}", r.request),
        };
        let running = Arc::clone(&self.running);
        let request_id = r.id;
        let task = tokio::spawn(crate::logs::serve(files, r, what, out.clone(), move || {
            id.is_some_and(|id| running.lock().expect("not poisoned").contains(&id))
        }));
        self.log_tasks.insert(request_id, task.abort_handle());
    }
}

fn job_of(s: &pb::StartLease, id: LeaseId, workload: pb::Workload) -> Job {
    let nodes = s
        .parts
        .iter()
        .enumerate()
        .map(|(i, p)| NodeSlot {
            rank: s.node_ranks.get(i).copied().unwrap_or(i as u32),
            group: p.group,
            node: p.node,
            devices: p.devices,
            model: p.model.clone(),
        })
        .collect::<Vec<_>>();
    Job {
        id,
        tenant: s.tenant.clone(),
        workload,
        num_nodes: s.num_nodes.max(nodes.len() as u32),
        nodes,
        start_unix_ms: s.start_unix_ms,
        end_unix_ms: s.end_unix_ms,
    }
}

fn message(report: pb::LeaseReport) -> pb::AgentMessage {
    pb::AgentMessage {
        body: Some(pb::agent_message::Body::LeaseReport(report)),
    }
}

/// Wall-clock unix milliseconds.
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::SimBackend;

    fn report_of(m: pb::AgentMessage) -> pb::LeaseReport {
        match m.body {
            Some(pb::agent_message::Body::LeaseReport(r)) => r,
            other => panic!("not a report: {other:?}"),
        }
    }

    fn start(request: u64, lease: u32, ms: u64) -> pb::BrokerMessage {
        pb::BrokerMessage {
            body: Some(pb::broker_message::Body::StartLease(pb::StartLease {
                request,
                lease,
                start_unix_ms: 0,
                end_unix_ms: ms,
                ..Default::default()
            })),
        }
    }

    #[tokio::test]
    async fn reports_are_kept_until_acknowledged_and_ended_leases_answered_again() {
        let dir = tempfile::tempdir().unwrap();
        let journal = dir.path().join("ended.jsonl");
        let mut r =
            Runner::new("p", Box::new(SimBackend::new(1.0)), Some(journal.clone())).unwrap();
        let (out, mut rx) = mpsc::channel(64);
        r.handle(start(7, 1, 0), &out);
        let started = report_of(rx.recv().await.unwrap());
        assert_eq!((started.request, started.lease), (7, 1));
        assert_eq!(started.kind, pb::LeaseReportKind::Started as i32);
        r.poll(&out);
        let finished = report_of(rx.recv().await.unwrap());
        assert_eq!(finished.kind, pb::LeaseReportKind::Finished as i32);
        assert_eq!(r.unacknowledged(), 2);
        // Not acknowledged: a reconnect sends both again.
        r.welcomed(&out);
        assert_eq!(report_of(rx.recv().await.unwrap()).request, 7);
        assert_eq!(report_of(rx.recv().await.unwrap()).request, 7);
        for kind in [pb::LeaseReportKind::Started, pb::LeaseReportKind::Finished] {
            r.handle(
                pb::BrokerMessage {
                    body: Some(pb::broker_message::Body::ReportAck(pb::ReportAck {
                        request: 7,
                        lease: 1,
                        kind: kind as i32,
                    })),
                },
                &out,
            );
        }
        assert_eq!(r.unacknowledged(), 0);
        // A restarted agent still knows the end, and answers a repeated StartLease with it.
        drop(r);
        let mut r = Runner::new("p", Box::new(SimBackend::new(1.0)), Some(journal)).unwrap();
        r.handle(start(7, 1, 3_600_000), &out);
        assert_eq!(
            report_of(rx.recv().await.unwrap()).kind,
            pb::LeaseReportKind::Started as i32
        );
        assert_eq!(
            report_of(rx.recv().await.unwrap()).kind,
            pb::LeaseReportKind::Finished as i32
        );
        assert_eq!(r.held(), 0, "not started again");
        // A stopped lease is never reported ended.
        r.handle(start(8, 1, 0), &out);
        rx.recv().await.unwrap();
        r.handle(
            pb::BrokerMessage {
                body: Some(pb::broker_message::Body::StopLease(pb::StopLease {
                    request: 8,
                    reason: pb::EndReason::Released as i32,
                })),
            },
            &out,
        );
        r.poll(&out);
        assert!(rx.try_recv().is_err(), "no end for a stopped lease");
    }
}
