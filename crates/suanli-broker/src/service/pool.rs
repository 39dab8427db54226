//! `PoolService`: pools register, and their agents hold a stream open to the broker.

use std::pin::Pin;

use suanli_core::{Command, CoreError, RequestId};
use suanli_proto::v1 as pb;
use suanli_proto::v1::pool_service_server::PoolService;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, instrument, warn};

use super::{Shared, idem_key};
use crate::auth::{credential, principal};
use crate::convert;
use crate::error::BrokerError;

/// The pool service.
pub struct PoolApi(pub Shared);

type BrokerStream = Pin<Box<dyn Stream<Item = Result<pb::BrokerMessage, Status>> + Send>>;

#[tonic::async_trait]
impl PoolService for PoolApi {
    #[instrument(skip_all, fields(rpc = "RegisterPool"))]
    async fn register_pool(
        &self,
        req: Request<pb::RegisterPoolRequest>,
    ) -> Result<Response<pb::Pool>, Status> {
        let who = principal(&req)?;
        let req = req.into_inner();
        let key = idem_key(who.key(), &req.request_id, "RegisterPool", &req)?;
        let spec = convert::pool_from_pb(req.pool, "pool")?;
        who.may_act_for_pool(&spec.id)?;
        let id = spec.id.clone();
        match self
            .0
            .writer
            .apply(Command::RegisterPool(spec.clone()), key.clone())
            .await
        {
            Err(BrokerError::Core(CoreError::DuplicatePool { .. })) => {
                self.0.writer.apply(Command::UpdatePool(spec), None).await?;
            }
            other => {
                other?;
            }
        }
        Ok(Response::new(self.0.pool(&id)?))
    }

    type ConnectAgentStream = BrokerStream;

    #[instrument(skip_all, fields(rpc = "ConnectAgent"))]
    async fn connect_agent(
        &self,
        req: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<BrokerStream>, Status> {
        let who = principal(&req)?;
        let credential = credential(&req)?;
        let mut incoming = req.into_inner();
        let hello = match incoming.next().await {
            Some(Ok(pb::AgentMessage {
                body: Some(pb::agent_message::Body::Hello(h)),
            })) => h,
            Some(Err(e)) => return Err(e),
            _ => {
                return Err(Status::invalid_argument(
                    "field body: the first message must be hello",
                ));
            }
        };
        let pool = convert::parse_pool_name(&hello.pool, "hello.pool")?;
        who.may_act_for_pool(&pool)?;
        self.0.pool(&pool)?;
        let runtimes = convert::runtimes(&hello.runtimes, "hello.runtimes")?;
        let (tx, rx) = mpsc::channel(1024);
        self.0
            .writer
            .agent_hello(pool.clone(), hello.running_requests, runtimes, tx.clone())?;
        let generation = self.0.agents.connected(&pool, tx.clone());
        info!(
            pool,
            version = hello.agent_version,
            backend = hello.backend,
            "agent connected"
        );
        let shared = self.0.clone();
        let closed = self.0.tokens.closed(&credential);
        tokio::spawn(async move {
            let stopped = shared.stopped();
            tokio::pin!(stopped);
            tokio::pin!(closed);
            loop {
                let msg = tokio::select! {
                    _ = &mut stopped => break,
                    why = &mut closed => {
                        warn!(pool, why, "agent stream closed: its token no longer works");
                        break;
                    }
                    msg = incoming.next() => match msg {
                        Some(msg) => msg,
                        None => break,
                    },
                };
                let body = match msg {
                    Ok(pb::AgentMessage { body: Some(b) }) => b,
                    Ok(_) => continue,
                    Err(e) => {
                        warn!(pool, error = %e, "agent stream broke");
                        break;
                    }
                };
                match body {
                    pb::agent_message::Body::Heartbeat(h) => {
                        if shared.writer.heartbeat(pool.clone()).is_err() {
                            break;
                        }
                        for n in h.nodes {
                            let command = Command::SetNodeHealth {
                                pool: pool.clone(),
                                group: n.group,
                                node: n.node,
                                healthy: n.healthy,
                            };
                            if let Err(e) = shared.writer.apply(command, None).await {
                                warn!(
                                    pool,
                                    group = n.group,
                                    node = n.node,
                                    error = %e,
                                    "node health not applied"
                                );
                            }
                        }
                    }
                    pb::agent_message::Body::LeaseReport(r) => report(&shared, &pool, r, &tx),
                    pb::agent_message::Body::LogsData(d) => shared.agents.data(&pool, d),
                    pb::agent_message::Body::Hello(_) => {}
                }
            }
            shared.agents.disconnected(&pool, generation);
            info!(pool, "agent disconnected");
        });
        let out = self
            .0
            .until_closed(&credential, ReceiverStream::new(rx).map(Ok));
        Ok(Response::new(Box::pin(out)))
    }
}

/// What became of a lease report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ReportFate {
    /// It changed the request: applied through the writer, durable.
    Applied,
    /// It repeats what the broker knows (a second STARTED).
    Duplicate,
    /// It concerns a lease that has ended or been replaced (released, requeued, forgotten).
    Stale,
    /// It contradicts the broker (a lease on another pool, a kind the broker cannot read).
    Contradicting,
}

