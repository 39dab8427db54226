//! The `slurm` backend: each lease's job is one Slurm batch job, one task per node.
//!
//! `start` writes a batch script into the lease's folder and submits it with `sbatch`. The
//! script runs the workload once per node with `srun`; each copy learns its rank from
//! `SLURM_PROCID` at run time (plus the rank of this pool's first node when the lease spans
//! several pools) and writes its own output files. `poll` lists the queue with one `squeue`
//! and maps Slurm's final states onto [`pb::JobCause`]. `stop` signals the job's steps and
//! cancels the job once the grace has passed. `recover` finds the jobs again by name
//! (`suanli-r{request}-l{lease}`) and by the script they run; it returns every lease whose end
//! was not reported yet, including jobs that ended while the agent was away (the next `poll`
//! reports those), since the agent takes ends only for leases it holds.
//!
//! The state folder holds one folder per lease, `leases/r{request}-l{lease}/`:
//! - `job.sh`: the batch script;
//! - `lease.json`: Slurm's job id and the ranks of this pool's nodes;
//! - `batch.out`, `batch.err`: the batch step's output, where `srun` says which task failed;
//! - `node-{K}/stdout.log`, `node-{K}/stderr.log`: the output of the K-th node's copy;
//! - `stopped`: `stop` was called; holds the time of the kill (unix ms);
//! - `ended.json`: its end, once reported, or `sbatch`'s refusal: it is never submitted again,
//!   and a repeated start gives the end again.
//!
//! The nodes' output lands in the lease's folder, so the state folder must be on storage the
//! nodes share with the agent.
//!
//! Slurm picks the nodes itself: the broker's node numbers in [`NodeSlot`] are not mapped to
//! Slurm node names. Every node of a job asks for the same number of GPUs; an elastic part
//! whose nodes hold different counts asks each node for the largest.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use suanli_proto::v1 as pb;

use crate::backend::{
    Backend, BackendError, Job, JobEvent, Launched, LeaseId, LogFiles, NodeSlot, outcome,
    save_outcome, saved_outcome,
};

/// How a job asks Slurm for its GPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GpuFlag {
    /// `--gpus-per-node=M` (select/cons_tres).
    #[default]
    GpusPerNode,
    /// `--gres=gpu:M`, for clusters that only know generic resources.
    Gres,
}

/// Where and how the backend submits jobs.
#[derive(Clone, Debug)]
pub struct SlurmConfig {
    /// The backend's folder: batch scripts, job ids and the jobs' output. Shared with the nodes.
    pub state_dir: PathBuf,
    /// `--partition`, if any.
    pub partition: Option<String>,
    /// `--reservation`, if any.
    pub reservation: Option<String>,
    /// How jobs ask for GPUs.
    pub gpus: GpuFlag,
    /// `SLURM_CONF` for every Slurm command the backend runs; unset uses the commands' default.
    pub slurm_conf: Option<PathBuf>,
    /// Folder of `sbatch`, `squeue`, `scontrol`, `scancel` and `srun`; unset searches `PATH`.
    pub bin_dir: Option<PathBuf>,
    /// How often the agent polls.
    pub poll_interval: Duration,
    /// The `suanli` binary as the nodes see it, to run each copy under its node wrapper
    /// (`suanli exec-node`): output capped at `max_log_bytes` per stream and rotated. `None`:
    /// `srun` writes the output files itself, uncapped.
    pub node_wrapper: Option<PathBuf>,
    /// Bytes kept of each output of each node, with a node wrapper.
    pub max_log_bytes: u64,
}

impl SlurmConfig {
    /// A configuration with no partition, reservation or `SLURM_CONF`, `--gpus-per-node`,
    /// commands from `PATH` and a poll every 2 s.
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        SlurmConfig {
            state_dir: state_dir.into(),
            partition: None,
            reservation: None,
            gpus: GpuFlag::GpusPerNode,
            slurm_conf: None,
            bin_dir: None,
            poll_interval: Duration::from_secs(2),
            node_wrapper: None,
            max_log_bytes: 64 << 20,
        }
    }
}

/// Runs leases' jobs as Slurm batch jobs. See the module documentation.
#[derive(Debug)]
pub struct SlurmBackend {
    config: SlurmConfig,
    /// `STATE/leases`, absolute: its paths go into scripts and `sbatch` options.
    leases_dir: PathBuf,
    /// The jobs it follows: running, waiting, or stopping until Slurm says they are gone.
    jobs: BTreeMap<LeaseId, Tracked>,
    /// Events for the next poll that no listing gives: ends of leases started again.
    events: Vec<JobEvent>,
}

#[derive(Debug)]
struct Tracked {
    job_id: u64,
    /// Lease-wide ranks of this pool's nodes, ascending: task K of the job is `ranks[K]`.
    ranks: Vec<u32>,
    stop: Option<Stop>,
    /// Whether Slurm was seen running it (and the agent told).
    running: bool,
}

#[derive(Debug)]
struct Stop {
    kill_at_ms: u64,
    killed: bool,
}

/// What `lease.json` holds. The job id is unset between writing the script and `sbatch`'s
/// answer.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct LeaseMeta {
    job_id: Option<u64>,
    ranks: Vec<u32>,
}

/// One line of `squeue`.
#[derive(Debug, Clone)]
struct QueueRow {
    job_id: u64,
    state: String,
    reason: String,
    name: String,
    command: String,
}

const META: &str = "lease.json";
const SCRIPT: &str = "job.sh";
const STOPPED: &str = "stopped";
/// The job's end, saved (see [`save_outcome`]): reported, or refused by `sbatch`.
const ENDED: &str = crate::backend::ENDED_FILE;
const BATCH_ERR: &str = "batch.err";

