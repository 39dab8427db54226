//! The accounting core of suanli: what compute costs, what compute vouchers (算力券) pay, what
//! tenants owe, and the ledger that records it exactly once.
//!
//! Like `suanli-core`, this crate does no I/O, reads no clock, starts no thread and draws no
//! random number: every operation that records something takes `now` from the caller, and the
//! same operations in the same order give the same ledger. The broker keeps the ledger's
//! entries in its durable log and the simulator runs the same code to report what a subsidy
//! policy costs.
//!
//! # The rules
//! - **Money** is an integer number of fen ([`Fen`], 0.01 CNY), never a float. Sums are checked:
//!   an overflow is an error, never a panic or a wrapped value.
//! - **Charges**: per part of a lease (one pool and model), the running time
//!   `ended_at - started_at` is rounded **up** to the pool's billing increment if it has one
//!   (a lease that never ran pays nothing), then devices x price per device-hour (fixed at
//!   placement) x billed ms / 3 600 000 is rounded to the fen **half up**, exactly in `u128`.
//!   The lease's charge is the sum of its parts.
//! - **Vouchers** pay for leases of their own tenant, on the parts in their scope (all pools,
//!   listed pools, or pool kinds such as the local municipal pools), **oldest expiring first**
//!   (earliest `valid_until`, then order of issue). Each pays its rate of what the vouchers
//!   before it **left uncovered** (two 50% vouchers cover 75%), never beyond its remaining
//!   balance or its cap per lease. A voucher valid for only part of a lease's running time (it
//!   **expires or starts mid-lease**) covers that part **pro rata**: its share is further
//!   multiplied by (running ms inside its validity `[from, until)`) / (running ms). Each share
//!   is rounded **down** to the fen; the tenant pays the rest.
//! - **Settlement** of an ended lease appends its charge, the voucher debits and the tenant's
//!   amount due as one batch. It is idempotent by lease id: settling again with the same usage
//!   returns the existing settlement and appends nothing (with different usage it is an
//!   error). Vouchers pay with their balances at settlement; one issued later does not reach
//!   back. Throughout the ledger, charges = voucher debits + tenant dues.
//! - **The ledger** is its entries: every balance is derived from them by one function, it
//!   serialises as its entries and deserialising replays (and re-checks) them, so a snapshot,
//!   a log replay and the live ledger are equal.
//! - **Months** are calendar months in China Standard Time (UTC+8, no daylight saving). A lease
//!   belongs, whole, to the month in which it **ended**; an adjustment to the month it was
//!   made in.
//! - **Compaction** ([`Ledger::compact`]) folds the months before a given month into per tenant
//!   and month summaries and drops their settlements, so memory no longer grows with every
//!   lease; every statement, report and balance answers as before, and a lease that ended in a
//!   closed month can no longer be settled (see the [`ledger`] module docs).
//! - **Budgets** limit what a tenant pays itself (after subsidy), **per month** or **in total**
//!   (each budget says which): committed = amounts due of leases ended in the period +
//!   adjustments in it + holds on leases not yet settled; a new lease is refused when
//!   committed + its estimate exceeds the limit. The district's monthly subsidy budget is
//!   reported against, not enforced: vouchers already issued are honoured.
//!
//! # Layout
//! - [`money`]: [`Fen`] and exact rounding.
//! - [`month`]: China Standard Time months.
//! - [`charge`]: lease usage ([`LeaseUsage`], [`LeasePart`]) and its charge.
//! - [`voucher`]: vouchers, their scopes and how they share a charge ([`voucher::allocate`]).
//! - [`ledger`]: the append-only [`Ledger`]: settlement, quotes, adjustments, budgets, holds,
//!   replay.
//! - [`budget`]: tenant spending limits.
//! - [`statement`]: tenant statements, voucher balances, the operator's subsidy report, CSV.
//! - [`error`]: [`BillingError`], the one error type.
//!
//! # A worked example
//! ```
//! use suanli_billing::{Fen, LeaseId, LeasePart, LeaseUsage, Ledger, Month, VoucherId,
//!     VoucherScope, VoucherSpec};
//! use suanli_core::PoolKind;
//!
//! const HOUR: u64 = 3_600_000;
//! // 2025-03-01 00:00 China Standard Time.
//! let march: Month = "2025-03".parse().unwrap();
//! let t0 = march.starts_at_ms() as u64;
//!
//! let mut ledger = Ledger::new();
//! // The district gives acme ¥10 000 of vouchers paying 50% of its bills on local pools.
//! ledger.issue_voucher(VoucherSpec {
//!     id: VoucherId::new("FT-2025-0001"),
//!     tenant: "acme".into(),
//!     face_value: Fen::from_yuan(10_000).unwrap(),
//!     rate_bp: 5_000,
//!     per_lease_cap: None,
//!     scope: VoucherScope::local_pools(),
//!     valid_from: t0,
//!     valid_until: t0 + 90 * 24 * HOUR,
//! }, t0).unwrap();
//!
//! // acme runs 16 Ascend 910B for 10 h 20 min in the local centre at ¥12.00 per device-hour,
//! // billed per started hour: 11 hours.
//! let usage = LeaseUsage {
//!     lease: LeaseId::new("r1"),
//!     tenant: "acme".into(),
//!     started_at: t0 + HOUR,
//!     ended_at: t0 + 11 * HOUR + 20 * 60_000,
//!     parts: vec![LeasePart {
//!         pool: "futian-aicc".into(),
//!         pool_kind: PoolKind::LocalCentre,
//!         model: "ascend-910b".into(),
//!         devices: 16,
//!         tflops: 16 * 376,
//!         price_per_device_hour: Fen(1_200),
//!         billing_increment_ms: Some(HOUR),
//!     }],
//! };
//! // Before placing, the broker can quote it: ¥2112.00, half paid by the voucher.
//! let quote = ledger.quote(&usage).unwrap();
//! assert_eq!((quote.charge, quote.subsidy, quote.tenant_due), (Fen(211_200), Fen(105_600), Fen(105_600)));
//!
//! let outcome = ledger.settle(usage.clone(), usage.ended_at).unwrap();
//! assert!(outcome.newly_settled);
//! assert_eq!(outcome.settlement.bill.tenant_due.to_string(), "¥1056.00");
//! // Settling again (a retry after a crash) records nothing new.
//! let entries = ledger.entries().len();
//! assert!(!ledger.settle(usage, t0 + 12 * HOUR).unwrap().newly_settled);
//! assert_eq!(ledger.entries().len(), entries);
//!
//! let statement = ledger.tenant_statement("acme", march).unwrap();
//! assert_eq!(statement.payable, Fen(105_600));
//! assert_eq!(statement.vouchers[0].remaining.to_string(), "¥8944.00");
//! // 16 x 376 TFLOPS for 10 h 20 min = 62.165 P-hours.
//! assert_eq!(statement.lines[0].p_hours(), "62.165");
//! assert!(statement.usage_csv().contains("acme,2025-03,ascend-910b,local_centre,1,62.165,2112.00,1056.00,1056.00"));
//!
//! // The whole ledger rebuilds from its entries.
//! let replayed = Ledger::from_entries(ledger.entries().to_vec()).unwrap();
//! assert_eq!(replayed, ledger);
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod budget;
pub mod charge;
pub mod error;
pub mod ledger;
pub mod money;
pub mod month;
pub mod statement;
pub mod voucher;

#[cfg(test)]
mod proptests;

pub use budget::{Budget, BudgetPeriod};
pub use charge::{LeaseId, LeasePart, LeaseUsage, PartCharge, charge_lease};
pub use error::{BillingError, BudgetPeriodLabel};
pub use ledger::{
    Bill, Checkpoint, ClosedBooks, ClosedMonth, CompactOutcome, EntryKind, FoldedAdjustment, Hold,
    Ledger, LedgerEntry, LedgerImage, LedgerTotals, SettleOutcome, Settlement, TenantAccount,
};
pub use money::Fen;
pub use month::Month;
pub use statement::{
    AdjustmentLine, SubsidyMonth, SubsidyReport, TenantStatement, UsageLine, VoucherBalance,
    VoucherLine, voucher_balances_csv,
};
pub use voucher::{FULL_RATE_BP, Voucher, VoucherId, VoucherScope, VoucherShare, VoucherSpec};
