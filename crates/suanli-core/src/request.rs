//! What tenants ask for and how a request lives: shapes, priority classes, constraints, the
//! lease lifecycle, and why a request waits.

use crate::placement::Policy;
use crate::units::{Millis, Tflops};

/// An AI company using the platform.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct TenantSpec {
    /// Unique tenant name.
    pub name: String,
    /// Nominal quota: the capacity the tenant is entitled to, in TFLOPS.
    pub quota_tflops: Tflops,
    /// How far beyond its quota the tenant may borrow idle capacity; `None` = no limit.
    /// Borrowed capacity is reclaimed (preempted) when a tenant within its quota needs it.
    pub borrow_limit_tflops: Option<Tflops>,
    /// Fair-share weight, at least 1: a tenant of weight 2 gets twice the share of weight 1.
    pub weight: u32,
}

/// Priority class: the first key of the queue.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub enum Priority {
    /// Must start as soon as possible; may preempt spot and reclaim borrowed capacity.
    Critical,
    /// Ordinary work; may preempt spot and reclaim borrowed capacity.
    Standard,
    /// Cheap, preemptible work.
    Spot,
}

impl Priority {
    /// All classes, most important first.
    pub const ALL: [Priority; 3] = [Priority::Critical, Priority::Standard, Priority::Spot];

    /// 0 for critical, 1 for standard, 2 for spot.
    pub fn rank(self) -> usize {
        self as usize
    }

    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Critical => "critical",
            Priority::Standard => "standard",
            Priority::Spot => "spot",
        }
    }
}

/// The shape of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Shape {
    /// `nodes` nodes with `devices_per_node` free devices each, of one model, in one node group of
    /// one pool: all or nothing (training).
    Gang {
        /// Number of nodes, at least 1.
        nodes: u32,
        /// Devices needed on each node, at least 1.
        devices_per_node: u16,
    },
    /// An amount of compute that may be split across pools and models in chunks of at least
    /// `min_chunk_tflops` (inference, batch). Every chunk is at least
    /// `min(min_chunk_tflops, what is still missing)`; the last device may overshoot the amount.
    Elastic {
        /// Total compute wanted.
        tflops: Tflops,
        /// Smallest piece worth placing in one node group.
        min_chunk_tflops: Tflops,
    },
}

/// Where a request may run. Empty lists mean "any".
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Constraints {
    /// Allowed accelerator models (catalogue ids).
    pub models: Vec<String>,
    /// Allowed regions.
    pub regions: Vec<String>,
    /// Allowed pools (ids).
    pub pools: Vec<String>,
    /// Largest acceptable round trip from the district.
    pub max_rtt_ms: Option<u32>,
    /// Required data zone, e.g. `hetao`.
    pub data_zone: Option<String>,
    /// Highest acceptable price per device-hour, in fen.
    pub max_price_fen_per_device_hour: Option<u64>,
}

/// A request as submitted by a tenant.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct RequestSpec {
    /// The tenant's name.
    pub tenant: String,
    /// Gang or elastic.
    pub shape: Shape,
    /// Estimated run time; the lease ends (expires) after it.
    pub duration_ms: Millis,
    /// Priority class.
    pub priority: Priority,
    /// Where it may run.
    pub constraints: Constraints,
    /// Placement policy for this request; `None` uses the engine's default.
    pub policy: Option<Policy>,
    /// Do not start before this time (a reservation).
    pub start_after_ms: Option<Millis>,
    /// Must finish by this time; a request that can no longer make it fails.
    pub deadline_ms: Option<Millis>,
    /// Go back to the queue when preempted or when the pool is lost, instead of ending.
    pub requeue: bool,
    /// What runs on the lease; `None` for a capacity lease. The engine reads only its
    /// [`Workload::runtime`]: the request goes only to pools that run that kind.
    #[serde(default)]
    pub workload: Option<Box<Workload>>,
}

/// What a request runs on its lease, once per node. The engine keeps it as data: it decides
/// only where it may go (see [`Workload::runtime`]); the pool's agent runs it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Workload {
    /// The program and its arguments (exec form).
    pub argv: Vec<String>,
    /// Environment variables, in the order given.
    pub env: Vec<(String, String)>,
    /// Working directory on the nodes; `None` for the agent's default.
    pub working_dir: Option<String>,
    /// Container image; `None` runs the command directly.
    pub image: Option<String>,
    /// Seconds between the polite stop and the kill; 0 for the agent's default.
    pub stop_grace_s: u32,
}

impl Workload {
    /// The kind of pool that can run it.
    pub fn runtime(&self) -> Runtime {
        if self.image.is_some() {
            Runtime::Container
        } else {
            Runtime::Command
        }
    }
}

/// A kind of workload a pool's agent runs.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub enum Runtime {
    /// A command run as processes or as a batch job of the pool's resource manager.
    Command,
    /// A container image.
    Container,
}

impl Runtime {
    /// Its bit in [`Runtimes`].
    pub fn bit(self) -> Runtimes {
        Runtimes(1 << self as u8)
    }
}

/// A set of [`Runtime`]s: what a pool's agent runs. Empty for a pool whose leases run nothing
/// (simulated execution, or no agent).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct Runtimes(pub u8);