/// How long any Slurm command may take: `sbatch` retries on its own while slurmctld is busy,
/// and the agent's thread must not hang on it.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// The most of a command's output kept: `squeue` on a large cluster can be long.
const MAX_STDOUT: u64 = 16 << 20;
const MAX_STDERR: u64 = 64 << 10;
/// How much of the end of `batch.err` is searched for `srun`'s verdict.
const BATCH_ERR_TAIL: u64 = 64 << 10;
/// Above this many jobs `squeue` lists the whole queue rather than take a list of names.
const MAX_NAMES_IN_SQUEUE: usize = 500;

impl SlurmBackend {
    /// A backend keeping its files under `config.state_dir` (created if missing).
    pub fn new(config: SlurmConfig) -> Result<Self, BackendError> {
        let leases = config.state_dir.join("leases");
        fs::create_dir_all(&leases)
            .map_err(|e| BackendError::Fatal(format!("cannot create {}: {e}", leases.display())))?;
        let leases_dir = fs::canonicalize(&leases).map_err(|e| {
            BackendError::Fatal(format!("cannot resolve {}: {e}", leases.display()))
        })?;
        if leases_dir.to_str().is_none() {
            return Err(BackendError::Fatal(format!(
                "the Slurm state folder {} is not UTF-8: its paths go into batch scripts",
                leases_dir.display()
            )));
        }
        Ok(SlurmBackend {
            config,
            leases_dir,
            jobs: BTreeMap::new(),
            events: Vec::new(),
        })
    }

    fn lease_dir(&self, lease: LeaseId) -> PathBuf {
        self.leases_dir
            .join(format!("r{}-l{}", lease.request, lease.lease))
    }

    fn program(&self, name: &str) -> PathBuf {
        match &self.config.bin_dir {
            Some(dir) => dir.join(name),
            None => PathBuf::from(name),
        }
    }

    /// Runs a Slurm command to its end (bounded by [`COMMAND_TIMEOUT`]).
    fn run(&self, name: &str, args: &[String]) -> Result<Ran, RunError> {
        let program = self.program(name);
        let mut command = Command::new(&program);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(conf) = &self.config.slurm_conf {
            command.env("SLURM_CONF", conf);
        }
        run_bounded(command, name)
    }

    /// `scancel` with these arguments; a failure is only logged (the job may have ended).
    fn scancel(&self, args: &[String]) {
        match self.run("scancel", args) {
            Ok(ran) if ran.status.success() => {}
            Ok(ran) => tracing::debug!(?args, "scancel: {}", ran.message("scancel")),
            Err(e) => tracing::warn!(?args, "scancel: {}", e.message()),
        }
    }

    /// The queue's jobs by id: `names` limits it to those jobs' names.
    fn squeue(&self, names: Option<Vec<String>>) -> Result<HashMap<u64, QueueRow>, RunError> {
        let mut args: Vec<String> = ["-h", "--all", "-t", "all", "-o", "%i|%T|%r|%j|%o"]
            .into_iter()
            .map(String::from)
            .collect();
        if let Some(names) = names {
            args.push(format!("--name={}", names.join(",")));
        }
        let ran = self.run("squeue", &args)?;
        if !ran.status.success() {
            return Err(RunError::Failed(ran.message("squeue")));
        }
        Ok(parse_squeue(&ran.stdout)
            .into_iter()
            .map(|row| (row.job_id, row))
            .collect())
    }

    /// Writes one of the lease's marker files; a failure is logged: the marker only saves a
    /// restarted agent from repeating itself.
    fn mark(&self, lease: LeaseId, marker: &str, content: &str) {
        let path = self.lease_dir(lease).join(marker);
        if let Err(e) = fs::write(&path, content) {
            tracing::warn!(%lease, "cannot write {}: {e}", path.display());
        }
    }

    fn has_marker(&self, lease: LeaseId, marker: &str) -> bool {
        self.lease_dir(lease).join(marker).exists()
    }

    /// Finds a lease's job in the queue by name and script, for a lease whose `sbatch` may
    /// have been cut short by a crash.
    fn find_submitted(&self, lease: LeaseId) -> Result<Option<QueueRow>, BackendError> {
        let queue = self
            .squeue(Some(vec![job_name(lease)]))
            .map_err(|e| BackendError::Launch(e.message()))?;
        let script = self.lease_dir(lease).join(SCRIPT);
        Ok(queue
            .into_values()
            .filter(|row| Path::new(&row.command) == script)
            .max_by_key(|row| row.job_id))
    }

    /// Cancels the stopped jobs whose grace has run out.
    fn kill_due(&mut self) {
        let now = now_ms();
        let mut due = Vec::new();
        for tracked in self.jobs.values_mut() {
            if let Some(stop) = &mut tracked.stop
                && !stop.killed
                && stop.kill_at_ms <= now
            {
                stop.killed = true;
                due.push(tracked.job_id);
            }
        }
        for job_id in due {
            self.scancel(&[job_id.to_string()]);
        }
    }

