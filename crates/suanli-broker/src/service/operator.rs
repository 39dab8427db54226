//! `OperatorService`: what the platform's operators call.

use suanli_core::Command;
use suanli_proto::v1 as pb;
use suanli_proto::v1::operator_service_server::OperatorService;
use tonic::{Request, Response, Status};
use tracing::instrument;

use super::{Shared, idem_key, page_from, page_size};
use crate::auth::{
    Principal, TokenRecord, check_token_name, credential, hash_secret, new_token, principal,
};
use crate::billing::BillingOp;
use crate::convert;
use crate::error::BrokerError;
use crate::store::IdemKey;
use crate::trail::AuditTag;
use crate::writer::Handle;

/// The operator service.
pub struct OperatorApi(pub Shared);

fn page<T: Clone>(items: &[T], size: u32, token: &str) -> Result<(Vec<T>, String), BrokerError> {
    let from = page_from(token)? as usize;
    let to = (from + page_size(size)).min(items.len());
    let next = if to < items.len() {
        to.to_string()
    } else {
        String::new()
    };
    Ok((items.get(from..to).unwrap_or_default().to_vec(), next))
}

#[tonic::async_trait]
impl OperatorService for OperatorApi {
    #[instrument(skip_all, fields(rpc = "GetFleetSummary"))]
    async fn get_fleet_summary(
        &self,
        req: Request<pb::GetFleetSummaryRequest>,
    ) -> Result<Response<pb::FleetSummary>, Status> {
        principal(&req)?.operator()?;
        Ok(Response::new(self.0.views.snapshot().fleet.clone()))
    }

    #[instrument(skip_all, fields(rpc = "ListPools"))]
    async fn list_pools(
        &self,
        req: Request<pb::ListPoolsRequest>,
    ) -> Result<Response<pb::ListPoolsResponse>, Status> {
        principal(&req)?.operator()?;
        let r = req.get_ref();
        let (pools, next_page_token) =
            page(&self.0.views.snapshot().pools, r.page_size, &r.page_token)?;
        Ok(Response::new(pb::ListPoolsResponse {
            pools,
            next_page_token,
        }))
    }

    #[instrument(skip_all, fields(rpc = "GetPool"))]
    async fn get_pool(
        &self,
        req: Request<pb::GetPoolRequest>,
    ) -> Result<Response<pb::Pool>, Status> {
        principal(&req)?.operator()?;
        let id = convert::parse_pool_name(&req.get_ref().name, "name")?;
        Ok(Response::new(self.0.pool(&id)?))
    }

    #[instrument(skip_all, fields(rpc = "DrainPool"))]
    async fn drain_pool(
        &self,
        req: Request<pb::DrainPoolRequest>,
    ) -> Result<Response<pb::Pool>, Status> {
        let audit = self.audit(&req, "DrainPool", pool_target(&req.get_ref().name))?;
        audit.finish(self.drain_pool_call(req, &audit.writer).await)
    }

    #[instrument(skip_all, fields(rpc = "UndrainPool"))]
    async fn undrain_pool(
        &self,
        req: Request<pb::UndrainPoolRequest>,
    ) -> Result<Response<pb::Pool>, Status> {
        let audit = self.audit(&req, "UndrainPool", pool_target(&req.get_ref().name))?;
        audit.finish(self.undrain_pool_call(req, &audit.writer).await)
    }

    #[instrument(skip_all, fields(rpc = "SetTenant"))]
    async fn set_tenant(
        &self,
        req: Request<pb::SetTenantRequest>,
    ) -> Result<Response<pb::SetTenantResponse>, Status> {
        let audit = self.audit(
            &req,
            "SetTenant",
            format!(
                "tenants/{}",
                req.get_ref().tenant.as_ref().map_or("", |t| t.id.as_str())
            ),
        )?;
        audit.finish(self.set_tenant_call(req, &audit.writer).await)
    }

    #[instrument(skip_all, fields(rpc = "ListTenants"))]
    async fn list_tenants(
        &self,
        req: Request<pb::ListTenantsRequest>,
    ) -> Result<Response<pb::ListTenantsResponse>, Status> {
        principal(&req)?.operator()?;
        let r = req.get_ref();
        let (tenants, next_page_token) =
            page(&self.0.views.snapshot().tenants, r.page_size, &r.page_token)?;
        Ok(Response::new(pb::ListTenantsResponse {
            tenants,
            next_page_token,
        }))
    }