impl Runtimes {
    /// No runtime.
    pub const NONE: Runtimes = Runtimes(0);

    /// The set of these runtimes.
    pub fn of(runtimes: impl IntoIterator<Item = Runtime>) -> Runtimes {
        Runtimes(runtimes.into_iter().fold(0, |acc, r| acc | r.bit().0))
    }

    /// Whether every runtime of `needed` is in the set.
    pub fn covers(self, needed: Runtimes) -> bool {
        self.0 & needed.0 == needed.0
    }
}

/// How a job ended on the pool, in one vocabulary whatever ran it.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub enum JobCause {
    /// Every node's copy exited 0.
    Completed,
    /// A copy exited non-zero or was killed by a signal.
    Failed,
    /// The pool's resource manager cancelled it.
    Cancelled,
    /// It ran past its time limit on the pool.
    TimedOut,
    /// A node it ran on failed.
    NodeFailed,
    /// The pool's resource manager preempted it.
    Preempted,
    /// It could not be started (a missing executable, a refusal by the resource manager).
    LaunchFailed,
}

impl JobCause {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            JobCause::Completed => "completed",
            JobCause::Failed => "failed",
            JobCause::Cancelled => "cancelled",
            JobCause::TimedOut => "timed_out",
            JobCause::NodeFailed => "node_failed",
            JobCause::Preempted => "preempted",
            JobCause::LaunchFailed => "launch_failed",
        }
    }
}

/// How a lease's job ended, as its pool reported it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct JobOutcome {
    /// The cause: the request completes only on [`JobCause::Completed`].
    pub cause: JobCause,
    /// The first non-zero exit code among the nodes (0 when all exited 0), if a copy exited.
    pub exit_code: Option<i32>,
    /// The signal that killed a copy, if one did.
    pub signal: Option<i32>,
    /// Node rank of the copy the code or signal is from.
    pub node_rank: u32,
    /// What the pool said, for people.
    pub message: String,
}

impl JobOutcome {
    /// A job that ended with `cause` and nothing more to say: what a simulated pool reports.
    pub fn bare(cause: JobCause) -> Self {
        JobOutcome {
            cause,
            exit_code: None,
            signal: None,
            node_rank: 0,
            message: String::new(),
        }
    }
}

/// Where a request is in its life.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub enum RequestState {
    /// Waiting for capacity (or its start time, or quota).
    Queued,
    /// Capacity is allocated; the pool has not yet confirmed the start.
    Placed,
    /// The pool confirmed the start.
    Running,
    /// Finished: released by the tenant, reported done by the pool, or its time ran out.
    Completed,
    /// The job failed (or was still running when its time ran out), or it could not meet
    /// its deadline.
    Failed,
    /// Cancelled by the tenant.
    Cancelled,
    /// Preempted and not requeued.
    Preempted,
    /// Its pool was lost and it was not requeued.
    Lost,
}

impl RequestState {
    /// Whether the request holds capacity.
    pub fn is_live_lease(self) -> bool {
        matches!(self, RequestState::Placed | RequestState::Running)
    }

    /// Whether no further transition can happen.
    pub fn is_final(self) -> bool {
        !matches!(
            self,
            RequestState::Queued | RequestState::Placed | RequestState::Running
        )
    }

    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            RequestState::Queued => "queued",
            RequestState::Placed => "placed",
            RequestState::Running => "running",
            RequestState::Completed => "completed",
            RequestState::Failed => "failed",
            RequestState::Cancelled => "cancelled",
            RequestState::Preempted => "preempted",
            RequestState::Lost => "lost",
        }
    }
}

/// Why a queued request is not running.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub enum WaitReason {
    /// Not yet looked at by a scheduling pass.
    Pending,
    /// Its start-after time has not come.
    NotYetStartable,
    /// No pool in the fleet can ever satisfy its constraints and shape.
    NoMatchingPool,
    /// Placing it now would take its tenant beyond quota plus borrowing limit.
    Quota,
    /// Matching pools exist but are busy (or draining, or lost).
    CapacityBusy,
    /// It would fit, but only by delaying the reserved head of the queue (backfill refused).
    BehindReservation,
    /// Pools match its shape and constraints, but none runs its kind of workload.
    WorkloadUnsupported,
}

impl WaitReason {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            WaitReason::Pending => "pending",
            WaitReason::NotYetStartable => "not_yet_startable",
            WaitReason::NoMatchingPool => "no_matching_pool",
            WaitReason::Quota => "quota",
            WaitReason::CapacityBusy => "capacity_busy",
            WaitReason::BehindReservation => "behind_reservation",
            WaitReason::WorkloadUnsupported => "workload_unsupported",
        }
    }
}

/// Why a request reached a final state (or went back to the queue).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub enum EndReason {
    /// The tenant released it.
    Released,
    /// Its duration ran out.
    Expired,
    /// The pool reported it finished.
    Finished,
    /// The pool reported it failed.
    JobFailed,
    /// The tenant cancelled it.
    Cancelled,
    /// It could no longer finish before its deadline.
    DeadlineMissed,
    /// Preempted for more important work or reclaimed quota.
    Preempted,
    /// Its pool was lost.
    PoolLost,
    /// A node it ran on went out of service.
    NodeLost,
}