    /// How an ended job ended, from its final state, its exit code and `srun`'s verdict.
    fn ended_outcome(&self, lease: LeaseId, tracked: &Tracked, row: &QueueRow) -> pb::JobOutcome {
        let mut message = format!("Slurm job {} {}", row.job_id, row.state);
        if !row.reason.is_empty() && row.reason != "None" {
            message.push_str(&format!(" ({})", row.reason));
        }
        let cause = match row.state.as_str() {
            "COMPLETED" => {
                let mut o = outcome(pb::JobCause::Completed, message);
                o.exit_code = Some(0);
                return o;
            }
            "TIMEOUT" => pb::JobCause::TimedOut,
            "NODE_FAIL" => pb::JobCause::NodeFailed,
            "CANCELLED" => pb::JobCause::Cancelled,
            "PREEMPTED" => pb::JobCause::Preempted,
            _ => pb::JobCause::Failed,
        };
        if cause != pb::JobCause::Failed {
            return outcome(cause, message);
        }
        // FAILED, OUT_OF_MEMORY, BOOT_FAIL, DEADLINE and the rarer final states. The batch
        // step is srun, whose exit code is the largest of its tasks' (143 for a task it
        // terminated after another failed); its own messages name the task that failed first.
        let exit = self.exit_code(row.job_id);
        let failure = read_tail(&self.lease_dir(lease).join(BATCH_ERR), BATCH_ERR_TAIL)
            .and_then(|text| first_task_failure(&text));
        if let Some((code, signal)) = exit {
            message.push_str(&format!(", ExitCode {code}:{signal}"));
        }
        let mut node_rank = tracked.ranks.first().copied().unwrap_or(0);
        let (mut exit_code, mut signal) = (None, None);
        match failure {
            Some(f) => {
                if let Some(&rank) = tracked.ranks.get(f.task as usize) {
                    node_rank = rank;
                }
                (exit_code, signal) = (f.exit_code, f.signal);
                message.push_str(&format!("; srun: {}", f.line));
            }
            None => match exit {
                Some((_, sig)) if sig != 0 => signal = Some(sig),
                Some((code, _)) => exit_code = Some(code),
                None => {}
            },
        }
        pb::JobOutcome {
            exit_code,
            signal,
            node_rank,
            ..outcome(cause, message)
        }
    }

    /// `ExitCode=code:signal` of a job, from `scontrol show job`.
    fn exit_code(&self, job_id: u64) -> Option<(i32, i32)> {
        let args = [
            "show".to_string(),
            "job".into(),
            job_id.to_string(),
            "-o".into(),
        ];
        match self.run("scontrol", &args) {
            Ok(ran) if ran.status.success() => parse_exit_code(&ran.stdout),
            Ok(ran) => {
                tracing::debug!(job_id, "scontrol: {}", ran.message("scontrol"));
                None
            }
            Err(e) => {
                tracing::warn!(job_id, "scontrol: {}", e.message());
                None
            }
        }
    }

    fn track(&mut self, lease: LeaseId, job_id: u64, ranks: Vec<u32>, stop: Option<Stop>) {
        self.jobs.insert(
            lease,
            Tracked {
                job_id,
                ranks,
                stop,
                running: false,
            },
        );
    }

    fn write_meta(&self, lease: LeaseId, meta: &LeaseMeta) -> io::Result<()> {
        let text = serde_json::to_string(meta).map_err(io::Error::other)?;
        fs::write(self.lease_dir(lease).join(META), text)
    }

    /// Submits a validated job: writes its folder and script, then `sbatch`.
    fn submit(&mut self, job: &Job, ranks: Vec<u32>) -> Result<(), BackendError> {
        let lease = job.id;
        let dir = self.lease_dir(lease);
        let fatal = |what: &str, path: &Path, e: io::Error| {
            BackendError::Fatal(format!("cannot {what} {}: {e}", path.display()))
        };
        for k in 0..ranks.len() {
            let node = dir.join(format!("node-{k}"));
            fs::create_dir_all(&node).map_err(|e| fatal("create", &node, e))?;
        }
        let dir_str = path_str(&dir);
        let script = batch_script(job, &ranks, &dir_str, &self.config);
        let script_path = dir.join(SCRIPT);
        fs::write(&script_path, script).map_err(|e| fatal("write", &script_path, e))?;
        let meta = LeaseMeta {
            job_id: None,
            ranks: ranks.clone(),
        };
        self.write_meta(lease, &meta)
            .map_err(|e| fatal("write", &dir.join(META), e))?;

        let args = sbatch_args(job, &self.config, &dir_str, ranks.len());
        let refused = |this: &Self, message: String| {
            let o = outcome(
                pb::JobCause::LaunchFailed,
                format!("sbatch refused it: {message}"),
            );
            if let Err(e) = save_outcome(&this.lease_dir(lease), &o) {
                tracing::warn!(%lease, "cannot save the refusal: {e}");
            }
            BackendError::Launch(message)
        };
        let ran = match self.run("sbatch", &args) {
            Ok(ran) => ran,
            Err(RunError::Missing(m)) => {
                return Err(BackendError::Fatal(format!("cannot submit to Slurm: {m}")));
            }
            Err(RunError::Failed(m)) => return Err(refused(self, m)),
        };
        if !ran.status.success() {
            return Err(refused(self, ran.message("sbatch")));
        }
        // `--parsable` prints `jobid` or `jobid;cluster`.
        let job_id = ran
            .stdout
            .trim()
            .split(';')
            .next()
            .and_then(|id| id.parse::<u64>().ok());
        let Some(job_id) = job_id else {
            let answer = ran.stdout.trim().to_string();
            return Err(refused(
                self,
                format!("sbatch answered {answer:?}, not a job id"),
            ));
        };
        if let Err(e) = self.write_meta(
            lease,
            &LeaseMeta {
                job_id: Some(job_id),
                ranks: ranks.clone(),
            },
        ) {
            // The job runs: a restarted agent finds it again by name.
            tracing::warn!(%lease, job_id, "cannot record the job id: {e}");
        }
        tracing::info!(%lease, job_id, nodes = ranks.len(), "submitted to Slurm");
        self.track(lease, job_id, ranks, None);
        Ok(())
    }
}

