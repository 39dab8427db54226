//! The capacity-planning simulator of suanli: the allocation engine of `suanli-core`, the very
//! one the broker runs, driven on a virtual clock by traces and a synthetic workload.
//!
//! It never decides anything itself: it only chooses when to apply which command (arrivals,
//! lease confirmations, ticks at lease ends, pool failures) and records the engine's events.
//! Runs are deterministic for a seed: no clock, no hash-order iteration in any output.
//!
//! # Layout
//! - [`job`]: jobs, and the rule that turns them into engine requests (reference device size
//!   for jobs naming no model, load and size factors).
//! - [`trace`]: the generic CSV trace, with errors naming line and column.
//! - [`philly`]: the committed Philly trace and its mapping to P.
//! - [`synthetic`]: the seeded generator fitted to Philly.
//! - [`workload`]: workloads and fleets by name.
//! - [`driver`]: applies commands, confirms leases, keeps lease ends in a heap; [`replay`].
//! - [`run`]: the discrete-event loop.
//! - [`metrics`] and [`fragmentation`]: what a run measures, and how.
//! - [`layout`]: array indexes over the fleet for the metrics.
//! - [`compare`] and [`svg`]: the capacity-planning grid, its Markdown report and charts.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod compare;
pub mod driver;
pub mod error;
pub mod fragmentation;
pub mod job;
pub mod layout;
pub mod metrics;
pub mod philly;
pub mod run;
pub mod svg;
pub mod synthetic;
pub mod trace;
pub mod workload;

pub use driver::{Finished, replay};
pub use error::{RowError, SimError};
pub use job::{Job, JobShape, RequestRule};
pub use metrics::{Series, Summary};
pub use run::{Failures, SimConfig, simulate};
pub use synthetic::{Arrivals, SyntheticConfig};
pub use workload::{Workload, fleet_by_name};