    #[instrument(skip_all, fields(rpc = "ListQueue"))]
    async fn list_queue(
        &self,
        req: Request<pb::ListQueueRequest>,
    ) -> Result<Response<pb::ListQueueResponse>, Status> {
        principal(&req)?.operator()?;
        let r = req.get_ref();
        let snapshot = self.0.views.snapshot();
        let wanted: Vec<_> = snapshot
            .queue
            .entries
            .iter()
            .filter(|q| r.priorities.is_empty() || r.priorities.contains(&(q.priority as i32)))
            .map(|q| q.id)
            .collect();
        let (ids, next_page_token) = page(&wanted, r.page_size, &r.page_token)?;
        let requests = ids
            .into_iter()
            .filter_map(|id| self.0.views.request(id))
            .collect();
        Ok(Response::new(pb::ListQueueResponse {
            requests,
            next_page_token,
        }))
    }

    #[instrument(skip_all, fields(rpc = "IssueVoucher"))]
    async fn issue_voucher(
        &self,
        req: Request<pb::IssueVoucherRequest>,
    ) -> Result<Response<pb::VoucherBalance>, Status> {
        let audit = self.audit(
            &req,
            "IssueVoucher",
            req.get_ref()
                .voucher
                .as_ref()
                .map_or_else(String::new, |v| {
                    format!("tenants/{}/vouchers/{}", v.tenant, v.id)
                }),
        )?;
        audit.finish(self.issue_voucher_call(req, &audit.writer).await)
    }

    #[instrument(skip_all, fields(rpc = "ListVouchers"))]
    async fn list_vouchers(
        &self,
        req: Request<pb::ListVouchersRequest>,
    ) -> Result<Response<pb::ListVouchersResponse>, Status> {
        principal(&req)?.operator()?;
        let tenant = req.into_inner().tenant;
        let vouchers = self
            .0
            .writer
            .read_ledger(move |l| {
                l.vouchers()
                    .filter(|v| tenant.is_empty() || v.spec.tenant == tenant)
                    .map(convert::voucher_to_pb)
                    .collect()
            })
            .await?;
        Ok(Response::new(pb::ListVouchersResponse { vouchers }))
    }

    #[instrument(skip_all, fields(rpc = "SetBudget"))]
    async fn set_budget(
        &self,
        req: Request<pb::SetBudgetRequest>,
    ) -> Result<Response<pb::SetBudgetResponse>, Status> {
        let audit = self.audit(
            &req,
            "SetBudget",
            format!("tenants/{}", req.get_ref().tenant),
        )?;
        audit.finish(self.set_budget_call(req, &audit.writer).await)
    }

    #[instrument(skip_all, fields(rpc = "SetSubsidyBudget"))]
    async fn set_subsidy_budget(
        &self,
        req: Request<pb::SetSubsidyBudgetRequest>,
    ) -> Result<Response<pb::SetSubsidyBudgetResponse>, Status> {
        let audit = self.audit(&req, "SetSubsidyBudget", "subsidy-budget".to_string())?;
        audit.finish(self.set_subsidy_budget_call(req, &audit.writer).await)
    }

    #[instrument(skip_all, fields(rpc = "AdjustBalance"))]
    async fn adjust_balance(
        &self,
        req: Request<pb::AdjustBalanceRequest>,
    ) -> Result<Response<pb::AdjustBalanceResponse>, Status> {
        let audit = self.audit(
            &req,
            "AdjustBalance",
            format!("tenants/{}", req.get_ref().tenant),
        )?;
        audit.finish(self.adjust_balance_call(req, &audit.writer).await)
    }

    #[instrument(skip_all, fields(rpc = "GetStatement"))]
    async fn get_statement(
        &self,
        req: Request<pb::GetStatementRequest>,
    ) -> Result<Response<pb::Statement>, Status> {
        principal(&req)?.operator()?;
        let req = req.into_inner();
        if req.tenant.is_empty() {
            return Err(BrokerError::field("tenant", "required").into());
        }
        if !self
            .0
            .views
            .snapshot()
            .tenants
            .iter()
            .any(|t| t.id == req.tenant)
        {
            return Err(BrokerError::NotFound(format!("tenant {} not found", req.tenant)).into());
        }
        Ok(Response::new(
            self.0.statement(req.tenant, &req.month).await?,
        ))
    }

