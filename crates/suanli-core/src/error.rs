//! The typed errors of the engine. A command that cannot be carried out changes nothing and
//! yields one [`Event::Rejected`](crate::Event::Rejected) carrying one of these; nothing panics.

use crate::fleet::FleetError;
use crate::units::{RequestId, Tflops};

/// Why a command was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CoreError {
    /// A pool specification is invalid (the error names the pool and the field).
    #[error(transparent)]
    InvalidPool(#[from] FleetError),
    /// A pool with this id is already registered.
    #[error("pool {pool}: already registered")]
    DuplicatePool {
        /// The pool id.
        pool: String,
    },
    /// No pool has this id.
    #[error("unknown pool {pool:?}")]
    UnknownPool {
        /// The pool id.
        pool: String,
    },
    /// The pool's current health does not allow the action.
    #[error("pool {pool} is {health}: cannot {action}")]
    PoolState {
        /// The pool id.
        pool: String,
        /// Its health.
        health: &'static str,
        /// What was asked.
        action: &'static str,
    },
    /// The pool has no such node group or node.
    #[error("pool {pool}: no node {node} in node group {group}")]
    UnknownNode {
        /// The pool id.
        pool: String,
        /// Index of the node group in the pool.
        group: u32,
        /// Index of the node in the group.
        node: u32,
    },
    /// No tenant has this name.
    #[error("unknown tenant {tenant:?}")]
    UnknownTenant {
        /// The tenant name.
        tenant: String,
    },
    /// A tenant specification is invalid.
    #[error("tenant {tenant:?}: field {field}: {reason}")]
    InvalidTenant {
        /// The tenant name.
        tenant: String,
        /// The offending field.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A tenant's subsidies are invalid.
    #[error("tenant {tenant}: field {field}: {reason}")]
    InvalidSubsidy {
        /// The tenant name.
        tenant: String,
        /// The offending field, e.g. `subsidy[1].rate_bp`.
        field: String,
        /// What is wrong.
        reason: String,
    },
    /// A request specification is invalid.
    #[error("request field {field}: {reason}")]
    InvalidRequest {
        /// The offending field, e.g. `constraints.models[1]`.
        field: String,
        /// What is wrong.
        reason: String,
    },
    /// The request can never fit in its tenant's quota plus borrowing limit.
    #[error("request needs at least {need} TFLOPS but tenant {tenant:?} may hold at most {limit}")]
    ExceedsQuota {
        /// The tenant name.
        tenant: String,
        /// Smallest TFLOPS the request can take.
        need: Tflops,
        /// Quota plus borrowing limit.
        limit: Tflops,
    },
    /// No registered pool could ever hold the request, even with the whole fleet free.
    #[error("no registered pool could ever hold this request: {reason}")]
    Unsatisfiable {
        /// Why, e.g. `no node group of h100 has 1000000 nodes of 8 devices; the largest has
        /// 64; the fleet holds 20,983P`.
        reason: String,
    },
    /// No live request has this id (it never existed or has ended).
    #[error("unknown request {request}")]
    UnknownRequest {
        /// The request id.
        request: RequestId,
    },
    /// The request's state does not allow the action.
    #[error("request {request} is {state}: cannot {action}")]
    InvalidTransition {
        /// The request id.
        request: RequestId,
        /// Its state.
        state: &'static str,
        /// What was asked.
        action: &'static str,
    },
}

impl CoreError {
    pub(crate) fn field(field: impl Into<String>, reason: impl Into<String>) -> Self {
        CoreError::InvalidRequest {
            field: field.into(),
            reason: reason.into(),
        }
    }
}
