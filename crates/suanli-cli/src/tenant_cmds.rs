//! The commands of an AI company (TenantService): submit, get, list, cancel, release, watch and
//! quote requests.

use clap::{ArgGroup, Args, ValueEnum};
use suanli_proto::v1::tenant_service_client::TenantServiceClient;
use suanli_proto::v1::{
    CancelRequestRequest, Constraints, ElasticShape, GangShape, GetRequestRequest,
    GetTenantRequest, ListRequestsRequest, Policy, Priority, QuoteRequestRequest,
    ReleaseRequestRequest, Request, RequestSpec, RequestState, SubmitRequestRequest,
    WatchRequestsRequest, request_spec::Shape,
};
use tonic::Code;

use crate::client::{self, Authed, GlobalArgs, Identity, PageArgs};
use crate::output;
use crate::parse::{self, RequestRef, TimeArg};
use crate::time;

/// A priority class on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PriorityArg {
    /// Must start as soon as possible; may preempt spot work.
    Critical,
    /// Ordinary work (the default).
    Standard,
    /// Cheap, preemptible work.
    Spot,
}

impl From<PriorityArg> for Priority {
    fn from(p: PriorityArg) -> Self {
        match p {
            PriorityArg::Critical => Priority::Critical,
            PriorityArg::Standard => Priority::Standard,
            PriorityArg::Spot => Priority::Spot,
        }
    }
}

/// A placement policy on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PolicyArg {
    /// Lowest price.
    Cheapest,
    /// Local pools first, then the shortest round trip.
    #[value(name = "lowest_latency", alias = "lowest-latency")]
    LowestLatency,
    /// The node group with the least free capacity that still fits.
    #[value(name = "best_fit", alias = "best-fit")]
    BestFit,
    /// Lowest price for the tenant after its compute vouchers pay their share.
    #[value(name = "cheapest_after_subsidy", alias = "cheapest-after-subsidy")]
    CheapestAfterSubsidy,
}

impl From<PolicyArg> for Policy {
    fn from(p: PolicyArg) -> Self {
        match p {
            PolicyArg::Cheapest => Policy::Cheapest,
            PolicyArg::LowestLatency => Policy::LowestLatency,
            PolicyArg::BestFit => Policy::BestFit,
            PolicyArg::CheapestAfterSubsidy => Policy::CheapestAfterSubsidy,
        }
    }
}

/// A request state on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum StateArg {
    /// Waiting for capacity, its start time or quota.
    Queued,
    /// Capacity allocated, start not yet confirmed.
    Placed,
    /// Running on its pool.
    Running,
    /// Finished.
    Completed,
    /// Failed, or missed its deadline.
    Failed,
    /// Cancelled by the tenant.
    Cancelled,
    /// Preempted and not requeued.
    Preempted,
    /// Its pool was lost.
    Lost,
}

impl From<StateArg> for RequestState {
    fn from(s: StateArg) -> Self {
        match s {
            StateArg::Queued => RequestState::Queued,
            StateArg::Placed => RequestState::Placed,
            StateArg::Running => RequestState::Running,
            StateArg::Completed => RequestState::Completed,
            StateArg::Failed => RequestState::Failed,
            StateArg::Cancelled => RequestState::Cancelled,
            StateArg::Preempted => RequestState::Preempted,
            StateArg::Lost => RequestState::Lost,
        }
    }
}

