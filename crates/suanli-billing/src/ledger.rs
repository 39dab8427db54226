//! The ledger: an append-only list of numbered entries and the balances they add up to.
//!
//! Every change is made the same way: an operation checks its input, turns it into entries,
//! and each entry is applied by [`Ledger::apply`], the one function that changes balances. A
//! ledger rebuilt from its entries ([`Ledger::from_entries`]) therefore has exactly the state
//! of the one that wrote them, and replay re-checks every entry on the way (sequence numbers,
//! charges recomputed from usage, voucher balances, settlements complete), so a damaged log is
//! refused instead of believed.
//!
//! A ledger serialises as its entries alone and deserialises by replaying them.
//!
//! # Compaction
//! A ledger keeps every settlement, so it grows with every lease. [`Ledger::compact`] closes
//! the months strictly before a given month (China Standard Time) and folds them:
//! - **What belongs to a month**: a lease belongs, whole, to the month in which it **ended**
//!   (a settlement batch is never split); an adjustment to the month it was made in. Vouchers,
//!   budgets, tenant accounts and open holds belong to no month and are kept whole (a hold is
//!   open until its lease settles, whenever that is).
//! - **What is kept of a closed month**: per tenant and month, what its statement and the
//!   subsidy report need ([`ClosedMonth`]: lease count, usage lines, cost, subsidy, what each
//!   voucher and each pool kind paid), and every adjustment as a line (statements list them).
//!   The settlements of closed months and all entries so far are dropped. Every query
//!   (statements, the subsidy report, voucher balances, totals, budgets, tenant accounts)
//!   answers exactly as before; `settlements()` and `settlement()` know only open months.
//! - **Idempotency after compaction**: a closed month's lease ids are forgotten, so a repeat of
//!   their settlement could not be recognised. Settling a lease that **ended in a closed month**
//!   is therefore refused with [`BillingError::LeaseInClosedMonth`]; callers close only months
//!   they no longer settle into. A lease id must not be reused for a lease ending later (the
//!   broker makes every id unique): the ledger cannot tell. Adjustments may still be made at any
//!   time; one dated in a closed month counts there.
//! - **Serialised form**: the entries so far are replaced by one [`EntryKind::Compacted`]
//!   entry: a [`Checkpoint`] of the whole state, closed months folded, open months'
//!   settlements whole. It takes the sequence number of the last entry it replaces and stands
//!   for the entries `0..=seq`, so sequence numbers stay continuous and later entries number
//!   exactly as without compaction: `next_seq()` is unchanged by it and `entries_from(seq)`
//!   counts from it (a log stores it in place of the entries it replaces). `apply` installs
//!   it: at the start of a log after checking it is consistent in itself (sums, voucher
//!   balances, charges recomputed from usage), after other entries only if it is exactly what
//!   compacting them gives. The other entry kinds are unchanged, so logs written before
//!   compaction existed replay as they did.
//!
//! Settling one lease appends, in one batch: the lease charge, one voucher debit per voucher
//! and lease part that pays, and the tenant's amount due. The broker must write a batch
//! atomically; a log cut inside a batch is refused on replay.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use suanli_core::Millis;

use crate::budget::Budget;
use crate::charge::{LeaseId, LeaseUsage, PartCharge, charge_lease};
use crate::error::{BillingError, BudgetPeriodLabel};
use crate::money::Fen;
use crate::month::Month;
use crate::voucher::{Voucher, VoucherId, VoucherShare, VoucherSpec, allocate};

mod compact;

pub use compact::{Checkpoint, ClosedBooks, ClosedMonth, CompactOutcome, FoldedAdjustment};

/// One entry of the ledger.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LedgerEntry {
    /// Position in the ledger, from 0, without gaps.
    pub seq: u64,
    /// When it was appended, unix ms (the caller's clock).
    pub at: Millis,
    /// What it records.
    pub kind: EntryKind,
}

/// What an entry records.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    /// An operator issued a voucher.
    VoucherIssued {
        /// The voucher as issued.
        voucher: VoucherSpec,
    },
    /// A lease ended and was charged: the first entry of its settlement.
    LeaseCharged {
        /// What it used.
        usage: LeaseUsage,
        /// The charge of each part.
        parts: Vec<PartCharge>,
        /// The charge of the lease.
        total: Fen,
    },
    /// A voucher paid towards one part of a lease.
    VoucherDebited {
        /// The lease.
        lease: LeaseId,
        /// The voucher.
        voucher: VoucherId,
        /// Index of the lease part.
        part: u32,
        /// What it paid, above zero.
        amount: Fen,
    },
    /// What the tenant owes for a lease after vouchers: the last entry of its settlement.
    TenantDue {
        /// The lease.
        lease: LeaseId,
        /// The tenant.
        tenant: String,
        /// The amount, charge minus voucher debits.
        amount: Fen,
    },
    /// A correction of what a tenant owes: positive charges more, negative credits.
    Adjusted {
        /// The tenant.
        tenant: String,
        /// The amount, not zero.
        amount: Fen,
        /// Why, for the statement.
        reason: String,
    },
    /// A tenant's budget was set or removed.
    BudgetSet {
        /// The tenant.
        tenant: String,
        /// The new budget; `None` removes it.
        budget: Option<Budget>,
    },
    /// The district's monthly subsidy budget was set or removed.
    SubsidyBudgetSet {
        /// Subsidy the district plans to spend per month; `None` removes it.
        monthly: Option<Fen>,
    },
    /// A placed lease's estimated cost is held against its tenant's budget until it settles.
    HoldPlaced {
        /// The lease.
        lease: LeaseId,
        /// The tenant.
        tenant: String,
        /// Estimated amount due after subsidy.
        amount: Fen,
    },
    /// A hold was released without a settlement (the lease was never placed after all).
    HoldReleased {
        /// The lease.
        lease: LeaseId,
    },
    /// The ledger was compacted: this entry stands for itself and every entry before it
    /// (sequence numbers `0..=seq`; it takes the last one's number) and carries the state they
    /// added up to, the closed months folded. See "Compaction" in the module docs.
    Compacted {
        /// The state at this entry.
        checkpoint: Box<Checkpoint>,
    },
}

