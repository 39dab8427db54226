//! `TenantService`: what AI companies call.

use std::pin::Pin;

use suanli_core::{Command, CoreError, Event, RequestId};
use suanli_proto::v1 as pb;
use suanli_proto::v1::tenant_service_server::TenantService;
use tokio_stream::{Stream, StreamExt, wrappers::BroadcastStream};
use tonic::{Request, Response, Status};
use tracing::instrument;

use super::{Shared, idem_key, page_from, page_size};
use crate::auth::{credential, principal};
use crate::convert;
use crate::error::BrokerError;

/// The tenant service.
pub struct TenantApi(pub Shared);

impl TenantApi {
    /// A request of `tenant` by name: someone else's is NOT_FOUND.
    fn owned(&self, tenant: &str, name: &str) -> Result<u64, BrokerError> {
        let (owner, id) = convert::parse_request_name(name, "name")?;
        let exists = self
            .0
            .views
            .requests
            .get(&id)
            .is_some_and(|r| r.tenant == tenant);
        if owner != tenant || !exists {
            return Err(BrokerError::NotFound(format!("request {name} not found")));
        }
        Ok(id)
    }

    /// Cancels or releases one of the caller's requests by name, idempotently.
    async fn end<T: prost::Message>(
        &self,
        req: &Request<T>,
        rpc: &str,
        request_id: &str,
        name: &str,
        command: impl FnOnce(RequestId) -> Command,
    ) -> Result<pb::Request, Status> {
        let who = principal(req)?;
        let key = idem_key(who.key(), request_id, rpc, req.get_ref())?;
        let id = self.owned(who.tenant()?, name)?;
        self.0.admission.admit_ending(who.tenant()?)?;
        let result = self.0.writer.apply(command(RequestId(id)), key).await;
        self.ended_is_a_precondition(result, name)?;
        Ok(self.view(id)?)
    }

    /// An engine that no longer knows a request the views show as ended: the call came too late.
    fn ended_is_a_precondition<T>(
        &self,
        result: Result<T, BrokerError>,
        name: &str,
    ) -> Result<T, BrokerError> {
        match result {
            Err(BrokerError::Core(CoreError::UnknownRequest { .. })) => Err(
                BrokerError::FailedPrecondition(format!("request {name} has already ended")),
            ),
            other => other,
        }
    }

    fn view(&self, id: u64) -> Result<pb::Request, BrokerError> {
        self.0
            .views
            .request(id)
            .ok_or_else(|| BrokerError::NotFound(format!("request {id} not found")))
    }
}

