//! The seam between the agent and the pool's resource manager. A backend starts a lease's job
//! on its nodes, stops it, says when it ended and how, finds its jobs again after the agent
//! restarts, and tells where each node's output is kept. Everything else (the stream to the
//! broker, acknowledgements, reading logs) is the agent's and the same for every backend.
//!
//! The trait is synchronous: the agent owns its backend on one thread and calls `poll` every
//! `poll_interval`. Launching a job through a resource manager is a short command (`sbatch`,
//! a fork); what takes time happens on the pool, and `poll` finds out about it.

use std::path::PathBuf;
use std::time::Duration;

use suanli_proto::v1 as pb;

/// One lease of one request: a request placed again after a requeue has a new lease.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct LeaseId {
    /// The request.
    pub request: u64,
    /// Its lease, 1 for the first placement.
    pub lease: u32,
}

impl std::fmt::Display for LeaseId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "r{}#{}", self.request, self.lease)
    }
}

/// One node of the pool that a job runs a copy on.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NodeSlot {
    /// Rank of the node in the whole lease, 0 to `Job::num_nodes - 1`.
    pub rank: u32,
    /// Node group in the pool.
    pub group: u32,
    /// Node in its group.
    pub node: u32,
    /// Devices held on that node.
    pub devices: u32,
    /// Accelerator model, by catalogue id.
    pub model: String,
}

/// A lease's job as the backend launches it: the workload once per node of `nodes`.
#[derive(Clone, Debug, PartialEq)]
pub struct Job {
    /// Which lease.
    pub id: LeaseId,
    /// The tenant whose job it is.
    pub tenant: String,
    /// What to run.
    pub workload: pb::Workload,
    /// The nodes of this pool, by rank.
    pub nodes: Vec<NodeSlot>,
    /// Nodes of the whole lease, on every pool.
    pub num_nodes: u32,
    /// When the lease was placed and when it expires (unix ms): a backend with time limits
    /// (Slurm's `--time`) sets them from the difference.
    pub start_unix_ms: u64,
    /// See `start_unix_ms`.
    pub end_unix_ms: u64,
}

impl Job {
    /// The variables every copy of the job sees besides the workload's own: which request,
    /// lease and node, and the size of the lease. The backend adds `SUANLI_MASTER_ADDR` where
    /// it knows it, and the devices a copy holds.
    pub fn suanli_env(&self, rank: u32) -> Vec<(String, String)> {
        vec![
            ("SUANLI_REQUEST".into(), self.id.request.to_string()),
            ("SUANLI_LEASE".into(), self.id.to_string()),
            ("SUANLI_NODE_RANK".into(), rank.to_string()),
            ("SUANLI_NUM_NODES".into(), self.num_nodes.to_string()),
        ]
    }

    /// Time between the polite stop and the kill: 10 s when the workload names none.
    pub fn stop_grace(&self) -> Duration {
        match self.workload.stop_grace_s {
            0 => Duration::from_secs(10),
            s => Duration::from_secs(s as u64),
        }
    }
}

/// Where one node's output of a job is kept, oldest file first (rotated files before the
/// current one).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LogFiles {
    /// Standard output.
    pub stdout: Vec<PathBuf>,
    /// Standard error.
    pub stderr: Vec<PathBuf>,
}

/// Why a backend could not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The job cannot start: the resource manager refused it, the executable is missing. The
    /// agent reports the lease FAILED with cause `launch_failed` and this message; the backend
    /// keeps serving its other leases.
    #[error("{0}")]
    Launch(String),
    /// The backend itself is broken (its state folder cannot be written, its commands are
    /// missing): the agent cannot serve the pool.
    #[error("{0}")]
    Fatal(String),
}

/// Where a job is once `start` returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Launched {
    /// Its processes exist: the agent reports the lease STARTED at once.
    Running,
    /// It waits in the resource manager's queue (or ran before a restart): `poll` says
    /// when it runs, or how it ended.
    Queued,
}

/// What a backend learned about a lease's job.
#[derive(Clone, Debug, PartialEq)]
pub enum JobEvent {
    /// The job runs: the resource manager started it (at once for processes; when its nodes
    /// were free for a batch system). The agent reports the lease STARTED.
    Running(LeaseId),
    /// The job ended by itself, with how.
    Ended(LeaseId, pb::JobOutcome),
}

/// A pool's resource manager, as the agent drives it. See the module documentation.
pub trait Backend: Send {
    /// Its name on the command line and in `Hello.backend`: `sim`, `process`, `slurm`.
    fn name(&self) -> &'static str;

    /// The kinds of workload it runs; empty for one that runs nothing (simulated).
    fn runtimes(&self) -> Vec<pb::WorkloadRuntime>;

    /// How often the agent calls [`Backend::poll`].
    fn poll_interval(&self) -> Duration;

    /// Starts a lease's job: running at once, or queued (then `poll` says when it runs).
    /// Idempotent: a lease this backend already runs, or ran before a restart, is never
    /// started twice; its events come again from `poll` instead (its end, when it has ended),
    /// so the agent can answer the broker.
    fn start(&mut self, job: &Job) -> Result<Launched, BackendError>;

    /// Stops a lease's job: the polite signal now, the kill after `grace`. A lease it does not
    /// run is ignored. A stopped job's end is not reported by `poll`.
    fn stop(&mut self, lease: LeaseId, grace: Duration);

    /// What happened since the last call: jobs that started running, jobs that ended (each
    /// once, and never a stopped one). Also carries out the kills that stops scheduled.
    fn poll(&mut self) -> Vec<JobEvent>;

