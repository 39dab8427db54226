//! A pool's agent: the pool's hands. It registers the pool, keeps the `ConnectAgent` stream to
//! the broker open, and runs the leases the broker starts through a [`Backend`]: simulated
//! (`sim`), child processes on one machine (`process`) or a Slurm cluster (`slurm`). It reports
//! how each job ended, keeps every report until the broker acknowledges it, and serves the jobs'
//! output, which stays on the pool, when a tenant asks for it.
//!
//! - [`backend`]: the trait between the agent and a resource manager, and the job it starts.
//! - [`sim`], [`process`], [`slurm`]: the backends; [`exec`] is the node wrapper of `process`.
//! - [`runner`]: what the agent does with the broker's messages, the same for every backend.
//! - [`logs`]: reading a node's output for the broker.

pub mod backend;
pub mod exec;
pub mod logs;
pub mod process;
pub mod runner;
pub mod sim;
pub mod slurm;

pub use backend::{Backend, BackendError, Job, LeaseId, LogFiles, NodeSlot};
pub use runner::Runner;
