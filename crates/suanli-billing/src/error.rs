//! The typed errors of the accounting core. Each names what was wrong and with which value, so
//! the broker can map it to a gRPC status that tells the caller what to fix.

use suanli_core::Millis;

use crate::budget::BudgetPeriod;
use crate::charge::LeaseId;
use crate::money::Fen;
use crate::voucher::VoucherId;

/// Why an accounting operation was refused. A refused operation changes nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BillingError {
    /// An amount did not fit in 64-bit fen (or an intermediate product did not fit in 128 bits).
    #[error("amount overflow in {what}")]
    Overflow {
        /// What was being computed.
        what: &'static str,
    },
    /// A required name (tenant, pool, lease, voucher, model, reason) is empty.
    #[error("field {field} must not be empty")]
    EmptyField {
        /// The field.
        field: &'static str,
    },
    /// An amount that must be above zero is zero or negative.
    #[error("field {field} must be above zero, got {value}")]
    NotPositive {
        /// The field, e.g. `face_value`.
        field: &'static str,
        /// The value given.
        value: Fen,
    },
    /// An amount that must not be zero is zero.
    #[error("field {field} must not be zero")]
    Zero {
        /// The field, e.g. `amount` of an adjustment.
        field: &'static str,
    },
    /// An amount that must not be negative is negative.
    #[error("field {field} must not be negative, got {value}")]
    Negative {
        /// The field, e.g. `price_per_device_hour`.
        field: &'static str,
        /// The value given.
        value: Fen,
    },
    /// A voucher's subsidy rate is zero or above 100% (10000 basis points).
    #[error("voucher {voucher}: subsidy rate {rate_bp} bp is outside 1..=10000 (0.01% to 100%)")]
    RateOutOfRange {
        /// The voucher.
        voucher: VoucherId,
        /// The rate given, in basis points.
        rate_bp: u32,
    },
    /// A voucher's validity period ends at or before it starts.
    #[error("voucher {voucher}: validity ends at {until} ms, not after its start at {from} ms")]
    ValidityEndsBeforeStart {
        /// The voucher.
        voucher: VoucherId,
        /// Start of validity, unix ms.
        from: Millis,
        /// End of validity (exclusive), unix ms.
        until: Millis,
    },
    /// A voucher scoped to listed pools or pool kinds lists none.
    #[error("voucher {voucher}: scope lists no pool and no pool kind")]
    EmptyScope {
        /// The voucher.
        voucher: VoucherId,
    },
    /// A voucher with this id was already issued.
    #[error("voucher {voucher} already exists")]
    DuplicateVoucher {
        /// The voucher.
        voucher: VoucherId,
    },
    /// No voucher has this id.
    #[error("unknown voucher {voucher}")]
    UnknownVoucher {
        /// The voucher.
        voucher: VoucherId,
    },
    /// The voucher belongs to another tenant.
    #[error("voucher {voucher} belongs to tenant {owner}, not to {tenant}")]
    VoucherOfOtherTenant {
        /// The voucher.
        voucher: VoucherId,
        /// Its tenant.
        owner: String,
        /// The tenant that asked.
        tenant: String,
    },
    /// A lease ends before it starts.
    #[error("lease {lease}: ends at {ended_at} ms, before it started at {started_at} ms")]
    LeaseEndsBeforeStart {
        /// The lease.
        lease: LeaseId,
        /// When it started, unix ms.
        started_at: Millis,
        /// When it ended, unix ms.
        ended_at: Millis,
    },
    /// A lease has no parts (no pool, no devices).
    #[error("lease {lease}: has no parts")]
    LeaseWithoutParts {
        /// The lease.
        lease: LeaseId,
    },
    /// A part of a lease is invalid.
    #[error("lease {lease}: part {part}: {reason}")]
    InvalidLeasePart {
        /// The lease.
        lease: LeaseId,
        /// Index of the part.
        part: usize,
        /// What is wrong.
        reason: String,
    },
    /// The lease was settled before with different usage. A retry with the same usage returns
    /// the existing settlement; different usage means one of the two is wrong.
    #[error("lease {lease} was already settled with different usage")]
    ConflictingSettlement {
        /// The lease.
        lease: LeaseId,
    },
    /// The lease ended in a month the ledger has closed by compaction: whether it was settled
    /// before is forgotten, so settling it now could charge it twice.
    #[error(
        "lease {lease} ended in {month}, a closed month (the ledger was compacted before {closed_before}); it cannot be settled any more"
    )]
    LeaseInClosedMonth {
        /// The lease.
        lease: LeaseId,
        /// The month in which it ended.
        month: crate::month::Month,
        /// Months before this one are closed.
        closed_before: crate::month::Month,
    },
    /// The lease is already settled, so it can no longer be held against a budget.
    #[error("lease {lease} is already settled")]
    AlreadySettled {
        /// The lease.
        lease: LeaseId,
    },
    /// The lease already has a budget hold.
    #[error("lease {lease} already has a budget hold")]
    DuplicateHold {
        /// The lease.
        lease: LeaseId,
    },
    /// The lease has no budget hold to release.
    #[error("lease {lease} has no budget hold")]
    UnknownHold {
        /// The lease.
        lease: LeaseId,
    },
    /// The tenant's budget would be broken by the estimated cost.
    #[error(
        "tenant {tenant}: {period} budget of {limit} would be exceeded: {committed} already committed, {requested} requested"
    )]
    BudgetExceeded {
        /// The tenant.
        tenant: String,
        /// Which budget: monthly (with the month) or total.
        period: BudgetPeriodLabel,
        /// The budget's limit.
        limit: Fen,
        /// What the tenant has already spent or holds in the budget's period.
        committed: Fen,
        /// The estimated cost that was checked.
        requested: Fen,
    },
    /// Text that should be a month `YYYY-MM` is not one.
    #[error("invalid month {text:?}, expected YYYY-MM")]
    InvalidMonth {
        /// The text given.
        text: String,
    },
    /// A report asked for more months than it may cover.
    #[error("report from {first} to {last} spans more than {max_months} months")]
    ReportTooLong {
        /// First month asked for.
        first: crate::month::Month,
        /// Last month asked for.
        last: crate::month::Month,
        /// The most months a report covers.
        max_months: i64,
    },
    /// Entries given to replay are not a ledger this crate wrote: a gap in sequence numbers,
    /// a debit of an unknown voucher, a settlement cut short.
    #[error("ledger entry {seq}: {reason}")]
    CorruptLedger {
        /// Sequence number of the offending entry (or the next expected one).
        seq: u64,
        /// What is inconsistent.
        reason: String,
    },
}

/// The budget named in [`BillingError::BudgetExceeded`]: its period and, for a monthly budget,
/// which month.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BudgetPeriodLabel {
    /// Monthly or total.
    pub period: BudgetPeriod,
    /// The month checked, for a monthly budget.
    pub month: Option<crate::month::Month>,
}

impl std::fmt::Display for BudgetPeriodLabel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.month {
            Some(month) => write!(f, "monthly ({month})"),
            None => write!(f, "total"),
        }
    }
}