impl Backend for SlurmBackend {
    fn name(&self) -> &'static str {
        "slurm"
    }

    fn runtimes(&self) -> Vec<pb::WorkloadRuntime> {
        vec![pb::WorkloadRuntime::Command]
    }

    fn poll_interval(&self) -> Duration {
        self.config.poll_interval
    }

    fn start(&mut self, job: &Job) -> Result<Launched, BackendError> {
        if self.jobs.contains_key(&job.id) {
            return Ok(Launched::Queued);
        }
        let ranks = validate(job).map_err(BackendError::Launch)?;
        let lease = job.id;
        // A previous run of the agent got this far: never submit a lease twice.
        if let Some(meta) = read_meta(&self.lease_dir(lease)) {
            if let Some(o) = saved_outcome(&self.lease_dir(lease)) {
                tracing::info!(%lease, "its job already ran; not submitted again");
                self.events.push(JobEvent::Ended(lease, o));
                return Ok(Launched::Queued);
            }
            if self.has_marker(lease, STOPPED) {
                tracing::info!(%lease, "its job was stopped; not submitted again");
                return Ok(Launched::Queued);
            }
            let job_id = match meta.job_id {
                Some(id) => Some(id),
                None => self.find_submitted(lease)?.map(|row| row.job_id),
            };
            if let Some(job_id) = job_id {
                tracing::info!(%lease, job_id, "its job was already submitted");
                self.track(lease, job_id, meta.ranks, None);
                return Ok(Launched::Queued);
            }
        }
        self.submit(job, ranks)?;
        // Slurm says when it runs: `poll` sees it RUNNING.
        Ok(Launched::Queued)
    }

    fn stop(&mut self, lease: LeaseId, grace: Duration) {
        let Some(tracked) = self.jobs.get_mut(&lease) else {
            return;
        };
        if tracked.stop.is_some() {
            return;
        }
        let kill_at_ms = now_ms().saturating_add(grace.as_millis().try_into().unwrap_or(u64::MAX));
        tracked.stop = Some(Stop {
            kill_at_ms,
            killed: false,
        });
        let id = tracked.job_id.to_string();
        self.mark(lease, STOPPED, &kill_at_ms.to_string());
        // A job still waiting for its nodes has nothing to signal.
        self.scancel(&["--state=PENDING".into(), id.clone()]);
        // TERM to the job's steps: the workload's processes on every node. Not `--full`: that
        // also signals the batch shell, which is srun, and srun answers TERM by killing its
        // tasks at once, leaving the workload no grace.
        self.scancel(&["--signal=TERM".into(), id]);
        self.kill_due();
    }

    fn poll(&mut self) -> Vec<JobEvent> {
        self.kill_due();
        let mut events = std::mem::take(&mut self.events);
        if self.jobs.is_empty() {
            return events;
        }
        let names = (self.jobs.len() <= MAX_NAMES_IN_SQUEUE)
            .then(|| self.jobs.keys().map(|&lease| job_name(lease)).collect());
        let queue = match self.squeue(names) {
            Ok(queue) => queue,
            Err(e) => {
                // Slurm may be restarting: nothing is concluded from a failed listing.
                tracing::warn!("squeue: {}", e.message());
                return events;
            }
        };
        let leases: Vec<LeaseId> = self.jobs.keys().copied().collect();
        for lease in leases {
            let Some(tracked) = self.jobs.get(&lease) else {
                continue;
            };
            let row = queue.get(&tracked.job_id);
            let over = row.is_none_or(|row| is_final(&row.state));
            if tracked.stop.is_some() {
                if over {
                    self.jobs.remove(&lease);
                }
                continue;
            }
            let outcome = match row {
                None => outcome(
                    pb::JobCause::Failed,
                    format!("Slurm no longer knows job {}", tracked.job_id),
                ),
                Some(row) if over => self.ended_outcome(lease, tracked, row),
                Some(row) => {
                    // Running (or finishing): its nodes are the job's now.
                    if !tracked.running && matches!(row.state.as_str(), "RUNNING" | "COMPLETING") {
                        if let Some(t) = self.jobs.get_mut(&lease) {
                            t.running = true;
                        }
                        events.push(JobEvent::Running(lease));
                    }
                    continue;
                }
            };
            if let Err(e) = save_outcome(&self.lease_dir(lease), &outcome) {
                tracing::warn!(%lease, "cannot save the job's end: {e}");
            }
            self.jobs.remove(&lease);
            events.push(JobEvent::Ended(lease, outcome));
        }
        events
    }

    fn recover(&mut self) -> Result<Vec<LeaseId>, BackendError> {
        let queue = self.squeue(None).map_err(|e| {
            BackendError::Fatal(format!("cannot list Slurm's queue: {}", e.message()))
        })?;
        // Our jobs in Slurm's queue: named after a lease and running that lease's script (another
        // agent on the same cluster has its own state folder). The newest per lease.
        let mut found: BTreeMap<LeaseId, QueueRow> = BTreeMap::new();
        for row in queue.into_values() {
            let Some(lease) = parse_job_name(&row.name) else {
                continue;
            };
            if Path::new(&row.command) != self.lease_dir(lease).join(SCRIPT) {
                continue;
            }
            if found.get(&lease).is_none_or(|old| old.job_id < row.job_id) {
                found.insert(lease, row);
            }
        }
        // Every lease whose end is not reported yet, ended or not: the agent holds only the
        // leases `recover` returns, so one that ended while it was away must be among them
        // for the next poll's report of its end to be taken.
        let mut held = Vec::new();
        for (lease, row) in &found {
            if self.jobs.contains_key(lease) || self.has_marker(*lease, ENDED) {
                continue;
            }
            let dir = self.lease_dir(*lease);
            let ranks = match read_meta(&dir) {
                Some(meta) => {
                    if meta.job_id != Some(row.job_id) {
                        let meta = LeaseMeta {
                            job_id: Some(row.job_id),
                            ranks: meta.ranks.clone(),
                        };
                        if let Err(e) = self.write_meta(*lease, &meta) {
                            tracing::warn!(%lease, "cannot record the job id: {e}");
                        }
                    }
                    meta.ranks
                }
                None => {
                    tracing::warn!(%lease, "no {META}: its first node is taken as rank 0");
                    vec![0]
                }
            };
            let stop = read_stop(&dir);
            let over = is_final(&row.state);
            if stop.is_some() && over {
                continue;
            }
            if stop.is_none() {
                held.push(*lease);
            }
            self.track(*lease, row.job_id, ranks, stop);
        }
        // Leases submitted earlier that Slurm has forgotten: the next poll says so.
        let entries = fs::read_dir(&self.leases_dir).map_err(|e| {
            BackendError::Fatal(format!("cannot list {}: {e}", self.leases_dir.display()))
        })?;
        for entry in entries.flatten() {
            let Some(lease) = entry.file_name().to_str().and_then(parse_dir_name) else {
                continue;
            };
            if self.jobs.contains_key(&lease)
                || found.contains_key(&lease)
                || self.has_marker(lease, ENDED)
                || self.has_marker(lease, STOPPED)
            {
                continue;
            }
            if let Some(LeaseMeta {
                job_id: Some(job_id),
                ranks,
            }) = read_meta(&entry.path())
            {
                held.push(lease);
                self.track(lease, job_id, ranks, None);
            }
        }
        tracing::info!(held = held.len(), followed = self.jobs.len(), "recovered");
        Ok(held)
    }

    fn logs(&self, lease: LeaseId, rank: u32) -> Option<LogFiles> {
        let dir = self.lease_dir(lease);
        let ranks = match self.jobs.get(&lease) {
            Some(tracked) => tracked.ranks.clone(),
            None => read_meta(&dir)?.ranks,
        };
        let task = ranks.iter().position(|&r| r == rank)?;
        let node = dir.join(format!("node-{task}"));
        // Rotated files come first; without a node wrapper there are none.
        let files = |name: &str| {
            vec![
                node.join(format!("{name}.log.1")),
                node.join(format!("{name}.log")),
            ]
        };
        Some(LogFiles {
            stdout: files("stdout"),
            stderr: files("stderr"),
        })
    }
}