/// What a request asks for, shared by `submit` and `quote`.
#[derive(Args, Clone, Debug)]
#[command(group(ArgGroup::new("shape").required(true).args(["gang", "elastic"])))]
pub struct SpecArgs {
    /// Gang request: NODESxDEVICES of one model in one node group, all or nothing (e.g. 2x8).
    #[arg(long, value_name = "NxM", value_parser = parse::gang, help_heading = "Shape")]
    pub gang: Option<GangShape>,
    /// Elastic request: an amount of compute that may be split across pools, in TFLOPS (1500)
    /// or P (5P).
    #[arg(long, value_name = "AMOUNT", value_parser = parse::positive_tflops, help_heading = "Shape")]
    pub elastic: Option<u64>,
    /// Smallest piece of an elastic request worth placing, in TFLOPS or P [default: any size].
    #[arg(long, value_name = "AMOUNT", requires = "elastic", conflicts_with = "gang", value_parser = parse::tflops, help_heading = "Shape")]
    pub min_chunk: Option<u64>,
    /// Estimated run time (45s, 90m, 2h, 1d, 1h30m); the lease expires after it.
    #[arg(long, value_name = "DURATION", value_parser = parse::positive_duration_ms)]
    pub duration: u64,
    /// Priority class [default: standard].
    #[arg(long, value_enum)]
    pub priority: Option<PriorityArg>,
    /// Allowed accelerator model (repeatable or comma-separated, e.g. h100,h800).
    #[arg(
        long = "model",
        value_name = "MODEL",
        value_delimiter = ',',
        help_heading = "Constraints"
    )]
    pub models: Vec<String>,
    /// Allowed region (repeatable, e.g. guangdong-shenzhen).
    #[arg(
        long = "region",
        value_name = "REGION",
        value_delimiter = ',',
        help_heading = "Constraints"
    )]
    pub regions: Vec<String>,
    /// Allowed pool id (repeatable).
    #[arg(
        long = "pool",
        value_name = "POOL",
        value_delimiter = ',',
        help_heading = "Constraints"
    )]
    pub pools: Vec<String>,
    /// Largest acceptable network round trip from the district, in milliseconds.
    #[arg(long, value_name = "MS", help_heading = "Constraints")]
    pub max_rtt_ms: Option<u32>,
    /// Required data zone (e.g. mainland, hetao).
    #[arg(long, value_name = "ZONE", help_heading = "Constraints")]
    pub data_zone: Option<String>,
    /// Highest acceptable price of one device for one hour, in fen (0.01 CNY).
    #[arg(long, value_name = "FEN", help_heading = "Constraints")]
    pub max_price: Option<u64>,
    /// Placement policy [default: the broker's].
    #[arg(long, value_enum)]
    pub policy: Option<PolicyArg>,
    /// Do not start before this time: RFC 3339 (2025-03-01T08:00:00+08:00) or from now (+2h).
    #[arg(long, value_name = "TIME", value_parser = parse::time_arg)]
    pub start_after: Option<TimeArg>,
    /// Must finish by this time: RFC 3339 or from now (+6h).
    #[arg(long, value_name = "TIME", value_parser = parse::time_arg)]
    pub deadline: Option<TimeArg>,
    /// Go back to the queue when preempted or when the pool is lost, instead of ending.
    #[arg(long)]
    pub requeue: bool,
}

impl SpecArgs {
    /// The spec, with relative times taken from `now_unix_ms`.
    pub fn to_spec(&self, now_unix_ms: u64) -> RequestSpec {
        let shape = match (self.gang, self.elastic) {
            (Some(g), _) => Shape::Gang(g),
            (None, Some(tflops)) => Shape::Elastic(ElasticShape {
                tflops,
                min_chunk_tflops: self.min_chunk.unwrap_or(0),
            }),
            (None, None) => unreachable!("clap requires --gang or --elastic"),
        };
        RequestSpec {
            shape: Some(shape),
            duration_ms: self.duration,
            priority: self.priority.map_or(Priority::Unspecified, Into::into) as i32,
            constraints: Some(Constraints {
                models: self.models.clone(),
                regions: self.regions.clone(),
                pools: self.pools.clone(),
                max_rtt_ms: self.max_rtt_ms,
                data_zone: self.data_zone.clone(),
                max_price_fen_per_device_hour: self.max_price,
            }),
            policy: self.policy.map_or(Policy::Unspecified, Into::into) as i32,
            start_after_unix_ms: self.start_after.map(|t| t.resolve(now_unix_ms)),
            deadline_unix_ms: self.deadline.map(|t| t.resolve(now_unix_ms)),
            requeue: self.requeue,
            workload: None,
            wait_for_pools: false,
        }
    }
}