/// A lease's charge shared between vouchers and the tenant: a settlement, or a quote.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Bill {
    /// What was (or would be) used.
    pub usage: LeaseUsage,
    /// Charge per part.
    pub parts: Vec<PartCharge>,
    /// The charge of the lease, before subsidy.
    pub charge: Fen,
    /// What each voucher pays, per part, in the order they pay.
    pub vouchers: Vec<VoucherShare>,
    /// Sum of the voucher shares.
    pub subsidy: Fen,
    /// What the tenant pays: `charge - subsidy`.
    pub tenant_due: Fen,
}

impl Bill {
    /// What one voucher pays towards this lease, over all parts.
    pub fn paid_by(&self, voucher: &VoucherId) -> Fen {
        Fen(self
            .vouchers
            .iter()
            .filter(|s| &s.voucher == voucher)
            .map(|s| s.amount.0)
            .sum())
    }

    /// What vouchers pay towards one part.
    pub fn subsidy_of_part(&self, part: usize) -> Fen {
        Fen(self
            .vouchers
            .iter()
            .filter(|s| s.part as usize == part)
            .map(|s| s.amount.0)
            .sum())
    }
}

/// A settled lease.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Settlement {
    /// The bill.
    pub bill: Bill,
    /// Sequence number of its `LeaseCharged` entry.
    pub seq: u64,
    /// When it was settled, unix ms.
    pub settled_at: Millis,
}

/// The answer of [`Ledger::settle`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SettleOutcome {
    /// The settlement, new or existing.
    pub settlement: Settlement,
    /// Whether this call settled the lease (false: it was settled before, nothing appended).
    pub newly_settled: bool,
}

/// What a tenant has spent and holds, for budgets.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TenantAccount {
    /// The budget, if any.
    pub budget: Option<Budget>,
    /// Amounts due and adjustments since the ledger began.
    pub spent_total: Fen,
    /// Amounts due (by month a lease ended) and adjustments (by month made), per month.
    pub spent_by_month: BTreeMap<Month, Fen>,
    /// Sum of open holds.
    pub held: Fen,
}

/// An open hold on a tenant's budget.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Hold {
    /// The tenant.
    pub tenant: String,
    /// The amount held.
    pub amount: Fen,
}

/// Sums over the whole ledger: charges = voucher debits + tenant dues, always.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LedgerTotals {
    /// Sum of lease charges.
    pub charges: Fen,
    /// Sum of voucher debits.
    pub voucher_debits: Fen,
    /// Sum of tenant dues.
    pub tenant_dues: Fen,
    /// Sum of adjustments.
    pub adjustments: Fen,
    /// Sum of the face values of all vouchers issued.
    pub vouchers_issued: Fen,
}

/// The accounting state: entries and the balances derived from them. See the module docs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ledger {
    entries: Vec<LedgerEntry>,
    vouchers: BTreeMap<VoucherId, Voucher>,
    /// Voucher ids per tenant, in order of issue, so settling looks only at the tenant's own.
    vouchers_by_tenant: BTreeMap<String, Vec<VoucherId>>,
    settlements: BTreeMap<LeaseId, Settlement>,
    /// The lease whose settlement batch is being applied: set by its charge, cleared by its due.
    pending: Option<LeaseId>,
    tenants: BTreeMap<String, TenantAccount>,
    holds: BTreeMap<LeaseId, Hold>,
    subsidy_budget_monthly: Option<Fen>,
    totals: LedgerTotals,
    /// The closed months, once the ledger was compacted.
    closed: Option<ClosedBooks>,
}

impl Ledger {
    /// An empty ledger.
    pub fn new() -> Ledger {
        Ledger::default()
    }

    /// Rebuilds a ledger by applying entries in order, checking each.
    pub fn from_entries(
        entries: impl IntoIterator<Item = LedgerEntry>,
    ) -> Result<Ledger, BillingError> {
        let mut ledger = Ledger::new();
        for entry in entries {
            ledger.apply(entry)?;
        }
        if let Some(lease) = &ledger.pending {
            return Err(corrupt(
                ledger.next_seq(),
                format!("settlement of lease {lease} has no tenant due entry"),
            ));
        }
        Ok(ledger)
    }

    /// All entries, in order. After compaction the first is the [`EntryKind::Compacted`]
    /// checkpoint, which stands for the entries before it.
    pub fn entries(&self) -> &[LedgerEntry] {
        &self.entries
    }

    /// Entries from sequence number `seq` on: what an operation appended, for the durable log.
    /// After compaction a `seq` the checkpoint replaced gives the checkpoint and all after it.
    pub fn entries_from(&self, seq: u64) -> &[LedgerEntry] {
        let first = self.entries.first().map_or(0, |e| e.seq);
        let offset = seq.saturating_sub(first);
        let start =
            usize::try_from(offset).map_or(self.entries.len(), |s| s.min(self.entries.len()));
        &self.entries[start..]
    }

    /// Sequence number the next entry will get.
    pub fn next_seq(&self) -> u64 {
        // Entries are continuous from the first, which is 0 or a checkpoint's.
        self.entries.last().map_or(0, |e| e.seq.saturating_add(1))
    }

    /// A voucher by id.
    pub fn voucher(&self, id: &VoucherId) -> Option<&Voucher> {
        self.vouchers.get(id)
    }

    /// A voucher by id, as a tenant may see it: an error when unknown or someone else's.
    pub fn voucher_for(&self, tenant: &str, id: &VoucherId) -> Result<&Voucher, BillingError> {
        let voucher = self
            .vouchers
            .get(id)
            .ok_or_else(|| BillingError::UnknownVoucher {
                voucher: id.clone(),
            })?;
        if voucher.spec.tenant != tenant {
            return Err(BillingError::VoucherOfOtherTenant {
                voucher: id.clone(),
                owner: voucher.spec.tenant.clone(),
                tenant: tenant.to_string(),
            });
        }
        Ok(voucher)
    }

    /// All vouchers, by id.
    pub fn vouchers(&self) -> impl Iterator<Item = &Voucher> {
        self.vouchers.values()
    }

    /// One tenant's vouchers, in order of issue.
    pub fn vouchers_of(&self, tenant: &str) -> impl Iterator<Item = &Voucher> {
        self.vouchers_by_tenant
            .get(tenant)
            .into_iter()
            .flatten()
            .filter_map(|id| self.vouchers.get(id))
    }

    /// A settlement by lease.
    pub fn settlement(&self, lease: &LeaseId) -> Option<&Settlement> {
        self.settlements.get(lease)
    }

    /// All settlements, by lease id.
    pub fn settlements(&self) -> impl Iterator<Item = &Settlement> {
        self.settlements.values()
    }