fn submitted(events: &[Event]) -> Option<RequestId> {
    events.iter().find_map(|e| match e {
        Event::Submitted { request } => Some(*request),
        _ => None,
    })
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::RequestEvent, Status>> + Send>>;
type LogChunkStream = Pin<Box<dyn Stream<Item = Result<pb::LogChunk, Status>> + Send>>;

/// Where a node's output of a request's latest lease is: its pool and the agent's question.
fn logs_source(
    record: &pb::Request,
    req: &pb::StreamLogsRequest,
) -> Result<(String, pb::LogsRequest), BrokerError> {
    let name = &record.name;
    if record.spec.as_ref().is_none_or(|s| s.workload.is_none()) {
        return Err(BrokerError::FailedPrecondition(format!(
            "request {name} has no workload: a capacity lease runs nothing, so there is no output"
        )));
    }
    let Some(lease) = &record.lease else {
        return Err(BrokerError::FailedPrecondition(format!(
            "request {name} has not been placed yet: its job has no output"
        )));
    };
    let part = lease.parts.get(req.node_rank as usize).ok_or_else(|| {
        BrokerError::field(
            "node_rank",
            format!(
                "{} is not a node of the lease, which has {}",
                req.node_rank,
                lease.parts.len()
            ),
        )
    })?;
    if pb::LogStream::try_from(req.stream).is_err() {
        return Err(BrokerError::field(
            "stream",
            format!("unknown value {}", req.stream),
        ));
    }
    let live = matches!(
        pb::RequestState::try_from(record.state),
        Ok(pb::RequestState::Placed | pb::RequestState::Running)
    );
    Ok((
        part.pool.clone(),
        pb::LogsRequest {
            id: 0,
            request: record.id,
            lease: record.leases,
            node_rank: req.node_rank,
            stream: req.stream,
            tail_lines: req.tail_lines,
            // Following an ended job would wait for nothing: send what there is.
            follow: req.follow && live,
        },
    ))
}

#[tonic::async_trait]
impl TenantService for TenantApi {
    type StreamLogsStream = LogChunkStream;

    #[instrument(skip_all, fields(rpc = "StreamLogs"))]
    async fn stream_logs(
        &self,
        req: Request<pb::StreamLogsRequest>,
    ) -> Result<Response<LogChunkStream>, Status> {
        let who = principal(&req)?;
        let id = self.owned(who.tenant()?, &req.get_ref().name)?;
        let record = self.view(id)?;
        let (pool, ask) = logs_source(&record, req.get_ref())?;
        let stream = self.0.agents.open_logs(&pool, ask)?;
        let stream = self.0.until_closed(&credential(&req)?, stream);
        Ok(Response::new(Box::pin(stream)))
    }

    #[instrument(skip_all, fields(rpc = "SubmitRequest"))]
    async fn submit_request(
        &self,
        req: Request<pb::SubmitRequestRequest>,
    ) -> Result<Response<pb::Request>, Status> {
        let who = principal(&req)?;
        let tenant = who.tenant()?.to_string();
        let _admitted = self.0.admission.admit(&tenant)?;
        let req = req.into_inner();
        let key = idem_key(who.key(), &req.request_id, "SubmitRequest", &req)?;
        let wait_for_pools = req.spec.as_ref().is_some_and(|s| s.wait_for_pools);
        let spec = convert::request_spec(&tenant, req.spec, "spec")?;
        let events = self.0.writer.submit(spec, wait_for_pools, key).await?;
        let id =
            submitted(&events).ok_or_else(|| Status::internal("submission without a request"))?;
        Ok(Response::new(self.view(id.0)?))
    }

    #[instrument(skip_all, fields(rpc = "GetRequest"))]
    async fn get_request(
        &self,
        req: Request<pb::GetRequestRequest>,
    ) -> Result<Response<pb::Request>, Status> {
        let who = principal(&req)?;
        let id = self.owned(who.tenant()?, &req.get_ref().name)?;
        Ok(Response::new(self.view(id)?))
    }

    #[instrument(skip_all, fields(rpc = "ListRequests"))]
    async fn list_requests(
        &self,
        req: Request<pb::ListRequestsRequest>,
    ) -> Result<Response<pb::ListRequestsResponse>, Status> {
        let who = principal(&req)?;
        let tenant = who.tenant()?;
        let req = req.get_ref();
        let size = page_size(req.page_size);
        let after = page_from(&req.page_token)?;
        for (i, s) in req.states.iter().enumerate() {
            if pb::RequestState::try_from(*s).is_err() {
                return Err(BrokerError::field(
                    format!("states[{i}]"),
                    format!("unknown state {s}"),
                )
                .into());
            }
        }
        let ids: Vec<u64> = self
            .0
            .views
            .by_tenant
            .get(tenant)
            .map(|v| v.clone())
            .unwrap_or_default();
        let start = ids.partition_point(|&id| id <= after);
        let mut requests = Vec::new();
        let mut last = None;
        for &id in &ids[start..] {
            let Some(r) = self.0.views.request(id) else {
                continue;
            };
            last = Some(id);
            if req.states.is_empty() || req.states.contains(&r.state) {
                requests.push(r);
                if requests.len() == size {
                    break;
                }
            }
        }
        let more = last.is_some_and(|l| ids.last().is_some_and(|&m| m > l));
        Ok(Response::new(pb::ListRequestsResponse {
            requests,
            next_page_token: if more {
                last.unwrap_or(0).to_string()
            } else {
                String::new()
            },
        }))
    }

    #[instrument(skip_all, fields(rpc = "CancelRequest"))]
    async fn cancel_request(
        &self,
        req: Request<pb::CancelRequestRequest>,
    ) -> Result<Response<pb::Request>, Status> {
        let r = req.get_ref();
        let end = |request| Command::Cancel { request };
        Ok(Response::new(
            self.end(&req, "CancelRequest", &r.request_id, &r.name, end)
                .await?,
        ))
    }

    #[instrument(skip_all, fields(rpc = "ReleaseRequest"))]
    async fn release_request(
        &self,
        req: Request<pb::ReleaseRequestRequest>,
    ) -> Result<Response<pb::Request>, Status> {
        let r = req.get_ref();
        let end = |request| Command::Release { request };
        Ok(Response::new(
            self.end(&req, "ReleaseRequest", &r.request_id, &r.name, end)
                .await?,
        ))
    }

    type WatchRequestsStream = EventStream;

    #[instrument(skip_all, fields(rpc = "WatchRequests"))]
    async fn watch_requests(
        &self,
        req: Request<pb::WatchRequestsRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let who = principal(&req)?;
        let tenant = who.tenant()?.to_string();
        let one = match req.get_ref().name.as_str() {
            "" => None,
            name => Some(self.owned(&tenant, name)?),
        };
        // Subscribe first, then take the snapshot: nothing falls between the two.
        let live = BroadcastStream::new(self.0.watch.subscribe());
        let ids: Vec<u64> = match one {
            Some(id) => vec![id],
            None => self
                .0
                .views
                .by_tenant
                .get(&tenant)
                .map(|v| v.clone())
                .unwrap_or_default(),
        };
        let snapshot: Vec<Result<pb::RequestEvent, Status>> = ids
            .into_iter()
            .filter_map(|id| self.0.views.request(id))
            .filter(|r| one.is_some() || r.end_reason == pb::EndReason::Unspecified as i32)
            .map(|r| {
                Ok(pb::RequestEvent {
                    time_unix_ms: r.update_time_unix_ms,
                    request: Some(r),
                    kind: pb::RequestEventKind::Snapshot as i32,
                })
            })
            .collect();
        let updates = live.filter_map(move |item| match item {
            Ok(ev) if ev.tenant == tenant => {
                let id = ev.event.request.as_ref().map(|r| r.id);
                (one.is_none() || id == one).then(|| Ok(ev.event.clone()))
            }
            Ok(_) => None,
            Err(_) => Some(Err(Status::aborted("the watcher fell behind; watch again"))),
        });
        let stream = self.0.until_closed(
            &credential(&req)?,
            tokio_stream::iter(snapshot).chain(updates),
        );
        Ok(Response::new(Box::pin(stream)))
    }

    #[instrument(skip_all, fields(rpc = "QuoteRequest"))]
    async fn quote_request(
        &self,
        req: Request<pb::QuoteRequestRequest>,
    ) -> Result<Response<pb::Quote>, Status> {
        let who = principal(&req)?;
        let tenant = who.tenant()?.to_string();
        let _admitted = self.0.admission.admit(&tenant)?;
        let spec = convert::request_spec(&tenant, req.into_inner().spec, "spec")?;
        let duration = spec.duration_ms;
        let (q, bill) = self.0.writer.quote(spec).await?;
        let now = crate::writer::wall_ms();
        let mut out = pb::Quote {
            quote_time_unix_ms: now,
            placeable_now: q.placement.is_some(),
            wait_reason: q
                .reason
                .map_or(pb::WaitReason::Unspecified, convert::reason_to_pb)
                as i32,
            earliest_start_unix_ms: q.earliest_start,
            ..Default::default()
        };
        if let Some(p) = q.placement {
            let mut pools: Vec<String> = p.parts.iter().map(|x| x.pool.clone()).collect();
            pools.dedup();
            out.pools = pools;
            out.parts = p
                .parts
                .iter()
                .map(|x| pb::LeasePart {
                    pool: x.pool.clone(),
                    group: x.group,
                    model: x.model.clone(),
                    node: 0,
                    devices: x.devices as u32,
                    price_fen_per_device_hour: 0,
                    billing_increment_s: None,
                })
                .collect();
            out.tflops = p.tflops;
            out.price_fen_per_hour = p.price_fen_per_hour;
            out.estimated_cost_fen =
                (p.price_fen_per_hour as u128 * duration as u128).div_ceil(3_600_000) as u64;
            // The vouchers pay their share of the charge as settlement computes it (to the fen,
            // half up); the tenant pays the rest of the estimate above.
            let subsidy = bill.map_or(0, |b| b.subsidy.fen().max(0) as u64);
            out.estimated_subsidy_fen = subsidy.min(out.estimated_cost_fen);
            out.estimated_due_fen = out.estimated_cost_fen - out.estimated_subsidy_fen;
        }
        Ok(Response::new(out))
    }

    #[instrument(skip_all, fields(rpc = "GetTenant"))]
    async fn get_tenant(
        &self,
        req: Request<pb::GetTenantRequest>,
    ) -> Result<Response<pb::Tenant>, Status> {
        let who = principal(&req)?;
        let tenant = who.tenant()?;
        let name = &req.get_ref().name;
        let asked = name.strip_prefix("tenants/").unwrap_or(name);
        if !name.is_empty() && asked != tenant {
            return Err(BrokerError::NotFound(format!("tenant {name} not found")).into());
        }
        let snapshot = self.0.views.snapshot();
        let found = snapshot.tenants.iter().find(|t| t.id == tenant).cloned();
        let t = found.ok_or_else(|| BrokerError::NotFound(format!("tenant {tenant} not found")))?;
        Ok(Response::new(t))
    }

    #[instrument(skip_all, fields(rpc = "GetStatement"))]
    async fn get_statement(
        &self,
        req: Request<pb::GetStatementRequest>,
    ) -> Result<Response<pb::Statement>, Status> {
        let who = principal(&req)?;
        let tenant = who.tenant()?.to_string();
        let req = req.into_inner();
        if !req.tenant.is_empty() && req.tenant != tenant {
            return Err(BrokerError::PermissionDenied(format!(
                "a tenant sees only its own statement, not {}",
                req.tenant
            ))
            .into());
        }
        Ok(Response::new(self.0.statement(tenant, &req.month).await?))
    }

    #[instrument(skip_all, fields(rpc = "ListVouchers"))]
    async fn list_vouchers(
        &self,
        req: Request<pb::ListVouchersRequest>,
    ) -> Result<Response<pb::ListVouchersResponse>, Status> {
        let who = principal(&req)?;
        let tenant = who.tenant()?.to_string();
        let asked = &req.get_ref().tenant;
        if !asked.is_empty() && *asked != tenant {
            return Err(BrokerError::PermissionDenied(format!(
                "a tenant sees only its own vouchers, not {asked}"
            ))
            .into());
        }
        let vouchers = self
            .0
            .writer
            .read_ledger(move |l| l.vouchers_of(&tenant).map(convert::voucher_to_pb).collect())
            .await?;
        Ok(Response::new(pb::ListVouchersResponse { vouchers }))
    }
}
