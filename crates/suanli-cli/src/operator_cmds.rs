//! The commands of the district's operators (OperatorService): the fleet summary, pools and
//! draining, tenants and their credentials, the queue.

use anyhow::bail;
use clap::{Args, Subcommand};
use serde_json::json;
use suanli_proto::v1::operator_service_client::OperatorServiceClient;
use suanli_proto::v1::{
    DrainPoolRequest, GetFleetSummaryRequest, GetPoolRequest, ListAuditRecordsRequest,
    ListPoolsRequest, ListQueueRequest, ListTenantsRequest, Priority, SetTenantRequest, Tenant,
    UndrainPoolRequest,
};

use crate::client::{self, Authed, GlobalArgs, PageArgs};
use crate::output;
use crate::parse;
use crate::tenant_cmds::{PriorityArg, more_hint};

/// `suanli pools`: list pools, or act on one.
#[derive(Args, Clone, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct PoolsArgs {
    #[command(subcommand)]
    pub action: Option<PoolsAction>,
    #[command(flatten)]
    pub page: PageArgs,
}

/// What to do with one pool.
#[derive(Subcommand, Clone, Debug)]
pub enum PoolsAction {
    /// Show one pool with its node groups.
    Get {
        /// Pool id (or name, pools/ID).
        id: String,
    },
    /// Stop placing new work on a healthy pool; its leases run on.
    Drain {
        /// Pool id (or name, pools/ID).
        id: String,
        /// Idempotency key [default: a fresh random id].
        #[arg(long, value_name = "ID")]
        request_id: Option<String>,
    },
    /// Let a draining pool take new work again.
    Undrain {
        /// Pool id (or name, pools/ID).
        id: String,
        /// Idempotency key [default: a fresh random id].
        #[arg(long, value_name = "ID")]
        request_id: Option<String>,
    },
}

/// `suanli tenants`: list tenants, or create or change one.
#[derive(Args, Clone, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct TenantsArgs {
    #[command(subcommand)]
    pub action: Option<TenantsAction>,
    #[command(flatten)]
    pub page: PageArgs,
}

/// What to do with one tenant.
#[derive(Subcommand, Clone, Debug)]
pub enum TenantsAction {
    /// Create a tenant or change its quota, borrowing limit or weight; prints a credential when
    /// one is issued (a new tenant, or --rotate-credential).
    Set(SetTenantArgs),
}

/// `suanli tenants set`.
#[derive(Args, Clone, Debug)]
pub struct SetTenantArgs {
    /// Tenant id (or name, tenants/ID).
    pub name: String,
    /// Nominal quota in P (500, 0.5); required for a new tenant, kept when not given.
    #[arg(long, value_name = "P", value_parser = parse::p_amount)]
    pub quota_p: Option<u64>,
    /// How far beyond its quota the tenant may borrow idle capacity, in P; kept when not given,
    /// no limit for a new tenant.
    #[arg(long, value_name = "P", value_parser = parse::p_amount)]
    pub borrow_limit_p: Option<u64>,
    /// Remove the borrowing limit: the tenant may borrow any idle capacity.
    #[arg(long, conflicts_with = "borrow_limit_p")]
    pub no_borrow_limit: bool,
    /// Fair-share weight, at least 1; kept when not given, 1 for a new tenant.
    #[arg(long, value_name = "W", value_parser = clap::value_parser!(u32).range(1..))]
    pub weight: Option<u32>,
    /// Issue a new credential and revoke the old one.
    #[arg(long)]
    pub rotate_credential: bool,
    /// Idempotency key [default: a fresh random id].
    #[arg(long, value_name = "ID")]
    pub request_id: Option<String>,
}

/// `suanli queue`.
#[derive(Args, Clone, Debug)]
pub struct QueueArgs {
    /// Only requests of these priority classes (repeatable or comma-separated).
    #[arg(long = "priority", value_enum, value_delimiter = ',')]
    pub priorities: Vec<PriorityArg>,
    #[command(flatten)]
    pub page: PageArgs,
}