    #[instrument(skip_all, fields(rpc = "GetSubsidyReport"))]
    async fn get_subsidy_report(
        &self,
        req: Request<pb::GetSubsidyReportRequest>,
    ) -> Result<Response<pb::GetSubsidyReportResponse>, Status> {
        principal(&req)?.operator()?;
        let req = req.into_inner();
        let now = crate::writer::wall_ms();
        let first = convert::month_from_pb(&req.first_month, "first_month", now)?;
        let last = if req.last_month.is_empty() {
            first
        } else {
            convert::month_from_pb(&req.last_month, "last_month", now)?
        };
        if last < first {
            return Err(BrokerError::field("last_month", "before first_month").into());
        }
        let report = self
            .0
            .writer
            .read_ledger(move |l| l.subsidy_report(first, last))
            .await?
            .map_err(crate::billing::billing_error)?;
        Ok(Response::new(convert::subsidy_report_to_pb(&report)))
    }

    #[instrument(skip_all, fields(rpc = "GetReplicaStatus"))]
    async fn get_replica_status(
        &self,
        req: Request<pb::GetReplicaStatusRequest>,
    ) -> Result<Response<pb::ReplicaStatus>, Status> {
        principal(&req)?.operator()?;
        let replica = &self.0.replica;
        let role = replica.role();
        let (log_index, staleness_ms) = replica.position(crate::writer::wall_ms());
        Ok(Response::new(pb::ReplicaStatus {
            replicated: replica.is_replicated(),
            leader: role.leader,
            term: role.term,
            leader_address: role.leader_addr.unwrap_or_default(),
            log_index,
            staleness_ms,
            checkpoints: replica
                .checkpoints()
                .into_iter()
                .map(|(log_index, digest)| pb::LogCheckpoint { log_index, digest })
                .collect(),
        }))
    }

    #[instrument(skip_all, fields(rpc = "Checkpoint"))]
    async fn checkpoint(
        &self,
        req: Request<pb::CheckpointRequest>,
    ) -> Result<Response<pb::LogCheckpoint>, Status> {
        principal(&req)?.operator()?;
        let (log_index, digest) = self.0.writer.checkpoint().await?;
        Ok(Response::new(pb::LogCheckpoint { log_index, digest }))
    }

    #[instrument(skip_all, fields(rpc = "ListAuditRecords"))]
    async fn list_audit_records(
        &self,
        req: Request<pb::ListAuditRecordsRequest>,
    ) -> Result<Response<pb::ListAuditRecordsResponse>, Status> {
        principal(&req)?.operator()?;
        if !req.get_ref().auth_failures {
            // After every operation queued before it, refusals included: the caller reads
            // its own calls.
            self.0.writer.read_ledger(|_| ()).await?;
        }
        Ok(Response::new(self.audit_page(req.get_ref())?))
    }

    #[instrument(skip_all, fields(rpc = "CreateToken"))]
    async fn create_token(
        &self,
        req: Request<pb::CreateTokenRequest>,
    ) -> Result<Response<pb::CreateTokenResponse>, Status> {
        let audit = self.audit(
            &req,
            "CreateToken",
            format!("tokens/{}", req.get_ref().name),
        )?;
        audit.finish(self.create_token_call(req, &audit.writer).await)
    }

    #[instrument(skip_all, fields(rpc = "ListTokens"))]
    async fn list_tokens(
        &self,
        req: Request<pb::ListTokensRequest>,
    ) -> Result<Response<pb::ListTokensResponse>, Status> {
        principal(&req)?.operator()?;
        let r = req.get_ref();
        let now = crate::writer::wall_ms();
        let tokens: Vec<pb::TokenInfo> = self
            .0
            .tokens
            .records()
            .into_iter()
            .filter(|(t, _)| r.include_inactive || t.inactive(now).is_none())
            .map(|(t, used)| token_to_pb(&t, used))
            .collect();
        let (tokens, next_page_token) = page(&tokens, r.page_size, &r.page_token)?;
        Ok(Response::new(pb::ListTokensResponse {
            tokens,
            next_page_token,
        }))
    }