/// The job's name in Slurm, by which `recover` finds it.
fn job_name(lease: LeaseId) -> String {
    format!("suanli-r{}-l{}", lease.request, lease.lease)
}

fn parse_job_name(name: &str) -> Option<LeaseId> {
    parse_lease(name.strip_prefix("suanli-")?)
}

fn parse_dir_name(name: &str) -> Option<LeaseId> {
    parse_lease(name)
}

/// `r{request}-l{lease}`.
fn parse_lease(s: &str) -> Option<LeaseId> {
    let (request, lease) = s.strip_prefix('r')?.split_once("-l")?;
    Some(LeaseId {
        request: request.parse().ok()?,
        lease: lease.parse().ok()?,
    })
}

/// Checks what Slurm cannot run or the script cannot carry; returns the ranks of this pool's
/// nodes, ascending.
fn validate(job: &Job) -> Result<Vec<u32>, String> {
    let workload = &job.workload;
    if !workload.image.is_empty() {
        return Err("this pool's Slurm runs commands, not images".into());
    }
    if workload.argv.is_empty() {
        return Err("the workload has no command".into());
    }
    if job.nodes.is_empty() {
        return Err("the lease has no node on this pool".into());
    }
    let nul = |s: &str| s.contains('\0');
    if workload.argv.iter().any(|a| nul(a)) || nul(&workload.working_dir) {
        return Err("the workload's command or working directory contains a NUL byte".into());
    }
    for var in &workload.env {
        if !is_shell_name(&var.name) {
            return Err(format!(
                "environment variable name {:?} is not valid",
                var.name
            ));
        }
        if var.name.starts_with("SUANLI_") {
            return Err(format!("environment variable {} is reserved", var.name));
        }
        if nul(&var.value) {
            return Err(format!(
                "environment variable {} contains a NUL byte",
                var.name
            ));
        }
    }
    let mut ranks: Vec<u32> = job.nodes.iter().map(|n| n.rank).collect();
    ranks.sort_unstable();
    if ranks.windows(2).any(|w| w[0] == w[1]) {
        return Err("the lease names a node rank twice".into());
    }
    Ok(ranks)
}

fn is_shell_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// GPUs asked for on every node: the most any of this pool's nodes holds.
fn gpus_per_node(nodes: &[NodeSlot]) -> u32 {
    nodes.iter().map(|n| n.devices).max().unwrap_or(0)
}

/// `--time` in minutes: the lease's length rounded up, at least 1 (0 would mean no limit).
fn time_limit_minutes(start_unix_ms: u64, end_unix_ms: u64) -> u64 {
    end_unix_ms
        .saturating_sub(start_unix_ms)
        .div_ceil(60_000)
        .max(1)
}