/// `suanli fleet`: the whole fleet at a glance.
pub async fn fleet(g: &GlobalArgs) -> anyhow::Result<()> {
    let mut client = client::operator_client(g).await?;
    let f = client
        .get_fleet_summary(GetFleetSummaryRequest {})
        .await?
        .into_inner();
    if g.json {
        output::print_json(&output::fleet_json(&f));
    } else {
        output::emit(&output::fleet_summary(&f));
    }
    Ok(())
}

/// `suanli replica`.
#[derive(Args, Clone, Debug)]
pub struct ReplicaArgs {
    /// First append a checkpoint to the group's log (at the leader): every replica records
    /// its digest there, to compare replicas at one log position.
    #[arg(long)]
    pub checkpoint: bool,
}

/// `suanli replica`: the status of the broker at the first address of --addr.
pub async fn replica(g: &GlobalArgs, a: &ReplicaArgs) -> anyhow::Result<()> {
    let first = suanli_proto::failover::parse_addresses(&g.addr)
        .into_iter()
        .next()
        .unwrap_or_default();
    let one = GlobalArgs {
        addr: first,
        ..g.clone()
    };
    let mut client = client::operator_client(&one).await?;
    let mark = if a.checkpoint {
        Some(
            client
                .checkpoint(suanli_proto::v1::CheckpointRequest {})
                .await?
                .into_inner(),
        )
    } else {
        None
    };
    // The status of the replica asked, not of the leader a checkpoint was redirected to.
    let mut client = client::operator_client(&one).await?;
    let s = client
        .get_replica_status(suanli_proto::v1::GetReplicaStatusRequest {})
        .await?
        .into_inner();
    if g.json {
        let checkpoints: Vec<_> = s
            .checkpoints
            .iter()
            .map(|c| json!({"log_index": c.log_index, "digest": format!("{:016x}", c.digest)}))
            .collect();
        output::print_json(&json!({
            "replicated": s.replicated,
            "leader": s.leader,
            "term": s.term,
            "leader_address": s.leader_address,
            "log_index": s.log_index,
            "staleness_ms": s.staleness_ms,
            "checkpoints": checkpoints,
            "appended_checkpoint": mark.map(|c| c.log_index),
        }));
        return Ok(());
    }
    let role = match (s.replicated, s.leader) {
        (false, _) => "a broker on its own (leads a group of one)",
        (true, true) => "leader",
        (true, false) => "follower",
    };
    let mut text = format!("role         {role}\n");
    if s.replicated {
        let leader = if s.leader_address.is_empty() {
            "unknown (an election may be under way)"
        } else {
            &s.leader_address
        };
        text += &format!("term         {}\nleader       {leader}\n", s.term);
    }
    text += &format!(
        "log index    {}\nstaleness    {} ms\n",
        s.log_index, s.staleness_ms
    );
    if let Some(m) = mark {
        text += &format!("checkpoint   appended at log index {}\n", m.log_index);
    }
    for c in &s.checkpoints {
        text += &format!(
            "checkpoint   {:>12}  digest {:016x}\n",
            c.log_index, c.digest
        );
    }
    output::emit(&text);
    Ok(())
}