    /// A tenant's spending and budget, if the ledger knows the tenant.
    pub fn tenant(&self, tenant: &str) -> Option<&TenantAccount> {
        self.tenants.get(tenant)
    }

    /// The open hold of a lease.
    pub fn hold(&self, lease: &LeaseId) -> Option<&Hold> {
        self.holds.get(lease)
    }

    /// The district's monthly subsidy budget.
    pub fn subsidy_budget_monthly(&self) -> Option<Fen> {
        self.subsidy_budget_monthly
    }

    /// Sums over all entries.
    pub fn totals(&self) -> LedgerTotals {
        self.totals
    }

    /// Issues a voucher.
    pub fn issue_voucher(&mut self, voucher: VoucherSpec, now: Millis) -> Result<(), BillingError> {
        voucher.validate()?;
        if self.vouchers.contains_key(&voucher.id) {
            return Err(BillingError::DuplicateVoucher {
                voucher: voucher.id.clone(),
            });
        }
        self.append(now, vec![EntryKind::VoucherIssued { voucher }])
    }

    /// Prices a lease with the vouchers as they stand, without recording anything: the charge,
    /// what each voucher would pay and what the tenant would pay.
    pub fn quote(&self, usage: &LeaseUsage) -> Result<Bill, BillingError> {
        let (parts, charge) = charge_lease(usage)?;
        let vouchers = allocate(usage, &parts, self.vouchers_of(&usage.tenant))?;
        let subsidy = Fen::checked_sum(vouchers.iter().map(|s| s.amount), "subsidy")?;
        let tenant_due = charge.checked_sub(subsidy, "tenant due")?;
        Ok(Bill {
            usage: usage.clone(),
            parts,
            charge,
            vouchers,
            subsidy,
            tenant_due,
        })
    }

    /// Settles an ended lease: charges it, debits the vouchers that apply, records what the
    /// tenant owes and releases its budget hold. Idempotent by lease id: settling a lease again
    /// with the same usage returns the existing settlement and appends nothing; with different
    /// usage it is an error. A lease that ended in a month closed by [`Ledger::compact`] is
    /// refused ([`BillingError::LeaseInClosedMonth`]): whether it was settled is forgotten.
    pub fn settle(
        &mut self,
        usage: LeaseUsage,
        now: Millis,
    ) -> Result<SettleOutcome, BillingError> {
        self.check_open(&usage)?;
        if let Some(existing) = self.settlements.get(&usage.lease) {
            if existing.bill.usage != usage {
                return Err(BillingError::ConflictingSettlement { lease: usage.lease });
            }
            return Ok(SettleOutcome {
                settlement: existing.clone(),
                newly_settled: false,
            });
        }
        let bill = self.quote(&usage)?;
        let lease = usage.lease.clone();
        let tenant = usage.tenant.clone();
        let mut batch = Vec::with_capacity(bill.vouchers.len() + 2);
        batch.push(EntryKind::LeaseCharged {
            usage,
            parts: bill.parts.clone(),
            total: bill.charge,
        });
        batch.extend(bill.vouchers.iter().map(|s| EntryKind::VoucherDebited {
            lease: lease.clone(),
            voucher: s.voucher.clone(),
            part: s.part,
            amount: s.amount,
        }));
        batch.push(EntryKind::TenantDue {
            lease: lease.clone(),
            tenant,
            amount: bill.tenant_due,
        });
        self.append(now, batch)?;
        let settlement = self.settlements[&lease].clone();
        Ok(SettleOutcome {
            settlement,
            newly_settled: true,
        })
    }

    /// Refuses a lease that ended in a closed month.
    fn check_open(&self, usage: &LeaseUsage) -> Result<(), BillingError> {
        if let Some(closed) = &self.closed {
            let month = Month::containing(usage.ended_at);
            if month < closed.before {
                return Err(BillingError::LeaseInClosedMonth {
                    lease: usage.lease.clone(),
                    month,
                    closed_before: closed.before,
                });
            }
        }
        Ok(())
    }

    /// Records a correction of what a tenant owes (positive) or a credit (negative).
    pub fn adjust(
        &mut self,
        tenant: &str,
        amount: Fen,
        reason: &str,
        now: Millis,
    ) -> Result<(), BillingError> {
        self.append(
            now,
            vec![EntryKind::Adjusted {
                tenant: tenant.to_string(),
                amount,
                reason: reason.to_string(),
            }],
        )
    }

    /// Sets (or with `None` removes) a tenant's budget.
    pub fn set_budget(
        &mut self,
        tenant: &str,
        budget: Option<Budget>,
        now: Millis,
    ) -> Result<(), BillingError> {
        self.append(
            now,
            vec![EntryKind::BudgetSet {
                tenant: tenant.to_string(),
                budget,
            }],
        )
    }

    /// Sets (or with `None` removes) the district's monthly subsidy budget, which the subsidy
    /// report compares spending with.
    pub fn set_subsidy_budget(
        &mut self,
        monthly: Option<Fen>,
        now: Millis,
    ) -> Result<(), BillingError> {
        self.append(now, vec![EntryKind::SubsidyBudgetSet { monthly }])
    }

    /// Checks a tenant's budget before a lease: `Ok` when the tenant has no budget or
    /// `committed + estimated_cost` stays within its limit, otherwise
    /// [`BillingError::BudgetExceeded`] naming the budget, its limit and what is committed.
    /// `estimated_cost` is what the tenant would pay, after subsidy (a quote's `tenant_due`).
    pub fn would_exceed(
        &self,
        tenant: &str,
        estimated_cost: Fen,
        now: Millis,
    ) -> Result<(), BillingError> {
        if estimated_cost.is_negative() {
            return Err(BillingError::Negative {
                field: "estimated_cost",
                value: estimated_cost,
            });
        }
        let Some(account) = self.tenants.get(tenant) else {
            return Ok(());
        };
        let Some(budget) = account.budget else {
            return Ok(());
        };
        let (spent, month) = match budget.period {
            crate::budget::BudgetPeriod::Total => (account.spent_total, None),
            crate::budget::BudgetPeriod::Monthly => {
                let month = Month::containing(now);
                let spent = account
                    .spent_by_month
                    .get(&month)
                    .copied()
                    .unwrap_or(Fen::ZERO);
                (spent, Some(month))
            }
        };
        let committed = spent.checked_add(account.held, "budget committed")?;
        let after = committed.checked_add(estimated_cost, "budget committed")?;
        if after > budget.limit {
            return Err(BillingError::BudgetExceeded {
                tenant: tenant.to_string(),
                period: BudgetPeriodLabel {
                    period: budget.period,
                    month,
                },
                limit: budget.limit,
                committed,
                requested: estimated_cost,
            });
        }
        Ok(())
    }