fn sbatch_args(job: &Job, config: &SlurmConfig, lease_dir: &str, nodes: usize) -> Vec<String> {
    let gpus = gpus_per_node(&job.nodes);
    if job.nodes.iter().any(|n| n.devices != gpus) {
        tracing::info!(
            lease = %job.id,
            gpus,
            "nodes hold different GPU counts: each asks for the most"
        );
    }
    let chdir = if job.workload.working_dir.is_empty() {
        lease_dir
    } else {
        &job.workload.working_dir
    };
    let out_dir = escape_percent(lease_dir);
    let mut args = vec![
        "--parsable".to_string(),
        format!("--job-name={}", job_name(job.id)),
        format!("--nodes={nodes}"),
        "--ntasks-per-node=1".into(),
        format!(
            "--time={}",
            time_limit_minutes(job.start_unix_ms, job.end_unix_ms)
        ),
        // The broker places a lease again itself; Slurm's own requeue would run it twice.
        "--no-requeue".into(),
        // The job sees the node's login environment and the variables the script exports,
        // not the agent's (which holds its credentials).
        "--export=NONE".into(),
        format!("--chdir={chdir}"),
        format!("--output={out_dir}/batch.out"),
        format!("--error={out_dir}/batch.err"),
    ];
    if gpus > 0 {
        args.push(match config.gpus {
            GpuFlag::GpusPerNode => format!("--gpus-per-node={gpus}"),
            GpuFlag::Gres => format!("--gres=gpu:{gpus}"),
        });
    }
    if let Some(partition) = &config.partition {
        args.push(format!("--partition={partition}"));
    }
    if let Some(reservation) = &config.reservation {
        args.push(format!("--reservation={reservation}"));
    }
    args.push(format!("{lease_dir}/{SCRIPT}"));
    args
}

/// The batch script: exports the workload's and suanli's variables, then runs the workload
/// once per node through `srun`, each copy with its rank and its own output files.
fn batch_script(job: &Job, ranks: &[u32], lease_dir: &str, config: &SlurmConfig) -> String {
    let bin_dir = config.bin_dir.as_deref();
    let n = ranks.len();
    let tool = |name: &str| bin_dir.map(|dir| sh_quote(&path_str(&dir.join(name))));
    let mut lines = vec![
        "#!/bin/sh".to_string(),
        format!(
            "# suanli lease {}: written by the agent's Slurm backend.",
            job.id
        ),
        // Slurm's tools are found before the workload's variables could change PATH.
        match tool("srun") {
            Some(srun) => format!("SUANLI_SRUN={srun}"),
            None => concat!(
                "SUANLI_SRUN=$(command -v srun) || ",
                "{ echo \"suanli: no srun on $(hostname)\" >&2; exit 127; }"
            )
            .into(),
        },
        format!(
            "SUANLI_MASTER_ADDR=$({} show hostnames \"$SLURM_JOB_NODELIST\" | head -n 1)",
            tool("scontrol").unwrap_or_else(|| "scontrol".into())
        ),
    ];
    for var in &job.workload.env {
        lines.push(format!("export {}={}", var.name, sh_quote(&var.value)));
    }
    for (name, value) in job.suanli_env(ranks[0]) {
        if name != "SUANLI_NODE_RANK" {
            lines.push(format!("export {name}={}", sh_quote(&value)));
        }
    }
    lines.push("export SUANLI_MASTER_ADDR".into());
    // Each copy's rank: task K runs on the K-th node of the allocation and is this pool's
    // K-th rank of the lease.
    let contiguous = ranks
        .iter()
        .enumerate()
        .all(|(k, &r)| r as usize == ranks[0] as usize + k);
    let rank = if contiguous {
        format!("SUANLI_NODE_RANK=$((SLURM_PROCID + {}))", ranks[0])
    } else {
        let arms: Vec<String> = ranks
            .iter()
            .enumerate()
            .map(|(k, r)| format!("{k}) SUANLI_NODE_RANK={r} ;;"))
            .collect();
        format!("case $SLURM_PROCID in {} esac", arms.join(" "))
    };
    let node_out = escape_percent(lease_dir);
    let (wrapper, output, error) = match &config.node_wrapper {
        // The node wrapper writes the copy's output, capped and rotated, and exits with the
        // copy's code, so srun and Slurm see the job's end as before. srun's own files keep
        // only what the wrapper says (a program that cannot start).
        Some(exe) => (
            format!(
                "{rank}; export SUANLI_NODE_RANK; exec {} exec-node --dir {}/node-$SLURM_PROCID \
                 --workdir \"$PWD\" --max-log-bytes {} --exit-with-job -- \"$@\"",
                sh_quote(&path_str(exe)),
                sh_quote(lease_dir),
                config.max_log_bytes
            ),
            "exec.out",
            "exec.err",
        ),
        None => (
            format!("{rank}; export SUANLI_NODE_RANK; exec \"$@\""),
            "stdout.log",
            "stderr.log",
        ),
    };
    let mut exec = vec![
        // --export=ALL: the tasks see the variables exported above. sbatch's --export=NONE
        // leaves SLURM_EXPORT_ENV=NONE in the job, which srun would otherwise follow, starting
        // the tasks with no environment at all (not even PATH).
        "exec \"$SUANLI_SRUN\" --export=ALL".to_string(),
        format!("--nodes={n} --ntasks={n} --ntasks-per-node=1"),
        // A gang whose copy fails is stopped whole rather than left waiting for it.
        "--kill-on-bad-exit=1".into(),
        format!(
            "--output={}",
            sh_quote(&format!("{node_out}/node-%t/{output}"))
        ),
        format!(
            "--error={}",
            sh_quote(&format!("{node_out}/node-%t/{error}"))
        ),
        format!("/bin/sh -c {} sh", sh_quote(&wrapper)),
    ];
    exec.extend(job.workload.argv.iter().map(|arg| sh_quote(arg)));
    lines.push(exec.join(" \\\n  "));
    lines.push(String::new());
    lines.join("\n")
}

/// One word for `sh`, whatever it holds: single quotes, each `'` written as `'\''`.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Slurm expands `%` in output file names; `%%` is a plain `%`.
fn escape_percent(s: &str) -> String {
    s.replace('%', "%%")
}