/// `suanli pools ...`.
pub async fn pools(g: &GlobalArgs, a: &PoolsArgs) -> anyhow::Result<()> {
    let mut client = client::operator_client(g).await?;
    let pool = match &a.action {
        None => {
            let (pools, next) = a
                .page
                .collect(|page_size, page_token| {
                    let mut client = client.clone();
                    async move {
                        let page = client
                            .list_pools(ListPoolsRequest {
                                page_size,
                                page_token,
                            })
                            .await?
                            .into_inner();
                        Ok((page.pools, page.next_page_token))
                    }
                })
                .await?;
            if g.json {
                output::print_json(&json!({
                    "pools": pools.iter().map(output::pool_json).collect::<Vec<_>>(),
                    "next_page_token": next,
                }));
            } else {
                output::emit(&output::pools_table(&pools).render());
                more_hint(&next);
            }
            return Ok(());
        }
        Some(PoolsAction::Get { id }) => {
            client
                .get_pool(GetPoolRequest {
                    name: parse::pool_name(id),
                })
                .await?
        }
        Some(PoolsAction::Drain { id, request_id }) => {
            client
                .drain_pool(DrainPoolRequest {
                    request_id: request_id.clone().unwrap_or_else(parse::new_request_id),
                    name: parse::pool_name(id),
                })
                .await?
        }
        Some(PoolsAction::Undrain { id, request_id }) => {
            client
                .undrain_pool(UndrainPoolRequest {
                    request_id: request_id.clone().unwrap_or_else(parse::new_request_id),
                    name: parse::pool_name(id),
                })
                .await?
        }
    }
    .into_inner();
    if g.json {
        output::print_json(&output::pool_json(&pool));
    } else {
        output::emit(&output::pool_detail(&pool));
    }
    Ok(())
}

async fn list_tenants(
    client: &OperatorServiceClient<Authed>,
    page: &PageArgs,
) -> Result<(Vec<Tenant>, String), tonic::Status> {
    page.collect(|page_size, page_token| {
        let mut client = client.clone();
        async move {
            let page = client
                .list_tenants(ListTenantsRequest {
                    page_size,
                    page_token,
                })
                .await?
                .into_inner();
            Ok((page.tenants, page.next_page_token))
        }
    })
    .await
}

/// `suanli tenants ...`.
pub async fn tenants(g: &GlobalArgs, a: &TenantsArgs) -> anyhow::Result<()> {
    let mut client = client::operator_client(g).await?;
    match &a.action {
        None => {
            let (tenants, next) = list_tenants(&client, &a.page).await?;
            if g.json {
                output::print_json(&json!({
                    "tenants": tenants.iter().map(output::tenant_json).collect::<Vec<_>>(),
                    "next_page_token": next,
                }));
            } else {
                output::emit(&output::tenants_table(&tenants).render());
                more_hint(&next);
            }
        }
        Some(TenantsAction::Set(s)) => {
            let id = s
                .name
                .strip_prefix("tenants/")
                .unwrap_or(&s.name)
                .to_string();
            // SetTenant replaces every field, so what is not given is read first and kept.
            let complete = s.quota_p.is_some()
                && (s.borrow_limit_p.is_some() || s.no_borrow_limit)
                && s.weight.is_some();
            let existing = if complete {
                None
            } else {
                let all = PageArgs {
                    all_pages: true,
                    page_size: 1000,
                    ..Default::default()
                };
                let (tenants, _) = list_tenants(&client, &all).await?;
                tenants.into_iter().find(|t| t.id == id)
            };
            let Some(quota_tflops) = s.quota_p.or(existing.as_ref().map(|t| t.quota_tflops)) else {
                bail!("tenant {id:?} does not exist yet: --quota-p is required to create it");
            };
            let borrow_limit_tflops = if s.no_borrow_limit {
                None
            } else {
                s.borrow_limit_p
                    .or(existing.as_ref().and_then(|t| t.borrow_limit_tflops))
            };
            let weight = s
                .weight
                .or(existing.as_ref().map(|t| t.weight))
                .unwrap_or(1);
            let reply = client
                .set_tenant(SetTenantRequest {
                    request_id: s.request_id.clone().unwrap_or_else(parse::new_request_id),
                    tenant: Some(Tenant {
                        id,
                        quota_tflops,
                        borrow_limit_tflops,
                        weight,
                        ..Default::default()
                    }),
                    rotate_credential: s.rotate_credential,
                })
                .await?
                .into_inner();
            let tenant = reply.tenant.unwrap_or_default();
            if g.json {
                output::print_json(&json!({
                    "tenant": output::tenant_json(&tenant),
                    "credential": reply.credential,
                }));
            } else {
                output::emit(&output::tenants_table(std::slice::from_ref(&tenant)).render());
                if !reply.credential.is_empty() {
                    output::emit(&format!("\ncredential  {}\n", reply.credential));
                    eprintln!(
                        "The credential is shown only now: give it to the tenant, who passes it \
                         as --token (or SUANLI_TOKEN)."
                    );
                }
            }
        }
    }
    Ok(())
}