    /// After the agent restarts: the leases whose end has not been reported, found from the
    /// pool's own state (processes, Slurm's queue): still waiting, running, or ended while the
    /// agent was away. The next `poll` gives their events (Running for those that run, the end
    /// for those that ended).
    fn recover(&mut self) -> Result<Vec<LeaseId>, BackendError>;

    /// Where a node's output of a lease is kept, if this backend ran it.
    fn logs(&self, lease: LeaseId, rank: u32) -> Option<LogFiles>;
}

/// A job's end as the agent writes it to disk: next to the job (`ended.json`, so that the
/// lease is never started again and its end can be given again after a restart) and in the
/// agent's journal of ended leases.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SavedOutcome {
    cause: i32,
    exit_code: Option<i32>,
    signal: Option<i32>,
    node_rank: u32,
    message: String,
}

impl From<&pb::JobOutcome> for SavedOutcome {
    fn from(o: &pb::JobOutcome) -> Self {
        SavedOutcome {
            cause: o.cause,
            exit_code: o.exit_code,
            signal: o.signal,
            node_rank: o.node_rank,
            message: o.message.clone(),
        }
    }
}

impl From<SavedOutcome> for pb::JobOutcome {
    fn from(s: SavedOutcome) -> Self {
        pb::JobOutcome {
            cause: s.cause,
            exit_code: s.exit_code,
            signal: s.signal,
            node_rank: s.node_rank,
            message: s.message,
        }
    }
}

/// The file a lease's end is saved in, in its folder.
pub const ENDED_FILE: &str = "ended.json";

/// Saves a lease's end in its folder, atomically.
pub fn save_outcome(dir: &std::path::Path, o: &pb::JobOutcome) -> std::io::Result<()> {
    let saved = SavedOutcome::from(o);
    let tmp = dir.join(format!("{ENDED_FILE}.tmp"));
    std::fs::write(
        &tmp,
        serde_json::to_vec(&saved).map_err(std::io::Error::other)?,
    )?;
    std::fs::rename(tmp, dir.join(ENDED_FILE))
}

/// A lease's saved end, if it has one.
pub fn saved_outcome(dir: &std::path::Path) -> Option<pb::JobOutcome> {
    let bytes = std::fs::read(dir.join(ENDED_FILE)).ok()?;
    let saved: SavedOutcome = serde_json::from_slice(&bytes).ok()?;
    Some(saved.into())
}

/// An outcome with a cause and a message.
pub fn outcome(cause: pb::JobCause, message: impl Into<String>) -> pb::JobOutcome {
    let mut message: String = message.into();
    truncate_utf8(&mut message, MAX_OUTCOME_MESSAGE);
    pb::JobOutcome {
        cause: cause as i32,
        message,
        ..Default::default()
    }
}

/// The longest outcome message the broker keeps.
pub const MAX_OUTCOME_MESSAGE: usize = 1024;

/// Cuts a string to at most `max` bytes, on a character boundary.
pub fn truncate_utf8(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

/// Combines the ends of a job's copies, node by node, into the job's outcome: completed when
/// every copy exited 0; otherwise the first failing copy (by rank) gives the cause, exit code
/// and signal.
pub fn combine(copies: &[(u32, pb::JobOutcome)]) -> pb::JobOutcome {
    let mut sorted: Vec<&(u32, pb::JobOutcome)> = copies.iter().collect();
    sorted.sort_by_key(|(rank, _)| *rank);
    match sorted
        .iter()
        .find(|(_, o)| o.cause != pb::JobCause::Completed as i32)
    {
        Some((rank, o)) => pb::JobOutcome {
            node_rank: *rank,
            ..o.clone()
        },
        None => pb::JobOutcome {
            cause: pb::JobCause::Completed as i32,
            exit_code: Some(0),
            ..Default::default()
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exited(code: i32) -> pb::JobOutcome {
        pb::JobOutcome {
            cause: if code == 0 {
                pb::JobCause::Completed
            } else {
                pb::JobCause::Failed
            } as i32,
            exit_code: Some(code),
            ..Default::default()
        }
    }

    #[test]
    fn a_job_completes_only_when_every_copy_exits_zero() {
        let all = combine(&[(1, exited(0)), (0, exited(0))]);
        assert_eq!(all.cause, pb::JobCause::Completed as i32);
        assert_eq!(all.exit_code, Some(0));
        let one = combine(&[(2, exited(4)), (0, exited(0)), (1, exited(3))]);
        assert_eq!(one.cause, pb::JobCause::Failed as i32);
        assert_eq!((one.exit_code, one.node_rank), (Some(3), 1));
    }

    #[test]
    fn messages_are_cut_on_a_character_boundary() {
        let o = outcome(pb::JobCause::LaunchFailed, "算".repeat(1000));
        assert!(o.message.len() <= MAX_OUTCOME_MESSAGE);
        assert!(o.message.chars().all(|c| c == '算'));
    }

    #[test]
    fn leases_are_named_like_their_bills() {
        let id = LeaseId {
            request: 12,
            lease: 2,
        };
        assert_eq!(id.to_string(), "r12#2");
        let job = Job {
            id,
            tenant: "acme".into(),
            workload: pb::Workload::default(),
            nodes: Vec::new(),
            num_nodes: 3,
            start_unix_ms: 0,
            end_unix_ms: 1,
        };
        let env = job.suanli_env(1);
        assert!(env.contains(&("SUANLI_LEASE".into(), "r12#2".into())));
        assert!(env.contains(&("SUANLI_NUM_NODES".into(), "3".into())));
        assert_eq!(job.stop_grace(), Duration::from_secs(10));
    }
}
