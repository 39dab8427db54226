//! `suanli agent`: a pool's agent. It registers the pool from a fleet file, keeps the
//! `PoolService.ConnectAgent` stream open (Hello, then a Heartbeat every interval the broker
//! asks for) and runs the leases the broker starts on the pool through a backend of
//! `suanli-agent`: `sim` (nothing runs; a lease's job ends after its length divided by
//! `--speedup`), `process` (each node's copy is a child process, for a pool that is one
//! machine) or `slurm` (`sbatch` on the pool's cluster).
//!
//! The stream is reopened with backoff whenever it breaks. Hello then lists the leases still
//! held, so the broker neither starts them again nor stops them; reports the broker has not
//! acknowledged are sent again. `suanli exec-node` is the `process` backend's node wrapper.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use clap::{Args, ValueEnum};
use rand::RngExt as _;
use suanli_agent::process::{ProcessBackend, ProcessConfig};
use suanli_agent::sim::SimBackend;
use suanli_agent::slurm::{GpuFlag, SlurmBackend, SlurmConfig};
use suanli_agent::{Backend, Runner};
use suanli_core::{Catalogue, Fleet, PoolSpec, fleet};
use suanli_proto::v1::pool_service_client::PoolServiceClient;
use suanli_proto::v1::{
    AgentMessage, BrokerMessage, Heartbeat, RegisterPoolRequest, agent_message, broker_message,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status};

use crate::client::{self, Authed, Bearer, GlobalArgs, Role};
use crate::parse;
use crate::serve::shutdown_signal;
use crate::time::now_unix_ms;

/// Shortest and longest wait before reconnecting. The longest is a heartbeat interval, well
/// inside the broker's heartbeat timeout (15 s by default): after a failover the new leader
/// gives the agent one timeout to come back, and an agent asleep for longer would find its
/// pool declared lost.
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = DEFAULT_HEARTBEAT;
/// Heartbeat interval when the broker's Welcome gives none.
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(5);

/// Which resource manager runs the pool's jobs.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendArg {
    /// Nothing runs: a lease's job ends after its length divided by --speedup.
    Sim,
    /// Each node's copy runs as a child process of the agent (a pool that is one machine).
    Process,
    /// The pool is a Slurm cluster: jobs go through sbatch, squeue and scancel.
    Slurm,
}

/// `suanli agent`.
#[derive(Args, Clone, Debug)]
pub struct AgentArgs {
    /// Fleet file holding the pool's spec, or a built-in fleet (futian-2024, futian-2025).
    #[arg(long, value_name = "FILE")]
    pub fleet: String,
    /// Id of the pool this agent runs.
    #[arg(long, value_name = "ID")]
    pub pool: String,
    /// What runs the leases' jobs.
    #[arg(long, value_enum, default_value = "sim")]
    pub backend: BackendArg,
    /// Finish simulated jobs this many times faster than their leases (10: a 2h lease
    /// reports FINISHED after 12 minutes); --backend sim only.
    #[arg(long, value_name = "X", default_value_t = 1.0, value_parser = speedup)]
    pub speedup: f64,
    /// Where the agent keeps its jobs' state and output [default: suanli-agent-POOL].
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Run jobs as this user (a name, or UID:GID); --backend process.
    #[arg(long, value_name = "USER")]
    pub run_as: Option<String>,
    /// Allow jobs to run as root when the agent runs as root without --run-as.
    #[arg(long)]
    pub allow_root: bool,
    /// Bytes of output kept per node and stream (the current file and one rotated file).
    #[arg(long, value_name = "BYTES", default_value_t = 64 << 20)]
    pub max_log_bytes: u64,
    /// Slurm partition to submit to [default: the cluster's default]; --backend slurm.
    #[arg(long, value_name = "NAME")]
    pub slurm_partition: Option<String>,
    /// Slurm reservation to submit into; --backend slurm.
    #[arg(long, value_name = "NAME")]
    pub slurm_reservation: Option<String>,
    /// Ask Slurm for GPUs with --gres=gpu:M instead of --gpus-per-node=M; --backend slurm.
    #[arg(long)]
    pub slurm_gres: bool,
    /// The `suanli` binary as the cluster's nodes see it: each copy runs under its node
    /// wrapper, which keeps the output capped and rotated (--max-log-bytes); `none` lets Slurm
    /// write the output files, uncapped [default: this agent's own binary]; --backend slurm.
    #[arg(long, value_name = "PATH")]
    pub slurm_node_wrapper: Option<PathBuf>,
    /// How often to list Slurm's queue (one squeue for all the agent's jobs); --backend slurm.
    #[arg(long, value_name = "DURATION", default_value = "500ms", value_parser = slurm_poll)]
    pub slurm_poll: Duration,
}

