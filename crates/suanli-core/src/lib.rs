//! The deterministic allocation engine of suanli.
//!
//! Every decision about where compute goes is made here and nowhere else: capacity down to the
//! node, placement, queueing, weighted fair share, quotas with borrowing, backfill, preemption and
//! the lease lifecycle. The broker and the simulator are shells that feed [`Engine::apply`] commands
//! stamped with `now`; the engine does no I/O, reads no clock, starts no thread and draws no random
//! number, and never iterates in hash order, so the same commands always give the same state, the
//! same events and the same [`Engine::digest`].
//!
//! An engine serialises with serde (snapshots): one read back rebuilds its placement index and
//! from then on decides exactly as the engine that was saved (a property test holds it to that).
//!
//! # Layout
//! - [`units`]: integer units (TFLOPS, milliseconds, fen) and the id newtypes.
//! - [`catalogue`]: accelerator models as data (`deploy/catalogue.toml` compiled in).
//! - [`fleet`]: pools and node groups as data, their validation and the built-in Futian fleets.
//! - [`request`]: what a tenant asks for (shape, priority, constraints) and the lease lifecycle.
//! - `capacity`: free devices per node of one node group, bucketed by free count.
//! - `index`: per-model orderings of node groups with capacity aggregates, so placement does not
//!   scan the fleet.
//! - `placement`: the placement policies (cheapest, cheapest after subsidy, lowest latency,
//!   best fit).
//! - [`subsidy`]: tenants' compute vouchers as placement sees them (rates and scopes).
//! - `queue`: the waiting queue ordered by priority class, weighted fair share and FIFO.
//! - [`engine`]: the state machine: commands in, events out; scheduling, backfill, preemption.
//! - [`query`]: read-only views: utilisation, tenant usage, why a request waits.
//! - [`error`]: the typed errors every rejected command carries.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod catalogue;
pub mod engine;
pub mod error;
pub mod fleet;
pub mod query;
pub mod request;
pub mod subsidy;
pub mod units;

mod audit;
mod capacity;
mod digest;
mod index;
mod placement;
mod queue;
#[cfg(test)]
mod testkit;

pub use audit::AuditError;
pub use capacity::Slice;
pub use catalogue::{AcceleratorModel, Catalogue};
pub use engine::{
    Command, Engine, EngineBeforeIncremental, EngineConfig, Event, PASS_SLICE, PassCounts, Quote,
    QuotePart, QuotePlacement,
};
pub use error::CoreError;
pub use fleet::{Fleet, FleetError, GroupSpec, PoolKind, PoolSpec};
pub use placement::{Policy, PoolHealth};
pub use request::{
    Constraints, EndReason, JobCause, JobOutcome, Priority, RequestSpec, RequestState, Runtime,
    Runtimes, Shape, TenantSpec, WaitReason, Workload,
};
pub use subsidy::{Subsidy, SubsidyPools};
pub use units::{Fen, Millis, ModelIx, RequestId, TFLOPS_PER_P, Tflops};