    /// Holds a placed lease's estimated cost (after subsidy) against its tenant's budget until
    /// the lease is settled. Does not check the budget: call [`Ledger::would_exceed`] first.
    pub fn place_hold(
        &mut self,
        lease: LeaseId,
        tenant: &str,
        amount: Fen,
        now: Millis,
    ) -> Result<(), BillingError> {
        self.append(
            now,
            vec![EntryKind::HoldPlaced {
                lease,
                tenant: tenant.to_string(),
                amount,
            }],
        )
    }

    /// Releases a hold without settling, for a lease that never came to be.
    pub fn release_hold(&mut self, lease: LeaseId, now: Millis) -> Result<(), BillingError> {
        self.append(now, vec![EntryKind::HoldReleased { lease }])
    }

    /// Appends a batch of entries, all or nothing.
    fn append(&mut self, at: Millis, batch: Vec<EntryKind>) -> Result<(), BillingError> {
        if batch.len() == 1 {
            let entry = LedgerEntry {
                seq: self.next_seq(),
                at,
                kind: batch.into_iter().next().expect("one entry"),
            };
            // A single entry is checked before it changes anything.
            return self.apply_checked(entry);
        }
        // A settlement batch: its entries were computed from this state by `quote`, and each is
        // checked again as it is applied. Should one still fail (an overflow of a running
        // total), the entries before it are undone, so the batch is all or nothing.
        let mark = self.mark(&batch);
        for kind in batch {
            let entry = LedgerEntry {
                seq: self.next_seq(),
                at,
                kind,
            };
            if let Err(e) = self.apply_checked(entry) {
                self.undo_to(mark);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Applies one entry read back from the log. Refuses (with
    /// [`BillingError::CorruptLedger`]) anything this ledger would not have written.
    pub fn apply(&mut self, entry: LedgerEntry) -> Result<(), BillingError> {
        let seq = entry.seq;
        self.apply_checked(entry).map_err(|e| match e {
            BillingError::CorruptLedger { .. } => e,
            other => corrupt(seq, other.to_string()),
        })
    }

    fn apply_checked(&mut self, entry: LedgerEntry) -> Result<(), BillingError> {
        let seq = entry.seq;
        // A checkpoint takes the sequence number of the last entry it replaces (so the entries
        // after it number as they would without it); a log may start with one.
        let expected = match (&entry.kind, self.entries.last()) {
            (EntryKind::Compacted { .. }, None) => seq,
            (EntryKind::Compacted { .. }, Some(last)) => last.seq,
            _ => self.next_seq(),
        };
        if seq != expected {
            return Err(corrupt(
                expected,
                format!("expected sequence number {expected}, found {seq}"),
            ));
        }
        let in_settlement = matches!(
            entry.kind,
            EntryKind::VoucherDebited { .. } | EntryKind::TenantDue { .. }
        );
        if let Some(lease) = &self.pending
            && !in_settlement
        {
            return Err(corrupt(
                seq,
                format!("settlement of lease {lease} interrupted by another entry"),
            ));
        }
        match &entry.kind {
            EntryKind::VoucherIssued { voucher } => {
                voucher.validate()?;
                if self.vouchers.contains_key(&voucher.id) {
                    return Err(BillingError::DuplicateVoucher {
                        voucher: voucher.id.clone(),
                    });
                }
                let issued = self
                    .totals
                    .vouchers_issued
                    .checked_add(voucher.face_value, "vouchers issued")?;
                self.totals.vouchers_issued = issued;
                self.vouchers_by_tenant
                    .entry(voucher.tenant.clone())
                    .or_default()
                    .push(voucher.id.clone());
                self.vouchers.insert(
                    voucher.id.clone(),
                    Voucher {
                        spec: voucher.clone(),
                        issued_at: entry.at,
                        issue_seq: seq,
                        used: Fen::ZERO,
                    },
                );
            }
            EntryKind::LeaseCharged {
                usage,
                parts,
                total,
            } => {
                if self.settlements.contains_key(&usage.lease) {
                    return Err(corrupt(seq, format!("lease {} charged twice", usage.lease)));
                }
                self.check_open(usage)?;
                let (expected_parts, expected_total) = charge_lease(usage)?;
                if &expected_parts != parts || expected_total != *total {
                    return Err(corrupt(
                        seq,
                        format!("charge of lease {} does not match its usage", usage.lease),
                    ));
                }
                let charges = self.totals.charges.checked_add(*total, "charges")?;
                self.totals.charges = charges;
                self.pending = Some(usage.lease.clone());
                self.settlements.insert(
                    usage.lease.clone(),
                    Settlement {
                        bill: Bill {
                            usage: usage.clone(),
                            parts: parts.clone(),
                            charge: *total,
                            vouchers: Vec::new(),
                            subsidy: Fen::ZERO,
                            tenant_due: Fen::ZERO,
                        },
                        seq,
                        settled_at: entry.at,
                    },
                );
            }
            EntryKind::VoucherDebited {
                lease,
                voucher,
                part,
                amount,
            } => {
                self.check_pending(seq, lease)?;
                let settlement = &self.settlements[lease];
                let tenant = &settlement.bill.usage.tenant;
                let v = self.voucher_for(tenant, voucher)?;
                if !amount.is_positive() || *amount > v.remaining() {
                    return Err(corrupt(
                        seq,
                        format!(
                            "voucher {voucher} debited {amount} with {} remaining",
                            v.remaining()
                        ),
                    ));
                }
                let Some(part_charge) = settlement.bill.parts.get(*part as usize) else {
                    return Err(corrupt(seq, format!("lease {lease} has no part {part}")));
                };
                let part_covered = settlement
                    .bill
                    .subsidy_of_part(*part as usize)
                    .checked_add(*amount, "subsidy")?;
                if part_covered > part_charge.amount {
                    return Err(corrupt(
                        seq,
                        format!("vouchers pay more than the charge of lease {lease} part {part}"),
                    ));
                }
                let subsidy = settlement.bill.subsidy.checked_add(*amount, "subsidy")?;
                let debits = self
                    .totals
                    .voucher_debits
                    .checked_add(*amount, "voucher debits")?;
                let v = self.vouchers.get_mut(voucher).expect("checked above");
                v.used = Fen(v.used.0 + amount.0);
                let settlement = self.settlements.get_mut(lease).expect("pending exists");
                settlement.bill.subsidy = subsidy;
                settlement.bill.vouchers.push(VoucherShare {
                    voucher: voucher.clone(),
                    part: *part,
                    amount: *amount,
                });
                self.totals.voucher_debits = debits;
            }
            EntryKind::TenantDue {
                lease,
                tenant,
                amount,
            } => {
                self.check_pending(seq, lease)?;
                let bill = &self.settlements[lease].bill;
                if &bill.usage.tenant != tenant
                    || bill.charge.checked_sub(bill.subsidy, "tenant due")? != *amount
                {
                    return Err(corrupt(
                        seq,
                        format!("tenant due of lease {lease} is not its charge less subsidy"),
                    ));
                }
                let month = Month::containing(bill.usage.ended_at);
                let dues = self
                    .totals
                    .tenant_dues
                    .checked_add(*amount, "tenant dues")?;
                self.add_spending(tenant, month, *amount)?;
                self.totals.tenant_dues = dues;
                self.settlements
                    .get_mut(lease)
                    .expect("pending exists")
                    .bill
                    .tenant_due = *amount;
                self.pending = None;
                if let Some(hold) = self.holds.remove(lease) {
                    self.release(&hold);
                }
            }
            EntryKind::Adjusted {
                tenant,
                amount,
                reason,
            } => {
                if tenant.is_empty() {
                    return Err(BillingError::EmptyField { field: "tenant" });
                }
                if reason.is_empty() {
                    return Err(BillingError::EmptyField { field: "reason" });
                }
                if amount.fen() == 0 {
                    return Err(BillingError::Zero {
                        field: "adjustment.amount",
                    });
                }
                let adjustments = self
                    .totals
                    .adjustments
                    .checked_add(*amount, "adjustments")?;
                self.add_spending(tenant, Month::containing(entry.at), *amount)?;
                self.totals.adjustments = adjustments;
            }
            EntryKind::BudgetSet { tenant, budget } => {
                if tenant.is_empty() {
                    return Err(BillingError::EmptyField { field: "tenant" });
                }
                if let Some(budget) = budget {
                    budget.validate()?;
                }
                self.tenants.entry(tenant.clone()).or_default().budget = *budget;
            }
            EntryKind::SubsidyBudgetSet { monthly } => {
                if let Some(limit) = monthly
                    && limit.is_negative()
                {
                    return Err(BillingError::Negative {
                        field: "subsidy_budget.monthly",
                        value: *limit,
                    });
                }
                self.subsidy_budget_monthly = *monthly;
            }
            EntryKind::HoldPlaced {
                lease,
                tenant,
                amount,
            } => {
                if lease.0.is_empty() {
                    return Err(BillingError::EmptyField { field: "lease" });
                }
                if tenant.is_empty() {
                    return Err(BillingError::EmptyField { field: "tenant" });
                }
                if amount.is_negative() {
                    return Err(BillingError::Negative {
                        field: "hold amount",
                        value: *amount,
                    });
                }
                if self.settlements.contains_key(lease) {
                    return Err(BillingError::AlreadySettled {
                        lease: lease.clone(),
                    });
                }
                if self.holds.contains_key(lease) {
                    return Err(BillingError::DuplicateHold {
                        lease: lease.clone(),
                    });
                }
                let held = self
                    .tenants
                    .get(tenant)
                    .map_or(Fen::ZERO, |a| a.held)
                    .checked_add(*amount, "held")?;
                self.tenants.entry(tenant.clone()).or_default().held = held;
                self.holds.insert(
                    lease.clone(),
                    Hold {
                        tenant: tenant.clone(),
                        amount: *amount,
                    },
                );
            }
            EntryKind::HoldReleased { lease } => {
                let hold = self
                    .holds
                    .remove(lease)
                    .ok_or_else(|| BillingError::UnknownHold {
                        lease: lease.clone(),
                    })?;
                self.release(&hold);
            }
            EntryKind::Compacted { checkpoint } => {
                // Clears the entries it replaces; it becomes the first.
                self.apply_checkpoint(seq, checkpoint)?;
            }
        }
        self.entries.push(entry);
        Ok(())
    }

    fn check_pending(&self, seq: u64, lease: &LeaseId) -> Result<(), BillingError> {
        if self.pending.as_ref() != Some(lease) {
            return Err(corrupt(
                seq,
                format!("entry for lease {lease} outside its settlement"),
            ));
        }
        Ok(())
    }

    fn add_spending(
        &mut self,
        tenant: &str,
        month: Month,
        amount: Fen,
    ) -> Result<(), BillingError> {
        // Both sums are checked before the account is touched (or created), so a refused
        // entry leaves no trace.
        let (total, in_month) = match self.tenants.get(tenant) {
            Some(account) => (
                account.spent_total.checked_add(amount, "tenant spending")?,
                account
                    .spent_by_month
                    .get(&month)
                    .copied()
                    .unwrap_or(Fen::ZERO)
                    .checked_add(amount, "tenant spending")?,
            ),
            None => (amount, amount),
        };
        let account = self.tenants.entry(tenant.to_string()).or_default();
        account.spent_total = total;
        account.spent_by_month.insert(month, in_month);
        Ok(())
    }

    fn release(&mut self, hold: &Hold) {
        if let Some(account) = self.tenants.get_mut(&hold.tenant) {
            // Holds were added to `held` when placed, so the difference cannot go below zero.
            account.held = Fen(account.held.0 - hold.amount.0);
        }
    }

    /// What a batch can change, to undo it: the entry count, the totals, and the tenants,
    /// vouchers and holds its entries name (a batch names few, so this is cheap).
    fn mark(&self, batch: &[EntryKind]) -> Mark {
        let mut mark = Mark {
            entries: self.entries.len(),
            pending: self.pending.clone(),
            totals: self.totals,
            tenants: Vec::new(),
            vouchers: Vec::new(),
            holds: Vec::new(),
        };
        for kind in batch {
            match kind {
                EntryKind::LeaseCharged { usage, .. } => {
                    mark.tenants.push((
                        usage.tenant.clone(),
                        self.tenants.get(&usage.tenant).cloned(),
                    ));
                    mark.holds
                        .push((usage.lease.clone(), self.holds.get(&usage.lease).cloned()));
                }
                EntryKind::VoucherDebited { voucher, .. } => {
                    if let Some(v) = self.vouchers.get(voucher) {
                        mark.vouchers.push((voucher.clone(), v.used));
                    }
                }
                _ => {}
            }
        }
        mark
    }

    fn undo_to(&mut self, mark: Mark) {
        for entry in self.entries.drain(mark.entries..) {
            if let EntryKind::LeaseCharged { usage, .. } = entry.kind {
                self.settlements.remove(&usage.lease);
            }
        }
        // Restored in reverse so the oldest saved value of a name wins.
        for (id, used) in mark.vouchers.into_iter().rev() {
            if let Some(v) = self.vouchers.get_mut(&id) {
                v.used = used;
            }
        }
        for (tenant, account) in mark.tenants.into_iter().rev() {
            match account {
                Some(account) => self.tenants.insert(tenant, account),
                None => self.tenants.remove(&tenant),
            };
        }
        for (lease, hold) in mark.holds.into_iter().rev() {
            match hold {
                Some(hold) => self.holds.insert(lease, hold),
                None => self.holds.remove(&lease),
            };
        }
        self.pending = mark.pending;
        self.totals = mark.totals;
    }
}

struct Mark {
    entries: usize,
    pending: Option<LeaseId>,
    totals: LedgerTotals,
    tenants: Vec<(String, Option<TenantAccount>)>,
    vouchers: Vec<(VoucherId, Fen)>,
    holds: Vec<(LeaseId, Option<Hold>)>,
}

fn corrupt(seq: u64, reason: String) -> BillingError {
    BillingError::CorruptLedger { seq, reason }
}

#[derive(Serialize)]
struct EntriesRef<'a> {
    entries: &'a [LedgerEntry],
}

#[derive(Deserialize)]
struct EntriesOwned {
    entries: Vec<LedgerEntry>,
}

/// A ledger's entries, owned, serialised exactly as the ledger is: what a snapshot keeps of
/// it. Taking one copies the entries only, not the balances, settlements and holds derived
/// from them (which the ledger rebuilds when it is read back).
#[derive(Clone, Debug)]
pub struct LedgerImage(Vec<LedgerEntry>);

impl Ledger {
    /// The entries, to serialise elsewhere as this ledger serialises.
    pub fn image(&self) -> LedgerImage {
        LedgerImage(self.entries.clone())
    }
}

impl Serialize for LedgerImage {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        EntriesRef { entries: &self.0 }.serialize(serializer)
    }
}

impl Serialize for Ledger {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        EntriesRef {
            entries: &self.entries,
        }
        .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Ledger {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Ledger, D::Error> {
        let owned = EntriesOwned::deserialize(deserializer)?;
        Ledger::from_entries(owned.entries).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use suanli_core::PoolKind;

    use super::*;
    use crate::budget::BudgetPeriod;
    use crate::charge::LeasePart;
    use crate::voucher::VoucherScope;

    const HOUR: Millis = 3_600_000;
    const DAY: Millis = 24 * HOUR;

    /// 2025-03-01 00:00 China Standard Time.
    pub(super) fn march() -> Millis {
        Month::new(2025, 3).unwrap().starts_at_ms() as Millis
    }

    pub(super) fn spec(
        id: &str,
        tenant: &str,
        face: i64,
        rate_bp: u32,
        from: Millis,
        until: Millis,
    ) -> VoucherSpec {
        VoucherSpec {
            id: VoucherId::new(id),
            tenant: tenant.into(),
            face_value: Fen(face),
            rate_bp,
            per_lease_cap: None,
            scope: VoucherScope::AllPools,
            valid_from: from,
            valid_until: until,
        }
    }

    /// One device at ¥100.00 per hour in a local pool.
    pub(super) fn usage(lease: &str, tenant: &str, start: Millis, end: Millis) -> LeaseUsage {
        LeaseUsage {
            lease: LeaseId::new(lease),
            tenant: tenant.into(),
            started_at: start,
            ended_at: end,
            parts: vec![LeasePart {
                pool: "futian-aicc".into(),
                pool_kind: PoolKind::LocalCentre,
                model: "ascend-910b".into(),
                devices: 1,
                tflops: 376,
                price_per_device_hour: Fen(10_000),
                billing_increment_ms: None,
            }],
        }
    }

    #[test]
    fn settlement_is_idempotent_by_lease() {
        let t = march();
        let mut ledger = Ledger::new();
        ledger
            .issue_voucher(spec("v", "acme", 1_000_000, 5_000, t, t + 30 * DAY), t)
            .unwrap();
        let u = usage("r1", "acme", t, t + HOUR);
        let first = ledger.settle(u.clone(), t + HOUR).unwrap();
        assert!(first.newly_settled);
        assert_eq!(first.settlement.bill.charge, Fen(10_000));
        assert_eq!(first.settlement.bill.subsidy, Fen(5_000));
        // Charge, one debit, due.
        assert_eq!(ledger.entries().len(), 1 + 3);
        let again = ledger.settle(u.clone(), t + 2 * HOUR).unwrap();
        assert!(!again.newly_settled);
        assert_eq!(again.settlement, first.settlement);
        assert_eq!(ledger.entries().len(), 4);
        assert_eq!(
            ledger.voucher(&VoucherId::new("v")).unwrap().used,
            Fen(5_000)
        );

        let mut longer = u;
        longer.ended_at += 1;
        assert_eq!(
            ledger.settle(longer, t + 2 * HOUR),
            Err(BillingError::ConflictingSettlement {
                lease: LeaseId::new("r1")
            })
        );
        assert_eq!(ledger.entries().len(), 4);
    }

    #[test]
    fn voucher_expiring_mid_lease_through_the_ledger() {
        let t = march();
        let mut ledger = Ledger::new();
        // Valid for the first quarter of a four-hour lease, at 100%.
        ledger
            .issue_voucher(spec("v", "acme", 1_000_000, 10_000, 0, t + HOUR), 0)
            .unwrap();
        let s = ledger
            .settle(usage("r1", "acme", t, t + 4 * HOUR), t + 4 * HOUR)
            .unwrap()
            .settlement;
        assert_eq!(s.bill.charge, Fen(40_000));
        assert_eq!(s.bill.subsidy, Fen(10_000));
        assert_eq!(s.bill.tenant_due, Fen(30_000));
    }

    #[test]
    fn refused_operations_append_nothing() {
        let mut ledger = Ledger::new();
        ledger
            .issue_voucher(spec("v", "acme", 100, 5_000, 0, 10), 0)
            .unwrap();
        let before = ledger.clone();
        assert!(matches!(
            ledger.issue_voucher(spec("v", "acme", 100, 5_000, 0, 10), 0),
            Err(BillingError::DuplicateVoucher { .. })
        ));
        assert!(matches!(
            ledger.issue_voucher(spec("w", "acme", -1, 5_000, 0, 10), 0),
            Err(BillingError::NotPositive { .. })
        ));
        assert!(matches!(
            ledger.issue_voucher(spec("w", "acme", 100, 12_000, 0, 10), 0),
            Err(BillingError::RateOutOfRange { .. })
        ));
        assert!(matches!(
            ledger.issue_voucher(spec("w", "acme", 100, 5_000, 10, 10), 0),
            Err(BillingError::ValidityEndsBeforeStart { .. })
        ));
        assert!(matches!(
            ledger.adjust("acme", Fen(0), "nothing", 0),
            Err(BillingError::Zero { .. })
        ));
        assert!(matches!(
            ledger.adjust("acme", Fen(5), "", 0),
            Err(BillingError::EmptyField { field: "reason" })
        ));
        assert!(matches!(
            ledger.set_budget("acme", Some(Budget::monthly(Fen(-1))), 0),
            Err(BillingError::Negative { .. })
        ));
        assert!(matches!(
            ledger.set_subsidy_budget(Some(Fen(-1)), 0),
            Err(BillingError::Negative { .. })
        ));
        assert!(matches!(
            ledger.release_hold(LeaseId::new("r9"), 0),
            Err(BillingError::UnknownHold { .. })
        ));
        assert!(matches!(
            ledger.settle(usage("r1", "acme", 10, 5), 10),
            Err(BillingError::LeaseEndsBeforeStart { .. })
        ));
        assert_eq!(ledger, before);
    }

    #[test]
    fn vouchers_are_looked_up_per_tenant() {
        let mut ledger = Ledger::new();
        ledger
            .issue_voucher(spec("v", "acme", 100, 5_000, 0, 10), 0)
            .unwrap();
        assert!(ledger.voucher_for("acme", &VoucherId::new("v")).is_ok());
        assert_eq!(
            ledger
                .voucher_for("globex", &VoucherId::new("v"))
                .unwrap_err(),
            BillingError::VoucherOfOtherTenant {
                voucher: VoucherId::new("v"),
                owner: "acme".into(),
                tenant: "globex".into(),
            }
        );
        assert_eq!(
            ledger
                .voucher_for("acme", &VoucherId::new("x"))
                .unwrap_err(),
            BillingError::UnknownVoucher {
                voucher: VoucherId::new("x")
            }
        );
    }

    #[test]
    fn a_monthly_budget_counts_dues_and_holds_of_the_month() {
        let t = march();
        let mut ledger = Ledger::new();
        ledger
            .set_budget("acme", Some(Budget::monthly(Fen(50_000))), t)
            .unwrap();
        ledger
            .settle(usage("r1", "acme", t, t + 3 * HOUR), t + 3 * HOUR)
            .unwrap();
        ledger
            .place_hold(LeaseId::new("r2"), "acme", Fen(10_000), t + 3 * HOUR)
            .unwrap();
        // ¥300 due + ¥100 held: ¥100 more fits, ¥100.01 does not.
        assert!(
            ledger
                .would_exceed("acme", Fen(10_000), t + 4 * HOUR)
                .is_ok()
        );
        let err = ledger
            .would_exceed("acme", Fen(10_001), t + 4 * HOUR)
            .unwrap_err();
        assert_eq!(
            err,
            BillingError::BudgetExceeded {
                tenant: "acme".into(),
                period: BudgetPeriodLabel {
                    period: BudgetPeriod::Monthly,
                    month: Some(Month::new(2025, 3).unwrap()),
                },
                limit: Fen(50_000),
                committed: Fen(40_000),
                requested: Fen(10_001),
            }
        );
        assert_eq!(
            err.to_string(),
            "tenant acme: monthly (2025-03) budget of ¥500.00 would be exceeded: ¥400.00 already committed, ¥100.01 requested"
        );
        // In April the March dues no longer count, the open hold still does.
        let april = Month::new(2025, 4).unwrap().starts_at_ms() as Millis;
        assert!(ledger.would_exceed("acme", Fen(40_000), april).is_ok());
        assert!(ledger.would_exceed("acme", Fen(40_001), april).is_err());
        // Settling r2 releases its hold.
        ledger
            .settle(usage("r2", "acme", april, april + HOUR), april + HOUR)
            .unwrap();
        assert_eq!(ledger.tenant("acme").unwrap().held, Fen::ZERO);
        assert!(ledger.would_exceed("acme", Fen(40_000), april).is_ok());
        assert!(ledger.would_exceed("acme", Fen(40_001), april).is_err());
        // Other tenants and removed budgets are not limited.
        assert!(ledger.would_exceed("globex", Fen(i64::MAX), april).is_ok());
        ledger.set_budget("acme", None, april).unwrap();
        assert!(ledger.would_exceed("acme", Fen(i64::MAX), april).is_ok());
        assert!(matches!(
            ledger.would_exceed("acme", Fen(-1), april),
            Err(BillingError::Negative { .. })
        ));
    }

    #[test]
    fn a_total_budget_counts_everything_after_subsidy() {
        let t = march();
        let mut ledger = Ledger::new();
        ledger
            .set_budget("acme", Some(Budget::total(Fen(20_000))), t)
            .unwrap();
        ledger
            .issue_voucher(spec("v", "acme", 1_000_000, 5_000, t, t + 90 * DAY), t)
            .unwrap();
        // ¥100 charge, ¥50 after subsidy: only ¥50 counts.
        ledger
            .settle(usage("r1", "acme", t, t + HOUR), t + HOUR)
            .unwrap();
        let later = t + 60 * DAY;
        ledger
            .adjust("acme", Fen(-1_000), "goodwill credit", later)
            .unwrap();
        assert_eq!(ledger.tenant("acme").unwrap().spent_total, Fen(4_000));
        assert!(ledger.would_exceed("acme", Fen(16_000), later).is_ok());
        let err = ledger.would_exceed("acme", Fen(16_001), later).unwrap_err();
        assert!(matches!(
            err,
            BillingError::BudgetExceeded {
                committed: Fen(4_000),
                period: BudgetPeriodLabel { month: None, .. },
                ..
            }
        ));
        assert!(err.to_string().contains("total budget of ¥200.00"));
    }

    #[test]
    fn an_adjustment_that_would_overflow_changes_nothing() {
        let mut ledger = Ledger::new();
        ledger.adjust("acme", Fen(i64::MAX), "huge", 0).unwrap();
        let before = ledger.clone();
        assert!(matches!(
            ledger.adjust("acme", Fen(1), "one more", 0),
            Err(BillingError::Overflow { .. })
        ));
        assert_eq!(ledger, before);
    }

    #[test]
    fn holds_are_checked() {
        let mut ledger = Ledger::new();
        ledger
            .place_hold(LeaseId::new("r1"), "acme", Fen(5), 0)
            .unwrap();
        assert!(matches!(
            ledger.place_hold(LeaseId::new("r1"), "acme", Fen(5), 0),
            Err(BillingError::DuplicateHold { .. })
        ));
        assert!(matches!(
            ledger.place_hold(LeaseId::new("r2"), "acme", Fen(-5), 0),
            Err(BillingError::Negative { .. })
        ));
        ledger.release_hold(LeaseId::new("r1"), 1).unwrap();
        assert_eq!(ledger.tenant("acme").unwrap().held, Fen::ZERO);
        ledger.settle(usage("r3", "acme", 0, HOUR), HOUR).unwrap();
        assert!(matches!(
            ledger.place_hold(LeaseId::new("r3"), "acme", Fen(5), HOUR),
            Err(BillingError::AlreadySettled { .. })
        ));
    }

    #[test]
    fn a_settlement_that_would_overflow_changes_nothing() {
        let mut ledger = Ledger::new();
        ledger
            .adjust("acme", Fen(i64::MAX - 5_000), "huge", 0)
            .unwrap();
        ledger
            .place_hold(LeaseId::new("r1"), "acme", Fen(7), 0)
            .unwrap();
        let before = ledger.clone();
        // ¥100 due overflows the tenant's spending after the charge entry was applied.
        assert!(matches!(
            ledger.settle(usage("r1", "acme", 0, HOUR), HOUR),
            Err(BillingError::Overflow { .. })
        ));
        assert_eq!(ledger, before);
        assert!(ledger.settlement(&LeaseId::new("r1")).is_none());
    }

    fn sample_ledger() -> Ledger {
        let t = march();
        let mut ledger = Ledger::new();
        ledger
            .issue_voucher(spec("v1", "acme", 12_000, 5_000, t, t + 2 * HOUR), t)
            .unwrap();
        ledger
            .issue_voucher(spec("v2", "acme", 1_000_000, 3_000, t, t + 90 * DAY), t)
            .unwrap();
        ledger
            .set_budget("acme", Some(Budget::monthly(Fen(1_000_000))), t)
            .unwrap();
        ledger.set_subsidy_budget(Some(Fen(500_000)), t).unwrap();
        ledger
            .place_hold(LeaseId::new("r1"), "acme", Fen(20_000), t)
            .unwrap();
        ledger
            .settle(usage("r1", "acme", t, t + 4 * HOUR), t + 4 * HOUR)
            .unwrap();
        ledger
            .settle(usage("r2", "globex", t, t + HOUR), t + HOUR)
            .unwrap();
        ledger
            .adjust("acme", Fen(-500), "outage credit", t + 5 * HOUR)
            .unwrap();
        ledger
    }

    #[test]
    fn replay_gives_the_same_ledger() {
        let ledger = sample_ledger();
        let replayed = Ledger::from_entries(ledger.entries().to_vec()).unwrap();
        assert_eq!(replayed, ledger);
        // Entry by entry, as a broker recovering from its log would.
        let mut stepwise = Ledger::new();
        for entry in ledger.entries() {
            stepwise.apply(entry.clone()).unwrap();
        }
        assert_eq!(stepwise, ledger);
        assert_eq!(ledger.entries_from(3), &ledger.entries()[3..]);
        assert!(ledger.entries_from(u64::MAX).is_empty());
    }

    #[test]
    fn serialises_as_its_entries() {
        let ledger = sample_ledger();
        let json = serde_json::to_string(&ledger).unwrap();
        let back: Ledger = serde_json::from_str(&json).unwrap();
        assert_eq!(back, ledger);
        // Entries also travel one by one.
        for entry in ledger.entries() {
            let one: LedgerEntry =
                serde_json::from_str(&serde_json::to_string(entry).unwrap()).unwrap();
            assert_eq!(&one, entry);
        }
        // A damaged snapshot is refused, not believed.
        let damaged = json.replacen("\"seq\":2", "\"seq\":7", 1);
        assert!(serde_json::from_str::<Ledger>(&damaged).is_err());
    }

    #[test]
    fn replay_refuses_a_damaged_log() {
        let entries = sample_ledger().entries().to_vec();
        let charge_at = entries
            .iter()
            .position(|e| matches!(e.kind, EntryKind::LeaseCharged { .. }))
            .unwrap();

        // A gap.
        let mut gap = entries.clone();
        gap.remove(1);
        assert!(matches!(
            Ledger::from_entries(gap),
            Err(BillingError::CorruptLedger { seq: 1, .. })
        ));

        // A log cut inside a settlement.
        let cut = entries[..=charge_at].to_vec();
        assert!(matches!(
            Ledger::from_entries(cut),
            Err(BillingError::CorruptLedger { .. })
        ));

        // A charge that does not match its usage.
        let mut tampered = entries.clone();
        if let EntryKind::LeaseCharged { total, .. } = &mut tampered[charge_at].kind {
            *total = Fen(total.0 + 1);
        }
        assert!(matches!(
            Ledger::from_entries(tampered),
            Err(BillingError::CorruptLedger { .. })
        ));

        // A debit beyond what the voucher has.
        let mut overdrawn = entries.clone();
        for e in &mut overdrawn {
            if let EntryKind::VoucherDebited { amount, .. } = &mut e.kind {
                *amount = Fen(10_000_000);
            }
        }
        assert!(matches!(
            Ledger::from_entries(overdrawn),
            Err(BillingError::CorruptLedger { .. })
        ));

        // A due that is not charge less subsidy.
        let mut wrong_due = entries;
        for e in &mut wrong_due {
            if let EntryKind::TenantDue { amount, .. } = &mut e.kind {
                *amount = Fen(amount.0 - 1);
            }
        }
        assert!(matches!(
            Ledger::from_entries(wrong_due),
            Err(BillingError::CorruptLedger { .. })
        ));
    }
}