/// `suanli submit`.
#[derive(Args, Clone, Debug)]
pub struct SubmitArgs {
    #[command(flatten)]
    pub spec: SpecArgs,
    /// Environment variable for the job, NAME=VALUE (repeatable).
    #[arg(long = "env", value_name = "NAME=VALUE", value_parser = parse::env_var, requires = "argv", help_heading = "Job")]
    pub env: Vec<(String, String)>,
    /// Working directory of the job on the pool's nodes [default: the agent's].
    #[arg(long, value_name = "DIR", requires = "argv", help_heading = "Job")]
    pub workdir: Option<String>,
    /// Container image to run the job in (only pools whose agent runs containers take it).
    #[arg(long, value_name = "IMAGE", requires = "argv", help_heading = "Job")]
    pub image: Option<String>,
    /// Seconds between the polite stop (SIGTERM) and the kill when the job is stopped
    /// [default: 10].
    #[arg(long, value_name = "S", requires = "argv", help_heading = "Job")]
    pub stop_grace: Option<u32>,
    /// The job: everything after `--` is its program and arguments, run once per node
    /// (exec form, no shell). Without it the request is a capacity lease that runs nothing.
    #[arg(last = true, value_name = "ARGV", help_heading = "Job")]
    pub argv: Vec<String>,
    /// Idempotency key: a retry with the same key returns the first result [default: a fresh
    /// random id].
    #[arg(long, value_name = "ID")]
    pub request_id: Option<String>,
    /// Wait for pools that may register later, rather than be refused when no registered pool
    /// could ever hold the request.
    #[arg(long)]
    pub wait_for_pools: bool,
}

impl SubmitArgs {
    /// The job after `--`, if any.
    fn workload(&self) -> Option<suanli_proto::v1::Workload> {
        (!self.argv.is_empty()).then(|| suanli_proto::v1::Workload {
            argv: self.argv.clone(),
            env: self
                .env
                .iter()
                .map(|(name, value)| suanli_proto::v1::EnvVar {
                    name: name.clone(),
                    value: value.clone(),
                })
                .collect(),
            working_dir: self.workdir.clone().unwrap_or_default(),
            image: self.image.clone().unwrap_or_default(),
            stop_grace_s: self.stop_grace.unwrap_or(0),
        })
    }
}

/// `suanli logs`.
#[derive(Args, Clone, Debug)]
pub struct LogsArgs {
    /// The request: its id (12) or full name (tenants/TENANT/requests/12).
    #[arg(value_name = "NAME|ID", value_parser = parse::request_ref)]
    pub request: RequestRef,
    /// Node rank in the lease.
    #[arg(long, value_name = "RANK", default_value_t = 0)]
    pub node: u32,
    /// Keep printing output as it comes, until the job ends.
    #[arg(short = 'f', long)]
    pub follow: bool,
    /// Only the last N lines of each output [default: all that the pool keeps].
    #[arg(long, value_name = "N")]
    pub tail: Option<u32>,
}

/// `suanli logs`: the job's stdout to stdout, its stderr to stderr.
pub async fn logs(g: &GlobalArgs, a: &LogsArgs) -> anyhow::Result<()> {
    use std::io::Write as _;
    let (mut client, id) = client::tenant_client(g).await?;
    let name = full_name(&mut client, &id, &a.request).await?;
    let mut stream = client
        .stream_logs(suanli_proto::v1::StreamLogsRequest {
            name,
            node_rank: a.node,
            follow: a.follow,
            tail_lines: a.tail.unwrap_or(0),
            stream: suanli_proto::v1::LogStream::Unspecified as i32,
        })
        .await?
        .into_inner();
    let (mut out, mut err) = (std::io::stdout().lock(), std::io::stderr().lock());
    while let Some(chunk) = stream.message().await? {
        if chunk.stream == suanli_proto::v1::LogStream::Stderr as i32 {
            err.write_all(&chunk.data)?;
            err.flush()?;
        } else {
            out.write_all(&chunk.data)?;
            out.flush()?;
        }
    }
    Ok(())
}