/// `suanli exec-node`: the node wrapper of the process backend.
#[derive(Args, Clone, Debug)]
pub struct ExecNodeArgs {
    /// The node's folder: output and status go here.
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,
    /// The job's working directory [default: the node's folder].
    #[arg(long, value_name = "DIR")]
    pub workdir: Option<PathBuf>,
    /// Bytes kept of each output.
    #[arg(long, value_name = "BYTES", default_value_t = 64 << 20)]
    pub max_log_bytes: u64,
    /// Run the job as UID:GID.
    #[arg(long, value_name = "UID:GID", value_parser = uid_gid)]
    pub run_as: Option<(u32, u32)>,
    /// Exit with the job's own code (128 + a signal that killed it), as a shell would: for a
    /// resource manager (srun) that reads the copy's end from its exit.
    #[arg(long)]
    pub exit_with_job: bool,
    /// The job's program and arguments.
    #[arg(last = true, required = true, value_name = "ARGV")]
    pub argv: Vec<String>,
}

/// Runs the node wrapper; with `--exit-with-job`, ends the process with the job's code.
pub fn exec_node(a: &ExecNodeArgs) -> anyhow::Result<()> {
    let status = suanli_agent::exec::run(&suanli_agent::exec::ExecArgs {
        dir: a.dir.clone(),
        workdir: a.workdir.clone(),
        max_log_bytes: a.max_log_bytes,
        run_as: a.run_as,
        argv: a.argv.clone(),
    })
    .with_context(|| format!("node folder {}", a.dir.display()))?;
    if a.exit_with_job {
        std::process::exit(status.shell_code());
    }
    Ok(())
}

fn slurm_poll(text: &str) -> Result<Duration, String> {
    parse::positive_duration_ms(text).map(Duration::from_millis)
}

fn uid_gid(text: &str) -> Result<(u32, u32), String> {
    let parsed = text
        .split_once(':')
        .and_then(|(u, g)| Some((u.parse().ok()?, g.parse().ok()?)));
    parsed.ok_or_else(|| format!("{text:?}: expected UID:GID, for example 1000:1000"))
}

/// A user name (from /etc/passwd) or UID:GID.
fn lookup_user(user: &str) -> anyhow::Result<(u32, u32)> {
    if let Ok(ids) = uid_gid(user) {
        return Ok(ids);
    }
    let passwd = std::fs::read_to_string("/etc/passwd").context("--run-as: reading /etc/passwd")?;
    passwd
        .lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            (f.len() >= 4 && f[0] == user).then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
        })
        .flatten()
        .next()
        .ok_or_else(|| anyhow!("--run-as {user}: no such user in /etc/passwd (or give UID:GID)"))
}