    #[instrument(skip_all, fields(rpc = "RevokeToken"))]
    async fn revoke_token(
        &self,
        req: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::TokenInfo>, Status> {
        let audit = self.audit(
            &req,
            "RevokeToken",
            format!("tokens/{}", req.get_ref().name),
        )?;
        audit.finish(self.revoke_token_call(req, &audit.writer).await)
    }
}

impl OperatorApi {
    async fn drain_pool_call(
        &self,
        req: Request<pb::DrainPoolRequest>,
        w: &Handle,
    ) -> Result<Response<pb::Pool>, Status> {
        let who = principal(&req)?;
        who.operator()?;
        let id = convert::parse_pool_name(&req.get_ref().name, "name")?;
        let key = idem_key(
            who.key(),
            &req.get_ref().request_id,
            "DrainPool",
            req.get_ref(),
        )?;
        w.apply(Command::DrainPool { pool: id.clone() }, key)
            .await?;
        Ok(Response::new(self.0.pool(&id)?))
    }

    async fn undrain_pool_call(
        &self,
        req: Request<pb::UndrainPoolRequest>,
        w: &Handle,
    ) -> Result<Response<pb::Pool>, Status> {
        let who = principal(&req)?;
        who.operator()?;
        let id = convert::parse_pool_name(&req.get_ref().name, "name")?;
        if self.0.pool(&id)?.health == pb::PoolHealth::Lost as i32 {
            return Err(Status::failed_precondition(format!(
                "pool {id} is lost: it comes back when its agent reconnects"
            )));
        }
        let key = idem_key(
            who.key(),
            &req.get_ref().request_id,
            "UndrainPool",
            req.get_ref(),
        )?;
        w.apply(Command::UndrainPool { pool: id.clone() }, key)
            .await?;
        Ok(Response::new(self.0.pool(&id)?))
    }

    async fn set_tenant_call(
        &self,
        req: Request<pb::SetTenantRequest>,
        w: &Handle,
    ) -> Result<Response<pb::SetTenantResponse>, Status> {
        let (req, key) = operator_mutation(req, "SetTenant", |r| &r.request_id)?;
        let spec = convert::tenant_from_pb(req.tenant, "tenant")?;
        let name = spec.name.clone();
        let is_new = !self.0.views.snapshot().tenants.iter().any(|t| t.id == name);
        w.apply(Command::SetTenant(spec), key).await?;
        let mut credential = String::new();
        if is_new || req.rotate_credential {
            credential = new_token("tenant");
            self.0
                .writer
                .grant(Principal::Tenant(name.clone()), credential.clone())
                .await?;
        }
        let tenant = self
            .0
            .views
            .snapshot()
            .tenants
            .iter()
            .find(|t| t.id == name)
            .cloned();
        Ok(Response::new(pb::SetTenantResponse { tenant, credential }))
    }

    async fn issue_voucher_call(
        &self,
        req: Request<pb::IssueVoucherRequest>,
        w: &Handle,
    ) -> Result<Response<pb::VoucherBalance>, Status> {
        let (req, key) = operator_mutation(req, "IssueVoucher", |r| &r.request_id)?;
        let spec = convert::voucher_from_pb(req.voucher, "voucher")?;
        let issued_at = w
            .billing(BillingOp::IssueVoucher(spec.clone()), key)
            .await?;
        // The voucher as issued, whatever it has paid since: a retry gets the same answer.
        Ok(Response::new(convert::voucher_to_pb(
            &suanli_billing::Voucher {
                spec,
                issued_at,
                issue_seq: 0,
                used: suanli_billing::Fen(0),
            },
        )))
    }

    async fn set_budget_call(
        &self,
        req: Request<pb::SetBudgetRequest>,
        w: &Handle,
    ) -> Result<Response<pb::SetBudgetResponse>, Status> {
        let (req, key) = operator_mutation(req, "SetBudget", |r| &r.request_id)?;
        if req.tenant.is_empty() {
            return Err(BrokerError::field("tenant", "required").into());
        }
        let budget = convert::budget_from_pb(req.budget, "budget")?;
        let tenant = req.tenant;
        w.billing(
            BillingOp::SetBudget {
                tenant: tenant.clone(),
                budget,
            },
            key,
        )
        .await?;
        // The budget as set (not as read back, which a later call may have changed).
        Ok(Response::new(pb::SetBudgetResponse {
            tenant,
            budget: budget.as_ref().map(convert::budget_to_pb),
        }))
    }