impl ReportFate {
    /// Label value in `/metrics`.
    pub fn as_str(self) -> &'static str {
        match self {
            ReportFate::Applied => "applied",
            ReportFate::Duplicate => "duplicate",
            ReportFate::Stale => "stale",
            ReportFate::Contradicting => "contradicting",
        }
    }
}

/// What a report means against the broker's view of its request, before any command is sent:
/// only reports that change something go to the writer.
fn classify(
    record: Option<&pb::Request>,
    pool: &str,
    report: &pb::LeaseReport,
) -> Result<Command, ReportFate> {
    let Some(record) = record else {
        return Err(ReportFate::Stale);
    };
    let on_pool = record
        .lease
        .as_ref()
        .is_some_and(|l| l.parts.iter().any(|p| p.pool == pool));
    if !on_pool {
        return Err(ReportFate::Contradicting);
    }
    if report.lease != 0 && report.lease != record.leases {
        return Err(ReportFate::Stale);
    }
    let state = pb::RequestState::try_from(record.state).unwrap_or_default();
    let live = matches!(state, pb::RequestState::Placed | pb::RequestState::Running);
    if !live {
        return Err(ReportFate::Stale);
    }
    let request = RequestId(report.request);
    match pb::LeaseReportKind::try_from(report.kind) {
        Ok(pb::LeaseReportKind::Started) if state == pb::RequestState::Running => {
            Err(ReportFate::Duplicate)
        }
        Ok(pb::LeaseReportKind::Started) => Ok(Command::LeaseStarted { request }),
        Ok(kind @ (pb::LeaseReportKind::Finished | pb::LeaseReportKind::Failed)) => {
            Ok(Command::LeaseFinished {
                request,
                outcome: convert::job_outcome(
                    report.outcome.clone(),
                    kind == pb::LeaseReportKind::Failed,
                ),
            })
        }
        _ => Err(ReportFate::Contradicting),
    }
}

/// Deals with one lease report: applies it when it changes something, counts it, and
/// acknowledges it once dealt with. The command is queued at once, in the stream's order (a
/// STARTED before the FINISHED that follows it), and the acknowledgement is sent when it is
/// durable, so the stream's next messages are not held up by the writer. A report that cannot
/// be dealt with now (the writer is overloaded or stopping) is not acknowledged: the agent
/// sends it again.
fn report(shared: &Shared, pool: &str, r: pb::LeaseReport, tx: &mpsc::Sender<pb::BrokerMessage>) {
    let record = shared.views.requests.get(&r.request).map(|q| q.clone());
    let ack = pb::BrokerMessage {
        body: Some(pb::broker_message::Body::ReportAck(pb::ReportAck {
            request: r.request,
            lease: r.lease,
            kind: r.kind,
        })),
    };
    let done = |fate: ReportFate, shared: &Shared, pool: &str, r: &pb::LeaseReport| {
        if fate == ReportFate::Contradicting {
            warn!(
                pool,
                request = r.request,
                lease = r.lease,
                kind = r.kind,
                "lease report contradicts the broker (not a live lease of this pool): acknowledged, not applied"
            );
        }
        shared.metrics.report(fate);
    };
    let command = match classify(record.as_deref(), pool, &r) {
        Ok(command) => command,
        Err(fate) => {
            done(fate, shared, pool, &r);
            let _ = tx.try_send(ack);
            return;
        }
    };
    let applied = match shared.writer.enqueue(command, None) {
        Ok(applied) => applied,
        Err(e) => {
            warn!(pool, request = r.request, error = %e, "lease report not applied now; the agent will send it again");
            return;
        }
    };
    let (shared, pool, tx) = (shared.clone(), pool.to_string(), tx.clone());
    tokio::spawn(async move {
        let fate = match applied.await {
            Ok(_) => ReportFate::Applied,
            // The lease ended between the look at the views and the writer (a release in the
            // same batch): the report is stale, not wrong.
            Err(BrokerError::Core(
                CoreError::UnknownRequest { .. } | CoreError::InvalidTransition { .. },
            )) => ReportFate::Stale,
            Err(BrokerError::Overloaded(_) | BrokerError::Unavailable(_)) => return,
            Err(e) => {
                warn!(pool, request = r.request, error = %e, "lease report not applied");
                ReportFate::Contradicting
            }
        };
        done(fate, &shared, &pool, &r);
        let _ = tx.send(ack).await;
    });
}