/// `suanli get`.
#[derive(Args, Clone, Debug)]
pub struct GetArgs {
    /// The request: its id (12) or full name (tenants/TENANT/requests/12).
    #[arg(value_name = "NAME|ID", value_parser = parse::request_ref)]
    pub request: RequestRef,
}

/// `suanli cancel` and `suanli release`.
#[derive(Args, Clone, Debug)]
pub struct ChangeArgs {
    /// The request: its id (12) or full name (tenants/TENANT/requests/12).
    #[arg(value_name = "NAME|ID", value_parser = parse::request_ref)]
    pub request: RequestRef,
    /// Idempotency key [default: a fresh random id].
    #[arg(long, value_name = "ID")]
    pub request_id: Option<String>,
}

/// `suanli list`.
#[derive(Args, Clone, Debug)]
pub struct ListArgs {
    /// Only requests in these states (repeatable or comma-separated).
    #[arg(long = "state", value_enum, value_delimiter = ',')]
    pub states: Vec<StateArg>,
    #[command(flatten)]
    pub page: PageArgs,
}

/// `suanli watch`.
#[derive(Args, Clone, Debug)]
pub struct WatchArgs {
    /// One request to watch, by id or name [default: all of the tenant's requests].
    #[arg(value_name = "NAME|ID", value_parser = parse::request_ref)]
    pub request: Option<RequestRef>,
}

/// The full name of a request given on the command line. A bare id needs the tenant: from
/// `--tenant`, the credentials file, or else from the tenant's own requests.
async fn full_name(
    client: &mut TenantServiceClient<Authed>,
    id: &Identity,
    request: &RequestRef,
) -> anyhow::Result<String> {
    let number = match request {
        RequestRef::Name(name) => return Ok(name.clone()),
        RequestRef::Id(number) => *number,
    };
    if let Some(tenant) = &id.tenant {
        return Ok(parse::request_name(tenant, number));
    }
    let me = client
        .get_tenant(GetTenantRequest::default())
        .await?
        .into_inner();
    Ok(parse::request_name(&me.id, number))
}

/// `suanli me`: the calling tenant's quota, weight and usage.
pub async fn me(g: &GlobalArgs) -> anyhow::Result<()> {
    let (mut client, _) = client::tenant_client(g).await?;
    let me = client
        .get_tenant(GetTenantRequest::default())
        .await?
        .into_inner();
    if g.json {
        output::print_json(&output::tenant_json(&me));
    } else {
        output::emit(&output::tenants_table(std::slice::from_ref(&me)).render());
    }
    Ok(())
}

fn print_request(g: &GlobalArgs, r: &Request) {
    if g.json {
        output::print_json(&output::request_json(r));
    } else {
        output::emit(&output::request_detail(r));
    }
}

/// `suanli submit`: submits a request and prints it as queued or placed.
pub async fn submit(g: &GlobalArgs, a: &SubmitArgs) -> anyhow::Result<()> {
    let (mut client, _) = client::tenant_client(g).await?;
    let request_id = a.request_id.clone().unwrap_or_else(parse::new_request_id);
    let r = client
        .submit_request(SubmitRequestRequest {
            request_id,
            spec: Some(RequestSpec {
                workload: a.workload(),
                wait_for_pools: a.wait_for_pools,
                ..a.spec.to_spec(time::now_unix_ms())
            }),
        })
        .await?
        .into_inner();
    print_request(g, &r);
    Ok(())
}

/// `suanli get`.
pub async fn get(g: &GlobalArgs, a: &GetArgs) -> anyhow::Result<()> {
    let (mut client, id) = client::tenant_client(g).await?;
    let name = full_name(&mut client, &id, &a.request).await?;
    let r = client
        .get_request(GetRequestRequest { name })
        .await?
        .into_inner();
    print_request(g, &r);
    Ok(())
}