/// The backend the arguments ask for.
fn backend(a: &AgentArgs, state_dir: &Path) -> anyhow::Result<Box<dyn Backend>> {
    Ok(match a.backend {
        BackendArg::Sim => Box::new(SimBackend::new(a.speedup)),
        BackendArg::Process => {
            let run_as = a.run_as.as_deref().map(lookup_user).transpose()?;
            if run_as.is_none() && suanli_agent::process::running_as_root() && !a.allow_root {
                bail!(
                    "the agent runs as root: jobs would run as root too. Give --run-as USER, or \
                     --allow-root to accept it"
                );
            }
            let wrapper = std::env::current_exe().context("finding the suanli binary")?;
            Box::new(ProcessBackend::new(ProcessConfig {
                state_dir: state_dir.to_path_buf(),
                wrapper,
                max_log_bytes: a.max_log_bytes,
                run_as,
                poll_interval: Duration::from_millis(5),
            })?)
        }
        BackendArg::Slurm => {
            let mut config = SlurmConfig::new(state_dir);
            config.partition = a.slurm_partition.clone();
            config.reservation = a.slurm_reservation.clone();
            config.gpus = if a.slurm_gres {
                GpuFlag::Gres
            } else {
                GpuFlag::GpusPerNode
            };
            config.poll_interval = a.slurm_poll;
            config.node_wrapper = match a.slurm_node_wrapper.as_deref() {
                Some(p) if p == Path::new("none") => None,
                Some(p) => Some(p.to_path_buf()),
                None => Some(std::env::current_exe().context("finding the suanli binary")?),
            };
            config.max_log_bytes = a.max_log_bytes;
            Box::new(SlurmBackend::new(config)?)
        }
    })
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

type Outbox = tokio::sync::mpsc::Sender<AgentMessage>;

async fn send(out: &Outbox, msg: AgentMessage) -> Result<(), SessionEnd> {
    out.send(msg)
        .await
        .map_err(|_| SessionEnd::Retry("the stream to the broker closed".into()))
}

/// One ConnectAgent stream, from Hello until it breaks.
async fn session(
    runner: &mut Runner,
    pool: &str,
    client: &mut PoolServiceClient<Authed>,
    backoff: &mut Backoff,
) -> SessionEnd {
    let (out, rx) = tokio::sync::mpsc::channel(1024);
    let hello = runner.hello(&format!("suanli-agent/{}", env!("CARGO_PKG_VERSION")));
    out.try_send(AgentMessage {
        body: Some(agent_message::Body::Hello(hello)),
    })
    .expect("an empty channel has room");
    let mut inbound = match client.connect_agent(ReceiverStream::new(rx)).await {
        Ok(r) => r.into_inner(),
        Err(s) => return classify(pool, "opening the agent stream", s),
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
        Err(s) => return classify(pool, "waiting for Welcome", s),
    };
    backoff.reset();
    let every = match welcome.heartbeat_interval_ms {
        0 => DEFAULT_HEARTBEAT,
        ms => Duration::from_millis(ms),
    };
    tracing::info!(
        pool,
        held = runner.held(),
        unacknowledged = runner.unacknowledged(),
        "connected to the broker; heartbeat every {:?}",
        every
    );
    runner.welcomed(&out);
    let mut heartbeat = tokio::time::interval(every);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut poll = tokio::time::interval(runner.poll_interval());
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = heartbeat.tick() => {
                let beat = Heartbeat { time_unix_ms: now_unix_ms(), nodes: Vec::new() };
                if let Err(end) = send(&out, AgentMessage {
                    body: Some(agent_message::Body::Heartbeat(beat)),
                }).await {
                    return end;
                }
                runner.resend_overdue(&out);
            }
            // Backends run short commands (a fork, sbatch): off the async workers' hands.
            _ = poll.tick() => tokio::task::block_in_place(|| runner.poll(&out)),
            msg = inbound.message() => match msg {
                Ok(Some(m)) => tokio::task::block_in_place(|| runner.handle(m, &out)),
                Ok(None) => return SessionEnd::Retry("the broker closed the stream".into()),
                Err(s) => return classify(pool, "agent stream", s),
            },
        }
    }
}

/// Runs the agent until SIGINT or SIGTERM.
pub async fn run(g: &GlobalArgs, a: &AgentArgs) -> anyhow::Result<()> {
    let spec = load_pool(&a.fleet, &a.pool)?;
    let pool_msg = suanli_broker::convert::pool_spec_to_pb(&spec);
    // With a client certificate (mutual TLS) and no token given, the certificate is the
    // agent's credential.
    let bearer = match (&g.client_cert, &g.token) {
        (Some(_), None) => Bearer::certificate_only(),
        _ => Bearer::new(&client::identity(g, Role::Agent(&a.pool))?.token)?,
    };
    // The broker, or the brokers of a group: the agent's calls go to the leader, and after a
    // failover it connects to the new one and says again what it runs.
    let group = client::group(g)?;
    let register_id = parse::new_request_id();
    let mut state_dir = a
        .state_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("suanli-agent-{}", a.pool)));
    std::fs::create_dir_all(&state_dir)
        .and_then(|()| std::fs::canonicalize(&state_dir))
        .map(|absolute| state_dir = absolute)
        .with_context(|| format!("--state-dir {}", state_dir.display()))?;
    let backend = backend(a, &state_dir)?;
    let mut runner = Runner::new(&a.pool, backend, Some(state_dir.join("ended.jsonl")))?;
    tracing::info!(
        pool = %a.pool,
        groups = spec.groups.len(),
        backend = runner.backend_name(),
        state_dir = %state_dir.display(),
        "agent starting"
    );
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    let mut backoff = Backoff::new();
    let mut registered = false;
    loop {
        let attempt = async {
            if let Err(e) = client::reach(&group, g).await {
                return SessionEnd::Retry(client::error_line(&e));
            }
            let mut pools = client::pool_client(group.clone(), bearer.clone());
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
            session(&mut runner, &a.pool, &mut pools, &mut backoff).await
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
}