    async fn set_subsidy_budget_call(
        &self,
        req: Request<pb::SetSubsidyBudgetRequest>,
        w: &Handle,
    ) -> Result<Response<pb::SetSubsidyBudgetResponse>, Status> {
        let (req, key) = operator_mutation(req, "SetSubsidyBudget", |r| &r.request_id)?;
        let monthly = req.monthly_fen.map(suanli_billing::Fen);
        w.billing(BillingOp::SetSubsidyBudget { monthly }, key)
            .await?;
        Ok(Response::new(pb::SetSubsidyBudgetResponse {
            monthly_fen: monthly.map(|f| f.0),
        }))
    }

    async fn adjust_balance_call(
        &self,
        req: Request<pb::AdjustBalanceRequest>,
        w: &Handle,
    ) -> Result<Response<pb::AdjustBalanceResponse>, Status> {
        let (req, key) = operator_mutation(req, "AdjustBalance", |r| &r.request_id)?;
        if req.tenant.is_empty() {
            return Err(BrokerError::field("tenant", "required").into());
        }
        if req.reason.trim().is_empty() {
            return Err(BrokerError::field("reason", "required").into());
        }
        let op = BillingOp::Adjust {
            tenant: req.tenant.clone(),
            amount: suanli_billing::Fen(req.amount_fen),
            reason: req.reason,
        };
        // The month it was made in (for a retry, the first time's).
        let at = w.billing(op, key).await?;
        Ok(Response::new(pb::AdjustBalanceResponse {
            tenant: req.tenant,
            month: suanli_billing::Month::containing(at).to_string(),
        }))
    }

    async fn create_token_call(
        &self,
        req: Request<pb::CreateTokenRequest>,
        w: &Handle,
    ) -> Result<Response<pb::CreateTokenResponse>, Status> {
        let (req, key) = operator_mutation(req, "CreateToken", |r| &r.request_id)?;
        check_token_name(&req.name)?;
        let principal = owner_from_pb(req.owner.as_ref())?;
        let secret = new_token(match principal {
            Principal::Operator => "operator",
            Principal::Tenant(_) => "tenant",
            Principal::Agent(_) => "agent",
        });
        let record = TokenRecord {
            name: req.name.clone(),
            principal,
            hash: hash_secret(&secret),
            created_ms: 0,
            expires_ms: (req.expires_unix_ms > 0).then_some(req.expires_unix_ms),
            revoked_ms: None,
        };
        w.create_token(record, key).await?;
        Ok(Response::new(pb::CreateTokenResponse {
            token: Some(self.token_info(&req.name)?),
            secret,
        }))
    }

    async fn revoke_token_call(
        &self,
        req: Request<pb::RevokeTokenRequest>,
        w: &Handle,
    ) -> Result<Response<pb::TokenInfo>, Status> {
        let (req, key) = operator_mutation(req, "RevokeToken", |r| &r.request_id)?;
        if req.name.is_empty() {
            return Err(BrokerError::field("name", "required").into());
        }
        w.revoke_token(req.name.clone(), key).await?;
        Ok(Response::new(self.token_info(&req.name)?))
    }

    /// A page of the trail, or of the failed authentications.
    fn audit_page(
        &self,
        r: &pb::ListAuditRecordsRequest,
    ) -> Result<pb::ListAuditRecordsResponse, BrokerError> {
        let skip = page_from(&r.page_token)? as usize;
        let limit = page_size(r.page_size);
        let (records, more) = if r.auth_failures {
            let failures = self.0.trail.auth_failures(r.since_unix_ms);
            let more = failures.len() > skip + limit;
            let page = failures
                .into_iter()
                .skip(skip)
                .take(limit)
                .map(|f| pb::AuditRecord {
                    time_unix_ms: f.at,
                    who: f.peer,
                    rpc: "authenticate".into(),
                    target: String::new(),
                    refused: f.reason,
                })
                .collect::<Vec<_>>();
            (page, more)
        } else {
            let (page, more) = self.0.trail.page(r.since_unix_ms, skip, limit);
            let page = page
                .into_iter()
                .map(|a| pb::AuditRecord {
                    time_unix_ms: a.at,
                    who: a.tag.who,
                    rpc: a.tag.rpc,
                    target: a.tag.target,
                    refused: a.refused,
                })
                .collect::<Vec<_>>();
            (page, more)
        };
        let next_page_token = if more {
            (skip + records.len()).to_string()
        } else {
            String::new()
        };
        Ok(pb::ListAuditRecordsResponse {
            records,
            next_page_token,
        })
    }

