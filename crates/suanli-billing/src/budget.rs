//! Tenant spending limits.
//!
//! A budget limits what the tenant itself pays: amounts due after vouchers, plus adjustments,
//! plus holds on leases that run but are not settled yet (their estimated cost after subsidy).
//! Subsidy does not count: a voucher spends the district's money, not the tenant's.
//!
//! A monthly budget counts the China Standard Time month of the check: amounts due of leases
//! that ended in that month and adjustments made in it. A total budget counts everything since
//! the ledger began. Holds count against either whatever month they were placed in, because
//! they will be billed soon. A new lease is refused when `committed + estimate > limit`.
//!
//! Budgets are checked before a lease is placed, never at settlement: a lease that ran is
//! charged in full even if its actual cost takes the tenant past its limit (the next request
//! is then refused).

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::BillingError;
use crate::money::Fen;

/// The period a budget's limit applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BudgetPeriod {
    /// Each calendar month (China Standard Time) afresh.
    Monthly,
    /// Everything, ever.
    Total,
}

impl fmt::Display for BudgetPeriod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BudgetPeriod::Monthly => "monthly",
            BudgetPeriod::Total => "total",
        })
    }
}

/// A tenant's spending limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Budget {
    /// Most the tenant may commit in one period; zero refuses every lease that costs anything.
    pub limit: Fen,
    /// Monthly or total.
    pub period: BudgetPeriod,
}

impl Budget {
    /// A monthly budget.
    pub fn monthly(limit: Fen) -> Budget {
        Budget {
            limit,
            period: BudgetPeriod::Monthly,
        }
    }

    /// A budget over all time.
    pub fn total(limit: Fen) -> Budget {
        Budget {
            limit,
            period: BudgetPeriod::Total,
        }
    }

    /// Refuses a negative limit.
    pub fn validate(&self) -> Result<(), BillingError> {
        if self.limit.is_negative() {
            return Err(BillingError::Negative {
                field: "budget.limit",
                value: self.limit,
            });
        }
        Ok(())
    }
}