/// A path the constructor checked to be UTF-8.
fn path_str(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

fn is_final(state: &str) -> bool {
    matches!(
        state,
        "COMPLETED"
            | "FAILED"
            | "TIMEOUT"
            | "NODE_FAIL"
            | "CANCELLED"
            | "PREEMPTED"
            | "BOOT_FAIL"
            | "OUT_OF_MEMORY"
            | "DEADLINE"
            | "REVOKED"
            | "SPECIAL_EXIT"
    )
}

/// Lines `id|state|reason|name|command` of `squeue`; others are skipped.
fn parse_squeue(text: &str) -> Vec<QueueRow> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.trim_end().splitn(5, '|');
            Some(QueueRow {
                job_id: fields.next()?.trim().parse().ok()?,
                state: fields.next()?.trim().to_string(),
                reason: fields.next()?.trim().to_string(),
                name: fields.next()?.trim().to_string(),
                command: fields.next().unwrap_or("").trim().to_string(),
            })
        })
        .collect()
}

/// `ExitCode=code:signal` in `scontrol show job -o`.
fn parse_exit_code(text: &str) -> Option<(i32, i32)> {
    let value = text
        .split_whitespace()
        .find_map(|token| token.strip_prefix("ExitCode="))?;
    let (code, signal) = value.split_once(':')?;
    Some((code.parse().ok()?, signal.parse().ok()?))
}

/// The first task `srun` reported as failed.
#[derive(Debug, PartialEq)]
struct TaskFailure {
    task: u32,
    exit_code: Option<i32>,
    signal: Option<i32>,
    line: String,
}

/// Finds `srun: error: NODES: task(s) LIST: WHAT` lines, e.g. `srun: error: n002: task 1:
/// Exited with exit code 3` or `... task 0: Killed`: the first is the copy that failed first
/// (the ones srun then terminates come after it).
fn first_task_failure(text: &str) -> Option<TaskFailure> {
    text.lines().find_map(|line| {
        let rest = line.trim().strip_prefix("srun: error: ")?;
        let at = rest.find(": task")?;
        let rest = &rest[at + 2..];
        let rest = rest
            .strip_prefix("tasks ")
            .or_else(|| rest.strip_prefix("task "))?;
        let (list, what) = rest.split_once(": ")?;
        let task = list.split(['-', ',']).next()?.trim().parse().ok()?;
        let (exit_code, signal) = match what.strip_prefix("Exited with exit code ") {
            Some(code) => (Some(code.trim().parse().ok()?), None),
            None => (None, Some(signal_number(what)?)),
        };
        Some(TaskFailure {
            task,
            exit_code,
            signal,
            line: rest.to_string(),
        })
    })
}

/// The signal `srun` names in its words (`strsignal`).
fn signal_number(what: &str) -> Option<i32> {
    let what = what.trim().trim_end_matches(" (core dumped)");
    Some(match what {
        "Hangup" => 1,
        "Interrupt" => 2,
        "Quit" => 3,
        "Illegal instruction" => 4,
        "Trace/breakpoint trap" => 5,
        "Aborted" => 6,
        "Bus error" => 7,
        "Floating point exception" => 8,
        "Killed" => 9,
        "User defined signal 1" => 10,
        "Segmentation fault" => 11,
        "User defined signal 2" => 12,
        "Broken pipe" => 13,
        "Alarm clock" => 14,
        "Terminated" => 15,
        _ => return None,
    })
}

fn read_meta(dir: &Path) -> Option<LeaseMeta> {
    let text = fs::read_to_string(dir.join(META)).ok()?;
    serde_json::from_str(&text).ok()
}

fn read_stop(dir: &Path) -> Option<Stop> {
    let text = fs::read_to_string(dir.join(STOPPED)).ok()?;
    Some(Stop {
        // An unreadable deadline kills at once: the job was asked to stop long ago.
        kill_at_ms: text.trim().parse().unwrap_or(0),
        killed: false,
    })
}

/// The last `max` bytes of a file, if it can be read.
fn read_tail(path: &Path, max: u64) -> Option<String> {
    let mut file = fs::File::open(path).ok()?;
    let len = file.metadata().ok()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(max))).ok()?;
    let mut bytes = Vec::new();
    file.take(max).read_to_end(&mut bytes).ok()?;
    Some(String::from_utf8_lossy(&bytes).into_owned())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis().try_into().unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A finished command.
#[derive(Debug)]
struct Ran {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Ran {
    /// What a failed command said: its error lines, or its exit status if it said nothing.
    fn message(&self, name: &str) -> String {
        let lines: Vec<&str> = self
            .stderr
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        if lines.is_empty() {
            format!("{name} failed ({})", self.status)
        } else {
            lines.join("; ")
        }
    }
}

/// Why a command did not run to its end.
#[derive(Debug)]
enum RunError {
    /// The program is not there.
    Missing(String),
    /// It could not be started, or took too long and was killed.
    Failed(String),
}

impl RunError {
    fn message(&self) -> String {
        match self {
            RunError::Missing(m) | RunError::Failed(m) => m.clone(),
        }
    }
}

/// Runs a command with its output captured (bounded) and its run time bounded.
fn run_bounded(mut command: Command, name: &str) -> Result<Ran, RunError> {
    let mut child = command.spawn().map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => RunError::Missing(format!("{name}: command not found")),
        _ => RunError::Failed(format!("cannot run {name}: {e}")),
    })?;
    // Both pipes are drained on their own threads so that a chatty command never blocks.
    let stdout = child
        .stdout
        .take()
        .map(|pipe| thread::spawn(move || read_bounded(pipe, MAX_STDOUT)));
    let stderr = child
        .stderr
        .take()
        .map(|pipe| thread::spawn(move || read_bounded(pipe, MAX_STDERR)));
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    let mut pause = Duration::from_millis(1);
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(RunError::Failed(format!(
                    "{name} did not finish within {} s",
                    COMMAND_TIMEOUT.as_secs()
                )));
            }
            Ok(None) => {
                thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(20));
            }
            Err(e) => return Err(RunError::Failed(format!("cannot wait for {name}: {e}"))),
        }
    };
    let collect = |handle: Option<thread::JoinHandle<String>>| {
        handle.and_then(|h| h.join().ok()).unwrap_or_default()
    };
    Ok(Ran {
        status,
        stdout: collect(stdout),
        stderr: collect(stderr),
    })
}

