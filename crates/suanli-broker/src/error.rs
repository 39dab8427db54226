//! The one place where errors become gRPC statuses.

use suanli_core::CoreError;
use tonic::{Code, Status};

/// What can go wrong in the broker.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The engine rejected a command.
    #[error(transparent)]
    Core(#[from] CoreError),
    /// A field of a call is invalid.
    #[error("field {field}: {reason}")]
    InvalidArgument {
        /// The field, e.g. `spec.shape`.
        field: String,
        /// What is wrong.
        reason: String,
    },
    /// The caller's token is missing or unknown.
    #[error("{0}")]
    Unauthenticated(String),
    /// The caller may not do this.
    #[error("{0}")]
    PermissionDenied(String),
    /// The thing asked for does not exist (or belongs to someone else).
    #[error("{0}")]
    NotFound(String),
    /// The thing to create exists already.
    #[error("{0}")]
    AlreadyExists(String),
    /// The thing is in a state that does not allow the call.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A tenant is over its rate (see [`crate::admission`]).
    #[error(
        "tenant {tenant} is over its rate of {rate} calls a second: retry in {retry_after_ms} ms"
    )]
    RateLimited {
        /// The tenant.
        tenant: String,
        /// Its rate.
        rate: f64,
        /// When a call will pass again.
        retry_after_ms: u64,
    },
    /// Too many requests wait, of the tenant or in all (see `max_waiting_per_tenant`).
    #[error("{0}")]
    QueueFull(String),
    /// The broker is past what it can serve (the reason says where): the call is refused at
    /// once rather than queued.
    #[error("the broker is overloaded ({0}): retry later")]
    Overloaded(&'static str),
    /// The broker is stopping or its writer has failed.
    #[error("the broker is unavailable: {0}")]
    Unavailable(String),
    /// This replica does not lead its group: the caller should go to the leader.
    #[error("{}", match leader {
        Some(addr) => format!("this broker is a follower: the leader is at {addr}"),
        None => "this broker is a follower and no leader is known yet: retry shortly".into(),
    })]
    NotLeader {
        /// Where the leader is, when known.
        leader: Option<String>,
    },
    /// The command log could not be written: nothing of the call took effect. Mutations are
    /// refused until it can be again; reads go on.
    #[error(
        "{}: the command log cannot be written ({reason}); nothing of this call took effect. \
         Reads go on, and calls are taken again once the log can be written",
        if *full { "the broker's disk is full" } else { "the broker's store failed" }
    )]
    LogUnwritable {
        /// What the store said.
        reason: String,
        /// The disk (or its quota) is full.
        full: bool,
    },
    /// The durable store failed.
    #[error("store: {0}")]
    Store(String),
    /// Configuration or start-up failed.
    #[error("{0}")]
    Config(String),
}

impl BrokerError {
    /// An invalid field of a call.
    pub fn field(field: impl Into<String>, reason: impl Into<String>) -> Self {
        BrokerError::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

impl From<BrokerError> for Status {
    fn from(e: BrokerError) -> Status {
        let code = match &e {
            BrokerError::Core(c) => match c {
                CoreError::InvalidPool(_)
                | CoreError::InvalidTenant { .. }
                | CoreError::InvalidSubsidy { .. }
                | CoreError::InvalidRequest { .. } => Code::InvalidArgument,
                CoreError::DuplicatePool { .. } => Code::AlreadyExists,
                CoreError::UnknownPool { .. }
                | CoreError::UnknownNode { .. }
                | CoreError::UnknownTenant { .. }
                | CoreError::UnknownRequest { .. } => Code::NotFound,
                CoreError::PoolState { .. }
                | CoreError::InvalidTransition { .. }
                | CoreError::ExceedsQuota { .. }
                | CoreError::Unsatisfiable { .. } => Code::FailedPrecondition,
            },
            BrokerError::InvalidArgument { .. } => Code::InvalidArgument,
            BrokerError::Unauthenticated(_) => Code::Unauthenticated,
            BrokerError::PermissionDenied(_) => Code::PermissionDenied,
            BrokerError::NotFound(_) => Code::NotFound,
            BrokerError::AlreadyExists(_) => Code::AlreadyExists,
            BrokerError::FailedPrecondition(_) => Code::FailedPrecondition,
            BrokerError::Overloaded(_)
            | BrokerError::RateLimited { .. }
            | BrokerError::QueueFull(_) => Code::ResourceExhausted,
            // gRPC's own meaning: "perhaps the entire file system is out of space".
            BrokerError::LogUnwritable { full: true, .. } => Code::ResourceExhausted,
            BrokerError::Unavailable(_)
            | BrokerError::NotLeader { .. }
            | BrokerError::LogUnwritable { full: false, .. } => Code::Unavailable,
            BrokerError::Store(_) | BrokerError::Config(_) => Code::Internal,
        };
        let mut status = Status::new(code, e.to_string());
        if let BrokerError::NotLeader {
            leader: Some(addr), ..
        } = &e
            && let Ok(value) = addr.parse()
        {
            status
                .metadata_mut()
                .insert(crate::ha::LEADER_METADATA, value);
        }
        if let BrokerError::RateLimited { retry_after_ms, .. } = &e {
            status
                .metadata_mut()
                .insert(PUSHBACK_METADATA, (*retry_after_ms).into());
        }
        status
    }
}

pub use suanli_proto::failover::PUSHBACK_METADATA;
