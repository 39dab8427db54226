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
    /// The job failed, or it could not meet its deadline.
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