/// Reads a pipe to its end, keeping the first `max` bytes.
fn read_bounded(mut pipe: impl Read, max: u64) -> String {
    let mut bytes = Vec::new();
    let _ = (&mut pipe).take(max).read_to_end(&mut bytes);
    let _ = io::copy(&mut pipe, &mut io::sink());
    String::from_utf8_lossy(&bytes).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(argv: &[&str], ranks: &[u32]) -> Job {
        Job {
            id: LeaseId {
                request: 7,
                lease: 2,
            },
            tenant: "acme".into(),
            workload: pb::Workload {
                argv: argv.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            },
            nodes: ranks
                .iter()
                .map(|&rank| NodeSlot {
                    rank,
                    group: 0,
                    node: rank,
                    devices: 2,
                    model: "h100".into(),
                })
                .collect(),
            num_nodes: 4,
            start_unix_ms: 0,
            end_unix_ms: 60_001,
        }
    }

    #[test]
    fn quoting_keeps_every_character() {
        assert_eq!(sh_quote("a b"), "'a b'");
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
        assert_eq!(sh_quote(""), "''");
    }

    #[test]
    fn time_limits_round_up_to_whole_minutes() {
        assert_eq!(time_limit_minutes(0, 0), 1);
        assert_eq!(time_limit_minutes(0, 60_000), 1);
        assert_eq!(time_limit_minutes(0, 60_001), 2);
        assert_eq!(time_limit_minutes(10, 5), 1);
    }

    #[test]
    fn names_and_folders_give_back_their_lease() {
        let lease = LeaseId {
            request: 12,
            lease: 3,
        };
        assert_eq!(parse_job_name(&job_name(lease)), Some(lease));
        assert_eq!(parse_dir_name("r12-l3"), Some(lease));
        assert_eq!(parse_job_name("suanli-r12"), None);
        assert_eq!(parse_job_name("other-r1-l1"), None);
    }

    #[test]
    fn srun_names_the_task_that_failed_first() {
        let text = "slurmstepd: error: something\n\
                    srun: error: n002: task 1: Exited with exit code 3\n\
                    srun: launch/slurm: _step_signal: Terminating StepId=2.0\n\
                    srun: error: n001: task 0: Terminated\n";
        let f = first_task_failure(text).expect("a failure");
        assert_eq!((f.task, f.exit_code, f.signal), (1, Some(3), None));
        let f = first_task_failure(
            "srun: error: n[001-002]: tasks 0-1: Segmentation fault (core dumped)\n",
        )
        .expect("a failure");
        assert_eq!((f.task, f.exit_code, f.signal), (0, None, Some(11)));
        assert_eq!(
            first_task_failure("srun: error: Unable to create step\n"),
            None
        );
    }

    #[test]
    fn queue_lines_and_exit_codes_parse() {
        let rows = parse_squeue("12|FAILED|NonZeroExitCode|suanli-r1-l1|/s/job.sh\nbad line\n");
        assert_eq!(rows.len(), 1);
        assert_eq!((rows[0].job_id, rows[0].state.as_str()), (12, "FAILED"));
        assert_eq!(rows[0].command, "/s/job.sh");
        assert_eq!(
            parse_exit_code("JobId=2 JobState=FAILED ExitCode=143:0 RunTime=00:00:04"),
            Some((143, 0))
        );
        assert!(is_final("TIMEOUT") && !is_final("COMPLETING") && !is_final("PENDING"));
    }

    #[test]
    fn the_script_adds_the_rank_offset_and_quotes_arguments() {
        let config = SlurmConfig::new("/s");
        let script = batch_script(
            &job(&["echo", "a b", "it's"], &[2, 3]),
            &[2, 3],
            "/s/l",
            &config,
        );
        assert!(script.contains("SUANLI_NODE_RANK=$((SLURM_PROCID + 2))"));
        assert!(script.contains(r"'it'\''s'"));
        assert!(script.contains("--nodes=2 --ntasks=2"));
        let gaps = batch_script(&job(&["true"], &[1, 5]), &[1, 5], "/s/l", &config);
        assert!(gaps.contains("0) SUANLI_NODE_RANK=1 ;; 1) SUANLI_NODE_RANK=5 ;;"));
        assert!(
            gaps.contains("/node-%t/stdout.log'"),
            "srun writes the output"
        );
        let wrapped = SlurmConfig {
            node_wrapper: Some("/opt/suanli".into()),
            max_log_bytes: 1000,
            ..SlurmConfig::new("/s")
        };
        let script = batch_script(&job(&["true"], &[0]), &[0], "/s/l", &wrapped);
        // Quoted once more as the argument of sh -c.
        assert!(
            script.contains(
                r"exec '\''/opt/suanli'\'' exec-node --dir '\''/s/l'\''/node-$SLURM_PROCID"
            ),
            "{script}"
        );
        assert!(
            script.contains("--max-log-bytes 1000 --exit-with-job"),
            "{script}"
        );
        assert!(script.contains("/node-%t/exec.out'"), "{script}");
    }

    #[test]
    fn images_and_bad_names_are_refused() {
        let mut j = job(&["true"], &[0]);
        j.workload.image = "pytorch:2".into();
        assert!(validate(&j).unwrap_err().contains("not images"));
        let mut j = job(&["true"], &[0]);
        j.workload.env.push(pb::EnvVar {
            name: "A;B".into(),
            value: String::new(),
        });
        assert!(validate(&j).is_err());
    }
}
