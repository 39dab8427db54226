//! The capacity-planning simulator of suanli: the allocation engine of `suanli-core`, the very
//! one the broker runs, driven on a virtual clock by traces and a synthetic workload.
//!
//! It never decides anything itself: it only chooses when to apply which command (arrivals,
//! lease confirmations, ticks at lease ends, pool failures) and records the engine's events.
//! Runs are deterministic for a seed: no clock, no hash-order iteration in any output.
//!
//! # Cost and subsidy
//! Every run reports what its leases cost and, under a subsidy policy, what compute vouchers
//! (算力券) paid of it: what the policy costs the district at that demand. A policy
//! ([`SubsidyPolicy`], [`SimConfig::subsidy`]; `suanli sim --subsidy RATE[@SCOPE]`) gives
//! every tenant of the workload one voucher when the run starts, valid for the whole run:
//! - **rate**: the share of each bill it pays, `50%` or `0.5`;
//! - **scope**: `all` pools (the default), `local` (the municipal local centre and clouds), or
//!   pool kinds joined by `+` or `,` (`local_centre`, `local_cloud`, `external`);
//! - **face value** per tenant (`--subsidy-per-tenant YUAN`), unlimited when not given;
//! - **cap per lease** (`--subsidy-cap-per-lease YUAN`), none when not given.
//!
//! Leases are charged and vouchers pay by the rules of `suanli-billing` (see [`accounts`]):
//! the summary has `cost_yuan`, `subsidy_yuan`, `tenant_paid_yuan` (and the same in exact
//! fen), `subsidy_by_pool_kind`, `subsidy_share` (the share of the cost the district paid)
//! and `vouchers_exhausted`. Without a policy the subsidy is 0 and the cost is still reported.
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
//! - [`accounts`]: the run's ledger (`suanli-billing`): what leases cost and what a subsidy
//!   policy's compute vouchers pay.
//! - [`layout`]: array indexes over the fleet for the metrics.
//! - [`compare`] and [`svg`]: the capacity-planning grid, its Markdown report and charts.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod accounts;
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

pub use accounts::SubsidyPolicy;
pub use driver::{Finished, replay};
pub use error::{RowError, SimError};
pub use job::{Job, JobShape, RequestRule};
pub use metrics::{Series, Steadiness, Summary};
pub use run::{Failures, SimConfig, simulate};
pub use synthetic::{Arrivals, SyntheticConfig};
pub use workload::{Workload, fleet_by_name};