/// `suanli cancel`.
pub async fn cancel(g: &GlobalArgs, a: &ChangeArgs) -> anyhow::Result<()> {
    let (mut client, id) = client::tenant_client(g).await?;
    let name = full_name(&mut client, &id, &a.request).await?;
    let request_id = a.request_id.clone().unwrap_or_else(parse::new_request_id);
    let r = client
        .cancel_request(CancelRequestRequest { request_id, name })
        .await?
        .into_inner();
    print_request(g, &r);
    Ok(())
}

/// `suanli release`.
pub async fn release(g: &GlobalArgs, a: &ChangeArgs) -> anyhow::Result<()> {
    let (mut client, id) = client::tenant_client(g).await?;
    let name = full_name(&mut client, &id, &a.request).await?;
    let request_id = a.request_id.clone().unwrap_or_else(parse::new_request_id);
    let r = client
        .release_request(ReleaseRequestRequest { request_id, name })
        .await?
        .into_inner();
    print_request(g, &r);
    Ok(())
}

/// `suanli list`: one page, or every page with `--all-pages`.
pub async fn list(g: &GlobalArgs, a: &ListArgs) -> anyhow::Result<()> {
    let (client, _) = client::tenant_client(g).await?;
    let states: Vec<i32> = a
        .states
        .iter()
        .map(|s| RequestState::from(*s) as i32)
        .collect();
    let (requests, next) = a
        .page
        .collect(|page_size, page_token| {
            let mut client = client.clone();
            let states = states.clone();
            async move {
                let page = client
                    .list_requests(ListRequestsRequest {
                        page_size,
                        page_token,
                        states,
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
        output::emit(&output::requests_table(&requests).render());
        more_hint(&next);
    }
    Ok(())
}

/// Tells on stderr how to fetch the next page, if there is one.
pub fn more_hint(next_page_token: &str) {
    if !next_page_token.is_empty() {
        eprintln!("more: --page-token {next_page_token} (or --all-pages)");
    }
}

/// `suanli watch`: one line (or JSON object) per event until interrupted, or until the one
/// watched request has ended. A watcher the broker disconnected for falling behind watches
/// again from a fresh snapshot; so does a watcher of a group whose leader went away (the
/// stream ends with its term), at the new leader.
pub async fn watch(g: &GlobalArgs, a: &WatchArgs) -> anyhow::Result<()> {
    let (mut client, id) = client::tenant_client(g).await?;
    let group = suanli_proto::failover::parse_addresses(&g.addr).len() > 1;
    let name = match &a.request {
        Some(r) => full_name(&mut client, &id, r).await?,
        None => String::new(),
    };
    let run = async {
        loop {
            let mut stream = client
                .watch_requests(WatchRequestsRequest { name: name.clone() })
                .await?
                .into_inner();
            loop {
                match stream.message().await {
                    Ok(Some(event)) => {
                        if g.json {
                            output::print_json(&output::event_json(&event));
                        } else {
                            output::emit(&format!("{}\n", output::event_line(&event)));
                        }
                    }
                    Ok(None) if group => {
                        eprintln!("watch: the broker ended the stream; watching the leader again");
                        break;
                    }
                    Ok(None) => return anyhow::Ok(()),
                    Err(status)
                        if status.code() == Code::Aborted
                            || (group
                                && matches!(status.code(), Code::Unavailable | Code::Unknown)) =>
                    {
                        eprintln!("watch: {}; watching again", client::status_line(&status));
                        break;
                    }
                    Err(status) => return Err(status.into()),
                }
            }
        }
    };
    tokio::select! {
        res = run => res,
        () = crate::serve::shutdown_signal() => Ok(()),
    }
}

/// `suanli quote`.
pub async fn quote(g: &GlobalArgs, a: &SpecArgs) -> anyhow::Result<()> {
    let (mut client, _) = client::tenant_client(g).await?;
    let q = client
        .quote_request(QuoteRequestRequest {
            spec: Some(a.to_spec(time::now_unix_ms())),
        })
        .await?
        .into_inner();
    if g.json {
        output::print_json(&output::quote_json(&q));
    } else {
        output::emit(&output::quote_detail(&q));
    }
    Ok(())
}
