//! The typed errors of the simulator: a bad trace row names its line and column, a bad fleet or
//! option names what is wrong, and nothing panics on bad input.

use suanli_core::{CoreError, FleetError};

/// A row of a CSV trace that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}, column {column}: {reason}")]
pub struct RowError {
    /// 1-based line number in the file (the header is line 1).
    pub line: usize,
    /// The column's name from the header (or its position when the row is too long).
    pub column: String,
    /// What is wrong.
    pub reason: String,
}

/// Why a simulation could not be set up or run.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// A trace row is invalid.
    #[error("trace {trace}: {error}")]
    Row {
        /// The trace's name or path.
        trace: String,
        /// The row and column at fault.
        error: RowError,
    },
    /// The trace file as a whole is unusable (no header, a missing column, no jobs).
    #[error("trace {trace}: {reason}")]
    Trace {
        /// The trace's name or path.
        trace: String,
        /// What is wrong.
        reason: String,
    },
    /// The fleet file is invalid.
    #[error("fleet {fleet}: {source}")]
    Fleet {
        /// The fleet's name or path.
        fleet: String,
        /// What the fleet loader said.
        source: FleetError,
    },
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// An option is out of range.
    #[error("option {option}: {reason}")]
    Option {
        /// The option's name, e.g. `load_factor`.
        option: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The run's accounts could not be kept (an amount overflowed).
    #[error("accounts: {0}")]
    Billing(#[from] suanli_billing::BillingError),
    /// The engine refused the setup (a pool or tenant of the fleet).
    #[error("engine setup: {0}")]
    Engine(#[from] CoreError),
}

impl SimError {
    pub(crate) fn option(option: &'static str, reason: impl Into<String>) -> Self {
        SimError::Option {
            option,
            reason: reason.into(),
        }
    }
}