    /// A token as listed, by name.
    fn token_info(&self, name: &str) -> Result<pb::TokenInfo, BrokerError> {
        self.0
            .tokens
            .records()
            .into_iter()
            .find(|(t, _)| t.name == name)
            .map(|(t, used)| token_to_pb(&t, used))
            .ok_or_else(|| BrokerError::NotFound(format!("token {name} not found")))
    }
}

/// An operator's mutation under way: the writer it calls logs its audit tag with the entry
/// it causes; a refusal is logged as one (see [`crate::trail`]).
struct Audit {
    writer: Handle,
    plain: Handle,
    tag: AuditTag,
}

impl OperatorApi {
    /// Starts an operator's mutation: PERMISSION_DENIED unless the caller is an operator.
    fn audit<T>(&self, req: &Request<T>, rpc: &str, target: String) -> Result<Audit, Status> {
        let credential = credential(req)?;
        credential.principal.operator()?;
        let tag = AuditTag {
            who: credential.name,
            rpc: rpc.into(),
            target,
        };
        Ok(Audit {
            writer: self.0.writer.audited(tag.clone()),
            plain: self.0.writer.clone(),
            tag,
        })
    }
}

impl Audit {
    /// The call's result, a refusal recorded in the trail.
    fn finish<T>(&self, result: Result<T, Status>) -> Result<T, Status> {
        if let Err(e) = &result {
            self.plain
                .refused(self.tag.clone(), format!("{:?}: {}", e.code(), e.message()));
        }
        result
    }
}

/// A pool named in a call, as the trail names it.
fn pool_target(name: &str) -> String {
    format!("pools/{}", name.strip_prefix("pools/").unwrap_or(name))
}

/// A token's owner from the wire.
fn owner_from_pb(owner: Option<&pb::TokenOwner>) -> Result<Principal, BrokerError> {
    use pb::token_owner::Owner;
    match owner.and_then(|o| o.owner.as_ref()) {
        Some(Owner::Tenant(t)) if !t.is_empty() => Ok(Principal::Tenant(t.clone())),
        Some(Owner::Pool(p)) if !p.is_empty() => Ok(Principal::Agent(p.clone())),
        Some(Owner::Operator(true)) => Ok(Principal::Operator),
        _ => Err(BrokerError::field(
            "owner",
            "required: a tenant, a pool or the operator",
        )),
    }
}

/// A token on the wire: never its secret.
fn token_to_pb(t: &TokenRecord, last_used: u64) -> pb::TokenInfo {
    use pb::token_owner::Owner;
    let owner = match &t.principal {
        Principal::Tenant(name) => Owner::Tenant(name.clone()),
        Principal::Agent(pool) => Owner::Pool(pool.clone()),
        Principal::Operator => Owner::Operator(true),
    };
    pb::TokenInfo {
        name: t.name.clone(),
        owner: Some(pb::TokenOwner { owner: Some(owner) }),
        created_unix_ms: t.created_ms,
        expires_unix_ms: t.expires_ms.unwrap_or(0),
        last_used_unix_ms: last_used,
        revoked_unix_ms: t.revoked_ms.unwrap_or(0),
    }
}

/// An operator's mutating call: checks the caller is the operator and returns the message with
/// its idempotency key (from `request_id`).
fn operator_mutation<T: prost::Message>(
    req: Request<T>,
    rpc: &str,
    request_id: impl FnOnce(&T) -> &str,
) -> Result<(T, Option<IdemKey>), Status> {
    let who = principal(&req)?;
    who.operator()?;
    let req = req.into_inner();
    let key = idem_key(who.key(), request_id(&req), rpc, &req)?;
    Ok((req, key))
}