/// `suanli queue`: queued requests of all tenants in queue order.
pub async fn queue(g: &GlobalArgs, a: &QueueArgs) -> anyhow::Result<()> {
    let client = client::operator_client(g).await?;
    let priorities: Vec<i32> = a
        .priorities
        .iter()
        .map(|p| Priority::from(*p) as i32)
        .collect();
    let (requests, next) = a
        .page
        .collect(|page_size, page_token| {
            let mut client = client.clone();
            let priorities = priorities.clone();
            async move {
                let page = client
                    .list_queue(ListQueueRequest {
                        page_size,
                        page_token,
                        priorities,
                    })
                    .await?
                    .into_inner();
                Ok((page.requests, page.next_page_token))
            }
        })
        .await?;
    if g.json {
        output::print_json(&output::requests_page_json(&requests, &next));
    } else {
        output::emit(&output::queue_table(&requests).render());
        more_hint(&next);
    }
    Ok(())
}

/// `suanli audit`.
#[derive(Args, Clone, Debug)]
pub struct AuditArgs {
    /// Only records from this time on: RFC 3339 (2026-12-01T00:00:00+08:00) or before now
    /// (-24h).
    #[arg(long, value_name = "TIME", allow_hyphen_values = true)]
    pub since: Option<String>,
    /// List the failed authentications this broker saw instead (kept in memory).
    #[arg(long)]
    pub auth_failures: bool,
    #[command(flatten)]
    pub page: PageArgs,
}

/// `suanli audit`: who changed what, when, and whether it took effect.
pub async fn audit(g: &GlobalArgs, a: &AuditArgs) -> anyhow::Result<()> {
    let since_unix_ms = match a.since.as_deref().map(str::trim) {
        None => 0,
        Some(ago) if ago.starts_with('-') => {
            let back =
                parse::duration_ms(&ago[1..]).map_err(|e| anyhow::anyhow!("--since: {e}"))?;
            crate::time::now_unix_ms().saturating_sub(back)
        }
        Some(at) => crate::time::parse_rfc3339(at).map_err(|e| anyhow::anyhow!("--since: {e}"))?,
    };
    let client = client::operator_client(g).await?;
    let auth_failures = a.auth_failures;
    let (records, next) = a
        .page
        .collect(|page_size, page_token| {
            let mut client = client.clone();
            async move {
                let page = client
                    .list_audit_records(ListAuditRecordsRequest {
                        since_unix_ms,
                        page_size,
                        page_token,
                        auth_failures,
                    })
                    .await?
                    .into_inner();
                Ok((page.records, page.next_page_token))
            }
        })
        .await?;
    if g.json {
        let records: Vec<_> = records
            .iter()
            .map(|r| {
                json!({
                    "time_unix_ms": r.time_unix_ms,
                    "time": output::time(r.time_unix_ms),
                    "who": r.who,
                    "rpc": r.rpc,
                    "target": r.target,
                    "outcome": if r.refused.is_empty() { "ok" } else { "refused" },
                    "refused": r.refused,
                })
            })
            .collect();
        output::print_json(&json!({"records": records, "next_page_token": next}));
    } else {
        let mut t = output::Table::new(&["TIME", "WHO", "CALL", "TARGET", "OUTCOME"]);
        for r in &records {
            t.row(vec![
                output::time(r.time_unix_ms),
                r.who.clone(),
                r.rpc.clone(),
                r.target.clone(),
                if r.refused.is_empty() {
                    "ok".into()
                } else {
                    format!("refused: {}", r.refused)
                },
            ]);
        }
        output::emit(&t.render());
        more_hint(&next);
    }
    Ok(())
}
