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
use crate::auth::principal;
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
        let spec = convert::pool_from_pb(req.pool, "pool")?;
        who.may_act_for_pool(&spec.id)?;
        let key = idem_key(who.key(), &req.request_id)?;
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
        let (tx, rx) = mpsc::channel(1024);
        self.0
            .writer
            .agent_hello(pool.clone(), hello.running_requests, tx)?;
        info!(pool, version = hello.agent_version, "agent connected");
        let shared = self.0.clone();
        tokio::spawn(async move {
            let stopped = shared.stopped();
            tokio::pin!(stopped);
            loop {
                let msg = tokio::select! {
                    _ = &mut stopped => break,
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
                    pb::agent_message::Body::LeaseReport(r) => {
                        let on_pool = shared.views.requests.get(&r.request).is_some_and(|q| {
                            q.lease
                                .as_ref()
                                .is_some_and(|l| l.parts.iter().any(|p| p.pool == pool))
                        });
                        if !on_pool {
                            warn!(
                                pool,
                                request = r.request,
                                "report for a lease not on this pool: ignored"
                            );
                            continue;
                        }
                        let request = RequestId(r.request);
                        let command = match pb::LeaseReportKind::try_from(r.kind) {
                            Ok(pb::LeaseReportKind::Started) => Command::LeaseStarted { request },
                            Ok(pb::LeaseReportKind::Finished) => Command::LeaseFinished {
                                request,
                                failed: false,
                            },
                            Ok(pb::LeaseReportKind::Failed) => Command::LeaseFinished {
                                request,
                                failed: true,
                            },
                            _ => continue,
                        };
                        if let Err(e) = shared.writer.apply(command, None).await {
                            warn!(pool, request = r.request, error = %e, "lease report not applied");
                        }
                    }
                    pb::agent_message::Body::Hello(_) => {}
                }
            }
            info!(pool, "agent disconnected");
        });
        let out = self.0.until_stopped(ReceiverStream::new(rx).map(Ok));
        Ok(Response::new(Box::pin(out)))
    }
}
